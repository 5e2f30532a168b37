"""The one checkpoint-conversion engine: load any checkpoint format, recognise what it holds, apply a
table of key rules, account for every key.

A method's converter is *data*: a list of :class:`Rule` (regular expression -> replacement, or
drop with a reason) plus, where needed, a tensor transform. :func:`apply_rules` applies it and
returns a :class:`ConversionReport` that lists every source key that was mapped, dropped (with
why) or left unplaced; :func:`compare_with` adds the keys a target model misses or does not
expect. Nothing is dropped silently: unplaced keys make :meth:`ConversionReport.check` raise,
naming them.

Before any rule runs, a converter checks that its input is what it converts:
:func:`describe_state_dict` recognises a state dict (which method's layers it holds, official or
dynconv_mm layout, classifier / detector / segmentor, training-time or deployed, or a plain network)
and :func:`require_input` refuses anything else with :class:`WrongInputError`, saying what the file
looks like and which tool fits it. The command-line converters exit with status 2 on it.
"""
from __future__ import annotations

import argparse
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch

StateDict = Dict[str, torch.Tensor]


class ConversionError(ValueError):
    """A checkpoint could not be converted; the message names the offending keys."""


@dataclass
class Rule:
    """Map source keys matching ``pattern`` (``re.fullmatch``).

    ``target`` is a replacement template for ``re.sub`` (``r'backbone.\\1'``), a callable
    ``(match) -> new key``, or ``None`` to drop the key (``reason`` says why; it is reported).
    ``transform`` optionally changes the tensor (``(key, tensor) -> tensor``).
    """
    pattern: str
    target: Union[str, Callable[[re.Match], str], None]
    reason: str = ''
    transform: Optional[Callable[[str, torch.Tensor], torch.Tensor]] = None

    def __post_init__(self):
        self._re = re.compile(self.pattern)


@dataclass
class ConversionReport:
    mapped: Dict[str, str] = field(default_factory=OrderedDict)    # source key -> target key
    dropped: Dict[str, str] = field(default_factory=OrderedDict)   # source key -> reason
    unplaced: List[str] = field(default_factory=list)              # source keys no rule matched
    missing: List[str] = field(default_factory=list)               # target keys with no source
    unexpected: List[str] = field(default_factory=list)            # produced keys the model lacks
    added: Dict[str, str] = field(default_factory=OrderedDict)     # target keys with no source -> value, why

    @property
    def ok(self) -> bool:
        return not (self.unplaced or self.missing or self.unexpected)

    def summary(self) -> str:
        lines = [f'{len(self.mapped)} keys mapped, {len(self.dropped)} dropped on purpose']
        if self.added:
            reasons = sorted(set(self.added.values()))
            lines.append(f'{len(self.added)} keys added: {"; ".join(reasons)}')
        for title, keys in (('source keys no rule places', self.unplaced),
                            ('model keys the checkpoint does not provide', self.missing),
                            ('converted keys the model does not have', self.unexpected)):
            if keys:
                shown = ', '.join(keys[:20]) + (f', ... ({len(keys) - 20} more)' if len(keys) > 20 else '')
                lines.append(f'{len(keys)} {title}: {shown}')
        reasons: Dict[str, int] = {}
        for r in self.dropped.values():
            reasons[r] = reasons.get(r, 0) + 1
        for r, n in reasons.items():
            lines.append(f'dropped {n} key(s): {r}')
        return '\n'.join(lines)

    def check(self, allow_missing: Iterable[str] = ()) -> 'ConversionReport':
        """Raise :class:`ConversionError` unless every key is accounted for.

        ``allow_missing``: regular expressions of model keys that may legitimately be absent from the
        source (for example detector necks that were never in an ImageNet checkpoint).
        """
        pats = [re.compile(p) for p in allow_missing]
        missing = [k for k in self.missing if not any(p.fullmatch(k) for p in pats)]
        if self.unplaced or missing or self.unexpected:
            rep = ConversionReport(self.mapped, self.dropped, self.unplaced, missing, self.unexpected, self.added)
            raise ConversionError('checkpoint conversion is incomplete:\n' + rep.summary())
        return self


