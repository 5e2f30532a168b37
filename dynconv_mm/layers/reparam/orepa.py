"""OREPA: online convolutional re-parameterization.

Hu et al., "Online Convolutional Re-parameterization", CVPR 2022 (arXiv 2204.00826). During
training an OREPA layer builds its kernel from several linearly scaled branches (no per-branch
norm), so a training step costs one convolution; for deployment the kernel (and the norm after it)
is frozen into one ``nn.Conv2d``.

Layers (all registered for ``conv_cfg=dict(type=...)``):

* :class:`OREPA` -- the k x k layer with six branches;
* :class:`OREPA_1x1` -- the 1x1 layer (identity-expanded linear branch);
* :class:`OREPA_LargeConv` -- k >= 5 (the 7x7 ResNet stem), a k x k kernel composed from 3x3 OREPA kernels;
* :class:`RepVGGBlock_OREPA` -- the RepVGG block whose 3x3 branch is an OREPA kernel.

**Norm convention.** The official blocks contain their BatchNorm (and activation). Here the
output norm and activation are options: ``norm_cfg=None`` (the default) makes the layer a pure
convolution that drops into any ``conv_cfg`` position in front of the stock norm layer; with
``norm_cfg=dict(type='BN')`` (and ``act_cfg``) the layer is the official conv+BN(+act) block.
Deployment folds whatever the layer contains: conv only -> ``Conv2d`` (bias only if ``bias=True``),
conv+BN -> ``Conv2d`` with bias. See ``docs/reparam.md``.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dynconv_mm.registry import register

from ..base import StaticInit, copy_static_bias, identity_batch_norm, set_param
from .fuse import (
    KernelBias,
    ReparamMixin,
    build_act,
    build_norm,
    compose_1x1_kxk,
    fuse_conv_norm,
    pad_kernel,
)
from .repvgg import RepVGGBlock

__all__ = ['OREPA', 'OREPA_1x1', 'OREPA_LargeConv', 'RepVGGBlock_OREPA', 'OREPA3x3RepVGG', 'orepa_prior',
           'dwsc_to_full']


def orepa_prior(out_channels: int, kernel_size: int, dtype: Optional[torch.dtype] = None) -> Tensor:
    """The frequency prior ``P (C_out, k, k)`` of OREPA's prior branch (a DCT-like basis).

    ``P[o, h, w] = cos(pi (h + 1/2)(o + 1) / k)`` for ``o < C_out / 2``, else
    ``cos(pi (w + 1/2)(o + 1 - C_out / 2) / k)``. For ``k = 3`` this is the official prior exactly.
    The official layer writes only ``h, w < 3`` and leaves the other entries of larger kernels
    uninitialised; here every position uses the ``k``-point basis, so the branch is well defined
    for any ``k``.
    """
    o = torch.arange(out_channels, dtype=torch.float64).reshape(-1, 1, 1)
    pos = (torch.arange(kernel_size, dtype=torch.float64) + 0.5)
    half = out_channels / 2
    rows = torch.cos(math.pi * pos.reshape(1, -1, 1) * (o + 1) / kernel_size).expand(-1, -1, kernel_size)
    cols = torch.cos(math.pi * pos.reshape(1, 1, -1) * (o + 1 - half) / kernel_size).expand(-1, kernel_size, -1)
    prior = torch.where(o < half, rows, cols)
    return prior.to(dtype or torch.get_default_dtype())


def dwsc_to_full(dw: Tensor, pw: Tensor, in_channels: int, groups: int = 1) -> Tensor:
    """Kernel of a depth-wise kxk conv ``dw (E*I, 1, k, k)`` followed by a point-wise conv
    ``pw (O, E*I/g, 1, 1)`` with ``g`` groups, as one ``(O, I/g, k, k)`` kernel.

    Reproduces the official index order: for ``g > 1`` point-wise row ``a*g + c`` produces output
    channel ``c*(O/g) + a``.
    """
    t, _, kh, kw = dw.shape
    o = pw.shape[0]
    e = t // in_channels
    per_group = in_channels // groups
    dw = dw.reshape(groups, per_group, e, kh, kw)
    pw = pw.reshape(o // groups, groups, per_group, e)
    return torch.einsum('cgthw,ocgt->coghw', dw, pw).reshape(o, per_group, kh, kw)


def _kaiming(shape: Sequence[int], a: float, scale: float = 1.0) -> nn.Parameter:
    w = torch.empty(*shape)
    nn.init.kaiming_uniform_(w, a=a)
    return nn.Parameter(w * scale)


class _OREPAKernel(nn.Module):
    """Parameters and kernel generator shared by :class:`OREPA` and :class:`OREPA3x3RepVGG`.

    ``style='orepa'`` (six branches, rows of ``vector``: origin, avg, prior, 1x1->kxk, 1x1, dw-separable)
    or ``'repvgg'`` (five branches, no 1x1: origin, avg, prior, 1x1->kxk, dw-separable; point-wise
    without groups). Keys follow the official ``weight_orepa_*`` names in both styles (the converter
    maps the official ``weight_rbr_*`` names of the RepVGG style).
    """

    def _init_kernel(self, in_channels: int, out_channels: int, kernel_size: int, groups: int,
                     internal_channels: Optional[int], style: str, init_para: float = 1.0, init_gamma: float = 1.0,
                     single_init: bool = False) -> None:
        ig, k = in_channels // groups, kernel_size
        a = 0.0 if style == 'orepa' else 1.0
        sp = math.sqrt(init_para)
        self.style = style
        self.weight_orepa_origin = _kaiming((out_channels, ig, k, k), a, init_para)
        self.weight_orepa_avg_conv = _kaiming((out_channels, ig, 1, 1), a, init_para)
        self.weight_orepa_pfir_conv = _kaiming((out_channels, ig, 1, 1), a, init_para)
        self.register_buffer('weight_orepa_prior', orepa_prior(out_channels, k), persistent=False)
        if style == 'orepa':
            self.weight_orepa_1x1 = _kaiming((out_channels, ig, 1, 1), a, init_para)
            if internal_channels is None:
                internal_channels = in_channels if groups <= 4 else 2 * in_channels
            expanded_identity = True      # the official layer keeps an identity part even when T != I
        else:
            if internal_channels is None:
                internal_channels = in_channels if groups < out_channels else 2 * in_channels
            expanded_identity = internal_channels == in_channels
        if internal_channels % groups:
            raise ValueError(f'{type(self).__name__}: internal_channels_1x1_3x3 {internal_channels} not divisible '
                             f'by groups {groups}')
        self.internal_channels = internal_channels
        if expanded_identity:
            self.weight_orepa_1x1_kxk_idconv1 = nn.Parameter(torch.zeros(internal_channels, ig, 1, 1))
            ident = torch.zeros(internal_channels, ig, 1, 1)
            idx = torch.arange(internal_channels)
            ident[idx, idx % ig] = 1
            self.register_buffer('id_tensor', ident, persistent=False)
        else:
            self.weight_orepa_1x1_kxk_conv1 = _kaiming((internal_channels, ig, 1, 1), a)
        self.weight_orepa_1x1_kxk_conv2 = _kaiming((out_channels, internal_channels // groups, k, k), a, init_para)
        expand = 8
        pw_cols = in_channels * expand // groups if style == 'orepa' else in_channels * expand
        self.weight_orepa_gconv_dw = _kaiming((in_channels * expand, 1, k, k), a, sp)
        self.weight_orepa_gconv_pw = _kaiming((out_channels, pw_cols, 1, 1), a, sp)
        inits = [0.25, 0.25, 0.0, 0.5, 1.0, 0.5] if style == 'orepa' else [0.25, 0.25, 0.0, 0.5, 0.5]
        if single_init:
            inits = [1.0] + [0.0] * (len(inits) - 1)
        vec = torch.tensor(inits).reshape(-1, 1).repeat(1, out_channels) * math.sqrt(init_gamma)
        self.vector = nn.Parameter(vec)

    def kernel_attrs(self) -> List[str]:
        return ['weight_orepa_origin', 'weight_orepa_avg_conv', 'weight_orepa_pfir_conv', 'weight_orepa_prior',
                'weight_orepa_1x1', 'weight_orepa_1x1_kxk_idconv1', 'id_tensor', 'weight_orepa_1x1_kxk_conv1',
                'weight_orepa_1x1_kxk_conv2', 'weight_orepa_gconv_dw', 'weight_orepa_gconv_pw', 'vector']

    def weight_gen(self) -> Tensor:
        """The training-time kernel ``(C_out, C_in/g, k, k) = sum_b vector[b] (per out channel) * K_b``."""
        k = int(self.weight_orepa_origin.shape[-1])
        g = self.groups
        v = self.vector.unsqueeze(-1).unsqueeze(-1).unsqueeze(-1)          # (branches, O, 1, 1, 1)
        origin = self.weight_orepa_origin
        avg = self.weight_orepa_avg_conv.expand(-1, -1, k, k) / float(k * k)
        prior = self.weight_orepa_pfir_conv * self.weight_orepa_prior.unsqueeze(1)
        if hasattr(self, 'weight_orepa_1x1_kxk_idconv1'):
            conv1 = self.weight_orepa_1x1_kxk_idconv1 + self.id_tensor
        else:
            conv1 = self.weight_orepa_1x1_kxk_conv1
        one_kxk = compose_1x1_kxk(conv1, None, self.weight_orepa_1x1_kxk_conv2, None, g)[0]
        if self.style == 'orepa':
            dws = dwsc_to_full(self.weight_orepa_gconv_dw, self.weight_orepa_gconv_pw, self.in_channels, g)
            one = pad_kernel(self.weight_orepa_1x1, k)
            return (v[0] * origin + v[1] * avg + v[2] * prior + v[3] * one_kxk + v[4] * one + v[5] * dws)
        dws = dwsc_to_full(self.weight_orepa_gconv_dw, self.weight_orepa_gconv_pw, self.in_channels, 1)
        return v[0] * origin + v[1] * avg + v[2] * prior + v[3] * one_kxk + v[4] * dws


def _init_origin(layer: nn.Module, origin: str, weight: Tensor, bias: Optional[Tensor]) -> StaticInit:
    """Origin branch ``= W``, ``vector`` ``(1, 0, ...)`` (the other branches scaled by 0), an inner
    BatchNorm (if any) the identity: exact."""
    rec = StaticInit(True, 'exact: origin branch = W, the other branches scaled by 0')
    set_param(layer, origin, weight)
    rec.from_static.append(origin)
    orepa_origin_only(layer)
    rec.by_rule['vector'] = 'origin branch 1, other branches 0'
    if getattr(layer, 'bn', None) is not None:
        identity_batch_norm(layer, 'bn', rec)
    copy_static_bias(layer, bias, rec)
    return rec


@torch.no_grad()
def orepa_origin_only(layer: nn.Module) -> None:
    """The branch scales of an OREPA kernel to ``(1, 0, ...)``: only the origin branch counts."""
    layer.vector.zero_()
    layer.vector[0].fill_(1.0)


def _check_common(name: str, in_channels: int, out_channels: int, groups: int) -> None:
    if groups < 1 or in_channels % groups or out_channels % groups:
        raise ValueError(f'{name}: in_channels {in_channels} and out_channels {out_channels} must be divisible by '
                         f'groups {groups}')


class _ConvNormActLayer(ReparamMixin, nn.Module):
    """Shared tail of the OREPA layers: a generated kernel, optional bias, optional norm and activation."""

    def _init_tail(self, out_channels: int, bias: bool, norm_cfg: Optional[dict], act_cfg: Optional[dict]) -> None:
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        self.bn = build_norm(norm_cfg, out_channels)
        self.act = build_act(act_cfg)

    def weight_gen(self) -> Tensor:
        raise NotImplementedError

    def fused_kernel_bias(self) -> KernelBias:
        kernel, bias = self.weight_gen(), self.bias
        if self.bn is not None:
            kernel, bias = fuse_conv_norm(kernel, bias, self.bn)
        return kernel, bias

    def _deploy_conv_kwargs(self) -> dict:
        return dict(stride=self.stride, padding=self.padding, dilation=self.dilation, groups=self.groups)

    def _act(self, x: Tensor) -> Tensor:
        return x if self.act is None else self.act(x)

    def forward(self, x: Tensor) -> Tensor:
        if self.deploy:
            return self._act(self.reparam(x))
        x = F.conv2d(x, self.weight_gen(), self.bias, self.stride, self.padding, self.dilation, self.groups)
        if self.bn is not None:
            x = self.bn(x)
        return self._act(x)

    def init_weights(self) -> None:
        """Keep the layer's own initialisation (OpenMMLab init passes call this instead of re-initialising)."""

    def extra_repr(self) -> str:
        return (f'{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, '
                f'padding={self.padding}, dilation={self.dilation}, groups={self.groups}, deploy={self.deploy}')


