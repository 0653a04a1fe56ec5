"""The `README.md` of a saved Coconut-InternVL repository: YAML metadata, quick start, training, evaluation, citations."""

from dataclasses import dataclass, field

import yaml


QUICK_START = """```python
import torch
from PIL import Image
from transformers import AutoModel, AutoProcessor

repo = "{repo_id}"
model = AutoModel.from_pretrained(repo, trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained(repo, trust_remote_code=True)

image = Image.new("RGB", (448, 448), "white")  # your image here
prompt = processor.build_prompt("What is shown in the image?", num_images=1, num_latent_thoughts={num_latent_thoughts})
inputs = processor(images=[image], text=prompt, return_tensors="pt")
with torch.no_grad():
    output_ids = model.generate(**inputs, max_new_tokens=64, do_sample=False)
completion = processor.decode(output_ids[0, inputs["input_ids"].shape[1]:], skip_special_tokens=False)
print(completion)
print("answer:", processor.decode_answer(completion))
```"""

CITATIONS = """```bibtex
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
```"""


@dataclass
class ModelCardData:
    """What the card says about one repository.

    `evaluation` maps a column name to a value for each row, e.g.
    `[{"dataset": "ProsQA test", "thoughts": 6, "accuracy": 0.97}]`; an empty list renders no table.
    """

    repo_id: str
    base_model: str
    license: str
    datasets: list[str] = field(default_factory=list)
    num_latent_thoughts: int = 0
    training: str = ""
    evaluation: list[dict] = field(default_factory=list)
    tags: list[str] = field(default_factory=lambda: ["coconut", "latent-reasoning", "internvl"])

    def validate(self):
        if not self.repo_id:
            raise ValueError("`repo_id` is empty: give the Hub id (or local path) the quick start should load.")
        if self.num_latent_thoughts < 0:
            raise ValueError(f"`num_latent_thoughts`={self.num_latent_thoughts} must be 0 or more.")
        columns = {tuple(row) for row in self.evaluation}
        if len(columns) > 1:
            raise ValueError(
                f"`evaluation` rows have different columns {sorted(columns)}; give every row the same keys."
            )


def _table(rows: list[dict]) -> str:
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [f"{row[c]:.4g}" if isinstance(row[c], float) else str(row[c]) for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render_model_card(card: ModelCardData) -> str:
    """The repository's `README.md`: YAML front matter the Hub reads, then the card."""
    card.validate()
    metadata = {
        "library_name": "transformers",
        "pipeline_tag": "image-text-to-text",
        "base_model": card.base_model,
        "license": card.license,
        "tags": card.tags,
    }
    if card.datasets:
        metadata["datasets"] = card.datasets
    training = card.training or (
        f"Converted from [`{card.base_model}`](https://huggingface.co/{card.base_model}) by `convert_to_coconut.py`: "
        "the tokens `<|start-latent|>`, `<|end-latent|>` and `<|latent|>` were added, and their embedding rows (input "
        "and LM head) set to the mean of the existing rows. It has not been trained with the Coconut curriculum yet, "
        "so it answers like the base model and its latent thoughts carry no trained meaning."
    )
    sections = [
        f"---\n{yaml.safe_dump(metadata, sort_keys=False)}---",
        f"# {card.repo_id.split('/')[-1]}",
        f"[InternVL]({'https://huggingface.co/' + card.base_model}) with Coconut latent reasoning (Chain of Continuous "
        "Thought, Hao et al. 2024): between `<|start-latent|>` and `<|end-latent|>`, the input embedding of each "
        "`<|latent|>` token is the model's own last hidden state at the position before it, so the model reasons in "
        "continuous space instead of writing every step. The answer follows the marker `### `.",
        "## Quick start",
        "Needs `transformers>=5.24`, `torch` and `pillow`; the model, configuration and processor code ship with the "
        "repository (`trust_remote_code=True`).",
        QUICK_START.format(repo_id=card.repo_id, num_latent_thoughts=card.num_latent_thoughts),
        "## Training",
        training,
    ]
    if card.evaluation:
        sections += ["## Evaluation", _table(card.evaluation)]
    sections += [
        "## Limitations",
        "- Latent thoughts are computed one forward pass per thought, so a prompt with k thoughts costs k extra "
        "language-model passes; gradient checkpointing is not supported when training with thoughts.\n"
        "- The thoughts are continuous vectors: they cannot be read as text, and their meaning is learnt only on the "
        "tasks of the training curriculum.\n"
        "- Inherits the base InternVL model's limitations and biases.",
        "## Citation",
        CITATIONS,
    ]
    return "\n\n".join(sections) + "\n"


__all__ = ["ModelCardData", "render_model_card"]
