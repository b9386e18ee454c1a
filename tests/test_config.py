"""Config composition, validation and translation (no process group, no model)."""

import re

import pytest
import torch

from megatron_qwen.config import ConfigError, validate
from megatron_qwen.config.params import count_parameters, flops_per_token
from megatron_qwen.config.store import compose_config
from megatron_qwen.config.translate import to_ddp_config, to_optimizer_config, to_transformer_config

# Published totals / non-embedding counts (../shared/DESIGN.md §5), in billions, from the model cards.
PUBLISHED = {
    "qwen2_5_0_5b": (0.49, 0.36), "qwen2_5_1_5b": (1.54, 1.31), "qwen2_5_3b": (3.09, 2.77),
    "qwen2_5_7b": (7.61, 6.53), "qwen2_5_14b": (14.7, 13.1), "qwen2_5_32b": (32.5, 31.0),
    "qwen2_5_72b": (72.7, 70.0),
}
# NOTE: the Qwen2.5-32B card says 32.5B / 31.0B, but its config.json shapes (64 layers,
# hidden 5120, ffn 27648, 40/8 heads, untied 152064 vocab) give 32.76B / 31.21B, which is
# also what the released safetensors hold. We check the exact shape-derived value there.
EXACT = {"qwen2_5_32b": 32_763_876_352}


def _agrees(value: int, published: float) -> bool:
    """Equal to the card's precision: within one unit of its last printed digit."""
    unit = 10.0 ** -len(str(published).split(".")[1])
    return abs(value / 1e9 - published) < unit


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_every_size_composes_validates_and_matches_published_count(name):
    cfg = validate(compose_config([f"model={name}"]), world_size=1)
    counts = count_parameters(cfg.model)
    total, non_embedding = PUBLISHED[name]
    if name in EXACT:
        assert counts.total == EXACT[name]
    else:
        assert _agrees(counts.total, total), f"{name}: {counts.total / 1e9:.3f}B vs {total}B"
        # The cards' non-embedding figures are looser (14B: 13.21 vs 13.1, 72B: 70.2 vs 70.0).
        assert counts.non_embedding / 1e9 == pytest.approx(non_embedding, rel=0.02)
    assert cfg.model.tie_word_embeddings == (name in ("qwen2_5_0_5b", "qwen2_5_1_5b", "qwen2_5_3b"))
    assert cfg.model.vocab_size in (151936, 152064)


def test_tiny_model_supports_the_test_layouts():
    for world, overrides in [(2, ["parallel.tp=2", "parallel.sp=true"]), (2, ["parallel.pp=2", "parallel.vpp=2"]),
                             (4, ["parallel.tp=2", "parallel.pp=2"])]:
        validate(compose_config(["model=qwen2_5_tiny", "train.global_batch_size=8", *overrides]), world)


@pytest.mark.parametrize("overrides,world,expected", [
    (["model=qwen2_5_0_5b", "parallel.tp=3"], 3, "num_attention_heads=14 is not divisible by parallel.tp=3"),
    (["parallel.tp=2", "parallel.pp=2"], 6, "world size 6 is not divisible by tp*pp*cp = 2*2*1 = 4"),
    (["parallel.pp=2", "parallel.vpp=4"], 2, "num_layers=4 is not divisible by pp*vpp = 2*4 = 8"),
    (["precision=fp8_delayed"], 1, "needs Transformer Engine"),
    (["model=qwen2_5_7b", "parallel.tp=8"], 8, "num_query_groups=4 (KV heads) is not divisible by parallel.tp=8"),
    (["train.global_batch_size=6", "train.micro_batch_size=4"], 1, "global_batch_size=6 is not divisible"),
    (["train.global_batch_size=0"], 1, "train.global_batch_size=0 must be >= 1"),  # hypothesis found it
    (["parallel.sp=true"], 1, "parallel.sp=true needs parallel.tp > 1"),
    (["optim.decay_style=wsd"], 1, "needs optim.wsd_decay_iters"),
])
def test_bad_configs_fail_early_with_the_numbers(overrides, world, expected):
    with pytest.raises(ConfigError, match=expected.replace("*", r"\*").replace("(", r"\(").replace(")", r"\)")):
        validate(compose_config(overrides), world)


