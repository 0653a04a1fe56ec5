"""Linear probe: does the k-th continuous thought hold the cell reached after k arrows?

The paper reads continuous thoughts as reasoning states (Hao et al. 2024, section 5). On the bundled arrow-chase task
the state after k reasoning steps is a cell of the board, so this is measured directly: a multinomial logistic
regression (one linear layer) is fitted on the vectors of thought k of training questions, to predict the cell after
k arrows, and scored on the held-out test questions. The same probe on a pause-as-thought model reads the states at
its pause positions, where nothing is fed back; chance is the most frequent training cell.

The vector of thought k (k = 1, 2, ...) is the one fed at the k-th `<|latent|>` position: the final-layer hidden state
(after the final norm) one position earlier. For a pause model it is the same position's state, which the pause
token does not receive.

```bash
python -m coconut.linear_probe --models coconut=outputs/bench_learning/coconut-seed0 \\
    pause_as_thought=outputs/bench_learning/pause_as_thought-seed0 --output_dir outputs/linear_probe
```

Each model folder must come from `train_sft.py` on the bundled task (its `coconut_training.json` names the task);
the probe renders the task's questions into `<output_dir>/data`.
"""

import argparse
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from coconut.curriculum import CurriculumConfig
from coconut.eval_config import CoconutEvalConfig
from coconut.eval_prompts import eval_prompt
from coconut.loading import load_model_and_processor
from coconut.preflight import check_writable
from coconut.synthetic import SyntheticTaskConfig, build_synthetic_split, generate_puzzles
from processing_coconut_internvl import LATENT_TOKENS


logger = logging.getLogger(__name__)


@dataclass
class ThoughtStates:
    """The thought vectors of some questions, by thought index: `vectors[k]` is `(N_k, hidden_size)` and `cells[k]`
    the `(N_k,)` index (row * grid + column) of the cell each question reaches after `k` arrows."""

    vectors: dict[int, torch.Tensor]
    cells: dict[int, torch.Tensor]


def load_trained_task(model_dir: str | Path) -> tuple[SyntheticTaskConfig, CurriculumConfig, int]:
    """The arrow-chase task, curriculum and final stage a `train_sft.py` run recorded in `coconut_training.json`."""
    path = Path(model_dir) / "coconut_training.json"
    if not path.is_file():
        raise ValueError(f"{path} does not exist: pass a model folder written by `train_sft.py` on the bundled task.")
    record = json.loads(path.read_text())
    if not record.get("task"):
        raise ValueError(f"{model_dir} was not trained on the bundled arrow-chase task (no `task` in {path.name}).")
    curriculum, stage = CurriculumConfig(**record["curriculum"]), record["stage"]
    if not record.get("num_latent_thoughts"):
        raise ValueError(
            f"{model_dir} has no thoughts to probe: it was trained with `method`={curriculum.method!r} and reached "
            f"stage {stage}, whose prompts hold no `<|latent|>` token. Probe a `coconut` or `pause_as_thought` run "
            "that reached stage 1 or later."
        )
    return SyntheticTaskConfig(**record["task"]), curriculum, stage


@torch.no_grad()
def thought_states(model, processor, records, puzzles, curriculum, stage: int, batch_size: int = 50) -> ThoughtStates:
    """Run the evaluation prompts of `records` at `stage` and collect each thought's vector; thought k is labelled
    with the cell after `ceil(k / c_thought)` arrows, the reasoning step it replaces."""
    from coconut.data import load_record_images

    latent_id = processor.tokenizer.convert_tokens_to_ids(LATENT_TOKENS[-1])
    grid = len(puzzles[0].board)
    config = CoconutEvalConfig(stage=stage)
    vectors, cells = {}, {}
    for first in range(0, len(records), batch_size):
        rows = list(range(first, min(first + batch_size, len(records))))
        prompts = [eval_prompt(processor, records[i], curriculum, config)["prompt"] for i in rows]
        images = [load_record_images(records[i], i) for i in rows]
        inputs = processor(text=prompts, images=images, return_tensors="pt", padding=True, padding_side="left").to(
            model.device
        )
        outputs = model(**inputs, output_hidden_states=True)
        last_hidden = outputs.hidden_states[-1]  # (B, T, H), after the final norm
        for batch_row, i in enumerate(rows):
            positions = (inputs["input_ids"][batch_row] == latent_id).nonzero().flatten().tolist()
            path = puzzles[i].path
            for k, position in enumerate(positions, start=1):
                arrows = math.ceil(k / curriculum.c_thought)  # thoughts k of c_thought replace reasoning step k // c
                if arrows >= len(path):
                    break
                vectors.setdefault(k, []).append(last_hidden[batch_row, position - 1].float())
                row, column = path[arrows]
                cells.setdefault(k, []).append(row * grid + column)
    return ThoughtStates(
        {k: torch.stack(v) for k, v in vectors.items()}, {k: torch.tensor(c) for k, c in cells.items()}
    )


def fit_linear_probe(
    vectors: torch.Tensor, labels: torch.Tensor, num_classes: int, steps: int = 300
) -> torch.nn.Linear:
    """Multinomial logistic regression (standardised inputs, a little weight decay) fitted by L-BFGS."""
    torch.manual_seed(0)
    mean, std = vectors.mean(0), vectors.std(0).clamp_min(1e-6)
    probe = torch.nn.Linear(vectors.shape[1], num_classes)
    optimizer = torch.optim.LBFGS(probe.parameters(), max_iter=steps, line_search_fn="strong_wolfe")
    inputs = (vectors - mean) / std

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(probe(inputs), labels) + 1e-3 * probe.weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    probe.mean, probe.std = mean, std
    return probe


