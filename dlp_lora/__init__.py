"""DLP-LoRA: a dynamic, lightweight plugin that fuses task-specific LoRAs per sentence (arXiv 2410.01497).

The public API, imported lazily so that ``import dlp_lora`` stays light (reading a run needs no torch)::

    from dlp_lora import DLPPipeline, SelectionConfig, fuse_adapters, open_run, Router, select_top_p, train_adapter
"""

import importlib

__version__ = "0.1.0"

# public name -> module that defines it
_PUBLIC = {
    "DLPPipeline": "pipeline", "GenerationResult": "pipeline",
    "SelectionConfig": "selection",
    "open_run": "run", "Run": "run",
    "fuse_adapters": "fusion", "FusedAdapters": "fusion",
    "Router": "router.inference", "select_top_p": "router.select",
    "make_router_data": "router.data", "train_router": "router.train",
    "train_adapter": "lora", "train_adapters": "lora",
    "DLPError": "config",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
    raise AttributeError(f"module 'dlp_lora' has no attribute {name!r}")
