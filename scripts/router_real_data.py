"""Router accuracy, calibration, fallback and add-a-task on the real tasks of ../shared/data -> docs/router_results.md.

Converts the raw files (GSM8K, StrategyQA, 17 BIG-Bench-Hard tasks, 2 BIG-bench tasks) with
``dlp_lora.tasks.convert_shared_suite``, builds balanced prompt-level router data (the smallest task's number of
distinct questions per task, split by question, no leakage) and trains the mini-MLP on the default model's
tokenizer (SmolLM2-135M-Instruct) with three seeds. It writes to ``docs/``:

* ``router_results.md``: per-task test accuracy of each seed, the same recipe on other splits and other task sets
  (the 8 built-in tasks, the 17 BIG-Bench-Hard tasks alone), calibration (ECE before/after temperature
  scaling), the fallback trade-off (out-of-domain prompts sent to the base model against in-domain prompts
  sent there by mistake) and the default ``min_confidence`` it implies, the add-a-task and remove-a-task
  timings with the other tasks' accuracy before and after, router speed, and (``--ablations``) what each
  part of the recipe adds;
* ``router_confusion.png`` (test confusions of the seeds summed), ``router_reliability.png`` (reliability
  diagram), ``router_fallback.png`` (fallback trade-off curve).

    OMP_NUM_THREADS=1 nice .venv/bin/python scripts/router_real_data.py              # ~10 min on a quiet 2-core CPU
    OMP_NUM_THREADS=1 nice .venv/bin/python scripts/router_real_data.py --ablations  # + recipe ablations (~10 min more)
    .venv/bin/python scripts/router_real_data.py --speed-only /tmp/dlp_router_real/router_seed0
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from dlp_lora.router.calibrate import FALLBACK_THRESHOLDS  # noqa: E402  (after the sys.path line)

BBH_ONLY_DROP = ("gsm8k", "strategyqa", "abstract_narrative_understanding", "disfl_qa")
ADD_TASKS = "strategyqa,snarks,web_of_lies"       # the confusable yes/no-style tasks, added last
IN_DOMAIN_LOSS = 0.01       # default min_confidence: the largest threshold sending <= 1% of in-domain inputs to base
ABLATIONS = {               # name -> RouterConfig changes (the default recipe is head_tokens=4, label_smoothing=0.1)
    "paper mini-MLP (mean only, no label smoothing)": {"head_tokens": 0, "label_smoothing": 0.0},
    "+ label smoothing 0.1 only": {"head_tokens": 0},
    "+ head pooling (4 tokens) only": {"label_smoothing": 0.0},
    "head pooling + label smoothing (default)": {},
    "default + mean+max pooling": {"pooling": "mean+max"},
    "default, patience 6": {"patience": 6},
}


def main() -> int:
    args = _parse()
    import torch

    torch.set_num_threads(args.threads)
    if args.from_report:
        write_results(json.loads(Path(args.from_report).read_text()), Path(args.out_md))
        return 0
    if args.speed_only:
        test = Path(args.work) / "router_data" / "test.jsonl"
        print(json.dumps(measure_speed(Path(args.speed_only), test), indent=2))
        return 0
    work = Path(args.work)
    tasks = _convert(args.shared, work / "tasks")
    seeds = [int(x) for x in args.router_seeds.split(",")]
    main_runs = train_seeds(tasks, work / "router_data", work, seeds, args)
    rep = {"args": vars(args), "threads": torch.get_num_threads(), "main": main_runs,
           "splits": {ds: train_seeds(tasks, work / f"router_data_split{ds}", work, seeds, args, data_seed=ds,
                                      tag=f"split{ds}")
                      for ds in (int(x) for x in args.data_seeds.split(",") if x)},
           "task_sets": _other_task_sets(work, tasks, seeds, args)}
    rep["calibration"] = calibration_report(main_runs, work / "router_data")
    rep["fallback"] = fallback_report(main_runs, work, tasks, args)
    rep["add"] = [add_task_report(tasks, work, name, args) for name in args.add_tasks.split(",") if name]
    rep["speed"] = measure_speed(Path(main_runs[0]["router"]), work / "router_data" / "test.jsonl")
    if args.ablations:
        rep["ablations"] = ablation_report(tasks, work, seeds, args)
    (work / "report.json").write_text(json.dumps(rep, indent=1, default=str))
    write_results(rep, Path(args.out_md))
    return 0


def _parse():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shared", default=str(ROOT.parent / "shared" / "data"), help="the shared raw data folder")
    ap.add_argument("--work", default="/tmp/dlp_router_real", help="scratch folder for tasks, data and routers")
    ap.add_argument("--out-md", default=str(ROOT / "docs" / "router_results.md"), help="results page (PNGs beside it)")
    ap.add_argument("--per-task", type=int, default=0, help="questions per task (0: the smallest task's, 178)")
    ap.add_argument("--seed", type=int, default=0, help="router data seed of the main table (sampling and split)")
    ap.add_argument("--router-seeds", default="0,1,2", help="one router per seed (init and batch order)")
    ap.add_argument("--data-seeds", default="1,2", help="other sampling/splitting seeds the recipe is checked on")
    ap.add_argument("--add-tasks", default=ADD_TASKS, help="tasks left out, then added with add-task")
    ap.add_argument("--ablations", action="store_true", help="also train the recipe's ablations")
    ap.add_argument("--model", default="default", help="base model whose tokenizer the router reads")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (fixed and printed, DESIGN §7)")
    ap.add_argument("--speed-only", default=None, metavar="ROUTER_DIR", help="only measure Router.probs speed")
    ap.add_argument("--from-report", default=None, metavar="REPORT_JSON",
                    help="only rewrite the page and figures from the report.json of an earlier run")
    return ap.parse_args()


def _convert(shared: str, out: Path) -> Path:
    from dlp_lora.tasks import convert_shared_suite

    shutil.rmtree(out, ignore_errors=True)
    paths = convert_shared_suite(shared, out, progress=False)
    print(f"converted {len(paths)} tasks -> {out}")
    return out


def _task_subset(tasks: Path, out: Path, drop=(), keep=None) -> Path:
    """A folder of links to some task files (and their .meta.json sidecars)."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    for f in sorted(tasks.iterdir()):
        name = f.name.split(".")[0]
        if name in drop or (keep is not None and name not in keep):
            continue
        (out / f.name).symlink_to(f.resolve())
    return out


