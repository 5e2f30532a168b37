"""Official DO-Conv (yangyanli/DO-Conv, ``do_conv_pytorch_1_10.py``) state dicts -> dynconv_mm keys.

The official ``DOConv2d`` saves ``W``, ``D``, ``d_diag`` and ``bias``. dynconv_mm's
:class:`~dynconv_mm.layers.reparam.DOConv2d` keeps ``W``, ``D`` and ``bias`` under the same names and
derives ``d_diag`` (a constant identity pattern, see
:func:`~dynconv_mm.layers.reparam.doconv.doconv_diagonal`): the converter checks that each ``d_diag``
holds exactly that constant and drops it. Other keys of the model pass through unchanged.

A model fused with the official ``sample_pt_with_fusion.py`` holds plain conv ``weight``/``bias`` at the
DO-Conv positions; given the target model's keys (``expected``), those are mapped to the deploy
layer's ``reparam.weight``/``reparam.bias``.

The input must hold official DO-Conv layers (``W``, ``D`` and ``d_diag``) or, with ``expected``, fused plain
convs at DO-Conv positions; anything else (a plain network, another method, a dynconv_mm DO-Conv state dict,
which has no ``d_diag`` and loads directly) is refused with
:class:`~dynconv_mm.converters.common.WrongInputError`, naming what it looks like.
"""
from __future__ import annotations

import re
from typing import Iterable, List, Optional, Tuple

import torch

from .common import ConversionError, ConversionReport, Rule, StateDict, apply_rules, require_input

__all__ = ['convert_doconv', 'doconv_rules']

_D_DIAG_REASON = 'constant identity part of D; DOConv2d derives it (value checked)'


def _check_d_diag(key: str, value: torch.Tensor) -> None:
    from dynconv_mm.layers.reparam.doconv import doconv_diagonal
    if value.dim() != 3:
        raise ConversionError(f'{key}: expected a (in_channels, M*N, D_mul) tensor, got shape {tuple(value.shape)}')
    ref = doconv_diagonal(value.shape[0], value.shape[1], value.shape[2], dtype=value.dtype)
    if not torch.equal(value, ref):
        raise ConversionError(f'{key}: d_diag does not hold the identity pattern DO-Conv defines; the checkpoint was '
                              'not made by the official DOConv2d (or d_diag was trained)')


def doconv_rules(deploy_prefixes: Iterable[str] = ()) -> List[Rule]:
    """Rules: drop ``*d_diag``; ``<p>.weight``/``<p>.bias`` -> ``<p>.reparam.*`` for each deploy prefix ``p``;
    everything else unchanged."""
    rules = [Rule(r'(?:.*\.)?d_diag', None, _D_DIAG_REASON)]
    for p in deploy_prefixes:
        rules.append(Rule(rf'({re.escape(p)})\.(weight|bias)', r'\1.reparam.\2'))
    rules.append(Rule(r'(.*)', r'\1'))
    return rules


def convert_doconv(state_dict: StateDict, expected: Optional[Iterable[str]] = None) -> Tuple[StateDict,
                                                                                          ConversionReport]:
    """Official DO-Conv model state dict -> dynconv_mm keys.

    ``expected``: keys of the target model (e.g. ``model.state_dict()``); needed only for fused
    (plain-conv) checkpoints, to find the DO-Conv positions that expect ``reparam.*``.
    Raises :class:`~dynconv_mm.converters.common.WrongInputError` when the state dict holds neither official
    DO-Conv layers nor (with ``expected``) fused convs at the model's DO-Conv positions.
    """
    for k, v in state_dict.items():
        if k == 'd_diag' or k.endswith('.d_diag'):
            _check_d_diag(k, v)
    prefixes: List[str] = []
    if expected is not None:
        exp = set(expected)
        for k in exp:
            if k.endswith('.reparam.weight') or k == 'reparam.weight':
                p = k[:-len('.reparam.weight')] if k != 'reparam.weight' else ''
                if f'{p}.weight' in state_dict and f'{p}.weight' not in exp:
                    prefixes.append(p)
        if 'reparam.weight' in exp and 'weight' in state_dict:
            rules = [Rule(r'(weight|bias)', r'reparam.\1')] + doconv_rules()
            return apply_rules(state_dict, rules)
    if not prefixes:
        require_input(state_dict, lambda k: k.method == 'doconv' and k.official is not False,
                      'official DO-Conv layers (W, D and d_diag keys)'
                      + ('' if expected is None else ', or fused convs at the DO-Conv positions of the model'))
    return apply_rules(state_dict, doconv_rules(prefixes))
