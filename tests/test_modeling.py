"""The latent forward against the reference (each row alone, the whole prefix recomputed per thought)."""

from contextlib import contextmanager

import pytest
import torch
from conftest import (
    LATENT,
    PAD,
    Row,
    build_batch,
    cache_of,
    counting_passes,
    enable_checkpointing,
    model_inputs,
    real_columns,
    tiny_config,
    tiny_model,
)
from transformers import InternVLForConditionalGeneration
from transformers.cache_utils import DynamicCache

import modeling_coconut_internvl
from coconut.reference import reference_logits
from modeling_coconut_internvl import align_latent_rows, plan_latent_passes


TOLERANCE = 1e-5

BATCHES = {
    "aligned": [Row(), Row()],
    "misaligned_latents": [Row(lead=0, latents=2), Row(lead=3, latents=4), Row(lead=7, latents=1)],
    "row_without_latents": [Row(latents=3), Row(latents=0, answer=6)],
    "row_without_image": [Row(images=[]), Row(images=[1], lead=2)],
    "several_images_and_tiles": [Row(images=[2, 1]), Row(images=[3], lead=1, latents=5)],
    "one_row_many_thoughts": [Row(latents=8, question=1)],
    "blocks_far_apart": [Row(latents=2, answer=9), Row(latents=3, lead=6, answer=1)],
    "row_without_latents_between": [Row(latents=3, lead=5), Row(latents=0, answer=12), Row(latents=2)],
}
# Batches whose thought blocks start in different columns: the forward moves the rows so that every block starts in
# the same column, and makes (most thoughts in a row + 1) passes instead of one per latent column.
MOVED = [
    ("misaligned_latents", "right"),
    ("blocks_far_apart", "left"),
    ("blocks_far_apart", "right"),
    ("row_without_latents_between", "right"),
]
# Rows of one length (no padding) whose blocks start 4 columns apart.
SAME_LENGTH_ROWS = [Row(latents=2, answer=6, images=[]), Row(latents=2, lead=4, answer=2, images=[])]


def max_difference_to_reference(model, batch, **kwargs) -> float:
    with torch.no_grad():
        logits = model(**model_inputs(batch), **kwargs).logits
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


def latent_passes(model, inputs: dict) -> int:
    with counting_passes(model) as calls, torch.no_grad():
        model(**inputs)
    return len(calls)


def most_thoughts(batch) -> int:
    return int((batch["input_ids"] == LATENT).sum(dim=1).max())


@pytest.mark.parametrize("name, padding_side", MOVED)
def test_rows_move_so_their_thoughts_share_passes(model, name, padding_side):
    batch = build_batch(BATCHES[name], padding_side=padding_side)
    latent_mask = batch["input_ids"] == LATENT
    assert len(plan_latent_passes(latent_mask)) > most_thoughts(batch) + 1  # in place, more passes than thoughts
    assert align_latent_rows(latent_mask, batch["attention_mask"]) is not None
    assert latent_passes(model, model_inputs(batch)) == most_thoughts(batch) + 1
    difference = max_difference_to_reference(model, batch)
    assert difference <= TOLERANCE, f"{name}, {padding_side} padding: max abs difference {difference:.2e}"


@pytest.mark.parametrize("positions", [None, "one_row_for_all"])
def test_rows_without_attention_mask_move_too(model, positions):
    batch = build_batch(SAME_LENGTH_ROWS)
    assert batch["attention_mask"].all()
    inputs = {key: value for key, value in model_inputs(batch).items() if key != "attention_mask"}
    if positions == "one_row_for_all":  # `(1, sequence_length)`, broadcast over the batch
        inputs["position_ids"] = torch.arange(batch["input_ids"].shape[1])[None]
    assert latent_passes(model, inputs) == 2 + 1
    with torch.no_grad():
        logits = model(**inputs).logits
    for b, ids in enumerate(batch["sequences"]):
        expected = reference_logits(model, ids, batch["pixel_rows"][b])
        assert (logits[b] - expected).abs().max() <= TOLERANCE


