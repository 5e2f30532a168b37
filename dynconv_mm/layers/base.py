"""The layer protocol: what every dynamic and re-parameterized layer answers for itself.

Tools (the static-checkpoint converter, the MAC counter, the benchmark, ``dynamize``) never look a
layer up in a table of their own: they ask the layer. Every layer class registered for
``conv_cfg`` mixes in :class:`LayerProtocol` and answers

* **what plain convolution it stands for**: :meth:`~LayerProtocol.static_weight_shape` (the kernel
  ``(C_out, C_in / groups, *k)`` of the plain convolution of the same geometry, its "twin");
* **its cost per sample**: :meth:`~LayerProtocol.conv_macs` (the twin's multiply-accumulates, what
  papers report) and :meth:`~LayerProtocol.extra_macs` (:class:`ExtraMacs`: global pooling,
  attention / kernel-generator branch, kernel assembly);
* **how it starts from a static kernel**: :meth:`~LayerProtocol.init_from_static`, returning a
  :class:`StaticInit` (what was set, whether the layer now computes exactly what the static
  convolution did, and why); :attr:`~LayerProtocol.static_init_options` lists the options it reads;
* for dynamic layers, **the official implementation's way of computing the same function**:
  :meth:`~LayerProtocol.reference_forward` (the benchmark times it against ours);
* for re-parameterized layers, **its deploy form** (:class:`~dynconv_mm.layers.reparam.fuse.ReparamMixin`,
  ``switch_to_deploy()``).

Shapes given to the MAC methods are one sample's, without the batch axis: ``in_shape = (C_in, *S)``,
``out_shape = (C_out, *S_out)``.

The module also holds the constructor checks every layer shares (:func:`to_tuple`) and the small
parameter-setting steps the static initialisations are written with.
"""
from __future__ import annotations

import math
import numbers
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

__all__ = ['LayerProtocol', 'StaticInit', 'ExtraMacs', 'StaticInitError', 'ConvSpec', 'to_tuple', 'IntOrTuple']

IntOrTuple = Union[int, Sequence[int]]


def to_tuple(value: IntOrTuple, n: int, what: str, owner: str, minimum: Optional[int] = None) -> Tuple[int, ...]:
    """``value`` as an ``n``-tuple of ints: an int is repeated, a sequence of one value too.

    Raises ``ValueError`` naming ``owner`` and ``what`` for strings (``padding='same'``: give numbers),
    booleans, sequences of another length, non-integers and values below ``minimum``.
    """
    if type(value) is tuple and len(value) == n and all(type(v) is int for v in value) and (
            minimum is None or min(value) >= minimum):
        return value  # the common case, on every forward of some layers: no copies
    if isinstance(value, str):
        raise ValueError(f'{owner}: {what}={value!r}; string values are not supported, give numbers')
    if isinstance(value, bool):
        raise ValueError(f'{owner}: {what} must be an int or a sequence of {n} ints, got {value!r}')
    if isinstance(value, numbers.Integral):
        out = (int(value),) * n
    else:
        try:
            out = tuple(value)
        except TypeError:
            raise ValueError(f'{owner}: {what} must be an int or a sequence of {n} ints, got {value!r}') from None
        if len(out) == 1:
            out = out * n
        if len(out) != n or not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in out):
            raise ValueError(f'{owner}: {what} must be an int or a sequence of {n} ints, got {value!r}')
        out = tuple(int(v) for v in out)
    if minimum is not None and any(v < minimum for v in out):
        raise ValueError(f'{owner}: {what} must be >= {minimum}, got {value!r}')
    return out


