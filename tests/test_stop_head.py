"""The stop head and `generate(num_latent_thoughts="auto")` against a naive one-row loop that makes the same decisions."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import (
    END,
    FIRST_TEXT_ID,
    LATENT,
    PAD,
    START,
    Row,
    build_batch,
    counting_passes,
    splitting_threshold,
    subprocess_env,
    tiny_model,
)
from safetensors.torch import load_file, save_file

from coconut.reference import reference_greedy, reference_stop_count
from modeling_coconut_internvl import latent_stop_labels


EOS = FIRST_TEXT_ID
MAX_THOUGHTS = 5
# Prompts without blocks: different lengths (left padding), images or none, and several images.
PROMPTS = [
    Row(latents=0, answer=0, images=[1]),
    Row(latents=0, answer=0, images=[2], lead=4),
    Row(latents=0, answer=0, images=[], lead=1),
    Row(latents=0, answer=0, images=[1, 1], lead=2),
    Row(latents=0, answer=0, images=[1], question=2, lead=6),
    Row(latents=0, answer=0, images=[], question=8),
]


def prompt_inputs(batch: dict) -> dict:
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if batch["pixel_values"] is not None:
        inputs["pixel_values"] = batch["pixel_values"]
    return inputs


def naive_counts(model, batch, threshold):
    return [
        reference_stop_count(model, ids, batch["pixel_rows"][b], MAX_THOUGHTS, threshold)
        for b, ids in enumerate(batch["sequences"])
    ]


def stop_probabilities(model, batch) -> list[list[float]]:
    """Each row's stop probability after each of MAX_THOUGHTS thoughts, by the naive algorithm (never stopping)."""
    return [
        reference_stop_count(model, ids, batch["pixel_rows"][b], MAX_THOUGHTS, 2.0, probabilities=True)
        for b, ids in enumerate(batch["sequences"])
    ]


@pytest.fixture(scope="module")
def model():
    model = tiny_model(seed=3, latent_stop_head=True, max_latent_thoughts=MAX_THOUGHTS)
    with torch.no_grad():  # a sharper head: stop probabilities that differ clearly between rows and thoughts
        model.latent_stop_head.weight.mul_(10.0)
    model.generation_config.pad_token_id = PAD
    model.generation_config.eos_token_id = EOS
    return model


@pytest.fixture(scope="module")
def batch():
    return build_batch(PROMPTS, padding_side="left", seed=2)


@pytest.fixture(scope="module")
def threshold(model, batch):
    """The threshold, halfway between two of the rows' stop probabilities, that spreads the rows' counts most: rows
    then stop at different thoughts (checked), and no probability sits near the threshold."""
    threshold = splitting_threshold(stop_probabilities(model, batch))
    counts = naive_counts(model, batch, threshold)
    assert len(set(counts)) >= 3, f"the test needs rows that stop at different thoughts, got {counts}"
    return threshold


def latent_counts(sequences: torch.Tensor) -> list[int]:
    return (sequences == LATENT).sum(dim=1).tolist()


def test_stop_labels_mark_each_thought_vector():
    q = FIRST_TEXT_ID
    input_ids = torch.tensor([[q, START, LATENT, LATENT, END, q], [q, q, START, LATENT, END, q]])
    labels = latent_stop_labels(input_ids, LATENT)
    assert labels.tolist() == [[-100, -100, 0, 1, -100, -100], [-100, -100, -100, 1, -100, -100]]
    only_second = latent_stop_labels(input_ids, LATENT, rows=torch.tensor([False, True]))
    assert (only_second[0] == -100).all() and only_second[1].tolist() == labels[1].tolist()


def test_stop_loss_is_the_binary_cross_entropy_and_trains_head_and_thoughts(model):
    batch = build_batch([Row(latents=3), Row(latents=1, lead=2)], padding_side="left")
    labels = latent_stop_labels(batch["input_ids"], LATENT)
    model.zero_grad()
    outputs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    pixel_values=batch["pixel_values"], stop_labels=labels)  # fmt: skip
    labelled = labels != -100
    expected = torch.nn.functional.binary_cross_entropy_with_logits(outputs.stop_logits[labelled], labels[labelled])
    assert labelled.sum() == 4
    assert torch.allclose(outputs.stop_loss, expected)
    outputs.stop_loss.backward()
    assert model.latent_stop_head.weight.grad.abs().sum() > 0
    # The state at the first thought is computed from that thought: the loss reaches the layers through the thoughts.
    assert model.model.language_model.layers[0].mlp.up_proj.weight.grad.abs().sum() > 0
    model.zero_grad()


