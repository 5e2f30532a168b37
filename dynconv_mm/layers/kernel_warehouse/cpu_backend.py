"""The optional CPU backend of the KernelWarehouse assembly: blocked products and native kernels.

The reference path (:func:`~dynconv_mm.layers.kernel_warehouse.assembly.assemble_matmul`, one matrix
product) runs everywhere. On the CPU, in eager float32/64 outside autocast and for warehouses of
:data:`BLOCKED_ASSEMBLY_MIN_CELLS` floats and more, this backend computes the same numbers faster
(``docs/benchmark.md``):

* :class:`BlockedAssembly` reads the cell-major warehouse once and writes each block of products
  straight into the kernel layout (native kernels where they apply, blocked ``mm`` otherwise);
* in training, the layers sharing a warehouse add their gradients into one buffer
  (:class:`WarehouseGradSink`, :class:`CollectWarehouseGrad`) instead of one warehouse-sized
  gradient each;
* kernel memory is handed out again once unreferenced (:class:`ReusableMemory`), sparing the page
  faults of fresh multi-megabyte allocations.

The shared gradient and the memory reuse rest on private torch internals; where
:mod:`dynconv_mm.layers.torch_internals` finds them missing or changed they are off (each layer
returns its own warehouse gradient, memory is allocated afresh), with the same results.
"""
from __future__ import annotations

import math
import threading
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch
from torch import nn

from .. import torch_internals
from ..native import kw_assemble_backward, kw_assemble_into
from ..torch_internals import graph_task_id, storage_use_count, will_execute

__all__ = ['BlockedAssembly', 'WarehouseGradSink', 'CollectWarehouseGrad', 'ReusableMemory', 'KeepsKernelMemory',
           'kept_memory', 'applies', 'ASSEMBLY_BLOCK_ENTRIES', 'BLOCKED_ASSEMBLY_MIN_CELLS']


def applies(attention: torch.Tensor, cells: torch.Tensor) -> bool:
    """The backend is for float CPU tensors in eager mode outside autocast, and warehouses large
    enough for blocking to pay off (the reference path runs on GPUs, and for tracing, exporting and
    torch.compile, which see plain tensor operations)."""
    if not torch_internals.plain_eager():
        return False
    return (cells.numel() >= BLOCKED_ASSEMBLY_MIN_CELLS
            and attention.device.type == 'cpu' and cells.device.type == 'cpu'
            and attention.dtype == cells.dtype and attention.dtype in (torch.float32, torch.float64)
            and not torch_internals.autocast_enabled('cpu'))


#: floats of one block of the blocked CPU assembly (warehouse rows + products): ~1 MiB keeps a block
#: and its products in a core's L2 cache
ASSEMBLY_BLOCK_ENTRIES = 1 << 20
#: warehouses smaller than this (floats) stay in cache; one product with them has less overhead than
#: the blocked form (measured on a 2-core AVX-512 CPU)
BLOCKED_ASSEMBLY_MIN_CELLS = 1 << 20


class BlockedAssembly(torch.autograd.Function):
    """``kernel = permute(attention @ cells)`` from the cell-major warehouse, block by block.

    Takes the warehouse as ``wt (cols, n)``: each row holds one kernel entry of every cell
    (:meth:`WarehouseManager.cell_major`). The product ``wt @ attention^T`` is a tall-skinny
    matrix product that reads the warehouse once, 2-4x faster on CPUs than ``attention @ cells``
    with its few rows (4-9 per layer at batch 1; ``docs/benchmark.md``). Each block of ``rows`` cell
    output channels is multiplied, stays in cache and is written straight into its place in the kernel
    layout ``(B, G_o, c_o, G_i, c_i, G_s, *ck)``, so neither the mixture tensor nor a permuted copy of
    it is materialised; the backward pass is blocked the same way and adds the warehouse gradient in
    place into the buffer the layers of the pass share (``sink``, a :class:`WarehouseGradSink`; ``None``:
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
                rows: int, sink: Optional['WarehouseGradSink'] = None,
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
        # the warehouse gradient goes into the pass's shared buffer (see WarehouseGradSink) unless no
        # gradient reaches the warehouse in this backward call
        sink = ctx.sink if need_w else None
        fresh = False
        if sink is not None:
            if not will_execute(ctx.sink_node):
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


class WarehouseGradSink:
    """One warehouse's gradient, accumulated over the KW layers of a forward pass.

    Every blocked layer of a pass takes its warehouse matrix from one :class:`CollectWarehouseGrad`
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
        task = graph_task_id()
        buf = self._buffers.get(task)
        if buf is None:
            buf = self._buffers[task] = torch.empty_like(like)
            return buf, True
        return buf, False

    def pop(self) -> Optional[torch.Tensor]:
        return self._buffers.pop(graph_task_id(), None)


class CollectWarehouseGrad(torch.autograd.Function):
    """``cells (n, c_o, c_i, *ck) -> (c_o * c_i * prod(ck), n)`` view whose backward returns the
    gradient the blocked layers accumulated in ``sink`` (plus any gradient autograd brings)."""

    @staticmethod
    def forward(ctx, cells: torch.Tensor, sink: WarehouseGradSink) -> torch.Tensor:
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


class ReusableMemory:
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
                    and buf.device == like.device and storage_use_count(buf) == self._free_refs):
                buf = like.new_empty(numel)
                refs = storage_use_count(buf)
                # where the use count cannot be read, nothing is kept (fresh memory every call)
                self.tensor, self._free_refs = (buf, refs) if refs is not None else (None, 0)
            return torch.empty(0, dtype=buf.dtype, device=buf.device).set_(buf.untyped_storage(), 0, tuple(shape))


def kept_memory(module: nn.Module, name: str) -> ReusableMemory:
    memory = module.__dict__.get(name)
    if memory is None:
        memory = module.__dict__[name] = ReusableMemory()
    return memory


class KeepsKernelMemory:
    """Mixin of the modules that keep :class:`ReusableMemory` attributes (``_memory_names``): moving or
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
