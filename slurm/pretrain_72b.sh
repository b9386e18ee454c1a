#!/bin/bash
# Qwen2.5-72B pretraining on 8 nodes x 8 H100 80GB (64 GPUs): TP4 inside a node, PP8 x VPP5
# across nodes with Bridge's embedding/loss-aware layout, DP2, sequence parallel, no recompute,
# distributed optimizer, bf16, sequence 4096, global batch 512 (2M tokens). Settings:
# conf/experiment/pretrain_72b.yaml; about 56 GiB per GPU by `train.dry_run`; a ~1 TB checkpoint needs ~6 min of signal lead time at
# 10 GB/s, 10 are given (see docs/slurm.md).
#
#   sbatch slurm/pretrain_72b.sh data=<your blend>
#   sbatch --nodes=16 slurm/pretrain_72b.sh data=<your blend>        # DP4, same global batch
#   sbatch slurm/pretrain_72b.sh data=<your blend> precision=fp8_delayed # container with Transformer Engine
#
# Environment, launch and the requeue-on-preemption protocol: slurm/train.sbatch.
#SBATCH --job-name=pretrain_72b
#SBATCH --nodes=8
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

exec bash slurm/train.sbatch experiment=pretrain_72b "$@"
