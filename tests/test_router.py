"""Router data maker, mini-MLP / HF routers, training, save -> load, CLI errors."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from conftest import assert_one_line_error
from dlp_lora.config import DLPError, RouterConfig, RouterDataConfig
from dlp_lora.data import split_sentences
from dlp_lora.router import MiniMLPRouter, Router, make_router_data, merge_router_files, train_router
from dlp_lora.router.data import read_router_data

SPLITS = ("train", "val", "test")

# Four clearly separable toy tasks, generated deterministically (distinct vocabularies per task).
_GEN = {
    "arith": lambda r, i: f"What is {r.randint(1, 999)} plus {r.randint(1, 999)}? Add the two numbers.",
    "capital": lambda r, i: f"Which city is the capital of {r.choice(['France', 'Peru', 'Japan', 'Kenya', 'Chile'])} "
                            f"number {i}? Name the capital.",
    "sentiment": lambda r, i: f"Review {i}: the film was {r.choice(['great', 'awful', 'boring', 'lovely'])}. "
                              "Is the review positive or negative?",
    "translate": lambda r, i: f"Translate into German: the {r.choice(['cat', 'dog', 'house', 'tree'])} is "
                              f"{r.choice(['red', 'big', 'old'])} {i}.",
}


def write_toy_tasks(folder: Path, sizes: dict[str, int] | None = None, seed: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for name, gen in _GEN.items():
        n = (sizes or {}).get(name, 60)
        recs = [{"Q": gen(rng, i), "A": "x"} for i in range(n)]
        (folder / f"{name}.json").write_text(json.dumps(recs))
    return folder


def read_split(d: Path, split: str) -> list[dict]:
    return [json.loads(l) for l in (d / f"{split}.jsonl").read_text().splitlines() if l.strip()]


@pytest.fixture
def toy(tmp_path) -> Path:
    return write_toy_tasks(tmp_path / "tasks")


# ----------------------------------------------------------------------------------------------------------------
# Router data
# ----------------------------------------------------------------------------------------------------------------

def test_router_data_balanced_no_leakage_label_order(toy, tmp_path):
    out = make_router_data(tmp_path / "rd", data_dir=toy, config=RouterDataConfig(per_task=40), progress=False)
    labels = json.loads((out / "labels.json").read_text())
    assert labels == ["arith", "capital", "sentiment", "translate"]          # file-name order
    rows = {s: read_split(out, s) for s in SPLITS}
    for s in SPLITS:
        counts = {t: sum(r["task"] == t for r in rows[s]) for t in labels}
        assert len(set(counts.values())) == 1, (s, counts)                   # balanced in every split
        assert all(labels[r["label"]] == r["task"] for r in rows[s])
    assert [len(rows[s]) for s in SPLITS] == [4 * 32, 4 * 4, 4 * 4]
    texts = {s: {r["text"] for r in rows[s]} for s in SPLITS}
    assert not (texts["train"] & texts["val"]) and not (texts["train"] & texts["test"]) and not (texts["val"] & texts["test"])
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["per_task"] == 40 and cfg["granularity"] == "prompt"
    assert read_router_data(out)[0] == labels


def test_router_data_deterministic_and_seeded(toy, tmp_path):
    a = make_router_data(tmp_path / "a", data_dir=toy, progress=False)
    b = make_router_data(tmp_path / "b", data_dir=toy, progress=False)
    c = make_router_data(tmp_path / "c", data_dir=toy, config=RouterDataConfig(seed=1), progress=False)
    for s in SPLITS:
        assert (a / f"{s}.jsonl").read_bytes() == (b / f"{s}.jsonl").read_bytes()
    assert (a / "test.jsonl").read_bytes() != (c / "test.jsonl").read_bytes()


def test_default_per_task_is_smallest_and_unequal_warning(tmp_path, capsys):
    toy = write_toy_tasks(tmp_path / "t", sizes={"arith": 200, "capital": 30, "sentiment": 40, "translate": 50})
    out = make_router_data(tmp_path / "rd", data_dir=toy, progress=False)
    assert json.loads((out / "config.json").read_text())["per_task"] == 30
    assert "very unequal" in capsys.readouterr().err
    counts = json.loads((out / "stats.json").read_text())["per_task_records"]
    assert {c["train"] for c in counts.values()} == {24}


def test_task_with_fewer_records_than_requested(toy, tmp_path):
    with pytest.raises(DLPError, match="arith.*fewer than the 100"):
        make_router_data(tmp_path / "rd", data_dir=toy, config=RouterDataConfig(per_task=100), progress=False)
    assert not (tmp_path / "rd").exists()                                    # nothing half written


def test_question_shared_by_two_tasks_stays_in_one_split(tmp_path):
    d = tmp_path / "t"
    d.mkdir()
    shared = [f"Shared question {i}?" for i in range(10)]
    (d / "a.json").write_text(json.dumps([{"Q": q, "A": "1"} for q in shared] + [{"Q": f"A only {i}?", "A": "1"} for i in range(10)]))
    (d / "b.json").write_text(json.dumps([{"Q": f"B only {i}?", "A": "1"} for i in range(10)] + [{"Q": q, "A": "1"} for q in shared]))
    out = make_router_data(tmp_path / "rd", data_dir=d, config=RouterDataConfig(val_frac=0.2, test_frac=0.2), progress=False)
    where: dict[str, set] = {}
    for s in SPLITS:
        for r in read_split(out, s):
            where.setdefault(r["text"], set()).add(s)
    assert all(len(v) == 1 for v in where.values())
    assert json.loads((out / "stats.json").read_text())["shared_question_texts"] == 10


def test_sentence_granularity_and_composite(toy, tmp_path):
    cfg = RouterDataConfig(granularity="sentence", composite=30, val_frac=0.2, test_frac=0.2)
    out = make_router_data(tmp_path / "rd", data_dir=toy, config=cfg, progress=False)
    tasks = {p.stem: json.loads(p.read_text()) for p in toy.glob("*.json")}
    sentences = {t: {s for r in recs for s in split_sentences(r["Q"])} for t, recs in tasks.items()}
    seen: dict[str, str] = {}
    for s in SPLITS:
        rows = read_split(out, s)
        assert rows
        for r in rows:
            assert r["text"] in sentences[r["task"]]                         # every record is one sentence
            assert seen.setdefault(r["text"], s) == s                        # and no sentence in two splits
    # generic sentences are kept (once), e.g. the shared instruction of the arith task
    assert "Add the two numbers." in seen
    comp = read_split(out, "test_composite")
    assert len(comp) == 30
    labels = json.loads((out / "labels.json").read_text())
    for r in comp:
        assert 2 <= len(r["tasks"]) <= 3 and len(set(r["tasks"])) == len(r["tasks"])
        assert [labels[i] for i in r["labels"]] == r["tasks"] and r["task"] == r["tasks"][0]


def _fake_adapters(tmp_path: Path, toy: Path, order: list[str]) -> Path:
    run = tmp_path / "run"
    for name in order:
        d = run / "adapters" / name
        d.mkdir(parents=True)
        (d / "dlp_task.json").write_text(json.dumps({"task": name, "data_file": str(toy / f"{name}.json")}))
    (run / "adapters.txt").write_text("".join(f"adapters/{n}\n" for n in order))
    return run


def test_adapters_list_defines_label_order(toy, tmp_path):
    order = ["translate", "arith", "sentiment", "capital"]
    run = _fake_adapters(tmp_path, toy, order)
    out = make_router_data(tmp_path / "rd", adapters=run / "adapters.txt", config=RouterDataConfig(per_task=20),
                           progress=False)
    assert json.loads((out / "labels.json").read_text()) == order
    assert all(order[r["label"]] == r["task"] for r in read_split(out, "train"))


def test_merge_router_files_reindexes_by_task(toy, tmp_path):
    d1 = tmp_path / "t1"
    d1.mkdir()
    d2 = tmp_path / "t2"
    d2.mkdir()
    for n in ("arith", "capital"):
        (d1 / f"{n}.json").write_text((toy / f"{n}.json").read_text())
    for n in ("sentiment", "arith"):
        (d2 / f"{n}.json").write_text((toy / f"{n}.json").read_text())
    a = make_router_data(tmp_path / "a", data_dir=d1, progress=False)
    b = make_router_data(tmp_path / "b", data_dir=d2, config=RouterDataConfig(seed=3), progress=False)
    out = merge_router_files([a / "train.jsonl", b / "train.jsonl"], tmp_path / "f" / "train.jsonl")
    labels = json.loads((out.parent / "labels.json").read_text())
    assert labels == ["arith", "capital", "sentiment"]
    rows = read_split(out.parent, "train")
    assert all(labels[r["label"]] == r["task"] for r in rows)
    assert len({(r["text"], r["task"]) for r in rows}) == len(rows)
    # folders: every split merged, labels consistent
    merged = merge_router_files([a, b], tmp_path / "fd")
    assert read_router_data(merged)[0] == ["arith", "capital", "sentiment"]


def test_merge_never_loses_data(toy, tmp_path, cli):
    """An existing output is kept unless --overwrite; the output is never an input (nor holds one); a labels.json
    that belongs to files already in the output's folder is never rewritten."""
    a = make_router_data(tmp_path / "a", data_dir=toy, config=RouterDataConfig(per_task=20), progress=False)
    b = make_router_data(tmp_path / "b", data_dir=toy, config=RouterDataConfig(per_task=20, seed=1), progress=False)
    out = tmp_path / "m" / "train.jsonl"
    assert cli("make-router-data", "--merge", a / "train.jsonl", b / "train.jsonl", "--out", out).code == 0
    before = out.read_bytes()
    res = cli("make-router-data", "--merge", a / "val.jsonl", b / "val.jsonl", "--out", out)
    assert_one_line_error(res, str(out), "already exists", "--overwrite")
    assert out.read_bytes() == before
    assert cli("make-router-data", "--merge", a / "val.jsonl", b / "val.jsonl", "--out", out, "--overwrite").code == 0
    assert out.read_bytes() != before
    res = cli("make-router-data", "--merge", a / "train.jsonl", b / "train.jsonl", "--out", a / "train.jsonl",
              "--overwrite")
    assert_one_line_error(res, "is one of the inputs")
    res = cli("make-router-data", "--merge", a, b, "--out", tmp_path, "--overwrite")      # a folder holding inputs
    assert_one_line_error(res, "is one of the inputs")
    assert read_router_data(a)[0] == ["arith", "capital", "sentiment", "translate"]
    # a labels.json beside the output that does not list every merged task is refused, never rewritten
    other = tmp_path / "other"
    other.mkdir()
    (other / "labels.json").write_text('["arith"]')
    res = cli("make-router-data", "--merge", a / "test.jsonl", b / "test.jsonl", "--out", other / "test.jsonl")
    assert_one_line_error(res, "labels.json", "capital")
    assert (other / "labels.json").read_text() == '["arith"]' and not (other / "test.jsonl").exists()
    # folders: refused onto an existing folder without --overwrite; the former --fuse spelling still works
    res = cli("make-router-data", "--merge", a, b, "--out", tmp_path / "m")
    assert_one_line_error(res, "already exists")
    assert cli("make-router-data", "--fuse", a, b, "--out", tmp_path / "fd").code == 0
    assert read_router_data(tmp_path / "fd")[0] == ["arith", "capital", "sentiment", "translate"]


