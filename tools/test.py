"""Test a checkpoint with an mmpretrain, mmdet or mmseg config (COCO bbox/segm mAP, mIoU, top-1, ...).

    python tools/test.py CONFIG CHECKPOINT [--work-dir DIR] [--show-dir DIR] [--cfg-options k=v ...]
"""
import argparse
import sys

from mmengine.config import DictAction

import dynconv_mm  # noqa: F401
from dynconv_mm.apis import build_runner, enable_visualization, load_config
from dynconv_mm.utils.cli import description


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=description(__doc__))
    p.add_argument('config', help='config file')
    p.add_argument('checkpoint', help='checkpoint file')
    p.add_argument('--work-dir', help='where logs and results go')
    p.add_argument('--show-dir', help='save pictures of the predictions into this folder (inside the work dir)')
    p.add_argument('--device', help="'cpu', 'cuda' or 'cuda:N' (default: cuda when available)")
    p.add_argument('--cfg-options', nargs='+', action=DictAction, help='override config entries, key=value')
    p.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'], default='none')
    p.add_argument('--local_rank', '--local-rank', type=int, default=0)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    cfg = load_config(args.config, args.cfg_options)
    if args.show_dir:
        enable_visualization(cfg, args.show_dir)
    runner = build_runner(cfg, work_dir=args.work_dir, device=args.device, launcher=args.launcher,
                          load_from=args.checkpoint)
    metrics = runner.test()
    return 0 if metrics is not None else 1


if __name__ == '__main__':
    sys.exit(main())
