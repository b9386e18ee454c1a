"""stage=grpo pieces without a process group: config rules, prompt datasets (order, resume, bad
input), per-completion seeds, rollout micro-batches, throughput records, the dry run; and one
CLI run with a bad prompt file (one line, nothing left behind)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from megatron_qwen.config.schema import DataBlendEntry
from megatron_qwen.config.store import compose_config
from megatron_qwen.config.validate import ConfigError, validate
from megatron_qwen.data.prompt_dataset import PromptDataset, PromptPool, build_prompt_datasets
from megatron_qwen.data.records import InputError
from megatron_qwen.generation.engine import GenerationError, Rollouts
from megatron_qwen.generation.sampler import uniform_draws
from megatron_qwen.training.stages.grpo.rewards import RewardError, RewardSpec
from megatron_qwen.training.stages.grpo.rollout import Prompts, micro_batches, reward_fields, row_seed, trained_tokens
from tests.data_support import write_jsonl
from tests.helpers import QUIET, REPO, run_cli, train_command

GRPO = ["stage=grpo"]
BAD_CONFIGS = [
    (["stage=grpo", "data=mock"], 1, "stage=grpo needs prompt data, but data.type=mock"),
    (["data=grpo_example"], 1, "data.type=prompts holds prompts to sample from, which stage=pretrain cannot train"),
    ([*GRPO, "parallel.pp=2"], 2, "runs at parallel.pp=1 and parallel.cp=1 (any tp, dp, sp); got pp=2, cp=1: set"),
    ([*GRPO, "parallel.cp=2"], 2, "got pp=1, cp=2: set parallel.pp=1 parallel.cp=1"),
    ([*GRPO, "parallel.tp=2", "parallel.sp=true", "parallel.tp_comm_overlap=true"], 2,
     "parallel.tp_comm_overlap=true: stage=grpo packs its rollouts into rows whose length varies"),
    ([*GRPO, "stage.group_size=1"], 1, "stage.group_size=1 must be >= 2"),
    ([*GRPO, "stage.temperature=0"], 1, "stage.temperature=0.0 must be > 0: a group sampled greedily"),
    ([*GRPO, "stage.top_p=0"], 1, "stage.top_p=0.0 must be in (0, 1]"),
    ([*GRPO, "stage.max_new_tokens=128"], 1, "stage.max_new_tokens=128 must be in [1, train.seq_length=128)"),
    ([*GRPO, "stage.clip_low=1"], 1, "stage.clip_low=1.0 must be in [0, 1)"),
    ([*GRPO, "stage.beta=-1"], 1, "stage.beta=-1.0 (KL coefficient) must be >= 0"),
    ([*GRPO, "stage.advantage_std=bessel"], 1, "stage.advantage_std='bessel' must be one of ('unbiased',"),
    ([*GRPO, "stage.aggregation=mean"], 1, "stage.aggregation='mean' must be one of ('token', 'sequence')"),
    ([*GRPO, "stage.rewards=[]"], 1, "stage.rewards is empty"),
    ([*GRPO, "stage.reference=precompute"], 1, "set stage.reference=model (or stage.beta=0: no KL term)"),
    ([*GRPO, "stage.max_tokens_per_microbatch=1000"], 1, "stage.max_tokens_per_microbatch=1000 must be >= "
     "stage.group_size*train.seq_length=8*128=1024 (a micro-batch holds whole groups"),
    (["stage.max_tokens_per_microbatch=4096"], 1, "stage.max_tokens_per_microbatch=4096 is a setting of stage=grpo, "
     "which stage=pretrain does not read: remove the override"),
    ([*GRPO, "stage.updates_per_rollout=2"], 1, "train.stop_check_interval=5 must be a multiple of "
     "stage.updates_per_rollout=2 (a checkpoint must fall between rollouts); use 4"),
    ([*GRPO, "stage.updates_per_rollout=3", "train.train_iters=10", "train.stop_check_interval=3"], 1,
     "train.train_iters=10 must be a multiple of stage.updates_per_rollout=3"),
]


@pytest.mark.parametrize("overrides,world,message", BAD_CONFIGS, ids=[m[:40] for _, _, m in BAD_CONFIGS])
def test_bad_grpo_config_is_named_before_anything_starts(overrides, world, message):
    with pytest.raises(ConfigError) as err:
        validate(compose_config(overrides), world_size=world)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_the_example_config_validates_and_an_unknown_reward_is_one_line():
    from megatron_qwen.training.stages import build_stage

    cfg = validate(compose_config(GRPO), world_size=2)
    assert (cfg.stage.name, cfg.data.type, cfg.stage.reference, cfg.stage.beta) == ("grpo", "prompts", "model", 0.04)
    assert build_stage(cfg).rows_per_sample == 8  # a prompt is a group of 8 rows
    with pytest.raises(RewardError, match="unknown reward 'bleu'; choose from exact_match, format, math_verify"):
        build_stage(compose_config([*GRPO, "stage.rewards=[{name: bleu}]"]))


def _prompt_cfg(tmp_path, lines, **train):
    path = write_jsonl(tmp_path / "p.jsonl", lines) if isinstance(lines, list) else lines
    cfg = compose_config([*GRPO, f"data.blend=[{{path: '{path}', weight: 1.0}}]", "data.split='75,25,0'"])
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **train))


def _record(a: int, b: int) -> dict:
    return {"prompt": [{"role": "user", "content": f"What is {a} + {b}?"}], "answer": str(a + b)}


def test_prompt_datasets_split_and_order_by_seed(tmp_path):
    cfg = _prompt_cfg(tmp_path, [_record(i, i) for i in range(8)])
    train, valid = build_prompt_datasets(cfg, train_samples=20, valid_samples=5)
    assert (len(train.pool), len(valid.pool), len(train), len(valid)) == (6, 2, 20, 5)
    epochs = [[train.example(k) for k in range(e * 6, e * 6 + 6)] for e in range(3)]
    assert all(sorted(e) == list(range(6)) for e in epochs) and epochs[0] != epochs[1]  # a permutation per epoch
    again, _ = build_prompt_datasets(cfg, 20, 5)
    assert [again.example(k) for k in (13, 2, 17)] == [train.example(k) for k in (13, 2, 17)]  # resumable
    other, _ = build_prompt_datasets(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seed=1)), 20, 5)
    assert [other.example(k) for k in range(6)] != epochs[0]
    assert [valid.example(k) for k in range(5)] == [0, 1, 0, 1, 0]  # validation: file order, repeated
    sample = train[7]
    ids = train.pool.prompt_ids[train.example(7)]
    assert sample["prompt_ids"][: len(ids)].tolist() == ids and int(sample["prompt_length"]) == len(ids)
    assert (int(sample["position"]), train.pool.answers[int(sample["example"])]) == (7, str(2 * train.example(7)))


def test_bad_prompt_input_is_one_line(tmp_path):
    good = [_record(1, 2)] * 4
    cases = [
        (good[:2] + ["{not json"], "p.jsonl:3: "),
        (good + [{"prompt": [{"role": "user", "content": "x"}]}], "p.jsonl:5: no key 'answer'"),
        ([_record(1, 2) | {"prompt": [{"role": "user", "content": "long " * 200}]}] + good, "prompt 0 ('long long"),
    ]
    for lines, message in cases:
        with pytest.raises(InputError) as err:
            build_prompt_datasets(_prompt_cfg(tmp_path, lines), 8, 0)
        assert message in str(err.value) and "\n" not in str(err.value), str(err.value)
    assert "stage.max_new_tokens=64 prompts may have at most 65 (train.seq_length=128)" in str(err.value)
    cfg = _prompt_cfg(tmp_path, good)
    weighted = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, blend=[DataBlendEntry(cfg.data.blend[0]
                                                                                                 .path, 2.0)]))
    with pytest.raises(InputError, match=r"data.blend\[0\].weight=2.0: prompt files are concatenated"):
        build_prompt_datasets(weighted, 8, 0)
    no_train = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, split="0,100,0"))
    with pytest.raises(InputError, match="leaves no training prompt"):
        build_prompt_datasets(no_train, 8, 0)


def test_bad_prompt_file_stops_the_cli_with_one_line_and_leaves_no_run_dir(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [_record(1, 2), {"prompt": "What is 1 + 1?", "answer": 2}])
    run_dir = tmp_path / "run"
    proc = run_cli(train_command([*GRPO, *QUIET, "model.num_layers=1", f"data.blend=[{{path: '{path}', weight: 1}}]",
                                  f"run_dir={run_dir}"]), check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    error = proc.stderr.strip().splitlines()[-1]
    assert error.startswith(f"error: {path}:2: 'prompt': ") and error.endswith("(skip_bad_lines)"), error
    assert not run_dir.exists()


def test_row_seeds_and_per_row_draws_do_not_depend_on_the_batch():
    seeds = {row_seed(1234, split, k, j) for split in (0, 1) for k in range(50) for j in range(8)}
    assert len(seeds) == 800 and row_seed(1234, 0, 3, 2) == row_seed(1234, 0, 3, 2)
    together, alone = uniform_draws(0, [11, 22, 33], 3), uniform_draws(0, [22], 1)
    for _ in range(5):  # row 1 of the batch draws what it draws alone
        assert together()[1] == alone()[0]
    shared = uniform_draws(5, None, 3)  # without per-row seeds: one stream, as before
    generator = torch.Generator().manual_seed(5)
    assert torch.equal(shared(), torch.rand(3, generator=generator))


class _Chars:
    """A tokenizer stand-in: id i is chr(ord('0') + i), 10 is the stop token."""

    @staticmethod
    def decode(ids):
        return "".join("|" if i == 10 else chr(48 + i) for i in ids)


def test_rollout_micro_batches_hold_groups_of_rows():
    rollouts = Rollouts(prompt_ids=[[1, 2, 3]] * 2 + [[4, 5]] * 2, completion_ids=[[5, 10], [7, 10], [9], [9, 10]],
                        stopped=[True, True, False, True])
    prompts = Prompts(ids=[[1, 2, 3], [4, 5]], answers=["5", "9"], positions=[0, 1])
    specs = [RewardSpec("exact_match", 1.0), RewardSpec("format", 0.5)]
    fields = reward_fields(rollouts, prompts, 2, _Chars(), specs)
    assert fields["reward"].tolist() == [1.0, 0.0, 1.0, 1.0] and fields["accuracy"].tolist() == [1.0, 0.0, 1.0, 1.0]
    assert set(fields) == {"reward", "accuracy", "rewards/exact_match", "rewards/format"}
    [batch] = micro_batches(rollouts, fields, group=2, groups=range(2), prompts_per_batch=2, max_tokens=None,
                            seq_length=6)
    assert batch["tokens"].tolist() == [[1, 2, 3, 5, 1, 2, 3, 7, 4, 5, 4, 5, 9]]  # packed: no padding
    assert batch["labels"].tolist() == [[2, 3, 5, 10, 2, 3, 7, 10, 5, 9, 5, 9, 10]]
    assert batch["loss_mask"].tolist() == [[0, 0, 1, 1, 0, 0, 1, 1, 0, 1, 0, 1, 1]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 0, 1, 2]]
    assert batch["cu_seqlens"].tolist() == [[0, 4, 8, 10, 13]] and batch["reward"].shape == (2, 2)
    assert batch["lengths"].tolist() == [[4, 4], [2, 3]]  # prompt + completion - 1 per row
    assert trained_tokens([batch]) == 4 + 4 + 2 + 3
    # A token budget: whole groups, next-fit in order (group 0 has 8 tokens, group 1 has 5).
    assert [b["reward"].shape[0] for b in micro_batches(rollouts, fields, 2, range(2), 2, 8, 6)] == [1, 1]
    assert [b["reward"].shape[0] for b in micro_batches(rollouts, fields, 2, range(2), 1, 13, 6)] == [2]
    with pytest.raises(GenerationError, match="5 tokens does not fit seq_length=3"):
        micro_batches(rollouts, fields, 2, range(2), 2, None, 3)
    # Sequence parallel at TP 3: 13 tokens padded to 15 inside the last sequence, without loss.
    [padded] = micro_batches(rollouts, fields, 2, range(2), 2, None, 6, multiple=3, pad_id=0)
    assert padded["tokens"][0, 13:].tolist() == [0, 0] and padded["loss_mask"][0, 13:].tolist() == [0, 0]
    assert padded["cu_seqlens"].tolist() == [[0, 4, 8, 10, 15]] and padded["position_ids"][0, 10:].tolist() == [0, 1,
                                                                                                              2, 3, 4]
    assert trained_tokens([padded]) == 13 and padded["tokens"].numel() == 15  # the filler is not trained on


def test_throughput_records_count_every_data_parallel_rank():
    from megatron_qwen.training.stages import build_stage

    stage = build_stage(validate(compose_config(GRPO), world_size=2))  # dp=2
    record = stage.train_record({"loss": 0.5, "rollout_tokens": 100.0, "rollout_seconds": 0.5, "train_tokens": 300.0,
                                 "train_seconds": 0.0})
    assert record == {"loss": 0.5, "rollout_tokens_per_s": 400.0}  # no training pass measured: no rate


def test_the_trainers_tokens_per_s_counts_packed_rollout_tokens_not_rows_of_seq_length():
    from megatron_qwen.training.stages import build_stage

    grpo = build_stage(validate(compose_config([*GRPO, "train.seq_length=128", "stage.group_size=4",
                                                "train.micro_batch_size=2", "train.global_batch_size=8"]), 2))
    # A window of 3 steps, 2 applied, whose steps trained on 150 tokens per DP rank on average (dp=2).
    metrics = {"loss": 0.5, "step_tokens": 150.0}
    assert grpo.window_tokens(metrics, steps=3, applied=2) == 150.0 * 2 * 2  # not 3 * 8 * 4 * 128 = 12,288
    assert "step_tokens" not in grpo.train_record(metrics) and grpo.window_tokens(None, 1, 0) == 0.0
    # SFT and DPO rows have a fixed shape [seq_length]: their padding is computed, and counted.
    sft, dpo = (build_stage(validate(compose_config([f"stage={name}", "train.seq_length=128",
                                                     "train.global_batch_size=8"]), 1)) for name in ("sft", "dpo"))
    assert (sft.window_tokens(None, 3, 2), dpo.window_tokens(None, 3, 2)) == (3 * 8 * 128, 3 * 8 * 2 * 128)


def test_dry_run_counts_a_group_of_rows_per_prompt_and_the_reference_copy():
    from megatron_qwen.config.memory import estimate_memory

    grpo, half, no_kl = (estimate_memory(validate(compose_config(["experiment=grpo_7b", *o]), 8)).peak for o in (
        [], ["stage.group_size=4"], ["stage.beta=0"]))
    assert grpo.logits == 2 * half.logits  # a prompt is group_size rows
    assert grpo.weights_and_optimizer - no_kl.weights_and_optimizer == 2 * grpo.params  # the bf16 reference


def test_example_prompt_set_has_a_held_out_split():
    cfg = compose_config([*GRPO, f"data.blend=[{{path: '{REPO / 'data/grpo/example.jsonl'}', weight: 1.0}}]"])
    train, valid = build_prompt_datasets(cfg, 56, 8)
    assert (len(train.pool), len(valid.pool)) == (56, 8)
    assert isinstance(train, PromptDataset) and isinstance(valid.pool, PromptPool)
