"""The router (paper §3.1-3.2, DESIGN §5): router data, the mini-MLP (and albert/distilroberta) routers, training,
loading, and top-p selection of fusion weights.

    make_router_data(out_dir, adapters=..., data_dir=...)   # router_data/{train,val,test}.jsonl, labels.json
    fuse_router_files(files, out)                           # the seed's "fusion" of labelled router files
    train_router(data_dir, model_spec, out_dir, config)     # router/ folder (router.safetensors, ...)
    Router.load(dir).probs(texts)                           # (B, N) probabilities, labels in adapter order
    select_top_p(probs, top_p, weighting)                   # (B, N) dense fusion weights
"""

from .data import fuse_router_files, make_router_data, read_router_data
from .mlp import MiniMLPRouter
from .select import select_top_p
from .inference import Router
from .train import train_router

__all__ = ["Router", "select_top_p", "make_router_data", "fuse_router_files", "train_router", "MiniMLPRouter",
           "read_router_data"]
