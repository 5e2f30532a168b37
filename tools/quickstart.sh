#!/usr/bin/env bash
# The quick start: make the toy data if missing, train a quick-start config on the CPU, test it (COCO
# bbox/segm mAP for the default Mask R-CNN), and save pictures of its predictions.
#
#   bash tools/quickstart.sh [--config CONFIG] [--iters N] [--work-dir DIR] [--skip-data] [--no-show]
#
# Runs from the checkout (data in data/toy, results in work_dirs/quickstart/<config name>); set PYTHON
# to choose the interpreter. The work is done by dynconv_mm/quickstart.py.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON=${PYTHON:-python}
PYTHONPATH="$ROOT:${PYTHONPATH:-}" exec "$PYTHON" -m dynconv_mm.quickstart "$@"
