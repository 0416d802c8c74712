"""Fuzzing the recipe loader: whatever a user writes, the answer is a Recipe or one RecipeError (exit 2).

Never another exception, never a hang. The table-driven tests walk the schema itself, so keys added
later (new sections, new fields) are covered without editing this file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import types
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rlhf_pg import cli
from rlhf_pg.recipe import Recipe, RewardSpec, load_recipe, recipe_from_dict
from rlhf_pg.config import recipe_fields
from rlhf_pg.errors import RecipeError

# RLHF_PG_FUZZ_EXAMPLES=5000 python -m pytest tests/test_fuzz_recipes.py  fuzzes harder
FUZZ = settings(max_examples=int(os.environ.get("RLHF_PG_FUZZ_EXAMPLES", 150)), deadline=5000, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                         HealthCheck.too_slow])


def _leaf_fields(cls: type = Recipe, prefix: str = "") -> list[tuple[str, Any, dataclasses.Field]]:
    """Every leaf key of the schema as ``(dotted key, type, field)``; sections are walked, reward items too (fields
    holding Python objects, ``option(python=True)``, are not keys)."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in recipe_fields(cls):
        tp = hints[f.name]
        section = _strip_optional(tp)
        if dataclasses.is_dataclass(section) and section is not RewardSpec:
            rows += _leaf_fields(section, f"{prefix}{f.name}.")
        elif typing.get_origin(section) is list and typing.get_args(section)[0] is RewardSpec:
            rows += _leaf_fields(RewardSpec, f"{prefix}{f.name}.0.")
        elif not (cls is RewardSpec and f.name == "params"):
            rows.append((prefix + f.name, tp, f))
    return rows


def _strip_optional(tp: Any) -> Any:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _accepts_str(tp: Any) -> bool:
    if tp is str or tp is Any:
        return True
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return any(_accepts_str(a) for a in typing.get_args(tp))
    return False


LEAVES = _leaf_fields()
DOTTED = [key for key, _, _ in LEAVES]
SECTIONS = sorted({key.split(".")[0] for key in DOTTED})


def _nest(dotted: str, value: Any) -> dict[str, Any]:
    """``"optim.lr", 1`` -> ``{"optim": {"lr": 1}}`` (``rewards.0.x`` -> a one-item list)."""
    parts = dotted.split(".")
    node: Any = value
    for part in reversed(parts[1:]):
        node = [node] if part.isdigit() else {part: node}
    if parts[1:2] and parts[1].isdigit():
        return {parts[0]: [_nest(".".join(parts[2:]), value)]} if len(parts) > 2 else {parts[0]: [value]}
    return {parts[0]: node}


def _load(tmp_path: Path, data_or_text: Any, overrides: list[str] = ()) -> Recipe | RecipeError:
    """Write a recipe and load it: a Recipe, or the RecipeError (any other exception fails the test)."""
    path = tmp_path / "fuzz.yaml"
    text = data_or_text if isinstance(data_or_text, str) else yaml.safe_dump(data_or_text, allow_unicode=True)
    path.write_text(text, encoding="utf-8")
    try:
        recipe = load_recipe(path, list(overrides))
    except RecipeError as error:
        message = str(error)
        assert message.strip() and "\n" not in message, message
        return error
    assert isinstance(recipe, Recipe)
    assert recipe_from_dict(recipe.to_dict()) == recipe  # whatever loads, round-trips
    return recipe


# --- table-driven: every key of the schema --------------------------------------------------------


@pytest.mark.parametrize("key,tp", [(k, t) for k, t, _ in LEAVES])
def test_a_mapping_where_a_value_belongs_names_the_key(tmp_path, key, tp):
    result = _load(tmp_path, _nest(key, {"nested": {"deeper": 1}}))
    if typing.get_origin(_strip_optional(tp)) is dict:  # a free-form mapping (chat_template_kwargs): accepted
        assert isinstance(result, Recipe), (key, result)
        return
    assert isinstance(result, RecipeError), key
    assert key.replace(".0.", "[0].") in str(result) or key in str(result), str(result)


@pytest.mark.parametrize("key,tp", [(k, t) for k, t, _ in LEAVES])
def test_a_word_where_a_number_or_choice_belongs_names_the_key(tmp_path, key, tp):
    result = _load(tmp_path, _nest(key, "zz-not-valid"))
    if _accepts_str(tp):
        return  # a string key: any word is a valid value here (checked later, e.g. as a path)
    assert isinstance(result, RecipeError), key
    assert key.replace(".0.", "[0].") in str(result) or key in str(result), str(result)


RANGED = [(key, f) for key, _, f in LEAVES if f.metadata.get("min") is not None or f.metadata.get("max") is not None]


@pytest.mark.parametrize("key,f", RANGED, ids=[key for key, _ in RANGED])
def test_out_of_range_values_name_the_key_and_the_bound(tmp_path, key, f):
    low, high = f.metadata.get("min"), f.metadata.get("max")
    bad = []
    if low is not None:
        bad.append(low if f.metadata.get("min_exclusive") else low - 1)
    if high is not None:
        bad.append(high + 1)
    for value in bad:
        result = _load(tmp_path, _nest(key, value))
        assert isinstance(result, RecipeError), (key, value)
        assert "out of range" in str(result) and key.split(".")[-1] in str(result), str(result)


