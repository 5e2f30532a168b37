"""Temperature: the one piece of Python-side schedule state dynamic layers share.

Layers that have a temperature (KernelWarehouse's attention, DY-Conv, ODConv) inherit
:class:`TemperatureMixin`. The value lives in a non-persistent 0-d buffer, so that

* changing it never retraces or recompiles a ``torch.compile``-d model (no Python float in the
  graph), it follows ``model.to(device)``, and DDP broadcasts it with the other buffers;
* it is *not* in the state dict: the temperature is derived from the schedule position, which
  :class:`dynconv_mm.engine.TemperatureHook` keeps in the checkpoint.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn


class TemperatureMixin:
    """Mixin for ``nn.Module`` layers whose forward depends on a temperature."""

    def init_temperature(self, value: float) -> None:
        self.register_buffer('temperature', torch.tensor(float(value)), persistent=False)

    def set_temperature(self, value: float) -> None:
        self.temperature.fill_(float(value))


def set_temperature(model: nn.Module, value: float) -> int:
    """Set the temperature of every temperature-bearing layer in ``model``.

    Returns the number of layers set (0 means the model has no such layer).
    """
    n = 0
    for m in model.modules():
        if isinstance(m, TemperatureMixin):
            m.set_temperature(value)
            n += 1
    return n


def get_temperature(model: nn.Module) -> Optional[float]:
    """The temperature of the first temperature-bearing layer, or ``None`` if there is none."""
    for m in model.modules():
        if isinstance(m, TemperatureMixin):
            return float(m.temperature)
    return None
