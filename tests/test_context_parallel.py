"""Context parallelism: the load-balanced split, the all-gather attention, and every CP layout
reproducing the CP1 run (loss and grad norm per step), also across a resume at another CP size.

The sequence (96 at cp=2: chunks of 24) is deliberately not a power of two.
"""

import shutil

import pytest
import torch
from megatron.core.packed_seq_params import PackedSeqParams

from megatron_qwen.model.context_parallel import rank_positions, row_bounds, split_batch
from megatron_qwen.model.cp_attention import build_view
from tests.helpers import losses, run_cli, run_train, train_command

STEPS = 10
SEQ = ["train.seq_length=96"]
COMMON = [f"train.train_iters={STEPS}", *SEQ]
# fp32 on 2 CPU cores: CP runs agree with CP1 to ~1e-7 relative (float32 rounding of the
# reported values); 1e-6 is the bound.
REL = 1e-6

LAYOUTS = {
    "cp2_tp2_sp": (4, ["parallel.cp=2", "parallel.tp=2", "parallel.sp=true"]),
    "cp2_pp2": (4, ["parallel.cp=2", "parallel.pp=2"]),
    "cp2_dp2_distopt": (4, ["parallel.cp=2", "parallel.use_distributed_optimizer=true"]),
}


def _packed(bounds):
    cu = torch.tensor(bounds, dtype=torch.int32)
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=12, max_seqlen_kv=12)


@pytest.mark.parametrize("total,cp,expected", [
    (12, 2, [[0, 1, 2, 9, 10, 11], [3, 4, 5, 6, 7, 8]]),
    (12, 3, [[0, 1, 10, 11], [2, 3, 8, 9], [4, 5, 6, 7]]),
])
def test_rank_r_holds_chunks_r_and_2cp_minus_1_minus_r(total, cp, expected):
    bounds = row_bounds(total, None, torch.device("cpu"))
    assert [rank_positions(bounds, total, cp, r).tolist() for r in range(cp)] == expected


def test_packed_rows_split_per_sub_sequence():
    # Sub-sequences of 8 and 4 at cp=2 (Transformer Engine's thd_get_partitioned_indices layout).
    packed = _packed([0, 8, 12])
    bounds = row_bounds(12, packed, torch.device("cpu"))
    assert rank_positions(bounds, 12, 2, 0).tolist() == [0, 1, 6, 7, 8, 11]
    assert rank_positions(bounds, 12, 2, 1).tolist() == [2, 3, 4, 5, 9, 10]
    batch = {"tokens": torch.arange(12)[None], "loss_mask": torch.arange(12.0)[None],
             "cu_seqlens": torch.tensor([[0, 8, 12]])}
    part = split_batch(batch, packed, 2, 1)
    assert part["tokens"].tolist() == [[2, 3, 4, 5, 9, 10]] and part["loss_mask"].shape == (1, 6)
    assert part["cu_seqlens"] is batch["cu_seqlens"]  # boundaries stay global


def test_view_masks_by_global_position_and_sub_sequence():
    view = build_view(6, 2, 1, _packed([0, 8, 12]), torch.device("cpu"))
    allowed = view.mask[0, 0] == 0  # additive mask: 0 to attend, -inf not to
    queries = [2, 3, 4, 5, 9, 10]
    for row, q in enumerate(queries):
        first = 0 if q < 8 else 8
        assert allowed[row].nonzero().flatten().tolist() == list(range(first, q + 1))
    gathered = torch.tensor([0, 1, 6, 7, 8, 11, 2, 3, 4, 5, 9, 10])  # rank 0's positions, then rank 1's
    assert gathered[view.key_order].tolist() == list(range(12))


@pytest.mark.distributed
def test_attention_split_and_packed_sft_match_cp1():
    # fp64 attention and its gradients exact to 1e-12; packed SFT through forward_step (see the worker).
    proc = run_cli(train_command([], nproc=2, module="tests.cp_attention_worker"), timeout=300)
    assert proc.stdout.count("ok") == 2, proc.stdout[-2000:]


def _assert_same_run(got, ref, steps, label):
    got, ref = {r["step"]: r for r in got if "loss" in r}, {r["step"]: r for r in ref if "loss" in r}
    assert sorted(got) == list(steps), f"{label}: steps {sorted(got)}"
    for step in steps:
        for key in ("loss", "grad_norm"):
            assert abs(got[step][key] - ref[step][key]) <= REL * abs(ref[step][key]), \
                f"{label} step {step} {key}: {got[step][key]} vs {ref[step][key]}"


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    return run_train(tmp_path_factory.mktemp("cp1"), COMMON)


@pytest.fixture(scope="module")
def cp2_run(tmp_path_factory):
    """CP2, saving at step 5 (the resume tests start from there) and at the end."""
    run_dir = tmp_path_factory.mktemp("cp2")
    return run_dir, run_train(run_dir, COMMON + ["parallel.cp=2", "checkpoint.save_interval=5"], nproc=2)


@pytest.mark.distributed
def test_cp2_matches_cp1(baseline, cp2_run):
    assert losses(baseline)[STEPS] < losses(baseline)[1] - 0.05  # the run actually learns
    _assert_same_run(cp2_run[1], baseline, range(1, STEPS + 1), "cp2")


@pytest.mark.distributed
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_cp2_layouts_match_cp1(name, baseline, tmp_path):
    nproc, overrides = LAYOUTS[name]
    _assert_same_run(run_train(tmp_path, COMMON + overrides, nproc=nproc), baseline, range(1, STEPS + 1), name)


@pytest.mark.distributed
@pytest.mark.parametrize("nproc,layout", [(1, []), (2, ["parallel.tp=2"])], ids=["cp1", "tp2"])
def test_resume_a_cp2_checkpoint_at_another_layout(baseline, cp2_run, tmp_path, nproc, layout):
    saved = cp2_run[0] / "checkpoints"
    shutil.copytree(saved / "iter_0000005", tmp_path / "checkpoints" / "iter_0000005")
    (tmp_path / "checkpoints" / "latest_checkpointed_iteration.txt").write_text("5")
    resumed = run_train(tmp_path, COMMON + layout, nproc=nproc)
    _assert_same_run(resumed, baseline, range(6, STEPS + 1), f"cp2 -> {layout or 'cp1'}")
