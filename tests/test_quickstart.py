"""The quickstart, end to end, from the real built-in base model (slow: about 3 minutes from a cold cache)."""

import json
from pathlib import Path

import pytest

from rlhf_pg.recipe import load_recipe
from rlhf_pg.trainer import train

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quickstart_lifts_heldout_greedy_accuracy_above_0_9(tmp_path):
    summary = train(load_recipe(ROOT / "recipes" / "quickstart.yaml"), tmp_path, show_progress=False)
    assert summary["eval_reward_before"] <= 0.75
    assert summary["eval_reward_after"] >= 0.90, json.dumps(summary, indent=2)