def test_make_router_data_never_writes_over_its_inputs(toy, tmp_path, cli):
    before = {p.name: p.read_bytes() for p in toy.iterdir()}
    res = cli("make-router-data", "--data-dir", toy, "--out", toy, "--overwrite")
    assert_one_line_error(res, "is one of the inputs")
    res = cli("make-router-data", "--data-dir", toy, "--out", toy.parent, "--overwrite")     # a folder holding it
    assert_one_line_error(res, "is one of the inputs")
    assert {p.name: p.read_bytes() for p in toy.iterdir()} == before
    run = _fake_adapters(tmp_path, toy, ["arith", "capital"])
    res = cli("make-router-data", "--adapters", run, "--out", run, "--overwrite")
    assert_one_line_error(res, "is one of the inputs")
    assert (run / "adapters.txt").is_file()


# ----------------------------------------------------------------------------------------------------------------
# Mini-MLP
# ----------------------------------------------------------------------------------------------------------------

def test_mini_mlp_size_and_bag_mean(tiny):
    _, tok = tiny
    m = MiniMLPRouter(len(tok), 26)                                        # the paper's 26 tasks
    n = sum(p.numel() for p in m.parameters())
    print(f"MiniMLPRouter params with vocab {len(tok)}: {n:,}")
    assert 4_500_000 < n < 5_500_000
    assert sum(isinstance(x, torch.nn.Linear) for x in m.mlp) == 4
    m.eval()
    ids = torch.tensor([5, 9, 11, 7, 7])
    offsets = torch.tensor([0, 3])
    with torch.no_grad():
        out = m(ids, offsets)
        ref = torch.stack([m.mlp(m.embed.weight[[5, 9, 11]].mean(0)), m.mlp(m.embed.weight[[7, 7]].mean(0))])
    assert torch.allclose(out, ref, atol=1e-5)


