"""train_sft.py and evaluate.py fed bad input: re-runs with other flags, unwritable folders, short runs,
too long records, a missing `--dataset`, damaged weights, missing models, and the settings a saved model records."""

import json
import logging
import os
import shutil
from fnmatch import fnmatch
from pathlib import Path

import pytest
from datasets import Image, List
from PIL import Image as PILImage
from trl import ModelConfig, TrlParser

import coconut.repository
import evaluate
import train_sft
from coconut.curriculum import CurriculumConfig, max_example_length
from coconut.data import image_token_counter, records_to_dataset, validate_dataset
from coconut.eval_config import CoconutEvalConfig
from coconut.evaluation import evaluate_stage
from coconut.sft_config import CoconutSFTConfig
from coconut.synthetic import SyntheticTaskConfig, build_synthetic_split
from coconut.tiny import tiny_model_and_processor


# The demo's task and model, shrunk: 8 records of a 2 x 2 board with 2 arrows, three stages of two steps.
SMALL_RUN = [
    "--dataset", "arrow_chase", "--synthetic_train_size", "8", "--synthetic_validation_size", "2",
    "--synthetic_test_size", "4", "--synthetic_grid_size", "2", "--synthetic_max_hops", "2",
    "--num_train_epochs", "3", "--max_latent_stage", "2",
    "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "2", "--eval_max_new_tokens", "2",
    "--learning_rate", "1e-3", "--save_strategy", "no", "--bf16", "false", "--use_cpu", "true", "--report_to", "none",
    "--disable_tqdm", "true", "--logging_steps", "1", "--seed", "0",
]  # fmt: skip


def parse(argv: list[str]):
    return TrlParser((train_sft.ScriptArguments, CoconutSFTConfig, ModelConfig)).parse_args_and_config(argv)


def train(tmp_path, *flags: str, output: str = "out"):
    """`train_sft.py` in this process on `SMALL_RUN`; later flags override earlier ones."""
    folders = ["--output_dir", str(tmp_path / output), "--synthetic_dir", str(tmp_path / "data")]
    return train_sft.main(*parse([*SMALL_RUN, *folders, *flags]))


def test_rerun_with_other_flags_is_refused(tmp_path):
    """The same command plus `--c_thought 2` used to resume, train 0 steps and rewrite the card."""
    output = tmp_path / "out"
    train(tmp_path, "--save_strategy", "steps", "--save_steps", "2")
    card = (output / "README.md").read_text()
    with pytest.raises(
        ValueError, match="checkpoint-6' was trained with other settings than this run: c_thought: 1 -> 2"
    ):
        train(tmp_path, "--save_strategy", "steps", "--save_steps", "2", "--c_thought", "2")
    assert (output / "README.md").read_text() == card  # nothing rewritten
    # Flags that do not change the training resume (here: nothing left to train).
    resumed = train(tmp_path, "--save_strategy", "steps", "--save_steps", "3", "--logging_steps", "2",
                    "--per_device_eval_batch_size", "1", "--eval_max_new_tokens", "3")  # fmt: skip
    assert resumed.state.global_step == 6
    # Without the checkpoints, the run trains from scratch.
    for checkpoint in output.glob("checkpoint-*"):
        shutil.rmtree(checkpoint)
    train(tmp_path, "--c_thought", "2")
    assert "c_thought 2" in (output / "README.md").read_text()
    assert json.loads((output / "coconut_training.json").read_text())["curriculum"]["c_thought"] == 2


def test_output_dir_that_cannot_be_written_fails_before_training(tmp_path):
    """The check runs first: no data is rendered, no step trained."""
    (tmp_path / "a_file").write_text("")
    with pytest.raises(ValueError, match="`output_dir`='.*a_file/out' cannot be written \\(NotADirectoryError"):
        train(tmp_path, "--output_dir", str(tmp_path / "a_file" / "out"))
    assert not (tmp_path / "data").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_dir_fails_before_training(tmp_path):
    (tmp_path / "read_only").mkdir(mode=0o555)
    with pytest.raises(ValueError, match="`output_dir`='.*read_only' cannot be written \\(PermissionError"):
        train(tmp_path, "--output_dir", str(tmp_path / "read_only"))
    assert not (tmp_path / "data").exists()


