"""The `README.md` of a saved Coconut-InternVL repository, as a `huggingface_hub.ModelCard`: YAML metadata (with the
results as `model-index`, which the Hub shows), a quick start on the task's own kind of input, training, evaluation
table, limitations, citations."""

from dataclasses import asdict
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData, hf_hub_download
from huggingface_hub.errors import EntryNotFoundError

from coconut.data import load_record_images
from coconut.hub import is_local_path
from processing_coconut_internvl import thought_count


TAGS = ["coconut", "latent-reasoning", "internvl"]

# This repository's own licence (LICENSE, and the metadata of its README.md): a model trained from scratch takes it.
REPOSITORY_LICENSE = "mit"

# Jinja template rendered by `ModelCard.from_template`; `card_data` is the YAML front matter it writes.
TEMPLATE = """---
{{ card_data }}
---

# {{ model_name }}

{% if base_model %}[InternVL](https://huggingface.co/{{ base_model }}){% else %}An InternVL-shaped model trained from scratch{% endif %} with Coconut latent reasoning (Chain of Continuous Thought, Hao et al.
2024): between `<|start-latent|>` and `<|end-latent|>`, the input embedding of each `<|latent|>` token is the model's own
last hidden state at the position before it, so the model reasons in continuous space instead of writing every step.
The answer follows the marker `### `.

## Quick start

Needs `transformers>=5.24.0` (tested on 5.24.0 to 5.25.0), `torch` and `pillow`; the model, configuration and
processor code ship with the repository (`trust_remote_code=True`).

```python
import torch
{%- if not example_text_only %}
from PIL import Image
{%- endif %}
from transformers import AutoModel, AutoProcessor
{%- if example_images %}
from transformers.utils import cached_file
{%- endif %}

repo = "{{ repo_id }}"
model = AutoModel.from_pretrained(repo, trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained(repo, trust_remote_code=True)
{% if example_images %}
# A question of the training task, with its image(s), saved in the repository
images = [Image.open(cached_file(repo, name)) for name in {{ example_images }}]
question = {{ question }}
{%- elif example_text_only %}
question = {{ question }}  # a question of the training task (text only)
images = []
{%- else %}
images = [Image.new("RGB", (448, 448), "white")]  # your image here
question = {{ question }}
{%- endif %}
prompt = processor.build_prompt(question, num_images=len(images), num_latent_thoughts={{ num_latent_thoughts }})
inputs = processor(images=images or None, text=prompt, return_tensors="pt")
with torch.no_grad():
    output_ids = model.generate(**inputs, max_new_tokens=64, do_sample=False)
completion = processor.decode(output_ids[0, inputs["input_ids"].shape[1]:], skip_special_tokens=False)
print(completion)
print("answer:", processor.decode_answer(completion))
```

## Training

{{ training }}
{% if evaluation_table %}
## Evaluation

{{ evaluation_table }}
{% endif %}
## Limitations

- Latent thoughts are computed one forward pass per thought, so a prompt with k thoughts costs k extra language-model
  passes.
- The thoughts are continuous vectors: they cannot be read as text, and their meaning is learnt only on the tasks of
  the training curriculum.
- Inherits the base InternVL model's limitations and biases.

## Citation

```bibtex
@article{hao2024coconut,
  title   = {Training Large Language Models to Reason in a Continuous Latent Space},
  author  = {Hao, Shibo and Sukhbaatar, Sainbayar and Su, DiJia and Li, Xian and Hu, Zhiting and Weston, Jason and Tian, Yuandong},
  journal = {arXiv preprint arXiv:2412.06769},
  year    = {2024}
}

@article{zhu2025internvl3,
  title   = {InternVL3: Exploring Advanced Training and Test-Time Recipes for Open-Source Multimodal Models},
  author  = {Zhu, Jinguo and Wang, Weiyun and Chen, Zhe and others},
  journal = {arXiv preprint arXiv:2504.10479},
  year    = {2025}
}
```
"""

CONVERTED_ONLY = (
    "Converted from [`{base_model}`](https://huggingface.co/{base_model}) by `convert_to_coconut.py`: the tokens "
    "`<|start-latent|>`, `<|end-latent|>` and `<|latent|>` were added, and their embedding rows (input and LM head) set "
    "to the mean of the existing rows. It has not been trained with the Coconut curriculum yet, so it answers like the "
    "base model and its latent thoughts carry no trained meaning."
)


