"""slurm/preprocess.sh: a job array tokenizing shards of a file list, resumable, with a blend file.

Each array task is run as SLURM would run it (SLURM_ARRAY_TASK_ID / _COUNT set, no container),
three tasks over four input files; the token counts are checked against the indexed datasets.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import yaml

from tests.helpers import REPO
from tests.slurm_support import PREPROCESS, SLURM_DIR


def _task(tmp_path, task: int, count: int = 3, args=()) -> subprocess.CompletedProcess:
    env = {**os.environ, "SLURM_ARRAY_TASK_ID": str(task), "SLURM_ARRAY_TASK_COUNT": str(count),
           "CONTAINER_IMAGE": "none", "PYTHON": sys.executable, "SLURM_CPUS_PER_TASK": "1"}
    return subprocess.run(["bash", str(SLURM_DIR / PREPROCESS), str(tmp_path / "files.txt"), str(tmp_path / "out"),
                           *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_three_shard_array_tokenizes_every_file_once_resumes_and_writes_the_blend(tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    paths = []
    for i in range(4):
        path = tmp_path / f"part{i}.jsonl"
        path.write_text("".join(json.dumps({"text": f"document {i}.{j} " * (i + j + 1)}) + "\n" for j in range(3)))
        paths.append(str(path))
    (tmp_path / "files.txt").write_text("\n".join(paths[:2]) + "\n\n" + "\n".join(paths[2:]) + "\n")
    for task in range(3):
        proc = _task(tmp_path, task)
        assert proc.returncode == 0, proc.stderr
    out = tmp_path / "out"
    docs = {task: len(IndexedDataset(str(out / f"shard_{task:05d}")).sequence_lengths) for task in range(3)}
    assert docs == {0: 6, 1: 3, 2: 3}  # task 0 got files 0 and 3 (every third file), 3 documents each
    blend = yaml.safe_load((out / "blend.yaml").read_text())
    assert blend["type"] == "indexed" and len(blend["blend"]) == 3
    for task, entry in enumerate(blend["blend"]):
        dataset = IndexedDataset(entry["path"])
        assert entry["path"] == str(out / f"shard_{task:05d}") and entry["weight"] == int(dataset.sequence_lengths.sum())
    # A finished shard is skipped when the array runs again; a wrong invocation is refused.
    before = (out / "shard_00001.bin").stat().st_mtime_ns
    again = _task(tmp_path, 1)
    assert again.returncode == 0 and "skipped" in again.stdout
    assert (out / "shard_00001.bin").stat().st_mtime_ns == before
    wrong = _task(tmp_path, 3)
    assert wrong.returncode == 2 and "run as a job array" in wrong.stderr
