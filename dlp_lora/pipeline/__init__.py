"""DLPPipeline: route -> select top-p -> set the fused mixture -> generate (batched, left padded, KV cache).

``granularity="prompt"`` routes each request once, on the whole prompt. ``granularity="sentence"`` (the paper,
§3): the prompt is split into sentences (a regex, :func:`dlp_lora.data.split_sentences`), each sentence's tokens
are prefilled with that sentence's own mixture (per-token ``(B, S, N)`` weights), generation starts with the last
prompt sentence's mixture, and when a row's decoded text completes a sentence the router re-runs on that sentence
and the row's weights change for the tokens that follow; the KV cache is kept (earlier tokens keep the keys and
values they were computed with). All router calls of one decode step are batched into one ``router.probs`` call.

Per-token weights with a KV cache follow the fused engine's convention: the weights passed to ``set_weights``
always align with the *new* input tokens (``(B, S_prompt, N)`` for the prefill, ``(B, N)`` for decode steps).

The decode loop is ours (not ``model.generate``) so that rows can change mixture mid-stream; it uses the model's
own KV cache, correct ``position_ids`` for left padding, per-row EOS (``generation_config`` + tokenizer), per-row
stop strings, ``max_new_tokens`` and temperature, and drops finished rows from the batch (and the cache).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import os
import re
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .config import DLPError
from .data import format_prompt, split_sentences
from .fusion import FusedAdapters, fuse_adapters
from .models import eos_token_ids, load_model, tokenizer_identity
from .router.select import select_top_p
from .run import Run, open_run
from .selection import SelectionConfig
# a sentence boundary in generated text: end punctuation (+ closing quotes/brackets) then whitespace, or a newline
_BOUNDARY = re.compile(r"[.!?][\"')\]]*\s|\n")


@dataclasses.dataclass
class GenerationResult:
    """One generated answer and how it was routed."""

    text: str                               # the generated text (stop string and EOS removed)
    routing: list[dict]                     # per sentence: {sentence, selected, weights, probs, source}
    prompt_tokens: int                      # tokens of the (formatted) prompt
    completion_tokens: int                  # tokens generated (EOS included when it was generated)
    finish_reason: str                      # "stop" (EOS or stop string), "length" or "cancelled"
    seconds: float                          # wall time from the start of its batch until the row finished

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def load_router(router, device: str = "cpu"):
    """``None`` | a router folder | an object with ``.labels`` and ``.probs(texts) -> (B, N)``."""
    if router is None:
        return None
    if isinstance(router, (str, os.PathLike)):
        p = Path(router)
        if not p.is_dir():
            raise DLPError(f"{p}: router folder not found")
        try:
            from .router.inference import Router
        except ImportError:
            raise DLPError(f"{p}: cannot load routers (dlp_lora.router.Router is not available)") from None
        return Router.load(p, device=device)
    if not (hasattr(router, "labels") and callable(getattr(router, "probs", None))):
        raise DLPError(f"router: expected a router folder or an object with .labels and .probs(texts), "
                       f"got {type(router).__name__}")
    return router


def _row_list(value, n: int, name: str) -> list:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise DLPError(f"{name}: {len(value)} values for {n} prompts")
        return list(value)
    return [value] * n


def _stop_lists(stop, n: int) -> list[list[str]]:
    """``stop``: None | str | list[str] (shared by all rows) | per-row list of (None | str | list[str])."""
    def one(s, where):
        if s is None:
            return []
        if isinstance(s, str):
            return [s] if s else []
        if isinstance(s, (list, tuple)) and all(isinstance(x, str) for x in s):
            return [x for x in s if x]
        raise DLPError(f"{where}: expected a string or a list of strings")

    if isinstance(stop, (list, tuple)) and any(x is None or isinstance(x, (list, tuple)) for x in stop):
        if len(stop) != n:
            raise DLPError(f"stop: {len(stop)} per-row values for {n} prompts")
        return [one(s, f"stop[{i}]") for i, s in enumerate(stop)]
    shared = one(stop, "stop")
    return [list(shared) for _ in range(n)]


def _held_back(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of ``text`` that could still become a stop string (not streamed yet)."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if s.startswith(text[-k:]):
                best = k
                break
    return best


class _Row:
    """Decode state of one prompt."""

    def __init__(self, index: int, max_new: int, temperature: float, stops: list[str]) -> None:
        self.index = index
        self.max_new = max_new
        self.temperature = temperature
        self.stops = stops
        self.ids: list[int] = []
        self.prefix_off = 0
        self.read_off = 0
        self.text = ""
        self.emitted = 0
        self.sent_start = 0
        self.finish: str | None = None
        self.seconds = 0.0
        self.routing: list[dict] = []
        self.prompt_tokens = 0


class DLPPipeline:
    """Base model + fused task adapters + router. ``generate`` routes, mixes and decodes a batch at once."""

    def __init__(self, model, tokenizer, fused: FusedAdapters, router=None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.fused = fused
        self.names = list(fused.names)
        self.router = load_router(router)
        if self.router is not None:
            self._check_router(self.router)
        self.eos_ids = set(eos_token_ids(model, tokenizer))
        try:
            self._keep_arg = "logits_to_keep" in inspect.signature(model.forward).parameters
        except (TypeError, ValueError):
            self._keep_arg = False
        self.device = next(model.parameters()).device

    @classmethod
    def from_run(cls, run: Run | str | os.PathLike | Sequence, *, model: str | None = None, router=None,
                 device: str | None = None, dtype: str | None = "auto") -> "DLPPipeline":
        """The one way to build a pipeline from a run: ``run`` is a :class:`~dlp_lora.run.Run` or anything
        :func:`~dlp_lora.run.open_run` takes. ``model`` overrides the adapters' own base model; ``router``: None =
        the run's ``router/`` when present, a folder or a router object, False = none."""
        if not isinstance(run, Run):
            run = open_run(run, router=router if router is None or isinstance(router, (str, os.PathLike, bool))
                           else False, model=model)
        elif model:
            run = dataclasses.replace(run, base_model=str(model))
        router_src = router if router is not None and not isinstance(router, (str, os.PathLike, bool)) \
            else run.router_dir
        router_obj = load_router(router_src)        # fail on a bad router before loading the model
        lm, tok = load_model(run.base_model, device=device, dtype=dtype)
        fused = fuse_adapters(lm, run.adapter_dirs, names=run.names)
        return cls(lm, tok, fused, router_obj)

    def _check_router(self, router) -> None:
        labels = list(router.labels)
        if labels != self.names:
            raise DLPError(f"router: labels {labels} do not match the adapters' tasks {self.names} "
                           "(same tasks in the same order are needed)")
        rid = getattr(router, "tokenizer_id", None)
        if rid and rid != tokenizer_identity(self.tokenizer):
            raise DLPError("router: it was trained with another tokenizer than the base model's "
                           f"({rid} != {tokenizer_identity(self.tokenizer)})")

    # routing ----------------------------------------------------------------------------------------------------
    def route(self, texts: Sequence[str], selection: SelectionConfig | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Router probabilities ``(B, N)`` and top-p fusion weights ``(B, N)`` for ``texts``."""
        sel = selection or SelectionConfig()
        if self.router is None:
            raise DLPError("router: none loaded (pass a router, or force a mixture with weights=)")
        texts = list(texts)
        probs = self.router.probs(texts)
        probs = torch.as_tensor(probs, dtype=torch.float32).detach().cpu()
        if probs.shape != (len(texts), len(self.names)):
            raise DLPError(f"router: probs of shape {tuple(probs.shape)}, expected ({len(texts)}, {len(self.names)})")
        return probs, select_top_p(probs, sel.top_p, sel.weighting, sel.max_adapters or None,
                                   sel.min_confidence or None)

    def _record(self, sentence: str, w: torch.Tensor, p: torch.Tensor | None, source: str) -> dict:
        sel = sorted((i for i in range(len(self.names)) if float(w[i]) > 0), key=lambda i: (-float(w[i]), i))
        return {"sentence": sentence, "selected": [self.names[i] for i in sel],
                "weights": [round(float(w[i]), 6) for i in sel],
                "probs": {} if p is None else {n: round(float(p[i]), 6) for i, n in enumerate(self.names)},
                "source": source}

    # generation -------------------------------------------------------------------------------------------------
    def generate(self, prompts: Sequence[str] | str, selection: SelectionConfig | None = None, *, weights=None,
                 max_new_tokens=64, temperature=0.0, top_p_sampling: float = 1.0, seed: int | None = None,
                 stop=None, chat: bool = True, on_text: Callable[[int, str], Any] | None = None,
                 batch_size: int = 16, merge: bool = False) -> list[GenerationResult]:
        """Generate for every prompt (see the module doc). ``selection``: top-p, weighting, caps and granularity
        (default :class:`SelectionConfig`). ``weights`` forces a mixture: a ``(B, N)`` tensor or a
        per-row list of ``None`` (route) | ``{task: weight}`` | ``(N,)`` tensor; all-zero = base model.
        ``on_text(row, delta)`` streams text; returning True cancels that row. ``merge=True`` generates one
        prompt at a time with the mixture folded into the weights (≈0 per-token overhead)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        if not all(isinstance(p, str) for p in prompts):
            raise DLPError("prompts: expected a list of strings")
        n = len(prompts)
        sel = selection or SelectionConfig()
        if not isinstance(sel, SelectionConfig):
            raise DLPError(f"selection: expected a SelectionConfig, got {type(sel).__name__}")
        if not (isinstance(top_p_sampling, (int, float)) and 0 < top_p_sampling <= 1):
            raise DLPError(f"top_p_sampling: must be in (0, 1], got {top_p_sampling!r}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise DLPError(f"batch_size: must be a positive integer, got {batch_size!r}")
        max_new = _row_list(max_new_tokens, n, "max_new_tokens")
        for v in max_new:
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise DLPError(f"max_new_tokens: must be a positive integer, got {v!r}")
        temps = _row_list(temperature, n, "temperature")
        for v in temps:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise DLPError(f"temperature: must be >= 0, got {v!r}")
        stops = _stop_lists(stop, n)
        forced = self._forced(weights, n)
        if self.router is None and any(f is None for f in forced):
            raise DLPError("router: none loaded (pass a router, or force a mixture with weights=)")
        if n == 0:
            return []
        gen = None
        if seed is not None:
            gen = torch.Generator(device=self.device).manual_seed(int(seed))
        step = 1 if merge else batch_size
        results: list[GenerationResult] = []
        opts = dict(sel=sel, chat=chat, top_p_sampling=float(top_p_sampling), on_text=on_text, merge=merge, gen=gen)
        for start in range(0, n, step):
            idx = list(range(start, min(n, start + step)))
            rows = [_Row(i, max_new[i], float(temps[i]), stops[i]) for i in idx]
            results.extend(self._generate_batch([prompts[i] for i in idx], rows, [forced[i] for i in idx], **opts))
        return results

    def _forced(self, weights, n: int) -> list[torch.Tensor | None]:
        if weights is None:
            return [None] * n
        if isinstance(weights, dict):
            weights = [weights] * n
        if isinstance(weights, torch.Tensor):
            if weights.dim() == 1:
                weights = weights.unsqueeze(0).expand(n, -1)
            if weights.dim() != 2 or weights.shape != (n, len(self.names)):
                raise DLPError(f"weights: expected shape ({n}, {len(self.names)}), got {tuple(weights.shape)}")
            weights = list(weights)
        if not isinstance(weights, (list, tuple)) or len(weights) != n:
            raise DLPError(f"weights: expected one entry per prompt ({n})")
        return [None if w is None else self.fused._row(w, f"weights[{i}]") for i, w in enumerate(weights)]

    def _prompt_weights(self, prompts, texts, enc, rows, forced, sel: SelectionConfig):
        """Initial routing: (B, N) weights for decoding, and prefill weights ((B, N) or per-token (B, S, N))."""
        n_ad = len(self.names)
        sents = [split_sentences(p) or [p] if sel.granularity == "sentence" else [p] for p in prompts]
        to_route = [s for b, f in enumerate(forced) if f is None for s in sents[b]]
        probs = weights = None
        if to_route:
            probs, weights = self.route(to_route, sel)
        cur = torch.zeros(len(prompts), n_ad)
        per_sentence: list[list[torch.Tensor]] = []
        k = 0
        for b, f in enumerate(forced):
            if f is not None:
                cur[b] = f
                rows[b].routing.append(self._record(prompts[b], f, None, "forced"))
                per_sentence.append([f])
                continue
            ws = []
            for s in sents[b]:
                rows[b].routing.append(self._record(s, weights[k], probs[k], "prompt"))
                ws.append(weights[k])
                k += 1
            cur[b] = ws[-1]
            per_sentence.append(ws)
        if not any(len(ws) > 1 for ws in per_sentence):
            return cur, cur
        # per-token prefill weights: each token takes the mixture of the sentence it starts in (template tokens
        # before the first sentence take the first one's, after the last sentence the last one's)
        ids = enc["input_ids"]
        S = ids.shape[1]
        pre = cur.unsqueeze(1).repeat(1, S, 1)
        offsets = enc.get("offset_mapping")
        if offsets is None:
            return cur, cur        # slow tokenizer without offsets: whole prompt with the last sentence's mixture
        for b, ws in enumerate(per_sentence):
            if len(ws) == 1:
                continue
            # search from where the user's text sits in the formatted prompt (not inside a system prompt)
            starts, pos = [], max(0, texts[b].rfind(prompts[b]))
            for s in sents[b]:
                j = texts[b].find(s, pos)
                if j < 0:
                    break
                starts.append(j)
                pos = j + len(s)
            if len(starts) != len(ws):
                continue
            # sentence index of each token = number of sentence starts at or before its first character, - 1
            si = (torch.bucketize(offsets[b, :, 0].contiguous(), torch.tensor(starts), right=True) - 1).clamp(min=0)
            pre[b] = torch.stack(ws)[si]   # (left padding takes sentence 0's mixture; those keys are masked)
        return cur, pre

    def _apply(self, w: torch.Tensor, merge: bool) -> None:
        if merge:
            self.fused.clear_weights()
            self.fused.merge(w[0])
        else:
            self.fused.set_weights(w)

    def _choose(self, logits: torch.Tensor, temps: list[float], top_p_sampling: float, gen) -> torch.Tensor:
        """Next token per row: greedy where temperature is 0, else temperature + nucleus sampling."""
        greedy = logits.argmax(-1)
        if all(t == 0 for t in temps):
            return greedy
        t = torch.tensor(temps, device=logits.device, dtype=logits.dtype)
        probs = torch.softmax(logits / t.clamp_min(1e-5).unsqueeze(1), dim=-1)
        if top_p_sampling < 1.0:
            sp, order = probs.sort(-1, descending=True)
            drop = (sp.cumsum(-1) - sp) >= top_p_sampling
            sp = sp.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter_(-1, order, sp)
        sampled = torch.multinomial(probs, 1, generator=gen).squeeze(1)
        return torch.where(t > 0, sampled, greedy)

    def _detok(self, row: _Row) -> str:
        """Incremental detokenisation: the new text of the last token (held back while it is a partial char)."""
        tok = self.tokenizer
        prefix = tok.decode(row.ids[row.prefix_off:row.read_off], skip_special_tokens=True)
        new = tok.decode(row.ids[row.prefix_off:], skip_special_tokens=True)
        if len(new) > len(prefix) and not new.endswith("\ufffd"):
            row.prefix_off, row.read_off = row.read_off, len(row.ids)
            return new[len(prefix):]
        return ""

    @staticmethod
    def _completed_sentence(row: _Row, new_chars: int) -> str:
        """The sentence the newest text completed, if any. BPE tokens carry their leading space (" Second"), so
        a boundary (end punctuation + whitespace, or a newline - the rule of ``split_sentences``) is usually seen
        one token after the punctuation; the new mixture applies from the following token on."""
        start = max(row.sent_start, len(row.text) - new_chars - 4)
        last = None
        for m in _BOUNDARY.finditer(row.text, start):
            last = m
        if last is None:
            return ""
        sentence = row.text[row.sent_start:last.end()]
        row.sent_start = last.end()
        return sentence.strip()

    def _emit(self, row: _Row, on_text, final: bool) -> bool:
        """Stream the text that can no longer become part of a stop string; True when the user cancels."""
        end = len(row.text) if final else len(row.text) - _held_back(row.text, row.stops)
        if end <= row.emitted:
            return False
        delta = row.text[row.emitted:end]
        row.emitted = end
        return bool(on_text(row.index, delta)) if on_text is not None else False

    @torch.inference_mode()
    def _generate_batch(self, prompts, rows: list[_Row], forced, *, sel: SelectionConfig, chat, top_p_sampling,
                        on_text, merge, gen) -> list[GenerationResult]:
        t0 = time.perf_counter()
        tok, model, dev = self.tokenizer, self.model, self.device
        texts = [format_prompt(tok, p) if chat else p for p in prompts]
        want_offsets = sel.granularity == "sentence" and getattr(tok, "is_fast", False)
        enc = tok(texts, return_tensors="pt", padding=True, return_offsets_mapping=want_offsets)
        cur, pre = self._prompt_weights(prompts, texts, enc, rows, forced, sel)
        routed = [f is None for f in forced]
        resentence = sel.granularity == "sentence"
        ids = enc["input_ids"].to(dev)
        mask = enc["attention_mask"].to(dev)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        for b, r in enumerate(rows):
            r.prompt_tokens = int(enc["attention_mask"][b].sum())
        extra = {"logits_to_keep": 1} if self._keep_arg else {}
        alive = list(range(len(rows)))                 # batch position -> index into rows
        try:
            if merge and pre.dim() == 2:
                self._apply(cur, merge)               # batch 1: the mixture folded into W
            else:
                self.fused.set_weights(pre)           # (B, N) or per-token (B, S, N) for the prompt tokens
            out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, **extra)
            past = out.past_key_values
            logits = out.logits[:, -1].float()
            if pre.dim() == 3:
                self._apply(cur, merge)               # decode continues with the last sentence's mixture
            last_pos = pos[:, -1:]
            can_prune = hasattr(past, "batch_select_indices")
            while True:
                nxt = self._choose(logits, [rows[a].temperature for a in alive], top_p_sampling, gen)
                toks = nxt.tolist()                     # the one host sync of a decode step
                reroute: list[tuple[int, str]] = []
                for b, a in enumerate(alive):
                    r = rows[a]
                    if r.finish is not None:
                        continue
                    t = toks[b]
                    r.ids.append(t)
                    if t in self.eos_ids:
                        r.finish = "stop"
                    else:
                        delta = self._detok(r)
                        if delta:
                            r.text += delta
                            for s in r.stops:
                                j = r.text.find(s, max(0, len(r.text) - len(delta) - len(s) + 1))
                                if j >= 0:
                                    r.text, r.finish = r.text[:j], "stop"
                                    break
                            if resentence and routed[a] and r.finish is None:
                                sentence = self._completed_sentence(r, len(delta))
                                if sentence:
                                    reroute.append((b, sentence))
                        if r.finish is None and len(r.ids) >= r.max_new:
                            r.finish = "length"
                    if self._emit(r, on_text, final=r.finish is not None) and r.finish is None:
                        r.finish = "cancelled"
                    if r.finish is not None:
                        r.seconds = time.perf_counter() - t0
                if all(rows[a].finish is not None for a in alive):
                    break
                changed = False
                reroute = [(b, s) for b, s in reroute if rows[alive[b]].finish is None]
                if reroute:
                    probs, w = self.route([s for _, s in reroute], sel)
                    for k, (b, s) in enumerate(reroute):
                        cur[b] = w[k]
                        rows[alive[b]].routing.append(self._record(s, w[k], probs[k], "output"))
                    changed = True
                done = [b for b, a in enumerate(alive) if rows[a].finish is not None]
                if done and can_prune:
                    keep = [b for b in range(len(alive)) if rows[alive[b]].finish is None]
                    keep_t = torch.tensor(keep, device=dev)
                    past.batch_select_indices(keep_t)
                    mask, last_pos, nxt = mask[keep_t], last_pos[keep_t], nxt[keep_t]
                    cur = cur[keep]
                    alive = [alive[b] for b in keep]
                    changed = True
                if changed:
                    self._apply(cur, merge)
                mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1)
                last_pos = last_pos + 1
                out = model(input_ids=nxt.view(-1, 1), attention_mask=mask, position_ids=last_pos,
                            past_key_values=past, use_cache=True)
                past = out.past_key_values
                logits = out.logits[:, -1].float()
        finally:
            self.fused.clear_weights()
            if merge:
                self.fused.unmerge()
        return [GenerationResult(text=r.text, routing=r.routing, prompt_tokens=r.prompt_tokens,
                                 completion_tokens=len(r.ids), finish_reason=r.finish or "length",
                                 seconds=round(r.seconds, 6)) for r in rows]


def parse_weights(spec: str) -> dict[str, float]:
    """``"task=0.7,other=0.3"`` -> ``{"task": 0.7, "other": 0.3}`` (for the CLI)."""
    out: dict[str, float] = {}
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        name, sep, val = part.partition("=")
        if not sep or not name.strip():
            raise DLPError(f"--weights: {part!r}: expected task=weight")
        try:
            v = float(val)
        except ValueError:
            raise DLPError(f"--weights: {part!r}: {val!r} is not a number") from None
        if not math.isfinite(v) or v < 0:
            raise DLPError(f"--weights: {part!r}: weight must be finite and >= 0")
        if name.strip() in out:
            raise DLPError(f"--weights: task {name.strip()!r} is given twice")
        out[name.strip()] = v
    if not out:
        raise DLPError("--weights: empty (expected task=weight,task=weight)")
    return out
