"""Evaluation of a tiny Coconut model: the reported numbers equal the ones computed directly from its generations."""

import json
import logging
import math
import random
from statistics import fmean

import pytest
import torch
from conftest import counting_passes, random_model, splitting_threshold, stop_probability_rows

from coconut.curriculum import CurriculumConfig, question_prompt
from coconut.eval_config import CoconutEvalConfig, check_eval_settings
from coconut.eval_prompts import default_max_new_tokens, eval_prompt, final_stage_thoughts
from coconut.evaluation import evaluate_stage
from coconut.generation import plan_stop_counts
from coconut.loading import load_model_and_processor
from coconut.metrics import count_generated_tokens, exact_match, extract_answer
from coconut.results import EvalResults, StageResult
from coconut.scoring import score_generations, stop_head_metrics
from coconut.tiny import tiny_coconut_config_for
from coconut.tokenizer import train_tokenizer
from modeling_coconut_internvl import CoconutInternVLForConditionalGeneration
from processing_coconut_internvl import END_LATENT, LATENT, START_LATENT, latent_block


NAMES = ["Tom", "Ann", "Bob", "Eve", "Max", "Sam"]
KINDS = ["wumpus", "yumpus", "zumpus"]
STEPS = 120
COCONUT = CurriculumConfig(method="coconut", c_thought=1, max_latent_stage=2)


def make_records() -> list[dict]:
    """Six ProsQA-like records with two steps each; questions of different lengths so batches need padding."""
    records = []
    for i, name in enumerate(NAMES):
        kind, other = KINDS[i % 3], KINDS[(i + 1) % 3]
        records.append(
            {
                "id": f"q{i}",
                "question": f"{name} is a {'big ' * i}rompus. Every rompus is a {kind}. Is {name} a {kind} or {other}?",
                "steps": [f"{name} is a rompus.", f"Every rompus is a {kind}."],
                "answer": f"{name} is a {kind}.",
            }
        )
    return records


