"""Throughput switches: each is on exactly when its dependency imports (or its layout applies).

Pure unit tests over the translation's arguments with explicit ``Features``: no Transformer
Engine, apex or process group is needed, and each switch is checked in both directions.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

import pytest
import yaml

from megatron_qwen.config import Config, ConfigError, validate
from megatron_qwen.config.features import Features
from megatron_qwen.config.store import CONF_DIR
from megatron_qwen.config.translate import to_ddp_config, to_optimizer_config, transformer_config_kwargs

NONE = Features()
TE = Features(te=True, te_version="2.8.0")


def _cfg(overrides: Sequence[str] = (), world: int = 1, features: Features = NONE) -> Config:
    """The default config with ``group=preset`` and ``group.field=value`` overrides applied
    (a small stand-in for Hydra's composition, which costs a second per call)."""
    sections = {"model": {"vocab_size": 256}}
    for override in overrides:
        key, value = override.split("=", 1)
        group, _, field = key.partition(".")
        if field:
            sections.setdefault(group, {})[field] = yaml.safe_load(value)
        else:
            preset = yaml.safe_load((Path(CONF_DIR) / group / f"{value}.yaml").read_text())
            sections.setdefault(group, {}).update(preset)
    cfg = Config()
    cfg = dataclasses.replace(cfg, **{g: dataclasses.replace(getattr(cfg, g), **f) for g, f in sections.items()})
    return validate(cfg, world, features)


def kwargs(overrides: Sequence[str] = (), world: int = 1, features: Features = NONE) -> dict:
    return transformer_config_kwargs(_cfg(overrides, world, features), features)


@pytest.mark.parametrize("switch", ["bias_activation_fusion", "bias_dropout_fusion"])
def test_pytorch_fusions_are_on_everywhere_unless_switched_off(switch):
    assert kwargs()[switch] is True  # no TE, no apex: megatron's own PyTorch code
    assert kwargs(["train.fusions=false"])[switch] is False


def test_cross_entropy_fusion_only_in_bf16():
    # megatron-core 0.16.1's fused version returns a bf16 logits gradient.
    assert kwargs(["precision=bf16"])["cross_entropy_loss_fusion"] is True
    assert kwargs(["precision=bf16"])["cross_entropy_fusion_impl"] == "native"
    assert kwargs(["precision=fp32"])["cross_entropy_loss_fusion"] is False
    assert kwargs(["precision=bf16", "train.fusions=false"])["cross_entropy_loss_fusion"] is False


@pytest.mark.parametrize("switch, present", [
    ("gradient_accumulation_fusion", Features(apex_wgrad=True)),
    ("apply_rope_fusion", TE),
    ("masked_softmax_fusion", Features(softmax_kernels=True)),
    ("persist_layer_norm", Features(apex_persist_ln=True)),
])
def test_kernel_library_fusions_follow_their_import(switch, present):
    assert kwargs(features=present)[switch] is True
    assert kwargs(features=NONE)[switch] is False
    assert kwargs(["train.fusions=false"], features=present)[switch] is False


def test_gradient_accumulation_fusion_needs_apex_even_with_te():
    # The output layer is megatron's ColumnParallelLinear under either spec: it needs apex's kernel.
    assert kwargs(features=TE)["gradient_accumulation_fusion"] is False


def test_rope_fusion_needs_te_1_4():
    assert kwargs(features=Features(te=True, te_version="1.3.0"))["apply_rope_fusion"] is False


@pytest.mark.parametrize("switch, minimum", [("moe_permute_fusion", "2.1"), ("moe_router_fusion", "2.7")])
def test_moe_fusions_follow_the_te_version(switch, minimum):
    moe = ["model=qwen2_moe_tiny"]
    assert kwargs(moe, features=Features(te=True, te_version=minimum))[switch] is True
    older = f"{minimum.split('.')[0]}.{int(minimum.split('.')[1]) - 1}"
    assert kwargs(moe, features=Features(te=True, te_version=older))[switch] is False
    assert kwargs(moe, features=NONE)[switch] is False


def test_tp_comm_overlap_needs_userbuffers_tp_and_sequence_parallel():
    tp2_sp = ["parallel=tp2", "parallel.tp_comm_overlap=true"]  # the tp2 preset has sp on
    ub = Features(te=True, te_version="2.8.0", te_userbuffers=True)
    assert kwargs(tp2_sp, world=2, features=ub)["tp_comm_overlap"] is True
    assert kwargs(tp2_sp, world=2, features=TE)["tp_comm_overlap"] is False  # TE without userbuffers
    assert kwargs([*tp2_sp, "parallel.sp=false"], world=2, features=ub)["tp_comm_overlap"] is False
    assert kwargs(["parallel.tp_comm_overlap=true"], features=ub)["tp_comm_overlap"] is False  # tp 1
    assert kwargs(["parallel=tp2"], world=2, features=ub)["tp_comm_overlap"] is False  # not asked for


def test_interleaved_pipelines_overlap_p2p_unbatched_and_free_stage_outputs():
    vpp = kwargs(["parallel=pp2_vpp2"], world=2)
    assert (vpp["overlap_p2p_comm"], vpp["batch_p2p_comm"], vpp["deallocate_pipeline_outputs"]) == (True, False, True)
    plain = kwargs(["parallel.pp=2"], world=2)
    assert plain["overlap_p2p_comm"] is False and "batch_p2p_comm" not in plain  # megatron's default (batched)
    assert plain["deallocate_pipeline_outputs"] is True


def test_param_gather_is_aligned_across_stages_only_when_interleaved():
    overlap = ["parallel.use_distributed_optimizer=true", "parallel.overlap_grad_reduce=true",
               "parallel.overlap_param_gather=true"]
    assert to_ddp_config(_cfg(["parallel=pp2_vpp2", *overlap], world=2)).align_param_gather is True
    assert to_ddp_config(_cfg(["parallel.pp=2", *overlap], world=2)).align_param_gather is False
    assert to_ddp_config(_cfg(["parallel=pp2_vpp2"], world=2)).align_param_gather is False


@pytest.mark.parametrize("recipe, fp8_param", [("delayed", True), ("tensorwise", True), ("blockwise", False)])
def test_fp8_params_for_delayed_and_tensorwise_with_the_distributed_optimizer(recipe, fp8_param):
    distopt = [f"precision=fp8_{recipe}", "parallel.use_distributed_optimizer=true"]
    assert kwargs(distopt, features=TE)["fp8_param"] is fp8_param
    assert to_ddp_config(_cfg(distopt, features=TE)).fp8_param_gather is fp8_param
    assert kwargs(distopt[:1], features=TE)["fp8_param"] is False  # megatron gathers FP8 only sharded
    assert kwargs([*distopt, "precision.fp8_param_gather=false"], features=TE)["fp8_param"] is False


def test_tensorwise_fp8_keeps_the_first_and_last_layer_in_bf16():
    tensorwise = kwargs(["precision=fp8_tensorwise"], features=TE)
    assert (tensorwise["first_last_layers_bf16"], tensorwise["num_layers_at_start_in_bf16"],
            tensorwise["num_layers_at_end_in_bf16"]) == (True, 1, 1)
    assert "first_last_layers_bf16" not in kwargs(["precision=fp8_delayed"], features=TE)  # megatron refuses it
    # Optional, as in Bridge's throughput recipes: every layer in FP8.
    assert "first_last_layers_bf16" not in kwargs(["precision=fp8_tensorwise", "precision.fp8_first_last_layers_bf16=false"],
                                                  features=TE)
    with pytest.raises(ConfigError, match=r"fp8_first_last_layers_bf16=false applies to precision.fp8=tensorwise only"):
        _cfg(["precision=fp8_delayed", "precision.fp8_first_last_layers_bf16=false"], features=TE)


def test_blockwise_fp8_needs_te_2_3():
    with pytest.raises(ConfigError, match=r"blockwise needs Transformer Engine >= 2.3 \(this one is 2.2.1\)"):
        _cfg(["precision=fp8_blockwise"], features=Features(te=True, te_version="2.2.1"))
    _cfg(["precision=fp8_blockwise"], features=Features(te=True, te_version="2.3.0"))


def test_cross_entropy_fusion_uses_te_where_it_imports():
    assert kwargs(["precision=bf16"], features=TE)["cross_entropy_fusion_impl"] == "te"
    assert kwargs(["precision=bf16"], features=Features(te=True, te_version="1.13"))[
        "cross_entropy_fusion_impl"] == "native"
    assert kwargs(["precision=bf16"], features=NONE)["cross_entropy_fusion_impl"] == "native"


DISTOPT = ["parallel.use_distributed_optimizer=true", "parallel.overlap_grad_reduce=true",
           "parallel.overlap_param_gather=true"]


def test_gradients_are_reduced_in_bf16_when_asked():
    assert to_ddp_config(_cfg(["precision=bf16"])).grad_reduce_in_fp32 is True
    assert to_ddp_config(_cfg(["precision=bf16", "precision.grad_reduce_in_fp32=false"])).grad_reduce_in_fp32 is False
    with pytest.raises(ConfigError, match=r"grad_reduce_in_fp32=false needs precision.dtype=bf16 .*got fp32"):
        _cfg(["precision=fp32", "precision.grad_reduce_in_fp32=false"])


def test_ddp_bucket_size_is_counted_in_the_reduce_dtype():
    assert to_ddp_config(_cfg(DISTOPT)).bucket_size is None  # megatron's default
    fp32 = to_ddp_config(_cfg([*DISTOPT, "parallel.ddp_bucket_mb=128"])).bucket_size
    bf16 = to_ddp_config(_cfg([*DISTOPT, "parallel.ddp_bucket_mb=128", "precision=bf16",
                               "precision.grad_reduce_in_fp32=false"])).bucket_size
    assert (fp32, bf16) == (128 * 2**20 // 4, 128 * 2**20 // 2)
    with pytest.raises(ConfigError, match=r"ddp_bucket_mb=128 takes effect only with parallel.overlap_grad_reduce"):
        _cfg(["parallel.ddp_bucket_mb=128"])
    with pytest.raises(ConfigError, match=r"ddp_bucket_mb=0 must be > 0"):
        _cfg([*DISTOPT, "parallel.ddp_bucket_mb=0"])


def test_param_gather_overlaps_the_optimizer_step_only_when_interleaved():
    switch = "parallel.overlap_param_gather_with_optimizer_step=true"
    no_saves = ["checkpoint.save_interval=null", "checkpoint.save_at_end=false"]
    on = to_optimizer_config(_cfg(["parallel=pp2_vpp2", *DISTOPT, *no_saves, switch], world=2))
    assert on.overlap_param_gather_with_optimizer_step is True
    off = to_optimizer_config(_cfg(["parallel=pp2_vpp2", *DISTOPT], world=2))
    assert off.overlap_param_gather_with_optimizer_step is False
    with pytest.raises(ConfigError, match=r"overlap_param_gather_with_optimizer_step=true needs .* vpp=None"):
        _cfg(["parallel.pp=2", *DISTOPT, *no_saves, switch], world=2)
    with pytest.raises(ConfigError, match=r"is for runs that save no checkpoint .*save_interval=100, save_at_end=True\)"):
        _cfg(["parallel=pp2_vpp2", *DISTOPT, switch], world=2)


def test_embedding_wgrad_is_deferred_into_the_flush_with_apex_and_a_pipeline():
    defer = ["parallel.pp=2", "parallel.defer_embedding_wgrad=true", "parallel.wgrad_deferral_limit=3"]
    apex = Features(apex_wgrad=True)
    on = kwargs(defer, world=2, features=apex)
    assert (on["defer_embedding_wgrad_compute"], on["wgrad_deferral_limit"]) == (True, 3)
    assert kwargs(defer, world=2, features=NONE)["defer_embedding_wgrad_compute"] is False  # megatron needs apex
    assert kwargs(["parallel.pp=2"], world=2, features=apex)["defer_embedding_wgrad_compute"] is False
    with pytest.raises(ConfigError, match=r"defer_embedding_wgrad=true needs parallel.pp > 1 \(got pp=1\)"):
        _cfg(["parallel.defer_embedding_wgrad=true"])
    with pytest.raises(ConfigError, match=r"wgrad_deferral_limit=3 is read only with parallel.defer_embedding_wgrad"):
        _cfg(["parallel.pp=2", "parallel.wgrad_deferral_limit=3"], world=2)


def test_without_optional_libraries_megatron_accepts_every_switch():
    from megatron.core.transformer import TransformerConfig

    for overrides, world in ((["precision=bf16"], 1), (["parallel=pp2_vpp2"], 2), (["parallel=tp2"], 2)):
        TransformerConfig(**kwargs(overrides, world))


UB = Features(te=True, te_version="2.8.0", te_userbuffers=True)


@pytest.fixture
def userbuffers(monkeypatch):
    """A stand-in for Transformer Engine's ``initialize_ub``: (the calls it received, its module)."""
    import enum
    import sys
    import types

    from megatron_qwen.platform import parallel

    calls = []
    base = types.SimpleNamespace(initialize_ub=lambda **kw: calls.append(kw),
                                 UserBufferQuantizationMode=enum.Enum("Mode", "NONE FP8"))
    module = types.ModuleType("transformer_engine.pytorch.module")
    module.base = base
    pytorch = types.ModuleType("transformer_engine.pytorch")
    pytorch.module = module
    monkeypatch.setitem(sys.modules, "transformer_engine", types.ModuleType("transformer_engine"))
    monkeypatch.setitem(sys.modules, "transformer_engine.pytorch", pytorch)
    monkeypatch.setitem(sys.modules, "transformer_engine.pytorch.module", module)
    monkeypatch.setattr(parallel.features, "detect", lambda: UB)
    return calls, base


def test_userbuffers_are_allocated_for_one_micro_batch_when_overlap_is_on(userbuffers):
    from megatron_qwen.platform import parallel

    calls, base = userbuffers
    cfg = _cfg(["parallel=tp2", "parallel.tp_comm_overlap=true", "precision=fp8_tensorwise",
                "train.seq_length=64", "train.micro_batch_size=2"], world=2, features=UB)
    parallel.init_tp_comm_overlap(cfg)
    modes = base.UserBufferQuantizationMode
    assert calls == [{"shape": [128, 64], "tp_size": 2, "ub_cfgs": {}, "bootstrap_backend": "nccl",
                      "quantization_modes": [modes.FP8, modes.NONE]}]
    parallel.init_tp_comm_overlap(dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, sp=False)))
    assert len(calls) == 1  # no overlap without sequence parallel: nothing allocated


