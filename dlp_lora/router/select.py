"""Top-p selection: router probabilities -> dense fusion weights (paper §3.2, Eq. 4-5).

For each row the tasks are sorted by probability (descending, stable: on ties the lower task index comes
first) and the smallest prefix whose cumulative probability reaches ``top_p`` is kept - the task that crosses
``top_p`` is kept, so at least one task is always kept. The kept tasks get weights:

* ``weighting="paper"``: softmax over the kept *probabilities* (Eq. 5 of the paper applies the softmax to the
  selected probabilities p_i, not to logits). Because p_i lies in [0, 1], this is a fairly flat mixture:
  probabilities 0.6 and 0.3 become weights 0.574 and 0.426. We implement the equation as published and flag it.
* ``weighting="renorm"``: the kept probabilities divided by their sum (keeps the router's relative confidence).

The result is a dense ``(B, N)`` float32 tensor, zero for tasks not kept - exactly what the fused engine's
``mixture(weights)`` takes. An all-zero row means "no adapter" (base model): rows whose top-1 probability is
below ``min_confidence`` (an extension, not in the paper). Fully vectorised: one sort, one cumsum, one scatter.
"""

from __future__ import annotations

import torch

from ..config import DLPError
from ..selection import WEIGHTINGS

# "Reaches top_p" is tested with this slack on a float64 cumulative sum: float32 probabilities such as
# 0.7 + 0.1 sum to 0.79999999, which must count as reaching top_p = 0.8.
REACH_TOL = 1e-6


def _check_args(probs, top_p, weighting, max_adapters, min_confidence) -> torch.Tensor:
    if not isinstance(probs, torch.Tensor):
        try:
            probs = torch.as_tensor(probs, dtype=torch.float32)
        except (TypeError, ValueError, RuntimeError):
            raise DLPError(f"select_top_p: probs: expected a tensor of shape (B, N), got {type(probs).__name__}") from None
    if probs.dim() not in (1, 2) or probs.shape[-1] == 0:
        raise DLPError(f"select_top_p: probs: expected shape (B, N) or (N,) with N >= 1, got {tuple(probs.shape)}")
    if not probs.is_floating_point():
        probs = probs.float()
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not (0.0 < float(top_p) <= 1.0):
        raise DLPError(f"select_top_p: top_p: must be in (0, 1], got {top_p!r}")
    if weighting not in WEIGHTINGS:
        raise DLPError(f"select_top_p: weighting: must be {'|'.join(WEIGHTINGS)}, got {weighting!r}")
    if max_adapters is not None and (isinstance(max_adapters, bool) or not isinstance(max_adapters, int) or max_adapters < 0):
        raise DLPError(f"select_top_p: max_adapters: must be None, 0 (no cap) or a positive integer, got {max_adapters!r}")
    if min_confidence is not None and (isinstance(min_confidence, bool) or not isinstance(min_confidence, (int, float))
                                       or not 0.0 <= float(min_confidence) <= 1.0):
        raise DLPError(f"select_top_p: min_confidence: must be None or in [0, 1], got {min_confidence!r}")
    if probs.numel():
        if not bool(torch.isfinite(probs).all()):
            raise DLPError("select_top_p: probs: contains NaN or infinity")
        if bool((probs < 0).any()):
            raise DLPError("select_top_p: probs: contains negative values (expected probabilities, not logits)")
        sums = probs.double().sum(-1)
        if bool(((sums - 1.0).abs() > 1e-3).any()):
            bad = int(((sums - 1.0).abs() > 1e-3).nonzero()[0, 0]) if probs.dim() == 2 else 0
            raise DLPError(f"select_top_p: probs: row {bad} sums to {float(sums.reshape(-1)[bad]):.4f}, expected 1 "
                           "(pass softmax probabilities, not logits)")
    return probs


def select_top_p(probs, top_p: float, weighting: str = "paper", max_adapters: int | None = None,
                 min_confidence: float | None = None) -> torch.Tensor:
    """Dense fusion weights ``(B, N)`` (or ``(N,)`` for a 1-D input) from router probabilities.

    ``max_adapters`` caps the kept tasks per row (None or 0: no cap). ``min_confidence``: rows whose top-1
    probability is below it become all zeros (base model). Tasks with probability exactly 0 are never kept.
    Rows of the result sum to 1, or are all zero.
    """
    probs = _check_args(probs, top_p, weighting, max_adapters, min_confidence)
    squeeze = probs.dim() == 1
    p = probs.unsqueeze(0) if squeeze else probs
    n = p.shape[-1]
    # Stable descending sort: ties keep the lower task index first, so selection is deterministic.
    sorted_p, order = torch.sort(p, dim=-1, descending=True, stable=True)
    before = sorted_p.double().cumsum(-1) - sorted_p.double()         # mass strictly before each item
    rank = torch.arange(n, device=p.device)
    keep = before < (float(top_p) - REACH_TOL)                        # the crossing item is kept
    keep &= sorted_p > 0                                              # a zero-probability task adds nothing
    keep |= rank == 0                                                 # at least one task is always kept
    if max_adapters:
        keep &= rank < int(max_adapters)
    if min_confidence:
        keep &= (sorted_p[:, :1] >= float(min_confidence))            # whole row -> base model
    sp = sorted_p.float()
    if weighting == "paper":
        # Eq. 5: softmax over the kept probabilities. p <= 1 so exp cannot overflow; masked entries -> 0.
        raw = torch.where(keep, torch.exp(sp - sp[:, :1]), torch.zeros_like(sp))
    else:
        raw = torch.where(keep, sp, torch.zeros_like(sp))
    total = raw.sum(-1, keepdim=True)
    w_sorted = torch.where(total > 0, raw / total.clamp_min(torch.finfo(torch.float32).tiny), torch.zeros_like(raw))
    weights = torch.zeros_like(sp).scatter_(-1, order, w_sorted)
    return weights[0] if squeeze else weights
