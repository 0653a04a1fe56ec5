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

from coconut.curriculum import (
    CurriculumConfig,
    build_eval_prompt,
    build_training_example,
    evaluation_layout,
    question_prompt,
)
from coconut.data import load_record_images
from coconut.metrics import (
    correct_choice_index,
    count_generated_tokens,
    direct_answer_score,
    exact_match,
    extract_answer,
    multiple_choice_score,
)
from processing_coconut_internvl import AUTO_THOUGHTS, is_auto, latent_block, thought_count


logger = logging.getLogger(__name__)

RESULTS_FILE, PLOT_FILE, TABLE_FILE = "eval_results.json", "eval_results.png", "eval_results.md"


@dataclass
class CoconutEvalConfig:
    """How to evaluate: which stage's prompt (or a fixed latent count, or the stop head's), batching and generation
    length.

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
    # `int | str`: the command line gives a string, "auto" or a count such as "3", which the check turns into an int.
    num_latent_thoughts: int | str | None = field(
        default=None,
        metadata={
            "help": "A fixed number of `<|latent|>` tokens for every record; overrides `stage`. `auto`: the model's "
            "stop head chooses each record's number (a model trained with `--latent_stop_head`, method coconut)."
        },
    )
    max_latent_thoughts: int | None = field(
        default=None,
        metadata={
            "help": "With `num_latent_thoughts` auto: the most thoughts a record gets. Default: the generation config's "
            "`max_latent_thoughts` (training writes it), else max_latent_stage x c_thought."
        },
    )
    latent_stop_threshold: float | None = field(
        default=None,
        metadata={
            "help": "With `num_latent_thoughts` auto: the stop probability that ends a record's block; lower stops "
            "sooner. Default: the generation config's `latent_stop_threshold` (0.5)."
        },
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
        if self.num_latent_thoughts is not None and not is_auto(self.num_latent_thoughts):
            self.num_latent_thoughts = _as_thought_count(self.num_latent_thoughts)
        if not is_auto(self.num_latent_thoughts):
            for name in ("max_latent_thoughts", "latent_stop_threshold"):
                if getattr(self, name) is not None:
                    raise ValueError(
                        f"`{name}`={getattr(self, name)} applies only to `num_latent_thoughts`={AUTO_THOUGHTS!r} (the "
                        f"stop head chooses the counts), got `num_latent_thoughts`={self.num_latent_thoughts!r}. Pass "
                        f"`--num_latent_thoughts {AUTO_THOUGHTS}`, or drop `--{name}`."
                    )
        if self.max_latent_thoughts is not None:
            self.max_latent_thoughts = thought_count(self.max_latent_thoughts, "max_latent_thoughts")
            if self.max_latent_thoughts < 1:
                raise ValueError("`max_latent_thoughts`=0 must be at least 1: the stop head reads a thought to stop.")
        threshold = self.latent_stop_threshold
        if threshold is not None and not 0.0 <= threshold <= 1.0:
            raise ValueError(f"`latent_stop_threshold`={threshold} is not a probability; use a value in [0, 1].")


def _as_thought_count(value) -> int:
    """`num_latent_thoughts` other than "auto" as a count; the command line's digit strings ("3") are counts too."""
    if isinstance(value, str):
        if not (value.isascii() and value.isdigit()):
            raise ValueError(
                f"`num_latent_thoughts`={value!r} must be {AUTO_THOUGHTS!r} (the stop head chooses each record's "
                "count) or a whole number of thoughts, 0 or more."
            )
        value = int(value)
    return thought_count(value)


def check_eval_settings(curriculum: CurriculumConfig, config: CoconutEvalConfig) -> None:
    """Refuse a latent count the method's prompts cannot hold: `cot`, `no_cot` and `no_thought` prompts have no
    latent block, so `num_latent_thoughts` > 0 would silently evaluate with none; `"auto"` needs `coconut`, whose
    thoughts the stop head reads (the `<|latent|>` of `pause_as_thought` are learned pause tokens)."""
    if is_auto(config.num_latent_thoughts) and curriculum.method != "coconut":
        reason = (
            "its `<|latent|>` tokens are learned pause tokens, not thoughts the model feeds back"
            if curriculum.uses_markers
            else "its prompts have no latent block"
        )
        raise ValueError(
            f"`num_latent_thoughts`={config.num_latent_thoughts!r} with `method`={curriculum.method!r}: {reason}, so "
            "there are no continuous thoughts for the stop head to count. Drop `--num_latent_thoughts`, or evaluate "
            "a model trained with `--method coconut --latent_stop_head`."
        )
    if config.num_latent_thoughts and not curriculum.uses_markers:
        raise ValueError(
            f"`num_latent_thoughts`={config.num_latent_thoughts} with `method`={curriculum.method!r}: its prompts have "
            "no latent block, so the model would be evaluated with 0 thoughts. Drop `--num_latent_thoughts`, or "
            "evaluate a model trained with `--method coconut` (or `pause_as_thought`) with that method."
        )


