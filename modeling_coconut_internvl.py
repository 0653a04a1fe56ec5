"""Coconut-InternVL: InternVL whose `<|latent|>` tokens are continuous thoughts (Hao et al. 2024, arXiv 2412.06769).

The input embedding at every `<|latent|>` position is the language model's final hidden state (after the final norm,
the vector the LM head reads) at the position just before it. The forward pass therefore runs the language model in
sequential passes over one KV cache: a pass ends right before every column that holds a latent, and the next pass
starts with the thought the previous pass produced. Images are encoded once, before the first pass.
"""

import copy
from contextlib import contextmanager

import torch
import torch.distributed as dist
from transformers import GenerationConfig, InternVLForConditionalGeneration
from transformers.cache_utils import Cache, DynamicCache
from transformers.conversion_mapping import get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
from transformers.integrations.fsdp import is_fsdp_managed_module
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

# InternVL checkpoints on the Hub keep the legacy key layout (`language_model.lm_head.weight`, ...); transformers renames
# those keys by model type, so read them for `coconut_internvl` exactly as for `internvl`.
if get_checkpoint_conversion_mapping("coconut_internvl") is None:
    register_checkpoint_conversion_mapping("coconut_internvl", get_checkpoint_conversion_mapping("internvl"))


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


@contextmanager
def _layers_keep_cache(layers, enabled: bool):
    """Let checkpointed decoder layers keep the KV cache for the duration of a latent forward.

    `GradientCheckpointingLayer` drops the cache because the backward replay of a layer would update it a second
    time. `_seal_pass_cache` makes that replay see exactly the cache the pass saw, so the cache can stay.
    """
    if not enabled:
        yield
        return
    for layer in layers:
        layer._can_checkpoint_with_cache = True
    try:
        yield
    finally:
        for layer in layers:
            del layer._can_checkpoint_with_cache  # back to the class default


def _seal_pass_cache(cache: DynamicCache, keys_before: list, text_config) -> DynamicCache:
    """Leave `cache` as it was before the pass (for the pass's backward replay) and continue in a new cache.

    The replay of a checkpointed layer calls `cache.update` again with the same new keys and values; with the old
    entries put back it returns exactly the tensors of the first run. Later passes write into the returned copy,
    which holds the same tensors (and autograd history) as `cache` did after the pass.
    """
    continued = DynamicCache(config=text_config)
    for index, (layer, before) in enumerate(zip(cache.layers, keys_before)):
        continued.update(layer.keys, layer.values, index)
        layer.keys, layer.values = before if before is not None else (layer.keys[..., :0, :], layer.values[..., :0, :])
    return continued


