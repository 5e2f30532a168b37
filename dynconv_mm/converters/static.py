"""Start a dynamic or re-parameterized model from a static (plain-convolution) checkpoint.

:func:`convert_static_to_dynamic` takes the state dict of an ordinary network (torchvision / timm
ResNet keys ``conv1.weight``, ``layer1.0.conv1.weight``, ``fc.*``; or mmpretrain keys
``backbone.*`` / ``head.fc.*``) and a model built from a dynconv_mm config whose convolutions are
dynamic or re-parameterized layers (``conv_cfg=dict(type=...)`` in a stock backbone). Plain modules
(norms, the classifier, plain convs) receive their tensors unchanged; every dynamic / re-param
layer is initialised from the static kernel at the same module path so that, wherever the method
allows it, the new model computes what the static one did:

============================  =====================================================  ============================
layer                         initialisation from the static kernel ``W``            equal to the static conv?
============================  =====================================================  ============================
``DyConv2d``                  every kernel ``= W`` (attention untouched)            exact (softmax sums to 1)
``CondConv2d``                routing weight 0, bias 0 (every ``r = 1/2``); experts  exact
                              ``2W/E + d_e`` with ``sum_e d_e = 0``
``ODConv2d``                  channel/filter/spatial heads: weight 0, bias 0 (each   exact
                              ``= 1/2``); kernels ``= W / 2^h`` (``h`` heads present),
                              kernel attention untouched
``PEDConv2d``                 factor heads weight 0, bias 0 (factors ``= 1/2``);     exact in eval; training adds
                              base kernel ``= 8W``                                   the method's logit noise
``DOConv2d``                  ``W`` into the identity part, ``D = 0``               exact
``OREPA`` / ``OREPA_1x1``     origin ``= W``, ``vector`` ``(1, 0, ...)``, inner BN   exact
                              (if any) the identity
``DBB``                       origin conv ``= W``, its BN the identity; the other    exact
                              branches' last BN ``gamma = beta = 0``
``RepVGGBlock``               dense conv ``= W``, its BN the identity; 1x1 and      exact before the block's
                              identity BNs ``gamma = beta = 0``                      own activation
``DynamicDWConv2d``           kernel generator: last conv weight 0, bias ``= W``     exact
``IDynamicDWConv2d``          same, ``group_channels == 1`` only                     exact
``KWConv*`` (KernelWarehouse) each mixture's own cell ``=`` the matching block of     exact at temperature 1 with
                              ``W``; attention logits ``fc2`` weight 0, bias ``=``   ``cell_num_ratio >= 1``;
                              the temperature prior (``attention='prior'``)          relative ``eps/(1+eps)``
                                                                                     (``1e-3``) at temperature 0;
                                                                                     not exact below 1x
============================  =====================================================  ============================

Why these choices:

* Sigmoid gates (CondConv, ODConv, PEDConv) cannot output 1, and "zero weight, large bias" is only
  approximately 1 and leaves the gate saturated (no gradient). A gate of exactly ``sigmoid(0) = 1/2``
  (weight and bias zero) has the largest gradient, and the constant ``1/2`` is folded into the kernel,
  which makes the product exact. The kernels are therefore larger than ``W`` by ``2`` (CondConv,
  times ``1/E`` per expert), ``2^h`` (ODConv) or ``8`` (PEDConv).
* Identical expert kernels behind identical routing never become different (every expert gets the same
  gradient). Softmax attentions (DY-Conv, ODConv's kernel attention) are kept as initialised, so
  different samples weigh the experts differently and symmetry breaks by itself. CondConv's routing has
  to be constant for exactness, so its experts get zero-sum perturbations ``d_e`` (``expert_noise``
  times the kernel's standard deviation): the mixture ``sum_e r_e (2W/E + d_e) = W`` stays exact while
  the experts differ.
* KernelWarehouse mixes cells shared between layers; each mixture of a layer has its own cell (the
  temperature prior ``t``), and at temperature 1 the attention *is* ``t``, so own cells holding the
  static blocks reproduce ``W`` exactly. Training starts at temperature 1 (the schedule anneals it to
  0). At temperature 0 the attention is the L1-normalised logits; with ``fc2`` set to ``0 * h + t`` it
  is ``t / (1 + eps)`` (``eps = 1e-3``), so the kernel is ``W / 1.001`` and the output differs by a
  bounded, measured amount. With ``cell_num_ratio < 1`` some mixtures have no own cell (their prior is
  the all-zero cell): those kernel blocks start at zero and the model is *not* equivalent.

Each layer carries its rule itself (``init_from_static`` of the layer protocol,
:mod:`dynconv_mm.layers.base`); this module only finds the layers and accounts for the keys.

Every static key is accounted for in the returned :class:`StaticInitReport`: ``mapped`` (source key ->
where it went), ``unplaced`` (static keys with no place in the model, e.g. a classifier of another
size), ``missing`` (model keys that no static tensor and no rule set: they keep their random
initialisation), plus ``initialised`` (model keys set by the method's rule above) and ``layers``
(per layer, what was done and whether it is exact).
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Tuple

import torch
from torch import nn

from ..layers.base import LayerProtocol, StaticInit, StaticInitError
from .common import ConversionReport, StateDict, check_static_input

__all__ = ['StaticInitReport', 'convert_static_to_dynamic', 'init_layer_from_static', 'static_candidates',
           'supported_layer_types', 'static_init_options', 'check_static_init_options']


@dataclass
class StaticInitReport(ConversionReport):
    """:class:`~dynconv_mm.converters.common.ConversionReport` plus what the layer rules did."""
    initialised: Dict[str, str] = field(default_factory=OrderedDict)  # model key -> rule that set it
    layers: Dict[str, str] = field(default_factory=OrderedDict)       # model layer path -> note (exactness)
    exact: Dict[str, bool] = field(default_factory=OrderedDict)       # model layer path -> computes the same
    temperatures: Dict[str, float] = field(default_factory=OrderedDict)  # layer path -> where it is exact

    def summary(self) -> str:
        lines = [super().summary(), f'{len(self.initialised)} model keys set by the method rules']
        inexact = {k: v for k, v in self.layers.items() if not self.exact.get(k, False)}
        lines.append(f'{len(self.layers)} dynamic / re-param layers initialised from static kernels, '
                     f'{len(inexact)} not exactly equivalent')
        for k, v in list(inexact.items())[:10]:
            lines.append(f'  {k}: {v}')
        return '\n'.join(lines)


def supported_layer_types() -> List[str]:
    """Registered conv types that can start from a static convolution (they say so themselves)."""
    from mmengine.registry import MODELS

    from ..registry import registered_names
    return [name for name in registered_names('conv')
            if issubclass(MODELS.get(name), LayerProtocol) and MODELS.get(name).supports_static_init()]


def static_init_options() -> Dict[str, Any]:
    """Every option some registered layer's static initialisation reads, with its default."""
    from mmengine.registry import MODELS

    from ..registry import registered_names
    out: Dict[str, Any] = {}
    for name in registered_names('conv'):
        out.update(getattr(MODELS.get(name), 'static_init_options', {}))
    return out


