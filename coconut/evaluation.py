"""Evaluation of Coconut models: [`evaluate_stage`] generates and scores records at one stage, one row of results.

The trainer calls it after each curriculum stage and `evaluate.py` calls it once; several labelled results in one
[`coconut.results.EvalResults`] make a comparison table (`benchmarks/bench_learning.py` compares the paper's methods
over seeds). Records follow the data layer's schema: `id`, `question`, `steps`, `answer`, optional `images`,
`choices`, `direct_answers`. The parts, one job each:

- [`coconut.eval_config`]: [`CoconutEvalConfig`], which stage or latent count, batching, generation length;
- [`coconut.eval_prompts`]: the prompt of each record, its thoughts and its token budget;
- [`coconut.generation`]: batched greedy generation, and the stop head's counts;
- [`coconut.scoring`]: the metrics of the generations ([`coconut.metrics`] scores one answer);
- [`coconut.results`]: the results, saved as JSON, a Markdown table, a plot and the predictions;
- [`coconut.model_card.write_table_into_card`]: the table in a model card.
"""

import json
import logging
from collections.abc import Iterable

from coconut.curriculum import CurriculumConfig
from coconut.eval_config import CoconutEvalConfig
from coconut.generation import generate_predictions
from coconut.results import StageResult
from coconut.scoring import score_generations, stop_head_metrics


logger = logging.getLogger(__name__)


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


__all__ = ["evaluate_stage"]
