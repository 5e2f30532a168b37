"""RepVGG block.

Ding et al., "RepVGG: Making VGG-style ConvNets Great Again", CVPR 2021 (arXiv 2101.03697).
Training: ``act(se(BN(conv_kxk(x)) + BN(conv_1x1(x)) + BN(x)))``; deployment: ``act(se(conv_kxk(x)))``.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from dynconv_mm.registry import register

from ..base import (
    ExtraMacs,
    StaticInit,
    StaticInitError,
    identity_batch_norm,
    pooling_adds,
    set_param,
    silence_batch_norm,
)
from .fuse import (
    ConvNorm,
    KernelBias,
    ReparamMixin,
    build_act,
    build_norm,
    fuse_conv_norm,
    identity_kernel,
    pad_kernel,
    sum_branches,
)

__all__ = ['RepVGGBlock', 'SEBlock']


class SEBlock(nn.Module):
    """Squeeze-and-excitation as in the RepVGG code: ``x * sigmoid(up(relu(down(mean_hw(x)))))``
    (``down``: C -> max(1, C/16) 1x1 conv with bias, ``up``: back)."""

    def __init__(self, channels: int, internal: int):
        super().__init__()
        self.down = nn.Conv2d(channels, internal, 1, bias=True)
        self.up = nn.Conv2d(internal, channels, 1, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        s = x.mean((2, 3), keepdim=True)
        return x * torch.sigmoid(self.up(torch.relu(self.down(s))))


@register('conv')
class RepVGGBlock(ReparamMixin, nn.Module):
    """RepVGG block (official ``RepVGGBlock`` key names: ``rbr_dense``, ``rbr_1x1``, ``rbr_identity``, ``se``).

    Args:
        in_channels, out_channels, kernel_size (odd, default 3), stride, dilation, groups: as ``nn.Conv2d``.
        padding: must be ``dilation * (k // 2)`` (the default), so that the 1x1 and identity branches
            align with the kernel centre.
        bias: must be False (the branch norms provide the bias).
        norm_cfg: the branch norms (BatchNorm-type, needed for folding).
        act_cfg: activation after the sum (official: ReLU, the default); ``None`` for none.
        use_se: squeeze-and-excitation after the sum (kept after deployment).
        deploy: build the inference form (``reparam``, one ``nn.Conv2d`` with bias) directly.

    Shapes: ``(B, C_in, H, W) -> (B, C_out, H', W')``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 padding: Optional[int] = None, dilation: int = 1, groups: int = 1, bias: bool = False,
                 norm_cfg: dict = dict(type='BN'), act_cfg: Optional[dict] = dict(type='ReLU'), use_se: bool = False,
                 deploy: bool = False):
        super().__init__()
        name = type(self).__name__
        if isinstance(kernel_size, (tuple, list)):
            if kernel_size[0] != kernel_size[1]:
                raise ValueError(f'{name}: only square kernels are supported, got {kernel_size}')
            kernel_size = kernel_size[0]
        if kernel_size % 2 == 0:
            raise ValueError(f'{name}: kernel_size must be odd, got {kernel_size}')
        if padding is None:
            padding = dilation * (kernel_size // 2)
        centred = dilation * (kernel_size // 2)
        if padding != centred:
            raise ValueError(f'{name}: padding must be dilation * (kernel_size // 2) = {centred}, got {padding}')
        if groups < 1 or in_channels % groups or out_channels % groups:
            raise ValueError(f'{name}: channels {in_channels}, {out_channels} not divisible by groups {groups}')
        if bias:
            raise ValueError(f'{name}: bias=True is not supported (the branch norms provide the bias)')
        if norm_cfg is None:
            raise ValueError(f'{name}: norm_cfg must not be None (the branches are conv + norm)')
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, kernel_size
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups
        self.act = build_act(act_cfg)
        self.se = SEBlock(out_channels, max(1, out_channels // 16)) if use_se else None
        if deploy:
            self._init_deploy((out_channels, in_channels // groups, kernel_size, kernel_size), bias=True)
            return
        self.rbr_identity = build_norm(norm_cfg, in_channels) if in_channels == out_channels and stride == 1 else None
        self.rbr_dense = self._build_dense(in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                                           norm_cfg)
        self.rbr_1x1 = ConvNorm(in_channels, out_channels, 1, stride, 0, 1, groups, norm_cfg=norm_cfg)

    def _build_dense(self, in_channels, out_channels, kernel_size, stride, padding, dilation, groups, norm_cfg):
        return ConvNorm(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, norm_cfg=norm_cfg)

    def fused_kernel_bias(self) -> KernelBias:
        branches = [self.rbr_dense.fused_kernel_bias()]
        k1, b1 = self.rbr_1x1.fused_kernel_bias()
        branches.append((pad_kernel(k1, self.kernel_size), b1))
        if self.rbr_identity is not None:
            ident = identity_kernel(self.in_channels, self.groups, self.kernel_size, k1.dtype, k1.device)
            branches.append(fuse_conv_norm(ident, None, self.rbr_identity))
        return sum_branches(branches)

    def _deploy_conv_kwargs(self) -> dict:
        return dict(stride=self.stride, padding=self.padding, dilation=self.dilation, groups=self.groups)

    def _training_attrs(self) -> Sequence[str]:
        return ('rbr_dense', 'rbr_1x1', 'rbr_identity')

    def forward(self, x: Tensor) -> Tensor:
        if self.deploy:
            out = self.reparam(x)
        else:
            out = self.rbr_dense(x) + self.rbr_1x1(x)
            if self.rbr_identity is not None:
                out = out + self.rbr_identity(x)
        if self.se is not None:
            out = self.se(out)
        return out if self.act is None else self.act(out)

    @classmethod
    def accepts(cls, spec) -> Optional[str]:
        k = spec.kernel_size
        if len(set(k)) != 1 or k[0] % 2 == 0 or len(set(spec.dilation)) != 1:
            return f'{cls.__name__} takes square odd kernels only'
        if tuple(spec.padding) != spec.same_padding:
            return f'{cls.__name__} needs "same" padding dilation * (k // 2)'
        if spec.bias:
            return f'{cls.__name__} has no bias (its branch norms provide one)'
        return super().accepts(spec)

    def extra_macs(self, in_shape: Sequence[int], out_shape: Sequence[int]) -> ExtraMacs:
        """The squeeze-and-excitation after the sum, where the block has one (kept after deployment)."""
        if self.se is None:
            return ExtraMacs()
        att = self.se.down.weight.numel() + self.se.up.weight.numel()
        return ExtraMacs(pooling=pooling_adds(out_shape), attention=att, assembly=math.prod(out_shape))

    def _init_from_static(self, weight: Tensor, bias: Optional[Tensor]) -> StaticInit:
        """Dense conv ``= W`` with an identity BatchNorm, the 1x1 and identity branches silenced: exact up
        to the block's own activation (and SE)."""
        if bias is not None:
            raise StaticInitError(f'{type(self).__name__} has no bias; the static convolution has one')
        exact = self.act is None and self.se is None
        rec = StaticInit(exact, ('exact' if exact else "exact up to the block's own activation") +
                         ': dense conv = W with an identity BN, 1x1 and identity branches silenced')
        dense = self.rbr_dense
        if hasattr(dense, 'conv'):
            set_param(self, 'rbr_dense.conv.weight', weight)
            rec.from_static.append('rbr_dense.conv.weight')
        else:  # an OREPA kernel as the dense branch
            from .orepa import orepa_origin_only
            set_param(self, 'rbr_dense.weight_orepa_origin', weight)
            rec.from_static.append('rbr_dense.weight_orepa_origin')
            orepa_origin_only(dense)
            rec.by_rule['rbr_dense.vector'] = 'origin branch 1, other branches 0'
        identity_batch_norm(self, 'rbr_dense.bn', rec)
        silence_batch_norm(self, 'rbr_1x1.bn', rec)
        if self.rbr_identity is not None:
            silence_batch_norm(self, 'rbr_identity', rec)
        return rec

    def init_weights(self) -> None:
        """Keep the layer's own initialisation."""
