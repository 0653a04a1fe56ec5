"""The arrow-chase task: answers follow from the pixels, splits are deterministic, and guessing is weak."""

import hashlib
from collections import Counter

import numpy as np
import pytest
from datasets import Dataset
from trl import ModelConfig, TrlParser

import train_sft
from coconut.curriculum import CurriculumConfig, build_training_example
from coconut.sft_config import CoconutSFTConfig
from coconut.synthetic import (
    COLOURS,
    SyntheticTaskConfig,
    build_synthetic_split,
    cell_name,
    generate_puzzles,
    majority_baseline,
    question_split,
    synthetic_corpus,
    synthetic_tokenizer,
)
from coconut.training_data import load_splits
from processing_coconut_internvl import LATENT_TOKENS


# The dot variant on 28 px cells, as it is meant to be trained.
DOT_TASK = SyntheticTaskConfig(variant="dot", grid_size=3, image_size=84, min_hops=2, max_hops=6)


def read_board(image, grid_size):
    """Directions read back from the pixels: the colour at each cell's top-left corner (the arrow is central)."""
    cell = image.width // grid_size
    by_colour = {colour: direction for direction, colour in COLOURS.items()}
    return [
        [by_colour[image.getpixel((c * cell + 1, r * cell + 1))] for c in range(grid_size)] for r in range(grid_size)
    ]


