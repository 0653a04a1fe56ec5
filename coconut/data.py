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

Loaders refuse what they cannot read faithfully, with a `ValueError` naming the file (and line) or the record (index
and id) and the field: a file that is not JSON, a dataset without records, a `column_mapping` naming a missing column,
a record that is not an object, an `answer` or a step that is not a string, `steps` given as one string, an empty
step. Validation (run by every loader, or by [`validate_dataset`]) then checks the content: a blank question, no steps
where needed, no answer, an answer holding the marker `### `, a control-token string in the text ([`CONTROL_STRINGS`]:
refused, never escaped), a missing or unreadable image, more `<image>` placeholders than images, or an example longer
than `max_length`. `skip_invalid=True` drops such records instead and logs how many. A single JSON/JSONL file holds one
split ([`load_split`]); images are read as a viewer shows them ([`to_rgb`]).
"""

import functools
import io
import json
import logging
import re
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from urllib.request import urlopen

import numpy as np
from datasets import Dataset, Features, Image, List, Value, load_dataset
from PIL import Image as PILImage
from PIL import ImageOps
from transformers.image_transforms import convert_to_rgb

from coconut.curriculum import CurriculumConfig, max_example_length
from coconut.hub import is_local_path
from processing_coconut_internvl import (
    ANSWER_MARKER,
    IMAGE_PLACEHOLDER,
    LATENT_TOKENS,
    VIDEO_PLACEHOLDER,
    user_content,
)


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
# Strings the tokenizer or the processor reads as control tokens, not text: in a record they would end a turn, open a
# latent block or stand for an image. Records are refused rather than escaped, so that no text changes silently.
CONTROL_STRINGS = (
    "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<img>", "</img>", "<IMG_CONTEXT>", VIDEO_PLACEHOLDER,
    *LATENT_TOKENS,
)  # fmt: skip
# Pillow modes of 16-bit grey images (a 16-bit PNG opens as `I;16`; older Pillow versions gave `I`).
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def records_to_dataset(
    records: list[dict], image_root: str | Path | None = None, *, skip_invalid: bool = False
) -> Dataset:
    """A dataset with [`RECORD_FEATURES`] from plain dicts (missing optional fields become empty lists).

    Image entries may be paths (relative ones are resolved against `image_root`), PIL images, or
    `{"bytes": ..., "path": ...}` dicts. A record of the wrong shape (not a dict; a non-string `answer`, question or
    step; `steps` as one string; an empty step) is a `ValueError` naming it and the field, or with
    `skip_invalid=True` is dropped and counted in a warning. The content is checked by [`validate_dataset`].
    """
    rows, bad = [], []
    for index, record in enumerate(records):
        try:
            rows.append(_normalise(record, index, image_root))
        except ValueError as error:
            if not skip_invalid:
                raise
            bad.append(str(error))
    if bad and not rows:
        raise ValueError(f"All {len(records)} records are of the wrong shape, e.g. {bad[0]}")
    if bad:
        logger.warning("Skipped %d of %d records of the wrong shape, e.g. %s", len(bad), len(records), bad[0])
    return Dataset.from_list(rows, features=_STORED_FEATURES).cast_column("images", RECORD_FEATURES["images"])


def load_record_images(record: dict, index: int | None = None) -> list[PILImage.Image]:
    """The images of `record` as 8-bit RGB `PIL.Image`s, converted by [`to_rgb`].

    A path that is not a file is an error naming the record: records point at images that must exist.
    """
    images = []
    for image in record.get("images") or []:
        if isinstance(image, dict):  # an undecoded `datasets.Image`: {"bytes", "path"}
            image = PILImage.open(io.BytesIO(image["bytes"])) if image.get("bytes") else image.get("path")
        if isinstance(image, Path):
            image = str(image)
        if isinstance(image, str) and image.startswith(("http://", "https://")):
            with urlopen(image) as response:  # noqa: S310 (records name http(s) URLs only)
                image = PILImage.open(io.BytesIO(response.read()))
        elif isinstance(image, str):
            if not Path(image).is_file():
                name = (
                    f"Record {index} (id {record.get('id')!r})"
                    if index is not None
                    else f"Record {record.get('id')!r}"
                )
                raise ValueError(
                    f"{name}: image file {image!r} does not exist. Render or download the dataset's images "
                    "first, or fix the record's `images` paths."
                )
            image = PILImage.open(image)
        images.append(to_rgb(image))
    return images


def to_rgb(image: PILImage.Image) -> PILImage.Image:
    """`image` as the 8-bit RGB image a viewer shows: upright, 16-bit values scaled, transparency on white.

    - The EXIF orientation is applied (as `transformers.image_utils.load_image` does).
    - 16-bit grey images (Pillow modes `I;16*` and `I`, e.g. a 16-bit PNG) are scaled to 8 bits (value / 257), not
      clipped: Pillow's own `convert("RGB")` clips every value above 255, which turns such an image almost white.
    - An image with transparency (RGBA, LA, a palette with a transparent colour) is composited onto white, as
      `transformers.image_transforms.convert_to_rgb` (the image processors' `do_convert_rgb`) does: Pillow's
      `convert("RGB")`, which `load_image` uses, drops the alpha channel, so a transparent background (stored as
      black) turns black.
    """
    image = ImageOps.exif_transpose(image)
    if image.mode in _SIXTEEN_BIT_MODES:
        values = np.asarray(image, dtype=np.float64)  # (H, W), 0 to 65535
        image = PILImage.fromarray(np.clip(np.round(values / 257), 0, 255).astype(np.uint8))
    return PILImage.fromarray(convert_to_rgb(image, return_numpy=True))


def validate_dataset(
    dataset: Dataset,
    *,
    require_steps: bool = True,
    skip_invalid: bool = False,
    check_images: bool = True,
    tokenizer=None,
    max_length: int | None = None,
    curriculum: CurriculumConfig | None = None,
    image_token_count: int | Callable[[dict], int] = 0,
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
        image_token_count (`int` or `Callable[[dict], int]`): tokens the processor puts in place of each image, for
            the length check; or a function of the stored image (`{"bytes", "path"}`) giving them, such as
            [`image_token_counter`] of a processor, for images whose tile count depends on their size.

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
    summary = ", ".join(f"{n} x {k}" for k, n in kinds.items())
    if len(bad) == len(dataset):
        raise ValueError(f"All {len(dataset)} records are invalid ({summary}); nothing is left to use.")
    logger.warning("Skipped %d of %d records: %s", len(bad), len(dataset), summary)
    return dataset.select([index for index in range(len(dataset)) if index not in bad])


def image_token_counter(processor) -> Callable[[dict], int]:
    """For the length check: the tokens `processor` puts in place of a stored image (`{"bytes", "path"}`), counted
    by running the processor itself on a blank image of that size (once per size), so that its tiling settings (e.g.
    InternVL's `crop_to_patches=True`) count as they do in training; only the image header is read."""

    @functools.cache
    def tokens_for_size(width: int, height: int) -> int:
        # The processor's own `_get_num_multimodal_tokens` is private and changed between transformers releases.
        blank = PILImage.new("RGB", (width, height))
        ids = processor(images=[blank], text=processor.build_prompt("?", num_images=1))["input_ids"][0]
        return sum(token == processor.image_token_id for token in ids) + 2  # + <img> and </img>

    def count(image: dict) -> int:
        source = io.BytesIO(image["bytes"]) if image.get("bytes") is not None else image["path"]
        with PILImage.open(source) as opened:
            width, height = opened.size
        return tokens_for_size(width, height)

    return count


def load_coconut_json(path: str | Path, *, image_root: str | Path | None = None, **validation) -> Dataset:
    """Records from a JSON file in the Coconut format: a list of `{"question", "steps", "answer"}` objects.

    This is the format of the paper's GSM8k, ProntoQA and ProsQA files; other keys (e.g. ProsQA's graph) are ignored.
    Records are text-only unless they carry an `images` list (paths relative to `image_root`, default the file's
    folder). `id` defaults to `"<file stem>-<index>"`. `validation` is forwarded to [`validate_dataset`].
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"Coconut JSON file {str(path)!r} does not exist; pass the path of e.g. prosqa_valid.json.")
    items = _read_json(path)
    if not isinstance(items, list):
        raise ValueError(f"{str(path)!r} must hold a JSON list of records, got a {type(items).__name__}.")
    if not items:
        raise ValueError(f"No records in {str(path)!r}: the JSON list is empty.")
    records = [
        {"id": f"{path.stem}-{index}", **item} if isinstance(item, dict) else item for index, item in enumerate(items)
    ]
    root = image_root if image_root is not None else path.parent
    dataset = records_to_dataset(records, root, skip_invalid=validation.get("skip_invalid", False))
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
    source = _load_split(path, split, load_kwargs)
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
        path (`str` or `Path`): a local `.json`/`.jsonl` file (a JSON list of records, or one record per line), or
            anything `datasets.load_dataset` accepts (a Hub name, a builder such as `"parquet"`, a local folder).
        split (`str`): the split to load (a local JSON file is its own single split).
        column_mapping (`dict[str, str]`, *optional*): record field -> source column, e.g.
            `{"question": "query", "steps": "rationale", "answer": "label", "images": "image"}`; every mapped column
            must exist. Unmapped fields are read from columns of the same name when present.
        steps_separator (`str`): a `steps` column holding one string is split on this (empty pieces dropped).
        image_root (`str` or `Path`, *optional*): folder for relative image paths (default: a local file's folder).
        load_kwargs (`dict`, *optional*): extra `load_dataset` arguments (`data_files`, `cache_dir`, `revision`...);
            not for local JSON files, which are read directly (so that errors can name the line).
        validation: forwarded to [`validate_dataset`].
    """
    mapping = {field: field for field in RECORD_FIELDS}
    unknown = set(column_mapping or {}) - set(RECORD_FIELDS)
    if unknown:
        raise ValueError(f"`column_mapping` has unknown record fields {sorted(unknown)}; use some of {RECORD_FIELDS}.")
    mapping.update(column_mapping or {})
    local = Path(path)
    if local.suffix in (".json", ".jsonl"):
        if not local.is_file():
            raise ValueError(f"Data file {str(local)!r} does not exist; pass an existing .json or .jsonl file.")
        if load_kwargs:
            raise ValueError(
                f"`load_kwargs`={load_kwargs} is for `datasets.load_dataset`; the local file {str(local)!r} is read "
                "directly. Drop load_kwargs."
            )
        rows = _read_json_records(local)
        columns = sorted({column for row in rows if isinstance(row, dict) for column in row})
        image_root = image_root if image_root is not None else local.parent
    else:
        source = _load_split(str(path), split, load_kwargs)
        rows, columns = None, source.column_names
    where = f"{str(path)!r}" + ("" if rows is not None else f" (split {split!r})")
    if rows is not None and not rows:
        raise ValueError(f"No records in {where}.")
    required = {"question", "answer", *(column_mapping or {})}
    for field in (field for field in RECORD_FIELDS if field in required):
        if mapping[field] not in columns:
            raise ValueError(
                f"Column {mapping[field]!r} for `{field}` is not in {where} (columns: {columns}); set "
                f"column_mapping={{{field!r}: <one of those columns>}}."
            )

    def convert(example, index):
        if not isinstance(example, dict):
            return example  # refused by `_normalise`, which names the record
        record = {field: example.get(column) for field, column in mapping.items() if column in example}
        if record.get("id") is None:
            record["id"] = f"{split}-{index}"
        steps = record.get("steps")
        if isinstance(steps, str):
            record["steps"] = [step.strip() for step in steps.split(steps_separator) if step.strip()]
        images = record.get("images")
        if images is not None and not isinstance(images, list):
            record["images"] = [images]
        return record

    if rows is not None:
        records = [convert(row, index) for index, row in enumerate(rows)]
        dataset = records_to_dataset(records, image_root, skip_invalid=validation.get("skip_invalid", False))
        return validate_dataset(dataset, **validation)
    source = _undecode_images(source)
    dataset = source.map(
        lambda example, index: _normalise(convert(example, index), index, image_root),
        with_indices=True,
        remove_columns=source.column_names,
        features=_STORED_FEATURES,
    )
    return validate_dataset(dataset.cast_column("images", RECORD_FEATURES["images"]), **validation)


def _load_split(path: str, split: str, load_kwargs: dict | None) -> Dataset:
    """`datasets.load_dataset(path, split=split, **load_kwargs)`; an empty split is an error saying so."""
    try:
        source = load_dataset(path, split=split, **(load_kwargs or {}))
    except ValueError as error:
        if "corresponds to no data" not in str(error):  # datasets' words for an empty split
            raise
        source = None
    if source is None or len(source) == 0:
        raise ValueError(f"No records in {path!r} (split {split!r}).")
    return source


def _read_json(path: Path):
    """The JSON value in `path`; invalid JSON is a `ValueError` with the file, line and column."""
    text = path.read_text(encoding="utf-8")
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(
            f"{str(path)!r}, line {error.lineno} column {error.colno}: not valid JSON ({error.msg}). Fix the file "
            "there, or check that it is the file you meant."
        ) from None


def _read_json_records(path: Path) -> list:
    """The records of a JSON list file, or of a JSON Lines file (one record per line; blank lines skipped)."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        try:
            items = json.loads(text)
        except json.JSONDecodeError as error:
            if error.msg != "Extra data":  # "Extra data": several JSON values, i.e. JSON Lines
                return _read_json(path)
        else:
            if not isinstance(items, list):
                raise ValueError(
                    f"{str(path)!r} holds a JSON {type(items).__name__}; expected a list of records or one record "
                    "per line (JSON Lines)."
                )
            return items
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as error:
            raise ValueError(
                f"{str(path)!r}, line {number} column {error.colno}: not valid JSON ({error.msg}); each line of a "
                "JSON Lines file must be one record."
            ) from None
    return records


def _normalise(record: dict, index: int, image_root: str | Path | None) -> dict:
    """`record` with every field in its schema type; a record of the wrong shape is a `ValueError` naming the
    record and the field (values are never coerced: `42` is not the answer `"42"`, and a string is not a list of
    steps)."""
    if not isinstance(record, dict):
        raise ValueError(
            f"Record {index} is {record!r} (a {type(record).__name__}), not an object with `question`, `steps` and "
            "`answer`; fix or remove it."
        )
    record_id = record.get("id")
    name = f"Record {index} (id {record_id!r})"
    if record_id is not None and (isinstance(record_id, bool) or not isinstance(record_id, str | int)):
        raise ValueError(f"{name}: `id` must be a string or an integer, got {_value(record_id)}.")
    for field in ("question", "answer"):
        value = record.get(field)
        if value is not None and not isinstance(value, str):
            raise ValueError(
                f"{name}: `{field}` must be a string, got {_value(value)}; write it as a string in the data (e.g. "
                '"42"), it is compared as text.'
            )
    steps = record.get("steps")
    if isinstance(steps, str):
        raise ValueError(
            f"{name}: `steps` is one string ({_value(steps, 60)}), not a list of steps; write it as a list of "
            "strings, or load the file with `load_records(..., steps_separator=...)`, which splits it."
        )
    for field in ("steps", "choices", "direct_answers"):
        values = record.get(field)
        if values is not None and not isinstance(values, list):
            raise ValueError(f"{name}: `{field}` must be a list of strings, got {_value(values)}.")
        for position, value in enumerate(values or []):
            if not isinstance(value, str):
                raise ValueError(f"{name}: `{field}[{position}]` must be a string, got {_value(value)}.")
            if field == "steps" and not value.strip():
                raise ValueError(
                    f"{name}: `steps[{position}]` is empty; remove empty steps (they would become blank lines of the "
                    "chain of thought and count as stages)."
                )
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
        elif not isinstance(image, str | dict):
            raise ValueError(f"{name}: an entry of `images` must be a path, an image or bytes, got {_value(image)}.")
        resolved.append(image)
    return {
        "id": str(record_id) if record_id is not None else str(index),
        "question": record.get("question"),
        "steps": list(steps or []),
        "answer": record.get("answer"),
        "images": resolved,
        "choices": list(record.get("choices") or []),
        "direct_answers": list(record.get("direct_answers") or []),
    }


def _value(value, limit: int = 40) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= limit else text[:limit] + '...'}"


def _record_problem(
    record, require_steps, check_images, tokenizer, max_length, curriculum, image_token_count
) -> str | None:
    if not record["question"] or not record["question"].strip():
        return "no question: `question` is empty or only whitespace."
    if record["answer"] is None or not record["answer"].strip():
        return "no answer: `answer` is missing or empty."
    if ANSWER_MARKER in record["answer"]:
        return (
            f"answer holds the marker: `answer` contains {ANSWER_MARKER!r}, which the evaluation reads as the start "
            "of the answer."
        )
    if require_steps and not record["steps"]:
        return "no steps: `steps` is empty, and CoT/Coconut training needs reasoning steps."
    problem = _control_string_problem(record, tokenizer)
    if problem is not None:
        return problem
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
        if callable(image_token_count):
            image_tokens = sum(image_token_count(image) for image in images)
        else:
            image_tokens = image_token_count * len(images)
        length = max_example_length(record, tokenizer, curriculum) + image_tokens
        if length > max_length:
            return (
                f"too long: its longest curriculum example has up to {length} tokens, more than "
                f"max_length={max_length}."
            )
    return None


def _control_string_problem(record: dict, tokenizer) -> str | None:
    """The first text field holding a control string ([`CONTROL_STRINGS`], `<image>` outside the question, and with a
    tokenizer its special tokens), or `None`."""
    controls = set(CONTROL_STRINGS)
    if tokenizer is not None:
        controls |= {token.content for token in tokenizer.added_tokens_decoder.values() if token.special}
    fields = [("question", record["question"]), ("answer", record["answer"])]
    for name in ("steps", "choices", "direct_answers"):
        fields += [(f"{name}[{position}]", text) for position, text in enumerate(record[name] or [])]
    for name, text in fields:
        allowed = {IMAGE_PLACEHOLDER} if name == "question" else set()
        found = sorted(token for token in (controls | {IMAGE_PLACEHOLDER}) - allowed if token in text)
        if found:
            return (
                f"control token in text: `{name}` holds {found[0]!r}, which the tokenizer or processor reads as a "
                "control token (ending a turn, opening a latent block or standing for an image), not as text. "
                "Remove or rewrite it."
            )
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


# Split names as they end data file names (`prosqa_valid.json`), each with the split it means.
_SPLIT_WORDS = {
    "train": "train", "training": "train", "valid": "validation", "validation": "validation", "val": "validation",
    "dev": "validation", "eval": "validation", "test": "test", "testing": "test",
}  # fmt: skip


def _split_words(name: str) -> set[str]:
    """The splits named by the words of a file stem or split name (`prosqa_valid_slice` -> `{"validation"}`)."""
    return {_SPLIT_WORDS[word] for word in re.split(r"[_\-.\s]+", name.lower()) if word in _SPLIT_WORDS}


def is_single_file(dataset: str) -> bool:
    """Whether `dataset` names one local JSON/JSONL file, which holds a single split."""
    return Path(dataset).suffix in (".json", ".jsonl")


def load_split(
    dataset: str, split: str, aokvqa_target: str = "multiple_choice", skip_invalid: bool = False
) -> Dataset:
    """The records of `dataset`'s `split`, with the loader that fits the source.

    Args:
        dataset (`str`): a folder of Coconut JSON files `<name>_<split>.json`, a Coconut JSON file, a Hub id of
            A-OKVQA (its own loader), or any local JSON/JSONL file or Hub dataset (the generic loader).
        split (`str`): the split; in a folder, the one file whose name ends in `<split>.json`. A single file holds
            one split: one whose name names another split (`train.json` for `split="test"`) is an error.
        aokvqa_target (`str`): `"multiple_choice"` or `"direct"`, for A-OKVQA.
        skip_invalid (`bool`): drop invalid records (and log how many) instead of raising.

    A name meant as a local path (see [`coconut.hub.is_local_path`]) that does not exist is an
    error saying so, not a Hub look-up.
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
        return load_coconut_json(matches[0], skip_invalid=skip_invalid)
    require_existing_local_dataset(dataset)
    if is_single_file(dataset):
        named, asked = _split_words(path.stem), _split_words(split)
        if named and asked and not named & asked:
            raise ValueError(
                f"`dataset` {dataset!r} is one file, and its name says it is the {sorted(named)[0]!r} split, not the "
                f"{split!r} split asked for. Pass the {split} file (or a folder of `<name>_<split>.json` files), or "
                f"ask for the split this file holds."
            )
    if path.suffix == ".json" and path.is_file():
        return load_coconut_json(path, skip_invalid=skip_invalid)
    try:
        if "a-okvqa" in dataset.lower():
            return load_aokvqa(dataset, split=split, target=aokvqa_target, skip_invalid=skip_invalid)
        return load_records(dataset, split=split, skip_invalid=skip_invalid)
    except OSError as error:  # `namespace/name` is also a relative path: say that it is no folder here first
        if path.exists():
            raise
        raise ValueError(
            f"`dataset` {dataset!r}: no such file or folder in {str(Path.cwd())!r}, and no Hub dataset of that id "
            f"could be read ({type(error).__name__}: {error}). Fix the path of a local folder (run from the folder it "
            "is relative to), or check the Hub id (and `huggingface-cli login` for a private dataset)."
        ) from error


def require_existing_local_dataset(dataset: str) -> None:
    """Raise a `ValueError` when `dataset` is meant as a local path (see
    [`coconut.hub.is_local_path`]) and does not exist: "no such file", not a Hub look-up."""
    path = Path(dataset)
    if is_local_path(dataset) and not path.exists():
        parent = next((folder for folder in path.parents if folder.is_dir()), Path("."))
        raise ValueError(
            f"`dataset` {dataset!r}: no such file or folder (the nearest existing folder is {str(parent)!r}). Fix the "
            "path; a Hub dataset id has the form `namespace/name`."
        )


def load_train_and_eval_splits(
    dataset: str, train_split: str, eval_split: str | None, skip_invalid: bool = False
) -> tuple[Dataset, Dataset | None]:
    """The training records and the records evaluated after each stage (`None` when `eval_split` is empty).

    A single JSON/JSONL file holds one split: evaluating "its validation split" would score the training records
    and report training ids as validation, so that is an error asking for a folder of split files or no evaluation.
    """
    require_existing_local_dataset(dataset)  # a typo is "no such file" before anything is said about splits
    if eval_split and is_single_file(dataset):
        raise ValueError(
            f"`--dataset` {dataset!r} is one file, which holds a single split: evaluating `--eval_split` "
            f"{eval_split!r} would score the training records and report them as validation. Pass a folder holding "
            f"`<name>_{train_split}.json` and `<name>_{eval_split}.json`, or `--eval_split ''` to train without "
            "evaluating after each stage."
        )
    validation = load_split(dataset, eval_split, skip_invalid=skip_invalid) if eval_split else None
    return load_split(dataset, train_split, skip_invalid=skip_invalid), validation


__all__ = [
    "CONTROL_STRINGS",
    "RECORD_FEATURES",
    "RECORD_FIELDS",
    "aokvqa_to_record",
    "image_token_counter",
    "load_aokvqa",
    "load_coconut_json",
    "load_record_images",
    "load_records",
    "load_split",
    "load_train_and_eval_splits",
    "records_to_dataset",
    "require_existing_local_dataset",
    "to_rgb",
    "validate_dataset",
]
