"""Build the bad-input corpus: one folder per case under cases/, each with its input files and case.json.

Run ``python tests/bad_inputs/build_corpus.py`` after adding cases; the folders are committed so a reader sees
every case as a file. case.json:

    {"argv": [...], "needles": [...], "code": 1, "kind": "cli" | "http", "outputs": [...]}

argv placeholders: {case} (a private copy of the case folder), {tmp} (an empty folder), {tiny} (tiny model),
{run} (a tiny trained run: adapters.txt, adapters/, router/). ``outputs`` must not exist afterwards.
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


def cli_arg_cases():
    """(name, argv, needles, code) for argument errors (argparse: exit 2, one line)."""
    c = []
    add = lambda n, argv, *nd, code=2: c.append((n, argv, list(nd), code))
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


def main() -> None:
    if CASES.exists():
        shutil.rmtree(CASES)
    n = 0
    for name, fname, content, needles in data_cases():
        write_case(f"data__{name}", {"kind": "cli", "argv": ["data", "check", "{case}/" + fname],
                                     "needles": [fname] + needles, "code": 1}, {fname: content})
        n += 1
    for name, argv, needles, code in cli_arg_cases():
        write_case(f"args__{name}", {"kind": "cli", "argv": argv, "needles": needles, "code": code},
                   {"in.json": QA_OK})
        n += 1
    print(f"wrote {n} cases to {CASES}")


if __name__ == "__main__":
    main()
