"""Convert an official KernelWarehouse / DWNet detector (mmdet 2.x) or segmentor (mmseg 0.x) checkpoint.

    python tools/model_converters/downstream_to_mm.py SRC DST [--backbone auto|resnet|mobilenetv2|convnext|dwnet]
                                                       [--task auto|det|seg] [--config CONFIG] [--trusted]

The result is an mmengine checkpoint for the matching dynconv_mm config (``configs/kernelwarehouse/mask-rcnn_*``,
``configs/dwnet/cascade-mask-rcnn_*``, ``configs/dwnet/upernet_*``): load it with ``tools/test.py CONFIG DST``.
With ``--config`` the model of that config is built (on the CPU, SyncBN as BN) and the converted keys and shapes
are checked against it. The result carries the class names of COCO (detectors) or ADE20K (segmentors) in
``meta.dataset_meta``. Prints the conversion report; exits with status 2 (writing nothing) when SRC is not an
official detector or segmentor of these backbones, saying what it looks like and which tool fits, and with status
1 when a key is left unplaced, or, with ``--config``, missing or unexpected.
"""
import sys

from dynconv_mm.converters.common import ConversionError, conversion_meta, converter_arg_parser, run_conversion
from dynconv_mm.converters.downstream import (
    BACKBONES,
    TASKS,
    check_downstream_input,
    convert_downstream,
    detect_downstream_task,
    load_downstream_checkpoint,
)


def parse_args(argv=None):
    p = converter_arg_parser(__doc__, 'official checkpoint ({"meta", "state_dict", ...} or a bare state dict)')
    p.add_argument('--backbone', default='auto', choices=('auto',) + BACKBONES,
                   help='official backbone family (default: detected from the keys)')
    p.add_argument('--task', default='auto', choices=('auto',) + TASKS,
                   help='det (mmdet 2.x detector) or seg (mmseg 0.x segmentor); default: detected')
    p.add_argument('--config', help='dynconv_mm config whose model the result must match exactly')
    return p.parse_args(argv)


def _model_state_dict(config: str) -> dict:
    from dynconv_mm.apis import build_model
    return build_model(config).state_dict()


def main(argv=None) -> int:
    args = parse_args(argv)

    def convert():
        src = load_downstream_checkpoint(args.src, trusted=args.trusted)
        check_downstream_input(src)   # before building the --config model
        model_keys = _model_state_dict(args.config) if args.config else None
        converted, report = convert_downstream(src, backbone=args.backbone, task=args.task, model_keys=model_keys)
        task = detect_downstream_task(src) if args.task == 'auto' else args.task
        return converted, report, conversion_meta(converted, 'coco' if task == 'det' else 'ade20k',
                                                  converted_from=args.src, converter='downstream_to_mm')
    return run_conversion(convert, args.dst, errors=(ConversionError, ValueError), src=args.src)


if __name__ == '__main__':
    sys.exit(main())
