"""``dlp-lora ui``: the Gradio web app — the seed's four pages plus a live routing playground.

Thin by design: every page only collects inputs, calls the library (``lora``, ``router``, ``pipeline``,
``evaluate``) and shows what it returns or wrote. Gradio is imported only inside this module (an optional
extra), and only inside functions, so ``import dlp_lora.ui`` stays cheap.

Long jobs run in a worker thread while the page's handler (a generator, on Gradio's queue) streams progress
(``gr.Progress(track_tqdm=True)`` picks up the library's tqdm bars) and partial results. Every page has a
Cancel button: it asks the job to stop (the LoRA trainer and the playground stop cooperatively) and otherwise
interrupts the worker thread; artifacts are written with ``atomic_dir``, so a cancelled job leaves nothing
half written. Errors show as the same one-line messages the CLI prints, never tracebacks.
"""

# No ``from __future__ import annotations`` here: Gradio injects ``gr.Request`` by evaluating handler annotations
# at runtime, and ``gr`` is only imported inside build_app.
import contextvars
import ctypes
import dataclasses
import functools
import inspect
import io
import json
import os
import re
import shutil
import tempfile
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Iterator

from .config import DLPError, LoRATrainConfig, RouterConfig, RouterDataConfig

# No telemetry, no version check, no share links: the app must work on a machine without network.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

MAX_TASK_SLIDERS = 32          # manual-mixture sliders created up front (Gradio layouts are static)
SYSTEMS = ("base", "single", "dlp", "uniform")
_POLL_S = 0.4                  # how often a running job's page is refreshed
_EMPTY_REPLY = "*(no visible text: only whitespace was generated)*"


# ---------------------------------------------------------------------------------------------------------------
# Jobs: a worker thread per long action, one per (browser session, page), cancellable
# ---------------------------------------------------------------------------------------------------------------

class JobCancelled(BaseException):
    """Raised inside a worker thread when its page's Cancel button is pressed.

    A BaseException (like KeyboardInterrupt) so library ``except Exception`` blocks do not swallow it and
    ``atomic_dir`` still removes its temporary folder.
    """


class _Job:
    """A library call running in a thread, with a stop flag, a loss log and a text stream."""

    def __init__(self, fn: Callable[["_Job"], Any]) -> None:
        self.stop = threading.Event()
        self.done = threading.Event()
        self.losses: list[tuple[float, float]] = []   # (step, loss) from the trainer's logs
        self.text: list[str] = []                     # streamed generation deltas
        self.progress: tuple[int, int] = (0, 0)       # (done, total) steps, when the job reports them
        self.result: Any = None
        self.error: BaseException | None = None
        # copy the handler's context so gr.Progress(track_tqdm=True) sees the library's tqdm bars
        ctx = contextvars.copy_context()
        self.thread = threading.Thread(target=ctx.run, args=(self._run, fn), daemon=True, name="dlp-ui-job")
        self.thread.start()

    def _run(self, fn) -> None:
        try:
            self.result = fn(self)
        except BaseException as e:  # noqa: BLE001 - handed to the page as a one-line message
            self.error = e
        finally:
            self.done.set()

    def cancel(self, grace_s: float = 2.0) -> None:
        """Ask the job to stop; interrupt its thread if it does not stop cooperatively within ``grace_s``."""
        self.stop.set()
        if self.done.wait(grace_s) or self.thread.ident is None:
            return
        # the exception is delivered at the thread's next Python bytecode (between torch ops)
        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(self.thread.ident), ctypes.py_object(JobCancelled))


_JOBS: dict[tuple[str, str], _Job] = {}
_JOBS_LOCK = threading.Lock()


def _session(request) -> str:
    return getattr(request, "session_hash", None) or "local"


def _start(page: str, request, fn: Callable[[_Job], Any]) -> _Job:
    key = (_session(request), page)
    with _JOBS_LOCK:
        old = _JOBS.get(key)
        if old is not None and not old.done.is_set():
            raise DLPError(f"{page}: a job is already running on this page (press Cancel first)")
        job = _JOBS[key] = _Job(fn)
    return job


def _wait(job: _Job, render: Callable[[], Any] | None = None) -> Iterator[Any]:
    """Yield ``render()`` while ``job`` runs; return its result (or raise its error). Use with ``yield from``."""
    try:
        while not job.done.wait(_POLL_S):
            if render is not None:
                upd = render()
                if upd is not None:
                    yield upd
    finally:
        if not job.done.is_set():  # the page went away or the event was cancelled: stop the work too
            threading.Thread(target=job.cancel, daemon=True).start()
    if job.error is not None:
        raise job.error
    return job.result


def cancel_job(page: str, request=None) -> str:
    """Cancel the running job of ``page`` for this browser session; returns a status line."""
    with _JOBS_LOCK:
        job = _JOBS.get((_session(request), page))
    if job is None or job.done.is_set():
        return "nothing to cancel"
    job.cancel()
    return "cancelled"


# ---------------------------------------------------------------------------------------------------------------
# Errors: the CLI's one-line messages, shown in the page
# ---------------------------------------------------------------------------------------------------------------

def error_message(e: BaseException) -> str:
    """The one line a user sees for ``e`` (same wording as the CLI's ``error: ...``)."""
    first = str(e).splitlines()[0] if str(e).strip() else ""
    if isinstance(e, DLPError):
        return first or "failed"
    if isinstance(e, (JobCancelled, KeyboardInterrupt)):
        return "cancelled"
    return f"internal error: {e.__class__.__name__}: {first} (set DLP_LORA_DEBUG=1 for details)"


def _friendly(fn):
    """Turn any exception of a handler into ``gr.Error(one line)``; keeps generator-ness and signature."""
    import gradio as gr

    def convert(e: BaseException):
        if isinstance(e, gr.Error):
            return e
        if os.environ.get("DLP_LORA_DEBUG") and not isinstance(e, (DLPError, JobCancelled)):
            import traceback

            traceback.print_exception(e)
        return gr.Error(error_message(e), print_exception=False)

    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def gen(*args, **kwargs):
            try:
                return (yield from fn(*args, **kwargs))
            except (Exception, JobCancelled) as e:  # noqa: BLE001
                raise convert(e) from None
        return gen

    @functools.wraps(fn)
    def call(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (Exception, JobCancelled) as e:  # noqa: BLE001
            raise convert(e) from None
    return call


# ---------------------------------------------------------------------------------------------------------------
# Small helpers: inputs -> library arguments
# ---------------------------------------------------------------------------------------------------------------

def _field_docs(cls: type) -> dict[str, str]:
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


def _config_fields(cls: type, skip: tuple[str, ...] = ()) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if f.name not in skip]


