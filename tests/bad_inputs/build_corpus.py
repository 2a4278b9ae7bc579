"""Build the bad-input corpus: one folder per case under cases/, each with its input files and case.json.

Run ``python tests/bad_inputs/build_corpus.py`` after adding cases; the folders are committed so a reader sees
every case as a file. case.json:

    {"argv": [...], "needles": [...], "code": 1, "kind": "cli" | "http", "outputs": [...]}

argv placeholders: {case} (a private copy of the case folder), {tmp} (an empty folder), {tiny} (tiny model),
{run} (a tiny trained run: adapters.txt, adapters/, router/, router_data/; its task files are in {run}/../data).
``outputs`` must not exist afterwards.

Setup keys (applied to the private copy before the inputs are fingerprinted):
    "copy_run": true        copy the tiny run into {case}/run first (the case's own files under run/ win)
    "delete": [paths]       remove these paths (relative to {case})
    "json_set": [[path, key, value], ...]   set one top-level key of a JSON file (value null removes the key)
    "mkfifo": [paths]       create named pipes (git cannot hold them as files)
    "symlink": [[path, target], ...]        create symbolic links (target as written, e.g. /dev/zero)
    "env": {NAME: value}    environment variables set for the command only

HTTP cases ("kind": "http") send {"method", "path", "body" (JSON value) or "raw" (text), "headers"} to the
server's app (``create_app`` on the tiny run's pipeline, with "server" = ServeConfig overrides) and expect
"status" and an OpenAI-style error body {"error": {"message", "type", ...}} whose message holds every needle.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

HERE = Path(__file__).resolve().parent
CASES = HERE / "cases"

QA_OK = '[{"Q": "1+1?", "A": "2"}, {"Q": "2+2?", "A": "4"}]'


def data_cases():
    """(name, filename, content, needles) for `dlp-lora data check`."""
    c = []
    add = lambda n, f, t, *nd: c.append((n, f, t, list(nd)))
    add("not_json", "t.json", "[{'Q': 1}", "not valid JSON")
    add("truncated", "t.json", '[{"Q": "a", "A": "b"}', "not valid JSON")
    add("trailing_comma", "t.json", '[{"Q": "a", "A": "b"},]', "not valid JSON")
    add("top_string", "t.json", '"text"', "expected a JSON list")
    add("top_number", "t.json", "3", "expected a JSON list")
    add("top_null", "t.json", "null", "expected a JSON list")
    add("top_true", "t.json", "true", "expected a JSON list")
    add("empty_file", "t.json", "", "file is empty")
    add("whitespace_file", "t.json", "  \n\t ", "file is empty")
    add("empty_list", "t.json", "[]", "no records")
    add("empty_jsonl", "t.jsonl", "\n\n", "file is empty")
    add("record_string", "t.json", '["q"]', "record 0", "expected an object")
    add("record_list", "t.json", '[["q", "a"]]', "record 0", "expected an object")
    add("record_null", "t.json", '[null]', "record 0", "expected an object")
    add("record_number", "t.json", '[{"Q": "a", "A": "b"}, 7]', "record 1", "expected an object")
    for key, other in (("Q", "A"), ("A", "Q")):
        add(f"missing_{key}", "t.json", json.dumps([{other: "x"}]), "record 0", f"field '{key}'", "missing")
        add(f"empty_{key}", "t.json", json.dumps([{key: "", other: "x"}]), f"field '{key}'", "is empty")
        add(f"blank_{key}", "t.json", json.dumps([{key: "   ", other: "x"}]), f"field '{key}'", "is empty")
        for tname, val in (("int", 3), ("float", 1.5), ("null", None), ("bool", True), ("list", ["x"]), ("dict", {"x": 1})):
            add(f"{key}_{tname}", "t.json", json.dumps([{key: val, other: "x"}]), f"field '{key}'", "must be a string")
    for key, other in (("input", "output"), ("output", "input")):
        add(f"missing_{key}", "t.json", json.dumps([{other: "x"}]), f"field '{key}'", "missing")
        add(f"empty_{key}", "t.json", json.dumps([{key: "", other: "x"}]), f"field '{key}'", "is empty")
        add(f"{key}_int", "t.json", json.dumps([{key: 5, other: "x"}]), f"field '{key}'", "must be a string")
    add("both_styles", "t.json", '[{"Q": "a", "A": "b", "input": "c", "output": "d"}]', "both key styles")
    add("mixed_styles_QO", "t.json", '[{"Q": "a", "output": "d"}]', "both key styles")
    add("dup_Q", "t.json", '[{"Q": "a", "Q": "b", "A": "c"}]', "field 'Q'", "duplicate key")
    add("dup_A", "t.json", '[{"Q": "a", "A": "b", "A": "c"}]', "field 'A'", "duplicate key")
    add("dup_input", "t.jsonl", '{"input": "a", "input": "b", "output": "c"}\n', "field 'input'", "duplicate key")
    add("late_bad_record", "t.json", json.dumps([{"Q": "a", "A": "b"}] * 5 + [{"Q": "a"}]), "record 5", "field 'A'")
    add("jsonl_bad_line", "t.jsonl", '{"Q": "a", "A": "b"}\n{nope}\n', "line 2")
    add("jsonl_array_line", "t.jsonl", '{"Q": "a", "A": "b"}\n[1, 2]\n', "record 1", "expected an object")
    add("jsonl_missing", "t.jsonl", '{"Q": "a", "A": "b"}\n{"Q": "c"}\n', "record 1", "field 'A'")
    add("object_no_data", "t.json", '{"task": "x"}', "field 'data'")
    add("object_data_not_list", "t.json", '{"data": {"Q": "a"}}', "expected a JSON list")
    add("bad_metric", "t.json", '{"metric": "f1", "data": [{"Q": "a", "A": "b"}]}', "field 'metric'")
    add("bad_choices_str", "t.json", '[{"Q": "a", "A": "b", "choices": "A,B"}]', "field 'choices'")
    add("bad_choices_empty", "t.json", '[{"Q": "a", "A": "b", "choices": []}]', "field 'choices'")
    add("bad_choices_items", "t.json", '[{"Q": "a", "A": "b", "choices": [1, 2]}]', "field 'choices'")
    add("bad_task_space", "t.json", '[{"Q": "a", "A": "b", "task": "has space"}]', "field 'task'")
    add("bad_task_int", "t.json", '[{"Q": "a", "A": "b", "task": 3}]', "field 'task'")
    add("bad_file_task", "t.json", '{"task": "../evil", "data": [{"Q": "a", "A": "b"}]}', "field 'task'")
    add("latin1", "t.json", b'[{"Q": "caf\xe9", "A": "b"}]', "not UTF-8")
    add("binary", "t.json", b"\x00\xff\xfe\x89PNG", "not UTF-8")
    add("utf16", "t.json", '[{"Q": "a", "A": "b"}]'.encode("utf-16"), "not UTF-8")
    return c


LONG_NAME = "n" * 300      # longer than the 255 bytes any common file system allows in one name
DEEP_JSON = "[" * 100_000 + "]" * 100_000
DEEP_20K = "[" * 20_000 + "]" * 20_000     # deep enough for any parser; keeps the other cases' files small
HUGE_INT = "1" + "0" * 5000


def data_file_cases():
    """(name, files, setup, argv-tail, needles) for `dlp-lora data check` on inputs that are hard to read:
    not regular files, over the size limit, JSON too deep or too large for Python, unpaired surrogates."""
    c = []
    add = lambda n, files, setup, tail, *nd: c.append((n, files, setup, tail, list(nd)))
    add("fifo", {}, {"mkfifo": ["t.json"]}, ["{case}/t.json"], "t.json", "not a regular file (a FIFO)")
    add("fifo_in_folder", {"tasks/good.json": QA_OK}, {"mkfifo": ["tasks/pipe.json"]}, ["{case}/tasks"],
        "pipe.json", "not a regular file")
    add("fifo_sidecar_ignored_task_fifo", {}, {"mkfifo": ["t.jsonl"]}, ["{case}/t.jsonl"], "t.jsonl", "a FIFO")
    add("symlink_dev_zero", {}, {"symlink": [["t.json", "/dev/zero"]]}, ["{case}/t.json"], "t.json",
        "not a regular file (a character device)")
    add("symlink_dev_urandom_jsonl", {}, {"symlink": [["t.jsonl", "/dev/urandom"]]}, ["{case}/t.jsonl"], "t.jsonl",
        "a character device")
    add("symlink_loop", {}, {"symlink": [["t.json", "t.json"]]}, ["{case}/t.json"], "t.json", "cannot read")
    add("symlink_dangling", {}, {"symlink": [["t.json", "nowhere.json"]]}, ["{case}/t.json"], "t.json",
        "file not found")
    add("over_size_limit", {"t.json": QA_OK}, {"env": {"DLP_LORA_MAX_FILE_BYTES": "16"}}, ["{case}/t.json"],
        "t.json", "over the 16-byte limit", "DLP_LORA_MAX_FILE_BYTES")
    add("size_limit_env_not_a_number", {"t.json": QA_OK}, {"env": {"DLP_LORA_MAX_FILE_BYTES": "1e9"}},
        ["{case}/t.json"], "DLP_LORA_MAX_FILE_BYTES", "whole number")
    add("name_too_long", {}, {}, ["{case}/" + LONG_NAME + ".json"], "File name too long")
    add("folder_name_too_long", {}, {}, ["{case}/" + LONG_NAME + "/t.json"], "File name too long")
    add("deep_nesting", {"t.json": DEEP_JSON}, {}, ["{case}/t.json"], "t.json", "nested too deeply")
    add("deep_nesting_in_record", {"t.jsonl": '{"Q": "a", "A": ' + DEEP_20K + "}\n"},
        {}, ["{case}/t.jsonl"], "t.jsonl", "line 1", "nested too deeply")
    add("huge_integer", {"t.json": '[{"Q": "a", "A": "b", "id": ' + HUGE_INT + "}]"}, {}, ["{case}/t.json"],
        "t.json", "more than 4300 digits")
    add("huge_integer_jsonl", {"t.jsonl": '{"Q": "a", "A": ' + HUGE_INT + "}\n"}, {}, ["{case}/t.jsonl"],
        "t.jsonl", "line 1", "more than 4300 digits")
    for key in ("Q", "A"):
        rec = '{"Q": "x", "A": "y"}'.replace(f'"{key}": "{"x" if key == "Q" else "y"}"', f'"{key}": "a\\ud800b"')
        add(f"lone_surrogate_{key}", {"t.json": QA_OK[:-1] + ", " + rec + "]"},
            {}, ["{case}/t.json"], "t.json", "record 2", f"field '{key}'", "unpaired surrogate")
    add("lone_low_surrogate_jsonl", {"t.jsonl": '{"Q": "a", "A": "\\udc80"}\n'}, {}, ["{case}/t.jsonl"],
        "t.jsonl", "line 1", "field 'A'", "unpaired surrogate")
    add("lone_surrogate_choices", {"t.json": '[{"Q": "a", "A": "b", "choices": ["b", "\\udbff"]}]'}, {},
        ["{case}/t.json"], "t.json", "record 0", "field 'choices'", "unpaired surrogate")
    add("lone_surrogate_key", {"t.json": '[{"Q": "a", "A": "b", "\\ud800": 1}]'}, {}, ["{case}/t.json"],
        "t.json", "record 0", "unpaired surrogate")
    add("lone_surrogate_task_name", {"t.json": '{"task": "\\ud800", "data": ' + QA_OK + "}"}, {},
        ["{case}/t.json"], "t.json", "field 'task'", "unpaired surrogate")
    add("lone_surrogate_sidecar", {"t.json": QA_OK, "t.meta.json": '{"metric": "exact", "note": "\\ud800"}'}, {},
        ["{case}/t.json"], "t.meta.json", "field 'note'", "unpaired surrogate")
    add("swapped_surrogate_pair", {"t.json": '[{"Q": "\\ude00\\ud83d", "A": "b"}]'}, {}, ["{case}/t.json"],
        "t.json", "record 0", "field 'Q'", "unpaired surrogate")
    return c


def cli_arg_cases():
    """(name, argv, needles, code, files, setup) for argument errors (argparse: exit 2, one line) and the
    `data` / `models` commands' output rules."""
    c = []

    def add(n, argv, *nd, code=2, files=None, setup=None):
        c.append((n, argv, list(nd), code, {"in.json": QA_OK, **(files or {})}, setup or {}))

    for group in (_parser_cases, _number_cases, _data_loss_cases):
        group(add)
    return c