@pytest.fixture(scope="module")
def trained():
    """A tiny model overfit on the records at stage 1 (one thought replaces the first step), and its tokenizer."""
    records = make_records()
    corpus = [r["question"] + " ".join(r["steps"]) + r["answer"] for r in records]
    tokenizer = train_tokenizer(corpus, vocab_size=300)
    config = tiny_coconut_config_for(tokenizer)
    torch.manual_seed(0)
    model = CoconutInternVLForConditionalGeneration(config)
    prompts = [eval_prompt(tokenizer, r, COCONUT, CoconutEvalConfig(stage=1))["prompt"] for r in records]
    completions = [f"{r['steps'][1]}\n### {r['answer']}{tokenizer.eos_token}" for r in records]
    batch = tokenizer([p + c for p, c in zip(prompts, completions, strict=True)], return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    for row, prompt in enumerate(prompts):
        labels[row, : len(tokenizer(prompt)["input_ids"])] = -100
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(STEPS):
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval(), tokenizer, loss.item()


def direct_generation(model, tokenizer, record, max_new_tokens):
    """The record alone (no padding, no batch), generated greedily: what the evaluation must reproduce."""
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": [{"type": "text", "text": record["question"]}]}],
        tokenize=False,
        add_generation_prompt=True,
    )
    prompt += START_LATENT + LATENT + END_LATENT  # stage 1: one thought
    input_ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    latent_ids = tokenizer.convert_tokens_to_ids([LATENT, START_LATENT, END_LATENT])
    output = model.generate(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        suppress_tokens=latent_ids,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    new = output[0, input_ids.shape[1] :].tolist()
    count = count_generated_tokens(new, [tokenizer.eos_token_id], tokenizer.pad_token_id)
    return tokenizer.decode(new[:count], skip_special_tokens=True), count


def test_evaluation_equals_direct_computation(trained):
    model, tokenizer, final_loss = trained
    assert final_loss < 0.1, f"the tiny model did not fit its records (loss {final_loss:.3f})"
    records = make_records()
    # Two records get a wrong reference answer, so the accuracy is neither 0 nor 1 and depends on matching by id.
    records[1]["answer"] = "Ann is a zumpus."
    records[4]["answer"] = "Max is a wumpus."
    config = CoconutEvalConfig(stage=1, batch_size=4, max_new_tokens=24, disable_tqdm=True)
    result = evaluate_stage(model, tokenizer, records, COCONUT, config)

    expected_correct, expected_tokens = [], []
    for record, prediction in zip(records, result.predictions, strict=True):
        text, count = direct_generation(model, tokenizer, record, max_new_tokens=24)
        assert prediction.id == record["id"] and prediction.generation == text, (record["id"], prediction, text)
        expected_correct.append(exact_match(extract_answer(text), record["answer"]))
        expected_tokens.append(count)
    assert sum(expected_correct) == 4, f"the fitted model should answer the 4 untouched records: {expected_correct}"
    assert result.metrics["accuracy"] == pytest.approx(sum(expected_correct) / len(records))
    assert result.metrics["mean_generated_tokens"] == pytest.approx(sum(expected_tokens) / len(records))
    assert result.metrics["num_samples"] == 6, result.predictions
    assert result.metrics["samples_per_second"] > 0
    assert result.metrics["mean_latent_thoughts"] == result.metrics["max_latent_thoughts"] == 1
    assert "stop_accuracy" not in result.metrics  # the model has no stop head


def test_predictions_follow_ids_not_batch_positions(trained):
    model, tokenizer, _ = trained
    records = make_records()
    config = CoconutEvalConfig(stage=1, batch_size=4, max_new_tokens=24, disable_tqdm=True)
    ordered = evaluate_stage(model, tokenizer, records, COCONUT, config)
    shuffled_records = records[:]
    random.Random(0).shuffle(shuffled_records)
    shuffled = evaluate_stage(model, tokenizer, shuffled_records, COCONUT, config)
    by_id = {p.id: p.generation for p in shuffled.predictions}
    assert {p.id: p.generation for p in ordered.predictions} == by_id
    assert [p.id for p in shuffled.predictions] == [r["id"] for r in shuffled_records]
    assert ordered.metrics["accuracy"] == shuffled.metrics["accuracy"] == 1.0


def test_prompt_latent_count_from_stage_flag_and_method():
    tokenizer = train_tokenizer(["a b c"], vocab_size=270)
    record = {"id": "r", "question": "Q?", "steps": ["a", "b", "c"], "answer": "x"}

    def latents(curriculum, **config):
        prompt = eval_prompt(tokenizer, record, curriculum, CoconutEvalConfig(**config))["prompt"]
        block = prompt.split("assistant\n")[1]
        assert block == ("" if not block else START_LATENT + LATENT * block.count(LATENT) + END_LATENT), block
        return block.count(LATENT) if block else None

    two = CurriculumConfig(c_thought=2, max_latent_stage=4)
    assert latents(two, stage=2) == 4
    assert latents(two, stage=5) == 6  # past the last stage, capped at the record's 3 steps
    assert latents(CurriculumConfig(c_thought=2, max_latent_stage=4, pad_latent_to_max=True), stage=5) == 8
    assert latents(two, stage=1, num_latent_thoughts=5) == 5
    auto = eval_prompt(tokenizer, record, two, CoconutEvalConfig(num_latent_thoughts="auto"))
    assert auto["prompt"] == question_prompt(record, tokenizer) and auto["num_latents"] is None
    assert latents(CurriculumConfig(method="cot")) is None
    assert latents(CurriculumConfig(method="no_thought"), stage=3) is None  # the paper's ablation: no markers either
    with pytest.raises(ValueError, match="set `stage`"):
        latents(two)
    with pytest.raises(ValueError, match="`batch_size`=0"):
        CoconutEvalConfig(batch_size=0)


def test_scores_with_choices_and_direct_answers():
    records = [
        {"id": "a", "answer": "red", "choices": ["blue", "red"], "direct_answers": ["red"] * 2 + ["pink"] * 8},
        {"id": "b", "answer": "cat", "choices": ["cat", "dog"], "direct_answers": ["cat"] * 9 + ["kitten"]},
    ]
    generations = {"b": ("It is a cat.\n### dog", 5, None), "a": ("### red", 2, None, False)}
    metrics, predictions = score_generations(records, generations)
    assert [p.id for p in predictions] == ["a", "b"]
    assert metrics["accuracy"] == 0.5
    assert metrics["multiple_choice_accuracy"] == 0.5  # "dog" is a valid option, but the wrong one
    assert metrics["direct_answer_score"] == pytest.approx((2 / 3 + 0) / 2)
    assert metrics["mean_generated_tokens"] == 3.5
    assert metrics["num_truncated"] == 1 and [p.truncated for p in predictions] == [True, False]
    assert [(p.answer, p.target) for p in predictions] == [("red", "red"), ("dog", "cat")]
    with pytest.raises(ValueError, match="no generation, e.g. id 'b'"):
        score_generations(records, {"a": generations["a"]})
    with pytest.raises(ValueError, match="'a'.*appears twice"):
        score_generations([records[0], records[0]], generations)


def test_results_files_and_comparison(trained, tmp_path, hf_home):
    model, tokenizer, _ = trained
    for name in ("coconut", "other"):
        model.save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
    records = make_records()
    entries = [
        ("Coconut", "coconut", COCONUT, CoconutEvalConfig(stage=1, max_new_tokens=24)),
        ("No thought", "other", CurriculumConfig(method="no_thought"), CoconutEvalConfig(max_new_tokens=24)),
    ]
    results = EvalResults()
    for label, folder, curriculum, config in entries:  # each model as loaded from its saved folder
        loaded, processing_class = load_model_and_processor(str(tmp_path / folder))
        results.add(evaluate_stage(loaded, processing_class, records, curriculum, config, label))
    direct = evaluate_stage(model, tokenizer, records, COCONUT, entries[0][3], "Coconut")
    assert results.results[0].metrics["accuracy"] == direct.metrics["accuracy"] == 1.0
    assert [p.generation for p in results.results[0].predictions] == [p.generation for p in direct.predictions]

    paths = results.save(tmp_path / "out")
    saved = json.loads(paths["json"].read_text())
    assert [row["label"] for row in saved["stages"]] == ["Coconut", "No thought"]
    assert saved["overall"]["best_label"] == "Coconut" and saved["overall"]["best_accuracy"] == 1.0
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = paths["md"].read_text().splitlines()
    assert table[0].startswith("| Model | Accuracy |") and table[2].startswith("| Coconut | 100.0 |")
    lines = (tmp_path / "out" / "predictions_Coconut.jsonl").read_text().splitlines()
    assert [json.loads(line)["id"] for line in lines] == [r["id"] for r in records]
    # The gold answer stands beside the prediction, so a reader sees what went wrong.
    first = json.loads(lines[0])
    assert list(first)[3:5] == ["answer", "target"] and first["target"] == records[0]["answer"]


def test_truncated_generations_are_counted_and_warned_about(trained, caplog, tmp_path):
    """`--max_new_tokens 2` used to score 0 % without a word."""
    model, tokenizer, _ = trained
    records = make_records()
    config = CoconutEvalConfig(stage=1, batch_size=4, max_new_tokens=2, disable_tqdm=True)
    with caplog.at_level(logging.WARNING, logger="coconut.evaluation"):
        result = evaluate_stage(model, tokenizer, records, COCONUT, config, label="short")
    assert result.metrics["accuracy"] == 0.0
    assert result.metrics["num_truncated"] == 6 and all(p.truncated for p in result.predictions)
    assert "6 of 6 generations (short) ran to max_new_tokens=2 without ending (no EOS)" in caplog.text
    paths = EvalResults([result]).save(tmp_path)
    assert json.loads(paths["json"].read_text())["overall"]["num_truncated"] == 6
    assert paths["md"].read_text().splitlines()[0].endswith("| Cut at max tokens |")

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="coconut.evaluation"):
        result = evaluate_stage(model, tokenizer, records, COCONUT, CoconutEvalConfig(stage=1, disable_tqdm=True))
    assert result.metrics["num_truncated"] == 0 and result.metrics["accuracy"] == 1.0 and not caplog.text


