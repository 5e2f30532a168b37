"""Official-style forwards of the dynamic layers, for parity tests and speed comparisons.

Each function recomputes a layer's output *the way the official implementation does it*, reading
the parameters of our layer (so both see the same weights):

* KernelWarehouse (Li & Yao, ICML 2024): attention logits reshaped to ``(B*M, n+1)``, L1 normalised,
  mixed with the temperature prior, zero-cell column dropped; one ``mm`` with the flattened
  warehouse; mixtures reshaped to ``(B, G_s, G_o, G_i, c_o, c_i, *ck)``, permuted to the kernel
  layout and reshaped to ``(B*C_out, C_in/g, *k)``; then one convolution of the input viewed as
  ``(1, B*C_in, *S)`` with ``groups = g*B`` (the batch folded into the groups, at every batch size).
* ODConv (Li et al., ICLR 2022): channel attention on the input; kernel aggregation as the sum over
  ``kernel_num`` of the broadcast product ``a_s * a_k * W`` (a ``(B, K, C_out, C_in/g, k, k)``
  temporary); batch-folded grouped conv; filter attention on the output.
* DY-Conv (Chen et al., CVPR 2020) and CondConv (Yang et al., NeurIPS 2019): ``mm`` of the attention
  with the flattened kernels, batch-folded grouped conv.
* PEDConv (BMVC 2021): rank-1 attention tensor times the base kernel, batch-folded grouped conv.
* Dynamic depth-wise conv (DWNet, Han et al., ICLR 2022): generated kernels, batch-folded grouped
  conv with ``groups = B*C``.

:func:`use_reference` swaps these forwards into every supported layer of a model (a context
manager), so whole backbones can be timed against their official-style counterpart with identical
weights.
"""
from __future__ import annotations

import contextlib
import types
from typing import Callable, Dict, Iterator, Optional, Tuple, Type

import torch
import torch.nn.functional as F
from torch import nn

from ..layers.condconv import CondConv2d
from ..layers.dyconv import DyConv2d
from ..layers.dynamic_dw import DynamicDWConv2d
from ..layers.kernel_warehouse import KWConvNd, WarehouseManager
from ..layers.odconv import ODConv2d
from ..layers.pedconv import PEDConv2d

__all__ = ['folded_conv', 'kw_reference_attention', 'kw_reference_forward', 'odconv_reference_forward',
           'dyconv_reference_forward', 'condconv_reference_forward', 'pedconv_reference_forward',
           'dynamic_dw_reference_forward', 'reference_forward', 'use_reference', 'REFERENCE_FORWARDS']

_CONVS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def folded_conv(x: torch.Tensor, weight: torch.Tensor, stride, padding, dilation, groups: int) -> torch.Tensor:
    """Batch-folded grouped convolution: ``x (B, C_in, *S)``, ``weight (B*C_out, C_in/g, *k)`` ->
    ``(B, C_out, *S_out)`` with one convolution of ``groups * B`` groups."""
    B = x.shape[0]
    nd = x.dim() - 2
    out = _CONVS[nd](x.reshape(1, -1, *x.shape[2:]), weight, None, stride, padding, dilation, groups * B)
    return out.reshape(B, -1, *out.shape[2:])


# --------------------------------------------------------------------------------------------
# KernelWarehouse
# --------------------------------------------------------------------------------------------
def kw_reference_attention(layer: KWConvNd, x: torch.Tensor) -> torch.Tensor:
    """Official-style KW attention of ``layer`` for ``x (B, C_in, *S)``: ``(B*M, n)``."""
    att = layer.attention
    B = x.shape[0]
    pooled = x.reshape(B, x.shape[1], -1).mean(-1)
    h = att.act1(att.norm1(att.fc1(pooled)))
    z = att.fc2(h)
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
    z = (1.0 - tau) * z + tau * att.temp_bias.to(z.dtype).reshape(M, P).repeat(B, 1)
    return z[:, :-1]


