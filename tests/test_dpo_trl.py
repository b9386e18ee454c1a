"""Our DPO step equals trl's: loss, rewards/*, log-probs and the gradient norm (fp32, 1e-5 relative).

trl 1.16.0 (a test-only dependency, requirements-test.txt) computes the loss of the same batch
with ``DPOTrainer.compute_loss`` on the Hugging Face models our checkpoints were converted from:
the policy and, as the reference, a second random model (``stage.reference_load``), so that the
log-ratios and rewards are far from zero. Our side is the trainer itself, in this process, one
step on one rank; step 1's metrics are computed before the first update.
"""

from __future__ import annotations

import dataclasses
import math
import signal
from pathlib import Path

import pytest
import torch
import trl  # noqa: F401  (a test dependency: pip install -c constraints.txt -r requirements-test.txt)

from megatron_qwen.config.store import compose_config
from megatron_qwen.config.validate import validate
from megatron_qwen.convert.run_files import read_model_config
from tests.data_support import destroy_single_rank, init_single_rank
from tests.dpo_support import convert_start, dpo_overrides, make_task
from tests.helpers import QUIET, read_metrics

PAIRS = 8  # the global batch: one micro-batch of 4 pairs, then another
VARIANTS = {  # our stage.* overrides -> trl's DPOConfig arguments
    "sigmoid": (["stage.reference=precompute"], {"loss_type": ["sigmoid"]}),
    "ipo": (["stage.loss=ipo", "stage.beta=0.5", "stage.reference=model"], {"loss_type": ["ipo"], "beta": 0.5}),
    "sigmoid_sft": (["stage.sft_weight=0.7", "stage.reference=model"],
                    {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.7]}),
}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("trl")
    task = make_task(root, pairs=64)
    policy, reference = convert_start(root, seed=0), convert_start(root, seed=1)
    base = compose_config([*dpo_overrides(task, root / "cache"), *QUIET, "train.train_iters=1", "optim.warmup_iters=0",
                           f"train.global_batch_size={PAIRS}", "train.micro_batch_size=4", "train.eval_interval=0",
                           f"checkpoint.load={policy}_mcore", f"stage.reference_load={reference}_mcore"])
    base = dataclasses.replace(base, model=read_model_config(Path(f"{policy}_mcore")))
    init_single_rank(base)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}  # the trainer installs its own
    yield root, task, base, policy, reference
    for s, handler in handlers.items():
        signal.signal(s, handler)
    destroy_single_rank()


def _ours(base, root: Path, name: str, overrides):
    from megatron_qwen.training.loop import Trainer
    from megatron_qwen.training.stages import build_stage

    stage_overrides = compose_config([f"{o}" for o in overrides if o.startswith("stage.")] + ["stage=dpo"]).stage
    cfg = validate(dataclasses.replace(base, stage=dataclasses.replace(
        stage_overrides, reference_load=base.stage.reference_load), run_dir=str(root / name)), 1)
    (root / name).mkdir()  # what megatron_qwen.train does before it builds the trainer
    trainer = Trainer(cfg, "", build_stage(cfg))
    trainer.train()
    [record] = read_metrics(root / name)
    return record, [trainer.train_ds[i] for i in range(PAIRS)]


def _trl_example(sample) -> dict:
    """trl's tokenized example of one of our samples: the prompt and each side's response tokens."""
    sides = []
    for side in (0, 1):
        mask = sample["loss_mask"][side]
        first, last = mask.nonzero()[0].item(), mask.nonzero()[-1].item()
        ids = torch.cat([sample["tokens"][side, :1], sample["labels"][side, :last + 1]])  # t[0], then labels
        sides.append((ids[:first + 1].tolist(), ids[first + 1:].tolist()))
    assert sides[0][0] == sides[1][0], "chosen and rejected share the prompt tokens"
    return {"prompt_ids": sides[0][0], "chosen_ids": sides[0][1], "rejected_ids": sides[1][1]}