def read_dotted_board(image, grid_size):
    """Directions (the colour at each cell's top-right corner: the dot is top-left) and the dotted cells (those with
    white pixels) read back from the pixels; a white pixel outside a cell's top-left corner fails."""
    cell = image.width // grid_size
    by_colour = {colour: direction for direction, colour in COLOURS.items()}
    board = [
        [by_colour[image.getpixel((c * cell + cell - 2, r * cell + 1))] for c in range(grid_size)]
        for r in range(grid_size)
    ]
    white = Counter()
    for y, x in zip(*np.nonzero((np.asarray(image) == 255).all(axis=-1)), strict=True):  # (H, W, 3) -> (H, W)
        assert x % cell < cell // 4 and y % cell < cell // 4, f"white pixel at {(x, y)}, off a cell's corner"
        white[int(y) // cell, int(x) // cell] += 1
    return board, white


def chase(board, start, hops):
    moves = {"right": (0, 1), "down": (1, 0), "left": (0, -1), "up": (-1, 0)}
    row, column = start
    for _ in range(hops):
        d_row, d_column = moves[board[row][column]]
        row, column = (row + d_row) % len(board), (column + d_column) % len(board)
    return row, column


@pytest.mark.parametrize("image_size, grid_size", [(56, 4), (112, 4)])
def test_answers_and_steps_follow_from_the_image(tmp_path, image_size, grid_size):
    config = SyntheticTaskConfig(image_size=image_size, grid_size=grid_size)
    dataset = build_synthetic_split(tmp_path, "train", config, num_records=40)
    names = {cell_name((r, c)): (r, c) for r in range(grid_size) for c in range(grid_size)}
    for record in dataset:
        image = record["images"][0].convert("RGB")
        assert image.size == (image_size, image_size)
        board = read_board(image, grid_size)
        start = names[record["question"].split()[2]]
        hops = int(record["question"].split()[5])
        assert 2 <= hops <= 6 and len(record["steps"]) == hops
        assert cell_name(chase(board, start, hops)) == record["answer"]
        here = start
        for step in record["steps"]:  # "B3 points right to C3."
            source, _, direction, _, target = step.rstrip(".").split()
            assert names[source] == here and board[here[0]][here[1]] == direction
            here = names[target]
        assert cell_name(here) == record["answer"]


def test_branching_answers_need_a_search_read_from_the_image(tmp_path):
    """Two arrows per cell (top and bottom halves): exactly one of the two offered cells ends a path of that length."""
    config = SyntheticTaskConfig(variant="branching", grid_size=3, image_size=84, max_hops=3)
    dataset = build_synthetic_split(tmp_path, "train", config, num_records=40)
    names = {cell_name((r, c)): (r, c) for r in range(3) for c in range(3)}
    moves = {"right": (0, 1), "down": (1, 0), "left": (0, -1), "up": (-1, 0)}
    by_colour = {colour: direction for direction, colour in COLOURS.items()}
    first_arrow_differs = 0
    for record in dataset:
        image = record["images"][0].convert("RGB")
        cell = image.width // 3
        board = [
            [{by_colour[image.getpixel((c * cell + 1, r * cell + y))] for y in (1, cell - 2)} for c in range(3)]
            for r in range(3)
        ]
        words = record["question"].rstrip("?").replace(",", "").split()
        start, hops, offered = names[words[2]], int(words[5]), [names[words[-3]], names[words[-1]]]
        frontier = {start}
        for _ in range(hops):
            frontier = {((r + moves[d][0]) % 3, (c + moves[d][1]) % 3) for r, c in frontier for d in board[r][c]}
        assert [target in frontier for target in offered].count(True) == 1
        assert names[record["answer"]] in frontier and len(record["steps"]) == hops
        here = start
        for text in record["steps"]:  # "A3 points right to B3.", with one of the cell's two arrows
            source, _, direction, _, target = text.rstrip(".").split()
            assert names[source] == here and direction in board[here[0]][here[1]]
            here = names[target]
        assert here == names[record["answer"]]
        first_arrow_differs += sorted(board[start[0]][start[1]])[0] != record["steps"][0].split()[2]
    assert first_arrow_differs > 0  # the path does not always take the same arrow: the first step needs the search
    with pytest.raises(ValueError, match="branching variant needs a board of at least 3 x 3"):
        SyntheticTaskConfig(variant="branching", grid_size=2)


def test_splits_are_deterministic_and_disjoint(tmp_path):
    config = SyntheticTaskConfig()
    first = build_synthetic_split(tmp_path / "a", "validation", config, num_records=8)
    second = build_synthetic_split(tmp_path / "b", "validation", config, num_records=8)
    assert first["question"] == second["question"] and first["steps"] == second["steps"]

    def digest(path):
        with open(path, "rb") as handle:
            return hashlib.sha256(handle.read()).hexdigest()

    assert [digest(record["images"][0].filename) for record in first] == [
        digest(record["images"][0].filename) for record in second
    ]
    assert first[0]["images"][0].filename.endswith("a/chase_4x4_2-6hops_56px_seed0/validation/validation-00000.png")
    keys = {
        split: {(p.board, p.start, p.path) for p in generate_puzzles(split, config)} for split in ("train", "test")
    }
    assert not keys["train"] & keys["test"]
    reseeded = generate_puzzles("validation", SyntheticTaskConfig(seed=1), 8)
    assert [p.board for p in reseeded] != [p.board for p in generate_puzzles("validation", config, 8)]
    assert generate_puzzles("train", config, 5) == generate_puzzles("train", config)[:5]


def test_runs_sharing_a_folder_keep_their_own_images(tmp_path):
    """A seed sweep rendering into one folder: the second run used to rewrite the first one's PNGs, and the first
    run's records (which read their images lazily) then showed the second run's boards."""
    tasks = [SyntheticTaskConfig(grid_size=2, max_hops=3, seed=seed) for seed in (0, 1)]
    tasks.append(SyntheticTaskConfig(grid_size=2, max_hops=3, seed=0, image_size=112))
    splits = [build_synthetic_split(tmp_path, "train", task, num_records=12) for task in tasks]
    assert len({record["images"][0].filename for split in splits for record in split}) == 36
    for task, split in zip(tasks, splits, strict=True):
        for puzzle, record in zip(generate_puzzles("train", task, 12), split, strict=True):
            assert record["images"][0].size == (task.image_size, task.image_size)
            assert read_board(record["images"][0].convert("RGB"), 2) == [list(row) for row in puzzle.board]
    # The same settings again (a rerun, or a second run of the same task) write the same bytes in the same place.
    again = build_synthetic_split(tmp_path, "train", tasks[0], num_records=12)
    assert [r["images"][0].filename for r in again] == [r["images"][0].filename for r in splits[0]]
    assert not list(tmp_path.rglob(".*.png"))  # no temporary file is left behind


def test_guessing_without_the_image_is_weak():
    config = SyntheticTaskConfig()
    answers = {split: [cell_name(p.path[-1]) for p in generate_puzzles(split, config)] for split in ("train", "test")}
    train, test = (Dataset.from_dict({"answer": answers[split]}) for split in ("train", "test"))
    accuracy = majority_baseline(train, test)
    assert accuracy == pytest.approx(34 / 500)  # the majority train answer, B2, on the 500 test questions
    assert len(Counter(answers["test"])) == 16  # every cell is a possible answer
    hops = Counter(len(p.path) - 1 for p in generate_puzzles("test", config))
    assert sorted(hops) == [2, 3, 4, 5, 6] and min(hops.values()) >= 30


def test_no_question_is_in_two_splits_on_a_small_board():
    """A 2 x 2 board with 2-3 arrows has 2048 questions: independent draws would overlap; the partition does not."""
    config = SyntheticTaskConfig(grid_size=2, max_hops=3, train_size=2000, validation_size=100, test_size=500)
    assert config.num_questions == 4**4 * 4 * 2
    questions = {
        split: [p.question for p in generate_puzzles(split, config)] for split in ("train", "validation", "test")
    }
    assert len(questions["train"]) == 2000 and len(set(questions["train"])) < 1500  # training draws repeat
    assert len(set(questions["validation"])) == 100 and len(set(questions["test"])) == 500  # distinct
    assert not set(questions["train"]) & set(questions["test"])
    assert not set(questions["train"]) & set(questions["validation"])
    assert not set(questions["validation"]) & set(questions["test"])
    # The partition is by question alone: another seed's test questions are not in this seed's training split.
    other_seed = SyntheticTaskConfig(grid_size=2, max_hops=3, seed=1)
    assert not {p.question for p in generate_puzzles("test", other_seed)} & set(questions["train"])
    assert {question_split(p, config) for p in generate_puzzles("test", other_seed)} == {"test"}
    with pytest.raises(ValueError, match="700 distinct test questions \\(`test_size`.* do not fit in the test share"):
        generate_puzzles("test", SyntheticTaskConfig(grid_size=2, max_hops=3, test_size=700))


def test_tokenizer_is_small_and_covers_the_task(tmp_path):
    tokenizer = synthetic_tokenizer()
    assert len(tokenizer) < 400
    assert tokenizer.convert_ids_to_tokens(list(range(len(tokenizer) - 3, len(tokenizer)))) == sorted(
        LATENT_TOKENS, key=LATENT_TOKENS.index
    )
    for text in synthetic_corpus():
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == text
        assert tokenizer.unk_token_id not in ids
    record = build_synthetic_split(tmp_path, "test", num_records=1)[0]
    example = build_training_example(record, 2, tokenizer, CurriculumConfig(c_thought=1, max_latent_stage=6))
    text_only = build_training_example({**record, "images": []}, 2, tokenizer, CurriculumConfig(max_latent_stage=6))
    assert len(example["prompt"]) > len(text_only["prompt"]) and len(example["images"]) == 1
    assert example["completion"].count("\n") == len(record["steps"]) - 2  # two steps replaced by thoughts
    # Whole words: a step is a handful of tokens, so six of them fit easily in a tiny model's context.
    assert len(tokenizer.tokenize("B4 points down to B1.\n")) <= 9


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"grid_size": 9}, "`grid_size` must be in \\[2, 8\\], got 9"),
        ({"image_size": 50}, "`image_size`=50 must be a multiple of `grid_size`=4"),
        ({"min_hops": 4, "max_hops": 3}, "Need 1 <= `min_hops` <= `max_hops`, got 4 and 3"),
        ({"test_size": -1}, "`test_size` must be >= 0, got -1"),
        ({"test_share": 0.5, "validation_share": 0.5}, "must be positive and leave a share for training"),
        (
            {"variant": "dot", "grid_size": 2},
            "`grid_size`=2 and `max_hops`=6: the dot variant needs grid_size\\*\\*2 >= max_hops \\+ 3 .* got 4 < 9. "
            "Lower `max_hops` to 1 or use a 3 x 3 board",
        ),
        (
            {"variant": "dot", "grid_size": 3, "image_size": 84, "max_hops": 7},
            "got 9 < 10. Lower `max_hops` to 6 or use a 4 x 4 board",
        ),
    ],
)
def test_config_validation(overrides, message):
    with pytest.raises(ValueError, match=message):
        SyntheticTaskConfig(**overrides)


