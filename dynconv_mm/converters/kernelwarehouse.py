"""Official KernelWarehouse checkpoints -> mmpretrain ``ImageClassifier`` state dicts.

The official classification models (``OSVAI/KernelWarehouse``, ``models/kw_*.py``) save
``{'model', 'optimizer', 'epoch', 'scaler', 'args'[, 'model_ema']}``; the model's state dict starts with
the warehouses ``warehouse_manager.weights.<i>`` (numbered in the order warehouses are first
reserved, which our backbones reproduce) followed by the network. Converted keys:

=====================  ===========================================================================
architecture           official -> ours
=====================  ===========================================================================
``resnet``             ``warehouse_manager.*``, ``conv1``, ``bn1``, ``layer*`` -> ``backbone.`` + same;
                       ``fc`` -> ``head.fc`` (KWResNet + GlobalAveragePooling + LinearClsHead)
``mobilenetv2``        ``features.0.{0,1}`` -> ``backbone.conv1.{conv,bn}``; ``features.k`` ->
                       ``backbone.layer{r}.{j}`` (inverted residual ``conv.a.{0,1}`` -> ``conv.a.{conv,bn}``,
                       projection ``conv.L`` / ``conv.L+1`` -> ``conv.L.conv`` / ``conv.L.bn``);
                       ``features.18`` -> ``backbone.conv2``; ``classifier`` -> ``head.fc``
``mobilenetv2_kw1d2x``  as ``mobilenetv2``, and the classifier ``classifier.1.conv.*`` -> ``head.fc.conv.*``
                       with its warehouse (the last) -> ``head.warehouse_manager.weights.0``
                       (KWLinearClsHead)
``convnext``           ``downsample_layers``, ``stages`` -> ``backbone.`` (block ``dwconv`` /
                       ``pwconv1`` / ``pwconv2`` -> ``depthwise_conv`` / ``pointwise_conv1`` /
                       ``pointwise_conv2``, ``gamma (1, C, 1, 1)`` -> ``(C,)``); final ``norm`` ->
                       ``backbone.norm3``; ``head`` -> ``head.fc`` (no neck)
=====================  ===========================================================================

The input must hold warehouses (``warehouse_manager.weights.<i>``) and their attentions at the top level;
anything else (a plain network, another method, an official detector, an already converted checkpoint) is
refused with :class:`~dynconv_mm.converters.common.WrongInputError`, naming what it looks like. The plain
baselines of the official repository (ResNet-50, MobileNetV2, ConvNeXt-T trained with the KernelWarehouse
recipe: no warehouses) convert with ``baseline=True``, which requires the opposite: no dynamic layer at all.

Every key is mapped or reported (:class:`ConversionReport`); with ``model_keys`` given the result is
also checked against the model (missing / unexpected keys, shapes).
"""
from __future__ import annotations

import re
from typing import Iterable, List, Optional, Tuple, Union

import torch

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

__all__ = ['ARCHITECTURES', 'kw_rules', 'detect_kw_architecture', 'check_kernelwarehouse_input',
           'convert_kernelwarehouse', 'load_kernelwarehouse_checkpoint']

ARCHITECTURES = ('resnet', 'mobilenetv2', 'mobilenetv2_kw1d2x', 'convnext')

_BUFFERS = r'(weight|bias|running_mean|running_var|num_batches_tracked)'
_WAREHOUSE = Rule(r'warehouse_manager\.weights\.(\d+)', r'backbone.warehouse_manager.weights.\1')

# MobileNetV2: (expand ratio, blocks) per row; feature index k = 1 + running block count
_MBV2_ROWS = ((1, 1), (6, 2), (6, 3), (6, 4), (6, 3), (6, 3), (6, 1))


def _resnet_rules() -> List[Rule]:
    return [
        _WAREHOUSE,
        Rule(r'((?:conv1|bn1|layer[1-4])\..+)', r'backbone.\1'),
        Rule(r'fc\.(weight|bias)', r'head.fc.\1'),
    ]