def build_model_card(
    repo_id: str,
    base_model: str | None,
    license: str,
    datasets: list[str] | None = None,
    num_latent_thoughts: int | None = 0,
    training: str = "",
    evaluation: list[dict] | None = None,
    eval_results: list[EvalResult] | None = None,
    example: dict | None = None,
) -> ModelCard:
    """The card of one repository; `card.save(folder / "README.md")` writes it.

    Args:
        repo_id (`str`): the Hub id (or local path) the quick start loads.
        base_model (`str`, *optional*): the InternVL checkpoint it came from (Hub id), for the metadata and the links;
            `None` for a model trained from scratch (the metadata then has no `base_model`).
        license (`str`): the licence identifier, e.g. `"mit"` ([`model_license`] reads the base's).
        datasets (`list[str]`, *optional*): datasets for the metadata.
        num_latent_thoughts (`int`, *optional*): the thoughts the quick start asks for (the trained setting); `None`
            for a model trained without latent blocks (CoT, no-CoT, w/o thought), whose prompt has none.
        training (`str`): how the model was trained; a converted, untrained model says so when left empty.
        evaluation (`list[dict]`, *optional*): one dict per table row, the same keys in each, e.g.
            `[{"dataset": "ProsQA test", "thoughts": 6, "accuracy": 0.97}]`.
        eval_results (`list[EvalResult]`, *optional*): the results for the `model-index` metadata (see
            [`accuracy_results`]).
        example (`dict`, *optional*): a record of the training task; the quick start asks its question, with its
            images (saved beside the card by [`save_example_images`]) or none for a text-only record. Without it,
            the quick start asks about a blank image.
    """
    if not repo_id:
        raise ValueError("`repo_id` is empty: give the Hub id (or local path) the quick start should load.")
    if num_latent_thoughts is not None:
        thought_count(num_latent_thoughts)
    if not training and not base_model:
        raise ValueError("A card without `training` describes a converted model: give its `base_model`.")
    evaluation = evaluation or []
    columns = {tuple(row) for row in evaluation}
    if len(columns) > 1:
        raise ValueError(f"`evaluation` rows have different columns {sorted(columns)}; give every row the same keys.")
    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag="image-text-to-text",
        base_model=base_model or None,
        license=license,
        tags=TAGS,
        datasets=datasets or None,
        model_name=repo_id.split("/")[-1] if eval_results else None,
        eval_results=eval_results or None,
    )
    images = example_image_names(example) if example is not None else []
    question = example["question"] if example is not None else "What is shown in the image?"
    return ModelCard.from_template(
        card_data,
        template_str=TEMPLATE,
        model_name=repo_id.split("/")[-1],
        repo_id=repo_id,
        base_model=base_model,
        num_latent_thoughts=num_latent_thoughts,
        training=training or CONVERTED_ONLY.format(base_model=base_model),
        evaluation_table=_markdown_table(evaluation) if evaluation else "",
        example_images=images,
        example_text_only=example is not None and not images,
        question=repr(question),
    )


def model_license(base_model: str | None, revision: str | None = None) -> str:
    """The licence a card states: the `license` in the metadata of `base_model`'s README.md (a local folder, or a Hub
    id at `revision`: only that file is read), or this repository's own, [`REPOSITORY_LICENSE`], for a model trained
    from scratch."""
    if base_model is None:
        return REPOSITORY_LICENSE
    try:
        if is_local_path(base_model):
            readme = Path(base_model).expanduser() / "README.md"
            license = ModelCard.load(readme).data.license if readme.is_file() else None
        else:
            license = ModelCard.load(hf_hub_download(base_model, "README.md", revision=revision)).data.license
    except EntryNotFoundError:
        license = None
    if license is None:
        raise ValueError(
            f"The README.md of {base_model} states no `license`, and the card must state the base model's: add it to "
            "that README's YAML metadata (`license: mit` for InternVL3), or pass `--license` to convert_to_coconut.py."
        )
    return license


def write_model_card(folder: str | Path, card: ModelCard, example: dict | None = None) -> Path:
    """Write `card` as `folder/README.md`, with the images of its `example` record (its quick start loads them)."""
    path = Path(folder) / "README.md"
    card.save(path)
    if example is not None:
        save_example_images(folder, example)
    return path


def trained_model_card(
    trainer,
    dataset: str,
    validation_split: str,
    task,
    base_model: str | None,
    license: str,
    example: dict,
    test=None,
    merge_adapter: bool = True,
) -> tuple[dict, ModelCard]:
    """The training record (`coconut_training.json`) and card of the model `trainer` trained on `dataset`: the stage
    reached, not the one planned; the evaluations after each stage, then the held-out `test` result if there is one
    (a [`coconut.results.StageResult`]); `task` is the bundled task's settings, `None` for another dataset.

    With LoRA and `merge_adapter`, the quick start loads `<output_dir>/merged` (or the Hub id, where the merged model
    is pushed): the adapter alone loads onto the base model without the modules the run added or changed outside
    LoRA (a stop head, a rescaled final norm)."""
    args = trainer.args
    lora = hasattr(trainer.accelerator.unwrap_model(trainer.model), "merge_and_unload")
    record = {**trainer.training_record(), "dataset": dataset, "task": asdict(task) if task else None}
    stopped = (
        f" It stopped at step {record['global_step']} of {record['planned_steps']} (`max_steps`)."
        if record["global_step"] < record["planned_steps"]
        else ""
    )
    training = (
        f"Trained by `train_sft.py` with the Coconut curriculum: method `{args.method}`, c_thought {args.c_thought}, "
        f"{args.epochs_per_stage} epochs per stage, max latent stage {args.max_latent_stage}, "
        f"{record['num_train_epochs']} epochs.{stopped} The saved model reached stage {record['stage']} and is "
        f"evaluated with up to {record['num_latent_thoughts']} continuous thoughts per question."
    )
    local_folder = str(args.output_dir)
    if lora and merge_adapter:
        local_folder = str(Path(args.output_dir) / "merged")
        training += (
            " LoRA adapters were trained and merged into the full model that this card loads; the run's output folder "
            "also keeps the adapter, which alone lacks what the run trained outside LoRA."
        )
    elif lora:
        training += (
            f" This folder holds the LoRA adapter; `from_pretrained` loads it onto its base model {base_model}."
        )
    rows = [card_row(result.stage, result.metrics) for result in trainer.eval_results.results]
    if test is not None:
        rows.append(card_row(f"{test.stage}, held-out test ({len(test.predictions)} questions)", test.metrics))
    card = build_model_card(
        repo_id=args.hub_model_id or local_folder,
        base_model=base_model,
        license=license,
        datasets=[dataset],
        num_latent_thoughts=record["num_latent_thoughts"] if args.curriculum.uses_markers else None,
        training=training,
        evaluation=rows,
        eval_results=run_results(dataset, validation_split, trainer.eval_results.results, test),
        example=example,
    )
    return record, card


