"""Benchmark dynconv_mm's dynamic and re-parameterized layers and backbones.

For every case: inference forward at the training batch size and at batch 1, a training step
(forward + backward) and peak memory, for our implementation, the official-style reference (same
weights) and the plain static-convolution twin; ratios from one run, medians over repeats, warm-up
excluded. Writes benchmark.md, benchmark.json and time_vs_batch.png into --out.

    python tools/benchmark/benchmark.py --quick --out work_dirs/bench_quick
    python tools/benchmark/benchmark.py --models layers kw1x-resnet50 --repeats 5 --out work_dirs/bench
"""
from __future__ import annotations

import argparse
import sys

from dynconv_mm.benchmark import BenchmarkOptions, get_cases, run_benchmark, write_reports


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--device', default='cpu', help="'cpu' or 'cuda' (default cpu)")
    p.add_argument('--quick', action='store_true', help='small sizes and batch 2, 2 repeats (smoke test)')
    p.add_argument('--models', nargs='*', default=None,
                   help="case names or fnmatch patterns; 'layers' / 'models' select a kind (default: all)")
    p.add_argument('--out', default='work_dirs/benchmark', help='output directory')
    p.add_argument('--repeats', type=int, default=None, help='timed runs per measurement (default 5, quick 2)')
    p.add_argument('--warmup', type=int, default=1, help='untimed runs before timing')
    p.add_argument('--min-time', type=float, default=None,
                   help='repeat a measurement until it adds up to this many seconds (default 1.0, quick 0)')
    p.add_argument('--train-batch', type=int, default=None, help='training batch size (default per case, 8)')
    p.add_argument('--size', type=int, default=None, help='input size of the model cases (default 128)')
    p.add_argument('--sweep', type=int, nargs='*', default=None,
                   help='batch sizes of the time-vs-batch plot (default 1 2 4 8; quick 1 2)')
    p.add_argument('--sweep-models', action='store_true', help='also sweep the model cases (slow)')
    p.add_argument('--compile', action='store_true', help='also time torch.compile(ours)')
    p.add_argument('--amp', action='store_true', help='also time ours under bf16 autocast')
    p.add_argument('--no-memory', action='store_true', help='skip peak-memory measurements')
    p.add_argument('--threads', type=int, default=None, help='torch.set_num_threads')
    p.add_argument('--malloc', choices=('default', 'keep'), default='default',
                   help="'keep': glibc keeps freed memory for reuse (no page faults on fresh allocations, "
                        "the best case for code that allocates kernels afresh); default: the C library's own "
                        'behaviour')
    p.add_argument('--list', action='store_true', help='list the cases and exit')
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device.startswith('cuda'):
        import torch
        if not torch.cuda.is_available():
            print('--device cuda: no CUDA device available', file=sys.stderr)
            return 2
    try:
        cases = get_cases(args.models)
    except ValueError as err:
        print(err, file=sys.stderr)
        return 2
    if args.list:
        for c in cases:
            print(f'{c.name:24s} {c.kind:6s} {c.note}')
        return 0
    sweep = args.sweep if args.sweep is not None else ([1, 2] if args.quick else [1, 2, 4, 8])
    options = BenchmarkOptions(device=args.device, quick=args.quick,
                               repeats=args.repeats or (2 if args.quick else 5), warmup=args.warmup,
                               min_time=args.min_time if args.min_time is not None else (0.0 if args.quick else 1.0),
                               train_batch=args.train_batch, size=args.size, compile=args.compile, amp=args.amp,
                               memory=not args.no_memory, sweep=tuple(sweep), sweep_models=args.sweep_models,
                               threads=args.threads, malloc=args.malloc)
    data = run_benchmark(cases, options, on_result=lambda partial: write_reports(partial, args.out))
    paths = write_reports(data, args.out)
    for kind, path in paths.items():
        print(f'{kind}: {path}')
    failed = [r['name'] for r in data['results'] if 'case' in r.get('errors', {})]
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
