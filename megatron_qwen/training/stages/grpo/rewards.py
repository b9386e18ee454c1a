"""Rule-based verifiable rewards, selected by name.

A reward function maps (completion text, reference answer) to a float. The completion is
the decoded assistant turn without its closing stop token. The registry holds:

- ``exact_match``: 1.0 when the answer equals the reference, as numbers when both parse as
  numbers ("19" = "19.0"), else as stripped strings. The answer is the content of the last
  ``<answer>...</answer>`` when the completion has one, else the whole completion.
- ``math_verify``: 1.0 when math-verify (Hugging Face's maintained answer checker) finds the
  answer equal to the reference. The answer (extracted as for ``exact_match``) is read as trl's
  ``accuracy_reward`` reads completions (``\\boxed{}`` first), and where that finds nothing, with
  math-verify's defaults (``$...$`` anywhere, plain numbers: "so 0.5" = ``\\frac{1}{2}``; trl
  scores those 0). A reference math-verify cannot parse scores 0.0 (trl: skipped).
- ``format``: 1.0 when the completion ends with exactly one non-empty
  ``<answer>...</answer>`` (only whitespace after it), else 0.0.

:func:`score` combines several by weight (e.g. accuracy 1.0 + format 0.1); register more with
:func:`register`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch

from megatron_qwen.data.arithmetic import ANSWER_TAG
from megatron_qwen.errors import UserError

RewardFn = Callable[[str, str], float]  # (completion, reference answer) -> reward
REWARDS: Dict[str, RewardFn] = {}
_TAGGED = re.compile(rf"<{ANSWER_TAG}>(.*?)</{ANSWER_TAG}>", re.DOTALL)


class RewardError(UserError):
    """An unknown reward name or an unusable reward setting."""


@dataclass(frozen=True)
class RewardSpec:
    """One term of the total reward: ``weight * REWARDS[name](completion, answer)``."""

    name: str
    weight: float = 1.0


def register(name: str) -> Callable[[RewardFn], RewardFn]:
    """Decorator adding a reward function to the registry under ``name``."""
    def add(fn: RewardFn) -> RewardFn:
        REWARDS[name] = fn
        return fn

    return add


def get_reward(name: str) -> RewardFn:
    """The reward function registered as ``name``."""
    if name not in REWARDS:
        raise RewardError(f"unknown reward {name!r}; choose from {', '.join(sorted(REWARDS))}")
    return REWARDS[name]


def extract_answer(completion: str) -> str:
    """The last ``<answer>...</answer>`` content, or the whole completion, stripped."""
    tagged = _TAGGED.findall(completion)
    return (tagged[-1] if tagged else completion).strip()


def _number(text: str) -> Optional[float]:
    try:
        value = float(text.replace(",", ""))
    except ValueError:
        return None
    return value if math.isfinite(value) else None


@register("exact_match")
def exact_match(completion: str, answer: str) -> float:
    """1.0 when the extracted answer equals ``answer`` (numerically when both are numbers)."""
    given, expected = extract_answer(completion), answer.strip()
    a, b = _number(given), _number(expected)
    if a is not None and b is not None:
        return float(a == b)
    return float(given == expected)


def _parse_prediction(text: str) -> list:
    """math-verify's reading of an answer: first as trl's ``accuracy_reward`` reads completions
    (``\\boxed{}`` or an "answer is" anchor, the first match), else with math-verify's defaults
    (``$...$`` LaTeX anywhere, plain expressions such as "19" or "3/4")."""
    from latex2sympy2_extended import NormalizationConfig
    from math_verify import LatexExtractionConfig, parse

    trl_reading = LatexExtractionConfig(normalization_config=NormalizationConfig(units=True), boxed_match_priority=0,
                                        try_extract_without_anchor=False)
    return parse(text, extraction_config=[trl_reading], extraction_mode="first_match") or parse(text)


@register("math_verify")
def math_answer(completion: str, answer: str) -> float:
    """1.0 when math-verify judges the extracted answer equal to ``answer``."""
    from math_verify import parse, verify  # a GRPO dependency only (requirements.txt)

    # NOTE: the reference is read as LaTeX first: parse("2\\pi") alone finds only the "2".
    gold = parse(f"${answer}$") or parse(answer)
    if not gold:
        return 0.0
    return float(verify(gold, _parse_prediction(extract_answer(completion))))


@register("format")
def answer_format(completion: str, answer: str) -> float:
    """1.0 when the completion ends with one non-empty ``<answer>...</answer>``."""
    tagged = _TAGGED.findall(completion)
    ends_tagged = completion.rstrip().endswith(f"</{ANSWER_TAG}>")
    return float(len(tagged) == 1 and bool(tagged[0].strip()) and ends_tagged)


def score(completions: Sequence[str], answers: Sequence[str],
          specs: Sequence[RewardSpec]) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Total rewards [n] (the weighted sum) and each named reward [n] unweighted, for metrics."""
    if not specs:
        raise RewardError("no reward configured; name at least one of " + ", ".join(sorted(REWARDS)))
    terms = {s.name: torch.tensor([get_reward(s.name)(c, a) for c, a in zip(completions, answers)],
                                  dtype=torch.float32) for s in specs}
    total = sum(s.weight * terms[s.name] for s in specs)
    return total, terms
