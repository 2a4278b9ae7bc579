"""Transformer routers: ``albert`` and ``distilroberta`` via ``AutoModelForSequenceClassification`` (DESIGN §5).

* ``pretrained`` (a local checkpoint folder): loaded with its own tokenizer when the folder has one, and a new
  classification head of ``num_labels`` outputs.
* otherwise built from a small config (ALBERT / a 6-layer RoBERTa = DistilRoBERTa's shape, narrower). Departure:
  the original code fine-tuned pretrained ALBERT/DistilRoBERTa with their own tokenizers; offline we have no
  such checkpoint, so a from-scratch router uses the *base LLM's tokenizer* (vocabulary read from it) and a
  leading BOS/EOS token in place of ``[CLS]``/``<s>``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..config import DLPError, RouterConfig

HF_KINDS = {"albert": "albert", "distilroberta": "roberta"}     # router kind -> transformers model_type


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "spiece.model",
                                                  "vocab.json"))


def build_hf_router(config: RouterConfig, num_labels: int, base_tokenizer):
    """``(model, tokenizer, tokenizer_source)`` for a new albert/distilroberta router.
    ``tokenizer_source`` is "base" (the LLM's tokenizer) or "pretrained" (the checkpoint's own)."""
    from transformers import AlbertConfig, AutoModelForSequenceClassification, RobertaConfig

    kind = config.kind
    if kind not in HF_KINDS:
        raise DLPError(f"unknown router type {kind!r} (choose mlp, albert or distilroberta)")
    if config.pretrained:
        path = Path(config.pretrained).expanduser()
        if not (path / "config.json").is_file():
            raise DLPError(f"{path}: not a Hugging Face checkpoint folder (no config.json)")
        try:
            model = AutoModelForSequenceClassification.from_pretrained(
                path, num_labels=num_labels, ignore_mismatched_sizes=True, use_safetensors=True)
        except Exception as e:
            raise DLPError(f"{path}: cannot load a sequence classifier ({e.__class__.__name__}: "
                           f"{str(e).splitlines()[0][:200] if str(e) else ''})") from None
        if model.config.model_type != HF_KINDS[kind]:
            raise DLPError(f"{path}: model_type is {model.config.model_type!r}, but --router {kind} needs "
                           f"{HF_KINDS[kind]!r}")
        if _has_tokenizer(path):
            from transformers import AutoTokenizer

            try:
                tok = AutoTokenizer.from_pretrained(path)
            except Exception as e:
                raise DLPError(f"{path}: cannot load its tokenizer ({e.__class__.__name__})") from None
            return model, tok, "pretrained"
        if model.config.vocab_size < len(base_tokenizer):
            raise DLPError(f"{path}: has no tokenizer and its vocabulary ({model.config.vocab_size}) is smaller than "
                           f"the base tokenizer's ({len(base_tokenizer)})")
        return model, base_tokenizer, "base"
    vocab = len(base_tokenizer)
    pad = base_tokenizer.pad_token_id if base_tokenizer.pad_token_id is not None else 0
    hidden = config.hf_hidden_dim
    heads = max(1, min(config.hf_heads, hidden))
    if kind == "albert":
        cfg = AlbertConfig(vocab_size=vocab, embedding_size=min(128, hidden), hidden_size=hidden,
                           num_hidden_layers=config.hf_layers or 4, num_attention_heads=heads,
                           intermediate_size=4 * hidden, max_position_embeddings=config.max_tokens + 2,
                           pad_token_id=pad, num_labels=num_labels, classifier_dropout_prob=0.1)
    else:
        # RoBERTa numbers positions from pad_token_id + 1 (see hf_logits), hence the larger table.
        cfg = RobertaConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=config.hf_layers or 6,
                            num_attention_heads=heads, intermediate_size=4 * hidden,
                            max_position_embeddings=config.max_tokens + pad + 2, type_vocab_size=1,
                            pad_token_id=pad, num_labels=num_labels)
    if hidden % heads:
        raise DLPError(f"hf_hidden_dim ({hidden}) must be divisible by hf_heads ({heads})")
    torch.manual_seed(config.seed)
    model = AutoModelForSequenceClassification.from_config(cfg)
    return model, base_tokenizer, "base"


def special_ids(tokenizer, source: str) -> tuple[list[int], list[int]]:
    """Tokens wrapped around every text: the checkpoint's [CLS]/[SEP] (<s>/</s>) for a pretrained tokenizer,
    else one BOS (or EOS) token whose final hidden state the classification head reads."""
    if source == "pretrained":
        cls = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id
        sep = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
        return ([cls] if cls is not None else []), ([sep] if sep is not None else [])
    first = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    return ([first] if first is not None else []), []


def hf_logits(model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Logits of a sequence classifier on right-padded ids; positions are passed explicitly so padding ids
    that also occur in text never shift RoBERTa's positions."""
    width = ids.shape[1]
    pos = torch.arange(width, device=ids.device)
    if model.config.model_type == "roberta":
        pos = pos + model.config.pad_token_id + 1
    pos = pos.unsqueeze(0).expand_as(ids)
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, token_type_ids=torch.zeros_like(ids))
    return out.logits


def rebuild_hf_router(hf_dir: Path):
    """An empty model of the saved architecture (weights are loaded from router.safetensors afterwards)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    try:
        cfg = AutoConfig.from_pretrained(hf_dir)
    except Exception as e:
        raise DLPError(f"{hf_dir}: cannot read the router's model config ({e.__class__.__name__})") from None
    return AutoModelForSequenceClassification.from_config(cfg)
