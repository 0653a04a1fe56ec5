"""`evaluate.py` end to end on the ProsQA slice: a saved tiny model, the real loader, results files and model card."""

import json
from pathlib import Path
from statistics import fmean

import pytest
import torch
from conftest import splitting_threshold, stop_probability_rows
from trl import TrlParser

from coconut.curriculum import CurriculumConfig, question_prompt
from coconut.data import load_coconut_json
from coconut.eval_config import CoconutEvalConfig
from coconut.evaluation import evaluate_stage
from coconut.model_card import CARD_TABLE_END, CARD_TABLE_START, write_table_into_card
from coconut.tiny import tiny_coconut_config_for
from coconut.tokenizer import train_tokenizer
from evaluate import CurriculumArguments, ScriptArguments, main
from modeling_coconut_internvl import CoconutInternVLForConditionalGeneration
from processing_coconut_internvl import END_LATENT, LATENT, START_LATENT


SLICE = Path(__file__).parent / "data" / "prosqa_valid_slice.json"
PARSER = (ScriptArguments, CurriculumArguments, CoconutEvalConfig)


def save_tiny_model(folder: Path, **config):
    """A random tiny model (with its tokenizer and a README.md) saved in `folder`; `config` sets config fields."""
    records = json.loads(SLICE.read_text())
    tokenizer = train_tokenizer([r["question"] + " ".join(r["steps"]) + r["answer"] for r in records], vocab_size=320)
    torch.manual_seed(0)
    model = CoconutInternVLForConditionalGeneration(tiny_coconut_config_for(tokenizer, **config)).eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "README.md").write_text("# Tiny Coconut\n")
    return folder, model, tokenizer


@pytest.fixture
def saved_model(tmp_path, hf_home):
    return save_tiny_model(tmp_path / "model")


def test_evaluate_script(saved_model, tmp_path):
    model_dir, model, tokenizer = saved_model
    argv = ["--model", str(model_dir), "--dataset", str(SLICE.parent), "--split", "valid_slice", "--stage", "2"]
    argv += ["--max_latent_stage", "6", "--max_samples", "5", "--max_new_tokens", "6", "--batch_size", "2"]
    argv += ["--output_dir", str(tmp_path / "eval"), "--update_model_card", "--disable_tqdm"]
    script_args, curriculum_args, eval_config = TrlParser(PARSER).parse_args_and_config(argv)
    assert (eval_config.stage, curriculum_args.max_latent_stage, script_args.max_samples) == (2, 6, 5)

    results = main(script_args, curriculum_args, eval_config)
    curriculum = CurriculumConfig(max_latent_stage=6)  # the model has no training record: defaults + the flags
    saved = json.loads((tmp_path / "eval" / "eval_results.json").read_text())
    records = load_coconut_json(SLICE).select(range(5))
    direct = evaluate_stage(model, tokenizer, records, curriculum, eval_config)
    assert saved["stages"][0]["stage"] == 2 and saved["overall"]["num_samples"] == 5
    for name in ("accuracy", "mean_generated_tokens"):
        assert saved["overall"][name] == direct.metrics[name] == results.results[0].metrics[name]
    assert [p.generation for p in results.results[0].predictions] == [p.generation for p in direct.predictions]
    assert [p.num_latent_thoughts for p in direct.predictions] == [2] * 5  # every slice record has >= 3 steps
    assert (tmp_path / "eval" / "eval_results.png").is_file()
    card = (model_dir / "README.md").read_text()
    assert card.startswith("# Tiny Coconut") and "| Stage | Accuracy |" in card


