"""Metric functions of the evaluation (DESIGN §6): MCQ answer extraction, exact / contains match, the GSM8K final
number, BLEU (``sacrebleu``) and ROUGE (``rouge-score``). Free generation is scored, never teacher forcing (the
original code's teacher-forced, character-level BLEU is one of the gaps DESIGN §1 lists).

* ``accuracy``     - MCQ accuracy with answer extraction (:func:`extract_choice`);
* ``exact``        - normalised exact match (:func:`normalize`: strip, casefold, collapse spaces, drop trailing
  ``.,;:!?``);
* ``contains``     - the normalised reference occurs in the normalised prediction;
* ``gsm8k_number`` - the final number (:func:`gsm8k_number`) equals the reference's final number;
* ``bleu_rouge``   - BLEU (``sacrebleu``, corpus level for the task score) plus ROUGE-1/2/L F1 (``rouge-score``);
* ``bleu``, ``rouge1``, ``rouge2``, ``rougeL`` - one of the above alone (for ``--metric task=...`` overrides).

Scales: :func:`score` returns a per-sample value in [0, 1]; :func:`bleu` and :func:`rouge` return the usual
0-100 figures; :func:`task_scores` is in points (0-100).
"""

from __future__ import annotations

import functools
import math
import re
from typing import Sequence

from .config import DLPError, check
from .data import METRICS

SCORE_METRICS = METRICS + ("bleu", "rouge1", "rouge2", "rougeL")
ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")
TEXT_METRICS = ("bleu", "bleu_rouge", *ROUGE_TYPES)      # scored by overlap, not right/wrong

_TRAILING_PUNCT = ".,;:!?"
_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def normalize(text: str) -> str:
    """Text for exact/contains matching: strip, casefold, collapse whitespace, drop trailing ``.,;:!?``."""
    t = " ".join(str(text).split()).casefold()
    return t.rstrip(_TRAILING_PUNCT + " ").strip()


# An option string may carry its own label: "(A) yes", "A. yes", "A) yes", "A: yes".
_OPTION_LABEL = re.compile(r"^\s*(?:\(([A-Za-z])\)|([A-Za-z])[.):])\s*")
# "answer is", "answer:", "answer -", "Answer is option" ... (case-insensitive)
_CUE = re.compile(r"\banswer\b(?:\s+(?:is|would\s+be|will\s+be|=))?\s*(?:[:\-=]\s*)?(?:option\s+)?", re.I)
_PAREN_LETTER = re.compile(r"\(([A-Za-z])\)")
_START_LETTER = re.compile(r"^[\s\"'*`]*(?:option\s+)?([A-Z])(?=$|[.):,;]|\s*$)")
_ONLY_LETTER = re.compile(r"^\s*\(?([A-Za-z])\)?[.]?\s*$")
_BOUND_L = r"(?<![A-Za-z0-9])"
_BOUND_R = r"(?![A-Za-z0-9])"


def _parse_options(choices: Sequence[str]) -> list[tuple[str, str]]:
    """``[(letter, option_text), ...]``: letters from the options' own labels when every option has one,
    else by position (A, B, C ...); option text without its label and trailing punctuation."""
    labelled = [(_OPTION_LABEL.match(c), c) for c in choices]
    use_labels = bool(choices) and all(m is not None for m, _ in labelled)
    out = []
    for i, (m, c) in enumerate(labelled):
        if use_labels:
            letter = (m.group(1) or m.group(2)).upper()
            text = c[m.end():]
        else:
            letter = _LETTERS[i] if i < len(_LETTERS) else ""
            text = c
        out.append((letter, text.strip().rstrip(_TRAILING_PUNCT).strip()))
    return out


def _letter_index(letter: str, options: list[tuple[str, str]]) -> int | None:
    letter = letter.upper()
    for i, (lab, _) in enumerate(options):
        if lab == letter:
            return i
    return None


def _text_hits(text: str, options: list[tuple[str, str]], start: int = 0, anchored: bool = False):
    """``(position, -length, index)`` of every option text found as a whole word/phrase (case-insensitive).
    Single-character option texts are left to the letter rules (they would match articles like "a")."""
    hits = []
    for i, (_, opt) in enumerate(options):
        if len(opt) < 2:
            continue
        pat = re.compile(_BOUND_L + re.escape(opt) + _BOUND_R, re.I)
        m = pat.match(text, start) if anchored else pat.search(text, start)
        if m:
            hits.append((m.start(), -len(opt), i))
    return hits


