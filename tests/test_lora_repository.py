"""A LoRA run's output loads as the model that was trained: exactly as its card says, with and without the stop head
and the rescaled final norm; and the LoRA flags that would save something else are refused before any work."""

import re

import pytest
import torch
from test_run_checks import train
from transformers import AutoModel
from trl import TrlParser

import evaluate
from coconut.evaluation import CoconutEvalConfig
from coconut.loading import load_model_and_processor


LORA = ["--use_peft", "true", "--lora_r", "4", "--lora_alpha", "8"]


def load_as_the_card_says(folder):
    """Run the quick start of `folder`'s README.md as a user would paste it; returns its namespace (`model`,
    `processor`, `inputs`, ...)."""
    card = (folder / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", card, re.DOTALL).group(1)
    namespace = {}
    exec(code, namespace)  # the card's own code: loads, builds the prompt, generates
    return namespace


def largest_difference(model, other, inputs) -> float:
    with torch.no_grad():
        return (model(**inputs).logits - other(**inputs).logits).abs().max().item()


@pytest.mark.parametrize(
    "flags",
    [[], ["--latent_stop_head", "true", "--match_thought_scale", "true", "--num_train_epochs", "4"]],
    ids=["lora", "lora with stop head and rescaled norm"],
)
def test_a_lora_run_loads_as_its_card_says(tmp_path, hf_home, flags):
    """The card's quick start used to load the adapter folder: without the stop head (reported as unexpected weights)
    and the rescaled norm (logits 0.34 off), or not at all for the tiny model (its adapter names no base)."""
    train(tmp_path, *LORA, *flags)
    output = tmp_path / "out"
    quick_start = load_as_the_card_says(output)
    model, inputs = quick_start["model"], quick_start["inputs"]
    merged = AutoModel.from_pretrained(output / "merged", trust_remote_code=True).eval()
    difference = largest_difference(model, merged, inputs)
    assert difference <= 1e-5, f"the card's model differs from merged/ by {difference}"
    assert quick_start["completion"]  # the quick start generated
    if flags:
        assert torch.equal(model.latent_stop_head.weight, merged.latent_stop_head.weight)
        assert model.generation_config.max_latent_thoughts == merged.generation_config.max_latent_thoughts == 2
        processor, images = quick_start["processor"], quick_start["images"]
        prompt = processor.build_prompt(quick_start["question"], num_images=len(images), num_latent_thoughts=None)
        auto_inputs = processor(images=images, text=prompt, return_tensors="pt")
        with torch.no_grad():  # used to say "train the head (`train_sft.py --latent_stop_head`)"
            auto = model.generate(**auto_inputs, num_latent_thoughts="auto", max_new_tokens=3, do_sample=False)
            expected = merged.generate(**auto_inputs, num_latent_thoughts="auto", max_new_tokens=3, do_sample=False)
        assert torch.equal(auto, expected)
    assert quick_start["repo"] == str(output / "merged")


def test_an_adapter_saved_alone_loads_onto_its_base_as_its_card_says(tmp_path, hf_home):
    """`--merge_adapter false` from a saved base: the card loads the adapter folder, and it gives the logits of the
    model in training (not merged: an independent reference)."""
    train(tmp_path, "--max_steps", "1", output="base")
    trainer = train(tmp_path, *LORA, "--merge_adapter", "false", "--model_name_or_path", str(tmp_path / "base"))
    output = tmp_path / "out"
    assert not (output / "merged").exists()
    quick_start = load_as_the_card_says(output)
    trained = trainer.model.eval()
    difference = largest_difference(quick_start["model"], trained, quick_start["inputs"])
    assert difference <= 1e-5, f"the card's model differs from the trained one by {difference}"


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--match_thought_scale", "true"], "rescales the final norm and LM head, which the adapter does not hold"),
        (["--latent_stop_head", "true"], "adds a stop head, which the base model the adapter loads onto lacks"),
        ([], "the tiny model trained from scratch is saved nowhere else"),
    ],
)
def test_an_adapter_alone_that_would_not_load_as_trained_is_refused(tmp_path, flags, message):
    with pytest.raises(ValueError, match=f"`--merge_adapter false` saves only the LoRA adapter.*{message}"):
        train(tmp_path, *LORA, "--merge_adapter", "false", *flags)
    assert not (tmp_path / "data").exists()  # before any data is rendered


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--merge_adapter", "false"], "`--merge_adapter`=False without `--use_peft`"),
        (["--lora_r", "8"], "`--lora_r`=8 without `--use_peft`"),
        (["--lora_target_modules", "q_proj"], "`--lora_target_modules`=.*without `--use_peft`"),
    ],
)
def test_lora_flags_without_use_peft_are_refused(tmp_path, flags, message):
    with pytest.raises(ValueError, match=message):
        train(tmp_path, *flags)
    assert not (tmp_path / "data").exists()


def test_the_scripts_point_a_lora_output_folder_at_its_merged_model(tmp_path, hf_home):
    """`evaluate.py --model <a LoRA run's output_dir>` used to say "has no config.json: pass the folder that
    train_sft.py saved", which was the folder passed."""
    output = tmp_path / "out"
    output.mkdir()
    (output / "adapter_config.json").write_text("{}")
    (output / "merged").mkdir()
    (output / "merged" / "config.json").write_text("{}")
    parser = TrlParser((evaluate.ScriptArguments, evaluate.CurriculumArguments, CoconutEvalConfig))
    data = ["--dataset", "arrow_chase", "--data_dir", str(tmp_path / "data")]
    merged = re.escape(repr(str(output / "merged")))
    with pytest.raises(ValueError, match=f"holds the LoRA adapter .* the trained model is in {merged}"):
        evaluate.main(*parser.parse_args_and_config(["--model", str(output), *data]))
    with pytest.raises(ValueError, match=f"the trained model is in {merged}"):  # to continue training from it
        train(tmp_path, "--model_name_or_path", str(output), output="again")
    with pytest.raises(ValueError, match=f"the trained model is in {merged}"):
        load_model_and_processor(str(output))  # the probes' loader
    (output / "merged" / "config.json").unlink()
    with pytest.raises(ValueError, match="holds a LoRA adapter .* and no merged model .*`--merge_adapter true`"):
        evaluate.main(*parser.parse_args_and_config(["--model", str(output), *data]))
    assert not (tmp_path / "data").exists()
