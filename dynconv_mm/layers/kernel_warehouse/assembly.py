"""Kernel assembly: the per-sample kernels of a KW layer from its attention and its warehouse.

Mixture ``m`` of sample ``b`` is ``sum_j attention[b, m, j] * cells[j]``; the mixtures are laid out
with the spatial index slowest, then the output group, then the input group
(``m = (s * G_o + o) * G_i + i``), and tile the kernel ``(C_out, C_in / groups, *k)``.

:func:`assemble_matmul` is the reference path: one matrix product and a permutation, on every
device and dtype, and the only path traced, exported and compiled graphs see. :func:`choose_backend`
decides, in one place, whether the optional CPU backend
(:mod:`~dynconv_mm.layers.kernel_warehouse.cpu_backend`: same numbers, faster) takes over.
"""
from __future__ import annotations

from typing import Sequence, Tuple

import torch

from . import cpu_backend

__all__ = ['assemble_matmul', 'choose_backend', 'KernelGeometry']

#: ``(G_s, G_o, G_i, cell_shape (n, c_o, c_i, *ck), out_channels, in_channels // groups, kernel_size)``
KernelGeometry = Tuple[int, int, int, Tuple[int, ...], int, int, Tuple[int, ...]]


def assemble_matmul(attention: torch.Tensor, cells: torch.Tensor, geometry: KernelGeometry) -> torch.Tensor:
    """Per-sample kernels ``(B, C_out, C_in / groups, *k)`` from ``attention (B, M, n)`` and the warehouse
    ``cells (n, c_o, c_i, *ck)``: ``(B, M, n) @ (n, c_o * c_i * prod(ck))``, no copy of the warehouse."""
    g_s, g_o, g_i, cell_shape, c_out, c_in_g, kernel_size = geometry
    B, n = attention.shape[0], cells.shape[0]
    d = len(kernel_size)
    mixtures = torch.matmul(attention, cells.reshape(n, -1))
    mixtures = mixtures.reshape(B, g_s, g_o, g_i, *cell_shape[1:])
    # (B, G_s, G_o, G_i, c_o, c_i, *ck) -> (B, G_o, c_o, G_i, c_i, G_s, *ck)
    mixtures = mixtures.permute(0, 2, 4, 3, 5, 1, *range(6, 6 + d))
    return mixtures.reshape(B, c_out, c_in_g, *kernel_size)


def choose_backend(attention: torch.Tensor, cells: torch.Tensor) -> str:
    """``'cpu'`` where the CPU backend applies (:func:`~.cpu_backend.applies`: eager float CPU tensors
    outside autocast, large warehouses), else ``'matmul'``."""
    return 'cpu' if cpu_backend.applies(attention, cells) else 'matmul'


def mixture_blocks(weight: torch.Tensor, geometry: KernelGeometry) -> torch.Tensor:
    """A static kernel ``(C_out, C_in / groups, *k)`` cut into the layer's mixtures ``(M, c_o, c_i, *ck)``:
    the inverse of :func:`assemble_matmul`'s layout."""
    g_s, g_o, g_i, cell_shape, _, _, kernel_size = geometry
    ck = cell_shape[3:]
    d = len(kernel_size)
    gs_shape: Sequence[int] = [k // c for k, c in zip(kernel_size, ck)]
    # kernel axis u = s_u * ck_u + r_u (spatial index slowest within the kernel axis)
    shape = [g_o, cell_shape[1], g_i, cell_shape[2]]
    for g, c in zip(gs_shape, ck):
        shape += [g, c]
    x = weight.reshape(shape)
    g_axes = [4 + 2 * i for i in range(d)]
    c_axes = [5 + 2 * i for i in range(d)]
    x = x.permute(*g_axes, 0, 2, 1, 3, *c_axes)
    return x.reshape(g_s * g_o * g_i, cell_shape[1], cell_shape[2], *ck)
