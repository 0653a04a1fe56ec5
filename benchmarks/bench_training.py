"""Training throughput on the learning benchmark's task, where each part of a training step goes, side by side.

    python -m benchmarks.bench_training                 # the 3 x 3 arrow chase, final stage, 32 samples a step
    python -m benchmarks.bench_training --stage 2 --batches 12

One training step of `train_sft.py` on the task of `benchmarks/bench_learning.py` (the tiny model from scratch), split
into its parts, each the median over `--batches` batches of one epoch's order:
- the collator building a batch from the records, without and with its per-record cache (record rows decoded from
  the Arrow table and their chat prompts: the first epoch fills it, every later epoch reads it);
- forward and backward of the latent passes, without and with the step decoder (`--step_supervision`);
- tokens per sample and language-model passes per step.
The variants alternate batch by batch, so load from other processes hits each alike. The last line printed is one
JSON object.
"""

import argparse
import json
import statistics
import tempfile
import time

import torch

from benchmarks.bench_learning import TASK_ARGS
from coconut.collator import CoconutDataCollator
from coconut.curriculum import CurriculumConfig
from coconut.step_supervision import build_thought_decoder, step_supervision_loss
from coconut.synthetic import SyntheticTaskConfig, build_synthetic_split
from coconut.tiny import tiny_model_and_processor


STEP_KEYS = ("step_thought_index", "step_input_ids", "step_attention_mask")


def task_from_args(records: int) -> SyntheticTaskConfig:
    flags = dict(zip(TASK_ARGS[::2], TASK_ARGS[1::2], strict=True))
    return SyntheticTaskConfig(
        grid_size=int(flags["--synthetic_grid_size"]),
        image_size=int(flags["--synthetic_image_size"]),
        min_hops=int(flags["--synthetic_min_hops"]),
        max_hops=int(flags["--synthetic_max_hops"]),
        train_size=records,
        validation_size=16,
        test_size=16,
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--stage", type=int, default=5, help="Curriculum stage (5: the final one, every step a thought)."
    )
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    task = task_from_args(args.batch_size * args.batches)
    with tempfile.TemporaryDirectory() as folder:
        records = build_synthetic_split(folder, "train", task)
        model, processor = tiny_model_and_processor(task, seed=0)
        model.train()
        curriculum = CurriculumConfig(method="coconut", max_latent_stage=4)
        collator = CoconutDataCollator(processor, records, curriculum, step_supervision=True)
        decoder = build_thought_decoder(model)
        batches = [
            [{"epoch": 0, "sample": args.batch_size * b + i, "stage": args.stage} for i in range(args.batch_size)]
            for b in range(args.batches)
        ]
        times = {"collate_uncached": [], "collate_cached": [], "step_plain": [], "step_supervised": []}
        collator(batches[0])  # warm-up
        tokens, passes = [], []
        for features in batches:
            collator.cache.clear()
            start = time.perf_counter()
            collator(features)
            times["collate_uncached"].append(time.perf_counter() - start)
            start = time.perf_counter()
            batch = collator(features)  # every record now in the cache
            times["collate_cached"].append(time.perf_counter() - start)
            tokens.append(int(batch["attention_mask"].sum()) / args.batch_size)
            latent = batch["input_ids"] == model.config.latent_token_id
            passes.append(int(latent.any(dim=0).sum()) + 1)
            inputs = {key: value for key, value in batch.items() if key not in STEP_KEYS}
            for name in ("step_plain", "step_supervised"):
                start = time.perf_counter()
                outputs = model(**inputs, output_hidden_states=name == "step_supervised")
                loss = outputs.loss
                if name == "step_supervised":
                    step_batch = [batch[key] for key in STEP_KEYS]
                    hidden = outputs.hidden_states[-1]
                    loss = loss + step_supervision_loss(decoder, model.get_input_embeddings(), hidden, *step_batch)
                loss.backward()
                times[name].append(time.perf_counter() - start)
                model.zero_grad(set_to_none=True)
                decoder.zero_grad(set_to_none=True)
    medians = {name: statistics.median(values) for name, values in times.items()}
    per_second = {name: args.batch_size / seconds for name, seconds in medians.items()}
    result = {
        "stage": args.stage,
        "batch_size": args.batch_size,
        "tokens_per_sample": round(statistics.mean(tokens), 1),
        "passes_per_step": statistics.mean(passes),
        "samples_per_second": {name: round(value, 1) for name, value in per_second.items()},
        "collator_cache_speedup": round(medians["collate_uncached"] / medians["collate_cached"], 2),
        "step_decoder_cost": round(medians["step_supervised"] / medians["step_plain"], 2),
        "step_samples_per_second": {
            "before (uncached collator, no decoder)": round(
                args.batch_size / (medians["collate_uncached"] + medians["step_plain"]), 1
            ),
            "after (cached collator, no decoder)": round(
                args.batch_size / (medians["collate_cached"] + medians["step_plain"]), 1
            ),
            "after, with the step decoder": round(
                args.batch_size / (medians["collate_cached"] + medians["step_supervised"]), 1
            ),
        },
    }
    for name, value in per_second.items():
        print(f"{name:>18}: {value:8.1f} samples/s ({1000 * medians[name]:.0f} ms a batch of {args.batch_size})")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
