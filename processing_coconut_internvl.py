"""Processor of Coconut-InternVL: InternVL prompts with image tokens per tile, plus Coconut's block of latent thoughts.

transformers' `InternVLProcessor` requires a video processor, which needs torchvision. This subclass makes the video
processor optional (used when torchvision is installed), accepts InternVL's original `<image>` placeholder as well as
the native `<IMG_CONTEXT>` one, appends `<|start-latent|>` + k x `<|latent|>` + `<|end-latent|>` to each prompt, and
reads the answer after Coconut's answer marker `### `.
"""

import json
from collections.abc import Sequence
from pathlib import Path

from transformers import InternVLProcessor
from transformers.image_utils import make_flat_list_of_images
from transformers.utils import is_torchvision_available, logging


try:  # imported as part of a package: the Hub's remote code, or a repository checkout used as one
    from .latent_block_coconut_internvl import (
        AUTO_THOUGHTS,
        END_LATENT,
        LATENT,
        LATENT_TOKENS,
        START_LATENT,
        check_config_latent_ids,
        is_auto,
        latent_block,
        repository_file,
        thought_count,
        thought_counts,
        tokenizer_latent_ids,
    )
except ImportError:  # imported from the repository root, e.g. `python train_sft.py`
    from latent_block_coconut_internvl import (
        AUTO_THOUGHTS,
        END_LATENT,
        LATENT,
        LATENT_TOKENS,
        START_LATENT,
        check_config_latent_ids,
        is_auto,
        latent_block,
        repository_file,
        thought_count,
        thought_counts,
        tokenizer_latent_ids,
    )


logger = logging.get_logger(__name__)

IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER = "<image>", "<video>"
ANSWER_MARKER = "### "

# InternVL's chat format (Qwen2 ChatML), as transformers' official InternVL conversion writes it: an image in a
# message becomes `<image>`, a video `<video>`, which the processor expands.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}{{ '<image>\n' }}"
    "{% elif part['type'] == 'video' %}{{ '<video>\n' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def user_content(question: str, num_images: int, record_name: str = "record") -> list[dict]:
    """The user turn as chat-template parts: one image part per image, at the question's `<image>` placeholders.

    A question without placeholders gets all its images before the text (InternVL's convention); a question with
    placeholders must have exactly one per image. The chat template decides how an image part is rendered.
    """
    pieces = question.split(IMAGE_PLACEHOLDER)
    num_placeholders = len(pieces) - 1
    if num_placeholders == 0:
        return [{"type": "image"}] * num_images + [{"type": "text", "text": question}]
    if num_placeholders != num_images:
        relation = "more" if num_placeholders > num_images else "fewer"
        raise ValueError(
            f"{record_name}: the question has {num_placeholders} {IMAGE_PLACEHOLDER} placeholders but {num_images} "
            f"images ({relation} placeholders than images); put one placeholder per image, or none to place all "
            "images before the question."
        )
    content = []
    for index, piece in enumerate(pieces):
        if index > 0:
            content.append({"type": "image"})
        if piece:
            content.append({"type": "text", "text": piece})
    return content


def chat_prompt(
    template_owner, question: str, num_images: int = 0, system_prompt: str | None = None, record_name: str = "record"
) -> str:
    """The chat-formatted prompt of `question` up to the opening of the assistant turn (no latent block).

    `template_owner` is the processor or, for text-only data, its tokenizer: anything whose `apply_chat_template`
    renders InternVL's template.
    """
    messages = [{"role": "user", "content": user_content(question, num_images, record_name)}]
    if system_prompt is not None:
        messages.insert(0, {"role": "system", "content": system_prompt})
    return template_owner.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def extract_answer(text: str, answer_marker: str = ANSWER_MARKER) -> str | None:
    """The answer in `text`: what follows the last `answer_marker` (a reasoning step may hold one too), stripped;
    `None` without a marker: a generation that never reaches its answer has not answered.

    Example: `extract_answer("Tom is a wumpus.\\n### Tom is a yumpus.")` is `"Tom is a yumpus."`.
    """
    _, found, answer = text.rpartition(answer_marker)
    return answer.strip() if found else None


