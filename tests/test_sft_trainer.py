"""CoconutSFTTrainer: the model's own loss, the stage schedule, optimizer resets and exact resume, on a tiny model."""

import json
import logging
import shutil

import pytest
import torch
from transformers import TrainerCallback
from trl.trainer.utils import add_fused_lm_head

from coconut.curriculum import build_training_example
from coconut.reference import reference_logits
from coconut.sft_config import CoconutSFTConfig
from coconut.sft_trainer import (
    CoconutSFTTrainer,
    CurriculumSchedule,
    curriculum_settings,
    load_saved_key_layout,
    prepare_model_for_curriculum,
)
from coconut.tiny import tiny_coconut_config_for
from coconut.tokenizer import train_tokenizer
from modeling_coconut_internvl import CoconutInternVLForConditionalGeneration
from processing_coconut_internvl import LATENT


# A toy task with three reasoning steps per question, small enough to tokenize and train on in milliseconds.
RECORDS = [
    {
        "id": f"toy-{i}",
        "question": f"start {i % 5} add {i % 3} add {i % 2} add 1",
        "steps": [f"{i % 5} + {i % 3} = {i % 5 + i % 3}", f"+ {i % 2} = {i % 5 + i % 3 + i % 2}", "+ 1"],
        "answer": str(i % 5 + i % 3 + i % 2 + 1),
        "images": [],
    }
    for i in range(8)
]


def corpus(records):
    for record in records:
        yield record["question"]
        yield from record["steps"]
        yield f"### {record['answer']}"


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(corpus(RECORDS), vocab_size=320)


def text_model(tokenizer, seed: int = 0) -> CoconutInternVLForConditionalGeneration:
    """A tiny Coconut-InternVL whose vocabulary and special ids are the tokenizer's."""
    config = tiny_coconut_config_for(tokenizer)
    torch.manual_seed(seed)
    return CoconutInternVLForConditionalGeneration(config)


def sft_config(tmp_path, **overrides) -> CoconutSFTConfig:
    settings = dict(
        output_dir=str(tmp_path / "out"),
        num_train_epochs=3,
        epochs_per_stage=1,
        max_latent_stage=3,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        lr_scheduler_type="linear",
        warmup_steps=1,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        bf16=False,
        use_cpu=True,
        seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    settings.update(overrides)
    return CoconutSFTConfig(**settings)


def make_trainer(tmp_path, tokenizer, seed=0, records=RECORDS, eval_dataset=None, **overrides) -> CoconutSFTTrainer:
    model, args = text_model(tokenizer, seed), sft_config(tmp_path, **overrides)
    prepare_model_for_curriculum(model, args, records)
    return CoconutSFTTrainer(
        model=model, args=args, train_dataset=records, eval_dataset=eval_dataset, processing_class=tokenizer
    )


def test_training_loss_is_the_latent_forward_loss(tmp_path, tokenizer):
    trainer = make_trainer(tmp_path, tokenizer)
    model = trainer.model.train()
    batch = trainer.data_collator([{"epoch": 0, "sample": i, "stage": 2} for i in range(4)])
    latent_id = model.config.latent_token_id
    assert (batch["input_ids"] == latent_id).sum(dim=1).tolist() == [2, 2, 2, 2]

    loss = trainer.compute_loss(model, dict(batch))

    # Reference: each row recomputed alone, every thought from the whole prefix without a cache.
    reference_sum, count = 0.0, 0
    for row in range(4):
        real = batch["attention_mask"][row].bool()
        ids, labels = batch["input_ids"][row][real].tolist(), batch["labels"][row][real]
        logits = reference_logits(model, ids, None)
        reference_sum = reference_sum + torch.nn.functional.cross_entropy(
            logits[:-1], labels[1:], ignore_index=-100, reduction="sum"
        )
        count += (labels[1:] != -100).sum()
    reference = reference_sum / count
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-5)

    # TRL's own fused LM head runs the inner backbone: no latent passes, another loss.
    plain_model = text_model(tokenizer)  # the same weights
    add_fused_lm_head(plain_model)
    plain = plain_model(**batch, fused_lm_head=True).loss
    assert abs(plain.item() - reference.item()) > 1e-3, (plain.item(), reference.item())


