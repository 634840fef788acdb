"""Recipes: loading, validation errors that name the field path, and round trips."""

import pytest
import yaml

from hfdistill import Recipe, RecipeError
from hfdistill.recipe import term_name

GOOD = {
    "task_weight": 0.1,
    "terms": [
        {"loss": "kd", "weight": 0.9, "params": {"temperature": 4}},
        {"loss": "fitnet", "student": "layer2", "teacher": "layer3", "adapter": "conv_reg"},
        {"loss": "at", "student": ["layer2", "layer3"], "teacher": ["layer2", "layer3"]},
    ],
}


def error_of(data) -> RecipeError:
    with pytest.raises(RecipeError) as info:
        Recipe.from_dict(data)
    return info.value


def test_good_recipe_loads_and_round_trips(tmp_path):
    recipe = Recipe.from_dict(GOOD)
    assert recipe.terms[0].params == {"temperature": 4}
    assert recipe.terms[1].weight == 1.0 and recipe.terms[2].student == ["layer2", "layer3"]
    path = tmp_path / "r.yaml"
    recipe.save(path)
    assert Recipe.from_yaml(path) == recipe
    assert yaml.safe_load(recipe.to_yaml())["terms"][1] == GOOD["terms"][1]  # defaults are not written out


@pytest.mark.parametrize(
    "data, path, fragment",
    [
        ({"terms": [{"loss": "kd", "wieght": 1}]}, "terms[0].wieght", "did you mean 'weight'"),
        ({"term": []}, "term", "did you mean 'terms'"),
        ({"terms": [{"loss": "kdd"}]}, "terms[0].loss", "unknown loss 'kdd' (did you mean 'kd'?)"),
        ({"terms": [{"loss": "kd"}, {"loss": "mse", "student": "a", "teacher": "b", "adapter": "conv"}]},
         "terms[1].adapter", "allowed: conv1x1"),
        ({"terms": [{"loss": "kd", "weight": "heavy"}]}, "terms[0].weight", "expected number, got str"),
        ({"terms": [{"loss": "kd", "weight": -1}]}, "terms[0].weight", "must be >= 0"),
        ({"terms": [{"loss": "kd", "params": {"temperature": 0}}]}, "terms[0].params.temperature", "> 0"),
        ({"terms": [{"loss": "kd", "params": {"temprature": 2}}]}, "terms[0].params.temprature",
         "did you mean 'temperature'"),
        ({"terms": [{"weight": 1}]}, "terms[0].loss", "missing required field"),
        ({"terms": [{"loss": "mse"}]}, "terms[0].student", "must name the student tap"),
        ({"terms": [{"loss": "mse", "student": "layer 3", "teacher": "x"}]}, "terms[0].student", "is not a tap"),
        ({"terms": [{"loss": "mse", "student": ["a", 3], "teacher": ["a", "b"]}]}, "terms[0].student[1]",
         "expected string, got int 3"),
        ({"terms": [{"loss": "mse", "student": 3, "teacher": "b"}]}, "terms[0].student",
         "expected string or list of string or null"),
        ({"terms": [{"loss": "kd", "adapter_params": {"bn": False}}]}, "terms[0].adapter_params", "without an `adapter`"),
        ({"terms": [{"loss": "mse", "student": "a", "teacher": "b", "adapter": "conv1x1",
                     "adapter_params": {"bias": 1}}]}, "terms[0].adapter_params.bias", "its parameters: bn, resize"),
        ({"terms": "kd"}, "terms", "expected list of mapping"),
        ({"task_weight": -0.5}, "task_weight", "must be >= 0"),
        ({"task": "segmentation"}, "task", "allowed: image-classification"),
        ({"training": {"learning_rte": 0.1}}, "training.learning_rte", "did you mean 'learning_rate'"),
        ({"student": {"nam": "timm:resnet18"}}, "student.nam", "did you mean 'name'"),
        ({"student": {"pretrained": True}}, "student.name", "missing required field"),
        ({"terms": [{"loss": "kd"}, {"loss": "kd", "name": "kd"}]}, "terms[1].name", "two terms are named 'kd'"),
    ],
)
def test_recipe_errors_name_the_field(data, path, fragment):
    error = error_of(data)
    assert error.path == path
    assert str(error).startswith(f"recipe error at {path}: ")
    assert fragment in str(error)


def test_yaml_errors(tmp_path):
    with pytest.raises(RecipeError, match="does not exist"):
        Recipe.from_yaml(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("terms: [\n  - loss: kd\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        Recipe.from_yaml(bad)
    tagged = tmp_path / "tagged.yaml"
    tagged.write_text("terms: !!python/object/apply:os.system ['echo hi']\n")
    with pytest.raises(RecipeError, match="not valid YAML"):  # safe_load refuses executable tags
        Recipe.from_yaml(tagged)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(RecipeError, match="is empty"):
        Recipe.from_yaml(empty)


def test_term_names_for_logging():
    recipe = Recipe.from_dict({"terms": [{"loss": "mse", "student": "a", "teacher": "a"},
                                         {"loss": "mse", "student": "b", "teacher": "b"}, {"loss": "kd"}]})
    assert [term_name(t, i, recipe.terms) for i, t in enumerate(recipe.terms)] == ["mse_0", "mse_1", "kd"]
