"""The recipes and the documented training commands: each parses with `TrlParser` as `train_sft.py` parses it, starts
from where the converter's examples write the converted model, and the A-OKVQA recipe trains on a bundled A-OKVQA-shaped
fixture (`tests/data/aokvqa`: `HuggingFaceM4/A-OKVQA`'s columns, images drawn for the test)."""

import json
import re
import shlex
from pathlib import Path

import pytest
import torch
import yaml
from huggingface_hub import ModelCard
from transformers import GotOcr2ImageProcessorPil
from trl import ModelConfig, TrlParser

import coconut.preflight
import convert_to_coconut
import train_sft
from coconut.convert import build_generation_config
from coconut.data import aokvqa_to_record
from coconut.preflight import check_dataset_argument
from coconut.repository import save_repository
from coconut.sft_config import CoconutSFTConfig
from coconut.tiny import tiny_coconut_config_for
from coconut.tokenizer import train_tokenizer
from modeling_coconut_internvl import CoconutInternVLForConditionalGeneration
from processing_coconut_internvl import CoconutInternVLProcessor


ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
FIXTURE = Path(__file__).parent / "data" / "aokvqa"


# The recipes train in bfloat16 on GPUs; TrainingArguments refuses bf16 where no device supports it.
NO_BF16 = ["--bf16", "false"]


def parse(argv: list[str]):
    return TrlParser((train_sft.ScriptArguments, CoconutSFTConfig, ModelConfig)).parse_args_and_config(argv)


def documented_commands(text: str) -> list[list[str]]:
    """The arguments after `train_sft.py` of every command in `text` (continuation lines joined)."""
    commands = []
    for line in text.replace("\\\n", " ").splitlines():
        words = shlex.split(line.split("#")[0]) if "train_sft.py" in line.split("#")[0] else []
        if words and "train_sft.py" in words and not line.lstrip().startswith("|"):
            commands.append(words[words.index("train_sft.py") + 1 :])
    return commands


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda path: path.name)
def test_recipe_parses_and_starts_from_the_converted_model(recipe, monkeypatch):
    monkeypatch.chdir(ROOT)
    checked = []  # the converted model is not here: record the check instead of looking it up on the Hub
    monkeypatch.setattr(
        coconut.preflight, "require_coconut_checkpoint", lambda path, revision=None: checked.append(path)
    )
    script_args, training_args, model_args = parse(["--config", str(recipe.relative_to(ROOT)), *NO_BF16])
    check_dataset_argument(script_args, model_args)
    converter_outputs = re.findall(r"--output (\S+)", convert_to_coconut.__doc__)
    assert model_args.model_name_or_path == converter_outputs[0], (model_args.model_name_or_path, converter_outputs)
    assert training_args.method in ("coconut", "cot")
    assert checked == [model_args.model_name_or_path]


def test_documented_training_commands_parse(monkeypatch):
    """Every `train_sft.py` command of docs/training.md, as written, parses and names its data."""
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(coconut.preflight, "require_coconut_checkpoint", lambda path, revision=None: None)  # not here
    commands = documented_commands((ROOT / "docs" / "training.md").read_text())
    assert len(commands) >= 7
    for argv in commands:
        # As `python train_sft.py` reads them: flags that name no dataset, model or recipe run the demo with them.
        script_args, _, model_args = parse([*train_sft.with_demo_defaults(argv, train_sft.DEMO_ARGS), *NO_BF16])
        check_dataset_argument(script_args, model_args)


def test_the_scripts_own_commands_parse_and_name_their_data(monkeypatch):
    """The commands in train_sft.py's docstring parse; each one with flags names its data (`--dataset` or a recipe)."""
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(coconut.preflight, "require_coconut_checkpoint", lambda path, revision=None: None)  # not here
    commands = documented_commands(train_sft.__doc__)
    assert len(commands) == 4 and commands[0] == []  # `python train_sft.py`: the embedded default
    for argv in commands[1:]:
        assert {"--dataset", "--config"} & set(argv), argv
        script_args, _, model_args = parse([*argv, *NO_BF16])
        check_dataset_argument(script_args, model_args)


def test_aokvqa_recipe_follows_the_papers_gsm8k_setting():
    _, args, _ = parse(["--config", str(ROOT / "recipes" / "aokvqa_coconut.yaml"), *NO_BF16])
    assert (args.c_thought, args.max_latent_stage, args.epochs_per_stage, args.num_train_epochs) == (2, 3, 3, 25)
    assert (args.learning_rate, args.weight_decay, args.lr_scheduler_type.value) == (1e-4, 0.01, "constant")
    assert args.pad_latent_to_max and args.reset_optimizer and args.uniform_prob == 0
    per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps
    assert per_step * 8 == 128  # the paper's batch on the 8 processes of recipes/accelerate/ddp.yaml


