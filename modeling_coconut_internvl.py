"""Coconut-InternVL: InternVL whose `<|latent|>` tokens are continuous thoughts (Hao et al. 2024, arXiv 2412.06769).

The input embedding at every `<|latent|>` position is the language model's final hidden state (after the final norm,
the vector the LM head reads) at the position just before it. The forward pass therefore runs the language model in
sequential passes over one KV cache: a pass ends right before every column that holds a latent, and the next pass
starts with the thought the previous pass produced. Images are encoded once, before the first pass. Rows whose thoughts
sit at different columns are first moved inside the batch so that their thoughts share columns, which keeps the number
of passes at (most thoughts in a row + 1) however the batch was padded.
"""

import inspect
import json
import math
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from transformers import GenerationConfig, InternVLForConditionalGeneration
from transformers.cache_utils import Cache, DynamicCache
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
from transformers.integrations.fsdp import is_fsdp_managed_module
from transformers.masking_utils import create_causal_mask
from transformers.modeling_utils import slice_logits_to_keep
from transformers.models.internvl.modeling_internvl import InternVLCausalLMOutputWithPast
from transformers.utils import logging
from transformers.utils.generic import can_return_tuple
from transformers.utils.versions import require_version


try:  # imported as part of a package: the Hub's remote code, or a repository checkout used as one
    from .configuration_coconut_internvl import CoconutInternVLConfig
    from .latent_block_coconut_internvl import (
        check_config_latent_ids,
        is_auto,
        latent_block,
        repository_file,
        thought_count,
        thought_counts,
        tokenizer_latent_ids,
    )
except ImportError:  # imported from the repository root, e.g. `python train_sft.py`
    from configuration_coconut_internvl import CoconutInternVLConfig
    from latent_block_coconut_internvl import (
        check_config_latent_ids,
        is_auto,
        latent_block,
        repository_file,
        thought_count,
        thought_counts,
        tokenizer_latent_ids,
    )


logger = logging.get_logger(__name__)

# Tested from 5.23.0 to the newest release (README.md, docs/latent-forward.md). Below it, fail here by name instead of
# deep inside a forward.
require_version("transformers>=5.23.0", "Coconut-InternVL's remote code needs it: pip install -U transformers")

# transformers 5.24 renamed the cache argument `past_key_values` to `cache` (models, masks, model outputs) and InternVL's
# output field `image_hidden_states` (the image features) to `image_outputs` (the vision tower's output). Both names are
# read once here, from the parent class, and every call in this file uses them: one code path for every release.
CACHE_NAME = (
    "cache" if "cache" in inspect.signature(InternVLForConditionalGeneration.forward).parameters else "past_key_values"
)
IMAGE_OUTPUT_NAME = (
    "image_outputs"
    if "image_outputs" in InternVLCausalLMOutputWithPast.__dataclass_fields__
    else "image_hidden_states"
)

# InternVL's key layout on the Hub (`language_model.model.*`, `language_model.lm_head.*`, ...), which transformers also
# writes back when it saves an InternVL. transformers maps it for its own InternVL classes only, not for remote code, so
# `from_pretrained` passes it as `key_mapping` (regex -> replacement, applied in order).
# `generate`'s settings of `num_latent_thoughts="auto"`: read from the generation config (`generation_config.json`).
LATENT_GENERATION_SETTINGS = ("max_latent_thoughts", "latent_stop_threshold")
DEFAULT_LATENT_STOP_THRESHOLD = 0.5

INTERNVL_KEY_MAPPING = {
    r"^language_model.lm_head": "lm_head",
    r"^language_model.model": "model.language_model",
    r"^vision_tower": "model.vision_tower",
    r"^multi_modal_projector": "model.multi_modal_projector",
}


@dataclass
class CoconutCausalLMOutputWithPast(InternVLCausalLMOutputWithPast):
    r"""
    stop_logits (`torch.FloatTensor` of shape `(batch_size, sequence_length)`, *optional*):
        The stop head's logit at every position of a forward with thoughts (a model with `latent_stop_head`). At each
        `<|latent|>` position, the final hidden state is computed with that thought fed in; its logit says whether the
        block ends after that thought. Other positions are not meaningful.
    stop_loss (`torch.FloatTensor` of shape `()`, *optional*):
        Binary cross-entropy of `stop_logits` against the `stop_labels` passed in (not part of `loss`).
    latent_counts (`torch.LongTensor` of shape `(batch_size,)`, *optional*):
        With `latent_stop_threshold`: each row's number of thoughts, the `<|latent|>` columns it took before the stop
        head ended its block.
    """

    stop_logits: torch.FloatTensor | None = None
    stop_loss: torch.FloatTensor | None = None
    latent_counts: torch.LongTensor | None = None


def latent_stop_labels(
    input_ids: torch.LongTensor, latent_token_id: int, rows: torch.BoolTensor | None = None
) -> torch.Tensor:
    """Targets `(batch_size, sequence_length)` of the stop head: at each `<|latent|>` position (whose final hidden state
    is computed with that thought fed in), 1.0 where the block ends after that thought and 0.0 where another follows;
    -100 elsewhere and in the rows not in `rows` (`(batch_size,)`, default all).

    Example: a row `q <|start-latent|> <|latent|> <|latent|> <|end-latent|>` gets `[-100, -100, 0, 1, -100]`.
    """
    latent = input_ids == latent_token_id  # (B, T)
    followed = torch.zeros_like(latent)
    followed[:, :-1] = latent[:, 1:]  # another thought comes right after this one
    labels = torch.full(input_ids.shape, -100.0, device=input_ids.device)
    labels[latent] = (~followed[latent]).float()
    if rows is not None:
        labels[~rows.to(labels.device)] = -100.0
    return labels


@contextmanager
def _checkpointed_layers_keep_cache(layers):
    """Let checkpointed decoder layers keep the KV cache for one latent forward; yields whether they do.

    transformers' `GradientCheckpointingLayer` drops the cache, because the backward replay of a layer would update it a
    second time, unless the layer's `_can_checkpoint_with_cache` is True. That flag is private, and this is the only
    code that touches it. `_seal_pass_cache` makes the replay see exactly the cache the pass saw, so the cache can stay.
    Where this transformers has no such flag, it yields False and the latent passes recompute their prefix instead
    (exact, slower); where the flag exists but no longer works, the forward finds the cache empty after its first
    pass and does the same.
    """
    if not all(hasattr(layer, "_can_checkpoint_with_cache") for layer in layers):
        yield False
        return
    for layer in layers:
        layer._can_checkpoint_with_cache = True
    try:
        yield True
    finally:
        for layer in layers:
            del layer._can_checkpoint_with_cache  # back to the class default


def _seal_pass_cache(cache: DynamicCache, pass_length: int, text_config) -> DynamicCache:
    """Leave `cache` as it was before the pass (for the pass's backward replay) and continue in a new cache.

    The replay of a checkpointed layer calls `cache.update` again with the same new keys and values; with the pass's
    `pass_length` columns cropped off, it returns exactly the tensors of the first run. Later passes write into the
    returned copy, which holds the same tensors (and autograd history) as `cache` did after the pass.
    """
    continued = DynamicCache(config=text_config)
    for index, layer in enumerate(cache.layers):
        continued.update(layer.keys, layer.values, index)
    cache.crop(-pass_length)  # a negative count removes that many columns from the end
    return continued


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