@pytest.mark.skipif(not os.path.isdir("/sys/kernel"), reason="needs sysfs")
def test_existing_unwritable_output_dir_fails_before_training(tmp_path):
    """An existing folder that even root cannot write into (sysfs)."""
    with pytest.raises(ValueError, match="`output_dir`='/sys/kernel' cannot be written"):
        train(tmp_path, "--output_dir", "/sys/kernel")
    assert not (tmp_path / "data").exists()


def test_short_run_card_and_results_describe_the_saved_model(tmp_path, caplog):
    """Stopped by `--max_steps` in stage 1, the card, record and results say stage 1 with 1 thought."""
    with caplog.at_level(logging.WARNING, logger="coconut.sft_trainer"):
        train(tmp_path, "--max_steps", "3")
    assert "`max_steps`=3 of 6 steps ends in stage 1, but `max_latent_stage`=2 needs" in caplog.text
    output = tmp_path / "out"
    card = (output / "README.md").read_text()
    assert "num_latent_thoughts=1)" in card and "reached stage 1" in card and "stopped at step 3 of 6" in card
    record = json.loads((output / "coconut_training.json").read_text())
    assert (record["stage"], record["num_latent_thoughts"]) == (1, 1)
    overall = json.loads((output / "eval_results.json").read_text())["overall"]
    assert (overall["final_stage"], overall["max_latent_thoughts"]) == (1, 1)
    with pytest.raises(ValueError, match="`num_train_epochs`=0"):
        train(tmp_path, "--num_train_epochs", "0")


def test_killed_run_keeps_every_stage_in_its_results(tmp_path):
    """Through the script: a run killed after step 3 (stage 0 evaluated, checkpoint-3 saved) and started again
    writes the same results and predictions for every stage as a run that was never killed."""
    output = tmp_path / "out"
    train(tmp_path, "--save_strategy", "steps", "--save_steps", "1")
    finished = {path.name: path.read_text() for path in output.glob("predictions_stage_*.jsonl")}
    results = json.loads((output / "eval_results.json").read_text())
    # What a SIGKILL after checkpoint-3 leaves: checkpoints 1 to 3, no later checkpoint, no final files.
    for path in output.iterdir():
        if path.name not in ("checkpoint-1", "checkpoint-2", "checkpoint-3"):
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    resumed = train(tmp_path, "--save_strategy", "steps", "--save_steps", "1")
    assert resumed.state.global_step == 6
    assert sorted(finished) == ["predictions_stage_0.jsonl", "predictions_stage_1.jsonl", "predictions_stage_2.jsonl"]
    assert {name: (output / name).read_text() for name in finished} == finished
    again = json.loads((output / "eval_results.json").read_text())
    assert [row["stage"] for row in again["stages"]] == [0, 1, 2]
    for row, expected in zip(again["stages"], results["stages"], strict=True):
        assert row["metrics"]["accuracy"] == expected["metrics"]["accuracy"]


def test_records_longer_than_max_length_are_refused_or_skipped(tmp_path, caplog):
    """The length check runs in train_sft, counting image tokens; `--skip_invalid` drops and counts."""
    task = SyntheticTaskConfig(grid_size=2, max_hops=3, train_size=8)
    records = build_synthetic_split(tmp_path / "data", "train", task)
    _, processor = tiny_model_and_processor(task, seed=0)
    count = image_token_counter(processor)
    curriculum = CurriculumConfig(max_latent_stage=2)
    stored = records.cast_column("images", List(Image(decode=False)))  # image files, as the check reads them
    lengths = [
        max_example_length(record, processor.tokenizer, curriculum) + sum(map(count, record["images"]))
        for record in stored
    ]
    limit = max(lengths) - 1
    too_long = [index for index, length in enumerate(lengths) if length > limit]
    assert 0 < len(too_long) < len(records)
    first = records[too_long[0]]["id"]
    with pytest.raises(ValueError, match=f"Record {too_long[0]} \\(id '{first}'\\): too long: .* max_length={limit}"):
        train(tmp_path, "--synthetic_max_hops", "3", "--max_length", str(limit))
    with caplog.at_level(logging.WARNING, logger="coconut.data"):
        trainer = train(tmp_path, "--synthetic_max_hops", "3", "--max_length", str(limit), "--skip_invalid", "true")
    assert f"Skipped {len(too_long)} of 8 records: {len(too_long)} x too long" in caplog.text
    assert len(trainer.records) == 8 - len(too_long)