def check_static_init_options(options: Dict[str, Any]) -> None:
    """``ValueError`` for an option no registered layer reads, or a value a layer refuses (each layer
    checks its own options: :meth:`~dynconv_mm.layers.base.LayerProtocol.check_static_options`)."""
    from mmengine.registry import MODELS

    from ..registry import registered_names
    known = static_init_options()
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise StaticInitError(f'unknown static-initialisation option(s) {unknown}; the options are {sorted(known)}')
    for name in registered_names('conv'):
        cls = MODELS.get(name)
        if isinstance(cls, type) and issubclass(cls, LayerProtocol):
            cls.check_static_options(options)


def init_layer_from_static(layer: nn.Module, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                           **options: Any) -> StaticInit:
    """Initialise one dynamic / re-param ``layer`` in place from a static kernel ``weight (C_out, C_in/g, *k)``
    (and ``bias (C_out,)``): the layer's own ``init_from_static`` (see the module docstring for what each
    layer type does). ``options``: those of :func:`static_init_options` (``expert_noise``,
    ``kw_attention``, ...); an unknown option is an error.

    Raises ``ValueError`` (:class:`~dynconv_mm.layers.base.StaticInitError`) for a deployed re-param layer,
    a layer type that cannot start from a static kernel, a shape mismatch or a bad option value.
    """
    check_static_init_options(options)
    if not isinstance(layer, LayerProtocol) or not layer.supports_static_init():
        raise StaticInitError(f'{type(layer).__name__} cannot be initialised from a static convolution; supported: '
                              f'{", ".join(supported_layer_types())}')
    expected = tuple(layer.static_weight_shape())
    if tuple(weight.shape) != expected:
        raise StaticInitError(f'{type(layer).__name__}: static kernel of shape {tuple(weight.shape)} does not fit the '
                              f'layer (expected {expected})')
    return layer.init_from_static(weight.detach().float(), None if bias is None else bias.detach().float(), **options)


def static_candidates(module_path: str) -> List[str]:
    """Model module paths a static module path may correspond to (torchvision/timm <-> mmpretrain)."""
    p = module_path
    out = [p]
    for prefix in ('backbone.', 'model.'):
        if p.startswith(prefix):
            out.append(p[len(prefix):])
    base = out[-1] if len(out) > 1 else p
    out.append('backbone.' + base)
    if base in ('fc', 'head.fc'):
        out += ['head.fc', 'fc']
    if p.startswith('head.'):
        out.append(p[len('head.'):])
    seen, uniq = set(), []
    for c in out:
        if c not in seen:
            seen.add(c)
            uniq.append(c)
    return uniq


def _group(sd: StateDict) -> 'OrderedDict[str, Dict[str, torch.Tensor]]':
    groups: 'OrderedDict[str, Dict[str, torch.Tensor]]' = OrderedDict()
    for k, v in sd.items():
        mod, _, name = k.rpartition('.')
        groups.setdefault(mod, {})[name] = v
    return groups