def test_dot_questions_give_no_count_and_stop_at_the_first_dot(tmp_path):
    """The question names no number of arrows: following the arrows read from the image until a dotted cell takes as
    many arrows as the record has steps, and the answer is that cell."""
    dataset = build_synthetic_split(tmp_path, "train", DOT_TASK, num_records=40)
    assert dataset[0]["images"][0].filename.endswith("dot_3x3_2-6hops_84px_seed0/train/train-00000.png")
    names = {cell_name((r, c)): (r, c) for r in range(3) for c in range(3)}
    for record in dataset:
        board, white = read_dotted_board(record["images"][0].convert("RGB"), 3)
        dots = set(white)
        # Three dots, each clearly visible: a white disc of 32 pixels on a 28 px cell (its top-left 7 x 7 pixels).
        assert len(dots) == 3 and min(white.values()) >= 25
        start = names[record["question"].split()[2]]
        assert record["question"] == (
            f"Start at {cell_name(start)} and follow the arrows until you reach a cell with a dot. Where do you stop?"
        )
        assert not any(character.isdigit() for character in record["question"].replace(cell_name(start), ""))
        path = [start]
        while path[-1] not in dots and len(path) <= 9:
            path.append(chase(board, path[-1], 1))
        assert cell_name(path[-1]) == record["answer"] and len(set(path)) == len(path)
        assert len(record["steps"]) == len(path) - 1 and 2 <= len(record["steps"]) <= 6
        for here, there, text in zip(path[:-1], path[1:], record["steps"], strict=True):  # "B3 points right to C3."
            source, _, direction, _, target = text.rstrip(".").split()
            assert (names[source], names[target]) == (here, there) and board[here[0]][here[1]] == direction
    puzzles = generate_puzzles("train", DOT_TASK, 300)
    # The decoy dots are off the path, whose end is the only dot on it; the number of arrows is uniform.
    assert all(set(p.dots) & set(p.path) == {p.path[-1]} and len(p.dots) == 3 for p in puzzles)
    hops = Counter(p.hops for p in puzzles)
    assert sorted(hops) == [2, 3, 4, 5, 6] and min(hops.values()) >= 40
    tokenizer = synthetic_tokenizer(DOT_TASK)
    for text in (dataset[0]["question"], *dataset[0]["steps"]):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.unk_token_id not in ids and tokenizer.decode(ids) == text


