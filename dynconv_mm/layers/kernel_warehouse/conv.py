"""The KernelWarehouse layers: :class:`KWConv1d`, :class:`KWConv2d`, :class:`KWConv3d` and :class:`KWLinear`.

A KW layer owns no kernel: its :class:`~.attention.KWAttention` mixes, per sample, the cells of a
warehouse that its :class:`~.manager.WarehouseManager` holds (and shares with other layers), the
mixtures tile the layer's kernel (:mod:`.assembly`), and
:func:`~dynconv_mm.layers.batched.batched_conv` applies it.
"""
from __future__ import annotations

import math
import numbers
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ...registry import register
from ..base import ExtraMacs, IntOrTuple, LayerProtocol, StaticInit, StaticInitError, pooling_adds, to_tuple
from ..batched import batched_conv
from . import cpu_backend
from .assembly import KernelGeometry, assemble_matmul, choose_backend, mixture_blocks
from .attention import KWAttention
from .naming import normalize_sharing_range
from .options import MANAGER_OPTIONS, UNBOUND_DEFAULTS, check_manager_options, is_sequence

if TYPE_CHECKING:
    from .manager import WarehouseManager

__all__ = ['KWConvNd', 'KWConv1d', 'KWConv2d', 'KWConv3d', 'KWLinear']

_CONVS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