def _parser_cases(add) -> None:
    """What argparse itself refuses, and the simplest `data` / `models` errors."""
    add("no_command", [], "required")
    add("unknown_command", ["frobnicate"], "invalid choice")
    add("data_no_sub", ["data"], "required")
    add("data_check_no_files", ["data", "check"], "required")
    add("data_unknown_sub", ["data", "explode"], "invalid choice")
    add("models_no_sub", ["models"], "required")
    add("models_tiny_no_out", ["models", "tiny"], "--out")
    add("models_tiny_bad_seed", ["models", "tiny", "--out", "{tmp}/m", "--seed", "x"], "invalid int")
    add("builtin_no_out", ["data", "builtin"], "--out")
    add("builtin_bad_n", ["data", "builtin", "--out", "{tmp}/o", "--n", "many"], "invalid int")
    add("convert_no_format", ["data", "convert", "{case}/in.json", "{tmp}/out.json"], "--format")
    add("demo_bad_flag", ["demo", "--fast"], "unrecognized")
    add("data_check_missing_file", ["data", "check", "{tmp}/absent.json"], "absent.json", "file not found", code=1)
    add("data_check_empty_folder", ["data", "check", "{tmp}"], "no task files", code=1)
    add("models_tiny_exists", ["models", "tiny", "--out", "{case}"], "already exists", code=1)


def _number_cases(add) -> None:
    """Numbers: each flag's range, any integer within 64 bits, floats finite (argparse: exit 2)."""
    add("builtin_n_too_large", ["data", "builtin", "--out", "{tmp}/o", "--n", "10000000"], "--n", "[1, 1000000]")
    add("builtin_seed_huge", ["data", "builtin", "--out", "{tmp}/o", "--seed", str(10**23)], "--seed",
        "[0, 4294967295]")
    add("builtin_seed_negative", ["data", "builtin", "--out", "{tmp}/o", "--seed", "-1"], "--seed", "[0, 4294967295]")
    add("builtin_seed_5000_digits", ["data", "builtin", "--out", "{tmp}/o", "--seed", HUGE_INT], "--seed",
        "invalid int")
    add("models_tiny_seed_2_64", ["models", "tiny", "--out", "{tmp}/m", "--seed", str(2**64)], "--seed",
        "[0, 4294967295]")
    add("convert_limit_beyond_int64", ["data", "convert", "--format", "gsm8k", "--limit", str(2**63), "{case}/in.json",
                                       "{tmp}/o.json"], "--limit", "9223372036854775807")


def _data_loss_cases(add) -> None:
    """Data loss: an existing output is replaced only with --overwrite; an input or the root never."""
    add("builtin_out_exists", ["data", "builtin", "--out", "{case}", "--n", "2", "--tasks", "counting,capitals"],
        "capitals.json", "already exists", "--overwrite", code=1, files={"capitals.json": QA_OK})
    add("builtin_sidecar_exists", ["data", "builtin", "--out", "{case}", "--n", "2", "--tasks", "counting"],
        "counting.meta.json", "already exists", code=1,
        files={"counting.meta.json": '{"task": "counting", "metric": "exact"}'})
    add("builtin_out_root", ["data", "builtin", "--out", "/", "--n", "2", "--tasks", "counting"], "file-system root",
        code=1)
    add("builtin_out_is_file", ["data", "builtin", "--out", "{case}/in.json", "--n", "2"], "in.json", "not a folder",
        code=1)
    add("builtin_out_name_too_long", ["data", "builtin", "--out", "{tmp}/" + LONG_NAME, "--n", "2"],
        "File name too long", code=1)
    raw = {"raw.jsonl": RAW_GSM8K}
    add("convert_out_exists", ["data", "convert", "--format", "gsm8k", "{case}/raw.jsonl", "{case}/in.json"],
        "in.json", "already exists", "--overwrite", code=1, files=raw)
    add("convert_out_folder_exists", ["data", "convert", "--format", "gsm8k", "{case}/raw.jsonl", "{case}/"],
        "gsm8k.json", "already exists", code=1, files={**raw, "gsm8k.json": QA_OK})
    add("convert_out_is_input", ["data", "convert", "--format", "gsm8k", "--overwrite", "{case}/raw.jsonl",
                                 "{case}/raw.jsonl"], "raw.jsonl", code=1, files=raw)
    add("convert_out_is_input_json", ["data", "convert", "--format", "gsm8k", "--overwrite", "{case}/raw.json",
                                      "{case}/raw.json"], "would overwrite an input", code=1,
        files={"raw.json": RAW_GSM8K})
    add("convert_sidecar_is_input", ["data", "convert", "--format", "gsm8k", "--overwrite", "{case}/raw.meta.json",
                                     "{case}/raw.json"], "would overwrite an input", code=1,
        files={"raw.meta.json": RAW_GSM8K})
    add("convert_out_root", ["data", "convert", "--format", "gsm8k", "{case}/raw.jsonl", "/"], "file-system root",
        code=1, files=raw)
    add("convert_out_in_root", ["data", "convert", "--format", "gsm8k", "{case}/raw.jsonl", "/gsm8k.json"],
        "file-system root", code=1, files=raw)
    add("convert_out_name_too_long", ["data", "convert", "--format", "gsm8k", "{case}/raw.jsonl",
                                      "{tmp}/" + LONG_NAME + ".json"], "File name too long", code=1, files=raw)
    add("convert_in_fifo", ["data", "convert", "--format", "gsm8k", "{case}/pipe.jsonl", "{tmp}/o.json"],
        "pipe.jsonl", "not a regular file", code=1, setup={"mkfifo": ["pipe.jsonl"]})
    add("convert_in_dev_zero", ["data", "convert", "--format", "bbh", "{case}/zero.json", "{tmp}/o.json"],
        "zero.json", "a character device", code=1, setup={"symlink": [["zero.json", "/dev/zero"]]})
    add("convert_in_deep", ["data", "convert", "--format", "strategyqa", "{case}/deep.json", "{tmp}/o.json"],
        "deep.json", "nested too deeply", code=1, files={"deep.json": DEEP_20K})
    add("models_tiny_out_root", ["models", "tiny", "--out", "/", "--overwrite"], "file-system root", code=1)
    add("models_tiny_out_parent_of_cwd", ["models", "tiny", "--out", "..", "--overwrite"], "refusing to replace",
        code=1)


