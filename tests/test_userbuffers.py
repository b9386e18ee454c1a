"""Per-GEMM userbuffer settings for TP communication overlap (config/userbuffers.py): what
Transformer Engine's ``initialize_ub`` receives (through the stand-in of tests/test_switches.py),
Megatron-Bridge's tuned H100 entries, the YAML file form and the refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from megatron_qwen.config import ConfigError
from megatron_qwen.config.store import CONF_DIR
from megatron_qwen.config.translate import format_switches
from tests.test_switches import UB, _cfg, userbuffers  # noqa: F401 (the stand-in fixture)

# Transcribed from Megatron-Bridge src/megatron/bridge/training/comm_overlap.py (commit 067f987),
# userbuffers_{bf16,fp8}_h100_h8192_tp4_mbs1_seqlen8192 as dataclasses.asdict gives them to TE
# (PipelineOverlapCfg's fp8_buf default is the tuple (False,) there; TE reads it only for FP8 buffers).
_RING = {"aggregate": False, "method": "ring_exchange", "num_sm": 1, "cga_size": 1, "set_sm_margin": False,
         "fp8_buf": False, "atomic_gemm": False}
_BRIDGE_H8192_TP4 = {
    "qkv_dgrad": {"num_sm": 4, "cga_size": 2, "set_sm_margin": False, "method": "bulk"},
    "qkv_wgrad": {"num_sm": 24, "cga_size": 2, "set_sm_margin": False, "method": "bulk"},
    "fc1_dgrad": {"num_sm": 2, "cga_size": 2, "set_sm_margin": False, "method": "bulk"},
    "fc1_wgrad": {"num_sm": 4, "cga_size": 2, "set_sm_margin": False, "method": "bulk"},
    "qkv_fprop": _RING, "proj_dgrad": _RING, "fc1_fprop": _RING, "fc2_dgrad": _RING,
}
BRIDGE_BF16 = {**_BRIDGE_H8192_TP4,
               "proj_fprop": {"num_sm": 24, "cga_size": 2, "num_splits": 4, "set_sm_margin": True, "fp8_buf": False,
                              "atomic_gemm": False, "method": "pipeline"},
               "fc2_fprop": {"num_sm": 16, "cga_size": 2, "num_splits": 4, "set_sm_margin": True, "fp8_buf": False,
                             "atomic_gemm": False, "method": "pipeline"}}
BRIDGE_FP8 = {**_BRIDGE_H8192_TP4, "proj_fprop": {**_RING, "set_sm_margin": True},
              "fc2_fprop": {**_RING, "set_sm_margin": True}}
Q72B = ["model=qwen2_5_72b", "parallel=h100_72b", "train.seq_length=4096", "train.micro_batch_size=1",
        "train.global_batch_size=8"]
TP2 = ["parallel=tp2", "parallel.tp_comm_overlap=true"]


@pytest.mark.parametrize("precision,expected", [("bf16", BRIDGE_BF16), ("fp8_tensorwise", BRIDGE_FP8)])
def test_72b_at_tp4_gets_bridges_tuned_userbuffers(userbuffers, precision, expected):
    from megatron_qwen.platform import parallel

    calls, _ = userbuffers
    cfg = _cfg([*Q72B, f"precision={precision}"], world=32, features=UB)
    parallel.init_tp_comm_overlap(cfg)
    parallel.init_tp_comm_overlap(cfg)  # a second run gets the table's values, not the first run's dict
    assert calls[0]["ub_cfgs"] == calls[1]["ub_cfgs"] == expected and calls[0]["shape"] == [4096, 8192]
    assert calls[0]["ub_cfgs"] is not calls[1]["ub_cfgs"]
    te_default = _cfg([*Q72B, f"precision={precision}", "parallel.tp_comm_overlap_cfg=te_default"], world=32,
                      features=UB)
    parallel.init_tp_comm_overlap(te_default)
    assert calls[2]["ub_cfgs"] == {}  # TE's defaults, as before this setting existed


def test_fp8_without_bf16_first_and_last_layers_gets_fp8_buffers_only(userbuffers):
    from megatron_qwen.platform import parallel

    calls, base = userbuffers
    modes = base.UserBufferQuantizationMode
    for bf16_ends, expected in ((True, [modes.FP8, modes.NONE]), (False, [modes.FP8])):
        cfg = _cfg([*Q72B, "precision=fp8_tensorwise", f"precision.fp8_first_last_layers_bf16={bf16_ends}"],
                   world=32, features=UB)
        parallel.init_tp_comm_overlap(cfg)
        assert calls[-1]["quantization_modes"] == expected


# Every H100 parallel preset, with its model and the world of one model replica: the entry 'auto'
# picks (None: TP overlap does not apply, nothing is allocated).
PRESETS = {
    "h100_72b": ("qwen2_5_72b", 32, "auto: Megatron-Bridge userbuffers_{}_h100_h8192_tp4_mbs1_seqlen8192"),
    "h100_7b": ("qwen2_5_7b", 1, None),
    "h100_7b_tp2": ("qwen2_5_7b", 2, "auto: te_default (no Megatron-Bridge H100 entry for hidden 3584 at tp 2)"),
    "h100_57b_a14b": ("qwen2_moe_57b_a14b", 32,
                      "auto: te_default (no Megatron-Bridge H100 entry for hidden 3584 at tp 2)"),
}


def test_every_h100_preset_has_its_auto_choice_listed():
    assert set(PRESETS) == {p.stem for p in (Path(CONF_DIR) / "parallel").glob("h100_*.yaml")}


@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("precision", ["bf16", "fp8_tensorwise"])
def test_auto_choice_of_each_h100_preset_is_in_the_dry_run_switches(preset, precision):
    model, world, expected = PRESETS[preset]
    cfg = _cfg([f"model={model}", f"parallel={preset}", f"precision={precision}", "train.micro_batch_size=1",
                "train.global_batch_size=8"],
               world=world, features=UB)
    shown = _switches(cfg)
    if expected is None:
        assert shown["tp_comm_overlap"] == "False" and "tp_comm_overlap_cfg" not in shown
    else:
        assert shown["tp_comm_overlap"] == "True"
        assert shown["tp_comm_overlap_cfg"] == expected.format("fp8" if precision != "bf16" else "bf16")


def _switches(cfg) -> dict:
    """The dry run's ``switches: k=v, k=v`` line as a dict."""
    return dict(item.split("=", 1) for item in format_switches(cfg, UB).removeprefix("switches: ").split(", "))


