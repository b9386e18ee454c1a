"""stage=dpo: configuration errors and a checkpoint of another model, each one line."""

from __future__ import annotations

import pytest

from megatron_qwen.config.store import compose_config
from megatron_qwen.config.validate import ConfigError, validate
from tests.dpo_support import TINY_MODEL, convert_start, dpo_overrides, make_task
from tests.helpers import QUIET, run_cli, train_command

BAD_CONFIGS = [
    (["stage=dpo", "data=mock"], "stage=dpo needs preference data, but data.type=mock"),
    (["data=dpo_example"], "data.type=preference holds preference pairs, which stage=pretrain cannot train on"),
    (["stage=dpo", "stage.loss=hinge"], "stage.loss='hinge' must be one of ('sigmoid', 'ipo')"),
    (["stage=dpo", "stage.beta=0"], "stage.beta=0.0 must be > 0"),
    (["stage=dpo", "stage.loss=ipo", "stage.label_smoothing=0.1"], "applies to stage.loss=sigmoid only"),
    (["stage=dpo", "stage.reference=online"], "stage.reference='online' must be one of ('precompute', 'model')"),
    (["stage=dpo", "parallel.cp=2"], "stage=dpo needs parallel.cp=1 (got 2)"),
]


@pytest.mark.parametrize("overrides,message", BAD_CONFIGS, ids=[m[:30] for _, m in BAD_CONFIGS])
def test_bad_dpo_config_is_named_before_anything_starts(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        validate(compose_config(overrides), world_size=1)


def test_unknown_stage_lists_the_stages():
    from megatron_qwen.training.stages import STAGES, build_stage

    assert set(STAGES) == {"pretrain", "long_context", "sft", "dpo", "grpo"}
    with pytest.raises(ConfigError, match="stage.name='rlhf' is not a stage; choose one of pretrain, long_context"):
        build_stage(compose_config(["stage.name=rlhf"]))


def test_checkpoint_of_another_model_is_one_line_and_leaves_no_run_dir(tmp_path):
    task = make_task(tmp_path)
    other = convert_start(tmp_path, seed=0)  # hidden 48, 6 heads: not the tiny model (hidden 64, 4 heads)
    for setting in ("checkpoint.load", "stage.reference_load"):
        run_dir = tmp_path / setting
        proc = run_cli(train_command([*dpo_overrides(task, tmp_path / "cache", TINY_MODEL), *QUIET,
                                      "stage.reference=model", f"{setting}={other}_mcore", f"run_dir={run_dir}"]),
                       check=False)
        error = proc.stderr.strip().splitlines()[-1]
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert error.startswith(f"error: {other}_mcore was saved for another model shape: num_layers=2 "
                                "(this run: 4), hidden_size=48 (this run: 64)"), error
        assert not run_dir.exists()


def test_dry_run_memory_counts_both_sequences_of_a_pair_and_the_reference_copy():
    from megatron_qwen.config.memory import estimate_memory

    sft, dpo, model = (estimate_memory(validate(compose_config(o), 8)).peak for o in (
        ["experiment=sft_7b", "parallel=h100_7b_tp2"],  # DPO's layout (SFT's own preset is TP1)
        ["experiment=dpo_7b"], ["experiment=dpo_7b", "stage.reference=model"]))
    assert dpo.logits == 2 * sft.logits  # same seq and micro-batch, twice the rows
    # Twice the rows' activations; only RoPE's cos/sin tables (per position, not per row) stay put.
    assert dpo.activations == pytest.approx(2 * sft.activations, rel=0.01) and dpo.activations < 2 * sft.activations
    assert model.weights_and_optimizer - dpo.weights_and_optimizer == 2 * dpo.params  # bf16 frozen copy