def probe_accuracy(probe: torch.nn.Linear, vectors: torch.Tensor, labels: torch.Tensor) -> float:
    with torch.no_grad():
        return (probe((vectors - probe.mean) / probe.std).argmax(-1) == labels).float().mean().item()


def probe_model(model_dir: str | Path, data_dir: str | Path, num_train: int = 1000, num_test: int = 500) -> dict:
    """Per thought index k: the probe's held-out accuracy, chance, and the question counts it was fitted and scored on.

    Training questions come from the task's training split (seed of the run), test questions from its held-out test
    split; both are rendered into `data_dir`.
    """
    task, curriculum, stage = load_trained_task(model_dir)
    if task.variant != "chase":
        raise ValueError(f"The linear probe reads the cell after k arrows; {model_dir} has variant {task.variant!r}.")
    model, processor = load_model_and_processor(str(model_dir), dtype=torch.float32)
    model.eval()
    states = {}
    for split, count in (("train", num_train), ("test", num_test)):
        records = build_synthetic_split(Path(data_dir) / f"seed{task.seed}", split, task, num_records=count)
        puzzles = generate_puzzles(split, task, count)
        states[split] = thought_states(model, processor, records, puzzles, curriculum, stage)
    num_cells = task.grid_size**2
    rows = {}
    for k in sorted(states["train"].vectors):
        if k not in states["test"].vectors:
            continue
        train_labels, test_labels = states["train"].cells[k], states["test"].cells[k]
        probe = fit_linear_probe(states["train"].vectors[k], train_labels, num_cells)
        majority = torch.bincount(train_labels, minlength=num_cells).argmax()
        rows[k] = {
            "accuracy": probe_accuracy(probe, states["test"].vectors[k], test_labels),
            "train_accuracy": probe_accuracy(probe, states["train"].vectors[k], train_labels),
            "chance": (test_labels == majority).float().mean().item(),
            "num_train": len(train_labels),
            "num_test": len(test_labels),
        }
    return {"method": curriculum.method, "stage": stage, "thoughts": rows}


def markdown_table(results: dict[str, dict]) -> str:
    """One row per thought index, one column per model, and chance."""
    indices = sorted({int(k) for result in results.values() for k in result["thoughts"]})
    names = list(results)
    lines = [
        "| thought k (cell after k arrows) | " + " | ".join(names) + " | chance | test questions |",
        "|---" * (len(names) + 3) + "|",
    ]
    for k in indices:
        cells = []
        for name in names:
            row = results[name]["thoughts"].get(k)
            cells.append(f"{100 * row['accuracy']:.1f}" if row else "-")
        first = next(result["thoughts"][k] for result in results.values() if k in result["thoughts"])
        lines.append(f"| {k} | " + " | ".join(cells) + f" | {100 * first['chance']:.1f} | {first['num_test']} |")
    return "\n".join(lines)


def plot(results: dict[str, dict], path: str | Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(5.2, 3.6))
    for name, result in results.items():
        ks = sorted(int(k) for k in result["thoughts"])
        axis.plot(ks, [100 * result["thoughts"][k]["accuracy"] for k in ks], "o-", label=name)
    first = next(iter(results.values()))["thoughts"]
    ks = sorted(int(k) for k in first)
    axis.plot(ks, [100 * first[k]["chance"] for k in ks], "k:", label="chance (most frequent cell)")
    axis.set_xlabel("thought k")
    axis.set_ylabel("probe accuracy on held-out questions (%)")
    axis.set_ylim(0, 105)
    axis.set_xticks(ks)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    axis.set_title("linear probe: the cell reached after k arrows", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", required=True, help="NAME=FOLDER pairs, e.g. coconut=outputs/run.")
    parser.add_argument("--num_train", type=int, default=1000, help="Training questions the probe is fitted on.")
    parser.add_argument("--num_test", type=int, default=500, help="Held-out test questions it is scored on.")
    parser.add_argument("--output_dir", default="outputs/linear_probe")
    args = parser.parse_args(argv)
    if args.num_train < 1 or args.num_test < 1:
        raise ValueError(f"`--num_train`={args.num_train} and `--num_test`={args.num_test} must be at least 1.")
    models = {}
    for item in args.models:
        name, separator, folder = item.partition("=")
        if not separator or not name or not folder:
            raise ValueError(f"`--models` takes NAME=FOLDER pairs, got {item!r}.")
        if name in models:
            raise ValueError(
                f"`--models` names {name!r} twice ({models[name]} and {folder}): the second would replace the first. "
                "Give each model its own name, e.g. `coconut_seed0=... coconut_seed1=...`."
            )
        models[name] = folder
    check_writable(args.output_dir)  # before any model is probed
    for folder in models.values():
        load_trained_task(folder)  # every folder's record, before the first model's work is spent
    output_dir = Path(args.output_dir)
    results = {
        name: probe_model(folder, output_dir / "data", args.num_train, args.num_test)
        for name, folder in models.items()
    }
    (output_dir / "linear_probe.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(results, output_dir / "linear_probe.png")
    print(markdown_table(results))
    return results


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    main()


__all__ = ["ThoughtStates", "fit_linear_probe", "load_trained_task", "probe_model", "thought_states"]
