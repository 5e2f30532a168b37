"""DBB: Diverse Branch Block.

Ding et al., "Diverse Branch Block: Building a Convolution as an Inception-like Unit", CVPR 2021
(arXiv 2103.13425). Four conv+BN branches (k x k; 1x1; 1x1 -> average pooling; 1x1 -> k x k) are summed
in training and folded into one k x k conv for deployment.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dynconv_mm.registry import register

from ..base import StaticInit, StaticInitError, identity_batch_norm, set_param, silence_batch_norm
from .fuse import (
    ConvNorm,
    KernelBias,
    ReparamMixin,
    avg_pool_kernel,
    build_act,
    build_norm,
    compose_1x1_kxk,
    fuse_conv_norm,
    norm_output_bias,
    pad_kernel,
    sum_branches,
)

__all__ = ['DBB', 'NormAndPad', 'IdentityConv1x1']


class NormAndPad(nn.Module):
    """A BatchNorm followed by padding with the value the norm outputs for zero (``bn`` key as the official
    ``BNAndPadLayer``). It makes a following unpadded k x k conv see what a padded conv of the un-normalised
    input would see, so that 1x1 -> BN -> k x k folds exactly into one k x k conv."""

    def __init__(self, pad: int, channels: int, norm_cfg: dict = dict(type='BN')):
        super().__init__()
        self.pad = pad
        self.bn = build_norm(norm_cfg, channels)

    def forward(self, x: Tensor) -> Tensor:
        x = self.bn(x)
        if self.pad == 0:
            return x
        value = norm_output_bias(self.bn).detach().reshape(1, -1, 1, 1)
        return F.pad(x - value, [self.pad] * 4) + value


class IdentityConv1x1(nn.Module):
    """1x1 conv whose kernel is ``weight + identity`` (``weight (C, C/g, 1, 1)`` starts at zero)."""

    def __init__(self, channels: int, groups: int = 1):
        super().__init__()
        ig = channels // groups
        self.groups = groups
        self.weight = nn.Parameter(torch.zeros(channels, ig, 1, 1))
        ident = torch.zeros(channels, ig, 1, 1)
        idx = torch.arange(channels)
        ident[idx, idx % ig] = 1
        self.register_buffer('id_tensor', ident, persistent=False)

    def kernel(self) -> Tensor:
        return self.weight + self.id_tensor

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.kernel(), None, 1, 0, 1, self.groups)


@register('conv')
class DBB(ReparamMixin, nn.Module):
    """Diverse Branch Block (official ``DBB`` key names: ``dbb_origin``, ``dbb_1x1``, ``dbb_avg``, ``dbb_1x1_kxk``).

    Branches (each ends in a norm): ``dbb_origin`` k x k conv; ``dbb_1x1`` 1x1 conv (if ``groups < C_out``);
    ``dbb_avg`` 1x1 conv -> norm-and-pad -> k x k average pooling (only the pooling when
    ``groups >= C_out``) -> ``avgbn``; ``dbb_1x1_kxk`` 1x1 (identity-based when ``T == C_in``) -> norm-and-pad
    -> k x k conv -> norm, with ``T = C_in`` if ``groups < C_out`` else ``2 C_in``.

    Args:
        in_channels, out_channels, kernel_size, stride, groups: as ``nn.Conv2d``.
        padding: must be ``k // 2`` (default); dilation must be 1 (the pooling branch is not dilated).
        bias: must be False (the branch norms provide the bias).
        internal_channels_1x1_3x3: ``T``.
        norm_cfg: the branch norms (BatchNorm-type). The branch norms are the method, so they are always
            present; used through ``conv_cfg``, a stock norm after the block normalises the sum.
        act_cfg: optional activation after the sum (the official ``nonlinear``).
        single_init: start with only the k x k branch (other branches' final norm weights 0).
        deploy: build the inference form (``reparam``, one ``nn.Conv2d`` with bias) directly.

    Shapes: ``(B, C_in, H, W) -> (B, C_out, H', W')``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 padding: Optional[int] = None, dilation: int = 1, groups: int = 1, bias: bool = False,
                 internal_channels_1x1_3x3: Optional[int] = None, norm_cfg: dict = dict(type='BN'),
                 act_cfg: Optional[dict] = None, single_init: bool = False, deploy: bool = False):
        super().__init__()
        if isinstance(kernel_size, (tuple, list)):
            if kernel_size[0] != kernel_size[1]:
                raise ValueError(f'DBB: only square kernels are supported, got {kernel_size}')
            kernel_size = kernel_size[0]
        if padding is None:
            padding = kernel_size // 2
        if padding != kernel_size // 2:
            raise ValueError(f'DBB: padding must be kernel_size // 2 = {kernel_size // 2}, got {padding}')
        if dilation != 1:
            raise ValueError(f'DBB: dilation must be 1 (the average-pooling branch cannot be dilated), got {dilation}')
        if groups < 1 or in_channels % groups or out_channels % groups:
            raise ValueError(f'DBB: channels {in_channels}, {out_channels} not divisible by groups {groups}')
        if bias:
            raise ValueError('DBB: bias=True is not supported (the branch norms provide the bias)')
        if norm_cfg is None:
            raise ValueError('DBB: norm_cfg must not be None (every branch ends in a norm)')
        if groups >= out_channels and in_channels != out_channels:
            raise ValueError(f'DBB: with groups >= out_channels the pooling branch needs in_channels == out_channels, '
                             f'got {in_channels} -> {out_channels}')
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, kernel_size
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups
        self.act = build_act(act_cfg)
        if deploy:
            self._init_deploy((out_channels, in_channels // groups, kernel_size, kernel_size), bias=True)
            return
        self.dbb_origin = ConvNorm(in_channels, out_channels, kernel_size, stride, padding, 1, groups,
                                   norm_cfg=norm_cfg)
        self.dbb_avg = nn.Sequential()
        if groups < out_channels:
            self.dbb_avg.add_module('conv', nn.Conv2d(in_channels, out_channels, 1, 1, 0, groups=groups, bias=False))
            self.dbb_avg.add_module('bn', NormAndPad(padding, out_channels, norm_cfg))
            self.dbb_avg.add_module('avg', nn.AvgPool2d(kernel_size, stride, 0))
            self.dbb_1x1 = ConvNorm(in_channels, out_channels, 1, stride, 0, 1, groups, norm_cfg=norm_cfg)
        else:
            self.dbb_avg.add_module('avg', nn.AvgPool2d(kernel_size, stride, padding))
            self.dbb_1x1 = None
        self.dbb_avg.add_module('avgbn', build_norm(norm_cfg, out_channels))
        t = internal_channels_1x1_3x3
        if t is None:
            t = in_channels if groups < out_channels else 2 * in_channels
        if t % groups:
            raise ValueError(f'DBB: internal_channels_1x1_3x3 {t} not divisible by groups {groups}')
        self.dbb_1x1_kxk = nn.Sequential()
        if t == in_channels:
            self.dbb_1x1_kxk.add_module('idconv1', IdentityConv1x1(in_channels, groups))
        else:
            self.dbb_1x1_kxk.add_module('conv1', nn.Conv2d(in_channels, t, 1, 1, 0, groups=groups, bias=False))
        self.dbb_1x1_kxk.add_module('bn1', NormAndPad(padding, t, norm_cfg))
        self.dbb_1x1_kxk.add_module('conv2', nn.Conv2d(t, out_channels, kernel_size, stride, 0, groups=groups,
                                                       bias=False))
        self.dbb_1x1_kxk.add_module('bn2', build_norm(norm_cfg, out_channels))
        if single_init:
            with torch.no_grad():
                for norm in (self.dbb_avg.avgbn, self.dbb_1x1_kxk.bn2) + ((self.dbb_1x1.bn,) if self.dbb_1x1 else ()):
                    norm.weight.zero_()

    def fused_kernel_bias(self) -> KernelBias:
        k = self.kernel_size
        branches = [self.dbb_origin.fused_kernel_bias()]
        if self.dbb_1x1 is not None:
            k1, b1 = self.dbb_1x1.fused_kernel_bias()
            branches.append((pad_kernel(k1, k), b1))
        seq = self.dbb_1x1_kxk
        first = seq.idconv1.kernel() if hasattr(seq, 'idconv1') else seq.conv1.weight
        k1, b1 = fuse_conv_norm(first, None, seq.bn1.bn)
        k2, b2 = fuse_conv_norm(seq.conv2.weight, None, seq.bn2)
        branches.append(compose_1x1_kxk(k1, b1, k2, b2, self.groups))
        avg = avg_pool_kernel(self.out_channels, k, self.groups, k2.dtype, k2.device)
        k2, b2 = fuse_conv_norm(avg, None, self.dbb_avg.avgbn)
        if hasattr(self.dbb_avg, 'conv'):
            k1, b1 = fuse_conv_norm(self.dbb_avg.conv.weight, None, self.dbb_avg.bn.bn)
            branches.append(compose_1x1_kxk(k1, b1, k2, b2, self.groups))
        else:
            branches.append((k2, b2))
        return sum_branches(branches)

    def _deploy_conv_kwargs(self) -> dict:
        return dict(stride=self.stride, padding=self.padding, dilation=self.dilation, groups=self.groups)

    def _training_attrs(self) -> Sequence[str]:
        return ('dbb_origin', 'dbb_1x1', 'dbb_avg', 'dbb_1x1_kxk')

    def forward(self, x: Tensor) -> Tensor:
        if self.deploy:
            out = self.reparam(x)
        else:
            out = self.dbb_origin(x) + self.dbb_avg(x) + self.dbb_1x1_kxk(x)
            if self.dbb_1x1 is not None:
                out = out + self.dbb_1x1(x)
        return out if self.act is None else self.act(out)

    @classmethod
    def accepts(cls, spec) -> Optional[str]:
        k = spec.kernel_size
        if len(set(k)) != 1 or tuple(spec.padding) != (k[0] // 2,) * len(k) or set(spec.dilation) != {1}:
            return f'{cls.__name__} takes square kernels with padding k // 2 and no dilation'
        if spec.bias:
            return f'{cls.__name__} has no bias (its branch norms provide one)'
        if spec.groups >= spec.out_channels and spec.in_channels != spec.out_channels:
            return f'{cls.__name__} with groups >= out_channels needs in_channels == out_channels'
        return super().accepts(spec)

    def _init_from_static(self, weight: Tensor, bias: Optional[Tensor]) -> StaticInit:
        """Origin conv ``= W`` with an identity BatchNorm, the other branches' last norms ``gamma = beta = 0``:
        exact (up to the block's own activation)."""
        if bias is not None:
            raise StaticInitError('DBB has no bias; the static convolution has one')
        rec = StaticInit(self.act is None, 'exact: origin conv = W with an identity BN, the other branches silenced')
        set_param(self, 'dbb_origin.conv.weight', weight)
        rec.from_static.append('dbb_origin.conv.weight')
        identity_batch_norm(self, 'dbb_origin.bn', rec)
        silence_batch_norm(self, 'dbb_avg.avgbn', rec)
        silence_batch_norm(self, 'dbb_1x1_kxk.bn2', rec)
        if self.dbb_1x1 is not None:
            silence_batch_norm(self, 'dbb_1x1.bn', rec)
        return rec

    def init_weights(self) -> None:
        """Keep the layer's own initialisation."""
