"""Official DWNet checkpoints -> dynconv_mm state dicts.

The official classification code (``Atten4Vis/DemystifyLocalViT``, ``models/dwnet.py``) trains with the
Swin Transformer recipe and saves ``{'model', 'optimizer', 'lr_scheduler', 'max_accuracy', 'epoch',
'config'[, 'amp']}`` (``config`` is a yacs ``CfgNode``, so such files need ``trusted=True``); released
files may hold only ``{'model': ...}`` or a bare state dict. Our :class:`~dynconv_mm.backbones.DWNet`
keeps the official module names, so the classifier conversion is a prefix plus two renames:

=====================================  =========================================================
official                               mmpretrain ``ImageClassifier`` (DWNet + GAP + LinearClsHead)
=====================================  =========================================================
``patch_embed.{proj,norm}.*``          ``backbone.patch_embed.{proj,norm}.*``
``layers.{i}.blocks.{j}.*``            ``backbone.layers.{i}.blocks.{j}.*`` (static, dynamic
                                       ``attn2conv.conv.{conv1,bn,conv2,bias}`` and inhomogeneous
                                       ``attn2conv.conv.{conv1.0,conv1.1,conv2.0}`` alike)
``layers.{i}.downsample.*``            ``backbone.layers.{i}.downsample.*``
``norm.*`` (final LayerNorm)           ``backbone.norm{last}.*`` (``norm3`` for four stages)
``head.*``                             ``head.fc.*``
=====================================  =========================================================

``target='dense_backbone'`` converts the same ImageNet checkpoint for a ``mode='dense'`` backbone of a
detector or segmentor: the body as above, ``norm.*`` and ``head.*`` dropped (the dense backbone's output
norms ``norm0..3`` are BatchNorms trained in the downstream task, as in the official detection code,
which loads the classifier with ``strict=False``). Load the result with
``init_cfg=dict(type='Pretrained', checkpoint=..., prefix='backbone.')``.

The input must be an official DWNet classifier (its depth-wise blocks ``layers.{i}.blocks.{j}.attn2conv.*``,
static or dynamic, at the top level); anything else is refused with
:class:`~dynconv_mm.converters.common.WrongInputError`, naming what it looks like (a plain network, another
method, an official DWNet detector or segmentor, an already converted checkpoint).

The tables are built by functions of the target prefixes (:func:`backbone_rules`), so the official
dense-prediction checkpoints (the same body names, output norms ``norm0..3``, detector/segmentor heads)
can be added as further tables over the same body rules.
"""
from __future__ import annotations

import re
from typing import Iterable, List, Optional, Tuple, Union

from .common import (
    ConversionError,
    ConversionReport,
    Rule,
    StateDict,
    StateDictKind,
    apply_rules,
    compare_with,
    extract_state_dict,
    load_checkpoint_file,
    require_input,
)

__all__ = ['TARGETS', 'backbone_rules', 'classifier_rules', 'dense_backbone_rules', 'infer_num_stages',
           'check_dwnet_input', 'convert_dwnet', 'load_dwnet_checkpoint']

TARGETS = ('classifier', 'dense_backbone')

_BN = r'(?:weight|bias|running_mean|running_var|num_batches_tracked)'
_BLOCK = (
    r'attn2conv\.(?:conv0\.weight|conv2\.weight|(?:bn0|bn|bn2)\.' + _BN
    + r'|conv\.(?:weight|bias|conv1\.weight|bn\.' + _BN + r'|conv2\.(?:weight|bias)'
    + r'|conv1\.0\.(?:weight|bias)|conv1\.1\.' + _BN + r'|conv2\.0\.(?:weight|bias)))'
    + r'|mlp\.fc[12]\.(?:weight|bias)|bn\.' + _BN)


def backbone_rules(prefix: str = 'backbone.') -> List[Rule]:
    """Rules for the network body (patch embedding, stages), shared by every official DWNet model.

    Only the parameter and buffer names the official modules have are accepted, so a checkpoint of
    another architecture leaves its keys unplaced instead of being renamed blindly.
    """
    return [
        Rule(r'(patch_embed\.(?:proj|norm)\.(?:weight|bias))', prefix + r'\1'),
        Rule(r'(layers\.\d+\.blocks\.\d+\.(?:' + _BLOCK + r'))', prefix + r'\1'),
        Rule(r'(layers\.\d+\.downsample\.(?:norm\.(?:weight|bias)|reduction\.weight))', prefix + r'\1'),
    ]


