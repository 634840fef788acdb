"""Property-based fuzzing of recipe validation (issue 11): mutants of valid recipes and overrides.

Every mutant either validates or raises the bad-input error (:class:`hfdistill.errors.BadInputError`)
with a field path; none raises anything else, and validation writes no file. Validation only (no
models, no data), so a few hundred examples stay within the default suite's time budget.
"""

from __future__ import annotations

import copy
import math
import os
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hfdistill import Recipe
from hfdistill.errors import BadInputError
from hfdistill.recipe import apply_overrides, load_recipe_data, load_yaml, parse_overrides

ROOT = Path(__file__).resolve().parent.parent
SEEDS = [
    load_recipe_data(ROOT / "recipes" / "quickstart.yaml"),
    load_recipe_data(ROOT / "recipes" / "fashion_mnist" / "fitnet_two_stage.yaml"),
    load_recipe_data(ROOT / "recipes" / "fashion_mnist" / "ofd.yaml"),
    load_recipe_data(ROOT / "recipes" / "cifar100" / "dkd.yaml"),
    {"task_weight": 0.1, "terms": [
        {"loss": "kd", "weight": 0.9, "params": {"temperature": 4}},
        {"loss": "fitnet", "student": "layer2", "teacher": "layer3", "adapter": "conv_reg"},
        {"loss": "at", "student": ["layer2", "layer3"], "teacher": ["layer2", "layer3"]},
    ]},
]
for seed in SEEDS:  # the seeds themselves are valid
    Recipe.from_dict(seed)

# Values a hostile or careless user puts anywhere: wrong types, out-of-range and non-finite numbers,
# strings that look like numbers or names, nesting.
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**40), max_value=2**40),
    st.sampled_from([0, -1, 1, 2.5, -0.5, 1e-3, 1e300, math.nan, math.inf, -math.inf]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["", " ", "1e-3", "nan", "kd", "layer3", "logits", "task", "a.b", "../etc", "conv1x1",
                     "student", "losses.kd", "image-classification", "x" * 300, "日本", "\x00"]),
    st.text(max_size=12),
)
VALUES = st.recursive(
    SCALARS,
    lambda children: st.one_of(st.lists(children, max_size=3), st.dictionaries(st.text(max_size=6), children, max_size=3)),
    max_leaves=6,
)


def _paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path (tuple of keys / indices) to a node of the plain data, the root excluded."""
    found = []
    if isinstance(node, dict):
        items = list(node.items())
    elif isinstance(node, list):
        items = list(enumerate(node))
    else:
        return found
    for key, value in items:
        found.append(prefix + (key,))
        found.extend(_paths(value, prefix + (key,)))
    return found


def _parent(data: Any, path: tuple) -> Any:
    for key in path[:-1]:
        data = data[key]
    return data


@st.composite
def mutants(draw) -> dict:
    data = copy.deepcopy(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(min_value=1, max_value=3))):
        paths = _paths(data)
        action = draw(st.sampled_from(["replace", "delete", "add", "rename"]))
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent = _parent(data, path)
        key = path[-1]
        if action == "replace":
            parent[key] = draw(VALUES)
        elif action == "delete":
            del parent[key]
        elif action == "add":
            if isinstance(parent, dict):
                parent[draw(st.sampled_from(["weight", "loss", "params", "name", "train", "bogus", "stages", "terms",
                                             "training", "seed", "student", "teacher"]))] = draw(VALUES)
            else:
                parent.append(draw(VALUES))
        elif isinstance(parent, dict):
            parent[draw(st.text(max_size=8))] = parent.pop(key)
    return data


def _check(make: Any) -> None:
    try:
        make()
    except BadInputError as exc:
        path = getattr(exc, "path", getattr(exc, "param", None))
        assert path is not None, f"bad-input error without a field path: {exc!r}"
        assert str(exc).strip()


@pytest.fixture
def no_writes(tmp_path, monkeypatch):
    """Validation runs in an empty working folder that must stay empty."""
    monkeypatch.chdir(tmp_path)
    yield tmp_path
    assert not any(tmp_path.iterdir()), f"validation wrote {sorted(os.listdir(tmp_path))}"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=mutants())
def test_recipe_mutants_validate_or_name_the_field(data, no_writes):
    _check(lambda: Recipe.from_dict(data))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.sampled_from(SEEDS), text=st.text(max_size=40))
def test_recipe_text_round_trips_or_names_the_field(seed, text, no_writes):
    """Random YAML text spliced into a valid recipe file: a recipe, or a RecipeError."""
    source = yaml.safe_dump(seed) + text

    def load() -> None:
        try:
            data = load_yaml(source)
        except (yaml.YAMLError, RecursionError):
            return  # a file that is not YAML is a RecipeError at load time (tested in test_recipe.py)
        Recipe.from_dict(data)

    _check(load)


KEYS = st.sampled_from([
    "training.learning_rate", "training.per_device_train_batch_size", "training.seed", "training.max_steps",
    "training.num_train_epochs", "training.bf16", "training.bogus", "terms.0.weight", "terms.0.params.temperature",
    "terms.0.loss", "terms.5.weight", "terms.x.weight", "task_weight", "student.name", "data.max_train_samples",
    "data.image_size", "stages.0.training.num_train_epochs", "stages.1.terms.0.weight", "terms", "", ".", "a..b",
    "training", "terms.0", "terms.-1.weight",
])
TEXTS = st.one_of(st.sampled_from(["1e-3", "0", "-1", "nan", ".inf", "true", "no", "null", "[]", "{}", "abc", "2.5",
                                   "[1, 2", "{a: 1}", "!!python/object:os.system ls", "&a [*a]"]), st.text(max_size=10))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.sampled_from(SEEDS), pairs=st.lists(st.tuples(KEYS, TEXTS), min_size=1, max_size=3))
def test_override_mutants_validate_or_name_the_field(seed, pairs, no_writes):
    tokens = [part for key, text in pairs for part in (f"--{key}", text)]

    def apply() -> None:
        Recipe.from_dict(apply_overrides(seed, parse_overrides(tokens)))

    _check(apply)
