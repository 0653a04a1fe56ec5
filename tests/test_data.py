"""Record schema, loaders (Coconut JSON, A-OKVQA, any dataset with a column mapping) and validation."""

import json
import logging
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from datasets import Dataset, Features, Image, List, Value
from PIL import Image as PILImage

from coconut.curriculum import CurriculumConfig
from coconut.data import (
    RECORD_FEATURES,
    load_aokvqa,
    load_coconut_json,
    load_record_images,
    load_records,
    load_split,
    load_train_and_eval_splits,
    records_to_dataset,
    validate_dataset,
)
from coconut.synthetic import synthetic_tokenizer
from coconut.tokenizer import train_tokenizer


PROSQA_SLICE = Path(__file__).parent / "data" / "prosqa_valid_slice.json"

# The HuggingFaceM4/A-OKVQA columns and types.
AOKVQA_FEATURES = Features(
    {
        "image": Image(),
        "question_id": Value("string"),
        "question": Value("string"),
        "choices": List(Value("string")),
        "correct_choice_idx": Value("int8"),
        "direct_answers": List(Value("string")),
        "difficult_direct_answer": Value("bool"),
        "rationales": List(Value("string")),
    }
)


def save_png(path, colour=(10, 200, 30), size=(32, 24)):
    PILImage.new("RGB", size, colour).save(path)
    return str(path)


def good_record(**overrides):
    record = {"id": "q7", "question": "What next?", "steps": ["One.", "Two."], "answer": "Three.", "images": []}
    return {**record, **overrides}


def test_coconut_json_loads_prosqa(tmp_path):
    raw = json.loads(PROSQA_SLICE.read_text())
    dataset = load_coconut_json(PROSQA_SLICE)
    assert dataset.features == RECORD_FEATURES
    assert len(dataset) == 20
    assert dataset[3]["id"] == "prosqa_valid_slice-3"
    for record, item in zip(dataset, raw, strict=True):
        assert (record["question"], record["steps"], record["answer"]) == (
            item["question"],
            item["steps"],
            item["answer"],
        )
        assert record["images"] == [] and record["choices"] == [] and record["direct_answers"] == []
    assert sorted({len(steps) for steps in dataset["steps"]}) == [3, 4, 5, 6]
    with pytest.raises(ValueError, match="does not exist"):
        load_coconut_json(tmp_path / "gsm8k_train.json")


def test_images_are_stored_as_paths_or_bytes_and_decoded_lazily(tmp_path):
    path = save_png(tmp_path / "a.png", colour=(1, 2, 3))
    pil = PILImage.new("RGB", (5, 7), (9, 8, 7))
    dataset = records_to_dataset([good_record(images=[path, pil])])
    arrow_type = dataset.data.schema.field("images").type
    assert arrow_type == pa.list_(pa.struct({"bytes": pa.binary(), "path": pa.string()}))  # no pixel arrays
    first, second = dataset[0]["images"]
    assert first.getpixel((0, 0)) == (1, 2, 3) and second.size == (5, 7)


@pytest.mark.parametrize(
    "record, problem",
    [
        (good_record(steps=[]), "no steps: `steps` is empty"),
        (good_record(answer=None), "no answer"),
        (good_record(answer="  "), "no answer"),
        (good_record(images=["missing.png"]), "image 0 is missing: no file at"),
        (good_record(question="<image> vs <image>?", images=["a.png"]), "more <image> placeholders than images: 2"),
        (good_record(images=["garbage.png"]), "image 0 is unreadable"),
    ],
)
def test_invalid_records_name_the_record_and_the_problem(tmp_path, record, problem):
    save_png(tmp_path / "a.png")
    (tmp_path / "garbage.png").write_bytes(b"not a png")
    dataset = records_to_dataset([good_record(id="fine"), record], image_root=tmp_path)
    with pytest.raises(ValueError, match="Record 1 \\(id 'q7'\\): " + problem.replace("(", "\\(")):
        validate_dataset(dataset)


def test_skip_invalid_drops_bad_records_and_reports_how_many(tmp_path, caplog):
    records = [good_record(id="a"), good_record(id="b", steps=[]), good_record(id="c", images=["gone.png"])]
    dataset = records_to_dataset(records + [good_record(id="d", answer=None)], image_root=tmp_path)
    with caplog.at_level(logging.WARNING, logger="coconut.data"):
        kept = validate_dataset(dataset, skip_invalid=True)
    assert kept["id"] == ["a"]
    assert "Skipped 3 of 4 records" in caplog.text
    assert validate_dataset(dataset.select([1]), require_steps=False)["id"] == ["b"]


