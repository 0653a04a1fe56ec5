"""The latent forward against the reference (each row alone, the whole prefix recomputed per thought)."""

import pytest
import torch
from conftest import (
    LATENT,
    PAD,
    Row,
    build_batch,
    model_inputs,
    real_columns,
    tiny_config,
    tiny_model,
)
from transformers import InternVLForConditionalGeneration

from coconut.reference import reference_logits
from modeling_coconut_internvl import plan_latent_passes


TOLERANCE = 1e-5

BATCHES = {
    "aligned": [Row(), Row()],
    "misaligned_latents": [Row(lead=0, latents=2), Row(lead=3, latents=4), Row(lead=7, latents=1)],
    "row_without_latents": [Row(latents=3), Row(latents=0, answer=6)],
    "row_without_image": [Row(images=[]), Row(images=[1], lead=2)],
    "several_images_and_tiles": [Row(images=[2, 1]), Row(images=[3], lead=1, latents=5)],
    "one_row_many_thoughts": [Row(latents=8, question=1)],
}


def max_difference_to_reference(model, batch) -> float:
    with torch.no_grad():
        logits = model(**model_inputs(batch)).logits
        worst = 0.0
        for b, ids in enumerate(batch["sequences"]):
            expected = reference_logits(model, ids, batch["pixel_rows"][b])
            got = logits[b, real_columns(batch["attention_mask"][b])]
            worst = max(worst, (got - expected).abs().max().item())
    return worst


@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("name", list(BATCHES))
def test_latent_forward_matches_reference(model, name, padding_side):
    batch = build_batch(BATCHES[name], padding_side=padding_side)
    difference = max_difference_to_reference(model, batch)
    assert difference <= TOLERANCE, f"{name}, {padding_side} padding: max abs difference {difference:.2e}"


def test_thoughts_change_the_logits(model):
    """Guards the reference comparison: feeding plain `<|latent|>` embeddings must give clearly different logits."""
    batch = build_batch(BATCHES["aligned"])
    with torch.no_grad():
        coconut = model(**model_inputs(batch)).logits
        plain = InternVLForConditionalGeneration.forward(model, **model_inputs(batch)).logits
    after_first_thought = (batch["input_ids"] == LATENT).int().cumsum(-1) > 1
    assert (coconut - plain)[after_first_thought].abs().max() > 1e-2


def test_misaligned_rows_need_their_own_passes():
    """The original Coconut advanced one column per pass from the batch's earliest latent; each column is a pass."""
    batch = build_batch(BATCHES["misaligned_latents"])
    latent_mask = batch["input_ids"] == LATENT
    ranges = plan_latent_passes(latent_mask)
    assert len(ranges) == len(set(latent_mask.nonzero()[:, 1].tolist())) + 1
    assert [start for start, _ in ranges[1:]] == sorted(set(latent_mask.nonzero()[:, 1].tolist()))


def test_loss_and_logits_to_keep(model):
    batch = build_batch(BATCHES["misaligned_latents"], padding_side="right")
    with torch.no_grad():
        full = model(**model_inputs(batch))
        inputs = {key: value for key, value in model_inputs(batch).items() if key != "labels"}
        last = model(**inputs, logits_to_keep=3)
        reference = []
        for b, ids in enumerate(batch["sequences"]):
            reference.append(reference_logits(model, ids, batch["pixel_rows"][b]))
    torch.testing.assert_close(last.logits, full.logits[:, -3:], rtol=0, atol=TOLERANCE)

    # The reference loss: every row alone, then the same token-mean over the batch as `self.loss_function`.
    shift_logits, shift_labels = [], []
    for b, logits in enumerate(reference):
        labels = batch["labels"][b, real_columns(batch["attention_mask"][b])]
        shift_logits.append(logits[:-1])
        shift_labels.append(labels[1:])
    expected = torch.nn.functional.cross_entropy(torch.cat(shift_logits), torch.cat(shift_labels), ignore_index=-100)
    assert abs(full.loss.item() - expected.item()) <= TOLERANCE


