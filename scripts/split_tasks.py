"""Split every task file of a folder into disjoint train and test task files (used by scripts/results.sh).

    python scripts/split_tasks.py IN_DIR TRAIN_DIR TEST_DIR --test-n 40 [--train-n 300] [--seed 0]

Per task: distinct questions are shuffled with a seeded RNG (per task name), the first --test-n go to the test
file, the rest (at most --train-n) to the train file, so no test question is ever a training question. Metadata
(metric, choices) is kept (``<stem>.meta.json`` sidecars). Refuses to write into existing folders.
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import sys
from pathlib import Path

from dlp_lora.config import DLPError
from dlp_lora.data import read_task_dir, write_task


def split(in_dir: str, train_dir: str, test_dir: str, test_n: int, train_n: int = 0, seed: int = 0) -> None:
    tasks = read_task_dir(in_dir)
    for d in (train_dir, test_dir):
        if Path(d).exists():
            raise DLPError(f"{d}: already exists")
    for t in tasks:
        seen: set[str] = set()
        recs = []
        for r in t.records:  # one record per distinct question (duplicates would leak across the split)
            q = r.question.strip()
            if q not in seen:
                seen.add(q)
                recs.append(r)
        random.Random(f"{seed}:{t.name}").shuffle(recs)
        if len(recs) <= test_n:
            raise DLPError(f"{t.path}: task {t.name!r} has {len(recs)} distinct questions, need more than --test-n {test_n}")
        test, train = recs[:test_n], recs[test_n:]
        if train_n:
            train = train[:train_n]
        stem = Path(t.path).name.rsplit(".", 1)[0]
        write_task(Path(train_dir) / f"{stem}.json", dataclasses.replace(t, records=train))
        write_task(Path(test_dir) / f"{stem}.json", dataclasses.replace(t, records=test))
        print(f"{t.name}: train {len(train)}, test {len(test)}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("in_dir")
    p.add_argument("train_dir")
    p.add_argument("test_dir")
    p.add_argument("--test-n", type=int, required=True, help="test questions per task")
    p.add_argument("--train-n", type=int, default=0, help="at most this many train questions per task (0 = all)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    try:
        split(a.in_dir, a.train_dir, a.test_dir, a.test_n, a.train_n, a.seed)
    except DLPError as e:
        sys.stderr.write(f"error: {e}\n")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
