"""Coconut-InternVL: InternVL whose `<|latent|>` tokens are continuous thoughts (Hao et al. 2024, arXiv 2412.06769).

The input embedding at every `<|latent|>` position is the language model's final hidden state (after the final norm,
the vector the LM head reads) at the position just before it. The forward pass therefore runs the language model in
sequential passes over one KV cache: a pass ends right before every column that holds a latent, and the next pass
starts with the thought the previous pass produced. Images are encoded once, before the first pass.
"""

import torch
import torch.distributed as dist
from transformers import GenerationConfig, InternVLForConditionalGeneration
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_utils import slice_logits_to_keep
from transformers.models.internvl.modeling_internvl import InternVLCausalLMOutputWithPast
from transformers.utils import logging
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import can_return_tuple


try:  # imported as part of a package: the Hub's remote code, or a repository checkout used as one
    from .configuration_coconut_internvl import CoconutInternVLConfig
except ImportError:  # imported from the repository root, e.g. `python train_sft.py`
    from configuration_coconut_internvl import CoconutInternVLConfig


logger = logging.get_logger(__name__)


def plan_latent_passes(latent_mask: torch.Tensor, min_passes: int = 1) -> list[tuple[int, int]]:
    """Column ranges `[(start, end), ...]` of the sequential language-model passes over a batch.

    Every column that holds a latent in *any* row starts a new pass, so each row's thought at column `c` is read from
    the final hidden state at `c - 1`, computed by the pass before. Rows whose latents sit at other columns simply
    carry their ordinary embeddings through that boundary: splitting a pass over a KV cache is exact.

    `min_passes` asks for at least that many passes (ranks of FSDP / ZeRO-3 must all run the same number of forward
    calls); the longest ranges are halved until there are enough, and fewer come back only when every range is a
    single column.

    Args:
        latent_mask (`torch.BoolTensor` of shape `(batch_size, sequence_length)`): where the `<|latent|>` tokens are.
        min_passes (`int`): the least number of passes to plan.
    """
    sequence_length = latent_mask.shape[1]
    latent_columns = latent_mask.any(dim=0).nonzero().flatten().tolist()
    bounds = [0, *[column for column in latent_columns if column > 0], sequence_length]
    ranges = list(zip(bounds[:-1], bounds[1:]))
    while len(ranges) < min_passes:
        longest = max(range(len(ranges)), key=lambda i: ranges[i][1] - ranges[i][0])
        start, end = ranges[longest]
        if end - start < 2:
            break
        middle = (start + end) // 2
        ranges[longest : longest + 1] = [(start, middle), (middle, end)]
    return ranges


def agree_on_pass_count(num_passes: int, device: torch.device) -> int:
    """The largest pass count over all ranks (one `all_reduce`), so that every rank makes the same forward calls."""
    if not (dist.is_available() and dist.is_initialized()):
        return num_passes
    count = torch.tensor([num_passes], device=device)
    dist.all_reduce(count, op=dist.ReduceOp.MAX)
    return int(count.item())


def _slice_attention_mask(attention_mask, past_length: int, start: int, end: int):
    """The attention mask of the pass over columns `[start, end)` with `past_length` tokens already in the cache.

    A 2D padding mask covers every key seen so far: `(batch_size, past_length + end)`. A prepared 4D mask (static
    cache in `generate`) is `(batch_size, 1, query_length, key_length)`: keep the pass's query rows.
    """
    if attention_mask is None:
        return None
    if isinstance(attention_mask, dict):
        return {key: _slice_attention_mask(mask, past_length, start, end) for key, mask in attention_mask.items()}
    if attention_mask.ndim == 2:
        return attention_mask[:, : past_length + end]
    return attention_mask[:, :, start:end]


