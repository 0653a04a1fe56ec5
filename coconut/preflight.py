"""What the scripts check before any work: the command line `train_sft.py` runs, and sizes that must be positive.

A check that can only fail after the training or evaluation time is spent belongs here, run at the start instead.
"""

import tempfile
from pathlib import Path

from coconut.convert import require_coconut_checkpoint


# Flags that name what to train on; without any of them `train_sft.py` runs its embedded default.
DATA_AND_MODEL_FLAGS = ("--dataset", "--model_name_or_path", "--config")


def with_demo_defaults(argv: list[str], demo_args: list[str]) -> list[str]:
    """The arguments `train_sft.py` parses: `argv` itself when it names a dataset, a model or a `--config` recipe;
    otherwise the embedded default's `demo_args` with `argv` on top (a flag given later wins), so that
    `python train_sft.py --output_dir outputs/mine` runs the demo into `outputs/mine`.

    A model without a dataset (nor a recipe that could name one) is refused here, in one message, before the parser
    checks anything else (such as bf16 on a machine without a GPU).
    """
    given = {argument.split("=", 1)[0] for argument in argv if argument.startswith("--")}
    if "--model_name_or_path" in given and not given & {"--dataset", "--config"}:
        raise ValueError(
            "`--dataset` is missing: `--model_name_or_path` trains a converted model, on the data `--dataset` names "
            "(`arrow_chase` for the bundled synthetic task, a Coconut JSON file or folder, a JSON/JSONL file of "
            "records or a Hub dataset id). Without `--model_name_or_path` and `--dataset`, train_sft.py runs the "
            "embedded demo with your other flags."
        )
    if given & set(DATA_AND_MODEL_FLAGS):
        return list(argv)
    return [*demo_args, *argv]


def require_at_least(arguments, minimum: int, names: dict[str, str]) -> None:
    """Raise a `ValueError` for the first of `names` (field -> what to do instead) whose value in `arguments` is set
    and below `minimum`, naming the flag, its value and the fix."""
    for name, instead in names.items():
        value = getattr(arguments, name)
        if value is not None and value < minimum:
            raise ValueError(f"`--{name}`={value} must be at least {minimum}{'; ' + instead if instead else ''}.")


# `train_sft.py`'s sizes that must be at least 1 (a zero failed only after stage 0 had trained), with the fix.
SCRIPT_SIZES_AT_LEAST_ONE = {
    "synthetic_train_size": "",
    "synthetic_validation_size": "the bundled task is evaluated on its validation split after each stage",
    "max_eval_samples": "leave it out to evaluate on the whole split, or pass `--eval_split ''` for no evaluation",
    "synthetic_image_size": "",
}


def check_script_sizes(script_args) -> None:
    """`train_sft.py`'s sizes, checked as its command line is parsed."""
    require_at_least(script_args, 1, SCRIPT_SIZES_AT_LEAST_ONE)
    require_at_least(script_args, 0, {"synthetic_test_size": "0 evaluates no held-out test split"})


def check_dataset_argument(script_args, model_args) -> None:
    """`--dataset` is required ([`with_demo_defaults`] gives the demo's when no dataset, model or recipe is named), and
    `--model_name_or_path` must name a Coconut-InternVL folder or Hub id."""
    if script_args.dataset is None:
        raise ValueError(
            "`--dataset` is missing: pass `--dataset arrow_chase` for the bundled synthetic task, or a Coconut JSON "
            "file or folder, a JSON/JSONL file of records or a Hub dataset id. (`python train_sft.py` without "
            "`--dataset`, `--model_name_or_path` and `--config` runs the embedded arrow-chase demo.)"
        )
    if script_args.dataset != "arrow_chase" and model_args.model_name_or_path is None:
        raise ValueError(
            f"`--dataset`={script_args.dataset!r} needs `--model_name_or_path` (a converted model, see "
            "convert_to_coconut.py); only 'arrow_chase' trains the tiny model from scratch."
        )
    if model_args.model_name_or_path is not None:  # a typo or a plain InternVL, before any data is built
        require_coconut_checkpoint(model_args.model_name_or_path, revision=model_args.model_revision)


def check_push_arguments(training_args) -> None:
    """`--push_to_hub` names the repository it pushes to."""
    if training_args.push_to_hub and not training_args.hub_model_id:
        raise ValueError("`--push_to_hub` needs `--hub_model_id you/name`, the Hub repository to push the model to.")


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


__all__ = [
    "DATA_AND_MODEL_FLAGS",
    "check_dataset_argument",
    "check_output_file",
    "check_push_arguments",
    "check_script_sizes",
    "check_writable",
    "require_at_least",
    "with_demo_defaults",
]
