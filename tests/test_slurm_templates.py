"""The sbatch templates: valid bash, the #SBATCH contract, and presets that compose."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from megatron_qwen.config import Config, validate
from megatron_qwen.config.environment import layout_env
from megatron_qwen.config.plan import signal_lead_seconds
from megatron_qwen.config.store import compose_config
from megatron_qwen.training.resilience.signals import RESUMABLE_EXIT_CODE
from tests.helpers import REPO
from tests.slurm_support import (MODEL_TEMPLATES, SLURM_DIR, TEMPLATES, parse_template, render,
                                 render_sweep_launcher, sweep_launcher_script)

GPU_TEMPLATES = [t for t in TEMPLATES if t != "pretrain_tiny.sh"]
DOCKERFILE = SLURM_DIR / "container" / "Dockerfile"


def test_every_expected_template_exists():
    assert {"pretrain_72b.sh", "pretrain_7b.sh", "pretrain_57b_a14b.sh", "sft_7b.sh", "train.sbatch",
            "pretrain_tiny.sh"} <= set(TEMPLATES)


@pytest.mark.parametrize("name", TEMPLATES)
def test_template_is_valid_bash(name):
    proc = subprocess.run(["bash", "-n", str(SLURM_DIR / name)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("name", TEMPLATES)
def test_template_declares_a_preemptible_job(name):
    options = parse_template(name).options
    for key in ("--job-name", "--nodes", "--ntasks-per-node", "--time", "--output"):
        assert options.get(key), f"{name} lacks #SBATCH {key}"
    assert "--requeue" in options, f"{name} must be requeueable so that a preempted job resumes"
    assert options["--open-mode"] == "append", "a requeued job must append to its log, not truncate it"
    signal, _, seconds = options["--signal"].partition("@")
    assert signal == "USR1" and int(seconds) >= 60, "the trainer's exit signal must come before the time limit"
    assert "%j" in options["--output"], "logs must be per job"


@pytest.mark.parametrize("name", GPU_TEMPLATES)
def test_gpu_templates_run_one_task_per_gpu_on_whole_nodes(name):
    options = parse_template(name).options
    assert options["--ntasks-per-node"] == options["--gpus-per-node"] == "8"
    assert "--exclusive" in options


@pytest.mark.parametrize("name", MODEL_TEMPLATES)
def test_model_templates_delegate_to_the_generic_launcher(name):
    code = [line for line in (SLURM_DIR / name).read_text().splitlines() if line and not line.startswith("#")]
    assert len(code) == 1, f"{name}: only the #SBATCH header and one launch line, got {code}"
    assert code[0].startswith("exec bash slurm/train.sbatch experiment=") and code[0].endswith('"$@"')


def test_generic_launcher_requeues_on_the_trainers_resumable_exit_code():
    text, shared = (SLURM_DIR / "train.sbatch").read_text(), (SLURM_DIR / "env.sh").read_text()
    assert "source slurm/env.sh" in text and 'requeue_after_exit $? "$RUN_DIR"' in text
    assert f"RESUMABLE_EXIT_CODE={RESUMABLE_EXIT_CODE}" in shared
    assert 'scontrol requeue "$SLURM_JOB_ID"' in shared
    assert "--kill-on-bad-exit=0" in shared and 'srun "${srun_args[@]}"' in text


@pytest.mark.parametrize("name", TEMPLATES)
def test_a_4_node_job_gets_rendezvous_cpus_environment_and_fail_fast_srun(name, tmp_path):
    image = tmp_path / "megatron_qwen.sqsh"
    image.write_bytes(b"")
    out = render(name, tmp_path, nodes=4, env={"CONTAINER_IMAGE": str(image), "MEGATRON_QWEN_CACHE": str(tmp_path / "c"),
                                               "CONTAINER_MOUNTS": "/data:/data"})
    env, args = out.srun_env, out.srun_args
    cpus = parse_template(name).options["--cpus-per-task"]
    # Rendezvous decided in the batch script (scontrol is not in the container): first node, job-id port.
    assert (env["MASTER_ADDR"], env["MASTER_PORT"]) == ("gpu-node01", str(20000 + 4321))
    # Slurm >= 22.05: srun does not inherit --cpus-per-task; every rank gets the cores asked for.
    assert env["SRUN_CPUS_PER_TASK"] == cpus and env["OMP_NUM_THREADS"] == cpus
    for key, value in {"TORCH_NCCL_HIGH_PRIORITY": "1", "NCCL_NVLS_ENABLE": "0",
                       "TORCH_NCCL_AVOID_RECORD_STREAMS": "1",
                       "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}.items():
        assert env[key] == value, key
    # A crashed rank ends the step 120 s later; a clean exit 75 is not turned into a kill.
    assert "--kill-on-bad-exit=0" in args and "--wait=120" in args
    assert f"--container-image={image}" in args and f"--container-workdir={REPO}" in args
    mounts = next(a for a in args if a.startswith("--container-mounts=")).split("=", 1)[1].split(",")
    assert mounts == [f"{REPO}:{REPO}", f"{tmp_path / 'c'}:{tmp_path / 'c'}", "/data:/data"]
    command = args[args.index("python"):]
    job = parse_template(name).options["--job-name"]
    assert command[:4] == ["python", "-m", "megatron_qwen.train", f"run_dir=runs/{job}"]
    # The overrides it runs validate for the 4-node world size; what the layout implies for the
    # environment is left to the trainer (config/environment.py), so that it follows the overrides.
    world = 4 * int(parse_template(name).options["--ntasks-per-node"])
    assert not set(layout_env(Config(), world)) & set(env) and "NVTE_FWD_LAYERNORM_SM_MARGIN" not in env
    if name != "train.sbatch":
        cfg = validate(compose_config(command[4:]), world)
        implied = layout_env(cfg, world)
        p = cfg.parallel
        assert implied["CUDA_DEVICE_MAX_CONNECTIONS"] == ("1" if p.tp * p.cp > 1 else "32")
        assert ("NCCL_P2P_NET_CHUNKSIZE" in implied) == (p.pp > 1 and name != "pretrain_tiny.sh")


def test_the_site_hook_sets_the_fabric_without_editing_templates(tmp_path):
    site = tmp_path / "site.sh"
    site.write_text("export NCCL_IB_HCA=mlx5_0,mlx5_1\nexport NCCL_SOCKET_IFNAME=ib0\n")
    env = render("pretrain_72b.sh", tmp_path, env={"CONTAINER_IMAGE": "none", "MEGATRON_QWEN_SITE_ENV": str(site)}).srun_env
    assert (env["NCCL_IB_HCA"], env["NCCL_SOCKET_IFNAME"]) == ("mlx5_0,mlx5_1", "ib0")
    broken = render("pretrain_72b.sh", tmp_path, env={"CONTAINER_IMAGE": "none",
                                                       "MEGATRON_QWEN_SITE_ENV": str(tmp_path / "missing.sh")})
    assert broken.status == 1


@pytest.mark.parametrize("experiment, world, expected", [
    # 7B TP1 x DP: 32 hardware queues, no PP, no TP overlap.
    ("pretrain_7b", 16, {"CUDA_DEVICE_MAX_CONNECTIONS": "32"}),
    # 72B TP4 + SP with userbuffers, PP8 across 8 nodes.
    ("pretrain_72b", 64, {"CUDA_DEVICE_MAX_CONNECTIONS": "1", "NCCL_P2P_NET_CHUNKSIZE": "2097152",
                          "NVTE_FWD_LAYERNORM_SM_MARGIN": "20", "NVTE_BWD_LAYERNORM_SM_MARGIN": "20"}),
    # Long context: CP4 -> one queue; GRPO: TP2 without SP, so no TP overlap margins.
    ("long_context_7b", 32, {"CUDA_DEVICE_MAX_CONNECTIONS": "1", "NVTE_FWD_LAYERNORM_SM_MARGIN": "20",
                             "NVTE_BWD_LAYERNORM_SM_MARGIN": "20"}),
    ("grpo_7b", 8, {"CUDA_DEVICE_MAX_CONNECTIONS": "1"}),
])
def test_environment_follows_the_layout(experiment, world, expected):
    assert layout_env(validate(compose_config([f"experiment={experiment}"]), world), world) == expected


def test_pipeline_chunk_size_only_when_the_pipeline_crosses_nodes():
    one_node = validate(compose_config(["experiment=pretrain_72b", "train.global_batch_size=32", "model.num_layers=8",
                                        "parallel.pp_layout=null", "parallel.vpp=null", "parallel.pp=2"]), 8)
    assert "NCCL_P2P_NET_CHUNKSIZE" not in layout_env(one_node, 8)
    assert layout_env(one_node, 16)["NCCL_P2P_NET_CHUNKSIZE"] == "2097152"


def test_the_trainer_applies_the_layout_environment_unless_exported(tmp_path, monkeypatch):
    from megatron_qwen.config import features
    from megatron_qwen.platform import launch
    from megatron_qwen.train import run

    monkeypatch.setattr(features, "detect", lambda: features.NONE)
    monkeypatch.setattr(launch, "detect_process_env", lambda: launch.ProcessEnv(1, 2, 1, "localhost", 1, "slurm"))
    for key in ("CUDA_DEVICE_MAX_CONNECTIONS", "NVTE_BWD_LAYERNORM_SM_MARGIN"):  # restored after the test
        monkeypatch.setenv(key, "")
        monkeypatch.delenv(key)
    monkeypatch.setenv("NVTE_FWD_LAYERNORM_SM_MARGIN", "7")  # exported by the user: kept
    cfg = compose_config(["cluster=slurm_h100", "parallel=tp2", "parallel.tp_comm_overlap=true",
                          "cluster.require_fast_path=false", "stage.name=unknown", f"run_dir={tmp_path}/r"])
    with pytest.raises(Exception, match="unknown"):
        run(cfg)  # validated and environment set, then refused at the stage table, before any process group
    assert os.environ["CUDA_DEVICE_MAX_CONNECTIONS"] == "1" and os.environ["NVTE_FWD_LAYERNORM_SM_MARGIN"] == "7"
    assert os.environ["NVTE_BWD_LAYERNORM_SM_MARGIN"] == "20"


def test_without_an_image_the_tasks_run_the_hosts_python(tmp_path):
    out = render("pretrain_7b.sh", tmp_path, env={"CONTAINER_IMAGE": "none", "PYTHON": "/opt/venv/bin/python"})
    assert not any(a.startswith("--container") for a in out.srun_args)
    assert out.srun_args[out.srun_args.index("/opt/venv/bin/python") + 1:][:2] == ["-m", "megatron_qwen.train"]


@pytest.mark.parametrize("status, requeued, exit_status", [(RESUMABLE_EXIT_CODE, True, 0), (1, False, 1)])
def test_only_the_resumable_exit_code_requeues(tmp_path, status, requeued, exit_status):
    out = render("pretrain_72b.sh", tmp_path, env={"CONTAINER_IMAGE": "none"}, srun_status=status)
    assert (out.requeued, out.status) == (requeued, exit_status)


@pytest.mark.parametrize("name", [t for t in MODEL_TEMPLATES if t != "pretrain_tiny.sh"])
def test_stop_signal_lead_time_covers_a_step_and_a_checkpoint_write(name):
    template = parse_template(name)
    cfg = validate(compose_config(template.overrides), template.world_size)
    lead = int(template.options["--signal"].partition("@")[2])
    assert lead >= signal_lead_seconds(cfg), f"{name}: --signal=USR1@{lead} < {signal_lead_seconds(cfg)}"


def test_dockerfile_keeps_the_images_torch_and_installs_our_requirements():
    text = DOCKERFILE.read_text()
    base = re.search(r"^ARG BASE_IMAGE=(\S+)$", text, flags=re.M).group(1)
    assert re.search(r"^FROM \$\{BASE_IMAGE\}$", text, flags=re.M)
    registry, _, tag = base.partition(":")
    assert registry == "nvcr.io/nvidia/pytorch" and re.fullmatch(r"\d\d\.\d\d-py3", tag)
    # From 25.03 on, NGC's torch (2.7.0a0+) satisfies torch>=2.6; 25.01/02's 2.6.0a0 sorts below 2.6.
    assert tag >= "25.03"
    assert "COPY requirements.txt" in text
    install = next(line for line in text.splitlines() if "pip install" in line and not line.lstrip().startswith("#"))
    assert "-c /opt/megatron_qwen/image-constraints.txt" in install and "requirements-no-torch.txt" in install
    assert "pip list --format=freeze > /opt/megatron_qwen/image-constraints.txt" in text
    assert 'test "$torch_before" = "$torch_after"' in text  # the build fails if torch changed
    assert "torch>=" in (REPO / "requirements.txt").read_text()


def _fake_fast_path(root):
    """Importable stand-ins for what FAST_PATH probes: TE 2.8 (userbuffers, FusedAdam) and apex's wgrad kernel."""
    files = {"transformer_engine/__init__.py": "__version__ = '2.8.0'\n",
             "transformer_engine/pytorch/__init__.py": "",
             "transformer_engine/pytorch/module/__init__.py": "",
             "transformer_engine/pytorch/module/base.py": "def initialize_ub(*args, **kwargs): pass\n",
             "transformer_engine/pytorch/optimizers/__init__.py": "class FusedAdam: pass\n",
             "fused_weight_gradient_mlp_cuda.py": ""}
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)


