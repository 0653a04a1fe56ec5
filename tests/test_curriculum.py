"""The Coconut curriculum: stage layouts against the paper's table, text pieces, labels, and tokenization on ProsQA."""

import random
from collections import Counter
from pathlib import Path

import pytest

from coconut.collator import CoconutDataCollator
from coconut.curriculum import (
    CurriculumConfig,
    build_eval_prompt,
    build_training_example,
    evaluation_layout,
    training_layout,
)
from coconut.data import load_coconut_json
from coconut.tokenizer import train_tokenizer
from processing_coconut_internvl import END_LATENT, LATENT, START_LATENT, user_content


PROSQA_SLICE = Path(__file__).parent / "data" / "prosqa_valid_slice.json"


@pytest.fixture(scope="module")
def prosqa():
    return load_coconut_json(PROSQA_SLICE)


@pytest.fixture(scope="module")
def tokenizer(prosqa):
    corpus = [record["question"] + " " + " ".join(record["steps"]) + " " + record["answer"] for record in prosqa]
    return train_tokenizer(corpus + ["user\n", "assistant\n", "### "], vocab_size=600)


def text_record(num_steps=3, **overrides):
    record = {
        "id": "r0",
        "question": "Is Tom a wumpus?",
        "steps": [f"Step number {i}." for i in range(num_steps)],
        "answer": "Tom is a wumpus.",
        "images": [],
    }
    return {**record, **overrides}


# (method, num_steps, stage, pad_latent_to_max) -> (steps skipped, latents, markers), with c_thought=2, max stage 3.
# Written out by hand from the paper / reference code, not computed.
TRAINING_TABLE = [
    ("coconut", 4, 0, False, (0, 0, True)),
    ("coconut", 4, 1, False, (1, 2, True)),
    ("coconut", 4, 3, False, (3, 6, True)),
    ("coconut", 4, 4, False, (4, 6, True)),  # past max stage: all steps gone, thoughts capped at 3 * 2
    ("coconut", 2, 3, False, (2, 6, True)),  # stage <= max uses k * c thoughts even with fewer steps (reference)
    ("coconut", 2, 4, False, (2, 4, True)),  # past max stage: min(num_steps, max) * c
    ("coconut", 2, 4, True, (2, 6, True)),  # ... unless padded to the maximum
    ("pause_as_thought", 4, 2, False, (2, 4, True)),
    ("no_thought", 4, 2, False, (2, 0, False)),  # "w/o thought": steps dropped, nothing in their place, no markers
    ("no_thought", 4, 9, False, (4, 0, False)),
    ("no_thought", 2, 3, True, (2, 0, False)),
    ("cot", 4, 3, False, (0, 0, False)),
    ("no_cot", 4, 0, False, (4, 0, False)),
]


@pytest.mark.parametrize("method, num_steps, stage, pad, expected", TRAINING_TABLE)
def test_training_layout_matches_the_paper(method, num_steps, stage, pad, expected):
    config = CurriculumConfig(method=method, c_thought=2, max_latent_stage=3, pad_latent_to_max=pad)
    layout = training_layout(num_steps, stage, config)
    assert (layout.num_skipped_steps, layout.num_latents, layout.markers) == expected


@pytest.mark.parametrize(
    "num_steps, stage, pad, latents",
    [(4, 0, False, 0), (4, 2, False, 4), (4, 9, False, 6), (2, 3, False, 4), (2, 3, True, 6), (2, 9, True, 6)],
)
def test_evaluation_layout_caps_thoughts_at_the_number_of_steps(num_steps, stage, pad, latents):
    config = CurriculumConfig(c_thought=2, max_latent_stage=3, pad_latent_to_max=pad)
    assert evaluation_layout(num_steps, stage, config).num_latents == latents