def _config_from_values(cls: type, fields: list[dataclasses.Field], values, **extra) -> Any:
    """Build config ``cls`` from the page's inputs, cast to each field's default type."""
    kw = dict(extra)
    for f, v in zip(fields, values):
        default = f.default
        name = f.name
        if isinstance(default, bool):
            kw[name] = bool(v)
        elif isinstance(default, int):
            if v is None or v == "":
                raise DLPError(f"{name}: a whole number is required")
            if float(v) != int(float(v)):
                raise DLPError(f"{name}: must be a whole number, got {v!r}")
            kw[name] = int(float(v))
        elif isinstance(default, float):
            if v is None or v == "":
                raise DLPError(f"{name}: a number is required")
            kw[name] = float(v)
        else:
            kw[name] = "" if v is None else str(v).strip()
    return cls(**kw)


def _file_path(f) -> str | None:
    """Path of a gr.File value (str, dict or FileData-like), or None."""
    if f is None:
        return None
    if isinstance(f, (str, os.PathLike)):
        return str(f)
    if isinstance(f, dict):
        return f.get("path") or f.get("name")
    return getattr(f, "path", None) or getattr(f, "name", None)


def _file_list(files) -> list[str]:
    if files is None:
        return []
    if not isinstance(files, (list, tuple)):
        files = [files]
    return [p for p in (_file_path(f) for f in files) if p]


def _one_input(upload, path: str | None, what: str) -> str:
    """An uploaded file wins over a typed path; one of them is required."""
    up = _file_list(upload)
    if up:
        return up[0]
    path = (path or "").strip()
    if not path:
        raise DLPError(f"{what}: upload a file or type a path")
    if not Path(path).expanduser().exists():
        raise DLPError(f"{path}: file not found")
    return str(Path(path).expanduser())


def _task_file(upload, path: str | None) -> str:
    """One uploaded task file (its ``<stem>.meta.json`` sidecar may be uploaded with it) or a typed path."""
    ups = _file_list(upload)
    if not ups:
        return _one_input(None, path, "dataset")
    folder = Path(_uploads_as_dir(ups, "dataset"))
    data = [p for p in sorted(folder.iterdir()) if not p.name.endswith(".meta.json")]
    if len(data) != 1:
        raise DLPError(f"dataset: upload one task file (and optionally its .meta.json), got {len(data)}")
    return str(data[0])


def _uploads_as_dir(files, what: str) -> str:
    """Copy uploads into one temporary folder under their original names (so ``<stem>.meta.json`` sidecars
    stay next to their task files) and return the folder."""
    paths = _file_list(files)
    if not paths:
        raise DLPError(f"{what}: no files uploaded")
    d = Path(tempfile.mkdtemp(prefix="dlp-ui-upload-"))
    for p in paths:
        shutil.copy2(p, d / Path(p).name)
    return str(d)


def _data_source(files, folder: str | None, what: str) -> str:
    """Uploaded files (copied into one folder) or a typed folder/file path."""
    if _file_list(files):
        return _uploads_as_dir(files, what)
    folder = (folder or "").strip()
    if not folder:
        raise DLPError(f"{what}: upload files or type a folder")
    p = Path(folder).expanduser()
    if not p.exists():
        raise DLPError(f"{folder}: not found")
    return str(p)


def _default_root(run: str | None) -> Path:
    return Path(run) if run else Path("runs") / "ui"


def _image(path: Path):
    """Load a PNG into memory (Gradio then serves its own copy, whatever folder the run lives in)."""
    from PIL import Image

    with Image.open(path) as im:
        return im.copy()


def _read_jsonl(path: Path, limit: int | None = None) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                rows.append(json.loads(line))
                if limit is not None and len(rows) >= limit:
                    break
    return rows


def _bar(done: int, total: int, width: int = 20) -> str:
    """A text progress bar ``▰▰▱▱ 12/40 steps (30%)`` (``loading…`` before the first step)."""
    if total <= 0:
        return "loading model and data…"
    k = round(width * min(done, total) / total)
    return f"{'▰' * k}{'▱' * (width - k)} {done}/{total} steps ({100 * done // total}%)"


def _loss_df(points: list[tuple[float, float]]):
    """(step, loss) points as a float frame (an empty object-typed frame would make the plot's axes ordinal)."""
    import pandas as pd

    return pd.DataFrame({"step": pd.Series([float(s) for s, _ in points], dtype="float64"),
                         "loss": pd.Series([float(v) for _, v in points], dtype="float64")})


def _df(rows: list[dict], columns: list[str] | None = None):
    import pandas as pd

    return pd.DataFrame(rows, columns=columns)


# ---------------------------------------------------------------------------------------------------------------
# Pipeline cache: loading the model + adapters + router once per (model, run, router) keeps the playground fast
# ---------------------------------------------------------------------------------------------------------------

_PIPES: "OrderedDict[tuple[str, str, str], Any]" = OrderedDict()
_PIPES_LOCK = threading.Lock()
_PIPES_KEEP = 2                # pipelines kept in memory (each holds a base model)


def model_for(adapters: str) -> str:
    """The base model the adapters were trained on (``dlp_task.json`` ``base_model.name_or_path`` when that
    folder exists here), else ``"default"``."""
    from .lora import read_adapter_list, read_task_meta

    for d in read_adapter_list(adapters):
        base = read_task_meta(d).get("base_model") or {}
        p = base.get("name_or_path") if isinstance(base, dict) else None
        if p and (Path(p) / "config.json").is_file():
            return str(p)
    return "default"


def _router_dir(run: str, router: str | None) -> str | None:
    if router and router.strip():
        return router.strip()
    if not run:
        return None
    base = Path(run).parent if Path(run).is_file() else Path(run)  # a run folder or its adapters.txt
    return str(base / "router") if (base / "router").is_dir() else None


