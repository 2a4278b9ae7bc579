"""The run folder and the PEFT adapter-folder format: the contract between stages (DESIGN §2).

    RUN/adapters/<task>/   adapter_config.json, adapter_model.safetensors (PEFT), dlp_task.json, train_config.json
    RUN/adapters.txt       one adapter folder a line; its order is the router's label order
    RUN/router_data/       train/val/test.jsonl, labels.json
    RUN/router/            router.safetensors, config.json, labels.json

:func:`open_run` is the one place that decides which adapters, which router and which base model a run uses;
every front-end (CLI, eval, bench, demo, server, web app) goes through it, usually via
``DLPPipeline.from_run``. Reading a run needs no torch and no model.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Iterable, Sequence

from .config import DLPError, atomic_write_text, read_json_file, read_text_file

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
TASK_META = "dlp_task.json"
TRAIN_CONFIG = "train_config.json"
ADAPTER_LIST = "adapters.txt"
ROUTER_DIR = "router"
ROUTER_DATA_DIR = "router_data"
MULTITASK_DIR = "multitask"            # RUN/multitask/: one LoRA trained on all tasks (the eval baseline)
DEFAULT_BASE = "default"


# adapters.txt ---------------------------------------------------------------------------------------------------

def write_adapter_list(path: str | os.PathLike, dirs: Iterable[str | os.PathLike]) -> Path:
    """Write ``adapters.txt``: one folder a line, relative to the file's folder when inside it (atomic)."""
    path = Path(path).absolute()
    lines = []
    for d in dirs:
        d = Path(d).absolute()
        try:
            lines.append(d.relative_to(path.parent).as_posix())
        except ValueError:
            lines.append(str(d))
    if not lines:
        raise DLPError(f"{path}: no adapter folders to list")
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def _check_folder_list(dirs: list[Path]) -> list[Path]:
    if not dirs:
        raise DLPError("adapters: empty list of adapter folders")
    for d in dirs:
        if not d.is_dir():
            raise DLPError(f"{d}: adapter folder not found")
    if len(set(dirs)) != len(dirs):
        raise DLPError("adapters: the same adapter folder is listed twice")
    return dirs


def adapter_list_path(path: str | os.PathLike) -> Path:
    """``RUN/adapters.txt`` for a run folder, the path itself for a file."""
    path = Path(path)
    if path.is_dir():
        if not (path / ADAPTER_LIST).is_file():
            raise DLPError(f"{path}: no {ADAPTER_LIST} (expected a run folder or an {ADAPTER_LIST} file)")
        return path / ADAPTER_LIST
    return path


