"""DLP-LoRA test / evaluation (``dlp-lora eval``): the paper's metrics and the comparison loop.

Four systems run on the **same** samples, by free generation through :meth:`DLPPipeline.generate` (batched,
never teacher forcing - the original code's teacher-forced, character-level BLEU is one of the gaps DESIGN §1
lists):

* ``base``    - the base model (all-zero mixture weights);
* ``single``  - the task's own LoRA (one-hot weights on the true task: oracle routing);
* ``dlp``     - DLP-LoRA: the router's probabilities -> top-p selection -> fused mixture (paper §3);
* ``uniform`` - every adapter with weight 1/N (a static merge baseline).

Systems are interleaved per batch (A B C D, then the next batch, with the starting system rotated), so machine
noise is shared and time ratios measured in one run are comparable.

Metrics (all through libraries where one exists):

* ``accuracy``     - MCQ accuracy with answer extraction (:func:`extract_choice`);
* ``exact``        - normalised exact match (:func:`normalize`: strip, casefold, collapse spaces, drop trailing
  ``.,;:!?``);
* ``contains``     - the normalised reference occurs in the normalised prediction;
* ``gsm8k_number`` - the final number (:func:`gsm8k_number`) equals the reference's final number;
* ``bleu_rouge``   - BLEU (``sacrebleu``, corpus level for the task score) plus ROUGE-1/2/L F1 (``rouge-score``);
* ``bleu``, ``rouge1``, ``rouge2``, ``rougeL`` - one of the above alone (for ``--metric task=...`` overrides).

Scales: :func:`score` returns a per-sample value in [0, 1]; :func:`bleu` and :func:`rouge` return the usual
0-100 figures; every table in ``summary.json``/``summary.md`` is in points (0-100).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import math
import os
import re
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from .config import DLPError, atomic_dir, atomic_write_json, atomic_write_text, check
from .data import METRICS, TaskData, read_task, task_files

SYSTEMS = ("base", "single", "dlp", "uniform")
SCORE_METRICS = METRICS + ("bleu", "rouge1", "rouge2", "rougeL")
ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")

# ================================================================================================================
# Metrics
# ================================================================================================================

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


_ROUGE_SCORER = None


def _rouge_scorer():
    global _ROUGE_SCORER
    if _ROUGE_SCORER is None:
        from rouge_score import rouge_scorer

        _ROUGE_SCORER = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    return _ROUGE_SCORER


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
    if metric in ("bleu", "bleu_rouge", *ROUGE_TYPES):
        out: dict[str, float] = {"bleu": bleu(list(preds), list(refs))}
        out.update(rouge(list(preds), list(refs)))
        out["score"] = out["bleu"] if metric in ("bleu", "bleu_rouge") else out[metric]
        return out
    vals = [score(metric, p, r, c) for p, r, c in zip(preds, refs, choices)]
    return {"score": 100.0 * sum(vals) / n}


# ================================================================================================================
# Evaluation config
# ================================================================================================================

@dataclasses.dataclass
class EvalConfig:
    """What ``dlp-lora eval`` ran; saved as ``TestOutputs/<name>/config.json``."""

    systems: list = dataclasses.field(default_factory=lambda: list(SYSTEMS))  # systems compared, in order
    limit: int = 0                          # samples per task (first N of each test file; 0 = all)
    top_p: float = 0.8                      # router top-p threshold for the dlp system (paper §3.2)
    weighting: str = "paper"                # "paper": softmax over kept probs (Eq. 5); "renorm": kept / sum
    granularity: str = "prompt"             # dlp routing: "prompt" (once per request) or "sentence" (paper)
    model_spec: str = ""                    # base model ("" = from the adapters' metadata, else "default")
    max_new_tokens: int = 64                # cap on generated tokens per sample
    auto_budget: bool = True                # per task: min(cap, longest test reference + 16 tokens) - saves CPU
    batch_size: int = 8                     # rows generated together (per system)
    metrics: dict = dataclasses.field(default_factory=dict)  # task -> metric overrides (--metric task=metric)

    def __post_init__(self) -> None:
        self.systems = list(self.systems)
        check(len(self.systems) > 0, "systems: at least one system is needed (choose base, single, dlp, uniform)")
        for s in self.systems:
            check(s in SYSTEMS, f"systems: unknown system {s!r} (choose {', '.join(SYSTEMS)})")
        check(len(set(self.systems)) == len(self.systems), f"systems: listed twice in {self.systems}")
        check(isinstance(self.limit, int) and self.limit >= 0, f"limit must be >= 1 (or 0 = all), got {self.limit!r}")
        check(isinstance(self.top_p, (int, float)) and 0.0 < self.top_p <= 1.0, f"top_p must be in (0, 1], got {self.top_p!r}")
        check(self.weighting in ("paper", "renorm"), f"weighting must be paper|renorm, got {self.weighting!r}")
        check(self.granularity in ("prompt", "sentence"), f"granularity must be prompt|sentence, got {self.granularity!r}")
        check(isinstance(self.max_new_tokens, int) and self.max_new_tokens > 0,
              f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        check(isinstance(self.batch_size, int) and self.batch_size > 0, f"batch_size must be > 0, got {self.batch_size!r}")
        for t, m in self.metrics.items():
            check(m in SCORE_METRICS, f"--metric {t}={m}: unknown metric {m!r} (choose {', '.join(SCORE_METRICS)})")


def parse_systems(spec: str | Iterable[str]) -> list[str]:
    """``"base,dlp"`` or a list -> validated list of system names."""
    items = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else [str(s).strip() for s in spec]
    items = [s for s in items if s]
    EvalConfig(systems=items)  # validates
    return items


def parse_metric_overrides(items: Iterable[str] | dict | None) -> dict[str, str]:
    """``["task=metric", ...]`` -> ``{task: metric}`` (one-line errors for a bad item)."""
    if not items:
        return {}
    if isinstance(items, dict):
        return dict(items)
    out: dict[str, str] = {}
    for it in items:
        task, sep, metric = str(it).partition("=")
        task, metric = task.strip(), metric.strip()
        check(bool(sep and task and metric), f"--metric {it}: expected TASK=METRIC")
        check(metric in SCORE_METRICS, f"--metric {it}: unknown metric {metric!r} (choose {', '.join(SCORE_METRICS)})")
        check(task not in out, f"--metric {it}: task {task!r} given twice")
        out[task] = metric
    return out


# ================================================================================================================
# Evaluation loop
# ================================================================================================================

@dataclasses.dataclass
class _Sample:
    task: str
    index: int
    question: str
    reference: str
    metric: str
    choices: list | None
    budget: int


def _resolve_tests(data, data_dir) -> list[Path]:
    check(not (data and data_dir), "eval: give test files (--data) or a folder (--data-dir), not both")
    if data_dir:
        return task_files(data_dir)
    check(bool(data), "eval: no test data (pass --data TEST.json ... or --data-dir DIR)")
    if isinstance(data, (str, os.PathLike)):
        data = [data]
    return [Path(p) for p in data]


def _adapter_info(run_dir) -> tuple[list[str], dict[str, dict]]:
    """Adapter task names (adapters.txt order) and their dlp_task.json metadata, read without loading a model."""
    from .lora import read_adapter_list, read_task_meta

    dirs = read_adapter_list(run_dir)
    names, metas = [], {}
    for d in dirs:
        meta = read_task_meta(d)
        names.append(meta["task"])
        metas[meta["task"]] = meta
    return names, metas


def _model_from_meta(metas: dict[str, dict]) -> str:
    """The base model the adapters were trained on (dlp_task.json ``base_model``), else ``default``."""
    from .models import default_model_dir

    for meta in metas.values():
        base = meta.get("base_model") or {}
        p = base.get("name_or_path") if isinstance(base, dict) else None
        if p and Path(p).is_dir() and (Path(p) / "config.json").is_file():
            return "default" if Path(p).resolve() == default_model_dir().resolve() else str(p)
    return "default"


def _router_dir(run_dir) -> Path | None:
    if run_dir is None:
        return None
    r = Path(run_dir)
    if r.is_file():  # adapters.txt
        r = r.parent
    r = r / "router"
    return r if r.is_dir() else None


def _train_questions(meta: dict) -> set[str]:
    """Questions of the adapter's training file, when dlp_task.json names one that still exists."""
    f = meta.get("data_file")
    if not f or not Path(f).is_file():
        return set()
    try:
        return {r.question.strip() for r in read_task(f).records}
    except DLPError:
        return set()


