"""convert_to_coconut.py on replicas of the real InternVL3-1B (`tests/replicas.py`, built from its public description):
the original layout and its `-hf` forms, written by transformers, give the same model plus three mean-initialised
Coconut tokens; the config is the official conversion's, and the root config.json is exactly what the converter writes
for the real checkpoint; wrong inputs are refused before anything large is loaded."""

import ast
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import subprocess_env
from PIL import Image
from replicas import (
    IMAGE_CONTEXT_ID,
    INTERNVL3_1B_CONFIG,
    REPLICA_IMAGE_SIZE,
    REPLICA_TOKENS_PER_TILE,
    VOCAB_SIZE,
    reference_logits,
    replica_config,
    write_hf_replica,
    write_original_replica,
    write_replica_tokenizer,
)
from transformers import (
    AutoModel,
    AutoProcessor,
    AutoTokenizer,
    InternVLConfig,
    InternVLForConditionalGeneration,
    InternVLVisionConfig,
    Qwen2Config,
)

import coconut.convert
import coconut.repository
import convert_to_coconut
from coconut.convert import add_latent_tokens, base_coconut_config, load_base_tokenizer, original_to_native_state_dict
from coconut.loading import load_model_and_processor
from coconut.model_card import REPOSITORY_LICENSE, accuracy_results, build_model_card, model_license
from convert_to_coconut import ConvertConfig, main
from modeling_coconut_internvl import CoconutInternVLForConditionalGeneration


ROOT = Path(__file__).resolve().parents[1]
CODE_FILES = (
    "configuration_coconut_internvl.py",
    "latent_block_coconut_internvl.py",
    "modeling_coconut_internvl.py",
    "processing_coconut_internvl.py",
)
COCONUT_IDS = [VOCAB_SIZE, VOCAB_SIZE + 1, VOCAB_SIZE + 2]  # <|start-latent|>, <|end-latent|>, <|latent|>


def make_image(seed: int, width: int = 2 * REPLICA_IMAGE_SIZE) -> Image.Image:
    pixels = torch.randint(0, 256, (REPLICA_IMAGE_SIZE, width, 3), generator=torch.Generator().manual_seed(seed))
    return Image.fromarray(pixels.to(torch.uint8).numpy())


def image_prompt_inputs(processor, seed: int) -> dict:
    prompt = processor.build_prompt("Is Tom a wump?", num_images=1)
    return dict(processor(images=[make_image(seed)], text=prompt, return_tensors="pt"))


def assert_same_model_with_latent_rows(converted, expected_logits: torch.Tensor, inputs: dict) -> float:
    """Converted logits equal `expected_logits` on the old vocabulary; the three new columns, and the three new input
    embedding rows, are the mean of the old ones. Returns the max absolute difference on the old vocabulary."""
    with torch.no_grad():
        ours = converted(**inputs).logits
    assert ours.shape[-1] == VOCAB_SIZE + 3
    difference = (ours[..., :VOCAB_SIZE] - expected_logits).abs().max().item()
    assert difference <= 1e-5, f"max difference {difference}"
    new_columns = ours[..., VOCAB_SIZE:]
    torch.testing.assert_close(
        new_columns, expected_logits.mean(dim=-1, keepdim=True).expand_as(new_columns), rtol=1e-4, atol=1e-5
    )
    embeddings = converted.get_input_embeddings().weight.detach()
    expected_rows = embeddings[:VOCAB_SIZE].mean(dim=0, keepdim=True).expand(3, -1)
    torch.testing.assert_close(embeddings[COCONUT_IDS], expected_rows, rtol=0, atol=1e-7)
    return difference


def assert_coconut_vocabulary(converted, processor) -> None:
    """The three Coconut tokens are the only new vocabulary, right after the base tokenizer's 151674 tokens."""
    tokenizer = processor.tokenizer
    assert tokenizer.convert_tokens_to_ids(["<|start-latent|>", "<|end-latent|>", "<|latent|>"]) == COCONUT_IDS
    assert len(tokenizer) == VOCAB_SIZE + 3 and "<video>" not in tokenizer.get_vocab()
    config = converted.config
    assert [config.start_latent_token_id, config.end_latent_token_id, config.latent_token_id] == COCONUT_IDS
    assert config.text_config.vocab_size == VOCAB_SIZE + 3
    assert config.image_token_id == IMAGE_CONTEXT_ID and config.image_seq_length == REPLICA_TOKENS_PER_TILE


