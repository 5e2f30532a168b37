"""mmcv build helper of tools/setup_env.sh (runs in the target venv; imports only torch, and mmcv for check).

    python tools/mmcv_build.py key --ops 1             # the wheel-cache folder name for this torch and machine
    python tools/mmcv_build.py find-cached --cache ~/.cache/dynconv_mm/wheels --version 2.1.0 --ops 1
    python tools/mmcv_build.py check --version 2.1.0 --ops 1

``key`` names what an mmcv wheel built here would contain, so that a cached wheel is reused only where it
fits: the torch release and its build (``cu128``, ``rocm6.2`` or ``cpu``), the Python tag, and whether the
compiled ops are built at all and with CUDA. mmcv's setup.py compiles its CUDA kernels when
``torch.cuda.is_available()`` or ``FORCE_CUDA=1`` (ROCm torch: always), so a wheel built on a CPU machine
has CPU-only ops even with a CUDA torch, and must not be reused on a GPU machine.

``find-cached`` prints the cached wheel that fits (nothing if none), after checking what the wheel's compiled
library links (CUDA libraries or not). A wheel of the older cache layout, keyed by torch and Python only, is
taken over into its keyed folder when its content fits.

``check`` verifies the installed mmcv: its version, that ``mmcv.ops`` imports when ops are wanted, and, when
CUDA is available, that the ops were compiled with CUDA and run on CUDA tensors. It exits with 1 and says
what is wrong.
"""
import argparse
import glob
import os
import os.path as osp
import shutil
import sys
import zipfile
from typing import Optional

import torch


def torch_build_tag() -> str:
    """``cu121``, ``rocm6.2`` or ``cpu``: the accelerator build of the installed torch."""
    hip = getattr(torch.version, 'hip', None)
    if hip:
        return 'rocm' + '.'.join(hip.split('.')[:2])
    if torch.version.cuda:
        return 'cu' + torch.version.cuda.replace('.', '')
    return 'cpu'


def builds_cuda_ops() -> bool:
    """Whether an mmcv source build here compiles the CUDA kernels (mmcv 2.1's setup.py condition)."""
    if getattr(torch.version, 'hip', None):
        return True
    return bool(torch.version.cuda) and (torch.cuda.is_available() or os.environ.get('FORCE_CUDA', '0') == '1')


def _torch_and_python() -> str:
    return f'torch{torch.__version__.split("+")[0]}-cp{sys.version_info[0]}{sys.version_info[1]}'


def ops_kind(with_ops: bool) -> str:
    """``noops``, ``cpuops`` or ``cudaops``: what an mmcv source build here would compile."""
    return ('cudaops' if builds_cuda_ops() else 'cpuops') if with_ops else 'noops'


def cache_key(with_ops: bool) -> str:
    """Folder name of the mmcv wheel cache, e.g. ``torch2.14.1-cp311-cu128-cpuops``."""
    return f'{_torch_and_python()}-{torch_build_tag()}-{ops_kind(with_ops)}'


def wheel_ops_kind(path: str) -> str:
    """``noops``, ``cpuops`` or ``cudaops``: what an mmcv wheel holds, read from its compiled library (a CUDA
    build links CUDA's runtime and torch's CUDA libraries)."""
    with zipfile.ZipFile(path) as z:
        libs = [n for n in z.namelist() if n.startswith('mmcv/_ext') and n.endswith(('.so', '.pyd'))]
        if not libs:
            return 'noops'
        data = z.read(libs[0])
    return 'cudaops' if any(lib in data for lib in (b'libc10_cuda', b'libcudart', b'libamdhip64')) else 'cpuops'


