"""``train.dry_run``: each template's configuration validated at its declared node count."""

from __future__ import annotations

import re

import pytest
import torch

from megatron_qwen.config import ConfigError, validate
from megatron_qwen.config.memory import GIB, estimate_memory
from megatron_qwen.config.store import compose_config
from megatron_qwen.train import dry_run, run
from tests.helpers import run_cli, train_command
from tests.slurm_support import MODEL_TEMPLATES, parse_template

H100_GIB = 80


def test_pretrain_72b_template_dry_run_fits_an_h100_at_its_node_count():
    template = parse_template("pretrain_72b.sh")
    assert template.world_size == 64  # 8 nodes x 8 GPUs, as documented in the template
    proc = run_cli(train_command([*template.overrides, "train.dry_run=true",
                                  f"train.dry_run_world_size={template.world_size}"]), timeout=300)
    assert "= 64 GPUs" in proc.stdout and "tp 4 x pp 8 (vpp 5)" in proc.stdout
    assert "parameters: total 72.71B" in proc.stdout
    memory = float(re.search(r"memory per GPU \(estimate\): ([\d.]+) GiB", proc.stdout).group(1))
    assert 20 < memory < H100_GIB, proc.stdout


@pytest.mark.parametrize("name", MODEL_TEMPLATES)
def test_every_template_configuration_validates_and_fits_at_its_node_count(name):
    template = parse_template(name)
    cfg = compose_config(template.overrides)
    if cfg.parallel.tp * cfg.parallel.pp * cfg.parallel.cp > 1:  # TP1 x DP presets validate on one rank
        with pytest.raises(ConfigError):
            dry_run(cfg, 1, report=False)
    dry_run(cfg, template.world_size, report=False)
    assert estimate_memory(validate(cfg, template.world_size)).peak.total < H100_GIB * GIB


def test_dry_run_at_a_wrong_world_size_names_the_override():
    cfg = compose_config(["experiment=pretrain_72b"])
    with pytest.raises(ConfigError, match=r"world size 48 .*train.dry_run_world_size"):
        dry_run(cfg, 48, report=False)


def test_dry_run_prints_the_plan_without_a_process_group(capsys):
    cfg = compose_config(["experiment=pretrain_7b", "train.dry_run=true", "train.dry_run_world_size=16"])
    assert run(cfg) is False
    out = capsys.readouterr().out
    assert "layout: tp 1 x pp 1 x cp 1 x dp 16 = 16 GPUs" in out and "memory per GPU (estimate)" in out
    assert not torch.distributed.is_initialized()


def test_step_time_grows_with_rows_per_sample_reference_passes_and_group_size(capsys):
    from megatron_qwen.config.step_time import step_time

    def timed(*overrides):
        return step_time(validate(compose_config(list(overrides)), 16), 989.0)

    # SFT at DPO's layout and gradient precision: a pair is two rows of the same shape
    sft = timed("experiment=sft_7b", "parallel=h100_7b_tp2", "precision.grad_reduce_in_fp32=true")
    dpo = timed("experiment=dpo_7b")
    assert dpo.train == pytest.approx(2 * sft.train, rel=0.02)
    assert dpo.forward_passes == 0 and dpo.setup_seconds > 0  # precompute: one pass before training
    with_model = timed("experiment=dpo_7b", "stage.reference=model")
    assert with_model.forward_passes == pytest.approx(dpo.train / 3, rel=0.1) and with_model.total > dpo.total
    groups = [timed("experiment=grpo_7b", f"stage.group_size={g}") for g in (2, 4, 8)]
    assert groups[0].total < groups[1].total < groups[2].total
    from megatron_qwen.config.shapes import logit_positions, micro_batch_tokens

    grpo = validate(compose_config(["experiment=grpo_7b", "stage.max_tokens_per_microbatch=20000"]), 16)
    assert micro_batch_tokens(grpo) == 16384  # one group of 8 full rows: less than the token budget
    assert logit_positions(grpo) == 8 * 1024  # the output layer sees completion positions only
    assert all(0 < g.rollout and 0 < g.forward_passes for g in groups)  # beta > 0: the reference pass
    run(compose_config(["experiment=grpo_7b", "train.dry_run=true", "train.dry_run_world_size=16"]))
    out = capsys.readouterr().out
    # 64 prompts / 8 DP ranks x 8 completions, 2048 positions, 28 layers, K and V, 4 KV heads / tp 2, 128, bf16
    kv = 64 * 2048 * 28 * 2 * 2 * 128 * 2
    assert re.search(r"rollout \(every 1 step\(s\)\): 64 rows per rank \(8 per prompt\) .* KV cache "
                     rf"{kv / GIB:.1f} GiB per GPU", out), out
    assert re.search(r"step time \(model\): ~[\d.]+ s = training [\d.]+ s \+ reference/old log-prob passes "
                     r"[\d.]+ s \+ rollout [\d.]+ s", out), out
