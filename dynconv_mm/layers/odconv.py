"""ODConv: omni-dimensional dynamic convolution.

Paper: Li, Zhou and Yao, "Omni-Dimensional Dynamic Convolution", ICLR 2022 (official code:
OSVAI/ODConv ``modules/odconv.py``; parameter names kept, so official weights load unchanged).

One attention branch ``h = ReLU(BN(fc(GAP(x))))`` (``fc``: 1x1 conv, ``C_in -> max(int(C_in *
reduction), min_channels)``, no bias) feeds four heads, each a 1x1 conv with bias divided by the
temperature ``T``:

* channel ``a_c = sigmoid(channel_fc(h) / T)`` ``(B, C_in)``: scales the input channels;
* filter ``a_f = sigmoid(filter_fc(h) / T)`` ``(B, C_out)``: scales the output channels (absent for a
  depth-wise layer, ``C_in == groups == C_out``);
* spatial ``a_s = sigmoid(spatial_fc(h) / T)`` ``(B, k_h*k_w)`` (absent for 1x1 kernels);
* kernel ``a_k = softmax(kernel_fc(h) / T)`` over the ``num_experts`` kernels (absent for one kernel).

``y_b = a_f[b] * conv(a_c[b] * x_b, sum_n a_k[b, n] * a_s[b] * W_n)``. Inference on the CPU (eval
mode, no autograd, float32) computes the attentions and the per-sample kernels, with ``a_f`` and ``a_c``
folded into them, in one native call (:func:`dynconv_mm.layers.native.odconv_kernels`) and then runs
only the convolution. With a 1x1 kernel and
one kernel every attention is a channel scaling, so the layer is a plain convolution between
two scalings (no per-sample kernel). The temperature is a buffer saved with the weights (1.0 by default,
as the official layer; the official schedule anneals it from 30 to 1 over 10 epochs:
``dict(type='TemperatureHook', preset='odconv')``). The attention's BatchNorm is
:class:`~dynconv_mm.layers.attention.SafeBatchNorm2d`, so training with a batch of one works.
"""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..registry import register
from . import native
from .attention import SafeBatchNorm2d, pooled_context
from .base import ExtraMacs, StaticInit, copy_static_bias, linear_macs, pooling_adds, set_param, zero_module
from .batched import batched_conv
from .dynamic_base import DynamicConv2dBase, IntOrPair, folded_conv, mix_kernels, resolve_num_experts
from .temperature import TemperatureMixin

__all__ = ['ODAttention', 'ODConv2d']

_Attn = Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]


