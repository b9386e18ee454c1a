"""Non-finite gradients and loss spikes: skip the update, stop, or roll back.

* Every step: :func:`optimizer_step` refuses an update whose gradient norm is NaN or Inf.
  The norm is the one megatron computes for clipping anyway (all-reduced over the ranks
  holding gradients, one host sync), so the check adds no device sync, and every rank sees
  the same norm and skips together. A skipped step changes neither weights, nor optimizer
  state, nor the LR schedule; it is counted in ``skipped_iters``. After
  ``train.max_skipped_consecutive`` skips in a row the run saves and stops.
* Opt-in (``train.loss_spike.action``): each step's loss is brought to the host (one
  all-reduce and one sync per step) and compared with the running mean of the previous
  ones; a spike is logged (``warn``) or undone by reloading the last checkpoint and
  skipping the offending batches (``rollback``, as the OPT, PaLM and OLMo runs did by hand).
"""

from __future__ import annotations

import logging
import math
import statistics
from collections import deque
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

from megatron_qwen.config.schema import LossSpikeConfig, TrainConfig
from megatron_qwen.errors import UserError
from megatron_qwen.platform import collectives

log = logging.getLogger(__name__)


class TrainingDiverged(UserError):
    """Too many non-finite steps in a row, or spikes that rollbacks do not cure."""


def optimizer_step(optimizer) -> Tuple[bool, float]:
    """megatron's ``optimizer.step()`` that skips an update with a non-finite grad norm.

    Same sequence as megatron's ChainedOptimizer.step (prepare, norm, clip, step), with the
    check between norm and clip: megatron itself applies a NaN update in fp32/bf16 (only
    fp16's loss scaler looks for inf). Returns (applied, grad norm).
    """
    if optimizer.prepare_grads():  # fp16: the loss scaler found inf/nan and lowered its scale
        return False, float("nan")
    grad_norm = float(optimizer.get_grad_norm())
    if not math.isfinite(grad_norm):
        return False, grad_norm
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        params = [] if getattr(opt, "is_stub_optimizer", False) else opt.get_parameters()
        if params and opt.config.clip_grad > 0.0:
            clip_grad_by_total_norm_fp32(params, opt.config.clip_grad, grad_norm,
                                         opt.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8)
    return bool(optimizer.step_with_ready_grads()), grad_norm


def step_loss(total: Optional[torch.Tensor], device: torch.device) -> float:
    """The step's token-weighted mean loss on every rank (one all-reduce over all ranks).

    ``total``: this rank's [loss_sum, tokens] on the last pipeline stage, else None (zeros).
    TP ranks of the last stage hold the same pair, which scales both sums alike.
    """
    pair = total.detach().clone() if total is not None else torch.zeros(2, device=device)
    collectives.all_reduce(pair)
    return float(pair[0] / pair[1].clamp(min=1))


class SpikeDetector:
    """Loss above ``factor`` x the running mean, or above mean + ``zscore`` std."""

    def __init__(self, cfg: LossSpikeConfig) -> None:
        self.cfg = cfg
        self.history: deque = deque(maxlen=cfg.window)  # (step, loss) of unskipped, unspiked steps

    def check(self, step: int, loss: float) -> Optional[str]:
        """Why ``loss`` is a spike, or None (then it joins the history)."""
        reason = self._reason(loss)
        if reason is None:
            self.history.append((step, loss))
        return reason

    def _reason(self, loss: float) -> Optional[str]:
        if not math.isfinite(loss):
            return f"loss {loss}"
        losses = [value for _, value in self.history]
        if len(losses) < self.cfg.min_history:
            return None
        mean, std = statistics.fmean(losses), statistics.pstdev(losses)
        if self.cfg.factor is not None and loss > self.cfg.factor * mean:
            return f"loss {loss:.4f} > {self.cfg.factor} x running mean {mean:.4f}"
        if self.cfg.zscore is not None and loss > mean + self.cfg.zscore * std:
            return f"loss {loss:.4f} > running mean {mean:.4f} + {self.cfg.zscore} x std {std:.4f}"
        return None

    def forget_after(self, step: int) -> None:
        """Drops the history of steps after ``step`` (they are trained again after a rollback)."""
        self.history = deque(((s, v) for s, v in self.history if s <= step), maxlen=self.cfg.window)


@dataclass
class Verdict:
    """What the loop must do after a step (both None: carry on)."""

    stop: Optional[str] = None  # raise TrainingDiverged with this message
    save: bool = False  # ... after saving (the weights are the last good ones)
    rollback: Optional[str] = None  # reload the last checkpoint, skip batches; the reason


class StepGuard:
    """Counts non-finite steps and watches for spikes; the same verdict on every rank.

    ``loss_scaler``: fp16, whose dynamic loss scaler skips overflowing steps by design while
    it lowers the scale (dozens in a row at the start); those skips are not counted.
    """

    def __init__(self, cfg: TrainConfig, device: torch.device, loss_scaler: bool = False) -> None:
        self.cfg, self.device, self.loss_scaler = cfg, device, loss_scaler
        spike = cfg.loss_spike
        self.detector = SpikeDetector(spike) if spike.action != "none" else None
        self.bad_steps: list = []  # consecutive non-finite steps
        self.rollbacks = 0

    def after_step(self, step: int, loss: Optional[torch.Tensor], grad_norm: float, applied: bool,
                   trained: bool) -> Verdict:
        """Collective when spike detection is on. ``trained``: False for a skipped batch."""
        if not trained or (not applied and self.loss_scaler):
            return Verdict()
        if not applied:
            return self._non_finite(step, grad_norm)
        self.bad_steps = []
        if self.detector is None:
            return Verdict()
        reason = self.detector.check(step, step_loss(loss, self.device))
        if reason is None:
            return Verdict()
        return self._spike(step, reason)

    def _non_finite(self, step: int, grad_norm: float) -> Verdict:
        self.bad_steps.append(step)
        log.warning("step %d: gradient norm %s, update skipped (%d in a row, train.max_skipped_consecutive=%d)",
                    step, grad_norm, len(self.bad_steps), self.cfg.max_skipped_consecutive)
        if len(self.bad_steps) < self.cfg.max_skipped_consecutive:
            return Verdict()
        last_good = self.bad_steps[0] - 1
        return Verdict(stop=(
            f"steps {self.bad_steps[0]}-{step} all had a non-finite gradient norm "
            f"(train.max_skipped_consecutive={self.cfg.max_skipped_consecutive}); the checkpoint of iteration "
            f"{step} holds the weights of step {last_good}, the last update applied. Lower optim.lr or "
            "optim.clip_grad, check the data of those steps, or raise train.max_skipped_consecutive; "
            "running again resumes from that checkpoint"), save=True)

    def _spike(self, step: int, reason: str) -> Verdict:
        action = self.cfg.loss_spike.action
        log.warning("step %d: loss spike (%s); train.loss_spike.action=%s", step, reason, action)
        if action != "rollback":
            return Verdict()
        self.rollbacks += 1
        if self.rollbacks > self.cfg.loss_spike.max_rollbacks:
            return Verdict(stop=(
                f"step {step}: loss spike ({reason}) after {self.cfg.loss_spike.max_rollbacks} rollbacks "
                "(train.loss_spike.max_rollbacks): skipping batches does not cure it; lower optim.lr or raise "
                "train.loss_spike.factor / zscore"))
        return Verdict(rollback=reason)

    def rolled_back(self, iteration: int) -> None:
        """Forgets steps after ``iteration``, which is where training continues."""
        self.bad_steps = []
        if self.detector is not None:
            self.detector.forget_after(iteration)
