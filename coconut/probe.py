"""Latent probe: what each continuous thought of a prompt encodes, read through the LM head and the token embeddings.

As in the paper's analysis (Hao et al. 2024, section 5), a thought is decoded by feeding its vector to the LM head:
the top tokens show which reasoning node it "names". The cosine similarity to the nearest input-token embeddings is a
second view: how close the thought is to the embedding the model would have read for a token.

The thought fed at latent position `p` is the final-layer hidden state (after the final norm) at `p - 1`, which a
forward pass with `output_hidden_states=True` returns as `hidden_states[-1][:, p - 1]`.

Run it as a module:

```bash
python -m coconut.probe --model outputs/demo --question "Is Tom a wumpus or a yumpus?" --num_latent_thoughts 6
```
"""

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F


logger = logging.getLogger(__name__)


@dataclass
class TokenScore:
    """A vocabulary token and its score (LM-head probability, or cosine similarity)."""

    token: str
    token_id: int
    score: float


@dataclass
class ThoughtProbe:
    """One continuous thought: its index in the block, its column in the prompt, and what it maps to."""

    thought: int
    position: int
    top_tokens: list[TokenScore]
    nearest_embeddings: list[TokenScore]


def probe_vectors(model, tokenizer, vectors: torch.Tensor, top_k: int = 5) -> list[tuple[list, list]]:
    """For each vector, the `top_k` tokens of the LM head (softmax probabilities) and of cosine similarity to the
    input embeddings.

    Args:
        model (`CoconutInternVLForConditionalGeneration`): gives `lm_head` and the input embeddings.
        tokenizer (`PreTrainedTokenizerBase`): turns ids into token strings.
        vectors (`torch.Tensor` of shape `(num_vectors, hidden_size)`): thoughts, or any hidden-state vectors.
        top_k (`int`): how many tokens to keep per view.

    Returns:
        `[(top_tokens, nearest_embeddings), ...]`, one pair of `TokenScore` lists per vector, best first.
    """
    vocab_size = model.lm_head.weight.shape[0]
    if not 1 <= top_k <= vocab_size:
        raise ValueError(f"`top_k`={top_k} must be between 1 and the vocabulary size {vocab_size}.")
    with torch.no_grad():
        probabilities = model.lm_head(vectors).float().softmax(dim=-1)  # (N, V)
        embeddings = model.get_input_embeddings().weight.float()  # (V', H)
        cosine = F.normalize(vectors.float(), dim=-1) @ F.normalize(embeddings, dim=-1).T  # (N, V')
        top_probabilities, top_ids = probabilities.topk(top_k, dim=-1)
        top_cosine, cosine_ids = cosine.topk(min(top_k, cosine.shape[-1]), dim=-1)

    def scored(ids, scores):
        return [
            TokenScore(tokenizer.convert_ids_to_tokens(i), i, s)
            for i, s in zip(ids.tolist(), scores.tolist(), strict=True)
        ]

    return [
        (scored(top_ids[n], top_probabilities[n]), scored(cosine_ids[n], top_cosine[n])) for n in range(len(vectors))
    ]


def thought_vectors(model, input_ids: torch.LongTensor, **inputs) -> tuple[torch.Tensor, list[int]]:
    """The continuous thoughts of one prompt and their columns.

    Args:
        input_ids (`torch.LongTensor` of shape `(1, sequence_length)`): one prompt with its latent block.
        inputs: the other model inputs (`attention_mask`, `pixel_values`).

    Returns:
        `(thoughts, positions)`: `(num_thoughts, hidden_size)` and the `<|latent|>` columns they fill.
    """
    latent_token_id = model.config.latent_token_id
    if input_ids.shape[0] != 1:
        raise ValueError(f"`input_ids` holds {input_ids.shape[0]} prompts; probe one prompt at a time.")
    if latent_token_id is None:
        raise ValueError("`config.latent_token_id` is None: this model has no continuous thoughts to probe.")
    positions = (input_ids[0] == latent_token_id).nonzero().flatten().tolist()
    if not positions:
        raise ValueError(
            f"The prompt has no `<|latent|>` token (id {latent_token_id}); build it with `num_latent_thoughts` > 0."
        )
    with torch.no_grad():
        outputs = model(input_ids=input_ids, output_hidden_states=True, **inputs)
    last_hidden = outputs.hidden_states[-1][0]  # (T, H), after the final norm
    return last_hidden[[p - 1 for p in positions]], positions


