"""Auxiliary losses produced inside layers: the layer side (recording, collection, the guard).

Some dynamic convolutions train with a loss of their own besides the task loss: PEDConv's info-max
term (Hou and Kung, BMVC 2021) reconstructs each layer's pooled input from its sampled attention
and adds ``0.001 * sum(MSE)`` to the classification loss. Stock OpenMMLab models compute their
losses without knowing about such layers, so the term is routed around them:

1. A layer that produces an auxiliary loss inherits :class:`AuxLossMixin`. In a training forward
   (``module.training`` and autograd enabled) it *records* the unweighted loss; it keeps every
   recorded value until someone collects it (a layer called several times in one step, such as a
   head convolution shared across FPN levels, records several).
2. Collection pops those values, weights them, and adds them to the objective:
   :func:`collect_aux_losses` in plain PyTorch (``loss = task_loss + collect_aux_losses(model)``),
   or :class:`dynconv_mm.engine.AuxLossHook` in an mmengine ``Runner``.
3. **Guard: a dropped loss is an error, not a silent change of the method.** Every recorded loss
   must be collected before the backward pass through the layer that made it. Each training
   forward that records a loss also puts a gradient hook on its output; if the backward pass
   reaches that output while the layer still holds uncollected losses, the term was left out of
   the objective and :class:`UncollectedAuxLossError` is raised, telling the user to add the hook.
   A layer that accumulates ``MAX_PENDING`` uncollected losses (training forwards under autograd
   with no backward and no collection) reports them the same way. :func:`set_aux_loss_guard`
   switches the guard to ``'warn'`` (warn once per layer and discard) or ``'ignore'`` (discard); to
   train *without* the term on purpose, give the layer a loss weight of 0 (then it records
   nothing). Forwards under ``torch.no_grad()`` and in eval mode record nothing.

Gradient checkpointing: ``use_reentrant=False`` works (the term is recorded by the forward pass, not
again by the recomputation in the backward pass, :mod:`.recompute`); reentrant checkpointing runs the
forward without autograd, so the term cannot reach the optimizer and the guard reports it.
"""
from __future__ import annotations

import warnings
import weakref
from typing import Dict, Iterator, List, Optional, Tuple

import torch
from torch import nn

from .recompute import is_recomputing

__all__ = ['AuxLossMixin', 'UncollectedAuxLossError', 'collect_aux_losses', 'aux_loss_layers',
           'set_aux_loss_guard', 'get_aux_loss_guard', 'MAX_PENDING']

_GUARD_MODES = ('raise', 'warn', 'ignore')
_GUARD = {'mode': 'raise'}
#: a layer holding this many uncollected losses at a new training forward reports them (forwards without
#: backward, e.g. feature extraction in train mode under autograd, would otherwise pile up graphs)
MAX_PENDING = 64
_HOLDERS: 'weakref.WeakSet' = weakref.WeakSet()  # layers holding uncollected losses


def _drop_all_pending() -> None:
    for layer in list(_HOLDERS):
        layer._aux_pending.clear()
    _HOLDERS.clear()


class UncollectedAuxLossError(RuntimeError):
    """A layer's auxiliary loss was never added to the objective that is being back-propagated."""


def set_aux_loss_guard(mode: str) -> None:
    """What happens when an auxiliary loss is back-propagated past uncollected: ``'raise'`` (default),
    ``'warn'`` (warn once per layer, drop the losses) or ``'ignore'`` (drop them silently)."""
    if mode not in _GUARD_MODES:
        raise ValueError(f'set_aux_loss_guard: mode must be one of {_GUARD_MODES}, got {mode!r}')
    _GUARD['mode'] = mode


def get_aux_loss_guard() -> str:
    return _GUARD['mode']


def _guard_message(layer: nn.Module) -> str:
    return (f'{type(layer).__name__} produced an auxiliary training loss ({layer.aux_loss_name!r}) that was '
            'never added to the loss being back-propagated, so it would silently not be optimised. '
            "With an mmengine Runner add custom_hooks=[dict(type='AuxLossHook')] to the config; in plain "
            'PyTorch add dynconv_mm.engine.collect_aux_losses(model) to the loss before backward(). To train '
            'without the term on purpose, set the layer\'s aux_loss_weight=0 '
            "(or dynconv_mm.engine.set_aux_loss_guard('ignore')). Reentrant gradient checkpointing "
            '(torch.utils.checkpoint with use_reentrant=True) runs the forward without autograd and again during '
            'backward, after the losses were collected: use use_reentrant=False around such layers.')


