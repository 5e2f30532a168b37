"""KernelWarehouse: dynamic convolution assembled from warehouses of shared kernel cells.

Li & Yao, *KernelWarehouse: Rethinking the Design of Dynamic Convolution*, ICML 2024
(arXiv:2308.08361). Layer semantics and state-dict keys follow the official implementation
(``OSVAI/KernelWarehouse``, ``modules/kernel_warehouse.py``) so that its checkpoints load as they
are.

How it works
------------
A *warehouse* ``w`` holds ``n`` cells ``E`` of shape ``(n, c_o, c_i, *ck)`` (``ck`` is all ones
with spatial partition, else the full kernel). It is a parameter of the
:class:`WarehouseManager`, saved as ``warehouse_manager.weights.<w>``. A KW layer with ``C_out``,
``C_in``, ``groups`` and kernel ``k`` is cut into ``M = G_s * G_o * G_i`` kernel *mixtures* with
``G_o = C_out / c_o``, ``G_i = (C_in / groups) / c_i`` and ``G_s = prod(k / ck)``. For each
sample its attention gives ``alpha (M, n)``; mixture ``m`` is ``sum_j alpha[m, j] E_j``, and the
mixtures are laid out with the spatial index slowest, then the output group, then the input group
(``m = (s * G_o + o) * G_i + i``). The per-sample kernels are applied with
:func:`dynconv_mm.layers.batched.batched_conv`. Warehouses are stored cell-major
(:func:`cell_major_empty`: same shape, key and values as the official tensors, the ``n`` values of
one kernel entry adjacent in memory), which the CPU kernel assembly reads fastest.

Two ways to build KW layers
---------------------------
* With a manager (the official flow; the KW backbones use it)::

      manager = WarehouseManager(cell_num_ratio=0.5, sharing_range=('layer', 'conv'))
      self.conv = manager.reserve(64, 64, 3, padding=1, warehouse_name='stage1_layer0_conv1')
      ...
      manager.store()          # creates the warehouses (checks the ratios tile every layer)
      manager.allocate(self)   # creates each layer's attention, assigns and initialises cells

* Through ``conv_cfg`` (stock mmdet / mmseg / mmpretrain models)::

      conv_cfg = dict(type='KWConv2d', cell_num_ratio=1, sharing_range=('layer', 'conv'))

  ``mmcv.cnn.build_conv_layer`` then creates *unbound* layers (no manager yet). Right after a
  model is built through a ``MODELS`` registry, :func:`allocate_warehouses` groups them into
  warehouses by their module paths (see :func:`path_warehouse_key`), attaches one
  :class:`WarehouseManager` as ``warehouse_manager`` to the smallest module containing them all
  and allocates it. Call :func:`allocate_warehouses` yourself for models built without a registry.
"""
from __future__ import annotations

import fnmatch
import math
import numbers
import threading
import weakref
from functools import partial
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ..registry import register, register_post_build
from .attention import build_attention_norm, kw_attention, pooled_context
from .batched import _plain_eager, batched_conv
from .native import kw_assemble_backward, kw_assemble_into
from .temperature import TemperatureMixin

__all__ = [
    'KWAttention', 'KWConvNd', 'KWConv1d', 'KWConv2d', 'KWConv3d', 'KWLinear', 'WarehouseManager',
    'allocate_warehouses', 'normalize_sharing_range', 'fuse_warehouse_name', 'path_warehouse_key',
    'owned_cell_count', 'cell_major_empty', 'release_kernel_buffers'
]

IntOrTuple = Union[int, Sequence[int]]

#: options a KW layer built through ``conv_cfg`` accepts (all of the manager's options)
MANAGER_OPTIONS = ('reduction', 'cell_num_ratio', 'cell_inplane_ratio', 'cell_outplane_ratio', 'sharing_range',
                   'nonlocal_basis_ratio', 'norm_layer', 'spatial_partition')
#: defaults of an unbound layer (``conv_cfg`` path); the sharing default gives one warehouse per stage
UNBOUND_DEFAULTS: Dict[str, Any] = dict(reduction=0.0625, cell_num_ratio=1, cell_inplane_ratio=1,
                                        cell_outplane_ratio=1, sharing_range=('layer', 'conv'),
                                        nonlocal_basis_ratio=1, norm_layer='BN', spatial_partition=True)

_LAYER_DIMS = {'conv1d': 1, 'conv2d': 2, 'conv3d': 3, 'linear': 1}
_PLAIN = {'conv1d': nn.Conv1d, 'conv2d': nn.Conv2d, 'conv3d': nn.Conv3d}


# --------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------
def _tuple(value: IntOrTuple, n: int, what: str, owner: str, minimum: int = 0) -> Tuple[int, ...]:
    """``value`` as an ``n``-tuple of ints >= ``minimum`` (ValueError naming ``owner`` otherwise)."""
    if isinstance(value, bool) or isinstance(value, str):
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
    if any(v < minimum for v in out):
        raise ValueError(f'{owner}: {what} must be >= {minimum}, got {value!r}')
    return out


def _is_sequence(value: Any) -> bool:
    return isinstance(value, (list, tuple))


def _per_warehouse(value: Any, n: int, what: str) -> list:
    """The official ``parse``: a scalar or a length-1 sequence is repeated, a length-n one kept."""
    if _is_sequence(value):
        if len(value) == 1:
            return [value[0]] * n
        if len(value) == n:
            return list(value)
        raise ValueError(f'WarehouseManager: {what} has {len(value)} values but there are {n} warehouses '
                         '(give one value, or one per warehouse in order of first reservation)')
    return [value] * n


def _check_ratio(value: Any, what: str, owner: str) -> None:
    values = value if _is_sequence(value) else [value]
    if not values:
        raise ValueError(f'{owner}: {what} must not be an empty sequence')
    for v in values:
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not v > 0 or math.isinf(v):
            raise ValueError(f'{owner}: {what} must be a positive number (or one per warehouse), got {value!r}')


