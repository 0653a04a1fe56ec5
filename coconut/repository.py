"""A Coconut-InternVL repository folder, as both scripts write it (weights, code, processor, card), and its upload to
the Hub; for a trained model, also the training record and, with LoRA, the adapter beside the merged model."""

import json
import logging
from pathlib import Path

from huggingface_hub import HfApi, ModelCard

from coconut.model_card import write_model_card
from processing_coconut_internvl import CoconutInternVLProcessor


logger = logging.getLogger(__name__)


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


TRAINING_RECORD = "coconut_training.json"


def write_training_record(folder: str | Path, record: dict) -> Path:
    """Write `record` as `coconut_training.json` in `folder`; returns the path."""
    path = Path(folder) / TRAINING_RECORD
    path.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return path


def read_training_record(model: str | Path) -> dict | None:
    """The `coconut_training.json` of a local model folder or a Hub repository; `None` when it has none (models
    converted but not trained by `train_sft.py`, or saved before the record existed)."""
    path = Path(model) / TRAINING_RECORD
    if Path(model).is_dir():
        return json.loads(path.read_text()) if path.is_file() else None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RemoteEntryNotFoundError

    try:
        return json.loads(Path(hf_hub_download(str(model), TRAINING_RECORD)).read_text())
    except RemoteEntryNotFoundError:
        return None
    except LocalEntryNotFoundError:
        logger.warning(
            "Offline, and %s of %r is not in the cache: no training settings to default to.", TRAINING_RECORD, model
        )
        return None


__all__ = [
    "TRAINING_RECORD",
    "push_folder",
    "read_training_record",
    "save_repository",
    "save_trained_repository",
    "write_training_record",
]
