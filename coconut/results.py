"""The results of evaluations: one [`StageResult`] per stage (or model), its [`Prediction`]s, and [`EvalResults`],
which saves several as `eval_results.json`, a Markdown table, a plot and the predictions."""

import json
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path


RESULTS_FILE, PLOT_FILE, TABLE_FILE = "eval_results.json", "eval_results.png", "eval_results.md"


@dataclass
class Prediction:
    """One record's generation and its scores; `answer` is the text after the marker (`None` without one), `target`
    the reference answer beside it, and `truncated` says the generation ran out of tokens before its EOS (`None` in
    results saved before it was recorded)."""

    id: str
    num_latent_thoughts: int
    generation: str
    answer: str | None
    target: str | None
    generated_tokens: int
    truncated: bool | None
    scores: dict[str, float]


@dataclass
class StageResult:
    """Metrics of one evaluation (one stage, or one model of a comparison) and its predictions in record order."""

    stage: int | None
    label: str
    metrics: dict[str, float]
    predictions: list[Prediction]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "StageResult":
        predictions = [Prediction(**{"target": None, "truncated": None, **p}) for p in data["predictions"]]
        return cls(data["stage"], data["label"], dict(data["metrics"]), predictions)


class EvalResults:
    """Results of several stages (or models), saved as `eval_results.json`, a PNG plot and a Markdown table.

    `eval_results.json` holds `{"stages": [{"stage", "label", "metrics"}, ...], "overall": {...}}`, where `overall`
    is the last row's metrics with `final_stage`, `best_stage` and `best_accuracy`; each row's predictions go to
    `predictions_<label or stage>.jsonl` beside it.
    """

    def __init__(self, results: Iterable[StageResult] = ()):
        self.results = list(results)

    def add(self, result: StageResult):
        self.results.append(result)

    def to_dict(self) -> dict:
        if not self.results:
            raise ValueError("No evaluation results to save: call `add` with at least one `StageResult`.")
        rows = [{"stage": r.stage, "label": r.label, "metrics": r.metrics} for r in self.results]
        best = max(self.results, key=lambda r: r.metrics["accuracy"])
        overall = dict(self.results[-1].metrics)
        overall.update(
            final_stage=self.results[-1].stage,
            best_stage=best.stage,
            best_label=best.label,
            best_accuracy=best.metrics["accuracy"],
        )
        return {"stages": rows, "overall": overall}

    def markdown_table(self) -> str:
        """A Markdown table (one row per result) for the model card; the columns of metrics no result has (scores of
        other datasets, the stop head's) are left out."""
        optional = [name for name in ("multiple_choice_accuracy", "direct_answer_score") if self._any(name)]
        thoughts = [
            name for name in ("mean_latent_thoughts", "stop_accuracy", "mean_stop_thoughts") if self._any(name)
        ]
        header = ["Model" if self._labelled() else "Stage", "Accuracy", *_metric_titles(optional)]
        header += ["Generated tokens", "Thoughts (max)", *_metric_titles(thoughts), "Samples/s", "Samples"]
        truncated = any(r.metrics.get("num_truncated") for r in self.results)
        if truncated:
            header.append("Cut at max tokens")
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for r in self.results:
            m = r.metrics
            cells = [r.label if self._labelled() else str(r.stage), f"{100 * m['accuracy']:.1f}"]
            cells += [_metric_cell(name, m) for name in optional]
            cells += [f"{m['mean_generated_tokens']:.1f}", str(m.get("max_latent_thoughts", "-"))]
            cells += [_metric_cell(name, m) for name in thoughts]
            cells += [f"{m['samples_per_second']:.2f}", str(m["num_samples"])]
            if truncated:
                cells.append(str(m.get("num_truncated", "-")))
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"

    def plot(self, path: str | Path):
        """A PNG of accuracy (and the stop head's accuracy, where measured) and mean generated tokens against stage
        (or model)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        names = [r.label if self._labelled() else str(r.stage) for r in self.results]
        accuracy = [100 * r.metrics["accuracy"] for r in self.results]
        tokens = [r.metrics["mean_generated_tokens"] for r in self.results]
        x = list(range(len(names)))
        figure, accuracy_axis = plt.subplots(figsize=(6, 3.5))
        accuracy_axis.plot(x, accuracy, "o-", color="tab:blue", label="accuracy")
        if self._any("stop_accuracy"):
            stop = [
                100 * r.metrics["stop_accuracy"] if "stop_accuracy" in r.metrics else math.nan for r in self.results
            ]
            accuracy_axis.plot(x, stop, "^:", color="tab:green", label="stop accuracy")
            accuracy_axis.legend(loc="upper left", fontsize="small")
        accuracy_axis.set_xticks(x, names)
        accuracy_axis.set_xlabel("model" if self._labelled() else "stage")
        accuracy_axis.set_ylabel("accuracy (%)", color="tab:blue")
        accuracy_axis.set_ylim(0, 100)
        tokens_axis = accuracy_axis.twinx()
        tokens_axis.plot(x, tokens, "s--", color="tab:orange")
        tokens_axis.set_ylabel("generated tokens", color="tab:orange")
        tokens_axis.set_ylim(bottom=0)
        figure.tight_layout()
        figure.savefig(path, dpi=100)
        plt.close(figure)

    def save(self, output_dir: str | Path) -> dict[str, Path]:
        """Write `eval_results.json`, `eval_results.png`, `eval_results.md` and the predictions; returns the paths."""
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        paths = {"json": output_dir / RESULTS_FILE, "png": output_dir / PLOT_FILE, "md": output_dir / TABLE_FILE}
        paths["json"].write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        self.plot(paths["png"])
        paths["md"].write_text(self.markdown_table())
        for r in self.results:
            name = r.label if self._labelled() else f"stage_{r.stage}"
            with open(output_dir / f"predictions_{name}.jsonl", "w") as file:
                for prediction in r.predictions:
                    file.write(json.dumps(asdict(prediction)) + "\n")
        return paths

    def _labelled(self) -> bool:
        return any(r.label for r in self.results)

    def _any(self, name: str) -> bool:
        return any(name in r.metrics for r in self.results)


# The table's optional columns: title, and whether the metric is a share (shown in %) or a mean (two decimals).
_OPTIONAL_METRICS = {
    "multiple_choice_accuracy": ("MC accuracy", True),
    "direct_answer_score": ("DA score", True),
    "mean_latent_thoughts": ("Thoughts (mean)", False),
    "stop_accuracy": ("Stop accuracy", True),
    "mean_stop_thoughts": ("Stop thoughts (mean)", False),
}


def _metric_titles(names):
    return [_OPTIONAL_METRICS[name][0] for name in names]


def _metric_cell(name: str, metrics: dict) -> str:
    if name not in metrics:
        return "-"
    return f"{100 * metrics[name]:.1f}" if _OPTIONAL_METRICS[name][1] else f"{metrics[name]:.2f}"


__all__ = [
    "EvalResults",
    "Prediction",
    "StageResult",
]
