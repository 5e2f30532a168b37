"""Dynamic depth-wise convolutions of DWNet.

"On the Connection between Local Attention and Dynamic Depth-wise Convolution", Han et al., ICLR 2022
(arXiv 2106.04263). Local attention is read as a depth-wise convolution whose kernel is predicted
from the input; two flavours are provided:

* :class:`DynamicDWConv2d` (homogeneous, "D-DW-Conv"): one ``k x k`` kernel per sample and channel,
  predicted from the globally pooled input, shared by every position::

      ctx  = mean_{h,w} x                                      (B, C, 1, 1)
      w    = conv2(ReLU(BN(conv1(ctx))))                       (B, C*k*k, 1, 1) -> (B, C, 1, k, k)
      y[b] = depthwise_conv(x[b], w[b]) + bias                 (B, C, H', W')

  The per-sample kernels are applied with :func:`dynconv_mm.layers.batched.batched_conv`. Inference
  on the CPU (eval mode, no autograd, float32, stride 1) runs the whole layer as one native call
  (:func:`dynconv_mm.layers.native.dynamic_dw_forward`; same outputs up to float32 rounding).

* :class:`IDynamicDWConv2d` (inhomogeneous, "I-D-DW-Conv"): a different ``k x k`` kernel at every
  output position, predicted from the input at that position, shared by the ``group_channels``
  consecutive channels of a kernel group (``G = C / group_channels`` kernels per position)::

      w = conv2(ReLU(BN(conv1(x))))                            (B, G*k*k, H', W') -> (B, G, k, k, H', W')
      y[b, c, i, j] = sum_{u,v} w[b, c // group_channels, u, v, i, j]
                                * x_pad[b, c, i*s + u*d, j*s + v*d]

  This is what the official CuPy kernel (``models/idynamic.py``) computes; here it is plain PyTorch
  (shift-and-accumulate over the ``k*k`` taps, memory ``O(B*C*H'*W')``), so it runs on any device
  and is differentiable by autograd. The official DWNet configs pass per-stage "heads"
  ``[3, 6, 12, 24]`` (tiny) / ``[4, 8, 16, 32]`` (base) as the module's ``group_channels``, i.e. the
  number of channels sharing one kernel, which gives 32 kernel groups in every stage.
"""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..registry import register
from . import native
from .base import (
    ExtraMacs,
    IntOrTuple,
    LayerProtocol,
    StaticInit,
    StaticInitError,
    copy_static_bias,
    pooling_adds,
    to_tuple,
)
from .batched import IMPLS, batched_conv
from .dynamic_base import folded_conv
from .norm import build_norm

__all__ = ['DynamicDWConv2d', 'IDynamicDWConv2d', 'idynamic_conv2d']

IntOrPair = IntOrTuple


def _pair(v: IntOrPair, name: str, layer: str) -> tuple:
    return to_tuple(v, 2, name, layer)


def _build_norm(norm_cfg: Optional[dict], channels: int, owner: str) -> nn.Module:
    """The norm after the kernel generator's first 1x1 conv (``None``: a batch-of-one-safe
    ``BatchNorm2d``, :func:`~dynconv_mm.layers.norm.build_norm`; ``SyncBN`` etc. as given)."""
    return build_norm(norm_cfg, channels, dims=2, owner=owner)


