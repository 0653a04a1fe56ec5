"""The thoughts of a prompt: read exactly, fed back by hand, replaced (the causal test), and decoded (the reader)."""

import json

import pytest
import torch
from conftest import LATENT, Row, build_batch, tiny_model
from test_evaluate_script import PARSER, SLICE, save_tiny_model
from trl import TrlParser

from coconut.interventions import intervened_generate, replaced_thoughts, rolled_images
from coconut.reference import reference_embeddings
from coconut.thought_reader import names_right_cell, own_head_decoder, read_thoughts, reader_scores
from coconut.thoughts import embeds_with_thoughts, thought_vectors
from evaluate import main


ROWS = [Row(latents=3, images=[1]), Row(latents=2, images=[1], lead=3), Row(latents=3, images=[1], question=7)]


def prompt_batch(rows=ROWS):
    """Left-padded prompts (question, image, latent block; no answer) and each row's pixels."""
    batch = build_batch([Row(**{**vars(row), "answer": 0}) for row in rows], padding_side="left")
    inputs = {key: batch[key] for key in ("input_ids", "attention_mask", "pixel_values")}
    return inputs, batch


def test_thought_vectors_equal_the_reference_thoughts():
    model = tiny_model()
    inputs, batch = prompt_batch()
    thoughts = thought_vectors(model, inputs)
    worst = 0.0
    for row, (ids, pixels) in enumerate(zip(batch["sequences"], batch["pixel_rows"], strict=True)):
        expected = reference_embeddings(model, ids, pixels)[0]
        columns = [i for i, token in enumerate(ids) if token == LATENT]
        assert thoughts[row].shape == (len(columns), model.config.text_config.hidden_size)
        worst = max(worst, (thoughts[row] - expected[columns]).abs().max().item())
    assert worst < 1e-5, f"max difference to the reference thoughts: {worst:.2e}"


def test_feeding_the_own_thoughts_by_hand_gives_the_models_answer():
    model = tiny_model()
    inputs, _ = prompt_batch()
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    expected = model.generate(**inputs, **kwargs)[:, inputs["input_ids"].shape[1] :]
    embeds = embeds_with_thoughts(model, inputs, thought_vectors(model, inputs))
    assert torch.equal(
        model.generate(inputs_embeds=embeds, attention_mask=inputs["attention_mask"], **kwargs), expected
    )
    zeroed, _ = intervened_generate(model, inputs, "zero", torch.Generator(), **kwargs)
    assert not torch.equal(zeroed, expected)  # on this model, the answer depends on the thoughts


def test_each_intervention_replaces_every_thought_as_documented():
    torch.manual_seed(0)
    thoughts = [torch.randn(3, 8), torch.randn(2, 8), torch.randn(3, 8), torch.randn(1, 8)]
    zero, _ = replaced_thoughts("zero", thoughts, torch.Generator())
    assert all(torch.equal(row, torch.zeros_like(original)) for row, original in zip(zero, thoughts, strict=True))
    noise, _ = replaced_thoughts("noise", thoughts, torch.Generator().manual_seed(1))
    for row, original in zip(noise, thoughts, strict=True):
        torch.testing.assert_close(row.norm(dim=-1), original.norm(dim=-1))
        assert not torch.allclose(row, original)
    shuffled, unchanged = replaced_thoughts("shuffle", thoughts, torch.Generator())
    assert torch.equal(shuffled[0], thoughts[2]) and torch.equal(shuffled[2], thoughts[0])  # the rows with 3 thoughts
    assert unchanged == 2  # the only row with 2 thoughts and the only row with 1 keep their own
    other = [torch.ones(3, 8)] * 4
    assert replaced_thoughts("other_board", thoughts, torch.Generator(), lambda: other)[0] is other
    with pytest.raises(ValueError, match="at least two questions"):
        rolled_images([["board"]])


def test_other_board_takes_the_thoughts_of_the_same_prompt_with_another_image():
    model = tiny_model()
    inputs, batch = prompt_batch([Row(latents=3, images=[1]), Row(latents=3, images=[1])])
    other = dict(inputs, pixel_values=torch.cat(rolled_images(batch["pixel_rows"])))  # each row the other's image
    kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    new_tokens, _ = intervened_generate(model, inputs, "other_board", torch.Generator(), other, **kwargs)
    embeds = embeds_with_thoughts(model, inputs, thought_vectors(model, other))
    expected = model.generate(inputs_embeds=embeds, attention_mask=inputs["attention_mask"], **kwargs)
    assert torch.equal(new_tokens, expected)