def test_sft_trainer_metrics_are_logged(tmp_path, tokenizer):
    """SFTTrainer's own metrics, computed over the latent passes: token count, entropy and next-token accuracy."""
    trainer = make_trainer(
        tmp_path, tokenizer, num_train_epochs=2, max_latent_stage=2, start_stage=1,  # 2 stages x 2 steps
        eval_dataset=RECORDS[:2], eval_max_new_tokens=2, per_device_eval_batch_size=2,
    )  # fmt: skip
    batches = [trainer.data_collator(trainer.schedule.rows[step * 4 : step * 4 + 4]) for step in range(4)]
    assert (batches[0]["input_ids"] == trainer.model.config.latent_token_id).any()
    with torch.no_grad():  # peaked predictions: the fed-back thoughts then change the entropy by about 1 %
        trainer.model.lm_head.weight.mul_(30)
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 4
    evaluations = [entry for entry in trainer.state.log_history if "eval_accuracy" in entry]
    assert [entry["stage"] for entry in evaluations] == [1, 2]
    assert not any("entropy" in entry for entry in evaluations)  # the training metrics stay in the training logs
    tokens = torch.cumsum(torch.tensor([int(batch["attention_mask"].sum()) for batch in batches]), 0).tolist()
    assert [entry["num_tokens"] for entry in logs] == tokens
    for entry in logs:
        assert 0 <= entry["mean_token_accuracy"] <= 1 and entry["entropy"] > 0, entry

    # The first step's metrics, from the batch and the initial weights: the latent forward's next-token predictions.
    model = text_model(tokenizer).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(30)
        logits = model(**{k: v for k, v in batches[0].items() if k != "labels"}).logits[:, :-1]
    labels = batches[0]["labels"][:, 1:]
    mask = labels != -100
    accuracy = ((logits.argmax(-1) == labels) & mask).sum() / mask.sum()
    entropy = torch.distributions.Categorical(logits=logits[mask]).entropy().mean()
    assert logs[0]["mean_token_accuracy"] == pytest.approx(accuracy.item(), abs=1e-6)
    assert logs[0]["entropy"] == pytest.approx(entropy.item(), rel=1e-4)


def test_collator_labels_only_steps_answer_and_end_of_turn(tmp_path, tokenizer):
    trainer = make_trainer(tmp_path, tokenizer)
    batch = trainer.data_collator([{"epoch": 0, "sample": 0, "stage": 1}, {"epoch": 0, "sample": 3, "stage": 0}])
    for row, (sample, stage) in enumerate([(0, 1), (3, 0)]):
        example = build_training_example(RECORDS[sample], stage, tokenizer, trainer.args.curriculum)
        labelled = batch["labels"][row][batch["labels"][row] != -100].tolist()
        assert tokenizer.decode(labelled) == example["completion"]
        real = batch["attention_mask"][row].bool()
        assert tokenizer.decode(batch["input_ids"][row][real]) == example["prompt"] + example["completion"]
    # Padding never labelled.
    assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()


def test_collator_aligns_latent_blocks_so_a_batch_needs_few_passes(tmp_path, tokenizer):
    """Rows with different prompt lengths and thought counts: one pass per thought of the longest block, plus one."""
    from modeling_coconut_internvl import plan_latent_passes

    trainer = make_trainer(tmp_path, tokenizer)
    rows = [{"epoch": 0, "sample": sample, "stage": stage} for sample, stage in [(0, 1), (1, 2), (2, 1), (3, 2)]]
    batch = trainer.data_collator(rows)
    latent_mask = batch["input_ids"] == tokenizer.convert_tokens_to_ids(LATENT)
    most_thoughts = latent_mask.sum(-1).max().item()
    assert most_thoughts >= 2
    assert not batch["attention_mask"][:, 0].all(), "the prompts should differ in length for this test"
    assert len(plan_latent_passes(latent_mask)) == most_thoughts + 1
    # Each row's block ends at the same column: the end of the longest prompt.
    last_latent = [row.nonzero().max().item() for row in latent_mask if row.any()]
    assert len(set(last_latent)) == 1


