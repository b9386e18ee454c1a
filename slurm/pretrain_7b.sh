#!/bin/bash
# Qwen2.5-7B pretraining on 2 nodes x 8 H100 80GB (16 GPUs): TP1 x DP16 with the distributed
# optimizer and bf16 gradient reduction (Megatron-Bridge's Llama3-8B H100 layout), no recompute,
# bf16, sequence 4096, global batch 512 (2M tokens). Settings: conf/experiment/pretrain_7b.yaml.
#
#   sbatch slurm/pretrain_7b.sh data=<your blend>
#   sbatch --nodes=4 slurm/pretrain_7b.sh data=<your blend>   # DP32, same global batch
#
# Environment, launch and the requeue-on-preemption protocol: slurm/train.sbatch.
#SBATCH --job-name=pretrain_7b
#SBATCH --nodes=2
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

exec bash slurm/train.sbatch experiment=pretrain_7b "$@"
