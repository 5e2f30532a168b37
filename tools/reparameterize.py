"""Fold a trained re-parameterized model (DO-Conv, OREPA, DBB, RepVGG layers or backbones) into plain
convolutions for deployment, after checking that the folded model computes the same outputs.

    python tools/reparameterize.py CONFIG CHECKPOINT OUT_CHECKPOINT [--out-config OUT_CONFIG]
                                   [--no-check] [--rtol 1e-4] [--input-size 224 224]

Nothing is written when the model has nothing to fold, the checkpoint does not match the config,
or the folded model disagrees with the training-time one beyond --rtol.
"""
import argparse
import sys

from mmengine.config import DictAction

from dynconv_mm.deploy import ReparamError, reparameterize_checkpoint
from dynconv_mm.utils.cli import description


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=description(__doc__))
    p.add_argument('config', help='training-time config')
    p.add_argument('checkpoint', help='training-time checkpoint of that config')
    p.add_argument('out_checkpoint', help='where to write the deploy checkpoint')
    p.add_argument('--out-config', help='also write a config that builds the deployed (plain) model')
    p.add_argument('--no-check', action='store_true', help='skip the output comparison (experts only)')
    p.add_argument('--rtol', type=float, default=1e-4, help='largest accepted relative output difference')
    p.add_argument('--input-size', type=int, nargs=2, default=[224, 224], metavar=('H', 'W'))
    p.add_argument('--cfg-options', nargs='+', action=DictAction, help='override config entries, key=value')
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        rep = reparameterize_checkpoint(args.config, args.checkpoint, args.out_checkpoint, args.out_config,
                                        check=not args.no_check, rtol=args.rtol,
                                        input_size=tuple(args.input_size), cfg_options=args.cfg_options)
    except (ReparamError, FileNotFoundError) as e:
        print(f'ERROR: {e}', file=sys.stderr)
        return 1
    if rep['max_abs'] is not None:
        print(f'folded {rep["folded"]} layers; training-time vs deployed outputs: '
              f'max abs diff {rep["max_abs"]:.3g}, max rel diff {rep["max_rel"]:.3g}')
    else:
        print(f'folded {rep["folded"]} layers (output check skipped)')
    print(f'wrote {rep["out_checkpoint"]}' + (f' and {rep["out_config"]}' if rep.get('out_config') else ''))
    return 0


if __name__ == '__main__':
    sys.exit(main())