def test_mean_max_pooling_and_augmentations():
    from dlp_lora.router.mlp import Encoded, drop_tokens

    m = MiniMLPRouter(100, 3, 8, 16, pooling="mean+max").eval()
    ids, offsets = torch.tensor([5, 9, 11, 7, 7]), torch.tensor([0, 3, 5])      # third text is empty
    w = m.embed.weight
    with torch.no_grad():
        ref = torch.stack([m.mlp(torch.cat([w[[5, 9, 11]].mean(0), w[[5, 9, 11]].max(0).values])),
                           m.mlp(torch.cat([w[[7, 7]].mean(0), w[[7, 7]].max(0).values])), m.mlp(torch.zeros(16))])
        assert torch.allclose(m(ids, offsets), ref, atol=1e-6)
    g = torch.Generator().manual_seed(0)
    ids = torch.arange(40)
    offsets = torch.tensor([0, 10, 30])
    new_ids, new_off = drop_tokens(ids, offsets, 0.5, g)
    assert len(new_ids) < 40 and new_off.tolist()[0] == 0
    assert set(ids[offsets].tolist()) <= set(new_ids.tolist())                  # first tokens always kept
    bags = torch.tensor_split(new_ids, new_off[1:].tolist())
    assert all(set(b.tolist()) <= set(range(lo, hi)) for b, lo, hi in zip(bags, [0, 10, 30], [10, 30, 40]))
    enc = Encoded(ids, torch.tensor([0, 10, 30]), torch.tensor([10, 20, 10]))
    assert [t.tolist() for t in enc.cropped(torch.tensor([2, 0]), 0.0)] == [t.tolist() for t in enc.flat(torch.tensor([2, 0]))]
    for _ in range(20):
        c_ids, c_off = enc.cropped(torch.tensor([1]), 1.0, min_tokens=8, generator=g)
        span = c_ids.tolist()
        assert len(span) >= 8 and span == list(range(span[0], span[0] + len(span))) and 10 <= span[0] and span[-1] < 30


