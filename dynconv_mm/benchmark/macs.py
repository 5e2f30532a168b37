"""Analytic multiply-accumulate counts, and the time a model spends in KW kernel assembly.

For one sample:

* a convolution (static or dynamic) costs ``C_out * C_in/g * prod(k) * prod(S_out)`` MACs, a linear
  layer ``in * out`` per item;
* KW kernel assembly costs ``M * n * c_o * c_i * prod(ck)`` MACs (mixtures x cells x cell size:
  the product ``attention (M, n) @ warehouse (n, cell)``);
* the other dynamic layers mix ``K`` kernels: ``K * C_out * C_in/g * prod(k)`` MACs (ODConv,
  DY-Conv, CondConv), PEDConv and the dynamic depth-wise conv one multiply per kernel entry.

Attention branches (pooling and small linear layers) are counted with the linear layers.
The *arithmetic floor* of a dynamic model relative to its static twin is
``(conv + assembly MACs) / conv MACs``: the slowdown if assembly ran at the convolution's rate.
"""
from __future__ import annotations

import contextlib
import time
from typing import Dict, Iterator, List

import torch
from torch import nn

from ..layers.condconv import CondConv2d
from ..layers.dyconv import DyConv2d
from ..layers.dynamic_dw import DynamicDWConv2d
from ..layers.kernel_warehouse import KWConvNd
from ..layers.odconv import ODConv2d
from ..layers.pedconv import PEDConv2d
from .timing import synchronize

__all__ = ['count_macs', 'kw_assembly_macs', 'time_kw_sections']

_MIXED = (ODConv2d, DyConv2d, CondConv2d)


def kw_assembly_macs(layer: KWConvNd) -> int:
    """Per-sample MACs of ``layer``'s kernel assembly."""
    n = layer.cell_shape[0]
    cell = 1
    for v in layer.cell_shape[1:]:
        cell *= int(v)
    return int(layer.num_mixtures * n * cell)


def _kernel_numel(module: nn.Module) -> int:
    k = 1
    for v in module.kernel_size:
        k *= int(v)
    cout = module.out_planes if isinstance(module, KWConvNd) else module.out_channels
    cin = module.in_planes if isinstance(module, KWConvNd) else module.in_channels
    return cout * (cin // module.groups) * k


def count_macs(model: nn.Module, x: torch.Tensor) -> Dict[str, int]:
    """Per-sample MACs of one forward of ``model`` on ``x`` (batch 1 recommended):
    ``{'conv', 'assembly', 'linear', 'total'}``."""
    counts = {'conv': 0, 'assembly': 0, 'linear': 0}
    hooks = []
    conv_types = (nn.Conv1d, nn.Conv2d, nn.Conv3d, KWConvNd, PEDConv2d, DynamicDWConv2d) + _MIXED

    def conv_hook(module, inputs, output):
        if isinstance(output, tuple):
            output = output[0]
        spatial = 1
        for v in output.shape[2:]:
            spatial *= int(v)
        batch = int(output.shape[0])
        counts['conv'] += _kernel_numel(module) * spatial * batch
        if isinstance(module, KWConvNd):
            counts['assembly'] += kw_assembly_macs(module) * batch
        elif isinstance(module, _MIXED):
            counts['assembly'] += int(module.weight.shape[0]) * _kernel_numel(module) * batch
        elif isinstance(module, (PEDConv2d, DynamicDWConv2d)):
            counts['assembly'] += _kernel_numel(module) * batch

    def linear_hook(module, inputs, output):
        items = inputs[0].numel() // inputs[0].shape[-1]
        counts['linear'] += module.in_features * module.out_features * items

    inside: List[nn.Module] = []
    for module in model.modules():
        if isinstance(module, conv_types):
            # convolutions inside a dynamic layer's attention are counted as linear-like work
            if any(module is not p and any(module is c for c in p.modules()) for p in inside):
                continue
            if isinstance(module, (KWConvNd, PEDConv2d, DynamicDWConv2d) + _MIXED):
                inside.append(module)
            hooks.append(module.register_forward_hook(conv_hook))
        elif isinstance(module, nn.Linear):
            hooks.append(module.register_forward_hook(linear_hook))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    batch = x.shape[0]
    out = {k: v // batch for k, v in counts.items()}
    out['total'] = sum(out.values())
    return out


@contextlib.contextmanager
def time_kw_sections(model: nn.Module, device: str = 'cpu') -> Iterator[Dict[str, float]]:
    """Within the block, accumulate the wall time of every KW layer's attention + kernel assembly
    (``'assembly'``) and of the rest of its forward (``'conv'``) into the yielded dict (seconds).
    Synchronises around each section, so use it for accounting, not for end-to-end timing."""
    totals = {'assembly': 0.0, 'conv': 0.0}
    layers = [m for m in model.modules() if isinstance(m, KWConvNd)]
    originals = []

    def timed_forward(layer: KWConvNd):
        assemble = layer.assemble_kernel

        def forward(x: torch.Tensor) -> torch.Tensor:
            synchronize(device)
            t0 = time.perf_counter()
            weight = assemble(layer.attention(x))
            synchronize(device)
            t1 = time.perf_counter()
            from ..layers.batched import batched_conv
            bias = None if layer.bias is None else layer.bias.to(weight.dtype)
            out = batched_conv(x, weight, bias, layer.stride, layer.padding, layer.dilation, layer.groups)
            synchronize(device)
            totals['assembly'] += t1 - t0
            totals['conv'] += time.perf_counter() - t1
            return out
        return forward

    for layer in layers:
        originals.append(layer)
        layer.forward = timed_forward(layer)
    try:
        yield totals
    finally:
        for layer in originals:
            del layer.forward
