"""Official detection / segmentation checkpoints (mmdet 2.x, mmseg 0.x) -> mmdet 3.x / mmseg 1.x state dicts.

The official dense-prediction code of KernelWarehouse (Mask R-CNN, a fork of mmdet 2.11) and DWNet (Cascade
Mask R-CNN on mmdet 2.11, UperNet on mmseg 0.11) saves whole detectors / segmentors. Their state dicts have
three parts:

========================  ====================================================================================
part                      conversion
========================  ====================================================================================
``backbone.*``            the per-method backbone rules, source keys prefixed with ``backbone.``:
                          ``resnet`` (KW ResNet or plain ResNet: ``warehouse_manager``, ``conv1``, ``bn1``,
                          ``layer*`` unchanged; the unused ImageNet ``fc`` kept by the official detection
                          backbone is dropped), ``mobilenetv2`` (``features.k`` -> ``layer{r}.{j}`` /
                          ``conv1`` / ``conv2`` as in the classification converter; unused ``classifier``
                          dropped), ``convnext`` (``dwconv``/``pwconv1``/``pwconv2`` ->
                          ``depthwise_conv``/``pointwise_conv1``/``pointwise_conv2``, ``gamma (1, C, 1, 1)`` ->
                          ``(C,)``, output LayerNorms ``norm0..3`` unchanged) and ``dwnet`` (body names
                          unchanged, BatchNorm output norms ``norm0..3`` unchanged)
``neck.*``, ``rpn_head.*``  identical in mmdet 2.x and 3.x for FPN, RPNHead, ``Shared2FCBBoxHead`` /
``roi_head.*``            ``ConvFCBBoxHead`` (4conv1fc: ``shared_convs.{k}.{conv,bn}``, ``shared_fcs``),
                          ``FCNMaskHead``, and the per-stage ``roi_head.{bbox,mask}_head.{i}`` of Cascade R-CNN;
                          only these module names are accepted
``decode_head.*``,        identical in mmseg 0.x and 1.x for UPerHead (``psp_modules``, ``bottleneck``,
``auxiliary_head.*``      ``lateral_convs``, ``fpn_convs``, ``fpn_bottleneck``, ``conv_seg``) and FCNHead
                          (``convs``, ``conv_seg``)
========================  ====================================================================================

The input must be a detector (``rpn_head.*`` / ``roi_head.*``) or segmentor (``decode_head.*``) with one of these
backbones in the official layout; anything else (a classification checkpoint, another method, a model already in
mmdet 3.x / dynconv_mm module names) is refused with :class:`~dynconv_mm.converters.common.WrongInputError`, naming
what it looks like and which tool fits. Every key is mapped, dropped with a reason, or reported as unplaced
(:class:`ConversionReport`); with ``model_keys`` the result is also compared with the target model (missing /
unexpected keys, shapes).
"""
from __future__ import annotations

import re
from typing import Iterable, List, Tuple, Union

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
from .dwnet import backbone_rules as dwnet_body_rules
from .kernelwarehouse import add_kw_temperatures, kw_rules

__all__ = ['BACKBONES', 'TASKS', 'downstream_backbone_rules', 'detector_head_rules', 'segmentor_head_rules',
           'downstream_rules', 'detect_downstream_backbone', 'detect_downstream_task', 'check_downstream_input',
           'convert_downstream', 'load_downstream_checkpoint']

BACKBONES = ('resnet', 'mobilenetv2', 'convnext', 'dwnet')
TASKS = ('det', 'seg')

_BN = r'(?:weight|bias|running_mean|running_var|num_batches_tracked)'
_CONV_MODULE = r'(?:conv\.(?:weight|bias)|bn\.' + _BN + ')'   # mmcv ConvModule with an optional BN
_WB = r'(?:weight|bias)'


def _prefixed(rules: Iterable[Rule], prefix: str = 'backbone.') -> List[Rule]:
    """The same rules for source keys that carry ``prefix`` (group numbers are unchanged)."""
    return [Rule(re.escape(prefix) + r.pattern, r.target, r.reason, r.transform) for r in rules]


