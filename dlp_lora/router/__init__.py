"""The router (paper §3.1-3.2, DESIGN §5): router data, the mini-MLP (and albert/distilroberta) routers, training,
calibration, loading, top-p selection of fusion weights, and adding or removing a task of a run.

    make_router_data(out_dir, adapters=..., data_dir=...)   # router_data/{train,val,test}.jsonl, labels.json
    merge_router_files(files, out)                          # the seed's "fusion" page: merge labelled router files
    train_router(data_dir, model_spec, out_dir, config)     # router/ folder (router.safetensors, ...)
    Router.load(dir).probs(texts)                           # (B, N) calibrated probabilities, labels in adapter order
    select_top_p(probs, top_p, weighting)                   # (B, N) dense fusion weights
    add_task(run, data), remove_task(run, task)             # grow or shrink a run without starting over
"""

from .data import make_router_data, merge_router_files, read_router_data
from .data import fuse_router_files  # noqa: F401  (the former name of merge_router_files)
from .mlp import MiniMLPRouter
from .select import select_top_p
from .inference import Router
from .train import train_router

__all__ = ["Router", "select_top_p", "make_router_data", "merge_router_files", "train_router", "MiniMLPRouter",
           "read_router_data"]
