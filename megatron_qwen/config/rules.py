"""How every config rule reports (config/validate.py and the stage rule modules it calls): a
failed rule appends its message, and validate() raises one ConfigError joining them all, so a
user sees every problem of a config at once."""

from __future__ import annotations

from typing import List


def check(errors: List[str], ok: bool, message: str) -> None:
    """Appends ``message`` to ``errors`` unless ``ok``."""
    if not ok:
        errors.append(message)
