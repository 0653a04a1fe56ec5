"""Step supervision: the decoder's batch, its loss against a step-by-step reference, training, saving, resuming."""

import pytest
import torch
from test_sft_trainer import RECORDS, StopAt, sft_config, text_model
from test_sft_trainer import tokenizer as tokenizer  # noqa: F401 (the module's tokenizer fixture)
from transformers import AutoModelForCausalLM

from coconut.curriculum import CurriculumConfig, build_training_example
from coconut.fused_lm_head import token_log_probs
from coconut.sft_trainer import DECODER_STATE_NAME, CoconutSFTTrainer, prepare_model_for_curriculum
from coconut.step_supervision import THOUGHT_DECODER_DIR, step_supervision_loss


def make_trainer(tmp_path, tokenizer, **overrides) -> CoconutSFTTrainer:
    settings = dict(step_supervision=True, max_latent_stage=3, num_train_epochs=3, start_stage=1)
    settings.update(overrides)
    model, args = text_model(tokenizer), sft_config(tmp_path, **settings)
    prepare_model_for_curriculum(model, args, RECORDS)
    return CoconutSFTTrainer(model=model, args=args, train_dataset=RECORDS, processing_class=tokenizer)


# Three steps a record; stage 4 gives a fourth thought that replaces no step, the final stage one thought per step.
@pytest.mark.parametrize(
    "stage, c_thought, replaced, thoughts", [(0, 1, 0, 0), (1, 1, 1, 1), (2, 2, 2, 4), (4, 1, 3, 4), (5, 2, 3, 6)]
)
def test_replaced_steps_follow_the_layout(tokenizer, stage, c_thought, replaced, thoughts):
    config = CurriculumConfig(method="coconut", c_thought=c_thought, max_latent_stage=4)
    example = build_training_example(RECORDS[0], stage, tokenizer, config)
    assert example["replaced_steps"] == RECORDS[0]["steps"][:replaced]
    assert example["num_latents"] == thoughts
    no_thought = build_training_example(RECORDS[0], stage, tokenizer, CurriculumConfig(method="no_thought"))
    assert no_thought["replaced_steps"] == []


def test_collator_points_each_step_at_the_column_before_its_thoughts(tmp_path, tokenizer):
    trainer = make_trainer(tmp_path, tokenizer, c_thought=2)
    batch = trainer.data_collator([{"epoch": 0, "sample": i, "stage": 2} for i in range(3)])
    input_ids, width = batch["input_ids"], batch["input_ids"].shape[1]
    latent_id = trainer.model.config.latent_token_id
    assert batch["step_thought_index"].shape == (3 * 2, 2)  # 3 rows x 2 replaced steps, 2 thoughts each
    for step, flat_columns in enumerate(batch["step_thought_index"].tolist()):
        row, number = divmod(step, 2)
        latents = (input_ids[row] == latent_id).nonzero().flatten().tolist()
        assert [row * width + column - 1 for column in latents[2 * number : 2 * number + 2]] == flat_columns
        length = int(batch["step_attention_mask"][step].sum())
        text = tokenizer.decode(batch["step_input_ids"][step, :length])
        assert text == RECORDS[row]["steps"][number] + "\n"
    assert "step_input_ids" not in make_trainer(tmp_path, tokenizer, step_supervision=False).data_collator(
        [{"epoch": 0, "sample": 0, "stage": 2}]
    )


