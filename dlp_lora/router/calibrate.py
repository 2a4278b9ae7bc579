"""How far to trust the router: temperature scaling, calibration error and the fallback to the base model.

* :func:`fit_temperature` finds the ``T`` that minimises the negative log-likelihood of ``softmax(logits / T)``
  on the validation split (Guo et al. 2017, "On Calibration of Modern Neural Networks"). One scalar, so the
  ranking of tasks - and every argmax - is unchanged; ``Router.probs`` applies it. Departure: the targets are
  smoothed by ``1 / (n + 2)`` (Laplace's rule of succession: after n correct answers out of n, the chance that
  the next is wrong is 1/(n+2)). A router that makes no validation error would otherwise drive T to 0, every
  probability to 1 - out-of-domain prompts' included - and no confidence threshold could tell them apart.
* :func:`calibration_error` is the expected calibration error (ECE) of the top-1 probability over equal-width
  bins, and :func:`reliability_bins` the table a reliability diagram draws.
* :func:`fallback_curve`: for thresholds ``t``, the share of out-of-domain prompts whose top-1 probability is
  below ``t`` (they go to the base model, as ``SelectionConfig.min_confidence`` does) against the share of
  in-domain prompts sent there by mistake. ``ood_prompts.jsonl`` beside this module holds 300 varied prompts
  that no task adapter is meant for (small talk, writing, code, cooking, ... and a few near misses).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

OOD_PROMPTS = Path(__file__).with_name("ood_prompts.jsonl")
ECE_BINS = 15
T_RANGE = (0.05, 20.0)                 # temperatures searched (log scale); beyond them calibration is degenerate
FALLBACK_THRESHOLDS = tuple(round(0.05 * i, 2) for i in range(20)) + (0.96, 0.97, 0.98, 0.99)


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, iters: int = 60) -> float:
    """The temperature minimising validation NLL against Laplace-smoothed targets (see the module doc), by
    golden-section search on log T (the NLL is unimodal in log T). 1.0 when there is nothing to fit on."""
    if len(labels) == 0:
        return 1.0
    logits, labels = logits.double(), labels.long()
    smoothing = 1.0 / (len(labels) + 2)

    def nll(log_t: float) -> float:
        return float(F.cross_entropy(logits / math.exp(log_t), labels, label_smoothing=smoothing))

    lo, hi = math.log(T_RANGE[0]), math.log(T_RANGE[1])
    g = (math.sqrt(5) - 1) / 2
    a, b = hi - g * (hi - lo), lo + g * (hi - lo)
    fa, fb = nll(a), nll(b)
    for _ in range(iters):
        if fa <= fb:
            hi, b, fb = b, a, fa
            a = hi - g * (hi - lo)
            fa = nll(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + g * (hi - lo)
            fb = nll(b)
    return round(math.exp((lo + hi) / 2), 4)


def reliability_bins(probs: torch.Tensor, labels: torch.Tensor, bins: int = ECE_BINS) -> list[dict]:
    """Per equal-width confidence bin: count, mean top-1 probability, accuracy (empty bins left out)."""
    conf, pred = probs.max(-1)
    correct = (pred == labels).double()
    idx = (conf.double() * bins).long().clamp(0, bins - 1)
    rows = []
    for b in range(bins):
        m = idx == b
        n = int(m.sum())
        if n:
            rows.append({"lo": b / bins, "hi": (b + 1) / bins, "count": n,
                         "confidence": float(conf[m].double().mean()), "accuracy": float(correct[m].mean())})
    return rows


def calibration_error(probs: torch.Tensor, labels: torch.Tensor, bins: int = ECE_BINS) -> float:
    """Expected calibration error: sum over bins of (share of samples) x |accuracy - mean confidence|."""
    total = len(labels)
    if not total:
        return float("nan")
    return sum(r["count"] / total * abs(r["accuracy"] - r["confidence"]) for r in reliability_bins(probs, labels, bins))


def read_ood_prompts(path: str | Path = OOD_PROMPTS) -> list[dict]:
    """Records ``{"text", "kind"}`` of the out-of-domain prompt set."""
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def fallback_curve(in_domain: torch.Tensor, ood: torch.Tensor, labels: torch.Tensor | None = None,
                   thresholds: Sequence[float] = FALLBACK_THRESHOLDS) -> list[dict]:
    """For each threshold: share of OOD rows sent to base (top-1 < t), share of in-domain rows sent to base,
    and (with ``labels``) the share of in-domain rows kept but routed to a wrong top-1 task."""
    top_in, top_ood = in_domain.max(-1).values, ood.max(-1).values
    wrong = (in_domain.argmax(-1) != labels) if labels is not None else None
    rows = []
    for t in thresholds:
        row = {"threshold": float(t), "ood_to_base": float((top_ood < t).double().mean()),
               "in_domain_to_base": float((top_in < t).double().mean())}
        if wrong is not None:
            row["in_domain_kept_wrong"] = float(((top_in >= t) & wrong).double().mean())
        rows.append(row)
    return rows


def plot_reliability(before: list[dict], after: list[dict], out: Path, title: str = "") -> Path:
    """Reliability diagram: accuracy against mean confidence per bin, before and after temperature scaling.
    One marker per non-empty bin, its area growing with the bin's count (printed beside it): a bin of one
    sample is one sample, not a trend, so no lines join the bins."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.6, 4.8))
    ax.plot([0, 1], [0, 1], color="grey", lw=1, ls="--", label="perfect calibration")
    for rows, name, color, dy in ((before, "before (T = 1)", "tab:red", -0.045),
                                  (after, "after temperature scaling", "tab:blue", 0.03)):
        if not rows:
            continue
        x, y = [r["confidence"] for r in rows], [r["accuracy"] for r in rows]
        ax.scatter(x, y, s=[12 + 30 * math.sqrt(r["count"]) for r in rows], color=color, alpha=0.55, label=name)
        for r in rows:
            ax.annotate(str(r["count"]), (r["confidence"], r["accuracy"] + dy), fontsize=6, ha="center", color=color)
    ax.set(xlim=(0, 1.05), ylim=(-0.05, 1.08), xlabel="mean top-1 probability in bin (15 bins)",
           ylabel="accuracy in bin")
    ax.legend(loc="upper left", fontsize=8, markerscale=0.4)
    if title:
        ax.set_title(title, fontsize=9)
    return _save(fig, out)


def plot_fallback(curve: list[dict], out: Path, chosen: float | None = None, title: str = "") -> Path:
    """Fallback trade-off: OOD prompts sent to base and in-domain prompts sent to base, against the threshold."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.6, 4.2))
    t = [r["threshold"] for r in curve]
    ax.plot(t, [100 * r["ood_to_base"] for r in curve], "-o", ms=3, label="out-of-domain prompts -> base (want high)")
    ax.plot(t, [100 * r["in_domain_to_base"] for r in curve], "-o", ms=3,
            label="in-domain prompts -> base (want low)")
    if chosen is not None:
        ax.axvline(chosen, color="grey", ls="--", lw=1, label=f"default min_confidence {chosen:g}")
    ax.set(xlabel="min_confidence (calibrated top-1 probability)", ylabel="% of prompts", ylim=(-2, 102))
    ax.legend(fontsize=8, loc="center left")
    if title:
        ax.set_title(title, fontsize=9)
    return _save(fig, out)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out: Path) -> Path:
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return out