def test_dp_is_derived_from_world_size():
    cfg = validate(compose_config(["parallel.tp=2", "train.micro_batch_size=2", "train.global_batch_size=16"]),
                   world_size=8)
    assert cfg.parallel.dp == 4


def test_translation_carries_qwen_architecture_and_layout():
    cfg = validate(compose_config(["model=qwen2_5_7b", "parallel.tp=2", "parallel.sp=true", "parallel.pp=2",
                                   "parallel.vpp=2", "precision=bf16", "parallel.recompute=selective",
                                   "parallel.use_distributed_optimizer=true", "train.global_batch_size=16"]), 8)
    tc = to_transformer_config(cfg)
    assert (tc.num_layers, tc.hidden_size, tc.ffn_hidden_size) == (28, 3584, 18944)
    assert (tc.num_attention_heads, tc.num_query_groups, tc.kv_channels) == (28, 4, 128)
    assert tc.normalization == "RMSNorm" and tc.gated_linear_unit and tc.add_qkv_bias and not tc.add_bias_linear
    assert tc.activation_func is torch.nn.functional.silu
    assert tc.layernorm_epsilon == 1e-6 and tc.hidden_dropout == 0.0 and tc.attention_dropout == 0.0
    assert tc.tensor_model_parallel_size == 2 and tc.sequence_parallel
    assert tc.pipeline_model_parallel_size == 2 and tc.virtual_pipeline_model_parallel_size == 2
    assert tc.params_dtype == torch.bfloat16 and tc.bf16
    assert tc.recompute_granularity == "selective"
    assert tc.calculate_per_token_loss
    assert to_ddp_config(cfg).use_distributed_optimizer
    opt = to_optimizer_config(cfg)
    assert opt.use_distributed_optimizer and opt.bf16 and opt.lr == cfg.optim.lr


def test_flops_per_token_matches_the_design_anchor():
    # DESIGN §6: Qwen2.5-0.5B at s=4096 reaches 113k tokens/s at 40% MFU on one H100 (989 TFLOP/s).
    m = compose_config(["model=qwen2_5_0_5b"]).model
    assert flops_per_token(m, 4096) == pytest.approx(0.40 * 989e12 / 113e3, rel=0.01)
    # Hand count for the tiny model: 6 * (matmul params + output layer) + 6 * q * L * s.
    t = compose_config(["model=qwen2_5_tiny", "model.vocab_size=256"]).model
    per_layer = 64 * (64 + 2 * 32) + 64 * 64 + 3 * 64 * 128
    assert flops_per_token(t, 32) == 6 * (4 * per_layer + 64 * 256) + 6 * 64 * 4 * 32


def test_cli_rejects_a_bad_layout_in_one_line_and_leaves_no_run_dir(tmp_path):
    from tests.helpers import run_cli, train_command

    run_dir = tmp_path / "run"
    # As rank 0 of 4 (torchrun's variables): 14 heads and 2 KV heads cannot be split 4 ways.
    proc = run_cli(train_command(["model=qwen2_5_0_5b", "parallel.tp=4", f"run_dir={run_dir}"]),
                   check=False, env={"WORLD_SIZE": "4", "RANK": "0"}, timeout=120)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1
    assert "num_attention_heads=14 is not divisible by parallel.tp=4" in errors[0]
    assert "num_query_groups=2 (KV heads) is not divisible by parallel.tp=4" in errors[0]
    assert not run_dir.exists()


@pytest.mark.parametrize("overrides", [
    ["train.train_iters=10", "optim.warmup_iters=10"],
    ["train.train_iters=null", "train.train_samples=40", "train.global_batch_size=4", "optim.warmup_iters=12"],
    ["train.train_iters=100", "optim.lr_decay_iters=20", "optim.warmup_iters=20"],
])
def test_warmup_must_end_before_the_decay(overrides):
    # megatron's scheduler asserts warmup < decay steps; we say it before anything starts.
    with pytest.raises(ConfigError, match="lower optim.warmup_iters"):
        validate(compose_config(overrides), 1)


