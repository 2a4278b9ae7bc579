"""Where a mixed batch's decode time goes: base, PEFT single, and the fused engine's two decode paths, run in
lockstep (not a test; the formal benchmark is ``dlp-lora bench``).

Every system keeps its own KV cache and the systems take turns *step by step* (A B C D, then D C B A, ...), so
a slow moment of a shared machine hits all of them within ~0.1 s. Prints each system's total decode time as a
ratio to PEFT single, and the bytes of adapter weights each path reads per step next to the base model's bytes
(decode on a CPU is bound by reading weights).

    .venv/bin/python scripts/decode_lockstep.py --model default --batch 16 --reps 3
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from dlp_lora import bench
from dlp_lora.fusion import fuse_adapters


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default", help="tiny | default | a model folder")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--adapters", type=int, default=26)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new", type=int, default=24, help="decode steps per repetition")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    cfg = bench.BenchConfig(model=args.model, seed=args.seed)
    model, _ = bench.load_bench_model(args.model, "cpu")
    tmp = Path(tempfile.mkdtemp(prefix="lockstep-"))
    dirs = bench.make_adapters(model, tmp / "adapters", args.adapters, cfg, progress=False)
    peft_model, names = bench.load_peft(model, dirs, progress=False)
    peft_model.set_adapter(names[0])
    rows_model, union_model = bench.shared_copy(model), bench.shared_copy(model)
    rows = fuse_adapters(rows_model, [str(d) for d in dirs])
    union = fuse_adapters(union_model, [str(d) for d in dirs])
    # the benchmark's P2 inputs (same seeds): random prompts, <= 3 adapters per row
    ids = bench.random_prompts(model, args.batch, args.prompt_len, args.seed + 200, "cpu")
    w = bench.random_mixtures(args.batch, args.adapters, cfg.top_p, cfg.max_selected, args.seed + 201)
    rows.set_weights(w)
    auto = "per-row" if rows.state.rows_decode else "union"        # what the engine's "auto" rule picks here
    rows.state.decode_path, union.state.decode_path = "rows", "union"    # then measure both paths
    rows.set_weights(w)
    union.set_weights(w)

    systems = {"peft_single": peft_model, "ours_per_row": rows_model, "ours_union": union_model, "base": model}
    state: dict[str, dict] = {k: {} for k in systems}
    total = {k: 0.0 for k in systems}
    with torch.inference_mode():
        for r in range(args.reps):
            order = list(systems) if r % 2 == 0 else list(systems)[::-1]
            for k in order:
                out = systems[k](input_ids=ids, use_cache=True, logits_to_keep=1)
                state[k] = {"past": out.past_key_values, "nxt": out.logits[:, -1:].argmax(-1)}
            for _ in range(args.new):
                for k in order:
                    s = state[k]
                    t0 = time.perf_counter()
                    out = systems[k](input_ids=s["nxt"], past_key_values=s["past"], use_cache=True, logits_to_keep=1)
                    s["past"], s["nxt"] = out.past_key_values, out.logits[:, -1:].argmax(-1)
                    total[k] += time.perf_counter() - t0

    # Adapter bytes read per decode step: per-row path = every row's k_row adapters (padded), union = the
    # adapters used anywhere in the batch, PEFT single = one adapter.
    item = next(model.parameters()).element_size()
    per_adapter = sum(layer.r * (layer.in_features + layer.out_features) for layer in rows.layers.values()) * item
    base_bytes = sum(p.numel() for p in model.parameters()) * item
    reads = {"peft_single": per_adapter, "ours_per_row": args.batch * rows.state.k_row * per_adapter,
             "ours_union": len(rows.state.active) * per_adapter, "base": 0}
    result = {"batch": args.batch, "threads": args.threads, "decode_steps": args.new * args.reps,
              **bench._selected_stats(w), "k_row": rows.state.k_row, "auto_decode_path": auto,
              "decode_s": {k: round(v, 3) for k, v in total.items()},
              "ratio_to_peft_single": {k: round(v / total["peft_single"], 4) for k, v in total.items()},
              "adapter_bytes_per_step_vs_model": {k: round(v / base_bytes, 4) for k, v in reads.items()}}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
