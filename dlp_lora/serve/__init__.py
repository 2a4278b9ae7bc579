"""``dlp-lora serve``: an OpenAI-compatible HTTP server for a DLP-LoRA run.

Any OpenAI client gets routed, fused generation and sees how it was routed (``dlp_routing`` on every response).
Models a request may name:

* ``dlp``            routed by the router, fused per sentence (the paper); ``"dlp": {"weights": {...}}`` forces
                     a manual mixture instead;
* ``dlp:<task>``     that one task adapter (``<task>`` alone works too, as vLLM's ``--lora-modules`` names);
* ``base``           the base model, no adapter;
* ``<lora_name>``    an adapter registered through ``/v1/load_lora_adapter``.

The package, one concept a module: ``schema`` (settings, the one error type, requests checked at the door),
``scheduler`` (queue and batching worker), ``engine`` (the pipeline, loaded adapters, failure isolation),
``app`` (the FastAPI app and running it), ``proxy`` (routing in front of a vLLM-class upstream).
"""

from .app import create_app, load_pipeline, serve, server_config
from .schema import APIError, ServeConfig

__all__ = ["APIError", "ServeConfig", "create_app", "load_pipeline", "serve", "server_config"]
