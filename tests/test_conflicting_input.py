"""Bad input as a new user gives it: flags that would be ignored or conflict, sizes the tiny model cannot read, folders
passed to the wrong script. Each fails before any data is built, naming the flags, the values and the fix."""

import re
import shutil
from pathlib import Path

import pytest
from test_lora_repository import largest_difference, load_as_the_card_says
from test_run_checks import train
from transformers import AutoProcessor
from trl import TrlParser

import convert_to_coconut
import evaluate
from coconut import linear_probe
from coconut.data import load_train_and_eval_splits
from coconut.evaluation import CoconutEvalConfig
from convert_to_coconut import ConvertConfig


@pytest.fixture(scope="module")
def cot_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cot")
    train(folder, "--method", "cot", "--max_steps", "1")
    return folder / "out"


def test_the_linear_probe_refuses_what_it_would_get_wrong(cot_run, tmp_path):
    """Two models of one name used to keep only the second; a CoT model gave an empty table and exit code 0; an
    `--output_dir` that is a file raised a bare FileExistsError."""
    with pytest.raises(ValueError, match="`--models` names 'a' twice .*the second would replace the first"):
        linear_probe.main(["--models", f"a={cot_run}", f"a={tmp_path}"])
    with pytest.raises(ValueError, match="has no thoughts to probe: it was trained with `method`='cot'"):
        linear_probe.main(["--models", f"cot={cot_run}", "--output_dir", str(tmp_path / "probe")])
    (tmp_path / "a_file").write_text("")
    with pytest.raises(ValueError, match="`output_dir`='.*a_file' cannot be written"):
        linear_probe.main(["--models", f"cot={cot_run}", "--output_dir", str(tmp_path / "a_file")])
    assert not (tmp_path / "probe" / "data").exists()  # refused before any question is rendered


# (flags on top of the small run, the message): each flag would have been ignored, or the pair cannot both hold.
IGNORED_OR_CONFLICTING = [
    (
        ["--stop_loss_weight", "0.5"],
        "`stop_loss_weight`=0.5 weighs the stop head's loss, but `latent_stop_head` is not",
    ),
    (["--latent_stop_head", "true", "--max_latent_stage", "0"], "`max_latent_stage`=0: no stage has a thought"),
    (["--eval_split", ""], r"`--eval_split`='' pick files of a dataset folder, but `--dataset arrow_chase` renders"),
    (["--train_split", "test"], r"`--train_split`='test' pick files of a dataset folder"),
    (["--dtype", "bfloat16"], r"`--dtype`='bfloat16' set how `--model_name_or_path` is loaded, but without it"),
    (["--attn_implementation", "eager"], r"`--attn_implementation`='eager' set how `--model_name_or_path` is"),
    (["--model_revision", "v2"], r"`--model_revision`='v2' set how `--model_name_or_path` is loaded"),
    (["--load_in_4bit", "true"], r"`--load_in_4bit`/`--load_in_8bit`: train_sft.py loads the model unquantised"),
    (["--hub_private_repo", "true"], "`--hub_private_repo` without `--push_to_hub`"),
    (["--use_rslora", "true"], "`--use_rslora`=True without `--use_peft`"),
    (["--synthetic_image_size", "70"], r"`--synthetic_image_size`=70: .* Pass `--synthetic_image_size 56`"),
    (["--synthetic_grid_size", "3", "--synthetic_image_size", "54"], r"Pass `--synthetic_image_size 84`"),
    (["--synthetic_grid_size", "3"], r"`image_size`=56 must be a multiple of `grid_size`=3 .* e.g. image_size=84"),
    (["--hub_model_id", "me/coconut"], r"`--hub_model_id`='me/coconut' without `--push_to_hub`: nothing is pushed"),
    (["--method", "cot", "--c_thought", "2"], r"`--c_thought`=2 with `--method cot`: its examples have no thoughts"),
    (["--method", "no_cot", "--uniform_prob", "0.3"], r"`--uniform_prob`=0.3 with `--method no_cot`"),
]


@pytest.mark.parametrize(
    "flags, message", IGNORED_OR_CONFLICTING, ids=[" ".join(f) for f, _ in IGNORED_OR_CONFLICTING]
)
def test_ignored_or_conflicting_flags_are_refused_before_any_work(tmp_path, flags, message):
    with pytest.raises(ValueError, match=message):
        train(tmp_path, *flags)
    assert not (tmp_path / "data").exists()


