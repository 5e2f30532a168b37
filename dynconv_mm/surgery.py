"""``dynamize``: make any PyTorch model dynamic or re-parameterized, keeping its pretrained weights.

::

    import dynconv_mm
    model, report = dynconv_mm.dynamize(torchvision.models.resnet50(weights=...), 'ODConv2d')
    print(report.summary())

Every convolution the rules select is replaced by a layer of the chosen registered type, built with
the convolution's geometry and initialised from its kernel by the layer itself (``init_from_static``
of the layer protocol, :mod:`dynconv_mm.layers.base`): wherever the method allows, the model computes
the same function as before (the report says, per layer, whether it does and measures it). Every
other module and weight is kept. KernelWarehouse layers get their warehouses as through ``conv_cfg``
(:func:`~dynconv_mm.layers.kernel_warehouse.allocate_warehouses`: layers of one stage share one).

Rules (the first rule that selects a convolution wins):

* a registered type name: ``'ODConv2d'`` converts every convolution that type takes;
* a dict ``dict(type='ODConv2d', kind='kxk', include='layer3.*', exclude=('*.downsample.*',),
  options=dict(num_experts=4))``:

  - ``kind``: ``'kxk'`` (kernels larger than 1, not depth-wise), ``'pointwise'`` (1x1, not
    depth-wise), ``'depthwise'`` (``groups == C_in == C_out > 1``), ``'linear'`` (``nn.Linear``),
    ``'conv'`` (every convolution, the default) or a sequence of them;
  - ``include`` / ``exclude``: module-path patterns (``fnmatch``; a convolution reached by several
    paths counts as matching if any path matches);
  - ``options``: keyword arguments of the layer type (through ``conv_cfg``);

* a sequence of such rules.

What real models contain is handled: biases, groups, dilation, strides, ``padding='same'`` and
TF-style "same" padding (timm's ``Conv2dSame``, mmcv's ``Conv2dAdaptivePadding``: the new layer pads
its input the same way), 1-D / 3-D convolutions for types that take them, convolutions followed by
norms (kept as they are), and modules shared between paths (one new layer, shared the same way).
A convolution a type cannot take is left as it is, with the reason in the report.
"""
from __future__ import annotations

import fnmatch
import math
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from .layers.base import ConvSpec, LayerProtocol, StaticInit

__all__ = ['dynamize', 'DynamizeReport', 'LayerChange', 'KINDS']

KINDS = ('conv', 'kxk', 'pointwise', 'depthwise', 'linear')
Rules = Union[str, Dict[str, Any], Sequence[Union[str, Dict[str, Any]]]]
_RULE_KEYS = ('type', 'kind', 'include', 'exclude', 'options')
#: convolution subclasses whose forward is the plain convolution (wrappers that only handle empty inputs)
_PLAIN_WRAPPERS = ('mmcv.cnn.bricks.wrappers',)
#: convolution classes that pad their input TF-style ("same", computed from the input size)
_TF_SAME = ('Conv2dSame', 'Conv2dAdaptivePadding')


@dataclass
class LayerChange:
    """What ``dynamize`` did at one convolution."""
    paths: List[str]
    old_type: str
    new_type: str
    exact: bool
    note: str
    #: largest output difference of the new layer against the old one on the same input, relative to
    #: the old output's largest magnitude (eval mode; at the temperature where the layer is exact, if any)
    max_rel_diff: Optional[float] = None
    params_before: int = 0
    params_after: int = 0


@dataclass
class DynamizeReport:
    """Per replaced layer what it became and whether it computes the same function; every parameter
    of the input model accounted for."""
    changes: List[LayerChange] = field(default_factory=list)
    #: convolution path -> why it was left as it is (selected by a rule, but the type cannot take it)
    skipped: Dict[str, str] = field(default_factory=OrderedDict)
    #: parameter name of the input model -> where it is now (``model key`` or ``'-> <layer>'``)
    parameters: Dict[str, str] = field(default_factory=OrderedDict)
    #: parameters of the input model that are nowhere (must stay empty)
    lost: List[str] = field(default_factory=list)
    #: whole-model relative output difference on ``example_input`` (``None`` without one)
    model_max_rel_diff: Optional[float] = None

    @property
    def exact(self) -> bool:
        return all(c.exact for c in self.changes)

    def summary(self) -> str:
        lines = [f'{len(self.changes)} layers replaced, {sum(not c.exact for c in self.changes)} not exactly '
                 f'equivalent, {len(self.skipped)} selected convolutions kept, {len(self.parameters)} parameters '
                 f'accounted for, {len(self.lost)} lost']
        for c in self.changes:
            diff = '' if c.max_rel_diff is None else f' (max rel diff {c.max_rel_diff:.2e})'
            lines.append(f'  {c.paths[0]}: {c.old_type} -> {c.new_type}: {c.note}{diff}')
        for path, why in self.skipped.items():
            lines.append(f'  {path}: kept ({why})')
        if self.model_max_rel_diff is not None:
            lines.append(f'model output: max rel diff {self.model_max_rel_diff:.2e}')
        return '\n'.join(lines)