def test_too_long_records(tmp_path):
    tokenizer = train_tokenizer(["What next? One. Two. Three. user assistant"], vocab_size=300)
    config = CurriculumConfig(c_thought=4, max_latent_stage=2)
    dataset = records_to_dataset([good_record(id="short"), good_record(id="long", steps=["One. " * 40])])
    lengths = {}
    for record in dataset:
        lengths[record["id"]] = len(tokenizer(record["question"] + " ".join(record["steps"]))["input_ids"])
    limit = 60
    assert lengths["short"] < limit < lengths["long"]
    with pytest.raises(ValueError, match=f"Record 1 \\(id 'long'\\): too long: .* more than max_length={limit}"):
        validate_dataset(dataset, tokenizer=tokenizer, max_length=limit, curriculum=config)
    assert validate_dataset(dataset, tokenizer=tokenizer, max_length=limit, skip_invalid=True)["id"] == ["short"]
    # The image tokens count: the short record with an image of 100 tokens no longer fits.
    path = save_png(tmp_path / "a.png")
    with_image = records_to_dataset([good_record(images=[path])])
    validate_dataset(with_image, tokenizer=tokenizer, max_length=limit)
    with pytest.raises(ValueError, match="too long"):
        validate_dataset(with_image, tokenizer=tokenizer, max_length=limit, image_token_count=100)
    with pytest.raises(ValueError, match="needs a `tokenizer`"):
        validate_dataset(dataset, max_length=limit)


@pytest.fixture
def aokvqa_parquet(tmp_path):
    rows = [
        {
            "image": PILImage.new("RGB", (40, 30), (250, 0, 0)),
            "question_id": "22MexNkBPpdZGX6sxbxVBH",
            "question": "What is the man by the bags awaiting?",
            "choices": ["skateboarder", "train", "delivery", "cab"],
            "correct_choice_idx": 3,
            "direct_answers": ["ride", "ride", "bus", "ride", "taxi", "travelling", "traffic", "taxi", "cab", "ride"],
            "difficult_direct_answer": False,
            "rationales": [
                "A train would not be on the street. He would not have luggage waiting for a delivery.",
                "The man is waiting for a cab.",
                "He has bags as if he is going somewhere.",
            ],
        },
        {
            "image": PILImage.new("RGB", (20, 20), (0, 0, 250)),
            "question_id": "2Xo7w1uMAumMZTAFVTCOsT",
            "question": "Where is the cat sitting?",
            "choices": ["sink", "roof", "car", "bed"],
            "correct_choice_idx": 0,
            "direct_answers": ["sink"] * 7 + ["bathroom"] * 3,
            "difficult_direct_answer": False,
            "rationales": ["The cat is in a basin with a tap.", "It is a sink.", "Cats like sinks."],
        },
    ]
    path = tmp_path / "aokvqa" / "train.parquet"
    path.parent.mkdir()
    Dataset.from_list(rows, features=AOKVQA_FEATURES).to_parquet(path)
    return path


def test_aokvqa_multiple_choice_and_direct_targets(aokvqa_parquet, tmp_path):
    load_kwargs = {"data_files": str(aokvqa_parquet), "cache_dir": str(tmp_path / "cache")}
    mc = load_aokvqa("parquet", load_kwargs=load_kwargs)
    assert mc.features == RECORD_FEATURES
    assert mc[0]["id"] == "22MexNkBPpdZGX6sxbxVBH"
    assert mc[0]["question"] == "What is the man by the bags awaiting?\nChoices: skateboarder, train, delivery, cab"
    assert mc[0]["answer"] == "cab" and mc[1]["answer"] == "sink"
    assert mc[0]["steps"] == [
        "A train would not be on the street.",
        "He would not have luggage waiting for a delivery.",
    ]
    assert len(mc[0]["direct_answers"]) == 10 and mc[0]["choices"][3] == "cab"
    image = mc[0]["images"][0]
    assert image.size == (40, 30) and image.convert("RGB").getpixel((0, 0)) == (250, 0, 0)

    direct = load_aokvqa("parquet", target="direct", rationale_steps="all", load_kwargs=load_kwargs)
    assert direct["answer"] == ["ride", "sink"]  # the most frequent of the ten
    assert direct[0]["question"] == "What is the man by the bags awaiting?"
    assert direct[1]["steps"] == ["The cat is in a basin with a tap.", "It is a sink.", "Cats like sinks."]
    assert direct[1]["direct_answers"] == ["sink"] * 7 + ["bathroom"] * 3
    with pytest.raises(ValueError, match="`target` must be"):
        load_aokvqa("parquet", target="open", load_kwargs=load_kwargs)


