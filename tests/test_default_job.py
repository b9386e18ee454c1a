"""The README's default job, run verbatim (plus a private run_dir), trains and its loss falls."""

import re
import shlex

import pytest

from tests.helpers import REPO, losses, read_metrics, run_cli


def _readme_train_command() -> list:
    readme = (REPO / "README.md").read_text()
    quickstart = readme.split("## Quickstart", 1)[1]
    first_block = re.search(r"```bash\n(.*?)\n```", quickstart, re.S).group(1)
    command = first_block.split("&&")[-1].strip()  # after venv + install: the training command
    assert command.startswith("python -m megatron_qwen.train"), command
    return shlex.split(command)


@pytest.mark.slow
def test_readme_default_job_loss_falls(tmp_path):
    run_cli([*_readme_train_command(), f"run_dir={tmp_path}"], timeout=900, env={"WANDB_MODE": "offline"})
    train = losses(read_metrics(tmp_path))
    steps = sorted(train)
    assert len(steps) >= 4
    first, last = train[steps[0]], train[steps[-1]]
    assert last < first - 1.0, f"loss did not fall: {first} -> {last}"
    val = [r["val_loss"] for r in read_metrics(tmp_path, "eval.jsonl")]
    assert len(val) >= 2 and val[-1] < val[0], val
    assert (tmp_path / "checkpoints" / "latest_checkpointed_iteration.txt").is_file()
