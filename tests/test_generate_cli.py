"""tools/generate.py on a converted checkpoint (TP2) and on a training run's checkpoints (TP1):
the printed completion is transformers' greedy completion of the chat-templated prompt."""

from __future__ import annotations

import sys

import pytest
import torch
import transformers

from megatron_qwen.convert.hf_to_mcore import hf_to_mcore
from megatron_qwen.convert.mcore_to_hf import mcore_to_hf
from megatron_qwen.convert.staging import ConvertError
from megatron_qwen.data.tokenizer import load_tokenizer
from megatron_qwen.evaluation.run import task_record
from megatron_qwen.generation import GenerationError, SamplingParams
from megatron_qwen.generation.checkpoint import generate_from_checkpoint
from tests.convert_support import make_hf_model
from tests.data_support import hf_qwen2_5_tokenizer
from tests.eval_support import hf_lm_eval
from tests.helpers import QUIET, REPO, read_metrics, run_cli, train_command

PROMPT = "What is 2 + 3?"
NEW_TOKENS = 12
STOP_IDS = list(SamplingParams().stop_token_ids)


def _generate(*args: str, check: bool = True):
    return run_cli([sys.executable, str(REPO / "tools" / "generate.py"), *args], check=check)


def _hf_completion(hf_dir) -> str:
    """transformers' greedy completion of PROMPT as a user turn, without its stop token; the prompt is
    rendered by the chat template of the directory's own tokenizer (what a server would use)."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(hf_dir))
    ids = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=True,
                                        add_generation_prompt=True)["input_ids"]
    model = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32)
    out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=STOP_IDS, pad_token_id=0)
    completion = out[0, len(ids):].tolist()
    return load_tokenizer().decode(completion[:-1] if completion[-1] in STOP_IDS else completion)


@pytest.mark.slow
@pytest.mark.distributed
def test_generate_cli_on_converted_and_trained_checkpoints(tmp_path):
    # The real Qwen2.5 vocabulary, so the bundled tokenizer's ids fit; everything else tiny.
    hf = make_hf_model(tmp_path / "hf", layers=1, hidden=32, ffn=64, heads=4, kv=2, vocab=151936, tied=True)
    hf_qwen2_5_tokenizer(tmp_path / "qwen2_5").save_pretrained(hf)  # generate.py uses the checkpoint's copy
    ckpt = tmp_path / "ckpt"
    hf_to_mcore(hf, ckpt, progress=False)
    converted = _generate("--ckpt", str(ckpt), "--prompt", PROMPT, "--max-new-tokens", str(NEW_TOKENS), "--tp", "2")
    assert converted.stdout == _hf_completion(hf) + "\n"
    assert "tokens/s" in converted.stderr

    run_dir = tmp_path / "run"  # one training step moves the weights away from the converted ones
    run_cli(train_command(["--config-dir", str(ckpt / "conf"), "model=converted", f"checkpoint.load={ckpt}",
                           "data=mock", "train.train_iters=1", "train.seq_length=16", "train.micro_batch_size=2",
                           "train.global_batch_size=2", "train.eval_interval=0", "optim.lr=0.05", *QUIET,
                           "train.eval_tasks=[arith_choice,prose_ppl]", "train.eval_tasks_interval=1",
                           "train.eval_tasks_limit=3", f"run_dir={run_dir}"]))
    trained = _generate("--ckpt", str(run_dir / "checkpoints"), "--prompt", PROMPT,
                        "--max-new-tokens", str(NEW_TOKENS))
    mcore_to_hf(run_dir / "checkpoints", tmp_path / "exported", progress=False)
    assert trained.stdout == _hf_completion(tmp_path / "exported") + "\n" != converted.stdout
    # train.eval_tasks ran lm-eval on the trained weights through our adapter: lm-eval's own hf
    # model on the export agrees (max_length: the training sequence length).
    [record] = read_metrics(run_dir, "eval.jsonl")
    reference = hf_lm_eval(tmp_path / "exported", ["arith_choice", "prose_ppl"], limit=3, max_length=16)
    assert {k: v for k, v in record.items() if k != "step"} == pytest.approx(task_record(reference), rel=1e-5)
    assert {"tasks/arith_choice/acc", "tasks/prose_ppl/bits_per_byte"} <= record.keys() and record["step"] == 1


def test_generate_cli_bad_input_is_one_line_and_exit_2(tmp_path):
    for args, message in [(["--ckpt", str(tmp_path), "--max-new-tokens", "0"], "max_new_tokens=0 must be >= 1"),
                          (["--ckpt", str(tmp_path / "missing")], "does not exist")]:
        proc = _generate(*args, "--prompt", "hi", check=False)
        assert proc.returncode == 2, proc.stderr[-2000:]
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], proc.stderr


def test_bad_layout_and_prompts_are_refused_before_loading(tmp_path):
    hf = make_hf_model(tmp_path / "hf", layers=1, heads=6, kv=2)
    hf_to_mcore(hf, tmp_path / "ckpt", progress=False)
    with pytest.raises(ConvertError, match="cannot split the model at tp=4 .* num_query_groups=2 is not divisible"):
        generate_from_checkpoint(tmp_path / "ckpt", [[1, 2]], [SamplingParams()], tp=4)
    with pytest.raises(GenerationError, match="prompt token id 151643 does not fit the model's vocab_size=256"):
        generate_from_checkpoint(tmp_path / "ckpt", [[1, 151643]], [SamplingParams()])
    with pytest.raises(GenerationError, match="every prompt needs at least one token"):
        generate_from_checkpoint(tmp_path / "ckpt", [[1], []], [SamplingParams()])
