"""The warehouse manager: creates KW layers, their warehouses and their attentions (one per network).

Flow (the official one, used by the KW backbones)::

    manager = WarehouseManager(cell_num_ratio=0.5, sharing_range=('layer', 'conv'))
    self.conv = manager.reserve(64, 64, 3, padding=1, warehouse_name='stage1_layer0_conv1')
    ...
    manager.store()          # creates the warehouses (checks the ratios tile every layer)
    manager.allocate(self)   # creates each layer's attention, assigns and initialises cells

A warehouse ``w`` holds ``n`` cells of shape ``(c_o, c_i, *ck)`` (``ck`` all ones with spatial
partition, else the full kernel), saved as ``warehouse_manager.weights.<w>`` (index = order of first
reservation). Warehouses are stored cell-major (:func:`cell_major_empty`: same shape, key and values
as the official tensors, the ``n`` values of one kernel entry adjacent in memory), which the CPU
backend of the assembly reads fastest.
"""
from __future__ import annotations

import contextlib
import math
import weakref
from functools import partial
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .. import torch_internals
from ..base import IntOrTuple
from .conv import KWConv1d, KWConv2d, KWConv3d, KWConvNd, KWLinear
from .cpu_backend import CollectWarehouseGrad, KeepsKernelMemory, WarehouseGradSink, kept_memory
from .naming import check_sharing_range, fuse_warehouse_name, normalize_sharing_range
from .options import check_manager_options, per_warehouse

__all__ = ['WarehouseManager', 'cell_major_empty', 'release_kernel_buffers', 'owned_cell_count']

#: the most attention logits (mixtures x (cells + 1)) one layer may have: beyond it a warehouse is
#: shared so widely, with such small cells, that its attentions alone would not fit in memory (the
#: official settings stay below 3e4)
MAX_ATTENTION_LOGITS = 1 << 24
_LAYER_DIMS = {'conv1d': 1, 'conv2d': 2, 'conv3d': 3, 'linear': 1}
_PLAIN = {'conv1d': nn.Conv1d, 'conv2d': nn.Conv2d, 'conv3d': nn.Conv3d}


