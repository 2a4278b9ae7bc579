"""Train task LoRAs on Q/A data with PEFT + the transformers ``Trainer`` (``dlp-lora train-lora``).

The seed's page 1 ("Basic LoRA Training"), done on any Hugging Face causal LM:

* prompts go through :func:`dlp_lora.data.format_prompt` (chat template or plain form) exactly as at inference;
  the answer follows with the model's EOS appended, and the loss is taken on answer tokens only (prompt and
  padding labels are -100);
* no hand-written loop and no hand-written DDP: ``Trainer`` does the loop, so ``accelerate launch`` / ``torchrun``
  (DDP, DeepSpeed, FSDP) work unchanged; only the main process writes the final artifact;
* checkpoints (Trainer's ``checkpoint-N`` folders) live in a hidden work folder ``.<name>.partial`` beside the
  output, so ``resume=True`` continues after a crash or kill; the final adapter is always saved at the end (the
  seed saved only every 2001 steps) into a temp sibling folder that is renamed into place, so an interrupted run
  never leaves a folder that looks finished.

Three entry points share one training recipe (:func:`_train`, a short list of named steps):
:func:`train_adapter` (one task file), :func:`train_adapters` (one adapter per task file of a folder, plus
``adapters.txt``) and :func:`train_multitask` (ONE adapter on the union of a folder's tasks: the "why not just
train one LoRA" baseline of the evaluation).

Output folder (an ordinary PEFT adapter that ``PeftModel.from_pretrained`` loads)::

    adapter_config.json  adapter_model.safetensors  dlp_task.json  train_config.json

A run folder holds ``adapters/<task>/`` per task and ``adapters.txt`` (one adapter folder a line, relative to the
file's folder; the seed's "LoRA pathList.txt"), read back by :func:`dlp_lora.run.read_adapter_list`.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any, Sequence

from .config import (DLPError, LoRATrainConfig, atomic_dir, atomic_write_json, check_output, check_output_path,
                     config_to_dict, save_config)
from .data import QARecord, TaskData, file_sha256, format_prompt, read_task, read_task_dir, task_files
from .run import (ADAPTER_CONFIG, ADAPTER_LIST, ADAPTER_WEIGHTS, TASK_META, TRAIN_CONFIG, adapter_list_path,
                  check_adapter_dir, read_adapter_list, read_task_meta, write_adapter_list)

RESUME_INFO = "dlp_resume.json"     # inside the work folder: what a resumed run must match
IGNORE_INDEX = -100                 # label value the causal-LM loss ignores
MULTITASK = "multitask"             # task name of the one-LoRA-on-all-tasks adapter (RUN/multitask/)
# No tokenizer of a natural-language model packs more than this many characters into one token on average, so a
# question longer than max_length * CHARS_PER_TOKEN characters cannot fit max_length tokens: it is dropped before
# tokenising, and a longer answer is cut there first (a 50 MB record must not cost gigabytes of token ids).
CHARS_PER_TOKEN = 16

__all__ = ["train_adapter", "train_adapters", "train_multitask", "multitask_data", "tokenize_task", "collate",
           "answer_eos_id", "format_summary", "work_dir_for", "is_finished_adapter", "is_main_process",
           "linear_module_names", "check_target_modules", "check_adapter_dir", "read_adapter_list",
           "read_task_meta", "write_adapter_list", "ADAPTER_LIST", "MULTITASK"]


# Small helpers

def is_main_process() -> bool:
    """True in a plain process and in rank 0 of a ``torchrun`` / ``accelerate launch`` job (reads ``RANK``)."""
    return int(os.environ.get("RANK", "0") or 0) == 0


def work_dir_for(out_dir: str | os.PathLike) -> Path:
    """The hidden work folder beside ``out_dir`` that holds Trainer checkpoints until the adapter is final."""
    out = Path(out_dir).absolute()
    return out.parent / f".{out.name}.partial"


def is_finished_adapter(out_dir: str | os.PathLike) -> bool:
    """A folder written by :func:`train_adapter` to the end (adapter weights and ``dlp_task.json`` present)."""
    out = Path(out_dir)
    return all((out / f).is_file() for f in (ADAPTER_CONFIG, ADAPTER_WEIGHTS, TASK_META))


def _human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def format_summary(out_dir: str | os.PathLike, meta: dict | None = None) -> str:
    """One line summarising a trained adapter: steps, loss start -> end, time, adapter size."""
    meta = meta if meta is not None else read_task_meta(out_dir)
    steps = meta.get("steps") or 0
    secs = float(meta.get("train_seconds") or 0.0)
    per = f", {secs / steps:.2f} s/step" if steps else ""
    ls, le = meta.get("loss_start"), meta.get("loss_end")
    loss = f"loss {ls:.4f} -> {le:.4f}" if isinstance(ls, (int, float)) and isinstance(le, (int, float)) else "loss n/a"
    size = _human_bytes(int(meta.get("adapter_bytes") or 0))
    return f"{meta.get('task')}: {steps} steps, {loss}, {secs:.1f}s{per}, adapter {size} -> {out_dir}"


# Tokenisation and collation (answer-only loss)

def answer_eos_id(model, tokenizer) -> int:
    """The token appended after every answer: the tokenizer's EOS when generation stops on it (for chat models
    this is the end-of-turn token, e.g. ``<|im_end|>``), else the first EOS of ``generation_config``."""
    from .models import eos_token_ids

    ids = eos_token_ids(model, tokenizer)
    if tokenizer.eos_token_id is not None and int(tokenizer.eos_token_id) in ids:
        return int(tokenizer.eos_token_id)
    if not ids:
        raise DLPError("model: no EOS token in the tokenizer or generation_config (cannot mark answer ends)")
    return ids[0]


def _record_features(rec: QARecord, tokenizer, eos_id: int, max_length: int) -> dict | None:
    """``input_ids`` / ``labels`` of one record, or None when no answer token fits ``max_length``."""
    bound = max_length * CHARS_PER_TOKEN
    if len(rec.question) > bound:        # its prompt is longer than max_length tokens: dropped, never tokenised
        return None
    prompt_ids = list(tokenizer(format_prompt(tokenizer, rec.question))["input_ids"])
    if len(prompt_ids) >= max_length:
        return None
    cut = len(rec.answer) > bound        # a cut answer gets no EOS: the model must not learn to stop there
    answer_ids = list(tokenizer(rec.answer[:bound], add_special_tokens=False)["input_ids"]) + ([] if cut else [eos_id])
    ids = (prompt_ids + answer_ids)[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + answer_ids)[:max_length]
    return {"input_ids": ids, "labels": labels}


def tokenize_task(task: TaskData, tokenizer, eos_id: int, max_length: int) -> tuple[list[dict], int]:
    """Token ids and labels per record: ``prompt + answer + EOS`` with prompt labels set to -100.

    The prompt is tokenised alone, as the inference side tokenises it, so the answer tokens the model learns are
    the ones it must generate after exactly those prompt tokens. Records longer than ``max_length`` are cut at
    the end; records left with no answer token are dropped (text beyond ``max_length * CHARS_PER_TOKEN``
    characters is never tokenised). Returns ``(features, dropped)``.
    """
    feats: list[dict] = []
    for rec in task.records:
        f = _record_features(rec, tokenizer, eos_id, max_length)
        if f is not None:
            feats.append(f)
    return feats, len(task.records) - len(feats)


def collate(features: Sequence[dict], pad_id: int) -> dict:
    """Right-pad a batch: ``input_ids`` with ``pad_id``, ``labels`` with -100, ``attention_mask`` 0 on padding.

    Padding is marked by the mask, never by the pad id: many models use EOS as pad, and the answer's EOS
    must keep its label.
    """
    import torch

    width = max(len(f["input_ids"]) for f in features)
    ids = torch.full((len(features), width), pad_id, dtype=torch.long)
    labels = torch.full((len(features), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(features), width), dtype=torch.long)
    for i, f in enumerate(features):
        n = len(f["input_ids"])
        ids[i, :n] = torch.tensor(f["input_ids"], dtype=torch.long)
        labels[i, :n] = torch.tensor(f["labels"], dtype=torch.long)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


# Target modules

def _linear_kinds() -> tuple:
    import torch

    kinds: tuple = (torch.nn.Linear,)
    try:  # GPT-2 style models use Conv1D for their projections
        from transformers.pytorch_utils import Conv1D
        kinds = kinds + (Conv1D,)
    except ImportError:  # pragma: no cover
        pass
    return kinds


def linear_module_names(model) -> list[str]:
    """Short names (last dotted component) of the model's linear layers that a LoRA can target, in model order.

    The output head is left out (PEFT's ``all-linear`` leaves it out too).
    """
    kinds = _linear_kinds()
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names: list[str] = []
    for name, mod in model.named_modules():
        if isinstance(mod, kinds) and mod is not out_emb:
            short = name.rsplit(".", 1)[-1]
            if short not in names:
                names.append(short)
    return names


def check_target_modules(model, targets: list[str] | str, where: str = "model") -> None:
    """Raise a one-line DLPError naming the available linear modules when a requested target does not exist
    (PEFT's rule: a target matches a module whose full name equals it or ends with ``.<target>``)."""
    if targets == "all-linear":
        return
    kinds = _linear_kinds()
    mods = list(model.named_modules())
    available = ", ".join(linear_module_names(model))
    for t in targets:
        hits = [m for n, m in mods if n == t or n.endswith("." + t)]
        if not hits:
            raise DLPError(f"{where}: target module {t!r} not found in the model "
                           f"(available linear modules: {available}; or all-linear)")
        if not any(isinstance(m, kinds) for m in hits):
            raise DLPError(f"{where}: target module {t!r} is not a linear layer "
                           f"(available linear modules: {available}; or all-linear)")


# The training recipe: named steps shared by every entry point

@dataclasses.dataclass
class _Source:
    """What one adapter is trained on, and how its provenance is recorded in ``dlp_task.json``."""

    task: TaskData                          # the records (one task, or the multitask union)
    where: str                              # file or folder named in messages and in dlp_task.json "data_file"
    sha256: str                             # hash of the data (a resumed run must see the same data)
    inputs: list[Path]                      # paths the output must never replace
    meta: dict = dataclasses.field(default_factory=dict)  # extra dlp_task.json fields (multitask: its tasks)


def _check_config(config: LoRATrainConfig | None) -> LoRATrainConfig:
    config = config if config is not None else LoRATrainConfig()
    if not isinstance(config, LoRATrainConfig):
        raise DLPError(f"config: expected LoRATrainConfig, got {type(config).__name__}")
    return config


def _check_adapter_output(out: Path, inputs: Sequence[Path], overwrite: bool, resume: bool) -> bool:
    """Cheap output checks before any model is loaded; True when ``out`` is already finished and kept (resume)."""
    if out.exists() and not out.is_dir():
        raise DLPError(f"{out}: output exists and is a file")
    check_output(out, overwrite=True, inputs=inputs)     # the root, an input, a path below a file: never
    if resume and is_finished_adapter(out):
        return True
    if out.exists() and not overwrite:
        what = "already holds an adapter" if (out / ADAPTER_CONFIG).exists() else "already exists"
        raise DLPError(f"{out}: {what} (pass --overwrite to replace it)")
    return False


def _use_bf16(precision: str) -> bool:
    import torch

    if precision == "bf16":
        return True
    if precision == "fp32":
        return False
    return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())


def _load_base(model_spec, config: LoRATrainConfig):
    """The frozen base model and tokenizer on the CPU (Trainer moves it to this process's device). In bf16 mode
    the frozen weights are held in bf16 (half the memory) while PEFT keeps the LoRA weights in fp32 and Trainer
    autocasts (standard mixed precision)."""
    from .models import load_model

    model, tokenizer = load_model(model_spec, device="cpu", dtype="bf16" if _use_bf16(config.precision) else "fp32")
    check_target_modules(model, config.target_list(), where=f"{model_spec}")
    return model, tokenizer


def _features(source: _Source, model, tokenizer, config: LoRATrainConfig, progress: bool) -> list[dict]:
    feats, dropped = tokenize_task(source.task, tokenizer, answer_eos_id(model, tokenizer), config.max_length)
    if not feats:
        raise DLPError(f"{source.where}: no record keeps an answer token within max_length={config.max_length}")
    if dropped and progress and is_main_process():
        print(f"{source.where}: {dropped} record(s) dropped (prompt longer than max_length={config.max_length})")
    return feats


def _add_lora(model, model_spec, config: LoRATrainConfig):
    from peft import LoraConfig, get_peft_model
    from transformers import set_seed

    set_seed(config.seed)  # LoRA A init and dropout are drawn from here
    lora_cfg = LoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout,
                          target_modules=config.target_list(), use_rslora=config.use_rslora, bias="none",
                          task_type="CAUSAL_LM")
    try:
        model = get_peft_model(model, lora_cfg)
    except ValueError as e:  # PEFT's own target check (e.g. a name matching a non-linear module)
        raise DLPError(f"{model_spec}: cannot add LoRA: {str(e).splitlines()[0]}") from None
    model.train()
    return model


