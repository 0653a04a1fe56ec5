"""Replicas of the real `OpenGVLab/InternVL3-1B` checkpoint, built from its public description, not from our converter.

Sources (read, nothing imported): the printed module tree, config and tokenizer of the original `OpenGVLab/InternVL3-1B`
(`shivangjhalani/multicoco`, `InternVL3-1B_data.md`); OpenGVLab's `modeling_intern_vit.py` and
`modeling_internvl_chat.py` for what a module tree does not print (the class and position embeddings, the layer scales
`ls1`/`ls2`, the forward pass and the `v2` pixel shuffle); transformers' `convert_internvl_weights_to_hf.py` for the
`-hf` form (its tokenizer names the image tokens, not `<video>`). `coconut.convert` is never used here, so a wrong
mapping in it cannot pass its own test.

- `INTERNVL3_1B_CONFIG`: the original `config.json`, full size, as printed.
- `write_replica_tokenizer`: the real special tokens at their real ids (151643-151673), 151674 tokens in all.
- `replica_config` / `replica_state_dict` / `write_original_replica`: the original layout at reduced width and depth,
  with the real key names and the real vocabulary; `replica_shapes`: those keys' shapes at any size.
- `write_hf_replica`: the `-hf` form, written by transformers itself.
- `reference_logits`: the original `InternVLChatModel` forward computed by hand (InternViT, pixel shuffle `v2`,
  `mlp1`) around transformers' `Qwen2ForCausalLM`, which is what the original model runs as its `language_model`.
"""

import copy
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from conftest import random_model
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import (
    AutoTokenizer,
    GotOcr2ImageProcessorPil,
    InternVLConfig,
    InternVLForConditionalGeneration,
    Qwen2Config,
    Qwen2ForCausalLM,
)


# The tokenizer: 151643 ordinary byte-level BPE tokens, then these, in this order (`added_tokens_decoder`).
SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>",
    "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>", "<img>", "</img>", "<IMG_CONTEXT>", "<quad>",
    "</quad>", "<ref>", "</ref>", "<box>", "</box>",
)  # fmt: skip
NOT_SPECIAL = {
    "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>",
}  # fmt: skip
FIRST_SPECIAL_ID, VOCAB_SIZE = 151643, 151674
IM_END_ID, IMAGE_CONTEXT_ID = 151645, 151667
CORPUS = ["Every wump is a zhorpus. Is Tom a wump or a yumpus? Tom is a wump. ### Yes No"] * 4

