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

# LoRA on the language model only (the new tokens' embedding rows train too), merged model in <output_dir>/merged
```bash
python train_sft.py --config recipes/prosqa_coconut.yaml --use_peft --lora_r 16 --lora_alpha 32 \\
    --learning_rate 2e-4 --output_dir outputs/prosqa-lora
```

# Two processes on CPU (gloo); `--cpu --num_processes 2` would silently run one process
```bash
accelerate launch --multi_gpu --num_processes 2 train_sft.py --output_dir outputs/ddp --synthetic_train_size 200 \
    --num_train_epochs 4 --bf16 false --use_cpu true --report_to none --save_strategy no
```

A run resumes from the last complete checkpoint in `--output_dir` (or `--resume_from_checkpoint PATH`), with its
stage, that stage's optimizer state, the data order and the evaluations so far, provided the checkpoint was saved with
the same training and curriculum settings; `--overwrite_output_dir` starts from scratch instead (docs/errors.md lists
every check and how to recover). `--push_to_hub --hub_model_id you/name` pushes at the end.
"""

import json
import logging
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import AutoModel, AutoProcessor, GotOcr2ImageProcessorPil
from trl import ModelConfig, TrlParser, get_peft_config

from coconut.checkpoints import check_loaded_weights, check_weight_files, check_writable, write_training_record
from coconut.convert import build_generation_config, push_folder, require_coconut_checkpoint, save_repository
from coconut.data import image_token_counter, load_train_and_eval_splits, validate_dataset
from coconut.evaluation import CoconutEvalConfig, EvalResults, StageResult, evaluate_stage
from coconut.model_card import build_model_card, run_results, save_example_images
from coconut.preflight import check_script_sizes, with_demo_defaults
from coconut.sft_config import CoconutSFTConfig
from coconut.sft_trainer import CoconutSFTTrainer
from coconut.synthetic import SyntheticTaskConfig, build_synthetic_split, synthetic_tokenizer
from coconut.thought_scale import match_thought_scale
from coconut.tiny import tiny_coconut_config_for
from modeling_coconut_internvl import CoconutInternVLForConditionalGeneration
from processing_coconut_internvl import CoconutInternVLProcessor


logger = logging.getLogger(__name__)

# LoRA on the language model's projections only: the vision tower has modules with the same names (`mlp.*`).
LANGUAGE_MODEL_LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"

# `python train_sft.py` without arguments: the tiny model from scratch on the arrow-chase task, through every stage.
# Three epochs for each of stages 0-3, then the final stage (every step a thought) for the remaining eight; each stage
# restarts Adam with a warmup and decays the learning rate (peak 5e-4) to zero. docs/learning.md gives the evidence for
# each choice: at 1e-3 the final stage ended unconverged on some seeds (test accuracy 86-95 %).
DEMO_ARGS = [
    "--output_dir", "outputs/demo",
    "--dataset", "arrow_chase",
    "--synthetic_train_size", "2000",
    "--synthetic_validation_size", "100",
    "--synthetic_grid_size", "2",
    "--synthetic_max_hops", "3",
    "--method", "coconut",
    "--c_thought", "1",
    "--max_latent_stage", "3",
    "--epochs_per_stage", "3",
    "--num_train_epochs", "20",
    "--per_device_train_batch_size", "32",
    "--per_device_eval_batch_size", "100",
    "--learning_rate", "5e-4",
    "--lr_scheduler_type", "cosine",
    "--warmup_steps", "0.1",
    "--reset_optimizer", "true",
    "--logging_steps", "20",
    "--save_strategy", "no",
    "--bf16", "false",
    "--use_cpu", "true",
    "--report_to", "none",
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
            "help": "'chase' (one arrow per cell) or 'branching' (two arrows per cell, which of two cells can you "
            "reach? a board of at least 3 x 3).",
            "choices": ["chase", "branching"],
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


def tiny_model_and_processor(task: SyntheticTaskConfig, seed: int, embedding_std: float | None = None):
    """An InternVL-shaped model from scratch (Qwen2 text model, InternViT vision tower) and its processor.

    `embedding_std` re-initialises the token embeddings with that standard deviation (the config's
    `initializer_range`, 0.02, otherwise): at 1.0 a token embedding has the norm of the final norm's output, so a
    fed-back continuous thought and a token enter the first layer at the same scale (docs/learning.md).
    """
    tokenizer = synthetic_tokenizer(task)
    image_processor = GotOcr2ImageProcessorPil(
        size={"height": task.image_size, "width": task.image_size},
        crop_to_patches=False,
        image_mean=[0.5] * 3,
        image_std=[0.5] * 3,
    )
    # A 56 px image in 14 px patches is 4 x 4 patches; InternVL's pixel shuffle (0.5) leaves 2 x 2 tokens.
    config = tiny_coconut_config_for(
        tokenizer,
        image_size=task.image_size,
        text=dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4),
        vision=dict(hidden_size=64, intermediate_size=128),
    )
    processor = CoconutInternVLProcessor(image_processor, tokenizer, image_seq_length=config.image_seq_length)
    torch.manual_seed(seed)
    model = CoconutInternVLForConditionalGeneration(config)
    if embedding_std is not None:
        torch.nn.init.normal_(model.get_input_embeddings().weight, std=embedding_std)
    model.generation_config = build_generation_config(model, tokenizer)
    return model, processor


def load_splits(script_args: ScriptArguments, seed: int):
    """Training and validation records, and the synthetic task settings when the task is the bundled one."""
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
        return train, validation, task

    train, validation = load_train_and_eval_splits(
        script_args.dataset, script_args.train_split, script_args.eval_split, script_args.skip_invalid
    )
    return train, validation, None


def load_model_and_processor(model_args: ModelConfig):
    """A converted Coconut-InternVL repository (`convert_to_coconut.py`), with its remote code."""
    # A plain InternVL would otherwise fail on whatever its own processor or remote code needs (e.g. torchvision).
    require_coconut_checkpoint(model_args.model_name_or_path, revision=model_args.model_revision)
    model = AutoModel.from_pretrained(
        model_args.model_name_or_path,
        revision=model_args.model_revision,
        dtype=model_args.dtype,
        trust_remote_code=True,
        attn_implementation=model_args.attn_implementation,
    )
    processor = AutoProcessor.from_pretrained(
        model_args.model_name_or_path, revision=model_args.model_revision, trust_remote_code=True
    )
    check_loaded_weights(model, model_args.model_name_or_path)
    if getattr(model.config, "latent_token_id", None) is None:
        raise ValueError(
            f"{model_args.model_name_or_path!r} has no `latent_token_id`: convert the base InternVL checkpoint with "
            "`python convert_to_coconut.py` first."
        )
    return model, processor


def coconut_peft_config(model_args: ModelConfig, model):
    """TRL's LoRA config, on the language model only, with the latent tokens' embedding rows trainable."""
    if not model_args.use_peft:
        return None
    if model_args.lora_target_modules is None:
        model_args.lora_target_modules = LANGUAGE_MODEL_LORA_TARGETS
    peft_config = get_peft_config(model_args)
    ids = [model.config.start_latent_token_id, model.config.end_latent_token_id, model.config.latent_token_id]
    peft_config.trainable_token_indices = {"embed_tokens": [i for i in ids if i is not None]}
    return peft_config


def check_dataset_argument(script_args: ScriptArguments, model_args: ModelConfig):
    """`--dataset` is required (`with_demo_defaults` gives the demo's when no dataset, model or recipe is named), and
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


def check_lengths(train, processor, training_args: CoconutSFTConfig, skip_invalid: bool):
    """Every training record's longest curriculum example must fit `max_length`: the collator never cuts an answer.

    Too long records are an error naming them, or with `--skip_invalid` are dropped (the log says how many). Image
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


def describe_training(
    trainer: CoconutSFTTrainer, script_args: ScriptArguments, task, test: StageResult | None = None
) -> tuple[dict, str, list[dict]]:
    """What the saved model's `coconut_training.json` and card say: the stage reached, not the one planned, and the
    held-out test split's result as the table's last row."""
    args = trainer.args
    record = {**trainer.training_record(), "dataset": script_args.dataset, "task": asdict(task) if task else None}
    stopped = (
        f" It stopped at step {record['global_step']} of {record['planned_steps']} (`max_steps`)."
        if record["global_step"] < record["planned_steps"]
        else ""
    )
    text = (
        f"Trained by `train_sft.py` with the Coconut curriculum: method `{args.method}`, c_thought {args.c_thought}, "
        f"{args.epochs_per_stage} epochs per stage, max latent stage {args.max_latent_stage}, "
        f"{record['num_train_epochs']} epochs.{stopped} The saved model reached stage {record['stage']} and is "
        f"evaluated with up to {record['num_latent_thoughts']} continuous thoughts per question."
    )
    rows = [card_row(result.stage, result.metrics) for result in trainer.eval_results.results]
    if test is not None:
        rows.append(card_row(f"{test.stage}, held-out test ({len(test.predictions)} questions)", test.metrics))
    return record, text, rows


def card_row(stage: int | str, metrics: dict) -> dict:
    """One row of the card's evaluation table."""
    return {
        "stage": stage,
        "thoughts (max)": metrics.get("max_latent_thoughts", "-"),
        "accuracy": metrics["accuracy"],
        "generated tokens": metrics["mean_generated_tokens"],
    }


def evaluate_held_out_test(trainer: CoconutSFTTrainer, task: SyntheticTaskConfig, script_args: ScriptArguments):
    """The trained model on the bundled task's test split (questions in no other split), at the stage it reached."""
    args = trainer.args
    test = build_synthetic_split(script_args.synthetic_dir, "test", task)
    config = CoconutEvalConfig(
        stage=trainer.stage_reached,
        batch_size=args.per_device_eval_batch_size,
        max_new_tokens=args.eval_max_new_tokens,
        disable_tqdm=True,
    )
    model = trainer.accelerator.unwrap_model(trainer.model)
    return evaluate_stage(model, trainer.processing_class, test, args.curriculum, config, label="test")


def write_test_results(output_dir: Path, test: StageResult):
    """`eval_results.json` gains `"test"`; `test/` holds its predictions, table and plot."""
    EvalResults([test]).save(output_dir / "test")
    results_path = output_dir / "eval_results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    results["test"] = {"stage": test.stage, **test.metrics}
    results_path.write_text(json.dumps(results, indent=2) + "\n")


def main(script_args: ScriptArguments, training_args: CoconutSFTConfig, model_args: ModelConfig):
    # Logging
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    check_dataset_argument(script_args, model_args)
    check_writable(training_args.output_dir)  # before any training time is spent

    # Data
    train, validation, task = load_splits(script_args, training_args.seed)
    if validation is not None and script_args.max_eval_samples is not None:
        validation = validation.select(range(min(script_args.max_eval_samples, len(validation))))

    # Model
    if model_args.model_name_or_path is None:
        model, processor = tiny_model_and_processor(task, training_args.seed, script_args.tiny_embedding_std)
        base_model = None  # trained from scratch
    else:
        if Path(model_args.model_name_or_path).is_dir():
            check_weight_files(model_args.model_name_or_path)  # a truncated file, named
        model, processor = load_model_and_processor(model_args)
        base_model = model_args.model_name_or_path
    if script_args.match_thought_scale:
        logger.info(
            "Final norm rescaled by %.4g: thoughts at the scale of token embeddings", match_thought_scale(model)
        )
    train = check_lengths(train, processor, training_args, script_args.skip_invalid)

    # Train. Pushing happens at the end only: Trainer would create the Hub repository at construction.
    push_to_hub, training_args.push_to_hub = training_args.push_to_hub, False
    if push_to_hub and not training_args.hub_model_id:
        raise ValueError("`--push_to_hub` needs `--hub_model_id you/name`.")
    trainer = CoconutSFTTrainer(
        model=model,
        args=training_args,
        train_dataset=train,
        eval_dataset=validation,
        processing_class=processor,
        peft_config=coconut_peft_config(model_args, model),
    )
    trainer.train()  # resumes from --resume_from_checkpoint or the newest complete checkpoint of --output_dir
    logger.info("Trained %d steps on %d processes", trainer.state.global_step, trainer.accelerator.num_processes)

    # Save + model card
    output_dir = Path(training_args.output_dir)
    trainer.save_model(str(output_dir))
    if not trainer.accelerator.is_main_process:
        return trainer
    # Test: the final model on the bundled task's held-out test split (questions in no training or validation split)
    test = evaluate_held_out_test(trainer, task, script_args) if task is not None and task.test_size > 0 else None
    record, training_text, rows = describe_training(trainer, script_args, task, test)
    example = (validation if validation is not None else train)[0]  # the card's quick start asks its question
    validation_split = "validation" if task is not None else script_args.eval_split
    card = build_model_card(
        repo_id=training_args.hub_model_id or str(output_dir),
        base_model=base_model,
        license="apache-2.0",
        datasets=[script_args.dataset],
        num_latent_thoughts=record["num_latent_thoughts"] if training_args.curriculum.uses_markers else None,
        training=training_text,
        evaluation=rows,
        eval_results=run_results(script_args.dataset, validation_split, trainer.eval_results.results, test),
        example=example,
    )
    if model_args.use_peft:
        card.save(output_dir / "README.md")
        save_example_images(output_dir, example)
        write_training_record(output_dir, record)
        if script_args.merge_adapter:
            merged = trainer.model.merge_and_unload()
            save_repository(merged, processor, output_dir / "merged", card, example)
            write_training_record(output_dir / "merged", record)
    else:
        save_repository(trainer.accelerator.unwrap_model(trainer.model), processor, output_dir, card, example)
        write_training_record(output_dir, record)

    # Evaluate: the table of the evaluations after each stage (those before a resume included), then the test split
    eval_results = trainer.eval_results
    if eval_results.results:
        eval_results.save(output_dir)
        print(eval_results.markdown_table())
    if test is not None:
        write_test_results(output_dir, test)
        print(f"Held-out test split, {len(test.predictions)} questions:\n{EvalResults([test]).markdown_table()}")

    # Push (only at the end: the trainer itself never talks to the Hub)
    if push_to_hub:
        folder = output_dir / "merged" if model_args.use_peft and script_args.merge_adapter else output_dir
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
