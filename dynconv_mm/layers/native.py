"""Native CPU kernels, compiled on first use.

dynconv_mm ships C sources for the few CPU operations that PyTorch's own kernels run far below the
machine's limits (``csrc/``). They are compiled with the system's C compiler the first time they are
needed, cached per source, compiler and CPU, and called through :mod:`ctypes`; no PyTorch headers and
no build step at install time. Without a compiler (or on Windows) every operation keeps its PyTorch
path, with the same numbers up to float32 rounding; one warning says why.

Environment:

* ``DYNCONV_MM_NATIVE=0`` turns the native kernels off (PyTorch paths only);
* ``DYNCONV_MM_CACHE`` is the cache directory (default ``~/.cache/dynconv_mm``; the libraries go to
  its ``native`` folder);
* ``CC`` picks the compiler (default: ``cc``, ``gcc`` or ``clang``, the first found).

Kernels:

* :func:`kw_assemble_into` and :func:`kw_assemble_backward`, the KernelWarehouse assembly product and
  its gradients (their speed-ups are measured in ``docs/benchmark.md``);
* :func:`dynamic_dw_forward`, the inference forward of the dynamic depth-wise convolution in one call
  (generator and per-sample convolution);
* :func:`odconv_kernels`, ODConv's attentions and per-sample kernels at inference, with the channel
  attentions folded into the kernels.

:func:`native_inference_allowed` and :func:`eval_batch_norm` are the layers' shared conditions for
the inference kernels.
"""
import ctypes
import functools
import hashlib
import os
import os.path as osp
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch import nn

from . import torch_internals
from .norm import SafeBatchNorm2d

__all__ = ['native_library', 'native_status', 'kw_assemble_into', 'kw_assemble_backward',
           'native_inference_allowed', 'eval_batch_norm', 'dynamic_dw_forward', 'odconv_kernels',
           'KW_ASSEMBLY_MAX_COLUMNS']

_CSRC = osp.join(osp.dirname(osp.abspath(__file__)), 'csrc')
#: compiled together into one library; the header is part of the cache key
_SOURCES = ('library.c', 'kw_assembly.c', 'dynamic_dw.c', 'odconv.c')
_HEADERS = ('common.h',)
_LIBRARY = 'dynconv_mm_native'
_ABI_VERSION = 2
#: attention columns (batch x cells of a layer) the native assembly takes; wider products are
#: compute-bound and MKL runs them as fast
KW_ASSEMBLY_MAX_COLUMNS = 128
#: flag sets tried in order: the first that compiles is used
_FLAG_SETS: Tuple[Tuple[str, ...], ...] = (
    ('-O3', '-march=native', '-fopenmp'),
    ('-O3', '-fopenmp'),
    ('-O3', '-march=native'),
    ('-O3',),
)

_lock = threading.Lock()
_state: dict = {}


def _enabled() -> bool:
    return os.environ.get('DYNCONV_MM_NATIVE', '1').strip().lower() not in ('0', 'false', 'off', 'no')


def _cache_dir() -> str:
    root = os.environ.get('DYNCONV_MM_CACHE') or osp.join(
        os.environ.get('XDG_CACHE_HOME') or osp.join(osp.expanduser('~'), '.cache'), 'dynconv_mm')
    return osp.join(root, 'native')


def _compiler() -> Optional[str]:
    cc = os.environ.get('CC')
    if cc:
        return shutil.which(cc) or (cc if osp.isfile(cc) else None)
    for name in ('cc', 'gcc', 'clang'):
        path = shutil.which(name)
        if path:
            return path
    return None


def _cpu_id() -> str:
    """What ``-march=native`` depends on: the machine and, on Linux, the CPU's model and flags."""
    parts = [platform.machine(), platform.system()]
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                key = line.split(':', 1)[0].strip()
                if key in ('model name', 'flags', 'Features', 'CPU part'):
                    parts.append(line.strip())
                if line.strip() == '':
                    break  # the first processor is enough
    except OSError:
        pass
    return '\n'.join(parts)