@dataclass
class LatentRowPlacement:
    """Tokens moved inside a batch: token `(b, t)` goes to row `rows[b, t]`, column `columns[b, t]` of a batch of
    `num_rows` rows `width` wide.

    Each row is rotated as a whole (`columns[b] = (arange(T) + shift[b]) % width`), so its real tokens keep their order
    and neighbours and its padding wraps around to the other end. Sequences packed into one row (restarting
    `position_ids`, no attention mask) each get a row of their own first. Positions come with the tokens, so a moved
    row computes exactly what it computed in place.
    """

    rows: torch.LongTensor  # (B, T)
    columns: torch.LongTensor  # (B, T)
    num_rows: int
    width: int

    def place(self, tensor: torch.Tensor) -> torch.Tensor:
        """`(B, T, ...)` in the caller's layout -> `(num_rows, width, ...)`; places no token moved to hold zeros."""
        placed = tensor.new_zeros((self.num_rows, self.width, *tensor.shape[2:]))
        return placed.index_put((self.rows, self.columns), tensor)

    def restore(self, tensor: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """Back to the caller's layout along `dim`: `(num_rows, ..., width, ...)` -> `(B, ..., T, ...)`."""
        return tensor.movedim(dim, 1)[self.rows, self.columns].movedim(1, dim)

    def restore_cache(self, cache: DynamicCache, into: DynamicCache) -> DynamicCache:
        """Write the keys and values of `cache`, `(num_rows, heads, width, head_dim)` a layer, into `into` in caller
        order, `(B, heads, T, head_dim)`."""
        for index, layer in enumerate(cache.layers):
            into.update(self.restore(layer.keys, dim=2), self.restore(layer.values, dim=2), index)
        return into


def _sequence_rows(shape, position_ids: torch.LongTensor | None) -> LatentRowPlacement:
    """Every sequence in a row of its own, from column 0: sequences packed into one row start where `position_ids` do
    not go up by one. Without `position_ids` each row stays as it is."""
    batch_size, length = shape
    arange = torch.arange(length, device=position_ids.device if position_ids is not None else None)
    if position_ids is None:
        rows = torch.arange(batch_size, device=arange.device)[:, None].expand(batch_size, length)
        return LatentRowPlacement(rows, arange.expand(batch_size, length), batch_size, length)
    positions = position_ids.expand(batch_size, length)
    starts = torch.ones_like(positions, dtype=torch.bool)
    starts[:, 1:] = positions.diff(dim=-1) != 1
    sequence = starts.long().cumsum(dim=-1) - 1  # (B, T): the sequence's index in its row
    sequences_per_row = sequence[:, -1] + 1  # (B,)
    rows = (sequences_per_row.cumsum(0) - sequences_per_row)[:, None] + sequence
    columns = arange - torch.where(starts, arange, 0).cummax(dim=-1).values  # (B, T): offset from its start
    return LatentRowPlacement(rows, columns, int(sequences_per_row.sum()), int(columns.max()) + 1)


def align_latent_rows(
    latent_mask: torch.Tensor, attention_mask: torch.Tensor | None, packed_position_ids: torch.LongTensor | None = None
) -> LatentRowPlacement | None:
    """Move rows so that every row's first `<|latent|>` falls in the same column, where that saves passes.

    Every row with thoughts is moved by `target - first_latent`, with the smallest `target` that moves no row's first
    real token before column 0; a row therefore moves right into its right padding, or left into its left padding,
    and the batch widens only where a row runs out of padding. Rows whose thoughts form one block then share their
    latent columns, and the batch costs (most thoughts in a row + 1) passes.

    Args:
        latent_mask (`torch.BoolTensor` of shape `(batch_size, sequence_length)`): where the `<|latent|>` tokens are.
        attention_mask (`torch.Tensor` of shape `(batch_size, sequence_length)`, *optional*): 1 for real tokens.
        packed_position_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*): positions of
            rows without an attention mask; sequences packed into a row (where positions restart) get a row each.

    Returns:
        A [`LatentRowPlacement`], or `None` where moving the rows would not take fewer passes.
    """
    sequences = _sequence_rows(latent_mask.shape, packed_position_ids)
    real = attention_mask.bool() if attention_mask is not None else torch.ones_like(latent_mask)
    latent, real = sequences.place(latent_mask), sequences.place(real)  # (R, L): one sequence a row
    length = sequences.width
    has_thoughts = latent.any(dim=1)
    first_latent = latent.int().argmax(dim=1)  # (R,)
    first_real = real.int().argmax(dim=1)
    end_real = length - real.flip(1).int().argmax(dim=1)  # one past each row's last real token
    target = int((first_latent - first_real)[has_thoughts].max())
    shift = torch.where(has_thoughts, target - first_latent, 0)  # (R,)
    width = max(length, int((end_real + shift).max()))
    columns = (sequences.columns + shift[sequences.rows]) % width  # (B, T)
    placement = LatentRowPlacement(sequences.rows, columns, sequences.num_rows, width)
    if placement.place(latent_mask).any(dim=0).sum() >= latent_mask.any(dim=0).sum():
        return None
    return placement


def _slice_attention_mask(attention_mask, past_length: int, start: int, end: int):
    """The caller's attention mask for the pass over columns `[start, end)` with `past_length` tokens already cached.

    A 2D padding mask covers every key seen so far: `(batch_size, past_length + end)`. A prepared 4D mask (static
    cache in `generate`) is `(batch_size, 1, query_length, key_length)` with a fixed key length: keep the pass's rows.
    """
    if attention_mask is None:
        return None
    if isinstance(attention_mask, dict):
        return {key: _slice_attention_mask(mask, past_length, start, end) for key, mask in attention_mask.items()}
    if attention_mask.ndim == 2:
        return attention_mask[:, : past_length + end]
    return attention_mask[:, :, start:end]


def _prefix_mask(attention_mask, end: int):
    """A 2D padding mask, a 4D mask or a mapping of them, cut to the first `end` columns (queries and keys)."""
    if attention_mask is None:
        return None
    if isinstance(attention_mask, dict):
        return {key: _prefix_mask(mask, end) for key, mask in attention_mask.items()}
    return attention_mask[:, :end] if attention_mask.ndim == 2 else attention_mask[:, :, :end, :end]


def _check_left_padded(attention_mask: torch.Tensor) -> None:
    """Generation appends to the right end of each row: right padding would put the new tokens after the padding."""
    if attention_mask.ndim == 2 and not attention_mask[:, -1].all():
        rows = (attention_mask[:, -1] == 0).nonzero().flatten().tolist()
        raise ValueError(
            f"Rows {rows} of `attention_mask` end in padding: generating with thoughts needs left padding. "
            "Tokenize with `padding_side='left'` (the processor's default)."
        )


def _check_pixel_values(pixel_values: torch.Tensor | None) -> None:
    if pixel_values is not None and pixel_values.shape[0] == 0:
        raise ValueError(
            f"`pixel_values` holds 0 image tiles (shape {tuple(pixel_values.shape)}). For text-only inputs pass "
            "`pixel_values=None`; otherwise check that the images reached the processor."
        )


def _check_latent_blocks(input_ids: torch.LongTensor, attention_mask: torch.Tensor | None, config) -> None:
    """Every `<|latent|>` of a prompt must sit in a block `<|start-latent|>` + `<|latent|>`... + `<|end-latent|>`.

    A config whose start and end ids are swapped reads the processor's blocks the wrong way round: the model then
    thinks after the marker it was trained to end on, and answers wrongly without an error.
    """
    block_ids = (config.start_latent_token_id, config.latent_token_id, config.end_latent_token_id)
    if None in block_ids:
        return
    start, latent, end = block_ids
    real = attention_mask.bool() if attention_mask is not None and attention_mask.ndim == 2 else None
    for row, ids in enumerate(input_ids):
        ids = ids[real[row]] if real is not None else ids
        markers = ids[torch.isin(ids, ids.new_tensor(block_ids))].tolist()  # the block tokens only, in order
        inside = False
        for token in markers:
            if (token == start) == inside:  # a start inside a block, or a latent or end outside one
                names = {start: "<|start-latent|>", latent: "<|latent|>", end: "<|end-latent|>"}
                raise ValueError(
                    f"Prompt {row}'s latent tokens read {' '.join(names[t] for t in markers)} by the config's ids "
                    f"(`start_latent_token_id`={start}, `latent_token_id`={latent}, `end_latent_token_id`={end}), "
                    "not as blocks `<|start-latent|>` + `<|latent|>`... + `<|end-latent|>`. If the processor built the "
                    "prompt, the config's ids are not the tokenizer's (start and end swapped?): "
                    "`processor.check_latent_token_ids(model.config)` names them; set them to the tokenizer's ids."
                )
            inside = token != end
        if inside and markers[-1] == start and ids[-1] == start:
            raise ValueError(
                f"Prompt {row} ends with `<|start-latent|>` alone (id {start}), an open block that `generate` does "
                "not fill. To let the stop head choose the number of thoughts, build the prompt without a block and "
                'pass `num_latent_thoughts="auto"` (to the processor, whose output carries it, or to `generate`).'
            )
        if inside:
            raise ValueError(
                f"Prompt {row} ends inside a latent block: its last `<|start-latent|>` (id {start}) has no "
                f"`<|end-latent|>` (id {end}), which `generate` never writes. Close the block in the prompt, or "
                "pass `num_latent_thoughts` to append a whole one."
            )


def latent_position_ids(attention_mask, position_ids, past_length: int, inputs_embeds) -> torch.LongTensor:
    """`(B, T)` positions counted from a 2D attention mask, as `generate` counts them; else from `past_length`."""
    if position_ids is not None:
        return position_ids
    if isinstance(attention_mask, torch.Tensor) and attention_mask.ndim == 2:
        # Same positions as `generate` gives a padded row, and as the row alone, unpadded.
        position_ids = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
        return position_ids[:, past_length:]
    length = inputs_embeds.shape[1]
    return torch.arange(past_length, past_length + length, device=inputs_embeds.device).unsqueeze(0)


@dataclass
class LatentPassPlan:
    """How a forward with thoughts runs: the language-model passes over column `ranges` (`num_passes` of them, more
    than the ranges where ranks must agree), on rows moved by `placement` (`None`: in place); `latent_mask`
    `(batch_size, width)` is where the thoughts are in the rows as the passes see them."""

    latent_mask: torch.BoolTensor | None
    ranges: list[tuple[int, int]]
    num_passes: int
    placement: LatentRowPlacement | None

    def place_inputs(self, inputs_embeds, attention_mask, position_ids, past_length: int):
        """Embeddings `(B, T, H)`, attention mask and positions `(B, T)` in the rows as the passes see them (moved
        rows get a mask of ones where none was given); positions are counted where none were given (see
        [`latent_position_ids`])."""
        if self.placement is not None:
            shape = inputs_embeds.shape[:2]
            if attention_mask is None:
                attention_mask = torch.ones(shape, dtype=torch.long, device=inputs_embeds.device)
            if position_ids is not None:  # each row's positions move with it
                position_ids = self.placement.place(position_ids.expand(shape))
            inputs_embeds, attention_mask = self.placement.place(inputs_embeds), self.placement.place(attention_mask)
        position_ids = latent_position_ids(attention_mask, position_ids, past_length, inputs_embeds)
        return inputs_embeds, attention_mask, position_ids

    def restore_outputs(self, hidden_states, layer_hidden_states, pass_cache, cache, text_config):
        """Hidden states, every layer's hidden states and the cache (written into `cache` where one was given) back
        in the caller's layout."""
        if self.placement is None:
            return hidden_states, layer_hidden_states, pass_cache
        hidden_states = self.placement.restore(hidden_states)
        if layer_hidden_states is not None:
            layer_hidden_states = tuple(self.placement.restore(layer) for layer in layer_hidden_states)
        if pass_cache is not None:
            into = cache if cache is not None else DynamicCache(config=text_config)
            pass_cache = self.placement.restore_cache(pass_cache, into)
        return hidden_states, layer_hidden_states, pass_cache


class LatentStopRule:
    """The stop head ending each row's block inside the latent passes (a forward with `latent_stop_threshold`).

    After the pass that feeds a row's thought, the head reads the final hidden state there (computed with that
    thought); at a stop probability of `threshold` or more the row's block ends: its later `<|latent|>` columns are
    masked out of `attention_mask` (they become padding that no token attends to) and `counts` keeps its number of
    thoughts. Positions were counted before, so the rows that go on keep theirs.

    Args:
        head (`nn.Module`): the stop head, `(..., hidden_size) -> (..., 1)`.
        threshold (`float`): the stop probability that ends a block.
        latent_mask (`torch.BoolTensor` of shape `(batch_size, sequence_length)`): where the `<|latent|>` tokens are.
        attention_mask (`torch.LongTensor` of shape `(batch_size, past_length + sequence_length)`): a copy, which
            the rule updates.
        past_length (`int`): tokens already in the cache.
    """

    def __init__(self, head, threshold: float, latent_mask, attention_mask, past_length: int):
        self.head, self.threshold, self.latent_mask = head, threshold, latent_mask
        self.attention_mask, self.past_length = attention_mask, past_length
        self.thinking = latent_mask.any(dim=1)  # (B,)
        self.counts = torch.zeros_like(self.thinking, dtype=torch.long)  # (B,)

    def after_pass(self, start: int, end: int, hidden_states: torch.Tensor) -> bool:
        """Read the thought of a one-column pass over `[start, end)` (final hidden states `(B, 1, H)`); returns whether
        the passes can end here: no row thinks any more, and every later column is a thought no row takes."""
        if end - start != 1 or not self.latent_mask[:, start].any():
            return False
        took = self.thinking & self.latent_mask[:, start]  # (B,)
        self.counts += took.long()
        stop = torch.sigmoid(self.head(hidden_states[:, -1]).float()).view(-1) >= self.threshold
        self.thinking &= ~(took & stop)
        later = self.latent_mask[:, end:] & ~self.thinking[:, None]  # (B, T - end): thoughts no longer taken
        self.attention_mask[:, self.past_length + end :].masked_fill_(later, 0)
        return not self.thinking.any() and bool(self.latent_mask[:, end:].all())


def _unused_thoughts_to_the_left(cache: DynamicCache, counts: torch.LongTensor, text_config) -> DynamicCache:
    """The cache of prompts with `<|start-latent|>` and their thoughts, each row's masked thought columns (those after
    its block ended, at the end of the row) moved into its left padding: the layout of the same prompts with blocks
    of `counts` thoughts appended ([`~CoconutInternVLForConditionalGeneration.append_latent_thoughts`]), less the
    closing `<|end-latent|>`. Positions came from the attention mask, so the keys hold wherever their column is."""
    width, batch_size = cache.get_seq_length(), counts.shape[0]
    device = cache.layers[0].keys.device
    shift = (counts.max() - counts).to(device)  # (B,): the row's masked columns
    columns = (torch.arange(width, device=device) - shift[:, None]) % width  # (B, W): where each column comes from
    rows = torch.arange(batch_size, device=device)[:, None].expand(batch_size, width)
    return LatentRowPlacement(rows, columns, batch_size, width).restore_cache(cache, DynamicCache(config=text_config))


def _weights_file(pretrained_model_name_or_path, name: str, kwargs) -> str:
    """The weights file that holds the tensor `name` (after the key mapping: its file name where the checkpoint is
    sharded and its index names it), for messages."""
    index = repository_file(pretrained_model_name_or_path, "model.safetensors.index.json", **kwargs)
    if index is not None:
        with open(index, encoding="utf-8") as file:
            weight_map = json.load(file).get("weight_map", {})
        shard = weight_map.get(name)
        return f"{pretrained_model_name_or_path}/{shard or 'model-*.safetensors (one of the shards)'}"
    return f"{pretrained_model_name_or_path}/model.safetensors"


def _check_loaded_weights(model, pretrained_model_name_or_path, kwargs, warn_above: float = 1e4) -> None:
    """Refuse weights that hold NaN or infinity (a flipped bit, a truncated download, a diverged run), naming the
    tensor and its file; warn on weights larger than `warn_above` in magnitude, which trained weights never reach."""
    for name, tensor in model.state_dict().items():
        if not tensor.is_floating_point() or tensor.device.type == "meta" or tensor.numel() == 0:
            continue
        peak = tensor.detach().abs().amax().float().item()  # NaN or inf where the tensor holds one
        if math.isfinite(peak) and peak <= warn_above:
            continue
        where = _weights_file(pretrained_model_name_or_path, name, kwargs)
        if not math.isfinite(peak):
            bad = int((~torch.isfinite(tensor)).sum())
            raise ValueError(
                f"The weights in {where} are damaged: `{name}` {tuple(tensor.shape)} holds {bad} non-finite values "
                "(NaN or infinity), and every output would be NaN. Download or copy the file again, or load the "
                "checkpoint saved before it."
            )
        logger.warning(
            f"`{name}` in {where} holds a weight of magnitude {peak:.3g}, beyond {warn_above:g}, which trained "
            "weights do not reach: the file may be damaged (a flipped bit). Compare it with its source."
        )


def _image_output(image_outputs):
    """What the output's image field holds on this transformers: the vision tower's output (5.24 and later), or the
    image features (`image_hidden_states` before)."""
    if image_outputs is None or IMAGE_OUTPUT_NAME == "image_outputs":
        return image_outputs
    return image_outputs.pooler_output


def _take_generation_settings(config) -> dict:
    """Remove `"auto"`'s generation settings from a model config that still holds them (one saved before they moved to
    the generation config) and return them, checked."""
    settings = {name: vars(config).pop(name) for name in LATENT_GENERATION_SETTINGS if name in vars(config)}
    check_latent_generation_settings(**settings)
    return settings


def _give_generation_settings(generation_config: GenerationConfig | None, settings: dict) -> None:
    """Set `settings` on `generation_config` where it has no value of its own."""
    for name, value in settings.items():
        if generation_config is not None and getattr(generation_config, name, None) is None:
            setattr(generation_config, name, value)


def _has(generation_config, name: str) -> bool:
    return getattr(generation_config, name, None) is not None


def check_latent_generation_settings(max_latent_thoughts=None, latent_stop_threshold=None) -> None:
    """Raise a `ValueError` naming `max_latent_thoughts` unless it is a whole number of at least 1 (or `None`), and
    `latent_stop_threshold` unless it is a probability (a number in [0, 1], or `None`)."""
    if max_latent_thoughts is not None and thought_count(max_latent_thoughts, "max_latent_thoughts") < 1:
        raise ValueError('`max_latent_thoughts` must be at least 1 with `num_latent_thoughts="auto"`, got 0.')
    if latent_stop_threshold is None:
        return
    number = (
        latent_stop_threshold.item() if getattr(latent_stop_threshold, "ndim", None) == 0 else latent_stop_threshold
    )
    if isinstance(number, bool) or not isinstance(number, (int, float)):
        raise ValueError(
            f"`latent_stop_threshold` must be a number, a probability in [0, 1], got {latent_stop_threshold!r} of type "
            f"{type(latent_stop_threshold).__name__}. Pass a float such as 0.5."
        )
    if not 0.0 <= number <= 1.0:
        raise ValueError(f"`latent_stop_threshold`={number} is not a probability; use a value in [0, 1].")


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

    def __init__(self, config: CoconutInternVLConfig):
        super().__init__(config)
        if self.generation_config is not None:
            # A generation config of the model's own rather than one derived from the model config, whose saved copy
            # would load without the settings below.
            settings = self.generation_config.to_dict()
            self.generation_config = GenerationConfig(
                **{key: value for key, value in settings.items() if not key.startswith("_")}
            )
        # A generated `<|latent|>` would have no hidden state to take, and an answer never opens or closes a latent
        # block: the generation config (saved with the model) suppresses the three tokens once, for every `generate`.
        block_ids = (config.start_latent_token_id, config.end_latent_token_id, config.latent_token_id)
        if self.generation_config is not None and any(token_id is not None for token_id in block_ids):
            suppressed = {*(self.generation_config.suppress_tokens or []), *(i for i in block_ids if i is not None)}
            self.generation_config.suppress_tokens = sorted(suppressed)
        if config.latent_stop_head:
            self.latent_stop_head = nn.Linear(config.text_config.hidden_size, 1)
            self.post_init()
        self._settings_from_config = _take_generation_settings(config)
        _give_generation_settings(self.generation_config, self._settings_from_config)

    def add_latent_stop_head(self) -> nn.Linear:
        """Give the model a freshly initialised stop head (and set `config.latent_stop_head`), on the LM head's device
        and dtype; a model that has one keeps it. Returns the head."""
        if getattr(self, "latent_stop_head", None) is None:
            head = nn.Linear(self.config.text_config.hidden_size, 1)
            self._init_weights(head)
            self.latent_stop_head = head.to(self.lm_head.weight.device, self.lm_head.weight.dtype)
        self.config.latent_stop_head = True
        return self.latent_stop_head

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, key_mapping: dict | None = None, **kwargs):
        r"""
        [`~PreTrainedModel.from_pretrained`], reading InternVL's Hub key layout too ([`INTERNVL_KEY_MAPPING`], before
        any `key_mapping` of yours), then checking the config's latent token ids against the tokenizer saved with the
        weights, where there is one: a config whose `latent_token_id` is an ordinary word of that tokenizer, or whose
        start and end ids are swapped, raises a `ValueError` naming the ids.
        """
        loaded = super().from_pretrained(
            pretrained_model_name_or_path,
            *model_args,
            key_mapping={**INTERNVL_KEY_MAPPING, **(key_mapping or {})},
            **kwargs,
        )
        model = loaded[0] if isinstance(loaded, tuple) else loaded  # `output_loading_info=True` adds the info
        _check_loaded_weights(model, pretrained_model_name_or_path, kwargs)
        # A `config.json` saved before `"auto"`'s settings moved to `generation_config.json` still holds them.
        _give_generation_settings(model.generation_config, model._settings_from_config)
        if pretrained_model_name_or_path is not None and model.config.latent_token_id is not None:
            token_ids = tokenizer_latent_ids(pretrained_model_name_or_path, **kwargs)
            if token_ids is not None:
                check_config_latent_ids(model.config, token_ids, f"the tokenizer in {pretrained_model_name_or_path}")
        return loaded

    def _latent_mask(self, input_ids: torch.LongTensor | None, inputs_embeds=None) -> torch.BoolTensor | None:
        """`(batch_size, sequence_length)` mask of the `<|latent|>` positions, or `None` if there are none.

        Thoughts are found in `input_ids`. Embeddings alone cannot say reliably which positions are thoughts (the
        converter gives the three latent tokens one embedding), so `inputs_embeds` holding the `<|latent|>`
        embedding without `input_ids` is refused rather than run without its thoughts.
        """
        latent_token_id = self.config.latent_token_id
        if latent_token_id is None:
            return None
        if input_ids is None:
            if inputs_embeds is not None:
                self._check_embeds_hold_no_latents(inputs_embeds)
            return None
        latent_mask = input_ids == latent_token_id
        return latent_mask if latent_mask.any() else None

    def _check_embeds_hold_no_latents(self, inputs_embeds: torch.Tensor) -> None:
        latent_embedding = self.get_input_embeddings().weight[self.config.latent_token_id]
        found = (inputs_embeds == latent_embedding.to(inputs_embeds)).all(dim=-1)  # (B, T)
        if found.any():
            rows, columns = found.nonzero(as_tuple=True)
            raise ValueError(
                f"`inputs_embeds` holds the `<|latent|>` embedding (id {self.config.latent_token_id}) at "
                f"{len(rows)} positions (first: row {rows[0].item()}, column {columns[0].item()}), but thoughts are "
                "found in `input_ids`, which were not given, so they would not be fed back. Pass `input_ids` "
                "together with `inputs_embeds`."
            )

    @can_return_tuple
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
        stop_labels: torch.Tensor | None = None,
        latent_stop_threshold: float | None = None,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> tuple | CoconutCausalLMOutputWithPast:
        r"""
        input_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`):
            Token ids. Positions holding `config.latent_token_id` are continuous thoughts. Latents are found in
            `input_ids` only; `inputs_embeds` may come with them, and without them must not hold the `<|latent|>`
            embedding (a `ValueError`: the thoughts could not be found).
        attention_mask (`torch.Tensor` of shape `(batch_size, past_length + sequence_length)`, *optional*):
            1 for tokens to attend to, 0 for padding (left or right). With latents and no `position_ids`, positions
            are counted from it (`cumsum - 1`), so a padded row computes what the row computes alone.
        position_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)` or `(1, sequence_length)`, *optional*):
            Used as given, and moved with their rows. Without an attention mask, positions that restart inside a row
            mark packed sequences (TRL's `padding_free`): each attends only to itself and, with latents, is given a
            row of its own for the passes.
        sync_latent_passes (`bool`, *optional*, defaults to `False`):
            Make every rank of the process group run the same number of language-model passes (all-reduce of the
            pass count). Needed under FSDP and DeepSpeed ZeRO-3, where each forward call gathers parameters.
        labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
            Targets for the language-modelling loss, shifted inside `self.loss_function`; -100 is ignored.
        stop_labels (`torch.Tensor` of shape `(batch_size, sequence_length)`, *optional*):
            Targets of the stop head (a model with `latent_stop_head`), as [`latent_stop_labels`] builds them: 1.0
            where the block ends after the thought whose vector sits there, 0.0 where it goes on, -100 to ignore.
            Their binary cross-entropy is returned as `stop_loss`, apart from `loss`; the trainer weighs it.
        past_key_values (`Cache`, *optional*):
            The name of `cache` in transformers before 5.24 (which `generate` there passes); either name works.
        latent_stop_threshold (`float`, *optional*):
            Let the stop head end each row's block (see [`LatentStopRule`]): after each thought, a row whose stop
            probability reaches it takes no more; its later `<|latent|>` columns are masked out of the attention, as
            padding. `latent_counts` returns each row's count, and where every row has stopped and only thoughts
            follow, the passes end there: the outputs and the cache cover the columns up to there. `generate`
            (`num_latent_thoughts="auto"`) runs the prompts so, with every thought allowed appended.

        With latents, rows whose thoughts start at different columns are moved inside the batch (their padding moves,
        see [`align_latent_rows`]) so that the thoughts share columns, and the outputs are moved back: a batch costs
        (most thoughts in a row + 1) language-model passes however it is padded, with or without `position_ids`. Rows
        stay in place, and every column holding a latent in any row starts a pass, where moving is not possible: a
        cache that already holds tokens, a non-dynamic cache, a prepared 4D attention mask, 3D `position_ids`, or
        sliding-window layers. Logits at padding columns (`attention_mask` 0) are not meaningful; give them the label
        -100.

        Returns [`CoconutCausalLMOutputWithPast`] with logits for every position (or the last `logits_to_keep`), the
        filled cache and the loss; with latents and a stop head also `stop_logits` for every position and, given
        `stop_labels`, `stop_loss`.
        """
        cache = cache if cache is not None else past_key_values
        past_length = cache.get_seq_length() if cache is not None else 0
        latent_mask = self._latent_mask(input_ids, inputs_embeds)
        self._check_inputs(input_ids, pixel_values, mm_encoder_outputs, latent_mask, attention_mask, past_length)
        self._check_stop_inputs(latent_mask, attention_mask, latent_stop_threshold, stop_labels, kwargs)
        plan = self._plan_passes(
            latent_mask, input_ids if input_ids is not None else inputs_embeds[..., 0], attention_mask, position_ids,
            cache, past_length, sync_latent_passes, latent_stop_threshold,
        )  # fmt: skip
        if plan is None:  # no thought: the parent's forward, unchanged
            return super().forward(
                input_ids=input_ids,
                pixel_values=pixel_values,
                attention_mask=attention_mask,
                position_ids=position_ids,
                inputs_embeds=inputs_embeds,
                vision_feature_layer=vision_feature_layer,
                vision_feature_select_strategy=vision_feature_select_strategy,
                labels=labels,
                logits_to_keep=logits_to_keep,
                image_sizes=image_sizes,
                mm_encoder_outputs=mm_encoder_outputs,
                **{CACHE_NAME: cache},
                **kwargs,
            )

        vision = (vision_feature_layer, vision_feature_select_strategy)
        inputs_embeds, image_outputs = self._embed_with_images(
            input_ids, inputs_embeds, pixel_values, mm_encoder_outputs, *vision
        )
        inputs_embeds, attention_mask, position_ids = plan.place_inputs(
            inputs_embeds, attention_mask, position_ids, past_length
        )
        use_cache = kwargs.pop("use_cache", None) is not False
        hidden_states, layer_hidden_states, cache, latent_counts = self._run_latent_passes(
            inputs_embeds, plan, attention_mask, position_ids, cache, use_cache, latent_stop_threshold, kwargs
        )
        logits = self.lm_head(slice_logits_to_keep(hidden_states, logits_to_keep))
        vocab_size = self.config.text_config.vocab_size
        loss = None if labels is None else self.loss_function(logits, labels, vocab_size=vocab_size, **kwargs)
        stop_logits, stop_loss = self._stop_outputs(hidden_states, stop_labels)
        return CoconutCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=layer_hidden_states,
            **{CACHE_NAME: cache, IMAGE_OUTPUT_NAME: _image_output(image_outputs)},  # cache `None` too without
            # `use_cache`, and where checkpointing recomputed the prefixes
            stop_logits=stop_logits,
            stop_loss=stop_loss,
            latent_counts=latent_counts,
        )

    def _plan_passes(
        self, latent_mask, ids, attention_mask, position_ids, cache, past_length: int, sync: bool, stop_threshold
    ) -> "LatentPassPlan | None":
        """The passes of a forward: where the rows move ([`align_latent_rows`]; not with a stop rule, whose masks
        follow the caller's columns) and the column ranges ([`plan_latent_passes`]), as many on every rank with
        `sync` (extra passes split the longest ranges, or run without work). `None` without thoughts, for one pass."""
        placement = None
        if latent_mask is not None and stop_threshold is None:
            if self._can_move_rows(attention_mask, position_ids, cache, past_length, ids.shape):
                packed_positions = position_ids if attention_mask is None else None  # a mask overrides packing
                placement = align_latent_rows(latent_mask, attention_mask, packed_positions)
        if placement is not None:
            latent_mask = placement.place(latent_mask)
        width = placement.width if placement is not None else ids.shape[1]
        ranges = plan_latent_passes(latent_mask) if latent_mask is not None else [(0, width)]
        num_passes = len(ranges)
        if sync:
            ranges, num_passes = self._sync_passes(latent_mask, ranges, num_passes, ids.device)
        if latent_mask is None and num_passes == 1:
            return None
        return LatentPassPlan(latent_mask, ranges, num_passes, placement)

    def _stop_rule(self, threshold, latent_mask, attention_mask, past_length: int) -> "LatentStopRule | None":
        """The stop head's rule for a forward with `latent_stop_threshold` (see [`LatentStopRule`]), else `None`."""
        if threshold is None:
            return None
        if getattr(self, "latent_stop_head", None) is None:
            raise ValueError(
                "`latent_stop_threshold` lets the stop head end each row's block, but the model has no stop head "
                "(`config.latent_stop_head` is False). Pass a count of thoughts, or train the head "
                "(`train_sft.py --latent_stop_head`)."
            )
        mask = attention_mask.clone() if attention_mask is not None else latent_mask.new_ones(latent_mask.shape)
        return LatentStopRule(self.latent_stop_head, float(threshold), latent_mask, mask.long(), past_length)

    def _stop_outputs(self, hidden_states: torch.Tensor, stop_labels: torch.Tensor | None):
        """The stop head's logits `(B, T)` on the final hidden states `(B, T, H)`, and their loss against
        `stop_labels` (mean over the labelled positions); `(None, None)` without a head."""
        head = getattr(self, "latent_stop_head", None)
        if head is None:
            if stop_labels is not None:
                raise ValueError(
                    "`stop_labels` were passed, but the model has no stop head (`config.latent_stop_head` is False). "
                    "Add one with `model.add_latent_stop_head()` (`train_sft.py --latent_stop_head`)."
                )
            return None, None
        stop_logits = head(hidden_states).squeeze(-1).float()  # (B, T)
        if stop_labels is None:
            return stop_logits, None
        stop_labels = stop_labels.to(stop_logits.device, torch.float32)
        labelled = stop_labels != -100
        if not labelled.any():  # a batch without a block to learn from: no signal, but the head stays in the graph
            return stop_logits, stop_logits.sum() * 0.0
        loss = nn.functional.binary_cross_entropy_with_logits(stop_logits[labelled], stop_labels[labelled])
        return stop_logits, loss

    def _sync_passes(self, latent_mask, ranges, num_passes, device):
        """Split this rank's passes further, or add passes without work, to make as many as the busiest rank."""
        agreed = agree_on_pass_count(num_passes, device)
        if agreed <= num_passes:
            return ranges, num_passes
        if latent_mask is None:
            latent_mask = torch.zeros((1, ranges[-1][1]), dtype=torch.bool, device=device)
        return plan_latent_passes(latent_mask, min_passes=agreed), agreed

    def _embed_with_images(
        self, input_ids, inputs_embeds, pixel_values, mm_encoder_outputs, vision_feature_layer, select_strategy
    ):
        """Token embeddings `(B, T, H)` with the image features placed at the image tokens, and the image outputs."""
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        image_outputs = (mm_encoder_outputs or {}).get("image")
        if pixel_values is not None:
            image_outputs = self.model.get_image_features(
                pixel_values=pixel_values,
                vision_feature_layer=vision_feature_layer,
                vision_feature_select_strategy=select_strategy,
                return_dict=True,
            )
        if image_outputs is not None:
            image_features = image_outputs.pooler_output.to(inputs_embeds.device, inputs_embeds.dtype)
            image_mask = self.model.get_placeholder_mask(input_ids, inputs_embeds, image_features)
            inputs_embeds = inputs_embeds.masked_scatter(image_mask, image_features)
        return inputs_embeds, image_outputs

    def _run_latent_passes(
        self,
        inputs_embeds,
        plan: LatentPassPlan,
        attention_mask,
        position_ids,
        cache,
        use_cache: bool,
        threshold,
        kwargs,
    ):
        """The latent passes of `plan` over the placed inputs, and their outputs in the caller's layout: the final hidden
        states `(B, T, H)`, every layer's hidden states (if asked for), the filled cache (`None` without `use_cache`)
        and, with a stop `threshold`, each row's number of thoughts `(B,)`."""
        past_length = cache.get_seq_length() if cache is not None else 0
        pass_cache = (
            cache if cache is not None and plan.placement is None else DynamicCache(config=self.config.text_config)
        )
        stop = self._stop_rule(threshold, plan.latent_mask, attention_mask, past_length)
        hidden_states, layer_hidden_states, pass_cache = self._passes(
            inputs_embeds, plan, attention_mask, position_ids, pass_cache, past_length, stop, kwargs
        )
        hidden_states, layer_hidden_states, pass_cache = plan.restore_outputs(
            hidden_states, layer_hidden_states, pass_cache if use_cache else None, cache, self.config.text_config
        )
        return hidden_states, layer_hidden_states, pass_cache, stop.counts if stop is not None else None

    def _passes(
        self, inputs_embeds, plan: LatentPassPlan, attention_mask, position_ids, cache, past_length, stop, kwargs
    ):
        """Run the language model over the column `ranges` in order, each pass feeding the thoughts it starts with.

        Returns the final hidden states `(B, T, H)`, every layer's hidden states (if asked for) and the filled cache:
        `None` where checkpointed layers could not keep the cache, and each pass recomputed its whole prefix instead.
        With a `stop` rule, the rows' blocks end where the stop head says, and the passes end once no row thinks: the
        outputs then cover the columns up to there.
        """
        text_model, latent_mask, ranges = self.model.language_model, plan.latent_mask, plan.ranges
        if stop is not None:
            attention_mask, pass_masks = stop.attention_mask, None  # updated as rows stop, read by every pass
        else:
            pass_masks = self._pass_masks(inputs_embeds, attention_mask, position_ids, cache)
        thought_columns, every_row_columns = set(), set()
        if latent_mask is not None:
            thought_columns = set(latent_mask.any(dim=0).nonzero().flatten().tolist())
            every_row_columns = set(latent_mask.all(dim=0).nonzero().flatten().tolist())
        checkpointing = self._checkpointing_layers()
        hidden_chunks, layer_chunks, filled_chunks = [], [], []
        with _checkpointed_layers_keep_cache(text_model.layers) if checkpointing else nullcontext(True) as keeps_cache:
            recompute = checkpointing and not (keeps_cache and isinstance(cache, DynamicCache))
            for index, (start, end) in enumerate(ranges):
                chunk = inputs_embeds[:, start:end]  # (B, end - start, H)
                if start in thought_columns and start > 0:
                    thought = hidden_chunks[-1][:, -1:]  # (B, 1, H): final hidden state at column start - 1
                    if start not in every_row_columns:
                        thought = torch.where(latent_mask[:, start, None, None], thought, chunk[:, :1])
                    chunk = thought if end - start == 1 else torch.cat([thought, chunk[:, 1:]], dim=1)
                filled_chunks.append(chunk)
                if recompute:
                    self._check_prefix_can_be_recomputed(past_length)
                    outputs = text_model(  # the whole prefix, its thoughts filled in, without a cache
                        inputs_embeds=torch.cat(filled_chunks, dim=1),  # (B, end, H)
                        attention_mask=_prefix_mask(pass_masks or attention_mask, end),
                        position_ids=position_ids[..., :end],
                        use_cache=False,
                        **kwargs,
                    )
                    hidden_chunks.append(outputs.last_hidden_state[:, start:])
                    if outputs.hidden_states is not None:
                        layer_chunks.append(tuple(layer[:, start:] for layer in outputs.hidden_states))
                    continue
                if pass_masks is not None:  # this pass's query rows, and the keys cached so far
                    masks = {name: full[:, :, start:end, : past_length + end] for name, full in pass_masks.items()}
                else:
                    masks = _slice_attention_mask(attention_mask, past_length, start, end)
                outputs = text_model(
                    inputs_embeds=chunk,
                    attention_mask=masks,
                    position_ids=position_ids[..., start:end],
                    use_cache=True,
                    **{CACHE_NAME: cache},
                    **kwargs,
                )
                hidden_chunks.append(outputs.last_hidden_state)
                if outputs.hidden_states is not None:
                    layer_chunks.append(outputs.hidden_states)
                if stop is not None and stop.after_pass(start, end, outputs.last_hidden_state):
                    break
                if checkpointing and index == 0 and cache.get_seq_length() != past_length + end:
                    # The flag exists but the layers dropped the cache: this pass needed none; the rest recompute.
                    logger.warning_once(
                        "Checkpointed decoder layers of this transformers version drop the KV cache even with "
                        "`_can_checkpoint_with_cache`: each latent pass recomputes its prefix (exact, slower)."
                    )
                    recompute = True
                elif checkpointing:
                    if index == 0:
                        self._check_cache_keeps_gradients(cache, chunk)
                    cache = _seal_pass_cache(cache, end - start, self.config.text_config)
        # Ranks that could not split their sequence into the agreed number of passes still make the same calls.
        for _ in range(plan.num_passes - len(ranges)):
            text_model(inputs_embeds=inputs_embeds[:, :1], use_cache=False)

        hidden_states = hidden_chunks[0] if len(hidden_chunks) == 1 else torch.cat(hidden_chunks, dim=1)
        layer_hidden_states = tuple(torch.cat(layer, dim=1) for layer in zip(*layer_chunks)) if layer_chunks else None
        return hidden_states, layer_hidden_states, None if recompute else cache

    def _check_prefix_can_be_recomputed(self, past_length: int) -> None:
        """Recomputing a pass's prefix needs the whole prefix in this forward, none of it in a cache."""
        if past_length > 0:
            raise ValueError(
                f"The cache passed in holds {past_length} tokens, but with gradient checkpointing this transformers "
                "version's decoder layers drop the cache, and the latent passes can only recompute what this "
                "forward holds. Pass the whole sequence without a cache, or disable gradient checkpointing."
            )

    def _pass_masks(self, inputs_embeds, attention_mask, position_ids, cache) -> dict | None:
        """The 4D attention mask of the whole forward, built once; each pass slices its rows and keys from it.

        `None` where the slices would not be the masks transformers builds per pass (a prepared mask, a non-dynamic
        cache, layers other than full attention, an attention implementation whose mask is not a 4D tensor): each
        pass then gets the caller's mask and builds its own.
        """
        if not self._full_attention_only() or not isinstance(cache, DynamicCache) or isinstance(attention_mask, dict):
            return None
        if isinstance(attention_mask, torch.Tensor) and attention_mask.ndim != 2:
            return None
        mask = create_causal_mask(
            config=self.model.language_model.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            # An empty cache changes no size; without one, transformers separates packed sequences by their positions.
            **{CACHE_NAME: cache if cache.get_seq_length() > 0 else None},
            position_ids=position_ids,
            allow_is_causal_skip=False,
        )
        return {"full_attention": mask} if isinstance(mask, torch.Tensor) and mask.ndim == 4 else None

    def _can_move_rows(self, attention_mask, position_ids, cache, past_length: int, shape) -> bool:
        """Whether the rows may be moved inside the batch (see `forward`): outputs and cache can be moved back.

        Explicit `position_ids` (as TRL's `padding_free` and `generate` pass them) move with their rows. Without an
        attention mask, positions that restart inside a row mark packed sequences (TRL's `padding_free`), which
        transformers separates by their positions: each gets a row of its own.
        """
        if position_ids is not None:
            if (
                position_ids.ndim != 2
                or position_ids.shape[0] not in (1, shape[0])
                or position_ids.shape[1] != shape[1]
            ):
                return False  # e.g. 3D multimodal rotary positions
        return (
            past_length == 0
            and (cache is None or isinstance(cache, DynamicCache))
            and (attention_mask is None or (isinstance(attention_mask, torch.Tensor) and attention_mask.ndim == 2))
            and self._full_attention_only()
        )

    def _full_attention_only(self) -> bool:
        """Whether every text layer attends to all earlier keys (no sliding window): masks and cache follow columns."""
        return set(getattr(self.config.text_config, "layer_types", None) or ()) == {"full_attention"}

    def _check_inputs(self, input_ids, pixel_values, mm_encoder_outputs, latent_mask, attention_mask, past_length):
        """Raise a `ValueError` for images the forward would drop, and thoughts it could not compute."""
        self._check_image_inputs(input_ids, pixel_values, mm_encoder_outputs, past_length)
        if latent_mask is not None:
            self._check_latent_inputs(latent_mask, attention_mask, past_length)

    def _check_stop_inputs(self, latent_mask, attention_mask, latent_stop_threshold, stop_labels, kwargs) -> None:
        """Raise a `ValueError` for a stop threshold or stop labels the forward cannot use, and for
        `output_attentions` with thoughts (each pass attends over a different number of keys)."""
        if latent_mask is None and stop_labels is not None and (stop_labels != -100).any():
            raise ValueError(
                "`stop_labels` marks thought positions, but `input_ids` holds no `<|latent|>` token: the stop head "
                "has no thought to read. Build them with `latent_stop_labels(input_ids, latent_token_id)`."
            )
        if latent_mask is not None and kwargs.get("output_attentions"):
            raise ValueError(
                "`output_attentions=True` is not supported with `<|latent|>` tokens: each pass attends over a "
                "different number of keys. Run the forward without latents, or without `output_attentions`."
            )
        if latent_stop_threshold is not None:
            check_latent_generation_settings(latent_stop_threshold=latent_stop_threshold)
            if isinstance(attention_mask, dict) or (attention_mask is not None and attention_mask.ndim != 2):
                raise ValueError(
                    "`latent_stop_threshold` masks the thoughts of rows that stopped in a 2D `attention_mask` "
                    "`(batch_size, past_length + sequence_length)`; pass the padding mask, not a prepared one."
                )

    def _check_image_inputs(self, input_ids, pixel_values, mm_encoder_outputs, past_length: int) -> None:
        """Raise a `ValueError` for images that the forward would drop or could not encode."""
        if pixel_values is not None and mm_encoder_outputs is not None:
            raise ValueError("You cannot specify both pixel_values and mm_encoder_outputs at the same time")
        _check_pixel_values(pixel_values)
        has_images = pixel_values is not None or (mm_encoder_outputs or {}).get("image") is not None
        if input_ids is None or past_length > 0 or has_images:
            return  # decoding steps after the prompt carry no image tokens
        image_tokens = int((input_ids == self.config.image_token_id).sum())
        if image_tokens:
            raise ValueError(
                f"`input_ids` holds {image_tokens} image tokens (id {self.config.image_token_id}) but neither "
                "`pixel_values` nor `mm_encoder_outputs['image']` was given, so the model would answer without "
                "seeing the image. Pass the processor's `pixel_values`, or build text-only prompts without images."
            )

    def _check_latent_inputs(self, latent_mask, attention_mask, past_length):
        """Raise a `ValueError` for thoughts without a position before them."""
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

    def _check_cache_keeps_gradients(self, cache: DynamicCache, chunk: torch.Tensor) -> None:
        """After the first checkpointed pass: the cached keys must carry gradient wherever the pass does.

        Reentrant checkpointing (`use_reentrant=True`) runs each layer without autograd, so the keys and values it
        caches are cut from the graph and later thoughts could not send gradient back through them.
        """
        needs_grad = chunk.requires_grad or any(p.requires_grad for p in self.model.language_model.parameters())
        if needs_grad and not all(layer.keys.requires_grad for layer in cache.layers if layer.is_initialized):
            raise ValueError(
                "Gradient checkpointing with `use_reentrant=True` loses the gradient that flows from later "
                "thoughts into earlier keys and values. Enable it with "
                "`activation_checkpointing_kwargs={'use_reentrant': False}` (the transformers default)."
            )

    def _checkpointing_layers(self) -> bool:
        """Whether the language model's layers are checkpointed in this forward (training with gradients)."""
        text_model = self.model.language_model
        checkpointed = any(getattr(layer, "gradient_checkpointing", False) for layer in text_model.layers)
        return checkpointed and text_model.training and torch.is_grad_enabled()

    def append_latent_thoughts(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None,
        num_latent_thoughts: int | list[int],
        pad_token_id: int | None = None,
    ) -> tuple[torch.LongTensor, torch.Tensor]:
        r"""
        Append Coconut's inference block, `<|start-latent|>` + k × `<|latent|>` + `<|end-latent|>`, to each prompt
        (built by [`latent_block`], as the processor builds it).

        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`): left-padded prompts without a
                latent block of their own.
            attention_mask (`torch.Tensor` of shape `(batch_size, sequence_length)`, *optional*): their padding mask.
            num_latent_thoughts (`int` or `list[int]`): k for every prompt, or one k per prompt (checked by
                [`thought_counts`]: integral floats such as `2.0`, NumPy integers and tensors are accepted).
            pad_token_id (`int`, *optional*): fills the left padding; defaults to the generation config's.

        Returns:
            `(input_ids, attention_mask)` of shape `(batch_size, sequence_length + max(k) + 2)`, still left-padded.
        """
        config = self.config
        block_ids = (config.start_latent_token_id, config.latent_token_id, config.end_latent_token_id)
        counts = thought_counts(num_latent_thoughts, input_ids.shape[0])
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"`attention_mask` has shape {tuple(attention_mask.shape)} but the prompts' `input_ids` "
                f"{tuple(input_ids.shape)}: appending the latent blocks needs one mask row per prompt, "
                "`(batch_size, sequence_length)`. Pass the processor's or tokenizer's `attention_mask` as it comes "
                "(for one prompt, `attention_mask[None]`)."
            )
        self._check_room_for_blocks(input_ids, attention_mask, counts)
        batch_size, real = input_ids.shape[0], attention_mask.bool()
        if pad_token_id is None:
            pad_token_id = self.generation_config.pad_token_id
        if pad_token_id is None:
            pad_token_id = config.text_config.pad_token_id or 0

        new_length = input_ids.shape[1] + max(counts) + 2
        new_ids = torch.full((batch_size, new_length), pad_token_id, dtype=input_ids.dtype, device=input_ids.device)
        new_mask = torch.zeros((batch_size, new_length), dtype=attention_mask.dtype, device=attention_mask.device)
        for row, count in enumerate(counts):
            ids = torch.cat([input_ids[row][real[row]], input_ids.new_tensor(latent_block(count, block_ids))])
            new_ids[row, new_length - len(ids) :] = ids
            new_mask[row, new_length - len(ids) :] = 1
        return new_ids, new_mask

    def _check_room_for_blocks(self, input_ids, attention_mask, counts: list[int]) -> None:
        """Raise a `ValueError` unless each left-padded prompt can take a block of its count appended: the config has
        the block's ids, the prompt holds no block yet, and it stays within `max_position_embeddings`."""
        config = self.config
        block_ids = (config.start_latent_token_id, config.latent_token_id, config.end_latent_token_id)
        if None in block_ids:
            raise ValueError(
                "`num_latent_thoughts` needs `latent_token_id`, `start_latent_token_id` and `end_latent_token_id` in "
                f"the config, got {config.latent_token_id}, {config.start_latent_token_id}, "
                f"{config.end_latent_token_id}. Convert the checkpoint with `convert_to_coconut.py` first."
            )
        _check_left_padded(attention_mask)
        real = attention_mask.bool()
        with_block = (torch.isin(input_ids, input_ids.new_tensor(block_ids)) & real).any(dim=1)
        if with_block.any():
            mixing = ""
            if not with_block.all():
                mixing = (
                    f"; the batch mixes them with prompts {(~with_block).nonzero().flatten().tolist()} that hold none"
                )
            raise ValueError(
                f"Prompts {with_block.nonzero().flatten().tolist()} already hold a latent block{mixing}, and "
                '`num_latent_thoughts` would append a second one. Pass `num_latent_thoughts` (a count, or "auto") '
                "only for prompts without a block, or leave it out to use the prompts' own blocks; generate the two "
                "kinds of prompt in separate batches."
            )
        lengths = (real.sum(dim=1) + torch.tensor(counts, device=real.device) + 2).tolist()
        limit = config.text_config.max_position_embeddings
        if max(lengths) > limit:
            row = lengths.index(max(lengths))
            raise ValueError(
                f"`num_latent_thoughts`={counts[row]} makes prompt {row} {lengths[row]} tokens long with its latent "
                f"block, past the model's `max_position_embeddings` ({limit}). Use fewer thoughts, e.g. as many as "
                "the model was trained with."
            )

    @torch.no_grad()
    def plan_latent_thoughts(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        max_latent_thoughts: int | None = None,
        latent_stop_threshold: float | None = None,
        **kwargs,
    ) -> list[int]:
        r"""
        Each prompt's number of thoughts, chosen by the stop head: a prompt thinks until the head's stop probability
        on its latest thought reaches `latent_stop_threshold`, or until it has `max_latent_thoughts` thoughts. Rows
        decide independently; a row's count is what it would get alone.

        One forward over the prompts with `max_latent_thoughts` thoughts each reads every thought's stop probability
        at once: the state at thought j depends only on the tokens and thoughts up to it, so the thoughts after a row's
        stop change nothing it decided.

        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`): left-padded prompts without a
                latent block.
            attention_mask (`torch.Tensor` of shape `(batch_size, sequence_length)`, *optional*): their padding mask.
            pixel_values (`torch.Tensor`, *optional*): the prompts' image tiles.
            max_latent_thoughts (`int`, *optional*): the most thoughts a row gets; defaults to
                `config.max_latent_thoughts`, which training sets.
            past_key_values (`Cache`, *optional*):
            The name of `cache` in transformers before 5.24 (which `generate` there passes); either name works.
        latent_stop_threshold (`float`, *optional*): the stop probability that ends a block; defaults to
                `config.latent_stop_threshold` (0.5).
            kwargs: further model inputs (`image_sizes`, `sync_latent_passes`, ...).

        Returns:
            `list[int]`: the number of thoughts of each prompt, from 1 to `max_latent_thoughts`.
        """
        max_latent_thoughts, latent_stop_threshold = self._auto_settings(max_latent_thoughts, latent_stop_threshold)
        probabilities = self.latent_stop_probabilities(
            input_ids, attention_mask, pixel_values, max_latent_thoughts, **kwargs
        )
        stops = probabilities >= latent_stop_threshold
        stops[:, -1] = True  # the last thought allowed ends every block that is still open
        return (stops.int().argmax(dim=1) + 1).tolist()

    @torch.no_grad()
    def latent_stop_probabilities(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None,
        pixel_values: torch.Tensor | None,
        num_latent_thoughts: int,
        **kwargs,
    ) -> torch.Tensor:
        """The stop head's probability after each of `num_latent_thoughts` thoughts of every left-padded prompt
        (without a block), never stopping: `(batch_size, num_latent_thoughts)`, from one forward."""
        input_ids, attention_mask = self.append_latent_thoughts(input_ids, attention_mask, num_latent_thoughts)
        outputs = self(
            input_ids=input_ids,
            attention_mask=attention_mask,
            pixel_values=pixel_values,
            logits_to_keep=1,
            use_cache=False,
            **kwargs,
        )
        # The block is the last k + 2 columns: `<|start-latent|>`, the `<|latent|>` columns, `<|end-latent|>`.
        return torch.sigmoid(outputs.stop_logits[:, -num_latent_thoughts - 1 : -1])

    def _auto_settings(self, max_latent_thoughts, latent_stop_threshold, generation_config=None) -> tuple[int, float]:
        """The most thoughts and the stop threshold of `"auto"`: the arguments, else the generation config passed to
        `generate`, else the model's (`generation_config.json`); checked."""
        if getattr(self, "latent_stop_head", None) is None or self.config.latent_token_id is None:
            reason = "no stop head" if self.config.latent_token_id is not None else "no `latent_token_id`"
            raise ValueError(
                f'`num_latent_thoughts="auto"` needs the stop head to choose the counts, but this model has {reason}. '
                "Pass a count (`num_latent_thoughts=6`), or train the head (`train_sft.py --latent_stop_head`)."
            )
        configs = [config for config in (generation_config, self.generation_config) if config is not None]
        if max_latent_thoughts is None:
            max_latent_thoughts = next(
                (c.max_latent_thoughts for c in configs if _has(c, "max_latent_thoughts")), None
            )
        if latent_stop_threshold is None:
            found = (c.latent_stop_threshold for c in configs if _has(c, "latent_stop_threshold"))
            latent_stop_threshold = next(found, DEFAULT_LATENT_STOP_THRESHOLD)
        if max_latent_thoughts is None:
            raise ValueError(
                '`num_latent_thoughts="auto"` needs `max_latent_thoughts`, the most thoughts a prompt may get, and the '
                "generation config sets none. Pass it, e.g. `max_latent_thoughts=6` (the most the model was trained "
                "with), or set `model.generation_config.max_latent_thoughts`."
            )
        check_latent_generation_settings(max_latent_thoughts, latent_stop_threshold)
        return thought_count(max_latent_thoughts, "max_latent_thoughts"), float(latent_stop_threshold)

    def _can_think_in_the_cache(self, generation_config, kwargs) -> bool:
        """Whether `"auto"` can think in the KV cache that decoding then continues: a dynamic cache that `generate`
        builds, no assistant, no positions or embeddings of the caller's. Elsewhere the counts are planned first."""
        config = generation_config if generation_config is not None else self.generation_config
        own_inputs = (
            "cache",
            "past_key_values",
            "assistant_model",
            "position_ids",
            "inputs_embeds",
            "mm_encoder_outputs",
        )
        expand_size = max(
            kwargs.get(name, getattr(config, name)) or 1 for name in ("num_beams", "num_return_sequences")
        )
        return (
            not any(kwargs.get(name) is not None for name in own_inputs)
            and expand_size == 1  # the cache would have to be repeated for every beam or sequence
            and kwargs.get("cache_implementation", config.cache_implementation) is None
            and kwargs.get("use_cache", config.use_cache) is not False
            and not kwargs.get("sync_latent_passes", False)
            and self._full_attention_only()
        )

    def generate(
        self,
        inputs: torch.LongTensor | None = None,
        generation_config: GenerationConfig | None = None,
        num_latent_thoughts: int | list[int] | str | None = None,
        max_latent_thoughts: int | None = None,
        latent_stop_threshold: float | None = None,
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
            num_latent_thoughts (`int`, `list[int]` or `"auto"`, *optional*):
                Append `<|start-latent|>` + k × `<|latent|>` + `<|end-latent|>` to every prompt (see
                [`~CoconutInternVLForConditionalGeneration.append_latent_thoughts`]); 0 appends the two markers alone,
                `None` nothing. `"auto"` lets the stop head choose each prompt's k (see
                [`~CoconutInternVLForConditionalGeneration.plan_latent_thoughts`]): the thoughts run once, in the
                cache that decoding continues from, and the returned sequences are those of the same prompts with
                the chosen counts passed as a list (so a prompt's count is the number of `<|latent|>` in its row).
            max_latent_thoughts (`int`, *optional*):
                With `"auto"`: the most thoughts a prompt gets (default: the generation config's).
            past_key_values (`Cache`, *optional*):
            The name of `cache` in transformers before 5.24 (which `generate` there passes); either name works.
        latent_stop_threshold (`float`, *optional*):
                With `"auto"`: the stop probability that ends a block (default: the generation config's, else 0.5).
                Lower stops sooner (fewer thoughts, less latency); higher thinks longer.
            synced_gpus (`bool`, *optional*):
                As in `generate`; under FSDP / ZeRO-3 (the default then) every rank also runs the same number of latent
                passes, whatever its prompts' thoughts.

        `<|latent|>` is never generated (the generation config suppresses it): a thought needs the hidden state before
        it, which decoding does not keep.

        Example:

        ```python
        >>> output_ids = model.generate(**inputs, num_latent_thoughts=6, max_new_tokens=32)
        ```
        """
        input_ids = inputs if inputs is not None else kwargs.pop("input_ids", None)
        _check_pixel_values(kwargs.get("pixel_values"))
        if synced_gpus is None:
            world_size = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
            synced_gpus = (is_deepspeed_zero3_enabled() or is_fsdp_managed_module(self)) and world_size > 1
        if synced_gpus:
            kwargs["sync_latent_passes"] = True
        self._check_thought_request(num_latent_thoughts, max_latent_thoughts, latent_stop_threshold)
        if is_auto(num_latent_thoughts):
            num_latent_thoughts = self._auto_thought_counts(
                input_ids, generation_config, max_latent_thoughts, latent_stop_threshold, kwargs
            )
        input_ids = self._prompt_with_thoughts(input_ids, num_latent_thoughts, generation_config, kwargs)
        return super().generate(input_ids, generation_config=generation_config, synced_gpus=synced_gpus, **kwargs)

    def _check_thought_request(self, num_latent_thoughts, max_latent_thoughts, latent_stop_threshold) -> None:
        """Raise a `ValueError` for a `num_latent_thoughts` this model cannot take, before any pass runs."""
        if isinstance(num_latent_thoughts, str) and not is_auto(num_latent_thoughts):
            thought_count(num_latent_thoughts)  # a `ValueError` that names "auto"
        if isinstance(num_latent_thoughts, (list, tuple)) and any(is_auto(count) for count in num_latent_thoughts):
            raise ValueError(
                f'`num_latent_thoughts`={num_latent_thoughts!r} mixes "auto" with counts in one batch. "auto" '
                "applies to every prompt of a batch: pass it alone, or one count per prompt (`model.plan_latent_thoughts` "
                "gives the stop head's counts for the prompts you want it to choose)."
            )
        config = self.config
        markers = config.start_latent_token_id is not None and config.end_latent_token_id is not None
        if num_latent_thoughts is not None and config.latent_token_id is None and markers:
            raise ValueError(
                f"`num_latent_thoughts`={num_latent_thoughts!r}, but this model thinks in pauses (pause as thought: "
                "`config.latent_token_id` is None, the block's markers are set), so nothing is fed back: `generate` "
                "does not know its pause token to append a block, and a stop head has no thoughts to read, so "
                '"auto" is not available. Build the block into the prompt with the processor '
                "(`processor(text=..., num_latent_thoughts=k)` or `processor.build_prompt(..., num_latent_thoughts=k)`, "
                "k as in training) and call `generate` without `num_latent_thoughts`."
            )
        if not is_auto(num_latent_thoughts) and (max_latent_thoughts is not None or latent_stop_threshold is not None):
            raise ValueError(
                '`max_latent_thoughts` and `latent_stop_threshold` apply only to `num_latent_thoughts="auto"`, got '
                f'`num_latent_thoughts`={num_latent_thoughts!r}. Pass `num_latent_thoughts="auto"`, or drop them.'
            )

    def _auto_thought_counts(self, input_ids, generation_config, max_latent_thoughts, threshold, kwargs) -> list[int]:
        """Each prompt's number of thoughts, chosen by the stop head, for `generate(num_latent_thoughts="auto")`.

        Where decoding can continue from the cache the thoughts ran in (see [`_can_think_in_the_cache`]), one forward
        with `latent_stop_threshold` runs the prompts and their thoughts (1 + the most thoughts of a row passes), and
        its cache goes to `kwargs` in the layout of the prompts with their blocks appended; elsewhere the counts are
        planned first ([`plan_latent_thoughts`]) and the prompts run again with them.
        """
        max_latent_thoughts, threshold = self._auto_settings(max_latent_thoughts, threshold, generation_config)
        if input_ids is None or kwargs.get("inputs_embeds") is not None:
            raise ValueError(
                '`num_latent_thoughts="auto"` reads the prompts\' `input_ids` and appends their blocks; pass the '
                "prompts as `input_ids` alone."
            )
        if not self._can_think_in_the_cache(generation_config, kwargs):
            model_inputs = ("pixel_values", "image_sizes", "sync_latent_passes")
            return self.plan_latent_thoughts(
                input_ids,
                kwargs.get("attention_mask"),
                max_latent_thoughts=max_latent_thoughts,
                latent_stop_threshold=threshold,
                **{name: kwargs[name] for name in model_inputs if kwargs.get(name) is not None},
            )
        ids, attention_mask = self.append_latent_thoughts(input_ids, kwargs.get("attention_mask"), max_latent_thoughts)
        with torch.no_grad():
            outputs = self(  # the prompts, `<|start-latent|>` and the thoughts, without `<|end-latent|>`
                input_ids=ids[:, :-1],
                attention_mask=attention_mask[:, :-1],
                pixel_values=kwargs.pop("pixel_values", None),
                image_sizes=kwargs.pop("image_sizes", None),
                cache=DynamicCache(config=self.config.text_config),  # this forward's own name, on every release
                latent_stop_threshold=threshold,
                logits_to_keep=1,
            )
        cache = getattr(outputs, CACHE_NAME)
        kwargs[CACHE_NAME] = _unused_thoughts_to_the_left(cache, outputs.latent_counts, self.config.text_config)
        return outputs.latent_counts.tolist()

    def _prompt_with_thoughts(self, input_ids, num_latent_thoughts, generation_config, kwargs) -> torch.LongTensor:
        """The prompts with their latent blocks (appended for `num_latent_thoughts`, updating `kwargs`'s attention
        mask), checked before any pass: blocks that read as blocks by the config's ids, left padding."""
        if num_latent_thoughts is not None:
            if input_ids is None or kwargs.get("inputs_embeds") is not None:
                given = "none" if input_ids is None else "`inputs_embeds` too, which would have no block"
                raise ValueError(
                    f"`num_latent_thoughts` appends the latent block to the prompt's `input_ids`, got {given}. Pass "
                    "the prompt as `input_ids` alone, or build the block into your prompt with the processor."
                )
            pad_token_id = kwargs.get("pad_token_id", getattr(generation_config, "pad_token_id", None))
            input_ids, kwargs["attention_mask"] = self.append_latent_thoughts(
                input_ids, kwargs.get("attention_mask"), num_latent_thoughts, pad_token_id
            )
        if input_ids is not None:
            _check_latent_blocks(input_ids, kwargs.get("attention_mask"), self.config)
        if self._latent_mask(input_ids, kwargs.get("inputs_embeds")) is not None:
            if kwargs.get("attention_mask") is not None:
                _check_left_padded(kwargs["attention_mask"])
        return input_ids

    def prepare_inputs_for_generation(self, input_ids, *args, inputs_embeds=None, **kwargs):
        """[`GenerationMixin.prepare_inputs_for_generation`], except that a first step from `inputs_embeds` keeps the
        prompt's `input_ids` where they hold thoughts: the ids say where the thoughts are, the embeddings do not."""
        model_inputs = super().prepare_inputs_for_generation(input_ids, *args, inputs_embeds=inputs_embeds, **kwargs)
        embeds = model_inputs.get("inputs_embeds")
        if model_inputs.get("input_ids") is None and embeds is not None and input_ids.shape[1] >= embeds.shape[1]:
            prompt_ids = input_ids[:, input_ids.shape[1] - embeds.shape[1] :]
            if self._latent_mask(prompt_ids) is not None:
                model_inputs["input_ids"] = prompt_ids.clone()
        return model_inputs


# Saving the model copies this file and the files it imports, and writes `auto_map` (see `config.auto_map`).
CoconutInternVLForConditionalGeneration.register_for_auto_class("AutoModel")

__all__ = [
    "CoconutCausalLMOutputWithPast",
    "CoconutInternVLForConditionalGeneration",
    "LatentRowPlacement",
    "align_latent_rows",
    "plan_latent_passes",
    "agree_on_pass_count",
    "latent_stop_labels",
]
