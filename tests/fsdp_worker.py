"""Run under `accelerate launch` with 2 CPU processes: what an FSDP2 plugin does on CPU (gloo).

Writes {"distributed_type", "num_processes", "sharded_parameters", "max_grad_diff"} to argv[2]: the
gradient of one backward on the shared batch against a single-process backward of the same model.
"""

import json
import sys

import torch


def main(model_dir: str, out: str) -> None:
    from accelerate import Accelerator
    from accelerate.utils import FullyShardedDataParallelPlugin
    from transformers import AutoModelForCausalLM

    accelerator = Accelerator(cpu=True, fsdp_plugin=FullyShardedDataParallelPlugin(fsdp_version=2))
    torch.manual_seed(0)
    ids = torch.randint(4, 60, (4, 6))
    reference = AutoModelForCausalLM.from_pretrained(model_dir)
    reference(input_ids=ids, labels=ids).loss.backward()
    model = accelerator.prepare(AutoModelForCausalLM.from_pretrained(model_dir))
    rows = ids.chunk(accelerator.num_processes)[accelerator.process_index]
    accelerator.backward(model(input_ids=rows, labels=rows).loss)
    unwrapped = accelerator.unwrap_model(model)
    sharded = sum(type(p).__name__ == "DTensor" for p in unwrapped.parameters())
    diff = max(float((p.grad - r.grad).abs().max()) for p, r in zip(unwrapped.parameters(), reference.parameters())
               if p.grad is not None and type(p.grad).__name__ != "DTensor")
    if accelerator.is_main_process:
        json.dump({"distributed_type": str(accelerator.distributed_type), "num_processes": accelerator.num_processes,
                   "sharded_parameters": sharded, "max_grad_diff": diff}, open(out, "w"))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
