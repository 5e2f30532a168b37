"""DY-Conv: dynamic convolution as a softmax attention over K kernels.

Paper: Chen et al., "Dynamic Convolution: Attention over Convolution Kernels", CVPR 2020.
A squeeze-and-excitation branch scores ``K`` kernels per sample,

    pi = softmax(fc2(ReLU(fc1(GAP(x)))) / T)                 # (B, K), sums to 1
    W_b = sum_k pi[b, k] * W_k,   bias_b = sum_k pi[b, k] * bias_k

and the sample is convolved with ``W_b``. The temperature ``T`` starts high (30 in the paper, so the
attention is near uniform and every kernel trains) and is annealed to 1 over the first 10 epochs:
``custom_hooks=[dict(type='TemperatureHook', preset='dyconv')]``. It is a buffer saved with the
weights (:class:`~dynconv_mm.layers.temperature.TemperatureMixin`), 1 (the end of the schedule) in a
new layer; set it with :func:`dynconv_mm.set_temperature`.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..registry import register
from .attention import pooled_context
from .base import ExtraMacs, StaticInit, copy_static_bias, linear_macs, pooling_adds, set_param
from .batched import batched_conv
from .dynamic_base import DynamicConv2dBase, IntOrPair, folded_conv, mix_kernels, resolve_num_experts
from .temperature import TemperatureMixin

__all__ = ['DyConvAttention', 'DyConv2d']


class DyConvAttention(nn.Module):
    """Kernel attention of DY-Conv: ``GAP -> fc1 -> ReLU -> fc2 -> softmax(/T)``.

    Hidden width ``max(in_channels // reduction, min_channels)`` (the paper reduces by 4).
    """

    def __init__(self, in_channels: int, num_experts: int, reduction: int = 4, min_channels: int = 4) -> None:
        super().__init__()
        hidden = max(in_channels // reduction, min_channels)
        self.fc1 = nn.Linear(in_channels, hidden)
        self.fc2 = nn.Linear(hidden, num_experts)

    def forward(self, x: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
        """``x (B, C_in, H, W)`` -> attention ``(B, K)``."""
        logits = self.fc2(F.relu(self.fc1(pooled_context(x))))
        return torch.softmax(logits / temperature, dim=1)


@register('conv')
class DyConv2d(TemperatureMixin, DynamicConv2dBase):
    """DY-Conv 2-D convolution, a drop-in for ``nn.Conv2d`` (``conv_cfg=dict(type='DyConv2d')``).

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias: as ``nn.Conv2d``
            (a bias is one vector per kernel, mixed with the same attention).
        num_experts: ``K``, the kernels mixed per sample (the paper uses 4); ``num_kernels`` is
            accepted as another name for it.
        reduction: attention hidden width ``in_channels // reduction`` (at least 4).
        temperature: a fixed softmax temperature; ``None`` (default): 1, the end of the paper's schedule
            (``TemperatureHook`` with ``preset='dyconv'`` anneals it from 30 in training).
        impl: :func:`~dynconv_mm.layers.batched.batched_conv` implementation.

    Shapes: ``x (B, C_in, H, W)`` -> ``(B, C_out, H_out, W_out)``; ``weight (K, C_out, C_in/g, k_h, k_w)``,
    ``bias (K, C_out)``.
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
                 num_experts: Optional[int] = None,
                 reduction: int = 4,
                 temperature: Optional[float] = None,
                 impl: str = 'auto',
                 num_kernels: Optional[int] = None) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, impl)
        num_experts = resolve_num_experts('DyConv2d', num_experts, 'num_kernels', num_kernels)
        if not isinstance(reduction, int) or reduction < 1:
            raise ValueError(f'DyConv2d: reduction must be a positive int, got {reduction!r}')
        if temperature is not None and not temperature > 0:
            raise ValueError(f'DyConv2d: temperature must be > 0, got {temperature}')
        self.num_experts = num_experts
        self.init_temperature(temperature)
        self.weight = nn.Parameter(torch.empty(num_experts, out_channels, in_channels // groups, *self.kernel_size))
        self.bias = nn.Parameter(torch.zeros(num_experts, out_channels)) if bias else None
        self.attention = DyConvAttention(in_channels, num_experts, reduction)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for k in range(self.num_experts):
            nn.init.kaiming_normal_(self.weight[k], mode='fan_out', nonlinearity='relu')
        if self.bias is not None:
            nn.init.zeros_(self.bias)
        self.attention.fc1.reset_parameters()
        self.attention.fc2.reset_parameters()

    def init_weights(self) -> None:
        """Keep this layer's own initialisation when built inside mmcv's ``ConvModule``."""
        self.reset_parameters()

    end_temperature = 1.0
    temperature_preset = 'dyconv'

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_temperature_schedule()
        pi = self.attention(x, self.temperature).to(self.weight.dtype)
        weight = mix_kernels(pi, self.weight)  # (B, C_out, C_in/g, k_h, k_w)
        bias = None if self.bias is None else mix_kernels(pi, self.bias)
        return batched_conv(x, weight, bias, **self.conv_kwargs())

    # -- protocol ----------------------------------------------------------------------------
    def extra_macs(self, in_shape: Sequence[int], out_shape: Sequence[int]) -> ExtraMacs:
        """Pooling, the two attention layers, and the mixture of the ``K`` kernels (and biases)."""
        att = linear_macs(self.attention.fc1) + linear_macs(self.attention.fc2)
        mixed = self.weight.numel() + (0 if self.bias is None else self.bias.numel())
        return ExtraMacs(pooling=pooling_adds(in_shape), attention=att, assembly=mixed)

    def init_from_static(self, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                         **options: Any) -> StaticInit:
        """Every kernel (and bias) is the static one; the attention is kept as initialised, so samples
        weigh the kernels differently and they diverge in training. Exact: the softmax sums to 1."""
        rec = StaticInit(True, 'exact: every kernel is W and the softmax attention sums to 1')
        set_param(self, 'weight', weight.unsqueeze(0).expand_as(self.weight))
        rec.from_static.append('weight')
        copy_static_bias(self, bias, rec, expand=self.num_experts)
        return rec

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The official layer's computation: softmax attention, ``mm`` with the flattened kernels, one
        batch-folded grouped convolution."""
        pi = self.attention(x, self.temperature).to(self.weight.dtype)
        weight = torch.mm(pi, self.weight.reshape(self.num_experts, -1))
        out = folded_conv(x, weight.reshape(-1, self.in_channels // self.groups, *self.kernel_size), self.stride,
                          self.padding, self.dilation, self.groups)
        if self.bias is not None:
            out = out + torch.mm(pi, self.bias).to(out.dtype).reshape(x.shape[0], -1, 1, 1)
        return out

    def extra_repr(self) -> str:
        return super().extra_repr() + f', num_experts={self.num_experts}'
