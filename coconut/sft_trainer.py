"""`CoconutSFTTrainer`: TRL's `SFTTrainer` running Coconut's staged curriculum through the model's own forward."""

import copy
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from accelerate.utils import is_peft_model
from datasets import Dataset
from transformers import Trainer, TrainerCallback, get_scheduler
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, logging
from trl import SFTTrainer

from coconut.collator import CoconutDataCollator
from coconut.evaluation import CoconutEvalConfig, EvalResults, evaluate_stage
from coconut.sft_config import CoconutSFTConfig


logger = logging.get_logger(__name__)


@dataclass
class CurriculumSchedule:
    r"""
    Every sample of every curriculum epoch, in training order, with the stage it is trained at.

    Epoch `e` visits the records in a permutation seeded by `(seed, e)`, wrapped around to a multiple of
    `rows_per_step` so that no optimizer step mixes two epochs. Row `r` is trained at optimizer step
    `r // rows_per_step`, so the stage of a step, and the batches a resumed run skips, follow from the step alone.

    Args:
        args ([`CoconutSFTConfig`]): the curriculum settings, `num_train_epochs` and `seed`.
        records (`Sequence[dict]`): the training records.
        rows_per_step (`int`): samples per optimizer step over all processes
            (`per_device_train_batch_size * gradient_accumulation_steps * world_size`).
    """

    rows: list[dict]
    rows_per_step: int
    steps_per_epoch: int
    stage_of_epoch: list[int]

    @classmethod
    def build(cls, args: CoconutSFTConfig, records: Sequence[dict], rows_per_step: int) -> "CurriculumSchedule":
        num_epochs = math.ceil(args.num_train_epochs)
        if num_epochs != args.num_train_epochs:
            raise ValueError(
                f"`num_train_epochs`={args.num_train_epochs} must be a whole number of curriculum epochs."
            )
        if not records:
            raise ValueError("The training dataset is empty: pass at least one record.")
        steps_per_epoch = math.ceil(len(records) / rows_per_step)
        rows, stages = [], []
        for epoch in range(num_epochs):
            generator = torch.Generator().manual_seed(args.seed * 100_003 + epoch)
            order = torch.randperm(len(records), generator=generator).tolist()
            order = (order * math.ceil(steps_per_epoch * rows_per_step / len(order)))[
                : steps_per_epoch * rows_per_step
            ]
            stage = args.stage_of_epoch(epoch)
            stages.append(stage)
            rows += [{"epoch": epoch, "sample": sample, "stage": stage} for sample in order]
        return cls(rows=rows, rows_per_step=rows_per_step, steps_per_epoch=steps_per_epoch, stage_of_epoch=stages)

    @property
    def total_steps(self) -> int:
        return len(self.rows) // self.rows_per_step

    def stage_of_step(self, step: int) -> int:
        """The scheduled stage of optimizer step `step` (counted from 0)."""
        return self.stage_of_epoch[min(step // self.steps_per_epoch, len(self.stage_of_epoch) - 1)]

    def stage_spans(self) -> list[tuple[int, int, int]]:
        """`(stage, first_step, num_steps)` of each run of consecutive steps at the same stage."""
        spans = []
        for step in range(self.total_steps):
            stage = self.stage_of_step(step)
            if spans and spans[-1][0] == stage:
                spans[-1][2] += 1
            else:
                spans.append([stage, step, 1])
        return [tuple(span) for span in spans]


class CurriculumCallback(TrainerCallback):
    """Resets the optimizer state at each stage change and evaluates at the end of each stage."""

    def __init__(self, trainer: "CoconutSFTTrainer"):
        self.trainer = trainer

    def on_step_begin(self, args, state, control, **kwargs):
        schedule = self.trainer.schedule
        step = state.global_step
        if step == 0 or schedule.stage_of_step(step) == schedule.stage_of_step(step - 1):
            return
        logger.info(f"Stage {schedule.stage_of_step(step)} starts at step {step}.")
        if args.reset_optimizer:
            self.trainer.reset_optimizer_state()

    def on_step_end(self, args, state, control, **kwargs):
        schedule = self.trainer.schedule
        step = state.global_step  # steps done
        stage_done = step == state.max_steps or schedule.stage_of_step(step) != schedule.stage_of_step(step - 1)
        if stage_done and self.trainer.eval_records is not None:
            self.trainer.evaluate_curriculum_stage(schedule.stage_of_step(step - 1))


class CoconutSFTTrainer(SFTTrainer):
    r"""
    [`~trl.SFTTrainer`] for Coconut's staged curriculum (Hao et al. 2024, arXiv 2412.06769).

    The loss is the model's own forward loss, which runs the sequential latent passes: TRL's default `compute_loss`
    calls a fused LM head on the inner backbone, which would skip them. Under FSDP and DeepSpeed every rank runs the
    same number of language-model passes (`sync_latent_passes=True`).

    Training visits `args.num_train_epochs` curriculum epochs as one pass over a [`CurriculumSchedule`]; the trainer's
    own `args.num_train_epochs` is therefore 1 (on a copy of `args`). The collator builds each sample for its stage
    from the records, so the training data changes at each stage change; with `reset_optimizer` each stage starts
    with a fresh optimizer state and learning-rate schedule. After each stage the model answers `eval_dataset` by
    greedy generation ([`coconut.evaluation.evaluate_stage`]); the accuracy and generated tokens are logged
    (`eval_accuracy`, `eval_mean_generated_tokens`, `stage`) and kept in `self.eval_results`.

    With `method="pause_as_thought"` the `<|latent|>` tokens are learned pause tokens: the model's
    `config.latent_token_id` is set to `None`, so it does not feed hidden states back.

    Args:
        model ([`PreTrainedModel`] or `str`): a Coconut-InternVL model.
        args ([`CoconutSFTConfig`]): training and curriculum settings.
        train_dataset ([`~datasets.Dataset`] or `Sequence[dict]`): records `id, question, steps, answer, images`
            ([`coconut.data`]). Only the collator reads them; TRL sees integer schedule columns.
        processing_class ([`CoconutInternVLProcessor`] or a tokenizer for text-only records).
        eval_dataset ([`~datasets.Dataset`] or `Sequence[dict]`, *optional*): validation records for the
            evaluation after each stage.
        kwargs: passed to [`~trl.SFTTrainer`] (`peft_config`, `callbacks`, ...).
    """

    def __init__(
        self,
        model,
        args: CoconutSFTConfig,
        train_dataset: Sequence[dict],
        processing_class,
        eval_dataset: Sequence[dict] | None = None,
        **kwargs,
    ):
        if not isinstance(args, CoconutSFTConfig):
            raise ValueError(f"`args` is a {type(args).__name__}; CoconutSFTTrainer needs a `CoconutSFTConfig`.")
        self.records = train_dataset
        self.eval_records = eval_dataset
        self.eval_results = EvalResults()
        rows_per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
        self.schedule = CurriculumSchedule.build(args, self.records, rows_per_step)
        self.curriculum_epochs = args.num_train_epochs
        args = copy.copy(args)
        args.num_train_epochs = 1  # one pass over the schedule, which holds every curriculum epoch
        collator = CoconutDataCollator(
            processing_class, self.records, args.curriculum, seed=args.seed, max_length=args.max_length
        )
        # Only integer columns: TRL reads `image`/`images` columns as its own vision format.
        schedule = Dataset.from_list(self.schedule.rows)
        callbacks = [CurriculumCallback(self), *(kwargs.pop("callbacks", None) or [])]
        super().__init__(
            model=model,
            args=args,
            data_collator=collator,
            train_dataset=schedule,
            processing_class=processing_class,
            callbacks=callbacks,
            **kwargs,
        )
        if args.method == "pause_as_thought":
            # The paper's baseline: the same token layout, but `<|latent|>` is an ordinary learned token.
            self.model.config.latent_token_id = None
        # FSDP and ZeRO-3 gather parameters in every forward call: all ranks must make the same calls.
        self.sync_latent_passes = self.is_fsdp_enabled or self.is_deepspeed_enabled

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The model's own forward loss (`Trainer.compute_loss`), which runs the latent passes."""
        inputs = {**inputs, "use_cache": False}
        if self.sync_latent_passes:
            inputs["sync_latent_passes"] = True
        return Trainer.compute_loss(self, model, inputs, return_outputs, num_items_in_batch)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Training logs carry the stage of the last step."""
        if "loss" in logs:
            logs["stage"] = self.schedule.stage_of_step(max(self.state.global_step - 1, 0))
        super().log(logs, start_time)

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        """With `reset_optimizer`, the learning-rate schedule restarts at each stage (warmup included)."""
        if not self.args.reset_optimizer or self.lr_scheduler is not None:
            return super().create_scheduler(num_training_steps, optimizer)
        optimizer = optimizer or self.optimizer
        spans = self.schedule.stage_spans()
        dummy = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
        stage_lambdas = []
        for _, first_step, num_steps in spans:
            scheduler = get_scheduler(
                self.args.lr_scheduler_type,
                optimizer=dummy,
                num_warmup_steps=self.args.get_warmup_steps(num_steps),
                num_training_steps=num_steps,
                scheduler_specific_kwargs=self.args.lr_scheduler_kwargs,
            )
            if not isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
                raise ValueError(
                    f"`lr_scheduler_type`={self.args.lr_scheduler_type!r} cannot restart per stage; with "
                    "`reset_optimizer=True` use a warmup/decay schedule such as 'linear', 'cosine' or 'constant'."
                )
            stage_lambdas.append((first_step, scheduler.lr_lambdas[0]))

        def lr_lambda(step: int) -> float:
            first_step, stage_lambda = next(item for item in reversed(stage_lambdas) if item[0] <= step)
            return stage_lambda(step - first_step)

        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
        self._created_lr_scheduler = True
        return self.lr_scheduler

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        """Load full-model checkpoints through `from_pretrained`, which maps InternVL's saved key layout back.

        `save_pretrained` writes InternVL's original layout (`language_model.model.*`), which `Trainer` would load
        raw into the model with `strict=False`: every language-model weight missed, with only a warning.
        """
        model = model if model is not None else self.model
        weights = [os.path.join(resume_from_checkpoint, name) for name in (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME)]
        if (
            is_peft_model(model)
            or self.is_fsdp_enabled
            or self.is_deepspeed_enabled
            or not any(map(os.path.isfile, weights))
        ):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        unwrapped = self.accelerator.unwrap_model(model)
        loaded = type(unwrapped).from_pretrained(resume_from_checkpoint, config=unwrapped.config)
        unwrapped.load_state_dict(loaded.state_dict(), strict=True)

    def reset_optimizer_state(self):
        """Forget the optimizer's moments and step counts, as a freshly built optimizer has none."""
        optimizer = getattr(self.optimizer, "optimizer", self.optimizer)
        if self.is_deepspeed_enabled:
            logger.warning("`reset_optimizer` keeps DeepSpeed's optimizer state, which it partitions and owns.")
            return
        optimizer.state.clear()

    def evaluate_curriculum_stage(self, stage: int):
        """Greedy generation on the validation records at `stage`; logs and keeps the metrics."""
        config = CoconutEvalConfig(
            stage=stage,
            batch_size=self.args.per_device_eval_batch_size,
            max_new_tokens=self.args.eval_max_new_tokens,
            disable_tqdm=True,
        )
        model = self.accelerator.unwrap_model(self.model)
        result = evaluate_stage(model, self.processing_class, self.eval_records, self.args.curriculum, config)
        self.eval_results.add(result)
        metrics = {f"eval_{name}": value for name, value in result.metrics.items()}
        self.log({"stage": stage, **metrics})
        return result

    def stage_results(self) -> list[dict]:
        """The evaluation after each stage, from the log history (so a resumed run has the earlier stages too)."""
        return [entry for entry in self.state.log_history if "eval_accuracy" in entry]


__all__ = ["CoconutSFTTrainer", "CurriculumSchedule", "CurriculumCallback"]
