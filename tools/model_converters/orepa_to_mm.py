"""Convert an official OREPA / DBB / RepVGG checkpoint (JUGGHM/OREPA_CVPR2022) to dynconv_mm key names.

    python tools/model_converters/orepa_to_mm.py SRC DST [--trusted] [--layout resnet|blocks]
        [--depth 18] [--width 1.0] [--block-type OREPA] [--deploy auto|yes|no]

``--layout resnet`` (default): an official ResNet checkpoint (``models/resnet.py``, training-time or deployed by
the official ``convert.py``) -> an mmpretrain ``ImageClassifier`` with an ``OREPAResNet`` backbone
(``GlobalAveragePooling`` neck, ``LinearClsHead``); the keys and shapes are checked against ``OREPAResNet(depth,
width, block_type, deploy=...)``. A deployed checkpoint loads into a model built with ``backbone=dict(...,
deploy=True)``. ``--layout blocks``: block keys are renamed in place (models built from the layers directly).
The ResNet result carries ImageNet-1k's class names (``meta.dataset_meta``; ``--dataset`` names another for the
blocks layout). Prints the conversion report; exits with status 2 (writing nothing) when SRC holds no official
OREPA-family blocks (or, for the resnet layout, not the official ResNet), saying what it looks like and which
tool fits, and with status 1 when a key is left unplaced or does not fit the model.
"""
import sys

from dynconv_mm.converters.common import (
    DATASETS,
    compare_with,
    conversion_meta,
    converter_arg_parser,
    extract_state_dict,
    load_checkpoint_file,
    run_conversion,
)
from dynconv_mm.converters.orepa import (
    convert_orepa_block,
    convert_orepa_resnet,
    is_deploy_state_dict,
)


def parse_args(argv=None):
    p = converter_arg_parser(__doc__, 'official checkpoint ({"state_dict", ...} or a bare state dict)')
    p.add_argument('--layout', default='resnet', choices=('resnet', 'blocks'))
    p.add_argument('--depth', type=int, default=18, help='ResNet depth (resnet layout)')
    p.add_argument('--width', type=float, default=1.0, help='ResNet width multiplier (resnet layout)')
    p.add_argument('--block-type', default='OREPA', help='OREPA, DBB, RepVGG, OREPA_VGG or base (resnet layout)')
    p.add_argument('--deploy', default='auto', choices=('auto', 'yes', 'no'),
                   help='whether SRC is a deployed checkpoint (auto: detect from the keys)')
    p.add_argument('--dataset', choices=sorted(DATASETS),
                   help='dataset whose class names the result carries (default: imagenet for the resnet layout, '
                        'none for blocks)')
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)

    def convert():
        sd = extract_state_dict(load_checkpoint_file(args.src, trusted=args.trusted))
        deploy = is_deploy_state_dict(sd) if args.deploy == 'auto' else args.deploy == 'yes'
        if args.layout == 'blocks':
            converted, report = convert_orepa_block(sd, deploy=deploy)
        else:
            from dynconv_mm.backbones.orepa_resnet import OREPAResNet
            converted, report = convert_orepa_resnet(sd, deploy=deploy)
            model = OREPAResNet(args.depth, args.width, block_type=args.block_type, deploy=deploy)
            expected = {f'backbone.{k}': v for k, v in model.state_dict().items()}
            expected.update({k: None for k in converted if k.startswith('head.fc.')})
            compare_with(report, converted, expected)
        dataset = args.dataset or ('imagenet' if args.layout == 'resnet' else None)
        return converted, report, conversion_meta(converted, dataset, source=args.src, orepa_layout=args.layout,
                                                  deploy=deploy, converter='orepa_to_mm')
    return run_conversion(convert, args.dst, src=args.src)


if __name__ == '__main__':
    sys.exit(main())
