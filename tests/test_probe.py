"""The latent probe: known vectors map to their tokens, and the probed thoughts are the model's real thoughts."""

import json

import pytest
import torch
from conftest import LATENT, Row, build_batch, tiny_model

from coconut.probe import format_probes, probe_thoughts, probe_vectors, save_probes, thought_vectors
from coconut.reference import reference_embeddings


class IdTokenizer:
    """Token strings `t<id>`: enough for the probe, which only names ids."""

    def convert_ids_to_tokens(self, token_id):
        return f"t{token_id}"


@pytest.fixture
def model():
    model = tiny_model()
    with torch.no_grad():  # unit-norm LM-head rows: each row's own logit (1) beats every other row's (< 1)
        model.lm_head.weight.copy_(torch.nn.functional.normalize(model.lm_head.weight, dim=-1))
    return model


def test_known_vectors_map_to_their_tokens(model):
    head_row, embedding_row = 17, 42
    vectors = torch.stack([5.0 * model.lm_head.weight[head_row], model.get_input_embeddings().weight[embedding_row]])
    (top_a, nearest_a), (top_b, nearest_b) = probe_vectors(model, IdTokenizer(), vectors, top_k=3)
    assert top_a[0].token_id == head_row and top_a[0].token == f"t{head_row}"
    assert top_a[0].score > top_a[1].score >= top_a[2].score
    expected = (5.0 * model.lm_head.weight @ model.lm_head.weight[head_row]).softmax(-1)[head_row].item()
    assert top_a[0].score == pytest.approx(expected, rel=1e-5)
    assert nearest_b[0].token_id == embedding_row and nearest_b[0].score == pytest.approx(1.0, abs=1e-5)
    assert len(top_b) == len(nearest_a) == 3
    with pytest.raises(ValueError, match="`top_k`=0"):
        probe_vectors(model, IdTokenizer(), vectors, top_k=0)


def test_probed_thoughts_are_the_fed_thoughts(model, tmp_path):
    batch = build_batch([Row(latents=3, images=[1])])
    inputs = dict(attention_mask=batch["attention_mask"], pixel_values=batch["pixel_values"])
    thoughts, positions = thought_vectors(model, batch["input_ids"], **inputs)
    with torch.no_grad():
        reference = reference_embeddings(model, batch["sequences"][0], batch["pixel_rows"][0])[0]  # (T, H)
    assert positions == (batch["input_ids"][0] == LATENT).nonzero().flatten().tolist()
    difference = (thoughts - reference[positions]).abs().max().item()
    assert difference < 1e-5, f"probed thoughts differ from the reference by {difference:.2e}"

    probes = probe_thoughts(model, IdTokenizer(), batch["input_ids"], top_k=2, **inputs)
    expected_top = model.lm_head(reference[positions]).argmax(-1).tolist()
    assert [p.top_tokens[0].token_id for p in probes] == expected_top
    assert "thought 2 (column" in format_probes(probes)
    save_probes(probes, tmp_path / "probe.json", prompt="p")
    saved = json.loads((tmp_path / "probe.json").read_text())
    assert [t["position"] for t in saved["thoughts"]] == positions
    assert saved["thoughts"][0]["top_tokens"][0]["token_id"] == expected_top[0]


def test_prompt_without_thoughts_is_an_error(model):
    with pytest.raises(ValueError, match="no `<\\|latent\\|>` token"):
        thought_vectors(model, torch.tensor([[11, 12, 13]]))


def test_an_output_file_that_is_a_folder_is_refused_before_loading(tmp_path):
    from coconut.probe import ProbeArguments, main

    arguments = ProbeArguments(model=str(tmp_path / "no-model"), question="Where?", output_file=str(tmp_path))
    with pytest.raises(ValueError, match="`output_file`=.* is a folder"):
        main(arguments)  # the missing model would fail later: the folder is named first
