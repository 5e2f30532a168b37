#!/usr/bin/env bash
# Set up everything dynconv_mm needs, in a virtual environment inside the checkout (.venv).
#
#   bash tools/setup_env.sh
#
# Idempotent: a second run checks the environment and returns in seconds. The mmcv wheel
# (compiled ops, built from source when no ready wheel matches the installed torch) is cached in
# ${DYNCONV_MM_CACHE:-~/.cache/dynconv_mm}/wheels so that later checkouts install it in seconds.
#
# Environment variables:
#   PYTHON             interpreter for the venv (default: python3.11, else python3)
#   VENV               venv location (default: <checkout>/.venv)
#   DYNCONV_MM_CACHE   cache folder for the mmcv wheel and the native CPU kernels (default: ~/.cache/dynconv_mm)
#   MAX_JOBS           parallel compile jobs for mmcv (default: number of cores)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
CACHE="${DYNCONV_MM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/dynconv_mm}"
REQ="$ROOT/requirements.txt"
CONSTRAINTS="$ROOT/requirements/constraints.txt"
STAMP="$VENV/.dynconv_mm_env"

step() { printf '\n==> %s\n' "$*"; }
fail() {
    printf '\nERROR: %s\n' "$1" >&2
    [ $# -gt 1 ] && printf 'What to do: %s\n' "$2" >&2
    exit 1
}
trap 'fail "the command on line $LINENO of tools/setup_env.sh failed (see the output above)." \
"fix the cause shown above and run bash tools/setup_env.sh again; finished steps are skipped."' ERR

# Pins are read from requirements.txt ("name==version" or "name<spec>" before any comment).
pin() {
    local spec
    spec=$(sed -e 's/#.*//' -e 's/[[:space:]]*$//' "$REQ" | grep -iE "^$1([=<>!~ ]|$)" | head -n1 || true)
    [ -n "$spec" ] || fail "requirements.txt has no line for $1." "restore requirements.txt from git."
    printf '%s' "$spec"
}

# openmim locates a package's configs and tools as <site-packages>/<package>/.mim, which a PEP 660
# editable install does not create; link the package there (what a legacy develop install gave).
link_for_mim() {
    local site
    site=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    if [ ! -e "$site/dynconv_mm" ] || [ -L "$site/dynconv_mm" ]; then
        ln -sfn "$ROOT/dynconv_mm" "$site/dynconv_mm"
    fi
}

env_hash() {
    cat "$REQ" "$CONSTRAINTS" "$ROOT/tools/setup_env.sh" | sha256sum | cut -d' ' -f1
}

# ---------------------------------------------------------------- interpreter and venv
if [ -z "${PYTHON:-}" ]; then
    if command -v python3.11 >/dev/null 2>&1 && python3.11 -c 'import sys' >/dev/null 2>&1; then
        PYTHON=python3.11
    else
        PYTHON=python3
    fi
fi
command -v "$PYTHON" >/dev/null 2>&1 || fail "no Python interpreter '$PYTHON' found." \
    "install Python 3.11 (torch 2.14.1 wheels exist for 3.9-3.13) or set PYTHON=/path/to/python."
"$PYTHON" -c 'import sys; assert (3, 9) <= sys.version_info[:2] < (3, 14)' 2>/dev/null || fail \
    "$PYTHON is $("$PYTHON" -V 2>&1); dynconv_mm needs Python 3.9 to 3.13." "set PYTHON to a supported interpreter."

if [ ! -x "$VENV/bin/python" ]; then
    step "creating the virtual environment $VENV"
    "$PYTHON" -m venv "$VENV" || fail "could not create a venv with $PYTHON." \
        "install the venv module (Debian: apt-get install python3-venv) and run again."
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip --disable-pip-version-check)

# ---------------------------------------------------------------- fast path
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$(env_hash)" ] && \
   "$PY" -c 'import torch, mmcv.ops, mmengine, mmdet, mmseg, mmpretrain, dynconv_mm' >/dev/null 2>&1; then
    step "environment is up to date ($VENV); re-linking dynconv_mm"
    "${PIP[@]}" install -q --no-deps --no-build-isolation -e "$ROOT" >/dev/null 2>&1 || fail "could not install dynconv_mm (editable)." "run: $PY -m pip install --no-deps --no-build-isolation -e $ROOT  to see why."
    link_for_mim
    echo "done: activate it with  source $VENV/bin/activate"
    exit 0
fi

# ---------------------------------------------------------------- build tools
step "installing build tools (pip, setuptools with pkg_resources, wheel, ninja)"
"${PIP[@]}" install -q -c "$CONSTRAINTS" --upgrade pip "setuptools>=77,<81" wheel ninja

# ---------------------------------------------------------------- torch
TORCH_PIN=$(pin torch)
TV_PIN=$(pin torchvision)
if ! "$PY" -c "import torch, torchvision, sys; sys.exit(0 if torch.__version__.split('+')[0] == '${TORCH_PIN#*==}' else 1)" \
        >/dev/null 2>&1; then
    step "installing $TORCH_PIN and $TV_PIN"
    "${PIP[@]}" install -q -c "$CONSTRAINTS" "$TORCH_PIN" "$TV_PIN" || fail "could not install $TORCH_PIN." \
        "check that pip can reach PyPI (or the local wheel store) and that there is about 6 GB of disk."
