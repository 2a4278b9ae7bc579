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

from ..config import DLPError, RouterDataConfig, atomic_dir, atomic_write_json, atomic_write_text, load_config, \
    read_json_file, read_text_file, save_config
from ..data import TaskData, read_task, read_task_dir, split_sentences
from .labels import LABELS_FILE, check_label_order, read_labels  # noqa: F401  (re-exported)

SPLITS = ("train", "val", "test")
COMPOSITE_FILE = "test_composite.jsonl"
UNEQUAL_RATIO = 3.0                     # warn when the largest task has this many times the smallest's questions


def _warn(msg: str, warnings: list[str]) -> None:
    warnings.append(msg)
    sys.stderr.write(f"warning: {msg}\n")


def _tasks_from_adapters(adapters) -> tuple[list[TaskData], list[str]]:
    from ..run import read_adapter_list, read_task_meta

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
    tasks, sources = load_router_tasks(adapters, data_dir)
    _check_not_an_input([Path(x) for x in sources] + ([Path(data_dir)] if data_dir is not None else []),
                        Path(out_dir))
    names = [t.name for t in tasks]
    warnings: list[str] = []
    distinct = [_distinct_questions(t) for t in tasks]
    sizes = [len(q) for q in distinct]
    n = config.per_task or min(sizes)
    if max(sizes) > UNEQUAL_RATIO * min(sizes):
        big, small = sizes.index(max(sizes)), sizes.index(min(sizes))
        _warn(f"tasks are very unequal ({names[big]}: {sizes[big]} questions, {names[small]}: {sizes[small]}); "
              f"sampling {n} per task", warnings)
    assign = [_assign_questions(t, qs, n, config) for t, qs in zip(tasks, distinct)]
    moved = _keep_shared_texts_in_one_split(assign)
    text_tasks: dict[str, int] = {}
    for qs in distinct:
        for q in qs:
            text_tasks[q] = text_tasks.get(q, 0) + 1
    shared_texts = sum(1 for v in text_tasks.values() if v > 1)
    if shared_texts:
        _warn(f"{shared_texts} question texts occur in more than one task (they cannot be routed unambiguously)",
              warnings)
    records, counts, dropped = _build_records(names, assign, config, {}, progress)
    for split in SPLITS:
        random.Random(f"{config.seed}:shuffle:{split}").shuffle(records[split])
    composite = _composites(names, assign, config)
    stats = {
        "labels": names, "sources": sources, "per_task": n, "granularity": config.granularity,
        "records": {s: len(records[s]) for s in SPLITS}, "composite": len(composite),
        "per_task_records": counts, "distinct_questions": dict(zip(names, sizes)),
        "shared_question_texts": shared_texts, "moved_for_no_leakage": moved,
        "repeated_sentences_dropped": dropped, "warnings": warnings,
    }
    _write_router_data(Path(out_dir), names, records, composite, dataclasses.replace(config, per_task=n), stats,
                       overwrite)
    return Path(out_dir)


def _distinct_questions(t: TaskData) -> list[str]:
    qs = list(dict.fromkeys(r.question.strip() for r in t.records if r.question.strip()))
    if not qs:
        raise DLPError(f"{t.path or t.name}: task {t.name!r}: no records")
    return qs


def _assign_questions(t: TaskData, qs: list[str], n: int, config: RouterDataConfig) -> dict[str, list[str]]:
    """Sample ``n`` distinct questions of one task and split them by exact counts. Each task has its own random
    stream (seed and task name), so adding a task later draws the same questions as building with it now."""
    if len(qs) < n:
        raise DLPError(f"{t.path or t.name}: task {t.name!r}: has {len(qs)} distinct questions, fewer than the "
                       f"{n} per task requested (lower --per-task)")
    chosen = random.Random(f"{config.seed}:{t.name}").sample(qs, n)
    _, n_val, n_test = _split_counts(n, config.val_frac, config.test_frac)
    return {"test": chosen[:n_test], "val": chosen[n_test:n_test + n_val], "train": chosen[n_test + n_val:]}


