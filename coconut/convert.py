"""From an InternVL checkpoint to a Coconut-InternVL model (`coconut.repository` saves it as a repository folder).

Two source layouts are read:

- transformers-native InternVL (`OpenGVLab/InternVL3-1B-hf` and the other `-hf` repositories: InternVL2.5, InternVL3,
  InternVL3.5 with Qwen2 or Qwen3 text models), loaded with `from_pretrained`;
- OpenGVLab's original remote-code layout (`InternVLChatConfig` with `llm_config` / `vision_config`; weights
  `vision_model.*`, `mlp1.*`, `language_model.model.*`, `language_model.lm_head.*`), whose config and weights are
  mapped here to the native layout, as transformers' `convert_internvl_weights_to_hf.py` maps them, without running
  any of its code.

Either way the weights go through `from_pretrained`, so the LM head is tied to the input embeddings exactly when
transformers ties them for that checkpoint, and the saved config says so.
"""

import dataclasses
import json
import re
import shutil
import tempfile
from pathlib import Path

import torch
from huggingface_hub import hf_hub_download, snapshot_download
from safetensors.torch import load_file
from transformers import (
    AutoImageProcessor,
    AutoTokenizer,
    GenerationConfig,
    GotOcr2ImageProcessorPil,
    InternVLVisionConfig,
    PreTrainedConfig,
)
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.utils import is_torchvision_available, logging

from coconut.hub import is_local_path
from configuration_coconut_internvl import CoconutInternVLConfig
from modeling_coconut_internvl import CoconutInternVLForConditionalGeneration
from processing_coconut_internvl import LATENT_TOKENS, VIDEO_PLACEHOLDER


logger = logging.get_logger(__name__)

# InternVL's image tokens, named as transformers' InternVL processor reads them from the tokenizer. (`<video>` is not
# one: the processor expands it in the text, so it needs no vocabulary entry, and the original tokenizers have none.)
IMAGE_TOKENS = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>"}
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]  # what InternVL's original code uses
# Text models whose original-layout weights (`language_model.model.*`) already have the native names.
NATIVE_NAMED_TEXT_MODELS = ("qwen2", "qwen3", "llama")
# The checkpoints `--base` takes, by `model_type`, with the `architectures` each writes.
NATIVE_MODEL_TYPE, ORIGINAL_MODEL_TYPE = "internvl", "internvl_chat"
SUPPORTED_ARCHITECTURES = {
    NATIVE_MODEL_TYPE: ("InternVLForConditionalGeneration", "InternVLModel"),
    ORIGINAL_MODEL_TYPE: ("InternVLChatModel",),
}
# Fields every config has that describe the saved object, not the architecture: a sub-config keeps none of them (the
# top-level config records the dtype and class of the whole model).
_BASE_CONFIG_FIELDS = {field.name for field in dataclasses.fields(PreTrainedConfig)} | {"torch_dtype"}

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
    return config_dict.get("model_type") == ORIGINAL_MODEL_TYPE or "llm_config" in config_dict


