"""Page 4, the DLP-LoRA test: evaluate a run's systems (base, single-task LoRA, DLP-LoRA, ...) on test files
and show ``summary.md``, the plots and ``summary.json`` of the ``TestOutputs`` folder it writes."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from ..config import DLPError
from ..evaluate import DEFAULT_SYSTEMS, EVAL_SELECTION, SYSTEMS
from .common import PageDefaults, SELECTION_FIELDS, data_source, file_path, image, selection_from_form, text_or
from .jobs import LOCAL_SESSION, run_job


def eval_summary_views(out_dir: Path, summary: dict):
    """(markdown table, plot gallery) of an evaluate() output folder."""
    md_path = out_dir / "summary.md"
    md = (md_path.read_text(encoding="utf-8") if md_path.exists()
          else "```json\n" + json.dumps(summary, indent=2)[:6000] + "\n```")
    plots_dir = out_dir / "plots"
    plots = [(image(p), p.stem) for p in sorted(plots_dir.glob("*.png"))] if plots_dir.is_dir() else []
    return md, plots


def _run_spec(run: str, adapters_file) -> tuple[str, str | None]:
    """(what to open: the run folder or an uploaded adapters.txt, the run's own router for an upload)."""
    upload = file_path(adapters_file)
    spec = upload or run
    if not spec:
        raise DLPError("adapters: type a run folder or upload an adapters.txt")
    if not Path(spec).exists():
        raise DLPError(f"{spec}: not found")
    own_router = Path(run) / "router" if run and upload else None
    return spec, (str(own_router) if own_router is not None and own_router.is_dir() else None)


def run_eval(run, adapters_file, router, model, files, data_dir, *vals, session: str = LOCAL_SESSION):
    """Evaluate; yields (status, summary markdown, plots, summary.json) when done.

    ``vals``: the selection inputs, then systems, composite sizes, limit, output folder, overwrite. Uploaded
    test files are copied into a temporary folder that is removed afterwards."""
    from .. import evaluate as ev

    selection = selection_from_form(vals[:len(SELECTION_FIELDS)], base=EVAL_SELECTION)
    systems, composite, limit, out, overwrite = vals[len(SELECTION_FIELDS):]
    run = text_or(run, "")
    spec, own_router = _run_spec(run, adapters_file)
    if not systems:
        raise DLPError("systems: pick at least one")
    out_dir = Path(text_or(out, Path("TestOutputs") / (Path(run).name if run else "ui")))
    with tempfile.TemporaryDirectory(prefix="dlp-ui-") as tmp:
        data = data_source(files, data_dir, "test data", Path(tmp))
        # the run decides the base model and the router; the page's boxes only override them
        cfg = ev.EvalConfig(run_dir=spec, out_dir=str(out_dir), systems=list(systems), selection=selection,
                            model_spec=text_or(model, ""), router=text_or(router, own_router or ""),
                            composite=text_or(composite, ""), limit=int(limit or 0), overwrite=bool(overwrite),
                            **({"data_dir": data} if Path(data).is_dir() else {"data": [data]}))
        t0 = time.time()
        summary = yield from run_job("eval", session, lambda j: ev.evaluate(cfg, progress=True))
    md, plots = eval_summary_views(out_dir, summary)
    yield f"done in {time.time() - t0:.1f} s: outputs written to `{out_dir}`", md, plots, summary


def build(defaults: PageDefaults) -> None:
    """The DLP-LoRA test tab (API names: evaluate, cancel_eval)."""
    import gradio as gr

    from .widgets import cancel_button, handler, selection_inputs, wire_cancel

    with gr.Row():
        with gr.Column():
            run = gr.Textbox(value=defaults.run, label="run folder", info="holds adapters.txt and router/")
            adapters = gr.File(label="…or an adapters.txt (one adapter folder a line, absolute paths)",
                               file_count="single", file_types=[".txt"])
            router = gr.Textbox(label="router folder", placeholder="blank: <run>/router")
            model = gr.Textbox(value=defaults.model, label="base model", info="blank: the run's base model")
            files = gr.File(label="test data (task files)", file_count="multiple", file_types=[".json", ".jsonl"])
            data_dir = gr.Textbox(label="…or a test data folder / file")
        with gr.Column():
            sel = selection_inputs(EVAL_SELECTION)
            systems = gr.CheckboxGroup(list(SYSTEMS), value=list(DEFAULT_SYSTEMS), label="systems")
            composite = gr.Textbox(label="composite prompt sizes", placeholder="blank: none; e.g. 2,3",
                                   info="numbered prompts of N questions from N tasks (needed by dlp-segment, "
                                        "oracle-segment)")
            limit = gr.Number(value=20, precision=0, label="limit (records per task, 0 = all)")
            out = gr.Textbox(label="output folder", placeholder="blank: TestOutputs/<run name>")
            over = gr.Checkbox(label="overwrite an existing output folder", value=False)
    with gr.Row():
        btn = gr.Button("Run DLP-LoRA test", variant="primary")
        cancel = cancel_button()
    status = gr.Markdown("")
    summary_md = gr.Markdown("")
    plots = gr.Gallery(label="plots", columns=3, height="auto", object_fit="contain")
    summary = gr.JSON(label="summary.json")
    ev = btn.click(handler(run_eval), [run, adapters, router, model, files, data_dir, *sel, systems, composite, limit,
                                       out, over], [status, summary_md, plots, summary], api_name="evaluate",
                   concurrency_id="heavy", concurrency_limit=1)
    wire_cancel(cancel, "eval", [ev], status)