class KWConvNd(LayerProtocol, cpu_backend.KeepsKernelMemory, nn.Module):
    """Base of :class:`KWConv1d`, :class:`KWConv2d` and :class:`KWConv3d`.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups: as ``nn.ConvNd``
            (numeric padding only).
        bias: add a learnable per-channel bias (zero-initialised), key ``<layer>.bias``.
        warehouse_id: index of the layer's warehouse in ``warehouse_manager`` (set by ``reserve``).
        warehouse_manager: the :class:`~.manager.WarehouseManager` owning the warehouse. It is referenced,
            not registered as a sub-module (the warehouse appears once in the state dict, under the
            module the manager is attached to).
        warehouse_name: for a layer created without a manager (``conv_cfg``): force the warehouse
            name instead of deriving it from the module path.
        **options: for a layer created without a manager: the manager options it asks for
            (``reduction``, ``cell_num_ratio``, ``cell_inplane_ratio``, ``cell_outplane_ratio``,
            ``sharing_range``, ``nonlocal_basis_ratio``, ``norm_layer``, ``spatial_partition``;
            defaults :data:`~.options.UNBOUND_DEFAULTS`). Layers sharing a warehouse must agree on them.
            Also ``exclude``: module path patterns (``fnmatch``, relative to the model given to
            :func:`~.conv_cfg.allocate_warehouses`, e.g. ``'conv1'`` for a ResNet stem); a matching
            layer is replaced by the plain ``nn.ConvNd`` / ``nn.Linear`` at allocation.

    Input ``(B, C_in, *S)``, output ``(B, C_out, *S_out)``.
    """

    dimension: int = 0
    layer_type: str = ''
    has_reference = True
    static_init_options = dict(kw_attention='prior', kw_prior_logit=1.0)
    _memory_names = _training_memory_names = ('_kernel_buffer',)

    def __init__(self, in_channels: int, out_channels: int, kernel_size: IntOrTuple, stride: IntOrTuple = 1,
                 padding: IntOrTuple = 0, dilation: IntOrTuple = 1, groups: int = 1, bias: bool = False,
                 warehouse_id: Optional[int] = None, warehouse_manager: Optional['WarehouseManager'] = None,
                 warehouse_name: Optional[str] = None, **options: Any) -> None:
        super().__init__()
        name = type(self).__name__
        d = self.dimension
        for what, v in (('in_channels', in_channels), ('out_channels', out_channels), ('groups', groups)):
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
                raise ValueError(f'{name}: {what} must be a positive int, got {v!r}')
        self.in_planes = self.in_channels = int(in_channels)
        self.out_planes = self.out_channels = int(out_channels)
        self.groups = int(groups)
        spec = f'{name}({in_channels}, {out_channels}, groups={groups})'
        if in_channels % groups or out_channels % groups:
            raise ValueError(f'{spec}: groups={groups} must divide in_channels={in_channels} and '
                             f'out_channels={out_channels}')
        self.kernel_size = to_tuple(kernel_size, d, 'kernel_size', spec, minimum=1)
        self.stride = to_tuple(stride, d, 'stride', spec, minimum=1)
        self.padding = to_tuple(padding, d, 'padding', spec, minimum=0)
        self.dilation = to_tuple(dilation, d, 'dilation', spec, minimum=1)
        self.transposed = False
        self.output_padding = (0,) * d
        self.bias = nn.Parameter(torch.zeros(self.out_planes)) if bias else None
        self.warehouse_id = warehouse_id
        self._manager: List[Optional['WarehouseManager']] = [warehouse_manager]
        self._exclude: Tuple[str, ...] = ()
        self._warehouse_name: Optional[str] = None
        self.cell_shape: Optional[Tuple[int, ...]] = None
        self._options: Optional[Dict[str, Any]] = None
        if warehouse_manager is not None:
            if options or warehouse_name is not None:
                raise ValueError(f'{spec}: manager options {sorted(options)} are given to the manager, not to a '
                                 'layer it reserves')
            return
        exclude = options.pop('exclude', ())
        exclude = (exclude,) if isinstance(exclude, str) else exclude
        if not is_sequence(exclude) or not all(isinstance(e, str) and e for e in exclude):
            raise ValueError(f'{spec}: exclude must be a module path pattern or a sequence of them, got {exclude!r}')
        self._exclude = tuple(exclude)
        unknown = sorted(set(options) - set(MANAGER_OPTIONS))
        if unknown:
            raise ValueError(f'{spec}: unknown option(s) {unknown}; a KW layer accepts '
                             f'{list(MANAGER_OPTIONS) + ["exclude", "warehouse_name"]}')
        for k, v in options.items():
            if k != 'sharing_range' and is_sequence(v):
                raise ValueError(f'{spec}: {k}={v!r}: a layer built without a manager takes one value per '
                                 'option (per-warehouse sequences are for WarehouseManager)')
        opts = dict(UNBOUND_DEFAULTS, **options)
        opts['sharing_range'] = normalize_sharing_range(opts['sharing_range'], owner=spec)
        check_manager_options(spec, **opts)  # every option is checked now, at build time
        if warehouse_name is not None and (not isinstance(warehouse_name, str) or not warehouse_name):
            raise ValueError(f'{spec}: warehouse_name must be a non-empty string, got {warehouse_name!r}')
        self._options = opts
        self._warehouse_name = warehouse_name

    # -- manager binding ---------------------------------------------------------------------
    @property
    def manager(self) -> Optional['WarehouseManager']:
        """The manager owning this layer's warehouse (``None`` while unbound)."""
        return self._manager[0]

    @property
    def bound(self) -> bool:
        return self._manager[0] is not None

    def _spec(self) -> str:
        return (f'{type(self).__name__}({self.in_planes}, {self.out_planes}, kernel_size={self.kernel_size}, '
                f'stride={self.stride}, groups={self.groups})')

    def weight_shape(self) -> List[int]:
        """Shape of the (virtual) static kernel ``[C_out, C_in / groups, *k]``."""
        return [self.out_planes, self.in_planes // self.groups, *self.kernel_size]

    def static_weight_shape(self) -> Tuple[int, ...]:
        return tuple(self.weight_shape())

    def init_attention(self, cell: torch.Tensor, start_cell_idx: int, reduction: float, cell_num_ratio: float,
                       norm_layer: Any = 'BN', nonlocal_basis_ratio: float = 1.0) -> int:
        """Create the attention for the warehouse ``cell`` ``(n, c_o, c_i, *ck)``; returns the next free cell."""
        self.cell_shape = tuple(cell.shape)
        n, c_o, c_i = self.cell_shape[:3]
        self.groups_out_channel = self.out_planes // c_o
        self.groups_in_channel = self.in_planes // self.groups // c_i
        gs = 1
        for k, ck in zip(self.kernel_size, self.cell_shape[3:]):
            gs *= k // ck
        self.groups_spatial = gs
        self.num_mixtures = self.groups_spatial * self.groups_out_channel * self.groups_in_channel
        self.attention = KWAttention(self.in_planes, reduction, n, self.num_mixtures, norm_layer=norm_layer,
                                     cell_num_ratio=cell_num_ratio, nonlocal_basis_ratio=nonlocal_basis_ratio,
                                     start_cell_idx=start_cell_idx)
        return self.attention.init_temp_bias(start_cell_idx, cell_num_ratio)

    @property
    def geometry(self) -> KernelGeometry:
        """What the assembly needs to know of this layer (:data:`~.assembly.KernelGeometry`)."""
        return (self.groups_spatial, self.groups_out_channel, self.groups_in_channel, self.cell_shape,
                self.out_planes, self.in_planes // self.groups, self.kernel_size)

    # -- forward -----------------------------------------------------------------------------
    def _check_ready(self) -> 'WarehouseManager':
        manager = self._manager[0]
        if manager is None:
            raise RuntimeError(f'{self._spec()} has no warehouse yet: it was built without a WarehouseManager '
                               '(e.g. through conv_cfg) and its model was not built through a MODELS registry; '
                               'call dynconv_mm.layers.allocate_warehouses(model) once after building the model')
        if self.cell_shape is None:
            raise RuntimeError(f'{self._spec()} has no attention yet: call manager.store() and '
                               'manager.allocate(network) after reserving all layers')
        return manager

    def training_kernel_buffer(self, shape: Tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """Memory for this layer's per-sample kernels in a training pass, reused from the last pass.

        A training pass keeps every layer's kernels until its backward pass anyway; keeping the memory
        for the next pass as well spares the page faults of a fresh multi-megabyte allocation per layer
        and step. It is reused only when no tensor still refers to it (after the backward pass; two
        forwards before one backward get separate memory), and it is released by ``train(False)`` /
        ``eval()``, by moving or casting the module and by :func:`~.manager.release_kernel_buffers`;
        copies and pickles of the module never carry it.
        """
        return cpu_backend.kept_memory(self, '_kernel_buffer').take(shape, like)

    def assemble_kernel(self, attention: torch.Tensor) -> torch.Tensor:
        """Per-sample kernels ``(B, C_out, C_in / groups, *k)`` from the attention ``(B, M, n)`` (the
        backend :func:`~.assembly.choose_backend` picks; every backend gives the same numbers)."""
        manager = self._check_ready()
        cells = manager.weights[self.warehouse_id]
        return self._assemble(attention, manager, choose_backend(attention, cells))

    def _assemble(self, attention: torch.Tensor, manager: 'WarehouseManager', backend: str) -> torch.Tensor:
        """:meth:`assemble_kernel` with the backend already chosen."""
        cells = manager.weights[self.warehouse_id]
        if backend == 'matmul':
            return assemble_matmul(attention, cells, self.geometry)
        B, n = attention.shape[0], cells.shape[0]
        wt, sink = manager.cell_major_for_grad(self.warehouse_id)
        per_row = cells[0, 0].numel()  # warehouse rows per cell output channel
        rows = max(1, cpu_backend.ASSEMBLY_BLOCK_ENTRIES // (per_row * (n + B * attention.shape[1])))
        if torch.is_grad_enabled() and (attention.requires_grad or cells.requires_grad):
            alloc = self.training_kernel_buffer  # kept for the backward pass
        else:
            alloc = manager.transient_kernel_buffer  # used by the convolution and dropped
        kernel = cpu_backend.BlockedAssembly.apply(attention, wt, tuple(cells.shape), (
            self.groups_spatial, self.groups_out_channel, self.groups_in_channel), rows, sink, alloc)
        return kernel.reshape(B, self.out_planes, self.in_planes // self.groups, *self.kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        manager = self._check_ready()
        attention = self.attention(x)
        backend = choose_backend(attention, manager.weights[self.warehouse_id])
        weight = self._assemble(attention, manager, backend)
        # under autocast the kernel is already in the low precision; keep the bias add there too
        bias = None if self.bias is None else self.bias.to(weight.dtype)
        # the CPU backend consumes the kernel gradient at once: its memory is reused
        grad_buffer = (manager.kernel_grad_buffer if backend == 'cpu' and weight.requires_grad
                       and torch.is_grad_enabled() else None)
        return batched_conv(x, weight, bias, self.stride, self.padding, self.dilation, self.groups,
                            weight_grad_buffer=grad_buffer)

    splits_forward = True

    def make_kernel(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        weight = self.assemble_kernel(self.attention(x))
        return weight, None if self.bias is None else self.bias.to(weight.dtype)

    def apply_kernel(self, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        return batched_conv(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def assembly_products(self, batch: int) -> List[Tuple[int, int, int]]:
        """The one product ``(batch * M, n) @ (n, cell)``."""
        self._check_ready()
        return [(batch * self.num_mixtures, self.cell_shape[0], math.prod(self.cell_shape[1:]))]

    def mixed_parameter_bytes(self) -> int:
        """The layer mixes its kernel from every cell of its warehouse: the whole warehouse."""
        cells = self._check_ready().weights[self.warehouse_id]
        return cells.numel() * cells.element_size()

    # -- protocol ----------------------------------------------------------------------------
    @classmethod
    def check_static_options(cls, options: Dict[str, Any]) -> None:
        mode = options.get('kw_attention', 'prior')
        if mode not in ('prior', 'keep'):
            raise StaticInitError(f"kw_attention must be 'prior' or 'keep', got {mode!r}")
        logit = options.get('kw_prior_logit', 1.0)
        if isinstance(logit, bool) or not isinstance(logit, (int, float)) or not logit > 0:
            raise StaticInitError(f'kw_prior_logit must be a number > 0, got {logit!r}')

    def extra_macs(self, in_shape: Sequence[int], out_shape: Sequence[int]) -> ExtraMacs:
        """Pooling, the attention's linear layers, and the assembly product ``(M, n) @ (n, cell)``: the
        cells of the whole warehouse take part, as in the official layer."""
        self._check_ready()
        att = self.attention
        macs = att.fc1.in_features * att.fc1.out_features + att.fc2.in_features * att.fc2.out_features
        if att.basis_mode:
            macs += att.num_local_mixture * att.fc3.in_features * att.fc3.out_features
        return ExtraMacs(pooling=pooling_adds(in_shape), attention=macs,
                         assembly=self.num_mixtures * math.prod(self.cell_shape))

    def init_from_static(self, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                         **options: Any) -> StaticInit:
        """Each mixture's own cell (the temperature prior) receives the matching block of ``weight``;
        with ``kw_attention='prior'`` the attention logits are set to the prior (``fc2`` weight 0, bias
        ``kw_prior_logit * prior``) so that the kernel is ``W * L / (L + eps)`` at temperature 0 and ``W``
        at temperature 1; ``'keep'`` keeps the attention (exact only at temperature 1). Mixtures with
        no own cell (``cell_num_ratio < 1``) start at zero: not exact."""
        opts = self._static_options(options)
        manager = self.manager
        if manager is None or self.cell_shape is None:
            raise StaticInitError(f'{self._spec()}: its warehouse is not allocated; build the model through a '
                                  'registry or call allocate_warehouses(model) first')
        if bias is not None and self.bias is None:
            raise StaticInitError(f'{self._spec()} has no bias; the static convolution has one')
        att = self.attention
        P = att.kw_planes_per_mixture
        prior = att.temp_bias.reshape(att.num_local_mixture, P)
        own = prior[:, :-1].argmax(1)
        has_cell = prior[:, :-1].sum(1) > 0
        blocks = mixture_blocks(weight, self.geometry)
        cells = manager.weights[self.warehouse_id]
        with torch.no_grad():
            for m in range(att.num_local_mixture):
                if has_cell[m]:
                    cells[own[m]].copy_(blocks[m].to(cells.dtype))
        full = bool(has_cell.all())
        if full:  # at temperature 1 the assembled kernel is W wherever every mixture has its own cell
            ker = assemble_matmul(prior[:, :-1].unsqueeze(0).to(cells.dtype), cells, self.geometry)[0]
            if not torch.equal(ker, weight.to(ker.dtype)):
                raise AssertionError(f'{self._spec()}: warehouse layout check failed')
        rec = StaticInit(
            exact=full,
            temperature=1.0 if full else None,
            note=('exact at temperature 1 (own cells hold W); at temperature 0 the kernel is W / (1 + eps)' if full
                  else f'not exact: {int((~has_cell).sum())} of {len(has_cell)} mixtures own no cell '
                       '(cell_num_ratio < 1), their blocks start at zero'))
        cells_taken = ','.join(str(int(i)) for i in own[has_cell])
        rec.elsewhere.append((manager, f'weights.{self.warehouse_id}', f'[{cells_taken}]'))
        if opts['kw_attention'] == 'prior':
            with torch.no_grad():
                att.fc2.weight.zero_()
                rec.by_rule['attention.fc2.weight'] = 'zero: logits = temperature prior'
                prior_logits = att.temp_bias * float(opts['kw_prior_logit'])
                if att.basis_mode:
                    att.basis_bias.copy_(prior_logits)
                    rec.by_rule['attention.basis_bias'] = 'temperature prior'
                else:
                    att.fc2.bias.copy_(prior_logits)
                    rec.by_rule['attention.fc2.bias'] = 'temperature prior'
        if self.bias is not None:
            with torch.no_grad():
                self.bias.copy_(bias if bias is not None else torch.zeros_like(self.bias))
            if bias is not None:
                rec.from_static.append('bias')
            else:
                rec.by_rule['bias'] = 'zero'
        return rec

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The official layer's computation: attention over flattened mixtures, one ``mm`` with the
        row-major warehouse and a reshape/permute, then one batch-folded grouped convolution."""
        att = self.attention
        B = x.shape[0]
        pooled = x.reshape(B, x.shape[1], -1).mean(-1)
        z = att.fc2(att.act1(att.norm1(att.fc1(pooled))))
        M, P = att.num_local_mixture, att.kw_planes_per_mixture
        if att.basis_mode:
            n_local = att.num_local_cell
            z = z.reshape(B * M, -1)
            local, basis, zero = z[:, :n_local], z[:, n_local:-1], z[:, -1:]
            nonlocal_ = att.fc3(basis)
            s = att.start_cell_idx
            z = torch.cat([nonlocal_[:, :s], local, nonlocal_[:, s:], zero], dim=1).reshape(B, M * P)
            z = z + att.basis_bias.reshape(1, -1)
        z = z.reshape(B * M, P)
        z = z / (z.abs().sum(dim=1, keepdim=True) + 1e-3)
        tau = att.temperature.to(z.dtype)
        alpha = ((1.0 - tau) * z + tau * att.temp_bias.to(z.dtype).reshape(M, P).repeat(B, 1))[:, :-1]
        cells = self.manager.weights[self.warehouse_id]
        d = self.dimension
        mixtures = torch.mm(alpha, cells.reshape(cells.shape[0], -1).to(alpha.dtype))
        mixtures = mixtures.reshape(B, self.groups_spatial, self.groups_out_channel, self.groups_in_channel,
                                    *self.cell_shape[1:])
        mixtures = mixtures.permute(0, 2, 4, 3, 5, 1, *range(6, 6 + d))
        weight = mixtures.reshape(-1, self.in_planes // self.groups, *self.kernel_size)
        out = _CONVS[d](x.reshape(1, -1, *x.shape[2:]), weight.to(x.dtype), None, self.stride, self.padding,
                        self.dilation, self.groups * B)
        out = out.reshape(B, -1, *out.shape[2:])
        if self.bias is not None:
            out = out + self.bias.to(out.dtype).reshape(1, -1, *([1] * d))
        return out

    def extra_repr(self) -> str:
        s = (f'{self.in_planes}, {self.out_planes}, kernel_size={self.kernel_size}, stride={self.stride}, '
             f'padding={self.padding}')
        if any(v != 1 for v in self.dilation):
            s += f', dilation={self.dilation}'
        if self.groups != 1:
            s += f', groups={self.groups}'
        s += f', bias={self.bias is not None}, warehouse_id={self.warehouse_id}'
        return s


@register('conv')
class KWConv1d(KWConvNd):
    """KernelWarehouse 1-D convolution: ``(B, C_in, L) -> (B, C_out, L_out)``."""

    dimension = 1
    layer_type = 'conv1d'
    spatial_dims = (1,)


@register('conv')
class KWConv2d(KWConvNd):
    """KernelWarehouse 2-D convolution: ``(B, C_in, H, W) -> (B, C_out, H_out, W_out)``."""

    dimension = 2
    layer_type = 'conv2d'
    spatial_dims = (2,)


@register('conv')
class KWConv3d(KWConvNd):
    """KernelWarehouse 3-D convolution: ``(B, C_in, D, H, W) -> (B, C_out, D_out, H_out, W_out)``."""

    dimension = 3
    layer_type = 'conv3d'
    spatial_dims = (3,)


@register('conv')
class KWLinear(LayerProtocol, nn.Module):
    """KernelWarehouse linear layer: ``(N, *, C_in) -> (N, *, C_out)``.

    A 1x1 :class:`KWConv1d` (its keys live under ``.conv.``, as in the official code) applied to
    the ``(N, C_in, L)`` view of the input, ``L`` the product of the middle dims; the attention
    pools over them, so each of the ``N`` leading items gets its own weights.
    """

    spatial_dims = (0,)
    static_init_options = KWConvNd.static_init_options

    def __init__(self, in_features: int, out_features: int, bias: bool = True, **kwargs: Any) -> None:
        super().__init__()
        kwargs.setdefault('kernel_size', 1)
        self.conv = KWConv1d(in_features, out_features, bias=bias, **kwargs)
        self.in_features = int(in_features)
        self.out_features = int(out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 2:
            raise ValueError(f'KWLinear expects (N, *, {self.in_features}) input, got {tuple(x.shape)}')
        shape = x.shape
        y = self.conv(x.reshape(shape[0], -1, shape[-1]).transpose(1, 2))
        return y.transpose(1, 2).reshape(*shape[:-1], -1)

    # -- protocol: that of the 1x1 KWConv1d inside, on the (C_in, L) view of a sample
    def static_weight_shape(self) -> Tuple[int, ...]:
        return (self.out_features, self.in_features)

    @staticmethod
    def _conv_shape(shape: Sequence[int]) -> Tuple[int, int]:
        return (int(shape[-1]), math.prod(int(s) for s in shape[:-1]))

    def conv_macs(self, in_shape: Sequence[int], out_shape: Sequence[int]) -> int:
        return self.conv.conv_macs(self._conv_shape(in_shape), self._conv_shape(out_shape))

    def extra_macs(self, in_shape: Sequence[int], out_shape: Sequence[int]) -> ExtraMacs:
        return self.conv.extra_macs(self._conv_shape(in_shape), self._conv_shape(out_shape))

    def init_from_static(self, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                         **options: Any) -> StaticInit:
        """As :meth:`KWConvNd.init_from_static`, for the ``nn.Linear`` weight ``(C_out, C_in)``."""
        if tuple(weight.shape) != self.static_weight_shape():
            raise StaticInitError(f'KWLinear: static weight of shape {tuple(weight.shape)} does not fit '
                                  f'{self.static_weight_shape()}')
        rec = self.conv.init_from_static(weight.unsqueeze(-1), bias, **options)
        rec.from_static = [f'conv.{n}' for n in rec.from_static]
        rec.by_rule = type(rec.by_rule)((f'conv.{k}', v) for k, v in rec.by_rule.items())
        return rec
