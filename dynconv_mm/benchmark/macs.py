"""Multiply-accumulate counts for the benchmark's floor tables, and the time a model spends
assembling kernels.

The counts come from the one counter of the package (:func:`dynconv_mm.analysis.dynamic_flops.count_macs`,
each layer's own ``conv_macs`` / ``extra_macs``), so the benchmark and ``tools/analysis/get_flops.py``
print the same numbers. The *arithmetic floor* of a dynamic model relative to its static twin is
``(conv + assembly MACs) / conv MACs``: the slowdown if assembly ran at the convolution's rate.
"""
from __future__ import annotations

import contextlib
import time
from typing import Dict, Iterator

import torch
from torch import nn

from ..analysis.dynamic_flops import count_macs as _count
from ..analysis.dynamic_flops import protocol_layers
from .timing import synchronize

__all__ = ['count_macs', 'time_kernel_sections']


def count_macs(model: nn.Module, x: torch.Tensor) -> Dict[str, int]:
    """Per-sample MACs of one forward of ``model`` on ``x`` (batch 1 recommended):
    ``{'conv', 'attention', 'assembly', 'total'}``."""
    info = _count(model, x)
    out = dict(conv=info.conv_flops, attention=info.attention_flops, assembly=info.assembly_flops)
    out['total'] = sum(out.values())
    return out


@contextlib.contextmanager
def time_kernel_sections(model: nn.Module, device: str = 'cpu') -> Iterator[Dict[str, float]]:
    """Within the block, accumulate the wall time of every splitting layer's kernel making
    (``'assembly'``: attention + assembly, ``make_kernel``) and of the rest of its forward (``'conv'``,
    ``apply_kernel``) into the yielded dict (seconds). Synchronises around each section, so use it for
    accounting, not for end-to-end timing."""
    totals = {'assembly': 0.0, 'conv': 0.0}
    layers = [m for _, m in protocol_layers(model) if m.splits_forward]

    def timed_forward(layer):
        def forward(x: torch.Tensor) -> torch.Tensor:
            synchronize(device)
            t0 = time.perf_counter()
            weight, bias = layer.make_kernel(x)
            synchronize(device)
            t1 = time.perf_counter()
            out = layer.apply_kernel(x, weight, bias)
            synchronize(device)
            totals['assembly'] += t1 - t0
            totals['conv'] += time.perf_counter() - t1
            return out
        return forward

    for layer in layers:
        layer.forward = timed_forward(layer)
    try:
        yield totals
    finally:
        for layer in layers:
            del layer.forward
