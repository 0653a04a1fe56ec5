"""The scripts' checks before the work: each bad input fails (or warns) before data is built or a step is trained."""

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import subprocess_env
from safetensors.torch import load_file, save_file
from test_run_checks import SMALL_RUN, parse, train
from trl import TrlParser

import evaluate
import train_sft
from coconut.eval_config import CoconutEvalConfig
from coconut.hub import is_local_path
from coconut.preflight import check_output_file, with_demo_defaults


EVALUATE = (evaluate.ScriptArguments, evaluate.CurriculumArguments, CoconutEvalConfig)


def run_evaluate(*argv: str):
    return evaluate.main(*TrlParser(EVALUATE).parse_args_and_config(list(argv)))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    folder = tmp_path_factory.mktemp("trained")
    train(folder)
    return folder / "out"


def test_flags_without_a_dataset_run_the_demo_with_them_on_top(tmp_path):
    """`train_sft.py --output_dir X` used to fail on bf16, then on the missing `--dataset`."""
    for output in (["--output_dir", str(tmp_path / "mine")], [f"--output_dir={tmp_path / 'mine'}"]):
        script_args, training_args, _ = parse(with_demo_defaults([*output, "--seed", "1"], train_sft.DEMO_ARGS))
        assert (script_args.dataset, training_args.output_dir) == ("arrow_chase", str(tmp_path / "mine"))
        assert (training_args.seed, training_args.num_train_epochs, script_args.synthetic_grid_size) == (1, 20, 2)
    assert with_demo_defaults([], train_sft.DEMO_ARGS) == train_sft.DEMO_ARGS
    given = ["--config", "recipes/prosqa_coconut.yaml", "--seed", "1"]
    assert with_demo_defaults(given, train_sft.DEMO_ARGS) == given


def test_a_model_without_a_dataset_is_one_message_before_parsing(tmp_path):
    command = [sys.executable, "train_sft.py", "--model_name_or_path", str(tmp_path / "model")]
    completed = subprocess.run(
        command, capture_output=True, text=True, env=subprocess_env(tmp_path), cwd=Path(__file__).parents[1]
    )
    assert completed.returncode != 0
    assert "ValueError: `--dataset` is missing: `--model_name_or_path` trains a converted model" in completed.stderr
    assert "bf16" not in completed.stderr


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--per_device_train_batch_size", "0", "`per_device_train_batch_size`=0 must be at least 1"),
        ("--per_device_eval_batch_size", "0", "`per_device_eval_batch_size`=0 must be at least 1"),
        ("--eval_max_new_tokens", "0", "`eval_max_new_tokens`=0 must be at least 1; leave it out to follow"),
        ("--synthetic_validation_size", "0", "`--synthetic_validation_size`=0 must be at least 1; the bundled task"),
        ("--synthetic_train_size", "0", "`--synthetic_train_size`=0 must be at least 1"),
        ("--max_eval_samples", "0", "`--max_eval_samples`=0 must be at least 1; leave it out"),
        ("--synthetic_test_size", "-1", "`--synthetic_test_size`=-1 must be at least 0"),
    ],
)
def test_zero_sizes_are_refused_when_the_command_line_is_parsed(tmp_path, flag, value, message):
    """Each used to crash, or fail only after stage 0 had trained."""
    with pytest.raises(ValueError, match=message.replace("(", "\\(")):
        parse([*SMALL_RUN, "--output_dir", str(tmp_path / "out"), flag, value])


def test_a_task_too_small_for_its_test_split_fails_before_training(tmp_path):
    """The default 500 test questions on a 2 x 2 board with 2 arrows used to fail after all the training."""
    with pytest.raises(ValueError, match="500 distinct test questions .* Ask for at most 276"):
        train(tmp_path, "--synthetic_test_size", "500")
    assert not (tmp_path / "data").exists() and not (tmp_path / "out" / "model.safetensors").exists()


