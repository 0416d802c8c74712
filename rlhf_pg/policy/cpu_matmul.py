"""``train.cpu_matmul``: which float32 matmul kernel a CPU run's linear layers use, and how ``auto`` keeps it right.

Two kernels compute the same product (``kernels.py``): torch's own ``F.linear`` (MKL's sgemm on x86) and
oneDNN's. Which is faster depends on the processor. On the 2-core AMD EPYC VM these benchmarks ran on, with
AVX-512, oneDNN was about 2x MKL in every idle measurement (update shapes 437.7 against 203.7 GFLOPS, decoding's
32-row shapes 259.8 against 135.7; one other day only 1.2x): MKL does not take its fastest paths on non-Intel x86.
The same VM on an AVX2-only host (idle, 2 threads, SmolLM2's 576->1536 layer) measured the two within ~10 % of
each other: 512 rows 149 (oneDNN) against 162 GFLOPS (MKL), 128 rows 147 against 124, 2048 rows 87 against 95.
Elsewhere either may win.

**What went wrong before.** ``auto`` timed both kernels once, at setup, and kept the answer for the whole run. A
probe is a few milliseconds of one moment: taken while a neighbour used the CPU, it measured the neighbour, and
a SmolLM2 run that takes 11 minutes took 26, on MKL to its end, long after the neighbour had gone (issue 28).

**How ``auto`` decides now** (``MatmulChoice``):

1. Start from what is known (``prior``): oneDNN on AMD x86 with AVX-512 (every idle measurement there), torch
   elsewhere.
2. Measure both kernels on the run's own matmuls (``probe_shapes``: the model's largest linear layer, its forward
   and its input gradient at 512 rows like the update, its forward at the rollout's batch like decoding),
   interleaved, in alternating order, at setup (7 rounds: 0.28 s for SmolLM2, idle, AVX2 host) and again between
   steps (3 rounds, 18 matmuls: 85-94 ms measured there, about 1 % of a 7-11 s step, and rarer once they agree). A model whose layers are too small
   for the kernel to matter (``MIN_PROBE_FLOPS``) keeps torch's kernel, untimed.
3. Keep the *best* time each kernel has shown at each shape over the whole run. Another process on the CPU only
   ever adds time, so the best of many timings is the kernel's unhindered speed as soon as one quiet moment has
   been seen, and a disturbed timing can never make a kernel look faster than it is. The speed-up compared is
   the geometric mean over the shapes of ``best(torch) / best(onednn)``.
4. Switch only when the other kernel is faster by ``MARGIN`` (1.15): kernels within noise of each other do not
   flip-flop, and since the best times only decrease towards the true ones, the switches stop.
5. Re-check after step 1, then at doubling intervals (2, 4, 8, up to ``MAX_INTERVAL`` steps) while the checks
   agree with the best times; a check that sees load (a time ``LOADED`` x its best) or a new best (below
   ``1 / MOVED`` of it: the earlier evidence was disturbed) brings the next check to the very next step. So a busy
   start costs a few steps on the slower kernel at most, not the run. Checks never take more than
   ``CHECK_BUDGET`` (2 %) of the step time: on a loaded CPU a check is slower too (0.9-1.2 s measured at
   SmolLM2's shapes with a load average of 4 on the 2 cores).

6. Sampling has its own contender: oneDNN with each weight packed once for the rollout (``packed.PackedLinear``),
   timed at the decode shape beside the other two (``sampling_speedup``). A decode step multiplies 32 rows by
   weights that do not change, where packing saves oneDNN's per-call reorder: on an AVX2 host where MKL led the
   update's shapes, packed oneDNN measured 1.37-1.5x MKL at SmolLM2-135M's decode shapes (the head's 1.9x), the
   rollout 11.4 -> 9.4 s. So ``sampling`` is packed oneDNN whenever training runs on oneDNN, and otherwise when the
   packed product is ``MARGIN`` x faster than torch's (``packed.sample_on_onednn`` marks the layers; the samplers'
   ``packed_linears`` packs what is marked), with the same hysteresis; a pinned choice samples on the pinned kernel.

A switch happens between steps: ``use_onednn_linears`` / ``use_torch_linears`` re-route every ``nn.Linear`` of the
policy and the reference (the same product, to float32 rounding), the chunked log-prob head reads
``uses_onednn(head)`` at each call, and the sampler builds its decoder at each rollout from ``uses_onednn``: all
follow at the next step. Each process of a multi-process CPU run decides for itself (no collective is needed:
either kernel computes the same gradient). ``time_matmul`` is the one place the kernels are timed (the tests
replace it to simulate a disturbed probe). The two kernels' results differ in the last bits (~1e-6 relative), so
under ``auto`` two runs of a recipe agree to float rounding, not bit for bit; ``onednn`` or ``torch`` pins it.

Metrics (every step of a CPU run): ``perf/cpu_matmul`` the kernel the step ran on (1 = oneDNN, 0 = torch),
``perf/cpu_matmul_sampling`` sampling's (1 = packed oneDNN),
``perf/cpu_matmul_speedup`` best(torch) / best(onednn) so far (> 1: oneDNN faster), ``perf/cpu_matmul_switches``
the run's switches so far, ``perf/cpu_matmul_check_s`` the seconds spent checking after the step.
"""