def original_to_native_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename original-layout weights to transformers' InternVL names; split each fused vision `qkv` into q, k, v.

    (transformers' `key_mapping` only renames, and a weight converter registered for the model class would be
    reversed when the converted model is saved, writing the original layout back; hence this explicit mapping.)
    """
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


def _architecture_fields(config_class) -> set[str]:
    """The fields of a config class that describe the architecture (its own, not those every config has)."""
    return {field.name for field in dataclasses.fields(config_class)} - _BASE_CONFIG_FIELDS


def original_to_native_config(config_dict: dict, tokenizer) -> dict:
    """transformers' `InternVLConfig` arguments for an original `InternVLChatConfig` dict.

    The fields are those of transformers' official conversion (`convert_internvl_weights_to_hf.py`):

    - text: the `llm_config`, with `use_cache=True` and, for a Qwen2 text model, `eos_token_id` set to the tokenizer's
      end of turn `<|im_end|>` (151645; the official script sets it for InternVL3 by repository name);
    - vision: the `vision_config`, with `qkv_bias` -> `attention_bias`, `qk_normalization` -> `use_qk_norm`,
      `attention_probs_dropout_prob` -> `attention_dropout` and `projection_dropout`, and absolute position
      embeddings;
    - `image_token_id`: the tokenizer's `<IMG_CONTEXT>` (151667 for InternVL3).

    Sub-config keys that the native config classes do not define are dropped: the mixture-of-experts, flash-attention
    and drop-path settings of the training code (which the official script drops too), and `architectures` /
    `torch_dtype` (the top-level config records the class and dtype of the whole model). Beyond the official script,
    `downsample_ratio`, `select_layer` and the tokens per tile are read from the checkpoint rather than left at
    InternVL3's defaults, and `tie_word_embeddings` is the text model's at both levels (the official script leaves
    the top-level one at its default, `True` in transformers 5).
    """
    llm, vision = dict(config_dict["llm_config"]), dict(config_dict["vision_config"])
    text_model_type = llm.get("model_type")
    if text_model_type not in NATIVE_NAMED_TEXT_MODELS:
        raise ValueError(
            f"`llm_config.model_type`={text_model_type!r} is not supported; the original-layout conversion maps "
            f"text models of type {NATIVE_NAMED_TEXT_MODELS}. Use the `-hf` version of the checkpoint if there is one."
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

    text_class = CONFIG_MAPPING[text_model_type]
    kept = _architecture_fields(text_class) | {"rope_scaling", "rope_theta"}  # the legacy RoPE keys the class reads
    text_config = {key: value for key, value in llm.items() if key in kept}
    text_config.update(model_type=text_model_type, use_cache=True)
    if text_model_type == "qwen2":
        text_config["eos_token_id"] = tokenizer.convert_tokens_to_ids("<|im_end|>")
    tie = text_config.get("tie_word_embeddings", text_class().tie_word_embeddings)
    text_config["tie_word_embeddings"] = tie

    renames = {"qkv_bias": "attention_bias", "qk_normalization": "use_qk_norm"}
    vision = {renames.get(key, key): value for key, value in vision.items()}
    if "attention_probs_dropout_prob" in vision:
        vision["attention_dropout"] = vision["projection_dropout"] = vision.pop("attention_probs_dropout_prob")
    vision["use_absolute_position_embeddings"] = True
    vision_config = {key: value for key, value in vision.items() if key in _architecture_fields(InternVLVisionConfig)}

    downsample_ratio = config_dict.get("downsample_ratio", 0.5)
    return dict(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=tokenizer.context_image_token_id,
        image_seq_length=int((image_size // patch_size) ** 2 * downsample_ratio**2),
        downsample_ratio=downsample_ratio,
        vision_feature_layer=config_dict.get("select_layer", -1),
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


def read_base_config(base: str) -> dict:
    """The `config.json` of `base` (a folder, or a Hub id: only that file is downloaded), checked to be InternVL.

    Raises a `ValueError` for a folder without `config.json`, a Coconut-InternVL checkpoint, and any checkpoint that is
    not InternVL, before anything large is downloaded or allocated.
    """
    if is_local_path(base):
        folder = Path(base).expanduser()
        if not (folder / "config.json").is_file():
            raise ValueError(
                f"`--base` {base}: {'the folder ' + str(folder) if folder.is_dir() else 'the path'} has no "
                "`config.json`. Pass the folder of an InternVL checkpoint (with its config.json, tokenizer and "
                "safetensors weights), or its Hub id, e.g. `OpenGVLab/InternVL3-1B-hf`."
            )
        config_file = folder / "config.json"
    else:
        config_file = Path(hf_hub_download(base, "config.json"))
    config_dict = json.loads(config_file.read_text())
    model_type, architectures = config_dict.get("model_type"), config_dict.get("architectures") or []
    if model_type == CoconutInternVLConfig.model_type:
        raise ValueError(f"`--base` {base} is already a Coconut-InternVL checkpoint; pass the InternVL it came from.")
    expected = SUPPORTED_ARCHITECTURES.get(model_type, ())
    if not expected or (architectures and not set(architectures) & set(expected)):
        raise ValueError(
            f"`--base` {base} is not an InternVL checkpoint: its config.json has `model_type`={model_type!r} and "
            f"`architectures`={architectures}. Pass an InternVL vision-language checkpoint: transformers' InternVL "
            f"(`model_type` {NATIVE_MODEL_TYPE!r}, the `-hf` repositories such as `OpenGVLab/InternVL3-1B-hf`) or "
            f"OpenGVLab's original layout (`model_type` {ORIGINAL_MODEL_TYPE!r}, such as `OpenGVLab/InternVL3-1B`)."
        )
    return config_dict


def check_output_folder(base: str, output: str) -> None:
    """Refuse an `output` that is the local `base` folder or inside it: saving would overwrite the base's files."""
    if not Path(base).expanduser().is_dir():
        return
    base_path, output_path = Path(base).expanduser().resolve(), Path(output).expanduser().resolve()
    if output_path == base_path or base_path in output_path.parents:
        where = "is" if output_path == base_path else "is inside"
        raise ValueError(
            f"`--output` {output} {where} the `--base` folder {base}: saving would overwrite the base checkpoint's "
            f"weights, config and README. Pass a new folder, e.g. `--output outputs/coconut-{base_path.name}`."
        )