# ----------------------------------------------------------------------------------------------------------------
# Training, save -> load
# ----------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_path):
    """A mini-MLP router trained on four separable built-in tasks (tiny model's tokenizer)."""
    from dlp_lora.tasks import write_builtin_tasks

    base = tmp_path_factory.mktemp("router")
    tasks = base / "tasks"
    write_builtin_tasks(tasks, n=80, seed=0, tasks=["arithmetic", "word_sorting", "capitals", "counting"])
    data = make_router_data(base / "rd", data_dir=tasks, config=RouterDataConfig(composite=20), progress=False)
    out = train_router(data, tiny_model_path, base / "router", RouterConfig(epochs=8, patience=3), progress=False)
    return data, out


def test_training_reaches_high_accuracy_and_writes_artifacts(trained):
    data, out = trained
    for f in ("router.safetensors", "config.json", "labels.json", "tokenizer", "metrics.json", "confusion.png"):
        assert (out / f).exists(), f
    m = json.loads((out / "metrics.json").read_text())
    assert m["test_accuracy"] >= 0.9 and m["val_accuracy"] >= 0.9
    assert set(m["per_task_accuracy"]) == set(json.loads((data / "labels.json").read_text()))
    assert sum(map(sum, m["confusion"])) == m["records"]["test"]
    assert 0 <= m["composite"]["recall_at_k"] <= 1
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["vocab_size"] == 49152 and cfg["num_labels"] == 4 and cfg["tokenizer"].startswith("49152:")
    assert (out / "confusion.png").read_bytes()[:4] == b"\x89PNG"


def test_save_load_identical_probs(trained, tiny):
    data, out = trained
    r1, r2 = Router.load(out), Router.load(out, expect_tokenizer=tiny[1])
    rows = read_split(data, "test")
    texts = [r["text"] for r in rows]
    p1, p2 = r1.probs(texts), r2.probs(texts)
    assert p1.dtype == torch.float32 and p1.shape == (len(texts), 4)
    assert torch.equal(p1, p2)
    assert torch.allclose(p1.sum(-1), torch.ones(len(texts)), atol=1e-5)
    # batching does not change results: each row alone == the batch row
    for i in range(0, len(texts), 7):
        assert torch.allclose(r1.probs([texts[i]])[0], p1[i], atol=1e-6)
    # the loaded router reproduces the test accuracy recorded at training time exactly
    acc = sum(p == r["task"] for p, r in zip(r1.predict(texts), rows)) / len(rows)
    assert acc == pytest.approx(json.loads((out / "metrics.json").read_text())["test_accuracy"], abs=1e-6)
    assert r1.labels == json.loads((data / "labels.json").read_text())
    assert r1.tokenizer_id == json.loads((out / "config.json").read_text())["tokenizer"]
    r1.check_labels(r1.labels)
    with pytest.raises(DLPError, match="position 1"):
        r1.check_labels([r1.labels[0], "other", *r1.labels[2:]])
    with pytest.raises(DLPError, match="labels"):
        r1.check_labels(r1.labels[:2])
    assert r1.probs([]).shape == (0, 4)


def test_lean_probs_equal_the_module_forward(trained, tmp_path, tiny_model_path, toy):
    """Router.probs' lean path (one tokeniser call, functional eval forward, chunked batches) gives the same
    probabilities (1e-6) as the module's standard forward in eval mode, for batch 1, a batch, chunked batches,
    an empty text, and a mean+max router; the module forward itself is unchanged."""
    data, out = trained
    r = Router.load(out)
    texts = [x["text"] for x in read_split(data, "test")] + ["", "x " * 400]

    def reference(router, texts):
        router.model.eval()
        rows = router.tokenizer(texts, add_special_tokens=False, truncation=True,
                                max_length=router.config.max_tokens)["input_ids"]
        lens = torch.tensor([len(x) for x in rows])
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)[:-1]])
        ids = torch.tensor([t for x in rows for t in x], dtype=torch.long)
        with torch.no_grad():
            return torch.softmax(router.model(ids, offsets) / router.temperature, -1)

    want = reference(r, texts)
    assert torch.allclose(r.probs(texts), want, atol=1e-6, rtol=0)
    assert torch.allclose(r.probs(texts, batch_size=5), want, atol=1e-6, rtol=0)   # chunked
    for i in (0, 3, len(texts) - 2, len(texts) - 1):                               # batch 1 (incl. empty, long)
        got = r.probs(texts[i])
        assert got.shape == (1, 4) and torch.allclose(got[0], want[i], atol=1e-6, rtol=0)
    assert torch.allclose(r.probs(tuple(texts[:3])), want[:3], atol=1e-6, rtol=0)
    assert not r.model.training
    # mean+max pooling takes the same functional path
    data2 = make_router_data(tmp_path / "rd", data_dir=toy, progress=False)
    out2 = train_router(data2, tiny_model_path, tmp_path / "mm",
                        RouterConfig(epochs=1, patience=1, pooling="mean+max"), progress=False)
    r2 = Router.load(out2)
    want2 = reference(r2, texts)
    assert torch.allclose(r2.probs(texts), want2, atol=1e-6, rtol=0)
    assert torch.allclose(r2.probs([texts[0]])[0], want2[0], atol=1e-6, rtol=0)


