"""Shared pieces of the SLURM tests: template parsing, the local cluster, job polling."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence
from unittest import mock

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from tests.helpers import REPO

SLURM_DIR = REPO / "slurm"
PREPROCESS = "preprocess.sh"  # the tokenization job array; not a training job
SHARED = "env.sh"  # sourced by train.sbatch and the sweep launchers; not a job
TEMPLATES = sorted(p.name for p in SLURM_DIR.iterdir()
                   if p.suffix in (".sh", ".sbatch") and p.name not in (PREPROCESS, SHARED))
MODEL_TEMPLATES = [t for t in TEMPLATES if t != "train.sbatch"]  # each runs one experiment preset
START_CLUSTER = REPO / "tests" / "slurm" / "start_cluster.sh"


@dataclass(frozen=True)
class Template:
    """What a template declares: its #SBATCH options and the Hydra overrides it passes."""

    options: Dict[str, str]  # "--nodes" -> "8"; flags map to ""
    overrides: List[str]  # key=value words of its launch line (before "$@")

    @property
    def world_size(self) -> int:
        return int(self.options["--nodes"]) * int(self.options["--ntasks-per-node"])

    @property
    def experiment(self) -> str:
        return next(o.split("=", 1)[1] for o in self.overrides if o.startswith("experiment="))


def parse_template(name: str) -> Template:
    text = (SLURM_DIR / name).read_text()
    options = {}
    for line in re.findall(r"^#SBATCH\s+(\S+)", text, flags=re.M):
        key, _, value = line.partition("=")
        options[key] = value
    launch = next(line for line in text.splitlines() if '"$@"' in line and not line.startswith("#"))
    overrides = [w for w in launch.split() if re.fullmatch(r"[\w./]+=\S+", w) and "$" not in w]
    return Template(options, overrides)


# Stand-ins for srun and scontrol: each call appends {"argv": [...], "env": {...}} to $STUB_LOG;
# srun exits with $STUB_SRUN_STATUS, `scontrol show hostnames` prints four nodes.
_STUB = """#!/usr/bin/env python3
import json, os, sys
with open(os.environ["STUB_LOG"], "a") as log:
    log.write(json.dumps({"tool": os.path.basename(sys.argv[0]), "argv": sys.argv[1:], "env": dict(os.environ)}) + "\\n")
if sys.argv[1:3] == ["show", "hostnames"]:
    print("\\n".join(f"gpu-node{i:02d}" for i in range(1, 5)))
sys.exit(int(os.environ.get("STUB_SRUN_STATUS", "0")) if sys.argv[0].endswith("srun") else 0)
"""


@dataclass(frozen=True)
class Rendered:
    """What a template did when run as a batch script against stand-in SLURM tools."""

    srun_args: List[str]  # srun's options and command
    srun_env: Dict[str, str]  # the environment srun (and so every task) got
    requeued: bool  # whether it ran `scontrol requeue`
    status: int  # the batch script's exit status


def _stub_tools(tmp: Path) -> Path:
    """A bin directory whose srun and scontrol are the stand-ins above."""
    bin_dir = tmp / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    for tool in ("srun", "scontrol"):
        (bin_dir / tool).write_text(_STUB)
        (bin_dir / tool).chmod(0o755)
    return bin_dir


def _run_batch_script(script: Path, args: Sequence[str], tmp: Path, job: Dict[str, str],
                      env: Optional[Dict[str, str]], srun_status: int) -> Rendered:
    """Runs a batch script from the repository root as SLURM would, with srun/scontrol stubbed."""
    bin_dir, log = _stub_tools(tmp), tmp / "stub.jsonl"
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_", "OMP_", "SRUN_", "SUBMITIT_"))}
    full_env = {**base, "SLURM_JOB_ID": "4321", "SLURM_JOB_NODELIST": "gpu-node[01-04]", **job,
                "PATH": f"{bin_dir}:{os.environ['PATH']}", "STUB_LOG": str(log),
                "STUB_SRUN_STATUS": str(srun_status), **(env or {})}
    proc = subprocess.run(["bash", str(script), *args], cwd=REPO, env=full_env,
                          capture_output=True, text=True, timeout=60)
    calls = [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []
    srun = next((c for c in calls if c["tool"] == "srun"), None)
    assert srun is not None, f"{script.name} ran no srun (exit {proc.returncode}): {proc.stderr[-2000:]}"
    requeued = any(c["tool"] == "scontrol" and c["argv"][:1] == ["requeue"] for c in calls)
    return Rendered(srun["argv"], srun["env"], requeued, proc.returncode)


def render(template: str, tmp: Path, nodes: int = 4, env: Optional[Dict[str, str]] = None,
           overrides: List[str] = (), srun_status: int = 0) -> Rendered:
    """Runs ``slurm/<template>`` as SLURM would for a ``nodes``-node job, with srun/scontrol stubbed."""
    opts = parse_template(template).options
    job = {"SLURM_JOB_NAME": opts["--job-name"], "SLURM_NNODES": str(nodes),
           "SLURM_NTASKS": str(int(opts["--ntasks-per-node"]) * nodes), "SLURM_CPUS_PER_TASK": opts["--cpus-per-task"]}
    return _run_batch_script(SLURM_DIR / template, overrides, tmp, job, env, srun_status)


def sweep_launcher_script(launcher: str, overrides: Sequence[str], tmp: Path) -> str:
    """The batch script hydra-submitit-launcher submits for ``-m hydra/launcher=<launcher> <overrides>``.

    Runs the launcher's own ``launch`` (its mapping of the config onto submitit's executor); only
    the array submission is replaced by writing submitit's script text.
    """
    import submitit
    from hydra.utils import instantiate

    from megatron_qwen.config.store import CONF_DIR, register

    register()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"hydra/launcher={launcher}", *overrides],
                      return_hydra_config=True)
    launcher_obj = instantiate(cfg.hydra.launcher)
    launcher_obj.config = cfg
    scripts: List[str] = []

    def capture(executor, fn, *iterables):
        slurm = executor._executor
        if len(iterables[0]) > 1:  # as submitit's submission does: one point is a plain job
            slurm.parameters["map_count"] = len(iterables[0])
        scripts.append(slurm._make_submission_file_text(slurm._submitit_command_str, "uid"))
        return []

    with mock.patch.dict(os.environ, {"PATH": f"{_stub_tools(tmp)}:{os.environ['PATH']}"}), \
            mock.patch.object(submitit.AutoExecutor, "map_array", capture):
        launcher_obj.launch([["optim.lr=1e-4"]], initial_job_idx=0)
    return scripts[0]