def _trl(root: Path, task: dict, policy: Path, reference: Path, samples, dpo_args: dict) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
    from trl import DPOConfig, DPOTrainer
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(task["tokenizer"] / "tokenizer.json"),
                                        eos_token="<|im_end|>", pad_token="<|endoftext|>")
    args = DPOConfig(output_dir=str(root / "trl"), report_to=[], use_cpu=True, per_device_train_batch_size=PAIRS,
                     max_length=None, bf16=False, **dpo_args)  # trl defaults to bf16 autocast
    model = AutoModelForCausalLM.from_pretrained(policy, dtype=torch.float32)
    trainer = DPOTrainer(model=model, ref_model=AutoModelForCausalLM.from_pretrained(reference, dtype=torch.float32),
                         args=args, processing_class=tokenizer,
                         train_dataset=Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}]))
    inputs = DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id)([_trl_example(s) for s in samples])
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, inputs)
    loss.backward()
    grad_norm = math.sqrt(sum(p.grad.double().pow(2).sum().item() for p in trainer.model.parameters()))
    logged = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    return {"loss": loss.item(), "grad_norm": grad_norm, "rewards/chosen": logged["rewards/chosen"],
            "rewards/rejected": logged["rewards/rejected"], "rewards/accuracy": logged["rewards/accuracies"],
            "rewards/margin": logged["rewards/margins"], "logps/chosen": logged["logps/chosen"],
            "logps/rejected": logged["logps/rejected"]}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_step_equals_trl(env, name):
    root, task, base, policy, reference = env
    overrides, dpo_args = VARIANTS[name]
    ours, samples = _ours(base, root, name, overrides)
    want = _trl(root, task, policy, reference, samples, dpo_args)
    assert 0 < want["rewards/accuracy"] < 1 and abs(want["rewards/margin"]) > 0.1  # a batch far from the reference
    for key, value in want.items():
        assert ours[key] == pytest.approx(value, rel=1e-5, abs=1e-6), f"{name} {key}: ours {ours[key]} trl {value}"


def test_label_smoothing_is_the_expected_loss_under_flipped_labels():
    # Conservative DPO (trl < 1.0's sigmoid with label_smoothing; trl 1.16 dropped it from sigmoid):
    # each label is flipped with probability eps, so the loss is the expectation over the flip.
    from megatron_qwen.config.schema import StageConfig
    from megatron_qwen.training.stages.dpo.loss import pair_losses

    ratios, lengths = torch.tensor([[0.3, -1.2], [-2.0, 0.5], [0.0, 0.0]]), torch.ones(3, 2)
    plain = StageConfig(name="dpo", beta=0.2)
    smoothed = StageConfig(name="dpo", beta=0.2, label_smoothing=0.1)
    expected = 0.9 * pair_losses(ratios, lengths, plain) + 0.1 * pair_losses(ratios.flip(-1), lengths, plain)
    assert torch.allclose(pair_losses(ratios, lengths, smoothed), expected)


def test_reference_model_log_probs_equal_transformers_per_token_and_summed(env):
    # The pieces GRPO reuses: a frozen ReferenceModel (here from stage.reference_load) and the
    # forward-only log-prob pass, per token and per sequence.
    from transformers import AutoModelForCausalLM

    from megatron_qwen.data.batches import collate
    from megatron_qwen.data.datasets import build_datasets
    from megatron_qwen.training.stages.logprobs import SequenceLogpsPass, sequence_logps_pass
    from megatron_qwen.training.stages.reference import ReferenceModel

    _, _, base, _, reference = env
    cfg = validate(base, 1)
    train, _ = build_datasets(cfg, 8, 0)
    batch = collate([train[i] for i in range(4)])  # [4, 2, s]
    chunks = ReferenceModel(cfg).chunks
    seq = cfg.train.seq_length
    per_token, = sequence_logps_pass(SequenceLogpsPass(cfg, 2, per_token=True), chunks, [[batch]], seq, 4)
    summed, = sequence_logps_pass(SequenceLogpsPass(cfg, 2), chunks, [[batch]], seq, 4)
    hf = AutoModelForCausalLM.from_pretrained(reference, dtype=torch.float32)
    with torch.no_grad():
        logits = hf(input_ids=batch["tokens"].flatten(0, 1)).logits  # [8, s, V]
    want = torch.log_softmax(logits, -1).gather(-1, batch["labels"].flatten(0, 1)[..., None])[..., 0]
    want = want.view_as(batch["loss_mask"]) * batch["loss_mask"]
    assert per_token.shape == batch["loss_mask"].shape and torch.allclose(per_token, want, atol=1e-5)
    assert torch.allclose(summed, per_token.sum(-1), atol=1e-5) and summed.shape == (4, 2)
