"""convert_to_coconut.py: native and original InternVL layouts -> a complete, loadable, pushable Coconut repository."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import IMAGE_SIZE, TOKENS_PER_TILE, random_model, subprocess_env, tiny_config
from PIL import Image
from safetensors.torch import save_file
from transformers import (
    AutoModel,
    AutoProcessor,
    GotOcr2ImageProcessorPil,
    InternVLConfig,
    InternVLForConditionalGeneration,
)

import coconut.convert
from coconut.convert import original_to_native_state_dict
from coconut.model_card import ModelCardData, render_model_card
from coconut.tokenizer import train_tokenizer
from convert_to_coconut import ConvertConfig, main


CORPUS = ["Every wump is a zhorpus. Is Tom a wump or a yumpus? Tom is a wump. ### Yes No"] * 4
CODE_FILES = ("configuration_coconut_internvl.py", "modeling_coconut_internvl.py", "processing_coconut_internvl.py")
INTERNVL_TOKEN_NAMES = ("start_image_token", "end_image_token", "context_image_token", "video_token")


def base_tokenizer():
    return train_tokenizer(CORPUS, vocab_size=300, with_latent_tokens=False)


def native_base_model(
    tokenizer, tie_word_embeddings=False, seed=0, text_model_type="qwen2"
) -> InternVLForConditionalGeneration:
    """A tiny transformers-native InternVL (no Coconut) over `tokenizer`'s ids, with a biased vision qkv.

    `text_model_type="qwen3"` gives the InternVL3.5 kind of text model (Qwen3, with q/k norms).
    """
    coconut = tiny_config()
    text_config = coconut.text_config.to_dict()
    text_config.update(
        model_type=text_model_type,
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=tie_word_embeddings,
    )
    vision_config = coconut.vision_config.to_dict()
    vision_config.update(attention_bias=True)
    config = InternVLConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"),
        image_seq_length=TOKENS_PER_TILE,
        tie_word_embeddings=tie_word_embeddings,
    )
    return random_model(InternVLForConditionalGeneration, config, seed)


def native_to_original_state_dict(model) -> dict[str, torch.Tensor]:
    """The same weights under OpenGVLab's original names, written out by hand (the converter maps them back)."""
    original = {}
    for key, tensor in model.state_dict().items():
        if key.startswith("model.vision_tower.encoder.layer."):
            layer, rest = key.removeprefix("model.vision_tower.encoder.layer.").split(".", 1)
            prefix = f"vision_model.encoder.layers.{layer}."
            if rest.startswith("attention.q_proj."):
                kind = rest.rsplit(".", 1)[1]
                parts = [
                    model.state_dict()[f"model.vision_tower.encoder.layer.{layer}.attention.{p}_proj.{kind}"]
                    for p in "qkv"
                ]
                original[prefix + f"attn.qkv.{kind}"] = torch.cat(parts).clone()
            elif rest.startswith(("attention.k_proj.", "attention.v_proj.")):
                continue
            else:
                renamed = {
                    "attention.projection_layer.": "attn.proj.",
                    "lambda_1": "ls1",
                    "lambda_2": "ls2",
                    "layernorm_before.": "norm1.",
                    "layernorm_after.": "norm2.",
                    "mlp.": "mlp.",
                }
                old = next(o for n, o in renamed.items() if rest.startswith(n))
                new = next(n for n in renamed if rest.startswith(n))
                original[prefix + old + rest.removeprefix(new)] = tensor.clone()
            continue
        renames = {
            "model.vision_tower.embeddings.cls_token": "vision_model.embeddings.class_embedding",
            "model.vision_tower.embeddings.position_embeddings": "vision_model.embeddings.position_embedding",
            "model.vision_tower.embeddings.patch_embeddings.projection.": "vision_model.embeddings.patch_embedding.",
            "model.multi_modal_projector.layer_norm.": "mlp1.0.",
            "model.multi_modal_projector.linear_1.": "mlp1.1.",
            "model.multi_modal_projector.linear_2.": "mlp1.3.",
            "model.language_model.": "language_model.model.",
            "lm_head.": "language_model.lm_head.",
        }
        new = next(n for n in renames if key.startswith(n))
        original[renames[new] + key.removeprefix(new)] = tensor.clone()
    return original