def test_a_typo_in_a_local_model_path_says_no_such_folder(tmp_path, monkeypatch):
    """A typo used to give "Repo id must be ..." or Hub look-ups."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs").mkdir()
    for typo in ("outputs/coconut-bse", "./coconut-base", str(tmp_path / "a" / "b")):
        with pytest.raises(ValueError, match=f"'{typo}': no such folder"):
            train(tmp_path, "--model_name_or_path", typo)
    assert not (tmp_path / "data").exists()


def test_evaluate_refuses_a_plain_internvl_before_loading_it(tmp_path):
    """A plain InternVL used to fail deep in its processor ("requires torchvision")."""
    plain = tmp_path / "InternVL3-1B-hf"
    plain.mkdir()
    (plain / "config.json").write_text(
        json.dumps({"model_type": "internvl", "architectures": ["InternVLForConditionalGeneration"]})
    )
    with pytest.raises(ValueError, match="is a 'internvl' checkpoint .* not Coconut-InternVL: convert it"):
        run_evaluate("--model", str(plain), "--dataset", "arrow_chase", "--data_dir", str(tmp_path / "data"))
    assert not (tmp_path / "data").exists()


def test_evaluate_checks_its_output_and_sizes_first(trained, tmp_path):
    (tmp_path / "a_file").write_text("")
    common = ["--model", str(trained), "--data_dir", str(tmp_path / "data")]
    with pytest.raises(ValueError, match="`output_dir`='.*a_file' cannot be written"):
        run_evaluate(*common, "--output_dir", str(tmp_path / "a_file"))
    assert not (tmp_path / "data").exists()
    with pytest.raises(ValueError, match="`--max_samples`=0 must be at least 1"):
        run_evaluate(*common, "--max_samples", "0")
    with pytest.raises(ValueError, match="`--update_model_card` writes into a local model folder's README.md"):
        run_evaluate("--model", "someone/model", "--update_model_card")
    with pytest.raises(ValueError, match="`num_latent_thoughts`=5 with `method`='cot'"):
        run_evaluate(*common, "--method", "cot", "--num_latent_thoughts", "5")
    assert not (tmp_path / "data").exists()


def test_evaluate_scores_the_split_asked_for(tmp_path):
    """`evaluate.py --dataset train.json --split test` used to score the training records."""
    (tmp_path / "prosqa_train.json").write_text(json.dumps([{"question": "Q?", "steps": ["S."], "answer": "A"}]))
    with pytest.raises(ValueError, match="its name says it is the 'train' split, not the 'test' split"):
        evaluate.load_eval_records(str(tmp_path / "prosqa_train.json"), "test")


def damage(folder: Path, value: float) -> Path:
    """A copy of `folder` whose first LM head weight is `value`, as a flipped bit in the file would leave it."""
    damaged = folder.parent / f"damaged-{value}"
    shutil.copytree(folder, damaged)
    weights = load_file(damaged / "model.safetensors")
    name = next(name for name in weights if "lm_head" in name or "embed_tokens" in name)
    weights[name][0, 0] = value
    save_file(weights, damaged / "model.safetensors", metadata={"format": "pt"})
    return damaged


def test_damaged_weights_that_still_load_are_refused_or_warned_about(trained, tmp_path, caplog):
    """A bit-flipped weights file loaded silently, with weights up to 1e36."""
    common = ["--data_dir", str(tmp_path / "data"), "--max_samples", "2", "--disable_tqdm", "true"]
    # The model class refuses non-finite weights as it loads them, naming the file and the tensor.
    with pytest.raises(
        ValueError, match=r"The weights in .*damaged-nan/model.safetensors are damaged: `.*` .* holds 1 non"
    ):
        run_evaluate("--model", str(damage(trained, float("nan"))), *common)
    with caplog.at_level(logging.WARNING, logger="coconut.loading"):
        run_evaluate("--model", str(damage(trained, 1e36)), *common, "--output_dir", str(tmp_path / "eval"))
    assert "look damaged: 1 tensor(s) hold values above 10000, e.g. `" in caplog.text and "1e+36" in caplog.text
    with pytest.raises(ValueError, match=r"The weights in .*damaged-inf/model.safetensors are damaged"):
        train(tmp_path, "--model_name_or_path", str(damage(trained, float("inf"))), output="retrain")
    assert all(torch.isfinite(weight).all() for weight in load_file(trained / "model.safetensors").values())


def test_a_trained_card_has_valid_metadata_results_and_a_quick_start_on_the_task(trained, tmp_path):
    card = (trained / "README.md").read_text()
    metadata = yaml.safe_load(card.split("---", 2)[1])
    assert "base_model" not in metadata and "from scratch (" not in card
    assert metadata["license"] == "mit"  # trained from scratch: this repository's own licence
    results = json.loads((trained / "eval_results.json").read_text())
    (index,) = metadata["model-index"]
    accuracies = {r["dataset"]["split"]: r["metrics"][0]["value"] for r in index["results"]}
    assert accuracies == {
        "validation": round(results["overall"]["accuracy"], 4),
        "test": round(results["test"]["accuracy"], 4),
    }
    # The quick start asks a question of the task about its board, saved beside the card, and runs as written.
    quick_start = card.split("```python\n", 1)[1].split("\n```", 1)[0]
    assert "question = 'Start at " in quick_start and (trained / "example_0.png").is_file()
    completed = subprocess.run(
        [sys.executable, "-c", quick_start], capture_output=True, text=True, cwd=tmp_path, env=subprocess_env(tmp_path)
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert "answer:" in completed.stdout


def test_predictions_files_show_the_target_beside_the_answer(trained):
    rows = [json.loads(line) for line in (trained / "predictions_stage_2.jsonl").read_text().splitlines()]
    assert rows and all(list(row)[3:5] == ["answer", "target"] and row["target"] for row in rows)


def test_an_output_file_path_that_is_a_folder_or_under_a_file_is_refused(tmp_path):
    (tmp_path / "a_folder").mkdir()
    (tmp_path / "a_file").write_text("")
    with pytest.raises(ValueError, match="`output_file`='.*a_folder' is a folder; .* Pass a file path"):
        check_output_file(tmp_path / "a_folder", "output_file")
    with pytest.raises(ValueError, match="`output_file`='.*a_file' cannot be written"):
        check_output_file(tmp_path / "a_file" / "probe.json", "output_file")
    check_output_file(tmp_path / "new" / "probe.json", "output_file")
    assert (tmp_path / "new").is_dir() and not (tmp_path / "new" / "probe.json").exists()


@pytest.mark.parametrize(
    ("name", "local"),
    [
        ("outputs/demoo", True),  # beside an existing `outputs/` folder
        ("./demo", True),
        ("/no/such/folder", True),
        ("~/models/demo", True),
        ("data/prosqa/prosqa_train.json", True),
        ("prosqa_valid.jsonl", True),
        ("OpenGVLab/InternVL3-1B-hf", False),
        ("gpt2", False),
    ],
)
def test_local_path_or_hub_id_is_decided_without_the_hub(tmp_path, monkeypatch, name, local):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs").mkdir()
    assert is_local_path(name) is local
