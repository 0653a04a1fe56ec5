"""A causal test of the continuous thoughts: answer the same questions with the fed-back thoughts replaced.

Thoughts that carry the reasoning lose accuracy when they are swapped; thoughts that are decoration do not (the test
of arXiv 2512.21711 for Coconut and 2602.22766 for vision-language latents). Every thought of a question is replaced:

- `zero`: by zero vectors;
- `noise`: by Gaussian noise of the same norm, thought by thought;
- `shuffle`: by the thoughts of another question of the batch with as many thoughts (the next such question, in a
  cycle; a question alone with its count keeps its own, and is counted in `unchanged`);
- `other_board`: by the thoughts the model has for the same question asked about another image (the next question's
  image in the batch): the text is the same, the board is not.

The questions are then answered greedily from the prompt with the replaced thoughts as input embeddings
([`coconut.thoughts.embeds_with_thoughts`]).
"""

import torch

from coconut.data import load_record_images
from coconut.metrics import count_generated_tokens
from coconut.thoughts import embeds_with_thoughts, thought_vectors


INTERVENTIONS = ("zero", "noise", "shuffle", "other_board")


def check_interventions(names) -> list[str]:
    names = list(names or [])
    unknown = [name for name in names if name not in INTERVENTIONS]
    if unknown:
        raise ValueError(f"`interventions`={names}: unknown {unknown}; choose from {list(INTERVENTIONS)}.")
    return names


def replaced_thoughts(
    name: str, thoughts: list[torch.Tensor], generator: torch.Generator, other_board=None
) -> tuple[list[torch.Tensor], int]:
    """The thoughts that replace `thoughts` (per row `(n_i, H)`) under intervention `name`, and how many rows kept
    their own (`shuffle` only). `other_board` is a callable giving the rows' thoughts with the images rolled."""
    if name == "zero":
        return [torch.zeros_like(row) for row in thoughts], 0
    if name == "noise":
        replaced = []
        for row in thoughts:
            noise = torch.randn(row.shape, generator=generator, dtype=torch.float32).to(row.device, row.dtype)
            replaced.append(noise * (row.norm(dim=-1, keepdim=True) / noise.norm(dim=-1, keepdim=True)))
        return replaced, 0
    if name == "shuffle":
        by_count = {}
        for index, row in enumerate(thoughts):
            by_count.setdefault(row.shape[0], []).append(index)
        replaced, unchanged = list(thoughts), 0
        for rows in by_count.values():
            unchanged += len(rows) == 1
            for position, index in enumerate(rows):
                replaced[index] = thoughts[rows[(position + 1) % len(rows)]]
        return replaced, unchanged
    if name == "other_board":
        return other_board(), 0
    raise ValueError(f"Unknown intervention {name!r}; choose from {list(INTERVENTIONS)}.")


def rolled_images(images: list[list]) -> list[list]:
    """Each row gets the next row's images (the last gets the first's): the same question about another board."""
    if len(images) < 2:
        raise ValueError(
            "`other_board` needs at least two questions with images in a batch, to take the board of another; "
            "raise the evaluation batch size."
        )
    return images[1:] + images[:1]


@torch.no_grad()
def intervened_generate(model, inputs: dict, name: str, generator: torch.Generator, other_inputs=None, **kwargs):
    """Greedy `generate` from `inputs` with every fed-back thought replaced under `name`; the new tokens `(B, N)` and
    the number of rows that kept their own thoughts. `other_inputs` (for `other_board`) are the same prompts with the
    images rolled ([`rolled_images`])."""
    thoughts = thought_vectors(model, inputs)

    def other_board():
        if other_inputs is None:
            raise ValueError("`other_board` needs `other_inputs`: the same prompts with another question's images.")
        if other_inputs["input_ids"].shape != inputs["input_ids"].shape:
            raise ValueError(
                f"`other_board`: the prompts with the other images are {tuple(other_inputs['input_ids'].shape)} "
                f"tokens, not {tuple(inputs['input_ids'].shape)}: the images must give as many image tokens."
            )
        return thought_vectors(model, other_inputs)

    replaced, unchanged = replaced_thoughts(name, thoughts, generator, other_board)
    embeds = embeds_with_thoughts(model, inputs, replaced)
    new_tokens = model.generate(inputs_embeds=embeds, attention_mask=inputs["attention_mask"], **kwargs)
    return new_tokens, unchanged


def processed(processor, text: list[str], images: list[list], device) -> dict:
    """The processor's left-padded batch of `text` with each row's `images`."""
    flat = [image for row in images for image in row]
    image_kwargs = {"images": flat} if flat else {}
    batch = processor(text=text, **image_kwargs, padding=True, padding_side="left", return_tensors="pt")
    return batch.to(device)


def evaluate_interventions(
    model, processor, records, prompts: list[str], names, max_new_tokens: int, batch_size: int = 100, seed: int = 0
) -> dict[str, dict]:
    """Accuracy of `records` answered from `prompts` (their evaluation prompts, with latent blocks) under each
    intervention: `{name: {"accuracy", "unchanged", "num_samples"}}`. Batches follow the records' order."""
    from coconut.generation import Generation
    from coconut.scoring import score_generations

    tokenizer = getattr(processor, "tokenizer", processor)
    eos_ids = model.generation_config.eos_token_id
    eos_ids = [eos_ids] if isinstance(eos_ids, int) else list(eos_ids or [tokenizer.eos_token_id])
    pad_token_id = tokenizer.pad_token_id
    kwargs = dict(do_sample=False, num_beams=1, max_new_tokens=max_new_tokens, eos_token_id=eos_ids)
    kwargs["pad_token_id"] = pad_token_id
    names = check_interventions(names)
    if "other_board" in names and not all(record.get("images") for record in records):
        raise ValueError(
            "`other_board` asks the same question about another image, but some records have no image (a text-only "
            "dataset?). Drop `other_board` from the interventions."
        )
    results = {}
    for name in names:
        generator = torch.Generator().manual_seed(seed)
        generations, unchanged = {}, 0
        for start in range(0, len(records), batch_size):
            rows = list(range(start, min(start + batch_size, len(records))))
            images = [load_record_images(records[i], i) for i in rows]
            text = [prompts[i] for i in rows]

            inputs = processed(processor, text, images, model.device)
            other = processed(processor, text, rolled_images(images), model.device) if name == "other_board" else None
            new_tokens, kept = intervened_generate(model, inputs, name, generator, other, **kwargs)
            unchanged += kept
            for i, tokens in zip(rows, new_tokens.tolist(), strict=True):
                count = count_generated_tokens(tokens, eos_ids, pad_token_id)
                ended = count > 0 and tokens[count - 1] in eos_ids
                answer_text = tokenizer.decode(tokens[:count], skip_special_tokens=True)
                generations[records[i]["id"]] = Generation(answer_text, count, None, ended)
        metrics, _ = score_generations(records, generations)
        results[name] = {"accuracy": metrics["accuracy"], "unchanged": unchanged, "num_samples": len(records)}
    return results


__all__ = [
    "INTERVENTIONS",
    "check_interventions",
    "evaluate_interventions",
    "intervened_generate",
    "replaced_thoughts",
    "rolled_images",
]
