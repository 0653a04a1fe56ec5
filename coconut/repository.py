"""A Coconut-InternVL repository folder, as both scripts write it (weights, code, processor, card), and its upload to
the Hub; for a trained model, also the training record and, with LoRA, the adapter beside the merged model."""

from pathlib import Path

from huggingface_hub import HfApi, ModelCard

from coconut.checkpoints import write_training_record
from coconut.model_card import write_model_card
from processing_coconut_internvl import CoconutInternVLProcessor


def save_repository(
    model, processor: CoconutInternVLProcessor, output: str | Path, model_card: ModelCard, example: dict | None = None
) -> Path:
    """Write weights (safetensors), config with `auto_map`, the four code files, tokenizer, processor, generation
    config and `README.md` into `output`, and the images of the card's `example` record (its quick start loads
    them)."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output)  # also copies configuration_/modeling_coconut_internvl.py (registered classes)
    processor.save_pretrained(output)  # also copies processing_coconut_internvl.py
    write_model_card(output, model_card, example)
    code = ["configuration_coconut_internvl.py", "modeling_coconut_internvl.py", "processing_coconut_internvl.py"]
    code.append("latent_block_coconut_internvl.py")  # imported by the model and processor files, copied with them
    missing = [name for name in code if not (output / name).is_file()]
    if missing:  # save_pretrained copies the file a registered class is defined in; say so if that ever changes
        raise ValueError(f"{missing} were not written to {output}; the repository would not load with remote code.")
    return output


def push_folder(folder: str | Path, repo_id: str, private: bool = False, token: str | None = None) -> str:
    """Create `repo_id` on the Hub if needed and upload `folder` (weights, code, processor, card, the card's example
    images, the training record and results) in one commit; training checkpoints stay local, as `Trainer.push_to_hub`
    leaves them.

    Returns:
        `str`: the URL of the commit.
    """
    # Not `model.push_to_hub` and `processor.push_to_hub`: they save the weights again into a temporary folder, in two
    # commits, without the card's example images or the training record; the saved folder goes up as it is.
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    commit = api.upload_folder(
        repo_id=repo_id,
        folder_path=str(folder),
        repo_type="model",
        commit_message="Upload Coconut-InternVL",
        ignore_patterns=["checkpoint-*/**"],
    )
    return str(getattr(commit, "commit_url", commit))


def save_trained_repository(
    trainer, output_dir: str | Path, card: ModelCard, record: dict, example: dict, merge_adapter: bool = True
) -> Path:
    """Save the model `trainer` trained as a repository in `output_dir`, with its `card` and training `record`.

    A LoRA model keeps the adapter `trainer.save_model` wrote, with the card and record beside it, and with
    `merge_adapter` is also saved merged into the base weights in `output_dir/merged`. Returns the folder of the full
    model (the merged one, with LoRA), which is what a push uploads.
    """
    output_dir = Path(output_dir)
    model, processor = trainer.accelerator.unwrap_model(trainer.model), trainer.processing_class
    if hasattr(model, "merge_and_unload"):  # a PEFT model: the adapter beside its card, the merged model apart
        write_model_card(output_dir, card, example)
        write_training_record(output_dir, record)
        if not merge_adapter:
            return output_dir
        model, output_dir = model.merge_and_unload(), output_dir / "merged"
    save_repository(model, processor, output_dir, card, example)
    write_training_record(output_dir, record)
    return output_dir


__all__ = ["push_folder", "save_repository", "save_trained_repository"]
