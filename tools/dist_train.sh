#!/usr/bin/env bash
# Distributed training with torchrun, on one machine or several:
#
#   bash tools/dist_train.sh CONFIG NUM_PROCS [train.py args]                     # one machine
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 PORT=29500 bash tools/dist_train.sh CONFIG 8   # on machine 1
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1 PORT=29500 bash tools/dist_train.sh CONFIG 8   # on machine 2
#
# NUM_PROCS is the number of processes per machine (one per GPU). NNODES (default 1) machines take part,
# NODE_RANK (0 .. NNODES-1) is this machine's index, MASTER_ADDR (default 127.0.0.1) the address of
# machine 0 and PORT (default 29500) a free port on it. On machines without GPUs the processes use gloo.
# PYTHON picks the interpreter (default: python).
set -euo pipefail
[ $# -ge 2 ] || { echo "usage: [NNODES=N NODE_RANK=R MASTER_ADDR=A PORT=P] bash $0 CONFIG NUM_PROCS [train.py args]" >&2; exit 2; }
CONFIG=$1; NPROC=$2; shift 2
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
PORT=${PORT:-29500}
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHONPATH="$ROOT:${PYTHONPATH:-}" "${PYTHON:-python}" -m torch.distributed.run \
    --nnodes="$NNODES" --node_rank="$NODE_RANK" --master_addr="$MASTER_ADDR" --master_port="$PORT" \
    --nproc_per_node="$NPROC" "$ROOT/tools/train.py" "$CONFIG" --launcher pytorch "$@"
