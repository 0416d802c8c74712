"""Rewards over the network: ``http`` asks a reward server (``judge.py``: ``llm_judge`` asks a chat model).

    rewards:
      - name: http
        url: http://127.0.0.1:8000/score
        timeout_s: 30          # per request; each retry has its own
        retries: 3             # after the first try: 4 attempts at most
        batch_size: 64         # completions per request
        max_concurrency: 4     # requests in flight at once
        headers_env: RM_HEADERS   # optional: env var holding extra headers, JSON or "Key: value" lines
        on_error: fail         # or none (the scorer's key: unjudged samples instead of a stop)

Each request POSTs JSON ``{"prompts": [...], "completions": [...], <column>: [...], ...}``: a batch of
``batch_size`` samples with every dataset column (``answer``...) and ``finished``, one value per sample, and
expects ``200 {"rewards": [number | null, ...]}`` with one value per completion (null: not judged). A timeout,
a dropped or refused connection, a 5xx or a 429 is tried again after an exponential backoff with jitter,
``backoff_s * 2^attempt * U(0.5, 1)`` capped at 30 s, or after the server's ``Retry-After`` (seconds or an
HTTP date, capped at 60 s). Another 4xx, a malformed answer or one of the wrong length is not retried (another
try would get the same); the error quotes what came back. A batch that still failed raises
``RewardSourceError`` with the batches that did come back, and the scorer applies the reward's ``on_error``.
The call returns ``Scores`` with ``retries`` (requests sent again), logged as ``reward/<label>/retries``.

The client is ``httpx2`` (``httpx``'s maintained successor, the one ``huggingface_hub`` and ``openai`` use).
The jitter draws from a private generator: retries never move the run's seeded RNG streams.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import math
import os
import random
import time
from typing import Any, Awaitable, Callable

from .registry import RewardSourceError, Scores, register_reward

MAX_BACKOFF_S = 30.0
MAX_RETRY_AFTER_S = 60.0
_jitter = random.Random()  # not the global generator: checkpoints restore that one exactly


class Retry(Exception):
    """A failure another attempt may not see: a timeout, a dropped connection, a 5xx, a 429 (``retry_after``: the
    server's ``Retry-After`` in seconds, if it sent one)."""

    def __init__(self, what: str, retry_after: float | None = None):
        super().__init__(what)
        self.retry_after = retry_after


class Refused(Exception):
    """A failure another attempt would repeat (a 4xx, a malformed answer), or the last of the retried ones."""


async def retrying(send: Callable[[], Awaitable[Any]], retries: int, backoff_s: float, counts: dict[str, float]) -> Any:
    """``await send()``, again after each ``Retry`` (at most ``retries`` more times, ``counts["retries"]`` += 1 each);
    ``Refused`` when it refuses or the attempts run out (the message says the last error and the attempts)."""
    for attempt in range(retries + 1):
        try:
            return await send()
        except Retry as failure:
            if attempt == retries:
                raise Refused(f"{failure} (gave up after {retries + 1} attempts)") from None
            counts["retries"] += 1
            delay = failure.retry_after
            if delay is None:
                delay = min(MAX_BACKOFF_S, backoff_s * 2 ** attempt) * _jitter.uniform(0.5, 1.0)
            await asyncio.sleep(min(delay, MAX_RETRY_AFTER_S))


def retry_after(headers) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or an HTTP date), None without a usable one."""
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def parse_headers(headers_env: str | None) -> dict[str, str]:
    """Extra headers from the environment variable ``headers_env``: a JSON object (``{"Authorization": "Bearer
    x"}``) or ``Key: value`` lines. A ``ValueError`` says what is wrong (names the variable, never its value)."""
    if headers_env is None:
        return {}
    text = os.environ.get(headers_env)
    if text is None:
        raise ValueError(f"headers_env: the environment variable {headers_env} is not set; export it (a JSON object "
                         "of headers or 'Key: value' lines) or remove headers_env")
    if text.strip().startswith("{"):
        try:
            headers = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"headers_env: ${headers_env} is not valid JSON ({error.msg} at {error.pos})") from None
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in headers.items()):
            raise ValueError(f"headers_env: ${headers_env} must map header names to text values")
        return headers
    headers = {}
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            key, colon, value = line.partition(":")
            if not colon or not key.strip():
                raise ValueError(f"headers_env: line {number} of ${headers_env} is not 'Key: value'")
            headers[key.strip()] = value.strip()
    return headers


