"""`CoconutSFTTrainer`: TRL's `SFTTrainer` running Coconut's staged curriculum through the model's own forward."""

import copy
import hashlib
import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from enum import Enum
from pathlib import Path

import pyarrow.compute as pc
import torch
from accelerate.utils import is_peft_model
from datasets import Dataset
from torch.utils.hooks import RemovableHandle
from transformers import SchedulerType, TrainerCallback, get_scheduler
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import WeightRenaming, rename_source_key
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_callback import ExportableState, TrainerState
from transformers.trainer_utils import get_last_checkpoint
from transformers.utils import logging
from trl import SFTConfig, SFTTrainer

from coconut.collator import CoconutDataCollator
from coconut.curriculum import evaluation_layout
from coconut.eval_config import CoconutEvalConfig
from coconut.evaluation import evaluate_stage
from coconut.fused_lm_head import add_latent_fused_lm_head
from coconut.results import EvalResults, StageResult
from coconut.sft_config import CoconutSFTConfig
from coconut.step_supervision import (
    THOUGHT_DECODER_DIR,
    build_thought_decoder,
    load_decoder_state,
    save_decoder_state,
    save_thought_decoder,
    step_supervision_loss,
)


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
    epoch_stages: list[int]

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
        return cls(rows=rows, rows_per_step=rows_per_step, steps_per_epoch=steps_per_epoch, epoch_stages=stages)

    @property
    def total_steps(self) -> int:
        return len(self.rows) // self.rows_per_step

    def stage_of_step(self, step: int) -> int:
        """The scheduled stage of optimizer step `step` (counted from 0)."""
        return self.epoch_stages[min(step // self.steps_per_epoch, len(self.epoch_stages) - 1)]

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
            "before that step or start again in another `--output_dir`."
        )


def prepare_model_for_curriculum(model, args: CoconutSFTConfig, records: Sequence[dict]) -> None:
    """Set, once and before the trainer is built (and before PEFT wraps the model), what the run's curriculum needs of
    the model; the trainer itself changes nothing of it.

    - `latent_stop_head`: the stop head (unless the model has one), and the most thoughts
      `generate(num_latent_thoughts="auto")` gives by default (the generation config's `max_latent_thoughts`): the
      most a final-stage prompt of `records` gets.
    - `method="pause_as_thought"`: `config.latent_token_id=None`, so `<|latent|>` is an ordinary learned pause token
      (the paper's baseline: the same layout, nothing fed back).
    """
    if args.latent_stop_head:
        if getattr(model, "latent_stop_head", None) is None:
            model.add_latent_stop_head()
        final_stage = args.max_latent_stage + 1
        counts = [evaluation_layout(n, final_stage, args.curriculum).num_latents for n in _step_counts(records)]
        model.generation_config.max_latent_thoughts = max([1, *counts])
    if args.method == "pause_as_thought":
        model.config.latent_token_id = None


def check_model_prepared(model, args: CoconutSFTConfig) -> None:
    """A `ValueError` when the model lacks what [`prepare_model_for_curriculum`] sets for this run."""
    fix = "Call `prepare_model_for_curriculum(model, args, train_dataset)` before building the trainer (train_sft.py does)."
    if args.latent_stop_head and getattr(model, "latent_stop_head", None) is None:
        raise ValueError(f"`latent_stop_head` is set, but the model has no stop head. {fix}")
    if args.method == "pause_as_thought" and model.config.latent_token_id is not None:
        raise ValueError(
            f"`method`='pause_as_thought', but the model feeds thoughts back at `<|latent|>` "
            f"(`config.latent_token_id`={model.config.latent_token_id}). {fix}"
        )


# The step decoder's state in a checkpoint folder (LoRA matrices included), beside the model's weights.
DECODER_STATE_NAME = "thought_decoder.safetensors"


class ThoughtDecoderCallback(TrainerCallback):
    """Clips the step decoder's gradients like the model's (`max_grad_norm`), zeroes them after each optimizer step, and
    saves the decoder's state in each checkpoint."""

    def __init__(self, trainer: "CoconutSFTTrainer"):
        self.trainer = trainer

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if args.max_grad_norm and args.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.trainer.thought_decoder.parameters(), args.max_grad_norm)

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.trainer.thought_decoder.zero_grad(set_to_none=True)  # Trainer zeroes the model's gradients only

    def on_save(self, args, state, control, **kwargs):
        if self.trainer.is_world_process_zero():
            checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            save_decoder_state(self.trainer.thought_decoder, checkpoint / DECODER_STATE_NAME)


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

    The model comes prepared for the curriculum ([`prepare_model_for_curriculum`]: the stop head, and for
    `method="pause_as_thought"` a `config.latent_token_id` of `None`, so the `<|latent|>` tokens are learned pause
    tokens); the trainer checks that and changes nothing of the model itself.

    A non-finite loss stops training with an error naming the step ([`FiniteLossCallback`]). `train()` resumes as
    `Trainer` does, from a checkpoint saved with the same curriculum settings and training records as this run
    ([`run_settings`], kept by [`RunRecord`]); each checkpoint also keeps the evaluation of every stage so far, so a
    resumed run reports every stage.

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
        check_model_prepared(model, args)
        collator = CoconutDataCollator(
            processing_class,
            self.records,
            args.curriculum,
            seed=args.seed,
            max_length=args.max_length,
            stop_labels=args.latent_stop_head,
            step_supervision=args.step_supervision,
        )
        self.thought_decoder = None
        if args.step_supervision:
            if args.world_size > 1:
                raise ValueError(
                    f"`step_supervision` runs on one process; this run has {args.world_size}. The step decoder is not "
                    "wrapped for data parallelism, so its gradients would not be averaged across processes. Train on "
                    "one process, or drop `--step_supervision`."
                )
            # A copy of the language model and LM head as they are now, before PEFT wraps the model.
            self.thought_decoder = build_thought_decoder(model, kwargs.get("peft_config"))
        # Only integer columns: TRL reads `image`/`images` columns as its own vision format.
        schedule = Dataset.from_list(self.schedule.rows)
        self.finite_loss = FiniteLossCallback(self)
        own_callbacks = [self.finite_loss, CurriculumCallback(self), RunRecord(settings)]
        if self.thought_decoder is not None:
            own_callbacks.append(ThoughtDecoderCallback(self))
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
        self.auxiliary_losses = {}  # the stop head's and the step decoder's loss of a forward, until `compute_loss`
        self.step_batch = None  # the step decoder's inputs for the forward under way
        add_latent_fused_lm_head(
            self.model.get_base_model() if is_peft_model(self.model) else self.model,
            on_outputs=self._auxiliary_losses_of,
        )
        if args.latent_stop_head and not any(p.requires_grad for p in self.model.latent_stop_head.parameters()):
            raise ValueError(
                "`latent_stop_head` is set but the stop head's weights are frozen (a LoRA config without "
                "`modules_to_save=['latent_stop_head']`?). `coconut.lora.coconut_peft_config` adds it."
            )
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
        """[`~transformers.Trainer.train`], which resumes as `Trainer` does (`resume_from_checkpoint`: a checkpoint
        folder, or `True` for the newest one in `output_dir`), once [`check_checkpoint`] found the checkpoint saved
        under this run's curriculum.

        `save_pretrained` writes a full-model checkpoint in InternVL's Hub key layout, and `Trainer` loads it back with
        `load_state_dict`, which does not map the keys (transformers#43701): while `train` runs, the hooks of
        [`load_saved_key_layout`] map them as `from_pretrained` does, into the model itself (no second model).
        """
        if self.lr_scheduler is not None and self.lr_scheduler is self.stage_lr_scheduler:
            self.lr_scheduler = None  # built for one `train()` call, as Trainer rebuilds its own
        checkpoint = resume_from_checkpoint
        if checkpoint is True:
            checkpoint = get_last_checkpoint(self.args.output_dir)  # the one Trainer resumes from
        hooks = []
        if checkpoint:
            self.check_checkpoint(checkpoint)
            if self.thought_decoder is not None:
                load_decoder_state(self.thought_decoder, Path(checkpoint) / DECODER_STATE_NAME)
            if not (is_peft_model(self.model) or self.is_fsdp_enabled or self.is_deepspeed_enabled):
                hooks = load_saved_key_layout(self.model)  # PEFT, FSDP and DeepSpeed load checkpoints their own way
        try:
            return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)
        finally:
            for hook in hooks:
                hook.remove()

    def check_checkpoint(self, checkpoint: str | Path):
        """Raise a `ValueError` when `checkpoint` was saved under other curriculum settings ([`run_settings`]) than
        this run's, naming the fields that differ, or is missing the trainer state that holds them."""
        try:
            state = TrainerState.load_from_json(os.path.join(checkpoint, TRAINER_STATE_NAME))
        except (OSError, ValueError) as error:
            raise ValueError(
                f"Checkpoint {str(checkpoint)!r} is incomplete or missing: it has no readable {TRAINER_STATE_NAME} "
                "(the run stopped while saving it). Resume from an earlier checkpoint, or delete this one."
            ) from error
        if self.thought_decoder is not None and not (Path(checkpoint) / DECODER_STATE_NAME).is_file():
            raise ValueError(
                f"Checkpoint {str(checkpoint)!r} has no {DECODER_STATE_NAME}: it was saved by a run without "
                "`step_supervision`, so the step decoder's training cannot be resumed. Resume without "
                "`--step_supervision`, or train into another `--output_dir`."
            )
        saved = (state.stateful_callbacks.get(RunRecord.__name__) or {}).get("args", {}).get("settings")
        if saved is None:
            logger.warning(f"Checkpoint {str(checkpoint)!r} has no saved run settings (an older save); not checked.")
            return
        differences = settings_differences(saved, self.run_record.settings)
        if differences:
            raise ValueError(
                f"Checkpoint {str(checkpoint)!r} was trained with other settings than this run: "
                f"{'; '.join(differences)}. Resuming would mix two curricula and describe the result wrongly. Rerun "
                "with the saved settings to resume, or train from scratch in another `--output_dir` (or delete the "
                f"checkpoint-* folders of {self.args.output_dir!r})."
            )

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """`SFTTrainer.compute_loss` (loss and metrics) through the latent passes, plus the stop head's and the step
        decoder's losses; watches for a non-finite loss."""
        inputs = dict(inputs)
        if self.sync_latent_passes:
            inputs["sync_latent_passes"] = True
        step_keys = ("step_thought_index", "step_input_ids", "step_attention_mask")
        self.step_batch = {key: inputs.pop(key) for key in step_keys if key in inputs} or None
        self.auxiliary_losses.clear()
        result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        self.step_batch = None
        weights = {"stop_loss": self.args.stop_loss_weight, "step_loss": self.args.step_loss_weight}
        for name, auxiliary_loss in self.auxiliary_losses.items():
            result = self._add_auxiliary_loss(result, name, auxiliary_loss, weights[name], num_items_in_batch)
        if model.training:
            loss = result[0] if return_outputs else result
            self.finite_loss.observe(loss.detach(), self.state.global_step + 1)
        return result

    def _auxiliary_losses_of(self, outputs):
        """Called with the model's own outputs inside the forward TRL scores: keeps the stop head's loss and computes
        the step decoder's from the final hidden states."""
        if getattr(outputs, "stop_loss", None) is not None:
            self.auxiliary_losses["stop_loss"] = outputs.stop_loss
        if self.thought_decoder is not None and self.step_batch is not None:
            model = self.accelerator.unwrap_model(self.model)
            self.thought_decoder.train(model.training)  # dropout as in the model
            step_loss = step_supervision_loss(
                self.thought_decoder,
                model.get_input_embeddings(),
                outputs.hidden_states[-1],
                **self.step_batch,
                normalization=self.args.step_loss_normalization,
            )
            if step_loss is not None:
                self.auxiliary_losses["step_loss"] = step_loss

    def _add_auxiliary_loss(self, result, name: str, auxiliary_loss, weight: float, num_items_in_batch):
        """The loss plus `weight` x an auxiliary loss (logged under `name`). The auxiliary loss is a mean per
        micro-batch: with `num_items_in_batch` the trainer leaves gradient accumulation to the loss, so it is divided
        by the accumulation steps, as TRL does for the MoE auxiliary loss."""
        mode = "train" if self.model.training else "eval"
        self._metrics[mode][name].append(self.accelerator.gather_for_metrics(auxiliary_loss.detach()).mean().item())
        steps = self.current_gradient_accumulation_steps if num_items_in_batch is not None else 1
        weighted = weight * auxiliary_loss / steps
        if isinstance(result, tuple):
            return result[0] + weighted, result[1]
        return result + weighted

    def create_optimizer(self, model=None):
        """Trainer's optimizer, with the step decoder's trainable weights as a group of their own."""
        optimizer = super().create_optimizer(model)
        if self.thought_decoder is not None:
            parameters = [p for p in self.thought_decoder.parameters() if p.requires_grad]
            getattr(optimizer, "optimizer", optimizer).add_param_group(
                {"params": parameters, "weight_decay": self.args.weight_decay}
            )
        return optimizer

    def save_thought_decoder(self, output_dir: str | Path) -> Path | None:
        """Save the step decoder in `<output_dir>/thought_decoder` as a standalone causal LM (LoRA merged in)."""
        if self.thought_decoder is None:
            return None
        model = self.accelerator.unwrap_model(self.model)
        tokenizer = getattr(self.processing_class, "tokenizer", self.processing_class)
        folder = Path(output_dir) / THOUGHT_DECODER_DIR
        return save_thought_decoder(self.thought_decoder, model.get_input_embeddings(), folder, tokenizer)

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