def get_pipeline(model: str, run: str, router: str | None = None):
    """The cached :class:`DLPPipeline` for ``(model, run, router)`` (loaded on first use)."""
    run = (run or "").strip()
    if not run:
        raise DLPError("run: type a run folder (with adapters.txt and router/) or an adapters.txt")
    if not Path(run).exists():
        raise DLPError(f"{run}: not found")
    model = (model or "").strip() or model_for(run)
    rdir = _router_dir(run, router)
    key = (model, str(Path(run).resolve()), str(Path(rdir).resolve()) if rdir else "")
    with _PIPES_LOCK:
        if key in _PIPES:
            _PIPES.move_to_end(key)
            return _PIPES[key]
        from .pipeline import DLPPipeline

        pipe = DLPPipeline.from_pretrained(model, run, router=rdir)
        _PIPES[key] = pipe
        while len(_PIPES) > _PIPES_KEEP:
            _PIPES.popitem(last=False)
        return pipe


def clear_pipelines() -> None:
    with _PIPES_LOCK:
        _PIPES.clear()


# ---------------------------------------------------------------------------------------------------------------
# Routing chart: one bar chart of router probabilities per sentence, selected adapters highlighted
# ---------------------------------------------------------------------------------------------------------------

def routing_chart(routing: list[dict], names: list[str], max_sentences: int = 12):
    """A PIL image: for each routed sentence, the router's probability per task; the selected tasks are
    coloured and labelled with their fusion weight. ``routing`` is ``GenerationResult.routing``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from PIL import Image

    entries = list(routing)[:max_sentences]
    if not entries:
        entries = [{"sentence": "(no routing: manual mixture or base model)", "selected": [], "weights": [],
                    "probs": {}}]
    n = max(1, len(names))
    row_h = 0.9 + 0.24 * n
    fig = Figure(figsize=(8.0, min(60.0, row_h * len(entries))), dpi=90)
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(entries), 1, squeeze=False)[:, 0]
    for i, (ax, r) in enumerate(zip(axes, entries)):
        probs = r.get("probs") or {}
        sel = dict(zip(r.get("selected") or [], r.get("weights") or []))
        labels = list(names) or list(probs) or list(sel)
        # a forced (manual) mixture has no router probabilities: draw its weights instead
        vals = [float(probs.get(t, 0.0)) if probs else float(sel.get(t, 0.0)) for t in labels]
        colors = ["#f97316" if t in sel else "#9ca3af" for t in labels]
        y = list(range(len(labels)))[::-1]
        ax.barh(y, vals, color=colors)
        ax.set_yticks(y, labels, fontsize=8)
        ax.set_xlim(0, 1.08)
        for yy, t, v in zip(y, labels, vals):
            if t in sel:
                ax.text(min(v, 0.80) + 0.01, yy, f"w={sel[t]:.2f}", va="center", fontsize=8, color="#9a3412",
                        fontweight="bold")
        s = " ".join(str(r.get("sentence", "")).split())
        tag = "" if probs else "  [manual mixture: bars = weights]"
        ax.set_title(f"{i + 1}. {s[:80]}{'…' if len(s) > 80 else ''}{tag}", fontsize=9, loc="left")
        ax.tick_params(axis="x", labelsize=7)
    axes[-1].set_xlabel("router probability (orange: selected, w = fusion weight)", fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    buf.seek(0)
    return Image.open(buf).convert("RGB")


def routing_rows(routing: list[dict]) -> list[dict]:
    rows = []
    for i, r in enumerate(routing):
        sel = r.get("selected") or []
        w = r.get("weights") or []
        probs = r.get("probs") or {}
        top = max(probs.items(), key=lambda kv: kv[1]) if probs else ("", 0.0)
        rows.append({"#": i + 1, "sentence": r.get("sentence", ""),
                     "selected": ", ".join(f"{t} ({x:.2f})" for t, x in zip(sel, w)) or "(base model)",
                     "top task": f"{top[0]} ({top[1]:.2f})" if probs else ""})
    return rows


# ---------------------------------------------------------------------------------------------------------------
# Page actions (plain functions, also usable without a browser)
# ---------------------------------------------------------------------------------------------------------------

def _loss_callback(job: _Job):
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


def _summary_md(title: str, d: dict, keys: list[str] | None = None) -> str:
    keys = keys or list(d)
    lines = [f"**{title}**", "", "| field | value |", "|---|---|"]
    for k in keys:
        if k in d:
            v = d[k]
            if isinstance(v, float):
                v = f"{v:.4g}"
            elif isinstance(v, (dict, list)):
                v = json.dumps(v)[:120]
            lines.append(f"| {k} | {v} |")
    return "\n".join(lines)


def _eval_summary_views(out_dir: Path, summary: dict):
    """(markdown table, plot gallery) of an evaluate() output folder."""
    md_path = out_dir / "summary.md"
    md = md_path.read_text(encoding="utf-8") if md_path.exists() else "```json\n" + json.dumps(summary, indent=2)[:6000] + "\n```"
    plots = [(_image(p), p.stem) for p in sorted((out_dir / "plots").glob("*.png"))] if (out_dir / "plots").is_dir() else []
    return md, plots


def _router_metric_views(router_dir: Path):
    """(per-task accuracy rows, overall markdown, confusion image) from ``router/metrics.json``."""
    mpath = router_dir / "metrics.json"
    metrics = json.loads(mpath.read_text(encoding="utf-8")) if mpath.exists() else {}
    per_task = metrics.get("per_task_accuracy") or {}   # task -> accuracy (fraction) on the test split
    rows = []
    for t, a in per_task.items():
        # metrics.json holds fractions; the page shows percentages like the paper's tables
        rows.append({"task": t, "accuracy %": round(100.0 * a, 2) if isinstance(a, (int, float)) else a})
    scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)}
    md = _summary_md(f"router metrics ({mpath})", scalars) if scalars else f"router written to `{router_dir}`"
    conf = router_dir / "confusion.png"
    return rows, md, (_image(conf) if conf.exists() else None)


# ---------------------------------------------------------------------------------------------------------------
# The app
# ---------------------------------------------------------------------------------------------------------------

def build_app(run: str | os.PathLike | None = None, model: str | None = None):
    """The Gradio app (``gr.Blocks``): pages for LoRA training, router training, router data, DLP-LoRA test
    and the routing playground. ``run`` pre-fills every page's folders; ``model`` pre-fills the base model
    (None: ``default`` for training, the adapters' own base model for testing and the playground)."""
    import gradio as gr

    run = str(run) if run else ""
    root = _default_root(run or None)
    train_model = model or "default"
    model = model or ""

    lora_fields = _config_fields(LoRATrainConfig)
    lora_docs = _field_docs(LoRATrainConfig)
    rcfg_fields = _config_fields(RouterConfig, skip=("kind", "vocab_size", "tokenizer", "num_labels"))
    rcfg_docs = _field_docs(RouterConfig)
    rdata_fields = _config_fields(RouterDataConfig)
    rdata_docs = _field_docs(RouterDataConfig)
    choice_fields = {"precision": ["auto", "bf16", "fp32"], "granularity": ["prompt", "sentence"],
                     "pooling": ["mean", "mean+max"]}

    def config_inputs(fields, docs) -> list:
        comps = []
        for f in fields:
            d, info = f.default, docs.get(f.name)
            if f.name in choice_fields:
                c = gr.Dropdown(choice_fields[f.name], value=d, label=f.name, info=info)
            elif isinstance(d, bool):
                c = gr.Checkbox(value=d, label=f.name, info=info)
            elif isinstance(d, int):
                c = gr.Number(value=d, precision=0, label=f.name, info=info)
            elif isinstance(d, float):
                c = gr.Number(value=d, label=f.name, info=info)
            else:
                c = gr.Textbox(value=d, label=f.name, info=info)
            comps.append(c)
        return comps

    def cancel_button():
        return gr.Button("Cancel", variant="stop", size="sm")

    def wire_cancel(btn, page: str, events: list, status):
        def _cancel(request: gr.Request):
            return cancel_job(page, request)

        btn.click(_cancel, None, status, cancels=events, queue=False, api_name=f"cancel_{page}")

    with gr.Blocks(title="DLP-LoRA", analytics_enabled=False) as app:
        gr.Markdown("# DLP-LoRA\nPer-sentence routed fusion of task LoRAs — train adapters and a router, build "
                    "router data, evaluate, and watch the router pick adapters in the playground."
                    + (f"  \nRun folder: `{run}`" if run else ""))
        with gr.Tabs():
            # ------------------------------------------------------------------------------------- 1. LoRA
            with gr.Tab("1 · LoRA training", id="lora"):
                with gr.Row():
                    with gr.Column():
                        l_model = gr.Textbox(value=train_model, label="base model",
                                             info="default | tiny | model folder")
                        l_upload = gr.File(label="Q/A dataset (JSON DictList or JSONL; its .meta.json too)",
                                           file_count="multiple", file_types=[".json", ".jsonl"])
                        l_path = gr.Textbox(label="…or dataset path", placeholder="data/tasks/arith.json")
                        l_task = gr.Textbox(label="task name", info="blank: from the file name / its .meta.json")
                        l_out = gr.Textbox(label="output folder",
                                           placeholder=f"blank: {root / 'adapters'}/<task>")
                        with gr.Row():
                            l_over = gr.Checkbox(label="overwrite an existing output folder", value=False)
                            l_resume = gr.Checkbox(label="resume an interrupted (cancelled) run", value=False)
                    with gr.Column():
                        with gr.Accordion("hyper-parameters (CLI defaults)", open=False):
                            l_cfg = config_inputs(lora_fields, lora_docs)
                with gr.Row():
                    l_btn = gr.Button("Train LoRA", variant="primary")
                    l_cancel = cancel_button()
                l_status = gr.Markdown("")
                l_loss = gr.LinePlot(x="step", y="loss", label="training loss", height=220, y_axis_format=".3f")
                l_info = gr.JSON(label="dlp_task.json")

                @_friendly
                def train_lora(request: gr.Request, progress=gr.Progress(track_tqdm=True), *vals):
                    mdl, upload, path, task, out, over, resume, *cfg_vals = vals
                    return (yield from _train_lora(mdl, upload, path, task, out, over, resume, cfg_vals, request))

                def _train_lora(mdl, upload, path, task, out, over, resume, cfg_vals, request):
                    from . import data, lora

                    data_path = _task_file(upload, path)
                    cfg = _config_from_values(LoRATrainConfig, lora_fields, cfg_vals)
                    task = (task or "").strip() or None
                    name = data.read_task(data_path, task=task).name  # validates the file first: quick error
                    out_dir = Path(out.strip()) if (out or "").strip() else root / "adapters" / name
                    mdl = (mdl or "default").strip() or "default"

                    def work(job: _Job):
                        return lora.train_adapter(mdl, data_path, out_dir, task=name, config=cfg,
                                                  overwrite=bool(over), resume=bool(resume), progress=True,
                                                  callbacks=[_loss_callback(job)])

                    job = _start("lora", request, work)
                    t0 = time.time()

                    def render():
                        # the page streams the loss, so Gradio's own progress overlay is hidden: draw a bar here
                        loss = job.losses[-1][1] if job.losses else None
                        msg = (f"training `{name}` → `{out_dir}` · {_bar(*job.progress)} · {time.time() - t0:.0f} s"
                               + (f" · loss {loss:.4f}" if loss is not None else ""))
                        return (msg, _loss_df(job.losses), None,
                                gr.update())

                    path_out = yield from _wait(job, render)
                    meta = lora.read_task_meta(path_out)
                    rows = list(job.losses)
                    if not rows and isinstance(meta.get("loss_start"), (int, float)):
                        rows = [(0.0, meta["loss_start"]), (float(meta.get("steps", 1)), meta.get("loss_end"))]
                    msg = (f"done: adapter `{name}` written to `{path_out}` in {time.time() - t0:.1f} s"
                           + (f" — loss {meta.get('loss_start'):.4f} → {meta.get('loss_end'):.4f}"
                              if isinstance(meta.get("loss_start"), (int, float))
                              and isinstance(meta.get("loss_end"), (int, float)) else ""))
                    yield msg, _loss_df(rows), meta, str(path_out)

                gr.Markdown("### Test mode\nRun the base model and/or one LoRA on a test file (free generation, "
                            "the `eval` metrics; the test file is scored as the adapter's task).")
                with gr.Row():
                    t_adapter = gr.Textbox(label="LoRA adapter folder", info="filled after training",
                                           placeholder=str(root / "adapters" / "<task>"))
                    t_systems = gr.CheckboxGroup(["base", "LoRA"], value=["base", "LoRA"], label="systems")
                    t_upload = gr.File(label="test file", file_count="single", file_types=[".json", ".jsonl"])
                    t_path = gr.Textbox(label="…or test file path")
                with gr.Row():
                    t_limit = gr.Number(value=20, precision=0, label="limit (records, 0 = all)")
                    t_tokens = gr.Number(value=32, precision=0, label="max new tokens")
                    t_btn = gr.Button("Test", variant="primary")
                    t_cancel = cancel_button()
                t_status = gr.Markdown("")
                t_table = gr.Dataframe(label="metrics (points, 0-100)", interactive=False)
                t_preds = gr.Dataframe(label="predictions (first 20)", interactive=False, wrap=True)

                @_friendly
                def test_mode(adapter, systems, mdl, upload, path, limit, tokens, request: gr.Request,
                              progress=gr.Progress(track_tqdm=True)):
                    test_file = _one_input(upload, path, "test file")
                    adapter = (adapter or "").strip()
                    if not adapter:
                        raise DLPError("LoRA adapter folder: train an adapter first or type its folder")
                    systems = tuple("single" if s == "LoRA" else s for s in (systems or []))
                    if not systems:
                        raise DLPError("systems: pick base and/or LoRA")
                    out_dir = Path(tempfile.mkdtemp(prefix="dlp-ui-test-")) / "out"
                    work = _test_mode_work(adapter, systems, mdl, test_file, out_dir, int(limit or 0) or None,
                                           int(tokens or 32))
                    job = _start("test", request, work)
                    t0 = time.time()
                    summary = yield from _wait(job)  # Gradio's overlay shows the library's tqdm progress
                    preds = []
                    for r in _read_jsonl(out_dir / "predictions.jsonl", 20) if (out_dir / "predictions.jsonl").exists() else []:
                        row = {"prompt": r.get("prompt"), "reference": r.get("reference")}
                        for sy, txt in (r.get("outputs") or {}).items():
                            row[sy] = txt
                        preds.append(row)
                    yield (f"done: {', '.join(systems)} on `{Path(test_file).name}` ({time.time() - t0:.1f} s); "
                           f"outputs in `{out_dir}`", _df(_eval_rows(summary)), _df(preds))

                t_ev = t_btn.click(test_mode, [t_adapter, t_systems, l_model, t_upload, t_path, t_limit, t_tokens],
                                   [t_status, t_table, t_preds], api_name="test_lora",
                                   concurrency_id="heavy", concurrency_limit=1)
                wire_cancel(t_cancel, "test", [t_ev], t_status)
                l_ev = l_btn.click(train_lora, [l_model, l_upload, l_path, l_task, l_out, l_over, l_resume, *l_cfg],
                                   [l_status, l_loss, l_info, t_adapter], api_name="train_lora",
                                   concurrency_id="heavy", concurrency_limit=1)
                wire_cancel(l_cancel, "lora", [l_ev], l_status)

            # ------------------------------------------------------------------------------------- 2. router
            with gr.Tab("2 · Router training", id="router"):
                with gr.Row():
                    with gr.Column():
                        r_kind = gr.Dropdown(["mlp", "albert", "distilroberta"], value="mlp", label="router type",
                                             info="mlp: the paper's mini-MLP on the base model's tokenizer")
                        r_data = gr.Textbox(value=str(root / "router_data") if run else "",
                                            label="router data folder", info="train/val/test.jsonl + labels.json")
                        r_model = gr.Textbox(value=train_model, label="base model (its tokenizer feeds the mini-MLP)")
                        r_out = gr.Textbox(label="output folder", placeholder=f"blank: {root / 'router'}")
                        r_over = gr.Checkbox(label="overwrite an existing output folder", value=False)
                    with gr.Column():
                        with gr.Accordion("hyper-parameters (CLI defaults)", open=False):
                            r_cfg = config_inputs(rcfg_fields, rcfg_docs)
                with gr.Row():
                    r_btn = gr.Button("Train router", variant="primary")
                    r_cancel = cancel_button()
                r_status = gr.Markdown("")
                with gr.Row():
                    r_acc = gr.Dataframe(label="per-task accuracy (test split)", interactive=False)
                    r_conf = gr.Image(label="confusion matrix", type="pil", interactive=False)
                r_md = gr.Markdown("")

                @_friendly
                def train_router_ui(request: gr.Request, progress=gr.Progress(track_tqdm=True), *vals):
                    from .router import train_router

                    kind, data_dir, mdl, out, over, *cfg_vals = vals
                    cfg = _config_from_values(RouterConfig, rcfg_fields, cfg_vals, kind=kind or "mlp")
                    data_dir = (data_dir or "").strip()
                    if not data_dir:
                        raise DLPError("router data folder: type a folder made by the router dataset maker")
                    out_dir = Path(out.strip()) if (out or "").strip() else root / "router"
                    job = _start("router", request, lambda j: train_router(
                        data_dir, (mdl or "default").strip() or "default", out_dir, config=cfg,
                        overwrite=bool(over), progress=True))
                    t0 = time.time()
                    path = yield from _wait(job)  # Gradio's overlay shows the library's tqdm progress
                    rows, md, conf = _router_metric_views(Path(path))
                    yield (f"done: router written to `{path}` in {time.time() - t0:.1f} s", _df(rows), conf, md)

                r_ev = r_btn.click(train_router_ui, [r_kind, r_data, r_model, r_out, r_over, *r_cfg],
                                   [r_status, r_acc, r_conf, r_md], api_name="train_router",
                                   concurrency_id="heavy", concurrency_limit=1)
                wire_cancel(r_cancel, "router", [r_ev], r_status)

            # ------------------------------------------------------------------------------------- 3. data
            with gr.Tab("3 · Router dataset maker", id="router_data"):
                with gr.Row():
                    with gr.Column():
                        d_upload = gr.File(label="task datasets (one Q/A file per task; .meta.json sidecars too)",
                                           file_count="multiple", file_types=[".json", ".jsonl"])
                        d_folder = gr.Textbox(label="…or a folder of task files", placeholder="data/tasks")
                        d_adapters = gr.Textbox(value=run, label="…or adapters (run folder or adapters.txt)",
                                                info="used when no task files are given: each adapter's training "
                                                     "file, labels in adapter order")
                        d_out = gr.Textbox(label="output folder", placeholder=f"blank: {root / 'router_data'}")
                        d_over = gr.Checkbox(label="overwrite an existing output folder", value=False)
                    with gr.Column():
                        d_cfg = config_inputs(rdata_fields, rdata_docs)
                with gr.Row():
                    d_btn = gr.Button("Make router data", variant="primary")
                    d_cancel = cancel_button()
                d_status = gr.Markdown("")
                d_counts = gr.Dataframe(label="records per split and task", interactive=False)
                d_preview = gr.Dataframe(label="preview (first train records)", interactive=False, wrap=True)

                @_friendly
                def make_data(request: gr.Request, progress=gr.Progress(track_tqdm=True), *vals):
                    from .router import make_router_data

                    files, folder, adapters, out, over, *cfg_vals = vals
                    cfg = _config_from_values(RouterDataConfig, rdata_fields, cfg_vals)
                    adapters = (adapters or "").strip() or None
                    have_data = bool(_file_list(files)) or bool((folder or "").strip())
                    # the library takes exactly one source: task files win, else the adapters' training files
                    data_dir = _data_source(files, folder, "task datasets") if (have_data or not adapters) else None
                    if data_dir is not None:
                        adapters = None
                    out_dir = Path(out.strip()) if (out or "").strip() else root / "router_data"
                    job = _start("router_data", request, lambda j: make_router_data(
                        out_dir, adapters=adapters, data_dir=data_dir, config=cfg, overwrite=bool(over)))
                    path = yield from _wait(job)
                    counts, preview = _router_data_views(Path(path))
                    yield f"done: router data written to `{path}`", counts, preview

                d_ev = d_btn.click(make_data, [d_upload, d_folder, d_adapters, d_out, d_over, *d_cfg],
                                   [d_status, d_counts, d_preview], api_name="make_router_data",
                                   concurrency_id="heavy", concurrency_limit=1)
                wire_cancel(d_cancel, "router_data", [d_ev], d_status)

                gr.Markdown("### Fusion of labelled router files\nMerge several `{text, label, task}` JSONL "
                            "files (e.g. made separately) into one file.")
                with gr.Row():
                    f_upload = gr.File(label="labelled router files (.jsonl)", file_count="multiple",
                                       file_types=[".jsonl"])
                    f_paths = gr.Textbox(label="…or paths (one a line)", lines=3)
                    f_out = gr.Textbox(label="output file", placeholder=f"blank: {root / 'router_data_fused.jsonl'}")
                f_btn = gr.Button("Fuse")
                f_status = gr.Markdown("")
                f_preview = gr.Dataframe(label="fused records (first 20)", interactive=False, wrap=True)

                @_friendly
                def fuse(files, paths, out):
                    from .router import fuse_router_files

                    srcs = _file_list(files) + [p.strip() for p in (paths or "").splitlines() if p.strip()]
                    if not srcs:
                        raise DLPError("router files: upload files or type paths")
                    out_path = Path(out.strip()) if (out or "").strip() else root / "router_data_fused.jsonl"
                    res = fuse_router_files(srcs, out_path)
                    res_path = Path(res) if isinstance(res, (str, os.PathLike)) else out_path
                    rows = _read_jsonl(res_path, 20) if res_path.is_file() else []
                    total = sum(1 for line in open(res_path, encoding="utf-8") if line.strip()) if res_path.is_file() else 0
                    return f"done: {len(srcs)} file(s) fused into `{res_path}` ({total} records)", _df(rows)

                f_btn.click(fuse, [f_upload, f_paths, f_out], [f_status, f_preview], api_name="fuse_router_files")

            # ------------------------------------------------------------------------------------- 4. eval
            with gr.Tab("4 · DLP-LoRA test", id="eval"):
                with gr.Row():
                    with gr.Column():
                        e_run = gr.Textbox(value=run, label="run folder", info="holds adapters.txt and router/")
                        e_adapters = gr.File(label="…or an adapters.txt (one adapter folder a line, absolute paths)",
                                             file_count="single", file_types=[".txt"])
                        e_router = gr.Textbox(label="router folder", placeholder="blank: <run>/router")
                        e_model = gr.Textbox(value=model, label="base model",
                                             info="blank: the adapters' base model (dlp_task.json)")
                        e_data = gr.File(label="test data (task files)", file_count="multiple",
                                         file_types=[".json", ".jsonl"])
                        e_data_dir = gr.Textbox(label="…or a test data folder / file")
                    with gr.Column():
                        e_top_p = gr.Slider(0.05, 1.0, value=0.8, step=0.05, label="top-p")
                        e_weighting = gr.Radio(["paper", "renorm"], value="paper", label="weighting",
                                               info="paper: softmax over kept probs (Eq. 5); renorm: kept / sum")
                        e_gran = gr.Radio(["prompt", "sentence"], value="prompt", label="granularity")
                        e_systems = gr.CheckboxGroup(list(SYSTEMS), value=["base", "single", "dlp"], label="systems")
                        e_limit = gr.Number(value=20, precision=0, label="limit (records per task, 0 = all)")
                        e_out = gr.Textbox(label="output folder", placeholder="blank: TestOutputs/<run name>")
                        e_over = gr.Checkbox(label="overwrite an existing output folder", value=False)
                with gr.Row():
                    e_btn = gr.Button("Run DLP-LoRA test", variant="primary")
                    e_cancel = cancel_button()
                e_status = gr.Markdown("")
                e_summary = gr.Markdown("")
                e_plots = gr.Gallery(label="plots", columns=3, height="auto", object_fit="contain")
                e_json = gr.JSON(label="summary.json")

                @_friendly
                def run_eval(run_dir, adapters_file, router, mdl, files, data_dir, top_p, weighting, gran,
                             systems, limit, out, over, request: gr.Request, progress=gr.Progress(track_tqdm=True)):
                    from . import evaluate as ev

                    run_dir = (run_dir or "").strip()
                    adapters = _file_path(adapters_file) or run_dir
                    if not adapters:
                        raise DLPError("adapters: type a run folder or upload an adapters.txt")
                    if not Path(adapters).exists():
                        raise DLPError(f"{adapters}: not found")
                    data = _data_source(files, data_dir, "test data")
                    systems = list(systems or [])
                    if not systems:
                        raise DLPError("systems: pick at least one")
                    name = Path(run_dir).name if run_dir else "ui"
                    out_dir = Path(out.strip()) if (out or "").strip() else Path("TestOutputs") / name
                    if out_dir.exists() and not over:  # before any model is loaded
                        raise DLPError(f"{out_dir}: already exists (tick overwrite to replace it)")
                    router = (router or "").strip() or None
                    spec = (mdl or "").strip() or None
                    data_kw = {"data_dir": data} if Path(data).is_dir() else {"data": [data]}

                    def work(job):
                        pipe = None
                        if router is not None or _file_path(adapters_file):
                            # router not beside the adapters (or an uploaded adapters.txt): load them together
                            from .pipeline import DLPPipeline

                            pipe = DLPPipeline.from_pretrained(spec or model_for(adapters), adapters,
                                                               router=router or _router_dir(run_dir, None))
                        return ev.evaluate(run_dir=adapters, out_dir=out_dir, systems=tuple(systems),
                                           limit=(int(limit) if limit else None), top_p=float(top_p),
                                           weighting=weighting, granularity=gran, model_spec=spec,
                                           overwrite=bool(over), pipeline=pipe, progress=True, **data_kw)

                    job = _start("eval", request, work)
                    t0 = time.time()
                    summary = yield from _wait(job)  # Gradio's overlay shows the library's tqdm progress
                    md, plots = _eval_summary_views(out_dir, summary)
                    yield (f"done in {time.time() - t0:.1f} s: outputs written to `{out_dir}`", md, plots, summary)

                e_ev = e_btn.click(run_eval, [e_run, e_adapters, e_router, e_model, e_data, e_data_dir, e_top_p,
                                              e_weighting, e_gran, e_systems, e_limit, e_out, e_over],
                                   [e_status, e_summary, e_plots, e_json], api_name="evaluate",
                                   concurrency_id="heavy", concurrency_limit=1)
                wire_cancel(e_cancel, "eval", [e_ev], e_status)

            # ------------------------------------------------------------------------------------- 5. playground
            with gr.Tab("5 · Playground", id="playground"):
                with gr.Row():
                    p_run = gr.Textbox(value=run, label="run folder", info="adapters.txt + router/", scale=3)
                    p_model = gr.Textbox(value=model, label="base model", scale=2,
                                         info="blank: the adapters' base model")
                    p_router = gr.Textbox(label="router folder", placeholder="blank: <run>/router", scale=2)
                    p_load = gr.Button("Load", scale=1)
                p_loaded = gr.Markdown("")
                with gr.Row():
                    with gr.Column(scale=3):
                        p_chat = gr.Chatbot(label="conversation", height=320)
                        p_prompt = gr.Textbox(label="prompt", lines=2, placeholder="Type a prompt and press Send",
                                              elem_id="dlp-prompt")
                        with gr.Row():
                            p_send = gr.Button("Send", variant="primary", elem_id="dlp-send")
                            p_stop = gr.Button("Stop", variant="stop")
                            p_clear = gr.Button("Clear")
                        p_status = gr.Markdown("")
                    with gr.Column(scale=2):
                        p_top_p = gr.Slider(0.05, 1.0, value=0.8, step=0.05, label="top-p")
                        p_weighting = gr.Radio(["paper", "renorm"], value="paper", label="weighting")
                        p_gran = gr.Radio(["sentence", "prompt"], value="sentence", label="granularity")
                        p_tokens = gr.Slider(1, 512, value=64, step=1, label="max new tokens")
                        p_temp = gr.Slider(0.0, 2.0, value=0.0, step=0.05, label="temperature (0 = greedy)")
                        p_history = gr.Checkbox(value=False, label="chat: include earlier turns")
                        with gr.Accordion("manual mixture (set the weights yourself)", open=False):
                            p_manual = gr.Checkbox(value=False, label="use these weights instead of the router")
                            p_norm = gr.Checkbox(value=True, label="normalise weights to sum 1")
                            p_sliders = [gr.Slider(0.0, 1.0, value=0.0, step=0.05, label=f"task {i}",
                                                   visible=False) for i in range(MAX_TASK_SLIDERS)]
                            p_more = gr.Textbox(label="weights as text (task=weight, …)",
                                                info="used in addition to the sliders (and for tasks beyond "
                                                     f"the first {MAX_TASK_SLIDERS})")
                p_chart = gr.Image(label="routing: router probabilities per sentence", type="pil",
                                   interactive=False, elem_id="dlp-routing-chart")
                p_table = gr.Dataframe(label="routing per sentence", interactive=False, wrap=True)
                p_names = gr.State([])

                @_friendly
                def load(run_dir, mdl, router, progress=gr.Progress(track_tqdm=True)):
                    pipe = get_pipeline(mdl, run_dir, router)
                    names = list(pipe.names)
                    ups = []
                    for i in range(MAX_TASK_SLIDERS):
                        if i < len(names):
                            ups.append(gr.update(visible=True, label=names[i]))
                        else:
                            ups.append(gr.update(visible=False))
                    router_txt = "a router" if getattr(pipe, "router", None) is not None else "no router"
                    mdl = (mdl or "").strip() or model_for(run_dir)
                    msg = (f"loaded `{mdl}` with {len(names)} adapters ({', '.join(names[:12])}"
                           f"{'…' if len(names) > 12 else ''}) and {router_txt}")
                    return (msg, names, *ups)

                p_load.click(load, [p_run, p_model, p_router], [p_loaded, p_names, *p_sliders], api_name="load",
                             concurrency_id="pipeline", concurrency_limit=1)

                @_friendly
                def chat(request: gr.Request, *vals):
                    (prompt, history, run_dir, mdl, router, top_p, weighting, gran, tokens, temp, use_history,
                     manual, norm, more, *slider_vals) = vals
                    prompt = (prompt or "").strip()
                    if not prompt:
                        raise DLPError("prompt: type something first")
                    pipe = get_pipeline(mdl, run_dir, router)
                    names = list(pipe.names)
                    weights = None
                    if manual:
                        weights = [_manual_weights(names, slider_vals, more, norm)]
                    history = list(history or [])
                    text_in, chat_flag = prompt, True
                    if use_history and history:
                        text_in, chat_flag = _chat_text(pipe.tokenizer, history, prompt)

                    def work(job: _Job):
                        return pipe.generate(
                            [text_in], top_p=float(top_p), weighting=weighting, granularity=gran, weights=weights,
                            max_new_tokens=int(tokens), temperature=float(temp), chat=chat_flag,
                            on_text=lambda row, delta: (job.text.append(delta), job.stop.is_set())[1])

                    job = _start("playground", request, work)
                    user = {"role": "user", "content": prompt}
                    t0 = time.time()

                    def render():
                        return (history + [user, {"role": "assistant", "content": "".join(job.text) or "…"}],
                                f"generating … {time.time() - t0:.1f} s", None, None, "")

                    results = yield from _wait(job, render)
                    res = results[0]
                    routing = list(getattr(res, "routing", None) or [])
                    done = (f"{res.completion_tokens} tokens in {res.seconds:.2f} s, finish: {res.finish_reason}; "
                            f"{len(routing)} routing decision(s)" + (" (manual mixture)" if manual else ""))
                    shown = res.text if res.text.strip() else _EMPTY_REPLY
                    yield (history + [user, {"role": "assistant", "content": shown}], done,
                           routing_chart(routing, names), _df(routing_rows(routing)), "")

                p_ev = p_send.click(chat, [p_prompt, p_chat, p_run, p_model, p_router, p_top_p, p_weighting, p_gran,
                                           p_tokens, p_temp, p_history, p_manual, p_norm, p_more, *p_sliders],
                                    [p_chat, p_status, p_chart, p_table, p_prompt], api_name="generate",
                                    concurrency_id="pipeline", concurrency_limit=1)
                p_ev2 = p_prompt.submit(chat, [p_prompt, p_chat, p_run, p_model, p_router, p_top_p, p_weighting,
                                               p_gran, p_tokens, p_temp, p_history, p_manual, p_norm, p_more,
                                               *p_sliders],
                                        [p_chat, p_status, p_chart, p_table, p_prompt], api_name=False,
                                        concurrency_id="pipeline", concurrency_limit=1)

                def _stop(request: gr.Request):
                    return cancel_job("playground", request)

                # Stop: the generation loop sees the flag through on_text and ends the row ("cancelled"),
                # keeping the text so far; the event itself is not killed so the partial answer is shown.
                p_stop.click(_stop, None, p_status, queue=False, api_name="stop")
                p_clear.click(lambda: ([], "", None, None), None, [p_chat, p_status, p_chart, p_table],
                              queue=False, api_name=False)

    app.queue(default_concurrency_limit=1)
    return app


def _test_mode_work(adapter: str, systems: tuple, mdl: str, test_file: str, out_dir: Path, limit,
                    max_new_tokens: int):
    """Test mode through ``evaluate``: a one-adapter run (a temporary adapters.txt) and the test file renamed
    to the adapter's task, so ``single`` is this LoRA and ``base`` the base model on the same samples."""
    from . import data as dmod, evaluate as ev, lora

    adir = Path(adapter).expanduser()
    lora.check_adapter_dir(adir)
    task_name = lora.read_task_meta(adir).get("task") or adir.name
    td = dmod.read_task(test_file, task=task_name)

    def work(job):
        tmp = out_dir.parent
        lora.write_adapter_list(tmp / "run" / "adapters.txt", [adir.resolve()])
        data = dmod.write_task(tmp / "data" / f"{task_name}.json", td)
        spec = (mdl or "").strip() or None
        return ev.evaluate(run_dir=str(tmp / "run"), data=[str(data)], out_dir=out_dir, systems=systems,
                           limit=limit, model_spec=spec, max_new_tokens=max_new_tokens, progress=True)

    return work


def _eval_rows(summary: dict) -> list[dict]:
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


def _router_data_views(out_dir: Path):
    counts = []
    for split in ("train", "val", "test"):
        p = out_dir / f"{split}.jsonl"
        if not p.exists():
            continue
        per: dict[str, int] = {}
        for r in _read_jsonl(p):
            per[str(r.get("task", r.get("label")))] = per.get(str(r.get("task", r.get("label"))), 0) + 1
        for t, n in sorted(per.items()):
            counts.append({"split": split, "task": t, "records": n})
    preview = _read_jsonl(out_dir / "train.jsonl", 10) if (out_dir / "train.jsonl").exists() else []
    return _df(counts, ["split", "task", "records"]), _df(preview)


def _manual_weights(names: list[str], slider_vals, more: str | None, normalise: bool) -> dict[str, float]:
    """Per-task weights from the sliders plus ``task=weight`` text; all zero means the base model."""
    w = {n: float(v or 0.0) for n, v in zip(names, slider_vals)}
    for part in re.split(r"[,\n]", more or ""):
        if not part.strip():
            continue
        if "=" not in part:
            raise DLPError(f"weights: {part.strip()!r}: expected task=weight")
        k, v = (s.strip() for s in part.split("=", 1))
        if k not in names:
            raise DLPError(f"weights: unknown task {k!r} (tasks: {', '.join(names)})")
        try:
            w[k] = float(v)
        except ValueError:
            raise DLPError(f"weights: {k}: {v!r} is not a number") from None
        if w[k] < 0:
            raise DLPError(f"weights: {k}: must be >= 0, got {w[k]}")
    total = sum(w.values())
    if normalise and total > 0:
        w = {k: v / total for k, v in w.items()}
    return {k: v for k, v in w.items() if v > 0}


def _chat_text(tokenizer, history: list[dict], prompt: str) -> tuple[str, bool]:
    """The whole conversation as one prompt through the tokenizer's chat template (raw text, chat=False)."""
    msgs = []
    for m in history:
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, list):  # Gradio may hand back [{"type": "text", "text": ...}]
            content = " ".join(c.get("text", "") for c in content if isinstance(c, dict))
        if isinstance(content, str) and content != _EMPTY_REPLY and m.get("role") in ("user", "assistant"):
            msgs.append({"role": m["role"], "content": content})
    msgs.append({"role": "user", "content": prompt})
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True), False
    text = "".join(f"{'Question' if m['role'] == 'user' else 'Answer'}: {m['content']}\n" for m in msgs)
    return text + "Answer: ", False


def launch(run: str | os.PathLike | None = None, host: str = "127.0.0.1", port: int = 7860, model: str | None = None,
           prevent_thread_lock: bool = False, quiet: bool = False):
    """Start the app on ``host:port`` (loopback unless told otherwise; never a public share link)."""
    app = build_app(run=run, model=model)
    app.launch(server_name=host, server_port=int(port), share=False, inbrowser=False,
               prevent_thread_lock=prevent_thread_lock, quiet=quiet, show_error=True, ssr_mode=False,
               mcp_server=False, pwa=False, max_file_size="200mb")
    return app
