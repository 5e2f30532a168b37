"""Honest FLOPs of dynamic convolutions: the convolution the papers count, and what else they cost.

Papers on dynamic convolution (CondConv, DY-Conv, ODConv, KernelWarehouse, PEDConv, DWNet) report the
multiply-accumulates (MACs, counted as "FLOPs" as mmcv/mmengine do) of the convolution with the
*assembled* kernel, i.e. the count of a plain-convolution twin of the same geometry, and treat the
rest as negligible. That rest is real, and for some models (KernelWarehouse at large cell counts,
inhomogeneous DWNet) it is not small. :func:`count_dynamic_flops` runs one forward pass (batch 1, eval)
with hooks and reports, per image:

* ``conv_flops``: every convolution and linear layer of the model outside attention branches, with a
  dynamic layer counted as one convolution with its assembled kernel
  (``H_out * W_out * C_out * C_in / groups * k_h * k_w``). This equals the count of the plain-conv twin.
* ``attention_flops``: what the attention / kernel-generation branches of dynamic layers compute: their
  convolutions and linear layers, plus the global average pooling (``C_in * H * W`` additions).
* ``assembly_flops``: building the per-sample kernel and applying the attentions:

  - KernelWarehouse: ``mixtures * cells * cell size`` (the ``(M, n) x (n, cell)`` product; the cells
    of the whole warehouse take part, as in the official layer);
  - CondConv, DY-Conv: ``experts * kernel size`` (the weighted sum);
  - ODConv: ``kernel_num * kernel size`` (if ``kernel_num > 1``) ``+ kernel size`` (spatial attention)
    ``+ C_in * H * W`` (channel attention on the input) ``+ C_out * H' * W'`` (filter attention);
  - PEDConv: ``C_out * C_in / groups`` (the outer product of the channel factors) ``+ 2 * kernel size``
    (the modulation ``W * a_out a_in * a_k``);
  - DynamicDW / IDynamicDW: 0 (the generator outputs the kernel; its cost is attention).

  ``kernel size`` is ``C_out * C_in / groups * k_h * k_w``.

Norms, activations and element-wise additions are not counted (neither do the papers). Parameters are
all parameters (shared ones once). Re-parameterized layers (OREPA, DBB, DO-Conv, RepVGG) are counted as
their one training-time convolution; deploy them for inference numbers.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Dict, Optional, Sequence, Tuple

import torch
from torch import nn

__all__ = ['DynamicFlops', 'count_dynamic_flops', 'dynamic_layer_types', 'format_dynamic_flops']


@dataclass
class DynamicFlops:
    """Per-image counts of :func:`count_dynamic_flops` (multiply-accumulates)."""
    conv_flops: int
    attention_flops: int
    assembly_flops: int
    params: int
    input_shape: Tuple[int, ...]
    #: dynamic layer path -> (type, conv, attention, assembly)
    per_layer: Dict[str, Tuple[str, int, int, int]] = field(default_factory=OrderedDict)

    @property
    def extra_flops(self) -> int:
        """What a dynamic model costs beyond its plain-conv twin."""
        return self.attention_flops + self.assembly_flops

    @property
    def total_flops(self) -> int:
        return self.conv_flops + self.extra_flops


def dynamic_layer_types() -> Tuple[type, ...]:
    from ..layers.condconv import CondConv2d
    from ..layers.dyconv import DyConv2d
    from ..layers.dynamic_dw import DynamicDWConv2d, IDynamicDWConv2d
    from ..layers.kernel_warehouse import KWConvNd
    from ..layers.odconv import ODConv2d
    from ..layers.pedconv import PEDConv2d
    return (KWConvNd, CondConv2d, DyConv2d, ODConv2d, PEDConv2d, DynamicDWConv2d, IDynamicDWConv2d)


def _kernel_numel(layer: nn.Module, depthwise: bool) -> Tuple[int, int]:
    """``(C_in / groups * prod(k), C_out * C_in / groups * prod(k))`` of a dynamic layer."""
    ks = layer.kernel_size if isinstance(layer.kernel_size, (tuple, list)) else (layer.kernel_size,)
    cin_g = 1 if depthwise else layer.in_channels // layer.groups
    per_out = cin_g * math.prod(ks)
    return per_out, layer.out_channels * per_out


def _assembly(layer: nn.Module, x: torch.Tensor, y: torch.Tensor, kernel: int) -> int:
    from ..layers.condconv import CondConv2d
    from ..layers.dyconv import DyConv2d
    from ..layers.kernel_warehouse import KWConvNd
    from ..layers.odconv import ODConv2d
    from ..layers.pedconv import PEDConv2d
    if isinstance(layer, KWConvNd):
        n = layer.cell_shape[0]
        return layer.num_mixtures * n * math.prod(layer.cell_shape[1:])
    if isinstance(layer, CondConv2d):
        return layer.num_experts * kernel
    if isinstance(layer, DyConv2d):
        return layer.num_kernels * kernel
    if isinstance(layer, ODConv2d):
        att = layer.attention
        flops = x[0].numel()                          # channel attention on the input
        if att.filter_fc is not None:
            flops += y[0].numel()                     # filter attention on the output
        if not layer.pointwise_static:
            flops += (layer.kernel_num if layer.kernel_num > 1 else 0) * kernel
            flops += kernel if att.spatial_fc is not None else 0
        return flops
    if isinstance(layer, PEDConv2d):
        return layer.out_channels * (layer.in_channels // layer.groups) + 2 * kernel
    return 0


def _pools(layer: nn.Module) -> bool:
    from ..layers.dynamic_dw import IDynamicDWConv2d
    return not isinstance(layer, IDynamicDWConv2d)


def _leaf_macs(m: nn.Module, y: torch.Tensor) -> int:
    if isinstance(m, nn.modules.conv._ConvNd):
        return y[0].numel() * (m.in_channels // m.groups) * math.prod(m.kernel_size)
    if isinstance(m, nn.Linear):
        return (y.numel() // y.shape[0] if y.dim() > 1 else y.numel()) * m.in_features
    return 0


def _forward(model: nn.Module, x: torch.Tensor):
    from mmengine.model import BaseModel
    if isinstance(model, BaseModel):
        return model(x, mode='tensor')
    return model(x)


@torch.no_grad()
def count_dynamic_flops(model: nn.Module, input_shape: Sequence[int] = (3, 224, 224)) -> DynamicFlops:
    """Count conv, attention and kernel-assembly MACs of ``model`` for one ``input_shape`` image.

    ``model``: any module (an OpenMMLab model is called with ``mode='tensor'``). One forward pass runs in
    eval mode with a batch of one; the mode is restored afterwards.
    """
    from ..layers.dynamic_dw import DynamicDWConv2d, IDynamicDWConv2d
    from ..layers.kernel_warehouse import KWConvNd
    dyn_types = dynamic_layer_types()
    named = list(model.named_modules())
    dyn_paths = [p for p, m in named if isinstance(m, dyn_types)]

    def owner(path: str) -> Optional[str]:
        for p in dyn_paths:
            if path.startswith(p + '.'):
                return p
        return None

    counts = dict(conv=0, attention=0, assembly=0)
    per_layer: Dict[str, list] = OrderedDict()
    handles = []

    def leaf_hook(path):
        own = owner(path)

        def hook(m, inputs, out):
            if not isinstance(out, torch.Tensor):
                return
            macs = _leaf_macs(m, out)
            if own is None:
                counts['conv'] += macs
            else:
                counts['attention'] += macs
                per_layer.setdefault(own, [type(m).__name__, 0, 0, 0])[2] += macs
        return hook

    def dyn_hook(path):
        def hook(m, inputs, out):
            x = inputs[0]
            depthwise = isinstance(m, (DynamicDWConv2d, IDynamicDWConv2d))
            if isinstance(m, KWConvNd):
                per_out = (m.in_planes // m.groups) * math.prod(m.kernel_size)
                kernel = m.out_planes * per_out
            else:
                per_out, kernel = _kernel_numel(m, depthwise)
            conv = out[0].numel() * per_out
            att = x[0].numel() if _pools(m) else 0
            asm = _assembly(m, x, out, kernel)
            counts['conv'] += conv
            counts['attention'] += att
            counts['assembly'] += asm
            rec = per_layer.setdefault(path, [type(m).__name__, 0, 0, 0])
            rec[0] = type(m).__name__
            rec[1] += conv
            rec[2] += att
            rec[3] += asm
        return hook

    for path, m in named:
        if isinstance(m, dyn_types):
            handles.append(m.register_forward_hook(dyn_hook(path)))
        elif isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)):
            handles.append(m.register_forward_hook(leaf_hook(path)))
    shape = tuple(int(s) for s in input_shape)
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        _forward(model, torch.randn(1, *shape, device=device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    params = sum(p.numel() for p in model.parameters())
    return DynamicFlops(conv_flops=counts['conv'], attention_flops=counts['attention'],
                        assembly_flops=counts['assembly'], params=params, input_shape=shape,
                        per_layer=OrderedDict((k, tuple(v)) for k, v in per_layer.items()))


def format_dynamic_flops(info: DynamicFlops, exact: bool = False, params: bool = True) -> str:
    """Lines for a report: conv (paper) FLOPs, the dynamic extra, their total and (``params``) parameters."""
    from .complexity import format_count
    f = (lambda n: str(n)) if exact else format_count
    share = 100.0 * info.extra_flops / max(info.conv_flops, 1)
    lines = [
        f'Conv FLOPs (plain-conv twin, as papers report): {f(info.conv_flops)}',
        f'Dynamic extra FLOPs: {f(info.extra_flops)} ({share:.1f}% of conv) = attention {f(info.attention_flops)}'
        f' + kernel assembly {f(info.assembly_flops)}',
        f'Conv + dynamic extra FLOPs: {f(info.total_flops)}',
    ]
    if params:
        lines.append(f'Params: {f(info.params)}')
    return '\n'.join(lines)
