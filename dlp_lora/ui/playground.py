"""Page 5, the playground: chat with the fused model and watch the router pick adapters for each sentence,
or set the mixture yourself (manual mode). Inference only: nothing here imports a training module.

Loading (base model + fused adapters + router) goes through ``DLPPipeline.from_run``; the run decides the base
model and the router, the page's boxes only override them. The last few loaded pipelines stay in memory.
"""

from __future__ import annotations

import re
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

from ..config import DLPError
from ..data import format_conversation
from ..run import Run, open_run
from .common import PageDefaults, SELECTION_FIELDS, frame, selection_from_form, text_or, update
from .jobs import LOCAL_SESSION, Job, cancel_job, start_job, wait_job
from .routing_view import routing_chart, routing_rows

PAGE = "playground"
MAX_TASK_SLIDERS = 32          # manual-mixture sliders created up front (Gradio layouts are static)
EMPTY_REPLY = "*(no visible text: only whitespace was generated)*"
PIPELINES_KEPT = 2             # loaded pipelines kept in memory (each holds a base model)

_PIPES: "OrderedDict[tuple, Any]" = OrderedDict()
_PIPES_LOCK = threading.Lock()


# loaded pipelines ----------------------------------------------------------------------------------------------

def _model_key(spec: str) -> str:
    p = Path(spec).expanduser()
    return str(p.resolve()) if p.is_dir() else spec


def resolve_run(run: str | None, model: str | None = None, router: str | None = None) -> Run:
    """The run as the page's boxes give it: ``model``/``router`` blank = the run's own."""
    spec = text_or(run, None)
    if spec is None:
        raise DLPError("run: type a run folder (with adapters.txt and router/) or an adapters.txt")
    return open_run(spec, router=text_or(router, None), model=text_or(model, None))


def pipeline_for(resolved: Run):
    """The cached ``DLPPipeline`` of a resolved run (loaded on first use)."""
    from ..pipeline import DLPPipeline

    key = (_model_key(resolved.base_model), tuple(map(str, resolved.adapter_dirs)), str(resolved.router_dir or ""))
    with _PIPES_LOCK:
        if key not in _PIPES:
            _PIPES[key] = DLPPipeline.from_run(resolved)
            while len(_PIPES) > PIPELINES_KEPT:
                _PIPES.popitem(last=False)
        _PIPES.move_to_end(key)
        return _PIPES[key]


def get_pipeline(run: str | None, model: str | None = None, router: str | None = None):
    """The cached ``DLPPipeline`` of a run; ``model``/``router`` blank = the run's own."""
    return pipeline_for(resolve_run(run, model, router))


def clear_pipelines() -> None:
    with _PIPES_LOCK:
        _PIPES.clear()


# form values -> generate() arguments ---------------------------------------------------------------------------

def manual_weights(names: list[str], slider_vals, more: str | None, normalise: bool) -> dict[str, float]:
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
        if not 0 <= w[k] < float("inf"):
            raise DLPError(f"weights: {k}: must be a finite number >= 0, got {v}")
    total = sum(w.values())
    if normalise and total > 0:
        w = {k: v / total for k, v in w.items()}
    return {k: v for k, v in w.items() if v > 0}


def chat_text(tokenizer, history: list[dict], prompt: str) -> tuple[str, bool]:
    """The whole conversation as one prompt through the tokenizer's chat template (raw text, chat=False)."""
    msgs = []
    for m in history:
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, list):  # Gradio may hand back [{"type": "text", "text": ...}]
            content = " ".join(c.get("text", "") for c in content if isinstance(c, dict))
        if isinstance(content, str) and content != EMPTY_REPLY and m.get("role") in ("user", "assistant"):
            msgs.append({"role": m["role"], "content": content})
    msgs.append({"role": "user", "content": prompt})
    return format_conversation(tokenizer, msgs), False


# handlers ------------------------------------------------------------------------------------------------------

def load(run: str, model: str, router: str) -> tuple:
    """Load (or reuse) the run's pipeline; returns (message, task names, one slider update per task slot)."""
    resolved = resolve_run(run, model, router)
    pipe = pipeline_for(resolved)
    names = list(pipe.names)
    sliders = [update(visible=True, label=names[i]) if i < len(names) else update(visible=False)
               for i in range(MAX_TASK_SLIDERS)]
    router_txt = "a router" if getattr(pipe, "router", None) is not None else "no router"
    msg = (f"loaded `{resolved.base_model}` with {len(names)} adapters ({', '.join(names[:12])}"
           f"{'…' if len(names) > 12 else ''}) and {router_txt}")
    return (msg, names, *sliders)


N_OPTIONS = len(SELECTION_FIELDS) + 6   # selection inputs, then tokens, temperature, history, manual, norm, text