def test_aligned_and_end_aligned_rows_stay_in_place():
    """Rows whose blocks already share their columns (the collator's and `generate`'s left padding) do not move."""
    for rows in (BATCHES["aligned"], BATCHES["misaligned_latents"], BATCHES["several_images_and_tiles"]):
        batch = build_batch(rows, padding_side="left")
        assert align_latent_rows(batch["input_ids"] == LATENT, batch["attention_mask"]) is None


def test_moved_rows_give_outputs_in_the_callers_layout(model, monkeypatch):
    """Hidden states, logits, loss and cache of moved rows equal those of the same rows computed in place."""
    batch = build_batch(BATCHES["misaligned_latents"], padding_side="right")
    inputs = model_inputs(batch)
    mask = batch["attention_mask"]
    with torch.no_grad():
        moved = model(**inputs, output_hidden_states=True)
        monkeypatch.setattr(modeling_coconut_internvl, "align_latent_rows", lambda *args: None)  # rows stay in place
        in_place = model(**inputs, output_hidden_states=True)
    assert moved.logits.shape == in_place.logits.shape == (*mask.shape, model.config.text_config.vocab_size)
    real = mask.bool()
    assert (moved.logits - in_place.logits)[real].abs().max() <= TOLERANCE
    assert abs(moved.loss - in_place.loss) <= TOLERANCE
    assert len(moved.hidden_states) == len(in_place.hidden_states) == model.config.text_config.num_hidden_layers + 1
    for ours, theirs in zip(moved.hidden_states, in_place.hidden_states):
        assert (ours - theirs)[real].abs().max() <= TOLERANCE
    for ours, theirs in zip(cache_of(moved).layers, cache_of(in_place).layers):
        assert ours.keys.shape == theirs.keys.shape
        assert (ours.keys - theirs.keys).transpose(1, 2)[real].abs().max() <= TOLERANCE
        assert (ours.values - theirs.values).transpose(1, 2)[real].abs().max() <= TOLERANCE


def test_moved_rows_fill_the_callers_empty_cache(model):
    """An empty cache passed in (as `generate` passes one) is the one that comes back, filled in the caller's layout."""
    batch = build_batch(BATCHES["blocks_far_apart"], padding_side="right")
    cache = DynamicCache()
    with torch.no_grad():
        output = model(**model_inputs(batch), cache=cache)
    assert cache_of(output) is cache
    assert cache.get_seq_length() == batch["input_ids"].shape[1]


def test_decoding_continues_from_the_cache_of_moved_rows(model):
    """The cache comes back in the caller's layout: a next token appended to each row sees its row's whole past."""
    batch = build_batch(BATCHES["blocks_far_apart"], padding_side="left")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with counting_passes(model) as calls, torch.no_grad():
        prefix = model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], pixel_values=batch["pixel_values"])
        assert len(calls) == most_thoughts(batch) + 1
        position = mask.sum(dim=1, keepdim=True) - 1  # as `generate` counts it: the row's own length
        step = model(input_ids=ids[:, -1:], attention_mask=mask, position_ids=position, cache=cache_of(prefix))
    for b, sequence in enumerate(batch["sequences"]):
        expected = reference_logits(model, sequence, batch["pixel_rows"][b])[-1]
        assert (step.logits[b, -1] - expected).abs().max() <= TOLERANCE


def positions_of(batch) -> torch.Tensor:
    """Each row's positions counted over its real tokens, as TRL's `padding_free` collator and `generate` give them."""
    mask = batch["attention_mask"]
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)