def test_stage_schedule(tmp_path):
    records = [{"steps": ["a"] * (i % 4)} for i in range(10)]
    args = sft_config(tmp_path, num_train_epochs=7, epochs_per_stage=2)
    schedule = CurriculumSchedule.build(args, records, rows_per_step=4)
    assert schedule.steps_per_epoch == 3 and schedule.total_steps == 21  # 10 records padded to 12 per epoch
    assert [row["stage"] for row in schedule.rows[::12]] == [0, 0, 1, 1, 2, 2, 3]
    assert [schedule.stage_of_step(step) for step in range(0, 21, 3)] == [0, 0, 1, 1, 2, 2, 3]
    assert schedule.stage_spans() == [(0, 0, 6), (1, 6, 6), (2, 12, 6), (3, 18, 3)]
    # Every record once per epoch (wrapped to fill the last step), in a different order each epoch.
    epoch_0, epoch_1 = (schedule.rows[e * 12 : e * 12 + 10] for e in range(2))
    assert sorted(row["sample"] for row in epoch_0) == list(range(10))
    assert [row["sample"] for row in epoch_0] != [row["sample"] for row in epoch_1]

    assert {row["stage"] for row in CurriculumSchedule.build(sft_config(tmp_path, method="cot"), records, 4).rows} == {
        0
    }


def test_start_stage_continues_the_curriculum(tmp_path):
    """A model that finished stage 0 elsewhere (e.g. a converged CoT model) starts the schedule at `start_stage`."""
    records = [{"steps": ["a"] * 3} for _ in range(8)]
    args = sft_config(tmp_path, num_train_epochs=7, epochs_per_stage=2, max_latent_stage=3, start_stage=1)
    schedule = CurriculumSchedule.build(args, records, rows_per_step=4)
    assert schedule.epoch_stages == [1, 1, 2, 2, 3, 3, 4]
    assert schedule.stage_spans()[0] == (1, 0, 4)
    final = sft_config(tmp_path, num_train_epochs=2, max_latent_stage=3, start_stage=4)
    assert CurriculumSchedule.build(final, records, rows_per_step=4).epoch_stages == [4, 4]
    with pytest.raises(ValueError, match=r"`start_stage`=5 must be between 0 and the final stage .* = 4"):
        sft_config(tmp_path, max_latent_stage=3, start_stage=5)
    with pytest.raises(ValueError, match="method 'cot' has no stages"):
        sft_config(tmp_path, method="cot", start_stage=1)


@pytest.mark.parametrize("pad", [False, True])
def test_stages_past_the_last_merge_into_one_final_stage(tmp_path, tokenizer, pad):
    """Past max_latent_stage every stage builds the same examples: one final stage for all the remaining epochs."""
    args = sft_config(tmp_path, num_train_epochs=9, epochs_per_stage=2, max_latent_stage=2, pad_latent_to_max=pad)
    schedule = CurriculumSchedule.build(args, RECORDS, rows_per_step=4)  # 8 records: 2 steps per epoch
    assert schedule.epoch_stages == [0, 0, 1, 1, 2, 2, 3, 3, 3]
    assert schedule.stage_spans() == [(0, 0, 4), (1, 4, 4), (2, 8, 4), (3, 12, 6)]  # one reset, one lr schedule
    one_step = {**RECORDS[0], "steps": RECORDS[0]["steps"][:1]}
    for record in [*RECORDS[:2], one_step]:
        final = build_training_example(record, 3, tokenizer, args.curriculum)
        for later in (4, 8, 50):  # what the uncapped schedule would have used
            example = build_training_example(record, later, tokenizer, args.curriculum)
            assert {**example, "stage": 3} == final


def test_uniform_prob_redraws_stages_reproducibly(tmp_path, tokenizer):
    trainer = make_trainer(tmp_path, tokenizer, num_train_epochs=30, uniform_prob=0.5)
    rows = trainer.schedule.rows
    examples = trainer.data_collator.examples(rows)
    used = [example["stage"] for example in examples]
    off_schedule = [u for u, row in zip(used, rows, strict=True) if u != row["stage"]]
    assert 0.25 < len(off_schedule) / len(rows) < 0.6
    assert set(off_schedule) <= {0, 1, 2, 3}  # uniform over 0..len(steps)
    assert [example["stage"] for example in trainer.data_collator.examples(rows)] == used  # what resume relies on


