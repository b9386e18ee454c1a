#!/bin/bash
# GRPO of Qwen2.5-7B on 1 node x 8 H100 80GB: stage=grpo (8 completions per prompt sampled in the
# framework, verifiable reward math_verify, clipped ratio 0.2/0.28, k3 KL beta 0.04 to the starting
# checkpoint), TP2 with sequence parallel in training (the sampler decodes without it), DP4, distributed
# optimizer, bf16, rows of 2048 tokens. Settings: conf/experiment/grpo_7b.yaml. Start from the SFT
# or DPO run's checkpoint (it is also the reference) and pick a prompt set:
#
#   sbatch slurm/grpo_7b.sh checkpoint.load=/runs/dpo_7b/checkpoints data=grpo_example
#
# Environment, launch and the requeue-on-preemption protocol: slurm/train.sbatch.
#SBATCH --job-name=grpo_7b
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

exec bash slurm/train.sbatch experiment=grpo_7b "$@"
