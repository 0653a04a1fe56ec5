"""From an InternVL checkpoint to a Coconut-InternVL repository folder, and from the folder to the Hub.

Two source layouts are read:

- transformers-native InternVL (`OpenGVLab/InternVL3-1B-hf` and the other `-hf` repositories: InternVL2.5, InternVL3,
  InternVL3.5 with Qwen2 or Qwen3 text models), loaded with `from_pretrained`;
- OpenGVLab's original remote-code layout (`InternVLChatConfig` with `llm_config` / `vision_config`; weights
  `vision_model.*`, `mlp1.*`, `language_model.model.*`, `language_model.lm_head.*`), whose config and weights are
  mapped here to the native layout without running any of its code.
"""

import json
import re
from pathlib import Path

import torch
import yaml
from huggingface_hub import HfApi, snapshot_download
from safetensors.torch import load_file
from transformers import (
    AutoImageProcessor,
    AutoTokenizer,
    GenerationConfig,
    GotOcr2ImageProcessorPil,
    InternVLForConditionalGeneration,
)
from transformers.utils import is_torchvision_available, logging

from configuration_coconut_internvl import CoconutInternVLConfig
from modeling_coconut_internvl import CoconutInternVLForConditionalGeneration
from processing_coconut_internvl import END_LATENT, LATENT, START_LATENT, CoconutInternVLProcessor


logger = logging.get_logger(__name__)

LATENT_TOKENS = (START_LATENT, END_LATENT, LATENT)
# InternVL's image tokens, named as transformers' InternVL processor reads them from the tokenizer.
INTERNVL_TOKENS = {
    "start_image_token": "<img>",
    "end_image_token": "</img>",
    "context_image_token": "<IMG_CONTEXT>",
    "video_token": "<video>",
}
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]  # what InternVL's original code uses
# Text models whose original-layout weights (`language_model.model.*`) already have the native names.
NATIVE_NAMED_TEXT_MODELS = ("qwen2", "qwen3", "llama")

# Original-layout key prefix -> native key prefix (the vision attention's fused `qkv` is split separately).
_ORIGINAL_TO_NATIVE = [
    (r"^vision_model\.embeddings\.class_embedding$", "model.vision_tower.embeddings.cls_token"),
    (r"^vision_model\.embeddings\.position_embedding$", "model.vision_tower.embeddings.position_embeddings"),
    (r"^vision_model\.embeddings\.patch_embedding\.", "model.vision_tower.embeddings.patch_embeddings.projection."),
    (
        r"^vision_model\.encoder\.layers\.(\d+)\.attn\.proj\.",
        r"model.vision_tower.encoder.layer.\1.attention.projection_layer.",
    ),
    (
        r"^vision_model\.encoder\.layers\.(\d+)\.attn\.(q_norm|k_norm)\.",
        r"model.vision_tower.encoder.layer.\1.attention.\2.",
    ),
    (r"^vision_model\.encoder\.layers\.(\d+)\.ls1$", r"model.vision_tower.encoder.layer.\1.lambda_1"),
    (r"^vision_model\.encoder\.layers\.(\d+)\.ls2$", r"model.vision_tower.encoder.layer.\1.lambda_2"),
    (r"^vision_model\.encoder\.layers\.(\d+)\.norm1\.", r"model.vision_tower.encoder.layer.\1.layernorm_before."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.norm2\.", r"model.vision_tower.encoder.layer.\1.layernorm_after."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.mlp\.", r"model.vision_tower.encoder.layer.\1.mlp."),
    (r"^mlp1\.0\.", "model.multi_modal_projector.layer_norm."),  # mlp1 = LayerNorm, Linear, GELU, Linear
    (r"^mlp1\.1\.", "model.multi_modal_projector.linear_1."),
    (r"^mlp1\.3\.", "model.multi_modal_projector.linear_2."),
    (r"^language_model\.model\.", "model.language_model."),
    (r"^language_model\.lm_head\.", "lm_head."),
]
_QKV = re.compile(r"^vision_model\.encoder\.layers\.(\d+)\.attn\.qkv\.(weight|bias)$")


