"""Thoughts rescaled to the token embeddings' norm: the logits stay, the fed-back vectors shrink."""

import pytest
import torch
from conftest import LATENT, Row, build_batch, model_inputs, tiny_model

from coconut.thought_scale import match_thought_scale


def test_logits_stay_and_thoughts_take_the_embedding_norm():
    model = tiny_model()
    with torch.no_grad():
        model.model.language_model.norm.weight.fill_(1.0)  # as initialised: thoughts about 5 times a token's norm
    text = {key: value for key, value in model_inputs(build_batch([Row(latents=0), Row(latents=0, lead=2)])).items()}
    batch = build_batch([Row(latents=3), Row(latents=1, lead=2)])
    inputs = {key: value for key, value in model_inputs(batch).items() if key != "labels"}
    with torch.no_grad():
        text_before = model(**text).logits
        before = model(**inputs, output_hidden_states=True)
        scale = match_thought_scale(model)
        text_after = model(**text).logits
        after = model(**inputs, output_hidden_states=True)
    # Without thoughts the model computes the same logits: only the vector fed back as a thought changes.
    largest = (text_after - text_before).abs().max().item()
    assert largest < 1e-4 * text_before.abs().max().item(), f"logits moved by {largest}"
    assert 0.1 < scale < 0.3
    columns = (batch["input_ids"] == LATENT).nonzero()
    thoughts = after.hidden_states[-1][columns[:, 0], columns[:, 1] - 1]  # the vectors fed back, (N, H)
    embedding_norm = model.get_input_embeddings().weight.norm(dim=-1).mean()
    ratio = (thoughts.norm(dim=-1) / embedding_norm).tolist()
    assert all(0.5 < r < 2 for r in ratio), ratio  # before: about 1 / scale times larger
    old_ratio = (before.hidden_states[-1][columns[:, 0], columns[:, 1] - 1].norm(dim=-1) / embedding_norm).min()
    assert old_ratio > 2


def test_a_tied_head_is_refused():
    model = tiny_model(tie_word_embeddings=True)
    model.tie_weights()
    with pytest.raises(ValueError, match="The LM head is tied to the input embeddings"):
        match_thought_scale(model)