class AuxLossMixin:
    """Mixin for ``nn.Module`` layers that produce an auxiliary loss in training.

    Subclasses call :meth:`init_aux_loss` in ``__init__`` and :meth:`record_aux_loss` from a training
    forward (it checks ``self.training`` and grad mode itself). ``aux_loss_name`` names the term in
    logs (``loss_aux_<name>``).
    """

    aux_loss_name: str = 'aux'

    def init_aux_loss(self, weight: float) -> None:
        weight = float(weight)
        if weight < 0:
            raise ValueError(f'{type(self).__name__}: aux_loss_weight must be >= 0, got {weight}')
        self.aux_loss_weight = weight
        self._aux_pending: List[torch.Tensor] = []
        self._aux_warned = False
        self._aux_skipped = False  # the last training forward ran without autograd

    def __getstate__(self):
        # copies (deepcopy for EMA, pickling) never carry this step's graph-bearing losses
        state = dict(super().__getstate__())
        state['_aux_pending'] = []
        return state

    @property
    def wants_aux_loss(self) -> bool:
        """Whether the current forward should compute the auxiliary loss (a training forward under
        autograd; the recomputation of checkpointing computes it too, so that it saves what the first
        run saved, and :meth:`record_aux_loss` decides whether to keep it)."""
        if not (self.training and self.aux_loss_weight > 0):
            return False
        if not torch.is_grad_enabled():
            self._aux_skipped = True  # e.g. the first run of reentrant checkpointing
            return False
        return True

    def record_aux_loss(self, loss: torch.Tensor, output: Optional[torch.Tensor] = None) -> None:
        """Keep ``loss`` (unweighted) until collected; ``output`` (the layer's output) gets the guard hook.

        The recomputation of non-reentrant checkpointing records nothing: its first run recorded the loss,
        which is already in the objective. The recomputation of *reentrant* checkpointing, whose first run
        had no autograd and recorded nothing, records it, and the guard reports that the term cannot
        reach the objective."""
        if is_recomputing() and not getattr(self, '_aux_skipped', False):
            return
        self._aux_skipped = False
        if len(self._aux_pending) >= MAX_PENDING:
            # many training forwards and no collection or backward: losses (and their graphs) pile up
            self._report_uncollected()
        self._aux_pending.append(loss)
        _HOLDERS.add(self)
        if output is not None and output.requires_grad and _GUARD['mode'] != 'ignore':
            output.register_hook(self._aux_guard_hook)

    def _aux_guard_hook(self, grad: torch.Tensor) -> None:
        if self._aux_pending:
            self._report_uncollected()
        return None

    def _report_uncollected(self) -> None:
        mode = _GUARD['mode']
        # this step's terms are lost for every layer: drop them all so the next step starts clean
        _drop_all_pending()
        if mode == 'raise':
            raise UncollectedAuxLossError(_guard_message(self))
        if mode == 'warn' and not self._aux_warned:
            self._aux_warned = True
            warnings.warn(_guard_message(self), RuntimeWarning, stacklevel=2)

    def pop_aux_loss(self) -> Optional[torch.Tensor]:
        """The sum of the losses recorded since the last call (unweighted), or ``None``; clears them."""
        if not self._aux_pending:
            return None
        losses, self._aux_pending = self._aux_pending, []
        _HOLDERS.discard(self)
        total = losses[0]
        for loss in losses[1:]:
            total = total + loss
        return total


def aux_loss_layers(model: nn.Module) -> Iterator[Tuple[str, AuxLossMixin]]:
    """``(name, layer)`` for every layer of ``model`` that can produce an auxiliary loss."""
    for name, m in model.named_modules():
        if isinstance(m, AuxLossMixin):
            yield name, m


def collect_aux_losses(model: nn.Module, loss_weight: Optional[float] = None,
                       by_name: bool = False):
    """Pop every auxiliary loss recorded in ``model`` since the last collection, weighted.

    Args:
        model: the model (a DDP/DataParallel wrapper is unwrapped).
        loss_weight: replaces each layer's own ``aux_loss_weight`` when given.
        by_name: return ``{aux_loss_name: weighted sum}`` instead of one tensor.

    Returns:
        A 0-d tensor (zero when nothing was recorded, on CPU) or, with ``by_name``, a dict (empty when
        nothing was recorded). Plain PyTorch use::

            loss = criterion(model(x), y) + collect_aux_losses(model)
            loss.backward()
    """
    model = getattr(model, 'module', model)
    totals: Dict[str, torch.Tensor] = {}
    for _, layer in aux_loss_layers(model):
        loss = layer.pop_aux_loss()
        if loss is None:
            continue
        w = layer.aux_loss_weight if loss_weight is None else float(loss_weight)
        term = loss * w
        name = layer.aux_loss_name
        totals[name] = term if name not in totals else totals[name] + term
    if by_name:
        return totals
    if not totals:
        return torch.zeros(())
    values = list(totals.values())
    total = values[0]
    for v in values[1:]:
        total = total + v
    return total
