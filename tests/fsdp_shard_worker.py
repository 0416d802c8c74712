"""Launched by tests/test_fsdp.py under `accelerate launch --multi_gpu --num_processes 2` (gloo on CPU).

Every process builds the same global batch (fixed seed) with the whole model, shards the model with rlhf-pg's own
``run/fsdp.shard`` and runs one update of its own rows through the trainer's functions (per config of
``distributed_worker.CONFIGS``). Rank 0 writes the full gradients, how many parameters are DTensors, and the bytes of
parameters + AdamW states this process holds against the whole model's.
"""

import json
import sys

import torch

import distributed_worker
from rlhf_pg.run import fsdp
from rlhf_pg.run.accel import new_accelerator


def sharded_update(model_dir, algorithm, micro_batch_size, accelerator, rows):
    model, tokenizer, recipe = distributed_worker.setup(model_dir, algorithm, micro_batch_size)
    batch = distributed_worker.global_batch(model, tokenizer).select(rows)
    whole_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    model = fsdp.shard(model, "cpu")
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.0)  # lr 0: one real AdamW step, its states allocated
    captured, step = {}, optimizer.step

    def capture_then_step(*args, **kwargs):
        captured.update({name: p.grad.full_tensor() for name, p in model.named_parameters()})  # collective
        return step(*args, **kwargs)

    optimizer.step = capture_then_step
    distributed_worker.one_update(model, optimizer, accelerator, batch, recipe)
    dtensors = sum(type(p).__name__ == "DTensor" for p in model.parameters())
    return captured, {"dtensor_parameters": dtensors, "parameters": len(list(model.parameters())),
                      "local_bytes": fsdp.local_bytes(model, optimizer), "whole_bytes": 3 * whole_bytes}


if __name__ == "__main__":
    model_dir, out_path = sys.argv[1], sys.argv[2]
    accelerator = new_accelerator("no")
    world, rank = accelerator.num_processes, accelerator.process_index
    per_process = len(distributed_worker.PROMPTS) * distributed_worker.COMPLETIONS_PER_PROMPT // world
    rows = list(range(rank * per_process, (rank + 1) * per_process))
    results, sizes = [], []
    for algorithm, micro in distributed_worker.CONFIGS:
        grads, size = sharded_update(model_dir, algorithm, micro, accelerator, rows)
        results.append({name: grad.flatten().tolist() for name, grad in grads.items()})
        sizes.append(size)
    if accelerator.is_main_process:
        with open(out_path, "w") as handle:
            json.dump({"world_size": world, "results": results, "sizes": sizes}, handle)
    accelerator.wait_for_everyone()
