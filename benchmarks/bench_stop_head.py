"""How many thoughts a question gets: the true count, padding to the maximum, or the stop head (`"auto"`).

    python -m benchmarks.bench_stop_head                  # seeds 0-2: CoT, Coconut with the stop head, 3 evaluations
    python -m benchmarks.bench_stop_head --seeds 3 4 5    # seeds the recipe was never tuned on
    python -m benchmarks.bench_stop_head -- --stop_loss_weight 0.5   # flags after `--` go to every Coconut run
    python -m benchmarks.bench_stop_head --task counted  # the positive control: the question gives the count

The task is the dot variant of the bundled arrow chase (`TASK_ARGS`): a 3 x 3 board with three dotted cells, and
"Start at B3 and follow the arrows until you reach a cell with a dot. Where do you stop?". The first dot is 2 to 6
arrows away, and the question does not say how many. Per seed, `python train_sft.py` (the embedded default's
arguments, `train_sft.DEMO_ARGS`, with `TASK_ARGS`) trains:

- `cot`: every step written (`COT_ARGS`), to convergence: the accuracy reachable with explicit reasoning;
- `coconut`: the curriculum from that CoT model at stage 1 (`CURRICULUM_ARGS`), with `--latent_stop_head`. The head
  learns from the blocks that replace all of a record's steps: the final stage, and at stage k the records with k steps.

The control (`--task counted`) is the embedded default's 2 x 2 chase with 1 to 3 arrows, whose question says how many
("follow 3 arrows"): one Coconut run with the stop head per seed, the whole curriculum from scratch as `python
train_sft.py` trains it. There the head can read the count, so `"auto"` should match the oracle's counts.

Then every Coconut model answers the task's held-out test split (500 questions in no training or validation split)
three ways, greedily, in this process, one evaluation at a time:

- `oracle`: each question gets its true count, min(arrows, max_latent_stage) thoughts (the final stage's prompt);
- `padded`: every question gets the most thoughts, `max_latent_stage`;
- `auto`: `generate(num_latent_thoughts="auto")`: the stop head decides each question's count.

Latency is the generation time per question (batches of `--batch_size`, the same for the three; `auto`'s includes
its planning forward). Training runs `--workers` at a time; the evaluations wait until every training has finished,
so that their timings are taken on an otherwise idle machine. A run whose folder holds a finished result with the
same arguments is read back, not trained again.

Writes `<output_dir>/bench_stop_head.json` (every run and evaluation). The last line printed is one JSON object: per
way of counting, the mean over seeds of accuracy, thoughts and latency, and the stop head's exact-count accuracy.
"""

import argparse
import json
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from benchmarks.bench_learning import run_training
from coconut.curriculum import CurriculumConfig, question_prompt
from coconut.data import load_record_images
from coconut.eval_config import CoconutEvalConfig
from coconut.eval_prompts import final_stage_thoughts
from coconut.evaluation import evaluate_stage
from coconut.loading import load_model_and_processor
from coconut.repository import read_training_record
from coconut.synthetic import SyntheticTaskConfig, build_synthetic_split, generate_puzzles, step
from train_sft import DEMO_ARGS


# The dot task: 2 to 6 arrows to the first dot on a 3 x 3 board (one image token per cell), 3000 training questions.
TASK_ARGS = [
    "--synthetic_variant", "dot",
    "--synthetic_grid_size", "3",
    "--synthetic_image_size", "84",
    "--synthetic_min_hops", "2",
    "--synthetic_max_hops", "6",
    "--synthetic_train_size", "3000",
    "--max_latent_stage", "6",
]  # fmt: skip
COT_ARGS = ["--num_train_epochs", "20"]
# Stages 1-6 two epochs each, then the final stage (all steps thoughts, the head's main lesson) for four.
CURRICULUM_ARGS = ["--start_stage", "1", "--epochs_per_stage", "2", "--num_train_epochs", "16", "--latent_stop_head", "true"]  # fmt: skip
# The positive control: the embedded default's 2 x 2 chase, whose question says the count ("follow 3 arrows"), with 1
# to 3 arrows, the whole curriculum from scratch as `python train_sft.py` trains it. The head can read the count.
COUNTED_TASK_ARGS = ["--synthetic_min_hops", "1", "--latent_stop_head", "true"]
WAYS = ("oracle", "padded", "auto")


