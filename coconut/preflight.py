"""What the scripts check before any work: the command line `train_sft.py` runs, and sizes that must be positive.

A check that can only fail after the training or evaluation time is spent belongs here, run at the start instead.
"""

import tempfile
from dataclasses import fields
from pathlib import Path

from coconut.convert import require_coconut_checkpoint
from coconut.hub import is_local_path


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


# The tiny model's vision tower: 14-pixel patches, pixel-shuffled by 0.5, so one image token covers 28 x 28 pixels.
TINY_MODEL_PIXELS_PER_TOKEN = 28

# Flags of `train_sft.py` that only act in some runs: flag -> (whether it acts, given the three argument groups; what
# it acts on). A value other than the flag's default in a run where it does not act is an error: it would be ignored.
SYNTHETIC_FLAGS = (
    "synthetic_dir", "synthetic_train_size", "synthetic_validation_size", "synthetic_test_size",
    "synthetic_grid_size", "synthetic_min_hops", "synthetic_max_hops", "synthetic_variant", "synthetic_image_size",
)  # fmt: skip
LORA_FLAGS = ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "lora_modules_to_save")
LORA_FLAGS += ("use_rslora", "use_dora")
BASE_MODEL_FLAGS = ("model_revision", "dtype", "attn_implementation")


def _non_default(arguments, names) -> dict:
    """`{name: value}` of the fields among `names` whose value is not the dataclass default."""
    defaults = {item.name: item.default for item in fields(arguments)}
    return {name: getattr(arguments, name) for name in names if getattr(arguments, name) != defaults[name]}


def _flags(values: dict) -> str:
    return ", ".join(f"`--{name}`={value!r}" for name, value in values.items())


def check_flags_act(script_args, training_args, model_args) -> None:
    """Refuse a flag that would have no effect in the run asked for (a flag set and silently ignored is a run that is
    not the one the user meant), and flag pairs that cannot both hold. Runs before any data or model is built."""
    arrow_chase = script_args.dataset == "arrow_chase"
    from_scratch = model_args.model_name_or_path is None
    synthetic = _non_default(script_args, SYNTHETIC_FLAGS)
    if synthetic and not arrow_chase:
        raise ValueError(
            f"{_flags(synthetic)} set the bundled task's data, but `--dataset`={script_args.dataset!r} is not "
            "'arrow_chase': they would be ignored. Drop them, or pass `--dataset arrow_chase`."
        )
    splits = _non_default(script_args, ("train_split", "eval_split"))
    if splits and arrow_chase:
        raise ValueError(
            f"{_flags(splits)} pick files of a dataset folder, but `--dataset arrow_chase` renders its own splits: they "
            "would be ignored. Drop them (the bundled task is evaluated on `--synthetic_validation_size` questions)."
        )
    evaluation = {
        **_non_default(script_args, ("max_eval_samples",)),
        **_non_default(training_args, ("eval_max_new_tokens",)),
    }
    if evaluation and not arrow_chase and not script_args.eval_split:
        raise ValueError(
            f"{_flags(evaluation)} with `--eval_split ''`: no split is evaluated, so it would be ignored. Drop one of "
            "the two."
        )
    if not training_args.staged:
        unstaged = _non_default(training_args, ("c_thought", "uniform_prob"))
        if unstaged:
            raise ValueError(
                f"{_flags(unstaged)} with `--method {training_args.method}`: its examples have no thoughts and no "
                "stages, so it would be ignored. Drop it, or train `--method coconut`."
            )
    if script_args.tiny_embedding_std is not None and not from_scratch:
        raise ValueError(
            f"`--tiny_embedding_std`={script_args.tiny_embedding_std} initialises the tiny model trained from scratch, "
            f"but `--model_name_or_path`={model_args.model_name_or_path!r} loads trained embeddings: it would be "
            "ignored. Drop it."
        )
    base_flags = _non_default(model_args, BASE_MODEL_FLAGS)
    if base_flags and from_scratch:
        raise ValueError(
            f"{_flags(base_flags)} set how `--model_name_or_path` is loaded, but without it the tiny model is built "
            "from scratch in float32: they would be ignored. Drop them, or pass `--model_name_or_path`."
        )
    if model_args.load_in_4bit or model_args.load_in_8bit:
        raise ValueError(
            "`--load_in_4bit`/`--load_in_8bit`: train_sft.py loads the model unquantised (the latent passes feed "
            "hidden states back in the model's own dtype), so the flag would be ignored. Drop it; `--dtype bfloat16` "
            "halves the memory."
        )
    if training_args.hub_private_repo and not training_args.push_to_hub:
        raise ValueError(
            "`--hub_private_repo` without `--push_to_hub`: nothing is pushed, so it would be ignored. Add "
            "`--push_to_hub --hub_model_id you/name`, or drop it."
        )
    if training_args.hub_model_id and not training_args.push_to_hub:
        raise ValueError(
            f"`--hub_model_id`={training_args.hub_model_id!r} without `--push_to_hub`: nothing is pushed, yet the "
            "model card's quick start would load that repository. Add `--push_to_hub`, or drop `--hub_model_id` (the "
            "card then loads the output folder)."
        )
    base = model_args.model_name_or_path
    if base is not None and Path(base).is_dir() and Path(base).resolve() == Path(training_args.output_dir).resolve():
        raise ValueError(
            f"`--output_dir`={training_args.output_dir!r} is the folder of `--model_name_or_path`: the run would save "
            "over the model it starts from. Pass another `--output_dir`."
        )
    check_lora_arguments(script_args, training_args, model_args)


