"""Built-in task suite (determinism, answers recomputed independently, distinct enough to route) and the
raw-format converters (tiny hand-written fixtures; the shared data only when it exists, a few records)."""

import collections
import datetime
import json
import math
import re
import shutil
from pathlib import Path

import pytest

from conftest import SHARED_DATA, assert_one_line_error
from dlp_lora.config import DLPError
from dlp_lora.data import METRICS, TASK_NAME_RE, read_task, read_task_dir
from dlp_lora.tasks import (BUILTIN_TASKS, FORMATS, convert, convert_shared_suite, generate_task, load_raw,
                            task_info, write_builtin_tasks)

RAW = Path(__file__).parent / "fixtures" / "raw"
N = 300


@pytest.fixture(scope="module")
def suite():
    return {name: generate_task(name, N, seed=0) for name in BUILTIN_TASKS}


# ----------------------------------------------------------------------------------------------------------------
# Built-in suite
# ----------------------------------------------------------------------------------------------------------------

def test_suite_size_forms_and_metrics(suite):
    assert len(BUILTIN_TASKS) >= 6
    forms = {task_info(n)["form"] for n in BUILTIN_TASKS}
    assert forms == {"mcq", "free"}
    for name, t in suite.items():
        assert TASK_NAME_RE.match(name)
        assert t.name == name and t.metric in METRICS and len(t.records) == N
        assert all(r.task == name and r.question.strip() and r.answer.strip() for r in t.records)
        # MCQ <=> accuracy <=> per-record choices
        assert (t.metric == "accuracy") == (task_info(name)["form"] == "mcq") == all(r.choices for r in t.records)
        # unique questions (router data must not leak a question between splits)
        assert len({r.question for r in t.records}) == N, name
        # answers are short (a tiny LoRA must learn them); several different answers (not a constant)
        assert max(len(r.answer.split()) for r in t.records) <= 5, name
        assert len({r.answer for r in t.records}) >= 2, name
    assert BUILTIN_TASKS["counting"](5, seed=1).records == generate_task("counting", 5, 1).records


def test_questions_are_short_in_tokens(suite, tiny_model_path):
    from dlp_lora.models import load_tokenizer

    tok = load_tokenizer(tiny_model_path)
    for name, t in suite.items():
        longest = max(len(tok(r.question)["input_ids"]) for r in t.records[:100])
        assert longest <= 60, (name, longest)


def test_deterministic_and_seed_dependent(tmp_path):
    a = write_builtin_tasks(tmp_path / "a", n=40, seed=7)
    b = write_builtin_tasks(tmp_path / "b", n=40, seed=7)
    c = write_builtin_tasks(tmp_path / "c", n=40, seed=8)
    assert [p.name for p in a] == [f"{n}.json" for n in BUILTIN_TASKS]
    for pa, pb, pc in zip(a, b, c):
        assert pa.read_bytes() == pb.read_bytes()
        assert pa.with_name(pa.stem + ".meta.json").read_bytes() == pb.with_name(pb.stem + ".meta.json").read_bytes()
        assert pa.read_bytes() != pc.read_bytes()
    # a prefix does not depend on n; a task does not depend on which others are generated
    assert generate_task("capitals", 10, 7).records == generate_task("capitals", 40, 7).records[:10]
    only = write_builtin_tasks(tmp_path / "d", n=40, seed=7, tasks="word_sorting, arithmetic")
    assert [p.name for p in only] == ["word_sorting.json", "arithmetic.json"]
    assert only[1].read_bytes() == (tmp_path / "a" / "arithmetic.json").read_bytes()


def test_files_read_back_with_metric_and_choices(tmp_path):
    write_builtin_tasks(tmp_path, n=12, seed=1)
    tasks = {t.name: t for t in read_task_dir(tmp_path)}
    assert set(tasks) == set(BUILTIN_TASKS)
    for name, t in tasks.items():
        assert t.metric == task_info(name)["metric"]
        assert [r.question for r in t.records] == [r.question for r in generate_task(name, 12, 1).records]
    assert tasks["unit_conversion"].records[0].choices[0].startswith("(A) ")


