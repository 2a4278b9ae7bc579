#!/usr/bin/env python
"""LoRA adapter and mixture sizes for the model shapes of the benchmark presets (docs/scaling.md).

Adapters on q_proj and v_proj (the paper's targets). A mixture of k adapters of rank r exported by
``export_mixture`` is one adapter of rank k*r. Prints Markdown.

    python scripts/adapter_memory.py [--rank 8] [--k 1,2,3]
"""

from __future__ import annotations

import argparse
import json
import sys


def shapes() -> dict:
    from dlp_lora.bench import PRESETS

    out = {}
    try:
        from dlp_lora.models import resolve_model_path

        out["SmolLM2-135M"] = json.loads((resolve_model_path("default") / "config.json").read_text())
    except Exception:  # the default model is not prepared here: presets only
        pass
    out.update(PRESETS)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--k", default="1,2,3", help="adapters per mixture")
    args = p.parse_args(argv)
    ks = [int(x) for x in args.k.split(",")]
    print("| model | layers | q / v out | params per rank-%d adapter | %s |" % (
        args.rank, " | ".join(f"k={k} (rank {k * args.rank}) bf16 / fp32 file" for k in ks)))
    print("|---|---|---|---|" + "---|" * len(ks))
    for name, c in shapes().items():
        h, L = c["hidden_size"], c["num_hidden_layers"]
        hd = c.get("head_dim") or h // c["num_attention_heads"]
        q_out, v_out = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
        per_rank = L * ((h + q_out) + (h + v_out))       # A (r x d_in) + B (d_out x r), q_proj and v_proj
        n = per_rank * args.rank
        cells = [f"{k * n * 2 / 2**20:.1f} MiB / {k * n * 4 / 2**20:.1f} MiB" for k in ks]
        print(f"| {name} | {L} | {q_out} / {v_out} | {n / 1e6:.2f} M | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
