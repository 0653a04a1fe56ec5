"""Train Coconut-InternVL with the Coconut curriculum (Hao et al. 2024, arXiv 2412.06769) on TRL's SFTTrainer.

# The embedded default: a tiny InternVL-shaped model from scratch on the bundled arrow-chase task, every stage,
# an evaluation after each stage, the model in outputs/demo (minutes on a CPU); flags given without --dataset,
# --model_name_or_path or --config override the default's (e.g. `--output_dir outputs/mine --seed 1`)
```bash
python train_sft.py
```

# A converted InternVL3 (see convert_to_coconut.py) on ProsQA, from a YAML recipe; flags override the recipe
```bash
accelerate launch --config_file recipes/accelerate/ddp.yaml train_sft.py --config recipes/prosqa_coconut.yaml
```

# LoRA on the language model only (the new tokens' embedding rows train too); the trained model is
# <output_dir>/merged (its card loads it), the adapter stays in <output_dir>
```bash
python train_sft.py --config recipes/prosqa_coconut.yaml --use_peft --lora_r 16 --lora_alpha 32 \\
    --learning_rate 2e-4 --output_dir outputs/prosqa-lora
```

# Two processes on CPU (gloo); `--cpu --num_processes 2` would silently run one process
```bash
accelerate launch --multi_gpu --num_processes 2 train_sft.py --dataset arrow_chase --output_dir outputs/ddp \\
    --synthetic_train_size 200 --num_train_epochs 4 --bf16 false --use_cpu true --report_to none --save_strategy no
```

A run resumes from `--resume_from_checkpoint PATH`, else from the newest checkpoint in `--output_dir`, with its stage,
that stage's optimizer state, the data order and the evaluations so far, provided the checkpoint was saved with the
same curriculum settings; another `--output_dir` starts from scratch (docs/errors.md says how to recover from each
failure). `--push_to_hub --hub_model_id you/name` pushes at the end.
"""

import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

from transformers.trainer_utils import get_last_checkpoint
from trl import ModelConfig, TrlParser

from coconut.held_out_evaluation import evaluate_held_out_test, write_test_results
from coconut.loading import load_model_and_processor
from coconut.lora import coconut_peft_config
from coconut.model_card import model_license, trained_model_card
from coconut.preflight import (
    check_dataset_argument,
    check_flags_act,
    check_push_arguments,
    check_script_sizes,
    check_tiny_model_image_size,
    check_writable,
    with_demo_defaults,
)
from coconut.repository import push_folder, save_trained_repository
from coconut.results import EvalResults
from coconut.sft_config import CoconutSFTConfig
from coconut.sft_trainer import CoconutSFTTrainer, prepare_model_for_curriculum
from coconut.synthetic import VARIANTS
from coconut.thought_scale import match_thought_scale
from coconut.tiny import tiny_model_and_processor
from coconut.training_data import check_lengths, load_splits


logger = logging.getLogger(__name__)

# `python train_sft.py` without arguments: the tiny model from scratch on the arrow-chase task, through every stage.
# Three epochs for each of stages 0-3, then the final stage (every step a thought) for the remaining eight; each stage
# restarts Adam with a warmup and decays the learning rate (peak 5e-4) to zero. docs/learning.md gives the evidence for
# each choice: at 1e-3 the final stage ended unconverged on some seeds (test accuracy 86-95 %).
DEMO_ARGS = [
    "--output_dir", "outputs/demo", "--dataset", "arrow_chase", "--synthetic_train_size", "2000",
    "--synthetic_validation_size", "100", "--synthetic_grid_size", "2", "--synthetic_max_hops", "3",
    "--method", "coconut", "--c_thought", "1", "--max_latent_stage", "3", "--epochs_per_stage", "3",
    "--num_train_epochs", "20", "--per_device_train_batch_size", "32", "--per_device_eval_batch_size", "100",
    "--learning_rate", "5e-4", "--lr_scheduler_type", "cosine", "--warmup_steps", "0.1", "--reset_optimizer", "true",
    "--logging_steps", "20", "--save_strategy", "no", "--bf16", "false", "--use_cpu", "true", "--report_to", "none",
    "--seed", "0",
]  # fmt: skip