def kw_reference_forward(layer: KWConvNd, x: torch.Tensor) -> torch.Tensor:
    """Official-style KW convolution (attention, ``mm`` assembly with reshape/permute, folded conv)."""
    alpha = kw_reference_attention(layer, x)
    cells = layer.manager.weights[layer.warehouse_id]
    B = x.shape[0]
    d = layer.dimension
    mixtures = torch.mm(alpha, cells.reshape(cells.shape[0], -1).to(alpha.dtype))
    mixtures = mixtures.reshape(B, layer.groups_spatial, layer.groups_out_channel, layer.groups_in_channel,
                                *layer.cell_shape[1:])
    mixtures = mixtures.permute(0, 2, 4, 3, 5, 1, *range(6, 6 + d))
    weight = mixtures.reshape(-1, layer.in_planes // layer.groups, *layer.kernel_size)
    out = folded_conv(x, weight.to(x.dtype), layer.stride, layer.padding, layer.dilation, layer.groups)
    if layer.bias is not None:
        out = out + layer.bias.to(out.dtype).reshape(1, -1, *([1] * d))
    return out


# --------------------------------------------------------------------------------------------
# other dynamic convolutions
# --------------------------------------------------------------------------------------------
def odconv_reference_forward(layer: ODConv2d, x: torch.Tensor) -> torch.Tensor:
    """Official-style ODConv: broadcast-product kernel aggregation, folded grouped conv."""
    a_c, a_f, a_s, a_k = layer.attention(x, layer.temperature)
    B = x.shape[0]
    x = x * a_c
    if layer.pointwise_static:
        out = F.conv2d(x, layer.weight[0], None, layer.stride, layer.padding, layer.dilation, layer.groups)
    else:
        w = layer.weight.unsqueeze(0)  # (1, K, C_out, C_in/g, k, k)
        if a_s is not None:
            w = w * a_s.reshape(B, 1, 1, 1, *layer.kernel_size)
        if a_k is not None:
            w = w * a_k.reshape(B, -1, 1, 1, 1, 1)
        else:
            w = w.expand(B, *w.shape[1:])
        weight = w.sum(dim=1).reshape(-1, layer.in_channels // layer.groups, *layer.kernel_size)
        out = folded_conv(x, weight.to(x.dtype), layer.stride, layer.padding, layer.dilation, layer.groups)
    if a_f is not None:
        out = out * a_f
    if layer.bias is not None:
        out = out + layer.bias.to(out.dtype).reshape(1, -1, 1, 1)
    return out


def _mm_mixture_forward(layer: nn.Module, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
    K = layer.weight.shape[0]
    attn = attn.to(layer.weight.dtype)
    weight = torch.mm(attn, layer.weight.reshape(K, -1)).reshape(-1, layer.in_channels // layer.groups,
                                                                  *layer.kernel_size)
    out = folded_conv(x, weight.to(x.dtype), layer.stride, layer.padding, layer.dilation, layer.groups)
    if layer.bias is not None:
        out = out + torch.mm(attn, layer.bias).to(out.dtype).reshape(x.shape[0], -1, 1, 1)
    return out


def dyconv_reference_forward(layer: DyConv2d, x: torch.Tensor) -> torch.Tensor:
    """Official-style DY-Conv: softmax attention ``mm`` flattened kernels, folded grouped conv."""
    return _mm_mixture_forward(layer, x, layer.attention(x, layer.temperature))


def condconv_reference_forward(layer: CondConv2d, x: torch.Tensor) -> torch.Tensor:
    """CondConv as timm runs it: sigmoid routing ``mm`` flattened experts, folded grouped conv."""
    return _mm_mixture_forward(layer, x, layer.routing_weights(x))


def pedconv_reference_forward(layer: PEDConv2d, x: torch.Tensor) -> torch.Tensor:
    """Official-style PEDConv (eval semantics of the aux loss: none is recorded): rank-1 attention
    tensor times the base kernel, folded grouped conv."""
    B = x.shape[0]
    pooled = x.reshape(B, x.shape[1], -1).mean(-1)
    a_in, a_out, a_k, _ = layer.attn(pooled)
    attn = a_out.reshape(B, -1, 1, 1, 1) * a_in.reshape(B, 1, -1, 1, 1) * a_k.reshape(B, 1, 1, *layer.kernel_size)
    weight = (layer.weight.unsqueeze(0) * attn).reshape(-1, layer.in_channels // layer.groups, *layer.kernel_size)
    out = folded_conv(x, weight.to(x.dtype), layer.stride, layer.padding, layer.dilation, layer.groups)
    if layer.bias is not None:
        out = out + layer.bias.to(out.dtype).reshape(1, -1, 1, 1)
    return out


def dynamic_dw_reference_forward(layer: DynamicDWConv2d, x: torch.Tensor) -> torch.Tensor:
    """DWNet-style dynamic depth-wise conv: generated kernels, folded conv with ``groups = B*C``."""
    B, C = x.shape[:2]
    weight = layer.generate_kernels(x).reshape(B * C, 1, *layer.kernel_size)
    out = folded_conv(x, weight.to(x.dtype), layer.stride, layer.padding, layer.dilation, C)
    if layer.bias is not None:
        out = out + layer.bias.to(out.dtype).reshape(1, -1, 1, 1)
    return out


#: layer class -> official-style forward ``(layer, x) -> y``
REFERENCE_FORWARDS: Dict[Type[nn.Module], Callable[[nn.Module, torch.Tensor], torch.Tensor]] = {
    KWConvNd: kw_reference_forward,
    ODConv2d: odconv_reference_forward,
    DyConv2d: dyconv_reference_forward,
    CondConv2d: condconv_reference_forward,
    PEDConv2d: pedconv_reference_forward,
    DynamicDWConv2d: dynamic_dw_reference_forward,
}


def _lookup(module: nn.Module) -> Optional[Callable]:
    for cls, fn in REFERENCE_FORWARDS.items():
        if isinstance(module, cls):
            return fn
    return None


def reference_forward(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Official-style forward of one supported dynamic layer (``TypeError`` for others)."""
    fn = _lookup(layer)
    if fn is None:
        raise TypeError(f'reference_forward: no official-style forward for {type(layer).__name__}')
    return fn(layer, x)


@contextlib.contextmanager
def use_reference(model: nn.Module, official_layout: bool = False) -> Iterator[int]:
    """Within the block, every supported dynamic layer of ``model`` runs its official-style forward.

    ``official_layout=True`` also stores the KW warehouses row-major for the block, as the official
    code does (dynconv_mm stores them cell-major, :func:`~dynconv_mm.layers.kernel_warehouse.cell_major_empty`);
    the benchmark times the reference that way. Values and gradients are carried over both ways.

    Yields the number of layers swapped; the original forwards (and layouts) are restored on exit.
    """
    swapped: list = []
    for module in model.modules():
        fn = _lookup(module)
        if fn is not None:
            module.forward = types.MethodType(fn, module)
            swapped.append(module)
    relaid: list = []
    if official_layout:
        for module in model.modules():
            if isinstance(module, WarehouseManager):
                for p in module.weights:
                    relaid.append((p, p.data))
                    p.data = p.data.contiguous()
                    if p.grad is not None:
                        p.grad = p.grad.contiguous()
    try:
        yield len(swapped)
    finally:
        for module in swapped:
            del module.forward
        for p, stored in relaid:
            stored.copy_(p.data)
            if p.grad is not None:
                p.grad = torch.empty_like(stored).copy_(p.grad)
            p.data = stored


def count_dynamic_layers(model: nn.Module) -> Tuple[int, int]:
    """``(supported dynamic layers, all modules)`` of ``model``."""
    mods = list(model.modules())
    return sum(_lookup(m) is not None for m in mods), len(mods)