def test_training_example_text_pieces(tokenizer):
    config = CurriculumConfig(c_thought=2, max_latent_stage=3)
    example = build_training_example(text_record(), 1, tokenizer, config)
    assert example["prompt"] == (
        "<|im_start|>user\nIs Tom a wumpus?<|im_end|>\n<|im_start|>assistant\n"
        + START_LATENT
        + LATENT * 2
        + END_LATENT
    )
    assert example["completion"] == "Step number 1.\nStep number 2.\n### Tom is a wumpus.<|im_end|>"
    assert example["stage"] == 1 and example["num_latents"] == 2 and example["images"] == []

    cot = build_training_example(text_record(), 2, tokenizer, CurriculumConfig(method="cot"))
    assert cot["prompt"].endswith("<|im_start|>assistant\n")
    assert cot["completion"].startswith("Step number 0.\n")
    no_cot = build_training_example(text_record(), 0, tokenizer, CurriculumConfig(method="no_cot"))
    assert no_cot["completion"] == "### Tom is a wumpus.<|im_end|>"


def test_eval_prompt_is_the_training_prompt_without_completion(tokenizer):
    config = CurriculumConfig(c_thought=2, max_latent_stage=3)
    for stage in range(4):
        prompt = build_eval_prompt(text_record(), stage, tokenizer, config)["prompt"]
        assert prompt == build_training_example(text_record(), stage, tokenizer, config)["prompt"]
        assert prompt.endswith(END_LATENT) and prompt.count(LATENT) == 2 * stage
        assert "Step" not in prompt and "###" not in prompt


def test_no_thought_is_the_papers_ablation(tokenizer):
    """The reference's `no_thoughts: true`: no markers, no thoughts; the stage only drops steps; prompts are bare."""
    config = CurriculumConfig(method="no_thought", c_thought=2, max_latent_stage=3)
    bare = build_training_example(text_record(), 0, tokenizer, CurriculumConfig(method="cot"))["prompt"]
    completions = []
    for stage in range(5):
        example = build_training_example(text_record(), stage, tokenizer, config)
        assert example["prompt"] == bare and example["num_latents"] == 0
        assert build_eval_prompt(text_record(), stage, tokenizer, config)["prompt"] == bare
        completions.append(example["completion"])
    assert completions == [
        "Step number 0.\nStep number 1.\nStep number 2.\n### Tom is a wumpus.<|im_end|>",
        "Step number 1.\nStep number 2.\n### Tom is a wumpus.<|im_end|>",
        "Step number 2.\n### Tom is a wumpus.<|im_end|>",
        "### Tom is a wumpus.<|im_end|>",
        "### Tom is a wumpus.<|im_end|>",
    ]
    for text in completions + [bare]:
        assert START_LATENT not in text and END_LATENT not in text and LATENT not in text
    # Labels: everything after the question, as the reference's mask of len(question) + 0 thoughts + 0 markers.
    _, labels = collate_one(tokenizer, text_record(), 1, config)
    num_prompt = len(tokenizer(bare, add_special_tokens=False)["input_ids"])
    assert labels[:num_prompt] == [-100] * num_prompt
    assert -100 not in labels[num_prompt:]
    # uniform_prob redraws its stages as it does coconut's (the reference draws them for every method).
    mixed = CurriculumConfig(method="no_thought", uniform_prob=1.0)
    stages = {build_training_example(text_record(), 0, tokenizer, mixed, random.Random(i))["stage"] for i in range(50)}
    assert stages == {0, 1, 2, 3}


def test_images_become_placeholders_in_order(tokenizer):
    two_images = text_record(images=["a.png", "b.png"])
    prompt = build_eval_prompt(two_images, 0, tokenizer, CurriculumConfig())["prompt"]
    # However the chat template renders an image part, it renders it twice, before the question.
    one = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q"}]}]
    image_text = tokenizer.apply_chat_template(one, tokenize=False).split("user\n", 1)[1].split("Q")[0]
    assert image_text
    assert prompt.startswith(f"<|im_start|>user\n{image_text * 2}Is Tom a wumpus?<|im_end|>")
    inline = user_content("Left <image> right <image> same?", 2)
    assert [part["type"] for part in inline] == ["text", "image", "text", "image", "text"]
    with pytest.raises(ValueError, match="3 <image> placeholders but 2 images \\(more placeholders than images\\)"):
        user_content("<image><image><image>", 2, "Record 'x'")


