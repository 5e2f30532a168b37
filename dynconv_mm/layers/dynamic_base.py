"""Constructor checks and attributes shared by the ``nn.Conv2d``-like dynamic layers
(:class:`PEDConv2d`, :class:`CondConv2d`, :class:`DyConv2d`, :class:`ODConv2d`), and
:func:`mix_kernels`, the per-sample mixture of ``K`` static kernels the last three compute.

The layers take ``nn.Conv2d``'s positional signature ``(in_channels, out_channels, kernel_size,
stride, padding, dilation, groups, bias)`` so that ``mmcv.cnn.build_conv_layer`` (and therefore
``conv_cfg=dict(type=...)`` in any OpenMMLab backbone) builds them, and expose the attributes
mmcv's ``ConvModule`` reads (``in_channels``, ``kernel_size``, ``transposed``, ...).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .base import IntOrTuple, LayerProtocol, to_tuple
from .batched import IMPLS

__all__ = ['DynamicConv2dBase', 'mix_kernels', 'folded_conv', 'resolve_num_experts']

IntOrPair = IntOrTuple


def resolve_num_experts(layer: str, num_experts: Optional[int], alias: str, alias_value: Optional[int],
                        default: int = 4) -> int:
    """The number of kernels ``K`` mixed per sample: ``num_experts``, or the method's own keyword
    ``alias`` (``kernel_num`` for ODConv, as the official code; ``num_kernels`` for DY-Conv). Giving
    both with different values is an error."""
    if num_experts is not None and alias_value is not None and num_experts != alias_value:
        raise ValueError(f'{layer}: num_experts={num_experts!r} and {alias}={alias_value!r} name the same '
                         'setting; give one of them')
    value = num_experts if num_experts is not None else alias_value if alias_value is not None else default
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f'{layer}: num_experts must be a positive int, got {value!r}')
    return value


def mix_kernels(coefficients: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    """Per-sample kernels ``sum_k coefficients[b, k] * kernels[k]``.

    Args:
        coefficients: ``(B, K)`` mixing weights (expert routing, kernel attention).
        kernels: ``(K, *shape)`` static kernels (or biases).

    Returns:
        ``(B, *shape)``, computed as one ``(B, K) @ (K, prod(shape))`` matrix product (faster on the
        CPU than the equivalent ``einsum``, which runs as a batched product: ``docs/benchmark.md``).
    """
    if coefficients.dim() != 2 or coefficients.shape[1] != kernels.shape[0]:
        raise ValueError(f'mix_kernels: coefficients must be (B, K={kernels.shape[0]}), '
                         f'got {tuple(coefficients.shape)}')
    mixed = torch.mm(coefficients, kernels.reshape(kernels.shape[0], -1))
    return mixed.reshape(-1, *kernels.shape[1:])


class DynamicConv2dBase(LayerProtocol, nn.Module):
    """Validated convolution geometry of a dynamic 2-D convolution.

    Raises ``ValueError`` naming the layer and the bad value for non-positive channels, groups that
    do not divide both channel counts, string or negative padding, an unknown ``impl``, and so on.
    """

    has_reference = True

    def __init__(self,
                 in_channels: int,
                 out_channels: int,
                 kernel_size: IntOrPair,
                 stride: IntOrPair = 1,
                 padding: IntOrPair = 0,
                 dilation: IntOrPair = 1,
                 groups: int = 1,
                 impl: str = 'auto') -> None:
        super().__init__()
        layer = type(self).__name__
        for name, v in (('in_channels', in_channels), ('out_channels', out_channels), ('groups', groups)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f'{layer}: {name} must be a positive int, got {v!r}')
        if in_channels % groups or out_channels % groups:
            raise ValueError(f'{layer}: groups={groups} must divide in_channels={in_channels} and '
                             f'out_channels={out_channels}')
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = to_tuple(kernel_size, 2, 'kernel_size', layer, minimum=1)
        self.stride = to_tuple(stride, 2, 'stride', layer, minimum=1)
        self.padding = to_tuple(padding, 2, 'padding', layer, minimum=0)
        self.dilation = to_tuple(dilation, 2, 'dilation', layer, minimum=1)
        self.groups = groups
        if impl not in IMPLS:
            raise ValueError(f'{layer}: impl must be one of {IMPLS}, got {impl!r}')
        self.impl = impl
        # attributes mmcv's ConvModule copies from its conv
        self.transposed = False
        self.output_padding = (0, 0)

    @property
    def num_kernel_elements(self) -> int:
        return self.kernel_size[0] * self.kernel_size[1]

    def conv_kwargs(self) -> dict:
        """Keyword arguments for :func:`dynconv_mm.layers.batched.batched_conv`."""
        return dict(stride=self.stride, padding=self.padding, dilation=self.dilation, groups=self.groups,
                    impl=self.impl)

    def extra_repr(self) -> str:
        s = (f'{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, '
             f'padding={self.padding}')
        if self.dilation != (1, 1):
            s += f', dilation={self.dilation}'
        if self.groups != 1:
            s += f', groups={self.groups}'
        if getattr(self, 'bias', None) is None:
            s += ', bias=False'
        return s


def folded_conv(x: torch.Tensor, weight: torch.Tensor, stride, padding, dilation, groups: int) -> torch.Tensor:
    """The official implementations' batch-folded grouped convolution: ``x (B, C_in, H, W)``,
    ``weight (B * C_out, C_in / groups, kh, kw)`` -> ``(B, C_out, H', W')`` as one convolution of
    ``groups * B`` groups (what the layers' :meth:`reference_forward` run)."""
    B = x.shape[0]
    out = F.conv2d(x.reshape(1, -1, *x.shape[2:]), weight.to(x.dtype), None, stride, padding, dilation, groups * B)
    return out.reshape(B, -1, *out.shape[2:])
