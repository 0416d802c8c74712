"""Recipe validation: unknown keys, types, ranges, overrides and YAML errors are clear RecipeErrors."""

import pytest

from rlhf_pg.recipe import Recipe, apply_overrides, load_recipe, recipe_from_dict, recipe_keys
from rlhf_pg.errors import RecipeError


def write(tmp_path, text):
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def test_defaults_and_shorthands(tmp_path):
    recipe = load_recipe(write(tmp_path, "model: builtin:arith-gpt\nrewards: [arithmetic_exact]\noptim: {lr: 1e-3}\n"))
    assert recipe.model.name_or_path == "builtin:arith-gpt"
    assert recipe.rewards[0].name == "arithmetic_exact" and recipe.rewards[0].weight == 1.0
    assert recipe.optim.lr == pytest.approx(1e-3)  # YAML reads 1e-3 as a string; it is still a number
    assert isinstance(recipe, Recipe)


def test_unknown_key_suggests_the_closest(tmp_path):
    with pytest.raises(RecipeError, match=r"unknown recipe key 'optim.lrr'; did you mean 'lr'"):
        load_recipe(write(tmp_path, "optim: {lrr: 0.1}\n"))
    with pytest.raises(RecipeError, match=r"unknown recipe key 'rollout_cfg'"):
        load_recipe(write(tmp_path, "rollout_cfg: {}\n"))


@pytest.mark.parametrize("text,message", [
    ("train: {steps: -3}\n", r"train.steps: -3 is out of range; it must be >= 1"),
    ("train: {steps: ten}\n", r"train.steps: expected an integer, got 'ten'"),
    ("algorithm: {baseline: loo}\n", r"algorithm.baseline: 'loo' is not allowed"),
    ("rollout: {top_p: 0}\n", r"rollout.top_p: 0.0 is out of range; it must be > 0"),
    ("algorithm: {whiten: 1}\n", r"algorithm.whiten: expected true or false"),
    ("optim: {lr: .nan}\n", r"optim.lr: expected a finite number"),
    ("rewards: []\n", r"list at least one reward"),
    ("rollout: {completions_per_prompt: 1}\n", r"leave_one_out' needs rollout.completions_per_prompt >= 2"),
    ("- a\n- b\n", r"must be a YAML mapping"),
    ("train: 5\n", r"train: expected a mapping"),
])
def test_bad_values_name_the_key(tmp_path, text, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(write(tmp_path, text))


def test_malformed_yaml_reports_the_line(tmp_path):
    with pytest.raises(RecipeError, match=r"malformed YAML at line 3"):
        load_recipe(write(tmp_path, "train:\n  steps: 3\n   eval_every: 2\n"))


def test_empty_and_missing_recipes(tmp_path):
    with pytest.raises(RecipeError, match="is empty"):
        load_recipe(write(tmp_path, "# nothing here\n"))
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")


def test_overrides_set_nested_keys_and_list_items(tmp_path):
    path = write(tmp_path, "rewards: [{name: arithmetic_exact}, {name: length_penalty, target: 3}]\n")
    recipe = load_recipe(path, ["optim.lr=5e-4", "train.steps=7", "rewards.1.weight=0.25", "model.dtype=bfloat16",
                                "peft.r=4", "seed=3"])
    assert recipe.optim.lr == pytest.approx(5e-4) and recipe.train.steps == 7 and recipe.seed == 3
    assert recipe.rewards[1].weight == 0.25 and recipe.rewards[1].params == {"target": 3}
    assert recipe.model.dtype == "bfloat16" and recipe.peft.r == 4


def test_yaml_booleans_spell_the_choice_they_read_as(tmp_path):
    # YAML 1.1 reads `no` as false: the documented default `train.mixed_precision: no` must still be accepted,
    # in a file and as an override; `yes` names no choice and stays an error
    recipe = load_recipe(write(tmp_path, "train: {mixed_precision: no}\n"))
    assert recipe.train.mixed_precision == "no"
    recipe = load_recipe(write(tmp_path, "train: {mixed_precision: bf16}\n"), ["train.mixed_precision=no"])
    assert recipe.train.mixed_precision == "no"
    with pytest.raises(RecipeError, match="train.mixed_precision: True is not allowed"):
        load_recipe(write(tmp_path, "train: {steps: 3}\n"), ["train.mixed_precision=yes"])


@pytest.mark.parametrize("override,message", [
    ("optim.lrate=1", r"unknown recipe key 'optim.lrate'; did you mean 'optim.lr'"),
    ("train.steps", r"must look like key=value"),
    ("rewards.5.weight=1", r"not an item of the list"),
    ("train.steps=abc", r"train.steps: expected an integer"),
])
def test_bad_overrides(tmp_path, override, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(write(tmp_path, "train: {steps: 3}\n"), [override])


def test_round_trip_and_documented_keys():
    recipe = recipe_from_dict({"rewards": [{"name": "length_penalty", "target": 5, "weight": 0.5}]})
    again = recipe_from_dict(recipe.to_dict())
    assert again == recipe
    keys = {row[0] for row in recipe_keys()}
    assert {"optim.lr", "algorithm.baseline", "rollout.completions_per_prompt", "train.steps"} <= keys
    assert all(help_text for _, _, help_text in recipe_keys())


def test_apply_overrides_creates_missing_sections():
    data = apply_overrides({}, ["algorithm.kl_coef=0.1"])
    assert data == {"algorithm": {"kl_coef": 0.1}}
