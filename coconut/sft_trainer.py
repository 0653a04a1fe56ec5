"""`CoconutSFTTrainer`: TRL's `SFTTrainer` running Coconut's staged curriculum through the model's own forward."""

import copy
import functools
import hashlib
import json
import math
import os
import types
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from enum import Enum
from pathlib import Path

import pyarrow.compute as pc
import torch
from accelerate.utils import is_peft_model
from datasets import Dataset
from transformers import SchedulerType, TrainerCallback, get_scheduler
from transformers.trainer import OPTIMIZER_NAME, SCHEDULER_NAME, TRAINER_STATE_NAME
from transformers.trainer_callback import ExportableState
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, logging
from trl import SFTTrainer
from trl.trainer.utils import FusedCausalLMOutput, selective_log_softmax_and_entropy

from coconut.checkpoints import (
    TRAINING_RECORD,
    check_resume_files,
    check_weight_files,
    is_complete,
    last_complete_checkpoint,
    remove_checkpoints,
    saved_run_settings,
    settings_differences,
)
from coconut.collator import CoconutDataCollator
from coconut.curriculum import evaluation_layout
from coconut.evaluation import CoconutEvalConfig, EvalResults, StageResult, evaluate_stage
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
        if self.trainer.stage_ends(state) and self.trainer.eval_records is not None:
            should_log = control.should_log  # the evaluation's log clears it, and the step's loss would go unlogged
            self.trainer.evaluate_curriculum_stage(self.trainer.schedule.stage_of_step(state.global_step - 1))
            control.should_log = should_log


class FiniteLossCallback(TrainerCallback):
    """Stops training with an error naming the first step whose loss was NaN or infinite.

    `compute_loss` keeps that step in a tensor on the loss's device (no host sync per step); this callback reads it
    (one sync, and one all-reduce across processes) only at the steps that log, save or end a stage, before they do,
    so a diverged run neither logs a filtered loss nor writes a checkpoint or an evaluation of NaN weights.
    """

    def __init__(self, trainer: "CoconutSFTTrainer"):
        self.trainer = trainer
        self.first_bad_step = None  # 0-d long tensor: 0 while every loss was finite

    def observe(self, loss: torch.Tensor, step: int):
        if self.first_bad_step is None:
            self.first_bad_step = torch.zeros((), dtype=torch.long, device=loss.device)
        newly_bad = ~torch.isfinite(loss) & (self.first_bad_step == 0)
        self.first_bad_step = self.first_bad_step + newly_bad.long() * step

    def on_step_end(self, args, state, control, **kwargs):
        if control.should_log or control.should_save or self.trainer.stage_ends(state):
            self.check(state)

    def check(self, state):
        if self.first_bad_step is None:
            return
        never = torch.iinfo(torch.long).max
        key = torch.where(self.first_bad_step > 0, self.first_bad_step, never)
        step = -int(self.trainer.accelerator.reduce(-key, reduction="max"))  # the earliest over processes
        if step == never:
            return
        schedule = self.trainer.schedule
        raise FloatingPointError(
            f"The training loss is not finite (NaN or inf) at step {step} (stage {schedule.stage_of_step(step - 1)}); "
            f"training stopped at step {state.global_step}. Check the weights the run started from (a corrupt or "
            "truncated file?), or lower `learning_rate` / set `max_grad_norm`; then resume from a checkpoint saved "
            "before that step or start again with `--overwrite_output_dir`."
        )


class RunRecord(TrainerCallback, ExportableState):
    """The run's settings and the evaluation after each stage (metrics and predictions).

    Both go into every checkpoint's `trainer_state.json` (`stateful_callbacks`), which `Trainer` writes last, so
    a checkpoint holds them exactly when it is complete: a resumed run checks its settings against them and keeps the
    stages evaluated before it stopped.
    """

    def __init__(self, settings: dict | None = None, stage_results: list[dict] | None = None):
        self.settings = dict(settings or {})
        self.stage_results = list(stage_results or [])

    def state(self) -> dict:
        return {"args": {"settings": self.settings, "stage_results": self.stage_results}, "attributes": {}}

    def on_train_begin(self, args, state, control, **kwargs):
        saved = state.stateful_callbacks.get(type(self).__name__)
        if state.global_step > 0 and saved:  # resumed from a checkpoint
            self.stage_results = list(saved["args"].get("stage_results", []))
        # Trainer stores each stateful callback under its name, and fails on a checkpoint saved without this one.
        state.stateful_callbacks[type(self).__name__] = self.state()