def test_any_json_file_with_a_column_mapping(tmp_path):
    save_png(tmp_path / "one.png", colour=(5, 5, 5))
    lines = [
        {"qid": 11, "query": "Which shape?", "rationale": "Look.\nIt is round.", "label": "circle", "pic": "one.png"},
        {"qid": 12, "query": "How many?", "rationale": "Count.\n\nThere are two.", "label": "2", "pic": "one.png"},
    ]
    path = tmp_path / "mine.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines))
    mapping = {"id": "qid", "question": "query", "steps": "rationale", "answer": "label", "images": "pic"}
    dataset = load_records(path, column_mapping=mapping)
    assert dataset["id"] == ["11", "12"]
    assert dataset["steps"] == [["Look.", "It is round."], ["Count.", "There are two."]]
    assert dataset["answer"] == ["circle", "2"]
    assert dataset[0]["images"][0].getpixel((1, 1)) == (5, 5, 5)
    with pytest.raises(ValueError, match="Column 'question' for `question` is not in .*mine.jsonl"):
        load_records(path)
    with pytest.raises(ValueError, match="unknown record fields \\['label'\\]"):
        load_records(path, column_mapping={"label": "label"})
    (tmp_path / "one.png").unlink()
    with pytest.raises(ValueError, match="Record 0 \\(id '11'\\): image 0 is missing"):
        load_records(path, column_mapping=mapping)


@pytest.mark.parametrize(
    "item, problem",
    [
        ({"answer": 42}, "`answer` must be a string, got int 42"),
        ({"answer": {"value": "B2"}}, "`answer` must be a string, got dict"),
        ({"answer": ["B2"]}, "`answer` must be a string, got list"),
        ({"answer": False}, "`answer` must be a string, got bool False"),
        ({"steps": "One. Two."}, "`steps` is one string"),
        ({"steps": ["One.", ""]}, "`steps\\[1\\]` is empty"),
        ({"steps": ["One.", 2]}, "`steps\\[1\\]` must be a string, got int 2"),
        ({"question": ["What next?"]}, "`question` must be a string"),
    ],
)
def test_wrong_shapes_are_refused_naming_record_and_field(tmp_path, item, problem):
    """Nothing is coerced (no `str(42)`, no step per character), and the error names the field."""
    record = {name: value for name, value in good_record().items() if name != "id"}  # ids come from the file
    path = tmp_path / "gsm_valid.json"
    path.write_text(json.dumps([record, {**record, **item}]))
    with pytest.raises(ValueError, match=f"Record 1 \\(id 'gsm_valid-1'\\): {problem}"):
        load_coconut_json(path)
    generic = path.rename(tmp_path / "mine.json")
    if isinstance(item.get("steps"), str):  # the generic loader splits a steps string on `steps_separator`
        assert load_records(generic)[1]["steps"] == ["One. Two."]
        return
    with pytest.raises(ValueError, match=f"Record 1 \\(id 'train-1'\\): {problem}"):
        load_records(generic)


@pytest.mark.parametrize("item, kind", [(None, "None (a NoneType)"), ("just text", "'just text' (a str)")])
def test_records_that_are_not_objects_are_refused(tmp_path, item, kind):
    path = tmp_path / "data.json"
    path.write_text(json.dumps([good_record(), item]))
    with pytest.raises(ValueError, match=f"Record 1 is {re.escape(kind)}, not an object"):
        load_coconut_json(path)
    lines = tmp_path / "data.jsonl"
    lines.write_text(json.dumps(good_record()) + "\n" + json.dumps(item) + "\n")
    with pytest.raises(ValueError, match="Record 1 is"):
        load_records(lines)
    # skip_invalid drops them, and says how many; dropping every record is an error.
    assert load_coconut_json(path, skip_invalid=True)["id"] == ["q7"]
    path.write_text(json.dumps([item]))
    with pytest.raises(ValueError, match="All 1 records are of the wrong shape"):
        load_coconut_json(path, skip_invalid=True)


