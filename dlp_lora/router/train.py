"""Train a router on router data, save it, (DESIGN §5); :mod:`.inference` loads it back as ``Router``.

Router folder (the contract between ``train-router`` and the pipeline)::

    router.safetensors   the weights (safetensors only; never pickles)
    config.json          the resolved RouterConfig: kind, sizes, vocab_size, num_labels, tokenizer identity
    labels.json          task names; label i == adapter i of adapters.txt
    tokenizer/           the tokenizer the router reads (save_pretrained); for the mini-MLP: the base LLM's
    hf/config.json       albert/distilroberta only: the architecture
    metrics.json         val/test accuracy, per-task test accuracy, confusion matrix, train seconds, params
    confusion.png        the test confusion matrix (row-normalised), so task collisions are visible

Training: AdamW, shuffled mini-batches, validation accuracy after every epoch, early stopping after
``patience`` epochs without improvement, best weights kept. Texts are tokenised once, in batch, before the
first epoch. The mini-MLP's embedding table gets sparse gradients (only the rows of the batch's tokens are
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

from ..config import DLPError, RouterConfig, atomic_dir, atomic_write_json, load_config, save_config
from .data import COMPOSITE_FILE, LABELS_FILE, adapter_task_names, check_label_order, read_labels, \
    read_router_data, read_router_file
from .hf import HF_KINDS, build_hf_router, hf_logits, rebuild_hf_router, special_ids
from .inference import ROUTER_FILES, ROUTER_WEIGHTS, Router, pad_id as _pad_id
from .mlp import Encoded, MiniMLPRouter, TokenEncoder, count_params, drop_tokens



# ----------------------------------------------------------------------------------------------------------------
# Shared forward helpers
# ----------------------------------------------------------------------------------------------------------------

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


# ----------------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------------

def _build_model(config: RouterConfig, num_labels: int, base_tokenizer):
    if config.kind == "mlp":
        if config.pretrained:
            raise DLPError("--pretrained is for albert/distilroberta routers; the mini-MLP is trained from scratch")
        model = MiniMLPRouter(len(base_tokenizer), num_labels, config.embed_dim, config.hidden_dim,
                              config.mlp_dropout, config.activation, config.embed_init_std, config.pooling)
        # Sparse embedding gradients: a batch touches a few hundred of the ~50k rows.
        model.embed.sparse = True
        return model, base_tokenizer, "base"
    return build_hf_router(config, num_labels, base_tokenizer)


def _encoder_for(model, config: RouterConfig, tokenizer, source: str) -> TokenEncoder:
    if config.kind == "mlp":
        return TokenEncoder(tokenizer, config.max_tokens)
    prefix, suffix = special_ids(tokenizer, source)
    return TokenEncoder(tokenizer, config.max_tokens, prefix, suffix)


def _optimizers(model, config: RouterConfig) -> list[torch.optim.Optimizer]:
    if config.kind == "mlp":
        emb = [model.embed.weight]
        rest = [p for n, p in model.named_parameters() if not n.startswith("embed.")]
        return [torch.optim.SparseAdam(emb, lr=config.learning_rate),
                torch.optim.AdamW(rest, lr=config.learning_rate, weight_decay=0.01)]
    return [torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=0.01)]


def _accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    return float((logits.argmax(-1) == y).float().mean()) if len(y) else float("nan")


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints: one safetensors file per run, rewritten atomically after every epoch (resume with resume=True)
# ----------------------------------------------------------------------------------------------------------------

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
    from tqdm.auto import tqdm

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
    base_id = tokenizer_identity(base_tok)
    torch.manual_seed(config.seed)
    model, tok, source = _build_model(config, len(labels), base_tok)
    encoder = _encoder_for(model, config, tok, source)
    pad_id = _pad_id(model, config.kind)
    t0 = time.time()
    enc = {s: encoder.encode([r["text"] for r in rows]) for s, rows in splits.items()}
    y = {s: torch.tensor([r["label"] for r in rows], dtype=torch.int64) for s, rows in splits.items()}
    tokenize_seconds = time.time() - t0
    n_params = count_params(model)
    if progress:
        print(f"router: {config.kind}, {n_params:,} parameters, {len(labels)} tasks, vocabulary {len(tok):,}, "
              f"{len(enc['train'])} train / {len(enc['val'])} val / {len(enc['test'])} test records")

    opts = _optimizers(model, config)
    gen = torch.Generator().manual_seed(config.seed)
    n = len(enc["train"])
    has_val = len(enc["val"]) > 0
    best = (-1.0, float("inf"))
    best_state, best_epoch, bad, history = None, 0, 0, []
    key = _resume_key(config, data_dir, labels, base_id)
    ckpt = work / CHECKPOINT
    start, stopped = 1, False
    if resume and ckpt.is_file():
        st, best_state = _load_checkpoint(ckpt, model, opts, gen)
        if st.get("key") != key:
            raise DLPError(f"{work}: the interrupted training used other data or options "
                           f"(rerun without --resume to start over)")
        start, history, bad, best_epoch, stopped = st["epoch"] + 1, st["history"], st["bad"], st["best_epoch"], \
            st["stopped"]
        best = tuple(st["best"])
        if progress:
            print(f"resuming router training after epoch {st['epoch']}")
    else:
        shutil.rmtree(work, ignore_errors=True)     # a stale checkpoint of other options/data
    try:
        work.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DLPError(f"{work}: cannot create the checkpoint folder ({e.strerror or e.__class__.__name__})") from None
    resumed_from = start - 1
    last_save = time.time()
    bar = tqdm(range(start, config.epochs + 1) if not stopped else [], desc="train router", disable=not progress,
               unit="epoch", initial=start - 1, total=config.epochs)
    for epoch in bar:
        model.train()
        perm = torch.randperm(n, generator=gen)
        total, steps = 0.0, 0
        for i in range(0, n, config.batch_size):
            idx = perm[i: i + config.batch_size]
            logits = _forward(model, config.kind, enc["train"], idx, pad_id, config.token_dropout, gen,
                              config.crop_prob)
            loss = F.cross_entropy(logits, y["train"][idx])
            for o in opts:
                o.zero_grad(set_to_none=True)
            loss.backward()
            for o in opts:
                o.step()
            total += float(loss.detach())
            steps += 1
        if has_val:
            vlog = _predict_logits(model, config.kind, enc["val"], 1024, pad_id)
            vacc, vloss = _accuracy(vlog, y["val"]), float(F.cross_entropy(vlog, y["val"]))
        else:  # no validation split: keep the last epoch
            vacc, vloss = float(epoch), 0.0
        history.append({"epoch": epoch, "train_loss": total / max(steps, 1),
                        **({"val_accuracy": vacc, "val_loss": vloss} if has_val else {})})
        bar.set_postfix(loss=f"{total / max(steps, 1):.4f}", **({"val_acc": f"{vacc:.4f}"} if has_val else {}))
        if vacc > best[0] or (vacc == best[0] and vloss < best[1] - 1e-6):
            best, best_epoch, bad = (vacc, vloss), epoch, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            bad += 1
            stopped = bad >= config.patience
        if time.time() - last_save >= checkpoint_seconds and not stopped and epoch < config.epochs:
            _save_checkpoint(ckpt, model, opts, gen, {"key": key, "epoch": epoch, "history": history, "bad": bad,
                                                      "best_epoch": best_epoch, "best": list(best), "stopped": stopped},
                             best_state)
            last_save = time.time()
        if stopped:
            break
    bar.close()
    train_seconds = time.time() - t0
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    if config.kind == "mlp":
        model.embed.sparse = False

    metrics = _evaluate(model, config.kind, enc, y, labels, pad_id)
    metrics.update({
        "kind": config.kind, "params": n_params, "epochs_run": len(history), "best_epoch": best_epoch,
        "train_seconds": round(train_seconds, 3), "tokenize_seconds": round(tokenize_seconds, 3),
        "records": {s: len(e) for s, e in enc.items()}, "history": history, "data": str(Path(data_dir).absolute()),
        "model": str(model_spec), "base_tokenizer": base_id, "tokenizer_source": source,
        "torch_threads": torch.get_num_threads(), "resumed_from_epoch": resumed_from,
    })
    comp = Path(data_dir) / COMPOSITE_FILE
    if comp.is_file():
        metrics["composite"] = _composite_metrics(model, config.kind, encoder, comp, labels, pad_id)

    resolved = dataclasses.replace(config, vocab_size=len(tok), num_labels=len(labels),
                                   tokenizer=tokenizer_identity(tok), tokenizer_source=source)
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        from safetensors.torch import save_model

        save_model(model, str(tmp / ROUTER_WEIGHTS))
        save_config(resolved, tmp / "config.json")
        atomic_write_json(tmp / LABELS_FILE, labels)
        tok.save_pretrained(tmp / "tokenizer")
        if config.kind in HF_KINDS:
            model.config.save_pretrained(tmp / "hf")
        atomic_write_json(tmp / "metrics.json", metrics)
        plot_confusion(metrics["confusion"], labels, tmp / "confusion.png",
                       title=f"router {config.kind}: {metrics['confusion_split']} accuracy "
                             f"{metrics.get(metrics['confusion_split'] + '_accuracy', float('nan')):.4f}")
    shutil.rmtree(work, ignore_errors=True)
    return out_dir


def _evaluate(model, kind: str, enc: dict, y: dict, labels: list[str], pad_id: int) -> dict:
    out: dict = {}
    logits = {s: _predict_logits(model, kind, enc[s], 1024, pad_id) for s in ("train", "val", "test") if len(enc[s])}
    for s, lg in logits.items():
        out[f"{s}_accuracy"] = _accuracy(lg, y[s])
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


def _composite_metrics(model, kind: str, encoder: TokenEncoder, path: Path, labels: list[str], pad_id: int) -> dict:
    """On multi-task composite samples: how many of the sample's tasks are among the router's top-k (k = number
    of tasks in the sample), and how often top-p 0.8 selection keeps them all (paper Fig. 1 style)."""
    from .select import select_top_p

    rows = read_router_file(path, labels, allow_empty=True)
    rows = [r for r in rows if isinstance(r.get("labels"), list)]
    if not rows:
        return {}
    enc = encoder.encode([r["text"] for r in rows])
    probs = torch.softmax(_predict_logits(model, kind, enc, 1024, pad_id), -1)
    w = select_top_p(probs, 0.8)
    recall, all_kept = [], []
    for i, r in enumerate(rows):
        k = len(r["labels"])
        top = set(probs[i].topk(min(k, probs.shape[1])).indices.tolist())
        recall.append(len(top & set(r["labels"])) / k)
        all_kept.append(all(w[i, j] > 0 for j in r["labels"]))
    return {"samples": len(rows), "recall_at_k": sum(recall) / len(rows),
            "top_p_0.8_keeps_all": sum(all_kept) / len(rows)}


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
