"""Hydra entry point: ``python -m megatron_qwen.train [overrides]`` (also under torchrun/srun)."""

from __future__ import annotations

import logging
import os
import shutil
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from megatron_qwen.cli import one_line, run_hydra
from megatron_qwen.config import Config, ConfigError, validate
from megatron_qwen.config.environment import format_env, layout_env
from megatron_qwen.config.validate import check_fast_path
from megatron_qwen.config.plan import format_plan
from megatron_qwen.config.search import format_search
from megatron_qwen.config.store import CONF_DIR, register
from megatron_qwen.errors import UserError

register()


def resolve_config(dcfg: DictConfig) -> Config:
    """Composed DictConfig -> typed Config; a multirun job gets its own run directory."""
    try:
        cfg: Config = OmegaConf.to_object(dcfg)
    except OmegaConfBaseException as err:  # e.g. an interpolation to a missing key
        raise ConfigError(one_line(err)) from err
    hydra_cfg = HydraConfig.get() if HydraConfig.initialized() else None
    if hydra_cfg is not None and hydra_cfg.mode == RunMode.MULTIRUN:
        cfg.run_dir = hydra_cfg.runtime.output_dir
    return cfg


def dry_run(cfg: Config, world_size: int, report: bool) -> None:
    """Validates for ``world_size`` and prints layout, parameters and memory per GPU; with
    ``train.dry_run_search`` lists the layouts that fit at ``world_size`` instead.

    Builds no model and starts no process group, so it runs on a login node.
    """
    if cfg.train.dry_run_search:
        if report:
            print(format_search(cfg, world_size))
        return
    try:
        cfg = validate(cfg, world_size)
    except ConfigError as err:
        raise ConfigError(f"{err} (dry run for world size {world_size}; set "
                          "train.dry_run_world_size=<nodes x GPUs per node> to check another)") from err
    if report:
        from megatron_qwen.config.translate import format_switches

        print(format_plan(cfg))
        print(format_switches(cfg))
        print(format_env(layout_env(cfg, world_size)))


def run(cfg: Config) -> bool:
    """Validates for this process's world size, then trains (or prints the dry-run plan).

    Returns True when a stop signal interrupted training before its last iteration: a
    checkpoint was saved and running the same command again resumes from it.
    """
    from megatron_qwen.platform.launch import detect_process_env

    penv = detect_process_env()
    from megatron_qwen.training.stages import build_stage

    if cfg.train.dry_run or cfg.train.dry_run_search:
        dry_run(cfg, cfg.train.dry_run_world_size or penv.world_size, penv.rank == 0)
        build_stage(cfg)
        return False
    cfg = validate(cfg, penv.world_size)
    check_fast_path(cfg)  # before anything is written: a slow-path run leaves no run directory
    # Before CUDA, NCCL and Transformer Engine read them; what the user or the site exported wins.
    for key, value in layout_env(cfg, penv.world_size).items():
        os.environ.setdefault(key, value)
    if penv.rank == 0:
        from megatron_qwen.config.translate import format_switches

        logging.getLogger(__name__).info(format_switches(cfg))
    stage = build_stage(cfg)  # before anything is written: an unknown stage leaves no run directory
    from megatron_qwen.training.resilience import signals, watchdog

    # NOTE: before anything slow (imports, model build, checkpoint load take minutes at 72B): a
    # stop signal arriving then must be recorded, not kill the job without a requeue.
    signals.install(cfg.train.exit_signal)
    from megatron_qwen.platform import orphans

    orphans.install()  # checkpoint writers and data workers die with this process
    if penv.launcher == "torchrun":
        # NOTE: torchrun starts each rank in a session of its own, so killing the agent (or its
        # process group) would leave the ranks running, blocked on their dead peers.
        orphans.die_with_parent(os.getppid())
    from megatron_qwen.platform import nccl_transport
    from megatron_qwen.platform.launch import init_process_group
    from megatron_qwen.platform.parallel import destroy, init_model_parallel, init_tp_comm_overlap
    from megatron_qwen.training.loop import Trainer

    Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
    config_yaml = OmegaConf.to_yaml(OmegaConf.structured(cfg))
    nccl_transport.prepare_log(cfg, penv)  # before NCCL reads its environment
    init_process_group(penv, cfg.cluster.backend, cfg.cluster.pg_timeout_minutes)
    try:
        nccl_transport.check(cfg, penv)  # before anything is written: refused, the run leaves nothing
        init_model_parallel(cfg)
        init_tp_comm_overlap(cfg)
        if penv.rank == 0:
            (Path(cfg.run_dir) / "config.yaml").write_text(config_yaml)
            # Read by slurm/train.sbatch when the job fails: how often it may requeue itself.
            (Path(cfg.run_dir) / "max_requeues").write_text(f"{cfg.cluster.max_requeues}\n")
        with watchdog.start(cfg, penv.rank) as dog:
            trainer = Trainer(cfg, config_yaml, stage, dog)
            trainer.train()
    finally:
        destroy()
    return signals.stopped_by_signal() and trainer.state.iteration < trainer.plan.train_iters


# What a run writes before it trains (nccl/: NCCL's init log of a multi-node job, platform/nccl_transport.py).
STARTUP_FILES = {".hydra", "train.log", "config.yaml", "max_requeues", "nccl"}


def _remove_if_only_hydra(run_dir: Path) -> None:
    """Bad input leaves nothing behind: a run directory holding only what Hydra and the start
    of this invocation created (its log, .hydra/, the resolved config.yaml, the requeue limit,
    NCCL's init log) is removed again."""
    if run_dir.is_dir() and {p.name for p in run_dir.iterdir()} <= STARTUP_FILES:
        shutil.rmtree(run_dir, ignore_errors=True)  # every rank may try; one wins


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
def main(dcfg: DictConfig) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("megatron").setLevel(logging.WARNING)  # per-parameter INFO dumps drown the metrics
    try:
        interrupted = run(resolve_config(dcfg))
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        _remove_if_only_hydra(Path(HydraConfig.get().runtime.output_dir))
        sys.exit(2)
    if interrupted:
        from megatron_qwen.training.resilience.signals import RESUMABLE_EXIT_CODE

        sys.exit(RESUMABLE_EXIT_CODE)  # the SLURM templates requeue the job on this code


if __name__ == "__main__":
    sys.exit(run_hydra(main))
