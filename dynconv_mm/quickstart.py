"""The quick start: train and test a dynconv_mm model on a toy dataset in minutes, on any machine.

``bash tools/quickstart.sh`` (or ``python -m dynconv_mm.quickstart``) runs, from the checkout:

1. makes the toy dataset the config reads, if it is missing (:mod:`dynconv_mm.datasets.toy`);
2. trains the config with mmengine's ``Runner`` (progress in the log, checkpoint in the work dir);
3. tests the checkpoint with the config's evaluator (COCO bbox/segm mAP, mIoU or top-1) and draws the
   predictions with the task library's visualizer;
4. prints the metrics, the checkpoint and where the pictures are.

Every step is a function here (:func:`prepare_data`, :func:`train`, :func:`test`,
:func:`list_pictures`, :func:`run_quickstart`), so that other scripts and the tests use the same path.
The quick-start configs live in ``configs/_quickstart_``; they read the toy data from ``data/toy/...``
relative to the checkout, which :func:`set_data_root` moves elsewhere.
"""
from __future__ import annotations

import argparse
import copy
import glob
import json
import os
import os.path as osp
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

from mmengine.config import Config

from .apis import build_runner, detect_scope, enable_visualization, load_config

__all__ = ['DEFAULT_CONFIG', 'QUICKSTART_CONFIGS', 'DATASET_OF_SCOPE', 'KEY_METRICS', 'set_data_root',
           'set_max_iters', 'prepare_data', 'train', 'test', 'last_checkpoint', 'list_pictures', 'run_quickstart',
           'main']

#: The quick-start configs (relative to the checkout), by task.
QUICKSTART_CONFIGS = {
    'mmdet': 'configs/_quickstart_/mask-rcnn_kw1x-r18_fpn_toy-coco.py',
    'mmseg': 'configs/_quickstart_/upernet_dynamic-dwnet_toy-ade.py',
    'mmpretrain': 'configs/_quickstart_/kw1x-r18_toy-in6.py',
}
DEFAULT_CONFIG = QUICKSTART_CONFIGS['mmdet']
#: Toy dataset each task's quick-start config reads.
DATASET_OF_SCOPE = {'mmdet': 'coco', 'mmseg': 'ade', 'mmpretrain': 'imagenet'}
#: The metrics printed at the end, by task.
KEY_METRICS = {
    'mmdet': ('coco/bbox_mAP', 'coco/bbox_mAP_50', 'coco/segm_mAP', 'coco/segm_mAP_50'),
    'mmseg': ('mIoU', 'aAcc', 'mAcc'),
    'mmpretrain': ('accuracy/top1',),
}
_PICTURE_EXTS = ('.png', '.jpg', '.jpeg')


def _dataloaders(cfg: Config):
    for key in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        loader = cfg.get(key)
        if loader is not None and loader.get('dataset') is not None:
            yield loader


def _datasets(loader) -> list:
    """The dataset configs of a dataloader (a ``ConcatDataset``/``RepeatDataset`` holds several)."""
    out, todo = [], [loader['dataset']]
    while todo:
        ds = todo.pop()
        if 'datasets' in ds:
            todo.extend(ds['datasets'])
        elif 'dataset' in ds:
            todo.append(ds['dataset'])
        else:
            out.append(ds)
    return out


def set_data_root(cfg: Config, data_root: str) -> Config:
    """Point every dataset and evaluator ``ann_file`` of ``cfg`` at ``data_root`` (in place).

    The quick-start configs name their data root once (``data_root = 'data/toy/coco/'``), but mmengine
    resolves that variable at load time, so ``--cfg-options data_root=...`` alone would not move the
    dataloaders; this rewrites the resolved fields. Returns ``cfg``.
    """
    data_root = data_root.rstrip('/') + '/'
    old_roots = set()
    for loader in _dataloaders(cfg):
        for ds in _datasets(loader):
            if ds.get('data_root') is not None:
                old_roots.add(ds['data_root'])
            ds['data_root'] = data_root
    for key in ('val_evaluator', 'test_evaluator'):
        evaluators = cfg.get(key)
        if evaluators is None:
            continue
        for ev in evaluators if isinstance(evaluators, (list, tuple)) else [evaluators]:
            ann = ev.get('ann_file')
            if not ann:
                continue
            for old in sorted(old_roots, key=len, reverse=True):
                if ann.startswith(old):
                    ev['ann_file'] = data_root + ann[len(old):].lstrip('/')
                    break
            else:
                if not osp.isabs(ann):
                    ev['ann_file'] = osp.join(data_root, osp.basename(ann))
    cfg.data_root = data_root
    return cfg


