"""CoconutInternVLProcessor: image tokens per tile, pixel values in order, latent block, left padding, answers."""

import json

import pytest
import torch
from conftest import BAD_COUNTS, IMAGE_SIZE, INTEGRAL_COUNTS, TOKENS_PER_TILE, random_model
from PIL import Image
from replicas import HF_IMAGE_TOKEN_NAMES, OFFICIAL_CHAT_TEMPLATE, VOCAB_SIZE, write_replica_tokenizer
from transformers import AutoProcessor, AutoTokenizer, GotOcr2ImageProcessorPil

from coconut.tiny import tiny_coconut_config_for
from coconut.tokenizer import train_tokenizer
from processing_coconut_internvl import LATENT_TOKENS, CoconutInternVLProcessor, latent_block


LATENT_IDS = (298, 299, 300)  # the trained tokenizer's <|start-latent|>, <|end-latent|>, <|latent|>
CORPUS = ["Every wump is a zhorpus. Is Tom a wump or a yumpus? Tom is a wump. ### Yes No"] * 4


def make_processor(with_latent_tokens: bool = True, max_patches: int = 4) -> CoconutInternVLProcessor:
    tokenizer = train_tokenizer(CORPUS, vocab_size=300, with_latent_tokens=with_latent_tokens)
    image_processor = GotOcr2ImageProcessorPil(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        max_patches=max_patches,
        image_mean=[0.5] * 3,
        image_std=[0.5] * 3,
    )
    return CoconutInternVLProcessor(
        image_processor=image_processor, tokenizer=tokenizer, image_seq_length=TOKENS_PER_TILE
    )


def make_image(width: int, height: int, seed: int) -> Image.Image:
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (height, width, 3), generator=generator, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


def processor_model(processor: CoconutInternVLProcessor, seed: int = 0):
    """A tiny model whose token ids are the processor's tokenizer's."""
    from modeling_coconut_internvl import CoconutInternVLForConditionalGeneration

    return random_model(CoconutInternVLForConditionalGeneration, tiny_coconut_config_for(processor.tokenizer), seed)


@pytest.fixture(scope="module")
def processor():
    return make_processor()


