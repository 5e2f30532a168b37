"""Convert an official PEDConv ResNet checkpoint to an OpenMMLab checkpoint.

    python tools/model_converters/pedconv_to_mm.py SRC DST [--trusted] [--target classifier|dense_backbone]

SRC is a checkpoint of zejiangh/PEDConv (``{'state_dict': ..., 'optimizer': ...}`` with the DDP ``module.``
prefix, or a bare state dict). The result loads into an mmpretrain ``ImageClassifier`` with a ``PEDResNet``
backbone (``GlobalAveragePooling`` neck, ``LinearClsHead``); with ``--target dense_backbone`` it holds only the
``backbone.*`` weights (the ImageNet classifier is dropped) for a detector or segmentor
(``init_cfg=dict(type='Pretrained', checkpoint=DST, prefix='backbone.')``). The attention decoders (info-max
loss) are kept: they are training state. A classifier carries ImageNet-1k's class names (``meta.dataset_meta``,
if its head has one output per class). Prints the conversion report; exits with status 2 (writing nothing) when
SRC is not an official PEDConv ResNet, saying what it looks like and which tool fits, and with status 1 when a
key is left unplaced.
"""
import sys

from dynconv_mm.converters.common import conversion_meta, converter_arg_parser, run_conversion
from dynconv_mm.converters.pedconv import PEDCONV_TARGETS, convert_pedconv_resnet, load_pedconv_checkpoint


def parse_args(argv=None):
    p = converter_arg_parser(__doc__, 'official checkpoint ({"state_dict", ...} or a bare state dict)')
    p.add_argument('--target', default='classifier', choices=PEDCONV_TARGETS,
                   help='classifier (default) or dense_backbone (detector/segmentor backbone weights)')
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)

    def convert():
        sd = load_pedconv_checkpoint(args.src, trusted=args.trusted)
        converted, report = convert_pedconv_resnet(sd, head=args.target == 'classifier')
        dataset = 'imagenet' if args.target == 'classifier' else None   # backbone weights alone have no classes
        return converted, report, conversion_meta(converted, dataset, source=args.src, pedconv_target=args.target,
                                                  converter='pedconv_to_mm')
    return run_conversion(convert, args.dst, src=args.src)


if __name__ == '__main__':
    sys.exit(main())
