"""Deployment: fold a trained re-parameterized model into plain convolutions, check it, write it.

:func:`reparameterize_checkpoint` is the library side of ``tools/reparameterize.py``:

1. build the model of a training config (mmpretrain, mmdet or mmseg) and load the checkpoint
   strictly; a checkpoint that is already deployed, or belongs to another model, is refused with
   a message saying which it is;
2. fold every re-parameterized layer (:func:`dynconv_mm.reparameterize_model`);
3. compare the training-time and deployed models on a random input (``extract_feat``: backbone and
   neck, where the folded layers live) and refuse to write anything when they disagree beyond the
   tolerance;
4. write the deploy checkpoint and a config that builds the plain model directly (``deploy=True``
   on every re-parameterized layer and backbone of the config).

A refused run writes nothing and never touches its inputs: outputs that would replace the training
checkpoint or config are refused up front (a folded kernel cannot be split back into its branches), and
each file is written to a temporary name and renamed into place only when complete.
"""
from __future__ import annotations

import copy
import inspect
import math
import os
import os.path as osp
from typing import Any, Dict, Optional, Tuple

import torch
from mmengine.config import Config
from torch import nn

from .apis import build_model, load_config
from .converters.common import atomic_save
from .layers.reparam.fuse import ReparamMixin, reparameterize_model

__all__ = ['ReparamError', 'reparameterize_checkpoint', 'deploy_config',
           'has_reparam_layers', 'compare_models']


class ReparamError(RuntimeError):
    """Raised (before anything is written) when a model cannot be deployed safely."""


def _is_reparam_type(type_name: Any) -> bool:
    from mmengine.registry import MODELS
    if not isinstance(type_name, str):
        cls = type_name
    else:
        cls = MODELS.get(type_name)
    if cls is None or not inspect.isclass(cls) or not cls.__module__.startswith('dynconv_mm'):
        return False
    try:
        params = inspect.signature(cls.__init__).parameters
    except (TypeError, ValueError):
        return False
    return issubclass(cls, ReparamMixin) or 'deploy' in params


def deploy_config(cfg: Config) -> Tuple[Config, int]:
    """A copy of ``cfg`` whose re-parameterized layers/backbones are built in deploy form.

    Returns the new config and the number of places set to ``deploy=True``.
    """
    cfg = copy.deepcopy(cfg)
    count = [0]

    def walk(obj):
        if isinstance(obj, dict):
            if 'type' in obj and _is_reparam_type(obj['type']):
                obj['deploy'] = True
                count[0] += 1
                return  # what it builds inside follows from its own deploy flag
            for v in obj.values():
                walk(v)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                walk(v)

    walk(cfg.model)
    return cfg, count[0]


def has_reparam_layers(model: nn.Module) -> bool:
    return any(isinstance(m, ReparamMixin) and not getattr(m, 'deploy', False) for m in model.modules())


def _features(model: nn.Module, x: torch.Tensor):
    if hasattr(model, 'extract_feat'):
        out = model.extract_feat(x)
    else:
        out = model(x)
    if isinstance(out, torch.Tensor):
        return [out]
    flat = []
    for o in out:
        flat.extend(_features_flat(o))
    return flat


def _features_flat(o):
    if isinstance(o, torch.Tensor):
        return [o]
    if isinstance(o, (list, tuple)):
        return [t for i in o for t in _features_flat(i)]
    return []


@torch.no_grad()
def compare_models(reference: nn.Module, candidate: nn.Module, x: torch.Tensor) -> Dict[str, float]:
    """Largest absolute and relative (to the largest reference magnitude) output difference."""
    reference.eval()
    candidate.eval()
    ref = _features(reference, x)
    out = _features(candidate, x)
    if len(ref) != len(out):
        raise ReparamError(f'the deployed model returns {len(out)} outputs, the training one {len(ref)}')
    max_abs, max_rel = 0.0, 0.0
    for a, b in zip(ref, out):
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            return dict(max_abs=float('nan'), max_rel=float('nan'))
        d = (a.double() - b.double()).abs().max().item()
        scale = max(a.abs().max().item(), 1e-12)
        max_abs, max_rel = max(max_abs, d), max(max_rel, d / scale)
    return dict(max_abs=max_abs, max_rel=max_rel)