def _training_arguments(config: LoRATrainConfig, work: Path, progress: bool):
    import torch
    from transformers import TrainingArguments

    # Launched as several processes (torchrun / accelerate launch) on a machine without CUDA: accelerate only
    # builds a CPU process group (gloo) when told "cpu", otherwise each process would silently train alone.
    multi_cpu = int(os.environ.get("WORLD_SIZE", "1") or 1) > 1 and not torch.cuda.is_available()
    return TrainingArguments(
        output_dir=str(work),             # every file Trainer writes stays in the work folder
        use_cpu=multi_cpu,
        per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum,
        num_train_epochs=config.epochs,
        max_steps=config.max_steps,
        learning_rate=config.learning_rate,
        weight_decay=config.weight_decay,
        warmup_steps=config.warmup_ratio,  # < 1: a fraction of the schedule (transformers 5)
        lr_scheduler_type="linear",
        logging_strategy="steps", logging_steps=config.logging_steps, logging_first_step=True,
        save_strategy="steps", save_steps=config.save_steps, save_total_limit=2,
        bf16=_use_bf16(config.precision),
        seed=config.seed, data_seed=config.seed,
        # Random batches of mixed lengths pad every record to the longest (records run from ~40 to ~430 tokens
        # in the 21-task run); grouping by length keeps the order random per mega-batch and pads far less.
        train_sampling_strategy="group_by_length" if config.group_by_length else "random",
        report_to="none", push_to_hub=False,
        disable_tqdm=not progress,
        remove_unused_columns=False,       # our features are already model inputs
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
        ddp_find_unused_parameters=False,  # frozen base: only LoRA weights take gradients
    )


