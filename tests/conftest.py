"""Tiny Coconut-InternVL models, and batches built from per-row specs (the reference algorithm is `coconut/reference.py`).

Token ids of the tiny vocabulary: 0 pad, 1 image context, 2 `<|latent|>`, 3 `<|start-latent|>`, 4 `<|end-latent|>`,
5 `<img>`, 6 `</img>`; ordinary text tokens are 10 and up.
"""

import os
import socket
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch

from coconut.tiny import tiny_coconut_config
from configuration_coconut_internvl import CoconutInternVLConfig
from modeling_coconut_internvl import CACHE_NAME, CoconutInternVLForConditionalGeneration


PAD, IMAGE, LATENT, START, END, IMG_OPEN, IMG_CLOSE = 0, 1, 2, 3, 4, 5, 6
FIRST_TEXT_ID, VOCAB_SIZE = 10, 64
IMAGE_SIZE, TOKENS_PER_TILE = 56, 4  # 56 px / 14 px patches = 4x4 patches, pixel-shuffled 0.5 -> 2x2 tokens


# Thought counts as users pass them: the processor and `generate` accept and refuse the same ones (one shared check).
INTEGRAL_COUNTS = [2.0, np.int64(2), torch.tensor(2), torch.tensor(2.0), [2, np.int64(2)], torch.tensor([2.0, 2.0])]
BAD_COUNTS = [
    (2.5, r"whole number of thoughts, 0 or more, got 2.5"),
    (-1, "got -1"),
    (True, "got True"),
    (False, "got False"),
    (np.bool_(True), "got np.True_|got True"),
    ("2", "got '2'"),
    ([1, "2"], "got '2'"),
    (torch.tensor([1.5, 2.0]), r"got tensor\(1.5"),
    ([1, 2, 3], r"has 3 counts for 2 prompts"),
]


def cache_of(outputs):
    """The cache of a model output: `outputs.cache`, `outputs.past_key_values` before transformers 5.24."""
    return getattr(outputs, CACHE_NAME)


def enable_checkpointing(model, **kwargs) -> None:
    """`model.activation_checkpointing_enable(...)`; `gradient_checkpointing_enable` before transformers 5.23."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is None:
        kwargs = {"gradient_checkpointing_kwargs": kwargs.pop("activation_checkpointing_kwargs", None), **kwargs}
    (enable or model.gradient_checkpointing_enable)(**kwargs)


def tiny_config(**overrides) -> CoconutInternVLConfig:
    """A two-layer InternVL (Qwen2 text model, InternViT vision tower) on the tiny vocabulary, milliseconds on a CPU."""
    ids = dict(image_token_id=IMAGE, latent_token_ids=(START, END, LATENT))
    return tiny_coconut_config(VOCAB_SIZE, **ids, text=dict(pad_token_id=PAD, eos_token_id=FIRST_TEXT_ID), **overrides)


def tiny_model(seed: int = 0, **overrides) -> CoconutInternVLForConditionalGeneration:
    return random_model(CoconutInternVLForConditionalGeneration, tiny_config(**overrides), seed)


def random_model(model_class, config, seed: int = 0):
    """`model_class(config)` in eval mode, every weight drawn from N(0, 0.2) after `torch.manual_seed(seed)`.

    The default init is small; larger weights make every token matter (a wrong thought changes the logits visibly)
    and give greedy decoding clear argmax margins, so rounding from padding cannot flip a token.
    """
    torch.manual_seed(seed)
    model = model_class(config)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.2)
    return model.eval()


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Tiny matrices: one thread is as fast as two, and many times faster on a shared, busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def model():
    return tiny_model()


@dataclass
class Row:
    """One sample: `question` text tokens, `tiles` image tiles, `latents` thoughts, `answer` text tokens.

    `images` splits the tiles into separate images (each wrapped in `<img>`...`</img>`); `lead` is extra text before
    the images, which moves this row's latents to other columns than its neighbours'.
    """

    question: int = 5
    latents: int = 3
    answer: int = 4
    images: list[int] = field(default_factory=lambda: [1])
    lead: int = 0


def build_batch(rows: list[Row], padding_side: str = "right", seed: int = 0) -> dict:
    """Token ids, mask, pixel values and labels of `rows`, padded to one length; plus each row's unpadded ids."""
    generator = torch.Generator().manual_seed(seed)

    def text(n):
        return torch.randint(FIRST_TEXT_ID, VOCAB_SIZE, (n,), generator=generator).tolist()

    sequences, label_rows, pixel_rows, tiles_per_row = [], [], [], []
    for row in rows:
        ids = text(row.lead + 1)
        for tiles in row.images:
            ids += [IMG_OPEN] + [IMAGE] * (TOKENS_PER_TILE * tiles) + [IMG_CLOSE]
        ids += text(row.question)
        if row.latents:
            ids += [START] + [LATENT] * row.latents + [END]
        prompt_length = len(ids)
        ids += text(row.answer)
        sequences.append(ids)
        label_rows.append([-100] * prompt_length + ids[prompt_length:])
        n_tiles = sum(row.images)
        tiles_per_row.append(n_tiles)
        pixel_rows.append(torch.randn(n_tiles, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator))

    length = max(map(len, sequences))
    input_ids = torch.full((len(rows), length), PAD)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    labels = torch.full((len(rows), length), -100)
    for b, (ids, row_labels) in enumerate(zip(sequences, label_rows)):
        span = slice(0, len(ids)) if padding_side == "right" else slice(length - len(ids), length)
        input_ids[b, span] = torch.tensor(ids)
        attention_mask[b, span] = 1
        labels[b, span] = torch.tensor(row_labels)
    pixel_values = torch.cat(pixel_rows) if sum(tiles_per_row) else None
    return dict(
        input_ids=input_ids,
        attention_mask=attention_mask,
        pixel_values=pixel_values,
        labels=labels,
        sequences=sequences,
        pixel_rows=pixel_rows,
    )


