"""HF <-> Megatron conversion: bit-exact round trips, the exported directory, and bad input.

In-process (one gloo rank per conversion); multi-rank parity is in test_convert_parity.py.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import save_file

from megatron_qwen.convert.hf_config import model_config_from_hf, read_config_json
from megatron_qwen.convert.hf_to_mcore import hf_to_mcore
from megatron_qwen.convert.mapping import Rule, to_hf, to_mcore
from megatron_qwen.convert.mcore_to_hf import mcore_to_hf
from megatron_qwen.convert.hf_files import TOKENIZER_FILES
from megatron_qwen.convert.run_files import MODEL_GROUP_FILE, TOKENIZER_DIR, checkpoint_tokenizer, read_model_config
from megatron_qwen.convert.staging import ConvertError
from megatron_qwen.convert.verify import Layout, verify
from megatron_qwen.data.tokenizer import QWEN2_5_CONFIG, bundled_bpe_dir, qwen2_5_tokenizer_json
from tests.convert_support import make_hf_model, make_hf_moe_model, read_tensors
from tests.data_support import hf_qwen2_5_tokenizer
from tests.helpers import REPO, run_cli

CONFIG_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "vocab_size", "rms_norm_eps", "max_position_embeddings",
                 "tie_word_embeddings")


def _round_trip(tmp_path: Path, **model) -> tuple:
    src = make_hf_model(tmp_path / "hf", **model)
    hf_to_mcore(src, tmp_path / "ckpt", progress=False)
    mcore_to_hf(tmp_path / "ckpt", tmp_path / "out", progress=False)
    return src, tmp_path / "ckpt", tmp_path / "out"


@pytest.mark.parametrize("model", [
    dict(tied=True, heads=4, kv=2, hidden=64, ffn=128),  # 0.5B-like: tied, no lm_head.weight
    dict(tied=False, heads=6, kv=1),  # 7B-like untied; one KV head; 6 heads (not a power of two)
    dict(tied=False, heads=6, kv=2, layers=3),
    dict(tied=True, heads=4, kv=1, dtype=torch.bfloat16),  # bf16 stays bf16
], ids=["tied_kv2", "untied_kv1_heads6", "untied_kv2_heads6", "tied_bf16"])
def test_round_trip_is_bit_exact(tmp_path, model):
    src, ckpt, out = _round_trip(tmp_path, **model)
    before, after = read_tensors(src), read_tensors(out)
    assert sorted(before) == sorted(after)
    for name, tensor in before.items():
        assert after[name].dtype == tensor.dtype, name
        assert torch.equal(after[name], tensor), name
    assert read_model_config(ckpt) == model_config_from_hf(read_config_json(src), read_model_config(ckpt).name)


@pytest.mark.parametrize("sparse_step", [1, 2], ids=["all_moe", "moe_every_2nd"])
def test_moe_round_trip_is_bit_exact(tmp_path, sparse_step):
    src = make_hf_moe_model(tmp_path / "hf", layers=2, sparse_step=sparse_step)
    hf_to_mcore(src, tmp_path / "ckpt", progress=False)
    mcore_to_hf(tmp_path / "ckpt", tmp_path / "out", progress=False)
    before, after = read_tensors(src), read_tensors(tmp_path / "out")
    assert sorted(before) == sorted(after) and "model.layers.1.mlp.shared_expert_gate.weight" in after
    assert all(torch.equal(after[name], tensor) for name, tensor in before.items())
    ours, theirs = (transformers.AutoConfig.from_pretrained(d) for d in (tmp_path / "out", src))
    for field in ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "shared_expert_intermediate_size",
                  "decoder_sparse_step", "norm_topk_prob", "router_aux_loss_coef", *CONFIG_FIELDS):
        assert getattr(ours, field) == getattr(theirs, field), field
    model, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert type(model).__name__ == "Qwen2MoeForCausalLM"
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set()


def test_export_is_a_complete_hf_directory(tmp_path):
    src, ckpt, out = _round_trip(tmp_path, tied=False, heads=6, kv=2)
    raw = json.loads((out / "config.json").read_text())
    assert raw["architectures"] == ["Qwen2ForCausalLM"]
    assert raw["torch_dtype"] == "float32" and raw["rope_theta"] == 1e6
    ours, theirs = transformers.AutoConfig.from_pretrained(out), transformers.AutoConfig.from_pretrained(src)
    for field in CONFIG_FIELDS:
        assert getattr(ours, field) == getattr(theirs, field), field
    assert ours.rope_parameters["rope_theta"] == theirs.rope_parameters["rope_theta"]
    assert json.loads((out / "generation_config.json").read_text())["do_sample"] is False
    # No tokenizer in the source, none named in a run config: the default Qwen2.5 tokenizer's files.
    assert (out / "tokenizer.json").read_bytes() == qwen2_5_tokenizer_json().encode("utf-8")
    assert (out / "tokenizer_config.json").read_bytes() == QWEN2_5_CONFIG.read_bytes()
    model, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set() and not info["mismatched_keys"]


def test_export_dtype_shards_and_tokenizer(tmp_path):
    src = make_hf_model(tmp_path / "hf", tied=True, heads=4, kv=2)
    hf_to_mcore(src, tmp_path / "ckpt", progress=False)
    tokenizer = tmp_path / "tok"
    tokenizer.mkdir()
    (tokenizer / "tokenizer.json").write_text("{}")
    mcore_to_hf(tmp_path / "ckpt", tmp_path / "out", dtype=torch.bfloat16, shard_size=20_000, tokenizer=tokenizer,
                progress=False)
    out = tmp_path / "out"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    tensors = read_tensors(out)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    for name, tensor in read_tensors(src).items():
        assert torch.equal(tensors[name], tensor.to(torch.bfloat16)), name
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert (out / "tokenizer.json").read_text() == "{}" and not (out / "vocab.json").exists()
    _, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set()


def _tokenizer_files(directory: Path) -> dict:
    return {name: (directory / name).read_bytes() for name in TOKENIZER_FILES if (directory / name).is_file()}


def test_real_shape_round_trip_keeps_the_source_tokenizer_bit_for_bit(tmp_path):
    # Qwen2.5's 151,936-row vocabulary (tiny otherwise) and a tokenizer directory as transformers
    # saves one (its own bytes, chat_template.jinja included) plus the release's vocab.json/merges.txt.
    src = make_hf_model(tmp_path / "hf", layers=1, hidden=32, ffn=64, heads=4, kv=2, vocab=151936, tied=True)
    hf_qwen2_5_tokenizer(tmp_path / "qwen2_5").save_pretrained(src)
    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(bundled_bpe_dir() / name, src / name)
    source = _tokenizer_files(src)
    assert "chat_template.jinja" in source and source["tokenizer.json"] != qwen2_5_tokenizer_json().encode()
    hf_to_mcore(src, tmp_path / "ckpt", progress=False)
    assert _tokenizer_files(tmp_path / "ckpt" / TOKENIZER_DIR) == source
    assert checkpoint_tokenizer(tmp_path / "ckpt") == tmp_path / "ckpt" / TOKENIZER_DIR
    mcore_to_hf(tmp_path / "ckpt", tmp_path / "out", progress=False)
    assert _tokenizer_files(tmp_path / "out") == source
    generation = json.loads((tmp_path / "out" / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [151645, 151643]  # <|im_end|>, <|endoftext|>
    assert len(transformers.AutoTokenizer.from_pretrained(tmp_path / "out")) == 151665


def test_checkpoint_tokenizer_is_the_runs_data_tokenizer(tmp_path):
    ckpt = tmp_path / "iter_0000001"
    ckpt.mkdir()
    assert checkpoint_tokenizer(ckpt) is None  # no run config: the default Qwen2.5 tokenizer
    (ckpt / "run_config.yaml").write_text("data:\n  tokenizer: null\n")
    assert checkpoint_tokenizer(ckpt) is None
    (ckpt / "run_config.yaml").write_text(f"data:\n  tokenizer: {tmp_path / 'mine'}\n")
    with pytest.raises(ConvertError, match="trained with the tokenizer .*mine, which does not exist; pass --tokenizer"):
        checkpoint_tokenizer(ckpt)
    (tmp_path / "mine").mkdir()
    assert checkpoint_tokenizer(ckpt) == tmp_path / "mine"


def test_qkv_is_fused_per_gqa_group():
    # 4 query heads, 2 KV heads, head_dim 1: row values name the head they come from.
    model = model_config_from_hf({"architectures": ["Qwen2ForCausalLM"], "hidden_size": 4, "num_attention_heads": 4,
                                  "num_key_value_heads": 2, "intermediate_size": 8, "num_hidden_layers": 1,
                                  "vocab_size": 8}, "t")
    q, k, v = torch.tensor([[0.], [1.], [2.], [3.]]), torch.tensor([[10.], [11.]]), torch.tensor([[20.], [21.]])
    rule = Rule("qkv", ("q", "k", "v"), "qkv", 0)
    fused = to_mcore(rule, [q, k, v], model)
    # Megatron: per group g: its heads/groups query heads, then its key, then its value.
    assert fused.flatten().tolist() == [0., 1., 10., 20., 2., 3., 11., 21.]
    assert all(torch.equal(a, b) for a, b in zip(to_hf(rule, fused, model), (q, k, v)))


# ----------------------------------------------------------------------------- bad input


def _no_trace_of(out: Path) -> None:
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.tmp-*"))


def _edit_json(path: Path, **changes) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def _break_hf(case: str, hf: Path) -> None:
    if case == "no_config":
        (hf / "config.json").unlink()
    elif case == "no_weights":
        (hf / "model.safetensors").unlink()
    elif case == "index_names_missing_shard":
        (hf / "model.safetensors").rename(hf / "model-00001-of-00002.safetensors")
        (hf / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
            "model.embed_tokens.weight": "model-00001-of-00002.safetensors",
            "model.norm.weight": "model-00002-of-00002.safetensors"}}))
    elif case == "llama":
        _edit_json(hf / "config.json", architectures=["LlamaForCausalLM"], model_type="llama")
    elif case == "shape_vs_config":
        _edit_json(hf / "config.json", intermediate_size=64)
    elif case == "moe_dense_layer_list":
        make_hf_moe_model(hf / "moe")
        _edit_json(hf / "moe" / "config.json", mlp_only_layers=[1])
        for path in (hf / "moe").iterdir():
            path.replace(hf / path.name)
    elif case == "missing_tensor":
        tensors = read_tensors(hf)
        del tensors["model.layers.1.self_attn.k_proj.bias"]
        save_file(tensors, str(hf / "model.safetensors"), metadata={"format": "pt"})


HF_CASES = {"no_config": "no config.json", "no_weights": "neither model.safetensors",
            "index_names_missing_shard": "do not exist", "llama": "not supported",
            "shape_vs_config": "does not match its config.json", "missing_tensor": "k_proj.bias: missing",
            "moe_dense_layer_list": r"mlp_only_layers=\[1\] is not supported"}


@pytest.mark.parametrize("case", sorted(HF_CASES))
def test_hf_to_mcore_rejects_bad_input(tmp_path, case):
    hf = make_hf_model(tmp_path / "hf")
    _break_hf(case, hf)
    with pytest.raises(ConvertError, match=HF_CASES[case]):
        hf_to_mcore(hf, tmp_path / "ckpt", progress=False)
    _no_trace_of(tmp_path / "ckpt")


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> tuple:
    root = tmp_path_factory.mktemp("converted")
    hf = make_hf_model(root / "hf")
    hf_to_mcore(hf, root / "ckpt", progress=False)
    return hf, root / "ckpt"


def _broken_checkpoint(case: str, ckpt: Path, tmp_path: Path) -> Path:
    if case == "missing":
        return tmp_path / "nowhere"
    copy = tmp_path / "ckpt"
    shutil.copytree(ckpt, copy)
    if case == "not_a_checkpoint":
        (copy / "metadata.json").unlink()
    elif case == "no_run_config":
        (copy / "run_config.yaml").unlink()
    elif case == "other_model":
        text = (copy / "run_config.yaml").read_text()
        (copy / "run_config.yaml").write_text(text.replace("ffn_hidden_size: 96", "ffn_hidden_size: 64"))
    return copy


CKPT_CASES = {"missing": "does not exist", "not_a_checkpoint": "no metadata.json",
              "no_run_config": "model is unknown", "other_model": "does not match the model"}


@pytest.mark.parametrize("case", sorted(CKPT_CASES))
def test_mcore_to_hf_rejects_bad_input(tmp_path, converted, case):
    ckpt = _broken_checkpoint(case, converted[1], tmp_path)
    with pytest.raises(ConvertError, match=CKPT_CASES[case]):
        mcore_to_hf(ckpt, tmp_path / "out", progress=False)
    _no_trace_of(tmp_path / "out")


def test_outputs_are_never_overwritten(tmp_path, converted):
    hf, ckpt = converted
    for out, convert in ((tmp_path / "a", lambda o: hf_to_mcore(hf, o, progress=False)),
                         (tmp_path / "b", lambda o: mcore_to_hf(ckpt, o, progress=False))):
        out.mkdir()
        (out / "keep.txt").write_text("mine")
        with pytest.raises(ConvertError, match="not empty"):
            convert(out)
        assert [p.name for p in out.iterdir()] == ["keep.txt"]
    with pytest.raises(ConvertError, match="tokenizer directory"):
        mcore_to_hf(ckpt, tmp_path / "c", tokenizer=tmp_path / "no_tokenizer", progress=False)
    _no_trace_of(tmp_path / "c")


def test_verify_rejects_a_different_model_and_bad_layouts(tmp_path, converted):
    _, ckpt = converted
    other = make_hf_model(tmp_path / "other", layers=3)
    with pytest.raises(ConvertError, match="different model: num_layers"):
        verify(other, ckpt, [Layout()])
    with pytest.raises(ConvertError, match="num_attention_heads=6 is not divisible by 4"):
        verify(converted[0], ckpt, [Layout(tp=4)])


def test_converted_checkpoint_names_its_model(converted):
    _, ckpt = converted
    group = (ckpt / MODEL_GROUP_FILE).read_text()
    assert "num_layers: 2" in group and "hidden_size: 48" in group and "vocab_size: 256" in group


def test_cli_reports_bad_input_in_one_line(tmp_path):
    hf = make_hf_model(tmp_path / "hf")
    _break_hf("llama", hf)
    proc = run_cli([sys.executable, str(REPO / "tools" / "convert.py"), "hf-to-mcore", "--hf", str(hf),
                    "--out", str(tmp_path / "ckpt")], check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: {hf}/config.json: architecture ['LlamaForCausalLM'] is not supported; "
        "expected one of ['Qwen2ForCausalLM', 'Qwen2MoeForCausalLM']"]
    _no_trace_of(tmp_path / "ckpt")