def test_small_space_still_gives_any_size():
    t = generate_task("date_arithmetic", 3000, seed=0)      # more than the task's ~1000 distinct questions
    assert len(t.records) == 3000
    assert len({r.question for r in t.records}) > 800


def _mcq_check(r):
    letters = [c[:3] for c in r.choices]
    assert letters == [f"({x})" for x in "ABCD"][: len(letters)] and len(letters) == 4
    assert r.answer in letters
    assert r.question.endswith("Options:\n" + "\n".join(r.choices))
    texts = [c[4:] for c in r.choices]
    assert len(set(texts)) == len(texts)
    return texts[letters.index(r.answer)]


def test_arithmetic_answers(suite):
    ops = collections.Counter()
    for r in suite["arithmetic"].records:
        nums = [int(x) for x in re.findall(r"\d+", r.question)]
        if "more." in r.question:
            want, ops["+"] = nums[0] + nums[1], ops["+"] + 1
        elif "gave" in r.question:
            want, ops["-"] = nums[0] - nums[1], ops["-"] + 1
        elif "in each box" in r.question:
            want, ops["*"] = nums[0] * nums[1], ops["*"] + 1
        else:
            assert "equally among" in r.question
            assert nums[0] % nums[1] == 0
            want, ops["/"] = nums[0] // nums[1], ops["/"] + 1
        assert r.answer == str(want), r
    assert set(ops) == set("+-*/")


def test_unit_conversion_answers(suite):
    factor = {("kilometers", "meters"): 1000, ("meters", "centimeters"): 100, ("kilograms", "grams"): 1000,
              ("liters", "milliliters"): 1000, ("hours", "minutes"): 60, ("minutes", "seconds"): 60,
              ("days", "hours"): 24, ("weeks", "days"): 7, ("feet", "inches"): 12, ("yards", "feet"): 3,
              ("centimeters", "millimeters"): 10, ("years", "months"): 12}
    for r in suite["unit_conversion"].records:
        m = re.match(r"Convert (\d+) (\w+) to (\w+)\.", r.question)
        v, a, b = int(m.group(1)), m.group(2), m.group(3)
        want = v * factor[(a, b)] if (a, b) in factor else v / factor[(b, a)]
        assert float(_mcq_check(r)) == want, r
    assert len({r.answer for r in suite["unit_conversion"].records}) == 4      # the right letter moves


def test_capitals_answers(suite):
    known = {"France": "Paris", "Japan": "Tokyo", "Egypt": "Cairo", "Canada": "Ottawa", "Australia": "Canberra",
             "Kenya": "Nairobi", "Peru": "Lima", "Norway": "Oslo"}
    checked = 0
    for r in suite["capitals"].records:
        city = _mcq_check(r)
        country = re.search(r"capital(?: city)? of ([A-Z][\w ]+?)[?.]\n", r.question).group(1)
        if country in known:
            assert city == known[country], r
            checked += 1
    assert checked > 10


def test_boolean_answers_by_eval(suite):
    answers = collections.Counter()
    for r in suite["boolean_logic"].records:
        expr = r.question.split(": ", 1)[1]
        assert set(expr.split()) <= {"True", "False", "and", "or", "not", "(", ")"}
        assert str(eval(expr, {"__builtins__": {}}, {})) == r.answer, r  # noqa: S307 - tokens checked above
        answers[r.answer] += 1
    assert abs(answers["True"] - answers["False"]) < N * 0.2


