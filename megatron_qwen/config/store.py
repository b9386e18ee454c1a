"""Registers the schema with Hydra's ConfigStore and composes configs outside ``@hydra.main``."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from megatron_qwen.config.schema import Config

CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")


def register() -> None:
    """Makes ``base_config`` (the typed root) available to ``conf/config.yaml``'s defaults."""
    ConfigStore.instance().store(name="base_config", node=Config)


def compose_config(overrides: Sequence[str] = ()) -> Config:
    """The typed config that ``python -m megatron_qwen.train <overrides>`` would use.

    For tools and tests; it does not change the working directory or Hydra's global state
    beyond this call.
    """
    register()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        dcfg = compose(config_name="config", overrides=list(overrides))
    return OmegaConf.to_object(dcfg)