def read_adapter_list(path_or_list: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """Adapter folders from ``adapters.txt``, a run folder (``RUN/adapters.txt``) or a list of folders.

    In the file blank lines and ``#`` comments are ignored, a UTF-8 byte-order mark is skipped (editors on
    Windows write one) and relative paths resolve against the file's folder. Every folder must exist;
    duplicates are refused (the order defines the router's labels).
    """
    if isinstance(path_or_list, (list, tuple)):
        return _check_folder_list([Path(p).absolute() for p in path_or_list])
    path = adapter_list_path(path_or_list)
    text = read_text_file(path).lstrip("\ufeff")
    base = path.absolute().parent
    dirs: list[Path] = []
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        d = Path(line).expanduser()
        d = Path(os.path.normpath(d if d.is_absolute() else base / d))
        if not d.exists():
            raise DLPError(f"{path}: line {n}: {line}: not found")
        if not d.is_dir():
            raise DLPError(f"{path}: line {n}: {line}: not a folder")
        if d in dirs:
            raise DLPError(f"{path}: line {n}: {line}: listed twice")
        dirs.append(d)
    if not dirs:
        raise DLPError(f"{path}: no adapter folders listed")
    return dirs


# one adapter folder ---------------------------------------------------------------------------------------------

def _read_json_object(path: Path) -> dict:
    obj = read_json_file(path)
    if not isinstance(obj, dict):
        raise DLPError(f"{path}: expected a JSON object")
    return obj


def check_adapter_dir(adapter_dir: str | os.PathLike) -> dict:
    """Parsed ``adapter_config.json`` of a PEFT LoRA folder with safetensors weights; a one-line DLPError for
    anything else (the fused engine and training both read adapters through this check)."""
    d = Path(adapter_dir)
    if not d.is_dir():
        raise DLPError(f"{d}: adapter folder not found")
    cfg_path = d / ADAPTER_CONFIG
    if not cfg_path.is_file():
        raise DLPError(f"{d}: not a PEFT LoRA folder (no {ADAPTER_CONFIG})")
    cfg = _read_json_object(cfg_path)
    if str(cfg.get("peft_type", "")).upper() != "LORA":
        raise DLPError(f"{cfg_path}: field 'peft_type': {cfg.get('peft_type')!r} is not a LoRA adapter")
    if not (d / ADAPTER_WEIGHTS).is_file():
        extra = " (pickled adapter_model.bin is never loaded)" if (d / "adapter_model.bin").exists() else ""
        raise DLPError(f"{d}: no {ADAPTER_WEIGHTS}{extra}")
    for key in ("r", "target_modules"):
        if key not in cfg:
            raise DLPError(f"{cfg_path}: field {key!r}: missing")
    return cfg


def read_task_meta(adapter_dir: str | os.PathLike) -> dict:
    """``dlp_task.json`` of an adapter; for adapters trained elsewhere, metadata derived from the folder name
    (task = folder name, metric ``exact``, no choices)."""
    d = Path(adapter_dir)
    p = d / TASK_META
    if not p.is_file():
        return {"task": d.absolute().name, "metric": "exact", "choices": None, "derived": True}
    meta = _read_json_object(p)
    if not (isinstance(meta.get("task"), str) and meta["task"].strip()):
        raise DLPError(f"{p}: field 'task': missing or not a non-empty string")
    return meta


def read_task_name(adapter_dir: str | os.PathLike) -> str:
    """The task name of an adapter: ``dlp_task.json`` "task", else the folder name."""
    return read_task_meta(adapter_dir)["task"]


def base_model_of(metas: Sequence[dict]) -> str:
    """The base model the adapters were trained on: ``dlp_task.json`` ``base_model.name_or_path`` when that
    folder exists here (``"default"`` when it is the cached default model), else ``"default"``."""
    from .models import default_model_dir  # light: no torch import

    for meta in metas:
        base = meta.get("base_model") or {}
        p = base.get("name_or_path") if isinstance(base, dict) else None
        if p and Path(p).is_dir() and (Path(p) / "config.json").is_file():
            return DEFAULT_BASE if Path(p).resolve() == default_model_dir().resolve() else str(p)
    return DEFAULT_BASE


# the run --------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Run:
    """What a run folder (or adapters.txt, or list of adapter folders) holds, resolved once."""

    root: Path | None                  # the run folder (None for a bare list of adapter folders)
    adapter_dirs: list[Path]           # adapter folders in adapters.txt order (= router label order)
    names: list[str]                   # their task names
    metas: list[dict]                  # their dlp_task.json contents (derived for foreign adapters)
    router_dir: Path | None            # the router to use, None when there is none
    base_model: str                    # the model spec to load: --model if given, else the adapters' own base

    @property
    def has_router(self) -> bool:
        return self.router_dir is not None

    def meta(self, task: str) -> dict:
        return self.metas[self.names.index(task)]

    def require_router(self) -> Path:
        if self.router_dir is None:
            where = self.root or "adapters"
            raise DLPError(f"{where}: no router/ folder (train one with dlp-lora train-router, or give --router)")
        return self.router_dir


def _run_root(spec) -> tuple[Path | None, list[Path]]:
    """(run folder or None, adapter folders) for a run folder, an adapters.txt, one adapter folder or a list."""
    if isinstance(spec, (list, tuple)):
        return None, read_adapter_list(list(spec))
    p = Path(spec)
    if not p.exists():
        raise DLPError(f"{p}: run folder not found")
    if p.is_dir() and (p / ADAPTER_CONFIG).is_file() and not (p / ADAPTER_LIST).is_file():
        return None, [p.absolute()]                        # a single adapter folder
    listing = adapter_list_path(p)
    return listing.absolute().parent, read_adapter_list(listing)


def open_run(spec, *, router: str | os.PathLike | bool | None = None,
             model: str | os.PathLike | None = None) -> Run:
    """Resolve a run. ``spec``: run folder | adapters.txt | one adapter folder | list of adapter folders.

    ``router``: None = the run's own ``router/`` when present; a path = that router; False = no router.
    ``model``: None or "" = the adapters' own base model (``dlp_task.json``); anything else overrides it.
    """
    if spec is None or (isinstance(spec, str) and not spec.strip()):
        raise DLPError("run: give a run folder (adapters.txt + router/), an adapters.txt or adapter folders")
    root, dirs = _run_root(spec)
    for d in dirs:
        check_adapter_dir(d)
    metas = [read_task_meta(d) for d in dirs]
    names = [m["task"] for m in metas]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise DLPError(f"adapters: task name(s) {sorted(dup)} used by more than one adapter folder")
    router_dir: Path | None = None
    if router is None:
        cand = root / ROUTER_DIR if root is not None else None
        router_dir = cand if cand is not None and cand.is_dir() else None
    elif router is not False and str(router).strip():
        router_dir = Path(router)
        if not router_dir.is_dir():
            raise DLPError(f"{router_dir}: router folder not found")
    base = str(model).strip() if model is not None and str(model).strip() else base_model_of(metas)
    return Run(root=root, adapter_dirs=dirs, names=names, metas=metas, router_dir=router_dir, base_model=base)