@dataclass(frozen=True)
class ConvSpec:
    """The geometry of a plain convolution (or linear layer) that a protocol layer may stand in for.

    ``dims`` is the number of spatial dims (1-3; 0 for ``nn.Linear``); tuples have ``dims`` entries.
    """
    in_channels: int
    out_channels: int
    kernel_size: Tuple[int, ...] = (1, 1)
    stride: Tuple[int, ...] = (1, 1)
    padding: Tuple[int, ...] = (0, 0)
    dilation: Tuple[int, ...] = (1, 1)
    groups: int = 1
    bias: bool = False
    dims: int = 2
    padding_mode: str = 'zeros'

    @property
    def depthwise(self) -> bool:
        return self.groups == self.in_channels == self.out_channels and self.groups > 1

    @property
    def same_padding(self) -> Tuple[int, ...]:
        return tuple(d * (k - 1) // 2 for d, k in zip(self.dilation, self.kernel_size))

    @classmethod
    def of(cls, module: nn.Module) -> Optional['ConvSpec']:
        """The spec of a plain ``nn.Conv1d/2d/3d`` (numeric padding) or ``nn.Linear``, else ``None``."""
        if isinstance(module, nn.Linear):
            return cls(module.in_features, module.out_features, (), (), (), (), 1, module.bias is not None, 0)
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and not isinstance(module.padding, str):
            return cls(module.in_channels, module.out_channels, tuple(module.kernel_size), tuple(module.stride),
                       tuple(module.padding), tuple(module.dilation), module.groups, module.bias is not None,
                       len(module.kernel_size), module.padding_mode)
        return None

    def conv_kwargs(self) -> Dict[str, Any]:
        """``build_conv_layer`` keyword arguments for this geometry (an int where every dim is the same,
        as one writes them for ``nn.Conv2d``)."""
        return dict(stride=_compact(self.stride), padding=_compact(self.padding), dilation=_compact(self.dilation),
                    groups=self.groups, bias=self.bias)

    @property
    def kernel(self) -> Union[int, Tuple[int, ...]]:
        """``kernel_size`` as an int where every dim is the same."""
        return _compact(self.kernel_size)


def _compact(values: Tuple[int, ...]) -> Union[int, Tuple[int, ...]]:
    return values[0] if values and len(set(values)) == 1 else tuple(values)


class StaticInitError(ValueError):
    """A layer cannot be initialised from the static kernel it was given (and nothing was changed)."""


@dataclass
class StaticInit:
    """What :meth:`LayerProtocol.init_from_static` did to a layer.

    Attributes:
        exact: the layer now computes what the static convolution did (in eval mode, at the layer's
            current temperature where it has one).
        note: one line saying what was done and why it is (or is not) exact.
        from_static: parameter names (relative to the layer) that hold the static tensors now.
        by_rule: parameter names (relative to the layer) set by the method's rule, with the reason.
        elsewhere: parameters outside the layer that received the static kernel (a KernelWarehouse
            layer's cells live in its manager): ``(module, parameter name, detail)``.
        temperature: for a temperature-bearing layer that is exact at one temperature only (KernelWarehouse:
            1), that temperature; ``None`` where exactness does not depend on it.
    """
    exact: bool
    note: str
    from_static: List[str] = field(default_factory=list)
    by_rule: Dict[str, str] = field(default_factory=OrderedDict)
    elsewhere: List[Tuple[nn.Module, str, str]] = field(default_factory=list)
    temperature: Optional[float] = None


@dataclass(frozen=True)
class ExtraMacs:
    """What a dynamic layer computes per sample beyond its plain-convolution twin.

    Attributes:
        pooling: additions of the global average pooling of the attention's input.
        attention: multiply-accumulates of the attention / kernel-generator branch (its linear and
            convolution layers).
        assembly: multiplies that build the per-sample kernel (mixtures, modulations) and apply the
            attentions to the feature maps.
    """
    pooling: int = 0
    attention: int = 0
    assembly: int = 0

    @property
    def total(self) -> int:
        return self.pooling + self.attention + self.assembly

    def __add__(self, other: 'ExtraMacs') -> 'ExtraMacs':
        return ExtraMacs(self.pooling + other.pooling, self.attention + other.attention,
                         self.assembly + other.assembly)


def linear_macs(layer: nn.Module, items: int = 1) -> int:
    """MACs of a ``nn.Linear`` or 1x1 ``nn.Conv*`` applied to ``items`` positions."""
    if isinstance(layer, nn.Linear):
        return layer.in_features * layer.out_features * items
    weight = layer.weight
    return int(weight.numel()) * items


class LayerProtocol:
    """Mixin of every registered dynamic and re-parameterized layer (see the module docstring).

    Class attributes:
        layer_kind: ``'dynamic'`` (per-sample kernels) or ``'reparam'`` (one kernel after deployment).
        spatial_dims: spatial dims of the inputs the layer takes (``(2,)`` for 2-D convolutions).
        static_init_options: options :meth:`init_from_static` reads, with their defaults.
    """

    layer_kind: str = 'dynamic'
    spatial_dims: Tuple[int, ...] = (2,)
    static_init_options: Dict[str, Any] = {}

    # -- geometry --------------------------------------------------------------------------------
    def static_weight_shape(self) -> Tuple[int, ...]:
        """``(C_out, C_in / groups, *k)``: the kernel of the plain convolution this layer stands for."""
        ks = tuple(self.kernel_size) if isinstance(self.kernel_size, (tuple, list)) else (self.kernel_size,) * 2
        return (int(self.out_channels), int(self.in_channels) // int(self.groups), *ks)

    @classmethod
    def accepts(cls, spec: 'ConvSpec') -> Optional[str]:
        """``None`` if this type can stand in for a convolution of geometry ``spec`` (built through
        ``conv_cfg`` with it), else the reason it cannot."""
        if spec.dims not in cls.spatial_dims:
            return f'{cls.__name__} takes {cls.spatial_dims}-D convolutions, not {spec.dims}-D'
        if spec.padding_mode != 'zeros':
            return f"{cls.__name__} pads with zeros only (padding_mode={spec.padding_mode!r})"
        return None

    # -- cost ------------------------------------------------------------------------------------
    def conv_macs(self, in_shape: Sequence[int], out_shape: Sequence[int]) -> int:
        """Per-sample MACs of the plain-convolution twin (what the papers count)."""
        return math.prod(self.static_weight_shape()) * math.prod(int(s) for s in out_shape[1:])

    def extra_macs(self, in_shape: Sequence[int], out_shape: Sequence[int]) -> ExtraMacs:
        """Per-sample work beyond the twin (:class:`ExtraMacs`); none for a plain re-param layer."""
        return ExtraMacs()

    # -- static initialisation -------------------------------------------------------------------
    def init_from_static(self, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                         **options: Any) -> StaticInit:
        """Set the layer's parameters in place from a static kernel ``weight`` (shape
        :meth:`static_weight_shape`) and ``bias (C_out,)``, so that the layer computes what the
        static convolution did where the method allows it. Options a layer does not read are ignored
        (:attr:`static_init_options` lists those it reads). Raises :class:`StaticInitError` (and
        changes nothing) where the layer cannot start from a static kernel."""
        raise StaticInitError(f'{type(self).__name__} cannot be initialised from a static convolution')

    @classmethod
    def supports_static_init(cls) -> bool:
        """Whether :meth:`init_from_static` is implemented for this type."""
        return cls.init_from_static is not LayerProtocol.init_from_static

    @classmethod
    def check_static_options(cls, options: Dict[str, Any]) -> None:
        """:class:`StaticInitError` for a value of one of this type's :attr:`static_init_options` that it
        refuses (listing the valid ones); other options are not looked at."""

    def _static_options(self, options: Dict[str, Any]) -> Dict[str, Any]:
        """The layer's :attr:`static_init_options` with the given values (checked)."""
        self.check_static_options(options)
        return {k: options.get(k, v) for k, v in self.static_init_options.items()}

    # -- what the benchmark's floors need (dynamic layers) ---------------------------------------
    #: :meth:`make_kernel` and :meth:`apply_kernel` split the forward in two
    splits_forward: bool = False

    def make_kernel(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The per-sample kernels (and bias) the forward applies to ``x`` (:attr:`splits_forward` layers)."""
        raise NotImplementedError(f'{type(self).__name__} does not split its forward')

    def apply_kernel(self, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        """``forward(x) == apply_kernel(x, *make_kernel(x))`` (:attr:`splits_forward` layers)."""
        raise NotImplementedError(f'{type(self).__name__} does not split its forward')

    def assembly_products(self, batch: int) -> List[Tuple[int, int, int]]:
        """``(m, k, n)`` of the bare matrix products ``(m, k) @ (k, n)`` of the kernel assembly for a
        batch (the arithmetic the assembly cannot do without); none by default."""
        return []

    def mixed_parameter_bytes(self) -> int:
        """Bytes of parameters one forward mixes into kernels (read at least once, at any batch size)
        beyond a static kernel; 0 by default."""
        return 0

    # -- official-style forward (dynamic layers) -------------------------------------------------
    #: the layer has :meth:`reference_forward`
    has_reference: bool = False

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The layer's function computed the way its official implementation does (same weights,
        same outputs): what the benchmark times ours against."""
        raise NotImplementedError(f'{type(self).__name__} has no official-style forward')


# ------------------------------------------------------------------------------------------------
# steps the static initialisations are written with
@torch.no_grad()
def set_param(layer: nn.Module, name: str, value: torch.Tensor) -> None:
    """Copy ``value`` into parameter or buffer ``name`` of ``layer`` (its shape must match)."""
    params = dict(layer.named_parameters())
    target = params[name] if name in params else layer.get_buffer(name)
    if tuple(target.shape) != tuple(value.shape):
        raise StaticInitError(f'{type(layer).__name__}.{name}: static value of shape {tuple(value.shape)} does not '
                              f'fit {tuple(target.shape)}')
    target.copy_(value.to(target.dtype))


@torch.no_grad()
def zero_module(layer: nn.Module, prefix: str, rec: StaticInit, why: str) -> None:
    """Weight and bias of sub-module ``prefix`` to zero (a gate whose output is constant)."""
    mod = layer.get_submodule(prefix)
    mod.weight.zero_()
    rec.by_rule[f'{prefix}.weight'] = why
    if getattr(mod, 'bias', None) is not None:
        mod.bias.zero_()
        rec.by_rule[f'{prefix}.bias'] = why


@torch.no_grad()
def identity_batch_norm(layer: nn.Module, prefix: str, rec: StaticInit) -> None:
    """An eval-mode BatchNorm that returns its input: mean 0, var 1, gamma ``sqrt(1 + eps)``, beta 0."""
    bn = layer.get_submodule(prefix)
    bn.running_mean.zero_()
    bn.running_var.fill_(1.0)
    if bn.weight is not None:
        bn.weight.fill_(math.sqrt(1.0 + bn.eps))
        bn.bias.zero_()
    for n in ('weight', 'bias', 'running_mean', 'running_var'):
        if getattr(bn, n, None) is not None:
            rec.by_rule[f'{prefix}.{n}'] = 'identity BatchNorm'


@torch.no_grad()
def silence_batch_norm(layer: nn.Module, prefix: str, rec: StaticInit) -> None:
    """A BatchNorm whose output is 0 (gamma = beta = 0): its branch contributes nothing."""
    bn = layer.get_submodule(prefix)
    bn.weight.zero_()
    bn.bias.zero_()
    rec.by_rule[f'{prefix}.weight'] = rec.by_rule[f'{prefix}.bias'] = 'branch silenced (gamma = beta = 0)'


@torch.no_grad()
def copy_static_bias(layer: nn.Module, bias: Optional[torch.Tensor], rec: StaticInit, expand: int = 0,
                     scale: float = 1.0) -> None:
    """The static bias into ``layer.bias`` (``expand`` copies of it for per-kernel biases, times
    ``scale``), zero where the static convolution has none."""
    if getattr(layer, 'bias', None) is None:
        if bias is not None:
            raise StaticInitError(f'{type(layer).__name__} has no bias but the static convolution has one; build '
                                  'the layer with bias=True')
        return
    if bias is None:
        layer.bias.zero_()
        rec.by_rule['bias'] = 'zero (the static convolution has no bias)'
        return
    value = bias * scale
    layer.bias.copy_(value.expand(expand, -1) if expand else value)
    rec.from_static.append('bias')


def pooling_adds(in_shape: Sequence[int]) -> int:
    """Additions of a global average pooling of one ``(C, *S)`` sample."""
    return math.prod(int(s) for s in in_shape)