def test_the_default_token_budget_follows_the_longest_target(trained):
    """A fixed default (40 tokens in the embedded default) cut 6-arrow chains of thought."""
    model, tokenizer, _ = trained
    records = make_records()
    records[2]["steps"] = [records[2]["steps"][0], "Every rompus is a wumpus, " * 10 + "so it is one."]

    def target_tokens(record, skipped):
        text = "".join(f"{step}\n" for step in record["steps"][skipped:]) + f"### {record['answer']}"
        return len(tokenizer(text + tokenizer.eos_token, add_special_tokens=False)["input_ids"])

    for stage, skipped in ((0, 0), (1, 1), (2, 2)):
        expected = math.ceil(1.5 * max(target_tokens(record, skipped) for record in records))
        assert default_max_new_tokens(records, tokenizer, COCONUT, stage) == expected
    assert default_max_new_tokens(records, tokenizer, COCONUT, 0) > 40
    result = evaluate_stage(model, tokenizer, records, COCONUT, CoconutEvalConfig(stage=0, disable_tqdm=True))
    assert result.metrics["max_new_tokens"] == default_max_new_tokens(records, tokenizer, COCONUT, 0)
    with pytest.raises(ValueError, match="`max_new_tokens`=0 must be at least 1 \\(leave it out to follow"):
        CoconutEvalConfig(max_new_tokens=0)


