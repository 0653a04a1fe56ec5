"""`generate` with continuous thoughts against a naive decode (each prompt alone, everything recomputed per token)."""

import pytest
import torch
from conftest import (
    BAD_COUNTS,
    END,
    FIRST_TEXT_ID,
    INTEGRAL_COUNTS,
    LATENT,
    PAD,
    Row,
    build_batch,
    counting_passes,
    tiny_model,
)
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from coconut.reference import reference_greedy as coconut_reference_greedy
from coconut.reference import reference_logits


EOS = FIRST_TEXT_ID
TOLERANCE = 1e-5
MIXED_PROMPTS = [
    Row(latents=3, answer=0, images=[1]),
    Row(latents=0, answer=0, images=[2], lead=4),
    Row(latents=5, answer=0, images=[], lead=1),
    Row(latents=1, answer=0, images=[1, 1], lead=2),
]


def reference_greedy(model, ids, pixel_values, max_new_tokens):
    return coconut_reference_greedy(model, ids, pixel_values, max_new_tokens, EOS)


def generated_rows(sequences: torch.Tensor, prompt_length: int) -> list[list[int]]:
    """New tokens of each row, up to and including EOS (the rest is padding)."""
    rows = []
    for row in sequences[:, prompt_length:].tolist():
        rows.append(row[: row.index(EOS) + 1] if EOS in row else row)
    return rows


def prompt_inputs(batch: dict) -> dict:
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if batch["pixel_values"] is not None:
        inputs["pixel_values"] = batch["pixel_values"]
    return inputs


@pytest.fixture(scope="module")
def model():
    model = tiny_model(seed=1)
    model.generation_config.pad_token_id = PAD
    model.generation_config.eos_token_id = EOS
    return model


@pytest.mark.parametrize("cache_implementation", [None, "static"])
def test_greedy_equals_reference_decode(model, cache_implementation):
    batch = build_batch(MIXED_PROMPTS, padding_side="left")
    output = model.generate(
        **prompt_inputs(batch), max_new_tokens=8, do_sample=False, cache_implementation=cache_implementation
    )
    got = generated_rows(output, batch["input_ids"].shape[1])
    for b, ids in enumerate(batch["sequences"]):
        assert got[b] == reference_greedy(model, ids, batch["pixel_rows"][b], 8), f"row {b}"


def test_num_latent_thoughts_appends_the_block(model):
    batch = build_batch([Row(latents=0, answer=0, lead=lead) for lead in (0, 3, 1)], padding_side="left")
    counts = [2, 0, 4]
    output = model.generate(**prompt_inputs(batch), num_latent_thoughts=counts, max_new_tokens=6, do_sample=False)
    prompt_length = batch["input_ids"].shape[1] + max(counts) + 2
    got = generated_rows(output, prompt_length)
    for b, ids in enumerate(batch["sequences"]):
        block = [model.config.start_latent_token_id] + [LATENT] * counts[b] + [model.config.end_latent_token_id]
        prompt = output[b, :prompt_length][output[b, :prompt_length] != PAD].tolist()
        assert prompt == ids + block
        assert got[b] == reference_greedy(model, ids + block, batch["pixel_rows"][b], 6), f"row {b}"


def test_first_scores_equal_reference_logits(model):
    batch = build_batch(MIXED_PROMPTS, padding_side="left")
    output = model.generate(
        **prompt_inputs(batch), max_new_tokens=1, do_sample=False, return_dict_in_generate=True, output_logits=True
    )
    for b, ids in enumerate(batch["sequences"]):
        with torch.no_grad():
            expected = reference_logits(model, ids, batch["pixel_rows"][b])[-1]
        assert (output.logits[0][b] - expected).abs().max() <= TOLERANCE


def test_latent_token_is_never_generated(model):
    batch = build_batch(MIXED_PROMPTS[:2], padding_side="left")
    with torch.no_grad():
        model.lm_head.weight[LATENT] *= 50  # make `<|latent|>` the most likely token almost everywhere
    try:
        output = model.generate(
            **prompt_inputs(batch), max_new_tokens=5, do_sample=False, return_dict_in_generate=True, output_scores=True
        )
    finally:
        with torch.no_grad():
            model.lm_head.weight[LATENT] /= 50
    new_tokens = output.sequences[:, batch["input_ids"].shape[1] :]
    assert not (new_tokens == LATENT).any()
    assert all(torch.isinf(scores[:, LATENT]).all() for scores in output.scores)


