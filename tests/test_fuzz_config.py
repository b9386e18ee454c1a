"""Fuzzed override sets for ``python -m megatron_qwen.train``: random values of random types for
random fields of the Hydra schema, random config-group choices and broken override syntax.

Every case is a dry run (``train.dry_run=true``: validation and the plan, no process
group) and must end in exit code 2 with one ``error:`` line, no traceback and no run
directory, or succeed; a config the dry run accepts must also translate into megatron-core's
config objects (what the trainer does next), or validation let something through.
"""

from __future__ import annotations

import dataclasses
import math
import signal
import logging
import tempfile
import typing
from pathlib import Path
from typing import List, Tuple

import torch
from hypothesis import event, given
from hypothesis import strategies as st

from megatron_qwen import train
from megatron_qwen.cli import run_hydra
from megatron_qwen.config.schema import Config
from megatron_qwen.config.store import CONF_DIR, compose_config
from megatron_qwen.config.translate import to_ddp_config, to_optimizer_config, to_transformer_config
from megatron_qwen.config.validate import validate
from megatron_qwen.training.loop import plan_batches
from megatron_qwen.training.optim import build_scheduler
from tests.fuzz_support import assert_clean_failure, call_main, fuzz, outcome, tree

FIXED = {"train.dry_run", "run_dir", "data.extra", "data.blend", "data.valid_blend"}  # set by the test / not scalar


def _leaves(cls, prefix: str = "") -> List[Tuple[str, type]]:
    """(dotted key, annotation) of every scalar field of the schema."""
    out = []
    for f in dataclasses.fields(cls):
        hint = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(hint):
            out += _leaves(hint, f"{prefix}{f.name}.")
        elif f"{prefix}{f.name}" not in FIXED:
            out.append((f"{prefix}{f.name}", hint))
    return out


LEAVES = _leaves(Config)
GROUPS = {group.name: sorted(p.stem for p in group.glob("*.yaml"))
          for group in Path(CONF_DIR).iterdir() if group.is_dir() and group.name != "hydra"}


def _typed(hint) -> st.SearchStrategy:
    """Values of the field's own type (small, so that many cases get past typing into validation)."""
    base = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    plain = {int: st.sampled_from(["-1", "0", "1", "2", "3", "4", "8", "64"]) | st.integers(-2, 70).map(str),
             float: st.sampled_from(["0", "-1.5", "1e-3", "0.5", "3", "nan", "inf", "-inf", "1e308"]),
             bool: st.sampled_from(["true", "false"]), str: st.sampled_from(["none", "cosine", "bf16", "x", "''"])}
    strategy = plain.get(base[0], st.just("null"))
    return strategy | st.just("null") if len(typing.get_args(hint)) > 1 else strategy


anything = st.one_of(
    st.integers(-(2**70), 2**70).map(str), st.floats().map(repr), st.sampled_from(["true", "false", "null"]),
    st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=8),
    st.sampled_from(["[", "]", "{", "}", "${oops}", "${train.seq_length}", "[1,2]", "{a: 1}", "1e999", "0x10", "~",
                     "'quoted'", "a,b", "=", "${oc.env:NOPE}", "???"]))


@st.composite
def overrides(draw) -> List[str]:
    """One override set: field values (typed or not), group choices, additions, deletions."""
    out = []
    for _ in range(draw(st.integers(1, 3))):
        key, hint = draw(st.sampled_from(LEAVES))
        kind = draw(st.sampled_from(["typed"] * 6 + ["any", "group", "add", "delete", "bare"]))
        if kind == "typed":
            out.append(f"{key}={draw(_typed(hint))}")
        elif kind == "any":
            out.append(f"{key}={draw(anything)}")
        elif kind == "group":
            group = draw(st.sampled_from(sorted(GROUPS)))
            out.append(f"{group}={draw(st.sampled_from(GROUPS[group] + ['nope']))}")
        elif kind == "add":
            out.append(f"+{draw(st.sampled_from([key, 'train.nope', 'nope']))}={draw(_typed(hint))}")
        else:
            out.append(f"~{key}" if kind == "delete" else key)
    return out


def _trainer_accepts(argv: List[str]) -> None:
    """What the trainer computes first from a config the dry run accepted: megatron-core's
    config objects, the batch plan, the LR schedule, the stop signal, the loop's intervals."""
    cfg = compose_config(argv)
    cfg = validate(cfg, cfg.train.dry_run_world_size or 1)
    to_transformer_config(cfg), to_ddp_config(cfg), to_optimizer_config(cfg)
    plan = plan_batches(cfg)
    assert plan.train_iters >= 1 and plan.num_microbatches >= 1, plan
    scheduler = build_scheduler(cfg, torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.0), plan.train_iters)
    for step in (1, plan.train_iters):
        scheduler.step(step)
        assert math.isfinite(scheduler.get_lr(scheduler.optimizer.param_groups[0]))
    signal.Signals[cfg.train.exit_signal]  # signals.install looks it up
    intervals = [cfg.logging.log_interval, cfg.train.eval_interval or 1, cfg.checkpoint.save_interval or 1,
                 cfg.train.exit_interval or 1]
    assert min(intervals) >= 1, intervals  # the loop takes the iteration modulo each
    assert cfg.train.seq_length >= 1 and cfg.train.eval_iters >= 0, cfg.train


@fuzz(max_examples=200)
@given(argv=overrides())
def test_random_overrides_fail_cleanly_or_pass_the_dry_run(argv):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        full = [*argv, f"run_dir={root / 'run'}", "train.dry_run=true"]
        code, out, err = call_main(lambda a: run_hydra(train.main, a), full)
        event(outcome(code, err))
        if code == 0:
            assert "Traceback" not in err, err
            _trainer_accepts(full[:-2])
        else:
            assert_clean_failure(code, err, sorted(tree(root)), case=str(argv))


def test_an_in_process_run_leaves_the_root_logger_as_it_found_it():
    # Bug: Hydra's file handler for <run_dir>/train.log stayed on the root logger after a case, and
    # once the case's directory was gone every later log call in this pytest process raised.
    before = logging.root.handlers[:]
    with tempfile.TemporaryDirectory() as tmp:
        code, _, err = call_main(lambda a: run_hydra(train.main, a), [f"run_dir={Path(tmp) / 'run'}",
                                                                      "train.dry_run=true"])
        assert code == 0, err
    assert logging.root.handlers == before
    logging.getLogger("megatron_qwen.data").warning("logged after the run directory is gone")
