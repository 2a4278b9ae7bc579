"""DLP-LoRA test / evaluation (``dlp-lora eval``): the comparison recipe.

Every system answers the **same** samples with the same generation settings (free generation through
:meth:`DLPPipeline.generate`: batched, greedy, chat template, per-task token budget):

* ``base``           - the base model (all-zero mixture weights);
* ``single``         - the task's own LoRA (one-hot on the true task: oracle routing);
* ``dlp``            - DLP-LoRA: router -> top-p -> fused mixture (paper §3) with the given selection
  (eval routes once per prompt unless ``--granularity`` says otherwise);
* ``dlp-sentence``   - the same, routed per sentence (the paper's granularity);
* ``dlp-segment``    - the same, answer ``i`` of a composite prompt on the mixture of question ``i`` (ours);
* ``top1``           - the router's best adapter alone (what a plain classifier-router does);
* ``multitask``      - one LoRA trained on all tasks (``RUN/multitask/`` or ``--multitask-adapter``), fused alone
  into its own copy of the base model (the paper's "why not one LoRA" comparison);
* ``uniform``        - every adapter with weight 1/N (a static merge);
* ``oracle-segment`` - answer ``i`` of a composite prompt on its true task's adapter (the upper bound of
  ``dlp-segment``).

``single`` needs one true task per prompt, so it runs on the per-task samples only; ``dlp-segment`` and
``oracle-segment`` need numbered questions, so they run on composite prompts only (:mod:`dlp_lora.composite`).

The recipe (:func:`evaluate`): check the outputs -> open the run -> read the test files -> load the pipelines ->
per-task samples, every system interleaved per batch (the first system rotates, so machine noise is shared and
time ratios measured in one run are comparable) -> scores, routing, timing -> composite prompts -> write
``TestOutputs/<name>/`` atomically. Metrics live in :mod:`dlp_lora.metrics`. A system whose mixture for a prompt
is fixed and equal to one another system already generated with reuses that greedy answer
(:class:`GenerationCache`; ``reuse=False`` / ``--no-reuse`` generates everything).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import os
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

from .composite import CompositeItem, CompositePrompt, build_composites, composite_figures, score_composite
from .config import DLPError, atomic_dir, atomic_write_json, atomic_write_text, check
from .data import TaskData, read_task, task_files
from .metrics import SCORE_METRICS, TEXT_METRICS, ROUGE_TYPES, score, task_scores
from .run import MULTITASK_DIR, Run, open_run
from .selection import SelectionConfig

SYSTEMS = ("base", "single", "dlp", "dlp-sentence", "dlp-segment", "top1", "multitask", "uniform", "oracle-segment")
DEFAULT_SYSTEMS = ("base", "single", "dlp", "uniform")
ROUTED = ("dlp", "dlp-sentence", "dlp-segment", "top1")     # need the run's router
ORACLE = ("single", "oracle-segment")                          # use the true task's adapter
COMPOSITE_ONLY = ("dlp-segment", "oracle-segment")            # their mixtures follow numbered questions
PER_TASK_ONLY = ("single",)                                    # one true task per prompt
MIXTURE_REPORTED = ("dlp", "dlp-sentence")                     # the first of these present gives the routing report
# eval's dlp routes once per prompt (the original code's protocol); dlp-sentence/-segment change only this
EVAL_SELECTION = SelectionConfig(granularity="prompt")
_SYSTEM_GRANULARITY = {"dlp-sentence": "sentence", "dlp-segment": "segment"}


@dataclasses.dataclass
class EvalConfig:
    """What ``dlp-lora eval`` runs; saved as ``TestOutputs/<name>/config.json``."""

    run_dir: str = ""                       # run folder (adapters.txt + router/) or an adapters.txt
    data: list = dataclasses.field(default_factory=list)  # test task files (task names = adapter task names)
    data_dir: str = ""                      # or a folder of test task files
    out_dir: str = ""                       # output folder, e.g. TestOutputs/NAME (refused if it exists)
    systems: list = dataclasses.field(default_factory=lambda: list(DEFAULT_SYSTEMS))  # compared, in order
    selection: SelectionConfig = EVAL_SELECTION  # dlp's selection; dlp-sentence/-segment change the granularity
    model_spec: str = ""                    # base model override ("" = the base model the run's adapters name)
    router: str = ""                        # router folder override ("" = RUN/router/)
    multitask_adapter: str = ""             # PEFT folder of the multitask system ("" = RUN/multitask/)
    limit: int = 0                          # samples per task (first N of each test file; 0 = all)
    max_new_tokens: int = 64                # cap on generated tokens per answer
    auto_budget: bool = True                # per task: min(cap, longest test reference + 16 tokens) - saves CPU
    batch_size: int = 8                     # rows generated together (per system)
    reuse: bool = True                      # reuse another system's greedy answer made with the same mixture
    resume: bool = False                    # continue an interrupted run from its journal (.OUT.partial/)
    metrics: dict = dataclasses.field(default_factory=dict)  # task -> metric overrides (--metric task=metric)
    composite: list = dataclasses.field(default_factory=list)  # composite prompt sizes N, e.g. [2, 3] ([] = none)
    composite_n: int = 100                  # composite prompts per size
    composite_scaffold: bool = False        # force each answer's label "i." into the output (pipeline/scaffold.py)
    seed: int = 0                           # seed of the composite prompts' draw
    device: str = ""                        # cpu | cuda ("" = cuda when available)
    dtype: str = "auto"                     # model dtype (auto | fp32 | bf16 | fp16)
    overwrite: bool = False                 # replace an existing out_dir
    results_md: str = ""                    # also write this evaluation's section of a RESULTS.md
    results_commands: str = ""              # file of the commands that built the run (linked from RESULTS.md)
    command: str = ""                       # the command line recorded in summary.json

    def __post_init__(self) -> None:
        for f in ("run_dir", "data_dir", "out_dir", "model_spec", "router", "multitask_adapter", "device",
                  "results_md", "results_commands", "command"):
            setattr(self, f, "" if getattr(self, f) is None else str(getattr(self, f)))
        self.data = [str(p) for p in ([self.data] if isinstance(self.data, (str, os.PathLike)) else self.data or [])]
        self.systems = parse_systems(self.systems)
        self.limit = 0 if self.limit is None else self.limit
        self.metrics = parse_metric_overrides(self.metrics)
        self.composite = parse_composite(self.composite)
        check(isinstance(self.selection, SelectionConfig),
              f"selection: expected a SelectionConfig, got {type(self.selection).__name__}")
        check(isinstance(self.limit, int) and self.limit >= 0, f"limit must be >= 1 (or 0 = all), got {self.limit!r}")
        for name in ("max_new_tokens", "batch_size", "composite_n"):
            v = getattr(self, name)
            check(isinstance(v, int) and not isinstance(v, bool) and v > 0, f"{name} must be a positive integer, got {v!r}")
        check(isinstance(self.seed, int) and self.seed >= 0, f"seed must be an integer >= 0, got {self.seed!r}")
        check(isinstance(self.composite_scaffold, bool), "composite_scaffold must be true or false")
        only = [s for s in self.systems if s in COMPOSITE_ONLY]
        check(not only or bool(self.composite), f"systems: {', '.join(only)} run on composite prompts only "
                                                 f"(add --composite N)")


def parse_systems(spec: str | Iterable[str]) -> list[str]:
    """``"base,dlp"`` or a list -> validated list of system names."""
    items = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else [str(s).strip() for s in spec]
    items = [s for s in items if s]
    check(len(items) > 0, f"systems: at least one system is needed (choose {', '.join(SYSTEMS)})")
    for s in items:
        check(s in SYSTEMS, f"systems: unknown system {s!r} (choose {', '.join(SYSTEMS)})")
    check(len(set(items)) == len(items), f"systems: listed twice in {items}")
    return items


def parse_metric_overrides(items: Iterable[str] | dict | None) -> dict[str, str]:
    """``["task=metric", ...]`` -> ``{task: metric}`` (one-line errors for a bad item)."""
    if isinstance(items, dict):
        items = [f"{t}={m}" for t, m in items.items()]
    out: dict[str, str] = {}
    for it in items or []:
        task, sep, metric = str(it).partition("=")
        task, metric = task.strip(), metric.strip()
        check(bool(sep and task and metric), f"--metric {it}: expected TASK=METRIC")
        check(metric in SCORE_METRICS, f"--metric {it}: unknown metric {metric!r} (choose {', '.join(SCORE_METRICS)})")
        check(task not in out, f"--metric {it}: task {task!r} given twice")
        out[task] = metric
    return out


def parse_composite(spec: str | Iterable | None) -> list[int]:
    """``"2,3"`` or ``[2, 3]`` -> ``[2, 3]``: composite prompt sizes, each >= 2, none twice."""
    items = [s.strip() for s in spec.split(",") if s.strip()] if isinstance(spec, str) else list(spec or [])
    out = []
    for s in items:
        try:
            n = int(s)
        except (TypeError, ValueError):
            raise DLPError(f"--composite {s}: expected a number of questions per prompt (e.g. 2,3)") from None
        check(n >= 2 and str(n) == str(s).strip(), f"--composite {s}: expected a whole number >= 2")
        check(n not in out, f"--composite {s}: given twice")
        out.append(n)
    return out


# ================================================================================================================
# The recipe
# ================================================================================================================

@dataclasses.dataclass
class _Sample:
    """One test question of one task (a per-task row)."""

    task: str
    index: int
    question: str
    reference: str
    metric: str
    choices: list | None
    budget: int

    @property
    def prompt(self) -> str:
        return self.question

    @property
    def tasks(self) -> list[str]:
        return [self.task]


@dataclasses.dataclass
class _TestSet:
    """The test files, read once: metric and options per task and the questions not seen in training."""

    tasks: list                             # TaskData per test file, in the order given
    metric: dict                            # task -> metric (--metric > the file's metadata > dlp_task.json)
    choices: dict                           # task -> task-wide MCQ options or None
    kept: dict                              # task -> its records minus those in the adapter's training file
    dropped: dict                           # task -> how many were dropped for that reason


@dataclasses.dataclass
class _Pipes:
    """The loaded pipelines: the run's (every system but multitask) and the multitask adapter's."""

    main: Any
    multitask: Any = None


def evaluate(config: EvalConfig | str | os.PathLike | None = None, *, pipeline=None, multitask_pipeline=None,
             progress: bool = True, **fields) -> dict:
    """Evaluate the systems on the same test samples (and composite prompts) and write ``out_dir``.

    ``config``: an :class:`EvalConfig`, or the run folder with the other :class:`EvalConfig` fields as keywords
    (``evaluate(run, data_dir=..., out_dir=...)``). ``pipeline`` / ``multitask_pipeline``: already loaded
    pipelines (then the run folder is read only for metadata). Returns the summary (summary.json).
    """
    cfg = _make_config(config, fields)
    started = time.perf_counter()
    _check_outputs(cfg)
    run = _open(cfg, pipeline)
    metas = {m["task"]: m for m in run.metas} if run is not None else {}
    tests = _read_tests(cfg, metas)
    names = list(pipeline.names) if pipeline is not None else run.names
    _check_coverage(cfg, tests, names, run)
    pipes = _load_pipelines(cfg, run, pipeline, multitask_pipeline)
    samples, budgets = _samples(cfg, tests, getattr(pipes.main, "tokenizer", None))
    systems = [s for s in cfg.systems if s not in COMPOSITE_ONLY]
    journal = EvalJournal.open(cfg, _journal_inputs(cfg, run, tests))
    outputs, timing, rowinfo = _run_interleaved(systems, pipes, samples, [s.budget for s in samples], cfg, progress,
                                                journal=journal)
    summary, sample_routing = _summary(cfg, run, pipes, tests, samples, systems, outputs, timing, names)
    summary["composite"], composite_rows = _evaluate_composites(cfg, pipes, tests, budgets, progress, journal)
    summary["seconds"] = round(time.perf_counter() - started + journal.earlier_seconds, 3)
    summary["resumed_batches"] = journal.replayed
    _write(cfg, summary, _prediction_rows(samples, systems, outputs, sample_routing, rowinfo), composite_rows)
    journal.remove()
    return summary


def _journal_inputs(cfg: EvalConfig, run: Run | None, tests: _TestSet) -> list[Path]:
    """The files whose change makes an interrupted evaluation's journal stale."""
    paths = [Path(t.path) for t in tests.tasks if t.path]
    if run is not None:
        paths += list(run.adapter_dirs) + ([run.router_dir] if run.router_dir else [])
    if "multitask" in cfg.systems and cfg.multitask_adapter:
        paths.append(Path(cfg.multitask_adapter))
    elif "multitask" in cfg.systems and run is not None and run.root is not None:
        paths.append(run.root / MULTITASK_DIR)
    return paths