def test_date_arithmetic_answers(suite):
    monday = datetime.date(2024, 1, 1)                    # a Monday
    days = {(monday + datetime.timedelta(i)).strftime("%A"): i for i in range(7)}
    months = [datetime.date(2024, m, 1).strftime("%B") for m in range(1, 13)]
    for r in suite["date_arithmetic"].records:
        k = int(re.search(r"(\d+) (?:days|months)", r.question).group(1))
        sign = -1 if ("ago" in r.question or "before" in r.question) else 1
        if "month" in r.question:
            m = next(x for x in months if x in r.question)
            total = months.index(m) + sign * k                 # 0-based month index, may leave the year
            want = datetime.date(2024 + math.floor(total / 12), total % 12 + 1, 1).strftime("%B")
        else:
            d = next(x for x in days if x in r.question)
            want = (monday + datetime.timedelta(days[d] + sign * k)).strftime("%A")
        assert r.answer == want, r


def test_counting_sorting_reversal_answers(suite):
    for r in suite["counting"].records:
        items = r.question.split(": ", 1)[1].rstrip("?").split(", ")
        assert r.answer == str(len(items)) and len(set(items)) == len(items)
    for r in suite["word_sorting"].records:
        words = r.question.split(": ", 1)[1].split()
        assert r.answer.split() == sorted(words)
    for r in suite["word_reversal"].records:
        words = r.question.split(": ", 1)[1].split()
        assert r.answer.split() == words[::-1]


def _bag(text):
    return collections.Counter(re.findall(r"[a-z]+", text.lower()))


def test_tasks_are_distinct_for_a_bag_of_words_router():
    """A nearest-centroid classifier on word counts, trained on seed 0 and tested on seed 1, separates the tasks:
    the router (a far stronger model) has a learnable problem."""
    def unit(c):
        norm = math.sqrt(sum(v * v for v in c.values()))
        return {k: v / norm for k, v in c.items()}

    centroids = {}
    for name in BUILTIN_TASKS:
        total = collections.Counter()
        for r in generate_task(name, 200, seed=0).records:
            total.update(unit(_bag(r.question)))
        centroids[name] = unit(total)
    right = wrong = 0
    for name in BUILTIN_TASKS:
        for r in generate_task(name, 100, seed=1).records:
            v = unit(_bag(r.question))
            guess = max(centroids, key=lambda t: sum(w * centroids[t].get(k, 0.0) for k, w in v.items()))
            right, wrong = right + (guess == name), wrong + (guess != name)
    assert right / (right + wrong) >= 0.98


def test_builtin_bad_arguments(tmp_path):
    with pytest.raises(DLPError, match="unknown built-in task 'nope'.*arithmetic"):
        write_builtin_tasks(tmp_path / "x", n=5, tasks="arithmetic,nope")
    with pytest.raises(DLPError, match="n \\(records per task\\)"):
        write_builtin_tasks(tmp_path / "x", n=0)
    with pytest.raises(DLPError, match="no task names"):
        write_builtin_tasks(tmp_path / "x", n=5, tasks=" , ")
    with pytest.raises(DLPError, match="unknown built-in task"):
        generate_task("gsm8k", 5)
    assert not (tmp_path / "x").exists()                  # nothing written on a bad argument


def test_cli_builtin(cli, tmp_path):
    res = cli("data", "builtin", "--out", tmp_path / "b", "--n", "15", "--seed", "2", "--tasks", "capitals,counting")
    assert res.code == 0, res
    paths = res.out.split()
    assert [Path(p).name for p in paths] == ["capitals.json", "counting.json"]
    assert len(json.loads(Path(paths[0]).read_text())) == 15
    res = cli("data", "check", *paths)
    assert res.code == 0 and "metric=accuracy" in res.out and "metric=exact" in res.out, res


def test_cli_builtin_errors(cli, tmp_path):
    assert_one_line_error(cli("data", "builtin", "--out", tmp_path, "--tasks", "bogus"), "bogus", "word_sorting")
    assert_one_line_error(cli("data", "builtin", "--out", tmp_path, "--n", "0"), "--n", "[1, 1000000]", code=2)
    assert not list(tmp_path.iterdir())


