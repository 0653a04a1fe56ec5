"""Small InternVL-shaped Coconut configurations (Qwen2 text model, InternViT vision tower), for the embedded default,
the tests and the benchmarks: the architecture of the real checkpoints at a size a CPU trains in minutes; and the
embedded default's model for the bundled task."""

import torch
from transformers import GotOcr2ImageProcessorPil

from coconut.convert import build_generation_config
from coconut.synthetic import SyntheticTaskConfig, synthetic_tokenizer
from configuration_coconut_internvl import CoconutInternVLConfig
from modeling_coconut_internvl import CoconutInternVLForConditionalGeneration
from processing_coconut_internvl import LATENT_TOKENS, CoconutInternVLProcessor


TEXT_DEFAULTS = dict(
    model_type="qwen2",
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
)
VISION_DEFAULTS = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, patch_size=14)


def tiny_coconut_config(
    vocab_size: int,
    image_token_id: int,
    latent_token_ids: tuple[int, int, int],
    image_size: int = 56,
    text: dict | None = None,
    vision: dict | None = None,
    **config,
) -> CoconutInternVLConfig:
    """A Coconut-InternVL config of the given vocabulary, token ids and sizes.

    Args:
        vocab_size (`int`): rows of the embeddings and the LM head.
        image_token_id (`int`): the `<IMG_CONTEXT>` id.
        latent_token_ids (`tuple[int, int, int]`): the ids of `<|start-latent|>`, `<|end-latent|>`, `<|latent|>`.
        image_size (`int`): the tile side in pixels; 14-px patches, pixel-shuffled by 0.5, give
            `(image_size // 14) ** 2 / 4` image tokens a tile (4 for 56 px, 256 for 448 px as in InternVL3).
        text, vision (`dict`, *optional*): overrides of [`TEXT_DEFAULTS`] / [`VISION_DEFAULTS`].
        config: other [`CoconutInternVLConfig`] fields, or any of the above to override.
    """
    start, end, latent = latent_token_ids
    vision_config = {**VISION_DEFAULTS, "image_size": image_size, **(vision or {})}
    patches_per_side = image_size // vision_config["patch_size"]
    settings = dict(
        text_config={**TEXT_DEFAULTS, "vocab_size": vocab_size, **(text or {})},
        vision_config=vision_config,
        image_token_id=image_token_id,
        image_seq_length=patches_per_side**2 // 4,
        start_latent_token_id=start,
        end_latent_token_id=end,
        latent_token_id=latent,
        tie_word_embeddings=False,
    )
    return CoconutInternVLConfig(**{**settings, **config})


def tiny_coconut_config_for(tokenizer, text: dict | None = None, **kwargs) -> CoconutInternVLConfig:
    """[`tiny_coconut_config`] with the vocabulary, padding, end of turn, image and latent ids of `tokenizer`."""
    text = {"pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id, **(text or {})}
    return tiny_coconut_config(
        vocab_size=len(tokenizer),
        image_token_id=tokenizer.context_image_token_id,
        latent_token_ids=tuple(tokenizer.convert_tokens_to_ids(list(LATENT_TOKENS))),
        text=text,
        **kwargs,
    )


def tiny_model_and_processor(task: SyntheticTaskConfig, seed: int, embedding_std: float | None = None):
    """An InternVL-shaped model from scratch (Qwen2 text model, InternViT vision tower) and its processor, for `task`.

    `embedding_std` re-initialises the token embeddings with that standard deviation (the config's
    `initializer_range`, 0.02, otherwise): at 1.0 a token embedding has the norm of the final norm's output, so a
    fed-back continuous thought and a token enter the first layer at the same scale (docs/learning.md).
    """
    tokenizer = synthetic_tokenizer(task)
    image_processor = GotOcr2ImageProcessorPil(
        size={"height": task.image_size, "width": task.image_size},
        crop_to_patches=False,
        image_mean=[0.5] * 3,
        image_std=[0.5] * 3,
    )
    # A 56 px image in 14 px patches is 4 x 4 patches; InternVL's pixel shuffle (0.5) leaves 2 x 2 tokens.
    config = tiny_coconut_config_for(
        tokenizer,
        image_size=task.image_size,
        text=dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4),
        vision=dict(hidden_size=64, intermediate_size=128),
    )
    processor = CoconutInternVLProcessor(image_processor, tokenizer, image_seq_length=config.image_seq_length)
    torch.manual_seed(seed)
    model = CoconutInternVLForConditionalGeneration(config)
    if embedding_std is not None:
        torch.nn.init.normal_(model.get_input_embeddings().weight, std=embedding_std)
    model.generation_config = build_generation_config(model, tokenizer)
    return model, processor


__all__ = [
    "TEXT_DEFAULTS",
    "VISION_DEFAULTS",
    "tiny_coconut_config",
    "tiny_coconut_config_for",
    "tiny_model_and_processor",
]
