"""Evaluation without a process group: per-domain validation loss (val_loss/<name>: names from the
blend, sums from the same tokens as the blended loss; the default job's eval.jsonl is checked by
tests/test_default_job.py), the train.eval_tasks settings and lm-eval's results as records.
The adapter itself is checked against lm-eval's hf model by tests/test_evaluate_cli.py."""

import re

import pytest
import torch

from megatron_qwen.config import ConfigError, validate
from megatron_qwen.config.schema import DataBlendEntry
from megatron_qwen.config.store import compose_config
from megatron_qwen.data.batches import collate
from megatron_qwen.data.datasets import valid_domains
from megatron_qwen.training.stages.lm import LanguageModelStage, lm_loss


def test_domain_names_come_from_name_or_the_path_stem():
    assert [DataBlendEntry(path=p).domain for p in ("code", "data/wiki_text_document", "/x/chat.jsonl.gz")] == \
        ["code", "wiki_text_document", "chat"]
    assert DataBlendEntry(path="data/a_text_document", name="web").domain == "web"
    assert valid_domains(compose_config([])) == ["code", "prose"]  # the default job: data=embedded
    cfg = compose_config(["+data.valid_blend=[{path: prose, weight: 1, name: held_out}]"])
    assert valid_domains(cfg) == ["held_out"]
    assert valid_domains(compose_config(["data=mock"])) == []


def test_duplicate_domain_names_are_refused():
    cfg = compose_config(["data.blend=[{path: code, weight: 1}, {path: prose, weight: 1, name: code}]"])
    with pytest.raises(ConfigError, match="data.blend names domain.s. code more than once; give the entries "
                                          "distinct name: fields"):
        validate(cfg, 1)


def test_domain_losses_partition_the_blended_loss():
    # Three rows [b=3, s=4] from domains 1, 0, 1 of a three-domain blend; domain 2 is absent.
    torch.manual_seed(0)
    token_loss, mask = torch.rand(3, 4), torch.tensor([[1, 1, 0, 1], [1, 1, 1, 1], [0, 1, 1, 1]])
    ids = torch.tensor([1, 0, 1], dtype=torch.int16)
    names = ["code", "prose", "math"]
    for packed in (False, True):  # a packed micro-batch is one row [1, b*s]
        shape = (1, 12) if packed else (3, 4)
        loss, count, metrics = lm_loss(mask.reshape(shape), token_loss.reshape(shape), names, ids)
        assert torch.equal(metrics["loss/prose"], torch.stack([(token_loss * mask)[[0, 2]].sum(), torch.tensor(6.)]))
        assert torch.equal(metrics["loss/code"], torch.stack([token_loss[1].sum(), torch.tensor(4.)]))
        assert metrics["loss/math"].tolist() == [0.0, 0.0]  # reported by every micro-batch (same DP names)
        parts = sum(metrics[f"loss/{n}"] for n in names)
        assert torch.allclose(parts, metrics["loss"]) and int(count) == 10
    assert list(lm_loss(mask, token_loss)[2]) == ["loss"]  # training reports the blended loss only


def test_validation_batches_carry_the_blend_index_and_records_name_it():
    batch = collate([{"tokens": torch.zeros(2), "dataset_id": torch.tensor(0).numpy().astype("int16")[()]},
                     {"tokens": torch.zeros(2), "dataset_id": torch.tensor(1).numpy().astype("int16")[()]}])
    assert batch["dataset_id"].tolist() == [0, 1]
    stage = LanguageModelStage(compose_config([]))
    stage.domain_samples = [3, 1]
    assert stage.before_step([], 1, training=True) == [] and stage._domains == ()
    stage.before_step([], 1, training=False)
    assert stage._domains == ["code", "prose"]
    record = stage.eval_record({"loss": 2.0, "loss/code": 1.0, "loss/prose": 5.0})
    assert record["val_loss/prose"] == 5.0 and record["val_ppl/code"] == pytest.approx(2.718281828)
    assert record["val_samples/code"] == 3 and record["val_loss"] == 2.0


@pytest.mark.parametrize("overrides,expected", [
    (["train.eval_tasks_interval=5"], "train.eval_tasks_interval=5 is set but train.eval_tasks is empty"),
    (["train.eval_tasks_limit=2"], "train.eval_tasks_limit=2 is set but train.eval_tasks is empty"),
    (["train.eval_tasks=[arith_choice]"], "train.eval_tasks_interval=None must be >= 1"),
    (["train.eval_tasks=[arith_choice]", "train.eval_tasks_interval=5", "train.eval_tasks_limit=0"],
     "train.eval_tasks_limit=0 must be >= 1"),
    (["train.eval_tasks=[arith_choice]", "train.eval_tasks_interval=5", "parallel.tp=2", "parallel.sp=true"],
     "set parallel.vpp=null, parallel.cp=1 and parallel.sp=false (got vpp=None, cp=1, sp=true)"),
])
def test_eval_tasks_settings_are_validated(overrides, expected):
    with pytest.raises(ConfigError, match=re.escape(expected)):
        validate(compose_config(overrides), 2 if "parallel.tp=2" in overrides else 1)
    validate(compose_config(["train.eval_tasks=[arith_choice]", "train.eval_tasks_interval=5"]), 1)


def test_lm_eval_results_become_task_records():
    from megatron_qwen.evaluation.run import task_record

    results = {"results": {"arith_gen": {"alias": "arith_gen", "exact_match,first-integer": 0.25,
                                         "exact_match_stderr,first-integer": "N/A", "sample_len": 4},
                           "arith_choice": {"acc,none": 0.5, "acc_stderr,none": 0.1, "acc_norm,none": 0.75}}}
    assert task_record(results) == {"tasks/arith_gen/exact_match,first-integer": 0.25,
                                    "tasks/arith_choice/acc": 0.5, "tasks/arith_choice/acc_norm": 0.75}
