"""Metric functions of dlp_lora.metrics against hand-computed examples (answer extraction edge cases included)."""

from __future__ import annotations

import math

import pytest

from dlp_lora.config import DLPError
from dlp_lora.metrics import bleu, extract_choice, gsm8k_number, is_correct, normalize, rouge, score, task_scores

LABELLED = ["(A) red", "(B) blue", "(C) green"]
PLAIN = ["red", "blue", "green"]


# ---------------------------------------------------------------------------------------------------------------
# extract_choice
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("choices", [LABELLED, PLAIN])
@pytest.mark.parametrize("text", ["(B)", "B", "B.", "B)", "The answer is (B).", "answer: b", "Answer: B",
                                  "the answer is b.", "blue", "Blue.", "The answer is blue", "b", "(b)",
                                  "  (B) blue\n", "So the answer is option B because it is blue"])
def test_extract_choice_forms_of_b(text, choices):
    assert extract_choice(text, choices) == choices[1]


def test_extract_choice_first_explicit_answer_wins():
    # an answer cue beats earlier mentions of other options
    assert extract_choice("Let us compare (A) and (C). The answer is (B).", LABELLED) == LABELLED[1]
    # the first cue that names an option wins over a later one
    assert extract_choice("Answer: (C). Some say the answer is (A).", LABELLED) == LABELLED[2]
    # without a cue the earliest mention wins
    assert extract_choice("(C), or maybe (A)", LABELLED) == LABELLED[2]
    assert extract_choice("green, not blue", PLAIN) == "green"
    # a cue followed by an article is not read as option "a"; the later letter is
    assert extract_choice("answer is a tricky one: (C)", LABELLED) == LABELLED[2]


def test_extract_choice_no_answer_and_out_of_range():
    assert extract_choice("I do not know", LABELLED) is None
    assert extract_choice("", LABELLED) is None
    assert extract_choice("(D)", LABELLED) is None          # D is not an option
    assert extract_choice("D.", LABELLED) is None
    assert extract_choice("A cat sat on a mat", PLAIN) is None  # articles are not letters
    assert extract_choice("anything", []) is None


def test_extract_choice_longest_option_and_word_bounds():
    assert extract_choice("invalid", ["valid", "invalid"]) == "invalid"
    assert extract_choice("It is valid.", ["valid", "invalid"]) == "valid"
    assert extract_choice("Not plausible", ["plausible", "not plausible"]) == "not plausible"
    assert extract_choice("redder", PLAIN) is None           # whole words only
    assert extract_choice("False", ["True", "False"]) == "False"
    assert extract_choice("Answer: True", ["True", "False"]) == "True"
    assert extract_choice("Yes, the answer is No.", ["Yes", "No"]) == "No"  # the cue wins over the earlier "Yes"


def test_extract_choice_uses_the_options_own_labels():
    # options labelled out of positional order: the labels are what the model writes
    ch = ["(B) blue", "(A) red"]
    assert extract_choice("(A)", ch) == "(A) red"
    assert extract_choice("A.", ["A. one", "B. two"]) == "A. one"


# ---------------------------------------------------------------------------------------------------------------
# score: accuracy / exact / contains / gsm8k_number
# ---------------------------------------------------------------------------------------------------------------

def test_accuracy_with_and_without_choices():
    assert score("accuracy", "The answer is (B).", "(B)", LABELLED) == 1.0
    assert score("accuracy", "blue", "(B)", LABELLED) == 1.0         # option text vs letter reference
    assert score("accuracy", "(B)", "blue", PLAIN) == 1.0            # letter vs option-text reference
    assert score("accuracy", "(C)", "(B)", LABELLED) == 0.0
    assert score("accuracy", "no idea", "(B)", LABELLED) == 0.0
    # no choices: a letter reference compares letters
    assert score("accuracy", "The answer is (B).", "(B)") == 1.0
    assert score("accuracy", "(A)", "(B)") == 0.0
    # no choices, free-text reference
    assert score("accuracy", "True.", "True") == 1.0
    assert score("accuracy", "False", "True") == 0.0


def test_exact_and_contains():
    assert normalize("  The  Cat sat.  ") == "the cat sat"
    assert score("exact", " Paris. ", "paris") == 1.0
    assert score("exact", "PARIS!!", "Paris") == 1.0
    assert score("exact", "Paris, France", "Paris") == 0.0
    assert score("contains", "It is Paris, France.", "paris") == 1.0
    assert score("contains", "It is Lyon.", "paris") == 0.0


@pytest.mark.parametrize("text,value", [
    ("#### 42", 42.0), ("so 3 + 4 = 7\n#### 42", 42.0), ("$1,200.50", 1200.5), ("It costs $1,200.50 in total.", 1200.5),
    ("We end with -3.5 apples", -3.5), ("first 5 then 6 then 7.", 7.0), ("#### 1,000 and then 7", 1000.0),
    ("no number here", None), ("", None), ("10,000,000", 10000000.0),
])
def test_gsm8k_number(text, value):
    assert gsm8k_number(text) == value


