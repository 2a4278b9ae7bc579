"""train-lora: PEFT + Trainer adapters on the tiny model (answer-only loss, atomic output, resume, multi-task runs,
adapter lists, every bad input through the CLI, and a 2-process accelerate run)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import assert_one_line_error

from dlp_lora import lora
from dlp_lora.config import DLPError, LoRATrainConfig
from dlp_lora.run import ADAPTER_LIST
from dlp_lora.data import QARecord, TaskData, format_prompt, read_task, read_task_dir, write_task

ROOT = Path(__file__).resolve().parents[1]
# A learnable toy task for a random tiny model: every answer is the same word, so the adapter only has to push
# the output towards two tokens ("blue" + EOS); the loss must fall within a few dozen steps.
FAST = dict(batch_size=4, learning_rate=2e-2, dropout=0.0, logging_steps=2, save_steps=100)


def write_toy(path: Path, n: int = 32, answer: str = "blue", name: str | None = None) -> Path:
    recs = [QARecord(f"What colour is item number {i}?", answer) for i in range(n)]
    return write_task(path, TaskData(name=name or path.stem, records=recs, metric="exact"))


class Capture:
    """A TrainerCallback that keeps the trained model and counts the steps run in this call."""

    def __new__(cls, stop_at: int | None = None):
        from transformers import TrainerCallback

        class _C(TrainerCallback):
            def __init__(self):
                self.model = None
                self.steps = 0
                self.first_step = None

            def on_step_end(self, args, state, control, **kw):
                self.steps += 1
                if self.first_step is None:
                    self.first_step = state.global_step
                if stop_at is not None and state.global_step >= stop_at:
                    raise KeyboardInterrupt("simulated crash")

            def on_train_end(self, args, state, control, model=None, **kw):
                self.model = model

        return _C()


@pytest.fixture(scope="module")
def trained(tiny_model_path, tmp_path_factory):
    """One toy adapter trained for 30 steps, plus the trained in-memory PEFT model."""
    tmp = tmp_path_factory.mktemp("lora")
    data = write_toy(tmp / "toy.json")
    cap = Capture()
    out = lora.train_adapter(tiny_model_path, data, tmp / "run" / "adapters" / "toy",
                             config=LoRATrainConfig(max_steps=30, **FAST), progress=False, callbacks=[cap])
    return out, cap.model, data


# Tokenisation and masking

def test_collated_labels_mask_prompt_and_padding(tiny, tmp_path):
    model, tok = tiny
    task = TaskData("t", [QARecord("Short?", "yes"), QARecord("A much longer question with many words?", "no way")])
    eos = lora.answer_eos_id(model, tok)
    assert eos == tok.eos_token_id
    feats, dropped = lora.tokenize_task(task, tok, eos, max_length=256)
    assert dropped == 0
    batch = lora.collate(feats, pad_id=tok.pad_token_id)
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    assert ids.shape == labels.shape == mask.shape and ids.shape[0] == 2
    for i, rec in enumerate(task.records):
        prompt_ids = tok(format_prompt(tok, rec.question))["input_ids"]
        n = len(feats[i]["input_ids"])
        # prompt tokens: no loss; answer + EOS: labels == inputs; right padding: mask 0 and no loss
        assert ids[i, :len(prompt_ids)].tolist() == prompt_ids
        assert (labels[i, :len(prompt_ids)] == -100).all()
        ans = labels[i, len(prompt_ids):n]
        assert (ans == ids[i, len(prompt_ids):n]).all()
        assert ans[-1].item() == eos
        assert tok.decode(ans[:-1]) == rec.answer
        assert mask[i, :n].all() and not mask[i, n:].any()
        assert (labels[i, n:] == -100).all()
    # the short row is padded, and its padding (pad == EOS here) carries no label even though EOS does
    short = min(range(2), key=lambda i: len(feats[i]["input_ids"]))
    assert mask[short].sum() < mask.shape[1]


def test_truncation_drops_records_without_answer(tiny):
    model, tok = tiny
    task = TaskData("t", [QARecord("word " * 50, "yes"), QARecord("Hi?", "yes")])
    limit = len(tok(format_prompt(tok, "Hi?"))["input_ids"]) + 1  # room for one answer token only
    feats, dropped = lora.tokenize_task(task, tok, tok.eos_token_id, max_length=limit)
    assert dropped == 1 and len(feats) == 1 and len(feats[0]["input_ids"]) == limit
    assert feats[0]["labels"][-1] != -100  # the answer's first token is kept, its EOS is cut


class _Recording:
    """A tokenizer stand-in that remembers the longest text it was asked to tokenise."""

    def __init__(self, tok):
        self.tok, self.longest = tok, 0

    def __call__(self, text, **kw):
        self.longest = max(self.longest, len(text))
        return self.tok(text, **kw)

    def __getattr__(self, name):
        return getattr(self.tok, name)


def test_long_records_are_cut_before_tokenising(tiny):
    """A 2 MB question or answer is never handed to the tokenizer whole (a 50 MB record must not cost GBs)."""
    _, tok = tiny
    rec = _Recording(tok)
    max_len = 64
    bound = max_len * lora.CHARS_PER_TOKEN
    task = TaskData("t", [QARecord("why " * 500_000, "yes"), QARecord("Short?", "blue " * 400_000),
                          QARecord("Short?", "yes")])
    feats, dropped = lora.tokenize_task(task, rec, tok.eos_token_id, max_len)
    assert dropped == 1 and len(feats) == 2                   # the huge question cannot fit: dropped
    assert 0 < rec.longest <= bound + 500                     # the chat template adds a few hundred characters
    # the huge answer keeps exactly the first tokens it has when tokenised whole, up to max_length
    prompt_n = len(tok(format_prompt(tok, "Short?"))["input_ids"])
    whole = tok("blue " * 100, add_special_tokens=False)["input_ids"]
    assert feats[0]["input_ids"][prompt_n:] == whole[:max_len - prompt_n]
    assert feats[0]["labels"][prompt_n:] == whole[:max_len - prompt_n] and len(feats[0]["input_ids"]) == max_len
    assert feats[1]["labels"][-1] == tok.eos_token_id         # a short answer still ends with EOS


# Training: loss, frozen base, saved adapter

def test_loss_goes_down_and_metadata(trained):
    out, _, data = trained
    meta = json.loads((out / "dlp_task.json").read_text())
    assert meta["task"] == "toy" and meta["steps"] == 30 and meta["metric"] == "exact"
    assert meta["data_file"] == str(Path(data).absolute())
    assert len(meta["data_sha256"]) == 64
    assert meta["loss_end"] < meta["loss_start"] - 0.2, meta
    assert meta["base_model"]["fingerprint"] and meta["adapter_bytes"] == (out / "adapter_model.safetensors").stat().st_size
    cfg = json.loads((out / "train_config.json").read_text())
    assert cfg["max_steps"] == 30 and cfg["rank"] == 8
    # only the PEFT files and ours: no pickles, no Trainer leftovers, and the work folder is gone
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                     "dlp_task.json", "train_config.json"]
    assert sorted(p.name for p in out.parent.iterdir()) == ["toy"]
    assert "toy: 30 steps, loss" in lora.format_summary(out)


def test_trained_model_has_lower_answer_loss_than_base(trained, tiny):
    out, model, data = trained
    base, tok = tiny
    feats, _ = lora.tokenize_task(read_task(data), tok, tok.eos_token_id, 256)
    batch = lora.collate(feats[:8], tok.pad_token_id)
    model.eval()
    with torch.no_grad():
        after = model(**batch).loss.item()
        before = base(**batch).loss.item()
    assert after < before - 0.2


def test_only_lora_parameters_change(trained, tiny_model_path):
    from safetensors.torch import load_file

    _, model, _ = trained
    base_file = load_file(str(tiny_model_path / "model.safetensors"))
    sd = model.get_base_model().state_dict()
    trained_base = {k.replace(".base_layer", ""): v for k, v in sd.items() if "lora_" not in k}
    for k, v in base_file.items():
        assert torch.equal(trained_base[k], v), k
    loras_b = [v for k, v in sd.items() if "lora_B" in k]
    assert loras_b and all(v.abs().sum() > 0 for v in loras_b)  # B starts at zero: it was trained
    assert {k.split(".")[-4] for k in sd if "lora_A" in k} == {"q_proj", "v_proj"}


def test_saved_adapter_loads_with_peft_and_reproduces_logits(trained, tiny_model_path):
    from peft import PeftModel

    from dlp_lora.models import load_model

    out, model, _ = trained
    base, tok = load_model(tiny_model_path, device="cpu", dtype="fp32")
    loaded = PeftModel.from_pretrained(base, out).eval()
    model.eval()
    x = tok(["What colour is item number 3?", "hello there"], return_tensors="pt", padding=True)
    with torch.no_grad():
        a = model(**x).logits
        b = loaded(**x).logits
    assert torch.allclose(a, b, atol=1e-5)
    cfg = lora.check_adapter_dir(out)
    assert cfg["r"] == 8 and cfg["peft_type"] == "LORA"


# Atomic output and resume

def test_interrupted_run_resumes_to_same_step_count(tiny_model_path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # Trainer must write nothing into the working folder either
    data = write_toy(tmp_path / "toy.json", n=16)
    cfg = LoRATrainConfig(max_steps=10, **{**FAST, "save_steps": 4})
    out = tmp_path / "run" / "adapters" / "toy"
    with pytest.raises(KeyboardInterrupt):
        lora.train_adapter(tiny_model_path, data, out, config=cfg, progress=False, callbacks=[Capture(stop_at=6)])
    work = lora.work_dir_for(out)
    assert not out.exists()  # an interrupted run never leaves a folder that looks finished
    assert (work / "checkpoint-4" / "adapter_model.safetensors").is_file()
    # without --resume the output folder is still free, but resume picks up the checkpoint
    cap = Capture()
    lora.train_adapter(tiny_model_path, data, out, config=cfg, progress=False, resume=True, callbacks=[cap])
    meta = lora.read_task_meta(out)
    assert meta["steps"] == 10 and meta["resumed_from_step"] == 4
    assert cap.steps == 6 and cap.first_step == 5
    assert not work.exists()
    # same weights as an uninterrupted run (optimizer, scheduler, data order and RNG restored)
    ref = lora.train_adapter(tiny_model_path, data, tmp_path / "ref", config=cfg, progress=False)
    from safetensors.torch import load_file

    a, b = load_file(str(out / "adapter_model.safetensors")), load_file(str(ref / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    # resume on a finished adapter keeps it
    mtime = (out / "adapter_model.safetensors").stat().st_mtime_ns
    lora.train_adapter(tiny_model_path, data, out, config=cfg, progress=False, resume=True)
    assert (out / "adapter_model.safetensors").stat().st_mtime_ns == mtime
    assert sorted(os.listdir(tmp_path)) == ["ref", "run", "toy.json", "toy.meta.json"]
    assert sorted(os.listdir(tmp_path / "run" / "adapters")) == ["toy"]


def test_resume_refuses_other_options(tiny_model_path, tmp_path):
    data = write_toy(tmp_path / "toy.json", n=16)
    out = tmp_path / "a"
    cfg = LoRATrainConfig(max_steps=6, **{**FAST, "save_steps": 2})
    with pytest.raises(KeyboardInterrupt):
        lora.train_adapter(tiny_model_path, data, out, config=cfg, progress=False, callbacks=[Capture(stop_at=3)])
    with pytest.raises(DLPError, match="other data, options"):
        lora.train_adapter(tiny_model_path, data, out, config=LoRATrainConfig(max_steps=6, rank=4, **FAST),
                           progress=False, resume=True)


# Multi-task runs and adapter lists

def test_train_adapters_writes_sorted_adapter_list(tiny_model_path, tmp_path):
    d = tmp_path / "tasks"
    d.mkdir()
    write_toy(d / "zeta.json", n=8, answer="red")
    write_toy(d / "alpha.json", n=8, answer="green")
    write_toy(d / "mid.json", n=8, answer="blue")
    run = lora.train_adapters(tiny_model_path, d, tmp_path / "run", LoRATrainConfig(max_steps=2, **FAST),
                              progress=False)
    assert (run / "adapters.txt").read_text() == "adapters/alpha\nadapters/mid\nadapters/zeta\n"
    dirs = lora.read_adapter_list(run)
    assert [p.name for p in dirs] == ["alpha", "mid", "zeta"]
    assert [lora.read_task_meta(p)["task"] for p in dirs] == ["alpha", "mid", "zeta"]
    for p in dirs:
        lora.check_adapter_dir(p)
    # resume skips finished adapters; without --resume/--overwrite the run is refused
    mtimes = [(p / "adapter_model.safetensors").stat().st_mtime_ns for p in dirs]
    lora.train_adapters(tiny_model_path, d, run, LoRATrainConfig(max_steps=2, **FAST), progress=False, resume=True)
    assert mtimes == [(p / "adapter_model.safetensors").stat().st_mtime_ns for p in dirs]
    with pytest.raises(DLPError, match="already exists"):
        lora.train_adapters(tiny_model_path, d, run, LoRATrainConfig(max_steps=2, **FAST), progress=False)


def test_multitask_adapter_on_the_union_of_tasks(tiny_model_path, tmp_path, tiny):
    d = tmp_path / "tasks"
    d.mkdir()
    write_toy(d / "alpha.json", n=6, answer="green")
    write_toy(d / "beta.json", n=4, answer="red")
    out = lora.train_multitask(tiny_model_path, d, tmp_path / "run" / "multitask", LoRATrainConfig(max_steps=4, **FAST),
                               progress=False)
    meta = lora.read_task_meta(out)
    assert meta["task"] == "multitask" and meta["tasks"] == ["alpha", "beta"]
    assert meta["records_per_task"] == {"alpha": 6, "beta": 4} and meta["records"] == 10
    assert meta["rank"] == 8 and meta["steps"] == 4 and meta["metric"] is None
    assert [step for step, _ in meta["loss_curve"]] == [1, 2, 4]    # first step, then every logging_steps=2
    assert meta["loss_curve"][0][1] == meta["loss_start"] and meta["loss_curve"][-1][1] == meta["loss_end"]
    assert lora.check_adapter_dir(out)["r"] == 8                    # an ordinary PEFT adapter
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["multitask"]   # not an adapters.txt entry
    # the union: every record of every task once, shuffled, each tokenised exactly as in its own task
    tasks = read_task_dir(d)
    union = lora.multitask_data(tasks, seed=0)
    key = lambda r: (r.task, r.question, r.answer)
    assert sorted(map(key, union.records)) == sorted((t.name, r.question, r.answer) for t in tasks for r in t.records)
    assert [r.task for r in union.records] != sorted(r.task for r in union.records)
    assert [key(r) for r in lora.multitask_data(tasks, seed=0).records] == [key(r) for r in union.records]
    _, tok = tiny
    mixed, _ = lora.tokenize_task(union, tok, tok.eos_token_id, 256)
    alone = [f for t in tasks for f in lora.tokenize_task(t, tok, tok.eos_token_id, 256)[0]]
    assert sorted(map(str, mixed)) == sorted(map(str, alone))
    # same output rules as one adapter: kept on --resume, refused without --overwrite
    mtime = (out / "adapter_model.safetensors").stat().st_mtime_ns
    lora.train_multitask(tiny_model_path, d, out, LoRATrainConfig(max_steps=4, **FAST), progress=False, resume=True)
    assert (out / "adapter_model.safetensors").stat().st_mtime_ns == mtime
    with pytest.raises(DLPError, match="already holds an adapter"):
        lora.train_multitask(tiny_model_path, d, out, LoRATrainConfig(max_steps=4, **FAST), progress=False)


def test_failed_task_leaves_the_run_resumable(tiny_model_path, tmp_path, monkeypatch):
    d = tmp_path / "tasks"
    d.mkdir()
    write_toy(d / "a.json", n=4)
    write_toy(d / "b.json", n=4)
    run = tmp_path / "run"
    cfg = LoRATrainConfig(max_steps=1, **FAST)
    real = lora.train_adapter

    def failing_on_b(model, data, out, **kw):
        if Path(data).stem == "b":
            raise DLPError(f"{data}: simulated failure")
        return real(model, data, out, **kw)

    monkeypatch.setattr(lora, "train_adapter", failing_on_b)
    with pytest.raises(DLPError) as e:
        lora.train_adapters(tiny_model_path, d, run, cfg, progress=False)
    msg = str(e.value)
    assert "\n" not in msg and "b.json: simulated failure" in msg
    assert "1 of 2 adapters finished" in msg and "--resume" in msg
    assert lora.is_finished_adapter(run / "adapters" / "a") and not (run / ADAPTER_LIST).exists()
    monkeypatch.setattr(lora, "train_adapter", real)
    mtime = (run / "adapters" / "a" / "adapter_model.safetensors").stat().st_mtime_ns
    lora.train_adapters(tiny_model_path, d, run, cfg, progress=False, resume=True)
    assert (run / ADAPTER_LIST).read_text() == "adapters/a\nadapters/b\n"
    assert (run / "adapters" / "a" / "adapter_model.safetensors").stat().st_mtime_ns == mtime


def test_read_adapter_list_semantics(tmp_path):
    run = tmp_path / "run"
    for n in ("a", "b"):
        (run / "adapters" / n).mkdir(parents=True)
    other = tmp_path / "elsewhere" / "c"
    other.mkdir(parents=True)
    lst = run / "adapters.txt"
    lst.write_text(f"# my adapters\n\nadapters/b\n  adapters/a  \n{other}\n../elsewhere/c2\n")
    with pytest.raises(DLPError) as e:
        lora.read_adapter_list(lst)
    assert str(e.value) == f"{lst}: line 6: ../elsewhere/c2: not found"
    lst.write_text(f"# my adapters\n\nadapters/b\n  adapters/a  \n{other}\n")
    expect = [run / "adapters" / "b", run / "adapters" / "a", other]
    assert lora.read_adapter_list(lst) == expect
    assert lora.read_adapter_list(run) == expect            # a run folder means RUN/adapters.txt
    assert lora.read_adapter_list([str(p) for p in expect]) == expect
    # relative to the file's folder, not the working directory
    cwd = os.getcwd()
    try:
        os.chdir(tmp_path / "elsewhere")
        assert lora.read_adapter_list(Path(os.path.relpath(lst))) == expect
    finally:
        os.chdir(cwd)
    # write_adapter_list round-trips: relative inside the run folder, absolute outside
    out = lora.write_adapter_list(tmp_path / "run" / "list2.txt", expect)
    assert out.read_text().splitlines() == ["adapters/b", "adapters/a", str(other)]
    assert lora.read_adapter_list(out) == expect
    lst.write_text("adapters/a\nadapters/a\n")
    with pytest.raises(DLPError, match="line 2: adapters/a: listed twice"):
        lora.read_adapter_list(lst)
    lst.write_text("# nothing\n")
    with pytest.raises(DLPError, match="no adapter folders"):
        lora.read_adapter_list(lst)
    with pytest.raises(DLPError, match="no adapters.txt"):
        lora.read_adapter_list(tmp_path / "elsewhere")
    with pytest.raises(DLPError, match="not found"):
        lora.read_adapter_list([tmp_path / "nope"])


def test_check_adapter_dir_and_task_meta(tmp_path, trained):
    good, _, _ = trained
    with pytest.raises(DLPError, match="adapter folder not found"):
        lora.check_adapter_dir(tmp_path / "missing")
    d = tmp_path / "mytask"
    d.mkdir()
    with pytest.raises(DLPError, match="no adapter_config.json"):
        lora.check_adapter_dir(d)
    cfg = json.loads((good / "adapter_config.json").read_text())
    (d / "adapter_config.json").write_text(json.dumps({**cfg, "peft_type": "IA3"}))
    with pytest.raises(DLPError, match="not a LoRA adapter"):
        lora.check_adapter_dir(d)
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(DLPError, match="no adapter_model.safetensors"):
        lora.check_adapter_dir(d)
    (d / "adapter_model.safetensors").write_bytes((good / "adapter_model.safetensors").read_bytes())
    assert lora.check_adapter_dir(d)["r"] == 8
    meta = lora.read_task_meta(d)  # trained elsewhere: derived from the folder name
    assert meta["task"] == "mytask" and meta["derived"] is True
    assert lora.read_task_meta(good)["task"] == "toy"


# CLI

def test_cli_train_one_task(cli, tiny_model_path, tmp_path):
    data = write_toy(tmp_path / "colours.json", n=8)
    out = tmp_path / "run" / "adapters" / "colours"
    res = cli("train-lora", "--model", tiny_model_path, "--data", data, "--out", out, "--max-steps", "3",
              "--batch-size", "4", "--rank", "4", "--alpha", "8", "--target-modules", "q_proj,k_proj,v_proj",
              "--rslora", "--no-group-by-length", "--no-progress")
    assert res.code == 0, res
    assert "colours: 3 steps, loss" in res.out
    cfg = lora.check_adapter_dir(out)
    assert cfg["r"] == 4 and cfg["use_rslora"] is True and sorted(cfg["target_modules"]) == ["k_proj", "q_proj", "v_proj"]
    tc = json.loads((out / "train_config.json").read_text())
    assert tc["rank"] == 4 and tc["alpha"] == 8.0 and tc["use_rslora"] is True and tc["group_by_length"] is False


def test_batches_of_similar_length_by_default(tmp_path):
    """group_by_length (the default) hands Trainer HF's LengthGroupedSampler: each batch of a mega-batch holds
    records of similar length, so less padding; --no-group-by-length keeps plain random batches."""
    from transformers.trainer_pt_utils import LengthGroupedSampler

    assert lora._training_arguments(LoRATrainConfig(), tmp_path, False).train_sampling_strategy == "group_by_length"
    plain = lora._training_arguments(LoRATrainConfig(group_by_length=False), tmp_path, False)
    assert plain.train_sampling_strategy == "random"
    feats = [{"input_ids": [1] * (5 + k % 4 if k % 2 else 280 + k)} for k in range(64)]   # short and long
    torch.manual_seed(0)
    order = list(LengthGroupedSampler(4, dataset=feats))
    batches = [[len(feats[i]["input_ids"]) for i in order[k:k + 4]] for k in range(0, 64, 4)]
    mixed = [b for b in batches if min(b) < 10 < max(b)]
    # mega-batches of 16 are sorted by length: at most one batch per mega-batch mixes short and long records
    assert sorted(order) == list(range(64)) and len(mixed) <= 4
    with pytest.raises(DLPError, match="group_by_length must be true or false"):
        LoRATrainConfig(group_by_length="yes")


def test_cli_data_dir(cli, tiny_model_path, tmp_path):
    d = tmp_path / "tasks"
    d.mkdir()
    write_toy(d / "b.json", n=4)
    write_toy(d / "a.json", n=4)
    res = cli("train-lora", "--model", tiny_model_path, "--data-dir", d, "--out", tmp_path / "run",
              "--max-steps", "1", "--no-progress")
    assert res.code == 0, res
    assert (tmp_path / "run" / "adapters.txt").read_text() == "adapters/a\nadapters/b\n"


def test_cli_bad_inputs(cli, tiny_model_path, tmp_path):
    data = write_toy(tmp_path / "toy.json", n=4)
    base = ("train-lora", "--no-progress", "--max-steps", "1")
    res = cli(*base, "--model", tmp_path / "no_such_model", "--data", data, "--out", tmp_path / "o1")
    assert_one_line_error(res, "no_such_model", "not found")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"Q": "x", "A": "y"}, {"Q": "only a question"}]))
    res = cli(*base, "--model", tiny_model_path, "--data", bad, "--out", tmp_path / "o2")
    assert_one_line_error(res, "bad.json", "record 1", "'A'")
    res = cli(*base, "--model", tiny_model_path, "--data", data, "--out", tmp_path / "o3",
              "--target-modules", "q_proj,c_attn")
    assert_one_line_error(res, "'c_attn'", "not found", "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                          "up_proj", "down_proj")
    res = cli(*base, "--model", tiny_model_path, "--data", data, "--out", tmp_path / "o3",
              "--target-modules", "embed_tokens")
    assert_one_line_error(res, "'embed_tokens'", "not a linear layer")
    res = cli(*base, "--model", tiny_model_path, "--data", data, "--out", tmp_path / "o4", "--rank", "0")
    assert_one_line_error(res, "rank", "0")
    res = cli(*base, "--model", tiny_model_path, "--data", data, "--out", tmp_path / "o4", "--rank", "-2")
    assert_one_line_error(res, "rank", "-2")
    # existing adapter without --overwrite: refused; with --overwrite: replaced
    out = tmp_path / "o5"
    assert cli(*base, "--model", tiny_model_path, "--data", data, "--out", out).code == 0
    res = cli(*base, "--model", tiny_model_path, "--data", data, "--out", out)
    assert_one_line_error(res, str(out), "already holds an adapter", "--overwrite")
    assert cli(*base, "--model", tiny_model_path, "--data", data, "--out", out, "--overwrite", "--max-steps", "2").code == 0
    assert lora.read_task_meta(out)["steps"] == 2
    # argparse-level problems are one line too (exit 2)
    res = cli("train-lora", "--model", tiny_model_path, "--data", data, "--data-dir", tmp_path, "--out", out)
    assert_one_line_error(res, "not allowed with", code=2)
    res = cli("train-lora", "--model", tiny_model_path, "--out", out)
    assert_one_line_error(res, "--data", code=2)
    res = cli("train-lora", "--model", tiny_model_path, "--data-dir", tmp_path / "none", "--out", tmp_path / "r")
    assert_one_line_error(res, "none", "folder not found")


def test_cli_multitask(cli, tiny_model_path, tmp_path):
    d = tmp_path / "tasks"
    d.mkdir()
    write_toy(d / "a.json", n=4)
    write_toy(d / "b.json", n=4, answer="red")
    out = tmp_path / "run" / "multitask"
    res = cli("train-lora", "--model", tiny_model_path, "--multitask", "--data-dir", d, "--out", out, "--max-steps", "2",
              "--rank", "4", "--no-progress")
    assert res.code == 0, res
    assert "multitask: 2 steps, loss" in res.out
    assert lora.read_task_meta(out)["rank"] == 4 and lora.check_adapter_dir(out)["r"] == 4
    res = cli("train-lora", "--model", tiny_model_path, "--multitask", "--data", d / "a.json", "--out", tmp_path / "m2")
    assert_one_line_error(res, "--multitask", "--data-dir")


def test_cli_refuses_to_replace_a_run_or_an_input(cli, tiny_model_path, tmp_path):
    old, new = tmp_path / "old", tmp_path / "new"
    old.mkdir()
    new.mkdir()
    write_toy(old / "a.json", n=4)
    write_toy(new / "b.json", n=4)
    run = tmp_path / "run"
    base = ("train-lora", "--model", tiny_model_path, "--max-steps", "1", "--no-progress")
    assert cli(*base, "--data-dir", old, "--out", run).code == 0
    listing = (run / ADAPTER_LIST).read_bytes()
    for extra in ((), ("--resume",)):    # another data folder onto an existing run: its router would not match
        res = cli(*base, "--data-dir", new, "--out", run, *extra)
        assert_one_line_error(res, "adapters.txt", "other adapters", str(new), "--overwrite")
        assert (run / ADAPTER_LIST).read_bytes() == listing and not (run / "adapters" / "b").exists()
    assert cli(*base, "--data-dir", new, "--out", run, "--overwrite").code == 0
    assert (run / ADAPTER_LIST).read_text() == "adapters/b\n"
    # the file-system root, the input folder itself, a folder holding the input file: refused, nothing touched
    assert_one_line_error(cli(*base, "--data-dir", new, "--out", "/"), "root")
    assert_one_line_error(cli(*base, "--data-dir", new, "--out", new), str(new), "input")
    assert_one_line_error(cli(*base, "--data", new / "b.json", "--out", new, "--overwrite"), str(new), "input")
    assert_one_line_error(cli(*base, "--data", new / "b.json", "--out", "/"), "root")
    assert_one_line_error(cli(*base, "--multitask", "--data-dir", new, "--out", new), str(new), "input")
    assert sorted(p.name for p in new.iterdir()) == ["b.json", "b.meta.json"]


# Multi-process: accelerate launch, 2 CPU processes (DDP over gloo)

@pytest.mark.slow
def test_accelerate_two_cpu_processes_match_single_process(tiny_model_path, tmp_path):
    """Two real processes under ``accelerate launch``. ``--cpu --num_processes 2`` starts only ONE process unless
    MPI (mpirun) is installed (accelerate 1.x sends multi-CPU jobs through mpirun), so the test uses accelerate's
    torchrun-based launcher (``--multi_gpu``) with CUDA hidden: every process then has no GPU and train_adapter
    builds a gloo CPU process group. world_size == 2 in dlp_task.json proves both processes took part."""
    from peft import PeftModel

    from dlp_lora.models import load_model

    data = write_toy(tmp_path / "toy.json", n=16)
    accelerate = Path(sys.executable).parent / "accelerate"
    args = ["--model", str(tiny_model_path), "--data", str(data), "--max-steps", "6", "--batch-size", "2",
            "--save-steps", "3", "--no-progress"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    out2 = tmp_path / "ddp" / "adapters" / "toy"
    p = subprocess.run([str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                        "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "dlp_lora", "train-lora",
                        *args, "--out", str(out2)], capture_output=True, text=True, env=env, cwd=tmp_path,
                       timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.count("toy: 6 steps") == 1, p.stdout  # only the main process reports
    out1 = tmp_path / "single" / "adapters" / "toy"
    lora.train_adapter(tiny_model_path, data, out1, config=LoRATrainConfig(max_steps=6, batch_size=2, save_steps=3),
                       progress=False)
    m1, m2 = lora.read_task_meta(out1), lora.read_task_meta(out2)
    assert m1["steps"] == m2["steps"] == 6
    assert m1["world_size"] == 1 and m2["world_size"] == 2
    assert sorted(x.name for x in out2.parent.iterdir()) == ["toy"]  # no work folder or temp folder left
    assert sorted(x.name for x in out2.iterdir()) == sorted(x.name for x in out1.iterdir())
    base, _ = load_model(tiny_model_path, device="cpu", dtype="fp32")
    loaded = PeftModel.from_pretrained(base, out2)
    assert any("lora_B" in n and v.abs().sum() > 0 for n, v in loaded.named_parameters())