# ----------------------------------------------------------------------------------------------------------------
# Converters (hand-written fixtures)
# ----------------------------------------------------------------------------------------------------------------

def test_convert_gsm8k(tmp_path):
    t = convert("gsm8k", RAW / "gsm8k.jsonl", tmp_path / "g.json")
    assert (t.name, t.metric) == ("gsm8k", "gsm8k_number")
    assert [r.answer for r in t.records] == ["12", "1200", "-2.5"]      # '#### 1,200' -> 1200
    assert t.records[0].question.startswith("Lena has 5 red pens")
    back = read_task(tmp_path / "g.json")
    assert (back.name, back.metric, len(back.records)) == ("gsm8k", "gsm8k_number", 3)
    assert len(convert("gsm8k", RAW / "gsm8k.jsonl", tmp_path / "g2.json", task="math", limit=2).records) == 2
    assert read_task(tmp_path / "g2.json").name == "math"


def test_convert_strategyqa(tmp_path):
    t = convert("strategyqa", RAW / "strategyqa.json", tmp_path / "s.json")
    assert (t.name, t.metric) == ("strategyqa", "exact")
    assert [r.answer for r in t.records] == ["No", "Yes", "Yes"]
    both = load_raw("strategyqa", [RAW / "strategyqa.json", RAW / "strategyqa.json"])
    assert len(both.records) == 6


def test_convert_bbh_mcq_and_free(tmp_path, caplog):
    t = convert("bbh", RAW / "bbh_tasks" / "date_understanding.json", tmp_path)    # a folder: <task>.json
    assert re.search(r"examples\[2\]: field 'target': 'Monsters, Inc'.*skipped", caplog.text)
    assert (t.name, t.metric, t.path) == ("date_understanding", "accuracy", str(tmp_path / "date_understanding.json"))
    assert [r.answer for r in t.records] == ["(A)", "(B)", "(B)"]       # last: target given as option text
    assert t.records[1].choices == ["(A) 12/30/1999", "(B) 01/01/2000", "(C) 01/01/1999", "(D) 12/31/2000"]
    assert t.records[0].question.endswith("(C) 03/01/2021")
    back = read_task(tmp_path / "date_understanding.json")
    assert back.metric == "accuracy" and back.records[1].choices == t.records[1].choices
    w = convert("bbh", RAW / "bbh_tasks" / "web_of_lies.json", tmp_path / "wol.json")
    assert (w.name, w.metric, [r.answer for r in w.records]) == ("web_of_lies", "exact", ["No", "Yes", "Yes"])
    assert all(r.choices is None for r in w.records)


def test_convert_bigbench(tmp_path, caplog):
    a = convert("bigbench", RAW / "bigbench" / "abstract_narrative_understanding.jsonl", tmp_path / "a.json")
    assert (a.name, a.metric) == ("abstract_narrative_understanding", "accuracy")
    assert [r.answer for r in a.records] == ["(B)", "(A)"]      # "B. text" and a bare option text
    r = a.records[0]
    assert r.choices == ["(A) Look before you leap", "(B) Many a little makes a mickle",
                         "(C) The early bird catches the worm"]
    assert r.question.startswith("Mia kept saving") and "Which proverb" in r.question
    assert r.question.endswith("\n".join(r.choices))
    d = convert("bigbench", RAW / "bigbench" / "disfl_qa.jsonl", tmp_path / "d.json")
    assert re.search(r"record 2 .*field 'answer': is empty", caplog.text)
    assert (d.name, d.metric, len(d.records)) == ("disfl_qa", "contains", 2)
    assert d.records[0].question.startswith("Passage: The Nile")
    assert "\nQuestion: Where does the Amazon no I mean the Nile" in d.records[0].question
    assert d.records[0].answer == "the Mediterranean Sea"