def _compile(cc: str, csrc: str, out_dir: str) -> Tuple[Optional[str], str]:
    """Build the shared library from ``csrc`` (or find it in the cache); returns ``(path or None, message)``."""
    code = []
    for name in _HEADERS + _SOURCES:
        with open(osp.join(csrc, name), 'rb') as f:
            code.append(name.encode() + b'\0' + f.read())
    sources = [osp.join(csrc, name) for name in _SOURCES]
    errors: List[str] = []
    for flags in _FLAG_SETS:
        key = hashlib.sha256(b'\0'.join([*code, cc.encode(), ' '.join(flags).encode(), _cpu_id().encode()]))
        path = osp.join(out_dir, f'{_LIBRARY}-{key.hexdigest()[:16]}.so')
        if osp.isfile(path):
            return path, f'cached {path}'
        os.makedirs(out_dir, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix='.so', dir=out_dir)
        os.close(fd)
        cmd = [cc, *flags, '-std=gnu11', '-shared', '-fPIC', *sources, '-o', tmp, '-lm']
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.SubprocessError) as e:
            proc = None
            errors.append(f'{" ".join(cmd)}: {e}')
        if proc is not None and proc.returncode == 0:
            os.replace(tmp, path)  # atomic: concurrent processes build the same file
            return path, f'built {path} ({" ".join(flags)})'
        if osp.exists(tmp):
            os.remove(tmp)
        if proc is not None:
            last = (proc.stderr or proc.stdout or '').strip().splitlines()[-1:] or ['no output']
            errors.append(f'{" ".join(flags)}: {last[0]}')
    return None, 'compilation failed: ' + '; '.join(errors)


def _load() -> Tuple[Optional[ctypes.CDLL], str]:
    if platform.system() == 'Windows':
        return None, 'native kernels are not built on Windows'
    cc = _compiler()
    if cc is None:
        return None, 'no C compiler found (set CC, or install gcc or clang)'
    try:
        path, message = _compile(cc, _CSRC, _cache_dir())
    except OSError as e:
        return None, f'cannot write the kernel cache {_cache_dir()!r} ({e}); set DYNCONV_MM_CACHE'
    if path is None:
        return None, message
    try:
        lib = ctypes.CDLL(path)
        if lib.dcmm_abi_version() != _ABI_VERSION:
            return None, f'{path} is of another version'
    except (OSError, AttributeError) as e:
        return None, f'cannot load {path}: {e}'
    p, i64, i32, f64 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_double
    signatures = dict(dcmm_kw_assemble_f32=[p, i64, i64, p, i64, i32, p, p, i64, i64, i64, i64, i32],
                      dcmm_kw_assemble_backward_f32=[p, i64, i64, p, i64, i32, i32, p, p, i64, i64, i64, i64, p, i32,
                                                     p, i32],
                      dcmm_ddw_forward_f32=[p, i64, i64, i64, i64, p, i64, p, p, p, p, f64, p, p, p, i32, i32, i32, i32,
                                            i32, i32, p, i32],
                      dcmm_odconv_kernels_f32=[p, i64, i64, i64, p, i64, p, p, p, p, f64, p, p, p, p, p, p, p, p, f64,
                                               p, i64, i64, i64, i64, p, i32],
                      dcmm_has_openmp=[])
    for name, argtypes in signatures.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = ctypes.c_int, argtypes
    return lib, message


def native_library() -> Optional[ctypes.CDLL]:
    """The compiled library, or ``None`` where it is off or cannot be built (warned once per process)."""
    if not _enabled():
        return None
    with _lock:
        if 'lib' not in _state:
            lib, message = _load()
            _state['lib'], _state['message'] = lib, message
            if lib is None:
                warnings.warn(f'dynconv_mm: native CPU kernels unavailable ({message}); using the PyTorch '
                              'paths (same results, slower KW assembly, dynamic depth-wise and ODConv inference). '
                              'Set DYNCONV_MM_NATIVE=0 to silence.',
                              RuntimeWarning, stacklevel=3)
    return _state['lib']