def test_plan_equals_the_naive_loop_with_rows_stopping_apart(model, batch, threshold):
    counts = model.plan_latent_thoughts(**prompt_inputs(batch), latent_stop_threshold=threshold)
    assert counts == naive_counts(model, batch, threshold)
    assert 1 <= min(counts) and max(counts) <= MAX_THOUGHTS


def test_auto_greedy_equals_the_naive_loop_and_decode(model, batch, threshold):
    expected_counts = naive_counts(model, batch, threshold)
    output = model.generate(
        **prompt_inputs(batch),
        num_latent_thoughts="auto",
        latent_stop_threshold=threshold,
        max_new_tokens=6,
        do_sample=False,
    )
    assert latent_counts(output) == expected_counts
    prompt_length = batch["input_ids"].shape[1] + MAX_THOUGHTS + 2
    for b, ids in enumerate(batch["sequences"]):
        prompt = output[b, :prompt_length][output[b, :prompt_length] != PAD].tolist()
        assert prompt == ids + [START] + [LATENT] * expected_counts[b] + [END], f"row {b}"
        new = output[b, prompt_length:].tolist()
        new = new[: new.index(EOS) + 1] if EOS in new else new
        assert new == reference_greedy(model, prompt, batch["pixel_rows"][b], 6, EOS), f"row {b}"


def test_auto_scores_equal_the_naive_logits(model, batch, threshold):
    """Every generated step's logits equal the naive forward of that row alone, with the counts it decided."""
    from coconut.reference import reference_logits

    output = model.generate(**prompt_inputs(batch), num_latent_thoughts="auto", latent_stop_threshold=threshold,
                            max_new_tokens=3, do_sample=False, output_logits=True, return_dict_in_generate=True)  # fmt: skip
    prompt_length = batch["input_ids"].shape[1] + MAX_THOUGHTS + 2
    worst = 0.0
    for b in range(len(PROMPTS)):
        ids = output.sequences[b][output.sequences[b] != PAD].tolist()
        reference = reference_logits(model, ids, batch["pixel_rows"][b])  # (T, V)
        real_prompt = len(ids) - (output.sequences.shape[1] - prompt_length)
        for step, step_logits in enumerate(output.logits):
            worst = max(worst, (step_logits[b] - reference[real_prompt - 1 + step]).abs().max().item())
    assert worst < 1e-4, worst


def test_auto_thinks_in_the_cache_it_decodes_from(model, batch, threshold):
    """One pass over the prompts, one per thought column (as many as the most thoughts of a row), then one per new
    token: the prompts are not run twice. A static cache cannot be handed over; there the counts are planned first
    (a forward with the most thoughts allowed), then generated, with the same result."""
    counts = naive_counts(model, batch, threshold)
    settings = dict(num_latent_thoughts="auto", latent_stop_threshold=threshold, do_sample=False)
    with counting_passes(model) as calls:
        output = model.generate(**prompt_inputs(batch), max_new_tokens=1, min_new_tokens=1, **settings)
    assert len(calls) == 1 + max(counts) + 1
    assert latent_counts(output) == counts
    static = model.generate(**prompt_inputs(batch), max_new_tokens=4, cache_implementation="static", **settings)
    assert torch.equal(static, model.generate(**prompt_inputs(batch), max_new_tokens=4, **settings))


def test_a_prompt_ending_with_an_open_block_is_refused_with_the_way_to_ask_for_auto(model, batch):
    """The count travels as `num_latent_thoughts`, not as a `<|start-latent|>` left open for `generate` to find."""
    inputs = prompt_inputs(batch)
    open_inputs = {
        **inputs,
        "input_ids": torch.cat([inputs["input_ids"], torch.full((len(PROMPTS), 1), START)], dim=1),
        "attention_mask": torch.cat([inputs["attention_mask"], torch.ones(len(PROMPTS), 1, dtype=torch.long)], dim=1),
    }
    with pytest.raises(ValueError, match=r'Prompt 0 ends with `<\|start-latent\|>` alone.*num_latent_thoughts="auto"'):
        model.generate(**open_inputs, max_new_tokens=4)