def test_files_that_are_not_json_name_the_file_and_line(tmp_path):
    """A bare JSONDecodeError becomes an error with the file, line and column."""
    broken = tmp_path / "prosqa_train.json"
    broken.write_text('[\n  {"question": "a", "steps": ["b"], "answer": "c"},\n  {"question": "d" "steps": []}\n]')
    with pytest.raises(ValueError, match="prosqa_train.json', line 3 column 20: not valid JSON"):
        load_coconut_json(broken)
    with pytest.raises(ValueError, match="prosqa_train.json', line 3 column 20: not valid JSON"):
        load_records(broken)
    lines = tmp_path / "mine.jsonl"
    lines.write_text(json.dumps(good_record()) + "\n\n" + "<html>not json</html>\n")
    with pytest.raises(ValueError, match="mine.jsonl', line 3 column 1: not valid JSON"):
        load_records(lines)


def test_empty_datasets_say_no_records(tmp_path):
    (tmp_path / "empty.json").write_text("[]")
    with pytest.raises(ValueError, match="No records in '.*empty.json'"):
        load_coconut_json(tmp_path / "empty.json")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="No records in '.*empty.jsonl'"):
        load_records(tmp_path / "empty.jsonl")
    Dataset.from_dict({"question": [], "answer": []}).to_parquet(tmp_path / "empty.parquet")
    with pytest.raises(ValueError, match="No records in 'parquet' \\(split 'train'\\)"):
        load_records("parquet", load_kwargs={"data_files": str(tmp_path / "empty.parquet")})
    # Records that are all invalid leave nothing either: an error, not an empty dataset.
    with pytest.raises(ValueError, match="All 2 records are invalid \\(2 x no steps\\)"):
        validate_dataset(records_to_dataset([good_record(steps=[]), good_record(steps=[])]), skip_invalid=True)


def test_a_mapping_to_a_missing_column_names_it_and_the_columns(tmp_path):
    """A mapped `steps` or `images` column that is not there was read as "no steps" / no images."""
    save_png(tmp_path / "one.png")
    path = tmp_path / "mine.jsonl"
    path.write_text(json.dumps({"query": "Which?", "rationale": "Look.", "label": "red", "pic": "one.png"}))
    mapping = {"question": "query", "steps": "rationale", "answer": "label"}
    assert load_records(path, column_mapping={**mapping, "images": "pic"})[0]["images"][0].size == (32, 24)
    columns = re.escape("(columns: ['label', 'pic', 'query', 'rationale'])")
    with pytest.raises(ValueError, match=f"Column 'picture' for `images` is not in .*mine.jsonl' {columns}"):
        load_records(path, column_mapping={**mapping, "images": "picture"})
    with pytest.raises(ValueError, match=f"Column 'reasoning' for `steps` is not in .*{columns}"):
        load_records(path, column_mapping={**mapping, "steps": "reasoning"})


def test_an_answer_holding_the_marker_is_invalid():
    """The evaluation reads the answer after the last `### `: an answer containing one could never be scored."""
    with pytest.raises(ValueError, match="Record 0 \\(id 'q7'\\): answer holds the marker"):
        validate_dataset(records_to_dataset([good_record(answer="### 3")]))


@pytest.mark.parametrize("question", ["", " ", "\n\t  "])
def test_a_blank_question_is_invalid(question):
    with pytest.raises(
        ValueError, match="Record 0 \\(id 'q7'\\): no question: `question` is empty or only whitespace"
    ):
        validate_dataset(records_to_dataset([good_record(question=question)]))


@pytest.mark.parametrize(
    "overrides, field, token",
    [
        ({"question": "Is it <|latent|> red?"}, "question", "<|latent|>"),
        ({"steps": ["One.", "Two.<|im_end|>"]}, "steps[1]", "<|im_end|>"),
        ({"answer": "<|im_start|>Three"}, "answer", "<|im_start|>"),
        ({"steps": ["See <image> here."]}, "steps[0]", "<image>"),
        ({"question": "Look at <IMG_CONTEXT>."}, "question", "<IMG_CONTEXT>"),
        ({"choices": ["a", "<|start-latent|>"], "answer": "a"}, "choices[1]", "<|start-latent|>"),
    ],
)
def test_control_tokens_typed_into_record_text_are_refused(overrides, field, token):
    """Typed into a record, such a string would be tokenized as the control token itself (end a turn, open a
    latent block, stand for an image); records are refused, not escaped."""
    dataset = records_to_dataset([good_record(id="fine"), good_record(**overrides)])
    message = re.escape(f"Record 1 (id 'q7'): control token in text: `{field}` holds {token!r}")
    with pytest.raises(ValueError, match=message):
        validate_dataset(dataset)
    assert validate_dataset(dataset, skip_invalid=True)["id"] == ["fine"]


