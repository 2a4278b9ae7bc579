"""The benchmark protocol of DESIGN §7: the paper's efficiency figures, measured side by side against PEFT.

Every figure is a *ratio* measured in one process on the same model and inputs: the systems of a row run
interleaved (A B C, then C B A, ...) after warm-up, each figure is the median of >= 5 repetitions with its
min–max, and the thread count is fixed and printed. Ratios use the paired repetitions (rep r of A over rep r
of B), so slow phases of a shared machine hit both sides of a ratio alike.

Systems compared (all run the *same* decode loop: one prefill forward, then a fixed number of KV-cached greedy
argmax steps, no EOS stopping, so no system gets shorter outputs):

* ``base``          the plain model;
* ``ours``          :func:`dlp_lora.fusion.fuse_adapters` with a dense (B, N) mixture (``set_weights``);
* ``ours_merge``    the mixture folded into W (``merge``/``unmerge`` included in the time);
* ``peft_single``   PEFT with the adapters loaded, one active adapter for the whole batch;
* ``peft_mixed``    PEFT ``adapter_names=`` mixed batch (one adapter per row: PEFT cannot mix within a row);
* ``peft_cat``      PEFT ``add_weighted_adapter(combination_type="cat")`` rebuilt for every mixture (+ delete);
* ``loop``          a Python loop over the selected LoRAs, one delta each, summed, on the whole (mixed) batch;
* ``original``      the original code's method: every row on its own (batch size 1), the same Python loop over
                    that row's LoRAs (a KV cache kept, in the baseline's favour).

Speed does not depend on learned weights, so adapters are random PEFT LoRAs of the paper's rank 8 on
``q_proj,v_proj`` (made by :func:`dlp_lora.fusion.make_random_adapter`) unless a run folder is given, prompts
are random token ids, and config presets build random models with real architectures (Qwen2-1.5B,
Llama-2-7B, Llama-3-8B). Nothing is downloaded.

This is a benchmark, not library code: it sets ``torch.set_num_threads`` (the protocol requires a fixed count).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import datetime as _dt
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from .config import DLPError, atomic_dir, atomic_write_json, atomic_write_text, check, save_config

ROWS = ("P1", "P2", "P3", "P4", "P5", "P6", "P7", "P8")

TITLES = {
    "P1": "Decode time, N adapters loaded, top-p picks <= 3 per row (batch 1 and 8)",
    "P2": "Mixed batch: 16 rows, 16 different mixtures",
    "P3": "Scaling with the number of adapters loaded",
    "P4": "Router latency (batch 1, tokenisation included) and throughput (batched)",
    "P5": "Merge mode, batch 1, long output",
    "P6": "Peak memory with N adapters loaded",
    "P7": "Mixed batch vs the original code's method (batch 1 per row, Python loop over the LoRAs)",
    "P8": "Serving on loopback: continuous (per decode step) vs static (per batch) scheduler",
}

# The performance targets each row is held to (DESIGN §7). "op" reads: figure <op> value.
TARGETS = {
    "P1": {"figure": "ours / peft_single, decode", "op": "<=", "value": 1.00},
    "P2": {"figure": "ours / homogeneous peft_single, decode", "op": "<=", "value": 1.00},
    "P3": {"figure": "ours(max N) / ours(1 loaded), decode", "op": "<=", "value": 1.02},
    "P4": {"figure": "latency ms (batch 1) < 0.5 and throughput >= 20000 sentences/s", "op": "both", "value": None},
    "P5": {"figure": "ours_merge / base, total (merge + prefill + decode + unmerge)", "op": "<=", "value": 1.02},
    "P6": {"figure": "peak(ours) / (peak(base) + adapter bytes)", "op": "<=", "value": 1.10},
    "P7": {"figure": "original / ours, decode (speed-up)", "op": ">=", "value": 3.0},
    "P8": {"figure": "continuous / static: output tokens/s >= 1.5 and p99 TTFT <= 0.5", "op": "both", "value": None},
}

# Real configurations (random weights). On CPU they run with fewer layers (``cpu_layers``) so they fit in memory
# and time; every figure notes the layer count used. On CUDA they run as published.
PRESETS: dict[str, dict[str, Any]] = {
    "qwen2-1.5b": dict(model_type="qwen2", vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                       num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                       max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
                       tie_word_embeddings=True, cpu_layers=4),
    "llama-2-7b": dict(model_type="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                       max_position_embeddings=4096, rope_theta=10000.0, rms_norm_eps=1e-5,
                       tie_word_embeddings=False, cpu_layers=2),
    "llama-3-8b": dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                       max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5,
                       tie_word_embeddings=False, cpu_layers=1),
}


# Config

@dataclasses.dataclass
class BenchConfig:
    """What ``dlp-lora bench`` measures; saved as ``config.json`` beside ``results.json``."""

    model: str = "tiny"                     # "tiny" | "default" | a model folder | a preset (qwen2-1.5b, ...)
    quick: bool = False                     # small shapes: finishes in < 2 min on 2 CPU cores with the tiny model
    only: str = ""                          # comma list of rows (P1..P7); "" = all
    run: str = ""                           # run folder: use its trained adapters (adapters.txt) and router/
    reps: int = 0                           # repetitions per figure (0 = 7 for P1-P3, P5 of a full run, else 5)
    warmup: int = 1                         # untimed warm-up calls per system before the repetitions
    threads: int = 0                        # torch threads (0 = torch's current default); fixed and printed
    device: str = ""                        # "" = auto (cuda when available)
    dtype: str = "auto"                     # auto: fp32 on CPU, bf16 on a bf16-capable GPU
    layers: int = 0                         # presets: layer count (0 = preset's CPU count on CPU, full on CUDA)
    n_adapters: int = 26                    # adapters loaded for P1, P2, P6, P7 (paper: 26 tasks)
    scaling: str = "1,10,26,50,100"         # adapters loaded for P3 (paper: up to 100)
    rank: int = 8                           # rank of the random adapters (paper: 8)
    alpha: float = 16.0                     # alpha of the random adapters
    target_modules: str = "q_proj,v_proj"   # targets of the random adapters (paper: q_proj, v_proj)
    max_selected: int = 3                   # top-p picks at most this many adapters per row (P1, P2, P7)
    top_p: float = 0.8                      # router top-p used to build the mixtures
    prompt_len: int = 0                     # prompt tokens per row (0 = 16 quick / 64 full)
    new_tokens: int = 0                     # generated tokens per row (0 = 8 quick / 32 full)
    merge_new_tokens: int = 0               # P5 generated tokens (0 = the 128, quick or not)
    router_sentences: int = 0               # P4 throughput batch (0 = 1024 quick / 8192 full)
    serve_clients: int = 32                 # P8 concurrent streaming clients on loopback
    serve_seconds: float = 0                # P8 seconds of load per scheduler (0 = 16 quick / 60 full)
    seed: int = 0                           # seed for adapters, prompts and mixtures
    profile: bool = True                    # torch.profiler summary for missed decode targets (full runs)

    def __post_init__(self) -> None:
        check(isinstance(self.model, str) and self.model.strip() != "", "model must be a non-empty string")
        for r in self.rows():
            check(r in ROWS, f"only: unknown row {r!r} (choose from {','.join(ROWS)})")
        check(isinstance(self.reps, int) and (self.reps == 0 or self.reps >= 5),
              f"reps must be >= 5 (median of at least 5 repetitions, DESIGN §7), got {self.reps!r}")
        check(isinstance(self.warmup, int) and self.warmup >= 0, f"warmup must be >= 0, got {self.warmup!r}")
        check(isinstance(self.threads, int) and self.threads >= 0, f"threads must be >= 0, got {self.threads!r}")
        check(isinstance(self.layers, int) and self.layers >= 0, f"layers must be >= 0, got {self.layers!r}")
        check(isinstance(self.n_adapters, int) and self.n_adapters >= 2,
              f"n_adapters must be >= 2, got {self.n_adapters!r}")
        self.scaling_list()
        check(isinstance(self.rank, int) and self.rank > 0, f"rank must be > 0, got {self.rank!r}")
        check(isinstance(self.max_selected, int) and self.max_selected >= 1,
              f"max_selected must be >= 1, got {self.max_selected!r}")
        check(0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p!r}")
        for name in ("prompt_len", "new_tokens", "merge_new_tokens", "router_sentences"):
            v = getattr(self, name)
            check(isinstance(v, int) and v >= 0, f"{name} must be >= 0, got {v!r}")
        check(self.new_tokens == 0 or self.new_tokens >= 2, "new_tokens must be >= 2 (one prefill token + decode steps)")
        check(self.merge_new_tokens == 0 or self.merge_new_tokens >= 2, "merge_new_tokens must be >= 2")
        check(isinstance(self.serve_clients, int) and self.serve_clients >= 1,
              f"serve_clients must be >= 1, got {self.serve_clients!r}")
        check(isinstance(self.serve_seconds, (int, float)) and 0 <= self.serve_seconds <= 3600,
              f"serve_seconds must be in [0, 3600], got {self.serve_seconds!r}")

    def rows(self) -> list[str]:
        """Rows to run, in order."""
        if not self.only.strip():
            return list(ROWS)
        want = [r.strip().upper() for r in self.only.split(",") if r.strip()]
        return [r for r in ROWS if r in want] + [r for r in want if r not in ROWS]

    def scaling_list(self) -> list[int]:
        try:
            vals = sorted({int(v) for v in self.scaling.split(",") if v.strip()})
        except ValueError:
            raise DLPError(f"scaling: expected a comma list of integers, got {self.scaling!r}") from None
        check(len(vals) >= 2 and vals[0] >= 1, f"scaling: need >= 2 adapter counts >= 1, got {self.scaling!r}")
        return vals

    def resolved(self) -> dict:
        """Shapes after applying the quick/full defaults."""
        q = self.quick
        return {
            "reps": self.reps or 5,
            # the decode rows compare systems within a few % of each other: two more pairs on a full run
            "reps_decode": self.reps or (5 if q else 7),
            "prompt_len": self.prompt_len or (16 if q else 64),
            "new_tokens": self.new_tokens or (8 if q else 32),
            "merge_new_tokens": self.merge_new_tokens or 128,
            "router_sentences": self.router_sentences or (1024 if q else 8192),
            "serve_seconds": self.serve_seconds or (16 if q else 60),
            "batches_p1": [1, 8],
            "batch_mixed": 16,
        }


# Statistics: interleaved repetitions, median with min–max

def summarize(values) -> dict:
    """Median, min and max of a list of numbers (the protocol's figure), plus the count and the raw values."""
    vals = [float(v) for v in values]
    if not vals:
        raise DLPError("summarize: no values")
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "n": len(vals), "values": vals}