def train_seed(
    seed: int, output_dir: Path, threads: int, task: str, extra_args: list[str], cot_dir: Path | None = None
) -> list[dict]:
    """The dot task: the CoT run of `seed`, then the Coconut run with the stop head that continues it. The counted
    control: one Coconut run with the stop head, from scratch."""
    if task == "counted":
        coconut = run_training("coconut", seed, output_dir, threads, [*DEMO_ARGS, *COUNTED_TASK_ARGS, *extra_args])
        print(f"coconut seed {seed}: test accuracy (true counts) {100 * coconut['accuracy']:.1f} %", flush=True)
        return [coconut]
    base = [*DEMO_ARGS, *TASK_ARGS]
    cot_dir = cot_dir or output_dir
    cot = run_training("cot", seed, cot_dir, threads, [*base, *COT_ARGS])
    print(f"cot seed {seed}: test accuracy {100 * cot['accuracy']:.1f} %", flush=True)
    cot_model = str(cot_dir / f"cot-seed{seed}")
    coconut = run_training(
        "coconut", seed, output_dir, threads, [*base, *CURRICULUM_ARGS, "--model_name_or_path", cot_model, *extra_args]
    )
    print(f"coconut seed {seed}: test accuracy (true counts) {100 * coconut['accuracy']:.1f} %", flush=True)
    return [cot, coconut]


def evaluate_three_ways(run_dir: Path, threads: int, batch_size: int) -> dict:
    """The held-out test split answered with the true counts, padded to the maximum, and with `"auto"`."""
    torch.set_num_threads(threads)
    record = read_training_record(run_dir)
    task = SyntheticTaskConfig(**record["task"])
    curriculum = CurriculumConfig(**record["curriculum"])
    records = list(build_synthetic_split(run_dir / "data", "test", task))
    model, processor = load_model_and_processor(str(run_dir))
    most = model.generation_config.max_latent_thoughts
    configs = {
        "oracle": CoconutEvalConfig(stage=curriculum.max_latent_stage + 1, batch_size=batch_size),
        "padded": CoconutEvalConfig(num_latent_thoughts=most, batch_size=batch_size),
        "auto": CoconutEvalConfig(num_latent_thoughts="auto", batch_size=batch_size),
    }
    true_counts = {record["id"]: final_stage_thoughts(record, curriculum) for record in records}
    results = {"stop_curves": stop_curves(model, processor, records, true_counts, batch_size)}
    if task.variant == "dot":
        results["incoming_arrow_baseline"] = incoming_arrow_baseline(task)
    for way, config in configs.items():
        config.disable_tqdm = True
        result = evaluate_stage(model, processor, records, curriculum, config, label=way)
        metrics = result.metrics
        by_count = {}
        for prediction in result.predictions:
            row = by_count.setdefault(str(true_counts[prediction.id]), {"accuracy": [], "thoughts": []})
            row["accuracy"].append(prediction.scores["accuracy"])
            row["thoughts"].append(prediction.num_latent_thoughts)
        results[way] = {
            "accuracy": metrics["accuracy"],
            "mean_thoughts": metrics["mean_latent_thoughts"],
            "ms_per_question": 1000 * metrics["seconds"] / metrics["num_samples"],
            "stop_accuracy": metrics.get("stop_accuracy"),
            "num_samples": metrics["num_samples"],
            "by_true_count": {
                count: {
                    "questions": len(row["accuracy"]),
                    "accuracy": statistics.mean(row["accuracy"]),
                    "mean_thoughts": statistics.mean(row["thoughts"]),
                }
                for count, row in sorted(by_count.items(), key=lambda item: int(item[0]))
            },
        }
        print(
            f"{run_dir.name} {way}: accuracy {100 * metrics['accuracy']:.1f} %, "
            f"{metrics['mean_latent_thoughts']:.2f} thoughts, {results[way]['ms_per_question']:.1f} ms/question",
            flush=True,
        )
    return results