def apply_rules(src: StateDict, rules: Sequence[Rule]) -> Tuple[StateDict, ConversionReport]:
    """Apply ``rules`` (first match wins) to every key of ``src``."""
    out: StateDict = OrderedDict()
    report = ConversionReport()
    for key, value in src.items():
        for rule in rules:
            m = rule._re.fullmatch(key)
            if m is None:
                continue
            if rule.target is None:
                report.dropped[key] = rule.reason or 'dropped by rule'
            else:
                new = rule.target(m) if callable(rule.target) else m.expand(rule.target)
                if new in out:
                    raise ConversionError(f'two source keys map to {new!r} (the second is {key!r})')
                out[new] = rule.transform(key, value) if rule.transform else value
                report.mapped[key] = new
            break
        else:
            report.unplaced.append(key)
    return out, report


def compare_with(report: ConversionReport, converted: StateDict, expected: Union[StateDict, Iterable[str]],
                 shapes: bool = True) -> ConversionReport:
    """Fill ``report.missing``/``unexpected`` against the keys (and shapes) a model expects."""
    exp = expected if isinstance(expected, dict) else {k: None for k in expected}
    report.missing = [k for k in exp if k not in converted]
    report.unexpected = [k for k in converted if k not in exp]
    if shapes:
        for k, v in converted.items():
            ref = exp.get(k)
            if ref is not None and hasattr(ref, 'shape') and tuple(ref.shape) != tuple(v.shape):
                raise ConversionError(f'{k}: converted shape {tuple(v.shape)} does not match the model '
                                      f'shape {tuple(ref.shape)}; is this the right architecture/config?')
    return report


# ------------------------------------------------------------------------------------------------
# what a state dict holds, and refusing the wrong input
#: method id -> the name users know it by
METHODS = {
    'kernelwarehouse': 'KernelWarehouse', 'dwnet': 'DWNet', 'pedconv': 'PEDConv', 'orepa': 'OREPA / DBB / RepVGG',
    'doconv': 'DO-Conv', 'odconv': 'ODConv', 'condconv': 'CondConv', 'dyconv': 'DY-Conv',
}

#: official re-parameterized block names of the deployed (folded) form (JUGGHM/OREPA_CVPR2022)
OFFICIAL_DEPLOY_NAMES = ('orepa_reparam', 'or1x1_reparam', 'or_large_reparam', 'rbr_reparam', 'dbb_reparam')

_TOOLS = 'tools/model_converters/'
_STATIC_TOOL = (f'To start a dynamic or re-parameterized model from static weights, use '
                f'{_TOOLS}static_to_dynamic.py SRC CONFIG DST')
_LOAD_DIRECTLY = ('It is already in dynconv_mm / OpenMMLab 2.x layout: load it directly '
                  '(python tools/test.py CONFIG SRC, load_from=SRC, or '
                  "init_cfg=dict(type='Pretrained', checkpoint=SRC))")


def _any(keys: Sequence[str], pattern: str) -> bool:
    r = re.compile(pattern)
    return any(r.search(k) for k in keys)


def _count(keys: Sequence[str], pattern: str) -> int:
    r = re.compile(pattern)
    return sum(1 for k in keys if r.search(k))


def _n(count: int, thing: str) -> str:
    return f'{count} {thing}' + ('' if count == 1 else 's')


@dataclass(frozen=True)
class StateDictKind:
    """What a state dict holds (see :func:`describe_state_dict`).

    ``method``: a key of :data:`METHODS`, or ``None`` for a network without dynamic / re-parameterized
    layers. ``layout``: ``'network'`` (no ``backbone.`` prefix: the official classification code,
    torchvision, timm, single layers), ``'classifier'`` (OpenMMLab ``backbone.*`` + ``head.*``),
    ``'backbone'`` (only ``backbone.*`` keys), ``'detector'`` or ``'segmentor'``. ``arch``: the network
    family when known (``'resnet'``, ``'mobilenetv2'``, ``'convnext'``, ``'dwnet'``, ``'orepa_resnet'``, or
    ``'mmpretrain'`` for the module names of mmpretrain / mmdet backbones). ``official``: ``True`` when the
    keys are those of the method's official code, ``False`` when they are dynconv_mm's own, ``None`` when
    the two are the same. ``deploy``: re-parameterized layers in their folded form. ``description``: one
    phrase for messages (``'an official KernelWarehouse classification checkpoint (...)'``).
    """
    method: Optional[str]
    layout: str
    arch: Optional[str]
    official: Optional[bool]
    deploy: bool
    description: str