def _load_state_dict_or_explain(model: nn.Module, checkpoint: str, cfg: Config) -> dict:
    """Load ``checkpoint`` strictly into ``model`` or raise :class:`ReparamError` saying what it is instead;
    returns the checkpoint's ``meta``."""
    from .converters.common import extract_state_dict
    ckpt = torch.load(checkpoint, map_location='cpu')
    sd = extract_state_dict(ckpt)
    meta = ckpt.get('meta') if isinstance(ckpt.get('meta'), dict) else {}
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    if not missing and not unexpected:
        bad = [k for k in sd if tuple(sd[k].shape) != tuple(own[k].shape)]
        if bad:
            raise ReparamError(f'{checkpoint} does not match the config: shape differences at {bad[:5]}')
        model.load_state_dict(sd, strict=True)
        return meta
    deployed_cfg, _ = deploy_config(cfg)
    try:
        deployed_keys = set(build_model(deployed_cfg).state_dict())
    except Exception:  # pragma: no cover - only used to improve the message
        deployed_keys = set()
    if deployed_keys and set(sd) == deployed_keys:
        raise ReparamError(f'{checkpoint} is already a deploy checkpoint (its keys are those of the folded model). '
                           'Test it with the deploy config that tools/reparameterize.py wrote; '
                           'there is nothing to fold.')
    raise ReparamError(
        f'{checkpoint} does not match the config: {len(missing)} model keys missing from it '
        f'(e.g. {missing[:5]}), {len(unexpected)} unexpected keys (e.g. {unexpected[:5]}). '
        'Is this the checkpoint of this config? Official checkpoints must be converted first '
        '(tools/model_converters/<method>_to_mm.py).')


def reparameterize_checkpoint(config: str, checkpoint: str, out_checkpoint: str,
                              out_config: Optional[str] = None, check: bool = True, rtol: float = 1e-4,
                              input_size: Tuple[int, int] = (224, 224), cfg_options: Optional[dict] = None,
                              seed: int = 0) -> Dict[str, Any]:
    """Fold ``checkpoint`` of ``config`` into a deploy checkpoint (see the module docstring).

    Returns a report ``dict(max_abs, max_rel, folded, out_checkpoint, out_config)``. Raises
    :class:`ReparamError` and writes nothing when the model has no re-parameterized layer, the
    checkpoint does not match, or (with ``check``) the folded model disagrees beyond ``rtol``.
    """
    for src, dst, what in ((checkpoint, out_checkpoint, 'checkpoint'), (config, out_config, 'config')):
        if dst is not None and osp.exists(src) and osp.exists(dst) and osp.samefile(src, dst):
            raise ReparamError(f'the output {what} {dst} is the training-time {what}: the folded model cannot be '
                               'unfolded again, so it must not replace it. Choose another output path.')
    cfg = load_config(config, cfg_options)
    model = build_model(cfg)
    if not has_reparam_layers(model):
        raise ReparamError(f'{config} builds a model without re-parameterized layers: nothing to fold.')
    source_meta = _load_state_dict_or_explain(model, checkpoint, cfg)
    model.eval()
    reference = copy.deepcopy(model) if check else None
    reparameterize_model(model)
    folded = sum(1 for m in model.modules() if isinstance(m, ReparamMixin) and getattr(m, 'deploy', False))
    report: Dict[str, Any] = dict(folded=folded, max_abs=None, max_rel=None)
    if check:
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(2, 3, *input_size, generator=g)
        diff = compare_models(reference, model, x)
        report.update(diff)
        if not math.isfinite(diff['max_rel']) or diff['max_rel'] > rtol:
            raise ReparamError(
                f'the folded model disagrees with the training-time model: max abs diff {diff["max_abs"]:.3g}, '
                f'max rel diff {diff["max_rel"]:.3g} > {rtol:g}. The checkpoint may be corrupted or hold a '
                'layer whose fold is not exact; nothing was written (use --no-check to write anyway).')
    dcfg, n_deploy = deploy_config(cfg)
    if out_config is not None:
        # the deployed config must build a model whose keys are exactly those we write
        dmodel = build_model(copy.deepcopy(dcfg))
        own, new = set(model.state_dict()), set(dmodel.state_dict())
        if own != new:
            raise ReparamError('the deploy config does not build the folded model (keys differ: '
                               f'{sorted(own ^ new)[:6]}); nothing was written.')
    meta = dict(reparameterized=True, source_checkpoint=osp.abspath(checkpoint), source_config=osp.abspath(config))
    if source_meta.get('dataset_meta'):
        meta['dataset_meta'] = source_meta['dataset_meta']
    tmp_config = None
    if out_config is not None:   # dumped first: a config that cannot be written stops before any checkpoint
        os.makedirs(osp.dirname(osp.abspath(out_config)), exist_ok=True)
        tmp_config = osp.join(osp.dirname(osp.abspath(out_config)), f'.{osp.basename(out_config)}.{os.getpid()}.tmp.py')
        dcfg.dump(tmp_config)
    try:
        atomic_save({'state_dict': model.state_dict(), 'meta': meta}, out_checkpoint)
        if tmp_config is not None:
            os.replace(tmp_config, out_config)
    finally:
        if tmp_config is not None and osp.exists(tmp_config):
            os.remove(tmp_config)
    report['out_checkpoint'] = out_checkpoint
    if out_config is not None:
        report['out_config'] = out_config
    report['deploy_entries'] = n_deploy
    return report