@pytest.mark.parametrize("method", ["cot", "no_cot", "no_thought"])
def test_thoughts_for_a_method_without_a_latent_block_are_refused(trained, method):
    """`evaluate.py --method cot --num_latent_thoughts 5` used to evaluate with 0 thoughts."""
    model, tokenizer, _ = trained
    curriculum = CurriculumConfig(method=method)
    config = CoconutEvalConfig(num_latent_thoughts=5, disable_tqdm=True)
    with pytest.raises(
        ValueError, match=f"`num_latent_thoughts`=5 with `method`='{method}': its prompts have no latent"
    ):
        evaluate_stage(model, tokenizer, make_records(), curriculum, config)
    check_eval_settings(curriculum, CoconutEvalConfig(num_latent_thoughts=0))  # zero thoughts is what it does
    with pytest.raises(
        ValueError, match=f"`num_latent_thoughts`='auto' with `method`='{method}': its prompts have no"
    ):
        check_eval_settings(curriculum, CoconutEvalConfig(num_latent_thoughts="auto"))


def test_stage_results_table(tmp_path):
    base = {"mean_generated_tokens": 10.0, "samples_per_second": 2.0, "num_samples": 4}
    results = EvalResults(
        [
            StageResult(0, "", {"accuracy": 0.25, "max_latent_thoughts": 0, **base}, []),
            StageResult(1, "", {"accuracy": 0.75, "max_latent_thoughts": 2, **base}, []),
        ]
    )
    table = results.markdown_table().splitlines()
    assert table[0] == "| Stage | Accuracy | Generated tokens | Thoughts (max) | Samples/s | Samples |"
    assert table[3] == "| 1 | 75.0 | 10.0 | 2 | 2.00 | 4 |"
    overall = results.to_dict()["overall"]
    assert (overall["final_stage"], overall["best_stage"], overall["best_accuracy"]) == (1, 1, 0.75)

    # The thought and stop-head columns appear where some result has them.
    thoughts = {"max_latent_thoughts": 3, "mean_latent_thoughts": 2.5}
    results.add(
        StageResult(2, "", {"accuracy": 0.5, **thoughts, "stop_accuracy": 2 / 3, "mean_stop_thoughts": 2, **base}, [])
    )
    table = results.markdown_table().splitlines()
    assert table[0] == (
        "| Stage | Accuracy | Generated tokens | Thoughts (max) | Thoughts (mean) | Stop accuracy "
        "| Stop thoughts (mean) | Samples/s | Samples |"
    )
    assert table[3] == "| 1 | 75.0 | 10.0 | 2 | - | - | - | 2.00 | 4 |"
    assert table[4] == "| 2 | 50.0 | 10.0 | 3 | 2.50 | 66.7 | 2.00 | 2.00 | 4 |"
    results.plot(tmp_path / "plot.png")  # the stop accuracy of the stages that have one
    assert (tmp_path / "plot.png").read_bytes()[:4] == b"\x89PNG"


