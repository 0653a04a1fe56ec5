"""Batches of the Coconut curriculum: each scheduled sample is built for its stage, processed, padded and labelled."""

import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers.utils import logging

from coconut.curriculum import CurriculumConfig, build_training_example
from processing_coconut_internvl import LATENT_TOKENS


logger = logging.get_logger(__name__)

IGNORE_INDEX = -100


def load_image(image: Any, record_id: Any = None) -> Image.Image:
    """An RGB `PIL.Image` from a path or an image; a missing file is an error that names it."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    path = Path(image)
    if not path.is_file():
        raise FileNotFoundError(
            f"Image {str(path)!r} of record {record_id!r} does not exist. Download or generate the dataset's images "
            "first, or fix the `images` paths of the records."
        )
    with Image.open(path) as opened:
        return opened.convert("RGB")


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
    ):
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)  # a tokenizer alone serves text-only data
        self.records = records
        self.curriculum = curriculum
        self.seed = seed
        self.max_length = max_length
        self.unlabelled_ids = torch.tensor(self.tokenizer.convert_tokens_to_ids(list(LATENT_TOKENS)))
        self.pad_token_id = self.tokenizer.pad_token_id

    def examples(self, features: list[dict]) -> list[dict]:
        """The text pieces `{"prompt", "completion", "images"}` of each schedule row."""
        examples = []
        for feature in features:
            record = self.records[feature["sample"]]
            rng = random.Random(f"{self.seed}-{feature['epoch']}-{feature['sample']}")
            example = build_training_example(record, feature["stage"], self.tokenizer, self.curriculum, rng)
            images = [load_image(image, record.get("id")) for image in example.get("images") or []]
            examples.append({**example, "images": images})
        return examples

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

        sequences, prompt_lengths = [], []
        for row, completion in enumerate(completions):
            prompt = prompts["input_ids"][row][prompts["attention_mask"][row].bool()].tolist()
            ids = prompt + completion
            if self.max_length is not None and len(ids) > self.max_length:
                record = self.records[features[row]["sample"]]
                raise ValueError(
                    f"Record {features[row]['sample']} (id {record.get('id')!r}) at stage {examples[row]['stage']} is "
                    f"{len(ids)} tokens long ({len(prompt)} prompt, {len(completion)} completion), more than "
                    f"`max_length`={self.max_length}; cutting it would drop thoughts, image tokens or the answer. "
                    "Raise `max_length` (or set it to None), use fewer image tiles, or drop the record "
                    "(`train_sft.py --skip_invalid`)."
                )
            sequences.append(ids)
            prompt_lengths.append(len(prompt))

        # Every prompt ends at the same column, and with it every row's latent block (the end of the prompt): the
        # model makes one pass per distinct latent column, so a batch costs (most thoughts in a row) + 1 passes
        # instead of up to the sum over rows. Positions come from the attention mask, so padding changes nothing.
        prompt_width = max(prompt_lengths)
        length = prompt_width + max(len(ids) - prompt for ids, prompt in zip(sequences, prompt_lengths, strict=True))
        input_ids = torch.full((len(sequences), length), self.pad_token_id)  # (B, T)
        attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)  # (B, T)
        labels = torch.full((len(sequences), length), IGNORE_INDEX)  # (B, T)
        for row, (ids, prompt_length) in enumerate(zip(sequences, prompt_lengths, strict=True)):
            start, end = prompt_width - prompt_length, prompt_width - prompt_length + len(ids)
            input_ids[row, start:end] = torch.tensor(ids)
            attention_mask[row, start:end] = 1
            labels[row, prompt_width:end] = input_ids[row, prompt_width:end]
        labels[torch.isin(input_ids, self.unlabelled_ids)] = IGNORE_INDEX

        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        if "pixel_values" in prompts:
            batch["pixel_values"] = prompts["pixel_values"]  # (total_tiles, 3, H, W), every tile in row order
        return batch


__all__ = ["CoconutDataCollator", "load_image", "IGNORE_INDEX"]
