"""Forward+backward time of the latent forward, side by side with plain InternVL and the naive reference.

    python -m benchmarks.bench_forward                        # small preset, CPU
    python -m benchmarks.bench_forward --preset internvl3-1b  # the real InternVL3-1B dimensions (random weights)

Each sample: one image of 256 tokens, 64 text tokens, and 6 continuous thoughts between the latent markers.
(a) ours: `CoconutInternVLForConditionalGeneration.forward` (one batch, passes over one KV cache);
(b) plain: the parent `InternVLForConditionalGeneration.forward` on the same ids (thoughts read as ordinary tokens);
(c) naive: `coconut.reference`, each sample alone, the whole prefix recomputed without cache for every thought.
The last line printed is one JSON object with the ratios.
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from transformers import AutoConfig, InternVLForConditionalGeneration

from coconut.reference import reference_logits
from configuration_coconut_internvl import CoconutInternVLConfig
from modeling_coconut_internvl import CoconutInternVLForConditionalGeneration


ROOT = Path(__file__).resolve().parents[1]
NUM_LATENTS, QUESTION_TOKENS, ANSWER_TOKENS = 6, 48, 16


def small_config() -> CoconutInternVLConfig:
    """Small enough for a laptop CPU, with the real image geometry: 448 px / 14 px patches -> 256 tokens a tile."""
    return CoconutInternVLConfig(
        text_config=dict(
            model_type="qwen2",
            vocab_size=2048,
            hidden_size=256,
            intermediate_size=704,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
        ),
        vision_config=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4),
        image_token_id=2000,
        start_latent_token_id=2001,
        end_latent_token_id=2002,
        latent_token_id=2003,
        tie_word_embeddings=False,
    )


def build_inputs(config, batch_size: int, generator: torch.Generator) -> dict:
    """Right-padded-free batch (all rows the same layout): text, image, text, latent block, answer."""
    vocab = min(config.text_config.vocab_size, config.image_token_id)
    rows = []
    for _ in range(batch_size):
        text = torch.randint(100, vocab, (QUESTION_TOKENS + ANSWER_TOKENS,), generator=generator).tolist()
        rows.append(
            text[:8]
            + [config.image_token_id] * config.image_seq_length
            + text[8:QUESTION_TOKENS]
            + [config.start_latent_token_id]
            + [config.latent_token_id] * NUM_LATENTS
            + [config.end_latent_token_id]
            + text[QUESTION_TOKENS:]
        )
    input_ids = torch.tensor(rows)
    labels = input_ids.clone()
    labels[:, : -ANSWER_TOKENS - 1] = -100
    size = config.vision_config.image_size[0]
    pixel_values = torch.randn(batch_size, 3, size, size, generator=generator)
    return {"input_ids": input_ids, "pixel_values": pixel_values, "labels": labels}


def time_fwd_bwd(step, repeats: int) -> float:
    step()  # warm-up: allocator, kernels
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=["small", "internvl3-1b"], default="small")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    torch.manual_seed(0)
    if args.preset == "small":
        config = small_config()
    else:
        config = AutoConfig.from_pretrained(ROOT, trust_remote_code=True)
    dtype = getattr(torch, args.dtype)
    model = CoconutInternVLForConditionalGeneration(config).to(device=args.device, dtype=dtype).train()
    inputs = build_inputs(config, args.batch_size, torch.Generator().manual_seed(0))
    inputs = {key: value.to(args.device) for key, value in inputs.items()}
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)

    def ours():
        model.zero_grad(set_to_none=True)
        model(**inputs).loss.backward()

    def plain():
        model.zero_grad(set_to_none=True)
        InternVLForConditionalGeneration.forward(model, **inputs).loss.backward()

    def naive():
        model.zero_grad(set_to_none=True)
        losses = []
        for row in range(args.batch_size):
            logits = reference_logits(model, inputs["input_ids"][row].tolist(), inputs["pixel_values"][row : row + 1])
            losses.append(torch.nn.functional.cross_entropy(logits[:-1], inputs["labels"][row, 1:]))
        torch.stack(losses).mean().backward()

    tokens = inputs["input_ids"].shape[1]
    print(f"preset={args.preset} device={args.device} dtype={args.dtype} batch={args.batch_size} tokens={tokens}")
    seconds = {}
    for name, step in (("ours", ours), ("plain", plain), ("naive", naive)):
        seconds[name] = time_fwd_bwd(step, args.repeats)
        print(f"  {name:<6} forward+backward: {seconds[name] * 1000:9.1f} ms", flush=True)
    result = {
        "preset": args.preset,
        "device": args.device,
        "batch_size": args.batch_size,
        "tokens_per_sample": tokens,
        "num_latents": NUM_LATENTS,
        "ours_ms": round(seconds["ours"] * 1000, 2),
        "plain_ms": round(seconds["plain"] * 1000, 2),
        "naive_ms": round(seconds["naive"] * 1000, 2),
        "latent_vs_plain_fwd_bwd": round(seconds["ours"] / seconds["plain"], 3),
        "naive_vs_latent_fwd_bwd": round(seconds["naive"] / seconds["ours"], 3),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
