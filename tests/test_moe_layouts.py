"""Expert-parallel layouts reproduce the EP1 loss curve of the tiny Qwen2-MoE (fp32, CPU, gloo).

Expert weights are initialized by global expert index, routing has no token dropping and
the aux loss is per micro-batch, so EP2 (with DP, TP+SP and expert TP, or PP) must agree
with one rank step for step; the logged aux loss and load imbalance must agree too.
"""

import pytest

from tests.helpers import assert_losses_close, run_train

STEPS = 10
COMMON = ["model=qwen2_moe_tiny", f"train.train_iters={STEPS}"]
# NOTE: TP reductions change weights by ~1e-7, enough to flip the top-k choice of a token
# whose expert probabilities are nearly tied; seen at EP2xTP2: aux loss within 5e-4, imbalance
# within 2.2e-2 relative (one token more or less on the busiest expert), loss within 6e-6.
MOE_TOLERANCE = {"moe_aux_loss": 1e-3, "moe_imbalance": 3e-2, "moe_imbalance_max": 3e-2}

LAYOUTS = {
    "ep2": (2, ["parallel.ep=2"]),  # EP2 x DP2 for the dense parts
    "ep2_tp2_etp2": (4, ["parallel.ep=2", "parallel.tp=2", "parallel.sp=true"]),
    "ep2_pp2": (4, ["parallel.ep=2", "parallel.pp=2"]),
}


def by_step(records):
    return {r["step"]: r for r in records if "loss" in r}


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    return by_step(run_train(tmp_path_factory.mktemp("ep1"), COMMON))


@pytest.mark.distributed
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_expert_parallel_matches_ep1(name, baseline, tmp_path):
    nproc, overrides = LAYOUTS[name]
    got = by_step(run_train(tmp_path, COMMON + overrides, nproc=nproc))
    assert sorted(got) == list(range(1, STEPS + 1))
    assert baseline[STEPS]["loss"] < baseline[1]["loss"] - 0.05  # the run actually learns
    assert_losses_close({s: r["loss"] for s, r in got.items()}, {s: r["loss"] for s, r in baseline.items()},
                        label=name)
    for step, ref in baseline.items():
        for key, rel in MOE_TOLERANCE.items():
            assert got[step][key] == pytest.approx(ref[key], rel=rel), f"{name} step {step} {key}"
