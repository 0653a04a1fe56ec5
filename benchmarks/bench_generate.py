"""Generation time with continuous thoughts, side by side with the original Coconut decoding and plain InternVL.

    python -m benchmarks.bench_generate                        # small preset, CPU
    python -m benchmarks.bench_generate --preset internvl3-1b  # the real InternVL3-1B dimensions (random weights)

On the same 8 prompts (one image of 256 tokens and about 64 text tokens each):
(a) ours: one batched `model.generate(..., num_latent_thoughts=k, max_new_tokens=N)`;
(b) reference: the original Coconut release's decoding: one prompt at a time, greedy, a full forward over the whole
    sequence (latent passes included) for every new token, no cache kept between tokens;
(c) plain: transformers' `InternVLForConditionalGeneration.generate` with the same weights, no thoughts, N + k tokens.
The last line printed is one JSON object with the ratios.
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from transformers import AutoConfig, InternVLForConditionalGeneration

from benchmarks.bench_forward import small_config
from coconut.reference import original_coconut_greedy
from modeling_coconut_internvl import CoconutInternVLForConditionalGeneration


ROOT = Path(__file__).resolve().parents[1]


def build_prompts(config, batch_size: int, generator: torch.Generator) -> dict:
    """Left-padded prompts of 56 to 70 text tokens around one 256-token image."""
    vocab = min(config.text_config.vocab_size, config.image_token_id)
    rows = []
    for row in range(batch_size):
        text = torch.randint(100, vocab, (56 + 2 * row,), generator=generator).tolist()
        rows.append(text[:8] + [config.image_token_id] * config.image_seq_length + text[8:])
    length = max(map(len, rows))
    input_ids = torch.zeros((batch_size, length), dtype=torch.long)
    attention_mask = torch.zeros((batch_size, length), dtype=torch.long)
    for row, ids in enumerate(rows):
        input_ids[row, length - len(ids) :] = torch.tensor(ids)
        attention_mask[row, length - len(ids) :] = 1
    size = config.vision_config.image_size[0]
    pixel_values = torch.randn(batch_size, 3, size, size, generator=generator)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values}


def timed(function, repeats: int = 1):
    """Median seconds of `repeats` calls, and the last call's result."""
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds), result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=["small", "internvl3-1b"], default="small")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--num-latent-thoughts", type=int, default=6)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5, help="Timed runs of (a) and (c); (b) runs once.")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    torch.manual_seed(0)
    config = small_config() if args.preset == "small" else AutoConfig.from_pretrained(ROOT, trust_remote_code=True)
    dtype = getattr(torch, args.dtype)
    model = CoconutInternVLForConditionalGeneration(config).to(device=args.device, dtype=dtype).eval()
    plain_model = InternVLForConditionalGeneration(config).to(device=args.device, dtype=dtype).eval()
    plain_model.load_state_dict(model.state_dict())
    inputs = build_prompts(config, args.batch_size, torch.Generator().manual_seed(0))
    inputs = {key: value.to(args.device) for key, value in inputs.items()}
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    k, n = args.num_latent_thoughts, args.max_new_tokens
    # Every method makes exactly its number of tokens: no early stop at EOS.
    fixed = dict(do_sample=False, eos_token_id=None, pad_token_id=0)

    with torch.no_grad():
        model.generate(**inputs, num_latent_thoughts=k, max_new_tokens=2, **fixed)  # warm-up
        ours_s, ours = timed(
            lambda: model.generate(**inputs, num_latent_thoughts=k, max_new_tokens=n, min_new_tokens=n, **fixed),
            args.repeats,
        )
        plain_model.generate(**inputs, max_new_tokens=2, **fixed)  # warm-up
        plain_s, _ = timed(
            lambda: plain_model.generate(**inputs, max_new_tokens=n + k, min_new_tokens=n + k, **fixed), args.repeats
        )

        def reference():
            with_block, mask = model.append_latent_thoughts(inputs["input_ids"], inputs["attention_mask"], k)
            outputs = []
            for row in range(args.batch_size):
                ids = with_block[row][mask[row].bool()].tolist()
                outputs.append(original_coconut_greedy(model, ids, inputs["pixel_values"][row : row + 1], n, None))
            return outputs

        reference_s, reference_tokens = timed(reference)

    prompt_length = inputs["input_ids"].shape[1] + k + 2
    same = ours[:, prompt_length:].tolist() == reference_tokens
    print(f"preset={args.preset} device={args.device} dtype={args.dtype} batch={args.batch_size} k={k} N={n}")
    print(f"  ours (batched generate)         {ours_s:8.2f} s")
    print(f"  reference (original Coconut)    {reference_s:8.2f} s")
    print(f"  plain InternVL (N + k tokens)   {plain_s:8.2f} s")
    print(f"  greedy tokens identical to the reference: {same}")
    result = {
        "preset": args.preset,
        "device": args.device,
        "batch_size": args.batch_size,
        "num_latent_thoughts": k,
        "max_new_tokens": n,
        "ours_s": round(ours_s, 3),
        "reference_s": round(reference_s, 3),
        "plain_s": round(plain_s, 3),
        "tokens_identical_to_reference": same,
        "batched_vs_reference_speedup": round(reference_s / ours_s, 2),
        "latent_overhead_vs_plain": round(ours_s / plain_s, 3),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
