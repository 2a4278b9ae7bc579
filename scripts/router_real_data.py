"""Router accuracy on the 21 real tasks of ../shared/data (issue 4, item 5).

Converts the raw files (GSM8K, StrategyQA, 17 BIG-Bench-Hard tasks, 2 BIG-bench tasks) with
``dlp_lora.tasks.convert_shared_suite``, builds balanced prompt-level router data (same number of distinct
questions per task, split by question, no leakage), trains the mini-MLP on the default model's tokenizer
(SmolLM2-135M-Instruct, 49,152 tokens), and writes a Markdown table of per-task and average held-out test
accuracy plus training time to ``docs/router_results.md`` (and the confusion matrix PNG beside it).

    nice .venv/bin/python scripts/router_real_data.py            # about a minute on 2 CPU cores
    nice .venv/bin/python scripts/router_real_data.py --granularity sentence --out-md /tmp/sent.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shared", default=str(ROOT.parent / "shared" / "data"), help="the shared raw data folder")
    ap.add_argument("--work", default="/tmp/dlp_router_real", help="scratch folder for tasks, data and router")
    ap.add_argument("--out-md", default=str(ROOT / "docs" / "router_results.md"), help="results table")
    ap.add_argument("--per-task", type=int, default=0, help="questions per task (0: smallest task's size)")
    ap.add_argument("--granularity", default="prompt", choices=("prompt", "sentence"))
    ap.add_argument("--seed", type=int, default=0, help="router data seed (sampling and split)")
    ap.add_argument("--router-seeds", default="0,1,2", help="train one router per seed (init/shuffle) and report all")
    ap.add_argument("--model", default="default", help="base model whose tokenizer the router reads")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (fixed and printed, DESIGN §7)")
    ap.add_argument("--speed-only", default=None, metavar="ROUTER_DIR",
                    help="only measure Router.probs speed of this router folder on the test sentences")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    if args.speed_only:
        data = Path(args.work) / "router_data"
        print(json.dumps(measure_speed(Path(args.speed_only), data / "test.jsonl"), indent=2))
        return 0

    from dlp_lora.config import RouterConfig, RouterDataConfig
    from dlp_lora.router import Router, make_router_data, train_router
    from dlp_lora.tasks import convert_shared_suite

    work = Path(args.work)
    tasks_dir, data_dir, router_dir = work / "tasks", work / "router_data", work / "router"
    t0 = time.time()
    if tasks_dir.exists():
        shutil.rmtree(tasks_dir)
    paths = convert_shared_suite(args.shared, tasks_dir)
    print(f"converted {len(paths)} tasks in {time.time() - t0:.1f}s -> {tasks_dir}")
    dcfg = RouterDataConfig(per_task=args.per_task, granularity=args.granularity, seed=args.seed)
    make_router_data(data_dir, data_dir=tasks_dir, config=dcfg, overwrite=True)
    stats = json.loads((data_dir / "stats.json").read_text())
    seeds = [int(x) for x in args.router_seeds.split(",")]
    runs = []
    for seed in seeds:
        rcfg = RouterConfig(seed=seed)
        out = router_dir if seed == seeds[0] else work / f"router_seed{seed}"
        train_router(data_dir, args.model, out, config=rcfg, overwrite=True)
        runs.append(json.loads((out / "metrics.json").read_text()))
    m = runs[0]

    speed = measure_speed(router_dir, data_dir / "test.jsonl")
    md_path = Path(args.out_md)
    md_path.parent.mkdir(parents=True, exist_ok=True)
    png = md_path.with_name(md_path.stem.replace("results", "confusion") + ".png")
    # Sum of the seeds' test confusion matrices, so every collision any seed made is visible.
    from dlp_lora.router.train import plot_confusion

    total = [[sum(r["confusion"][i][j] for r in runs) for j in range(len(m["confusion"]))]
             for i in range(len(m["confusion"]))]
    plot_confusion(total, list(m["per_task_accuracy"]), png,
                   title=f"mini-MLP router, test confusions summed over seeds {args.router_seeds}")
    split = m["confusion_split"]
    def pct(a):
        return "-" if a is None else f"{100 * a:.2f}"

    def mean(xs):
        xs = [x for x in xs if x is not None]
        return sum(xs) / len(xs) if xs else None

    rows = [f"| {t} | {stats['per_task_records'][t]['test']} | "
            + " | ".join(pct(r["per_task_accuracy"][t]) for r in runs)
            + f" | {pct(mean([r['per_task_accuracy'][t] for r in runs]))} |" for t in m["per_task_accuracy"]]
    seed_cols = " | ".join(f"seed {s}" for s in seeds)
    conf: dict[str, int] = {}
    for r in runs:
        for c in r["confusions"]:
            key = f"{c['true']} -> {c['predicted']}"
            conf[key] = conf.get(key, 0) + c["count"]
    md = [
        "### Router accuracy on the 21 real tasks",
        "",
        f"Produced by `nice .venv/bin/python scripts/router_real_data.py` "
        f"({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {platform.machine()}, "
        f"{torch.get_num_threads()} torch thread(s)).",
        "",
        f"Mini-MLP router ({m['params']:,} parameters: EmbeddingBag over the SmolLM2-135M-Instruct tokenizer's "
        f"{json.loads((router_dir / 'config.json').read_text())['vocab_size']:,}-token vocabulary, mean pooling, "
        f"4-layer MLP), {args.granularity}-level records, {stats['per_task']} distinct questions sampled per task "
        f"(the smallest task's size), split 80/10/10 by question with no question in two splits: "
        f"{stats['records']['train']} train / {stats['records']['val']} val / {stats['records']['test']} test records.",
        "",
        f"Held-out {split} accuracy (%) of {len(seeds)} routers trained with different seeds (initialisation and "
        f"batch order) on the same data; the confusion matrix sums the {len(seeds)} seeds' test predictions.",
        "",
        f"| task | test records | {seed_cols} | mean |",
        "|---|---:|" + "---:|" * (len(seeds) + 1),
        *rows,
        f"| **average over tasks** | {stats['records']['test']} | "
        + " | ".join(f"**{pct(r['mean_task_accuracy'])}**" for r in runs)
        + f" | **{pct(mean([r['mean_task_accuracy'] for r in runs]))}** |",
        f"| validation accuracy | {stats['records']['val']} | "
        + " | ".join(pct(r["val_accuracy"]) for r in runs) + f" | {pct(mean([r['val_accuracy'] for r in runs]))} |",
        f"| training time (s) | | " + " | ".join(f"{r['train_seconds']:.1f}" for r in runs)
        + f" | {mean([r['train_seconds'] for r in runs]):.1f} |",
        f"| epochs run (best) | | " + " | ".join(f"{r['epochs_run']} ({r['best_epoch']})" for r in runs) + " | |",
        "",
        f"- Training time is wall clock on a shared 2-core CPU with {args.threads} torch thread(s), tokenisation of all "
        f"splits included (about {m['tokenize_seconds']:.1f} s); early stopping with patience "
        f"{RouterConfig().patience}. The paper reports 98.45% over 26 tasks; our target is >= 99.5% held out.",
        f"- Router speed (`Router.probs`, tokenisation included, {speed['threads']} torch thread(s), "
        f"{speed['sentences']} test sentences of {speed['mean_chars']:.0f} characters on average): batch 1 median "
        f"{speed['batch1_ms_median']:.3f} ms (p10-p90 {speed['batch1_ms_p10']:.3f}-{speed['batch1_ms_p90']:.3f} ms); "
        f"batched {speed['batched_per_s']:,.0f} sentences/s wall clock, {speed['batched_per_cpu_s']:,.0f} per "
        f"CPU-second (the machine is shared, so CPU time is the better estimate of an idle machine).",
        "- Confusions, all seeds together (true -> predicted, count): "
        + (", ".join(f"{k} ({v})" for k, v in sorted(conf.items(), key=lambda kv: -kv[1])) if conf else "none")
        + f". Confusion matrix (all seeds summed): [{png.name}]({png.name}).",
        "",
    ]
    md_path.write_text("\n".join(md))
    print("\n".join(md))
    print(f"wrote {md_path} and {png}")
    return 0


def measure_speed(router_dir: Path, test_file: Path, n_batched: int = 20000) -> dict:
    """Batch-1 latency and batched throughput of Router.probs on test sentences, tokenisation included."""
    import statistics

    import torch

    from dlp_lora.data import split_sentences
    from dlp_lora.router import Router

    router = Router.load(router_dir)
    prompts = [json.loads(l)["text"] for l in test_file.read_text().splitlines() if l.strip()]
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
            "batched_per_s": n_batched / statistics.median(wall), "batched_per_cpu_s": n_batched / statistics.median(cpu)}


if __name__ == "__main__":
    raise SystemExit(main())
