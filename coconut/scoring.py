"""The scores of an evaluation: answers against the records ([`score_generations`], with the metrics of
[`coconut.metrics`]) and how well the stop head chooses the number of thoughts ([`stop_head_metrics`])."""

from collections.abc import Sequence
from statistics import fmean

from coconut.curriculum import CurriculumConfig
from coconut.eval_config import CoconutEvalConfig
from coconut.eval_prompts import final_stage_thoughts
from coconut.generation import Generation, check_ids, plan_stop_counts
from coconut.metrics import (
    correct_choice_index,
    direct_answer_score,
    exact_match,
    extract_answer,
    multiple_choice_score,
)
from coconut.results import Prediction
from processing_coconut_internvl import is_auto


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
    ids = check_ids(records)
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
    ids = check_ids(records)
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


__all__ = [
    "score_generations",
    "stop_head_metrics",
]