@pytest.mark.parametrize("section", [s for s in SECTIONS if s != "rewards"])
def test_an_unknown_key_in_every_section_is_named(tmp_path, section):
    top_level_values = ("seed", "output_dir", "tools", "environment")  # keys of the root that are not sections
    result = _load(tmp_path, {section: {"zz_unknown_key": 1}} if section not in top_level_values else {"zz_unknown_key": 1})
    assert isinstance(result, RecipeError)
    assert "unknown recipe key" in str(result) and "zz_unknown_key" in str(result)


# --- property-based: random structure, random text, random overrides ------------------------------

SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
)
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
                      max_leaves=10)
KEYS = st.one_of(st.sampled_from(DOTTED), st.sampled_from(SECTIONS), st.text(min_size=1, max_size=10))


@st.composite
def schema_shaped_recipes(draw) -> dict[str, Any]:
    """Mostly real keys, random values (wrong types, huge ints, NaN, nested junk), sometimes random keys."""
    data: dict[str, Any] = {}
    for key in draw(st.lists(KEYS, max_size=6)):
        nested = _nest(key, draw(VALUES)) if "." in key else {key: draw(VALUES)}
        for top, value in nested.items():
            if isinstance(data.get(top), dict) and isinstance(value, dict):
                data[top].update(value)
            else:
                data[top] = value
    return data


@FUZZ
@given(data=schema_shaped_recipes())
def test_random_recipes_load_or_raise_a_recipe_error(tmp_path, data):
    _load(tmp_path, data)


YAML_ALPHABET = ": -[]{}\n\t#&*!|>'\"%@`,?.=abcxyz0129_" + "\u00e9\u4e2d"


@FUZZ
@given(text=st.text(alphabet=YAML_ALPHABET, max_size=120))
def test_random_text_loads_or_raises_a_recipe_error(tmp_path, text):
    _load(tmp_path, text)


OVERRIDE_KEYS = st.one_of(st.sampled_from(DOTTED), st.sampled_from(SECTIONS),
                          st.builds(lambda k, s: f"{k}.{s}", st.sampled_from(DOTTED), st.text(max_size=5)),
                          st.text(alphabet="ab.0_=[]{}:", max_size=12))
OVERRIDE_VALUES = st.one_of(st.text(alphabet="ab1.-e[]{}:,'\"!&* ", max_size=12),
                            VALUES.map(lambda v: yaml.safe_dump(v, default_flow_style=True).strip()))


@FUZZ
@given(overrides=st.lists(st.builds(lambda k, v: f"{k}={v}", OVERRIDE_KEYS, OVERRIDE_VALUES) | st.text(max_size=15),
                          max_size=4))
def test_random_overrides_apply_or_raise_a_recipe_error(tmp_path, overrides):
    _load(tmp_path, {"rewards": [{"name": "arithmetic_exact"}, "length_penalty"], "train": {"steps": 3}}, overrides)


@FUZZ
@given(data=schema_shaped_recipes(), overrides=st.lists(st.builds(lambda k, v: f"{k}={v}", OVERRIDE_KEYS,
                                                                     OVERRIDE_VALUES), max_size=2))
def test_the_cli_answers_every_malformed_recipe_with_exit_2_and_one_message(tmp_path, data, overrides):
    data["zz_always_unknown"] = 1  # guarantees the recipe is invalid, so nothing ever starts training
    path = tmp_path / "cli.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    stderr, stdout = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(stdout):
        code = cli.main(["--no-progress", "train", str(path), "--output-dir", str(tmp_path / "never"), *overrides])
    assert code == 2
    assert stderr.getvalue().startswith("error: ") and stderr.getvalue().count("\n") == 1, stderr.getvalue()
    assert not (tmp_path / "never").exists()


@pytest.mark.parametrize("text,message", [
    ("a: " + "[" * 1200 + "]" * 1200 + "\n", "nested too deeply"),
    ("a: &x [*x]\n", "unknown recipe key 'a'"),
    ("rewards: [{name: arithmetic_exact, 3: 1}]\n", "not a valid keyword argument name"),
    ("!!python/object/apply:os.system ['true']\n", "malformed YAML"),
    ("seed: -1\n", "seed: -1 is out of range"),
    ("seed: 99999999999999999999\n", "is out of range"),
    ("data: {max_operand: 2, num_eval: 200}\n", "data.num_eval=200 leaves no training problems"),
    ("data: {max_operand: 100000}\n", "lower data.max_operand"),
    ("\x00\x01binary", "malformed YAML"),
])
def test_hostile_recipes_found_by_fuzzing(tmp_path, text, message):
    result = _load(tmp_path, text)
    assert isinstance(result, RecipeError) and message in str(result), str(result)


@pytest.mark.parametrize("override,message", [
    ("train.steps=" + "[" * 1200 + "]" * 1200, "nested too deeply"),
    ("model.name_or_path.x=1", "'model.name_or_path' is a value, not a section"),
    ("seed.x=1", "'seed' is a value, not a section"),
    ("=3", "empty key"),
    ("rewards.x.weight=1", "not an item of the list"),
])
def test_hostile_overrides_found_by_fuzzing(tmp_path, override, message):
    result = _load(tmp_path, {"train": {"steps": 3}}, [override])
    assert isinstance(result, RecipeError) and message in str(result), str(result)
