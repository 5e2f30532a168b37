"""Export a whole mmdet / mmseg / mmpretrain model of a dynconv_mm config to ONNX and check it with onnxruntime.

    python tools/deployment/export_onnx.py CONFIG [CHECKPOINT] --out model.onnx
        [--shape H W] [--batch N] [--opset 17] [--static-batch] [--static-shape]
        [--temperature T] [--no-verify] [--cfg-options key=value ...]

Detectors (Faster / Mask R-CNN) give ``dets``, ``labels`` (and ``masks``), segmentors ``seg_logits``,
classifiers ``logits``; the graph takes the normalised, padded batch the model's data preprocessor
makes. See docs/export.md for what the graphs contain and what they leave out. The exit status is 1,
with the reason, when the model cannot be exported or onnxruntime does not reproduce PyTorch.
"""
import argparse
import sys

from mmengine.config import DictAction

from dynconv_mm.export import ExportError, export_onnx


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('config', help='mmdet / mmseg / mmpretrain config')
    p.add_argument('checkpoint', nargs='?', help='checkpoint of that config (default: initialised weights)')
    p.add_argument('--out', required=True, help='ONNX file to write')
    p.add_argument('--shape', type=int, nargs=2, default=[320, 320], metavar=('H', 'W'),
                   help='height and width of the traced example input (multiples of 32 for detectors and '
                        'segmentors; default 320 320)')
    p.add_argument('--batch', type=int, default=1, help='batch of the traced example input (default 1)')
    p.add_argument('--opset', type=int, default=17, help='ONNX opset (>= 11; detectors >= 16; default 17)')
    p.add_argument('--static-batch', action='store_true', help='fix the batch size in the graph')
    p.add_argument('--static-shape', action='store_true', help='fix the height and width in the graph')
    p.add_argument('--temperature', type=float,
                   help='set the temperature of every dynamic layer first (default: the model\'s own)')
    p.add_argument('--no-verify', action='store_true', help='skip the onnxruntime comparison')
    p.add_argument('--cfg-options', nargs='+', action=DictAction, help='override config entries, key=value')
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        rep = export_onnx(args.config, args.out, checkpoint=args.checkpoint,
                          input_shape=(args.batch, 3, *args.shape), opset=args.opset,
                          dynamic_batch=not args.static_batch, dynamic_hw=not args.static_shape,
                          verify=not args.no_verify, cfg_options=args.cfg_options, temperature=args.temperature)
    except (ExportError, FileNotFoundError) as e:
        print(f'ERROR: {e}', file=sys.stderr)
        return 1
    axes = ', '.join(f'{name}: {sorted(a.values())}' for name, a in rep['dynamic_axes'].items()) or 'none'
    print(f'wrote {rep["output"]} ({rep["kind"]}, {rep["size_mb"]} MB, opset {rep["opset"]}): '
          f'input -> {", ".join(rep["outputs"])}; dynamic axes: {axes}')
    for check in rep.get('checks', []):
        diffs = ', '.join(f'{k} {v:.3g}' for k, v in check.items() if k != 'shape')
        print(f'onnxruntime vs PyTorch at input {check["shape"]}: {diffs}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