def _layout(keys: Sequence[str]) -> str:
    if any(k.startswith(('rpn_head.', 'roi_head.', 'bbox_head.')) for k in keys):
        return 'detector'
    if any(k.startswith(('decode_head.', 'auxiliary_head.')) for k in keys):
        return 'segmentor'
    if any(k.startswith('backbone.') for k in keys):
        return 'classifier' if any(k.startswith('head.') for k in keys) else 'backbone'
    return 'network'


def _arch(body: Sequence[str]) -> Optional[str]:
    """The network family from the body keys (``backbone.`` already removed)."""
    if any(k.startswith('patch_embed.') for k in body) and any(k.startswith('layers.') for k in body):
        return 'dwnet'
    if any(k.startswith('stage0.') for k in body) and any(k.startswith('stage1.') for k in body):
        return 'orepa_resnet'
    if any(re.match(r'stages\.\d+\.\d+\.(?:dwconv|pwconv1)\.', k) for k in body) or \
            any(k.startswith('downsample_layers.') for k in body) and any(k.startswith('stages.') for k in body) \
            and not any('depthwise_conv' in k for k in body):
        return 'convnext'
    if any(re.match(r'features\.\d+\.conv\.', k) for k in body):
        return 'mobilenetv2'
    if any(k.startswith('layer1.') for k in body) and not any(re.match(r'layer\d\.\d+\.conv\.\d+\.conv\.', k)
                                                              for k in body):
        return 'resnet'
    if any(k.startswith(('stem.', 'layer1.', 'stages.', 'downsample_layers.', 'conv1.')) for k in body):
        return 'mmpretrain'
    return None


_ARCH_NAMES = {'resnet': 'ResNet', 'mobilenetv2': 'MobileNetV2', 'convnext': 'ConvNeXt', 'dwnet': 'DWNet',
               'orepa_resnet': 'OREPA-repository ResNet', 'mmpretrain': 'mmpretrain / mmdet module names'}


def _method(keys: Sequence[str], sd: Optional[StateDict]) -> Tuple[Optional[str], Optional[bool], bool, str]:
    """``(method, official, deploy, detail)`` from the keys' signatures."""
    n = _count(keys, r'(?:^|\.)warehouse_manager\.weights\.\d+$')
    if n:
        att = _count(keys, r'\.attention\.fc2\.weight$')
        return 'kernelwarehouse', None, False, f'{_n(n, "warehouse")}, {_n(att, "attention")}'
    if _any(keys, r'(?:^|\.)attn2conv\.'):
        dyn = _any(keys, r'\.attn2conv\.conv\.conv1\.')
        return 'dwnet', None, False, ('dynamic depth-wise kernels' if dyn else 'static depth-wise kernels')
    if _any(keys, r'(?:^|\.)attn\.fc_(?:share|inp|oup|k)\.weight$'):
        return 'pedconv', None, False, _n(_count(keys, r'(?:^|\.)attn\.fc_share\.weight$'), 'PEDConv layer')
    if _any(keys, r'(?:^|\.)attention\.(?:channel|filter|spatial|kernel)_fc\.weight$'):
        return 'odconv', None, False, _n(_count(keys, r'(?:^|\.)attention\.channel_fc\.weight$'), 'ODConv layer')
    branches = r'(?:^|\.)(?:weight_orepa_origin|weight_rbr_origin|vector|dbb_origin\.|rbr_dense\.|rbr_1x1\.)'
    if _any(keys, branches):
        return 'orepa', None, False, 'training-time branches'
    official_deploy = r'(?:^|\.)(?:' + '|'.join(OFFICIAL_DEPLOY_NAMES) + r')\.weight$'
    if _any(keys, official_deploy):
        return 'orepa', True, True, 'each block folded into one convolution'
    if _any(keys, r'(?:^|\.)d_diag$'):
        return 'doconv', True, False, _n(_count(keys, r'(?:^|\.)d_diag$'), 'DO-Conv layer')
    wd = [k[:-1] for k in keys if (k == 'W' or k.endswith('.W')) and (k[:-1] + 'D') in keys]
    if wd:   # the official layer saves d_diag next to D; dynconv_mm derives it
        return 'doconv', False, False, _n(len(wd), 'DO-Conv layer') + ' without d_diag'
    w_only = [k for k in keys if (k == 'W' or k.endswith('.W')) and (sd is None or sd[k].dim() == 3)]
    if w_only:   # 1x1 DO-Conv layers hold W alone, in both implementations
        return 'doconv', None, False, _n(len(w_only), '1x1 DO-Conv layer')
    if _any(keys, r'(?:^|\.)routing_fn\.weight$'):
        return 'condconv', None, False, 'routing functions and expert kernels'
    if sd is not None and any(k.endswith('.attention.fc1.weight') and k[:-len('attention.fc1.weight')] + 'weight' in sd
                              and sd[k[:-len('attention.fc1.weight')] + 'weight'].dim() == 5 for k in keys):
        return 'dyconv', False, False, 'attention over expert kernels'
    if _any(keys, r'(?:^|\.)reparam\.weight$'):
        return None, False, True, 're-parameterized layers folded into plain convolutions (reparam.*)'
    return None, None, False, ''