def model_inputs(batch: dict) -> dict:
    keys = ("input_ids", "attention_mask", "pixel_values", "labels")
    return {key: batch[key] for key in keys if batch[key] is not None}


def real_columns(attention_mask_row: torch.Tensor) -> torch.Tensor:
    """Columns of the real (unpadded) tokens of one row."""
    return attention_mask_row.nonzero().flatten()


@pytest.fixture
def hf_home(tmp_path, monkeypatch):
    """Remote-code modules are cached under `$HF_HOME`: keep each test's copies apart, and never go online."""
    home = tmp_path / "hf_home"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return home


def subprocess_env(hf_home: Path) -> dict:
    return {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}


@contextmanager
def counting_passes(model):
    """Count the language-model passes made inside the block: `with counting_passes(model) as calls: ...`."""
    calls = []
    handle = model.model.language_model.register_forward_hook(lambda *args: calls.append(1))
    try:
        yield calls
    finally:
        handle.remove()


def free_port() -> int:
    """A TCP port nobody listens on now (fixed ports collide with other test runs on the machine)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def stop_probability_rows(model, prompts, max_thoughts: int) -> list[list[float]]:
    """Each prompt's stop probability after each of `max_thoughts` thoughts, the prompt alone: `prompts` holds
    `(input_ids of shape (1, T), pixel_values or None)` pairs."""
    return [
        model.latent_stop_probabilities(input_ids, None, pixel_values, max_thoughts)[0].tolist()
        for input_ids, pixel_values in prompts
    ]


def splitting_threshold(rows: list[list[float]], gap: float = 1e-3) -> float:
    """The threshold, halfway between two of the rows' stop probabilities at least `gap` apart, that gives the rows the
    most different counts: no probability sits near it, so padding cannot flip a decision."""
    values = sorted({p for row in rows for p in row})
    middles = [(low + high) / 2 for low, high in zip(values[:-1], values[1:]) if high - low > gap]

    def counts(threshold):
        return [next((j + 1 for j, p in enumerate(row) if p >= threshold), len(row)) for row in rows]

    return max(middles, key=lambda threshold: len(set(counts(threshold))))
