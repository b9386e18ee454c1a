"""The Qwen2.5 pipeline in miniature (tools/pipeline_tiny.py): five stages chained through
checkpoint.load, every objective improving, and an HF export that transformers loads and runs."""

from __future__ import annotations

import json
import sys

import pytest

from tests.helpers import run_cli

STAGES = [("pretrain", "val_loss"), ("long_context", "val_loss"), ("sft", "val_loss"), ("dpo", "rewards/accuracy"),
          ("grpo", "reward")]


@pytest.mark.slow
def test_pipeline_runs_five_stages_each_improving_and_exports(tmp_path):
    out = tmp_path / "pipeline"
    proc = run_cli([sys.executable, "tools/pipeline_tiny.py", "--out", str(out)], timeout=1200)
    summary = json.loads((out / "summary.json").read_text())
    assert [(r["stage"], r["objective"]) for r in summary["stages"]] == STAGES
    for row in summary["stages"]:
        better = row["end"] < row["start"] if row["objective"] == "val_loss" else row["end"] > row["start"]
        assert better, row
        assert f"{row['stage']:<13} {row['objective']:<17} {row['start']:9.4f} -> {row['end']:9.4f}" in proc.stdout
    # Each stage started from the previous one's last checkpoint (weights only: its own step count).
    for (previous, _), (stage, _) in zip(STAGES, STAGES[1:]):
        log = (out / stage / "stdout.log").read_text()
        assert f"loaded {out / previous / 'checkpoints'}/iter_" in log and "(optimizer: False, rng: False)" in log
    long_context = (out / "long_context" / "config.yaml").read_text()
    assert "cp: 2" in long_context and "name: long_context" in long_context
    # The export: transformers loaded it (the script exits on missing or unexpected keys) and generated.
    assert summary["answer"].strip() and (out / "hf" / "model.safetensors").is_file()
    assert f"-> {summary['answer']!r}" in proc.stdout