def classifier_rules(num_stages: int = 4, backbone_prefix: str = 'backbone.', head_prefix: str = 'head.fc.'
                     ) -> List[Rule]:
    """The official classifier: body, final LayerNorm -> ``norm{num_stages - 1}``, ``head`` -> ``head.fc``."""
    return backbone_rules(backbone_prefix) + [
        Rule(r'norm\.(weight|bias)', f'{backbone_prefix}norm{num_stages - 1}.' + r'\1'),
        Rule(r'head\.(weight|bias)', head_prefix + r'\1'),
    ]


def dense_backbone_rules(prefix: str = 'backbone.') -> List[Rule]:
    """The official classifier for a ``mode='dense'`` backbone: body only; final norm and head dropped."""
    return backbone_rules(prefix) + [
        Rule(r'norm\.(?:weight|bias)', None,
             'classifier LayerNorm: the dense backbone has BatchNorm output norms trained downstream'),
        Rule(r'head\.(?:weight|bias)', None, 'ImageNet classification head: not part of a dense backbone'),
    ]


def infer_num_stages(state_dict: StateDict) -> int:
    """Number of stages of an official DWNet state dict (from its ``layers.{i}`` keys)."""
    stages = {int(m[1]) for k in state_dict if (m := re.match(r'layers\.(\d+)\.', k))}
    if not stages:
        raise ConversionError('not an official DWNet state dict: it has no "layers.{i}." keys; '
                              f'first keys: {list(state_dict)[:5]}')
    return max(stages) + 1


def check_dwnet_input(state_dict: StateDict) -> StateDictKind:
    """Raise :class:`~dynconv_mm.converters.common.WrongInputError` unless ``state_dict`` is an official DWNet
    classification model (depth-wise blocks ``layers.{i}.blocks.{j}.attn2conv.*`` at the top level)."""
    return require_input(state_dict, lambda k: k.method == 'dwnet' and k.layout == 'network',
                         'an official DWNet classification checkpoint (layers.{i}.blocks.{j}.attn2conv.* keys)')


def convert_dwnet(state_dict: StateDict, num_stages: Optional[int] = None,
                  model_keys: Union[StateDict, Iterable[str], None] = None,
                  target: str = 'classifier') -> Tuple[StateDict, ConversionReport]:
    r"""Convert an official DWNet classification state dict.

    Args:
        state_dict: the official model's state dict (``checkpoint['model']``).
        num_stages: stages of the model (default: read from the keys).
        model_keys: optionally the target model's ``state_dict()`` (or its keys), to report missing and
            unexpected keys and check shapes.
        target: ``'classifier'`` (mmpretrain ``ImageClassifier`` keys) or ``'dense_backbone'``
            (``backbone.*`` body keys for a detector/segmentor; see the module docstring).

    Raises :class:`~dynconv_mm.converters.common.WrongInputError` for a state dict of anything else (see
    :func:`check_dwnet_input`). Returns ``(converted, report)``; call ``report.check()`` to raise on anything
    unaccounted for (for ``'dense_backbone'`` against a detector,
    ``report.check(allow_missing=[r'backbone\.norm\d+\..*', ...])``).
    """
    if target not in TARGETS:
        raise ValueError(f'convert_dwnet: target must be one of {TARGETS}, got {target!r}')
    check_dwnet_input(state_dict)
    if num_stages is None:
        num_stages = infer_num_stages(state_dict)
    rules = classifier_rules(num_stages) if target == 'classifier' else dense_backbone_rules()
    converted, report = apply_rules(state_dict, rules)
    if model_keys is not None:
        compare_with(report, converted, model_keys)
    return converted, report


def load_dwnet_checkpoint(path: str, trusted: bool = False) -> StateDict:
    """The model state dict of an official DWNet checkpoint file (``{'model': ...}`` or bare).

    Files that also hold the training ``config`` (a yacs ``CfgNode``) are refused by the safe loader;
    ``trusted=True`` falls back to full unpickling (only for files you trust).
    """
    ckpt = load_checkpoint_file(path, trusted=trusted)
    if not isinstance(ckpt, dict):
        raise ConversionError(f'{path}: expected a dict checkpoint, got {type(ckpt).__name__}')
    return extract_state_dict(ckpt, 'model' if 'model' in ckpt else None)
