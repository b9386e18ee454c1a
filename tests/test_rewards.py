"""Verifiable rewards: the registry, exact match, math-verify (against trl's accuracy_reward), format."""

from __future__ import annotations

import pytest
import torch
from trl.rewards import accuracy_reward

from megatron_qwen.training.stages.grpo.rewards import (REWARDS, RewardError, RewardSpec, extract_answer, get_reward,
                                                        register, score)


@pytest.mark.parametrize("completion, answer, expected", [
    ("19", "19", 1.0), (" 19.0\n", "19", 1.0), ("<answer>1,000</answer>", "1000", 1.0),
    ("I think <answer>12</answer>", "12", 1.0), ("<answer>3</answer> no, <answer>4</answer>", "4", 1.0),
    ("18", "19", 0.0), ("The sum is 19", "19", 0.0), ("", "19", 0.0), ("nan", "nan", 1.0), ("Ottawa", "Ottawa", 1.0),
])
def test_exact_match(completion, answer, expected):
    assert get_reward("exact_match")(completion, answer) == expected


BOXED_CASES = [  # (completion, reference): boxed answers, the form trl's accuracy_reward reads
    (r"My answer is \boxed{\frac{1}{3}}", r"\frac{1}{3}"), (r"My answer is \boxed{\frac{1}{2}}", r"\frac{1}{3}"),
    (r"\boxed{0.75}", "3/4"), (r"so \boxed{\sqrt{4}}", "2"), (r"\boxed{19}", "19"), (r"\boxed{20}", "19"),
    (r"first $3$, finally \boxed{\frac{\pi}{2}}", r"$\frac{\pi}{2}$"),
]


def test_math_verify_agrees_with_trl_accuracy_reward():
    ours = [get_reward("math_verify")(c, a) for c, a in BOXED_CASES]
    theirs = accuracy_reward([[{"role": "assistant", "content": c}] for c, _ in BOXED_CASES],
                             [a for _, a in BOXED_CASES])
    assert ours == theirs and 0 < sum(ours) < len(ours)


def test_math_verify_reads_tagged_and_plain_answers():
    math = get_reward("math_verify")
    # trl scores these 0: no \boxed{} in the completion, or the reference read as "2".
    assert math(r"so $x = \frac{2}{4}$", r"\frac{1}{2}") == 1.0 and math(r"$\sqrt{4}$", "2") == 1.0
    assert math(r"\boxed{2\pi}", r"2\pi") == 1.0 and math(r"\boxed{2}", r"2\pi") == 0.0
    assert math("<answer>0.5</answer>", r"\frac{1}{2}") == 1.0
    assert math("so 19.0", "19") == 1.0 and math("<answer>18</answer> 19", "19") == 0.0
    assert math("anything", "") == 0.0  # an unparseable reference scores nothing


@pytest.mark.parametrize("completion, expected", [
    ("<answer>7</answer>", 1.0), ("Let me add. <answer> 7 </answer>\n", 1.0), ("7", 0.0),
    ("<answer></answer>", 0.0), ("<answer>7</answer> done", 0.0), ("<answer>7</answer><answer>8</answer>", 0.0),
    ("<answer>7", 0.0),
])
def test_format(completion, expected):
    assert get_reward("format")(completion, "7") == expected


def test_score_weights_terms_and_registry():
    completions, answers = ["<answer>7</answer>", "7", "<answer>8</answer>"], ["7", "7", "7"]
    total, terms = score(completions, answers, [RewardSpec("exact_match"), RewardSpec("format", 0.1)])
    assert torch.allclose(total, torch.tensor([1.1, 1.0, 0.1]))
    assert terms["exact_match"].tolist() == [1.0, 1.0, 0.0] and terms["format"].tolist() == [1.0, 0.0, 1.0]
    with pytest.raises(RewardError, match="unknown reward 'exact'; choose from exact_match, format, math_verify"):
        score(completions, answers, [RewardSpec("exact")])
    with pytest.raises(RewardError, match="no reward configured"):
        score(completions, answers, [])
    register("length_test")(lambda completion, answer: float(len(completion)))
    try:
        assert score(["abc"], ["x"], [RewardSpec("length_test", 2.0)])[0].tolist() == [6.0]
    finally:
        del REWARDS["length_test"]
    assert extract_answer("a <answer> 5 </answer>") == "5"
