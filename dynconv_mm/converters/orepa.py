"""Official OREPA / DBB / RepVGG checkpoints (JUGGHM/OREPA_CVPR2022) -> dynconv_mm key names.

Two levels, both pure ``state_dict -> (state_dict, report)`` functions built from rule tables:

* :func:`convert_orepa_block`: the keys of official blocks (``OREPA``, ``OREPA_1x1``,
  ``OREPA_LargeConv``, ``RepVGGBlock_OREPA``, ``RepVGGBlock``, ``DBB``, ``ConvBN``) anywhere in a
  model, kept at their position (for models built from the layers directly);
* :func:`convert_orepa_resnet`: the official OREPA ResNet (``stage0.conv1``, ``stageN.j.*``, ``linear``)
  -> an mmpretrain ``ImageClassifier`` with :class:`~dynconv_mm.backbones.OREPAResNet`
  (``backbone.stem``, ``backbone.layerN.j.*``, ``head.fc``).

Both accept training-time and deploy (after the official ``convert.py``) checkpoints; which one is
detected from the keys (:func:`is_deploy_state_dict`). Derived constants the official blocks save
(``id_tensor``, ``weight_orepa_avg_avg``, ``weight_orepa_prior``) are dropped with a reason: the
layers recompute them (the prior of kernels other than 3x3 is uninitialised memory in official
checkpoints). Both first check that the input holds OREPA-family blocks (training-time branches
``weight_orepa_origin`` / ``vector`` / ``dbb_origin`` / ``rbr_dense``, or the official deploy names
``orepa_reparam`` ...) and refuse anything else (a plain network, another method, a dynconv_mm deploy
checkpoint) with :class:`~dynconv_mm.converters.common.WrongInputError`. No finiteness check is made:
the never-used row of ``RepVGGBlock_OREPA``'s ``vector`` (official shape ``(6, C)`` when the identity
branch exists) may be NaN; it is cut to the 5 used rows.
"""
from __future__ import annotations

import re
from typing import Callable, Iterable, List, Optional, Tuple

import torch

from .common import (
    OFFICIAL_DEPLOY_NAMES,
    ConversionReport,
    Rule,
    StateDict,
    StateDictKind,
    apply_rules,
    require_input,
)

__all__ = ['check_orepa_input', 'convert_orepa_block', 'convert_orepa_resnet', 'is_deploy_state_dict',
           'orepa_block_rules', 'orepa_resnet_rules']

_DERIVED = r'(?:id_tensor|weight_(?:orepa|rbr)_avg_avg|weight_(?:orepa|rbr)_prior)'
_DERIVED_REASON = 'constant derived from the layer shape (identity / 1/k^2 / frequency prior); the layer recomputes it'


def is_deploy_state_dict(state_dict: StateDict) -> bool:
    """True if the state dict comes from a deployed (re-parameterized) official model."""
    return any(any(f'{n}.' in k for n in OFFICIAL_DEPLOY_NAMES) for k in state_dict) and \
        not any(k.endswith('.vector') or '.bn.' in k or k.startswith('bn.') for k in state_dict)


def _cut_vector(key: str, value: torch.Tensor) -> torch.Tensor:
    return value[:5] if value.shape[0] == 6 else value


def _suffix_rules(deploy: bool) -> List[Tuple[str, str, Optional[str], Optional[Callable]]]:
    """``(suffix pattern, suffix template, drop reason, transform)``, first match wins."""
    rules: List[Tuple[str, str, Optional[str], Optional[Callable]]] = [
        (r'(?:.*\.)?' + _DERIVED, '', _DERIVED_REASON, None),
        (r'(?P<m>(?:.*\.)?)(?:' + '|'.join(OFFICIAL_DEPLOY_NAMES) + r')\.(?P<t>weight|bias)', r'\g<m>reparam.\g<t>',
         None, None),
        # OREPA_LargeConv's 3x3 kernel generators weight{i} -> kernels.{i}
        (r'(?P<m>(?:.*\.)?)weight(?P<i>\d+)\.(?P<t>weight_orepa_\w+|vector)', r'\g<m>kernels.\g<i>.\g<t>', None, None),
        # RepVGGBlock_OREPA's OREPA branch: weight_rbr_* -> weight_orepa_*, vector cut to the used rows
        (r'(?P<m>(?:.*\.)?rbr_dense\.)vector', r'\g<m>vector', None, _cut_vector),
        (r'(?P<m>(?:.*\.)?)weight_rbr_(?P<t>\w+)', r'\g<m>weight_orepa_\g<t>', None, None),
    ]
    if deploy:   # a deployed official ConvBN keeps the name ``conv`` (now with a bias)
        rules.append((r'(?P<m>(?:.*\.)?)conv\.(?P<t>weight|bias)', r'\g<m>reparam.\g<t>', None, None))
    rules.append((r'(?P<t>.*)', r'\g<t>', None, None))
    return rules