def add_latent_fused_lm_head(model, on_stop_loss=None) -> None:
    """TRL's fused-LM-head call, `model(..., labels=labels, fused_lm_head=True)`, answered from the model's own forward.

    [`~trl.SFTTrainer`] computes its loss and metrics (entropy, token accuracy) from the per-token fields of a
    [`~trl.trainer.utils.FusedCausalLMOutput`], which TRL's `add_fused_lm_head` computes on the inner backbone: that
    would skip the latent passes. Here the fields come from the logits of the model's own forward, which runs them.
    Call it after TRL's `add_fused_lm_head` (in `SFTTrainer.__init__`): other calls go on to TRL's forward unchanged.
    TRL builds its loss from the per-token fields alone, so the stop head's loss of the same forward goes to
    `on_stop_loss` (the trainer adds it to the loss).
    """
    forward = model.forward  # TRL's: without `fused_lm_head`, the model's own forward

    @functools.wraps(type(model).forward)
    def latent_fused_forward(self, *args, fused_lm_head=False, labels=None, num_items_in_batch=None, **kwargs):
        if not fused_lm_head:
            return forward(*args, labels=labels, num_items_in_batch=num_items_in_batch, **kwargs)
        if kwargs.get("shift_labels") is not None:
            raise ValueError(
                "`shift_labels` is passed under context or sequence parallelism, which splits the sequence; the "
                "latent passes need it whole. Train without context or sequence parallelism."
            )
        outputs = forward(*args, **kwargs)
        if on_stop_loss is not None and getattr(outputs, "stop_loss", None) is not None:
            on_stop_loss(outputs.stop_loss)
        logits = outputs.logits[:, :-1].float()  # (B, T - 1, V): the next-token logits
        labels = labels[:, 1:].to(logits.device)  # (B, T - 1)
        label_mask = labels != -100
        log_probs, entropy = selective_log_softmax_and_entropy(
            logits, labels.masked_fill(~label_mask, 0), entropy_requires_grad=False, row_mask=label_mask
        )
        num_tokens = label_mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        return FusedCausalLMOutput(
            loss=-log_probs.sum() / num_tokens,
            log_probs=log_probs,
            entropy=entropy,
            is_top1=(logits.argmax(dim=-1) == labels) & label_mask,
            label_mask=label_mask,
        )

    model.forward = types.MethodType(latent_fused_forward, model)