def test_beam_search_and_return_sequences(model):
    batch = build_batch(MIXED_PROMPTS, padding_side="left")
    output = model.generate(
        **prompt_inputs(batch),
        max_new_tokens=5,
        num_beams=3,
        num_return_sequences=2,
        do_sample=False,
        return_dict_in_generate=True,
        output_scores=True,
    )
    assert output.sequences.shape[0] == len(MIXED_PROMPTS) * 2
    prompts = batch["input_ids"].repeat_interleave(2, dim=0)
    assert torch.equal(output.sequences[:, : prompts.shape[1]], prompts)
    assert output.sequences_scores.shape == (len(MIXED_PROMPTS) * 2,)
    # One beam is greedy search.
    single_beam = model.generate(**prompt_inputs(batch), max_new_tokens=5, num_beams=1, do_sample=False)
    greedy = model.generate(**prompt_inputs(batch), max_new_tokens=5, do_sample=False)
    assert torch.equal(single_beam, greedy)


def test_beam_search_best_sequence_matches_reference_score(model):
    """The best beam's score is its log-probability under the reference model, divided by its new-token count."""
    batch = build_batch(MIXED_PROMPTS[:2], padding_side="left")
    output = model.generate(
        **prompt_inputs(batch),
        max_new_tokens=4,
        num_beams=3,
        do_sample=False,
        length_penalty=1.0,
        return_dict_in_generate=True,
        output_scores=True,
    )
    for b, ids in enumerate(batch["sequences"]):
        new = generated_rows(output.sequences[b : b + 1], batch["input_ids"].shape[1])[0]
        with torch.no_grad():
            logits = reference_logits(model, ids + new, batch["pixel_rows"][b])
        # Beam search takes log-softmax before the logits processors, so the suppressed latent keeps its mass.
        log_probs = logits.log_softmax(-1)
        total = sum(log_probs[len(ids) - 1 + i, token].item() for i, token in enumerate(new))
        expected = total / len(new)
        assert abs(output.sequences_scores[b].item() - expected) <= 1e-4


def test_sampling_is_seeded_and_shaped(model):
    batch = build_batch(MIXED_PROMPTS, padding_side="left")
    settings = dict(do_sample=True, temperature=0.8, top_p=0.9, top_k=20, max_new_tokens=6, num_return_sequences=3)
    torch.manual_seed(7)
    first = model.generate(**prompt_inputs(batch), **settings)
    torch.manual_seed(7)
    second = model.generate(**prompt_inputs(batch), **settings)
    assert torch.equal(first, second)
    assert first.shape[0] == len(MIXED_PROMPTS) * 3
    assert first.shape[1] <= batch["input_ids"].shape[1] + 6


class CollectingStreamer(BaseStreamer):
    def __init__(self):
        self.chunks = []

    def put(self, value):
        self.chunks.append(value.clone())

    def end(self):
        self.chunks.append(None)


class StopAfter(StoppingCriteria):
    def __init__(self, length: int):
        self.length = length

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), input_ids.shape[1] >= self.length, dtype=torch.bool)


def test_streamer_and_stopping_criteria(model):
    batch = build_batch(MIXED_PROMPTS[:1], padding_side="left")
    prompt_length = batch["input_ids"].shape[1]
    streamer = CollectingStreamer()
    output = model.generate(
        **prompt_inputs(batch),
        max_new_tokens=10,
        do_sample=False,
        streamer=streamer,
        stopping_criteria=StoppingCriteriaList([StopAfter(prompt_length + 3)]),
        eos_token_id=None,
    )
    assert output.shape[1] == prompt_length + 3
    assert streamer.chunks[-1] is None
    streamed = torch.cat([chunk.flatten() for chunk in streamer.chunks[1:-1]])
    assert torch.equal(streamed, output[0, prompt_length:])


def test_right_padded_prompts_with_thoughts_are_an_error(model):
    batch = build_batch(MIXED_PROMPTS, padding_side="right")
    with pytest.raises(ValueError, match="left padding"):
        model.generate(**prompt_inputs(batch), max_new_tokens=2)


def test_generation_config_suppresses_the_latent_block_once(model, tmp_path):
    """Stored in the generation config (and saved with the model), not added by every `generate` call."""
    block = [model.config.start_latent_token_id, model.config.end_latent_token_id, LATENT]
    assert sorted(model.generation_config.suppress_tokens) == sorted(block)
    model.save_pretrained(tmp_path)
    saved = GenerationConfig.from_pretrained(tmp_path)
    assert sorted(saved.suppress_tokens) == sorted(block)
    before = model.generation_config.to_dict()
    model.generate(**prompt_inputs(build_batch(MIXED_PROMPTS[:1], padding_side="left")), max_new_tokens=2)
    assert model.generation_config.to_dict() == before


def test_thoughts_asked_for_twice_are_an_error(model):
    """A prompt that already holds a latent block, plus `num_latent_thoughts`, would stack two blocks."""
    batch = build_batch([Row(latents=0, answer=0), Row(latents=2, answer=0, lead=1)], padding_side="left")
    with pytest.raises(ValueError, match=r"Prompts \[1\] already hold a latent block"):
        model.generate(**prompt_inputs(batch), num_latent_thoughts=3, max_new_tokens=2)