def _check_left_padded(attention_mask: torch.Tensor) -> None:
    """Generation appends to the right end of each row: right padding would put the new tokens after the padding."""
    if attention_mask.ndim == 2 and not attention_mask[:, -1].all():
        rows = (attention_mask[:, -1] == 0).nonzero().flatten().tolist()
        raise ValueError(
            f"Rows {rows} of `attention_mask` end in padding: generating with thoughts needs left padding. "
            "Tokenize with `padding_side='left'` (the processor's default)."
        )


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
        num_passes = 1 if latent_mask is None else len(ranges := plan_latent_passes(latent_mask))
        if sync_latent_passes:
            device = input_ids.device if input_ids is not None else inputs_embeds.device
            agreed = agree_on_pass_count(num_passes, device)
            if agreed > num_passes:  # this rank splits its passes further, or makes passes it has no latents for
                if latent_mask is None:
                    shape = input_ids.shape if input_ids is not None else inputs_embeds.shape[:2]
                    latent_mask = torch.zeros(shape, dtype=torch.bool, device=device)
                num_passes, ranges = agreed, plan_latent_passes(latent_mask, min_passes=agreed)
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
        past_length = cache.get_seq_length() if cache is not None else 0
        self._check_latent_inputs(latent_mask, attention_mask, past_length, kwargs)

        if inputs_embeds is None:
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
            if isinstance(attention_mask, torch.Tensor) and attention_mask.ndim == 2:
                # Same positions as `generate` gives a padded row, and as the row alone, unpadded.
                position_ids = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
                position_ids = position_ids[:, past_length:]
            else:
                position_ids = torch.arange(past_length, past_length + latent_mask.shape[1], device=latent_mask.device)
                position_ids = position_ids.unsqueeze(0)

        use_cache = kwargs.pop("use_cache", None) is not False
        if cache is None:
            cache = DynamicCache(config=self.config.text_config)

        checkpointing = self._checkpointing_layers()
        hidden_chunks, layer_chunks = [], []
        with _layers_keep_cache(self.model.language_model.layers, checkpointing):
            for start, end in ranges:
                chunk = inputs_embeds[:, start:end]  # (B, end - start, H)
                if start > 0 and latent_mask[:, start].any():
                    thought = hidden_chunks[-1][:, -1:]  # (B, 1, H): final hidden state at column start - 1
                    first = torch.where(latent_mask[:, start, None, None], thought, chunk[:, :1])
                    chunk = torch.cat([first, chunk[:, 1:]], dim=1)
                if checkpointing:
                    keys_before = [
                        (layer.keys, layer.values) if layer.is_initialized else None for layer in cache.layers
                    ]
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
                if checkpointing:
                    cache = _seal_pass_cache(cache, keys_before, self.config.text_config)
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
        if isinstance(attention_mask, torch.Tensor) and attention_mask.ndim == 2 and len(rows) > 0:
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
        if self._checkpointing_layers():
            checkpoints = [
                getattr(layer, "_gradient_checkpointing_func", None) for layer in self.model.language_model.layers
            ]
            if any(getattr(checkpoint, "keywords", {}).get("use_reentrant", False) for checkpoint in checkpoints):
                raise ValueError(
                    "Gradient checkpointing with `use_reentrant=True` loses the gradient that flows from later "
                    "thoughts into earlier keys and values. Enable it with "
                    "`gradient_checkpointing_kwargs={'use_reentrant': False}` (the transformers default)."
                )

    def _checkpointing_layers(self) -> bool:
        """Whether the language model's layers are checkpointed in this forward (training with gradients)."""
        text_model = self.model.language_model
        return text_model.is_activation_checkpointing and text_model.training and torch.is_grad_enabled()

    def append_latent_thoughts(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None,
        num_latent_thoughts: int | list[int],
        pad_token_id: int | None = None,
    ) -> tuple[torch.LongTensor, torch.Tensor]:
        r"""
        Append Coconut's inference block, `<|start-latent|>` + k × `<|latent|>` + `<|end-latent|>`, to each prompt.

        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`): left-padded prompts.
            attention_mask (`torch.Tensor` of shape `(batch_size, sequence_length)`, *optional*): their padding mask.
            num_latent_thoughts (`int` or `list[int]`): k for every prompt, or one k per prompt.
            pad_token_id (`int`, *optional*): fills the left padding; defaults to the generation config's.

        Returns:
            `(input_ids, attention_mask)` of shape `(batch_size, sequence_length + max(k) + 2)`, still left-padded.
        """
        config = self.config
        if None in (config.latent_token_id, config.start_latent_token_id, config.end_latent_token_id):
            raise ValueError(
                "`num_latent_thoughts` needs `latent_token_id`, `start_latent_token_id` and `end_latent_token_id` in "
                f"the config, got {config.latent_token_id}, {config.start_latent_token_id}, "
                f"{config.end_latent_token_id}. Convert the checkpoint with `convert_to_coconut.py` first."
            )
        batch_size = input_ids.shape[0]
        counts = [num_latent_thoughts] * batch_size if isinstance(num_latent_thoughts, int) else num_latent_thoughts
        if len(counts) != batch_size or any(count < 0 for count in counts):
            raise ValueError(
                f"`num_latent_thoughts` must be a non-negative int or one per prompt ({batch_size} prompts), got "
                f"{num_latent_thoughts}."
            )
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        _check_left_padded(attention_mask)
        if pad_token_id is None:
            pad_token_id = self.generation_config.pad_token_id
        if pad_token_id is None:
            pad_token_id = config.text_config.pad_token_id or 0

        new_length = input_ids.shape[1] + max(counts) + 2
        new_ids = torch.full((batch_size, new_length), pad_token_id, dtype=input_ids.dtype, device=input_ids.device)
        new_mask = torch.zeros((batch_size, new_length), dtype=attention_mask.dtype, device=attention_mask.device)
        for row, count in enumerate(counts):
            block = [config.start_latent_token_id] + [config.latent_token_id] * count + [config.end_latent_token_id]
            ids = torch.cat([input_ids[row][attention_mask[row].bool()], input_ids.new_tensor(block)])
            new_ids[row, new_length - len(ids) :] = ids
            new_mask[row, new_length - len(ids) :] = 1
        return new_ids, new_mask

    def generate(
        self,
        inputs: torch.LongTensor | None = None,
        generation_config: GenerationConfig | None = None,
        num_latent_thoughts: int | list[int] | None = None,
        synced_gpus: bool | None = None,
        **kwargs,
    ):
        r"""
        [`GenerationMixin.generate`] with continuous thoughts: the latent passes run once over the prompt while it fills
        the KV cache, then decoding goes on from that cache one token at a time. Every decoding strategy, streamer,
        stopping criterion and output option of `generate` works as usual.

        Args:
            inputs (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
                Left-padded prompt ids (or pass `input_ids=`). Prompts may already hold latent blocks.
            num_latent_thoughts (`int` or `list[int]`, *optional*):
                Append `<|start-latent|>` + k × `<|latent|>` + `<|end-latent|>` to every prompt (see
                [`~CoconutInternVLForConditionalGeneration.append_latent_thoughts`]).
            synced_gpus (`bool`, *optional*):
                As in `generate`; under FSDP / ZeRO-3 (the default then) every rank also runs the same number of latent
                passes, whatever its prompts' thoughts.

        `<|latent|>` is never generated: a thought needs the hidden state before it, which decoding does not keep.

        Example:

        ```python
        >>> output_ids = model.generate(**inputs, num_latent_thoughts=6, max_new_tokens=32)
        ```
        """
        input_ids = inputs if inputs is not None else kwargs.pop("input_ids", None)
        if num_latent_thoughts is not None:
            if input_ids is None:
                raise ValueError("`num_latent_thoughts` needs the prompt as `input_ids`, got none.")
            pad_token_id = kwargs.get("pad_token_id", getattr(generation_config, "pad_token_id", None))
            input_ids, kwargs["attention_mask"] = self.append_latent_thoughts(
                input_ids, kwargs.get("attention_mask"), num_latent_thoughts, pad_token_id
            )
        if self._latent_mask(input_ids) is not None and kwargs.get("attention_mask") is not None:
            _check_left_padded(kwargs["attention_mask"])

        latent_token_id = self.config.latent_token_id
        if latent_token_id is not None:
            # One generation config carries every setting: `generate` warns when it gets a config and settings both.
            generation_config = copy.deepcopy(generation_config or self.generation_config)
            kwargs = generation_config.update(**kwargs)
            generation_config.suppress_tokens = sorted({*(generation_config.suppress_tokens or []), latent_token_id})

        if synced_gpus is None:
            world_size = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
            synced_gpus = (is_deepspeed_zero3_enabled() or is_fsdp_managed_module(self)) and world_size > 1
        if synced_gpus:
            kwargs["sync_latent_passes"] = True
        return super().generate(input_ids, generation_config=generation_config, synced_gpus=synced_gpus, **kwargs)


CoconutInternVLConfig.register_for_auto_class()
CoconutInternVLForConditionalGeneration.register_for_auto_class("AutoModel")

__all__ = ["CoconutInternVLForConditionalGeneration", "plan_latent_passes", "agree_on_pass_count"]