class CoconutSFTTrainer(SFTTrainer):
    r"""
    [`~trl.SFTTrainer`] for Coconut's staged curriculum (Hao et al. 2024, arXiv 2412.06769).

    The loss, and TRL's training metrics (`entropy`, `mean_token_accuracy`, `num_tokens`), are `SFTTrainer`'s, computed
    from the model's own forward, which runs the sequential latent passes ([`add_latent_fused_lm_head`]): TRL's fused
    LM head alone runs the inner backbone, which would skip them. Under FSDP and DeepSpeed every rank runs the same
    number of language-model passes (`sync_latent_passes=True`).

    Training visits `args.num_train_epochs` curriculum epochs as one pass over a [`CurriculumSchedule`]; the trainer's
    own `args.num_train_epochs` is therefore 1 (on a copy of `args`). The collator builds each sample for its stage
    from the records, so the training data changes at each stage change; with `reset_optimizer` each stage starts
    with a fresh optimizer state and learning-rate schedule. After each stage the model answers `eval_dataset` by
    greedy generation ([`coconut.evaluation.evaluate_stage`]); the accuracy and generated tokens are logged
    (`eval_accuracy`, `eval_mean_generated_tokens`, `stage`) and kept in `self.eval_results`.

    With `method="pause_as_thought"` the `<|latent|>` tokens are learned pause tokens: the model's
    `config.latent_token_id` is set to `None`, so it does not feed hidden states back.

    A non-finite loss stops training with an error naming the step ([`FiniteLossCallback`]). `train()` checks a
    checkpoint before resuming from it: complete, with its optimizer and scheduler state and readable weights, and
    saved with the same [`RESUME_SETTINGS`] and training records as this run ([`RunRecord`]); each checkpoint also
    keeps the evaluation of every stage so far, so a resumed run reports every stage.

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
        rows_per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
        self.schedule = CurriculumSchedule.build(args, self.records, rows_per_step)
        self.curriculum_epochs = args.num_train_epochs
        self.step_counts = _step_counts(self.records)
        _check_run_length(args, self.schedule, self.step_counts)
        settings = run_settings(args, self.records)
        args = copy.copy(args)
        args.num_train_epochs = 1  # one pass over the schedule, which holds every curriculum epoch
        if args.latent_stop_head:
            model.add_latent_stop_head()
            # What `generate(num_latent_thoughts="auto")` allows by default: the most thoughts a final-stage prompt gets.
            final_stage = args.max_latent_stage + 1
            counts = [evaluation_layout(n, final_stage, args.curriculum).num_latents for n in self.step_counts]
            model.generation_config.max_latent_thoughts = max([1, *counts])
        collator = CoconutDataCollator(
            processing_class,
            self.records,
            args.curriculum,
            seed=args.seed,
            max_length=args.max_length,
            stop_labels=args.latent_stop_head,
        )
        # Only integer columns: TRL reads `image`/`images` columns as its own vision format.
        schedule = Dataset.from_list(self.schedule.rows)
        self.finite_loss = FiniteLossCallback(self)
        own_callbacks = [self.finite_loss, CurriculumCallback(self), RunRecord(settings)]
        super().__init__(
            model=model,
            args=args,
            data_collator=collator,
            train_dataset=schedule,
            processing_class=processing_class,
            callbacks=[*own_callbacks, *(kwargs.pop("callbacks", None) or [])],
            **kwargs,
        )
        # SFTTrainer's fused LM head runs the inner backbone, without the latent passes: score the model's own logits.
        self.stop_losses = []  # the stop head's loss of each forward, until `compute_loss` adds it
        add_latent_fused_lm_head(
            self.model.get_base_model() if is_peft_model(self.model) else self.model,
            on_stop_loss=self.stop_losses.append if args.latent_stop_head else None,
        )
        if args.latent_stop_head and not any(p.requires_grad for p in self.model.latent_stop_head.parameters()):
            raise ValueError(
                "`latent_stop_head` is set but the stop head's weights are frozen (a LoRA config without "
                "`modules_to_save=['latent_stop_head']`?). `coconut.lora.coconut_peft_config` adds it."
            )
        if args.method == "pause_as_thought":
            # The paper's baseline: the same token layout, but `<|latent|>` is an ordinary learned token.
            self.model.config.latent_token_id = None
        # FSDP and ZeRO-3 gather parameters in every forward call: all ranks must make the same calls.
        self.sync_latent_passes = self.is_fsdp_enabled or self.is_deepspeed_enabled
        self.stage_lr_scheduler = None

    def _send_telemetry(self):
        """TRL's trainers ping the Hub when built (trainer class, model type, data source, device; unless
        `HF_HUB_DISABLE_TELEMETRY=1` or `HF_HUB_OFFLINE=1`). This trainer does not: a training run talks to the Hub
        only when asked to (a Hub model or dataset, `--push_to_hub`)."""

    @property
    def run_record(self) -> RunRecord:
        # Looked up each time: `restore_callback_states_from_checkpoint` replaces the callback by a new instance.
        return next(callback for callback in self.callback_handler.callbacks if isinstance(callback, RunRecord))

    @property
    def eval_results(self) -> EvalResults:
        """The evaluation after each stage so far, including those made before a resume."""
        return EvalResults(StageResult.from_dict(result) for result in self.run_record.stage_results)

    @property
    def stage_reached(self) -> int:
        """The stage of the last step trained (0 before training)."""
        return self.schedule.stage_of_step(max(self.state.global_step - 1, 0))

    def num_latent_thoughts(self, stage: int) -> int:
        """The most thoughts an evaluation prompt gets at `stage`: the count a user of the saved model should pass."""
        curriculum = self.args.curriculum
        return max((evaluation_layout(n, stage, curriculum).num_latents for n in self.step_counts), default=0)

    def training_record(self) -> dict:
        """What a saved model should say about its training: settings, curriculum, stage reached, thoughts."""
        return {
            "settings": self.run_record.settings,
            "curriculum": asdict(self.args.curriculum),
            "epochs_per_stage": self.args.epochs_per_stage,
            "start_stage": self.args.start_stage,
            "num_train_epochs": self.curriculum_epochs,
            "planned_steps": self.schedule.total_steps,
            "global_step": self.state.global_step,
            "stage": self.stage_reached,
            "num_latent_thoughts": self.num_latent_thoughts(self.stage_reached),
        }

    def stage_ends(self, state) -> bool:
        """Whether the step just done (`state.global_step`) is the last of its stage or of the run."""
        step = state.global_step
        return step == state.max_steps or self.schedule.stage_of_step(step) != self.schedule.stage_of_step(step - 1)

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs):
        """[`~transformers.Trainer.train`], resuming as the run's settings say, after the checks that keep a resumed
        run the run it continues.

        The resume policy of the repository, in one place: `resume_from_checkpoint` (or, when not passed,
        `args.resume_from_checkpoint`) names the checkpoint; `True`, or neither set, takes the newest complete
        checkpoint of `output_dir` (newer incomplete ones are skipped with a warning; without one, `True` is an error
        and an unset value trains from scratch); `False` trains from scratch. `overwrite_output_dir` trains from
        scratch and deletes the folder's checkpoints first.

        The checkpoint must be complete, hold its optimizer and scheduler state (unless `resume_with_fresh_optimizer`)
        and readable weights, and have been saved with this run's [`RESUME_SETTINGS`] and training records; without
        a checkpoint, an `output_dir` holding a model trained with other settings is refused as well.
        """
        if self.lr_scheduler is not None and self.lr_scheduler is self.stage_lr_scheduler:
            self.lr_scheduler = None  # built for one `train()` call, as Trainer rebuilds its own
        if resume_from_checkpoint is None:
            resume_from_checkpoint = self.args.resume_from_checkpoint
        output_dir = self.args.output_dir
        if self.args.overwrite_output_dir:
            if resume_from_checkpoint:
                raise ValueError(
                    f"`overwrite_output_dir` trains from scratch, `resume_from_checkpoint`={resume_from_checkpoint!r} "
                    "resumes: pass one of them."
                )
            if self.is_world_process_zero():
                remove_checkpoints(output_dir)
            self.accelerator.wait_for_everyone()
            return super().train(**kwargs)
        if resume_from_checkpoint is None or resume_from_checkpoint is True:
            newest = last_complete_checkpoint(output_dir)
            if newest is None and resume_from_checkpoint is True:
                raise ValueError(f"`resume_from_checkpoint`=True, but {output_dir!r} has no complete checkpoint.")
            resume_from_checkpoint = newest
        if resume_from_checkpoint:
            logger.info(f"Resuming from {resume_from_checkpoint}")
            self.check_checkpoint(resume_from_checkpoint)
        else:
            record = Path(output_dir) / TRAINING_RECORD
            if record.is_file():
                saved = json.loads(record.read_text()).get("settings")
                self.refuse_other_settings(saved, f"The model in {output_dir!r}")
        return super().train(resume_from_checkpoint=resume_from_checkpoint or None, **kwargs)

    def check_checkpoint(self, checkpoint: str | Path):
        """Raise a `ValueError` naming what makes `checkpoint` unfit to resume this run from."""
        checkpoint = Path(checkpoint)
        if not is_complete(checkpoint):
            raise ValueError(
                f"Checkpoint {str(checkpoint)!r} is incomplete or missing: it has no readable {TRAINER_STATE_NAME} "
                "(the run stopped while saving it). Resume from an earlier checkpoint, or delete this one."
            )
        if not (self.is_fsdp_enabled or self.is_deepspeed_enabled or self.args.resume_with_fresh_optimizer):
            missing = [name for name in (OPTIMIZER_NAME, SCHEDULER_NAME) if not (checkpoint / name).is_file()]
            if missing:
                raise ValueError(
                    f"Checkpoint {str(checkpoint)!r} has no {' or '.join(missing)} (saved with `save_only_model`, or "
                    "copied without it): resuming would silently restart the optimizer and learning-rate schedule. "
                    "Pass `--resume_with_fresh_optimizer` to accept that, or resume from a checkpoint that has them."
                )
        check_weight_files(checkpoint)
        check_resume_files(checkpoint)
        saved = saved_run_settings(checkpoint, RunRecord.__name__)
        self.refuse_other_settings(saved, f"Checkpoint {str(checkpoint)!r}")

    def refuse_other_settings(self, saved: dict | None, where: str):
        if saved is None:
            logger.warning(f"{where} has no saved run settings (an older save); they cannot be checked.")
            return
        differences = settings_differences(saved, self.run_record.settings)
        if differences:
            raise ValueError(
                f"{where} was trained with other settings than this run: {'; '.join(differences)}. Resuming "
                "would mix two trainings and describe the result wrongly. Rerun with the saved settings to resume, "
                f"pass `--overwrite_output_dir` to train from scratch in {self.args.output_dir!r} (its checkpoints are "
                "deleted), or pick another `--output_dir`."
            )

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """`SFTTrainer.compute_loss` (loss and metrics) through the latent passes; watches for a non-finite loss."""
        if self.sync_latent_passes:
            inputs = {**inputs, "sync_latent_passes": True}
        self.stop_losses.clear()
        result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if self.stop_losses:
            result = self._add_stop_loss(result, return_outputs, num_items_in_batch)
        if model.training:
            loss = result[0] if return_outputs else result
            self.finite_loss.observe(loss.detach(), self.state.global_step + 1)
        return result

    def _add_stop_loss(self, result, return_outputs: bool, num_items_in_batch):
        """The loss plus `stop_loss_weight` x the stop head's loss (logged as `stop_loss`). The stop loss is a mean
        per micro-batch: with `num_items_in_batch` the trainer leaves gradient accumulation to the loss, so it is
        divided by the accumulation steps, as TRL does for the MoE auxiliary loss."""
        stop_loss = self.stop_losses.pop()
        mode = "train" if self.model.training else "eval"
        self._metrics[mode]["stop_loss"].append(self.accelerator.gather_for_metrics(stop_loss.detach()).mean().item())
        steps = self.current_gradient_accumulation_steps if num_items_in_batch is not None else 1
        weighted = self.args.stop_loss_weight * stop_loss / steps
        if return_outputs:
            return result[0] + weighted, result[1]
        return result + weighted

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Training logs carry the stage of the last step."""
        if "loss" in logs:
            logs["stage"] = self.schedule.stage_of_step(max(self.state.global_step - 1, 0))
        super().log(logs, start_time)

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        """With `reset_optimizer`, the learning-rate schedule restarts at each stage (warmup included): one
        `lr_scheduler_type` schedule per stage, chained by `SequentialLR` at the steps where the stages start."""
        if not self.args.reset_optimizer or self.lr_scheduler is not None:
            return super().create_scheduler(num_training_steps, optimizer)
        if self.args.lr_scheduler_type == SchedulerType.REDUCE_ON_PLATEAU:
            raise ValueError(
                "`lr_scheduler_type`='reduce_lr_on_plateau' cannot restart per stage; with `reset_optimizer=True` "
                "use a warmup/decay schedule such as 'linear', 'cosine' or 'constant'."
            )
        optimizer = optimizer or self.optimizer
        spans = self.schedule.stage_spans()
        schedulers = [
            get_scheduler(
                self.args.lr_scheduler_type,
                optimizer=optimizer,
                num_warmup_steps=self.args.get_warmup_steps(num_steps),
                num_training_steps=num_steps,
                scheduler_specific_kwargs=self.args.lr_scheduler_kwargs,
            )
            for _, _, num_steps in spans
        ]
        milestones = [first_step for _, first_step, _ in spans[1:]]
        self.lr_scheduler = torch.optim.lr_scheduler.SequentialLR(optimizer, schedulers, milestones)
        self.stage_lr_scheduler = self.lr_scheduler
        return self.lr_scheduler

    # No public hook: `Trainer` loads a checkpoint with `load_state_dict`, without the key conversion that
    # `from_pretrained` applies (transformers#43701), and `save_pretrained` writes back the key layout the weights were
    # loaded in (InternVL's Hub layout, for a converted model).
    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        """Load full-model checkpoints through `from_pretrained`, which maps InternVL's saved key layout back."""
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
        """Greedy generation on the validation records at `stage`; logs the metrics and keeps the whole result."""
        config = CoconutEvalConfig(
            stage=stage,
            batch_size=self.args.per_device_eval_batch_size,
            max_new_tokens=self.args.eval_max_new_tokens,
            disable_tqdm=True,
        )
        model = self.accelerator.unwrap_model(self.model)
        was_training = model.training
        model.eval()  # also for the log: SFTTrainer keeps its training metrics for the next training log
        result = evaluate_stage(model, self.processing_class, self.eval_records, self.args.curriculum, config)
        self.run_record.stage_results.append(result.to_dict())
        metrics = {f"eval_{name}": value for name, value in result.metrics.items()}
        self.log({"stage": stage, **metrics})
        model.train(was_training)
        return result


