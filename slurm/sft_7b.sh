#!/bin/bash
# Supervised fine-tuning of Qwen2.5-7B on 1 node x 8 H100 80GB: stage=sft (chat template,
# loss on assistant turns, packed sequences), TP1 x DP8, distributed optimizer, bf16
# gradient reduction, bf16, sequence 4096. Settings: conf/experiment/sft_7b.yaml. Start from the
# released weights converted with tools/convert.py (hf-to-mcore) and pick an SFT set:
#
#   sbatch slurm/sft_7b.sh checkpoint.load=/ckpts/qwen2_5_7b_mcore data=sft_example
#
# Environment, launch and the requeue-on-preemption protocol: slurm/train.sbatch.
#SBATCH --job-name=sft_7b
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

exec bash slurm/train.sbatch experiment=sft_7b "$@"