def describe_state_dict(state_dict: StateDict) -> StateDictKind:
    """Recognise a state dict (a ``module.`` prefix already stripped): the method whose layers it holds
    (by their signature keys: warehouses, dynamic kernel generators, attention heads, re-param branches),
    whether it is the official or the dynconv_mm layout, a classifier, backbone, detector or segmentor,
    training-time or deployed, or a plain network. The one recogniser every converter's input check uses."""
    keys = list(state_dict)
    if not keys:
        return StateDictKind(None, 'network', None, None, False, 'an empty state dict')
    layout = _layout(keys)
    body = [k[len('backbone.'):] for k in keys if k.startswith('backbone.')] if layout != 'network' else keys
    arch = _arch(body)
    method, official, deploy, detail = _method(keys, state_dict)
    if layout == 'classifier' and method is not None:
        official = False   # the official classification code names no backbone.* / head.*
    if layout == 'network' and (method == 'kernelwarehouse' or method == 'orepa' and arch == 'orepa_resnet'):
        official = True      # dynconv_mm's own models of these are always inside an OpenMMLab model
    if layout in ('detector', 'segmentor') and method in ('kernelwarehouse', None):
        if arch in ('mobilenetv2', 'convnext'):
            official = True      # torchvision / ConvNeXt-repository module names in an mmdet 2.x / mmseg 0.x model
        elif arch == 'mmpretrain':
            official = False
    noun = {'classifier': 'classifier', 'backbone': 'backbone', 'detector': 'detector', 'segmentor': 'segmentor',
            'network': 'classification checkpoint' if arch and arch != 'mmpretrain' else 'model'}[layout]
    if method is None:
        if deploy:
            text = f'a deployed dynconv_mm {noun if layout != "network" else "model"} ({detail})'
        elif layout == 'network' and arch is None and not _any(keys, r'(?:^|\.)weight$'):
            text = f'not a network state dict dynconv_mm recognises (first keys: {keys[:5]})'
        elif layout == 'network':
            net = {'resnet': 'ResNet (torchvision / timm keys)', 'mobilenetv2': 'MobileNetV2 (torchvision keys)',
                   'convnext': 'ConvNeXt (ConvNeXt-repository keys)'}.get(arch, _ARCH_NAMES.get(arch, 'network'))
            text = f'a plain (static) {net} with no dynamic or re-parameterized layer'
        else:
            net = f'{_ARCH_NAMES[arch]} ' if arch and arch != 'mmpretrain' else ''
            text = f'a plain (static) {net}{noun} with no dynamic or re-parameterized layer'
    else:
        origin = {True: 'official ', False: 'dynconv_mm ', None: ''}[official] + ('deployed ' if deploy else '')
        phrase = f'{origin}{METHODS[method]} {noun}'
        article = 'an' if phrase[0] in 'aeiouAEIOU' else 'a'
        where = f'{_ARCH_NAMES[arch]}; ' if arch and arch not in (method, 'mmpretrain') else ''
        text = f'{article} {phrase} ({where}{detail})'
    return StateDictKind(method, layout, arch, official, deploy, text)


