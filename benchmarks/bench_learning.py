"""What continuous thoughts buy: CoT, no-CoT, w/o thought, pause as thought and Coconut, several seeds each.

    python -m benchmarks.bench_learning                            # 5 methods x 3 seeds, the embedded default's recipe
    python -m benchmarks.bench_learning --seeds 0 1 2 3 4 --workers 1
    python -m benchmarks.bench_learning --methods coconut cot -- --num_train_epochs 24   # extra train_sft.py flags

Every run is `python train_sft.py` with the embedded default's arguments (`train_sft.DEMO_ARGS`: the tiny model from
scratch on the bundled arrow-chase task), `--method` and `--seed` changed, and the flags after `--` added. The seed
sets the model's initialisation, the data order and the task's training and validation questions. Each run ends by
answering the task's held-out test split (500 questions, none of them in any training or validation split, see
`coconut/synthetic.py`) at its final stage, greedily; this script reads that result from the run's
`eval_results.json` ("test"). The methods are the paper's (Table 1 of Hao et al. 2024):

- `cot`: every reasoning step written, then the answer;
- `no_cot`: the answer alone;
- `no_thought` ("w/o thought"): the curriculum removes steps as Coconut's does, with nothing in their place;
- `pause_as_thought`: the curriculum with `<|latent|>` as learned pause tokens (no hidden state fed back);
- `coconut`: the curriculum with continuous thoughts.

All methods train for the same number of epochs on the same records. Each run uses `--threads` torch threads
(OMP_NUM_THREADS), so its numbers do not depend on `--workers`, the number of runs at a time. Writes
`<output_dir>/bench_learning.json` (every run, every stage's validation result) and `bench_learning.png` (test
accuracy against generated tokens, mean and standard deviation over seeds). The last line printed is one JSON
object: per method `accuracy_mean`, `accuracy_std` (sample standard deviation over seeds), `tokens_mean` (generated
text tokens), `thoughts_mean` (continuous thoughts or pause tokens in the prompt) and `seeds`.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from train_sft import DEMO_ARGS


ROOT = Path(__file__).resolve().parents[1]
METHODS = ("cot", "no_cot", "no_thought", "pause_as_thought", "coconut")
NAMES = {
    "cot": "CoT",
    "no_cot": "No-CoT",
    "no_thought": "w/o thought",
    "pause_as_thought": "pause as thought",
    "coconut": "Coconut",
}


def run_training(method: str, seed: int, output_dir: Path, threads: int, extra_args: list[str]) -> dict:
    """One `train_sft.py` run; returns its test result, its validation results per stage and its wall time."""
    run_dir = output_dir / f"{method}-seed{seed}"
    args = [
        *DEMO_ARGS,
        "--method", method,
        "--seed", str(seed),
        "--output_dir", str(run_dir),
        "--synthetic_dir", str(run_dir / "data"),  # runs at the same time must not share image files
        "--disable_tqdm", "true",
        *extra_args,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    completed = subprocess.run(
        [sys.executable, "train_sft.py", *args], cwd=ROOT, env=env, capture_output=True, text=True
    )
    seconds = time.perf_counter() - start
    (run_dir / "train.log").parent.mkdir(parents=True, exist_ok=True)
    (run_dir / "train.log").write_text(completed.stdout + completed.stderr)
    if completed.returncode != 0:
        raise RuntimeError(
            f"{method} seed {seed} failed (exit code {completed.returncode}); the end of its log "
            f"({run_dir / 'train.log'}):\n{completed.stderr[-3000:]}"
        )
    results = json.loads((run_dir / "eval_results.json").read_text())
    test = results["test"]
    thoughts = [
        json.loads(line)["num_latent_thoughts"] for line in (run_dir / "test" / "predictions_test.jsonl").open()
    ]
    return {
        "method": method,
        "seed": seed,
        "accuracy": test["accuracy"],
        "tokens": test["mean_generated_tokens"],
        "thoughts": statistics.mean(thoughts),
        "num_test_questions": test["num_samples"],
        "final_stage": test["stage"],
        "validation": [
            {"stage": row["stage"], "accuracy": row["metrics"]["accuracy"]} for row in results.get("stages", [])
        ],
        "seconds": seconds,
    }


def summarize(runs: list[dict], methods: list[str]) -> dict:
    """Per method: mean and sample standard deviation of the test accuracy over seeds, mean tokens and thoughts."""
    summary = {}
    for method in methods:
        own = sorted((run for run in runs if run["method"] == method), key=lambda run: run["seed"])
        accuracies = [100 * run["accuracy"] for run in own]
        summary[method] = {
            "accuracy_mean": round(statistics.mean(accuracies), 2),
            "accuracy_std": round(statistics.stdev(accuracies), 2) if len(accuracies) > 1 else 0.0,
            "tokens_mean": round(statistics.mean(run["tokens"] for run in own), 2),
            "thoughts_mean": round(statistics.mean(run["thoughts"] for run in own), 2),
            "seeds": [run["seed"] for run in own],
            "accuracy_per_seed": [round(accuracy, 1) for accuracy in accuracies],
        }
    return summary


def markdown_table(summary: dict) -> str:
    lines = [
        "| method | test accuracy (%), mean ± std | per seed | generated tokens | continuous thoughts / pauses |",
        "|---|---|---|---|---|",
    ]
    for method, row in summary.items():
        per_seed = " / ".join(f"{accuracy:.1f}" for accuracy in row["accuracy_per_seed"])
        lines.append(
            f"| {NAMES[method]} | {row['accuracy_mean']:.1f} ± {row['accuracy_std']:.1f} | {per_seed} | "
            f"{row['tokens_mean']:.1f} | {row['thoughts_mean']:.1f} |"
        )
    return "\n".join(lines)


def plot(summary: dict, path: Path, title: str):
    """Test accuracy against the positions generated after the question (text tokens + thoughts or pauses): mean and
    one standard deviation per method, each seed a small dot; methods at the same x are drawn side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.4, 4.2))
    positions = {method: row["tokens_mean"] + row["thoughts_mean"] for method, row in summary.items()}
    for method, row in summary.items():
        same_x = [other for other in summary if abs(positions[other] - positions[method]) < 0.5]
        x = positions[method] + 0.6 * (same_x.index(method) - (len(same_x) - 1) / 2)
        line = axis.errorbar(
            x, row["accuracy_mean"], yerr=row["accuracy_std"], fmt="o", capsize=4, label=NAMES[method], zorder=3
        )
        seeds = row["accuracy_per_seed"]
        axis.plot([x] * len(seeds), seeds, ".", color=line[0].get_color(), alpha=0.45, zorder=2)
    axis.set_xlabel("positions generated per question: text tokens + continuous thoughts (or pauses)")
    axis.set_ylabel("test accuracy (%)")
    axis.set_ylim(0, 105)
    axis.set_xlim(0, max(positions.values()) + 2)
    axis.set_title(title, fontsize=9)
    axis.grid(alpha=0.3)
    axis.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--output_dir", default="outputs/bench_learning")
    parser.add_argument("--workers", type=int, default=2, help="Training runs at a time (one per CPU core).")
    parser.add_argument("--threads", type=int, default=1, help="Torch threads per run (fixed for reproducibility).")
    parser.add_argument("extra_args", nargs="*", help="Flags after `--`, added to every train_sft.py run.")
    args = parser.parse_args()
    if args.workers < 1 or args.threads < 1:
        raise ValueError(f"`--workers`={args.workers} and `--threads`={args.threads} must be at least 1.")
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)

    # The slowest runs first (CoT writes the longest sequences, Coconut makes the most passes), so that the workers
    # finish together.
    slowest_first = ("cot", "coconut", "pause_as_thought", "no_thought", "no_cot")
    jobs = [(method, seed) for method in slowest_first if method in args.methods for seed in args.seeds]
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=args.workers) as pool:
        futures = [
            pool.submit(run_training, method, seed, output_dir, args.threads, args.extra_args) for method, seed in jobs
        ]
        runs = []
        for future in futures:
            run = future.result()
            runs.append(run)
            print(
                f"{run['method']:>16} seed {run['seed']}: test accuracy {100 * run['accuracy']:.1f} % "
                f"({run['num_test_questions']} questions), {run['tokens']:.1f} tokens, {run['seconds']:.0f} s",
                flush=True,
            )
    seconds = time.perf_counter() - start

    methods = [method for method in METHODS if method in args.methods]
    summary = summarize(runs, methods)
    table = markdown_table(summary)
    task = " ".join(args.extra_args) or "the embedded default's task"
    title = f"arrow chase ({task}), {len(args.seeds)} seeds, {runs[0]['num_test_questions']} held-out test questions"
    plot(summary, output_dir / "bench_learning.png", title)
    record = {
        "summary": summary,
        "runs": runs,
        "seconds": seconds,
        "workers": args.workers,
        "threads_per_run": args.threads,
        "train_sft_args": [*DEMO_ARGS, *args.extra_args],
    }
    (output_dir / "bench_learning.json").write_text(json.dumps(record, indent=2) + "\n")
    print(table)
    print(
        f"{len(runs)} runs in {seconds / 60:.1f} min ({args.workers} at a time, {args.threads} thread(s) each); "
        f"wrote {output_dir / 'bench_learning.json'} and {output_dir / 'bench_learning.png'}"
    )
    print(
        json.dumps(
            {
                method: {
                    key: row[key] for key in ("accuracy_mean", "accuracy_std", "tokens_mean", "thoughts_mean", "seeds")
                }
                for method, row in summary.items()
            }
        )
    )


if __name__ == "__main__":
    main()
