"""Obviously-correct, slow versions of the latent forward and of decoding, to test and benchmark against.

Each works on one unpadded sample and recomputes, without a KV cache, the whole prefix for every thought (and, when
decoding, for every new token). Nothing here is fast on purpose.
"""

import torch


def reference_embeddings(model, ids: list[int], pixel_values: torch.Tensor | None, detach_thoughts=False):
    """Input embeddings `(1, T, H)` of one unpadded sample with its image features in place and every thought filled.

    For each `<|latent|>`, left to right: run the language model on the whole prefix without a cache and take the final
    hidden state of the position before it. `detach_thoughts` cuts the gradient through the thoughts (what a wrong
    implementation would compute).
    """
    config = model.config
    input_ids = torch.tensor([ids], device=model.device)
    embeds = model.get_input_embeddings()(input_ids)
    if pixel_values is not None and len(pixel_values):
        features = model.model.get_image_features(pixel_values=pixel_values, return_dict=True).pooler_output
        image_mask = (input_ids == config.image_token_id).unsqueeze(-1)
        embeds = embeds.masked_scatter(image_mask, features.reshape(-1, features.shape[-1]).to(embeds.dtype))
    for position in (input_ids[0] == config.latent_token_id).nonzero().flatten().tolist():
        prefix = model.model.language_model(inputs_embeds=embeds[:, :position], use_cache=False)
        thought = prefix.last_hidden_state[:, -1:]
        thought = thought.detach() if detach_thoughts else thought
        embeds = torch.cat([embeds[:, :position], thought, embeds[:, position + 1 :]], dim=1)
    return embeds


def reference_logits(model, ids: list[int], pixel_values: torch.Tensor | None, detach_thoughts=False):
    """Logits `(T, V)` of one unpadded sample by the reference algorithm."""
    embeds = reference_embeddings(model, ids, pixel_values, detach_thoughts)
    hidden = model.model.language_model(inputs_embeds=embeds, use_cache=False).last_hidden_state
    return model.lm_head(hidden)[0]


def reference_greedy(model, ids: list[int], pixel_values, max_new_tokens: int, eos_token_id: int | None) -> list[int]:
    """Greedy decoding of one prompt: all thoughts and the whole sequence recomputed for every new token.

    The tokens the generation config suppresses (the latent block's three) are never chosen, as in `generate`.
    """
    ids, new_tokens = list(ids), []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = reference_logits(model, ids, pixel_values)[-1]
            logits[model.generation_config.suppress_tokens or []] = -float("inf")
            token = int(logits.argmax())
            ids.append(token)
            new_tokens.append(token)
            if token == eos_token_id:
                break
    return new_tokens


def original_coconut_greedy(model, ids: list[int], pixel_values, max_new_tokens: int, eos_token_id: int | None):
    """Decoding as the original Coconut release does it: one prompt at a time, greedy, and for every new token a
    full forward pass over the whole sequence (its latent passes included), with no cache kept between tokens."""
    input_ids = torch.tensor([ids], device=model.device)
    new_tokens = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = model(input_ids=input_ids, pixel_values=pixel_values, logits_to_keep=1, use_cache=False).logits
            logits[..., model.generation_config.suppress_tokens or []] = -float("inf")
            token = int(logits[0, -1].argmax())
            input_ids = torch.cat([input_ids, input_ids.new_tensor([[token]])], dim=1)
            new_tokens.append(token)
            if token == eos_token_id:
                break
    return new_tokens


def reference_stop_count(
    model, ids: list[int], pixel_values, max_thoughts: int, threshold: float, probabilities: bool = False
):
    """The number of thoughts the stop head gives one unpadded prompt (without a block), by a naive one-row loop.

    For k = 1, 2, ...: append `<|start-latent|>` + k `<|latent|>` to the prompt, recompute every thought from scratch
    ([`reference_embeddings`]), run the whole sequence again and read the stop probability of the final hidden state
    at the k-th thought; stop at the first that reaches `threshold`, or at `max_thoughts`. With `probabilities`, the
    probabilities read instead of the count.
    """
    config, read = model.config, []
    with torch.no_grad():
        for count in range(1, max_thoughts + 1):
            prompt = [*ids, config.start_latent_token_id, *[config.latent_token_id] * count]
            embeds = reference_embeddings(model, prompt, pixel_values)
            state = model.model.language_model(inputs_embeds=embeds, use_cache=False).last_hidden_state[0, -1]
            read.append(torch.sigmoid(model.latent_stop_head(state).float()).item())
            if read[-1] >= threshold:
                break
    return read if probabilities else len(read)
