"""The accelerator: one ``accelerate.Accelerator`` per run, on CPU, one GPU or many processes.

Several processes wait for each other in every collective (gather, all-reduce, barrier). When one of them
dies, the others learn it at their next collective: at once when its connection closes (gloo on one machine),
else after the process group's timeout (a hung process, NCCL); ``train.distributed_timeout_s`` sets it (torch's
default is 30 min for gloo, 10 min for NCCL). ``collective_failure`` tells such an error from the others, so the
loop can stop with a message saying so (``PeerLost``) instead of a backend's traceback.
"""

from __future__ import annotations

import datetime

import torch

DEFAULT_DISTRIBUTED_TIMEOUT_S = 600.0


def cpu_only() -> bool:
    """No GPU-like device: tell accelerate so, which makes `accelerate launch --multi_gpu` / `torchrun`
    run several CPU processes with the gloo backend instead of several independent single processes."""
    xpu = getattr(torch, "xpu", None)
    return not (torch.cuda.is_available() or torch.backends.mps.is_available() or (xpu is not None and xpu.is_available()))


def fast_bf16() -> bool:
    """Does this machine run bfloat16 matmuls faster than float32? A CUDA GPU that supports bf16; a CPU with
    bf16 instructions (x86 ``avx512_bf16`` or ``amx_bf16``, read from /proc/cpuinfo; oneDNN uses them). Elsewhere
    (AVX2-only x86, ARM, MPS) bf16 autocast is emulated and slower than float32."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    if not cpu_only():
        return False
    flags = cpu_flags()
    return "avx512_bf16" in flags or "amx_bf16" in flags


def cpu_flags() -> set[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo; empty elsewhere)."""
    try:
        with open("/proc/cpuinfo") as info:
            return set(next((line for line in info if line.startswith("flags")), "").split())
    except OSError:
        return set()


def resolve_mixed_precision(mixed_precision: str) -> str:
    """``train.mixed_precision``: ``auto`` is ``bf16`` where this machine runs bf16 faster (``fast_bf16``), else ``no``."""
    if mixed_precision == "auto":
        return "bf16" if fast_bf16() else "no"
    return mixed_precision


def new_accelerator(mixed_precision: str = "no", timeout_s: float | None = None, shards_itself: bool = False):
    """An ``Accelerator`` for this run. Several runs in one process (``compare``, tests) may each pick
    their own precision: accelerate keeps one global state, so it is reset between runs (the process
    group, if any, is kept, with the timeout of the run that created it). ``timeout_s``: how long a
    collective waits for the other processes (None: ``DEFAULT_DISTRIBUTED_TIMEOUT_S``). ``shards_itself``: the command
    applies FSDP itself when asked (``train``, ``sft``: ``run/fsdp.py``); other commands refuse an FSDP launch on CPU."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import InitProcessGroupKwargs

    refuse_cpu_sharding(shards_itself)
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    timeout = datetime.timedelta(seconds=timeout_s or DEFAULT_DISTRIBUTED_TIMEOUT_S)
    return Accelerator(mixed_precision=resolve_mixed_precision(mixed_precision), cpu=cpu_only(), kwargs_handlers=[InitProcessGroupKwargs(timeout=timeout)])


def refuse_cpu_sharding(shards_itself: bool = False) -> None:
    """DeepSpeed asked of accelerate (``accelerate launch`` with such a config sets ``ACCELERATE_USE_DEEPSPEED``) on a
    machine without a GPU: a recipe error, not a silently different run.

    Measured with accelerate 1.x on 2 CPU processes: DeepSpeed ZeRO runs its engine over gloo, but accelerate tells
    every rank it is process 0 of 1, so every rank would write the checkpoints and no gather would gather. FSDP on CPU
    (accelerate would run plain data parallel) only for a command that shards itself (``run/fsdp.py``)."""
    import os

    from ..errors import UserError

    if not cpu_only():
        return
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        raise UserError("DeepSpeed through accelerate needs GPUs: on CPU accelerate tells every process it is process 0 "
                        "of 1, so checkpoints and metrics would be written by every rank and gathers would not gather; "
                        "for data parallel on CPU use `accelerate launch --config_file recipes/accelerate/cpu_2proc.yaml "
                        "-m rlhf_pg train RECIPE`, to shard `--config_file recipes/accelerate/fsdp_cpu_2proc.yaml`")
    if not shards_itself and os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        raise UserError("FSDP on CPU is rlhf-pg's own, for `train` and `sft` (accelerate does not shard on CPU: it would "
                        "run plain data parallel); for this command use `accelerate launch --config_file "
                        "recipes/accelerate/cpu_2proc.yaml ...`")


def collective_failure(error: BaseException) -> bool:
    """Did a collective fail because another process died or hangs? (torch's ``DistError``, or the
    ``RuntimeError`` text gloo and NCCL raise: a connection reset or closed by the peer, a timeout.)"""
    import torch.distributed as dist

    if isinstance(error, getattr(dist, "DistError", ())):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and any(
        sign in text for sign in ("gloo", "NCCL", "Connection reset by peer", "Connection closed by peer", "Timed out waiting"))


def set_threads(num_threads: int | None) -> None:
    """``torch.set_num_threads`` when the recipe asks for a number (None: torch's default)."""
    if num_threads:
        torch.set_num_threads(num_threads)
