"""Adding a task to a run, or removing one, without starting over (``dlp-lora add-task`` / ``remove-task``).

A deployment gains adapters over time. Adding a task keeps every existing adapter, label and router weight:

1. its adapter: an existing PEFT LoRA folder (checked and copied to ``RUN/adapters/<task>/`` with a
   ``dlp_task.json``), or one trained with the run's own LoRA settings (``lora.train_adapter``);
2. its router data: questions drawn and split as ``make-router-data`` would have; old records unchanged;
3. the router: the output layer grows by one row (the other rows keep their order and weights), the whole
   router is fine-tuned briefly on old + new data (warm start, a few epochs), then recalibrated;
4. ``adapters.txt`` gets one more line.

Removing a task drops its label row (the other rows keep their order and weights, so no training is needed,
only recalibration), its router records and its line of ``adapters.txt``. Its adapter folder stays on disk.

All or nothing: the new adapter, router data and router are built in ``RUN/.update.partial/`` and a plan file is
written when all are ready; only then are they moved into the run, ``adapters.txt`` last. An interrupted
command leaves the run as it was; one interrupted while moving is finished by the next add-task / remove-task
(or the same command again) before it does anything else. A training interrupted while building resumes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import time
from pathlib import Path

import torch

from ..config import DLPError, LoRATrainConfig, atomic_write_json, load_config, read_json_file
from ..data import read_task
from ..run import (ADAPTER_LIST, ADAPTER_WEIGHTS, ROUTER_DATA_DIR, ROUTER_DIR, TASK_META, TRAIN_CONFIG,
                   check_adapter_dir, open_run, write_adapter_list)
from .data import add_task_to_router_data, read_router_data, remove_task_from_router_data
from .labels import LABELS_FILE, check_label_order, read_labels
from .inference import Router
from .train import FitState, Splits, encode_splits, finish_router, fit, _optimizers, _predict_logits

WORK_DIR = ".update.partial"
PLAN = "plan.json"
FINETUNE_EPOCHS = 6                    # at most; early stopping on validation accuracy as in training
FINETUNE_PATIENCE = 2
FINETUNE_LR_SCALE = 1.0                # fine-tuning learning rate = the router's training rate x this


@dataclasses.dataclass
class UpdateResult:
    """What an add/remove did, for the CLI to print."""

    task: str
    labels: list[str]
    seconds: float = 0.0                    # router update (data + fine-tune + calibration + writing)
    old_accuracy_before: float | None = None  # other tasks' test accuracy with the old router
    old_accuracy_after: float | None = None   # the same records with the new router
    new_accuracy: float | None = None         # the added task's test accuracy
    adapter_dir: str = ""


def add_task(run: str | os.PathLike, data: str | os.PathLike, adapter: str | os.PathLike | None = None,
             task: str | None = None, lora_config: LoRATrainConfig | None = None, max_steps: int | None = None,
             overwrite: bool = False, progress: bool = True) -> UpdateResult:
    """Add the task of Q/A file ``data`` to ``run`` (see the module doc). ``adapter``: an existing PEFT LoRA folder
    for it (else one is trained with ``lora_config``, default: the run's first adapter's train_config.json, with
    ``max_steps`` when given). ``overwrite``: replace an existing ``RUN/adapters/<task>/`` folder that is not
    listed in the run."""
    root = _run_root(run)
    with _locked(root):
        return _add_task(root, data, adapter, task, lora_config, max_steps, overwrite, progress)


def _add_task(root: Path, data, adapter, task, lora_config, max_steps, overwrite: bool, progress: bool
              ) -> UpdateResult:
    pending = _finish_pending(root, progress)
    run_ = open_run(root, router=False)
    task_data = read_task(Path(data), task=task)
    name = task_data.name
    if pending == ("add", name):
        return UpdateResult(name, run_.names, adapter_dir=str(root / "adapters" / name))
    if name in run_.names:
        raise DLPError(f"{root / ADAPTER_LIST}: task {name!r} is already in the run (remove-task first to replace it)")
    final = root / "adapters" / name
    in_place = adapter is not None and Path(adapter).resolve() == final.resolve()
    if final.exists() and not in_place and not overwrite:
        raise DLPError(f"{final}: already exists (pass --overwrite to replace it, or --adapter {final} to use it)")
    if adapter is not None:
        check_adapter_dir(adapter)
        _check_same_base(Path(adapter), run_.adapter_dirs[0])
    work = _work_dir(root, {"op": "add", "task": name, "data": str(Path(data).resolve())})
    lora_config = lora_config or _run_lora_config(run_)
    if max_steps is not None:
        lora_config = dataclasses.replace(lora_config, max_steps=max_steps)
    staged = final if in_place else _stage_adapter(work, run_, Path(data), name, adapter, lora_config, progress)
    t0 = time.time()
    result = update_router_files(root, work, ("add", name), task_data, str(final), run_.names, progress)
    moves = [] if in_place else [(staged, final)]
    _commit(root, work, moves + _router_moves(root, work), run_.adapter_dirs + [final], ("add", name))
    result.seconds, result.adapter_dir = result.seconds or round(time.time() - t0, 3), str(final)
    return result


def remove_task(run: str | os.PathLike, task: str, progress: bool = True) -> UpdateResult:
    """Remove ``task`` from ``run``: adapters.txt line, router label row, router records (see the module doc)."""
    root = _run_root(run)
    with _locked(root):
        return _remove_task(root, task, progress)


def _remove_task(root: Path, task: str, progress: bool) -> UpdateResult:
    pending = _finish_pending(root, progress)
    run_ = open_run(root, router=False)
    if pending == ("remove", task):
        return UpdateResult(task, run_.names)
    if task not in run_.names:
        raise DLPError(f"{root / ADAPTER_LIST}: has no task {task!r} (tasks: {', '.join(run_.names)})")
    if len(run_.names) == 1:
        raise DLPError(f"{root / ADAPTER_LIST}: {task!r} is the only task of the run")
    work = _work_dir(root, {"op": "remove", "task": task})
    result = update_router_files(root, work, ("remove", task), None, "", run_.names, progress)
    dirs = [d for d, n in zip(run_.adapter_dirs, run_.names) if n != task]
    _commit(root, work, _router_moves(root, work), dirs, ("remove", task))
    result.adapter_dir = str(run_.adapter_dirs[run_.names.index(task)])
    return result


# Building the new artifacts in the work folder

def _run_root(run) -> Path:
    root = Path(run)
    if not root.is_dir() or not (root / ADAPTER_LIST).is_file():
        raise DLPError(f"{root}: not a run folder (no {ADAPTER_LIST}); add-task/remove-task change a run in place")
    return root


def _work_dir(root: Path, intent: dict) -> Path:
    """``RUN/.update.partial/``, kept when it holds the unfinished building of the same change (a trained adapter
    resumes there), else emptied."""
    work = root / WORK_DIR
    intent_file = work / "intent.json"
    if work.exists():
        same = intent_file.is_file() and read_json_file(intent_file) == intent
        if not same:
            shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    atomic_write_json(intent_file, intent)
    for name in (ROUTER_DATA_DIR, ROUTER_DIR):      # router-side artifacts are rebuilt (seconds)
        shutil.rmtree(work / name, ignore_errors=True)
    return work


def _stage_adapter(work: Path, run_, data: Path, name: str, adapter, lora_config, progress: bool) -> Path:
    """The new task's adapter in ``work/adapter``: a checked copy of ``adapter``, or a trained one (resumable)."""
    staged = work / "adapter"
    if adapter is not None:
        src = Path(adapter)
        check_adapter_dir(src)
        shutil.rmtree(staged, ignore_errors=True)
        shutil.copytree(src, staged, ignore=shutil.ignore_patterns("checkpoint-*", ".*"))
        meta = read_json_file(src / TASK_META) if (src / TASK_META).is_file() else {}
        task = read_task(data, task=name)
        atomic_write_json(staged / TASK_META, {**(meta if isinstance(meta, dict) else {}), "task": name,
                                               "data_file": str(data.resolve()), "metric": task.metric,
                                               "choices": task.choices, "records": len(task.records)})
        return staged
    from ..lora import train_adapter

    return Path(train_adapter(run_.base_model, data, staged, task=name, config=lora_config, resume=True,
                              progress=progress))