RAW_GSM8K = '{"question": "What is 2+2?", "answer": "2+2=4\\n#### 4"}\n'


# ----------------------------------------------------------------------------------------------------------------
# Helpers for binary inputs (small safetensors files written here, committed as files)
# ----------------------------------------------------------------------------------------------------------------

LORA_KEY = "base_model.model.model.layers.{layer}.self_attn.{mod}.lora_{ab}.weight"


def _safetensors(tensors: dict) -> bytes:
    import torch
    from safetensors.torch import save

    return save({k: torch.full(tuple(shape), 0.01, dtype=torch.float32) for k, shape in tensors.items()})


def _lora_tensors(r=8, d_in=64, q_out=64, v_out=32, layers=(0, 1), mods=("q_proj", "v_proj")) -> dict:
    t = {}
    for layer in layers:
        for mod in mods:
            out = q_out if mod == "q_proj" else v_out
            t[LORA_KEY.format(layer=layer, mod=mod, ab="A")] = (r, d_in)
            t[LORA_KEY.format(layer=layer, mod=mod, ab="B")] = (out, r)
    return t


GARBAGE = b"\x89\x00\x13not a safetensors file\xff\xfe" * 4
PICKLE = b"\x80\x04\x95\x10\x00\x00\x00\x00\x00\x00\x00\x8c\x02os\x94\x8c\x06system\x94\x93\x94."  # never loaded


def router_data_cases():
    """(name, files, argv-extra, needles, setup) for `dlp-lora train-router --data {case}/rd`."""
    ok_labels = json.dumps(["alpha", "beta"])
    rec = lambda text, label, task: json.dumps({"text": text, "label": label, "task": task})
    ok_train = "\n".join([rec("add two numbers", 0, "alpha"), rec("name a capital", 1, "beta")] * 3) + "\n"
    ok_val = rec("add three numbers", 0, "alpha") + "\n"
    base = {"rd/labels.json": ok_labels, "rd/train.jsonl": ok_train, "rd/val.jsonl": ok_val}
    c = []

    def add(name, changes, needles, extra=(), delete=()):
        files = {**base, **changes}
        for d in delete:
            files.pop(d, None)
        c.append((name, files, list(extra), list(needles)))

    add("labels_missing", {}, ["labels.json", "file not found"], delete=["rd/labels.json"])
    add("labels_not_list", {"rd/labels.json": '{"alpha": 0}'}, ["labels.json", "list of task names"])
    add("labels_not_strings", {"rd/labels.json": "[1, 2]"}, ["labels.json", "list of task names"])
    add("labels_empty", {"rd/labels.json": "[]"}, ["labels.json", "non-empty"])
    add("labels_duplicate", {"rd/labels.json": '["alpha", "alpha"]'}, ["labels.json", "listed twice"])
    add("labels_bad_json", {"rd/labels.json": '["alpha", '}, ["labels.json", "not valid JSON"])
    add("labels_empty_string", {"rd/labels.json": '["alpha", ""]'}, ["labels.json", "list of task names"])
    add("train_missing", {}, ["train.jsonl", "file not found"], delete=["rd/train.jsonl"])
    add("train_empty", {"rd/train.jsonl": ""}, ["train.jsonl", "no records"])
    add("train_blank_lines", {"rd/train.jsonl": "\n\n  \n"}, ["train.jsonl", "no records"])
    add("train_bad_json", {"rd/train.jsonl": ok_train + "{nope\n"}, ["train.jsonl", "line 7", "not valid JSON"])
    add("train_not_utf8", {"rd/train.jsonl": b'{"text": "caf\xe9", "label": 0, "task": "alpha"}\n'},
        ["train.jsonl", "cannot read"])
    add("record_array", {"rd/train.jsonl": "[1, 2]\n"}, ["train.jsonl", "line 1", "expected an object"])
    add("record_string", {"rd/train.jsonl": '"text"\n'}, ["train.jsonl", "line 1", "expected an object"])
    add("text_missing", {"rd/train.jsonl": '{"label": 0, "task": "alpha"}\n'}, ["line 1", "field 'text'"])
    add("text_int", {"rd/train.jsonl": '{"text": 5, "label": 0, "task": "alpha"}\n'}, ["line 1", "field 'text'"])
    add("text_null", {"rd/train.jsonl": '{"text": null, "label": 0, "task": "alpha"}\n'}, ["line 1", "field 'text'"])
    add("task_missing", {"rd/train.jsonl": '{"text": "a", "label": 0}\n'}, ["line 1", "field 'task'"])
    add("task_empty", {"rd/train.jsonl": '{"text": "a", "label": 0, "task": ""}\n'}, ["line 1", "field 'task'"])
    add("label_missing", {"rd/train.jsonl": '{"text": "a", "task": "alpha"}\n'}, ["line 1", "field 'label'"])
    add("label_out_of_range", {"rd/train.jsonl": ok_train + rec("x", 5, "alpha") + "\n"},
        ["line 7", "field 'label'", "outside 0..1"])
    add("label_negative", {"rd/train.jsonl": rec("x", -1, "alpha") + "\n"}, ["line 1", "field 'label'", "outside"])
    add("label_float", {"rd/train.jsonl": '{"text": "a", "label": 1.0, "task": "beta"}\n'},
        ["line 1", "field 'label'", "not an integer"])
    add("label_bool", {"rd/train.jsonl": '{"text": "a", "label": true, "task": "beta"}\n'},
        ["line 1", "field 'label'", "not an integer"])
    add("label_string", {"rd/train.jsonl": '{"text": "a", "label": "1", "task": "beta"}\n'},
        ["line 1", "field 'label'", "not an integer"])
    add("label_task_mismatch", {"rd/train.jsonl": rec("a", 0, "beta") + "\n"}, ["line 1", "field 'label'", "'beta'"])
    add("unknown_task", {"rd/train.jsonl": rec("a", 1, "gamma") + "\n"}, ["line 1", "'gamma'"])
    add("empty_task_split", {"rd/train.jsonl": rec("a", 0, "alpha") + "\n"}, ["train.jsonl", "'beta'", "no training"])
    add("val_bad_record", {"rd/val.jsonl": '{"text": "a"}\n'}, ["val.jsonl", "line 1", "field 'task'"])
    add("test_label_range", {"rd/test.jsonl": rec("a", 9, "alpha") + "\n"}, ["test.jsonl", "line 1", "outside"])
    add("labels_differ_from_adapters", {}, ["labels"], extra=["--adapters", "{run}"])
    add("label_order_differs_from_adapters",
        {"rd/labels.json": json.dumps(["capitals", "arithmetic", "word_sorting"]),
         "rd/train.jsonl": rec("a", 0, "capitals") + "\n" + rec("b", 1, "arithmetic") + "\n" + rec("c", 2, "word_sorting") + "\n",
         "rd/val.jsonl": rec("d", 0, "capitals") + "\n"},
        ["labels differ from the adapters", "position 0"], extra=["--adapters", "{run}"])
    return c