def owned_cell_count(num_mixtures: int, cell_num_ratio: float) -> int:
    """How many warehouse cells a layer with ``num_mixtures`` mixtures takes (its temperature prior).

    ``cell_num_ratio >= 1``: ``int(cell_num_ratio)`` cells per mixture. ``< 1``: with
    ``r = int(1 / cell_num_ratio)``, mixture ``m`` takes a cell iff ``m % r == (m // r) % r``
    (the others are biased toward the zero cell).
    """
    if cell_num_ratio >= 1:
        return num_mixtures * int(cell_num_ratio)
    r = int(1.0 / cell_num_ratio)
    return sum(1 for m in range(num_mixtures) if m % r == (m // r) % r)


def release_kernel_buffers(model: nn.Module) -> None:
    """Free the kernel memory the KW layers of ``model`` keep between passes: each layer's training
    kernels (:meth:`KWConvNd.training_kernel_buffer`, also freed by ``model.eval()``) and each
    manager's kernel-gradient and inference kernel memory (:meth:`WarehouseManager.kernel_grad_buffer`,
    :meth:`WarehouseManager.transient_kernel_buffer`)."""
    for m in model.modules():
        if isinstance(m, KeepsKernelMemory):
            m.release_kernel_memory()


def cell_major_empty(shape: Sequence[int], **kwargs: Any) -> torch.Tensor:
    """An uninitialised warehouse ``(n, c_o, c_i, *ck)`` stored cell-major: the ``n`` values of one kernel
    entry are adjacent in memory (strides ``(1, c_i * prod(ck) * n, ...)``). Shape, state-dict key and
    values are those of the official row-major tensor; ``load_state_dict``, ``.to()``, optimizers and DDP
    keep the layout (they copy into, or preserve the strides of, the parameter)."""
    n, cols = int(shape[0]), math.prod(int(v) for v in shape[1:])
    return torch.empty(cols, n, **kwargs).t().reshape(*shape)


class WarehouseManager(KeepsKernelMemory, nn.Module):
    """Creates KW layers, their warehouses and their attentions (one per network).

    Args (scalars, or one value per warehouse in order of first reservation, where noted):
        reduction: attention hidden width ratio (per warehouse).
        cell_num_ratio: cells in a warehouse / mixtures of its layers (per warehouse). The number of
            cells each layer takes must add up exactly to the warehouse size (checked in
            :meth:`store`); integers >= 1 always do, fractions only for suitable layer shapes.
        cell_inplane_ratio, cell_outplane_ratio: cell channels / gcd of the layers' channels
            (per warehouse); the resulting cells must tile every layer of the warehouse.
        sharing_range: name tokens that are shared, e.g. ``('layer', 'conv')``: ``stageA_layerB_convC``
            goes to warehouse ``stageA_layer_conv``. A string such as ``"layer_conv"`` (the official JSON
            configs) is read as ``('layer', 'conv')`` (:func:`normalize_sharing_range`).
        nonlocal_basis_ratio: ``< 1`` enables the attention's basis mode (per warehouse allowed).
        norm_layer: attention norm, ``'BN'`` (BatchNorm1d, batch-of-one safe) or ``'LN'``, an mmcv
            norm cfg dict or ``nn.BatchNorm1d`` / ``nn.LayerNorm`` (per warehouse allowed).
        spatial_partition: cut kernels into 1x1 cells (``True``) or keep whole kernels as cells, which
            then must all have the same size within a warehouse (per warehouse).

    Flow: ``reserve(...)`` each layer -> :meth:`store` -> :meth:`allocate` ``(network)``.
    """

    def __init__(self, reduction: Any = 0.0625, cell_num_ratio: Any = 1, cell_inplane_ratio: Any = 1,
                 cell_outplane_ratio: Any = 1, sharing_range: Union[str, Sequence[str], None] = (),
                 nonlocal_basis_ratio: Any = 1, norm_layer: Any = 'BN', spatial_partition: Any = True) -> None:
        super().__init__()
        owner = 'WarehouseManager'
        check_manager_options(owner, reduction=reduction, cell_num_ratio=cell_num_ratio,
                              cell_inplane_ratio=cell_inplane_ratio, cell_outplane_ratio=cell_outplane_ratio,
                              nonlocal_basis_ratio=nonlocal_basis_ratio, norm_layer=norm_layer,
                              spatial_partition=spatial_partition)
        self.sharing_range = normalize_sharing_range(sharing_range, owner)
        self.reduction = reduction
        self.cell_num_ratio = cell_num_ratio
        self.cell_inplane_ratio = cell_inplane_ratio
        self.cell_outplane_ratio = cell_outplane_ratio
        self.nonlocal_basis_ratio = nonlocal_basis_ratio
        self.norm_layer = norm_layer
        self.spatial_partition = spatial_partition
        self.warehouse_list: Dict[str, List[List[int]]] = {}
        self._settings: List[Dict[str, Any]] = []
        self.weights = nn.ParameterList()
        self._reserved_names: List[str] = []  # as given to reserve(), before fusion
        # warehouse index -> (weak view, sink, weak parameter) of the live training pass
        self._grad_views: Dict[int, Tuple[Any, WarehouseGradSink, Any]] = {}

    _memory_names = ('_kernel_grad_buffer', '_transient_kernel_buffer')
    _training_memory_names = ('_kernel_grad_buffer',)

    def __getstate__(self) -> Dict[str, Any]:
        state = super().__getstate__()
        state.pop('_grad_views', None)  # per-pass views of this instance's parameters: never copied
        return state

    def __setstate__(self, state: Dict[str, Any]) -> None:
        super().__setstate__(state)
        self._grad_views = {}

    # -- reserve -----------------------------------------------------------------------------
    def fuse_warehouse_name(self, warehouse_name: str) -> str:
        return fuse_warehouse_name(warehouse_name, self.sharing_range)

    def reserve(self, in_planes: int, out_planes: int, kernel_size: IntOrTuple = 1, stride: IntOrTuple = 1,
                padding: IntOrTuple = 0, dilation: IntOrTuple = 1, groups: int = 1, bias: bool = True,
                warehouse_name: str = 'default', enabled: bool = True, layer_type: str = 'conv2d') -> nn.Module:
        """Create a KW layer (or, with ``enabled=False``, a plain ``nn.ConvNd`` / ``nn.Linear``) and record
        its kernel shape in warehouse ``fuse_warehouse_name(warehouse_name)``."""
        if layer_type not in _LAYER_DIMS:
            raise ValueError(f'WarehouseManager.reserve: unknown layer_type {layer_type!r}; expected one of '
                             f'{list(_LAYER_DIMS)}')
        if not isinstance(warehouse_name, str) or not warehouse_name:
            raise ValueError(f'WarehouseManager.reserve: warehouse_name must be a non-empty string, '
                             f'got {warehouse_name!r}')
        if not enabled:
            if layer_type == 'linear':
                return nn.Linear(in_planes, out_planes, bias=bias)
            return _PLAIN[layer_type](in_planes, out_planes, kernel_size, stride=stride, padding=padding,
                                      dilation=dilation, groups=groups, bias=bias)
        if len(self.weights):
            raise RuntimeError(f'WarehouseManager.reserve({warehouse_name!r}): the warehouses are already stored; '
                               'reserve every layer before store()')
        self._reserved_names.append(warehouse_name)
        name = self.fuse_warehouse_name(warehouse_name)
        wid = list(self.warehouse_list).index(name) if name in self.warehouse_list else len(self.warehouse_list)
        common = dict(stride=stride, padding=padding, dilation=dilation, groups=groups,
                      warehouse_id=wid, warehouse_manager=self)
        if layer_type == 'linear':
            layer: nn.Module = KWLinear(in_planes, out_planes, bias=bias, kernel_size=kernel_size, **common)
            conv = layer.conv
        else:
            layer = conv = {'conv1d': KWConv1d, 'conv2d': KWConv2d, 'conv3d': KWConv3d}[layer_type](
                in_planes, out_planes, kernel_size, bias=bias, **common)
        self._record(name, conv)
        return layer

    def _record(self, name: str, conv: KWConvNd) -> int:
        if name not in self.warehouse_list:
            self.warehouse_list[name] = []
        self.warehouse_list[name].append(conv.weight_shape())
        wid = list(self.warehouse_list).index(name)
        conv.warehouse_id = wid
        conv._manager[0] = self
        return wid

    @property
    def num_warehouses(self) -> int:
        return len(self.warehouse_list)

    # -- store -------------------------------------------------------------------------------
    def store(self) -> None:
        """Create one cell tensor per warehouse (``randn``, stored cell-major; :meth:`allocate` initialises them).

        Raises ``ValueError`` (naming the warehouse, the layer and the value) when the cell sizes do
        not tile a layer of the warehouse or when the cells the layers take do not add up to the
        warehouse size.
        """
        check_sharing_range(self.sharing_range, self._reserved_names)
        settings = self._resolve_settings()
        shapes = [self._warehouse_shape(name, st) for name, st in zip(self.warehouse_list, settings)]
        self.weights = nn.ParameterList([nn.Parameter(cell_major_empty(shape).normal_()) for shape in shapes])
        self._settings = settings

    def plan(self) -> List[Tuple[str, Tuple[int, ...]]]:
        """``(warehouse name, cell tensor shape)`` per warehouse, as :meth:`store` would create them
        (same checks), without allocating anything."""
        settings = self._resolve_settings()
        return [(name, self._warehouse_shape(name, st)) for name, st in zip(self.warehouse_list, settings)]

    def _resolve_settings(self) -> List[Dict[str, Any]]:
        W = len(self.warehouse_list)
        opts = {k: per_warehouse(getattr(self, k), W, k) for k in (
            'reduction', 'cell_num_ratio', 'cell_inplane_ratio', 'cell_outplane_ratio', 'nonlocal_basis_ratio',
            'norm_layer', 'spatial_partition')}
        return [{k: v[idx] for k, v in opts.items()} for idx in range(W)]

    def _warehouse_shape(self, name: str, setting: Dict[str, Any]) -> Tuple[int, ...]:
        layers = self.warehouse_list[name]
        where = f'WarehouseManager: warehouse {name!r}'
        dims = {len(s) - 2 for s in layers}
        if len(dims) != 1:
            raise ValueError(f'{where} mixes layers with different numbers of kernel dims: {layers}')
        dim = dims.pop()
        out_gcd, in_gcd, kernel = layers[0][0], layers[0][1], layers[0][2:]
        for i, s in enumerate(layers):
            out_gcd, in_gcd = math.gcd(out_gcd, s[0]), math.gcd(in_gcd, s[1])
            if not setting['spatial_partition'] and s[2:] != kernel:
                raise ValueError(f'{where}: spatial_partition=False needs one kernel size per warehouse, but layer '
                                 f'#{i} has kernel {s[2:]} and layer #0 {kernel}')
        c_i = max(int(in_gcd * setting['cell_inplane_ratio']), 1)
        c_o = max(int(out_gcd * setting['cell_outplane_ratio']), 1)
        ck = [1] * dim if setting['spatial_partition'] else list(kernel)
        total = 0
        mixtures = []
        for i, s in enumerate(layers):
            if s[0] % c_o:
                raise ValueError(f'{where}: cell_outplane_ratio={setting["cell_outplane_ratio"]} gives cells with '
                                 f'{c_o} output channels, which do not tile layer #{i} (weight {s}, {s[0]} output '
                                 f'channels; the gcd over the warehouse is {out_gcd})')
            if s[1] % c_i:
                raise ValueError(f'{where}: cell_inplane_ratio={setting["cell_inplane_ratio"]} gives cells with '
                                 f'{c_i} input channels, which do not tile layer #{i} (weight {s}, {s[1]} input '
                                 f'channels per group; the gcd over the warehouse is {in_gcd})')
            gs = 1
            for d in range(dim):
                gs = int(gs * s[2 + d] // ck[d])
            total += gs * int(s[0] // c_o * s[1] // c_i)
            mixtures.append(gs * (s[0] // c_o) * (s[1] // c_i))
        ratio = setting['cell_num_ratio']
        n = max(int(total * ratio), 1)
        taken = sum(owned_cell_count(m, ratio) for m in mixtures)
        if taken != n:
            raise ValueError(f'{where}: cell_num_ratio={ratio} gives {n} cells (from {total} mixtures) but its '
                             f'{len(layers)} layers (mixtures {mixtures}) take {taken}; with a fractional '
                             f'cell_num_ratio every layer must take exactly its share. Use an integer ratio or '
                             f'other cell_inplane_ratio/cell_outplane_ratio for this warehouse')
        if setting['nonlocal_basis_ratio'] >= 1:  # each layer's fc2 has (cells + 1) logits per mixture
            widest = max(range(len(layers)), key=lambda i: mixtures[i])
            if mixtures[widest] * (n + 1) > MAX_ATTENTION_LOGITS:
                raise ValueError(
                    f'{where}: its {len(layers)} layers would share {n} cells of {c_o}x{c_i} channels, giving layer '
                    f'#{widest} (weight {layers[widest]}) an attention of {mixtures[widest]} mixtures x {n + 1} '
                    'logits; share a warehouse among fewer layers (e.g. sharing_range=(\'conv\',): one per block) or '
                    'use larger cells (cell_inplane_ratio / cell_outplane_ratio > 1)')
        if setting['nonlocal_basis_ratio'] < 1:
            for i, m in enumerate(mixtures):
                if int(ratio * m) > n:
                    raise ValueError(f'{where}: basis mode (nonlocal_basis_ratio='
                                     f'{setting["nonlocal_basis_ratio"]}) needs int(cell_num_ratio * mixtures) '
                                     f'<= cells, layer #{i} has {m} mixtures and the warehouse {n} cells')
        return (n, c_o, c_i, *ck)

    # -- allocate ----------------------------------------------------------------------------
    def allocate(self, network: nn.Module,
                 _init_weights: Callable = partial(nn.init.kaiming_normal_, mode='fan_out', nonlinearity='relu')
                 ) -> None:
        """Give every layer of this manager in ``network`` its cells (in ``network.modules()`` order)
        and its attention; initialise each layer's cells with ``_init_weights`` on the view
        ``(cells * c_o, c_i, *ck)``."""
        if len(self.weights) != len(self.warehouse_list):
            raise RuntimeError('WarehouseManager.allocate: call store() first')
        end = [0] * len(self.weights)
        seen = [0] * len(self.weights)
        for layer in network.modules():
            if not isinstance(layer, KWConvNd) or layer.manager is not self:
                continue
            wid = layer.warehouse_id
            setting = self._settings[wid]
            cells = self.weights[wid]
            start = end[wid]
            stop = layer.init_attention(cells, start, setting['reduction'], setting['cell_num_ratio'],
                                        norm_layer=setting['norm_layer'],
                                        nonlocal_basis_ratio=setting['nonlocal_basis_ratio'])
            if stop > start:
                with torch.no_grad():
                    block = torch.empty((stop - start) * cells.shape[1], *cells.shape[2:], dtype=cells.dtype,
                                        device=cells.device)
                    _init_weights(block)
                    cells[start:stop].copy_(block.view(stop - start, *cells.shape[1:]))
            end[wid] = stop
            seen[wid] += 1
        for wid, name in enumerate(self.warehouse_list):
            if seen[wid] != len(self.warehouse_list[name]):
                raise ValueError(f'WarehouseManager.allocate: {len(self.warehouse_list[name])} layers were reserved '
                                 f'in warehouse {name!r} but {seen[wid]} are in the network given to allocate() '
                                 '(give the module that contains every reserved layer)')
            if end[wid] != self.weights[wid].shape[0]:
                raise ValueError(f'WarehouseManager.allocate: warehouse {name!r} has {self.weights[wid].shape[0]} '
                                 f'cells but its layers in the network take {end[wid]}')

    @contextlib.contextmanager
    def official_layout(self) -> Iterator[None]:
        """Within the block, the warehouses are stored row-major, as the official code stores them
        (dynconv_mm stores them cell-major, :func:`cell_major_empty`); values and gradients are carried
        over both ways. The benchmark times the official-style reference this way."""
        relaid = []
        for p in self.weights:
            relaid.append((p, p.data))
            p.data = p.data.contiguous()
            if p.grad is not None:
                p.grad = p.grad.contiguous()
        try:
            yield
        finally:
            for p, stored in relaid:
                stored.copy_(p.data)
                if p.grad is not None:
                    p.grad = torch.empty_like(stored).copy_(p.grad)
                p.data = stored

    def forward(self, x: Any) -> Any:
        """Identity: the manager holds parameters only (harmless if it sits inside a Sequential)."""
        return x

    def cell_major(self, warehouse_idx: int) -> torch.Tensor:
        """Warehouse ``warehouse_idx`` as a ``(c_o * c_i * prod(ck), n)`` matrix: row ``r`` holds kernel entry
        ``r`` of every cell, the layout the blocked CPU assembly streams. The warehouses are stored that
        way (:func:`cell_major_empty`), so this is a view; a warehouse replaced by a row-major tensor
        (``functional_call``, ``param.data = ...``) is copied, which is correct but slower."""
        cells = self.weights[warehouse_idx]
        return cells.reshape(cells.shape[0], -1).t().contiguous()

    def kernel_grad_buffer(self, shape: Tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """Memory for the per-sample kernel gradient of one blocked KW layer in a backward pass.

        The gradient is consumed by the layer's assembly backward right after it is written, so all
        layers share one block of memory, the size of the largest kernel gradient: no page faults of
        a fresh multi-megabyte allocation per layer and step. Memory still referred to is never handed
        out again; ``train(False)``, moving or casting the module and :func:`release_kernel_buffers`
        release it, and copies or pickles never carry it."""
        return kept_memory(self, '_kernel_grad_buffer').take(shape, like)

    def transient_kernel_buffer(self, shape: Tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """Memory for the per-sample kernels of one blocked KW layer outside training (no graph keeps
        them): the convolution uses them and drops them, so all layers share one block of memory,
        the size of the largest kernel (kept until :func:`release_kernel_buffers` or a move/cast)."""
        return kept_memory(self, '_transient_kernel_buffer').take(shape, like)

    def cell_major_for_grad(self, warehouse_idx: int) -> Tuple[torch.Tensor, Optional[WarehouseGradSink]]:
        """:meth:`cell_major` for a blocked layer, with the sink its warehouse gradient goes to.

        While a graph that uses the warehouse is alive (between a training forward pass and its backward),
        every layer gets the same view, made by one :class:`~.cpu_backend.CollectWarehouseGrad` node, and the same
        :class:`~.cpu_backend.WarehouseGradSink`: the layers add their gradients into one buffer and the parameter
        receives the sum once. The view is held weakly, so it goes with the graph. Without grad mode, for
        a warehouse that needs no gradient or that is not stored cell-major, and where the torch internals
        the shared buffer rests on are unavailable (:mod:`~dynconv_mm.layers.torch_internals`):
        ``(cell_major(...), None)``.
        """
        cells = self.weights[warehouse_idx]
        if not (torch.is_grad_enabled() and cells.requires_grad and torch_internals.gradient_sink_supported()):
            return self.cell_major(warehouse_idx), None
        if not cells.reshape(cells.shape[0], -1).t().is_contiguous():
            return self.cell_major(warehouse_idx), None
        cached = self._grad_views.get(warehouse_idx)
        if cached is not None:
            wt = cached[0]()
            if (wt is not None and cached[2]() is cells and wt.data_ptr() == cells.data_ptr()
                    and wt.dtype == cells.dtype and wt.device == cells.device):
                return wt, cached[1]
        sink = WarehouseGradSink()
        wt = CollectWarehouseGrad.apply(cells, sink)
        self._grad_views[warehouse_idx] = (weakref.ref(wt), sink, weakref.ref(cells))
        return wt, sink

    def extra_repr(self) -> str:
        return f'warehouses={len(self.weights)}, sharing_range={self.sharing_range}'
