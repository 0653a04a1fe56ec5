"""Saving and loading through the Auto classes with `trust_remote_code`, as a Hub user would."""

import ast
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import Row, build_batch, model_inputs, subprocess_env, tiny_model
from replicas import FIRST_SPECIAL_ID, INTERNVL3_1B_CONFIG, SPECIAL_TOKENS, replica_shapes
from safetensors.torch import load_file, save_file
from transformers import AutoConfig


ROOT = Path(__file__).resolve().parents[1]
CODE_FILES = ("configuration_coconut_internvl.py", "modeling_coconut_internvl.py", "latent_block_coconut_internvl.py")
AUTO_CLASSES = ("AutoModel", "AutoModelForImageTextToText", "AutoModelForCausalLM")

LOAD_AND_RUN = """
import sys, torch, transformers
from safetensors.torch import load_file, save_file
folder, inputs_path, outputs_path = sys.argv[1:]
torch.set_num_threads(1)  # as the test process: the same kernels give bit-identical logits
inputs = load_file(inputs_path)
logits = {}
for name in AUTO_CLASSES:
    model = getattr(transformers, name).from_pretrained(folder, trust_remote_code=True).eval()
    assert type(model).__name__ == "CoconutInternVLForConditionalGeneration", type(model)
    with torch.no_grad():
        logits[name] = model(**inputs).logits
save_file(logits, outputs_path)
""".replace("AUTO_CLASSES", repr(AUTO_CLASSES))


