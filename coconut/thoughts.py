"""The continuous thoughts of evaluation prompts: their vectors, and prompts rebuilt with other vectors in their place.

The thought fed at the `<|latent|>` token in column `p` is the model's final hidden state (after the final norm) at
column `p - 1`. [`thought_vectors`] runs the model's forward once over a batch of prompts and reads them;
[`embeds_with_thoughts`] builds the same prompts as input embeddings (image features in place) with given vectors at
the `<|latent|>` columns, which `generate(inputs_embeds=...)` then continues as a plain prompt: with the model's own
thoughts it gives the model's own answer (tested), with others it answers as if it had thought them.
"""

import torch


def latent_columns(input_ids: torch.LongTensor, latent_token_id: int) -> list[list[int]]:
    """Per row of `input_ids` `(B, T)`, the columns of its `<|latent|>` tokens, in order."""
    return [(row == latent_token_id).nonzero().flatten().tolist() for row in input_ids]


@torch.no_grad()
def thought_vectors(model, inputs: dict) -> list[torch.Tensor]:
    """The thoughts the model feeds back for each prompt of `inputs` (a processor batch): per row `(n_i, H)`."""
    latent_token_id = model.config.latent_token_id
    if latent_token_id is None:
        raise ValueError(
            "The model feeds no thoughts back (`config.latent_token_id` is None: a pause-as-thought model); its "
            "`<|latent|>` tokens are ordinary pause tokens. Read or intervene on thoughts of a coconut model."
        )
    hidden = model(**inputs, output_hidden_states=True, logits_to_keep=1).hidden_states[-1]  # (B, T, H)
    return [
        hidden[row, [column - 1 for column in columns]]
        for row, columns in enumerate(latent_columns(inputs["input_ids"], latent_token_id))
    ]


@torch.no_grad()
def embeds_with_thoughts(model, inputs: dict, thoughts: list[torch.Tensor]) -> torch.Tensor:
    """The input embeddings `(B, T, H)` of `inputs` (image features placed at the image tokens) with `thoughts[i]`
    `(n_i, H)` at row `i`'s `<|latent|>` columns."""
    input_ids = inputs["input_ids"]
    embeds = model.get_input_embeddings()(input_ids)  # (B, T, H)
    if inputs.get("pixel_values") is not None:
        features = model.model.get_image_features(pixel_values=inputs["pixel_values"], return_dict=True).pooler_output
        features = features.to(embeds.device, embeds.dtype)
        image_mask = model.model.get_placeholder_mask(input_ids, embeds, features)
        embeds = embeds.masked_scatter(image_mask, features)
    for row, columns in enumerate(latent_columns(input_ids, model.config.latent_token_id)):
        if len(columns) != thoughts[row].shape[0]:
            raise ValueError(
                f"Row {row} has {len(columns)} `<|latent|>` tokens but {thoughts[row].shape[0]} thought vectors."
            )
        embeds[row, columns] = thoughts[row].to(embeds.dtype)
    return embeds


__all__ = ["embeds_with_thoughts", "latent_columns", "thought_vectors"]