def router_dir_cases():
    """(name, setup, needles, files) for a broken RUN/router/ (entry point: `dlp-lora generate --run`)."""
    c = []
    add = lambda n, setup, *nd, files=None: c.append((n, setup, list(nd), files or {}))
    R = "run/router/"
    add("router_weights_missing", {"delete": [R + "router.safetensors"]}, "router.safetensors")
    add("router_config_missing", {"delete": [R + "config.json"]}, "config.json")
    add("router_labels_missing", {"delete": [R + "labels.json"]}, "labels.json")
    add("router_tokenizer_missing", {"delete": [R + "tokenizer"]}, "tokenizer")
    add("router_weights_garbage", {}, "router.safetensors", files={R + "router.safetensors": GARBAGE})
    add("router_weights_empty", {}, "router.safetensors", files={R + "router.safetensors": b""})
    add("router_weights_bin_only", {"delete": [R + "router.safetensors"]}, "router.safetensors",
        files={R + "router.bin": PICKLE})
    add("router_weights_missing_tensor", {}, "router.safetensors", "do not match",
        files={R + "router.safetensors": _safetensors({"mlp.9.bias": (3,)})})
    add("router_weights_wrong_shape", {}, "router.safetensors",
        files={R + "router.safetensors": _safetensors({"embed.weight": (1000, 16), "mlp.0.weight": (32, 16),
                                                       "mlp.0.bias": (32,), "mlp.3.weight": (32, 32), "mlp.3.bias": (32,),
                                                       "mlp.6.weight": (32, 32), "mlp.6.bias": (32,),
                                                       "mlp.9.weight": (3, 32), "mlp.9.bias": (3,)})})
    add("router_config_bad_json", {}, "config.json", "not valid JSON", files={R + "config.json": "{"})
    add("router_config_list", {}, "config.json", "expected a JSON object", files={R + "config.json": "[]"})
    add("router_config_num_labels_lies", {"json_set": [[R + "config.json", "num_labels", 5]]}, "num_labels")
    add("router_config_vocab_lies", {"json_set": [[R + "config.json", "vocab_size", 1000]]}, "vocab")
    add("router_config_embed_dim_lies", {"json_set": [[R + "config.json", "embed_dim", 32]]}, "router.safetensors")
    add("router_config_unknown_kind", {"json_set": [[R + "config.json", "kind", "xgboost"]]}, "config.json", "xgboost")
    add("router_config_unknown_field", {"json_set": [[R + "config.json", "colour", "blue"]]}, "config.json",
        "unknown field 'colour'")
    add("router_config_wrong_type", {"json_set": [[R + "config.json", "epochs", "many"]]}, "config.json", "epochs")
    add("router_config_negative_dim", {"json_set": [[R + "config.json", "hidden_dim", -4]]}, "config.json",
        "hidden_dim")
    add("router_config_bad_pooling", {"json_set": [[R + "config.json", "pooling", "median"]]}, "config.json",
        "pooling")
    add("router_other_tokenizer", {"json_set": [[R + "config.json", "tokenizer", "32000:0123456789abcdef"]]},
        "another tokenizer")
    add("router_labels_not_list", {}, "labels.json", "list of task names", files={R + "labels.json": '{"a": 1}'})
    add("router_labels_bad_json", {}, "labels.json", "not valid JSON", files={R + "labels.json": "[\"a\""})
    add("router_labels_other_tasks", {}, "labels", files={R + "labels.json": '["x", "y", "z"]'})
    add("router_labels_other_order", {}, "labels",
        files={R + "labels.json": '["capitals", "arithmetic", "word_sorting"]'})
    add("router_labels_two", {}, "num_labels", files={R + "labels.json": '["arithmetic", "capitals"]'})
    add("router_labels_duplicate", {}, "labels.json", "listed twice",
        files={R + "labels.json": '["arithmetic", "arithmetic", "capitals"]'})
    add("router_is_a_file", {"delete": ["run/router"]}, "router", files={"run/router": "not a folder"})
    return c


def adapter_dir_cases():
    """(name, setup, needles, files) for a broken RUN/adapters/arithmetic/ (generate --weights, export-mixture)."""
    A = "run/adapters/arithmetic/"
    W = A + "adapter_model.safetensors"
    c = []
    add = lambda n, setup, *nd, files=None: c.append((n, setup, list(nd), files or {}))
    add("config_missing", {"delete": [A + "adapter_config.json"]}, "arithmetic", "adapter_config.json")
    add("weights_missing", {"delete": [W]}, "arithmetic", "adapter_model.safetensors")
    add("bin_only", {"delete": [W]}, "adapter_model.bin", "never loaded", files={A + "adapter_model.bin": PICKLE})
    add("weights_garbage", {}, "adapter_model.safetensors", files={W: GARBAGE})
    add("weights_empty", {}, "adapter_model.safetensors", files={W: b""})
    add("weights_truncated", {}, "adapter_model.safetensors",
        files={W: _safetensors(_lora_tensors())[:200]})
    add("config_bad_json", {}, "adapter_config.json", "not valid JSON", files={A + "adapter_config.json": "{'r': 8}"})
    add("config_list", {}, "adapter_config.json", "JSON object", files={A + "adapter_config.json": "[8]"})
    add("config_not_utf8", {}, "adapter_config.json", "cannot read", files={A + "adapter_config.json": b"\xff\xfe{"})
    add("peft_type_prefix", {"json_set": [[A + "adapter_config.json", "peft_type", "PREFIX_TUNING"]]}, "peft_type")
    add("peft_type_ia3", {"json_set": [[A + "adapter_config.json", "peft_type", "IA3"]]}, "peft_type")
    add("dora", {"json_set": [[A + "adapter_config.json", "use_dora", True]]}, "use_dora")
    add("modules_to_save", {"json_set": [[A + "adapter_config.json", "modules_to_save", ["lm_head"]]]},
        "modules_to_save")
    add("config_lies_rank", {"json_set": [[A + "adapter_config.json", "r", 4]]}, "adapter_config.json", "'r'", "rank 4")
    add("config_lies_rank_pattern", {"json_set": [[A + "adapter_config.json", "rank_pattern", {"q_proj": 2}]]},
        "adapter_config.json", "rank_pattern", "rank 2")
    add("config_rank_zero", {"json_set": [[A + "adapter_config.json", "r", 0]]}, "adapter_config.json", "'r'")
    add("config_alpha_string", {"json_set": [[A + "adapter_config.json", "lora_alpha", "big"]]},
        "adapter_config.json", "lora_alpha")
    add("config_targets_other", {"json_set": [[A + "adapter_config.json", "target_modules", ["k_proj"]]]},
        "adapter_config.json", "target_modules")
    add("other_base_hidden", {}, "q_proj", "another base model",
        files={W: _safetensors(_lora_tensors(d_in=128, q_out=128, v_out=64))})
    add("other_base_layers", {}, "layers.5", "another base model",
        files={W: _safetensors(_lora_tensors(layers=(0, 5)))})
    add("a_b_do_not_fit", {}, "do not fit",
        files={W: _safetensors({LORA_KEY.format(layer=0, mod="q_proj", ab="A"): (8, 64),
                                LORA_KEY.format(layer=0, mod="q_proj", ab="B"): (64, 4)})})
    add("b_missing", {}, "lora_B weight missing",
        files={W: _safetensors({LORA_KEY.format(layer=0, mod="q_proj", ab="A"): (8, 64)})})
    add("one_dim_tensor", {}, "do not fit",
        files={W: _safetensors({LORA_KEY.format(layer=0, mod="q_proj", ab="A"): (8,),
                                LORA_KEY.format(layer=0, mod="q_proj", ab="B"): (64, 8)})})
    add("non_lora_tensor", {}, "not a LoRA weight", files={W: _safetensors({"model.embed_tokens.weight": (10, 64)})})
    add("no_tensors", {}, "no LoRA tensors", files={W: _safetensors({})})
    add("task_meta_bad_json", {}, "dlp_task.json", "not valid JSON", files={A + "dlp_task.json": "{"})
    add("task_meta_no_task", {"json_set": [[A + "dlp_task.json", "task", None]]}, "dlp_task.json", "field 'task'")
    add("task_meta_task_int", {"json_set": [[A + "dlp_task.json", "task", 7]]}, "dlp_task.json", "field 'task'")
    add("task_meta_duplicate_name", {"json_set": [[A + "dlp_task.json", "task", "capitals"]]}, "capitals")
    add("other_base_fingerprint", {"json_set": [[A + "dlp_task.json", "base_model",
                                                 {"model_type": "qwen2", "hidden_size": 1536, "vocab_size": 151936,
                                                  "num_hidden_layers": 28, "fingerprint": "0000000000000000"}]]},
        "dlp_task.json", "another base model", "qwen2")
    add("folder_is_file", {"delete": ["run/adapters/arithmetic"]}, "arithmetic", "not a folder",
        files={"run/adapters/arithmetic": "x"})
    return c


