#!/bin/bash
# Qwen2-57B-A14B (MoE: 64 experts, top-8, shared expert) pretraining on 4 nodes x 8 H100 80GB
# (32 GPUs): expert parallelism inside a node (EP4 x expert-TP2), TP2 with sequence parallel,
# PP4 across nodes, DP4, distributed optimizer, bf16, sequence 4096, global batch 512.
# Settings: conf/experiment/pretrain_57b_a14b.yaml; about 53 GiB per GPU by `train.dry_run`.
# Grouped GEMM and the permute/router fusions need Transformer Engine (the container has it).
#
#   sbatch slurm/pretrain_57b_a14b.sh data=<your blend>
#   sbatch --nodes=8 slurm/pretrain_57b_a14b.sh data=<your blend>   # DP8, same global batch
#
# Environment, launch and the requeue-on-preemption protocol: slurm/train.sbatch.
#SBATCH --job-name=pretrain_57b_a14b
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

exec bash slurm/train.sbatch experiment=pretrain_57b_a14b "$@"
