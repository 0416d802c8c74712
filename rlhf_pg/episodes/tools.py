"""Tools a model may call inside an episode: plain Python functions, called from the text the model writes.

    tools: [pkg.module:function, ...]        the recipe's list (TRL's ``tools=[...]``): each tool is described
                                             by its name, signature and docstring (``tool_schemas``)
    "<tool>calculator(123*4)</tool>"         the model's call, in ``rollout.tool_format`` ("<tool>{name}({args})</tool>")
    "<result>492</result>"                   the result, an observation, in ``rollout.result_format``

The rule that reads a call: a model turn ends with a call when its text ends with the format's closing
literal (``)</tool>``) and contains its opening literal (``<tool>``) before that; the call is the text
between the last opening literal and the closing one, the name is what comes before the separator
(``(``) and the arguments what comes after it. The arguments are a Python argument list of literals
(``f(1, 'a', key=[2])``); when they are not one (``123*4``) and the tool takes exactly one parameter, the
whole text is that parameter, as a string.

Whatever goes wrong becomes the observation, and the episode goes on (``rollout.max_tool_errors`` ends it):
an unknown name, arguments that do not bind, a tool that raises (``error: ZeroDivisionError: ...``) or that
does not return within ``rollout.tool_timeout_s`` (it keeps running in a daemon thread; its result is dropped).
Calls run in threads, so a slow tool stalls only its own episode (``multiturn``).
"""

from __future__ import annotations

import ast
import importlib
import inspect
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from ..errors import RecipeError, UserError, first_line

DEFAULT_TOOL_FORMAT = "<tool>{name}({args})</tool>"
DEFAULT_RESULT_FORMAT = "<result>{result}</result>"


# --- the recipe keys ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CallFormat:
    """``prefix {name} separator {args} close``, from a template such as ``"<tool>{name}({args})</tool>"``."""

    prefix: str
    separator: str
    close: str

    @classmethod
    def parse(cls, template: str, key: str = "rollout.tool_format") -> "CallFormat":
        """The format of ``template``; ``RecipeError`` unless it reads ``PREFIX{name}SEP{args}CLOSE`` with a
        non-empty PREFIX and CLOSE (they delimit a call in free text)."""
        head, has_name, rest = template.partition("{name}")
        separator, has_args, close = rest.partition("{args}")
        if not (has_name and has_args) or not head or not close or "{" in head + separator + close:
            raise RecipeError(f"{key}={template!r} must read PREFIX{{name}}SEP{{args}}CLOSE with a non-empty PREFIX "
                              f"and CLOSE, e.g. {DEFAULT_TOOL_FORMAT!r} or '[{{name}} {{args}}]'")
        return cls(head, separator, close)

    def render(self, name: str, args: str) -> str:
        return f"{self.prefix}{name}{self.separator}{args}{self.close}"

    def call_at_end(self, text: str, since: int = 0) -> tuple[str, str] | None:
        """``(name, args)`` when ``text`` completes a call at or after character ``since`` (cut there), else None."""
        end = text.find(self.close, max(0, since - len(self.close) + 1))
        if end < 0:
            return None
        start = text.rfind(self.prefix, 0, end)
        if start < 0:
            return None
        inner = text[start + len(self.prefix) : end]
        name, separator, args = inner.partition(self.separator) if self.separator else (inner, "", "")
        return name.strip(), args if separator else ""


def result_parts(template: str, key: str = "rollout.result_format") -> tuple[str, str]:
    """``(before, after)`` the ``{result}`` of ``template``; ``RecipeError`` unless it has one and ``after`` is
    non-empty (it ends an observation in a demonstration)."""
    before, found, after = template.partition("{result}")
    if not found or not after or "{result}" in after:
        raise RecipeError(f"{key}={template!r} must contain {{result}} once, followed by a closing text, e.g. "
                          f"{DEFAULT_RESULT_FORMAT!r} or '={{result}};'")
    return before, after


