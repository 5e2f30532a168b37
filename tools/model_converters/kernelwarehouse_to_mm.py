"""Convert an official KernelWarehouse classification checkpoint to an mmpretrain checkpoint.

    python tools/model_converters/kernelwarehouse_to_mm.py SRC DST [--key model|model_ema] [--arch auto]
                                                            [--trusted]

Prints the conversion report and exits with status 1 (writing nothing) when a key is left unplaced.
"""
import sys

from dynconv_mm.converters.common import converter_arg_parser, run_conversion
from dynconv_mm.converters.kernelwarehouse import (
    ARCHITECTURES,
    convert_kernelwarehouse,
    detect_kw_architecture,
    load_kernelwarehouse_checkpoint,
)


def parse_args(argv=None):
    p = converter_arg_parser(
        __doc__, 'official checkpoint ({"model", "optimizer", ..., ["model_ema"]} or a state dict)')
    p.add_argument('--key', default='model', choices=['model', 'model_ema'],
                   help='which weights of the official checkpoint to convert (default: model)')
    p.add_argument('--arch', default='auto', choices=('auto',) + ARCHITECTURES,
                   help='official architecture (default: detected from the keys)')
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)

    def convert():
        sd = load_kernelwarehouse_checkpoint(args.src, key=args.key, trusted=args.trusted)
        arch = detect_kw_architecture(sd) if args.arch == 'auto' else args.arch
        print(f'architecture: {arch}')
        converted, report = convert_kernelwarehouse(sd, arch)
        return converted, report, dict(source=args.src, source_key=args.key, kernelwarehouse_arch=arch)
    return run_conversion(convert, args.dst)


if __name__ == '__main__':
    sys.exit(main())
