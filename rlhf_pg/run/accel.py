"""The accelerator: one ``accelerate.Accelerator`` per run, on CPU, one GPU or many processes."""

from __future__ import annotations

import torch


def cpu_only() -> bool:
    """No GPU-like device: tell accelerate so, which makes `accelerate launch --multi_gpu` / `torchrun`
    run several CPU processes with the gloo backend instead of several independent single processes."""
    xpu = getattr(torch, "xpu", None)
    return not (torch.cuda.is_available() or torch.backends.mps.is_available() or (xpu is not None and xpu.is_available()))


def new_accelerator(mixed_precision: str = "no"):
    """An ``Accelerator`` for this run. Several runs in one process (``compare``, tests) may each pick
    their own precision: accelerate keeps one global state, so it is reset between runs (the process
    group, if any, is kept)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    return Accelerator(mixed_precision=mixed_precision, cpu=cpu_only())


def set_threads(num_threads: int | None) -> None:
    """``torch.set_num_threads`` when the recipe asks for a number (None: torch's default)."""
    if num_threads:
        torch.set_num_threads(num_threads)