def _resume_info(source: _Source, config: LoRATrainConfig, identity: dict) -> dict:
    # What a resumed run must share with the interrupted one (how often to save/log may change).
    cfg = {k: v for k, v in config_to_dict(config).items() if k not in ("save_steps", "logging_steps")}
    return {"task": source.task.name, "data_sha256": source.sha256, "config": cfg,
            "base_fingerprint": identity.get("fingerprint")}


def _last_checkpoint(work: Path) -> Path | None:
    best: tuple[int, Path] | None = None
    if work.is_dir():
        for p in work.iterdir():
            if p.is_dir() and p.name.startswith("checkpoint-") and p.name[11:].isdigit() \
                    and (p / "trainer_state.json").is_file():
                step = int(p.name[11:])
                if best is None or step > best[0]:
                    best = (step, p)
    return best[1] if best else None


def _start_or_resume(work: Path, info: dict, resume: bool, state, progress: bool) -> Path | None:
    """The checkpoint to resume from (None: start over in a fresh work folder holding ``info``)."""
    checkpoint = _last_checkpoint(work) if resume else None
    if checkpoint is not None:
        try:
            saved = json.loads((work / RESUME_INFO).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            saved = None
        if saved != info:
            raise DLPError(f"{work}: the interrupted run used other data, options or base model "
                           f"(rerun without --resume to start over)")
        if progress and state.is_main_process:
            print(f"resuming from {checkpoint}")
        return checkpoint
    if state.is_main_process:
        shutil.rmtree(work, ignore_errors=True)  # a stale partial run from other options/data
        work.mkdir(parents=True, exist_ok=True)
        atomic_write_json(work / RESUME_INFO, info)
    state.wait_for_everyone()
    return None


def _loss_curve(log_history: list[dict]) -> list[list[float]]:
    """``[[step, loss], ...]`` as logged by Trainer (every ``logging_steps``): shows whether training flattened."""
    return [[int(h.get("step", 0)), round(float(h["loss"]), 5)] for h in log_history if "loss" in h]


def _adapter_meta(source: _Source, feats: list, trainer, config, identity: dict, seconds: float,
                  checkpoint: Path | None) -> dict:
    curve = _loss_curve(trainer.state.log_history)
    return {
        "task": source.task.name,
        "data_file": source.where,
        "data_sha256": source.sha256,
        "records": len(source.task.records),
        "records_used": len(feats),
        "metric": source.task.metric,
        "choices": source.task.choices,
        "rank": config.rank,
        "steps": int(trainer.state.global_step),
        "epochs": float(trainer.state.epoch or 0.0),
        "world_size": int(trainer.args.world_size),
        "loss_start": curve[0][1] if curve else None,
        "loss_end": curve[-1][1] if curve else None,
        "loss_curve": curve,
        "base_model": identity,
        "train_seconds": round(seconds, 3),
        "resumed_from_step": int(checkpoint.name[11:]) if checkpoint else 0,
        **source.meta,
    }


def _save_adapter(trainer, state, out: Path, work: Path, meta: dict, config: LoRATrainConfig) -> None:
    """Every process takes part in the save (FSDP/DeepSpeed gather the weights); only the main one writes the
    PEFT files (not Trainer's pickled training_args.bin) + metadata into a temp folder renamed into place."""
    final_stage = work / "final"
    trainer.save_model(str(final_stage))
    state.wait_for_everyone()
    if trainer.is_world_process_zero():
        with atomic_dir(out, overwrite=True) as tmp:
            for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
                if not (final_stage / name).is_file():
                    raise DLPError(f"{final_stage}: Trainer did not write {name}")
                shutil.copy2(final_stage / name, tmp / name)
            atomic_write_json(tmp / TASK_META, {**meta, "adapter_bytes": (tmp / ADAPTER_WEIGHTS).stat().st_size})
            save_config(config, tmp / TRAIN_CONFIG)
        shutil.rmtree(work, ignore_errors=True)
    state.wait_for_everyone()


def _train(model_spec, source: _Source, out_dir, config: LoRATrainConfig, overwrite: bool, resume: bool,
           progress: bool, callbacks: list | None) -> Path:
    """The recipe: check output -> load base -> tokenise -> add LoRA -> Trainer (fresh or resumed) -> save."""
    out = Path(out_dir).absolute()
    if _check_adapter_output(out, source.inputs, overwrite, resume):
        if progress and is_main_process():
            print(f"{out}: already trained (resume): kept")
        return out
    from accelerate import PartialState
    from transformers import Trainer
    from transformers.trainer_callback import PrinterCallback

    from .models import model_identity

    model, tokenizer = _load_base(model_spec, config)
    identity = model_identity(model)
    feats = _features(source, model, tokenizer, config, progress)
    model = _add_lora(model, model_spec, config)
    work = work_dir_for(out)
    args = _training_arguments(config, work, progress)
    _ = args.device  # sets up the (possibly distributed) process state before we coordinate on files
    state = PartialState()
    checkpoint = _start_or_resume(work, _resume_info(source, config, identity), resume, state, progress)
    trainer = Trainer(model=model, args=args, train_dataset=feats,
                      data_collator=functools.partial(collate, pad_id=int(tokenizer.pad_token_id)),
                      callbacks=list(callbacks or []))
    if not progress:
        trainer.remove_callback(PrinterCallback)  # quiet means quiet: no per-log dict prints
    t0 = time.time()
    trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    meta = _adapter_meta(source, feats, trainer, config, identity, time.time() - t0, checkpoint)
    _save_adapter(trainer, state, out, work, meta, config)
    model.eval()
    return out


# Entry points

def train_adapter(model_spec: str | os.PathLike, data_path: str | os.PathLike, out_dir: str | os.PathLike,
                  task: str | None = None, config: LoRATrainConfig | None = None, overwrite: bool = False,
                  resume: bool = False, progress: bool = True, metric: str | None = None,
                  callbacks: list | None = None) -> Path:
    """Train one LoRA on a task file and write it to ``out_dir`` (PEFT format + ``dlp_task.json`` +
    ``train_config.json``); return ``out_dir``.

    ``overwrite`` replaces a finished adapter; ``resume`` continues from the last checkpoint of an interrupted
    run (and returns at once when ``out_dir`` is already finished). ``callbacks`` are extra
    ``transformers.TrainerCallback`` objects (tests and users use them to watch or stop training).
    Runs unchanged under ``accelerate launch`` / ``torchrun``: every process trains, only the main one writes.
    """
    config = _check_config(config)
    data_path = Path(data_path).absolute()
    task_data = read_task(data_path, task=task, metric=metric)   # cheap checks first: no model loaded yet
    source = _Source(task_data, str(data_path), file_sha256(data_path), [data_path])
    return _train(model_spec, source, out_dir, config, overwrite, resume, progress, callbacks)


def multitask_data(tasks: Sequence[TaskData], seed: int = 0) -> TaskData:
    """The union of the tasks' records as one task named ``multitask``, shuffled with ``seed``: each record is
    formatted exactly as in its own task's training (its question, its answer), so the only difference from
    the task LoRAs is that one adapter sees them all."""
    recs = [dataclasses.replace(r, task=t.name, choices=r.choices or t.choices) for t in tasks for r in t.records]
    random.Random(seed).shuffle(recs)
    return TaskData(name=MULTITASK, records=recs, metric="exact")


def _folder_sha(files: Sequence[Path]) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.name}\0{file_sha256(f)}\n".encode())
    return h.hexdigest()


