"""The Qwen2.5 pipeline in miniature (tools/pipeline_tiny.py): five stages chained through
checkpoint.load, every objective improving, and an HF export that transformers loads and runs.

Its post-training stages are the README's three post-training commands, run as the README shows
them (only the starting checkpoint and the run directories are the pipeline's), so this test is
also the README's: each of those commands must improve its objective.
"""

from __future__ import annotations

import json
import re
import shlex
import sys

import pytest

from tests.helpers import REPO, run_cli

STAGES = [("pretrain", "val_loss"), ("long_context", "val_loss"), ("sft", "val_loss"), ("dpo", "rewards/accuracy"),
          ("grpo", "reward")]
README_START = "runs/qwen2_5_tiny/checkpoints"  # the Quickstart's default job


def readme_post_training_commands() -> list:
    """The trainer arguments of the README's "Post-training in minutes" commands, in order."""
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Post-training in minutes"):]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    prefix = ["python", "-m", "megatron_qwen.train"]
    commands = [shlex.split(line.split("#")[0]) for line in block.splitlines() if line.strip()]
    assert all(c[:3] == prefix for c in commands), commands
    return [c[3:] for c in commands]


def test_the_readme_post_training_commands_use_the_presets():
    commands = readme_post_training_commands()
    assert [c[0] for c in commands] == ["experiment=sft_tiny", "experiment=dpo_tiny", "experiment=grpo_tiny"]
    assert commands[0][1] == f"checkpoint.load={README_START}"


def test_the_shipped_task_files_are_the_generators_output(tmp_path):
    run_cli([sys.executable, "tools/pipeline_tiny.py", "--write-task", str(tmp_path)])
    for name in ("sft", "pairs", "prompts", "valid"):
        assert (tmp_path / f"{name}.jsonl").read_bytes() == (REPO / "data" / "tiny" / f"{name}.jsonl").read_bytes()


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
    # Stages 3-5 ran the README's commands, from the pipeline's long-context checkpoint and in its run dirs.
    for readme, row in zip(readme_post_training_commands(), summary["stages"][2:]):
        mapped = [arg.replace(README_START, str(out / "long_context" / "checkpoints")).replace("=runs/", f"={out}/")
                  for arg in readme]
        assert row["command"] == mapped, (row["command"], mapped)
    # Each stage started from the previous one's last checkpoint (weights only: its own step count).
    for (previous, _), (stage, _) in zip(STAGES, STAGES[1:]):
        log = (out / stage / "stdout.log").read_text()
        assert f"loaded {out / previous / 'checkpoints'}/iter_" in log and "(optimizer: False, rng: False)" in log
    long_context = (out / "long_context" / "config.yaml").read_text()
    assert "cp: 2" in long_context and "name: long_context" in long_context
    # The export: transformers loaded it (the script exits on missing or unexpected keys) and generated.
    assert summary["answer"].strip() and (out / "hf" / "model.safetensors").is_file()
    assert f"-> {summary['answer']!r}" in proc.stdout
