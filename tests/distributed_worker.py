"""Launched by tests/test_distributed.py under `accelerate launch --num_processes 2 --cpu`.

Every process builds the same global batch (fixed seed), keeps its own prompts' groups, and runs one
update through the trainer's own functions; rank 0 saves the (all-reduced) gradients per config.
"""

import json
import sys

import torch
from accelerate import Accelerator
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlhf_pg.recipe import recipe_from_dict
from rlhf_pg.core.mdp import terminal_rewards
from rlhf_pg.policy.builtin import BuiltinSampler
from rlhf_pg.policy.sampler import SamplingParams
from rlhf_pg.trainer import compute_advantages, policy_update, update_settings

PROMPTS = ["1+2=", "3+4=", "5+6=", "17+8="]
COMPLETIONS_PER_PROMPT = 3


def global_batch(model, tokenizer):
    batch = BuiltinSampler(model, tokenizer).sample(PROMPTS, COMPLETIONS_PER_PROMPT, SamplingParams(max_new_tokens=5), generator=torch.Generator().manual_seed(0))
    scores = torch.tensor([float(i % 4) - 1.3 * (i % 3) for i in range(len(batch))])
    batch.rewards = terminal_rewards(scores, batch.completion_mask)
    return batch


def gradients(model_dir, algorithm, micro_batch_size, accelerator, rows):
    """Gradient of one update on ``rows`` of the global batch (all rows in a single process)."""
    model, tokenizer, recipe = setup(model_dir, algorithm, micro_batch_size)
    batch = global_batch(model, tokenizer)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    captured = {}
    optimizer.step = lambda *a, **k: captured.update(
        {n: p.grad.detach().clone() for n, p in accelerator.unwrap_model(prepared).named_parameters()})
    prepared, prepared_optimizer = accelerator.prepare(model, optimizer)
    one_update(prepared, prepared_optimizer, accelerator, batch.select(rows), recipe)
    return captured


def setup(model_dir, algorithm, micro_batch_size):
    """``(model, tokenizer, recipe)`` of one test update: seeded weights, 5 new tokens, no gradient clipping."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    recipe = recipe_from_dict({"model": model_dir, "algorithm": algorithm, "rollout": {"max_new_tokens": 5},
                               "train": {"micro_batch_size": micro_batch_size}, "optim": {"max_grad_norm": None}})
    return model, tokenizer, recipe


def one_update(model, optimizer, accelerator, batch, recipe):
    """The trainer's update on this process's ``batch``, normalized by the global sequence and token counts."""
    advantages = compute_advantages(batch, recipe.algorithm.estimator_spec(), accelerator)
    global_tokens = float(accelerator.reduce(batch.completion_mask.sum(), "sum"))
    policy_update(model, optimizer, accelerator, batch, advantages,
                  global_counts=(float(len(batch)), global_tokens / accelerator.num_processes), **update_settings(recipe))


CONFIGS = [
    ({"baseline": "batch_mean"}, None),
    ({"baseline": "timestep_mean", "whiten": True, "aggregation": "token-mean"}, 2),
    ({"baseline": "leave_one_out", "aggregation": "seq-mean-token-mean"}, None),
]

if __name__ == "__main__":
    model_dir, out_path = sys.argv[1], sys.argv[2]
    accelerator = Accelerator(cpu=True)
    world, rank = accelerator.num_processes, accelerator.process_index
    per_process = len(PROMPTS) * COMPLETIONS_PER_PROMPT // world
    rows = list(range(rank * per_process, (rank + 1) * per_process))
    results = []
    for algorithm, micro in CONFIGS:
        grads = gradients(model_dir, algorithm, micro, accelerator, rows)
        results.append({name: grad.flatten().tolist() for name, grad in grads.items()})
    if accelerator.is_main_process:
        with open(out_path, "w") as handle:
            json.dump({"world_size": world, "results": results}, handle)
    accelerator.wait_for_everyone()