def train_multitask(model_spec: str | os.PathLike, data_dir: str | os.PathLike, out_dir: str | os.PathLike,
                    config: LoRATrainConfig | None = None, overwrite: bool = False, resume: bool = False,
                    progress: bool = True, callbacks: list | None = None) -> Path:
    """Train ONE LoRA on the union of every task file of ``data_dir`` (the paper's "one LoRA on all tasks"
    comparison) into ``out_dir`` (``RUN/multitask/`` by convention; not listed in ``adapters.txt``).

    Its ``dlp_task.json`` says task ``multitask``, the tasks and record counts it saw, and its rank; the loss
    curve shows whether its step budget was enough. Same output, overwrite and resume rules as
    :func:`train_adapter`.
    """
    config = _check_config(config)
    data_dir = Path(data_dir).absolute()
    tasks = read_task_dir(data_dir)
    files = [Path(f).absolute() for f in task_files(data_dir)]
    union = multitask_data(tasks, config.seed)
    extra = {"tasks": [t.name for t in tasks], "records_per_task": {t.name: len(t.records) for t in tasks},
             "metric": None}
    source = _Source(union, str(data_dir), _folder_sha(files), [data_dir, *files], extra)
    return _train(model_spec, source, out_dir, config, overwrite, resume, progress, callbacks)