def check_eval_model(model, config: CoconutEvalConfig) -> None:
    """Refuse `num_latent_thoughts="auto"` for a model without a stop head before anything is generated (`generate`
    would refuse it only at the first batch)."""
    if is_auto(config.num_latent_thoughts) and getattr(model, "latent_stop_head", None) is None:
        raise ValueError(
            f"`num_latent_thoughts`={AUTO_THOUGHTS!r} lets the model's stop head choose each record's number of "
            "thoughts, but this model has no stop head (`config.latent_stop_head` is False). Evaluate with a count "
            "(`--stage`, or `--num_latent_thoughts 6`), or train the head (`train_sft.py --latent_stop_head`)."
        )


def latent_thought_cap(model, curriculum: CurriculumConfig, config: CoconutEvalConfig) -> int:
    """The most thoughts the stop head may give a record: `config.max_latent_thoughts`, else the generation
    config's `max_latent_thoughts`, else the most the curriculum gives (`max_latent_stage` x `c_thought`, at least 1)."""
    for cap in (config.max_latent_thoughts, getattr(model.generation_config, "max_latent_thoughts", None)):
        if cap is not None:
            return cap
    return max(curriculum.max_latent_stage * curriculum.c_thought, 1)


def final_stage_thoughts(record: dict, curriculum: CurriculumConfig) -> int:
    """The thoughts `record` gets at the curriculum's final stage, min(steps, max_latent_stage) x c_thought (or
    max_latent_stage x c_thought with `pad_latent_to_max`): the count the stop head learns to choose."""
    steps = record.get("steps") or []
    return evaluation_layout(len(steps), curriculum.max_latent_stage + 1, curriculum).num_latents


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
    `pause_as_thought`); `no_thought`, `cot` and `no_cot` have no block. With `"auto"` the prompt has no block:
    `generate(num_latent_thoughts="auto")` appends one of the stop head's count, and `num_latents` is `None` until
    then.
    """
    if curriculum.uses_markers and is_auto(config.num_latent_thoughts):
        prompt = question_prompt(record, processing_class)
        return {"prompt": prompt, "images": list(record.get("images") or []), "num_latents": None}
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
    """One record's generation: its text (up to its end of turn), token count, thoughts (those the stop head chose,
    with `"auto"`), and whether it ended with EOS (`False`: it ran to `max_new_tokens` and may be cut)."""

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


def _batch_inputs(processing_class, texts: list[str], images: list[list], device) -> dict:
    """The left-padded model inputs of `texts` (and their images, if any record has some), on `device`."""
    kwargs = dict(text=texts, return_tensors="pt", padding=True, padding_side="left")
    if any(images):
        kwargs["images"] = images
    return processing_class(**kwargs).to(device)


def _chosen_blocks(output_ids: torch.Tensor, input_length: int, config) -> tuple[int, list[int]]:
    """Where the generated tokens start in `generate`'s output for prompts given `num_latent_thoughts="auto"`, and
    each row's number of thoughts. `generate` appended each prompt's block and left-padded the rows to the longest, so
    every row's block ends at the same column: the first one all `<|end-latent|>`."""
    closing = (output_ids[:, input_length - 1 :] == config.end_latent_token_id).all(dim=0)  # (T - input_length + 1,)
    if not closing.any():
        raise RuntimeError(
            "`generate` returned no closed latent block for prompts given `num_latent_thoughts='auto'`: the stop "
            "head's counts cannot be read from its output."
        )
    prompt_length = input_length + int(closing.int().argmax())
    counts = (output_ids[:, :prompt_length] == config.latent_token_id).sum(dim=1).tolist()  # (B,)
    return prompt_length, counts


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
        "samples_per_second", "latency_seconds_per_batch"}` (generation time only, without prompt building; with
        `"auto"` it includes choosing the counts, which `generate` does).
    """
    ids = _check_ids(records)
    check_eval_settings(curriculum, config)
    check_eval_model(model, config)
    auto = is_auto(config.num_latent_thoughts)
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
    if auto:
        generate_kwargs.update(
            num_latent_thoughts=AUTO_THOUGHTS,
            max_latent_thoughts=latent_thought_cap(model, curriculum, config),
            latent_stop_threshold=config.latent_stop_threshold,
        )

    generations, seconds, batch_seconds = {}, 0.0, []
    batches = [order[i : i + config.batch_size] for i in range(0, len(order), config.batch_size)]
    for batch in tqdm(batches, desc="Evaluating", unit="batch", disable=config.disable_tqdm):
        texts = [prompts[i]["prompt"] for i in batch]
        images = [load_record_images(records[i], i) for i in batch]
        inputs = _batch_inputs(processing_class, texts, images, model.device)
        start = time.perf_counter()
        output_ids = model.generate(**inputs, **generate_kwargs)
        batch_seconds.append(time.perf_counter() - start)
        prompt_length = inputs["input_ids"].shape[1]
        thoughts = [prompts[i]["num_latents"] for i in batch]
        if auto:  # the blocks of the stop head's counts were appended: the prompts grew
            prompt_length, thoughts = _chosen_blocks(output_ids, prompt_length, model.config)
        new_tokens = output_ids[:, prompt_length:].tolist()  # (B, new tokens)
        for i, tokens, k in zip(batch, new_tokens, thoughts, strict=True):
            count = count_generated_tokens(tokens, eos_ids, pad_token_id)
            text = tokenizer.decode(tokens[:count], skip_special_tokens=True)
            ended = count > 0 and tokens[count - 1] in eos_ids
            generations[ids[i]] = Generation(text, count, k, ended)
    seconds = sum(batch_seconds)
    timing = {
        "max_new_tokens": max_new_tokens,
        "seconds": seconds,
        "samples_per_second": len(records) / seconds if seconds > 0 else float("inf"),
        "latency_seconds_per_batch": fmean(batch_seconds),
    }
    return generations, timing


@torch.no_grad()
def plan_stop_counts(
    model,
    processing_class,
    records: Sequence[dict],
    curriculum: CurriculumConfig,
    config: CoconutEvalConfig,
) -> dict[str, int]:
    """Each record's number of thoughts as the model's stop head chooses it, keyed by record id.

    [`CoconutInternVLForConditionalGeneration.plan_latent_thoughts`] on the prompts without a block, sorted and
    batched as generation batches them, with at most [`latent_thought_cap`] thoughts and `config`'s threshold (else
    the model config's).
    """
    ids = _check_ids(records)
    prompts = [question_prompt(record, processing_class) for record in records]
    order = sorted(range(len(records)), key=lambda i: len(prompts[i]))
    cap = latent_thought_cap(model, curriculum, config)
    counts = {}
    for start in range(0, len(order), config.batch_size):
        batch = order[start : start + config.batch_size]
        images = [load_record_images(records[i], i) for i in batch]
        inputs = _batch_inputs(processing_class, [prompts[i] for i in batch], images, model.device)
        chosen = model.plan_latent_thoughts(
            **inputs, max_latent_thoughts=cap, latent_stop_threshold=config.latent_stop_threshold
        )
        counts.update(zip((ids[i] for i in batch), chosen, strict=True))
    return counts


def stop_head_metrics(
    model,
    processing_class,
    records: Sequence[dict],
    curriculum: CurriculumConfig,
    config: CoconutEvalConfig,
    generations: dict[str, Generation] | None = None,
) -> dict[str, float]:
    """How well the stop head chooses the number of thoughts, for a `coconut` model with a head (else `{}`).

    `stop_accuracy` is the share of records whose chosen count equals the one the curriculum gives them at its final
    stage ([`final_stage_thoughts`]); `mean_stop_thoughts` the mean chosen count. The counts are those of the
    `generations` of an `"auto"` evaluation, else planned by [`plan_stop_counts`].
    """
    if getattr(model, "latent_stop_head", None) is None or curriculum.method != "coconut":
        return {}
    ids = _check_ids(records)
    if is_auto(config.num_latent_thoughts) and generations is not None:
        chosen = {record_id: Generation(*generations[record_id]).num_latent_thoughts for record_id in ids}
    else:
        chosen = plan_stop_counts(model, processing_class, records, curriculum, config)
    counts = [chosen[record_id] for record_id in ids]
    expected = [final_stage_thoughts(record, curriculum) for record in records]
    return {
        "stop_accuracy": fmean(float(k == target) for k, target in zip(counts, expected, strict=True)),
        "mean_stop_thoughts": fmean(counts),
    }


def score_generations(
    records: Sequence[dict],
    generations: dict[str, Generation | tuple],
    direct_answer_subset_average: bool = False,
) -> tuple[dict[str, float], list[Prediction]]:
    """Metrics over `records` from their generations (looked up by id), and the per-record predictions.

    Every record gets `accuracy` (exact match after the marker); records with `choices` add `multiple_choice_accuracy`
    and those with `direct_answers` add `direct_answer_score`, each averaged over the records that have them;
    `num_truncated` counts the generations that ran out of tokens before their EOS; `max_latent_thoughts` and
    `mean_latent_thoughts` are the most and the mean thoughts a record got.
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
        metrics["mean_latent_thoughts"] = fmean(thoughts)
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

    A `coconut` model with a stop head also gets [`stop_head_metrics`] (`stop_accuracy`, `mean_stop_thoughts`): the
    trainer's evaluation after each stage follows how well the head chooses the number of thoughts. The timing
    (`samples_per_second`, `latency_seconds_per_batch`) covers `generate` alone, not this planning; with `"auto"`
    `generate` chooses the counts itself, so its latency includes the head's work.

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
        stop_metrics = stop_head_metrics(model, processing_class, records, curriculum, config, generations)
    finally:
        model.train(was_training)
    metrics, predictions = score_generations(records, generations, config.direct_answer_subset_average)
    metrics.update(stop_metrics)
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
    "check_eval_model",
    "check_eval_settings",
    "default_max_new_tokens",
    "evaluate_stage",
    "final_stage_thoughts",
    "generate_predictions",
    "eval_prompt",
    "latent_thought_cap",
    "plan_stop_counts",
    "score_generations",
    "stop_head_metrics",
    "write_table_into_card",
]
