"""The over-optimization report: PNGs from metrics.jsonl, clear errors for runs it cannot plot."""

import json

import pytest
import yaml

from rlhf_pg.errors import UserError
from rlhf_pg.lab.report import moving_average, write_report


def fake_run(path, kl_coef, steps=40, with_kl=True):
    """A run directory whose proxy keeps rising while the gold reward peaks at step 15 (lower beta: faster)."""
    path.mkdir(parents=True)
    recipe = {"algorithm": {"kl_coef": kl_coef},
              "rewards": [{"name": "reward_model", "weight": 1.0, "path": "x"}, {"name": "arithmetic_exact", "weight": 0.0}]}
    (path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    speed = 1.0 / (1.0 + 10 * kl_coef)
    records = [{"step": 0, "eval/reward": 0.0}]
    for step in range(1, steps + 1):
        t = step * speed
        record = {"step": step, "reward/mean": t / 10, "reward/reward_model/mean": t / 10,
                  "reward/arithmetic_exact/mean": 0.4 + 0.02 * t - 0.001 * t * t}
        if with_kl:
            record["kl/ref"] = 0.3 * t
        records.append(record)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_moving_average_is_the_trailing_mean():
    assert moving_average([1.0, 2.0, 3.0, 4.0, 5.0], 3) == pytest.approx([1.0, 1.5, 2.0, 3.0, 4.0])
    assert moving_average([2.0, 4.0], 1) == [2.0, 4.0]


def test_report_draws_pngs_from_metrics_of_several_runs(tmp_path):
    import matplotlib.image

    runs = [fake_run(tmp_path / "runs" / f"kl_{beta}", beta) for beta in (0.0, 0.2)]
    written = write_report(runs, smooth=5)
    assert [p.name for p in written] == ["goodhart.png", "rewards_by_step.png"]
    assert all(p.parent == tmp_path / "runs" / "report" for p in written)  # the runs' common parent
    for path in written:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        image = matplotlib.image.imread(path)
        assert image.shape[0] > 200 and image.shape[1] > 600 and image.std() > 0  # drawn, not blank
    # one run, an explicit gold name, an explicit output directory
    single = write_report([runs[0]], tmp_path / "out", gold=["reward_model"])
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["goodhart.png", "rewards_by_step.png"]
    assert single[0].exists()


def test_report_errors_name_what_is_missing(tmp_path):
    with pytest.raises(UserError, match="has no metrics.jsonl"):
        write_report([tmp_path / "nothing"])
    no_kl = fake_run(tmp_path / "no_kl", 0.0, with_kl=False)
    with pytest.raises(UserError, match="logged no kl/ref; train with algorithm.kl_coef > 0 or algorithm.log_kl: true"):
        write_report([no_kl])
    run = fake_run(tmp_path / "run", 0.1)
    with pytest.raises(UserError, match="no metric reward/gold/mean; its rewards are: arithmetic_exact, reward_model"):
        write_report([run], gold=["gold"])