def _mobilenetv2_rules(kw1d2x: bool) -> List[Rule]:
    rules = []
    if kw1d2x:
        # the classifier's warehouse is the last one; its index depends on nothing else in the model
        rules.append(Rule(r'warehouse_manager\.weights\.9', 'head.warehouse_manager.weights.0'))
        rules.append(Rule(r'classifier\.1\.conv\.(.+)', r'head.fc.conv.\1'))
    rules += [
        _WAREHOUSE,
        Rule(r'features\.0\.0\.(.+)', r'backbone.conv1.conv.\1'),
        Rule(r'features\.0\.1\.' + _BUFFERS, r'backbone.conv1.bn.\1'),
    ]
    k = 1
    for row, (t, n) in enumerate(_MBV2_ROWS):
        proj = 1 if t == 1 else 2   # position of the projection conv in the official block
        for j in range(n):
            src, dst = rf'features\.{k}\.conv\.', f'backbone.layer{row + 1}.{j}.conv.'
            for a in range(proj):   # ConvBNReLU entries: (conv, bn) sub-sequences
                rules.append(Rule(src + rf'{a}\.0\.(.+)', dst + rf'{a}.conv.\1'))
                rules.append(Rule(src + rf'{a}\.1\.' + _BUFFERS, dst + rf'{a}.bn.\1'))
            rules.append(Rule(src + rf'{proj + 1}\.' + _BUFFERS, dst + rf'{proj}.bn.\1'))
            rules.append(Rule(src + rf'{proj}\.(\D.*)', dst + rf'{proj}.conv.\1'))
            k += 1
    rules += [
        Rule(rf'features\.{k}\.0\.(.+)', r'backbone.conv2.conv.\1'),
        Rule(rf'features\.{k}\.1\.' + _BUFFERS, r'backbone.conv2.bn.\1'),
    ]
    if not kw1d2x:
        rules.append(Rule(r'classifier\.(weight|bias)', r'head.fc.\1'))
    return rules


def _convnext_rules() -> List[Rule]:
    block = {'dwconv': 'depthwise_conv', 'pwconv1': 'pointwise_conv1', 'pwconv2': 'pointwise_conv2'}
    return [
        _WAREHOUSE,
        Rule(r'(downsample_layers\.\d+\.\d+\..+)', r'backbone.\1'),
        Rule(r'stages\.(\d+)\.(\d+)\.gamma', r'backbone.stages.\1.\2.gamma',
             transform=lambda key, v: v.reshape(-1)),
        Rule(r'stages\.(\d+)\.(\d+)\.(dwconv|pwconv1|pwconv2)\.(.+)',
             lambda m: f'backbone.stages.{m[1]}.{m[2]}.{block[m[3]]}.{m[4]}'),
        Rule(r'stages\.(\d+)\.(\d+)\.norm\.(weight|bias)', r'backbone.stages.\1.\2.norm.\3'),
        Rule(r'norm\.(weight|bias)', r'backbone.norm3.\1'),
        Rule(r'head\.(weight|bias)', r'head.fc.\1'),
    ]


def kw_rules(arch: str) -> List[Rule]:
    """The key-rule table for one official architecture (see the module docstring)."""
    if arch == 'resnet':
        return _resnet_rules()
    if arch in ('mobilenetv2', 'mobilenetv2_kw1d2x'):
        return _mobilenetv2_rules(arch == 'mobilenetv2_kw1d2x')
    if arch == 'convnext':
        return _convnext_rules()
    raise ValueError(f'unknown KernelWarehouse architecture {arch!r}; expected one of {ARCHITECTURES}')


def detect_kw_architecture(state_dict: StateDict) -> str:
    """Which official model a state dict comes from (by its top-level module names)."""
    if any(k.startswith('downsample_layers.') for k in state_dict):
        return 'convnext'
    if any(k.startswith('features.') for k in state_dict):
        return 'mobilenetv2_kw1d2x' if any(k.startswith('classifier.1.conv.') for k in state_dict) else 'mobilenetv2'
    if any(k.startswith('layer1.') for k in state_dict):
        return 'resnet'
    raise ConversionError('not an official KernelWarehouse classification state dict (no "layer1.", "features." '
                          f'or "downsample_layers." keys); first keys: {list(state_dict)[:5]}')


_BASELINE_ARCHS = ('resnet', 'mobilenetv2', 'convnext')