def adapter_list_cases():
    """(name, files, needles, setup) for adapters.txt (generate --adapters, make-router-data --adapters)."""
    c = []
    add = lambda n, files, *nd, setup=None: c.append((n, files, list(nd), setup or {}))
    add("missing", {}, "adapters.txt", "not found", setup={"delete": ["run/adapters.txt"]})
    add("empty", {"run/adapters.txt": ""}, "adapters.txt", "no adapter folders")
    add("only_comments", {"run/adapters.txt": "# nothing here\n\n"}, "adapters.txt", "no adapter folders")
    add("path_not_found", {"run/adapters.txt": "adapters/arithmetic\nadapters/nope\n"}, "line 2", "not found")
    add("path_is_file", {"run/adapters.txt": "adapters/arithmetic\nadapters.txt\n"}, "line 2", "not a folder")
    add("duplicate_path", {"run/adapters.txt": "adapters/arithmetic\nadapters/capitals\n./adapters/arithmetic\n"},
        "line 3", "listed twice")
    add("duplicate_task_name", {"run/adapters.txt": "adapters/arithmetic\nadapters/capitals\n"}, "capitals",
        setup={"json_set": [["run/adapters/arithmetic/dlp_task.json", "task", "capitals"]]})
    add("not_utf8", {"run/adapters.txt": b"adapters/arithm\xe9tic\n"}, "adapters.txt", "cannot read")
    add("binary", {"run/adapters.txt": GARBAGE}, "adapters.txt")
    add("not_an_adapter", {"run/adapters.txt": "adapters/arithmetic\nrouter_data\n"}, "router_data")
    add("absolute_missing", {"run/adapters.txt": "/nonexistent/dlp/adapter\n"}, "line 1", "not found")
    return c


GEN = ["generate", "--model", "{tiny}", "--device", "cpu", "--dtype", "fp32", "--max-new-tokens", "2"]


def command_arg_cases():
    """(name, argv, needles, code, outputs, setup, files) for argument errors of the stages (argparse: 2,
    DLPError: 1), one function per stage."""
    cases = []

    def add(n, argv, *nd, code=1, outputs=(), setup=None, files=None):
        cases.append((n, argv, list(nd), code, list(outputs), setup or {}, {**ARG_FILES, **(files or {})}))

    for stage in (_generate_cases, _export_mixture_cases, _train_lora_cases, _train_router_cases,
                  _make_router_data_cases, _eval_cases, _serve_cases):
        stage(add)
    return cases


def _generate_cases(add) -> None:
    """`generate`: selection flags, forced weights, numbers, the run, and --input files."""
    g = GEN + ["--run", "{run}", "--prompt", "What is 2+2?"]
    add("gen_top_p_zero", g + ["--top-p", "0"], "--top-p", "(0, 1]")
    add("gen_top_p_above_one", g + ["--top-p", "1.5"], "--top-p", "(0, 1]")
    add("gen_top_p_negative", g + ["--top-p", "-0.2"], "--top-p", "(0, 1]")
    add("gen_top_p_nan", g + ["--top-p", "nan"], "--top-p", "finite", code=2)
    add("gen_top_p_text", g + ["--top-p", "high"], "--top-p", "invalid float", code=2)
    add("gen_weights_negative", g + ["--weights", "arithmetic=-1"], "arithmetic", ">= 0")
    add("gen_weights_unknown_task", g + ["--weights", "nosuchtask=1"], "nosuchtask")
    add("gen_weights_no_value", g + ["--weights", "arithmetic"], "--weights", "arithmetic")
    add("gen_weights_not_number", g + ["--weights", "arithmetic=lots"], "arithmetic", "lots")
    add("gen_weights_nan", g + ["--weights", "arithmetic=nan"], "arithmetic")
    add("gen_weights_inf", g + ["--weights", "arithmetic=inf"], "arithmetic")
    add("gen_weights_duplicate", g + ["--weights", "arithmetic=0.5,arithmetic=0.5"], "arithmetic", "twice")
    add("gen_weights_empty", g + ["--weights", ","], "--weights")
    add("gen_weighting_unknown", g + ["--weighting", "softmax"], "invalid choice", code=2)
    add("gen_granularity_unknown", g + ["--granularity", "token"], "invalid choice", code=2)
    add("gen_max_new_tokens_zero", g + ["--max-new-tokens", "0"], "--max-new-tokens", "[1, 100000]", code=2)
    add("gen_max_new_tokens_negative", g + ["--max-new-tokens", "-5"], "--max-new-tokens", code=2)
    add("gen_max_new_tokens_huge", g + ["--max-new-tokens", "1000000000"], "--max-new-tokens", "[1, 100000]", code=2)
    add("gen_seed_huge", g + ["--seed", str(10**23)], "--seed", "[0, 4294967295]", code=2)
    add("gen_seed_2_64", g + ["--seed", str(2**64)], "--seed", code=2)
    add("gen_seed_negative", g + ["--seed", "-1"], "--seed", code=2)
    add("gen_max_adapters_huge", g + ["--max-adapters", str(10**20)], "--max-adapters", code=2)
    add("gen_batch_size_5000_digits", g + ["--batch-size", HUGE_INT], "--batch-size", "invalid int", code=2)
    add("gen_temperature_inf", g + ["--temperature", "inf"], "--temperature", "finite", code=2)
    add("gen_temperature_10e400", g + ["--temperature", "1e400"], "--temperature", "finite", code=2)
    add("gen_top_p_5000_digits", g + ["--top-p", HUGE_INT], "--top-p", "finite", code=2)
    add("gen_min_confidence_nan", g + ["--min-confidence", "nan"], "--min-confidence", "finite", code=2)
    add("gen_input_fifo", GEN + ["--run", "{run}", "--input", "{case}/pipe.jsonl"], "pipe.jsonl", "not a regular file",
        setup={"mkfifo": ["pipe.jsonl"]})
    add("gen_input_dev_zero", GEN + ["--run", "{run}", "--input", "{case}/zero.jsonl"], "zero.jsonl",
        "a character device", setup={"symlink": [["zero.jsonl", "/dev/zero"]]})
    add("gen_input_over_size_limit", GEN + ["--run", "{run}", "--input", "{case}/in.json"], "in.json",
        "byte limit", setup={"env": {"DLP_LORA_MAX_FILE_BYTES": "8"}})
    add("gen_input_deep", GEN + ["--run", "{run}", "--input", "{case}/deep.jsonl"], "deep.jsonl", "line 1",
        "nested too deeply", files={"deep.jsonl": '{"prompt": ' + DEEP_20K + "}\n"})
    add("gen_input_huge_integer", GEN + ["--run", "{run}", "--input", "{case}/hugeint.jsonl"], "hugeint.jsonl",
        "line 1", "4300 digits", files={"hugeint.jsonl": '{"prompt": "hi", "id": ' + HUGE_INT + "}\n"})
    add("gen_input_lone_surrogate", GEN + ["--run", "{run}", "--input", "{case}/surrogate.jsonl"], "surrogate.jsonl",
        "line 2", "field 'prompt'", "unpaired surrogate",
        files={"surrogate.jsonl": '{"prompt": "hi"}\n{"prompt": "x\\ud800"}\n'})
    add("gen_temperature_negative", g + ["--temperature", "-1"], "temperature")
    add("gen_top_p_sampling_zero", g + ["--top-p-sampling", "0"], "top_p_sampling")
    add("gen_batch_size_zero", g + ["--batch-size", "0"], "batch_size")
    add("gen_max_adapters_negative", g + ["--max-adapters", "-1"], "--max-adapters", "[0, ")
    add("gen_min_confidence_above_one", g + ["--min-confidence", "2"], "--min-confidence", "[0, 1]")
    add("gen_prompt_and_input", g + ["--input", "{case}/in.json"], "exactly one of --prompt or --input")
    add("gen_no_prompt", GEN + ["--run", "{run}"], "exactly one of --prompt or --input")
    add("gen_input_missing", GEN + ["--run", "{run}", "--input", "{tmp}/absent.jsonl"], "absent.jsonl", "file not found")
    add("gen_input_empty", GEN + ["--run", "{run}", "--input", "{case}/empty.jsonl"], "empty.jsonl", "no prompts")
    add("gen_input_bad_line", GEN + ["--run", "{run}", "--input", "{case}/bad.jsonl"], "bad.jsonl", "line 2")
    add("gen_input_prompt_int", GEN + ["--run", "{run}", "--input", "{case}/int.jsonl"], "int.jsonl", "field 'prompt'")
    add("gen_input_not_utf8", GEN + ["--run", "{run}", "--input", "{case}/latin1.jsonl"], "latin1.jsonl", "cannot read")
    add("gen_run_missing", GEN + ["--run", "{tmp}/norun", "--prompt", "hi"], "norun", "not found")
    add("gen_no_router_no_weights", GEN + ["--run", "{case}/run", "--prompt", "hi"], "no router",
        setup={"copy_run": True, "delete": ["run/router"]})
    add("gen_router_missing", g + ["--router", "{tmp}/norouter"], "norouter", "not found")
    add("gen_model_missing", ["generate", "--model", "{tmp}/nomodel", "--run", "{run}", "--prompt", "hi"], "nomodel")
    add("gen_model_is_file", ["generate", "--model", "{case}/in.json", "--run", "{run}", "--prompt", "hi"], "in.json")
    add("gen_dtype_unknown", ["generate", "--model", "{tiny}", "--dtype", "fp8", "--run", "{run}", "--prompt", "hi"], "fp8")
    add("gen_device_unknown", ["generate", "--model", "{tiny}", "--device", "tpu", "--run", "{run}", "--prompt", "hi"], "tpu")


