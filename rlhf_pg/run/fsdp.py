"""FSDP2: the policy's parameters, gradients and optimizer states sharded over the processes (torch's ``fully_shard``).

    shard(model)            fully_shard(each decoder layer), then fully_shard(model): every parameter a DTensor shard
                            (dim 0 split over the processes); a forward all-gathers one layer at a time, a backward
                            reduce-scatters its gradient, so each process keeps 1/N of params + grads + AdamW states
    with gathered(model):   the whole model unsharded (one all-gather per layer) for decoding, freed after: the
                            built-in engine's KV-cached decoder runs on plain tensors, and no decode step is a
                            collective (processes may decode different numbers of tokens or batches)
    save_sharded / load_sharded   a torch distributed checkpoint (DCP) of model + optimizer: every process writes its
                            shards; loading reshards, so another number of processes can resume it
    full_state_dict(model)  the full weights on the main process (for ``final/``, an ordinary HF model)

rlhf-pg applies ``fully_shard`` itself on every device (CPU with gloo, GPUs with NCCL): accelerate 1.x never
shards on CPU, so one code path is the one that is tested. A run shards when the recipe says ``train.fsdp: true``
or the launch config asks accelerate for FSDP (``distributed_type: FSDP``, e.g. ``recipes/accelerate/
fsdp_cpu_2proc.yaml``: accelerate sets ``ACCELERATE_USE_FSDP``, its ``fsdp_reshard_after_forward`` is honoured).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

import torch

from ..errors import RecipeError, UserError, first_line


def requested(recipe) -> bool:
    """``train.fsdp: true``, or a launch config that asks accelerate for FSDP (``ACCELERATE_USE_FSDP``)."""
    return bool(getattr(recipe.train, "fsdp", False)) or os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"


def check(recipe, num_processes: int) -> None:
    """A ``RecipeError`` naming the recipe key that FSDP cannot run with (and what to use instead)."""
    where = "train.fsdp" if getattr(recipe.train, "fsdp", False) else "the FSDP launch config"
    if recipe.peft is not None:
        raise RecipeError(f"{where} with a peft: section (LoRA): the adapter is small, shard nothing; remove "
                          "train.fsdp (use a data-parallel launch config) or the peft: section")
    if recipe.rollout.engine != "builtin":
        raise RecipeError(f"{where} with rollout.engine: {recipe.rollout.engine}: only the built-in engine samples from "
                          "sharded parameters; use rollout.engine: builtin or a data-parallel run")
    if recipe.train.mixed_precision == "fp16":
        raise RecipeError(f"{where} with train.mixed_precision: fp16 (no sharded loss scaling here); use bf16 or no")
    if recipe.model.gradient_checkpointing or getattr(recipe.train, "gradient_checkpointing", False):
        key = "model.gradient_checkpointing" if recipe.model.gradient_checkpointing else "train.gradient_checkpointing"
        raise RecipeError(f"{where} with {key}: not tested with sharded layers; turn one off")
    launch = {"FSDP_VERSION": ("1", "fsdp_version: 1 (rlhf-pg runs FSDP2); set fsdp_version: 2"),
              "FSDP_OFFLOAD_PARAMS": ("true", "fsdp_offload_params: true (not supported here); set it to false"),
              "FSDP_ACTIVATION_CHECKPOINTING": ("true", "fsdp_activation_checkpointing: true (not supported here); set "
                                                        "it to false")}
    for name, (bad, fix) in launch.items():
        if os.environ.get(name, "").lower() == bad:
            raise RecipeError(f"the FSDP launch config has {fix}")
    if num_processes < 2:
        raise RecipeError(f"{where} with a single process: nothing to shard over; launch 2 or more processes "
                          "(accelerate launch --config_file recipes/accelerate/fsdp_cpu_2proc.yaml -m rlhf_pg train "
                          "RECIPE) or remove train.fsdp")


def return_freed_memory(threshold_bytes: int = 1 << 16) -> bool:
    """glibc: serve every block of ``threshold_bytes`` or more by its own mmap, so that freeing it gives it back to the
    OS at once (``mallopt(M_MMAP_THRESHOLD)``, which also stops glibc from raising the threshold by itself). A sharded
    run gathers and frees each layer's weights and gradients many times a step: with glibc's default the freed
    blocks stayed in the heap and the per-process peak RSS *grew* over data parallel's (measured: 38M-parameter Llama,
    2 processes, 1347 MB against DDP's 1251 MB; 884 MB with this). Returns whether it was set (False off glibc)."""
    from .memory import M_MMAP_THRESHOLD, mallopt

    return mallopt((M_MMAP_THRESHOLD, threshold_bytes))


def load_whole_models() -> None:
    """Every process reads the whole model, then ``shard`` keeps its part: turn off accelerate's
    ``fsdp_cpu_ram_efficient_loading`` (on by default in ``accelerate launch``), with which transformers may leave the
    weights of processes other than the first to a broadcast that accelerate's own FSDP preparation would do."""
    os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"] = "false"


