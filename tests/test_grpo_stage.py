"""stage=grpo end to end on the tiny sums task: it learns, other layouts and a resume reproduce it.

One short SFT (tests/grpo_support.py) is the starting checkpoint of every run. The seed-1234
run (60 steps, validation at steps 0, 30, 60) is the reference the other tests compare with:
with a constant learning rate and no warmup its first steps are those of any shorter run of
the same settings. Validation samples 8 completions of each of the 32 held-out prompts with
fixed seeds, so its mean reward moves only when the policy does.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, List

import pytest

from tests.grpo_support import grpo_overrides, make_grpo_task, sft
from tests.helpers import read_metrics, run_cli, train_command

STEPS = 60
LEARN = [f"train.train_iters={STEPS}", "train.eval_interval=30", "train.eval_at_start=true"]
TRAIN_KEYS = {"loss", "reward", "reward_std", "frac_reward_zero_std", "accuracy", "rewards/exact_match", "kl",
              "clip_fraction", "clip_low", "clip_high", "ratio", "response_length", "entropy", "rollout_tokens_per_s",
              "train_tokens_per_s", "grad_norm", "lr", "consumed_samples"}
VALID_KEYS = {"step", "reward", "reward_std", "frac_reward_zero_std", "accuracy", "rewards/exact_match",
              "response_length", "entropy", "nll"}


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    root = tmp_path_factory.mktemp("grpo")
    task = make_grpo_task(root)
    return root, grpo_overrides(task, sft(task, root / "sft", root / "cache"))


def _train(run_dir: Path, args: List[str], overrides: List[str], nproc: int = 1) -> Dict[str, Dict[int, dict]]:
    run_cli(train_command([*args, *overrides, f"run_dir={run_dir}"], nproc))
    valid = run_dir / "eval.jsonl"
    return {"train": {r["step"]: r for r in read_metrics(run_dir)},
            "valid": {r["step"]: r for r in read_metrics(run_dir, "eval.jsonl")} if valid.exists() else {}}


@pytest.fixture(scope="module")
def reference(task):
    root, args = task
    return _train(root / "seed1234", args, [*LEARN, "train.seed=1234"])


def _learns(run: Dict[str, Dict[int, dict]]) -> None:
    valid = run["valid"]
    print({step: round(r["reward"], 4) for step, r in valid.items()})
    assert sorted(valid) == [0, 30, STEPS]
    assert 0.1 <= valid[0]["reward"] <= 0.6  # the SFT'd start: some sums right, room to learn
    assert valid[STEPS]["reward"] >= valid[0]["reward"] + 0.2
    assert all(math.isfinite(r["kl"]) and r["kl"] >= 0 for r in run["train"].values())


@pytest.mark.slow
def test_grpo_raises_the_validation_reward(reference):
    _learns(reference)


@pytest.mark.slow
def test_grpo_raises_the_validation_reward_with_another_seed(task, tmp_path):
    _, args = task
    _learns(_train(tmp_path, args, [*LEARN, "train.seed=7"]))


def test_records_hold_the_grpo_metrics(reference):
    train, valid = reference["train"], reference["valid"]
    assert sorted(train) == list(range(1, STEPS + 1))
    assert TRAIN_KEYS <= set(train[2]) and set(valid[0]) == VALID_KEYS
    first = train[1]  # the policy is the reference and sampled this batch: ratio 1, KL 0, nothing clipped
    assert (first["ratio"], first["kl"], first["clip_fraction"]) == (1.0, 0.0, 0.0)
    assert first["reward"] == first["accuracy"] == first["rewards/exact_match"]  # one 0/1 reward, weight 1
    assert 1 <= first["response_length"] <= 4 and first["consumed_samples"] == 16
    assert first["rollout_tokens_per_s"] > 0 and "train_tokens_per_s" not in first  # measured from step 2 on
    assert all(r["train_tokens_per_s"] > 0 and r["kl"] > 0 for step, r in train.items() if step > 1)


def test_resume_5_plus_5_is_the_straight_run(task, reference, tmp_path):
    _, args = task
    ten = ["train.train_iters=10", "train.eval_interval=5", "train.seed=1234"]  # validation does not disturb it
    _train(tmp_path, args, [*ten, "train.exit_interval=5"])
    assert (tmp_path / "checkpoints" / "latest_checkpointed_iteration.txt").read_text().strip() == "5"
    resumed = _train(tmp_path, args, ten)["train"]
    assert sorted(resumed) == list(range(1, 11))
    for step in range(1, 11):  # bit-exact: same prompts, same samples, same updates
        for key in ("loss", "grad_norm", "reward", "kl", "entropy"):
            assert resumed[step][key] == reference["train"][step][key], (step, key)


# dp2 also packs by a token budget: whole groups, 1 or 2 per micro-batch by their sampled lengths.
LAYOUTS = {"tp2": ["parallel.tp=2"], "dp2": ["stage.max_tokens_per_microbatch=480"],
           "tp2_sp": ["parallel.tp=2", "parallel.sp=true"]}  # SP trains; the sampler switches it off to decode


@pytest.mark.distributed
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_matches_single_process(task, reference, name, tmp_path):
    _, args = task
    got = _train(tmp_path, args, ["train.train_iters=3", "train.eval_interval=0", "train.seed=1234", *LAYOUTS[name]],
                 nproc=2)["train"]
    want = reference["train"]
    for step in (1, 2, 3):  # the same sampled responses: per-completion seeds do not depend on the layout
        for key in ("reward", "response_length", "consumed_samples"):
            assert got[step][key] == want[step][key], (name, step, key)
    # One step: the fp32 layout tolerance of tests/test_layouts.py (the loss is ~0 at step 1: the
    # advantages of a group sum to zero, so it is compared absolutely).
    assert got[1]["grad_norm"] == pytest.approx(want[1]["grad_norm"], rel=1e-6), name
    assert got[1]["loss"] == pytest.approx(want[1]["loss"], abs=1e-9), name
    for step in (2, 3):  # after updates: Adam amplifies the last-bit differences of TP's reductions
        for key in ("loss", "grad_norm", "kl"):
            assert got[step][key] == pytest.approx(want[step][key], rel=1e-4), (name, step, key)


def test_several_updates_per_rollout(task, reference, tmp_path):
    _, args = task
    train = _train(tmp_path, args, ["train.train_iters=4", "train.eval_interval=0", "train.seed=1234",
                                    "stage.updates_per_rollout=2", "train.stop_check_interval=2"])["train"]
    # Step 1 trains on the same first global batch as with one update per rollout.
    assert (train[1]["loss"], train[1]["grad_norm"]) == (reference["train"][1]["loss"],
                                                         reference["train"][1]["grad_norm"])
    for step in (1, 3):  # a rollout's first update: old log-probs recomputed before it, ratio exactly 1
        assert (train[step]["ratio"], train[step]["clip_fraction"]) == (1.0, 0.0)
        assert train[step]["rollout_tokens_per_s"] > 0
    for step in (2, 4):  # its second update: the policy has moved since the rollout, and the clip acts
        assert train[step]["ratio"] != 1.0 and train[step]["clip_fraction"] > 0
        assert "rollout_tokens_per_s" not in train[step]  # no rollout at this step
    assert [train[s]["consumed_samples"] for s in (1, 2, 3, 4)] == [16, 32, 48, 64]