def write_original_checkpoint(folder: Path, model, tokenizer) -> None:
    """OpenGVLab's remote-code layout: `InternVLChatConfig` with `llm_config`/`vision_config`, original key names."""
    folder.mkdir(parents=True)
    save_file(native_to_original_state_dict(model), folder / "model.safetensors")
    text, vision = model.config.text_config.to_dict(), model.config.vision_config
    text["architectures"] = ["Qwen2ForCausalLM"]
    config = {
        "architectures": ["InternVLChatModel"],
        "auto_map": {"AutoConfig": "configuration_internvl_chat.InternVLChatConfig"},
        "model_type": "internvl_chat",
        "downsample_ratio": 0.5,
        "select_layer": -1,
        "ps_version": "v2",
        "force_image_size": IMAGE_SIZE,
        "template": "internvl2_5",
        "min_dynamic_patch": 1,
        "max_dynamic_patch": 4,
        "use_thumbnail": True,
        "llm_config": text,
        "vision_config": {
            "architectures": ["InternVisionModel"],
            "model_type": "intern_vit_6b",
            "hidden_size": vision.hidden_size,
            "intermediate_size": vision.intermediate_size,
            "num_attention_heads": vision.num_attention_heads,
            "num_hidden_layers": vision.num_hidden_layers,
            "image_size": IMAGE_SIZE,
            "patch_size": 14,
            "qkv_bias": True,
            "qk_normalization": False,
            "norm_type": "layer_norm",
            "layer_norm_eps": vision.layer_norm_eps,
            "hidden_act": "gelu",
        },
    }
    (folder / "config.json").write_text(json.dumps(config))
    tokenizer.save_pretrained(folder)
    # The original tokenizers do not name InternVL's image tokens; the converter must.
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    for name in INTERNVL_TOKEN_NAMES:
        tokenizer_config.pop(name)
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))


def write_native_checkpoint(folder: Path, model, tokenizer) -> None:
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    GotOcr2ImageProcessorPil(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, crop_to_patches=True, max_patches=4
    ).save_pretrained(folder)


def make_image(seed: int, width: int = 2 * IMAGE_SIZE) -> Image.Image:
    pixels = torch.randint(0, 256, (IMAGE_SIZE, width, 3), generator=torch.Generator().manual_seed(seed))
    return Image.fromarray(pixels.to(torch.uint8).numpy())


@pytest.fixture(scope="module")
def base():
    tokenizer = base_tokenizer()
    return tokenizer, native_base_model(tokenizer)


@pytest.fixture(scope="module")
def converted_original(base, tmp_path_factory):
    """The original-layout checkpoint converted once for the tests that only read the result."""
    tokenizer, model = base
    source, output = tmp_path_factory.mktemp("original") / "base", tmp_path_factory.mktemp("coconut") / "repo"
    write_original_checkpoint(source, model, tokenizer)
    (source / "README.md").write_text("---\nlicense: mit\npipeline_tag: image-text-to-text\n---\n# A tiny InternVL\n")
    main(ConvertConfig(base=str(source), output=str(output), datasets=["prosqa"], num_latent_thoughts=2))
    return output


def assert_same_model_with_latent_rows(converted, base_model, inputs, old_vocab: int):
    """Converted logits equal the base's on the old vocabulary; each new column is the mean of the old ones."""
    with torch.no_grad():
        ours = converted(**inputs).logits
        theirs = base_model(**inputs).logits
    difference = (ours[..., :old_vocab] - theirs).abs().max().item()
    assert difference < 1e-5, f"max difference {difference}"
    new_columns = ours[..., old_vocab:]
    assert new_columns.shape[-1] == 3
    expected = theirs.mean(dim=-1, keepdim=True).expand_as(new_columns)
    torch.testing.assert_close(new_columns, expected, rtol=1e-4, atol=1e-5)