def paired_ratio(num, den) -> dict:
    """Summary of per-repetition ratios ``num[r] / den[r]`` (repetitions were interleaved, so they pair up)."""
    num, den = list(num), list(den)
    if len(num) != len(den) or not num:
        raise DLPError(f"paired_ratio: need two equally long non-empty lists, got {len(num)} and {len(den)}")
    return summarize([a / b if b > 0 else math.inf for a, b in zip(num, den)])


def interleave(systems: dict[str, Callable[[], Any]], reps: int = 5, warmup: int = 1,
               clock: Callable[[], float] = time.perf_counter,
               on_call: Callable[[str, int], None] | None = None,
               alternate: bool = True) -> dict[str, dict[str, list[float]]]:
    """Run each system ``warmup`` times (untimed), then ``reps`` rounds of A B C ... .

    With ``alternate`` (the default) every other round runs backwards (A B C, C B A, A B C, ...: the ABBA design),
    so a drift of the machine during a row, or an effect of running right after a given neighbour, does not land
    on the same side of every ratio; systems listed next to each other stay next to each other in every round,
    so the pairs of a ratio are measured seconds apart.

    A system is a callable. If it returns a number, that is its time; a dict ``{part: seconds}`` gives several
    timed parts (for example prefill and decode); ``None`` means the call is timed as a whole with ``clock``.
    Returns ``{system: {part: [one value per repetition]}}``; a call timed with ``clock`` is recorded as
    ``"total"`` (and a dict without ``"total"`` gets the wall time of the whole call as ``"total"``).
    ``on_call(name, rep)`` is called after every call (rep = -1 during warm-up), for progress bars.
    """
    check(isinstance(reps, int) and reps >= 1, f"reps must be >= 1, got {reps!r}")
    check(isinstance(warmup, int) and warmup >= 0, f"warmup must be >= 0, got {warmup!r}")
    check(len(systems) >= 1, "interleave: no systems")
    for _ in range(warmup):
        for name, fn in systems.items():
            fn()
            if on_call:
                on_call(name, -1)
    out: dict[str, dict[str, list[float]]] = {name: {} for name in systems}
    order = list(systems.items())
    for rep in range(reps):
        for name, fn in (order[::-1] if alternate and rep % 2 else order):
            t0 = clock()
            res = fn()
            wall = clock() - t0
            if res is None:
                parts = {"total": wall}
            elif isinstance(res, dict):
                parts = {k: float(v) for k, v in res.items()}
                parts.setdefault("total", wall)
            else:
                parts = {"total": float(res)}
            for k, v in parts.items():
                out[name].setdefault(k, []).append(v)
            if on_call:
                on_call(name, rep)
    return out


# Timing (CUDA events on a GPU, perf_counter on the CPU)

class Stopwatch:
    """Marks points in time; ``laps()`` returns the seconds between consecutive marks (synchronising CUDA)."""

    def __init__(self, device: str) -> None:
        import torch

        self.cuda = str(device).startswith("cuda")
        self._torch = torch
        self.marks: list[Any] = []

    def mark(self) -> None:
        if self.cuda:
            ev = self._torch.cuda.Event(enable_timing=True)
            ev.record()
            self.marks.append(ev)
        else:
            self.marks.append(time.perf_counter())

    def laps(self) -> list[float]:
        if self.cuda:
            self._torch.cuda.synchronize()
            return [a.elapsed_time(b) / 1000.0 for a, b in zip(self.marks, self.marks[1:])]
        return [b - a for a, b in zip(self.marks, self.marks[1:])]


def decode_fixed(model, ids, new_tokens: int, device: str, setup: Callable[[], Any] | None = None,
                 teardown: Callable[[], Any] | None = None, fwd_kwargs: dict | None = None) -> dict:
    """The one decode loop every system uses: ``setup()``, a prefill forward (first token), ``new_tokens - 1``
    KV-cached greedy argmax steps (no EOS stop), ``teardown()``. Returns seconds per part:
    ``setup`` (e.g. set weights, rebuild a PEFT adapter, merge), ``prefill``, ``decode`` and ``total``."""
    import torch

    kw = dict(fwd_kwargs or {})
    sw = Stopwatch(device)
    with torch.inference_mode():
        sw.mark()
        if setup is not None:
            setup()
        sw.mark()
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1, **kw)
        past = out.past_key_values
        nxt = out.logits[:, -1:].argmax(-1)
        sw.mark()
        for _ in range(new_tokens - 1):
            out = model(input_ids=nxt, past_key_values=past, use_cache=True, logits_to_keep=1, **kw)
            past = out.past_key_values
            nxt = out.logits[:, -1:].argmax(-1)
        sw.mark()
        if teardown is not None:
            teardown()
        sw.mark()
    s, p, d, t = sw.laps()
    return {"setup": s + t, "prefill": p, "decode": d, "total": s + p + d + t}


# Models and adapters

def load_bench_model(spec: str, device: str, dtype: str = "auto", layers: int = 0, seed: int = 0):
    """``(model, info)`` for a model spec: tiny | default | folder | preset (random weights, real shapes)."""
    import torch

    from . import models

    key = spec.lower()
    if key in PRESETS:
        from transformers import AutoConfig, AutoModelForCausalLM

        p = dict(PRESETS[key])
        cpu_layers = p.pop("cpu_layers")
        full_layers = p["num_hidden_layers"]
        n_layers = layers or (full_layers if device.startswith("cuda") else cpu_layers)
        p["num_hidden_layers"] = n_layers
        model_type = p.pop("model_type")
        cfg = AutoConfig.for_model(model_type, **p)
        torch_dtype = models.pick_dtype(dtype, device)
        torch.manual_seed(seed)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(cfg, dtype=torch_dtype)
        model.config.name_or_path = f"preset:{key}"
        model.eval()
        note = ("" if n_layers == full_layers else
                f"{key}: {n_layers} of {full_layers} layers (random weights; reduced to fit this machine)")
        return model, {"spec": spec, "preset": key, "layers": n_layers, "full_layers": full_layers, "note": note}
    model, _tok = models.load_model(spec, device=device, dtype=dtype)
    n = getattr(model.config, "num_hidden_layers", None)
    return model, {"spec": spec, "preset": None, "layers": n, "full_layers": n, "note": ""}


def shared_copy(model):
    """A structurally independent copy of ``model`` whose parameters are the *same* tensors (no extra weight
    memory): PEFT, the fused engine and the loop baseline each wrap their own copy's modules."""
    memo = {id(p): p for p in model.parameters()}
    memo.update({id(b): b for b in model.buffers()})
    return copy.deepcopy(model, memo)


def tensor_bytes(obj) -> int:
    """Bytes of every distinct tensor storage reachable from a module: parameters, buffers and tensors held as
    plain attributes (or in lists/dicts of them) by any submodule."""
    import torch

    seen: set[tuple[int, int]] = set()
    total = 0

    def add(t) -> None:
        nonlocal total
        if not isinstance(t, torch.Tensor) or t.is_meta:
            return
        try:
            st = t.untyped_storage()
            key = (st.data_ptr(), st.nbytes())
            n = st.nbytes()
        except (RuntimeError, NotImplementedError):
            key, n = (t.data_ptr(), t.numel() * t.element_size()), t.numel() * t.element_size()
        if key not in seen:
            seen.add(key)
            total += n

    def walk(v, depth=0) -> None:
        if isinstance(v, torch.Tensor):
            add(v)
        elif depth < 3 and isinstance(v, (list, tuple)):
            for x in v:
                walk(x, depth + 1)
        elif depth < 3 and isinstance(v, dict):
            for x in v.values():
                walk(x, depth + 1)

    for m in obj.modules():
        for p in m.parameters(recurse=False):
            add(p)
        for b in m.buffers(recurse=False):
            add(b)
        for k, v in vars(m).items():
            if k not in ("_parameters", "_buffers", "_modules"):
                walk(v)
    return total


def adapter_file_bytes(dirs, itemsize: int | None = None) -> int:
    """Tensor bytes of PEFT adapters (from safetensors headers); ``itemsize`` recounts them in the model dtype."""
    total = 0
    sizes = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4}
    for d in dirs:
        f = Path(d) / "adapter_model.safetensors"
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
        for k, v in header.items():
            if k == "__metadata__":
                continue
            numel = math.prod(v["shape"])
            total += numel * (itemsize or sizes.get(v["dtype"], 4))
    return total


def make_adapters(model, out_dir: Path, n: int, cfg: BenchConfig, progress: bool = True) -> list[Path]:
    """``n`` random PEFT adapters of the configured rank/targets (different seeds) under ``out_dir``."""
    from tqdm.auto import tqdm

    from .fusion import make_random_adapter

    targets = tuple(t.strip() for t in cfg.target_modules.split(",") if t.strip())
    dirs = []
    for i in tqdm(range(n), desc="random adapters", disable=not progress, leave=False):
        d = Path(out_dir) / f"rand{i:03d}"
        if not (d / "adapter_model.safetensors").is_file():
            make_random_adapter(model, d, rank=cfg.rank, alpha=cfg.alpha, target_modules=targets,
                                seed=cfg.seed * 1000 + i)
        dirs.append(d)
    return dirs


def load_peft(model, dirs, progress: bool = True):
    """A PEFT model on a shared copy of ``model`` with every adapter of ``dirs`` loaded as ``a000``, ``a001``..."""
    from peft import PeftModel
    from tqdm.auto import tqdm

    base = shared_copy(model)
    names = [f"a{i:03d}" for i in range(len(dirs))]
    pm = PeftModel.from_pretrained(base, str(dirs[0]), adapter_name=names[0])
    for name, d in tqdm(list(zip(names, dirs))[1:], desc="PEFT load_adapter", disable=not progress, leave=False):
        pm.load_adapter(str(d), adapter_name=name)
    pm.set_adapter(names[0])
    pm.eval()  # PEFT leaves models in train mode
    return pm, names


# ---- the original code's method: a Python loop over the selected LoRAs -----------------------------------------

