#!/usr/bin/env bash
# Training on a Slurm cluster: srun starts one task per GPU and mmengine joins them from Slurm's variables.
#
#   bash tools/slurm_train.sh PARTITION JOB_NAME CONFIG WORK_DIR [train.py args]
#   GPUS=16 GPUS_PER_NODE=8 bash tools/slurm_train.sh gpu kw-r50 configs/kernelwarehouse/CONFIG.py work_dirs/kw
#
# GPUS: tasks in all (default 8); GPUS_PER_NODE: tasks, and GPUs asked for, per machine (default: GPUS, at
# most 8); CPUS_PER_TASK (default 5); SRUN_ARGS: more srun options (e.g. "--time=24:00:00"); PORT: the
# rendezvous port on the first machine (default 29500). PYTHON picks the interpreter (default: python).
set -euo pipefail
[ $# -ge 4 ] || { echo "usage: [GPUS=N GPUS_PER_NODE=M CPUS_PER_TASK=C SRUN_ARGS=...] bash $0 PARTITION JOB_NAME CONFIG WORK_DIR [train.py args]" >&2; exit 2; }
PARTITION=$1; JOB_NAME=$2; CONFIG=$3; WORK_DIR=$4; shift 4
GPUS=${GPUS:-8}
GPUS_PER_NODE=${GPUS_PER_NODE:-$(( GPUS < 8 ? GPUS : 8 ))}
CPUS_PER_TASK=${CPUS_PER_TASK:-5}
read -r -a EXTRA <<< "${SRUN_ARGS:-}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export MASTER_PORT=${PORT:-${MASTER_PORT:-29500}}
PYTHONPATH="$ROOT:${PYTHONPATH:-}" srun -p "$PARTITION" --job-name="$JOB_NAME" --gres=gpu:"$GPUS_PER_NODE" \
    --ntasks="$GPUS" --ntasks-per-node="$GPUS_PER_NODE" --cpus-per-task="$CPUS_PER_TASK" --kill-on-bad-exit=1 \
    ${EXTRA[@]+"${EXTRA[@]}"} "${PYTHON:-python}" -u "$ROOT/tools/train.py" "$CONFIG" --work-dir="$WORK_DIR" \
    --launcher=slurm "$@"