def _kw_backbone_body(arch: str) -> List[Rule]:
    """The classification rules of :mod:`.kernelwarehouse` that produce backbone keys, minus the classifier's
    final norm (a detection backbone has per-output norms instead)."""
    keep = []
    for r in kw_rules(arch):
        if isinstance(r.target, str) and not r.target.startswith('backbone.'):
            continue   # ImageNet head
        if r.pattern == r'norm\.(weight|bias)':
            continue   # ConvNeXt classifier LayerNorm -> handled by the output-norm rule below
        keep.append(r)
    return keep


def downstream_backbone_rules(backbone: str) -> List[Rule]:
    """Rules for the ``backbone.*`` keys of an official detector / segmentor (see the module docstring)."""
    if backbone == 'resnet':
        return _prefixed(_kw_backbone_body('resnet')) + [
            Rule(r'backbone\.fc\.' + _WB, None,
                 'ImageNet classifier kept (unused) by the official detection backbone'),
        ]
    if backbone == 'mobilenetv2':
        return _prefixed(_kw_backbone_body('mobilenetv2')) + [
            Rule(r'backbone\.classifier\.' + _WB, None,
                 'ImageNet classifier kept (unused) by the official detection backbone'),
        ]
    if backbone == 'convnext':
        return _prefixed(_kw_backbone_body('convnext')) + [
            Rule(r'backbone\.norm([0-3])\.(weight|bias)', r'backbone.norm\1.\2'),
        ]
    if backbone == 'dwnet':
        return _prefixed(dwnet_body_rules('backbone.')) + [
            Rule(r'backbone\.norm([0-9])\.(' + _BN + ')', r'backbone.norm\1.\2'),
        ]
    raise ValueError(f'unknown downstream backbone {backbone!r}; expected one of {BACKBONES}')


def detector_head_rules() -> List[Rule]:
    """mmdet 2.x -> 3.x neck / RPN / RoI-head keys of (Cascade) Mask R-CNN with FPN: the same names."""
    stage = r'(?:\.\d+)?'   # Cascade R-CNN: one head per stage
    bbox = (r'(?:fc_cls|fc_reg)\.' + _WB + r'|(?:shared|cls|reg)_fcs\.\d+\.' + _WB
            + r'|(?:shared|cls|reg)_convs\.\d+\.' + _CONV_MODULE)
    mask = r'convs\.\d+\.' + _CONV_MODULE + r'|(?:upsample|conv_logits)\.' + _WB
    same = r'\1'
    return [
        Rule(r'(neck\.(?:lateral_convs|fpn_convs)\.\d+\.' + _CONV_MODULE + ')', same),
        Rule(r'(rpn_head\.(?:rpn_conv|rpn_cls|rpn_reg)\.' + _WB + ')', same),
        Rule(r'(roi_head\.bbox_head' + stage + r'\.(?:' + bbox + '))', same),
        Rule(r'(roi_head\.mask_head' + stage + r'\.(?:' + mask + '))', same),
    ]


def segmentor_head_rules() -> List[Rule]:
    """mmseg 0.x -> 1.x UPerHead / FCNHead keys: the same names."""
    same = r'\1'
    return [
        Rule(r'(decode_head\.psp_modules\.\d+\.1\.' + _CONV_MODULE + ')', same),
        Rule(r'(decode_head\.(?:bottleneck|fpn_bottleneck)\.' + _CONV_MODULE + ')', same),
        Rule(r'(decode_head\.(?:lateral_convs|fpn_convs)\.\d+\.' + _CONV_MODULE + ')', same),
        Rule(r'(auxiliary_head\.convs\.\d+\.' + _CONV_MODULE + ')', same),
        Rule(r'(auxiliary_head\.conv_cat\.' + _CONV_MODULE + ')', same),
        Rule(r'((?:decode_head|auxiliary_head)\.conv_seg\.' + _WB + ')', same),
    ]


def downstream_rules(backbone: str, task: str) -> List[Rule]:
    """The whole rule table for one backbone and task (``'det'`` or ``'seg'``)."""
    if task not in TASKS:
        raise ValueError(f'unknown task {task!r}; expected one of {TASKS}')
    heads = detector_head_rules() if task == 'det' else segmentor_head_rules()
    return downstream_backbone_rules(backbone) + heads


