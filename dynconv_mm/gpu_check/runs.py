"""Parts ``benchmark`` and ``ddp``: the project's own tools, run as a user runs them.

``benchmark``: ``tools/benchmark/benchmark.py --device cuda --train-batch 64 --size 224 --amp`` for
KW-ResNet-50 1x and 4x, dynamic DWNet-T and every layer case, against the official-style reference
and the static twin (the tool writes its report after every case, so a run stopped at the budget
keeps the cases it finished).

``ddp``: a one-process ``torchrun`` of ``tools/train.py --launcher pytorch`` for the classifier
quick-start config (KernelWarehouse, shared warehouses) and a PEDConv config (auxiliary loss) on the
toy ImageNet-style set: NCCL, mmengine's ``MMDistributedDataParallel`` with
``find_unused_parameters=False`` (so a parameter without a gradient would fail the second iteration),
three iterations. A probe hook (:mod:`.ddp_probe`) records the backend, the wrapper and the losses.
In the dry run the same command runs with ``--device cpu`` (gloo, the CPU wrapper).
"""
from __future__ import annotations

import json
import os
import os.path as osp
import socket
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional

from .core import PartContext

BENCH_MODELS = ['kw1x-resnet50', 'kw4x-resnet50', 'dynamic-dwnet-t', 'layers']
DRY_BENCH_MODELS = ['DyConv2d', 'dynamic-dwnet-t']


def repo_root() -> str:
    return osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))


def _env() -> Dict[str, str]:
    env = dict(os.environ)
    env['PYTHONPATH'] = os.pathsep.join(p for p in (repo_root(), env.get('PYTHONPATH', '')) if p)
    bindir = osp.dirname(sys.executable)
    env['PATH'] = bindir + os.pathsep + env.get('PATH', '')
    return env


def _run(cmd: List[str], log_path: str, timeout: float, env: Optional[Dict[str, str]] = None,
         cwd: Optional[str] = None):
    """Run ``cmd`` with its output in ``log_path``; ``(return code or None on timeout, seconds)``."""
    t0 = time.monotonic()
    with open(log_path, 'w') as log:
        log.write(' '.join(cmd) + '\n\n')
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env or _env(), cwd=cwd,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=max(timeout, 1))
        except subprocess.TimeoutExpired:
            import signal
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = None
    return rc, time.monotonic() - t0


def _tail(path: str, chars: int = 1500) -> str:
    with open(path, errors='replace') as f:
        return f.read()[-chars:]


# ------------------------------------------------------------------------------------------ benchmark
def benchmark_command(device: str, dry_run: bool, out: str) -> List[str]:
    tool = osp.join(repo_root(), 'tools', 'benchmark', 'benchmark.py')
    if dry_run:
        args = ['--device', 'cpu', '--quick', '--train-batch', '2', '--amp', '--models', *DRY_BENCH_MODELS]
    else:
        args = ['--device', device, '--train-batch', '64', '--size', '224', '--amp', '--models', *BENCH_MODELS]
    # three timed runs per measurement and no batch sweep: the numbers of one pass fit the budget
    return [sys.executable, tool, *args, '--repeats', '1' if dry_run else '3', '--min-time', '0', '--sweep',
            '--out', out]


def _ms(times: Dict[str, Dict[str, float]], variant: str, mode: str) -> Optional[float]:
    v = times.get(variant, {}).get(mode)
    return None if v is None else v * 1e3


def run_benchmark(ctx: PartContext) -> None:
    out = osp.join(ctx.out_dir, 'benchmark')
    cmd = benchmark_command(ctx.device, ctx.dry_run, out)
    if ctx.dry_run:
        ctx.note('dry run: --device cpu --quick --train-batch 2 on ' + ', '.join(DRY_BENCH_MODELS)
                 + f' instead of {", ".join(BENCH_MODELS)} at batch 64, 224 px')
    ctx.finding('command', ' '.join(cmd[1:]))
    rc, seconds = _run(cmd, osp.join(ctx.out_dir, 'benchmark.log'), ctx.time_left() - 5)
    path = osp.join(out, 'benchmark.json')
    if not osp.exists(path):
        ctx.row('run', ok=False, detail=f'no benchmark.json (exit code {rc}): ' + _tail(osp.join(ctx.out_dir,
                                                                                              'benchmark.log')))
        return
    with open(path) as f:
        data = json.load(f)
    for r in data['results']:
        errors = r.get('errors', {})
        if 'times' not in r:
            ctx.row('cases', case=r['name'], ok=False, error=errors.get('case', '')[:300])
            continue
        t = r['times']
        ratios = r.get('ratios', {})
        mem = r.get('memory', {}).get('ours', {})
        ctx.row('cases', case=r['name'], size=r['size'], batch=r['train_batch'],
                ours_train_ms=_ms(t, 'ours', 'train'), ours_fwd_ms=_ms(t, 'ours', 'fwd'),
                ours_fwd1_ms=_ms(t, 'ours', 'fwd1'), bf16_train_ms=_ms(t, 'ours+bf16', 'train'),
                train_vs_twin=ratios.get('ours/twin', {}).get('train'),
                fwd_vs_twin=ratios.get('ours/twin', {}).get('fwd'),
                ref_vs_ours_train=ratios.get('reference/ours', {}).get('train'),
                train_peak_mib=None if mem.get('train') is None else mem['train'] / 2 ** 20,
                max_rel_diff=r.get('max_rel_diff'),
                variant_errors='; '.join(f'{k}: {v}' for k, v in errors.items())[:300],
                ok=r.get('max_rel_diff') is None or r['max_rel_diff'] <= 1e-3)
    wanted = DRY_BENCH_MODELS if ctx.dry_run else BENCH_MODELS
    done = len(data['results'])
    if rc is None:
        ctx.skip('the remaining benchmark cases', f'stopped at the budget after {done} cases ({seconds:.0f} s)')
    elif rc not in (0, 1):
        ctx.row('run', ok=False, detail=f'benchmark exited with {rc}: ' + _tail(osp.join(ctx.out_dir, 'benchmark.log')))
    ctx.finding('report', osp.relpath(osp.join(out, 'benchmark.md'), osp.dirname(ctx.out_dir)))
    ctx.summary = f'{done} cases ({", ".join(wanted)}) in {seconds:.0f} s; report {ctx.findings["report"]}'