@pytest.mark.parametrize("name, padding_side", MOVED)
def test_explicit_positions_move_with_their_rows(model, name, padding_side):
    """With `position_ids` the rows move too, their positions with them: as many passes as without, still exact."""
    batch = build_batch(BATCHES[name], padding_side=padding_side)
    inputs = model_inputs(batch)
    with_positions = latent_passes(model, {**inputs, "position_ids": positions_of(batch)})
    assert with_positions == latent_passes(model, inputs) == most_thoughts(batch) + 1
    difference = max_difference_to_reference(model, batch, position_ids=positions_of(batch))
    assert difference <= TOLERANCE, f"{name}, {padding_side} padding: max abs difference {difference:.2e}"


def test_six_thoughts_far_apart_with_positions_cost_seven_passes(model):
    """Two rows with 6 thoughts each, 6 columns apart: 13 passes in place, 7 once the rows move, positions or not."""
    batch = build_batch([Row(latents=6, answer=7), Row(latents=6, lead=6, answer=2)], padding_side="right")
    assert len(plan_latent_passes(batch["input_ids"] == LATENT)) == 13
    assert latent_passes(model, {**model_inputs(batch), "position_ids": positions_of(batch)}) == 7
    assert max_difference_to_reference(model, batch, position_ids=positions_of(batch)) <= TOLERANCE


def packed(batch) -> dict:
    """The rows of `batch` packed into one, as TRL's `padding_free` collator packs them: restarting positions, no mask."""
    real = batch["attention_mask"].bool()
    return dict(
        input_ids=batch["input_ids"][real][None],
        position_ids=torch.cat([torch.arange(int(row.sum())) for row in real])[None],
        labels=batch["labels"][real][None],
        pixel_values=batch["pixel_values"],
    )


@pytest.mark.parametrize(
    "rows",
    [
        [Row(latents=2, answer=3), Row(latents=3, lead=2, answer=2)],
        [Row(latents=6, answer=7, images=[]), Row(latents=6, lead=6, answer=2, images=[]), Row(latents=0, answer=3)],
    ],
    ids=["two_sequences", "six_thoughts_each"],
)
def test_packed_sequences_get_a_row_each(model, rows):
    """TRL's `padding_free` packs sequences into one row with restarting `position_ids` and no attention mask: each
    sequence attends to itself only, and gets a row of its own, so the passes are (most thoughts + 1) as for a batch."""
    batch = build_batch(rows)
    inputs = {key: value for key, value in packed(batch).items() if key != "labels"}
    in_place = len(plan_latent_passes(inputs["input_ids"] == LATENT))
    assert latent_passes(model, inputs) == most_thoughts(batch) + 1 < in_place
    with torch.no_grad():
        logits = model(**inputs).logits[0]
        rows = enumerate(batch["sequences"])
        expected = torch.cat([reference_logits(model, ids, batch["pixel_rows"][b]) for b, ids in rows])
    difference = (logits - expected).abs().max().item()
    assert difference <= TOLERANCE, f"max abs difference {difference:.2e}"


def test_misaligned_rows_need_their_own_passes():
    """In place, each latent column is a pass (the original Coconut advanced one column per pass from the batch's
    earliest latent, which is wrong for misaligned rows)."""
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
        assert cache_of(out).get_seq_length() == ids.shape[1] - 1
        step = model(input_ids=ids[:, -1:], cache=cache_of(out))
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
    for layer_ours, layer_theirs in zip(cache_of(ours).layers, cache_of(theirs).layers):
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


@pytest.mark.parametrize(
    "rows, padding_side",
    [([Row(latents=4, answer=3), Row(latents=2, lead=2)], "left"), (BATCHES["blocks_far_apart"], "right")],
    ids=["in_place", "moved_rows"],
)
def test_gradients_match_reference_through_every_thought(rows, padding_side):
    """The answer loss reaches the parameters through the chain of thoughts, exactly as in the reference."""
    model = tiny_model().train()
    batch = build_batch(rows, padding_side=padding_side)
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


def test_packed_sequences_give_the_reference_gradients():
    model = tiny_model().train()
    batch = build_batch(BATCHES["blocks_far_apart"])
    model.zero_grad()
    model(**packed(batch)).loss.backward()
    ours = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    reference = reference_gradients(model, batch)
    worst = max((ours[name] - reference[name]).abs().max().item() for name in ours)
    assert worst <= TOLERANCE, f"max abs gradient difference {worst:.2e}"