def suggest_tool(kind: StateDictKind) -> str:
    """Which tool fits a state dict of this kind (a sentence for :class:`WrongInputError` messages)."""
    if kind.method is None:
        if kind.deploy:
            return ('A deploy checkpoint loads into the deploy config that tools/reparameterize.py writes '
                    '(deploy=True on the re-parameterized layers); there is nothing to convert.')
        if kind.description.startswith(('not a network', 'an empty')):
            return 'Check the file: is it a model checkpoint?'
        return _STATIC_TOOL + '.'
    if kind.official is False:
        return _LOAD_DIRECTLY + '.'
    if kind.layout in ('detector', 'segmentor'):
        if kind.method in ('kernelwarehouse', 'dwnet'):
            return f'Convert an official {METHODS[kind.method]} {kind.layout} with {_TOOLS}downstream_to_mm.py.'
        return f'dynconv_mm converts the official {kind.layout}s of KernelWarehouse and DWNet only.'
    tool = {'kernelwarehouse': 'kernelwarehouse_to_mm.py', 'dwnet': 'dwnet_to_mm.py', 'pedconv': 'pedconv_to_mm.py',
            'orepa': 'orepa_to_mm.py', 'doconv': 'doconv_to_mm.py'}.get(kind.method)
    if tool:
        return f'Convert it with {_TOOLS}{tool}.'
    if kind.method == 'odconv':
        return ('Official ODConv layers keep their names in dynconv_mm (ODConv2d): load them directly, or map a '
                'layer with dynconv_mm.converters.pedconv.convert_odconv_layer.')
    if kind.method == 'condconv':
        return ("timm's CondConv layers map with dynconv_mm.converters.pedconv.convert_timm_condconv "
                '(a dynconv_mm CondConv2d model loads directly).')
    return f'There is no converter for {METHODS[kind.method]} checkpoints: a dynconv_mm model of it loads directly.'


class WrongInputError(ConversionError):
    """A converter was given a checkpoint it does not convert (another method, a plain network, a deploy
    checkpoint, an already converted one). The message says what the input looks like and which tool fits."""


def require_input(state_dict: StateDict, accepts: Callable[[StateDictKind], bool], expected: str,
                  hint: str = '') -> StateDictKind:
    """Return the :class:`StateDictKind` of ``state_dict`` if ``accepts`` it, else raise
    :class:`WrongInputError`: ``'<expected> was expected; this looks like <description>. <which tool fits>'``.
    ``hint`` is added to the message (for example an option that makes the converter accept the input)."""
    kind = describe_state_dict(state_dict)
    if accepts(kind):
        return kind
    raise WrongInputError(f'{expected} was expected; this looks like {kind.description}. {suggest_tool(kind)}'
                          + (f' {hint}' if hint else ''))



def check_static_input(state_dict: StateDict) -> StateDictKind:
    """Raise :class:`WrongInputError` unless ``state_dict`` is a plain (static) network: no dynamic or
    re-parameterized layer, not deployed (the input of ``static_to_dynamic``)."""
    return require_input(state_dict, lambda k: k.method is None and not k.deploy
                         and not k.description.startswith(('not a network', 'an empty')),
                         'a static checkpoint (plain convolutions: torchvision / timm / mmpretrain keys)')

# ------------------------------------------------------------------------------------------------
# loading
_SAFE_EXTRA = [argparse.Namespace]


