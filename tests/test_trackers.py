"""Trackers through accelerate (``train.report_to``) behind ``MetricsLogger``."""

import importlib.util
import json

import pytest

from rlhf_pg.errors import UserError
from rlhf_pg.run import trackers
from rlhf_pg.run.metrics import MetricsLogger, read_metrics

RECIPE = {"model": "builtin:arith-gpt", "train": {"steps": 3, "report_to": ["tensorboard"]},
          "rollout": {"temperature": 1.0, "stop": None}}
ROWS = [{"step": 2, "prompt": "12+7=", "completion": "19", "reward": 1.0},
        {"step": 2, "prompt": "19+1=", "completion": "1|0\n", "reward": 0.0}]


def _log_three_steps(logger):
    for step in (1, 2, 3):
        logger.log(step, {"reward/mean": 0.1 * step, "kl/ref": 0.01, "loss/policy": float("nan")})
    logger.log_completions(2, ROWS)
    logger.close()


def _tensorboard_events(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"tensors": 0, "scalars": 0})
    events.Reload()
    return events


def test_tensorboard_tracker_writes_metrics_under_their_jsonl_names_and_a_completions_table(tmp_path):
    _log_three_steps(MetricsLogger(tmp_path, report_to=["tensorboard"], config=RECIPE))
    events = _tensorboard_events(tmp_path / "tensorboard")
    assert {"reward/mean", "kl/ref"} <= set(events.Tags()["scalars"])
    assert "loss/policy" not in events.Tags()["scalars"]  # non-finite: in metrics.jsonl only
    assert [(e.step, round(e.value, 6)) for e in events.Scalars("reward/mean")] == [(1, 0.1), (2, 0.2), (3, 0.3)]
    table = events.Tensors("completions/text_summary")[0]
    markdown = table.tensor_proto.string_val[0].decode()
    assert table.step == 2 and "| step | prompt | completion | reward |" in markdown and "1\\|0<br>" in markdown
    assert read_metrics(tmp_path / "metrics.jsonl")[0] == {"step": 1, "reward/mean": 0.1, "kl/ref": 0.01,
                                                           "loss/policy": "nan"}
    # the recipe, flattened to the override names, is the run's configuration (accelerate keeps a copy)
    (hparams,) = (tmp_path / "tensorboard").glob("*/hparams.yml")
    assert "train.steps: 3" in hparams.read_text() and "rollout.stop: 'null'" in hparams.read_text()


def test_old_constructor_still_means_tensorboard_and_tensorboard_false_means_none(tmp_path):
    (tmp_path / "default").mkdir(), (tmp_path / "off").mkdir()
    _log_three_steps(MetricsLogger(tmp_path / "default"))
    assert "reward/mean" in _tensorboard_events(tmp_path / "default" / "tensorboard").Tags()["scalars"]
    _log_three_steps(MetricsLogger(tmp_path / "off", tensorboard=False, report_to=["tensorboard"]))
    assert not (tmp_path / "off" / "tensorboard").exists() and (tmp_path / "off" / "metrics.jsonl").exists()


def test_only_the_enabled_logger_writes_or_starts_trackers(tmp_path):
    logger = MetricsLogger(tmp_path, enabled=False, report_to=["tensorboard"], config=RECIPE)
    _log_three_steps(logger)
    assert logger.trackers == [] and list(tmp_path.iterdir()) == []


def test_missing_tracker_package_is_a_user_error_naming_the_pip_package(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "wandb" else real_find_spec(name))
    with pytest.raises(UserError, match=r"train\.report_to: 'wandb' needs the 'wandb' package.*pip install wandb"):
        trackers.check_report_to(["tensorboard", "wandb"])


def test_unknown_tracker_is_a_user_error_listing_the_choices(tmp_path):
    with pytest.raises(UserError, match="unknown tracker 'comet'; choose from tensorboard, wandb, trackio, mlflow"):
        MetricsLogger(tmp_path, report_to=["comet"])


def test_flatten_config_uses_override_names_and_tracker_safe_values():
    flat = trackers.flatten_config({"train": {"steps": 3, "report_to": ["tensorboard"]}, "peft": None,
                                    "rewards": [{"name": "arithmetic_exact"}], "data": {}})
    assert flat == {"train.steps": 3, "train.report_to": '["tensorboard"]', "peft": "null",
                    "rewards": '[{"name": "arithmetic_exact"}]', "data": "{}"}


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb is not installed (pip install wandb)")
def test_wandb_tracker_logs_config_metrics_and_table_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-dir"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = tmp_path / "my-run"
    run_dir.mkdir()
    logger = MetricsLogger(run_dir, report_to=["wandb"], config=RECIPE)
    run = logger.trackers[0].run
    assert run.name == "my-run" and run.project == "rlhf-pg" and run.config["train.steps"] == 3
    sent = []
    real_log = run.log
    monkeypatch.setattr(run, "log", lambda values, step=None, **kw: (sent.append((step, values)),
                                                                     real_log(values, step=step, **kw)))
    for step in (1, 2, 3):
        logger.log(step, {"reward/mean": 0.1 * step, "kl/ref": 0.01, "loss/policy": float("nan")})
    logger.log_completions(3, ROWS)
    logger.close()
    scalars = ["kl/ref", "reward/mean"]  # loss/policy was nan: metrics.jsonl only
    assert [(step, sorted(values)) for step, values in sent] == [(1, scalars), (2, scalars), (3, scalars),
                                                                (3, ["completions"])]
    assert not (run_dir / "tensorboard").exists()
    (offline_run,) = (tmp_path / "wandb-dir" / "wandb").glob("offline-run-*")
    assert list(offline_run.glob("run-*.wandb"))
    (table,) = (offline_run / "files" / "media" / "table").glob("completions_*.table.json")
    assert json.loads(table.read_text()) == {"columns": ["step", "prompt", "completion", "reward"],
                                             "data": [[row[c] for c in row] for row in ROWS]}