def native_status() -> str:
    """One line: whether the native kernels are in use, and where from (or why not)."""
    if not _enabled():
        return 'off (DYNCONV_MM_NATIVE=0)'
    lib = native_library()
    return ('available: ' if lib is not None else 'unavailable: ') + _state['message']


@functools.lru_cache(maxsize=512)
def _column_offsets(batch: int, groups: Tuple[int, int, int], strides: Tuple[int, ...]) -> torch.Tensor:
    """Offset of column ``(b, g_s, g_o, g_i)`` (the attention's row order) in the kernel layout
    ``(B, G_o, c_o, G_i, c_i, G_s, *ck)`` with ``strides``."""
    g_s, g_o, g_i = groups
    b = torch.arange(batch).view(-1, 1, 1, 1) * strides[0]
    s = torch.arange(g_s).view(1, -1, 1, 1) * strides[5]
    o = torch.arange(g_o).view(1, 1, -1, 1) * strides[1]
    i = torch.arange(g_i).view(1, 1, 1, -1) * strides[3]
    return (b + s + o + i).reshape(-1).to(torch.int64).contiguous()


def _layout(kernel: torch.Tensor, wt: torch.Tensor, attention: torch.Tensor,
            groups: Sequence[int]) -> Optional[Tuple[int, int, torch.Tensor]]:
    """``(c_i * k, k, column offsets)`` where the native assembly covers these tensors, else ``None``."""
    B, M, n = attention.shape
    if (kernel.dtype != torch.float32 or wt.dtype != torch.float32 or attention.dtype != torch.float32
            or kernel.device.type != 'cpu' or wt.device.type != 'cpu' or attention.device.type != 'cpu'
            or not kernel.is_contiguous() or not wt.is_contiguous() or kernel.dim() < 7):
        return None
    c_o, c_i = kernel.shape[2], kernel.shape[4]
    k = 1
    for s in kernel.shape[6:]:
        k *= s
    g_s, g_o, g_i = groups
    if (wt.shape[0] != c_o * c_i * k or wt.shape[1] != n or M != g_s * g_o * g_i
            or tuple(kernel.shape[:6]) != (B, g_o, c_o, g_i, c_i, g_s)):
        return None
    return c_i * k, k, _column_offsets(B, (g_s, g_o, g_i), tuple(kernel.stride()))


def kw_assemble_into(kernel: torch.Tensor, wt: torch.Tensor, attention: torch.Tensor,
                     groups: Sequence[int]) -> bool:
    """Write ``kernel (B, G_o, c_o, G_i, c_i, G_s, *ck) = permute(attention @ cells)`` natively.

    ``wt``: the cell-major warehouse ``(c_o * c_i * prod(ck), n)``; ``attention``: ``(B, M, n)`` with
    ``M = G_s * G_o * G_i`` in that order; ``groups = (G_s, G_o, G_i)``. Returns ``False`` (and writes
    nothing) where the native kernel does not apply: not built, not float32 CPU tensors in the expected
    layouts, or more than :data:`KW_ASSEMBLY_MAX_COLUMNS` columns.
    """
    B, M, n = attention.shape
    cols = B * M
    if cols > KW_ASSEMBLY_MAX_COLUMNS:
        return False
    layout = _layout(kernel, wt, attention, groups)
    lib = None if layout is None else native_library()
    if lib is None:
        return False
    per_p, k, offsets = layout
    width = 0 if cols <= 8 else (cols + 15) // 16
    a = attention.new_zeros(n, 8 if width == 0 else 16 * width)
    a[:, :cols] = attention.detach().reshape(cols, n).t()
    strides = kernel.stride()
    rc = lib.dcmm_kw_assemble_f32(wt.data_ptr(), wt.shape[0], n, a.data_ptr(), cols, width, kernel.data_ptr(),
                                  offsets.data_ptr(), per_p, k, strides[2], strides[4], torch.get_num_threads())
    if rc != 0:
        raise RuntimeError(f'native KW assembly rejected its arguments (kernel {tuple(kernel.shape)}, '
                           f'warehouse {tuple(wt.shape)}, attention {tuple(attention.shape)})')
    return True