# Training and evaluating routers

def train_seeds(tasks: Path, data_dir: Path, work: Path, seeds: list[int], args, data_seed: int | None = None,
                tag: str = "", overrides: dict | None = None, granularity: str = "prompt",
                per_task: int | None = None) -> list[dict]:
    """Router data from ``tasks`` (seed ``data_seed``), one router per seed; their metrics.json (+ paths)."""
    from dlp_lora.config import RouterConfig, RouterDataConfig
    from dlp_lora.router import make_router_data, train_router

    ds = args.seed if data_seed is None else data_seed
    make_router_data(data_dir, data_dir=tasks, overwrite=True, progress=False,
                     config=RouterDataConfig(per_task=args.per_task if per_task is None else per_task, seed=ds,
                                             granularity=granularity))
    runs = []
    for seed in seeds:
        out = work / f"router{'_' + tag if tag else ''}_seed{seed}"
        train_router(data_dir, args.model, out, RouterConfig(seed=seed, **(overrides or {})), overwrite=True,
                     progress=False)
        m = json.loads((out / "metrics.json").read_text())
        m.update(router=str(out), data=str(data_dir))
        runs.append(m)
        print(f"{tag or 'main'} seed {seed}: test {100 * m['test_accuracy']:.2f}% val {100 * m['val_accuracy']:.2f}% "
              f"({m['train_seconds']:.1f}s)")
    return runs