def test_save_pretrained_writes_auto_map_code_and_safetensors(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "coconut_internvl"
    assert config["auto_map"]["AutoConfig"] == "configuration_coconut_internvl.CoconutInternVLConfig"
    for name in AUTO_CLASSES:
        assert config["auto_map"][name] == "modeling_coconut_internvl.CoconutInternVLForConditionalGeneration"
    for name in CODE_FILES:
        assert (tmp_path / name).read_text() == (ROOT / name).read_text()
    assert not (tmp_path / "processing_coconut_internvl.py").exists()  # the model needs no processor code
    assert (tmp_path / "model.safetensors").exists()
    assert not list(tmp_path.glob("*.bin"))


def test_the_model_and_processor_files_do_not_import_each_other():
    """What both need lives in the configuration file or the shared latent-block file."""
    imported = {}
    for name in ("modeling_coconut_internvl", "processing_coconut_internvl", "latent_block_coconut_internvl"):
        tree = ast.parse((ROOT / f"{name}.py").read_text())
        imports = [node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module]
        imported[name] = {module.lstrip(".") for module in imports}
    assert "processing_coconut_internvl" not in imported["modeling_coconut_internvl"]
    assert "modeling_coconut_internvl" not in imported["processing_coconut_internvl"]
    assert not {module for module in imported["latent_block_coconut_internvl"] if "coconut" in module}


def test_fresh_process_loads_identical_model_offline(tmp_path, hf_home):
    model = tiny_model()
    folder = tmp_path / "coconut"
    model.save_pretrained(folder)
    batch = build_batch([Row(latents=3), Row(latents=1, lead=2)], padding_side="left")
    inputs = {key: value for key, value in model_inputs(batch).items() if key != "labels"}
    save_file(inputs, tmp_path / "inputs.safetensors")
    with torch.no_grad():
        expected = model(**inputs).logits

    subprocess.run(
        [sys.executable, "-c", LOAD_AND_RUN, str(folder), str(tmp_path / "inputs.safetensors"), str(tmp_path / "out")],
        check=True,
        cwd=tmp_path,  # not the repository root: the code must come from the saved folder
        env=subprocess_env(hf_home),
    )
    outputs = load_file(tmp_path / "out")
    for name in AUTO_CLASSES:
        assert torch.equal(outputs[name], expected), name
    # transformers copied the code into the test's own HF_HOME, not the user's.
    assert list(hf_home.rglob("modeling_coconut_internvl.py"))


def test_root_config_is_coconut_internvl3_1b(hf_home):
    """The root config.json loads as Coconut-InternVL3-1B: the sizes of the original's public description, its
    vocabulary plus the three Coconut tokens right after it, its `<IMG_CONTEXT>` id and tokens per tile."""
    config = AutoConfig.from_pretrained(ROOT, trust_remote_code=True)
    assert type(config).__name__ == "CoconutInternVLConfig"
    llm, vit = INTERNVL3_1B_CONFIG["llm_config"], INTERNVL3_1B_CONFIG["vision_config"]
    for name in (
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
    ):
        assert getattr(config.text_config, name) == llm[name], name
    for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        assert getattr(config.vision_config, name) == vit[name], name
    assert config.vision_config.image_size == [vit["image_size"]] * 2
    assert config.vision_config.patch_size == [vit["patch_size"]] * 2
    downsample = INTERNVL3_1B_CONFIG["downsample_ratio"]
    assert config.downsample_ratio == downsample
    assert config.image_seq_length == (vit["image_size"] // vit["patch_size"] * downsample) ** 2
    assert config.image_token_id == FIRST_SPECIAL_ID + SPECIAL_TOKENS.index("<IMG_CONTEXT>")
    assert config.text_config.vocab_size == llm["vocab_size"] + 3
    latent_ids = [config.start_latent_token_id, config.end_latent_token_id, config.latent_token_id]
    assert latent_ids == [llm["vocab_size"], llm["vocab_size"] + 1, llm["vocab_size"] + 2]


def test_root_config_builds_the_full_size_model(hf_home):
    """Shapes only: built on the `meta` device, so no memory is allocated and no weight is initialised. Every weight
    of the original InternVL3-1B (its printed module tree), plus the three new tokens' embedding and output rows."""
    from transformers import AutoModel

    config = AutoConfig.from_pretrained(ROOT, trust_remote_code=True)
    with torch.device("meta"):
        model = AutoModel.from_config(config, trust_remote_code=True, dtype=torch.bfloat16)
    assert model.device.type == "meta"
    assert type(model).__name__ == "CoconutInternVLForConditionalGeneration"
    llm = INTERNVL3_1B_CONFIG["llm_config"]
    rows = (llm["vocab_size"] + 3, llm["hidden_size"])
    assert model.get_input_embeddings().weight.shape == rows and model.lm_head.weight.shape == rows
    original = sum(math.prod(shape) for shape in replica_shapes(INTERNVL3_1B_CONFIG).values())
    assert sum(p.numel() for p in model.parameters()) == original + 2 * 3 * llm["hidden_size"]


def test_legacy_internvl_checkpoint_keys_load_into_the_coconut_class(tmp_path):
    """InternVL `-hf` checkpoints on the Hub use `language_model.model.*`, `language_model.lm_head.*`, ... keys."""
    model = tiny_model()
    legacy = {}
    for name, tensor in model.state_dict().items():
        name = name.replace("model.language_model.", "language_model.model.", 1)
        name = name.replace("lm_head.", "language_model.lm_head.", 1) if name.startswith("lm_head.") else name
        name = name.replace("model.vision_tower.", "vision_tower.", 1)
        name = name.replace("model.multi_modal_projector.", "multi_modal_projector.", 1)
        legacy[name] = tensor.contiguous()
    assert "language_model.lm_head.weight" in legacy
    model.config.save_pretrained(tmp_path)
    save_file(legacy, tmp_path / "model.safetensors", metadata={"format": "pt"})

    loaded = type(model).from_pretrained(tmp_path)
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


IMPORT_WITHOUT_SIDE_EFFECTS = """
import torch, transformers.conversion_mapping as mapping
calls = []
torch.nn.modules.module.register_module_forward_pre_hook(lambda module, args: calls.append(type(module).__name__))
import modeling_coconut_internvl
from configuration_coconut_internvl import CoconutInternVLConfig
assert calls == [], calls  # no forward pass at import
assert mapping.USER_REGISTERED_MAPPINGS == set(), mapping.USER_REGISTERED_MAPPINGS  # transformers' registry untouched
assert CoconutInternVLConfig._auto_class is None  # the model file registers its own class only
"""

IMPORT_UNDER_AN_OLD_TRANSFORMERS = """
import importlib.metadata
version = importlib.metadata.version
importlib.metadata.version = lambda name: "5.22.2" if name == "transformers" else version(name)
import modeling_coconut_internvl
"""


def test_importing_the_model_file_runs_nothing_and_registers_nothing(hf_home):
    env = {**subprocess_env(hf_home), "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-c", IMPORT_WITHOUT_SIDE_EFFECTS], check=True, cwd=ROOT, env=env)


def test_an_older_transformers_is_refused_at_import_by_name(hf_home):
    env = {**subprocess_env(hf_home), "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-c", IMPORT_UNDER_AN_OLD_TRANSFORMERS], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert result.returncode != 0
    assert "transformers>=5.23.0 is required" in result.stderr and "found transformers==5.22.2" in result.stderr


def flip_a_bit(path: Path, name: str, value: float) -> None:
    """Write `value` into the first element of the tensor whose key ends with `name` (the file may use InternVL's
    Hub layout) of a safetensors file, as a flipped bit would."""
    tensors = load_file(path)
    name = next(key for key in tensors if key.endswith(name))
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] = value
    save_file(tensors, path, metadata={"format": "pt"})


def test_a_damaged_weights_file_does_not_load_silently_through_automodel(tmp_path, hf_home, caplog):
    from transformers import AutoModel

    name = "model.language_model.layers.0.mlp.up_proj.weight"  # the model's name for it
    tiny_model().save_pretrained(tmp_path)
    flip_a_bit(
        tmp_path / "model.safetensors", "layers.0.mlp.up_proj.weight", 3.0e5
    )  # an exponent bit flipped: finite, absurd
    AutoModel.from_pretrained(tmp_path, trust_remote_code=True)  # the code the saved folder brings
    assert f"`{name}` in {tmp_path}/model.safetensors holds a weight of magnitude 3e+05" in caplog.text
    flip_a_bit(tmp_path / "model.safetensors", "layers.0.mlp.up_proj.weight", float("nan"))
    with pytest.raises(ValueError, match=rf"{tmp_path}/model.safetensors are damaged: `{name}` .* holds 1 non-finite"):
        AutoModel.from_pretrained(tmp_path, trust_remote_code=True)
