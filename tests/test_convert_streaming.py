"""Both converters stream: converting a Qwen2.5-0.5B-sized model stays well under its fp32 size."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import transformers

from megatron_qwen.convert.hf_files import HFWeights, ShardWriter
from tests.helpers import run_cli

# Runs the CLI in a fresh process and reports its peak resident memory (VmHWM: unlike
# ru_maxrss it does not inherit the forking pytest process's peak), and the part of it that
# importing torch, megatron-core and transformers alone takes.
_MEASURE = """
import json, runpy, sys
import megatron_qwen.convert.hf_to_mcore, megatron_qwen.convert.mcore_to_hf

def peak_mib():
    line = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024  # reported in kB

baseline = peak_mib()
sys.argv = ["convert.py", *sys.argv[1:]]
try:
    runpy.run_path("tools/convert.py", run_name="__main__")
except SystemExit as exit:
    code = exit.code
print(json.dumps({"code": code, "baseline_mb": baseline, "peak_mb": peak_mib()}))
"""


def _qwen2_5_0_5b(out: Path) -> int:
    """Writes a random fp32 model of Qwen2.5-0.5B's shapes, one tensor at a time; returns its bytes."""
    config = transformers.Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                      num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True,
                                      max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-6,
                                      architectures=["Qwen2ForCausalLM"])
    with torch.device("meta"):
        shapes = [(n, tuple(p.shape)) for n, p in transformers.Qwen2ForCausalLM(config).named_parameters()]
    out.mkdir()
    writer = ShardWriter(out, shapes, torch.float32, 10**9)  # two shards and an index, like a release
    generator = torch.Generator().manual_seed(0)
    for name, shape in shapes:
        writer.write(name, torch.randn(shape, generator=generator) * 0.02)
    writer.finish()
    config.save_pretrained(out)
    return sum(torch.Size(shape).numel() * 4 for _, shape in shapes)


def _measure(*args: str) -> dict:
    proc = run_cli([sys.executable, "-c", _MEASURE, *args, "--no-progress"])
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["code"] == 0, proc.stderr[-3000:]
    return result


@pytest.mark.slow
def test_conversion_memory_is_bounded_by_the_embedding_not_the_model(tmp_path):
    model_mb = _qwen2_5_0_5b(tmp_path / "hf") / 2**20  # 1884 MiB (494M parameters in fp32)
    to_mcore = _measure("hf-to-mcore", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "ckpt"))
    to_hf = _measure("mcore-to-hf", "--ckpt", str(tmp_path / "ckpt"), "--out", str(tmp_path / "out"),
                     "--shard-size", "1GB")
    print(f"fp32 model {model_mb:.0f} MiB; hf-to-mcore {to_mcore}; mcore-to-hf {to_hf}")
    embedding_mb = 151936 * 896 * 4 / 2**20  # 519 MiB, the largest tensor
    for result in (to_mcore, to_hf):
        assert result["peak_mb"] < 0.7 * model_mb  # imports included
        assert result["peak_mb"] - result["baseline_mb"] < 2 * embedding_mb  # what converting adds
    before, after = HFWeights(tmp_path / "hf"), HFWeights(tmp_path / "out")
    assert after.shapes == before.shapes
    for name in ("model.embed_tokens.weight", "model.layers.23.self_attn.q_proj.bias", "model.norm.weight"):
        assert torch.equal(after.get(name), before.get(name)), name
