"""What every stage shares: the error type and its one-line formatter, value ranges, the one reader of user
files, output checks and atomic writes, and the dataclass configs.

Every config has a default and a one-line doc per field, is validated in ``__post_init__`` and is saved as
JSON next to the artifact it produced (``save_config``), so a stage can be inspected or re-run alone. Every
user file is read through :func:`read_text_file` / :func:`read_json_file` (regular files only, a size limit,
named JSON errors), and every output goes through :func:`check_output` (nothing existing is replaced without
``--overwrite``, an input never) and the atomic writers (complete or absent).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import re
import shutil
import stat
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator


class DLPError(Exception):
    """A user-facing error: the CLI prints ``error: <message>`` as one line and exits 1, no traceback."""


def check(cond: bool, msg: str) -> None:
    """Raise :class:`DLPError` with ``msg`` unless ``cond`` holds."""
    if not cond:
        raise DLPError(msg)


def format_error(e: BaseException) -> str:
    """The one line a user sees for ``e``, wherever it surfaces (CLI ``error: ...``, web page, server log).

    A :class:`DLPError` is its own first line; an OS error on a named file (too long a name, no permission,
    a full disk) names the file and the reason; anything else is an internal error named by its class.
    """
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    if isinstance(e, DLPError):
        return first or "failed"
    if isinstance(e, OSError) and e.filename is not None:
        return f"{e.filename}: {_os_reason(e)}"
    if isinstance(e, RecursionError):
        return f"input nested too deeply to process ({first})"
    if isinstance(e, MemoryError):
        return "out of memory"
    return f"internal error: {e.__class__.__name__}: {first} (set DLP_LORA_DEBUG=1 for details)"


# Value ranges shared by the CLI, the library and the server (one place each).
SEED_MAX = 2**32 - 1            # numpy (Trainer's set_seed) refuses larger seeds; torch and random take these too
MAX_NEW_TOKENS = 100_000        # generated tokens per prompt at most (far beyond any context we load)
INT_MAX = 2**63 - 1             # any other integer option: what torch/numpy index types hold


def check_int(name: str, value: Any, lo: int, hi: int) -> int:
    """``value`` as an int in ``[lo, hi]``, else a one-line :class:`DLPError` naming ``name`` and the range."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise DLPError(f"{name}: must be a whole number, got {_short(value)}")
    if not lo <= value <= hi:
        raise DLPError(f"{name}: must be in [{lo}, {hi}], got {_short(value)}")
    return value


def _short(value: Any) -> str:
    """repr of a user value, cut so a 5000-digit number still gives one short line."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**40:  # str() fails past 4300 digits
        return f"a number of about {int(value.bit_length() * 0.30103) + 1} digits"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# Atomic writes: an artifact is either complete or absent (never half written).

def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a temp file in the same folder + rename."""
    path = Path(path)
    check_output_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    except OSError as e:
        raise DLPError(f"{path}: cannot write ({_os_reason(e)})") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError):  # full disk, read-only file system, ...: one line, nothing half written
            raise DLPError(f"{path}: cannot write ({_os_reason(e)})") from None
        raise


# errno values that mean "the output location cannot take this artifact" (not a problem of the inputs)
_OUTPUT_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EFBIG}


def _os_reason(e: OSError) -> str:
    return e.strerror or e.__class__.__name__


def check_output_path(path: str | os.PathLike) -> None:
    """Refuse, in one line, an output path that cannot be written: the file-system root, a name longer than
    the file system allows, or a path below an existing file (e.g. ``out.json/x``)."""
    path = Path(path).absolute()
    if path == Path(path.anchor):
        raise DLPError(f"{path}: is the file-system root; choose a folder below it")
    try:
        path.exists()  # stat() names a too-long file name before anything else is tried
        for parent in path.parents:
            if parent.exists():
                if not parent.is_dir():
                    raise DLPError(f"{path}: cannot create it: {parent} is a file, not a folder")
                return
    except OSError as e:  # ENAMETOOLONG and friends: stat() itself fails
        raise DLPError(f"{path}: cannot write ({_os_reason(e)})") from None