@pytest.mark.parametrize(
    "settings",
    [
        dict(num_beams=3, num_return_sequences=2, do_sample=False),
        dict(do_sample=True, temperature=0.8, top_k=20, num_return_sequences=2),
    ],
    ids=["beam_search", "sampling"],
)
def test_auto_equals_the_counts_it_decided_under_beam_search_and_sampling(model, batch, threshold, settings):
    """Explicit per-row counts are tested against the naive decode elsewhere; "auto" must be exactly those counts."""
    counts = naive_counts(model, batch, threshold)
    torch.manual_seed(0)
    auto = model.generate(**prompt_inputs(batch), num_latent_thoughts="auto", latent_stop_threshold=threshold,
                          max_new_tokens=5, **settings)  # fmt: skip
    torch.manual_seed(0)
    explicit = model.generate(**prompt_inputs(batch), num_latent_thoughts=counts, max_new_tokens=5, **settings)
    assert torch.equal(auto, explicit)
    assert latent_counts(auto) == [count for count in counts for _ in range(2)]


def test_threshold_trades_thoughts(model, batch):
    eager = model.plan_latent_thoughts(**prompt_inputs(batch), latent_stop_threshold=0.0)
    patient = model.plan_latent_thoughts(**prompt_inputs(batch), latent_stop_threshold=1.0)
    assert eager == [1] * len(PROMPTS)  # every probability is >= 0: the first thought ends each block
    assert patient == [MAX_THOUGHTS] * len(PROMPTS)  # no probability reaches 1 here: every block runs to the cap
    capped = model.plan_latent_thoughts(**prompt_inputs(batch), max_latent_thoughts=2, latent_stop_threshold=1.0)
    assert capped == [2] * len(PROMPTS)


def test_bad_auto_requests_are_named(model, batch):
    inputs = prompt_inputs(batch)
    no_head = tiny_model(seed=3)
    with pytest.raises(ValueError, match="has no stop head"):
        no_head.generate(**inputs, num_latent_thoughts="auto", max_latent_thoughts=3, max_new_tokens=2)
    model_without_cap = tiny_model(seed=3, latent_stop_head=True)
    with pytest.raises(ValueError, match="needs `max_latent_thoughts`"):
        model_without_cap.generate(**inputs, num_latent_thoughts="auto", max_new_tokens=2)
    with pytest.raises(ValueError, match="not a probability"):
        model.generate(**inputs, num_latent_thoughts="auto", latent_stop_threshold=1.5, max_new_tokens=2)
    with pytest.raises(ValueError, match="apply only to"):
        model.generate(**inputs, num_latent_thoughts=2, max_latent_thoughts=3, max_new_tokens=2)
    closed = build_batch([Row(latents=2, answer=0), Row(latents=0, answer=0)], padding_side="left")
    for settings in (dict(), dict(cache_implementation="static")):  # thinking in the cache, or planning first
        with pytest.raises(ValueError, match=r"Prompts \[0\] already hold a latent block; the batch mixes them with "
                           r"prompts \[1\] that hold none"):  # fmt: skip
            model.generate(**prompt_inputs(closed), num_latent_thoughts="auto", max_new_tokens=2, **settings)
    with pytest.raises(ValueError, match=r"mixes \"auto\" with counts"):
        model.generate(**inputs, num_latent_thoughts=["auto"] + [2] * (len(PROMPTS) - 1), max_new_tokens=2)
    with pytest.raises(ValueError, match=r'`num_latent_thoughts` must be .* or "auto" \(lowercase.*got \'Auto\''):
        model.generate(**inputs, num_latent_thoughts="Auto", max_new_tokens=2)
    with pytest.raises(ValueError, match=r"`latent_stop_threshold` must be a number.*got '0.5' of type str"):
        model.generate(**inputs, num_latent_thoughts="auto", latent_stop_threshold="0.5", max_new_tokens=2)
    one_prompt = {"input_ids": inputs["input_ids"][2:3], "attention_mask": inputs["attention_mask"][2]}  # 1-D mask
    with pytest.raises(ValueError, match=r"`attention_mask` has shape \(\d+,\) but the prompts' `input_ids` \(1, "):
        model.generate(**one_prompt, num_latent_thoughts="auto", max_new_tokens=2)
    with pytest.raises(ValueError, match="stop head has no thought to read"):
        model(input_ids=inputs["input_ids"][:, -3:], stop_labels=torch.zeros(len(PROMPTS), 3))
    with pytest.raises(ValueError, match="not a probability"):
        tiny_model(latent_stop_threshold=-0.1)


LOAD_AND_PLAN = """
import sys, torch, transformers
from safetensors.torch import load_file, save_file
folder, inputs_path, outputs_path = sys.argv[1:]
torch.set_num_threads(1)
inputs = load_file(inputs_path)
model = transformers.AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
threshold = float(inputs.pop("threshold"))
with torch.no_grad():
    output = model.generate(**inputs, num_latent_thoughts="auto", latent_stop_threshold=threshold, max_new_tokens=4,
                            do_sample=False)
save_file({"sequences": output}, outputs_path)
"""