def _refuse_image_paths(images) -> None:
    """Raise a `ValueError` for an image given as a path (a `str` or `Path`): the processor takes images, not files."""
    stack = [images]
    while stack:
        item = stack.pop()
        if isinstance(item, (str, Path)):
            raise ValueError(
                f"`images` holds the path {str(item)!r}, not an image: open it first, e.g. "
                f"`images=[PIL.Image.open({str(item)!r})]` (one image per `<image>` placeholder)."
            )
        if isinstance(item, (list, tuple)):
            stack.extend(item)


class CoconutInternVLProcessor(InternVLProcessor):
    r"""
    Constructs a Coconut-InternVL processor: an InternVL image processor (`GotOcr2ImageProcessorPil`, tiles of
    448x448 by default), a Qwen2 tokenizer with the three Coconut tokens, and InternVL's video processor when
    torchvision is installed.

    Each image placeholder in the text (`<image>`, or InternVL-hf's `<IMG_CONTEXT>`) becomes `<img>` followed by
    `image_seq_length` x (tiles of that image) `<IMG_CONTEXT>` tokens and `</img>`. With `num_latent_thoughts=k`,
    `<|start-latent|>` + k x `<|latent|>` + `<|end-latent|>` is appended to each prompt (see [`latent_block`]).

    Args:
        image_processor ([`GotOcr2ImageProcessorPil`] or [`GotOcr2ImageProcessor`]):
            Splits each image into tiles (`crop_to_patches`, between `min_patches` and `max_patches`, plus a
            thumbnail) and normalises them.
        tokenizer ([`PreTrainedTokenizerFast`]):
            Tokenizer with InternVL's `start_image_token`, `end_image_token`, `context_image_token` attributes (and
            `video_token`, else `<video>`, which needs no vocabulary entry) and the tokens `<|start-latent|>`,
            `<|end-latent|>`, `<|latent|>`.
        video_processor ([`InternVLVideoProcessor`], *optional*):
            Only when torchvision is installed; otherwise it is not an attribute of the processor.
        image_seq_length (`int`, *optional*, defaults to 256):
            Tokens per image tile: `(image_size // patch_size) ** 2 * downsample_ratio ** 2` (256 for InternVL3).
        chat_template (`str`, *optional*):
            Jinja chat template; defaults to InternVL's ChatML format in which an image part renders as `<image>\n`.

    Example:

    ```python
    >>> from PIL import Image
    >>> from transformers import AutoProcessor

    >>> processor = AutoProcessor.from_pretrained("path/or/hub-id", trust_remote_code=True)
    >>> prompt = processor.build_prompt("Is every wump a zhorpus?", num_images=1)
    >>> inputs = processor(images=[Image.new("RGB", (448, 448))], text=prompt, num_latent_thoughts=6,
    ...                    return_tensors="pt")
    >>> processor.decode_answer("step 1\n### Yes<|im_end|>")
    'Yes'
    ```
    """

    text_kwargs = {"padding_side": "left", "padding": True}

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        video_processor=None,
        image_seq_length: int = 256,
        chat_template=None,
        **kwargs,
    ):
        if "video_processor" in self.get_attributes() and video_processor is None:
            raise ValueError(
                "torchvision is installed, so `CoconutInternVLProcessor` needs a `video_processor`: pass "
                "`InternVLVideoProcessor()` (or load the processor with `from_pretrained`)."
            )
        if chat_template is None:
            chat_template = getattr(tokenizer, "chat_template", None) or DEFAULT_CHAT_TEMPLATE
        if getattr(tokenizer, "video_token", None) is None:
            # `InternVLProcessor` reads `tokenizer.video_token`. The processor expands `<video>` in the text before
            # tokenizing, so it needs no vocabulary entry, and InternVL3's tokenizers have none: a plain attribute
            # (a named special token would append `<video>` to the vocabulary and move every id after it).
            tokenizer.video_token = VIDEO_PLACEHOLDER
        # Without torchvision `video_processor` is not an attribute and the base class ignores the extra argument.
        super().__init__(image_processor, tokenizer, video_processor, image_seq_length, chat_template, **kwargs)
        latent_ids = tokenizer.convert_tokens_to_ids([START_LATENT, LATENT, END_LATENT])
        missing = [
            token
            for token, i in zip((START_LATENT, LATENT, END_LATENT), latent_ids, strict=True)
            if i in (None, tokenizer.unk_token_id)
        ]
        if missing:
            raise ValueError(
                f"The tokenizer has no {missing} token(s); add them with `tokenizer.add_special_tokens("
                "{'additional_special_tokens': ['<|start-latent|>', '<|end-latent|>', '<|latent|>']})` and resize "
                "the model's embeddings (`convert_to_coconut.py` does both)."
            )
        self.start_latent_token_id, self.latent_token_id, self.end_latent_token_id = latent_ids

    @classmethod
    def get_attributes(cls) -> list[str]:
        """The sub-processors: the video processor only when torchvision, which it needs, is installed."""
        attributes = super().get_attributes()
        if not is_torchvision_available():
            attributes = [name for name in attributes if name != "video_processor"]
        return attributes

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """Load the processor; when the same folder or repository holds a Coconut-InternVL `config.json`, also check
        that the config's latent token ids are this tokenizer's Coconut tokens (see `check_latent_token_ids`). A
        local folder without the tokenizer or processor files is refused, naming the file."""
        folder = Path(pretrained_model_name_or_path)
        if folder.is_dir():  # the library's messages would name neither the file nor how to get it back
            for name, alternative in (
                ("tokenizer.json", "vocab.json"),
                ("processor_config.json", "preprocessor_config.json"),
            ):
                if not (folder / name).is_file() and not (folder / alternative).is_file():
                    raise ValueError(
                        f"{str(folder)!r} has no {name}, which the processor loads from. Save the processor beside the "
                        "model (`processor.save_pretrained(folder)`; convert_to_coconut.py and train_sft.py do), or copy "
                        "the file from the folder the model was converted or trained in."
                    )
        processor = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        config_file = repository_file(pretrained_model_name_or_path, "config.json", **kwargs)
        if config_file is not None:
            with open(config_file, encoding="utf-8") as file:
                config = json.load(file)
            if config.get("model_type") == "coconut_internvl":
                processor.check_latent_token_ids(config)
        return processor

    def check_latent_token_ids(self, config) -> None:
        """Raise a `ValueError` unless the model config's three latent ids are this tokenizer's Coconut tokens (see
        [`check_config_latent_ids`]).

        Args:
            config ([`CoconutInternVLConfig`] or `dict`): the model's config, or its `config.json` as a dict.
        """
        token_ids = dict(zip(LATENT_TOKENS, self.tokenizer.convert_tokens_to_ids(list(LATENT_TOKENS)), strict=True))
        check_config_latent_ids(config, token_ids)

    def __call__(
        self, images=None, text=None, videos=None, num_latent_thoughts: int | Sequence[int] | None = None, **kwargs
    ):
        r"""
        Tokenizes `text` with every image placeholder expanded and, optionally, a block of latent thoughts appended,
        and turns `images` into the tiles the vision tower reads.

        Args:
            images (`PIL.Image.Image`, `np.ndarray`, `torch.Tensor` or a (nested) list of them, *optional*):
                The images, in the order of the placeholders over all prompts.
            text (`str` or `list[str]`):
                Prompts; each `<image>` (or `<IMG_CONTEXT>`) marks where one image goes.
            videos (*optional*):
                Videos for `<video>` placeholders; needs torchvision.
            num_latent_thoughts (`int`, `list[int]` or `"auto"`, *optional*):
                Append a block of this many continuous thoughts to each prompt (one count for all, or one per prompt;
                0 appends the two markers alone). `"auto"` appends no block and returns `num_latent_thoughts="auto"`
                with the inputs, so that `model.generate(**inputs)` lets the stop head choose each prompt's count
                and appends the blocks. Left out (`None`), no block is appended.
            kwargs:
                Tokenizer and image-processor arguments (`return_tensors`, `padding_side`, `max_patches`, ...).

        Returns:
            [`BatchFeature`] with `input_ids` and `attention_mask` `(batch_size, sequence_length)` (left-padded by
            default), with images `pixel_values` `(total_tiles, 3, height, width)`: every tile of every image, in
            order; with `num_latent_thoughts="auto"` also `num_latent_thoughts`, for `generate`.
        """
        if text is None:
            raise ValueError("`text` is required: pass the prompt(s), with one `<image>` per image.")
        text = [text] if isinstance(text, str) else list(text)
        if videos is not None and "video_processor" not in self.get_attributes():
            raise ValueError(
                "`videos` need InternVL's video processor, which needs torchvision: `pip install torchvision`."
            )

        counts = [sample.count(IMAGE_PLACEHOLDER) + sample.count(self.image_token) for sample in text]
        _refuse_image_paths(images)
        num_images = len(make_flat_list_of_images(images)) if images is not None else 0
        if sum(counts) != num_images:
            raise ValueError(
                f"The prompts hold {sum(counts)} image placeholders ({IMAGE_PLACEHOLDER} or {self.image_token}; per "
                f"prompt: {counts}) but {num_images} images were passed; give exactly one image per placeholder."
            )
        text = [sample.replace(IMAGE_PLACEHOLDER, self.image_token) for sample in text]
        if num_latent_thoughts is not None and not is_auto(num_latent_thoughts):
            counts = thought_counts(num_latent_thoughts, len(text))
            text = [sample + latent_block(count) for sample, count in zip(text, counts, strict=True)]
        outputs = super().__call__(images=images, text=text, videos=videos, **kwargs)
        if is_auto(num_latent_thoughts):  # `generate(**outputs)` lets the stop head choose and appends the blocks
            outputs["num_latent_thoughts"] = AUTO_THOUGHTS
        return outputs

    def build_prompt(
        self,
        question: str,
        num_images: int = 0,
        num_latent_thoughts: int | str | None = None,
        system_prompt: str | None = None,
    ) -> str:
        """The Coconut prompt for `question`: a user turn with its `num_images` images (at the question's `<image>`
        placeholders, or all before it), then the assistant turn's opening and, unless `num_latent_thoughts` is
        `None`, the latent block (see [`latent_block`]; `"auto"` is a `ValueError`: pass it to `__call__` or
        `generate`, which choose the count). Pass it with the images to `__call__`."""
        if is_auto(num_latent_thoughts):
            raise ValueError(
                'A prompt\'s text cannot say `num_latent_thoughts="auto"`: the stop head chooses the count in '
                "`generate`. Build the prompt without a block (`num_latent_thoughts=None`) and pass "
                '`num_latent_thoughts="auto"` to the processor (its output carries it to `generate`) or to `generate`.'
            )
        prompt = chat_prompt(self, question, num_images, system_prompt)
        return prompt if num_latent_thoughts is None else prompt + latent_block(num_latent_thoughts)

    def decode_answer(self, sequences, answer_marker: str = ANSWER_MARKER) -> str | None | list[str | None]:
        """The answer in generated text: what follows the last `answer_marker`, up to the end-of-sequence token,
        stripped; `None` where the text has no marker.

        Args:
            sequences (`str`, `list[str]`, `list[int]`, `list[list[int]]` or `torch.Tensor`):
                Decoded text or token ids of one or several sequences (prompt included or not).
            answer_marker (`str`, *optional*, defaults to `"### "`): the marker that precedes the final answer.
        """
        if hasattr(sequences, "tolist"):
            sequences = sequences.tolist()
        if isinstance(sequences, str):
            return self._answer_from_text(sequences, answer_marker)
        if not isinstance(sequences, (list, tuple)) or any(
            not isinstance(item, (str, int, list, tuple)) and not hasattr(item, "tolist") for item in sequences
        ):
            raise ValueError(
                f"`decode_answer` reads generated text or token ids (a str, a list of ints, a tensor, or a list of "
                f"them), got {sequences!r}. Pass `output_ids[0, prompt_length:]` or the text `processor.decode` gave."
            )
        if len(sequences) and isinstance(sequences[0], int):
            return self._answer_from_text(self.tokenizer.decode(sequences, skip_special_tokens=False), answer_marker)
        return [self.decode_answer(sequence, answer_marker) for sequence in sequences]

    def _answer_from_text(self, text: str, answer_marker: str) -> str | None:
        """`extract_answer`, up to the end-of-sequence token after the marker, without padding."""
        answer = extract_answer(text, answer_marker)
        if answer is None:
            return None
        if self.tokenizer.eos_token:
            answer = answer.split(self.tokenizer.eos_token)[0]
        if self.tokenizer.pad_token:
            answer = answer.replace(self.tokenizer.pad_token, "")
        return answer.strip()


CoconutInternVLProcessor.register_for_auto_class()

__all__ = [
    "ANSWER_MARKER",
    "AUTO_THOUGHTS",
    "CoconutInternVLProcessor",
    "DEFAULT_CHAT_TEMPLATE",
    "LATENT_TOKENS",
    "chat_prompt",
    "check_config_latent_ids",
    "extract_answer",
    "is_auto",
    "latent_block",
    "thought_count",
    "thought_counts",
    "tokenizer_latent_ids",
    "user_content",
]
