"""Router data maker, mini-MLP / HF routers, training, save -> load, CLI errors (issue 4)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from conftest import assert_one_line_error
from dlp_lora.config import DLPError, RouterConfig, RouterDataConfig
from dlp_lora.data import split_sentences
from dlp_lora.router import MiniMLPRouter, Router, fuse_router_files, make_router_data, train_router
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


def test_fuse_router_files_reindexes_by_task(toy, tmp_path):
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
    out = fuse_router_files([a / "train.jsonl", b / "train.jsonl"], tmp_path / "f" / "train.jsonl")
    labels = json.loads((out.parent / "labels.json").read_text())
    assert labels == ["arith", "capital", "sentiment"]
    rows = read_split(out.parent, "train")
    assert all(labels[r["label"]] == r["task"] for r in rows)
    assert len({(r["text"], r["task"]) for r in rows}) == len(rows)
    # folders: every split fused, labels consistent
    fused = fuse_router_files([a, b], tmp_path / "fd")
    assert read_router_data(fused)[0] == ["arith", "capital", "sentiment"]


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
    res = cli("make-router-data", "--fuse", tmp_path / "rd" / "train.jsonl", tmp_path / "rd" / "val.jsonl",
              "--out", tmp_path / "fused" / "train.jsonl")
    assert res.code == 0, res
    assert json.loads((tmp_path / "fused" / "labels.json").read_text()) == ["arith", "capital", "sentiment", "translate"]


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