def set_max_iters(cfg: Config, iters: int) -> Config:
    """Train for ``iters`` iterations (in place): loop length, checkpoint, and the schedules that ended at
    the old length (learning rate, temperature annealing) rescaled to the new one."""
    if iters < 1:
        raise ValueError(f'quickstart: iters must be a positive int, got {iters!r}')
    old = int(cfg.train_cfg.get('max_iters', iters))
    cfg.train_cfg['max_iters'] = iters
    cfg.train_cfg['val_interval'] = iters
    cfg.max_iters = iters
    ckpt = cfg.get('default_hooks', {}).get('checkpoint')
    if ckpt is not None:
        ckpt['interval'] = iters

    def scale(v):
        return max(1, int(round(v * iters / old)))

    schedulers = cfg.get('param_scheduler') or []
    for sch in schedulers if isinstance(schedulers, (list, tuple)) else [schedulers]:
        if sch.get('by_epoch', True):
            continue
        begin, end = int(sch.get('begin', 0)), int(sch.get('end', old))
        sch['begin'], sch['end'] = min(scale(begin), iters) if begin else 0, min(scale(end), iters)
        if sch['end'] <= sch['begin']:
            sch['end'] = sch['begin'] + 1
        if 'T_max' in sch:
            sch['T_max'] = sch['end'] - sch['begin']
    for hook in cfg.get('custom_hooks', []) or []:
        if hook.get('type') == 'TemperatureHook' and hook.get('num_iters') is not None:
            hook['num_iters'] = min(scale(int(hook['num_iters'])), iters)
    return cfg


def prepare_data(cfg: Config, toy_root: str = 'data/toy', num_train: Optional[int] = None,
                 num_val: Optional[int] = None, log=print) -> str:
    """Make the toy dataset ``cfg`` reads under ``toy_root`` unless it is already complete; point ``cfg``
    at it. Returns the dataset folder."""
    from .datasets.toy import is_complete, make_toy_datasets

    name = DATASET_OF_SCOPE[detect_scope(cfg)]
    folder = osp.join(toy_root, name)
    if is_complete(folder):
        log(f'quickstart: toy dataset {folder} is complete; not rebuilt')
    else:
        log(f'quickstart: making the toy dataset {folder} (a few seconds)')
        make_toy_datasets(toy_root, only=[name], num_train=num_train, num_val=num_val, log=log)
    set_data_root(cfg, folder)
    return folder


def _fresh_names(cfg: Config, tag: str) -> None:
    """Unique experiment and visualizer names: mmengine keeps one message hub and one visualizer per name
    in a process, so a test runner built after a training runner would otherwise reuse the training
    visualizer (and draw into the training run's folder)."""
    stem = osp.splitext(osp.basename(cfg.filename or 'config'))[0]
    cfg.experiment_name = f'{stem}_{tag}_{time.strftime("%Y%m%d_%H%M%S")}_{os.getpid()}_{id(cfg) % 100000}'
    if cfg.get('visualizer') is not None:
        cfg.visualizer['name'] = cfg.experiment_name


def train(cfg: Config, work_dir: str, launcher: str = 'none', resume: Optional[str] = None) -> str:
    """Train ``cfg`` with mmengine's ``Runner`` into ``work_dir``; returns the last checkpoint's path."""
    cfg = copy.deepcopy(cfg)
    _fresh_names(cfg, 'train')
    runner = build_runner(cfg, work_dir=work_dir, launcher=launcher, resume=resume)
    runner.train()
    return last_checkpoint(work_dir)


def last_checkpoint(work_dir: str) -> str:
    """The checkpoint mmengine saved last in ``work_dir`` (its ``last_checkpoint`` record)."""
    record = osp.join(work_dir, 'last_checkpoint')
    if not osp.isfile(record):
        raise FileNotFoundError(f'quickstart: no checkpoint was saved in {work_dir} (no {record})')
    with open(record) as f:
        path = f.read().strip()
    return path if osp.isabs(path) else osp.join(work_dir, path)