def test_forced_extra_passes_are_exact(model):
    """Splitting passes further (to agree on a pass count across ranks) does not change the result."""
    batch = build_batch(BATCHES["misaligned_latents"])
    latent_mask = batch["input_ids"] == LATENT
    in_place = len(plan_latent_passes(latent_mask))
    ranges = plan_latent_passes(latent_mask, min_passes=in_place + 5)
    assert len(ranges) == in_place + 5
    assert ranges[0][0] == 0 and ranges[-1][1] == latent_mask.shape[1]
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))

    natural = most_thoughts(batch) + 1  # the rows move (right padding), see `test_rows_move_so_...`
    original = modeling_coconut_internvl.agree_on_pass_count
    modeling_coconut_internvl.agree_on_pass_count = lambda n, device: natural + 5
    try:
        with counting_passes(model) as calls, torch.no_grad():
            synced = model(**model_inputs(batch), sync_latent_passes=True).logits
            plain = model(**model_inputs(batch)).logits
    finally:
        modeling_coconut_internvl.agree_on_pass_count = original
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


@pytest.mark.parametrize("padding_side", ["left", "right"])  # right: the rows move
def test_gradient_checkpointing_gives_the_same_loss_and_gradients_with_less_memory(padding_side):
    batch = build_batch(BATCHES["misaligned_latents"], padding_side=padding_side)
    model = tiny_model(num_hidden_layers=2).train()
    loss, grads, saved_bytes = loss_grads_and_saved_bytes(model, batch)
    enable_checkpointing(model)
    checkpointed_loss, checkpointed_grads, checkpointed_bytes = loss_grads_and_saved_bytes(model, batch)

    assert abs(loss - checkpointed_loss) <= TOLERANCE
    worst = max((grads[name] - checkpointed_grads[name]).abs().max().item() for name in grads)
    assert worst <= TOLERANCE, f"max abs gradient difference {worst:.2e}"
    assert checkpointed_bytes < 0.6 * saved_bytes, (checkpointed_bytes, saved_bytes)
    # The layers give the cache back afterwards: a plain forward still checkpoints without it.
    assert not any("_can_checkpoint_with_cache" in vars(layer) for layer in model.model.language_model.layers)


def test_reentrant_gradient_checkpointing_with_latents_is_an_error():
    model = tiny_model().train()
    enable_checkpointing(model, activation_checkpointing_kwargs={"use_reentrant": True})
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
        ({"latent_token_id": 0}, "`latent_token_id`=0 is the same id as `text_config.pad_token_id`"),
        ({"end_latent_token_id": 10}, "`end_latent_token_id`=10 is the same id as `text_config.eos_token_id`"),
    ],
)
def test_config_rejects_bad_token_ids(overrides, match):
    with pytest.raises(ValueError, match=match):
        tiny_config(**overrides)


def test_rank_without_latents_splits_its_passes_exactly(model, monkeypatch):
    """Under `sync_latent_passes`, a rank with no latents (ids or embeddings only) still makes the agreed calls."""
    batch = build_batch([Row(latents=0), Row(latents=0, lead=2)], padding_side="left")
    embeds = model.get_input_embeddings()(batch["input_ids"])
    monkeypatch.setattr(modeling_coconut_internvl, "agree_on_pass_count", lambda n, device: 4)
    with counting_passes(model) as calls, torch.no_grad():
        split = model(inputs_embeds=embeds, attention_mask=batch["attention_mask"], sync_latent_passes=True)
    with torch.no_grad():
        plain = InternVLForConditionalGeneration.forward(
            model, inputs_embeds=embeds, attention_mask=batch["attention_mask"], position_ids=None
        )
    assert len(calls) == 4
    real = batch["attention_mask"].bool()
    # Positions from the mask (ours) and from 0 (the parent) differ by a constant per row: RoPE is relative.
    assert (split.logits - plain.logits)[real].abs().max() <= TOLERANCE