def _keep_shared_texts_in_one_split(assign: list[dict[str, list[str]]], owner: dict[str, str] | None = None) -> int:
    """A question text shared by several tasks stays in the split it got first (task order), so no text is in
    two splits. ``owner``: texts already placed (text -> split). Returns how many questions were moved."""
    owner = {} if owner is None else owner
    moved = 0
    for a in assign:
        for split in SPLITS:
            keep = []
            for q in a[split]:
                first = owner.setdefault(q, split)
                if first == split:
                    keep.append(q)
                else:
                    moved += 1
                    a[first].append(q)
            a[split] = keep
    return moved


def _build_records(names: list[str], assign: list[dict[str, list[str]]], config: RouterDataConfig,
                   sent_owner: dict[str, str], progress: bool, first_label: int = 0):
    """Records per split; at sentence granularity one per distinct sentence, never in two splits
    (``sent_owner``: sentence -> split, shared across calls). Returns (records, counts, repeats dropped)."""
    from tqdm.auto import tqdm

    records: dict[str, list[dict]] = {s: [] for s in SPLITS}
    counts = {name: {s: 0 for s in SPLITS} for name in names}
    dropped = 0
    bar = tqdm(total=len(names) * len(SPLITS), desc="router data", disable=not progress, unit="split")
    for split in SPLITS:
        for i, (name, a) in enumerate(zip(names, assign)):
            seen_here: set[str] = set()
            for q in a[split]:
                for s in ([q] if config.granularity == "prompt" else split_sentences(q)):
                    if config.granularity == "sentence":
                        if sent_owner.setdefault(s, split) != split or s in seen_here:
                            dropped += 1
                            continue
                        seen_here.add(s)
                    records[split].append({"text": s, "label": first_label + i, "task": name})
                    counts[name][split] += 1
            bar.update(1)
    bar.close()
    for name in names:
        if counts[name]["train"] == 0:
            raise DLPError(f"make-router-data: task {name!r}: no training records left")
    return records, counts, dropped


def _composites(names: list[str], assign: list[dict[str, list[str]]], config: RouterDataConfig) -> list[dict]:
    """Composite test samples (paper Fig. 1): sentences of 2-3 different tasks' test questions joined."""
    if not config.composite:
        return []
    if len(names) < 2:
        raise DLPError("make-router-data: --composite needs at least 2 tasks")
    test_sentences = [[s for q in a["test"] for s in split_sentences(q)] for a in assign]
    pools = [i for i, s in enumerate(test_sentences) if s]
    if len(pools) < 2:
        raise DLPError("make-router-data: --composite draws from test questions; set --test-frac > 0")
    rng = random.Random(f"{config.seed}:composite")
    out = []
    for _ in range(config.composite):
        chosen = rng.sample(pools, min(rng.choice((2, 3)), len(pools)))
        text = " ".join(rng.choice(test_sentences[i]) for i in chosen)
        out.append({"text": text, "label": chosen[0], "task": names[chosen[0]], "labels": chosen,
                    "tasks": [names[i] for i in chosen]})
    return out


def _write_router_data(out_dir: Path, labels: list[str], records: dict[str, list[dict]], composite: list[dict],
                       config: RouterDataConfig, stats: dict, overwrite: bool) -> None:
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        for split in SPLITS:
            _write_jsonl(tmp / f"{split}.jsonl", records[split])
        if composite:
            _write_jsonl(tmp / COMPOSITE_FILE, composite)
        atomic_write_json(tmp / LABELS_FILE, labels)
        save_config(config, tmp / "config.json")
        atomic_write_json(tmp / "stats.json", stats)


# Adding and removing one task of existing router data (a run that grows over time)