def aokvqa_fixture(folder: Path) -> list[dict]:
    """The fixture's A-OKVQA rows as a Coconut JSON folder (`aokvqa_train.json`, `aokvqa_validation.json`), through
    the repository's A-OKVQA mapping (multiple choice, the first rationale's sentences as steps)."""
    folder.mkdir()
    records = []
    for split in ("train", "validation"):
        rows = [json.loads(line) for line in (FIXTURE / f"{split}.jsonl").read_text().splitlines()]
        split_records = [aokvqa_to_record({**row, "image": str(FIXTURE / row["image"])}) for row in rows]
        (folder / f"aokvqa_{split}.json").write_text(json.dumps(split_records, indent=1))
        records += split_records
    return records


def tiny_converted_model(folder: Path, records: list[dict]) -> CoconutInternVLForConditionalGeneration:
    """A tiny Coconut-InternVL repository (56-px tiles, 4 image tokens) whose tokenizer is learned on `records`."""
    corpus = [text for record in records for text in (record["question"], *record["steps"], record["answer"])]
    tokenizer = train_tokenizer(corpus, vocab_size=600)
    config = tiny_coconut_config_for(tokenizer)
    image_processor = GotOcr2ImageProcessorPil(
        size={"height": 56, "width": 56}, crop_to_patches=False, image_mean=[0.5] * 3, image_std=[0.5] * 3
    )
    processor = CoconutInternVLProcessor(image_processor, tokenizer, image_seq_length=config.image_seq_length)
    torch.manual_seed(0)
    model = CoconutInternVLForConditionalGeneration(config)
    model.generation_config = build_generation_config(model, tokenizer)
    # A licence other than this repository's own, so that a card that states it took it from the base.
    save_repository(model, processor, folder, ModelCard("---\nlicense: apache-2.0\n---\n# tiny\n"))
    return model


def test_aokvqa_recipe_trains_on_the_fixture(tmp_path, hf_home):
    """The recipe with the model, data and sizes overridden on the command line: every stage trains and is evaluated,
    the weights change, and TRL's metrics are logged."""
    records = aokvqa_fixture(tmp_path / "aokvqa")
    assert records[0]["steps"] == ["The round object is painted one bright color.", "That color is red."]
    assert records[0]["question"].endswith("\nChoices: red, blue, green, yellow") and records[0]["answer"] == "red"
    initial = tiny_converted_model(tmp_path / "model", records)
    overrides = [
        "--model_name_or_path", str(tmp_path / "model"), "--dataset", str(tmp_path / "aokvqa"),
        "--output_dir", str(tmp_path / "out"), "--dtype", "float32", "--bf16", "false", "--use_cpu", "true",
        "--num_train_epochs", "3", "--epochs_per_stage", "1", "--max_latent_stage", "1",
        "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1", "--per_device_eval_batch_size", "2",
        "--max_length", "256", "--eval_max_new_tokens", "4", "--logging_steps", "1", "--save_strategy", "no",
        "--learning_rate", "1e-3", "--disable_tqdm", "true",
    ]  # fmt: skip
    script_args, training_args, model_args = parse(
        ["--config", str(ROOT / "recipes" / "aokvqa_coconut.yaml")] + overrides
    )
    assert (training_args.c_thought, script_args.eval_split) == (2, "validation")  # from the recipe
    trainer = train_sft.main(script_args, training_args, model_args)

    assert trainer.state.global_step == 9  # 6 records, 2 per step, 3 epochs
    assert [result.stage for result in trainer.eval_results.results] == [0, 1, 2]
    assert trainer.eval_results.results[-1].metrics["max_latent_thoughts"] == 2  # 1 stage x c_thought 2
    losses = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 9 and all("mean_token_accuracy" in entry for entry in losses)
    trained = dict(trainer.model.named_parameters())
    changed = [name for name, p in initial.named_parameters() if not torch.equal(p, trained[name])]
    assert any("language_model" in name for name in changed) and any("vision_tower" in name for name in changed)
    assert (tmp_path / "out" / "model.safetensors").is_file()
    card = (tmp_path / "out" / "README.md").read_text()
    assert yaml.safe_load(card.split("---", 2)[1])["license"] == "apache-2.0"  # the base model's
