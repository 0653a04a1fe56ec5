"""Forward+backward time of the latent forward, side by side with plain InternVL and the naive reference.

    python -m benchmarks.bench_forward                        # small presets, CPU
    python -m benchmarks.bench_forward --threads 1 --clock cpu --repeats 9  # steadier on a shared machine
    python -m benchmarks.bench_forward --compile inductor     # also: the latent passes under torch.compile
    python -m benchmarks.bench_forward --preset internvl3-1b  # the real InternVL3-1B dimensions (random weights)

Two batches, each timed three or two ways:
- image row: each sample one image of 256 tokens, 64 text tokens and 6 continuous thoughts (small preset: text width
  256, 4 layers);
- text rows: 2 text-only rows of about 330 tokens with 6 thoughts (small preset: text width 512, 8 layers, 8 heads,
  2 KV heads), once with the latent blocks in the same columns ("aligned") and once 10 columns apart with right padding
  ("misaligned").
(a) ours: `CoconutInternVLForConditionalGeneration.forward` (one batch, passes over one KV cache);
(b) plain: the parent `InternVLForConditionalGeneration.forward` on the same ids (thoughts read as ordinary tokens);
(c) naive (image row only): `coconut.reference`, each sample alone, the whole prefix recomputed for every thought.
The variants run interleaved (a, b, c, a, b, c, ...) so that load from other processes hits each alike, and each time is
the median of `--repeats` runs. The last line printed is one JSON object with the ratios.
"""

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch
from transformers import AutoConfig, InternVLForConditionalGeneration

from coconut.reference import reference_logits
from coconut.tiny import tiny_coconut_config
from configuration_coconut_internvl import CoconutInternVLConfig
from modeling_coconut_internvl import CoconutInternVLForConditionalGeneration


ROOT = Path(__file__).resolve().parents[1]
NUM_LATENTS, QUESTION_TOKENS, ANSWER_TOKENS = 6, 48, 16
TEXT_QUESTION_TOKENS, TEXT_ANSWER_TOKENS, MISALIGNMENT = 300, 24, 10


def small_config(**text_overrides) -> CoconutInternVLConfig:
    """Small enough for a laptop CPU, with the real image geometry: 448 px / 14 px patches -> 256 tokens a tile."""
    text = {**dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4), **text_overrides}
    vision = dict(hidden_size=128, intermediate_size=256)
    return tiny_coconut_config(2048, 2000, (2001, 2002, 2003), image_size=448, text=text, vision=vision)


def small_text_config() -> CoconutInternVLConfig:
    """The text-only preset: a language model of width 512 with 8 layers, 8 heads and 2 KV heads."""
    return small_config(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8)


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