def image_records_and_processor(folder):
    """Five records of the synthetic task (rendered PNGs) and a processor for its tiny tiles."""
    from transformers import GotOcr2ImageProcessorPil

    from coconut.synthetic import SyntheticTaskConfig, build_synthetic_split, synthetic_tokenizer
    from processing_coconut_internvl import CoconutInternVLProcessor

    task = SyntheticTaskConfig()
    records = build_synthetic_split(folder, "validation", task, num_records=5)
    image_processor = GotOcr2ImageProcessorPil(
        size={"height": task.image_size, "width": task.image_size},
        max_patches=1,
        image_mean=[0.5] * 3,
        image_std=[0.5] * 3,
    )
    processor = CoconutInternVLProcessor(
        image_processor=image_processor, tokenizer=synthetic_tokenizer(task), image_seq_length=4
    )
    return records, processor


def test_image_records_through_the_processor(tmp_path):
    """Batched evaluation of image records (synthetic task, rendered PNGs) equals each record generated alone."""
    records, processor = image_records_and_processor(tmp_path / "data")
    tokenizer = processor.tokenizer
    config = tiny_coconut_config_for(tokenizer)
    model = random_model(CoconutInternVLForConditionalGeneration, config)
    curriculum = CurriculumConfig(c_thought=1, max_latent_stage=6)
    eval_config = CoconutEvalConfig(stage=2, batch_size=2, max_new_tokens=8, disable_tqdm=True)
    result = evaluate_stage(model, processor, records, curriculum, eval_config)

    for record, prediction in zip(records, result.predictions, strict=True):
        prompt = eval_prompt(processor, record, curriculum, eval_config)["prompt"]
        assert prompt.count("<image>") == 1 and prompt.endswith(START_LATENT + LATENT * 2 + END_LATENT)
        inputs = processor(text=[prompt], images=[[record["images"][0].convert("RGB")]], return_tensors="pt")
        suppressed = tokenizer.convert_tokens_to_ids([LATENT, START_LATENT, END_LATENT])  # as the evaluation does
        output = model.generate(**inputs, max_new_tokens=8, do_sample=False, suppress_tokens=suppressed)
        new = output[0, inputs["input_ids"].shape[1] :].tolist()
        count = count_generated_tokens(new, [tokenizer.eos_token_id], tokenizer.pad_token_id)
        assert prediction.id == record["id"]
        assert prediction.generation == tokenizer.decode(new[:count], skip_special_tokens=True)
        assert prediction.generated_tokens == count


STOP_CURRICULUM = CurriculumConfig(method="coconut", c_thought=1, max_latent_stage=3)
MAX_THOUGHTS = 4


def stop_records() -> list[dict]:
    """Six records of 1 to 4 steps (final-stage counts 1, 2, 3, 3, 1, 2) and of different lengths."""
    chain = ["is a rompus.", "Every rompus is a wumpus.", "Every wumpus is a yumpus.", "Every yumpus is a zumpus."]
    return [
        {
            "id": f"s{i}",
            "question": f"{name} is a {'big ' * i}rompus. Is {name} a zumpus?",
            "steps": [f"{name} {chain[0]}", *chain[1:]][: 1 + i % 4],
            "answer": f"{name} is a zumpus.",
        }
        for i, name in enumerate(NAMES)
    ]


def prompt_ids(tokenizer, record, block: str = "") -> torch.Tensor:
    return tokenizer(question_prompt(record, tokenizer) + block, return_tensors="pt")["input_ids"]


def planned_alone(model, tokenizer, record, **settings) -> int:
    """The stop head's count of the record's prompt alone: the hand computation the evaluation must reproduce."""
    input_ids = prompt_ids(tokenizer, record)
    return model.plan_latent_thoughts(input_ids, torch.ones_like(input_ids), **settings)[0]


@pytest.fixture(scope="module")
def stop_model():
    """A random tiny model with a sharp stop head; its config's threshold lies in a gap between the records' stop
    probabilities where their counts differ most, so that padding cannot flip a decision."""
    records = stop_records()
    tokenizer = train_tokenizer([r["question"] + " ".join(r["steps"]) + r["answer"] for r in records], vocab_size=300)
    config = tiny_coconut_config_for(tokenizer, latent_stop_head=True, max_latent_thoughts=MAX_THOUGHTS)
    model = random_model(CoconutInternVLForConditionalGeneration, config, seed=1)
    with torch.no_grad():
        model.latent_stop_head.weight.mul_(10.0)
    prompts = [(prompt_ids(tokenizer, record), None) for record in records]
    rows = stop_probability_rows(model, prompts, MAX_THOUGHTS)
    model.generation_config.latent_stop_threshold = splitting_threshold(rows, gap=1e-2)
    return model, tokenizer


