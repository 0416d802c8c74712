"""A run started on a busy CPU against the same run on an idle one (issue 28: ``train.cpu_matmul: auto``).

    HF_HUB_OFFLINE=1 python benchmarks/busy_start.py                               # ~25 min on 2 idle cores
    HF_HUB_OFFLINE=1 python benchmarks/busy_start.py --steps 20 --neighbour-seconds 60
    HF_HUB_OFFLINE=1 python benchmarks/busy_start.py --recipe recipes/quickstart.yaml --steps 2   # a smoke test

Runs ``rlhf-pg train RECIPE`` twice with the same seed, each in its own process, from a warm model cache (the
model is loaded once before either run, so a GGUF's one-time conversion is in neither): first on the idle machine,
then with a CPU-bound neighbour started just before the run and stopping by itself after ``--neighbour-seconds``
(``--neighbour-kind matmul``: ``--neighbour-threads`` torch threads multiplying 1024 x 1024 matrices, like another
training job; ``python``: that many processes spinning in pure-Python loops). Prints both wall times (process start
to exit) and their ratio, the kernel each run's ``summary.json`` ends on (``cpu_matmul``, ``cpu_matmul_switches``),
and the per-step kernel trace from ``metrics.jsonl`` (``perf/cpu_matmul``: 1 = oneDNN, 0 = torch) with the step
times. The issue's target: the busy-start run within 15 % of the idle run's wall time (``--tolerance``).

Run it on an otherwise idle machine: any other process is a second neighbour, in both runs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "smollm2_arithmetic.yaml"


def neighbour(kind: str, threads: int, seconds: float) -> None:
    """Keep ``threads`` cores busy for ``seconds`` (this process is the neighbour)."""
    deadline = time.monotonic() + seconds
    if kind == "matmul":
        import torch

        torch.set_num_threads(threads)
        a = torch.randn(1024, 1024)
        print("neighbour: busy", flush=True)
        while time.monotonic() < deadline:
            a = torch.tanh(a @ a)
        return
    import multiprocessing

    workers = [multiprocessing.Process(target=_spin, args=(deadline,)) for _ in range(threads)]
    for worker in workers:
        worker.start()
    print("neighbour: busy", flush=True)
    for worker in workers:
        worker.join()


def _spin(deadline: float) -> None:
    count = 0
    while time.monotonic() < deadline:
        count += 1


def start_neighbour(args) -> subprocess.Popen:
    """The neighbour process, once it is busy."""
    process = subprocess.Popen([sys.executable, __file__, "--be-neighbour", args.neighbour_kind,
                                str(args.neighbour_threads), str(args.neighbour_seconds)],
                               stdout=subprocess.PIPE, text=True)
    process.stdout.readline()  # "neighbour: busy"
    return process


def warm_model_cache(recipe: Path) -> None:
    code = ("from rlhf_pg.recipe import load_recipe; from rlhf_pg.models import load_policy; "
            f"load_policy(load_recipe({str(recipe)!r}).model)")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def train(args, output_dir: Path, label: str) -> dict:
    """One ``rlhf-pg train`` in its own process; its wall time, summary and per-step trace."""
    command = [sys.executable, "-m", "rlhf_pg", "--no-progress", "train", str(args.recipe), "--output-dir",
               str(output_dir), "--overwrite", "--seed", str(args.seed), "train.tensorboard=false"]
    if args.steps:
        command += ["--max-steps", str(args.steps)]
    log = output_dir.with_suffix(".log")
    started = time.perf_counter()
    environment = {**os.environ, "COLUMNS": "1000"}  # one console line per switch
    with log.open("w") as out:
        subprocess.run(command, cwd=ROOT, env=environment, check=True, stdout=out, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - started
    summary = json.loads((output_dir / "summary.json").read_text())
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r for r in records if "perf/step_s" in r]
    switches = [line.strip() for line in log.read_text().splitlines() if "cpu_matmul" in line and "->" in line]
    return {"label": label, "wall_s": wall, "summary_wall_time_s": summary.get("wall_time_s"),
            "cpu_matmul": summary.get("cpu_matmul"), "cpu_matmul_switches": summary.get("cpu_matmul_switches"),
            "eval_reward_before": summary.get("eval_reward_before"), "eval_reward_after": summary.get("eval_reward_after"),
            "trace": [(r["step"], r.get("perf/cpu_matmul"), r["perf/step_s"], r.get("perf/cpu_matmul_speedup"))
                      for r in steps],
            "switch_lines": switches, "log": str(log)}


def trace_text(trace: list) -> str:
    """Runs of steps on one kernel: ``1-3 torch (12.1 s/step), 4-80 onednn (7.0 s/step)``."""
    names = {1.0: "onednn", 0.0: "torch", None: "-"}
    parts, start = [], 0
    for index in range(1, len(trace) + 1):
        if index == len(trace) or trace[index][1] != trace[start][1]:
            seconds = [t[2] for t in trace[start:index]]
            span = f"{trace[start][0]}" if index - start == 1 else f"{trace[start][0]}-{trace[index - 1][0]}"
            parts.append(f"{span} {names.get(trace[start][1], trace[start][1])} "
                         f"({sorted(seconds)[len(seconds) // 2]:.2f} s/step median)")
            start = index
    return ", ".join(parts)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", type=Path, default=RECIPE, help="the recipe (default recipes/smollm2_arithmetic.yaml)")
    parser.add_argument("--steps", type=int, help="override train.steps (default: the recipe's)")
    parser.add_argument("--seed", type=int, default=0, help="the seed of both runs (default 0)")
    parser.add_argument("--neighbour-seconds", type=float, default=120.0, help="how long the neighbour keeps the CPU "
                        "busy from the start of the second run (default 120)")
    parser.add_argument("--neighbour-threads", type=int, default=2, help="its threads or processes (default 2)")
    parser.add_argument("--neighbour-kind", choices=("matmul", "python"), default="matmul")
    parser.add_argument("--tolerance", type=float, default=0.15, help="the target: busy wall <= (1 + this) x idle wall")
    parser.add_argument("--output-dir", type=Path, help="where both runs are written (default: a temporary folder)")
    parser.add_argument("--output", type=Path, help="also write the figures as JSON here")
    parser.add_argument("--be-neighbour", nargs=3, metavar=("KIND", "THREADS", "SECONDS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.be_neighbour:
        kind, threads, seconds = args.be_neighbour
        neighbour(kind, int(threads), float(seconds))
        return {}
    args.recipe = args.recipe.resolve()
    base = args.output_dir or Path(tempfile.mkdtemp(prefix="busy_start-"))
    base.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    print(f"recipe {args.recipe.name}, steps {args.steps or 'as the recipe'}, seed {args.seed}; runs in {base}")
    warm_model_cache(args.recipe)
    idle = train(args, base / "idle", "idle")
    print(f"idle run: {idle['wall_s']:.1f} s, ends on {idle['cpu_matmul']}", flush=True)
    busy_neighbour = start_neighbour(args)
    try:
        busy = train(args, base / "busy", "busy start")
    finally:
        busy_neighbour.kill()
        busy_neighbour.wait()
    ratio = busy["wall_s"] / idle["wall_s"]
    print(f"\nneighbour: {args.neighbour_kind} x {args.neighbour_threads} for the first {args.neighbour_seconds:.0f} s "
          "of the busy-start run")
    for run in (idle, busy):
        print(f"{run['label']:>10}: wall {run['wall_s']:.1f} s (summary wall_time_s {run['summary_wall_time_s']}), "
              f"cpu_matmul {run['cpu_matmul']} ({run['cpu_matmul_switches']} switch(es)), held-out "
              f"{run['eval_reward_before']} -> {run['eval_reward_after']}")
        print(f"{'':>10}  kernel per step: {trace_text(run['trace'])}")
        for line in run["switch_lines"]:
            print(f"{'':>10}  {line}")
    verdict = "within" if ratio <= 1 + args.tolerance else "NOT within"
    print(f"ratio busy / idle = {ratio:.3f}: {verdict} {args.tolerance:.0%} of the idle run")
    figures = {"idle": idle, "busy": busy, "ratio": ratio, "within_tolerance": ratio <= 1 + args.tolerance,
               "neighbour": {"kind": args.neighbour_kind, "threads": args.neighbour_threads,
                             "seconds": args.neighbour_seconds}, "recipe": str(args.recipe), "steps": args.steps,
               "seed": args.seed}
    if args.output:
        args.output.write_text(json.dumps(figures, indent=2))
    return figures


if __name__ == "__main__":
    main()
