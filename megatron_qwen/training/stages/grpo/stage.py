"""Group relative policy optimization (stage=grpo): online RL with verifiable rewards.

Every ``stage.updates_per_rollout`` (k) steps, :meth:`GRPOStage.before_step` reads the prompts
of the next k global batches, samples ``stage.group_size`` (G) completions of each with the
current policy (:class:`~megatron_qwen.generation.engine.RolloutEngine`, in-framework
:class:`~megatron_qwen.generation.sampler.MegatronSampler`; seeds from ``(train.seed,
prompt position, j)``, :mod:`~megatron_qwen.training.stages.grpo.rollout`), scores them with
``stage.rewards`` and turns the rewards into group-normalized advantages. Each of the k
optimizer steps then trains on one global batch of those groups with
:func:`~megatron_qwen.training.stages.grpo.loss.grpo_loss` (clipped ratio, k3 KL with ``stage.beta``,
token-level aggregation by default; conventions in that module).

Accounting: a sample is a prompt (G rows); ``train.global_batch_size`` prompts per optimizer
step, so ``consumed_samples`` grows by it every step as in pretraining and ``train_iters``
counts optimizer steps (k | train_iters; checkpoints fall between rollouts, config/grpo.py).

Old log-probs: with k = 1 the step trains on the policy that sampled, so they are the
current log-probs detached (ratio exactly 1, trl's shortcut); with k > 1 a forward-only pass
of the policy computes them right after sampling, before the first update. Reference
log-probs come from a frozen copy of the stage's starting weights
(:class:`~megatron_qwen.training.stages.reference.ReferenceModel`; none when beta = 0). All three
use the same forward (logits at the completion positions only, then
:func:`~megatron_qwen.training.stages.logprobs.token_logprobs`),
so the ratio and the KL of an unchanged policy are exactly 1 and 0.

Validation samples ``group_size`` completions of every held-out prompt at the rollout
temperature with seeds fixed per (prompt, completion), the same at every evaluation: its mean
reward estimates what GRPO maximizes (the expected reward of the policy's samples) over G
times more completions than greedy decoding would give, and a change between two
evaluations comes from the policy alone. It reports the reward (mean and within-group std),
accuracy, response length, entropy and NLL of those completions.
"""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import torch
from megatron.core.packed_seq_params import PackedSeqParams

from megatron_qwen.config.schema import Config
from megatron_qwen.config.shapes import rows_per_sample
from megatron_qwen.data.prompt_dataset import build_prompt_datasets, stop_token_ids
from megatron_qwen.data.tokenizer import load_tokenizer
from megatron_qwen.generation.engine import SamplingParams
from megatron_qwen.generation.sampler import MegatronSampler
from megatron_qwen.training.stage import Batch, LossFunc, Stage, metric
from megatron_qwen.training.stages.grpo.loss import group_advantages, grpo_loss
from megatron_qwen.training.stages.grpo.rewards import RewardSpec, get_reward
from megatron_qwen.training.stages.grpo.rollout import (TRAIN_SPLIT, VALID_SPLIT, gather_prompts, micro_batches,
                                                        reward_fields, sample_groups, trained_tokens)
from megatron_qwen.training.stages.grpo.selected_logits import logits_at
from megatron_qwen.training.stages.logprobs import SequenceLogpsPass, sequence_logps_pass, token_entropy, token_logprobs
from megatron_qwen.training.stages.no_signal import NoSignalWatch
from megatron_qwen.training.stages.reference import ReferenceModel
from megatron_qwen.training.step import eval_mode

# Throughput: per step and DP rank, the tokens and seconds of the rollout and of the training work,
# as [value, 1] on the step's first micro-batch ([0, 0] elsewhere); train_record divides the means.
RATES = {"rollout_tokens_per_s": ("rollout_tokens", "rollout_seconds"),
         "train_tokens_per_s": ("train_tokens", "train_seconds")}