def _run_info(run_dir, metas: dict[str, dict]) -> dict:
    """How the run was built, for the report: per adapter the training steps and loss (dlp_task.json) and the
    router's own held-out accuracy (router/metrics.json), when present."""
    adapters = {}
    for name, m in metas.items():
        adapters[name] = {k: m.get(k) for k in ("steps", "loss_start", "loss_end", "train_seconds", "records_used")
                          if m.get(k) is not None}
    router = None
    rd = _router_dir(run_dir)
    if rd is not None and (rd / "metrics.json").is_file():
        try:
            mt = json.loads((rd / "metrics.json").read_text(encoding="utf-8"))
            router = {k: mt.get(k) for k in ("kind", "params", "val_accuracy", "test_accuracy") if k in mt}
        except (OSError, ValueError):
            router = None
    return {"adapters": adapters, "router": router}


def _token_len(tokenizer, text: str) -> int:
    try:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])
    except Exception:  # a tokenizer without __call__ (fake pipelines in tests): a word count is close enough
        return len(text.split())


def _routing_of(result) -> list[dict]:
    r = getattr(result, "routing", None) or []
    return [dict(e) for e in r]


def _routing_stats(entries: list[dict], names: list[str], true_task: str) -> dict:
    """Per-sample routing figures from the pipeline's routing entries (one per routed sentence): the top-1
    task of the mean probabilities over the prompt's sentences, and over every routed sentence the mean number of
    selected adapters and the mean weight on the true task."""
    entries = [e for e in entries if e.get("source") != "forced"]
    if not entries:
        return {"top1": None, "selected": 0.0, "true_weight": 0.0}
    # top-1 on the input (the paper's router accuracy): the prompt's sentences; selection figures: every routed
    # sentence, generated ones included (granularity="sentence" re-routes while generating)
    on_prompt = [e for e in entries if e.get("source", "prompt") == "prompt"] or entries
    probs = {n: 0.0 for n in names}
    sel = 0.0
    tw = 0.0
    for e in on_prompt:
        for k, v in (e.get("probs") or {}).items():
            probs[k] = probs.get(k, 0.0) + float(v) / len(on_prompt)
    for e in entries:
        selected = list(e.get("selected") or [])
        weights = [float(w) for w in (e.get("weights") or [])]
        sel += len(selected) / len(entries)
        if true_task in selected and len(weights) == len(selected):
            tw += weights[selected.index(true_task)] / len(entries)
    top1 = max(probs.items(), key=lambda kv: kv[1])[0] if probs else None
    return {"top1": top1, "selected": sel, "true_weight": tw}