def _other_task_sets(work: Path, tasks: Path, seeds: list[int], args) -> dict:
    """The same recipe, unchanged, on task sets it was not tuned on."""
    from dlp_lora.tasks import write_builtin_tasks

    builtin = work / "builtin_tasks"
    shutil.rmtree(builtin, ignore_errors=True)
    write_builtin_tasks(builtin, n=300, seed=0)
    bbh = _task_subset(tasks, work / "bbh_tasks", drop=BBH_ONLY_DROP)
    return {"8 built-in tasks (300 generated questions each)": train_seeds(builtin, work / "rd_builtin", work, seeds,
                                                                            args, tag="builtin"),
            "17 BIG-Bench-Hard tasks alone": train_seeds(bbh, work / "rd_bbh", work, seeds, args, tag="bbh")}


def ablation_report(tasks: Path, work: Path, seeds: list[int], args) -> dict:
    """Test errors of each recipe variant over 3 data splits x the router seeds."""
    out = {}
    for name, changes in ABLATIONS.items():
        runs = []
        for ds in (args.seed, *(int(x) for x in args.data_seeds.split(",") if x)):
            runs += train_seeds(tasks, work / f"rd_abl{ds}", work, seeds, args, data_seed=ds, tag="ablation",
                                overrides=changes)
        out[name] = {"test_errors": [round((1 - r["test_accuracy"]) * r["records"]["test"]) for r in runs],
                     "val_errors": [round((1 - r["val_accuracy"]) * r["records"]["val"]) for r in runs],
                     "records": runs[0]["records"], "params": runs[0]["params"]}
    return out


# Calibration and fallback

def _logits(router_dir: str, texts: list[str]):
    from dlp_lora.router import Router

    r = Router.load(router_dir)
    return r.logits(texts), r.temperature


def _split(data_dir: Path, split: str) -> list[dict]:
    return [json.loads(line) for line in (data_dir / f"{split}.jsonl").read_text().splitlines() if line.strip()]


def calibration_report(runs: list[dict], data_dir: Path) -> dict:
    """Per seed: temperature and ECE before/after on val and test; the test reliability bins pooled over seeds."""
    import torch

    from dlp_lora.router.calibrate import reliability_bins

    test = _split(data_dir, "test")
    y = torch.tensor([r["label"] for r in test])
    before, after = [], []
    for m in runs:
        logits, t = _logits(m["router"], [r["text"] for r in test])
        before.append(torch.softmax(logits, -1))
        after.append(torch.softmax(logits / t, -1))
    ys = y.repeat(len(runs))
    return {"seeds": [m["calibration"] for m in runs],
            "bins_before": reliability_bins(torch.cat(before), ys),
            "bins_after": reliability_bins(torch.cat(after), ys)}


def fallback_report(runs: list[dict], work: Path, tasks: Path, args) -> dict:
    """The trade-off curve per seed (in-domain test prompts vs the OOD prompts), its mean, the default threshold it
    implies, and the same thresholds applied per sentence (the pipeline's default granularity)."""
    curves = [m["fallback"]["curve"] for m in runs]
    mean = [{k: statistics.mean(c[i][k] for c in curves) for k in curves[0][i]} for i in range(len(curves[0]))]
    sent_runs = train_seeds(tasks, work / "router_data_sentence", work, [0], args, tag="sentence",
                            granularity="sentence")
    return {"curves": curves, "mean": mean,
            "by_kind": _ood_by_kind(runs[0]["router"]),
            "sentences_prompt_router": _sentence_fallback(runs[0]["router"], work / "router_data", "prompt"),
            "sentences_sentence_router": _sentence_fallback(sent_runs[0]["router"], work / "router_data_sentence",
                                                            "sentence"),
            "sentence_router": {k: sent_runs[0][k] for k in ("test_accuracy", "records")}}


