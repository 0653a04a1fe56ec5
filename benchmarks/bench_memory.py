"""Peak memory of one training step at InternVL3's vocabulary (151,677 tokens), side by side with plain TRL.

    python -m benchmarks.bench_memory                                   # CPU: peak resident memory of each variant
    python -m benchmarks.bench_memory --device cuda --dtype bfloat16    # GPU: peak allocated memory
    python -m benchmarks.bench_memory --preset internvl3-1b --device cuda --dtype bfloat16

One batch (`--batch_size` rows of `--tokens` tokens, each with a 256-token image and `--thoughts` continuous thoughts,
every completion token labelled), loss and backward as each trainer computes them:
- `coconut`: the Coconut model under `CoconutSFTTrainer`'s fused LM head (the latent passes, the LM head scored in
  tiles over the labelled positions: `coconut.fused_lm_head`);
- `coconut_full_logits`: the same forward, but the `(batch, tokens, vocab)` logits materialised and scored in fp32 (what
  the trainer did before the tiles);
- `trl_plain`: the parent `InternVLForConditionalGeneration` under TRL's own fused LM head (`add_fused_lm_head`, what
  `SFTTrainer` does), on the same ids: no latent passes, the `<|latent|>` tokens read as ordinary tokens.
Each variant runs in a fresh process, so one's allocations cannot hide another's. On a CPU the number is the rise of
the process's peak resident memory (VmHWM, reset after the model is built) over the step; on a GPU it is
`torch.cuda.max_memory_allocated` above the memory held before the step. The last line printed is one JSON object
with each variant's peak and the ratios to `trl_plain`.
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch


ROOT = Path(__file__).resolve().parents[1]
VOCAB_SIZE = 151_677  # InternVL3's: Qwen2.5's 151,674 ids + the three latent tokens
VARIANTS = ("trl_plain", "coconut", "coconut_full_logits")


def build(preset: str, dtype: torch.dtype, device: str):
    """The Coconut model, the parent model with the same weights, and the config, at InternVL3's vocabulary."""
    from transformers import InternVLForConditionalGeneration

    from coconut.tiny import tiny_coconut_config
    from modeling_coconut_internvl import CoconutInternVLForConditionalGeneration

    ids = dict(image_token_id=VOCAB_SIZE - 4, latent_token_ids=(VOCAB_SIZE - 3, VOCAB_SIZE - 2, VOCAB_SIZE - 1))
    if preset == "internvl3-1b":
        text = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14)
        text.update(num_key_value_heads=2)
        vision = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16)
    else:
        text = dict(hidden_size=256, intermediate_size=704, num_hidden_layers=2)
        vision = dict(hidden_size=128, intermediate_size=256)
    config = tiny_coconut_config(VOCAB_SIZE, **ids, image_size=448, text=text, vision=vision)
    torch.manual_seed(0)
    model = CoconutInternVLForConditionalGeneration(config).to(device, dtype).train()
    return model, InternVLForConditionalGeneration, config


def make_batch(config, batch_size: int, tokens: int, thoughts: int, device: str, dtype) -> dict:
    """Rows of text, a 256-token image, text, a latent block of `thoughts`, then a completion filling `tokens`."""
    generator = torch.Generator().manual_seed(0)
    start, end, latent = config.start_latent_token_id, config.end_latent_token_id, config.latent_token_id
    image = [config.image_token_id] * config.image_seq_length
    prompt_text = 32
    completion = tokens - (prompt_text + len(image) + thoughts + 2)
    rows, labels = [], []
    for _ in range(batch_size):
        text = torch.randint(100, VOCAB_SIZE - 10, (prompt_text + completion,), generator=generator).tolist()
        ids = text[:prompt_text] + image + [start] + [latent] * thoughts + [end] + text[prompt_text:]
        rows.append(ids)
        labels.append([-100] * (len(ids) - completion) + ids[-completion:])
    pixel_values = torch.randn(batch_size, 3, 448, 448, generator=generator)
    return {
        "input_ids": torch.tensor(rows, device=device),
        "attention_mask": torch.ones(batch_size, tokens, dtype=torch.long, device=device),
        "labels": torch.tensor(labels, device=device),
        "pixel_values": pixel_values.to(device, dtype),
    }


def peak_bytes_now(device: str) -> int:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated()
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("No VmHWM in /proc/self/status: the CPU measurement needs Linux.")


def reset_peak(device: str) -> int:
    """Reset the peak counter; returns the memory held now (the baseline the step's peak is measured from)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident size
    return peak_bytes_now(device)


def run_variant(variant: str, args) -> dict:
    from trl.trainer.utils import add_fused_lm_head, selective_log_softmax_and_entropy

    from coconut.fused_lm_head import add_latent_fused_lm_head

    dtype = getattr(torch, args.dtype)
    torch.set_num_threads(args.threads)
    model, parent_class, config = build(args.preset, dtype, args.device)
    batch = make_batch(config, args.batch_size, args.tokens, args.thoughts, args.device, dtype)
    labels = batch.pop("labels")
    if variant == "trl_plain":
        parent = parent_class(config).to(args.device, dtype).train()
        parent.load_state_dict(model.state_dict())
        del model
        model = parent
        add_fused_lm_head(model)
    elif variant == "coconut":
        add_fused_lm_head(model)
        add_latent_fused_lm_head(model)
    baseline = reset_peak(args.device)
    if variant == "coconut_full_logits":  # the trainer's scoring before the tiles
        logits = model(**batch).logits[:, :-1].float()  # (B, T - 1, V)
        shifted = labels[:, 1:]
        mask = shifted != -100
        log_probs, _ = selective_log_softmax_and_entropy(
            logits, shifted.masked_fill(~mask, 0), entropy_requires_grad=False, row_mask=mask
        )
        loss = -log_probs.sum() / mask.sum()
    else:
        loss = model(**batch, labels=labels, fused_lm_head=True).loss
    loss.backward()
    return {"variant": variant, "peak_bytes": peak_bytes_now(args.device) - baseline, "loss": loss.item()}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=["small", "internvl3-1b"], default="small")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--thoughts", type=int, default=6)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # one variant, in a child process
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args.variant, args)))
        return
    results = {}
    for variant in args.variants:
        command = [sys.executable, "-m", "benchmarks.bench_memory", *sys.argv[1:], "--variant", variant]
        completed = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
        if completed.returncode != 0:
            raise RuntimeError(f"{variant} failed:\n{completed.stderr[-3000:]}")
        results[variant] = json.loads(completed.stdout.strip().splitlines()[-1])
        print(f"{variant:>20}: peak {results[variant]['peak_bytes'] / 2**20:8.0f} MiB over the step", flush=True)
    summary = {
        "device": args.device,
        "dtype": args.dtype,
        "preset": args.preset,
        "vocab_size": VOCAB_SIZE,
        "batch": [args.batch_size, args.tokens],
        "peak_mib": {variant: round(row["peak_bytes"] / 2**20) for variant, row in results.items()},
    }
    if "trl_plain" in results:
        plain = results["trl_plain"]["peak_bytes"]
        summary["ratio_to_trl_plain"] = {
            variant: round(row["peak_bytes"] / plain, 3) for variant, row in results.items() if variant != "trl_plain"
        }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
