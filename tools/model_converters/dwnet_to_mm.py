"""Convert an official DWNet classification checkpoint to an mmpretrain checkpoint.

    python tools/model_converters/dwnet_to_mm.py SRC DST [--trusted] [--target classifier|dense_backbone]

The result loads into an mmpretrain ``ImageClassifier`` with a dynconv_mm ``DWNet`` backbone
(``GlobalAveragePooling`` neck, ``LinearClsHead``); with ``--target dense_backbone`` it holds the ``backbone.*``
weights for a ``mode='dense'`` DWNet in a detector or segmentor (load with ``init_cfg=dict(type='Pretrained',
checkpoint=DST, prefix='backbone.')``). A classifier carries ImageNet-1k's class names (``meta.dataset_meta``,
if its head has one output per class). Prints the conversion report; exits with status 2 (writing nothing) when
SRC is not an official DWNet classifier, saying what it looks like and which tool fits, and with status 1 when a
key is left unplaced.
"""
import sys

from dynconv_mm.converters.common import conversion_meta, converter_arg_parser, run_conversion
from dynconv_mm.converters.dwnet import TARGETS, convert_dwnet, load_dwnet_checkpoint


def parse_args(argv=None):
    p = converter_arg_parser(__doc__, 'official checkpoint ({"model", ...} or a bare state dict)')
    p.add_argument('--target', default='classifier', choices=TARGETS,
                   help='classifier (default) or dense_backbone (detector/segmentor backbone weights)')
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)

    def convert():
        converted, report = convert_dwnet(load_dwnet_checkpoint(args.src, trusted=args.trusted), target=args.target)
        dataset = 'imagenet' if args.target == 'classifier' else None   # backbone weights alone have no classes
        return converted, report, conversion_meta(converted, dataset, source=args.src, dwnet_target=args.target,
                                                  converter='dwnet_to_mm')
    return run_conversion(convert, args.dst, src=args.src)


if __name__ == '__main__':
    sys.exit(main())
