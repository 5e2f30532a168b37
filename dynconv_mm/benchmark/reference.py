"""Official-style forwards of the dynamic layers, for parity tests and speed comparisons.

Each dynamic layer computes its output *the way its official implementation does it* in its own
``reference_forward`` (the layer protocol, :mod:`dynconv_mm.layers.base`), reading its own
parameters, so both forms see the same weights: typically an ``mm`` of the attention with the
flattened kernels (or warehouse), a reshape/permute into the kernel layout and one convolution of
the input viewed as ``(1, B*C_in, *S)`` with the batch folded into the groups.

:func:`use_reference` swaps these forwards into every layer of a model that has one (a context
manager), so whole backbones can be timed against their official-style counterpart with identical
weights.
"""
from __future__ import annotations

import contextlib
import types
from typing import Iterator, Tuple

import torch
from torch import nn

from ..layers.base import LayerProtocol
from ..layers.dynamic_base import folded_conv

__all__ = ['folded_conv', 'reference_forward', 'use_reference', 'count_dynamic_layers', 'has_reference']


def has_reference(module: nn.Module) -> bool:
    """The module is a dynamic layer with an official-style forward."""
    return isinstance(module, LayerProtocol) and module.has_reference


def reference_forward(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Official-style forward of one dynamic layer (``TypeError`` for a module without one)."""
    if not has_reference(layer):
        raise TypeError(f'reference_forward: no official-style forward for {type(layer).__name__}')
    return layer.reference_forward(x)


@contextlib.contextmanager
def use_reference(model: nn.Module, official_layout: bool = False) -> Iterator[int]:
    """Within the block, every dynamic layer of ``model`` with an official-style forward runs it.

    ``official_layout=True`` also stores parameters the way the official code does for the block
    (modules offering ``official_layout()``: the KW warehouses row-major, where dynconv_mm stores
    them cell-major); the benchmark times the reference that way. Values and gradients are carried
    over both ways.

    Yields the number of layers swapped; the original forwards (and layouts) are restored on exit.
    """
    swapped: list = []
    for module in model.modules():
        if has_reference(module):
            module.forward = types.MethodType(type(module).reference_forward, module)
            swapped.append(module)
    with contextlib.ExitStack() as stack:
        if official_layout:
            for module in model.modules():
                layout = getattr(module, 'official_layout', None)
                if callable(layout):
                    stack.enter_context(layout())
        try:
            yield len(swapped)
        finally:
            for module in swapped:
                del module.forward


def count_dynamic_layers(model: nn.Module) -> Tuple[int, int]:
    """``(dynamic layers with an official-style forward, all modules)`` of ``model``."""
    mods = list(model.modules())
    return sum(has_reference(m) for m in mods), len(mods)