def test_cli_convert(cli, tmp_path):
    out = tmp_path / "wol.json"
    res = cli("data", "convert", "--format", "bbh", "--limit", "2", RAW / "bbh_tasks" / "web_of_lies.json", out)
    assert res.code == 0, res
    assert "task=web_of_lies records=2 metric=exact" in res.out
    assert read_task(out).metric == "exact"
    res = cli("data", "convert", "--format", "gsm8k", "--task", "grade_math", RAW / "gsm8k.jsonl", tmp_path / "g.json")
    assert res.code == 0 and "task=grade_math records=3 metric=gsm8k_number" in res.out, res
    res = cli("data", "convert", "--format", "bigbench", RAW / "bigbench" / "disfl_qa.jsonl", f"{tmp_path / 'new'}/")
    assert res.code == 0, res                      # a folder path (trailing /) -> <folder>/<task>.json
    assert res.out.startswith(f"{tmp_path / 'new' / 'disfl_qa.json'}: task=disfl_qa records=2 metric=contains")


def _raw(tmp_path, name, text):
    p = tmp_path / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)
    return p


@pytest.mark.parametrize("fmt,name,text,needles", [
    ("bbh", "gs.jsonl", (RAW / "gsm8k.jsonl").read_text(), ["gs.jsonl", "not valid JSON", "--format bbh"]),
    ("strategyqa", "g.jsonl", (RAW / "gsm8k.jsonl").read_text(), ["g.jsonl", "record 0", "'answer'", "bool"]),
    ("gsm8k", "s.json", (RAW / "strategyqa.json").read_text(), ["s.json", "record 0", "'answer'", "string"]),
    ("gsm8k", "m.jsonl", '{"question": "a?", "answer": "#### 1"}\n{"question": "b?"}\n',
     ["m.jsonl", "record 1 (line 2)", "'answer'", "missing"]),
    ("gsm8k", "h.jsonl", '{"question": "a?", "answer": "it is 4"}\n', ["h.jsonl", "record 0", "'answer'", "####"]),
    ("gsm8k", "j.jsonl", '{"question": "a?", "answer": "#### 1"}\n{"question": \n', ["j.jsonl", "line 2", "JSON"]),
    ("gsm8k", "e.jsonl", '{"question": " ", "answer": "#### 1"}\n', ["e.jsonl", "record 0", "'question'", "empty"]),
    ("gsm8k", "l.jsonl", '[1, 2]', ["l.jsonl", "record 0", "expected a JSON object"]),
    ("bbh", "x.json", '{"canary": "c"}', ["x.json", "'examples'", "missing"]),
    ("bbh", "y.json", '{"examples": [{"input": "Pick\\nOptions:\\n(A) a\\n(B) b", "target": "(C)"}]}',
     ["y.json", "examples[0]", "'target'", "(C)"]),
    ("bbh", "z.json", '{"examples": [{"input": "2+2", "target": 4}]}', ["z.json", "examples[0]", "'target'"]),
    ("bbh", "w.json", '{"examples": [{"input": "Pick\\nOptions:\\n(A) a\\n(B) b", "target": "(A)"}, '
                      '{"input": "2+2", "target": "4"}]}', ["w.json", "examples[1]", "'target'", "mixes"]),
    ("bigbench", "o.jsonl", '{"question": "story", "options": "A. one\\nB. two", "answer": "C. three"}\n',
     ["o.jsonl", "record 0", "'answer'", "none of the options"]),
    ("bigbench", "p.jsonl", '{"passage": "P", "question": "Q?", "answer": "a"}\n{"question": "s", "options": "A. x\\nB. y", '
                            '"answer": "A. x"}\n', ["p.jsonl", "record 1", "'options'"]),
    ("nope", "n.json", "[]", ["--format", "nope", "gsm8k"]),
    ("bbh", "bad name.json", '{"examples": [{"input": "2+2", "target": "4"}]}', ["bad name", "--task"]),
])
def test_convert_bad_input_one_line(cli, tmp_path, fmt, name, text, needles):
    src = _raw(tmp_path, name, text)
    out = tmp_path / "out" / "o.json"
    with pytest.raises(DLPError) as e:
        convert(fmt, src, out)
    assert "\n" not in str(e.value)
    assert_one_line_error(cli("data", "convert", "--format", fmt, src, out), *needles)
    assert not out.exists() and not (tmp_path / "out").exists()


