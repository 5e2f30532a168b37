"""Part ``microbench``: which ``batched_conv`` form is fastest on the device, i.e. what ``'auto'`` should pick.

Per-sample kernels of the shapes the published models use (a ResNet-50 stage-3 1x1, a stage-2 3x3, a
last-stage 512-channel 3x3 on 7x7, the DWNet-T 7x7 depth-wise), at batch 32 and 64, in float32 with
TF32 off and on and in float16, with ``cudnn.benchmark`` off and on: the inference forward and the
training step (forward + backward to the input and the kernels) of every applicable form (grouped,
matmul for point-wise kernels, unfold), median time and the step's peak memory. The table
``recommendation`` names the fastest form per kernel and setting next to what ``'auto'`` picks now.
"""
from __future__ import annotations

import itertools
from typing import Any, Dict, List, Tuple

import torch

from .core import PartContext
from .precision import tf32

#: (name, channels in, channels out, kernel, spatial size, groups)
KERNELS: List[Tuple[str, int, int, int, int, int]] = [
    ('1x1 256->1024 @14', 256, 1024, 1, 14, 1),
    ('3x3 128 @28', 128, 128, 3, 28, 1),
    ('3x3 512 @7', 512, 512, 3, 7, 1),
    ('7x7 dw 192 @14', 192, 192, 7, 14, 192),
]
#: dry run: the same kinds of kernels, 8x fewer channels and half the size
DRY_KERNELS = [(n, max(ci // 8, 1), max(co // 8, 1), k, max(s // 2, 4), max(g // 8, 1))
               for n, ci, co, k, s, g in KERNELS]
PRECISIONS = ('fp32', 'tf32', 'fp16')


def _impls(k: int) -> List[str]:
    return ['grouped', 'matmul', 'unfold'] if k == 1 else ['grouped', 'unfold']


def _inputs(cin: int, cout: int, k: int, size: int, groups: int, batch: int, device: str, dtype: torch.dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, cin, size, size, generator=g).to(device, dtype)
    w = (torch.randn(batch, cout, cin // groups, k, k, generator=g) / (cin // groups * k * k) ** 0.5).to(device, dtype)
    return x, w


def _fns(impl: str, x: torch.Tensor, w: torch.Tensor, k: int, groups: int):
    from ..layers.batched import batched_conv
    xg, wg = x.detach().clone().requires_grad_(True), w.detach().clone().requires_grad_(True)

    def fwd():
        with torch.no_grad():
            return batched_conv(x, w, None, 1, k // 2, 1, groups, impl=impl)

    def train():
        xg.grad = wg.grad = None
        out = batched_conv(xg, wg, None, 1, k // 2, 1, groups, impl=impl)
        out.backward(torch.ones_like(out))
    return fwd, train


def _auto_pick(x: torch.Tensor, w: torch.Tensor, k: int, groups: int) -> str:
    from ..layers.batched import resolve_impl
    size = x.shape[-1]
    return resolve_impl('auto', x, x.shape[0], 2, (k, k), (k // 2, k // 2), tuple(w.shape[1:]), size * size, groups)


def run(ctx: PartContext) -> None:
    from ..benchmark.timing import measure_peak_memory, measure_time
    kernels = DRY_KERNELS if ctx.dry_run else KERNELS
    batches = (2, 4) if ctx.dry_run else (32, 64)
    precisions = PRECISIONS if ctx.cuda else ('fp32', 'fp16')
    benchmarks = (False, True) if ctx.cuda else (False,)
    warmup, repeats = (1, 2) if ctx.dry_run else (3, 10)
    if not ctx.cuda:
        ctx.cuda_only('TF32 rows and cudnn.benchmark on (CUDA settings)')
        ctx.note(f'dry run: channels / 8, sizes / 2, batch {batches}; CPU float16 convolutions')
    saved_benchmark = torch.backends.cudnn.benchmark
    try:
        # the settings that matter most first, so that a run stopped at its budget has them
        for precision, bench, (name, cin, cout, k, size, groups), batch in itertools.product(
                precisions[::-1], benchmarks[::-1], kernels, batches[::-1]):
            if not ctx.enough_time(3 if not ctx.dry_run else 1, f'{name} batch {batch} {precision} '
                                                                 f'cudnn.benchmark={bench}'):
                return
            torch.backends.cudnn.benchmark = bench
            dtype = torch.float16 if precision == 'fp16' else torch.float32
            x, w = _inputs(cin, cout, k, size, groups, batch, ctx.device, dtype)
            auto = _auto_pick(x, w, k, groups)
            for impl in _impls(k):
                row: Dict[str, Any] = dict(kernel=name, batch=batch, precision=precision, cudnn_benchmark=bench,
                                           impl=impl, auto_picks=auto)
                fwd, train = _fns(impl, x, w, k, groups)
                try:
                    with tf32(precision == 'tf32'):
                        row['fwd_ms'] = measure_time(fwd, ctx.device, warmup, repeats).median * 1e3
                        row['train_ms'] = measure_time(train, ctx.device, warmup, repeats).median * 1e3
                        mem = measure_peak_memory(train, ctx.device)
                        row['train_peak_mib'] = None if mem is None else mem / 2 ** 20
                except Exception as err:  # e.g. a form without kernels for this dtype
                    row['error'] = f'{type(err).__name__}: {err}'[:200]
                ctx.row('timings', **row)
            del x, w
    finally:
        torch.backends.cudnn.benchmark = saved_benchmark
        _recommend(ctx)


def _recommend(ctx: PartContext) -> None:
    rows = [r for r in ctx.tables.get('timings', []) if 'train_ms' in r]
    groups: Dict[tuple, List[Dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r['kernel'], r['batch'], r['precision'], r['cudnn_benchmark']), []).append(r)
    picks: Dict[str, Dict[str, int]] = {}
    for (kernel, batch, precision, bench), rs in groups.items():
        best_train = min(rs, key=lambda r: r['train_ms'])
        best_fwd = min(rs, key=lambda r: r['fwd_ms'])
        auto = rs[0]['auto_picks']
        auto_row = next((r for r in rs if r['impl'] == auto), None)
        ctx.row('recommendation', kernel=kernel, batch=batch, precision=precision, cudnn_benchmark=bench,
                fastest_train=best_train['impl'], fastest_fwd=best_fwd['impl'], auto_picks=auto,
                auto_train_vs_best=None if auto_row is None else auto_row['train_ms'] / best_train['train_ms'],
                auto_fwd_vs_best=None if auto_row is None else auto_row['fwd_ms'] / best_fwd['fwd_ms'])
        votes = picks.setdefault(kernel, {})
        votes[best_train['impl']] = votes.get(best_train['impl'], 0) + 1
    choice = {kernel: max(v, key=v.get) for kernel, v in picks.items()}
    ctx.finding('fastest_train_impl_by_kernel', choice)
    ctx.summary = ('fastest training form by kernel (majority over batch, precision, cudnn.benchmark): '
                   + ', '.join(f'{k}: {v}' for k, v in choice.items()) if choice else 'no timings')