def test_auto_evaluation_uses_the_stop_heads_counts(stop_model):
    model, tokenizer = stop_model
    records = stop_records()
    alone = [planned_alone(model, tokenizer, record) for record in records]
    assert len(set(alone)) >= 2, f"the test needs records that stop at different thoughts, got {alone}"
    config = CoconutEvalConfig(num_latent_thoughts="auto", batch_size=4, max_new_tokens=4, disable_tqdm=True)
    result = evaluate_stage(model, tokenizer, records, STOP_CURRICULUM, config)

    assert [p.num_latent_thoughts for p in result.predictions] == alone
    for record, prediction, k in zip(records, result.predictions, alone, strict=True):
        # The record generated alone with the head's count: what the batched, padded evaluation must reproduce.
        input_ids = prompt_ids(tokenizer, record, latent_block(k))
        special = dict(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        mask = torch.ones_like(input_ids)
        output = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=4, do_sample=False, **special)
        new = output[0, input_ids.shape[1] :].tolist()
        count = count_generated_tokens(new, [tokenizer.eos_token_id], tokenizer.pad_token_id)
        assert (prediction.generation, prediction.generated_tokens) == (
            tokenizer.decode(new[:count], skip_special_tokens=True),
            count,
        ), record["id"]

    final = [min(len(record["steps"]), STOP_CURRICULUM.max_latent_stage) for record in records]  # x c_thought 1
    assert final == [1, 2, 3, 3, 1, 2]
    stop_accuracy = sum(k == target for k, target in zip(alone, final, strict=True)) / len(records)
    assert 0 < stop_accuracy < 1, (alone, final)
    metrics = result.metrics
    assert metrics["stop_accuracy"] == pytest.approx(stop_accuracy)
    assert metrics["mean_latent_thoughts"] == metrics["mean_stop_thoughts"] == pytest.approx(fmean(alone))
    assert metrics["max_latent_thoughts"] == max(alone)

    # At a fixed stage the head is asked on the prompts without a block: the same counts, the same accuracy.
    staged = evaluate_stage(model, tokenizer, records, STOP_CURRICULUM, CoconutEvalConfig(stage=1, max_new_tokens=2))
    assert plan_stop_counts(model, tokenizer, records, STOP_CURRICULUM, CoconutEvalConfig(batch_size=4)) == {
        record["id"]: k for record, k in zip(records, alone, strict=True)
    }
    assert staged.metrics["stop_accuracy"] == metrics["stop_accuracy"]
    assert staged.metrics["mean_stop_thoughts"] == metrics["mean_stop_thoughts"]
    assert staged.metrics["mean_latent_thoughts"] == 1.0  # the stage's thoughts are generated, not the head's
    assert stop_head_metrics(model, tokenizer, records, CurriculumConfig(method="pause_as_thought"), config) == {}


def test_auto_settings_reach_the_stop_head(stop_model):
    model, tokenizer = stop_model
    records = stop_records()[:3]

    def thoughts(curriculum=STOP_CURRICULUM, **settings):
        config = CoconutEvalConfig(num_latent_thoughts="auto", max_new_tokens=1, disable_tqdm=True, **settings)
        return [
            p.num_latent_thoughts for p in evaluate_stage(model, tokenizer, records, curriculum, config).predictions
        ]

    assert thoughts(latent_stop_threshold=0.0) == [1, 1, 1]  # every probability reaches 0: one thought each
    assert thoughts(latent_stop_threshold=1.0, max_latent_thoughts=2) == [2, 2, 2]  # none reaches 1: the cap
    assert thoughts(latent_stop_threshold=1.0) == [MAX_THOUGHTS] * 3  # the model config's cap
    model.generation_config.max_latent_thoughts = None
    try:  # a model whose config sets no cap: the most the curriculum gives, max_latent_stage x c_thought
        assert thoughts(CurriculumConfig(c_thought=2, max_latent_stage=1), latent_stop_threshold=1.0) == [2, 2, 2]
    finally:
        model.generation_config.max_latent_thoughts = MAX_THOUGHTS