class CoconutInternVLForConditionalGeneration(InternVLForConditionalGeneration):
    r"""
    [`InternVLForConditionalGeneration`] with Coconut's continuous thoughts. Without `<|latent|>` tokens in `input_ids`
    it is exactly the parent model; with them, every latent position is fed the last hidden state before it.

    Example:

    ```python
    >>> import torch
    >>> from transformers import AutoModel, AutoProcessor

    >>> model = AutoModel.from_pretrained("path/or/hub-id", trust_remote_code=True)
    >>> processor = AutoProcessor.from_pretrained("path/or/hub-id", trust_remote_code=True)
    >>> inputs = processor(text="Question: ...", num_latent_thoughts=6, return_tensors="pt")
    >>> output_ids = model.generate(**inputs, max_new_tokens=32)
    ```
    """

    config_class = CoconutInternVLConfig

    def _latent_mask(self, input_ids: torch.LongTensor | None) -> torch.BoolTensor | None:
        """`(batch_size, sequence_length)` mask of the `<|latent|>` positions, or `None` if there are none."""
        latent_token_id = self.config.latent_token_id
        if input_ids is None or latent_token_id is None:
            return None
        latent_mask = input_ids == latent_token_id
        return latent_mask if latent_mask.any() else None

    @can_return_tuple
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        labels: torch.LongTensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        image_sizes: torch.Tensor | None = None,
        mm_encoder_outputs: dict | None = None,
        sync_latent_passes: bool = False,
        **kwargs,
    ) -> tuple | InternVLCausalLMOutputWithPast:
        r"""
        input_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`):
            Token ids. Positions holding `config.latent_token_id` are continuous thoughts. Latents are found in
            `input_ids` only: with `inputs_embeds` alone the model is the plain InternVL.
        attention_mask (`torch.Tensor` of shape `(batch_size, past_length + sequence_length)`, *optional*):
            1 for tokens to attend to, 0 for padding (left or right). With latents and no `position_ids`, positions
            are counted from it (`cumsum - 1`), so a padded row computes what the row computes alone.
        sync_latent_passes (`bool`, *optional*, defaults to `False`):
            Make every rank of the process group run the same number of language-model passes (all-reduce of the
            pass count). Needed under FSDP and DeepSpeed ZeRO-3, where each forward call gathers parameters.
        labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
            Targets for the language-modelling loss, shifted inside `self.loss_function`; -100 is ignored.

        Returns `InternVLCausalLMOutputWithPast` with logits for every position (or the last `logits_to_keep`), the
        filled cache and the loss.
        """
        latent_mask = self._latent_mask(input_ids)
        num_passes = 1 if latent_mask is None else len(plan_latent_passes(latent_mask))
        if sync_latent_passes:
            device = input_ids.device if input_ids is not None else inputs_embeds.device
            num_passes = agree_on_pass_count(num_passes, device)
        if latent_mask is None and num_passes == 1:
            return super().forward(
                input_ids=input_ids,
                pixel_values=pixel_values,
                attention_mask=attention_mask,
                position_ids=position_ids,
                cache=cache,
                inputs_embeds=inputs_embeds,
                vision_feature_layer=vision_feature_layer,
                vision_feature_select_strategy=vision_feature_select_strategy,
                labels=labels,
                logits_to_keep=logits_to_keep,
                image_sizes=image_sizes,
                mm_encoder_outputs=mm_encoder_outputs,
                **kwargs,
            )
        if latent_mask is None:  # this rank has no latents but another has: split the sequence into passes
            latent_mask = torch.zeros_like(input_ids, dtype=torch.bool)

        past_length = cache.get_seq_length() if cache is not None else 0
        self._check_latent_inputs(latent_mask, attention_mask, past_length, kwargs)

        inputs_embeds = self.get_input_embeddings()(input_ids)  # (B, T, H)
        image_outputs = (mm_encoder_outputs or {}).get("image")
        if pixel_values is not None:
            image_outputs = self.model.get_image_features(
                pixel_values=pixel_values,
                vision_feature_layer=vision_feature_layer,
                vision_feature_select_strategy=vision_feature_select_strategy,
                return_dict=True,
            )
        if image_outputs is not None:
            image_features = image_outputs.pooler_output.to(inputs_embeds.device, inputs_embeds.dtype)
            image_mask = self.model.get_placeholder_mask(input_ids, inputs_embeds, image_features)
            inputs_embeds = inputs_embeds.masked_scatter(image_mask, image_features)

        if position_ids is None:
            if attention_mask is not None and attention_mask.ndim == 2:
                # Same positions as `generate` gives a padded row, and as the row alone, unpadded.
                position_ids = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
                position_ids = position_ids[:, past_length:]
            else:
                position_ids = torch.arange(past_length, past_length + input_ids.shape[1], device=input_ids.device)
                position_ids = position_ids.unsqueeze(0)

        use_cache = kwargs.pop("use_cache", None) is not False
        if cache is None:
            cache = DynamicCache(config=self.config.text_config)

        ranges = plan_latent_passes(latent_mask, min_passes=num_passes)
        hidden_chunks, layer_chunks = [], []
        if self._latents_under_checkpointing():
            # Checkpointed layers cannot keep a KV cache (the backward replay would write it again), so each pass
            # recomputes its whole prefix without one: the same thoughts, exactly, at the cost of more compute.
            if past_length > 0:
                raise ValueError(
                    f"The cache already holds {past_length} tokens, but gradient checkpointing recomputes the latent "
                    "passes from the start. Train without a cache, or disable gradient checkpointing."
                )
            inputs_embeds = self._fill_thoughts_by_prefix(
                inputs_embeds, latent_mask, ranges, attention_mask, position_ids, kwargs
            )
            outputs = self.model.language_model(
                inputs_embeds=inputs_embeds,
                attention_mask=attention_mask,
                position_ids=position_ids,
                use_cache=False,
                **kwargs,
            )
            hidden_chunks.append(outputs.last_hidden_state)
            if outputs.hidden_states is not None:
                layer_chunks.append(outputs.hidden_states)
            use_cache = False
        else:
            for start, end in ranges:
                chunk = inputs_embeds[:, start:end]  # (B, end - start, H)
                if start > 0 and latent_mask[:, start].any():
                    thought = hidden_chunks[-1][:, -1:]  # (B, 1, H): final hidden state at column start - 1
                    first = torch.where(latent_mask[:, start, None, None], thought, chunk[:, :1])
                    chunk = torch.cat([first, chunk[:, 1:]], dim=1)
                outputs = self.model.language_model(
                    inputs_embeds=chunk,
                    attention_mask=_slice_attention_mask(attention_mask, past_length, start, end),
                    position_ids=position_ids[..., start:end],
                    cache=cache,
                    use_cache=True,
                    **kwargs,
                )
                hidden_chunks.append(outputs.last_hidden_state)
                if outputs.hidden_states is not None:
                    layer_chunks.append(outputs.hidden_states)
        # Ranks that could not split their sequence into the agreed number of passes still make the same calls.
        for _ in range(num_passes - len(ranges)):
            self.model.language_model(inputs_embeds=inputs_embeds[:, :1], use_cache=False)

        hidden_states = torch.cat(hidden_chunks, dim=1)  # (B, T, H)
        logits = self.lm_head(slice_logits_to_keep(hidden_states, logits_to_keep))
        loss = None
        if labels is not None:
            loss = self.loss_function(
                logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size, **kwargs
            )
        all_hidden_states = None
        if layer_chunks:
            all_hidden_states = tuple(torch.cat(layer, dim=1) for layer in zip(*layer_chunks))
        return InternVLCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            cache=cache if use_cache else None,
            hidden_states=all_hidden_states,
            image_outputs=image_outputs,
        )

    def _latents_under_checkpointing(self) -> bool:
        """Whether the language model's layers are checkpointed in this forward (training, with gradients)."""
        text_model = self.model.language_model
        return text_model.is_activation_checkpointing and text_model.training and torch.is_grad_enabled()

    def _fill_thoughts_by_prefix(self, inputs_embeds, latent_mask, ranges, attention_mask, position_ids, kwargs):
        """`(B, T, H)` embeddings with every thought in place, each read from a cache-free pass over its prefix."""
        for start, _ in ranges[1:]:
            prefix = self.model.language_model(
                inputs_embeds=inputs_embeds[:, :start],
                attention_mask=None if attention_mask is None else attention_mask[:, :start],
                position_ids=position_ids[..., :start],
                use_cache=False,
                **kwargs,
            )
            if latent_mask[:, start].any():
                thought = prefix.last_hidden_state[:, -1:]  # (B, 1, H): final hidden state at column start - 1
                first = torch.where(latent_mask[:, start, None, None], thought, inputs_embeds[:, start : start + 1])
                inputs_embeds = torch.cat([inputs_embeds[:, :start], first, inputs_embeds[:, start + 1 :]], dim=1)
        return inputs_embeds

    def _check_latent_inputs(self, latent_mask, attention_mask, past_length, kwargs):
        """Raise a `ValueError` for inputs the latent passes cannot compute correctly."""
        rows, columns = latent_mask.nonzero(as_tuple=True)
        if (columns == 0).any():
            row = rows[columns == 0][0].item()
            raise ValueError(
                f"`input_ids` row {row} has a `<|latent|>` token (id {self.config.latent_token_id}) at column 0: a "
                "continuous thought is the hidden state of the position before it, and there is none. Put the "
                "question and `<|start-latent|>` before the latent tokens."
            )
        if attention_mask is not None and attention_mask.ndim == 2 and len(rows) > 0:
            before = attention_mask[rows, past_length + columns - 1] == 0
            if before.any():
                row, column = rows[before][0].item(), columns[before][0].item()
                raise ValueError(
                    f"`input_ids` row {row} has a `<|latent|>` token at column {column} right after padding "
                    f"(`attention_mask[{row}, {past_length + column - 1}]` is 0), so it has no hidden state to "
                    "take. Start each row's thoughts after real tokens."
                )
        if kwargs.get("output_attentions"):
            raise ValueError(
                "`output_attentions=True` is not supported with `<|latent|>` tokens: each pass attends over a "
                "different number of keys. Run the forward without latents, or without `output_attentions`."
            )


CoconutInternVLConfig.register_for_auto_class()
CoconutInternVLForConditionalGeneration.register_for_auto_class("AutoModel")

__all__ = ["CoconutInternVLForConditionalGeneration", "plan_latent_passes", "agree_on_pass_count"]