def test_a_yaml_file_is_passed_to_te_as_megatron_lm_reads_it(userbuffers, tmp_path):
    from megatron_qwen.platform import parallel

    calls, _ = userbuffers
    path = tmp_path / "ub.yaml"
    path.write_text("qkv_dgrad: {method: bulk, num_sm: 8, cga_size: 2, set_sm_margin: false}\n"
                    "fc2_fprop:\n  method: ring_exchange\n  num_sm: 1\n  set_sm_margin: true\n")
    cfg = _cfg([*TP2, f"parallel.tp_comm_overlap_cfg={path}"], world=2, features=UB)
    parallel.init_tp_comm_overlap(cfg)
    assert calls[0]["ub_cfgs"] == {"qkv_dgrad": {"method": "bulk", "num_sm": 8, "cga_size": 2, "set_sm_margin": False},
                                   "fc2_fprop": {"method": "ring_exchange", "num_sm": 1, "set_sm_margin": True}}
    assert _switches(cfg)["tp_comm_overlap_cfg"] == str(path)
    path.write_text(yaml.safe_dump(BRIDGE_BF16))  # Bridge's own entry, written out, passes the checks
    parallel.init_tp_comm_overlap(_cfg([*TP2, f"parallel.tp_comm_overlap_cfg={path}"], world=2, features=UB))
    assert calls[1]["ub_cfgs"] == BRIDGE_BF16


@pytest.mark.parametrize("text,message", [
    ("qkv_dgrad: {num_sms: 8}", r"qkv_dgrad.num_sms is not a userbuffer setting \(method, num_sm, .*\); "
                                r"rename or remove it in the file"),
    ("qkv_fprp: {num_sm: 1}", r"'qkv_fprp' is not a GEMM Transformer Engine overlaps \(qkv_fprop, .*\); "
                              r"rename or remove it in the file"),
    ("qkv_fprop: {method: pipeline}", r"qkv_fprop.method='pipeline' is not one Transformer Engine runs for "
                                      r"qkv_fprop \(ring_exchange\); change it in the file"),
    ("fc2_fprop: {num_sm: '16', set_sm_margin: 1}", r"fc2_fprop.num_sm='16' must be an integer; change it in "
                                                    r"the file; .*fc2_fprop.set_sm_margin=1 must be true or false"),
    ("- qkv_dgrad", r"must map GEMM names to their settings"),
    ("qkv_dgrad: {num_sm: [", r"not valid YAML \(.*\); fix the file"),
])
def test_a_bad_yaml_file_is_refused_in_one_line_naming_the_key(tmp_path, text, message):
    path = tmp_path / "ub.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=rf"parallel.tp_comm_overlap_cfg={path}: {message}") as err:
        _cfg([*TP2, f"parallel.tp_comm_overlap_cfg={path}"], world=2, features=UB)
    assert "\n" not in str(err.value)


def test_the_setting_is_refused_where_nothing_reads_it(tmp_path):
    with pytest.raises(ConfigError, match=r"parallel.tp_comm_overlap_cfg=.*missing.yaml: no such file; give 'auto', "
                                          r"'te_default' or the path of a YAML file"):
        _cfg([*TP2, f"parallel.tp_comm_overlap_cfg={tmp_path / 'missing.yaml'}"], world=2, features=UB)
    off = r"parallel.tp_comm_overlap_cfg=te_default is read only with parallel.tp_comm_overlap=true at tp > 1 with sp"
    with pytest.raises(ConfigError, match=off + r" \(got tp_comm_overlap=False, tp=2, sp=True\)"):
        _cfg(["parallel=tp2", "parallel.tp_comm_overlap_cfg=te_default"], world=2)
    with pytest.raises(ConfigError, match=off + r" \(got tp_comm_overlap=True, tp=1, sp=False\)"):
        _cfg(["parallel.tp_comm_overlap=true", "parallel.tp_comm_overlap_cfg=te_default"])
    _cfg(["parallel=tp2"], world=2)  # the default, auto, is accepted without the overlap