from __future__ import annotations

import math
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .kernels import _eligible, _onednn, onednn_available, sharded, use_onednn_linears, use_torch_linears
from .packed import _REORDER, sample_on_onednn

Tensor = torch.Tensor

KERNELS = {"torch": 0.0, "onednn": 1.0}  # the value of the perf/cpu_matmul metric
MARGIN = 1.15  # switch when the other kernel is at least this much faster
LOADED = 1.3  # a check time this much above its best: the CPU is busy now
MOVED = 1.1  # a check time this much below its best: the best was a disturbed time, keep checking
MAX_INTERVAL = 16  # steps between checks once they agree
CHECK_BUDGET = 0.02  # at most this fraction of the step time spent checking (a check is longer on a busy CPU)
UPDATE_ROWS = 512  # rows of the update-like probe (the update's are ~1-4k; fewer keep a check short)
MAX_PROBE_FLOPS = 1e9  # per timed call: fewer rows for wider layers (SmolLM2's 576->1536 at 512 rows: 0.9 GFLOP)
MIN_PROBE_FLOPS = 50e6  # below this at UPDATE_ROWS the layer is overhead-bound: torch's kernel, untimed
SETUP_ROUNDS, CHECK_ROUNDS = 7, 3


def cpu_vendor() -> str:
    """The x86 vendor string (``AuthenticAMD``, ``GenuineIntel``), or ``""`` (another architecture, or unknown)."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("vendor_id"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    processor = platform.processor()  # Windows: "AMD64 Family 25 Model 1 Stepping 1, AuthenticAMD"
    return next((name for name in ("AuthenticAMD", "GenuineIntel") if name in processor), "")


def cpu_features() -> str:
    """The vector instructions torch's CPU kernels use here: ``AVX512``, ``AVX2``, ``DEFAULT``, ``SVE256``, ..."""
    return torch.backends.cpu.get_cpu_capability()


def prior() -> tuple[str, str]:
    """The kernel to start from before any timing, and why: oneDNN only where it won every idle measurement (AMD
    x86 with AVX-512); on the same 2-core VM on an AVX2-only host the two were within ~10 % of each other (and
    MKL ahead at some shapes), so there, and on every other processor, torch's own until oneDNN measures faster."""
    vendor, features = cpu_vendor(), cpu_features()
    if vendor == "AuthenticAMD" and features.startswith("AVX512"):
        return "onednn", f"AMD x86, {features}: oneDNN ~2x MKL in every idle measurement there"
    return "torch", f"{vendor or platform.machine()}, {features}: no known winner, torch's own unless oneDNN measures faster"


