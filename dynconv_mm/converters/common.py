"""The one checkpoint-conversion engine: load any checkpoint format, apply a table of key rules,
account for every key.

A method's converter is *data*: a list of :class:`Rule` (regular expression -> replacement, or
drop with a reason) plus, where needed, a tensor transform. :func:`convert_state_dict` applies it
and returns a :class:`ConversionReport` that lists every source key that was mapped, dropped (with
why) or left unplaced. Nothing is dropped silently: unplaced keys make :meth:`ConversionReport.check`
raise, naming them.
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

    @property
    def ok(self) -> bool:
        return not (self.unplaced or self.missing or self.unexpected)

    def summary(self) -> str:
        lines = [f'{len(self.mapped)} keys mapped, {len(self.dropped)} dropped on purpose']
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
            rep = ConversionReport(self.mapped, self.dropped, self.unplaced, missing, self.unexpected)
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
# loading
_SAFE_EXTRA = [argparse.Namespace]


def load_checkpoint_file(path: str, trusted: bool = False, map_location: str = 'cpu') -> dict:
    """Load a checkpoint file of any of the official formats.

    First with ``weights_only=True`` (plus ``argparse.Namespace``, which official KernelWarehouse
    checkpoints store). If that refuses the file, ``trusted=True`` loads it with full unpickling
    (only for files you trust: unpickling can run code); otherwise an error says so.
    """
    import dynconv_mm.utils.checkpoint  # noqa: F401  (allow-lists what mmengine checkpoints hold)
    try:
        with torch.serialization.safe_globals(_SAFE_EXTRA):
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
    """Save as an mmengine-style checkpoint ``{'state_dict': ..., 'meta': ...}`` (weights-only loadable)."""
    import os
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torch.save({'state_dict': OrderedDict(state_dict), 'meta': dict(meta or {})}, path)


# --------------------------------------------------------------------------------------------
# command-line converters (tools/model_converters/*.py)
# --------------------------------------------------------------------------------------------
DST_HELP = 'output mmengine checkpoint ({"state_dict", "meta"})'
TRUSTED_HELP = 'allow full unpickling of SRC (only for files you trust) if the safe loader refuses it'


def converter_arg_parser(doc: str, src_help: str) -> argparse.ArgumentParser:
    """The arguments every converter CLI takes: ``SRC DST [--trusted]`` (description: ``doc``'s first line)."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument('src', help=src_help)
    p.add_argument('dst', help=DST_HELP)
    p.add_argument('--trusted', action='store_true', help=TRUSTED_HELP)
    return p


def run_conversion(convert: Callable[[], Tuple[StateDict, ConversionReport, dict]], dst: str,
                   errors: Tuple[type, ...] = (ConversionError,),
                   check: Callable[[ConversionReport], None] = ConversionReport.check) -> int:
    """The converter CLIs' common course: ``convert()`` returns ``(state dict, report, checkpoint meta)``;
    the report is printed and ``check`` (by default: no key left unplaced) decides whether ``dst`` is
    written. Returns the exit status: 1 with ``error: ...`` on stderr (nothing written) when ``convert``
    or ``check`` raise one of ``errors``, else 0 after saving."""
    import sys
    try:
        converted, report, meta = convert()
        print(report.summary())
        check(report)
    except errors as e:
        print(f'error: {e}', file=sys.stderr)
        return 1
    save_checkpoint_file(converted, dst, meta=meta)
    print(f'saved {len(converted)} tensors to {dst}')
    return 0
