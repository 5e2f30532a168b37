#!/usr/bin/env bash
# The project's test command: lint, then the test suite, in the environment of tools/setup_env.sh.
#
#   bash tools/run_tests.sh [--core] [--no-lint] [pytest arguments and paths]
#
#   --core      only the layer, backbone, converter and mmpretrain-config tests: what CI runs on the
#               oldest and newest supported torch (tests/layers, tests/backbones, tests/converters,
#               tests/configs/test_pretrain_configs.py)
#   --no-lint   skip ruff (the lint does not depend on the torch version)
# Without test paths the whole suite (tests/) runs. VENV picks the environment (default: .venv).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
CORE_TESTS=(tests/layers tests/backbones tests/converters tests/configs/test_pretrain_configs.py)

LINT=1 CORE=0 HAS_PATH=0 ARGS=()
for arg in "$@"; do
    case "$arg" in
        --core) CORE=1 ;;
        --no-lint) LINT=0 ;;
        *) ARGS+=("$arg")
           if [[ "$arg" != -* ]] && { [ -e "${arg%%::*}" ] || [ -e "$ROOT/${arg%%::*}" ]; }; then HAS_PATH=1; fi ;;
    esac
done
if [ "$CORE" = 1 ]; then
    ARGS+=("${CORE_TESTS[@]}")
elif [ "$HAS_PATH" = 0 ]; then
    ARGS+=(tests)
fi

if [ ! -x "$VENV/bin/python" ]; then
    echo "ERROR: no environment at $VENV. Run  bash tools/setup_env.sh  first." >&2
    exit 1
fi
cd "$ROOT"
export PYTHONDONTWRITEBYTECODE=1
if [ "$LINT" = 1 ]; then
    echo "==> ruff"
    "$VENV/bin/ruff" check dynconv_mm tools tests configs
fi
echo "==> pytest ($("$VENV/bin/python" -c 'import torch; print("torch", torch.__version__)'))"
"$VENV/bin/python" -m pytest -q -p no:cacheprovider "${ARGS[@]}"