def check_import_path(path: str, key: str) -> None:
    """``RecipeError`` unless ``path`` looks like ``package.module:attribute`` (nothing is imported here)."""
    module, colon, attribute = path.partition(":")
    if not colon or not attribute.isidentifier() or not all(part.isidentifier() for part in module.split(".")):
        raise RecipeError(f"{key}={path!r} must be an import path 'package.module:name', e.g. "
                          "'rlhf_pg.tasks.calculator:calculator'")


def check_episode_keys(tools: list[str], environment: str | None, tool_format: str, result_format: str) -> None:
    """The recipe's ``tools``, ``environment``, ``rollout.tool_format`` and ``rollout.result_format``, checked
    on load without importing anything (``RecipeError``)."""
    for index, path in enumerate(tools):
        check_import_path(path, f"tools[{index}]")
    if environment is not None:
        check_import_path(environment, "environment")
    CallFormat.parse(tool_format)
    result_parts(result_format)


# --- resolving the tools --------------------------------------------------------------------------------


def import_attribute(path: str, key: str) -> Any:
    """The object at ``package.module:name``; ``UserError`` naming ``key`` when it cannot be imported."""
    check_import_path(path, key)
    module_name, _, attribute = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as error:  # noqa: BLE001 - any import failure is the user's to fix
        raise UserError(f"{key}: cannot import module {module_name!r} ({first_line(error)}); fix the import path "
                        f"{path!r}") from None
    if not hasattr(module, attribute):
        raise UserError(f"{key}: module {module_name!r} has no attribute {attribute!r}; fix the import path {path!r}")
    return getattr(module, attribute)


def resolve_tools(paths: list[str], key: str = "tools") -> dict[str, Callable[..., Any]]:
    """``{name: function}`` for the recipe's ``tools``; ``UserError`` for a path that is not a function, or two
    tools with one name."""
    tools: dict[str, Callable[..., Any]] = {}
    for index, path in enumerate(paths):
        where = f"{key}[{index}]"
        function = import_attribute(path, where)
        if not (inspect.isfunction(function) or inspect.isbuiltin(function) or inspect.ismethod(function)):
            raise UserError(f"{where}: {path!r} is {type(function).__name__} {function!r:.40}, not a function; a tool is "
                            "a plain Python function whose name, signature and docstring describe it")
        name = function.__name__
        if name in tools:
            raise UserError(f"{where}: two tools are named {name!r}; the model calls a tool by its function's name")
        tools[name] = function
    return tools


def tool_schemas(tools: dict[str, Callable[..., Any]]) -> list[dict[str, Any]]:
    """JSON schemas of the tools for a chat template's ``tools=`` (transformers' ``get_json_schema``, TRL's way);
    a tool whose docstring that cannot read gets a schema of its name, first docstring line and parameters."""
    from transformers.utils import get_json_schema

    schemas = []
    for name, function in tools.items():
        try:
            schemas.append(get_json_schema(function))
        except Exception:  # noqa: BLE001 - a docstring without an Args section, missing type hints
            doc = (inspect.getdoc(function) or "").split("\n")[0]
            parameters = {p: {"type": "string"} for p in inspect.signature(function).parameters}
            schemas.append({"type": "function", "function": {"name": name, "description": doc, "parameters": {
                "type": "object", "properties": parameters, "required": list(parameters)}}})
    return schemas


# --- calling a tool -------------------------------------------------------------------------------------


class BadCall(Exception):
    """A call the model wrote that cannot be made (unknown name, arguments that do not bind)."""


