"""Put a model's continuous thoughts at the scale of its token embeddings, without changing what it computes.

A continuous thought is the final norm's output, fed back as an input embedding. In a pre-norm transformer that output
is `weight * x / rms(x)`, whose norm is about the norm of the final norm's `weight` (11.3 for a fresh 128-wide model),
while a token embedding initialised at std 0.02 has a norm of about 0.23. A thought then enters the residual stream 50
times larger than any token, every layer's update is small beside it, and the next thought comes out nearly the same
vector: on the bundled task, consecutive thoughts of a trained model had cosine similarities of 0.993-0.999
(docs/learning.md).

[`match_thought_scale`] multiplies the final norm's weight by `s` and divides the LM head by `s`. The logits of every
token are unchanged, to rounding, so a trained chain-of-thought model answers as before; only the vector fed back as a
thought shrinks, to the mean norm of the token embeddings.
"""

import torch


def match_thought_scale(model) -> float:
    """Rescale `model`'s final norm and LM head so that its last hidden states have the norm of a token embedding.

    Args:
        model (`CoconutInternVLForConditionalGeneration`): a model with an untied LM head.

    Returns:
        `float`: the factor `s` applied to the final norm's weight (the LM head got `1 / s`).
    """
    head, embeddings = model.get_output_embeddings(), model.get_input_embeddings()
    if head.weight is embeddings.weight or head.weight.data_ptr() == embeddings.weight.data_ptr():
        raise ValueError(
            "The LM head is tied to the input embeddings: rescaling it would rescale the tokens too. "
            "`match_thought_scale` needs a model with `tie_word_embeddings=False`."
        )
    final_norm = model.model.language_model.norm
    with torch.no_grad():
        embedding_norm = embeddings.weight.float().norm(dim=-1).mean()
        thought_norm = final_norm.weight.float().norm()  # the norm of weight * x / rms(x) when x is spread evenly
        scale = (embedding_norm / thought_norm).item()
        final_norm.weight.mul_(scale)
        head.weight.div_(scale)
    return scale


__all__ = ["match_thought_scale"]