def detect_downstream_backbone(state_dict: StateDict) -> str:
    """Which official backbone a detector / segmentor state dict holds (from its ``backbone.`` keys)."""
    keys = list(state_dict)
    if any(k.startswith('backbone.patch_embed.') for k in keys):
        return 'dwnet'
    if any(k.startswith('backbone.downsample_layers.') for k in keys):
        return 'convnext'
    if any(k.startswith('backbone.features.') for k in keys):
        return 'mobilenetv2'
    if any(k.startswith('backbone.layer1.') for k in keys):
        return 'resnet'
    raise ConversionError('cannot tell the backbone: no "backbone.patch_embed.", "backbone.downsample_layers.", '
                          f'"backbone.features." or "backbone.layer1." keys; first keys: {keys[:5]}')


def detect_downstream_task(state_dict: StateDict) -> str:
    """``'det'`` (has ``rpn_head.``/``roi_head.`` keys) or ``'seg'`` (has ``decode_head.`` keys)."""
    if any(k.startswith(('roi_head.', 'rpn_head.')) for k in state_dict):
        return 'det'
    if any(k.startswith('decode_head.') for k in state_dict):
        return 'seg'
    raise ConversionError('cannot tell the task: the state dict has neither "roi_head."/"rpn_head." (detector) nor '
                          f'"decode_head." (segmentor) keys; first keys: {list(state_dict)[:5]}')


def check_downstream_input(state_dict: StateDict) -> StateDictKind:
    """Raise :class:`~dynconv_mm.converters.common.WrongInputError` unless ``state_dict`` is an official detector
    or segmentor with a KernelWarehouse / DWNet (or plain ResNet / MobileNetV2 / ConvNeXt) backbone."""
    return require_input(
        state_dict, lambda k: k.layout in ('detector', 'segmentor') and k.arch in BACKBONES
        and k.method in (None, 'kernelwarehouse', 'dwnet') and not k.deploy and k.official is not False,
        'an official KernelWarehouse / DWNet detector (mmdet 2.x: backbone.*, rpn_head.*, roi_head.*) or '
        'segmentor (mmseg 0.x: backbone.*, decode_head.*)')


def convert_downstream(state_dict: StateDict, backbone: str = 'auto', task: str = 'auto',
                       model_keys: Union[StateDict, Iterable[str], None] = None
                       ) -> Tuple[StateDict, ConversionReport]:
    """Convert an official mmdet 2.x detector / mmseg 0.x segmentor state dict to mmdet 3.x / mmseg 1.x keys.

    Args:
        state_dict: the official checkpoint's ``state_dict``.
        backbone: one of :data:`BACKBONES` or ``'auto'`` (detected from the keys).
        task: ``'det'``, ``'seg'`` or ``'auto'``.
        model_keys: optionally the target model's ``state_dict()`` (or its keys), to report missing and
            unexpected keys and check shapes.

    Raises :class:`~dynconv_mm.converters.common.WrongInputError` when the state dict is not such a detector
    or segmentor (see :func:`check_downstream_input`). Returns ``(converted, report)``; ``report.check()``
    raises, naming the keys, unless every key is accounted for.
    """
    if backbone != 'auto' and backbone not in BACKBONES:
        raise ValueError(f'unknown downstream backbone {backbone!r}; expected one of {BACKBONES}')
    if task != 'auto' and task not in TASKS:
        raise ValueError(f'unknown task {task!r}; expected one of {TASKS}')
    check_downstream_input(state_dict)
    if backbone == 'auto':
        backbone = detect_downstream_backbone(state_dict)
    if task == 'auto':
        task = detect_downstream_task(state_dict)
    converted, report = apply_rules(state_dict, downstream_rules(backbone, task))
    add_kw_temperatures(converted, report)
    if model_keys is not None:
        compare_with(report, converted, model_keys)
    return converted, report


def load_downstream_checkpoint(path: str, trusted: bool = False) -> StateDict:
    """The state dict of an official mmdet 2.x / mmseg 0.x checkpoint (``{'meta', 'state_dict'[, 'optimizer']}``).

    ``trusted=True`` falls back to full unpickling when the file holds objects the weights-only loader refuses
    (only for files you trust).
    """
    ckpt = load_checkpoint_file(path, trusted=trusted)
    if not isinstance(ckpt, dict):
        raise ConversionError(f'{path}: expected a dict checkpoint, got {type(ckpt).__name__}')
    if 'state_dict' not in ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        return extract_state_dict(ckpt)
    return extract_state_dict(ckpt, 'state_dict' if 'state_dict' in ckpt else None)