TIMES = tuple(name for pair in RATES.values() for name in pair)
# The tokens a step trains on (prompt + completion, no filler), per DP rank as [value, 1] on the step's
# first micro-batch: the trainer's tokens_per_s (window_tokens) counts them, not rows x seq_length.
STEP_TOKENS = "step_tokens"
STEP_FIELDS = (*TIMES, STEP_TOKENS)


def completion_logits(model: torch.nn.Module, batch: Batch,
                      packed_seq_params: Optional[PackedSeqParams] = None) -> torch.Tensor:
    """Vocab-parallel logits [n, V/tp] at the completion positions (``loss_mask``) of the packed
    row [1, t]: the output layer runs at those positions only
    (:func:`~megatron_qwen.training.stages.grpo.selected_logits.logits_at`)."""
    return logits_at(model, batch["tokens"], batch["position_ids"], batch["loss_mask"] > 0, packed_seq_params)


def as_sequences(packed: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """A per-token tensor of a packed row [1, t] as one zero-padded row per sequence [n, s_max]
    (what the loss aggregates over; differentiable)."""
    lengths = torch.diff(cu_seqlens.reshape(-1)).tolist()  # one host sync per micro-batch
    return torch.nn.utils.rnn.pad_sequence(list(packed.reshape(-1).split(lengths)), batch_first=True)


def completion_logps(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor,
                     with_entropy: bool = True) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Log-probs of ``labels`` [1, t] (differentiable) and the entropy [1, t] (a metric; None
    without ``with_entropy``) at the completion positions ``mask`` [1, t], 0 elsewhere, from the
    logits [n, V/tp] of those positions (:func:`completion_logits`, in the order of ``mask``).

    The old and reference passes skip the entropy: it makes several [n, V] temporaries
    (docs/benchmarks.md "GRPO step").
    """
    where = mask > 0
    entropy = None
    if with_entropy:
        # NOTE: the entropy first: megatron's vocab-parallel cross entropy overwrites fp32 logits in place.
        entropy = torch.zeros(where.shape, device=logits.device).masked_scatter(where, token_entropy(logits.detach()))
    logps = token_logprobs(logits, labels[where])
    return torch.zeros(where.shape, device=logits.device, dtype=logps.dtype).masked_scatter(where, logps), entropy


class TokenLogpsPass(SequenceLogpsPass):
    """Forward-only per-token log-probs [1, t] of packed rollout micro-batches (masked), through
    :func:`completion_logits`: the old (policy) and reference log-probs."""

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg, rows_per_sample(cfg.stage), per_token=True)

    def forward_step(self, model: torch.nn.Module, batch: Batch, packed_seq_params=None):
        return (completion_logits(model, batch, packed_seq_params),
                partial(_report_logps, batch["labels"], batch["loss_mask"]))


def _report_logps(labels: torch.Tensor, loss_mask: torch.Tensor, logits: torch.Tensor):
    logps, _ = completion_logps(logits, labels, loss_mask, with_entropy=False)
    logps = logps.detach()  # [1, t]
    return logps.sum(), torch.tensor(loss_mask.shape[0], dtype=torch.int), {"logps": logps}


class StepClock:
    """Seconds of a step's training work: from handing its batches to the schedule until the next
    step's rollout or a validation begins (so the optimizer step is in, the rollout is not)."""

    def __init__(self) -> None:
        self.since: Optional[float] = None
        self.until: Optional[float] = None
        self.tokens = 0

    def start(self, tokens: int) -> None:
        self.since, self.until, self.tokens = time.perf_counter(), None, tokens

    def pause(self) -> None:
        if self.since is not None and self.until is None:
            self.until = time.perf_counter()

    def previous(self) -> Optional[Tuple[int, float]]:
        """(tokens, seconds) of the step before (None for the first step of a process)."""
        if self.since is None:
            return None
        return self.tokens, (self.until or time.perf_counter()) - self.since


def _timing(prefix: str, measured: Optional[Tuple[int, float]]) -> Dict[str, torch.Tensor]:
    """``<prefix>_tokens`` and ``<prefix>_seconds`` as ``[value, 1]``, or ``[0, 0]`` when not measured."""
    tokens, seconds = measured or (0, 0.0)
    count = float(measured is not None)
    return {f"{prefix}_tokens": torch.tensor([float(tokens), count]),
            f"{prefix}_seconds": torch.tensor([seconds, count])}


def reward_metrics(batch: Batch) -> Dict[str, torch.Tensor]:
    """``[sum, count]`` of the completions' rewards and accuracy; ``reward_std`` and
    ``frac_reward_zero_std`` are trl's: the within-group standard deviation (Bessel) averaged over
    prompts, and the fraction of groups whose rewards are all equal (advantages 0: no gradient)."""
    reward = batch["reward"]  # [b, G]
    metrics = {name: metric(value.sum(), value.numel()) for name, value in batch.items()
               if name in ("reward", "accuracy") or name.startswith("rewards/")}
    if reward.shape[1] > 1:
        std = reward.std(dim=1)  # [b]
        metrics["reward_std"] = metric(std.sum(), reward.shape[0])
        flat = torch.isclose(std, torch.zeros_like(std))
        metrics["frac_reward_zero_std"] = metric(flat.sum(), reward.shape[0])
    return metrics


def step_of(batches: List[Batch], per_step: int) -> int:
    """The step whose prompts these are: their samples' position in the run // global batch + 1."""
    return int(batches[0]["position"][0]) // per_step + 1


class GRPOStage(Stage):
    """stage=grpo: sampled groups, group-normalized advantages, clipped policy gradient + k3 KL."""

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        st = cfg.stage
        self.rewards = [RewardSpec(entry.name, entry.weight) for entry in st.rewards]
        for spec in self.rewards:
            get_reward(spec.name)  # an unknown name fails here, before the run starts
        self.logps_pass = TokenLogpsPass(cfg)
        self.reference: Optional[ReferenceModel] = None
        self.pending: List[List[Batch]] = []  # the rollout's global batches not trained on yet
        self.lookahead: Optional[List[Batch]] = None  # a global batch read past the rollout window
        self.no_signal = NoSignalWatch(st.no_signal_warn_steps)
        self.scheduled = 0  # micro-batches of the global batch before_step returned last
        self.clock = StepClock()

    def build_datasets(self, train_samples: int, valid_samples: int) -> Tuple[object, Optional[object]]:
        return build_prompt_datasets(self.cfg, train_samples, valid_samples)

    def setup(self, model: List[torch.nn.Module], iteration: int, run_dir: Path,
              datasets: Tuple[object, Optional[object]]) -> None:
        st = self.cfg.stage
        self.model = model
        self.tokenizer = load_tokenizer(self.cfg.data.tokenizer)
        self.pools = [None if d is None else d.pool for d in datasets]  # train, validation
        stop = stop_token_ids(self.tokenizer)
        self.engine = MegatronSampler(model[0], pad_token_id=self.tokenizer.eod)
        self.sampling = SamplingParams(st.max_new_tokens, st.temperature, st.top_p, stop_token_ids=stop)
        if st.beta > 0:
            self.reference = ReferenceModel(self.cfg)

    def before_step(self, iterators: List[Iterator[Batch]], num_microbatches: int,
                    training: bool) -> List[Iterator[Batch]]:
        [iterator] = iterators  # pp = 1: one model chunk
        if not training:
            self.clock.pause()
            batches = self._validation_batches(iterator, num_microbatches)
            self.scheduled = len(batches)
            return [iter(batches)]
        self.no_signal.step()
        rollout = self._rollout(iterator, num_microbatches) if not self.pending else None
        batches = self.pending.pop(0)
        self.scheduled = len(batches)
        tokens = trained_tokens(batches)
        fields = {**_timing("rollout", rollout), **_timing("train", self.clock.previous()),
                  STEP_TOKENS: torch.tensor([float(tokens), 1.0])}
        for i, batch in enumerate(batches):
            batch.update(fields if i == 0 else {name: torch.zeros(2) for name in fields})
        self.clock.start(tokens)
        return [iter(batches)]

    def scheduled_microbatches(self, num_microbatches: int) -> int:
        return self.scheduled

    def restart_data(self) -> None:
        # Rollouts sampled by weights the rollback discarded, for batches it will read again.
        self.pending, self.lookahead = [], None
        self.clock = StepClock()

    def _window(self, iterator: Iterator[Batch], num_microbatches: int) -> List[List[Batch]]:
        """The prompt micro-batches of each step left in the current rollout window (up to the
        next step that is a multiple of k), read one global batch at a time.

        Skipped batches (data.skips, a rollback) are not in the iterator, so a window may hold
        fewer than k steps; a batch read beyond it waits in ``lookahead`` for the next rollout.
        """
        k, per_step = self.cfg.stage.updates_per_rollout, self.cfg.train.global_batch_size
        steps: List[List[Batch]] = []
        while True:
            try:
                batches = self.lookahead or [next(iterator) for _ in range(num_microbatches)]
            except StopIteration:  # the run's last steps were skipped
                return steps
            self.lookahead = None
            step = step_of(batches, per_step)
            end = -(-step_of((steps or [batches])[0], per_step) // k) * k  # the window's last step
            if step > end:
                self.lookahead = batches
                return steps
            steps.append(batches)
            if step == end:
                return steps

    def _sample(self, batches: List[Batch], split: int):
        """Rollouts and reward fields of prompt micro-batches of ``split``."""
        group = self.cfg.stage.group_size
        prompts = gather_prompts(batches, self.pools[split])
        rollouts = sample_groups(self.engine, prompts, group, self.sampling, self.cfg.train.seed, split)
        return rollouts, reward_fields(rollouts, prompts, group, self.tokenizer, self.rewards)

    def _rollout(self, iterator: Iterator[Batch], num_microbatches: int) -> Tuple[int, float]:
        """Samples and scores the next k global batches into ``self.pending``; (completion tokens, seconds)."""
        cfg, st = self.cfg, self.cfg.stage
        group = st.group_size
        steps = self._window(iterator, num_microbatches)
        rollouts, fields = self._sample([batch for step in steps for batch in step], TRAIN_SPLIT)
        fields["advantages"] = group_advantages(fields["reward"], group, std=st.advantage_std)
        per_step = num_microbatches * cfg.train.micro_batch_size  # prompts of one global batch on this rank
        self.pending = [self._micro_batches(rollouts, fields, range(i * per_step, (i + 1) * per_step))
                        for i in range(len(steps))]
        for batches in self.pending:
            if self.reference is not None:
                self._attach_logps(batches, self.reference.chunks, "ref_logps")
            if st.updates_per_rollout > 1:
                self._attach_logps(batches, self.model, "old_logps")
        return rollouts.num_completion_tokens, rollouts.seconds

    def _attach_logps(self, batches: List[Batch], chunks: List[torch.nn.Module], key: str) -> None:
        t = self.cfg.train
        with eval_mode(chunks):  # no dropout: the same numbers as the training forward without dropout
            logps = sequence_logps_pass(self.logps_pass, chunks, [batches], t.seq_length, t.micro_batch_size)
        for batch, value in zip(batches, logps):
            batch[key] = value.cpu()  # [1, t]

    def _validation_batches(self, iterator: Iterator[Batch], num_microbatches: int) -> List[Batch]:
        rollouts, fields = self._sample([next(iterator) for _ in range(num_microbatches)], VALID_SPLIT)
        return self._micro_batches(rollouts, fields, range(len(rollouts.completion_ids) // self.cfg.stage.group_size))

    def _micro_batches(self, rollouts, fields: Dict[str, torch.Tensor], groups: range) -> List[Batch]:
        t, st, p = self.cfg.train, self.cfg.stage, self.cfg.parallel
        multiple = p.tp if p.sp else 1  # sequence parallel splits each packed row over the TP ranks
        return micro_batches(rollouts, fields, st.group_size, groups, t.micro_batch_size,
                             st.max_tokens_per_microbatch, t.seq_length, multiple, self.tokenizer.eod)

    def forward_step(self, model: torch.nn.Module, batch: Batch,
                     packed_seq_params: Optional[PackedSeqParams] = None) -> Tuple[torch.Tensor, LossFunc]:
        loss = self._loss if "advantages" in batch else self._validation_metrics
        return completion_logits(model, batch, packed_seq_params), partial(loss, batch)

    def _loss(self, batch: Batch, logits: torch.Tensor):
        st = self.cfg.stage
        logps, entropy = completion_logps(logits, batch["labels"], batch["loss_mask"])
        rows = partial(as_sequences, cu_seqlens=batch["cu_seqlens"])  # [1, t] -> [b*G, s_max] for the loss
        logps = rows(logps)
        current = logps.detach()
        old = rows(batch["old_logps"]) if "old_logps" in batch else current
        ref = rows(batch["ref_logps"]) if "ref_logps" in batch else current
        loss_sum, count, metrics = grpo_loss(logps, old, ref, batch["advantages"].reshape(-1),
                                             rows(batch["loss_mask"]), clip_low=st.clip_low,
                                             clip_high=st.clip_high, beta=st.beta, aggregation=st.aggregation,
                                             entropy=rows(entropy))
        metrics.update(reward_metrics(batch))
        metrics.update({name: batch[name].float() for name in STEP_FIELDS})
        return loss_sum, count, metrics

    def _validation_metrics(self, batch: Batch, logits: torch.Tensor):
        mask = batch["loss_mask"]
        logps, entropy = completion_logps(logits, batch["labels"], mask)
        tokens = mask.sum()
        lengths = as_sequences(mask, batch["cu_seqlens"]).sum(-1)  # [b*G]
        metrics = {"entropy": metric((entropy * mask).sum(), tokens), "nll": metric(-(logps * mask).sum(), tokens),
                   "response_length": metric(lengths.sum(), lengths.numel()), **reward_metrics(batch)}
        return -(logps * mask).sum(), tokens.to(torch.int), metrics

    def train_record(self, metrics: Dict[str, float]) -> Dict[str, float]:
        """The metrics, with tokens/s over all DP ranks in place of the per-rank tokens and seconds.

        A rate is left out of a window that measured none (the first step of a process has no
        finished training pass yet; with k > 1 most steps sample nothing): 0 would read as a stall.
        """
        record = {name: value for name, value in metrics.items() if name not in STEP_FIELDS}
        self._watch_signal(record)
        dp = self.cfg.parallel.dp or 1
        for rate, (tokens, seconds) in RATES.items():
            if metrics.get(seconds, 0.0) > 0:
                record[rate] = dp * metrics[tokens] / metrics[seconds]
        return record

    def window_tokens(self, metrics: Optional[Dict[str, float]], steps: int, applied: int) -> float:
        """Prompt and completion tokens of the packed rollouts the window's applied steps trained on,
        over all DP ranks (``step_tokens`` is their mean per step and rank)."""
        return (metrics or {}).get(STEP_TOKENS, 0.0) * (self.cfg.parallel.dp or 1) * applied

    def _watch_signal(self, record: Dict[str, float]) -> None:
        st, flat = self.cfg.stage, record.get("frac_reward_zero_std", 0.0)
        self.no_signal.observe(
            flat < 1.0, f"no learning signal for {{steps}} steps: in every group the {st.group_size} completions got the "
            f"same reward (frac_reward_zero_std {flat:.2f}, mean reward {record.get('reward', 0.0):.3f}), so every "
            f"advantage is 0 and nothing trains. Sample more diverse completions (stage.temperature={st.temperature}, "
            f"stage.group_size={st.group_size}, stage.max_new_tokens={st.max_new_tokens}), start from a checkpoint "
            "that sometimes earns the reward (checkpoint.load=<an SFT run>), or add a denser reward, e.g. "
            "stage.rewards=[{name: exact_match, weight: 1.0}, {name: format, weight: 0.5}]")

    def eval_record(self, metrics: Dict[str, float]) -> Dict[str, float]:
        return dict(metrics)
