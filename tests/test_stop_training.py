"""Training the stop head with the curriculum: which blocks teach it, its targets, its weighted loss, LoRA, saving."""

import pytest
import torch
from test_sft_trainer import corpus, sft_config, text_model

from coconut.curriculum import CurriculumConfig, build_training_example
from coconut.lora import coconut_peft_config
from coconut.sft_trainer import CoconutSFTTrainer, prepare_model_for_curriculum
from coconut.tokenizer import train_tokenizer
from modeling_coconut_internvl import CoconutInternVLForConditionalGeneration, latent_stop_labels


# Records with 1, 2 and 3 steps: which blocks may teach where a block ends depends on the record's step count.
RECORDS = [
    {
        "id": f"toy-{i}",
        "question": f"count {i} to {i % 3 + 1}",
        "steps": [f"step {j}" for j in range(i % 3 + 1)],
        "answer": str(i % 3 + 1),
        "images": [],
    }
    for i in range(12)
]


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(corpus(RECORDS), vocab_size=320)


def make_trainer(tmp_path, tokenizer, records=RECORDS, **overrides) -> CoconutSFTTrainer:
    settings = dict(latent_stop_head=True, max_latent_stage=2, num_train_epochs=4, per_device_train_batch_size=6)
    model, args = text_model(tokenizer), sft_config(tmp_path, **{**settings, **overrides})
    prepare_model_for_curriculum(model, args, records)
    return CoconutSFTTrainer(model=model, args=args, train_dataset=records, processing_class=tokenizer)


@pytest.mark.parametrize(
    "stage, steps, teaches",
    [
        (1, 1, True),  # the block replaces the record's only step
        (1, 2, False),  # the second step is still written: the block's end is the stage's
        (2, 1, False),  # two thoughts for one step: more than the final stage gives the record
        (2, 2, True),
        (3, 3, True),  # the final stage (max_latent_stage 2): capped at 2 thoughts, every step replaced
        (3, 1, True),
        (0, 1, False),  # stage 0 has no thoughts
    ],
)
def test_which_blocks_teach_the_stop_head(tokenizer, stage, steps, teaches):
    record = {**RECORDS[0], "steps": [f"step {j}" for j in range(steps)]}
    example = build_training_example(record, stage, tokenizer, CurriculumConfig(max_latent_stage=2))
    assert example["teaches_stop"] is teaches
    pause = build_training_example(record, stage, tokenizer, CurriculumConfig("pause_as_thought", max_latent_stage=2))
    assert pause["teaches_stop"] is False


def test_collator_gives_stop_targets_for_the_teaching_rows_only(tmp_path, tokenizer):
    trainer = make_trainer(tmp_path, tokenizer)
    rows = [{"epoch": 0, "sample": i, "stage": 2} for i in range(6)]  # steps 1, 2, 3, 1, 2, 3 at stage 2
    batch = trainer.data_collator(rows)
    latent_id = trainer.model.config.latent_token_id
    expected = latent_stop_labels(batch["input_ids"], latent_id, torch.tensor([False, True, False] * 2))
    assert torch.equal(batch["stop_labels"], expected)
    assert (batch["stop_labels"] == 1).sum(dim=1).tolist() == [0, 1, 0, 0, 1, 0]
    assert (batch["stop_labels"] == 0).sum(dim=1).tolist() == [0, 1, 0, 0, 1, 0]  # thought 1 of 2 goes on


def test_the_weighted_stop_loss_is_added_to_the_language_modelling_loss(tmp_path, tokenizer):
    trainer = make_trainer(tmp_path, tokenizer, stop_loss_weight=2.5)
    model = trainer.model.train()
    batch = trainer.data_collator([{"epoch": 0, "sample": i, "stage": 3} for i in range(6)])
    loss = trainer.compute_loss(model, dict(batch))
    inputs = {key: value for key, value in batch.items() if key != "stop_labels"}
    language_loss = model(**inputs).loss
    stop_loss = model(**batch).stop_loss
    torch.testing.assert_close(loss, language_loss + 2.5 * stop_loss, rtol=1e-5, atol=1e-6)
    assert trainer._metrics["train"]["stop_loss"][-1] == pytest.approx(stop_loss.item(), rel=1e-5)


def test_training_learns_the_head_and_saves_it(tmp_path, tokenizer):
    trainer = make_trainer(tmp_path, tokenizer, learning_rate=3e-3)
    head_before = trainer.model.latent_stop_head.weight.detach().clone()
    trainer.train()
    assert trainer.model.config.latent_stop_head is True
    assert trainer.model.generation_config.max_latent_thoughts == 2  # min(3 steps, max_latent_stage 2) x c_thought 1
    assert not torch.equal(trainer.model.latent_stop_head.weight, head_before)
    logged = [entry["stop_loss"] for entry in trainer.state.log_history if "stop_loss" in entry]
    assert logged and all(value > 0 for value in logged)
    trainer.save_model(str(tmp_path / "saved"))
    loaded = CoconutInternVLForConditionalGeneration.from_pretrained(tmp_path / "saved")
    assert torch.equal(loaded.latent_stop_head.weight, trainer.model.latent_stop_head.weight)
    assert loaded.generation_config.max_latent_thoughts == 2


def test_lora_trains_the_whole_head(tmp_path, tokenizer):
    from trl import ModelConfig

    model = text_model(tokenizer)
    model.add_latent_stop_head()
    peft_config = coconut_peft_config(ModelConfig(use_peft=True, lora_r=4), model)
    assert "latent_stop_head" in peft_config.modules_to_save
    args = sft_config(tmp_path, latent_stop_head=True, max_latent_stage=2, num_train_epochs=4)
    trainer = CoconutSFTTrainer(
        model=model, args=args, train_dataset=RECORDS, processing_class=tokenizer, peft_config=peft_config
    )
    head = trainer.model.get_base_model().latent_stop_head
    trainable = [name for name, parameter in head.named_parameters() if parameter.requires_grad]
    assert sorted(trainable) == ["modules_to_save.default.bias", "modules_to_save.default.weight"]

    frozen_config = coconut_peft_config(ModelConfig(use_peft=True, lora_r=4), model)
    frozen_config.modules_to_save = None
    model = text_model(tokenizer)
    prepare_model_for_curriculum(model, args, RECORDS)
    with pytest.raises(ValueError, match="stop head's weights are frozen"):
        CoconutSFTTrainer(
            model=model, args=args, train_dataset=RECORDS, processing_class=tokenizer, peft_config=frozen_config
        )


def test_stop_head_settings_are_checked(tmp_path):
    with pytest.raises(ValueError, match="only `coconut` feeds back"):
        sft_config(tmp_path, latent_stop_head=True, method="pause_as_thought")
    with pytest.raises(ValueError, match="could only learn to stop there"):
        sft_config(tmp_path, latent_stop_head=True, pad_latent_to_max=True)
    for weight in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="`stop_loss_weight`"):
            sft_config(tmp_path, latent_stop_head=True, stop_loss_weight=weight)


def test_the_card_reports_how_often_the_head_chose_the_count():
    from coconut.model_card import card_row

    metrics = {"accuracy": 0.9, "mean_generated_tokens": 4.0, "max_latent_thoughts": 6, "mean_latent_thoughts": 3.9}
    assert "stop head: right count" not in card_row(7, metrics)
    assert card_row(7, {**metrics, "stop_accuracy": 0.8})["stop head: right count"] == 0.8
