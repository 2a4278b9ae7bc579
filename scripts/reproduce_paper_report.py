"""The last stage of scripts/reproduce_paper.sh: results/paper21/summary.json and the paper21 section of RESULTS.md.

    python scripts/reproduce_paper_report.py --work /work/paper21 --out results/paper21 --results-md RESULTS.md

Reads the evaluation (WORK/eval/summary.json), the adapters' dlp_task.json (budget, loss curves) and the stage
times the script measured (WORK/stage_times.json). Writes, small enough to commit:

* OUT/summary.json   the schema of ``dlp_lora.evaluate.paper_summary`` ("seconds" are measured wall times of the
  training stages and of the evaluation);
* OUT/training.json  per adapter: steps, records used, loss start/end (the multitask adapter with its loss curve),
  and the stage times;
* the section between ``<!-- paper21 -->`` and ``<!-- end paper21 -->`` of RESULTS.md (added at the end the first
  time): the tables and each target of the experiment as met / not met, with the numbers.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dlp_lora.config import DLPError, atomic_write_json, atomic_write_text, read_json_file
from dlp_lora.evaluate import paper_summary
from dlp_lora.run import read_adapter_list, read_task_meta

BEGIN, END = "<!-- paper21 -->", "<!-- end paper21 -->"
TRAIN_STAGES = ("train_loras", "router")
TASK_SYSTEMS = ("base", "single", "dlp", "dlp-sentence", "top1", "multitask", "uniform")
COMPOSITE_SYSTEMS = ("base", "dlp", "dlp-sentence", "dlp-segment", "top1", "multitask", "uniform", "oracle-segment")
BUDGET_MINUTES = 150


def training_info(work: Path, times: dict) -> dict:
    """Budget and loss figures of every adapter of the run, the multitask adapter's loss curve, stage times."""
    run = work / "run"
    rows = {}
    for d in read_adapter_list(run):
        m = read_task_meta(d)
        rows[m["task"]] = {k: m.get(k) for k in ("steps", "records_used", "loss_start", "loss_end", "train_seconds")}
    mt = read_task_meta(run / "multitask") if (run / "multitask").is_dir() else {}
    cfg = read_json_file(read_adapter_list(run)[0] / "train_config.json")
    return {"config": {k: cfg[k] for k in ("rank", "alpha", "target_modules", "learning_rate", "batch_size",
                                           "max_length", "max_steps")},
            "adapters": rows,
            "multitask": {k: mt.get(k) for k in ("steps", "rank", "records_used", "loss_start", "loss_end",
                                                 "loss_curve", "train_seconds")},
            "stage_seconds": times}


def flattening(curve: list) -> tuple[float, float] | None:
    """Mean logged loss over the third-to-last and the last sixth of training: equal means flat."""
    losses = [loss for _, loss in curve or []]
    k = len(losses) // 6
    if k < 1:
        return None
    return sum(losses[-3 * k:-2 * k]) / k, sum(losses[-k:]) / k


def _cell(v) -> str:
    return "-" if v is None else f"{v:.2f}"


def task_tables(s: dict) -> list[str]:
    systems = [x for x in TASK_SYSTEMS if x in s["systems"]]
    lines = ["| task | metric | n | " + " | ".join(systems) + " |", "|---|---|---|" + "---|" * len(systems)]
    for t in s["tasks"]:
        row = s["per_task"][t]
        lines.append(f"| {t} | {row['metric']} | {row['n']} | "
                     + " | ".join(_cell(row["scores"].get(x)) for x in systems) + " |")
    lines += ["", "| average | " + " | ".join(systems) + " |", "|---|" + "---|" * len(systems)]
    for g in ("mcq", "qa", "overall"):
        lines.append(f"| {g} | " + " | ".join(_cell(s["averages"][g].get(x)) for x in systems) + " |")
    return lines