def test_the_image_build_fails_unless_the_fast_path_imports(tmp_path):
    """The Dockerfile's smoke test is the trainer's own probe, run alone as the build runs it."""
    text = DOCKERFILE.read_text()
    source, target = re.search(r"^COPY (\S+features\.py) (\S+)$", text, flags=re.M).groups()
    assert source == "megatron_qwen/config/features.py"
    command = re.search(rf"python {re.escape(target)} ([^;]*);", text).group(1).split()
    assert command == ["--require-fast-path"]
    # The stub driver is on the library path of that command only, not in the image's ENV.
    assert 'ln -s /usr/local/cuda/lib64/stubs/libcuda.so "$stub_dir/libcuda.so.1"' in text
    assert "LD_LIBRARY_PATH" not in "".join(line for line in text.splitlines() if line.startswith("ENV"))

    alone = tmp_path / "opt" / "features.py"  # copied without the package, run without site-packages
    alone.parent.mkdir()
    alone.write_text((REPO / source).read_text())
    fakes = tmp_path / "fakes"

    def build(with_fast_path: bool):
        if with_fast_path:
            _fake_fast_path(fakes)
        env = {**os.environ, "PYTHONPATH": str(fakes)}
        return subprocess.run([sys.executable, "-S", str(alone), *command], capture_output=True, text=True, env=env)

    bare = build(with_fast_path=False)  # this machine: neither TE nor apex
    assert bare.returncode == 1
    error = [line for line in bare.stderr.splitlines() if line.startswith("error:")]
    assert error == ["error: the fast path does not import in this image (missing: te, apex_wgrad, te_userbuffers, "
                     "fused_adam), so cluster=slurm_h100 runs would refuse to start; build on an NGC PyTorch image "
                     "(25.03 or newer), which ships Transformer Engine and apex"]
    ready = build(with_fast_path=True)
    assert ready.returncode == 0, ready.stderr
    assert {"te: True", "te_version: 2.8.0", "te_userbuffers: True", "apex_wgrad: True",
            "fused_adam: True"} <= set(ready.stdout.splitlines())


