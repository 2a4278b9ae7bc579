"""Train a router on router data, calibrate and save it (DESIGN §5); :mod:`.inference` loads it as ``Router``.

Router folder (the contract between ``train-router`` and the pipeline)::

    router.safetensors   the weights (safetensors only; never pickles)
    config.json          the resolved RouterConfig: kind, sizes, vocab_size, num_labels, tokenizer identity,
                         temperature (fitted on the validation split; ``Router.probs`` applies it)
    labels.json          task names; label i == adapter i of adapters.txt
    tokenizer/           the tokenizer the router reads (save_pretrained); for the mini-MLP: the base LLM's
    hf/config.json       albert/distilroberta only: the architecture
    metrics.json         val/test accuracy, per-task test accuracy, confusion matrix, train seconds, params,
                         calibration (ECE before/after) and the fallback trade-off against out-of-domain prompts
    confusion.png        the test confusion matrix (row-normalised), so task collisions are visible
    reliability.png      reliability diagram before/after temperature scaling
    fallback.png         share of out-of-domain / in-domain prompts sent to the base model per min_confidence

Training: AdamW, shuffled mini-batches, label smoothing, validation accuracy after every epoch, early stopping
after ``patience`` epochs without improvement, best weights kept. Texts are tokenised once, in batch, before
the first epoch. The mini-MLP's embedding table gets sparse gradients (only the rows of the batch's tokens are
touched), which keeps a CPU epoch over tens of thousands of sentences to about a second.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from ..config import DLPError, RouterConfig, atomic_dir, atomic_write_json, save_config
from ..selection import SelectionConfig
from .calibrate import ECE_BINS, calibration_error, fallback_curve, fit_temperature, plot_fallback, plot_reliability, \
    read_ood_prompts, reliability_bins
from .data import COMPOSITE_FILE, LABELS_FILE, SPLITS, adapter_task_names, check_label_order, read_router_data, \
    read_router_file
from .hf import HF_KINDS, build_hf_router, hf_logits, special_ids
from .inference import ROUTER_WEIGHTS, pad_id as _pad_id
from .mlp import Encoded, MiniMLPRouter, TokenEncoder, count_params, drop_tokens


# Shared forward helpers

def _forward(model, kind: str, enc: Encoded, idx: torch.Tensor, pad_id: int, token_dropout: float = 0.0,
             generator: torch.Generator | None = None, crop_prob: float = 0.0) -> torch.Tensor:
    if kind == "mlp":
        ids, offsets = enc.cropped(idx, crop_prob, generator=generator) if crop_prob else enc.flat(idx)
        if token_dropout:
            ids, offsets = drop_tokens(ids, offsets, token_dropout, generator)
        return model(ids, offsets)
    ids, mask = enc.padded(idx, pad_id)
    return hf_logits(model, ids, mask)


def _predict_logits(model, kind: str, enc: Encoded, batch_size: int, pad_id: int) -> torch.Tensor:
    model.eval()
    out = []
    with torch.inference_mode():
        for i in range(0, len(enc), batch_size):
            idx = torch.arange(i, min(i + batch_size, len(enc)))
            out.append(_forward(model, kind, enc, idx, pad_id).float())
    return torch.cat(out) if out else torch.zeros(0, 0)


@dataclasses.dataclass
class Splits:
    """The router data of one training, tokenised once: ``enc[split]`` token ids, ``y[split]`` labels."""

    enc: dict[str, Encoded]
    y: dict[str, torch.Tensor]
    tokenize_seconds: float = 0.0


def encode_splits(encoder: TokenEncoder, splits: dict[str, list[dict]]) -> Splits:
    t0 = time.time()
    enc = {s: encoder.encode([r["text"] for r in rows]) for s, rows in splits.items()}
    y = {s: torch.tensor([r["label"] for r in rows], dtype=torch.int64) for s, rows in splits.items()}
    return Splits(enc, y, time.time() - t0)


# Training

def _build_model(config: RouterConfig, num_labels: int, base_tokenizer):
    if config.kind == "mlp":
        if config.pretrained:
            raise DLPError("--pretrained is for albert/distilroberta routers; the mini-MLP is trained from scratch")
        model = MiniMLPRouter(len(base_tokenizer), num_labels, config.embed_dim, config.hidden_dim,
                              config.mlp_dropout, config.activation, config.embed_init_std, config.pooling,
                              config.head_tokens)
        return model, base_tokenizer, "base"
    return build_hf_router(config, num_labels, base_tokenizer)


def encoder_for(config: RouterConfig, tokenizer, source: str) -> TokenEncoder:
    """The token encoder a router of ``config`` reads with (HF routers wrap texts in their special tokens)."""
    if config.kind == "mlp":
        return TokenEncoder(tokenizer, config.max_tokens)
    prefix, suffix = special_ids(tokenizer, source)
    return TokenEncoder(tokenizer, config.max_tokens, prefix, suffix)


def _optimizers(model, config: RouterConfig) -> list[torch.optim.Optimizer]:
    if config.kind == "mlp":
        # Sparse embedding gradients: a batch touches a few hundred of the ~50k rows.
        model.embed.sparse = True
        emb = [model.embed.weight]
        rest = [p for n, p in model.named_parameters() if not n.startswith("embed.")]
        return [torch.optim.SparseAdam(emb, lr=config.learning_rate),
                torch.optim.AdamW(rest, lr=config.learning_rate, weight_decay=0.01)]
    return [torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=0.01)]


def _accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    return float((logits.argmax(-1) == y).float().mean()) if len(y) else float("nan")


@dataclasses.dataclass
class FitState:
    """Where the epoch loop stands; all but ``best_state`` is JSON (it goes into the checkpoint)."""

    epoch: int = 0                                  # last finished epoch
    history: list = dataclasses.field(default_factory=list)
    bad: int = 0                                    # epochs since the best one
    best_epoch: int = 0
    best: tuple = (-1.0, float("inf"))              # (val accuracy, val loss) of the best epoch
    stopped: bool = False
    best_state: dict | None = None                  # weights of the best epoch

    def to_json(self) -> dict:
        d = {k: v for k, v in dataclasses.asdict(self).items() if k != "best_state"}
        d["best"] = list(self.best)
        return d


def _train_epoch(model, config: RouterConfig, data: Splits, pad_id: int, gen: torch.Generator, opts) -> float:
    model.train()
    n = len(data.enc["train"])
    perm = torch.randperm(n, generator=gen)
    total, steps = 0.0, 0
    for i in range(0, n, config.batch_size):
        idx = perm[i: i + config.batch_size]
        logits = _forward(model, config.kind, data.enc["train"], idx, pad_id, config.token_dropout, gen,
                          config.crop_prob)
        loss = F.cross_entropy(logits, data.y["train"][idx], label_smoothing=config.label_smoothing)
        for o in opts:
            o.zero_grad(set_to_none=True)
        loss.backward()
        for o in opts:
            o.step()
        total += float(loss.detach())
        steps += 1
    return total / max(steps, 1)


def fit(model, config: RouterConfig, data: Splits, pad_id: int, gen: torch.Generator, opts, state: FitState,
        progress: bool = True, on_epoch=None, desc: str = "train router") -> FitState:
    """Epochs from ``state.epoch + 1`` until ``config.epochs`` or early stopping: validation accuracy after every
    epoch (ties: lower validation loss), best weights kept in ``state.best_state``. Without a validation split
    the last epoch is kept. ``on_epoch(state)`` runs after each epoch (checkpoints)."""
    from tqdm.auto import tqdm

    has_val = len(data.enc["val"]) > 0
    bar = tqdm(range(state.epoch + 1, config.epochs + 1) if not state.stopped else [], desc=desc, unit="epoch",
               disable=not progress, initial=state.epoch, total=config.epochs)
    for epoch in bar:
        loss = _train_epoch(model, config, data, pad_id, gen, opts)
        if has_val:
            vlog = _predict_logits(model, config.kind, data.enc["val"], 1024, pad_id)
            vacc, vloss = _accuracy(vlog, data.y["val"]), float(F.cross_entropy(vlog, data.y["val"]))
        else:
            vacc, vloss = float(epoch), 0.0
        state.epoch = epoch
        state.history.append({"epoch": epoch, "train_loss": loss,
                              **({"val_accuracy": vacc, "val_loss": vloss} if has_val else {})})
        bar.set_postfix(loss=f"{loss:.4f}", **({"val_acc": f"{vacc:.4f}"} if has_val else {}))
        if vacc > state.best[0] or (vacc == state.best[0] and vloss < state.best[1] - 1e-6):
            state.best, state.best_epoch, state.bad = (vacc, vloss), epoch, 0
            state.best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            state.bad += 1
            state.stopped = state.bad >= config.patience
        if on_epoch is not None:
            on_epoch(state)
        if state.stopped:
            break
    bar.close()
    if state.best_state is not None:
        model.load_state_dict(state.best_state)
    return state


# Checkpoints: one safetensors file per run, rewritten atomically after an epoch (resume with resume=True)

CHECKPOINT = "checkpoint.safetensors"


def router_work_dir(out_dir: str | os.PathLike) -> Path:
    """The hidden folder beside ``out_dir`` that holds the checkpoint of an unfinished training."""
    out = Path(out_dir).absolute()
    return out.parent / f".{out.name}.partial"


def _save_checkpoint(path: Path, model, opts, gen: torch.Generator, state: dict, best_state: dict | None) -> None:
    """Model, optimiser and RNG state + the loop state (JSON in the safetensors metadata), in ONE file written
    to a temp name and renamed, so a kill at any moment leaves the previous checkpoint or the new one."""
    from safetensors.torch import save_file

    tensors = {f"model.{k}": v.detach().contiguous() for k, v in model.state_dict().items()}
    if best_state is not None:
        tensors.update({f"best.{k}": v.contiguous() for k, v in best_state.items()})
    opt_meta = []
    for i, o in enumerate(opts):
        sd = o.state_dict()
        numbers = {}
        for pid, st in sd["state"].items():
            for k, v in st.items():
                if isinstance(v, torch.Tensor):
                    tensors[f"opt{i}.{pid}.{k}"] = v.detach().contiguous()
                else:
                    numbers[f"{pid}.{k}"] = v
        opt_meta.append({"param_groups": sd["param_groups"], "numbers": numbers})
    tensors["rng.gen"] = gen.get_state()
    tensors["rng.torch"] = torch.get_rng_state()
    meta = {"state": json.dumps({**state, "optimizers": opt_meta})}
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, path)


def _load_checkpoint(path: Path, model, opts, gen: torch.Generator) -> tuple[dict, dict | None]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            state = json.loads(f.metadata()["state"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise DLPError(f"{path}: cannot read the checkpoint ({e.__class__.__name__}); rerun without --resume") from None
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    best = {k[5:]: v for k, v in tensors.items() if k.startswith("best.")} or None
    for i, (o, om) in enumerate(zip(opts, state["optimizers"])):
        st: dict = {}
        for k, v in tensors.items():
            if k.startswith(f"opt{i}."):
                _, pid, name = k.split(".", 2)
                st.setdefault(int(pid), {})[name] = v
        for k, v in om["numbers"].items():
            pid, name = k.split(".", 1)
            st.setdefault(int(pid), {})[name] = v
        o.load_state_dict({"state": st, "param_groups": om["param_groups"]})
    gen.set_state(tensors["rng.gen"])
    torch.set_rng_state(tensors["rng.torch"])
    return state, best


def _resume_key(config: RouterConfig, data_dir, labels: list[str], base_id: str) -> str:
    """What must be equal for a checkpoint to be continued: options, data files, labels, tokenizer."""
    import hashlib

    h = hashlib.sha256(json.dumps([dataclasses.asdict(config), labels, base_id], sort_keys=True).encode())
    for name in ("train.jsonl", "val.jsonl", "test.jsonl"):
        f = Path(data_dir) / name
        if f.is_file():
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


def train_router(data_dir: str | os.PathLike, model_spec: str | os.PathLike, out_dir: str | os.PathLike,
                 config: RouterConfig = RouterConfig(), overwrite: bool = False, progress: bool = True,
                 adapters=None, resume: bool = False, checkpoint_seconds: float = 10.0) -> Path:
    """Train a router on ``data_dir`` (from ``make_router_data``) with the tokenizer of ``model_spec`` and write
    the router folder ``out_dir`` (see the module doc). ``adapters`` (optional adapters.txt / run folder /
    list): refuse router data whose labels differ from the adapters' task names.

    After every epoch the whole training state is checkpointed in ``.<out>.partial/checkpoint.safetensors``;
    ``resume=True`` continues an interrupted training from there (same options and data required) and returns a
    finished ``out_dir`` as it is. The resumed run ends with the same weights as an uninterrupted one.
    ``checkpoint_seconds``: write the checkpoint after an epoch only when this long has passed since the last
    one (0: after every epoch), so that big routers with fast epochs do not spend their time writing."""
    from ..models import load_tokenizer, tokenizer_identity

    out_dir = Path(out_dir)
    work = router_work_dir(out_dir)
    if resume and out_dir.is_dir() and (out_dir / ROUTER_WEIGHTS).is_file() and not work.exists():
        if progress:
            print(f"{out_dir}: already trained (resume): kept")
        return out_dir
    if out_dir.exists() and not overwrite and not resume:
        raise DLPError(f"{out_dir}: already exists (pass --overwrite to replace it)")
    labels, splits = read_router_data(data_dir)
    if adapters is not None:
        check_label_order(labels, adapter_task_names(adapters), f"{Path(data_dir) / LABELS_FILE}")
    base_tok = load_tokenizer(model_spec)
    torch.manual_seed(config.seed)
    t0 = time.time()
    model, tok, source = _build_model(config, len(labels), base_tok)
    data = encode_splits(encoder_for(config, tok, source), splits)
    if progress:
        print(f"router: {config.kind}, {count_params(model):,} parameters, {len(labels)} tasks, vocabulary "
              f"{len(tok):,}, {len(data.y['train'])} train / {len(data.y['val'])} val / {len(data.y['test'])} "
              "test records")
    opts = _optimizers(model, config)
    gen = torch.Generator().manual_seed(config.seed)
    key = _resume_key(config, data_dir, labels, tokenizer_identity(base_tok))
    state = _start_state(work, key, resume, model, opts, gen, progress)
    resumed_from = state.epoch
    saver = _checkpointer(work / CHECKPOINT, key, model, opts, gen, checkpoint_seconds, config.epochs)
    state = fit(model, config, data, _pad_id(model, config.kind), gen, opts, state, progress, saver)
    extra = {"epochs_run": len(state.history), "best_epoch": state.best_epoch, "history": state.history,
             "train_seconds": round(time.time() - t0, 3), "tokenize_seconds": round(data.tokenize_seconds, 3),
             "data": str(Path(data_dir).absolute()), "model": str(model_spec), "resumed_from_epoch": resumed_from}
    finish_router(model, config, tok, source, labels, data, out_dir, overwrite=True, data_dir=data_dir,
                  metrics=extra)
    shutil.rmtree(work, ignore_errors=True)
    return out_dir


def _start_state(work: Path, key: str, resume: bool, model, opts, gen, progress: bool) -> FitState:
    """A fresh loop state, or the checkpointed one of an interrupted training (``resume``)."""
    ckpt = work / CHECKPOINT
    state = FitState()
    if resume and ckpt.is_file():
        saved, best_state = _load_checkpoint(ckpt, model, opts, gen)
        if saved.get("key") != key:
            raise DLPError(f"{work}: the interrupted training used other data or options "
                           f"(rerun without --resume to start over)")
        fields = {f.name for f in dataclasses.fields(FitState)}
        state = FitState(**{k: v for k, v in saved.items() if k in fields}, best_state=best_state)
        state.best = tuple(state.best)
        if progress:
            print(f"resuming router training after epoch {state.epoch}")
    else:
        shutil.rmtree(work, ignore_errors=True)     # a stale checkpoint of other options/data
    try:
        work.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DLPError(f"{work}: cannot create the checkpoint folder ({e.strerror or e.__class__.__name__})") from None
    return state


def _checkpointer(path: Path, key: str, model, opts, gen, every_seconds: float, epochs: int):
    """``on_epoch`` callback: checkpoint when ``every_seconds`` have passed since the last one and the loop goes on."""
    last = [time.time()]

    def save(state: FitState) -> None:
        if time.time() - last[0] >= every_seconds and not state.stopped and state.epoch < epochs:
            _save_checkpoint(path, model, opts, gen, {"key": key, **state.to_json()}, state.best_state)
            last[0] = time.time()

    return save


def finish_router(model, config: RouterConfig, tok, source: str, labels: list[str], data: Splits,
                  out_dir: str | os.PathLike, overwrite: bool = False, data_dir=None, metrics: dict | None = None
                  ) -> Path:
    """Calibrate a trained router on the validation split, evaluate it and write its folder atomically."""
    from ..models import tokenizer_identity

    model.eval()
    if config.kind == "mlp":
        model.embed.sparse = False
    pad_id = _pad_id(model, config.kind)
    encoder = encoder_for(config, tok, source)
    logits = {s: _predict_logits(model, config.kind, data.enc[s], 1024, pad_id) for s in SPLITS if len(data.y[s])}
    temperature = fit_temperature(logits["val"], data.y["val"]) if "val" in logits else 1.0
    out = {"kind": config.kind, "params": count_params(model), **(metrics or {})}
    out.update(_evaluate(logits, data.y, labels))
    calib = _calibration(logits, data.y, temperature)
    ood = _predict_logits(model, config.kind, encoder.encode([r["text"] for r in read_ood_prompts()]), 1024, pad_id)
    out["calibration"] = {k: v for k, v in calib.items() if not k.endswith("_bins")}
    out["fallback"] = _fallback(logits, data.y, ood, temperature)
    out.update({"records": {s: len(y) for s, y in data.y.items()}, "base_tokenizer": tokenizer_identity(tok),
                "tokenizer_source": source, "torch_threads": torch.get_num_threads()})
    comp = Path(data_dir) / COMPOSITE_FILE if data_dir is not None else None
    if comp is not None and comp.is_file():
        out["composite"] = _composite_metrics(model, config.kind, encoder, comp, labels, pad_id, temperature)
    resolved = dataclasses.replace(config, vocab_size=len(tok), num_labels=len(labels),
                                   tokenizer=tokenizer_identity(tok), tokenizer_source=source, temperature=temperature)
    _write_router_dir(Path(out_dir), model, resolved, tok, labels, out, calib, overwrite)
    return Path(out_dir)


def _write_router_dir(out_dir: Path, model, config: RouterConfig, tok, labels: list[str], metrics: dict,
                      calib: dict, overwrite: bool) -> None:
    from safetensors.torch import save_model

    split = metrics["confusion_split"]
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        save_model(model, str(tmp / ROUTER_WEIGHTS))
        save_config(config, tmp / "config.json")
        atomic_write_json(tmp / LABELS_FILE, labels)
        tok.save_pretrained(tmp / "tokenizer")
        if config.kind in HF_KINDS:
            model.config.save_pretrained(tmp / "hf")
        atomic_write_json(tmp / "metrics.json", metrics)
        plot_confusion(metrics["confusion"], labels, tmp / "confusion.png",
                       title=f"router {config.kind}: {split} accuracy "
                             f"{metrics.get(split + '_accuracy', float('nan')):.4f}")
        c = metrics["calibration"]
        plot_reliability(calib.get(f"{c['split']}_bins_before", []), calib.get(f"{c['split']}_bins_after", []),
                         tmp / "reliability.png",
                         title=f"{c['split']}: ECE {c.get(c['split'] + '_ece_before', float('nan')):.4f} -> "
                               f"{c.get(c['split'] + '_ece_after', float('nan')):.4f} (T = {config.temperature:g})")
        plot_fallback(metrics["fallback"]["curve"], tmp / "fallback.png", SelectionConfig().min_confidence,
                      title=f"fallback to the base model: {metrics['fallback']['in_domain_split']} prompts vs "
                            f"{metrics['fallback']['ood_prompts']} out-of-domain prompts")


def _calibration(logits: dict, y: dict, temperature: float) -> dict:
    """ECE before/after temperature scaling on val and test (test is the honest figure: T was fitted on val)."""
    out: dict = {"temperature": temperature, "bins": ECE_BINS, "split": "test" if "test" in logits else "val"}
    for s in ("val", "test"):
        if s not in logits:
            continue
        for tag, t in (("before", 1.0), ("after", temperature)):
            p = torch.softmax(logits[s] / t, -1)
            out[f"{s}_ece_{tag}"] = calibration_error(p, y[s])
            out[f"{s}_nll_{tag}"] = float(F.cross_entropy(logits[s] / t, y[s]))
            out[f"{s}_bins_{tag}"] = reliability_bins(p, y[s])
    return out


def _fallback(logits: dict, y: dict, ood_logits: torch.Tensor, temperature: float) -> dict:
    """The fallback trade-off of this router: held-out in-domain prompts against the packaged OOD prompts."""
    split = "test" if "test" in logits else ("val" if "val" in logits else "train")
    curve = fallback_curve(torch.softmax(logits[split] / temperature, -1), torch.softmax(ood_logits / temperature, -1),
                           y[split])
    return {"in_domain_split": split, "ood_prompts": len(ood_logits), "curve": curve}

def _evaluate(logits: dict, y: dict, labels: list[str]) -> dict:
    """Accuracy per split; on test (else val, else train): per-task accuracy, confusion matrix and confusions."""
    out: dict = {f"{s}_accuracy": _accuracy(lg, y[s]) for s, lg in logits.items()}
    split = "test" if "test" in logits else ("val" if "val" in logits else "train")
    pred, true = logits[split].argmax(-1), y[split]
    n = len(labels)
    conf = torch.zeros(n, n, dtype=torch.int64)
    conf.index_put_((true, pred), torch.ones_like(true), accumulate=True)
    out["confusion_split"] = split
    out["confusion"] = conf.tolist()
    out["per_task_accuracy"] = {labels[i]: (float(conf[i, i] / conf[i].sum()) if conf[i].sum() else None)
                                for i in range(n)}
    valid = [v for v in out["per_task_accuracy"].values() if v is not None]
    out["mean_task_accuracy"] = sum(valid) / len(valid) if valid else None
    pairs = [(labels[i], labels[j], int(conf[i, j])) for i in range(n) for j in range(n) if i != j and conf[i, j]]
    out["confusions"] = [{"true": a, "predicted": b, "count": c} for a, b, c in sorted(pairs, key=lambda t: -t[2])]
    return out


def _composite_metrics(model, kind: str, encoder: TokenEncoder, path: Path, labels: list[str], pad_id: int,
                       temperature: float = 1.0) -> dict:
    """On multi-task composite samples: how many of the sample's tasks are among the router's top-k (k = number
    of tasks in the sample), and how often top-p selection (default top_p) keeps them all (paper Fig. 1 style)."""
    from .select import select_top_p

    rows = read_router_file(path, labels, allow_empty=True)
    rows = [r for r in rows if isinstance(r.get("labels"), list)]
    if not rows:
        return {}
    enc = encoder.encode([r["text"] for r in rows])
    probs = torch.softmax(_predict_logits(model, kind, enc, 1024, pad_id) / temperature, -1)
    top_p = SelectionConfig().top_p
    w = select_top_p(probs, top_p)
    recall, all_kept = [], []
    for i, r in enumerate(rows):
        k = len(r["labels"])
        top = set(probs[i].topk(min(k, probs.shape[1])).indices.tolist())
        recall.append(len(top & set(r["labels"])) / k)
        all_kept.append(all(w[i, j] > 0 for j in r["labels"]))
    return {"samples": len(rows), "recall_at_k": sum(recall) / len(rows), "top_p": top_p,
            f"top_p_{top_p:g}_keeps_all": sum(all_kept) / len(rows)}


def plot_confusion(conf: Sequence[Sequence[int]], labels: list[str], out: Path, title: str = "") -> Path:
    """Row-normalised confusion matrix as a PNG; counts printed in every non-empty cell."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = torch.tensor(conf, dtype=torch.float64)
    norm = m / m.sum(1, keepdim=True).clamp_min(1)
    n = len(labels)
    size = max(4.0, 0.45 * n + 2.5)
    fig, ax = plt.subplots(figsize=(size + 1.5, size))
    im = ax.imshow(norm.numpy(), cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), labels, rotation=90, fontsize=7 if n > 12 else 9)
    ax.set_yticks(range(n), labels, fontsize=7 if n > 12 else 9)
    ax.set_xlabel("predicted task")
    ax.set_ylabel("true task")
    for i in range(n):
        for j in range(n):
            c = int(m[i, j])
            if c:
                ax.text(j, i, str(c), ha="center", va="center", fontsize=6 if n > 12 else 8,
                        color="white" if norm[i, j] > 0.5 else ("red" if i != j else "black"))
    if title:
        ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