@pytest.mark.parametrize("pad", [False, True])
def test_pad_latent_to_max_past_the_last_stage(tmp_path, tokenizer, pad):
    short = [{**RECORDS[0], "steps": RECORDS[0]["steps"][:1]}]  # one step
    trainer = make_trainer(tmp_path, tokenizer, records=short, c_thought=2, max_latent_stage=2, pad_latent_to_max=pad)
    latent_id = tokenizer.convert_tokens_to_ids(LATENT)
    counts = [
        int((trainer.data_collator([{"epoch": 0, "sample": 0, "stage": stage}])["input_ids"] == latent_id).sum())
        for stage in (0, 1, 2, 3, 9)
    ]
    assert counts == ([0, 2, 4, 4, 4] if pad else [0, 2, 4, 2, 2])


def test_pause_as_thought_keeps_the_layout_without_thought_feedback(tmp_path, tokenizer):
    trainer = make_trainer(tmp_path, tokenizer, method="pause_as_thought")
    latent_id = tokenizer.convert_tokens_to_ids(LATENT)
    batch = trainer.data_collator([{"epoch": 0, "sample": 0, "stage": 2}])
    assert int((batch["input_ids"] == latent_id).sum()) == 2  # the pause tokens are there
    assert trainer.model.config.latent_token_id is None  # and are ordinary tokens: one plain forward
    loss = trainer.compute_loss(trainer.model, dict(batch))
    plain = torch.nn.functional.cross_entropy(
        trainer.model(input_ids=batch["input_ids"]).logits[0, :-1], batch["labels"][0, 1:], ignore_index=-100
    )
    torch.testing.assert_close(loss, plain)


def test_config_defaults_and_checks(tmp_path):
    config = sft_config(tmp_path, dataset_kwargs={"num_proc": 2})
    assert not config.activation_checkpointing  # SFTConfig's default is on
    # What the trainer needs, set by the config: its own data order, the schedule columns kept and not tokenized.
    assert (config.train_sampling_strategy, config.remove_unused_columns) == ("sequential", False)
    assert config.dataset_kwargs == {"num_proc": 2, "skip_prepare_dataset": True}
    with pytest.raises(ValueError, match="uniform_prob"):
        sft_config(tmp_path, uniform_prob=1.5)
    with pytest.raises(ValueError, match="method"):
        sft_config(tmp_path, method="latent")
    with pytest.raises(ValueError, match="`train_sampling_strategy`='group_by_length': the trainer orders the data"):
        sft_config(tmp_path, train_sampling_strategy="group_by_length")
    with pytest.raises(ValueError, match="TRL must not tokenize the schedule"):
        sft_config(tmp_path, dataset_kwargs={"skip_prepare_dataset": False})
    with pytest.raises(ValueError, match="reentrant checkpointing cuts the gradient"):
        sft_config(tmp_path, activation_checkpointing=True, activation_checkpointing_kwargs={"use_reentrant": True})


def test_label_smoothing_goes_through_trls_loss(tmp_path, tokenizer):
    """With `label_smoothing_factor`, SFTTrainer's label smoother scores the logits of the latent forward."""
    from transformers.trainer_pt_utils import LabelSmoother

    trainer = make_trainer(tmp_path, tokenizer, label_smoothing_factor=0.1)
    batch = trainer.data_collator([{"epoch": 0, "sample": i, "stage": 2} for i in range(4)])
    model = trainer.model.train()
    loss = trainer.compute_loss(model, dict(batch))
    outputs = model(**{k: v for k, v in batch.items() if k != "labels"})
    expected = LabelSmoother(epsilon=0.1)(outputs, batch["labels"], shift_labels=True)
    torch.testing.assert_close(loss, expected)
    assert abs(loss.item() - model(**batch).loss.item()) > 1e-3  # not the unsmoothed loss


