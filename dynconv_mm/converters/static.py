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

Every static key is accounted for in the returned :class:`StaticInitReport`: ``mapped`` (source key ->
where it went), ``unplaced`` (static keys with no place in the model, e.g. a classifier of another
size), ``missing`` (model keys that no static tensor and no rule set: they keep their random
initialisation), plus ``initialised`` (model keys set by the method's rule above) and ``layers``
(per layer, what was done and whether it is exact).
"""
from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import torch
from torch import nn

from .common import ConversionReport, StateDict

__all__ = ['StaticInitReport', 'convert_static_to_dynamic', 'init_layer_from_static', 'static_candidates',
           'SUPPORTED_LAYERS']


@dataclass
class StaticInitReport(ConversionReport):
    """:class:`~dynconv_mm.converters.common.ConversionReport` plus what the layer rules did."""
    initialised: Dict[str, str] = field(default_factory=OrderedDict)  # model key -> rule that set it
    layers: Dict[str, str] = field(default_factory=OrderedDict)       # model layer path -> note (exactness)

    def summary(self) -> str:
        lines = [super().summary(), f'{len(self.initialised)} model keys set by the method rules']
        inexact = {k: v for k, v in self.layers.items() if not v.startswith('exact')}
        lines.append(f'{len(self.layers)} dynamic / re-param layers initialised from static kernels, '
                     f'{len(inexact)} not exactly equivalent')
        for k, v in list(inexact.items())[:10]:
            lines.append(f'  {k}: {v}')
        return '\n'.join(lines)


class _Init:
    """What a layer rule did: keys it filled from the static tensors, keys it set by rule, a note."""

    def __init__(self, note: str) -> None:
        self.note = note
        self.from_static: List[str] = []   # parameter names (relative to the layer)
        self.by_rule: Dict[str, str] = OrderedDict()


@torch.no_grad()
def _set(layer: nn.Module, name: str, value: torch.Tensor) -> None:
    target = layer.get_parameter(name) if name in dict(layer.named_parameters()) else layer.get_buffer(name)
    if tuple(target.shape) != tuple(value.shape):
        raise ValueError(f'{type(layer).__name__}.{name}: static value of shape {tuple(value.shape)} does not fit '
                         f'{tuple(target.shape)}')
    target.copy_(value.to(target.dtype))


def _zero_linear(layer: nn.Module, prefix: str, rec: _Init, why: str) -> None:
    mod = layer.get_submodule(prefix)
    with torch.no_grad():
        mod.weight.zero_()
        rec.by_rule[f'{prefix}.weight'] = why
        if mod.bias is not None:
            mod.bias.zero_()
            rec.by_rule[f'{prefix}.bias'] = why


@torch.no_grad()
def _identity_bn(layer: nn.Module, prefix: str, rec: _Init) -> None:
    """An eval-mode BatchNorm that returns its input: mean 0, var 1, gamma sqrt(1 + eps), beta 0."""
    bn = layer.get_submodule(prefix)
    bn.running_mean.zero_()
    bn.running_var.fill_(1.0)
    if bn.weight is not None:
        bn.weight.fill_(math.sqrt(1.0 + bn.eps))
        bn.bias.zero_()
    for n in ('weight', 'bias', 'running_mean', 'running_var'):
        if getattr(bn, n, None) is not None:
            rec.by_rule[f'{prefix}.{n}'] = 'identity BatchNorm'


@torch.no_grad()
def _silence_bn(layer: nn.Module, prefix: str, rec: _Init) -> None:
    """A BatchNorm whose output is 0 (gamma = beta = 0): its branch contributes nothing."""
    bn = layer.get_submodule(prefix)
    bn.weight.zero_()
    bn.bias.zero_()
    rec.by_rule[f'{prefix}.weight'] = rec.by_rule[f'{prefix}.bias'] = 'branch silenced (gamma = beta = 0)'


def _copy_bias(layer: nn.Module, bias: Optional[torch.Tensor], rec: _Init, expand: int = 0, scale: float = 1.0):
    if getattr(layer, 'bias', None) is None:
        if bias is not None:
            raise ValueError(f'{type(layer).__name__} has no bias but the static convolution has one; build the layer '
                             'with bias=True')
        return
    with torch.no_grad():
        if bias is None:
            layer.bias.zero_()
            rec.by_rule['bias'] = 'zero (the static convolution has no bias)'
            return
        value = bias * scale
        layer.bias.copy_(value.expand(expand, -1) if expand else value)
    rec.from_static.append('bias')


# ------------------------------------------------------------------------------------------------
# one rule per layer type
def _init_dyconv(layer, w, b, opts) -> _Init:
    rec = _Init('exact: every kernel is W and the softmax attention sums to 1')
    _set(layer, 'weight', w.unsqueeze(0).expand_as(layer.weight))
    rec.from_static.append('weight')
    _copy_bias(layer, b, rec, expand=layer.num_kernels)
    return rec


def _zero_sum_noise(shape, n: int, std: float, generator: torch.Generator) -> torch.Tensor:
    d = torch.randn(n, *shape, generator=generator, dtype=torch.float64) * std
    return (d - d.mean(0, keepdim=True)).float()


def _init_condconv(layer, w, b, opts) -> _Init:
    E = layer.num_experts
    rec = _Init('exact: routing is the constant sigmoid(0) = 1/2, experts 2W/E plus zero-sum perturbations')
    _zero_linear(layer, 'routing_fn', rec, 'routing weight and bias 0: every routing weight is 1/2')
    experts = (2.0 / E) * w.double().unsqueeze(0).expand(E, *w.shape)
    std = float(opts['expert_noise']) * float(w.double().std()) if w.numel() > 1 else 0.0
    if std > 0 and E > 1:
        experts = experts + _zero_sum_noise(w.shape, E, std, opts['generator']).double()
    _set(layer, 'weight', experts.float())
    rec.from_static.append('weight')
    _copy_bias(layer, b, rec, expand=E, scale=2.0 / E)
    return rec


def _init_odconv(layer, w, b, opts) -> _Init:
    att = layer.attention
    heads = [n for n in ('channel_fc', 'filter_fc', 'spatial_fc') if getattr(att, n) is not None]
    rec = _Init(f'exact: {"/".join(h[:-3] for h in heads)} attentions are sigmoid(0) = 1/2, '
                f'kernels W * 2^{len(heads)}')
    for h in heads:
        _zero_linear(layer, f'attention.{h}', rec, 'weight and bias 0: the attention is the constant 1/2')
    scale = 2.0 ** len(heads)
    _set(layer, 'weight', (w * scale).unsqueeze(0).expand_as(layer.weight))
    rec.from_static.append('weight')
    _copy_bias(layer, b, rec)
    return rec


def _init_pedconv(layer, w, b, opts) -> _Init:
    rec = _Init('exact in eval: the three factors are sigmoid(0) = 1/2, base kernel 8W (training adds the '
                'method\'s noise to the factor logits)')
    for h in ('attn.fc_inp', 'attn.fc_oup', 'attn.fc_k'):
        _zero_linear(layer, h, rec, 'weight and bias 0: the factor is 1/2 (in eval)')
    _set(layer, 'weight', w * 8.0)
    rec.from_static.append('weight')
    _copy_bias(layer, b, rec)
    return rec


def _init_doconv(layer, w, b, opts) -> _Init:
    rec = _Init('exact: D = 0, W in the identity part')
    mn = layer.kernel_size[0] * layer.kernel_size[1]
    new = torch.zeros_like(layer.W)
    new[..., :mn] = w.reshape(layer.out_channels, -1, mn)
    _set(layer, 'W', new)
    rec.from_static.append('W')
    if hasattr(layer, 'D'):
        with torch.no_grad():
            layer.D.zero_()
        rec.by_rule['D'] = 'zero'
    _copy_bias(layer, b, rec)
    return rec


def _orepa_vector(layer, rec: _Init) -> None:
    with torch.no_grad():
        layer.vector.zero_()
        layer.vector[0].fill_(1.0)
    rec.by_rule['vector'] = 'origin branch 1, other branches 0'


def _init_orepa(layer, w, b, opts) -> _Init:
    rec = _Init('exact: origin branch = W, the other branches scaled by 0')
    name = 'weight_orepa_origin' if hasattr(layer, 'weight_orepa_origin') else 'weight_or1x1_origin'
    _set(layer, name, w)
    rec.from_static.append(name)
    _orepa_vector(layer, rec)
    if getattr(layer, 'bn', None) is not None:
        _identity_bn(layer, 'bn', rec)
    _copy_bias(layer, b, rec)
    return rec


def _init_dbb(layer, w, b, opts) -> _Init:
    if b is not None:
        raise ValueError('DBB has no bias; the static convolution has one')
    rec = _Init('exact: origin conv = W with an identity BN, the other branches silenced')
    _set(layer, 'dbb_origin.conv.weight', w)
    rec.from_static.append('dbb_origin.conv.weight')
    _identity_bn(layer, 'dbb_origin.bn', rec)
    _silence_bn(layer, 'dbb_avg.avgbn', rec)
    _silence_bn(layer, 'dbb_1x1_kxk.bn2', rec)
    if layer.dbb_1x1 is not None:
        _silence_bn(layer, 'dbb_1x1.bn', rec)
    return rec


def _init_repvgg(layer, w, b, opts) -> _Init:
    if b is not None:
        raise ValueError(f'{type(layer).__name__} has no bias; the static convolution has one')
    rec = _Init('exact up to the block\'s own activation: dense conv = W with an identity BN, 1x1 and identity '
                'branches silenced')
    dense = layer.rbr_dense
    if hasattr(dense, 'conv'):
        _set(layer, 'rbr_dense.conv.weight', w)
        rec.from_static.append('rbr_dense.conv.weight')
    else:  # OREPA kernel as the dense branch
        _set(layer, 'rbr_dense.weight_orepa_origin', w)
        rec.from_static.append('rbr_dense.weight_orepa_origin')
        _orepa_vector(dense, _Init(''))
        rec.by_rule['rbr_dense.vector'] = 'origin branch 1, other branches 0'
    _identity_bn(layer, 'rbr_dense.bn', rec)
    _silence_bn(layer, 'rbr_1x1.bn', rec)
    if layer.rbr_identity is not None:
        _silence_bn(layer, 'rbr_identity', rec)
    return rec


def _init_dynamic_dw(layer, w, b, opts) -> _Init:
    gen = layer.conv2 if isinstance(layer.conv2, nn.Conv2d) else layer.conv2[0]
    prefix = 'conv2' if isinstance(layer.conv2, nn.Conv2d) else 'conv2.0'
    kh, kw = layer.kernel_size
    if w.shape[1] != 1 or w.shape[0] != layer.in_channels:
        raise ValueError(f'{type(layer).__name__}: a depth-wise static kernel (C, 1, k, k) is needed, '
                         f'got {tuple(w.shape)}')
    groups = getattr(layer, 'group_channels', 1)
    if groups != 1:
        kernels = w.reshape(layer.in_channels // groups, groups, kh * kw).mean(1)
        note = (f'not exact: {groups} channels share one generated kernel; each group starts from the mean of '
                'its static kernels')
    else:
        kernels = w.reshape(layer.in_channels, kh * kw)
        note = 'exact: the kernel generator outputs W for every input (last conv weight 0, bias W)'
    rec = _Init(note)
    with torch.no_grad():
        gen.weight.zero_()
        gen.bias.copy_(kernels.reshape(-1))
    rec.by_rule[f'{prefix}.weight'] = 'zero: the generated kernel does not depend on the input at first'
    rec.from_static.append(f'{prefix}.bias')
    _copy_bias(layer, b, rec)
    return rec


def _kw_blocks(layer, w: torch.Tensor) -> torch.Tensor:
    """The static kernel cut into the layer's mixtures: ``(M, c_o, c_i, *ck)`` (inverse of assemble_kernel)."""
    d = layer.dimension
    cell = layer.cell_shape
    ck = cell[3:]
    go, gi = layer.groups_out_channel, layer.groups_in_channel
    gs_shape = [k // c for k, c in zip(layer.kernel_size, ck)]
    # kernel axis u = s_u * ck_u + r_u (spatial index slowest within the kernel axis)
    shape = [go, cell[1], gi, cell[2]]
    for g, c in zip(gs_shape, ck):
        shape += [g, c]
    x = w.reshape(shape)
    g_axes = [4 + 2 * i for i in range(d)]
    c_axes = [5 + 2 * i for i in range(d)]
    x = x.permute(*g_axes, 0, 2, 1, 3, *c_axes)
    return x.reshape(layer.num_mixtures, cell[1], cell[2], *ck)


def _init_kw(layer, w, b, opts) -> _Init:
    manager = layer.manager
    if manager is None or layer.cell_shape is None:
        raise ValueError(f'{layer._spec()}: its warehouse is not allocated; build the model through a registry or '
                         'call allocate_warehouses(model) first')
    att = layer.attention
    P = att.kw_planes_per_mixture
    prior = att.temp_bias.reshape(att.num_local_mixture, P)
    own = prior[:, :-1].argmax(1)
    has_cell = prior[:, :-1].sum(1) > 0
    blocks = _kw_blocks(layer, w)
    cells = manager.weights[layer.warehouse_id]
    with torch.no_grad():
        for m in range(att.num_local_mixture):
            if has_cell[m]:
                cells[own[m]].copy_(blocks[m].to(cells.dtype))
    # check: at temperature 1 the assembled kernel is W wherever every mixture has its own cell
    full = bool(has_cell.all())
    if full:
        ker = layer.assemble_kernel(prior[:, :-1].unsqueeze(0).to(cells.dtype))[0]
        if not torch.equal(ker, w.to(ker.dtype)):
            raise AssertionError(f'{layer._spec()}: warehouse layout check failed')
    rec = _Init('exact at temperature 1 (own cells hold W); at temperature 0 the kernel is W / (1 + eps)'
                if full else
                f'not exact: {int((~has_cell).sum())} of {len(has_cell)} mixtures own no cell (cell_num_ratio < 1), '
                'their blocks start at zero')
    if opts['kw_attention'] == 'prior':
        with torch.no_grad():
            att.fc2.weight.zero_()
            rec.by_rule['attention.fc2.weight'] = 'zero: logits = temperature prior'
            prior_logits = att.temp_bias * float(opts['kw_prior_logit'])
            if att.basis_mode:
                att.basis_bias.copy_(prior_logits)
                rec.by_rule['attention.basis_bias'] = 'temperature prior'
            else:
                att.fc2.bias.copy_(prior_logits)
                rec.by_rule['attention.fc2.bias'] = 'temperature prior'
    elif opts['kw_attention'] != 'keep':
        raise ValueError(f"kw_attention must be 'prior' or 'keep', got {opts['kw_attention']!r}")
    if layer.bias is not None:
        with torch.no_grad():
            layer.bias.copy_(b if b is not None else torch.zeros_like(layer.bias))
        (rec.from_static.append('bias') if b is not None else rec.by_rule.__setitem__('bias', 'zero'))
    elif b is not None:
        raise ValueError(f'{layer._spec()} has no bias; the static convolution has one')
    rec.cells = [int(i) for i in own[has_cell]]  # type: ignore[attr-defined]
    return rec


def _registry() -> Dict[type, Callable]:
    from ..layers.condconv import CondConv2d
    from ..layers.dyconv import DyConv2d
    from ..layers.dynamic_dw import DynamicDWConv2d, IDynamicDWConv2d
    from ..layers.kernel_warehouse import KWConvNd
    from ..layers.odconv import ODConv2d
    from ..layers.pedconv import PEDConv2d
    from ..layers.reparam.dbb import DBB
    from ..layers.reparam.doconv import DOConv2d
    from ..layers.reparam.orepa import OREPA, OREPA_1x1
    from ..layers.reparam.repvgg import RepVGGBlock
    return OrderedDict([
        (DyConv2d, _init_dyconv), (CondConv2d, _init_condconv), (ODConv2d, _init_odconv),
        (PEDConv2d, _init_pedconv), (DOConv2d, _init_doconv), (OREPA, _init_orepa), (OREPA_1x1, _init_orepa),
        (DBB, _init_dbb), (RepVGGBlock, _init_repvgg), (DynamicDWConv2d, _init_dynamic_dw),
        (IDynamicDWConv2d, _init_dynamic_dw), (KWConvNd, _init_kw),
    ])


#: layer class names this module can initialise from a static convolution
SUPPORTED_LAYERS = ('DyConv2d', 'CondConv2d', 'ODConv2d', 'PEDConv2d', 'DOConv2d', 'OREPA', 'OREPA_1x1', 'DBB',
                    'RepVGGBlock', 'RepVGGBlock_OREPA', 'DynamicDWConv2d', 'IDynamicDWConv2d', 'KWConv1d',
                    'KWConv2d', 'KWConv3d')


def _rule_for(layer: nn.Module) -> Optional[Callable]:
    for cls, fn in _registry().items():
        if isinstance(layer, cls):
            return fn
    return None


def init_layer_from_static(layer: nn.Module, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                           expert_noise: float = 0.01, kw_attention: str = 'prior', kw_prior_logit: float = 1.0,
                           generator: Optional[torch.Generator] = None) -> _Init:
    """Initialise one dynamic / re-param ``layer`` in place from a static kernel ``weight (C_out, C_in/g, *k)``
    (and ``bias (C_out,)``); see the module docstring for what each layer type gets.

    Raises ``ValueError`` for a deployed re-param layer, an unsupported layer type or a shape mismatch.
    """
    if getattr(layer, 'deploy', False):
        raise ValueError(f'{type(layer).__name__} is deployed: load the static kernel into its reparam conv instead')
    fn = _rule_for(layer)
    if fn is None:
        raise ValueError(f'{type(layer).__name__} cannot be initialised from a static convolution; supported: '
                         f'{", ".join(SUPPORTED_LAYERS)}')
    expected = getattr(layer, 'weight_shape', None)
    expected = list(expected()) if callable(expected) else None
    if expected is None:
        ks = layer.kernel_size if isinstance(layer.kernel_size, (tuple, list)) else (layer.kernel_size,) * 2
        cin = layer.in_channels // (layer.groups if not hasattr(layer, 'group_channels') else layer.in_channels)
        expected = [layer.out_channels, cin, *ks]
    if list(weight.shape) != expected:
        raise ValueError(f'{type(layer).__name__}: static kernel of shape {tuple(weight.shape)} does not fit the layer '
                         f'(expected {tuple(expected)})')
    if not kw_prior_logit > 0:
        raise ValueError(f'kw_prior_logit must be > 0, got {kw_prior_logit!r}')
    opts = dict(expert_noise=expert_noise, kw_attention=kw_attention, kw_prior_logit=kw_prior_logit,
                generator=generator or torch.Generator().manual_seed(0))
    return fn(layer, weight.detach().float(), None if bias is None else bias.detach().float(), opts)


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


def _resolve_kw_key(model: nn.Module, layer: nn.Module) -> str:
    manager = layer.manager
    for name, mod in model.named_modules():
        if mod is manager:
            return f'{name}.weights.{layer.warehouse_id}' if name else f'weights.{layer.warehouse_id}'
    return f'warehouse_manager.weights.{layer.warehouse_id}'


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
    ``report.unplaced``; model keys no static tensor or rule set in ``report.missing``.
    """
    report = StaticInitReport()
    modules = dict(model.named_modules())
    model_keys = model.state_dict()
    set_keys: Dict[str, str] = OrderedDict()
    gen = torch.Generator().manual_seed(seed)
    for spath, tensors in _group(static_state_dict).items():
        target = next((c for c in static_candidates(spath) if c in modules), None)
        skeys = _param_keys(spath, tensors)
        if target is None:
            report.unplaced.extend(skeys)
            continue
        layer = modules[target]
        rule = _rule_for(layer) if not getattr(layer, 'deploy', False) else None
        if rule is not None:
            w, b = tensors.get('weight'), tensors.get('bias')
            extra = [k for k in tensors if k not in ('weight', 'bias')]
            if w is None:
                report.unplaced.extend(skeys)
                continue
            try:
                rec = init_layer_from_static(layer, w, b, expert_noise, kw_attention, kw_prior_logit, gen)
            except ValueError as err:
                report.unplaced.extend(skeys)
                report.layers[target] = f'not initialised: {err}'
                continue
            report.layers[target] = rec.note
            if hasattr(layer, 'manager') and hasattr(rec, 'cells'):
                wkey = _resolve_kw_key(model, layer)
                report.mapped[f'{spath}.weight'] = f'{wkey}[{",".join(map(str, rec.cells))}]'
                set_keys[wkey] = 'static'
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