def find_cached_wheel(cache: str, version: str, with_ops: bool) -> Optional[str]:
    """The cached mmcv ``version`` wheel that fits this torch and machine, or ``None``."""
    want = ops_kind(with_ops)
    folder = osp.join(cache, cache_key(with_ops))
    for path in sorted(glob.glob(osp.join(folder, f'mmcv*-{version}-*.whl'))):
        if wheel_ops_kind(path) == want:
            return path
    if not with_ops:
        return None
    # the older layout: <cache>/torch<version>-<python tag>, whatever the CUDA build
    legacy = osp.join(cache, _torch_and_python())
    for path in sorted(glob.glob(osp.join(legacy, f'mmcv-{version}-*.whl'))):
        if wheel_ops_kind(path) == want:
            os.makedirs(folder, exist_ok=True)
            dst = osp.join(folder, osp.basename(path))
            shutil.copyfile(path, dst + '.partial')
            os.replace(dst + '.partial', dst)  # a concurrent reader never sees half a wheel
            return dst
    return None


def nms_on_cuda(nms) -> list:
    """Indices that mmcv's ``nms`` keeps of three boxes on the GPU (the second overlaps the first)."""
    boxes = torch.tensor([[0., 0., 10., 10.], [1., 1., 10., 10.], [20., 20., 30., 30.]], device='cuda')
    scores = torch.tensor([0.9, 0.8, 0.7], device='cuda')
    _, keep = nms(boxes, scores, iou_threshold=0.5)
    return sorted(keep.tolist())


def check_mmcv(version: str, with_ops: bool) -> str:
    """Raise ``RuntimeError`` saying what is wrong with the installed mmcv; returns a one-line summary."""
    try:
        import mmcv
    except ImportError as e:
        raise RuntimeError(f'mmcv does not import: {e}') from e
    if mmcv.__version__ != version:
        raise RuntimeError(f'mmcv {mmcv.__version__} is installed, {version} is wanted')
    if not with_ops:
        return f'mmcv {mmcv.__version__} (without compiled ops)'
    try:
        from mmcv.ops import get_compiling_cuda_version, nms
    except ImportError as e:
        raise RuntimeError(f'mmcv {mmcv.__version__} has no compiled ops (mmcv.ops: {e})') from e
    compiled_cuda = get_compiling_cuda_version()
    if not torch.cuda.is_available():
        return f'mmcv {mmcv.__version__} with compiled ops (CUDA kernels: {compiled_cuda})'
    if compiled_cuda == 'not available':
        raise RuntimeError(f'CUDA is available, but the compiled ops of mmcv {mmcv.__version__} were built '
                           'without CUDA (on a machine without a GPU?): mmcv.ops would fail on CUDA tensors')
    try:
        keep = nms_on_cuda(nms)
    except Exception as e:  # any failure of the kernel is the message
        raise RuntimeError(f'mmcv.ops.nms fails on CUDA tensors: {type(e).__name__}: {e}') from e
    if keep != [0, 2]:
        raise RuntimeError(f'mmcv.ops.nms on CUDA kept boxes {keep}, expected [0, 2]')
    return f'mmcv {mmcv.__version__} with CUDA ops (compiled with CUDA {compiled_cuda})'


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    sub = parser.add_subparsers(dest='command', required=True)
    key = sub.add_parser('key', help='print the wheel-cache folder name')
    check = sub.add_parser('check', help='check the installed mmcv')
    find = sub.add_parser('find-cached', help='print the cached wheel that fits, if any')
    find.add_argument('--cache', required=True, help='the wheel cache folder')
    for p in (check, find):
        p.add_argument('--version', required=True, help='the mmcv version')
    for p in (key, check, find):
        p.add_argument('--ops', choices=('0', '1'), default='1', help='with compiled ops (1) or without (0)')
    args = parser.parse_args(argv)
    if args.command == 'key':
        print(cache_key(args.ops == '1'))
        return 0
    if args.command == 'find-cached':
        print(find_cached_wheel(args.cache, args.version, args.ops == '1') or '')
        return 0
    try:
        print(check_mmcv(args.version, args.ops == '1'))
    except RuntimeError as e:
        print(f'mmcv check failed: {e}', file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