def choose_default(fb: dict) -> tuple[float, float]:
    """(default min_confidence, threshold for whole-prompt routing): the largest grid thresholds that send at
    most IN_DOMAIN_LOSS of in-domain inputs to base - for the default, both whole prompts and single sentences
    (the pipeline's default granularity, with the default prompt-trained router); for the other, prompts only."""
    sent = {round(r["threshold"], 2): r["in_domain_to_base"] for r in fb["sentences_prompt_router"]}
    prompt_ok = [r["threshold"] for r in fb["mean"] if r["in_domain_to_base"] <= IN_DOMAIN_LOSS]
    both_ok = [t for t in prompt_ok if sent.get(round(t, 2), 1.0) <= IN_DOMAIN_LOSS]
    return (max(both_ok) if both_ok else 0.0), (max(prompt_ok) if prompt_ok else 0.0)


def _ood_by_kind(router_dir: str) -> dict:
    """For each threshold: the share of each kind of OOD prompt sent to base."""
    import torch

    from dlp_lora.router.calibrate import read_ood_prompts

    rows = read_ood_prompts()
    logits, t = _logits(router_dir, [r["text"] for r in rows])
    top = torch.softmax(logits / t, -1).max(-1).values.tolist()
    out = {}
    for th in FALLBACK_THRESHOLDS:
        kinds: dict[str, list[bool]] = {}
        for r, p in zip(rows, top):
            kinds.setdefault(r["kind"], []).append(p < th)
        out[f"{th:g}"] = {k: sum(v) / len(v) for k, v in kinds.items()}
    return out


def _sentence_fallback(router_dir: str, data_dir: Path, granularity: str) -> list[dict]:
    """Share of in-domain test sentences and of OOD-prompt sentences under each threshold, routed one by one."""
    import torch

    from dlp_lora.data import split_sentences
    from dlp_lora.router.calibrate import fallback_curve, read_ood_prompts

    test = [r["text"] for r in _split(data_dir, "test")]
    sents = test if granularity == "sentence" else [s for t in test for s in split_sentences(t)]
    ood = [s for r in read_ood_prompts() for s in split_sentences(r["text"])]
    lin, t = _logits(router_dir, sents)
    lood, _ = _logits(router_dir, ood)
    return fallback_curve(torch.softmax(lin / t, -1), torch.softmax(lood / t, -1))


# Adding a task to a trained router

def add_task_report(tasks: Path, work: Path, name: str, args) -> dict:
    """Leave ``name`` out, train the router on the others, then add it as add-task does and remove it again.
    Other tasks' accuracy is measured on their test questions plus every question the router data did not use."""
    from dlp_lora.data import read_task
    from dlp_lora.router.update import update_router_files

    base = work / f"add_{name}"
    shutil.rmtree(base, ignore_errors=True)
    others = _task_subset(tasks, base / "tasks", drop=(name,))
    per_task = json.loads((work / "router_data" / "stats.json").read_text())["per_task"]   # as in the full set
    runs = train_seeds(others, base / "router_data", base, [0], args, tag=f"without_{name}", per_task=per_task)
    shutil.move(runs[0]["router"], base / "router")
    labels = json.loads((base / "router" / "labels.json").read_text())
    extra = _unused_questions(others, base / "router_data")
    before = _accuracy_on(base / "router", extra)
    stage = base / ".stage"
    t0 = time.time()
    update_router_files(base, stage, ("add", name), read_task(tasks / f"{name}.json"), "", labels)
    seconds = time.time() - t0
    after = _accuracy_on(stage / "router", extra)
    res = json.loads((stage / "router" / "metrics.json").read_text())["update"]
    for name_ in ("router", "router_data"):
        shutil.rmtree(base / name_)
        shutil.move(stage / name_, base / name_)
    t1 = time.time()
    update_router_files(base, base / ".stage2", ("remove", name), None, "", labels + [name])
    report = {"task": name, "seconds": round(seconds, 1), "remove_seconds": round(time.time() - t1, 1),
              "extra_questions": len(extra), "extra_before": before, "extra_after": after,
              "old_test_records": sum(1 for r in _split(base / "router_data", "test") if r["task"] != name), **res}
    print(f"add {name}: {report}")
    return report