def resolve_base(base: str) -> Path:
    """A local folder for `base`: the path itself, or the Hub snapshot of the repository id (downloaded if needed)."""
    if is_local_path(base):
        return Path(base).expanduser()
    return Path(
        snapshot_download(base, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.jinja", "*.model", "README.md"])
    )


def load_base_tokenizer(folder: Path):
    """The base tokenizer, with InternVL's image tokens named as transformers' InternVL processor reads them.

    Original-layout tokenizers have the tokens but do not name them. Naming adds no vocabulary: a token that is
    missing is an error, and nothing else (no `<video>`) is added, so the Coconut tokens come right after the base
    vocabulary. A `-hf` tokenizer that declares `video_token` (as newer conversions write it) holds `<video>` as an
    added token after the vocabulary; it is dropped ([`_without_video_token`]), so that a base model gives the same
    Coconut ids (151674-151676 for InternVL3) whatever its format.
    """
    # `trust_remote_code=False`: AutoTokenizer reads the model config, and an original one names OpenGVLab's code.
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    with tempfile.TemporaryDirectory() as scratch:
        if VIDEO_PLACEHOLDER in tokenizer.get_vocab():
            folder = _without_video_token(folder, tokenizer, Path(scratch))
            tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
        unnamed = {name: token for name, token in IMAGE_TOKENS.items() if getattr(tokenizer, name, None) is None}
        if not unnamed:
            return tokenizer
        missing = [token for token in unnamed.values() if token not in tokenizer.get_vocab()]
        if missing:
            raise ValueError(
                f"The tokenizer in {folder} has no {missing} token(s), which InternVL's image prompts are made of "
                "(`<img>` + `<IMG_CONTEXT>` per image token + `</img>`); is it an InternVL checkpoint?"
            )
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=False, extra_special_tokens=unnamed)


# The files a tokenizer is saved in; those present are copied (and edited) when `<video>` is dropped.
_TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json",
    "merges.txt", "chat_template.jinja", "chat_template.json",
)  # fmt: skip


def _without_video_token(folder: Path, tokenizer, scratch: Path) -> Path:
    """A copy of `folder`'s tokenizer files in `scratch` without the `<video>` token: `<video>` is a placeholder the
    processor expands into frames of image tokens, never an embedded token, and the original-layout tokenizers have
    none. Only a `<video>` that is the last id can be dropped without moving other tokens."""
    video_id = tokenizer.convert_tokens_to_ids(VIDEO_PLACEHOLDER)
    if video_id != len(tokenizer) - 1:
        raise ValueError(
            f"The tokenizer in {folder} holds {VIDEO_PLACEHOLDER} at id {video_id}, inside its vocabulary of "
            f"{len(tokenizer)} tokens, not after it; this layout is not supported (the Coconut ids would differ from "
            "the original checkpoint's)."
        )
    for name in _TOKENIZER_FILES:
        if (folder / name).is_file():
            shutil.copy(folder / name, scratch / name)

    def edit(name: str, change) -> None:
        path = scratch / name
        if path.is_file():
            path.write_text(json.dumps(change(json.loads(path.read_text())), indent=2, ensure_ascii=False))

    def drop(value):
        """`value` without `<video>`, in the shapes tokenizer files hold it: a list, a dict, an added-token entry."""
        if isinstance(value, list):
            return [drop(item) for item in value if item != VIDEO_PLACEHOLDER and not _is_video_entry(item)]
        if isinstance(value, dict):
            return {
                key: drop(item)
                for key, item in value.items()
                if key != "video_token" and item != VIDEO_PLACEHOLDER and not _is_video_entry(item)
            }
        return value

    edit("tokenizer.json", lambda data: {**data, "added_tokens": drop(data["added_tokens"])})
    for name in ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json"):
        edit(name, drop)
    return scratch


def _is_video_entry(item) -> bool:
    return isinstance(item, dict) and item.get("content") == VIDEO_PLACEHOLDER