def _export_mixture_cases(add) -> None:
    """`export-mixture`: weights and the output folder."""
    ex = ["export-mixture", "--model", "{tiny}", "--run", "{run}", "--out", "{tmp}/mix"]
    add("export_weights_negative", ex + ["--weights", "arithmetic=-0.5"], "arithmetic", ">= 0", outputs=["{tmp}/mix"])
    add("export_weights_unknown_task", ex + ["--weights", "poetry=1"], "poetry", outputs=["{tmp}/mix"])
    add("export_weights_all_zero", ex + ["--weights", "arithmetic=0"], "zero", outputs=["{tmp}/mix"])
    add("export_weights_bad_syntax", ex + ["--weights", "arithmetic:1"], "arithmetic:1", outputs=["{tmp}/mix"])
    add("export_out_exists", ["export-mixture", "--model", "{tiny}", "--run", "{run}", "--out", "{case}",
                              "--weights", "arithmetic=1"], "already exists")
    add("export_out_under_file", ["export-mixture", "--model", "{tiny}", "--run", "{run}", "--out",
                                  "{case}/in.json/mix", "--weights", "arithmetic=1"], "in.json")
    add("export_no_weights", ["export-mixture", "--model", "{tiny}", "--run", "{run}", "--out", "{tmp}/m"], "--weights",
        code=2)
    add("export_no_adapters", ["export-mixture", "--model", "{tiny}", "--out", "{tmp}/m", "--weights", "a=1"],
        "--run", outputs=["{tmp}/m"])


def _train_lora_cases(add) -> None:
    """`train-lora`: LoRA options, numbers, task data and the output."""
    tl = ["train-lora", "--model", "{tiny}", "--data", "{case}/in.json", "--out", "{tmp}/ad", "--no-progress",
          "--max-steps", "1"]
    add("lora_rank_zero", tl + ["--rank", "0"], "rank", outputs=["{tmp}/ad"])
    add("lora_rank_negative", tl + ["--rank", "-8"], "rank", outputs=["{tmp}/ad"])
    add("lora_rank_text", tl + ["--rank", "eight"], "--rank", "invalid int", code=2)
    add("lora_alpha_zero", tl + ["--alpha", "0"], "alpha", outputs=["{tmp}/ad"])
    add("lora_dropout_one", tl + ["--dropout", "1"], "dropout", outputs=["{tmp}/ad"])
    add("lora_lr_negative", tl + ["--lr", "-0.1"], "learning_rate", outputs=["{tmp}/ad"])
    add("lora_max_steps_zero", tl[:-2] + ["--max-steps", "0"], "max_steps", outputs=["{tmp}/ad"])
    add("lora_epochs_zero", tl[:-2] + ["--epochs", "0"], "epochs", outputs=["{tmp}/ad"])
    add("lora_batch_size_zero", tl + ["--batch-size", "0"], "batch_size", outputs=["{tmp}/ad"])
    add("lora_grad_accum_zero", tl + ["--grad-accum", "0"], "grad_accum", outputs=["{tmp}/ad"])
    add("lora_max_length_tiny", tl + ["--max-length", "4"], "max_length", outputs=["{tmp}/ad"])
    add("lora_save_steps_zero", tl + ["--save-steps", "0"], "save_steps", outputs=["{tmp}/ad"])
    add("lora_precision_unknown", tl + ["--precision", "fp8"], "invalid choice", code=2)
    add("lora_target_unknown", tl + ["--target-modules", "wq,wv"], "wq", outputs=["{tmp}/ad"])
    add("lora_target_empty", tl + ["--target-modules", " "], "target_modules", outputs=["{tmp}/ad"])
    add("lora_seed_beyond_numpy", tl + ["--seed", str(2**40)], "--seed", "[0, 4294967295]", code=2)
    add("lora_lr_inf", tl + ["--lr", "inf"], "--lr", "finite", code=2)
    add("lora_epochs_nan", tl + ["--epochs", "nan"], "--epochs", "finite", code=2)
    add("lora_max_steps_huge", tl + ["--max-steps", str(10**30)], "--max-steps", code=2)
    add("lora_data_fifo", ["train-lora", "--model", "{tiny}", "--data", "{case}/pipe.json", "--out", "{tmp}/ad"],
        "pipe.json", "not a regular file", outputs=["{tmp}/ad"], setup={"mkfifo": ["pipe.json"]})
    add("lora_data_dir_with_fifo", ["train-lora", "--model", "{tiny}", "--data-dir", "{case}/tasks", "--out",
                                    "{tmp}/run"], "pipe.json", "not a regular file", outputs=["{tmp}/run"],
        setup={"mkfifo": ["tasks/pipe.json"]})
    add("lora_data_lone_surrogate", ["train-lora", "--model", "{tiny}", "--data", "{case}/surrogate.json", "--out",
                                     "{tmp}/ad"], "surrogate.json", "record 1", "field 'A'", "unpaired surrogate",
        outputs=["{tmp}/ad"], files={"surrogate.json": '[{"Q": "a", "A": "b"}, {"Q": "c", "A": "\\udfff"}]'})
    add("lora_out_exists", ["train-lora", "--model", "{tiny}", "--data", "{case}/in.json", "--out", "{case}",
                            "--no-progress", "--max-steps", "1"], "would overwrite an input")
    add("lora_out_exists_not_input", ["train-lora", "--model", "{tiny}", "--data", "{case}/in.json", "--out",
                                      "{case}/tasks", "--no-progress", "--max-steps", "1"], "already exists")
    add("lora_data_missing", ["train-lora", "--model", "{tiny}", "--data", "{tmp}/absent.json", "--out", "{tmp}/ad"],
        "absent.json", "file not found", outputs=["{tmp}/ad"])
    add("lora_data_bad", ["train-lora", "--model", "{tiny}", "--data", "{case}/bad.json", "--out", "{tmp}/ad"],
        "bad.json", "record 0", outputs=["{tmp}/ad"])
    add("lora_data_and_dir", tl + ["--data-dir", "{case}"], "not allowed", code=2)
    add("lora_task_with_dir", ["train-lora", "--model", "{tiny}", "--data-dir", "{case}/tasks", "--task", "x",
                               "--out", "{tmp}/run"], "--task", outputs=["{tmp}/run"])
    add("lora_task_bad_name", tl + ["--task", "../evil"], "task", outputs=["{tmp}/ad"])
    add("lora_dir_empty", ["train-lora", "--model", "{tiny}", "--data-dir", "{tmp}", "--out", "{tmp}/run"],
        "no task files", outputs=["{tmp}/run"])
    add("lora_dir_duplicate_tasks", ["train-lora", "--model", "{tiny}", "--data-dir", "{case}/duptasks", "--out",
                                     "{tmp}/run"], "same", outputs=["{tmp}/run"])
    add("lora_model_missing", ["train-lora", "--model", "{tmp}/nomodel", "--data", "{case}/in.json", "--out",
                               "{tmp}/ad"], "nomodel", outputs=["{tmp}/ad"])
    add("lora_out_under_file", ["train-lora", "--model", "{tiny}", "--data", "{case}/in.json", "--out",
                                "{case}/in.json/ad", "--max-steps", "1", "--no-progress"], "in.json")


def _train_router_cases(add) -> None:
    """`train-router`: router options, numbers, router data and the output."""
    tr = ["train-router", "--data", "{run}/router_data", "--model", "{tiny}", "--out", "{tmp}/r", "--no-progress"]
    add("router_type_unknown", tr + ["--router", "xgboost"], "unknown router type", "xgboost", outputs=["{tmp}/r"])
    add("router_epochs_zero", tr + ["--epochs", "0"], "epochs", outputs=["{tmp}/r"])
    add("router_batch_size_negative", tr + ["--batch-size", "-4"], "batch_size", outputs=["{tmp}/r"])
    add("router_lr_zero", tr + ["--lr", "0"], "learning_rate", outputs=["{tmp}/r"])
    add("router_seed_huge", tr + ["--seed", str(10**23)], "--seed", code=2)
    add("router_lr_nan", tr + ["--lr", "nan"], "--lr", "finite", code=2)
    add("router_patience_zero", tr + ["--patience", "0"], "patience", outputs=["{tmp}/r"])
    add("router_max_tokens_zero", tr + ["--max-tokens", "0"], "max_tokens", outputs=["{tmp}/r"])
    add("router_token_dropout_one", tr + ["--token-dropout", "1.0"], "token_dropout", outputs=["{tmp}/r"])
    add("router_pooling_unknown", tr + ["--pooling", "median"], "pooling", outputs=["{tmp}/r"])
    add("router_pretrained_missing", tr + ["--router", "albert", "--pretrained", "{tmp}/noalbert"], "noalbert",
        outputs=["{tmp}/r"])
    add("router_out_exists", ["train-router", "--data", "{run}/router_data", "--model", "{tiny}", "--out", "{case}",
                              "--no-progress"], "already exists")
    add("router_data_missing", ["train-router", "--data", "{tmp}/nodata", "--model", "{tiny}", "--out", "{tmp}/r"],
        "nodata", "not found", outputs=["{tmp}/r"])
    add("router_data_is_file", ["train-router", "--data", "{case}/in.json", "--model", "{tiny}", "--out", "{tmp}/r"],
        "in.json", outputs=["{tmp}/r"])
    add("router_model_missing", ["train-router", "--data", "{run}/router_data", "--model", "{tmp}/nomodel", "--out",
                                 "{tmp}/r"], "nomodel", outputs=["{tmp}/r"])
    add("router_adapters_missing", tr + ["--adapters", "{tmp}/noadapters.txt"], "noadapters.txt", outputs=["{tmp}/r"])


