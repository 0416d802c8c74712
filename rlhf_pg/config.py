"""The recipe engine: YAML -> typed dataclasses, strict validation, ``key=value`` dotted overrides.

A recipe is a YAML mapping whose sections mirror a schema of dataclasses. The schemas live beside
what they configure (``rlhf_pg.recipe`` for ``train``/``sft``/``compare``/``eval``, ``rlhf_pg.gym.config``,
``reward_models.config``, ``rlhf_pg.run.optim.OptimConfig``); this module knows none of them. Every key
has a default, so ``{}``-like recipes are valid; unknown keys, wrong types and out-of-range values are
``RecipeError``s that name the key and say how to fix it (with the closest valid key when misspelt).

What a schema class may declare (hooks, all optional):

    shorthand(value) -> dict      classmethod: a non-mapping value written for the section
                                  (``model: builtin:arith-gpt`` -> ``{name_or_path: ...}``)
    extra_keys = "params"         unknown keys are collected into this field (reward keyword arguments)
    check(self)                   rules that involve more than one key (raise RecipeError)
    precheck(data, source)        classmethod on a root schema: refuse data of another kind of recipe
    precheck_file(data, path)     likewise, for a recipe file only (``load``)
    expand(data) -> data          classmethod on a root schema: fill in implied keys (a preset's values)
    kind, example, sections       a root schema's words for messages ("gym recipe", "env: {id: ...}")

``option(..., python=True)``: a Python object given through ``rlhf_pg.api`` (a reward function, a dataset), not a
recipe key (YAML cannot set it; ``to_dict`` and ``==`` leave it out): a ``python:`` reference in a key stands for it.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import field
from pathlib import Path
from typing import Any, Literal

import yaml

from .errors import RecipeError, UserError


def option(default: Any = None, *, help: str, min: float | None = None, max: float | None = None,
           min_exclusive: bool = False, factory: Any = None, python: bool = False) -> Any:
    """A schema field with its documentation and range (checked on load); ``python``: a Python object, not a key."""
    metadata = {"help": help, "min": min, "max": max, "min_exclusive": min_exclusive, "python": python}
    hidden = {"compare": False, "repr": False} if python else {}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata, **hidden)
    return field(default=default, metadata=metadata, **hidden)


def recipe_fields(cls: Any) -> list[dataclasses.Field]:
    """The fields of a schema class (or instance) that are recipe keys: all but ``python=True`` ones."""
    return [f for f in dataclasses.fields(cls) if not f.metadata.get("python")]


SEED_MAX = 2**32 - 1  # numpy's seed range (accelerate seeds python, numpy and torch with the same value)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(tp, str(tp))


def _short(value: Any, limit: int = 80) -> str:
    """``repr(value)`` on one line, cut to ``limit`` characters (messages stay one readable line)."""
    return repr(value) if len(repr(value)) <= limit else repr(value)[: limit - 3] + "..."


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """``value`` converted to type ``tp`` or a ``RecipeError`` naming ``where``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except RecipeError as error:
                errors.append(error)
        if len(errors) == 1:
            raise errors[0]  # `X | None`: X's own message is the precise one (e.g. the item of a list)
        raise RecipeError(f"{where}: expected {_type_name(tp)}, got {_short(value)}")
    if origin is Literal:
        choices = typing.get_args(tp)
        spelled = (("yes", "on", "true") if value else ("no", "off", "false")) if isinstance(value, bool) else ()
        value = next((c for c in choices if str(c).lower() in spelled), value)  # YAML 1.1: `no` is false
        if value in choices and not isinstance(value, bool):
            return value
        close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise RecipeError(f"{where}: {_short(value)} is not allowed; choose one of {', '.join(map(repr, choices))}{hint}")
    if origin is list:
        if not isinstance(value, list):
            raise RecipeError(f"{where}: expected {_type_name(tp)}, got {_short(value)}")
        (item_type,) = typing.get_args(tp)
        return [_coerce(item, item_type, f"{where}[{i}]") for i, item in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"{where}: expected a mapping, got {_short(value)}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        return _dataclass_from_dict(tp, value, where)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise RecipeError(f"{where}: expected true or false, got {_short(value)}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise RecipeError(f"{where}: expected an integer, got {_short(value)}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value)  # YAML reads 1e-3 (no dot) as a string
            except ValueError:
                raise RecipeError(f"{where}: expected a number, got {_short(value)}") from None
        else:
            raise RecipeError(f"{where}: expected a number, got {_short(value)}")
        if not math.isfinite(number):
            raise RecipeError(f"{where}: expected a finite number, got {_short(value)}")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        raise RecipeError(f"{where}: expected a string, got {_short(value)}")
    raise TypeError(f"unsupported recipe type {tp!r} at {where}")  # a bug in the schema, not user input


def _dataclass_from_dict(cls: type, data: Any, where: str) -> Any:
    shorthand = getattr(cls, "shorthand", None)
    if shorthand is not None and data is not None and not isinstance(data, dict):
        data = shorthand(data)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"{where or 'recipe'}: expected a mapping of keys to values, got {_short(data)}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in recipe_fields(cls)}
    extra_field = getattr(cls, "extra_keys", None)
    values: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in known or key == extra_field:
            if extra_field is not None:
                if not isinstance(key, str) or not key.isidentifier():
                    raise RecipeError(f"{where}: {_short(key)} is not a valid keyword argument name for a reward function")
                extra[key] = value  # e.g. reward keyword arguments, checked against the function later
                continue
            close = difflib.get_close_matches(str(key), list(known), n=1, cutoff=0.5)
            hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys here: {', '.join(known)}"
            raise RecipeError(f"unknown recipe key {_short(path)}{hint}")
        values[key] = _coerce(value, hints[key], path)
    if extra_field is not None:
        values[extra_field] = extra
    instance = cls(**values)
    _check_ranges(instance, where)
    return instance


def _check_ranges(instance: Any, where: str) -> None:
    for f in dataclasses.fields(instance):
        value = getattr(instance, f.name)
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        low, high = f.metadata.get("min"), f.metadata.get("max")
        path = f"{where}.{f.name}" if where else f.name
        if low is not None and (value < low or (f.metadata.get("min_exclusive") and value == low)):
            relation = ">" if f.metadata.get("min_exclusive") else ">="
            raise RecipeError(f"{path}: {_short(value)} is out of range; it must be {relation} {low}")
        if high is not None and value > high:
            raise RecipeError(f"{path}: {_short(value)} is out of range; it must be <= {high}")


def load_yaml(path: str | Path) -> Any:
    """Parse a YAML file; missing files and syntax errors become ``RecipeError`` with the line number."""
    path = Path(path)
    if not path.exists():
        raise RecipeError(f"recipe file not found: {path} (give the path of a .yaml recipe, e.g. recipes/quickstart.yaml)")
    if path.is_dir():
        raise RecipeError(f"{path} is a directory; give the path of a .yaml recipe file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise RecipeError(f"cannot read recipe {path}: {error}") from None
    try:
        return yaml.safe_load(text)
    except RecursionError:
        raise RecipeError(f"{path}: malformed YAML: nested too deeply to be a recipe") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = " ".join((getattr(error, "problem", None) or str(error).splitlines()[0]).split())
        context, context_mark = getattr(error, "context", None), getattr(error, "context_mark", None)
        if context and context_mark is not None and (mark is None or context_mark.line != mark.line):
            problem += f" ({' '.join(context.split())} that starts at line {context_mark.line + 1})"
        raise RecipeError(f"{path}: malformed YAML{where}: {problem}") from None


def parse_override(text: str | tuple[str, Any]) -> tuple[list[str], Any]:
    """``"optim.lr=1e-3"`` -> ``(["optim", "lr"], 0.001)``; the value is parsed as YAML. A ``(key, value)`` pair
    (an item of ``rlhf_pg.api``'s dict of overrides) keeps its Python value."""
    if isinstance(text, tuple):
        key, value = text
    elif "=" not in text:
        raise RecipeError(f"override {_short(text)} must look like key=value, e.g. optim.lr=0.001")
    else:
        key, raw = text.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        except RecursionError:
            raise RecipeError(f"override {_short(text)}: the value is nested too deeply") from None
    key = str(key).strip()
    if not key or any(not part for part in key.split(".")):
        raise RecipeError(f"override {_short(text)} has an empty key; write e.g. train.steps=50")
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str | tuple[str, Any]], root: type | None = None
                    ) -> dict[str, Any]:
    """Set each dotted ``key=value`` (or ``(key, value)``) in ``data`` (list items by index: ``rewards.0.weight=0.5``).

    Keys must exist in the schema ``root`` (``Recipe``, ``GymRecipe``, ``RewardModelRecipe``, ...);
    ``from_dict`` reports unknown ones below free-form sections with a suggestion.
    """
    for text in overrides:
        parts, value = parse_override(text)
        text = text if isinstance(text, str) else f"{text[0]}={text[1]}"  # for messages, as on the command line
        node: Any = data
        cls: Any = root
        item_cls: Any = None
        for depth, part in enumerate(parts):
            last = depth == len(parts) - 1
            where = ".".join(parts[: depth + 1])
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise RecipeError(f"override {_short(text)}: {_short(where)} is not an item of the list (it has {len(node)})")
                index = int(part)
                if last:
                    node[index] = value
                else:
                    node = node[index]
                cls = item_cls
                continue
            if dataclasses.is_dataclass(cls) and getattr(cls, "extra_keys", None) is None:
                names = [f.name for f in recipe_fields(cls)]
                if part not in names:
                    close = difflib.get_close_matches(part, names, n=1, cutoff=0.5)
                    hint = f"; did you mean '{'.'.join(parts[:depth] + [close[0]])}'?" if close else ""
                    raise RecipeError(f"override {_short(text)}: unknown recipe key {_short(where)}{hint}")
                hint_type = typing.get_type_hints(cls)[part]
                cls = _section_type(hint_type)
                item_cls = _item_type(hint_type) if cls is list else None
                if not last and not (dataclasses.is_dataclass(cls) or cls in (list, dict)):
                    raise RecipeError(f"override {_short(text)}: '{where}' is a value, not a section; write {where}=VALUE")
            if not isinstance(node, dict):
                raise RecipeError(f"override {_short(text)}: {_short('.'.join(parts[:depth]))} is not a section")
            if last:
                node[part] = value
            else:
                child = node.get(part)
                if child is None:
                    child = [] if cls is list else {}
                    if typing.get_origin(cls) is list:
                        child = []
                    node[part] = child
                elif isinstance(child, str) and hasattr(cls, "shorthand"):  # e.g. `model: builtin:arith-gpt`
                    child = cls.shorthand(child)
                    node[part] = child
                node = child
    return data


def _section_type(tp: Any) -> Any:
    """The dataclass (or list, or dict) type behind an optional/list/mapping annotation."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            if arg is not type(None):
                return _section_type(arg)
    if origin is list:
        return list
    if origin is dict:
        return dict  # a free-form mapping (e.g. a model config): any keys below it
    return tp


def _item_type(tp: Any) -> Any:
    """The item type of a (possibly optional) list annotation, e.g. ``RewardSpec`` for ``list[RewardSpec] | None``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return next((_item_type(a) for a in typing.get_args(tp) if a is not type(None)), None)
    if origin is list:
        return typing.get_args(tp)[0]
    return None


def from_dict(schema: type, data: Any, source: str = "recipe") -> Any:
    """Validate plain data into an instance of the root ``schema``; ``RecipeError`` names the key and ``source``."""
    kind = getattr(schema, "kind", "recipe")
    if data is None:
        raise RecipeError(f"{source} is empty; a {kind} is a YAML mapping, e.g. '{schema.example}'")
    if not isinstance(data, dict):
        raise RecipeError(f"{source} must be a YAML mapping of sections ({schema.sections}), got {type(data).__name__}")
    precheck = getattr(schema, "precheck", None)
    if precheck is not None:
        precheck(data, source)
    expand = getattr(schema, "expand", None)
    try:
        if expand is not None:
            data = expand(data)
        recipe = _dataclass_from_dict(schema, data, "")
        _check_all(recipe)
    except RecipeError as error:
        raise RecipeError(f"{source}: {error}") from None
    return recipe


def _check_all(instance: Any) -> None:
    """Each section's ``check`` (sections first), then the root's."""
    for f in dataclasses.fields(instance):
        value = getattr(instance, f.name)
        if dataclasses.is_dataclass(value):
            _check_all(value)
    check = getattr(instance, "check", None)
    if check is not None:
        try:
            check()
        except RecipeError:
            raise
        except UserError as error:  # a shared validator (chat kwargs, trackers) speaks of the key itself
            raise RecipeError(str(error)) from None


def load(schema: type, path: str | Path, overrides: list[str] | None = None) -> Any:
    """Load a recipe file of ``schema``, apply ``key=value`` overrides, validate."""
    data = load_yaml(path)
    if data is None:
        raise RecipeError(f"{path} is empty; a {getattr(schema, 'kind', 'recipe')} is a YAML mapping, "
                          f"e.g. '{schema.example}'")
    precheck_file = getattr(schema, "precheck_file", None)
    if isinstance(data, dict) and precheck_file is not None:
        precheck_file(data, str(path))
    if isinstance(data, dict) and overrides:
        data = apply_overrides(data, overrides, root=schema)
    return from_dict(schema, data, source=str(path))


def to_dict(recipe: Any) -> dict[str, Any]:
    """Plain data, loadable again with ``from_dict`` (free-form ``extra_keys`` inlined, as written)."""
    if dataclasses.is_dataclass(recipe):
        extra_field = getattr(recipe, "extra_keys", None)
        data = {f.name: to_dict(getattr(recipe, f.name)) for f in recipe_fields(recipe) if f.name != extra_field}
        if extra_field is not None:
            data.update(getattr(recipe, extra_field))
        return data
    if isinstance(recipe, dict):
        return {key: to_dict(value) for key, value in recipe.items()}
    return [to_dict(item) for item in recipe] if isinstance(recipe, list) else recipe


def recipe_keys(root: type) -> list[tuple[str, str, str]]:
    """Every recipe key of ``root`` as ``(dotted key, default, help)``, for documentation."""
    rows: list[tuple[str, str, str]] = []

    def walk(cls: type, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        for f in recipe_fields(cls):
            section = _section_type(hints[f.name])
            if dataclasses.is_dataclass(section) and getattr(section, "extra_keys", None) is None:
                walk(section, f"{prefix}{f.name}.")
                continue
            default = f.default if f.default is not dataclasses.MISSING else "(see below)"
            rows.append((prefix + f.name, repr(default), f.metadata.get("help", "")))

    walk(root, "")
    return rows