def _init_generated_kernel(layer: nn.Module, gen: nn.Conv2d, prefix: str, weight: torch.Tensor,
                           bias: Optional[torch.Tensor]) -> StaticInit:
    """A kernel generator whose last 1x1 conv has weight 0 and the static kernels as bias: it outputs
    the static kernels for every input (group-shared kernels start from the mean of their channels')."""
    kh, kw = layer.kernel_size
    if weight.shape[1] != 1 or weight.shape[0] != layer.in_channels:
        raise StaticInitError(f'{type(layer).__name__}: a depth-wise static kernel (C, 1, k, k) is needed, '
                              f'got {tuple(weight.shape)}')
    groups = getattr(layer, 'group_channels', 1)
    if groups != 1:
        kernels = weight.reshape(layer.in_channels // groups, groups, kh * kw).mean(1)
        rec = StaticInit(False, f'not exact: {groups} channels share one generated kernel; each group starts from '
                                'the mean of its static kernels')
    else:
        kernels = weight.reshape(layer.in_channels, kh * kw)
        rec = StaticInit(True, 'exact: the kernel generator outputs W for every input (last conv weight 0, bias W)')
    with torch.no_grad():
        gen.weight.zero_()
        gen.bias.copy_(kernels.reshape(-1))
    rec.by_rule[f'{prefix}.weight'] = 'zero: the generated kernel does not depend on the input at first'
    rec.from_static.append(f'{prefix}.bias')
    copy_static_bias(layer, bias, rec)
    return rec


def _check_depthwise(layer: str, in_channels: int, out_channels: Optional[int], groups: Optional[int]) -> int:
    if in_channels < 1:
        raise ValueError(f'{layer}: in_channels must be positive, got {in_channels}')
    out_channels = in_channels if out_channels is None else out_channels
    if out_channels != in_channels:
        raise ValueError(f'{layer} is depth-wise: out_channels must equal in_channels ({in_channels}), '
                         f'got {out_channels}')
    if groups is not None and groups != in_channels:
        raise ValueError(f'{layer} is depth-wise: groups must be None or in_channels ({in_channels}), got {groups}')
    return out_channels


@register('conv')
class DynamicDWConv2d(LayerProtocol, nn.Module):
    """Depth-wise convolution with per-sample kernels predicted from the pooled input (D-DW-Conv).

    Args:
        in_channels: channels ``C`` of input and output.
        out_channels: must be ``C`` (or ``None``); accepted so that ``build_conv_layer`` can build it.
        kernel_size: ``k`` (int or pair); DWNet uses 7.
        stride, dilation: as in ``nn.Conv2d``.
        padding: int/pair, or ``None`` for "same" padding ``dilation * (k - 1) // 2``.
        groups: must be ``None`` or ``C`` (depth-wise).
        bias: learned per-channel bias ``(C,)`` added to every sample (zeros at init).
        reduction: hidden width of the kernel generator is ``C // reduction``.
        norm_cfg: mmcv norm config for the generator's norm (``None``: batch-of-one-safe ``BatchNorm2d``;
            ``SyncBN`` for distributed dense prediction, as the official detection backbone).
        impl: :func:`batched_conv` implementation (``'auto'`` by default).

    Shapes: input ``(B, C, H, W)``, output ``(B, C, H', W')`` with the usual convolution arithmetic.

    Parameter names follow the official ``DynamicDWConv``: ``conv1.weight`` ``(C/r, C, 1, 1)``,
    ``bn.*``, ``conv2.weight`` ``(C*k*k, C/r, 1, 1)``, ``conv2.bias``, ``bias``.
    """

    def __init__(self,
                 in_channels: int,
                 out_channels: Optional[int] = None,
                 kernel_size: IntOrPair = 7,
                 stride: IntOrPair = 1,
                 padding: Optional[IntOrPair] = None,
                 dilation: IntOrPair = 1,
                 groups: Optional[int] = None,
                 bias: bool = True,
                 reduction: int = 4,
                 norm_cfg: Optional[dict] = None,
                 impl: str = 'auto') -> None:
        super().__init__()
        name = type(self).__name__
        self.in_channels = in_channels
        self.out_channels = _check_depthwise(name, in_channels, out_channels, groups)
        self.kernel_size = _pair(kernel_size, 'kernel_size', name)
        self.stride = _pair(stride, 'stride', name)
        self.dilation = _pair(dilation, 'dilation', name)
        if padding is None:
            padding = tuple(d * (k - 1) // 2 for d, k in zip(self.dilation, self.kernel_size))
        self.padding = _pair(padding, 'padding', name)
        if min(self.kernel_size) < 1 or min(self.stride) < 1 or min(self.dilation) < 1 or min(self.padding) < 0:
            raise ValueError(f'{name}: invalid kernel_size/stride/dilation/padding '
                             f'{self.kernel_size}/{self.stride}/{self.dilation}/{self.padding}')
        if reduction < 1 or in_channels // reduction < 1:
            raise ValueError(f'{name}: reduction must be in [1, in_channels={in_channels}], got {reduction}')
        if impl not in IMPLS:
            raise ValueError(f'{name}: impl must be one of {IMPLS}, got {impl!r}')
        self.groups = in_channels
        self.reduction = reduction
        self.impl = impl
        hidden = in_channels // reduction
        kh, kw = self.kernel_size
        self.conv1 = nn.Conv2d(in_channels, hidden, 1, bias=False)
        self.bn = _build_norm(norm_cfg, hidden, name)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(hidden, in_channels * kh * kw, 1)
        if bias:
            self.bias = nn.Parameter(torch.zeros(in_channels))
        else:
            self.register_parameter('bias', None)

    def generate_kernels(self, x: torch.Tensor) -> torch.Tensor:
        """Per-sample depth-wise kernels ``(B, C, 1, kh, kw)`` for input ``x`` ``(B, C, H, W)``."""
        ctx = F.adaptive_avg_pool2d(x, 1)
        w = self.conv2(self.relu(self.bn(self.conv1(ctx))))
        return w.reshape(x.shape[0], self.in_channels, 1, *self.kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():
            out = self._native_inference(x)
            if out is not None:
                return out
        weight = self.generate_kernels(x)
        return batched_conv(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups,
                            impl=self.impl)

    def _native_inference(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """The whole forward in one native call (:func:`dynconv_mm.layers.native.dynamic_dw_forward`),
        or ``None`` where that path does not apply: it needs eval-mode batch norm with running
        statistics, stride 1, a float32 CPU input, eager PyTorch without autocast, the default
        ``impl``, and no hooks on the generator's modules (they would not run). Same outputs as the
        PyTorch path up to float32 rounding. Called without autograd only (the result has no graph).

        Reads submodules and tensors through the module dicts: at batch 1 the whole layer takes ~0.1 ms
        and ``nn.Module`` attribute lookups would cost a tenth of it.
        """
        if self.impl != 'auto' or self.stride != (1, 1):
            return None
        mods = self._modules
        conv1, bn, conv2 = mods['conv1'], mods['bn'], mods['conv2']
        norm = native.eval_batch_norm(bn)
        if (norm is None or conv1._parameters.get('bias') is not None
                or not native.native_inference_allowed(x, (conv1, bn, mods['relu'], conv2))):
            return None
        channels_last = not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
        out = native.dynamic_dw_forward(x.contiguous() if channels_last else x, conv1._parameters['weight'], *norm,
                                        conv2._parameters['weight'], conv2._parameters.get('bias'),
                                        self._parameters.get('bias'), self.kernel_size, self.padding, self.dilation)
        if out is not None and channels_last:  # the memory format a convolution would give
            out = out.contiguous(memory_format=torch.channels_last)
        return out

    # -- protocol ----------------------------------------------------------------------------
    has_reference = True

    @classmethod
    def accepts(cls, spec) -> Optional[str]:
        if not spec.depthwise:
            return f'{cls.__name__} is depth-wise (groups == in_channels == out_channels > 1)'
        return super().accepts(spec)

    def extra_macs(self, in_shape: Sequence[int], out_shape: Sequence[int]) -> ExtraMacs:
        """Pooling and the kernel generator's two 1x1 convolutions; the generator outputs the kernels,
        so there is no assembly."""
        att = self.conv1.weight.numel() + self.conv2.weight.numel()
        return ExtraMacs(pooling=pooling_adds(in_shape), attention=att)

    def init_from_static(self, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                         **options: Any) -> StaticInit:
        """Kernel generator: last conv weight 0, bias ``W`` (exact: every input gets ``W``)."""
        return _init_generated_kernel(self, self.conv2, 'conv2', weight, bias)

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """DWNet's computation: the generated kernels in one batch-folded convolution of ``B * C`` groups."""
        B, C = x.shape[:2]
        weight = self.generate_kernels(x).reshape(B * C, 1, *self.kernel_size)
        out = folded_conv(x, weight, self.stride, self.padding, self.dilation, C)
        if self.bias is not None:
            out = out + self.bias.to(out.dtype).reshape(1, -1, 1, 1)
        return out

    def extra_repr(self) -> str:
        return (f'{self.in_channels}, kernel_size={self.kernel_size}, stride={self.stride}, '
                f'padding={self.padding}, dilation={self.dilation}, reduction={self.reduction}')


def idynamic_conv2d(x: torch.Tensor, weight: torch.Tensor, stride: IntOrPair = 1, padding: IntOrPair = 0,
                            dilation: IntOrPair = 1) -> torch.Tensor:
    """Inhomogeneous depth-wise convolution: per-position kernels shared within channel groups.

    Args:
        x: ``(B, C, H, W)``.
        weight: ``(B, G, kh, kw, H', W')`` (the official CuPy layout); channel ``c`` uses kernel group
            ``c // (C // G)``; ``H', W'`` must be the output size.
        stride, padding, dilation: as in ``F.conv2d`` (zero padding).

    Returns:
        ``(B, C, H', W')`` with ``y[b,c,i,j] = sum_{u,v} weight[b,g,u,v,i,j] * x_pad[b,c,i*s+u*d,j*s+v*d]``.
    """
    sh, sw = _pair(stride, 'stride', 'idynamic_conv')
    ph, pw = _pair(padding, 'padding', 'idynamic_conv')
    dh, dw = _pair(dilation, 'dilation', 'idynamic_conv')
    B, C, H, W = x.shape
    G, kh, kw, Ho, Wo = weight.shape[1:]
    if weight.shape[0] != B or C % G:
        raise ValueError(f'idynamic_conv: weight {tuple(weight.shape)} does not fit input {tuple(x.shape)}')
    exp_h = (H + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    exp_w = (W + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    if (Ho, Wo) != (exp_h, exp_w):
        raise ValueError(f'idynamic_conv: kernel map {(Ho, Wo)} differs from the output size {(exp_h, exp_w)}')
    xp = F.pad(x, (pw, pw, ph, ph)).reshape(B, G, C // G, H + 2 * ph, W + 2 * pw)
    out = None
    for u in range(kh):
        for v in range(kw):
            tap = xp[:, :, :, u * dh:u * dh + sh * (Ho - 1) + 1:sh, v * dw:v * dw + sw * (Wo - 1) + 1:sw]
            term = tap * weight[:, :, u, v].unsqueeze(2)
            out = term if out is None else out + term
    return out.reshape(B, C, Ho, Wo)


@register('conv')
class IDynamicDWConv2d(LayerProtocol, nn.Module):
    """Inhomogeneous dynamic depth-wise convolution (I-D-DW-Conv): per-position kernels.

    The kernel at every output position is predicted by two 1x1 convolutions from the input at the
    centre of its window, and shared by ``group_channels`` consecutive channels (one "head"):
    ``conv1`` (``C -> C/reduction``, with bias) -> norm -> ReLU -> ``conv2`` (``-> G*k*k``, with bias),
    ``G = C / group_channels``. With ``stride > 1`` the generator reads the window centres (a
    strided 1x1 convolution), so the kernel map has the output's size; the official module
    supports stride 1 only.

    Args:
        in_channels: channels ``C`` of input and output.
        out_channels: must be ``C`` (or ``None``).
        kernel_size: odd ``k`` (int or pair); DWNet uses 7.
        stride, dilation: as in ``nn.Conv2d``.
        padding: ``None`` or the "same" padding ``dilation * (k - 1) // 2`` (other values would move the
            window centres away from the positions the kernels are read at).
        groups: must be ``None`` or ``C`` (depth-wise).
        bias: add a learned per-channel bias ``(C,)`` (the official module has none).
        group_channels: channels per kernel group; must divide ``C``. The official configs' "heads".
        reduction: hidden width ``C // reduction``.
        norm_cfg: mmcv norm config (``None``: ``BatchNorm2d``).

    Shapes: input ``(B, C, H, W)``, output ``(B, C, ceil(H/s), ceil(W/s))``.

    Parameter names follow the official ``IDynamicDWConv``: ``conv1.0`` (conv), ``conv1.1`` (norm),
    ``conv2.0`` (conv).
    """

    def __init__(self,
                 in_channels: int,
                 out_channels: Optional[int] = None,
                 kernel_size: IntOrPair = 7,
                 stride: IntOrPair = 1,
                 padding: Optional[IntOrPair] = None,
                 dilation: IntOrPair = 1,
                 groups: Optional[int] = None,
                 bias: bool = False,
                 group_channels: int = 1,
                 reduction: int = 4,
                 norm_cfg: Optional[dict] = None) -> None:
        super().__init__()
        name = type(self).__name__
        self.in_channels = in_channels
        self.out_channels = _check_depthwise(name, in_channels, out_channels, groups)
        self.kernel_size = _pair(kernel_size, 'kernel_size', name)
        self.stride = _pair(stride, 'stride', name)
        self.dilation = _pair(dilation, 'dilation', name)
        if any(k % 2 == 0 or k < 1 for k in self.kernel_size):
            raise ValueError(f'{name}: kernel_size must be odd, got {self.kernel_size}')
        if min(self.stride) < 1 or min(self.dilation) < 1:
            raise ValueError(f'{name}: stride and dilation must be positive, got {self.stride}, {self.dilation}')
        same = tuple(d * (k - 1) // 2 for d, k in zip(self.dilation, self.kernel_size))
        if padding is not None and _pair(padding, 'padding', name) != same:
            raise ValueError(f'{name}: padding must be None or the "same" padding {same}, got {padding}')
        self.padding = same
        if group_channels < 1 or in_channels % group_channels:
            raise ValueError(f'{name}: group_channels must divide in_channels={in_channels}, got {group_channels}')
        if reduction < 1 or in_channels // reduction < 1:
            raise ValueError(f'{name}: reduction must be in [1, in_channels={in_channels}], got {reduction}')
        self.group_channels = group_channels
        self.num_kernel_groups = in_channels // group_channels
        self.groups = in_channels
        self.reduction = reduction
        hidden = in_channels // reduction
        kh, kw = self.kernel_size
        self.conv1 = nn.Sequential(nn.Conv2d(in_channels, hidden, 1, stride=self.stride),
                                   _build_norm(norm_cfg, hidden, name), nn.ReLU())
        self.conv2 = nn.Sequential(nn.Conv2d(hidden, self.num_kernel_groups * kh * kw, 1))
        if bias:
            self.bias = nn.Parameter(torch.zeros(in_channels))
        else:
            self.register_parameter('bias', None)

    def generate_kernels(self, x: torch.Tensor) -> torch.Tensor:
        """Per-position kernels ``(B, G, kh, kw, H', W')`` for input ``x`` ``(B, C, H, W)``."""
        w = self.conv2(self.conv1(x))
        B, _, Ho, Wo = w.shape
        return w.reshape(B, self.num_kernel_groups, *self.kernel_size, Ho, Wo)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = idynamic_conv2d(x, self.generate_kernels(x), self.stride, self.padding, self.dilation)
        if self.bias is not None:
            out = out + self.bias.reshape(1, -1, 1, 1)
        return out

    # -- protocol ----------------------------------------------------------------------------
    @classmethod
    def accepts(cls, spec) -> Optional[str]:
        if not spec.depthwise:
            return f'{cls.__name__} is depth-wise (groups == in_channels == out_channels > 1)'
        if any(k % 2 == 0 for k in spec.kernel_size) or tuple(spec.padding) != spec.same_padding:
            return f'{cls.__name__} needs an odd kernel with "same" padding'
        return super().accepts(spec)

    def extra_macs(self, in_shape: Sequence[int], out_shape: Sequence[int]) -> ExtraMacs:
        """The kernel generator: two 1x1 convolutions at every output position (no pooling; the
        per-position kernels are applied by the convolution itself)."""
        positions = math.prod(int(s) for s in out_shape[1:])
        att = (self.conv1[0].weight.numel() + self.conv2[0].weight.numel()) * positions
        return ExtraMacs(attention=att)

    def init_from_static(self, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                         **options: Any) -> StaticInit:
        """Kernel generator: last conv weight 0, bias ``W`` (exact for ``group_channels == 1``; a group
        shares one kernel otherwise and starts from the mean of its channels' kernels)."""
        return _init_generated_kernel(self, self.conv2[0], 'conv2.0', weight, bias)

    def extra_repr(self) -> str:
        return (f'{self.in_channels}, kernel_size={self.kernel_size}, stride={self.stride}, '
                f'dilation={self.dilation}, group_channels={self.group_channels}, reduction={self.reduction}')
