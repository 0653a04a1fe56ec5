"""train_sft.py: LoRA on the language model only, pass-count agreement across ranks, FSDP2 and DDP on two CPU
processes, the script."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import free_port, subprocess_env
from test_sft_trainer import RECORDS, sft_config, text_model, tokenizer  # noqa: F401 (fixture)
from transformers import AutoModel, AutoProcessor, PreTrainedTokenizerFast
from trl import ModelConfig

import modeling_coconut_internvl
from coconut.collator import CoconutDataCollator
from coconut.curriculum import CurriculumConfig
from coconut.lora import LANGUAGE_MODEL_LORA_TARGETS, coconut_peft_config
from coconut.sft_trainer import CoconutSFTTrainer


ROOT = Path(__file__).resolve().parents[1]


def test_lora_on_language_model_with_trainable_latent_rows(tmp_path, tokenizer):  # noqa: F811
    model = text_model(tokenizer)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    peft_config = coconut_peft_config(ModelConfig(use_peft=True, lora_r=4, lora_alpha=8), model)
    assert peft_config.target_modules == LANGUAGE_MODEL_LORA_TARGETS
    trainer = CoconutSFTTrainer(
        model=model,
        args=sft_config(tmp_path, num_train_epochs=2, learning_rate=5e-2),
        train_dataset=RECORDS,
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    lora = [name for name, _ in trainer.model.named_parameters() if "lora_" in name]
    assert lora and all(".language_model." in name for name in lora)  # none in the vision tower's q/k/v_proj
    trainable = {name for name, p in trainer.model.named_parameters() if p.requires_grad}
    assert trainable == set(lora) | {name for name in trainable if "trainable_tokens" in name}
    trainer.train()

    # Base weights untouched (LoRA's base layers, the frozen embedding matrix, the vision tower, the LM head).
    base = trainer.model.get_base_model()
    for name, tensor in base.state_dict().items():
        plain = name.replace(".base_layer", "").replace(".token_adapter", "")
        if plain in before and "lora_" not in name and "trainable_tokens" not in name:
            assert torch.equal(tensor, before[plain]), name

    merged = trainer.model.merge_and_unload()
    state = merged.state_dict()
    latent_ids = [tokenizer.convert_tokens_to_ids(t) for t in ("<|start-latent|>", "<|end-latent|>", "<|latent|>")]
    embeddings, old_embeddings = (
        state["model.language_model.embed_tokens.weight"],
        before["model.language_model.embed_tokens.weight"],
    )
    other = torch.ones(len(embeddings), dtype=torch.bool)
    other[latent_ids] = False
    assert torch.equal(embeddings[other], old_embeddings[other])
    # The markers' rows train; `<|latent|>`'s own row is never read (its input is the thought) under `coconut`.
    assert not torch.equal(embeddings[latent_ids[0]], old_embeddings[latent_ids[0]])
    assert not torch.equal(embeddings[latent_ids[1]], old_embeddings[latent_ids[1]])
    name = "model.language_model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(state[name], before[name])  # the adapter, merged
    for name in state:
        if "vision" in name or "lm_head" in name:
            assert torch.equal(state[name], before[name]), name


# Per optimizer step, the (sample, stage) rows of process 0 and of process 1: the processes hold different numbers of
# thoughts (stage k gives k thoughts here), so they make different numbers of latent passes unless they agree.
SHARDED_STEPS = [
    ([(0, 2), (1, 1)], [(2, 0), (3, 0)]),
    ([(4, 0), (5, 0)], [(6, 3), (7, 2)]),
    ([(0, 1), (3, 3)], [(5, 2), (6, 0)]),
]


def train_steps(model, text_tokenizer, batches, world_size: int = 1) -> list[float]:
    """AdamW steps on `batches` of schedule rows; per step, the mean token loss over every process's rows."""
    collator = CoconutDataCollator(text_tokenizer, RECORDS, CurriculumConfig(max_latent_stage=3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for rows in batches:
        batch = collator([{"epoch": 0, "sample": sample, "stage": stage} for sample, stage in rows])
        tokens = (batch["labels"][:, 1:] != -100).sum()  # what the loss averages over
        if world_size > 1:
            dist.all_reduce(tokens)
        loss = model(**batch, num_items_in_batch=tokens, sync_latent_passes=world_size > 1).loss  # this rank's share
        (loss * world_size).backward()  # FSDP averages gradients over processes; the sum of the shares is wanted
        optimizer.step()
        optimizer.zero_grad()
        total = loss.detach().clone()
        if world_size > 1:
            dist.all_reduce(total)
        losses.append(total.item())
    return losses


def _fsdp2_steps(rank: int, world_size: int, port: int, tokenizer_dir: str, results):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, fully_shard

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    text_tokenizer = PreTrainedTokenizerFast.from_pretrained(tokenizer_dir)
    model = text_model(text_tokenizer).train()
    mesh = init_device_mesh("cpu", (world_size,))
    for layer in model.model.language_model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    shard = model.lm_head.weight.to_local().shape[0]  # rows of the LM head this process holds
    losses = train_steps(model, text_tokenizer, [rows[rank] for rows in SHARDED_STEPS], world_size)
    results[rank] = (losses, isinstance(model, FSDPModule), shard)
    dist.destroy_process_group()


def test_fsdp2_on_two_cpu_processes_gives_the_single_process_loss(tmp_path, tokenizer):  # noqa: F811
    """A real sharded run (`fully_shard`, gloo) whose processes hold different thought counts
    finishes, and its loss at every step equals one process training on both processes' rows.

    `accelerate`'s FSDP plugin cannot be used on CPU: `AcceleratorState` keeps it only for multi-accelerator runs, and
    with `use_cpu` (MULTI_CPU) drops it without a word (`Trainer.is_fsdp_enabled` stays False), so this test shards
    the model with `fully_shard` directly and steps the optimizer itself.
    """
    collator = CoconutDataCollator(tokenizer, RECORDS, CurriculumConfig(max_latent_stage=3))
    latent_id = tokenizer.convert_tokens_to_ids("<|latent|>")
    for rows in SHARDED_STEPS:
        thoughts = [int((collator([{"epoch": 0, "sample": s, "stage": k} for s, k in part])["input_ids"] == latent_id)
                        .sum(-1).max()) for part in rows]  # fmt: skip
        assert thoughts[0] != thoughts[1]  # the processes need different numbers of latent passes
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    results = mp.Manager().dict()
    context = mp.start_processes(
        _fsdp2_steps, args=(2, free_port(), str(tmp_path / "tokenizer"), results), nprocs=2, join=False
    )
    deadline = time.monotonic() + 240
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("The FSDP2 run did not finish in 240 s: the processes hang in a collective.")

    single = train_steps(text_model(tokenizer).train(), tokenizer, [a + b for a, b in SHARDED_STEPS])
    (losses_0, sharded_0, shard_0), (losses_1, sharded_1, shard_1) = results[0], results[1]
    assert sharded_0 and sharded_1 and shard_0 + shard_1 == text_model(tokenizer).lm_head.weight.shape[0]
    assert losses_0 == losses_1
    difference = max(abs(a - b) for a, b in zip(losses_0, single, strict=True))
    print(f"FSDP2 against one process, losses {losses_0}: max difference {difference:.1e}")
    assert difference < 1e-5, (losses_0, single, difference)


def test_compute_loss_asks_for_synced_passes_under_sharding(tmp_path, tokenizer, monkeypatch):  # noqa: F811
    trainer = CoconutSFTTrainer(
        model=text_model(tokenizer), args=sft_config(tmp_path), train_dataset=RECORDS, processing_class=tokenizer
    )
    assert trainer.sync_latent_passes is False  # plain DDP / one process: nothing to agree on
    calls = []
    monkeypatch.setattr(modeling_coconut_internvl, "agree_on_pass_count", lambda n, device: calls.append(n) or n)
    batch = trainer.data_collator([{"epoch": 0, "sample": 0, "stage": 1}])
    trainer.compute_loss(trainer.model, dict(batch))
    assert calls == []
    trainer.sync_latent_passes = True  # what FSDP / DeepSpeed set
    trainer.compute_loss(trainer.model, dict(batch))
    assert calls == [2]  # the all-reduce is asked for: one pass up to the thought, one from it


def test_two_process_ddp_on_cpu(tmp_path, hf_home):
    """`accelerate launch --multi_gpu --num_processes 2` runs two gloo processes on CPU and trains the demo model."""
    output = tmp_path / "out"
    command = [
        str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
        "--main_process_port", str(free_port()), "train_sft.py", "--dataset", "arrow_chase",
        "--output_dir", str(output), "--synthetic_dir", str(tmp_path / "data"),
        "--synthetic_train_size", "16", "--synthetic_validation_size", "4", "--synthetic_test_size", "8",
        "--synthetic_max_hops", "2", "--num_train_epochs", "2", "--max_latent_stage", "1", "--per_device_train_batch_size", "2",
        "--per_device_eval_batch_size", "4", "--eval_max_new_tokens", "4", "--save_strategy", "no",
        "--bf16", "false", "--use_cpu", "true", "--report_to", "none", "--disable_tqdm", "true",
    ]  # fmt: skip
    result = subprocess.run(
        command, cwd=ROOT, env=subprocess_env(hf_home), capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    # 16 records / (2 per device x 2 processes) = 4 steps per epoch; one process would need 8.
    assert "Trained 8 steps on 2 processes" in result.stderr, result.stderr[-3000:]
    results = json.loads((output / "eval_results.json").read_text())
    assert [row["stage"] for row in results["stages"]] == [0, 1]
    # The final model answered the held-out test split once, on the main process, at the stage it reached.
    assert results["test"]["stage"] == 1 and results["test"]["num_samples"] == 8
    assert len((output / "test" / "predictions_test.jsonl").read_text().splitlines()) == 8
    # The saved folder is a Hub repository: remote code, processor, card.
    model = AutoModel.from_pretrained(output, trust_remote_code=True)
    assert type(model).__name__ == "CoconutInternVLForConditionalGeneration"
    assert model.config.latent_token_id is not None
    assert AutoProcessor.from_pretrained(output, trust_remote_code=True).image_seq_length == 4
    card = (output / "README.md").read_text()
    assert "| stage | thoughts (max) | thoughts (mean) | accuracy | generated tokens |" in card
    assert "| 1, held-out test (8 questions) |" in card
