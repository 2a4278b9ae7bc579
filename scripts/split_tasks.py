"""Split every task file of a folder into disjoint train and test task files (scripts/results.sh,
scripts/reproduce_paper.sh).

    python scripts/split_tasks.py IN_DIR TRAIN_DIR TEST_DIR --test-n 50 [--train-n 300] [--min-train 0] [--seed 0]

Per task: distinct questions are shuffled with a seeded RNG (per task name), the first --test-n go to the test
file, the rest (at most --train-n) to the train file, so no test question is ever a training question (a question
that appears twice in the raw file counts once: keeping both copies could put one on each side). A task with too
few distinct questions for --test-n keeps --min-train for training and tests on the rest, and says so; with
--min-train 0 (the default) it is refused. Metadata (metric, choices) is kept (``<stem>.meta.json`` sidecars).

Both folders are written complete or not at all (temp folders + rename), so a script that skips this stage when
TRAIN_DIR exists never sees a half-written split. Existing folders are refused unless --overwrite.
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import sys
from pathlib import Path

from dlp_lora.config import DLPError, atomic_dir
from dlp_lora.data import QARecord, TaskData, read_task_dir, write_task


def distinct_questions(task: TaskData) -> list[QARecord]:
    """The task's records, one per distinct (stripped) question, in file order."""
    seen: set[str] = set()
    out = []
    for r in task.records:
        q = r.question.strip()
        if q not in seen:
            seen.add(q)
            out.append(r)
    return out


def split_task(task: TaskData, test_n: int, train_n: int = 0, min_train: int = 0,
               seed: int = 0) -> tuple[list[QARecord], list[QARecord]]:
    """(train, test) records of one task, disjoint by question."""
    recs = distinct_questions(task)
    random.Random(f"{seed}:{task.name}").shuffle(recs)
    n_test = test_n
    if len(recs) <= test_n:
        if not min_train or len(recs) <= min_train:
            raise DLPError(f"{task.path}: task {task.name!r} has {len(recs)} distinct questions, "
                           f"need more than --test-n {test_n}")
        n_test = len(recs) - min_train
    test, train = recs[:n_test], recs[n_test:]
    return (train[:train_n] if train_n else train), test


def split(in_dir: str, train_dir: str, test_dir: str, test_n: int, train_n: int = 0, seed: int = 0,
          min_train: int = 0, overwrite: bool = False) -> list[dict]:
    """Write TRAIN_DIR and TEST_DIR (one file per task each); return one count row per task."""
    tasks = read_task_dir(in_dir)
    ins = {Path(in_dir).resolve()}
    for d in (train_dir, test_dir):
        if Path(d).resolve() in ins:
            raise DLPError(f"{d}: output folder is the input folder")
    if Path(train_dir).resolve() == Path(test_dir).resolve():
        raise DLPError(f"{test_dir}: train and test folders must differ")
    splits = [(t, *split_task(t, test_n, train_n, min_train, seed)) for t in tasks]  # all checks before writing
    with atomic_dir(test_dir, overwrite=overwrite) as test_tmp, atomic_dir(train_dir, overwrite=overwrite) as train_tmp:
        rows = []
        for t, train, test in splits:
            stem = Path(t.path).name.rsplit(".", 1)[0]
            write_task(train_tmp / f"{stem}.json", dataclasses.replace(t, records=train))
            write_task(test_tmp / f"{stem}.json", dataclasses.replace(t, records=test))
            short = " (fewer test questions than asked: small task)" if len(test) < test_n else ""
            print(f"{t.name}: train {len(train)}, test {len(test)}{short}")
            rows.append({"task": t.name, "train": len(train), "test": len(test)})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("in_dir")
    p.add_argument("train_dir")
    p.add_argument("test_dir")
    p.add_argument("--test-n", type=int, required=True, help="test questions per task")
    p.add_argument("--train-n", type=int, default=0, help="at most this many train questions per task (0 = all)")
    p.add_argument("--min-train", type=int, default=0,
                   help="a task too small for --test-n keeps this many for training and tests on the rest (0 = refuse)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace existing train/test folders")
    a = p.parse_args(argv)
    try:
        split(a.in_dir, a.train_dir, a.test_dir, a.test_n, a.train_n, a.seed, a.min_train, a.overwrite)
    except DLPError as e:
        sys.stderr.write(f"error: {e}\n")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