# ------------------------------------------------------------------------------------------------
# rules
def _normalize_rules(rules: Rules) -> List[Dict[str, Any]]:
    from mmengine.registry import MODELS

    from .registry import registered_names
    if isinstance(rules, (str, dict)):
        rules = [rules]
    if not isinstance(rules, (list, tuple)) or not rules:
        raise ValueError(f'dynamize: rules must be a layer type name, a rule dict or a sequence of them, got {rules!r}')
    known = registered_names('conv')
    out = []
    for rule in rules:
        rule = dict(type=rule) if isinstance(rule, str) else dict(rule)
        unknown = sorted(set(rule) - set(_RULE_KEYS))
        if unknown:
            raise ValueError(f'dynamize: unknown rule key(s) {unknown}; a rule takes {list(_RULE_KEYS)}')
        name = rule.get('type')
        if name not in known:
            raise ValueError(f'dynamize: unknown layer type {name!r}; registered types: {known}')
        kinds = rule.get('kind', 'conv')
        kinds = (kinds,) if isinstance(kinds, str) else tuple(kinds)
        bad = [k for k in kinds if k not in KINDS]
        if bad:
            raise ValueError(f'dynamize: unknown kind(s) {bad}; kinds are {list(KINDS)}')
        if 'kind' not in rule and 0 in MODELS.get(name).spatial_dims:
            kinds = ('linear',)
        pats = {}
        for key in ('include', 'exclude'):
            v = rule.get(key, ())
            v = (v,) if isinstance(v, str) else tuple(v)
            if not all(isinstance(p, str) and p for p in v):
                raise ValueError(f'dynamize: {key} must be a module-path pattern or a sequence of them, got {v!r}')
            pats[key] = v
        options = dict(rule.get('options') or {})
        out.append(dict(type=name, cls=MODELS.get(name), kinds=kinds, include=pats['include'],
                        exclude=pats['exclude'], options=options))
    return out


def _kind(spec: ConvSpec) -> str:
    if spec.dims == 0:
        return 'linear'
    if spec.depthwise:
        return 'depthwise'
    return 'pointwise' if all(k == 1 for k in spec.kernel_size) else 'kxk'


def _selects(rule: Dict[str, Any], spec: ConvSpec, paths: List[str]) -> bool:
    kind = _kind(spec)
    if not (kind in rule['kinds'] or ('conv' in rule['kinds'] and kind != 'linear')):
        return False
    if rule['include'] and not any(fnmatch.fnmatchcase(p, pat) for p in paths for pat in rule['include']):
        return False
    return not any(fnmatch.fnmatchcase(p, pat) for p in paths for pat in rule['exclude'])


