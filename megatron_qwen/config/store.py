"""Registers the schema with Hydra's ConfigStore so every YAML is type-checked."""

from __future__ import annotations

from hydra.core.config_store import ConfigStore

from megatron_qwen.config.schema import Config


def register() -> None:
    """Makes ``base_config`` (the typed root) available to ``conf/config.yaml``'s defaults."""
    ConfigStore.instance().store(name="base_config", node=Config)
