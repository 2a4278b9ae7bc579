"""How the playground shows routing: a bar chart of router probabilities per sentence with the selected
adapters highlighted and labelled with their fusion weights, and the same as table rows."""

from __future__ import annotations

import io

SELECTED_COLOR = "#f97316"     # orange: a selected adapter
OTHER_COLOR = "#9ca3af"        # grey: an adapter the router did not keep


def _draw_entry(ax, i: int, entry: dict, names: list[str]) -> None:
    probs = entry.get("probs") or {}
    sel = dict(zip(entry.get("selected") or [], entry.get("weights") or []))
    labels = list(names) or list(probs) or list(sel)
    # a forced (manual) mixture has no router probabilities: draw its weights instead
    vals = [float(probs.get(t, 0.0)) if probs else float(sel.get(t, 0.0)) for t in labels]
    y = list(range(len(labels)))[::-1]
    ax.barh(y, vals, color=[SELECTED_COLOR if t in sel else OTHER_COLOR for t in labels])
    ax.set_yticks(y, labels, fontsize=8)
    ax.set_xlim(0, 1.08)
    for yy, t, v in zip(y, labels, vals):
        if t in sel:
            ax.text(min(v, 0.80) + 0.01, yy, f"w={sel[t]:.2f}", va="center", fontsize=8, color="#9a3412",
                    fontweight="bold")
    s = " ".join(str(entry.get("sentence", "")).split())
    tag = "" if probs else "  [manual mixture: bars = weights]"
    ax.set_title(f"{i + 1}. {s[:80]}{'…' if len(s) > 80 else ''}{tag}", fontsize=9, loc="left")
    ax.tick_params(axis="x", labelsize=7)


def routing_chart(routing: list[dict], names: list[str], max_sentences: int = 12):
    """A PIL image: for each routed sentence, the router's probability per task; the selected tasks are
    coloured and labelled with their fusion weight. ``routing`` is ``GenerationResult.routing``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from PIL import Image

    entries = list(routing)[:max_sentences] or [
        {"sentence": "(no routing: manual mixture or base model)", "selected": [], "weights": [], "probs": {}}]
    row_h = 0.9 + 0.24 * max(1, len(names))
    fig = Figure(figsize=(8.0, min(60.0, row_h * len(entries))), dpi=90)
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(entries), 1, squeeze=False)[:, 0]
    for i, (ax, entry) in enumerate(zip(axes, entries)):
        _draw_entry(ax, i, entry, names)
    axes[-1].set_xlabel("router probability (orange: selected, w = fusion weight)", fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    buf.seek(0)
    return Image.open(buf).convert("RGB")


def routing_rows(routing: list[dict]) -> list[dict]:
    """One table row per routing decision: sentence, selected adapters with weights, the router's top task."""
    rows = []
    for i, r in enumerate(routing):
        sel = r.get("selected") or []
        w = r.get("weights") or []
        probs = r.get("probs") or {}
        top = max(probs.items(), key=lambda kv: kv[1]) if probs else ("", 0.0)
        rows.append({"#": i + 1, "sentence": r.get("sentence", ""),
                     "selected": ", ".join(f"{t} ({x:.2f})" for t, x in zip(sel, w)) or "(base model)",
                     "top task": f"{top[0]} ({top[1]:.2f})" if probs else ""})
    return rows