# The original config.json of OpenGVLab/InternVL3-1B, as printed (`print(model.config)`).
INTERNVL3_1B_CONFIG = {
    "architectures": ["InternVLChatModel"],
    "auto_map": {
        "AutoConfig": "configuration_internvl_chat.InternVLChatConfig",
        "AutoModel": "modeling_internvl_chat.InternVLChatModel",
        "AutoModelForCausalLM": "modeling_internvl_chat.InternVLChatModel",
    },
    "downsample_ratio": 0.5,
    "dynamic_image_size": True,
    "force_image_size": 448,
    "hidden_size": 896,
    "image_fold": None,
    "llm_config": {
        "_name_or_path": "./pretrained/Qwen2.5-32B-Instruct",
        "architectures": ["Qwen2ForCausalLM"],
        "attention_dropout": 0.0,
        "bos_token_id": 151643,
        "eos_token_id": 151643,
        "hidden_act": "silu",
        "hidden_size": 896,
        "initializer_range": 0.02,
        "intermediate_size": 4864,
        "layer_types": ["full_attention"] * 24,
        "max_position_embeddings": 32768,
        "max_window_layers": 70,
        "model_type": "qwen2",
        "moe_config": None,
        "num_attention_heads": 14,
        "num_hidden_layers": 24,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-06,
        "rope_scaling": {"factor": 2.0, "rope_type": "dynamic", "type": "dynamic"},
        "rope_theta": 1000000.0,
        "sliding_window": None,
        "torch_dtype": "bfloat16",
        "use_bfloat16": True,
        "use_cache": False,
        "use_sliding_window": False,
        "vocab_size": 151674,
    },
    "max_dynamic_patch": 12,
    "min_dynamic_patch": 1,
    "model_type": "internvl_chat",
    "output_attentions": False,
    "pad2square": False,
    "ps_version": "v2",
    "select_layer": -1,
    "system_message": None,
    "template": "internvl2_5",
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": None,
    "use_backbone_lora": 0,
    "use_llm_lora": 0,
    "use_thumbnail": True,
    "vision_config": {
        "_name_or_path": "OpenGVLab/InternViT-6B-448px-V1-5",
        "architectures": ["InternVisionModel"],
        "attention_dropout": 0.0,
        "auto_map": {
            "AutoConfig": "configuration_intern_vit.InternVisionConfig",
            "AutoModel": "modeling_intern_vit.InternVisionModel",
        },
        "capacity_factor": 1.2,
        "drop_path_rate": 0.1,
        "dropout": 0.0,
        "eval_capacity_factor": 1.4,
        "hidden_act": "gelu",
        "hidden_size": 1024,
        "image_size": 448,
        "initializer_factor": 0.1,
        "initializer_range": 1e-10,
        "intermediate_size": 4096,
        "laux_allreduce": "all_nodes",
        "layer_norm_eps": 1e-06,
        "model_type": "intern_vit_6b",
        "moe_coeff_ratio": 0.5,
        "moe_intermediate_size": 768,
        "moe_output_scale": 4.0,
        "noisy_gate_policy": "RSample_before",
        "norm_type": "layer_norm",
        "num_attention_heads": 16,
        "num_channels": 3,
        "num_experts": 8,
        "num_hidden_layers": 24,
        "num_routed_experts": 4,
        "num_shared_experts": 4,
        "patch_size": 14,
        "qk_normalization": False,
        "qkv_bias": True,
        "shared_expert_intermediate_size": 3072,
        "torch_dtype": "bfloat16",
        "use_bfloat16": True,
        "use_flash_attn": False,
        "use_moe": False,
        "use_residual": True,
        "use_rts": False,
        "use_weighted_residual": False,
    },
}
# The chat template of transformers' official conversion (`chat_template` in `convert_internvl_weights_to_hf.py`).
OFFICIAL_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n'}}"
    "{% if message['content'] is string %}"
    "{{ message['content'] }}"
    "{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}"
    "{{ '<image>\n' }}"
    "{% elif content['type'] == 'video' %}"
    "{{ '<video>\n' }}"
    "{% elif content['type'] == 'text' %}"
    "{{ content['text'] }}"
    "{% endif %}"
    "{% endfor %}"
    "{% endif %}"
    "{{'<|im_end|>\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}"
    "{{'<|im_start|>assistant\n' }}"
    "{% endif %}"
)
# The image tokens as the official conversion's tokenizer names them (`write_tokenizer`): no `video_token`.
HF_IMAGE_TOKEN_NAMES = {
    "start_image_token": "<img>",
    "end_image_token": "</img>",
    "context_image_token": "<IMG_CONTEXT>",
}
VIDEO_TOKEN = "<video>"
# Reduced width and depth (the vocabulary stays real): 56 px tiles of 4 x 4 patches, 4 tokens per tile.
REPLICA_IMAGE_SIZE, REPLICA_TOKENS_PER_TILE = 56, 4
_REDUCED_VISION = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2, image_size=56)
_REDUCED_TEXT = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2)


def write_replica_tokenizer(folder: Path) -> None:
    """The original tokenizer files (`vocab.json`, `merges.txt`, `tokenizer_config.json`, `Qwen2Tokenizer`).

    Ordinary tokens: the 256 byte-level symbols and merges learned on `CORPUS`, then unreachable filler tokens up to
    id 151642 (a real vocabulary's worth of rows at no cost); then the 31 special tokens at 151643-151673.
    """
    folder.mkdir(parents=True, exist_ok=True)
    learner = Tokenizer(models.BPE())
    learner.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    learner.train_from_iterator(CORPUS, trainer=trainer)
    vocab = learner.get_vocab()
    vocab.update({f"<|filler_{i}|>": i for i in range(len(vocab), FIRST_SPECIAL_ID)})
    merges = json.loads(learner.to_str())["model"]["merges"]
    models.BPE(vocab=vocab, merges=[tuple(merge) for merge in merges]).save(str(folder))
    added_tokens = {
        str(FIRST_SPECIAL_ID + i): {
            "content": token,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": token not in NOT_SPECIAL,
        }
        for i, token in enumerate(SPECIAL_TOKENS)
    }
    tokenizer_config = {
        "add_prefix_space": False,
        "added_tokens_decoder": added_tokens,
        "additional_special_tokens": list(SPECIAL_TOKENS[1:14]),
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 12288,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))