def normalize_sharing_range(sharing_range: Union[str, Sequence[str], None], owner: str = 'WarehouseManager'
                            ) -> Tuple[str, ...]:
    """Normalise ``sharing_range`` to a tuple of non-empty strings.

    The official JSON configs give a string such as ``"layer_conv"``, which the official manager
    iterates character by character. Here a string is read as the ``'_'``-separated list it stands
    for (``"layer_conv" -> ('layer', 'conv')``). For every name scheme of the KW backbones (and
    every shipped config) this gives the same warehouses as the character reading. A tuple of
    single characters (the official ``tuple("layer")``) is kept as it is and keeps its meaning.
    """
    if sharing_range is None:
        return ()
    if isinstance(sharing_range, str):
        entries = tuple(s for s in sharing_range.replace(',', '_').split('_') if s.strip())
        return tuple(s.strip() for s in entries)
    if not _is_sequence(sharing_range):
        raise ValueError(f'{owner}: sharing_range must be a string or a sequence of strings, got {sharing_range!r}')
    for entry in sharing_range:
        if not isinstance(entry, str) or not entry:
            raise ValueError(f'{owner}: sharing_range entries must be non-empty strings, got {entry!r} in '
                             f'{sharing_range!r}')
        if '_' in entry and entry != '_':  # '_' alone (from tuple('layer_conv')) is harmless
            raise ValueError(f'{owner}: sharing_range entry {entry!r} contains "_" and could never match a name '
                             f'token; write {tuple(entry.split("_"))!r} (or the string {entry!r})')
    return tuple(sharing_range)


def fuse_warehouse_name(name: str, sharing_range: Sequence[str]) -> str:
    """The official name fusion: each ``'_'``-separated token that starts with a sharing entry is
    replaced by that entry (later entries win). ``stage2_layer3_conv1`` with ``('layer', 'conv')``
    gives ``stage2_layer_conv``: every conv of every block of stage 2 shares one warehouse."""
    return '_'.join(_fuse_token(tok, sharing_range) for tok in name.split('_'))


def _fuse_token(token: str, sharing_range: Sequence[str]) -> str:
    for entry in sharing_range:
        if token.startswith(entry):
            token = entry
    return token


def path_warehouse_key(path: str, depthwise: bool, sharing_range: Sequence[str]) -> str:
    """Warehouse name of a layer created through ``conv_cfg``, from its module path.

    The path (relative to the module the warehouses are attached to) is read as
    ``stage / layer / conv``:

    * ``stage``: the path up to the first component that is followed by a numeric one (the
      container of the blocks, e.g. ``layer2`` in ``layer2.1.conv1``); if there is none, the parent
      path (``''`` for a top-level layer such as a ResNet stem ``conv1``);
    * ``layer``: the components between ``stage`` and the last one (``1``, ``0.downsample``);
    * ``conv``: the last component, prefixed by the layer kind, ``dwconv`` for depth-wise layers
      (``groups == C_in == C_out > 1``) and ``conv`` otherwise.

    Each part, written ``stage<stage>``, ``layer<layer>`` and ``<kind><conv>``, is fused with
    ``sharing_range`` like a token of an official name (:func:`fuse_warehouse_name`). So with
    ``('layer', 'conv')`` (the default) every non-depth-wise conv of a ResNet stage shares one
    warehouse (``layer2.*``), depth-wise convs of a stage share another one per conv name, and the
    stem gets its own; ``('conv',)`` gives one warehouse per block and ``()`` one per layer.
    """
    parts = path.split('.') if path else []
    if not parts:
        stage, layer, conv = '', '', ''
    else:
        cut = None
        for i in range(len(parts) - 1):
            if parts[i + 1].isdigit():
                cut = i
                break
        if cut is None:
            stage, layer = '.'.join(parts[:-1]), ''
        else:
            stage, layer = '.'.join(parts[:cut + 1]), '.'.join(parts[cut + 1:-1])
        conv = parts[-1]
    kind = 'dwconv' if depthwise else 'conv'
    tokens = ('stage' + stage, 'layer' + layer, kind + conv)
    return '_'.join(_fuse_token(t, sharing_range) for t in tokens)


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


