"""The model config written next to (and read back from) a Megatron checkpoint.

The trainer writes ``run_config.yaml`` (the resolved config) into every checkpoint; a
converted checkpoint gets one too, so that ``mcore-to-hf`` and ``verify`` read every
checkpoint the same way. It also gets ``conf/model/converted.yaml``, a model group file
for the trainer, so that nobody has to guess ``model=``::

    python -m megatron_qwen.train --config-dir CKPT/conf model=converted checkpoint.load=CKPT

A converted checkpoint also keeps the source model's tokenizer files, unchanged, in
``tokenizer/``; :func:`checkpoint_tokenizer` tells exports and generation which tokenizer a
checkpoint's model was converted or trained with.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from megatron_qwen.config.schema import Config, ModelConfig
from megatron_qwen.config.validate import model_problems
from megatron_qwen.convert.staging import ConvertError
from megatron_qwen.training.checkpointing.checkpoint import CONFIG_FILE
from megatron_qwen.training.checkpointing.ckpt_dirs import find_latest

MODEL_GROUP_FILE = Path("conf") / "model" / "converted.yaml"
TOKENIZER_DIR = "tokenizer"  # a converted checkpoint's copy of its HF source's tokenizer files


def write_run_files(ckpt_dir: Path, model: ModelConfig) -> None:
    """Writes ``run_config.yaml`` and the ``model=converted`` group file into ``ckpt_dir``."""
    (Path(ckpt_dir) / CONFIG_FILE).write_text(OmegaConf.to_yaml(OmegaConf.structured(Config(model=model))))
    group_file = Path(ckpt_dir) / MODEL_GROUP_FILE
    group_file.parent.mkdir(parents=True)
    header = "# Written by tools/convert.py hf-to-mcore.\n"
    group_file.write_text(header + OmegaConf.to_yaml(OmegaConf.structured(model)))


def resolve_checkpoint(path: Path) -> Path:
    """An iteration directory (or a converted checkpoint) from it or from a run's checkpoints/."""
    path = Path(path)
    if not path.is_dir():
        raise ConvertError(f"checkpoint {path} does not exist")
    path = find_latest(path) or path
    if not (path / "metadata.json").is_file():
        raise ConvertError(f"{path} is not a megatron distributed checkpoint (no metadata.json); give an "
                           "iter_XXXXXXX directory, a run's checkpoints/ directory or a converted checkpoint")
    return path


def read_model_config(ckpt_dir: Path) -> ModelConfig:
    """The model config saved with a checkpoint (its ``run_config.yaml``)."""
    path = Path(ckpt_dir) / CONFIG_FILE
    if not path.is_file():
        raise ConvertError(f"{ckpt_dir} has no {CONFIG_FILE}, so its model is unknown; checkpoints written "
                           "by the trainer or by hf-to-mcore have one")
    try:
        model = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(path)["model"]))
    except (OmegaConfBaseException, yaml.YAMLError, KeyError, TypeError, ValueError) as err:  # ValueError: bad bytes
        raise ConvertError(f"{path} has no valid model section: {' '.join(str(err).split())}") from err
    problems = model_problems(model)
    if problems:
        raise ConvertError(f"{path} describes a model that cannot be built: {'; '.join(problems)}")
    return model


def checkpoint_tokenizer(ckpt_dir: Path) -> Optional[Path]:
    """The tokenizer directory of a checkpoint's model; None for the default Qwen2.5 tokenizer.

    A converted checkpoint's own ``tokenizer/`` (its HF source's files), else ``data.tokenizer``
    of the ``run_config.yaml`` the trainer saved with it.
    """
    kept = Path(ckpt_dir) / TOKENIZER_DIR
    if kept.is_dir():
        return kept
    path = Path(ckpt_dir) / CONFIG_FILE
    if not path.is_file():
        return None
    try:
        configured = OmegaConf.select(OmegaConf.load(path), "data.tokenizer")
    except (OmegaConfBaseException, yaml.YAMLError, TypeError, ValueError) as err:
        raise ConvertError(f"{path} is not a readable run config: {' '.join(str(err).split())}") from err
    if configured is None:
        return None
    if not Path(configured).is_dir():
        raise ConvertError(f"{path} says the model was trained with the tokenizer {configured}, which does not "
                           f"exist; pass --tokenizer DIR (the tokenizer that run used)")
    return Path(configured)
