#!/bin/bash
# The tiny Qwen2.5-shaped model on CPU with 2 tasks at TP2 + sequence parallel (gloo):
# a first job on any SLURM cluster, and what the SLURM tests submit. About a minute.
#
#   sbatch slurm/pretrain_tiny.sh
#   sbatch slurm/pretrain_tiny.sh train.train_iters=100
#
# Environment, launch and the requeue-on-preemption protocol: slurm/train.sbatch.
#SBATCH --job-name=pretrain_tiny
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=2
#SBATCH --cpus-per-task=1
#SBATCH --time=00:15:00
#SBATCH --requeue
#SBATCH --signal=USR1@60
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out

exec bash slurm/train.sbatch experiment=pretrain_tiny "$@"