# --------------------------------------------------------------------------------------------
# attention
# --------------------------------------------------------------------------------------------
class KWAttention(TemperatureMixin, nn.Module):
    """Attention of a KW layer over the cells of its warehouse (paper Sec. 3.3).

    ``x (B, C_in, *S)`` -> mean over ``S`` -> ``fc1`` -> norm -> ReLU -> ``fc2`` (-> basis mapping)
    -> per mixture ``P = n + 1`` logits -> :func:`~dynconv_mm.layers.attention.kw_attention`
    -> ``(B, M, n)``.

    Args:
        in_planes: ``C_in`` of the layer.
        reduction: hidden width ``max(int(in_planes * reduction), 16)``.
        num_static_cell: ``n``, cells in the warehouse.
        num_local_mixture: ``M``, mixtures of the layer.
        norm_layer: ``'BN'`` (then ``fc1`` has no bias) or ``'LN'`` (``fc1`` with bias), or a cfg dict.
        cell_num_ratio: the warehouse's ``cell_num_ratio`` (sizes the basis mode's local part).
        nonlocal_basis_ratio: ``< 1`` enables the basis mode: the logits of the cells owned by other
            layers are produced from ``max(int(n_nonlocal * ratio), 16)`` basis logits through ``fc3``.
        start_cell_idx: index of the layer's first own cell in the warehouse.

    The temperature prior ``temp_bias (M * P,)`` is a non-persistent buffer derived from
    ``start_cell_idx`` and ``cell_num_ratio`` (never saved); the temperature is the
    :class:`TemperatureMixin` buffer (0 at construction).
    """

    def __init__(self, in_planes: int, reduction: float, num_static_cell: int, num_local_mixture: int,
                 norm_layer: Any = 'BN', cell_num_ratio: float = 1.0, nonlocal_basis_ratio: float = 1.0,
                 start_cell_idx: int = 0) -> None:
        super().__init__()
        hidden = max(int(in_planes * reduction), 16)
        self.kw_planes_per_mixture = num_static_cell + 1
        self.num_local_mixture = num_local_mixture
        self.kw_planes = self.kw_planes_per_mixture * num_local_mixture
        self.num_local_cell = int(cell_num_ratio * num_local_mixture)
        self.num_nonlocal_cell = num_static_cell - self.num_local_cell
        self.start_cell_idx = int(start_cell_idx)
        self.basis_mode = nonlocal_basis_ratio < 1.0

        norm, fc_bias = build_attention_norm(norm_layer, hidden, owner='KWAttention')
        self.fc1 = nn.Linear(in_planes, hidden, bias=fc_bias)
        self.norm1 = norm
        self.act1 = nn.ReLU(inplace=True)
        if not self.basis_mode:
            self.fc2 = nn.Linear(hidden, self.kw_planes, bias=True)
        else:
            if self.num_nonlocal_cell < 0:
                raise ValueError(f'KWAttention: basis mode needs at least int(cell_num_ratio * M) = '
                                 f'{self.num_local_cell} cells, the warehouse has {num_static_cell}')
            self.num_basis = max(int(self.num_nonlocal_cell * nonlocal_basis_ratio), 16)
            self.fc2 = nn.Linear(hidden, (self.num_local_cell + self.num_basis + 1) * num_local_mixture, bias=False)
            self.fc3 = nn.Linear(self.num_basis, self.num_nonlocal_cell, bias=False)
            self.basis_bias = nn.Parameter(torch.zeros(self.kw_planes))
        self.register_buffer('temp_bias', torch.zeros(self.kw_planes), persistent=False)
        self.init_temperature(0.0)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.modules.batchnorm._BatchNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def update_temperature(self, value: float) -> None:
        """Official name of :meth:`set_temperature`."""
        self.set_temperature(value)

    @torch.no_grad()
    def init_temp_bias(self, start_cell_idx: int, cell_num_ratio: float) -> int:
        """Build the temperature prior from the layer's first own cell; returns the next free cell."""
        P = self.kw_planes_per_mixture
        bias = torch.zeros(self.kw_planes)
        idx = int(start_cell_idx)
        if cell_num_ratio >= 1.0:
            step = int(cell_num_ratio)
            for m in range(self.num_local_mixture):
                bias[m * P + idx] = 1
                idx += step
        else:
            r = int(1.0 / cell_num_ratio)
            for m in range(self.num_local_mixture):
                if m % r == (m // r) % r:
                    bias[m * P + idx] = 1
                    idx += 1
                else:
                    bias[m * P + P - 1] = 1
        self.temp_bias.copy_(bias)
        return idx

    def _map_basis(self, logits: torch.Tensor) -> torch.Tensor:
        """``(B, M * (n_local + n_basis + 1))`` -> ``(B, M, P)`` logits in warehouse cell order."""
        B = logits.shape[0]
        x = logits.reshape(B, self.num_local_mixture, self.num_local_cell + self.num_basis + 1)
        local = x[..., :self.num_local_cell]
        nonlocal_ = self.fc3(x[..., self.num_local_cell:-1])
        s = self.start_cell_idx
        x = torch.cat([nonlocal_[..., :s], local, nonlocal_[..., s:], x[..., -1:]], dim=-1)
        return x + self.basis_bias.reshape(self.num_local_mixture, self.kw_planes_per_mixture)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C_in, *S) -> (B, M, n)``."""
        h = self.act1(self.norm1(self.fc1(pooled_context(x))))
        logits = self.fc2(h)
        if self.basis_mode:
            logits = self._map_basis(logits)
        else:
            logits = logits.reshape(logits.shape[0], self.num_local_mixture, self.kw_planes_per_mixture)
        prior = self.temp_bias.reshape(self.num_local_mixture, self.kw_planes_per_mixture)
        return kw_attention(logits, self.temperature, prior)

    def extra_repr(self) -> str:
        return (f'mixtures={self.num_local_mixture}, cells={self.kw_planes_per_mixture - 1}, '
                f'start_cell_idx={self.start_cell_idx}, basis={self.basis_mode}')


# --------------------------------------------------------------------------------------------
# kernel assembly
# --------------------------------------------------------------------------------------------
#: floats of one block of the blocked CPU assembly (warehouse rows + products): ~1 MiB keeps a block
#: and its products in a core's L2 cache
ASSEMBLY_BLOCK_ENTRIES = 1 << 20
#: warehouses smaller than this (floats) stay in cache; one product with them has less overhead than
#: the blocked form (measured on a 2-core AVX-512 CPU)
BLOCKED_ASSEMBLY_MIN_CELLS = 1 << 20


class _BlockedAssembly(torch.autograd.Function):
    """``kernel = permute(attention @ cells)`` from the cell-major warehouse, block by block.

    Takes the warehouse as ``wt (cols, n)``: each row holds one kernel entry of every cell
    (:meth:`WarehouseManager.cell_major`). The product ``wt @ attention^T`` is a tall-skinny
    matrix product that reads the warehouse once, 2-4x faster on CPUs than ``attention @ cells``
    with its few rows (4-9 per layer at batch 1; ``docs/benchmark.md``). Each block of ``rows`` cell
    output channels is multiplied, stays in cache and is written straight into its place in the kernel
    layout ``(B, G_o, c_o, G_i, c_i, G_s, *ck)``, so neither the mixture tensor nor a permuted copy of
    it is materialised; the backward pass is blocked the same way and adds the warehouse gradient in
    place into the buffer the layers of the pass share (``sink``, a :class:`_WarehouseGradSink`; ``None``:
    a gradient of its own, returned to autograd). ``alloc(shape, like)``, when given, supplies the
    kernel tensor (a layer's reused training buffer, :meth:`KWConvNd.training_kernel_buffer`). Same
    numbers as the one-product form: every kernel entry is one dot product over the ``n`` cells.

    In float32 with up to :data:`~dynconv_mm.layers.native.KW_ASSEMBLY_MAX_COLUMNS` columns, both
    passes run in the native kernels instead (:func:`~dynconv_mm.layers.native.kw_assemble_into`,
    :func:`~dynconv_mm.layers.native.kw_assemble_backward`: no blocks, no permuted copies), with the
    same kernel layout, sink and buffers; the blocked products are the fallback.
    """

    @staticmethod
    def forward(ctx, attention: torch.Tensor, wt: torch.Tensor, shape: Tuple[int, ...], groups: Tuple[int, int, int],
                rows: int, sink: Optional['_WarehouseGradSink'] = None,
                alloc: Optional[Callable[[Tuple[int, ...], torch.Tensor], torch.Tensor]] = None) -> torch.Tensor:
        B, M, n = attention.shape
        G_s, G_o, G_i = groups
        c_o, c_i, ck = shape[1], shape[2], tuple(shape[3:])
        kernel_shape = (B, G_o, c_o, G_i, c_i, G_s) + ck
        kernel = attention.new_empty(kernel_shape) if alloc is None else alloc(kernel_shape, attention)
        if not kw_assemble_into(kernel, wt, attention, groups):
            d = len(ck)
            # block (p, c_i, *ck, B, G_s, G_o, G_i) -> kernel (B, G_o, p, G_i, c_i, G_s, *ck)
            to_kernel = (2 + d, 4 + d, 0, 5 + d, 1, 3 + d) + tuple(range(2, 2 + d))
            a_t = attention.reshape(B * M, n).t()
            per_row = wt.shape[0] // c_o
            for p0 in range(0, c_o, rows):
                p1 = min(p0 + rows, c_o)
                block = torch.mm(wt[p0 * per_row:p1 * per_row], a_t)
                kernel[:, :, p0:p1].copy_(block.reshape((p1 - p0, c_i) + ck + (B, G_s, G_o, G_i)).permute(to_kernel))
        ctx.save_for_backward(attention, wt)
        ctx.shape, ctx.groups, ctx.rows = shape, groups, rows
        ctx.sink = sink
        ctx.sink_node = wt.grad_fn if sink is not None else None
        return kernel

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        attention, wt = ctx.saved_tensors
        B, M, n = attention.shape
        c_o, ck = ctx.shape[1], tuple(ctx.shape[3:])
        d = len(ck)
        # kernel (B, G_o, p, G_i, c_i, G_s, *ck) -> block (p, c_i, *ck, B, G_s, G_o, G_i)
        to_block = (2, 4) + tuple(range(6, 6 + d)) + (0, 5, 1, 3)
        rows = ctx.rows
        a = attention.reshape(B * M, n)
        per_row = wt.shape[0] // c_o
        need_a, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if torch.is_grad_enabled():  # a differentiable backward (create_graph): out-of-place products
            g = grad.permute(to_block).reshape(wt.shape[0], B * M)
            return ((g.t() @ wt).reshape(B, M, n) if need_a else None, g @ a if need_w else None,
                    None, None, None, None, None)
        # the warehouse gradient goes into the pass's shared buffer (see _WarehouseGradSink) unless no
        # gradient reaches the warehouse in this backward call
        sink = ctx.sink if need_w else None
        fresh = False
        if sink is not None:
            if not torch._C._will_engine_execute_node(ctx.sink_node):
                need_w, sink = False, None
            else:
                grad_w, fresh = sink.buffer(wt)
        if sink is None:
            grad_w = torch.empty_like(wt) if need_w else None
        done, grad_a = kw_assemble_backward(grad, wt, attention, ctx.groups, grad_w,
                                            accumulate=sink is not None and not fresh, need_attention=need_a)
        if done:
            return grad_a, None if sink is not None else grad_w, None, None, None, None, None
        # the attention gradient is accumulated transposed, (n, B*M): on the CPUs measured MKL runs
        # wt^T @ g 20-35 % faster than g^T @ wt for these shapes (a long inner dimension, a small output)
        grad_at = attention.new_zeros(n, B * M) if need_a else None
        for p0 in range(0, c_o, rows):
            p1 = min(p0 + rows, c_o)
            g = grad[:, :, p0:p1].permute(to_block).reshape((p1 - p0) * per_row, B * M)
            span = slice(p0 * per_row, p1 * per_row)
            if need_a:
                grad_at.addmm_(wt[span].t(), g)
            if need_w:
                if sink is None or fresh:
                    torch.mm(g, a, out=grad_w[span])
                else:
                    grad_w[span].addmm_(g, a)
        if sink is not None:
            grad_w = None
        return (None if grad_at is None else grad_at.t().reshape(B, M, n), grad_w, None, None, None, None, None)


class _WarehouseGradSink:
    """One warehouse's gradient, accumulated over the KW layers of a forward pass.

    Every blocked layer of a pass takes its warehouse matrix from one :class:`_CollectWarehouseGrad`
    node and adds its gradient into this buffer in place (``addmm_``), block by block, instead of
    returning a fresh warehouse-sized gradient that autograd would then add up layer by layer. The
    collecting node runs after all of them (they all depend on its output) and hands the sum to the
    parameter once. Buffers are kept per backward call (autograd graph task), so separate or
    interleaved backward calls through one graph never mix."""

    __slots__ = ('_buffers',)

    def __init__(self) -> None:
        self._buffers: Dict[int, torch.Tensor] = {}

    def buffer(self, like: torch.Tensor) -> Tuple[torch.Tensor, bool]:
        """The current backward call's buffer, and whether it is new (the first layer overwrites it
        entirely; later layers add to it)."""
        task = torch._C._current_graph_task_id()
        buf = self._buffers.get(task)
        if buf is None:
            buf = self._buffers[task] = torch.empty_like(like)
            return buf, True
        return buf, False

    def pop(self) -> Optional[torch.Tensor]:
        return self._buffers.pop(torch._C._current_graph_task_id(), None)


class _CollectWarehouseGrad(torch.autograd.Function):
    """``cells (n, c_o, c_i, *ck) -> (c_o * c_i * prod(ck), n)`` view whose backward returns the
    gradient the blocked layers accumulated in ``sink`` (plus any gradient autograd brings)."""

    @staticmethod
    def forward(ctx, cells: torch.Tensor, sink: _WarehouseGradSink) -> torch.Tensor:
        ctx.sink = sink
        ctx.cells_shape = cells.shape
        ctx.set_materialize_grads(False)
        return cells.reshape(cells.shape[0], -1).t()

    @staticmethod
    def backward(ctx, grad: Optional[torch.Tensor]):
        total = ctx.sink.pop()
        if grad is not None:
            total = grad if total is None else total.add_(grad)
        if total is None:
            return None, None
        return total.t().reshape(ctx.cells_shape), None


def _blocked_assembly_applies(attention: torch.Tensor, cells: torch.Tensor) -> bool:
    """The blocked form is for float CPU tensors in eager mode outside autocast (one product elsewhere:
    on GPUs, and for tracing, exporting and torch.compile, which see plain tensor operations)."""
    if not _plain_eager():
        return False
    return (cells.numel() >= BLOCKED_ASSEMBLY_MIN_CELLS
            and attention.device.type == 'cpu' and cells.device.type == 'cpu'
            and attention.dtype == cells.dtype and attention.dtype in (torch.float32, torch.float64)
            and not torch.is_autocast_enabled('cpu'))


def _storage_refs(t: torch.Tensor) -> int:
    """References to ``t``'s storage (tensors sharing it, plus one for the query itself)."""
    return torch._C._storage_Use_Count(t.untyped_storage()._cdata)


