"""The one fusion toolkit for re-parameterized layers.

Every re-parameterized layer of the package (DO-Conv, OREPA, DBB, RepVGG) turns its training-time
form into one plain convolution with these helpers; none of them carries its own copy.

Kernels are ``(C_out, C_in / groups, kh, kw)`` tensors, biases ``(C_out,)`` tensors. The helpers are
differentiable (they can be used during training, e.g. for a kernel penalty), and work in any dtype.

* :func:`fuse_conv_norm` -- fold an eval-mode BatchNorm into the kernel before it (Ding et al.,
  "Diverse Branch Block", CVPR 2021, transform I).
* :func:`sum_branches` -- add parallel branches (transform II).
* :func:`compose_1x1_kxk` -- a 1x1 conv followed by a kxk conv is one kxk conv (transform III),
  grouped.
* :func:`avg_pool_kernel` -- a kxk average pooling as a conv kernel (transform V).
* :func:`pad_kernel` -- zero-pad a kernel to a larger centred size (transform VI).
* :func:`identity_kernel` -- the identity mapping as a (grouped) kernel.
* :func:`make_conv` -- build the deploy ``nn.Conv2d`` holding a fused kernel.

:class:`ReparamMixin` is the small protocol every re-parameterized layer follows, and
:func:`reparameterize_model` switches a whole model to its deploy form.
"""
from __future__ import annotations

from typing import Iterable, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..base import LayerProtocol, StaticInit, StaticInitError
from ..norm import build_norm as _build_norm

__all__ = [
    'fuse_conv_norm', 'sum_branches', 'compose_1x1_kxk', 'avg_pool_kernel', 'pad_kernel', 'identity_kernel',
    'make_conv', 'norm_output_bias', 'build_norm', 'build_act', 'ReparamMixin', 'ConvNorm', 'reparameterize_model',
    'leaf_module_types',
]

KernelBias = Tuple[Tensor, Optional[Tensor]]


# ------------------------------------------------------------------------------------------------
# kernel algebra
def _norm_scale_shift(norm: nn.Module) -> Tuple[Tensor, Tensor]:
    """Per-channel ``(scale, shift)`` with ``norm(y) == y * scale + shift`` for an eval-mode BatchNorm."""
    if not isinstance(norm, nn.modules.batchnorm._BatchNorm):
        raise TypeError(f'only BatchNorm-type layers can be folded into a conv, got {type(norm).__name__}')
    if norm.running_mean is None or norm.running_var is None:
        raise ValueError(f'{type(norm).__name__} without running statistics cannot be folded into a conv')
    std = (norm.running_var + norm.eps).sqrt()
    if norm.weight is not None:
        scale = norm.weight / std
        shift = norm.bias - norm.running_mean * scale
    else:
        scale = 1.0 / std
        shift = -norm.running_mean * scale
    return scale, shift


def fuse_conv_norm(kernel: Tensor, bias: Optional[Tensor], norm: nn.Module) -> Tuple[Tensor, Tensor]:
    """Fold ``norm`` (a BatchNorm, eval statistics) into the conv ``(kernel, bias)`` before it.

    ``kernel (C_out, C_in/g, kh, kw)``, ``bias (C_out,)`` or ``None`` -> ``(kernel', bias')`` with
    ``norm(conv(x, kernel, bias)) == conv(x, kernel', bias')``.
    """
    scale, shift = _norm_scale_shift(norm)
    fused_bias = shift if bias is None else bias * scale + shift
    return kernel * scale.reshape(-1, *([1] * (kernel.dim() - 1))), fused_bias


def norm_output_bias(norm: nn.Module) -> Tensor:
    """What an eval-mode BatchNorm outputs for a zero input, ``(C,)`` (the value a BN-then-pad layer pads with)."""
    return _norm_scale_shift(norm)[1]


def sum_branches(branches: Iterable[KernelBias]) -> KernelBias:
    """Sum parallel branches ``[(kernel, bias|None), ...]`` of equal kernel shape (bias ``None`` counts as zero)."""
    kernel, bias = None, None
    for k, b in branches:
        kernel = k if kernel is None else kernel + k
        if b is not None:
            bias = b if bias is None else bias + b
    if kernel is None:
        raise ValueError('sum_branches needs at least one branch')
    return kernel, bias


