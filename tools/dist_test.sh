#!/usr/bin/env bash
# Distributed testing with torchrun, on one machine or several:
#
#   bash tools/dist_test.sh CONFIG CHECKPOINT NUM_PROCS [test.py args]
#   NNODES=2 NODE_RANK=0|1 MASTER_ADDR=10.0.0.1 PORT=29500 bash tools/dist_test.sh CONFIG CHECKPOINT 8
#
# The variables mean what they mean for tools/dist_train.sh (defaults: one machine, 127.0.0.1:29500).
set -euo pipefail
[ $# -ge 3 ] || { echo "usage: [NNODES=N NODE_RANK=R MASTER_ADDR=A PORT=P] bash $0 CONFIG CHECKPOINT NUM_PROCS [test.py args]" >&2; exit 2; }
CONFIG=$1; CKPT=$2; NPROC=$3; shift 3
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
PORT=${PORT:-29500}
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHONPATH="$ROOT:${PYTHONPATH:-}" "${PYTHON:-python}" -m torch.distributed.run \
    --nnodes="$NNODES" --node_rank="$NODE_RANK" --master_addr="$MASTER_ADDR" --master_port="$PORT" \
    --nproc_per_node="$NPROC" "$ROOT/tools/test.py" "$CONFIG" "$CKPT" --launcher pytorch "$@"