def test_final_stage_thoughts_follow_the_curriculum():
    record = {"steps": ["a", "b"]}
    assert final_stage_thoughts(record, CurriculumConfig(c_thought=2, max_latent_stage=3)) == 4
    assert final_stage_thoughts(record, CurriculumConfig(c_thought=2, max_latent_stage=3, pad_latent_to_max=True)) == 6
    assert final_stage_thoughts({"steps": list("abcde")}, CurriculumConfig(c_thought=2, max_latent_stage=3)) == 6


def test_bad_auto_settings_are_named(trained):
    assert CoconutEvalConfig(num_latent_thoughts="3").num_latent_thoughts == 3  # as the command line passes it
    for settings, message in (
        (dict(num_latent_thoughts="many"), "`num_latent_thoughts`='many' must be 'auto'"),
        (dict(num_latent_thoughts=-1), "`num_latent_thoughts` must be a whole number"),
        (dict(max_latent_thoughts=4), "`max_latent_thoughts`=4 applies only to `num_latent_thoughts`='auto'"),
        (dict(stage=2, latent_stop_threshold=0.3), "`latent_stop_threshold`=0.3 applies only to"),
        (dict(num_latent_thoughts="auto", max_latent_thoughts=0), "`max_latent_thoughts`=0 must be at least 1"),
        (dict(num_latent_thoughts="auto", latent_stop_threshold=1.5), "`latent_stop_threshold`=1.5 is not a prob"),
    ):
        with pytest.raises(ValueError, match=message):
            CoconutEvalConfig(**settings)
    with pytest.raises(ValueError, match="`method`='pause_as_thought': its `<|latent|>` tokens are learned pause"):
        check_eval_settings(CurriculumConfig(method="pause_as_thought"), CoconutEvalConfig(num_latent_thoughts="auto"))

    model, tokenizer, _ = trained  # no stop head: refused before any pass, with the fix
    config = CoconutEvalConfig(num_latent_thoughts="auto", disable_tqdm=True)
    with counting_passes(model) as calls, pytest.raises(ValueError, match="this model has no stop head.*--stage"):
        evaluate_stage(model, tokenizer, make_records(), COCONUT, config)
    assert calls == []


def test_image_records_with_the_stop_head(tmp_path):
    """The stop head reads image records too: `"auto"` and the planned counts equal each record's count alone."""
    records, processor = image_records_and_processor(tmp_path / "data")
    config = tiny_coconut_config_for(processor.tokenizer, latent_stop_head=True, max_latent_thoughts=3)
    model = random_model(CoconutInternVLForConditionalGeneration, config, seed=1)
    curriculum = CurriculumConfig(c_thought=1, max_latent_stage=6)
    prompts = []
    for record in records:
        text, images = [question_prompt(record, processor)], [[record["images"][0].convert("RGB")]]
        inputs = processor(text=text, images=images, return_tensors="pt")
        prompts.append((inputs["input_ids"], inputs["pixel_values"]))
    threshold = splitting_threshold(stop_probability_rows(model, prompts, 3))
    settings = dict(num_latent_thoughts="auto", latent_stop_threshold=threshold)
    eval_config = CoconutEvalConfig(**settings, batch_size=2, max_new_tokens=2, disable_tqdm=True)
    result = evaluate_stage(model, processor, records, curriculum, eval_config)
    alone = []
    for record in records:
        inputs = processor(
            text=[question_prompt(record, processor)],
            images=[[record["images"][0].convert("RGB")]],
            return_tensors="pt",
        )
        alone += model.plan_latent_thoughts(**inputs, latent_stop_threshold=threshold)
    assert len(set(alone)) > 1, alone
    assert [p.num_latent_thoughts for p in result.predictions] == alone
    assert plan_stop_counts(model, processor, records, curriculum, eval_config) == {
        record["id"]: k for record, k in zip(records, alone, strict=True)
    }
    final = [final_stage_thoughts(record, curriculum) for record in records]
    assert result.metrics["stop_accuracy"] == pytest.approx(fmean(k == n for k, n in zip(alone, final, strict=True)))