def _make_config(config, fields: dict) -> EvalConfig:
    if isinstance(config, EvalConfig):
        return dataclasses.replace(config, **fields) if fields else config
    if config is not None:
        check("run_dir" not in fields, "evaluate: the run is given twice (positional and run_dir=)")
        fields = {**fields, "run_dir": config}
    return EvalConfig(**fields)


def _check_outputs(cfg: EvalConfig) -> None:
    """Refuse an existing output or a bad results path before any expensive work."""
    check(bool(cfg.out_dir), "eval: --out is required")
    if Path(cfg.out_dir).exists() and not cfg.overwrite:
        raise DLPError(f"{cfg.out_dir}: already exists (pass --overwrite to replace it)")
    if cfg.results_commands:
        check(Path(cfg.results_commands).is_file(), f"{cfg.results_commands}: --results-commands file not found")
    if cfg.results_md:
        parent = Path(cfg.results_md).resolve().parent
        check(parent.is_dir(), f"{cfg.results_md}: --results-md folder {parent} not found (or not a folder)")
        check(not Path(cfg.results_md).is_dir(), f"{cfg.results_md}: --results-md is a folder, expected a Markdown file")


def _open(cfg: EvalConfig, pipeline) -> Run | None:
    """The run (adapters, router, base model) - metadata only when a pipeline is given."""
    if pipeline is not None and not cfg.run_dir:
        return None
    check(bool(cfg.run_dir), "eval: --run is required")
    routed = any(s in ROUTED for s in cfg.systems) and pipeline is None
    run = open_run(cfg.run_dir, router=cfg.router or (None if routed else False), model=cfg.model_spec or None)
    if routed:
        run.require_router()
    return run


def _test_files(cfg: EvalConfig) -> list[Path]:
    check(not (cfg.data and cfg.data_dir), "eval: give test files (--data) or a folder (--data-dir), not both")
    if cfg.data_dir:
        return task_files(cfg.data_dir)
    check(bool(cfg.data), "eval: no test data (pass --data TEST.json ... or --data-dir DIR)")
    return [Path(p) for p in cfg.data]


def _read_tests(cfg: EvalConfig, metas: dict[str, dict]) -> _TestSet:
    """Read the test files; metric per task: --metric > the file's metadata > the adapter's dlp_task.json."""
    tasks: list[TaskData] = []
    seen: dict[str, str] = {}
    for f in _test_files(cfg):
        t = read_task(f)
        if t.name in seen:
            raise DLPError(f"{f}: field 'task': task {t.name!r} also given by {seen[t.name]}")
        seen[t.name] = str(f)
        tasks.append(t)
    for t in cfg.metrics:
        check(t in seen, f"--metric {t}={cfg.metrics[t]}: no test file for task {t!r} (tasks: {', '.join(seen)})")
    ts = _TestSet(tasks, {}, {}, {}, {})
    for t in tasks:
        meta = metas.get(t.name, {})
        m = cfg.metrics.get(t.name, t.metric)
        # read_task falls back to "exact" when the file says nothing; then the adapter's metadata knows better
        if t.name not in cfg.metrics and m == "exact" and meta.get("metric") in SCORE_METRICS:
            m = meta["metric"]
        ts.metric[t.name] = m
        ts.choices[t.name] = t.choices or meta.get("choices") or None
        ts.kept[t.name], dropped = _unseen(t, meta)
        if dropped is not None:
            ts.dropped[t.name] = dropped
    return ts


def _unseen(task: TaskData, meta: dict) -> tuple[list, int | None]:
    """Leakage guard: the records whose question is not in the adapter's training file (``dlp_task.json``
    ``data_file``, when it still exists), and how many were dropped (None when there is no such file)."""
    f = meta.get("data_file")
    train_q: set[str] = set()
    if f and Path(f).is_file():
        try:
            train_q = {r.question.strip() for r in read_task(f).records}
        except DLPError:
            train_q = set()
    if not train_q:
        return list(task.records), None
    kept = [r for r in task.records if r.question.strip() not in train_q]
    check(len(kept) > 0, f"{task.path}: every test question of task {task.name!r} is in the adapter's training "
                         f"file {f} (empty test set)")
    return kept, len(task.records) - len(kept)


