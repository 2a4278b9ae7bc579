"""The fused engine (DESIGN §4): N PEFT LoRA adapters stacked inside the base model's linear layers, mixed per row
(or per token) with one batched computation.

Every adapted linear layer computes

    y = W·x + Σ_i w_i · s_i · B_i · (A_i · x)          s_i = alpha_i / r_i  (rsLoRA: alpha_i / sqrt(r_i))

``fuse_adapters(model, dirs)`` wraps each targeted ``nn.Linear`` *in place* with a :class:`FusedLoRALinear` that
holds all N adapters stacked (``A`` as ``(N, r_max, d_in)``, ``B·s`` transposed as ``(N, r_max, d_out)``; a smaller
rank is zero-padded, an adapter that does not target the module is all zeros there). Mixture weights are one
tensor for the whole model, held by a shared :class:`MixtureState`:

* ``(batch, N)``: one mixture per row (prompt / sentence granularity), or ``(1, N)`` for every row;
* ``(batch, seq, N)``: one mixture per token (sentence spans inside a prefill). With a KV cache the weights must
  align with the *current* input: the caller passes ``(batch, S_new, N)`` for the new tokens only (or ``(batch, N)``
  for decode steps) - the pipeline does exactly that.

Speed by design: ``set_weights`` computes, with a single host sync, which adapters are used anywhere in the batch
(the "active set") and the largest number of adapters a single row uses. The forward pass then needs no sync,
no Python loop over adapters or rows, and two matmuls per module whatever N is. ``MixtureState.path`` is the
one decision between the paths ("base" when no mixture is set or it is merged into W, else):

* union path (a row uses every active adapter - e.g. all rows share one mixture): ``h = x @ A_sel.T`` over the
  active set, columns scaled by each row's weights, ``y = base(x) + h @ B_sel`` (``addmm``). ``A_sel/B_sel``
  are gathered once per active set and cached per layer;
* per-row path (rows using *different* adapters; prefill always, decode steps up to a batch size, below):
  each row gathers only its own <= k_row adapters once per routing decision (``A`` and the weight-scaled ``B``),
  then ``bmm`` + ``baddbmm``, so a 16-row batch of 16 different 3-adapter mixtures costs 3 adapters per token,
  not the union of 26 (the same idea as Punica's per-row gathered BGMV kernel for multi-LoRA decoding).

Departure from DESIGN §4, measured: DESIGN's forward is the union path for every batch. With rows that differ,
the union multiplies every row by every active adapter (FLOPs ~ batch * n_union) while the per-row path reads
batch * k_row adapter copies (bytes ~ batch * k_row). A decode step takes the per-row path while
``batch * k_row <= ROWS_DECODE_LIMIT * n_union``. ``scripts/decode_lockstep.py`` (SmolLM2-135M, 2-core CPU, 26
adapters, <= 3 per row; decode time / PEFT single, per-row vs union): batch 8 0.984 vs 0.997 (ratio 2.2),
16 1.009 vs 1.035 (2.3), 32 1.037 vs 1.054 (3.7), 64 1.056 vs 1.042 (7.4) - the crossover lies between 3.7
and 7.4. ``MixtureState.decode_path`` forces either path.

Adapter scales are folded into ``B`` at fuse time. Merge mode (batch 1) folds the mixture into ``W`` once per
routing decision (an exact copy of ``W`` is kept and restored, never subtracted). ``export_mixture`` writes a
mixture as one ordinary PEFT adapter of rank Σr_i. ``detach()`` puts the original ``nn.Linear`` objects back.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .config import DLPError, atomic_dir, atomic_write_json
from .run import ADAPTER_CONFIG as CONFIG_FILE, ADAPTER_WEIGHTS as WEIGHTS_FILE, TASK_META as TASK_FILE
from .run import check_adapter_dir, read_task_name

PEFT_PREFIX = "base_model.model."
# Decode steps of rows on different adapters use the per-row path while batch * k_row <= this * n_union
# (measured crossover between 3.7 and 7.4, see the module doc).
ROWS_DECODE_LIMIT = 5
# PEFT tensor names: base_model.model.<module>.lora_A.weight (an adapter name may sit before ".weight")
_KEY_RE = re.compile(r"^(?P<mod>.+)\.lora_(?P<ab>[AB])(?:\.[A-Za-z0-9_-]+)?\.weight$")



def _pattern_key(keys: Sequence[str], name: str) -> str | None:
    """PEFT's rank_pattern/alpha_pattern lookup (peft.utils.other.get_pattern_key)."""
    for key in keys:
        if re.match(rf"(.*\.)?({key})$", name):
            return key
    return None


