"""Train a dynconv_mm model with an mmpretrain, mmdet or mmseg config (the scope is read from it).

    python tools/train.py CONFIG [--work-dir DIR] [--resume [CKPT]] [--amp] [--cfg-options k=v ...]
    bash tools/dist_train.sh CONFIG NUM_PROCS [args]     # torchrun; gloo on the CPU, NCCL on GPUs
"""
import argparse
import sys

from mmengine.config import DictAction

import dynconv_mm  # noqa: F401  (registers layers, backbones, hooks)
from dynconv_mm.apis import build_runner, load_config
from dynconv_mm.utils.cli import description


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=description(__doc__))
    p.add_argument('config', help='config file')
    p.add_argument('--work-dir', help='where logs and checkpoints go')
    p.add_argument('--resume', nargs='?', const='auto', default=None,
                   help='resume from CKPT, or from the latest checkpoint in the work dir if none is given')
    p.add_argument('--amp', action='store_true', help='mixed precision training')
    p.add_argument('--device', help="'cpu', 'cuda' or 'cuda:N' (default: cuda when available); on the CPU SyncBN "
                        'becomes BN and distributed runs use gloo')
    p.add_argument('--cfg-options', nargs='+', action=DictAction, help='override config entries, key=value')
    p.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'], default='none')
    p.add_argument('--local_rank', '--local-rank', type=int, default=0)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    cfg = load_config(args.config, args.cfg_options)
    runner = build_runner(cfg, work_dir=args.work_dir, device=args.device, launcher=args.launcher,
                          resume=args.resume, amp=args.amp)
    runner.train()


if __name__ == '__main__':
    sys.exit(main())
