"""Convert an official KernelWarehouse / DWNet detector (mmdet 2.x) or segmentor (mmseg 0.x) checkpoint.

    python tools/model_converters/downstream_to_mm.py SRC DST [--backbone auto|resnet|mobilenetv2|convnext|dwnet]
                                                       [--task auto|det|seg] [--config CONFIG] [--trusted]

The result is an mmengine checkpoint for the matching dynconv_mm config (``configs/kernelwarehouse/mask-rcnn_*``,
``configs/dwnet/cascade-mask-rcnn_*``, ``configs/dwnet/upernet_*``): load it with ``tools/test.py CONFIG DST``.
With ``--config`` the model of that config is built (on the CPU, SyncBN as BN) and the converted keys and shapes
are checked against it. Prints the conversion report and exits with status 1 (writing nothing) when a key is
left unplaced, or, with ``--config``, missing or unexpected.
"""
import argparse
import sys

from dynconv_mm.converters.common import ConversionError, save_checkpoint_file
from dynconv_mm.converters.downstream import BACKBONES, TASKS, convert_downstream, load_downstream_checkpoint


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('src', help='official checkpoint ({"meta", "state_dict", ...} or a bare state dict)')
    p.add_argument('dst', help='output mmengine checkpoint ({"state_dict", "meta"})')
    p.add_argument('--backbone', default='auto', choices=('auto',) + BACKBONES,
                   help='official backbone family (default: detected from the keys)')
    p.add_argument('--task', default='auto', choices=('auto',) + TASKS,
                   help='det (mmdet 2.x detector) or seg (mmseg 0.x segmentor); default: detected')
    p.add_argument('--config', help='dynconv_mm config whose model the result must match exactly')
    p.add_argument('--trusted', action='store_true',
                   help='allow full unpickling of SRC (only for files you trust) if the safe loader refuses it')
    return p.parse_args(argv)


def _model_state_dict(config: str) -> dict:
    from mmengine.registry import init_default_scope

    import dynconv_mm  # noqa: F401
    from dynconv_mm.apis import load_config, replace_syncbn

    cfg = load_config(config)
    replace_syncbn(cfg)
    scope = cfg.get('default_scope', 'mmdet')
    init_default_scope(scope)
    if scope == 'mmseg':
        from mmseg.registry import MODELS
    else:
        from mmdet.registry import MODELS
    return MODELS.build(cfg.model).state_dict()


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        src = load_downstream_checkpoint(args.src, trusted=args.trusted)
        model_keys = _model_state_dict(args.config) if args.config else None
        converted, report = convert_downstream(src, backbone=args.backbone, task=args.task, model_keys=model_keys)
        print(report.summary())
        report.check()
    except (ConversionError, ValueError) as e:
        print(f'error: {e}', file=sys.stderr)
        return 1
    save_checkpoint_file(converted, args.dst, meta=dict(converted_from=args.src, converter='downstream_to_mm'))
    print(f'saved {len(converted)} tensors to {args.dst}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
