"""YaRN: our logits match transformers' beyond the original context, also at CP2 through
``tools/convert.py verify --cp 2``; ``mcore-to-hf --rope-scaling`` writes Qwen's block and
``hf-to-mcore`` reads it back."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest
import torch
import transformers

from megatron_qwen.convert.hf_to_mcore import hf_to_mcore
from megatron_qwen.convert.run_files import read_model_config
from tests.convert_support import make_hf_model
from tests.helpers import REPO, run_cli

ORIGINAL = 64  # original_max_position_embeddings of the test model
YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": ORIGINAL}
SEQ = 256  # 4x the original context


def _convert(*args):
    return run_cli([sys.executable, str(REPO / "tools" / "convert.py"), *map(str, args)], check=False)


def _logits(hf_dir, tokens):
    model = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32)
    with torch.no_grad():
        return model(input_ids=tokens).logits


@pytest.mark.distributed
def test_verify_at_cp2_matches_transformers_yarn_beyond_the_original_context(tmp_path):
    yarn = make_hf_model(tmp_path / "yarn", max_positions=SEQ, rope_scaling=YARN)
    plain = make_hf_model(tmp_path / "plain", max_positions=SEQ)  # same weights (same seed), plain RoPE
    hf_to_mcore(yarn, tmp_path / "ckpt", progress=False)
    assert read_model_config(tmp_path / "ckpt").rope_scaling.factor == 4.0  # hf-to-mcore reads it
    proc = _convert("verify", "--hf", yarn, "--ckpt", tmp_path / "ckpt", "--cp", 2, "--seq-len", SEQ,
                    "--batch-size", 2, "--tolerance", "1e-4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["max_abs_diff"] <= 1e-4  # every position, 0..255
    # ... which can fail: beyond the original context YaRN changes the logits far beyond 1e-4.
    tokens = torch.randint(256, (2, SEQ), generator=torch.Generator().manual_seed(0))  # verify's batch
    beyond = (_logits(yarn, tokens) - _logits(plain, tokens))[:, ORIGINAL:].abs().max()
    assert beyond > 1e-2


def test_export_adds_qwens_rope_scaling_and_import_reads_it_back(tmp_path):
    hf_to_mcore(make_hf_model(tmp_path / "plain", max_positions=SEQ), tmp_path / "ckpt", progress=False)
    proc = _convert("mcore-to-hf", "--ckpt", tmp_path / "ckpt", "--out", tmp_path / "out", "--no-progress",
                    "--rope-scaling", "yarn", "--rope-factor", 4, "--original-max-position-embeddings", ORIGINAL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "out" / "config.json").read_text())["rope_scaling"] == YARN
    rotary = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).model.rotary_emb
    assert rotary.rope_type == "yarn" and rotary.attention_scaling == pytest.approx(0.1 * torch.log(
        torch.tensor(4.0)).item() + 1)
    assert hf_to_mcore(tmp_path / "out", tmp_path / "back", progress=False).rope_scaling == \
        read_model_config(tmp_path / "back").rope_scaling
    assert read_model_config(tmp_path / "back").rope_scaling.original_max_position_embeddings == ORIGINAL


def test_rope_scaling_flags_go_together(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("convert_cli", REPO / "tools" / "convert.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    code = cli.main(["mcore-to-hf", "--ckpt", str(tmp_path), "--out", str(tmp_path / "out"), "--rope-scaling", "yarn"])
    assert code == 2 and not (tmp_path / "out").exists()
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: --rope-scaling also needs --rope-factor, --original-max-position-embeddings"]