def test_gradient_checkpointing_keeps_the_training_loss_and_gradients(tmp_path, tokenizer):
    """Non-reentrant checkpointing (the setting the config accepts) gives the plain loss and gradients, including
    those that flow from later thoughts into earlier keys and values."""
    plain = make_trainer(tmp_path / "plain", tokenizer)
    kwargs = {"use_reentrant": False}
    checkpointed = make_trainer(
        tmp_path / "ckpt", tokenizer, activation_checkpointing=True, activation_checkpointing_kwargs=kwargs
    )
    batch = plain.data_collator([{"epoch": 0, "sample": i, "stage": 2} for i in range(4)])
    checkpointed.model.train()
    # What Trainer.train does with the settings.
    checkpointed.model.activation_checkpointing_enable(checkpointed.args.activation_checkpointing_kwargs)
    assert checkpointed.model.is_activation_checkpointing
    loss = checkpointed.compute_loss(checkpointed.model, dict(batch))
    expected = plain.compute_loss(plain.model.train(), dict(batch))
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    loss.backward()
    expected.backward()
    for (name, parameter), reference in zip(
        checkpointed.model.named_parameters(), plain.model.parameters(), strict=True
    ):
        if reference.grad is not None:
            torch.testing.assert_close(parameter.grad, reference.grad, rtol=1e-4, atol=1e-6, msg=name)


class RecordOptimizer(TrainerCallback):
    """Per optimizer step: the Adam step count of one parameter and the learning rate used."""

    def __init__(self):
        self.adam_steps, self.learning_rates = [], []
        self.trainer = None

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        parameter = self.trainer.model.lm_head.weight
        self.adam_steps.append(int(optimizer.state[parameter]["step"]))
        self.learning_rates.append(optimizer.param_groups[0]["lr"])


@pytest.mark.parametrize("reset", [True, False])
def test_reset_optimizer_per_stage(tmp_path, tokenizer, reset):
    recorder = RecordOptimizer()
    trainer = make_trainer(tmp_path, tokenizer, reset_optimizer=reset)  # 3 stages x 2 steps
    trainer.add_callback(recorder)
    recorder.trainer = trainer
    before = {
        name: p.detach().clone()
        for name, p in trainer.model.named_parameters()
        if "language_model" in name or "lm_head" in name
    }
    trainer.train()
    if reset:
        assert recorder.adam_steps == [1, 2, 1, 2, 1, 2]
        assert recorder.learning_rates == pytest.approx([0, 1e-2] * 3)  # 1 warmup step, then decay, per stage
    else:
        assert recorder.adam_steps == [1, 2, 3, 4, 5, 6]
        assert recorder.learning_rates == pytest.approx([0, 1e-2, 0.8e-2, 0.6e-2, 0.4e-2, 0.2e-2])
    assert [entry["stage"] for entry in trainer.state.log_history if "loss" in entry] == [0, 0, 1, 1, 2, 2]
    # Every text parameter trained (the vision tower sees no image in this task).
    unchanged = [
        name for name, p in trainer.model.named_parameters() if name in before and torch.equal(before[name], p)
    ]
    assert unchanged == []


class StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def test_resume_mid_stage_matches_uninterrupted_run(tmp_path, tokenizer, monkeypatch):
    common = dict(num_train_epochs=3, per_device_train_batch_size=2, save_strategy="steps", save_steps=1)
    full = make_trainer(tmp_path / "full", tokenizer, **common)  # 3 stages x 4 steps
    full.train()

    interrupted = make_trainer(tmp_path / "resumed", tokenizer, **common)
    interrupted.add_callback(StopAt(7))  # the middle of stage 1, after the optimizer reset at step 4
    interrupted.train()
    assert interrupted.state.global_step == 7

    resumed = make_trainer(tmp_path / "resumed", tokenizer, seed=1, **common)  # other init: weights come from disk

    def second_model(*args, **kwargs):
        raise AssertionError("the resume loaded a second model")

    monkeypatch.setattr(CoconutInternVLForConditionalGeneration, "from_pretrained", second_model)
    resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == 12
    for (name, expected), actual in zip(full.model.named_parameters(), resumed.model.parameters(), strict=True):
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6, msg=name)


# What a stopped, resumed, re-run or diverging training does. Three stages of two steps each.
CHECKPOINTED = dict(per_device_train_batch_size=4, save_strategy="steps", save_steps=1)


def stopped_run(tmp_path, tokenizer, step, **overrides) -> CoconutSFTTrainer:
    """A run of `CHECKPOINTED` stopped after `step` steps, with a checkpoint after every step."""
    trainer = make_trainer(tmp_path, tokenizer, **{**CHECKPOINTED, **overrides})
    trainer.add_callback(StopAt(step))
    trainer.train()
    assert trainer.state.global_step == step
    return trainer


