"""Model loading: tiny model, default model (slow), hub-download code against a local cache, errors."""

import json

import pytest

from conftest import assert_one_line_error
from dlp_lora.config import DLPError
from dlp_lora.models import (eos_token_ids, load_model, model_identity, resolve_model_path, download_model)


def test_tiny_model_loads_with_transformers(tiny_model_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    m = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    tok = AutoTokenizer.from_pretrained(tiny_model_path)
    assert m.config.hidden_size <= 64 and m.config.num_hidden_layers == 2
    assert m.config.vocab_size == len(tok)


def test_load_model_reads_ids_from_config(tiny):
    model, tok = tiny
    assert not model.training
    assert tok.padding_side == "left" and tok.pad_token is not None
    assert eos_token_ids(model, tok) == [tok.eos_token_id]
    ident = model_identity(model)
    assert ident["vocab_size"] == len(tok) and ident["num_hidden_layers"] == 2


def test_context_length_from_config(tiny):
    from types import SimpleNamespace

    from dlp_lora.models import context_length

    model, _ = tiny
    assert context_length(model) == model.config.max_position_embeddings == 2048
    assert context_length(SimpleNamespace(n_positions=1024)) == 1024            # GPT-2 style configs
    assert context_length(SimpleNamespace(hidden_size=64)) is None


def test_cli_models_tiny(tmp_path, cli):
    res = cli("models", "tiny", "--out", tmp_path / "m")
    assert res.code == 0, res
    assert json.loads((tmp_path / "m" / "config.json").read_text())["num_hidden_layers"] == 2
    first = {f.name: f.read_bytes() for f in (tmp_path / "m").iterdir()}
    # a second run onto the same output, other weights, no --overwrite: refused in one line, bytes unchanged
    assert_one_line_error(cli("models", "tiny", "--out", tmp_path / "m", "--seed", "1"), "m", "already exists")
    assert {f.name: f.read_bytes() for f in (tmp_path / "m").iterdir()} == first
    assert cli("models", "tiny", "--out", tmp_path / "m", "--seed", "1", "--overwrite").code == 0
    assert (tmp_path / "m" / "model.safetensors").read_bytes() != first["model.safetensors"]
    assert_one_line_error(cli("models", "tiny", "--out", "/"), "file-system root")
    assert_one_line_error(cli("models", "tiny", "--out", tmp_path / "x", "--seed", str(2**64)), "--seed",
                          "[0, 4294967295]", code=2)


def test_bad_model_paths(tmp_path):
    with pytest.raises(DLPError, match="not found"):
        resolve_model_path(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DLPError, match="no config.json"):
        resolve_model_path(tmp_path / "empty")


def test_download_code_uses_local_hub_cache(tmp_path, monkeypatch, tiny_model_path):
    """The real download path (huggingface_hub.snapshot_download), exercised offline against a local cache."""
    import shutil

    cache = tmp_path / "hub"
    snap = cache / "models--acme--tiny" / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    for f in tiny_model_path.iterdir():
        shutil.copy(f, snap / f.name)
    (cache / "models--acme--tiny" / "refs").mkdir()
    (cache / "models--acme--tiny" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    path = download_model("acme/tiny", local_files_only=True)
    assert (path / "config.json").is_file()
    model, tok = load_model(path, device="cpu")
    assert model.config.num_hidden_layers == 2
    with pytest.raises(DLPError, match="not in the local Hugging Face cache"):
        download_model("acme/absent", local_files_only=True)


@pytest.mark.slow
def test_default_model_prepares_offline_and_loads_fast():
    import time

    path = resolve_model_path("default")
    t = time.time()
    model, tok = load_model(path, device="cpu")
    elapsed = time.time() - t  # informative only: speed is measured in the benchmark, not asserted
    print(f"default model load: {elapsed:.2f}s")
    assert model.config.vocab_size == len(tok)
    assert eos_token_ids(model, tok)
