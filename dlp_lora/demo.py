"""``dlp-lora demo``: the whole DLP-LoRA pipeline on the embedded default model, offline, resumable.

Stages (each writes one folder that is complete or absent, so a re-run reuses finished stages and an
interrupted one is simply redone):

    data/train/, data/test/     built-in tasks (held-out test questions never appear in training)
    adapters/, adapters.txt     one LoRA per task (PEFT + Trainer)
    router_data/                balanced router data, labels in adapter order
    router/                     the mini-MLP router
    eval/                       base / single / DLP-LoRA / uniform on the held-out questions
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path

from .config import (DLPError, LoRATrainConfig, RouterConfig, RouterDataConfig, atomic_dir, atomic_write_json,
                     check, save_config)


@dataclasses.dataclass
class DemoConfig:
    """What the demo runs; ``--quick`` swaps in :data:`QUICK` (tiny model, a few steps)."""

    model: str = "default"                  # base model: "default" (SmolLM2-135M-Instruct), "tiny" or a folder
    tasks: str = "arithmetic,boolean_logic,counting,date_arithmetic,word_reversal,word_sorting"
    n_train: int = 256                      # training records per task (also the router's source data)
    n_test: int = 24                        # held-out test questions per task
    max_steps: int = 40                     # LoRA optimiser steps per task
    learning_rate: float = 1e-3             # LoRA learning rate (high because the budget is a few dozen steps)
    batch_size: int = 8                     # LoRA batch size
    rank: int = 8                           # LoRA rank (paper: 8)
    router_epochs: int = 20                 # mini-MLP epochs (early stopping on validation)
    max_new_tokens: int = 24                # generation length during evaluation
    seed: int = 0                           # seed for data, LoRA and router

    def __post_init__(self) -> None:
        for name in ("n_train", "n_test", "max_steps", "batch_size", "rank", "router_epochs", "max_new_tokens"):
            v = getattr(self, name)
            check(isinstance(v, int) and v > 0, f"{name} must be a positive integer, got {v!r}")

    def task_list(self) -> list[str] | None:
        return [t.strip() for t in self.tasks.split(",") if t.strip()] or None


QUICK = dict(model="tiny", n_train=48, n_test=4, max_steps=4, batch_size=4, router_epochs=3, max_new_tokens=6)

DEMO_PROMPTS = [
    "Tom has 12 apples and buys 7 more. How many apples does he have now?",
    "Reverse the order of these words: quiet green tall",
    "Which day of the week comes 10 days after Monday? Evaluate the boolean expression: True and not False",
]


def _say(msg: str) -> None:
    print(msg, flush=True)


def _stage(name: str, path: Path, force: bool) -> bool:
    """True when the stage must run; removes a finished artifact when forced."""
    if path.exists() and not force:
        _say(f"[{name}] reusing {path}")
        return False
    if path.exists():
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    _say(f"[{name}] -> {path}")
    return True


def _Estimate(total_steps: int):
    """A Trainer callback that prints, once, how long all adapters will take (from the first steps' pace)."""
    from transformers import TrainerCallback

    class Estimate(TrainerCallback):
        def __init__(self) -> None:
            self.t0: float | None = None
            self.done = False

        def on_step_end(self, args, state, control, **kw):
            if self.done:
                return
            if state.global_step == 1:  # step 1 includes warm-up costs; time from here
                self.t0 = time.time()
            elif self.t0 is not None and state.global_step == 4:
                per_step = (time.time() - self.t0) / 3
                _say(f"\n[adapters] estimate: ~{per_step:.1f} s/step -> ~{per_step * total_steps / 60:.1f} min "
                     f"for {total_steps} steps in all")
                self.done = True

    return Estimate()


def _make_data(cfg: DemoConfig, data_dir: Path) -> None:
    from .data import TaskData, write_task
    from .tasks import BUILTIN_TASKS, generate_task

    names = cfg.task_list() or sorted(BUILTIN_TASKS)
    with atomic_dir(data_dir) as tmp:
        for name in names:
            train = generate_task(name, cfg.n_train, seed=cfg.seed)
            seen = {r.question for r in train.records}
            # test questions from another seed, minus anything seen in training (no leakage)
            pool = generate_task(name, cfg.n_test * 4 + 16, seed=cfg.seed + 1000)
            test = [r for r in pool.records if r.question not in seen][: cfg.n_test]
            if len(test) < cfg.n_test:
                raise DLPError(f"task {name}: only {len(test)} unseen test questions (asked for {cfg.n_test})")
            write_task(tmp / "train" / f"{name}.json", train)
            write_task(tmp / "test" / f"{name}.json",
                       TaskData(name=name, records=test, metric=train.metric, choices=train.choices))


def run_demo(out: str | Path = "demo_run", quick: bool = False, force: bool = False,
             config: DemoConfig | None = None, live_prompts: list[str] | None = None) -> dict:
    """Run (or resume) every stage; returns the evaluation summary plus the live examples."""
    from .models import resolve_model_path

    cfg = config or (DemoConfig(**QUICK) if quick else DemoConfig())
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "demo_config.json")
    t_start = time.time()
    timings: dict[str, float] = {}

    t = time.time()
    _say(f"[model] {cfg.model}")
    model_path = resolve_model_path(cfg.model)
    timings["model"] = time.time() - t

    data_dir = out / "data"
    t = time.time()
    if _stage("data", data_dir, force):
        _make_data(cfg, data_dir)
    timings["data"] = time.time() - t

    from .lora import train_adapters

    adapters_txt = out / "adapters.txt"
    t = time.time()
    if force and (out / "adapters").exists():
        shutil.rmtree(out / "adapters")
        adapters_txt.unlink(missing_ok=True)
    if adapters_txt.exists():
        _say(f"[adapters] reusing {adapters_txt}")
    else:
        n_tasks = len(list((data_dir / "train").glob("*.json"))) - len(list((data_dir / "train").glob("*.meta.json")))
        _say(f"[adapters] training {n_tasks} LoRAs x {cfg.max_steps} steps (finished adapters are kept on interrupt)")
        lcfg = LoRATrainConfig(rank=cfg.rank, alpha=2.0 * cfg.rank, learning_rate=cfg.learning_rate,
                               max_steps=cfg.max_steps, batch_size=cfg.batch_size, seed=cfg.seed,
                               save_steps=max(10, cfg.max_steps // 2), logging_steps=max(1, cfg.max_steps // 8),
                               max_length=128)
        train_adapters(str(model_path), data_dir / "train", out, config=lcfg, resume=True,
                       callbacks=[_Estimate(n_tasks * cfg.max_steps)])
    timings["adapters"] = time.time() - t

    from .router import make_router_data, train_router

    t = time.time()
    if _stage("router data", out / "router_data", force):
        make_router_data(out / "router_data", adapters=adapters_txt, config=RouterDataConfig(seed=cfg.seed))
    if _stage("router", out / "router", force):
        train_router(out / "router_data", str(model_path), out / "router",
                     config=RouterConfig(epochs=cfg.router_epochs, seed=cfg.seed))
    timings["router"] = time.time() - t

    from .evaluate import evaluate

    t = time.time()
    eval_dir = out / "eval"
    if eval_dir.exists() and not force and (eval_dir / "summary.json").is_file():
        _say(f"[eval] reusing {eval_dir}")
        summary = json.loads((eval_dir / "summary.json").read_text())
    else:
        if eval_dir.exists():
            shutil.rmtree(eval_dir)
        _say(f"[eval] base / single / dlp / uniform on {cfg.n_test} held-out questions per task")
        summary = evaluate(out, data_dir=data_dir / "test", out_dir=eval_dir, model_spec=str(model_path),
                           systems=("base", "single", "dlp", "uniform"),
                           max_new_tokens=cfg.max_new_tokens)
    timings["eval"] = time.time() - t

    md = eval_dir / "summary.md"
    if md.is_file():
        _say("")
        _say(md.read_text())

    live = _live_routing(out, live_prompts or DEMO_PROMPTS, cfg.max_new_tokens)
    timings["total"] = time.time() - t_start
    atomic_write_json(out / "demo_summary.json", {"timings_s": timings, "live": live,
                                                  "eval": str(eval_dir), "config": dataclasses.asdict(cfg)})
    _say(f"\nArtifacts: {out}/ (adapters.txt, adapters/, router_data/, router/, eval/ with plots/)")
    _say(f"Total time: {timings['total']:.0f}s")
    _say(f"Web app:  dlp-lora ui --run {out}")
    _say(f"Server:   dlp-lora serve --run {out}")
    return {"summary": summary, "live": live, "timings": timings, "out": str(out)}


def _live_routing(run: Path, prompts: list[str], max_new_tokens: int) -> list[dict]:
    """Generate for a few prompts with per-sentence routing (the paper's granularity) and show each decision."""
    from .pipeline import DLPPipeline
    from .selection import SelectionConfig

    pipe = DLPPipeline.from_run(run)
    results = pipe.generate(prompts, SelectionConfig(granularity="sentence"), max_new_tokens=max_new_tokens)
    live = []
    _say("Live routing (granularity=sentence):")
    for prompt, res in zip(prompts, results):
        _say(f"\n> {prompt}\n{res.text.strip()}")
        for r in res.routing:
            mix = ", ".join(f"{n}={w:.2f}" for n, w in zip(r["selected"], r["weights"]))
            _say(f"   [{r['sentence'][:60]!r}] -> {mix or 'base model'}")
        live.append({"prompt": prompt, "text": res.text, "routing": res.routing})
    return live
