#!/bin/bash
# nanopost_trl on several machines under Slurm: one `accelerate launch` per machine (accelerate_configs/multi_node.yaml,
# DeepSpeed ZeRO-3), each starting one process per GPU; machine 0 of the allocation is the rendezvous point.
#   sbatch --nodes 4 examples/slurm_multi_node.sh --preset QWEN_3B_8xA100 --loss dg --tasks gsm8k
#   sbatch --nodes 4 examples/slurm_multi_node.sh --preset QWEN_3B_8xA100 --run_name my-run --resume latest
# OUT_DIR (default ./out) must be on storage every machine sees: the global main process writes the run log and the
# checkpoints there, and every process reads the checkpoint on --resume.
#SBATCH --job-name=nanopost-trl
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --output=%x-%j.out
set -euo pipefail

GPUS_PER_NODE=${GPUS_PER_NODE:-8}
MAIN_IP=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MAIN_PORT=${MAIN_PORT:-29500}
OUT_DIR=${OUT_DIR:-$PWD/out}
export MAIN_IP MAIN_PORT OUT_DIR NUM_PROCESSES=$((SLURM_NNODES * GPUS_PER_NODE))

# one task per machine; SLURM_NODEID (0 .. nodes-1) is that machine's rank, read inside the task
srun --kill-on-bad-exit=1 bash -c 'accelerate launch --config_file accelerate_configs/multi_node.yaml \
  --num_machines "$SLURM_NNODES" --num_processes "$NUM_PROCESSES" --machine_rank "$SLURM_NODEID" \
  --main_process_ip "$MAIN_IP" --main_process_port "$MAIN_PORT" \
  -m nanopost_trl.train --out_dir "$OUT_DIR" "$@"' bash "$@"