def test_dot_questions_are_in_one_split_each():
    """A 2 x 2 board with one arrow has 1024 dot questions (board, start, dots): the partition keeps splits apart."""
    config = SyntheticTaskConfig(
        variant="dot", grid_size=2, min_hops=1, max_hops=1, train_size=1000, validation_size=50, test_size=200
    )
    assert config.num_questions == 4**4 * 4
    puzzles = {split: generate_puzzles(split, config) for split in ("train", "validation", "test")}
    questions = {split: [p.question for p in puzzles[split]] for split in puzzles}
    assert all(p.question == (p.board, p.start, p.dots) for split in puzzles for p in puzzles[split])
    assert len(set(questions["validation"])) == 50 and len(set(questions["test"])) == 200
    assert not set(questions["train"]) & set(questions["test"])
    assert not set(questions["train"]) & set(questions["validation"])
    assert not set(questions["validation"]) & set(questions["test"])
    assert {question_split(p, config) for p in puzzles["test"]} == {"test"}


def test_dot_variant_from_the_train_sft_flags(tmp_path):
    parser = TrlParser((train_sft.ScriptArguments, CoconutSFTConfig, ModelConfig))
    script_args, training_args, _ = parser.parse_args_and_config(
        [
            "--output_dir", str(tmp_path / "out"), "--dataset", "arrow_chase", "--synthetic_dir", str(tmp_path),
            "--synthetic_variant", "dot", "--synthetic_grid_size", "3", "--synthetic_image_size", "84",
            "--synthetic_train_size", "4", "--synthetic_validation_size", "2", "--synthetic_test_size", "2",
            "--bf16", "false", "--use_cpu", "true", "--report_to", "none",
        ]
    )  # fmt: skip
    train, validation, task = load_splits(script_args, training_args.seed)
    assert (task.variant, task.grid_size, task.max_hops, len(train), len(validation)) == ("dot", 3, 6, 4, 2)
    assert all("until you reach a cell with a dot" in question for question in train["question"])
