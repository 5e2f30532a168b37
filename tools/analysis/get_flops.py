"""Print the parameters and FLOPs of the model of a config (mmengine's analyzer, one image).

    python tools/analysis/get_flops.py CONFIG [--shape 224 [224]] [--deploy] [--cfg-options k=v ...] [--table]
                                      [--exact]

FLOPs are what mmengine's analyzer counts in the traced forward: for dynamic convolutions the kernel
assembly is not counted (see dynconv_mm.analysis.complexity). Parameters include every parameter of the
built model: the training form, or with --deploy the inference form of re-parameterized models.
It then prints the convolution FLOPs papers report (the plain-conv twin) and, separately, the attention and
kernel-assembly FLOPs of the dynamic layers (dynconv_mm.analysis.dynamic_flops).
"""
import argparse
import sys

from mmengine.config import DictAction

from dynconv_mm.analysis import get_complexity
from dynconv_mm.analysis.dynamic_flops import count_dynamic_flops, format_dynamic_flops
from dynconv_mm.apis import build_model
from dynconv_mm.utils.cli import description


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=description(__doc__))
    p.add_argument('config', help='config file')
    p.add_argument('--shape', type=int, nargs='+', default=[224, 224], help='input size: H [W] (default 224 224)')
    p.add_argument('--in-channels', type=int, default=3, help='input channels (default 3)')
    p.add_argument('--cfg-options', nargs='+', action=DictAction, help='override config entries, key=value')
    p.add_argument('--deploy', action='store_true',
                   help='fold re-parameterized layers (OREPA, DO-Conv, ...) first: count the inference form')
    p.add_argument('--table', action='store_true', help="also print mmengine's per-module table")
    p.add_argument('--exact', action='store_true', help='print exact integers (as in metafiles)')
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if len(args.shape) == 1:
        hw = (args.shape[0], args.shape[0])
    elif len(args.shape) == 2:
        hw = tuple(args.shape)
    else:
        print(f'error: --shape takes one or two sizes, got {args.shape}', file=sys.stderr)
        return 2
    info = get_complexity(args.config, (args.in_channels, ) + hw, cfg_options=args.cfg_options,
                          show_table=args.table, deploy=args.deploy)
    if args.table:
        print(info.table)
    print(f'Input shape: {info.input_shape}')
    print(f'Params: {info.params if args.exact else info.params_str}')
    print(f'FLOPs: {info.flops if args.exact else info.flops_str}')
    model = build_model(args.config, args.cfg_options)
    if args.deploy:
        from dynconv_mm import reparameterize_model
        reparameterize_model(model)
    dyn = count_dynamic_flops(model, (args.in_channels, ) + hw)
    print(format_dynamic_flops(dyn, exact=args.exact, params=False))
    return 0


if __name__ == '__main__':
    sys.exit(main())