def test_convert_bad_paths_and_options(cli, tmp_path):
    assert_one_line_error(cli("data", "convert", "--format", "gsm8k", tmp_path / "missing.jsonl", tmp_path / "o.json"),
                          "missing.jsonl", "not found")
    assert_one_line_error(cli("data", "convert", "--format", "gsm8k", RAW / "gsm8k.jsonl", tmp_path / "o.jsonl"),
                          "o.jsonl", ".json")
    assert_one_line_error(cli("data", "convert", "--format", "gsm8k", "--limit", "0", RAW / "gsm8k.jsonl",
                              tmp_path / "o.json"), "--limit")
    src = _raw(tmp_path, "same.json", (RAW / "strategyqa.json").read_text())
    assert_one_line_error(cli("data", "convert", "--format", "strategyqa", src, src), "same.json", "overwrite")
    assert src.read_text() == (RAW / "strategyqa.json").read_text()


def _fake_shared(root):
    for sub, names in (("gsm8k", ["train.jsonl", "test.jsonl"]), ("strategyqa", ["train.json", "dev.json"])):
        (root / sub).mkdir(parents=True)
        for n in names:
            shutil.copy(RAW / ("gsm8k.jsonl" if sub == "gsm8k" else "strategyqa.json"), root / sub / n)
    shutil.copytree(RAW / "bbh_tasks", root / "bbh")
    shutil.copytree(RAW / "bigbench", root / "bigbench")
    (root / "bbh" / "LICENSE").write_text("not a task")
    return root


def test_convert_shared_suite_on_fixture_layout(tmp_path):
    shared = _fake_shared(tmp_path / "shared")
    paths = convert_shared_suite(shared, tmp_path / "out", limit=2, progress=False)
    tasks = {t.name: t for t in read_task_dir(tmp_path / "out")}
    assert sorted(p.name for p in paths) == sorted(f"{n}.json" for n in tasks)
    assert set(tasks) == {"gsm8k", "strategyqa", "date_understanding", "web_of_lies",
                          "abstract_narrative_understanding", "disfl_qa"}
    assert all(len(t.records) == 2 for t in tasks.values())
    full = load_raw("gsm8k", [shared / "gsm8k" / "train.jsonl", shared / "gsm8k" / "test.jsonl"])
    assert len(full.records) == 6                                   # train then test, one task
    (shared / "strategyqa" / "dev.json").unlink()
    with pytest.raises(DLPError, match="dev.json: file not found"):
        convert_shared_suite(shared, tmp_path / "out2")
    assert not (tmp_path / "out2").exists()


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data not present")
def test_convert_real_shared_suite_few_records(tmp_path, caplog):
    paths = convert_shared_suite(SHARED_DATA, tmp_path, limit=3, progress=False)
    assert caplog.text.count("record skipped") == 3         # upstream BBH records whose option was split
    assert len(paths) == 21
    tasks = {t.name: t for t in read_task_dir(tmp_path)}
    assert len(tasks) == 21 and all(len(t.records) == 3 for t in tasks.values())
    expect = {"gsm8k": "gsm8k_number", "strategyqa": "exact", "boolean_expressions": "exact",
              "date_understanding": "accuracy", "navigate": "exact", "object_counting": "exact",
              "abstract_narrative_understanding": "accuracy", "disfl_qa": "contains", "snarks": "accuracy"}
    for name, metric in expect.items():
        assert tasks[name].metric == metric, name
    for t in tasks.values():
        for r in t.records:
            if t.metric == "accuracy":
                assert r.answer in [c[:3] for c in r.choices], (t.name, r)
    assert re.fullmatch(r"-?\d+", tasks["gsm8k"].records[0].answer)
    assert {r.answer for r in tasks["strategyqa"].records} <= {"Yes", "No"}