def test_router_from_another_tokenizer_is_refused(trained):
    _, out = trained
    with pytest.raises(DLPError, match="another tokenizer"):
        Router.load(out, expect_tokenizer="32000:0123456789abcdef")


def test_missing_or_corrupt_router_files(trained, tmp_path):
    import shutil

    _, out = trained
    for name, damage, needle in [
        ("nolabels", lambda d: (d / "labels.json").unlink(), "missing labels.json"),
        ("trunc", lambda d: (d / "router.safetensors").write_bytes((d / "router.safetensors").read_bytes()[:1000]),
         "router.safetensors"),
        ("badcfg", lambda d: (d / "config.json").write_text("{"), "config.json"),
        ("nlabels", lambda d: (d / "labels.json").write_text('["a", "b"]'), "num_labels"),
    ]:
        d = tmp_path / name
        shutil.copytree(out, d)
        damage(d)
        with pytest.raises(DLPError, match=needle):
            Router.load(d)
    with pytest.raises(DLPError, match="not found"):
        Router.load(tmp_path / "nothing")


def test_mean_max_router_trains_and_reloads(toy, tmp_path, tiny_model_path):
    data = make_router_data(tmp_path / "rd", data_dir=toy, config=RouterDataConfig(per_task=20), progress=False)
    cfg = RouterConfig(pooling="mean+max", crop_prob=0.3, epochs=2)
    out = train_router(data, tiny_model_path, tmp_path / "r", cfg, progress=False)
    r = Router.load(out)
    assert r.config.pooling == "mean+max" and r.model.mlp[0].in_features == (2 + 1) * cfg.embed_dim  # + head mean
    texts = [x["text"] for x in read_split(data, "test")]
    assert torch.equal(r.probs(texts), Router.load(out).probs(texts))


@pytest.mark.parametrize("kind", ["albert", "distilroberta"])
def test_hf_routers_train_save_load(kind, toy, tmp_path, tiny_model_path):
    data = make_router_data(tmp_path / "rd", data_dir=toy, config=RouterDataConfig(per_task=12), progress=False)
    cfg = RouterConfig(kind=kind, hf_hidden_dim=32, hf_layers=1, hf_heads=2, epochs=1, max_tokens=32,
                       learning_rate=1e-3)
    out = train_router(data, tiny_model_path, tmp_path / "r", cfg, progress=False)
    assert (out / "hf" / "config.json").is_file()
    m = json.loads((out / "metrics.json").read_text())
    assert m["kind"] == kind and m["epochs_run"] == 1
    texts = [r["text"] for r in read_split(data, "test")]
    p1, p2 = Router.load(out).probs(texts), Router.load(out).probs(texts)
    assert p1.shape == (len(texts), 4) and torch.equal(p1, p2)
    assert torch.allclose(Router.load(out).probs(texts[:1])[0], p1[0], atol=1e-5)   # padding does not leak


def test_albert_from_local_checkpoint(toy, tmp_path, tiny_model_path):
    from transformers import AlbertConfig, AlbertForSequenceClassification

    from dlp_lora.models import load_tokenizer

    tok = load_tokenizer(tiny_model_path)
    ckpt = tmp_path / "albert"
    AlbertForSequenceClassification(AlbertConfig(vocab_size=len(tok), embedding_size=16, hidden_size=32,
                                                 num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                                 max_position_embeddings=64, num_labels=2)).save_pretrained(ckpt)
    data = make_router_data(tmp_path / "rd", data_dir=toy, config=RouterDataConfig(per_task=12), progress=False)
    cfg = RouterConfig(kind="albert", pretrained=str(ckpt), epochs=1, max_tokens=32, learning_rate=1e-3)
    out = train_router(data, tiny_model_path, tmp_path / "r", cfg, progress=False)
    r = Router.load(out)
    assert r.probs(["What is 2 plus 3?"]).shape == (1, 4)
    with pytest.raises(DLPError, match="model_type"):
        train_router(data, tiny_model_path, tmp_path / "r2", RouterConfig(kind="distilroberta", pretrained=str(ckpt)),
                     progress=False)


# ----------------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------------