def render_sweep_launcher(launcher: str, tmp: Path, nodes: int = 4, env: Optional[Dict[str, str]] = None,
                          srun_status: int = 0) -> Rendered:
    """Runs the batch script of ``hydra/launcher=<launcher>`` for a ``nodes``-node point, with srun/scontrol stubbed."""
    text = sweep_launcher_script(launcher, [f"hydra.launcher.nodes={nodes}", f"run_dir={tmp / 'sweep_run'}"], tmp)
    script = tmp / "submitit.sbatch"
    script.write_text(text)
    options = dict(re.findall(r"^#SBATCH --([\w-]+)=?(\S*)", text, flags=re.M))
    job = {"SLURM_JOB_NAME": options["job-name"], "SLURM_NNODES": str(nodes),
           "SLURM_NTASKS": str(int(options["ntasks-per-node"]) * nodes), "SLURM_CPUS_PER_TASK": options["cpus-per-task"]}
    return _run_batch_script(script, [], tmp, job, env, srun_status)


def start_cluster() -> str:
    """Runs tests/slurm/start_cluster.sh; returns the SLURM_CONF path (raises on failure)."""
    proc = subprocess.run(["bash", str(START_CLUSTER)], capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"start_cluster.sh exited {proc.returncode}: {proc.stderr[-2000:]}")
    return proc.stdout.strip().splitlines()[-1]


FINAL_STATES = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")


def job_state(job_id: str, env: Dict[str, str]) -> Dict[str, str]:
    """``scontrol show job`` as a dict (JobState, Restarts, ExitCode, ...)."""
    out = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True,
                         env=env, check=True).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def wait_for_job(job_id: str, env: Dict[str, str], timeout: float = 900) -> Dict[str, str]:
    """Polls until the job reaches a final state (a requeued job passes through PENDING)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = job_state(job_id, env)
        if state["JobState"] in FINAL_STATES:
            return state
        time.sleep(1)
    raise TimeoutError(f"job {job_id} still {job_state(job_id, env)['JobState']} after {timeout} s")


def wait_for_array(job_id: str, env: Dict[str, str], timeout: float = 300) -> Dict[int, Dict[str, str]]:
    """Polls a job array until every task is in a final state; ``scontrol show job`` per task index.

    NOTE: polling once a second, not ``sbatch --wait``, which checks every ~10 s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True,
                             env=env, check=True).stdout
        tasks = [dict(re.findall(r"(\w+)=(\S*)", record)) for record in out.split("\n\n") if record.strip()]
        if all(t["JobState"] in FINAL_STATES for t in tasks):
            return {int(t["ArrayTaskId"]): t for t in tasks}
        time.sleep(1)
    raise TimeoutError(f"job array {job_id} not finished after {timeout} s")


def wait_for_file_lines(path: Path, lines: int, job_id: str, env: Dict[str, str], timeout: float = 600) -> None:
    """Waits until ``path`` has ``lines`` lines while the job is still running."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.is_file() and len(path.read_text().splitlines()) >= lines:
            return
        state = job_state(job_id, env)["JobState"]
        assert state in ("PENDING", "CONFIGURING", "RUNNING"), f"job {job_id} is {state} before {path} had {lines} lines"
        time.sleep(0.1)
    raise TimeoutError(f"{path} did not reach {lines} lines in {timeout} s")


def slurm_env(conf: str, extra: Dict[str, str]) -> Dict[str, str]:
    """Environment for SLURM clients and the jobs they submit (sbatch exports it)."""
    return {**os.environ, "SLURM_CONF": conf, **extra}