def _check_same_base(adapter: Path, reference: Path) -> None:
    """Refuse an adapter whose LoRA matrices do not fit the run's base model: compare the shapes of the
    modules both adapters adapt (read from the safetensors headers; no weights are loaded)."""
    from safetensors import safe_open

    def shapes(d: Path) -> dict[str, list[int]]:
        with safe_open(str(d / ADAPTER_WEIGHTS), framework="pt") as f:
            return {k: f.get_slice(k).get_shape() for k in f.keys()}

    try:
        new, ref = shapes(adapter), shapes(reference)
    except Exception as e:  # a corrupt file: one line naming it
        raise DLPError(f"{adapter / ADAPTER_WEIGHTS}: cannot read ({e.__class__.__name__})") from None
    for key, shape in new.items():
        other = ref.get(key)
        if other is None or len(shape) != 2 or len(other) != 2:
            continue
        dim = 1 if "lora_A" in key else 0               # A: (r, d_in), B: (d_out, r)
        if shape[dim] != other[dim]:
            raise DLPError(f"{adapter / ADAPTER_WEIGHTS}: tensor {key!r} has shape {shape}, the run's adapters "
                           f"{other}: it was trained for another base model")


@contextlib.contextmanager
def _locked(root: Path):
    """One update of a run at a time (an OS lock: released when the process ends, even when killed)."""
    import fcntl

    fd = os.open(root / ".update.lock", os.O_CREAT | os.O_RDWR, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise DLPError(f"{root}: another add-task/remove-task is changing this run; try again when it ends") \
                from None
        yield
    finally:
        os.close(fd)


def _run_lora_config(run_) -> LoRATrainConfig:
    """The LoRA settings the run's adapters were trained with (its first adapter's train_config.json)."""
    for d in run_.adapter_dirs:
        if (d / TRAIN_CONFIG).is_file():
            return load_config(LoRATrainConfig, d / TRAIN_CONFIG)
    return LoRATrainConfig()


def update_router_files(root: Path, work: Path, change: tuple[str, str], task_data, source: str,
                        names: list[str], progress: bool = False) -> UpdateResult:
    """``root/router_data`` and ``root/router`` changed by ``change`` = ("add", task) with its ``task_data``, or
    ("remove", task), written to ``work/router_data`` and ``work/router`` (each only when ``root`` has one).
    ``names``: the tasks before the change, in order; ``source``: the new task's adapter, for stats.json."""
    op, name = change
    data_dir, router_dir = root / ROUTER_DATA_DIR, root / ROUTER_DIR
    if router_dir.is_dir() and not data_dir.is_dir():
        raise DLPError(f"{root}: has {ROUTER_DIR}/ but no {ROUTER_DATA_DIR}/; the router update trains on it "
                       f"(build it with dlp-lora make-router-data --adapters {root})")
    if not data_dir.is_dir():
        return UpdateResult(name, [])
    check_label_order(read_labels(data_dir / LABELS_FILE), names, str(data_dir / LABELS_FILE))
    if router_dir.is_dir():
        check_label_order(read_labels(router_dir / LABELS_FILE), names, str(router_dir / LABELS_FILE))
    t0 = time.time()
    if op == "add":
        add_task_to_router_data(data_dir, task_data, work / ROUTER_DATA_DIR, source=source)
    else:
        remove_task_from_router_data(data_dir, name, work / ROUTER_DATA_DIR)
    labels, splits = read_router_data(work / ROUTER_DATA_DIR)
    result = UpdateResult(name, labels)
    if router_dir.is_dir():
        _update_router(Router.load(router_dir), labels, splits, work, change, result, progress)
    result.seconds = round(time.time() - t0, 3)
    return result


def _update_router(old: Router, labels: list[str], splits: dict, work: Path, change: tuple[str, str],
                   result: UpdateResult, progress: bool) -> None:
    """Grow (add) or shrink (remove) the router's output layer, fine-tune after an add, recalibrate, write."""
    op, name = change
    if old.kind != "mlp":
        raise DLPError(f"{old.path}: add-task/remove-task update mini-MLP routers; retrain this {old.kind} router "
                       "with dlp-lora train-router")
    expected = [t for t in old.labels if t != name] + ([name] if op == "add" else [])
    if labels != expected:
        raise DLPError(f"{old.path}: labels {old.labels} do not match the run's router data; retrain the router")
    keep = [i for i, t in enumerate(old.labels) if t != name]
    torch.manual_seed(old.config.seed)
    model = old.model.resized(keep, extra=1 if op == "add" else 0)
    data = encode_splits(old.encoder, splits)
    result.old_accuracy_before = _old_tasks_accuracy(old.model, data, labels, old.labels, name)
    config = old.config
    if op == "add":
        config = dataclasses.replace(old.config, epochs=FINETUNE_EPOCHS, patience=FINETUNE_PATIENCE,
                                     learning_rate=old.config.learning_rate * FINETUNE_LR_SCALE)
        gen = torch.Generator().manual_seed(config.seed)
        fit(model, config, data, 0, gen, _optimizers(model, config), FitState(), progress, desc="update router")
        config = dataclasses.replace(config, epochs=old.config.epochs, patience=old.config.patience)
        result.new_accuracy = _task_accuracy(model, data, labels.index(name))
    result.old_accuracy_after = _old_tasks_accuracy(model, data, labels, labels, name)
    metrics = {"update": {"op": op, "task": name, "old_tasks_test_accuracy_before": result.old_accuracy_before,
                          "old_tasks_test_accuracy_after": result.old_accuracy_after,
                          "new_task_test_accuracy": result.new_accuracy}}
    finish_router(model, config, old.tokenizer, old.config.tokenizer_source, labels, data, work / ROUTER_DIR,
                  metrics=metrics)


def _old_tasks_accuracy(model, data: Splits, labels: list[str], model_labels: list[str], name: str) -> float | None:
    """Test accuracy on the tasks other than ``name`` (the records of ``labels``), read through ``model_labels``."""
    y = data.y["test"]
    rows = torch.tensor([labels[i] != name for i in y.tolist()], dtype=torch.bool)
    if not bool(rows.any()):
        return None
    pred = _predict_logits(model, "mlp", data.enc["test"], 1024, 0).argmax(-1)
    pred_names = [model_labels[i] for i in pred[rows].tolist()]
    true_names = [labels[i] for i in y[rows].tolist()]
    return sum(a == b for a, b in zip(pred_names, true_names)) / len(true_names)


def _task_accuracy(model, data: Splits, label: int) -> float | None:
    rows = data.y["test"] == label
    if not bool(rows.any()):
        return None
    pred = _predict_logits(model, "mlp", data.enc["test"], 1024, 0).argmax(-1)
    return float((pred[rows] == label).float().mean())


# Moving the new artifacts into the run

def _router_moves(root: Path, work: Path) -> list[tuple[Path, Path]]:
    return [(work / name, root / name) for name in (ROUTER_DATA_DIR, ROUTER_DIR) if (work / name).is_dir()]


def _commit(root: Path, work: Path, moves: list[tuple[Path, Path]], adapter_dirs: list[Path],
            change: tuple[str, str]) -> None:
    """Write the plan (the point of no return), then carry it out."""
    plan = {"op": change[0], "task": change[1], "moves": [[str(a), str(b)] for a, b in moves],
            "adapters": [str(d) for d in adapter_dirs]}
    atomic_write_json(work / PLAN, plan)
    _carry_out(root, work, plan)


def _carry_out(root: Path, work: Path, plan: dict) -> None:
    """Idempotent: each staged folder replaces its target (the old one parked in ``work`` until the end), then
    adapters.txt is rewritten and the work folder removed. Safe to run again after an interruption."""
    for i, (src, dst) in enumerate(plan["moves"]):
        src, dst = Path(src), Path(dst)
        if not src.exists():
            continue                                    # moved by an earlier, interrupted run
        if dst.exists():
            os.replace(dst, work / f"old-{i}")
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.replace(src, dst)
    write_adapter_list(root / ADAPTER_LIST, [Path(d) for d in plan["adapters"]])
    shutil.rmtree(work, ignore_errors=True)


def _finish_pending(root: Path, progress: bool) -> tuple[str, str] | None:
    """Complete an update that was interrupted after its plan was written; returns its (op, task)."""
    plan_file = root / WORK_DIR / PLAN
    if not plan_file.is_file():
        return None
    plan = read_json_file(plan_file)
    if progress:
        print(f"{root}: finishing the interrupted {plan['op']}-task {plan['task']!r}")
    _carry_out(root, root / WORK_DIR, plan)
    return plan["op"], plan["task"]