def kw_assemble_backward(grad: torch.Tensor, wt: torch.Tensor, attention: torch.Tensor, groups: Sequence[int],
                         grad_w: Optional[torch.Tensor], accumulate: bool,
                         need_attention: bool) -> Tuple[bool, Optional[torch.Tensor]]:
    """Both gradients of :func:`kw_assemble_into` in one sweep over the warehouse rows.

    ``grad``: the kernel gradient in the kernel layout, read in place. Writes (``accumulate=False``) or
    adds (``True``) the warehouse gradient ``grad^T-view @ attention`` into ``grad_w (rows, n)`` when it
    is given, and returns ``(True, attention gradient (B, M, n) or None)``; ``(False, None)`` (nothing
    written) where the native kernel does not apply (see :func:`kw_assemble_into`; up to 256 cells).
    """
    B, M, n = attention.shape
    cols = B * M
    if n > 256 or cols > KW_ASSEMBLY_MAX_COLUMNS or (grad_w is None and not need_attention):
        return False, None
    if grad_w is not None and (grad_w.dtype != torch.float32 or not grad_w.is_contiguous()
                               or tuple(grad_w.shape) != tuple(wt.shape)):
        return False, None
    layout = _layout(grad, wt, attention, groups)
    lib = None if layout is None else native_library()
    if lib is None:
        return False, None
    per_p, k, offsets = layout
    nvec = (n + 15) // 16
    # register blocks of up to 3 vectors (nvec rounded up to a multiple of 3)
    block = min(nvec, 3)
    nvec = -(-nvec // block) * block
    a = attention.new_zeros(cols, 16 * nvec)
    a[:, :n] = attention.detach().reshape(cols, n)
    threads = torch.get_num_threads() if lib.dcmm_has_openmp() else 1
    partial = attention.new_zeros(threads, cols, 16 * nvec) if need_attention else None
    strides = grad.stride()
    rc = lib.dcmm_kw_assemble_backward_f32(
        wt.data_ptr(), wt.shape[0], n, a.data_ptr(), cols, nvec, block, grad.data_ptr(), offsets.data_ptr(), per_p, k,
        strides[2], strides[4], 0 if grad_w is None else grad_w.data_ptr(), int(accumulate),
        0 if partial is None else partial.data_ptr(), threads)
    if rc != 0:
        raise RuntimeError(f'native KW assembly backward rejected its arguments (gradient {tuple(grad.shape)}, '
                           f'warehouse {tuple(wt.shape)}, attention {tuple(attention.shape)})')
    if partial is None:
        return True, None
    return True, partial.sum(0)[:, :n].reshape(B, M, n)


def native_inference_allowed(x: torch.Tensor, modules: Sequence[nn.Module]) -> bool:
    """Whether a layer may compute its forward (or part of it) in a native inference call instead of
    its PyTorch modules: no autograd, a float32 CPU tensor ``x`` (not a subclass), eager PyTorch
    (not tracing, exporting or compiling) without autocast, and no forward hooks, global or on
    ``modules`` (the modules the native call stands in for: their hooks would not run; where global
    hooks cannot be told, :func:`~dynconv_mm.layers.torch_internals.has_global_module_hooks`, the
    modules' path runs)."""
    if torch.is_grad_enabled() or type(x) is not torch.Tensor or not x.is_cpu or x.dtype is not torch.float32:
        return False
    for m in modules:  # a plain loop: this runs on every call of layers that take ~0.1-1 ms
        if m._forward_hooks or m._forward_pre_hooks:
            return False
    if torch_internals.has_global_module_hooks():
        return False
    return not torch_internals.autocast_enabled('cpu') and torch_internals.plain_eager()


#: norms whose eval-mode maths the native kernels reproduce (exact types: a subclass may change them)
_EVAL_NORMS = (SafeBatchNorm2d, nn.BatchNorm2d, nn.SyncBatchNorm)


def eval_batch_norm(norm: nn.Module) -> Optional[Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor],
                                                        Optional[torch.Tensor], float]]:
    """``(running_mean, running_var, weight, bias, eps)`` of a batch norm that normalises with its
    running statistics (eval mode), else ``None`` (training mode, no running statistics, another norm)."""
    if type(norm) not in _EVAL_NORMS or norm.training:
        return None
    buffers, params = norm._buffers, norm._parameters
    mean = buffers.get('running_mean')
    if mean is None:
        return None
    return mean, buffers['running_var'], params.get('weight'), params.get('bias'), norm.eps


