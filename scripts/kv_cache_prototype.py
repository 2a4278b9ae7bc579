#!/usr/bin/env python
"""Which KV cache for the server's continuous scheduler: our step-level decoder (the model's own DynamicCache,
re-aligned on the left when rows join) or transformers' continuous batching (``generate_batch``: a paged cache,
all live tokens packed into one sequence)?

Both decode the same prompts (greedy, the same ``max_new_tokens`` per request) on the same fused model:

* ``ours``        ``DLPPipeline.generate`` (``DecodeBatch``: rows join as others leave), every row with its own
                  mixture (what the server needs);
* ``ours_shared`` the same, every row with one shared mixture;
* ``hf_cb``       ``model.generate_batch`` with that one shared mixture set on the fused layers: the packed layout
                  gives a forward pass ``(1, tokens)`` and no public map from a token to its request, so a
                  per-row mixture cannot be given to it (see docs/server.md).

Prints the wall time of each (median of ``--reps``, interleaved) and whether the greedy tokens agree.

    python scripts/kv_cache_prototype.py --model tiny
    python scripts/kv_cache_prototype.py --model default --requests 32
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def build(model_spec: str, tmp: Path, n_adapters: int):
    """A pipeline over ``model_spec`` with ``n_adapters`` random adapters (no router: mixtures are forced)."""
    from dlp_lora.fusion import fuse_adapters, make_random_adapter
    from dlp_lora.models import load_model
    from dlp_lora.pipeline import DLPPipeline

    model, tok = load_model(model_spec, device="cpu", dtype="fp32")
    dirs = [make_random_adapter(model, tmp / f"a{i}", seed=i + 1, task=f"t{i}") for i in range(n_adapters)]
    names = [f"t{i}" for i in range(n_adapters)]
    return DLPPipeline(model, tok, fuse_adapters(model, [str(d) for d in dirs], names=names))


def workload(pipe, n: int, seed: int):
    import random

    rnd = random.Random(seed)
    prompts = [f"Question {i}: what is {rnd.randint(2, 999)} plus {rnd.randint(2, 999)}? Explain." for i in range(n)]
    max_new = [rnd.choice((8, 16, 32, 64)) for _ in range(n)]
    mixtures = [{f"t{rnd.randrange(len(pipe.names))}": 1.0} for _ in range(n)]
    return prompts, max_new, mixtures


def run_ours(pipe, prompts, max_new, mixtures, batch: int):
    res = pipe.generate(prompts, weights=mixtures, max_new_tokens=max_new, chat=False, batch_size=batch)
    return [len(r.text) for r in res], sum(r.completion_tokens for r in res)


def run_hf_cb(pipe, prompts, max_new, shared: dict, batch: int):
    """transformers' continuous batching with ``shared`` as the one mixture of every token."""
    from transformers import GenerationConfig
    from transformers.generation import ContinuousBatchingConfig

    # sized by hand: its automatic sizing reads free GPU memory, and on a CPU it allocates far too much
    cb = ContinuousBatchingConfig(page_size=64, num_blocks=4 * len(prompts), max_batch_tokens=batch * 64,
                                  max_requests_per_batch=batch, use_cuda_graph=False, allow_block_sharing=False,
                                  auto_switch_to_flash=False)

    tok, model = pipe.tokenizer, pipe.model
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    pipe.fused.set_weights(pipe.fused.row_weights(shared, "weights").unsqueeze(0))
    cfg = GenerationConfig(do_sample=False, eos_token_id=sorted(pipe.eos_ids), pad_token_id=tok.pad_token_id)
    out = {}
    try:   # one manager, each request with its own max_new_tokens (as a server would add them)
        with model.continuous_batching_context_manager(generation_config=cfg, continuous_batching_config=cb,
                                                       warmup=False) as manager:
            rid = {manager.add_request(x, max_new_tokens=m): i for i, (x, m) in enumerate(zip(ids, max_new))}
            while len(out) < len(ids):
                r = manager.get_result(timeout=60)
                if r is not None and r.is_finished():
                    out[rid[r.request_id]] = r.generated_tokens
    finally:
        pipe.fused.clear_weights()
    return [out[i] for i in range(len(prompts))], sum(len(v) for v in out.values())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny")
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--batch", type=int, default=16, help="rows decoding at once (ours)")
    p.add_argument("--adapters", type=int, default=4)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        pipe = build(args.model, Path(tmp), args.adapters)
        prompts, max_new, mixtures = workload(pipe, args.requests, 0)
        shared = mixtures[0]
        systems = {"ours": lambda: run_ours(pipe, prompts, max_new, mixtures, args.batch),
                   "ours_shared": lambda: run_ours(pipe, prompts, max_new, [shared] * len(prompts), args.batch),
                   "hf_cb": lambda: run_hf_cb(pipe, prompts, max_new, shared, args.batch)}
        times = {k: [] for k in systems}
        tokens = {}
        for r in range(args.reps + 1):          # the first round is a warm-up
            for k in (systems if r % 2 else reversed(list(systems))):
                t0 = time.perf_counter()
                _, tokens[k] = systems[k]()
                if r:
                    times[k].append(time.perf_counter() - t0)
        same = agreement(pipe, prompts, max_new, shared)
    res = {"model": args.model, "requests": args.requests, "threads": args.threads,
           "seconds": {k: round(statistics.median(v), 3) for k, v in times.items()},
           "tokens_per_s": {k: round(tokens[k] / statistics.median(v), 1) for k, v in times.items()},
           "output_tokens": tokens, "greedy_tokens_equal_shared_mixture": same}
    print(json.dumps(res, indent=2))
    return 0


def agreement(pipe, prompts, max_new, shared) -> float:
    """Fraction of requests whose greedy text is the same under ours and hf_cb (one shared mixture)."""
    ours = pipe.generate(prompts, weights=[shared] * len(prompts), max_new_tokens=max_new, chat=False)
    tok = pipe.tokenizer
    theirs, _ = run_hf_cb(pipe, prompts, max_new, shared, 16)
    eq = [r.text == tok.decode(t, skip_special_tokens=True) for r, t in zip(ours, theirs)]
    return round(sum(eq) / len(eq), 3)


if __name__ == "__main__":
    sys.exit(main())
