"""Temperature annealing for dynamic convolutions, as an mmengine hook.

The official trainers anneal the attention temperature every iteration:

* KernelWarehouse (``engine.py``): ``tau`` goes linearly from 1 to 0 over the first 20 epochs
  (15 for MobileNetV2), then stays 0;
* DY-Conv / ODConv: from 30 to 1 over the first 10 epochs, then stays 1.

Both are ``tau(t) = end + max(0, (start - end) * (T - t) / max(1, T))`` with ``T`` the number of
annealing iterations and ``t = iteration + 1`` (the value used *during* iteration ``iteration``).
:class:`TemperatureHook` applies it before every training iteration. The temperature is derived
from the iteration counter, which mmengine restores on ``resume=True``, so a resumed run continues
exactly where it stopped. The temperature itself is part of the model's state dict (so a checkpoint
computes what it computed when saved, wherever it is loaded); it is also written into the
checkpoint's ``meta`` for reading, and restored from there for checkpoints saved before the state
dict carried it.
"""
from __future__ import annotations

from typing import Optional

from mmengine.hooks import Hook

from ..layers.temperature import get_temperature, set_temperature
from ..registry import register

__all__ = ['TemperatureHook', 'linear_temperature', 'TEMPERATURE_PRESETS']

#: official schedules: (start, end, annealing epochs)
TEMPERATURE_PRESETS = {
    'kernelwarehouse': (1.0, 0.0, 20),
    'kernelwarehouse_mobilenetv2': (1.0, 0.0, 15),
    'dyconv': (30.0, 1.0, 10),
    'odconv': (30.0, 1.0, 10),
}


def linear_temperature(t: int, total: int, start: float, end: float) -> float:
    """The official linear schedule: ``end + max(0, (start - end) * (total - t) / max(1, total))``."""
    return end + max(0.0, (start - end) * (total - t) / max(1, total))


def _unwrap(model):
    return getattr(model, 'module', model)


@register('hook')
class TemperatureHook(Hook):
    """Anneal the temperature of every dynamic layer of the model, per iteration.

    Args:
        preset: one of :data:`TEMPERATURE_PRESETS` (``'kernelwarehouse'``, ``'dyconv'``, ...), giving
            ``start``, ``end`` and ``num_epochs``; explicit arguments override it.
        start: temperature at the first iteration.
        end: temperature after annealing.
        num_epochs: annealing length in epochs (``len(train_dataloader)`` iterations each).
        num_iters: annealing length in iterations (instead of ``num_epochs``; for iteration-based loops).

    Example::

        custom_hooks = [dict(type='TemperatureHook', preset='kernelwarehouse')]
    """

    priority = 'NORMAL'

    def __init__(self,
                 preset: Optional[str] = None,
                 start: Optional[float] = None,
                 end: Optional[float] = None,
                 num_epochs: Optional[int] = None,
                 num_iters: Optional[int] = None) -> None:
        if preset is not None and preset not in TEMPERATURE_PRESETS:
            raise ValueError(f'TemperatureHook: unknown preset {preset!r}; choose from {sorted(TEMPERATURE_PRESETS)}')
        p_start, p_end, p_epochs = TEMPERATURE_PRESETS.get(preset, (None, None, None))
        self.start = float(start if start is not None else (p_start if p_start is not None else 1.0))
        self.end = float(end if end is not None else (p_end if p_end is not None else 0.0))
        if num_epochs is not None and num_iters is not None:
            raise ValueError('TemperatureHook: give num_epochs or num_iters, not both')
        self.num_iters = num_iters
        self.num_epochs = num_epochs if num_iters is None else None
        if self.num_epochs is None and self.num_iters is None:
            self.num_epochs = p_epochs if p_epochs is not None else 20
        for name in ('num_epochs', 'num_iters'):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 0):
                raise ValueError(f'TemperatureHook: {name} must be a non-negative int, got {v!r}')

    # ------------------------------------------------------------------ schedule
    def total_iters(self, runner) -> int:
        if self.num_iters is not None:
            return self.num_iters
        return self.num_epochs * len(runner.train_dataloader)

    def value_at(self, runner, iteration: int) -> float:
        """Temperature used during training iteration ``iteration`` (0-based)."""
        return linear_temperature(iteration + 1, self.total_iters(runner), self.start, self.end)

    # ------------------------------------------------------------------ hook points
    def before_run(self, runner) -> None:
        if get_temperature(_unwrap(runner.model)) is None:
            runner.logger.warning('TemperatureHook: the model has no layer with a temperature; the hook does nothing.')

    def before_train_iter(self, runner, batch_idx: int, data_batch=None) -> None:
        set_temperature(_unwrap(runner.model), self.value_at(runner, runner.iter))

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        value = get_temperature(_unwrap(runner.model))
        if value is not None:
            runner.message_hub.update_scalar('train/temperature', value)

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        value = get_temperature(_unwrap(runner.model))
        if value is not None:
            checkpoint.setdefault('meta', {})['temperature'] = value

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        # the state dict carries the temperature; older checkpoints only have it in their meta
        sd = checkpoint.get('state_dict', {})
        if not any(k.endswith('.temperature') for k in sd):
            value = checkpoint.get('meta', {}).get('temperature')
            if value is not None:
                set_temperature(_unwrap(runner.model), float(value))
