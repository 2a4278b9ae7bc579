"""Q/A data reading, validation (one-line errors naming file, record and field), prompts and sentences."""

import json

import pytest

from conftest import assert_one_line_error, run_cli_subprocess
from dlp_lora.config import DLPError
from dlp_lora.data import (TaskData, QARecord, ends_sentence, format_prompt, read_task, read_task_dir,
                           split_sentences, write_task)


def _write(tmp_path, name, text, mode="w"):
    p = tmp_path / name
    if isinstance(text, bytes):
        p.write_bytes(text)
    else:
        p.write_text(text)
    return p


def test_reads_dictlist_input_output_and_jsonl(tmp_path):
    a = _write(tmp_path, "alpha.json", json.dumps([{"Q": "1+1?", "A": "2"}, {"Q": "2+2?", "A": "4"}]))
    b = _write(tmp_path, "beta.json", json.dumps([{"input": "hi", "output": "there"}]))
    c = _write(tmp_path, "gamma.jsonl", '{"Q": "x", "A": "y"}\n\n{"input": "u", "output": "v", "task": "gamma"}\n')
    ta, tb, tc = read_task(a), read_task(b), read_task(c)
    assert (ta.name, len(ta.records), ta.records[1].answer) == ("alpha", 2, "4")
    assert (tb.records[0].question, tb.records[0].answer) == ("hi", "there")
    assert [r.question for r in tc.records] == ["x", "u"]
    assert [t.name for t in read_task_dir(tmp_path)] == ["alpha", "beta", "gamma"]


def test_metadata_object_form_and_sidecar(tmp_path):
    p = _write(tmp_path, "t.json", json.dumps({"task": "mcq", "metric": "accuracy", "choices": ["A", "B"],
                                                "data": [{"Q": "pick", "A": "A"}]}))
    t = read_task(p)
    assert (t.name, t.metric, t.choices) == ("mcq", "accuracy", ["A", "B"])
    t2 = TaskData("units", [QARecord("q?", "(B)", choices=["(A) 1", "(B) 2"])], metric="accuracy")
    out = write_task(tmp_path / "sub" / "units.json", t2)
    back = read_task(out)
    assert (back.name, back.metric, back.records[0].choices) == ("units", "accuracy", ["(A) 1", "(B) 2"])
    assert json.loads(out.read_text())[0] == {"Q": "q?", "A": "(B)", "choices": ["(A) 1", "(B) 2"]}


BAD = [
    ("notjson.json", "[{'Q': 1}", "not valid JSON"),
    ("toplevel.json", '"just a string"', "expected a JSON list"),
    ("number.json", "42", "expected a JSON list"),
    ("missing.json", '[{"Q": "a", "A": "b"}, {"Q": "only"}]', "record 1: field 'A': missing"),
    ("empty_field.json", '[{"Q": "  ", "A": "b"}]', "record 0: field 'Q': is empty"),
    ("nonstring.json", '[{"Q": "a", "A": 3}]', "record 0: field 'A': must be a string"),
    ("list_field.json", '[{"Q": ["a"], "A": "b"}]', "record 0: field 'Q': must be a string"),
    ("both_styles.json", '[{"Q": "a", "A": "b", "input": "c", "output": "d"}]', "record 0: field 'Q'/'input'"),
    ("dup_key.json", '[{"Q": "a", "Q": "b", "A": "c"}]', "field 'Q': duplicate key"),
    ("empty.json", "", "file is empty"),
    ("blank.jsonl", "\n\n", "file is empty"),
    ("empty_list.json", "[]", "no records"),
    ("not_object.json", '["a", "b"]', "record 0: expected an object"),
    ("badline.jsonl", '{"Q": "a", "A": "b"}\n{oops}\n', "line 2"),
    ("badmetric.json", '{"metric": "f1", "data": [{"Q": "a", "A": "b"}]}', "field 'metric'"),
    ("nodata.json", '{"task": "x"}', "field 'data': missing"),
    ("badchoices.json", '[{"Q": "a", "A": "b", "choices": "A,B"}]', "field 'choices'"),
    ("badtask.json", '[{"Q": "a", "A": "b", "task": "has space"}]', "field 'task'"),
]


@pytest.mark.parametrize("name,text,needle", BAD, ids=[b[0] for b in BAD])
def test_bad_inputs_raise_one_line_errors(tmp_path, name, text, needle):
    p = _write(tmp_path, name, text)
    with pytest.raises(DLPError) as e:
        read_task(p)
    msg = str(e.value)
    assert "\n" not in msg and str(p) in msg and needle in msg, msg


def test_non_utf8_and_unreadable(tmp_path):
    p = _write(tmp_path, "latin.json", '[{"Q": "caf\xe9", "A": "b"}]'.encode("latin-1"))
    with pytest.raises(DLPError, match="not UTF-8"):
        read_task(p)
    with pytest.raises(DLPError, match="file not found"):
        read_task(tmp_path / "nope.json")
    with pytest.raises(DLPError, match="is a folder"):
        read_task(tmp_path)


@pytest.mark.parametrize("name,text,needle", [BAD[0], BAD[3], BAD[8], BAD[9]], ids=["json", "missing", "dup", "empty"])
def test_cli_data_check_bad_input_one_line(tmp_path, cli, name, text, needle):
    p = _write(tmp_path, name, text)
    res = cli("data", "check", p)
    assert_one_line_error(res, str(p), needle)


def test_cli_data_check_subprocess_no_traceback(tmp_path):
    good = _write(tmp_path, "good.json", '[{"Q": "a", "A": "b"}]')
    res = run_cli_subprocess("data", "check", good)
    assert res.code == 0 and "records=1" in res.out
    bad = _write(tmp_path, "bad.json", b"\xff\xfe\x00garbage")
    res = run_cli_subprocess("data", "check", bad)
    assert_one_line_error(res, str(bad))


def test_format_prompt_uses_chat_template_or_plain(tiny):
    _, tok = tiny
    s = format_prompt(tok, "What is 2+3?")
    assert "What is 2+3?" in s and s.endswith("assistant\n")

    class Plain:
        chat_template = None

    assert format_prompt(Plain(), "Q?") == "Question: Q?\nAnswer: "


def test_sentence_splitting_is_deterministic():
    assert split_sentences('Hello there. How are you?\nI am fine! "Yes." Ok 3.5 is fine') == [
        "Hello there.", "How are you?", "I am fine!", '"Yes."', "Ok 3.5 is fine"]
    assert split_sentences("no end") == ["no end"]
    assert split_sentences("   ") == []
    assert ends_sentence("Done. ") and ends_sentence("line\n") and not ends_sentence("3.5") and not ends_sentence("x.")
