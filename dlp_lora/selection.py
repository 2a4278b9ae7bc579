"""The selection options: how router probabilities become a mixture, and how often the router runs.

:class:`SelectionConfig` is the one place that holds the choices and defaults of the five options (top_p,
weighting, max_adapters, min_confidence, granularity). The CLI, the HTTP server and the web app translate their
input into one validated ``SelectionConfig`` and hand it to the pipeline unchanged.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

from .config import DLPError

WEIGHTINGS = ("paper", "renorm")
# prompt: route once per request (the original code); sentence: per sentence (paper §3); segment (ours, beyond
# the paper): answer i of a numbered prompt uses the router's mixture for question i of the prompt
GRANULARITIES = ("prompt", "sentence", "segment")
MAX_ADAPTERS_LIMIT = 4096               # more than any run holds; larger values are typos or attacks


@dataclasses.dataclass(frozen=True)
class SelectionConfig:
    """How router probabilities become fusion weights (paper §3.2, Eq. 4-5) and when the router runs."""

    top_p: float = 0.8                  # keep tasks until their cumulative probability reaches top_p (paper: 0.8)
    weighting: str = "paper"            # "paper": softmax over kept probs (Eq. 5); "renorm": kept / their sum
    max_adapters: int = 0               # cap on kept adapters per row (0 = no cap)
    min_confidence: float = 0.3         # calibrated top-1 below this: base model (0 = never; docs/router_results.md)
    granularity: str = "sentence"       # prompt | sentence (paper) | segment (per numbered question)

    def __post_init__(self) -> None:
        _number("top_p", self.top_p, 0.0, 1.0, low_open=True)
        _choice("weighting", self.weighting, WEIGHTINGS)
        if isinstance(self.max_adapters, bool) or not isinstance(self.max_adapters, int) \
                or not 0 <= self.max_adapters <= MAX_ADAPTERS_LIMIT:
            raise DLPError(f"max_adapters: must be an integer in [0, {MAX_ADAPTERS_LIMIT}] (0 = no cap), "
                           f"got {_short(self.max_adapters)}")
        _number("min_confidence", self.min_confidence, 0.0, 1.0)
        _choice("granularity", self.granularity, GRANULARITIES)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any] | None, base: "SelectionConfig | None" = None,
                     where: str = "selection") -> "SelectionConfig":
        """``base`` (default: the defaults) with the given fields replaced; unknown fields and ``None`` values
        are refused / ignored respectively. Errors name ``where`` and the field."""
        base = base or cls()
        given = {k: v for k, v in (values or {}).items() if v is not None}
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(given) - names)
        if unknown:
            raise DLPError(f"{where or 'selection'}: unknown selection option {unknown[0]!r} (known: {', '.join(sorted(names))})")
        try:
            return dataclasses.replace(base, **given)
        except DLPError as e:
            raise DLPError(f"{where}: {e}" if where else str(e)) from None

    def replace(self, **changes: Any) -> "SelectionConfig":
        return SelectionConfig.from_mapping(changes, base=self)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def _short(v: Any) -> str:
    r = repr(v)
    return r if len(r) <= 40 else r[:37] + "..."


def _number(name: str, v: Any, lo: float, hi: float, low_open: bool = False) -> None:
    ok = isinstance(v, (int, float)) and not isinstance(v, bool)
    if ok:
        try:
            f = float(v)
        except OverflowError:           # an int with hundreds of digits
            ok = False
        else:
            ok = math.isfinite(f) and (lo < f if low_open else lo <= f) and f <= hi
    if not ok:
        interval = f"({lo:g}, {hi:g}]" if low_open else f"[{lo:g}, {hi:g}]"
        raise DLPError(f"{name}: must be a number in {interval}, got {_short(v)}")


def _choice(name: str, v: Any, choices: tuple[str, ...]) -> None:
    if v not in choices:
        raise DLPError(f"{name}: must be one of {'|'.join(choices)}, got {_short(v)}")
