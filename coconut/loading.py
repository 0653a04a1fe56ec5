"""Load a saved Coconut-InternVL repository (`convert_to_coconut.py` or `train_sft.py` wrote it) with its remote code,
for training, evaluation and probing alike."""

import logging
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from transformers import AutoModelForImageTextToText, AutoProcessor

from coconut.convert import require_coconut_checkpoint
from processing_coconut_internvl import LATENT


logger = logging.getLogger(__name__)


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


def check_weight_files(folder: str | Path) -> None:
    """Raise a `ValueError` naming the first `*.safetensors` file in `folder` whose header or data is cut short."""
    for path in sorted(Path(folder).glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt"):
                pass
        except (SafetensorError, OSError) as error:
            raise ValueError(
                f"Weight file {str(path)!r} is damaged ({error}); it was probably cut short by an interrupted download "
                "or save. Download it again, or resume from an earlier checkpoint (delete this one)."
            ) from error


# No trained weight comes near this: a larger one is a damaged file (a flipped exponent bit gives values like 1e36).
ABSURD_WEIGHT = 1e4


def check_loaded_weights(model, source: str) -> None:
    """Raise a `ValueError` naming the first parameter of `model` (loaded from `source`) holding NaN or infinity,
    and warn about parameters whose largest magnitude exceeds [`ABSURD_WEIGHT`]."""
    absurd = []
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.numel() == 0:
                continue
            if not torch.isfinite(parameter).all():
                bad = int((~torch.isfinite(parameter)).sum())
                raise ValueError(
                    f"The weights loaded from {source!r} are damaged: `{name}` holds {bad} NaN or infinite values. "
                    "Download or save the model again, or use an earlier checkpoint."
                )
            largest = float(parameter.abs().max())
            if largest > ABSURD_WEIGHT:
                absurd.append(f"`{name}` (max |w| {largest:.3g})")
    if absurd:
        logger.warning(
            "The weights loaded from %r look damaged: %d tensor(s) hold values above %g, e.g. %s. A flipped bit in a "
            "weight file gives such values; download or save the model again if you did not expect them.",
            source,
            len(absurd),
            ABSURD_WEIGHT,
            ", ".join(absurd[:3]),
        )


__all__ = [
    "check_loaded_weights",
    "check_weight_files",
    "load_model_and_processor",
]