def read_adapter(adapter_dir: str | os.PathLike) -> dict:
    """Read one PEFT LoRA folder (safetensors only) into ``{"path", "name", "config", "modules": {module: (A, B,
    scale)}}`` with ``A (r, d_in)``, ``B (d_out, r)`` as fp32 CPU tensors. Raises :class:`DLPError` if it is not
    a LoRA folder the engine can fuse."""
    path = Path(adapter_dir)
    cfg = check_adapter_dir(path)  # folder, config, LoRA type, safetensors weights (never a pickled .bin)
    cfg_path, wpath = path / CONFIG_FILE, path / WEIGHTS_FILE
    if cfg.get("use_dora"):
        raise DLPError(f"{cfg_path}: field 'use_dora': DoRA adapters cannot be fused (plain LoRA only)")
    if cfg.get("modules_to_save"):
        raise DLPError(f"{cfg_path}: field 'modules_to_save': adapters with fully trained modules cannot be fused")
    parts = _read_lora_tensors(wpath)
    lcfg = _lora_config(cfg, cfg_path)
    modules = {}
    for mod, ab in sorted(parts.items()):
        if "A" not in ab or "B" not in ab:
            raise DLPError(f"{wpath}: module {mod}: lora_{'B' if 'A' in ab else 'A'} weight missing")
        A, B = ab["A"].float(), ab["B"].float()
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
            raise DLPError(f"{wpath}: module {mod}: lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)} do not fit")
        modules[mod] = (A, B, _module_scale(lcfg, mod, A.shape[0], cfg_path))
    return {"path": path, "name": read_task_name(path), "config": cfg, "modules": modules}


def _read_lora_tensors(wpath: Path) -> dict[str, dict[str, torch.Tensor]]:
    """``{module: {"A": tensor, "B": tensor}}`` from a PEFT safetensors file; refuses non-LoRA tensors and
    tensors holding NaN or infinity."""
    from safetensors.torch import load_file

    try:
        sd = load_file(str(wpath), device="cpu")
    except Exception as e:
        raise DLPError(f"{wpath}: cannot read safetensors ({e.__class__.__name__})") from None
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in sd.items():
        m = _KEY_RE.match(key)
        if m is None or "lora_embedding" in key:
            raise DLPError(f"{wpath}: tensor {key!r}: not a LoRA weight of a linear layer (cannot be fused)")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            # one NaN would silently turn the output of every row that mixes this adapter into NaN
            raise DLPError(f"{wpath}: tensor {key!r}: contains NaN or infinite values")
        mod = m.group("mod")
        mod = mod[len(PEFT_PREFIX):] if mod.startswith(PEFT_PREFIX) else mod
        parts.setdefault(mod, {})[m.group("ab")] = t
    if not parts:
        raise DLPError(f"{wpath}: no LoRA tensors")
    return parts


def _lora_config(cfg: dict, cfg_path: Path) -> dict:
    """The config fields that decide each module's rank and scale, checked. The config must describe the
    tensors: a config that lies about rank/alpha/targets would give PEFT (and any LoRA server) another adapter
    than the one we fuse, so it is refused rather than silently trusted."""
    _num = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    alpha_pattern = cfg.get("alpha_pattern") or {}
    rank_pattern = cfg.get("rank_pattern") or {}
    for field, pat in (("alpha_pattern", alpha_pattern), ("rank_pattern", rank_pattern)):
        if not isinstance(pat, dict) or not all(_num(v) for v in pat.values()):
            raise DLPError(f"{cfg_path}: field {field!r}: expected an object of numbers")
    if not _num(cfg.get("lora_alpha", 8)):
        raise DLPError(f"{cfg_path}: field 'lora_alpha': expected a number, got {cfg.get('lora_alpha')!r}")
    r_cfg = cfg.get("r", 8)
    if not (isinstance(r_cfg, int) and not isinstance(r_cfg, bool) and r_cfg > 0):
        raise DLPError(f"{cfg_path}: field 'r': expected a positive integer, got {r_cfg!r}")
    targets = cfg.get("target_modules")
    if isinstance(targets, str):
        targets = None if targets == "all-linear" else targets   # a regex (PEFT's string form)
    elif targets is not None and not (isinstance(targets, list) and all(isinstance(t, str) for t in targets)):
        raise DLPError(f"{cfg_path}: field 'target_modules': expected a list of module names or a string")
    return {"r": r_cfg, "alpha": float(cfg.get("lora_alpha", 8)), "rslora": bool(cfg.get("use_rslora", False)),
            "targets": targets, "alpha_pattern": alpha_pattern, "rank_pattern": rank_pattern}