def test_uniform_prob_is_seeded_and_covers_every_stage(tokenizer):
    config = CurriculumConfig(c_thought=1, max_latent_stage=3, uniform_prob=1.0)
    record = text_record(num_steps=3)

    def stages(seed):
        rng = random.Random(seed)
        return [build_training_example(record, 0, tokenizer, config, rng)["stage"] for _ in range(200)]

    assert stages(1) == stages(1)
    assert stages(1) != stages(2)
    counts = Counter(stages(1))
    assert sorted(counts) == [0, 1, 2, 3] and min(counts.values()) > 30  # uniform over 0..num_steps
    with pytest.raises(ValueError, match="`rng` is required when `uniform_prob` > 0"):
        build_training_example(record, 0, tokenizer, config)
    half = CurriculumConfig(uniform_prob=0.5)
    drawn = [build_training_example(record, 9, tokenizer, half, random.Random(i))["stage"] for i in range(200)]
    assert 70 < sum(stage == 9 for stage in drawn) < 130  # the scheduled stage half of the time


def collate_one(tokenizer, record: dict, stage: int, config: CurriculumConfig) -> tuple[list[int], list[int]]:
    """The training collator's input ids and labels of `record` alone at `stage` (a tokenizer serves text-only data)."""
    batch = CoconutDataCollator(tokenizer, [record], config)([{"epoch": 0, "sample": 0, "stage": stage}])
    return batch["input_ids"][0].tolist(), batch["labels"][0].tolist()


@pytest.mark.parametrize("method", ["coconut", "cot", "no_cot", "no_thought", "pause_as_thought"])
def test_pieces_tokenize_like_the_full_text_on_prosqa(prosqa, tokenizer, method):
    """The collator tokenizes prompt and completion apart; on byte-level BPE that equals the full text's tokens."""
    config = CurriculumConfig(method=method, c_thought=2, max_latent_stage=3)
    latent_id = tokenizer.convert_tokens_to_ids(LATENT)
    for record in prosqa:
        for stage in range(len(record["steps"]) + 2):
            example = build_training_example(record, stage, tokenizer, config)
            input_ids, labels = collate_one(tokenizer, record, stage, config)
            full = tokenizer(example["prompt"] + example["completion"], add_special_tokens=False)["input_ids"]
            assert input_ids == full, (record["id"], stage)
            num_masked = labels.count(-100)
            assert labels[num_masked:] == input_ids[num_masked:]
            assert tokenizer.decode(input_ids[num_masked:]) == example["completion"]
            assert input_ids.count(latent_id) == example["num_latents"]
            assert -100 not in labels[num_masked:]


def test_stage_zero_matches_the_original_coconut_check(prosqa, tokenizer):
    # Coconut's get_dataset: question + "\n" + steps joined by "\n" + "\n### " + answer, then EOS.
    config = CurriculumConfig(method="cot")
    for record in prosqa:
        example = build_training_example(record, 0, tokenizer, config)
        body = "\n".join(record["steps"]) + "\n### " + record["answer"]
        assert example["completion"] == body + tokenizer.eos_token


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("method", "coconuts", "`method` must be one of"),
        ("c_thought", 0, "`c_thought` must be >= 1, got 0"),
        ("max_latent_stage", -1, "`max_latent_stage` must be >= 0, got -1"),
        ("uniform_prob", 1.5, "`uniform_prob` must be in \\[0, 1\\], got 1.5"),
    ],
)
def test_config_validation(field, value, message):
    with pytest.raises(ValueError, match=message):
        CurriculumConfig(**{field: value})
