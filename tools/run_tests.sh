#!/usr/bin/env bash
# The project's test command: lint, then the test suite, in the environment of tools/setup_env.sh.
#
#   bash tools/run_tests.sh [extra pytest arguments]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
if [ ! -x "$VENV/bin/python" ]; then
    echo "ERROR: no environment at $VENV. Run  bash tools/setup_env.sh  first." >&2
    exit 1
fi
cd "$ROOT"
export PYTHONDONTWRITEBYTECODE=1
echo "==> ruff"
"$VENV/bin/ruff" check dynconv_mm tools tests configs
echo "==> pytest"
"$VENV/bin/python" -m pytest -q -p no:cacheprovider "$@" tests