def _module_scale(lcfg: dict, mod: str, r: int, cfg_path: Path) -> float:
    """The LoRA scale of module ``mod`` of rank ``r`` (alpha / r, rsLoRA alpha / sqrt(r)), after checking that
    the config's rank and targets describe it."""
    rank_pattern, alpha_pattern, targets = lcfg["rank_pattern"], lcfg["alpha_pattern"], lcfg["targets"]
    rkey = _pattern_key(list(rank_pattern), mod)
    r_want = int(rank_pattern[rkey]) if rkey is not None else lcfg["r"]
    if r != r_want:
        field = f"rank_pattern[{rkey!r}]" if rkey is not None else "r"
        raise DLPError(f"{cfg_path}: field {field!r}: says rank {r_want}, but module {mod} has rank {r} in "
                       f"{WEIGHTS_FILE}")
    if isinstance(targets, list) and targets and not any(mod == t or mod.endswith("." + t) for t in targets):
        raise DLPError(f"{cfg_path}: field 'target_modules': {targets} does not include module {mod} of "
                       f"{WEIGHTS_FILE}")
    key = _pattern_key(list(alpha_pattern), mod)
    alpha = float(alpha_pattern[key]) if key is not None else lcfg["alpha"]
    return alpha / math.sqrt(r) if lcfg["rslora"] else alpha / r


class MixtureState:
    """The mixture weights of one fused model, shared by all its wrapped layers (set once, read by every layer).

    ``set`` validates the weights and computes, with ONE host sync, the active adapter set (used anywhere in the
    batch) and ``k_row`` (the most adapters one row uses); layers then read cached column weights from here."""

    def __init__(self, n: int, device: torch.device) -> None:
        self.n = n
        self.device = device
        self.weights: torch.Tensor | None = None      # (B, N) or (B, S, N) float32 on device
        self.active: tuple[int, ...] = ()             # adapters used anywhere in the batch
        self.active_t: torch.Tensor | None = None     # the same as a long tensor on device
        self.k_row = 0                                # most adapters used by one row
        self.row_idx: torch.Tensor | None = None      # (B, k_row) adapter index per row (padding has weight 0)
        self.version = 0
        self._cols: dict[Any, torch.Tensor] = {}
        # A preference, kept across set(): the decode path of rows on different adapters - "auto" (per-row while
        # batch * k_row <= ROWS_DECODE_LIMIT * n_union), "rows" or "union" (for tests and for measuring a GPU).
        self.decode_path = "auto"
        self.rows_decode = False                      # the choice for the current weights; set()

    def check(self, weights: Any, what: str = "mixture weights") -> torch.Tensor:
        """Validated float32 copy on the device (shape only; values are checked in ``set``)."""
        if not isinstance(weights, torch.Tensor):
            try:
                weights = torch.as_tensor(weights, dtype=torch.float32)
            except (TypeError, ValueError, RuntimeError):
                raise DLPError(f"{what}: expected a tensor of shape (batch, {self.n}) or (batch, seq, {self.n})") from None
        if weights.dim() not in (2, 3) or weights.shape[-1] != self.n or weights.shape[0] == 0:
            raise DLPError(f"{what}: expected shape (batch, {self.n}) or (batch, seq, {self.n}), "
                           f"got {tuple(weights.shape)}")
        if weights.dim() == 3 and weights.shape[1] == 0:
            raise DLPError(f"{what}: empty sequence dimension")
        return weights.detach().to(device=self.device, dtype=torch.float32)

    def set(self, weights: Any) -> None:
        """Make ``weights`` the mixture of every following forward pass: ``(B, N)`` one mixture per row (or
        ``(1, N)`` for all rows), ``(B, S, N)`` one per token of the next input. Checks shape and values (finite,
        >= 0), then, with the one host sync of a routing decision, finds the active adapters, ``k_row`` and each
        row's adapter indices, and decides whether decode steps take the per-row path. Bumps ``version`` and
        drops the column cache, so every layer rebuilds its per-row gather on its next call."""
        w = self.check(weights)
        nz = w != 0
        row_any = nz.any(1) if w.dim() == 3 else nz                      # (B, N)
        union = row_any.any(0)
        bad = ~(torch.isfinite(w).all() & (w >= 0).all())
        # the one host sync of a routing decision (never in forward)
        packed = torch.cat([union.long(), row_any.sum(1).max().view(1).long(), bad.view(1).long()]).tolist()
        if packed[-1]:
            raise DLPError("mixture weights: must be finite and >= 0 (got a negative, NaN or infinite weight)")
        self.weights = w
        self.active = tuple(i for i in range(self.n) if packed[i])
        self.active_t = torch.tensor(self.active, dtype=torch.long).to(self.device)
        self.k_row = int(packed[self.n])
        if 0 < self.k_row < len(self.active):
            self.row_idx = torch.topk(row_any.to(torch.float32), self.k_row, dim=1).indices
        else:
            self.row_idx = None
        if self.decode_path not in ("auto", "rows", "union"):
            raise DLPError(f"decode_path: expected 'auto', 'rows' or 'union', got {self.decode_path!r}")
        auto = w.shape[0] * self.k_row <= ROWS_DECODE_LIMIT * len(self.active)
        self.rows_decode = self.row_idx is not None and (self.decode_path == "rows" or
                                                         (self.decode_path == "auto" and auto))
        self.version += 1
        self._cols = {}

    def path(self, batch: int, seq: int) -> str:
        """Which computation a layer runs for an input of ``batch`` rows and ``seq`` new tokens - the one place
        this is decided: "base" (no mixture set: ``base(x)`` only; also the merged case, where the mixture already
        sits in W), "rows" (rows on different adapters, one mixture per row), "token_rows" (the same with
        per-token weights) or "union" (every row over the active set). A prefill of rows that differ always takes
        a per-row path; a decode step does while ``rows_decode`` (see ``ROWS_DECODE_LIMIT``)."""
        w = self.weights
        if w is None or not self.active:
            return "base"
        if self.row_idx is None or w.shape[0] != batch or (seq == 1 and not self.rows_decode):
            return "union"
        return "rows" if w.dim() == 2 else "token_rows"

    def clear(self) -> None:
        self.weights, self.active, self.active_t, self.row_idx, self.k_row = None, (), None, None, 0
        self.rows_decode = False
        self.version += 1
        self._cols = {}

    def columns(self, r: int, dtype: torch.dtype, per_row: bool) -> torch.Tensor:
        """Weights expanded over each adapter's r columns, shaped to broadcast over ``h`` (B, S, cols);
        computed once per (rank, dtype, path) and shared by all layers."""
        key = (r, dtype, per_row)
        cols = self._cols.get(key)
        if cols is None:
            w = self.weights
            if per_row:
                idx = self.row_idx if w.dim() == 2 else self.row_idx.unsqueeze(1).expand(-1, w.shape[1], -1)
                sel = w.gather(-1, idx)
            else:
                sel = w.index_select(-1, self.active_t)
            cols = sel.repeat_interleave(r, dim=-1).to(dtype)
            if cols.dim() == 2:
                cols = cols.unsqueeze(1)
            self._cols[key] = cols
        return cols



