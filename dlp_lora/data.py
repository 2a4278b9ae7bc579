"""Task Q/A data: read and validate the seed's DictList JSON, the input/output variant and JSON Lines;
per-task metadata (metric, MCQ choices); prompt formatting; sentence splitting.

Accepted files (one task per file, task name = file stem unless the file says otherwise):

* ``[{"Q": "...", "A": "..."}, ...]`` - the seed's DictList (``input``/``output`` keys also accepted);
* ``{"task": "name", "metric": "accuracy", "choices": [...], "data": [{"Q": ..., "A": ...}, ...]}``;
* JSON Lines, one record per line.

Per-file metadata may also sit in a sidecar ``<stem>.meta.json`` (``{"task", "metric", "choices"}``).
Records may carry an optional ``task`` and ``choices`` (list of option strings, for MCQ).
Every problem raises :class:`DLPError` with one line naming the file, the record index and the field.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Iterable

from .config import DLPError, atomic_write_json

METRICS = ("accuracy", "exact", "contains", "bleu_rouge", "gsm8k_number")
KEY_STYLES = (("Q", "A"), ("input", "output"))
TASK_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
FILE_SUFFIXES = (".json", ".jsonl")


@dataclasses.dataclass
class QARecord:
    """One question/answer pair."""

    question: str                           # the prompt text (the seed's "Q")
    answer: str                             # the reference answer (the seed's "A")
    task: str = ""                          # task name (the file's task unless the record says otherwise)
    choices: list[str] | None = None        # MCQ options, when the task is multiple-choice

    def to_json(self) -> dict:
        d: dict[str, Any] = {"Q": self.question, "A": self.answer}
        if self.choices:
            d["choices"] = list(self.choices)
        return d


@dataclasses.dataclass
class TaskData:
    """One task's records and metadata."""

    name: str                               # task name (file stem or the file's "task")
    records: list[QARecord]                 # the Q/A records, in file order
    metric: str = "exact"                   # how answers are scored (see METRICS)
    choices: list[str] | None = None        # task-wide MCQ options (records may override)
    path: str = ""                          # the file it came from ("" when built in memory)

    def __post_init__(self) -> None:
        if not TASK_NAME_RE.match(self.name or ""):
            raise DLPError(f"{self.path or '<memory>'}: task name {self.name!r} must match {TASK_NAME_RE.pattern}")
        if self.metric not in METRICS:
            raise DLPError(f"{self.path or '<memory>'}: field 'metric': unknown metric {self.metric!r} "
                           f"(choose {', '.join(METRICS)})")

    @property
    def is_mcq(self) -> bool:
        return self.metric == "accuracy"


# ----------------------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------------------

def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    seen: dict[str, Any] = {}
    for k, v in pairs:
        if k in seen:
            raise _DuplicateKey(k)
        seen[k] = v
    return seen


