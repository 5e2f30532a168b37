"""Benchmark reports: a Markdown table, a JSON file and a PNG plot of time against batch size."""
from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional

__all__ = ['markdown_report', 'write_reports', 'plot_sweep']

_MODES = (('train', 'train step'), ('fwd', 'fwd'), ('fwd1', 'fwd bs1'))


def _ms(v: Optional[float]) -> str:
    return '-' if v is None else f'{v * 1e3:.1f}'


def _x(v: Optional[float]) -> str:
    return '-' if v is None else f'{v:.2f}x'


def _mb(v: Optional[int]) -> str:
    return '-' if v is None else f'{v / 2**20:.0f}'


def markdown_report(data: Dict[str, Any]) -> str:
    """The whole report as Markdown (environment, one timing table, one floor table, errors)."""
    env, opts, results = data['environment'], data['options'], data['results']
    lines: List[str] = ['## Conditions', '']
    lines.append(', '.join(f'{k}: {v}' for k, v in env.items()))
    lines.append('')
    lines.append(', '.join(f'{k}={v}' for k, v in opts.items()))
    lines += ['', '## Ratios', '',
              '`ours/twin`: time against the static twin (lower is better); `ref/ours`: speed-up over the '
              'official-style reference with the same weights (higher is better); `diff`: max |ours - ref| / '
              'max |ref| of an eval forward. `train`: training step at batch B; `fwd`: inference at batch B; '
              '`bs1`: inference at batch 1.', '']
    head = ['case', 'size', 'B']
    for _, label in _MODES:
        short = label.replace('train step', 'train').replace('fwd bs1', 'bs1')
        head += [f'{short} ours/twin', f'{short} ref/ours']
    head += ['diff']
    lines.append('| ' + ' | '.join(head) + ' |')
    lines.append('|' + '---|' * len(head))
    for r in results:
        if 'times' not in r:
            lines.append(f"| {r['name']} | failed: {r.get('errors', {}).get('case', '')} |")
            continue
        row = [r['name'], str(r['size']), str(r['train_batch'])]
        for mode, _ in _MODES:
            row += [_x(r['ratios'].get('ours/twin', {}).get(mode)), _x(r['ratios'].get('reference/ours', {}).get(mode))]
        row.append('-' if r.get('max_rel_diff') is None else f"{r['max_rel_diff']:.1e}")
        lines.append('| ' + ' | '.join(row) + ' |')
    lines += ['', '## Times (median ms) and peak memory (MiB)', '',
              'Memory: extra resident memory of one training step / one batch-1 forward.', '']
    head = ['case', 'variant'] + [label for _, label in _MODES] + ['mem train', 'mem bs1']
    lines.append('| ' + ' | '.join(head) + ' |')
    lines.append('|' + '---|' * len(head))
    for r in results:
        if 'times' not in r:
            continue
        for variant, times in r['times'].items():
            mem = r.get('memory', {}).get(variant, {})
            lines.append('| ' + ' | '.join([r['name'], variant] + [_ms(times.get(m)) for m, _ in _MODES]
                                           + [_mb(mem.get('train')), _mb(mem.get('fwd1'))]) + ' |')
    lines += ['', '## Distance from the floor', '',
              '`MACs`: per-sample GMACs of convolution and of kernel assembly/mixing; `arith. floor`: '
              '(conv + assembly MACs) / conv MACs; `fwd/arith`: measured fwd ours/twin over that floor; '
              '`fwd/floor`, `train/floor`: time over (twin time + time of the bare assembly products of the '
              'same shapes); `warehouse MB`: warehouse bytes the KW layers read per forward (each reads its '
              'whole warehouse); `bs1/bw floor`, `fwd/bw floor`: time over (twin time + reading those bytes '
              'at the measured read bandwidth); GMAC/s achieved by the KW layers in kernel assembly and in '
              'their convolutions (fwd, training batch).', '']
    lines.append('| case | conv GMACs | assembly GMACs | arith. floor | fwd/arith | fwd/floor | train/floor | '
                 'warehouse MB | bs1/bw floor | fwd/bw floor | assembly GMAC/s | KW conv GMAC/s |')
    lines.append('|---|---|---|---|---|---|---|---|---|---|---|---|')
    bandwidths = set()
    for r in results:
        if 'macs' not in r or not r['macs']:
            continue
        m, f = r['macs'], r['floor']
        if f.get('read_gbps'):
            bandwidths.add(round(f['read_gbps'], 1))

        def g(key, fmt='{:.2f}'):
            return '-' if f.get(key) is None else fmt.format(f[key])
        lines.append(f"| {r['name']} | {m['conv'] / 1e9:.3f} | {m['assembly'] / 1e9:.3f} | "
                     f"{g('arithmetic_ratio')} | {g('fwd_vs_arithmetic')} | {g('fwd_vs_floor')} | "
                     f"{g('train_vs_floor')} | {g('warehouse_mb', '{:.1f}')} | {g('fwd1_vs_bw_floor')} | "
                     f"{g('fwd_vs_bw_floor')} | {g('assembly_gmacs', '{:.1f}')} | {g('kw_conv_gmacs', '{:.1f}')} |")
    if bandwidths:
        lines += ['', 'Measured read bandwidth: ' + ', '.join(f'{b} GB/s' for b in sorted(bandwidths)) + '.']
    errors = [(r['name'], k, v) for r in results for k, v in r.get('errors', {}).items()]
    if errors:
        lines += ['', '## Errors', '']
        lines += [f'- {n} {k}: {v}' for n, k, v in errors]
    return '\n'.join(lines) + '\n'


def plot_sweep(data: Dict[str, Any], path: str) -> Optional[str]:
    """PNG of inference time against batch size (one panel per case with a sweep); ``None`` if there
    is nothing to plot."""
    cases = [r for r in data['results'] if r.get('sweep')]
    if not cases:
        return None
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    cols = min(4, len(cases))
    rows = (len(cases) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.2 * rows), squeeze=False)
    for ax, r in zip(axes.flat, cases):
        for variant, series in r['sweep'].items():
            bs = sorted(series, key=int)
            ax.plot([int(b) for b in bs], [series[b] * 1e3 for b in bs], marker='o', label=variant)
        ax.set_title(r['name'], fontsize=9)
        ax.set_xlabel('batch size')
        ax.set_ylabel('fwd ms (median)')
        ax.set_xscale('log', base=2)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(cases):]:
        ax.axis('off')
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_reports(data: Dict[str, Any], out_dir: str) -> Dict[str, str]:
    """Write ``benchmark.json``, ``benchmark.md`` and (with a sweep) ``time_vs_batch.png`` into ``out_dir``."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {'json': os.path.join(out_dir, 'benchmark.json'), 'markdown': os.path.join(out_dir, 'benchmark.md')}
    with open(paths['json'], 'w') as f:
        json.dump(data, f, indent=1)
    with open(paths['markdown'], 'w') as f:
        f.write(markdown_report(data))
    png = plot_sweep(data, os.path.join(out_dir, 'time_vs_batch.png'))
    if png:
        paths['plot'] = png
    return paths
