"""What a run checks about its output folder and checkpoints, and the settings record saved with a trained model.

- [`last_complete_checkpoint`]: the newest `checkpoint-N` that `Trainer` finished writing (it writes
  `trainer_state.json` last), with a warning naming the newer, incomplete ones it skips.
- [`check_weight_files`]: every `*.safetensors` file of a folder has a whole header and all its data; a truncated
  download or an interrupted save is an error naming the file, not a deserialisation error without one.
- [`check_writable`]: the output folder can be created and written before any training time is spent.
- [`check_output_file`]: an output file's path is not a folder, and its folder can be written.
- [`check_resume_files`]: the optimizer, scheduler, scaler and RNG files a resumed run loads are whole.
- [`check_loaded_weights`]: no weight of a loaded model is NaN, infinite or absurdly large (a damaged file).
- [`looks_like_local_path`]: whether a model or dataset name is meant as a local path, so that a typo in it is
  "no such folder" rather than a Hub look-up.
- [`settings_differences`]: the settings a resumed or re-run training must share with the saved one.
- `coconut_training.json` ([`TRAINING_RECORD`]) beside a trained model: its curriculum, the stage it reached, the
  thoughts it is evaluated with, its dataset and (for the bundled task) the task's settings, which `evaluate.py` uses
  as defaults. [`read_training_record`] reads it from a local folder or the Hub.
"""

import json
import logging
import shutil
import tempfile
import zipfile
from pathlib import Path

import torch
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


def check_writable(folder: str | Path, argument: str = "output_dir") -> None:
    """Create `folder` if needed and write a scratch file in it; a `ValueError` names the folder (as the script's
    `argument`) if that fails, e.g. when the path is a file."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-check-"):
            pass
    except OSError as error:
        raise ValueError(
            f"`{argument}`={str(folder)!r} cannot be written ({type(error).__name__}: {error}); the run would do its "
            f"work and then fail to save. Pass an `--{argument}` folder you can write to, or fix its permissions."
        ) from error


def check_output_file(path: str | Path, argument: str) -> None:
    """Raise a `ValueError` (naming the script's `argument`) when the file `path` could not be written at the end of
    a run: it is a folder, or its folder cannot be created or written. Nothing is created but that folder."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(
            f"`{argument}`={str(path)!r} is a folder; the run would do its work and then fail to write the file. "
            f"Pass a file path, e.g. `--{argument} {path / 'out.json'}`."
        )
    check_writable(path.parent, argument)


# The torch files `Trainer` loads when it resumes, besides the weights (`rng_state_<rank>.pth` with several processes).
RESUME_FILE_PATTERNS = ("optimizer.pt", "scheduler.pt", "scaler.pt", "rng_state*.pth")


def check_resume_files(checkpoint: str | Path) -> None:
    """Raise a `ValueError` naming the first torch file of `checkpoint` that `Trainer` would load on resume and that
    is damaged: cut short (not a whole zip archive) or with data that fails its CRC-32 (torch writes one per entry,
    and `torch.load` does not check it, so a flipped bit would load silently). Reading costs one pass over the
    files, no unpickling."""
    checkpoint = Path(checkpoint)
    for pattern in RESUME_FILE_PATTERNS:
        for path in sorted(checkpoint.glob(pattern)):
            try:
                with zipfile.ZipFile(path) as archive:
                    bad_entry = archive.testzip()
                problem = f"entry {bad_entry!r} fails its checksum" if bad_entry is not None else None
            except (zipfile.BadZipFile, OSError, EOFError) as error:
                problem = f"not a whole torch file ({type(error).__name__}: {error})"
            if problem is not None:
                raise ValueError(
                    f"Checkpoint file {str(path)!r} is damaged: {problem}. Delete the checkpoint {str(checkpoint)!r} "
                    "to resume from the one before it (or `--overwrite_output_dir` to start again)."
                )


# No trained weight comes near this: a larger one is a damaged file (a flipped exponent bit gives values like 1e36).
ABSURD_WEIGHT = 1e4


def check_loaded_weights(model, source: str) -> None:
    """Raise a `ValueError` naming the first parameter of `model` (loaded from `source`) holding NaN or infinity,
    and warn about parameters whose largest magnitude exceeds [`ABSURD_WEIGHT`]."""
    absurd = []
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.numel() == 0:
                continue
            if not torch.isfinite(parameter).all():
                bad = int((~torch.isfinite(parameter)).sum())
                raise ValueError(
                    f"The weights loaded from {source!r} are damaged: `{name}` holds {bad} NaN or infinite values. "
                    "Download or save the model again, or use an earlier checkpoint."
                )
            largest = float(parameter.abs().max())
            if largest > ABSURD_WEIGHT:
                absurd.append(f"`{name}` (max |w| {largest:.3g})")
    if absurd:
        logger.warning(
            "The weights loaded from %r look damaged: %d tensor(s) hold values above %g, e.g. %s. A flipped bit in a "
            "weight file gives such values; download or save the model again if you did not expect them.",
            source,
            len(absurd),
            ABSURD_WEIGHT,
            ", ".join(absurd[:3]),
        )


def looks_like_local_path(name: str) -> bool:
    """Whether `name` is meant as a local path rather than a Hub id (`name` or `namespace/name`): it exists, starts
    with `.`, `/` or `~`, has more than one `/`, ends in a data file suffix, or is `folder/name` beside an existing
    `folder` (e.g. `outputs/demoo`)."""
    path = Path(name).expanduser()
    return (
        path.exists()
        or name.startswith((".", "/", "~"))
        or name.count("/") > 1
        or path.suffix in (".json", ".jsonl", ".csv", ".parquet", ".arrow", ".safetensors")
        or (name.count("/") == 1 and path.parent.is_dir())
    )


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
    "check_loaded_weights",
    "check_output_file",
    "check_resume_files",
    "check_weight_files",
    "check_writable",
    "is_complete",
    "last_complete_checkpoint",
    "looks_like_local_path",
    "read_training_record",
    "remove_checkpoints",
    "saved_run_settings",
    "settings_differences",
    "write_training_record",
]