def composite_tables(s: dict, scaffold: bool = False) -> list[str]:
    lines = []
    if scaffold:
        lines += ["", "Protocol: the answer scaffold (`dlp-lora eval --composite-scaffold`, docs/eval.md): the labels "
                      "`1.` .. `N.` are forced into every system's answer, each answer ends at its line break, EOS or "
                      "its task's token budget, so the format rate is 100 by construction."]
    for n, size in (s.get("composite") or {}).items():
        systems = [x for x in COMPOSITE_SYSTEMS if x in size]
        lines += ["", f"Composite-{n} (item score / all items correct / answered on numbered lines, points):", "",
                  "| system | item score | all correct | format rate |", "|---|---|---|---|"]
        lines += [f"| {x} | {_cell(size[x]['item_score'])} | {_cell(size[x]['all_correct'])} | "
                  f"{_cell(size[x]['format_rate'])} |" for x in systems]
    return lines


def _verdict(ok: bool) -> str:
    return "**met**" if ok else "**not met**"


def task_targets(s: dict, rows: list[dict] | None = None) -> list[str]:
    per, avg = s["per_task"], s["averages"]["overall"]
    losers = [t for t in s["tasks"] if not per[t]["scores"]["single"] > per[t]["scores"]["base"]]
    wins = len(s["tasks"]) - len(losers)
    missed = ", ".join(f"{t} ({_cell(per[t]['scores']['single'])} vs {_cell(per[t]['scores']['base'])})"
                       for t in losers)
    lines = [f"- Task LoRA above the base model on its own task for >= 17 of {len(s['tasks'])} tasks: "
             f"{_verdict(wins >= 17)} ({wins} of {len(s['tasks'])}" + (f"; not above base: {missed})" if losers else ")")]
    if losers and rows:
        lines += ["  Why, from predictions.jsonl:"] + loser_evidence(s, rows)
    d = avg["dlp"] - avg["single"]
    lines.append(f"- `dlp` within 0.5 points of `single`: {_verdict(abs(d) <= 0.5 or d > 0)} "
                 f"(dlp {_cell(avg['dlp'])}, single {_cell(avg['single'])}, difference {d:+.2f}; the paper: -0.35)")
    for other in ("uniform", "base"):
        lines.append(f"- `dlp` above `{other}`: {_verdict(avg['dlp'] > avg[other])} "
                     f"({_cell(avg['dlp'])} vs {_cell(avg[other])})")
    for other in ("multitask", "top1", "dlp-sentence"):
        if other in avg:
            lines.append(f"- `dlp` - `{other}`: {avg['dlp'] - avg[other]:+.2f} points (reported, either sign)")
    return lines


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] if path.is_file() else []


def loser_evidence(s: dict, rows: list[dict]) -> list[str]:
    """Why a task LoRA is not above base, from predictions.jsonl: its most frequent answer and how often it gives
    it (a LoRA that cannot tell the options apart falls back on one letter), against the base model's answers
    and the chance level of the task's options."""
    per = s["per_task"]
    losers = [t for t in s["tasks"] if not per[t]["scores"]["single"] > per[t]["scores"]["base"]]
    lines = []
    for t in losers:
        rs = [r for r in rows if r["task"] == t]
        if not rs:
            continue
        def top(system):
            answers = [" ".join(r["outputs"][system].split())[:24] or "(empty)" for r in rs]
            best = max(set(answers), key=answers.count)
            return f"`{best}` {answers.count(best)}/{len(rs)}"
        choices = rs[0].get("choices") or []
        chance = f"; chance {100 / len(choices):.0f}" if choices else ""
        lines.append(f"  - {t}: single {_cell(per[t]['scores']['single'])} vs base {_cell(per[t]['scores']['base'])}"
                     f"{chance}; most frequent answer: single {top('single')}, base {top('base')}")
    return lines