@pytest.mark.parametrize("status, failures_before, requeued", [
    (1, 0, True), (137, 2, True), (1, 3, False),  # a crash / node loss: while the budget lasts
    (2, 0, False),  # bad input: requeueing would fail the same way
])
def test_a_failed_job_requeues_up_to_cluster_max_requeues_across_attempts(tmp_path, status, failures_before, requeued):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "max_requeues").write_text("3\n")  # what the trainer writes for cluster=slurm_h100
    (run_dir / "failure_requeues").write_text(f"{failures_before}\n")
    out = render("pretrain_7b.sh", tmp_path, env={"CONTAINER_IMAGE": "none", "RUN_DIR": str(run_dir)},
                 srun_status=status)
    assert out.requeued is requeued and out.status == (0 if requeued else status)
    assert int((run_dir / "failure_requeues").read_text()) == failures_before + int(requeued)
    assert compose_config(["cluster=slurm_h100"]).cluster.max_requeues == 3


def test_without_the_trainers_limit_a_failed_job_is_not_requeued(tmp_path):
    out = render("pretrain_7b.sh", tmp_path, env={"CONTAINER_IMAGE": "none", "RUN_DIR": str(tmp_path / "none")},
                 srun_status=1)
    assert not out.requeued and out.status == 1


# What slurm/env.sh exports for every trainer task (the rendezvous, cores, NCCL and allocator settings).
SHARED_ENV = ("MASTER_ADDR", "MASTER_PORT", "SRUN_CPUS_PER_TASK", "OMP_NUM_THREADS", "TORCH_NCCL_AVOID_RECORD_STREAMS",
              "TORCH_NCCL_HIGH_PRIORITY", "PYTORCH_CUDA_ALLOC_CONF", "NCCL_NVLS_ENABLE", "NCCL_GRAPH_REGISTER",
              "NCCL_DEBUG", "NCCL_IB_HCA")