def assert_same_weights(model, expected_model):
    for (name, expected), actual in zip(expected_model.named_parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6, msg=name)


def test_stage_results_survive_a_resume(tmp_path, tokenizer):
    """Stopped in stage 2 and resumed, the run still reports stages 0 and 1, predictions included."""
    evaluation = dict(eval_dataset=RECORDS[:3], eval_max_new_tokens=3, per_device_eval_batch_size=2)
    full = make_trainer(tmp_path / "full", tokenizer, **CHECKPOINTED, **evaluation)
    full.train()
    stopped_run(tmp_path / "run", tokenizer, 5, **evaluation)  # stages 0 and 1 evaluated, then stopped
    resumed = make_trainer(tmp_path / "run", tokenizer, seed=1, **CHECKPOINTED, **evaluation)
    resumed.train(resume_from_checkpoint=True)

    def results(trainer):
        return [
            (r.stage, r.metrics["accuracy"], [p.generation for p in r.predictions])
            for r in trainer.eval_results.results
        ]

    assert [stage for stage, *_ in results(resumed)] == [0, 1, 2]
    assert results(resumed) == results(full)
    paths = resumed.eval_results.save(tmp_path / "results")
    assert [row["stage"] for row in json.loads(paths["json"].read_text())["stages"]] == [0, 1, 2]
    for stage in (0, 1, 2):
        lines = (tmp_path / "results" / f"predictions_stage_{stage}.jsonl").read_text().splitlines()
        assert [json.loads(line)["id"] for line in lines] == ["toy-0", "toy-1", "toy-2"]


def test_an_incomplete_latest_checkpoint_is_named(tmp_path, tokenizer):
    """A checkpoint without trainer_state.json (killed while saving) is an error naming it; without it, the run
    resumes from the one before."""
    full = make_trainer(tmp_path / "full", tokenizer, **CHECKPOINTED)
    full.train()
    stopped_run(tmp_path / "run", tokenizer, 4)
    incomplete = tmp_path / "run" / "out" / "checkpoint-4"
    (incomplete / "trainer_state.json").unlink()
    with pytest.raises(ValueError, match="checkpoint-4' is incomplete or missing: it has no readable trainer_state"):
        make_trainer(tmp_path / "run", tokenizer, **CHECKPOINTED).train(resume_from_checkpoint=True)
    shutil.rmtree(incomplete)
    resumed = make_trainer(tmp_path / "run", tokenizer, seed=1, **CHECKPOINTED)
    resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == 6
    assert_same_weights(resumed.model, full.model)


class CountSteps(TrainerCallback):
    def __init__(self):
        self.steps = 0

    def on_step_end(self, args, state, control, **kwargs):
        self.steps += 1


def test_train_resumes_as_trainer_does(tmp_path, tokenizer):
    """`train(True)` resumes from the newest checkpoint of output_dir, `train(path)` from that one; `train()` and
    `train(False)` start from scratch."""
    full = make_trainer(tmp_path / "full", tokenizer, **CHECKPOINTED)
    full.train()
    stopped_run(tmp_path / "run", tokenizer, 3)

    def run(resume=None) -> int:
        trainer = make_trainer(tmp_path / "run", tokenizer, seed=1, **CHECKPOINTED)
        counter = CountSteps()
        trainer.add_callback(counter)
        trainer.train(resume)
        assert trainer.state.global_step == 6
        if resume:
            assert_same_weights(trainer.model, full.model)
        return counter.steps

    assert run(True) == 3
    assert run(str(tmp_path / "run" / "out" / "checkpoint-2")) == 4
    assert run() == 6
    assert run(False) == 6