def _read_lora(d: Path, device, dtype) -> tuple[dict[str, tuple[Any, Any]], float]:
    """``({module path: (A, B)}, scale)`` of one PEFT LoRA folder."""
    from safetensors.torch import load_file

    cfg = json.loads((Path(d) / "adapter_config.json").read_text())
    r, alpha = int(cfg["r"]), float(cfg.get("lora_alpha", cfg["r"]))
    scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
    sd = load_file(str(Path(d) / "adapter_model.safetensors"), device="cpu")
    mods: dict[str, list] = {}
    for k, v in sd.items():
        for part, idx in ((".lora_A.weight", 0), (".lora_B.weight", 1)):
            if k.endswith(part):
                path = k[: -len(part)]
                path = path[len("base_model.model."):] if path.startswith("base_model.model.") else path
                mods.setdefault(path, [None, None])[idx] = v.to(device=device, dtype=dtype)
    return {k: (a, b) for k, (a, b) in mods.items()}, scale


def _loop_linear_cls():
    import torch

    class LoopLoRALinear(torch.nn.Module):
        """``y = W x + sum over selected i of w_i * s_i * B_i (A_i x)``: one delta per adapter, Python loop."""

        def __init__(self, base, As, Bs, scales, state):
            super().__init__()
            self.base, self.As, self.Bs, self.scales, self.state = base, As, Bs, scales, state

        def forward(self, x):
            y = self.base(x)
            w = self.state.get("weights")
            if w is None:
                return y
            for i in self.state["selected"]:
                delta = (x @ self.As[i].T) @ self.Bs[i].T
                y = y + delta * (w[:, i] * self.scales[i]).view(-1, *([1] * (delta.dim() - 1))).to(delta.dtype)
            return y

    return LoopLoRALinear


def loop_model(model, dirs):
    """A shared copy of ``model`` whose adapted linears run the per-adapter loop; returns ``(model, state)``.
    Set ``state["weights"]`` (B, N) and ``state["selected"]`` (adapter indices used anywhere in the batch)."""
    cls = _loop_linear_cls()
    m = shared_copy(model)
    p = next(model.parameters())
    loras = [_read_lora(d, p.device, p.dtype) for d in dirs]
    state: dict[str, Any] = {"weights": None, "selected": []}
    paths = sorted(set().union(*[set(l[0]) for l in loras]))
    for path in paths:
        parent_path, _, child = path.rpartition(".")
        parent = m.get_submodule(parent_path)
        base = getattr(parent, child)
        As = [l[0][path][0] if path in l[0] else None for l in loras]
        Bs = [l[0][path][1] if path in l[0] else None for l in loras]
        setattr(parent, child, cls(base, As, Bs, [l[1] for l in loras], state))
    m.eval()
    return m, state


# Inputs

def random_prompts(model, batch: int, length: int, seed: int, device: str):
    """Random token ids ``(batch, length)``: content does not change the speed, and no padding keeps every system
    on exactly the same shapes."""
    import torch

    g = torch.Generator().manual_seed(seed)
    vocab = int(model.config.vocab_size)
    return torch.randint(min(100, vocab - 1), vocab, (batch, length), generator=g).to(device)


def random_mixtures(batch: int, n: int, top_p: float, max_selected: int, seed: int):
    """Dense (B, N) fusion weights as the router would produce them: peaked random probabilities -> top-p
    selection (paper weighting) capped at ``max_selected`` adapters per row."""
    import torch

    from .router.select import select_top_p

    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, n, generator=g) * 3.0
    probs = torch.softmax(logits, dim=-1)
    return select_top_p(probs, top_p, weighting="paper", max_adapters=max_selected)


def _selected_stats(weights) -> dict:
    k = (weights != 0).sum(-1).tolist()
    return {"selected_per_row_mean": sum(k) / len(k), "selected_per_row_max": max(k),
            "selected_in_batch": int((weights != 0).any(0).sum())}


# Machine facts