def test_a_model_with_the_head_saves_and_loads_through_automodel(model, batch, threshold, tmp_path, hf_home):
    folder = tmp_path / "with-head"
    model.save_pretrained(folder)
    inputs = {**prompt_inputs(batch), "threshold": torch.tensor(threshold)}
    save_file(inputs, tmp_path / "inputs.safetensors")
    expected = model.generate(**prompt_inputs(batch), num_latent_thoughts="auto", latent_stop_threshold=threshold,
                              max_new_tokens=4, do_sample=False)  # fmt: skip
    subprocess.run(
        [
            sys.executable,
            "-c",
            LOAD_AND_PLAN,
            str(folder),
            str(tmp_path / "inputs.safetensors"),
            str(tmp_path / "out"),
        ],
        check=True,
        cwd=tmp_path,
        env=subprocess_env(hf_home),
    )
    assert torch.equal(load_file(tmp_path / "out")["sequences"], expected)
    assert "latent_stop_head.weight" in load_file(folder / "model.safetensors")


def test_a_model_without_the_head_loads_unchanged(tmp_path):
    from modeling_coconut_internvl import CoconutInternVLForConditionalGeneration

    plain = tiny_model(seed=4)
    plain.save_pretrained(tmp_path)
    loaded = CoconutInternVLForConditionalGeneration.from_pretrained(tmp_path)
    assert not hasattr(loaded, "latent_stop_head") and loaded.config.latent_stop_head is False
    assert set(loaded.state_dict()) == set(plain.state_dict())
    head = loaded.add_latent_stop_head()
    assert loaded.config.latent_stop_head and head.weight.shape == (1, loaded.config.text_config.hidden_size)


def test_a_config_json_that_holds_the_auto_settings_loads_and_generates_the_same(model, batch, threshold, tmp_path):
    """Models saved while `max_latent_thoughts` and `latent_stop_threshold` lived in `config.json`: the settings move
    to the generation config at load, and `"auto"` decides as before."""
    from modeling_coconut_internvl import CoconutInternVLForConditionalGeneration

    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    generation = json.loads((tmp_path / "generation_config.json").read_text())
    assert "max_latent_thoughts" not in config and generation["max_latent_thoughts"] == MAX_THOUGHTS
    config.update(max_latent_thoughts=MAX_THOUGHTS, latent_stop_threshold=threshold)
    del generation["max_latent_thoughts"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "generation_config.json").write_text(json.dumps(generation))

    loaded = CoconutInternVLForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert not hasattr(loaded.config, "max_latent_thoughts") and not hasattr(loaded.config, "latent_stop_threshold")
    assert loaded.generation_config.max_latent_thoughts == MAX_THOUGHTS
    assert loaded.generation_config.latent_stop_threshold == threshold
    settings = dict(num_latent_thoughts="auto", max_new_tokens=3, do_sample=False)
    expected = model.generate(**prompt_inputs(batch), latent_stop_threshold=threshold, **settings)
    assert torch.equal(loaded.generate(**prompt_inputs(batch), **settings), expected)
    loaded.save_pretrained(tmp_path / "again")  # saved again: the settings sit in the generation config only
    assert "latent_stop_threshold" not in json.loads((tmp_path / "again" / "config.json").read_text())
    again = json.loads((tmp_path / "again" / "generation_config.json").read_text())
    assert (again["max_latent_thoughts"], again["latent_stop_threshold"]) == (MAX_THOUGHTS, threshold)


def test_a_pause_as_thought_model_says_how_to_give_it_pauses(batch):
    """Pause as thought: the block's markers are set, `latent_token_id` is None, nothing is fed back."""
    pause = tiny_model(seed=3, latent_token_id=None)
    inputs = prompt_inputs(batch)
    for request in (2, "auto"):
        with pytest.raises(ValueError, match=r"thinks in pauses.*processor\(text=\.\.\., num_latent_thoughts=k\)"):
            pause.generate(**inputs, num_latent_thoughts=request, max_new_tokens=2)
    with_pauses = build_batch([Row(latents=2, answer=0, images=[])], padding_side="left")  # the block in the prompt
    assert pause.generate(**prompt_inputs(with_pauses), max_new_tokens=2, do_sample=False).shape[1] > 0