def replica_config() -> dict:
    """`INTERNVL3_1B_CONFIG` at reduced width and depth: every other key and value as in the real one."""
    config = copy.deepcopy(INTERNVL3_1B_CONFIG)
    config["vision_config"].update(_REDUCED_VISION)
    config["llm_config"].update(_REDUCED_TEXT, num_hidden_layers=2, layer_types=["full_attention"] * 2)
    config.update(force_image_size=REPLICA_IMAGE_SIZE, hidden_size=_REDUCED_TEXT["hidden_size"])
    return config


def replica_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """The real key names of the printed module tree, with their shapes under `config`."""
    vision, llm = config["vision_config"], config["llm_config"]
    c, i_v, patch = vision["hidden_size"], vision["intermediate_size"], vision["patch_size"]
    positions = (vision["image_size"] // patch) ** 2 + 1
    h, i_t, vocab = llm["hidden_size"], llm["intermediate_size"], llm["vocab_size"]
    kv = h // llm["num_attention_heads"] * llm["num_key_value_heads"]
    shuffled = c * int(1 / config["downsample_ratio"]) ** 2  # channels after the pixel shuffle
    shapes = {
        "vision_model.embeddings.class_embedding": (1, 1, c),
        "vision_model.embeddings.position_embedding": (1, positions, c),
        "vision_model.embeddings.patch_embedding.weight": (c, 3, patch, patch),
        "vision_model.embeddings.patch_embedding.bias": (c,),
        "language_model.model.embed_tokens.weight": (vocab, h),
        "language_model.model.norm.weight": (h,),
        "language_model.lm_head.weight": (vocab, h),
        "mlp1.0.weight": (shuffled,),
        "mlp1.0.bias": (shuffled,),
        "mlp1.1.weight": (h, shuffled),
        "mlp1.1.bias": (h,),
        "mlp1.3.weight": (h, h),
        "mlp1.3.bias": (h,),
    }
    for layer in range(vision["num_hidden_layers"]):
        prefix = f"vision_model.encoder.layers.{layer}."
        shapes.update(
            {
                prefix + "attn.qkv.weight": (3 * c, c),
                prefix + "attn.qkv.bias": (3 * c,),
                prefix + "attn.proj.weight": (c, c),
                prefix + "attn.proj.bias": (c,),
                prefix + "mlp.fc1.weight": (i_v, c),
                prefix + "mlp.fc1.bias": (i_v,),
                prefix + "mlp.fc2.weight": (c, i_v),
                prefix + "mlp.fc2.bias": (c,),
                prefix + "norm1.weight": (c,),
                prefix + "norm1.bias": (c,),
                prefix + "norm2.weight": (c,),
                prefix + "norm2.bias": (c,),
                prefix + "ls1": (c,),
                prefix + "ls2": (c,),
            }
        )
    for layer in range(llm["num_hidden_layers"]):
        prefix = f"language_model.model.layers.{layer}."
        shapes.update(
            {
                prefix + "self_attn.q_proj.weight": (h, h),
                prefix + "self_attn.q_proj.bias": (h,),
                prefix + "self_attn.k_proj.weight": (kv, h),
                prefix + "self_attn.k_proj.bias": (kv,),
                prefix + "self_attn.v_proj.weight": (kv, h),
                prefix + "self_attn.v_proj.bias": (kv,),
                prefix + "self_attn.o_proj.weight": (h, h),
                prefix + "mlp.gate_proj.weight": (i_t, h),
                prefix + "mlp.up_proj.weight": (i_t, h),
                prefix + "mlp.down_proj.weight": (h, i_t),
                prefix + "input_layernorm.weight": (h,),
                prefix + "post_attention_layernorm.weight": (h,),
            }
        )
    return dict(sorted(shapes.items()))


def replica_state_dict(config: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under the real key names and shapes of the printed module tree (float32, N(0, 0.2))."""
    generator = torch.Generator().manual_seed(seed)
    return {key: torch.randn(shape, generator=generator) * 0.2 for key, shape in replica_shapes(config).items()}


def write_original_replica(folder: Path, seed: int = 0) -> dict[str, torch.Tensor]:
    """The original-layout folder: config.json, model.safetensors, tokenizer files and a README with a licence."""
    config = replica_config()
    state_dict = replica_state_dict(config, seed)
    write_replica_tokenizer(folder)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    save_file(state_dict, folder / "model.safetensors")
    (folder / "README.md").write_text(
        "---\nlicense: mit\npipeline_tag: image-text-to-text\n---\n# InternVL3-1B replica\n"
    )
    return state_dict


def write_hf_replica(
    folder: Path,
    text_model_type: str = "qwen2",
    tie_word_embeddings: bool = False,
    write_tie_key: bool = True,
    video_token: bool = False,
    seed=1,
) -> InternVLForConditionalGeneration:
    """The `-hf` form of the replica, written by transformers: a native `InternVLForConditionalGeneration` with the
    official conversion's config values at the reduced size, saved with `save_pretrained` (which writes the legacy
    key layout of the Hub's `-hf` repositories), the tokenizer and image processor as the official conversion writes
    them. Returns the model, whose logits are the ground truth.

    `text_model_type="qwen3"` gives the InternVL3.5 kind of text model. `write_tie_key=False` removes the top-level
    `tie_word_embeddings` from config.json, as transformers 4.x wrote InternVL configs. `video_token=True` declares
    `video_token: <video>` as well, as newer conversions name it: the tokenizer then adds `<video>` after the
    vocabulary (id 151674, a row the model's embeddings do not have, since the processor expands `<video>` in the
    text and the model never sees it).
    """
    write_replica_tokenizer(folder)
    names = {**HF_IMAGE_TOKEN_NAMES, **({"video_token": VIDEO_TOKEN} if video_token else {})}
    tokenizer = AutoTokenizer.from_pretrained(folder, extra_special_tokens=names)
    tokenizer.chat_template = OFFICIAL_CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    text_config = dict(
        model_type=text_model_type,
        vocab_size=VOCAB_SIZE,
        num_hidden_layers=2,
        bos_token_id=FIRST_SPECIAL_ID,
        eos_token_id=IM_END_ID,
        max_position_embeddings=32768,
        use_cache=True,
        tie_word_embeddings=tie_word_embeddings,
        **_REDUCED_TEXT,
    )
    if text_model_type == "qwen2":
        text_config.update(rope_scaling={"factor": 2.0, "rope_type": "dynamic"}, rope_theta=1e6, max_window_layers=70)
    else:
        text_config.update(head_dim=8)
    vision_config = dict(
        _REDUCED_VISION, patch_size=14, attention_bias=True, use_qk_norm=False, initializer_range=1e-10
    )
    config = InternVLConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=IMAGE_CONTEXT_ID,
        image_seq_length=REPLICA_TOKENS_PER_TILE,
        tie_word_embeddings=tie_word_embeddings,
    )
    model = random_model(InternVLForConditionalGeneration, config, seed)
    model.save_pretrained(folder)
    if not write_tie_key:
        written = json.loads((folder / "config.json").read_text())
        del written["tie_word_embeddings"]
        (folder / "config.json").write_text(json.dumps(written, indent=2))
    GotOcr2ImageProcessorPil(
        size={"height": REPLICA_IMAGE_SIZE, "width": REPLICA_IMAGE_SIZE},
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
    ).save_pretrained(folder)
    (folder / "README.md").write_text("---\nlicense: mit\n---\n# InternVL3-1B-hf replica\n")
    return model


def _intern_vit(state_dict: dict, vision: dict, pixel_values: torch.Tensor) -> torch.Tensor:
    """InternViT's last hidden state `(tiles, 1 + patches, C)`, as OpenGVLab's `InternVisionModel` computes it."""
    weights = {key.removeprefix("vision_model."): value for key, value in state_dict.items()}
    heads, eps = vision["num_attention_heads"], vision["layer_norm_eps"]
    patches = F.conv2d(
        pixel_values,
        weights["embeddings.patch_embedding.weight"],
        weights["embeddings.patch_embedding.bias"],
        stride=vision["patch_size"],
    )  # (tiles, C, side, side)
    patches = patches.flatten(2).transpose(1, 2)  # (tiles, patches, C)
    cls = weights["embeddings.class_embedding"].expand(patches.shape[0], 1, -1)
    x = torch.cat([cls, patches], dim=1) + weights["embeddings.position_embedding"]  # at the trained size: no resize
    tiles, n, c = x.shape
    for layer in range(vision["num_hidden_layers"]):
        w = {key.removeprefix(f"encoder.layers.{layer}."): value for key, value in weights.items()}
        y = F.layer_norm(x, (c,), w["norm1.weight"], w["norm1.bias"], eps)
        qkv = F.linear(y, w["attn.qkv.weight"], w["attn.qkv.bias"])
        q, k, v = qkv.reshape(tiles, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)  # 3 x (tiles, heads, n, d)
        attention = ((q * (c // heads) ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1)
        y = (attention @ v).transpose(1, 2).reshape(tiles, n, c)
        x = x + F.linear(y, w["attn.proj.weight"], w["attn.proj.bias"]) * w["ls1"]
        y = F.layer_norm(x, (c,), w["norm2.weight"], w["norm2.bias"], eps)
        y = F.linear(
            F.gelu(F.linear(y, w["mlp.fc1.weight"], w["mlp.fc1.bias"])), w["mlp.fc2.weight"], w["mlp.fc2.bias"]
        )
        x = x + y * w["ls2"]
    return x


def _pixel_shuffle_v2(x: torch.Tensor, scale: float) -> torch.Tensor:
    """InternVL's `pixel_shuffle` with `ps_version='v2'`: `(n, w, h, c)` -> `(n, h*scale, w*scale, c/scale**2)`."""
    n, w, h, c = x.shape
    x = x.view(n, w, int(h * scale), int(c / scale))
    x = x.permute(0, 2, 1, 3).contiguous()
    x = x.view(n, int(h * scale), int(w * scale), int(c / (scale * scale)))
    return x.permute(0, 2, 1, 3).contiguous()


def image_features(state_dict: dict, config: dict, pixel_values: torch.Tensor) -> torch.Tensor:
    """`InternVLChatModel.extract_feature`: `(tiles, tokens per tile, H)` for `select_layer=-1`."""
    x = _intern_vit(state_dict, config["vision_config"], pixel_values)[:, 1:, :]  # drop the class token
    side = int(x.shape[1] ** 0.5)
    x = _pixel_shuffle_v2(x.reshape(x.shape[0], side, side, -1), config["downsample_ratio"])
    x = x.reshape(x.shape[0], -1, x.shape[-1])  # (tiles, tokens, 4C)
    # mlp1 = LayerNorm (eps 1e-5, as printed), Linear, GELU, Linear
    x = F.layer_norm(x, x.shape[-1:], state_dict["mlp1.0.weight"], state_dict["mlp1.0.bias"], eps=1e-5)
    x = F.linear(x, state_dict["mlp1.1.weight"], state_dict["mlp1.1.bias"])
    return F.linear(F.gelu(x), state_dict["mlp1.3.weight"], state_dict["mlp1.3.bias"])


def reference_logits(state_dict: dict, config: dict, input_ids: torch.Tensor, pixel_values=None) -> torch.Tensor:
    """The original model's logits `(batch, seq, vocab)`: text embeddings, each `<IMG_CONTEXT>` replaced by the next
    image feature, through the `language_model` (a transformers `Qwen2ForCausalLM` built from `llm_config`)."""
    language_model = Qwen2ForCausalLM(Qwen2Config(**config["llm_config"])).eval()
    prefix = "language_model."
    language_model.load_state_dict(
        {key.removeprefix(prefix): value for key, value in state_dict.items() if key.startswith(prefix)}, strict=True
    )
    with torch.no_grad():
        embeddings = language_model.get_input_embeddings()(input_ids)
        if pixel_values is not None:
            features = image_features(state_dict, config, pixel_values)
            selected = input_ids == IMAGE_CONTEXT_ID
            embeddings[selected] = features.reshape(-1, features.shape[-1]).to(embeddings.dtype)
        return language_model(inputs_embeds=embeddings).logits