def test_the_h100_sweep_launcher_gets_the_templates_environment_and_container(tmp_path):
    image, site = tmp_path / "megatron_qwen.sqsh", tmp_path / "site.sh"
    image.write_bytes(b"")
    site.write_text("export NCCL_IB_HCA=mlx5_0\n")
    env = {"CONTAINER_IMAGE": str(image), "CONTAINER_MOUNTS": "/data:/data", "MEGATRON_QWEN_SITE_ENV": str(site)}
    sbatch = render("train.sbatch", tmp_path / "sbatch", nodes=4, env=env)
    sweep = render_sweep_launcher("slurm_h100", tmp_path / "sweep", nodes=4, env=env)
    assert sweep.srun_env["SLURM_NTASKS"] == sbatch.srun_env["SLURM_NTASKS"] == "32"
    assert {k: sweep.srun_env.get(k) for k in SHARED_ENV} == {k: sbatch.srun_env.get(k) for k in SHARED_ENV}
    assert sweep.srun_env["NCCL_IB_HCA"] == "mlx5_0" and sweep.srun_env["SRUN_CPUS_PER_TASK"] == "12"
    # What the layout implies is the trainer's (config/environment.py), in neither batch script.
    implied = set(layout_env(validate(compose_config(["experiment=pretrain_72b"]), 64), 64))
    assert not implied & (set(sweep.srun_env) | set(sbatch.srun_env))

    def launch_flags(args):  # srun's fail-fast and pyxis flags
        return [a for a in args if a.startswith(("--container-", "--wait=", "--kill-on-bad-exit="))]

    assert launch_flags(sweep.srun_args) == launch_flags(sbatch.srun_args) and len(launch_flags(sweep.srun_args)) == 5
    assert "--wait=120" in sweep.srun_args
    assert f"--container-image={image}" in sweep.srun_args
    # In the container the image's python runs submitit's task (the submitting host's is not there).
    assert sweep.srun_args[-5:-1] == ["python", "-u", "-m", "submitit.core._submit"]
    assert sbatch.srun_args[sbatch.srun_args.index("python") + 1] == "-m"


