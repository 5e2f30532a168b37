"""Convert a state dict of a model built with the official DO-Conv layer (yangyanli/DO-Conv) to dynconv_mm keys.

    python tools/model_converters/doconv_to_mm.py SRC DST [--trusted]

``W``, ``D`` and ``bias`` keep their names; each ``d_diag`` (a constant the dynconv_mm ``DOConv2d`` derives) is
checked and dropped. Other keys pass through unchanged, so the result loads into the same model built with
``dynconv_mm.layers.reparam.DOConv2d`` (for instance through ``conv_cfg=dict(type='DOConv2d')``). ``--dataset``
stores that dataset's class names in ``meta.dataset_meta``. Prints the conversion report; exits with status 2
(writing nothing) when SRC holds no official DO-Conv layer (``W``, ``D``, ``d_diag``), saying what it looks like
and which tool fits, and with status 1 if a ``d_diag`` is not the DO-Conv constant.
"""
import sys

from dynconv_mm.converters.common import (
    DATASETS,
    conversion_meta,
    converter_arg_parser,
    extract_state_dict,
    load_checkpoint_file,
    run_conversion,
)
from dynconv_mm.converters.doconv import convert_doconv


def parse_args(argv=None):
    p = converter_arg_parser(__doc__, 'checkpoint ({"state_dict", ...}, {"model", ...} or a bare state dict)')
    p.add_argument('--dataset', choices=sorted(DATASETS), help='dataset whose class names the result carries')
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)

    def convert():
        converted, report = convert_doconv(extract_state_dict(load_checkpoint_file(args.src, trusted=args.trusted)))
        return converted, report, conversion_meta(converted, args.dataset, source=args.src, converter='doconv_to_mm')
    return run_conversion(convert, args.dst, src=args.src)


if __name__ == '__main__':
    sys.exit(main())