def _fmt(v: Any, nd: int = 2) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if math.isnan(v):
            return "-"
        return f"{v:.{nd}f}"
    return str(v)


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def evaluate(run_dir=None, data=None, data_dir=None, out_dir=None, systems: Sequence[str] | str = SYSTEMS,
             limit: int | None = None, top_p: float = 0.8, weighting: str = "paper", granularity: str = "prompt",
             model_spec: str | None = None, max_new_tokens: int = 64, batch_size: int = 8,
             metrics: dict | Iterable[str] | None = None, auto_budget: bool = True, overwrite: bool = False,
             progress: bool = True, device: str | None = None, dtype: str = "auto", pipeline=None,
             results_md: str | os.PathLike | None = None, results_commands: str | os.PathLike | None = None,
             command: str | None = None) -> dict:
    """Evaluate ``systems`` on the same test samples and write ``out_dir`` (see the module doc).

    ``run_dir``: the run folder (``adapters.txt`` + ``router/``) or an adapters.txt. ``data``: test files (task
    names must match adapter task names), or ``data_dir``: a folder of them. ``limit``: first N samples per
    task. ``pipeline``: an already loaded :class:`DLPPipeline` (then ``run_dir`` is only used for metadata).
    ``results_md``: also write/replace this run's section of a RESULTS.md (with ``command`` and the text of
    ``results_commands``, e.g. the script that built the run). Returns the summary dict (summary.json).
    """
    check(limit is None or (isinstance(limit, int) and limit >= 1), f"limit must be >= 1, got {limit!r}")
    cfg = EvalConfig(systems=parse_systems(systems), limit=int(limit or 0), top_p=float(top_p), weighting=weighting,
                     granularity=granularity, model_spec=str(model_spec or ""), max_new_tokens=int(max_new_tokens),
                     auto_budget=bool(auto_budget), batch_size=int(batch_size), metrics=parse_metric_overrides(metrics))
    check(out_dir is not None, "eval: --out is required")
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:  # refuse before any expensive work
        raise DLPError(f"{out_dir}: already exists (pass --overwrite to replace it)")
    check(run_dir is not None or pipeline is not None, "eval: --run is required")
    if results_commands is not None:
        check(Path(results_commands).is_file(), f"{results_commands}: --results-commands file not found")
    if results_md is not None:  # check before the expensive work, not after it
        parent = Path(results_md).resolve().parent
        check(parent.is_dir(), f"{results_md}: --results-md folder {parent} not found (or not a folder)")
        check(not Path(results_md).is_dir(), f"{results_md}: --results-md is a folder, expected a Markdown file")

    # ---- test data --------------------------------------------------------------------------------------------
    files = _resolve_tests(data, data_dir)
    tasks: list[TaskData] = []
    seen: dict[str, str] = {}
    for f in files:
        t = read_task(f)
        if t.name in seen:
            raise DLPError(f"{f}: field 'task': task {t.name!r} also given by {seen[t.name]}")
        seen[t.name] = str(f)
        tasks.append(t)
    for t in cfg.metrics:
        check(t in seen, f"--metric {t}={cfg.metrics[t]}: no test file for task {t!r} (tasks: {', '.join(seen)})")

    # ---- adapters / router --------------------------------------------------------------------------------------
    if pipeline is not None:
        names = list(pipeline.names)
        metas: dict[str, dict] = {}
        if run_dir is not None:  # metadata (metric, choices, base model) when the run folder has it
            try:
                metas = _adapter_info(run_dir)[1]
            except DLPError:
                metas = {}
    else:
        names, metas = _adapter_info(run_dir)
    check(len(names) > 0, f"{run_dir}: no adapters")
    need_adapter = [s for s in cfg.systems if s in ("single", "dlp")]
    if need_adapter:
        for t in tasks:
            check(t.name in names, f"{t.path}: task {t.name!r} has no adapter in {run_dir} (adapters: "
                                   f"{', '.join(names)}); systems {'/'.join(need_adapter)} need one")
    router_dir = _router_dir(run_dir)
    if "dlp" in cfg.systems and pipeline is None:
        check(router_dir is not None, f"{run_dir}: no router/ folder (train one with dlp-lora train-router, "
                                      f"or drop 'dlp' from --systems)")

    # metric per task: --metric override > the test file's metadata > the adapter's dlp_task.json
    task_metric: dict[str, str] = {}
    task_choices: dict[str, list | None] = {}
    for t in tasks:
        meta = metas.get(t.name, {})
        m = cfg.metrics.get(t.name)
        if m is None:
            m = t.metric
            # read_task falls back to "exact" when the file says nothing; then trust the adapter's metadata
            if m == "exact" and meta.get("metric") in SCORE_METRICS:
                m = meta["metric"]
        task_metric[t.name] = m
        task_choices[t.name] = t.choices or meta.get("choices") or None

    # ---- model -------------------------------------------------------------------------------------------------
    if pipeline is None:
        from .pipeline import DLPPipeline

        spec = cfg.model_spec or _model_from_meta(metas)
        cfg.model_spec = spec
        pipeline = DLPPipeline.from_pretrained(spec, adapters=run_dir,
                                               router=router_dir if "dlp" in cfg.systems else None,
                                               device=device, dtype=dtype)
        check(list(pipeline.names) == names, f"{run_dir}: adapters loaded {list(pipeline.names)} differ from adapters.txt {names}")
    if "dlp" in cfg.systems:
        check(getattr(pipeline, "router", None) is not None, f"{run_dir}: the pipeline has no router; 'dlp' needs one")
    tok = getattr(pipeline, "tokenizer", None)

    # ---- samples (the same for every system) -------------------------------------------------------------------
    # Leakage guard: a test question that is also in the adapter's training file (dlp_task.json data_file) is
    # dropped and counted, so scores are never measured on training questions.
    seen_in_train: dict[str, int] = {}
    samples: list[_Sample] = []
    for t in tasks:
        recs = t.records
        train_q = _train_questions(metas.get(t.name, {}))
        if train_q:
            kept = [r for r in recs if r.question.strip() not in train_q]
            seen_in_train[t.name] = len(recs) - len(kept)
            check(len(kept) > 0, f"{t.path}: every test question of task {t.name!r} is in the adapter's training "
                                 f"file {metas[t.name].get('data_file')} (empty test set)")
            recs = kept
        recs = recs[: cfg.limit] if cfg.limit else recs
        budget = cfg.max_new_tokens
        if cfg.auto_budget:
            longest = max(_token_len(tok, r.answer) for r in recs)
            budget = min(cfg.max_new_tokens, max(16, longest + 16))
        for i, r in enumerate(recs):
            samples.append(_Sample(t.name, i, r.question, r.answer, task_metric[t.name],
                                   list(r.choices) if r.choices else task_choices[t.name], budget))
    check(len(samples) > 0, "eval: empty test set")

    import torch

    n_ad = len(names)
    index = {n: i for i, n in enumerate(names)}

    def weights_for(system: str, batch: list[_Sample]):
        if system == "base":
            return torch.zeros(len(batch), n_ad)
        if system == "uniform":
            return torch.full((len(batch), n_ad), 1.0 / n_ad)
        if system == "single":
            w = torch.zeros(len(batch), n_ad)
            for j, s in enumerate(batch):
                w[j, index[s.task]] = 1.0
            return w
        return None  # dlp: routed

    def run_system(system: str, batch: list[_Sample], budgets: list[int]):
        kw: dict[str, Any] = dict(weights=weights_for(system, batch), max_new_tokens=budgets, temperature=0.0,
                                  chat=True, batch_size=len(batch))
        if system == "dlp":
            kw.update(top_p=cfg.top_p, weighting=cfg.weighting, granularity=cfg.granularity)
        else:
            kw.update(granularity="prompt")
        return pipeline.generate([s.question for s in batch], **kw)

    # warm-up (lazy init, allocator) so the first timed batch is not penalised; not timed, not scored
    warm = samples[: min(len(samples), cfg.batch_size)]
    for system in cfg.systems:
        run_system(system, warm, [2] * len(warm))

    from tqdm.auto import tqdm

    bars = {s: tqdm(total=len(samples), desc=f"eval {s}", position=i, leave=True, disable=not progress,
                    file=sys.stderr)
            for i, s in enumerate(cfg.systems)}
    outputs: dict[str, list] = {s: [None] * len(samples) for s in cfg.systems}
    timing = {s: {"seconds": 0.0, "completion_tokens": 0, "prompt_tokens": 0} for s in cfg.systems}
    try:
        for b, start in enumerate(range(0, len(samples), cfg.batch_size)):
            batch = samples[start: start + cfg.batch_size]
            budgets = [s.budget for s in batch]
            k = b % len(cfg.systems)  # rotate which system goes first so no system always runs on a cold cache
            for system in cfg.systems[k:] + cfg.systems[:k]:
                t0 = time.perf_counter()
                res = run_system(system, batch, budgets)
                dt = time.perf_counter() - t0
                check(len(res) == len(batch), f"pipeline returned {len(res)} results for {len(batch)} prompts")
                timing[system]["seconds"] += dt
                for j, r in enumerate(res):
                    outputs[system][start + j] = r
                    timing[system]["completion_tokens"] += int(getattr(r, "completion_tokens", 0) or 0)
                    timing[system]["prompt_tokens"] += int(getattr(r, "prompt_tokens", 0) or 0)
                bars[system].update(len(batch))
    finally:
        for bar in bars.values():
            bar.close()

    # ---- scores ------------------------------------------------------------------------------------------------
    per_task: dict[str, dict[str, dict]] = {}
    for t in tasks:
        idx = [i for i, s in enumerate(samples) if s.task == t.name]
        per_task[t.name] = {}
        for system in cfg.systems:
            preds = [outputs[system][i].text for i in idx]
            refs = [samples[i].reference for i in idx]
            ch = [samples[i].choices for i in idx]
            per_task[t.name][system] = task_scores(task_metric[t.name], preds, refs, ch)
    sample_scores = {s: [score(x.metric, outputs[s][i].text, x.reference, x.choices) for i, x in enumerate(samples)]
                     for s in cfg.systems}

    def group(metric_ok: Callable[[str], bool]) -> list[str]:
        return [t.name for t in tasks if metric_ok(task_metric[t.name])]

    mcq = group(lambda m: m == "accuracy")
    qa = group(lambda m: m != "accuracy")
    text_qa = group(lambda m: m in ("bleu", "bleu_rouge", *ROUGE_TYPES))
    averages: dict[str, dict] = {}
    for system in cfg.systems:
        a: dict[str, Any] = {
            "mcq": _mean([per_task[t][system]["score"] for t in mcq]),
            "qa": _mean([per_task[t][system]["score"] for t in qa]),
            "overall": _mean([per_task[t][system]["score"] for t in per_task]),
        }
        for k in ("bleu", *ROUGE_TYPES):
            a[f"qa_{k}"] = _mean([per_task[t][system][k] for t in text_qa])
        averages[system] = a

    # ---- routing report ----------------------------------------------------------------------------------------
    routing: dict[str, Any] | None = None
    sample_routing: list[dict] = [{} for _ in samples]
    if "dlp" in cfg.systems:
        conf = [[0] * n_ad for _ in names]
        per: dict[str, dict[str, list]] = {}
        for i, s in enumerate(samples):
            entries = _routing_of(outputs["dlp"][i])
            st = _routing_stats(entries, names, s.task)
            sample_routing[i] = {"top1": st["top1"], "n_selected": st["selected"], "true_weight": st["true_weight"],
                                 "entries": entries}
            d = per.setdefault(s.task, {"correct": [], "selected": [], "true_weight": []})
            d["correct"].append(float(st["top1"] == s.task))
            d["selected"].append(st["selected"])
            d["true_weight"].append(st["true_weight"])
            if s.task in index and st["top1"] in index:
                conf[index[s.task]][index[st["top1"]]] += 1
        allc = [c for d in per.values() for c in d["correct"]]
        routing = {
            "accuracy": 100.0 * _mean(allc),
            "mean_selected": _mean([c for d in per.values() for c in d["selected"]]),
            "mean_true_weight": _mean([c for d in per.values() for c in d["true_weight"]]),
            "per_task": {t: {"accuracy": 100.0 * _mean(d["correct"]), "mean_selected": _mean(d["selected"]),
                             "mean_true_weight": _mean(d["true_weight"])} for t, d in per.items()},
            "confusion": {"labels": names, "rows": "true task", "columns": "top-1 routed task", "matrix": conf},
            "top_p": cfg.top_p, "weighting": cfg.weighting, "granularity": cfg.granularity,
        }

    # ---- timing ------------------------------------------------------------------------------------------------
    n = len(samples)
    for system, tm in timing.items():
        tm["samples"] = n
        tm["seconds_per_sample"] = tm["seconds"] / n
        tm["tokens_per_s"] = tm["completion_tokens"] / tm["seconds"] if tm["seconds"] > 0 else None
        tm["seconds_per_token"] = tm["seconds"] / tm["completion_tokens"] if tm["completion_tokens"] else None
    for system, tm in timing.items():
        for ref in ("base", "single"):
            if ref in timing:
                r = timing[ref]
                tm[f"ratio_to_{ref}"] = tm["seconds_per_sample"] / r["seconds_per_sample"] if r["seconds_per_sample"] else None
                tm[f"token_ratio_to_{ref}"] = (tm["seconds_per_token"] / r["seconds_per_token"]
                                               if tm["seconds_per_token"] and r["seconds_per_token"] else None)

    # ---- target check (issue: DLP-LoRA within 0.5 points of single on average, above uniform and base) --------
    target = None
    if "dlp" in averages:
        d = averages["dlp"]["overall"]
        target = {"dlp_overall": d}
        for other in ("single", "uniform", "base"):
            if other in averages:
                target[f"dlp_minus_{other}"] = d - averages[other]["overall"]
        checks = []
        if "single" in averages:
            checks.append(target["dlp_minus_single"] >= -0.5)
        for other in ("uniform", "base"):
            if other in averages:
                checks.append(target[f"dlp_minus_{other}"] > 0)
        target["met"] = bool(checks) and all(checks)

    try:
        model_id = pipeline_model_identity(pipeline)
    except Exception:
        model_id = {}
    summary = {
        "created": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "run": str(run_dir) if run_dir is not None else None,
        "model": cfg.model_spec or None,
        "model_identity": model_id,
        "adapters": names,
        "systems": cfg.systems,
        "n_samples": n,
        "dropped_seen_in_training": seen_in_train,
        "run_info": _run_info(run_dir, metas),
        "tasks": [{"task": t.name, "file": str(Path(t.path).resolve()) if t.path else "", "metric": task_metric[t.name],
                   "n": sum(1 for s in samples if s.task == t.name), "has_adapter": t.name in index,
                   "group": "mcq" if task_metric[t.name] == "accuracy" else "qa"} for t in tasks],
        "per_task": per_task,
        "averages": averages,
        "routing": routing,
        "timing": timing,
        "target": target,
        "command": command,
        "config": dataclasses.asdict(cfg),
    }

    # ---- write TestOutputs/<name>/ atomically ------------------------------------------------------------------
    md = summary_markdown(summary)
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        with open(tmp / "predictions.jsonl", "w", encoding="utf-8") as f:
            for i, s in enumerate(samples):
                row = {"task": s.task, "index": s.index, "prompt": s.question, "reference": s.reference,
                       "metric": s.metric, "choices": s.choices,
                       "outputs": {sy: outputs[sy][i].text for sy in cfg.systems},
                       "scores": {sy: sample_scores[sy][i] for sy in cfg.systems},
                       "completion_tokens": {sy: getattr(outputs[sy][i], "completion_tokens", None) for sy in cfg.systems},
                       "finish_reason": {sy: getattr(outputs[sy][i], "finish_reason", None) for sy in cfg.systems},
                       "routing": sample_routing[i] if routing is not None else None}
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        atomic_write_json(tmp / "summary.json", summary)
        atomic_write_text(tmp / "summary.md", md)
        atomic_write_json(tmp / "config.json", dataclasses.asdict(cfg))
        _plots(summary, tmp / "plots")
    if results_md:
        write_results_md(results_md, out_dir, summary, md, results_commands)
    return summary