def load_checkpoint_file(path: str, trusted: bool = False, map_location: str = 'cpu') -> dict:
    """Load a checkpoint file of any of the official formats.

    First with ``weights_only=True`` (plus ``argparse.Namespace``, which official KernelWarehouse
    checkpoints store). If that refuses the file, ``trusted=True`` loads it with full unpickling
    (only for files you trust: unpickling can run code); otherwise an error says so.
    """
    from ..layers.torch_internals import weights_only_globals
    from ..utils.checkpoint import mmengine_checkpoint_globals
    try:
        with weights_only_globals(_SAFE_EXTRA + mmengine_checkpoint_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # pickle.UnpicklingError and friends
        if not trusted:
            raise ConversionError(
                f'{path} holds Python objects that a weights-only load refuses ({str(e).splitlines()[0]}). '
                'If you trust the file (for example an official release), load it with trusted=True '
                '(--trusted on the command line).') from e
    return torch.load(path, map_location=map_location, weights_only=False)


def extract_state_dict(ckpt: dict, key: Optional[str] = None,
                       candidates: Sequence[str] = ('state_dict', 'model', 'module')) -> StateDict:
    """The state dict inside a checkpoint: ``ckpt[key]``, else the first of ``candidates`` present,
    else ``ckpt`` itself if it maps names to tensors. A DDP ``module.`` prefix is stripped."""
    if key is not None:
        if key not in ckpt:
            raise ConversionError(f'the checkpoint has no {key!r} entry; it has {sorted(ckpt)}')
        sd = ckpt[key]
    else:
        sd = next((ckpt[c] for c in candidates if isinstance(ckpt.get(c), dict)), ckpt)
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ConversionError('could not find a state dict (a mapping of names to tensors) in the checkpoint; '
                              f'top-level keys: {sorted(ckpt) if isinstance(ckpt, dict) else type(ckpt)}')
    if sd and all(k.startswith('module.') for k in sd):
        sd = OrderedDict((k[len('module.'):], v) for k, v in sd.items())
    return sd


def save_checkpoint_file(state_dict: StateDict, path: str, meta: Optional[dict] = None) -> None:
    """Save as an mmengine-style checkpoint ``{'state_dict': ..., 'meta': ...}`` (weights-only loadable).

    The file is written next to ``path`` and renamed into place, so an interrupted save leaves no partial
    file and a ``path`` that is also the input is replaced only by a complete checkpoint."""
    atomic_save({'state_dict': OrderedDict(state_dict), 'meta': dict(meta or {})}, path)


def atomic_save(obj, path: str) -> None:
    """``torch.save(obj, path)`` through a temporary file in the same folder and an atomic rename."""
    import os
    import tempfile
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix='.' + os.path.basename(path) + '.', suffix='.tmp', dir=folder)
    try:
        with os.fdopen(fd, 'wb') as f:
            torch.save(obj, f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


# --------------------------------------------------------------------------------------------
# dataset_meta: the class names (and palettes) inferencers and visualizers read from a checkpoint
# --------------------------------------------------------------------------------------------
#: dataset name -> (package, dataset class) whose ``METAINFO`` a converted checkpoint carries
DATASETS = {'imagenet': ('mmpretrain.datasets', 'ImageNet'), 'coco': ('mmdet.datasets', 'CocoDataset'),
            'ade20k': ('mmseg.datasets', 'ADE20KDataset')}


def dataset_meta(name: str) -> dict:
    """``meta['dataset_meta']`` for a checkpoint trained on ``name`` (``'imagenet'``: ImageNet-1k,
    ``'coco'``, ``'ade20k'``): the ``METAINFO`` of the installed mmpretrain / mmdet / mmseg dataset class
    (``classes``, and ``palette`` where the class defines one), as mmengine's Runner saves it."""
    import importlib
    if name not in DATASETS:
        raise ValueError(f'unknown dataset {name!r}; expected one of {sorted(DATASETS)}')
    package, cls = DATASETS[name]
    meta = getattr(importlib.import_module(package), cls).METAINFO
    return {k: _plain(v) for k, v in meta.items()}


#: output layers whose rows count the classes: (key pattern, rows per class plus extra rows)
_CLASS_HEADS = ((r'head\.fc\.weight', 0), (r'roi_head\.mask_head(?:\.\d+)?\.conv_logits\.weight', 0),
                (r'roi_head\.bbox_head(?:\.\d+)?\.fc_cls\.weight', 1), (r'decode_head\.conv_seg\.weight', 0))


def converted_dataset_meta(name: str, state_dict: StateDict) -> Optional[dict]:
    """:func:`dataset_meta` of ``name`` if the converted model's classifier has one output per class of it
    (``head.fc``, the mask head's ``conv_logits``, the box head's ``fc_cls`` with its background row,
    ``decode_head.conv_seg``), else ``None`` with a printed note: class names that do not match the outputs
    would label the predictions wrongly. A model without any of these heads gets the names unchecked."""
    meta = dataset_meta(name)
    n = len(meta['classes'])
    for pattern, extra in _CLASS_HEADS:
        for key, value in state_dict.items():
            if re.fullmatch(pattern, key) and value.dim() >= 1 and value.shape[0] != n + extra:
                print(f'note: {key} has {value.shape[0]} outputs, not the {n + extra} of {name}: '
                      'no class names stored in meta.dataset_meta')
                return None
    return meta


def conversion_meta(converted: StateDict, dataset: Optional[str], **fields) -> dict:
    """The ``meta`` a converter saves: ``fields`` plus ``dataset_meta`` of ``dataset`` (``None``: no dataset)
    when it fits the converted heads (:func:`converted_dataset_meta`) and the library that defines the dataset
    imports (otherwise a printed note says why the names are missing)."""
    meta = dict(fields)
    try:
        classes = converted_dataset_meta(dataset, converted) if dataset else None
    except ImportError as e:   # the task library (or one of its dependencies) is not installed
        print(f'note: no class names stored in meta.dataset_meta: {DATASETS[dataset][0]} cannot be imported ({e})')
        classes = None
    if classes:
        meta['dataset_meta'] = classes
    return meta


def _plain(value):
    """Tuples of tuples -> lists of lists (what a weights-only load accepts in every torch version)."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def dataset_meta_from_config(cfg) -> Optional[dict]:
    """``dataset_meta`` of the dataset a config evaluates on (its ``test``/``val``/``train`` dataloader):
    the dataset class's ``METAINFO`` updated by the config's ``metainfo``; ``None`` when the config has
    no dataloader or the dataset type is not registered."""
    import importlib
    scope = cfg.get('default_scope') or 'mmengine'
    for part in ('test_dataloader', 'val_dataloader', 'train_dataloader'):
        ds = (cfg.get(part) or {}).get('dataset')
        while isinstance(ds, dict) and 'type' in ds and 'dataset' in ds and 'metainfo' not in ds:
            ds = ds['dataset']   # RepeatDataset, ClassBalancedDataset, ...
        if not isinstance(ds, dict) or 'type' not in ds:
            continue
        try:
            registry = importlib.import_module(f'{scope}.registry').DATASETS
            cls = registry.get(ds['type']) if isinstance(ds['type'], str) else ds['type']
        except (ImportError, KeyError):
            cls = None
        meta = dict(getattr(cls, 'METAINFO', None) or {})
        meta.update(ds.get('metainfo') or {})
        if meta:
            return {k: _plain(v) for k, v in meta.items()}
    return None


# --------------------------------------------------------------------------------------------
# command-line converters (tools/model_converters/*.py)
# --------------------------------------------------------------------------------------------
DST_HELP = 'output mmengine checkpoint ({"state_dict", "meta"})'
TRUSTED_HELP = 'allow full unpickling of SRC (only for files you trust) if the safe loader refuses it'

#: exit status of a converter that was given a checkpoint it does not convert (``WrongInputError``)
EXIT_WRONG_INPUT = 2


def converter_arg_parser(doc: str, src_help: str) -> argparse.ArgumentParser:
    """The arguments every converter CLI takes: ``SRC DST [--trusted]`` (description: ``doc``'s first
    paragraph)."""
    from dynconv_mm.utils.cli import description
    p = argparse.ArgumentParser(description=description(doc))
    p.add_argument('src', help=src_help)
    p.add_argument('dst', help=DST_HELP)
    p.add_argument('--trusted', action='store_true', help=TRUSTED_HELP)
    return p


def run_conversion(convert: Callable[[], Tuple[StateDict, ConversionReport, dict]], dst: str,
                   errors: Tuple[type, ...] = (ConversionError,),
                   check: Callable[[ConversionReport], None] = ConversionReport.check,
                   src: Optional[str] = None) -> int:
    """The converter CLIs' common course: ``convert()`` returns ``(state dict, report, checkpoint meta)``;
    the report is printed and ``check`` (by default: no key left unplaced) decides whether ``dst`` is
    written. Returns the exit status, with ``error: ...`` on stderr and nothing written when it is not 0:
    :data:`EXIT_WRONG_INPUT` (2) when the input is not what the converter converts
    (:class:`WrongInputError`), 1 when ``convert`` or ``check`` raise another of ``errors``, else 0 after
    saving. ``src`` (the input file) prefixes the message of a refused input."""
    import sys
    try:
        converted, report, meta = convert()
        print(report.summary())
        check(report)
    except WrongInputError as e:
        print(f'error: {src + ": " if src else ""}{e}', file=sys.stderr)
        return EXIT_WRONG_INPUT
    except errors as e:
        print(f'error: {e}', file=sys.stderr)
        return 1
    save_checkpoint_file(converted, dst, meta=meta)
    print(f'saved {len(converted)} tensors to {dst}')
    return 0
