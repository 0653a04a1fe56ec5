"""What continuous thoughts buy, on a task with headroom: CoT, No-CoT, w/o thought, pause as thought and Coconut.

    python -m benchmarks.bench_learning                              # 6 methods x 3 seeds on the headroom task
    python -m benchmarks.bench_learning --seeds 3 4 5                # seeds the recipe was never tuned on
    python -m benchmarks.bench_learning --methods cot coconut -- --synthetic_train_size 4000   # extra flags

The task is the bundled arrow chase on a 3 x 3 board (`TASK_ARGS`): the answer needs several look-ups in the image,
one per arrow, and a model that composes them in one forward pass has to do them all at once. Every run is
`python train_sft.py` with the embedded default's arguments (`train_sft.DEMO_ARGS`: the tiny model from scratch),
`TASK_ARGS`, the method's own flags (`METHOD_ARGS`), `--seed`, and the flags after `--` added to every run. The methods
are the paper's (Table 1 of Hao et al. 2024), with the recipe found for this task:

- `cot`: every reasoning step written, then the answer (`COT_ARGS`, trained to convergence);
- `no_cot`: the answer alone (the same epochs as `cot`);
- `coconut`: the curriculum, continued from the CoT model of the same seed at stage 1 (`--model_name_or_path <cot run>
  --start_stage 1`), with the stage lengths of `STAGE_ARGS` and step supervision (`STEP_SUPERVISION_ARGS`: a decoder
  reads the thoughts of each replaced step and must write it). Stage 0 of the curriculum is plain CoT, so it is
  trained once per seed, to convergence, and shared, as the reference code's GSM8k recipe loads a CoT checkpoint and
  resumes past stage 0;
- `pause_as_thought`: the same, with nothing fed back: the control for what the feedback adds;
- `no_thought` ("w/o thought"): the same stage lengths, the replaced steps dropped, nothing in their place;
- `coconut_plain`: the paper's recipe (`PLAIN_ARGS`: 3 epochs a stage, no step supervision), so the gain is visible.

The seed sets the model's initialisation, the data order and the training and validation questions. Each run ends
by answering the task's held-out test split (500 questions in no training or validation split) at its final stage,
greedily; each Coconut run is then answered again with its thoughts replaced (`evaluate.py --interventions`) and its
thoughts decoded (`--read_thoughts`). Each run uses `--threads` torch threads, so its numbers do not depend on
`--workers`. A run whose folder already holds a finished result with the same arguments is read back, not trained again.

Writes `<output_dir>/bench_learning.json` (every run, its accuracy by number of arrows, every stage's validation
result, the interventions and the reader), `bench_learning.png` (test accuracy against generated positions) and,
unless `--probe_seeds` is empty, the linear probe of the thoughts (`coconut/linear_probe.py`). The last line printed
is one JSON object: per method `accuracy_mean`, `accuracy_std` (sample standard deviation over seeds), `tokens_mean`
(generated text tokens), `thoughts_mean` (continuous thoughts or pause tokens in the prompt), `seeds`, for the Coconut
rows `interventions` (mean accuracy, %, unchanged and under each) and `reader_right_cell` (%), and for Coconut
`welch_p`: Welch's t-test p-value of Coconut's accuracies against each other method's.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path

from scipy.stats import ttest_ind

from coconut.synthetic import SyntheticTaskConfig, generate_puzzles, puzzle_record
from evaluate import write_thought_sections
from train_sft import DEMO_ARGS


ROOT = Path(__file__).resolve().parents[1]
METHODS = ("cot", "no_cot", "no_thought", "pause_as_thought", "coconut", "coconut_plain")
CURRICULUM_METHODS = ("coconut", "coconut_plain", "pause_as_thought", "no_thought")
NAMES = {
    "cot": "CoT",
    "no_cot": "No-CoT",
    "no_thought": "w/o thought",
    "pause_as_thought": "pause as thought (step-supervised)",
    "coconut": "Coconut (step-supervised)",
    "coconut_plain": "Coconut, the paper's recipe",
}
# The task with headroom: a 3 x 3 board (one image token per cell), 2 to 4 arrows.
TASK_ARGS = [
    "--synthetic_grid_size", "3",
    "--synthetic_image_size", "84",
    "--synthetic_min_hops", "2",
    "--synthetic_max_hops", "4",
    "--synthetic_train_size", "3000",
    "--eval_max_new_tokens", "64",
    "--max_latent_stage", "4",
]  # fmt: skip
# CoT and No-CoT: one learning-rate schedule over all epochs.
COT_ARGS = ["--num_train_epochs", "20"]
# The curriculum continues the CoT model of the same seed at stage 1, through stages 1..max_latent_stage, then the
# final stage. The paper's recipe: 3 epochs a stage, each stage with a fresh Adam and schedule.
PLAIN_ARGS = ["--start_stage", "1", "--epochs_per_stage", "3", "--num_train_epochs", "16"]
# The recipe found on seed 0 (docs/learning.md): the stage lengths, and the step decoder for the methods with thoughts.
STAGE_ARGS = ["--start_stage", "1", "--epochs_per_stage", "3", "--num_train_epochs", "24"]
STEP_SUPERVISION_ARGS = ["--step_supervision", "true", "--step_loss_normalization", "token"]
# Per method: train_sft.py's `--method` and the method's own flags.
METHOD_ARGS = {
    "cot": ("cot", COT_ARGS),
    "no_cot": ("no_cot", COT_ARGS),
    "no_thought": ("no_thought", STAGE_ARGS),
    "pause_as_thought": ("pause_as_thought", [*STAGE_ARGS, *STEP_SUPERVISION_ARGS]),
    "coconut": ("coconut", [*STAGE_ARGS, *STEP_SUPERVISION_ARGS]),
    "coconut_plain": ("coconut", PLAIN_ARGS),
}
# The causal test of each Coconut run's thoughts (`evaluate.py --interventions`), on its held-out test split.
INTERVENTIONS = ("zero", "noise", "shuffle", "other_board")


def run_training(method: str, seed: int, output_dir: Path, threads: int, args: list[str]) -> dict:
    """One `train_sft.py` run (or its earlier result, when its folder holds one with the same arguments)."""
    run_dir = output_dir / f"{method}-seed{seed}"
    args = [
        *args,
        "--method", METHOD_ARGS[method][0],
        "--seed", str(seed),
        "--output_dir", str(run_dir),
        "--synthetic_dir", str(run_dir / "data"),  # runs at the same time must not share image files
        "--disable_tqdm", "true",
    ]  # fmt: skip
    record_path = run_dir / "bench_run.json"
    if record_path.is_file():
        earlier = json.loads(record_path.read_text())
        if earlier["args"] == args:
            return earlier
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    for checkpoint in run_dir.glob("checkpoint-*"):  # train_sft.py would resume an earlier run's checkpoints
        shutil.rmtree(checkpoint)
    start = time.perf_counter()
    completed = subprocess.run(
        [sys.executable, "train_sft.py", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    seconds = time.perf_counter() - start
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "train.log").write_text(completed.stdout + completed.stderr)
    if completed.returncode != 0:
        raise RuntimeError(
            f"{method} seed {seed} failed (exit code {completed.returncode}); the end of its log "
            f"({run_dir / 'train.log'}):\n{completed.stderr[-3000:]}"
        )
    run = read_run(method, seed, run_dir, args, seconds, env)
    record_path.write_text(json.dumps(run, indent=2) + "\n")
    return run


def read_run(method: str, seed: int, run_dir: Path, args: list[str], seconds: float, env: dict) -> dict:
    """The record of a finished run in `run_dir`: its test results, by number of arrows, every stage's validation,
    and for a Coconut run the thought tests."""
    results = json.loads((run_dir / "eval_results.json").read_text())
    test = results["test"]
    predictions = [json.loads(line) for line in (run_dir / "test" / "predictions_test.jsonl").open()]
    run = {
        "method": method,
        "seed": seed,
        "accuracy": test["accuracy"],
        "tokens": test["mean_generated_tokens"],
        "thoughts": statistics.mean(prediction["num_latent_thoughts"] for prediction in predictions),
        "num_test_questions": test["num_samples"],
        "final_stage": test["stage"],
        **accuracy_by_hops(run_dir, predictions),
        "validation": [
            {"stage": row["stage"], "accuracy": row["metrics"]["accuracy"]} for row in results.get("stages", [])
        ],
        "seconds": seconds,
        "args": args,
    }
    if METHOD_ARGS[method][0] == "coconut":
        run.update(thought_tests(run_dir, env))
    return run


def thought_tests(run_dir: Path, env: dict) -> dict:
    """The causal test and the thought reader of a Coconut run, on its held-out test split (`evaluate.py`)."""
    eval_dir = run_dir / "thought_tests"
    command = [
        sys.executable, "evaluate.py", "--model", str(run_dir), "--split", "test", "--data_dir", str(run_dir / "data"),
        "--output_dir", str(eval_dir), "--interventions", *INTERVENTIONS, "--read_thoughts", "true",
        "--disable_tqdm", "true",
    ]  # fmt: skip
    completed = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    (run_dir / "thought_tests.log").write_text(completed.stdout + completed.stderr)
    if completed.returncode != 0:
        raise RuntimeError(f"evaluate.py failed on {run_dir}; its log: {run_dir / 'thought_tests.log'}")
    results = json.loads((eval_dir / "eval_results.json").read_text())
    write_thought_sections(run_dir / "README.md", results, results["overall"]["accuracy"])  # the run's card
    reader = results["thought_reader"]
    return {
        "interventions": {"unchanged": results["overall"]["accuracy"], **results["interventions"]},
        "reader_right_cell": reader["right_cell"],
        "reader_right_cell_by_step": reader["right_cell_by_step"],
        "reader_decoder": reader["decoder"],
        "reader_examples": reader["examples"],
    }


def accuracy_by_hops(run_dir: Path, predictions: list[dict]) -> dict:
    """Test accuracy by number of arrows, and how often the first written step is the right one (when one is)."""
    task = json.loads((run_dir / "coconut_training.json").read_text())["task"]
    puzzles = generate_puzzles("test", SyntheticTaskConfig(**task))
    by_hops, first_step = {}, []
    for prediction in predictions:
        record = puzzle_record(puzzles[int(prediction["id"].rsplit("-", 1)[1])], prediction["id"], "")
        by_hops.setdefault(str(len(record["steps"])), []).append(prediction["scores"]["accuracy"])
        written = prediction["generation"].strip().splitlines()
        if prediction["num_latent_thoughts"] == 0 and written and not written[0].startswith("###"):
            first_step.append(written[0].strip() == record["steps"][0])
    return {
        "accuracy_by_hops": {
            hops: statistics.mean(scores) for hops, scores in sorted(by_hops.items(), key=lambda x: int(x[0]))
        },
        "first_step_accuracy": statistics.mean(first_step) if first_step else None,
    }


def run_all(jobs: list[tuple[str, int]], output_dir: Path, threads: int, workers: int, extra_args: list[str]):
    """Run `jobs` (method, seed) on `workers` at a time; a curriculum run starts once its seed's CoT run is done."""
    base = [*DEMO_ARGS, *TASK_ARGS]
    done, runs = {}, []
    pending = list(jobs)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        running = {}
        while pending or running:
            for method, seed in list(pending):
                if len(running) == workers:
                    break
                args = [*base, *METHOD_ARGS[method][1]]
                if method in CURRICULUM_METHODS:
                    if ("cot", seed) not in done:
                        continue
                    args += ["--model_name_or_path", str(output_dir / f"cot-seed{seed}")]
                pending.remove((method, seed))
                future = pool.submit(run_training, method, seed, output_dir, threads, [*args, *extra_args])
                running[future] = (method, seed)
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                method, seed = running.pop(future)
                run = future.result()
                done[method, seed] = run
                runs.append(run)
                hops = " / ".join(f"{100 * accuracy:.0f}" for accuracy in run["accuracy_by_hops"].values())
                print(
                    f"{run['method']:>16} seed {run['seed']}: test accuracy {100 * run['accuracy']:.1f} % "
                    f"(by arrows {hops}), {run['tokens']:.1f} tokens, {run['seconds']:.0f} s",
                    flush=True,
                )
    return runs


