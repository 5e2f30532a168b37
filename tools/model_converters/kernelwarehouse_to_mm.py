"""Convert an official KernelWarehouse classification checkpoint to an mmpretrain checkpoint.

    python tools/model_converters/kernelwarehouse_to_mm.py SRC DST [--key model|model_ema] [--arch auto]
                                                            [--trusted]

Prints the conversion report and exits with status 1 (writing nothing) when a key is left unplaced.
"""
import argparse
import sys

from dynconv_mm.converters.common import ConversionError, save_checkpoint_file
from dynconv_mm.converters.kernelwarehouse import (
    ARCHITECTURES,
    convert_kernelwarehouse,
    detect_kw_architecture,
    load_kernelwarehouse_checkpoint,
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('src', help='official checkpoint ({"model", "optimizer", ..., ["model_ema"]} or a state dict)')
    p.add_argument('dst', help='output mmengine checkpoint ({"state_dict", "meta"})')
    p.add_argument('--key', default='model', choices=['model', 'model_ema'],
                   help='which weights of the official checkpoint to convert (default: model)')
    p.add_argument('--arch', default='auto', choices=('auto',) + ARCHITECTURES,
                   help='official architecture (default: detected from the keys)')
    p.add_argument('--trusted', action='store_true',
                   help='allow full unpickling of SRC (only for files you trust) if the safe loader refuses it')
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        sd = load_kernelwarehouse_checkpoint(args.src, key=args.key, trusted=args.trusted)
        arch = detect_kw_architecture(sd) if args.arch == 'auto' else args.arch
        converted, report = convert_kernelwarehouse(sd, arch)
        print(f'architecture: {arch}')
        print(report.summary())
        report.check()
    except ConversionError as e:
        print(f'error: {e}', file=sys.stderr)
        return 1
    meta = dict(source=args.src, source_key=args.key, kernelwarehouse_arch=arch)
    save_checkpoint_file(converted, args.dst, meta=meta)
    print(f'saved {len(converted)} tensors to {args.dst}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