def composite_examples(size: str, rows: list[dict], rivals: list[str], k: int = 2) -> list[str]:
    """Composite prompts of this size where ``dlp-segment`` scores below a rival: the items' tasks, its answers and
    the rival's (what the reader needs to see why a composite target was missed)."""
    lines = []
    for r in rows:
        if str(r["n"]) != size:
            continue
        seg = sum(r["scores"]["dlp-segment"])
        better = [x for x in rivals if x in r["scores"] and sum(r["scores"][x]) > seg]
        if not better:
            continue
        tasks = ", ".join(it["task"] for it in r["items"])
        refs = " / ".join(it["reference"] for it in r["items"])
        lines.append(f"  - prompt {r['index']} ({tasks}; references {refs}): dlp-segment answers "
                     f"{r['answers']['dlp-segment']}, {better[0]} answers {r['answers'][better[0]]}")
        if len(lines) == k:
            break
    return lines


def short_answers(size: str, rows: list[dict], systems: list[str]) -> str:
    """Per system, the share of composite answers with fewer non-empty lines than questions (in points): a system
    that answers one question and stops cannot score on the others, whatever its routing."""
    mine = [r for r in rows if str(r["n"]) == size]
    if not mine:
        return ""
    def share(x):
        short = sum(1 for r in mine if len([ln for ln in r["outputs"][x].splitlines() if ln.strip()]) < len(r["items"]))
        return f"{x} {100 * short / len(mine):.0f}"
    return ", ".join(share(x) for x in systems if x in mine[0]["outputs"])


def composite_targets(s: dict, rows: list[dict] | None = None, scaffold: bool = False) -> list[str]:
    lines = []
    for n, size in (s.get("composite") or {}).items():
        seg = size.get("dlp-segment", {}).get("item_score")
        if seg is None:
            continue
        rivals = [x for x in ("top1", "dlp", "uniform", "multitask") if x in size]
        beaten = [x for x in rivals if seg > size[x]["item_score"]]
        missed = len(beaten) < len(rivals)
        lines.append(f"- Composite-{n}: `dlp-segment` item score above {', '.join(rivals)}: "
                     f"{_verdict(len(beaten) == len(rivals))} (dlp-segment {_cell(seg)}; "
                     + ", ".join(f"{x} {_cell(size[x]['item_score'])}" for x in rivals)
                     + (f"; oracle-segment {_cell(size['oracle-segment']['item_score'])}" if "oracle-segment" in size else "")
                     + (f"; dlp-sentence {_cell(size['dlp-sentence']['item_score'])}" if "dlp-sentence" in size else "")
                     + ")")
        examples = composite_examples(n, rows, [x for x in rivals if x not in beaten]) if missed and rows else []
        if examples:
            lines += ["  Examples where a rival scored more (from composite.jsonl):"] + examples
        if rows and not scaffold:   # with the scaffold every answer has its N labelled lines
            lines.append(f"  Answers with fewer lines than questions (% of prompts, composite.jsonl): "
                         f"{short_answers(n, rows, list(size))}")
    return lines


