"""Convert an official KernelWarehouse classification checkpoint to an mmpretrain checkpoint.

    python tools/model_converters/kernelwarehouse_to_mm.py SRC DST [--key model|model_ema] [--arch auto]
                                                            [--trusted] [--baseline]

SRC must hold warehouses and attentions (an official KernelWarehouse model); with ``--baseline`` it must be one
of the official plain baselines instead (ResNet-50, MobileNetV2, ConvNeXt-T of the detection tables). The result
carries ImageNet-1k's class names (``meta.dataset_meta``, if its head has one output per class). Exits with
status 2 (writing nothing) when SRC is not such a checkpoint, saying what it looks like and which tool fits;
with status 1 when a key is left unplaced.
"""
import sys

from dynconv_mm.converters.common import conversion_meta, converter_arg_parser, run_conversion
from dynconv_mm.converters.kernelwarehouse import (
    ARCHITECTURES,
    check_kernelwarehouse_input,
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
    p.add_argument('--baseline', action='store_true',
                   help='SRC is a plain baseline of the official repository (no warehouses): convert it to '
                        "mmpretrain's plain ResNet / MobileNetV2 / ConvNeXt keys")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)

    def convert():
        sd = load_kernelwarehouse_checkpoint(args.src, key=args.key, trusted=args.trusted)
        check_kernelwarehouse_input(sd, args.baseline)
        arch = detect_kw_architecture(sd) if args.arch == 'auto' else args.arch
        print(f'architecture: {arch}')
        converted, report = convert_kernelwarehouse(sd, arch, baseline=args.baseline)
        return converted, report, conversion_meta(converted, 'imagenet', source=args.src, source_key=args.key,
                                                  kernelwarehouse_arch=arch, converter='kernelwarehouse_to_mm')
    return run_conversion(convert, args.dst, src=args.src)


if __name__ == '__main__':
    sys.exit(main())