@register('conv')
class OREPA(_OREPAKernel, _ConvNormActLayer):
    """OREPA k x k layer (official ``OREPA``): six linearly scaled branches, one conv in training.

    ``W = sum_b vector[b] * K_b`` (``vector (6, C_out)``, per output channel) with the branches
    origin ``(O, I/g, k, k)``; average ``A (O, I/g, 1, 1)`` spread as ``A/k^2`` over the window;
    prior ``F (O, I/g, 1, 1) * P (O, k, k)`` (:func:`orepa_prior`); 1x1 -> k x k
    ``(idconv1 + identity) (T, I/g)`` then ``conv2 (O, T/g, k, k)`` (``T = I`` if ``groups <= 4`` else
    ``2I``); 1x1 ``(O, I/g, 1, 1)`` zero-padded; depth-wise separable ``dw (8I, 1, k, k)`` then
    ``pw (O, 8I/g, 1, 1)`` (:func:`dwsc_to_full`). Initialisation as the official layer
    (``init_hyper_para`` scales the branch weights, ``init_hyper_gamma`` the vector; ``single_init``
    keeps only the origin branch at 1).

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias: as ``nn.Conv2d``
            (``padding`` defaults to ``dilation * (k // 2)``; any padding/dilation is exact since the
            training forward is one convolution).
        internal_channels_1x1_3x3: ``T`` of the 1x1 -> k x k branch.
        norm_cfg: ``None`` (default): conv only, for ``conv_cfg`` use before a stock norm;
            ``dict(type='BN')``: the official block with its BatchNorm (key ``bn``).
        act_cfg: optional activation after the norm (the official ``nonlinear``).
        weight_only: ``forward()`` returns the kernel (used inside :class:`OREPA_LargeConv`).
        deploy: build the inference form (``reparam``, one ``nn.Conv2d``) directly.

    The prior branch's basis is the official one for ``k = 3`` and the ``k``-point generalisation
    otherwise (see :func:`orepa_prior`). Shapes: ``(B, C_in, H, W) -> (B, C_out, H', W')``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 padding: Optional[int] = None, dilation: int = 1, groups: int = 1, bias: bool = False,
                 internal_channels_1x1_3x3: Optional[int] = None, norm_cfg: Optional[dict] = None,
                 act_cfg: Optional[dict] = None, weight_only: bool = False, init_hyper_para: float = 1.0,
                 init_hyper_gamma: float = 1.0, single_init: bool = False, deploy: bool = False):
        nn.Module.__init__(self)
        _check_common('OREPA', in_channels, out_channels, groups)
        if isinstance(kernel_size, (tuple, list)):
            if kernel_size[0] != kernel_size[1]:
                raise ValueError(f'OREPA: only square kernels are supported, got {kernel_size}')
            kernel_size = kernel_size[0]
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, kernel_size
        self.stride, self.dilation, self.groups = stride, dilation, groups
        self.padding = dilation * (kernel_size // 2) if padding is None else padding
        self.weight_only = weight_only
        self._init_tail(out_channels, bias and not deploy, None if weight_only or deploy else norm_cfg, act_cfg)
        if deploy:
            self._init_deploy((out_channels, in_channels // groups, kernel_size, kernel_size),
                              bias=bias or norm_cfg is not None)
            return
        self._init_kernel(in_channels, out_channels, kernel_size, groups, internal_channels_1x1_3x3, 'orepa',
                          init_hyper_para, init_hyper_gamma, single_init)

    def _training_attrs(self) -> Sequence[str]:
        return self.kernel_attrs() + ['bias', 'bn']

    @classmethod
    def accepts(cls, spec) -> Optional[str]:
        if len(set(spec.kernel_size)) != 1 or spec.kernel_size[0] % 2 == 0:
            return f'{cls.__name__} takes square odd kernels only'
        return super().accepts(spec)

    def _init_from_static(self, weight: Tensor, bias: Optional[Tensor]) -> StaticInit:
        return _init_origin(self, 'weight_orepa_origin', weight, bias)

    def forward(self, x: Optional[Tensor] = None) -> Tensor:
        if self.weight_only and not self.deploy:
            return self.weight_gen()
        return _ConvNormActLayer.forward(self, x)


@register('conv')
class OREPA_1x1(_ConvNormActLayer):
    """OREPA 1x1 layer (official ``OREPA_1x1``), ``groups = 1``.

    ``W = vector[0] * origin + vector[1] * (conv2 @ conv1)`` with ``origin (O, I, 1, 1)``; if ``O > I``,
    ``conv1 (I, I, 1, 1)`` starts as the identity and ``conv2 (O, I, 1, 1)`` is random, otherwise
    ``conv1 (O, I, 1, 1)`` is random and ``conv2 (O, O, 1, 1)`` starts as the identity (both trainable).
    ``vector (2, O)`` starts at ``(1, 0.5)``. Args as :class:`OREPA`.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1, stride: int = 1,
                 padding: int = 0, dilation: int = 1, groups: int = 1, bias: bool = False,
                 norm_cfg: Optional[dict] = None, act_cfg: Optional[dict] = None, single_init: bool = False,
                 deploy: bool = False):
        super().__init__()
        if kernel_size not in (1, (1, 1), [1, 1]):
            raise ValueError(f'OREPA_1x1: kernel_size must be 1, got {kernel_size}')
        if groups != 1:
            raise ValueError(f'OREPA_1x1: only groups=1 is supported, got {groups}')
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, 1
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, 1
        self._init_tail(out_channels, bias and not deploy, None if deploy else norm_cfg, act_cfg)
        if deploy:
            self._init_deploy((out_channels, in_channels, 1, 1), bias=bias or norm_cfg is not None)
            return
        self.weight_or1x1_origin = _kaiming((out_channels, in_channels, 1, 1), 1.0)
        if out_channels > in_channels:
            self.weight_or1x1_l2i_conv1 = nn.Parameter(torch.eye(in_channels).reshape(in_channels, in_channels, 1, 1))
            self.weight_or1x1_l2i_conv2 = _kaiming((out_channels, in_channels, 1, 1), 1.0)
        else:
            self.weight_or1x1_l2i_conv1 = _kaiming((out_channels, in_channels, 1, 1), 1.0)
            self.weight_or1x1_l2i_conv2 = nn.Parameter(
                torch.eye(out_channels).reshape(out_channels, out_channels, 1, 1))
        self.vector = nn.Parameter(torch.tensor([[1.0], [0.0 if single_init else 0.5]]).repeat(1, out_channels))

    def weight_gen(self) -> Tensor:
        l2i = compose_1x1_kxk(self.weight_or1x1_l2i_conv1, None, self.weight_or1x1_l2i_conv2, None)[0]
        v = self.vector.reshape(2, -1, 1, 1, 1)
        return v[0] * self.weight_or1x1_origin + v[1] * l2i

    def _training_attrs(self) -> Sequence[str]:
        return ['weight_or1x1_origin', 'weight_or1x1_l2i_conv1', 'weight_or1x1_l2i_conv2', 'vector', 'bias', 'bn']

    @classmethod
    def accepts(cls, spec) -> Optional[str]:
        if any(k != 1 for k in spec.kernel_size) or spec.groups != 1:
            return f'{cls.__name__} takes 1x1 convolutions with groups=1 only'
        return super().accepts(spec)

    def _init_from_static(self, weight: Tensor, bias: Optional[Tensor]) -> StaticInit:
        return _init_origin(self, 'weight_or1x1_origin', weight, bias)