def _check_coverage(cfg: EvalConfig, tests: _TestSet, names: list[str], run: Run | None) -> None:
    """Systems that use a task's adapter or route to it need that adapter in the run."""
    check(len(names) > 0, f"{cfg.run_dir}: no adapters")
    need = [s for s in cfg.systems if s in ORACLE + ROUTED]
    for t in tests.tasks if need else []:
        check(t.name in names, f"{t.path}: task {t.name!r} has no adapter in {cfg.run_dir} (adapters: "
                               f"{', '.join(names)}); systems {'/'.join(need)} need one")


def _multitask_dir(cfg: EvalConfig, run: Run | None) -> Path:
    if cfg.multitask_adapter:
        return Path(cfg.multitask_adapter)
    d = run.root / MULTITASK_DIR if run is not None and run.root is not None else None
    check(d is not None and d.is_dir(), f"{cfg.run_dir}: no {MULTITASK_DIR}/ adapter for the multitask system (train "
                                        "one with dlp-lora train-lora --multitask, or pass --multitask-adapter DIR)")
    return d


def _load_pipelines(cfg: EvalConfig, run: Run | None, pipeline, multitask_pipeline) -> _Pipes:
    """The run's pipeline and, for ``multitask``, the multitask adapter fused alone into its own copy of the
    base model (the run's router labels must match the run's adapters, so it cannot join that pipeline)."""
    from .pipeline import DLPPipeline

    mt_run = None
    if "multitask" in cfg.systems and multitask_pipeline is None:   # check the folder before loading models
        base = run.base_model if run is not None else (cfg.model_spec or None)
        mt_run = open_run([_multitask_dir(cfg, run)], router=False, model=base)
    main = pipeline
    if main is None:
        main = DLPPipeline.from_run(run, device=cfg.device or None, dtype=cfg.dtype)
        check(list(main.names) == run.names, f"{cfg.run_dir}: adapters loaded {list(main.names)} differ from "
                                             f"adapters.txt {run.names}")
    if any(s in ROUTED for s in cfg.systems):
        check(getattr(main, "router", None) is not None, f"{cfg.run_dir}: the pipeline has no router; "
                                                         f"{'/'.join(s for s in cfg.systems if s in ROUTED)} need one")
    mt = multitask_pipeline
    if mt_run is not None:
        mt = DLPPipeline.from_run(mt_run, device=cfg.device or None, dtype=cfg.dtype)
    return _Pipes(main, mt)


def _token_len(tokenizer, text: str) -> int:
    try:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])
    except Exception:  # a tokenizer without __call__ (fake pipelines in tests): a word count is close enough
        return len(text.split())


def _samples(cfg: EvalConfig, tests: _TestSet, tokenizer) -> tuple[list[_Sample], dict[str, int]]:
    """The per-task samples (the first ``limit`` unseen questions of each task) and each task's token budget:
    ``min(max_new_tokens, longest reference + 16)`` with ``auto_budget``, else ``max_new_tokens``."""
    samples: list[_Sample] = []
    budgets: dict[str, int] = {}
    for t in tests.tasks:
        recs = tests.kept[t.name][: cfg.limit] if cfg.limit else tests.kept[t.name]
        budget = cfg.max_new_tokens
        if cfg.auto_budget:
            budget = min(cfg.max_new_tokens, max(16, max(_token_len(tokenizer, r.answer) for r in recs) + 16))
        budgets[t.name] = budget
        for i, r in enumerate(recs):
            samples.append(_Sample(t.name, i, r.question, r.answer, tests.metric[t.name],
                                   list(r.choices) if r.choices else tests.choices[t.name], budget))
    check(len(samples) > 0, "eval: empty test set")
    return samples, budgets


# ---- generation ------------------------------------------------------------------------------------------------

def _one_hot(names: list[str], tasks: Sequence[str]):
    import torch

    w = torch.zeros(len(tasks), len(names))
    for j, t in enumerate(tasks):
        w[j, names.index(t)] = 1.0
    return w


def _mixture(system: str, pipe, rows: Sequence, selection: SelectionConfig) -> dict:
    """How one system mixes adapters for one batch, as ``generate`` keywords: a selection and, for systems that do
    not route, forced ``weights`` (per row) or ``segment_weights`` (per numbered question of each row)."""
    import torch

    n, names = len(rows), list(pipe.names)
    if system in ("dlp", "dlp-sentence", "dlp-segment"):
        return {"selection": selection.replace(granularity=_SYSTEM_GRANULARITY.get(system, selection.granularity))}
    forced = selection.replace(granularity="prompt")   # forced mixtures: no sentence splitting needed
    if system == "oracle-segment":                     # answer i on question i's own task adapter
        return {"selection": selection.replace(granularity="segment"),
                "segment_weights": [[{t: 1.0} for t in r.tasks] for r in rows]}
    if system == "base":
        w = torch.zeros(n, len(names))
    elif system == "uniform":
        w = torch.full((n, len(names)), 1.0 / len(names))
    elif system == "multitask":                        # its pipeline holds the multitask adapter only
        w = torch.ones(n, len(names))
    elif system == "single":
        w = _one_hot(names, [r.tasks[0] for r in rows])
    elif system == "top1":                             # the router's best adapter on the whole prompt, alone
        probs, _ = pipe.route([r.prompt for r in rows], forced)
        w = _one_hot(names, [names[i] for i in probs.argmax(-1).tolist()])
    else:
        raise DLPError(f"systems: unknown system {system!r}")
    return {"selection": forced, "weights": w}


def _pipe_of(system: str, pipes: _Pipes):
    return pipes.multitask if system == "multitask" else pipes.main


def _generate(system: str, pipes: _Pipes, rows: Sequence, budgets: Sequence[int], cfg: EvalConfig,
              mix: dict | None = None) -> list:
    pipe = _pipe_of(system, pipes)
    mix = _mixture(system, pipe, rows, cfg.selection) if mix is None else mix
    res = pipe.generate([r.prompt for r in rows], **mix, **_scaffold(rows, cfg), max_new_tokens=list(budgets),
                        temperature=0.0, chat=True, batch_size=len(rows))
    check(len(res) == len(rows), f"pipeline returned {len(res)} results for {len(rows)} prompts")
    return res


def _scaffold(rows: Sequence, cfg: EvalConfig) -> dict:
    """With ``composite_scaffold``, composite rows get their answer labels forced, each answer capped at its own
    task's token budget (the same for every system)."""
    if not cfg.composite_scaffold or not rows or not isinstance(rows[0], CompositePrompt):
        return {}
    return {"answer_labels": [[f"{i}." for i in range(1, len(r.items) + 1)] for r in rows],
            "answer_tokens": [[it.budget for it in r.items] for r in rows]}


def _label_tokens(tokenizer, n: int) -> int:
    """Tokens the scaffold forces for ``n`` answers ("1.", then "\n2." ..): the room a prompt's budget needs for
    them beside its answers' own budgets."""
    return sum(len(tokenizer.encode(("\n" if i > 1 else "") + f"{i}.", add_special_tokens=False))
               for i in range(1, n + 1))


FIXED_MIXTURE = ("base", "single", "top1", "multitask", "uniform")   # one forced mixture for the whole answer


