"""Answer metrics of Coconut evaluations: exact match, multiple choice, the A-OKVQA direct-answer score, token counts.

Every metric reads the text after the answer marker `### ` (Coconut's format: `step 1\nstep 2\n### answer`). A
generation without the marker has no answer and scores 0: a model that never reaches its answer has not answered.
"""

import re
import string
import unicodedata
from collections.abc import Sequence
from itertools import combinations

from processing_coconut_internvl import extract_answer


_ARTICLES = {"a", "an", "the"}
# The VQA evaluation maps number words to digits so that "two" and "2" agree; the same mapping serves GSM8k answers.
_NUMBER_WORDS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
# Punctuation that separates words; "." and "," inside a number ("3.5", "1,000") are handled before it is removed.
_PUNCTUATION = re.compile(f"[{re.escape(string.punctuation)}]")
_THOUSANDS_SEPARATOR = re.compile(r"(?<=\d),(?=\d{3}\b)")
_DECIMAL_POINT = re.compile(r"(?<=\d)\.(?=\d)")
_LETTER_OPTION = re.compile(r"^\(?([a-z])[\).:]?$")


def normalize_answer(text: str | None) -> str:
    """Lower-cased answer without punctuation, articles or extra spaces, number words as digits.

    The same rules as SQuAD's and VQA's evaluations (NFKC, lower case, punctuation removed, articles `a an the`
    removed, `two` -> `2`), except that a decimal point and a thousands separator inside a number are kept apart from
    punctuation: `"3.5"` stays `"3.5"` (not `"35"`) and `"1,000"` becomes `"1000"`.

    A rule never empties a text that has something in it: an answer that is only articles (the option letter `"A"`,
    `"The"`) keeps its words, and one that is only punctuation (`"?"`, `"..."`) keeps its characters. Otherwise an
    empty generation would match the letter answers of a multiple-choice set. `None` and blank text normalise to `""`.
    """
    if text is None:
        return ""
    text = unicodedata.normalize("NFKC", text).lower()
    text = _THOUSANDS_SEPARATOR.sub("", text)
    text = _DECIMAL_POINT.sub("\0", text)  # protect "3.5" from the punctuation pass
    words = _PUNCTUATION.sub(" ", text).replace("\0", ".").split()
    if not words:  # only punctuation (or blank): the characters are the answer
        return " ".join(text.replace("\0", ".").split())
    kept = [word for word in words if word not in _ARTICLES] or words  # only articles: the words are the answer
    return " ".join(_NUMBER_WORDS.get(word, word) for word in kept)


def exact_match(prediction: str | None, answer: str) -> float:
    """1.0 when the normalised prediction equals the normalised reference answer, else 0.0.

    `None` and a prediction that normalises to `""` (empty or blank) score 0, whatever the reference.
    """
    normalized = normalize_answer(prediction)
    if not normalized:
        return 0.0
    return float(normalized == normalize_answer(answer))


def parse_choice(prediction: str | None, choices: Sequence[str]) -> int | None:
    """Index of the option a prediction chose, or `None` when it chose none or several.

    In order: the prediction is an option (normalised); it is an option letter (`B`, `(b)`, `b.`) within range; or
    exactly one option appears in it as whole words once options contained in a longer matching option are dropped
    (`"it is dark red"` with options `red`, `dark red` chose `dark red`). A prediction naming two options chose none.

    Args:
        prediction (`str`, *optional*): the answer text (after the marker).
        choices (`Sequence[str]`): the options, in the order the question lists them.
    """
    normalized = normalize_answer(prediction)
    if not normalized:
        return None
    normalized_choices = [normalize_answer(choice) for choice in choices]
    if normalized in normalized_choices:
        return normalized_choices.index(normalized)
    letter = _LETTER_OPTION.match(prediction.strip().lower())
    if letter is not None:
        index = ord(letter.group(1)) - ord("a")
        return index if index < len(choices) else None
    padded = f" {normalized} "
    found = [i for i, choice in enumerate(normalized_choices) if choice and f" {choice} " in padded]
    maximal = [i for i in found if not any(j != i and normalized_choices[i] in normalized_choices[j] for j in found)]
    return maximal[0] if len(maximal) == 1 else None