class FusedLoRALinear(nn.Module):
    """A base ``nn.Linear`` plus N stacked LoRA adapters, mixed by the shared :class:`MixtureState`.

    With no weights set it returns exactly ``base(x)``."""

    def __init__(self, base: nn.Linear, A: torch.Tensor, Bt: torch.Tensor, ranks: list[int], state: MixtureState,
                 name: str = "") -> None:
        super().__init__()
        self.base = base
        self.register_buffer("A", A, persistent=False)      # (N, r_max, d_in)
        self.register_buffer("Bt", Bt, persistent=False)    # (N, r_max, d_out), scale s_i folded in
        self.ranks = ranks                                  # true rank per adapter here (0 = not targeted)
        self.r = A.shape[1]
        self.name = name
        self._state = state
        self._plain = type(base) is nn.Linear
        self._sel_key: tuple | None = None
        self._A_sel: torch.Tensor | None = None
        self._Bt_sel: torch.Tensor | None = None
        self._w_orig: torch.Tensor | None = None            # exact copy of W while merged
        self._rows_ver = -1                                 # per-row cache (A and w-scaled B of each row's adapters)
        self._A_rows: torch.Tensor | None = None
        self._Bw_rows: torch.Tensor | None = None

    def drop_caches(self) -> None:
        self._rows_ver, self._A_rows, self._Bw_rows = -1, None, None

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> torch.Tensor:  # some HF code inspects .weight of projections (dtype/device)
        return self.base.weight

    @property
    def bias(self):
        return self.base.bias

    def extra_repr(self) -> str:
        return f"adapters={self.A.shape[0]}, r_max={self.r}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``base(x) + Σ_i w_i·s_i·B_i·A_i·x`` with the weights of the shared :class:`MixtureState` (``x``: (batch,
        seq, d_in); weights of batch 1 apply to every row). :meth:`MixtureState.path` picks one of three
        computations, each exact to the naive formula and each two matmuls with no host sync; what they cache is
        said in their own docstrings."""
        y = F.linear(x, self.base.weight, self.base.bias) if self._plain else self.base(x)
        st = self._state
        if st.weights is None or not st.active:
            return y
        self._check_input(x, st.weights)
        path = st.path(x.shape[0], x.shape[1])
        inplace = not torch.is_grad_enabled()       # under autograd, y must not be changed in place
        if path == "rows":
            return self._rows(x, y, inplace)
        if path == "token_rows":
            return self._token_rows(x, y, inplace)
        return self._union(x, y, inplace)

    def _check_input(self, x: torch.Tensor, w: torch.Tensor) -> None:
        if x.dim() != 3:
            raise DLPError(f"{self.name}: fused layers expect (batch, seq, features) inputs, got {tuple(x.shape)}")
        if w.shape[0] != x.shape[0] and w.shape[0] != 1:
            raise DLPError(f"mixture weights: batch {w.shape[0]} but the model input has batch {x.shape[0]}")
        if w.dim() == 3 and w.shape[1] != x.shape[1]:
            raise DLPError(f"mixture weights: {w.shape[1]} per-token weights but the input has {x.shape[1]} new "
                           "tokens (with a KV cache pass weights for the new tokens only)")

    def _rows(self, x: torch.Tensor, y: torch.Tensor, inplace: bool) -> torch.Tensor:
        """Per-row path, one mixture per row: each row uses only its own <= k_row adapters. Caches, per
        ``set_weights`` (``state.version``), each row's A (transposed, contiguous, so the bmm reads it linearly)
        and its weight-scaled B; every later step is one ``bmm`` + one ``baddbmm``."""
        st = self._state
        if self._rows_ver != st.version:
            bsz, kr = x.shape[0], st.k_row * self.r
            self._A_rows = self.A[st.row_idx].reshape(bsz, kr, -1).transpose(1, 2).contiguous()
            cols = st.columns(self.r, self.Bt.dtype, True).transpose(1, 2)        # (B, k*r, 1)
            self._Bw_rows = self.Bt[st.row_idx].reshape(bsz, kr, -1) * cols
            self._rows_ver = st.version
        h = torch.bmm(x, self._A_rows)
        return y.baddbmm_(h, self._Bw_rows) if inplace else torch.baddbmm(y, h, self._Bw_rows)

    def _token_rows(self, x: torch.Tensor, y: torch.Tensor, inplace: bool) -> torch.Tensor:
        """Per-row path with per-token weights (a prefill whose spans carry different mixtures): gathers the
        rows' A and B on each call (prefills are rare) and caches nothing here; the expanded column weights are
        cached once per ``set_weights`` in the shared state."""
        st = self._state
        bsz, kr = x.shape[0], st.k_row * self.r
        h = torch.bmm(x, self.A[st.row_idx].reshape(bsz, kr, -1).transpose(1, 2))
        cols = st.columns(self.r, h.dtype, True)
        h = h.mul_(cols) if inplace else h * cols
        Bt_rows = self.Bt[st.row_idx].reshape(bsz, kr, -1)
        return y.baddbmm_(h, Bt_rows) if inplace else torch.baddbmm(y, h, Bt_rows)

    def _union(self, x: torch.Tensor, y: torch.Tensor, inplace: bool) -> torch.Tensor:
        """Union path: every row over the batch's active adapters, columns scaled by the row's (or token's)
        weights. Caches A_sel/B_sel per active set (and per inference mode: inference tensors must not leak into
        autograd), so a run of steps on the same adapters gathers them once."""
        st = self._state
        key = (st.active, torch.is_inference_mode_enabled())
        if self._sel_key != key:
            self._A_sel = self.A.index_select(0, st.active_t).reshape(-1, self.A.shape[-1])
            self._Bt_sel = self.Bt.index_select(0, st.active_t).reshape(-1, self.Bt.shape[-1])
            self._sel_key = key
        h = F.linear(x, self._A_sel)
        cols = st.columns(self.r, h.dtype, False)
        h = h.mul_(cols) if inplace else h * cols
        if inplace:
            y.view(-1, y.shape[-1]).addmm_(h.view(-1, h.shape[-1]), self._Bt_sel)
            return y
        return y + h @ self._Bt_sel

    def merge(self, w: torch.Tensor, idx: torch.Tensor | None = None) -> None:
        """Fold Σ w_i s_i B_i A_i into W (fp32 arithmetic). An exact copy of W is kept for ``unmerge``.
        ``idx``: the adapters with a non-zero weight, when the caller already has them (one sync per model)."""
        weight = self.base.weight
        if self._w_orig is None:
            self._w_orig = weight.detach().clone()
        if idx is None:
            idx = torch.nonzero(w).flatten()
        A = self.A.index_select(0, idx).float()                        # (k, r, d_in)
        Bt = self.Bt.index_select(0, idx).float() * w[idx].view(-1, 1, 1)
        delta = Bt.reshape(-1, Bt.shape[-1]).t() @ A.reshape(-1, A.shape[-1])
        with torch.no_grad():
            weight.copy_((self._w_orig.float() + delta).to(weight.dtype))

    def unmerge(self) -> None:
        if self._w_orig is not None:
            with torch.no_grad():
                self.base.weight.copy_(self._w_orig)
            self._w_orig = None



class FusedAdapters:
    """N adapters fused into one model. ``names`` are the task names, in order (== router labels)."""

    def __init__(self, model: nn.Module, names: list[str], paths: list[Path], layers: dict[str, FusedLoRALinear],
                 state: MixtureState, configs: list[dict]) -> None:
        self.model = model
        self.names = names
        self.paths = paths
        self.layers = layers
        self.state = state
        self.configs = configs
        self.merged: torch.Tensor | None = None
        self._detached = False

    def __len__(self) -> int:
        return len(self.names)

    def __repr__(self) -> str:
        return f"FusedAdapters(n={len(self.names)}, layers={len(self.layers)}, names={self.names})"

    def weights_vector(self, mapping: dict[str, float] | None = None) -> torch.Tensor:
        """A dense (N,) weight vector from ``{task: weight}`` (unknown task -> DLPError)."""
        w = torch.zeros(len(self.names))
        for task, v in (mapping or {}).items():
            if task not in self.names:
                raise DLPError(f"weights: unknown task {task!r} (adapters: {', '.join(self.names)})")
            try:
                v = float(v)
            except (TypeError, ValueError):
                raise DLPError(f"weights: task {task!r}: weight {v!r} is not a number") from None
            if not math.isfinite(v) or v < 0:
                raise DLPError(f"weights: task {task!r}: weight must be finite and >= 0, got {v}")
            w[self.names.index(task)] = v
        return w

    def set_weights(self, weights: Any) -> None:
        """Set the mixture: (B, N) per row or (B, S, N) per token for the next forward calls."""
        self._alive()
        self.state.set(weights)

    def clear_weights(self) -> None:
        """Back to the base model (merged weights, if any, stay merged)."""
        self.state.clear()
        for layer in self.layers.values():
            layer.drop_caches()

    @contextlib.contextmanager
    def mixture(self, weights: Any) -> Iterator["FusedAdapters"]:
        """``with fused.mixture(w): model(...)`` - weights apply inside the block; the previous ones after."""
        prev = self.state.weights
        self.set_weights(weights)
        try:
            yield self
        finally:
            if prev is None:
                self.clear_weights()
            else:
                self.state.set(prev)

    def row_weights(self, weights: Any, what: str = "weights") -> torch.Tensor:
        """One checked (N,) mixture from a {task: weight} mapping, a sequence or a tensor of N weights (CPU)."""
        if isinstance(weights, dict):
            weights = self.weights_vector(weights)
        w = torch.as_tensor(weights, dtype=torch.float32).detach().flatten().cpu() \
            if not isinstance(weights, torch.Tensor) else weights.detach().float().cpu()
        if w.dim() == 2 and w.shape[0] == 1:
            w = w[0]
        if w.dim() != 1 or w.shape[0] != len(self.names):
            raise DLPError(f"{what}: expected {len(self.names)} weights (one per adapter), got shape {tuple(w.shape)}")
        if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
            raise DLPError(f"{what}: weights must be finite and >= 0")
        return w

    def merge(self, weights_row: Any) -> None:
        """Fold one mixture (N,) into the base weights (batch-1 generation: ≈0 per-token overhead). Merging again
        replaces the previous mixture; ``unmerge`` restores W exactly."""
        self._alive()
        w = self.row_weights(weights_row, "merge weights")
        idx = torch.nonzero(w).flatten()
        dev = {}
        for layer in self.layers.values():
            d = layer.A.device
            if d not in dev:
                dev[d] = (w.to(d), idx.to(d))
            layer.merge(*dev[d])
        self.merged = w

    def unmerge(self) -> None:
        for layer in self.layers.values():
            layer.unmerge()
        self.merged = None

    def export_mixture(self, weights: Any, out_dir: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write the mixture Σ w_i s_i B_i A_i as ONE ordinary PEFT LoRA adapter of rank Σr_i (exact: the A's are
        concatenated, the w_i·s_i-scaled B's concatenated; lora_alpha == r so PEFT's scale is 1)."""
        self._alive()
        w = self.row_weights(weights, "export weights")
        used = [i for i in range(len(self.names)) if float(w[i]) > 0]
        if not used:
            raise DLPError("export weights: all weights are zero (that mixture is the base model; nothing to export)")
        from peft import LoraConfig
        from safetensors.torch import save_file

        tensors: dict[str, torch.Tensor] = {}
        ranks: dict[str, int] = {}
        for name, layer in self.layers.items():
            As, Bs = [], []
            for i in used:
                r = layer.ranks[i]
                if r:
                    As.append(layer.A[i, :r].float().cpu())
                    Bs.append(layer.Bt[i, :r].float().cpu().t() * float(w[i]))
            if not As:
                continue
            tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = torch.cat(As, 0).contiguous()
            tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = torch.cat(Bs, 1).contiguous()
            ranks[name] = sum(a.shape[0] for a in As)
        counts: dict[int, int] = {}
        for r in ranks.values():
            counts[r] = counts.get(r, 0) + 1
        r0 = max(counts, key=lambda r: (counts[r], r))
        pattern = {re.escape(n): r for n, r in ranks.items() if r != r0}
        cfg = LoraConfig(r=r0, lora_alpha=r0, target_modules=sorted(ranks), rank_pattern=pattern,
                         alpha_pattern=dict(pattern), lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
                         use_rslora=False,
                         base_model_name_or_path=str(getattr(self.model.config, "name_or_path", "") or ""))
        with atomic_dir(out_dir, overwrite=overwrite) as tmp:
            cfg.save_pretrained(str(tmp))
            save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
            mix = {n: float(w[i]) for i, n in enumerate(self.names) if float(w[i]) > 0}
            atomic_write_json(tmp / "dlp_mixture.json", {"mixture": mix, "rank": r0, "rank_pattern": ranks,
                                                         "adapters": [str(self.paths[i]) for i in used]})
        return Path(out_dir)

    def detach(self) -> nn.Module:
        """Remove the wrappers: the model holds its original ``nn.Linear`` objects (and exact weights) again."""
        if self._detached:
            return self.model
        self.unmerge()
        self.clear_weights()
        for name, layer in self.layers.items():
            parent_name, _, child = name.rpartition(".")
            parent = self.model.get_submodule(parent_name) if parent_name else self.model
            setattr(parent, child, layer.base)
        self._detached = True
        return self.model

    def _alive(self) -> None:
        if self._detached:
            raise DLPError("fused adapters: already detached from the model")


def _check_base_model(model: nn.Module, adapters: list[dict]) -> None:
    """Refuse adapters whose ``dlp_task.json`` records another base model (architecture fingerprint): layers of
    equal shape would otherwise take weights trained for a different network without any error."""
    from .models import model_identity

    if not hasattr(model, "config"):
        return
    mine = None
    for a in adapters:
        f = Path(a["path"]) / TASK_FILE
        if not f.is_file():
            continue                      # adapters trained elsewhere carry no record; the shape checks apply
        try:
            base = json.loads(f.read_text(encoding="utf-8")).get("base_model")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
            continue                      # read_task_name already reported unreadable files
        if not isinstance(base, dict) or not base.get("fingerprint"):
            continue
        mine = mine or model_identity(model)
        if base["fingerprint"] != mine["fingerprint"]:
            what = ", ".join(f"{k}={base.get(k)}" for k in ("model_type", "hidden_size", "num_hidden_layers")
                             if base.get(k) != mine.get(k))
            what = what or f"fingerprint {base['fingerprint']}"
            raise DLPError(f"{f}: field 'base_model': trained on another base model ({what}) than the one loaded "
                           f"({mine.get('model_type')}, hidden {mine.get('hidden_size')}, "
                           f"{mine.get('num_hidden_layers')} layers)")


def fuse_adapters(model: nn.Module, adapter_dirs: Sequence[str | os.PathLike], names: Sequence[str] | None = None,
                  ) -> FusedAdapters:
    """Wrap every linear layer targeted by any adapter with a :class:`FusedLoRALinear` (in place; no copy of the
    base model). Modules are found from the PEFT tensor names, so any HF causal LM works."""
    dirs = [Path(d) for d in adapter_dirs]
    if not dirs:
        raise DLPError("adapters: no adapter folders given")
    if any(isinstance(m, FusedLoRALinear) for m in model.modules()):
        raise DLPError("model: adapters are already fused into this model (call detach() first)")
    adapters = [read_adapter(d) for d in dirs]
    task_names = list(names) if names is not None else [a["name"] for a in adapters]
    if len(task_names) != len(adapters):
        raise DLPError(f"adapters: {len(adapters)} folders but {len(task_names)} names")
    seen: dict[str, Path] = {}
    for a, n in zip(adapters, task_names):
        if n in seen:
            raise DLPError(f"{a['path']}: task {n!r} also used by adapter {seen[n]}")
        seen[n] = a["path"]
    targets = _target_layers(model, adapters)     # every adapter checked before the model is touched
    _check_base_model(model, adapters)            # after the shape checks, which name the module that does not fit
    state = MixtureState(len(adapters), next(model.parameters()).device)
    layers = {mod: _stack_layer(mod, targets[mod], adapters, state) for mod in sorted(targets)}
    for mod, layer in layers.items():
        parent_name, _, child = mod.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer)
    return FusedAdapters(model, task_names, [a["path"] for a in adapters], layers, state,
                         [a["config"] for a in adapters])