def test_cli_end_to_end(cli, toy, tmp_path, tiny_model_path):
    res = cli("make-router-data", "--data-dir", toy, "--out", tmp_path / "rd", "--per-task", "30",
              "--granularity", "prompt", "--seed", "1", "--no-progress")
    assert res.code == 0, res
    assert "4 tasks" in res.out
    res = cli("train-router", "--data", tmp_path / "rd", "--model", tiny_model_path, "--out", tmp_path / "router",
              "--epochs", "3", "--no-progress")
    assert res.code == 0, res
    assert "parameters:" in res.out and "confusion matrix:" in res.out and "sentiment" in res.out
    assert (tmp_path / "router" / "confusion.png").is_file()
    res = cli("train-router", "--data", tmp_path / "rd", "--model", tiny_model_path, "--out", tmp_path / "router")
    assert_one_line_error(res, "already exists")
    res = cli("make-router-data", "--merge", tmp_path / "rd" / "train.jsonl", tmp_path / "rd" / "val.jsonl",
              "--out", tmp_path / "merged" / "train.jsonl")
    assert res.code == 0, res
    assert json.loads((tmp_path / "merged" / "labels.json").read_text()) == \
        ["arith", "capital", "sentiment", "translate"]


def test_cli_bad_inputs(cli, toy, tmp_path, tiny_model_path):
    res = cli("make-router-data", "--data-dir", toy, "--out", tmp_path / "x", "--per-task", "500")
    assert_one_line_error(res, "arith", "fewer than")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.json").write_text(json.dumps([{"Q": "q?", "A": "a"}]))
    (empty / "b.json").write_text("[]")
    res = cli("make-router-data", "--data-dir", empty, "--out", tmp_path / "y")
    assert_one_line_error(res, "b.json", "no records")
    res = cli("make-router-data", "--out", tmp_path / "z")
    assert_one_line_error(res, "--adapters or --data-dir")
    make_router_data(tmp_path / "rd", data_dir=toy, config=RouterDataConfig(per_task=20), progress=False)
    run = _fake_adapters(tmp_path, toy, ["arith", "sentiment", "capital", "translate"])
    res = cli("train-router", "--data", tmp_path / "rd", "--model", tiny_model_path, "--out", tmp_path / "r",
              "--adapters", run)
    assert_one_line_error(res, "labels.json", "position 1", "capital", "sentiment")
    res = cli("train-router", "--data", tmp_path / "rd", "--model", tiny_model_path, "--out", tmp_path / "r",
              "--router", "bert")
    assert_one_line_error(res, "unknown router type", "bert")
    res = cli("train-router", "--data", tmp_path / "nope", "--model", tiny_model_path, "--out", tmp_path / "r")
    assert_one_line_error(res, "nope", "not found")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "labels.json").write_text('["a", "b"]')
    (bad / "train.jsonl").write_text('{"text": "x", "label": 0, "task": "a"}\n')
    res = cli("train-router", "--data", bad, "--model", tiny_model_path, "--out", tmp_path / "r")
    assert_one_line_error(res, "'b'", "empty task")
    (bad / "train.jsonl").write_text('{"text": "x", "label": 1, "task": "a"}\n')
    res = cli("train-router", "--data", bad, "--model", tiny_model_path, "--out", tmp_path / "r")
    assert_one_line_error(res, "train.jsonl: line 1", "label")
    assert not (tmp_path / "r").exists()


# Head pooling, calibration, fallback to the base model

def test_head_pooling_reads_the_first_tokens(tiny):
    _, tok = tiny
    m = MiniMLPRouter(len(tok), 5, head_tokens=2).eval()
    assert 4_500_000 < sum(p.numel() for p in m.parameters()) < 5_500_000     # the same table: ~5M as the paper
    ids, offsets = torch.tensor([5, 9, 11, 7, 8]), torch.tensor([0, 3, 4])     # texts of 3, 1 and 1 tokens
    e = m.embed.weight
    with torch.no_grad():
        ref = torch.stack([m.mlp(torch.cat([e[[5, 9, 11]].mean(0), e[[5, 9]].mean(0)])),
                           m.mlp(torch.cat([e[7], e[7]])), m.mlp(torch.cat([e[8], e[8]]))])
        assert torch.allclose(m(ids, offsets), ref, atol=1e-5)
        assert torch.allclose(m.infer(ids, offsets), ref, atol=1e-5)
        assert torch.allclose(m.infer(ids[:3], offsets[:1]), ref[:1], atol=1e-5)   # batch 1 path


def test_resized_router_keeps_the_other_rows(tiny):
    _, tok = tiny
    torch.manual_seed(0)
    m = MiniMLPRouter(len(tok), 4, embed_dim=8, hidden_dim=16, head_tokens=2).eval()
    ids, offsets = torch.tensor([5, 9, 11, 7, 8, 100]), torch.tensor([0, 3])
    with torch.no_grad():
        old = m(ids, offsets)
        shrunk, grown = m.resized([0, 2, 3]).eval(), m.resized([0, 1, 2, 3], extra=1).eval()
        assert torch.allclose(shrunk(ids, offsets), old[:, [0, 2, 3]], atol=1e-6)
        assert grown(ids, offsets).shape == (2, 5) and torch.allclose(grown(ids, offsets)[:, :4], old, atol=1e-6)


