"""The records `train_sft.py` trains and evaluates on: the bundled arrow-chase task's splits, or a dataset's; every
training record checked to fit `max_length` at its longest curriculum stage."""

from coconut.data import image_token_counter, load_train_and_eval_splits, validate_dataset
from coconut.synthetic import SyntheticTaskConfig, build_synthetic_split


def load_splits(script_args, seed: int):
    """Training and validation records (the first `max_eval_samples` of validation), and the synthetic task's
    settings when `script_args.dataset` is the bundled `arrow_chase` (`None` otherwise)."""
    task = None
    if script_args.dataset == "arrow_chase":
        task = SyntheticTaskConfig(
            seed=seed,
            variant=script_args.synthetic_variant,
            image_size=script_args.synthetic_image_size,
            grid_size=script_args.synthetic_grid_size,
            min_hops=script_args.synthetic_min_hops,
            max_hops=script_args.synthetic_max_hops,
            train_size=script_args.synthetic_train_size,
            validation_size=script_args.synthetic_validation_size,
            test_size=script_args.synthetic_test_size,
        )
        task.check_split_sizes()  # the test split is built after training: a task too small for it fails now
        train = build_synthetic_split(script_args.synthetic_dir, "train", task)
        validation = build_synthetic_split(script_args.synthetic_dir, "validation", task)
    else:
        train, validation = load_train_and_eval_splits(
            script_args.dataset, script_args.train_split, script_args.eval_split, script_args.skip_invalid
        )
    if validation is not None and script_args.max_eval_samples is not None:
        validation = validation.select(range(min(script_args.max_eval_samples, len(validation))))
    return train, validation, task


def check_lengths(train, processor, training_args, skip_invalid: bool):
    """Every training record's longest curriculum example must fit `max_length`: the collator never cuts an answer.

    Too long records are an error naming them, or with `skip_invalid` are dropped (the log says how many). Image
    tokens are counted from each image's size as the processor tiles it.
    """
    if training_args.max_length is None:
        return train
    return validate_dataset(
        train,
        skip_invalid=skip_invalid,
        check_images=False,  # the loaders did
        tokenizer=getattr(processor, "tokenizer", processor),
        max_length=training_args.max_length,
        curriculum=training_args.curriculum,
        image_token_count=image_token_counter(processor) if hasattr(processor, "image_processor") else 0,
    )


__all__ = ["check_lengths", "load_splits"]