# ------------------------------------------------------------------------------------------ ddp
DDP_CONFIGS = [
    ('quick-start KW ResNet-18', 'configs/_quickstart_/kw1x-r18_toy-in6.py'),
    ('PEDConv ResNet-18', 'configs/pedconv/pedconv-resnet18_8xb64_in1k.py'),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def ddp_config(config: str, data_root: str, work_dir: str, batch: int, iters: int) -> str:
    """``config`` cut to ``iters`` iterations on the toy ImageNet-style set with the probe hook; the
    path of the dumped config."""
    from .. import quickstart as qs
    from ..apis import load_config

    cfg = load_config(osp.join(repo_root(), config))
    qs.set_data_root(cfg, data_root)
    loader = cfg.train_dataloader
    loader.update(batch_size=batch, num_workers=0, persistent_workers=False)
    loader.dataset.update(ann_file='meta/train.txt', data_prefix='train')
    loader.dataset.pop('split', None)
    if cfg.train_cfg.get('by_epoch', False) or 'max_epochs' in cfg.train_cfg:
        cfg.train_cfg = dict(by_epoch=False, max_iters=iters)
        loader.sampler = dict(type='InfiniteSampler', shuffle=True)
        cfg.param_scheduler = []
    else:
        qs.set_max_iters(cfg, iters)
        cfg.train_cfg = dict(by_epoch=False, max_iters=iters)
    for key in ('val_dataloader', 'val_cfg', 'val_evaluator', 'test_dataloader', 'test_cfg', 'test_evaluator'):
        cfg[key] = None  # training only
    cfg.default_hooks.checkpoint = None
    cfg.default_hooks.logger = dict(type='LoggerHook', interval=1)
    cfg.custom_imports = dict(imports=list(cfg.custom_imports['imports']) + ['dynconv_mm.gpu_check.ddp_probe'],
                              allow_failed_imports=False)
    cfg.custom_hooks = list(cfg.get('custom_hooks', [])) + [dict(type='DDPProbeHook',
                                                                 out_file=osp.join(work_dir, 'probe.json'))]
    os.makedirs(work_dir, exist_ok=True)
    path = osp.join(work_dir, 'ddp_config.py')
    cfg.dump(path)
    return path


def run_ddp(ctx: PartContext) -> None:
    from ..datasets.toy import make_toy_datasets

    batch, iters = (2, 3) if ctx.dry_run else (8, 3)
    toy = osp.join(ctx.out_dir, 'toy')
    make_toy_datasets(toy, only=['imagenet'], num_train=2 if ctx.dry_run else 4, num_val=1, log=lambda *a: None)
    device_args = ['--device', 'cpu'] if ctx.dry_run else []
    expect = ('gloo', 'CPUDistributedDataParallel') if ctx.dry_run else ('nccl', 'MMDistributedDataParallel')
    if ctx.dry_run:
        ctx.note('dry run: --device cpu, so gloo and the CPU DDP wrapper instead of NCCL and MMDistributedDataParallel')
    for label, config in DDP_CONFIGS:
        if not ctx.enough_time(20, label):
            break
        work = osp.join(ctx.out_dir, osp.splitext(osp.basename(config))[0])
        path = ddp_config(config, osp.join(toy, 'imagenet'), work, batch, iters)
        cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=1', f'--master_port={_free_port()}',
               osp.join(repo_root(), 'tools', 'train.py'), path, '--launcher', 'pytorch', '--work-dir', work,
               *device_args]
        log = osp.join(work, 'torchrun.log')
        rc, seconds = _run(cmd, log, ctx.time_left() - 5, cwd=work)
        probe: Dict[str, Any] = {}
        if osp.exists(osp.join(work, 'probe.json')):
            with open(osp.join(work, 'probe.json')) as f:
                probe = json.load(f)
        text = _tail(log, 200000)
        unused = 'find_unused_parameters' in text and 'Expected to have finished reduction' in text
        ok = (rc == 0 and probe.get('backend') == expect[0] and probe.get('wrapper') == expect[1]
              and probe.get('iters') == iters and not unused and probe.get('find_unused_parameters') is False)
        ctx.row('runs', config=label, exit_code=rc, seconds=seconds, backend=probe.get('backend'),
                wrapper=probe.get('wrapper'), find_unused_parameters=probe.get('find_unused_parameters'),
                world_size=probe.get('world_size'), param_device=probe.get('param_device'), iters=probe.get('iters'),
                last_loss=probe.get('last_loss'), unused_parameter_error=unused, ok=ok,
                detail='' if ok else _tail(log, 600))
    rows = ctx.tables.get('runs', [])
    ctx.summary = (f'{sum(r["ok"] for r in rows)} of {len(rows)} torchrun runs trained {iters} iterations with '
                   f'{expect[0]} and {expect[1]}')
