"""Auxiliary losses produced inside layers, and how they reach the optimizer.

Some dynamic convolutions train with a loss of their own besides the task loss: PEDConv's info-max
term (Hou and Kung, BMVC 2021) reconstructs each layer's pooled input from its sampled attention
and adds ``0.001 * sum(MSE)`` to the classification loss. Stock OpenMMLab models
(``ImageClassifier``, ``MaskRCNN``, ``EncoderDecoder``...) compute their losses without knowing
about such layers, so dynconv_mm routes the term around them:

1. A layer that produces an auxiliary loss inherits :class:`AuxLossMixin`. In a training forward
   (``module.training`` and autograd enabled) it *records* the unweighted loss; it keeps every
   recorded value until someone collects it (a layer called several times in one step, such as a
   head convolution shared across FPN levels, records several).
2. Collection pops those values, weights them, and adds them to the objective:

   * in an mmengine ``Runner``: :class:`AuxLossHook` (``custom_hooks=[dict(type='AuxLossHook')]``)
     attaches a forward hook to the (unwrapped) model; whenever a forward returns a dict of losses
     (``mode='loss'``), it gains ``loss_aux_<name>`` = weight x sum of the collected losses.
     mmengine's ``parse_losses`` sums every key containing ``'loss'``, so the term is optimised
     and logged with no change to the model's code;
   * in plain PyTorch: ``loss = task_loss + collect_aux_losses(model)`` before ``backward()``.

3. **Guard: a dropped loss is an error, not a silent change of the method.** Every recorded loss
   must be collected before the backward pass through the layer that made it. Each training
   forward that records a loss also puts a gradient hook on its output; if the backward pass
   reaches that output while the layer still holds uncollected losses, the term was left out of
   the objective and :class:`UncollectedAuxLossError` is raised, telling the user to add the hook.
   This fails on the first iteration of a misconfigured run, never after days of training on the
   wrong objective. A layer that accumulates ``MAX_PENDING`` uncollected losses (training forwards
   under autograd with no backward and no collection) reports them the same way.
   :func:`set_aux_loss_guard` switches the guard to ``'warn'`` (warn once per layer and discard)
   or ``'ignore'`` (discard); to train *without* the term on purpose, give the layer a loss weight
   of 0 (then it records nothing). Forwards under ``torch.no_grad()`` and in eval mode record
   nothing, so inference, validation and EMA updates never trip the guard.

Gradient checkpointing: ``use_reentrant=False`` works (the term's graph is recomputed like the rest);
reentrant checkpointing runs the forward without autograd, so the term cannot reach the optimizer and
the guard reports it.
"""
from __future__ import annotations

import warnings
import weakref
from typing import Dict, Iterator, List, Optional, Tuple

import torch
from mmengine.hooks import Hook
from torch import nn

from ..registry import register

__all__ = ['AuxLossMixin', 'AuxLossHook', 'UncollectedAuxLossError', 'collect_aux_losses', 'aux_loss_layers',
           'set_aux_loss_guard', 'get_aux_loss_guard']

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

    def __getstate__(self):
        # copies (deepcopy for EMA, pickling) never carry this step's graph-bearing losses
        state = dict(super().__getstate__())
        state['_aux_pending'] = []
        return state

    @property
    def wants_aux_loss(self) -> bool:
        """Whether the current forward should compute and record the auxiliary loss."""
        return self.training and self.aux_loss_weight > 0 and torch.is_grad_enabled()

    def record_aux_loss(self, loss: torch.Tensor, output: Optional[torch.Tensor] = None) -> None:
        """Keep ``loss`` (unweighted) until collected; ``output`` (the layer's output) gets the guard hook."""
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


@register('hook')
class AuxLossHook(Hook):
    """Add the auxiliary losses of dynconv_mm layers to the losses of any OpenMMLab model.

    At ``before_train`` it attaches a forward hook to the runner's model (unwrapping DDP). Whenever a
    forward returns a dict (the ``mode='loss'`` forward of every OpenMMLab ``BaseModel``), the
    losses recorded during that forward are popped, weighted and added as ``loss_aux_<name>``
    (``<name>`` is the layer's ``aux_loss_name``, e.g. ``infomax`` for PEDConv, or ``loss_name``).
    ``parse_losses`` then optimises and logs them.

    Args:
        loss_weight: overrides every layer's ``aux_loss_weight`` (``None``: keep the layers' own,
            0.001 for PEDConv as in the official trainer).
        loss_name: one key ``loss_aux_<loss_name>`` for all terms instead of one per kind of layer.

    Example::

        custom_hooks = [dict(type='AuxLossHook')]
    """

    priority = 'NORMAL'

    def __init__(self, loss_weight: Optional[float] = None, loss_name: Optional[str] = None) -> None:
        if loss_weight is not None and float(loss_weight) < 0:
            raise ValueError(f'AuxLossHook: loss_weight must be >= 0, got {loss_weight}')
        if loss_name is not None and (not isinstance(loss_name, str) or not loss_name):
            raise ValueError(f'AuxLossHook: loss_name must be a non-empty string, got {loss_name!r}')
        self.loss_weight = None if loss_weight is None else float(loss_weight)
        self.loss_name = loss_name
        self._handle = None

    def _add_losses(self, module: nn.Module, args, output):
        if not isinstance(output, dict):
            return None
        terms = collect_aux_losses(module, self.loss_weight, by_name=True)
        if not terms:
            return None
        out = dict(output)
        if self.loss_name is not None:
            values = list(terms.values())
            total = values[0]
            for v in values[1:]:
                total = total + v
            terms = {self.loss_name: total}
        for name, value in terms.items():
            key = f'loss_aux_{name}'
            out[key] = out[key] + value if key in out else value
        return type(output)(out) if type(output) is not dict else out

    def attach(self, model: nn.Module) -> int:
        """Attach to ``model`` (idempotent); returns the number of aux-loss layers found."""
        model = getattr(model, 'module', model)
        if self._handle is None:
            self._handle = model.register_forward_hook(self._add_losses)
        return sum(1 for _ in aux_loss_layers(model))

    def detach(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def before_train(self, runner) -> None:
        n = self.attach(runner.model)
        if n == 0:
            warnings.warn('AuxLossHook: the model has no layer that produces an auxiliary loss; the hook does '
                          'nothing.', UserWarning, stacklevel=2)
        elif hasattr(runner, 'logger'):
            runner.logger.info(f'AuxLossHook: {n} layer(s) add their auxiliary loss as loss_aux_* '
                               f'(weight {"per layer" if self.loss_weight is None else self.loss_weight}).')

    def after_train(self, runner) -> None:
        self.detach()
