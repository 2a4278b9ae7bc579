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

from .config import DLPError, atomic_write_json, check_output, check_output_path, parse_json, read_text_file

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
        return parse_json(text, where, object_pairs_hook=_no_duplicates)
    except _DuplicateKey as e:
        raise DLPError(f"{where}: field {e.key!r}: duplicate key") from None


def _read_text(path: Path) -> str:
    text = read_text_file(path)
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


def meta_path(path: str | os.PathLike) -> Path:
    """The metadata sidecar of a task file: ``<stem>.meta.json`` beside it."""
    path = Path(path)
    return path.with_name(path.name.rsplit(".", 1)[0] + ".meta.json")


def _load_meta(path: Path) -> dict:
    side = meta_path(path)
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


def check_task_outputs(path: str | os.PathLike, overwrite: bool = False, inputs=()) -> None:
    """Refuse writing a task file at ``path`` before anything is written: an existing file or sidecar
    (unless ``overwrite``), one of ``inputs``, or a file directly in the file-system root."""
    path = Path(path)
    check_output_path(path.parent)
    for out in (path, meta_path(path)):
        check_output(out, overwrite=overwrite, inputs=inputs)


def write_task(path: str | os.PathLike, task: TaskData, overwrite: bool = False, inputs=()) -> Path:
    """Write a task as the seed's DictList JSON plus a ``<stem>.meta.json`` sidecar (both atomically), after
    :func:`check_task_outputs`: an existing file is only replaced with ``overwrite``, an input never."""
    path = Path(path)
    check_task_outputs(path, overwrite=overwrite, inputs=inputs)
    atomic_write_json(path, [r.to_json() for r in task.records])
    meta: dict[str, Any] = {"task": task.name, "metric": task.metric}
    if task.choices:
        meta["choices"] = task.choices
    atomic_write_json(meta_path(path), meta)
    return path


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file (recorded in dlp_task.json so a data change is visible)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# Prompts and sentences

PLAIN_TEMPLATE = "Question: {q}\nAnswer: "


def format_prompt(tokenizer, question: str) -> str:
    """The text the model sees before its answer: the chat template when the tokenizer has one, else a plain
    ``Question: ...\\nAnswer: `` form. Training and inference both call this, so they always match."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                             add_generation_prompt=True)
    return PLAIN_TEMPLATE.format(q=question)


def format_conversation(tokenizer, messages: list[dict]) -> str:
    """A whole conversation (``[{"role", "content"}]``, roles system/user/assistant) as the text before the next
    answer: the chat template when the tokenizer has one, else the plain form of :func:`format_prompt` (a single
    user message gives exactly ``format_prompt``'s text). The one renderer of the server and the playground."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    label = {"user": "Question: ", "assistant": "Answer: "}
    return "".join(f"{label.get(m['role'], '')}{m['content']}\n" for m in messages) + "Answer: "


# The one sentence rule (DESIGN §4): a sentence ends at . ! ? (optionally followed by closing quotes/brackets)
# before whitespace, or at a newline. Prompt splitting and the detection of a completed sentence in generated text
# both use it. Cheap and deterministic on purpose: the router re-runs at each boundary during generation.
_SENTENCE_END = re.compile(r"[.!?][\"')\]]*\s+|\n+")
# A numbered item line: "1." .. "999." at a line start (markdown "*", "#", ">" and spaces before it allowed; "1.5"
# is a number, not a label). Segment granularity reads it in prompts (the items) and in generated text (which
# answer the model is writing). It matches "2." at the end of streamed text, so the switch is never a token late.
NUMBERED_ITEM = re.compile(r"^[ \t*#>]*(\d{1,3})\.(?!\d)", re.M)


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """``(start, end)`` of each sentence of ``text``, whitespace trimmed, blank pieces dropped."""
    spans, pos = [], 0
    for m in list(_SENTENCE_END.finditer(text)) + [None]:
        end = m.end() if m is not None else len(text)
        piece = text[pos:end]
        if piece.strip():
            lead = len(piece) - len(piece.lstrip())
            spans.append((pos + lead, pos + len(piece.rstrip())))
        pos = end
    return spans


def split_sentences(text: str) -> list[str]:
    """Split text into sentences with the sentence rule; blank pieces are dropped, so blank text gives ``[]``."""
    return [text[a:b] for a, b in sentence_spans(text)]


def last_sentence_end(text: str, start: int = 0) -> int:
    """End offset (after the whitespace) of the last sentence boundary at or after ``start``; -1 when none."""
    end = -1
    for m in _SENTENCE_END.finditer(text, start):
        end = m.end()
    return end


def ends_sentence(text: str) -> bool:
    """True when ``text`` (decoded output so far) ends a sentence: end punctuation + whitespace, or newline."""
    return bool(text) and last_sentence_end(text) == len(text)


def numbered_items(text: str) -> list[tuple[int, int]]:
    """``(start, end)`` of items ``1.`` .. ``N.`` of ``text``: the longest run of item lines numbered 1, 2, ... in
    order, the last one of equal length (so an example list in an instruction before the questions, or a short
    list inside the last question, is not taken for the questions). Item i runs from its label to the next
    item's label (continuation lines included), the last one to the end. ``[]`` when there is no item 1."""
    runs: list[list[int]] = []
    for m in NUMBERED_ITEM.finditer(text):
        number = int(m.group(1))
        if number == 1:
            runs.append([m.start()])
        elif runs and number == len(runs[-1]) + 1:
            runs[-1].append(m.start())
    run = max(reversed(runs), key=len, default=[])
    ends = run[1:] + [len(text)]
    return [(a, a + len(text[a:b].rstrip())) for a, b in zip(run, ends)]


def last_item_number(text: str, start: int = 0) -> tuple[int, int]:
    """``(number, end)`` of the last numbered item label in ``text`` whose line starts at or after ``start``
    (``start`` must be a line start); ``(0, -1)`` when none."""
    found = (0, -1)
    for m in NUMBERED_ITEM.finditer(text, start):
        found = (int(m.group(1)), m.end())
    return found


def summarize(tasks: Iterable[TaskData]) -> list[dict]:
    """Per-task counts for ``dlp-lora data check``."""
    return [{"task": t.name, "file": t.path, "records": len(t.records), "metric": t.metric} for t in tasks]
