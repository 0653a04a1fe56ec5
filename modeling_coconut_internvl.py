"""Coconut-InternVL: InternVL whose `<|latent|>` tokens are continuous thoughts (Hao et al. 2024, arXiv 2412.06769).

The input embedding at every `<|latent|>` position is the language model's final hidden state (after the final norm,
the vector the LM head reads) at the position just before it. The forward pass therefore runs the language model in
sequential passes over one KV cache: a pass ends right before every column that holds a latent, and the next pass
starts with the thought the previous pass produced. Images are encoded once, before the first pass. Rows whose thoughts
sit at different columns are first moved inside the batch so that their thoughts share columns, which keeps the number
of passes at (most thoughts in a row + 1) however the batch was padded.
"""

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
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import can_return_tuple
from transformers.utils.versions import require_version


try:  # imported as part of a package: the Hub's remote code, or a repository checkout used as one
    from .configuration_coconut_internvl import CoconutInternVLConfig
    from .latent_block_coconut_internvl import (
        check_config_latent_ids,
        is_auto,
        latent_block,
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
        thought_count,
        thought_counts,
        tokenizer_latent_ids,
    )


logger = logging.get_logger(__name__)

# Tested from 5.24.0, the first release whose models, masks and caches take `cache` (earlier: `past_key_values`), to the
# newest release (README.md). Below it, fail here by name instead of deep inside a forward.
require_version("transformers>=5.24.0", "Coconut-InternVL's remote code needs it: pip install -U transformers")

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
    """

    stop_logits: torch.FloatTensor | None = None
    stop_loss: torch.FloatTensor | None = None


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
        if inside:
            raise ValueError(
                f"Prompt {row} ends inside a latent block: its last `<|start-latent|>` (id {start}) has no "
                f"`<|end-latent|>` (id {end}), which `generate` never writes. Close the block in the prompt, or "
                "pass `num_latent_thoughts` to append a whole one."
            )


def _close_block_gaps(output, gaps: torch.BoolTensor):
    """`generate`'s output with the padding inside the `"auto"` blocks moved to the left of each row: the layout of
    the same prompts with their counts appended by [`append_latent_thoughts`] (gaps `(batch_size, prompt width)`; rows
    expanded for beams or several sequences per prompt follow their prompt)."""
    sequences = output if isinstance(output, torch.Tensor) else output.sequences
    prompt_width = gaps.shape[1]
    gaps = gaps.to(sequences.device).repeat_interleave(sequences.shape[0] // gaps.shape[0], dim=0)
    order = torch.argsort((~gaps).int(), dim=1, stable=True)  # the gaps first, then every other column in order
    prompts = sequences[:, :prompt_width].gather(1, order)
    sequences = torch.cat([prompts, sequences[:, prompt_width:]], dim=1)
    if isinstance(output, torch.Tensor):
        return sequences
    output.sequences = sequences
    return output


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
        stop_labels: torch.Tensor | None = None,
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
        past_length = cache.get_seq_length() if cache is not None else 0
        self._check_image_inputs(input_ids, pixel_values, mm_encoder_outputs, past_length)
        latent_mask = self._latent_mask(input_ids, inputs_embeds)
        shape = input_ids.shape if input_ids is not None else inputs_embeds.shape[:2]
        placement = None
        if latent_mask is not None:
            self._check_latent_inputs(latent_mask, attention_mask, past_length, kwargs)
            if self._can_move_rows(attention_mask, position_ids, cache, past_length, shape):
                packed_positions = position_ids if attention_mask is None else None  # a mask overrides packing
                placement = align_latent_rows(latent_mask, attention_mask, packed_positions)
        if placement is not None:
            latent_mask = placement.place(latent_mask)
        width = placement.width if placement is not None else shape[1]
        ranges = plan_latent_passes(latent_mask) if latent_mask is not None else [(0, width)]
        num_passes = len(ranges)
        if sync_latent_passes:
            device = input_ids.device if input_ids is not None else inputs_embeds.device
            ranges, num_passes = self._sync_passes(latent_mask, ranges, num_passes, device)
        if latent_mask is None and num_passes == 1:
            if stop_labels is not None and (stop_labels != -100).any():
                raise ValueError(
                    "`stop_labels` marks thought positions, but `input_ids` holds no `<|latent|>` token: the stop head "
                    "has no thought to read. Build them with `latent_stop_labels(input_ids, latent_token_id)`."
                )
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

        inputs_embeds, image_outputs = self._embed_with_images(
            input_ids,
            inputs_embeds,
            pixel_values,
            mm_encoder_outputs,
            vision_feature_layer,
            vision_feature_select_strategy,
        )
        if placement is not None:
            if attention_mask is None:
                attention_mask = torch.ones(shape, dtype=torch.long, device=inputs_embeds.device)
            inputs_embeds, attention_mask = placement.place(inputs_embeds), placement.place(attention_mask)
            if position_ids is not None:  # each row's positions move with it
                position_ids = placement.place(position_ids.expand(shape))
        position_ids = self._latent_position_ids(attention_mask, position_ids, past_length, inputs_embeds)
        use_cache = kwargs.pop("use_cache", None) is not False
        pass_cache = cache if cache is not None and placement is None else DynamicCache(config=self.config.text_config)

        hidden_states, layer_hidden_states, pass_cache = self._run_latent_passes(
            inputs_embeds,
            latent_mask,
            ranges,
            num_passes,
            attention_mask,
            position_ids,
            pass_cache,
            past_length,
            kwargs,
        )

        if placement is not None:  # back to the caller's layout
            hidden_states = placement.restore(hidden_states)
            if layer_hidden_states is not None:
                layer_hidden_states = tuple(placement.restore(layer) for layer in layer_hidden_states)
            if use_cache and pass_cache is not None:
                into = cache if cache is not None else DynamicCache(config=self.config.text_config)
                pass_cache = placement.restore_cache(pass_cache, into)
        logits = self.lm_head(slice_logits_to_keep(hidden_states, logits_to_keep))
        loss = None
        if labels is not None:
            loss = self.loss_function(
                logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size, **kwargs
            )
        stop_logits, stop_loss = self._stop_outputs(hidden_states, stop_labels)
        return CoconutCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            cache=pass_cache if use_cache else None,  # `None` too where checkpointing recomputed the prefixes
            hidden_states=layer_hidden_states,
            image_outputs=image_outputs,
            stop_logits=stop_logits,
            stop_loss=stop_loss,
        )

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

    @staticmethod
    def _latent_position_ids(attention_mask, position_ids, past_length: int, inputs_embeds) -> torch.LongTensor:
        """`(B, T)` positions counted from a 2D attention mask, as `generate` counts them; else from `past_length`."""
        if position_ids is not None:
            return position_ids
        if isinstance(attention_mask, torch.Tensor) and attention_mask.ndim == 2:
            # Same positions as `generate` gives a padded row, and as the row alone, unpadded.
            position_ids = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
            return position_ids[:, past_length:]
        length = inputs_embeds.shape[1]
        return torch.arange(past_length, past_length + length, device=inputs_embeds.device).unsqueeze(0)

    def _run_latent_passes(
        self, inputs_embeds, latent_mask, ranges, num_passes, attention_mask, position_ids, cache, past_length, kwargs
    ):
        """Run the language model over the column `ranges` in order, each pass feeding the thoughts it starts with.

        Returns the final hidden states `(B, T, H)`, every layer's hidden states (if asked for) and the filled cache:
        `None` where checkpointed layers could not keep the cache, and each pass recomputed its whole prefix instead.
        """
        text_model = self.model.language_model
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
                    cache=cache,
                    use_cache=True,
                    **kwargs,
                )
                hidden_chunks.append(outputs.last_hidden_state)
                if outputs.hidden_states is not None:
                    layer_chunks.append(outputs.hidden_states)
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
        for _ in range(num_passes - len(ranges)):
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
            cache=cache if cache.get_seq_length() > 0 else None,
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
        return text_model.is_activation_checkpointing and text_model.training and torch.is_grad_enabled()

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
            raise ValueError(
                f"Prompts {with_block.nonzero().flatten().tolist()} already hold a latent block, and "
                "`num_latent_thoughts` would append a second one. Pass `num_latent_thoughts` only for prompts "
                "without thoughts, or leave it out to use the prompts' own blocks."
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
        return (
            not any(kwargs.get(name) is not None for name in own_inputs)
            and kwargs.get("cache_implementation", config.cache_implementation) is None
            and kwargs.get("use_cache", config.use_cache) is not False
            and not kwargs.get("sync_latent_passes", False)
            and self._full_attention_only()
        )

    @torch.no_grad()
    def _think_until_stop(self, input_ids, max_latent_thoughts, latent_stop_threshold, kwargs) -> torch.BoolTensor:
        """Run each prompt's thoughts in a KV cache until the stop head ends its block, and leave `generate` the prompts
        with their blocks and that cache (in `kwargs`) to decode from.

        One pass over the prompts and `<|start-latent|>` (images included), then one single-column pass per thought.
        A row that has stopped gets a masked column (attention mask 0) while the others go on, so every row's thoughts
        and positions are what it computes alone. The blocks come back as `<|start-latent|>`, a `<|latent|>` or a
        padding token per thought column, and `<|end-latent|>`, which `generate` runs first.

        Returns the `(batch_size, width)` mask of the padding columns inside the blocks (the gaps), which
        [`_close_block_gaps`] moves to the left of the returned sequences.
        """
        config = self.config
        max_latent_thoughts, threshold = self._auto_settings(max_latent_thoughts, latent_stop_threshold)
        attention_mask = kwargs.get("attention_mask")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        batch_size = input_ids.shape[0]
        self._check_room_for_blocks(input_ids, attention_mask, [max_latent_thoughts] * batch_size)
        column = input_ids.new_full((batch_size, 1), config.start_latent_token_id)
        input_ids = torch.cat([input_ids, column], dim=1)
        attention_mask = torch.cat([attention_mask, torch.ones_like(column, dtype=attention_mask.dtype)], dim=1)
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        outputs = self.model(
            input_ids=input_ids,
            pixel_values=kwargs.pop("pixel_values", None),
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=DynamicCache(config=config.text_config),
            use_cache=True,
            image_sizes=kwargs.pop("image_sizes", None),
        )
        cache, thought = outputs.cache, outputs.last_hidden_state[:, -1:]  # (B, 1, H): thought 1
        next_position = position_ids[:, -1:] + 1  # (B, 1)
        thinking = torch.ones(batch_size, dtype=torch.bool, device=input_ids.device)
        fed = []  # per thought column: (B,) whether the row takes a thought there
        for count in range(1, max_latent_thoughts + 1):
            fed.append(thinking)
            attention_mask = torch.cat([attention_mask, thinking[:, None].to(attention_mask.dtype)], dim=1)
            step = self.model.language_model(
                inputs_embeds=thought,
                attention_mask=attention_mask,
                position_ids=next_position,
                cache=cache,
                use_cache=True,
            )
            cache, next_position = step.cache, next_position + thinking[:, None].long()
            thought = step.last_hidden_state  # (B, 1, H): the state with thought `count` fed in, and the next thought
            stop = torch.sigmoid(self.latent_stop_head(thought).float()).view(batch_size) >= threshold
            thinking = thinking & ~stop & (count < max_latent_thoughts)
            if not thinking.any():
                break
        fed = torch.stack(fed, dim=1)  # (B, K)
        pad_token_id = self.generation_config.pad_token_id
        pad_token_id = pad_token_id if pad_token_id is not None else config.text_config.pad_token_id or 0
        block = torch.where(fed, config.latent_token_id, pad_token_id).to(input_ids.dtype)
        end = input_ids.new_full((batch_size, 1), config.end_latent_token_id)
        kwargs["attention_mask"] = torch.cat([attention_mask, torch.ones_like(end, dtype=attention_mask.dtype)], dim=1)
        kwargs["cache"] = cache
        gaps = torch.zeros((batch_size, input_ids.shape[1] + fed.shape[1] + 1), dtype=torch.bool)
        gaps[:, input_ids.shape[1] : input_ids.shape[1] + fed.shape[1]] = ~fed.cpu()
        return torch.cat([input_ids, block, end], dim=1), gaps

    def _expand_inputs_for_generation(self, expand_size=1, is_encoder_decoder=False, input_ids=None, **model_kwargs):
        """[`GenerationMixin._expand_inputs_for_generation`], and a cache of the unexpanded batch (the one `"auto"`
        filled with the thoughts) expanded with it, for beam search and several returned sequences."""
        cache = model_kwargs.get("cache")
        batch_size = input_ids.shape[0] if input_ids is not None else None
        input_ids, model_kwargs = super()._expand_inputs_for_generation(
            expand_size=expand_size, is_encoder_decoder=is_encoder_decoder, input_ids=input_ids, **model_kwargs
        )
        if expand_size > 1 and isinstance(cache, DynamicCache) and cache.get_seq_length() > 0:
            if cache.layers[0].keys.shape[0] == batch_size:
                cache.batch_repeat_interleave(expand_size)
        return input_ids, model_kwargs

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
                [`~CoconutInternVLForConditionalGeneration.plan_latent_thoughts`]); prompts that end with an open
                block, `<|start-latent|>` alone (the processor's `num_latent_thoughts="auto"`), are generated so too.
                The returned sequences hold each prompt's block, so its count is the number of `<|latent|>` in it.
            max_latent_thoughts (`int`, *optional*):
                With `"auto"`: the most thoughts a prompt gets (default `config.max_latent_thoughts`).
            latent_stop_threshold (`float`, *optional*):
                With `"auto"`: the stop probability that ends a block (default `config.latent_stop_threshold`, 0.5).
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
        input_ids, num_latent_thoughts = self._open_block_prompts(input_ids, num_latent_thoughts, kwargs)
        if is_auto(num_latent_thoughts):
            if input_ids is None or kwargs.get("inputs_embeds") is not None:
                raise ValueError(
                    '`num_latent_thoughts="auto"` reads the prompts\' `input_ids` and appends their blocks; pass the '
                    "prompts as `input_ids` alone."
                )
            if self._can_think_in_the_cache(generation_config, kwargs):
                _check_pixel_values(kwargs.get("pixel_values"))
                input_ids, gaps = self._think_until_stop(input_ids, max_latent_thoughts, latent_stop_threshold, kwargs)
                output = super().generate(
                    input_ids, generation_config=generation_config, synced_gpus=synced_gpus, **kwargs
                )
                return _close_block_gaps(output, gaps)
            model_inputs = ("pixel_values", "image_sizes", "sync_latent_passes")
            num_latent_thoughts = self.plan_latent_thoughts(
                input_ids,
                kwargs.get("attention_mask"),
                max_latent_thoughts=max_latent_thoughts,
                latent_stop_threshold=latent_stop_threshold,
                **{name: kwargs[name] for name in model_inputs if kwargs.get(name) is not None},
            )
        elif max_latent_thoughts is not None or latent_stop_threshold is not None:
            raise ValueError(
                '`max_latent_thoughts` and `latent_stop_threshold` apply only to `num_latent_thoughts="auto"`, got '
                f'`num_latent_thoughts`={num_latent_thoughts!r}. Pass `num_latent_thoughts="auto"`, or drop them.'
            )
        input_ids = self._prompt_with_thoughts(input_ids, num_latent_thoughts, generation_config, kwargs)
        return super().generate(input_ids, generation_config=generation_config, synced_gpus=synced_gpus, **kwargs)

    def _open_block_prompts(self, input_ids, num_latent_thoughts, kwargs):
        """Prompts that end with `<|start-latent|>` alone (the processor's `"auto"`) lose that token and are
        generated with `"auto"`; returns `(input_ids, num_latent_thoughts)` and updates `kwargs`'s attention mask."""
        start = self.config.start_latent_token_id
        if input_ids is None or start is None or input_ids.shape[1] == 0:
            return input_ids, num_latent_thoughts
        attention_mask = kwargs.get("attention_mask")
        if attention_mask is not None and attention_mask.ndim == 2:
            _check_left_padded(attention_mask)
        open_rows = input_ids[:, -1] == start
        block_ids = [i for i in (start, self.config.latent_token_id, self.config.end_latent_token_id) if i is not None]
        real = attention_mask.bool() if attention_mask is not None and attention_mask.ndim == 2 else None
        earlier = torch.isin(input_ids[:, :-1], input_ids.new_tensor(block_ids))
        if real is not None:
            earlier &= real[:, :-1]
        if not open_rows.any() or earlier.any():
            # No open block; or blocks elsewhere in the prompts, which the block checks read (or refuse) as they are.
            return input_ids, num_latent_thoughts
        if not open_rows.all():
            raise ValueError(
                f"Prompts {open_rows.nonzero().flatten().tolist()} end with an open latent block (`<|start-latent|>` "
                f"alone, for the stop head to fill) and prompts {(~open_rows).nonzero().flatten().tolist()} do not. "
                'Build every prompt of a batch with `num_latent_thoughts="auto"`, or none.'
            )
        if num_latent_thoughts is not None and not is_auto(num_latent_thoughts):
            raise ValueError(
                f"The prompts end with an open latent block (`<|start-latent|>` alone, the processor's "
                f'`num_latent_thoughts="auto"`), and `num_latent_thoughts`={num_latent_thoughts!r} would add a second '
                'one. Leave `num_latent_thoughts` out (or pass "auto"), or build the prompts without a block.'
            )
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask[:, :-1]
        return input_ids[:, :-1], "auto"

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
        if self._latent_mask(input_ids, kwargs.get("inputs_embeds")) is not None:
            _check_latent_blocks(input_ids, kwargs.get("attention_mask"), self.config)
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
