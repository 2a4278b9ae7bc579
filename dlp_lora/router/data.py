"""Router data: labelled sentences/prompts from the tasks' Q/A files (the seed's "Classifier Datasets Maker
Fusion" page; DESIGN §5).

``make_router_data`` writes ``train/val/test.jsonl`` records ``{"text", "label", "task"}``, ``labels.json``
(task names; label i == adapter i), ``config.json`` (the resolved :class:`RouterDataConfig`) and
``stats.json`` (counts per task and split, warnings). Rules:

* label order: the adapters list's order (each adapter's ``dlp_task.json`` names its data file), or task file
  names sorted (``--data-dir``), the order ``train-lora --data-dir`` writes ``adapters.txt`` in;
* balanced: the same number of distinct questions per task (default: the smallest task's);
* no leakage: the split is drawn per distinct question text, and a text that occurs in several tasks stays in
  one split. At sentence granularity a sentence text seen in an earlier split (train, then val, then test) is
  not repeated in a later one, so held-out sentences are never training sentences. Short generic sentences
  ("Options:") are kept, as in the paper; they are inherently ambiguous and show up in the confusion matrix;
* optional composite samples (paper Fig. 1): sentences of 2-3 different tasks joined, drawn from test
  questions only, written to ``test_composite.jsonl`` with ``"tasks"``/``"labels"`` lists;
* deterministic from ``seed`` (each task has its own random stream, so adding a task does not reshuffle the
  others).
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import sys
from pathlib import Path
from typing import Any, Iterable, Sequence

from ..config import DLPError, RouterDataConfig, read_json_file, read_text_file, atomic_dir, atomic_write_json, atomic_write_text, save_config
from ..data import TaskData, read_task, read_task_dir, split_sentences
from .labels import LABELS_FILE, check_label_order, read_labels  # noqa: F401  (re-exported)

SPLITS = ("train", "val", "test")
COMPOSITE_FILE = "test_composite.jsonl"
UNEQUAL_RATIO = 3.0                     # warn when the largest task has this many times the smallest's questions


def _warn(msg: str, warnings: list[str]) -> None:
    warnings.append(msg)
    sys.stderr.write(f"warning: {msg}\n")


def _tasks_from_adapters(adapters) -> tuple[list[TaskData], list[str]]:
    from ..lora import read_adapter_list, read_task_meta

    dirs = read_adapter_list(adapters)
    tasks, sources = [], []
    for d in dirs:
        meta = read_task_meta(d)
        name = meta["task"]
        data_file = meta.get("data_file")
        if not data_file:
            raise DLPError(f"{d}: field 'data_file': the adapter does not name its task's data file "
                           "(use --data-dir with the Q/A files instead)")
        path = Path(data_file).expanduser()
        path = path if path.is_absolute() else d / path
        if not path.is_file():
            raise DLPError(f"{d}: field 'data_file': {path}: file not found")
        tasks.append(read_task(path, task=name))
        sources.append(str(d))
    return tasks, sources


def load_router_tasks(adapters=None, data_dir=None) -> tuple[list[TaskData], list[str]]:
    """The tasks in label order and where each came from (adapter folder or data file)."""
    if (adapters is None) == (data_dir is None):
        raise DLPError("make-router-data: give exactly one of --adapters or --data-dir")
    if adapters is not None:
        tasks, sources = _tasks_from_adapters(adapters)
    else:
        tasks = read_task_dir(data_dir)
        sources = [t.path for t in tasks]
    seen: dict[str, str] = {}
    for t, src in zip(tasks, sources):
        if t.name in seen:
            raise DLPError(f"{src}: task {t.name!r} is listed twice (also {seen[t.name]})")
        seen[t.name] = src
    return tasks, sources


def _split_counts(n: int, val_frac: float, test_frac: float) -> tuple[int, int, int]:
    n_test = int(round(n * test_frac))
    n_val = int(round(n * val_frac))
    # With a non-zero fraction every held-out split gets at least one question, if the task has room.
    if test_frac > 0 and n_test == 0 and n >= 3:
        n_test = 1
    if val_frac > 0 and n_val == 0 and n >= 3:
        n_val = 1
    while n_test + n_val >= n and (n_test or n_val):   # keep at least one training question
        if n_val >= n_test and n_val:
            n_val -= 1
        else:
            n_test -= 1
    return n - n_val - n_test, n_val, n_test


def make_router_data(out_dir: str | os.PathLike, adapters=None, data_dir: str | os.PathLike | None = None,
                     config: RouterDataConfig = RouterDataConfig(), overwrite: bool = False,
                     progress: bool = True) -> Path:
    """Build router data (see the module doc) into ``out_dir``; returns it."""
    from tqdm.auto import tqdm

    tasks, sources = load_router_tasks(adapters, data_dir)
    names = [t.name for t in tasks]
    warnings: list[str] = []
    distinct = []
    for t in tasks:
        qs = list(dict.fromkeys(r.question.strip() for r in t.records if r.question.strip()))
        if not qs:
            raise DLPError(f"{t.path or t.name}: task {t.name!r}: no records")
        distinct.append(qs)
    sizes = [len(q) for q in distinct]
    n = config.per_task or min(sizes)
    if max(sizes) > UNEQUAL_RATIO * min(sizes):
        big, small = sizes.index(max(sizes)), sizes.index(min(sizes))
        _warn(f"tasks are very unequal ({names[big]}: {sizes[big]} questions, {names[small]}: {sizes[small]}); "
              f"sampling {n} per task", warnings)
    for t, size in zip(tasks, sizes):
        if size < n:
            raise DLPError(f"{t.path or t.name}: task {t.name!r}: has {size} distinct questions, fewer than the "
                           f"{n} per task requested (lower --per-task)")

    # 1. Per task: sample n distinct questions and split them by exact per-task counts.
    assign: list[dict[str, list[str]]] = []
    for t, qs in zip(tasks, distinct):
        rng = random.Random(f"{config.seed}:{t.name}")
        chosen = rng.sample(qs, n)
        n_train, n_val, n_test = _split_counts(n, config.val_frac, config.test_frac)
        assign.append({"test": chosen[:n_test], "val": chosen[n_test:n_test + n_val], "train": chosen[n_test + n_val:]})

    # 2. A question text shared by several tasks stays in the split it got first (task order): no leakage.
    owner: dict[str, str] = {}
    shared_texts, moved = 0, 0
    for a in assign:
        for split in SPLITS:
            keep = []
            for q in a[split]:
                first = owner.get(q)
                if first is None:
                    owner[q] = split
                    keep.append(q)
                elif first == split:
                    keep.append(q)
                else:
                    moved += 1
                    a[first].append(q)
            a[split] = keep
    text_tasks: dict[str, int] = {}
    for qs in distinct:
        for q in qs:
            text_tasks[q] = text_tasks.get(q, 0) + 1
    shared_texts = sum(1 for v in text_tasks.values() if v > 1)
    if shared_texts:
        _warn(f"{shared_texts} question texts occur in more than one task (they cannot be routed unambiguously)",
              warnings)

    # 3. Records per split (sentence granularity: one record per distinct sentence, never in two splits).
    records: dict[str, list[dict]] = {s: [] for s in SPLITS}
    test_sentences: list[list[str]] = [[] for _ in tasks]
    sent_owner: dict[str, str] = {}
    dropped_repeats = 0
    counts = {name: {s: 0 for s in SPLITS} for name in names}
    bar = tqdm(total=len(tasks) * len(SPLITS), desc="router data", disable=not progress, unit="split")
    for split in SPLITS:
        for label, (t, a) in enumerate(zip(tasks, assign)):
            seen_here: set[str] = set()
            for q in a[split]:
                pieces = [q] if config.granularity == "prompt" else split_sentences(q)
                for s in pieces:
                    if split == "test":
                        test_sentences[label].extend(split_sentences(s) if config.granularity == "prompt" else [s])
                    if config.granularity == "sentence":
                        first = sent_owner.setdefault(s, split)
                        if first != split or s in seen_here:
                            dropped_repeats += 1
                            continue
                        seen_here.add(s)
                    records[split].append({"text": s, "label": label, "task": t.name})
                    counts[t.name][split] += 1
            bar.update(1)
    bar.close()
    for split in SPLITS:
        random.Random(f"{config.seed}:shuffle:{split}").shuffle(records[split])

    composite: list[dict] = []
    if config.composite:
        if len(tasks) < 2:
            raise DLPError("make-router-data: --composite needs at least 2 tasks")
        pools = [i for i, s in enumerate(test_sentences) if s]
        if len(pools) < 2:
            raise DLPError("make-router-data: --composite draws from test questions; set --test-frac > 0")
        rng = random.Random(f"{config.seed}:composite")
        for _ in range(config.composite):
            k = min(rng.choice((2, 3)), len(pools))
            chosen = rng.sample(pools, k)
            text = " ".join(rng.choice(test_sentences[i]) for i in chosen)
            composite.append({"text": text, "label": chosen[0], "task": names[chosen[0]], "labels": chosen,
                              "tasks": [names[i] for i in chosen]})

    resolved = dataclasses.replace(config, per_task=n)
    stats = {
        "labels": names, "sources": sources, "per_task": n, "granularity": config.granularity,
        "records": {s: len(records[s]) for s in SPLITS}, "composite": len(composite),
        "per_task_records": counts, "distinct_questions": dict(zip(names, sizes)),
        "shared_question_texts": shared_texts, "moved_for_no_leakage": moved,
        "repeated_sentences_dropped": dropped_repeats, "warnings": warnings,
    }
    for name in names:
        if counts[name]["train"] == 0:
            raise DLPError(f"make-router-data: task {name!r}: no training records left")
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        for split in SPLITS:
            _write_jsonl(tmp / f"{split}.jsonl", records[split])
        if composite:
            _write_jsonl(tmp / COMPOSITE_FILE, composite)
        atomic_write_json(tmp / LABELS_FILE, names)
        save_config(resolved, tmp / "config.json")
        atomic_write_json(tmp / "stats.json", stats)
    return Path(out_dir)


def _write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


# ----------------------------------------------------------------------------------------------------------------
# Reading router data
# ----------------------------------------------------------------------------------------------------------------

def read_router_file(path: str | os.PathLike, labels: Sequence[str] | None = None,
                     allow_empty: bool = False) -> list[dict]:
    """Records of one labelled router file; checks text/label/task (and label == index of task in ``labels``)."""
    path = Path(path)
    text = read_text_file(path)
    rows = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}: line {lineno}"
        try:
            r = json.loads(line)
        except json.JSONDecodeError as e:
            raise DLPError(f"{where}: not valid JSON ({e.msg})") from None
        if not isinstance(r, dict):
            raise DLPError(f"{where}: expected an object with text/label/task")
        if not isinstance(r.get("text"), str):
            raise DLPError(f"{where}: field 'text': missing or not a string")
        if not isinstance(r.get("task"), str) or not r["task"]:
            raise DLPError(f"{where}: field 'task': missing or not a string")
        lab = r.get("label")
        if isinstance(lab, bool) or not isinstance(lab, int):
            raise DLPError(f"{where}: field 'label': missing or not an integer")
        if labels is not None:
            if not 0 <= lab < len(labels):
                raise DLPError(f"{where}: field 'label': {lab} is outside 0..{len(labels) - 1}")
            if labels[lab] != r["task"]:
                raise DLPError(f"{where}: field 'label': {lab} is task {labels[lab]!r} in labels.json, "
                               f"but the record says {r['task']!r}")
        rows.append(r)
    if not rows and not allow_empty:
        raise DLPError(f"{path}: no records")
    return rows


def read_router_data(data_dir: str | os.PathLike) -> tuple[list[str], dict[str, list[dict]]]:
    """``(labels, {"train": [...], "val": [...], "test": [...]})`` of a router data folder, validated."""
    d = Path(data_dir)
    if not d.is_dir():
        raise DLPError(f"{d}: router data folder not found")
    labels = read_labels(d / LABELS_FILE)
    splits = {"train": read_router_file(d / "train.jsonl", labels)}
    for s in ("val", "test"):
        splits[s] = read_router_file(d / f"{s}.jsonl", labels, allow_empty=True) if (d / f"{s}.jsonl").exists() else []
    present = {r["label"] for r in splits["train"]}
    missing = [labels[i] for i in range(len(labels)) if i not in present]
    if missing:
        raise DLPError(f"{d / 'train.jsonl'}: task {missing[0]!r}: no training records (empty task)")
    return labels, splits


def adapter_task_names(adapters) -> list[str]:
    """Task names of an adapters list (``adapters.txt``, run folder or list), in order."""
    from ..lora import read_adapter_list, read_task_meta

    return [read_task_meta(d)["task"] for d in read_adapter_list(adapters)]


# ----------------------------------------------------------------------------------------------------------------
# Fusion of labelled router files (the seed's "fusion")
# ----------------------------------------------------------------------------------------------------------------

def fuse_router_files(files: Sequence[str | os.PathLike], out: str | os.PathLike, overwrite: bool = True) -> Path:
    """Merge labelled router files into one, re-indexing labels by task name, and write ``labels.json`` beside.

    Label order: an existing ``labels.json`` beside ``out`` first (so fusing train, val and test one after the
    other gives one consistent order), then tasks in order of first appearance (each input's own
    ``labels.json`` order when it has one). Exact duplicate (text, task) records are dropped.
    Folders may be given instead of files: each split (and ``test_composite.jsonl``) is then fused into the
    folder ``out``.
    """
    paths = [Path(f) for f in files]
    if len(paths) < 2:
        raise DLPError("make-router-data --fuse: give at least two router files to fuse")
    if all(p.is_dir() for p in paths):
        return _fuse_dirs(paths, Path(out), overwrite)
    for p in paths:
        if p.is_dir():
            raise DLPError(f"{p}: is a folder; fuse either files or folders, not both")
    out = Path(out)
    labels_path = out.parent / LABELS_FILE
    base = read_labels(labels_path) if labels_path.is_file() else []
    rows_all, order = [], list(base)
    for p in paths:
        own = p.parent / LABELS_FILE
        own_labels = read_labels(own) if own.is_file() else None
        rows = read_router_file(p, own_labels)
        for t in (own_labels or []) + [r["task"] for r in rows]:
            if t not in order:
                order.append(t)
        rows_all.extend(rows)
    index = {t: i for i, t in enumerate(order)}
    seen, fused = set(), []
    for r in rows_all:
        key = (r["text"], r["task"])
        if key in seen:
            continue
        seen.add(key)
        row: dict[str, Any] = dict(r)
        row["label"] = index[r["task"]]
        if "tasks" in row:
            for t in row["tasks"]:
                if t not in index:
                    raise DLPError(f"composite record names task {t!r} that has no label")
            row["labels"] = [index[t] for t in row["tasks"]]
        fused.append(row)
    if out.exists() and not overwrite:
        raise DLPError(f"{out}: already exists (pass --overwrite to replace it)")
    _write_jsonl(out, fused)
    atomic_write_json(labels_path, order)
    return out


def _fuse_dirs(dirs: list[Path], out: Path, overwrite: bool) -> Path:
    order: list[str] = []
    for d in dirs:
        for t in read_labels(d / LABELS_FILE):
            if t not in order:
                order.append(t)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        atomic_write_json(tmp / LABELS_FILE, order)
        for name in [f"{s}.jsonl" for s in SPLITS] + [COMPOSITE_FILE]:
            files = [d / name for d in dirs if (d / name).is_file()]
            if files:   # a single file is still re-indexed through the common order
                _fuse_into(files, tmp / name, order)
    return out


def _fuse_into(files: list[Path], out: Path, order: list[str]) -> None:
    index = {t: i for i, t in enumerate(order)}
    seen, fused = set(), []
    for p in files:
        for r in read_router_file(p, read_labels(p.parent / LABELS_FILE), allow_empty=True):
            key = (r["text"], r["task"])
            if key in seen:
                continue
            seen.add(key)
            row = dict(r, label=index[r["task"]])
            if "tasks" in row:
                row["labels"] = [index[t] for t in row["tasks"]]
            fused.append(row)
    _write_jsonl(out, fused)
