"""Conversational prompts, TRL's convention: a prompt is a list of ``{"role", "content"}`` messages.

    prompt      [{"role": "user", "content": "What is 12+34? Reply with only the number."}]
    rendered    tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False, **kwargs)
                e.g. "<|im_start|>system\\n...<|im_end|>\\n<|im_start|>user\\nWhat is ...<|im_end|>\\n<|im_start|>assistant\\n"
    s_0         the tokens of ``rendered``, encoded WITHOUT the tokenizer's own special tokens (the template
                already wrote them; adding a BOS again would give a sequence the model never saw)
    completion  what the policy samples after the generation prompt, ending with the end-of-turn token
                (``<|im_end|>``, an EOS id); its text is decoded without special tokens

Reward functions then receive ``prompts`` as the message lists and each completion as
``[{"role": "assistant", "content": text}]``, exactly as TRL's GRPOTrainer passes them, so TRL reward
functions (``trl.rewards:think_format_reward``) run unchanged. Plain-text prompts keep their behaviour:
encoded with the tokenizer's special tokens, completions passed as strings.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

from .errors import UserError

ROLES = ("system", "developer", "user", "assistant", "tool")
_RESERVED = ("tokenize", "add_generation_prompt", "continue_final_message", "conversation", "return_dict")


def is_conversation(prompt: Any) -> bool:
    """A prompt given as a list of messages (TRL's conversational format), not as text."""
    return isinstance(prompt, (list, tuple))


def check_messages(messages: Any, where: str) -> None:
    """``UserError`` unless ``messages`` is a non-empty list of ``{"role": a known role, "content": text}``.

    ``where`` names the row (``"data: row 3 of split 'train' of 'x.jsonl'"``).
    """
    if not isinstance(messages, (list, tuple)) or not messages:
        raise UserError(f"{where}: a conversational prompt must be a non-empty list of messages, got {messages!r:.80}")
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise UserError(f"{where}: message {index} is {message!r:.60}; every message is a mapping "
                            '{"role": ..., "content": ...}')
        role = message.get("role")
        if role not in ROLES:
            raise UserError(f"{where}: message {index} has role {role!r}; use one of {', '.join(ROLES)}")
        content = message.get("content")
        if not isinstance(content, str):
            state = "no content" if content is None else f"content {content!r:.60} ({type(content).__name__})"
            raise UserError(f"{where}: message {index} (role {role!r}) has {state}; every message needs its text "
                            "as a string in 'content' (fix or drop that row)")


def check_prompt_kinds(prompts: list[Any], where: str = "prompts", column: str = "prompt",
                       row_name: Callable[[int], str] | None = None) -> bool:
    """Whether ``prompts`` are conversations (True) or texts (False); all rows must be of one kind.

    ``UserError`` naming the first row that is neither text nor a valid message list, or whose kind
    differs from row 0's. ``row_name(i)`` describes row i (default ``"{where}: row {i}"``).
    """
    row_name = row_name or (lambda index: f"{where}: row {index}")
    if not prompts:
        return False
    chat = is_conversation(prompts[0])
    for index, prompt in enumerate(prompts):
        if is_conversation(prompt):
            if not chat:
                raise UserError(f"{row_name(index)} has {column}={prompt!r:.60}, a list of messages, but row 0 is text; "
                                "a dataset's prompts must all be text or all be conversations")
            check_messages(prompt, row_name(index))
        elif isinstance(prompt, str):
            if chat:
                raise UserError(f"{row_name(index)} has {column}={prompt!r:.60}, text, but row 0 is a list of messages; "
                                "a dataset's prompts must all be text or all be conversations")
        else:
            raise UserError(f"{row_name(index)} has {column}={prompt!r:.60}; every prompt must be text or a list of "
                            '{"role", "content"} messages (fix or drop that row)')
    return chat


def check_chat_template_kwargs(chat_template_kwargs: dict[str, Any] | None,
                               key: str = "data.chat_template_kwargs") -> dict[str, Any]:
    """The kwargs as a dict; ``UserError`` when one of them is set by rlhf-pg itself."""
    kwargs = dict(chat_template_kwargs or {})
    clashes = [name for name in kwargs if name in _RESERVED]
    if clashes:
        raise UserError(f"{key}: {', '.join(map(repr, clashes))} is chosen by rlhf-pg (prompts are rendered with "
                        "add_generation_prompt=True, tokenize=False); remove it")
    return kwargs


def require_chat_template(tokenizer, where: str = "data") -> None:
    """``UserError`` when the tokenizer cannot render conversations."""
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise UserError(f"{where}: the prompts are conversations (lists of messages) but the tokenizer of {name!r} has "
                        "no chat template; use a chat model (e.g. builtin:smollm2-135m-instruct), set a chat_template "
                        "on the tokenizer, or give the prompts as text")


def render_prompt(tokenizer, messages: list[dict[str, Any]], chat_template_kwargs: dict[str, Any] | None = None,
                  where: str = "prompt") -> str:
    """``apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **chat_template_kwargs)``."""
    try:
        return tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False,
                                             **(chat_template_kwargs or {}))
    except Exception as error:  # noqa: BLE001 - jinja errors raised by the template (e.g. "roles must alternate")
        lines = str(error).strip().splitlines()
        raise UserError(f"{where}: the chat template cannot render {messages!r:.120}: {type(error).__name__}: "
                        f"{lines[0] if lines else ''}") from None


