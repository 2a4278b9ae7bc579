"""The answer scaffold (ours, beyond the paper): numbered labels written into a row's output by force, for
composite prompts answered by models that answer one question and stop.

Label 1 is forced before anything is generated. Answer ``i`` ends at its first line break after some text, at
EOS, or after its own token cap; then label ``i+1`` is forced (on a new line when the answer did not end with
one). After the last answer the row ends. EOS is never fed to the model while labels remain: the next label's
first token takes its place. An answer is never empty: EOS is banned until it has some text (vLLM's
``min_tokens``, per answer), since an adapter trained answer-first may end right after a label it never saw.
Forced tokens go through the row's text like generated ones, so the ``segment`` granularity switches to item
``i``'s mixture exactly at label ``i``.

Why: task LoRAs trained on one bare answer followed by EOS answer the first question of a composite prompt and
stop (the free protocol then measures the answer format, not routing). The scaffold asks every system the same
N questions in turn, inside one generation that keeps its KV cache.
"""

from __future__ import annotations

import collections
from typing import Callable, Sequence


class AnswerScaffold:
    """One row's scaffold: which label comes next, which tokens are forced, and when an answer is over."""

    def __init__(self, labels: Sequence[str], caps: Sequence[int], encode: Callable[[str], list[int]]) -> None:
        self.labels = list(labels)
        self.caps = list(caps) or [0] * len(self.labels)   # 0: no cap of its own (the row's max_new_tokens)
        self.encode = encode
        self.item = 0                           # the answer being written (0-based)
        self.forced = collections.deque(encode(self.labels[0]))
        self.forcing = False                    # the token taken in this step is a forced one
        self.generated = 0                      # tokens the model generated in this answer
        self.answer_from = 0                    # where this answer's text starts in the row's text

    def bans_eos(self, text: str) -> bool:
        """Whether EOS is banned at this step: the current answer has no text yet."""
        return not self.forced and not text[self.answer_from:].strip()

    def choose(self, token: int, eos_ids) -> int:
        """The token the row takes: the next forced one; else the model's, unless it is EOS while labels remain."""
        if not self.forced and token in eos_ids and self.item + 1 < len(self.labels):
            self._next(text_ends_line=False)
        self.forcing = bool(self.forced)
        return self.forced[0] if self.forcing else token

    def took(self, text: str) -> str | None:
        """After the row took this step's token and its text grew to ``text``: None to go on, else the finish
        reason of the row ("stop": the last answer's line ended; "length": its cap)."""
        if self.forcing:
            self.forced.popleft()
            if not self.forced:
                self.answer_from, self.generated = len(text), 0
            return None
        self.generated += 1
        ended_line = "\n" in text[self.answer_from:].lstrip()      # a line break after some text
        capped = 0 < self.caps[self.item] <= self.generated
        if not (ended_line or capped):
            return None
        if self.item + 1 >= len(self.labels):
            return "stop" if ended_line else "length"
        self._next(text_ends_line=text.endswith("\n"))
        return None

    def _next(self, text_ends_line: bool) -> None:
        self.item += 1
        self.forced.extend(self.encode(("" if text_ends_line else "\n") + self.labels[self.item]))
