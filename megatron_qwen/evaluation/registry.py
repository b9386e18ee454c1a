"""Task names for lm-eval: the tasks shipped in ``tasks/`` (lm-eval YAML over local JSONL) beside
lm-eval's own registry (any hub task, where the machine can download its data).

lm-eval hands ``dataset_kwargs.data_files`` to ``datasets.load_dataset``, which reads relative
paths from the working directory; a shipped task's files are resolved against ``tasks/``
instead, so the tasks work from any directory.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, List, Sequence, Union

import yaml

from megatron_qwen.errors import UserError

TASKS_DIR = Path(__file__).resolve().parent / "tasks"


def offline() -> None:
    """Makes Hugging Face datasets/hub calls local-only (the shipped tasks need no network), unless
    the user asked otherwise (``HF_DATASETS_OFFLINE=0``)."""
    for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        os.environ.setdefault(name, "1")


def shipped_tasks() -> Dict[str, Path]:
    """Task name -> YAML file of every task in ``tasks/``."""
    return {yaml.safe_load(path.read_text())["task"]: path for path in sorted(TASKS_DIR.glob("*.yaml"))}


def _with_local_files(path: Path) -> dict:
    config = yaml.safe_load(path.read_text())
    files = config["dataset_kwargs"]["data_files"]
    config["dataset_kwargs"]["data_files"] = {split: str(path.parent / name) for split, name in files.items()}
    return config


def task_specs(names: Sequence[str]) -> List[Union[str, dict]]:
    """What ``lm_eval.simple_evaluate(tasks=...)`` takes: a shipped task's config (data files
    resolved), any other name as is (lm-eval's registry)."""
    shipped = shipped_tasks()
    return [_with_local_files(shipped[name]) if name in shipped else name for name in names]


def task_manager(names: Sequence[str]):
    """lm-eval's TaskManager for ``names``: its full registry only when a name is not shipped
    (indexing lm-eval's thousands of task files takes seconds, on every rank)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_defaults=any(name not in shipped_tasks() for name in names))


def check_task_names(names: Sequence[str]) -> None:
    """Raises a UserError naming the tasks neither shipped nor in lm-eval's registry."""
    if not names:
        raise UserError("no tasks given; name lm-eval tasks, e.g. " + ",".join(shipped_tasks()))
    known = task_manager(names).all_tasks
    unknown = [name for name in names if name not in shipped_tasks() and name not in known]
    if unknown:
        raise UserError(f"unknown lm-eval task(s) {', '.join(unknown)}; use a shipped task "
                        f"({', '.join(shipped_tasks())}) or one `lm_eval ls tasks` lists")
