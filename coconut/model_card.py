"""The `README.md` of a saved Coconut-InternVL repository, as a `huggingface_hub.ModelCard`: YAML metadata, quick start,
training, evaluation table, limitations, citations."""

from huggingface_hub import ModelCard, ModelCardData

from processing_coconut_internvl import thought_count


TAGS = ["coconut", "latent-reasoning", "internvl"]

# Jinja template rendered by `ModelCard.from_template`; `card_data` is the YAML front matter it writes.
TEMPLATE = """---
{{ card_data }}
---

# {{ model_name }}

[InternVL](https://huggingface.co/{{ base_model }}) with Coconut latent reasoning (Chain of Continuous Thought, Hao et al.
2024): between `<|start-latent|>` and `<|end-latent|>`, the input embedding of each `<|latent|>` token is the model's own
last hidden state at the position before it, so the model reasons in continuous space instead of writing every step.
The answer follows the marker `### `.

## Quick start

Needs `transformers>=5.24.0` (tested on 5.24.0 to 5.25.0), `torch` and `pillow`; the model, configuration and
processor code ship with the repository (`trust_remote_code=True`).

```python
import torch
from PIL import Image
from transformers import AutoModel, AutoProcessor

repo = "{{ repo_id }}"
model = AutoModel.from_pretrained(repo, trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained(repo, trust_remote_code=True)

image = Image.new("RGB", (448, 448), "white")  # your image here
prompt = processor.build_prompt("What is shown in the image?", num_images=1, num_latent_thoughts={{ num_latent_thoughts }})
inputs = processor(images=[image], text=prompt, return_tensors="pt")
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
    base_model: str,
    license: str,
    datasets: list[str] | None = None,
    num_latent_thoughts: int | None = 0,
    training: str = "",
    evaluation: list[dict] | None = None,
) -> ModelCard:
    """The card of one repository; `card.save(folder / "README.md")` writes it.

    Args:
        repo_id (`str`): the Hub id (or local path) the quick start loads.
        base_model (`str`): the InternVL checkpoint it came from (Hub id), for the metadata and the links.
        license (`str`): the licence identifier, e.g. `"mit"` (`coconut.convert.base_model_license` reads the base's).
        datasets (`list[str]`, *optional*): datasets for the metadata.
        num_latent_thoughts (`int`, *optional*): the thoughts the quick start asks for (the trained setting); `None`
            for a model trained without latent blocks (CoT, no-CoT, w/o thought), whose prompt has none.
        training (`str`): how the model was trained; a converted, untrained model says so when left empty.
        evaluation (`list[dict]`, *optional*): one dict per table row, the same keys in each, e.g.
            `[{"dataset": "ProsQA test", "thoughts": 6, "accuracy": 0.97}]`.
    """
    if not repo_id:
        raise ValueError("`repo_id` is empty: give the Hub id (or local path) the quick start should load.")
    if num_latent_thoughts is not None:
        thought_count(num_latent_thoughts)
    evaluation = evaluation or []
    columns = {tuple(row) for row in evaluation}
    if len(columns) > 1:
        raise ValueError(f"`evaluation` rows have different columns {sorted(columns)}; give every row the same keys.")
    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag="image-text-to-text",
        base_model=base_model,
        license=license,
        tags=TAGS,
        datasets=datasets or None,
    )
    return ModelCard.from_template(
        card_data,
        template_str=TEMPLATE,
        model_name=repo_id.split("/")[-1],
        repo_id=repo_id,
        base_model=base_model,
        num_latent_thoughts=num_latent_thoughts,
        training=training or CONVERTED_ONLY.format(base_model=base_model),
        evaluation_table=_markdown_table(evaluation) if evaluation else "",
    )


def _markdown_table(rows: list[dict]) -> str:
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [f"{row[c]:.4g}" if isinstance(row[c], float) else str(row[c]) for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


__all__ = ["build_model_card"]
