"""slurm/preprocess.sh: a job array tokenizing shards of a file list, resumable, with a blend file.

End to end, a 3-shard array runs on the local SLURM cluster (the ``cluster_env`` fixture) and its
shards are checked token for token against one tools/preprocess_data.py run over the same files.
The quick checks run the script as SLURM runs an array task (SLURM_ARRAY_TASK_ID / _COUNT set)
with a stand-in for the tool.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import pytest
import yaml

from tests.helpers import REPO, run_cli
from tests.slurm_support import PREPROCESS, SLURM_DIR, wait_for_array

SHARD_FILES = {0: [0, 3], 1: [1], 2: [2]}  # task i of 3 takes every third file of the list from i


def _write_inputs(tmp_path: Path) -> List[Path]:
    """Four JSONL files of three documents each (different lengths) and files.txt listing them."""
    parts = []
    for i in range(4):
        path = tmp_path / f"part{i}.jsonl"
        path.write_text("".join(json.dumps({"text": f"document {i}.{j} " * (i + j + 1)}) + "\n" for j in range(3)))
        parts.append(path)
    names = [str(p) for p in parts]  # a blank line in the list is not an entry
    (tmp_path / "files.txt").write_text("\n".join(names[:2]) + "\n\n" + "\n".join(names[2:]) + "\n")
    return parts


def _submit(indices: str, tmp_path: Path, env: Dict[str, str]) -> Dict[int, Tuple[str, str]]:
    """sbatch --array=INDICES slurm/preprocess.sh files.txt out; each task's (final state, job log)."""
    proc = run_cli(["sbatch", "--parsable", f"--array={indices}", "--cpus-per-task=1",
                    f"--output={tmp_path}/log-%A_%a.out", f"slurm/{PREPROCESS}", str(tmp_path / "files.txt"),
                    str(tmp_path / "out")], env={**env, "CONTAINER_IMAGE": "none"}, timeout=60)
    job = proc.stdout.strip().split(";")[0]
    return {task: (state["JobState"], (tmp_path / f"log-{job}_{task}.out").read_text())
            for task, state in wait_for_array(job, env).items()}


def _blend(out: Path) -> List[Tuple[str, int]]:
    return [(e["path"], e["weight"]) for e in yaml.safe_load((out / "blend.yaml").read_text())["blend"]]


@pytest.mark.slow
def test_three_shard_array_on_slurm_matches_one_process_resumes_and_loads_as_a_blend(cluster_env, tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megatron_qwen.config.store import compose_config
    from megatron_qwen.data.datasets import build_datasets, dataset_shares
    from megatron_qwen.data.preprocess import PreprocessOptions, preprocess
    from tests.data_support import destroy_single_rank, init_single_rank

    parts, out = _write_inputs(tmp_path), tmp_path / "out"
    good = parts[2].read_text()
    parts[2].write_text(good + '{"text": broken\n')  # shard 2's only file: line 4 is bad
    first = _submit("0-2", tmp_path, cluster_env)
    assert {t: state for t, (state, _) in first.items()} == {0: "COMPLETED", 1: "COMPLETED", 2: "FAILED"}, first
    assert first[0][1].splitlines()[0] == f"shard 0 of 3: 2 file(s) -> {out}/shard_00000"  # the log kept its start
    failed = first[2][1].splitlines()
    assert len(failed) == 2 and failed[0] == f"shard 2 of 3: 1 file(s) -> {out}/shard_00002", failed
    assert failed[1].startswith(f"error: {parts[2]}:4: malformed JSON") and failed[1].endswith("--skip-bad-lines")
    assert sorted(p.name for p in out.glob("shard_00002*")) == []  # no partial prefix, no marker
    assert [path for path, _ in _blend(out)] == [f"{out}/shard_00000", f"{out}/shard_00001"]

    # Resubmitted for shards 1 and 2 (the list stays cut in three): the finished shard is skipped,
    # the failed one runs again and what a killed run of it left is removed.
    parts[2].write_text(good)
    finished = {p.name: p.stat().st_mtime_ns for p in out.glob("shard_*")}
    (out / "shard_00002.tmp4242.bin").write_bytes(b"partial")
    again = _submit("1-2", tmp_path, cluster_env)
    assert {t: state for t, (state, _) in again.items()} == {1: "COMPLETED", 2: "COMPLETED"}, again
    assert again[1][1] == "shard 1 of 3: done already (51 tokens), skipped\n"
    assert again[2][1].startswith("shard 2 of 3: 1 file(s)"), again
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("shard_0000[01]*")} == finished
    assert not list(out.glob("*.tmp*"))

    # Reference: one process over the whole list (12 documents, three per file in list order).
    preprocess([str(p) for p in parts], str(tmp_path / "one"), PreprocessOptions(progress=False))
    reference = IndexedDataset(str(tmp_path / "one"))
    per_file = [[reference[3 * f + j] for j in range(3)] for f in range(4)]
    blend = _blend(out)
    assert [path for path, _ in blend] == [f"{out}/shard_{t:05d}" for t in range(3)]
    for task, files in SHARD_FILES.items():
        shard, expected = IndexedDataset(blend[task][0]), [doc for f in files for doc in per_file[f]]
        assert len(shard) == len(expected) and all(np.array_equal(shard[i], d) for i, d in enumerate(expected))
        assert blend[task][1] == sum(len(d) for d in expected)
    tokens = int(reference.sequence_lengths.sum())
    assert sum(w for _, w in blend) == tokens == 234

    # The blend file is a data= preset: composed by Hydra, built by megatron, sampled by its weights.
    # NOTE: split 100,0,0: training reads every document, so its shares follow the weights (the
    # shards' token counts). With validation asked for, the default 98,1,1 stops with one line: it
    # gives these 3- and 6-document shards no validation document (tests/test_data_split.py).
    (tmp_path / "conf" / "data").mkdir(parents=True)
    shutil.copy(out / "blend.yaml", tmp_path / "conf" / "data" / "shards.yaml")
    cfg = compose_config([f"hydra.searchpath=[file://{tmp_path / 'conf'}]", "data=shards", "parallel.dp=1",
                          f"data.cache_dir={tmp_path / 'cache'}", 'data.split="100,0,0"', "train.seq_length=16"])
    assert (cfg.data.type, [(e.path, e.weight) for e in cfg.data.blend]) == ("indexed", blend)
    init_single_rank(cfg)
    try:
        train, _ = build_datasets(cfg, 400, 0)
        shares = dataset_shares(train)
    finally:
        destroy_single_rank()
    assert [path for path, _ in shares] == [path for path, _ in blend]
    total = sum(n for _, n in shares)
    assert all(abs(n / total - w / tokens) < 0.02 for (_, n), (_, w) in zip(shares, blend)), shares