def test_manual_gc_collects_at_the_same_steps_on_every_rank(monkeypatch):
    import gc

    from megatron_qwen.training.resilience.manual_gc import ManualGC

    collected = []
    monkeypatch.setattr(gc, "collect", lambda: collected.append(True))
    manual = ManualGC(3)
    try:
        assert not gc.isenabled() and len(collected) == 1  # automatic GC off, one clean start
        for it in range(1, 8):
            manual.step(it)
        assert len(collected) == 3  # after steps 3 and 6
    finally:
        manual.close()
    assert gc.isenabled()
    ManualGC(0).step(3)
    assert gc.isenabled() and len(collected) == 3  # interval 0: Python's own schedule


@pytest.mark.parametrize("stage,rows", [("pretrain", 1), ("long_context", 1), ("sft", 1), ("dpo", 2), ("grpo", 3)])
def test_userbuffers_hold_exactly_the_schedules_micro_batch(userbuffers, monkeypatch, stage, rows):
    """TE checks the buffer size exactly: a DPO micro-batch of b pairs is 2b rows, a GRPO one b x G."""
    from megatron_qwen.platform import parallel
    from megatron_qwen.training import step
    from megatron_qwen.training.stages import build_stage

    calls, _ = userbuffers
    cfg = Config()
    cfg.parallel = dataclasses.replace(cfg.parallel, tp=2, cp=2, dp=1, sp=True, tp_comm_overlap=True)
    cfg.train = dataclasses.replace(cfg.train, seq_length=64, micro_batch_size=2)
    cfg.stage = dataclasses.replace(cfg.stage, name=stage, group_size=3)
    parallel.init_tp_comm_overlap(cfg)
    scheduled = []
    monkeypatch.setattr(step, "get_forward_backward_func", lambda: lambda **kw: scheduled.append(kw) or [])
    stage_obj = build_stage(cfg)
    stage_obj.before_step = lambda iterators, n, training: iterators  # no data: the shape is what counts
    step.run_microbatches(stage_obj, [object()], [iter(())], 1, 64, 2, forward_only=True)
    [kw] = scheduled
    assert kw["micro_batch_size"] == 2 * rows
    assert calls[0]["shape"] == [kw["seq_length"] // 2 * kw["micro_batch_size"], cfg.model.hidden_size]


def test_explicit_pipeline_layout_is_forwarded_and_checked():
    layout = ["parallel.pp=2", "parallel.vpp=2", "parallel.pp_layout=Et|t|t|tL"]
    assert kwargs(layout, world=2)["pipeline_model_parallel_layout"] == "Et|t|t|tL"
    assert kwargs(["parallel=pp2_vpp2"], world=2)["pipeline_model_parallel_layout"] is None
    with pytest.raises(ConfigError, match=r"pp_layout places 3 decoder layers \(t\) but model.num_layers=4"):
        _cfg(["parallel.pp=2", "parallel.vpp=2", "parallel.pp_layout=Et|t|t|L"], world=2)
    with pytest.raises(ConfigError, match=r"pp_layout has 2 stages but pp\*vpp = 2\*2 = 4"):
        _cfg(["parallel.pp=2", "parallel.vpp=2", "parallel.pp_layout=Ett|ttL"], world=2)
    with pytest.raises(ConfigError, match=r"must use only E, t, L, start with E"):
        _cfg(["parallel.pp=2", "parallel.vpp=2", "parallel.pp_layout=tt|t|t|EL"], world=2)


def test_72b_layout_unloads_the_output_stage_as_bridge_does():
    from megatron_qwen.config.memory import layout_rank_layers

    layout = yaml.safe_load((Path(CONF_DIR) / "parallel" / "h100_72b.yaml").read_text())["pp_layout"]
    per_rank = [layout_rank_layers(layout, 8, r) for r in range(8)]
    assert [len(layers) for layers in per_rank] == [10, 10, 10, 11, 10, 10, 10, 9]  # rank 7 also has the output layer
    assert sorted(i for layers in per_rank for i in layers) == list(range(80))
    assert per_rank[7][-1] == 79 and per_rank[0][:2] == [0, 1]


FAST = Features(te=True, te_version="2.8.0", apex_wgrad=True, te_userbuffers=True, fused_adam=True)


def test_cluster_slurm_h100_refuses_to_start_without_the_fast_path():
    from megatron_qwen.config.validate import check_fast_path

    h100 = _cfg(["cluster=slurm_h100", "parallel=tp2", "parallel.tp_comm_overlap=true"], world=2)
    assert h100.cluster.require_fast_path is True
    check_fast_path(h100, FAST)
    with pytest.raises(ConfigError, match=r"^cluster=slurm_h100 needs the fast path, but Transformer Engine "
                                          r"\(transformer_engine.pytorch\), apex's fused gradient accumulation .*, "
                                          r"Transformer Engine userbuffers .*, a fused Adam .* do not import here .* "
                                          r"cluster.require_fast_path=false$"):
        check_fast_path(h100, NONE)
    with pytest.raises(ConfigError, match=r"but Transformer Engine userbuffers \(TE >= 1.9, for parallel.tp_comm_overlap\) "
                                          r"does not import"):
        check_fast_path(h100, dataclasses.replace(FAST, te_userbuffers=False))
    with pytest.raises(ConfigError, match=r"but apex's fused gradient accumulation"):
        check_fast_path(h100, dataclasses.replace(FAST, apex_wgrad=False))
    with pytest.raises(ConfigError, match=r"but a fused Adam \(transformer_engine.pytorch.optimizers or apex.optimizers\) "
                                          r"does not import"):
        check_fast_path(h100, dataclasses.replace(FAST, fused_adam=False))
    no_overlap = dataclasses.replace(h100, parallel=dataclasses.replace(h100.parallel, tp_comm_overlap=False))
    check_fast_path(no_overlap, dataclasses.replace(FAST, te_userbuffers=False))  # userbuffers not needed
    slow_ok = dataclasses.replace(h100, cluster=dataclasses.replace(h100.cluster, require_fast_path=False))
    check_fast_path(slow_ok, NONE)
    check_fast_path(_cfg(), NONE)  # the local cluster accepts what imports


def test_a_slurm_h100_run_without_the_fast_path_stops_before_writing(tmp_path, monkeypatch):
    from megatron_qwen.config import features
    from megatron_qwen.train import run

    monkeypatch.setattr(features, "detect", lambda: NONE)  # neither Transformer Engine nor apex
    run_dir = tmp_path / "run"
    cfg = dataclasses.replace(_cfg(["cluster=slurm_h100"]), run_dir=str(run_dir))
    with pytest.raises(ConfigError, match="cluster.require_fast_path=false"):
        run(cfg)
    assert not run_dir.exists()


def test_dry_run_prints_the_resolved_switches(capsys):
    from megatron_qwen.config.translate import format_switches

    line = format_switches(_cfg(["parallel=pp2_vpp2", *DISTOPT, "parallel.ddp_bucket_mb=1"], world=2), FAST)
    assert line.startswith("switches: spec=te, gradient_accumulation_fusion=True,")
    assert "overlap_p2p_comm=True" in line and f"bucket_size={2**20 // 4}" in line
    assert "spec=local, gradient_accumulation_fusion=False" in format_switches(_cfg(), NONE)