def compose_1x1_kxk(k1: Tensor, b1: Optional[Tensor], k2: Tensor, b2: Optional[Tensor], groups: int = 1) -> KernelBias:
    """One kxk conv equal to a 1x1 conv ``(k1 (T, I/g, 1, 1), b1 (T,))`` followed by a kxk conv
    ``(k2 (O, T/g, k, k), b2 (O,))``, both with ``groups`` groups.

    A bias ``b1`` of the first conv passes through the second one as a constant input; this is exact
    only when the kxk conv sees ``b1`` also where it reads padding (DBB pads with the BN output, see
    :func:`norm_output_bias`), or when it has no padding.
    """
    t, ig = k1.shape[:2]
    o, tg, kh, kw = k2.shape
    if t % groups or o % groups or tg * groups != t:
        raise ValueError(f'compose_1x1_kxk: shapes {tuple(k1.shape)} and {tuple(k2.shape)} do not fit groups={groups}')
    a = k1.reshape(groups, t // groups, ig)                      # (g, T/g, I/g)
    c = k2.reshape(groups, o // groups, tg, kh, kw)              # (g, O/g, T/g, k, k)
    kernel = torch.einsum('gti,gothw->goihw', a, c).reshape(o, ig, kh, kw)
    bias = None
    if b1 is not None:
        bias = torch.einsum('gt,gothw->go', b1.reshape(groups, t // groups), c).reshape(o)
    if b2 is not None:
        bias = b2 if bias is None else bias + b2
    return kernel, bias


def avg_pool_kernel(channels: int, kernel_size: int, groups: int = 1, dtype: Optional[torch.dtype] = None,
                    device: Optional[torch.device] = None) -> Tensor:
    """``(C, C/g, k, k)`` kernel of a kxk average pooling (each channel to itself, 1/k^2 everywhere)."""
    return identity_kernel(channels, groups, 1, dtype, device).expand(-1, -1, kernel_size, kernel_size) \
        / float(kernel_size * kernel_size)


def identity_kernel(channels: int, groups: int = 1, kernel_size: int = 1, dtype: Optional[torch.dtype] = None,
                    device: Optional[torch.device] = None) -> Tensor:
    """``(C, C/g, k, k)`` kernel of the identity: ``[c, c mod (C/g), k//2, k//2] = 1``."""
    if channels % groups:
        raise ValueError(f'identity_kernel: channels {channels} not divisible by groups {groups}')
    ig = channels // groups
    kernel = torch.zeros(channels, ig, kernel_size, kernel_size, dtype=dtype, device=device)
    idx = torch.arange(channels, device=device)
    kernel[idx, idx % ig, kernel_size // 2, kernel_size // 2] = 1
    return kernel


def pad_kernel(kernel: Tensor, size: Union[int, Sequence[int]]) -> Tensor:
    """Zero-pad a ``(..., kh, kw)`` kernel to ``size`` around its centre (odd size differences only)."""
    th, tw = (size, size) if isinstance(size, int) else size
    dh, dw = th - kernel.shape[-2], tw - kernel.shape[-1]
    if dh < 0 or dw < 0 or dh % 2 or dw % 2:
        raise ValueError(f'pad_kernel: cannot centre a {tuple(kernel.shape[-2:])} kernel in {(th, tw)}')
    if dh == 0 and dw == 0:
        return kernel
    return F.pad(kernel, [dw // 2, dw // 2, dh // 2, dh // 2])


def make_conv(kernel: Tensor, bias: Optional[Tensor], stride=1, padding=0, dilation=1, groups: int = 1,
              padding_mode: str = 'zeros') -> nn.Conv2d:
    """A plain ``nn.Conv2d`` holding ``kernel (O, I/g, kh, kw)`` and ``bias`` (no bias if ``None``)."""
    o, ig, kh, kw = kernel.shape
    conv = nn.Conv2d(ig * groups, o, (kh, kw), stride=stride, padding=padding, dilation=dilation, groups=groups,
                     bias=bias is not None, padding_mode=padding_mode, device=kernel.device, dtype=kernel.dtype)
    with torch.no_grad():
        conv.weight.copy_(kernel)
        if bias is not None:
            conv.bias.copy_(bias)
    return conv


# ------------------------------------------------------------------------------------------------
# builders
def build_norm(cfg: Optional[dict], channels: int) -> Optional[nn.Module]:
    """The norm of a branch from an mmcv-style config (``None`` -> ``None``;
    :func:`dynconv_mm.layers.norm.build_norm` otherwise)."""
    return None if cfg is None else _build_norm(cfg, channels, dims=2, owner='re-parameterized layer')


def build_act(cfg: Optional[dict]) -> Optional[nn.Module]:
    """An activation from an mmcv-style config (``None`` -> ``None``)."""
    if cfg is None:
        return None
    from mmcv.cnn import build_activation_layer
    from mmengine.registry import MODELS
    try:
        return build_activation_layer(cfg)
    except KeyError:
        known = sorted(n for n, c in MODELS.module_dict.items() if isinstance(c, type) and issubclass(c, nn.Module)
                       and c.__module__.startswith(('torch.nn.modules.activation', 'mmcv.cnn.bricks.activation',
                                                    'mmcv.cnn.bricks.hswish', 'mmcv.cnn.bricks.hsigmoid',
                                                    'mmcv.cnn.bricks.swish')))
        raise ValueError(f'unknown activation type {cfg.get("type")!r} in act_cfg {cfg!r}; expected one of '
                         f'{known}') from None


# ------------------------------------------------------------------------------------------------
# the protocol
class ReparamMixin(LayerProtocol):
    """Protocol of a re-parameterized layer (mix into an ``nn.Module``): the
    :class:`~dynconv_mm.layers.base.LayerProtocol` plus its deploy form.

    A subclass implements :meth:`fused_kernel_bias` (the one equivalent ``(kernel, bias)`` of its
    training-time form, differentiable), :meth:`_deploy_conv_kwargs` (stride, padding, dilation,
    groups, padding mode of the deploy conv) and lists its training-time attributes in
    :meth:`_training_attrs`. :meth:`switch_to_deploy` then builds ``self.reparam`` (one
    ``nn.Conv2d``), deletes the training-time parameters, buffers and sub-modules, and sets
    ``self.deploy = True``. Calling it again does nothing. In deploy mode the layer's forward is
    ``act(reparam(x))``.
    """

    layer_kind = 'reparam'
    deploy: bool = False
    # read by mmcv's ConvModule from the conv it wraps
    transposed: bool = False
    output_padding: Tuple[int, int] = (0, 0)

    def fused_kernel_bias(self) -> KernelBias:
        raise NotImplementedError

    def _deploy_conv_kwargs(self) -> dict:
        raise NotImplementedError

    def _training_attrs(self) -> Sequence[str]:
        raise NotImplementedError

    def init_from_static(self, weight: Tensor, bias: Optional[Tensor] = None, **options) -> StaticInit:
        """Start from a static kernel (:meth:`_init_from_static`); a deployed layer is refused: its
        ``reparam`` convolution takes the static kernel as it is."""
        if self.deploy:
            raise StaticInitError(f'{type(self).__name__} is deployed: load the static kernel into its reparam conv '
                                  'instead')
        return self._init_from_static(weight, bias)

    def _init_from_static(self, weight: Tensor, bias: Optional[Tensor]) -> StaticInit:
        raise StaticInitError(f'{type(self).__name__} cannot be initialised from a static convolution')

    @classmethod
    def supports_static_init(cls) -> bool:
        return cls._init_from_static is not ReparamMixin._init_from_static

    def _build_deploy_conv(self, kernel: Tensor, bias: Optional[Tensor]) -> None:
        self.reparam = make_conv(kernel, bias, **self._deploy_conv_kwargs())

    def _init_deploy(self, weight_shape: Sequence[int], bias: bool) -> None:
        """Build a (randomly initialised) deploy conv directly, for ``deploy=True`` construction."""
        kernel = torch.empty(*weight_shape)
        nn.init.kaiming_uniform_(kernel, a=5 ** 0.5)
        self._build_deploy_conv(kernel, torch.zeros(weight_shape[0]) if bias else None)
        self.deploy = True

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # a training-time checkpoint into a deploy-built layer (or the reverse) fails here with a clear
        # message, also under non-strict loaders that would otherwise leave the layer random
        from dynconv_mm.utils.load_errors import check_reparam_form
        check_reparam_form(type(self).__name__, bool(self.deploy), self._training_attrs(), state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @torch.no_grad()
    def switch_to_deploy(self) -> None:
        if self.deploy:
            return
        kernel, bias = self.fused_kernel_bias()
        params = []
        for name in self._training_attrs():
            value = getattr(self, name, None)
            if isinstance(value, nn.Parameter):
                params.append(value)
            elif isinstance(value, nn.Module):
                params.extend(value.parameters())
        frozen = bool(params) and not any(p.requires_grad for p in params)
        self._build_deploy_conv(kernel.detach(), None if bias is None else bias.detach())
        if frozen:   # a frozen layer (e.g. a frozen backbone stage) stays frozen
            self.reparam.requires_grad_(False)
        for name in self._training_attrs():
            if hasattr(self, name):
                delattr(self, name)
        self.deploy = True


class ConvNorm(ReparamMixin, nn.Module):
    """A conv followed by a norm (and optional activation) that folds into one conv for deployment.

    Keys: training ``conv.weight`` and ``bn.*``; deploy ``reparam.weight``/``reparam.bias``. Used for
    plain (non re-parameterized) conv+BN positions of the OREPA/DBB models, e.g. ResNet shortcuts.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding: int = 0,
                 dilation: int = 1, groups: int = 1, norm_cfg: Optional[dict] = dict(type='BN'),
                 act_cfg: Optional[dict] = None, deploy: bool = False):
        super().__init__()
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, kernel_size
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups
        self.act = build_act(act_cfg)
        if deploy:
            self._init_deploy((out_channels, in_channels // groups, kernel_size, kernel_size), bias=True)
            return
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias=False)
        self.bn = build_norm(norm_cfg, out_channels)
        if self.bn is None:
            raise ValueError('ConvNorm: norm_cfg must not be None')

    def fused_kernel_bias(self) -> KernelBias:
        return fuse_conv_norm(self.conv.weight, None, self.bn)

    def _deploy_conv_kwargs(self) -> dict:
        return dict(stride=self.stride, padding=self.padding, dilation=self.dilation, groups=self.groups)

    def _training_attrs(self) -> Sequence[str]:
        return ('conv', 'bn')

    def forward(self, x: Tensor) -> Tensor:
        x = self.reparam(x) if self.deploy else self.bn(self.conv(x))
        return x if self.act is None else self.act(x)


# ------------------------------------------------------------------------------------------------
# whole models
def reparameterize_model(model: nn.Module) -> nn.Module:
    """Switch every re-parameterized layer of ``model`` to its deploy form, in place; returns ``model``.

    Calls ``switch_to_deploy()`` on every module that has one and is not yet deployed, parents before
    children (a parent that fuses its children removes them before they are visited). Idempotent:
    a second call changes nothing. Put the model in eval mode for inference afterwards (fusion uses
    the norm layers' running statistics, whatever the mode).
    """
    def visit(m: nn.Module) -> None:
        if m is not model and callable(getattr(m, 'switch_to_deploy', None)) and not getattr(m, 'deploy', False):
            m.switch_to_deploy()
        for child in list(m.children()):
            visit(child)

    if callable(getattr(model, 'switch_to_deploy', None)) and not getattr(model, 'deploy', False) \
            and isinstance(model, ReparamMixin):
        model.switch_to_deploy()
    visit(model)
    return model


def leaf_module_types(model: nn.Module) -> list:
    """Types of the modules without children, in registration order (for comparing architectures)."""
    return [type(m) for m in model.modules() if next(m.children(), None) is None]