def is_original_layout(config_dict: dict) -> bool:
    """Whether a `config.json` is OpenGVLab's remote-code `InternVLChatConfig` rather than transformers' InternVL."""
    return "llm_config" in config_dict or config_dict.get("model_type") == "internvl_chat"


def original_to_native_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename original-layout weights to transformers' InternVL names; split each fused vision `qkv` into q, k, v."""
    native = {}
    for key, tensor in state_dict.items():
        if match := _QKV.match(key):
            layer, kind = match.groups()
            # `qkv` is Linear(C, 3C): rows are q, then k, then v.  (3C, C) -> 3 x (C, C)
            for name, part in zip(("q_proj", "k_proj", "v_proj"), tensor.chunk(3, dim=0), strict=True):
                native[f"model.vision_tower.encoder.layer.{layer}.attention.{name}.{kind}"] = part.contiguous()
            continue
        for pattern, replacement in _ORIGINAL_TO_NATIVE:
            if re.search(pattern, key):
                native[re.sub(pattern, replacement, key)] = tensor
                break
        else:
            raise ValueError(
                f"Weight `{key}` of the original InternVL layout has no native counterpart; only InternViT vision "
                f"towers with Qwen2/Qwen3/Llama text models ({NATIVE_NAMED_TEXT_MODELS}) are supported."
            )
    return native


