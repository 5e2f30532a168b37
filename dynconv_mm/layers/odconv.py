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
* kernel ``a_k = softmax(kernel_fc(h) / T)`` over ``kernel_num`` (absent for ``kernel_num == 1``).

``y_b = a_f[b] * conv(a_c[b] * x_b, sum_n a_k[b, n] * a_s[b] * W_n)``. Inference on the CPU (eval
mode, no autograd, float32) computes the attentions and the per-sample kernels, with ``a_f`` and ``a_c``
folded into them, in one native call (:func:`dynconv_mm.layers.native.odconv_kernels`) and then runs
only the convolution. With a 1x1 kernel and
``kernel_num == 1`` every attention is a channel scaling, so the layer is a plain convolution between
two scalings (no per-sample kernel). The temperature is a non-persistent buffer (1.0 by default, as
the official layer; the official schedule anneals it from 30 to 1 over 10 epochs:
``dict(type='TemperatureHook', preset='odconv')``). The attention's BatchNorm is
:class:`~dynconv_mm.layers.attention.SafeBatchNorm2d`, so training with a batch of one works.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..registry import register
from . import native
from .attention import SafeBatchNorm2d, pooled_context
from .batched import batched_conv
from .dynamic_base import DynamicConv2dBase, IntOrPair, mix_kernels
from .temperature import TemperatureMixin

__all__ = ['ODAttention', 'ODConv2d']

_Attn = Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]


class ODAttention(nn.Module):
    """The four attentions of ODConv (official ``Attention``; same submodule names and init)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Tuple[int, int], groups: int = 1,
                 reduction: float = 0.0625, kernel_num: int = 4, min_channels: int = 16) -> None:
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
        self.kernel_fc = None if kernel_num == 1 else nn.Conv2d(hidden, kernel_num, 1)
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
        kernel_num: number of kernels mixed by the kernel attention (official default 4; 1 gives
            "ODConv (1x)").
        temperature: initial temperature of all four attentions (official: 1.0).
        impl: :func:`~dynconv_mm.layers.batched.batched_conv` implementation.

    Shapes: ``x (B, C_in, H, W)`` -> ``(B, C_out, H_out, W_out)``; ``weight (kernel_num, C_out, C_in/g,
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
                 kernel_num: int = 4,
                 min_channels: int = 16,
                 temperature: float = 1.0,
                 impl: str = 'auto') -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, impl)
        if not isinstance(kernel_num, int) or kernel_num < 1:
            raise ValueError(f'ODConv2d: kernel_num must be a positive int, got {kernel_num!r}')
        if not reduction > 0:
            raise ValueError(f'ODConv2d: reduction must be > 0, got {reduction!r}')
        if not isinstance(min_channels, int) or min_channels < 1:
            raise ValueError(f'ODConv2d: min_channels must be a positive int, got {min_channels!r}')
        if not temperature > 0:
            raise ValueError(f'ODConv2d: temperature must be > 0, got {temperature}')
        self.kernel_num = kernel_num
        self.init_temperature(temperature)
        self.weight = nn.Parameter(torch.empty(kernel_num, out_channels, in_channels // groups, *self.kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        self.attention = ODAttention(in_channels, out_channels, self.kernel_size, groups, reduction, kernel_num,
                                     min_channels)
        self.reset_parameters()

    @property
    def pointwise_static(self) -> bool:
        """1x1 kernel and one kernel: a plain convolution between channel scalings."""
        return self.kernel_size == (1, 1) and self.kernel_num == 1

    def reset_parameters(self) -> None:
        for n in range(self.kernel_num):
            nn.init.kaiming_normal_(self.weight[n], mode='fan_out', nonlinearity='relu')
        if self.bias is not None:
            nn.init.zeros_(self.bias)
        self.attention.reset_parameters()

    def update_temperature(self, temperature: float) -> None:
        """The official layer's name for :meth:`set_temperature`."""
        self.set_temperature(temperature)

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

    def extra_repr(self) -> str:
        return super().extra_repr() + f', kernel_num={self.kernel_num}'
