"""Training configuration of the Coconut curriculum: TRL's `SFTConfig` plus the curriculum fields."""

from dataclasses import dataclass, field
from typing import Any

from trl import SFTConfig

from coconut.curriculum import METHODS, CurriculumConfig


# Methods whose sequences hold `<|latent|>` tokens, so the model runs its sequential latent passes.
LATENT_METHODS = ("coconut",)


@dataclass
class CoconutSFTConfig(SFTConfig):
    r"""
    Configuration of [`CoconutSFTTrainer`]: [`~trl.SFTConfig`] plus Coconut's curriculum (Hao et al. 2024, arXiv
    2412.06769). Training runs `num_train_epochs` curriculum epochs; the stage of epoch `e` is
    `min(e // epochs_per_stage, max_latent_stage + 1)` (stage 0 is the full chain of thought), and in stage `k` the
    first `k` reasoning steps are replaced by `k * c_thought` continuous thoughts. Every stage past
    `max_latent_stage` builds the same examples, so they are one final stage that runs for all the remaining epochs
    (as the paper's schedule keeps training the last stage): one optimizer reset, one learning-rate schedule, one
    evaluation at its end.

    Defaults that differ from [`~trl.SFTConfig`]:

    - `gradient_checkpointing` / `activation_checkpointing` is off. It works with continuous thoughts (the model then
      recomputes each latent pass's prefix without a KV cache: the same loss and gradients, fewer activations kept,
      more compute), so turn it on when memory is short.
    - `train_sampling_strategy` is `"sequential"`: the trainer orders the data itself (one seeded permutation per
      curriculum epoch), so that a resumed run sees the same batches.
    - `remove_unused_columns` is `False` and `dataset_kwargs={"skip_prepare_dataset": True}`: the collator builds
      each sample for its stage from the records, so TRL must neither drop nor tokenize the schedule columns.

    Parameters:
        method (`str`, *optional*, defaults to `"coconut"`):
            Training method of the paper: `"coconut"` (continuous thoughts), `"cot"` (full chain of thought at every
            epoch), `"no_cot"` (answer only), `"pause_as_thought"` (the curriculum with pause tokens in place of
            thoughts) or `"no_thought"` (the curriculum with the replaced steps removed and no thoughts).
        c_thought (`int`, *optional*, defaults to `1`):
            Continuous thoughts per replaced reasoning step.
        epochs_per_stage (`int`, *optional*, defaults to `1`):
            Curriculum epochs spent in each stage.
        max_latent_stage (`int`, *optional*, defaults to `3`):
            Last stage that replaces steps one by one; later stages remove every step and keep
            `max_latent_stage * c_thought` thoughts.
        pad_latent_to_max (`bool`, *optional*, defaults to `False`):
            Past `max_latent_stage`, pad every sample to `max_latent_stage * c_thought` thoughts even when it has
            fewer steps, instead of one group of thoughts per step.
        uniform_prob (`float`, *optional*, defaults to `0.0`):
            Probability that a sample is trained at a stage drawn uniformly from `0..len(steps)` instead of the
            scheduled stage (the paper's mixing of earlier stages); drawn with an RNG seeded by
            `(seed, epoch, sample)`, so a resumed run draws the same stages.
        reset_optimizer (`bool`, *optional*, defaults to `True`):
            Start every stage with a fresh optimizer state and learning-rate schedule.
        eval_max_new_tokens (`int`, *optional*, defaults to `64`):
            Tokens generated per validation question in the greedy exact-match evaluation after each stage
            ([`coconut.evaluation.evaluate_stage`], batches of `per_device_eval_batch_size`).
    """

    method: str = field(
        default="coconut",
        metadata={"help": "Training method of the paper.", "choices": list(METHODS)},
    )
    c_thought: int = field(default=1, metadata={"help": "Continuous thoughts per replaced reasoning step."})
    epochs_per_stage: int = field(default=1, metadata={"help": "Curriculum epochs spent in each stage."})
    max_latent_stage: int = field(
        default=3,
        metadata={
            "help": "Last stage that replaces steps one by one; later stages remove every step and keep "
            "max_latent_stage * c_thought thoughts."
        },
    )
    pad_latent_to_max: bool = field(
        default=False,
        metadata={"help": "Past max_latent_stage, pad every sample to max_latent_stage * c_thought thoughts."},
    )
    uniform_prob: float = field(
        default=0.0,
        metadata={"help": "Probability of training a sample at a stage drawn uniformly from 0..len(steps)."},
    )
    reset_optimizer: bool = field(
        default=True,
        metadata={"help": "Start every stage with a fresh optimizer state and learning-rate schedule."},
    )
    eval_max_new_tokens: int = field(
        default=64,
        metadata={"help": "Tokens generated per validation question in the evaluation after each stage."},
    )
    # Overridden defaults of SFTConfig / TrainingArguments (see the class docstring).
    gradient_checkpointing: bool | None = field(
        default=None,
        metadata={
            "help": "Deprecated alias of `activation_checkpointing` (SFTConfig turns it on by default; here it is "
            "off). With continuous thoughts each latent pass then recomputes its prefix: less memory, more compute.",
            "nargs": "?",
            "const": True,
        },
    )
    train_sampling_strategy: str = field(
        default="sequential",
        metadata={
            "help": "Must stay 'sequential': the trainer shuffles the data itself, one seeded permutation per epoch.",
            "choices": ["sequential"],
        },
    )
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Must stay False: the collator reads the schedule columns."}
    )
    dataset_kwargs: dict[str, Any] | None = field(
        default_factory=lambda: {"skip_prepare_dataset": True},
        metadata={"help": "Must keep skip_prepare_dataset=True: the collator tokenizes each sample for its stage."},
    )

    def __post_init__(self):
        super().__post_init__()
        self.validate_curriculum()

    def validate_curriculum(self):
        """Raise a `ValueError` naming the field, its value and the fix for settings the curriculum cannot run."""
        self.curriculum.validate_curriculum()  # method, c_thought, max_latent_stage, uniform_prob
        if self.epochs_per_stage < 1:
            raise ValueError(f"`epochs_per_stage`={self.epochs_per_stage} must be at least 1.")
        if self.train_sampling_strategy != "sequential":
            raise ValueError(
                f"`train_sampling_strategy`={self.train_sampling_strategy!r}: the trainer orders the data itself "
                "(one seeded permutation per curriculum epoch); leave it at 'sequential'."
            )
        if self.remove_unused_columns:
            raise ValueError(
                "`remove_unused_columns`=True would drop the schedule columns the collator reads; set it to False."
            )
        if not (self.dataset_kwargs or {}).get("skip_prepare_dataset"):
            raise ValueError(
                f"`dataset_kwargs`={self.dataset_kwargs}: TRL must not tokenize the schedule, the collator builds each "
                'sample for its stage. Use `dataset_kwargs={"skip_prepare_dataset": True}`.'
            )
        if self.label_smoothing_factor > 0:
            raise ValueError(
                f"`label_smoothing_factor`={self.label_smoothing_factor}: the loss is the model's own forward loss, "
                "which has no label smoothing. Set it to 0."
            )

    @property
    def curriculum(self) -> CurriculumConfig:
        """The curriculum settings the example builders and the evaluation read."""
        return CurriculumConfig(
            method=self.method,
            c_thought=self.c_thought,
            max_latent_stage=self.max_latent_stage,
            pad_latent_to_max=self.pad_latent_to_max,
            uniform_prob=self.uniform_prob,
        )

    def stage_of_epoch(self, epoch: int) -> int:
        """The scheduled stage of curriculum epoch `epoch` (0 = full chain of thought).

        Stages past `max_latent_stage` lay out every example alike (all steps removed, thoughts capped), so they are
        merged into the final stage `max_latent_stage + 1`.
        """
        if self.method in ("cot", "no_cot"):
            return 0
        return min(epoch // self.epochs_per_stage, self.max_latent_stage + 1)


__all__ = ["CoconutSFTConfig", "METHODS", "LATENT_METHODS"]
