"""The step-level decoder: a running batch of rows over one fused model, where rows join at a decode step and
leave when done, each with its own mixture, re-routing, sampling settings, stop strings and token budget.

``DLPPipeline.generate`` runs on it, and so can a server's iteration-level scheduler (the way vLLM, SGLang and
TGI schedule): ::

    batch = DecodeBatch(pipe)
    rows = batch.add([DecodeRequest("Hi"), DecodeRequest("What is 2+3?", max_new_tokens=8)])   # prefill
    while batch:
        for row in batch.step():          # one token for every row; the rows that finished, already gone
            print(row.tag, row.result().text)
        batch.add(new_requests)           # join the running batch at any step

How a join works: the new rows are prefilled together (left padded, their own mixtures, per token where their
granularity asks for it) into a cache of their own; then the running cache and the new one are re-aligned on the
left - the shorter one gets zero keys/values and a masked attention column for each missing position - and
concatenated along the batch. Each row keeps its own ``position_ids``, so padding never moves a row's positions,
and masked columns add exactly nothing to attention: a greedy row decodes the same tokens alone, in a full
batch, or joining one mid-way. Finished rows leave at once (the cache keeps only live rows) and columns no live
row attends to are cut from the left. ``add(..., prefill_chunk=k)`` prefills a joining prompt ``k`` columns per
step, each step running one chunk before its decode pass, so a long prompt does not stall the decoding rows.

One decoder per fused model at a time: the mixture lives in the model's shared fused state.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import time
from typing import Any, Callable, Sequence

import torch

from ..config import DLPError
from ..data import format_prompt
from ..models import context_length
from ..selection import SelectionConfig
from .granularity import prefill_weights
from .scaffold import AnswerScaffold


@dataclasses.dataclass
class GenerationResult:
    """One generated answer and how it was routed."""

    text: str                               # the generated text (stop string and EOS removed)
    routing: list[dict]                     # per routed span: {sentence, selected, weights, probs, source}
    prompt_tokens: int                      # tokens of the (formatted) prompt
    completion_tokens: int                  # tokens generated (EOS included when it was generated)
    finish_reason: str                      # "stop" (EOS or stop string), "length" or "cancelled"
    seconds: float                          # wall time from when the row joined its batch until it finished

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class DecodeRequest:
    """One prompt to decode, and how."""

    prompt: str                             # the user's text (formatted with the chat template when chat)
    selection: SelectionConfig = SelectionConfig()   # top-p, weighting, caps and granularity of its routing
    weights: Any = None                     # a forced mixture ((N,) tensor or {task: weight}); None = route
    segment_weights: Any = None             # forced mixture per numbered item (segment granularity); None = route
    max_new_tokens: int = 64                # most tokens to generate
    temperature: float = 0.0                # 0 = greedy
    top_p_sampling: float = 1.0             # nucleus sampling mass (with temperature > 0)
    seed: int | None = None                 # seeds this row's own sampler (independent of the other rows)
    stop: Sequence[str] = ()                # stop strings (never part of the text or the stream)
    ignore_eos: bool = False                # go on past EOS up to max_new_tokens (benchmarks; vLLM's ignore_eos)
    answer_labels: Sequence[str] = ()       # answer scaffold: labels forced into the output (scaffold.py); () = none
    answer_tokens: Sequence[int] = ()       # with answer_labels: most generated tokens per answer (() = no cap)
    chat: bool = True                       # apply the tokenizer's chat template
    on_text: Callable[[str], Any] | None = None   # called with each streamed piece; returning True cancels
    tag: Any = None                         # the caller's id for the row (generate: the prompt's index)

    def check(self) -> None:
        """One-line :class:`DLPError` naming the first bad field."""
        if not isinstance(self.prompt, str):
            raise DLPError(f"prompt: expected a string, got {type(self.prompt).__name__}")
        if not isinstance(self.selection, SelectionConfig):
            raise DLPError(f"selection: expected a SelectionConfig, got {type(self.selection).__name__}")
        v = self.max_new_tokens
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise DLPError(f"max_new_tokens: must be a positive integer, got {v!r}")
        v = self.temperature
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise DLPError(f"temperature: must be >= 0, got {v!r}")
        v = self.top_p_sampling
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 1:
            raise DLPError(f"top_p_sampling: must be in (0, 1], got {v!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise DLPError(f"seed: expected an integer, got {self.seed!r}")
        if isinstance(self.stop, str) or not all(isinstance(s, str) for s in self.stop):
            raise DLPError("stop: expected a list of strings")
        if not isinstance(self.ignore_eos, bool):
            raise DLPError(f"ignore_eos: expected true or false, got {self.ignore_eos!r}")
        labels, caps = self.answer_labels, self.answer_tokens
        if not isinstance(labels, (list, tuple)) or not all(isinstance(x, str) and x for x in labels):
            raise DLPError("answer_labels: expected a list of non-empty strings")
        if not isinstance(caps, (list, tuple)) or caps and (
                len(caps) != len(labels) or not all(type(c) is int and c > 0 for c in caps)):
            raise DLPError(f"answer_tokens: expected one positive integer per answer label ({len(labels)})")


class DecodeRow:
    """The decode state of one request in a :class:`DecodeBatch`. ``cancel()`` may be called from any thread:
    the row leaves at the next step with finish reason "cancelled"."""

    def __init__(self, request: DecodeRequest, mixture, routing: list[dict], prompt_tokens: int,
                 device: torch.device) -> None:
        self.request = request
        self.tag = request.tag
        self.mixture = mixture                  # granularity.RowMixture: its mixture and how it follows the text
        self.routing = routing                  # routing records, prompt spans first
        self.prompt_tokens = prompt_tokens
        self.ids: list[int] = []                # generated token ids
        self.text = ""                          # generated text (stop string removed)
        self.finish: str | None = None
        self.seconds = 0.0
        self.gen = None if request.seed is None else torch.Generator(device=device).manual_seed(request.seed)
        self.scaffold: AnswerScaffold | None = None   # set by the batch when the request has answer labels
        self._t0 = time.perf_counter()
        self._emitted = 0
        self._prefix_off = self._read_off = 0
        self._cancel = False

    def cancel(self) -> None:
        self._cancel = True

    def result(self) -> GenerationResult:
        return GenerationResult(text=self.text, routing=self.routing, prompt_tokens=self.prompt_tokens,
                                completion_tokens=len(self.ids), finish_reason=self.finish or "length",
                                seconds=round(self.seconds, 6))

    def _end(self, reason: str) -> None:
        self.finish = reason
        self.seconds = time.perf_counter() - self._t0


def choose_tokens(logits: torch.Tensor, rows: Sequence[DecodeRow]) -> torch.Tensor:
    """Next token per row: greedy where temperature is 0, else temperature + nucleus sampling with the row's own
    settings and generator (so a seeded row samples the same whatever else is in the batch)."""
    greedy = logits.argmax(-1)
    hot = [b for b, r in enumerate(rows) if r.request.temperature > 0]
    if not hot:
        return greedy
    out = greedy.clone()
    for b in hot:
        req = rows[b].request
        probs = torch.softmax(logits[b] / max(float(req.temperature), 1e-5), dim=-1)
        if req.top_p_sampling < 1.0:
            sp, order = probs.sort(descending=True)
            sp = sp.masked_fill((sp.cumsum(-1) - sp) >= req.top_p_sampling, 0.0)
            probs = torch.zeros_like(probs).scatter_(-1, order, sp)
        out[b] = torch.multinomial(probs, 1, generator=rows[b].gen)[0]
    return out


def _held_back(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of ``text`` that could still become a stop string (not streamed yet)."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if s.startswith(text[-k:]):
                best = k
                break
    return best


def _left_pad(t: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    """``t`` with zeros prepended along ``dim`` up to ``width``."""
    missing = width - t.shape[dim]
    if missing <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)


def _layers(cache) -> list | None:
    """The cache's per-layer key/value holders when rows can join and be trimmed (plain full-attention
    ``DynamicCache`` layers holding (batch, heads, seq, head_dim) tensors), else None."""
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None)
    if not layers or not all(type(layer) is DynamicLayer for layer in layers):
        return None
    return list(layers)


@dataclasses.dataclass
class _Prefill:
    """New rows whose prompts are being prefilled (all at once, or a chunk per step) into their own cache."""

    rows: list[DecodeRow]                   # the new rows
    ids: torch.Tensor                       # (B, S) left-padded prompt ids
    mask: torch.Tensor                      # (B, S) their attention mask
    pos: torch.Tensor                       # (B, S) their position ids
    pre: torch.Tensor                       # prefill weights: (B, N), or (B, S, N) per token
    chunk: int = 0                          # columns per forward
    done: int = 0                           # columns prefilled so far
    past: Any = None                        # their KV cache until they join


class DecodeBatch:
    """A running batch of :class:`DecodeRow`: ``add`` prefills new rows and joins them, ``step`` decodes one token
    for every row and lets finished rows leave. ``merge=True``: one row at a time with its mixture folded into the
    weights (≈0 per-token overhead). Use as a context manager (or call ``close``) to leave the model clean."""

    def __init__(self, pipe, merge: bool = False) -> None:
        self.pipe = pipe
        self.merge = merge
        self.rows: list[DecodeRow] = []         # live rows, in batch order
        self._past = None                       # the model's KV cache of the live rows
        self._mask: torch.Tensor | None = None  # (B, S) attention mask, left padded
        self._pos: torch.Tensor | None = None   # (B, 1) position id of each row's last token
        self._logits: torch.Tensor | None = None  # (B, V) next-token logits of each row
        self._cur: torch.Tensor | None = None   # (B, N) each row's mixture for its next token
        self._dirty = True                      # _cur must be applied before the next forward
        self._merged: torch.Tensor | None = None  # merge mode: the mixture folded into W
        self._pending: collections.deque[_Prefill] = collections.deque()   # chunked prefills, oldest first

    def __len__(self) -> int:
        """Live rows plus rows whose chunked prefill is under way."""
        return len(self.rows) + sum(len(p.rows) for p in self._pending)

    def __bool__(self) -> bool:
        return bool(self.rows or self._pending)

    def __enter__(self) -> "DecodeBatch":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def width(self) -> int:
        """Columns of the running KV cache: the longest live prompt plus the steps since, after left cuts."""
        return 0 if self._mask is None else int(self._mask.shape[1])

    @property
    def can_join(self) -> bool:
        """Whether ``add`` may be called now: always on an empty batch, never in merge mode while a row runs,
        else when the model's cache can be re-aligned (plain ``DynamicCache`` layers)."""
        if self.merge:
            return not self.rows
        return not self.rows or _layers(self._past) is not None

    def close(self) -> None:
        """Back to the base model: weights cleared, merged weights restored. Live rows stay as they are."""
        self.pipe.fused.clear_weights()
        if self.merge:
            self.pipe.fused.unmerge()
            self._merged = None
        self._dirty = True

    @torch.inference_mode()
    def add(self, requests: Sequence[DecodeRequest], prefill_chunk: int = 0) -> list[DecodeRow]:
        """Route and prefill ``requests`` and join them to the batch; their first token comes at the next
        ``step``. Returns their rows (``row.tag`` is ``request.tag``). ``prefill_chunk`` > 0, while other rows
        are decoding: the prompts are prefilled that many columns per ``step`` (each step then runs one chunk
        before its decode pass), so a long prompt does not stall the running rows; they join when it is done."""
        requests = list(requests)
        if not requests:
            return []
        if not self.can_join or (self.merge and len(requests) > 1):
            raise DLPError("decode batch: rows cannot join now (merge mode decodes one row at a time, and this "
                           "model's cache cannot be re-aligned)")
        if isinstance(prefill_chunk, bool) or not isinstance(prefill_chunk, int) or prefill_chunk < 0:
            raise DLPError(f"prefill_chunk: must be an integer >= 0, got {prefill_chunk!r}")
        for r in requests:
            r.check()
        p = self._prepare(requests)
        width = p.ids.shape[1]
        p.chunk = prefill_chunk if prefill_chunk and self.rows and not self.merge else width
        if p.chunk < width:
            self._pending.append(p)
        else:
            self._join(p.rows, self._prefill(p, width), p.mask, p.pos[:, -1:], p.past)
        return p.rows

    def _prepare(self, requests: list[DecodeRequest]) -> "_Prefill":
        """Route the new rows (a bad request fails before any model work), tokenize, and lay out their prefill
        weights."""
        planned = self.pipe.mixtures(requests)
        tok, dev = self.pipe.tokenizer, self.pipe.device
        texts = [format_prompt(tok, r.prompt) if r.chat else r.prompt for r in requests]
        per_token = any(len(m.weights) > 1 for m, _ in planned)
        enc = tok(texts, return_tensors="pt", padding=True,
                  return_offsets_mapping=per_token and getattr(tok, "is_fast", False))
        rows = [DecodeRow(r, m, routing, int(enc["attention_mask"][b].sum()), dev)
                for b, (r, (m, routing)) in enumerate(zip(requests, planned))]
        for row in rows:
            if row.request.answer_labels:
                row.scaffold = AnswerScaffold(row.request.answer_labels, row.request.answer_tokens,
                                              lambda s: tok.encode(s, add_special_tokens=False))
        self._check_context(rows)
        pre = prefill_weights([row.mixture for row in rows], [r.prompt for r in requests], texts, enc)
        mask = enc["attention_mask"].to(dev)
        return _Prefill(rows, enc["input_ids"].to(dev), mask, (mask.cumsum(-1) - 1).clamp(min=0), pre)

    def _check_context(self, rows: list[DecodeRow]) -> None:
        """Refuse a prompt whose tokens plus its token budget do not fit the model's positions: past them a model
        silently produces garbage (or fails inside attention), so the caller hears it in one line instead."""
        ctx = context_length(self.pipe.model)
        for b, row in enumerate(rows):
            if ctx is not None and row.prompt_tokens + row.request.max_new_tokens > ctx:
                raise DLPError(f"prompt {b}: {row.prompt_tokens} tokens + max_new_tokens "
                               f"{row.request.max_new_tokens} exceed the model's context of {ctx} tokens")

    def _prefill(self, p: "_Prefill", upto: int) -> torch.Tensor:
        """Forward the new rows' prompt columns ``p.done:upto`` into their own cache with their prefill weights;
        the last column's logits."""
        pipe, cols = self.pipe, slice(p.done, upto)
        w = p.pre[:, cols] if p.pre.dim() == 3 else p.pre
        if self.merge and w.dim() == 2:
            self._apply_merged(w[0])
        else:
            if self.merge:
                pipe.fused.unmerge()
                self._merged = None
            pipe.fused.set_weights(w)
        extra = {"logits_to_keep": 1} if pipe.keep_last_logits else {}
        out = pipe.model(input_ids=p.ids[:, cols], attention_mask=p.mask[:, :upto], position_ids=p.pos[:, cols],
                         past_key_values=p.past, use_cache=True, **extra)
        p.past, p.done = out.past_key_values, upto
        self._dirty = True
        return out.logits[:, -1].float()

    def _advance_prefill(self) -> None:
        """One chunk of the oldest pending prefill; its rows join when their prompts are done."""
        p = self._pending[0]
        upto = min(p.done + p.chunk, p.ids.shape[1])
        logits = self._prefill(p, upto)
        if upto == p.ids.shape[1]:
            self._pending.popleft()
            self._join(p.rows, logits, p.mask, p.pos[:, -1:], p.past)

    def _join(self, rows: list[DecodeRow], logits, mask, pos, past) -> None:
        """Append prefilled rows: their cache and mask re-aligned with the running ones on the left."""
        cur = torch.stack([row.mixture.current for row in rows])
        if not self.rows:
            self.rows, self._past, self._logits, self._mask, self._pos, self._cur = rows, past, logits, mask, pos, cur
            return
        width = max(self._mask.shape[1], mask.shape[1])
        for old, new in zip(_layers(self._past), _layers(past) or ()):
            old.keys = torch.cat([_left_pad(old.keys, width, 2), _left_pad(new.keys, width, 2)])
            old.values = torch.cat([_left_pad(old.values, width, 2), _left_pad(new.values, width, 2)])
        self._mask = torch.cat([_left_pad(self._mask, width, 1), _left_pad(mask, width, 1)])
        self._pos = torch.cat([self._pos, pos])
        self._logits = torch.cat([self._logits, logits])
        self._cur = torch.cat([self._cur, cur])
        self.rows = self.rows + rows

    @torch.inference_mode()
    def step(self) -> list[DecodeRow]:
        """Choose one token for every row, update texts, stop conditions, streams and mixtures, let finished rows
        leave, then run the model on the chosen tokens. Returns the rows that finished in this step."""
        if self._pending:
            self._advance_prefill()
        if not self.rows:
            return []
        scaffolds = any(row.scaffold is not None for row in self.rows)
        chosen = choose_tokens(self._no_empty_answers() if scaffolds else self._logits, self.rows)
        toks = chosen.tolist()                  # the one host sync of a step
        if scaffolds:
            chosen = self._scaffolded(chosen, toks)
        to_route = []
        for b, (row, t) in enumerate(zip(self.rows, toks)):
            sentence = self._advance(b, row, t)
            if sentence and row.finish is None:
                to_route.append((b, sentence))
        self._reroute(to_route)
        done = [row for row in self.rows if row.finish is not None]
        if done:
            chosen = self._leave(chosen)
        if self.rows:
            self._forward(chosen)
        return done

    def _no_empty_answers(self) -> torch.Tensor:
        """The next-token logits with EOS banned for rows whose current scaffold answer has no text yet."""
        ban = [b for b, row in enumerate(self.rows) if row.scaffold is not None and row.scaffold.bans_eos(row.text)]
        if not ban:
            return self._logits
        logits = self._logits.clone()
        eos = torch.tensor(sorted(self.pipe.eos_ids), device=logits.device)
        logits[torch.tensor(ban, device=logits.device).unsqueeze(1), eos] = float("-inf")
        return logits

    def _scaffolded(self, chosen: torch.Tensor, toks: list[int]) -> torch.Tensor:
        """Forced answer labels replace the model's choice (and EOS while a scaffold has labels left), in ``toks``
        and in the tensor fed to the model."""
        for b, row in enumerate(self.rows):
            if row.scaffold is not None:
                toks[b] = row.scaffold.choose(toks[b], self.pipe.eos_ids)
        return torch.tensor(toks, dtype=chosen.dtype, device=chosen.device)

    def _advance(self, b: int, row: DecodeRow, token: int) -> str:
        """Take one token into ``row``; returns a completed output sentence to route ("" when none)."""
        if row._cancel:
            row._end("cancelled")
            return ""
        row.ids.append(token)
        sentence = ""
        if token in self.pipe.eos_ids and not row.request.ignore_eos:
            row._end("stop")
        else:
            delta = self._detok(row)
            forced = row.scaffold is not None and row.scaffold.forcing
            if delta:
                row.text += delta
                if not forced:              # a forced label ("\n2.") is not the model's stop string
                    self._check_stops(row, delta)
                if row.finish is None:
                    switched, sentence = row.mixture.follow(row.text)
                    if switched:
                        self._cur[b] = row.mixture.current
                        self._dirty = True
            if row.finish is None and row.scaffold is not None:
                reason = row.scaffold.took(row.text)
                if reason:
                    row._end(reason)
            if row.finish is None and len(row.ids) >= row.request.max_new_tokens:
                row._end("length")
        if self._emit(row, final=row.finish is not None) and row.finish is None:
            row._end("cancelled")
        return sentence

    @staticmethod
    def _check_stops(row: DecodeRow, delta: str) -> None:
        for s in row.request.stop:
            if not s:
                continue
            j = row.text.find(s, max(0, len(row.text) - len(delta) - len(s) + 1))
            if j >= 0:
                row.text = row.text[:j]
                row._end("stop")
                return

    def _detok(self, row: DecodeRow) -> str:
        """Incremental detokenisation: the new text of the last token (held back while it is a partial char)."""
        tok = self.pipe.tokenizer
        prefix = tok.decode(row.ids[row._prefix_off:row._read_off], skip_special_tokens=True)
        new = tok.decode(row.ids[row._prefix_off:], skip_special_tokens=True)
        if len(new) > len(prefix) and not new.endswith("\ufffd"):
            row._prefix_off, row._read_off = row._read_off, len(row.ids)
            return new[len(prefix):]
        return ""

    @staticmethod
    def _emit(row: DecodeRow, final: bool) -> bool:
        """Stream the text that can no longer become part of a stop string; True when the caller cancels."""
        end = len(row.text) if final else len(row.text) - _held_back(row.text, row.request.stop)
        if end <= row._emitted:
            return False
        delta = row.text[row._emitted:end]
        row._emitted = end
        return bool(row.request.on_text(delta)) if row.request.on_text is not None else False

    def _reroute(self, to_route: list[tuple[int, str]]) -> None:
        """Route every sentence completed in this step in one router call; each row's next tokens use its new
        mixture."""
        if not to_route:
            return
        probs, w = self.pipe.route_rows([s for _, s in to_route],
                                        [self.rows[b].request.selection for b, _ in to_route])
        for k, (b, sentence) in enumerate(to_route):
            row = self.rows[b]
            row.mixture.set(w[k])
            self._cur[b] = w[k]
            row.routing.append(self.pipe.record(sentence, w[k], probs[k], "output"))
        self._dirty = True

    def _leave(self, chosen: torch.Tensor) -> torch.Tensor:
        """Drop finished rows from the batch and the cache; cut columns no live row attends to."""
        keep = [b for b, row in enumerate(self.rows) if row.finish is None]
        self.rows = [self.rows[b] for b in keep]
        self._dirty = True
        if not keep:
            self._past = self._mask = self._pos = self._logits = self._cur = None
            return chosen[:0]
        keep_t = torch.tensor(keep, device=self._mask.device)
        self._past.batch_select_indices(keep_t)
        self._mask, self._pos, self._cur = self._mask[keep_t], self._pos[keep_t], self._cur[keep]
        layers = _layers(self._past)
        lead = int(self._mask.any(0).to(torch.int8).argmax()) if layers is not None else 0
        if lead > 0:
            for layer in layers:
                layer.keys, layer.values = layer.keys[:, :, lead:], layer.values[:, :, lead:]
            self._mask = self._mask[:, lead:]
        return chosen[keep_t]

    def _forward(self, chosen: torch.Tensor) -> None:
        if self._dirty:
            self._apply()
        self._mask = torch.cat([self._mask, self._mask.new_ones(self._mask.shape[0], 1)], 1)
        self._pos = self._pos + 1
        out = self.pipe.model(input_ids=chosen.view(-1, 1), attention_mask=self._mask, position_ids=self._pos,
                              past_key_values=self._past, use_cache=True)
        self._past = out.past_key_values
        self._logits = out.logits[:, -1].float()

    def _apply(self) -> None:
        """Make the rows' mixtures the model's: per-row weights, or in merge mode folded into W."""
        if self.merge:
            self._apply_merged(self._cur[0])
        else:
            self.pipe.fused.set_weights(self._cur)
        self._dirty = False

    def _apply_merged(self, w: torch.Tensor) -> None:
        fused = self.pipe.fused
        if fused.state.weights is not None:
            fused.clear_weights()
        if self._merged is None or not torch.equal(self._merged, w):
            fused.merge(w)
            self._merged = w.clone()
