"""Small InternVL-shaped Coconut configurations (Qwen2 text model, InternViT vision tower), for the embedded default,
the tests and the benchmarks: the architecture of the real checkpoints at a size a CPU trains in minutes."""

from configuration_coconut_internvl import CoconutInternVLConfig
from processing_coconut_internvl import LATENT_TOKENS


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


__all__ = ["TEXT_DEFAULTS", "VISION_DEFAULTS", "tiny_coconut_config", "tiny_coconut_config_for"]
