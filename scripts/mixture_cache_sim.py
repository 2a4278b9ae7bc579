#!/usr/bin/env python
"""Mixture-cache hit rates of ``dlp-lora serve --upstream`` by simulation with real router outputs.

The proxy routes each request once and serves: the base model (no adapter kept), a task adapter by name (one
adapter kept: no cache needed), or an exported mixture (two or more kept) through an LRU cache keyed by the
weights rounded to ``--decimals``. This script routes a request stream with a trained router and replays it
through that cache (``dlp_lora.serve.proxy.simulate_cache``) for several top-p, weightings and cache sizes.

Request stream: ``--requests`` prompts drawn at random (with replacement, seeded) from the router test split;
``--composite F`` makes a fraction F of them two-task prompts (a test prompt of one task followed by one of
another task: the paper's Fig. 1 inputs, where mixtures are expected).

    python scripts/mixture_cache_sim.py --router RUN/router --data RUN/router_data --out sim.json
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--router", required=True, help="router folder")
    p.add_argument("--data", required=True, help="router data folder (its test.jsonl is the prompt pool)")
    p.add_argument("--requests", type=int, default=5000, help="requests in the simulated stream")
    p.add_argument("--composite", type=float, default=0.25, help="fraction of two-task prompts (default 0.25)")
    p.add_argument("--top-p", default="0.5,0.8,0.9,0.95", help="router top-p values")
    p.add_argument("--weighting", default="paper,renorm", help="weightings")
    p.add_argument("--cache", default="8,32,128", help="cache sizes")
    p.add_argument("--decimals", default="1,2", help="rounding of mixture weights (cache key)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the results JSON here")
    args = p.parse_args(argv)

    from dlp_lora.serve.proxy import simulate_cache
    from dlp_lora.router import Router, select_top_p

    router = Router.load(args.router)
    pool = [json.loads(l) for l in (Path(args.data) / "test.jsonl").read_text().splitlines() if l.strip()]
    rng = random.Random(args.seed)
    texts, kinds = [], []
    for _ in range(args.requests):
        a = rng.choice(pool)
        if rng.random() < args.composite:
            b = rng.choice([r for r in pool if r["task"] != a["task"]] or pool)
            texts.append(a["text"] + "\n" + b["text"])
            kinds.append("composite")
        else:
            texts.append(a["text"])
            kinds.append("single")
    probs = router.probs(texts)
    rows = []
    for top_p in [float(x) for x in args.top_p.split(",")]:
        for weighting in args.weighting.split(","):
            w = select_top_p(probs, top_p, weighting)
            kept = (w > 0).sum(1)
            for dec in [int(x) for x in args.decimals.split(",")]:
                for size in [int(x) for x in args.cache.split(",")]:
                    sim = simulate_cache(w.tolist(), size, dec)
                    rows.append({"top_p": top_p, "weighting": weighting, "decimals": dec, "cache": size,
                                 "mean_adapters": round(float(kept.float().mean()), 3),
                                 "max_adapters": int(kept.max()), **sim})
    res = {"router": str(args.router), "labels": len(router.labels), "requests": len(texts),
           "composite_fraction": args.composite, "rows": rows}
    print(f"{'top_p':>5} {'weighting':>9} {'dec':>3} {'cache':>5} {'mean k':>6} {'top1':>6} {'mixtures':>8} "
          f"{'distinct':>8} {'hit rate':>8} {'no new load':>11}")
    for r in rows:
        hr = "-" if r["hit_rate_mixtures"] is None else f"{r['hit_rate_mixtures']:.3f}"
        print(f"{r['top_p']:>5} {r['weighting']:>9} {r['decimals']:>3} {r['cache']:>5} {r['mean_adapters']:>6} "
              f"{r['top1'] / r['requests']:>6.3f} {r['mixtures'] / r['requests']:>8.3f} {r['distinct_mixtures']:>8} "
              f"{hr:>8} {r['served_without_new_load']:>11.3f}")
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
