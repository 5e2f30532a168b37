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
from typing import Any, Optional, Sequence

import torch
from torch import nn

from ..registry import register
from .attention import pooled_context
from .base import (
    ExtraMacs,
    StaticInit,
    StaticInitError,
    copy_static_bias,
    linear_macs,
    pooling_adds,
    set_param,
    zero_module,
)
from .batched import batched_conv
from .dynamic_base import DynamicConv2dBase, IntOrPair, folded_conv, mix_kernels

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

    # -- protocol ----------------------------------------------------------------------------
    static_init_options = dict(expert_noise=0.01, generator=None)

    @classmethod
    def check_static_options(cls, options) -> None:
        noise = options.get('expert_noise', 0.01)
        if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not noise >= 0:
            raise StaticInitError(f'expert_noise must be a number >= 0, got {noise!r}')
        generator = options.get('generator')
        if generator is not None and not isinstance(generator, torch.Generator):
            raise StaticInitError(f'generator must be a torch.Generator or None, got {generator!r}')

    def extra_macs(self, in_shape: Sequence[int], out_shape: Sequence[int]) -> ExtraMacs:
        """Pooling, the routing layer, and the mixture of the ``E`` experts (and their biases)."""
        mixed = self.weight.numel() + (0 if self.bias is None else self.bias.numel())
        return ExtraMacs(pooling=pooling_adds(in_shape), attention=linear_macs(self.routing_fn), assembly=mixed)

    def init_from_static(self, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                         **options: Any) -> StaticInit:
        """Routing weight and bias 0, so every routing weight is the constant ``sigmoid(0) = 1/2``; the
        experts are ``2W/E`` plus zero-sum perturbations ``d_e`` (``expert_noise`` times the kernel's
        standard deviation, so that the experts differ and do not train identically):
        ``sum_e (1/2)(2W/E + d_e) = W``, exact."""
        opts = self._static_options(options)
        E = self.num_experts
        rec = StaticInit(True, 'exact: routing is the constant sigmoid(0) = 1/2, experts 2W/E plus zero-sum '
                               'perturbations')
        zero_module(self, 'routing_fn', rec, 'routing weight and bias 0: every routing weight is 1/2')
        experts = (2.0 / E) * weight.double().unsqueeze(0).expand(E, *weight.shape)
        std = float(opts['expert_noise']) * float(weight.double().std()) if weight.numel() > 1 else 0.0
        if std > 0 and E > 1:
            generator = opts['generator'] or torch.Generator().manual_seed(0)
            d = torch.randn(E, *weight.shape, generator=generator, dtype=torch.float64) * std
            experts = experts + (d - d.mean(0, keepdim=True)).float().double()
        set_param(self, 'weight', experts.float())
        rec.from_static.append('weight')
        copy_static_bias(self, bias, rec, expand=E, scale=2.0 / E)
        return rec

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """CondConv as timm runs it: sigmoid routing, ``mm`` with the flattened experts, one batch-folded
        grouped convolution."""
        r = self.routing_weights(x).to(self.weight.dtype)
        weight = torch.mm(r, self.weight.reshape(self.num_experts, -1))
        out = folded_conv(x, weight.reshape(-1, self.in_channels // self.groups, *self.kernel_size), self.stride,
                          self.padding, self.dilation, self.groups)
        if self.bias is not None:
            out = out + torch.mm(r, self.bias).to(out.dtype).reshape(x.shape[0], -1, 1, 1)
        return out

    def extra_repr(self) -> str:
        return super().extra_repr() + f', num_experts={self.num_experts}'