def test_the_length_check_counts_image_tokens_as_the_processor_makes_them(tmp_path):
    """A non-square image is tiled by the processor (`crop_to_patches`): the check counted 6 image tokens where the
    processor made 30, so a record passed the check, then failed in the collator, and `--skip_invalid` could not
    drop it."""
    _, processor = tiny_model_and_processor(SyntheticTaskConfig(grid_size=2, max_hops=2), seed=0)
    count = image_token_counter(processor)
    sizes = [(56, 56), (336, 56), (56, 336), (200, 90)]
    records = []
    for index, size in enumerate(sizes):
        path = tmp_path / f"{index}.png"
        PILImage.new("RGB", size, "white").save(path)
        records.append({"id": f"r{index}", "question": "Where?", "steps": ["Here."], "answer": "A1", "images": [path]})
        prompt = processor.build_prompt("Where?", num_images=1)
        input_ids = processor(images=[PILImage.open(path)], text=prompt, return_tensors="pt")["input_ids"][0]
        made = int((input_ids == processor.image_token_id).sum()) + 2  # + <img> and </img>
        assert count({"path": str(path), "bytes": None}) == made
    assert made == 38  # 9 tiles of 4 tokens, not the single tile of a square image
    dataset = records_to_dataset(records)
    curriculum = CurriculumConfig(max_latent_stage=1)
    text = max_example_length(dataset[0], processor.tokenizer, curriculum)
    kept = validate_dataset(
        dataset,
        skip_invalid=True,
        tokenizer=processor.tokenizer,
        max_length=text + 6,
        curriculum=curriculum,
        image_token_count=count,
    )
    assert kept["id"] == ["r0"]


def test_dataset_is_required_outside_the_demo(tmp_path):
    """`--model_name_or_path` without `--dataset` used to train on the synthetic task."""
    without_dataset = [flag for flag in SMALL_RUN if flag not in ("--dataset", "arrow_chase")]
    for extra in (["--model_name_or_path", str(tmp_path / "model")], []):
        with pytest.raises(ValueError, match="`--dataset` is missing: pass `--dataset arrow_chase`"):
            train_sft.main(*parse([*without_dataset, "--output_dir", str(tmp_path / "out"), *extra]))
    assert not (tmp_path / "out").exists()


