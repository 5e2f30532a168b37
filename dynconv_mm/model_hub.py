"""mmpretrain's model hub knows dynconv_mm's classification models.

``import dynconv_mm`` registers every image-classification model of our metafiles (those that
``model-index.yml`` imports) in :class:`mmpretrain.apis.ModelHub`, so that::

    import dynconv_mm, mmpretrain
    mmpretrain.list_models('kw*')                                  # our names, next to mmpretrain's
    model = mmpretrain.get_model('kw1x-resnet18_3rdparty_8xb128-accum4_in1k')   # built from our config
    model = mmpretrain.get_model('kw1x-resnet18_3rdparty_8xb128-accum4_in1k', pretrained='CONVERTED.pth')

The official weights are not redistributed and never downloaded: ``pretrained=True`` raises
:class:`ConvertedWeightsRequired`, which names the official checkpoint's link and the converter that
turns it into a checkpoint to pass as ``pretrained=PATH``. (mmpretrain itself would warn and return a
randomly initialised model for a name without weights.)

Detection and segmentation entries of the metafiles are not registered: mmpretrain cannot build them.
Nothing here imports mmpretrain unless it is installed (see :mod:`dynconv_mm.registry`).
"""
from __future__ import annotations

import os.path as osp
import warnings
from typing import Dict, List, Optional, Tuple

import yaml

from .registry import available_scopes
from .utils.model_zoo import CONVERTERS

__all__ = ['ConvertedWeightsRequired', 'model_index_root', 'classification_models', 'register_model_hub',
           'registered_model_names', 'CLASSIFICATION_TASK']

CLASSIFICATION_TASK = 'Image Classification'

_REGISTERED: Dict[str, str] = {}   # lower-case model name -> absolute config path


class ConvertedWeightsRequired(ValueError):
    """``get_model(name, pretrained=True)`` for a dynconv_mm model: the weights must be converted first."""


def model_index_root() -> Optional[str]:
    """The folder holding ``model-index.yml`` and ``configs/``: ``dynconv_mm/.mim`` of an installed
    package, else the source checkout around the package; ``None`` when neither has it."""
    pkg = osp.dirname(osp.abspath(__file__))
    for root in (osp.join(pkg, '.mim'), osp.dirname(pkg)):
        if osp.isfile(osp.join(root, 'model-index.yml')):
            return root
    return None


def _tasks(model: dict) -> List[str]:
    return [r.get('Task') for r in model.get('Results') or [] if isinstance(r, dict)]


def _is_classification(model: dict) -> bool:
    tasks = _tasks(model)
    return bool(tasks) and all(t == CLASSIFICATION_TASK for t in tasks)


def _load_yaml(path: str):
    loader = getattr(yaml, 'CSafeLoader', yaml.SafeLoader)
    with open(path) as f:
        return yaml.load(f, Loader=loader) or {}


def classification_models(root: str) -> List[Tuple[str, dict]]:
    """``(metafile, entry)`` for every model of the metafiles imported by ``<root>/model-index.yml``
    whose models are all image classifiers.

    A metafile that mixes classification with other tasks is an error (mmpretrain's hub would offer
    detectors and segmentors it cannot build): keep those in a ``metafile_det_seg.yml``.
    """
    found = []
    for rel in _load_yaml(osp.join(root, 'model-index.yml')).get('Import', []):
        path = osp.join(root, rel)
        models = _load_yaml(path).get('Models') or []
        flags = [_is_classification(m) for m in models]
        if models and all(flags):
            found.extend((path, m) for m in models)
        elif any(flags):
            mixed = [m.get('Name') for m, c in zip(models, flags) if not c]
            raise ValueError(f'{rel} mixes image-classification models with others ({mixed}): move those to a '
                             'separate metafile so that mmpretrain\'s model hub gets classifiers only')
    return found


def _convert_hint(name: str, data: dict, config: str) -> str:
    converted_from = data.get('Converted From') or {}
    tool = CONVERTERS.get(data.get('In Collection', ''))
    if not converted_from.get('Weights') or tool is None:
        return (f'{name} has no official checkpoint to convert. Train it (python tools/train.py {config}) and pass '
                f"your checkpoint: get_model({name!r}, pretrained='CHECKPOINT.pth').")
    code = f" (official code: {converted_from['Code']})" if converted_from.get('Code') else ''
    return (f'dynconv_mm does not redistribute or download the official weights of {name}: convert them first.\n'
            f"  1. download the official checkpoint: {converted_from['Weights']}{code}\n"
            f'  2. convert it:  python {tool} OFFICIAL.pth CONVERTED.pth   '
            '(add --trusted for an official pickle you trust)\n'
            f"  3. load it:     get_model({name!r}, pretrained='CONVERTED.pth')")


def _model_class():
    from modelindex.models.Model import Model

    class ConvertFirstModel(Model):
        """A model-index entry whose ``weights`` (read by ``get_model(name, pretrained=True)``) explain
        how to convert the official checkpoint instead of naming a download."""

        convert_hint = ''

        @property
        def weights(self):
            raise ConvertedWeightsRequired(self.convert_hint)

    return ConvertFirstModel


def register_model_hub(root: Optional[str] = None) -> List[str]:
    """Register our classification models in mmpretrain's ``ModelHub`` (idempotent).

    Returns the registered (lower-case) names; ``[]`` when mmpretrain (or the ``model-index`` package
    its hub is built on) is not installed, or no ``model-index.yml`` is found.
    """
    if _REGISTERED:
        return sorted(_REGISTERED)
    root = root or model_index_root()
    if root is None or 'mmpretrain' not in available_scopes():
        return []
    try:
        from mmpretrain.apis import ModelHub
        cls = _model_class()
    except Exception:  # e.g. mmpretrain without openmim's model-index package: no hub to fill
        return []

    entries = []
    for path, raw in classification_models(root):
        entry = cls.from_dict(dict(raw, Config=osp.abspath(osp.join(root, raw['Config']))), path)
        entry.convert_hint = _convert_hint(raw['Name'], raw, raw['Config'])
        entries.append(entry)
    # mmpretrain registers its own models lazily and refuses a name that is taken by then; a name
    # another package registered first is left to it, saying so
    for entry in entries:
        key = entry.name.lower()
        existing = ModelHub._models_dict.get(key)
        if existing is not None:
            warnings.warn(f'dynconv_mm: model name {entry.name!r} ({entry.filepath}) is already in mmpretrain\'s '
                          f'model hub (from {existing.filepath}); keeping that one')
            continue
        ModelHub._models_dict[key] = entry
        _REGISTERED[key] = entry.config
    return sorted(_REGISTERED)


def registered_model_names() -> List[str]:
    """The names :func:`register_model_hub` put into mmpretrain's hub (empty before it ran)."""
    return sorted(_REGISTERED)
