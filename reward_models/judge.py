"""``llm_judge``: a chat model behind an OpenAI-compatible endpoint scores each completion (``vllm serve``,
llama.cpp's server, OpenAI itself), through the ``openai`` client (``pip install 'rlhf-pg[remote]'``).

    rewards:
      - name: llm_judge
        base_url: http://127.0.0.1:8000/v1
        model: Qwen/Qwen2.5-7B-Instruct
        api_key_env: JUDGE_API_KEY     # optional: env var holding the key (a local server needs none)
        template: "Question: {prompt}\\nAnswer: {completion}\\nIs the answer correct? Reply yes or no."
        parse: yes_no                  # number | yes_no | regex (with regex: '...(captured number)...')
        max_concurrency: 8             # requests in flight at once (one request per completion)
        timeout_s: 60                  # per request; each retry has its own
        retries: 3

``template`` is filled with ``{prompt}`` (a conversation as ``role: content`` lines), ``{completion}`` (its text)
and any dataset column (``{answer}``), and sent as one user message (``temperature``: 0 by default,
``max_tokens``: 32). The reply is read by ``parse``: ``number`` takes its first number, ``yes_no`` maps a reply
that starts with yes / no to 1 / 0, ``regex`` takes ``float`` of the first group of the first match of ``regex``
(of the whole match without a group). A reply that does not parse leaves that sample unjudged (None); the call
counts them (``reward/<label>/unparsed``) and quotes the first. Retries and errors as for ``http``
(``remote.py``): timeouts, connection errors, 5xx and 429 (``Retry-After`` honoured) are tried again with
backoff; another 4xx is not; a sample that still failed raises ``RewardSourceError`` (the reward's ``on_error``).
"""

from __future__ import annotations

import asyncio
import os
import re
from typing import Any

from rlhf_pg.chat import completion_text

from .registry import RewardSourceError, Scores, register_reward
from .remote import Refused, Retry, check_counts, retry_after, retrying

PARSERS = ("number", "yes_no", "regex")
_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")
_YES_NO = re.compile(r"\W*(yes|no)\b", re.IGNORECASE)


def parse_reply(reply: str, parse: str, regex: str | None = None) -> float | None:
    """The score a judge's reply gives, or None when it gives none (module docstring: the three parsers)."""
    if parse == "yes_no":
        match = _YES_NO.match(reply)
        return None if match is None else float(match.group(1).lower() == "yes")
    match = (_NUMBER if parse == "number" else re.compile(regex)).search(reply)
    if match is None:
        return None
    try:
        return float(match.group(1) if match.re.groups else match.group(0))
    except (TypeError, ValueError):
        return None


def _as_text(prompt: Any) -> str:
    """A text prompt as it is; a conversation as ``role: content`` lines."""
    if isinstance(prompt, str):
        return prompt
    return "\n".join(f"{message.get('role', '')}: {message.get('content', '')}" for message in prompt)


def _api_key(api_key_env: str | None) -> str:
    if api_key_env is None:
        return "EMPTY"  # local servers (vllm serve) accept any key
    key = os.environ.get(api_key_env)
    if not key:
        raise ValueError(f"api_key_env: the environment variable {api_key_env} is not set; export it or remove "
                         "api_key_env (a local server needs no key)")
    return key


def _validate(params: dict[str, Any]) -> None:
    if not isinstance(params.get("model"), str):
        raise ValueError("llm_judge needs model: the name the server knows the judge by (e.g. the one given to "
                         "`vllm serve`)")
    template = params.get("template", DEFAULT_TEMPLATE)
    if not isinstance(template, str) or "{completion}" not in template:
        raise ValueError(f"llm_judge's template must contain {{completion}} (and usually {{prompt}}), got {template!r:.80}")
    parse = params.get("parse", "number")
    if parse not in PARSERS:
        raise ValueError(f"parse must be one of {', '.join(PARSERS)}, got {parse!r}")
    if parse == "regex":
        try:
            re.compile(params.get("regex") or "")
        except re.error as error:
            raise ValueError(f"regex {params.get('regex')!r} does not compile: {error}") from None
        if not params.get("regex"):
            raise ValueError("parse: regex needs regex: a pattern whose first group (or whole match) is the score")
    check_counts(params, retries=0, max_concurrency=1, max_tokens=1)
    try:
        import openai  # noqa: F401
    except ImportError:
        raise ValueError("llm_judge needs the 'openai' package: pip install 'rlhf-pg[remote]' (or pip install "
                         "openai)") from None
    _api_key(params.get("api_key_env"))