def test_cache_holds_every_position(model):
    """Continuing from the returned cache gives the same next-token logits as the full sequence."""
    batch = build_batch([Row(answer=3)])
    ids = batch["input_ids"]
    with torch.no_grad():
        out = model(input_ids=ids[:, :-1], pixel_values=batch["pixel_values"], use_cache=True)
        assert out.cache.get_seq_length() == ids.shape[1] - 1
        step = model(input_ids=ids[:, -1:], cache=out.cache)
        full = model(input_ids=ids, pixel_values=batch["pixel_values"])
    torch.testing.assert_close(step.logits[:, -1], full.logits[:, -1], rtol=0, atol=TOLERANCE)


def test_without_latents_equals_parent(model):
    batch = build_batch([Row(latents=0), Row(latents=0, lead=3, images=[2])], padding_side="left")
    parent = InternVLForConditionalGeneration(tiny_config()).eval()
    parent.load_state_dict(model.state_dict())
    with torch.no_grad():
        ours = model(**model_inputs(batch), use_cache=True)
        theirs = parent(**model_inputs(batch), use_cache=True)
    assert torch.equal(ours.logits, theirs.logits)
    assert torch.equal(ours.loss, theirs.loss)
    for layer_ours, layer_theirs in zip(ours.cache.layers, theirs.cache.layers):
        assert torch.equal(layer_ours.keys, layer_theirs.keys)
        assert torch.equal(layer_ours.values, layer_theirs.values)


def reference_gradients(model, batch, detach_thoughts=False) -> dict:
    model.zero_grad()
    losses, count = 0.0, 0
    for b, ids in enumerate(batch["sequences"]):
        logits = reference_logits(model, ids, batch["pixel_rows"][b], detach_thoughts)
        labels = batch["labels"][b, real_columns(batch["attention_mask"][b])]
        losses = losses + torch.nn.functional.cross_entropy(logits[:-1], labels[1:], reduction="sum")
        count += (labels[1:] != -100).sum()
    (losses / count).backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def test_gradients_match_reference_through_every_thought():
    """The answer loss reaches the parameters through the chain of thoughts, exactly as in the reference."""
    model = tiny_model().train()
    batch = build_batch([Row(latents=4, answer=3), Row(latents=2, lead=2)], padding_side="left")
    model.zero_grad()
    model(**model_inputs(batch)).loss.backward()
    ours = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    reference = reference_gradients(model, batch)
    cut_at_thoughts = reference_gradients(model, batch, detach_thoughts=True)

    assert ours.keys() == reference.keys()
    worst = max((ours[name] - reference[name]).abs().max().item() for name in ours)
    assert worst <= TOLERANCE, f"max abs gradient difference {worst:.2e}"
    # The path through the thoughts carries real gradient: cutting it changes the result by far more than tolerance.
    through_thoughts = max((ours[name] - cut_at_thoughts[name]).abs().max().item() for name in ours)
    assert through_thoughts > 1e-3, f"gradient through the thoughts is only {through_thoughts:.2e}"
    assert ours["model.vision_tower.embeddings.patch_embeddings.projection.weight"].abs().sum() > 0


def test_forced_extra_passes_are_exact(model):
    """Splitting passes further (to agree on a pass count across ranks) does not change the result."""
    batch = build_batch(BATCHES["misaligned_latents"])
    latent_mask = batch["input_ids"] == LATENT
    natural = len(plan_latent_passes(latent_mask))
    ranges = plan_latent_passes(latent_mask, min_passes=natural + 5)
    assert len(ranges) == natural + 5
    assert ranges[0][0] == 0 and ranges[-1][1] == latent_mask.shape[1]
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))

    import modeling_coconut_internvl

    calls = []
    original = modeling_coconut_internvl.agree_on_pass_count
    modeling_coconut_internvl.agree_on_pass_count = lambda n, device: natural + 5
    handle = model.model.language_model.register_forward_hook(lambda *args: calls.append(1))
    try:
        with torch.no_grad():
            synced = model(**model_inputs(batch), sync_latent_passes=True).logits
            plain = model(**model_inputs(batch)).logits
    finally:
        modeling_coconut_internvl.agree_on_pass_count = original
        handle.remove()
    assert len(calls) == (natural + 5) + natural
    assert (synced - plain).abs().max() <= TOLERANCE


def test_single_column_sequences_still_make_the_agreed_number_of_calls():
    ranges = plan_latent_passes(torch.tensor([[False, True]]), min_passes=4)
    assert ranges == [(0, 1), (1, 2)]