def check_kernelwarehouse_input(state_dict: StateDict, baseline: bool = False) -> StateDictKind:
    """Raise :class:`~dynconv_mm.converters.common.WrongInputError` unless ``state_dict`` is an official
    KernelWarehouse classification model (warehouses and attentions, the official module names) or, with
    ``baseline``, one of the official plain baselines (no dynamic layer, ResNet / MobileNetV2 / ConvNeXt)."""
    if baseline:
        return require_input(
            state_dict, lambda k: k.method is None and not k.deploy and k.layout == 'network'
            and k.arch in _BASELINE_ARCHS,
            'a plain baseline of the official KernelWarehouse repository (a ResNet, MobileNetV2 or ConvNeXt '
            'without warehouses; --baseline)')
    return require_input(
        state_dict, lambda k: k.method == 'kernelwarehouse' and k.layout == 'network',
        'an official KernelWarehouse classification checkpoint (warehouse_manager.weights.* and the layers\' '
        'attention keys)',
        hint='(An official plain baseline of the KernelWarehouse repository converts with --baseline, '
             'convert_kernelwarehouse(..., baseline=True).)')


#: the temperature official KernelWarehouse checkpoints are evaluated at (the end of the schedule)
KW_EVAL_TEMPERATURE = 0.0


def add_kw_temperatures(converted: StateDict, report: ConversionReport) -> None:
    """Give every KW attention of ``converted`` the temperature official checkpoints are evaluated at: the
    official code does not save it, dynconv_mm's state dicts carry it (``<layer>.attention.temperature``)."""
    for key in list(converted):
        stem = key[:-len('fc1.weight')]  # '<layer>.attention.'
        if key.endswith('.attention.fc1.weight') and any(k.startswith(stem + 'norm1.') for k in converted):
            target = stem + 'temperature'
            if target not in converted:
                converted[target] = torch.tensor(KW_EVAL_TEMPERATURE)
                report.added[target] = (f'the KW temperature official checkpoints are evaluated at '
                                        f'({KW_EVAL_TEMPERATURE:g})')


def convert_kernelwarehouse(state_dict: StateDict, arch: str = 'auto',
                            model_keys: Union[StateDict, Iterable[str], None] = None,
                            baseline: bool = False) -> Tuple[StateDict, ConversionReport]:
    """Convert an official KernelWarehouse model state dict to mmpretrain ``ImageClassifier`` keys.

    Args:
        state_dict: the official model's state dict (``checkpoint['model']`` or ``['model_ema']``).
        arch: one of :data:`ARCHITECTURES`, or ``'auto'`` to detect it.
        model_keys: optionally the target model's ``state_dict()`` (or its keys), to report missing and
            unexpected keys and check shapes.
        baseline: the input is one of the official plain baselines (no warehouses) instead of a
            KernelWarehouse model; it then converts to mmpretrain's plain ResNet / MobileNetV2 / ConvNeXt keys.

    Raises :class:`~dynconv_mm.converters.common.WrongInputError` when the input is not what ``baseline``
    says (see :func:`check_kernelwarehouse_input`). Returns ``(converted, report)``; call ``report.check()``
    to raise on anything unaccounted for.
    """
    check_kernelwarehouse_input(state_dict, baseline)
    if arch == 'auto':
        arch = detect_kw_architecture(state_dict)
    if arch == 'mobilenetv2_kw1d2x':
        n = sum(1 for k in state_dict if re.fullmatch(r'warehouse_manager\.weights\.\d+', k))
        if n != 10:
            raise ConversionError(f'a KW-MobileNetV2 1/2x state dict has 10 warehouses (the last is the '
                                  f'classifier\'s); this one has {n}')
    converted, report = apply_rules(state_dict, kw_rules(arch))
    add_kw_temperatures(converted, report)
    if model_keys is not None:
        compare_with(report, converted, model_keys)
    return converted, report


def load_kernelwarehouse_checkpoint(path: str, key: Optional[str] = 'model', trusted: bool = False) -> StateDict:
    """The model state dict of an official checkpoint file.

    ``key``: ``'model'`` or ``'model_ema'`` (ConvNeXt runs kept an EMA copy), or ``None`` to take the
    first state dict found. Official files hold an ``argparse.Namespace`` (allowed by the safe loader);
    ``trusted=True`` falls back to full unpickling for files with other objects.
    """
    ckpt = load_checkpoint_file(path, trusted=trusted)
    if isinstance(ckpt, dict) and key is not None and key not in ckpt and all(
            isinstance(v, torch.Tensor) for v in ckpt.values()):
        return extract_state_dict(ckpt)   # a bare state dict
    return extract_state_dict(ckpt, key)