def _build(prefixes: Iterable[Tuple[str, str]], deploy: bool, unmatched_reason: Optional[str] = None) -> List[Rule]:
    """Cross ``prefixes`` (source regex -> target template) with the suffix rules."""
    rules: List[Rule] = []
    for src_p, dst_p in prefixes:
        for suf, template, reason, transform in _suffix_rules(deploy):
            pattern = f'(?P<pre>{src_p})' + suf

            def target(m: re.Match, dst_p=dst_p, template=template, src_p=src_p) -> str:
                pre = re.fullmatch(src_p, m.group('pre')).expand(dst_p)
                return pre + m.expand(template)

            rules.append(Rule(pattern, None if reason else target, reason or '', transform))
    return rules


def orepa_block_rules(deploy: bool = False) -> List[Rule]:
    """Rules for official block keys at any position (the module path is kept)."""
    return _build([('', '')], deploy)


def orepa_resnet_rules(deploy: bool = False) -> List[Rule]:
    """Rules for the official OREPA/DBB ResNet (``models/resnet.py``) -> mmpretrain ImageClassifier keys."""
    prefixes = [
        (r'stage0\.conv1\.', r'backbone.stem.'),
        (r'stage(\d)\.(\d+)\.shortcut\.', r'backbone.layer\1.\2.downsample.'),
        (r'stage(\d)\.(\d+)\.(conv\d)\.', r'backbone.layer\1.\2.\3.'),
        (r'linear\.', r'head.fc.'),
    ]
    return _build(prefixes, deploy)


def check_orepa_input(state_dict: StateDict, layout: str = 'blocks') -> StateDictKind:
    """Raise :class:`~dynconv_mm.converters.common.WrongInputError` unless ``state_dict`` holds official
    OREPA / DBB / RepVGG blocks (training-time or deployed); with ``layout='resnet'``, in the official
    ResNet (``stage0.conv1``, ``stageN.j.*``)."""
    if layout == 'resnet':
        return require_input(state_dict, lambda k: k.method == 'orepa' and k.arch == 'orepa_resnet'
                             and k.layout == 'network',
                             'an official OREPA / DBB / RepVGG ResNet checkpoint (stage0.conv1.*, stageN.j.* with '
                             're-parameterized blocks)')
    return require_input(state_dict, lambda k: k.method == 'orepa',
                         'official OREPA / DBB / RepVGG blocks (weight_orepa_origin / vector / dbb_origin / '
                         'rbr_dense keys, or the deploy names ' + ' / '.join(OFFICIAL_DEPLOY_NAMES) + ')')


def convert_orepa_block(state_dict: StateDict, deploy: Optional[bool] = None) -> Tuple[StateDict, ConversionReport]:
    """Official block keys -> dynconv_mm keys at the same module path (``deploy=None``: detect)."""
    check_orepa_input(state_dict, 'blocks')
    if deploy is None:
        deploy = is_deploy_state_dict(state_dict)
    return apply_rules(state_dict, orepa_block_rules(deploy))


def convert_orepa_resnet(state_dict: StateDict, deploy: Optional[bool] = None) -> Tuple[StateDict, ConversionReport]:
    """Official OREPA ResNet state dict (``module.`` stripped) -> ``ImageClassifier(OREPAResNet)`` keys.

    Keys outside the ResNet layout are left unplaced (the report names them).
    """
    check_orepa_input(state_dict, 'resnet')
    if deploy is None:
        deploy = is_deploy_state_dict(state_dict)
    return apply_rules(state_dict, orepa_resnet_rules(deploy))
