"""Rewards over the network (reward_models/remote.py: http, judge.py: llm_judge): what is sent, what is read,
what is retried (and how long it waits) and what is not, and ``on_error``, against servers the tests start on
127.0.0.1 (tests/reward_servers.py). Every call here is bounded by a few seconds of timeouts and backoff."""

from __future__ import annotations

import json
import math
import socket
import time

import pytest

from reward_models import RewardScorer
from reward_models.judge import parse_reply
from reward_servers import chat_server, reward_server
from rlhf_pg.errors import RecipeError, RewardUnavailable
from rlhf_pg.recipe import recipe_from_dict

PROMPTS = ["1+2=", "3+4=", "5+5=", "9+9=", "2+2="]
COMPLETIONS = ["3", "8", "?", "18", "4"]


def scorer_of(*rewards) -> RewardScorer:
    return RewardScorer(recipe_from_dict({"rewards": list(rewards)}).rewards)


def lengths(payload):
    """A server's reward: the completion's length, null for '?' (not judged)."""
    return [None if completion == "?" else float(len(completion)) for completion in payload["completions"]]


def free_port() -> int:
    """A loopback port nothing listens on."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def http(url, **keys):
    return {"name": "http", "url": url, "backoff_s": 0.05, **keys}


def test_http_posts_batches_with_every_column_and_reads_the_rewards_in_order():
    with reward_server(lengths) as server:
        scorer = scorer_of(http(server.url + "/score", batch_size=2, max_concurrency=2, timeout_s=5), {"name": "length_penalty", "weight": 0.0})
        total, per_reward = scorer(PROMPTS, COMPLETIONS, finished=[True, True, False, True, True], answer=[3, 7, 10, 18, 4])
    assert per_reward["http"][:2] == [1.0, 1.0] and math.isnan(per_reward["http"][2]) and per_reward["http"][3:] == [2.0, 1.0]
    assert total == [1.0, 1.0, 0.0, 2.0, 1.0]  # the unjudged sample counts 0 in the weighted sum
    payloads = sorted((request["payload"] for request in server.requests), key=lambda p: p["prompts"][0] != "1+2=")
    assert sorted(len(p["prompts"]) for p in payloads) == [1, 2, 2]
    every = {key: [v for p in sorted(payloads, key=lambda p: PROMPTS.index(p["prompts"][0])) for v in p[key]]
             for key in ("prompts", "completions", "finished", "answer")}
    assert every == {"prompts": PROMPTS, "completions": COMPLETIONS, "finished": [True, True, False, True, True],
                     "answer": [3, 7, 10, 18, 4]}
    metrics, notes = scorer.take_stats()
    assert metrics["reward/http/retries"] == 0 and metrics["reward/http/failures"] == 0 and not notes
    assert 0 < metrics["reward/http/latency_s"] < 5
    assert set(metrics) == {"reward/http/latency_s", "reward/http/failures", "reward/http/retries",
                            "reward/length_penalty/latency_s", "reward/length_penalty/failures"}
    assert scorer.take_stats()[0]["reward/http/latency_s"] == 0  # taken: the next step starts from zero


def test_http_retries_a_slow_reply_a_503_a_dropped_connection_and_a_429_honouring_retry_after():
    script = ["slow", 503, "drop", (429, {"error": "later"}, {"Retry-After": "1"})]
    with reward_server(lengths, script=script, slow_s=1.5) as server:
        scorer = scorer_of(http(server.url, timeout_s=0.3, retries=4, batch_size=8))
        started = time.perf_counter()
        _, per_reward = scorer(PROMPTS[:2], COMPLETIONS[:2])
        elapsed = time.perf_counter() - started
    assert per_reward["http"] == [1.0, 1.0]
    assert server.statuses()[:4] == script and len(server.requests) == 5
    times = [request["time"] for request in server.requests]
    assert times[4] - times[3] >= 0.95  # Retry-After: 1 was honoured
    assert times[1] - times[0] >= 0.3  # the slow reply was given up at timeout_s, then retried
    # timeout_s is per request: the whole call (4 retries) took longer than it, and was not cancelled
    assert 0.3 + 1.0 <= elapsed < 4.0
    assert scorer.take_stats()[0]["reward/http/retries"] == 4


def test_http_backoff_doubles_with_jitter_between_half_and_the_full_delay():
    backoff = 0.1
    with reward_server(lengths, script=[503] * 4) as server:
        scorer_of(http(server.url, retries=4, backoff_s=backoff, timeout_s=2))(PROMPTS[:1], COMPLETIONS[:1])
    times = [request["time"] for request in server.requests]
    gaps = [later - earlier for earlier, later in zip(times, times[1:])]
    assert len(gaps) == 4
    for attempt, gap in enumerate(gaps):  # delay = backoff_s * 2^attempt * U(0.5, 1)
        full = backoff * 2 ** attempt
        assert 0.5 * full - 0.01 <= gap <= full + 0.15, (attempt, gaps)


@pytest.mark.parametrize("answer,fragments", [
    ((422, {"detail": "prompts must be text"}), ["HTTP 422", "prompts must be text", "not retried"]),
    ((404, "no such route"), ["HTTP 404", "no such route"]),
    ((200, "<html>oops</html>"), ['not JSON {"rewards": [...]}', "<html>oops</html>"]),
    ((200, {"scores": [1, 2]}), ['not JSON {"rewards": [...]}', "scores"]),
    ((200, {"rewards": [1.0]}), ["1 rewards for a batch of 2 completions"]),
    ((200, {"rewards": [True, 1.0]}), ["finite numbers or null, got True"]),
    ((200, {"rewards": ["1", 1.0]}), ["finite numbers or null, got '1'"]),
])
def test_http_answers_another_try_would_not_fix_are_not_retried_and_quoted(answer, fragments):
    with reward_server(lengths, script=[answer]) as server:
        scorer = scorer_of(http(server.url + "/score", retries=3))
        with pytest.raises(RewardUnavailable) as failure:
            scorer(PROMPTS[:2], COMPLETIONS[:2])
    message = str(failure.value)
    assert len(server.requests) == 1, server.statuses()
    assert message.startswith(f"reward 'http' (rewards[0]) could not get its rewards from {server.url}/score: ")
    for fragment in fragments:
        assert fragment in message, message


def test_http_server_down_fails_after_its_retries_naming_the_reward_the_url_and_the_error():
    url = f"http://127.0.0.1:{free_port()}/score"
    scorer = scorer_of({"name": "rewards_for_tests:sevens"}, http(url, retries=2))
    started = time.perf_counter()
    with pytest.raises(RewardUnavailable) as failure:
        scorer(PROMPTS, COMPLETIONS)
    assert time.perf_counter() - started < 2.0  # 2 backoffs of at most 0.05 and 0.1 s
    message = str(failure.value)
    assert f"reward 'http' (rewards[1]) could not get its rewards from {url}" in message
    assert "5 of 5 samples got no reward" in message and "ConnectError" in message
    assert "gave up after 3 attempts" in message


def test_on_error_none_keeps_the_batches_that_came_back_and_counts_and_logs_the_rest():
    with reward_server(lengths, script=[(400, "bad batch")]) as server:
        scorer = scorer_of(http(server.url, batch_size=2, max_concurrency=1, on_error="none"))
        total, per_reward = scorer(PROMPTS[:4], ["3", "77", "1", "18"])
    assert [math.isnan(v) for v in per_reward["http"]] == [True, True, False, False]
    assert per_reward["http"][2:] == [1.0, 2.0] and total == [0.0, 0.0, 1.0, 2.0]
    metrics, notes = scorer.take_stats()
    assert metrics["reward/http/failures"] == 2
    assert len(notes) == 1 and "reward 'http': 2 of 4 samples unjudged (on_error: none)" in notes[0]
    assert "HTTP 400" in notes[0] and "bad batch" in notes[0]


def test_on_error_none_turns_any_function_failure_or_timeout_into_unjudged_samples():
    scorer = scorer_of({"name": "user_rewards_for_tests:async_raises", "on_error": "none"},
                       {"name": "user_rewards_for_tests:async_hangs", "on_error": "none", "timeout_s": 0.2},
                       {"name": "rewards_for_tests:sevens"})
    total, per_reward = scorer(PROMPTS[:2], ["7", "77"])
    assert all(math.isnan(v) for v in per_reward["async_raises"] + per_reward["async_hangs"])
    assert total == [1.0, 1.0]
    metrics, notes = scorer.take_stats()
    assert metrics["reward/async_raises/failures"] == metrics["reward/async_hangs/failures"] == 2
    assert metrics["reward/sevens/failures"] == 0
    assert any("ValueError: judge unavailable" in note for note in notes)
    assert any("no reply within 0.2 s" in note for note in notes)


def test_headers_env_as_json_or_as_lines_reaches_the_server(monkeypatch):
    monkeypatch.setenv("RM_JSON", json.dumps({"Authorization": "Bearer abc", "X-Team": "rl"}))
    monkeypatch.setenv("RM_LINES", "Authorization: Bearer xyz\nX-Team: rl2\n")
    with reward_server(lengths) as server:
        for variable in ("RM_JSON", "RM_LINES"):
            scorer_of(http(server.url, headers_env=variable))(PROMPTS[:1], COMPLETIONS[:1])
    seen = [{k.lower(): v for k, v in request["headers"].items()} for request in server.requests]
    assert [(h["authorization"], h["x-team"]) for h in seen] == [("Bearer abc", "rl"), ("Bearer xyz", "rl2")]


@pytest.mark.parametrize("keys,fragments", [
    ({}, ["http needs url", "got None"]),
    ({"url": "localhost:8000/score"}, ["http://host:port/path", "localhost:8000"]),
    ({"url": "http://x", "urll": "http://y"}, ["'urll' is not a key of reward 'http'; did you mean 'url'?"]),
    ({"url": "http://x", "batch_size": 0}, ["batch_size must be an integer >= 1, got 0"]),
    ({"url": "http://x", "retries": -1}, ["retries must be an integer >= 0"]),
    ({"url": "http://x", "headers_env": "NOT_SET_ANYWHERE"}, ["NOT_SET_ANYWHERE is not set"]),
    ({"url": "http://x", "on_error": "skip"}, ["on_error", "'skip'"]),
])
def test_http_recipe_mistakes_fail_when_the_recipe_is_read(keys, fragments):
    with pytest.raises(RecipeError) as failure:
        scorer_of({"name": "http", **keys})
    for fragment in fragments:
        assert fragment in str(failure.value), str(failure.value)


# --- llm_judge ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("parse,regex,reply,expected", [
    ("number", None, "Score: 7/10", 7.0),
    ("number", None, "-2.5 points", -2.5),
    ("number", None, "no idea", None),
    ("yes_no", None, "Yes, it is right.", 1.0),
    ("yes_no", None, " **no**", 0.0),
    ("yes_no", None, "Maybe", None),
    ("yes_no", None, "Yesterday", None),
    ("regex", r"RATING=(\d+)", "thoughts... RATING=4", 4.0),
    ("regex", r"\d+/5", "3/5", None),  # the whole match '3/5' is not a number
    ("regex", r"RATING=(\d+)", "RATING: 4", None),
])
def test_parse_reply(parse, regex, reply, expected):
    assert parse_reply(reply, parse, regex) == expected


def judge(server, **keys):
    return {"name": "llm_judge", "base_url": server.url + "/v1", "model": "judge-7b", "backoff_s": 0.05, **keys}


def test_llm_judge_fills_the_template_sends_the_key_and_parses_each_reply(monkeypatch):
    monkeypatch.setenv("JUDGE_KEY", "sk-test")
    replies = {"3": "Yes.", "8": "No, 3+4=7.", "18": "yes", "4": "I am not sure"}
    with chat_server(lambda message: replies[message.rsplit("A: ", 1)[1]]) as server:
        scorer = scorer_of(judge(server, api_key_env="JUDGE_KEY", parse="yes_no", max_concurrency=2,
                                 template="Q: {prompt} (expected {answer}) A: {completion}"))
        prompts, completions = ["1+2=", "3+4=", "9+9=", "2+2="], ["3", "8", "18", "4"]
        _, per_reward = scorer(prompts, completions, answer=[3, 7, 18, 4])
    assert per_reward["llm_judge"][:3] == [1.0, 0.0, 1.0] and math.isnan(per_reward["llm_judge"][3])
    sent = sorted(request["payload"]["messages"][0]["content"] for request in server.requests)
    assert sent == sorted(f"Q: {p} (expected {a}) A: {c}" for p, a, c in zip(prompts, [3, 7, 18, 4], completions))
    assert {request["payload"]["model"] for request in server.requests} == {"judge-7b"}
    assert all({k.lower(): v for k, v in r["headers"].items()}["authorization"] == "Bearer sk-test" for r in server.requests)
    metrics, notes = scorer.take_stats()
    assert metrics["reward/llm_judge/unparsed"] == 1 and metrics["reward/llm_judge/failures"] == 0
    assert notes == ["reward 'llm_judge': 1 of 4 replies did not parse as yes_no (those samples are unjudged); the first: "
                     "'I am not sure'"]


def test_llm_judge_conversations_become_role_lines():
    with chat_server(lambda message: "5") as server:
        conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+3?"}]
        scorer_of(judge(server, template="{prompt}|{completion}"))([conversation], ["5"])
    assert server.requests[0]["payload"]["messages"][0]["content"] == "system: Be brief.\nuser: What is 2+3?|5"


def test_llm_judge_retries_5xx_and_429_but_not_other_4xx():
    with chat_server(lambda message: "8", script=[503, (429, {"error": {"message": "slow down"}}, {"Retry-After": "0.2"})]) as server:
        scorer = scorer_of(judge(server))
        assert scorer(["1+2="], ["3"])[1]["llm_judge"] == [8.0]
    assert scorer.take_stats()[0]["reward/llm_judge/retries"] == 2 and len(server.requests) == 3
    with chat_server(lambda message: "8", script=[(401, {"error": {"message": "invalid api key"}})]) as server:
        with pytest.raises(RewardUnavailable) as failure:
            scorer_of(judge(server))(["1+2="], ["3"])
    assert len(server.requests) == 1
    assert f"could not get its rewards from {server.url}/v1" in str(failure.value)
    assert "HTTP 401" in str(failure.value) and "invalid api key" in str(failure.value) and "not retried" in str(failure.value)


@pytest.mark.parametrize("keys,fragments", [
    ({"base_url": "http://x/v1"}, ["llm_judge needs model"]),
    ({"model": "m", "template": "rate {prompt}"}, ["must contain {completion}"]),
    ({"model": "m", "parse": "score"}, ["parse must be one of number, yes_no, regex"]),
    ({"model": "m", "parse": "regex"}, ["parse: regex needs regex"]),
    ({"model": "m", "parse": "regex", "regex": "(unclosed"}, ["does not compile"]),
    ({"model": "m", "api_key_env": "NO_SUCH_KEY_VAR"}, ["NO_SUCH_KEY_VAR is not set"]),
    ({"model": "m", "temprature": 0.5}, ["did you mean 'temperature'?"]),
])
def test_llm_judge_recipe_mistakes_fail_when_the_recipe_is_read(keys, fragments):
    with pytest.raises(RecipeError) as failure:
        scorer_of({"name": "llm_judge", **keys})
    for fragment in fragments:
        assert fragment in str(failure.value), str(failure.value)


def test_the_readme_server_and_recipes_quickstart_http_score_the_quickstart_reward(tmp_path):
    """README's minimal server, run as written, behind the reward of recipes/quickstart_http.yaml (on another port):
    the same scores as arithmetic_exact."""
    import subprocess
    import sys
    from pathlib import Path

    from rlhf_pg.recipe import load_recipe
    from reward_models.rules import arithmetic_exact

    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text()
    source = readme.split("```python\n# reward_server.py")[1].split("```")[0]
    (tmp_path / "reward_server.py").write_text("# reward_server.py" + source)
    port = free_port()
    server = subprocess.Popen([sys.executable, str(tmp_path / "reward_server.py"), str(port)], stderr=subprocess.DEVNULL)
    try:
        spec = load_recipe(root / "recipes" / "quickstart_http.yaml").rewards[0]
        assert spec.name == "http" and spec.params["url"] == "http://127.0.0.1:8000/score"
        spec.params["url"] = f"http://127.0.0.1:{port}/score"
        spec.params["backoff_s"] = 0.2  # the server may still be starting: a refused connection is retried
        spec.params["retries"] = 8
        prompts, completions, finished = ["1+2=", "17+25=", "9+9=", "3+3="], ["3", "43", "18", "6"], [True, True, True, False]
        _, per_reward = RewardScorer([spec])(prompts, completions, finished=finished)
    finally:
        server.kill()
        server.wait(timeout=30)
    assert per_reward["http"] == arithmetic_exact(prompts, completions, finished=finished) == [1.0, 0.0, 1.0, 0.0]
