"""Part ``compile``: ``torch.compile`` (inductor) of a training step and an eval forward.

For KW-ResNet-50, a PEDConv ResNet-18 with its auxiliary loss (recorded inside the compiled forward,
collected outside it) and dynamic DWNet-T: ``torch._dynamo.explain`` gives the graphs and graph
breaks (with their reasons); then the compiled model runs at two input sizes, and the graphs compiled
for the second size are its recompiles (at most one per graph is expected: the second size makes
dynamo mark the spatial sizes dynamic). Also timed: the first call (compilation) and one steady call, eager and
compiled, and the compiled output against eager. The dry run uses the ``aot_eager`` backend (the same
graphs and backward graphs, without inductor's code generation, which takes minutes on two CPU
cores) and tiny models; inductor runs there on one layer host.
"""
from __future__ import annotations

import copy
import re
import time
from typing import Any, Callable, List, Optional, Tuple

import torch
from torch import nn

from .core import PartContext
from .hosts import disable_training_noise, host_objective
from .precision import rel_diff

#: failures of torch itself, reproduced without dynconv_mm: (torch versions, error pattern, what it is and
#: what to do). Such a row is reported with ``known_issue`` and does not fail the part; the same run is
#: then repeated with the workaround, which must pass.
KNOWN_TORCH_BUGS = [
    (r'2\.14\.', r'cannot determine truth value of Relational',
     'torch 2.14 inductor fails on a training step once the spatial sizes turn dynamic (second input size) '
     'for convolutions over a (1, B*C, H, W) input, the per-sample grouped form of CondConv, DY-Conv, ODConv '
     'and the others; a plain F.conv2d model reproduces it; fixed in torch 2.15. Workaround: '
     'torch.compile(model, dynamic=False) (one graph per input size)',
     dict(dynamic=False)),
]


def known_torch_bug(error: str, version: Optional[str] = None) -> Optional[Tuple[str, dict]]:
    """``(description, torch.compile options of the workaround)`` when ``error`` is a known failure of this
    torch version (:data:`KNOWN_TORCH_BUGS`), else ``None``."""
    version = torch.__version__ if version is None else version
    for versions, pattern, what, workaround in KNOWN_TORCH_BUGS:
        if re.match(versions, version) and re.search(pattern, error):
            return what, workaround
    return None


def _last(out: Any) -> torch.Tensor:
    while isinstance(out, (tuple, list)):
        out = out[-1]
    return out


def _models(dry_run: bool) -> List[Tuple[str, Callable[[], nn.Module]]]:
    from ..backbones.dwnet import DWNet
    from ..backbones.kw_resnet import KWResNet
    from ..backbones.pedconv_resnet import PEDResNet
    if dry_run:
        return [('KW-ResNet-50 (base 8)', lambda: KWResNet(depth=50, base_channels=8)),
                ('PEDConv ResNet-18 (x0.125) + aux loss', lambda: PEDResNet(depth=18, widen_factor=0.125)),
                ('dynamic DWNet (16, 1-1-1-1)', lambda: DWNet(embed_dims=16, depths=[1, 1, 1, 1], dynamic=True,
                                                              drop_path_rate=0.0))]
    return [('KW-ResNet-50', lambda: KWResNet(depth=50)),
            ('PEDConv ResNet-18 + aux loss', lambda: PEDResNet(depth=18)),
            ('dynamic DWNet-T', lambda: DWNet(arch='tiny', dynamic=True, drop_path_rate=0.0))]


def _sync(device: str) -> None:
    if device.startswith('cuda'):
        torch.cuda.synchronize()


def _call(model: nn.Module, x: torch.Tensor, train: bool, device: str) -> Tuple[torch.Tensor, float]:
    """One training step (forward, objective with auxiliary losses, backward) or eval forward; its
    output and wall time."""
    _sync(device)
    t0 = time.perf_counter()
    if train:
        for p in model.parameters():
            p.grad = None
        out = _last(model(x))
        host_objective(model, out).backward()
    else:
        with torch.no_grad():
            out = _last(model(x))
    _sync(device)
    return out.detach(), time.perf_counter() - t0


def _counter(name: str) -> int:
    from torch._dynamo.utils import counters
    return int(counters['stats'].get(name, 0))


def _guard_failures() -> List[str]:
    try:
        from torch._dynamo.utils import guard_failures
    except ImportError:
        return []
    reasons = []
    for failures in guard_failures.values():
        reasons.extend(str(f) for f in failures)
    return reasons