def pipeline_model_identity(pipeline) -> dict:
    from .models import model_identity

    return model_identity(pipeline.model)


# ================================================================================================================
# Reports: Markdown, plots, RESULTS.md
# ================================================================================================================

def summary_markdown(summary: dict) -> str:
    """The summary as Markdown tables (the same text is summary.md and is printed by the CLI)."""
    systems = summary["systems"]
    lines = [f"### Scores per task (points, 0-100; {summary['n_samples']} samples, same for every system)", "",
             "| task | metric | n | " + " | ".join(systems) + " |",
             "|---|---|---:|" + "---:|" * len(systems)]
    for t in summary["tasks"]:
        row = summary["per_task"][t["task"]]
        lines.append(f"| {t['task']} | {t['metric']} | {t['n']} | " +
                     " | ".join(_fmt(row[s]["score"], 1) for s in systems) + " |")
    dropped = {t: k for t, k in (summary.get("dropped_seen_in_training") or {}).items() if k}
    if dropped:
        lines += ["", "Test questions also present in the adapter's training file were dropped: " +
                  ", ".join(f"{t} {k}" for t, k in dropped.items()) + "."]
    lines += ["", "### Averages", "", "| average | " + " | ".join(systems) + " |", "|---|" + "---:|" * len(systems)]
    av = summary["averages"]
    labels = [("mcq", "MCQ accuracy"), ("qa", "QA score"), ("overall", "overall"), ("qa_bleu", "QA BLEU"),
              ("qa_rouge1", "QA ROUGE-1"), ("qa_rouge2", "QA ROUGE-2"), ("qa_rougeL", "QA ROUGE-L")]
    for key, label in labels:
        if all(av[s].get(key) is None for s in systems):
            continue
        lines.append(f"| {label} | " + " | ".join(_fmt(av[s].get(key), 2) for s in systems) + " |")
    tg = summary.get("target")
    if tg:
        parts = [f"DLP-LoRA overall {tg['dlp_overall']:.2f}"]
        for other in ("single", "uniform", "base"):
            if f"dlp_minus_{other}" in tg:
                parts.append(f"{tg[f'dlp_minus_{other}']:+.2f} vs {other}")
        lines += ["", f"Target (within 0.5 points of single, above uniform and base): "
                      f"**{'met' if tg['met'] else 'not met'}** - " + ", ".join(parts) + "."]
    r = summary.get("routing")
    if r:
        lines += ["", f"### Routing (dlp: top_p={r['top_p']}, weighting={r['weighting']}, granularity={r['granularity']})", "",
                  "| task | routing accuracy % | mean selected adapters | mean weight on true task |",
                  "|---|---:|---:|---:|"]
        for t, d in r["per_task"].items():
            lines.append(f"| {t} | {_fmt(d['accuracy'], 1)} | {_fmt(d['mean_selected'], 2)} | {_fmt(d['mean_true_weight'], 3)} |")
        lines.append(f"| **all** | {_fmt(r['accuracy'], 1)} | {_fmt(r['mean_selected'], 2)} | {_fmt(r['mean_true_weight'], 3)} |")
    tm = summary["timing"]
    lines += ["", "### Time (same run, systems interleaved per batch)", "",
              "Time per generated token includes the prompt's prefill, so a system that stops early (short answers) "
              "pays more per token; compare systems that generate the same number of tokens (e.g. single vs dlp), "
              "or use `dlp-lora bench` for fixed-length ratios.", "",
              "| system | s/sample | tokens/s | gen. tokens | time/token vs base | time/token vs single | time/sample vs base |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for s in systems:
        d = tm[s]
        lines.append(f"| {s} | {_fmt(d['seconds_per_sample'], 3)} | {_fmt(d['tokens_per_s'], 1)} | {d['completion_tokens']} | "
                     f"{_fmt(d.get('token_ratio_to_base'), 2)} | {_fmt(d.get('token_ratio_to_single'), 2)} | "
                     f"{_fmt(d.get('ratio_to_base'), 2)} |")
    info = summary.get("run_info") or {}
    ad = {t: d for t, d in (info.get("adapters") or {}).items() if d}
    if ad:
        lines += ["", "### How the run was built (from dlp_task.json / router/metrics.json)", "",
                  "| adapter | steps | records used | loss start | loss end | train s |", "|---|---:|---:|---:|---:|---:|"]
        for t, d in ad.items():
            lines.append(f"| {t} | {_fmt(d.get('steps'))} | {_fmt(d.get('records_used'))} | {_fmt(d.get('loss_start'), 3)} | "
                         f"{_fmt(d.get('loss_end'), 3)} | {_fmt(d.get('train_seconds'), 0)} |")
    rt = info.get("router")
    if rt:
        lines += ["", "Router: " + ", ".join(f"{k} {_fmt(v, 4)}" for k, v in rt.items()) + "."]
    return "\n".join(lines) + "\n"


def _plots(summary: dict, folder: Path) -> None:
    """plots/scores.png, plots/routing_confusion.png (dlp only), plots/time_ratios.png (matplotlib Agg)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    systems = summary["systems"]
    tasks = [t["task"] for t in summary["tasks"]]

    fig, ax = plt.subplots(figsize=(max(6.0, 0.7 * len(tasks) * max(1, len(systems)) / 2 + 2), 4.5))
    width = 0.8 / max(1, len(systems))
    for k, s in enumerate(systems):
        xs = [i + (k - (len(systems) - 1) / 2) * width for i in range(len(tasks))]
        ax.bar(xs, [summary["per_task"][t][s]["score"] for t in tasks], width, label=s)
    ax.set_xticks(range(len(tasks)))
    ax.set_xticklabels(tasks, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("score (points)")
    ax.set_title("Score per task by system")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(folder / "scores.png", dpi=100)
    plt.close(fig)

    r = summary.get("routing")
    if r:
        labels = r["confusion"]["labels"]
        mat = r["confusion"]["matrix"]
        norm = [[v / max(1, sum(row)) for v in row] for row in mat]
        fig, ax = plt.subplots(figsize=(max(4.0, 0.45 * len(labels) + 2), max(3.5, 0.45 * len(labels) + 1.5)))
        im = ax.imshow(norm, vmin=0.0, vmax=1.0, cmap="Blues")
        ax.set_xticks(range(len(labels)))
        ax.set_yticks(range(len(labels)))
        ax.set_xticklabels(labels, rotation=90, fontsize=7)
        ax.set_yticklabels(labels, fontsize=7)
        ax.set_xlabel("top-1 routed task")
        ax.set_ylabel("true task")
        ax.set_title(f"Routing confusion (accuracy {r['accuracy']:.1f}%)")
        fig.colorbar(im, ax=ax, fraction=0.046)
        fig.tight_layout()
        fig.savefig(folder / "routing_confusion.png", dpi=100)
        plt.close(fig)

    tm = summary["timing"]
    refs = [ref for ref in ("base", "single") if ref in tm]
    fig, ax = plt.subplots(figsize=(6, 4))
    width = 0.8 / max(1, len(refs))
    for k, ref in enumerate(refs):
        xs = [i + (k - (len(refs) - 1) / 2) * width for i in range(len(systems))]
        ax.bar(xs, [tm[s].get(f"token_ratio_to_{ref}") or 0.0 for s in systems], width, label=f"vs {ref}")
    ax.axhline(1.0, color="gray", lw=0.8, ls="--")
    ax.set_xticks(range(len(systems)))
    ax.set_xticklabels(systems)
    ax.set_ylabel("time per generated token (ratio)")
    ax.set_title("Time ratios (same run)")
    if refs:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(folder / "time_ratios.png", dpi=100)
    plt.close(fig)


def write_results_md(path, out_dir, summary: dict, md: str, commands_file=None) -> Path:
    """Write (or replace) this evaluation's section of a RESULTS.md; other sections are kept. The section holds
    the exact eval command, the commands file given (e.g. scripts/results.sh) and the summary tables."""
    path = Path(path)
    name = Path(out_dir).name
    begin, end = f"<!-- dlp-lora eval: {name} -->", f"<!-- end dlp-lora eval: {name} -->"
    head = "# DLP-LoRA results\n\nWritten by `dlp-lora eval --results-md` (one section per evaluation; not edited by hand).\n"
    old = path.read_text(encoding="utf-8") if path.is_file() else head
    sec = [begin, f"## {name}", "",
           f"Model: `{summary.get('model')}` · run: `{summary.get('run')}` · adapters: {len(summary['adapters'])} · "
           f"written {summary['created']} · output: `{out_dir}`", ""]
    if summary.get("command"):
        sec += ["Evaluation command:", "", "```bash", summary["command"], "```", ""]
    if commands_file:
        cf = Path(commands_file)
        check(cf.is_file(), f"{cf}: --results-commands file not found")
        sec += [f"Commands that built this run (`{cf}`):", "", "```bash", cf.read_text(encoding="utf-8").rstrip(), "```", ""]
    sec += [md.rstrip(), "", end]
    block = "\n".join(sec)
    if begin in old and end in old:
        pre, rest = old.split(begin, 1)
        post = rest.split(end, 1)[1]
        text = pre + block + post
    else:
        text = old.rstrip() + "\n\n" + block + "\n"
    atomic_write_text(path, text)
    return path


def command_line(argv: Sequence[str] | None = None) -> str:
    """``dlp-lora ARGS`` as a copy-pasteable shell line (recorded in summary.json and RESULTS.md)."""
    return "dlp-lora " + shlex.join(list(argv if argv is not None else sys.argv[1:]))