def test_the_sweep_launcher_asks_for_usr2_early_enough_on_whole_h100_nodes(tmp_path):
    text = sweep_launcher_script("slurm_h100", ["hydra.launcher.nodes=4", f"run_dir={tmp_path}/r"], tmp_path)
    options = dict(re.findall(r"^#SBATCH --([\w-]+)=?(\S*)", text, flags=re.M))
    assert options["signal"] == "USR2@600" and "exclusive" in options
    assert (options["nodes"], options["ntasks-per-node"], options["gpus-per-node"]) == ("4", "8", "8")
    for name in (t for t in MODEL_TEMPLATES if t != "pretrain_tiny.sh"):  # a step and a save of each preset
        template = parse_template(name)
        assert 600 >= signal_lead_seconds(validate(compose_config(template.overrides), template.world_size)), name


@pytest.mark.parametrize("launcher", ["slurm_h100", "slurm_local"])
@pytest.mark.parametrize("status, requeued, exit_status", [(RESUMABLE_EXIT_CODE, True, 0), (1, False, 1)])
def test_a_sweep_point_that_saved_after_a_stop_signal_is_requeued(tmp_path, launcher, status, requeued, exit_status):
    out = render_sweep_launcher(launcher, tmp_path, nodes=1, env={"CONTAINER_IMAGE": "none"}, srun_status=status)
    assert (out.requeued, out.status) == (requeued, exit_status)
    assert not any(a.startswith("--container") for a in out.srun_args)
    assert out.srun_args[-5] == sys.executable  # no image: the submitting host's python, as submitit wrote it