def _check(ctx: PartContext, name: str, build: Callable[[], nn.Module], mode: str, backend: str,
           batch: int, sizes: Tuple[int, int], dynamic: Optional[bool] = None) -> None:
    import torch._dynamo as dynamo

    train = mode == 'train step'
    torch.manual_seed(0)
    eager = build().to(ctx.device)
    disable_training_noise(eager)
    eager.train(train)
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(batch, 3, s, s, generator=g).to(ctx.device) for s in sizes]
    row = dict(model=name, mode=mode, backend=backend, dynamic=dynamic)
    dynamo.reset()
    explained = copy.deepcopy(eager)
    if train:
        explanation = dynamo.explain(explained)(xs[0])
    else:
        with torch.no_grad():
            explanation = dynamo.explain(explained)(xs[0])
    reasons = [str(getattr(r, 'reason', r)).splitlines()[0][:160] for r in explanation.break_reasons]
    row.update(graphs=explanation.graph_count, graph_breaks=explanation.graph_break_count,
               break_reasons=' | '.join(dict.fromkeys(reasons))[:400])
    dynamo.reset()
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, backend=backend, dynamic=dynamic)
    ref, eager_s = _call(eager, xs[0], train, ctx.device)
    _, eager_s = _call(eager, xs[0], train, ctx.device)
    before = _counter('unique_graphs')
    out, first_s = _call(compiled, xs[0], train, ctx.device)
    graphs_first = _counter('unique_graphs') - before
    _, steady_s = _call(compiled, xs[0], train, ctx.device)
    before = _counter('unique_graphs')
    _, second_size_s = _call(compiled, xs[1], train, ctx.device)
    recompiles = _counter('unique_graphs') - before
    _, third_s = _call(compiled, xs[1], train, ctx.device)
    finite = all(bool(torch.isfinite(p.grad).all()) for p in compiled_model.parameters() if p.grad is not None)
    rel = rel_diff(out, ref)
    row.update(graphs_compiled=graphs_first, recompiles_2nd_size=recompiles,
               recompile_reasons=' | '.join(dict.fromkeys(r.splitlines()[0][:160] for r in _guard_failures()))[:400],
               compile_s=first_s, second_size_s=second_size_s, eager_ms=eager_s * 1e3, compiled_ms=steady_s * 1e3,
               compiled_2nd_size_ms=third_s * 1e3, out_rel_diff=rel, grads_finite=finite if train else None,
               ok=rel <= (1e-2 if ctx.cuda else 1e-4) and finite and recompiles <= max(1, graphs_first))
    ctx.row('compile', **row)


def run(ctx: PartContext) -> None:
    backend = 'aot_eager' if ctx.dry_run else 'inductor'
    batch, sizes = (2, (32, 48)) if ctx.dry_run else (8, (224, 192))
    if ctx.dry_run:
        ctx.note('dry run: aot_eager for the models (same graphs and backward graphs, no code generation), '
                 f'batch {batch}, sizes {sizes}; inductor on one layer host below')
    ctx.note(f'sizes {sizes[0]} then {sizes[1]} px, batch {batch}; TF32 as PyTorch defaults')
    # the training steps first: the most telling runs come before the budget ends
    plan = [(name, build, mode) for mode in ('train step', 'eval forward') for name, build in _models(ctx.dry_run)]
    for name, build, mode in plan:
        if ctx.enough_time(15 if ctx.dry_run else 40, f'{name} {mode}'):
            _checked(ctx, name, build, mode, backend, batch, sizes)
    if ctx.dry_run and ctx.enough_time(10, 'inductor on a layer host'):
        from .hosts import build_host, layer_hosts
        host = layer_hosts(['DyConv2d'])[0]
        _checked(ctx, 'DyConv2d host', lambda: _Image(build_host(host)), 'train step', 'inductor', batch, (12, 16))
    rows = ctx.tables.get('compile', [])
    breaks = sum(r.get('graph_breaks') or 0 for r in rows)
    known = sorted({r['known_issue'] for r in rows if r.get('known_issue')})
    ctx.summary = (f'{len(rows)} compiled runs ({backend}): {breaks} graph breaks in all, recompiles at the 2nd size '
                   + ', '.join(f'{r["model"]} {r["mode"]}: {r.get("recompiles_2nd_size")}' for r in rows)
                   + ''.join(f'; known torch bug: {k}' for k in known))


def _checked(ctx: PartContext, name: str, build: Callable[[], nn.Module], mode: str, backend: str, batch: int,
             sizes: Tuple[int, int]) -> None:
    """:func:`_check`, with a failure recorded as a row (one model's failure is a finding; the others still
    run); a known failure of torch itself is recorded as such and the run repeated with its workaround."""
    try:
        _check(ctx, name, build, mode, backend, batch, sizes)
        return
    except Exception as err:
        error = _error_line(err)
        known = known_torch_bug(error)
        ctx.row('compile', model=name, mode=mode, backend=backend, ok=None if known else False, error=error,
                known_issue=known[0] if known else None)
    if known and ctx.enough_time(10, f'{name} {mode} with {known[1]}'):
        try:
            _check(ctx, name, build, mode, backend, batch, sizes, **known[1])
        except Exception as err:
            ctx.row('compile', model=name, mode=mode, backend=backend, ok=False, **known[1], error=_error_line(err))


def _error_line(err: Exception) -> str:
    return f'{type(err).__name__}: {err}'.splitlines()[0][:400]


class _Image(nn.Module):
    """A layer host fed from a 3-channel image (the models' input)."""

    def __init__(self, host: nn.Module) -> None:
        super().__init__()
        from .hosts import CHANNELS
        self.stem = nn.Conv2d(3, CHANNELS, 3, padding=1)
        self.host = host

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.host(self.stem(x))
