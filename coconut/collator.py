"""Batches of the Coconut curriculum: each scheduled sample is built for its stage, processed, padded and labelled."""

import random
from collections.abc import Sequence

import torch
from transformers.utils import logging
from trl.trainer.utils import pad

from coconut.curriculum import CurriculumConfig, build_training_example, question_prompt
from coconut.data import load_record_images
from coconut.step_supervision import step_targets
from modeling_coconut_internvl import latent_stop_labels
from processing_coconut_internvl import LATENT, LATENT_TOKENS


logger = logging.get_logger(__name__)

IGNORE_INDEX = -100


class CoconutDataCollator:
    r"""
    Turns schedule rows `{"epoch": e, "sample": i, "stage": k}` into a training batch.

    Each row's record is built for its stage by [`coconut.curriculum.build_training_example`] as the text pieces
    `{"prompt", "completion", "images"}` (the prompt holds one image placeholder per image); with `uniform_prob` the
    stage may be redrawn by an RNG seeded by `(seed, epoch, sample)`, so the same row always builds the same text. The
    prompts go through the processor (image placeholders expanded to `<img>` + `<IMG_CONTEXT>` x tiles x
    `image_seq_length` + `</img>`, images split into tiles), the completions through its tokenizer; each row is the
    prompt followed by the completion, padded on the left up to the longest prompt (so the latent blocks, at the
    end of the prompts, share their columns) and on the right after the completion.

    Labels are the input ids except -100 on the prompt, on the latent tokens and their markers (wherever they are)
    and on padding, so the loss covers the language steps, the answer and the end-of-turn token only.

    Args:
        processor ([`ProcessorMixin`]):
            The Coconut-InternVL processor (its `tokenizer` must hold the three latent tokens).
        records (`Sequence[dict]`):
            The dataset records (`id, question, steps, answer, images`), indexed by the schedule's `sample` column.
        curriculum ([`CurriculumConfig`]):
            The curriculum settings.
        seed (`int`, *optional*, defaults to 0):
            Seed of the per-sample stage draws of `uniform_prob`.
        stop_labels (`bool`, *optional*, defaults to `False`):
            Add `stop_labels`, the stop head's targets ([`latent_stop_labels`]), for the rows whose block may teach
            where a block ends ([`coconut.curriculum.teaches_stop`]); -100 in the other rows.
        step_supervision (`bool`, *optional*, defaults to `False`):
            Add the step decoder's batch ([`coconut.step_supervision.step_targets`]): for each step that thoughts
            replace, the columns of its thought vectors and the step's tokens.
        max_length (`int`, *optional*):
            Longest sequence. A longer example is an error naming its record: cutting it would drop image tokens or
            thoughts from the prompt, or the answer and end of turn from the completion, and teach the model to stop
            mid-answer. `train_sft.py` checks every record's longest stage before training
            ([`coconut.data.validate_dataset`] with `max_length`), so this only fires for data it has not checked.
    """

    def __init__(
        self,
        processor,
        records: Sequence[dict],
        curriculum: CurriculumConfig,
        seed: int = 0,
        max_length: int | None = None,
        stop_labels: bool = False,
        step_supervision: bool = False,
    ):
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)  # a tokenizer alone serves text-only data
        self.records = records
        self.curriculum = curriculum
        self.seed = seed
        self.max_length = max_length
        self.stop_labels = stop_labels
        self.step_supervision = step_supervision
        self.cache = {}  # sample -> (record, chat prompt)
        self.latent_token_id = self.tokenizer.convert_tokens_to_ids(LATENT)
        self.unlabelled_ids = torch.tensor(self.tokenizer.convert_tokens_to_ids(list(LATENT_TOKENS)))
        self.pad_token_id = self.tokenizer.pad_token_id

    def examples(self, features: list[dict]) -> list[dict]:
        """The text pieces `{"prompt", "completion", "images"}` of each schedule row."""
        examples = []
        for feature in features:
            record, prompt = self.record_and_prompt(feature["sample"])
            rng = random.Random(f"{self.seed}-{feature['epoch']}-{feature['sample']}")
            example = build_training_example(record, feature["stage"], self.tokenizer, self.curriculum, rng, prompt)
            examples.append({**example, "images": load_record_images(record, feature["sample"])})
        return examples

    def record_and_prompt(self, sample: int) -> tuple[dict, str]:
        """Record `sample` and its chat prompt, built once: every epoch visits every record again, and neither the
        record (a row decoded from the dataset's Arrow table) nor its chat template's output changes with the stage."""
        cached = self.cache.get(sample)
        if cached is None:
            record = self.records[sample]
            cached = self.cache[sample] = (record, question_prompt(record, self.tokenizer))
        return cached

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        examples = self.examples(features)
        images = [image for example in examples for image in example["images"]]
        image_kwargs = {"images": images} if images else {}
        prompts = self.processor(
            text=[example["prompt"] for example in examples],
            **image_kwargs,
            padding=True,
            padding_side="left",
            return_tensors="pt",
        )
        completions = self.tokenizer(
            [example["completion"] for example in examples], add_special_tokens=False
        ).input_ids

        for row, completion in enumerate(completions):
            prompt_length = int(prompts["attention_mask"][row].sum())
            if self.max_length is not None and prompt_length + len(completion) > self.max_length:
                record = self.records[features[row]["sample"]]
                raise ValueError(
                    f"Record {features[row]['sample']} (id {record.get('id')!r}) at stage {examples[row]['stage']} is "
                    f"{prompt_length + len(completion)} tokens long ({prompt_length} prompt, {len(completion)} "
                    f"completion), more than `max_length`={self.max_length}; cutting it would drop thoughts, image "
                    "tokens or the answer. Raise `max_length` (or set it to None), use fewer image tiles, or drop the "
                    "record (`train_sft.py --skip_invalid`)."
                )

        # Prompts are padded on the left (by the processor) and completions on the right, so every prompt ends at the
        # same column, and with it every row's latent block (the end of the prompt): the model makes one pass per
        # distinct latent column, so a batch costs (most thoughts in a row) + 1 passes. Positions come from the
        # attention mask, so padding changes nothing.
        completion_ids = pad([torch.tensor(ids) for ids in completions], self.pad_token_id, "right")  # (B, C)
        completion_mask = pad([torch.ones(len(ids), dtype=torch.long) for ids in completions], 0, "right")  # (B, C)
        input_ids = torch.cat([prompts["input_ids"], completion_ids], dim=1)  # (B, P + C)
        attention_mask = torch.cat([prompts["attention_mask"], completion_mask], dim=1)  # (B, P + C)
        labels = torch.cat(
            [
                torch.full_like(prompts["input_ids"], IGNORE_INDEX),
                completion_ids.masked_fill(completion_mask == 0, IGNORE_INDEX),
            ],
            dim=1,
        )
        labels[torch.isin(input_ids, self.unlabelled_ids)] = IGNORE_INDEX

        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        if self.stop_labels:
            rows = torch.tensor([example["teaches_stop"] for example in examples])
            batch["stop_labels"] = latent_stop_labels(input_ids, self.latent_token_id, rows)  # (B, T)
        if self.step_supervision:
            replaced = [example["replaced_steps"] for example in examples]
            batch.update(
                step_targets(input_ids, self.latent_token_id, replaced, self.tokenizer, self.curriculum.c_thought)
            )
        if "pixel_values" in prompts:
            batch["pixel_values"] = prompts["pixel_values"]  # (total_tiles, 3, H, W), every tile in row order
        return batch


__all__ = ["CoconutDataCollator", "IGNORE_INDEX"]