@pytest.mark.parametrize(
    "ids, mask, match",
    [
        ([[LATENT, 11, 12]], None, "at column 0"),
        ([[PAD, LATENT, 12]], [[0, 1, 1]], "right after padding"),
    ],
)
def test_latent_without_a_position_before_it_is_an_error(model, ids, mask, match):
    kwargs = {"input_ids": torch.tensor(ids)}
    if mask is not None:
        kwargs["attention_mask"] = torch.tensor(mask)
    with pytest.raises(ValueError, match=match):
        model(**kwargs)


def test_output_attentions_with_latents_is_an_error(model):
    batch = build_batch([Row()])
    with pytest.raises(ValueError, match="output_attentions"):
        model(**model_inputs(batch), output_attentions=True)


def loss_grads_and_saved_bytes(model, batch):
    """Loss, parameter gradients, and the bytes autograd keeps for backward outside checkpointed regions."""
    saved = []

    def pack(tensor):
        saved.append(tensor.numel() * tensor.element_size())
        return tensor

    model.zero_grad()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(**model_inputs(batch)).loss
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, sum(saved)


def test_gradient_checkpointing_gives_the_same_loss_and_gradients_with_less_memory():
    batch = build_batch(BATCHES["misaligned_latents"], padding_side="left")
    model = tiny_model(num_hidden_layers=2).train()
    loss, grads, saved_bytes = loss_grads_and_saved_bytes(model, batch)
    model.activation_checkpointing_enable()
    checkpointed_loss, checkpointed_grads, checkpointed_bytes = loss_grads_and_saved_bytes(model, batch)

    assert abs(loss - checkpointed_loss) <= TOLERANCE
    worst = max((grads[name] - checkpointed_grads[name]).abs().max().item() for name in grads)
    assert worst <= TOLERANCE, f"max abs gradient difference {worst:.2e}"
    assert checkpointed_bytes < 0.6 * saved_bytes, (checkpointed_bytes, saved_bytes)
    # The layers give the cache back afterwards: a plain forward still checkpoints without it.
    assert not any("_can_checkpoint_with_cache" in vars(layer) for layer in model.model.language_model.layers)


def test_reentrant_gradient_checkpointing_with_latents_is_an_error():
    model = tiny_model().train()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    batch = build_batch([Row()])
    with pytest.raises(ValueError, match="use_reentrant=True"):
        model(**model_inputs(batch))


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"latent_token_id": 64}, "`latent_token_id`=64 is outside the text vocabulary"),
        ({"end_latent_token_id": -1}, "`end_latent_token_id`=-1 is outside"),
        ({"start_latent_token_id": LATENT}, "`start_latent_token_id`=2 is the same id as `latent_token_id`"),
        ({"latent_token_id": 1}, "`latent_token_id`=1 is the same id as `image_token_id`"),
    ],
)
def test_config_rejects_bad_token_ids(overrides, match):
    with pytest.raises(ValueError, match=match):
        tiny_config(**overrides)


def test_rank_without_latents_splits_its_passes_exactly(model, monkeypatch):
    """Under `sync_latent_passes`, a rank with no latents (ids or embeddings only) still makes the agreed calls."""
    import modeling_coconut_internvl

    batch = build_batch([Row(latents=0), Row(latents=0, lead=2)], padding_side="left")
    embeds = model.get_input_embeddings()(batch["input_ids"])
    monkeypatch.setattr(modeling_coconut_internvl, "agree_on_pass_count", lambda n, device: 4)
    calls = []
    handle = model.model.language_model.register_forward_hook(lambda *args: calls.append(1))
    try:
        with torch.no_grad():
            split = model(inputs_embeds=embeds, attention_mask=batch["attention_mask"], sync_latent_passes=True)
    finally:
        handle.remove()
    with torch.no_grad():
        plain = InternVLForConditionalGeneration.forward(
            model, inputs_embeds=embeds, attention_mask=batch["attention_mask"], position_ids=None
        )
    assert len(calls) == 4
    real = batch["attention_mask"].bool()
    # Positions from the mask (ours) and from 0 (the parent) differ by a constant per row: RoPE is relative.
    assert (split.logits - plain.logits)[real].abs().max() <= TOLERANCE
