"""Make the toy datasets (COCO instance segmentation, ADE20K-style semantic segmentation,
ImageNet-style classification) that let any machine train a model in minutes.

    python tools/dataset_converters/make_toy_datasets.py [--root data/toy] [--seed 0]
        [--only coco ade imagenet] [--num-train N --num-val M] [--force]

Writes ROOT/coco, ROOT/ade and ROOT/imagenet. Complete datasets (a DONE.json manifest with the same
settings) are kept; incomplete ones are rebuilt; ``--force`` rebuilds everything asked for.
``--num-train``/``--num-val`` count scenes for coco and ade and images per class for imagenet.
Same seed, same files, byte for byte. See docs/toy_datasets.md.
"""
import argparse
import sys

from dynconv_mm.datasets.toy import DATASETS, make_toy_datasets
from dynconv_mm.utils.cli import description


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=description(__doc__))
    p.add_argument('--root', default='data/toy', help='parent folder of coco/, ade/ and imagenet/')
    p.add_argument('--seed', type=int, default=0, help='seed of every dataset')
    p.add_argument('--only', nargs='+', choices=DATASETS, help='datasets to make (default: all)')
    p.add_argument('--num-train', type=int, help='training scenes (coco, ade) or images per class (imagenet)')
    p.add_argument('--num-val', type=int, help='validation scenes (coco, ade) or images per class (imagenet)')
    p.add_argument('--force', action='store_true', help='rebuild datasets that are already complete')
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        make_toy_datasets(args.root, seed=args.seed, only=args.only, num_train=args.num_train,
                          num_val=args.num_val, force=args.force)
    except ValueError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    return 0


if __name__ == '__main__':
    sys.exit(main())
