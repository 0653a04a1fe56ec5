"""Coconut-InternVL's latent block, shared by the model and the processor (neither imports the other).

The three token strings, the one check of a thought count, the one builder of the block (as text or as ids), and the
check that a config's latent ids are a tokenizer's Coconut tokens. `from_pretrained` and `save_pretrained` copy this
file with the model and processor files that import it.
"""

import json

from transformers.utils import cached_file


START_LATENT, END_LATENT, LATENT = "<|start-latent|>", "<|end-latent|>", "<|latent|>"
LATENT_TOKENS = (START_LATENT, END_LATENT, LATENT)  # in the order the converter adds them
# `num_latent_thoughts="auto"`: the model's stop head decides each prompt's number of thoughts in `generate`.
AUTO_THOUGHTS = "auto"


def thought_count(value, name: str = "num_latent_thoughts") -> int:
    """`value` as a number of continuous thoughts, or a `ValueError` naming `name`.

    Accepted: an int, a NumPy integer or 0-d tensor, and integral floats such as `2.0` (a count read from a JSON file
    or a float tensor). Refused: `True`/`False` (which Python would count as 1/0), `2.5`, negative numbers, strings.
    """
    number = value.item() if getattr(value, "ndim", None) == 0 else value  # NumPy scalars and 0-d tensors
    if isinstance(number, float) and number.is_integer():
        number = int(number)
    if isinstance(number, str) and name == "num_latent_thoughts":
        raise ValueError(
            f'`{name}` must be a whole number of thoughts, 0 or more, or "{AUTO_THOUGHTS}" (lowercase, the stop head '
            f"chooses), got {value!r}. Pass an int such as 6, or {AUTO_THOUGHTS!r}."
        )
    if isinstance(number, bool) or not isinstance(number, int) or number < 0:
        raise ValueError(
            f"`{name}` must be a whole number of thoughts, 0 or more, got {value!r}. Pass an int such as 6 (`2.0`, "
            "NumPy and tensor integers are accepted too)."
        )
    return number


def thought_counts(value, batch_size: int, name: str = "num_latent_thoughts") -> list[int]:
    """One count per prompt from one count for every prompt, or a list, tuple, 1-d array or tensor of one per prompt;
    every count is checked by [`thought_count`]."""
    if isinstance(value, (list, tuple)) or getattr(value, "ndim", None) == 1:
        counts = [thought_count(count, name) for count in value]
    else:
        counts = [thought_count(value, name)] * batch_size
    if len(counts) != batch_size:
        raise ValueError(
            f"`{name}` has {len(counts)} counts for {batch_size} prompts ({value!r}); pass one int for every prompt "
            "or one per prompt."
        )
    return counts


def is_auto(num_latent_thoughts) -> bool:
    """Whether `num_latent_thoughts` asks the stop head for the count (`"auto"`) rather than giving one."""
    return isinstance(num_latent_thoughts, str) and num_latent_thoughts == AUTO_THOUGHTS


def latent_block(num_thoughts: int, tokens: tuple = (START_LATENT, LATENT, END_LATENT)) -> str | list[int]:
    """Coconut's block of continuous thoughts: `<|start-latent|>` + `num_thoughts` x `<|latent|>` + `<|end-latent|>`.

    The one builder of the block, for text and for ids: with the default `tokens` it returns the text; with
    `tokens=(start_latent_token_id, latent_token_id, end_latent_token_id)` the list of ids. With 0 thoughts the block
    is the two markers alone, the layout of curriculum stage 0.

    Example: `latent_block(2)` is `"<|start-latent|><|latent|><|latent|><|end-latent|>"`, and
    `latent_block(2, (3, 2, 4))` is `[3, 2, 2, 4]`.
    """
    start, latent, end = tokens
    block = [start, *[latent] * thought_count(num_thoughts), end]
    return "".join(block) if isinstance(start, str) else block