def applicable(model: torch.nn.Module) -> str | None:
    """Why the choice cannot apply to ``model`` (then its linear layers keep torch's kernel), or None."""
    parameter = next(model.parameters(), None)
    if parameter is None or parameter.device.type != "cpu":
        return "not on the CPU"
    if parameter.dtype != torch.float32:
        return f"{parameter.dtype} weights (oneDNN's path here is float32 only)"
    if any(sharded(p) for p in model.parameters()):
        return "parameters sharded between forwards (FSDP / ZeRO-3)"
    if not onednn_available():
        return "this torch build has no oneDNN linear op"
    return None


@dataclass
class ProbeShape:
    """One timed matmul: ``x @ weight.T`` with ``x`` ``[rows, weight.shape[1]]``; ``share`` of the geometric mean."""

    name: str
    x: Tensor
    weight: Tensor
    share: float
    layer: str  # the linear layer's "in->out" features
    packed: Tensor | None = None  # the weight packed for oneDNN (``packed.PackedLinear``): decode's contender


def probe_shapes(model: torch.nn.Module, decode_rows: int = 32, update_rows: int = UPDATE_ROWS) -> list[ProbeShape]:
    """The run's own matmuls: the model's largest linear layer (its real weight, not the output layer when there
    are others) at the update's rows, forward (``x W^T``) and input gradient (``g W``), and forward at the
    rollout's batch like a decode step. Shapes where oneDNN is never used (``kernels._eligible``) are left out.
    Shares: 1/3 each (the update is ~2/3 of a SmolLM2 step's time, decoding most of the rest).

    None when the layer is too small for the kernel to matter (under ``MIN_PROBE_FLOPS`` at ``UPDATE_ROWS``:
    tens of microseconds, where a step's time is per-op overhead and timing noise is as large as the
    difference): such a model keeps torch's kernel, untimed, so tiny models train bit-reproducibly."""
    linears = [m for m in model.modules() if type(m) is torch.nn.Linear]
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    body = [m for m in linears if m is not head] or linears
    if not body:
        return []
    weight = max(body, key=lambda m: m.weight.numel()).weight.detach()
    out_features, in_features = weight.shape
    flops_per_row = 2 * in_features * out_features
    if flops_per_row * update_rows < MIN_PROBE_FLOPS:
        return []
    update_rows = max(64, min(update_rows, int(MAX_PROBE_FLOPS // flops_per_row)))
    layer = f"{in_features}->{out_features}"
    generator = torch.Generator().manual_seed(0)
    shapes = [ProbeShape("update", torch.randn(update_rows, in_features, generator=generator), weight, 1 / 3, layer),
              ProbeShape("update_grad", torch.randn(update_rows, out_features, generator=generator), weight.t(), 1 / 3,
                         layer),
              ProbeShape("decode", torch.randn(decode_rows, in_features, generator=generator), weight, 1 / 3, layer)]
    if _REORDER is not None and onednn_available():  # sampling's own contender: oneDNN with the weight packed once
        shapes[-1].packed = _REORDER(weight, max(decode_rows, 1))
    return [shape for shape in shapes if _eligible(shape.x, shape.weight)]


def time_matmul(kernel: str, x: Tensor, weight: Tensor) -> float:
    """Seconds for one ``x @ weight.T`` through ``kernel`` (``onednn`` or ``torch``; ``packed``: oneDNN with ``weight``
    already packed, ``ProbeShape.packed``): the one place kernels are timed."""
    started = time.perf_counter()
    if kernel in ("onednn", "packed"):
        _onednn(x, weight)
    else:
        F.linear(x, weight)
    return time.perf_counter() - started


class MatmulChoice:
    """The kernel a run's linear layers use (``train.cpu_matmul``), re-checked between steps under ``auto``.

    ``models``: the policy and the reference (None or non-modules are skipped), switched together.
    ``decode_rows``: the rollout's batch (completions per step on this process)."""

    def __init__(self, choice: str, models: list, decode_rows: int = 32):
        self.choice = choice
        self.models = [m for m in models if isinstance(m, torch.nn.Module)]
        self.best: dict[tuple[str, str], float] = {}  # (kernel, shape name) -> best seconds seen in the run
        self.switches, self.checks, self.interval, self.next_check = 0, 0, 1, 1
        self.check_s = 0.0  # seconds the last after_step spent checking
        self.shapes: list[ProbeShape] = []
        blocked = applicable(self.models[0]) if self.models else "no model"
        self.kernel, self.active = "torch", False
        self.sampling = "torch"  # the kernel sampling decodes with: "onednn" = packed weights (packed_linears)
        self.reason = ""  # why this kernel, for people (the doctor prints it)
        if blocked is not None:
            self.reason = blocked
        elif choice in ("onednn", "torch"):
            self.kernel, self.sampling, self.reason = choice, choice, f"train.cpu_matmul={choice}"
        else:
            self.shapes = probe_shapes(self.models[0], decode_rows)
            self.active = bool(self.shapes)
            if not self.active:
                self.reason = ("this model's matmuls are too small for the kernel to matter (under "
                               f"{MIN_PROBE_FLOPS / 1e6:.0f} MFLOP a call): torch's, untimed")
            else:
                start, why = prior()
                self.kernel = self.sampling = start
                self._measure(SETUP_ROUNDS)
                self._decide()
                self.reason = (f"the setup probe measured {self.evidence()}; prior: {start} ({why}); a switch needs "
                               f"{MARGIN}x, the run re-checks between steps")
        self._route(self.kernel)

    @property
    def on_cpu(self) -> bool:
        parameter = next(self.models[0].parameters(), None) if self.models else None
        return parameter is not None and parameter.device.type == "cpu"

    def speedup(self) -> float | None:
        """Geometric mean over the probe shapes of best(torch) / best(onednn): > 1 when oneDNN is faster."""
        if not self.best:
            return None
        log_ratio = sum(s.share * math.log(self.best["torch", s.name] / self.best["onednn", s.name]) for s in self.shapes)
        return math.exp(log_ratio / sum(s.share for s in self.shapes))

    def evidence(self) -> str:
        speedup = self.speedup()
        if speedup is None:
            return "no timing"
        faster, ratio = ("oneDNN", speedup) if speedup >= 1 else ("torch", 1 / speedup)
        rows = "/".join(f"{s.x.shape[0]}" for s in self.shapes)
        sampling = self.sampling_speedup()
        decode = "" if sampling is None else (
            f"; decoding: oneDNN with packed weights {sampling:.2f}x torch's, sampling on "
            f"{'packed oneDNN' if self.sampling == 'onednn' else 'torch'}")
        return (f"{faster} {ratio:.2f}x faster at this model's shapes (layer {self.shapes[0].layer}, "
                f"{'/'.join(s.name for s in self.shapes)} at {rows} rows; best of {self.checks} check(s)){decode}")

    def sampling_speedup(self) -> float | None:
        """best(torch) / best(packed oneDNN) at the decode shape (> 1: sampling is faster on packed weights)."""
        torch_s, packed_s = self.best.get(("torch", "decode")), self.best.get(("packed", "decode"))
        return None if torch_s is None or packed_s is None else torch_s / packed_s

    def after_step(self, step: int, step_s: float | None = None) -> str | None:
        """Between steps (``step`` = steps done, ``step_s`` the step's seconds): re-check when due; returns a line
        describing a switch, or None. Checks stay under ``CHECK_BUDGET`` of the step time on average."""
        self.check_s = 0.0
        if not self.active or step < self.next_check:
            return None
        started = time.perf_counter()
        previous, sampled = self.kernel, self.sampling
        settled = self._measure(CHECK_ROUNDS)
        self._decide()
        self.interval = min(2 * self.interval, MAX_INTERVAL) if settled else 1
        self.check_s = time.perf_counter() - started
        affordable = math.ceil(self.check_s / (CHECK_BUDGET * step_s)) if step_s else 1
        self.next_check = step + max(self.interval, affordable)
        if self.kernel == previous and self.sampling == sampled:
            return None
        self.switches += 1
        self._route(self.kernel)
        return (f"cpu_matmul {previous} -> {self.kernel} (sampling {sampled} -> {self.sampling}): {self.evidence()}; "
                "the earlier timings were slower (another process on the CPU then?)")

    def metrics(self, kernel: str | None = None) -> dict[str, float]:
        """This step's ``perf/cpu_matmul*`` metrics (``kernel``: the one the step ran on; default the current)."""
        if not self.on_cpu:
            return {}
        metrics = {"perf/cpu_matmul": KERNELS[kernel or self.kernel], "perf/cpu_matmul_switches": float(self.switches),
                   "perf/cpu_matmul_check_s": self.check_s, "perf/cpu_matmul_sampling": KERNELS[self.sampling]}
        if self.speedup() is not None:
            metrics["perf/cpu_matmul_speedup"] = self.speedup()
        return metrics

    # --- inside --------------------------------------------------------------------------------------------

    def _measure(self, rounds: int) -> bool:
        """Time both kernels ``rounds`` times at each shape, interleaved, alternating which goes first; fold the
        times into the bests. True when the check agrees with the bests (no load seen, no new best)."""
        seen: dict[tuple[str, str], float] = {}
        with torch.inference_mode():
            if not self.best:  # first use: one untimed call each (allocation, oneDNN's primitive cache)
                for shape in self.shapes:
                    for kernel in self._contenders(shape):
                        time_matmul(kernel, shape.x, shape.packed if kernel == "packed" else shape.weight)
            for index in range(rounds):
                for shape in self.shapes:
                    kernels = self._contenders(shape)
                    for kernel in (kernels if index % 2 == 0 else kernels[::-1]):
                        seconds = time_matmul(kernel, shape.x, shape.packed if kernel == "packed" else shape.weight)
                        seen[kernel, shape.name] = min(seen.get((kernel, shape.name), math.inf), seconds)
        settled = bool(self.best)
        for key, seconds in seen.items():
            best = self.best.get(key, math.inf)
            if best < math.inf and (seconds > LOADED * best or seconds * MOVED < best):
                settled = False
            self.best[key] = min(best, max(seconds, 1e-9))
        self.checks += 1
        return settled

    @staticmethod
    def _contenders(shape: ProbeShape) -> tuple[str, ...]:
        return ("onednn", "torch", "packed") if shape.packed is not None else ("onednn", "torch")

    def _decide(self) -> None:
        """The training kernel by ``speedup`` and, beside it, sampling's: packed oneDNN whenever training is on
        oneDNN (packing only saves its reorders), else by ``sampling_speedup``; each switches past ``MARGIN``."""
        speedup = self.speedup()
        if speedup is None:
            return
        if self.kernel == "torch" and speedup >= MARGIN:
            self.kernel = "onednn"
        elif self.kernel == "onednn" and speedup * MARGIN <= 1.0:
            self.kernel = "torch"
        sampling = self.sampling_speedup()
        if self.kernel == "onednn":
            self.sampling = "onednn"
        elif sampling is None:
            self.sampling = "torch"
        elif self.sampling == "torch" and sampling >= MARGIN:
            self.sampling = "onednn"
        elif self.sampling == "onednn" and sampling * MARGIN <= 1.0:
            self.sampling = "torch"

    def _route(self, kernel: str) -> None:
        for model in self.models:
            (use_onednn_linears if kernel == "onednn" else use_torch_linears)(model)
            sample_on_onednn(model, self.sampling == "onednn" and self.on_cpu)


def explain_choice(choice: str, model: torch.nn.Module, decode_rows: int = 32) -> dict:
    """For ``rlhf-pg doctor``: the kernel ``auto`` picks for ``model`` here and why (the setup probe a run takes),
    and the kernel ``choice`` gives (``model`` is left routed so). Keys: choice, kernel, auto, reason, probed."""
    auto = MatmulChoice("auto", [model], decode_rows)
    kernel = auto.kernel if choice == "auto" else MatmulChoice(choice, [model], decode_rows).kernel
    return {"choice": choice, "kernel": kernel, "auto": auto.kernel, "reason": auto.reason, "probed": auto.active}
