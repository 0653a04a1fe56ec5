"""What a run checks about its output folder and checkpoints, and the settings record saved with a trained model.

- [`last_complete_checkpoint`]: the newest `checkpoint-N` that `Trainer` finished writing (it writes
  `trainer_state.json` last), with a warning naming the newer, incomplete ones it skips.
- [`check_weight_files`]: every `*.safetensors` file of a folder has a whole header and all its data; a truncated
  download or an interrupted save is an error naming the file, not a deserialisation error without one.
- [`check_writable`]: the output folder can be created and written before any training time is spent.
- [`settings_differences`]: the settings a resumed or re-run training must share with the saved one.
- `coconut_training.json` ([`TRAINING_RECORD`]) beside a trained model: its curriculum, the stage it reached, the
  thoughts it is evaluated with, its dataset and (for the bundled task) the task's settings, which `evaluate.py` uses
  as defaults. [`read_training_record`] reads it from a local folder or the Hub.
"""

import json
import logging
import shutil
import tempfile
from pathlib import Path

from safetensors import SafetensorError, safe_open
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import sort_checkpoints


logger = logging.getLogger(__name__)

TRAINING_RECORD = "coconut_training.json"


def is_complete(checkpoint: str | Path) -> bool:
    """Whether `Trainer` finished saving `checkpoint`: its last file, `trainer_state.json`, is there and parses."""
    try:
        json.loads((Path(checkpoint) / TRAINER_STATE_NAME).read_text())
    except (OSError, ValueError):
        return False
    return True


def last_complete_checkpoint(folder: str | Path) -> str | None:
    """The newest complete checkpoint in `folder` (`None` without one); newer incomplete ones are skipped, with a
    warning that names them (a run killed while saving leaves one behind)."""
    # Not `get_last_checkpoint`: it returns the newest `checkpoint-N` folder even when its save never finished.
    skipped = []
    for checkpoint in reversed(sort_checkpoints(str(folder))):
        if is_complete(checkpoint):
            if skipped:
                logger.warning(
                    "Skipping incomplete checkpoint(s) %s (no readable %s: the run stopped while saving them); "
                    "resuming from %s. Delete the incomplete folders to silence this warning.",
                    ", ".join(map(str, skipped)),
                    TRAINER_STATE_NAME,
                    checkpoint,
                )
            return str(checkpoint)
        skipped.append(checkpoint)
    if skipped:
        logger.warning(
            "No complete checkpoint in %s: %s have no readable %s (the run stopped while saving them); training "
            "starts from the beginning.",
            folder,
            ", ".join(map(str, skipped)),
            TRAINER_STATE_NAME,
        )
    return None


def check_weight_files(folder: str | Path) -> None:
    """Raise a `ValueError` naming the first `*.safetensors` file in `folder` whose header or data is cut short."""
    for path in sorted(Path(folder).glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt"):
                pass
        except (SafetensorError, OSError) as error:
            raise ValueError(
                f"Weight file {str(path)!r} is damaged ({error}); it was probably cut short by an interrupted download "
                "or save. Download it again, or resume from an earlier checkpoint (delete this one)."
            ) from error


def check_writable(folder: str | Path) -> None:
    """Create `folder` if needed and write a scratch file in it; a `ValueError` names the folder if that fails."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-check-"):
            pass
    except OSError as error:
        raise ValueError(
            f"`output_dir`={str(folder)!r} cannot be written ({type(error).__name__}: {error}); the run would train "
            "and then fail to save. Pass an `--output_dir` you can write to, or fix its permissions."
        ) from error


def settings_differences(saved: dict, current: dict) -> list[str]:
    """`"name: saved -> current"` for every setting that differs (a setting missing on one side differs too)."""
    missing = object()
    differences = []
    for name in sorted(set(saved) | set(current)):
        before, after = saved.get(name, missing), current.get(name, missing)
        if before != after:
            show = [("(not set)" if value is missing else repr(value)) for value in (before, after)]
            differences.append(f"{name}: {show[0]} -> {show[1]}")
    return differences


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


def saved_run_settings(checkpoint: str | Path, callback_name: str) -> dict | None:
    """The settings a callback named `callback_name` stored in `checkpoint`'s trainer state (`None` without them)."""
    state = json.loads((Path(checkpoint) / TRAINER_STATE_NAME).read_text())
    saved = (state.get("stateful_callbacks") or {}).get(callback_name)
    return (saved or {}).get("args", {}).get("settings")


def remove_checkpoints(folder: str | Path) -> list[str]:
    """Delete the `checkpoint-N` folders of `folder` (for `--overwrite_output_dir`); returns their names."""
    removed = []
    for checkpoint in sort_checkpoints(str(folder)):
        shutil.rmtree(checkpoint)
        removed.append(Path(checkpoint).name)
    if removed:
        logger.warning("`overwrite_output_dir`: removed %s from %s.", ", ".join(removed), folder)
    return removed


__all__ = [
    "TRAINING_RECORD",
    "check_weight_files",
    "check_writable",
    "is_complete",
    "last_complete_checkpoint",
    "read_training_record",
    "remove_checkpoints",
    "saved_run_settings",
    "settings_differences",
    "write_training_record",
]