def test_gsm8k_score():
    ref = "Natalia sold 48/2 = 24 clips in May.\nAltogether 48+24 = 72 clips.\n#### 72"
    assert score("gsm8k_number", "She sold 72 clips in total.", ref) == 1.0
    assert score("gsm8k_number", "The answer is 72.00", ref) == 1.0
    assert score("gsm8k_number", "72 clips, or 73?", ref) == 0.0  # last number counts
    assert score("gsm8k_number", "no idea", ref) == 0.0


def test_unknown_metric_is_a_one_line_error():
    with pytest.raises(DLPError, match="unknown metric 'f1'"):
        score("f1", "a", "a")


# ---------------------------------------------------------------------------------------------------------------
# BLEU / ROUGE: known values (not a circular comparison with the same library call)
# ---------------------------------------------------------------------------------------------------------------

def test_bleu_known_values():
    assert bleu("the cat sat on the mat", "the cat sat on the mat") == pytest.approx(100.0)
    assert bleu(["the cat sat on the mat", "a b c d e"], ["the cat sat on the mat", "a b c d e"]) == pytest.approx(100.0)
    assert bleu("xyz uvw", "the cat sat on the mat") == 0.0
    assert bleu(["qq rr ss tt"], ["the cat sat on the mat"]) == 0.0
    # hand-checked: hyp "the cat sat on the mat" vs ref "the cat is on the mat" (6 tokens each, BP = 1)
    # 1-gram 5/6, 2-gram 3/5 (the cat, on the, the mat), 3-gram 1/4 (on the mat), 4-gram 0/3 -> sacrebleu's
    # default "exp" smoothing gives 1 / (2 * 3); BLEU = 100 * (5/6 * 3/5 * 1/4 * 1/6) ** (1/4)
    expected = 100 * (5 / 6 * 3 / 5 * 1 / 4 * 1 / 6) ** 0.25
    assert bleu(["the cat sat on the mat"], ["the cat is on the mat"]) == pytest.approx(expected, abs=1e-6)
    assert expected == pytest.approx(37.99, abs=0.01)


def test_rouge_known_values():
    r = rouge("the cat sat on the mat", "the cat sat on the mat")
    assert r == pytest.approx({"rouge1": 100.0, "rouge2": 100.0, "rougeL": 100.0})
    assert rouge("xyz uvw", "the cat") == pytest.approx({"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0})
    # hand-checked: unigrams 5 of 6 both ways -> F1 5/6; bigrams 3 of 5 -> 3/5; LCS "the cat on the mat" = 5 -> 5/6
    r = rouge(["the cat sat on the mat"], ["the cat is on the mat"])
    assert r["rouge1"] == pytest.approx(100 * 5 / 6)
    assert r["rouge2"] == pytest.approx(60.0)
    assert r["rougeL"] == pytest.approx(100 * 5 / 6)
    # lists: the mean over samples
    r2 = rouge(["the cat sat on the mat", "xyz"], ["the cat sat on the mat", "abc"])
    assert r2["rouge1"] == pytest.approx(50.0)


def test_sentence_scores_and_task_scores():
    assert score("bleu_rouge", "the cat sat on the mat", "the cat sat on the mat") == pytest.approx(1.0)
    assert score("rougeL", "the cat sat on the mat", "the cat is on the mat") == pytest.approx(5 / 6)
    ts = task_scores("bleu_rouge", ["the cat sat on the mat"], ["the cat is on the mat"])
    assert ts["score"] == pytest.approx(ts["bleu"]) and ts["rouge2"] == pytest.approx(60.0)
    ts = task_scores("accuracy", ["(A)", "(B)", "The answer is (C)", "?"], ["(A)", "(A)", "(C)", "(C)"],
                     [LABELLED] * 4)
    assert ts == {"score": 50.0}
    ts = task_scores("exact", ["Paris", "Rome"], ["paris.", "Berlin"])
    assert math.isclose(ts["score"], 50.0)


def test_is_correct_right_or_wrong():
    assert is_correct("accuracy", "The answer is (B).", "(B)", LABELLED)
    assert not is_correct("accuracy", "(A)", "(B)", LABELLED)
    assert is_correct("gsm8k_number", "#### 1,000", "1000")
    assert is_correct("exact", "Paris.", "paris") and not is_correct("contains", "Lyon", "Paris")
    # BLEU/ROUGE tasks have no notion of right: the normalised texts must be equal (BLEU 38 is not "correct")
    assert is_correct("bleu_rouge", "The cat sat on the mat.", "the cat sat on the mat")
    assert not is_correct("bleu_rouge", "the cat sat on the mat", "the cat is on the mat")
    assert not is_correct("rougeL", "", "the cat")