def _check_run_output(run: Path, data_dir: Path, outs: list[Path], overwrite: bool, resume: bool) -> None:
    """Refuse, before training, a run folder that would lose data: the root or an input folder, one whose
    ``adapters.txt`` lists other adapters (its router would no longer match), or finished adapters without
    ``--overwrite``/``--resume``."""
    # the run folder itself is never replaced (its data/ may even sit inside it); what is written is each
    # adapter folder and adapters.txt, so those are what must not be an input
    check_output_path(run)                               # the root, a name too long, a path below a file
    if run.resolve() == Path(data_dir).resolve():
        raise DLPError(f"{run}: would overwrite an input of this command ({data_dir}); write the output elsewhere")
    check_output(run / ADAPTER_LIST, overwrite=True, inputs=[data_dir])
    for o in outs:
        check_output(o, overwrite=True, inputs=[data_dir])
    listing = run / ADAPTER_LIST
    if listing.is_file() and not overwrite:
        try:
            same = [p.resolve() for p in read_adapter_list(adapter_list_path(run))] == [o.resolve() for o in outs]
        except DLPError:
            same = False
        if not same:
            raise DLPError(f"{listing}: the run lists other adapters than the tasks of {data_dir} "
                           f"(pass --overwrite to replace them, or choose a new --out)")
    if not overwrite and not resume:
        for o in outs:
            if o.exists():
                raise DLPError(f"{o}: already exists (pass --overwrite to replace it, or --resume to continue)")