def budget_lines(info: dict, times: dict, resumed: int = 0) -> list[str]:
    c, mt = info["config"], info["multitask"]
    steps = [r["steps"] for r in info["adapters"].values()]
    total_task_steps = sum(steps)
    flat = flattening(mt.get("loss_curve") or [])
    total = sum(times.values())
    lines = [f"Task LoRAs: rank {c['rank']} (alpha {c['alpha']:g}, {c['target_modules']}), {c['max_steps']} steps x "
             f"batch {c['batch_size']}, lr {c['learning_rate']:g}, max length {c['max_length']} tokens; "
             f"{total_task_steps} steps in all."]
    if mt.get("steps"):
        curve = mt.get("loss_curve") or []
        shown = ", ".join(f"{st}: {loss:.3f}" for st, loss in curve[:: max(1, len(curve) // 8)])
        fair = (f"the fair budget: the task LoRAs' {total_task_steps} steps together" if mt["steps"] >= total_task_steps
                else f"the fair budget is the task LoRAs' {total_task_steps}; fewer were given")
        lines.append(f"Multitask LoRA: rank {mt['rank']}, {mt['steps']} steps ({fair}), {mt['records_used']} records "
                     f"of all tasks. "
                     f"Loss curve (step: loss) {shown}"
                     + (f"; mean loss {flat[0]:.3f} -> {flat[1]:.3f} over the last third "
                        f"({'flattened' if flat[1] > 0.9 * flat[0] else 'still falling'})." if flat else "."))
    lines.append("Measured wall time per stage (s): " + ", ".join(f"{k} {v:.0f}" for k, v in times.items())
                 + f"; total {total / 60:.0f} min ({'within' if total <= BUDGET_MINUTES * 60 else 'over'} the "
                 f"{BUDGET_MINUTES}-minute budget)."
                 + (f" The evaluation was interrupted and resumed: {resumed} batches were read back from its journal "
                    "and count with the seconds measured when they ran." if resumed else ""))
    return lines


def section(s: dict, info: dict, times: dict, command: str, work: Path | None = None, resumed: int = 0,
            scaffold: bool = False) -> str:
    routing = s.get("routing") or {}
    lines = [BEGIN, f"## Paper reproduction: {len(s['tasks'])} real tasks ({s.get('model')})", "",
             f"Re-created by [`scripts/reproduce_paper.sh`](scripts/reproduce_paper.sh) (`{command}`); small summary: "
             "[results/paper21/summary.json](results/paper21/summary.json). Scores in points (0-100), same test "
             "questions for every system, free generation.", "", "### Budget", ""]
    lines += budget_lines(info, times, resumed)
    preds = _read_jsonl(work / "eval" / "predictions.jsonl") if work else []
    comps = _read_jsonl(work / "eval" / "composite.jsonl") if work else []
    lines += ["", "### Targets", ""] + task_targets(s, preds) + composite_targets(s, comps, scaffold)
    lines += ["", "### Scores per task", ""] + task_tables(s)
    if routing:
        lines += ["", f"Routing (dlp, per prompt): accuracy {_cell(routing.get('accuracy'))}, mean adapters selected "
                      f"{_cell(routing.get('mean_selected'))}."]
    lines += ["", "### Composite prompts"] + composite_tables(s, scaffold) + ["", END]
    return "\n".join(lines) + "\n"


def write_section(path: Path, text: str) -> None:
    old = path.read_text(encoding="utf-8") if path.exists() else "# DLP-LoRA results\n"
    if BEGIN in old and END in old:
        head, rest = old.split(BEGIN, 1)
        new = head + text.rstrip("\n") + rest.split(END, 1)[1]
    else:
        new = old.rstrip("\n") + "\n\n" + text
    atomic_write_text(path, new)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", required=True, help="the script's run folder (WORK)")
    p.add_argument("--out", default="results/paper21", help="folder for summary.json and training.json")
    p.add_argument("--results-md", default="RESULTS.md", help="RESULTS.md whose paper21 section is rewritten")
    p.add_argument("--command", default="scripts/reproduce_paper.sh", help="command recorded in summary.json")
    a = p.parse_args(argv)
    try:
        work = Path(a.work)
        times = read_json_file(work / "stage_times.json")
        summary = read_json_file(work / "eval" / "summary.json")
        train_s = sum(float(times.get(k, 0.0)) for k in TRAIN_STAGES)
        s = paper_summary(summary, train_seconds=train_s, command=a.command)
        # the stage's wall time, or when the evaluation was resumed after a kill (whose stage time was never
        # recorded) its own count: this process's time plus the generation seconds of the batches read back
        s["seconds"]["eval"] = round(max(float(times.get("eval", 0.0)), float(summary.get("seconds") or 0.0)), 2)
        times = {**times, "eval": s["seconds"]["eval"]}
        info = training_info(work, times)
        atomic_write_json(Path(a.out) / "summary.json", s)
        atomic_write_json(Path(a.out) / "training.json", info)
        scaffold = any(size.get("scaffold") for size in (summary.get("composite") or {}).values())
        write_section(Path(a.results_md), section(s, info, times, a.command, work,
                                                  int(summary.get("resumed_batches") or 0), scaffold))
    except DLPError as e:
        sys.stderr.write(f"error: {e}\n")
        return 1
    print(f"{a.out}/summary.json, {a.out}/training.json, {a.results_md} (paper21 section)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