def reshard_after_forward() -> bool:
    """accelerate's ``fsdp_reshard_after_forward`` (env ``FSDP_RESHARD_AFTER_FORWARD``; default true: the lowest memory)."""
    return os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower() not in ("false", "0", "no_reshard")


def decoder_layers(model) -> list[torch.nn.Module]:
    """The model's repeated blocks: modules whose class transformers lists in ``_no_split_modules``."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    return [module for module in model.modules() if type(module).__name__ in names]


def shard(model, device_type: str, mixed_precision: str = "no", name: str = "model"):
    """``fully_shard`` each decoder layer, then the root (embeddings, final norm, head). Returns ``model`` (now an
    ``FSDPModule``; its parameters DTensors). ``mixed_precision: bf16``: parameters are all-gathered in bfloat16,
    gradients reduced in float32 (the shards, the optimizer's copy, stay float32)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    layers = decoder_layers(model)
    if not layers:
        raise UserError(f"FSDP cannot wrap {name} ({type(model).__name__}): transformers names no repeated decoder "
                        "block for it (_no_split_modules is empty), so it would be one all-gathered unit; use a "
                        "data-parallel launch config (recipes/accelerate/cpu_2proc.yaml) for this model")
    mesh = init_device_mesh(device_type, (torch.distributed.get_world_size(),))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if mixed_precision == "bf16" else MixedPrecisionPolicy()
    options = dict(mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward())
    for layer in layers:
        fully_shard(layer, **options)
    fully_shard(model, **options)
    return model


def is_sharded(model) -> bool:
    """Has ``shard`` been applied (an ``FSDPModule``)?"""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def _units(model) -> list:
    from torch.distributed.fsdp import FSDPModule

    return [module for module in model.modules() if isinstance(module, FSDPModule)]


@contextlib.contextmanager
def gathered(model) -> Iterator[None]:
    """The whole model unsharded inside (every process must enter: all-gathers), resharded (freed) after.

    Inside, the parameters are plain tensors and FSDP's hooks do not reshard after a forward, so decoding needs no
    collective: memory for one full copy of the weights, for as long as sampling lasts."""
    if not is_sharded(model):
        yield
        return
    units = _units(model)
    for unit in units:
        unit.set_reshard_after_forward(False)
    for unit in units:
        unit.unshard()
    try:
        yield
    finally:
        after = reshard_after_forward()
        for unit in units:
            unit.reshard()
            unit.set_reshard_after_forward(after)


def _state(model, optimizer):
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)
    return {"model": model_state, "optimizer": optimizer_state}


def save_sharded(directory: Path, model, optimizer) -> None:
    """Every process writes its shards of the model and the optimizer into ``directory`` (DCP); collective."""
    import torch.distributed.checkpoint as dcp

    dcp.save(_state(model, optimizer), checkpoint_id=str(directory))


def load_sharded(directory: Path, model, optimizer) -> None:
    """Model and optimizer from a DCP checkpoint (resharded to this run's processes); collective."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    state = _state(model, optimizer)
    dcp.load(state, checkpoint_id=str(directory))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def resume(checkpoint: Path, model, optimizer, written_by: int | None, world: int, is_main: bool) -> None:
    """``--resume`` from a sharded checkpoint: model and optimizer from its DCP files (the run's other state is in
    ``trainer_state.json``, as for every checkpoint). Written by another number of processes: DCP reshards the
    tensors and the run goes on, but it samples differently from the uninterrupted run (draws are seeded per
    process); said once."""
    from .checkpoint import SHARDS, unusable

    if is_main and isinstance(written_by, int) and written_by != world:
        print(f"--resume: {checkpoint} was written by {written_by} processes, this run has {world}: the model and "
              "optimizer are resharded; the sampled completions will differ from the uninterrupted run's", flush=True)
    try:
        load_sharded(checkpoint / SHARDS, model, optimizer)
    except Exception as error:  # noqa: BLE001 - any failure here means the checkpoint does not fit this run
        raise unusable(checkpoint, f"holds shards that do not fit this model ({first_line(error)[:300]})",
                       mismatch=True) from None


def full_state_dict(model) -> dict[str, torch.Tensor]:
    """The full weights, on the CPU of the main process (the others get {}); collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def local_bytes(model, optimizer=None) -> int:
    """Bytes this process holds of the parameters (its shards) and of the optimizer's state."""
    def size(tensor) -> int:
        local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
        return local.numel() * local.element_size()

    total = sum(size(p) for p in model.parameters())
    if optimizer is not None:
        inner = getattr(optimizer, "optimizer", optimizer)
        total += sum(size(v) for state in inner.state.values() for v in state.values() if torch.is_tensor(v))
    return total
