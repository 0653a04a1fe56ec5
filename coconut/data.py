"""Step-by-step reasoning records (text or images) on `datasets`, their loaders and their validation.

Every loader returns a `datasets.Dataset` with [`RECORD_FEATURES`]:

- `id` (`string`): the record's name in error messages and outputs;
- `question` (`string`): may hold one `<image>` placeholder per image; without any, images go before the question;
- `steps` (`list[string]`): the reasoning steps, one chain-of-thought line each;
- `answer` (`string`): the target after `### `, scored by exact match;
- `images` (`list[Image]`): file paths or encoded bytes (PIL images are encoded on the way in), decoded lazily to PIL
  when a row is read; pixels are only made by the processor in the collator, never stored in Arrow;
- `choices` (`list[string]`): multiple-choice options, empty when there are none;
- `direct_answers` (`list[string]`): free-form reference answers for scoring (A-OKVQA's ten), empty when there are none.

Validation (run by every loader, or by [`validate_dataset`]) raises a `ValueError` naming the record (index and id) and
the problem: no steps where needed, no answer, a missing or unreadable image, more `<image>` placeholders than
images, or an example longer than `max_length`. `skip_invalid=True` drops such records instead and logs how many.
"""

import io
import json
import logging
import re
from collections import Counter
from pathlib import Path

from datasets import Dataset, Features, Image, List, Value, load_dataset
from PIL import Image as PILImage

from coconut.curriculum import IMAGE_PLACEHOLDER, CurriculumConfig, max_example_length, user_content


logger = logging.getLogger(__name__)

RECORD_FEATURES = Features(
    {
        "id": Value("string"),
        "question": Value("string"),
        "steps": List(Value("string")),
        "answer": Value("string"),
        "images": List(Image()),
        "choices": List(Value("string")),
        "direct_answers": List(Value("string")),
    }
)
RECORD_FIELDS = tuple(RECORD_FEATURES)
# While records are built and checked, images stay as {"bytes", "path"} dicts: nothing is decoded.
_STORED_FEATURES = Features({**RECORD_FEATURES, "images": List(Image(decode=False))})
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def records_to_dataset(records: list[dict], image_root: str | Path | None = None) -> Dataset:
    """A dataset with [`RECORD_FEATURES`] from plain dicts (missing optional fields become empty lists).

    Image entries may be paths (relative ones are resolved against `image_root`), PIL images, or
    `{"bytes": ..., "path": ...}` dicts. Nothing is validated here; see [`validate_dataset`].
    """
    rows = [_normalise(record, index, image_root) for index, record in enumerate(records)]
    return Dataset.from_list(rows, features=_STORED_FEATURES).cast_column("images", RECORD_FEATURES["images"])


def validate_dataset(
    dataset: Dataset,
    *,
    require_steps: bool = True,
    skip_invalid: bool = False,
    check_images: bool = True,
    tokenizer=None,
    max_length: int | None = None,
    curriculum: CurriculumConfig | None = None,
    image_token_count: int = 0,
) -> Dataset:
    """Check every record; raise on the first bad one, or drop the bad ones with `skip_invalid=True`.

    Args:
        dataset (`Dataset`): records with [`RECORD_FEATURES`].
        require_steps (`bool`): records need at least one reasoning step (CoT and Coconut training need them;
            evaluation-only data may not).
        skip_invalid (`bool`): drop bad records and log how many (per problem) instead of raising.
        check_images (`bool`): open every image file (or byte string) with Pillow to check it decodes.
        tokenizer, max_length (`int`, *optional*): with both, a record whose longest curriculum example
            (see [`coconut.curriculum.max_example_length`]) exceeds `max_length` tokens is invalid.
        curriculum ([`CurriculumConfig`], *optional*): the curriculum used for the length check (default settings
            when left out).
        image_token_count (`int`): tokens the processor puts in place of each image, for the length check.

    Returns:
        `Dataset`: `dataset` itself when every record is valid, else the valid records.
    """
    if max_length is not None and tokenizer is None:
        raise ValueError(
            f"`max_length`={max_length} needs a `tokenizer` to count tokens; pass one or drop max_length."
        )
    curriculum = curriculum or CurriculumConfig()
    stored = dataset.cast_column("images", List(Image(decode=False)))
    bad: dict[int, str] = {}
    for index, record in enumerate(stored):
        problem = _record_problem(
            record, require_steps, check_images, tokenizer, max_length, curriculum, image_token_count
        )
        if problem is None:
            continue
        name = f"Record {index} (id {record['id']!r})"
        if not skip_invalid:
            raise ValueError(f"{name}: {problem} Fix the record, or pass skip_invalid=True to drop such records.")
        bad[index] = problem
    if not bad:
        return dataset
    kinds = Counter(problem.split(":")[0].split(" (")[0] for problem in bad.values())
    logger.warning(
        "Skipped %d of %d records: %s", len(bad), len(dataset), ", ".join(f"{n} x {k}" for k, n in kinds.items())
    )
    return dataset.select([index for index in range(len(dataset)) if index not in bad])