# Settings a resumed run must share with the run it continues: they fix which sample is trained at which step and
# stage, and how. Everything else may change on resume: logging, saving, evaluation (eval batch size,
# eval_max_new_tokens, the validation split), output paths, the Hub, progress bars, dataloader workers, activation
# checkpointing (the same maths), the device.
RESUME_SETTINGS = (
    # the curriculum
    "method",
    "c_thought",
    "epochs_per_stage",
    "start_stage",
    "max_latent_stage",
    "pad_latent_to_max",
    "uniform_prob",
    "reset_optimizer",
    "latent_stop_head",
    "stop_loss_weight",
    # the schedule: which records, in which order, in which batches
    "num_train_epochs",
    "max_steps",
    "seed",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "max_length",
    # the optimisation
    "learning_rate",
    "lr_scheduler_type",
    "lr_scheduler_kwargs",
    "warmup_steps",
    "weight_decay",
    "optim",
    "optim_args",
    "adam_beta1",
    "adam_beta2",
    "adam_epsilon",
    "max_grad_norm",
    "bf16",
    "fp16",
)


def run_settings(args: CoconutSFTConfig, records: Sequence[dict]) -> dict:
    """The [`RESUME_SETTINGS`] of `args`, the number of processes, and the training records' count and hash."""
    settings = {name: _plain(getattr(args, name)) for name in RESUME_SETTINGS if hasattr(args, name)}
    settings["num_processes"] = args.world_size
    settings["train_records"] = len(records)
    settings["train_records_sha256"] = _records_hash(records)
    return settings