def _unused_questions(tasks: Path, data_dir: Path, per_task: int = 100) -> list[tuple[str, str]]:
    """(task, question) pairs the router data did not use, up to ``per_task`` per task."""
    from dlp_lora.data import read_task_dir

    used = {r["text"] for s in ("train", "val", "test") for r in _split(data_dir, s)}
    out = []
    for t in read_task_dir(tasks):
        qs = [q for q in dict.fromkeys(r.question.strip() for r in t.records) if q and q not in used]
        out += [(t.name, q) for q in qs[:per_task]]
    return out


def _accuracy_on(router_dir: Path, pairs: list[tuple[str, str]]) -> float | None:
    from dlp_lora.router import Router

    if not pairs:
        return None
    pred = Router.load(router_dir).predict([q for _, q in pairs])
    return sum(p == t for p, (t, _) in zip(pred, pairs)) / len(pairs)


# Speed

def measure_speed(router_dir: Path, test_file: Path, n_batched: int = 20000) -> dict:
    """Batch-1 latency and batched throughput of Router.probs on test sentences, tokenisation included."""
    import torch

    from dlp_lora.data import split_sentences
    from dlp_lora.router import Router

    router = Router.load(router_dir)
    prompts = [json.loads(line)["text"] for line in test_file.read_text().splitlines() if line.strip()]
    sents = [s for p in prompts for s in split_sentences(p)]
    for s in sents[:50]:
        router.probs([s])
    lat = []
    for _ in range(3):
        for s in sents[:500]:
            t = time.perf_counter()
            router.probs([s])
            lat.append(time.perf_counter() - t)
    lat.sort()
    big = (sents * (n_batched // len(sents) + 1))[:n_batched]
    router.probs(big[:1000])
    wall, cpu = [], []
    for _ in range(5):
        t, c = time.perf_counter(), time.process_time()
        router.probs(big)
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    return {"threads": torch.get_num_threads(), "sentences": len(sents),
            "mean_chars": sum(map(len, sents)) / len(sents),
            "batch1_ms_median": 1000 * lat[len(lat) // 2], "batch1_ms_p10": 1000 * lat[len(lat) // 10],
            "batch1_ms_p90": 1000 * lat[9 * len(lat) // 10],
            "batched_per_s": n_batched / statistics.median(wall),
            "batched_per_cpu_s": n_batched / statistics.median(cpu)}


# The results page

def write_results(rep: dict, md_path: Path) -> None:
    from dlp_lora.router.calibrate import plot_fallback, plot_reliability
    from dlp_lora.router.train import plot_confusion

    md_path.parent.mkdir(parents=True, exist_ok=True)
    png = {k: md_path.with_name(f"router_{k}.png") for k in ("confusion", "reliability", "fallback")}
    runs = rep["main"]
    labels = list(runs[0]["per_task_accuracy"])
    n = len(labels)
    total = [[sum(r["confusion"][i][j] for r in runs) for j in range(n)] for i in range(n)]
    plot_confusion(total, labels, png["confusion"], title="mini-MLP router, test confusions summed over the seeds")
    cal = rep["calibration"]
    plot_reliability(cal["bins_before"], cal["bins_after"], png["reliability"],
                     title="21 real tasks, test prompts of the 3 seeds pooled")
    fb = rep["fallback"]
    plot_fallback(fb["mean"], png["fallback"], choose_default(fb)[0],
                  title=f"21 real tasks: test prompts vs {runs[0]['fallback']['ood_prompts']} out-of-domain prompts "
                        f"(mean of {len(runs)} seeds)")
    lines = _md_header(rep) + _md_accuracy(rep) + _md_other_sets(rep) + _md_calibration(rep, png) + \
        _md_fallback(rep, png) + _md_add(rep) + _md_speed(rep) + _md_ablations(rep)
    lines += ["", f"Confusion matrix (test confusions of the seeds summed): [{png['confusion'].name}]"
                  f"({png['confusion'].name}).", ""]
    md_path.write_text("\n".join(lines))
    print("\n".join(lines))
    print(f"wrote {md_path} and {', '.join(p.name for p in png.values())}")


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.2f}"


def _md_header(rep: dict) -> list[str]:
    m = rep["main"][0]
    per_task = json.loads((Path(m["data"]) / "stats.json").read_text())["per_task"]
    return ["## Router results on the real tasks", "",
            f"Written by `OMP_NUM_THREADS=1 nice .venv/bin/python scripts/router_real_data.py"
            f"{' --ablations' if rep['args']['ablations'] else ''}` "
            f"({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {platform.machine()}, {rep['threads']} torch "
            f"thread(s), a shared 2-core machine).", "",
            f"Mini-MLP router, {m['params']:,} parameters (EmbeddingBag over the SmolLM2-135M-Instruct tokenizer's "
            f"49,152 tokens; mean of all tokens + mean of the first 4 tokens; 4-layer MLP; label smoothing 0.1; "
            f"temperature fitted on validation). Prompt-level records: {per_task} distinct questions drawn per task "
            f"(the smallest task's size), split 80/10/10 by question with no question in two splits: "
            f"{m['records']['train']} train / {m['records']['val']} val / {m['records']['test']} test.", ""]


def _md_accuracy(rep: dict) -> list[str]:
    runs = rep["main"]
    seeds = [r["router"].rsplit("seed", 1)[-1] for r in runs]
    rows = [f"| {t} | " + " | ".join(_pct(r["per_task_accuracy"][t]) for r in runs) + " |"
            for t in runs[0]["per_task_accuracy"]]
    conf: dict[str, int] = {}
    for r in runs:
        for c in r["confusions"]:
            conf[f"{c['true']} -> {c['predicted']}"] = conf.get(f"{c['true']} -> {c['predicted']}", 0) + c["count"]
    return ["### Accuracy per seed (target >= 99.5 % for every seed)", "",
            "| task | " + " | ".join(f"seed {s}" for s in seeds) + " |", "|---|" + "---:|" * len(runs), *rows,
            "| **test accuracy** | " + " | ".join(f"**{_pct(r['test_accuracy'])}**" for r in runs) + " |",
            "| validation accuracy | " + " | ".join(_pct(r["val_accuracy"]) for r in runs) + " |",
            "| training time (s) | " + " | ".join(f"{r['train_seconds']:.1f}" for r in runs) + " |",
            "| epochs run (best) | " + " | ".join(f"{r['epochs_run']} ({r['best_epoch']})" for r in runs) + " |", "",
            "Test confusions, all seeds (true -> predicted, count): "
            + (", ".join(f"{k} ({v})" for k, v in sorted(conf.items(), key=lambda kv: -kv[1])) or "none") + ".", ""]


def _md_other_sets(rep: dict) -> list[str]:
    out = ["### The same recipe on other splits and task sets (not tuned on them)", "",
           "| data | tasks | test records | " + " | ".join(f"seed {i}" for i in range(len(rep["main"]))) + " |",
           "|---|---:|---:|" + "---:|" * len(rep["main"])]
    sets = {f"21 real tasks, split seed {ds}": runs for ds, runs in rep["splits"].items()}
    sets.update(rep["task_sets"])
    for name, runs in sets.items():
        out.append(f"| {name} | {len(runs[0]['per_task_accuracy'])} | {runs[0]['records']['test']} | "
                   + " | ".join(_pct(r["test_accuracy"]) for r in runs) + " |")
    return out + [""]


def _md_calibration(rep: dict, png: dict) -> list[str]:
    rows = [f"| {i} | {c['temperature']:g} | {c['val_ece_before']:.4f} | {c['val_ece_after']:.4f} | "
            f"{c['test_ece_before']:.4f} | {c['test_ece_after']:.4f} |"
            for i, c in enumerate(rep["calibration"]["seeds"])]
    return ["### Calibration (temperature scaling on the validation split)", "",
            "ECE = expected calibration error of the top-1 probability, 15 bins. T < 1 sharpens: label smoothing "
            "trains "
            "the router to stay below 0.9 on purpose, and the fitted temperature undoes that. Test is the honest "
            "figure (T was fitted on validation).", "",
            "| seed | T | val ECE before | val ECE after | test ECE before | test ECE after |",
            "|---:|---:|---:|---:|---:|---:|",
            *rows, "", f"Reliability diagram: [{png['reliability'].name}]({png['reliability'].name}).", ""]


def _md_fallback(rep: dict, png: dict) -> list[str]:
    fb = rep["fallback"]
    chosen, prompt_t = choose_default(fb)
    show = sorted({0.3, 0.35, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, chosen, prompt_t})
    by_t = {round(r["threshold"], 2): r for r in fb["mean"]}
    sp = {round(r["threshold"], 2): r for r in fb["sentences_prompt_router"]}
    ss = {round(r["threshold"], 2): r for r in fb["sentences_sentence_router"]}
    rows = [f"| {t:g} | {_pct(by_t[t]['ood_to_base'])} | {_pct(by_t[t]['in_domain_to_base'])} | "
            f"{_pct(sp[t]['ood_to_base'])} / {_pct(sp[t]['in_domain_to_base'])} | "
            f"{_pct(ss[t]['ood_to_base'])} / {_pct(ss[t]['in_domain_to_base'])} |" for t in show if round(t, 2) in by_t]
    kinds = ", ".join(f"{k} {100 * v:.0f}%" for k, v in fb["by_kind"].get(f"{prompt_t:g}", {}).items())
    return ["### No adapter fits: falling back to the base model", "",
            f"`min_confidence` sends a routed input to the base model when its calibrated top-1 probability is below "
            f"it. Out-of-domain: the {rep['main'][0]['fallback']['ood_prompts']} prompts of "
            "`dlp_lora/router/ood_prompts.jsonl` (small talk, writing, code, cooking, travel, health, finance, "
            "science, history, advice, language, tech support, opinions, planning, and 20 near misses such as "
            "\"What's a good movie to watch tonight?\"); in-domain: the held-out test prompts. Whole prompts: mean "
            "of the seeds; per sentence: every sentence routed alone, as the pipeline's default granularity does "
            "(seed 0 of the prompt-trained router, and a router trained on sentences).", "",
            "| min_confidence | whole prompts: OOD -> base % | whole prompts: in-domain -> base % | per sentence, "
            "prompt router: OOD / in-domain % | per sentence, sentence router: OOD / in-domain % |",
            "|---:|---:|---:|---:|---:|", *rows, "",
            f"Whole prompts separate well: at **{prompt_t:g}** about {_pct(by_t[round(prompt_t, 2)]['ood_to_base'])} % "
            f"of the out-of-domain prompts fall back while at most {IN_DOMAIN_LOSS:.0%} of in-domain prompts do"
            + (f" (by kind: {kinds})" if kinds else "") + ". Single sentences do not: a sentence such as "
            "\"Options:\" or \"(B) 12/25/1937\" carries little task signal, so in-domain sentences are about as "
            "unsure as out-of-domain ones, and a high threshold sends many of them - often the prompt's last "
            "sentence, whose mixture starts the answer - to the base model. A router trained on sentences "
            f"({_pct(rep['fallback']['sentence_router']['test_accuracy'])} % sentence accuracy) separates better, "
            "not enough.", "",
            f"**Default: `min_confidence = {chosen:g}`** - the largest threshold that sends at most "
            f"{IN_DOMAIN_LOSS:.0%} of in-domain inputs to base both as whole prompts and sentence by sentence, since "
            "one default serves both granularities and sentence is the pipeline's default. Where falling back "
            f"matters, route whole prompts: `--granularity prompt --min-confidence {prompt_t:g}`.", "",
            f"Trade-off curve (whole prompts, default marked): [{png['fallback'].name}]({png['fallback'].name}).", ""]


def _md_add(rep: dict) -> list[str]:
    rows = []
    for a in rep["add"]:
        n_test = a.get("old_test_records") or rep["main"][0]["records"]["test"] * 20 // 21
        both = [(a[f"old_tasks_test_accuracy_{k}"] * n_test + a[f"extra_{k}"] * a["extra_questions"])
                / (n_test + a["extra_questions"]) for k in ("before", "after")]
        rows.append(f"| {a['task']} | {a['seconds']:.1f} | {a['remove_seconds']:.1f} | "
                    f"{_pct(a['old_tasks_test_accuracy_before'])} -> {_pct(a['old_tasks_test_accuracy_after'])} | "
                    f"{_pct(a['extra_before'])} -> {_pct(a['extra_after'])} | {_pct(both[0])} -> {_pct(both[1])} "
                    f"({100 * (both[1] - both[0]):+.2f}) | {_pct(a['new_task_test_accuracy'])} |")
    n_test = rep["add"][0].get("old_test_records", 360) if rep["add"] else 360
    return ["### Adding a task without starting over", "",
            "Each task below was left out, a router trained on the other 20 (seed 0), and the task added the way "
            "`dlp-lora add-task` does (router data extended, output layer grown by one row, warm-start fine-tune, "
            "recalibration, files written), then removed again as `remove-task` does. Times are the router side "
            "(the LoRA is trained or copied separately), one CPU thread. The other 20 tasks' accuracy is measured on "
            f"their {n_test} test prompts (one error = {100 / n_test:.2f} points) and on up to 100 questions per task "
            "that the router data never used (the count below), and on both together.", "",
            "| added task | add (s) | remove (s) | other tasks, test % | other tasks, unused questions % | "
            "other tasks, both % (change, points) | added task, test % |", "|---|---:|---:|---:|---:|---:|---:|", *rows,
            "", "Unused questions per added task: " + ", ".join(f"{a['task']} {a['extra_questions']}"
                                                                 for a in rep["add"]) + ".", ""]


def _md_speed(rep: dict) -> list[str]:
    s = rep["speed"]
    return ["### Speed", "",
            f"`Router.probs`, tokenisation included, {s['threads']} torch thread(s), {s['sentences']} test sentences "
            f"of {s['mean_chars']:.0f} characters on average: batch 1 median {s['batch1_ms_median']:.3f} ms "
            f"(p10-p90 {s['batch1_ms_p10']:.3f}-{s['batch1_ms_p90']:.3f} ms); batched {s['batched_per_s']:,.0f} "
            f"sentences/s wall clock, {s['batched_per_cpu_s']:,.0f} per CPU-second (the machine is shared; CPU time "
            "is the better estimate of an idle one). `dlp-lora bench --only P4` measures the same in the benchmark.",
            ""]


def _md_ablations(rep: dict) -> list[str]:
    if "ablations" not in rep:
        return []
    rows = []
    for name, a in rep["ablations"].items():
        n = a["records"]["test"] * len(a["test_errors"])
        errors = sum(a["test_errors"])
        rows.append(f"| {name} | {a['params']:,} | {errors} / {n} ({_pct(1 - errors / n)}) "
                    f"| {max(a['test_errors'])} | {sum(a['val_errors'])} |")
    return ["### What each part of the recipe adds", "",
            "Test errors summed over 3 data splits x 3 router seeds (9 routers per row); \"worst\" is the most test "
            f"errors of one router (1 error = {100 / rep['main'][0]['records']['test']:.2f} points).", "",
            "| recipe | parameters | test errors (accuracy %) | worst router | val errors |",
            "|---|---:|---:|---:|---:|",
            *rows, ""]


if __name__ == "__main__":
    raise SystemExit(main())
