"""Page 2, router training: train the mini-MLP (or albert / distilroberta) on router data and show per-task
accuracy, the confusion matrix and ``metrics.json``."""

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