def test_latent_forward_under_torch_compile_gives_the_same_logits(model):
    """`torch.compile` (graph breaks allowed) over moved rows; the cheap `eager` backend keeps the test fast, and
    `benchmarks/bench_forward.py --compile inductor` measures inductor."""
    batch = build_batch([Row(latents=2, images=[]), Row(latents=1, lead=2, images=[])], padding_side="right")
    inputs = model_inputs(batch)
    with torch.no_grad():
        expected = model(**inputs).logits
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="eager")(**inputs).logits
    torch._dynamo.reset()
    assert (compiled - expected).abs().max() <= TOLERANCE


@contextmanager
def layers_that_drop_the_cache(layers):
    """As if transformers kept the private flag but ignored it: checkpointed layers drop the cache."""
    yield True


@contextmanager
def transformers_without_the_flag(layers):
    """As `_checkpointed_layers_keep_cache` answers where transformers has no `_can_checkpoint_with_cache`."""
    yield False


@pytest.mark.parametrize("keep_cache", [layers_that_drop_the_cache, transformers_without_the_flag])
@pytest.mark.parametrize("padding_side", ["left", "right"])  # right: the rows move
def test_gradient_checkpointing_falls_back_to_recomputing_each_prefix(monkeypatch, keep_cache, padding_side):
    """Without the cache trick, each latent pass recomputes its prefix: the same loss and gradients, the same calls."""
    batch = build_batch(BATCHES["misaligned_latents"], padding_side=padding_side)
    model = tiny_model(num_hidden_layers=2).train()
    loss, grads, _ = loss_grads_and_saved_bytes(model, batch)
    with counting_passes(model) as plain_calls, torch.no_grad():
        model(**model_inputs(batch))
    enable_checkpointing(model)
    monkeypatch.setattr(modeling_coconut_internvl, "_checkpointed_layers_keep_cache", keep_cache)
    with counting_passes(model) as calls:
        recomputed_loss, recomputed_grads, _ = loss_grads_and_saved_bytes(model, batch)
    assert len(calls) == len(plain_calls) == most_thoughts(batch) + 1
    assert abs(loss - recomputed_loss) <= TOLERANCE
    worst = max((grads[name] - recomputed_grads[name]).abs().max().item() for name in grads)
    assert worst <= TOLERANCE, f"max abs gradient difference {worst:.2e}"


def test_layers_without_the_private_flag_are_not_asked_to_keep_the_cache():
    layers = [torch.nn.Linear(1, 1), torch.nn.Linear(1, 1)]
    with modeling_coconut_internvl._checkpointed_layers_keep_cache(layers) as keeps_cache:
        assert keeps_cache is False
    assert not any(hasattr(layer, "_can_checkpoint_with_cache") for layer in layers)


def test_a_filled_cache_cannot_be_recomputed_under_checkpointing(monkeypatch):
    model = tiny_model().train()
    enable_checkpointing(model)
    monkeypatch.setattr(modeling_coconut_internvl, "_checkpointed_layers_keep_cache", transformers_without_the_flag)
    batch = build_batch([Row(latents=2, images=[])])
    ids = batch["input_ids"]
    with torch.no_grad():  # in eval mode: some transformers releases drop the cache of training layers
        cache = cache_of(model.eval()(input_ids=ids[:, :3], use_cache=True))
    model.train()
    assert cache.get_seq_length() == 3
    with pytest.raises(ValueError, match="The cache passed in holds 3 tokens"):
        model(input_ids=ids[:, 3:], cache=cache)