def summarize(runs: list[dict], methods: list[str]) -> dict:
    """Per method: mean and sample standard deviation of the test accuracy over seeds, mean tokens and thoughts, the
    accuracy by number of arrows; Coconut's Welch p-value against each other method."""
    summary = {}
    for method in methods:
        own = sorted((run for run in runs if run["method"] == method), key=lambda run: run["seed"])
        accuracies = [100 * run["accuracy"] for run in own]
        hops = sorted({hops for run in own for hops in run["accuracy_by_hops"]}, key=int)
        first_steps = [run["first_step_accuracy"] for run in own if run["first_step_accuracy"] is not None]
        summary[method] = {
            "accuracy_mean": round(statistics.mean(accuracies), 2),
            "accuracy_std": round(statistics.stdev(accuracies), 2) if len(accuracies) > 1 else 0.0,
            "tokens_mean": round(statistics.mean(run["tokens"] for run in own), 2),
            "thoughts_mean": round(statistics.mean(run["thoughts"] for run in own), 2),
            "seeds": [run["seed"] for run in own],
            "accuracy_per_seed": [round(accuracy, 1) for accuracy in accuracies],
            "accuracy_by_hops": {
                h: round(100 * statistics.mean(run["accuracy_by_hops"][h] for run in own), 1) for h in hops
            },
            "first_step_accuracy": round(100 * statistics.mean(first_steps), 1) if first_steps else None,
        }
        if all("interventions" in run for run in own) and own:
            names = own[0]["interventions"]
            summary[method]["interventions"] = {
                name: round(100 * statistics.mean(run["interventions"][name] for run in own), 1) for name in names
            }
            summary[method]["reader_right_cell"] = round(
                100 * statistics.mean(run["reader_right_cell"] or 0 for run in own), 1
            )
    if "coconut" in summary:
        coconut = summary["coconut"]["accuracy_per_seed"]
        summary["coconut"]["welch_p"] = {
            other: welch_p(coconut, row["accuracy_per_seed"]) for other, row in summary.items() if other != "coconut"
        }
    return summary