class _DuplicateKey(Exception):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _loads(text: str, where: str) -> Any:
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates)
    except _DuplicateKey as e:
        raise DLPError(f"{where}: field {e.key!r}: duplicate key") from None
    except json.JSONDecodeError as e:
        raise DLPError(f"{where}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None


def _read_text(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DLPError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise DLPError(f"{path}: is a folder, expected a .json or .jsonl file") from None
    except OSError as e:
        raise DLPError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DLPError(f"{path}: not UTF-8 text (bad byte at offset {e.start})") from None
    if not text.strip():
        raise DLPError(f"{path}: file is empty")
    return text


def _parse_record(obj: Any, where: str, task: str) -> QARecord:
    if not isinstance(obj, dict):
        raise DLPError(f"{where}: expected an object with Q/A fields, got {type(obj).__name__}")
    styles = [s for s in KEY_STYLES if s[0] in obj or s[1] in obj]
    if len(styles) > 1:
        raise DLPError(f"{where}: field 'Q'/'input': both key styles present (use Q/A or input/output, not both)")
    qk, ak = styles[0] if styles else KEY_STYLES[0]
    values = []
    for key in (qk, ak):
        if key not in obj:
            raise DLPError(f"{where}: field {key!r}: missing")
        v = obj[key]
        if not isinstance(v, str):
            raise DLPError(f"{where}: field {key!r}: must be a string, got {type(v).__name__}")
        if not v.strip():
            raise DLPError(f"{where}: field {key!r}: is empty")
        values.append(v)
    rec_task = obj.get("task", task)
    if not isinstance(rec_task, str) or not TASK_NAME_RE.match(rec_task):
        raise DLPError(f"{where}: field 'task': must be a task name matching {TASK_NAME_RE.pattern}")
    choices = obj.get("choices")
    if choices is not None:
        if not (isinstance(choices, list) and choices and all(isinstance(c, str) and c.strip() for c in choices)):
            raise DLPError(f"{where}: field 'choices': must be a non-empty list of non-empty strings")
    return QARecord(values[0], values[1], rec_task, choices)


def _load_meta(path: Path) -> dict:
    side = path.with_name(path.name.rsplit(".", 1)[0] + ".meta.json")
    if not side.is_file():
        return {}
    meta = _loads(_read_text(side), str(side))
    if not isinstance(meta, dict):
        raise DLPError(f"{side}: expected a JSON object with task/metric/choices")
    return meta


def read_task(path: str | os.PathLike, task: str | None = None, metric: str | None = None) -> TaskData:
    """Read and validate one task file. ``task``/``metric`` override what the file says."""
    path = Path(path)
    text = _read_text(path)
    meta = _load_meta(path)
    items: list[tuple[str, Any]]
    if path.suffix == ".jsonl":
        items = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if line.strip():
                items.append((f"{path}: record {len(items)} (line {lineno})", _loads(line, f"{path}: line {lineno}")))
    else:
        top = _loads(text, str(path))
        if isinstance(top, dict):
            data = top.get("data", top.get("records"))
            if data is None:
                raise DLPError(f"{path}: field 'data': missing (an object file needs a 'data' list of records)")
            meta = {**meta, **{k: v for k, v in top.items() if k not in ("data", "records")}}
            top = data
        if not isinstance(top, list):
            raise DLPError(f"{path}: expected a JSON list of {{\"Q\", \"A\"}} records, got {type(top).__name__}")
        items = [(f"{path}: record {i}", obj) for i, obj in enumerate(top)]
    if not items:
        raise DLPError(f"{path}: no records")
    name = task or meta.get("task") or path.name.rsplit(".", 1)[0]
    if not isinstance(name, str) or not TASK_NAME_RE.match(name):
        raise DLPError(f"{path}: field 'task': task name {name!r} must match {TASK_NAME_RE.pattern}")
    records = [_parse_record(obj, where, name) for where, obj in items]
    choices = meta.get("choices")
    if choices is not None and not (isinstance(choices, list) and all(isinstance(c, str) for c in choices)):
        raise DLPError(f"{path}: field 'choices': must be a list of strings")
    m = metric or meta.get("metric") or ("accuracy" if choices or any(r.choices for r in records) else "exact")
    if m not in METRICS:
        raise DLPError(f"{path}: field 'metric': unknown metric {m!r} (choose {', '.join(METRICS)})")
    return TaskData(name=name, records=records, metric=m, choices=choices, path=str(path))


def task_files(folder: str | os.PathLike) -> list[Path]:
    """The task files of a folder, sorted by file name (the order adapters and router labels use)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DLPError(f"{folder}: folder not found")
    files = sorted(p for p in folder.iterdir()
                   if p.suffix in FILE_SUFFIXES and not p.name.endswith(".meta.json") and not p.name.startswith("."))
    if not files:
        raise DLPError(f"{folder}: no task files (*.json / *.jsonl)")
    return files


def read_task_dir(folder: str | os.PathLike) -> list[TaskData]:
    """All tasks of a folder, ordered by file name; task names must be unique."""
    tasks = [read_task(p) for p in task_files(folder)]
    seen: dict[str, str] = {}
    for t in tasks:
        if t.name in seen:
            raise DLPError(f"{t.path}: field 'task': task {t.name!r} also defined by {seen[t.name]}")
        seen[t.name] = t.path
    return tasks


def write_task(path: str | os.PathLike, task: TaskData) -> Path:
    """Write a task as the seed's DictList JSON plus a ``<stem>.meta.json`` sidecar (both atomically)."""
    path = Path(path)
    atomic_write_json(path, [r.to_json() for r in task.records])
    meta: dict[str, Any] = {"task": task.name, "metric": task.metric}
    if task.choices:
        meta["choices"] = task.choices
    atomic_write_json(path.with_name(path.name.rsplit(".", 1)[0] + ".meta.json"), meta)
    return path


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file (recorded in dlp_task.json so a data change is visible)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------------------------
# Prompts and sentences
# ----------------------------------------------------------------------------------------------------------------

PLAIN_TEMPLATE = "Question: {q}\nAnswer: "


def format_prompt(tokenizer, question: str) -> str:
    """The text the model sees before its answer: the chat template when the tokenizer has one, else a plain
    ``Question: ...\\nAnswer: `` form. Training and inference both call this, so they always match."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                             add_generation_prompt=True)
    return PLAIN_TEMPLATE.format(q=question)


# A sentence ends at . ! ? (optionally followed by closing quotes/brackets) before whitespace, or at a newline.
# Cheap and deterministic on purpose (DESIGN §4): the router re-runs at each boundary during generation.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|(?<=[.!?][\"')\]])\s+|\n+")


def split_sentences(text: str) -> list[str]:
    """Split text into sentences with a regex; empty pieces are dropped; never returns an empty list for
    non-blank text."""
    parts = [p.strip() for p in _SENTENCE_END.split(text)]
    parts = [p for p in parts if p]
    return parts or ([text.strip()] if text.strip() else [])


def ends_sentence(text: str) -> bool:
    """True when ``text`` (decoded output so far) ends a sentence: end punctuation + whitespace, or newline."""
    return bool(re.search(r"[.!?][\"')\]]*\s$|\n$", text))


def summarize(tasks: Iterable[TaskData]) -> list[dict]:
    """Per-task counts for ``dlp-lora data check``."""
    return [{"task": t.name, "file": t.path, "records": len(t.records), "metric": t.metric} for t in tasks]
