#!/bin/bash
# DPO of Qwen2.5-7B on 1 node x 8 H100 80GB: stage=dpo (preference pairs, sigmoid loss, beta 0.1,
# reference log-probs precomputed once and kept in the run dir), TP2 + sequence parallel, DP4,
# distributed optimizer, bf16, sequence 4096. Settings: conf/experiment/dpo_7b.yaml. Start from
# the SFT run's checkpoint (it is also the reference) and pick a preference set:
#
#   sbatch slurm/dpo_7b.sh checkpoint.load=/runs/sft_7b/checkpoints data=dpo_example
#
# Environment, launch and the requeue-on-preemption protocol: slurm/train.sbatch.
#SBATCH --job-name=dpo_7b
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --mem=0
#SBATCH --exclusive
#SBATCH --time=08:00:00
#SBATCH --requeue
#SBATCH --signal=USR1@300
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out

exec bash slurm/train.sbatch experiment=dpo_7b "$@"
