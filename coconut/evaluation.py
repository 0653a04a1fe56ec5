"""Evaluation of Coconut models: batched greedy generation with the Coconut prompt, metrics, results per stage.

The trainer calls [`evaluate_stage`] after each curriculum stage and `evaluate.py` calls it once; several labelled
results in one [`EvalResults`] make a comparison table (`benchmarks/bench_learning.py` compares the paper's methods
over seeds). Records follow the data layer's schema: `id`, `question`, `steps`, `answer`, optional `images`,
`choices`, `direct_answers`.
"""

import json
import logging
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from statistics import fmean
from typing import NamedTuple

import torch
from tqdm.auto import tqdm

from coconut.curriculum import CurriculumConfig, build_eval_prompt, build_training_example, question_prompt
from coconut.data import load_record_images
from coconut.metrics import (
    correct_choice_index,
    count_generated_tokens,
    direct_answer_score,
    exact_match,
    extract_answer,
    multiple_choice_score,
)
from processing_coconut_internvl import latent_block, thought_count


logger = logging.getLogger(__name__)

RESULTS_FILE, PLOT_FILE, TABLE_FILE = "eval_results.json", "eval_results.png", "eval_results.md"


@dataclass
class CoconutEvalConfig:
    """How to evaluate: which stage's prompt (or a fixed latent count), batching and generation length.

    The prompt layout itself (`method`, `c_thought`, `max_latent_stage`, `pad_latent_to_max`) comes from the model's
    [`coconut.curriculum.CurriculumConfig`], so evaluation prompts are built by the same rules as training examples.
    """

    stage: int | None = field(
        default=None,
        metadata={
            "help": "Curriculum stage to evaluate: each record gets min(stage, max_latent_stage, its number of "
            "steps) x c_thought latents (the paper's evaluation). Needed for coconut and pause_as_thought models "
            "unless `num_latent_thoughts` is set."
        },
    )
    num_latent_thoughts: int | None = field(
        default=None,
        metadata={"help": "A fixed number of `<|latent|>` tokens for every record; overrides `stage`."},
    )
    batch_size: int = field(default=16, metadata={"help": "Prompts generated together (left-padded)."})
    max_new_tokens: int | None = field(
        default=None,
        metadata={
            "help": "Generation length limit per record. Default: the longest target of the records at the stage "
            "evaluated (the steps left to write, the answer marker, the answer and the end of turn, in tokens) "
            "x 1.5, so that no reference answer is cut. Generations that end without EOS are counted and warned about."
        },
    )
    direct_answer_subset_average: bool = field(
        default=False,
        metadata={
            "help": "Average the direct-answer score over the 10 leave-one-out annotator subsets (VQA v2) instead "
            "of A-OKVQA's plain min(#matches / 3, 1)."
        },
    )
    disable_tqdm: bool = field(default=False, metadata={"help": "Hide the progress bar."})

    def __post_init__(self):
        self.validate_eval_config()

    def validate_eval_config(self):
        """Raise a `ValueError` naming the field for a setting that cannot be evaluated."""
        for name in ("batch_size", "max_new_tokens"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(
                    f"`{name}`={value} must be at least 1"
                    + (" (leave it out to follow the longest target)." if name == "max_new_tokens" else ".")
                )
        if self.stage is not None and self.stage < 0:
            raise ValueError(f"`stage`={self.stage} must be 0 or more.")
        if self.num_latent_thoughts is not None:
            self.num_latent_thoughts = thought_count(self.num_latent_thoughts)


def check_eval_settings(curriculum: CurriculumConfig, config: CoconutEvalConfig) -> None:
    """Refuse a latent count the method's prompts cannot hold: `cot`, `no_cot` and `no_thought` prompts have no
    latent block, so `num_latent_thoughts` > 0 would silently evaluate with none."""
    if config.num_latent_thoughts and not curriculum.uses_markers:
        raise ValueError(
            f"`num_latent_thoughts`={config.num_latent_thoughts} with `method`={curriculum.method!r}: its prompts have "
            "no latent block, so the model would be evaluated with 0 thoughts. Drop `--num_latent_thoughts`, or "
            "evaluate a model trained with `--method coconut` (or `pause_as_thought`) with that method."
        )


def default_max_new_tokens(records: Sequence[dict], tokenizer, curriculum: CurriculumConfig, stage: int | None) -> int:
    """The generation budget that follows the split: its longest target (at `stage`; the whole chain of thought when
    the stage is unknown) in tokens, x 1.5 rounded up, for a model that writes a little more than the reference."""
    layout = replace(curriculum, uniform_prob=0.0)
    longest = max(
        len(
            tokenizer(
                build_training_example(record, stage or 0, tokenizer, layout)["completion"], add_special_tokens=False
            )["input_ids"]
        )
        for record in records
    )
    return math.ceil(1.5 * longest)


def eval_prompt(processing_class, record: dict, curriculum: CurriculumConfig, config: CoconutEvalConfig) -> dict:
    """The evaluation prompt of `record`, `{"prompt", "images", "num_latents"}`, by the curriculum's rules.

    `config.num_latent_thoughts` replaces the stage's latent count for the methods with thoughts (`coconut`,
    `pause_as_thought`); `no_thought`, `cot` and `no_cot` have no block.
    """
    if curriculum.uses_markers and config.num_latent_thoughts is not None:
        k = config.num_latent_thoughts
        prompt = question_prompt(record, processing_class) + latent_block(k)
        return {"prompt": prompt, "images": list(record.get("images") or []), "num_latents": k}
    if curriculum.uses_markers and config.stage is None:
        raise ValueError(
            f"`method`={curriculum.method!r} needs the latent count: set `stage` (the curriculum stage the model "
            "reached) or `num_latent_thoughts`."
        )
    # The prompts of cot, no_cot and no_thought do not depend on the stage.
    stage = config.stage if config.stage is not None else 0
    return build_eval_prompt(record, stage, processing_class, curriculum)


class Generation(NamedTuple):
    """One record's generation: its text (up to its end of turn), token count, thoughts, and whether it ended with
    EOS (`False`: it ran to `max_new_tokens` and may be cut)."""

    text: str
    generated_tokens: int
    num_latent_thoughts: int | None
    ended: bool = True


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


def _check_ids(records: Sequence[dict]) -> list[str]:
    ids = [str(record.get("id", "")) for record in records]
    seen = set()
    for index, record_id in enumerate(ids):
        if not record_id:
            raise ValueError(f"Record {index} has no `id`: predictions are matched to records by id.")
        if record_id in seen:
            raise ValueError(f"Record id {record_id!r} (record {index}) appears twice; ids must be unique.")
        seen.add(record_id)
    return ids


@torch.no_grad()
def generate_predictions(
    model,
    processing_class,
    records: Sequence[dict],
    curriculum: CurriculumConfig,
    config: CoconutEvalConfig,
) -> tuple[dict[str, Generation], dict[str, float]]:
    """Greedy generations of `records`, keyed by record id, and the timing of the whole run.

    Prompts are sorted by length so each batch pads little; every generation goes back to its record by id.

    Args:
        model (`CoconutInternVLForConditionalGeneration`): the model, on the device to run on.
        processing_class (`CoconutInternVLProcessor` or `PreTrainedTokenizerBase`): builds the inputs; a tokenizer
            is enough for text-only records.
        records (`Sequence[dict]`): records with unique `id`s.
        curriculum (`CurriculumConfig`): how the model was trained, which lays out the prompt.
        config (`CoconutEvalConfig`): the stage or latent count, batch size and generation length.

    Returns:
        `(generations, timing)`: `{id: Generation}` and `{"seconds", "max_new_tokens",
        "samples_per_second", "latency_seconds_per_batch"}` (generation time only, without prompt building).
    """
    ids = _check_ids(records)
    check_eval_settings(curriculum, config)
    tokenizer = getattr(processing_class, "tokenizer", processing_class)
    max_new_tokens = config.max_new_tokens
    if max_new_tokens is None:
        max_new_tokens = default_max_new_tokens(records, tokenizer, curriculum, config.stage)
    prompts = [eval_prompt(processing_class, record, curriculum, config) for record in records]
    order = sorted(range(len(records)), key=lambda i: len(prompts[i]["prompt"]))

    generation_config = model.generation_config
    eos_ids = generation_config.eos_token_id if generation_config.eos_token_id is not None else tokenizer.eos_token_id
    eos_ids = [eos_ids] if isinstance(eos_ids, int) else list(eos_ids)
    pad_token_id = (
        generation_config.pad_token_id if generation_config.pad_token_id is not None else tokenizer.pad_token_id
    )
    generate_kwargs = dict(
        do_sample=False,
        num_beams=1,
        max_new_tokens=max_new_tokens,
        eos_token_id=eos_ids,
        pad_token_id=pad_token_id,
    )

    generations, seconds, batch_seconds = {}, 0.0, []
    batches = [order[i : i + config.batch_size] for i in range(0, len(order), config.batch_size)]
    for batch in tqdm(batches, desc="Evaluating", unit="batch", disable=config.disable_tqdm):
        texts = [prompts[i]["prompt"] for i in batch]
        images = [load_record_images(records[i], i) for i in batch]
        kwargs = dict(text=texts, return_tensors="pt", padding=True, padding_side="left")
        if any(images):
            kwargs["images"] = images
        inputs = processing_class(**kwargs).to(model.device)
        start = time.perf_counter()
        output_ids = model.generate(**inputs, **generate_kwargs)
        batch_seconds.append(time.perf_counter() - start)
        new_tokens = output_ids[:, inputs["input_ids"].shape[1] :].tolist()  # (B, new tokens)
        for i, tokens in zip(batch, new_tokens, strict=True):
            count = count_generated_tokens(tokens, eos_ids, pad_token_id)
            text = tokenizer.decode(tokens[:count], skip_special_tokens=True)
            ended = count > 0 and tokens[count - 1] in eos_ids
            generations[ids[i]] = Generation(text, count, prompts[i]["num_latents"], ended)
    seconds = sum(batch_seconds)
    timing = {
        "max_new_tokens": max_new_tokens,
        "seconds": seconds,
        "samples_per_second": len(records) / seconds if seconds > 0 else float("inf"),
        "latency_seconds_per_batch": fmean(batch_seconds),
    }
    return generations, timing


def score_generations(
    records: Sequence[dict],
    generations: dict[str, Generation | tuple],
    direct_answer_subset_average: bool = False,
) -> tuple[dict[str, float], list[Prediction]]:
    """Metrics over `records` from their generations (looked up by id), and the per-record predictions.

    Every record gets `accuracy` (exact match after the marker); records with `choices` add `multiple_choice_accuracy`
    and those with `direct_answers` add `direct_answer_score`, each averaged over the records that have them;
    `num_truncated` counts the generations that ran out of tokens before their EOS.
    """
    ids = _check_ids(records)
    missing = [record_id for record_id in ids if record_id not in generations]
    if missing:
        raise ValueError(f"{len(missing)} records have no generation, e.g. id {missing[0]!r}.")
    predictions, per_metric = [], {"accuracy": [], "multiple_choice_accuracy": [], "direct_answer_score": []}
    for record_id, record in zip(ids, records, strict=True):
        text, count, k, ended = Generation(*generations[record_id])
        answer = extract_answer(text)
        scores = {"accuracy": exact_match(answer, record["answer"])}
        if record.get("choices"):
            correct = correct_choice_index(record["answer"], record["choices"], record_id)
            scores["multiple_choice_accuracy"] = multiple_choice_score(answer, record["choices"], correct)
        if record.get("direct_answers"):
            scores["direct_answer_score"] = direct_answer_score(
                answer, record["direct_answers"], direct_answer_subset_average
            )
        for name, value in scores.items():
            per_metric[name].append(value)
        predictions.append(Prediction(record_id, k, text, answer, record["answer"], count, not ended, scores))
    metrics = {name: fmean(values) for name, values in per_metric.items() if values}
    metrics["mean_generated_tokens"] = fmean([prediction.generated_tokens for prediction in predictions])
    thoughts = [
        prediction.num_latent_thoughts for prediction in predictions if prediction.num_latent_thoughts is not None
    ]
    if thoughts:
        metrics["max_latent_thoughts"] = max(thoughts)
    metrics["num_truncated"] = sum(prediction.truncated for prediction in predictions)
    metrics["num_samples"] = len(predictions)
    return metrics, predictions


def evaluate_stage(
    model,
    processing_class,
    records: Iterable[dict],
    curriculum: CurriculumConfig,
    config: CoconutEvalConfig,
    label: str = "",
) -> StageResult:
    """Generate and score `records` at `config.stage` (or `config.num_latent_thoughts`): one row of the results.

    Example:

    ```python
    >>> curriculum = CurriculumConfig(method="coconut", c_thought=2, max_latent_stage=3)
    >>> result = evaluate_stage(model, processor, validation_records, curriculum, CoconutEvalConfig(stage=3))
    >>> result.metrics["accuracy"], result.metrics["mean_generated_tokens"]
    ```
    """
    records = list(records)
    if not records:
        raise ValueError(f"No records to evaluate{f' for {label}' if label else ''}: the evaluation split is empty.")
    was_training = model.training
    model.eval()
    try:
        generations, timing = generate_predictions(model, processing_class, records, curriculum, config)
    finally:
        model.train(was_training)
    metrics, predictions = score_generations(records, generations, config.direct_answer_subset_average)
    metrics.update(timing)
    logger.info("Evaluation %s stage %s: %s", label, config.stage, json.dumps(metrics))
    if metrics["num_truncated"]:
        logger.warning(
            "%d of %d generations%s ran to max_new_tokens=%d without ending (no EOS): their answers may be cut off "
            "and score 0. Raise max_new_tokens (`--max_new_tokens`, `--eval_max_new_tokens`), or leave it out to "
            "follow the longest target.",
            metrics["num_truncated"],
            metrics["num_samples"],
            f" ({label})" if label else "",
            metrics["max_new_tokens"],
        )
    return StageResult(config.stage, label, metrics, predictions)


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
        """A Markdown table (one row per result) for the model card."""
        optional = [name for name in ("multiple_choice_accuracy", "direct_answer_score") if self._any(name)]
        header = ["Model" if self._labelled() else "Stage", "Accuracy", *_metric_titles(optional)]
        header += ["Generated tokens", "Thoughts (max)", "Samples/s", "Samples"]
        truncated = any(r.metrics.get("num_truncated") for r in self.results)
        if truncated:
            header.append("Cut at max tokens")
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for r in self.results:
            m = r.metrics
            cells = [r.label if self._labelled() else str(r.stage), f"{100 * m['accuracy']:.1f}"]
            cells += [f"{100 * m[name]:.1f}" if name in m else "-" for name in optional]
            cells += [f"{m['mean_generated_tokens']:.1f}", str(m.get("max_latent_thoughts", "-"))]
            cells += [f"{m['samples_per_second']:.2f}", str(m["num_samples"])]
            if truncated:
                cells.append(str(m.get("num_truncated", "-")))
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"

    def plot(self, path: str | Path):
        """A PNG of accuracy and mean generated tokens against stage (or model)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        names = [r.label if self._labelled() else str(r.stage) for r in self.results]
        accuracy = [100 * r.metrics["accuracy"] for r in self.results]
        tokens = [r.metrics["mean_generated_tokens"] for r in self.results]
        x = list(range(len(names)))
        figure, accuracy_axis = plt.subplots(figsize=(6, 3.5))
        accuracy_axis.plot(x, accuracy, "o-", color="tab:blue")
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


def _metric_titles(names):
    titles = {"multiple_choice_accuracy": "MC accuracy", "direct_answer_score": "DA score"}
    return [titles[name] for name in names]


CARD_TABLE_START, CARD_TABLE_END = "<!-- coconut-eval-results -->", "<!-- /coconut-eval-results -->"


def write_table_into_card(card_path: str | Path, table: str, heading: str = "## Evaluation") -> str:
    """Put `table` into the model card at `card_path`, replacing the table an earlier evaluation wrote there.

    The table sits between two HTML comments, so re-evaluating replaces it; a card without them gets a `heading`
    section appended. Returns the new card text.
    """
    card_path = Path(card_path)
    if not card_path.is_file():
        raise ValueError(f"Model card {str(card_path)!r} does not exist; save the model (with its README.md) first.")
    card = card_path.read_text()
    block = f"{CARD_TABLE_START}\n{table.rstrip()}\n{CARD_TABLE_END}"
    if CARD_TABLE_START in card and CARD_TABLE_END in card:
        before, rest = card.split(CARD_TABLE_START, 1)
        after = rest.split(CARD_TABLE_END, 1)[1]
        card = before + block + after
    else:
        card = card.rstrip() + f"\n\n{heading}\n\n{block}\n"
    card_path.write_text(card)
    return card


__all__ = [
    "CoconutEvalConfig",
    "EvalResults",
    "Generation",
    "Prediction",
    "StageResult",
    "check_eval_settings",
    "default_max_new_tokens",
    "evaluate_stage",
    "generate_predictions",
    "eval_prompt",
    "score_generations",
    "write_table_into_card",
]