def _cue_answer(text: str, pos: int, options: list[tuple[str, str]]) -> int | None:
    """The option named right after an answer cue that ends at ``pos``."""
    rest = text[pos:]
    m = re.match(r"\(([A-Za-z])\)", rest)
    if m:
        return _letter_index(m.group(1), options)
    # a bare letter: upper case, or lower case only when nothing but punctuation/end follows ("answer: b")
    m = re.match(r"([A-Z])(?![A-Za-z0-9])|([a-z])(?=\s*$|[.),;:!?\]])", rest)
    if m:
        idx = _letter_index(m.group(1) or m.group(2), options)
        if idx is not None:
            return idx
    hits = _text_hits(text, options, pos, anchored=True)
    if hits:
        return min(hits)[2]
    return None


def _extract_index(text: str, choices: Sequence[str]) -> int | None:
    if not text or not choices:
        return None
    options = _parse_options(choices)
    text = str(text)
    # Rule 1: an explicit answer cue ("The answer is (B).", "answer: b", "Answer: True"); the first cue that
    # names a valid option wins.
    for m in _CUE.finditer(text):
        idx = _cue_answer(text, m.end(), options)
        if idx is not None:
            return idx
    # Rule 2: otherwise the earliest of: "(B)", a bare capital letter at the very start ("B", "B.", "B)"),
    # an option's text as a whole word/phrase (the longest option wins a tie at one position).
    m = _ONLY_LETTER.match(text)
    if m:  # the whole answer is one letter, any case: "b", "(b)", "B."
        return _letter_index(m.group(1), options)
    cands: list[tuple[int, int, int]] = []
    for m in _PAREN_LETTER.finditer(text):
        idx = _letter_index(m.group(1), options)
        if idx is not None:
            cands.append((m.start(), 0, idx))
            break
    m = _START_LETTER.match(text)
    if m:
        idx = _letter_index(m.group(1), options)
        if idx is not None:
            cands.append((m.start(1), 0, idx))
    cands.extend(_text_hits(text, options))
    if not cands:
        return None
    return min(cands)[2]


def extract_choice(text: str, choices: Sequence[str]) -> str | None:
    """The option of ``choices`` that ``text`` answers, or None.

    Options are lettered by their own labels when every option has one ("(A) yes", "A. yes"), else by position
    (A, B, C, ...). Rules, in order:

    1. an explicit answer cue - "answer is", "answer:", "answer is option" (any case) - followed by a
       parenthesised letter "(B)", a capital letter "B", a lower-case letter only when nothing but punctuation
       follows ("answer: b."), or an option's text; the **first** cue naming a valid option wins;
    2. a text that is only one letter, any case ("b", "(b)", "B.");
    3. otherwise the **earliest** of: a parenthesised letter "(B)"; a capital letter at the very start of the
       text ("B", "B.", "B)"); an option's text as a whole word or phrase, case-insensitive (longest option
       on a tie, so "invalid" is never read as "valid").

    Letters outside the options are ignored; single-character option texts are matched only as letters.
    Returns the option string as given in ``choices``.
    """
    idx = _extract_index(text, choices)
    return None if idx is None else list(choices)[idx]


_LETTER_REF = re.compile(r"^\s*\(?([A-Za-z])\)?\s*[.]?\s*$")


def _mcq_correct(prediction: str, reference: str, choices: Sequence[str] | None) -> bool:
    if choices:
        ref = _extract_index(reference, choices)
        if ref is None:  # a reference outside the options: compare its text with the prediction's answer
            return normalize(prediction) == normalize(reference)
        return _extract_index(prediction, choices) == ref
    m = _LETTER_REF.match(reference)
    if m:  # no options known but the reference is a letter: letters only (A..Z)
        letters = list(_LETTERS)
        return _extract_index(prediction, letters) == _extract_index(reference, letters)
    # no options and a free-text reference: the reference is the only option we know about
    return _extract_index(prediction, [reference]) == 0 or normalize(prediction) == normalize(reference)


_NUMBER = re.compile(r"-?\$?\s?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")


def _to_number(s: str) -> float | None:
    s = s.replace("$", "").replace(",", "").replace(" ", "")
    try:
        v = float(s)
    except ValueError:
        return None
    return v if math.isfinite(v) else None


def gsm8k_number(text: str) -> float | None:
    """GSM8K-style final answer: the number after the last ``####`` when present, else the last number in the
    text; thousands commas and ``$`` removed ("$1,200.50" -> 1200.5, "#### 42" -> 42.0). None if no number."""
    text = str(text or "")
    if "####" in text:
        after = text.rsplit("####", 1)[1]
        m = _NUMBER.search(after)
        if m:
            return _to_number(m.group(0))
    nums = _NUMBER.findall(text)
    for n in reversed(nums):
        v = _to_number(n)
        if v is not None:
            return v
    return None