def _make_router_data_cases(add) -> None:
    """`make-router-data`: fractions, numbers, sources and the output."""
    mr = ["make-router-data", "--adapters", "{run}", "--out", "{tmp}/rd", "--no-progress"]
    add("mrd_no_source", ["make-router-data", "--out", "{tmp}/rd"], "--adapters", outputs=["{tmp}/rd"])
    add("mrd_val_frac_above_one", mr + ["--val-frac", "1.5"], "val_frac", outputs=["{tmp}/rd"])
    add("mrd_fracs_sum_above_one", mr + ["--val-frac", "0.6", "--test-frac", "0.6"], "sum", outputs=["{tmp}/rd"])
    add("mrd_test_frac_negative", mr + ["--test-frac", "-0.1"], "test_frac", outputs=["{tmp}/rd"])
    add("mrd_per_task_negative", mr + ["--per-task", "-3"], "per_task", outputs=["{tmp}/rd"])
    add("mrd_composite_negative", mr + ["--composite", "-1"], "composite", outputs=["{tmp}/rd"])
    add("mrd_seed_huge", mr + ["--seed", str(2**63)], "--seed", code=2)
    add("mrd_val_frac_nan", mr + ["--val-frac", "nan"], "--val-frac", "finite", code=2)
    add("mrd_data_dir_with_fifo", ["make-router-data", "--data-dir", "{case}/tasks", "--out", "{tmp}/rd"], "pipe.json",
        "not a regular file", outputs=["{tmp}/rd"], setup={"mkfifo": ["tasks/pipe.json"]})
    add("mrd_granularity_unknown", mr + ["--granularity", "token"], "invalid choice", code=2)
    add("mrd_out_exists", ["make-router-data", "--adapters", "{run}", "--out", "{case}"], "already exists")
    add("mrd_data_dir_missing", ["make-router-data", "--data-dir", "{tmp}/nodir", "--out", "{tmp}/rd"], "nodir",
        outputs=["{tmp}/rd"])
    add("mrd_data_dir_empty", ["make-router-data", "--data-dir", "{case}/emptydir", "--out", "{tmp}/rd"],
        "no task files", outputs=["{tmp}/rd"])
    add("mrd_data_dir_bad_file", ["make-router-data", "--data-dir", "{case}/badtasks", "--out", "{tmp}/rd"],
        "bad.json", outputs=["{tmp}/rd"])
    add("mrd_fuse_missing", ["make-router-data", "--fuse", "{run}/router_data/train.jsonl", "{tmp}/a.jsonl", "--out", "{tmp}/f.jsonl"], "a.jsonl",
        outputs=["{tmp}/f.jsonl"])
    add("mrd_fuse_with_adapters", ["make-router-data", "--fuse", "{case}/in.json", "--adapters", "{run}", "--out",
                                   "{tmp}/f.jsonl"], "--fuse", outputs=["{tmp}/f.jsonl"])
    add("mrd_adapters_missing", ["make-router-data", "--adapters", "{tmp}/noadapters.txt", "--out", "{tmp}/rd"],
        "noadapters.txt", outputs=["{tmp}/rd"])


def _eval_cases(add) -> None:
    """`eval`: argument errors (selection, systems, limits, metrics, data, output)."""
    ev = ["eval", "--run", "{run}", "--model", "{tiny}", "--data", "{run}/../data/arithmetic.json", "--out",
          "{tmp}/ev", "--no-progress", "--limit", "2", "--max-new-tokens", "2"]
    add("eval_top_p_above_one", ev + ["--top-p", "1.5"], "--top-p", "(0, 1]", outputs=["{tmp}/ev"])
    add("eval_top_p_zero", ev + ["--top-p", "0"], "--top-p", outputs=["{tmp}/ev"])
    add("eval_systems_unknown", ev + ["--systems", "base,oracle2"], "oracle2", outputs=["{tmp}/ev"])
    add("eval_limit_zero", ev + ["--limit", "0"], "limit", outputs=["{tmp}/ev"])
    add("eval_batch_size_zero", ev + ["--batch-size", "0"], "batch", outputs=["{tmp}/ev"])
    add("eval_max_new_tokens_zero", ev + ["--max-new-tokens", "0"], "--max-new-tokens", code=2)
    add("eval_max_new_tokens_huge", ev + ["--max-new-tokens", "1000000000"], "--max-new-tokens", "[1, 100000]", code=2)
    add("eval_top_p_inf", ev + ["--top-p", "inf"], "--top-p", "finite", code=2)
    add("eval_metric_unknown", ev + ["--metric", "arithmetic=f1"], "f1", outputs=["{tmp}/ev"])
    add("eval_metric_bad_syntax", ev + ["--metric", "arithmetic"], "--metric", outputs=["{tmp}/ev"])
    add("eval_run_missing", ["eval", "--run", "{tmp}/norun", "--data", "{case}/in.json", "--out", "{tmp}/ev"],
        "norun", outputs=["{tmp}/ev"])
    add("eval_data_missing", ["eval", "--run", "{run}", "--model", "{tiny}", "--data", "{tmp}/absent.json", "--out",
                              "{tmp}/ev"], "absent.json", outputs=["{tmp}/ev"])
    add("eval_data_unknown_task", ["eval", "--run", "{run}", "--model", "{tiny}", "--data", "{case}/in.json",
                                   "--out", "{tmp}/ev", "--no-progress"], "in", outputs=["{tmp}/ev"])
    add("eval_out_exists", ["eval", "--run", "{run}", "--model", "{tiny}", "--data", "{run}/../data/arithmetic.json",
                            "--out", "{case}", "--no-progress"], "already exists")
    add("eval_weighting_unknown", ev + ["--weighting", "mean"], "invalid choice", code=2)


def _serve_cases(add) -> None:
    """`serve`: every one of these must fail before a server starts (config checks, run folder)."""
    sv = ["serve", "--run", "{run}", "--model", "{tiny}", "--device", "cpu"]
    add("serve_port_out_of_range", sv + ["--port", "70000"], "port")
    add("serve_max_queue_zero", sv + ["--max-queue", "0"], "max_queue")
    add("serve_top_p_above_one", sv + ["--top-p", "2"], "--top-p", "(0, 1]")
    add("serve_weighting_unknown", sv + ["--weighting", "mean"], "--weighting", "invalid choice", code=2)
    add("serve_granularity_unknown", sv + ["--granularity", "token"], "--granularity", "invalid choice", code=2)
    add("serve_max_body_negative", sv + ["--max-body-bytes", "-1"], "max_body_bytes")
    add("serve_run_missing", ["serve", "--run", "{tmp}/norun", "--model", "{tiny}", "--port", "0"], "norun", "not found")
    add("serve_model_missing", ["serve", "--run", "{run}", "--model", "{tmp}/nomodel", "--port", "0"], "nomodel")


