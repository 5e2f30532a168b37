"""Temperature: the schedule state that dynamic layers with a softmax / sigmoid temperature share.

Layers that have a temperature (KernelWarehouse's attention, DY-Conv, ODConv) inherit
:class:`TemperatureMixin`. The value lives in a 0-d buffer ``<layer>.temperature`` that is part of
the state dict, so a model computes the same function wherever it is loaded (``load_state_dict``,
``mmengine.runner.load_checkpoint``, ``init_cfg=dict(type='Pretrained')``, the inferencers, export):

* changing it never retraces or recompiles a ``torch.compile``-d model (no Python float in the
  graph), it follows ``model.to(device)``, and DDP broadcasts it with the other buffers;
* a checkpoint without it (saved before the temperature was stored) loads at the layer's
  end-of-schedule value (:attr:`TemperatureMixin.end_temperature`, what a fully trained model
  evaluates at) and says so once;
* constructors start at the end-of-schedule value too; training a temperature-bearing layer whose
  temperature nobody set (no :class:`dynconv_mm.engine.TemperatureHook`, no :func:`set_temperature`)
  warns once, naming the hook, because the official recipes anneal it.
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import nn

from .torch_internals import is_compiling

__all__ = ['TemperatureMixin', 'set_temperature', 'get_temperature']

_WARNED = {'unscheduled': False, 'missing': False}


class TemperatureMixin:
    """Mixin for ``nn.Module`` layers whose forward depends on a temperature.

    Class attributes: ``end_temperature`` (the value at the end of the method's schedule, where a
    trained model evaluates) and ``temperature_preset`` (the :class:`~dynconv_mm.engine.TemperatureHook`
    preset of the method).
    """

    end_temperature: float = 1.0
    temperature_preset: str = ''
    #: how messages name the layer (default: its class name)
    temperature_owner: str = ''
    #: the attention divides by the temperature (so it must be > 0)
    temperature_divides: bool = True

    def init_temperature(self, value: Optional[float] = None) -> None:
        """Create the buffer: ``value`` (a deliberate fixed temperature) or the end-of-schedule value."""
        self.register_buffer('temperature', torch.tensor(self.end_temperature if value is None else float(value)))
        self._temperature_set = value is not None

    def set_temperature(self, value: float) -> None:
        value = float(value)
        if self.temperature_divides and not value > 0:
            raise ValueError(f'{self.temperature_owner or type(self).__name__}: the temperature divides the attention '
                             f'logits and must be > 0, got {value:g}')
        self.temperature.fill_(value)
        self._temperature_set = True

    def check_temperature_schedule(self) -> None:
        """Warn (once per process) when a training forward runs at a temperature nobody set."""
        if is_compiling() or not self.training:  # compiled graphs guard on what is read here: read nothing
            return
        if self._temperature_set or _WARNED['unscheduled'] or not torch.is_grad_enabled():
            return
        _WARNED['unscheduled'] = True
        preset = f", preset='{self.temperature_preset}'" if self.temperature_preset else ''
        warnings.warn(f'{self.temperature_owner or type(self).__name__} is trained at the fixed temperature '
                      f'{float(self.temperature):g}, '
                      'while its method anneals the temperature during training: add '
                      f"custom_hooks=[dict(type='TemperatureHook'{preset})] to the config (or call "
                      'dynconv_mm.set_temperature(model, value) to train at a fixed temperature on purpose).',
                      UserWarning, stacklevel=3)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key = prefix + 'temperature'
        absent = key not in state_dict
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if absent:  # a checkpoint from before the temperature was stored: the end of the schedule
            if key in missing_keys:
                missing_keys.remove(key)
            with torch.no_grad():
                self.temperature.fill_(self.end_temperature)
            self._temperature_set = True
            if not _WARNED['missing']:
                _WARNED['missing'] = True
                warnings.warn(f'the checkpoint has no temperature for {key} (and maybe other layers): it was saved '
                              'before dynconv_mm stored the temperature in the state dict; loading at the end of '
                              f'the schedule ({type(self).__name__}: {self.end_temperature:g}). Use '
                              'dynconv_mm.set_temperature(model, value) if it was saved mid-schedule.',
                              UserWarning, stacklevel=2)
        else:
            self._temperature_set = True


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