class ODAttention(nn.Module):
    """The four attentions of ODConv (official ``Attention``; same submodule names and init)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Tuple[int, int], groups: int = 1,
                 reduction: float = 0.0625, num_experts: int = 4, min_channels: int = 16) -> None:
        super().__init__()
        hidden = max(int(in_channels * reduction), min_channels)
        self.kernel_size = kernel_size
        self.fc = nn.Conv2d(in_channels, hidden, 1, bias=False)
        self.bn = SafeBatchNorm2d(hidden)
        self.channel_fc = nn.Conv2d(hidden, in_channels, 1)
        depthwise = in_channels == groups == out_channels
        self.filter_fc = None if depthwise else nn.Conv2d(hidden, out_channels, 1)
        pointwise = kernel_size == (1, 1)
        self.spatial_fc = None if pointwise else nn.Conv2d(hidden, kernel_size[0] * kernel_size[1], 1)
        self.kernel_fc = None if num_experts == 1 else nn.Conv2d(hidden, num_experts, 1)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                m.reset_running_stats()
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor, temperature: torch.Tensor) -> _Attn:
        """``x (B, C_in, H, W)`` -> ``a_c (B, C_in, 1, 1)``, ``a_f (B, C_out, 1, 1)``, ``a_s (B, 1, 1, k_h, k_w)``,
        ``a_k (B, K)``; absent heads give ``None``."""
        B = x.shape[0]
        h = F.relu(self.bn(self.fc(pooled_context(x)[:, :, None, None])))
        a_c = torch.sigmoid(self.channel_fc(h) / temperature)
        a_f = None if self.filter_fc is None else torch.sigmoid(self.filter_fc(h) / temperature)
        a_s = None
        if self.spatial_fc is not None:
            a_s = torch.sigmoid(self.spatial_fc(h) / temperature).reshape(B, 1, 1, *self.kernel_size)
        a_k = None if self.kernel_fc is None else torch.softmax(self.kernel_fc(h).reshape(B, -1) / temperature, 1)
        return a_c, a_f, a_s, a_k


@register('conv')
class ODConv2d(TemperatureMixin, DynamicConv2dBase):
    """ODConv 2-D convolution, a drop-in for ``nn.Conv2d`` (``conv_cfg=dict(type='ODConv2d')``).

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups: as ``nn.Conv2d``.
        bias: add a static bias ``(C_out,)`` after the filter attention (the official layer has none).
        reduction: attention width ``int(C_in * reduction)``, at least ``min_channels`` (official:
            0.0625 and 16).
        num_experts: number of kernels mixed by the kernel attention (official default 4; 1 gives
            "ODConv (1x)"); ``kernel_num``, the official name, is accepted for it.
        temperature: a fixed temperature of all four attentions; ``None`` (default): 1.0, the official
            layer's default and the end of its schedule.
        impl: :func:`~dynconv_mm.layers.batched.batched_conv` implementation.

    Shapes: ``x (B, C_in, H, W)`` -> ``(B, C_out, H_out, W_out)``; ``weight (num_experts, C_out, C_in/g,
    k_h, k_w)``.
    """

    def __init__(self,
                 in_channels: int,
                 out_channels: int,
                 kernel_size: IntOrPair,
                 stride: IntOrPair = 1,
                 padding: IntOrPair = 0,
                 dilation: IntOrPair = 1,
                 groups: int = 1,
                 bias: bool = False,
                 reduction: float = 0.0625,
                 kernel_num: Optional[int] = None,
                 min_channels: int = 16,
                 temperature: Optional[float] = None,
                 impl: str = 'auto',
                 num_experts: Optional[int] = None) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, impl)
        num_experts = resolve_num_experts('ODConv2d', num_experts, 'kernel_num', kernel_num)
        if not reduction > 0:
            raise ValueError(f'ODConv2d: reduction must be > 0, got {reduction!r}')
        if not isinstance(min_channels, int) or min_channels < 1:
            raise ValueError(f'ODConv2d: min_channels must be a positive int, got {min_channels!r}')
        if temperature is not None and not temperature > 0:
            raise ValueError(f'ODConv2d: temperature must be > 0, got {temperature}')
        self.num_experts = num_experts
        self.init_temperature(temperature)
        self.weight = nn.Parameter(torch.empty(num_experts, out_channels, in_channels // groups, *self.kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        self.attention = ODAttention(in_channels, out_channels, self.kernel_size, groups, reduction, num_experts,
                                     min_channels)
        self.reset_parameters()

    end_temperature = 1.0
    temperature_preset = 'odconv'

    @property
    def pointwise_static(self) -> bool:
        """1x1 kernel and one kernel: a plain convolution between channel scalings."""
        return self.kernel_size == (1, 1) and self.num_experts == 1

    def reset_parameters(self) -> None:
        for n in range(self.num_experts):
            nn.init.kaiming_normal_(self.weight[n], mode='fan_out', nonlinearity='relu')
        if self.bias is not None:
            nn.init.zeros_(self.bias)
        self.attention.reset_parameters()

    def init_weights(self) -> None:
        """Keep this layer's own initialisation when built inside mmcv's ``ConvModule``."""
        self.reset_parameters()

    def dynamic_weight(self, a_s: Optional[torch.Tensor], a_k: Optional[torch.Tensor], batch: int) -> torch.Tensor:
        """Per-sample kernels ``(B, C_out, C_in/g, k_h, k_w)`` from the spatial and kernel attentions."""
        if a_k is not None:
            weight = mix_kernels(a_k.to(self.weight.dtype), self.weight)
        else:
            weight = self.weight.expand(batch, *self.weight.shape[1:])
        return weight if a_s is None else weight * a_s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled() and not self.pointwise_static:
            weight = self._native_inference_kernels(x)
            if weight is not None:  # the channel attentions are in the kernels
                return batched_conv(x, weight, self.bias, **self.conv_kwargs())
        self.check_temperature_schedule()
        a_c, a_f, a_s, a_k = self.attention(x, self.temperature)
        x = x * a_c
        if self.pointwise_static:
            out = F.conv2d(x, self.weight[0], None, self.stride, self.padding, self.dilation, self.groups)
        else:
            out = batched_conv(x, self.dynamic_weight(a_s, a_k, x.shape[0]), None, **self.conv_kwargs())
        if a_f is not None:
            out = out * a_f
        if self.bias is not None:
            out = out + self.bias.to(out.dtype).reshape(1, -1, 1, 1)
        return out

    def _native_inference_kernels(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """Per-sample kernels with all four attentions in them (:func:`dynconv_mm.layers.native.odconv_kernels`:
        one native call for the attention branch and the mixing), so that ``batched_conv(x, kernels) + bias``
        is the layer's output; ``None`` where that path does not apply: it needs eval-mode batch norm with
        running statistics, a contiguous float32 CPU input, eager PyTorch without autocast, and no hooks
        on the attention's modules (they would not run). Same outputs as the PyTorch path up to float32
        rounding. Called without autograd only. Reads submodules through the module dicts: at batch 1
        the attention and mixing are a few percent of the layer and ``nn.Module`` lookups would add to it.
        """
        att = self._modules['attention']
        mods = att._modules
        norm = native.eval_batch_norm(mods['bn'])
        if norm is None or not x.is_contiguous():
            return None
        heads = [mods.get(name) for name in ('channel_fc', 'filter_fc', 'spatial_fc', 'kernel_fc')]
        if not native.native_inference_allowed(x, (att, mods['fc'], mods['bn'], *(h for h in heads if h is not None))):
            return None
        pairs = [(None, None) if h is None else (h._parameters['weight'], h._parameters.get('bias')) for h in heads]
        fc = mods['fc']
        if fc._parameters.get('bias') is not None:
            return None
        return native.odconv_kernels(x, fc._parameters['weight'], norm, *pairs, float(self._buffers['temperature']),
                                     self._parameters['weight'], self.groups)

    # -- protocol ----------------------------------------------------------------------------
    def extra_macs(self, in_shape: Sequence[int], out_shape: Sequence[int]) -> ExtraMacs:
        """Pooling; the attention branch (``fc`` and the heads); the channel attention on the input, the
        filter attention on the output and, unless the layer is a point-wise static one, the spatial
        attention on the kernels and the mixture of the ``K`` kernels."""
        att = self.attention
        heads = [m for m in (att.fc, att.channel_fc, att.filter_fc, att.spatial_fc, att.kernel_fc) if m is not None]
        assembly = math.prod(in_shape)                               # a_c on the input
        if att.filter_fc is not None:
            assembly += math.prod(out_shape)                         # a_f on the output
        if not self.pointwise_static:
            kernel = self.weight[0].numel()
            assembly += (self.weight.numel() if self.num_experts > 1 else 0)  # the mixture
            assembly += kernel if att.spatial_fc is not None else 0          # a_s on the kernels
        return ExtraMacs(pooling=pooling_adds(in_shape), attention=sum(linear_macs(m) for m in heads),
                         assembly=assembly)

    def init_from_static(self, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                         **options: Any) -> StaticInit:
        """The channel, filter and spatial heads get weight and bias 0 (each attention the constant
        ``sigmoid(0) = 1/2``), every kernel is ``W * 2^h`` (``h`` heads present); the kernel attention
        is kept as initialised (a softmax: exact whatever it is, and the kernels diverge in training)."""
        att = self.attention
        heads = [n for n in ('channel_fc', 'filter_fc', 'spatial_fc') if getattr(att, n) is not None]
        rec = StaticInit(True, f'exact: {"/".join(h[:-3] for h in heads)} attentions are sigmoid(0) = 1/2, '
                               f'kernels W * 2^{len(heads)}')
        for h in heads:
            zero_module(self, f'attention.{h}', rec, 'weight and bias 0: the attention is the constant 1/2')
        set_param(self, 'weight', (weight * 2.0 ** len(heads)).unsqueeze(0).expand_as(self.weight))
        rec.from_static.append('weight')
        copy_static_bias(self, bias, rec)
        return rec

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The official layer's computation: the kernel aggregation as a broadcast product summed over
        the kernels, one batch-folded grouped convolution."""
        a_c, a_f, a_s, a_k = self.attention(x, self.temperature)
        B = x.shape[0]
        x = x * a_c
        if self.pointwise_static:
            out = F.conv2d(x, self.weight[0], None, self.stride, self.padding, self.dilation, self.groups)
        else:
            w = self.weight.unsqueeze(0)  # (1, K, C_out, C_in/g, k, k)
            if a_s is not None:
                w = w * a_s.reshape(B, 1, 1, 1, *self.kernel_size)
            if a_k is not None:
                w = w * a_k.reshape(B, -1, 1, 1, 1, 1)
            else:
                w = w.expand(B, *w.shape[1:])
            weight = w.sum(dim=1).reshape(-1, self.in_channels // self.groups, *self.kernel_size)
            out = folded_conv(x, weight, self.stride, self.padding, self.dilation, self.groups)
        if a_f is not None:
            out = out * a_f
        if self.bias is not None:
            out = out + self.bias.to(out.dtype).reshape(1, -1, 1, 1)
        return out

    def extra_repr(self) -> str:
        return super().extra_repr() + f', num_experts={self.num_experts}'