def _from_pretrained(source: Path | None, config: CoconutInternVLConfig, **kwargs):
    """`CoconutInternVLForConditionalGeneration.from_pretrained`, refusing missing or unexpected weights.

    transformers ties the LM head to the input embeddings when the config asks for it, unless the checkpoint holds
    two different matrices (a config without a top-level `tie_word_embeddings`, as transformers 4.x wrote them,
    reads as tied in transformers 5). The config then records what was loaded, so that resizing the vocabulary and
    saving keep it.
    """
    model, info = CoconutInternVLForConditionalGeneration.from_pretrained(
        source, config=config, output_loading_info=True, **kwargs
    )
    missing, unexpected = sorted(info["missing_keys"]), sorted(info["unexpected_keys"])
    if missing or unexpected or info["mismatched_keys"]:
        raise ValueError(
            f"The weights of {source or 'the original checkpoint'} do not fit the native model: missing {missing[:5]} "
            f"({len(missing)} in all), unexpected {unexpected[:5]} ({len(unexpected)} in all), mismatched "
            f"{sorted(info['mismatched_keys'])[:5]}."
        )
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    if tied != config.tie_word_embeddings:
        logger.info("The checkpoint's LM head and input embeddings differ: they stay separate matrices.")
    model.config.tie_word_embeddings = model.config.text_config.tie_word_embeddings = tied
    return model


def base_coconut_config(config_dict: dict, tokenizer) -> CoconutInternVLConfig:
    """The Coconut-InternVL config of an InternVL `config.json` (either layout), latent ids not yet set."""
    if is_original_layout(config_dict):
        return CoconutInternVLConfig(**original_to_native_config(config_dict, tokenizer))
    native = {
        key: value for key, value in config_dict.items() if key not in ("model_type", "architectures", "auto_map")
    }
    return CoconutInternVLConfig(**native)


def load_base(base: str):
    """The Coconut model (no latent tokens yet), tokenizer, image and video processors of an InternVL checkpoint.

    Returns:
        `(model, tokenizer, image_processor, video_processor)`: `model` is a
        [`CoconutInternVLForConditionalGeneration`] whose weights equal the checkpoint's, with the latent ids unset;
        `video_processor` is `None` without torchvision (InternVL's video processor needs it).
    """
    config_dict = read_base_config(base)
    folder = resolve_base(base)
    tokenizer = load_base_tokenizer(folder)
    config = base_coconut_config(config_dict, tokenizer)
    video_processor = None
    if is_original_layout(config_dict):
        state_dict = original_to_native_state_dict(_load_safetensors(folder))
        dtype = next(iter(state_dict.values())).dtype
        model = _from_pretrained(None, config, state_dict=state_dict, dtype=dtype)
        vision = config.vision_config
        image_processor = GotOcr2ImageProcessorPil(
            size={"height": vision.image_size[0], "width": vision.image_size[1]},
            crop_to_patches=True,
            min_patches=config_dict.get("min_dynamic_patch", 1),
            max_patches=config_dict.get("max_dynamic_patch", 12),
            image_mean=IMAGENET_MEAN,
            image_std=IMAGENET_STD,
        )
        if is_torchvision_available():
            from transformers import InternVLVideoProcessor

            video_processor = InternVLVideoProcessor(
                size=image_processor.size, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD
            )
    else:
        model = _from_pretrained(folder, config, dtype="auto")
        image_processor = AutoImageProcessor.from_pretrained(folder)
        if is_torchvision_available():
            from transformers import AutoVideoProcessor

            video_processor = AutoVideoProcessor.from_pretrained(folder)
    return model.eval(), tokenizer, image_processor, video_processor


