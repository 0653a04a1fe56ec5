"""The thought reader: decode each continuous thought of a question into text, and score it against the gold step.

Step `k` of a question (from 1) is replaced by thoughts `(k - 1) * c .. k * c - 1`; the reader feeds their vectors as
input embeddings to a decoder and lets it write greedily up to the first newline. The decoder is the step decoder of
a run trained with `--step_supervision` (`<model>/thought_decoder`, a causal LM that learnt exactly this), or else the
model's own language model and LM head (which were never taught to read thoughts: a lower bound).

A decoded thought *names the right cell* when the last cell it names (`B2` in "B3 points up to B2.") is the last cell
the gold step names: the cell after `k` arrows. For steps that name no cell, the decoded text must equal the step.

```python
>>> from coconut.thought_reader import load_thought_decoder, read_thoughts
>>> decoder = load_thought_decoder("outputs/run")  # outputs/run/thought_decoder, or the model's own head
>>> readings = read_thoughts(model, processor, decoder, records, curriculum, stage=5)
>>> readings[0]["thoughts"][0]  # {"step": 1, "text": "B3 points up to B2.", "gold": "...", "right_cell": True}
```
"""

import re
from pathlib import Path
from statistics import fmean

import torch
from transformers import AutoModelForCausalLM

from coconut.curriculum import build_eval_prompt
from coconut.data import load_record_images
from coconut.step_supervision import THOUGHT_DECODER_DIR
from coconut.thoughts import thought_vectors


CELL = re.compile(r"\b[A-Z][0-9]+\b")


def load_thought_decoder(model_dir: str | Path, model=None, device=None):
    """`<model_dir>/thought_decoder` (a run trained with `--step_supervision`); without one, the model's own language
    model and LM head as a causal LM (`model` required then). Returns `(decoder, source)`."""
    folder = Path(model_dir) / THOUGHT_DECODER_DIR
    if folder.is_dir():
        decoder = AutoModelForCausalLM.from_pretrained(folder).eval()
        return decoder.to(device) if device is not None else decoder, "step decoder"
    if model is None:
        raise ValueError(
            f"{str(model_dir)!r} has no {THOUGHT_DECODER_DIR}/ (the run was trained without `--step_supervision`): "
            "pass the model to read its thoughts with its own language model and LM head."
        )
    return own_head_decoder(model), "the model's own LM head"


def own_head_decoder(model):
    """A causal LM sharing `model`'s language model and LM head (no copy)."""
    decoder = AutoModelForCausalLM.from_config(model.config.text_config)
    decoder.model = model.model.language_model
    decoder.lm_head = model.get_output_embeddings()
    return decoder.to(model.device).eval()


def names_right_cell(decoded: str, gold: str) -> bool:
    """Whether `decoded` ends at the cell `gold` ends at (the last cell each names); without cells, equal texts."""
    gold_cells = CELL.findall(gold)
    if not gold_cells:
        return decoded.strip() == gold.strip()
    decoded_cells = CELL.findall(decoded)
    return bool(decoded_cells) and decoded_cells[-1] == gold_cells[-1]


@torch.no_grad()
def decode_thoughts(decoder, tokenizer, vectors: torch.Tensor, max_new_tokens: int = 24) -> list[str]:
    """Greedy text of each group of thought vectors `(S, c, H)`, cut at the first newline."""
    if vectors.shape[0] == 0:
        return []
    vectors = vectors.to(decoder.device, decoder.dtype)
    attention_mask = torch.ones(vectors.shape[:2], dtype=torch.long, device=vectors.device)
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    output_ids = decoder.generate(
        inputs_embeds=vectors,
        attention_mask=attention_mask,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    texts = tokenizer.batch_decode(output_ids, skip_special_tokens=True)
    return [text.split("\n")[0].strip() for text in texts]


def read_thoughts(model, processor, decoder, records, curriculum, stage: int, batch_size: int = 50) -> list[dict]:
    """Decode every thought of each record's evaluation prompt at `stage`: per record `{"id", "thoughts": [{"step",
    "text", "gold", "right_cell"}, ...]}`, one entry per replaced step."""
    tokenizer = getattr(processor, "tokenizer", processor)
    c = curriculum.c_thought
    readings = []
    for start in range(0, len(records), batch_size):
        batch = [records[i] for i in range(start, min(start + batch_size, len(records)))]
        prompts = [build_eval_prompt(record, stage, tokenizer, curriculum)["prompt"] for record in batch]
        images = [image for i, record in enumerate(batch) for image in load_record_images(record, start + i)]
        inputs = processor(
            text=prompts, **({"images": images} if images else {}), padding=True, padding_side="left",
            return_tensors="pt",
        ).to(model.device)  # fmt: skip
        thoughts = thought_vectors(model, inputs)
        groups, owners = [], []
        for row, (record, vectors) in enumerate(zip(batch, thoughts, strict=True)):
            steps = list(record.get("steps") or [])
            for k in range(min(len(steps), vectors.shape[0] // c)):
                groups.append(vectors[k * c : (k + 1) * c])
                owners.append((row, k))
        texts = decode_thoughts(decoder, tokenizer, torch.stack(groups) if groups else torch.zeros(0, c, 1))
        per_row = [[] for _ in batch]
        for (row, k), text in zip(owners, texts, strict=True):
            gold = batch[row]["steps"][k]
            per_row[row].append(
                {"step": k + 1, "text": text, "gold": gold, "right_cell": names_right_cell(text, gold)}
            )
        readings += [{"id": record.get("id"), "thoughts": rows} for record, rows in zip(batch, per_row, strict=True)]
    return readings


def reader_scores(readings: list[dict]) -> dict:
    """`{"right_cell": share over every thought, "right_cell_by_step": {k: share}, "num_thoughts": n}`."""
    by_step = {}
    for reading in readings:
        for thought in reading["thoughts"]:
            by_step.setdefault(thought["step"], []).append(thought["right_cell"])
    every = [hit for hits in by_step.values() for hit in hits]
    return {
        "right_cell": fmean(every) if every else None,
        "right_cell_by_step": {str(k): fmean(hits) for k, hits in sorted(by_step.items())},
        "num_thoughts": len(every),
    }


__all__ = ["decode_thoughts", "load_thought_decoder", "names_right_cell", "read_thoughts", "reader_scores"]