@pytest.mark.parametrize("overrides,warmup", [
    (["train.train_iters=6"], 1),  # the first thing a newcomer tries: no second override needed
    (["train.train_iters=80"], 20),
    (["train.train_iters=100000"], 2000),  # capped
    (["train.train_iters=null", "train.train_samples=40", "train.global_batch_size=4"], 2),
    (["train.train_iters=100", "optim.lr_decay_iters=20"], 5),
    (["train.train_iters=6", "optim.warmup_iters=3"], 3),  # explicit values are kept
])
def test_default_warmup_fits_the_run(overrides, warmup):
    cfg = validate(compose_config(overrides), 1)
    assert cfg.optim.warmup_iters == warmup


@pytest.mark.parametrize("overrides,world,expected", [
    (["parallel.cp=2", "train.seq_length=98"], 2,
     "train.seq_length=98 is not divisible by 2*parallel.cp = 4 (context parallelism"),
    (["parallel.cp=2", "parallel.tp=2", "parallel.sp=true", "train.seq_length=36"], 4, None),
    (["parallel.cp=2", "parallel.tp=4", "parallel.sp=true", "train.seq_length=36", "model.num_query_groups=4"], 8,
     "18 tokens per CP rank is not divisible by parallel.tp=4 (sequence parallel); use a multiple of 16"),
    (["data=sft_example", "parallel.cp=2", "+data.extra.pad_to_multiple_of=6"], 2,
     "data.extra.pad_to_multiple_of=6 is not a multiple of 2*parallel.cp = 4"),
    (["data=sft_example", "+data.extra.pad_to_multiple_of=48"], 1,
     "train.seq_length=128 is not divisible by data.extra.pad_to_multiple_of=48"),
    (["parallel.cp=2", "parallel.cp_comm_type=p2p"], 2, "parallel.cp_comm_type=p2p needs Transformer Engine"),
    (["parallel.cp=2", "parallel.cp_comm_type=ring"], 2, "parallel.cp_comm_type='ring' must be one of"),
    (["parallel.cp_comm_type=all_gather"], 1, "parallel.cp_comm_type=all_gather needs parallel.cp > 1"),
    (["model.rope_scaling.type=yarn", "model.rope_scaling.factor=4"], 1,
     "model.rope_scaling.original_max_position_embeddings is missing; set all three fields"),
    (["model.rope_scaling.factor=4", "model.rope_scaling.original_max_position_embeddings=64"], 1,
     "model.rope_scaling.type is missing"),
    (["model.rope_scaling.type=linear", "model.rope_scaling.factor=4",
      "model.rope_scaling.original_max_position_embeddings=64"], 1, "model.rope_scaling.type='linear' must be one of"),
])
def test_long_context_rules_fail_early_with_the_numbers(overrides, world, expected):
    cfg = compose_config(["train.global_batch_size=16", *overrides])
    if expected is None:
        assert validate(cfg, world).parallel.dp == world // 4
        return
    with pytest.raises(ConfigError, match=re.escape(expected)):
        validate(cfg, world)


def test_context_parallel_and_yarn_reach_megatrons_config():
    from megatron_qwen.config.features import Features

    cfg = validate(compose_config(["parallel.cp=2", "model.rope_scaling.type=yarn", "model.rope_scaling.factor=4",
                                   "model.rope_scaling.original_max_position_embeddings=64"]), 2)
    local = to_transformer_config(cfg, Features())
    assert local.context_parallel_size == 2 and local.cp_comm_type == "all_gather"
    assert (local.yarn_rotary_scaling_factor, local.yarn_original_max_position_embeddings) == (4.0, 64)
    assert not local.apply_rope_fusion and local.yarn_correction_range_round_to_int
    assert to_transformer_config(cfg, Features(te=True, te_version="2.8")).cp_comm_type == "p2p"  # TE's ring
    plain = to_transformer_config(validate(compose_config([]), 1), Features())
    assert not hasattr(plain, "yarn_rotary_scaling_factor")  # megatron would apply YaRN's attention factor