# Stands in for `python tools/preprocess_data.py ...`: logs its --input files, prints the summary line.
FAKE_TOOL = """#!/bin/bash
shift
inputs=()
while [[ $1 == --input || ($1 != --* && $1) ]]; do [[ $1 == --input ]] || inputs+=("$1"); shift; done
echo "${inputs[*]}" >>"$FAKE_TOOL_LOG"
echo "$2: ${#inputs[@]} documents | $((7 * ${#inputs[@]})) tokens | 1 tokens/s"
"""


def _task(tmp_path: Path, task: int, count: int, path_prefix: str = "") -> subprocess.Popen:
    """One array task of ``count`` as SLURM starts it, with the stand-in tool."""
    tool = tmp_path / "fake_python"
    if not tool.exists():
        tool.write_text(FAKE_TOOL)
        tool.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(SLURM_ARRAY_TASK_ID=str(task), SLURM_ARRAY_TASK_COUNT=str(count), CONTAINER_IMAGE="none",
               PYTHON=str(tool), FAKE_TOOL_LOG=str(tmp_path / "tool.log"), PATH=path_prefix + env["PATH"])
    return subprocess.Popen(["bash", str(SLURM_DIR / PREPROCESS), str(tmp_path / "files.txt"), str(tmp_path / "out")],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _run(tmp_path: Path, task: int, count: int) -> Tuple[int, str, str]:
    proc = _task(tmp_path, task, count)
    stdout, stderr = proc.communicate(timeout=60)
    return proc.returncode, stdout, stderr


def test_rerunning_some_tasks_keeps_the_sharding_and_bad_invocations_are_refused(tmp_path):
    parts = [str(p) for p in _write_inputs(tmp_path)]
    assert _run(tmp_path, 1, 3)[0] == 0  # the first submission: --array=0-2
    # Reruns of some tasks (--array=2, --array=0,2): SLURM's task count is that of the rerun.
    assert _run(tmp_path, 2, 1)[0] == 0
    assert _run(tmp_path, 0, 2)[0] == 0
    assert (tmp_path / "tool.log").read_text().splitlines() == [parts[1], parts[2], f"{parts[0]} {parts[3]}"]
    assert _run(tmp_path, 2, 3)[1].startswith("shard 2 of 3: done already (7 tokens), skipped")
    code, _, err = _run(tmp_path, 3, 4)
    assert code == 2 and err == f"error: array index 3 is not a shard of {tmp_path}/out (the list is cut into 3 " \
                                "shards, 0..2); submit indices in that range\n"
    with open(tmp_path / "files.txt", "a") as f:
        f.write(f"{tmp_path}/part4.jsonl\n")
    code, _, err = _run(tmp_path, 1, 3)
    assert code == 2 and err == f"error: {tmp_path}/files.txt changed since {tmp_path}/out was sharded " \
                                f"({tmp_path}/out/shards); restore the list or use a new OUT_DIR\n"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    plain = subprocess.run(["bash", str(SLURM_DIR / PREPROCESS), "files.txt", "out"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=60)
    assert plain.returncode == 2 and "run as a job array" in plain.stderr


def test_tasks_finishing_together_leave_a_blend_of_every_shard(tmp_path):
    _write_inputs(tmp_path)
    # Task 0's first `cat` (reading the token counts of the shards it listed: its own) waits until
    # task 1 has finished and written its blend of both shards; task 0 renames its blend last.
    stub = tmp_path / "stub"
    stub.mkdir()
    (stub / "cat").write_text(f"""#!/bin/bash
if [[ ! -e {stub}/waiting ]]; then
  touch {stub}/waiting
  while [[ ! -e {stub}/go ]]; do sleep 0.05; done
fi
exec {shutil.which("cat")} "$@"
""")
    (stub / "cat").chmod(0o755)
    first = _task(tmp_path, 0, 2, path_prefix=f"{stub}:")
    deadline = time.monotonic() + 30
    while not (stub / "waiting").exists():
        assert first.poll() is None and time.monotonic() < deadline, first.communicate()
        time.sleep(0.05)
    assert _run(tmp_path, 1, 2)[0] == 0
    (stub / "go").touch()
    assert first.wait(timeout=60) == 0
    out = tmp_path / "out"
    assert _blend(out) == [(f"{out}/shard_00000", 14), (f"{out}/shard_00001", 14)]