_REUSE_BUFFERS = hasattr(torch._C, '_storage_Use_Count')


class _ReusableMemory:
    """One block of memory, handed out again once nothing refers to it any more.

    :meth:`take` returns a contiguous tensor of ``shape`` on this memory when it is large enough, of
    ``like``'s dtype and device, and free (no tensor shares its storage any longer); otherwise new
    memory, which is kept for the next call. Large CPU tensors allocated afresh cost a page fault per
    4 KiB page on first write; memory handed out again does not. The returned tensors alias the
    memory without being views of it."""

    __slots__ = ('tensor', '_free_refs', '_lock')

    def __init__(self) -> None:
        self.tensor: Optional[torch.Tensor] = None
        self._free_refs = 0
        self._lock = threading.Lock()

    def take(self, shape: Tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        numel = math.prod(shape)
        with self._lock:  # check and hand out in one step (threads sharing a model)
            buf = self.tensor
            if not (buf is not None and buf.numel() >= numel and buf.dtype == like.dtype
                    and buf.device == like.device and _storage_refs(buf) == self._free_refs):
                buf = like.new_empty(numel)
                if _REUSE_BUFFERS:
                    self.tensor, self._free_refs = buf, _storage_refs(buf)
            return torch.empty(0, dtype=buf.dtype, device=buf.device).set_(buf.untyped_storage(), 0, tuple(shape))


def _memory(module: nn.Module, name: str) -> _ReusableMemory:
    memory = module.__dict__.get(name)
    if memory is None:
        memory = module.__dict__[name] = _ReusableMemory()
    return memory


class _KeepsKernelMemory:
    """Mixin of the modules that keep :class:`_ReusableMemory` attributes (``_memory_names``): moving or
    casting the module releases all of them, ``train(False)`` those only training uses
    (``_training_memory_names``), and copies and pickles of the module never carry them."""

    _memory_names: Tuple[str, ...] = ()
    _training_memory_names: Tuple[str, ...] = ()

    def release_kernel_memory(self, names: Optional[Sequence[str]] = None) -> None:
        """Free the kept kernel memory (``names``: only those attributes)."""
        for name in self._memory_names if names is None else names:
            self.__dict__.pop(name, None)

    def train(self, mode: bool = True):
        if not mode:
            self.release_kernel_memory(self._training_memory_names)
        return super().train(mode)

    def _apply(self, fn, recurse: bool = True):
        self.release_kernel_memory()
        return super()._apply(fn, recurse)

    def __getstate__(self) -> Dict[str, Any]:
        state = dict(super().__getstate__())
        for name in self._memory_names:
            state.pop(name, None)
        return state


# --------------------------------------------------------------------------------------------
# layers
# --------------------------------------------------------------------------------------------
class KWConvNd(_KeepsKernelMemory, nn.Module):
    """Base of :class:`KWConv1d`, :class:`KWConv2d` and :class:`KWConv3d`.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups: as ``nn.ConvNd``
            (numeric padding only).
        bias: add a learnable per-channel bias (zero-initialised), key ``<layer>.bias``.
        warehouse_id: index of the layer's warehouse in ``warehouse_manager`` (set by ``reserve``).
        warehouse_manager: the :class:`WarehouseManager` owning the warehouse. It is referenced, not
            registered as a sub-module (the warehouse appears once in the state dict, under the
            module the manager is attached to).
        warehouse_name: for a layer created without a manager (``conv_cfg``): force the warehouse
            name instead of deriving it from the module path.
        **options: for a layer created without a manager: the manager options it asks for
            (``reduction``, ``cell_num_ratio``, ``cell_inplane_ratio``, ``cell_outplane_ratio``,
            ``sharing_range``, ``nonlocal_basis_ratio``, ``norm_layer``, ``spatial_partition``;
            defaults :data:`UNBOUND_DEFAULTS`). Layers sharing a warehouse must agree on them.
            Also ``exclude``: module path patterns (``fnmatch``, relative to the model given to
            :func:`allocate_warehouses`, e.g. ``'conv1'`` for a ResNet stem); a matching layer is
            replaced by the plain ``nn.ConvNd`` / ``nn.Linear`` at allocation.

    Input ``(B, C_in, *S)``, output ``(B, C_out, *S_out)``.
    """

    dimension: int = 0
    layer_type: str = ''
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
        self.kernel_size = _tuple(kernel_size, d, 'kernel_size', spec, minimum=1)
        self.stride = _tuple(stride, d, 'stride', spec, minimum=1)
        self.padding = _tuple(padding, d, 'padding', spec, minimum=0)
        self.dilation = _tuple(dilation, d, 'dilation', spec, minimum=1)
        self.transposed = False
        self.output_padding = (0,) * d
        self.bias = nn.Parameter(torch.zeros(self.out_planes)) if bias else None
        self.warehouse_id = warehouse_id
        self._manager: List[Optional[WarehouseManager]] = [warehouse_manager]
        self._exclude: Tuple[str, ...] = ()
        self._warehouse_name: Optional[str] = None
        self.cell_shape: Optional[Tuple[int, ...]] = None
        if warehouse_manager is not None:
            if options or warehouse_name is not None:
                raise ValueError(f'{spec}: manager options {sorted(options)} are given to the manager, not to a '
                                 'layer it reserves')
            self._options: Optional[Dict[str, Any]] = None
        else:
            exclude = options.pop('exclude', ())
            exclude = (exclude,) if isinstance(exclude, str) else exclude
            if not _is_sequence(exclude) or not all(isinstance(e, str) and e for e in exclude):
                raise ValueError(f'{spec}: exclude must be a module path pattern or a sequence of them, '
                                 f'got {exclude!r}')
            self._exclude = tuple(exclude)
            unknown = sorted(set(options) - set(MANAGER_OPTIONS))
            if unknown:
                raise ValueError(f'{spec}: unknown option(s) {unknown}; a KW layer accepts '
                                 f'{list(MANAGER_OPTIONS) + ["exclude", "warehouse_name"]}')
            for k, v in options.items():
                if k != 'sharing_range' and _is_sequence(v):
                    raise ValueError(f'{spec}: {k}={v!r}: a layer built without a manager takes one value per '
                                     'option (per-warehouse sequences are for WarehouseManager)')
            opts = dict(UNBOUND_DEFAULTS, **options)
            opts['sharing_range'] = normalize_sharing_range(opts['sharing_range'], owner=spec)
            WarehouseManager(**opts)  # validates every option now, at build time
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
        and step (about a tenth of a KW-ResNet-50 CPU training step). It is reused only when no tensor
        still refers to it (after the backward pass; two forwards before one backward get separate
        memory), and it is released by ``train(False)`` / ``eval()``, by moving or casting the module
        and by :func:`release_kernel_buffers`; copies and pickles of the module never carry it.
        """
        return _memory(self, '_kernel_buffer').take(shape, like)

    def assemble_kernel(self, attention: torch.Tensor) -> torch.Tensor:
        """Per-sample kernels ``(B, C_out, C_in / groups, *k)`` from the attention ``(B, M, n)``.

        On the CPU (eager, float32/64, no autocast) the product with the warehouse runs in blocks of
        cell rows that are written straight into the kernel layout (:class:`_BlockedAssembly`);
        elsewhere one product followed by a reshape/permute. Both give the same numbers."""
        manager = self._check_ready()
        blocked = _blocked_assembly_applies(attention, manager.weights[self.warehouse_id])
        return self._assemble(attention, manager, blocked)

    def _assemble(self, attention: torch.Tensor, manager: 'WarehouseManager', blocked: bool) -> torch.Tensor:
        """:meth:`assemble_kernel` with the choice of the blocked form already made."""
        cells = manager.weights[self.warehouse_id]
        B = attention.shape[0]
        n = cells.shape[0]
        if blocked:
            wt, sink = manager.cell_major_for_grad(self.warehouse_id)
            per_row = cells[0, 0].numel()  # warehouse rows per cell output channel
            rows = max(1, ASSEMBLY_BLOCK_ENTRIES // (per_row * (n + B * attention.shape[1])))
            if torch.is_grad_enabled() and (attention.requires_grad or cells.requires_grad):
                alloc = self.training_kernel_buffer  # kept for the backward pass
            else:
                alloc = manager.transient_kernel_buffer  # used by the convolution and dropped
            kernel = _BlockedAssembly.apply(attention, wt, tuple(cells.shape), (
                self.groups_spatial, self.groups_out_channel, self.groups_in_channel), rows, sink, alloc)
            return kernel.reshape(B, self.out_planes, self.in_planes // self.groups, *self.kernel_size)
        # (B, M, n) @ (n, c_o * c_i * prod(ck)): one product, no copy of the warehouse
        mixtures = torch.matmul(attention, cells.reshape(n, -1))
        d = self.dimension
        mixtures = mixtures.reshape(B, self.groups_spatial, self.groups_out_channel, self.groups_in_channel,
                                    *self.cell_shape[1:])
        # (B, G_s, G_o, G_i, c_o, c_i, *ck) -> (B, G_o, c_o, G_i, c_i, G_s, *ck)
        mixtures = mixtures.permute(0, 2, 4, 3, 5, 1, *range(6, 6 + d))
        return mixtures.reshape(B, self.out_planes, self.in_planes // self.groups, *self.kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        manager = self._check_ready()
        attention = self.attention(x)
        blocked = _blocked_assembly_applies(attention, manager.weights[self.warehouse_id])
        weight = self._assemble(attention, manager, blocked)
        # under autocast the kernel is already in the low precision; keep the bias add there too
        bias = None if self.bias is None else self.bias.to(weight.dtype)
        # the kernel gradient is consumed by the blocked assembly's backward at once: its memory is reused
        grad_buffer = (manager.kernel_grad_buffer if blocked and weight.requires_grad and torch.is_grad_enabled()
                       else None)
        return batched_conv(x, weight, bias, self.stride, self.padding, self.dilation, self.groups,
                            weight_grad_buffer=grad_buffer)

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


@register('conv')
class KWConv2d(KWConvNd):
    """KernelWarehouse 2-D convolution: ``(B, C_in, H, W) -> (B, C_out, H_out, W_out)``."""

    dimension = 2
    layer_type = 'conv2d'


@register('conv')
class KWConv3d(KWConvNd):
    """KernelWarehouse 3-D convolution: ``(B, C_in, D, H, W) -> (B, C_out, D_out, H_out, W_out)``."""

    dimension = 3
    layer_type = 'conv3d'


@register('conv')
class KWLinear(nn.Module):
    """KernelWarehouse linear layer: ``(N, *, C_in) -> (N, *, C_out)``.

    A 1x1 :class:`KWConv1d` (its keys live under ``.conv.``, as in the official code) applied to
    the ``(N, C_in, L)`` view of the input, ``L`` the product of the middle dims; the attention
    pools over them, so each of the ``N`` leading items gets its own weights.
    """

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


# --------------------------------------------------------------------------------------------
# manager
# --------------------------------------------------------------------------------------------
def release_kernel_buffers(model: nn.Module) -> None:
    """Free the kernel memory the KW layers of ``model`` keep between passes: each layer's training
    kernels (:meth:`KWConvNd.training_kernel_buffer`, also freed by ``model.eval()``) and each
    manager's kernel-gradient and inference kernel memory (:meth:`WarehouseManager.kernel_grad_buffer`,
    :meth:`WarehouseManager.transient_kernel_buffer`)."""
    for m in model.modules():
        if isinstance(m, _KeepsKernelMemory):
            m.release_kernel_memory()


def cell_major_empty(shape: Sequence[int], **kwargs: Any) -> torch.Tensor:
    """An uninitialised warehouse ``(n, c_o, c_i, *ck)`` stored cell-major: the ``n`` values of one kernel
    entry are adjacent in memory (strides ``(1, c_i * prod(ck) * n, ...)``). Shape, state-dict key and
    values are those of the official row-major tensor; ``load_state_dict``, ``.to()``, optimizers and DDP
    keep the layout (they copy into, or preserve the strides of, the parameter)."""
    n, cols = int(shape[0]), math.prod(int(v) for v in shape[1:])
    return torch.empty(cols, n, **kwargs).t().reshape(*shape)


class WarehouseManager(_KeepsKernelMemory, nn.Module):
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
        for what, v in (('reduction', reduction), ('cell_num_ratio', cell_num_ratio),
                        ('cell_inplane_ratio', cell_inplane_ratio), ('cell_outplane_ratio', cell_outplane_ratio),
                        ('nonlocal_basis_ratio', nonlocal_basis_ratio)):
            _check_ratio(v, what, owner)
        for v in (spatial_partition if _is_sequence(spatial_partition) else [spatial_partition]):
            if not isinstance(v, (bool, int)):
                raise ValueError(f'{owner}: spatial_partition must be a bool (or one per warehouse), '
                                 f'got {spatial_partition!r}')
        for v in (norm_layer if _is_sequence(norm_layer) else [norm_layer]):
            build_attention_norm(v, 16, owner=owner)  # fails now on a bad norm
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
        # warehouse index -> (weak view, sink, weak parameter) of the live training pass
        self._grad_views: Dict[int, Tuple[Any, _WarehouseGradSink, Any]] = {}

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
        opts = {k: _per_warehouse(getattr(self, k), W, k) for k in (
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

    def forward(self, x: Any) -> Any:
        """Identity: the manager holds parameters only (harmless if it sits inside a Sequential)."""
        return x

    def take_cell(self, warehouse_idx: int) -> torch.Tensor:
        return self.weights[warehouse_idx]

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
        return _memory(self, '_kernel_grad_buffer').take(shape, like)

    def transient_kernel_buffer(self, shape: Tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """Memory for the per-sample kernels of one blocked KW layer outside training (no graph keeps
        them): the convolution uses them and drops them, so all layers share one block of memory,
        the size of the largest kernel (kept until :func:`release_kernel_buffers` or a move/cast)."""
        return _memory(self, '_transient_kernel_buffer').take(shape, like)

    def cell_major_for_grad(self, warehouse_idx: int) -> Tuple[torch.Tensor, Optional[_WarehouseGradSink]]:
        """:meth:`cell_major` for a blocked layer, with the sink its warehouse gradient goes to.

        While a graph that uses the warehouse is alive (between a training forward pass and its backward),
        every layer gets the same view, made by one :class:`_CollectWarehouseGrad` node, and the same
        :class:`_WarehouseGradSink`: the layers add their gradients into one buffer and the parameter
        receives the sum once. The view is held weakly, so it goes with the graph. Without grad mode, for
        a warehouse that needs no gradient or that is not stored cell-major: ``(cell_major(...), None)``.
        """
        cells = self.weights[warehouse_idx]
        if not (torch.is_grad_enabled() and cells.requires_grad):
            return self.cell_major(warehouse_idx), None
        if not cells.reshape(cells.shape[0], -1).t().is_contiguous():
            return self.cell_major(warehouse_idx), None
        cached = self._grad_views.get(warehouse_idx)
        if cached is not None:
            wt = cached[0]()
            if (wt is not None and cached[2]() is cells and wt.data_ptr() == cells.data_ptr()
                    and wt.dtype == cells.dtype and wt.device == cells.device):
                return wt, cached[1]
        sink = _WarehouseGradSink()
        wt = _CollectWarehouseGrad.apply(cells, sink)
        self._grad_views[warehouse_idx] = (weakref.ref(wt), sink, weakref.ref(cells))
        return wt, sink

    def extra_repr(self) -> str:
        return f'warehouses={len(self.weights)}, sharing_range={self.sharing_range}'


# --------------------------------------------------------------------------------------------
# conv_cfg path
# --------------------------------------------------------------------------------------------
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def _common_prefix(paths: List[str]) -> str:
    split = [p.split('.') if p else [] for p in paths]
    prefix: List[str] = []
    for parts in zip(*split):
        if all(p == parts[0] for p in parts):
            prefix.append(parts[0])
        else:
            break
    return '.'.join(prefix)


def allocate_warehouses(model: nn.Module) -> Optional[WarehouseManager]:
    """Create and allocate warehouses for the unbound KW layers in ``model`` (``conv_cfg`` path).

    Unbound layers are grouped into warehouses by :func:`path_warehouse_key` (or their explicit
    ``warehouse_name``); the layers of one warehouse must agree on every option. Warehouses are
    numbered in ``model.named_modules()`` order. One :class:`WarehouseManager` is attached as
    ``warehouse_manager`` to the smallest module containing all of the layers that is not a
    ``Sequential`` / ``ModuleList`` / ``ModuleDict`` (unless ``model`` itself is one); the paths used
    for naming are relative to that module. The manager is then stored and allocated
    (``ValueError`` on ratios that do not tile). Returns the manager, or ``None`` when nothing was
    unbound (cheap; safe to call again).

    Runs automatically after every model built through a ``MODELS`` registry.
    """
    if not isinstance(model, nn.Module):
        return None
    found: List[Tuple[str, KWConvNd]] = []
    linear_paths: Dict[int, str] = {}
    for path, module in model.named_modules():
        if isinstance(module, KWLinear):
            linear_paths[id(module.conv)] = path  # name a KWLinear's warehouse after the linear layer
        elif isinstance(module, KWConvNd) and not module.bound:
            found.append((linear_paths.get(id(module), path), module))
    kept = []
    for path, layer in found:
        if any(fnmatch.fnmatchcase(path, pattern) for pattern in layer._exclude):
            _replace_with_plain(model, path, layer)
        else:
            kept.append((path, layer))
    found = kept
    if not found:
        return None
    parents = [p.rpartition('.')[0] if p else '' for p, _ in found]
    root_path = _common_prefix(parents)
    if len(found) == 1:
        root_path = found[0][0]
    root = model.get_submodule(root_path) if root_path else model
    while root_path and isinstance(root, _CONTAINERS):  # a Sequential would call the manager in its forward
        root_path = root_path.rpartition('.')[0]
        root = model.get_submodule(root_path) if root_path else model
    strip = len(root_path) + 1 if root_path else 0

    groups: Dict[str, List[Tuple[str, KWConvNd]]] = {}
    for path, layer in found:
        rel = path[strip:] if len(path) >= strip else ''
        opts = layer._options
        if layer._warehouse_name is not None:
            key = layer._warehouse_name
        else:
            depthwise = layer.groups > 1 and layer.groups == layer.in_planes == layer.out_planes
            key = path_warehouse_key(rel, depthwise, opts['sharing_range'])
        if key in groups:
            first_path, first = groups[key][0]
            for k in MANAGER_OPTIONS:
                if k == 'sharing_range':
                    continue
                if first._options[k] != opts[k]:
                    raise ValueError(f'allocate_warehouses: layers {first_path!r} and {path!r} share warehouse '
                                     f'{key!r} but disagree on {k}: {first._options[k]!r} vs {opts[k]!r}')
        groups.setdefault(key, []).append((path, layer))

    settings = [groups[key][0][1]._options for key in groups]
    per = {k: [s[k] for s in settings] for k in MANAGER_OPTIONS if k != 'sharing_range'}
    manager = WarehouseManager(sharing_range=(), **per)
    for key, members in groups.items():
        for _, layer in members:
            manager._record(key, layer)
    try:
        manager.store()
    except ValueError as err:
        for _, layer in found:
            layer._manager[0] = None
            layer.warehouse_id = None
        raise ValueError(f'{err} (layers: {[p for p, _ in groups.get(_failing_key(err, groups), [])]})') from None
    attr = 'warehouse_manager'
    k = 1
    while hasattr(root, attr):
        attr = f'warehouse_manager{k}'
        k += 1
    root.add_module(attr, manager)
    manager.allocate(root)
    ref = next((p for p in model.parameters() if p.is_floating_point() and p.device.type != 'meta'), None)
    if ref is not None:
        manager.to(ref.device)
        for _, layer in found:
            layer.attention.to(ref.device)
    return manager


def _replace_with_plain(model: nn.Module, path: str, conv: KWConvNd) -> None:
    """Swap the unbound layer at ``path`` for the plain ``nn.ConvNd`` / ``nn.Linear`` it stands for."""
    parent_path, _, name = path.rpartition('.')
    parent = model.get_submodule(parent_path) if parent_path else model
    old = getattr(parent, name)
    bias = conv.bias is not None
    if isinstance(old, KWLinear):
        plain: nn.Module = nn.Linear(conv.in_planes, conv.out_planes, bias=bias)
    else:
        plain = _PLAIN[conv.layer_type](conv.in_planes, conv.out_planes, conv.kernel_size, stride=conv.stride,
                                        padding=conv.padding, dilation=conv.dilation, groups=conv.groups, bias=bias)
    nn.init.kaiming_normal_(plain.weight, mode='fan_out', nonlinearity='relu')
    if bias:
        nn.init.zeros_(plain.bias)
    ref = conv.bias if bias else next(iter(model.parameters()), None)
    if ref is not None:
        plain.to(ref.device)
    setattr(parent, name, plain)


def _failing_key(err: Exception, groups: Dict[str, Any]) -> Optional[str]:
    msg = str(err)
    for key in groups:
        if f'warehouse {key!r}' in msg:
            return key
    return None


register_post_build(allocate_warehouses)
