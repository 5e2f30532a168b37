"""Clear errors when a checkpoint and a model disagree on the re-parameterization form.

A re-parameterized layer (DO-Conv, OREPA, DBB, RepVGG, ``ConvNorm``) exists in two forms with different
state-dict keys: the *training* form (branch weights, e.g. ``weight_orepa_origin``, ``vector``, ``bn.*``)
and the *deploy* form (one folded ``reparam.weight`` / ``reparam.bias``). Loading one into the other
would, with a non-strict loader such as mmengine's ``load_checkpoint`` (``strict=False`` by default),
only log missing and unexpected keys and leave the layer randomly initialised. :func:`check_reparam_form`
runs from ``ReparamMixin._load_from_state_dict`` and raises :class:`ReparamFormError` instead, naming
the layer, which form the checkpoint holds, and what to do.
"""
from __future__ import annotations

from typing import Mapping, Sequence

__all__ = ['ReparamFormError', 'check_reparam_form']

_FOLD_HELP = ('fold it first: python tools/reparameterize.py CONFIG CHECKPOINT OUT_CHECKPOINT --out-config '
              'OUT_CONFIG, then load OUT_CHECKPOINT into the model of OUT_CONFIG')
_DEPLOY_HELP = ('build the model from the deploy config that tools/reparameterize.py wrote (--out-config; '
                're-parameterized layers with deploy=True), or load the training-time checkpoint; a folded '
                'kernel cannot be split back into its branches')


class ReparamFormError(RuntimeError):
    """A training-time checkpoint was loaded into a deploy-built model, or the reverse."""


def check_reparam_form(layer_name: str, deployed: bool, training_attrs: Sequence[str], state_dict: Mapping,
                       prefix: str) -> None:
    """Raise :class:`ReparamFormError` when ``state_dict`` holds this layer only in the other form.

    Args:
        layer_name: the layer's class name (for the message).
        deployed: whether the layer is in deploy form.
        training_attrs: names of the layer's training-time attributes (its ``_training_attrs()``).
        state_dict: the state dict being loaded.
        prefix: the layer's key prefix in it (``'backbone.layer1.0.conv1.'``).

    A state dict without any key of the layer (a partial checkpoint) passes.
    """
    own = [k for k in state_dict if k.startswith(prefix)]
    if not own:
        return
    has_deploy = (prefix + 'reparam.weight') in state_dict
    attrs = set(training_attrs)
    train_keys = [k for k in own if k[len(prefix):].split('.', 1)[0] in attrs]
    where = f'{layer_name} at {prefix[:-1] or "<root>"!r}'
    if deployed and train_keys and not has_deploy:
        raise ReparamFormError(
            f'{where} is built in deploy form (deploy=True, one folded conv "reparam") but the checkpoint holds '
            f'its training-time (unfolded) weights, e.g. {train_keys[0]!r}. This is a training checkpoint: '
            + _FOLD_HELP + '.')
    if not deployed and has_deploy and not train_keys:
        raise ReparamFormError(
            f'{where} is built in training form but the checkpoint holds its deployed (folded) weights '
            f'{prefix + "reparam.weight"!r}. This is a deploy checkpoint written by tools/reparameterize.py: '
            + _DEPLOY_HELP + '.')