def bleu(preds: Sequence[str] | str, refs: Sequence[str] | str) -> float:
    """BLEU (0-100) with ``sacrebleu`` defaults (13a tokenizer, exp smoothing). Lists -> corpus BLEU; two
    strings -> sentence BLEU."""
    import sacrebleu

    if isinstance(preds, str) and isinstance(refs, str):
        return float(sacrebleu.sentence_bleu(preds, [refs]).score)
    preds, refs = list(preds), list(refs)
    check(len(preds) == len(refs), f"bleu: {len(preds)} predictions for {len(refs)} references")
    if not preds:
        return 0.0
    return float(sacrebleu.corpus_bleu(preds, [refs]).score)


@functools.lru_cache(maxsize=1)
def _rouge_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)


def rouge(preds: Sequence[str] | str, refs: Sequence[str] | str) -> dict[str, float]:
    """Mean ROUGE-1/2/L F1 (0-100) with ``rouge-score`` (Porter stemmer on). Strings or equal-length lists."""
    if isinstance(preds, str) and isinstance(refs, str):
        preds, refs = [preds], [refs]
    preds, refs = list(preds), list(refs)
    check(len(preds) == len(refs), f"rouge: {len(preds)} predictions for {len(refs)} references")
    if not preds:
        return {k: 0.0 for k in ROUGE_TYPES}
    sc = _rouge_scorer()
    tot = {k: 0.0 for k in ROUGE_TYPES}
    for p, r in zip(preds, refs):
        s = sc.score(r, p)  # rouge-score takes (target, prediction)
        for k in ROUGE_TYPES:
            tot[k] += s[k].fmeasure
    return {k: 100.0 * v / len(preds) for k, v in tot.items()}


def score(metric: str, prediction: str, reference: str, choices: Sequence[str] | None = None) -> float:
    """One sample's score in [0, 1] under ``metric`` (see the module doc). ``bleu_rouge``/``bleu`` give
    sentence BLEU / 100; ``rouge*`` the F1."""
    prediction = "" if prediction is None else str(prediction)
    reference = str(reference)
    if metric == "accuracy":
        return float(_mcq_correct(prediction, reference, choices))
    if metric == "exact":
        return float(normalize(prediction) == normalize(reference))
    if metric == "contains":
        ref = normalize(reference)
        return float(bool(ref) and ref in normalize(prediction))
    if metric == "gsm8k_number":
        p, r = gsm8k_number(prediction), gsm8k_number(reference)
        return float(p is not None and r is not None and abs(p - r) <= 1e-6 * max(1.0, abs(r)))
    if metric in ("bleu", "bleu_rouge"):
        return bleu(prediction, reference) / 100.0
    if metric in ROUGE_TYPES:
        return rouge(prediction, reference)[metric] / 100.0
    raise DLPError(f"metric: unknown metric {metric!r} (choose {', '.join(SCORE_METRICS)})")


def task_scores(metric: str, preds: Sequence[str], refs: Sequence[str],
                choices: Sequence[Sequence[str] | None] | None = None) -> dict[str, float]:
    """A task's figures in points (0-100): ``score`` (the primary figure averaged in the tables) plus the
    metric's extras. BLEU tasks use corpus BLEU (sacrebleu's standard), not a mean of sentence BLEU."""
    n = len(preds)
    if n == 0:
        return {"score": 0.0}
    choices = list(choices) if choices is not None else [None] * n
    if metric in TEXT_METRICS:
        out: dict[str, float] = {"bleu": bleu(list(preds), list(refs))}
        out.update(rouge(list(preds), list(refs)))
        out["score"] = out["bleu"] if metric in ("bleu", "bleu_rouge") else out[metric]
        return out
    vals = [score(metric, p, r, c) for p, r, c in zip(preds, refs, choices)]
    return {"score": 100.0 * sum(vals) / n}


def is_correct(metric: str, prediction: str, reference: str, choices: Sequence[str] | None = None) -> bool:
    """Right or wrong, for counts such as a composite prompt's all-items-correct rate: a full :func:`score` for
    right/wrong metrics; for BLEU/ROUGE tasks (no notion of right) the normalised texts must be equal."""
    if metric in TEXT_METRICS:
        return normalize(prediction or "") == normalize(reference)
    return score(metric, prediction, reference, choices) >= 1.0