def repository_file(pretrained_model_name_or_path, filename: str, **kwargs) -> str | None:
    """The local path of `filename` in a folder or Hub repository, or `None` where it has none (or is unreachable).
    `kwargs` are `from_pretrained`'s; the Hub's among them (`cache_dir`, `revision`, `token`, ...) are used."""
    hub_kwargs = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder")
    try:
        return cached_file(
            pretrained_model_name_or_path, filename, **{key: kwargs[key] for key in hub_kwargs if key in kwargs}
        )
    except OSError:  # transformers' one error for a missing file, repository or connection
        return None


def tokenizer_latent_ids(pretrained_model_name_or_path, **kwargs) -> dict[str, int | None] | None:
    """The ids of `<|start-latent|>`, `<|latent|>` and `<|end-latent|>` (`None` for one it lacks) in the tokenizer
    saved in a folder or Hub repository, read from its added tokens without loading it; `None` without a tokenizer.

    Args:
        pretrained_model_name_or_path (`str` or `os.PathLike`): the folder or Hub id.
        kwargs: `from_pretrained`'s keyword arguments; `cache_dir`, `revision`, `token`, ... are used.
    """
    added = None
    if (path := repository_file(pretrained_model_name_or_path, "tokenizer.json", **kwargs)) is not None:
        with open(path, encoding="utf-8") as file:
            added = {token["content"]: token["id"] for token in json.load(file).get("added_tokens", [])}
    elif (path := repository_file(pretrained_model_name_or_path, "tokenizer_config.json", **kwargs)) is not None:
        with open(path, encoding="utf-8") as file:
            decoder = json.load(file).get("added_tokens_decoder") or {}
        added = {token["content"]: int(token_id) for token_id, token in decoder.items()} if decoder else None
    return None if added is None else {token: added.get(token) for token in LATENT_TOKENS}


def check_config_latent_ids(config, token_ids: dict[str, int | None], source: str = "the tokenizer") -> None:
    """Raise a `ValueError` unless the model config's three latent ids are the Coconut tokens' ids in `token_ids`.

    A config whose `latent_token_id` is an ordinary token of the tokenizer loads and runs, but feeds thoughts at the
    wrong positions and never at the `<|latent|>` tokens the processor writes: wrong answers, no error. A pause-as-thought model
    (markers set, `latent_token_id=None`: nothing is fed back) passes.

    Args:
        config ([`CoconutInternVLConfig`] or `dict`): the model's config, or its `config.json` as a dict.
        token_ids (`dict[str, int | None]`): the tokenizer's id of each of the three token strings.
        source (`str`): what `token_ids` come from, for the message.
    """
    read = config.get if isinstance(config, dict) else lambda name: getattr(config, name, None)
    expected = {"start_latent_token_id": START_LATENT, "latent_token_id": LATENT, "end_latent_token_id": END_LATENT}
    # Pause as thought keeps the block's markers but sets `latent_token_id=None`, so that nothing is fed back.
    pause = read("start_latent_token_id") is not None and read("end_latent_token_id") is not None
    wrong = [
        f"`{name}`={read(name)} but {source}'s {token} is {token_ids.get(token)}"
        for name, token in expected.items()
        if read(name) != token_ids.get(token) and not (name == "latent_token_id" and read(name) is None and pause)
    ]
    if wrong:
        raise ValueError(
            f"The model config's latent token ids are not the tokenizer's Coconut tokens: {'; '.join(wrong)}. "
            "The model would take other tokens for thoughts. Use the tokenizer saved with the model, or set the "
            "config's three ids to the tokenizer's."
        )


__all__ = [
    "AUTO_THOUGHTS",
    "END_LATENT",
    "LATENT",
    "LATENT_TOKENS",
    "START_LATENT",
    "check_config_latent_ids",
    "is_auto",
    "latent_block",
    "repository_file",
    "thought_count",
    "thought_counts",
    "tokenizer_latent_ids",
]
