"""Logit parity of transformers and our Megatron model after conversion, at several layouts."""

from __future__ import annotations

import json
import sys

import pytest

from megatron_qwen.convert.hf_to_mcore import hf_to_mcore
from megatron_qwen.convert.verify import Layout, verify
from tests.convert_support import make_hf_model, make_hf_moe_model
from tests.helpers import REPO, run_cli


@pytest.mark.distributed
def test_logits_match_transformers_at_tp_pp_layouts(tmp_path):
    # 3 layers: PP2 splits them unevenly; tied: the last stage's output layer is the embedding.
    hf = make_hf_model(tmp_path / "hf", layers=3, heads=6, kv=2, tied=True)
    hf_to_mcore(hf, tmp_path / "ckpt", progress=False)
    layouts = [Layout(), Layout(tp=2), Layout(pp=2), Layout(tp=2, pp=2)]  # one set of 4 ranks for all
    for parity in verify(hf, tmp_path / "ckpt", layouts, batch_size=3, seq_len=16):
        assert parity.max_abs_diff <= 1e-4, parity.summary()
        assert parity.top1_agree == 1.0, parity.summary()


@pytest.mark.distributed
def test_moe_logits_match_transformers_at_ep1_and_ep2(tmp_path):
    hf = make_hf_moe_model(tmp_path / "hf", layers=2, experts=4)
    hf_to_mcore(hf, tmp_path / "ckpt", progress=False)
    for parity in verify(hf, tmp_path / "ckpt", [Layout(), Layout(ep=2)], batch_size=3, seq_len=16):
        assert parity.max_abs_diff <= 1e-4, parity.summary()
        assert parity.top1_agree == 1.0, parity.summary()


@pytest.mark.distributed
def test_verify_cli_fails_over_tolerance(tmp_path):
    hf = make_hf_model(tmp_path / "hf", tied=False)
    hf_to_mcore(hf, tmp_path / "ckpt", progress=False)
    other = make_hf_model(tmp_path / "other", tied=False, seed=1)  # same shapes, other weights
    proc = run_cli([sys.executable, str(REPO / "tools" / "convert.py"), "verify", "--hf", str(other),
                    "--ckpt", str(tmp_path / "ckpt"), "--tolerance", "1e-4"], check=False)
    assert proc.returncode == 1, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["max_abs_diff"] > 1e-2 and set(result) == {"max_abs_diff", "mean_abs_diff", "top1_agree"}
