"""Transformer Engine's userbuffer settings per GEMM, for TP communication overlap.

TE's ``initialize_ub(ub_cfgs=...)`` takes, for each GEMM of a transformer layer, how its TP
all-gather or reduce-scatter overlaps the GEMM: the method (``ring_exchange`` p2p chunks,
``pipeline`` GEMM/reduce-scatter splits, ``bulk`` for the backward's independent
communication) and the SMs and cluster size the communication kernels take. Missing GEMMs get
TE's defaults. ``parallel.tp_comm_overlap_cfg`` picks the dict:

- ``auto``: Megatron-Bridge's tuned H100 entry for (hidden size, TP, bf16 or FP8) where it has
  one (:data:`TUNED`), else TE's defaults, as Bridge's own recipes without an entry run;
- ``te_default``: TE's defaults (an empty dict, what Megatron-LM passes without a file);
- the path of a YAML file in Megatron-LM's ``--tp-comm-overlap-cfg`` format,
  ``{gemm: {setting: value}}``, checked here before anything starts.

Pure: no torch; reads only that file.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Dict, List, NamedTuple, Tuple

import yaml

from megatron_qwen.config.schema import Config, ParallelConfig
from megatron_qwen.errors import UserError

AUTO, TE_DEFAULT = "auto", "te_default"
SETTING = "parallel.tp_comm_overlap_cfg"

# The methods TE accepts per GEMM under megatron-core's TE layers with their defaults (bulk
# dgrad/wgrad overlap, tp_comm_overlap_rs_dgrad off): all-gathers cannot use ``pipeline``, and
# the wgrad GEMMs of proj/fc2 overlap only ``external``ly (transformer_engine/pytorch/module/
# base.py, initialize_ub).
GEMM_METHODS: Dict[str, Tuple[str, ...]] = {
    **dict.fromkeys(("qkv_fprop", "fc1_fprop", "proj_dgrad", "fc2_dgrad"), ("ring_exchange",)),
    **dict.fromkeys(("proj_fprop", "fc2_fprop"), ("pipeline", "ring_exchange")),
    **dict.fromkeys(("qkv_dgrad", "qkv_wgrad", "fc1_dgrad", "fc1_wgrad"), ("bulk",)),
    **dict.fromkeys(("proj_wgrad", "fc2_wgrad"), ("external",)),
}
# The settings TE's add_ub takes (newest TE; older ones take a subset), by value type.
INT_SETTINGS = ("num_sm", "cga_size", "num_splits", "comm_priority", "gemm_priority")
BOOL_SETTINGS = ("is_reduce_scatter", "set_sm_margin", "aggregate", "atomic_gemm", "use_ce", "fp8_buf",
                 "pipeline_rs_overlap_first_gemm")
SETTINGS = ("method",) + INT_SETTINGS + BOOL_SETTINGS


# Megatron-Bridge's TPOverlapCfg classes (src/megatron/bridge/training/comm_overlap.py), as
# ``dataclasses.asdict`` turns them into TE's dict, with the same defaults.
def _bulk(num_sm: int, cga_size: int, set_sm_margin: bool) -> dict:
    return {"num_sm": num_sm, "cga_size": cga_size, "set_sm_margin": set_sm_margin, "method": "bulk"}


def _ring(aggregate: bool = False, num_sm: int = 1, cga_size: int = 1, set_sm_margin: bool = False) -> dict:
    return {"aggregate": aggregate, "method": "ring_exchange", "num_sm": num_sm, "cga_size": cga_size,
            "set_sm_margin": set_sm_margin, "fp8_buf": False, "atomic_gemm": False}


def _pipeline(num_sm: int, cga_size: int, num_splits: int, set_sm_margin: bool) -> dict:
    # NOTE: Bridge's PipelineOverlapCfg defaults fp8_buf to the tuple (False,) (truthy); TE reads
    # fp8_buf only for FP8 buffers, and the entry ported here with that default is the bf16 one,
    # so False gives TE the same buffers.
    return {"num_sm": num_sm, "cga_size": cga_size, "num_splits": num_splits, "set_sm_margin": set_sm_margin,
            "fp8_buf": False, "atomic_gemm": False, "method": "pipeline"}


# Bridge's H100 Llama-3-70B entries (hidden 8192, TP4; perf_recipes/llama/h100/llama3.py uses
# them for its 64-GPU pretraining, bf16 at CP2 (4096 tokens per rank) and FP8 current scaling).
_H8192_TP4 = {
    "qkv_dgrad": _bulk(num_sm=4, cga_size=2, set_sm_margin=False),
    "qkv_wgrad": _bulk(num_sm=24, cga_size=2, set_sm_margin=False),
    "fc1_dgrad": _bulk(num_sm=2, cga_size=2, set_sm_margin=False),
    "fc1_wgrad": _bulk(num_sm=4, cga_size=2, set_sm_margin=False),
    "qkv_fprop": _ring(aggregate=False),
    "proj_dgrad": _ring(aggregate=False),
    "fc1_fprop": _ring(aggregate=False),
    "fc2_dgrad": _ring(aggregate=False),
}
# (hidden size, TP, FP8) -> (Bridge's name, TE's ub_cfgs). Bridge's names also carry the
# micro-batch (1) and sequence length (8192) it tuned at; it runs the bf16 entry at 4096 tokens
# per rank too, so the token count is not part of the key. Every FP8 recipe uses the FP8 entry
# (its buffers are FP8 whatever the scaling; Bridge measured it with current scaling).
TUNED: Dict[Tuple[int, int, bool], Tuple[str, dict]] = {
    (8192, 4, False): ("userbuffers_bf16_h100_h8192_tp4_mbs1_seqlen8192", {
        **_H8192_TP4,
        "proj_fprop": _pipeline(num_sm=24, cga_size=2, num_splits=4, set_sm_margin=True),
        "fc2_fprop": _pipeline(num_sm=16, cga_size=2, num_splits=4, set_sm_margin=True)}),
    (8192, 4, True): ("userbuffers_fp8_h100_h8192_tp4_mbs1_seqlen8192", {
        **_H8192_TP4,
        "proj_fprop": _ring(num_sm=1, set_sm_margin=True),
        "fc2_fprop": _ring(num_sm=1, set_sm_margin=True)}),
}


class UbChoice(NamedTuple):
    """What TE gets: ``name`` for the run log and the dry run, ``ub_cfgs`` for initialize_ub."""

    name: str
    ub_cfgs: dict


def overlap_applies(p: ParallelConfig) -> bool:
    """TP overlap asked for in a layout that has it: TP > 1 with sequence parallel."""
    return p.tp_comm_overlap and p.tp > 1 and p.sp


def select(cfg: Config) -> UbChoice:
    """The userbuffer settings for a validated config (see the module docstring).

    Raises:
        UserError: the YAML file named by ``parallel.tp_comm_overlap_cfg`` no longer passes the checks.
    """
    choice = cfg.parallel.tp_comm_overlap_cfg
    if choice == TE_DEFAULT:
        return UbChoice(TE_DEFAULT, {})
    if choice != AUTO:
        ub_cfgs, problems = read_file(choice)
        if problems:
            raise UserError("; ".join(problems))
        return UbChoice(choice, ub_cfgs)
    key = (cfg.model.hidden_size, cfg.parallel.tp, cfg.precision.fp8 is not None)
    if key in TUNED:
        name, ub_cfgs = TUNED[key]
        return UbChoice(f"auto: Megatron-Bridge {name}", copy.deepcopy(ub_cfgs))
    return UbChoice(f"auto: te_default (no Megatron-Bridge H100 entry for hidden {key[0]} at tp {key[1]})", {})


def read_file(path: str) -> Tuple[dict, List[str]]:
    """Loads a ``{gemm: {setting: value}}`` YAML file; returns it and its problems (one line each)."""
    where = f"{SETTING}={path}"
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as err:
        reason = "no such file" if isinstance(err, FileNotFoundError) else f"cannot be read ({err})"
        return {}, [f"{where}: {reason}; give '{AUTO}', '{TE_DEFAULT}' or the path of a YAML file of per-GEMM "
                    "userbuffer settings (Megatron-LM's --tp-comm-overlap-cfg format)"]
    try:
        ub_cfgs = yaml.safe_load(text)
    except yaml.YAMLError as err:
        return {}, [f"{where}: not valid YAML ({' '.join(str(err).split())}); fix the file"]
    if not isinstance(ub_cfgs, dict) or not all(isinstance(v, dict) for v in ub_cfgs.values()):
        return {}, [f"{where}: must map GEMM names to their settings, e.g. 'qkv_dgrad: {{method: bulk, "
                    "num_sm: 4}}'; fix the file"]
    problems = []
    for gemm, settings in ub_cfgs.items():
        problems += _gemm_problems(where, gemm, settings)
    return ub_cfgs, problems


def _gemm_problems(where: str, gemm: str, settings: dict) -> List[str]:
    if gemm not in GEMM_METHODS:
        return [f"{where}: {gemm!r} is not a GEMM Transformer Engine overlaps ({', '.join(GEMM_METHODS)}); "
                "rename or remove it in the file"]
    problems = []
    for key, value in settings.items():
        if key not in SETTINGS:
            problems.append(f"{where}: {gemm}.{key} is not a userbuffer setting ({', '.join(SETTINGS)}); rename "
                            "or remove it in the file")
        elif key == "method" and value not in GEMM_METHODS[gemm]:
            problems.append(f"{where}: {gemm}.method={value!r} is not one Transformer Engine runs for {gemm} "
                            f"({', '.join(GEMM_METHODS[gemm])}); change it in the file")
        elif (key in INT_SETTINGS and type(value) is not int) or (key in BOOL_SETTINGS and type(value) is not bool):
            kind = "an integer" if key in INT_SETTINGS else "true or false"
            problems.append(f"{where}: {gemm}.{key}={value!r} must be {kind}; change it in the file")
    return problems


def config_problems(cfg: Config) -> List[str]:
    """The rules of ``parallel.tp_comm_overlap_cfg`` (part of :func:`validate.validate`): read only
    when TP overlap applies, and a file must name TE's GEMMs and settings."""
    p = cfg.parallel
    if p.tp_comm_overlap_cfg == AUTO:
        return []
    if not overlap_applies(p):
        return [f"{SETTING}={p.tp_comm_overlap_cfg} is read only with parallel.tp_comm_overlap=true at tp > 1 "
                f"with sp (got tp_comm_overlap={p.tp_comm_overlap}, tp={p.tp}, sp={p.sp}); set them or remove "
                "tp_comm_overlap_cfg"]
    if p.tp_comm_overlap_cfg == TE_DEFAULT:
        return []
    return read_file(p.tp_comm_overlap_cfg)[1]