CONVERSATIONS = [
    [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Is Tom a wump?"}]}],
    [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What happens?"}]}],
    [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": [{"type": "text", "text": "A"}, {"type": "image"}, {"type": "video"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "### Yes"}]},
        {"role": "user", "content": "And now?"},
    ],
]


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_chat_template_renders_as_the_official_internvl_template(processor, messages):
    """Images as `<image>\\n`, videos as `<video>\\n` (a video part is not dropped), as transformers' conversion."""
    for add_generation_prompt in (True, False):
        ours = processor.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        official = processor.tokenizer.apply_chat_template(
            messages, chat_template=OFFICIAL_CHAT_TEMPLATE, add_generation_prompt=add_generation_prompt, tokenize=False
        )
        assert ours == official
    has_video = any(
        part["type"] == "video" for m in messages if isinstance(m["content"], list) for part in m["content"]
    )
    assert ("<video>\n" in ours) == has_video


@pytest.fixture(scope="module")
def replica_tokenizer(tmp_path_factory):
    """The real InternVL3 vocabulary (151674 tokens, no `<video>`), its image tokens named as the official `-hf`."""
    folder = tmp_path_factory.mktemp("tokenizer")
    write_replica_tokenizer(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder, extra_special_tokens=HF_IMAGE_TOKEN_NAMES)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|start-latent|>", "<|end-latent|>", "<|latent|>"]})
    return tokenizer


def test_tokenizer_without_video_token_gets_no_new_vocabulary(replica_tokenizer, tmp_path, hf_home):
    tokenizer = replica_tokenizer
    assert len(tokenizer) == VOCAB_SIZE + 3 and "<video>" not in tokenizer.get_vocab()
    image_processor = GotOcr2ImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    processor = CoconutInternVLProcessor(
        image_processor=image_processor, tokenizer=tokenizer, image_seq_length=TOKENS_PER_TILE
    )
    assert processor.video_token == "<video>" and len(processor.tokenizer) == VOCAB_SIZE + 3
    assert "<video>" not in processor.tokenizer.get_vocab()
    ids = [processor.start_latent_token_id, processor.end_latent_token_id, processor.latent_token_id]
    assert ids == [VOCAB_SIZE, VOCAB_SIZE + 1, VOCAB_SIZE + 2]
    inputs = processor(images=[make_image(112, 56, seed=7)], text="<image>\nIs Tom a wump?", num_latent_thoughts=1)
    ids = inputs["input_ids"][0]
    expected_image = [151665] + [151667] * TOKENS_PER_TILE * 3 + [151666]  # <img>, 3 tiles of <IMG_CONTEXT>, </img>
    assert ids[: len(expected_image)] == expected_image
    assert ids[-3:] == [VOCAB_SIZE, VOCAB_SIZE + 2, VOCAB_SIZE + 1]  # <|start-latent|>, <|latent|>, <|end-latent|>

    processor.save_pretrained(tmp_path)
    loaded = AutoProcessor.from_pretrained(tmp_path, trust_remote_code=True)
    assert len(loaded.tokenizer) == VOCAB_SIZE + 3 and loaded.video_token == "<video>"
    assert (
        loaded(text="<image>", images=[make_image(56, 56, seed=8)])["input_ids"]
        == processor(text="<image>", images=[make_image(56, 56, seed=8)])["input_ids"]
    )


def test_check_latent_token_ids(processor):
    ids = dict(
        start_latent_token_id=processor.start_latent_token_id,
        end_latent_token_id=processor.end_latent_token_id,
        latent_token_id=processor.latent_token_id,
    )
    processor.check_latent_token_ids(ids)
    with pytest.raises(ValueError, match=r"`end_latent_token_id`=12 but the tokenizer's <\|end-latent\|> is"):
        processor.check_latent_token_ids({**ids, "end_latent_token_id": 12})


def test_image_tokens_per_tile_and_pixel_values_in_order(processor):
    wide, square = make_image(112, 56, seed=1), make_image(56, 56, seed=2)
    tiles = [processor.image_processor.get_number_of_image_patches(56, 112, {"crop_to_patches": True}), 1]
    assert tiles == [3, 1]  # 2 crops + thumbnail; a square image at tile size is one tile
    prompts = ["<image>\nWhich is bigger?", "Compare <image> with <image>."]
    inputs = processor(images=[wide, square, wide], text=prompts, return_tensors="pt")

    image_counts = (inputs["input_ids"] == processor.image_token_id).sum(dim=1).tolist()
    assert image_counts == [TOKENS_PER_TILE * 3, TOKENS_PER_TILE * (1 + 3)]
    assert inputs["pixel_values"].shape == (3 + 1 + 3, 3, IMAGE_SIZE, IMAGE_SIZE)
    # The tiles of each image, image by image, as the image processor gives them alone.
    alone = [
        processor.image_processor(image, crop_to_patches=True, return_tensors="pt")["pixel_values"]
        for image in (wide, square, wide)
    ]
    torch.testing.assert_close(inputs["pixel_values"], torch.cat(alone), rtol=0, atol=0)
    # Each image is wrapped in <img> ... </img> around its own run of context tokens.
    row = inputs["input_ids"][1].tolist()
    start, end = processor.start_image_token_id, processor.end_image_token_id
    opens = [i for i, token in enumerate(row) if token == start]
    closes = [i for i, token in enumerate(row) if token == end]
    assert [c - o - 1 for o, c in zip(opens, closes, strict=True)] == [TOKENS_PER_TILE * 1, TOKENS_PER_TILE * 3]


def test_native_placeholder_gives_same_ids(processor):
    image = make_image(112, 56, seed=3)
    ours = processor(images=[image], text="<image>\nIs Tom a wump?", return_tensors="pt")
    native = processor(images=[image], text="<IMG_CONTEXT>\nIs Tom a wump?", return_tensors="pt")
    assert torch.equal(ours["input_ids"], native["input_ids"])


def test_latent_block_per_sample_and_left_padding(processor):
    prompts = ["Is Tom a wump?", "Every wump is a zhorpus. Is Tom a wump?"]
    inputs = processor(text=prompts, num_latent_thoughts=[2, 0], return_tensors="pt")
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    ids0 = processor.tokenizer(prompts[0])["input_ids"]
    ids1 = processor.tokenizer(prompts[1])["input_ids"]
    block = [processor.start_latent_token_id] + [processor.latent_token_id] * 2 + [processor.end_latent_token_id]
    empty_block = [processor.start_latent_token_id, processor.end_latent_token_id]  # 0 thoughts: the markers alone
    length = max(len(ids0) + 4, len(ids1) + 2)
    pad = processor.tokenizer.pad_token_id

    def left_padded(row):
        return [pad] * (length - len(row)) + row

    assert ids.tolist() == [left_padded(ids0 + block), left_padded(ids1 + empty_block)]
    assert mask.tolist() == [left_padded([1] * len(ids0 + block)), left_padded([1] * len(ids1 + empty_block))]
    assert (mask[:, -1] == 1).all()  # left padding: every row ends with a real token

    same_for_all = processor(text=prompts, num_latent_thoughts=3, return_tensors="pt")["input_ids"]
    assert (same_for_all == processor.latent_token_id).sum(dim=1).tolist() == [3, 3]
    without_block = processor(text=prompts, return_tensors="pt")["input_ids"]
    assert not (without_block == processor.start_latent_token_id).any()


def test_auto_carries_the_request_to_generate_without_a_block(processor):
    prompts = ["Is Tom a wump?", "Every wump is a zhorpus. Is Tom a wump?"]
    inputs = processor(text=prompts, num_latent_thoughts="auto", return_tensors="pt")
    plain = processor(text=prompts, return_tensors="pt")
    assert torch.equal(inputs["input_ids"], plain["input_ids"]) and inputs["num_latent_thoughts"] == "auto"
    with pytest.raises(ValueError, match=r'pass `num_latent_thoughts="auto"` to the processor'):
        processor.build_prompt("Is Tom a wump?", num_latent_thoughts="auto")
    with pytest.raises(ValueError, match=r'or "auto" \(lowercase'):
        processor(text=prompts, num_latent_thoughts="Auto")

    model = processor_model(processor, seed=1)
    model.add_latent_stop_head()
    settings = dict(
        max_latent_thoughts=3, max_new_tokens=3, do_sample=False, pad_token_id=processor.tokenizer.pad_token_id
    )
    auto = model.generate(**inputs, **settings)
    assert torch.equal(auto, model.generate(**plain, num_latent_thoughts="auto", **settings))
    assert ((auto == processor.latent_token_id).sum(dim=1) >= 1).all()


@pytest.mark.parametrize("count", INTEGRAL_COUNTS)
def test_integral_thought_counts_of_any_type_are_accepted(processor, count):
    prompts = ["Is Tom a wump?", "Every wump is a zhorpus. Is Tom a wump?"]
    expected = processor(text=prompts, num_latent_thoughts=2, return_tensors="pt")["input_ids"]
    assert torch.equal(processor(text=prompts, num_latent_thoughts=count, return_tensors="pt")["input_ids"], expected)
    if not isinstance(count, list) and getattr(count, "ndim", 0) == 0:
        assert processor.build_prompt(prompts[0], num_latent_thoughts=count).endswith(latent_block(2))


@pytest.mark.parametrize("count, match", BAD_COUNTS)
def test_bad_thought_counts_are_an_error(processor, count, match):
    with pytest.raises(ValueError, match=match):
        processor(text=["Is Tom a wump?", "Is Tom a zhorpus?"], num_latent_thoughts=count)
    if not isinstance(count, list) and getattr(count, "ndim", 0) == 0:
        with pytest.raises(ValueError, match=match):
            processor.build_prompt("Is Tom a wump?", num_latent_thoughts=count)


def test_one_builder_for_text_and_ids():
    assert latent_block(2) == "<|start-latent|><|latent|><|latent|><|end-latent|>"
    assert latent_block(0) == "<|start-latent|><|end-latent|>"  # curriculum stage 0: the markers alone
    assert latent_block(2, (3, 2, 4)) == [3, 2, 2, 4]


@pytest.mark.parametrize(
    ("text", "num_images", "message"),
    [
        ("<image> and <image>", 1, "2 image placeholders .* but 1 images"),
        ("no image here", 1, "0 image placeholders .* but 1 images"),
        ("<image>", 0, "1 image placeholders .* but 0 images"),
    ],
)
def test_placeholder_image_count_mismatch_raises(processor, text, num_images, message):
    images = [make_image(56, 56, seed=i) for i in range(num_images)] or None
    with pytest.raises(ValueError, match=message):
        processor(images=images, text=text)


def test_tokenizer_without_latent_tokens_raises():
    with pytest.raises(ValueError, match="no .*<\\|start-latent\\|>"):
        make_processor(with_latent_tokens=False)


def test_build_prompt_and_apply_chat_template(processor):
    prompt = processor.build_prompt("Is Tom a wump?", num_images=2, num_latent_thoughts=2)
    assert prompt == (
        "<|im_start|>user\n<image>\n<image>\nIs Tom a wump?<|im_end|>\n<|im_start|>assistant\n"
        "<|start-latent|><|latent|><|latent|><|end-latent|>"
    )
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Is Tom a wump?"}]}]
    rendered = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert rendered == processor.build_prompt("Is Tom a wump?", num_images=1)


def test_decode_answer(processor):
    eos, pad = processor.tokenizer.eos_token, processor.tokenizer.pad_token
    assert processor.decode_answer(f"Tom is a wump.\n### Yes{eos}{pad}{pad}") == "Yes"
    assert processor.decode_answer("Tom is a wump.\n###   No  ") == "No"  # no eos: to the end, stripped
    assert processor.decode_answer("Tom is a wump.") is None
    assert processor.decode_answer("Tom ### is a wump.\n### Yes") == "Yes"  # a step may hold the marker: the last
    prompt = processor.build_prompt("Is Tom a wump?", num_latent_thoughts=1)
    ids = processor(text=[prompt + f"### Yes{eos}", prompt + f"step\n### No{eos}"], return_tensors="pt")["input_ids"]
    assert processor.decode_answer(ids) == ["Yes", "No"]  # left padding and the prompt's own eos are skipped
    assert processor.decode_answer(ids[1].tolist()) == "No"


def test_tiny_model_runs_on_processor_output_and_padding_changes_nothing(processor):
    model = processor_model(processor)
    images = [make_image(112, 56, seed=4), make_image(56, 56, seed=5)]
    prompts = [
        processor.build_prompt("Is Tom a wump?", num_images=1),
        processor.build_prompt("Every wump is a zhorpus. Tom is a wump. Is Tom a zhorpus?", num_images=1),
    ]
    inputs = processor(images=images, text=prompts, num_latent_thoughts=[3, 1], return_tensors="pt")
    with torch.no_grad():
        batched = model(**inputs).logits
        for row, (image, prompt, k) in enumerate(zip(images, prompts, [3, 1], strict=True)):
            alone = processor(images=[image], text=prompt, num_latent_thoughts=k, return_tensors="pt")
            logits = model(**alone).logits[0]
            real = inputs["attention_mask"][row].bool()
            difference = (batched[row, real] - logits).abs().max().item()
            assert difference < 1e-4, f"row {row}: max difference {difference}"
    assert torch.isfinite(batched).all()


def test_save_and_load_with_auto_processor(processor, tmp_path, hf_home):
    processor.save_pretrained(tmp_path)
    assert (tmp_path / "processing_coconut_internvl.py").is_file()
    assert (tmp_path / "latent_block_coconut_internvl.py").is_file()  # the shared file it imports
    assert not (tmp_path / "modeling_coconut_internvl.py").exists()
    loaded = AutoProcessor.from_pretrained(tmp_path, trust_remote_code=True)
    assert type(loaded).__name__ == "CoconutInternVLProcessor"
    assert loaded.image_seq_length == TOKENS_PER_TILE
    images = [make_image(112, 56, seed=6)]
    kwargs = dict(text="<image>\nIs Tom a wump?", num_latent_thoughts=2, return_tensors="pt")
    expected, got = processor(images=images, **kwargs), loaded(images=images, **kwargs)
    assert torch.equal(expected["input_ids"], got["input_ids"])
    torch.testing.assert_close(expected["pixel_values"], got["pixel_values"], rtol=0, atol=0)


def test_generate_with_stop_strings_and_the_processor(processor):
    """`stop_strings` (which need the tokenizer) end generation where the string is complete, thoughts and all."""
    model = processor_model(processor, seed=3)
    prompt = processor.build_prompt("Is Tom a wump?", num_images=1, num_latent_thoughts=2)
    inputs = processor(images=[make_image(IMAGE_SIZE, IMAGE_SIZE, 0)], text=prompt, return_tensors="pt")
    settings = dict(do_sample=False, eos_token_id=None, pad_token_id=processor.tokenizer.pad_token_id)
    free = model.generate(**inputs, max_new_tokens=8, **settings)[0, inputs["input_ids"].shape[1] :]
    # A stop string made of one whole generated token (byte-level tokens can be half a character).
    texts = [processor.tokenizer.decode(free[i : i + 1]) for i in range(1, 7)]
    position, stop = next((i + 1, text) for i, text in enumerate(texts) if text.strip() and text.isprintable())
    stopped = model.generate(
        **inputs, max_new_tokens=8, stop_strings=[stop], tokenizer=processor.tokenizer, **settings
    )
    new = stopped[0, inputs["input_ids"].shape[1] :]
    assert len(new) <= position + 1 < 8
    assert torch.equal(new, free[: len(new)])
    assert processor.tokenizer.decode(new).endswith(stop)


@pytest.mark.parametrize(
    "edit, match",
    [
        ({"latent_token_id": 13}, r"`latent_token_id`=13 but the tokenizer in .*'s <\|latent\|> is 300"),
        ({"start_latent_token_id": 299, "end_latent_token_id": 298}, r"`start_latent_token_id`=299 but .* is 298"),
    ],
)
def test_the_model_refuses_latent_ids_that_are_not_its_tokenizers_at_load(processor, tmp_path, edit, match):
    """Loaded without its processor, the model still reads the tokenizer saved beside it, and checks the three ids."""
    from modeling_coconut_internvl import CoconutInternVLForConditionalGeneration

    assert LATENT_IDS == tuple(processor.tokenizer.convert_tokens_to_ids(list(LATENT_TOKENS)))
    processor_model(processor).save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    CoconutInternVLForConditionalGeneration.from_pretrained(tmp_path)  # the saved ids pass
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, **edit}))
    with pytest.raises(ValueError, match=match):
        CoconutInternVLForConditionalGeneration.from_pretrained(tmp_path)
