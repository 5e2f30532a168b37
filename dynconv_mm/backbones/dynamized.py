"""``Dynamized``: any backbone, loaded with its static pretrained weights, then made dynamic, in a config.

::

    model = dict(backbone=dict(
        type='Dynamized',
        backbone=dict(type='mmpretrain.TIMMBackbone', model_name='tf_efficientnet_lite0', features_only=True,
                      pretrained=False, out_indices=(1, 2, 3, 4)),
        rules=dict(type='ODConv2d', kind='kxk'),
        init_cfg=dict(type='Pretrained', checkpoint='efficientnet-lite0_timm.pth')))

The wrapper builds the static backbone, loads the static checkpoint of ``init_cfg`` into it *at
construction* (every backbone key must be found: a missing one is an error, checkpoint keys the
backbone does not have, such as a classifier, are listed in the log), and then converts it with
:func:`dynconv_mm.dynamize`, whose report goes to the log. Its ``init_weights()`` does nothing: the
weights are final when the model is built, so neither an OpenMMLab ``init_weights()`` pass nor the
order of initialisations can overwrite the static start, and static weights are never loaded into
dynamic layers by name. To resume or fine-tune a dynamized model, use ``load_from`` / ``resume`` with
its own (dynamic) checkpoint as usual.
"""
from __future__ import annotations

import copy
from typing import Any, Dict, List, Optional, Union

import torch
from mmengine.model import BaseModule
from torch import nn

from ..registry import register
from ..surgery import Rules, dynamize

__all__ = ['Dynamized', 'load_static_checkpoint']


def load_static_checkpoint(module: nn.Module, checkpoint: str, prefix: Optional[str] = None) -> List[str]:
    """Load a static checkpoint into ``module``; returns the checkpoint keys the module has no place for.

    ``prefix``: only the checkpoint keys under it, with it removed (``'backbone.'`` for the backbone of a
    whole classifier). Where the keys lack the module's own prefix (a timm state dict for
    ``TIMMBackbone``'s ``timm_model.*``), it is added. Raises ``KeyError`` naming the module keys the
    checkpoint does not have (they would stay random) and ``ValueError`` for a shape mismatch.
    """
    from mmengine.runner.checkpoint import CheckpointLoader

    from ..converters.common import extract_state_dict
    raw = CheckpointLoader.load_checkpoint(checkpoint, map_location='cpu')
    sd = extract_state_dict(raw)
    if prefix:
        sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
        if not sd:
            raise KeyError(f'{checkpoint} has no key under the prefix {prefix!r}')
    own = module.state_dict()
    if not set(sd) & set(own):  # the checkpoint lacks the module's own top-level prefix
        heads = {k.split('.', 1)[0] for k in own}
        for head in heads:
            trial = {f'{head}.{k}': v for k, v in sd.items()}
            if set(trial) & set(own):
                sd = trial
                break
    missing = [k for k in own if k not in sd]
    if missing:
        raise KeyError(f'{checkpoint} does not hold {len(missing)} of the backbone\'s {len(own)} keys (e.g. '
                       f'{missing[:5]}); they would keep their random initialisation. Convert the checkpoint to '
                       'this backbone\'s keys first (tools/model_converters/), or give init_cfg a prefix.')
    bad = [k for k in own if tuple(sd[k].shape) != tuple(own[k].shape)]
    if bad:
        raise ValueError(f'{checkpoint} does not fit the backbone: shapes differ at {bad[:5]}')
    module.load_state_dict({k: sd[k] for k in own}, strict=True)
    return [k for k in sd if k not in own]


@register('model')
class Dynamized(BaseModule):
    """A backbone loaded with static weights, then converted by :func:`dynconv_mm.dynamize`.

    Args:
        backbone: config of any registered backbone (``mmpretrain.TIMMBackbone``, ``mmdet.ResNet``, ...).
        rules: the :func:`~dynconv_mm.dynamize` rules; ``None``: the static backbone, loaded the same way
            (the control of an experiment).
        init_cfg: ``dict(type='Pretrained', checkpoint=PATH, prefix=None)``: the static checkpoint, loaded
            before the conversion; ``None``: the backbone's own ``init_weights()`` runs first (its
            ``init_cfg`` / ``pretrained`` option).
        static_options: options of the static initialisations (``expert_noise``, ``kw_attention``, ...).
        deploy: build the deployed form (re-parameterized layers folded), for a checkpoint that
            ``tools/reparameterize.py`` wrote: the static checkpoint is not loaded (the deploy
            checkpoint holds every weight).

    Attributes:
        dynamize_report: the conversion's :class:`~dynconv_mm.surgery.DynamizeReport`.
    """

    def __init__(self, backbone: Dict[str, Any], rules: Optional[Rules],
                 init_cfg: Optional[Union[dict, List[dict]]] = None, static_options: Optional[Dict[str, Any]] = None,
                 deploy: bool = False) -> None:
        super().__init__(init_cfg=None)
        from mmengine.logging import MMLogger
        from mmengine.registry import MODELS
        logger = MMLogger.get_current_instance()
        self.backbone = MODELS.build(copy.deepcopy(backbone))
        self.deploy = deploy
        self.dynamize_report = None
        cfg = init_cfg[0] if isinstance(init_cfg, (list, tuple)) and len(init_cfg) == 1 else init_cfg
        if deploy:
            if rules is not None:
                _, self.dynamize_report = dynamize(self.backbone, rules, check=False, **(static_options or {}))
            from ..layers.reparam.fuse import reparameterize_model
            reparameterize_model(self.backbone)
            self._is_init = True
            return
        if cfg is None:
            if hasattr(self.backbone, 'init_weights'):
                self.backbone.init_weights()
        elif isinstance(cfg, dict) and cfg.get('type') == 'Pretrained' and cfg.get('checkpoint'):
            extra = load_static_checkpoint(self.backbone, cfg['checkpoint'], cfg.get('prefix'))
            logger.info(f'Dynamized: loaded the static checkpoint {cfg["checkpoint"]}'
                        + (f'; {len(extra)} of its keys have no place in the backbone: {extra[:8]}' if extra else ''))
        else:
            raise ValueError(f"Dynamized: init_cfg must be None or dict(type='Pretrained', checkpoint=PATH, "
                             f'prefix=None), got {init_cfg!r}')
        if rules is not None:
            _, self.dynamize_report = dynamize(self.backbone, rules, **(static_options or {}))
            logger.info('Dynamized: ' + self.dynamize_report.summary())
        self._is_init = True

    def init_weights(self) -> None:
        """Nothing: the static weights and the conversion are applied when the model is built."""
        self._is_init = True

    def forward(self, x: torch.Tensor):
        return self.backbone(x)