# CoconutSFTConfig's own settings that change only the evaluation after each stage, not what is trained.
EVALUATION_ONLY_SETTINGS = ("eval_max_new_tokens",)


def curriculum_settings() -> list[str]:
    """The settings [`CoconutSFTConfig`] adds to `SFTConfig` (the curriculum's, [`CurriculumConfig`]'s among them),
    less [`EVALUATION_ONLY_SETTINGS`]: read from the dataclasses, so that a setting added later is checked too."""
    inherited = {item.name for item in fields(SFTConfig)}
    return [
        item.name
        for item in fields(CoconutSFTConfig)
        if item.name not in inherited and item.name not in EVALUATION_ONLY_SETTINGS
    ]


def run_settings(args: CoconutSFTConfig, records: Sequence[dict]) -> dict:
    """What a resumed run must share with the run it continues, so that each step trains the same samples at the same
    stage: the [`curriculum_settings`], what [`CurriculumSchedule`] reads besides them (`num_train_epochs`, `seed`
    and the samples per optimizer step), and the training records' count and hash. The optimizer, precision, logging,
    saving, evaluation and device settings may change."""
    settings = {name: _plain(getattr(args, name)) for name in curriculum_settings()}
    settings["num_train_epochs"] = _plain(args.num_train_epochs)
    settings["seed"] = args.seed
    settings["samples_per_step"] = (
        args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    )
    settings["train_records"] = len(records)
    settings["train_records_sha256"] = _records_hash(records)
    return settings