def add_latent_tokens(model: CoconutInternVLForConditionalGeneration, tokenizer) -> list[int]:
    """Add `<|start-latent|>`, `<|end-latent|>`, `<|latent|>` to `tokenizer` and `model`; return their ids.

    The tokens take the next three ids after the tokenizer's, `len(tokenizer)` and up. The embedding matrices grow
    to the tokenizer's length (never shrink: Qwen2 checkpoints keep unused padding rows). Each new row of the input
    embeddings, and of an untied LM head, is the mean of the rows of the tokens the tokenizer already had: an input
    the model has seen the like of (a new random row can have any norm), and an output logit equal to the average
    logit, so the converted model generates exactly what the base model did until training gives the tokens their
    meaning. (Coconut's reference code copies one existing token's row instead; the mean does not depend on a
    tokenizer having that token.)
    """
    present = [token for token in LATENT_TOKENS if token in tokenizer.get_vocab()]
    if present:
        raise ValueError(
            f"The tokenizer already has {present}; convert the base InternVL checkpoint, not a Coconut one."
        )
    old_length, old_rows = len(tokenizer), model.get_input_embeddings().weight.shape[0]
    tokenizer.add_special_tokens(
        {"additional_special_tokens": list(LATENT_TOKENS)}, replace_extra_special_tokens=False
    )
    ids = tokenizer.convert_tokens_to_ids(list(LATENT_TOKENS))
    model.resize_token_embeddings(max(old_rows, len(tokenizer)), mean_resizing=False)
    known = min(old_length, old_rows)  # rows of tokens the base tokenizer has
    with torch.no_grad():
        matrices = [model.get_input_embeddings().weight]
        if model.get_output_embeddings().weight is not matrices[0]:
            matrices.append(model.get_output_embeddings().weight)
        for weight in matrices:
            mean = weight[:known].mean(dim=0, keepdim=True)  # (1, H)
            weight[ids] = mean  # (3, H)
            weight[old_rows:] = mean  # every new row: the latent ones, and rows only a resize added
    model.config.start_latent_token_id, model.config.end_latent_token_id, model.config.latent_token_id = ids
    model.config.validate_latent_token_ids()
    return ids


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


def require_full_model(folder: Path, name: str) -> None:
    """Raise a `ValueError` when `folder` holds a LoRA adapter without a model (`train_sft.py --use_peft` wrote it),
    naming the folder that holds the trained model: its `merged/` subfolder."""
    if not (folder / "adapter_config.json").is_file() or (folder / "config.json").is_file():
        return
    merged = folder / "merged"
    if (merged / "config.json").is_file():
        raise ValueError(
            f"{name} holds the LoRA adapter of a `train_sft.py --use_peft` run, not a full model: the trained model is "
            f"in {str(merged)!r}, the merged weights saved beside it. Pass that folder."
        )
    raise ValueError(
        f"{name} holds a LoRA adapter (adapter_config.json) and no merged model (`--merge_adapter false`). Merge it "
        "into its base and save a full model folder to pass here (`peft.PeftModel.from_pretrained(base, folder)"
        ".merge_and_unload().save_pretrained(...)`, with the processor), or train with `--merge_adapter true`."
    )


def require_coconut_checkpoint(model_name_or_path: str, revision: str | None = None) -> None:
    """Raise a `ValueError` unless `model_name_or_path` holds a Coconut-InternVL config.

    Reads only its `config.json` (no remote code runs, no weights are loaded), so a plain InternVL is refused with
    what to do before anything else can fail on it. A name meant as a local path that is no folder is "no such
    folder", not a Hub look-up.
    """
    path = Path(model_name_or_path).expanduser()
    if is_local_path(model_name_or_path) and not path.is_dir():
        raise ValueError(
            f"{model_name_or_path!r}: no such folder{' (it is a file)' if path.exists() else ''}. Pass the folder "
            "convert_to_coconut.py (`--output`) or train_sft.py (`--output_dir`) saved the model in, or a Hub id "
            "`namespace/name`."
        )
    require_full_model(path, repr(model_name_or_path))
    if path.is_dir() and not (path / "config.json").is_file():
        raise ValueError(
            f"{model_name_or_path!r} has no config.json: pass the folder convert_to_coconut.py (`--output`) or "
            "train_sft.py (`--output_dir`) saved the model in."
        )
    config_dict, _ = PreTrainedConfig.get_config_dict(model_name_or_path, revision=revision)
    model_type = config_dict.get("model_type")
    if model_type != CoconutInternVLConfig.model_type:
        raise ValueError(
            f"{model_name_or_path!r} is a {model_type!r} checkpoint (architectures "
            f"{config_dict.get('architectures')}), not Coconut-InternVL: convert it with `convert_to_coconut.py` "
            f"first (`python convert_to_coconut.py --base {model_name_or_path} --output outputs/coconut-base`), "
            "then pass the output folder."
        )


__all__ = [
    "read_base_config",
    "check_output_folder",
    "load_base",
    "load_base_tokenizer",
    "base_coconut_config",
    "require_coconut_checkpoint",
    "require_full_model",
    "add_latent_tokens",
    "build_generation_config",
    "original_to_native_state_dict",
    "original_to_native_config",
    "is_original_layout",
]
