"""Batched greedy generation of evaluation prompts: each record's text, token count and thoughts, keyed by its id
([`generate_predictions`]), and the stop head's counts without generating ([`plan_stop_counts`])."""

import time
from collections.abc import Sequence
from statistics import fmean
from typing import NamedTuple

import torch
from tqdm.auto import tqdm

from coconut.curriculum import CurriculumConfig, question_prompt
from coconut.data import load_record_images
from coconut.eval_config import CoconutEvalConfig, check_eval_model, check_eval_settings
from coconut.eval_prompts import default_max_new_tokens, eval_prompt, latent_thought_cap
from coconut.metrics import count_generated_tokens
from processing_coconut_internvl import AUTO_THOUGHTS, is_auto


class Generation(NamedTuple):
    """One record's generation: its text (up to its end of turn), token count, thoughts (those the stop head chose,
    with `"auto"`), and whether it ended with EOS (`False`: it ran to `max_new_tokens` and may be cut)."""

    text: str
    generated_tokens: int
    num_latent_thoughts: int | None
    ended: bool = True


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


def check_ids(records: Sequence[dict]) -> list[str]:
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
    ids = check_ids(records)
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
    ids = check_ids(records)
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


__all__ = [
    "Generation",
    "check_ids",
    "generate_predictions",
    "plan_stop_counts",
]
