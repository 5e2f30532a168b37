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
* ``assembly_flops``: building the per-sample kernel and applying the attentions (the mixture of
  the kernels or warehouse cells, modulations, attention scalings of the feature maps).

Each layer gives its own numbers (``conv_macs`` and ``extra_macs`` of the layer protocol,
:mod:`dynconv_mm.layers.base`); :func:`count_macs` is the one counter that ``tools/analysis/get_flops.py``
and the benchmark share. A layer's docstring of ``extra_macs`` says what it counts.

Norms, activations and element-wise additions are not counted (neither do the papers). Parameters are
all parameters (shared ones once). Re-parameterized layers (OREPA, DBB, DO-Conv, RepVGG) are counted as
the one convolution they fold into.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..layers.base import ExtraMacs, LayerProtocol
from .complexity import count_parameters

__all__ = ['DynamicFlops', 'count_dynamic_flops', 'count_macs', 'protocol_layers', 'format_dynamic_flops']


@dataclass
class DynamicFlops:
    """Per-image counts of :func:`count_dynamic_flops` (multiply-accumulates)."""
    conv_flops: int
    attention_flops: int
    assembly_flops: int
    params: int
    input_shape: Tuple[int, ...]
    #: dynamic / re-param layer path -> (type, conv, attention (with pooling), assembly)
    per_layer: Dict[str, Tuple[str, int, int, int]] = field(default_factory=OrderedDict)

    @property
    def extra_flops(self) -> int:
        """What a dynamic model costs beyond its plain-conv twin."""
        return self.attention_flops + self.assembly_flops

    @property
    def total_flops(self) -> int:
        return self.conv_flops + self.extra_flops


def protocol_layers(model: nn.Module) -> List[Tuple[str, LayerProtocol]]:
    """``(path, layer)`` of the outermost layers of ``model`` that answer the layer protocol (a
    protocol layer inside another, such as the conv of a ``KWLinear``, is the outer one's business)."""
    out: List[Tuple[str, LayerProtocol]] = []
    for path, m in model.named_modules():
        if isinstance(m, LayerProtocol) and not any(p == '' or path.startswith(p + '.') for p, _ in out):
            out.append((path, m))
    return out


def _plain_macs(m: nn.Module, y: torch.Tensor) -> int:
    """Per-sample MACs of a plain convolution or linear layer with output ``y``."""
    if isinstance(m, nn.modules.conv._ConvNd):
        return y[0].numel() * (m.in_channels // m.groups) * math.prod(m.kernel_size)
    if isinstance(m, nn.Linear):
        return (y.numel() // y.shape[0] if y.dim() > 1 else y.numel()) * m.in_features
    return 0


def _first_tensor(out) -> Optional[torch.Tensor]:
    while isinstance(out, (tuple, list)) and out:
        out = out[0]
    return out if isinstance(out, torch.Tensor) else None


def _forward(model: nn.Module, x: torch.Tensor):
    from mmengine.model import BaseModel
    if isinstance(model, BaseModel):
        return model(x, mode='tensor')
    return model(x)


@torch.no_grad()
def count_macs(model: nn.Module, x: torch.Tensor) -> DynamicFlops:
    """Per-sample conv (plain-conv twin), attention and assembly MACs of one forward of ``model`` on
    ``x`` (any batch; the counts are divided by it), in the mode the model is in.

    Protocol layers give their own counts; plain convolutions and linear layers outside them count
    as convolutions."""
    layers = protocol_layers(model)
    inside = [p for p, _ in layers]
    counts = dict(conv=0, attention=0, assembly=0)
    per_layer: Dict[str, list] = OrderedDict()
    handles = []

    def layer_hook(path: str):
        def hook(m: LayerProtocol, inputs, out):
            x_in, y = inputs[0], _first_tensor(out)
            if not isinstance(x_in, torch.Tensor) or y is None:
                return
            in_shape, out_shape = tuple(x_in.shape[1:]), tuple(y.shape[1:])
            conv = m.conv_macs(in_shape, out_shape) * x_in.shape[0]
            extra: ExtraMacs = m.extra_macs(in_shape, out_shape)
            att, asm = (extra.pooling + extra.attention) * x_in.shape[0], extra.assembly * x_in.shape[0]
            counts['conv'] += conv
            counts['attention'] += att
            counts['assembly'] += asm
            rec = per_layer.setdefault(path, [type(m).__name__, 0, 0, 0])
            rec[1] += conv
            rec[2] += att
            rec[3] += asm
        return hook

    def plain_hook(m: nn.Module, inputs, out):
        y = _first_tensor(out)
        if y is not None and y.dim() > 0:
            counts['conv'] += _plain_macs(m, y) * y.shape[0]

    def within(path: str) -> bool:  # inside a protocol layer (its own sub-modules are its business)
        return any(p == '' or path.startswith(p + '.') for p in inside)

    for path, m in model.named_modules():
        if path in inside:
            handles.append(m.register_forward_hook(layer_hook(path)))
        elif not within(path) and isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)):
            handles.append(m.register_forward_hook(plain_hook))
    try:
        _forward(model, x)
    finally:
        for h in handles:
            h.remove()
    b = x.shape[0]
    return DynamicFlops(conv_flops=counts['conv'] // b, attention_flops=counts['attention'] // b,
                        assembly_flops=counts['assembly'] // b, params=count_parameters(model),
                        input_shape=tuple(int(s) for s in x.shape[1:]),
                        per_layer=OrderedDict((k, (v[0], v[1] // b, v[2] // b, v[3] // b))
                                              for k, v in per_layer.items()))


def count_dynamic_flops(model: nn.Module, input_shape: Sequence[int] = (3, 224, 224)) -> DynamicFlops:
    """Count conv, attention and kernel-assembly MACs of ``model`` for one ``input_shape`` image
    (:func:`count_macs` on a batch of one in eval mode; the mode is restored afterwards).

    ``model``: any module (an OpenMMLab model is called with ``mode='tensor'``).
    """
    shape = tuple(int(s) for s in input_shape)
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        return count_macs(model, torch.randn(1, *shape, device=device))
    finally:
        model.train(was_training)


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
