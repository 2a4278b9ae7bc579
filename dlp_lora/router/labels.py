"""The router's label order: ``labels.json`` (label i == adapter i of adapters.txt), read and checked.

Shared by router data, training and inference, so it sits apart from all three.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from ..config import DLPError, read_json_file

LABELS_FILE = "labels.json"


def read_labels(path: str | os.PathLike) -> list[str]:
    """``labels.json``: a non-empty list of distinct task names."""
    path = Path(path)
    labels = read_json_file(path)
    if not (isinstance(labels, list) and labels and all(isinstance(x, str) and x for x in labels)):
        raise DLPError(f"{path}: expected a non-empty JSON list of task names")
    if len(set(labels)) != len(labels):
        dup = next(x for x in labels if labels.count(x) > 1)
        raise DLPError(f"{path}: task {dup!r} is listed twice")
    return labels


def check_label_order(labels: Sequence[str], names: Sequence[str], where: str) -> None:
    """DLPError naming the first difference when router labels and adapter task names differ."""
    labels, names = list(labels), list(names)
    if labels == names:
        return
    for i, (a, b) in enumerate(zip(labels, names)):
        if a != b:
            raise DLPError(f"{where}: labels differ from the adapters list at position {i}: "
                           f"router has {a!r}, adapters have {b!r}")
    raise DLPError(f"{where}: router has {len(labels)} labels but the adapters list has {len(names)} tasks "
                   f"(first extra: {(labels + names)[min(len(labels), len(names))]!r})")