def _target_layers(model: nn.Module, adapters: list[dict]) -> dict[str, nn.Linear]:
    """The base model's linear layer of every module any adapter targets, after checking it fits."""
    targets: dict[str, nn.Linear] = {}
    for a in adapters:
        for mod, (A, B, _) in a["modules"].items():
            try:
                m = model.get_submodule(mod)
            except AttributeError:
                raise DLPError(f"{a['path']}: module {mod}: not found in the base model "
                               "(adapter trained on another base model?)") from None
            if not isinstance(m, nn.Linear):
                raise DLPError(f"{a['path']}: module {mod}: is a {type(m).__name__}, only nn.Linear can be fused")
            if A.shape[1] != m.in_features or B.shape[0] != m.out_features:
                raise DLPError(f"{a['path']}: module {mod}: adapter shape {B.shape[0]}x{A.shape[1]} does not match "
                               f"the base layer {m.out_features}x{m.in_features} (adapter trained on another base model?)")
            targets[mod] = m
    return targets


def _stack_layer(mod: str, base: nn.Linear, adapters: list[dict], state: MixtureState) -> FusedLoRALinear:
    """All adapters' A and scaled B of one module, stacked and zero-padded to the largest rank."""
    n = len(adapters)
    ranks = [a["modules"][mod][0].shape[0] if mod in a["modules"] else 0 for a in adapters]
    A = torch.zeros(n, max(ranks), base.in_features)
    Bt = torch.zeros(n, max(ranks), base.out_features)
    for i, a in enumerate(adapters):
        if mod in a["modules"]:
            Ai, Bi, s = a["modules"][mod]
            A[i, :ranks[i]] = Ai
            Bt[i, :ranks[i]] = (Bi * s).t()
    wdt, wdev = base.weight.dtype, base.weight.device
    return FusedLoRALinear(base, A.to(wdev, wdt), Bt.to(wdev, wdt), ranks, state, name=mod)


