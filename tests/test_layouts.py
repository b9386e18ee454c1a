"""Every parallel layout reproduces the single-rank loss curve (fp32, CPU, gloo).

Same seed and global batch: weights are initialized per global parameter name and the
loss is normalized per token over the global batch, so TP/SP/PP/VPP/DP and the
distributed optimizer must agree with TP1/PP1/DP1 step for step.
"""

import pytest

from tests.helpers import assert_losses_close, losses, run_train

STEPS = 10
COMMON = [f"train.train_iters={STEPS}"]

LAYOUTS = {
    "tp2": (2, ["parallel.tp=2"]),
    "tp2_sp": (2, ["parallel.tp=2", "parallel.sp=true"]),
    "pp2": (2, ["parallel.pp=2"]),
    "pp2_vpp2": (2, ["parallel.pp=2", "parallel.vpp=2"]),
    "dp2": (2, []),
    "dp2_distopt": (2, ["parallel.use_distributed_optimizer=true", "parallel.overlap_grad_reduce=true",
                        "parallel.overlap_param_gather=true"]),
    "recompute_full": (1, ["parallel.recompute=full", "parallel.recompute_num_layers=2"]),
    "tp2_recompute_selective": (2, ["parallel.tp=2", "parallel.recompute=selective"]),
    "tp2_pp2_distopt": (4, ["parallel.tp=2", "parallel.pp=2", "parallel.sp=true",
                            "parallel.use_distributed_optimizer=true"]),
}


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    return losses(run_train(tmp_path_factory.mktemp("base"), COMMON))


@pytest.mark.distributed
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_matches_single_rank(name, baseline, tmp_path):
    nproc, overrides = LAYOUTS[name]
    got = losses(run_train(tmp_path, COMMON + overrides, nproc=nproc))
    assert sorted(got) == list(range(1, STEPS + 1))
    assert baseline[STEPS] < baseline[1] - 0.05  # the run actually learns
    assert_losses_close(got, baseline, label=name)


@pytest.mark.distributed
def test_uneven_pipeline_matches_single_rank(tmp_path):
    # 3 layers over pp=2: 2 on the first stage, 1 on the last (megatron's first-stage override).
    three = COMMON + ["model.num_layers=3"]
    ref = losses(run_train(tmp_path / "pp1", three))
    got = losses(run_train(tmp_path / "pp2", three + ["parallel.pp=2", "parallel.pp_first_stage_layers=2"],
                           nproc=2))
    assert_losses_close(got, ref, label="pp2 2+1 layers")