def correct_choice_index(answer: str, choices: Sequence[str], record_id: str = "?") -> int:
    """Index of the option equal to the reference answer (normalised); a `ValueError` if no option or several match."""
    normalized = normalize_answer(answer)
    matches = [i for i, choice in enumerate(choices) if normalize_answer(choice) == normalized]
    if len(matches) != 1:
        raise ValueError(
            f"Record {record_id!r}: the answer {answer!r} matches {len(matches)} of its `choices` {list(choices)}; "
            "exactly one option must equal the answer. Fix the record's `answer` or `choices`."
        )
    return matches[0]


def multiple_choice_score(prediction: str | None, choices: Sequence[str], correct_index: int) -> float:
    """1.0 when the option parsed from the prediction is the correct one; a valid but wrong option scores 0."""
    return float(parse_choice(prediction, choices) == correct_index)


def direct_answer_score(prediction: str | None, direct_answers: Sequence[str], subset_average: bool = False) -> float:
    """The VQA-style direct-answer score: `min(#annotators who gave the prediction / 3, 1)`.

    A-OKVQA's official evaluation (`allenai/aokvqa`, `evaluation/eval_predictions.py`) computes exactly
    `min(1, #matches / 3)` over its ten direct answers, and this is the default. The VQA v2 evaluation instead
    averages that score over the ten subsets of nine annotators (leave one out); `subset_average=True` computes that
    variant. They differ only for 1, 2 or 3 matching annotators: 1/3, 2/3, 1 by default against 0.3, 0.6, 0.9 with
    subsets. Both sides are normalised with `normalize_answer` (A-OKVQA
    compares raw strings, but its answers are already lower-cased; generated text is not). A-OKVQA also leaves its
    `difficult_direct_answer` questions out of the direct-answer average: filter those records before scoring.

    Args:
        prediction (`str`, *optional*): the answer text.
        direct_answers (`Sequence[str]`): the annotators' answers (ten in A-OKVQA).
        subset_average (`bool`): average over the leave-one-out annotator subsets as VQA v2 does.
    """
    if not direct_answers:
        raise ValueError("`direct_answers` is empty: the direct-answer score needs the annotators' answers.")
    normalized = normalize_answer(prediction)
    if not normalized:
        return 0.0
    matches = [normalize_answer(answer) == normalized for answer in direct_answers]
    if not subset_average:
        return min(sum(matches) / 3, 1.0)
    subsets = list(combinations(matches, len(matches) - 1))
    return sum(min(sum(subset) / 3, 1.0) for subset in subsets) / len(subsets)


def count_generated_tokens(token_ids: Sequence[int], eos_token_ids: Sequence[int], pad_token_id: int | None) -> int:
    """Number of tokens a row generated: up to and including its first eos, without the padding `generate` adds.

    Args:
        token_ids (`Sequence[int]`): the new tokens of one row (the prompt cut off).
        eos_token_ids (`Sequence[int]`): the ids that end a generation.
        pad_token_id (`int`, *optional*): the id `generate` fills finished rows with.
    """
    eos = set(eos_token_ids)
    for i, token in enumerate(token_ids):
        if token in eos:
            return i + 1
    # No eos: the row ran to `max_new_tokens`; trailing pads can only come from a pad id that is not an eos.
    count = len(token_ids)
    while pad_token_id is not None and count and token_ids[count - 1] == pad_token_id:
        count -= 1
    return count


__all__ = [
    "extract_answer",
    "normalize_answer",
    "exact_match",
    "parse_choice",
    "correct_choice_index",
    "multiple_choice_score",
    "direct_answer_score",
    "count_generated_tokens",
]