def train_adapters(model_spec: str | os.PathLike, data_dir: str | os.PathLike, run_dir: str | os.PathLike,
                   config: LoRATrainConfig | None = None, overwrite: bool = False, resume: bool = False,
                   progress: bool = True, callbacks: list | None = None) -> Path:
    """Train one adapter per task file of ``data_dir`` (sorted by file name) into ``run_dir/adapters/<task>/``
    and write ``run_dir/adapters.txt`` in the same order; return ``run_dir``.

    ``adapters.txt`` is written only when every adapter is finished: a run that fails on one task keeps the
    finished adapters and its old ``adapters.txt`` (if any) and says how to continue (``--resume`` skips
    finished adapters and continues an interrupted one from its last checkpoint).
    """
    config = _check_config(config)
    run = Path(run_dir).absolute()
    data_dir = Path(data_dir).absolute()
    tasks = read_task_dir(data_dir)           # validates every file and unique names before any training
    files = task_files(data_dir)
    outs = [run / "adapters" / t.name for t in tasks]
    _check_run_output(run, data_dir, outs, overwrite, resume)
    for i, (f, t, o) in enumerate(zip(files, tasks, outs), 1):
        if progress and is_main_process():
            print(f"[{i}/{len(tasks)}] task {t.name}: {f}")
        try:
            train_adapter(model_spec, f, o, task=t.name, config=config, overwrite=overwrite, resume=resume,
                          progress=progress, callbacks=callbacks)
        except DLPError as e:
            raise DLPError(f"{e} [run {run}: {i - 1} of {len(tasks)} adapters finished; "
                           f"fix this and rerun with --resume to continue]") from None
    if is_main_process():
        write_adapter_list(run / ADAPTER_LIST, outs)
    return run