def test_image_tokens_without_pixel_values_are_an_error(model):
    batch = build_batch([Row(latents=2), Row(latents=0, images=[2])])
    inputs = {key: value for key, value in model_inputs(batch).items() if key != "pixel_values"}
    with pytest.raises(ValueError, match="holds 12 image tokens \\(id 1\\) but neither `pixel_values`"):
        model(**inputs)
    with pytest.raises(ValueError, match="holds 8 image tokens"):  # the parent's path, without latents
        model(input_ids=inputs["input_ids"][1:], attention_mask=inputs["attention_mask"][1:])


def test_encoded_images_may_replace_pixel_values(model):
    batch = build_batch([Row(latents=2), Row(latents=1, lead=3, images=[2])], padding_side="left")
    inputs = {key: value for key, value in model_inputs(batch).items() if key != "pixel_values"}
    with torch.no_grad():
        encoded = {"image": model.model.get_image_features(pixel_values=batch["pixel_values"], return_dict=True)}
        from_pixels = model(**inputs, pixel_values=batch["pixel_values"]).logits
        from_features = model(**inputs, mm_encoder_outputs=encoded).logits
    assert torch.equal(from_pixels, from_features)
    with pytest.raises(ValueError, match="both pixel_values and mm_encoder_outputs"):
        model(**inputs, pixel_values=batch["pixel_values"], mm_encoder_outputs=encoded)


def test_pixel_values_without_tiles_are_an_error(model):
    batch = build_batch([Row(latents=2)])
    inputs = {**model_inputs(batch), "pixel_values": batch["pixel_values"][:0]}
    with pytest.raises(ValueError, match=r"`pixel_values` holds 0 image tiles \(shape \(0, 3, 56, 56\)\)"):
        model(**inputs)


def test_embeddings_with_their_ids_feed_the_thoughts_back(model):
    """`inputs_embeds` with `input_ids`: thoughts found in the ids, embeddings taken as given (images placed in them)."""
    batch = build_batch(BATCHES["misaligned_latents"], padding_side="right")
    inputs = model_inputs(batch)
    embeds = model.get_input_embeddings()(inputs["input_ids"])
    with torch.no_grad():
        from_ids = model(**inputs).logits
        from_both = model(**inputs, inputs_embeds=embeds).logits
    assert (from_both - from_ids).abs().max() <= TOLERANCE


def test_embeddings_holding_thoughts_without_ids_are_an_error(model):
    batch = build_batch([Row(latents=3), Row(latents=2, lead=1)], padding_side="left")
    inputs = model_inputs(batch)
    embeds = model.get_input_embeddings()(inputs.pop("input_ids"))
    with pytest.raises(
        ValueError, match=r"`inputs_embeds` holds the `<\|latent\|>` embedding \(id 2\) at 5 positions"
    ):
        model(**inputs, inputs_embeds=embeds)


def test_the_one_private_transformers_name_still_keeps_the_cache_of_checkpointed_layers():
    """`GradientCheckpointingLayer._can_checkpoint_with_cache` is the only private transformers name the model file
    uses (written on the text model's layers for one latent forward, docs/latent-forward.md). If transformers renames
    it or stops honouring it, checkpointed latent forwards silently recompute every prefix: this test says so."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    flag = "GradientCheckpointingLayer._can_checkpoint_with_cache"
    assert getattr(GradientCheckpointingLayer, "_can_checkpoint_with_cache", None) is False, (
        f"transformers no longer has `{flag}` (default False): checkpointed latent forwards now recompute each "
        "prefix. Find transformers' new way to keep the KV cache in checkpointed layers and use it in "
        "`_checkpointed_layers_keep_cache`."
    )
    model = tiny_model(num_hidden_layers=2).train()
    enable_checkpointing(model)
    outputs = model(**model_inputs(build_batch(BATCHES["misaligned_latents"], padding_side="left")))
    assert cache_of(outputs) is not None and cache_of(outputs).get_seq_length() > 0, (
        f"transformers' checkpointed layers dropped the KV cache although `{flag}` was set: checkpointed latent "
        "forwards now recompute each prefix. Update `_checkpointed_layers_keep_cache`."
    )