def test_step_loss_equals_a_step_by_step_reference(tmp_path, tokenizer):
    trainer = make_trainer(tmp_path, tokenizer, c_thought=2)
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in trainer.thought_decoder.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))  # a decoder that differs from the model
    batch = trainer.data_collator([{"epoch": 0, "sample": i, "stage": 2} for i in range(3)])
    model = trainer.model
    hidden = torch.randn(*batch["input_ids"].shape, model.config.text_config.hidden_size)
    keys = ("step_thought_index", "step_input_ids", "step_attention_mask")
    losses = {
        normalization: step_supervision_loss(
            trainer.thought_decoder, model.get_input_embeddings(), hidden, *(batch[k] for k in keys), normalization
        )
        for normalization in ("step", "token")
    }
    # Reference: each step alone, its thoughts then its tokens, no padding, through the decoder's own forward.
    sums, tokens = [], 0
    for index, ids, mask in zip(*(batch[k] for k in keys), strict=True):
        ids = ids[mask.bool()]
        thoughts = hidden.reshape(-1, hidden.shape[-1])[index]  # (c, H)
        embeds = torch.cat([thoughts, model.get_input_embeddings()(ids)])[None]
        logits = trainer.thought_decoder(inputs_embeds=embeds).logits[0, 1:-1]  # from the last thought on
        sums.append(torch.nn.functional.cross_entropy(logits, ids, reduction="sum"))
        tokens += len(ids)
    torch.testing.assert_close(losses["step"], torch.stack(sums).mean(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(losses["token"], torch.stack(sums).sum() / tokens, rtol=1e-5, atol=1e-5)


def test_tiled_log_probs_equal_the_full_softmax_in_value_and_gradient():
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50)
    hidden = torch.randn(23, 16, requires_grad=True)
    labels = torch.randint(0, 50, (23,))
    log_probs, entropy, is_top1 = token_log_probs(hidden, head, labels, tile_elements=50 * 4)  # 4 tokens a tile
    full = torch.log_softmax(head(hidden), dim=-1)
    torch.testing.assert_close(log_probs, full.gather(1, labels[:, None]).squeeze(1))
    torch.testing.assert_close(entropy, -(full.exp() * full).sum(-1))
    assert torch.equal(is_top1, full.argmax(-1) == labels)
    (grad,) = torch.autograd.grad(log_probs.sum(), hidden)
    (expected,) = torch.autograd.grad(full.gather(1, labels[:, None]).sum(), hidden)
    torch.testing.assert_close(grad, expected)


@pytest.mark.parametrize("method", ["coconut", "pause_as_thought"])
def test_training_adds_the_step_loss_and_trains_model_and_decoder(tmp_path, tokenizer, method):
    trainer = make_trainer(tmp_path, tokenizer, method=method, step_loss_weight=0.5)
    model, decoder = trainer.model, trainer.thought_decoder
    batch = trainer.data_collator([{"epoch": 0, "sample": i, "stage": 2} for i in range(4)])
    keys = ("step_thought_index", "step_input_ids", "step_attention_mask")
    with torch.no_grad():
        plain = trainer.compute_loss(model, {k: v for k, v in batch.items() if k not in keys})
        total = trainer.compute_loss(model, dict(batch))
        hidden = model(
            **{k: batch[k] for k in ("input_ids", "attention_mask")}, output_hidden_states=True
        ).hidden_states[-1]
        step = step_supervision_loss(decoder, model.get_input_embeddings(), hidden, *(batch[k] for k in keys))
    torch.testing.assert_close(total, plain + 0.5 * step, rtol=1e-5, atol=1e-5)

    before_model = {name: p.detach().clone() for name, p in model.named_parameters()}
    before_decoder = {name: p.detach().clone() for name, p in decoder.named_parameters() if p.requires_grad}
    trainer.train()
    assert any("step_loss" in entry for entry in trainer.state.log_history)
    assert any(not torch.equal(p, before_model[name]) for name, p in model.named_parameters())
    changed = [
        name for name, p in decoder.named_parameters() if p.requires_grad and not torch.equal(p, before_decoder[name])
    ]
    assert len(changed) == len(before_decoder), set(before_decoder) - set(changed)


def test_the_step_loss_reaches_the_thoughts(tmp_path, tokenizer):
    """Its gradient flows through the thought vectors into the model's weights (here, the first layer's)."""
    trainer = make_trainer(tmp_path, tokenizer)
    model = trainer.model.train()
    batch = trainer.data_collator([{"epoch": 0, "sample": i, "stage": 2} for i in range(2)])
    keys = ("step_thought_index", "step_input_ids", "step_attention_mask")
    hidden = model(**{k: batch[k] for k in ("input_ids", "attention_mask")}, output_hidden_states=True).hidden_states
    loss = step_supervision_loss(
        trainer.thought_decoder, model.get_input_embeddings(), hidden[-1], *(batch[k] for k in keys)
    )
    weight = model.model.language_model.layers[0].mlp.down_proj.weight
    (grad,) = torch.autograd.grad(loss, weight)
    assert grad.abs().sum() > 0


def test_the_decoder_is_saved_beside_the_model_and_loads_alone(tmp_path, tokenizer):
    trainer = make_trainer(tmp_path, tokenizer)
    trainer.train()
    folder = trainer.save_thought_decoder(tmp_path / "run")
    assert folder == tmp_path / "run" / THOUGHT_DECODER_DIR
    loaded = AutoModelForCausalLM.from_pretrained(folder).eval()
    embeds = torch.randn(2, 3, trainer.model.config.text_config.hidden_size)
    with torch.no_grad():
        expected = trainer.thought_decoder(inputs_embeds=embeds).logits
        torch.testing.assert_close(loaded(inputs_embeds=embeds).logits, expected)
        ids = torch.tensor([[5, 6, 7]])
        torch.testing.assert_close(loaded.get_input_embeddings()(ids), trainer.model.get_input_embeddings()(ids))
    assert not any("decoder" in name for name in trainer.model.state_dict())  # not part of the model
    assert make_trainer(tmp_path, tokenizer, step_supervision=False).save_thought_decoder(tmp_path / "x") is None


def test_lora_trains_the_decoder_with_lora_and_saves_it_merged(tmp_path, tokenizer):
    from trl import ModelConfig

    from coconut.lora import coconut_peft_config

    model = text_model(tokenizer)
    peft_config = coconut_peft_config(ModelConfig(use_peft=True, lora_r=4), model)
    args = sft_config(tmp_path, step_supervision=True, max_latent_stage=2, num_train_epochs=2, start_stage=1)
    trainer = CoconutSFTTrainer(
        model=model, args=args, train_dataset=RECORDS, processing_class=tokenizer, peft_config=peft_config
    )
    trainable = [name for name, p in trainer.thought_decoder.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    trainer.train()
    folder = trainer.save_thought_decoder(tmp_path / "run")
    loaded = AutoModelForCausalLM.from_pretrained(folder).eval()
    trainer.thought_decoder.eval()  # no LoRA dropout
    embeds = torch.randn(1, 3, model.config.text_config.hidden_size)
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(inputs_embeds=embeds).logits, trainer.thought_decoder(inputs_embeds=embeds).logits
        )


def test_resume_restores_the_decoder(tmp_path, tokenizer):
    common = dict(per_device_train_batch_size=4, save_strategy="steps", save_steps=1)
    full = make_trainer(tmp_path / "full", tokenizer, **common)
    full.train()
    stopped = make_trainer(tmp_path / "resumed", tokenizer, **common)
    stopped.add_callback(StopAt(3))
    stopped.train()
    assert (tmp_path / "resumed" / "out" / "checkpoint-3" / DECODER_STATE_NAME).is_file()
    resumed = make_trainer(tmp_path / "resumed", tokenizer, **common)
    resumed.train(resume_from_checkpoint=True)
    for (name, expected), actual in zip(
        full.thought_decoder.named_parameters(), resumed.thought_decoder.parameters(), strict=True
    ):
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6, msg=name)


def test_step_supervision_settings_are_checked(tmp_path):
    with pytest.raises(ValueError, match="`step_loss_weight`=2.0 without `step_supervision`"):
        sft_config(tmp_path, step_loss_weight=2.0)
    with pytest.raises(ValueError, match="`step_loss_normalization`='token' without `step_supervision`"):
        sft_config(tmp_path, step_loss_normalization="token")
    with pytest.raises(ValueError, match="must be one of"):
        sft_config(tmp_path, step_supervision=True, step_loss_normalization="tokens")
    with pytest.raises(ValueError, match="`method`='cot'"):
        sft_config(tmp_path, step_supervision=True, method="cot")
    with pytest.raises(ValueError, match="positive finite"):
        sft_config(tmp_path, step_supervision=True, step_loss_weight=float("nan"))