def test_flags_for_another_model_or_dataset_are_refused(cot_run, tmp_path):
    """A trained model given as `--model_name_or_path` keeps its embeddings; a dataset file has no synthetic task."""
    with pytest.raises(ValueError, match="`--tiny_embedding_std`=1.0 initialises the tiny model .* Drop it"):
        train(tmp_path, "--model_name_or_path", str(cot_run), "--tiny_embedding_std", "1.0")
    records = tmp_path / "mine_train.json"
    records.write_text("[]")
    with pytest.raises(ValueError, match=r"`--synthetic_train_size`=8, .* but `--dataset`='.*mine_train.json' is not"):
        train(tmp_path, "--model_name_or_path", str(cot_run), "--dataset", str(records))
    no_evaluation = ["--dataset", str(records), "--eval_split", "", *NOT_THE_BUNDLED_TASK]
    with pytest.raises(ValueError, match=r"`--eval_max_new_tokens`=2 with `--eval_split ''`: no split is evaluated"):
        train(tmp_path, "--model_name_or_path", str(cot_run), *no_evaluation)
    with pytest.raises(ValueError, match=r"`--max_eval_samples`=1, .* with `--eval_split ''`"):
        train(tmp_path, "--model_name_or_path", str(cot_run), *no_evaluation, "--max_eval_samples", "1")
    with pytest.raises(ValueError, match=r"`--output_dir`=.* is the folder of `--model_name_or_path`: the run would"):
        train(tmp_path, "--model_name_or_path", str(cot_run), "--output_dir", f"{cot_run}/")
    local_base = ["--model_name_or_path", str(cot_run), "--use_peft", "true", "--merge_adapter", "false"]
    with pytest.raises(ValueError, match=r"`--push_to_hub` would push an adapter whose base is the local folder"):
        train(tmp_path, *local_base, "--push_to_hub", "true", "--hub_model_id", "me/coconut")
    assert not (tmp_path / "data").exists()


# The small run's bundled-task flags back at their defaults, for runs on another dataset.
NOT_THE_BUNDLED_TASK = [
    "--synthetic_train_size", "1500", "--synthetic_validation_size", "200", "--synthetic_test_size", "500",
    "--synthetic_grid_size", "4", "--synthetic_max_hops", "6", "--synthetic_dir", "outputs/data/arrow_chase",
]  # fmt: skip


def test_evaluate_and_convert_refuse_flags_they_would_ignore(cot_run, tmp_path, monkeypatch):
    parser = TrlParser((evaluate.ScriptArguments, evaluate.CurriculumArguments, CoconutEvalConfig))
    records = tmp_path / "mine_test.json"
    records.write_text("[]")
    for flags, message in (
        (
            ["--synthetic_grid_size", "3"],
            r"`--synthetic_grid_size`=3 set the bundled task's questions, but the dataset",
        ),
        (["--data_dir", "elsewhere"], r"`--data_dir`='elsewhere' set the bundled task's questions"),
        (["--aokvqa_target", "direct"], r"`--aokvqa_target`='direct' sets A-OKVQA's answers, but the dataset is"),
    ):
        argv = ["--model", str(cot_run), "--dataset", str(records), "--output_dir", str(tmp_path / "eval"), *flags]
        with pytest.raises(ValueError, match=message):
            evaluate.main(*parser.parse_args_and_config(argv))

    def refuse(*args, **kwargs):
        raise AssertionError("the base was read before the refusal")

    monkeypatch.setattr(convert_to_coconut, "read_base_config", refuse)
    with pytest.raises(ValueError, match="`--private` without `--push_to_hub`: no Hub repository is created"):
        convert_to_coconut.main(ConvertConfig(base=str(cot_run), output=str(tmp_path / "c"), private=True))
    with pytest.raises(ValueError, match="whole number of thoughts, 0 or more, got -1"):  # it failed after loading
        convert_to_coconut.main(ConvertConfig(base=str(cot_run), output=str(tmp_path / "c"), num_latent_thoughts=-1))


