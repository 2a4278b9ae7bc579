"""Composite prompts (MeteoRA's composite-n protocol, adapted; DESIGN §6): N questions from N different tasks in
one prompt, numbered ``1.`` .. ``N.``, under one fixed instruction to answer each on its own numbered line. Each
answer is scored with its own task's metric. This is the input the paper's per-sentence routing is meant for, and
where the ``segment`` granularity (each answer on the mixture of its own question) should beat any single adapter.

Prompt layout (a multi-line question keeps its lines as in its test file, so that the router reads the question
as it was trained on)::

    Answer each of the 2 numbered questions below. Reply with exactly 2 lines, one per question, in order: ...
                                                   (the whole of INSTRUCTION, one line)
    1. <question of task A>
    2. <question of task B>
    <second line of question 2>

Item labels follow the one rule of :data:`dlp_lora.data.NUMBERED_ITEM` (``i.`` at a line start, after optional
spaces and ``*`` / ``#`` / ``>`` markdown; ``1.5`` is not a label), the rule the ``segment`` granularity uses to
find the questions in the prompt and the answer being written.

Scoring (:func:`score_composite`): the first output line labelled ``i.`` answers item ``i``. Its answer is the rest
of that line (markdown ``*`` trimmed), or, when that is empty, the next non-empty line unless that one is itself
labelled. An item with no labelled line scores 0 and counts against the format rate.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Mapping, Sequence

from .config import check
from .data import NUMBERED_ITEM
from .metrics import is_correct, score

# The format example uses placeholders, not answers: a sample answer such as "(B)" would bias MCQ items.
INSTRUCTION = ("Answer each of the {n} numbered questions below. Reply with exactly {n} lines, one per question, "
               "in order: each line starts with the question's number and a period, then only the answer to that "
               "question, in the form \"1. <answer>\" on the first line, \"2. <answer>\" on the next, and so on.")


@dataclasses.dataclass(frozen=True)
class CompositeItem:
    """One question of a composite prompt, with what is needed to score its answer."""

    task: str                               # the task the question comes from
    question: str                           # the question text as in the task's test file
    reference: str                          # the reference answer
    metric: str                             # the task's metric (see dlp_lora.metrics)
    choices: tuple | None = None            # MCQ options, when the task has them
    budget: int = 0                         # token budget of its answer (its task's; the scaffold's cap, 0 = none)


@dataclasses.dataclass(frozen=True)
class CompositePrompt:
    """N items from N different tasks and the prompt text that numbers them."""

    index: int                              # position in the generated list (0-based)
    items: tuple                            # the CompositeItems, in prompt order
    prompt: str                             # INSTRUCTION + the numbered questions

    @property
    def tasks(self) -> list[str]:
        return [it.task for it in self.items]


def composite_prompt_text(questions: Sequence[str]) -> str:
    """The fixed instruction, a blank line, then ``1. q1`` .. ``N. qN``."""
    lines = [INSTRUCTION.format(n=len(questions)), ""]
    lines += [f"{i}. {str(q).strip()}" for i, q in enumerate(questions, 1)]
    return "\n".join(lines)


def build_composites(pools: Mapping[str, Sequence[CompositeItem]], n: int, count: int,
                     seed: int = 0) -> list[CompositePrompt]:
    """``count`` prompts of ``n`` items from ``n`` different tasks, the same for a given seed.

    ``pools``: task -> its test items. Each prompt draws ``n`` distinct tasks (``random.Random(seed)``, one
    generator per ``n``); each task hands out its questions in a shuffled order and reshuffles only when all have
    been used, so questions repeat as little as the pool allows."""
    check(isinstance(n, int) and n >= 2, f"--composite: each prompt needs at least 2 questions, got {n!r}")
    check(isinstance(count, int) and count >= 1, f"--composite-n: must be >= 1, got {count!r}")
    tasks = sorted(t for t, pool in pools.items() if pool)
    check(len(tasks) >= n, f"--composite {n}: needs test questions of at least {n} different tasks, "
                           f"got {len(tasks)} ({', '.join(tasks) or 'none'})")
    rng = random.Random(seed * 1000 + n)
    queues: dict[str, list[CompositeItem]] = {t: [] for t in tasks}

    def draw(task: str) -> CompositeItem:
        if not queues[task]:
            queues[task] = list(pools[task])
            rng.shuffle(queues[task])
        return queues[task].pop()

    out = []
    for k in range(count):
        items = tuple(draw(t) for t in rng.sample(tasks, n))
        out.append(CompositePrompt(k, items, composite_prompt_text([it.question for it in items])))
    return out


def numbered_answers(text: str, n: int) -> list[str | None]:
    """The answer to each item ``1..n`` read from ``text`` (see the module doc); None where no line is labelled."""
    text = str(text or "")
    found: list[str | None] = [None] * n
    for m in NUMBERED_ITEM.finditer(text):
        k = int(m.group(1))
        if not 1 <= k <= n or found[k - 1] is not None:
            continue
        end = text.find("\n", m.end())
        answer = text[m.end(): len(text) if end < 0 else end].strip(" \t*")
        if not answer and end >= 0:
            nxt = next((line for line in text[end + 1:].splitlines() if line.strip()), "")
            answer = "" if NUMBERED_ITEM.match(nxt) else nxt.strip()
        found[k - 1] = answer
    return found


@dataclasses.dataclass(frozen=True)
class CompositeScore:
    """How one output did on one composite prompt."""

    answers: list                           # per item: the extracted answer, None when no numbered line
    scores: list                            # per item: its task metric's score in [0, 1] (0 when missing)
    correct: list                           # per item: right or wrong (metrics.is_correct)

    @property
    def item_score(self) -> float:
        return sum(self.scores) / len(self.scores)

    @property
    def all_correct(self) -> bool:
        return all(self.correct)

    @property
    def format_rate(self) -> float:
        return sum(a is not None for a in self.answers) / len(self.answers)


def score_composite(text: str, prompt: CompositePrompt) -> CompositeScore:
    """Each item's answer scored with its own task's metric."""
    answers = numbered_answers(text, len(prompt.items))
    scores, correct = [], []
    for a, it in zip(answers, prompt.items):
        scores.append(0.0 if a is None else score(it.metric, a, it.reference, it.choices))
        correct.append(a is not None and is_correct(it.metric, a, it.reference, it.choices))
    return CompositeScore(answers, scores, correct)


def composite_figures(scored: Sequence[CompositeScore]) -> dict[str, float]:
    """Mean item score, all-items-correct rate and format rate over prompts, in points (0-100)."""
    check(len(scored) > 0, "composite: no prompts scored")
    k = len(scored)
    return {"item_score": 100.0 * sum(s.item_score for s in scored) / k,
            "all_correct": 100.0 * sum(s.all_correct for s in scored) / k,
            "format_rate": 100.0 * sum(s.format_rate for s in scored) / k}
