"""Offline tokenizers with InternVL's and Coconut's special tokens, for tiny models and the bundled task.

The real models use InternVL3's Qwen2 tokenizer (byte-level BPE). Here a byte-level BPE of the same kind is trained
on a small corpus in well under a second, so tests and the embedded default need no download.
"""

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from processing_coconut_internvl import DEFAULT_CHAT_TEMPLATE, LATENT_TOKENS


PAD_TOKEN = "<|endoftext|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
START_IMAGE, END_IMAGE, IMAGE_CONTEXT, VIDEO = "<img>", "</img>", "<IMG_CONTEXT>", "<video>"
BASE_SPECIAL_TOKENS = (PAD_TOKEN, IM_START, IM_END, START_IMAGE, END_IMAGE, IMAGE_CONTEXT, VIDEO)


def train_tokenizer(corpus: Iterable[str], vocab_size: int = 512, with_latent_tokens: bool = True):
    """A byte-level BPE tokenizer trained on `corpus`, with InternVL's special tokens (and Coconut's, by default).

    Args:
        corpus (`Iterable[str]`): texts to learn merges from, e.g. every question, step and answer of a dataset.
        vocab_size (`int`): the vocabulary size to aim for, special tokens and the 256 byte symbols included.
        with_latent_tokens (`bool`): add `<|start-latent|>`, `<|end-latent|>`, `<|latent|>` (last, in that order,
            as in the converted InternVL3 checkpoints). Leave them out to mimic a base InternVL tokenizer.

    Returns:
        `PreTrainedTokenizerFast` with `pad_token`, `eos_token` (`<|im_end|>`), InternVL's image-token attributes and a
        chat template.
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(BASE_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token=PAD_TOKEN,
        eos_token=IM_END,
        chat_template=DEFAULT_CHAT_TEMPLATE,
        extra_special_tokens={
            "start_image_token": START_IMAGE,
            "end_image_token": END_IMAGE,
            "context_image_token": IMAGE_CONTEXT,
            "video_token": VIDEO,
        },
    )
    if with_latent_tokens:
        wrapped.add_special_tokens({"additional_special_tokens": list(LATENT_TOKENS)})
    return wrapped


__all__ = ["train_tokenizer", "PAD_TOKEN", "IM_START", "IM_END", "START_IMAGE", "END_IMAGE", "IMAGE_CONTEXT"]