def test_control_tokens_of_the_tokenizer_are_refused_when_it_is_given():
    tokenizer = synthetic_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<ref>"]}, replace_extra_special_tokens=False)
    dataset = records_to_dataset([good_record(question="Where is <ref>?")])
    assert validate_dataset(dataset)["id"] == ["q7"]  # no tokenizer: only the InternVL and Coconut control strings
    with pytest.raises(ValueError, match="control token in text: `question` holds '<ref>'"):
        validate_dataset(dataset, tokenizer=tokenizer)


def test_sixteen_bit_and_transparent_images_convert_as_a_viewer_shows_them(tmp_path):
    """A 16-bit PNG used to come out almost white (values clipped at 255), a transparent background black."""
    grey = np.full((8, 8), 32768, dtype=np.uint16)
    grey[0, 0] = 65535
    PILImage.fromarray(grey).save(tmp_path / "grey16.png")
    figure = PILImage.new("RGBA", (8, 8), (0, 0, 0, 0))  # transparent background, as stored: black
    figure.putpixel((0, 0), (200, 0, 0, 255))
    figure.save(tmp_path / "figure.png")
    half = PILImage.new("LA", (8, 8), (0, 128))  # black, half transparent
    records = [good_record(images=["grey16.png", "figure.png", half])]
    first, second, third = load_record_images(records_to_dataset(records, image_root=tmp_path)[0])
    assert PILImage.open(tmp_path / "grey16.png").mode == "I;16"
    assert first.mode == second.mode == third.mode == "RGB"
    assert first.getpixel((1, 1)) == (128, 128, 128) and first.getpixel((0, 0)) == (255, 255, 255)
    assert second.getpixel((1, 1)) == (255, 255, 255) and second.getpixel((0, 0)) == (200, 0, 0)
    assert third.getpixel((1, 1)) == (127, 127, 127)


def test_one_file_holds_one_split(tmp_path):
    """A single .json as `--dataset` used to serve as every split: validation scored the training records, and
    `evaluate.py --split test` scored `train.json`."""
    records = json.loads(PROSQA_SLICE.read_text())[:4]
    (tmp_path / "prosqa_train.json").write_text(json.dumps(records))
    (tmp_path / "mine.json").write_text(json.dumps(records))
    train_file = str(tmp_path / "prosqa_train.json")
    with pytest.raises(
        ValueError,
        match="'.*prosqa_train.json' is one file, and its name says it is the 'train' split, not the 'test' split",
    ):
        load_split(train_file, "test")
    with pytest.raises(ValueError, match="it is the 'validation' split, not the 'train' split"):
        load_split(str(PROSQA_SLICE), "train")
    assert len(load_split(train_file, "train")) == 4
    assert len(load_split(str(PROSQA_SLICE), "valid")) == len(load_split(str(PROSQA_SLICE), "validation")) == 20
    assert len(load_split(str(tmp_path / "mine.json"), "test")) == 4  # a name without a split: the file is the split

    with pytest.raises(
        ValueError,
        match="'.*mine.json' is one file, which holds a single split: evaluating `--eval_split` 'valid' would score",
    ):
        load_train_and_eval_splits(str(tmp_path / "mine.json"), "train", "valid")
    train, validation = load_train_and_eval_splits(str(tmp_path / "mine.json"), "train", "")
    assert len(train) == 4 and validation is None
    train, validation = load_train_and_eval_splits(str(tmp_path), "train", "")
    assert len(train) == 4


@pytest.mark.parametrize("name", ["data/prosqa", "data/prosqa/prosqa_trian.json", "./prosqa", "missing.jsonl"])
def test_a_typo_in_a_local_dataset_path_says_no_such_file(tmp_path, monkeypatch, name):
    """A typo used to become "Repo id must be..." or several Hub look-ups."""
    (tmp_path / "data").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("coconut.data.load_dataset", lambda *args, **kwargs: pytest.fail("looked it up"))
    with pytest.raises(ValueError, match=f"`dataset` {re.escape(repr(name))}: no such file or folder"):
        load_split(name, "train")