fi
TORCH_VER=$("$PY" -c 'import torch; print(torch.__version__.split("+")[0])')
PY_TAG=$("$PY" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')

# ---------------------------------------------------------------- numpy and mmengine
step "installing numpy<2 and $(pin mmengine)"
"${PIP[@]}" install -q -c "$CONSTRAINTS" "$(pin numpy)" "$(pin mmengine)"

# ---------------------------------------------------------------- mmcv with compiled ops
MMCV_PIN=$(pin mmcv)
MMCV_VER=${MMCV_PIN#*==}
WHEELS="$CACHE/wheels/torch$TORCH_VER-$PY_TAG"
mmcv_ok() { "$PY" -c "import mmcv, mmcv.ops; assert mmcv.__version__ == '$MMCV_VER'" >/dev/null 2>&1; }

if ! mmcv_ok; then
    mkdir -p "$WHEELS" || fail "cannot create the cache folder $WHEELS." "set DYNCONV_MM_CACHE to a writable folder."
    CACHED=$(ls "$WHEELS"/mmcv-"$MMCV_VER"-*.whl 2>/dev/null | head -n1 || true)
    if [ -n "$CACHED" ]; then
        step "installing the cached mmcv wheel $CACHED"
        "${PIP[@]}" install -q --no-deps --force-reinstall "$CACHED"
    else
        step "looking for a ready mmcv $MMCV_VER wheel for torch $TORCH_VER"
        if "${PIP[@]}" install -q -c "$CONSTRAINTS" --no-deps --only-binary=mmcv "$MMCV_PIN" >/dev/null 2>&1 && mmcv_ok; then
            echo "a ready wheel matched"
        else
            "${PIP[@]}" uninstall -q -y mmcv >/dev/null 2>&1 || true
            step "building mmcv $MMCV_VER with compiled ops from source (once; about 10-20 minutes on 2 cores)"
            BUILD=$(mktemp -d "${TMPDIR:-/tmp}/dynconv_mm_mmcv.XXXXXX")
            "${PIP[@]}" download -q --no-deps --no-binary=:all: --no-build-isolation -d "$BUILD" "$MMCV_PIN" || fail \
                "could not download the mmcv $MMCV_VER source." "check that pip can reach PyPI."
            tar -xzf "$BUILD"/mmcv-"$MMCV_VER".tar.gz -C "$BUILD"
            SRC="$BUILD/mmcv-$MMCV_VER"
            # torch >= 2.10 headers require C++20; mmcv 2.1.0 hard-codes -std=c++17.
            sed -i 's/-std=c++17/-std=c++20/g' "$SRC/setup.py"
            (cd "$SRC" && MMCV_WITH_OPS=1 MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
                "${PIP[@]}" wheel -q --no-build-isolation --no-deps -w "$WHEELS" .) || fail \
                "the mmcv source build failed." \
                "read the compiler output above; a C++20 compiler (gcc >= 10) and the Python headers are needed."
            rm -rf "$BUILD"
            CACHED=$(ls "$WHEELS"/mmcv-"$MMCV_VER"-*.whl | head -n1)
            "${PIP[@]}" install -q --no-deps --force-reinstall "$CACHED"
        fi
    fi
    # mmcv's own requirements (addict, yapf, opencv, ...), held by the constraints.
    "${PIP[@]}" install -q -c "$CONSTRAINTS" addict packaging Pillow pyyaml yapf "opencv-python<4.12"
    mmcv_ok || fail "mmcv $MMCV_VER is installed but mmcv.ops does not import." \
        "delete $WHEELS and run this script again to rebuild it."
fi

# ---------------------------------------------------------------- OpenMMLab task libraries and tools
step "installing mmdet, mmsegmentation, mmpretrain and the development tools"
REST=()
for name in mmdet mmsegmentation ftfy regex mmpretrain timm pycocotools openmim onnx onnxruntime pytest ruff matplotlib; do
    REST+=("$(pin "$name")")
done
"${PIP[@]}" install -q -c "$CONSTRAINTS" "${REST[@]}"

# ---------------------------------------------------------------- the project
step "installing dynconv_mm (editable)"
"${PIP[@]}" install -q -c "$CONSTRAINTS" --no-deps --no-build-isolation -e "$ROOT"
link_for_mim

step "checking the environment"
"$PY" - <<'EOF'
import numpy, torch, mmcv, mmcv.ops, mmengine, mmdet, mmseg, mmpretrain, dynconv_mm
assert numpy.__version__.startswith('1.'), f'numpy {numpy.__version__} (needs <2)'
import pkg_resources  # noqa: F401  (mmengine needs it for mmdet::/mmpretrain:: base configs)
print(f'torch {torch.__version__}, numpy {numpy.__version__}, mmengine {mmengine.__version__}, '
      f'mmcv {mmcv.__version__}, mmdet {mmdet.__version__}, mmseg {mmseg.__version__}, '
      f'mmpretrain {mmpretrain.__version__}, dynconv_mm {dynconv_mm.__version__}')
from dynconv_mm.layers.native import native_status  # compiles them now (seconds) rather than on first use
print(f'native CPU kernels: {native_status()}')
EOF
env_hash > "$STAMP"
echo "done: activate it with  source $VENV/bin/activate"
