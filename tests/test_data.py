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


# The one file reader (config.read_text_file / read_json_file) and what every stage gets from it.

def test_only_regular_files_are_read(tmp_path, cli):
    import os

    os.mkfifo(tmp_path / "pipe.json")          # opening a FIFO without a writer would block forever
    (tmp_path / "zero.json").symlink_to("/dev/zero")   # and /dev/zero never ends
    for name, kind in (("pipe.json", "a FIFO"), ("zero.json", "a character device")):
        with pytest.raises(DLPError, match=f"not a regular file \\({kind}\\)"):
            read_task(tmp_path / name)
    assert_one_line_error(cli("data", "check", tmp_path), "pipe.json", "not a regular file")
    good = _write(tmp_path, "good.json", '[{"Q": "a", "A": "b"}]')
    (tmp_path / "link.json").symlink_to(good)  # a symlink to a regular file is an ordinary input
    assert read_task(tmp_path / "link.json").records[0].answer == "b"


def test_size_limit_is_named_and_overridable(tmp_path, monkeypatch):
    from dlp_lora.config import MAX_FILE_BYTES, max_file_bytes

    p = _write(tmp_path, "t.json", '[{"Q": "a", "A": "b"}]')
    assert max_file_bytes() == MAX_FILE_BYTES == 256 * 1024 * 1024
    monkeypatch.setenv("DLP_LORA_MAX_FILE_BYTES", "10")
    with pytest.raises(DLPError, match=r"t.json: file is 22 bytes, over the 10-byte limit .*DLP_LORA_MAX_FILE_BYTES"):
        read_task(p)
    monkeypatch.setenv("DLP_LORA_MAX_FILE_BYTES", "22")
    assert len(read_task(p).records) == 1
    monkeypatch.setenv("DLP_LORA_MAX_FILE_BYTES", "lots")
    with pytest.raises(DLPError, match="DLP_LORA_MAX_FILE_BYTES: must be a whole number"):
        read_task(p)


@pytest.mark.parametrize("name,text,needles", [
    ("deep.json", "[" * 100_000 + "]" * 100_000, ["deep.json", "nested too deeply"]),
    ("deep.jsonl", '{"Q": ' + "[" * 100_000 + "]" * 100_000 + "}\n", ["deep.jsonl", "line 1", "nested too deeply"]),
    ("huge.json", '[{"Q": "a", "A": "b", "n": 1' + "0" * 5000 + "}]", ["huge.json", "more than 4300 digits"]),
    ("lone.json", '[{"Q": "a", "A": "b"}, {"Q": "x\\ud800y", "A": "b"}]', ["lone.json", "record 1: field 'Q'", "unpaired surrogate"]),
    ("lone.jsonl", '{"Q": "a", "A": "\\udfff"}\n', ["lone.jsonl", "line 1: field 'A'", "unpaired surrogate"]),
    ("lonekey.json", '[{"Q": "a", "A": "b", "\\ud800": 1}]', ["lonekey.json", "record 0: field", "unpaired surrogate"]),
    ("lonemeta.json", '{"task": "t", "metric": "exact", "note": "\\ud800", "data": [{"Q": "a", "A": "b"}]}',
     ["lonemeta.json", "field 'note'", "unpaired surrogate"]),
])
def test_json_that_python_cannot_hold_is_a_named_error(tmp_path, cli, name, text, needles):
    p = _write(tmp_path, name, text)
    with pytest.raises(DLPError) as e:
        read_task(p)
    assert "\n" not in str(e.value) and all(n in str(e.value) for n in needles), e.value
    assert_one_line_error(cli("data", "check", p), *needles)


def test_paired_surrogates_bom_and_long_names(tmp_path, cli):
    p = _write(tmp_path, "emoji.json", '[{"Q": "\\ud83d\\ude00?", "A": "b"}]')   # a valid pair is one character
    assert read_task(p).records[0].question == "\U0001F600?"
    p = _write(tmp_path, "bom.json", b'\xef\xbb\xbf[{"Q": "a", "A": "b"}]')
    assert read_task(p).records[0].question == "a"
    long = tmp_path / ("x" * 300 + ".json")                    # longer than any file system allows (255)
    with pytest.raises(DLPError, match="cannot read \\(File name too long\\)"):
        read_task(long)
    assert_one_line_error(cli("data", "check", long), "File name too long")


def test_write_task_never_replaces_without_overwrite(tmp_path):
    t = TaskData("units", [QARecord("q?", "a")], metric="exact")
    out = write_task(tmp_path / "units.json", t)
    before = out.read_bytes(), (tmp_path / "units.meta.json").read_bytes()
    t2 = TaskData("units", [QARecord("other?", "b")], metric="exact")
    with pytest.raises(DLPError, match="units.json: already exists .*--overwrite"):
        write_task(out, t2)
    (tmp_path / "solo.meta.json").write_text("{}")  # an existing sidecar alone is also kept
    with pytest.raises(DLPError, match="solo.meta.json: already exists"):
        write_task(tmp_path / "solo.json", t2)
    assert not (tmp_path / "solo.json").exists()
    assert (out.read_bytes(), (tmp_path / "units.meta.json").read_bytes()) == before
    write_task(out, t2, overwrite=True)
    assert read_task(out).records[0].question == "other?"
    with pytest.raises(DLPError, match="would overwrite an input"):
        write_task(out, t2, overwrite=True, inputs=[out])
    with pytest.raises(DLPError, match="file-system root"):
        write_task("/units.json", t2)
