"""DPO at every parallel layout reproduces the single-process run; resume is exact; both reference modes agree.

Each run starts from a converted checkpoint (the stand-in for an SFT checkpoint) with a second
converted model as the reference (``stage.reference_load``), so the rewards are far from zero
and a wrong reference shows. Ten steps of 8 pairs (4 micro-batches of 2 pairs at DP1), a
validation pass at steps 5 and 10. Reference modes alternate over the layouts, and the PP2
(precompute) and DP2 (model) runs stop at step 5 and resume, so every comparison below also
compares the two modes and a resumed run with the straight single-process one.
"""

from __future__ import annotations

import math

import pytest

from tests.dpo_support import convert_start, converted_model, dpo_overrides, make_task
from tests.helpers import QUIET, read_metrics, run_cli, train_command

STEPS = 10
KEYS = ("loss", "grad_norm", "rewards/accuracy", "rewards/margin")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("dpo_layouts")
    task = make_task(root, pairs=160)
    policy, reference = convert_start(root, seed=0), convert_start(root, seed=1)
    args = [*converted_model(policy), *dpo_overrides(task, root / "cache", model=()), *QUIET,
            f"stage.reference_load={reference}_mcore", f"train.train_iters={STEPS}", "train.micro_batch_size=2",
            "train.global_batch_size=8", "train.eval_interval=5", "train.eval_iters=1", "optim.lr=3e-3"]
    baseline = _train(root / "baseline", args, 1, ["stage.reference=precompute"])
    return root, args, baseline


def _train(run_dir, args, nproc, overrides):
    run_cli(train_command([*args, *overrides, f"run_dir={run_dir}"], nproc))
    return {"train": {r["step"]: r for r in read_metrics(run_dir)},
            "valid": {r["step"]: r for r in read_metrics(run_dir, "eval.jsonl")}}


def _assert_same(got, ref, label, steps=range(1, STEPS + 1)):
    assert sorted(got["train"]) == list(steps), label
    # The fp32 tolerance of the pretraining layout tests, plus an absolute floor for differences
    # such as the margin that can be near zero.
    for step in steps:
        for key in KEYS:
            want = ref["train"][step][key]
            assert got["train"][step][key] == pytest.approx(want, rel=1e-4, abs=1e-6), f"{label} step {step} {key}"
    for step, record in got["valid"].items():
        for key in ("loss", "rewards/accuracy", "rewards/chosen", "logps/rejected"):
            want = ref["valid"][step][key]
            assert record[key] == pytest.approx(want, rel=1e-4, abs=1e-6), f"{label} valid {step} {key}"


def test_baseline_records_the_dpo_metrics(env):
    _, _, baseline = env
    train, valid = baseline["train"], baseline["valid"]
    assert set(train[1]) >= {"loss", "rewards/chosen", "rewards/rejected", "rewards/accuracy", "rewards/margin",
                             "logps/chosen", "logps/rejected", "grad_norm"}
    assert set(valid[5]) == set(valid[10]) == {"step", "loss", "rewards/chosen", "rewards/rejected",
                                               "rewards/accuracy", "rewards/margin", "logps/chosen", "logps/rejected"}
    assert abs(train[1]["loss"] - math.log(2)) > 1e-3  # the reference is another model, even before step 1


LAYOUTS = {
    "tp2_sp_model": (2, ["parallel.tp=2", "parallel.sp=true", "stage.reference=model"]),
    "tp2_pp2_distopt_model": (4, ["parallel.tp=2", "parallel.pp=2", "parallel.sp=true",
                                  "parallel.use_distributed_optimizer=true", "stage.reference=model"]),
}


@pytest.mark.distributed
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_matches_single_process(env, name, tmp_path):
    _, args, baseline = env
    nproc, overrides = LAYOUTS[name]
    _assert_same(_train(tmp_path, args, nproc, overrides), baseline, name)


RESUMED = {
    "pp2_precompute": ["parallel.pp=2", "stage.reference=precompute"],
    "dp2_distopt_model": ["parallel.use_distributed_optimizer=true", "parallel.overlap_grad_reduce=true",
                          "stage.reference=model"],
}


@pytest.mark.distributed
@pytest.mark.parametrize("name", list(RESUMED))
def test_layout_stopped_at_5_and_resumed_matches_10_straight(env, name, tmp_path):
    _, args, baseline = env
    overrides = RESUMED[name]
    _train(tmp_path, args, 2, [*overrides, "train.exit_interval=5"])
    assert (tmp_path / "checkpoints" / "latest_checkpointed_iteration.txt").read_text().strip() == "5"
    tables = {p.name: p.read_bytes() for p in (tmp_path / "reference").glob("*.npy")}
    assert len(tables) == (2 if "precompute" in name else 0)  # train and valid splits
    resumed = _train(tmp_path, args, 2, overrides)  # metrics.jsonl and eval.jsonl append
    assert {p.name: p.read_bytes() for p in (tmp_path / "reference").glob("*.npy")} == tables  # reused
    _assert_same(resumed, baseline, name)