def machine_info(device: str) -> dict:
    import torch

    info = {"platform": platform.platform(), "python": platform.python_version(), "cpu": platform.processor() or
            platform.machine(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "device": device}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        import psutil

        info["memory_gib"] = round(psutil.virtual_memory().total / 2**30, 1)
        info["load_avg_1m"] = round(os.getloadavg()[0], 2)
    except Exception:
        pass
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def versions() -> dict:
    import importlib.metadata as md

    out = {}
    for pkg in ("dlp-lora", "torch", "transformers", "peft", "tokenizers"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


# The benchmark context: one base model, shared-weight copies built on demand

class _Ctx:
    """Holds the base model, adapter folders and the lazily built systems of one benchmark run."""

    def __init__(self, cfg: BenchConfig, device: str, tmp: Path, progress: bool, bar) -> None:
        self.cfg, self.device, self.tmp, self.progress, self.bar = cfg, device, tmp, progress, bar
        self.shapes = cfg.resolved()
        self.model, self.model_info = load_bench_model(cfg.model, device, cfg.dtype, cfg.layers, cfg.seed)
        self.notes: list[str] = [self.model_info["note"]] if self.model_info["note"] else []
        self._random: list[Path] = []
        self._systems: dict[str, Any] = {}
        self.run_dirs: list[Path] | None = None
        self.run = None
        if cfg.run:
            from .run import open_run

            self.run = open_run(cfg.run)
            self.run_dirs = list(self.run.adapter_dirs)
            self.notes.append(f"adapters: the {len(self.run_dirs)} trained adapters of {cfg.run} "
                              "(P3 scaling uses random adapters)")

    def random_dirs(self, n: int) -> list[Path]:
        if len(self._random) < n:
            self._random = make_adapters(self.model, self.tmp / "adapters", n, self.cfg, self.progress)
        return self._random[:n]

    def dirs(self) -> list[Path]:
        """The adapters loaded for P1/P2/P6/P7: the run's, or ``n_adapters`` random ones."""
        return self.run_dirs if self.run_dirs is not None else self.random_dirs(self.cfg.n_adapters)

    def get(self, key: str):
        if key not in self._systems:
            self._systems[key] = self._build(key)
        return self._systems[key]

    def _build(self, key: str):
        from .fusion import fuse_adapters

        if key == "base":
            return shared_copy(self.model)
        if key == "peft":
            return load_peft(self.model, self.dirs(), self.progress)
        if key == "loop":
            return loop_model(self.model, self.dirs())
        if key == "fused":
            m = shared_copy(self.model)
            return m, fuse_adapters(m, [str(d) for d in self.dirs()])
        if key.startswith("fused_n"):
            n = int(key[len("fused_n"):])
            m = shared_copy(self.model)
            return m, fuse_adapters(m, [str(d) for d in self.random_dirs(n)])
        raise KeyError(key)

    def tick(self, *_):
        if self.bar is not None:
            self.bar.update(1)


def _w(weights, device):
    return weights.to(device)


# ---- systems (each returns a zero-argument callable for :func:`interleave`) ------------------------------------

def sys_base(ctx: _Ctx, ids, tokens):
    m = ctx.get("base")
    return lambda: decode_fixed(m, ids, tokens, ctx.device)


def sys_ours(ctx: _Ctx, ids, tokens, weights, key: str = "fused"):
    m, fused = ctx.get(key)
    w = _w(weights, ctx.device)
    return lambda: decode_fixed(m, ids, tokens, ctx.device, setup=lambda: fused.set_weights(w),
                                teardown=fused.clear_weights)


def sys_ours_merge(ctx: _Ctx, ids, tokens, weights_row, key: str = "fused"):
    m, fused = ctx.get(key)
    w = _w(weights_row, ctx.device)
    return lambda: decode_fixed(m, ids, tokens, ctx.device, setup=lambda: fused.merge(w), teardown=fused.unmerge)


def sys_peft_single(ctx: _Ctx, ids, tokens, index: int = 0):
    pm, names = ctx.get("peft")
    return lambda: decode_fixed(pm, ids, tokens, ctx.device, setup=lambda: pm.set_adapter(names[index]))


def sys_peft_mixed(ctx: _Ctx, ids, tokens, weights):
    """PEFT mixed batch: each row gets its top adapter (PEFT's adapter_names cannot mix within a row)."""
    pm, names = ctx.get("peft")
    row_names = [names[int(i)] for i in weights.argmax(-1).tolist()]
    return lambda: decode_fixed(pm, ids, tokens, ctx.device, fwd_kwargs={"adapter_names": row_names})


def sys_peft_cat(ctx: _Ctx, ids, tokens, weights):
    """PEFT ``add_weighted_adapter(cat)`` rebuilt for every distinct mixture of the batch, then one forward with
    ``adapter_names`` (one mixture per row), then the rebuilt adapters are deleted (all inside the timing)."""
    pm, names = ctx.get("peft")
    mixes: list[tuple] = []
    row_mix: list[int] = []
    for row in weights.tolist():
        key = tuple((i, w) for i, w in enumerate(row) if w != 0)
        if key not in mixes:
            mixes.append(key)
        row_mix.append(mixes.index(key))
    new = [f"mix{j}" for j in range(len(mixes))]
    row_names = [new[j] for j in row_mix]

    def build():
        for name, mix in zip(new, mixes):
            pm.add_weighted_adapter([names[i] for i, _ in mix], [w for _, w in mix], name, combination_type="cat")
        if len(new) == 1:
            pm.set_adapter(new[0])
        pm.eval()

    def drop():
        pm.set_adapter(names[0])
        for name in new:
            pm.delete_adapter(name)

    kw = {"adapter_names": row_names} if len(new) > 1 else {}
    return lambda: decode_fixed(pm, ids, tokens, ctx.device, setup=build, teardown=drop, fwd_kwargs=kw)


def sys_loop(ctx: _Ctx, ids, tokens, weights):
    m, state = ctx.get("loop")
    w = _w(weights, ctx.device)
    sel = [int(i) for i in (weights != 0).any(0).nonzero().flatten().tolist()]

    def setup():
        state["weights"], state["selected"] = w, sel

    def teardown():
        state["weights"], state["selected"] = None, []

    return lambda: decode_fixed(m, ids, tokens, ctx.device, setup=setup, teardown=teardown)


def sys_original(ctx: _Ctx, ids, tokens, weights):
    """The original code's method (DESIGN §1): batch size 1 - each row generated on its own - with a Python loop
    over that row's selected LoRAs. Departure, in the baseline's favour: it keeps a KV cache (the original code
    re-ran the whole sequence every token). Parts are summed over the rows."""
    m, state = ctx.get("loop")
    w = _w(weights, ctx.device)
    rows = [(ids[b:b + 1], w[b:b + 1], [int(i) for i in (weights[b] != 0).nonzero().flatten().tolist()])
            for b in range(ids.shape[0])]

    def run():
        total: dict[str, float] = {}
        for row_ids, row_w, sel in rows:
            def setup(row_w=row_w, sel=sel):
                state["weights"], state["selected"] = row_w, sel

            def teardown():
                state["weights"], state["selected"] = None, []

            for k, v in decode_fixed(m, row_ids, tokens, ctx.device, setup=setup, teardown=teardown).items():
                total[k] = total.get(k, 0.0) + v
        return total

    return run


# Rows

def _case(ctx: _Ctx, name: str, systems: dict, shapes: dict, ratios: dict[str, tuple[str, str, str]],
          target: tuple[str, str] | None, reps: int | None = None) -> dict:
    """Measure ``systems`` interleaved; ``ratios``: label -> (numerator, denominator, part)."""
    raw = systems if _is_raw(systems) else interleave(systems, reps=reps or ctx.shapes["reps"],
                                                       warmup=ctx.cfg.warmup, on_call=ctx.tick)
    res = {"name": name, "shapes": shapes,
           "systems": {s: {part: summarize(v) for part, v in parts.items()} for s, parts in raw.items()},
           "ratios": {}}
    for label, (a, b, part) in ratios.items():
        if a in raw and b in raw:
            res["ratios"][label] = paired_ratio(raw[a][part], raw[b][part])
    if target is not None:
        res["target_ratio"] = target[0]
    return res


def _is_raw(systems: dict) -> bool:
    """True when ``systems`` already holds measurements (``{name: {part: [values]}}``) rather than callables."""
    return all(isinstance(v, dict) for v in systems.values())


def _met(op: str, value: float, limit: float) -> bool:
    return value <= limit if op == "<=" else value >= limit


def row_p1(ctx: _Ctx) -> dict:
    cfg, sh = ctx.cfg, ctx.shapes
    dirs = ctx.dirs()
    cases = []
    for b in sh["batches_p1"]:
        ids = random_prompts(ctx.model, b, sh["prompt_len"], cfg.seed + b, ctx.device)
        w = random_mixtures(b, len(dirs), cfg.top_p, cfg.max_selected, cfg.seed + 100 + b)
        # P1 runs only its own baselines so its pair stays close in time: PEFT `cat` and the loop are measured
        # on the mixed batch (P2, P7)
        systems = {"base": sys_base(ctx, ids, sh["new_tokens"]),
                   "peft_single": sys_peft_single(ctx, ids, sh["new_tokens"]),
                   "ours": sys_ours(ctx, ids, sh["new_tokens"], w)}
        shapes = {"batch": b, "prompt_len": sh["prompt_len"], "new_tokens": sh["new_tokens"],
                  "adapters_loaded": len(dirs), **_selected_stats(w)}
        ratios = {"ours / peft_single, decode": ("ours", "peft_single", "decode"),
                  "ours / peft_single, prefill": ("ours", "peft_single", "prefill"),
                  "ours / peft_single, total": ("ours", "peft_single", "total"),
                  "ours / base, decode": ("ours", "base", "decode"),
                  "peft_single / base, decode": ("peft_single", "base", "decode")}
        cases.append(_case(ctx, f"batch {b}", systems, shapes, ratios, ("ours / peft_single, decode", "<="),
                           reps=sh["reps_decode"]))
    return {"cases": cases}


def _mixed_batch(ctx: _Ctx, systems_wanted: tuple[str, ...], reps: int):
    """One interleaved measurement of a mixed batch: 16 rows, 16 different mixtures (the same prompts and weights
    for P2 and P7), systems run in the order given. Returns ``(raw, shapes)``."""
    cfg, sh = ctx.cfg, ctx.shapes
    dirs = ctx.dirs()
    b = sh["batch_mixed"]
    ids = random_prompts(ctx.model, b, sh["prompt_len"], cfg.seed + 200, ctx.device)
    w = random_mixtures(b, len(dirs), cfg.top_p, cfg.max_selected, cfg.seed + 201)
    t = sh["new_tokens"]
    make = {"peft_single": lambda: sys_peft_single(ctx, ids, t), "ours": lambda: sys_ours(ctx, ids, t, w),
            "peft_mixed": lambda: sys_peft_mixed(ctx, ids, t, w), "peft_cat": lambda: sys_peft_cat(ctx, ids, t, w),
            "loop": lambda: sys_loop(ctx, ids, t, w), "original": lambda: sys_original(ctx, ids, t, w),
            "base": lambda: sys_base(ctx, ids, t)}
    systems = {k: make[k]() for k in systems_wanted}
    raw = interleave(systems, reps=reps, warmup=cfg.warmup, on_call=ctx.tick)
    shapes = {"batch": b, "prompt_len": sh["prompt_len"], "new_tokens": t, "adapters_loaded": len(dirs),
              "distinct_mixtures": len({tuple(r) for r in w.tolist()}), **_selected_stats(w)}
    return raw, shapes


# The systems of P2 and P7, in run order: each target pair sits side by side (measured seconds apart).
P2_SYSTEMS = ("peft_single", "ours", "peft_mixed", "peft_cat", "base")
P7_SYSTEMS = ("original", "ours", "loop", "base")


def row_p2(ctx: _Ctx) -> dict:
    raw, shapes = _mixed_batch(ctx, P2_SYSTEMS, ctx.shapes["reps_decode"])
    ratios = {"ours / homogeneous peft_single, decode": ("ours", "peft_single", "decode"),
              "ours / homogeneous peft_single, prefill": ("ours", "peft_single", "prefill"),
              "ours / homogeneous peft_single, total": ("ours", "peft_single", "total"),
              "peft_mixed / ours, decode": ("peft_mixed", "ours", "decode"),
              "peft_cat / ours, total": ("peft_cat", "ours", "total"),
              "ours / base, decode": ("ours", "base", "decode")}
    name = f"batch {shapes['batch']}, {shapes['distinct_mixtures']} mixtures"
    return {"cases": [_case(ctx, name, raw, shapes, ratios, ("ours / homogeneous peft_single, decode", "<="))],
            "notes": ["`peft_single` here is the homogeneous batch: every row uses adapter 0"]}


def row_p3(ctx: _Ctx) -> dict:
    import torch

    cfg, sh = ctx.cfg, ctx.shapes
    counts = cfg.scaling_list()
    ids = random_prompts(ctx.model, 1, sh["prompt_len"], cfg.seed + 300, ctx.device)
    # One adapter selected in every configuration, so only the number *loaded* changes (the paper's Table 6).
    systems = {}
    lo, hi = counts[0], counts[-1]
    for n in [hi, lo] + counts[1:-1]:            # the target pair side by side (measured seconds apart)
        w = torch.zeros(1, n)
        w[0, n // 2] = 1.0
        systems[f"ours_n{n}"] = sys_ours(ctx, ids, sh["new_tokens"], w, key=f"fused_n{n}")
    systems["base"] = sys_base(ctx, ids, sh["new_tokens"])
    shapes = {"batch": 1, "prompt_len": sh["prompt_len"], "new_tokens": sh["new_tokens"],
              "adapters_loaded": counts, "selected_per_row_mean": 1, "selected_per_row_max": 1}
    ratios = {f"ours(N={n}) / ours(N={lo}), decode": (f"ours_n{n}", f"ours_n{lo}", "decode") for n in counts[1:]}
    ratios[f"ours(N={hi}) / ours(N={lo}), prefill"] = (f"ours_n{hi}", f"ours_n{lo}", "prefill")
    ratios[f"ours(N={lo}) / base, decode"] = (f"ours_n{lo}", "base", "decode")
    return {"cases": [_case(ctx, "batch 1", systems, shapes, ratios, (f"ours(N={hi}) / ours(N={lo}), decode", "<="),
                            reps=sh["reps_decode"])]}


def _router_sentences(n: int, seed: int) -> list[str]:
    import random

    words = ("the model reads a question about numbers dates places people colours animals logic and answers "
             "with one word or a short sentence that explains why the chosen option is correct given facts "
             "in the passage while ignoring distractors like irrelevant names or repeated clauses").split()
    rnd = random.Random(seed)
    return [" ".join(rnd.choice(words) for _ in range(rnd.randint(8, 30))).capitalize() + "." for _ in range(n)]


def _make_router(ctx: _Ctx, n_labels: int, out: Path | None = None) -> Path:
    """A mini-MLP router trained for one epoch on synthetic sentences (speed does not depend on what it
    learned), with the base model's tokenizer (the default model's tokenizer for presets), labels
    ``task000``, ``task001``, ... Written to ``out`` (default ``TMP/router``)."""
    from .config import RouterConfig
    from .router import train_router

    out = out or ctx.tmp / "router"
    data = out.parent / f"{out.name}_data"
    data.mkdir(parents=True, exist_ok=True)
    labels = [f"task{i:03d}" for i in range(n_labels)]
    sents = _router_sentences(n_labels * 8, ctx.cfg.seed)
    for split in ("train", "val", "test"):
        with open(data / f"{split}.jsonl", "w") as f:
            for i, s in enumerate(sents):
                f.write(json.dumps({"text": s, "label": i % n_labels, "task": labels[i % n_labels]}) + "\n")
    (data / "labels.json").write_text(json.dumps(labels))
    spec = ctx.cfg.model if ctx.model_info["preset"] is None else "default"
    return Path(train_router(data, spec, out, RouterConfig(epochs=1, patience=1), overwrite=True,
                             progress=False))


def row_p4(ctx: _Ctx) -> dict:
    import torch

    from .router import Router
    from .router.select import select_top_p

    cfg, sh = ctx.cfg, ctx.shapes
    notes = []
    rdir = ctx.run.router_dir if ctx.run is not None else None
    if rdir is not None:
        notes.append(f"router: {rdir}")
    else:
        rdir = _make_router(ctx, len(ctx.run_dirs) if ctx.run_dirs else cfg.n_adapters)
        notes.append("router: mini-MLP trained 1 epoch on synthetic sentences (speed does not depend on "
                     "learned weights)" + (", default model's tokenizer (preset model)" if ctx.model_info["preset"] else ""))
    router = Router.load(rdir, device="cpu")
    one = _router_sentences(64, cfg.seed + 1)
    many = _router_sentences(sh["router_sentences"], cfg.seed + 2)
    k = 50 if cfg.quick else 200
    state = {"i": 0}

    def latency():
        t0 = time.perf_counter()
        for _ in range(k):
            state["i"] += 1
            router.probs([one[state["i"] % len(one)]])
        return {"latency_ms": (time.perf_counter() - t0) / k * 1000.0}

    def latency_select():
        t0 = time.perf_counter()
        for _ in range(k):
            state["i"] += 1
            select_top_p(router.probs([one[state["i"] % len(one)]]), cfg.top_p, "paper")
        return {"latency_ms": (time.perf_counter() - t0) / k * 1000.0}

    def throughput():
        t0 = time.perf_counter()
        router.probs(many)
        dt = time.perf_counter() - t0
        return {"sentences_per_s": len(many) / dt, "total": dt}

    raw = interleave({"router_batch1": latency, "router_batch1+select_top_p": latency_select,
                      "router_batched": throughput}, reps=sh["reps"], warmup=cfg.warmup, on_call=ctx.tick)
    systems = {s: {p: summarize(v) for p, v in parts.items()} for s, parts in raw.items()}
    lat = systems["router_batch1"]["latency_ms"]["median"]
    thr = systems["router_batched"]["sentences_per_s"]["median"]
    n_params = sum(p.numel() for p in getattr(router, "model", torch.nn.Module()).parameters()) \
        if hasattr(router, "model") else None
    shapes = {"labels": len(router.labels), "latency_calls_per_rep": k, "throughput_batch": len(many),
              "sentence_words": "8-30", "router_params": n_params, "threads": torch.get_num_threads()}
    case = {"name": "mini-MLP router", "shapes": shapes, "systems": systems, "ratios": {},
            "figures": {"latency_ms": lat, "sentences_per_s": thr}}
    return {"cases": [case], "notes": notes, "met": bool(lat < 0.5 and thr >= 20000),
            "figure": {"latency_ms": systems["router_batch1"]["latency_ms"],
                       "sentences_per_s": systems["router_batched"]["sentences_per_s"]}}


def row_p5(ctx: _Ctx) -> dict:
    cfg, sh = ctx.cfg, ctx.shapes
    dirs = ctx.dirs()
    t = sh["merge_new_tokens"]
    ids = random_prompts(ctx.model, 1, sh["prompt_len"], cfg.seed + 500, ctx.device)
    w = random_mixtures(1, len(dirs), cfg.top_p, cfg.max_selected, cfg.seed + 501)
    systems = {"base": sys_base(ctx, ids, t), "ours_merge": sys_ours_merge(ctx, ids, t, w[0])}
    shapes = {"batch": 1, "prompt_len": sh["prompt_len"], "new_tokens": t, "adapters_loaded": len(dirs),
              **_selected_stats(w)}
    ratios = {"ours_merge / base, total": ("ours_merge", "base", "total"),
              "ours_merge / base, decode": ("ours_merge", "base", "decode"),
              "ours_merge / base, prefill": ("ours_merge", "base", "prefill")}
    return {"cases": [_case(ctx, "batch 1", systems, shapes, ratios, ("ours_merge / base, total", "<="),
                            reps=sh["reps_decode"])]}


def row_p7(ctx: _Ctx) -> dict:
    raw, shapes = _mixed_batch(ctx, P7_SYSTEMS, ctx.shapes["reps"])
    ratios = {"original / ours, decode": ("original", "ours", "decode"),
              "original / ours, prefill": ("original", "ours", "prefill"),
              "original / ours, total": ("original", "ours", "total"),
              "loop / ours, decode": ("loop", "ours", "decode"),
              "ours / base, decode": ("ours", "base", "decode"),
              "loop / base, decode": ("loop", "base", "decode")}
    notes = ["the same 16 prompts and mixtures as P2, measured in their own interleaved run"]
    notes.append("`original`: the original code's method, every row generated alone (batch 1) with a Python loop "
                 "over its selected LoRAs (KV cache kept, which the original code lacked); `loop`: the same loop "
                 "run on the whole batch at once, a stronger baseline than the original code")
    case = _case(ctx, f"batch {shapes['batch']}", raw, shapes, ratios, ("original / ours, decode", ">="))
    # The adapters' own cost (time above the base model) is what the loop multiplies; shown beside the target
    # (from medians: per-repetition differences are too noisy on a shared machine).
    med = {k: statistics.median(v["decode"]) for k, v in raw.items()}
    if med["ours"] > med["base"]:
        case["figures"] = {"adapter_overhead_loop_over_ours": (med["loop"] - med["base"]) / (med["ours"] - med["base"])}
        notes.append(f"adapter overhead above base (decode medians): loop {1000 * (med['loop'] - med['base']):.1f} ms, "
                     f"ours {1000 * (med['ours'] - med['base']):.1f} ms "
                     f"({case['figures']['adapter_overhead_loop_over_ours']:.1f}x)")
    else:
        notes.append("adapter overhead above base: ours is within noise of the base model (decode medians)")
    return {"cases": [case], "notes": notes}


# ---- P8: the server's two schedulers under the same streaming load, on loopback -------------------------------

P8_TASKS = 6                                # adapters (and router labels) of the served run
P8_PHASES = ("static", "continuous", "continuous", "static")   # half the seconds each: drift hits both alike
P8_MAX_TOKENS = ((8, 4), (16, 3), (48, 2), (128, 1))           # (max_tokens, weight): short and long answers
P8_QUESTIONS = ("What is {a} plus {b}? Give the number.", "Name the capital of {c}.",
                "Sort these words alphabetically: {w}.", "Translate into French: {s}",
                "Summarise in one sentence: {s} {s}", "Is {a} a prime number? Explain step by step.",
                "Write a short story about {c} in three sentences.",
                "Classify the sentiment of this review as positive or negative: {s}")
P8_FILL = {"c": ("Peru", "Kenya", "Norway", "Japan", "Chile"),
           "w": ("pear fig apple", "zebra cat dog emu", "plum kiwi"),
           "s": ("The weather was lovely and we walked along the river for hours.",
                 "The service was slow, the food was cold and nobody apologised.",
                 "A new library opened downtown with a large children's section.")}


def p8_request(i: int, tasks: list[str], seed: int) -> dict:
    """The ``i``-th request of P8's fixed mixed workload (a streamed chat completion): its question, mixture
    (routed, one task forced, or a manual mix of two) and ``max_tokens`` drawn from a seeded distribution."""
    import random

    rnd = random.Random(seed * 1_000_003 + i)
    q = rnd.choice(P8_QUESTIONS).format(a=rnd.randint(2, 999), b=rnd.randint(2, 999),
                                        **{k: rnd.choice(v) for k, v in P8_FILL.items()})
    # ignore_eos (as vLLM's serving benchmark does): every answer runs to its drawn max_tokens, so the workload
    # really has the short and long answers it draws (random adapters would otherwise end most answers within a
    # few tokens) and both schedulers do exactly the same work
    body = {"model": "dlp", "messages": [{"role": "user", "content": q}], "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True},
            "max_tokens": rnd.choices([m for m, _ in P8_MAX_TOKENS], [w for _, w in P8_MAX_TOKENS])[0]}
    kind = rnd.random()
    if kind < 0.3:
        body["model"] = f"dlp:{rnd.choice(tasks)}"
    elif kind < 0.5 and len(tasks) > 1:
        a, b = rnd.sample(tasks, 2)
        body["dlp"] = {"weights": {a: 0.6, b: 0.4}}
    return body


async def _p8_one(client, url: str, body: dict) -> dict | None:
    """One streamed request: its time to first token, latency and output tokens; None when it failed."""
    t0 = time.perf_counter()
    first, tokens, done = None, None, False
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            await r.aread()
            return None
        async for line in r.aiter_lines():
            if line == "data: [DONE]":
                done = True
                break
            if not line.startswith("data: {"):
                continue
            obj = json.loads(line[6:])
            if "error" in obj:
                return None
            ch = obj.get("choices") or [{}]
            if first is None and (ch[0].get("delta") or {}).get("content"):
                first = time.perf_counter()
            if obj.get("usage"):
                tokens = int(obj["usage"]["completion_tokens"])
    end = time.perf_counter()
    if not done or tokens is None:
        return None
    return {"ttft": (first or end) - t0, "latency": end - t0, "tokens": tokens}


async def p8_load(url: str, clients: int, seconds: float, requests, timeout: float = 600.0) -> dict:
    """``clients`` closed-loop clients send ``next(requests)`` bodies for ``seconds``, then wait for what is in
    flight. Returns the samples, failures and the elapsed time (until the last answer)."""
    import asyncio

    import httpx

    samples, failed = [], 0
    t0 = time.perf_counter()
    t_end = t0 + seconds

    async def client_loop(client):
        nonlocal failed
        while time.perf_counter() < t_end:
            try:
                res = await _p8_one(client, url, next(requests))
            except (httpx.HTTPError, OSError, ValueError, KeyError):
                res = None
            if res is None:
                failed += 1
            else:
                samples.append(res)

    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        await asyncio.gather(*(client_loop(client) for _ in range(clients)))
    return {"samples": samples, "failed": failed, "elapsed": time.perf_counter() - t0}


async def _p8_warm(url: str, bodies: list[dict]) -> None:
    import asyncio

    import httpx

    async with httpx.AsyncClient(timeout=600) as client:
        await asyncio.gather(*(_p8_one(client, url, b) for b in bodies))


def p8_figures(phases: list[dict]) -> dict:
    """Output tokens/s over the phases' elapsed time, TTFT and request latency percentiles (seconds)."""
    samples = [s for p in phases for s in p["samples"]]
    elapsed = sum(p["elapsed"] for p in phases)

    def pct(key, q):
        v = sorted(s[key] for s in samples)
        return v[min(len(v) - 1, int(round(q / 100 * (len(v) - 1))))] if v else float("nan")

    return {"tokens_per_s": sum(s["tokens"] for s in samples) / elapsed if elapsed else 0.0,
            "ttft_p50": pct("ttft", 50), "ttft_p99": pct("ttft", 99),
            "latency_p50": pct("latency", 50), "latency_p99": pct("latency", 99),
            "requests": len(samples), "failed": sum(p["failed"] for p in phases),
            "output_tokens": sum(s["tokens"] for s in samples), "seconds": elapsed}


def start_server(run: Path, scheduler: str, model: str | None, device: str, threads: int, max_batch: int,
                 max_queue: int, log: Path) -> tuple[subprocess.Popen, str]:
    """``dlp-lora serve`` on a free loopback port in a child process (its own torch threads); waits for
    ``/health``."""
    import socket

    import httpx

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "dlp_lora", "serve", "--run", str(run), "--port", str(port), "--device", device,
           "--scheduler", scheduler, "--max-batch", str(max_batch), "--max-queue", str(max_queue),
           "--max-tokens-cap", "512"] + (["--model", model] if model else [])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads)}
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
    url, t0 = f"http://127.0.0.1:{port}", time.monotonic()
    while True:
        if proc.poll() is not None:
            tail = (log.read_text(errors="replace").strip().splitlines() or ["no output"])[-1]
            raise DLPError(f"bench P8: the {scheduler} server exited ({tail[:300]})")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        if time.monotonic() - t0 > 600:
            proc.kill()
            raise DLPError(f"bench P8: the {scheduler} server did not start within 600 s (see {log})")
        time.sleep(0.3)