# ------------------------------------------------------------------------------------------------
# padding
class TFSamePadding:
    """A forward pre-hook padding a layer's input TF-style ("same": ``ceil(size / stride)`` outputs, the
    odd pixel on the bottom/right), computed from the input size, as timm's ``Conv2dSame`` does. The
    layer itself then pads nothing. A plain callable object, so that models stay copyable and picklable."""

    def __init__(self, kernel_size: Sequence[int], stride: Sequence[int], dilation: Sequence[int]) -> None:
        self.kernel_size, self.stride, self.dilation = tuple(kernel_size), tuple(stride), tuple(dilation)

    def __call__(self, module: nn.Module, args):
        x = args[0]
        pads: List[int] = []
        for i, size in reversed(list(enumerate(x.shape[2:]))):
            k, s, d = self.kernel_size[i], self.stride[i], self.dilation[i]
            total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
            pads += [total // 2, total - total // 2]
        return (F.pad(x, pads),) + tuple(args[1:]) if any(pads) else None


class StaticPadding:
    """A forward pre-hook padding a layer's input by fixed, possibly uneven amounts (``padding='same'``
    with an even kernel), the layer padding nothing."""

    def __init__(self, pads: Sequence[int]) -> None:
        self.pads = list(pads)

    def __call__(self, module: nn.Module, args):
        return (F.pad(args[0], self.pads),) + tuple(args[1:])


def _spec_of(module: nn.Module) -> Tuple[Optional[ConvSpec], Optional[Any], Optional[str]]:
    """``(spec, padding hook or None, reason it cannot be converted or None)`` of a module, ``(None, None,
    None)`` for modules that are no convolution or linear layer."""
    if isinstance(module, LayerProtocol):
        return None, None, None
    if type(module) is nn.Linear:
        return ConvSpec.of(module), None, None
    if not isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return None, None, None
    cls = type(module)
    plain = cls in (nn.Conv1d, nn.Conv2d, nn.Conv3d) or cls.__module__.startswith(_PLAIN_WRAPPERS)
    tf_same = cls.__name__ in _TF_SAME
    if not (plain or tf_same):
        return None, None, f'{cls.__module__}.{cls.__name__} has a forward of its own'
    d = len(module.kernel_size)
    k, s, dil = tuple(module.kernel_size), tuple(module.stride), tuple(module.dilation)
    hook = None
    if tf_same:
        padding = (0,) * d
        hook = TFSamePadding(k, s, dil)
    elif isinstance(module.padding, str):
        if module.padding == 'valid':
            padding = (0,) * d
        else:  # 'same' (stride 1): even total paddings are split evenly, odd ones put the extra at the end
            totals = [di * (ki - 1) for ki, di in zip(k, dil)]
            if all(t % 2 == 0 for t in totals):
                padding = tuple(t // 2 for t in totals)
            else:
                padding = (0,) * d
                pads: List[int] = []
                for t in reversed(totals):
                    pads += [t // 2, t - t // 2]
                hook = StaticPadding(pads)
    else:
        padding = tuple(module.padding)
    if module.padding_mode != 'zeros' and hook is not None:
        return None, None, f'padding_mode={module.padding_mode!r} with uneven "same" padding'
    spec = ConvSpec(module.in_channels, module.out_channels, k, s, padding, dil, module.groups,
                    module.bias is not None, d, module.padding_mode)
    return spec, hook, None


# ------------------------------------------------------------------------------------------------
def _build(rule: Dict[str, Any], spec: ConvSpec) -> nn.Module:
    from mmcv.cnn import build_conv_layer
    from mmengine.registry import MODELS
    if spec.dims == 0:
        return MODELS.build(dict(type=rule['type'], in_features=spec.in_channels, out_features=spec.out_channels,
                                 bias=spec.bias, **rule['options']))
    extra = {} if spec.padding_mode == 'zeros' else dict(padding_mode=spec.padding_mode)
    return build_conv_layer(dict(type=rule['type'], **rule['options'], **extra), spec.in_channels,
                            spec.out_channels, spec.kernel, **spec.conv_kwargs())


def _set_module(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, name = path.rpartition('.')
    parent = model.get_submodule(parent_path) if parent_path else model
    if isinstance(parent, (nn.Sequential, nn.ModuleList)) and name.isdigit():
        parent[int(name)] = new
    else:
        setattr(parent, name, new)


def _rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-12))


def _first(out):
    while isinstance(out, (tuple, list)):
        out = out[-1]
    if isinstance(out, dict):
        out = next(iter(out.values()))
    return out


def _replace_and_initialise(model, plan, built, report, options, seen, check) -> None:
    from .layers.kernel_warehouse import allocate_warehouses
    from .layers.temperature import TemperatureMixin
    for old, mpaths, spec, hook, rule in plan:
        new = _build(rule, spec)
        if hook is not None:
            new.register_forward_pre_hook(hook)
        ref = old.weight
        new.to(device=ref.device, dtype=ref.dtype)
        for p in mpaths:
            _set_module(model, p, new)
        built.append((old, mpaths, new, rule, spec))
    allocate_warehouses(model)  # KernelWarehouse layers: warehouses by module path, as through conv_cfg

    for old, mpaths, new, rule, spec in built:
        rec: StaticInit = new.init_from_static(old.weight.detach(), None if old.bias is None else old.bias.detach(),
                                               **options)
        change = LayerChange(mpaths, type(old).__name__, rule['type'], rec.exact, rec.note,
                             params_before=sum(p.numel() for p in old.parameters()),
                             params_after=sum(p.numel() for p in new.parameters()))
        if check:
            x = seen.get(id(old))
            if x is None:
                x = _probe_input(spec, old.weight)
            new.eval()
            temps = [m for m in new.modules() if isinstance(m, TemperatureMixin)]
            saved = [float(m.temperature) for m in temps]
            if rec.temperature is not None:
                for m in temps:
                    m.temperature.fill_(rec.temperature)
            change.max_rel_diff = _rel_diff(_first(new(x)), old.eval()(x))
            for m, t in zip(temps, saved):
                m.temperature.fill_(t)
        report.changes.append(change)


@torch.no_grad()
def dynamize(model: nn.Module, rules: Rules, example_input: Optional[torch.Tensor] = None, check: bool = True,
             expert_noise: float = 0.01, kw_attention: str = 'prior', kw_prior_logit: float = 1.0,
             seed: int = 0) -> Tuple[nn.Module, DynamizeReport]:
    """Replace the convolutions of ``model`` that ``rules`` select, in place (see the module docstring).

    Args:
        model: any ``nn.Module``.
        rules: a layer type name, a rule dict or a sequence of them.
        example_input: an input of ``model``; with it the whole model's output is compared before and
            after (``report.model_max_rel_diff``), and each layer is checked on the input it really sees.
        check: compare every new layer with the convolution it replaces (on its real input with
            ``example_input``, else on a random input), in eval mode.
        expert_noise, kw_attention, kw_prior_logit, seed: options of the static initialisations
            (:func:`dynconv_mm.converters.static.convert_static_to_dynamic`).

    Returns:
        ``(model, report)``: the model, converted in place, and a :class:`DynamizeReport`.
    """
    from .converters.static import check_static_init_options

    parsed = _normalize_rules(rules)
    options = dict(expert_noise=expert_noise, kw_attention=kw_attention, kw_prior_logit=kw_prior_logit,
                   generator=torch.Generator().manual_seed(seed))
    check_static_init_options(options)
    report = DynamizeReport()
    was_training = model.training
    original_params = OrderedDict(model.named_parameters(remove_duplicate=False))
    ref_out = None
    if example_input is not None:
        model.eval()
        ref_out = _first(model(example_input))

    # 1. what to replace: every module path (shared modules: every path of one object)
    paths: Dict[int, List[str]] = OrderedDict()
    modules: Dict[int, nn.Module] = {}
    for path, m in model.named_modules(remove_duplicate=False):
        if path:
            paths.setdefault(id(m), []).append(path)
            modules[id(m)] = m
    inside = [p for key, ps in paths.items() if isinstance(modules[key], LayerProtocol) for p in ps]
    plan = []
    for key, mpaths in paths.items():
        old = modules[key]
        if any(p.startswith(q + '.') for p in mpaths for q in inside):
            continue  # the attention of a layer that is dynamic already
        spec, hook, reason = _spec_of(old)
        if spec is None:
            continue
        rule = next((r for r in parsed if _selects(r, spec, mpaths)), None)
        if rule is None:
            continue
        if reason is None:
            reason = rule['cls'].accepts(spec)
        if reason is None and not rule['cls'].supports_static_init():
            reason = f"{rule['type']} cannot start from a static kernel"
        if reason is not None:
            report.skipped[mpaths[0]] = reason
            continue
        plan.append((old, mpaths, spec, hook, rule))

    # 2. inputs each replaced convolution really sees (for the check)
    seen: Dict[int, torch.Tensor] = {}
    if check and example_input is not None and plan:
        def keep(m, args, out):
            seen.setdefault(id(m), args[0].detach().clone())

        handles = [old.register_forward_hook(keep) for old, *_ in plan]
        try:
            model.eval()
            model(example_input)
        finally:
            for h in handles:
                h.remove()

    # 3. build and put in place; 4. initialise from the static kernels, check. A failure puts every
    # convolution back: a refused conversion leaves the model as it was.
    built: list = []
    existing = {id(m) for m in model.modules()}
    try:
        _replace_and_initialise(model, plan, built, report, options, seen, check)
    except Exception:
        for old, mpaths, *_ in built:
            for p in mpaths:
                _set_module(model, p, old)
        for parent in list(model.modules()):  # what the attempt attached (a warehouse manager)
            for name, child in list(parent.named_children()):
                if id(child) not in existing:
                    delattr(parent, name)
        model.train(was_training)
        raise

    # 5. every parameter of the input model accounted for
    now = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    replaced = {id(p): c for (old, *_), c in zip(built, report.changes) for p in old.parameters()}
    for name, p in original_params.items():
        if id(p) in now:
            report.parameters[name] = now[id(p)]
        elif id(p) in replaced:
            report.parameters[name] = f'-> {replaced[id(p)].paths[0]} ({replaced[id(p)].new_type})'
        else:
            report.lost.append(name)

    model.train(was_training)
    for _, _, new, _, _ in built:
        new.train(was_training)
    if ref_out is not None:
        model.eval()
        report.model_max_rel_diff = _rel_diff(_first(model(example_input)), ref_out)
        model.train(was_training)
    return model, report


def _probe_input(spec: ConvSpec, like: torch.Tensor) -> torch.Tensor:
    """A random input for a convolution (or linear layer) of geometry ``spec``."""
    g = torch.Generator().manual_seed(0)
    if spec.dims == 0:
        x = torch.randn(2, 3, spec.in_channels, generator=g)
    else:
        size = max(8, 2 * max(d * (k - 1) + 1 for k, d in zip(spec.kernel_size, spec.dilation)))
        x = torch.randn(2, spec.in_channels, *([size] * spec.dims), generator=g)
    return x.to(device=like.device, dtype=like.dtype)
