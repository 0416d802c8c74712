"""``rlhf-pg plot``: PNG curves from metrics.jsonl."""

import json
import math

import pytest

from rlhf_pg.errors import UserError
from rlhf_pg.lab.plot import plot_runs


def _write_run(run_dir, steps=40, offset=0.0, with_kl=True):
    run_dir.mkdir(parents=True)
    lines = [{"step": 0, "eval/reward": 0.3 + offset}]
    for step in range(1, steps + 1):
        record = {"step": step, "reward/mean": 0.3 + offset + 0.6 * (1 - math.exp(-step / 10)),
                  "completion/length": 3.0 + step / steps}
        if with_kl:
            record["kl/ref"] = 0.001 * step if step != 7 else "nan"  # a non-finite value, as metrics.jsonl spells it
        if step % 10 == 0:
            record["eval/reward"] = 0.3 + offset + 0.6 * (1 - math.exp(-step / 10))
        lines.append(record)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return run_dir


def test_plot_writes_one_panel_per_logged_metric_and_skips_missing_ones(tmp_path):
    first, second = _write_run(tmp_path / "seed0"), _write_run(tmp_path / "seed1", offset=0.05, with_kl=False)
    written = plot_runs([first, second])
    names = [path.name for path in written]
    assert names[0] == "curves.png"
    # kl/ref is logged by one run only: it still gets a panel; policy/entropy is logged by none: no panel
    assert sorted(names[1:]) == ["completion_length.png", "eval_reward.png", "kl_ref.png", "reward_mean.png"]
    assert all(path.parent == tmp_path / "plots" for path in written)  # the runs' common parent
    for path in written:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


def test_plot_of_one_run_defaults_to_its_plots_dir_and_honours_output_dir(tmp_path):
    run = _write_run(tmp_path / "run")
    assert {p.parent for p in plot_runs([run])} == {run / "plots"}
    assert {p.parent for p in plot_runs([str(run)], output_dir=tmp_path / "out")} == {tmp_path / "out"}


def test_plot_of_a_dir_without_metrics_names_the_dir(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"empty has no metrics\.jsonl"):
        plot_runs([tmp_path / "empty"])


def test_plot_with_none_of_the_metrics_says_so(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "loss/nll": 2.0}\n')
    with pytest.raises(UserError, match="none of reward/mean"):
        plot_runs([run])