def test_evaluate_script_lets_the_stop_head_choose(tmp_path, hf_home, capsys):
    model_dir, model, tokenizer = save_tiny_model(tmp_path / "model", latent_stop_head=True)
    records = load_coconut_json(SLICE).select(range(5))
    prompts = [(tokenizer(question_prompt(r, tokenizer), return_tensors="pt")["input_ids"], None) for r in records]
    threshold = splitting_threshold(stop_probability_rows(model, prompts, 3))  # splits the questions' counts
    argv = ["--model", str(model_dir), "--dataset", str(SLICE.parent), "--split", "valid_slice"]
    argv += ["--num_latent_thoughts", "auto", "--max_latent_thoughts", "3", "--latent_stop_threshold", repr(threshold)]
    argv += ["--max_latent_stage", "3", "--max_samples", "5", "--max_new_tokens", "6", "--batch_size", "2"]
    argv += ["--output_dir", str(tmp_path / "eval"), "--disable_tqdm"]
    parser = TrlParser(PARSER)
    script_args, curriculum_args, eval_config = parser.parse_args_and_config(argv)
    assert (eval_config.num_latent_thoughts, eval_config.max_latent_thoughts) == ("auto", 3)
    assert parser.parse_args_and_config(["--model", "m", "--num_latent_thoughts", "3"])[2].num_latent_thoughts == 3

    results = main(script_args, curriculum_args, eval_config)
    planned = []  # each question's count as the stop head chooses it, the question alone
    for record in records:
        input_ids = tokenizer(question_prompt(record, tokenizer), return_tensors="pt")["input_ids"]
        settings = dict(max_latent_thoughts=3, latent_stop_threshold=threshold)
        planned += model.plan_latent_thoughts(input_ids, torch.ones_like(input_ids), **settings)
    assert [p.num_latent_thoughts for p in results.results[0].predictions] == planned
    final = [min(len(record["steps"]), 3) for record in records]  # the curriculum's last stage, c_thought 1
    stop_accuracy = fmean(k == n for k, n in zip(planned, final, strict=True))
    assert len(set(planned)) > 1 and 0 < stop_accuracy < 1, (planned, final)
    overall = json.loads((tmp_path / "eval" / "eval_results.json").read_text())["overall"]
    assert overall["stop_accuracy"] == pytest.approx(stop_accuracy)
    assert overall["mean_latent_thoughts"] == overall["mean_stop_thoughts"] == pytest.approx(fmean(planned))
    printed = capsys.readouterr().out
    assert "| Thoughts (mean) | Stop accuracy | Stop thoughts (mean) |" in printed

    plain_dir = save_tiny_model(tmp_path / "plain")[0]
    script_args.model, script_args.output_dir = str(plain_dir), str(tmp_path / "plain_eval")
    with pytest.raises(ValueError, match="this model has no stop head"):
        main(script_args, curriculum_args, eval_config)


def test_missing_split_names_the_files(tmp_path):
    from evaluate import load_eval_records

    with pytest.raises(ValueError, match="0 files ending in 'train.json'.*prosqa_valid_slice.json"):
        load_eval_records(str(SLICE.parent), "train")


def test_table_replaces_the_previous_one(tmp_path):
    card = tmp_path / "README.md"
    card.write_text("# Model\n\nText.\n")
    write_table_into_card(card, "| a |\n")
    text = write_table_into_card(card, "| b |\n")
    assert text.count(CARD_TABLE_START) == text.count(CARD_TABLE_END) == 1
    assert "| b |" in text and "| a |" not in text and text.startswith("# Model\n\nText.\n\n## Evaluation")
    with pytest.raises(ValueError, match="does not exist"):
        write_table_into_card(tmp_path / "missing.md", "| c |")


def test_probe_command(saved_model, tmp_path):
    import subprocess
    import sys

    from conftest import subprocess_env

    model_dir, model, tokenizer = saved_model
    output = tmp_path / "probe.json"
    command = [sys.executable, "-m", "coconut.probe", "--model", str(model_dir), "--question", "Is Tom a wumpus?"]
    command += ["--num_latent_thoughts", "3", "--top_k", "2", "--output_file", str(output)]
    env = subprocess_env(tmp_path / "hf_home_probe")  # run as a user would: from the repository root, offline
    completed = subprocess.run(
        command, capture_output=True, text=True, env=env, cwd=Path(__file__).parents[1], timeout=120
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert completed.stdout.count("thought ") == 3, completed.stdout
    saved = json.loads(output.read_text())
    assert saved["prompt"].endswith(START_LATENT + LATENT * 3 + END_LATENT)
    assert [len(t["top_tokens"]) for t in saved["thoughts"]] == [2, 2, 2]
