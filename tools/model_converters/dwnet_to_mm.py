"""Convert an official DWNet classification checkpoint to an mmpretrain checkpoint.

    python tools/model_converters/dwnet_to_mm.py SRC DST [--trusted] [--target classifier|dense_backbone]

The result loads into an mmpretrain ``ImageClassifier`` with a dynconv_mm ``DWNet`` backbone
(``GlobalAveragePooling`` neck, ``LinearClsHead``); with ``--target dense_backbone`` it holds the
``backbone.*`` weights for a ``mode='dense'`` DWNet in a detector or segmentor (load with
``init_cfg=dict(type='Pretrained', checkpoint=DST, prefix='backbone.')``). Prints the conversion report and exits with
status 1 (writing nothing) when a key is left unplaced.
"""
import argparse
import sys

from dynconv_mm.converters.common import ConversionError, save_checkpoint_file
from dynconv_mm.converters.dwnet import TARGETS, convert_dwnet, load_dwnet_checkpoint


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('src', help='official checkpoint ({"model", ...} or a bare state dict)')
    p.add_argument('dst', help='output mmengine checkpoint ({"state_dict", "meta"})')
    p.add_argument('--trusted', action='store_true',
                   help='allow full unpickling of SRC (only for files you trust) if the safe loader refuses it')
    p.add_argument('--target', default='classifier', choices=TARGETS,
                   help='classifier (default) or dense_backbone (detector/segmentor backbone weights)')
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        sd = load_dwnet_checkpoint(args.src, trusted=args.trusted)
        converted, report = convert_dwnet(sd, target=args.target)
        print(report.summary())
        report.check()
    except ConversionError as e:
        print(f'error: {e}', file=sys.stderr)
        return 1
    save_checkpoint_file(converted, args.dst, meta=dict(source=args.src, dwnet_target=args.target))
    print(f'saved {len(converted)} tensors to {args.dst}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