DEFAULT_TEMPLATE = ("Rate the answer to the question from 0 to 10. Reply with the number only.\n\n"
                    "Question: {prompt}\n\nAnswer: {completion}")


@register_reward("llm_judge")
async def llm_judge(prompts: list, completions: list, *, model: str, base_url: str | None = None,
                    api_key_env: str | None = None, template: str = DEFAULT_TEMPLATE, parse: str = "number",
                    regex: str | None = None, max_concurrency: int = 8, timeout_s: float = 60.0, retries: int = 3,
                    backoff_s: float = 0.5, temperature: float = 0.0, max_tokens: int = 32, **columns) -> Scores:
    """One chat completion per sample, its reply parsed into a score (module docstring). ``Scores`` with ``retries``
    and ``unparsed``; ``RewardSourceError`` (with the samples that were judged) when some could not be had."""
    import openai

    counts = {"retries": 0.0, "unparsed": 0.0}
    limit = asyncio.Semaphore(max_concurrency)
    unparsed: list[str] = []  # the replies that did not parse

    async def judge(client, index: int) -> float | None:
        fields = {key: value[index] for key, value in columns.items() if isinstance(value, list)}
        try:
            content = template.format(**{**fields, "prompt": _as_text(prompts[index]),
                                         "completion": completion_text(completions[index])})
        except KeyError as error:
            raise ValueError(f"template field {{{error.args[0]}}} is neither prompt, completion nor a dataset column "
                             f"(columns: {', '.join(sorted(fields))})") from None

        async def send():
            try:
                reply = await client.chat.completions.create(model=model, temperature=temperature, max_tokens=max_tokens,
                                                             messages=[{"role": "user", "content": content}])
            except openai.APITimeoutError:
                raise Retry(f"no answer within timeout_s={timeout_s:g} s") from None
            except openai.APIConnectionError as error:
                raise Retry(f"{type(error).__name__}: {error}") from None
            except openai.APIStatusError as error:
                status = f"HTTP {error.status_code}: {str(error)[:300]}"
                if error.status_code == 429 or error.status_code >= 500:
                    raise Retry(status, retry_after(error.response.headers)) from None
                raise Refused(f"{status} (not retried)") from None
            return (reply.choices[0].message.content or "") if reply.choices else ""

        async with limit:
            text = await retrying(send, retries, backoff_s, counts)
        score = parse_reply(text, parse, regex)
        if score is None:
            counts["unparsed"] += 1
            unparsed.append(text)
        return score

    client = openai.AsyncOpenAI(base_url=base_url, api_key=_api_key(api_key_env), timeout=timeout_s, max_retries=0)
    try:
        answers = await asyncio.gather(*(judge(client, i) for i in range(len(completions))), return_exceptions=True)
    finally:
        await client.close()
    scores: list[float | None] = []
    failed, last = 0, None
    for answer in answers:
        if isinstance(answer, Refused):
            scores.append(None)
            failed, last = failed + 1, answer
        elif isinstance(answer, BaseException):
            raise answer
        else:
            scores.append(answer)
    if last is not None:
        raise RewardSourceError(f"{failed} of {len(completions)} samples got no judgement; the last error: {last}",
                                str(client.base_url), scores, failed, counts)
    notes = [f"{len(unparsed)} of {len(completions)} replies did not parse as {parse} (those samples are unjudged); "
             f"the first: {unparsed[0][:200]!r}"] if unparsed else []
    return Scores(scores, counts, notes)


llm_judge.validate_params = _validate