def _param_keys(path: str, names: Iterable[str]) -> List[str]:
    return [f'{path}.{n}' if path else n for n in names]


def _module_path(model: nn.Module, module: nn.Module) -> Optional[str]:
    for name, mod in model.named_modules():
        if mod is module:
            return name
    return None


def convert_static_to_dynamic(static_state_dict: StateDict, model: nn.Module, expert_noise: float = 0.01,
                              kw_attention: str = 'prior', kw_prior_logit: float = 1.0, seed: int = 0
                              ) -> Tuple[StateDict, StaticInitReport]:
    """Initialise ``model`` (in place) from a static checkpoint and return ``(model.state_dict(), report)``.

    Args:
        static_state_dict: a plain network's state dict (torchvision / timm / mmpretrain keys; a
            ``module.`` prefix must already be stripped, e.g. by
            :func:`~dynconv_mm.converters.common.extract_state_dict`).
        model: the dynamic / re-param model (built, warehouses allocated). Its parameters are set in place.
        expert_noise: CondConv expert perturbation (relative to the kernel's std; zero-sum, so exactness
            holds); 0 keeps the experts identical (they then never diverge).
        kw_attention: ``'prior'`` (``fc2`` logits = temperature prior, near-exact at every temperature) or
            ``'keep'`` (the attention as initialised: exact only at temperature 1).
        kw_prior_logit: the prior logit ``L`` of the ``'prior'`` mode: at temperature 0 every kernel is
            ``W * L / (L + eps)`` (``eps = 1e-3``); a larger ``L`` is closer to exact but makes the
            contrast-normalised attention learn more slowly (its gradient scales as ``1 / L``).
        seed: seed of the CondConv perturbations.

    Static keys with no place (another classifier size, keys of modules the model lacks) are listed in
    ``report.unplaced``; model keys no static tensor or rule set in ``report.missing``. A checkpoint that
    already holds dynamic or re-parameterized layers raises
    :class:`~dynconv_mm.converters.common.WrongInputError` naming its method and converter.
    """
    options = dict(expert_noise=expert_noise, kw_attention=kw_attention, kw_prior_logit=kw_prior_logit,
                   generator=torch.Generator().manual_seed(seed))
    check_static_init_options(options)
    check_static_input(static_state_dict)
    report = StaticInitReport()
    modules = dict(model.named_modules())
    model_keys = model.state_dict()
    set_keys: Dict[str, str] = OrderedDict()
    for spath, tensors in _group(static_state_dict).items():
        target = next((c for c in static_candidates(spath) if c in modules), None)
        skeys = _param_keys(spath, tensors)
        if target is None:
            report.unplaced.extend(skeys)
            continue
        layer = modules[target]
        if isinstance(layer, LayerProtocol) and layer.supports_static_init() and not getattr(layer, 'deploy', False):
            w, b = tensors.get('weight'), tensors.get('bias')
            extra = [k for k in tensors if k not in ('weight', 'bias')]
            if w is None:
                report.unplaced.extend(skeys)
                continue
            try:
                rec = init_layer_from_static(layer, w, b, **options)
            except ValueError as err:
                report.unplaced.extend(skeys)
                report.layers[target] = f'not initialised: {err}'
                report.exact[target] = False
                continue
            report.layers[target] = rec.note
            report.exact[target] = rec.exact
            if rec.temperature is not None:
                report.temperatures[target] = rec.temperature
            if rec.elsewhere:
                for module, name, detail in rec.elsewhere:
                    path = _module_path(model, module)
                    key = f'{path}.{name}' if path else name
                    report.mapped[f'{spath}.weight'] = f'{key}{detail}'
                    set_keys[key] = 'static'
            else:
                report.mapped[f'{spath}.weight'] = f'{target}.{rec.from_static[0]}'
            if b is not None:
                report.mapped[f'{spath}.bias'] = f'{target}.bias'
            for n in rec.from_static:
                set_keys[f'{target}.{n}'] = 'static'
            for n, why in rec.by_rule.items():
                key = f'{target}.{n}'
                if key in model_keys:
                    report.initialised[key] = why
                    set_keys[key] = 'rule'
            report.unplaced.extend(f'{spath}.{k}' for k in extra)
            continue
        own = dict(layer.named_parameters(recurse=False))
        own.update({n: t for n, t in layer.named_buffers(recurse=False) if t is not None})
        for name, value in tensors.items():
            key = f'{target}.{name}' if target else name
            if name in own and key in model_keys and tuple(own[name].shape) == tuple(value.shape):
                with torch.no_grad():
                    own[name].copy_(value.to(own[name].dtype))
                report.mapped[f'{spath}.{name}'] = key
                set_keys[key] = 'static'
            else:
                report.unplaced.append(f'{spath}.{name}')
    report.missing = [k for k in model_keys if k not in set_keys]
    return model.state_dict(), report