def incoming_arrow_baseline(task: SyntheticTaskConfig) -> float:
    """Expected test accuracy of a reader that follows no arrow: pick at random among the dots that some neighbour's
    arrow points into. The answer always has one (the path enters it); a decoy has none about a third of the time."""
    size, scores = task.grid_size, []
    for puzzle in generate_puzzles("test", task):
        cells = [(row, column) for row in range(size) for column in range(size)]
        pointed_at = {step(cell, puzzle.board[cell[0]][cell[1]], size) for cell in cells}
        candidates = [dot for dot in puzzle.dots if dot in pointed_at]
        scores.append(1 / len(candidates) if puzzle.path[-1] in candidates else 0.0)
    return statistics.mean(scores)


@torch.no_grad()
def stop_curves(model, processor, records: list[dict], true_counts: dict, batch_size: int) -> dict:
    """The head's mean stop probability after each thought, by the question's true count: a head that reads the
    thoughts rises at each question's own count; one that learned only how often blocks end at each length (the
    hazard of the count distribution) draws the same curve for every count."""
    most = model.generation_config.max_latent_thoughts
    curves = {}
    for start in range(0, len(records), batch_size):
        batch = records[start : start + batch_size]
        texts = [question_prompt(record, processor) for record in batch]
        images = [load_record_images(record, index) for index, record in enumerate(batch)]
        inputs = processor(text=texts, images=images, return_tensors="pt", padding=True, padding_side="left")
        # The saved model runs the code it was trained with, which may predate `latent_stop_probabilities`: its forward.
        input_ids, attention_mask = model.append_latent_thoughts(inputs["input_ids"], inputs["attention_mask"], most)
        outputs = model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=inputs["pixel_values"],
                        logits_to_keep=1, use_cache=False)  # fmt: skip
        probabilities = torch.sigmoid(outputs.stop_logits[:, -most - 1 : -1])  # (B, most): at each `<|latent|>`
        for record, row in zip(batch, probabilities, strict=True):
            curves.setdefault(str(true_counts[record["id"]]), []).append(row)
    return {
        count: [round(value, 3) for value in torch.stack(rows).mean(dim=0).tolist()]
        for count, rows in sorted(curves.items(), key=lambda item: int(item[0]))
    }


def summarize(evaluations: dict[int, dict], cot_runs: list[dict]) -> dict:
    """Per way of counting: mean and sample standard deviation over seeds; the CoT ceiling; thoughts saved."""
    summary = {"seeds": sorted(evaluations)}
    for way in WAYS:
        rows = [evaluations[seed][way] for seed in sorted(evaluations)]
        accuracies = [100 * row["accuracy"] for row in rows]
        summary[way] = {
            "accuracy_mean": round(statistics.mean(accuracies), 2),
            "accuracy_std": round(statistics.stdev(accuracies), 2) if len(rows) > 1 else 0.0,
            "accuracy_per_seed": [round(accuracy, 1) for accuracy in accuracies],
            "thoughts_mean": round(statistics.mean(row["mean_thoughts"] for row in rows), 3),
            "ms_per_question_mean": round(statistics.mean(row["ms_per_question"] for row in rows), 2),
        }
    stop = [evaluations[seed]["auto"]["stop_accuracy"] for seed in sorted(evaluations)]
    if all(value is not None for value in stop):
        summary["auto"]["stop_accuracy_mean"] = round(100 * statistics.mean(stop), 2)
    summary["auto"]["fewer_thoughts_than_padded"] = round(
        1 - summary["auto"]["thoughts_mean"] / summary["padded"]["thoughts_mean"], 4
    )
    summary["auto"]["points_below_oracle"] = round(
        summary["oracle"]["accuracy_mean"] - summary["auto"]["accuracy_mean"], 2
    )
    baselines = [evaluations[seed].get("incoming_arrow_baseline") for seed in sorted(evaluations)]
    if all(value is not None for value in baselines):
        summary["incoming_arrow_baseline_per_seed"] = [round(100 * value, 1) for value in baselines]
    if cot_runs:
        summary["cot_accuracy_mean"] = round(100 * statistics.mean(run["accuracy"] for run in cot_runs), 2)
        summary["cot_accuracy_per_seed"] = [round(100 * run["accuracy"], 1) for run in cot_runs]
        # How often CoT's first written step (reading the start cell's arrow) is right: the perception it rests on.
        summary["cot_first_step_accuracy_per_seed"] = [round(100 * run["first_step_accuracy"], 1) for run in cot_runs]
    return summary