@dataclass
class ScriptArguments:
    """Data and model-building arguments of the script (training ones are in `CoconutSFTConfig`)."""

    dataset: str | None = field(
        default=None,
        metadata={
            "help": "'arrow_chase' (the bundled synthetic visual task), a Coconut JSON file, a folder of "
            "`<name>_<split>.json` files, a JSON/JSONL file of records or a Hub dataset id. Without it (and without "
            "--model_name_or_path and --config) the embedded default runs, with the flags given on top."
        },
    )
    skip_invalid: bool = field(
        default=False,
        metadata={
            "help": "Drop invalid training/validation records (wrong shape, no steps or answer, missing image, "
            "longer than --max_length at some stage) and log how many, instead of stopping with an error."
        },
    )
    train_split: str = field(default="train", metadata={"help": "Training split (picks the file in a folder)."})
    eval_split: str = field(default="valid", metadata={"help": "Split evaluated after each stage; '' for none."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Evaluate on the first N records only."})
    synthetic_dir: str = field(
        default="outputs/data/arrow_chase", metadata={"help": "Where the synthetic task's images are rendered."}
    )
    synthetic_train_size: int = field(default=1500, metadata={"help": "Synthetic training records."})
    synthetic_validation_size: int = field(default=200, metadata={"help": "Synthetic validation records."})
    synthetic_test_size: int = field(
        default=500,
        metadata={
            "help": "Held-out test questions the final model answers at the end (in no other split); 0 for none."
        },
    )
    synthetic_grid_size: int = field(default=4, metadata={"help": "Cells per side of the arrow-chase board."})
    synthetic_min_hops: int = field(default=2, metadata={"help": "Fewest arrows (reasoning steps) per question."})
    synthetic_max_hops: int = field(default=6, metadata={"help": "Most arrows (reasoning steps) per question."})
    synthetic_variant: str = field(
        default="chase",
        metadata={
            "help": "'chase' (one arrow per cell), 'branching' (two arrows per cell, which of two cells can you "
            "reach? a board of at least 3 x 3) or 'dot' (follow the arrows to the first dotted cell: the question "
            "gives no number of arrows; at least max_hops + 3 cells).",
            "choices": list(VARIANTS),
        },
    )
    synthetic_image_size: int = field(
        default=56, metadata={"help": "Side of the task's image in pixels (a multiple of the grid size and of 28)."}
    )
    tiny_embedding_std: float | None = field(
        default=None,
        metadata={
            "help": "Without --model_name_or_path: standard deviation of the tiny model's initial token embeddings "
            "(default: the config's initializer_range, 0.02). 1.0 puts tokens at the scale of the fed-back thoughts."
        },
    )
    match_thought_scale: bool = field(
        default=False,
        metadata={
            "help": "Before training, rescale the final norm (and the LM head inversely: the logits stay the same) so "
            "that a fed-back thought has the norm of a token embedding (coconut/thought_scale.py)."
        },
    )
    merge_adapter: bool = field(
        default=True, metadata={"help": "With --use_peft, also save the merged full model in <output_dir>/merged."}
    )

    def __post_init__(self):
        check_script_sizes(self)


def main(script_args: ScriptArguments, training_args: CoconutSFTConfig, model_args: ModelConfig):
    # Logging, and the checks that need neither data nor model, before any time is spent
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    check_dataset_argument(script_args, model_args)
    check_flags_act(script_args, training_args, model_args)
    check_tiny_model_image_size(script_args, model_args)
    check_push_arguments(training_args)
    check_writable(training_args.output_dir)

    # Data and model: the tiny model from scratch on the bundled task, or a converted (or trained) Coconut-InternVL
    train, validation, task = load_splits(script_args, training_args.seed)
    base_model = model_args.model_name_or_path
    if base_model is None:
        model, processor = tiny_model_and_processor(task, training_args.seed, script_args.tiny_embedding_std)
    else:
        model, processor = load_model_and_processor(
            base_model, model_args.model_revision, model_args.dtype, model_args.attn_implementation
        )
    license = model_license(base_model, model_args.model_revision)  # the card's: a base without one fails now
    if script_args.match_thought_scale:
        logger.info("Final norm rescaled by %.4g: thoughts at token embeddings' scale", match_thought_scale(model))
    train = check_lengths(train, processor, training_args, script_args.skip_invalid)
    prepare_model_for_curriculum(model, training_args, train)  # the stop head before LoRA, which then trains it whole

    # Train. Pushing happens at the end only: Trainer would create the Hub repository at construction.
    push_to_hub, training_args.push_to_hub = training_args.push_to_hub, False
    trainer = CoconutSFTTrainer(
        model=model,
        args=training_args,
        train_dataset=train,
        eval_dataset=validation,
        processing_class=processor,
        peft_config=coconut_peft_config(model_args, model),
    )
    checkpoint = training_args.resume_from_checkpoint or get_last_checkpoint(training_args.output_dir)
    if checkpoint:
        logger.info("Resuming from %s", checkpoint)
    trainer.train(resume_from_checkpoint=checkpoint)
    logger.info("Trained %d steps on %d processes", trainer.state.global_step, trainer.accelerator.num_processes)

    # Save + model card, after the final model has answered the bundled task's held-out test split
    output_dir = Path(training_args.output_dir)
    trainer.save_model(str(output_dir))
    trainer.save_thought_decoder(output_dir)  # with --step_supervision: the step decoder, beside the model
    if not trainer.accelerator.is_main_process:
        return trainer
    test = evaluate_held_out_test(trainer, task, script_args.synthetic_dir) if task and task.test_size > 0 else None
    example = (validation if validation is not None else train)[0]  # the card's quick start asks its question
    split = "validation" if task is not None else script_args.eval_split
    record, card = trained_model_card(
        trainer, script_args.dataset, split, task, base_model, license, example, test, script_args.merge_adapter
    )
    folder = save_trained_repository(trainer, output_dir, card, record, example, script_args.merge_adapter)

    # Evaluate: the table of the evaluations after each stage (those before a resume included), then the test split
    if trainer.eval_results.results:
        trainer.eval_results.save(output_dir)
        print(trainer.eval_results.markdown_table())
    if test is not None:
        write_test_results(output_dir, test)
        print(f"Held-out test split, {len(test.predictions)} questions:\n{EvalResults([test]).markdown_table()}")

    # Push the full model (with LoRA, the merged one). Not `Trainer.push_to_hub`: it replaces the card with TRL's and,
    # with LoRA, pushes the adapter instead of the merged model.
    if push_to_hub:
        url = push_folder(folder, training_args.hub_model_id, private=bool(training_args.hub_private_repo))
        logger.info("Pushed to %s", url)
    return trainer


if __name__ == "__main__":
    parser = TrlParser((ScriptArguments, CoconutSFTConfig, ModelConfig))
    trainer = main(*parser.parse_args_and_config(args=with_demo_defaults(sys.argv[1:], DEMO_ARGS)))
    # Every rank waits until the main process has saved and scored the model, then all destroy the process group
    # together: a rank that tears down gloo while its peer is still connected aborts ("terminate called without an
    # active exception"), and so does one that leaves gloo threads running at interpreter shutdown.
    trainer.accelerator.wait_for_everyone()
    trainer.accelerator.end_training()
