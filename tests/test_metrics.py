"""Answer metrics on hand-made predictions."""

import pytest

from coconut.metrics import (
    correct_choice_index,
    count_generated_tokens,
    direct_answer_score,
    exact_match,
    extract_answer,
    multiple_choice_score,
    normalize_answer,
    parse_choice,
)


@pytest.mark.parametrize(
    "generation, answer",
    [
        ("Tom is a wumpus.\nEvery wumpus is a yumpus.\n### Tom is a yumpus.", "Tom is a yumpus."),
        ("### 18", "18"),
        ("###  42 \n", "42"),
        ("A1 points ### to A2.\n### A2", "A2"),  # a step may hold the marker: the last one starts the answer
        ("###b", None),  # the marker is "### ", space included, as in training
        ("no marker here", None),
        ("", None),
    ],
)
def test_extract_answer(generation, answer):
    assert extract_answer(generation) == answer


@pytest.mark.parametrize(
    "text, normalized",
    [
        ("Sally is a Sterpus.", "sally is sterpus"),
        ("  The  answer,  Two!", "answer 2"),
        ("1,000", "1000"),
        ("3.5", "3.5"),
        ("3.5.", "3.5"),
        ("don't", "don t"),
        (None, ""),
        ("A", "a"),  # an option letter is not an article to remove
        ("The", "the"),
        ("(A)", "a"),
        ("?", "?"),  # only punctuation: kept as it is
        ("...", "..."),
        ("  ", ""),
    ],
)
def test_normalize_answer(text, normalized):
    assert normalize_answer(text) == normalized


def test_exact_match():
    assert exact_match("Sally is a sterpus", "Sally is a sterpus.") == 1.0
    assert exact_match("sally is a STERPUS.", "Sally is a sterpus.") == 1.0
    assert exact_match("Sally is a hilpus.", "Sally is a sterpus.") == 0.0
    assert exact_match("35", "3.5") == 0.0  # a decimal point is not punctuation
    assert exact_match("1,000", "1000") == 1.0
    assert exact_match(None, "x") == 0.0


@pytest.mark.parametrize("gold", ["A", "B", "C", "D", "The", "?", "...", "a", "(a)"])
def test_an_empty_or_different_prediction_never_matches_a_short_answer(gold):
    """Letter answers, articles and punctuation: an empty generation used to match "A" (both normalised to "")."""
    assert normalize_answer(gold) != ""
    for prediction in ("", "   ", None):
        assert exact_match(prediction, gold) == 0.0
        assert direct_answer_score(prediction, [gold] * 10) == 0.0
        assert parse_choice(prediction, ["A", "B", "C", "D"]) is None
    assert exact_match("The", "A") == exact_match("A", "The") == 0.0
    assert exact_match(gold, gold) == exact_match(gold.lower(), gold) == 1.0


def test_a_model_answering_nothing_scores_zero_on_letter_answers():
    answers = ["A", "B", "C", "D", "A"]
    assert sum(exact_match("", answer) for answer in answers) == 0.0
    assert sum(exact_match(answer, answer) for answer in answers) == 5.0


CHOICES = ["red", "dark red", "blue", "a green car"]


@pytest.mark.parametrize(
    "prediction, index",
    [
        ("blue", 2),
        ("Blue.", 2),
        ("green car", 3),  # articles do not matter
        ("C", 2),
        ("(b)", 1),
        ("d.", 3),
        ("E", None),  # a letter beyond the options
        ("It is dark red.", 1),  # "red" is inside the longer matching option
        ("red or blue", None),  # two options: no choice
        ("purple", None),
        (None, None),
    ],
)
def test_parse_choice(prediction, index):
    assert parse_choice(prediction, CHOICES) == index


def test_multiple_choice_score_needs_the_correct_option():
    correct = correct_choice_index("Blue", CHOICES)
    assert correct == 2
    assert multiple_choice_score("the answer is blue", CHOICES, correct) == 1.0
    assert multiple_choice_score("red", CHOICES, correct) == 0.0  # valid, but wrong
    assert multiple_choice_score("nothing", CHOICES, correct) == 0.0
    with pytest.raises(ValueError, match="Record 'r7'.*'pink' matches 0"):
        correct_choice_index("pink", CHOICES, "r7")


@pytest.mark.parametrize(
    "matches, plain, subsets",
    [(0, 0.0, 0.0), (1, 1 / 3, 0.3), (2, 2 / 3, 0.6), (3, 1.0, 0.9), (4, 1.0, 1.0), (10, 1.0, 1.0)],
)
def test_direct_answer_score(matches, plain, subsets):
    answers = ["Two"] * matches + ["three"] * (10 - matches)
    assert direct_answer_score("2", answers) == pytest.approx(plain)
    assert direct_answer_score("2", answers, subset_average=True) == pytest.approx(subsets)


def test_direct_answer_score_edge_cases():
    assert direct_answer_score(None, ["a"] * 10) == 0.0
    with pytest.raises(ValueError, match="`direct_answers` is empty"):
        direct_answer_score("x", [])


def test_count_generated_tokens():
    eos, pad = 9, 0
    assert count_generated_tokens([5, 6, 9, 0, 0], [eos], pad) == 3  # eos counts, padding after it does not
    assert count_generated_tokens([5, 6, 7], [eos], pad) == 3  # ran to max_new_tokens
    assert count_generated_tokens([9, 9], [eos], eos) == 1  # pad == eos: the first eos ends it
    assert count_generated_tokens([5, 8, 9], [8, 9], pad) == 2  # several eos ids