def check_output(path: str | os.PathLike, overwrite: bool = False, inputs: Any = ()) -> Path:
    """Refuse an output that would lose data, before anything is written: one that exists unless
    ``overwrite`` (the user's ``--overwrite``), and one that is, or holds, one of ``inputs`` (never, even
    with ``overwrite``); plus :func:`check_output_path`'s rules. Returns ``path``."""
    path = Path(path)
    check_output_path(path)
    target = path.resolve()
    for src in inputs:
        src = Path(src).resolve()
        if src == target or target in src.parents:
            raise DLPError(f"{path}: would overwrite an input of this command ({src}); write the output elsewhere")
    try:
        exists = path.exists() or path.is_symlink()
    except OSError as e:
        raise DLPError(f"{path}: cannot write ({_os_reason(e)})") from None
    if exists and not overwrite:
        raise DLPError(f"{path}: already exists (pass --overwrite to replace it)")
    return path


def _check_replaceable(folder: Path) -> None:
    """A folder replaced whole must not be a top-level system folder, the home folder or one holding the
    working directory: ``--overwrite`` replaces an artifact, never the user's environment."""
    target = folder.resolve()
    protected = {Path.home().resolve()}
    with contextlib.suppress(OSError):  # a deleted working directory protects nothing
        cwd = Path.cwd().resolve()
        protected |= {cwd, *cwd.parents}
    if target.parent == Path(target.anchor) or target in protected:
        raise DLPError(f"{folder}: refusing to replace this folder (a top-level, home or working folder); "
                       f"choose a new folder for the output")


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces ``final`` in one rename.

    An interrupted stage (exception, Ctrl-C) leaves only a hidden ``.<name>.tmp-*`` folder that is removed
    here, so ``final`` either holds a complete artifact or does not exist.
    """
    final = Path(final)
    check_output(final, overwrite=overwrite)
    if final.exists():
        _check_replaceable(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    except OSError as e:
        raise DLPError(f"{final}: cannot create the output folder ({_os_reason(e)})") from None
    try:
        yield tmp
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and e.errno in _OUTPUT_ERRNOS:  # full disk / read-only: one line, no artifact
            raise DLPError(f"{final}: cannot write ({_os_reason(e)})") from None
        raise


# Input files: the one reader every stage uses, so each rule below holds everywhere at once.

MAX_FILE_BYTES = 256 * 1024 * 1024      # largest user file read (task data, router data, configs); env overrides
MAX_FILE_BYTES_ENV = "DLP_LORA_MAX_FILE_BYTES"


def max_file_bytes() -> int:
    """The size limit for input files: ``$DLP_LORA_MAX_FILE_BYTES`` when set, else :data:`MAX_FILE_BYTES`."""
    raw = os.environ.get(MAX_FILE_BYTES_ENV, "").strip()
    if not raw:
        return MAX_FILE_BYTES
    if not raw.isdigit() or int(raw) < 1:
        raise DLPError(f"{MAX_FILE_BYTES_ENV}: must be a whole number of bytes >= 1, got {raw[:40]!r}")
    return int(raw)


def read_bytes_file(path: str | os.PathLike) -> bytes:
    """Bytes of a user file. Only regular files are read (a FIFO would block forever, ``/dev/zero`` never ends)
    and only up to :func:`max_file_bytes`; every refusal is a one-line :class:`DLPError` naming the file."""
    path = Path(path)
    try:  # O_NONBLOCK: opening a FIFO without a writer returns at once instead of hanging
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise DLPError(f"{path}: file not found") from None
    except OSError as e:
        raise DLPError(f"{path}: cannot read ({_os_reason(e)})") from None
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise DLPError(f"{path}: is a folder, expected a file")
        if not stat.S_ISREG(st.st_mode):
            raise DLPError(f"{path}: not a regular file ({_file_kind(st.st_mode)}); only regular files are read")
        limit = max_file_bytes()
        if st.st_size > limit:
            raise DLPError(f"{path}: file is {st.st_size} bytes, over the {limit}-byte limit for input files "
                           f"(set {MAX_FILE_BYTES_ENV} to raise it)")
        data = _read_fd(fd, limit + 1, path)  # + 1: a file that grows while read is still caught
    finally:
        os.close(fd)
    if len(data) > limit:
        raise DLPError(f"{path}: file is over the {limit}-byte limit for input files (set {MAX_FILE_BYTES_ENV} to raise it)")
    return data


def _read_fd(fd: int, most: int, path: Path) -> bytes:
    chunks, left = [], most
    try:
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
    except OSError as e:
        raise DLPError(f"{path}: cannot read ({_os_reason(e)})") from None
    return b"".join(chunks)


def _file_kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def read_text_file(path: str | os.PathLike) -> str:
    """UTF-8 text of a user file (a leading BOM dropped), with :func:`read_bytes_file`'s rules; not UTF-8 is a
    one-line :class:`DLPError` naming the file and the byte offset."""
    raw = read_bytes_file(path)
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DLPError(f"{path}: cannot read: not UTF-8 text (bad byte at offset {e.start})") from None


def parse_json(text: str, where: str, object_pairs_hook=None) -> Any:
    """Parse JSON text from ``where`` (a file, a line of one). Every way it can fail is a named one-line
    :class:`DLPError`: bad syntax, nesting too deep for the parser, integers with more digits than Python
    converts, and strings holding an unpaired surrogate (``"\\ud800"``), which no later stage can encode."""
    try:
        value = json.loads(text, object_pairs_hook=object_pairs_hook)
    except json.JSONDecodeError as e:
        raise DLPError(f"{where}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    except RecursionError:
        raise DLPError(f"{where}: not readable JSON (nested too deeply for the parser)") from None
    except ValueError as e:  # int(...) refuses more than sys.get_int_max_str_digits() digits
        if "digits" not in str(e):
            raise
        raise DLPError(f"{where}: not readable JSON (an integer with more than {sys.get_int_max_str_digits()} "
                       f"digits)") from None
    if _SURROGATE_ESCAPE.search(text):  # only then can a decoded string hold a lone surrogate
        bad = _lone_surrogate_at(value, top=True)
        if bad is not None:
            raise DLPError(f"{where}: {bad or 'value'}: unpaired surrogate (a \\ud800-\\udfff escape without its pair), not valid Unicode text")
    return value


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def _lone_surrogate_at(value: Any, top: bool = False) -> str | None:
    """Where in ``value`` a string (or key) holds an unpaired surrogate ("record 3: field 'Q'"), or None."""
    if isinstance(value, str):
        return None if _encodable(value) else ""
    if isinstance(value, dict):
        for k, v in value.items():
            if not _encodable(k):
                return f"field {k.encode('utf-8', 'backslashreplace').decode()!r}"
            inner = _lone_surrogate_at(v)
            if inner is not None:
                return f"field {k!r}" + (f": {inner}" if inner else "")
    if isinstance(value, list):
        for i, v in enumerate(value):
            inner = _lone_surrogate_at(v)
            if inner is not None:
                return f"{'record' if top else 'item'} {i}" + (f": {inner}" if inner else "")
    return None


def _encodable(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def read_json_file(path: str | os.PathLike) -> Any:
    """Parsed JSON of a user file, with :func:`read_text_file`'s and :func:`parse_json`'s one-line errors."""
    return parse_json(read_text_file(path), str(path))


# Config helpers

def config_to_dict(cfg: Any) -> dict:
    """A dataclass config as a plain JSON-able dict."""
    return dataclasses.asdict(cfg)


def config_from_dict(cls: type, data: dict, source: str = "config") -> Any:
    """Build ``cls`` from ``data``, rejecting unknown keys with a one-line error naming ``source``."""
    if not isinstance(data, dict):
        raise DLPError(f"{source}: expected a JSON object, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise DLPError(f"{source}: unknown field {unknown[0]!r} for {cls.__name__}")
    try:
        return cls(**data)
    except DLPError as e:
        raise DLPError(f"{source}: {e}") from None
    except TypeError as e:
        raise DLPError(f"{source}: {e}") from None


def save_config(cfg: Any, path: str | os.PathLike) -> None:
    """Save a dataclass config as JSON next to an artifact (atomically)."""
    atomic_write_json(path, config_to_dict(cfg))


def load_config(cls: type, path: str | os.PathLike) -> Any:
    """Load and validate a config saved by :func:`save_config`."""
    return config_from_dict(cls, read_json_file(path), str(path))


def _positive(name: str, value: float) -> None:
    check(isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < float("inf"),
          f"{name} must be a finite number > 0, got {value!r}")


# Stage configs

@dataclasses.dataclass
class LoRATrainConfig:
    """How one task LoRA is trained (``dlp-lora train-lora``); saved as ``train_config.json``."""

    rank: int = 8                           # LoRA rank r (paper: 8)
    alpha: float = 16.0                     # LoRA alpha; scale s = alpha / r
    dropout: float = 0.05                   # dropout on the LoRA input during training
    target_modules: str = "q_proj,v_proj"   # comma list of module names, or "all-linear" (paper: q_proj,v_proj)
    use_rslora: bool = False                # rank-stabilised scale alpha / sqrt(r) instead of alpha / r
    learning_rate: float = 2e-4             # AdamW learning rate
    epochs: float = 1.0                     # passes over the data (ignored when max_steps > 0)
    max_steps: int = -1                     # stop after this many optimiser steps (-1: use epochs)
    batch_size: int = 8                     # per-device batch size
    grad_accum: int = 1                     # gradient accumulation steps
    max_length: int = 256                   # truncate prompt+answer to this many tokens
    warmup_ratio: float = 0.03              # linear warm-up fraction of the schedule
    weight_decay: float = 0.0               # AdamW weight decay
    save_steps: int = 50                    # checkpoint every N steps (resumable with --resume)
    logging_steps: int = 5                  # log the loss every N steps
    seed: int = 0                           # seed for shuffling and LoRA init
    group_by_length: bool = True            # batch records of similar length (HF LengthGroupedSampler): less padding
    precision: str = "auto"                 # "auto" (bf16 on a bf16-capable GPU, else fp32), "bf16", "fp32"

    def __post_init__(self) -> None:
        check(isinstance(self.rank, int) and self.rank > 0, f"rank must be a positive integer, got {self.rank!r}")
        _positive("alpha", self.alpha)
        check(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout!r}")
        check(isinstance(self.target_modules, str) and self.target_modules.strip() != "",
              "target_modules must be a non-empty comma list or 'all-linear'")
        _positive("learning_rate", self.learning_rate)
        check(self.max_steps == -1 or self.max_steps > 0, f"max_steps must be -1 or > 0, got {self.max_steps!r}")
        check(self.max_steps > 0 or self.epochs > 0, "epochs must be > 0 when max_steps is -1")
        check(isinstance(self.batch_size, int) and self.batch_size > 0, f"batch_size must be > 0, got {self.batch_size!r}")
        check(isinstance(self.grad_accum, int) and self.grad_accum > 0, f"grad_accum must be > 0, got {self.grad_accum!r}")
        check(isinstance(self.max_length, int) and self.max_length >= 8, f"max_length must be >= 8, got {self.max_length!r}")
        check(0.0 <= self.warmup_ratio < 1.0, f"warmup_ratio must be in [0, 1), got {self.warmup_ratio!r}")
        check(self.save_steps > 0 and self.logging_steps > 0, "save_steps and logging_steps must be > 0")
        check(self.precision in ("auto", "bf16", "fp32"), f"precision must be auto|bf16|fp32, got {self.precision!r}")
        check_int("seed", self.seed, 0, SEED_MAX)
        check(isinstance(self.group_by_length, bool), f"group_by_length must be true or false, got {self.group_by_length!r}")

    def target_list(self) -> list[str] | str:
        """Target modules as PEFT expects them: a list of names, or the string "all-linear"."""
        if self.target_modules.strip() == "all-linear":
            return "all-linear"
        return [t.strip() for t in self.target_modules.split(",") if t.strip()]


@dataclasses.dataclass
class RouterDataConfig:
    """How router data is made (``dlp-lora make-router-data``); saved as ``router_data/config.json``."""

    per_task: int = 0                       # samples per task (0: size of the smallest task, balanced)
    val_frac: float = 0.1                   # fraction of each task's questions for validation
    test_frac: float = 0.1                  # fraction of each task's questions for test
    granularity: str = "prompt"             # "prompt": one record per question; "sentence": one per sentence
    composite: int = 0                      # extra multi-task composite test samples (paper Fig. 1); 0 = none
    seed: int = 0                           # seed for sampling and splitting

    def __post_init__(self) -> None:
        check(isinstance(self.per_task, int) and self.per_task >= 0, f"per_task must be >= 0, got {self.per_task!r}")
        check(0.0 <= self.val_frac < 1.0 and 0.0 <= self.test_frac < 1.0 and self.val_frac + self.test_frac < 1.0,
              "val_frac and test_frac must be in [0, 1) and sum to < 1")
        check(self.granularity in ("prompt", "sentence"), f"granularity must be prompt|sentence, got {self.granularity!r}")
        check(isinstance(self.composite, int) and self.composite >= 0, f"composite must be >= 0, got {self.composite!r}")
        check_int("seed", self.seed, 0, SEED_MAX)


@dataclasses.dataclass
class RouterConfig:
    """Router architecture and training (``dlp-lora train-router``); saved as ``router/config.json``."""

    kind: str = "mlp"                       # "mlp" (the paper's mini-MLP), "albert" or "distilroberta"
    embed_dim: int = 96                     # mini-MLP: EmbeddingBag width (~5M params with a 49k vocabulary)
    hidden_dim: int = 256                   # mini-MLP: width of the 4-layer MLP
    mlp_dropout: float = 0.1                # mini-MLP: dropout between MLP layers during training
    max_tokens: int = 256                   # truncate router inputs to this many tokens
    pretrained: str = ""                    # albert/distilroberta: local checkpoint folder ("" = from config)
    learning_rate: float = 3e-3             # AdamW learning rate (mini-MLP; transformers use 5e-5 by default)
    epochs: int = 20                        # maximum epochs
    batch_size: int = 64                    # batch size
    patience: int = 3                       # early stopping: epochs without validation improvement
    seed: int = 0                           # seed for init and shuffling
    vocab_size: int = 0                     # filled from the tokenizer at training time (never typed by hand)
    tokenizer: str = ""                     # identity of the tokenizer the router was trained with
    num_labels: int = 0                     # filled from labels.json at training time
    activation: str = "gelu"                # mini-MLP: "gelu" or "relu" between the MLP layers
    hf_hidden_dim: int = 256                # albert/distilroberta from config: hidden width
    hf_layers: int = 0                      # albert/distilroberta from config: layers (0: albert 4, distilroberta 6)
    hf_heads: int = 4                       # albert/distilroberta from config: attention heads
    tokenizer_source: str = "base"          # "base": the LLM's tokenizer; "pretrained": the checkpoint's own
    token_dropout: float = 0.25             # mini-MLP training: drop this fraction of each text's tokens (augmentation)
    embed_init_std: float = 0.02            # mini-MLP: init std of the token embeddings (unseen tokens stay near 0)
    crop_prob: float = 0.0                  # mini-MLP training: chance to train on a random span of a text instead
    pooling: str = "mean"                   # mini-MLP: "mean" (paper: EmbeddingBag mean) or "mean+max" (ours)
    head_tokens: int = 4                    # mini-MLP: also pool the first N tokens on their own (0 = paper's mean only)
    label_smoothing: float = 0.1            # training loss label smoothing (0 = plain cross-entropy)
    temperature: float = 1.0                # probs = softmax(logits / T); T fitted on the validation split

    def __post_init__(self) -> None:
        check(isinstance(self.head_tokens, int) and not isinstance(self.head_tokens, bool)
              and 0 <= self.head_tokens <= 1024, f"head_tokens must be an integer in [0, 1024], got {self.head_tokens!r}")
        check(isinstance(self.label_smoothing, (int, float)) and 0.0 <= self.label_smoothing < 1.0,
              f"label_smoothing must be in [0, 1), got {self.label_smoothing!r}")
        _positive("temperature", self.temperature)
        check(self.activation in ("gelu", "relu"), f"activation must be gelu|relu, got {self.activation!r}")
        check(self.tokenizer_source in ("base", "pretrained"),
              f"tokenizer_source must be base|pretrained, got {self.tokenizer_source!r}")
        for name in ("hf_hidden_dim", "hf_heads"):
            v = getattr(self, name)
            check(isinstance(v, int) and v > 0, f"{name} must be a positive integer, got {v!r}")
        check(isinstance(self.hf_layers, int) and self.hf_layers >= 0, f"hf_layers must be >= 0, got {self.hf_layers!r}")
        check(0.0 <= self.token_dropout < 1.0, f"token_dropout must be in [0, 1), got {self.token_dropout!r}")
        check(self.embed_init_std >= 0, f"embed_init_std must be >= 0, got {self.embed_init_std!r}")
        check(0.0 <= self.crop_prob <= 1.0, f"crop_prob must be in [0, 1], got {self.crop_prob!r}")
        check(self.pooling in ("mean", "mean+max"), f"pooling must be mean|mean+max, got {self.pooling!r}")
        check(self.kind in ("mlp", "albert", "distilroberta"),
              f"unknown router type {self.kind!r} (choose mlp, albert or distilroberta)")
        for name in ("embed_dim", "hidden_dim", "max_tokens", "epochs", "batch_size", "patience"):
            v = getattr(self, name)
            check(isinstance(v, int) and v > 0, f"{name} must be a positive integer, got {v!r}")
        check(0.0 <= self.mlp_dropout < 1.0, f"mlp_dropout must be in [0, 1), got {self.mlp_dropout!r}")
        _positive("learning_rate", self.learning_rate)
        check_int("seed", self.seed, 0, SEED_MAX)
