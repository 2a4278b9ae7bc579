"""DLPPipeline: route -> select top-p -> set the fused mixture -> generate (batched, left padded, KV cache).

The pieces, one module each:

* this module: :class:`DLPPipeline` - the base model, the fused adapters and the router of a run; routing
  (``route``), the routing records, and ``generate``;
* :mod:`.granularity`: how a row's mixture follows the text - ``prompt``, ``sentence`` (the paper) and
  ``segment`` (ours, per numbered item);
* :mod:`.decode`: the step-level decoder :class:`DecodeBatch` that ``generate`` runs on and a server's
  iteration-level scheduler can drive directly (rows join at a decode step and leave when done).

Per-token weights with a KV cache follow the fused engine's convention: the weights set before a forward pass
align with its *new* input tokens (``(B, S_prompt, N)`` for a prefill, ``(B, N)`` for decode steps).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import inspect
import math
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..config import DLPError
from ..fusion import FusedAdapters, fuse_adapters
from ..models import eos_token_ids, load_model, tokenizer_identity
from ..router.select import select_top_p
from ..run import Run, open_run
from ..selection import SelectionConfig
from .decode import DecodeBatch, DecodeRequest, DecodeRow, GenerationResult, choose_tokens
from .granularity import RowMixture, Span, prompt_spans

__all__ = ["DLPPipeline", "DecodeBatch", "DecodeRequest", "DecodeRow", "GenerationResult", "choose_tokens",
           "load_router", "parse_weights", "routing_record"]


def load_router(router, device: str = "cpu"):
    """``None`` | a router folder | an object with ``.labels`` and ``.probs(texts) -> (B, N)``."""
    if router is None:
        return None
    if isinstance(router, (str, os.PathLike)):
        p = Path(router)
        if not p.is_dir():
            raise DLPError(f"{p}: router folder not found")
        from ..router.inference import Router

        return Router.load(p, device=device)
    if not (hasattr(router, "labels") and callable(getattr(router, "probs", None))):
        raise DLPError(f"router: expected a router folder or an object with .labels and .probs(texts), "
                       f"got {type(router).__name__}")
    return router


def routing_record(names: Sequence[str], text: str, w: torch.Tensor, p: torch.Tensor | None, source: str) -> dict:
    """The routing record of one routed piece of text: ``{sentence, selected, weights, probs, source}``, selected
    adapters by falling weight; ``source``: "prompt", "output" (a generated sentence), "segment" (a numbered
    item) or "forced" (weights given by the caller; no probs)."""
    sel = sorted((i for i in range(len(names)) if float(w[i]) > 0), key=lambda i: (-float(w[i]), i))
    return {"sentence": text, "selected": [names[i] for i in sel], "weights": [round(float(w[i]), 6) for i in sel],
            "probs": {} if p is None else {n: round(float(p[i]), 6) for i, n in enumerate(names)},
            "source": source}


def _row_list(value, n: int, name: str) -> list:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise DLPError(f"{name}: {len(value)} values for {n} prompts")
        return list(value)
    return [value] * n


def _per_row(value, n: int, name: str) -> list:
    """None (nothing for any row) or a per-row list of (None | list): each row's own list, () for None."""
    if value is None:
        return [()] * n
    if not isinstance(value, (list, tuple)) or len(value) != n:
        raise DLPError(f"{name}: expected one list per prompt ({n})")
    if not all(v is None or isinstance(v, (list, tuple)) for v in value):
        raise DLPError(f"{name}: expected one list (or None) per prompt")
    return [() if v is None else tuple(v) for v in value]


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
            self.keep_last_logits = "logits_to_keep" in inspect.signature(model.forward).parameters
        except (TypeError, ValueError):
            self.keep_last_logits = False
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

    def route(self, texts: Sequence[str], selection: SelectionConfig | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Router probabilities ``(B, N)`` and top-p fusion weights ``(B, N)`` for ``texts``."""
        texts = list(texts)
        return self.route_rows(texts, [selection or SelectionConfig()] * len(texts))

    def route_rows(self, texts: Sequence[str], selections: Sequence[SelectionConfig]
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """Like :meth:`route` with one selection per text: one router call, top-p per distinct selection."""
        if self.router is None:
            raise DLPError("router: none loaded (pass a router, or force a mixture with weights=)")
        texts = list(texts)
        probs = torch.as_tensor(self.router.probs(texts), dtype=torch.float32).detach().cpu()
        if probs.shape != (len(texts), len(self.names)):
            raise DLPError(f"router: probs of shape {tuple(probs.shape)}, expected ({len(texts)}, {len(self.names)})")
        weights = torch.zeros_like(probs)
        groups: dict[SelectionConfig, list[int]] = {}
        for i, sel in enumerate(selections):
            groups.setdefault(sel, []).append(i)
        for sel, idx in groups.items():
            weights[idx] = select_top_p(probs[idx], sel.top_p, sel.weighting, sel.max_adapters or None,
                                        sel.min_confidence or None)
        return probs, weights

    def record(self, text: str, w: torch.Tensor, p: torch.Tensor | None, source: str) -> dict:
        return routing_record(self.names, text, w, p, source)

    def mixtures(self, requests: Sequence[DecodeRequest]) -> list[tuple[RowMixture, list[dict]]]:
        """Each request's starting :class:`RowMixture` and routing records: forced weights as given, else every
        routed span of every request in one router call."""
        plans = [self._plan(r) for r in requests]
        todo = [(r.selection, s.text) for r, (spans, _, forced) in zip(requests, plans) if forced is None
                for s in spans]
        probs, weights = self.route_rows([t for _, t in todo], [s for s, _ in todo]) if todo else (None, None)
        out, k = [], 0
        for r, (spans, source, forced) in zip(requests, plans):
            granularity = "segment" if r.segment_weights is not None else r.selection.granularity
            if forced is not None:
                out.append((RowMixture(granularity, spans, forced, routed=False),
                            [self.record(s.text, w, None, "forced") for s, w in zip(spans, forced)]))
                continue
            ws, ps = list(weights[k:k + len(spans)]), probs[k:k + len(spans)]
            k += len(spans)
            out.append((RowMixture(granularity, spans, ws, routed=True),
                        [self.record(s.text, w, p, source) for s, w, p in zip(spans, ws, ps)]))
        return out

    def _plan(self, r: DecodeRequest) -> tuple[list[Span], str, list[torch.Tensor] | None]:
        """The spans of a request, their records' source, and its forced weights per span (None = route)."""
        if r.weights is not None:
            return [Span(0, r.prompt)], "forced", [self.fused.row_weights(r.weights, "weights")]
        if r.segment_weights is None:
            return (*prompt_spans(r.prompt, r.selection.granularity), None)
        spans, _ = prompt_spans(r.prompt, "segment")
        ws = r.segment_weights
        if not isinstance(ws, (list, tuple)) or len(ws) != len(spans):
            got = len(ws) if isinstance(ws, (list, tuple)) else type(ws).__name__
            raise DLPError(f"segment_weights: {got} mixtures for a prompt of {len(spans)} numbered item(s) "
                           f"(row {r.tag})")
        return spans, "forced", [self.fused.row_weights(w, f"segment_weights[{i}]") for i, w in enumerate(ws)]

    def decoder(self, merge: bool = False) -> DecodeBatch:
        """A new step-level decoder over this pipeline (see :mod:`dlp_lora.pipeline.decode`)."""
        return DecodeBatch(self, merge=merge)

    def generate(self, prompts: Sequence[str] | str, selection: SelectionConfig | None = None, *, weights=None,
                 segment_weights=None, max_new_tokens=64, temperature=0.0, top_p_sampling: float = 1.0,
                 seed: int | None = None, stop=None, chat: bool = True,
                 on_text: Callable[[int, str], Any] | None = None, batch_size: int = 16,
                 merge: bool = False, ignore_eos=False, answer_labels=None,
                 answer_tokens=None) -> list[GenerationResult]:
        """Generate for every prompt, in prompt order. ``selection``: top-p, weighting, caps and granularity
        (default :class:`SelectionConfig`). ``weights`` forces a mixture: a ``(B, N)`` tensor or a per-row list of
        ``None`` (route) | ``{task: weight}`` | ``(N,)`` tensor; all-zero = base model. ``segment_weights`` forces
        one mixture per numbered item of each prompt (segment granularity): a per-row list of ``None`` | list of
        mixtures. ``max_new_tokens``, ``temperature`` and ``stop`` may be per row; row i samples with seed
        ``seed + i``. ``on_text(row, delta)`` streams text; returning True cancels that row. ``ignore_eos`` (may
        be per row) goes on past EOS up to ``max_new_tokens``, as serving benchmarks do. ``answer_labels``: a
        per-row list of label lists (None: no scaffold) forced into the output one answer at a time, with
        ``answer_tokens`` (per row: a cap per answer) - see :mod:`dlp_lora.pipeline.scaffold`. Up to
        ``batch_size`` rows decode together; a waiting prompt joins as soon as a row finishes. ``merge=True``
        generates one prompt at a time with the mixture folded into the weights (≈0 per-token overhead)."""
        requests = self._requests(prompts, selection, weights, segment_weights, max_new_tokens, temperature,
                                  top_p_sampling, seed, stop, chat, on_text, ignore_eos, answer_labels,
                                  answer_tokens)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise DLPError(f"batch_size: must be a positive integer, got {batch_size!r}")
        results: list[GenerationResult | None] = [None] * len(requests)
        limit = 1 if merge else batch_size
        waiting = collections.deque(requests)
        with self.decoder(merge=merge) as batch:
            while waiting or batch:
                if waiting and len(batch) < limit and batch.can_join:
                    batch.add([waiting.popleft() for _ in range(min(limit - len(batch), len(waiting)))])
                for row in batch.step():
                    results[row.tag] = row.result()
        return results

    def _requests(self, prompts, selection, weights, segment_weights, max_new_tokens, temperature,
                  top_p_sampling, seed, stop, chat, on_text, ignore_eos=False, answer_labels=None,
                  answer_tokens=None) -> list[DecodeRequest]:
        """One checked :class:`DecodeRequest` per prompt; every error is raised before any decoding."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not all(isinstance(p, str) for p in prompts):
            raise DLPError("prompts: expected a list of strings")
        n, sel = len(prompts), selection or SelectionConfig()
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise DLPError(f"seed: expected an integer, got {seed!r}")
        max_new, temps = _row_list(max_new_tokens, n, "max_new_tokens"), _row_list(temperature, n, "temperature")
        forced, stops = self._forced(weights, n), _stop_lists(stop, n)
        segs = [None] * n if segment_weights is None else _row_list(segment_weights, n, "segment_weights")
        no_eos = _row_list(ignore_eos, n, "ignore_eos")
        labels = _per_row(answer_labels, n, "answer_labels")
        caps = _per_row(answer_tokens, n, "answer_tokens")
        reqs = [DecodeRequest(prompt=p, selection=sel, weights=forced[i], segment_weights=segs[i],
                              max_new_tokens=max_new[i], temperature=temps[i], top_p_sampling=top_p_sampling,
                              seed=None if seed is None else seed + i, stop=stops[i], ignore_eos=no_eos[i], chat=chat,
                              answer_labels=labels[i], answer_tokens=caps[i],
                              on_text=None if on_text is None else functools.partial(on_text, i), tag=i)
                for i, p in enumerate(prompts)]
        for r in reqs:
            r.check()
            if r.weights is None and r.segment_weights is not None:
                self._plan(r)                            # segment_weights fit the prompt's items
        if self.router is None and any(r.weights is None and r.segment_weights is None for r in reqs):
            raise DLPError("router: none loaded (pass a router, or force a mixture with weights=)")
        return reqs

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
        return [None if w is None else self.fused.row_weights(w, f"weights[{i}]") for i, w in enumerate(weights)]


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
