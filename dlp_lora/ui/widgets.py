"""The Gradio side shared by the pages: wrapping plain handlers, config and selection inputs, Cancel buttons.

Only the pages' layout functions call these, so Gradio is imported only when the app is built.
"""

# No ``from __future__ import annotations`` here: Gradio finds ``gr.Request`` by evaluating the wrappers'
# annotations at runtime.
import inspect
import os
from typing import Callable

from ..config import DLPError
from ..selection import GRANULARITIES, WEIGHTINGS, SelectionConfig
from .common import SELECTION_FIELDS, error_message, field_docs
from .jobs import LOCAL_SESSION, JobCancelled, cancel_job

# config fields shown as a dropdown, with the choices their config's validation accepts
CHOICE_FIELDS = {"LoRATrainConfig": {"precision": ["auto", "bf16", "fp32"]},
                 "RouterDataConfig": {"granularity": ["prompt", "sentence"]},
                 "RouterConfig": {"pooling": ["mean", "mean+max"]}}


def _session(request) -> str:
    return getattr(request, "session_hash", None) or LOCAL_SESSION


def _to_gradio_error(e: BaseException):
    import gradio as gr

    if isinstance(e, gr.Error):
        return e
    if os.environ.get("DLP_LORA_DEBUG") and not isinstance(e, (DLPError, JobCancelled)):
        import traceback

        traceback.print_exception(e)
    return gr.Error(error_message(e), print_exception=False)


def handler(fn: Callable, progress: bool = True) -> Callable:
    """Gradio-facing wrapper of a plain page handler: passes the browser session (when ``fn`` takes
    ``session``), shows Gradio's progress overlay fed by the library's tqdm bars (``progress``), and turns any
    exception into a one-line ``gr.Error``. Generator handlers stay generators."""
    import gradio as gr

    takes_session = "session" in inspect.signature(fn).parameters

    def call(request, args):
        return fn(*args, session=_session(request)) if takes_session else fn(*args)

    if inspect.isgeneratorfunction(fn):
        def wrapper(request: gr.Request, *args):
            try:
                return (yield from call(request, args))
            except (Exception, JobCancelled) as e:  # noqa: BLE001
                raise _to_gradio_error(e) from None
    else:
        def wrapper(request: gr.Request, *args):
            try:
                return call(request, args)
            except (Exception, JobCancelled) as e:  # noqa: BLE001
                raise _to_gradio_error(e) from None
    if progress:
        inner = wrapper
        if inspect.isgeneratorfunction(inner):
            def wrapper(request: gr.Request, progress=gr.Progress(track_tqdm=True), *args):
                return (yield from inner(request, *args))
        else:
            def wrapper(request: gr.Request, progress=gr.Progress(track_tqdm=True), *args):
                return inner(request, *args)
    # not functools.wraps: its __wrapped__ would make Gradio read fn's signature instead of the wrapper's
    wrapper.__name__, wrapper.__doc__ = fn.__name__, fn.__doc__
    return wrapper


def config_inputs(cls: type, fields) -> list:
    """One input per field of config ``cls``, pre-filled with its default; help text = the field's doc comment."""
    import gradio as gr

    docs, choices = field_docs(cls), CHOICE_FIELDS.get(cls.__name__, {})
    comps = []
    for f in fields:
        d, info = f.default, docs.get(f.name)
        if f.name in choices:
            comps.append(gr.Dropdown(choices[f.name], value=d, label=f.name, info=info))
        elif isinstance(d, bool):
            comps.append(gr.Checkbox(value=d, label=f.name, info=info))
        elif isinstance(d, int):
            comps.append(gr.Number(value=d, precision=0, label=f.name, info=info))
        elif isinstance(d, float):
            comps.append(gr.Number(value=d, label=f.name, info=info))
        else:
            comps.append(gr.Textbox(value=d, label=f.name, info=info))
    return comps


def selection_inputs(base: SelectionConfig | None = None) -> list:
    """The five selection options, in ``SELECTION_FIELDS`` order; choices and defaults from
    :mod:`dlp_lora.selection` (``base`` changes the defaults shown)."""
    import gradio as gr

    base = base or SelectionConfig()
    docs = field_docs(SelectionConfig)
    comps = {
        "top_p": gr.Slider(0.05, 1.0, value=base.top_p, step=0.05, label="top-p", info=docs.get("top_p")),
        "weighting": gr.Radio(list(WEIGHTINGS), value=base.weighting, label="weighting", info=docs.get("weighting")),
        "max_adapters": gr.Number(value=base.max_adapters, precision=0, label="max adapters",
                                  info=docs.get("max_adapters")),
        "min_confidence": gr.Slider(0.0, 1.0, value=base.min_confidence, step=0.05, label="min confidence",
                                    info=docs.get("min_confidence")),
        "granularity": gr.Radio(list(GRANULARITIES), value=base.granularity, label="granularity",
                                info=docs.get("granularity")),
    }
    return [comps[name] for name in SELECTION_FIELDS]


def cancel_button():
    import gradio as gr

    return gr.Button("Cancel", variant="stop", size="sm")


def wire_cancel(btn, page: str, events: list, status) -> None:
    """``btn`` cancels ``events`` and the page's running job (API name ``cancel_<page>``)."""
    def _cancel(session: str = LOCAL_SESSION) -> str:
        return cancel_job(page, session)

    btn.click(handler(_cancel, progress=False), None, status, cancels=events, queue=False,
              api_name=f"cancel_{page}")
