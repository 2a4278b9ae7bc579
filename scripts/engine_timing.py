"""Quick timing of the fused engine against PEFT (not a test; the formal benchmark is ``dlp-lora bench``).

Same process, same inputs, interleaved A B A B, median of --reps. Each system runs the same raw KV-cache loop
(prefill of --batch x --prompt-len random tokens, then --new decode steps), so only the adapter layers differ.

    .venv/bin/python scripts/engine_timing.py --model default --threads 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from dlp_lora.fusion import fuse_adapters, make_random_adapter
from dlp_lora.models import load_model


def loop(model, ids, new: int, before=None):
    """Prefill + ``new`` cached decode steps; returns (prefill_s, decode_s)."""
    bsz, L = ids.shape
    mask = torch.ones(bsz, L, dtype=torch.long, device=ids.device)
    pos = torch.arange(L, device=ids.device).expand(bsz, -1)
    sync = torch.cuda.synchronize if ids.is_cuda else (lambda: None)
    # on the CPU, thread CPU time (one intra-op thread) is robust to other processes sharing the cores
    clock = time.perf_counter if ids.is_cuda else time.thread_time
    with torch.inference_mode():
        sync()
        t0 = clock()
        if before is not None:
            before()
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        sync()
        t1 = clock()
        past = out.past_key_values
        for s in range(new):
            mask = torch.cat([mask, mask.new_ones(bsz, 1)], 1)
            out = model(input_ids=nxt, attention_mask=mask, position_ids=pos[:, -1:] + 1 + s, past_key_values=past,
                        use_cache=True)
            past = out.past_key_values
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        sync()
        t2 = clock()
    return t1 - t0, t2 - t1


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="default")
    ap.add_argument("--cache", default="/tmp/dlp_engine_timing", help="where the random adapters are written once")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new", type=int, default=8)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--many", type=int, default=100, help="adapters loaded in the 'many' case")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from peft import PeftModel

    m_fused, tok = load_model(args.model, device=args.device, dtype=args.dtype)
    cache = Path(args.cache)
    dirs = []
    for i in range(max(26, args.many)):
        d = cache / f"t{i:03d}"
        if not (d / "adapter_model.safetensors").is_file():
            make_random_adapter(m_fused, d, rank=8, alpha=16, seed=i, task=f"t{i:03d}")
        dirs.append(d)
    m_peft = PeftModel.from_pretrained(load_model(args.model, device=args.device, dtype=args.dtype)[0], dirs[0]).eval()
    m_many, _ = load_model(args.model, device=args.device, dtype=args.dtype)
    m_one, _ = load_model(args.model, device=args.device, dtype=args.dtype)
    f26 = fuse_adapters(m_fused, dirs[:26])
    fmany = fuse_adapters(m_many, dirs[:args.many])
    fone = fuse_adapters(m_one, dirs[:1])

    g = torch.Generator().manual_seed(0)
    B = args.batch
    ids = torch.randint(100, 40000, (B, args.prompt_len), generator=g).to(args.device)
    mixed = torch.zeros(B, 26)
    for b in range(B):                       # 16 different mixtures of <= 3 adapters each
        sel = torch.randperm(26, generator=g)[:3]
        mixed[b, sel] = torch.rand(3, generator=g) + 0.1
    mixed /= mixed.sum(1, keepdim=True)
    one_mix = torch.zeros(B, 26)
    one_mix[:, [0, 5, 9]] = torch.tensor([0.5, 0.3, 0.2])
    one_hot_many = torch.zeros(B, args.many)
    one_hot_many[:, 0] = 1.0
    one_hot_one = torch.ones(B, 1)

    systems = {
        "peft_single": (m_peft, None),
        "fused26_mixed16": (m_fused, lambda: (setattr(f26.state, "decode_path", "rows"), f26.set_weights(mixed))),
        "fused26_mixed16_union_decode": (m_fused, lambda: (setattr(f26.state, "decode_path", "union"),
                                                           f26.set_weights(mixed))),
        "fused26_one_mix3": (m_fused, lambda: f26.set_weights(one_mix)),
        f"fused{args.many}_one_hot": (m_many, lambda: fmany.set_weights(one_hot_many)),
        "fused1_one_hot": (m_one, lambda: fone.set_weights(one_hot_one)),
    }
    res: dict[str, list[tuple[float, float]]] = {k: [] for k in systems}
    for name, (m, before) in systems.items():   # warm-up
        loop(m, ids[:, :8], 2, before)
    for _ in range(args.reps):
        for name, (m, before) in systems.items():
            res[name].append(loop(m, ids, args.new, before))
    med = {k: (statistics.median(p for p, _ in v), statistics.median(d for _, d in v),
               statistics.median(p + d for p, d in v)) for k, v in res.items()}
    out = {"clock": "perf_counter" if args.device.startswith("cuda") else "thread_time", "threads": args.threads, "device": args.device, "dtype": args.dtype, "batch": B,
           "prompt_len": args.prompt_len, "new": args.new, "reps": args.reps,
           "median_s": {k: {"prefill": p, "decode": d, "total": t} for k, (p, d, t) in med.items()}}
    ref = med["peft_single"]
    out["ratio_to_peft_single"] = {k: {"prefill": v[0] / ref[0], "decode": v[1] / ref[1], "total": v[2] / ref[2]}
                                   for k, v in med.items()}
    one = med["fused1_one_hot"]
    many = med[f"fused{args.many}_one_hot"]
    out[f"ratio_{args.many}_loaded_to_1_loaded"] = {"prefill": many[0] / one[0], "decode": many[1] / one[1],
                                                    "total": many[2] / one[2]}
    print(json.dumps(out, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