class CorruptWeightAfter(TrainerCallback):
    """Writes a NaN into the LM head after `step` steps, as a corrupt weight file would."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step:
            with torch.no_grad():
                model.lm_head.weight[0, 0] = float("nan")


def test_a_non_finite_loss_stops_the_run_naming_the_step(tmp_path, tokenizer):
    """NaN weights train to a NaN loss: the run stops with the first bad step, and saves nothing after it."""
    trainer = make_trainer(tmp_path, tokenizer, **CHECKPOINTED)
    with torch.no_grad():
        trainer.model.lm_head.weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="not finite \\(NaN or inf\\) at step 1 \\(stage 0\\)"):
        trainer.train()
    assert not list((tmp_path / "out").glob("checkpoint-*"))
    # Checked only where the run logs, saves or ends a stage (no sync per step), the error still names the first step.
    trainer = make_trainer(tmp_path, tokenizer, logging_steps=50, per_device_train_batch_size=4)
    trainer.add_callback(CorruptWeightAfter(2))
    with pytest.raises(FloatingPointError, match="at step 3 \\(stage 1\\); training stopped at step 4"):
        trainer.train()


def test_resume_refuses_other_settings(tmp_path, tokenizer):
    """The same output_dir with other training or curriculum settings is refused, naming the fields."""
    stopped_run(tmp_path, tokenizer, 2)
    message = "was trained with other settings than this run: c_thought: 1 -> 2; start_stage: 0 -> 1\\. .*--output_dir"
    with pytest.raises(ValueError, match=message):
        make_trainer(tmp_path, tokenizer, c_thought=2, start_stage=1, learning_rate=2e-2, **CHECKPOINTED).train(True)
    with pytest.raises(ValueError, match="train_records: 8 -> 6; train_records_sha256: '"):
        make_trainer(tmp_path, tokenizer, records=RECORDS[:6], **CHECKPOINTED).train(True)
    # Optimizer, logging, saving and evaluation settings may change on resume.
    relaxed = {**CHECKPOINTED, "save_steps": 2, "logging_steps": 3, "per_device_eval_batch_size": 7}
    resumed = make_trainer(
        tmp_path, tokenizer, eval_max_new_tokens=9, activation_checkpointing=True, learning_rate=2e-2, **relaxed
    )
    resumed.train(True)
    assert resumed.state.global_step == 6
    # Not resuming trains from scratch, whatever the folder holds.
    fresh = make_trainer(tmp_path, tokenizer, c_thought=2, save_strategy="no")
    fresh.train()
    assert fresh.state.global_step == 6


def test_resume_compares_the_settings_the_config_adds():
    """The compared settings come from the dataclasses: every curriculum field, none of TrainingArguments'."""
    compared = set(curriculum_settings())
    assert {
        "method",
        "c_thought",
        "max_latent_stage",
        "epochs_per_stage",
        "start_stage",
        "reset_optimizer",
    } <= compared
    assert {"latent_stop_head", "stop_loss_weight", "pad_latent_to_max", "uniform_prob"} <= compared
    assert not compared & {"learning_rate", "output_dir", "eval_max_new_tokens", "gradient_checkpointing", "seed"}


def test_a_checkpoint_of_another_model_is_refused_when_loaded(tmp_path, tokenizer):
    """Keys that fit no parameter, even after the mapping of the saved layout, are an error, not weights left out."""
    model = text_model(tokenizer, 0)
    layout = "model.language_model."  # what save_pretrained writes: InternVL's Hub layout, `...language_model.model.`
    saved = {name.replace(layout, layout + "model.", 1): tensor for name, tensor in model.state_dict().items()}
    hooks = load_saved_key_layout(model)
    assert model.load_state_dict(saved, strict=False).missing_keys == []  # the saved layout, mapped back
    with pytest.raises(ValueError, match="1 of them have no parameter, e.g. `model.extra.weight`"):
        model.load_state_dict({**saved, "model.extra.weight": torch.zeros(1)}, strict=False)
    for hook in hooks:
        hook.remove()
    assert model.load_state_dict(saved, strict=False).unexpected_keys  # without the hooks