def test_uneven_pipeline_split_is_validated_and_translated():
    from megatron_qwen.config.params import pipeline_stage_sizes

    assert pipeline_stage_sizes(3, 2, first=2) == [2, 1]
    assert pipeline_stage_sizes(30, 4, first=6, last=6) == [6, 9, 9, 6]
    cfg = validate(compose_config(["model=qwen2_5_7b", "parallel.pp=4", "parallel.pp_first_stage_layers=4",
                                   "parallel.pp_last_stage_layers=6", "train.global_batch_size=8"]), 4)
    tc = to_transformer_config(cfg)  # 28 layers: 4 + 9 + 9 + 6
    assert (tc.num_layers_in_first_pipeline_stage, tc.num_layers_in_last_pipeline_stage) == (4, 6)
    with pytest.raises(ConfigError, match="cannot be split over pp=4 stages"):
        validate(compose_config(["model=qwen2_5_7b", "parallel.pp=4", "parallel.pp_first_stage_layers=5",
                                 "train.global_batch_size=8"]), 4)
    with pytest.raises(ConfigError, match="need pp > 1 and no vpp"):
        validate(compose_config(["parallel.pp=2", "parallel.vpp=2", "parallel.pp_first_stage_layers=1"]), 2)
    with pytest.raises(ConfigError, match="pp_first_stage_layers / pp_last_stage_layers for an uneven split"):
        validate(compose_config(["model.num_layers=3", "parallel.pp=2"]), 2)


def test_transformer_engine_context_parallel_communication_is_validated():
    from megatron_qwen.config.features import Features
    from megatron_qwen.config.translate import transformer_config_kwargs

    te = Features(te=True, te_version="2.8")
    for kind in ("p2p", "all_gather", "a2a"):
        cfg = validate(compose_config(["parallel.cp=2", f"parallel.cp_comm_type={kind}"]), 2, te)
        # (the kwargs: TransformerConfig itself would import the TE kernels the switches name)
        assert transformer_config_kwargs(cfg, te)["cp_comm_type"] == kind
    # a2a scatters heads over CP ranks: the tiny model's 2 KV heads cannot go 4 ways.
    with pytest.raises(ConfigError, match="KV heads per TP rank are not divisible by parallel.cp=4"):
        validate(compose_config(["parallel.cp=4", "parallel.cp_comm_type=a2a"]), 4, te)


@pytest.mark.parametrize("overrides,expected", [
    (["stage=grpo", "stage.sft_weight=0.5", "stage.label_smoothing=0.2"],
     ["stage.label_smoothing=0.2 is a setting of stage=dpo, which stage=grpo does not read: remove the override",
      "stage.sft_weight=0.5 is a setting of stage=dpo, which stage=grpo does not read"]),
    (["stage=dpo", "stage.group_size=3"], ["stage.group_size=3 is a setting of stage=grpo, which stage=dpo does not read"]),
    (["stage=sft", "stage.beta=0.2"], ["stage.beta=0.2 is a setting of stage=dpo/grpo, which stage=sft does not read"]),
])
def test_a_setting_of_another_stage_is_refused_not_ignored(overrides, expected):
    with pytest.raises(ConfigError) as err:
        validate(compose_config(overrides), world_size=1)
    for message in expected:
        assert message in str(err.value)


def test_every_stage_setting_is_read_by_some_stage_and_every_preset_passes():
    import dataclasses

    from megatron_qwen.config.schema import StageConfig
    from megatron_qwen.config.validate import STAGE_SETTINGS

    read = {name for fields in STAGE_SETTINGS.values() for name in fields}
    assert {f.name for f in dataclasses.fields(StageConfig)} - read == {"name"}  # a new field needs its stage
    for stage in STAGE_SETTINGS:
        validate(compose_config([f"stage={stage}"]), world_size=1)  # the stage presets set only their own


def test_settings_nothing_reads_do_not_exist():
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException):  # one line on the CLI (megatron_qwen/cli.py)
        compose_config(["checkpoint.load_optimizer=false"])