def add_task_to_router_data(data_dir: str | os.PathLike, task: TaskData, out_dir: str | os.PathLike,
                            source: str = "", overwrite: bool = False, progress: bool = False) -> Path:
    """Router data ``data_dir`` plus ``task`` as the last label, written to ``out_dir``: the new task's questions
    are drawn and split exactly as ``make_router_data`` would (same per_task, fractions, granularity and seed,
    the task's own random stream); every existing record and label stays as it is. A question or sentence text
    already in a split stays in that split (no leakage)."""
    d = Path(data_dir)
    labels, splits = read_router_data(d)
    config = _read_data_config(d)
    if task.name in labels:
        raise DLPError(f"{task.path or task.name}: task {task.name!r} is already label {labels.index(task.name)} "
                       f"of {d / LABELS_FILE}")
    qs = _distinct_questions(task)
    n = config.per_task or _per_task_of(splits)
    if len(qs) < n:
        raise DLPError(f"{task.path or task.name}: task {task.name!r}: has {len(qs)} distinct questions; the router "
                       f"data in {d} draws {n} per task")
    assign = [_assign_questions(task, qs, n, config)]
    owner = {r["text"]: s for s in SPLITS for r in splits[s]}
    moved = _keep_shared_texts_in_one_split(assign, dict(owner))
    records, counts, dropped = _build_records([task.name], assign, config, owner, progress, len(labels))
    stats = _read_stats(d)
    stats["labels"] = labels + [task.name]
    stats.setdefault("sources", []).append(source or task.path or task.name)
    stats.setdefault("per_task_records", {}).update(counts)
    stats.setdefault("distinct_questions", {})[task.name] = len(qs)
    stats["moved_for_no_leakage"] = stats.get("moved_for_no_leakage", 0) + moved
    stats["repeated_sentences_dropped"] = stats.get("repeated_sentences_dropped", 0) + dropped
    new = {s: splits[s] + records[s] for s in SPLITS}
    stats["records"] = {s: len(new[s]) for s in SPLITS}
    composite = _read_composite(d, labels)
    _write_router_data(Path(out_dir), labels + [task.name], new, composite, config, stats, overwrite)
    return Path(out_dir)


def remove_task_from_router_data(data_dir: str | os.PathLike, task: str, out_dir: str | os.PathLike,
                                 overwrite: bool = False) -> Path:
    """Router data ``data_dir`` without ``task``: its records (and composite samples that include it) dropped,
    the other labels re-indexed in their old order, written to ``out_dir``."""
    d = Path(data_dir)
    labels, splits = read_router_data(d)
    if task not in labels:
        raise DLPError(f"{d / LABELS_FILE}: has no task {task!r} (tasks: {', '.join(labels)})")
    if len(labels) == 1:
        raise DLPError(f"{d / LABELS_FILE}: {task!r} is the only task; a router needs at least one")
    keep = [t for t in labels if t != task]
    new = {s: _reindexed([r for r in splits[s] if r["task"] != task], keep) for s in SPLITS}
    composite = _reindexed([r for r in _read_composite(d, labels) if task not in r.get("tasks", [])], keep)
    stats = _read_stats(d)
    stats["labels"] = keep
    i = labels.index(task)
    if isinstance(stats.get("sources"), list) and len(stats["sources"]) == len(labels):
        stats["sources"] = stats["sources"][:i] + stats["sources"][i + 1:]
    for key in ("per_task_records", "distinct_questions"):
        if isinstance(stats.get(key), dict):
            stats[key].pop(task, None)
    stats.update(records={s: len(new[s]) for s in SPLITS}, composite=len(composite))
    _write_router_data(Path(out_dir), keep, new, composite, _read_data_config(d), stats, overwrite)
    return Path(out_dir)


def _read_data_config(d: Path) -> RouterDataConfig:
    """The data's resolved config; merged data folders have none: the defaults (per_task from the records)."""
    p = d / "config.json"
    return load_config(RouterDataConfig, p) if p.is_file() else RouterDataConfig()


def _per_task_of(splits: dict[str, list[dict]]) -> int:
    """Records per task of data without a resolved per_task (the first task's count; at prompt granularity
    that is its number of distinct questions)."""
    first = splits["train"][0]["task"]
    return sum(1 for s in SPLITS for r in splits[s] if r["task"] == first)


def _read_stats(d: Path) -> dict:
    p = d / "stats.json"
    stats = read_json_file(p) if p.is_file() else {}
    return stats if isinstance(stats, dict) else {}


def _read_composite(d: Path, labels: list[str]) -> list[dict]:
    p = d / COMPOSITE_FILE
    return read_router_file(p, labels, allow_empty=True) if p.is_file() else []


def _write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


# Reading router data

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
    from ..run import read_adapter_list, read_task_meta

    return [read_task_meta(d)["task"] for d in read_adapter_list(adapters)]