@pytest.mark.parametrize(
    "flags",
    [
        ["--method", "pause_as_thought", "--max_steps", "2"],
        ["--match_thought_scale", "true", "--max_steps", "2"],
        ["--latent_stop_head", "true", "--num_train_epochs", "4"],
    ],
    ids=["pause as thought", "rescaled norm", "stop head"],
)
def test_a_saved_run_loads_as_its_card_says(tmp_path, hf_home, flags):
    trainer = train(tmp_path, *flags)
    quick_start = load_as_the_card_says(tmp_path / "out")
    difference = largest_difference(quick_start["model"], trainer.model.eval(), quick_start["inputs"])
    assert difference <= 1e-5, f"the card's model differs from the trained one by {difference}"


def test_the_suggested_image_size_trains(tmp_path):
    """`--synthetic_grid_size 3` used to suggest 54 pixels, which crashed at the first step in the vision tower."""
    trainer = train(tmp_path, "--synthetic_grid_size", "3", "--synthetic_image_size", "84", "--max_steps", "1")
    assert trainer.state.global_step == 1


def test_a_stop_head_the_run_would_not_train_is_refused(tmp_path):
    """A run that ends before the final stage used to save a head that had never seen a final block, and a config
    whose `"auto"` then chose from an untrained head."""
    with pytest.raises(ValueError, match=r"ends in stage 1, before the final stage .* = 3 .* at least .* = 4"):
        train(tmp_path, "--latent_stop_head", "true", "--max_steps", "3")
    with pytest.raises(ValueError, match=r"ends in stage 2, before the final stage"):
        train(tmp_path, "--latent_stop_head", "true", "--num_train_epochs", "3")
    assert not (tmp_path / "out" / "model.safetensors").exists()
    trainer = train(tmp_path, "--latent_stop_head", "true", "--num_train_epochs", "4", "--max_steps", "7")
    assert trainer.stage_reached == 3


def test_a_saved_folder_missing_a_processor_file_names_it(cot_run, tmp_path, hf_home):
    """The library said "Couldn't instantiate the backend tokenizer" (no tokenizer.json) or asked for a
    preprocessor_config.json (no processor_config.json)."""
    for name in ("tokenizer.json", "processor_config.json"):
        folder = tmp_path / name
        shutil.copytree(cot_run, folder)
        (folder / name).unlink()
        with pytest.raises(ValueError, match=f"'.*{re.escape(name)}' has no {re.escape(name)}, which the processor"):
            AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    assert AutoProcessor.from_pretrained(cot_run, trust_remote_code=True).tokenizer is not None


def test_processor_inputs_it_cannot_read_are_named(cot_run, hf_home):
    """Image paths used to fail with "Could not make a flat list of images"; `decode_answer(None)` with a bare
    TypeError."""
    processor = AutoProcessor.from_pretrained(cot_run, trust_remote_code=True)
    prompt = processor.build_prompt("Where do you stop?", num_images=1)
    for images in ("board.png", ["board.png"], [[Path("board.png")]]):
        with pytest.raises(ValueError, match=r"`images` holds the path 'board.png', not an image: open it first"):
            processor(images=images, text=prompt, return_tensors="pt")
    for sequences in (None, 5, [None]):
        with pytest.raises(
            ValueError, match=f"`decode_answer` reads generated text or token ids .* got {re.escape(repr(sequences))}"
        ):
            processor.decode_answer(sequences)
    assert processor.decode_answer("a\n### B2") == "B2" and processor.decode_answer([]) == []


@pytest.mark.parametrize("dataset", ["nope.json", "ac_trian.json", "data_typo/prosqa_train.json"])
def test_a_dataset_path_that_does_not_exist_says_so_first(dataset, tmp_path, monkeypatch):
    """A missing file used to be reported as a split problem ("is one file, which holds a single split")."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=f"`dataset` '{re.escape(dataset)}': no such file or folder"):
        load_train_and_eval_splits(dataset, "train", "valid")


def test_a_missing_relative_folder_in_hub_id_form_says_no_such_folder(tmp_path, monkeypatch, hf_home):
    """`data/prosqa` without a `data/` folder is also a Hub id: after the Hub look-up the message said only that the
    Hub could not be reached."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(
        ValueError, match=r"`dataset` 'data/prosqa': no such file or folder in '.*', and no Hub dataset"
    ):
        load_train_and_eval_splits("data/prosqa", "train", "valid")