def prompt_texts(tokenizer, prompts: list[Any], chat_template_kwargs: dict[str, Any] | None = None,
                 where: str = "data") -> tuple[list[str], bool]:
    """``(texts the model reads, add_special_tokens)`` for text or conversational ``prompts``.

    Text prompts are returned unchanged, to be encoded with the tokenizer's special tokens; conversations
    are rendered with the chat template, to be encoded without them (the template wrote them).
    """
    chat = check_prompt_kinds(prompts, where)
    if not chat:
        return list(prompts), True
    require_chat_template(tokenizer, where)
    kwargs = check_chat_template_kwargs(chat_template_kwargs)
    return [render_prompt(tokenizer, p, kwargs, f"{where}: row {i}") for i, p in enumerate(prompts)], False


def completion_text(completion: Any) -> str:
    """The text of a completion: a string, or TRL's ``[{"role": "assistant", "content": text}]``."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        return str(completion.get("content", ""))
    return "".join(str(message.get("content", "")) for message in completion)


def prompt_text(prompt: Any) -> str:
    """The text of a prompt: a string, or the content of the last user message of a conversation."""
    if isinstance(prompt, str):
        return prompt
    users = [m for m in prompt if m.get("role") == "user"]
    return str((users or list(prompt))[-1].get("content", ""))


def reward_completions(prompts: list[Any], completions: list[Any]) -> list[Any]:
    """Completions as TRL passes them to reward functions: ``[{"role": "assistant", "content": text}]`` for
    conversational prompts, the text itself for text prompts."""
    if not prompts or not is_conversation(prompts[0]):
        return list(completions)
    return [[{"role": "assistant", "content": c}] if isinstance(c, str) else c for c in completions]


def assistant_completion_ids(tokenizer, prompt: list[dict[str, Any]], completion: str | list[dict[str, Any]],
                             chat_template_kwargs: dict[str, Any] | None = None,
                             eos_token_ids: Iterable[int] | None = None) -> list[int]:
    """The token ids the policy must emit after the generation prompt to produce ``completion``: the
    assistant turn's content AND its end token (for SFT on conversations).

        prompt_ids = tokens(render(prompt, add_generation_prompt=True))
        full_ids   = tokens(render(prompt + [assistant completion]))
        completion = full_ids[len(prompt_ids):], cut after its first end token (an EOS id)

    Tokens are encoded without the tokenizer's special tokens (the template writes them), exactly as
    ``rollout.encode_prompts`` encodes the prompt, and the prompt's tokens must be a prefix of the full
    conversation's (else ``UserError``: this template renders history differently from a live prompt,
    e.g. it drops reasoning). What the template writes after the end token (ChatML's newline) is dropped:
    the policy stops at EOS and never samples it. End tokens are ``eos_token_ids`` (default: the
    tokenizer's EOS); when the rendered turn has none, the tokenizer's EOS is appended, as for text.
    """
    check_messages(prompt, "sft prompt")
    if isinstance(completion, str):
        reply = [{"role": "assistant", "content": completion}]
    else:
        reply = list(completion)
        check_messages(reply, "sft completion")
        if any(m["role"] != "assistant" for m in reply):
            raise UserError(f"sft completion {completion!r:.80}: every message of a completion must have role "
                            "'assistant'")
    require_chat_template(tokenizer, "sft")
    kwargs = check_chat_template_kwargs(chat_template_kwargs)
    prompt_rendered = render_prompt(tokenizer, prompt, kwargs, "sft prompt")
    try:
        full_rendered = tokenizer.apply_chat_template(list(prompt) + reply, tokenize=False, **kwargs)
    except Exception as error:  # noqa: BLE001
        raise UserError(f"sft: the chat template cannot render {prompt + reply!r:.120}: {type(error).__name__}: "
                        f"{str(error).strip().splitlines()[0] if str(error).strip() else ''}") from None
    prompt_ids = tokenizer(prompt_rendered, add_special_tokens=False)["input_ids"]
    full_ids = tokenizer(full_rendered, add_special_tokens=False)["input_ids"]
    if not full_rendered.startswith(prompt_rendered) or full_ids[: len(prompt_ids)] != prompt_ids:
        raise UserError(
            f"sft: the chat template renders prompt {prompt!r:.80} differently once the assistant reply is appended "
            "(the rendered prompt with its generation prompt is not a prefix of the rendered conversation), so the "
            "reply's tokens cannot be separated from the prompt's; use a template without that behaviour"
        )
    ids = full_ids[len(prompt_ids):]
    ends = {tokenizer.eos_token_id, *(eos_token_ids or ())} - {None}
    last = next((i for i, token in enumerate(ids) if token in ends), None)
    return ids[: last + 1] if last is not None else ids + [tokenizer.eos_token_id]


__all__ = ["ROLES", "assistant_completion_ids", "check_chat_template_kwargs", "check_messages", "check_prompt_kinds",
           "completion_text", "is_conversation", "prompt_text", "prompt_texts", "render_prompt",
           "require_chat_template", "reward_completions"]
