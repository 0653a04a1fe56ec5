"""TRL's fused-LM-head call answered through the latent passes, with the LM head run in tiles.

[`~trl.SFTTrainer`] asks for `model(..., labels=labels, fused_lm_head=True)` and builds its loss and metrics (entropy,
token accuracy) from the per-token fields of a [`~trl.trainer.utils.FusedCausalLMOutput`]. TRL's own
`add_fused_lm_head` runs the inner backbone, which would skip the latent passes; here the final hidden states come from
the model's own forward, which runs them, and the LM head scores only the labelled positions, a tile at a time, so the
`(batch, tokens, vocab)` logits are never materialised (at InternVL3's 151,677-token vocabulary one fp32 copy of them
for 8 x 1,024 tokens is about 5 GB).
"""

import functools
import types

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from trl.trainer.utils import FusedCausalLMOutput


# Logit elements (tokens x vocabulary) per tile: 2^26 fp32 values are 256 MiB, about 440 tokens at 151,677 words.
TILE_ELEMENTS = 2**26


def _tile_log_probs(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor):
    """`(log p(label), entropy, label is top-1)` of one tile: hidden `(N, H)`, labels `(N,)`; each `(N,)`."""
    logits = nn.functional.linear(hidden, weight, bias).float()  # (N, V)
    log_normaliser = logits.logsumexp(dim=-1)  # (N,)
    log_probs = logits.gather(-1, labels[:, None]).squeeze(-1) - log_normaliser
    with torch.no_grad():
        probabilities = (logits - log_normaliser[:, None]).exp()
        entropy = log_normaliser - (probabilities * logits).sum(dim=-1)
        is_top1 = logits.argmax(dim=-1) == labels
    return log_probs, entropy, is_top1


def token_log_probs(
    hidden: torch.Tensor, lm_head: nn.Linear, labels: torch.Tensor, tile_elements: int = TILE_ELEMENTS
):
    """Log-probability, entropy and top-1 hit of each label under `lm_head(hidden)`, scored in tiles of tokens.

    Args:
        hidden (`torch.Tensor` of shape `(N, hidden_size)`): the final hidden states of the positions to score.
        lm_head (`nn.Linear`): the output projection to the vocabulary.
        labels (`torch.LongTensor` of shape `(N,)`): the token each position should predict.

    Each tile's logits are recomputed in the backward pass instead of being kept, so the peak holds one tile's
    `(tokens, vocab)` logits, not all of them. Returns three `(N,)` tensors; only the log-probabilities carry gradients.
    """
    vocab_size = lm_head.weight.shape[0]
    tile = max(1, tile_elements // vocab_size)
    pieces = []
    for start in range(0, hidden.shape[0], tile):
        arguments = (hidden[start : start + tile], lm_head.weight, lm_head.bias, labels[start : start + tile])
        if torch.is_grad_enabled() and hidden.requires_grad:
            pieces.append(checkpoint(_tile_log_probs, *arguments, use_reentrant=False))
        else:
            pieces.append(_tile_log_probs(*arguments))
    if not pieces:
        empty = hidden.new_zeros(0, dtype=torch.float32)
        return empty, empty, torch.zeros(0, dtype=torch.bool, device=hidden.device)
    return tuple(torch.cat(parts) for parts in zip(*pieces, strict=True))


def add_latent_fused_lm_head(model, on_outputs=None) -> None:
    """Answer TRL's `model(..., labels=labels, fused_lm_head=True)` from the model's own forward, scored in tiles.

    Call it after TRL's `add_fused_lm_head` (in `SFTTrainer.__init__`): other calls go on to TRL's forward unchanged.
    The forward is asked for the final hidden states (`output_hidden_states=True`) and for the last position's logits
    only (`logits_to_keep=1`); [`token_log_probs`] scores the labelled positions. TRL builds its loss from the per-token
    fields alone, so the model's own outputs (the stop head's loss, the hidden states the step decoder reads) go to
    `on_outputs`.
    """
    forward = model.forward  # TRL's: without `fused_lm_head`, the model's own forward

    @functools.wraps(type(model).forward)
    def latent_fused_forward(self, *args, fused_lm_head=False, labels=None, num_items_in_batch=None, **kwargs):
        if not fused_lm_head:
            return forward(*args, labels=labels, num_items_in_batch=num_items_in_batch, **kwargs)
        if kwargs.get("shift_labels") is not None:
            raise ValueError(
                "`shift_labels` is passed under context or sequence parallelism, which splits the sequence; the "
                "latent passes need it whole. Train without context or sequence parallelism."
            )
        outputs = forward(*args, **{**kwargs, "output_hidden_states": True, "logits_to_keep": 1})
        if on_outputs is not None:
            on_outputs(outputs)
        lm_head = self.get_output_embeddings()
        hidden = outputs.hidden_states[-1][:, :-1]  # (B, T - 1, H): after the final norm, predicting the next token
        labels = labels[:, 1:].to(hidden.device)  # (B, T - 1)
        label_mask = labels != -100
        log_probs, entropy, is_top1 = token_log_probs(hidden[label_mask], lm_head, labels[label_mask])
        # `masked_scatter` keeps a batch without labels connected to the graph (a zero loss with a gradient).
        log_probs = log_probs.new_zeros(label_mask.shape).masked_scatter(label_mask, log_probs)
        entropy = entropy.new_zeros(label_mask.shape).masked_scatter(label_mask, entropy)
        is_top1 = torch.zeros_like(label_mask).masked_scatter(label_mask, is_top1)
        num_tokens = label_mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        return FusedCausalLMOutput(
            loss=-log_probs.sum() / num_tokens,
            log_probs=log_probs,
            entropy=entropy,
            is_top1=is_top1,
            label_mask=label_mask,
        )

    model.forward = types.MethodType(latent_fused_forward, model)


__all__ = ["add_latent_fused_lm_head", "token_log_probs"]
