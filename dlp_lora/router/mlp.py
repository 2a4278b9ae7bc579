"""The paper's mini-MLP router (§3.1) and the token features every router uses.

Token ids come from the *base LLM's tokenizer* (DESIGN §5): the vocabulary size is read from the tokenizer
(``len(tokenizer)``), never typed by hand. ``EmbeddingBag(mode="mean")`` averages the token embeddings of a
sentence (flat ids + offsets, so no padding is computed), then a 4-layer MLP gives one logit per task.
With the default ``RouterConfig`` (embed 96, hidden 256, head 4) and SmolLM2's 49,152-token vocabulary this is
about 4.9M parameters, matching the paper's "about 5M".

*Head pooling* (ours, not the paper's): the mean of the first ``head_tokens`` token embeddings (the same table)
is fed to the MLP beside the mean of all tokens. Many tasks announce themselves in their first words ("Which
statement is sarcastic?", "Passage:", "How would a typical person answer ..."), and a mean over 60 tokens
dilutes those few; measured on the 21 real tasks it removes most confusions (docs/router_results.md).
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


def bag_lengths(ids: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Number of tokens of each text of a flat ``(ids, offsets)`` batch."""
    return torch.diff(offsets, append=torch.tensor([ids.numel()], device=offsets.device))


def head_bags(ids: torch.Tensor, offsets: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``k`` tokens of every text as a new flat ``(ids, offsets)`` batch (gathered per text: the cost
    grows with texts x k, not with the tokens of the batch)."""
    head_lens = bag_lengths(ids, offsets).clamp_max(k)
    col = torch.arange(k, device=ids.device)
    take = (offsets[:, None] + col[None, :])[col[None, :] < head_lens[:, None]]
    head_off = torch.zeros_like(offsets)
    if len(offsets) > 1:
        head_off[1:] = head_lens[:-1].cumsum(0)
    return ids[take], head_off


class MiniMLPRouter(nn.Module):
    """EmbeddingBag (mean) [+ head mean] -> Linear/act/dropout x3 -> Linear: ``forward(ids, offsets) -> logits``.

    ``head_tokens`` > 0 also feeds the mean of each text's first ``head_tokens`` embeddings (see the module doc).
    ``pooling="mean+max"`` (ours, not the paper's) adds the element-wise max of the token embeddings."""

    def __init__(self, vocab_size: int, num_labels: int, embed_dim: int = 96, hidden_dim: int = 256,
                 dropout: float = 0.1, activation: str = "gelu", embed_init_std: float = 0.02,
                 pooling: str = "mean", head_tokens: int = 0) -> None:
        super().__init__()
        act = ACTIVATIONS[activation]
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        self.pooling, self.head_tokens = pooling, int(head_tokens)
        self.vocab_size, self.num_labels = int(vocab_size), int(num_labels)
        self.embed = nn.EmbeddingBag(self.vocab_size, embed_dim, mode="mean")
        # Small init (not PyTorch's N(0, 1)): most of a 50k vocabulary never occurs in router data, and a token
        # unseen in training must not add a large random vector to a test sentence's mean.
        nn.init.normal_(self.embed.weight, 0.0, embed_init_std)
        width = embed_dim * ((2 if pooling == "mean+max" else 1) + (1 if self.head_tokens else 0))
        self.mlp = nn.Sequential(
            nn.Linear(width, hidden_dim), act(), nn.Dropout(dropout),
            nn.Linear(hidden_dim, hidden_dim), act(), nn.Dropout(dropout),
            nn.Linear(hidden_dim, hidden_dim), act(), nn.Dropout(dropout),
            nn.Linear(hidden_dim, self.num_labels),
        )

    def _pooled(self, ids: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        weight, sparse = self.embed.weight, self.embed.sparse
        parts = [F.embedding_bag(ids, weight, offsets, mode="mean", sparse=sparse)]
        if self.pooling == "mean+max":
            parts.append(self._max_pooled(ids, offsets, parts[0]))
        if self.head_tokens:
            hid, hoff = head_bags(ids, offsets, self.head_tokens)
            parts.append(F.embedding_bag(hid, weight, hoff, mode="mean", sparse=sparse))
        return parts[0] if len(parts) == 1 else torch.cat(parts, -1)

    def _max_pooled(self, ids: torch.Tensor, offsets: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
        """Max over each text's tokens (sparse-gradient friendly: embedding + segment max); empty text -> 0."""
        if not ids.numel():
            return torch.zeros_like(mean)
        tok = F.embedding(ids, self.embed.weight, sparse=self.embed.sparse)
        lens = bag_lengths(ids, offsets)
        mx = torch.segment_reduce(tok, "max", lengths=lens, unsafe=True)
        return torch.where((lens > 0).unsqueeze(-1), mx, torch.zeros_like(mx))

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
            if self.head_tokens:
                # one text (the per-request path): its head is simply its first tokens
                hid, hoff = (ids[: self.head_tokens], offsets) if len(offsets) == 1 else \
                    head_bags(ids, offsets, self.head_tokens)
                x = torch.cat((x, torch.embedding_bag(emb, hid, hoff, False, 1, False, None, False, None)[0]), -1)
        else:
            x = self._pooled(ids, offsets)
        for w, b in layers[:-1]:
            x = act(F.linear(x, w, b))
        return F.linear(x, *layers[-1])

    def resized(self, keep: list[int], extra: int = 0) -> "MiniMLPRouter":
        """A copy whose output rows are this router's rows ``keep`` (in that order) followed by ``extra`` new
        rows; everything else is shared knowledge, copied. Adding or removing a task without starting over."""
        out_layer = self.mlp[-1]
        new = MiniMLPRouter(self.vocab_size, len(keep) + extra, self.embed.embedding_dim, out_layer.in_features,
                            self.mlp[2].p, "gelu" if isinstance(self.mlp[1], nn.GELU) else "relu",
                            pooling=self.pooling, head_tokens=self.head_tokens)
        last = f"mlp.{len(self.mlp) - 1}."
        state = {k: v.clone() for k, v in self.state_dict().items() if not k.startswith(last)}
        idx = torch.tensor(keep, dtype=torch.long)
        w, b = out_layer.weight.detach(), out_layer.bias.detach()
        # new rows start as the mean row: no task is favoured before fine-tuning; a small random part breaks ties
        w_new = w.mean(0, keepdim=True).repeat(extra, 1) + 0.01 * torch.randn(extra, w.shape[1])
        b_new = b.mean().repeat(extra)
        state[last + "weight"] = torch.cat([w[idx], w_new])
        state[last + "bias"] = torch.cat([b[idx], b_new])
        new.load_state_dict(state)
        return new


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


# Token features are encoded once and batched by gathering, so no text is re-tokenised per epoch.

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
