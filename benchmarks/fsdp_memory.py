"""Per-process peak RSS and s/step at 135M (SmolLM2): one process, 2-process DDP, 2-process FSDP2, on this CPU.

    HF_HUB_OFFLINE=1 python benchmarks/fsdp_memory.py                    # 3 steps each, ~10 min on 2 busy cores
    HF_HUB_OFFLINE=1 python benchmarks/fsdp_memory.py --steps 2 --only fsdp ddp --output figures.json

Each contender is `rlhf-pg train recipes/smollm2_arithmetic.yaml` for ``--steps`` steps with the recipe's rollout
(32 prompts x 4 completions x 16 new tokens, AdamW, no reference model), held-out evaluation on 8 prompts only (before
and after) and the final checkpoint + final/ as every run writes them:

    single   python -m rlhf_pg train RECIPE                                   (train.num_threads: 2, the recipe's)
    ddp      accelerate launch --config_file recipes/accelerate/cpu_2proc.yaml -m rlhf_pg train RECIPE
    fsdp     accelerate launch --config_file recipes/accelerate/fsdp_cpu_2proc.yaml -m rlhf_pg train RECIPE
             (both 2-process runs: train.num_threads 1 per process, the 2 cores shared)

Every process writes its peak resident set (``VmHWM`` of /proc/self/status) when it exits; s/step is the mean of
``perf/step_s`` over the steps after the first. The target of issue #25: FSDP2's largest per-process peak RSS
<= 0.7 x DDP's.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = {"ddp": "recipes/accelerate/cpu_2proc.yaml", "fsdp": "recipes/accelerate/fsdp_cpu_2proc.yaml"}


def _peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def child(out_dir: str, argv: list[str]) -> None:
    """One process of a contender: rlhf-pg's CLI, then its peak RSS to ``out_dir/rss-<rank>.json``."""
    rank = os.environ.get("RANK", "0")
    atexit.register(lambda: Path(out_dir, f"rss-{rank}.json").write_text(json.dumps({"peak_rss_mb": _peak_rss_mb()})))
    from rlhf_pg.cli import main

    sys.argv = ["rlhf-pg", *argv]
    try:
        main()
    except SystemExit as stop:
        if stop.code:
            raise


def contender(name: str, recipe: str, steps: int, work: Path) -> dict:
    out = work / name
    out.mkdir(parents=True)
    threads = 2 if name == "single" else 1
    train = ["--no-progress", "train", recipe, "--output-dir", str(out / "run"), "--max-steps", str(steps),
             "data.num_eval=8", "train.eval_every=0", "train.save_every=0", "train.log_completions_every=0",
             "train.tensorboard=false", f"train.num_threads={threads}", "train.mixed_precision=no"]
    script = [str(Path(__file__).resolve()), "--child", str(out), "--", *train]
    if name == "single":
        command = [sys.executable, *script]
    else:
        command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / CONFIGS[name]),
                   *script]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": str(threads)}
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"{name} failed (exit {result.returncode}):\n{result.stderr[-3000:]}")
    records = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    step_s = [r["perf/step_s"] for r in records if "perf/step_s" in r]
    timed = step_s[1:] or step_s
    rss = [json.loads(path.read_text())["peak_rss_mb"] for path in sorted(out.glob("rss-*.json"))]
    summary = json.loads((out / "run" / "summary.json").read_text())
    shutil.rmtree(out / "run", ignore_errors=True)  # ~1.6 GB of checkpoint and final/
    return {"contender": name, "processes": len(rss), "peak_rss_mb_per_process": [round(v) for v in rss],
            "max_peak_rss_mb": round(max(rss)), "s_per_step": round(sum(timed) / len(timed), 2),
            "s_per_step_all": [round(v, 2) for v in step_s], "wall_s": round(wall, 1),
            "world_size": summary["world_size"], "fsdp": summary.get("fsdp", False)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default=str(ROOT / "recipes" / "smollm2_arithmetic.yaml"))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--only", nargs="+", choices=["single", "ddp", "fsdp"], default=["single", "ddp", "fsdp"])
    parser.add_argument("--output", help="also write the figures as JSON here")
    args = parser.parse_args()
    load = os.getloadavg()[0]
    rows = []
    with tempfile.TemporaryDirectory(prefix="fsdp-memory-") as work:
        for name in args.only:
            rows.append(contender(name, args.recipe, args.steps, Path(work)))
            print(json.dumps(rows[-1]), flush=True)
    figures = {"recipe": args.recipe, "steps": args.steps, "load_average_at_start": round(load, 2), "rows": rows}
    by_name = {row["contender"]: row for row in rows}
    if "ddp" in by_name and "fsdp" in by_name:
        figures["fsdp_over_ddp_peak_rss"] = round(by_name["fsdp"]["max_peak_rss_mb"] / by_name["ddp"]["max_peak_rss_mb"], 3)
    print(f"\n| contender | processes | peak RSS per process (MB) | s/step (after the first) |\n|---|---|---|---|")
    for row in rows:
        print(f"| {row['contender']} | {row['processes']} | {' / '.join(map(str, row['peak_rss_mb_per_process']))} | "
              f"{row['s_per_step']} |")
    if "fsdp_over_ddp_peak_rss" in figures:
        print(f"\nFSDP2 / DDP largest per-process peak RSS: {figures['fsdp_over_ddp_peak_rss']} (target <= 0.7)")
    if args.output:
        Path(args.output).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[4:] if sys.argv[3] == "--" else sys.argv[3:])
    else:
        main()