def stop_server(proc: subprocess.Popen) -> None:
    import signal

    proc.send_signal(signal.SIGINT)         # uvicorn's graceful stop
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()


def compare_schedulers(run: Path, model: str | None, device: str, threads: int, clients: int, seconds: float,
                       seed: int, log_dir: Path, max_batch: int = 32, on_phase: Callable[[], Any] | None = None
                       ) -> dict:
    """Both schedulers serving ``run`` at once (two servers, each idle while the other is loaded), loaded in
    turns (:data:`P8_PHASES`, ``seconds / 2`` each) by the same request sequence over the run's tasks.
    ``model``: None = the run's own base model. Returns per-system figures, each server's engine counters from
    ``/health``, and the load average before and after."""
    import asyncio
    import itertools

    import httpx

    servers = {s: start_server(run, s, model, device, threads, max_batch, 2 * clients, log_dir / f"serve_{s}.log")
               for s in ("static", "continuous")}
    load0 = os.getloadavg()[0]
    try:
        listed = httpx.get(servers["static"][1] + "/v1/models", timeout=10).json()["data"]
        tasks = [m["id"][4:] for m in listed if m["id"].startswith("dlp:")]
        for _, url in servers.values():     # warm-up: a few requests each, outside the timing
            asyncio.run(_p8_warm(url, [p8_request(-1 - i, tasks, seed) for i in range(4)]))
        phases: dict[str, list] = {"static": [], "continuous": []}
        for k, name in enumerate(P8_PHASES):
            reqs = (p8_request(i, tasks, seed) for i in itertools.count(0 if k < 2 else 1_000_000))
            phases[name].append(asyncio.run(p8_load(servers[name][1], clients, seconds / 2, reqs)))
            if on_phase:
                on_phase()
        health = {s: httpx.get(url + "/health", timeout=10).json()["engine"] for s, (_, url) in servers.items()}
    finally:
        for proc, _ in servers.values():
            stop_server(proc)
    return {"systems": {s: p8_figures(p) for s, p in phases.items()}, "health": health,
            "load_avg": [round(load0, 2), round(os.getloadavg()[0], 2)]}


