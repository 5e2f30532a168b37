"""Official PEDConv checkpoints -> dynconv_mm / mmpretrain keys, and the layer-level key maps of
the other dynamic convolutions (ODConv, timm's CondConv).

PEDConv (zejiangh/PEDConv, ``image_classification/resnet.py``): checkpoints are
``{'epoch', 'arch', 'state_dict', 'best_prec1', 'optimizer'}`` with a DDP ``module.`` prefix (or a
bare state dict). The ResNet's module tree is mmpretrain's ``ResNet`` one (``conv1``, ``bn1``,
``layerX.Y.{conv,bn}Z``, ``layerX.Y.downsample.{0,1}``) and each ``Variational_DYConv2d`` maps onto
:class:`~dynconv_mm.layers.PEDConv2d` unchanged (``weight``, ``attn.fc_share/fc_inp/fc_oup/fc_k``,
``attn.decoder.{0,2}``), so the rules only add the ``backbone.`` / ``head.`` prefixes of an
``ImageClassifier`` (``fc`` -> ``head.fc``). The decoder weights are kept: they are training state
(the info-max loss needs them to resume or fine-tune), unused at inference.

Each function first checks that its input holds the layers it converts (PEDConv attentions
``attn.fc_share/fc_inp/fc_oup/fc_k``; ODConv attention heads; CondConv routing functions) and refuses
anything else with :class:`~dynconv_mm.converters.common.WrongInputError`, naming what it looks like.

Usage::

    sd = extract_state_dict(load_checkpoint_file(path, trusted=True))
    new, report = convert_pedconv_resnet(sd)
    report.check()
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .common import (
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

__all__ = ['PEDCONV_TARGETS', 'load_pedconv_checkpoint', 'pedconv_resnet_rules', 'check_pedconv_input',
           'convert_pedconv_resnet',
           'convert_pedconv_layer', 'convert_odconv_layer', 'convert_timm_condconv']

_RESNET50D_STEM = r'(conv2|conv3|bn2|bn3)\..*'

#: conversion targets: an mmpretrain ImageClassifier, or the backbone of a detector/segmentor
PEDCONV_TARGETS = ('classifier', 'dense_backbone')


def load_pedconv_checkpoint(path: str, trusted: bool = False) -> StateDict:
    """The state dict of an official PEDConv checkpoint file (``module.`` stripped)."""
    return extract_state_dict(load_checkpoint_file(path, trusted=trusted))


def pedconv_resnet_rules(backbone_prefix: str = 'backbone.', head: bool = True) -> List[Rule]:
    """Key rules from an official PEDConv ResNet to dynconv_mm ``PEDResNet`` in a model.

    Args:
        backbone_prefix: prefix of the backbone in the target model (``'backbone.'`` for mmpretrain,
            mmdet and mmseg models; ``''`` for a bare backbone).
        head: map ``fc`` to mmpretrain's ``head.fc`` (``LinearClsHead``); ``False`` drops it with a
            reason (detection/segmentation backbones have no classifier).
    """
    p = backbone_prefix.replace('\\', '\\\\')
    rules = [
        Rule(_RESNET50D_STEM, None, 'deep-stem (resnet50d) tensors: PEDResNet has the 7x7 stem only; '
             'this rule never drops silently, see convert_pedconv_resnet'),
        Rule(r'(conv1|bn1)\.(.*)', p + r'\1.\2'),
        Rule(r'(layer\d+\.\d+\.(?:conv\d|bn\d)\..*)', p + r'\1'),
        Rule(r'(layer\d+\.\d+\.downsample\.\d+\..*)', p + r'\1'),
    ]
    if head:
        rules.append(Rule(r'fc\.(weight|bias)', r'head.fc.\1'))
    else:
        rules.append(Rule(r'fc\.(weight|bias)', None, 'ImageNet classifier: not part of a backbone'))
    return rules


def check_pedconv_input(state_dict: StateDict) -> StateDictKind:
    """Raise :class:`~dynconv_mm.converters.common.WrongInputError` unless ``state_dict`` is an official PEDConv
    ResNet (``Variational_DYConv2d`` attentions ``*.attn.fc_share`` ... at the top level, ``module.`` stripped)."""
    return require_input(state_dict, lambda k: k.method == 'pedconv' and k.layout == 'network',
                         'an official PEDConv ResNet checkpoint (attn.fc_share / fc_inp / fc_oup / fc_k keys)')


def convert_pedconv_resnet(state_dict: StateDict,
                           backbone_prefix: str = 'backbone.',
                           head: bool = True,
                           expected: Optional[Dict[str, torch.Tensor]] = None) -> Tuple[StateDict, ConversionReport]:
    """Convert an official PEDConv ResNet state dict (``module.`` already stripped, see
    :func:`~dynconv_mm.converters.common.extract_state_dict`).

    ``expected``: the target model's ``state_dict()`` (keys and shapes are then checked and reported as
    missing/unexpected). Deep-stem ``resnet50d`` checkpoints are refused (``ConversionError`` from
    :meth:`ConversionReport.check`), since ``PEDResNet`` builds the 7x7 stem. Anything but a PEDConv ResNet
    raises :class:`~dynconv_mm.converters.common.WrongInputError` (see :func:`check_pedconv_input`).
    """
    check_pedconv_input(state_dict)
    rules = pedconv_resnet_rules(backbone_prefix, head)
    out, report = apply_rules(state_dict, rules)
    deep = [k for k, why in report.dropped.items() if why.startswith('deep-stem')]
    for k in deep:  # not a legitimate drop: surface as unplaced so check() fails naming them
        del report.dropped[k]
        report.unplaced.append(k)
    if expected is not None:
        compare_with(report, out, expected)
    return out, report


# ------------------------------------------------------------------------------------------------
# layer-level maps (official single-layer weights -> one dynconv_mm layer)
def convert_pedconv_layer(state_dict: StateDict, prefix: str = '') -> Tuple[StateDict, ConversionReport]:
    """Official ``Variational_DYConv2d`` -> :class:`~dynconv_mm.layers.PEDConv2d` (same names)."""
    require_input(state_dict, lambda k: k.method == 'pedconv',
                  'a PEDConv layer (attn.fc_share / fc_inp / fc_oup / fc_k)')
    p = prefix.replace('.', r'\.')
    return apply_rules(state_dict, [Rule(p + r'(weight|attn\.(?:fc_share|fc_inp|fc_oup|fc_k|decoder\.[02])\.'
                                         r'(?:weight|bias))', r'\1')])


def convert_odconv_layer(state_dict: StateDict, prefix: str = '') -> Tuple[StateDict, ConversionReport]:
    """Official ODConv ``ODConv2d`` -> :class:`~dynconv_mm.layers.ODConv2d` (same names; the attention
    BatchNorm is ``SafeBatchNorm2d`` with ``nn.BatchNorm2d``'s keys)."""
    require_input(state_dict, lambda k: k.method == 'odconv',
                  'an ODConv layer (attention.channel_fc / filter_fc / spatial_fc / kernel_fc)')
    p = prefix.replace('.', r'\.')
    return apply_rules(state_dict, [
        Rule(p + r'weight', 'weight'),
        Rule(p + r'attention\.(fc\.weight|bn\.(?:weight|bias|running_mean|running_var|num_batches_tracked))',
             r'attention.\1'),
        Rule(p + r'attention\.((?:channel|filter|spatial|kernel)_fc\.(?:weight|bias))', r'attention.\1'),
    ])


def convert_timm_condconv(state_dict: StateDict,
                          weight_shape: Sequence[int],
                          conv_prefix: str = 'conv.',
                          routing_prefix: str = 'routing_fn.') -> Tuple[StateDict, ConversionReport]:
    """timm ``CondConv2d`` (+ the block's ``routing_fn`` Linear) -> :class:`~dynconv_mm.layers.CondConv2d`.

    timm stores the experts flattened, ``weight (E, C_out*C_in/g*k_h*k_w)``; ``weight_shape`` is one
    expert's kernel shape ``(C_out, C_in/g, k_h, k_w)`` (``CondConv2d.weight.shape[1:]``).
    """
    require_input(state_dict, lambda k: k.method == 'condconv', "a timm CondConv layer with its routing_fn")
    shape = tuple(int(s) for s in weight_shape)

    def unflatten(key: str, t: torch.Tensor) -> torch.Tensor:
        if t.dim() != 2 or t.shape[1] != int(torch.tensor(shape).prod()):
            raise ValueError(f'{key}: expected (num_experts, {"*".join(map(str, shape))}) expert weights, '
                             f'got {tuple(t.shape)}')
        return t.reshape(t.shape[0], *shape)

    c, r = (s.replace('.', r'\.') for s in (conv_prefix, routing_prefix))
    rules = [
        Rule(c + 'weight', 'weight', transform=unflatten),
        Rule(c + 'bias', 'bias'),
        Rule(r + r'(weight|bias)', r'routing_fn.\1'),
    ]
    return apply_rules(OrderedDict(state_dict), rules)