def load_coconut_json(path: str | Path, *, image_root: str | Path | None = None, **validation) -> Dataset:
    """Records from a JSON file in the Coconut format: a list of `{"question", "steps", "answer"}` objects.

    This is the format of the paper's GSM8k, ProntoQA and ProsQA files; other keys (e.g. ProsQA's graph) are ignored.
    Records are text-only unless they carry an `images` list (paths relative to `image_root`, default the file's
    folder). `id` defaults to `"<file stem>-<index>"`. `validation` is forwarded to [`validate_dataset`].
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"Coconut JSON file {str(path)!r} does not exist; pass the path of e.g. prosqa_valid.json.")
    with path.open(encoding="utf-8") as handle:
        items = json.load(handle)
    if not isinstance(items, list):
        raise ValueError(f"{str(path)!r} must hold a JSON list of records, got a {type(items).__name__}.")
    records = [{"id": f"{path.stem}-{index}", **item} for index, item in enumerate(items)]
    dataset = records_to_dataset(records, image_root if image_root is not None else path.parent)
    return validate_dataset(dataset, **validation)


def aokvqa_to_record(example: dict, target: str = "multiple_choice", rationale_steps: str = "sentences") -> dict:
    """One A-OKVQA example (`HuggingFaceM4/A-OKVQA` schema) as a record.

    Steps: A-OKVQA has three rationales per question, written independently by three annotators, each a short
    explanation of one or two sentences. With `rationale_steps="sentences"` the steps are the sentences of the first
    rationale (split after `.`, `!` or `?`), so a record has as many steps as that explanation has sentences; with
    `"all"` the three rationales are three steps, in the dataset's order (paraphrases, so later steps repeat the
    evidence, but every record then has three steps for the curriculum).

    Target: `"multiple_choice"` appends the options to the question (`"\\nChoices: a, b, c, d"`) and answers with the
    text of the correct choice; `"direct"` answers with the most frequent of the ten direct answers (first in the
    list among ties). Both keep `choices` and the ten `direct_answers` for scoring (the VQA metric).
    """
    if target not in ("multiple_choice", "direct"):
        raise ValueError(f"`target` must be 'multiple_choice' or 'direct', got {target!r}.")
    if rationale_steps not in ("sentences", "all"):
        raise ValueError(f"`rationale_steps` must be 'sentences' or 'all', got {rationale_steps!r}.")
    rationales = [text.strip() for text in example.get("rationales") or [] if text and text.strip()]
    if rationale_steps == "all":
        steps = rationales
    else:
        steps = [sentence for sentence in _SENTENCE_END.split(rationales[0]) if sentence] if rationales else []
    choices = list(example.get("choices") or [])
    direct_answers = list(example.get("direct_answers") or [])
    question = example["question"]
    if target == "multiple_choice":
        index = example.get("correct_choice_idx")
        answer = choices[index] if index is not None and 0 <= index < len(choices) else None
        question = question + "\nChoices: " + ", ".join(choices)
    else:
        answer = Counter(direct_answers).most_common(1)[0][0] if direct_answers else None
    image = example.get("image")
    return {
        "id": str(example.get("question_id")),
        "question": question,
        "steps": steps,
        "answer": answer,
        "images": [image] if image is not None else [],
        "choices": choices,
        "direct_answers": direct_answers,
    }


def load_aokvqa(
    path: str = "HuggingFaceM4/A-OKVQA",
    split: str = "train",
    *,
    target: str = "multiple_choice",
    rationale_steps: str = "sentences",
    load_kwargs: dict | None = None,
    **validation,
) -> Dataset:
    """A-OKVQA as records, through `datasets.load_dataset(path, split=split, **load_kwargs)`.

    `path` is the Hub name or any `load_dataset` builder with that schema (e.g. `"parquet"` with
    `load_kwargs={"data_files": ...}`). The test split has no answers: load it with `target="direct"` and it fails
    validation, since scoring needs answers. See [`aokvqa_to_record`] for steps and targets; `validation` is
    forwarded to [`validate_dataset`].
    """
    source = load_dataset(path, split=split, **(load_kwargs or {}))
    source = _undecode_images(source)
    dataset = source.map(
        aokvqa_to_record,
        fn_kwargs={"target": target, "rationale_steps": rationale_steps},
        remove_columns=source.column_names,
        features=_STORED_FEATURES,
    )
    return validate_dataset(dataset.cast_column("images", RECORD_FEATURES["images"]), **validation)


def load_records(
    path: str | Path,
    split: str = "train",
    *,
    column_mapping: dict[str, str] | None = None,
    steps_separator: str = "\n",
    image_root: str | Path | None = None,
    load_kwargs: dict | None = None,
    **validation,
) -> Dataset:
    """Records from any Hugging Face dataset or local JSON/JSONL file, with a column mapping.

    Args:
        path (`str` or `Path`): a local `.json`/`.jsonl` file (one record per line or a JSON list), or anything
            `datasets.load_dataset` accepts (a Hub name, a builder such as `"parquet"`, a local folder).
        split (`str`): the split to load (local JSON files have the single split `"train"`, which is used).
        column_mapping (`dict[str, str]`, *optional*): record field -> source column, e.g.
            `{"question": "query", "steps": "rationale", "answer": "label", "images": "image"}`; unmapped fields are
            read from columns of the same name when present.
        steps_separator (`str`): a `steps` column holding one string is split on this (empty pieces dropped).
        image_root (`str` or `Path`, *optional*): folder for relative image paths (default: a local file's folder).
        load_kwargs (`dict`, *optional*): extra `load_dataset` arguments (`data_files`, `cache_dir`, `revision`...).
        validation: forwarded to [`validate_dataset`].
    """
    mapping = {field: field for field in RECORD_FIELDS}
    unknown = set(column_mapping or {}) - set(RECORD_FIELDS)
    if unknown:
        raise ValueError(f"`column_mapping` has unknown record fields {sorted(unknown)}; use some of {RECORD_FIELDS}.")
    mapping.update(column_mapping or {})
    local = Path(path)
    if local.suffix in (".json", ".jsonl") and local.is_file():
        source = load_dataset("json", data_files=str(local), split="train", **(load_kwargs or {}))
        image_root = image_root if image_root is not None else local.parent
    elif local.suffix in (".json", ".jsonl"):
        raise ValueError(f"Data file {str(local)!r} does not exist; pass an existing .json or .jsonl file.")
    else:
        source = load_dataset(str(path), split=split, **(load_kwargs or {}))
    for field in ("question", "answer"):
        if mapping[field] not in source.column_names:
            raise ValueError(
                f"Column {mapping[field]!r} for `{field}` is not in the dataset (columns: {source.column_names}); "
                f"set column_mapping={{{field!r}: <column>}}."
            )
    source = _undecode_images(source)

    def convert(example, index):
        record = {field: example.get(column) for field, column in mapping.items() if column in example}
        if record.get("id") is None:
            record["id"] = f"{split}-{index}"
        steps = record.get("steps")
        if isinstance(steps, str):
            record["steps"] = [step.strip() for step in steps.split(steps_separator) if step.strip()]
        images = record.get("images")
        if images is not None and not isinstance(images, list):
            record["images"] = [images]
        return _normalise(record, index, image_root)

    dataset = source.map(convert, with_indices=True, remove_columns=source.column_names, features=_STORED_FEATURES)
    return validate_dataset(dataset.cast_column("images", RECORD_FEATURES["images"]), **validation)


def _normalise(record: dict, index: int, image_root: str | Path | None) -> dict:
    images = record.get("images") or []
    if isinstance(images, (str, PILImage.Image, dict)):
        images = [images]
    resolved = []
    for image in images:
        if isinstance(image, (str, Path)) and image_root is not None and not Path(image).is_absolute():
            image = str(Path(image_root) / image)
        elif isinstance(image, Path):
            image = str(image)
        elif isinstance(image, PILImage.Image):
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            image = {"bytes": buffer.getvalue(), "path": None}
        resolved.append(image)
    answer = record.get("answer")
    return {
        "id": str(record["id"]) if record.get("id") is not None else str(index),
        "question": record.get("question"),
        "steps": [str(step) for step in record.get("steps") or []],
        "answer": str(answer) if answer is not None else None,
        "images": resolved,
        "choices": [str(choice) for choice in record.get("choices") or []],
        "direct_answers": [str(answer) for answer in record.get("direct_answers") or []],
    }


def _record_problem(
    record, require_steps, check_images, tokenizer, max_length, curriculum, image_token_count
) -> str | None:
    if not record["question"]:
        return "no question: `question` is empty."
    if record["answer"] is None or not record["answer"].strip():
        return "no answer: `answer` is missing or empty."
    if require_steps and not record["steps"]:
        return "no steps: `steps` is empty, and CoT/Coconut training needs reasoning steps."
    images = record["images"]
    num_placeholders = record["question"].count(IMAGE_PLACEHOLDER)
    if num_placeholders > len(images):
        return f"more {IMAGE_PLACEHOLDER} placeholders than images: {num_placeholders} placeholders, {len(images)} images."
    try:
        user_content(record["question"], len(images))
    except ValueError as error:
        return "placeholder/image mismatch: " + str(error).removeprefix("record: ")
    if check_images:
        for position, image in enumerate(images):
            problem = _image_problem(image)
            if problem is not None:
                return f"image {position} {problem}"
    if max_length is not None:
        length = max_example_length(record, tokenizer, curriculum, image_token_count)
        if length > max_length:
            return f"too long: its longest curriculum example has {length} tokens, more than max_length={max_length}."
    return None


def _image_problem(image: dict) -> str | None:
    path, data = image.get("path"), image.get("bytes")
    if data is None:
        if not path:
            return "is empty (no path and no bytes)."
        if not Path(path).is_file():
            return f"is missing: no file at {path!r}."
    try:
        with PILImage.open(io.BytesIO(data) if data is not None else path) as opened:
            opened.verify()
    except Exception as error:  # Pillow raises many types for corrupt files
        return f"is unreadable ({path or 'bytes'}): {type(error).__name__}: {error}."
    return None


def _undecode_images(dataset: Dataset) -> Dataset:
    """Cast image columns to `decode=False`, so conversion passes stored bytes/paths through untouched."""
    for name, feature in dataset.features.items():
        if isinstance(feature, Image):
            dataset = dataset.cast_column(name, Image(decode=False))
        elif isinstance(feature, List) and isinstance(feature.feature, Image):
            dataset = dataset.cast_column(name, List(Image(decode=False)))
    return dataset


__all__ = [
    "RECORD_FEATURES",
    "RECORD_FIELDS",
    "aokvqa_to_record",
    "load_aokvqa",
    "load_coconut_json",
    "load_records",
    "records_to_dataset",
    "validate_dataset",
]


def load_split(dataset: str, split: str, aokvqa_target: str = "multiple_choice") -> Dataset:
    """The records of `dataset`'s `split`, with the loader that fits the source.

    Args:
        dataset (`str`): a folder of Coconut JSON files `<name>_<split>.json`, a Coconut JSON file, a Hub id of
            A-OKVQA (its own loader), or any local JSON/JSONL file or Hub dataset (the generic loader).
        split (`str`): the split; in a folder, the one file whose name ends in `<split>.json`.
        aokvqa_target (`str`): `"multiple_choice"` or `"direct"`, for A-OKVQA.
    """
    path = Path(dataset)
    if path.is_dir():
        matches = sorted(path.glob(f"*{split}.json"))
        if len(matches) != 1:
            found = sorted(p.name for p in path.glob("*.json"))
            raise ValueError(
                f"`dataset` folder {dataset!r} has {len(matches)} files ending in '{split}.json' (JSON files: {found}); "
                "pass a split that names exactly one, or the file itself."
            )
        return load_coconut_json(matches[0])
    if path.suffix == ".json" and path.is_file():
        return load_coconut_json(path)
    if "a-okvqa" in dataset.lower():
        return load_aokvqa(dataset, split=split, target=aokvqa_target)
    return load_records(dataset, split=split)
