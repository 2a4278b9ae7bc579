"""Page 2, router training: train the mini-MLP (or albert / distilroberta) on router data and show per-task
accuracy, the confusion matrix and ``metrics.json``; add a task to a run, or remove one, without starting over."""

from __future__ import annotations

import json
import time
from pathlib import Path

from ..config import DLPError, RouterConfig
from .common import PageDefaults, config_fields, config_from_values, frame, image, summary_md, text_or
from .jobs import LOCAL_SESSION, run_job

ROUTER_KINDS = ("mlp", "albert", "distilroberta")
ROUTER_FIELDS = config_fields(RouterConfig, skip=("kind", "vocab_size", "tokenizer", "num_labels"))


def router_metric_views(router_dir: Path):
    """(per-task accuracy rows, overall markdown, confusion image) from ``router/metrics.json``."""
    mpath = router_dir / "metrics.json"
    metrics = json.loads(mpath.read_text(encoding="utf-8")) if mpath.exists() else {}
    per_task = metrics.get("per_task_accuracy") or {}   # task -> accuracy (fraction) on the test split
    # metrics.json holds fractions; the page shows percentages like the paper's tables
    rows = [{"task": t, "accuracy %": round(100.0 * a, 2) if isinstance(a, (int, float)) else a}
            for t, a in per_task.items()]
    scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)}
    md = summary_md(f"router metrics ({mpath})", scalars) if scalars else f"router written to `{router_dir}`"
    conf = router_dir / "confusion.png"
    return rows, md, (image(conf) if conf.exists() else None)


def train_router_page(kind, data_dir, model, out, overwrite, *cfg_vals, defaults: PageDefaults = PageDefaults(),
                      session: str = LOCAL_SESSION):
    """Train a router; yields (status, accuracy frame, confusion image, metrics markdown) when done."""
    from ..router import train_router

    cfg = config_from_values(RouterConfig, ROUTER_FIELDS, cfg_vals, kind=kind or ROUTER_KINDS[0])
    data_dir = text_or(data_dir, None)
    if data_dir is None:
        raise DLPError("router data folder: type a folder made by the router dataset maker")
    out_dir = Path(text_or(out, defaults.root / "router"))
    t0 = time.time()
    path = yield from run_job("router", session, lambda j: train_router(
        data_dir, text_or(model, "default"), out_dir, config=cfg, overwrite=bool(overwrite), progress=True))
    rows, md, conf = router_metric_views(Path(path))
    yield f"done: router written to `{path}` in {time.time() - t0:.1f} s", frame(rows), conf, md


def _update_summary(what: str, res) -> str:
    """One status line for an add/remove: the label order kept, the router's time and accuracy figures."""
    def pct(v):
        return "-" if v is None else f"{100.0 * v:.2f} %"

    return (f"done: {what} `{res.task}` in {res.seconds:.1f} s; labels now {', '.join(res.labels)}; other tasks' "
            f"test accuracy {pct(res.old_accuracy_before)} -> {pct(res.old_accuracy_after)}"
            + (f"; new task {pct(res.new_accuracy)}" if res.new_accuracy is not None else ""))


def add_task_page(run, data_file, adapter, overwrite, defaults: PageDefaults = PageDefaults(),
                  session: str = LOCAL_SESSION):
    """Add the task of a Q/A file to a run (its adapter given, or trained) and update the router; yields a status
    line. Existing adapters and the label order are kept (``dlp_lora.router.update``)."""
    from ..router.update import add_task

    run = text_or(run, defaults.run or None)
    data_file = text_or(getattr(data_file, "name", data_file), None)
    if run is None or data_file is None:
        raise DLPError("add a task: type the run folder and the task's Q/A file")
    res = yield from run_job("router-update", session, lambda j: add_task(
        run, data_file, adapter=text_or(adapter, None), overwrite=bool(overwrite), progress=True))
    yield _update_summary("added", res)


def remove_task_page(run, task, defaults: PageDefaults = PageDefaults(), session: str = LOCAL_SESSION):
    """Remove a task from a run (adapters.txt line, router label row, router records); yields a status line."""
    from ..router.update import remove_task

    run, task = text_or(run, defaults.run or None), text_or(task, None)
    if run is None or task is None:
        raise DLPError("remove a task: type the run folder and the task name")
    res = yield from run_job("router-update", session, lambda j: remove_task(run, task, progress=True))
    yield _update_summary("removed", res)


def build_update(defaults: PageDefaults) -> None:
    """Add / remove a task of a run (API names: add_task, remove_task)."""
    import gradio as gr

    from .widgets import handler

    with gr.Accordion("add or remove a task (keeps the other adapters and the label order)", open=False):
        with gr.Row():
            run = gr.Textbox(value=str(defaults.run or ""), label="run folder", info="adapters.txt + router/")
            data = gr.Textbox(label="new task's Q/A file (.json / .jsonl)")
            adapter = gr.Textbox(label="its PEFT adapter folder", placeholder="blank: train one like the run's")
            over = gr.Checkbox(label="replace an unlisted RUN/adapters/<task>/ folder", value=False)
        with gr.Row():
            add_btn = gr.Button("Add task")
            task = gr.Textbox(label="task to remove")
            rm_btn = gr.Button("Remove task")
        status = gr.Markdown("")

    def add(*vals, session: str = LOCAL_SESSION):
        return (yield from add_task_page(*vals, defaults=defaults, session=session))

    def remove(*vals, session: str = LOCAL_SESSION):
        return (yield from remove_task_page(*vals, defaults=defaults, session=session))

    add_btn.click(handler(add), [run, data, adapter, over], [status], api_name="add_task",
                  concurrency_id="heavy", concurrency_limit=1)
    rm_btn.click(handler(remove), [run, task], [status], api_name="remove_task",
                 concurrency_id="heavy", concurrency_limit=1)


def build(defaults: PageDefaults) -> None:
    """The router training tab (API names: train_router, cancel_router)."""
    import gradio as gr

    from .widgets import cancel_button, config_inputs, handler, wire_cancel

    root = defaults.root
    with gr.Row():
        with gr.Column():
            kind = gr.Dropdown(list(ROUTER_KINDS), value=ROUTER_KINDS[0], label="router type",
                               info="mlp: the paper's mini-MLP on the base model's tokenizer")
            data = gr.Textbox(value=str(root / "router_data") if defaults.run else "", label="router data folder",
                              info="train/val/test.jsonl + labels.json")
            model = gr.Textbox(value=defaults.train_model, label="base model (its tokenizer feeds the mini-MLP)")
            out = gr.Textbox(label="output folder", placeholder=f"blank: {root / 'router'}")
            over = gr.Checkbox(label="overwrite an existing output folder", value=False)
        with gr.Column():
            with gr.Accordion("hyper-parameters (CLI defaults)", open=False):
                cfg = config_inputs(RouterConfig, ROUTER_FIELDS)
    with gr.Row():
        btn = gr.Button("Train router", variant="primary")
        cancel = cancel_button()
    status = gr.Markdown("")
    with gr.Row():
        acc = gr.Dataframe(label="per-task accuracy (test split)", interactive=False)
        conf = gr.Image(label="confusion matrix", type="pil", interactive=False)
    md = gr.Markdown("")

    def train(*vals, session: str = LOCAL_SESSION):
        return (yield from train_router_page(*vals, defaults=defaults, session=session))

    ev = btn.click(handler(train), [kind, data, model, out, over, *cfg], [status, acc, conf, md],
                   api_name="train_router", concurrency_id="heavy", concurrency_limit=1)
    wire_cancel(cancel, "router", [ev], status)
    build_update(defaults)
