"""Load a saved Coconut-InternVL repository (`convert_to_coconut.py` or `train_sft.py` wrote it) with its remote code,
for training, evaluation and probing alike."""

from pathlib import Path

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from coconut.checkpoints import check_loaded_weights, check_weight_files
from coconut.convert import require_coconut_checkpoint
from processing_coconut_internvl import LATENT


def load_model_and_processor(
    model_name_or_path: str,
    revision: str | None = None,
    dtype: str | torch.dtype = "auto",
    attn_implementation: str | None = None,
    device: str | torch.device | None = None,
):
    """The model and its processor (or tokenizer, for a text-only repository), remote code on.

    Refused before any remote code runs: a plain InternVL (convert it first) or a path that is no model folder; then a
    weight file cut short. After loading: weights holding NaN or infinity (absurdly large ones are warned about, see
    [`check_loaded_weights`]) and a config without `latent_token_id`.
    """
    # A plain InternVL would otherwise fail on whatever its own processor or remote code needs (e.g. torchvision).
    require_coconut_checkpoint(model_name_or_path, revision=revision)
    if Path(model_name_or_path).is_dir():
        check_weight_files(model_name_or_path)  # a truncated file, named
    model = AutoModelForImageTextToText.from_pretrained(
        model_name_or_path,
        revision=revision,
        dtype=dtype,
        trust_remote_code=True,
        attn_implementation=attn_implementation,
    )
    check_loaded_weights(model, model_name_or_path)  # NaN or absurd values: a damaged file that still loads
    processing_class = AutoProcessor.from_pretrained(model_name_or_path, revision=revision, trust_remote_code=True)
    tokenizer = getattr(processing_class, "tokenizer", processing_class)
    # A pause-as-thought model keeps the Coconut tokens but sets `latent_token_id=None`, so nothing is fed back.
    if getattr(model.config, "latent_token_id", None) is None and LATENT not in tokenizer.get_vocab():
        raise ValueError(
            f"{model_name_or_path!r} has no `latent_token_id` and its tokenizer no {LATENT}: convert the base InternVL "
            "checkpoint with `python convert_to_coconut.py` first."
        )
    if device is not None:
        model.to(device)
    return model, processing_class


__all__ = ["load_model_and_processor"]