def _p8_run(ctx: _Ctx) -> Path:
    """A run folder for P8: ``P8_TASKS`` random adapters on the bench model (tasks task000...) and a mini-MLP
    router with those labels (as P4 builds one)."""
    from .fusion import make_random_adapter
    from .run import write_adapter_list

    run = ctx.tmp / "p8_run"
    targets = tuple(t.strip() for t in ctx.cfg.target_modules.split(",") if t.strip())
    dirs = [make_random_adapter(ctx.model, run / "adapters" / f"task{i:03d}", rank=ctx.cfg.rank,
                                alpha=ctx.cfg.alpha, target_modules=targets, seed=ctx.cfg.seed * 1000 + 800 + i,
                                task=f"task{i:03d}") for i in range(P8_TASKS)]
    write_adapter_list(run / "adapters.txt", dirs)
    _make_router(ctx, P8_TASKS, run / "router")
    return run


def row_p8(ctx: _Ctx) -> dict:
    import torch

    cfg, sh = ctx.cfg, ctx.shapes
    if ctx.model_info["preset"] is not None:
        raise DLPError("bench P8: serves a real model (tiny, default or a model folder), not a preset")
    threads = torch.get_num_threads()
    res = compare_schedulers(_p8_run(ctx), cfg.model, ctx.device, threads, cfg.serve_clients,
                             sh["serve_seconds"], cfg.seed, ctx.tmp, on_phase=ctx.tick)
    systems = res["systems"]
    st, co = systems["static"], systems["continuous"]
    ratios = {"tokens_per_s": co["tokens_per_s"] / st["tokens_per_s"] if st["tokens_per_s"] else float("nan"),
              "ttft_p50": co["ttft_p50"] / st["ttft_p50"], "ttft_p99": co["ttft_p99"] / st["ttft_p99"],
              "latency_p50": co["latency_p50"] / st["latency_p50"],
              "latency_p99": co["latency_p99"] / st["latency_p99"]}
    shapes = {"clients": cfg.serve_clients, "seconds_per_scheduler": sh["serve_seconds"], "max_batch": 32,
              "adapters": P8_TASKS, "max_tokens": "/".join(str(m) for m, _ in P8_MAX_TOKENS),
              "server_threads": threads}
    mean_rows = {s: h.get("mean_step_rows") or (sum(int(k) * v for k, v in h["batch_sizes"].items())
                                                / max(1, h["batches"])) for s, h in res["health"].items()}
    notes = [f"two `dlp-lora serve` processes (--scheduler static | continuous, --max-batch 32) on loopback, "
             f"loaded in turns {' → '.join(P8_PHASES)} ({sh['serve_seconds'] / 2:g} s each) by "
             f"{cfg.serve_clients} closed-loop streaming clients; the same seeded request sequence for both",
             "workload: chat questions of 8 kinds; 50% routed (`dlp`), 30% one task forced, 20% a manual mix "
             "of two; max_tokens " + ", ".join(f"{m} (weight {w})" for m, w in P8_MAX_TOKENS)
             + "; `ignore_eos`, so every answer has its drawn length (vLLM's serving benchmark does the same)",
             f"load average (1 min) before / after P8: {res['load_avg'][0]} / {res['load_avg'][1]}",
             "mean rows per engine call (static) / per decode step (continuous): "
             f"{mean_rows['static']:.1f} / {mean_rows['continuous']:.1f}",
             "TTFT: from sending the request to the first streamed text; latency: to `data: [DONE]`; tokens/s: "
             "output tokens of the answered requests over the phases' time (in-flight requests drained)"]
    case = {"name": f"{cfg.serve_clients} clients", "shapes": shapes, "systems": systems, "ratios": ratios,
            "figures": {"health": res["health"]}}
    met = bool(ratios["tokens_per_s"] >= 1.5 and ratios["ttft_p99"] <= 0.5 and not st["failed"] and not co["failed"])
    return {"cases": [case], "notes": notes, "met": met, "systems": systems,
            "figure": {"tokens_per_s_ratio": ratios["tokens_per_s"], "ttft_p99_ratio": ratios["ttft_p99"]}}


# ---- P6: memory, measured in a fresh child process so nothing else inflates the peak ---------------------------

def _rss_peak_bytes() -> int:
    import resource

    v = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return v if sys.platform == "darwin" else v * 1024


def _p6_child(spec: dict) -> dict:
    """Runs in a child process: base decode peak, then fuse ``dirs`` and decode with a mixture."""
    import torch

    from .fusion import fuse_adapters

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    device = spec["device"]
    cuda = device.startswith("cuda")
    model, _ = load_bench_model(spec["model"], device, spec["dtype"], spec["layers"], spec["seed"])
    ids = random_prompts(model, spec["batch"], spec["prompt_len"], spec["seed"], device)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base_tensors = tensor_bytes(model)
    decode_fixed(model, ids, spec["new_tokens"], device)
    base_peak = torch.cuda.max_memory_allocated() if cuda else _rss_peak_bytes()
    fused = fuse_adapters(model, spec["dirs"])
    w = random_mixtures(spec["batch"], len(spec["dirs"]), spec["top_p"], spec["max_selected"], spec["seed"])
    ours_tensors = tensor_bytes(model)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    decode_fixed(model, ids, spec["new_tokens"], device, setup=lambda: fused.set_weights(w.to(device)),
                 teardown=fused.clear_weights)
    ours_peak = torch.cuda.max_memory_allocated() if cuda else _rss_peak_bytes()
    return {"base_tensor_bytes": base_tensors, "ours_tensor_bytes": ours_tensors, "base_peak_bytes": base_peak,
            "ours_peak_bytes": ours_peak, "peak_kind": "torch.cuda.max_memory_allocated" if cuda else "ru_maxrss (RSS)"}


