"""DY-Conv: dynamic convolution as a softmax attention over K kernels.

Paper: Chen et al., "Dynamic Convolution: Attention over Convolution Kernels", CVPR 2020.
A squeeze-and-excitation branch scores ``K`` kernels per sample,

    pi = softmax(fc2(ReLU(fc1(GAP(x)))) / T)                 # (B, K), sums to 1
    W_b = sum_k pi[b, k] * W_k,   bias_b = sum_k pi[b, k] * bias_k

and the sample is convolved with ``W_b``. The temperature ``T`` starts high (30 in the paper, so the
attention is near uniform and every kernel trains) and is annealed to 1 over the first 10 epochs:
``custom_hooks=[dict(type='TemperatureHook', preset='dyconv')]``. It is a non-persistent buffer
(:class:`~dynconv_mm.layers.temperature.TemperatureMixin`); set it with
:func:`dynconv_mm.set_temperature` (use 1 for a model trained to the end of the schedule).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..registry import register
from .attention import pooled_context
from .batched import batched_conv
from .dynamic_base import DynamicConv2dBase, IntOrPair, mix_kernels
from .temperature import TemperatureMixin

__all__ = ['DyConvAttention', 'DyConv2d']


class DyConvAttention(nn.Module):
    """Kernel attention of DY-Conv: ``GAP -> fc1 -> ReLU -> fc2 -> softmax(/T)``.

    Hidden width ``max(in_channels // reduction, min_channels)`` (the paper reduces by 4).
    """

    def __init__(self, in_channels: int, num_kernels: int, reduction: int = 4, min_channels: int = 4) -> None:
        super().__init__()
        hidden = max(in_channels // reduction, min_channels)
        self.fc1 = nn.Linear(in_channels, hidden)
        self.fc2 = nn.Linear(hidden, num_kernels)

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
        num_kernels: ``K`` (the paper uses 4).
        reduction: attention hidden width ``in_channels // reduction`` (at least 4).
        temperature: initial softmax temperature (30, the paper's starting value).
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
                 num_kernels: int = 4,
                 reduction: int = 4,
                 temperature: float = 30.0,
                 impl: str = 'auto') -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, impl)
        if not isinstance(num_kernels, int) or num_kernels < 1:
            raise ValueError(f'DyConv2d: num_kernels must be a positive int, got {num_kernels!r}')
        if not isinstance(reduction, int) or reduction < 1:
            raise ValueError(f'DyConv2d: reduction must be a positive int, got {reduction!r}')
        if not temperature > 0:
            raise ValueError(f'DyConv2d: temperature must be > 0, got {temperature}')
        self.num_kernels = num_kernels
        self.init_temperature(temperature)
        self.weight = nn.Parameter(torch.empty(num_kernels, out_channels, in_channels // groups, *self.kernel_size))
        self.bias = nn.Parameter(torch.zeros(num_kernels, out_channels)) if bias else None
        self.attention = DyConvAttention(in_channels, num_kernels, reduction)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for k in range(self.num_kernels):
            nn.init.kaiming_normal_(self.weight[k], mode='fan_out', nonlinearity='relu')
        if self.bias is not None:
            nn.init.zeros_(self.bias)
        self.attention.fc1.reset_parameters()
        self.attention.fc2.reset_parameters()

    def init_weights(self) -> None:
        """Keep this layer's own initialisation when built inside mmcv's ``ConvModule``."""
        self.reset_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pi = self.attention(x, self.temperature).to(self.weight.dtype)
        weight = mix_kernels(pi, self.weight)  # (B, C_out, C_in/g, k_h, k_w)
        bias = None if self.bias is None else mix_kernels(pi, self.bias)
        return batched_conv(x, weight, bias, **self.conv_kwargs())

    def extra_repr(self) -> str:
        return super().extra_repr() + f', num_kernels={self.num_kernels}'