def http_cases():
    """(name, request, status, needles, server-config) for the OpenAI-compatible server."""
    c = []
    chat = lambda **kw: {"model": "dlp", "messages": [{"role": "user", "content": "2+2?"}], "max_tokens": 2, **kw}
    add = lambda n, req, status, *nd, server=None: c.append((n, req, status, list(nd), server or {}))
    P = "/v1/chat/completions"
    add("invalid_json", {"path": P, "raw": '{"model": "dlp", "messages": ['}, 400, "invalid JSON")
    add("body_not_object", {"path": P, "body": [1, 2, 3]}, 400, "object")
    add("body_string", {"path": P, "body": "hello"}, 400, "object")
    add("not_utf8", {"path": P, "raw_bytes": "ff fe 00 7b"}, 400, "invalid JSON")
    add("empty_body", {"path": P, "raw": ""}, 400, "invalid JSON")
    add("messages_missing", {"path": P, "body": {"model": "dlp-lora"}}, 422, "messages")
    add("messages_not_list", {"path": P, "body": chat(messages="hi")}, 422, "messages")
    add("messages_empty", {"path": P, "body": chat(messages=[])}, 422, "messages")
    add("message_no_role", {"path": P, "body": chat(messages=[{"content": "hi"}])}, 422, "role")
    add("message_bad_role", {"path": P, "body": chat(messages=[{"role": "wizard", "content": "hi"}])}, 422, "role")
    add("message_content_int", {"path": P, "body": chat(messages=[{"role": "user", "content": 5}])}, 422, "content")
    add("model_unknown", {"path": P, "body": chat(model="gpt-7")}, 404, "gpt-7")
    add("model_int", {"path": P, "body": chat(model=3)}, 422, "model")
    add("max_tokens_string", {"path": P, "body": chat(max_tokens="ten")}, 422, "max_tokens")
    add("max_tokens_zero", {"path": P, "body": chat(max_tokens=0)}, 422, "max_tokens")
    add("max_tokens_over_cap", {"path": P, "body": chat(max_tokens=100000)}, 400, "max_tokens", "512")
    add("max_tokens_float", {"path": P, "body": chat(max_tokens=2.5)}, 422, "max_tokens")
    add("temperature_negative", {"path": P, "body": chat(temperature=-1)}, 422, "temperature")
    add("temperature_string", {"path": P, "body": chat(temperature="hot")}, 422, "temperature")
    add("top_p_zero", {"path": P, "body": chat(top_p=0)}, 422, "top_p")
    add("n_two", {"path": P, "body": chat(n=2)}, 400, "n=1")
    add("stream_string", {"path": P, "body": chat(stream="yes")}, 422, "stream")
    add("stop_int", {"path": P, "body": chat(stop=5)}, 422, "stop")
    add("dlp_not_object", {"path": P, "body": chat(dlp=3)}, 422, "dlp")
    add("dlp_top_p_above_one", {"path": P, "body": chat(dlp={"top_p": 1.5})}, 422, "top_p")
    add("dlp_weighting_unknown", {"path": P, "body": chat(dlp={"weighting": "mean"})}, 422, "weighting")
    add("weights_unknown_task", {"path": P, "body": chat(dlp={"weights": {"poetry": 1}})}, 422, "poetry")
    add("weights_negative", {"path": P, "body": chat(dlp={"weights": {"arithmetic": -1}})}, 422, "arithmetic")
    add("weights_string_value", {"path": P, "body": chat(dlp={"weights": {"arithmetic": "1"}})}, 422, "arithmetic")
    add("weights_not_object", {"path": P, "body": chat(dlp={"weights": [1, 0, 0]})}, 422, "weights")
    add("oversized_body", {"path": P, "body": chat(messages=[{"role": "user", "content": "x" * 3000}])}, 413,
        "request body", server={"max_body_bytes": 2000})
    add("prompt_too_long", {"path": P, "body": chat(messages=[{"role": "user", "content": "word " * 400}])}, 400,
        "tokens", "limit of 64", server={"max_prompt_tokens": 64})
    add("missing_api_key", {"path": P, "body": chat()}, 401, "API key", server={"api_key": "sekret"})
    add("wrong_api_key", {"path": P, "body": chat(), "headers": {"Authorization": "Bearer nope"}}, 401, "API key",
        server={"api_key": "sekret"})
    add("models_missing_api_key", {"method": "GET", "path": "/v1/models"}, 401, "API key", server={"api_key": "sekret"})
    add("unknown_path", {"path": "/v1/nothing", "body": {}}, 404, "/v1/nothing")
    add("wrong_method", {"method": "GET", "path": P}, 405, P)
    C = "/v1/completions"
    add("completion_prompt_missing", {"path": C, "body": {"model": "dlp", "max_tokens": 2}}, 422, "prompt")
    add("completion_prompt_int", {"path": C, "body": {"model": "dlp", "prompt": 5}}, 422, "prompt")
    add("completion_unknown_adapter", {"path": C, "body": {"model": "dlp:poetry", "prompt": "hi"}}, 404, "poetry")
    return c


def write_case(name: str, case: dict, files: dict[str, str | bytes]) -> None:
    d = CASES / name
    d.mkdir(parents=True, exist_ok=True)
    for fname, content in files.items():
        p = d / fname
        p.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            p.write_bytes(content)
        else:
            p.write_text(content)
    (d / "case.json").write_text(json.dumps(case, indent=1) + "\n")


ARG_FILES = {
    "in.json": QA_OK,
    "empty.jsonl": "\n",
    "bad.jsonl": '{"prompt": "hi"}\n{nope\n',
    "int.jsonl": '{"prompt": 5}\n',
    "latin1.jsonl": b'{"prompt": "caf\xe9"}\n',
    "bad.json": '[{"A": "no question"}]',
    "tasks/one.json": QA_OK,
    "duptasks/a.json": '{"task": "same", "data": ' + QA_OK + "}",
    "duptasks/b.json": '{"task": "same", "data": ' + QA_OK + "}",
    "emptydir/README.txt": "no task files here\n",
    "badtasks/good.json": QA_OK,
    "badtasks/bad.json": '[{"Q": "a"}]',
}


def main() -> None:
    if CASES.exists():
        shutil.rmtree(CASES)
    n = 0
    for name, fname, content, needles in data_cases():
        write_case(f"data__{name}", {"kind": "cli", "argv": ["data", "check", "{case}/" + fname],
                                     "needles": [fname] + needles, "code": 1}, {fname: content})
        n += 1
    for name, files, setup, tail, needles in data_file_cases():
        write_case(f"data__{name}", {"kind": "cli", "argv": ["data", "check", *tail], "needles": needles, "code": 1,
                                     **setup}, files)
        n += 1
    for name, argv, needles, code, files, setup in cli_arg_cases():
        write_case(f"args__{name}", {"kind": "cli", "argv": argv, "needles": needles, "code": code, **setup}, files)
        n += 1
    for name, files, extra, needles in router_data_cases():
        write_case(f"router_data__{name}", {"kind": "cli", "argv": ["train-router", "--data", "{case}/rd", "--model",
                                                                    "{tiny}", "--out", "{tmp}/router", "--epochs", "1",
                                                                    "--no-progress", *extra],
                                            "needles": needles, "code": 1, "outputs": ["{tmp}/router"]}, files)
        n += 1
    for name, setup, needles, files in router_dir_cases():
        write_case(f"router__{name}", {"kind": "cli", "copy_run": True, **setup,
                                       "argv": GEN + ["--run", "{case}/run", "--prompt", "What is 2+2?"],
                                       "needles": needles, "code": 1}, files)
        n += 1
    for name, setup, needles, files in adapter_dir_cases():
        write_case(f"adapter__gen_{name}", {"kind": "cli", "copy_run": True, **setup,
                                            "argv": GEN + ["--adapters", "{case}/run", "--weights", "arithmetic=1",
                                                           "--prompt", "What is 2+2?"],
                                            "needles": needles, "code": 1}, files)
        write_case(f"adapter__export_{name}", {"kind": "cli", "copy_run": True, **setup,
                                               "argv": ["export-mixture", "--model", "{tiny}", "--run", "{case}/run",
                                                        "--weights", "capitals=0.5,word_sorting=0.5", "--out",
                                                        "{tmp}/mix"],
                                               "needles": needles, "code": 1, "outputs": ["{tmp}/mix"]}, files)
        n += 2
    for name, files, needles, setup in adapter_list_cases():
        write_case(f"adapters_txt__gen_{name}", {"kind": "cli", "copy_run": True, **setup,
                                                 "argv": GEN + ["--adapters", "{case}/run/adapters.txt", "--weights",
                                                                "capitals=1", "--prompt", "hi"],
                                                 "needles": needles, "code": 1}, files)
        write_case(f"adapters_txt__mrd_{name}", {"kind": "cli", "copy_run": True, **setup,
                                                 "argv": ["make-router-data", "--adapters", "{case}/run/adapters.txt",
                                                          "--out", "{tmp}/rd", "--no-progress"],
                                                 "needles": needles, "code": 1, "outputs": ["{tmp}/rd"]}, files)
        n += 2
    for name, argv, needles, code, outputs, setup, files in command_arg_cases():
        write_case(f"cmd__{name}", {"kind": "cli", "argv": argv, "needles": needles, "code": code,
                                    "outputs": outputs, **setup}, files)
        n += 1
    for name, req, status, needles, server in http_cases():
        write_case(f"http__{name}", {"kind": "http", "request": req, "status": status, "needles": needles,
                                     "server": server}, {})
        n += 1
    print(f"wrote {n} cases to {CASES}")


if __name__ == "__main__":
    main()
