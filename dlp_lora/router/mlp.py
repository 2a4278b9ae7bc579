"""The paper's mini-MLP router (§3.1) and the token features every router uses.

Token ids come from the *base LLM's tokenizer* (DESIGN §5): the vocabulary size is read from the tokenizer
(``len(tokenizer)``), never typed by hand. ``EmbeddingBag(mode="mean")`` averages the token embeddings of a
sentence (flat ids + offsets, so no padding is computed), then a 4-layer MLP gives one logit per task.
With the default ``RouterConfig`` (embed 96, hidden 256) and SmolLM2's 49,152-token vocabulary this is
about 4.9M parameters, matching the paper's "about 5M".
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU}
POOLINGS = ("mean", "mean+max")


class MiniMLPRouter(nn.Module):
    """EmbeddingBag (mean) -> Linear/act/dropout x3 -> Linear: ``forward(ids, offsets) -> logits (B, N)``.

    ``pooling="mean+max"`` (ours, not the paper's): the MLP reads the mean *and* the element-wise max of the
    token embeddings, so one rare, decisive token ("sarcastic") is not averaged away by a long text."""

    def __init__(self, vocab_size: int, num_labels: int, embed_dim: int = 96, hidden_dim: int = 256,
                 dropout: float = 0.1, activation: str = "gelu", embed_init_std: float = 0.02,
                 pooling: str = "mean") -> None:
        super().__init__()
        act = ACTIVATIONS[activation]
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        self.pooling = pooling
        self.vocab_size, self.num_labels = int(vocab_size), int(num_labels)
        self.embed = nn.EmbeddingBag(self.vocab_size, embed_dim, mode="mean")
        # Small init (not PyTorch's N(0, 1)): most of a 50k vocabulary never occurs in router data, and a token
        # unseen in training must not add a large random vector to a test sentence's mean.
        nn.init.normal_(self.embed.weight, 0.0, embed_init_std)
        self.mlp = nn.Sequential(
            nn.Linear(embed_dim * (2 if pooling == "mean+max" else 1), hidden_dim), act(), nn.Dropout(dropout),
            nn.Linear(hidden_dim, hidden_dim), act(), nn.Dropout(dropout),
            nn.Linear(hidden_dim, hidden_dim), act(), nn.Dropout(dropout),
            nn.Linear(hidden_dim, self.num_labels),
        )

    def _pooled(self, ids: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        mean = F.embedding_bag(ids, self.embed.weight, offsets, mode="mean", sparse=self.embed.sparse)
        if self.pooling == "mean":
            return mean
        # max over each text's tokens (sparse-gradient friendly: embedding + segment max); empty text -> 0
        tok = F.embedding(ids, self.embed.weight, sparse=self.embed.sparse)
        lens = torch.diff(offsets, append=torch.tensor([ids.numel()], device=offsets.device))
        if ids.numel():
            mx = torch.segment_reduce(tok, "max", lengths=lens, unsafe=True)
            mx = torch.where((lens > 0).unsqueeze(-1), mx, torch.zeros_like(mx))
        else:
            mx = torch.zeros_like(mean)
        return torch.cat([mean, mx], -1)

    def forward(self, ids: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        return self.mlp(self._pooled(ids, offsets))

    def infer(self, ids: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """Eval-mode logits, the same numbers as ``forward`` in eval mode, computed functionally from the
        parameters: no module dispatch and no (identity) dropout calls, which dominate a batch-1 call
        (Router.probs' latency path). Not for training (dropout is skipped)."""
        # the parameter tensors themselves (no copies), looked up once: Module.__getattr__ costs per access
        lean = self.__dict__.get("_lean")
        if lean is None or lean[0] is not self.embed.weight:
            lins = [m for m in self.mlp if isinstance(m, nn.Linear)]
            act = F.gelu if isinstance(self.mlp[1], nn.GELU) else F.relu
            lean = (self.embed.weight, [(m.weight, m.bias) for m in lins], act)
            self.__dict__["_lean"] = lean
        emb, layers, act = lean
        if self.pooling == "mean" and ids.dim() == 1:
            # what F.embedding_bag(mode="mean") ends in, minus its Python argument checks (mode 1 = mean)
            x = torch.embedding_bag(emb, ids, offsets, False, 1, False, None, False, None)[0]
        else:
            x = self._pooled(ids, offsets)
        for w, b in layers[:-1]:
            x = act(F.linear(x, w, b))
        return F.linear(x, *layers[-1])


def drop_tokens(ids: torch.Tensor, offsets: torch.Tensor, p: float, generator: torch.Generator | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Training augmentation: drop each token with probability ``p`` (the first token of every text is always
    kept, so no text becomes empty). Returns new ``(ids, offsets)``."""
    if p <= 0 or ids.numel() == 0:
        return ids, offsets
    n = len(offsets)
    lens = torch.diff(offsets, append=torch.tensor([ids.numel()]))
    keep = torch.rand(ids.numel(), generator=generator) >= p
    keep[offsets[lens > 0]] = True
    bag = torch.repeat_interleave(torch.arange(n), lens, output_size=ids.numel())
    counts = torch.bincount(bag[keep], minlength=n)
    new_off = torch.zeros_like(offsets)
    if n > 1:
        new_off[1:] = counts[:-1].cumsum(0)
    return ids[keep], new_off


def count_params(model: nn.Module) -> int:
    """Number of parameters (shared tensors counted once)."""
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


# ----------------------------------------------------------------------------------------------------------------
# Token features: encode once, batch by gathering (no re-tokenisation per epoch)
# ----------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Encoded:
    """Token ids of many texts stored flat: text i is ``ids[starts[i] : starts[i] + lens[i]]``."""

    ids: torch.Tensor                       # (total,) int64
    starts: torch.Tensor                    # (n,) int64
    lens: torch.Tensor                      # (n,) int64

    def __len__(self) -> int:
        return int(self.lens.shape[0])

    def flat(self, idx: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ids, offsets)`` for EmbeddingBag, for the rows ``idx`` (all rows when None)."""
        if idx is None:
            lens = self.lens
            offsets = torch.zeros_like(lens)
            if len(lens) > 1:
                offsets[1:] = lens[:-1].cumsum(0)
            return self.ids[: int(lens.sum())] if len(lens) else self.ids[:0], offsets
        lens = self.lens[idx]
        starts = self.starts[idx]
        offsets = torch.zeros_like(lens)
        if len(lens) > 1:
            offsets[1:] = lens[:-1].cumsum(0)
        total = int(lens.sum())
        pos = torch.repeat_interleave(starts - offsets, lens, output_size=total) + torch.arange(total)
        return self.ids[pos], offsets

    def cropped(self, idx: torch.Tensor, prob: float, min_tokens: int = 8,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Like :meth:`flat`, but each text is replaced with probability ``prob`` by a random contiguous window
        of at least ``min_tokens`` tokens (training augmentation: the router also sees sentence-sized spans,
        as it will when routing per sentence)."""
        lens = self.lens[idx]
        starts = self.starts[idx]
        u = torch.rand(3, len(idx), generator=generator)
        low = lens.clamp_max(min_tokens)
        new_len = low + (u[0] * (lens - low + 1).float()).long().clamp_max(lens - low)
        new_len = torch.where(u[2] < prob, new_len, lens)
        shift = (u[1] * (lens - new_len + 1).float()).long().clamp_max(lens - new_len)
        starts, lens = starts + shift, new_len
        offsets = torch.zeros_like(lens)
        if len(lens) > 1:
            offsets[1:] = lens[:-1].cumsum(0)
        total = int(lens.sum())
        pos = torch.repeat_interleave(starts - offsets, lens, output_size=total) + torch.arange(total)
        return self.ids[pos], offsets

    def padded(self, idx: torch.Tensor, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(input_ids, attention_mask)`` right-padded to the longest row of ``idx`` (for HF routers)."""
        lens = self.lens[idx]
        width = max(int(lens.max()) if len(lens) else 1, 1)
        col = torch.arange(width)
        mask = col[None, :] < lens[:, None]
        src = (self.starts[idx][:, None] + col[None, :]).clamp_max(max(len(self.ids) - 1, 0))
        ids = torch.where(mask, self.ids[src] if len(self.ids) else torch.zeros_like(src), torch.full_like(src, pad_id))
        return ids, mask.long()


class TokenEncoder:
    """Fast batch tokenisation with the tokenizer's Rust backend: no special tokens, truncation to
    ``max_tokens`` (keeps the first tokens). About 20 us per short sentence; tens of thousands per second batched.
    ``prefix``/``suffix`` ids wrap every text (the HF routers use [CLS] ... [SEP]-style markers)."""

    def __init__(self, tokenizer, max_tokens: int, prefix: list[int] | None = None,
                 suffix: list[int] | None = None) -> None:
        self.tokenizer = tokenizer
        self.max_tokens = int(max_tokens)
        self.prefix, self.suffix = list(prefix or []), list(suffix or [])
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self._backend = None
        if backend is not None:
            from tokenizers import Tokenizer

            # A private copy: never change the caller's truncation/padding state.
            self._backend = Tokenizer.from_str(backend.to_str())
            self._backend.no_truncation()
            self._backend.no_padding()

    def ids(self, texts: list[str]) -> list[list[int]]:
        """Token ids per text (truncated)."""
        budget = self.max_tokens - len(self.prefix) - len(self.suffix)
        if self._backend is not None:
            encs = self._backend.encode_batch_fast(texts, add_special_tokens=False)
            rows = [e.ids[:budget] for e in encs]
        else:  # slow tokenizers: the ordinary call
            rows = [r[:budget] for r in self.tokenizer(texts, add_special_tokens=False)["input_ids"]]
        if self.prefix or self.suffix:
            rows = [self.prefix + r + self.suffix for r in rows]
        return rows

    def encode(self, texts: list[str], chunk: int = 8192) -> Encoded:
        """Encode many texts into one flat :class:`Encoded` (chunked so memory stays small)."""
        parts, lens = [], []
        for i in range(0, len(texts), chunk):
            rows = self.ids(texts[i: i + chunk])
            lens.extend(len(r) for r in rows)
            parts.append(np.fromiter((t for r in rows for t in r), dtype=np.int64))
        lens_t = torch.tensor(lens, dtype=torch.int64)
        starts = torch.zeros_like(lens_t)
        if len(lens_t) > 1:
            starts[1:] = lens_t[:-1].cumsum(0)
        ids = torch.from_numpy(np.concatenate(parts)) if parts else torch.zeros(0, dtype=torch.int64)
        return Encoded(ids, starts, lens_t)

    def flat(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ids, offsets)`` for a small batch, built with as little Python as possible (the latency path)."""
        rows = self.ids(texts)
        if len(rows) == 1:
            return torch.tensor(rows[0], dtype=torch.int64), torch.zeros(1, dtype=torch.int64)
        lens = np.fromiter(map(len, rows), dtype=np.int64, count=len(rows))
        offsets = np.zeros(len(rows), dtype=np.int64)
        np.cumsum(lens[:-1], out=offsets[1:])
        ids = np.fromiter(itertools.chain.from_iterable(rows), dtype=np.int64, count=int(lens.sum()))
        return torch.from_numpy(ids), torch.from_numpy(offsets)
