"""CondConv: conditionally parameterized convolution (a routed mixture of expert kernels).

Paper: Yang et al., "CondConv: Conditionally Parameterized Convolutions for Efficient Inference",
NeurIPS 2019. Each sample gets routing weights ``r = sigmoid(routing_fn(GAP(x)))`` over
``num_experts`` kernels (independent sigmoids, not a softmax) and is convolved with
``W_b = sum_e r[b, e] * W_e`` (and ``bias_b = sum_e r[b, e] * bias_e``).

Parameters: ``weight (E, C_out, C_in/g, k_h, k_w)``, ``bias (E, C_out)``, ``routing_fn.{weight (E, C_in),
bias (E,)}``. timm's ``CondConv2d`` stores the same experts flattened, ``weight (E, C_out*C_in/g*k_h*k_w)``,
and computes the routing outside the layer;
:func:`dynconv_mm.converters.pedconv.convert_timm_condconv` reshapes its keys into these.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..registry import register
from .attention import pooled_context
from .batched import batched_conv
from .dynamic_base import DynamicConv2dBase, IntOrPair, mix_kernels

__all__ = ['CondConv2d']


@register('conv')
class CondConv2d(DynamicConv2dBase):
    """CondConv 2-D convolution, a drop-in for ``nn.Conv2d`` (``conv_cfg=dict(type='CondConv2d')``).

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias: as ``nn.Conv2d``
            (a bias is one vector per expert, mixed like the kernels).
        num_experts: number of expert kernels ``E`` (>= 1; the paper uses 4 to 32).
        impl: :func:`~dynconv_mm.layers.batched.batched_conv` implementation.

    Shapes: ``x (B, C_in, H, W)`` -> ``(B, C_out, H_out, W_out)``.
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
                 num_experts: int = 4,
                 impl: str = 'auto') -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, impl)
        if not isinstance(num_experts, int) or num_experts < 1:
            raise ValueError(f'CondConv2d: num_experts must be a positive int, got {num_experts!r}')
        self.num_experts = num_experts
        self.weight = nn.Parameter(torch.empty(num_experts, out_channels, in_channels // groups, *self.kernel_size))
        self.bias = nn.Parameter(torch.empty(num_experts, out_channels)) if bias else None
        self.routing_fn = nn.Linear(in_channels, num_experts)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # each expert initialised like an nn.Conv2d kernel and bias
        fan_in = self.weight[0].numel() // self.out_channels
        for e in range(self.num_experts):
            nn.init.kaiming_uniform_(self.weight[e], a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(fan_in)
            nn.init.uniform_(self.bias, -bound, bound)
        self.routing_fn.reset_parameters()

    def init_weights(self) -> None:
        """Keep this layer's own initialisation when built inside mmcv's ``ConvModule``."""
        self.reset_parameters()

    def routing_weights(self, x: torch.Tensor) -> torch.Tensor:
        """``sigmoid(routing_fn(GAP(x)))``: ``(B, E)``."""
        return torch.sigmoid(self.routing_fn(pooled_context(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = self.routing_weights(x)
        r = r.to(self.weight.dtype)
        weight = mix_kernels(r, self.weight)  # (B, C_out, C_in/g, k_h, k_w)
        bias = None if self.bias is None else mix_kernels(r, self.bias)
        return batched_conv(x, weight, bias, **self.conv_kwargs())

    def extra_repr(self) -> str:
        return super().extra_repr() + f', num_experts={self.num_experts}'
