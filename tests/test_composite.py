"""Composite prompts: the builder (fixed seed, N distinct tasks, numbering) and the scorer against hand-computed
cases (missing, unnumbered and out-of-order lines included)."""

from __future__ import annotations

import pytest

from dlp_lora.composite import (INSTRUCTION, CompositeItem, CompositePrompt, build_composites, composite_figures,
                                composite_prompt_text, numbered_answers, score_composite)
from dlp_lora.config import DLPError

LABELLED = ("(A) red", "(B) blue", "(C) green")


def _pools(n_tasks: int = 4, per_task: int = 5) -> dict[str, list[CompositeItem]]:
    return {f"t{k}": [CompositeItem(f"t{k}", f"Question {i} of task {k}?", f"a{k}{i}", "exact")
                      for i in range(per_task)] for k in range(n_tasks)}


def test_prompt_text_numbers_questions():
    text = composite_prompt_text(["What is 2+2?", "Pick a colour.\nOptions:\n(A) red\n(B) blue"])
    assert text == INSTRUCTION.format(n=2) + "\n\n1. What is 2+2?\n2. Pick a colour.\nOptions:\n(A) red\n(B) blue"
    # only the item starts begin a line with a number: the scorer reads the prompt's own numbering back
    assert numbered_answers(text, 2) == ["What is 2+2?", "Pick a colour."]
    assert "{n}" not in INSTRUCTION.format(n=3) and "3 numbered questions" in INSTRUCTION.format(n=3)


def test_builder_is_fixed_by_the_seed_and_draws_distinct_tasks():
    pools = _pools()
    a = build_composites(pools, 3, 20, seed=7)
    assert a == build_composites(pools, 3, 20, seed=7)
    assert a != build_composites(pools, 3, 20, seed=8)
    assert [p.index for p in a] == list(range(20))
    for p in a:
        assert len(p.items) == 3 and len(set(p.tasks)) == 3
        lines = p.prompt.splitlines()
        assert lines[0] == INSTRUCTION.format(n=3) and lines[1] == ""
        assert lines[2:] == [f"{i}. {it.question}" for i, it in enumerate(p.items, 1)]   # one-line questions
    # every task's questions are handed out before any repeats: 20 prompts x 3 = 60 draws over 4 tasks of 5
    used = [(it.task, it.question) for p in a[:6] for it in p.items]
    for task in pools:
        first = [q for t, q in used if t == task][:5]
        assert len(set(first)) == len(first)


def test_builder_errors_name_the_option():
    with pytest.raises(DLPError, match="--composite 5: needs test questions of at least 5 different tasks, got 4"):
        build_composites(_pools(), 5, 3)
    with pytest.raises(DLPError, match="--composite: each prompt needs at least 2 questions"):
        build_composites(_pools(), 1, 3)
    with pytest.raises(DLPError, match="--composite-n: must be >= 1"):
        build_composites(_pools(), 2, 0)


def _prompt() -> CompositePrompt:
    items = (CompositeItem("capitals", "Capital of France?", "Paris", "exact"),
             CompositeItem("colors", "Sky colour?", "(B)", "accuracy", LABELLED),
             CompositeItem("gsm", "How many?", "#### 1200", "gsm8k_number"))
    return CompositePrompt(0, items, composite_prompt_text([it.question for it in items]))


def test_numbered_answers_hand_cases():
    text = "Sure!\n1. Paris\n\n**2.** The answer is (B)\nsome chatter\n3.\n  1,200 dollars\n2. (A)"
    assert numbered_answers(text, 3) == ["Paris", "The answer is (B)", "1,200 dollars"]  # first "2." wins
    # unnumbered lines answer nothing; a decimal is not a label; numbers beyond N are ignored
    assert numbered_answers("Paris\n(B)\n1200", 3) == [None, None, None]
    assert numbered_answers("1.5 apples\n4. extra\n3) 12", 3) == [None, None, None]
    # an empty numbered line takes the next non-empty line unless that line is itself numbered
    assert numbered_answers("1.\n2. blue", 2) == ["", "blue"]
    assert numbered_answers("", 2) == [None, None]


def test_score_composite_hand_computed():
    p = _prompt()
    s = score_composite("1. Paris\n2. (B)\n3. #### 1200", p)
    assert s.scores == [1.0, 1.0, 1.0] and s.all_correct and s.format_rate == 1.0 and s.item_score == 1.0
    # item 2 wrong, item 3 missing: item score 1/3, not all correct, format 2/3
    s = score_composite("1. paris.\n2. (C)\nI think 1200", p)
    assert s.answers == ["paris.", "(C)", None]
    assert s.scores == [1.0, 0.0, 0.0] and s.item_score == pytest.approx(1 / 3)
    assert not s.all_correct and s.format_rate == pytest.approx(2 / 3)
    # answers out of order are still read by their numbers; item 2 answered by the option's text
    s = score_composite("3. 1200\n1. Paris\n2. blue", p)
    assert s.scores == [1.0, 1.0, 1.0] and s.all_correct
    # nothing numbered: everything missing
    s = score_composite("Paris, blue and 1200.", p)
    assert s.scores == [0.0, 0.0, 0.0] and s.format_rate == 0.0 and not s.all_correct


def test_composite_figures_are_points():
    p = _prompt()
    scored = [score_composite("1. Paris\n2. (B)\n3. 1200", p), score_composite("1. Rome\n2. (B)", p)]
    f = composite_figures(scored)
    assert f["item_score"] == pytest.approx(100 * (1 + 1 / 3) / 2)
    assert f["all_correct"] == pytest.approx(50.0)
    assert f["format_rate"] == pytest.approx(100 * (1 + 2 / 3) / 2)
    with pytest.raises(DLPError, match="no prompts"):
        composite_figures([])
