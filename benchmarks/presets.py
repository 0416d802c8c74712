"""Does each preset train? The quickstart task with ``algorithm: {preset: NAME}`` and nothing else changed.

    python benchmarks/presets.py [--presets grpo,rloo] [--seeds 0,1] [--steps 300] [--out runs/presets]

For every preset and seed: held-out greedy accuracy (500 problems) before training, at step 150 and at
the end, and the first evaluation step (every 25) at which it reached 0.9. Prints a Markdown table (the
README's) and writes ``OUT/presets.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rlhf_pg.config import load_yaml  # noqa: E402
from rlhf_pg.core.presets import PRESETS  # noqa: E402
from rlhf_pg.recipe import recipe_from_dict  # noqa: E402
from rlhf_pg.run.metrics import read_metrics  # noqa: E402
from rlhf_pg.trainer import train  # noqa: E402


def run_preset(name: str, seed: int, steps: int, out: Path, threads: int) -> dict:
    data = load_yaml(ROOT / "recipes" / "quickstart.yaml")
    data["algorithm"] = {"preset": name}
    data["seed"] = seed
    data["train"] = {**data["train"], "steps": steps, "save_every": 0, "tensorboard": False, "num_threads": threads}
    started = time.perf_counter()
    summary = train(recipe_from_dict(data), out / f"{name}-seed{seed}", overwrite=True, show_progress=False)
    curve = {r["step"]: r["eval/reward"] for r in read_metrics(out / f"{name}-seed{seed}" / "metrics.jsonl")
             if "eval/reward" in r}
    reached = next((step for step in sorted(curve) if curve[step] >= 0.9), None)
    return {"preset": name, "seed": seed, "before": curve[0], "at_150": curve.get(150), "after": summary["eval_reward_after"],
            "steps_to_0.9": reached, "wall_s": round(time.perf_counter() - started, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default=",".join(PRESETS))
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="runs/presets")
    args = parser.parse_args()
    out = Path(args.out)
    rows = []
    for name in args.presets.split(","):
        for seed in (int(s) for s in args.seeds.split(",")):
            rows.append(run_preset(name, seed, args.steps, out, args.threads))
            print(json.dumps(rows[-1]), flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "presets.json").write_text(json.dumps(rows, indent=2))
    print("\n| preset | seed | before | step 150 | step 300 | steps to 0.9 |\n|---|---|---|---|---|---|")
    for row in rows:
        at_150 = f"{row['at_150']:.3f}" if row["at_150"] is not None else "-"
        print(f"| {row['preset']} | {row['seed']} | {row['before']:.3f} | {at_150} | {row['after']:.3f} | "
              f"{row['steps_to_0.9'] or 'not reached'} |")


if __name__ == "__main__":
    main()
