"""Convert an official PEDConv ResNet checkpoint to an OpenMMLab checkpoint.

    python tools/model_converters/pedconv_to_mm.py SRC DST [--trusted] [--target classifier|dense_backbone]

SRC is a checkpoint of zejiangh/PEDConv (``{'state_dict': ..., 'optimizer': ...}`` with the DDP
``module.`` prefix, or a bare state dict). The result loads into an mmpretrain ``ImageClassifier``
with a ``PEDResNet`` backbone (``GlobalAveragePooling`` neck, ``LinearClsHead``); with
``--target dense_backbone`` it holds only the ``backbone.*`` weights (the ImageNet classifier is
dropped) for a detector or segmentor (``init_cfg=dict(type='Pretrained', checkpoint=DST,
prefix='backbone.')``). The attention decoders (info-max loss) are kept: they are training state.
Prints the conversion report and exits with status 1 (writing nothing) when a key is left unplaced.
"""
import argparse
import sys

from dynconv_mm.converters.common import ConversionError, save_checkpoint_file
from dynconv_mm.converters.pedconv import PEDCONV_TARGETS, convert_pedconv_resnet, load_pedconv_checkpoint


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('src', help='official checkpoint ({"state_dict", ...} or a bare state dict)')
    p.add_argument('dst', help='output mmengine checkpoint ({"state_dict", "meta"})')
    p.add_argument('--trusted', action='store_true',
                   help='allow full unpickling of SRC (only for files you trust) if the safe loader refuses it')
    p.add_argument('--target', default='classifier', choices=PEDCONV_TARGETS,
                   help='classifier (default) or dense_backbone (detector/segmentor backbone weights)')
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        sd = load_pedconv_checkpoint(args.src, trusted=args.trusted)
        converted, report = convert_pedconv_resnet(sd, head=args.target == 'classifier')
        print(report.summary())
        report.check()
    except ConversionError as e:
        print(f'error: {e}', file=sys.stderr)
        return 1
    save_checkpoint_file(converted, args.dst, meta=dict(source=args.src, pedconv_target=args.target))
    print(f'saved {len(converted)} tensors to {args.dst}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