def original_to_native_config(config_dict: dict, image_token_id: int) -> dict:
    """transformers' `InternVLConfig` arguments equivalent to an original `InternVLChatConfig` dict."""
    llm, vision = dict(config_dict["llm_config"]), config_dict["vision_config"]
    if llm.get("model_type") not in NATIVE_NAMED_TEXT_MODELS:
        raise ValueError(
            f"`llm_config.model_type`={llm.get('model_type')!r} is not supported; the original-layout conversion "
            f"maps text models of type {NATIVE_NAMED_TEXT_MODELS}. Use the `-hf` version of the checkpoint if there is one."
        )
    if config_dict.get("ps_version", "v2") != "v2":
        raise ValueError(
            f"`ps_version`={config_dict['ps_version']!r}: transformers' InternVL implements the `v2` pixel shuffle only."
        )
    image_size, patch_size = vision["image_size"], vision["patch_size"]
    force_image_size = config_dict.get("force_image_size") or image_size
    if force_image_size != image_size:
        raise ValueError(
            f"`force_image_size`={force_image_size} differs from `vision_config.image_size`={image_size}; the native "
            "model has one image size. Convert a checkpoint whose vision tower runs at its own size."
        )
    downsample_ratio = config_dict.get("downsample_ratio", 0.5)
    tie = llm.get("tie_word_embeddings", False)
    for key in ("architectures", "auto_map", "transformers_version", "_name_or_path", "torch_dtype", "dtype"):
        llm.pop(key, None)
    llm["tie_word_embeddings"] = tie
    return dict(
        text_config=llm,
        vision_config=dict(
            hidden_size=vision["hidden_size"],
            intermediate_size=vision["intermediate_size"],
            num_hidden_layers=vision["num_hidden_layers"],
            num_attention_heads=vision["num_attention_heads"],
            image_size=image_size,
            patch_size=patch_size,
            attention_bias=vision.get("qkv_bias", True),
            use_qk_norm=vision.get("qk_normalization", False),
            norm_type=vision.get("norm_type", "layer_norm"),
            layer_norm_eps=vision.get("layer_norm_eps", 1e-6),
            hidden_act=vision.get("hidden_act", "gelu"),
        ),
        image_token_id=image_token_id,
        image_seq_length=int((image_size // patch_size) ** 2 * downsample_ratio**2),
        downsample_ratio=downsample_ratio,
        vision_feature_layer=config_dict.get("select_layer", -1),
        projector_hidden_act="gelu",
        tie_word_embeddings=tie,
    )


def _load_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (folder / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise ValueError(
            f"No `model.safetensors` (or index) in {folder}; only safetensors weights are read. Convert `.bin` "
            "weights to safetensors first."
        )
    state_dict = {}
    for name in files:
        state_dict.update(load_file(folder / name))
    return state_dict


def resolve_base(base: str) -> Path:
    """A local folder for `base`: the path itself, or the Hub snapshot of the repository id (downloaded if needed)."""
    if Path(base).is_dir():
        return Path(base)
    return Path(
        snapshot_download(base, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.jinja", "*.model", "README.md"])
    )


def base_model_license(base: str) -> str | None:
    """The `license` in the YAML metadata of the base checkpoint's README.md, if it has one."""
    readme = resolve_base(base) / "README.md"
    if not readme.is_file():
        return None
    text = readme.read_text()
    if not text.startswith("---"):
        return None
    metadata = yaml.safe_load(text.split("---", 2)[1]) or {}
    return metadata.get("license")


def load_base(base: str):
    """The Coconut model (no latent tokens yet), tokenizer, image and video processors of an InternVL checkpoint.

    Returns:
        `(model, tokenizer, image_processor, video_processor)`: `model` is a
        [`CoconutInternVLForConditionalGeneration`] whose weights equal the checkpoint's, with the latent ids unset;
        `video_processor` is `None` without torchvision (InternVL's video processor needs it).
    """
    folder = resolve_base(base)
    config_dict = json.loads((folder / "config.json").read_text())
    if config_dict.get("model_type") == CoconutInternVLConfig.model_type:
        raise ValueError(f"`--base` {base} is already a Coconut-InternVL checkpoint; pass the InternVL it came from.")

    if is_original_layout(config_dict):
        tokenizer = AutoTokenizer.from_pretrained(folder, extra_special_tokens=dict(INTERNVL_TOKENS))
        image_token_id = tokenizer.convert_tokens_to_ids(INTERNVL_TOKENS["context_image_token"])
        config = CoconutInternVLConfig(**original_to_native_config(config_dict, image_token_id))
        state_dict = original_to_native_state_dict(_load_safetensors(folder))
        if config.tie_word_embeddings:
            state_dict.pop("lm_head.weight", None)
        dtype = next(iter(state_dict.values())).dtype
        model = CoconutInternVLForConditionalGeneration(config).to(dtype)
        missing, unexpected = model.load_state_dict(state_dict, strict=False)
        missing = [key for key in missing if not (config.tie_word_embeddings and key == "lm_head.weight")]
        if missing or unexpected:
            raise ValueError(
                f"The mapped weights of {base} do not fit the native model: missing {missing[:5]} "
                f"({len(missing)} in all), unexpected {unexpected[:5]} ({len(unexpected)} in all)."
            )
        if config.tie_word_embeddings:
            model.tie_weights()
        vision = config.vision_config
        image_processor = GotOcr2ImageProcessorPil(
            size={"height": vision.image_size[0], "width": vision.image_size[1]},
            crop_to_patches=True,
            min_patches=config_dict.get("min_dynamic_patch", 1),
            max_patches=config_dict.get("max_dynamic_patch", 12),
            image_mean=IMAGENET_MEAN,
            image_std=IMAGENET_STD,
        )
        video_processor = None
        if is_torchvision_available():
            from transformers import InternVLVideoProcessor

            video_processor = InternVLVideoProcessor(
                size=image_processor.size, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD
            )
    else:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        config_dict = {k: v for k, v in config_dict.items() if k not in ("model_type", "architectures", "auto_map")}
        config = CoconutInternVLConfig(**config_dict)
        # transformers' own class reads every native layout (its key renames are registered for `internvl` only).
        base_model = InternVLForConditionalGeneration.from_pretrained(folder, dtype="auto")
        model = CoconutInternVLForConditionalGeneration(config).to(base_model.dtype)
        model.load_state_dict(base_model.state_dict(), strict=True)
        del base_model
        image_processor = AutoImageProcessor.from_pretrained(folder)
        video_processor = None
        if is_torchvision_available():
            from transformers import AutoVideoProcessor

            video_processor = AutoVideoProcessor.from_pretrained(folder)
    return model.eval(), tokenizer, image_processor, video_processor


def add_latent_tokens(model: CoconutInternVLForConditionalGeneration, tokenizer) -> list[int]:
    """Add `<|start-latent|>`, `<|end-latent|>`, `<|latent|>` to `tokenizer` and `model`; return their ids.

    The embedding matrices grow to the tokenizer's length (never shrink: Qwen2 checkpoints keep unused padding rows).
    Each new row of the input embeddings, and of an untied LM head, is the mean of the rows of the tokens the
    tokenizer already had: an input the model has seen the like of (a new random row can have any norm), and an
    output logit equal to the average logit, so the converted model generates exactly what the base model did
    until training gives the tokens their meaning. (Coconut's reference code copies one existing token's row
    instead; the mean does not depend on a tokenizer having that token.)
    """
    present = [token for token in LATENT_TOKENS if token in tokenizer.get_vocab()]
    if present:
        raise ValueError(
            f"The tokenizer already has {present}; convert the base InternVL checkpoint, not a Coconut one."
        )
    old_length = len(tokenizer)
    tokenizer.add_special_tokens(
        {"additional_special_tokens": list(LATENT_TOKENS)}, replace_extra_special_tokens=False
    )
    ids = tokenizer.convert_tokens_to_ids(list(LATENT_TOKENS))
    rows = model.get_input_embeddings().weight.shape[0]
    model.resize_token_embeddings(max(rows, len(tokenizer)), mean_resizing=False)
    with torch.no_grad():
        matrices = [model.get_input_embeddings().weight]
        if model.get_output_embeddings().weight is not matrices[0]:
            matrices.append(model.get_output_embeddings().weight)
        for weight in matrices:
            weight[ids] = weight[:old_length].mean(dim=0, keepdim=True)  # (3, H) <- (1, H)
    start, end, latent = ids
    model.config.start_latent_token_id, model.config.end_latent_token_id, model.config.latent_token_id = ids
    model.config.validate_latent_token_ids()
    return [start, end, latent]


def build_generation_config(model, tokenizer) -> GenerationConfig:
    """Greedy decoding that stops at `<|im_end|>` (InternVL's end of turn), pads with the tokenizer's pad token and
    never generates the latent block's tokens (a generated `<|latent|>` would have no thought to take)."""
    config = model.config
    block_ids = [config.start_latent_token_id, config.end_latent_token_id, config.latent_token_id]
    return GenerationConfig(
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=getattr(config.text_config, "bos_token_id", None),
        do_sample=False,
        suppress_tokens=sorted(token_id for token_id in block_ids if token_id is not None) or None,
    )


def save_repository(model, processor: CoconutInternVLProcessor, output: str | Path, model_card: str) -> Path:
    """Write weights (safetensors), config with `auto_map`, the three code files, tokenizer, processor, generation
    config and `README.md` into `output`."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output)  # also copies configuration_/modeling_coconut_internvl.py (registered classes)
    processor.save_pretrained(output)  # also copies processing_coconut_internvl.py
    (output / "README.md").write_text(model_card)
    code = ["configuration_coconut_internvl.py", "modeling_coconut_internvl.py", "processing_coconut_internvl.py"]
    missing = [name for name in code if not (output / name).is_file()]
    if missing:  # save_pretrained copies the file a registered class is defined in; say so if that ever changes
        raise ValueError(f"{missing} were not written to {output}; the repository would not load with remote code.")
    return output


def push_folder(folder: str | Path, repo_id: str, private: bool = False, token: str | None = None) -> str:
    """Create `repo_id` on the Hub if needed and upload `folder` (weights, code, processor, card) in one commit.

    Returns:
        `str`: the URL of the commit.
    """
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    commit = api.upload_folder(
        repo_id=repo_id, folder_path=str(folder), repo_type="model", commit_message="Upload Coconut-InternVL"
    )
    return str(getattr(commit, "commit_url", commit))


__all__ = [
    "load_base",
    "add_latent_tokens",
    "build_generation_config",
    "save_repository",
    "push_folder",
    "base_model_license",
    "original_to_native_state_dict",
    "original_to_native_config",
    "is_original_layout",
]