def card_row(stage: int | str, metrics: dict) -> dict:
    """One row of the card's evaluation table."""
    row = {
        "stage": stage,
        "thoughts (max)": metrics.get("max_latent_thoughts", "-"),
        "thoughts (mean)": metrics.get("mean_latent_thoughts", "-"),
        "accuracy": metrics["accuracy"],
        "generated tokens": metrics["mean_generated_tokens"],
    }
    if "stop_accuracy" in metrics:  # a model with the stop head: how often it chose the final stage's count
        row["stop head: right count"] = metrics["stop_accuracy"]
    return row


def accuracy_results(dataset: str, results: list[tuple[str, float]]) -> list[EvalResult]:
    """`model-index` entries of exact-match accuracies: `results` holds `(split, accuracy)` pairs (0 to 1)."""
    return [
        EvalResult(
            task_type="image-text-to-text",
            dataset_type=dataset,
            dataset_name=dataset,
            dataset_split=split,
            metric_type="accuracy",
            metric_name="Exact-match accuracy",
            metric_value=round(accuracy, 4),
        )
        for split, accuracy in results
    ]


def run_results(dataset: str, validation_split: str, stage_results: list, test=None) -> list[EvalResult]:
    """`model-index` entries of a training run: the last evaluation after a stage (the saved model's) on
    `validation_split`, and the held-out `test` result if there is one (both [`coconut.results.StageResult`])."""
    pairs = [(validation_split, stage_results[-1].metrics["accuracy"])] if stage_results else []
    if test is not None:
        pairs.append(("test", test.metrics["accuracy"]))
    return accuracy_results(dataset, pairs)


def example_image_names(record: dict) -> list[str]:
    """The file names the images of the quick start's example record have in the repository."""
    return [f"example_{index}.png" for index in range(len(record.get("images") or []))]


def save_example_images(folder: str | Path, record: dict) -> None:
    """Save the images of the quick start's example record into the repository `folder`."""
    for image, name in zip(load_record_images(record), example_image_names(record), strict=True):
        image.save(Path(folder) / name)


def _markdown_table(rows: list[dict]) -> str:
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [f"{row[c]:.4g}" if isinstance(row[c], float) else str(row[c]) for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


CARD_TABLE_START, CARD_TABLE_END = "<!-- coconut-eval-results -->", "<!-- /coconut-eval-results -->"


def section_markers(section: str) -> tuple[str, str]:
    """The HTML comments around a card section that the scripts rewrite."""
    return f"<!-- coconut-{section} -->", f"<!-- /coconut-{section} -->"


def write_table_into_card(
    card_path: str | Path, table: str, heading: str = "## Evaluation", section: str = "eval-results"
) -> str:
    """Put `table` into the model card at `card_path`, replacing the table an earlier evaluation wrote there.

    The table sits between two HTML comments named after `section`, so re-evaluating replaces it and other sections
    stay; a card without them gets a `heading` section appended. Returns the new card text.
    """
    start, end = (CARD_TABLE_START, CARD_TABLE_END) if section == "eval-results" else section_markers(section)
    card_path = Path(card_path)
    if not card_path.is_file():
        raise ValueError(f"Model card {str(card_path)!r} does not exist; save the model (with its README.md) first.")
    card = card_path.read_text()
    block = f"{start}\n{table.rstrip()}\n{end}"
    if start in card and end in card:
        before, rest = card.split(start, 1)
        after = rest.split(end, 1)[1]
        card = before + block + after
    else:
        card = card.rstrip() + f"\n\n{heading}\n\n{block}\n"
    card_path.write_text(card)
    return card


__all__ = [
    "CARD_TABLE_END",
    "CARD_TABLE_START",
    "REPOSITORY_LICENSE",
    "accuracy_results",
    "build_model_card",
    "card_row",
    "example_image_names",
    "model_license",
    "run_results",
    "save_example_images",
    "trained_model_card",
    "write_model_card",
    "write_table_into_card",
]
