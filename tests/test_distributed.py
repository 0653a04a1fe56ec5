"""Two gloo processes on CPU whose batches hold different numbers of thoughts: under FSDP / ZeRO-3 every forward call
gathers parameters, so both ranks must make the same language-model calls, in the forward and in `generate`."""

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import PAD, Row, build_batch, free_port, model_inputs, tiny_model

from coconut.reference import reference_greedy


def _count_calls_on_rank(rank: int, world_size: int, port: int, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        model = tiny_model(seed=1)
        model.generation_config.pad_token_id = PAD
        calls = []
        model.model.language_model.register_forward_hook(lambda *args: calls.append(1))

        # Forward: rank 0 has 3 thoughts (4 passes), rank 1 none (1 pass) unless they agree.
        batch = model_inputs(build_batch([Row(latents=[3, 0][rank])], seed=rank))
        with torch.no_grad():
            synced = model(**batch, sync_latent_passes=True).logits
            forward_calls = len(calls)
            calls.clear()
            alone = model(**batch).logits
        alone_calls = len(calls)
        calls.clear()

        # Generate: rank 0 thinks 1 thought, rank 1 thinks 6: without syncing they would make 2 and 7 prefill calls.
        rows = [Row(latents=1, answer=0)] if rank == 0 else [Row(latents=6, answer=0, lead=3)]
        prompts = build_batch(rows, padding_side="left", seed=rank)
        inputs = {key: prompts[key] for key in ("input_ids", "attention_mask", "pixel_values")}
        output = model.generate(**inputs, max_new_tokens=3, do_sample=False, eos_token_id=None, synced_gpus=True)
        generate_calls = len(calls)
        expected = reference_greedy(model, prompts["sequences"][0], prompts["pixel_rows"][0], 3, None)
        results[rank] = dict(
            forward_calls=forward_calls,
            alone_calls=alone_calls,
            forward_difference=(synced - alone).abs().max().item(),
            generate_calls=generate_calls,
            generate_exact=output[0, prompts["input_ids"].shape[1] :].tolist() == expected,
        )
    finally:
        dist.destroy_process_group()


def test_ranks_with_different_thoughts_make_the_same_calls():
    results = mp.Manager().dict()
    mp.spawn(_count_calls_on_rank, args=(2, free_port(), results), nprocs=2, join=True)
    rank_0, rank_1 = results[0], results[1]
    assert (rank_0["alone_calls"], rank_1["alone_calls"]) == (4, 1)
    assert rank_0["forward_calls"] == rank_1["forward_calls"] == 4
    assert max(rank_0["forward_difference"], rank_1["forward_difference"]) < 1e-5  # extra passes change nothing
    assert rank_0["generate_calls"] == rank_1["generate_calls"] == 7 + 2  # 7 prefill passes, then 2 decoding steps
    assert rank_0["generate_exact"] and rank_1["generate_exact"]
