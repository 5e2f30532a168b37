"""Convert a state dict of a model built with the official DO-Conv layer (yangyanli/DO-Conv) to dynconv_mm keys.

    python tools/model_converters/doconv_to_mm.py SRC DST [--trusted]

``W``, ``D`` and ``bias`` keep their names; each ``d_diag`` (a constant the dynconv_mm ``DOConv2d``
derives) is checked and dropped. Other keys pass through unchanged, so the result loads into the same
model built with ``dynconv_mm.layers.reparam.DOConv2d`` (for instance through ``conv_cfg=dict(type='DOConv2d')``).
Prints the conversion report; exits with status 1 (writing nothing) if a ``d_diag`` is not the DO-Conv constant.
"""
import argparse
import sys

from dynconv_mm.converters.common import ConversionError, extract_state_dict, load_checkpoint_file, save_checkpoint_file
from dynconv_mm.converters.doconv import convert_doconv


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('src', help='checkpoint ({"state_dict", ...}, {"model", ...} or a bare state dict)')
    p.add_argument('dst', help='output mmengine checkpoint ({"state_dict", "meta"})')
    p.add_argument('--trusted', action='store_true',
                   help='allow full unpickling of SRC (only for files you trust) if the safe loader refuses it')
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        sd = extract_state_dict(load_checkpoint_file(args.src, trusted=args.trusted))
        converted, report = convert_doconv(sd)
        print(report.summary())
        report.check()
    except ConversionError as e:
        print(f'error: {e}', file=sys.stderr)
        return 1
    save_checkpoint_file(converted, args.dst, meta=dict(source=args.src))
    print(f'saved {len(converted)} tensors to {args.dst}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
