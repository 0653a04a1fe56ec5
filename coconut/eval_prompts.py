"""What an evaluation prompt holds: its text by the curriculum's rules ([`eval_prompt`]), its number of thoughts
([`final_stage_thoughts`], [`latent_thought_cap`] for the stop head) and its token budget
([`default_max_new_tokens`])."""

import math
from collections.abc import Sequence
from dataclasses import replace

from coconut.curriculum import (
    CurriculumConfig,
    build_eval_prompt,
    build_training_example,
    evaluation_layout,
    question_prompt,
)
from coconut.eval_config import CoconutEvalConfig
from processing_coconut_internvl import is_auto, latent_block


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


__all__ = [
    "default_max_new_tokens",
    "eval_prompt",
    "final_stage_thoughts",
    "latent_thought_cap",
]