def _cpu_f32(*tensors: Optional[torch.Tensor]) -> bool:
    for t in tensors:  # a plain loop: this runs on every call of a ~0.1 ms layer
        if t is not None and not (t.is_cpu and t.dtype is torch.float32 and t.is_contiguous()):
            return False
    return True


def _ptr(t: Optional[torch.Tensor]) -> int:
    return 0 if t is None else t.data_ptr()


def _inference_result(rc: int, out: torch.Tensor, what: Callable[[], str]) -> Optional[torch.Tensor]:
    """``out`` after a native inference call returned ``rc``: ``None`` when it had no scratch memory
    (-2: the caller takes its PyTorch path), an error naming ``what()`` for rejected arguments."""
    if rc == 0:
        return out
    if rc == -2:
        return None
    raise RuntimeError(f'{what()} rejected its arguments')


def dynamic_dw_forward(x: torch.Tensor, w1: torch.Tensor, bn_mean: torch.Tensor, bn_var: torch.Tensor,
                       bn_weight: Optional[torch.Tensor], bn_bias: Optional[torch.Tensor], bn_eps: float,
                       w2: torch.Tensor, b2: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                       kernel_size: Tuple[int, int], padding: Tuple[int, int],
                       dilation: Tuple[int, int]) -> Optional[torch.Tensor]:
    """Inference forward of a dynamic depth-wise convolution (stride 1) in one native call.

    Computes ``conv_dw(x[b], k[b]) + bias`` with ``k = w2 @ ReLU(BN_eval(w1 @ mean_hw(x))) + b2``:
    ``x (B, C, H, W)``, ``w1 (R, C[, 1, 1])``, batch-norm running statistics and affine parameters of
    ``R`` entries, ``w2 (C * kh * kw, R[, 1, 1])``, ``b2 (C * kh * kw,)``, ``bias (C,)``. No autograd:
    the result does not require grad. Returns ``None`` (nothing computed) where the native kernel does
    not apply: not built, tensors that are not contiguous float32 CPU tensors or whose sizes do not fit
    one another, an empty output, or more than 1024 taps.
    """
    if x.dim() != 4 or not _cpu_f32(x, w1, bn_mean, bn_var, bn_weight, bn_bias, w2, b2, bias):
        return None
    B, C, H, W = x.shape
    R = w1.shape[0]
    kh, kw = kernel_size
    ph, pw = padding
    dh, dw = dilation
    taps = kh * kw
    if (w1.numel() != R * C or w2.numel() != C * taps * R or w2.shape[0] != C * taps or bn_mean.numel() != R
            or bn_var.numel() != R or (bn_weight is not None and bn_weight.numel() != R)
            or (bn_bias is not None and bn_bias.numel() != R) or (b2 is not None and b2.numel() != C * taps)
            or (bias is not None and bias.numel() != C)):
        return None
    ho, wo = H + 2 * ph - dh * (kh - 1), W + 2 * pw - dw * (kw - 1)
    if min(B, C, H, W, R, ho, wo) < 1 or taps > 1024:
        return None
    lib = native_library()
    if lib is None:
        return None
    out = x.new_empty(B, C, ho, wo)
    rc = lib.dcmm_ddw_forward_f32(x.data_ptr(), B, C, H, W, w1.data_ptr(), R, bn_mean.data_ptr(), bn_var.data_ptr(),
                                  _ptr(bn_weight), _ptr(bn_bias), float(bn_eps), w2.data_ptr(), _ptr(b2), _ptr(bias),
                                  kh, kw, ph, pw, dh, dw, out.data_ptr(), torch.get_num_threads())
    return _inference_result(rc, out, lambda: f'native dynamic depth-wise conv (input {tuple(x.shape)}, kernel '
                                              f'{kernel_size}, padding {padding}, dilation {dilation})')


