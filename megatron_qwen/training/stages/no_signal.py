"""A warning, once, when a stage trains without a learning signal (GRPO, DPO).

A GRPO group whose G rewards are all equal has advantages of 0 and contributes no gradient; when
every group is like that for many steps the run spends its time and learns nothing, with loss,
grad norm and reward all 0 on the console. DPO's counterpart is a validation reward accuracy that
stays at or below chance. Neither is an error (a run may find its signal later), so the stage
says it once, with the numbers and what to change, instead of failing.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


class NoSignalWatch:
    """Counts training steps since the stage last saw a learning signal; warns once past ``limit``."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.steps = 0  # training steps of this process
        self.since = 0  # the step count at the last observation with a signal
        self.warned = False

    def step(self) -> None:
        """One training step ran (call from :meth:`~megatron_qwen.training.stage.Stage.before_step`)."""
        self.steps += 1

    def observe(self, signal: bool, message: str) -> bool:
        """Records an observation (a logged window, a validation); logs ``message``, its ``{steps}`` replaced
        by the number of steps without a signal, the first time that count reaches ``limit``. Returns
        whether it warned."""
        if signal:
            self.since = self.steps
            return False
        if self.warned or self.steps - self.since < self.limit:
            return False
        self.warned = True
        log.warning(message.replace("{steps}", str(self.steps - self.since)))  # (other braces stay)
        return True