@pytest.mark.parametrize("count", INTEGRAL_COUNTS)
def test_integral_thought_counts_of_any_type_are_accepted(model, count):
    batch = build_batch([Row(latents=0, answer=0), Row(latents=0, answer=0, lead=2)], padding_side="left")
    expected = model.generate(**prompt_inputs(batch), num_latent_thoughts=2, max_new_tokens=3, do_sample=False)
    got = model.generate(**prompt_inputs(batch), num_latent_thoughts=count, max_new_tokens=3, do_sample=False)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("count, match", BAD_COUNTS)
def test_bad_thought_counts_are_an_error(model, count, match):
    batch = build_batch([Row(latents=0, answer=0), Row(latents=0, answer=0, lead=2)], padding_side="left")
    with pytest.raises(ValueError, match=match):
        model.generate(**prompt_inputs(batch), num_latent_thoughts=count, max_new_tokens=2)


def test_thoughts_past_max_position_embeddings_are_an_error_before_any_work(model):
    batch = build_batch([Row(latents=0, answer=0)], padding_side="left")
    limit = model.config.text_config.max_position_embeddings
    with (
        counting_passes(model) as calls,
        pytest.raises(ValueError, match=f"past the model's `max_position_embeddings` \\({limit}\\)"),
    ):
        model.generate(**prompt_inputs(batch), num_latent_thoughts=10**6, max_new_tokens=2)
    assert calls == []


def test_image_tokens_without_pixel_values_are_an_error_in_generate(model):
    batch = build_batch(MIXED_PROMPTS[:2], padding_side="left")
    inputs = {key: value for key, value in prompt_inputs(batch).items() if key != "pixel_values"}
    with pytest.raises(ValueError, match="image tokens \\(id 1\\) but neither `pixel_values`"):
        model.generate(**inputs, max_new_tokens=2)


def test_pixel_values_without_tiles_are_an_error_in_generate(model):
    batch = build_batch(MIXED_PROMPTS[:1], padding_side="left")
    inputs = {**prompt_inputs(batch), "pixel_values": batch["pixel_values"][:0]}
    with pytest.raises(ValueError, match="`pixel_values` holds 0 image tiles"):
        model.generate(**inputs, max_new_tokens=2)


def test_prompt_embeddings_with_their_ids_generate_as_the_ids(model):
    """`inputs_embeds` together with `input_ids`: the ids say where the thoughts are, so the thoughts are fed back."""
    batch = build_batch(MIXED_PROMPTS, padding_side="left")
    inputs = prompt_inputs(batch)
    embeds = model.get_input_embeddings()(inputs["input_ids"])
    expected = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    got = model.generate(**inputs, inputs_embeds=embeds, max_new_tokens=6, do_sample=False)
    assert torch.equal(got, expected)


def test_prompt_embeddings_without_ids_are_refused_before_any_work(model):
    """Embeddings alone cannot say which positions are thoughts: generating would skip them, so it is refused."""
    batch = build_batch(MIXED_PROMPTS[:1], padding_side="left")
    inputs = prompt_inputs(batch)
    embeds = model.get_input_embeddings()(inputs.pop("input_ids"))
    with counting_passes(model) as calls, pytest.raises(ValueError, match="at 3 positions .* Pass `input_ids`"):
        model.generate(**inputs, inputs_embeds=embeds, max_new_tokens=2)
    assert calls == []
    with pytest.raises(ValueError, match="got `inputs_embeds` too"):
        model.generate(**prompt_inputs(batch), inputs_embeds=embeds, num_latent_thoughts=2, max_new_tokens=2)


@pytest.mark.parametrize(
    "swap, match",
    [
        ("start_and_end", r"Prompt 0's latent tokens read <\|end-latent\|> <\|latent\|> .* <\|start-latent\|>"),
        ("no_end", r"Prompt 0 ends inside a latent block"),
    ],
)
def test_misread_latent_blocks_are_refused_in_generate(model, swap, match):
    """A config whose start and end ids are swapped reads the processor's blocks backwards: refused, not answered."""
    batch = build_batch(MIXED_PROMPTS[:1], padding_side="left")
    inputs = prompt_inputs(batch)
    if swap == "start_and_end":
        inputs["input_ids"] = inputs["input_ids"].clone()
        starts, ends = inputs["input_ids"] == model.config.start_latent_token_id, inputs["input_ids"] == END
        inputs["input_ids"][starts], inputs["input_ids"][ends] = END, model.config.start_latent_token_id
    else:
        inputs = {key: value[:, :-1] if key != "pixel_values" else value for key, value in inputs.items()}
    with counting_passes(model) as calls, pytest.raises(ValueError, match=match):
        model.generate(**inputs, max_new_tokens=2)
    assert calls == []
