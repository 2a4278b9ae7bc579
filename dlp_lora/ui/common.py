"""What every page shares, without Gradio: form values -> library arguments, one-line errors, small views.

Handlers return plain values (strings, lists of row dicts, pandas frames, PIL images, dicts). A dict made by
:func:`update` is Gradio's "change only these properties" value (it is exactly what ``gr.update`` returns), so
handlers can say "leave this output as it is" (:data:`KEEP`) without importing Gradio.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from ..config import DLPError, format_error
from ..selection import SelectionConfig
from .jobs import JobCancelled

KEEP = {"__type__": "update"}  # leave this output unchanged


def update(**props: Any) -> dict:
    """Change only these properties of an output component (``gr.update`` without importing Gradio)."""
    return {"__type__": "update", **props}


def error_message(e: BaseException) -> str:
    """The one line a user sees for ``e``: the CLI's formatter, and "cancelled" for a cancelled job."""
    if isinstance(e, (JobCancelled, KeyboardInterrupt)):
        return "cancelled"
    return format_error(e)


# form values -> library arguments ---------------------------------------------------------------------------

def field_docs(cls: type) -> dict[str, str]:
    """The one-line ``# doc`` comment of each dataclass field (shown as the input's help text)."""
    try:
        src = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    docs = {}
    for line in src.splitlines():
        m = re.match(r"\s+(\w+):\s*[^=#]+=.*?#\s*(.+)$", line)
        if m:
            docs[m.group(1)] = m.group(2).strip()
    return docs


def config_fields(cls: type, skip: tuple[str, ...] = ()) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if f.name not in skip]


def _form_value(name: str, default: Any, v: Any) -> Any:
    """A form value cast to the type of the field's default (Gradio hands numbers back as floats)."""
    if isinstance(default, bool):
        return bool(v)
    if isinstance(default, int):
        if v is None or v == "":
            raise DLPError(f"{name}: a whole number is required")
        if float(v) != int(float(v)):
            raise DLPError(f"{name}: must be a whole number, got {v!r}")
        return int(float(v))
    if isinstance(default, float):
        if v is None or v == "":
            raise DLPError(f"{name}: a number is required")
        return float(v)
    return "" if v is None else str(v).strip()


def config_from_values(cls: type, fields: list[dataclasses.Field], values, **extra) -> Any:
    """Build config ``cls`` from the page's inputs (in ``fields`` order), cast to each field's default type."""
    kw = dict(extra)
    for f, v in zip(fields, values):
        kw[f.name] = _form_value(f.name, f.default, v)
    return cls(**kw)


SELECTION_FIELDS = [f.name for f in dataclasses.fields(SelectionConfig)]


def selection_from_form(values, base: SelectionConfig | None = None) -> SelectionConfig:
    """The one :class:`SelectionConfig` of a page's selection inputs (in ``SELECTION_FIELDS`` order)."""
    base = base or SelectionConfig()
    form = {name: _form_value(name, getattr(base, name), v) for name, v in zip(SELECTION_FIELDS, values)}
    return SelectionConfig.from_mapping(form, base=base, where="selection")


def text_or(value: str | None, default):
    """A typed value, or ``default`` when the box is blank."""
    value = (value or "").strip()
    return value if value else default


def file_path(f) -> str | None:
    """Path of a gr.File value (str, dict or FileData-like), or None."""
    if f is None:
        return None
    if isinstance(f, (str, os.PathLike)):
        return str(f)
    if isinstance(f, dict):
        return f.get("path") or f.get("name")
    return getattr(f, "path", None) or getattr(f, "name", None)


def file_list(files) -> list[str]:
    if files is None:
        return []
    if not isinstance(files, (list, tuple)):
        files = [files]
    return [p for p in (file_path(f) for f in files) if p]


def existing_path(path: str | None, what: str) -> str:
    """A typed path that must exist."""
    path = (path or "").strip()
    if not path:
        raise DLPError(f"{what}: upload a file or type a path")
    p = Path(path).expanduser()
    if not p.exists():
        raise DLPError(f"{path}: file not found")
    return str(p)


def copy_uploads(files, what: str, into: Path) -> Path:
    """Copy uploads into ``into`` under their original names (so ``<stem>.meta.json`` sidecars stay next to their
    task files); the caller owns ``into`` and removes it when the job is over."""
    paths = file_list(files)
    if not paths:
        raise DLPError(f"{what}: no files uploaded")
    into.mkdir(parents=True, exist_ok=True)
    for p in paths:
        shutil.copy2(p, into / Path(p).name)
    return into


def task_file(upload, path: str | None, into: Path) -> str:
    """One uploaded task file (its ``<stem>.meta.json`` sidecar may be uploaded with it) or a typed path."""
    if not file_list(upload):
        return existing_path(path, "dataset")
    folder = copy_uploads(upload, "dataset", into)
    data = [p for p in sorted(folder.iterdir()) if not p.name.endswith(".meta.json")]
    if len(data) != 1:
        raise DLPError(f"dataset: upload one task file (and optionally its .meta.json), got {len(data)}")
    return str(data[0])


def data_source(files, folder: str | None, what: str, into: Path) -> str:
    """Uploaded files (copied into ``into``) or a typed folder/file path."""
    if file_list(files):
        return str(copy_uploads(files, what, into))
    folder = (folder or "").strip()
    if not folder:
        raise DLPError(f"{what}: upload files or type a folder")
    p = Path(folder).expanduser()
    if not p.exists():
        raise DLPError(f"{folder}: not found")
    return str(p)


def default_root(run: str | None) -> Path:
    """Where outputs go when a page's output box is blank: the run folder, else ``runs/ui``."""
    return Path(run) if run else Path("runs") / "ui"


# small views ---------------------------------------------------------------------------------------------------

def image(path: Path):
    """Load a PNG into memory (Gradio then serves its own copy, whatever folder the run lives in)."""
    from PIL import Image

    with Image.open(path) as im:
        return im.copy()


def read_jsonl(path: Path, limit: int | None = None) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                rows.append(json.loads(line))
                if limit is not None and len(rows) >= limit:
                    break
    return rows


def count_lines(path: Path) -> int:
    with open(path, encoding="utf-8") as f:
        return sum(1 for line in f if line.strip())


def frame(rows: list[dict], columns: list[str] | None = None):
    """Rows as a pandas frame (what a Dataframe output shows)."""
    import pandas as pd

    return pd.DataFrame(rows, columns=columns)


def summary_md(title: str, d: dict, keys: list[str] | None = None) -> str:
    lines = [f"**{title}**", "", "| field | value |", "|---|---|"]
    for k in keys or list(d):
        if k in d:
            v = d[k]
            if isinstance(v, float):
                v = f"{v:.4g}"
            elif isinstance(v, (dict, list)):
                v = json.dumps(v)[:120]
            lines.append(f"| {k} | {v} |")
    return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class PageDefaults:
    """What ``dlp-lora ui --run/--model`` pre-fills on every page."""

    run: str = ""                  # run folder ("" = none)
    model: str = ""                # base model override for testing pages ("" = the run's own base model)
    train_model: str = "default"   # base model for the training pages

    @property
    def root(self) -> Path:
        return default_root(self.run or None)