def test_temperature_scaling_fits_and_keeps_the_argmax(trained):
    from dlp_lora.router.calibrate import calibration_error, fit_temperature

    torch.manual_seed(0)
    logits = 2.0 * torch.randn(4000, 5)
    y = torch.multinomial(torch.softmax(logits, -1), 1)[:, 0]          # softmax(logits) is calibrated by design
    overconfident = 4.0 * logits
    t = fit_temperature(overconfident, y)
    assert 3.5 < t < 4.5                                                      # undoes the x4 sharpening
    before = calibration_error(torch.softmax(overconfident, -1), y)
    after = calibration_error(torch.softmax(overconfident / t, -1), y)
    assert after < before / 3
    # a trained router: the fitted temperature is stored, Router.probs applies it, the argmax never changes
    data, out = trained
    r = Router.load(out)
    cfg = json.loads((out / "config.json").read_text())
    assert r.temperature == cfg["temperature"] > 0
    texts = [x["text"] for x in read_split(data, "test")] + ["Tell me a joke about penguins.", "hi"]
    logits, probs = r.logits(texts), r.probs(texts)
    assert torch.equal(probs.argmax(-1), logits.argmax(-1))
    assert torch.allclose(probs, torch.softmax(logits / r.temperature, -1), atol=1e-6)
    m = json.loads((out / "metrics.json").read_text())
    c = m["calibration"]
    assert c["temperature"] == cfg["temperature"] and {"val_ece_before", "val_ece_after", "test_ece_after"} <= set(c)
    assert m["fallback"]["ood_prompts"] >= 300 and len(m["fallback"]["curve"]) > 10
    for f in ("reliability.png", "fallback.png"):
        assert (out / f).read_bytes()[:4] == b"\x89PNG"


def test_fallback_to_base_exactly_below_the_threshold(tiny_run, tiny_model_path):
    """The pipeline sends a prompt to the base model (all-zero weights) exactly when its calibrated top-1
    probability is under min_confidence."""
    from dlp_lora.pipeline import DLPPipeline
    from dlp_lora.selection import SelectionConfig

    pipe = DLPPipeline.from_run(tiny_run, model=tiny_model_path)
    texts = ["What is 17 + 25?", "Sort these words: pear kiwi plum", "What is the capital of Peru?",
             "hello there, how are you?", "Write a poem about the sea.", "How do I reverse a list in Python?"]
    probs = pipe.router.probs(texts)
    assert torch.allclose(probs, torch.softmax(pipe.router.logits(texts) / pipe.router.temperature, -1), atol=1e-6)
    top = probs.max(-1).values
    for t in [0.0, float(top.min()), float(top.median()), float(top.max()), float(top.max()) + 1e-4, 1.0]:
        p, w = pipe.route(texts, SelectionConfig(min_confidence=min(t, 1.0), granularity="prompt"))
        assert torch.equal(p, probs)
        to_base = w.sum(-1) == 0
        assert torch.equal(to_base, p.max(-1).values < min(t, 1.0)), t
        assert torch.allclose(w[~to_base].sum(-1), torch.ones(int((~to_base).sum())), atol=1e-5)


def test_old_router_folders_still_load(trained, tmp_path):
    """A router saved before head pooling and calibration (no head_tokens/temperature in config.json) loads as
    it was trained: mean pooling only, temperature 1."""
    import shutil

    from safetensors.torch import load_file, save_file

    data, out = trained
    old = tmp_path / "old"
    shutil.copytree(out, old)
    cfg = json.loads((old / "config.json").read_text())
    for k in ("head_tokens", "temperature", "label_smoothing"):
        cfg.pop(k)
    (old / "config.json").write_text(json.dumps(cfg))
    w = load_file(str(old / "router.safetensors"))
    w["mlp.0.weight"] = w["mlp.0.weight"][:, : cfg["embed_dim"]].contiguous()    # the paper's mean-only input
    save_file(w, str(old / "router.safetensors"))
    r = Router.load(old)
    assert r.config.head_tokens == 0 and r.temperature == 1.0 and r.probs(["What is 1 + 1?"]).shape == (1, 4)


# Adding and removing a task of a run

