"""The one primitive every dynamic layer uses: apply per-sample kernels to a batch.

A dynamic convolution computes, for each sample ``b`` of a batch, an ordinary convolution of
``x[b]`` with its own kernel ``weight[b]``. :func:`batched_conv` is the only place in dynconv_mm
that knows how to run that; layers assemble kernels and call it.

Implementations (``impl``):

* ``'grouped'``: the official implementations' trick. The batch is folded into the channel axis,
  ``x -> (1, B*C_in, *S)``, ``weight -> (B*C_out, C_in/g, *k)``, and one convolution runs with
  ``groups = B*g``. One kernel launch (good on GPUs), but ``groups`` depends on the batch size,
  which bakes the batch into exported graphs, and grouped convolutions are slow on many CPUs.
* ``'loop'``: one ordinary convolution per sample (no batch-dependent groups; slower than
  ``'grouped'`` on the CPUs measured so far).
* ``'unfold'`` (1-D and 2-D): im2col followed by one batched matrix product. No batch-dependent
  attribute anywhere, so ONNX exports keep a dynamic batch axis.
* ``'matmul'`` (point-wise kernels only: every kernel dim 1, no padding): one batched matrix
  product ``(B, g, C_out/g, C_in/g) @ (B, g, C_in/g, S)`` on the (strided) input; no im2col, no
  batch-dependent groups, and its backward is two batched matrix products.
* ``'auto'`` (default): a batch of one is a plain convolution; while exporting (ONNX, torch.export)
  ``'unfold'`` for 1-D/2-D; otherwise ``'matmul'`` for point-wise kernels, ``'unfold'`` on the CPU
  for ungrouped 1-D/2-D kernels of 1M+ entries per sample with at most 256 output positions, and
  ``'grouped'`` for the rest. (Measured on a 2-core CPU with torch 2.14, batch 8: the grouped form
  beat the per-sample loop by 2-10x for 3x3, depth-wise and 1x1 kernels; for 1x1 kernels the batched
  matrix product beat the grouped form 2-9x forward and 1.2-6x forward+backward; for 512-channel
  3x3 kernels on 4x4 to 14x14 outputs im2col + batched products beat the grouped form 1.2-2.6x
  forward+backward and 1.2-3.8x forward, while for 64-256 channels the grouped form was as fast or
  faster. ``tools/benchmark/benchmark.py`` re-measures the choices on a machine.)

All implementations compute the same thing; tests check them against each other and against a
per-sample ``F.conv2d`` reference.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

IntOrTuple = Union[int, Sequence[int]]
#: ``(shape, like) -> tensor``: memory for a weight gradient (see ``batched_conv``'s ``weight_grad_buffer``)
GradBuffer = Callable[[Tuple[int, ...], torch.Tensor], torch.Tensor]

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
IMPLS = ('auto', 'grouped', 'loop', 'unfold', 'matmul')


def _ntuple(v: IntOrTuple, n: int) -> Tuple[int, ...]:
    if isinstance(v, int):
        return (v,) * n
    v = tuple(int(i) for i in v)
    if len(v) == 1:
        return v * n
    if len(v) != n:
        raise ValueError(f'expected an int or {n} values, got {v}')
    return v


def _exporting() -> bool:
    if torch.onnx.is_in_onnx_export():
        return True
    try:
        return bool(torch.compiler.is_exporting())
    except AttributeError:  # older torch
        return False


def _plain_eager() -> bool:
    """Not tracing, exporting or compiling: eager-only mechanisms (custom autograd nodes that reuse
    memory) may be used; traced, exported and compiled graphs see plain tensor operations."""
    return not (torch.jit.is_tracing() or _exporting() or torch.compiler.is_compiling())


def _pointwise(kernel_size: Optional[Sequence[int]], padding: Optional[Sequence[int]]) -> bool:
    return (kernel_size is not None and all(int(k) == 1 for k in kernel_size)
            and (padding is None or all(p == 0 for p in padding)))


#: ``'auto'`` runs an ungrouped 1-D/2-D kernel of at least this many entries per sample through
#: ``'unfold'`` when its output has at most :data:`UNFOLD_MAX_OUTPUT` positions per sample
UNFOLD_MIN_KERNEL = 1 << 20
UNFOLD_MAX_OUTPUT = 256


def _large_kernel_small_output(weight_shape: Optional[Sequence[int]], out_positions: Optional[int],
                               groups: int) -> bool:
    """Kernels of 1M+ entries per sample on outputs of <= 256 positions (the last stages of a
    ResNet-50 at 128-224 px): there the grouped convolution's backward is 2-2.6x slower than im2col
    + batched products on the CPU measured (``docs/benchmark.md``), its forward 2-3.7x."""
    if weight_shape is None or out_positions is None or groups != 1:
        return False
    numel = 1
    for v in weight_shape:  # a plain loop: torch.compile (fullgraph) does not trace generator expressions
        numel *= int(v)
    return numel >= UNFOLD_MIN_KERNEL and out_positions <= UNFOLD_MAX_OUTPUT


def resolve_impl(impl: str, x: torch.Tensor, batch: int, ndim: int,
                 kernel_size: Optional[Sequence[int]] = None, padding: Optional[Sequence[int]] = None,
                 weight_shape: Optional[Sequence[int]] = None, out_positions: Optional[int] = None,
                 groups: int = 1) -> str:
    """The implementation ``'auto'`` stands for, for this input.

    ``kernel_size`` / ``padding``, when given, let point-wise kernels take the ``'matmul'`` path;
    ``weight_shape`` (one sample's kernel ``(C_out, C_in / groups, *k)``), ``out_positions`` (output
    positions per sample) and ``groups``, when given, let large kernels on small CPU outputs take the
    ``'unfold'`` path."""
    if impl not in IMPLS:
        raise ValueError(f'unknown batched_conv impl {impl!r}; expected one of {IMPLS}')
    if impl != 'auto':
        return impl
    if _exporting():
        return 'unfold' if ndim in (1, 2) else 'grouped'
    if batch == 1 and not torch.jit.is_tracing():
        return 'single'
    if _pointwise(kernel_size, padding):
        return 'matmul'
    if ndim in (1, 2) and x.device.type == 'cpu' and _large_kernel_small_output(weight_shape, out_positions, groups):
        return 'unfold'
    return 'grouped'


def _out_positions(size: Sequence[int], kernel: Sequence[int], stride: Sequence[int], padding: Sequence[int],
                   dilation: Sequence[int]) -> int:
    n = 1
    for s, k, st, p, d in zip(size, kernel, stride, padding, dilation):
        n *= (int(s) + 2 * p - d * (int(k) - 1) - 1) // st + 1
    return n


def batched_conv(x: torch.Tensor,
                 weight: torch.Tensor,
                 bias: Optional[torch.Tensor] = None,
                 stride: IntOrTuple = 1,
                 padding: IntOrTuple = 0,
                 dilation: IntOrTuple = 1,
                 groups: int = 1,
                 impl: str = 'auto',
                 weight_grad_buffer: Optional[GradBuffer] = None) -> torch.Tensor:
    """Convolve each sample with its own kernel.

    Args:
        x: input ``(B, C_in, *S)`` with ``len(S)`` in 1..3.
        weight: per-sample kernels ``(B, C_out, C_in // groups, *k)``.
        bias: ``None``, a shared bias ``(C_out,)`` or a per-sample bias ``(B, C_out)``.
        stride, padding, dilation: as in ``F.conv{1,2,3}d`` (numbers only; no string padding).
        groups: convolution groups within one sample.
        impl: ``'auto'``, ``'grouped'``, ``'loop'``, ``'unfold'`` or ``'matmul'`` (see the module docstring).
        weight_grad_buffer: for the ``'matmul'`` and ``'unfold'`` forms, ``(shape, like) -> tensor``
            giving the memory the weight gradient is written into in the backward pass (a caller that
            consumes the gradient at once can hand out the same memory every time); ``None``: a new
            tensor. Ignored by the other forms and by a differentiable backward (``create_graph``).

    Returns:
        ``(B, C_out, *S_out)``.
    """
    ndim = x.dim() - 2
    if ndim not in _CONV:
        raise ValueError(f'batched_conv takes (B, C, *S) inputs with 1 to 3 spatial dims, got {tuple(x.shape)}')
    if weight.dim() != ndim + 3:
        raise ValueError(f'weight must be (B, C_out, C_in/groups, *k) with {ndim} kernel dims for a '
                         f'{ndim}-D input, got {tuple(weight.shape)}')
    B, C_in = x.shape[:2]
    C_out = weight.shape[1]
    stride, padding, dilation = (_ntuple(v, ndim) for v in (stride, padding, dilation))
    if impl == 'auto':
        k = weight.shape[3:]
        impl = resolve_impl(impl, x, B, ndim, k, padding, weight.shape[1:],
                            _out_positions(x.shape[2:], k, stride, padding, dilation), groups)
    else:
        impl = resolve_impl(impl, x, B, ndim)
    per_sample_bias = bias is not None and bias.dim() == 2
    conv = _CONV[ndim]

    if impl == 'single':
        out = conv(x, weight[0], None if per_sample_bias else bias, stride, padding, dilation, groups)
        if per_sample_bias:
            out = out + bias.reshape(B, C_out, *([1] * ndim))
        return out

    if impl == 'loop':
        outs = [conv(x[b:b + 1], weight[b], None, stride, padding, dilation, groups) for b in range(B)]
        out = torch.cat(outs, 0)
    elif impl == 'matmul':
        if not _pointwise(weight.shape[3:], padding):
            raise ValueError("impl='matmul' needs point-wise kernels (all kernel dims 1) and zero padding, got "
                             f'kernel {tuple(weight.shape[3:])} and padding {padding}')
        out = _matmul_conv(x, weight, stride, groups, weight_grad_buffer)
    elif impl == 'grouped':
        k = weight.shape[3:]
        out = conv(x.reshape(1, B * C_in, *x.shape[2:]), weight.reshape(B * C_out, -1, *k), None,
                   stride, padding, dilation, groups * B)
        out = out.reshape(B, C_out, *out.shape[2:])
    else:  # unfold
        if ndim == 3:
            raise ValueError("impl='unfold' supports 1-D and 2-D convolutions only")
        out = _unfold_conv(x, weight, stride, padding, dilation, groups, weight_grad_buffer)

    if bias is not None:
        out = out + (bias.reshape(B, C_out, *([1] * ndim)) if per_sample_bias
                     else bias.reshape(1, C_out, *([1] * ndim)))
    return out


class _PerSampleProduct(torch.autograd.Function):
    """``w @ cols`` (batched) whose backward writes the gradient of ``w`` into ``grad_buffer``'s memory."""

    @staticmethod
    def forward(ctx, w: torch.Tensor, cols: torch.Tensor, grad_buffer: GradBuffer) -> torch.Tensor:
        ctx.save_for_backward(w, cols)
        ctx.grad_buffer = grad_buffer
        return torch.matmul(w, cols)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        w, cols = ctx.saved_tensors
        need_w, need_cols = ctx.needs_input_grad[:2]
        if torch.is_grad_enabled():  # differentiable backward (create_graph): plain products
            return (torch.matmul(grad, cols.transpose(-1, -2)) if need_w else None,
                    torch.matmul(w.transpose(-1, -2), grad) if need_cols else None, None)
        grad_w = grad_cols = None
        if need_w:
            grad_w = ctx.grad_buffer(tuple(w.shape), w)
            torch.matmul(grad, cols.transpose(-1, -2), out=grad_w)
        if need_cols:
            grad_cols = torch.matmul(w.transpose(-1, -2), grad)
        return grad_w, grad_cols, None


def _product(w: torch.Tensor, cols: torch.Tensor, grad_buffer: Optional[GradBuffer]) -> torch.Tensor:
    if grad_buffer is None or not (torch.is_grad_enabled() and w.requires_grad and _plain_eager()):
        return torch.matmul(w, cols)
    return _PerSampleProduct.apply(w, cols, grad_buffer)


def _matmul_conv(x, weight, stride, groups, grad_buffer=None):
    """Point-wise per-sample kernels as one batched matrix product (dilation is irrelevant for 1x1)."""
    if any(s != 1 for s in stride):
        x = x[(slice(None), slice(None)) + tuple(slice(None, None, s) for s in stride)]
    B, C_in = x.shape[:2]
    spatial = x.shape[2:]
    C_out = weight.shape[1]
    cols = x.reshape(B, groups, C_in // groups, -1)
    w = weight.reshape(B, groups, C_out // groups, C_in // groups)
    return _product(w, cols, grad_buffer).reshape(B, C_out, *spatial)


def _unfold_conv(x, weight, stride, padding, dilation, groups, grad_buffer=None):
    """im2col + one batched matmul; every shape is read from the tensors (export friendly)."""
    one_d = x.dim() == 3
    if one_d:
        x = x.unsqueeze(2)
        weight = weight.unsqueeze(3)
        stride, padding, dilation = (1,) + stride, (0,) + padding, (1,) + dilation
    B, C_in, H, W = x.shape
    # channel and kernel sizes are static; int() keeps them constants in traced/exported graphs
    C_out, cin_g, kh, kw = (int(v) for v in weight.shape[1:])
    cols = F.unfold(x, (kh, kw), dilation=dilation, padding=padding, stride=stride)  # (B, C_in*kh*kw, L)
    H_out = (H + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    W_out = (W + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    cols = cols.reshape(B, groups, cin_g * kh * kw, -1)
    w = weight.reshape(B, groups, C_out // groups, cin_g * kh * kw)
    out = _product(w, cols, grad_buffer)  # (B, g, C_out/g, L)
    out = out.reshape(B, C_out, H_out, W_out)
    return out.squeeze(2) if one_d else out


def reference_batched_conv(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """Obviously-correct reference: a Python loop of ordinary convolutions (for tests)."""
    ndim = x.dim() - 2
    conv = _CONV[ndim]
    outs = []
    for b in range(x.shape[0]):
        bb = None if bias is None else (bias[b] if bias.dim() == 2 else bias)
        outs.append(conv(x[b:b + 1], weight[b], bb, stride, padding, dilation, groups))
    return torch.cat(outs, 0)
