"""Convert an official KernelWarehouse / DWNet detector (mmdet 2.x) or segmentor (mmseg 0.x) checkpoint.

    python tools/model_converters/downstream_to_mm.py SRC DST [--backbone auto|resnet|mobilenetv2|convnext|dwnet]
                                                       [--task auto|det|seg] [--config CONFIG] [--trusted]

The result is an mmengine checkpoint for the matching dynconv_mm config (``configs/kernelwarehouse/mask-rcnn_*``,
``configs/dwnet/cascade-mask-rcnn_*``, ``configs/dwnet/upernet_*``): load it with ``tools/test.py CONFIG DST``.
With ``--config`` the model of that config is built (on the CPU, SyncBN as BN) and the converted keys and shapes
are checked against it. Prints the conversion report and exits with status 1 (writing nothing) when a key is
left unplaced, or, with ``--config``, missing or unexpected.
"""
import sys

from dynconv_mm.converters.common import ConversionError, converter_arg_parser, run_conversion
from dynconv_mm.converters.downstream import BACKBONES, TASKS, convert_downstream, load_downstream_checkpoint


def parse_args(argv=None):
    p = converter_arg_parser(__doc__, 'official checkpoint ({"meta", "state_dict", ...} or a bare state dict)')
    p.add_argument('--backbone', default='auto', choices=('auto',) + BACKBONES,
                   help='official backbone family (default: detected from the keys)')
    p.add_argument('--task', default='auto', choices=('auto',) + TASKS,
                   help='det (mmdet 2.x detector) or seg (mmseg 0.x segmentor); default: detected')
    p.add_argument('--config', help='dynconv_mm config whose model the result must match exactly')
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

    def convert():
        src = load_downstream_checkpoint(args.src, trusted=args.trusted)
        model_keys = _model_state_dict(args.config) if args.config else None
        converted, report = convert_downstream(src, backbone=args.backbone, task=args.task, model_keys=model_keys)
        return converted, report, dict(converted_from=args.src, converter='downstream_to_mm')
    return run_conversion(convert, args.dst, errors=(ConversionError, ValueError))


if __name__ == '__main__':
    sys.exit(main())
