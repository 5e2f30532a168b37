"""KernelWarehouse: dynamic convolution assembled from warehouses of shared kernel cells.

Li & Yao, *KernelWarehouse: Rethinking the Design of Dynamic Convolution*, ICML 2024
(arXiv:2406.07879). Layer semantics and state-dict keys follow the official implementation
(``OSVAI/KernelWarehouse``, ``modules/kernel_warehouse.py``) so that its checkpoints load as they are.

A *warehouse* holds ``n`` cells of shape ``(c_o, c_i, *ck)``. A KW layer with ``C_out``, ``C_in``,
``groups`` and kernel ``k`` is cut into ``M = G_s * G_o * G_i`` kernel *mixtures* (``G_o = C_out / c_o``,
``G_i = (C_in / groups) / c_i``, ``G_s = prod(k / ck)``); per sample, its attention gives
``alpha (M, n)`` and mixture ``m`` is ``sum_j alpha[m, j] * cell_j``. The per-sample kernels are
applied with :func:`dynconv_mm.layers.batched.batched_conv`.

Modules, read in this order:

* :mod:`.naming`: warehouse names and ``sharing_range`` (which layers share a warehouse);
* :mod:`.attention`: :class:`KWAttention`, the attention over a warehouse's cells;
* :mod:`.assembly`: the kernel assembly, one matrix product (the reference path, every device);
* :mod:`.conv`: the layers :class:`KWConv1d` / :class:`KWConv2d` / :class:`KWConv3d` / :class:`KWLinear`;
* :mod:`.manager`: :class:`WarehouseManager`, which reserves layers, creates warehouses and allocates cells;
* :mod:`.conv_cfg`: :func:`allocate_warehouses`, KW layers in stock models through ``conv_cfg``;
* :mod:`.cpu_backend`: the optional CPU backend of the assembly (blocked products, native kernels,
  memory reuse), the same numbers faster;
* :mod:`.options`: the manager's options and their checks.
"""
from .assembly import assemble_matmul, choose_backend
from .attention import KWAttention, contrast_normalize, kw_attention
from .conv import KWConv1d, KWConv2d, KWConv3d, KWConvNd, KWLinear
from .conv_cfg import allocate_warehouses
from .manager import WarehouseManager, cell_major_empty, owned_cell_count, release_kernel_buffers
from .naming import SHARING_TOKENS, fuse_warehouse_name, normalize_sharing_range, path_warehouse_key
from .options import MANAGER_OPTIONS, UNBOUND_DEFAULTS

__all__ = [
    'KWAttention', 'KWConvNd', 'KWConv1d', 'KWConv2d', 'KWConv3d', 'KWLinear', 'WarehouseManager',
    'allocate_warehouses', 'normalize_sharing_range', 'fuse_warehouse_name', 'path_warehouse_key',
    'owned_cell_count', 'cell_major_empty', 'release_kernel_buffers', 'SHARING_TOKENS', 'MANAGER_OPTIONS',
    'UNBOUND_DEFAULTS', 'kw_attention', 'contrast_normalize', 'assemble_matmul', 'choose_backend'
]