def bind_arguments(function: Callable[..., Any], args_text: str) -> tuple[list[Any], dict[str, Any]]:
    """``(args, kwargs)`` for ``function`` read from ``args_text`` by the rule in the module docstring."""
    try:
        call = ast.parse(f"f({args_text})", mode="eval").body
        if any(isinstance(a, ast.Starred) for a in call.args) or any(k.arg is None for k in call.keywords):
            raise ValueError("no * or ** arguments")
        args = [ast.literal_eval(a) for a in call.args]
        kwargs = {k.arg: ast.literal_eval(k.value) for k in call.keywords}
    except (SyntaxError, ValueError, TypeError, MemoryError, RecursionError):
        parameters = [p for p in _parameters(function) if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        if len(parameters) != 1:
            raise BadCall(f"cannot read the arguments {args_text!r:.40}: write Python literals, e.g. 1, 'text', "
                          "key=2") from None
        args, kwargs = [args_text.strip()], {}
    try:
        inspect.signature(function).bind(*args, **kwargs)
    except TypeError as error:
        raise BadCall(f"bad arguments ({error})") from None
    except ValueError:  # a builtin without a signature: let the call say
        pass
    return args, kwargs


def _parameters(function: Callable[..., Any]) -> list[inspect.Parameter]:
    try:
        return list(inspect.signature(function).parameters.values())
    except (TypeError, ValueError):
        return []


class PendingCall:
    """One call running in a daemon thread: ``ready()``, then ``outcome()`` = ``(value, error)``.

    ``error`` is a short text (``"ZeroDivisionError: division by zero"``, ``"timed out after 2 s"``) or None.
    A call that runs past its deadline is abandoned: the thread is a daemon, so it never blocks the exit.
    """

    def __init__(self, function: Callable[..., Any], args: list[Any], kwargs: dict[str, Any], timeout_s: float,
                 label: str):
        self.label, self.timeout_s = label, timeout_s
        self.value: Any = None
        self.error: BaseException | None = None
        self.done = threading.Event()
        self.started = time.monotonic()
        self.deadline = self.started + timeout_s
        threading.Thread(target=self._run, args=(function, args, kwargs), daemon=True, name=f"tool {label}").start()

    @classmethod
    def finished(cls, value: Any = None, error: str | None = None) -> "PendingCall":
        """A call answered without running anything (an unknown tool, bad arguments)."""
        call = cls.__new__(cls)
        call.label, call.timeout_s, call.value, call.started, call.deadline = "", 0.0, value, 0.0, 0.0
        call.error = _Message(error) if error is not None else None
        call.done = threading.Event()
        call.done.set()
        return call

    def _run(self, function, args, kwargs) -> None:
        try:
            self.value = function(*args, **kwargs)
        except BaseException as error:  # noqa: BLE001 - the tool's failure is the model's observation
            self.error = error
        finally:
            self.done.set()

    def ready(self) -> bool:
        return self.done.is_set() or time.monotonic() >= self.deadline

    def wait(self, until: float) -> None:
        """Block until the call is done, its deadline, or the monotonic time ``until``, whichever comes first."""
        self.done.wait(max(0.0, min(until, self.deadline) - time.monotonic()))

    def outcome(self) -> tuple[Any, str | None]:
        if not self.done.is_set():
            return None, f"{self.label} timed out after {self.timeout_s:g} s"
        if self.error is None:
            return self.value, None
        if isinstance(self.error, _Message):
            return None, str(self.error)
        return None, first_line(self.error)


class _Message(Exception):
    """An error text made without running the tool."""


def call_tool(tools: dict[str, Callable[..., Any]], name: str, args_text: str, timeout_s: float) -> PendingCall:
    """Start the call ``name(args_text)``; an unknown name or unbindable arguments are answered at once."""
    function = tools.get(name)
    if function is None:
        return PendingCall.finished(error=f"unknown tool {name!r:.40} (tools: {', '.join(tools) or 'none'})")
    try:
        args, kwargs = bind_arguments(function, args_text)
    except BadCall as error:
        return PendingCall.finished(error=f"{name}: {error}")
    return PendingCall(function, args, kwargs, timeout_s, name)


def result_text(value: Any, error: str | None, result_format: str) -> str:
    """The observation: ``result_format`` with ``{result}`` = the value (``str``), or ``error: ...``."""
    text = f"error: {error}" if error is not None else _as_text(value)
    return result_format.replace("{result}", text)


def _as_text(value: Any) -> str:
    try:
        return value if isinstance(value, str) else str(value)
    except Exception as error:  # noqa: BLE001 - a result whose __str__ raises
        return f"error: the result cannot be shown ({first_line(error)})"


__all__ = ["CallFormat", "result_parts", "check_import_path", "check_episode_keys", "import_attribute", "resolve_tools", "tool_schemas",
           "bind_arguments", "BadCall", "PendingCall", "call_tool", "result_text", "DEFAULT_TOOL_FORMAT",
           "DEFAULT_RESULT_FORMAT"]
