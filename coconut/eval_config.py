"""How an evaluation is set up: [`CoconutEvalConfig`] (which stage's prompt, or a fixed latent count, or the stop
head's; batching and generation length) and the checks of a setting against the method and the model."""

from dataclasses import dataclass, field

from coconut.curriculum import CurriculumConfig
from processing_coconut_internvl import AUTO_THOUGHTS, is_auto, thought_count


@dataclass
class CoconutEvalConfig:
    """How to evaluate: which stage's prompt (or a fixed latent count, or the stop head's), batching and generation
    length.

    The prompt layout itself (`method`, `c_thought`, `max_latent_stage`, `pad_latent_to_max`) comes from the model's
    [`coconut.curriculum.CurriculumConfig`], so evaluation prompts are built by the same rules as training examples.
    """

    stage: int | None = field(
        default=None,
        metadata={
            "help": "Curriculum stage to evaluate: each record gets min(stage, max_latent_stage, its number of "
            "steps) x c_thought latents (the paper's evaluation). Needed for coconut and pause_as_thought models "
            "unless `num_latent_thoughts` is set."
        },
    )
    # `int | str`: the command line gives a string, "auto" or a count such as "3", which the check turns into an int.
    num_latent_thoughts: int | str | None = field(
        default=None,
        metadata={
            "help": "A fixed number of `<|latent|>` tokens for every record; overrides `stage`. `auto`: the model's "
            "stop head chooses each record's number (a model trained with `--latent_stop_head`, method coconut)."
        },
    )
    max_latent_thoughts: int | None = field(
        default=None,
        metadata={
            "help": "With `num_latent_thoughts` auto: the most thoughts a record gets. Default: the generation config's "
            "`max_latent_thoughts` (training writes it), else max_latent_stage x c_thought."
        },
    )
    latent_stop_threshold: float | None = field(
        default=None,
        metadata={
            "help": "With `num_latent_thoughts` auto: the stop probability that ends a record's block; lower stops "
            "sooner. Default: the generation config's `latent_stop_threshold` (0.5)."
        },
    )
    batch_size: int = field(default=16, metadata={"help": "Prompts generated together (left-padded)."})
    max_new_tokens: int | None = field(
        default=None,
        metadata={
            "help": "Generation length limit per record. Default: the longest target of the records at the stage "
            "evaluated (the steps left to write, the answer marker, the answer and the end of turn, in tokens) "
            "x 1.5, so that no reference answer is cut. Generations that end without EOS are counted and warned about."
        },
    )
    direct_answer_subset_average: bool = field(
        default=False,
        metadata={
            "help": "Average the direct-answer score over the 10 leave-one-out annotator subsets (VQA v2) instead "
            "of A-OKVQA's plain min(#matches / 3, 1)."
        },
    )
    disable_tqdm: bool = field(default=False, metadata={"help": "Hide the progress bar."})

    def __post_init__(self):
        self.validate_eval_config()

    def validate_eval_config(self):
        """Raise a `ValueError` naming the field for a setting that cannot be evaluated."""
        for name in ("batch_size", "max_new_tokens"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(
                    f"`{name}`={value} must be at least 1"
                    + (" (leave it out to follow the longest target)." if name == "max_new_tokens" else ".")
                )
        if self.stage is not None and self.stage < 0:
            raise ValueError(f"`stage`={self.stage} must be 0 or more.")
        if self.num_latent_thoughts is not None and not is_auto(self.num_latent_thoughts):
            self.num_latent_thoughts = _as_thought_count(self.num_latent_thoughts)
        if not is_auto(self.num_latent_thoughts):
            for name in ("max_latent_thoughts", "latent_stop_threshold"):
                if getattr(self, name) is not None:
                    raise ValueError(
                        f"`{name}`={getattr(self, name)} applies only to `num_latent_thoughts`={AUTO_THOUGHTS!r} (the "
                        f"stop head chooses the counts), got `num_latent_thoughts`={self.num_latent_thoughts!r}. Pass "
                        f"`--num_latent_thoughts {AUTO_THOUGHTS}`, or drop `--{name}`."
                    )
        if self.max_latent_thoughts is not None:
            self.max_latent_thoughts = thought_count(self.max_latent_thoughts, "max_latent_thoughts")
            if self.max_latent_thoughts < 1:
                raise ValueError("`max_latent_thoughts`=0 must be at least 1: the stop head reads a thought to stop.")
        threshold = self.latent_stop_threshold
        if threshold is not None and not 0.0 <= threshold <= 1.0:
            raise ValueError(f"`latent_stop_threshold`={threshold} is not a probability; use a value in [0, 1].")


def _as_thought_count(value) -> int:
    """`num_latent_thoughts` other than "auto" as a count; the command line's digit strings ("3") are counts too."""
    if isinstance(value, str):
        if not (value.isascii() and value.isdigit()):
            raise ValueError(
                f"`num_latent_thoughts`={value!r} must be {AUTO_THOUGHTS!r} (the stop head chooses each record's "
                "count) or a whole number of thoughts, 0 or more."
            )
        value = int(value)
    return thought_count(value)


def check_eval_settings(curriculum: CurriculumConfig, config: CoconutEvalConfig) -> None:
    """Refuse a latent count the method's prompts cannot hold: `cot`, `no_cot` and `no_thought` prompts have no
    latent block, so `num_latent_thoughts` > 0 would silently evaluate with none; `"auto"` needs `coconut`, whose
    thoughts the stop head reads (the `<|latent|>` of `pause_as_thought` are learned pause tokens)."""
    if is_auto(config.num_latent_thoughts) and curriculum.method != "coconut":
        reason = (
            "its `<|latent|>` tokens are learned pause tokens, not thoughts the model feeds back"
            if curriculum.uses_markers
            else "its prompts have no latent block"
        )
        raise ValueError(
            f"`num_latent_thoughts`={config.num_latent_thoughts!r} with `method`={curriculum.method!r}: {reason}, so "
            "there are no continuous thoughts for the stop head to count. Drop `--num_latent_thoughts`, or evaluate "
            "a model trained with `--method coconut --latent_stop_head`."
        )
    if config.num_latent_thoughts and not curriculum.uses_markers:
        raise ValueError(
            f"`num_latent_thoughts`={config.num_latent_thoughts} with `method`={curriculum.method!r}: its prompts have "
            "no latent block, so the model would be evaluated with 0 thoughts. Drop `--num_latent_thoughts`, or "
            "evaluate a model trained with `--method coconut` (or `pause_as_thought`) with that method."
        )


def check_eval_model(model, config: CoconutEvalConfig) -> None:
    """Refuse `num_latent_thoughts="auto"` for a model without a stop head before anything is generated (`generate`
    would refuse it only at the first batch)."""
    if is_auto(config.num_latent_thoughts) and getattr(model, "latent_stop_head", None) is None:
        raise ValueError(
            f"`num_latent_thoughts`={AUTO_THOUGHTS!r} lets the model's stop head choose each record's number of "
            "thoughts, but this model has no stop head (`config.latent_stop_head` is False). Evaluate with a count "
            "(`--stage`, or `--num_latent_thoughts 6`), or train the head (`train_sft.py --latent_stop_head`)."
        )


__all__ = [
    "CoconutEvalConfig",
    "check_eval_model",
    "check_eval_settings",
]