def _plain(value):
    """`value` as JSON gives it back (enums as their value), so saved and current settings compare equal."""
    if isinstance(value, Enum):
        value = value.value
    return json.loads(json.dumps(value, default=str))


def _records_hash(records: Sequence[dict]) -> str:
    """A hash of every record's text fields and image count (the images themselves are not read)."""
    columns = ("id", "question", "steps", "answer")
    if isinstance(records, Dataset):
        table = records.with_format("arrow")
        counts = pc.list_value_length(table["images"]).to_pylist() if "images" in records.column_names else None
        rows = zip(*(records[name] for name in columns), counts or [0] * len(records), strict=True)
    else:
        rows = ((*(record.get(name) for name in columns), len(record.get("images") or [])) for record in records)
    digest = hashlib.sha256()
    for row in rows:
        digest.update(json.dumps(row, default=str).encode())
    return digest.hexdigest()


def _step_counts(records: Sequence[dict]) -> list[int]:
    steps = records["steps"] if isinstance(records, Dataset) else [record.get("steps") for record in records]
    return [len(record_steps or []) for record_steps in steps]


def _check_run_length(args: CoconutSFTConfig, schedule: CurriculumSchedule, step_counts: list[int]):
    """A `max_steps` past the schedule is an error; a run too short to reach `max_latent_stage` gets a warning."""
    if args.max_steps > schedule.total_steps:
        raise ValueError(
            f"`max_steps`={args.max_steps} is more than the curriculum's {schedule.total_steps} steps "
            f"({args.num_train_epochs} epochs of {schedule.steps_per_epoch} steps): Trainer would start the "
            "curriculum again. Raise `num_train_epochs` instead, or lower `max_steps`."
        )
    if args.method in ("cot", "no_cot"):
        return
    last_step = min(args.max_steps, schedule.total_steps) if args.max_steps > 0 else schedule.total_steps
    final_stage = schedule.stage_of_step(last_step - 1)
    if final_stage < args.max_latent_stage:
        needed = (args.max_latent_stage + 1 - args.start_stage) * args.epochs_per_stage
        stop = (
            f"`max_steps`={args.max_steps} of {schedule.total_steps} steps"
            if last_step < schedule.total_steps
            else (f"`num_train_epochs`={args.num_train_epochs}")
        )
        logger.warning(
            f"The run is too short for its curriculum: {stop} ends in stage {final_stage}, but "
            f"`max_latent_stage`={args.max_latent_stage} needs (max_latent_stage + 1 - start_stage) x epochs_per_stage "
            f"({args.epochs_per_stage}) = {needed} epochs. The model is saved, evaluated and described at stage "
            f"{final_stage}."
        )
    longest = max(step_counts, default=0)
    if args.max_latent_stage > longest:
        logger.warning(
            f"`max_latent_stage`={args.max_latent_stage}, but the longest training record has {longest} steps: "
            f"evaluation prompts get at most {longest} x c_thought = {longest * args.c_thought} thoughts."
        )


__all__ = [
    "CoconutSFTTrainer",
    "CurriculumCallback",
    "CurriculumSchedule",
    "FiniteLossCallback",
    "RunRecord",
    "add_latent_fused_lm_head",
]
