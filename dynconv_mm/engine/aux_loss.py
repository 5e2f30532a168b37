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
from typing import Optional

from mmengine.hooks import Hook
from torch import nn

from ..layers.aux_loss import (  # noqa: F401  (the layer side, importable from here too)
    MAX_PENDING,
    AuxLossMixin,
    UncollectedAuxLossError,
    aux_loss_layers,
    collect_aux_losses,
    get_aux_loss_guard,
    set_aux_loss_guard,
)
from ..registry import register

__all__ = ['AuxLossMixin', 'AuxLossHook', 'UncollectedAuxLossError', 'collect_aux_losses', 'aux_loss_layers',
           'set_aux_loss_guard', 'get_aux_loss_guard']


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