def chat(prompt, history, run, model, router, *vals, session: str = LOCAL_SESSION):
    """Generate an answer to ``prompt`` (streamed); yields (conversation, status, chart, routing table, prompt box).

    ``vals``: the selection inputs, max new tokens, temperature, include earlier turns, manual mixture,
    normalise, ``task=weight`` text, then the manual-mixture sliders."""
    selection = selection_from_form(vals[:len(SELECTION_FIELDS)])
    tokens, temp, use_history, manual, norm, more = vals[len(SELECTION_FIELDS):N_OPTIONS]
    prompt = (prompt or "").strip()
    if not prompt:
        raise DLPError("prompt: type something first")
    pipe = get_pipeline(run, model, router)
    names = list(pipe.names)
    weights = [manual_weights(names, vals[N_OPTIONS:], more, norm)] if manual else None
    history = list(history or [])
    text_in, chat_flag = chat_text(pipe.tokenizer, history, prompt) if use_history and history else (prompt, True)

    def work(job: Job):
        return pipe.generate([text_in], selection, weights=weights, max_new_tokens=int(tokens),
                             temperature=float(temp), chat=chat_flag,
                             on_text=lambda row, delta: (job.text.append(delta), job.stop.is_set())[1])

    job = start_job(PAGE, session, work)
    user = {"role": "user", "content": prompt}
    t0 = time.time()

    def render():
        return (history + [user, {"role": "assistant", "content": "".join(job.text) or "…"}],
                f"generating … {time.time() - t0:.1f} s", None, None, "")

    res = (yield from wait_job(job, render))[0]
    routing = list(res.routing or [])
    done = (f"{res.completion_tokens} tokens in {res.seconds:.2f} s, finish: {res.finish_reason}; "
            f"{len(routing)} routing decision(s)" + (" (manual mixture)" if manual else ""))
    shown = res.text if res.text.strip() else EMPTY_REPLY
    yield (history + [user, {"role": "assistant", "content": shown}], done, routing_chart(routing, names),
           frame(routing_rows(routing)), "")


def stop(session: str = LOCAL_SESSION) -> str:
    """Stop the running generation; the text so far is kept (the row ends as "cancelled")."""
    return cancel_job(PAGE, session)


# layout --------------------------------------------------------------------------------------------------------

def _options_column(gr) -> list:
    """Selection, generation and manual-mixture inputs, in the order :func:`chat` reads them."""
    from .widgets import selection_inputs

    sel = selection_inputs()
    tokens = gr.Slider(1, 512, value=64, step=1, label="max new tokens")
    temp = gr.Slider(0.0, 2.0, value=0.0, step=0.05, label="temperature (0 = greedy)")
    history = gr.Checkbox(value=False, label="chat: include earlier turns")
    with gr.Accordion("manual mixture (set the weights yourself)", open=False):
        manual = gr.Checkbox(value=False, label="use these weights instead of the router")
        norm = gr.Checkbox(value=True, label="normalise weights to sum 1")
        sliders = [gr.Slider(0.0, 1.0, value=0.0, step=0.05, label=f"task {i}", visible=False)
                   for i in range(MAX_TASK_SLIDERS)]
        more = gr.Textbox(label="weights as text (task=weight, …)", info="used in addition to the sliders (and "
                          f"for tasks beyond the first {MAX_TASK_SLIDERS})")
    return [*sel, tokens, temp, history, manual, norm, more, *sliders]


def build(defaults: PageDefaults) -> None:
    """The playground tab's layout and events (API names: load, generate, stop)."""
    import gradio as gr

    from .widgets import handler

    with gr.Row():
        run = gr.Textbox(value=defaults.run, label="run folder", info="adapters.txt + router/", scale=3)
        model = gr.Textbox(value=defaults.model, label="base model", scale=2, info="blank: the run's base model")
        router = gr.Textbox(label="router folder", placeholder="blank: <run>/router", scale=2)
        load_btn = gr.Button("Load", scale=1)
    loaded = gr.Markdown("")
    with gr.Row():
        with gr.Column(scale=3):
            conv = gr.Chatbot(label="conversation", height=320)
            prompt = gr.Textbox(label="prompt", lines=2, placeholder="Type a prompt and press Send",
                                elem_id="dlp-prompt")
            with gr.Row():
                send = gr.Button("Send", variant="primary", elem_id="dlp-send")
                stop_btn = gr.Button("Stop", variant="stop")
                clear = gr.Button("Clear")
            status = gr.Markdown("")
        with gr.Column(scale=2):
            options = _options_column(gr)
    chart = gr.Image(label="routing: router probabilities per sentence", type="pil", interactive=False,
                     elem_id="dlp-routing-chart")
    table = gr.Dataframe(label="routing per sentence", interactive=False, wrap=True)
    names = gr.State([])
    sliders = options[N_OPTIONS:]

    load_btn.click(handler(load), [run, model, router], [loaded, names, *sliders], api_name="load",
                   concurrency_id="pipeline", concurrency_limit=1)
    ins, outs = [prompt, conv, run, model, router, *options], [conv, status, chart, table, prompt]
    chat_fn = handler(chat, progress=False)
    send.click(chat_fn, ins, outs, api_name="generate", concurrency_id="pipeline", concurrency_limit=1)
    prompt.submit(chat_fn, ins, outs, api_name=False, concurrency_id="pipeline", concurrency_limit=1)
    # Stop: the generation loop sees the flag through on_text and ends the row ("cancelled"), keeping the text
    # so far; the event itself is not killed so the partial answer is shown.
    stop_btn.click(handler(stop, progress=False), None, status, queue=False, api_name="stop")
    clear.click(lambda: ([], "", None, None), None, [conv, status, chart, table], queue=False, api_name=False)
