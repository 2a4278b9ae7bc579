"""The app's shell: one tab per page, the shared queue, and serving it on the bound address only."""

from __future__ import annotations

import os
from typing import Iterable

from .common import PageDefaults

# No telemetry, no version check, no share links: the app must work on a machine without network.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

UPLOAD_CACHE = (3600, 86400)   # Gradio's upload cache: checked hourly, files older than a day removed


def build_app(run: str | os.PathLike | None = None, model: str | None = None):
    """The Gradio app (``gr.Blocks``): LoRA training, router training, router data, DLP-LoRA test and the routing
    playground. ``run`` pre-fills every page's folders; ``model`` pre-fills the base model (None: ``default`` for
    training, the run's own base model for testing and the playground)."""
    import gradio as gr

    from . import eval_page, lora_page, playground, router_data_page, router_page

    defaults = PageDefaults(run=str(run) if run else "", model=model or "", train_model=model or "default")
    pages = [("1 · LoRA training", "lora", lora_page), ("2 · Router training", "router", router_page),
             ("3 · Router dataset maker", "router_data", router_data_page),
             ("4 · DLP-LoRA test", "eval", eval_page), ("5 · Playground", "playground", playground)]
    with gr.Blocks(title="DLP-LoRA", analytics_enabled=False, delete_cache=UPLOAD_CACHE) as app:
        gr.Markdown("# DLP-LoRA\nPer-sentence routed fusion of task LoRAs — train adapters and a router, build "
                    "router data, evaluate, and watch the router pick adapters in the playground."
                    + (f"  \nRun folder: `{defaults.run}`" if defaults.run else ""))
        with gr.Tabs():
            for title, tab_id, page in pages:
                with gr.Tab(title, id=tab_id):
                    page.build(defaults)
    app.queue(default_concurrency_limit=1)
    return app


def launch_options(host: str = "127.0.0.1", port: int = 7860, allowed_hosts: Iterable[str] = (),
                   prevent_thread_lock: bool = False, quiet: bool = False) -> dict:
    """``Blocks.launch`` arguments: the bound address only, with the Host/Origin guard, never a share link."""
    from .hosts import guard_middleware

    return dict(server_name=host, server_port=int(port), share=False, inbrowser=False,
                prevent_thread_lock=prevent_thread_lock, quiet=quiet, show_error=True, ssr_mode=False,
                mcp_server=False, pwa=False, max_file_size="200mb",
                app_kwargs={"middleware": guard_middleware(host, allowed_hosts)})


def launch(run: str | os.PathLike | None = None, host: str = "127.0.0.1", port: int = 7860, model: str | None = None,
           allowed_hosts: Iterable[str] = (), prevent_thread_lock: bool = False, quiet: bool = False):
    """Start the app on ``host:port`` (loopback unless told otherwise); requests must address ``host`` (or one
    of ``allowed_hosts``)."""
    app = build_app(run=run, model=model)
    app.launch(**launch_options(host, port, allowed_hosts, prevent_thread_lock, quiet))
    return app
