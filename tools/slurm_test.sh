#!/usr/bin/env bash
# Testing on a Slurm cluster: srun starts one task per GPU and mmengine joins them from Slurm's variables.
#
#   bash tools/slurm_test.sh PARTITION JOB_NAME CONFIG CHECKPOINT [test.py args]
#
# GPUS, GPUS_PER_NODE, CPUS_PER_TASK, SRUN_ARGS, PORT and PYTHON as for tools/slurm_train.sh.
set -euo pipefail
[ $# -ge 4 ] || { echo "usage: [GPUS=N GPUS_PER_NODE=M CPUS_PER_TASK=C SRUN_ARGS=...] bash $0 PARTITION JOB_NAME CONFIG CHECKPOINT [test.py args]" >&2; exit 2; }
PARTITION=$1; JOB_NAME=$2; CONFIG=$3; CKPT=$4; shift 4
GPUS=${GPUS:-8}
GPUS_PER_NODE=${GPUS_PER_NODE:-$(( GPUS < 8 ? GPUS : 8 ))}
CPUS_PER_TASK=${CPUS_PER_TASK:-5}
read -r -a EXTRA <<< "${SRUN_ARGS:-}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export MASTER_PORT=${PORT:-${MASTER_PORT:-29500}}
PYTHONPATH="$ROOT:${PYTHONPATH:-}" srun -p "$PARTITION" --job-name="$JOB_NAME" --gres=gpu:"$GPUS_PER_NODE" \
    --ntasks="$GPUS" --ntasks-per-node="$GPUS_PER_NODE" --cpus-per-task="$CPUS_PER_TASK" --kill-on-bad-exit=1 \
    ${EXTRA[@]+"${EXTRA[@]}"} "${PYTHON:-python}" -u "$ROOT/tools/test.py" "$CONFIG" "$CKPT" --launcher=slurm "$@"