def test_runs_too_short_for_the_curriculum(tmp_path, tokenizer, caplog):
    """Warnings with the numbers; the stage reached and the thoughts used describe the saved model."""
    with caplog.at_level(logging.WARNING, logger="coconut.sft_trainer"):
        make_trainer(tmp_path, tokenizer, num_train_epochs=2, max_latent_stage=3)
    assert (
        "too short for its curriculum: `num_train_epochs`=2 ends in stage 1, but `max_latent_stage`=3 needs "
        "(max_latent_stage + 1 - start_stage) x epochs_per_stage (1) = 4 epochs"
    ) in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="coconut.sft_trainer"):
        beyond = make_trainer(tmp_path, tokenizer, num_train_epochs=6, max_latent_stage=5, c_thought=2)
    assert "`max_latent_stage`=5, but the longest training record has 3 steps" in caplog.text
    assert [beyond.num_latent_thoughts(stage) for stage in (0, 2, 5)] == [0, 4, 6]  # capped at 3 steps x 2
    with pytest.raises(ValueError, match="`max_steps`=99 is more than the curriculum's 6 steps"):
        make_trainer(tmp_path, tokenizer, max_steps=99, per_device_train_batch_size=4)
    with pytest.raises(ValueError, match="`num_train_epochs`=0: the curriculum trains whole epochs, at least one"):
        sft_config(tmp_path, num_train_epochs=0)

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="coconut.sft_trainer"):
        short = make_trainer(
            tmp_path, tokenizer, max_steps=3, per_device_train_batch_size=4, eval_dataset=RECORDS[:2],
            eval_max_new_tokens=2,
        )  # fmt: skip
    assert "`max_steps`=3 of 6 steps ends in stage 1" in caplog.text
    short.train()
    record = short.training_record()
    assert (record["stage"], record["num_latent_thoughts"], record["global_step"]) == (1, 1, 3)
    assert [r.stage for r in short.eval_results.results] == [0, 1]
    assert short.eval_results.to_dict()["overall"]["max_latent_thoughts"] == 1


def test_collator_never_cuts_an_example(tmp_path, tokenizer):
    """An example longer than max_length is an error naming its record, never trained on cut."""
    row = {"epoch": 0, "sample": 5, "stage": 0}
    length = make_trainer(tmp_path, tokenizer, max_length=None).data_collator([row])["input_ids"].shape[1]
    trainer = make_trainer(tmp_path, tokenizer, max_length=length - 1)
    with pytest.raises(ValueError, match=f"Record 5 \\(id 'toy-5'\\) at stage 0 is {length} tokens long"):
        trainer.data_collator([row])
    assert trainer.data_collator([{**row, "stage": 3}])["input_ids"].shape[1] < length  # shorter stages still fit


def test_building_the_trainer_sends_no_telemetry(tmp_path, tokenizer, monkeypatch):
    """TRL's trainers ping the Hub when built; `CoconutSFTTrainer` does not, so a run talks to the Hub only for a Hub
    model or dataset and `--push_to_hub` (docs/training.md)."""
    from trl import SFTTrainer
    from trl.trainer import base_trainer

    pings = []
    monkeypatch.delenv("HF_HUB_DISABLE_TELEMETRY", raising=False)
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.setattr(base_trainer, "send_telemetry", lambda *args, **kwargs: pings.append(kwargs))
    SFTTrainer._send_telemetry(make_trainer(tmp_path, tokenizer))  # TRL's own method still pings through it
    assert len(pings) == 1 and pings[0]["library_name"] == "trl"
    make_trainer(tmp_path, tokenizer)
    assert len(pings) == 1


@pytest.mark.parametrize(
    "overrides", [dict(method="pause_as_thought"), dict(latent_stop_head=True, num_train_epochs=5)]
)
def test_the_trainer_changes_nothing_of_a_prepared_model(tmp_path, tokenizer, overrides):
    model, args = text_model(tokenizer), sft_config(tmp_path, **overrides)
    with pytest.raises(ValueError, match=r"Call `prepare_model_for_curriculum\(model, args, train_dataset\)`"):
        CoconutSFTTrainer(model=model, args=args, train_dataset=RECORDS, processing_class=tokenizer)
    prepare_model_for_curriculum(model, args, RECORDS)
    config, names = model.config.to_dict(), [name for name, _ in model.named_parameters()]
    CoconutSFTTrainer(model=model, args=args, train_dataset=RECORDS, processing_class=tokenizer)
    config.pop("use_cache", None)  # TRL's SFTTrainer turns the generation cache off for training, as for any model
    assert {key: value for key, value in model.config.to_dict().items() if key != "use_cache"} == config
    assert [name for name, _ in model.named_parameters()] == names
