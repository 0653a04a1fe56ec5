"""Training configuration of the Coconut curriculum: TRL's `SFTConfig` plus the curriculum fields."""

import math
from dataclasses import dataclass, field, fields

from trl import SFTConfig

from coconut.curriculum import CurriculumConfig
from coconut.step_supervision import STEP_LOSS_NORMALIZATIONS


@dataclass
class CoconutSFTConfig(SFTConfig, CurriculumConfig):
    r"""
    Configuration of [`CoconutSFTTrainer`]: [`~trl.SFTConfig`] plus Coconut's curriculum (Hao et al. 2024, arXiv
    2412.06769). Training runs `num_train_epochs` curriculum epochs; the stage of epoch `e` is
    `min(e // epochs_per_stage, max_latent_stage + 1)` (stage 0 is the full chain of thought), and in stage `k` the
    first `k` reasoning steps are replaced by `k * c_thought` continuous thoughts. Every stage past
    `max_latent_stage` builds the same examples, so they are one final stage that runs for all the remaining epochs
    (as the paper's schedule keeps training the last stage): one optimizer reset, one learning-rate schedule, one
    evaluation at its end.

    Defaults that differ from [`~trl.SFTConfig`]:

    - `gradient_checkpointing` / `activation_checkpointing` is off. It works with continuous thoughts (the checkpointed
      layers keep the KV cache, and each pass's backward replay sees the cache the pass saw: the same loss and
      gradients, fewer activations kept, more compute), so turn it on when memory is short.

    Set by the config itself, whatever is passed: `train_sampling_strategy="sequential"` (the trainer orders the data
    itself, one seeded permutation per curriculum epoch, so that a resumed run sees the same batches),
    `remove_unused_columns=False` and `dataset_kwargs["skip_prepare_dataset"]=True` (the collator builds each sample
    for its stage from the records, so TRL must neither drop nor tokenize the schedule columns). A value that asks for
    something else (`group_by_length`, `skip_prepare_dataset=False`) is an error.

    Parameters (besides those of [`~coconut.curriculum.CurriculumConfig`]: `method`, `c_thought`,
    `max_latent_stage`, `pad_latent_to_max`, `uniform_prob`):
        epochs_per_stage (`int`, *optional*, defaults to `1`):
            Curriculum epochs spent in each stage.
        reset_optimizer (`bool`, *optional*, defaults to `True`):
            Start every stage with a fresh optimizer state and learning-rate schedule.
        eval_max_new_tokens (`int`, *optional*):
            Tokens generated per validation question in the greedy exact-match evaluation after each stage
            ([`coconut.evaluation.evaluate_stage`], batches of `per_device_eval_batch_size`). Default: the longest
            target of the validation records at that stage x 1.5 ([`coconut.eval_prompts.default_max_new_tokens`]).
        start_stage (`int`, *optional*, defaults to `0`):
            Stage of the first curriculum epoch. A model that already finished the earlier stages, e.g. a converged
            chain-of-thought model given as `--model_name_or_path`, continues the curriculum at `start_stage` (the
            reference code's GSM8k recipe loads a CoT checkpoint and resumes past stage 0 the same way);
            `num_train_epochs` then counts the epochs from that stage on.
    """

    epochs_per_stage: int = field(default=1, metadata={"help": "Curriculum epochs spent in each stage."})
    reset_optimizer: bool = field(
        default=True,
        metadata={"help": "Start every stage with a fresh optimizer state and learning-rate schedule."},
    )
    eval_max_new_tokens: int | None = field(
        default=None,
        metadata={
            "help": "Tokens generated per validation question in the evaluation after each stage. Default: the "
            "longest target of the validation records at that stage x 1.5."
        },
    )
    start_stage: int = field(
        default=0,
        metadata={
            "help": "Stage of the first curriculum epoch: continue a model that finished the earlier stages (e.g. a "
            "converged CoT model given as --model_name_or_path, with --start_stage 1). num_train_epochs counts the "
            "epochs from there."
        },
    )
    latent_stop_head: bool = field(
        default=False,
        metadata={
            "help": "Train a stop head with the curriculum (one is added to a model without it): a linear classifier "
            "on the state at each thought that says whether the block ends there, for generate(num_latent_thoughts='auto'). "
            "It learns from the blocks that replace all of a record's steps (coconut only)."
        },
    )
    stop_loss_weight: float | None = field(
        default=None,
        metadata={
            "help": "Weight of the stop head's binary cross-entropy, added to the language-modelling loss (default "
            "1.0; only with --latent_stop_head)."
        },
    )
    step_supervision: bool = field(
        default=False,
        metadata={
            "help": "Train a step decoder beside the model (SIM-CoT): a copy of the language model and LM head that "
            "reads the thoughts replacing each step and must write that step's text; its loss flows into the "
            "thoughts. Saved in <output_dir>/thought_decoder, not part of the model (coconut and pause_as_thought)."
        },
    )
    step_loss_weight: float = field(
        default=1.0, metadata={"help": "Weight of the step decoder's loss, added to the language-modelling loss."}
    )
    step_loss_normalization: str = field(
        default="step",
        metadata={
            "help": "'step': each step's token losses summed, averaged over steps (SIM-CoT's); 'token': averaged over "
            "every step token.",
            "choices": list(STEP_LOSS_NORMALIZATIONS),
        },
    )
    # Overridden defaults of SFTConfig / TrainingArguments (see the class docstring).
    gradient_checkpointing: bool | None = field(
        default=None,
        metadata={
            "help": "Deprecated alias of `activation_checkpointing` (SFTConfig turns it on by default; here it is "
            "off). Exact with continuous thoughts: less memory, more compute.",
            "nargs": "?",
            "const": True,
        },
    )

    def __post_init__(self):
        super().__post_init__()  # SFTConfig's
        self.validate_curriculum()  # CurriculumConfig's: method, c_thought, max_latent_stage, uniform_prob
        if self.stop_loss_weight is not None and not self.latent_stop_head:
            raise ValueError(
                f"`stop_loss_weight`={self.stop_loss_weight} weighs the stop head's loss, but `latent_stop_head` is not "
                "set, so no head is trained and it would be ignored. Add `--latent_stop_head`, or drop it."
            )
        if self.stop_loss_weight is None:
            self.stop_loss_weight = 1.0
        self.validate_schedule()
        # The trainer orders the data itself (one seeded permutation per curriculum epoch, the same on resume).
        self.train_sampling_strategy = "sequential"
        # The collator builds each sample for its stage from the schedule columns: TRL must keep them as they are.
        self.remove_unused_columns = False
        self.dataset_kwargs = {**(self.dataset_kwargs or {}), "skip_prepare_dataset": True}

    def validate_schedule(self):
        """Raise a `ValueError` naming the field, its value and the fix for settings the schedule cannot run."""
        if self.num_train_epochs < 1 or self.num_train_epochs != int(self.num_train_epochs):
            raise ValueError(
                f"`num_train_epochs`={self.num_train_epochs}: the curriculum trains whole epochs, at least one; the "
                f"stages need (max_latent_stage + 1) x epochs_per_stage = "
                f"{(self.max_latent_stage + 1) * self.epochs_per_stage} epochs to reach the last one."
            )
        if self.epochs_per_stage < 1:
            raise ValueError(f"`epochs_per_stage`={self.epochs_per_stage} must be at least 1.")
        final_stage = self.max_latent_stage + 1
        if not 0 <= self.start_stage <= final_stage:
            raise ValueError(
                f"`start_stage`={self.start_stage} must be between 0 and the final stage max_latent_stage + 1 = "
                f"{final_stage}."
            )
        if self.start_stage > 0 and not self.staged:
            raise ValueError(
                f"`start_stage`={self.start_stage}: method {self.method!r} has no stages (its examples never change); "
                "leave `start_stage` at 0."
            )
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "eval_max_new_tokens"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(
                    f"`{name}`={value} must be at least 1"
                    + ("; leave it out to follow the longest target." if name == "eval_max_new_tokens" else ".")
                )
        if self.train_sampling_strategy not in ("random", "sequential"):
            raise ValueError(
                f"`train_sampling_strategy`={self.train_sampling_strategy!r}: the trainer orders the data itself "
                "(one seeded permutation per curriculum epoch); leave the setting out."
            )
        if (self.dataset_kwargs or {}).get("skip_prepare_dataset", True) is not True:
            raise ValueError(
                f"`dataset_kwargs`={self.dataset_kwargs}: TRL must not tokenize the schedule, the collator builds each "
                "sample for its stage. Leave `skip_prepare_dataset` out."
            )
        if self.latent_stop_head and self.method != "coconut":
            raise ValueError(
                f"`latent_stop_head` with `method`={self.method!r}: the head reads continuous thoughts, which only "
                "`coconut` feeds back. Drop `--latent_stop_head`, or train with `--method coconut`."
            )
        if self.latent_stop_head and self.pad_latent_to_max:
            raise ValueError(
                "`latent_stop_head` with `pad_latent_to_max`: every final-stage block then has max_latent_stage x "
                "c_thought thoughts, so the head could only learn to stop there. Drop one of the two."
            )
        if self.latent_stop_head and self.max_latent_stage == 0:
            raise ValueError(
                "`latent_stop_head` with `max_latent_stage`=0: no stage has a thought, so the head would never be "
                'trained, and `num_latent_thoughts="auto"` would give every question one thought. Raise '
                "`max_latent_stage` to the reasoning steps to replace, or drop `--latent_stop_head`."
            )
        if not (math.isfinite(self.stop_loss_weight) and self.stop_loss_weight > 0):
            raise ValueError(
                f"`stop_loss_weight`={self.stop_loss_weight} must be a positive finite number (1.0 weighs the stop "
                "head's loss like the language-modelling loss); leave out `--latent_stop_head` to train no head."
            )
        self.validate_step_supervision()
        if self.activation_checkpointing and (self.activation_checkpointing_kwargs or {}).get("use_reentrant"):
            raise ValueError(
                f"`activation_checkpointing_kwargs`={self.activation_checkpointing_kwargs}: reentrant checkpointing "
                "cuts the gradient that flows from later thoughts into earlier keys and values. Use "
                "`{'use_reentrant': False}` (the transformers default) or leave the kwargs out."
            )

    def validate_step_supervision(self):
        if self.step_loss_normalization not in STEP_LOSS_NORMALIZATIONS:
            raise ValueError(
                f"`step_loss_normalization`={self.step_loss_normalization!r} must be one of {STEP_LOSS_NORMALIZATIONS}."
            )
        if not self.step_supervision:
            changed = [
                f"`{name}`={getattr(self, name)!r}"
                for name, default in (("step_loss_weight", 1.0), ("step_loss_normalization", "step"))
                if getattr(self, name) != default
            ]
            if changed:
                raise ValueError(
                    f"{' and '.join(changed)} without `step_supervision`: there is no step decoder to weigh. Add "
                    "`--step_supervision true`, or drop the flag."
                )
            return
        if self.method not in ("coconut", "pause_as_thought"):
            raise ValueError(
                f"`step_supervision` with `method`={self.method!r}: the step decoder reads the states at the thought "
                "(or pause) positions, which only `coconut` and `pause_as_thought` have. Drop `--step_supervision`."
            )
        if not (math.isfinite(self.step_loss_weight) and self.step_loss_weight > 0):
            raise ValueError(
                f"`step_loss_weight`={self.step_loss_weight} must be a positive finite number (1.0 weighs the step "
                "decoder's loss like the language-modelling loss); drop `--step_supervision` to train no decoder."
            )

    @property
    def curriculum(self) -> CurriculumConfig:
        """The curriculum settings the example builders and the evaluation read."""
        return CurriculumConfig(**{item.name: getattr(self, item.name) for item in fields(CurriculumConfig)})

    def stage_of_epoch(self, epoch: int) -> int:
        """The scheduled stage of curriculum epoch `epoch` (0 = full chain of thought).

        The schedule starts at `start_stage`. Stages past `max_latent_stage` lay out every example alike (all steps removed, thoughts capped), so they are
        merged into the final stage `max_latent_stage + 1`.
        """
        if not self.staged:
            return 0
        return min(self.start_stage + epoch // self.epochs_per_stage, self.max_latent_stage + 1)


__all__ = ["CoconutSFTConfig"]
