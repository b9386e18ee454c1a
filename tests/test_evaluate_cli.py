"""tools/evaluate.py (lm-eval through our MegatronLM adapter) at TP2 (spawned ranks) and PP2 (under
torchrun) against lm-eval's own ``hf`` model on the exported checkpoint: the same per-request
log-likelihoods (1e-4, fp32), rolling log-likelihoods, greedy generations and metrics on the
shipped offline tasks (multiple choice, generative math, perplexity)."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest

from megatron_qwen.convert.hf_to_mcore import hf_to_mcore
from megatron_qwen.convert.mcore_to_hf import mcore_to_hf
from tests.convert_support import make_hf_model
from tests.eval_support import hf_lm_eval
from tests.helpers import REPO, free_port, run_cli

TASKS = ["arith_choice", "arith_gen", "prose_ppl"]
LIMIT = 4


def _evaluate(*args: str, torchrun: int = 0, check: bool = True):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(torchrun),
                "--master-port", str(free_port())] if torchrun else [sys.executable]
    return run_cli([*launcher, str(REPO / "tools" / "evaluate.py"), *args], check=check,
                   env={"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"})


def _responses(results) -> dict:
    """(task, doc_id) -> the raw responses: [log-likelihood, is_greedy] pairs, a rolling sum, or a text."""
    out = {}
    for task, samples in results["samples"].items():
        for sample in samples:
            out[task, sample["doc_id"]] = [list(r[0]) if isinstance(r[0], (list, tuple)) else r[0]
                                           for r in sample["resps"]]
    return out


def _assert_same(ours, reference):
    got, want = _responses(ours), _responses(reference)
    assert got.keys() == want.keys() and len(got) == LIMIT * len(TASKS)
    for key, responses in want.items():
        for mine, theirs in zip(got[key], responses, strict=True):
            if isinstance(theirs, str):  # generate_until: the greedy text up to the stop string
                assert mine == theirs, key
            elif isinstance(theirs, list):  # loglikelihood: (sum of log-probs, is_greedy)
                assert mine[0] == pytest.approx(theirs[0], abs=1e-4) and bool(mine[1]) == bool(theirs[1]), key
            else:  # loglikelihood_rolling
                assert mine == pytest.approx(theirs, abs=1e-4), key
    for task in TASKS:
        for metric, value in reference["results"][task].items():  # acc, exact_match, perplexities, ...
            expected = value if isinstance(value, str) else pytest.approx(value, rel=1e-5)
            assert ours["results"][task][metric] == expected, (task, metric)


@pytest.mark.slow
@pytest.mark.distributed
def test_lm_eval_at_tp2_and_pp2_matches_lm_evals_hf_model(tmp_path):
    hf = make_hf_model(tmp_path / "hf", layers=2, hidden=32, ffn=64, heads=4, kv=2, vocab=151936, tied=True)
    ckpt = tmp_path / "ckpt"
    hf_to_mcore(hf, ckpt, progress=False)
    exported = tmp_path / "exported"
    mcore_to_hf(ckpt, exported, progress=False)
    # NOTE: the exported generation_config carries Qwen's max_new_tokens=2048, which transformers
    # lets override the max_length lm-eval passes (context + max_gen_toks); drop it so the hf model
    # generates the task's max_gen_toks, as our adapter does.
    config = json.loads((exported / "generation_config.json").read_text())
    config.pop("max_new_tokens", None)
    (exported / "generation_config.json").write_text(json.dumps(config))
    reference = hf_lm_eval(exported, TASKS, LIMIT, log_samples=True)

    common = ["--ckpt", str(ckpt), "--tasks", ",".join(TASKS), "--limit", str(LIMIT), "--bootstrap-iters", "0",
              "--log-samples", "--batch-size", "3"]  # 3: batches mix lengths and split a request's choices
    tp2 = _evaluate(*common, "--tp", "2", "--output", str(tmp_path / "tp2.json"))
    assert "arith_choice" in tp2.stdout and "exact_match" in tp2.stdout  # lm-eval's table
    _assert_same(json.loads((tmp_path / "tp2.json").read_text()), reference)
    _evaluate(*common, "--pp", "2", "--output", str(tmp_path / "pp2.json"), torchrun=2)
    _assert_same(json.loads((tmp_path / "pp2.json").read_text()), reference)


def test_evaluate_cli_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    # tools/evaluate.py in this process (by path: "evaluate" is also Hugging Face's package)
    spec = importlib.util.spec_from_file_location("evaluate_cli", REPO / "tools" / "evaluate.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    for args, message in [(["--tasks", "no_such_task"], "unknown lm-eval task(s) no_such_task; use a shipped task "
                                                        "(arith_choice, arith_gen, prose_ppl)"),
                          (["--tasks", "arith_choice", "--tp", "0"], "--tp 0 must be >= 1"),
                          (["--tasks", "arith_choice", "--output", str(tmp_path / "no" / "r.json")], "does not exist"),
                          (["--tasks", "arith_choice", "--ckpt", str(tmp_path / "missing")], "does not exist")]:
        assert cli.main(["--ckpt", str(tmp_path), *args]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
