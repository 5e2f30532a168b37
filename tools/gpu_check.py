"""The GPU check: everything dynconv_mm needs to learn from one GPU, in one command of at most 10 minutes.

    python tools/gpu_check.py --out work_dirs/gpu_check            # on a machine with a CUDA GPU
    python tools/gpu_check.py --dry-run --out work_dirs/gpu_dry    # every part on the CPU, tiny sizes

Writes report.md and report.json (and one folder and log per part) into --out; exit code 0 when
every part passed (or was skipped), 1 otherwise, 2 for bad arguments or no GPU without --dry-run.
Parts: see --list and docs/benchmark.md ("GPU check").
"""
from __future__ import annotations

import argparse
import sys

from dynconv_mm.gpu_check import PARTS, TIME_LIMIT_S, run_check, select_parts


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--out', default='work_dirs/gpu_check', help='output directory')
    p.add_argument('--dry-run', action='store_true',
                   help='run every part on the CPU at tiny sizes, skipping only what needs CUDA')
    p.add_argument('--parts', nargs='+', default=None, metavar='PART', help='run only these parts (see --list)')
    p.add_argument('--device', default=None, help="CUDA device of a real run (default 'cuda')")
    p.add_argument('--time-limit', type=float, default=None,
                   help=f'seconds for the whole check (default {TIME_LIMIT_S:.0f} on a GPU, none in the dry run)')
    p.add_argument('--budget-scale', type=float, default=1.0, metavar='F',
                   help="every part's budget times F (a slower GPU; a dry run on a busy CPU); --time-limit still holds")
    p.add_argument('--list', action='store_true', help='list the parts with their budgets and exit')
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.list:
        for part in PARTS:
            print(f'{part.name:12s} {part.budget_s:4.0f} s on a GPU ({part.dry_budget_s:3.0f} s dry)  {part.measures}')
        return 0
    try:
        select_parts(args.parts)
        data = run_check(args.out, dry_run=args.dry_run, parts=args.parts, device=args.device,
                         time_limit=args.time_limit, budget_scale=args.budget_scale)
    except (ValueError, RuntimeError) as err:
        print(f'gpu_check: {err}', file=sys.stderr)
        return 2
    print(f'report: {args.out}/report.md ({data["seconds"]:.0f} s; '
          + ', '.join(f'{n} {s}' for s, n in data['counts'].items() if n) + ')')
    return 0 if data['ok'] else 1


if __name__ == '__main__':
    sys.exit(main())