@pytest.mark.parametrize(
    "decoded, gold, right",
    [
        ("B3 points up to B2.", "B3 points up to B2.", True),
        ("A1 points up to B2", "B3 points up to B2.", True),
        ("B3 points up to C2.", "B3 points up to B2.", False),
        ("", "B3 points up to B2.", False),
        ("Tom is a wumpus.", "Tom is a wumpus.", True),
        ("Tom is a rempus.", "Tom is a wumpus.", False),
    ],
)
def test_names_right_cell(decoded, gold, right):
    assert names_right_cell(decoded, gold) is right


def test_evaluate_reports_interventions_and_the_reader(saved_model_with_latents, tmp_path):
    model_dir = saved_model_with_latents
    argv = ["--model", str(model_dir), "--dataset", str(SLICE.parent), "--split", "valid_slice", "--stage", "2"]
    argv += ["--max_latent_stage", "6", "--max_samples", "4", "--max_new_tokens", "4", "--batch_size", "4"]
    argv += ["--output_dir", str(tmp_path / "eval"), "--disable_tqdm", "--interventions", "zero", "noise", "shuffle"]
    argv += ["--read_thoughts", "true"]
    main(*TrlParser(PARSER).parse_args_and_config(argv))
    saved = json.loads((tmp_path / "eval" / "eval_results.json").read_text())
    assert list(saved["interventions"]) == ["zero", "noise", "shuffle"]
    assert all(0.0 <= value <= 1.0 for value in saved["interventions"].values())
    reader = saved["thought_reader"]
    assert reader["decoder"] == "the model's own LM head" and reader["num_thoughts"] == 4 * 2
    assert list(reader["right_cell_by_step"]) == ["1", "2"] and len(reader["examples"]) == 3

    main(*TrlParser(PARSER).parse_args_and_config([*argv, "--update_model_card"]))
    card = (model_dir / "README.md").read_text()
    for heading in ("## Evaluation", "## Thought interventions", "## Decoded thoughts"):
        assert card.count(heading) == 1, heading
    assert "| zero |" in card and "| unchanged |" in card and "| Stage |" in card  # each section kept its table

    with pytest.raises(ValueError, match="some records have no image"):
        main(*TrlParser(PARSER).parse_args_and_config([*argv, "--interventions", "other_board"]))
    with pytest.raises(ValueError, match="unknown \\['swap'\\]"):
        TrlParser(PARSER).parse_args_and_config([*argv, "--interventions", "swap"])
    with pytest.raises(ValueError, match="only a coconut model feeds"):
        main(*TrlParser(PARSER).parse_args_and_config([*argv, "--method", "cot"]))


@pytest.fixture
def saved_model_with_latents(tmp_path, hf_home):
    return save_tiny_model(tmp_path / "model")[0]


def test_read_thoughts_decodes_one_text_per_replaced_step():
    from coconut.curriculum import CurriculumConfig
    from coconut.data import load_coconut_json
    from coconut.tiny import tiny_coconut_config_for
    from coconut.tokenizer import train_tokenizer
    from modeling_coconut_internvl import CoconutInternVLForConditionalGeneration

    records = load_coconut_json(SLICE).select(range(3))
    tokenizer = train_tokenizer([r["question"] + " ".join(r["steps"]) for r in records], vocab_size=300)
    torch.manual_seed(0)
    model = CoconutInternVLForConditionalGeneration(tiny_coconut_config_for(tokenizer)).eval()
    curriculum = CurriculumConfig(method="coconut", c_thought=2, max_latent_stage=6)
    readings = read_thoughts(model, tokenizer, own_head_decoder(model), records, curriculum, stage=3, batch_size=2)
    assert [reading["id"] for reading in readings] == list(records["id"])
    for reading, record in zip(readings, records, strict=True):
        steps = min(3, len(record["steps"]))
        assert [thought["step"] for thought in reading["thoughts"]] == list(range(1, steps + 1))
        assert [thought["gold"] for thought in reading["thoughts"]] == record["steps"][:steps]
        assert all("\n" not in thought["text"] for thought in reading["thoughts"])
    scores = reader_scores(readings)
    assert scores["num_thoughts"] == sum(len(reading["thoughts"]) for reading in readings)
