#!/bin/bash
# A nanopost_trl run that survives Slurm's time limit and preemption: Slurm sends SIGUSR1 five minutes before the
# limit, the run finishes its step, saves a checkpoint and exits 75, and the job requeues itself; the next start
# resumes from that checkpoint (`--resume latest`), with every step in the run log exactly once.
#   RUN=my-run sbatch examples/slurm_requeue.sh --preset QWEN_1_5B_1xA100 --loss dg --tasks gsm8k
#SBATCH --job-name=nanopost-trl
#SBATCH --gpus=1
#SBATCH --time=04:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
set -uo pipefail

RUN=${RUN:?set RUN to the run name, e.g. RUN=my-run}
OUT_DIR=${OUT_DIR:-$PWD/out}
RESUME=()
if [ -n "$(ls -d "$OUT_DIR/$RUN"/checkpoint-* 2>/dev/null)" ]; then RESUME=(--resume latest); fi

python -m nanopost_trl.train --run_name "$RUN" --out_dir "$OUT_DIR" "${RESUME[@]}" "$@" &
PID=$!
trap 'kill -USR1 "$PID"' USR1  # pass Slurm's warning (sent to this script: --signal=B:...) on to the run
wait "$PID"
CODE=$?
while kill -0 "$PID" 2>/dev/null; do wait "$PID"; CODE=$?; done  # `wait` returns early when the trap runs
if [ "$CODE" -eq 75 ]; then  # preempted, checkpoint saved: queue the job again
  scontrol requeue "$SLURM_JOB_ID"
fi
exit "$CODE"
