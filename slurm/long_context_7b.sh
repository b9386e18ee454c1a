#!/bin/bash
# Long-context stage of Qwen2.5-7B on 4 nodes x 8 H100 80GB (32 GPUs): 32,768-token sequences with
# context parallelism 4, TP2 with sequence parallel, DP4 with the distributed optimizer, bf16, RoPE
# base raised to 1,000,000, global batch 128 (4M tokens). Settings: conf/experiment/long_context_7b.yaml
# and conf/stage/long_context.yaml. Continue from a pretrain checkpoint (weights only):
#
#   sbatch slurm/long_context_7b.sh checkpoint.load=/runs/pretrain_7b/checkpoints data=<long-document blend>
#
# Environment, launch and the requeue-on-preemption protocol: slurm/train.sbatch.
#SBATCH --job-name=long_context_7b
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --mem=0
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --signal=USR1@600
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out

exec bash slurm/train.sbatch experiment=long_context_7b "$@"