def build_text_inputs(config, misaligned: bool, generator: torch.Generator, batch_size: int = 2) -> dict:
    """Text-only rows: question, latent block, answer; `misaligned` rows' blocks start 10 columns apart, right-padded."""
    vocab = min(config.text_config.vocab_size, config.image_token_id)
    block = [config.start_latent_token_id] + [config.latent_token_id] * NUM_LATENTS + [config.end_latent_token_id]
    rows = []
    for row in range(batch_size):
        question = TEXT_QUESTION_TOKENS + (MISALIGNMENT * row if misaligned else 0)
        text = torch.randint(100, vocab, (question + TEXT_ANSWER_TOKENS,), generator=generator).tolist()
        rows.append(text[:question] + block + text[question:])
    length = max(map(len, rows))
    input_ids = torch.zeros((batch_size, length), dtype=torch.long)
    attention_mask = torch.zeros((batch_size, length), dtype=torch.long)
    labels = torch.full((batch_size, length), -100)
    for row, ids in enumerate(rows):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention_mask[row, : len(ids)] = 1
        labels[row, len(ids) - TEXT_ANSWER_TOKENS : len(ids)] = torch.tensor(ids[-TEXT_ANSWER_TOKENS:])
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def time_interleaved(steps: dict, repeats: int, clock=time.perf_counter) -> dict:
    """Median seconds of each step over `repeats` rounds; every round runs each step once, in turn."""
    for step in steps.values():
        step()  # warm-up: allocator, kernels
    times = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            start = clock()
            step()
            times[name].append(clock() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def fwd_bwd_steps(model, inputs: dict) -> dict:
    """`ours` and `plain` forward + backward on the same inputs."""

    def ours():
        model.zero_grad(set_to_none=True)
        model(**inputs).loss.backward()

    def plain():
        model.zero_grad(set_to_none=True)
        InternVLForConditionalGeneration.forward(model, **inputs).loss.backward()

    return {"ours": ours, "plain": plain}


def count_passes(model, inputs: dict) -> int:
    """Language-model calls made by one latent forward."""
    calls = []
    handle = model.model.language_model.register_forward_hook(lambda *args: calls.append(1))
    with torch.no_grad():
        model(**inputs)
    handle.remove()
    return len(calls)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=["small", "internvl3-1b"], default="small")
    parser.add_argument("--batch-size", type=int, default=2, help="Rows of the image batch.")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice).")
    parser.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="`cpu` times this process's CPU time instead of wall time: steadier on a shared machine, with --threads 1.",
    )
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--compile",
        choices=["none", "inductor", "aot_eager"],
        default="none",
        help="Also time the text rows with the language model compiled (`torch.compile`, no full graph).",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter

    torch.manual_seed(0)
    if args.preset == "small":
        config, text_config = small_config(), small_text_config()
    else:
        config = text_config = AutoConfig.from_pretrained(ROOT, trust_remote_code=True)
    dtype = getattr(torch, args.dtype)

    def build_model(config):
        return CoconutInternVLForConditionalGeneration(config).to(device=args.device, dtype=dtype).train()

    model = build_model(config)
    generator = torch.Generator().manual_seed(0)
    inputs = build_inputs(config, args.batch_size, generator)
    inputs = {key: value.to(args.device) for key, value in inputs.items()}
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)

    def naive():
        model.zero_grad(set_to_none=True)
        losses = []
        for row in range(args.batch_size):
            logits = reference_logits(model, inputs["input_ids"][row].tolist(), inputs["pixel_values"][row : row + 1])
            losses.append(torch.nn.functional.cross_entropy(logits[:-1], inputs["labels"][row, 1:]))
        torch.stack(losses).mean().backward()

    tokens = inputs["input_ids"].shape[1]
    print(
        f"preset={args.preset} device={args.device} dtype={args.dtype} threads={torch.get_num_threads()} "
        f"repeats={args.repeats} clock={args.clock}"
    )
    print(f"image row: batch={args.batch_size} tokens={tokens}")
    seconds = time_interleaved({**fwd_bwd_steps(model, inputs), "naive": naive}, args.repeats, clock)
    for name, value in seconds.items():
        print(f"  {name:<6} forward+backward: {value * 1000:9.1f} ms", flush=True)

    text_model = model if text_config is config else build_model(text_config)
    text_seconds, passes, text_tokens = {}, {}, {}
    for layout in ("aligned", "misaligned"):
        text_inputs = build_text_inputs(text_config, layout == "misaligned", generator)
        text_inputs = {key: value.to(args.device) for key, value in text_inputs.items()}
        passes[layout] = count_passes(text_model, text_inputs)
        text_tokens[layout] = text_inputs["input_ids"].shape[1]
        text_seconds[layout] = time_interleaved(fwd_bwd_steps(text_model, text_inputs), args.repeats, clock)
        print(f"text rows, {layout}: batch=2 tokens={text_tokens[layout]} passes={passes[layout]}")
        for name, value in text_seconds[layout].items():
            print(f"  {name:<6} forward+backward: {value * 1000:9.1f} ms", flush=True)

    result = {
        "preset": args.preset,
        "device": args.device,
        "threads": torch.get_num_threads(),
        "clock": args.clock,
        "batch_size": args.batch_size,
        "tokens_per_sample": tokens,
        "num_latents": NUM_LATENTS,
        "ours_ms": round(seconds["ours"] * 1000, 2),
        "plain_ms": round(seconds["plain"] * 1000, 2),
        "naive_ms": round(seconds["naive"] * 1000, 2),
        "latent_vs_plain_fwd_bwd": round(seconds["ours"] / seconds["plain"], 3),
        "naive_vs_latent_fwd_bwd": round(seconds["naive"] / seconds["ours"], 3),
        "text_passes_aligned": passes["aligned"],
        "text_passes_misaligned": passes["misaligned"],
        "latent_vs_plain_text_aligned": round(text_seconds["aligned"]["ours"] / text_seconds["aligned"]["plain"], 3),
        "latent_vs_plain_text_misaligned": round(
            text_seconds["misaligned"]["ours"] / text_seconds["misaligned"]["plain"], 3
        ),
    }
    if args.compile != "none":
        result.update(compare_compiled(text_model, text_config, generator, args, clock))
    print(json.dumps(result))


def compare_compiled(model, config, generator, args, clock) -> dict:
    """The aligned text rows with the language model compiled (every pass), against the same weights in eager mode."""
    inputs = build_text_inputs(config, misaligned=False, generator=generator)
    inputs = {key: value.to(args.device) for key, value in inputs.items()}
    compiled_model = copy.deepcopy(model)
    compiled_model.model.language_model.compile(backend=args.compile)
    start = time.perf_counter()
    with torch.no_grad():
        compiled_logits = compiled_model(**inputs).logits
        difference = (compiled_logits - model(**inputs).logits).abs().max().item()
    fwd_bwd_steps(compiled_model, inputs)["ours"]()  # the backward graphs
    compile_seconds = time.perf_counter() - start
    eager, compiled = fwd_bwd_steps(model, inputs), fwd_bwd_steps(compiled_model, inputs)
    steps = {"ours": eager["ours"], "ours_compiled": compiled["ours"]}
    steps.update({"plain": eager["plain"], "plain_compiled": compiled["plain"]})
    seconds = time_interleaved(steps, args.repeats, clock)
    print(f"text rows, aligned, language model compiled with {args.compile} (first calls {compile_seconds:.0f} s):")
    for name, value in seconds.items():
        print(f"  {name:<14} forward+backward: {value * 1000:9.1f} ms", flush=True)
    return {
        "compile_backend": args.compile,
        "compile_first_calls_s": round(compile_seconds, 1),
        "compiled_max_abs_logit_difference": difference,
        "compiled_vs_eager_latent": round(seconds["ours_compiled"] / seconds["ours"], 3),
        "compiled_vs_eager_plain": round(seconds["plain_compiled"] / seconds["plain"], 3),
        "latent_vs_plain_text_aligned_compiled": round(seconds["ours_compiled"] / seconds["plain_compiled"], 3),
    }


if __name__ == "__main__":
    main()