def row_p6(ctx: _Ctx) -> dict:
    import torch

    cfg, sh = ctx.cfg, ctx.shapes
    dirs = ctx.dirs()
    itemsize = next(ctx.model.parameters()).element_size()
    spec = {"model": cfg.model, "device": ctx.device, "dtype": cfg.dtype, "layers": cfg.layers, "seed": cfg.seed,
            "dirs": [str(d) for d in dirs], "batch": 8, "prompt_len": sh["prompt_len"],
            "new_tokens": sh["new_tokens"], "top_p": cfg.top_p, "max_selected": cfg.max_selected,
            "threads": torch.get_num_threads()}
    proc = subprocess.run([sys.executable, "-m", "dlp_lora.bench", "--p6-child", json.dumps(spec)],
                          capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    ctx.tick()
    lines = [l for l in proc.stdout.splitlines() if l.startswith("P6RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise DLPError(f"bench P6: memory child process failed ({tail[:300]})")
    r = json.loads(lines[-1][len("P6RESULT "):])
    ab = adapter_file_bytes(dirs, itemsize)
    peak_ratio = r["ours_peak_bytes"] / (r["base_peak_bytes"] + ab)
    tensor_ratio = r["ours_tensor_bytes"] / (r["base_tensor_bytes"] + ab)
    figs = {**r, "adapter_bytes": ab, "peak_ratio": peak_ratio, "tensor_ratio": tensor_ratio}
    shapes = {"batch": 8, "prompt_len": sh["prompt_len"], "new_tokens": sh["new_tokens"],
              "adapters_loaded": len(dirs)}
    case = {"name": f"{len(dirs)} adapters", "shapes": shapes, "systems": {}, "ratios": {}, "figures": figs}
    notes = ["one measurement in a fresh process (memory is not noisy like time); peak = "
             + r["peak_kind"] + "; tensor bytes = every distinct tensor storage held by the model"]
    return {"cases": [case], "notes": notes, "met": bool(peak_ratio <= 1.10),
            "figure": {"peak_ratio": peak_ratio, "tensor_ratio": tensor_ratio}}


ROW_FUNCS = {"P1": row_p1, "P2": row_p2, "P3": row_p3, "P4": row_p4, "P5": row_p5, "P6": row_p6, "P7": row_p7,
             "P8": row_p8}


def _planned_calls(cfg: BenchConfig) -> int:
    sh = cfg.resolved()
    per, per_d = sh["reps"] + cfg.warmup, sh["reps_decode"] + cfg.warmup
    n = {"P1": 2 * 3 * per_d, "P2": len(P2_SYSTEMS) * per_d, "P3": (len(cfg.scaling_list()) + 1) * per_d,
         "P4": 3 * per, "P5": 2 * per_d, "P6": 1, "P7": len(P7_SYSTEMS) * per, "P8": len(P8_PHASES)}
    return sum(n[r] for r in cfg.rows())


def _judge(row: str, res: dict) -> None:
    """Fill ``res["met"]`` and ``res["figure"]`` for ratio rows from their target ratio."""
    if row in ("P4", "P6", "P8"):
        return
    t = TARGETS[row]
    mets, figs = [], {}
    for case in res["cases"]:
        label = case.get("target_ratio")
        r = case["ratios"].get(label)
        if r is None:
            continue
        ok = _met(t["op"], r["median"], t["value"])
        case["met"] = ok
        mets.append(ok)
        figs[case["name"]] = {"ratio": label, **{k: r[k] for k in ("median", "min", "max")}}
    res["met"] = bool(mets) and all(mets)
    res["figure"] = figs


# Profiles of missed targets

def profile_call(fn: Callable[[], Any], device: str, rows: int = 14) -> str:
    """``torch.profiler`` table (top ops by self CPU time) of one call of ``fn``."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    sort = "self_cuda_time_total" if device.startswith("cuda") else "self_cpu_time_total"
    for _ in range(2):  # a profiler session has come back empty once in a long run; one retry
        with profile(activities=acts) as prof:
            fn()
        table = prof.key_averages().table(sort_by=sort, row_limit=rows, max_name_column_width=48)
        if table.strip():
            return table
    return "(torch.profiler returned no events)"


def _profile_missed(ctx: _Ctx, row: str) -> dict:
    """Profiles of ours and its baseline for the missed row's first missed case."""
    cfg, sh = ctx.cfg, ctx.shapes
    dirs = ctx.dirs()
    out = {}
    if row in ("P1", "P2"):
        b = 1 if row == "P1" else sh["batch_mixed"]
        ids = random_prompts(ctx.model, b, sh["prompt_len"], cfg.seed + 900, ctx.device)
        w = random_mixtures(b, len(dirs), cfg.top_p, cfg.max_selected, cfg.seed + 901)
        out["ours"] = profile_call(sys_ours(ctx, ids, sh["new_tokens"], w), ctx.device)
        out["peft_single"] = profile_call(sys_peft_single(ctx, ids, sh["new_tokens"]), ctx.device)
    elif row == "P3":
        hi = cfg.scaling_list()[-1]
        ids = random_prompts(ctx.model, 1, sh["prompt_len"], cfg.seed + 900, ctx.device)
        import torch
        w = torch.zeros(1, hi)
        w[0, 0] = 1
        out[f"ours_n{hi}"] = profile_call(sys_ours(ctx, ids, sh["new_tokens"], w, key=f"fused_n{hi}"), ctx.device)
    elif row == "P5":
        ids = random_prompts(ctx.model, 1, sh["prompt_len"], cfg.seed + 900, ctx.device)
        w = random_mixtures(1, len(dirs), cfg.top_p, cfg.max_selected, cfg.seed + 901)
        out["ours_merge"] = profile_call(sys_ours_merge(ctx, ids, sh["merge_new_tokens"], w[0]), ctx.device)
        out["base"] = profile_call(sys_base(ctx, ids, sh["merge_new_tokens"]), ctx.device)
    elif row == "P7":
        ids = random_prompts(ctx.model, sh["batch_mixed"], sh["prompt_len"], cfg.seed + 900, ctx.device)
        w = random_mixtures(sh["batch_mixed"], len(dirs), cfg.top_p, cfg.max_selected, cfg.seed + 901)
        out["ours"] = profile_call(sys_ours(ctx, ids, sh["new_tokens"], w), ctx.device)
        out["original"] = profile_call(sys_original(ctx, ids, sh["new_tokens"], w), ctx.device)
    return out


# Report

def _fmt(s: dict, scale: float = 1.0, digits: int = 2) -> str:
    return f"{s['median'] * scale:.{digits}f} ({s['min'] * scale:.{digits}f}–{s['max'] * scale:.{digits}f})"


def _mib(b: float) -> str:
    return f"{b / 2**20:.1f} MiB"


def render_markdown(results: dict) -> str:
    """The Markdown section of one benchmark run (also stored as ``results.md``)."""
    L = _md_header(results)
    L.append("| id | measure | figure (median, min–max) | target | met |")
    L.append("|---|---|---|---|---|")
    L += [_md_summary_row(row, results["rows"][row]) for row in results["rows_run"]]
    L.append("")
    for row in results["rows_run"]:
        r = results["rows"][row]
        if "error" in r:
            continue
        L += [f"### {row}: {TITLES[row]}", ""]
        L += [f"- {n}" for n in r.get("notes", [])] + ([""] if r.get("notes") else [])
        for case in r["cases"]:
            L += _md_case(row, case)
        L += _md_profile(row, results.get("profiles", {}).get(row))
    return "\n".join(L).rstrip() + "\n"


def _md_header(results: dict) -> list[str]:
    """Who wrote the section, on what machine, model, adapters and prompt shapes."""
    m, s = results["machine"], results["settings"]
    L = [f"## {results['name']}: {results['model']['spec']} on {results['device']} ({results['dtype']})", ""]
    L.append(f"Written by `{results['command']}` on {results['created']} "
             f"({results['seconds']:.0f} s). Every figure: median (min–max) of {s['reps']} interleaved repetitions "
             f"({s.get('reps_decode', s['reps'])} for the decode rows P1-P3, P5) after {s['warmup']} warm-up call(s); "
             "ratios are per-repetition pairs. Times in ms.")
    L.append("")
    L.append(f"- machine: {m.get('cpu')} · {m.get('cpu_count')} CPUs · {m.get('memory_gib', '?')} GiB · "
             f"{m.get('gpu', 'no GPU')} · load avg at start {m.get('load_avg_1m', '?')} · {m['platform']}")
    L.append(f"- torch threads: **{results['threads']}** (fixed with torch.set_num_threads)")
    L.append("- versions: " + ", ".join(f"{k} {v}" for k, v in results["versions"].items()))
    mi = results["model"]
    L.append(f"- model: {mi['spec']} ({mi.get('name_or_path', '')}; hidden {mi.get('hidden_size')}, "
             f"layers {mi.get('layers')}/{mi.get('full_layers')}, vocab {mi.get('vocab_size')})")
    if set(results["rows_run"]) - {"P8"}:   # P8 serves a run of its own (its notes say which)
        L.append(f"- adapters: {s['adapters']}")
        L.append(f"- prompts: random token ids, {s['prompt_len']} tokens/row; generated {s['new_tokens']} tokens/row "
                 f"(P5: {s['merge_new_tokens']}), same greedy KV-cached loop for every system, no EOS stop")
    L += [f"- note: {n}" for n in results["notes"]]
    return L + [""]


def _md_summary_row(row: str, r: dict) -> str:
    """One line of the summary table: the row's headline figure against its target."""
    t = TARGETS[row]
    if "error" in r:
        return f"| {row} | {TITLES[row]} | error: {r['error']} | {t['figure']} | — |"
    if row == "P4":
        f = r["figure"]
        fig = f"latency {_fmt(f['latency_ms'], 1, 3)} ms; throughput {_fmt(f['sentences_per_s'], 1, 0)} sent/s"
        tgt = "< 0.5 ms; ≥ 20000 sent/s"
    elif row == "P8":
        st, co, f = r["systems"]["static"], r["systems"]["continuous"], r["figure"]
        fig = (f"output tokens/s {co['tokens_per_s']:.1f} vs {st['tokens_per_s']:.1f} "
               f"({f['tokens_per_s_ratio']:.2f}×); "
               f"p99 TTFT {co['ttft_p99']:.2f} s vs {st['ttft_p99']:.2f} s ({f['ttft_p99_ratio']:.2f}×)")
        tgt = "continuous / static: ≥ 1.50× tokens/s; ≤ 0.50× p99 TTFT"
    elif row == "P6":
        c = r["cases"][0]["figures"]
        fig = (f"peak {r['figure']['peak_ratio']:.3f}× ({_mib(c['ours_peak_bytes'])} vs {_mib(c['base_peak_bytes'])}"
               f" + {_mib(c['adapter_bytes'])}); tensors {r['figure']['tensor_ratio']:.3f}×")
        tgt = "≤ 1.10×"
    else:
        fig = "; ".join(f"{name}: {v['median']:.3f}× ({v['min']:.3f}–{v['max']:.3f})"
                        for name, v in r["figure"].items())
        tgt = f"{t['op'].replace('<=', '≤').replace('>=', '≥')} {t['value']:.2f}× ({t['figure']})"
    return f"| {row} | {TITLES[row]} | {fig} | {tgt} | {'yes' if r.get('met') else '**no**'} |"


def _md_case(row: str, case: dict) -> list[str]:
    """The detail tables of one case of a row: per-system parts (P4), memory (P6) or times and ratios."""
    sh = ", ".join(f"{k} {v}" for k, v in case["shapes"].items())
    L = [f"**{case['name']}** — {sh}", ""]
    if row == "P8":
        L += ["| scheduler | output tokens/s | TTFT p50 s | TTFT p99 s | latency p50 s | latency p99 s | answered "
              "| failed |", "|---|---|---|---|---|---|---|---|"]
        keys = ("tokens_per_s", "ttft_p50", "ttft_p99", "latency_p50", "latency_p99")
        for name, v in case["systems"].items():
            L.append(f"| {name} | " + " | ".join(f"{v[k]:.{1 if k == 'tokens_per_s' else 3}f}" for k in keys)
                     + f" | {v['requests']} | {v['failed']} |")
        L.append("| continuous / static | " + " | ".join(f"{case['ratios'][k]:.2f}×" for k in keys) + " | | |")
    elif row == "P4":
        L += ["| system | figure |", "|---|---|"]
        for name, parts in case["systems"].items():
            L += [f"| {name} | {part}: {_fmt(v, 1, 3 if part.endswith('ms') else 0)} |"
                  for part, v in parts.items() if part != "total"]
    elif row == "P6":
        f = case["figures"]
        L += ["| measure | base | ours | base + adapters | ratio |", "|---|---|---|---|---|"]
        L.append(f"| peak ({f['peak_kind']}) | {_mib(f['base_peak_bytes'])} | {_mib(f['ours_peak_bytes'])} | "
                 f"{_mib(f['base_peak_bytes'] + f['adapter_bytes'])} | {f['peak_ratio']:.3f}× |")
        L.append(f"| tensor bytes | {_mib(f['base_tensor_bytes'])} | {_mib(f['ours_tensor_bytes'])} | "
                 f"{_mib(f['base_tensor_bytes'] + f['adapter_bytes'])} | {f['tensor_ratio']:.3f}× |")
    else:
        L += ["| system | setup ms | prefill ms | decode ms | total ms |", "|---|---|---|---|---|"]
        for name, parts in case["systems"].items():
            cells = [_fmt(parts[p], 1000.0) if p in parts else "—" for p in ("setup", "prefill", "decode", "total")]
            L.append(f"| {name} | " + " | ".join(cells) + " |")
        L += ["", "| ratio | median (min–max) |", "|---|---|"]
        for label, v in case["ratios"].items():
            mark = " ← target" if label == case.get("target_ratio") else ""
            L.append(f"| {label}{mark} | {v['median']:.3f}× ({v['min']:.3f}–{v['max']:.3f}) |")
    return L + [""]


def _md_profile(row: str, prof: dict | None) -> list[str]:
    """torch.profiler tables of a row whose target was missed, folded away."""
    if not prof:
        return []
    L = [f"<details><summary>torch.profiler, {row} (target missed): top ops by self time, one call each</summary>", ""]
    for name, table in prof.items():
        L += [f"`{name}`", "", "```", table.rstrip(), "```", ""]
    return L + ["</details>", ""]


BENCH_HEADER = """# Benchmarks

Written by `dlp-lora bench` (never by hand): each section below is replaced when its run is repeated with the
same `--out` name. Protocol (DESIGN §7): every comparison runs in one process on the same model and inputs,
interleaved (A B C, then C B A, …), after warm-up; figures are the median of ≥ 5 repetitions with min–max; the
thread count is fixed and printed. Each row has a target (DESIGN §7). System names: `base` plain model; `ours` fused engine
(dense per-row mixture); `ours_merge` mixture folded into W; `peft_single` PEFT, one active adapter for the
whole batch; `peft_mixed` PEFT `adapter_names=` mixed batch (one adapter per row); `peft_cat` PEFT
`add_weighted_adapter(combination_type="cat")` rebuilt per mixture (rebuild and delete inside the timing);
`loop` a Python loop over the selected LoRAs, run on the whole batch; `original` the original code's method:
every row alone (batch 1) with that loop over its LoRAs (KV cache kept, in its favour).
"""


def update_benchmarks_md(path: str | os.PathLike, name: str, section: str) -> Path:
    """Insert or replace the section of run ``name`` in ``BENCHMARKS.md`` (atomic write)."""
    path = Path(path)
    start, end = f"<!-- bench:{name} start -->", f"<!-- bench:{name} end -->"
    block = f"{start}\n{section.rstrip()}\n{end}\n"
    text = path.read_text(encoding="utf-8") if path.is_file() else BENCH_HEADER
    if start in text and end in text:
        a, b = text.index(start), text.index(end) + len(end)
        text = text[:a] + block.rstrip("\n") + text[b:]
    else:
        text = text.rstrip("\n") + "\n\n" + block
    atomic_write_text(path, text if text.endswith("\n") else text + "\n")
    return path


# Entry point

def run_bench(model: str = "tiny", quick: bool = False, only: str | list | None = None,
              out: str | os.PathLike = "bench/latest", run: str | None = None, reps: int = 0,
              threads: int = 0, markdown: str | os.PathLike | None = "BENCHMARKS.md", overwrite: bool = True,
              progress: bool = True, config: BenchConfig | None = None, command: str | None = None,
              **kw) -> dict:
    """Run the benchmark rows, write ``out/results.json`` (+ ``results.md``, ``config.json``) and update
    ``markdown`` (BENCHMARKS.md; None = don't). Returns the results dict."""
    import torch
    from tqdm.auto import tqdm

    from . import models

    if config is None:
        if isinstance(only, (list, tuple)):
            only = ",".join(only)
        config = BenchConfig(model=str(model), quick=quick, only=only or "", run=str(run or ""), reps=reps,
                             threads=threads, **kw)
    cfg = config
    out = Path(out)
    name = out.name
    check(name not in ("", ".", ".."), f"{out}: --out must name a folder (bench/NAME)")
    if out.exists() and not overwrite:
        raise DLPError(f"{out}: already exists (pass --overwrite to replace it)")
    device = models.pick_device(cfg.device or None)
    thread_note = pick_threads(cfg.threads, device)
    threads = torch.get_num_threads()
    print(f"bench: torch threads = {threads} (fixed), device = {device}, model = {cfg.model}, "
          f"rows = {','.join(cfg.rows())}{', quick' if cfg.quick else ''}", flush=True)
    t_start = time.time()
    created = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    results: dict[str, Any] = {"schema": 1, "name": name, "created": created,
                               "command": command or _command_line(cfg, out),
                               "machine": machine_info(device), "threads": threads, "versions": versions(),
                               "device": device, "config": dataclasses.asdict(cfg), "rows": {}, "profiles": {}}
    with tempfile.TemporaryDirectory(prefix="dlp-bench-") as tmp:
        bar = tqdm(total=_planned_calls(cfg), desc="bench", unit="call", disable=not progress)
        ctx = _Ctx(cfg, device, Path(tmp), progress, bar)
        results["dtype"] = str(next(ctx.model.parameters()).dtype).replace("torch.", "")
        mid = models.model_identity(ctx.model)
        results["model"] = {**mid, **ctx.model_info}
        sh = ctx.shapes
        adapters = (f"{len(ctx.run_dirs)} trained adapters from {cfg.run}" if ctx.run_dirs is not None else
                    f"{cfg.n_adapters} random PEFT LoRAs, rank {cfg.rank}, alpha {cfg.alpha:g}, "
                    f"targets {cfg.target_modules} (make_random_adapter)")
        results["settings"] = {**sh, "warmup": cfg.warmup, "adapters": adapters, "scaling": cfg.scaling_list()}
        results["rows_run"] = cfg.rows()
        for row in cfg.rows():
            bar.set_description(f"bench {row}")
            res = ROW_FUNCS[row](ctx)
            _judge(row, res)
            results["rows"][row] = res
            if not res.get("met") and cfg.profile and not cfg.quick and row not in ("P4", "P6", "P8"):
                bar.set_description(f"profile {row}")
                results["profiles"][row] = _profile_missed(ctx, row)
        bar.close()
        results["notes"] = ([thread_note] if thread_note else []) + ctx.notes
    results["seconds"] = time.time() - t_start
    section = render_markdown(results)
    with atomic_dir(out, overwrite=True) as d:
        atomic_write_json(d / "results.json", results)
        atomic_write_text(d / "results.md", section)
        save_config(cfg, d / "config.json")
    if markdown:
        update_benchmarks_md(markdown, name, section)
    return results


def pick_threads(threads: int, device: str) -> str:
    """Fix the torch thread count (the protocol prints it). ``0`` = torch's default, except on a CPU that is
    already busy (1-minute load average >= half the CPU count): then 1, because OpenMP threads waiting for each
    other on an oversubscribed machine turn every figure into scheduler noise (measured here: tiny model,
    2 threads under load = 8x slower per token than 1 thread). Returns a note when the automatic choice applied."""
    import torch

    if threads:
        torch.set_num_threads(threads)
        return ""
    if not device.startswith("cuda"):
        try:
            load, cpus = os.getloadavg()[0], os.cpu_count() or 1
        except OSError:
            return ""
        if load >= cpus / 2 and torch.get_num_threads() > 1:
            torch.set_num_threads(1)
            return (f"threads: 1 chosen automatically (load average {load:.1f} on {cpus} CPUs at start; "
                    "pass --threads N to override)")
    return ""


def _command_line(cfg: BenchConfig, out: Path) -> str:
    parts = ["dlp-lora bench", f"--model {cfg.model}"]
    parts += ["--quick"] if cfg.quick else []
    parts += [f"--only {cfg.only}"] if cfg.only else []
    parts += [f"--run {cfg.run}"] if cfg.run else []
    parts += [f"--reps {cfg.reps}"] if cfg.reps else []
    parts += [f"--threads {cfg.threads}"] if cfg.threads else []
    parts += [f"--layers {cfg.layers}"] if cfg.layers else []
    parts += [f"--prompt-len {cfg.prompt_len}"] if cfg.prompt_len else []
    parts += [f"--new-tokens {cfg.new_tokens}"] if cfg.new_tokens else []
    parts += [f"--merge-new-tokens {cfg.merge_new_tokens}"] if cfg.merge_new_tokens else []
    return " ".join(parts + [f"--out {out}"])


def summary_lines(results: dict) -> list[str]:
    """One line per row: figure, target, met."""
    lines = []
    for row in results["rows_run"]:
        r = results["rows"][row]
        if row == "P8":
            f = r["figure"]
            fig = f"continuous/static tokens/s {f['tokens_per_s_ratio']:.2f}x, p99 TTFT {f['ttft_p99_ratio']:.2f}x"
        elif row == "P4":
            f = r["figure"]
            fig = f"latency {f['latency_ms']['median']:.3f} ms, {f['sentences_per_s']['median']:.0f} sentences/s"
        elif row == "P6":
            fig = f"peak {r['figure']['peak_ratio']:.3f}x, tensors {r['figure']['tensor_ratio']:.3f}x"
        else:
            fig = "; ".join(f"{k}: {v['median']:.3f}x ({v['min']:.3f}-{v['max']:.3f})" for k, v in r["figure"].items())
        lines.append(f"{row}: {fig} -> {'met' if r.get('met') else 'MISSED'}")
    return lines


if __name__ == "__main__":  # the P6 memory child: python -m dlp_lora.bench --p6-child JSON
    if len(sys.argv) == 3 and sys.argv[1] == "--p6-child":
        print("P6RESULT " + json.dumps(_p6_child(json.loads(sys.argv[2]))), flush=True)
    else:
        sys.stderr.write("usage: dlp-lora bench ... (this module's own entry is internal)\n")
        raise SystemExit(2)