def load_saved_key_layout(model) -> list[RemovableHandle]:
    """Hooks (torch's public `load_state_dict` hooks) that let `model.load_state_dict` read the key layout
    `save_pretrained` writes: the keys are mapped with transformers' own conversion mapping, as `from_pretrained` and
    PEFT map them, and a key still unmatched is an error rather than a weight left as it was (`Trainer` loads without
    `strict`). Remove the returned handles to undo."""
    renamings = [
        transform for transform in get_model_conversion_mapping(model) if isinstance(transform, WeightRenaming)
    ]

    def rename(module, state_dict, prefix, *args):
        for key in list(state_dict):
            renamed, _ = rename_source_key(key, renamings, [])
            if renamed != key:
                state_dict[renamed] = state_dict.pop(key)

    def refuse_unmatched(module, incompatible_keys):
        unmatched = incompatible_keys.unexpected_keys
        if unmatched:
            raise ValueError(
                f"The checkpoint's weights do not fit the model: {len(unmatched)} of them have no parameter, e.g. "
                f"`{unmatched[0]}`. Resume with the model the checkpoint was trained from."
            )

    return [
        model.register_load_state_dict_pre_hook(rename),
        model.register_load_state_dict_post_hook(refuse_unmatched),
    ]


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
    if args.latent_stop_head and final_stage <= args.max_latent_stage:
        # The head learns where a block ends from blocks as long as the final stage makes them; `"auto"` would read an
        # untrained head, with `max_latent_thoughts` set for a stage the model never saw.
        needed = (args.max_latent_stage + 1 - args.start_stage) * args.epochs_per_stage + 1
        raise ValueError(
            f"`latent_stop_head` with a run that ends in stage {final_stage}, before the final stage "
            f"max_latent_stage + 1 = {args.max_latent_stage + 1} whose blocks teach the head where to stop. Raise "
            f"`num_train_epochs` to at least (max_latent_stage + 1 - start_stage) x epochs_per_stage + 1 = {needed} "
            "(and `max_steps` past the stage's start), or drop `--latent_stop_head`."
        )
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


def settings_differences(saved: dict, current: dict) -> list[str]:
    """`"name: saved -> current"` for every setting of `current` that `saved` holds with another value, or not at all
    (`saved` may hold more: settings an earlier version compared)."""
    missing = object()
    differences = []
    for name in sorted(current):
        before, after = saved.get(name, missing), current.get(name, missing)
        if before != after:
            show = [("(not set)" if value is missing else repr(value)) for value in (before, after)]
            differences.append(f"{name}: {show[0]} -> {show[1]}")
    return differences


__all__ = [
    "CoconutSFTTrainer",
    "CurriculumCallback",
    "CurriculumSchedule",
    "FiniteLossCallback",
    "RunRecord",
    "ThoughtDecoderCallback",
    "check_model_prepared",
    "prepare_model_for_curriculum",
]
