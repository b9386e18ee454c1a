"""A synthetic task with a known right answer: the sum of two small numbers.

Questions are ``What is a + b?`` with ``a, b = randint(0, max_operand)`` drawn from
``random.Random(seed)``. GRPO prompts with their answers (``data.prompts.arithmetic_prompts``),
preference pairs (``{"prompt", "chosen", "rejected"}``) have the correct sum as the chosen
reply and a near miss (the sum off by 1 to 3, never negative) as the rejected one; SFT
conversations (``{"messages"}``) have the correct sum. Everything is a function of the seed,
so the same call always writes the same file (``tools/make_preference_data.py``).
"""

from __future__ import annotations

import random
from typing import Dict, Iterator, List, Optional, Tuple

ANSWER_TAG = "answer"  # <answer>...</answer>: what training/stages/grpo/rewards.py's format reward asks for


def questions(count: int, seed: int, max_operand: int) -> Iterator[Tuple[random.Random, str, int]]:
    """(the task's generator, question, answer) ``count`` times; callers may draw more from the generator."""
    rng = random.Random(seed)
    for _ in range(count):
        a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
        yield rng, f"What is {a} + {b}?", a + b


def prompt_messages(question: str, system: Optional[str]) -> List[Dict[str, str]]:
    """The chat turns asking ``question`` (after a system turn when ``system`` is given)."""
    system_turn = [{"role": "system", "content": system}] if system is not None else []
    return system_turn + [{"role": "user", "content": question}]


def near_miss(rng: random.Random, answer: int) -> int:
    """A wrong answer 1 to 3 away from ``answer``, never negative."""
    return rng.choice([answer + d for d in (-3, -2, -1, 1, 2, 3) if answer + d >= 0])


def preference_pairs(count: int, seed: int = 0, max_operand: int = 9, system: Optional[str] = None,
                     plain_every: int = 0) -> List[dict]:
    """``count`` pairs in trl's conversational form; with ``plain_every`` = k > 0 every k-th pair
    uses the plain-string form instead (the prompt a string, which drops ``system``)."""
    pairs = []
    for i, (rng, question, answer) in enumerate(questions(count, seed, max_operand)):
        chosen, rejected = str(answer), str(near_miss(rng, answer))
        if plain_every and i % plain_every == plain_every - 1:
            pairs.append({"prompt": question, "chosen": chosen, "rejected": rejected})
            continue
        pairs.append({"prompt": prompt_messages(question, system), "chosen": [{"role": "assistant", "content": chosen}],
                      "rejected": [{"role": "assistant", "content": rejected}]})
    return pairs


def sft_conversations(count: int, seed: int = 0, max_operand: int = 9, system: Optional[str] = None,
                      tagged_every: int = 0) -> List[dict]:
    """``count`` SFT conversations (``{"messages": [...]}``) answering with the correct sum; with
    ``tagged_every`` = k > 0 every k-th answer is ``<answer>sum</answer>`` (what the ``format``
    reward of training/stages/grpo/rewards.py asks for) instead of the bare sum."""
    conversations = []
    for i, (_, question, answer) in enumerate(questions(count, seed, max_operand)):
        tagged = tagged_every and i % tagged_every == tagged_every - 1
        reply = f"<{ANSWER_TAG}>{answer}</{ANSWER_TAG}>" if tagged else str(answer)
        conversations.append({"messages": prompt_messages(question, system) + [{"role": "assistant", "content": reply}]})
    return conversations
