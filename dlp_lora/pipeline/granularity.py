"""How a row's mixture follows the text: the granularity of routing (DESIGN §4).

* ``prompt``: one routing decision on the whole prompt (what the original code did).
* ``sentence`` (the paper, §3): the prompt is split with the one sentence rule (:mod:`dlp_lora.data`); each
  sentence's tokens are prefilled with that sentence's mixture, decoding starts with the last sentence's, and
  each sentence the row completes in its output is routed and sets the mixture of the tokens that follow.
* ``segment`` (ours, beyond the paper): for a prompt made of numbered items (``1.``, ``2.``, ... at line starts),
  each item is routed on its own; while the model writes answer ``i`` (a line of the output starting with
  ``i.``) the row's mixture is item ``i``'s, before any numbered answer item 1's. The router reads the question
  being answered, not the generated text, which often carries no task signal ("7", "False"). A prompt with no
  numbered items behaves like ``prompt``.

The rule for every granularity: the mixture of an input token is decided by the text up to and including that
token, so the token that completes a boundary (the word after ". ", the "." of "2.") is already fed with the new
mixture. The KV cache is kept: earlier tokens keep the keys and values they were computed with.
"""

from __future__ import annotations

import dataclasses

import torch

from ..data import NUMBERED_ITEM, last_item_number, last_sentence_end, numbered_items, sentence_spans


@dataclasses.dataclass(frozen=True)
class Span:
    """A piece of the prompt with its own mixture."""

    start: int                              # character offset of the piece in the prompt
    text: str                               # what the router reads (an item without its "i." label)


def prompt_spans(prompt: str, granularity: str) -> tuple[list[Span], str]:
    """The pieces of ``prompt`` routed on their own, and the routing records' source for them."""
    if granularity == "sentence":
        spans = [Span(a, prompt[a:b]) for a, b in sentence_spans(prompt)]
        return spans or [Span(0, prompt)], "prompt"
    if granularity == "segment":
        items = [Span(a, NUMBERED_ITEM.sub("", prompt[a:b], count=1).strip() or prompt[a:b])
                 for a, b in numbered_items(prompt)]
        if items:
            return items, "segment"
    return [Span(0, prompt)], "prompt"


class RowMixture:
    """One row's mixture: per prompt span (for the prefill) and for the token being decoded, and how it changes
    with the row's output text."""

    def __init__(self, granularity: str, spans: list[Span], weights: list[torch.Tensor], routed: bool) -> None:
        self.spans = spans
        self.weights = weights                  # (N,) per span
        self.routed = routed                    # False: forced by the caller (no sentence re-routing)
        self.segments = granularity == "segment" and len(weights) > 1
        self.sentences = granularity == "sentence" and routed
        self.current = weights[0] if granularity == "segment" else weights[-1]
        self.item = 1                           # segment: the answer being written (1-based)
        self._sent_start = 0                    # sentence: where the current output sentence starts
        self._line_start = 0                    # segment: start of the line the label scan resumes at
        self._label_end = -1                    # segment: end of the last label acted on

    def follow(self, text: str) -> tuple[bool, str]:
        """After the row's output grew to ``text``: ``(switched, sentence)``. ``switched``: the mixture changed
        (segment: a new answer label); ``sentence``: a completed output sentence for the router to read, "" when
        none (the caller routes it and calls :meth:`set`)."""
        if self.sentences:
            end = last_sentence_end(text, self._sent_start)
            if end < 0:
                return False, ""
            sentence, self._sent_start = text[self._sent_start:end].strip(), end
            return False, sentence
        if self.segments:
            number, end = last_item_number(text, self._line_start)
            # only the text since the last known line start is searched: a decode step stays O(new text)
            self._line_start = text.rfind("\n", self._line_start) + 1 or self._line_start
            if end > self._label_end and 1 <= number <= len(self.weights):
                self._label_end = end
                if number != self.item:
                    self.item, self.current = number, self.weights[number - 1]
                    return True, ""
        return False, ""

    def set(self, weights: torch.Tensor) -> None:
        """The mixture of the tokens that follow (a routed output sentence)."""
        self.current = weights


def prefill_weights(mixtures: list[RowMixture], prompts: list[str], texts: list[str], enc) -> torch.Tensor:
    """Weights of a prefill: ``(B, N)`` when every row has one mixture for its whole prompt, else per token
    ``(B, S, N)``, each token taking the mixture of the span it starts in. Tokens before the first span (a chat
    template's header, left padding: masked anyway) take the first span's, the template's tail the last span's.
    A slow tokenizer without offsets, or a template that rewrites the prompt, gives the row its decode mixture
    for the whole prompt."""
    start = torch.stack([m.current for m in mixtures])
    offsets = enc.get("offset_mapping")
    if offsets is None or all(len(m.weights) == 1 for m in mixtures):
        return start
    pre = start.unsqueeze(1).repeat(1, enc["input_ids"].shape[1], 1)
    for b, m in enumerate(mixtures):
        at = texts[b].rfind(prompts[b])          # the user's text, not a system prompt that may quote it
        if len(m.weights) == 1 or at < 0:
            continue
        starts = torch.tensor([at + s.start for s in m.spans])
        si = (torch.bucketize(offsets[b, :, 0].contiguous(), starts, right=True) - 1).clamp(min=0)
        pre[b] = torch.stack(m.weights)[si]
    return pre
