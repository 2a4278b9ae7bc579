"""``dlp-lora ui``: the Gradio web app — the seed's four pages plus a live routing playground.

One module per page (``lora_page``, ``router_page``, ``router_data_page``, ``eval_page``, ``playground``), each
with plain handler functions that take the page's input values and return its outputs, callable without Gradio;
a short ``build`` function per page lays out its Gradio components and wires them to those handlers
(``widgets.handler`` adds the browser session, progress and one-line errors). Long actions run as cancellable
jobs (``jobs``); ``hosts`` keeps the app to requests addressed to it. Gradio is imported only when the app is
built, so ``import dlp_lora.ui`` stays cheap.
"""

from __future__ import annotations


def build_app(run=None, model=None):
    """The Gradio app; see :func:`dlp_lora.ui.app.build_app`."""
    from .app import build_app as _build

    return _build(run=run, model=model)


def launch(run=None, host: str = "127.0.0.1", port: int = 7860, model=None, allowed_hosts=(),
           prevent_thread_lock: bool = False, quiet: bool = False):
    """Serve the app; see :func:`dlp_lora.ui.app.launch`."""
    from .app import launch as _launch

    return _launch(run=run, host=host, port=port, model=model, allowed_hosts=allowed_hosts,
                   prevent_thread_lock=prevent_thread_lock, quiet=quiet)


__all__ = ["build_app", "launch"]