def make_random_adapter(model: nn.Module, out_dir: str | os.PathLike, rank: int = 8, alpha: float = 16,
                        target_modules: Sequence[str] | str = ("q_proj", "v_proj"), seed: int = 0,
                        use_rslora: bool = False, task: str | None = None, overwrite: bool = True) -> Path:
    """Write a PEFT-format LoRA adapter with non-zero random A and B (``init_lora_weights=False``) for ``model``,
    plus ``dlp_task.json`` ``{"task": ...}``. The model is left exactly as it was (PEFT layers are unloaded)."""
    from peft import LoraConfig, get_peft_model

    from .models import model_identity

    if any(isinstance(m, FusedLoRALinear) for m in model.modules()):
        raise DLPError("model: detach the fused adapters before making a random adapter")
    out = Path(out_dir)
    targets = target_modules if isinstance(target_modules, str) else list(target_modules)
    cfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, use_rslora=use_rslora,
                     init_lora_weights=False, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")
    had_cfg = "peft_config" in model.__dict__
    was_training = model.training
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        pm = get_peft_model(model, cfg)
    try:
        with torch.no_grad():  # make B clearly non-zero and seed-determined on every device
            gen = torch.Generator().manual_seed(seed + 1)
            for name, p in pm.named_parameters():
                if "lora_B" in name:
                    p.copy_((torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[1])).to(p.dtype))
        with atomic_dir(out, overwrite=overwrite) as tmp:
            pm.save_pretrained(str(tmp), safe_serialization=True)
            atomic_write_json(tmp / TASK_FILE, {"task": task or out.name, "base_model": model_identity(model),
                                                "random": True, "seed": seed})
    finally:
        pm.unload()
        if not had_cfg and "peft_config" in model.__dict__:
            del model.__dict__["peft_config"]
        model.train(was_training)
    return out