# Merging labelled router files (the seed's "fusion" page; "merge" here, since fusion is what the engine does
# to adapters)

def merge_router_files(files: Sequence[str | os.PathLike], out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Merge labelled router files into one, re-indexing labels by task name, with ``labels.json`` beside it.

    Label order: an existing ``labels.json`` beside ``out`` first (so merging train, val and test one after the
    other into one folder gives one consistent order), then tasks in order of first appearance (each input's
    own ``labels.json`` order when it has one). That existing ``labels.json`` belongs to the files already in
    the folder, so it is never rewritten: a merge that would add tasks to it is refused. Exact duplicate
    (text, task) records are dropped. Folders may be given instead of files: each split (and
    ``test_composite.jsonl``) is then merged into the new folder ``out``. ``out`` is never one of the inputs (nor
    a folder holding one) and is not replaced unless ``overwrite``.
    """
    paths = [Path(f) for f in files]
    if len(paths) < 2:
        raise DLPError("make-router-data --merge: give at least two router files to merge")
    out = Path(out)
    _check_not_an_input(paths, out)
    if all(p.is_dir() for p in paths):
        return _merge_dirs(paths, out, overwrite)
    for p in paths:
        if p.is_dir():
            raise DLPError(f"{p}: is a folder; merge either files or folders, not both")
    if out.exists() and not overwrite:
        raise DLPError(f"{out}: already exists (pass --overwrite to replace it)")
    if out.is_dir():
        raise DLPError(f"{out}: is a folder; merging files writes one file")
    labels_path = out.parent / LABELS_FILE
    base = read_labels(labels_path) if labels_path.is_file() else []
    order = list(base)
    rows_all = []
    for p in paths:
        own = p.parent / LABELS_FILE
        own_labels = read_labels(own) if own.is_file() else None
        rows = read_router_file(p, own_labels)
        order.extend(t for t in dict.fromkeys((own_labels or []) + [r["task"] for r in rows]) if t not in order)
        rows_all.extend(rows)
    if base and order != base:
        raise DLPError(f"{labels_path}: belongs to the router files beside {out.name} and does not list task "
                       f"{order[len(base)]!r}; write the merged file to another folder")
    _write_jsonl(out, _reindexed(rows_all, order))
    if not base:
        atomic_write_json(labels_path, order)
    return out


def _check_not_an_input(inputs: list[Path], out: Path) -> None:
    """An output that is an input, or a folder holding one, would be lost when written: refuse it."""
    target = out.resolve()
    for p in inputs:
        src = p.resolve()
        if src == target or target in src.parents:
            raise DLPError(f"{out}: is one of the inputs ({p}); write the merged output elsewhere")


def _reindexed(rows: Iterable[dict], order: list[str]) -> list[dict]:
    """Rows with labels re-indexed through ``order``; exact duplicate (text, task) records dropped."""
    index = {t: i for i, t in enumerate(order)}
    seen, merged = set(), []
    for r in rows:
        key = (r["text"], r["task"])
        if key in seen:
            continue
        seen.add(key)
        row: dict[str, Any] = dict(r, label=index[r["task"]])
        if "tasks" in row:
            missing = [t for t in row["tasks"] if t not in index]
            if missing:
                raise DLPError(f"composite record names task {missing[0]!r} that has no label")
            row["labels"] = [index[t] for t in row["tasks"]]
        merged.append(row)
    return merged


def _merge_dirs(dirs: list[Path], out: Path, overwrite: bool) -> Path:
    order: list[str] = []
    for d in dirs:
        order.extend(t for t in read_labels(d / LABELS_FILE) if t not in order)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        atomic_write_json(tmp / LABELS_FILE, order)
        for name in [f"{s}.jsonl" for s in SPLITS] + [COMPOSITE_FILE]:
            files = [d / name for d in dirs if (d / name).is_file()]
            if files:   # a single file is still re-indexed through the common order
                rows = [r for f in files for r in read_router_file(f, read_labels(f.parent / LABELS_FILE),
                                                                     allow_empty=True)]
                _write_jsonl(tmp / name, _reindexed(rows, order))
    return out


# The former name, kept so that code written before the rename keeps working.
fuse_router_files = merge_router_files
