"""LoRA for Coconut-InternVL: TRL's `get_peft_config` on the language model only, with the latent tokens' embedding
rows trainable (their rows are new, so they must learn even when the rest of the embedding matrix is frozen)."""

from trl import ModelConfig, get_peft_config


# LoRA on the language model's projections only: the vision tower has modules with the same names (`mlp.*`).
LANGUAGE_MODEL_LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


def coconut_peft_config(model_args: ModelConfig, model):
    """TRL's LoRA config (`None` without `--use_peft`); `--lora_target_modules` defaults to
    [`LANGUAGE_MODEL_LORA_TARGETS`], and the three latent tokens' embedding rows (and a stop head) train."""
    if not model_args.use_peft:
        return None
    if model_args.lora_target_modules is None:
        model_args.lora_target_modules = LANGUAGE_MODEL_LORA_TARGETS
    peft_config = get_peft_config(model_args)
    ids = [model.config.start_latent_token_id, model.config.end_latent_token_id, model.config.latent_token_id]
    peft_config.trainable_token_indices = {"embed_tokens": [i for i in ids if i is not None]}
    if getattr(model, "latent_stop_head", None) is not None:  # a new head trains whole, as the latent rows do
        peft_config.modules_to_save = [*(peft_config.modules_to_save or []), "latent_stop_head"]
    return peft_config


__all__ = ["LANGUAGE_MODEL_LORA_TARGETS", "coconut_peft_config"]