def probe_thoughts(model, tokenizer, input_ids: torch.LongTensor, top_k: int = 5, **inputs) -> list[ThoughtProbe]:
    """What each continuous thought of one prompt maps to; see [`probe_vectors`] and [`thought_vectors`]."""
    thoughts, positions = thought_vectors(model, input_ids, **inputs)
    probes = probe_vectors(model, tokenizer, thoughts, top_k)
    return [
        ThoughtProbe(index, position, top, nearest)
        for index, (position, (top, nearest)) in enumerate(zip(positions, probes, strict=True))
    ]


def format_probes(probes: list[ThoughtProbe]) -> str:
    """A readable table: one line per thought, LM-head tokens with probabilities, nearest embeddings with cosines."""
    lines = []
    for probe in probes:
        top = ", ".join(f"{t.token!r} {t.score:.2f}" for t in probe.top_tokens)
        nearest = ", ".join(f"{t.token!r} {t.score:.2f}" for t in probe.nearest_embeddings)
        lines.append(f"thought {probe.thought} (column {probe.position}): LM head [{top}] | embeddings [{nearest}]")
    return "\n".join(lines)


def save_probes(probes: list[ThoughtProbe], path: str | Path, prompt: str | None = None):
    """Write the probes as JSON: `{"prompt", "thoughts": [{"thought", "position", "top_tokens", ...}]}`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"prompt": prompt, "thoughts": [asdict(p) for p in probes]}, indent=2) + "\n")


@dataclass
class ProbeArguments:
    model: str = field(metadata={"help": "Local folder or Hub id of a Coconut-InternVL model."})
    question: str = field(metadata={"help": "The question to think about."})
    num_latent_thoughts: int = field(default=6, metadata={"help": "Continuous thoughts in the prompt."})
    images: list[str] = field(default_factory=list, metadata={"help": "Image files, one per image of the question."})
    top_k: int = field(default=5, metadata={"help": "Tokens shown per thought and view."})
    output_file: str = field(default="outputs/probe.json", metadata={"help": "Where to save the probes as JSON."})


def main(args: ProbeArguments) -> list[ThoughtProbe]:
    """Probe the thoughts of `args.question`, save them to `args.output_file` and return them."""
    from PIL import Image

    from coconut.curriculum import question_prompt
    from coconut.data import to_rgb
    from coconut.loading import load_model_and_processor
    from coconut.preflight import check_output_file
    from processing_coconut_internvl import latent_block

    check_output_file(args.output_file, "output_file")  # before the model is loaded
    model, processing_class = load_model_and_processor(args.model)
    tokenizer = getattr(processing_class, "tokenizer", processing_class)
    for path in args.images:
        if not Path(path).is_file():
            raise ValueError(f"Image file {path!r} does not exist; pass existing files to `--images`.")
    images = [to_rgb(Image.open(path)) for path in args.images]
    record = {"question": args.question, "images": images}
    prompt = question_prompt(record, processing_class) + latent_block(args.num_latent_thoughts)
    kwargs = {"images": [images]} if images else {}
    inputs = processing_class(text=[prompt], return_tensors="pt", **kwargs).to(model.device)
    probes = probe_thoughts(model, tokenizer, top_k=args.top_k, **inputs)
    save_probes(probes, args.output_file, prompt)
    logger.info("Saved the probes to %s", args.output_file)
    return probes


if __name__ == "__main__":
    from transformers import HfArgumentParser

    logging.basicConfig(level=logging.INFO)
    print(format_probes(main(HfArgumentParser(ProbeArguments).parse_args_into_dataclasses()[0])))


__all__ = ["TokenScore", "ThoughtProbe", "probe_vectors", "thought_vectors", "probe_thoughts", "format_probes"]
