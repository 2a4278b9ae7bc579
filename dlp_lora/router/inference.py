"""The trained router at inference time: ``Router.load(folder).probs(texts) -> (B, N)``.

Its own module so that inference code (pipeline, server, web app) never imports the training code.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch

from ..config import DLPError, RouterConfig, config_from_dict, read_json_file
from .labels import LABELS_FILE, check_label_order, read_labels
from .hf import hf_logits, rebuild_hf_router, special_ids
from .mlp import MiniMLPRouter, TokenEncoder, count_params

ROUTER_WEIGHTS = "router.safetensors"
ROUTER_FILES = ("config.json", LABELS_FILE, ROUTER_WEIGHTS, "tokenizer")


def pad_id(model, kind: str) -> int:
    if kind == "mlp":
        return 0
    pad = model.config.pad_token_id
    return int(pad) if pad is not None else 0


def read_router_config(path: Path) -> RouterConfig:
    """A router folder's ``config.json``. Routers saved before head pooling existed have no ``head_tokens``
    field and were trained without it (0), which is not the default for new routers."""
    data = read_json_file(path)
    if isinstance(data, dict) and data.get("kind", "mlp") == "mlp":
        data = {"head_tokens": 0, **data}
    return config_from_dict(RouterConfig, data, str(path))


class Router:
    """A trained router: ``probs(texts) -> (B, N)`` float32 CPU tensor, rows sum to 1; ``labels`` in adapter order."""

    def __init__(self, model, tokenizer, labels: list[str], config: RouterConfig, path: Path | None = None,
                 device: str = "cpu") -> None:
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer
        self.labels = list(labels)
        self.config = config
        self.kind = config.kind
        # probs = softmax(logits / temperature): fitted on the validation split at training time
        self.temperature = float(config.temperature)
        self.path = path
        self.device = device
        # The base-model tokenizer identity this router depends on (the pipeline compares it with its base
        # model's). None for a router with its own pretrained tokenizer: it reads text, not the base vocabulary.
        self.tokenizer_id = config.tokenizer if config.tokenizer_source == "base" else None
        if self.kind == "mlp":
            self.encoder = TokenEncoder(tokenizer, config.max_tokens)
        else:
            prefix, suffix = special_ids(tokenizer, config.tokenizer_source)
            self.encoder = TokenEncoder(tokenizer, config.max_tokens, prefix, suffix)
        self._pad = pad_id(model, self.kind)

    # -- loading ---------------------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | os.PathLike, device: str = "cpu", expect_tokenizer=None) -> "Router":
        """Load a router folder. ``expect_tokenizer`` (a tokenizer or its ``tokenizer_identity`` string): refuse a
        router trained on another vocabulary than the base model's (mini-MLP / from-scratch routers)."""
        from transformers import AutoTokenizer

        from ..models import tokenizer_identity

        path = Path(path)
        if not path.is_dir():
            raise DLPError(f"{path}: router folder not found")
        for f in ROUTER_FILES:
            if not (path / f).exists():
                raise DLPError(f"{path}: not a router folder (missing {f})")
        config = read_router_config(path / "config.json")
        labels = read_labels(path / LABELS_FILE)
        if config.num_labels != len(labels):
            raise DLPError(f"{path / 'config.json'}: field 'num_labels': {config.num_labels}, but labels.json has "
                           f"{len(labels)} tasks")
        if expect_tokenizer is not None and config.tokenizer_source == "base":
            want = expect_tokenizer if isinstance(expect_tokenizer, str) else tokenizer_identity(expect_tokenizer)
            if want != config.tokenizer:
                raise DLPError(f"{path}: router was trained with another tokenizer/vocabulary ({config.tokenizer}) "
                               f"than the base model's ({want}); train a router with this base model")
        try:
            tok = AutoTokenizer.from_pretrained(path / "tokenizer")
        except Exception as e:
            raise DLPError(f"{path / 'tokenizer'}: cannot load the router's tokenizer ({e.__class__.__name__})") from None
        if len(tok) != config.vocab_size:
            raise DLPError(f"{path / 'tokenizer'}: vocabulary {len(tok)} differs from config.json's vocab_size "
                           f"{config.vocab_size}")
        if config.kind == "mlp":
            model = MiniMLPRouter(config.vocab_size, config.num_labels, config.embed_dim, config.hidden_dim,
                                  config.mlp_dropout, config.activation, pooling=config.pooling,
                                  head_tokens=config.head_tokens)
        else:
            model = rebuild_hf_router(path / "hf")
        from safetensors.torch import load_model

        try:
            missing, unexpected = load_model(model, str(path / ROUTER_WEIGHTS), strict=False, device="cpu")
        except Exception as e:
            raise DLPError(f"{path / ROUTER_WEIGHTS}: cannot load the router weights ({e.__class__.__name__}: "
                           f"{str(e).splitlines()[0][:160] if str(e) else ''})") from None
        if missing or unexpected:
            what = f"missing {sorted(missing)[0]!r}" if missing else f"unexpected {sorted(unexpected)[0]!r}"
            raise DLPError(f"{path / ROUTER_WEIGHTS}: weights do not match config.json ({what})")
        return cls(model, tok, labels, config, path, device)

    # -- inference -------------------------------------------------------------------------------------------
    def logits(self, texts: str | Sequence[str], batch_size: int = 4096) -> torch.Tensor:
        """Raw logits ``(B, N)`` float32 on CPU (before the temperature; the argmax is the same)."""
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        n = len(self.labels)
        if not texts:
            return torch.zeros(0, n)
        outs = []
        with torch.inference_mode():
            for i in range(0, len(texts), batch_size):
                chunk = texts[i: i + batch_size]
                if self.kind == "mlp":
                    ids, offsets = self.encoder.flat(chunk)
                    outs.append(self.model(ids.to(self.device), offsets.to(self.device)))
                else:
                    enc = self.encoder.encode(chunk)
                    ids, mask = enc.padded(torch.arange(len(chunk)), self._pad)
                    outs.append(hf_logits(self.model, ids.to(self.device), mask.to(self.device)))
        out = outs[0] if len(outs) == 1 else torch.cat(outs)
        return out.float().cpu()

    def probs(self, texts: str | Sequence[str], batch_size: int = 1024) -> torch.Tensor:
        """Task probabilities ``(B, N)`` float32 on CPU; each row sums to 1.

        The mini-MLP takes a lean path (the routing latency of every request): one tokeniser call per chunk of
        ``batch_size`` texts (chunks keep memory flat for large batches), flat ids + offsets, and the functional
        eval forward :meth:`MiniMLPRouter.infer` (no module dispatch, no dropout calls) under inference mode."""
        if self.kind != "mlp":
            with torch.inference_mode():
                return torch.softmax(self.logits(texts, batch_size) / self.temperature, dim=-1)
        if isinstance(texts, str):
            texts = [texts]
        elif not isinstance(texts, list):
            texts = list(texts)
        if not texts:
            return torch.zeros(0, len(self.labels))
        with torch.inference_mode():
            enc = self.encoder
            if len(texts) == 1 and enc._backend is not None and not (enc.prefix or enc.suffix):
                # batch 1 (the per-request latency path): one tokeniser call, one tensor, a cached offsets tensor
                row = enc._backend.encode_batch_fast(texts, add_special_tokens=False)[0].ids[: enc.max_tokens]
                ids = torch.tensor(row, dtype=torch.int64)
                if str(self.device) != "cpu":
                    ids = ids.to(self.device)
                logits = self.model.infer(ids, self._zero_offset(ids.device)).float()
                return torch.softmax(logits / self.temperature if self.temperature != 1.0 else logits, dim=-1).cpu()
            outs = []
            for i in range(0, len(texts), batch_size):
                ids, offsets = self.encoder.flat(texts[i: i + batch_size] if len(texts) > batch_size else texts)
                if str(self.device) != "cpu":
                    ids, offsets = ids.to(self.device), offsets.to(self.device)
                logits = self.model.infer(ids, offsets).float()
                outs.append(torch.softmax(logits / self.temperature if self.temperature != 1.0 else logits, dim=-1))
            out = outs[0] if len(outs) == 1 else torch.cat(outs)
            return out.cpu() if out.device.type != "cpu" else out

    def _zero_offset(self, device) -> torch.Tensor:
        """The offsets ``[0]`` of a one-text batch, made once (read-only use by the forward)."""
        off = self.__dict__.get("_off0")
        if off is None or off.device != device:
            with torch.inference_mode(False):
                off = torch.zeros(1, dtype=torch.int64, device=device)
            self._off0 = off
        return off

    def predict(self, texts: str | Sequence[str]) -> list[str]:
        """The most probable task name per text."""
        return [self.labels[i] for i in self.logits(texts).argmax(-1).tolist()]

    def check_labels(self, names: Sequence[str]) -> None:
        """DLPError naming the first difference when ``names`` (adapter task names, in order) differ from labels."""
        check_label_order(self.labels, list(names), str(self.path or "router"))

    @property
    def num_params(self) -> int:
        return count_params(self.model)

    def __repr__(self) -> str:
        return f"Router(kind={self.kind!r}, labels={len(self.labels)}, path={str(self.path)!r})"
