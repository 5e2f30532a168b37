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
* ``'unfold'``: im2col followed by one batched matrix product (3-D: the columns gathered with one
  index of every window position, for fixed spatial sizes). No batch-dependent
  attribute anywhere, so ONNX exports keep a dynamic batch axis.
* ``'matmul'`` (point-wise kernels only: every kernel dim 1, no padding): one batched matrix
  product ``(B, g, C_out/g, C_in/g) @ (B, g, C_in/g, S)`` on the (strided) input; no im2col, no
  batch-dependent groups, and its backward is two batched matrix products.
* ``'auto'`` (default): a batch of one is a plain convolution; while exporting (ONNX, torch.export)
  ``'unfold'``; otherwise ``'matmul'`` for point-wise kernels, ``'unfold'`` on the CPU
  for ungrouped 1-D/2-D kernels of 1M+ entries per sample with at most 256 output positions, and
  ``'grouped'`` for the rest. The choices follow CPU measurements (``docs/benchmark.md``, "Choices of
  batched_conv"); ``tools/benchmark/benchmark.py`` re-measures them on a machine.

All implementations compute the same thing; tests check them against each other and against a
per-sample ``F.conv2d`` reference.
"""
from __future__ import annotations

import warnings
from typing import Callable, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .base import IntOrTuple, to_tuple
from .torch_internals import is_exporting, plain_eager

#: ``(shape, like) -> tensor``: memory for a weight gradient (see ``batched_conv``'s ``weight_grad_buffer``)
GradBuffer = Callable[[Tuple[int, ...], torch.Tensor], torch.Tensor]

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
IMPLS = ('auto', 'grouped', 'loop', 'unfold', 'matmul')


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
    if is_exporting():
        return 'unfold'
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
    # three calls rather than an unpacked generator: torch 2.1's dynamo cannot trace the latter
    stride = to_tuple(stride, ndim, 'stride', 'batched_conv')
    padding = to_tuple(padding, ndim, 'padding', 'batched_conv')
    dilation = to_tuple(dilation, ndim, 'dilation', 'batched_conv')
    if impl == 'auto':
        k = weight.shape[3:]
        # the output size only picks a CPU path; an export takes 'unfold' without reading the traced sizes
        positions = None if is_exporting() else _out_positions(x.shape[2:], k, stride, padding, dilation)
        impl = resolve_impl(impl, x, B, ndim, k, padding, weight.shape[1:], positions, groups)
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
    elif ndim == 3:  # unfold, 3-D
        out = _gather_conv3d(x, weight, stride, padding, dilation, groups)
    else:  # unfold
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
    if grad_buffer is None or not (torch.is_grad_enabled() and w.requires_grad and plain_eager()):
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


def _static_sizes(sizes: Sequence) -> Tuple[int, ...]:
    """``int`` of each size. Channel and kernel sizes never depend on the input, so in a traced or exported
    graph they are constants on purpose; the tracer's warning that a Python int is recorded as a constant is
    silenced for exactly these (the batch and spatial sizes stay tensors)."""
    if not torch.jit.is_tracing():
        return tuple(int(v) for v in sizes)
    with warnings.catch_warnings():
        warnings.filterwarnings('ignore', category=torch.jit.TracerWarning)
        return tuple(int(v) for v in sizes)


def _unfold_conv(x, weight, stride, padding, dilation, groups, grad_buffer=None):
    """im2col + one batched matmul; every shape is read from the tensors (export friendly)."""
    one_d = x.dim() == 3
    if one_d:
        x = x.unsqueeze(2)
        weight = weight.unsqueeze(3)
        stride, padding, dilation = (1,) + stride, (0,) + padding, (1,) + dilation
    B, C_in, H, W = x.shape
    C_out, cin_g, kh, kw = _static_sizes(weight.shape[1:])
    cols = F.unfold(x, (kh, kw), dilation=dilation, padding=padding, stride=stride)  # (B, C_in*kh*kw, L)
    H_out = (H + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    W_out = (W + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    cols = cols.reshape(B, groups, cin_g * kh * kw, -1)
    w = weight.reshape(B, groups, C_out // groups, cin_g * kh * kw)
    out = _product(w, cols, grad_buffer)  # (B, g, C_out/g, L)
    out = out.reshape(B, C_out, H_out, W_out)
    return out.squeeze(2) if one_d else out


def _gather_conv3d(x, weight, stride, padding, dilation, groups):
    """3-D im2col by one gather (the window positions are fixed by the static spatial size), then one
    batched matmul: no batch-dependent attribute, so exported graphs keep a dynamic batch axis."""
    B, C_in = x.shape[:2]
    C_out, cin_g, *k = _static_sizes(weight.shape[1:])
    xp = F.pad(x, [p for pad in reversed(padding) for p in (pad, pad)])
    size = list(_static_sizes(xp.shape[2:]))
    outs = [(size[i] - dilation[i] * (k[i] - 1) - 1) // stride[i] + 1 for i in range(3)]
    # flat index of input position (o * s + u * d) per axis, for every tap u and output o
    axes = [(torch.arange(outs[i]).view(1, -1) * stride[i] + torch.arange(k[i]).view(-1, 1) * dilation[i])
            for i in range(3)]
    idx = ((axes[0].view(k[0], 1, 1, outs[0], 1, 1) * size[1]
            + axes[1].view(1, k[1], 1, 1, outs[1], 1)) * size[2]
           + axes[2].view(1, 1, k[2], 1, 1, outs[2])).reshape(-1).to(x.device)
    cols = xp.reshape(B, C_in, -1).index_select(2, idx)                # (B, C_in, K * L)
    L = outs[0] * outs[1] * outs[2]
    cols = cols.reshape(B, groups, cin_g, k[0] * k[1] * k[2], L).reshape(B, groups, -1, L)
    w = weight.reshape(B, groups, C_out // groups, -1)
    return torch.matmul(w, cols).reshape(B, C_out, *outs)


def reference_batched_conv(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """Obviously-correct reference: a Python loop of ordinary convolutions (for tests)."""
    ndim = x.dim() - 2
    conv = _CONV[ndim]
    outs = []
    for b in range(x.shape[0]):
        bb = None if bias is None else (bias[b] if bias.dim() == 2 else bias)
        outs.append(conv(x[b:b + 1], weight[b], bb, stride, padding, dilation, groups))
    return torch.cat(outs, 0)