def check_counts(params: dict[str, Any], **minimums: int) -> None:
    """``ValueError`` for a count below its minimum (``retries=0`` is fine: one attempt)."""
    for key, minimum in minimums.items():
        value = params.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < minimum):
            raise ValueError(f"{key} must be an integer >= {minimum}, got {value!r}")


def _jsonable(value: Any) -> Any:
    """numpy / torch scalars and arrays in a dataset column, as JSON values."""
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"a column value of type {type(value).__name__} cannot be sent as JSON")


def _rewards_of(response, size: int) -> list[float | None]:
    """The ``rewards`` of a 200 answer, or ``Refused`` quoting what came back."""
    try:
        rewards = response.json()["rewards"]
        if not isinstance(rewards, list):
            raise TypeError
    except (ValueError, KeyError, TypeError):
        raise Refused(f'the answer is not JSON {{"rewards": [...]}}: {response.text[:300]!r}') from None
    if len(rewards) != size:
        raise Refused(f"the answer has {len(rewards)} rewards for a batch of {size} completions: {response.text[:300]!r}")
    for value in rewards:
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)):
            raise Refused(f"the answer's rewards must be finite numbers or null, got {value!r}: {response.text[:300]!r}")
    return rewards


def _validate(params: dict[str, Any]) -> None:
    url = params.get("url")
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        raise ValueError(f"http needs url: the reward server's address, http://host:port/path (got {url!r})")
    check_counts(params, retries=0, batch_size=1, max_concurrency=1)
    parse_headers(params.get("headers_env"))


@register_reward("http")
async def http(prompts: list, completions: list, *, url: str, timeout_s: float = 30.0, retries: int = 3,
               batch_size: int = 64, max_concurrency: int = 4, headers_env: str | None = None,
               backoff_s: float = 0.5, **columns) -> Scores:
    """Rewards from a server: POST batches of ``{"prompts", "completions", <columns>}`` to ``url``, read
    ``{"rewards": [...]}`` (module docstring: retries, errors). ``Scores`` with ``retries``; ``RewardSourceError``
    (with the batches that came back) when a batch could not be had."""
    import httpx2

    counts = {"retries": 0.0}
    starts = list(range(0, len(completions), batch_size))
    limit = asyncio.Semaphore(max_concurrency)

    async def one_batch(client, start: int) -> list[float | None]:
        part = slice(start, start + batch_size)
        payload = {"prompts": prompts[part], "completions": completions[part],
                   **{key: value[part] if isinstance(value, list) else value for key, value in columns.items()}}
        body = json.dumps(payload, default=_jsonable).encode()

        async def send():
            try:
                response = await client.post(url, content=body, headers={"content-type": "application/json"})
            except httpx2.TimeoutException:
                raise Retry(f"no answer within timeout_s={timeout_s:g} s") from None
            except httpx2.TransportError as error:
                raise Retry(f"{type(error).__name__}: {error}") from None
            status = f"HTTP {response.status_code} {response.reason_phrase}: {response.text[:300]!r}"
            if response.status_code == 429 or response.status_code >= 500:
                raise Retry(status, retry_after(response.headers))
            if response.status_code != 200:
                raise Refused(f"{status} (not retried)")
            return _rewards_of(response, len(payload["completions"]))

        async with limit:
            return await retrying(send, retries, backoff_s, counts)

    async with httpx2.AsyncClient(headers=parse_headers(headers_env), timeout=timeout_s,
                                  limits=httpx2.Limits(max_connections=max_concurrency)) as client:
        answers = await asyncio.gather(*(one_batch(client, start) for start in starts), return_exceptions=True)
    scores: list[float | None] = []
    failed, last = 0, None
    for start, answer in zip(starts, answers):
        if isinstance(answer, Refused):
            size = len(completions[start : start + batch_size])
            scores += [None] * size
            failed, last = failed + size, answer
        elif isinstance(answer, BaseException):
            raise answer
        else:
            scores += answer
    if last is not None:
        raise RewardSourceError(f"{failed} of {len(completions)} samples got no reward; the last error: {last}",
                                url, scores, failed, counts)
    return Scores(scores, counts)


http.validate_params = _validate