def _snapshot(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_cli_builtin_never_loses_data(cli, tmp_path):
    out = tmp_path / "tasks"
    assert cli("data", "builtin", "--out", out, "--n", "5", "--tasks", "counting,capitals").code == 0
    first = _snapshot(out)
    # second run onto the same output, other content, no --overwrite: refused in one line, bytes unchanged
    assert_one_line_error(cli("data", "builtin", "--out", out, "--n", "7", "--seed", "3", "--tasks",
                              "word_sorting,capitals"), "capitals.json", "already exists", "--overwrite")
    assert _snapshot(out) == first                         # word_sorting (checked first, new) was not written
    res = cli("data", "builtin", "--out", out, "--n", "7", "--tasks", "counting,capitals", "--overwrite")
    assert res.code == 0, res
    assert len(read_task(out / "capitals.json").records) == 7
    assert_one_line_error(cli("data", "builtin", "--out", "/", "--n", "2", "--tasks", "counting"),
                          "file-system root")
    with pytest.raises(DLPError, match="already exists"):
        write_builtin_tasks(out, n=7, tasks="counting")


def test_cli_convert_never_loses_data(cli, tmp_path):
    src = RAW / "gsm8k.jsonl"
    out = tmp_path / "g.json"
    assert cli("data", "convert", "--format", "gsm8k", src, out).code == 0
    first = _snapshot(tmp_path)
    assert_one_line_error(cli("data", "convert", "--format", "gsm8k", "--limit", "1", src, out),
                          "g.json", "already exists", "--overwrite")
    assert _snapshot(tmp_path) == first
    assert cli("data", "convert", "--format", "gsm8k", src, f"{tmp_path}/").code == 0   # -> <folder>/gsm8k.json
    first = _snapshot(tmp_path)
    assert_one_line_error(cli("data", "convert", "--format", "gsm8k", "--limit", "1", src, f"{tmp_path}/"),
                          "gsm8k.json", "already exists")
    assert _snapshot(tmp_path) == first
    assert cli("data", "convert", "--format", "gsm8k", "--limit", "1", src, out, "--overwrite").code == 0
    assert len(read_task(out).records) == 1
    raw = tmp_path / "raw.json"
    raw.write_bytes((RAW / "strategyqa.json").read_bytes())
    (tmp_path / "raw.meta.json").write_bytes(raw.read_bytes())
    for source in (raw, tmp_path / "raw.meta.json"):    # neither the output nor its sidecar may be the input
        res = cli("data", "convert", "--format", "strategyqa", source, raw, "--overwrite")
        assert_one_line_error(res, "would overwrite an input", source.name)
    assert raw.read_bytes() == (RAW / "strategyqa.json").read_bytes()
    assert_one_line_error(cli("data", "convert", "--format", "gsm8k", src, "/"), "file-system root")


def test_convert_shared_suite_never_loses_data(tmp_path):
    shared = _fake_shared(tmp_path / "shared")
    out = tmp_path / "out"
    out.mkdir()
    (out / "navigate.json").write_text("mine")      # not a task of the fixture layout: untouched
    (out / "web_of_lies.json").write_text("mine too")
    with pytest.raises(DLPError, match="web_of_lies.json: already exists"):
        convert_shared_suite(shared, out, limit=1, progress=False)
    assert _snapshot(out) == {"navigate.json": b"mine", "web_of_lies.json": b"mine too"}
    assert len(convert_shared_suite(shared, out, limit=1, progress=False, overwrite=True)) == 6
    assert (out / "navigate.json").read_text() == "mine"


def test_formats_listed():
    assert FORMATS == ("gsm8k", "strategyqa", "bbh", "bigbench")