def welch_p(first: list[float], second: list[float]) -> float | None:
    """Two-sided Welch's t-test p-value; None when it is undefined (fewer than two seeds, or no variance at all)."""
    if len(first) < 2 or len(second) < 2:
        return None
    p = ttest_ind(first, second, equal_var=False).pvalue
    return None if p != p else round(float(p), 5)  # NaN when both sides are constant


def markdown_table(summary: dict) -> str:
    hops = sorted({h for row in summary.values() for h in row["accuracy_by_hops"]}, key=int)
    lines = [
        "| method | test accuracy (%), mean ± std | per seed | by arrows " + " / ".join(map(str, hops))
        + " | generated tokens | thoughts / pauses | Coconut vs it, Welch p |",
        "|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    welch = summary.get("coconut", {}).get("welch_p", {})
    for method, row in summary.items():
        per_seed = " / ".join(f"{accuracy:.1f}" for accuracy in row["accuracy_per_seed"])
        by_hops = " / ".join(f"{row['accuracy_by_hops'].get(h, float('nan')):.1f}" for h in hops)
        p = welch.get(method)
        lines.append(
            f"| {NAMES[method]} | {row['accuracy_mean']:.1f} ± {row['accuracy_std']:.1f} | {per_seed} | {by_hops} | "
            f"{row['tokens_mean']:.1f} | {row['thoughts_mean']:.1f} | {'-' if p is None else f'{p:.3g}'} |"
        )
    return "\n".join(lines)


def thought_table(summary: dict) -> str:
    """Accuracy under each intervention and the thought reader's score, for the methods that have them."""
    rows = {method: row for method, row in summary.items() if "interventions" in row}
    if not rows:
        return ""
    names = list(next(iter(rows.values()))["interventions"])
    lines = [
        "| method | " + " | ".join(names) + " | thoughts read as the right cell (%) |",
        "|---|" + "---|" * (len(names) + 1),
    ]
    for method, row in rows.items():
        values = " | ".join(f"{row['interventions'][name]:.1f}" for name in names)
        lines.append(f"| {NAMES[method]} | {values} | {row['reader_right_cell']:.1f} |")
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


def run_probe(output_dir: Path, seeds: list[int], methods: list[str]) -> dict:
    """The linear probe of thought k (the cell after k arrows) for Coconut and pause as thought, per seed."""
    from coconut.linear_probe import markdown_table as probe_table
    from coconut.linear_probe import probe_model

    probes = {}
    for seed in seeds:
        results = {
            NAMES[method]: probe_model(output_dir / f"{method}-seed{seed}", output_dir / "probe_data")
            for method in ("coconut", "pause_as_thought", "coconut_plain")
            if method in methods
        }
        probes[seed] = results
        print(f"Linear probe, seed {seed}:\n{probe_table(results)}", flush=True)
    return probes


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--output_dir", default="outputs/bench_learning")
    parser.add_argument("--workers", type=int, default=2, help="Training runs at a time (one per CPU core).")
    parser.add_argument("--threads", type=int, default=1, help="Torch threads per run (fixed for reproducibility).")
    parser.add_argument(
        "--probe_seeds", nargs="*", type=int, default=[0], help="Seeds whose thoughts are probed (none: no probe)."
    )
    parser.add_argument("extra_args", nargs="*", help="Flags after `--`, added to every train_sft.py run.")
    args = parser.parse_args()
    if args.workers < 1 or args.threads < 1:
        raise ValueError(f"`--workers`={args.workers} and `--threads`={args.threads} must be at least 1.")
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)

    # CoT first (the curriculum runs continue from it) and No-CoT (the headroom rests on it), then the slowest runs.
    order = ("cot", "no_cot", "coconut", "pause_as_thought", "coconut_plain", "no_thought")
    needed = set(args.methods) | ({"cot"} if set(args.methods) & set(CURRICULUM_METHODS) else set())
    jobs = [(method, seed) for method in order if method in needed for seed in args.seeds]
    start = time.perf_counter()
    runs = run_all(jobs, output_dir, args.threads, args.workers, args.extra_args)
    seconds = time.perf_counter() - start

    methods = [method for method in METHODS if method in needed]
    summary = summarize(runs, methods)
    table = markdown_table(summary)
    task = " ".join([*TASK_ARGS[:8], *args.extra_args])
    title = f"arrow chase ({task}), {len(args.seeds)} seeds, {runs[0]['num_test_questions']} held-out questions"
    plot(summary, output_dir / "bench_learning.png", title)
    probe_seeds = [seed for seed in args.probe_seeds if seed in args.seeds]
    probes = run_probe(output_dir, probe_seeds, methods) if probe_seeds else {}
    record = {
        "summary": summary,
        "runs": runs,
        "probe": probes,
        "seconds": seconds,
        "workers": args.workers,
        "threads_per_run": args.threads,
        "train_sft_args": {
            method: [*DEMO_ARGS, *TASK_ARGS, "--method", name, *own, *args.extra_args]
            for method, (name, own) in METHOD_ARGS.items()
            if method in methods
        },
    }
    (output_dir / "bench_learning.json").write_text(json.dumps(record, indent=2) + "\n")
    print(table)
    if thought_table(summary):
        print(f"Test accuracy (%) with the thoughts replaced, and the thought reader:\n{thought_table(summary)}")
    print(
        f"{len(runs)} runs in {seconds / 60:.1f} min ({args.workers} at a time, {args.threads} thread(s) each); "
        f"wrote {output_dir / 'bench_learning.json'} and {output_dir / 'bench_learning.png'}"
    )
    keys = (
        "accuracy_mean", "accuracy_std", "tokens_mean", "thoughts_mean", "seeds", "welch_p", "interventions",
        "reader_right_cell",
    )  # fmt: skip
    print(json.dumps({method: {key: row[key] for key in keys if key in row} for method, row in summary.items()}))


if __name__ == "__main__":
    main()
