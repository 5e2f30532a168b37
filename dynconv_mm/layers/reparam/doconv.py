"""DO-Conv: depth-wise over-parameterized convolution.

Cao et al., "DO-Conv: Depthwise Over-parameterized Convolutional Layer", IEEE TIP 2022
(arXiv 2006.12030). The kernel of an ``M x N`` convolution is the product of a conventional
weight ``W`` and a per-input-channel depth-wise matrix ``D``; during training both are learned,
for inference their product is one plain kernel.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dynconv_mm.registry import register

from ..base import StaticInit, copy_static_bias, set_param, to_tuple
from .fuse import KernelBias, ReparamMixin

__all__ = ['DOConv2d', 'doconv_diagonal']


def doconv_diagonal(in_channels: int, mn: int, d_mul: int, dtype: Optional[torch.dtype] = None,
                    device: Optional[torch.device] = None) -> Tensor:
    """The fixed identity part of ``D``: ``(C_in, MN, D_mul)``, the ``MN x MN`` identity repeated
    ``D_mul // MN`` times along the last axis, then ``D_mul % MN`` zero columns."""
    eye = torch.eye(mn, dtype=dtype, device=device)
    reps = [eye] * (d_mul // mn)
    if d_mul % mn:
        reps.append(torch.zeros(mn, d_mul % mn, dtype=dtype, device=device))
    return torch.cat(reps, dim=1).unsqueeze(0).expand(in_channels, -1, -1).contiguous()


@register('conv')
class DOConv2d(ReparamMixin, nn.Module):
    """Depth-wise over-parameterized 2-D convolution (a drop-in ``nn.Conv2d``).

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode:
            as ``nn.Conv2d`` (``groups``: 1 = DO-Conv, ``in_channels`` = DO-DConv, otherwise DO-GConv).
        D_mul: depth multiplier of the over-parameterization (default and minimum ``M*N``; ignored,
            i.e. ``M*N``, for 1x1 kernels).
        deploy: build the inference form (one ``nn.Conv2d`` named ``reparam``) directly.

    Parameters (training form), with ``MN = M*N``:
        ``W (C_out, C_in/g, D_mul)``, ``D (C_in, MN, D_mul)`` (zero-initialised, absent if ``MN == 1``),
        ``bias (C_out,)``. The kernel is
        ``K[o, i, m] = sum_s (D + I_D)[i, m, s] * W'[o, i, s]`` with ``W'`` = ``W`` *reshaped* (not
        transposed) to ``(C_out/g, C_in, D_mul)`` and ``K`` reshaped to ``(C_out, C_in/g, M, N)``. For
        ``g = 1`` this is the paper's ``D o W``; for ``g > 1`` the reshapes are the official layer's
        fixed re-indexing, reproduced exactly so that official weights load.

    ``I_D`` (:func:`doconv_diagonal`) is the constant identity part of ``D``. The official layer keeps it
    as a ``requires_grad=False`` Parameter named ``d_diag``; here it is a non-persistent buffer
    ``d_diag``: it is derived from the shape, so it is neither trained, counted as a parameter, nor
    saved, and the converter drops the official ``d_diag`` key after checking its value.

    Shapes: input ``(B, C_in, H, W)`` -> output ``(B, C_out, H', W')`` as ``nn.Conv2d``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Union[int, Tuple[int, int]],
                 D_mul: Optional[int] = None, stride=1, padding=0, dilation=1, groups: int = 1, bias: bool = True,
                 padding_mode: str = 'zeros', deploy: bool = False):
        super().__init__()
        if groups < 1 or in_channels % groups or out_channels % groups:
            raise ValueError(f'DOConv2d: in_channels {in_channels} and out_channels {out_channels} must be divisible '
                             f'by groups {groups}')
        if padding_mode not in ('zeros', 'reflect', 'replicate', 'circular'):
            raise ValueError(f'DOConv2d: unknown padding_mode {padding_mode!r}')
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size = to_tuple(kernel_size, 2, 'kernel_size', 'DOConv2d', minimum=1)
        self.stride = to_tuple(stride, 2, 'stride', 'DOConv2d', minimum=1)
        self.padding = to_tuple(padding, 2, 'padding', 'DOConv2d', minimum=0)
        self.dilation = to_tuple(dilation, 2, 'dilation', 'DOConv2d', minimum=1)
        self.padding_mode = padding_mode
        m, n = self.kernel_size
        mn = m * n
        if D_mul is not None and mn > 1 and D_mul < mn:
            raise ValueError(f'DOConv2d: D_mul must be >= kernel height * width = {mn}, got {D_mul}')
        self.D_mul = mn if D_mul is None or mn <= 1 else int(D_mul)
        if deploy:
            self._init_deploy((out_channels, in_channels // groups, m, n), bias=bias)
            return
        self.W = nn.Parameter(torch.empty(out_channels, in_channels // groups, self.D_mul))
        nn.init.kaiming_uniform_(self.W, a=math.sqrt(5))
        if mn > 1:
            self.D = nn.Parameter(torch.zeros(in_channels, mn, self.D_mul))
            self.register_buffer('d_diag', doconv_diagonal(in_channels, mn, self.D_mul), persistent=False)
        if bias:
            self.bias = nn.Parameter(torch.empty(out_channels))
            bound = 1 / math.sqrt((in_channels // groups) * self.D_mul)
            nn.init.uniform_(self.bias, -bound, bound)
        else:
            self.register_parameter('bias', None)

    def kernel(self) -> Tensor:
        """The equivalent conv kernel ``(C_out, C_in/g, M, N)`` (differentiable)."""
        m, n = self.kernel_size
        shape = (self.out_channels, self.in_channels // self.groups, m, n)
        if m * n == 1:
            return self.W.reshape(shape)
        w = self.W.reshape(self.out_channels // self.groups, self.in_channels, self.D_mul)
        return torch.einsum('ims,ois->oim', self.D + self.d_diag, w).reshape(shape)

    def fused_kernel_bias(self) -> KernelBias:
        return self.kernel(), self.bias

    def _deploy_conv_kwargs(self) -> dict:
        return dict(stride=self.stride, padding=self.padding, dilation=self.dilation, groups=self.groups,
                    padding_mode=self.padding_mode)

    def _training_attrs(self) -> Sequence[str]:
        return ('W', 'D', 'd_diag', 'bias')

    def forward(self, x: Tensor) -> Tensor:
        if self.deploy:
            return self.reparam(x)
        weight = self.kernel()
        if self.padding_mode != 'zeros':
            ph, pw = self.padding
            x = F.pad(x, (pw, pw, ph, ph), mode=self.padding_mode)
            return F.conv2d(x, weight, self.bias, self.stride, 0, self.dilation, self.groups)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)

    @classmethod
    def accepts(cls, spec) -> Optional[str]:
        if spec.dims != 2:
            return f'{cls.__name__} takes 2-D convolutions, not {spec.dims}-D'
        return None  # any padding mode

    def _init_from_static(self, weight: Tensor, bias: Optional[Tensor]) -> StaticInit:
        """``W`` into the identity part of ``W``, ``D = 0``: exact."""
        rec = StaticInit(True, 'exact: D = 0, W in the identity part')
        mn = self.kernel_size[0] * self.kernel_size[1]
        new = torch.zeros_like(self.W)
        new[..., :mn] = weight.reshape(self.out_channels, -1, mn)
        set_param(self, 'W', new)
        rec.from_static.append('W')
        if hasattr(self, 'D'):
            with torch.no_grad():
                self.D.zero_()
            rec.by_rule['D'] = 'zero'
        copy_static_bias(self, bias, rec)
        return rec

    def init_weights(self) -> None:
        """Keep the layer's own initialisation (OpenMMLab init passes call this instead of re-initialising)."""

    def extra_repr(self) -> str:
        s = (f'{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, D_mul={self.D_mul}, '
             f'stride={self.stride}')
        if self.padding != (0, 0):
            s += f', padding={self.padding}'
        if self.dilation != (1, 1):
            s += f', dilation={self.dilation}'
        if self.groups != 1:
            s += f', groups={self.groups}'
        if self.padding_mode != 'zeros':
            s += f', padding_mode={self.padding_mode}'
        return s + (', deploy=True' if self.deploy else '')
