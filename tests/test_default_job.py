"""The README's default job, run verbatim (plus a private run_dir), trains on the embedded
corpus with the real vocabulary and its training and validation losses fall. (stage=sft on
packed conversations is run end to end by tests/test_pipeline_tiny.py.)"""

import re
import shlex

import pytest
import yaml

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
    resolved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert resolved["data"]["type"] == "embedded" and resolved["model"]["vocab_size"] == 151936
    train = losses(read_metrics(tmp_path))
    steps = sorted(train)
    assert len(steps) >= 4
    first, last = train[steps[0]], train[steps[-1]]
    assert last < first - 1.0, f"loss did not fall: {first} -> {last}"
    val = [r["val_loss"] for r in read_metrics(tmp_path, "eval.jsonl")]
    assert len(val) >= 3 and all(a > b for a, b in zip(val, val[1:])), val
    for record in read_metrics(tmp_path, "eval.jsonl"):  # per-domain losses from the same batches
        shares = {name: record[f"val_samples/{name}"] for name in ("code", "prose")}
        assert all(shares.values()) and sum(shares.values()) == 4 * 4, record  # eval_iters x global_batch_size
        mean = sum(n * record[f"val_loss/{name}"] for name, n in shares.items()) / sum(shares.values())
        assert mean == pytest.approx(record["val_loss"], rel=1e-6), record
    assert (tmp_path / "checkpoints" / "latest_checkpointed_iteration.txt").is_file()
