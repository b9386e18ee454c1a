"""Configuration: schema, Hydra registration, validation, translation to megatron-core."""

from megatron_qwen.config.schema import Config
from megatron_qwen.config.validate import ConfigError, validate

__all__ = ["Config", "ConfigError", "validate"]