def check_lora_arguments(script_args, training_args, model_args) -> None:
    """LoRA flags without `--use_peft`, and an adapter saved alone (`--merge_adapter false`) that could not be loaded
    as the trained model: a base that is saved nowhere, or trained modules that are no part of an adapter."""
    lora = _non_default(model_args, LORA_FLAGS)
    if not model_args.use_peft:
        if lora or not script_args.merge_adapter:
            given = _flags({**lora, **({} if script_args.merge_adapter else {"merge_adapter": False})})
            raise ValueError(
                f"{given} without `--use_peft`: no adapter is trained, so it would be ignored. Add `--use_peft`, or "
                "drop it."
            )
        return
    if script_args.merge_adapter:
        return
    reasons = []
    if model_args.model_name_or_path is None:
        reasons.append("the tiny model trained from scratch is saved nowhere else, so the adapter has no base to load")
    if training_args.latent_stop_head:
        reasons.append("`--latent_stop_head` adds a stop head, which the base model the adapter loads onto lacks")
    if script_args.match_thought_scale:
        reasons.append("`--match_thought_scale` rescales the final norm and LM head, which the adapter does not hold")
    base = model_args.model_name_or_path
    if training_args.push_to_hub and base is not None and is_local_path(base):
        reasons.append(
            f"`--push_to_hub` would push an adapter whose base is the local folder {base!r}, "
            "which no one who downloads it has"
        )
    if reasons:
        raise ValueError(
            f"`--merge_adapter false` saves only the LoRA adapter, which would not load as the trained model: "
            f"{'; '.join(reasons)}. Leave `--merge_adapter` at true: `<output_dir>/merged` then holds the full model."
        )


def image_size_that_fits(size: int, grid: int) -> int:
    """The multiple of 28 x `grid` nearest to `size` (at least one): each cell of the board then gets whole image
    tokens of the tiny model, and any model's processor can resize it evenly."""
    step = TINY_MODEL_PIXELS_PER_TOKEN * grid
    return max(1, round(size / step)) * step


def check_tiny_model_image_size(script_args, model_args) -> None:
    """The tiny model trained from scratch sees the bundled task's image at its own size: 28 pixels per image token,
    so the size must be a multiple of 28 (else the vision tower's pixel shuffle fails at the first step)."""
    if script_args.dataset != "arrow_chase" or model_args.model_name_or_path is not None:
        return
    size, grid = script_args.synthetic_image_size, script_args.synthetic_grid_size
    if size % TINY_MODEL_PIXELS_PER_TOKEN:
        fits = image_size_that_fits(size, grid)
        raise ValueError(
            f"`--synthetic_image_size`={size}: the tiny model trained from scratch reads the image in "
            f"{TINY_MODEL_PIXELS_PER_TOKEN} x {TINY_MODEL_PIXELS_PER_TOKEN}-pixel tokens, so the size must be a "
            f"multiple of {TINY_MODEL_PIXELS_PER_TOKEN} (and of `--synthetic_grid_size`={grid}). Pass "
            f"`--synthetic_image_size {fits}`: a whole number of image tokens per cell of the {grid} x {grid} board."
        )


__all__ = [
    "DATA_AND_MODEL_FLAGS",
    "check_dataset_argument",
    "check_output_file",
    "check_flags_act",
    "check_lora_arguments",
    "check_tiny_model_image_size",
    "image_size_that_fits",
    "check_push_arguments",
    "check_script_sizes",
    "check_writable",
    "require_at_least",
    "with_demo_defaults",
]