def odconv_kernels(x: torch.Tensor, fc: torch.Tensor, bn: Tuple, channel_fc: Tuple, filter_fc: Tuple,
                   spatial_fc: Tuple, kernel_fc: Tuple, temperature: float, weight: torch.Tensor,
                   groups: int) -> Optional[torch.Tensor]:
    """ODConv's four attentions and per-sample kernels, with the input- and output-channel attentions
    folded into the kernels, in one native call (inference; no autograd).

    ``x (B, C_in, H, W)``; ``fc (R, C_in[, 1, 1])``; ``bn``: :func:`eval_batch_norm`'s tuple; each head
    a ``(weight (m, R[, 1, 1]), bias (m,) or None)`` pair, ``(None, None)`` for an absent filter,
    spatial or kernel head; ``weight (n, C_out, C_in / groups, kh, kw)``. Returns the kernels
    ``(B, C_out, C_in / groups, kh, kw)`` with ``conv(x[b], w[b]) = a_f[b] * conv(a_c[b] * x[b],
    sum_n a_k[b, n] * a_s[b] * weight[n])``, or ``None`` where the native kernel does not apply (not
    built, tensors that are not contiguous float32 CPU tensors or whose sizes do not fit one another).
    """
    n, c_out = weight.shape[:2]
    if x.dim() != 4 or weight.dim() != 5 or not _cpu_f32(x, fc, weight, *bn[:4], *channel_fc, *filter_fc,
                                                          *spatial_fc, *kernel_fc):
        return None
    B, c_in = x.shape[:2]
    R = fc.shape[0]
    taps = weight.shape[3] * weight.shape[4]
    sizes = ((channel_fc, c_in), (filter_fc, c_out), (spatial_fc, taps), (kernel_fc, n))
    if (groups < 1 or c_in % groups or c_out % groups or weight.shape[2] != c_in // groups or fc.numel() != R * c_in
            or any(t is not None and t.numel() != R for t in bn[:4]) or channel_fc[0] is None
            or (n > 1 and kernel_fc[0] is None) or min(B, c_in, x.shape[2] * x.shape[3], R) < 1):
        return None
    for (w, b), m in sizes:
        if (w is not None and w.numel() != m * R) or (b is not None and b.numel() != m):
            return None
    lib = native_library()
    if lib is None:
        return None
    out = weight.new_empty(B, *weight.shape[1:])
    rc = lib.dcmm_odconv_kernels_f32(
        x.data_ptr(), B, c_in, x.shape[2] * x.shape[3], fc.data_ptr(), R, bn[0].data_ptr(), bn[1].data_ptr(),
        _ptr(bn[2]), _ptr(bn[3]), float(bn[4]), _ptr(channel_fc[0]), _ptr(channel_fc[1]), _ptr(filter_fc[0]),
        _ptr(filter_fc[1]), _ptr(spatial_fc[0]), _ptr(spatial_fc[1]), _ptr(kernel_fc[0]), _ptr(kernel_fc[1]),
        float(temperature), weight.data_ptr(), n, c_out, groups, taps, out.data_ptr(), torch.get_num_threads())
    return _inference_result(rc, out, lambda: f'native ODConv kernels (input {tuple(x.shape)}, kernels '
                                              f'{tuple(weight.shape)}, groups {groups}, temperature {temperature})')