def test(cfg: Config, checkpoint: str, work_dir: str, show_dir: Optional[str] = None) -> Dict[str, Any]:
    """Test ``checkpoint`` with the evaluator of ``cfg``; draw predictions into ``show_dir`` when given.

    Returns the metrics dict of ``Runner.test()`` (e.g. ``coco/bbox_mAP``, ``mIoU``, ``accuracy/top1``).
    """
    cfg = copy.deepcopy(cfg)
    if show_dir is not None:
        enable_visualization(cfg, osp.abspath(show_dir))
    _fresh_names(cfg, 'test')
    runner = build_runner(cfg, work_dir=work_dir, load_from=checkpoint)
    metrics = runner.test()
    return dict(metrics or {})


def list_pictures(folder: str) -> List[str]:
    """Image files under ``folder`` (recursively), sorted."""
    found = []
    for ext in _PICTURE_EXTS:
        found += glob.glob(osp.join(folder, '**', f'*{ext}'), recursive=True)
    return sorted(found)


def _format_metrics(scope: str, metrics: Dict[str, Any]) -> List[str]:
    lines = []
    for key in KEY_METRICS[scope]:
        if key in metrics:
            lines.append(f'  {key:<20s} {float(metrics[key]):.4f}')
    return lines


def run_quickstart(config: str = DEFAULT_CONFIG, work_dir: Optional[str] = None, iters: Optional[int] = None,
                   skip_data: bool = False, toy_root: str = 'data/toy', show: bool = True,
                   cfg_options: Optional[dict] = None, log=print) -> Dict[str, Any]:
    """Data (unless ``skip_data``), training, test and pictures for one quick-start config.

    Returns ``dict(metrics=..., checkpoint=..., pictures=[...], show_dir=..., work_dir=..., seconds=...)``;
    the same summary is written to ``work_dir/quickstart_summary.json``.
    """
    t0 = time.time()
    cfg = load_config(config, cfg_options)
    scope = detect_scope(cfg)
    if work_dir is None:
        work_dir = osp.join('work_dirs', 'quickstart', osp.splitext(osp.basename(config))[0])
    work_dir = osp.abspath(work_dir)
    if skip_data:
        set_data_root(cfg, osp.join(toy_root, DATASET_OF_SCOPE[scope]))
    else:
        prepare_data(cfg, toy_root, log=log)
    if iters is not None:
        set_max_iters(cfg, iters)
    checkpoint = train(cfg, work_dir)
    t_train = time.time() - t0
    show_dir = osp.join(work_dir, 'predictions') if show else None
    metrics = test(cfg, checkpoint, work_dir, show_dir)
    pictures = list_pictures(show_dir) if show_dir else []
    summary = dict(config=config, scope=scope, metrics={k: float(v) for k, v in metrics.items()
                                                        if isinstance(v, (int, float))},
                   checkpoint=checkpoint, work_dir=work_dir, show_dir=show_dir, pictures=pictures,
                   train_seconds=round(t_train, 1), seconds=round(time.time() - t0, 1))
    with open(osp.join(work_dir, 'quickstart_summary.json'), 'w') as f:
        json.dump(summary, f, indent=2)
    lines = ['', '=' * 72, f'quickstart: {config}', f'  trained {cfg.train_cfg.max_iters} iterations '
             f'in {t_train / 60:.1f} min (total {summary["seconds"] / 60:.1f} min)']
    lines += _format_metrics(scope, metrics)
    lines.append(f'  checkpoint: {checkpoint}')
    if show_dir:
        lines.append(f'  {len(pictures)} pictures of predictions in {show_dir}')
        lines += [f'    e.g. {p}' for p in pictures[:3]]
    lines.append('=' * 72)
    log('\n'.join(lines))
    return summary


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    from mmengine.config import DictAction

    p = argparse.ArgumentParser(description='Train and test a dynconv_mm quick-start config on toy data.')
    p.add_argument('--config', default=DEFAULT_CONFIG, help=f'quick-start config (default: {DEFAULT_CONFIG})')
    p.add_argument('--iters', type=int, help="training iterations (default: the config's)")
    p.add_argument('--work-dir', help='default: work_dirs/quickstart/<config name>')
    p.add_argument('--skip-data', action='store_true', help='do not check or make the toy data')
    p.add_argument('--toy-root', default='data/toy', help='parent folder of the toy datasets')
    p.add_argument('--no-show', action='store_true', help='do not draw the test predictions')
    p.add_argument('--cfg-options', nargs='+', action=DictAction, help='override config entries, key=value')
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    run_quickstart(args.config, work_dir=args.work_dir, iters=args.iters, skip_data=args.skip_data,
                   toy_root=args.toy_root, show=not args.no_show, cfg_options=args.cfg_options)
    return 0


if __name__ == '__main__':
    sys.exit(main())
