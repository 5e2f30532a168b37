"""``python -m dynconv_mm.gpu_check.worker SPEC.json``: run one part of the GPU check (see ``core``)."""
import json
import sys

from .core import run_in_worker


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print('usage: python -m dynconv_mm.gpu_check.worker SPEC.json', file=sys.stderr)
        return 2
    with open(argv[0]) as f:
        return run_in_worker(json.load(f))


if __name__ == '__main__':
    sys.exit(main())
