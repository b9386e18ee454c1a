"""Transformer Engine is used when it imports, not when its package is merely found (bug: a
broken TE install chose the TE spec and failed deep inside the model build)."""

import importlib.util
import sys
import types

import pytest

from megatron_qwen.config import ConfigError, validate
from megatron_qwen.config import features as installed
from megatron_qwen.config.features import Features, probe
from megatron_qwen.config.store import compose_config
from megatron_qwen.config.translate import to_transformer_config
from megatron_qwen.model.layers import SDPAttention
from megatron_qwen.model.spec import build_block_spec
from tests.data_support import destroy_single_rank, init_single_rank, tiny_config


@pytest.fixture(scope="module")
def single_rank():
    init_single_rank(tiny_config())
    yield
    destroy_single_rank()


@pytest.fixture
def fresh_detect():
    installed.detect.cache_clear()
    yield
    installed.detect.cache_clear()


@pytest.fixture
def broken_te(tmp_path, monkeypatch, fresh_detect):
    """A transformer_engine package that is found but fails to import (missing CUDA library)."""
    pkg = tmp_path / "transformer_engine"
    (pkg / "pytorch").mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise OSError('libcudart.so.13: cannot open shared object file')\n")
    (pkg / "pytorch" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in [m for m in sys.modules if m.startswith("transformer_engine")]:
        monkeypatch.delitem(sys.modules, name)
    assert importlib.util.find_spec("transformer_engine") is not None  # found ...
    return pkg


@pytest.fixture
def working_te(monkeypatch, fresh_detect):
    te = types.ModuleType("transformer_engine")
    te.__version__ = "2.8.0+abc"
    te.__path__ = []
    te.pytorch = types.ModuleType("transformer_engine.pytorch")
    monkeypatch.setitem(sys.modules, "transformer_engine", te)
    monkeypatch.setitem(sys.modules, "transformer_engine.pytorch", te.pytorch)


def _fp8_config():
    return compose_config(["precision=fp8_delayed"])


def test_broken_te_install_is_not_used(broken_te, single_rank):
    assert probe().te is False  # ... but does not import
    assert installed.detect().te is False
    # validate() and the spec builder give the same answer: no TE.
    with pytest.raises(ConfigError, match="needs Transformer Engine"):
        validate(_fp8_config(), 1)
    config = to_transformer_config(compose_config([]))
    layer = build_block_spec(config).layer_specs[0]
    assert layer.submodules.self_attention.submodules.core_attention is SDPAttention


def test_working_te_is_detected_with_its_version(working_te):
    found = probe()
    assert found.te and found.te_version == "2.8.0+abc"
    assert found.te_at_least("2.8") and not found.te_at_least("2.10")
    assert installed.detect().te
    validate(_fp8_config(), 1)  # accepted: TE imports


def test_translation_follows_the_given_features():
    cfg = validate(compose_config(["model=qwen2_moe_tiny"]), 1)
    assert to_transformer_config(cfg, Features(te=True)).moe_grouped_gemm is True
    assert to_transformer_config(cfg, Features(te=False)).moe_grouped_gemm is False
    with pytest.raises(ConfigError, match="needs Transformer Engine"):
        validate(_fp8_config(), 1, Features(te=False))
    validate(_fp8_config(), 1, Features(te=True, te_version="2.8"))


def test_not_installed_is_silent(caplog, fresh_detect):
    assert probe() == Features()  # neither TE nor apex on this machine
    assert not caplog.records
