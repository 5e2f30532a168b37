"""Initialise a dynamic / re-parameterized model of a config from a static (plain-conv) checkpoint.

    python tools/model_converters/static_to_dynamic.py SRC_CKPT CONFIG DST [--trusted] [--strict]
        [--expert-noise 0.01] [--kw-attention prior|keep] [--kw-prior-logit 1] [--cfg-options key=value ...]

SRC_CKPT: torchvision / timm ResNet keys (``conv1.weight``, ``layer1.0.conv1.weight``, ``fc.*``) or an
mmpretrain checkpoint (``backbone.*``, ``head.fc.*``). The config's model (mmpretrain, mmdet or mmseg) is built,
every plain module gets its tensors and every dynamic / re-param layer is initialised from the static kernel
(see docs/static_to_dynamic.md for what is exact). The result carries the class names of the config's dataset
(``meta.dataset_meta``). Prints the report; exits with status 2 (writing nothing) when SRC already holds dynamic
or re-parameterized layers (an official or converted checkpoint: the message names the converter that fits) and,
with ``--strict``, with status 1 when a static key is unused.
"""
import argparse
import sys

from mmengine.config import DictAction

from dynconv_mm.apis import build_model, load_config
from dynconv_mm.converters.common import (
    DST_HELP,
    TRUSTED_HELP,
    ConversionError,
    check_static_input,
    dataset_meta_from_config,
    extract_state_dict,
    load_checkpoint_file,
    run_conversion,
)
from dynconv_mm.converters.static import convert_static_to_dynamic
from dynconv_mm.utils.cli import description


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=description(__doc__))
    p.add_argument('src', help='static checkpoint (a state dict, or {"state_dict"|"model": ...})')
    p.add_argument('config', help='config of the dynamic / re-param model')
    p.add_argument('dst', help=DST_HELP)
    p.add_argument('--trusted', action='store_true', help=TRUSTED_HELP)
    p.add_argument('--strict', action='store_true', help='fail when a static key has no place in the model')
    p.add_argument('--expert-noise', type=float, default=0.01,
                   help='zero-sum perturbation of CondConv experts, relative to the kernel std (default 0.01)')
    p.add_argument('--kw-attention', default='prior', choices=('prior', 'keep'),
                   help='KernelWarehouse attention: logits = temperature prior (default) or as initialised')
    p.add_argument('--kw-prior-logit', type=float, default=1.0,
                   help='KernelWarehouse prior logit L: kernels are W * L / (L + 0.001) at temperature 0')
    p.add_argument('--cfg-options', nargs='+', action=DictAction, help='override config settings')
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)

    def convert():
        sd = extract_state_dict(load_checkpoint_file(args.src, trusted=args.trusted))
        check_static_input(sd)   # before building the model
        cfg = load_config(args.config, args.cfg_options)
        model = build_model(cfg)
        converted, report = convert_static_to_dynamic(sd, model, expert_noise=args.expert_noise,
                                                      kw_attention=args.kw_attention,
                                                      kw_prior_logit=args.kw_prior_logit)
        meta = dict(source=args.src, config=args.config, static_init=dict(report.layers),
                    converter='static_to_dynamic')
        classes = dataset_meta_from_config(cfg)
        if classes:
            meta['dataset_meta'] = classes
        return converted, report, meta

    def check(report):
        if args.strict and report.unplaced:
            raise ConversionError(f'{len(report.unplaced)} static keys have no place in the model: '
                                  f'{report.unplaced[:10]}')
    return run_conversion(convert, args.dst, errors=(ConversionError, FileNotFoundError), check=check, src=args.src)


if __name__ == '__main__':
    sys.exit(main())
