"""Training samples a run skips, recorded in ``<run_dir>/skipped_samples.jsonl``.

One JSON record per skipped global batch: ``{"step": 7, "first_sample": 48,
"num_samples": 8, "reason": "..."}`` (sample ids are indices into the training dataset, in
the order the sampler reads them). The loss-spike rollback appends records; a user may add
some by hand to skip known-bad data. A skipped batch still takes its iteration (no
forward pass, no update, no LR step), as Megatron-LM's ``--iterations-to-skip`` does, so
``consumed_samples = iteration x global_batch_size`` and a resume continues at the right
sample.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Tuple

from megatron_qwen.errors import UserError

SKIP_FILE = "skipped_samples.jsonl"


class SkippedSamples:
    """Sample-id ranges ``[first, first + n)`` not trained on; a global batch is skipped
    when its first sample lies in one."""

    def __init__(self, global_batch_size: int, ranges: List[Tuple[int, int]] = ()) -> None:
        self.global_batch_size = global_batch_size
        self.ranges = sorted(ranges)

    @classmethod
    def load(cls, run_dir: Path, global_batch_size: int) -> "SkippedSamples":
        """The ranges recorded in ``run_dir`` (none if the file is absent)."""
        path = Path(run_dir) / SKIP_FILE
        ranges = []
        if path.is_file():
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if line.strip():
                    ranges.append(_parse(path, number, line))
        return cls(global_batch_size, ranges)

    def batch_skipped(self, sample: int) -> bool:
        """Whether the global batch holding ``sample`` is skipped."""
        start = sample - sample % self.global_batch_size
        return any(first <= start < first + n for first, n in self.ranges)

    def add_batch(self, run_dir: Path, step: int, reason: str, write: bool) -> dict:
        """Skips the global batch of ``step`` (1-based); ``write``: append its record to the file."""
        record = {"step": step, "first_sample": (step - 1) * self.global_batch_size,
                  "num_samples": self.global_batch_size, "reason": reason}
        self.ranges = sorted([*self.ranges, (record["first_sample"], record["num_samples"])])
        if write:
            with open(Path(run_dir) / SKIP_FILE, "a") as f:
                f.write(json.dumps(record) + "\n")
        return record


def _parse(path: Path, number: int, line: str) -> Tuple[int, int]:
    try:
        record = json.loads(line)
        first, n = int(record["first_sample"]), int(record["num_samples"])
    except (ValueError, KeyError, TypeError) as err:
        raise UserError(f"{path}:{number} is not a skipped-samples record ({err}); each line must be "
                        '{"first_sample": <id>, "num_samples": <n>, ...}: fix or remove it') from err
    if first < 0 or n < 1:
        raise UserError(f"{path}:{number}: first_sample must be >= 0 and num_samples >= 1; fix or remove it")
    return first, n