@register('conv')
class OREPA_LargeConv(_ConvNormActLayer):
    """OREPA large-kernel layer (official ``OREPA_LargeConv``; the 7x7 ResNet stem), odd ``k >= 5``,
    ``groups = 1``.

    The k x k kernel is composed from ``(k - 1) / 2`` weight-only 3x3 :class:`OREPA` kernels
    (``kernels.0``: ``C_in -> C_out``, the others ``C_out -> C_out``): starting from the first kernel
    transposed to ``(C_in, C_out, 3, 3)``, each next kernel is applied as a conv with padding 2
    (3 -> 5 -> 7 ...), and the result is transposed back to ``(C_out, C_in, k, k)``. The layer then
    applies that one kernel (it is *not* a stack of 3x3 convs on the feature map). Args as :class:`OREPA`.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 padding: Optional[int] = None, dilation: int = 1, groups: int = 1, bias: bool = False,
                 norm_cfg: Optional[dict] = None, act_cfg: Optional[dict] = None, deploy: bool = False):
        super().__init__()
        if isinstance(kernel_size, (tuple, list)):
            if kernel_size[0] != kernel_size[1]:
                raise ValueError(f'OREPA_LargeConv: only square kernels are supported, got {kernel_size}')
            kernel_size = kernel_size[0]
        if kernel_size < 5 or kernel_size % 2 == 0:
            raise ValueError(f'OREPA_LargeConv: kernel_size must be odd and >= 5, got {kernel_size}')
        if groups != 1:
            raise ValueError(f'OREPA_LargeConv: only groups=1 is supported, got {groups}')
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, kernel_size
        self.stride, self.dilation, self.groups = stride, dilation, 1
        self.padding = dilation * (kernel_size // 2) if padding is None else padding
        self._init_tail(out_channels, bias and not deploy, None if deploy else norm_cfg, act_cfg)
        if deploy:
            self._init_deploy((out_channels, in_channels, kernel_size, kernel_size), bias=bias or norm_cfg is not None)
            return
        n = (kernel_size - 1) // 2
        self.kernels = nn.ModuleList(
            OREPA(in_channels if i == 0 else out_channels, out_channels, 3, weight_only=True) for i in range(n))

    def weight_gen(self) -> Tensor:
        weight = self.kernels[0].weight_gen().transpose(0, 1)
        for layer in self.kernels[1:]:
            weight = F.conv2d(weight, layer.weight_gen(), padding=2)
        return weight.transpose(0, 1)

    def _training_attrs(self) -> Sequence[str]:
        return ['kernels', 'bias', 'bn']

    @classmethod
    def accepts(cls, spec) -> Optional[str]:
        k = spec.kernel_size
        if len(set(k)) != 1 or k[0] < 5 or k[0] % 2 == 0 or spec.groups != 1:
            return f'{cls.__name__} takes square odd kernels of 5 and more with groups=1 only'
        return super().accepts(spec)


class OREPA3x3RepVGG(_OREPAKernel, nn.Module):
    """The OREPA kernel + BatchNorm used as the k x k branch of :class:`RepVGGBlock_OREPA` (official
    ``OREPA_3x3_RepVGG``): five branches (no 1x1; the block has its own), official inits (kaiming
    a=1, ``vector`` rows 0.25, 0.25, 0, 0.5, 0.5), ``groups = 1``. Not a deployable layer by itself: the
    block fuses it."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 padding: int = 1, dilation: int = 1, groups: int = 1,
                 internal_channels_1x1_3x3: Optional[int] = None, norm_cfg: dict = dict(type='BN')):
        nn.Module.__init__(self)
        if groups != 1:
            raise ValueError(f'OREPA3x3RepVGG: only groups=1 is supported, got {groups}')
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, kernel_size
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups
        self._init_kernel(in_channels, out_channels, kernel_size, groups, internal_channels_1x1_3x3, 'repvgg')
        self.bn = build_norm(norm_cfg, out_channels)

    def fused_kernel_bias(self) -> KernelBias:
        return fuse_conv_norm(self.weight_gen(), None, self.bn)

    def forward(self, x: Tensor) -> Tensor:
        x = F.conv2d(x, self.weight_gen(), None, self.stride, self.padding, self.dilation, self.groups)
        return self.bn(x)


@register('conv')
class RepVGGBlock_OREPA(RepVGGBlock):
    """RepVGG block whose k x k branch is an OREPA kernel (official ``RepVGGBlock_OREPA``).

    ``act(se(dense(x) + conv1x1_bn(x) + bn(x)))`` with ``dense`` = :class:`OREPA3x3RepVGG`; the identity
    BN branch exists when ``C_in == C_out`` and ``stride == 1``. Deploy: one ``nn.Conv2d`` (``reparam``,
    with bias) then SE and activation. ``groups = 1`` only (as the official branch). Args as
    :class:`dynconv_mm.layers.reparam.RepVGGBlock`.
    """

    @classmethod
    def accepts(cls, spec) -> Optional[str]:
        if spec.groups != 1:
            return f'{cls.__name__} takes groups=1 only'
        return super().accepts(spec)

    def _build_dense(self, in_channels, out_channels, kernel_size, stride, padding, dilation, groups, norm_cfg):
        return OREPA3x3RepVGG(in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                              norm_cfg=norm_cfg)