def markdown_table(summary: dict) -> str:
    names = {"oracle": "the true count (an oracle)", "padded": "padded to the maximum", "auto": '`"auto"` (stop head)'}
    lines = [
        "| thoughts | accuracy (%), mean ± std | per seed | mean thoughts | latency (ms / question) |",
        "|---|---|---|---|---|",
    ]
    for way in WAYS:
        row = summary[way]
        per_seed = " / ".join(f"{accuracy:.1f}" for accuracy in row["accuracy_per_seed"])
        lines.append(
            f"| {names[way]} | {row['accuracy_mean']:.1f} ± {row['accuracy_std']:.1f} | {per_seed} | "
            f"{row['thoughts_mean']:.2f} | {row['ms_per_question_mean']:.1f} |"
        )
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument(
        "--task", default="dot", choices=["dot", "counted"], help="The dot task, or the control whose count is given."
    )
    parser.add_argument("--output_dir", default=None, help="Default: outputs/bench_stop_head (dot) or _counted.")
    parser.add_argument(
        "--cot_dir",
        default=None,
        help="Folder of the CoT runs to continue (default: --output_dir): a variant can share another run's CoT models.",
    )
    parser.add_argument("--workers", type=int, default=2, help="Training runs at a time (one per CPU core).")
    parser.add_argument("--threads", type=int, default=1, help="Torch threads per run (fixed for reproducibility).")
    parser.add_argument("--batch_size", type=int, default=50, help="Questions generated together in the evaluations.")
    parser.add_argument("extra_args", nargs="*", help="Flags after `--`, added to every Coconut run.")
    args = parser.parse_args()
    for name in ("workers", "threads", "batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"`--{name}`={getattr(args, name)} must be at least 1.")
    output_dir = Path(args.output_dir or ("outputs/bench_stop_head" + ("_counted" if args.task == "counted" else "")))
    output_dir.mkdir(parents=True, exist_ok=True)

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=args.workers) as pool:
        cot_dir = Path(args.cot_dir) if args.cot_dir else None
        trained = pool.map(
            lambda seed: train_seed(seed, output_dir, args.threads, args.task, args.extra_args, cot_dir), args.seeds
        )
        runs = dict(zip(args.seeds, trained))
    training_minutes = (time.perf_counter() - start) / 60
    evaluations = {
        seed: evaluate_three_ways(output_dir / f"coconut-seed{seed}", args.threads, args.batch_size)
        for seed in args.seeds
    }
    summary = summarize(evaluations, [runs[seed][0] for seed in args.seeds if runs[seed][0]["method"] == "cot"])
    report = {
        "summary": summary,
        "evaluations": {str(seed): value for seed, value in evaluations.items()},
        "runs": [run for seed in args.seeds for run in runs[seed]],
        "training_minutes": round(training_minutes, 1),
        "minutes": round((time.perf_counter() - start) / 60, 1),
    }
    (output_dir / "bench_stop_head.json").write_text(json.dumps(report, indent=2) + "\n")
    print(markdown_table(summary))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
