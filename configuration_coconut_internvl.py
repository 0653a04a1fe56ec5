"""Configuration of Coconut-InternVL: InternVL plus the three token ids that drive continuous thoughts."""

from huggingface_hub.dataclasses import strict
from transformers import InternVLConfig


@strict
class CoconutInternVLConfig(InternVLConfig):
    r"""
    Configuration of [`CoconutInternVLForConditionalGeneration`]: an [`InternVLConfig`] plus the ids of the tokens that
    mark Coconut's continuous thoughts (Hao et al. 2024, arXiv 2412.06769).

    latent_token_id (`int`, *optional*):
        Id of `<|latent|>`. The input embedding at each such position is replaced by the language model's last hidden
        state (after the final norm) at the position just before it. `None` disables latent reasoning.
    start_latent_token_id (`int`, *optional*):
        Id of `<|start-latent|>`, the token that opens a block of continuous thoughts.
    end_latent_token_id (`int`, *optional*):
        Id of `<|end-latent|>`, the token that closes a block of continuous thoughts.
    latent_stop_head (`bool`, *optional*, defaults to `False`):
        Add the stop head: a linear classifier on the final hidden state at each `<|latent|>` (computed with that
        thought fed in) that says whether the latent block ends after that thought. It lets `generate(num_latent_thoughts="auto")` choose each question's number of thoughts.

    `generate`'s settings of `num_latent_thoughts="auto"`, `max_latent_thoughts` and `latent_stop_threshold`, live in
    the model's [`GenerationConfig`] (`generation_config.json`). A `config.json` that still holds them loads: the model
    moves them to its generation config.

    Example:

    ```python
    >>> from configuration_coconut_internvl import CoconutInternVLConfig

    >>> config = CoconutInternVLConfig(start_latent_token_id=151674, end_latent_token_id=151675, latent_token_id=151676,
    ...                                text_config={"model_type": "qwen2", "vocab_size": 151677})
    ```"""

    model_type = "coconut_internvl"

    latent_token_id: int | None = None
    start_latent_token_id: int | None = None
    end_latent_token_id: int | None = None
    latent_stop_head: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if getattr(self, "auto_map", None) is None:
            # One model class serves every Auto entry point a user may reach for.
            model_class = "modeling_coconut_internvl.CoconutInternVLForConditionalGeneration"
            self.auto_map = {
                "AutoConfig": "configuration_coconut_internvl.CoconutInternVLConfig",
                "AutoModel": model_class,
                "AutoModelForImageTextToText": model_class,
                "AutoModelForCausalLM": model_class,
            }
        # `@strict` would wrap the error in its own exception type; users catch `ValueError`.
        self.validate_latent_token_ids()

    def validate_latent_token_ids(self):
        """Part of `@strict` validation: the latent ids lie in the text vocabulary, differ from each other and from
        every other special id the config knows (image, video, padding, start and end of text).

        Whether an id is an ordinary word only the tokenizer can tell: the model's `from_pretrained` checks the ids
        against the tokenizer saved with it, and the processor against its own.
        """
        vocab_size = self.text_config.vocab_size
        seen = {"image_token_id": self.image_token_id, "video_token_id": getattr(self, "video_token_id", None)}
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            value = getattr(self.text_config, name, None)
            for index, token_id in enumerate(value if isinstance(value, list) else [value]):
                seen[f"text_config.{name}" + (f"[{index}]" if isinstance(value, list) else "")] = token_id
        for name in ("latent_token_id", "start_latent_token_id", "end_latent_token_id"):
            value = getattr(self, name)
            if value is None:
                continue
            if not 0 <= value < vocab_size:
                raise ValueError(
                    f"`{name}`={value} is outside the text vocabulary (0 to {vocab_size - 1}); add the Coconut tokens "
                    "to the tokenizer and resize the embeddings, or set `text_config.vocab_size`."
                )
            for other_name, other_value in seen.items():
                if other_value is not None and value == other_value:
                    raise ValueError(
                        f"`{name}`={value} is the same id as `{other_name}`; each token needs its own id."
                    )
            seen[name] = value


__all__ = ["CoconutInternVLConfig"]