def test_original_layout_converts_to_the_same_model(base, converted_original, hf_home):
    tokenizer, base_model = base
    converted = AutoModel.from_pretrained(converted_original, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(converted_original, trust_remote_code=True)
    assert type(converted).__name__ == "CoconutInternVLForConditionalGeneration"
    old_vocab = len(tokenizer)
    ids = processor.tokenizer.convert_tokens_to_ids(["<|start-latent|>", "<|end-latent|>", "<|latent|>"])
    assert ids == [old_vocab, old_vocab + 1, old_vocab + 2]
    config = converted.config
    assert [config.start_latent_token_id, config.end_latent_token_id, config.latent_token_id] == ids
    assert config.text_config.vocab_size == old_vocab + 3
    assert config.image_token_id == tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    assert config.image_seq_length == TOKENS_PER_TILE
    assert processor.image_seq_length == TOKENS_PER_TILE and processor.image_processor.max_patches == 4

    prompt = processor.build_prompt("Is Tom a wump?", num_images=1)
    inputs = processor(images=[make_image(0)], text=prompt, return_tensors="pt")
    assert inputs["pixel_values"].shape == (3, 3, IMAGE_SIZE, IMAGE_SIZE)  # 2 tiles + thumbnail
    assert_same_model_with_latent_rows(converted, base_model, dict(inputs), old_vocab)


@pytest.mark.parametrize("tie_word_embeddings, text_model_type", [(False, "qwen2"), (True, "qwen2"), (False, "qwen3")])
def test_native_layout_converts_to_the_same_model(tmp_path, hf_home, tie_word_embeddings, text_model_type):
    tokenizer = base_tokenizer()
    base_model = native_base_model(tokenizer, tie_word_embeddings, seed=1, text_model_type=text_model_type)
    assert base_model.config.text_config.model_type == text_model_type
    write_native_checkpoint(tmp_path / "base", base_model, tokenizer)
    main(ConvertConfig(base=str(tmp_path / "base"), output=str(tmp_path / "repo"), license="apache-2.0"))
    converted = AutoModel.from_pretrained(tmp_path / "repo", trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(tmp_path / "repo", trust_remote_code=True)
    assert (converted.lm_head.weight is converted.get_input_embeddings().weight) == tie_word_embeddings
    inputs = processor(images=[make_image(1)], text="<image>\nIs Tom a wump?", return_tensors="pt")
    assert_same_model_with_latent_rows(converted, base_model, dict(inputs), len(tokenizer))


def test_repository_folder_is_complete(converted_original):
    names = {path.name for path in converted_original.iterdir()}
    expected = {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "processor_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "README.md",
        *CODE_FILES,
    }
    assert expected <= names, f"missing {expected - names}"
    assert not [name for name in names if name.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt"))]
    config = json.loads((converted_original / "config.json").read_text())
    assert config["model_type"] == "coconut_internvl"
    assert config["auto_map"]["AutoModel"] == "modeling_coconut_internvl.CoconutInternVLForConditionalGeneration"
    processor_config = json.loads((converted_original / "processor_config.json").read_text())
    assert processor_config["auto_map"]["AutoProcessor"] == "processing_coconut_internvl.CoconutInternVLProcessor"
    generation = json.loads((converted_original / "generation_config.json").read_text())
    tokenizer_config = json.loads((converted_original / "tokenizer_config.json").read_text())
    assert generation["eos_token_id"] != generation["pad_token_id"]
    assert tokenizer_config["eos_token"] == "<|im_end|>"
    card = (converted_original / "README.md").read_text()
    metadata = yaml.safe_load(card.split("---", 2)[1])
    assert metadata["license"] == "mit"  # read from the base checkpoint's README.md
    assert metadata["library_name"] == "transformers" and metadata["pipeline_tag"] == "image-text-to-text"
    assert "2412.06769" in card and "2504.10479" in card


def test_card_quick_start_runs_offline_without_network(converted_original, tmp_path):
    """The model card's quick start, as written, in a fresh process: an empty HF_HOME, HF_HUB_OFFLINE=1, a working
    directory without this repository, and every socket connection refused. Loading imports the folder's three code
    files, so this is also the test that importing them opens no connection."""
    card = (converted_original / "README.md").read_text()
    quick_start = card.split("```python\n", 1)[1].split("\n```", 1)[0]
    assert f'repo = "{converted_original}"' in quick_start
    refuse_network = (
        "import socket\n"
        "def refuse(*args, **kwargs):\n"
        "    raise RuntimeError('network connection attempted')\n"
        "socket.socket.connect = socket.socket.connect_ex = socket.create_connection = refuse\n"
    )
    report = (
        "\nimport json, sys\n"
        "modules = sorted({name.rsplit('.', 1)[1] for name in sys.modules if name.startswith('transformers_modules.')"
        " and 'coconut' in name})\n"
        "print(json.dumps({'modules': modules, 'new': output_ids[0, inputs['input_ids'].shape[1]:].tolist()}))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", refuse_network + quick_start + report],
        cwd=tmp_path,
        env=subprocess_env(tmp_path / "empty_hf_home"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "answer:" in result.stdout
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["modules"] == [name.removesuffix(".py") for name in CODE_FILES]  # the folder's copies were used
    assert len(report["new"]) >= 1

    # The same greedy tokens as the model in this process, computed step by step without `generate`.
    model = AutoModel.from_pretrained(converted_original, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(converted_original, trust_remote_code=True)
    prompt = processor.build_prompt("What is shown in the image?", num_images=1, num_latent_thoughts=2)
    inputs = processor(images=[Image.new("RGB", (448, 448), "white")], text=prompt, return_tensors="pt")
    assert (inputs["input_ids"] == model.config.latent_token_id).sum() == 2
    ids, expected = inputs["input_ids"], []
    with torch.no_grad():
        for _ in range(len(report["new"])):
            logits = model(input_ids=ids, pixel_values=inputs["pixel_values"]).logits[0, -1]
            expected.append(int(logits.argmax()))
            ids = torch.cat([ids, torch.tensor([[expected[-1]]])], dim=1)
    assert report["new"] == expected


def test_code_files_use_no_eval_exec_pickle_or_network_modules(converted_original):
    for name in CODE_FILES:
        source = (converted_original / name).read_text()
        tree = ast.parse(source)
        called = {
            node.func.id for node in ast.walk(tree) if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
        }
        imported = {
            alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names
        }
        imported |= {
            node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module
        }
        assert not called & {"eval", "exec", "compile", "__import__"}, name
        assert not imported & {"pickle", "dill", "marshal", "socket", "urllib", "requests", "subprocess"}, name
        assert "torch.load" not in source and "pickle" not in source, name


def test_push_folder_creates_repo_and_uploads_the_folder(converted_original, monkeypatch):
    calls = []

    class RecordingHfApi:
        def __init__(self, token=None):
            calls.append(("init", token))

        def create_repo(self, repo_id, **kwargs):
            calls.append(("create_repo", repo_id, kwargs))

        def upload_folder(self, **kwargs):
            calls.append(("upload_folder", kwargs))
            return "https://huggingface.co/me/coconut/commit/0"

    monkeypatch.setattr(coconut.convert, "HfApi", RecordingHfApi)
    url = coconut.convert.push_folder(converted_original, "me/coconut", private=True)
    assert url == "https://huggingface.co/me/coconut/commit/0"
    assert calls[1] == ("create_repo", "me/coconut", {"private": True, "exist_ok": True, "repo_type": "model"})
    assert calls[2][1]["repo_id"] == "me/coconut" and calls[2][1]["folder_path"] == str(converted_original)


def test_unknown_original_weight_raises():
    with pytest.raises(ValueError, match="`vision_model.encoder.layers.0.attn.rope` of the original InternVL layout"):
        original_to_native_state_dict({"vision_model.encoder.layers.0.attn.rope": torch.zeros(1)})


def test_local_base_pushed_without_hub_id_raises(tmp_path):
    with pytest.raises(ValueError, match="pass `--base_model_id OWNER/NAME`"):
        ConvertConfig(base=str(tmp_path), output=str(tmp_path / "out"), push_to_hub="me/coconut")


def test_model_card_metadata_and_evaluation_table():
    card = render_model_card(
        ModelCardData(
            repo_id="me/coconut-internvl3-1b",
            base_model="OpenGVLab/InternVL3-1B-hf",
            license="mit",
            datasets=["prosqa"],
            num_latent_thoughts=6,
            evaluation=[{"dataset": "ProsQA test", "thoughts": 6, "accuracy": 0.9712}],
        )
    )
    metadata = yaml.safe_load(card.split("---", 2)[1])
    assert metadata == {
        "library_name": "transformers",
        "pipeline_tag": "image-text-to-text",
        "base_model": "OpenGVLab/InternVL3-1B-hf",
        "license": "mit",
        "tags": ["coconut", "latent-reasoning", "internvl"],
        "datasets": ["prosqa"],
    }
    assert "| dataset | thoughts | accuracy |\n|---|---|---|\n| ProsQA test | 6 | 0.9712 |" in card
    assert 'repo = "me/coconut-internvl3-1b"' in card and "num_latent_thoughts=6" in card
    for section in ("## Quick start", "## Training", "## Evaluation", "## Limitations", "## Citation"):
        assert section in card
    with pytest.raises(ValueError, match="`evaluation` rows have different columns"):
        render_model_card(
            ModelCardData(repo_id="me/x", base_model="b", license="mit", evaluation=[{"accuracy": 1.0}, {"acc": 1.0}])
        )