class GenerationCache:
    """Greedy answers of one eval run, keyed by what decides them: the pipeline (adapter set), the prompt (all
    systems format it with the same chat template), the token budget and the mixture rounded to 1e-6. Only a
    mixture fixed for the whole answer is looked up (forced systems, and ``dlp`` routed once per prompt); a
    sentence-routed answer whose every routing record selects the same mixture is stored but never looked up,
    as its mixture is only known after it was generated."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.entries: dict[tuple, tuple[Any, float]] = {}   # key -> (result, measured seconds of that row)

    @staticmethod
    def key(pipe, prompt: str, budget: int, weights) -> tuple:
        mixture = tuple(round(float(x), 6) + 0.0 for x in weights)
        return (id(pipe), tuple(pipe.names), prompt, int(budget), "greedy", "chat", mixture)

    def lookup(self, system: str, pipe, rows: Sequence, budgets: Sequence[int], mix: dict,
               selection: SelectionConfig) -> tuple[list, list]:
        """Per row: its key (None = not looked up) and its routing record when answered from the cache."""
        if not self.enabled:
            return [None] * len(rows), [None] * len(rows)
        if system in FIXED_MIXTURE:
            weights, probs, source = mix["weights"], None, "forced"
        elif system == "dlp" and mix["selection"].granularity == "prompt" and "weights" not in mix:
            probs, weights = pipe.route([r.prompt for r in rows], mix["selection"])
            source = "prompt"
        else:
            return [None] * len(rows), [None] * len(rows)
        from .pipeline import routing_record

        keys = [self.key(pipe, r.prompt, b, w) for r, b, w in zip(rows, budgets, weights)]
        records = [routing_record(pipe.names, r.prompt, w, None if probs is None else probs[i], source)
                   for i, (r, w) in enumerate(zip(rows, weights))]
        return keys, records

    def store_sentence_routed(self, pipe, rows: Sequence, budgets: Sequence[int], results: list,
                              seconds: float) -> None:
        """A sentence-routed answer whose records all select one mixture was generated with that mixture
        throughout: later fixed-mixture systems may reuse it."""
        for r, b, res in zip(rows, budgets, results):
            recs = [e for e in (getattr(res, "routing", None) or []) if e.get("source") != "forced"]
            mixes = {(tuple(e.get("selected") or []), tuple(e.get("weights") or [])) for e in recs}
            if len(mixes) != 1:
                continue
            (selected, weights), = mixes
            w = [0.0] * len(pipe.names)
            for t, x in zip(selected, weights):
                w[list(pipe.names).index(t)] = float(x)
            self.entries.setdefault(self.key(pipe, r.prompt, b, w), (res, seconds))


_JOURNAL_FREE = ("overwrite", "resume", "command", "results_md", "results_commands")   # do not change answers


class EvalJournal:
    """The finished batches of one evaluation, appended to ``.<out>.partial/journal.jsonl`` as they finish, so
    that ``resume`` carries on an interrupted run where it stopped: greedy answers are deterministic, so a batch
    read back equals the batch regenerated, and the answer reuse replays in the same order. The first line holds
    what decides the answers (the settings, and the size and time of every input file); a journal written with
    anything else is refused. The folder is removed once ``out_dir`` is written."""

    def __init__(self, folder: Path, entries: dict, earlier_seconds: float = 0.0) -> None:
        self.folder, self.entries, self.earlier_seconds = folder, entries, earlier_seconds
        self.replayed = 0                   # batches read back instead of generated

    @classmethod
    def open(cls, cfg: EvalConfig, inputs: list[Path]) -> "EvalJournal":
        out = Path(cfg.out_dir)
        folder = out.resolve().parent / f".{out.name}.partial"
        path = folder / "journal.jsonl"
        head = {"settings": json.loads(json.dumps({k: v for k, v in dataclasses.asdict(cfg).items()
                                                   if k not in _JOURNAL_FREE}, default=str)),
                "inputs": _file_stamps(inputs)}
        if cfg.resume and path.is_file():
            return cls._read(folder, path, head)
        try:
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            path.write_text(json.dumps(head) + "\n", encoding="utf-8")
        except OSError as e:
            raise DLPError(f"{folder}: cannot write the evaluation journal ({e.strerror or e})") from None
        return cls(folder, {})

    @classmethod
    def _read(cls, folder: Path, path: Path, head: dict) -> "EvalJournal":
        lines = path.read_text(encoding="utf-8").splitlines()
        try:
            first = json.loads(lines[0])
        except (ValueError, IndexError):
            raise DLPError(f"{path}: line 1: not a journal header (remove the folder to start over)") from None
        diff = sorted({k for k in {**head["settings"], **first.get("settings", {})}
                       if head["settings"].get(k) != first.get("settings", {}).get(k)})
        if first.get("inputs") != head["inputs"]:
            diff.append("input files (adapters, router or test files changed)")
        if diff:
            raise DLPError(f"{path}: written by an evaluation with other settings ({', '.join(diff)}); "
                           f"run without --resume to start over")
        entries, seconds = {}, 0.0
        for line in lines[1:]:
            try:
                e = json.loads(line)
                key = (str(e["what"]), int(e["start"]), str(e["system"]), tuple(int(i) for i in e["rows"]))
                took, results = float(e["seconds"]), [dict(r) for r in e["results"]]
            except (ValueError, KeyError, TypeError):   # a line cut by a kill (or mangled): the rest is redone
                break
            entries[key] = (results, took)
            seconds += took * len(key[3])
        return cls(folder, entries, seconds)

    def get(self, what: str, start: int, system: str, rows: list[int]) -> tuple[list, float] | None:
        from .pipeline import GenerationResult

        hit = self.entries.get((what, start, system, tuple(rows)))
        if hit is None or len(hit[0]) != len(rows):
            return None
        try:
            results = [GenerationResult(**r) for r in hit[0]]
        except TypeError:                       # not a result this version writes: generate the batch again
            return None
        self.replayed += 1
        return results, hit[1]

    def put(self, what: str, start: int, system: str, rows: list[int], results: list, seconds: float) -> None:
        line = json.dumps({"what": what, "start": start, "system": system, "rows": rows, "seconds": seconds,
                           "results": [dataclasses.asdict(r) for r in results]})
        try:
            with open(self.folder / "journal.jsonl", "a", encoding="utf-8") as f:
                f.write(line + "\n")
        except OSError as e:   # a full disk: one line, and the batches journaled so far stay resumable
            raise DLPError(f"{self.folder}: cannot write the evaluation journal ({e.strerror or e})") from None

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def _file_stamps(paths: list[Path]) -> list:
    """(path, size, mtime) of every file under ``paths``, sorted: a retrained adapter invalidates a journal."""
    stamps = []
    for p in paths:
        files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else []
        for f in files:
            st = f.stat()
            stamps.append([str(f.resolve()), st.st_size, st.st_mtime_ns])
    return stamps


def _generate_cached(system: str, pipes: _Pipes, rows: Sequence, budgets: Sequence[int], cfg: EvalConfig,
                     cache: GenerationCache, journal: EvalJournal | None = None,
                     where: tuple = ("eval", 0)) -> tuple[list, list[dict]]:
    """One system on one batch, rows already answered with the same key taken from ``cache``. Returns the results
    and per row ``{"reused", "seconds"}``: a generated row's share of the measured batch time, a reused row the
    seconds measured when it was generated. With a ``journal``, the generated rows of a batch an interrupted run
    already finished (``where`` = what, first row) are read back with their measured seconds, not generated."""
    pipe = _pipe_of(system, pipes)
    t0 = time.perf_counter()
    mix = _mixture(system, pipe, rows, cfg.selection)
    keys, records = cache.lookup(system, pipe, rows, budgets, mix, cfg.selection)
    hit = {i: cache.entries[k] for i, k in enumerate(keys) if k is not None and k in cache.entries}
    todo = [i for i in range(len(rows)) if i not in hit]
    done = journal.get(*where, system, todo) if journal is not None and todo else None
    if done is not None:
        res, share = done
    else:
        sub = {k: (v[todo] if k == "weights" else v) for k, v in mix.items()}
        res = _generate(system, pipes, [rows[i] for i in todo], [budgets[i] for i in todo], cfg, sub) if todo else []
        share = (time.perf_counter() - t0) / max(1, len(todo))
        if journal is not None and todo:
            journal.put(*where, system, todo, res, share)
    out: list = [None] * len(rows)
    info: list[dict] = [{}] * len(rows)
    for i, r in zip(todo, res):
        out[i], info[i] = r, {"reused": False, "seconds": share}
        if keys[i] is not None:
            cache.entries.setdefault(keys[i], (r, share))
    for i, (r, sec) in hit.items():
        out[i], info[i] = dataclasses.replace(r, routing=[records[i]]), {"reused": True, "seconds": sec}
    if cache.enabled and set(mix) == {"selection"} and mix["selection"].granularity == "sentence":
        cache.store_sentence_routed(pipe, rows, budgets, out, share)
    return out, info


def _new_timing() -> dict:
    return {"seconds": 0.0, "samples": 0, "completion_tokens": 0, "prompt_tokens": 0, "generated": 0, "reused": 0,
            "seconds_all": 0.0}


def _add_timing(tm: dict, res: list, info: list[dict]) -> None:
    """Timed figures only from batches the system generated in full (a partly reused batch is smaller, so its
    time is not comparable); ``seconds_all`` is every second the system spent."""
    spent = sum(d["seconds"] for d in info if not d["reused"])
    tm["seconds_all"] += spent
    tm["generated"] += sum(1 for d in info if not d["reused"])
    tm["reused"] += sum(1 for d in info if d["reused"])
    if any(d["reused"] for d in info):
        return
    tm["seconds"] += spent
    tm["samples"] += len(res)
    for r in res:
        tm["completion_tokens"] += int(getattr(r, "completion_tokens", 0) or 0)
        tm["prompt_tokens"] += int(getattr(r, "prompt_tokens", 0) or 0)


def _run_interleaved(systems: list[str], pipes: _Pipes, rows: Sequence, budgets: Sequence[int], cfg: EvalConfig,
                     progress: bool, what: str = "eval", journal: EvalJournal | None = None) -> tuple[dict, dict, dict]:
    """Every row through every system, batch by batch, the systems taking turns (the first one rotating, so no
    system always runs on a cold cache; with reuse, each system in turn is the one that generates a shared
    answer). Returns outputs, timing and per-row reuse / seconds per system."""
    from tqdm.auto import tqdm

    outputs: dict[str, list] = {s: [None] * len(rows) for s in systems}
    rowinfo: dict[str, list] = {s: [None] * len(rows) for s in systems}
    timing = {s: _new_timing() for s in systems}
    cache = GenerationCache(cfg.reuse)
    warm = rows[: cfg.batch_size]
    for system in systems:   # lazy init and allocator warm-up, so the first timed batch is not penalised
        _generate(system, pipes, warm, [2] * len(warm), cfg)
    bars = {s: tqdm(total=len(rows), desc=f"{what} {s}", position=i, leave=True, disable=not progress,
                    file=sys.stderr) for i, s in enumerate(systems)}
    try:
        for b, start in enumerate(range(0, len(rows), cfg.batch_size)):
            batch, bud = rows[start: start + cfg.batch_size], budgets[start: start + cfg.batch_size]
            k = b % max(1, len(systems))
            for system in systems[k:] + systems[:k]:
                res, info = _generate_cached(system, pipes, batch, bud, cfg, cache, journal, (what, start))
                _add_timing(timing[system], res, info)
                outputs[system][start: start + len(res)] = res
                rowinfo[system][start: start + len(res)] = info
                bars[system].update(len(batch))
    finally:
        for bar in bars.values():
            bar.close()
    return outputs, timing, rowinfo


# ---- composite prompts -----------------------------------------------------------------------------------------

def _composite_pools(tests: _TestSet, budgets: dict[str, int]) -> dict[str, list[CompositeItem]]:
    """Every unseen test question of every task (not only the first ``limit``), ready to be scored."""
    pools = {}
    for t in tests.tasks:
        pools[t.name] = [CompositeItem(t.name, r.question, r.answer, tests.metric[t.name],
                                       tuple(r.choices or tests.choices[t.name] or ()) or None, budgets[t.name])
                         for r in tests.kept[t.name]]
    return pools


def _evaluate_composites(cfg: EvalConfig, pipes: _Pipes, tests: _TestSet, budgets: dict[str, int],
                         progress: bool, journal: EvalJournal | None = None) -> tuple[dict, list[dict]]:
    """Per composite size N: ``composite_n`` prompts (fixed seed), every composite system interleaved as in the
    per-task loop; a prompt's token budget is the sum of its questions' task budgets (with the scaffold, plus
    room for the forced labels)."""
    systems = [s for s in cfg.systems if s not in PER_TASK_ONLY]
    skipped = {s: "needs one true task per prompt" for s in cfg.systems if s in PER_TASK_ONLY}
    report: dict[str, dict] = {}
    rows: list[dict] = []
    pools = _composite_pools(tests, budgets) if cfg.composite else {}
    for n in cfg.composite:
        prompts = build_composites(pools, n, cfg.composite_n, cfg.seed)
        labels = _label_tokens(pipes.main.tokenizer, n) if cfg.composite_scaffold else 0
        bud = [sum(budgets[t] for t in p.tasks) + labels for p in prompts]
        outputs, timing, rowinfo = _run_interleaved(systems, pipes, prompts, bud, cfg, progress,
                                                    what=f"composite-{n}", journal=journal)
        scored = {s: [score_composite(outputs[s][i].text, p) for i, p in enumerate(prompts)] for s in systems}
        report[str(n)] = {
            "prompts": len(prompts), "skipped": skipped, "scaffold": cfg.composite_scaffold,
            "scores": {s: {**composite_figures(scored[s]),
                           "seconds_per_prompt": timing[s]["seconds"] / timing[s]["samples"]
                           if timing[s]["samples"] else None,
                           "completion_tokens": timing[s]["completion_tokens"],
                           "generated": timing[s]["generated"], "reused": timing[s]["reused"]} for s in systems}}
        if "dlp-segment" in systems:
            report[str(n)]["scores"]["dlp-segment"]["question_routing_accuracy"] = \
                _question_routing(outputs["dlp-segment"], prompts)
        report[str(n)]["target"] = _composite_target(report[str(n)]["scores"])
        rows.extend(_composite_row(n, p, systems, outputs, scored, i, rowinfo) for i, p in enumerate(prompts))
    return report, rows


def _composite_target(scores: dict) -> dict | None:
    """The composite target: dlp-segment's item score above top1, dlp (prompt), uniform and multitask; its
    distance to oracle-segment and to dlp-sentence is reported beside."""
    above = [s for s in ("top1", "dlp", "uniform", "multitask") if s in scores]
    if "dlp-segment" not in scores or not above:
        return None
    d = scores["dlp-segment"]["item_score"]
    target: dict[str, Any] = {f"dlp_segment_minus_{s}": d - f["item_score"] for s, f in scores.items()
                              if s != "dlp-segment"}
    target["met"] = all(target[f"dlp_segment_minus_{s}"] > 0 for s in above)
    return target


def _question_routing(results: list, prompts: list[CompositePrompt]) -> float:
    """dlp-segment: % of questions whose own routing (top-1 of its segment's probabilities) is its true task; a
    prompt whose questions were not found as numbered items counts every question as missed."""
    hits = []
    for res, p in zip(results, prompts):
        seg = [e for e in _routing_of(res) if e.get("source") == "segment"]
        for k, it in enumerate(p.items):
            probs = seg[k].get("probs") or {} if len(seg) == len(p.items) else {}
            hits.append(bool(probs) and max(probs, key=probs.get) == it.task)
    return 100.0 * sum(hits) / max(1, len(hits))


def _composite_row(n: int, p: CompositePrompt, systems: list[str], outputs: dict, scored: dict, i: int,
                   rowinfo: dict) -> dict:
    return {"n": n, "index": p.index, "prompt": p.prompt,
            "items": [{"task": it.task, "question": it.question, "reference": it.reference, "metric": it.metric}
                      for it in p.items],
            "outputs": {s: outputs[s][i].text for s in systems},
            "answers": {s: scored[s][i].answers for s in systems},
            "scores": {s: scored[s][i].scores for s in systems},
            "all_correct": {s: scored[s][i].all_correct for s in systems},
            "reused": {s: rowinfo[s][i]["reused"] for s in systems},
            "seconds": {s: round(rowinfo[s][i]["seconds"], 6) for s in systems},
            "routing": {s: _routing_of(outputs[s][i]) for s in systems if s in ROUTED}}


# ---- scores, routing, timing -----------------------------------------------------------------------------------

def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def _score_tasks(tests: _TestSet, samples: list[_Sample], systems: list[str], outputs: dict) -> dict:
    """Per task and system: the task's figures in points (metrics.task_scores)."""
    per_task: dict[str, dict[str, dict]] = {}
    for t in tests.tasks:
        idx = [i for i, s in enumerate(samples) if s.task == t.name]
        per_task[t.name] = {
            system: task_scores(tests.metric[t.name], [outputs[system][i].text for i in idx],
                                [samples[i].reference for i in idx], [samples[i].choices for i in idx])
            for system in systems}
    return per_task


def _averages(tests: _TestSet, per_task: dict, systems: list[str]) -> dict:
    """Per system: the mean task score over MCQ tasks, QA tasks and all tasks (the paper's table columns), and
    the mean BLEU / ROUGE over the text tasks."""
    group = {"mcq": [t for t, m in tests.metric.items() if m == "accuracy"],
             "qa": [t for t, m in tests.metric.items() if m != "accuracy"], "overall": list(per_task)}
    text = [t for t, m in tests.metric.items() if m in TEXT_METRICS]
    averages: dict[str, dict] = {}
    for system in systems:
        a: dict[str, Any] = {g: _mean([per_task[t][system]["score"] for t in ts]) for g, ts in group.items()}
        for k in ("bleu", *ROUGE_TYPES):
            a[f"qa_{k}"] = _mean([per_task[t][system][k] for t in text])
        averages[system] = a
    return averages


def _routing_of(result) -> list[dict]:
    return [dict(e) for e in (getattr(result, "routing", None) or [])]


def _routing_stats(entries: list[dict], names: list[str], true_task: str) -> dict:
    """Per-sample routing figures from the pipeline's routing entries (one per routed sentence): the top-1
    task of the mean probabilities over the prompt's sentences (the paper's router accuracy), and over every
    routed sentence (generated ones included) the mean number of selected adapters and the mean weight on the
    true task."""
    entries = [e for e in entries if e.get("source") != "forced"]
    if not entries:
        return {"top1": None, "selected": 0.0, "true_weight": 0.0}
    on_prompt = [e for e in entries if e.get("source", "prompt") == "prompt"] or entries
    probs = {n: 0.0 for n in names}
    for e in on_prompt:
        for k, v in (e.get("probs") or {}).items():
            probs[k] = probs.get(k, 0.0) + float(v) / len(on_prompt)
    sel = tw = 0.0
    for e in entries:
        selected = list(e.get("selected") or [])
        weights = [float(w) for w in (e.get("weights") or [])]
        sel += len(selected) / len(entries)
        if true_task in selected and len(weights) == len(selected):
            tw += weights[selected.index(true_task)] / len(entries)
    top1 = max(probs.items(), key=lambda kv: kv[1])[0] if probs else None
    return {"top1": top1, "selected": sel, "true_weight": tw}


def _routing_report(samples: list[_Sample], results: list, names: list[str], system: str,
                    selection: SelectionConfig) -> tuple[dict, list[dict]]:
    """Routing accuracy (top-1 on the prompt == true task), mean selected adapters, mean weight on the true
    task - overall and per task - and the confusion matrix; plus each sample's own figures."""
    index = {n: i for i, n in enumerate(names)}
    conf = [[0] * len(names) for _ in names]
    per: dict[str, dict[str, list]] = {}
    rows = []
    for s, res in zip(samples, results):
        entries = _routing_of(res)
        st = _routing_stats(entries, names, s.task)
        rows.append({"top1": st["top1"], "n_selected": st["selected"], "true_weight": st["true_weight"],
                     "entries": entries})
        d = per.setdefault(s.task, {"correct": [], "selected": [], "true_weight": []})
        for k, v in (("correct", float(st["top1"] == s.task)), ("selected", st["selected"]),
                     ("true_weight", st["true_weight"])):
            d[k].append(v)
        if s.task in index and st["top1"] in index:
            conf[index[s.task]][index[st["top1"]]] += 1
    every = {k: [v for d in per.values() for v in d[k]] for k in ("correct", "selected", "true_weight")}
    report = {"system": system, "accuracy": 100.0 * _mean(every["correct"]), "mean_selected": _mean(every["selected"]),
              "mean_true_weight": _mean(every["true_weight"]),
              "per_task": {t: {"accuracy": 100.0 * _mean(d["correct"]), "mean_selected": _mean(d["selected"]),
                               "mean_true_weight": _mean(d["true_weight"])} for t, d in per.items()},
              "confusion": {"labels": names, "rows": "true task", "columns": "top-1 routed task", "matrix": conf},
              **selection.to_json()}
    return report, rows


def _timing_report(timing: dict) -> dict:
    """Seconds per sample, tokens per second, time per generated token and their ratios to base and single, all
    from the batches each system generated in full (see :func:`_add_timing`)."""
    for tm in timing.values():
        tm["seconds_per_sample"] = tm["seconds"] / tm["samples"] if tm["samples"] else None
        tm["tokens_per_s"] = tm["completion_tokens"] / tm["seconds"] if tm["seconds"] > 0 else None
        tm["seconds_per_token"] = tm["seconds"] / tm["completion_tokens"] if tm["completion_tokens"] else None
    for tm in timing.values():
        for ref in ("base", "single"):
            if ref in timing:
                r = timing[ref]
                tm[f"ratio_to_{ref}"] = (tm["seconds_per_sample"] / r["seconds_per_sample"]
                                         if tm["seconds_per_sample"] and r["seconds_per_sample"] else None)
                tm[f"token_ratio_to_{ref}"] = (tm["seconds_per_token"] / r["seconds_per_token"]
                                               if tm["seconds_per_token"] and r["seconds_per_token"] else None)
    return timing


def _target(averages: dict) -> dict | None:
    """The quality target: DLP-LoRA within 0.5 points of single on average, above uniform and above base."""
    if "dlp" not in averages:
        return None
    d = averages["dlp"]["overall"]
    target: dict[str, Any] = {"dlp_overall": d}
    checks = []
    for other in ("single", "uniform", "base", "top1", "multitask", "dlp-sentence"):
        if other in averages:
            target[f"dlp_minus_{other}"] = d - averages[other]["overall"]
            if other == "single":
                checks.append(target[f"dlp_minus_{other}"] >= -0.5)
            elif other in ("uniform", "base"):
                checks.append(target[f"dlp_minus_{other}"] > 0)
    target["met"] = bool(checks) and all(checks)
    return target


# ---- summary and files -----------------------------------------------------------------------------------------

def _run_info(run: Run | None) -> dict:
    """How the run was built, for the report: per adapter the training steps and loss (dlp_task.json) and the
    router's own held-out accuracy and training time (router/metrics.json), when present."""
    if run is None:
        return {"adapters": {}, "router": None}
    keys = ("steps", "loss_start", "loss_end", "train_seconds", "records_used")
    adapters = {m["task"]: {k: m.get(k) for k in keys if m.get(k) is not None} for m in run.metas}
    router = None
    rd = run.router_dir if run.router_dir is not None else (run.root / "router" if run.root is not None else None)
    if rd is not None and (rd / "metrics.json").is_file():
        try:
            mt = json.loads((rd / "metrics.json").read_text(encoding="utf-8"))
            router = {k: mt.get(k) for k in ("kind", "params", "val_accuracy", "test_accuracy", "train_seconds")
                      if k in mt}
        except (OSError, ValueError):
            router = None
    return {"adapters": adapters, "router": router}


def pipeline_model_identity(pipeline) -> dict:
    from .models import model_identity

    try:
        return model_identity(pipeline.model)
    except Exception:  # a fake pipeline (tests) has no model to describe
        return {}


def _summary(cfg: EvalConfig, run: Run | None, pipes: _Pipes, tests: _TestSet, samples: list[_Sample],
             systems: list[str], outputs: dict, timing: dict, names: list[str]) -> tuple[dict, list | None]:
    """summary.json without the composite part, and each sample's routing figures (None without a routed
    system)."""
    per_task = _score_tasks(tests, samples, systems, outputs)
    averages = _averages(tests, per_task, systems)
    routed = next((s for s in MIXTURE_REPORTED if s in systems), None)
    routing = sample_routing = None
    if routed is not None:
        sel = cfg.selection.replace(granularity=_SYSTEM_GRANULARITY.get(routed, cfg.selection.granularity))
        routing, sample_routing = _routing_report(samples, outputs[routed], names, routed, sel)
    summary = {
        "created": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "run": str(run.root or cfg.run_dir) if run is not None else (cfg.run_dir or None),
        "model": run.base_model if run is not None else (cfg.model_spec or None),
        "model_identity": pipeline_model_identity(pipes.main),
        "adapters": names, "systems": systems, "n_samples": len(samples),
        "dropped_seen_in_training": tests.dropped, "run_info": _run_info(run),
        "tasks": [{"task": t.name, "file": str(Path(t.path).resolve()) if t.path else "", "metric": tests.metric[t.name],
                   "n": sum(1 for s in samples if s.task == t.name), "has_adapter": t.name in names,
                   "group": "mcq" if tests.metric[t.name] == "accuracy" else "qa"} for t in tests.tasks],
        "per_task": per_task, "averages": averages, "routing": routing,
        "timing": _timing_report(timing), "target": _target(averages),
        "reuse": {"enabled": cfg.reuse, "reused": {s: timing[s]["reused"] for s in systems},
                  "generated": {s: timing[s]["generated"] for s in systems}},
        "command": cfg.command, "config": dataclasses.asdict(cfg),
    }
    return summary, sample_routing


def _prediction_rows(samples: list[_Sample], systems: list[str], outputs: dict, sample_routing: list | None,
                     rowinfo: dict) -> list[dict]:
    rows = []
    for i, s in enumerate(samples):
        rows.append({"task": s.task, "index": s.index, "prompt": s.question, "reference": s.reference,
                     "metric": s.metric, "choices": s.choices,
                     "outputs": {sy: outputs[sy][i].text for sy in systems},
                     "scores": {sy: score(s.metric, outputs[sy][i].text, s.reference, s.choices) for sy in systems},
                     "completion_tokens": {sy: getattr(outputs[sy][i], "completion_tokens", None) for sy in systems},
                     "finish_reason": {sy: getattr(outputs[sy][i], "finish_reason", None) for sy in systems},
                     "reused": {sy: rowinfo[sy][i]["reused"] for sy in systems},
                     "seconds": {sy: round(rowinfo[sy][i]["seconds"], 6) for sy in systems},
                     "routing": sample_routing[i] if sample_routing is not None else None})
    return rows


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def _write(cfg: EvalConfig, summary: dict, rows: list[dict], composite_rows: list[dict]) -> None:
    """TestOutputs/<name>/ complete or absent (temp folder + rename), then the RESULTS.md section."""
    md = summary_markdown(summary)
    with atomic_dir(cfg.out_dir, overwrite=cfg.overwrite) as tmp:
        _write_jsonl(tmp / "predictions.jsonl", rows)
        if composite_rows:
            _write_jsonl(tmp / "composite.jsonl", composite_rows)
        atomic_write_json(tmp / "summary.json", summary)
        atomic_write_text(tmp / "summary.md", md)
        atomic_write_json(tmp / "config.json", summary["config"])
        _plots(summary, tmp / "plots")
    if cfg.results_md:
        write_results_md(cfg.results_md, cfg.out_dir, summary, md, cfg.results_commands or None)


def paper_summary(summary: dict, train_seconds: float | None = None, command: str | None = None) -> dict:
    """The comparable, small summary of an evaluation (``results/paper21/summary.json``): scores in points
    (0-100, 2 decimals), MCQ / QA / overall averages, routing accuracy and mean selected adapters, composite
    figures per size and system, seconds spent (``train_seconds`` default: the adapters' and the router's own
    training times from the run's metadata) and the command (default: the eval command)."""
    systems = list(summary["systems"])
    for size in (summary.get("composite") or {}).values():
        systems += [s for s in size["scores"] if s not in systems]
    routing = summary.get("routing")
    return {
        "model": summary.get("model"),
        "tasks": [t["task"] for t in summary["tasks"]],
        "systems": systems,
        "per_task": {t["task"]: {"metric": t["metric"], "n": t["n"],
                                 "scores": {s: _r2(v["score"]) for s, v in summary["per_task"][t["task"]].items()}}
                     for t in summary["tasks"]},
        "averages": {g: {s: _r2(a[g]) for s, a in summary["averages"].items()} for g in ("mcq", "qa", "overall")},
        "routing": {"accuracy": _r2(routing["accuracy"]), "mean_selected": _r2(routing["mean_selected"])}
        if routing else None,
        "composite": {n: {s: {k: _r2(f[k]) for k in ("item_score", "all_correct", "format_rate")}
                          for s, f in size["scores"].items()} for n, size in (summary.get("composite") or {}).items()},
        "seconds": {"train": _r2(train_seconds if train_seconds is not None else _train_seconds(summary)),
                    "eval": _r2(summary.get("seconds"))},
        "command": command if command is not None else summary.get("command"),
    }


def _r2(v) -> float | None:
    return None if v is None else round(float(v), 2)


def _train_seconds(summary: dict) -> float:
    info = summary.get("run_info") or {}
    total = sum(float(d.get("train_seconds") or 0.0) for d in (info.get("adapters") or {}).values())
    return total + float((info.get("router") or {}).get("train_seconds") or 0.0)


# ================================================================================================================
# Reports: Markdown, plots, RESULTS.md
# ================================================================================================================

def _fmt(v: Any, nd: int = 2) -> str:
    if v is None or (isinstance(v, float) and v != v):
        return "-"
    return f"{v:.{nd}f}" if isinstance(v, float) else str(v)


def summary_markdown(summary: dict) -> str:
    """The summary as Markdown tables (the same text is summary.md and is printed by the CLI)."""
    parts = [_md_scores(summary), _md_target(summary), _md_routing(summary), _md_composite(summary),
             _md_timing(summary), _md_run_info(summary)]
    return "\n\n".join(p for p in parts if p) + "\n"


def _md_scores(summary: dict) -> str:
    systems = summary["systems"]
    if not systems:      # composite-only systems
        return ""
    lines = [f"### Scores per task (points, 0-100; {summary['n_samples']} samples, same for every system)", "",
             "| task | metric | n | " + " | ".join(systems) + " |", "|---|---|---:|" + "---:|" * len(systems)]
    for t in summary["tasks"]:
        row = summary["per_task"][t["task"]]
        lines.append(f"| {t['task']} | {t['metric']} | {t['n']} | " +
                     " | ".join(_fmt(row[s]["score"], 1) for s in systems) + " |")
    dropped = {t: k for t, k in (summary.get("dropped_seen_in_training") or {}).items() if k}
    if dropped:
        lines += ["", "Test questions also present in the adapter's training file were dropped: " +
                  ", ".join(f"{t} {k}" for t, k in dropped.items()) + "."]
    lines += ["", "### Averages", "", "| average | " + " | ".join(systems) + " |", "|---|" + "---:|" * len(systems)]
    av = summary["averages"]
    labels = [("mcq", "MCQ accuracy"), ("qa", "QA score"), ("overall", "overall"), ("qa_bleu", "QA BLEU"),
              ("qa_rouge1", "QA ROUGE-1"), ("qa_rouge2", "QA ROUGE-2"), ("qa_rougeL", "QA ROUGE-L")]
    for key, label in labels:
        if any(av[s].get(key) is not None for s in systems):
            lines.append(f"| {label} | " + " | ".join(_fmt(av[s].get(key), 2) for s in systems) + " |")
    return "\n".join(lines)


def _md_target(summary: dict) -> str:
    tg = summary.get("target")
    if not tg:
        return ""
    parts = [f"DLP-LoRA overall {tg['dlp_overall']:.2f}"]
    parts += [f"{v:+.2f} vs {k.removeprefix('dlp_minus_')}" for k, v in tg.items() if k.startswith("dlp_minus_")]
    return (f"Target (within 0.5 points of single, above uniform and base): "
            f"**{'met' if tg['met'] else 'not met'}** - " + ", ".join(parts) + ".")


def _md_routing(summary: dict) -> str:
    r = summary.get("routing")
    if not r:
        return ""
    lines = [f"### Routing ({r['system']}: top_p={r['top_p']}, weighting={r['weighting']}, "
             f"granularity={r['granularity']})", "",
             "| task | routing accuracy % | mean selected adapters | mean weight on true task |", "|---|---:|---:|---:|"]
    for t, d in r["per_task"].items():
        lines.append(f"| {t} | {_fmt(d['accuracy'], 1)} | {_fmt(d['mean_selected'], 2)} | {_fmt(d['mean_true_weight'], 3)} |")
    lines.append(f"| **all** | {_fmt(r['accuracy'], 1)} | {_fmt(r['mean_selected'], 2)} | {_fmt(r['mean_true_weight'], 3)} |")
    return "\n".join(lines)


def _md_composite(summary: dict) -> str:
    comp = summary.get("composite") or {}
    lines = []
    for n, size in comp.items():
        lines += [f"### Composite-{n} ({size['prompts']} prompts of {n} questions from {n} different tasks; "
                  "points, 0-100)", "",
                  "| system | item score | all items correct | format rate | s/prompt | reused |",
                  "|---|---:|---:|---:|---:|---:|"]
        for s, f in size["scores"].items():
            lines.append(f"| {s} | {_fmt(f['item_score'], 1)} | {_fmt(f['all_correct'], 1)} | "
                         f"{_fmt(f['format_rate'], 1)} | {_fmt(f['seconds_per_prompt'], 3)} | {f.get('reused', 0)} |")
        tg = size.get("target")
        if tg:
            lines += ["", f"Target (dlp-segment item score above top1, dlp, uniform and multitask): "
                          f"**{'met' if tg['met'] else 'not met'}** - " +
                      ", ".join(f"{v:+.2f} vs {k.removeprefix('dlp_segment_minus_')}" for k, v in tg.items()
                                if k != "met") + "."]
        qr = size["scores"].get("dlp-segment", {}).get("question_routing_accuracy")
        if qr is not None:
            lines += ["", f"dlp-segment routed {_fmt(qr, 1)}% of the questions to their own task."]
        if size.get("skipped"):
            lines += ["", "Not run on composite prompts: " +
                      ", ".join(f"{s} ({why})" for s, why in size["skipped"].items()) + "."]
        lines.append("")
    return "\n".join(lines).rstrip()


def _md_timing(summary: dict) -> str:
    tm = summary["timing"]
    if not tm:
        return ""
    lines = ["### Time (same run, systems interleaved per batch)", "",
             "Time per generated token includes the prompt's prefill, so a system that stops early (short answers) "
             "pays more per token; compare systems that generate the same number of tokens (e.g. single vs dlp), "
             "or use `dlp-lora bench` for fixed-length ratios. Answers reused from another system with the same "
             "mixture are not timed again: times come from the batches each system generated in full "
             "(`--no-reuse` times every batch).", "",
             "| system | s/sample | tokens/s | gen. tokens | time/token vs base | time/token vs single | time/sample vs base "
             "| timed samples | reused |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for s in summary["systems"]:
        d = tm[s]
        lines.append(f"| {s} | {_fmt(d['seconds_per_sample'], 3)} | {_fmt(d['tokens_per_s'], 1)} | {d['completion_tokens']} | "
                     f"{_fmt(d.get('token_ratio_to_base'), 2)} | {_fmt(d.get('token_ratio_to_single'), 2)} | "
                     f"{_fmt(d.get('ratio_to_base'), 2)} | {d['samples']} | {d.get('reused', 0)} |")
    return "\n".join(lines)


def _md_run_info(summary: dict) -> str:
    info = summary.get("run_info") or {}
    ad = {t: d for t, d in (info.get("adapters") or {}).items() if d}
    lines = []
    if ad:
        lines += ["### How the run was built (from dlp_task.json / router/metrics.json)", "",
                  "| adapter | steps | records used | loss start | loss end | train s |", "|---|---:|---:|---:|---:|---:|"]
        for t, d in ad.items():
            lines.append(f"| {t} | {_fmt(d.get('steps'))} | {_fmt(d.get('records_used'))} | {_fmt(d.get('loss_start'), 3)} | "
                         f"{_fmt(d.get('loss_end'), 3)} | {_fmt(d.get('train_seconds'), 0)} |")
    rt = info.get("router")
    if rt:
        lines += ["", "Router: " + ", ".join(f"{k} {_fmt(v, 4)}" for k, v in rt.items()) + "."]
    return "\n".join(lines).strip()


def _plots(summary: dict, folder: Path) -> None:
    """plots/scores.png, plots/routing_confusion.png (with a routing report), plots/time_ratios.png (Agg)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    for draw, name in ((_plot_scores, "scores.png"), (_plot_confusion, "routing_confusion.png"),
                       (_plot_time, "time_ratios.png")):
        fig = draw(plt, summary)
        if fig is not None:
            fig.tight_layout()
            fig.savefig(folder / name, dpi=100)
            plt.close(fig)


def _plot_scores(plt, summary: dict):
    systems, tasks = summary["systems"], [t["task"] for t in summary["tasks"]]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.7 * len(tasks) * max(1, len(systems)) / 2 + 2), 4.5))
    width = 0.8 / max(1, len(systems))
    for k, s in enumerate(systems):
        xs = [i + (k - (len(systems) - 1) / 2) * width for i in range(len(tasks))]
        ax.bar(xs, [summary["per_task"][t][s]["score"] for t in tasks], width, label=s)
    ax.set_xticks(range(len(tasks)))
    ax.set_xticklabels(tasks, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("score (points)")
    ax.set_title("Score per task by system")
    if systems:
        ax.legend(fontsize=8)
    return fig


def _plot_confusion(plt, summary: dict):
    r = summary.get("routing")
    if not r:
        return None
    labels, mat = r["confusion"]["labels"], r["confusion"]["matrix"]
    norm = [[v / max(1, sum(row)) for v in row] for row in mat]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.45 * len(labels) + 2), max(3.5, 0.45 * len(labels) + 1.5)))
    im = ax.imshow(norm, vmin=0.0, vmax=1.0, cmap="Blues")
    ax.set_xticks(range(len(labels)))
    ax.set_yticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=90, fontsize=7)
    ax.set_yticklabels(labels, fontsize=7)
    ax.set_xlabel("top-1 routed task")
    ax.set_ylabel("true task")
    ax.set_title(f"Routing confusion (accuracy {r['accuracy']:.1f}%)")
    fig.colorbar(im, ax=ax, fraction=0.046)
    return fig


def _plot_time(plt, summary: dict):
    tm, systems = summary["timing"], summary["systems"]
    refs = [ref for ref in ("base", "single") if ref in tm]
    fig, ax = plt.subplots(figsize=(6, 4))
    width = 0.8 / max(1, len(refs))
    for k, ref in enumerate(refs):
        xs = [i + (k - (len(refs) - 1) / 2) * width for i in range(len(systems))]
        ax.bar(xs, [tm[s].get(f"token_ratio_to_{ref}") or 0.0 for s in systems], width, label=f"vs {ref}")
    ax.axhline(1.0, color="gray", lw=0.8, ls="--")
    ax.set_xticks(range(len(systems)))
    ax.set_xticklabels(systems, rotation=30, ha="right")
    ax.set_ylabel("time per generated token (ratio)")
    ax.set_title("Time ratios (same run)")
    if refs:
        ax.legend(fontsize=8)
    return fig


def write_results_md(path, out_dir, summary: dict, md: str, commands_file=None) -> Path:
    """Write (or replace) this evaluation's section of a RESULTS.md; other sections are kept. The section holds
    the exact eval command, a link to the commands file given (e.g. scripts/results.sh) and the summary tables."""
    path = Path(path)
    name = Path(out_dir).name
    begin, end = f"<!-- dlp-lora eval: {name} -->", f"<!-- end dlp-lora eval: {name} -->"
    head = "# DLP-LoRA results\n\nWritten by `dlp-lora eval --results-md` (one section per evaluation; not edited by hand).\n"
    old = path.read_text(encoding="utf-8") if path.is_file() else head
    sec = [begin, f"## {name}", "",
           f"Model: `{summary.get('model')}` · run: `{summary.get('run')}` · adapters: {len(summary['adapters'])} · "
           f"written {summary['created']} · output: `{out_dir}`", ""]
    if summary.get("command"):
        sec += ["Evaluation command:", "", "```bash", summary["command"], "```", ""]
    if commands_file:
        cf = Path(commands_file)
        check(cf.is_file(), f"{cf}: --results-commands file not found")
        # linked, not pasted: one script re-creates several sections, and RESULTS.md keeps to the tables
        link = Path(os.path.relpath(cf.resolve(), path.resolve().parent)).as_posix()
        sec += [f"Re-created by [`{link}`]({link}) (the commands that built this run).", ""]
    sec += [md.rstrip(), "", end]
    block = "\n".join(sec)
    if begin in old and end in old:
        pre, rest = old.split(begin, 1)
        text = pre + block + rest.split(end, 1)[1]
    else:
        text = old.rstrip() + "\n\n" + block + "\n"
    atomic_write_text(path, text)
    return path


def command_line(argv: Sequence[str] | None = None) -> str:
    """``dlp-lora ARGS`` as a copy-pasteable shell line (recorded in summary.json and RESULTS.md)."""
    return "dlp-lora " + shlex.join(list(argv if argv is not None else sys.argv[1:]))
