"""The linear probe of thoughts: it recovers a linear code, finds none in noise, and reads the model's real thoughts."""

import pytest
import torch
from test_run_checks import train

from coconut.curriculum import CurriculumConfig
from coconut.eval_config import CoconutEvalConfig
from coconut.eval_prompts import eval_prompt
from coconut.linear_probe import fit_linear_probe, markdown_table, probe_accuracy, probe_model, thought_states
from coconut.loading import load_model_and_processor
from coconut.probe import thought_vectors
from coconut.synthetic import SyntheticTaskConfig, build_synthetic_split, generate_puzzles


def clusters(labels: torch.Tensor, spread: float, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(4, 16, generator=torch.Generator().manual_seed(0))
    return centres[labels] + spread * torch.randn(len(labels), 16, generator=generator)


def test_probe_recovers_a_linear_code_and_finds_none_in_noise():
    train_labels, test_labels = torch.arange(400) % 4, torch.arange(200) % 4
    probe = fit_linear_probe(clusters(train_labels, 0.1, 1), train_labels, 4)
    assert probe_accuracy(probe, clusters(test_labels, 0.1, 2), test_labels) == 1.0
    noise = torch.randn(400, 16, generator=torch.Generator().manual_seed(3))
    probe = fit_linear_probe(noise, train_labels, 4)
    held_out = probe_accuracy(probe, torch.randn(200, 16, generator=torch.Generator().manual_seed(4)), test_labels)
    assert held_out < 0.45  # chance is 0.25


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A small run with two thoughts per arrow, so that thought k is labelled with arrow ceil(k / 2)."""
    folder = tmp_path_factory.mktemp("probe")
    train(folder, "--c_thought", "2")
    return folder / "out"


def test_states_are_the_thoughts_fed_back_one_prompt_at_a_time(trained, tmp_path):
    task = SyntheticTaskConfig(grid_size=2, max_hops=2, train_size=8, validation_size=2, test_size=4)
    records = build_synthetic_split(tmp_path, "test", task)
    puzzles = generate_puzzles("test", task)
    model, processor = load_model_and_processor(str(trained), dtype=torch.float32)
    curriculum = CurriculumConfig(c_thought=2, max_latent_stage=2)
    states = thought_states(model, processor, records, puzzles, curriculum, stage=2, batch_size=3)
    assert sorted(states.vectors) == [1, 2, 3, 4]  # 2 arrows x 2 thoughts each
    largest = 0.0
    for i, record in enumerate(records):
        prompt = eval_prompt(processor, record, curriculum, CoconutEvalConfig(stage=2))["prompt"]
        inputs = processor(text=[prompt], images=[record["images"]], return_tensors="pt")
        alone, _ = thought_vectors(model, **inputs)
        for k in range(1, 5):
            largest = max(largest, (states.vectors[k][i] - alone[k - 1]).abs().max().item())
            row, column = puzzles[i].path[(k + 1) // 2]
            assert states.cells[k][i] == row * 2 + column
    assert largest < 1e-4, f"batched thought vectors differ from one-prompt ones by {largest}"


def test_probe_model_reports_every_thought_and_refuses_other_folders(trained, tmp_path):
    result = probe_model(trained, tmp_path / "data", num_train=8, num_test=4)
    assert result["method"] == "coconut" and sorted(result["thoughts"]) == [1, 2, 3, 4]
    assert all(row["num_test"] == 4 and 0 <= row["accuracy"] <= 1 for row in result["thoughts"].values())
    assert "| 4 |" in markdown_table({"Coconut": result})
    with pytest.raises(ValueError, match="coconut_training.json does not exist"):
        probe_model(tmp_path, tmp_path / "data")