def _copy_run(tiny_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    return run


def _router_rows(run, texts):
    r = Router.load(run / "router")
    return r.labels, r.logits(texts)


def test_add_and_remove_task_keep_the_other_labels_and_adapters(tiny_run, tmp_path, cli):
    from dlp_lora.run import open_run
    from dlp_lora.tasks import write_builtin_tasks

    run = _copy_run(tiny_run, tmp_path)
    before = open_run(run)
    names = list(before.names)
    write_builtin_tasks(tmp_path / "more", n=30, seed=1, tasks=["counting"])
    res = cli("add-task", "--run", run, "--data", tmp_path / "more" / "counting.json", "--max-steps", "1",
              "--no-progress")
    assert res.code == 0, res
    assert "added task 'counting'" in res.out and "other tasks' test accuracy" in res.out
    after = open_run(run)
    assert after.names == names + ["counting"] and after.adapter_dirs[:-1] == before.adapter_dirs
    assert after.adapter_dirs[-1] == (run / "adapters" / "counting").absolute()
    assert Router.load(run / "router").labels == names + ["counting"]
    assert json.loads((run / "router_data" / "labels.json").read_text()) == names + ["counting"]
    old_rows = read_split(tiny_run / "router_data", "train")
    new_rows = read_split(run / "router_data", "train")
    assert new_rows[: len(old_rows)] == old_rows                                # old records untouched
    assert {r["task"] for r in new_rows[len(old_rows):]} == {"counting"}
    assert json.loads((run / "router" / "metrics.json").read_text())["update"]["task"] == "counting"
    # remove a task in the middle: the others keep their order, and their router rows are unchanged
    texts = ["What is 3 + 4?", "Sort: b a c", "How many fruits: kiwi, plum?"]
    labels, logits = _router_rows(run, texts)
    res = cli("remove-task", "--run", run, "--task", names[1], "--no-progress")
    assert res.code == 0, res
    kept = [n for n in labels if n != names[1]]
    assert open_run(run).names == kept
    labels2, logits2 = _router_rows(run, texts)
    assert labels2 == kept and torch.allclose(logits2, logits[:, [labels.index(n) for n in kept]], atol=1e-5)
    assert (run / "adapters" / names[1]).is_dir()                               # the adapter folder stays
    assert not (run / ".update.partial").exists()
    # the run still loads as a whole (router labels == adapters)
    from dlp_lora.pipeline import DLPPipeline

    assert DLPPipeline.from_run(run).names == kept


def test_add_task_with_an_existing_adapter_and_refusals(tiny_run, tmp_path, cli):
    run = _copy_run(tiny_run, tmp_path)
    data = run.parent / "data"
    import shutil

    shutil.copytree(tiny_run.parent / "data", data)
    names = json.loads((run / "router" / "labels.json").read_text())
    res = cli("add-task", "--run", run, "--data", data / f"{names[0]}.json", "--no-progress")
    assert_one_line_error(res, "adapters.txt", names[0], "already in the run")
    # an existing PEFT adapter, re-labelled as a new task (copied into the run with a dlp_task.json)
    (tmp_path / "cp.json").write_text((data / f"{names[0]}.json").read_text())
    res = cli("add-task", "--run", run, "--data", tmp_path / "cp.json", "--adapter", run / "adapters" / names[0],
              "--no-progress")
    assert res.code == 0, res
    meta = json.loads((run / "adapters" / "cp" / "dlp_task.json").read_text())
    assert meta["task"] == "cp" and meta["data_file"] == str((tmp_path / "cp.json").resolve())
    assert Router.load(run / "router").labels == names + ["cp"]
    # a folder already at adapters/<task> is not replaced without --overwrite
    (run / "adapters" / "cp2").mkdir()
    (tmp_path / "cp2.json").write_text((data / f"{names[0]}.json").read_text())
    res = cli("add-task", "--run", run, "--data", tmp_path / "cp2.json", "--adapter", run / "adapters" / names[0])
    assert_one_line_error(res, "cp2", "already exists", "--overwrite")
    # an adapter of another base model is refused before anything is written
    from safetensors.torch import load_file, save_file

    alien = tmp_path / "alien"
    shutil.copytree(run / "adapters" / names[0], alien)
    w = {k: (torch.zeros(v.shape[0], v.shape[1] * 2) if "lora_A" in k else v) for k, v in
         load_file(str(alien / "adapter_model.safetensors")).items()}
    save_file(w, str(alien / "adapter_model.safetensors"))
    res = cli("add-task", "--run", run, "--data", tmp_path / "cp2.json", "--adapter", alien, "--overwrite")
    assert_one_line_error(res, "adapter_model.safetensors", "another base model")
    res = cli("remove-task", "--run", run, "--task", "nope")
    assert_one_line_error(res, "no task 'nope'")
    assert Router.load(run / "router").labels == names + ["cp"]


def test_interrupted_update_leaves_the_run_or_is_finished_next_time(tiny_run, tmp_path, monkeypatch):
    """Killed while building: the run is as it was. Killed while moving the new files in: the next command
    finishes the move first, so router labels and adapters.txt always end up matching."""
    import dlp_lora.router.update as update
    from dlp_lora.run import open_run

    run = _copy_run(tiny_run, tmp_path)
    names = open_run(run).names
    snapshot = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}

    def crash(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(update, "finish_router", crash)              # while building the new router
    with pytest.raises(KeyboardInterrupt):
        update.remove_task(run, names[0], progress=False)
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and ".update" not in str(p)} == \
        {p: b for p, b in snapshot.items() if ".update" not in str(p)}
    monkeypatch.undo()
    monkeypatch.setattr(update, "write_adapter_list", crash)         # after the router moved, before adapters.txt
    with pytest.raises(KeyboardInterrupt):
        update.remove_task(run, names[0], progress=False)
    assert Router.load(run / "router").labels == names[1:] and open_run(run).names == names   # half-way
    monkeypatch.undo()
    res = update.remove_task(run, names[0], progress=False)            # the same command again finishes it
    assert res.task == names[0] and open_run(run).names == names[1:]
    assert Router.load(run / "router").labels == names[1:] and not (run / ".update.partial").exists()