def test_truncated_model_weights_are_named(tmp_path):
    """`--model_name_or_path` with a weight file cut short."""
    model, processor = tiny_model_and_processor(SyntheticTaskConfig(grid_size=2, max_hops=2), seed=0)
    model.save_pretrained(tmp_path / "model")
    weights = tmp_path / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ValueError, match=f"Weight file '{weights}' is damaged"):
        train(tmp_path, "--model_name_or_path", str(tmp_path / "model"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The small run's saved model; seed 3 and c_thought 2 differ from evaluate.py's defaults."""
    folder = tmp_path_factory.mktemp("trained")
    train(folder, "--seed", "3", "--c_thought", "2")
    return folder / "out"


def test_evaluate_defaults_to_the_recorded_task_and_curriculum(trained, tmp_path):
    """`evaluate.py --model <trained>` evaluates on the model's own task, curriculum and stage."""
    record = json.loads((trained / "coconut_training.json").read_text())
    assert (record["task"]["grid_size"], record["task"]["max_hops"], record["task"]["seed"]) == (2, 2, 3)
    assert (record["stage"], record["curriculum"]["c_thought"], record["dataset"]) == (2, 2, "arrow_chase")
    parser = TrlParser((evaluate.ScriptArguments, evaluate.CurriculumArguments, CoconutEvalConfig))
    common = ["--model", str(trained), "--split", "test", "--max_samples", "4", "--max_new_tokens", "4"]
    common += ["--data_dir", str(tmp_path / "data"), "--disable_tqdm", "true"]
    defaults = evaluate.main(*parser.parse_args_and_config([*common, "--output_dir", str(tmp_path / "a")]))
    flags = ["--dataset", "arrow_chase", "--synthetic_grid_size", "2", "--synthetic_max_hops", "2", "--stage", "2"]
    flags += ["--max_latent_stage", "2", "--c_thought", "2", "--output_dir", str(tmp_path / "b")]
    explicit = evaluate.main(*parser.parse_args_and_config([*common, *flags]))
    # Both against a direct evaluation on the task and curriculum the model was trained with.
    task = SyntheticTaskConfig(**record["task"])
    records = build_synthetic_split(tmp_path / "direct", "test", task, num_records=4)
    model, processor = evaluate.load_model_and_processor(str(trained))
    config = CoconutEvalConfig(stage=2, max_new_tokens=4, disable_tqdm=True)
    direct = evaluate_stage(model, processor, records, CurriculumConfig(c_thought=2, max_latent_stage=2), config)
    for result in (defaults.results[0], explicit.results[0]):
        assert result.stage == 2
        assert [p.generation for p in result.predictions] == [p.generation for p in direct.predictions]
        assert [p.num_latent_thoughts for p in result.predictions] == [4] * 4  # stage 2 x c_thought 2
    for index in range(4):  # the boards evaluate.py rendered are those of the recorded task (2 x 2, seed 3)
        name = f"{task.folder_name}/test/test-{index:05d}.png"
        assert (tmp_path / "data" / name).read_bytes() == (tmp_path / "direct" / name).read_bytes()


def test_evaluate_checks_the_model_before_rendering_data(tmp_path):
    """A model path that does not exist fails at once, before 200 images are rendered."""
    parser = TrlParser((evaluate.ScriptArguments, evaluate.CurriculumArguments, CoconutEvalConfig))
    data = ["--dataset", "arrow_chase", "--data_dir", str(tmp_path / "data")]
    with pytest.raises(ValueError, match="`--model` '.*outputs/demoo' does not exist"):
        evaluate.main(*parser.parse_args_and_config(["--model", str(tmp_path / "outputs" / "demoo"), *data]))
    (tmp_path / "outputs").mkdir()
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:  # relative, as typed: `outputs/demoo` beside an existing `outputs/` is a path, not a Hub id
        with pytest.raises(ValueError, match="`--model` 'outputs/demoo' does not exist"):
            evaluate.main(*parser.parse_args_and_config(["--model", "outputs/demoo", *data]))
    finally:
        os.chdir(cwd)
    with pytest.raises(ValueError, match="`--model` folder '.*outputs' has no config.json"):
        evaluate.main(*parser.parse_args_and_config(["--model", str(tmp_path / "outputs"), *data]))
    assert not (tmp_path / "data").exists()


def test_evaluate_names_a_truncated_weight_file(trained, tmp_path):
    damaged = tmp_path / "damaged"
    shutil.copytree(trained, damaged)
    weights = damaged / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    parser = TrlParser((evaluate.ScriptArguments, evaluate.CurriculumArguments, CoconutEvalConfig))
    with pytest.raises(ValueError, match=f"Weight file '{weights}' is damaged"):
        evaluate.main(*parser.parse_args_and_config(["--model", str(damaged), "--data_dir", str(tmp_path / "data")]))
    assert not (tmp_path / "data").exists()


def test_curriculum_continues_from_a_trained_cot_model(tmp_path):
    """`--model_name_or_path <cot run> --start_stage 1`: the saved CoT model is the starting point, stage 0 is skipped
    and the run ends at the final stage."""
    train(tmp_path, "--method", "cot", output="cot")
    trainer = train(
        tmp_path, "--model_name_or_path", str(tmp_path / "cot"), "--start_stage", "1", "--num_train_epochs", "2",
        output="coconut",
    )  # fmt: skip
    assert [result.stage for result in trainer.eval_results.results] == [1, 2]
    record = json.loads((tmp_path / "coconut" / "coconut_training.json").read_text())
    assert record["start_stage"] == 1 and record["stage"] == 2
    with pytest.raises(ValueError, match="method 'cot' has no stages"):
        train(tmp_path, "--method", "cot", "--start_stage", "1", output="refused")


@pytest.fixture
def uploads(monkeypatch):
    """What `push_folder` would upload, recorded instead of sent: `("create_repo", repo_id, private)`, then
    `("upload_folder", repo_id, folder, the files it would upload)`."""
    calls = []

    class RecordingHfApi:
        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, **kwargs):
            calls.append(("create_repo", repo_id, kwargs["private"]))

        def upload_folder(self, folder_path, ignore_patterns, **kwargs):
            folder = Path(folder_path)
            files = {str(path.relative_to(folder)) for path in folder.rglob("*") if path.is_file()}
            ignored = {name for name in files if any(fnmatch(name, pattern) for pattern in ignore_patterns)}
            calls.append(("upload_folder", kwargs["repo_id"], folder, files - ignored))
            return "https://huggingface.co/me/coconut/commit/0"

    monkeypatch.setattr(coconut.repository, "HfApi", RecordingHfApi)
    return calls


PUSH = ["--push_to_hub", "true", "--hub_model_id", "me/coconut", "--hub_private_repo", "true"]
# A full repository: weights, code, processor, the card with its example image, the training record and results.
REPOSITORY_FILES = {"model.safetensors", "config.json", "modeling_coconut_internvl.py", "processor_config.json"}
REPOSITORY_FILES |= {"README.md", "example_0.png", "coconut_training.json"}


def test_push_uploads_the_saved_folder_at_the_end(tmp_path, uploads):
    """`--push_to_hub` uploads the finished folder once, after saving, without the training checkpoints."""
    with pytest.raises(ValueError, match="`--push_to_hub` needs `--hub_model_id you/name`"):
        train(tmp_path, "--push_to_hub", "true")
    assert not uploads and not (tmp_path / "data").exists()
    train(tmp_path, *PUSH, "--max_steps", "2", "--save_strategy", "steps", "--save_steps", "1")
    (_, repo_id, private), (_, pushed_repo, folder, files) = uploads
    assert (repo_id, private, pushed_repo, folder) == ("me/coconut", True, "me/coconut", tmp_path / "out")
    assert (folder / "checkpoint-1").is_dir() and not [name for name in files if name.startswith("checkpoint-")]
    assert REPOSITORY_FILES | {"eval_results.json"} <= files, REPOSITORY_FILES - files
    assert 'repo = "me/coconut"' in (folder / "README.md").read_text()


def test_lora_run_keeps_the_adapter_and_pushes_the_merged_model(tmp_path, uploads):
    """With `--use_peft` the output folder holds the adapter, its card and record; `merged/` the full repository,
    which is what is pushed."""
    train(tmp_path, *PUSH, "--max_steps", "2", "--use_peft", "true", "--lora_r", "4", "--lora_alpha", "8")
    output = tmp_path / "out"
    assert {"adapter_config.json", "README.md", "coconut_training.json"} <= {path.name for path in output.iterdir()}
    assert not (output / "model.safetensors").exists()
    (_, _, folder, files) = uploads[1]
    assert folder == output / "merged" and REPOSITORY_FILES <= files, REPOSITORY_FILES - files
    assert (folder / "README.md").read_text() == (output / "README.md").read_text()
    record = json.loads((folder / "coconut_training.json").read_text())
    assert record == json.loads((output / "coconut_training.json").read_text()) and record["global_step"] == 2


def test_a_saved_pause_as_thought_model_loads(tmp_path, hf_home):
    """Pause as thought saves `latent_token_id=None` (nothing is fed back): loading must not take that for an id
    that disagrees with the tokenizer's `<|latent|>`."""
    from coconut.loading import load_model_and_processor

    train(tmp_path, "--method", "pause_as_thought")
    model, processor = load_model_and_processor(str(tmp_path / "out"))
    assert model.config.latent_token_id is None
    assert processor.tokenizer.convert_tokens_to_ids("<|latent|>") is not None