@pytest.fixture(scope="module")
def original_replica(tmp_path_factory):
    folder = tmp_path_factory.mktemp("original") / "InternVL3-1B"
    return folder, write_original_replica(folder)


@pytest.fixture(scope="module")
def converted_original(original_replica, tmp_path_factory):
    """The original-layout replica converted once for the tests that only read the result."""
    output = tmp_path_factory.mktemp("coconut") / "repo"
    main(ConvertConfig(base=str(original_replica[0]), output=str(output), datasets=["prosqa"], num_latent_thoughts=2))
    return output


def test_original_layout_converts_to_the_same_model(original_replica, converted_original, hf_home):
    """Against the original model computed by hand (InternViT, pixel shuffle v2, mlp1, its Qwen2ForCausalLM)."""
    folder, state_dict = original_replica
    converted = AutoModel.from_pretrained(converted_original, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(converted_original, trust_remote_code=True)
    assert type(converted).__name__ == "CoconutInternVLForConditionalGeneration"
    assert_coconut_vocabulary(converted, processor)
    assert converted.lm_head.weight is not converted.get_input_embeddings().weight  # untied, as the original
    assert processor.image_seq_length == REPLICA_TOKENS_PER_TILE and processor.image_processor.max_patches == 12

    inputs = image_prompt_inputs(processor, seed=0)
    assert inputs["pixel_values"].shape == (3, 3, REPLICA_IMAGE_SIZE, REPLICA_IMAGE_SIZE)  # 2 tiles + thumbnail
    expected = reference_logits(state_dict, replica_config(), inputs["input_ids"], inputs["pixel_values"])
    assert_same_model_with_latent_rows(converted, expected, inputs)


HF_LAYOUTS = {
    "no top-level tie key (transformers 4.x)": dict(write_tie_key=False),
    "tie_word_embeddings false": dict(),
    "tied": dict(tie_word_embeddings=True),
    "qwen3 text model (InternVL3.5)": dict(text_model_type="qwen3"),
    # Newer conversions declare `video_token`, which added `<video>` at 151674 and moved the Coconut ids by one.
    "tokenizer declares video_token": dict(video_token=True),
}


@pytest.mark.parametrize("layout", HF_LAYOUTS)
def test_hf_layout_converts_to_the_same_model(layout, tmp_path, hf_home):
    base_model = write_hf_replica(tmp_path / "base", **HF_LAYOUTS[layout])
    if HF_LAYOUTS[layout].get("video_token"):
        assert AutoTokenizer.from_pretrained(tmp_path / "base").convert_tokens_to_ids("<video>") == VOCAB_SIZE
    tied = HF_LAYOUTS[layout].get("tie_word_embeddings", False)
    if layout.startswith("no top-level"):
        # transformers 5 reads the missing key as tied; its own loading keeps the two different matrices apart
        assert "tie_word_embeddings" not in json.loads((tmp_path / "base" / "config.json").read_text())
        loaded = InternVLForConditionalGeneration.from_pretrained(tmp_path / "base")
        assert loaded.config.tie_word_embeddings and loaded.lm_head.weight is not loaded.get_input_embeddings().weight
    main(ConvertConfig(base=str(tmp_path / "base"), output=str(tmp_path / "repo")))
    converted = AutoModel.from_pretrained(tmp_path / "repo", trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(tmp_path / "repo", trust_remote_code=True)
    assert_coconut_vocabulary(converted, processor)
    assert converted.config.text_config.model_type == base_model.config.text_config.model_type
    assert (converted.lm_head.weight is converted.get_input_embeddings().weight) == tied
    assert converted.config.tie_word_embeddings == converted.config.text_config.tie_word_embeddings == tied

    inputs = image_prompt_inputs(processor, seed=1)
    with torch.no_grad():
        expected = base_model(**inputs).logits
    assert_same_model_with_latent_rows(converted, expected, inputs)


# transformers' `convert_internvl_weights_to_hf.py`, `get_internvl_config`, step by step (InternVL3 on Qwen2).
OFFICIAL_UNNECESSARY_CONFIG_KEYS = [ "_name_or_path", "_attn_implementation_autoset", "auto_map", "use_bfloat16", "use_flash_attn", "bias", "laux_allreduce", "moe_coeff_ratio", "moe_intermediate_size", "moe_output_scale", "noisy_gate_policy", "shared_expert_intermediate_size", "use_residual", "use_moe", "use_rts", "use_weighted_residual", "moe_config", "num_experts", "num_routed_experts", "num_shared_experts", "capacity_factor", "eval_capacity_factor", "drop_path_rate"]  # fmt: skip


def official_internvl3_config(original: dict) -> dict:
    llm_config = {k: v for k, v in original["llm_config"].items() if k not in OFFICIAL_UNNECESSARY_CONFIG_KEYS}
    vision_config = {k: v for k, v in original["vision_config"].items() if k not in OFFICIAL_UNNECESSARY_CONFIG_KEYS}
    vision_config["use_absolute_position_embeddings"] = True
    llm_config["use_cache"] = True
    llm_config["eos_token_id"] = 151645
    if "attention_probs_dropout_prob" in vision_config:
        attention_dropout = vision_config.pop("attention_probs_dropout_prob")
        vision_config["attention_dropout"] = attention_dropout
        vision_config["projection_dropout"] = attention_dropout
    vision_config["use_qk_norm"] = vision_config.pop("qk_normalization")
    vision_config["attention_bias"] = vision_config.pop("qkv_bias")
    config = InternVLConfig(
        text_config=Qwen2Config(**llm_config),
        vision_config=InternVLVisionConfig(**vision_config),
        image_token_id=151667,
    )
    return json.loads(config.to_json_string(use_diff=False))


# Where the converter deliberately differs from the official script (docs/conversion.md says why).
DEVIATIONS = {
    "tie_word_embeddings",  # official: left at transformers 5's default (tied), while the weights are not
    "text_config.architectures",  # describe the saved object, not the architecture: the top level records it
    "text_config.dtype",
    "vision_config.architectures",
    "vision_config.dtype",
    "vision_config.dropout",  # not fields of the native vision config (the original's proj_drop rate, 0.0)
    "vision_config.initializer_factor",
}


def differing_fields(ours: dict, official: dict, prefix: str = "") -> list[str]:
    """Fields of `official` that `ours` lacks or holds another value for, as dotted paths."""
    differing = []
    for key, value in official.items():
        path = prefix + key
        if isinstance(value, dict) and isinstance(ours.get(key), dict):
            differing += differing_fields(ours[key], value, path + ".")
        elif ours.get(key, object()) != value:
            differing.append(path)
    return differing


@pytest.mark.parametrize("size", ["full", "replica"])
def test_config_mapping_equals_the_official_conversion(size, tmp_path):
    original = INTERNVL3_1B_CONFIG if size == "full" else replica_config()
    write_replica_tokenizer(tmp_path)
    ours = json.loads(base_coconut_config(original, load_base_tokenizer(tmp_path)).to_json_string(use_diff=False))
    official = official_internvl3_config(original)
    ignored = DEVIATIONS | {"model_type"}  # 'coconut_internvl'
    if size == "replica":
        ignored |= {"image_seq_length"}  # official: 256, right at 448 px only
    assert sorted(set(differing_fields(ours, official)) - ignored) == []
    assert set(differing_fields(ours, official)) >= {"tie_word_embeddings"}
    assert ours["text_config"]["rope_parameters"]["factor"] == 2.0 and ours["text_config"]["eos_token_id"] == 151645
    assert ours["tie_word_embeddings"] is False and ours["text_config"]["use_cache"] is True
    assert not {"moe_config", "use_bfloat16"} & set(ours["text_config"])
    assert not {"initializer_factor", "dropout", "use_flash_attn", "drop_path_rate"} & set(ours["vision_config"])


def converted_config_json(original: dict, dtype: torch.dtype, folder) -> dict:
    """The config.json the converter writes for an original `config.json`, without weights: its config mapping, the
    model built on the meta device in the weights' dtype, the Coconut tokens added, written as `save_pretrained`
    writes it (which also records the class)."""
    write_replica_tokenizer(folder)
    tokenizer = load_base_tokenizer(folder)
    with torch.device("meta"):
        model = CoconutInternVLForConditionalGeneration._from_config(
            base_coconut_config(original, tokenizer), dtype=dtype
        )
    assert add_latent_tokens(model, tokenizer) == COCONUT_IDS
    model.config.architectures = [type(model).__name__]
    model.config.to_json_file(folder / "config.json")
    written = json.loads((folder / "config.json").read_text())
    written.pop("transformers_version")
    return written


def test_converted_config_json_without_weights_is_what_the_conversion_writes(converted_original, tmp_path):
    """The shortcut above, on the replica, gives the config.json of the real conversion (float32 replica weights)."""
    written = json.loads((converted_original / "config.json").read_text())
    written.pop("transformers_version")
    assert converted_config_json(replica_config(), torch.float32, tmp_path) == written


def test_root_config_json_is_what_the_converter_writes_for_internvl3_1b(tmp_path):
    """The full-size InternVL3-1B config (bfloat16 weights) through the converter, field by field."""
    written = converted_config_json(INTERNVL3_1B_CONFIG, torch.bfloat16, tmp_path)
    root = json.loads((ROOT / "config.json").read_text())
    root.pop("transformers_version")
    assert written == root, f"fields that differ: {differing_fields(written, root) + differing_fields(root, written)}"


def test_a_bad_latent_id_in_config_is_refused_when_the_model_or_processor_loads(converted_original, tmp_path, hf_home):
    folder = tmp_path / "repo"
    shutil.copytree(converted_original, folder)
    config = json.loads((folder / "config.json").read_text())
    config["latent_token_id"] = 100  # an ordinary token of the tokenizer
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"`latent_token_id`=100 but the tokenizer's <\|latent\|> is 151676"):
        AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    with pytest.raises(ValueError, match=r"`latent_token_id`=100 but the tokenizer in .*'s <\|latent\|> is 151676"):
        AutoModel.from_pretrained(folder, trust_remote_code=True)  # the model alone reads the tokenizer beside it
    processor = AutoProcessor.from_pretrained(converted_original, trust_remote_code=True)  # the right ids pass
    with pytest.raises(ValueError, match="`start_latent_token_id`=None but"):
        processor.check_latent_token_ids(InternVLConfig())


def write_config(folder, config: dict):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize(
    ("make_base", "message"),
    [
        (
            lambda tmp: write_config(
                tmp / "qwen2", {**Qwen2Config().to_dict(), "architectures": ["Qwen2ForCausalLM"]}
            ),
            r"is not an InternVL checkpoint: its config.json has `model_type`='qwen2' and `architectures`=\['Qwen2",
        ),
        (
            lambda tmp: write_config(tmp / "llava", {"model_type": "internvl", "architectures": ["LlavaForCausalLM"]}),
            r"is not an InternVL checkpoint: .*`architectures`=\['LlavaForCausalLM'\]",
        ),
        (lambda tmp: write_config(tmp / "coconut", {"model_type": "coconut_internvl"}), "already a Coconut-InternVL"),
        (lambda tmp: (tmp / "empty").mkdir() or tmp / "empty", r"the folder .*empty has no `config.json`"),
        (lambda tmp: tmp / "missing", r"missing: the path has no `config.json`"),
    ],
)
def test_wrong_base_is_refused_before_anything_is_loaded(make_base, message, tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the base was loaded before the refusal")

    monkeypatch.setattr(convert_to_coconut, "load_base", refuse)
    monkeypatch.setattr(coconut.convert, "snapshot_download", refuse)
    monkeypatch.setattr(coconut.convert, "hf_hub_download", refuse)
    base = make_base(tmp_path)
    with pytest.raises(ValueError, match=message):
        main(ConvertConfig(base=str(base), output=str(tmp_path / "out"), license="mit"))


def test_output_in_the_base_folder_is_refused(original_replica):
    base = original_replica[0]
    for output in (base, base / "coconut", base / "." / "sub" / ".."):
        with pytest.raises(ValueError, match="the `--base` folder .* saving would overwrite"):
            ConvertConfig(base=str(base), output=str(output))


def test_an_output_path_that_is_a_file_is_refused_before_loading(original_replica, tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the base was loaded before the refusal")

    monkeypatch.setattr(convert_to_coconut, "load_base", refuse)
    (tmp_path / "a_file").write_text("")
    with pytest.raises(ValueError, match="`output`='.*a_file' cannot be written \\(FileExistsError"):
        main(ConvertConfig(base=str(original_replica[0]), output=str(tmp_path / "a_file"), license="mit"))


def test_train_sft_refuses_a_plain_internvl(tmp_path):
    write_hf_replica(tmp_path / "internvl")
    with pytest.raises(ValueError, match="'internvl' checkpoint .* convert it with `convert_to_coconut.py` first"):
        load_model_and_processor(str(tmp_path / "internvl"))


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
            logits = model(input_ids=ids, pixel_values=inputs["pixel_values"], logits_to_keep=1).logits[0, -1]
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

    monkeypatch.setattr(coconut.repository, "HfApi", RecordingHfApi)
    url = coconut.repository.push_folder(converted_original, "me/coconut", private=True)
    assert url == "https://huggingface.co/me/coconut/commit/0"
    assert calls[1] == ("create_repo", "me/coconut", {"private": True, "exist_ok": True, "repo_type": "model"})
    assert calls[2][1]["repo_id"] == "me/coconut" and calls[2][1]["folder_path"] == str(converted_original)


def test_unknown_original_weight_raises():
    with pytest.raises(ValueError, match="`vision_model.encoder.layers.0.attn.rope` of the original InternVL layout"):
        original_to_native_state_dict({"vision_model.encoder.layers.0.attn.rope": torch.zeros(1)})


def test_local_base_pushed_without_hub_id_raises(tmp_path):
    (tmp_path / "base").mkdir()
    with pytest.raises(ValueError, match="pass `--base_model_id OWNER/NAME`"):
        ConvertConfig(base=str(tmp_path / "base"), output=str(tmp_path / "out"), push_to_hub="me/coconut")


def test_model_card_metadata_and_evaluation_table():
    card = str(
        build_model_card(
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
        build_model_card(repo_id="me/x", base_model="b", license="mit", evaluation=[{"accuracy": 1.0}, {"acc": 1.0}])


def test_a_card_without_base_model_and_with_results_is_valid_hub_metadata():
    """A model trained from scratch used to get `base_model: from scratch (...)` and a link to that "repository"."""
    results = accuracy_results("arrow_chase", [("validation", 0.97123), ("test", 0.95)])
    card = build_model_card(
        repo_id="outputs/demo", base_model=None, license="apache-2.0", training="T", eval_results=results
    )
    metadata = yaml.safe_load(str(card).split("---", 2)[1])
    assert "base_model" not in metadata and "huggingface.co/" not in str(card).split("## Citation")[0]
    assert str(card).split("---", 2)[2].lstrip().startswith("# demo\n\nAn InternVL-shaped model trained from scratch")
    (index,) = metadata["model-index"]
    assert index["name"] == "demo"
    assert [(r["dataset"]["split"], r["metrics"][0]["type"], r["metrics"][0]["value"]) for r in index["results"]] == [
        ("validation", "accuracy", 0.9712),
        ("test", "accuracy", 0.95),
    ]
    with pytest.raises(
        ValueError, match="A card without `training` describes a converted model: give its `base_model`"
    ):
        build_model_card(repo_id="me/x", base_model=None, license="mit")


def test_card_licence_is_the_base_models_or_this_repositorys(tmp_path):
    """A trained card used to say `apache-2.0` whatever its base; a model from scratch takes this repository's."""
    readme = yaml.safe_load((ROOT / "README.md").read_text().split("---", 2)[1])
    assert model_license(None) == REPOSITORY_LICENSE == readme["license"] == "mit"
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "README.md").write_text("---\nlicense: apache-2.0\n---\n# base\n")
    assert model_license(str(tmp_path / "base")) == "apache-2.0"
    (tmp_path / "base" / "README.md").write_text("# no metadata\n")
    with pytest.raises(ValueError, match="README.md of .*base states no `license`, .* add it to that README"):
        model_license(str(tmp_path / "base"))


def test_model_card_quick_start_asks_for_no_block_without_thoughts():
    """A model trained without latent blocks (CoT, no-CoT, w/o thought) gets a prompt without one; 0 would add the
    two markers, which such a model never saw."""
    card = str(build_model_card(repo_id="me/cot", base_model="b", license="mit", num_latent_thoughts=None))
    assert "build_prompt(question, num_images=len(images), num_latent_thoughts=None)" in card
    with pytest.raises(
        ValueError, match="`num_latent_thoughts` must be a whole number of thoughts, 0 or more, got -1"
    ):
        build_model_card(repo_id="me/x", base_model="b", license="mit", num_latent_thoughts=-1)
