"""Page 1, LoRA training: train one task's adapter with a live loss plot; test mode scores the base model and/or
that adapter on a test file through ``evaluate``."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from ..config import DLPError, LoRATrainConfig
from .common import (KEEP, PageDefaults, config_fields, config_from_values, existing_path, file_list, frame,
                     read_jsonl, task_file, text_or)
from .jobs import LOCAL_SESSION, Job, JobCancelled, run_job, start_job, wait_job

LORA_FIELDS = config_fields(LoRATrainConfig)
TEST_SYSTEMS = {"base": "base", "LoRA": "single"}     # the page's names -> evaluate's systems
TMP_PREFIX = "dlp-ui-"


def progress_bar(done: int, total: int, width: int = 20) -> str:
    """A text progress bar ``▰▰▱▱ 12/40 steps (30%)`` (``loading…`` before the first step)."""
    if total <= 0:
        return "loading model and data…"
    k = round(width * min(done, total) / total)
    return f"{'▰' * k}{'▱' * (width - k)} {done}/{total} steps ({100 * done // total}%)"


def loss_frame(points: list[tuple[float, float]]):
    """(step, loss) points as a float frame (an empty object-typed frame would make the plot's axes ordinal)."""
    import pandas as pd

    return pd.DataFrame({"step": pd.Series([float(s) for s, _ in points], dtype="float64"),
                         "loss": pd.Series([float(v) for _, v in points], dtype="float64")})


def loss_callback(job: Job):
    """A transformers TrainerCallback that records the loss and stops training when Cancel is pressed."""
    from transformers import TrainerCallback

    class _LossCallback(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                job.losses.append((float(state.global_step), float(logs["loss"])))

        def on_step_end(self, args, state, control, **kw):
            job.progress = (int(state.global_step), int(state.max_steps or 0))
            # Raise rather than control.should_training_stop: a stopped Trainer would still write a "finished"
            # adapter; raising leaves no adapter, only the library's resumable checkpoint folder (like Ctrl-C).
            if job.stop.is_set():
                raise JobCancelled()

    return _LossCallback()


def _done_message(name: str, path_out, meta: dict, seconds: float) -> str:
    start, end = meta.get("loss_start"), meta.get("loss_end")
    losses = f" — loss {start:.4f} → {end:.4f}" if isinstance(start, (int, float)) and isinstance(end, (int, float)) else ""
    return f"done: adapter `{name}` written to `{path_out}` in {seconds:.1f} s{losses}"


def train_lora(model, upload, path, task, out, overwrite, resume, *cfg_vals, defaults: PageDefaults = PageDefaults(),
               session: str = LOCAL_SESSION):
    """Train one adapter; yields (status, loss frame, dlp_task.json or None, adapter folder) while it trains."""
    from .. import data, lora
    from ..run import read_task_meta

    cfg = config_from_values(LoRATrainConfig, LORA_FIELDS, cfg_vals)
    with tempfile.TemporaryDirectory(prefix=TMP_PREFIX) as tmp:   # uploads live only as long as the job
        data_path = task_file(upload, path, Path(tmp))
        name = data.read_task(data_path, task=text_or(task, None)).name  # validates the file first: quick error
        out_dir = Path(text_or(out, defaults.root / "adapters" / name))
        mdl = text_or(model, "default")
        job = start_job("lora", session, lambda j: lora.train_adapter(
            mdl, data_path, out_dir, task=name, config=cfg, overwrite=bool(overwrite), resume=bool(resume),
            progress=True, callbacks=[loss_callback(j)]))
        t0 = time.time()

        def render():
            # the page streams the loss, so Gradio's own progress overlay is hidden: draw a bar here
            loss = f" · loss {job.losses[-1][1]:.4f}" if job.losses else ""
            msg = f"training `{name}` → `{out_dir}` · {progress_bar(*job.progress)} · {time.time() - t0:.0f} s{loss}"
            return msg, loss_frame(job.losses), None, KEEP

        path_out = yield from wait_job(job, render)
    meta = read_task_meta(path_out)
    rows = list(job.losses)
    if not rows and isinstance(meta.get("loss_start"), (int, float)):
        rows = [(0.0, meta["loss_start"]), (float(meta.get("steps", 1)), meta.get("loss_end"))]
    yield _done_message(name, path_out, meta, time.time() - t0), loss_frame(rows), meta, str(path_out)


def _test_run(adapter: str, test_file: str, tmp: Path) -> tuple[Path, Path]:
    """A one-adapter run (temporary adapters.txt) and the test file renamed to the adapter's task, so ``single``
    is this LoRA and ``base`` the base model on the same samples."""
    from ..data import read_task, write_task
    from ..run import check_adapter_dir, read_task_name, write_adapter_list

    adir = Path(adapter).expanduser()
    check_adapter_dir(adir)
    task_name = read_task_name(adir)
    td = read_task(test_file, task=task_name)
    write_adapter_list(tmp / "run" / "adapters.txt", [adir.resolve()])
    return tmp / "run", write_task(tmp / "data" / f"{task_name}.json", td)


def prediction_rows(pred_file: Path, limit: int = 20) -> list[dict]:
    """The first predictions of an evaluation: prompt, reference and each system's output."""
    rows = []
    for r in read_jsonl(pred_file, limit) if pred_file.exists() else []:
        rows.append({"prompt": r.get("prompt"), "reference": r.get("reference"), **(r.get("outputs") or {})})
    return rows


def eval_rows(summary: dict) -> list[dict]:
    """One row per (task, system) of an evaluate() summary: score and sub-metrics, plus time per sample."""
    rows = []
    timing = summary.get("timing") or {}
    for task, per_sys in (summary.get("per_task") or {}).items():
        for system, sc in per_sys.items():
            row = {"task": task, "system": "LoRA (single)" if system == "single" else system}
            row.update({k: (round(v, 2) if isinstance(v, float) else v) for k, v in sc.items()
                        if isinstance(v, (int, float)) or v is None})
            sps = (timing.get(system) or {}).get("seconds_per_sample")
            if sps is not None:
                row["s/sample"] = round(sps, 3)
            rows.append(row)
    return rows


def run_test_mode(adapter, systems, model, upload, path, limit, tokens, session: str = LOCAL_SESSION):
    """Test mode: base and/or the LoRA on a test file; yields (status, metrics frame, predictions frame). The
    temporary run and outputs are removed afterwards."""
    from .. import evaluate as ev

    test_file = file_list(upload)[0] if file_list(upload) else existing_path(path, "test file")
    adapter = text_or(adapter, None)
    if adapter is None:
        raise DLPError("LoRA adapter folder: train an adapter first or type its folder")
    chosen = tuple(TEST_SYSTEMS[s] for s in (systems or []) if s in TEST_SYSTEMS)
    if not chosen:
        raise DLPError("systems: pick base and/or LoRA")
    with tempfile.TemporaryDirectory(prefix=TMP_PREFIX) as tmp:
        run_dir, data_file = _test_run(adapter, test_file, Path(tmp))
        out_dir = Path(tmp) / "out"
        t0 = time.time()
        summary = yield from run_job("test", session, lambda j: ev.evaluate(
            str(run_dir), data=[str(data_file)], out_dir=str(out_dir), systems=list(chosen), limit=int(limit or 0),
            model_spec=text_or(model, ""), max_new_tokens=int(tokens or 32), progress=True))
        preds = prediction_rows(out_dir / "predictions.jsonl")
    yield (f"done: {', '.join(systems)} on `{Path(test_file).name}` ({time.time() - t0:.1f} s)",
           frame(eval_rows(summary)), frame(preds))


def build(defaults: PageDefaults) -> None:
    """The LoRA training tab (API names: train_lora, test_lora, cancel_lora, cancel_test)."""
    import gradio as gr

    from .widgets import cancel_button, config_inputs, handler, wire_cancel

    root = defaults.root
    with gr.Row():
        with gr.Column():
            model = gr.Textbox(value=defaults.train_model, label="base model", info="default | tiny | model folder")
            upload = gr.File(label="Q/A dataset (JSON DictList or JSONL; its .meta.json too)",
                             file_count="multiple", file_types=[".json", ".jsonl"])
            path = gr.Textbox(label="…or dataset path", placeholder="data/tasks/arith.json")
            task = gr.Textbox(label="task name", info="blank: from the file name / its .meta.json")
            out = gr.Textbox(label="output folder", placeholder=f"blank: {root / 'adapters'}/<task>")
            with gr.Row():
                over = gr.Checkbox(label="overwrite an existing output folder", value=False)
                resume = gr.Checkbox(label="resume an interrupted (cancelled) run", value=False)
        with gr.Column():
            with gr.Accordion("hyper-parameters (CLI defaults)", open=False):
                cfg = config_inputs(LoRATrainConfig, LORA_FIELDS)
    with gr.Row():
        btn = gr.Button("Train LoRA", variant="primary")
        cancel = cancel_button()
    status = gr.Markdown("")
    loss = gr.LinePlot(x="step", y="loss", label="training loss", height=220, y_axis_format=".3f")
    info = gr.JSON(label="dlp_task.json")
    adapter = _build_test_mode(gr, root, model)

    def train(*vals, session: str = LOCAL_SESSION):
        return (yield from train_lora(*vals, defaults=defaults, session=session))

    ev = btn.click(handler(train), [model, upload, path, task, out, over, resume, *cfg],
                   [status, loss, info, adapter], api_name="train_lora", concurrency_id="heavy", concurrency_limit=1)
    wire_cancel(cancel, "lora", [ev], status)


def _build_test_mode(gr, root: Path, model):
    """The test-mode block; returns its adapter box (training fills it)."""
    from .widgets import cancel_button, handler, wire_cancel

    gr.Markdown("### Test mode\nRun the base model and/or one LoRA on a test file (free generation, the `eval` "
                "metrics; the test file is scored as the adapter's task).")
    with gr.Row():
        adapter = gr.Textbox(label="LoRA adapter folder", info="filled after training",
                             placeholder=str(root / "adapters" / "<task>"))
        systems = gr.CheckboxGroup(list(TEST_SYSTEMS), value=list(TEST_SYSTEMS), label="systems")
        upload = gr.File(label="test file", file_count="single", file_types=[".json", ".jsonl"])
        path = gr.Textbox(label="…or test file path")
    with gr.Row():
        limit = gr.Number(value=20, precision=0, label="limit (records, 0 = all)")
        tokens = gr.Number(value=32, precision=0, label="max new tokens")
        btn = gr.Button("Test", variant="primary")
        cancel = cancel_button()
    status = gr.Markdown("")
    table = gr.Dataframe(label="metrics (points, 0-100)", interactive=False)
    preds = gr.Dataframe(label="predictions (first 20)", interactive=False, wrap=True)
    ev = btn.click(handler(run_test_mode), [adapter, systems, model, upload, path, limit, tokens], [status, table, preds],
                   api_name="test_lora", concurrency_id="heavy", concurrency_limit=1)
    wire_cancel(cancel, "test", [ev], status)
    return adapter
