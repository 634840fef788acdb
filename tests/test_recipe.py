"""Recipes: loading, validation errors that name the field path, round trips, loss parameters, overrides.

Stages and `base:` are tested in tests/test_recipe_stages.py.
"""

import pytest
import yaml

from hfdistill import Recipe, RecipeError
from hfdistill.errors import OverrideError
from hfdistill.recipe import apply_overrides, load_recipe, parse_overrides, term_name

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
                     "adapter_params": {"bias": 1}}]}, "terms[0].adapter_params.bias", "its parameters are: bn, resize"),
        ({"terms": [{"loss": "mse", "student": "a", "teacher": "b", "adapter": "resize",
                     "adapter_params": {"mode": "weird"}}]}, "terms[0].adapter_params.mode", "must be one of auto"),
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


# ------------------------------------------------------------------------------ loss parameters
def test_bad_loss_parameter_is_a_recipe_error_at_its_path():
    """The loss is built when the recipe is validated, so its own checks name the field (issue 8)."""
    error = error_of({"terms": [{"loss": "kd"}, {"loss": "dkd", "params": {"alpha": -1.0}}]})
    assert error.path == "terms[1].params.alpha", str(error)
    error = error_of({"stages": [{"name": "a", "terms": [{"loss": "dkd", "params": {"alpha": -1.0}}]}]})
    assert error.path == "stages[0].terms[0].params.alpha", str(error)


def test_stray_constructor_errors_name_the_params(monkeypatch):
    from hfdistill import losses

    def broken(name, **params):
        raise TypeError("bad combination")

    monkeypatch.setattr(losses, "build", broken)
    error = error_of({"terms": [{"loss": "kd"}]})
    assert error.path == "terms[0].params" and "bad combination" in str(error)


def test_loss_param_error_maps_to_the_param(monkeypatch):
    from hfdistill import losses
    from hfdistill.errors import LossParamError

    def picky(name, **params):
        raise LossParamError("beta", "must be >= 0, got -2")

    monkeypatch.setattr(losses, "build", picky)
    error = error_of({"terms": [{"loss": "kd"}]})
    assert error.path == "terms[0].params.beta" and str(error).endswith("must be >= 0, got -2")


# ------------------------------------------------------------------------------ overrides
TINY = {
    "task": "image-classification",
    "teacher": {"name": "timm:test_resnet", "pretrained": False},
    "student": {"name": "timm:test_efficientnet"},
    "data": {"name": "sklearn-digits", "image_size": 16, "max_train_samples": 128, "max_eval_samples": 64},
    "terms": [{"loss": "kd", "weight": 0.5, "params": {"temperature": 4}}],
    "training": {"output_dir": "out/student", "max_steps": 4, "learning_rate": 0.001, "save_strategy": "no"},
}


def write(tmp_path, recipe: dict, name: str = "recipe.yaml") -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    return str(path)


def test_parse_overrides_types():
    pairs = parse_overrides(["--training.learning_rate", "0.01", "--terms.0.weight=0.5", "--student.baseline", "true",
                             "--student.name", "timm:resnet10t", "--data.options", "{topics: [ai]}",
                             "--training.save_strategy", "no"])
    assert pairs == [
        ("training.learning_rate", 0.01),
        ("terms.0.weight", 0.5),
        ("student.baseline", True),
        ("student.name", "timm:resnet10t"),
        ("data.options", {"topics": ["ai"]}),
        ("training.save_strategy", "no"),  # not YAML 1.1's False
    ]


def test_parse_overrides_rejects_bare_values():
    with pytest.raises(OverrideError, match="overrides look like"):
        parse_overrides(["0.01"])
    with pytest.raises(OverrideError, match="has no value"):
        parse_overrides(["--training.learning_rate"])


def test_apply_overrides_nested_and_lists():
    out = apply_overrides(TINY, [("training.learning_rate", 0.01), ("terms.0.weight", 0.25),
                                 ("terms.0.params.temperature", 2), ("student.kwargs.drop_rate", 0.1)])
    assert out["training"]["learning_rate"] == 0.01
    assert out["terms"][0]["weight"] == 0.25 and out["terms"][0]["params"]["temperature"] == 2
    assert out["student"]["kwargs"] == {"drop_rate": 0.1}
    assert TINY["training"]["learning_rate"] == 0.001  # the input is not modified


@pytest.mark.parametrize(
    "key, path, message",
    [
        ("studnet.name", "studnet", "did you mean 'student'"),
        ("terms.3.weight", "terms.3", "1 item"),
        ("student.nmae", "student.nmae", "did you mean 'name'"),
        ("terms.0.wieght", "terms.0.wieght", "did you mean 'weight'"),
        ("stages.0.name", "stages", "the recipe has no `stages`"),
        ("base", "base", "there is no recipe key 'base'"),
    ],
)
def test_apply_overrides_unknown_keys(key, path, message):
    with pytest.raises(OverrideError, match=message) as info:
        apply_overrides(TINY, [(key, 1)])
    assert info.value.path == path


def test_load_recipe_with_override_checks_training_keys(tmp_path):
    path = write(tmp_path, TINY)
    recipe = load_recipe(path, ["--training.learning_rate", "0.02", "--terms.0.weight", "0.7"])
    assert recipe.training["learning_rate"] == 0.02 and recipe.terms[0].weight == 0.7
    assert load_recipe(path, [("training.learning_rate", 0.03)]).training["learning_rate"] == 0.03  # parsed pairs
    assert load_recipe(path) == Recipe.from_dict(TINY)
    with pytest.raises(OverrideError, match="training.learning_rat.*did you mean 'learning_rate'") as info:
        load_recipe(path, ["--training.learning_rat", "0.02"])
    assert info.value.path == "training.learning_rat"
    with pytest.raises(OverrideError, match="after the command-line overrides") as info:
        load_recipe(path, ["--terms.0.weight", "-1"])
    assert info.value.path == "terms[0].weight"


# ---- bad input that used to slip through (issue 11: every bad value is an error naming its field) ----
def test_exponent_numbers_without_a_dot_are_numbers(tmp_path):
    """YAML 1.1 reads `1e-3` as a string; a recipe means the number (in files and in overrides)."""
    path = tmp_path / "r.yaml"
    path.write_text("terms: [{loss: kd}]\ntraining: {learning_rate: 1e-3, weight_decay: 5E-4}\n")
    recipe = Recipe.from_yaml(path)
    assert recipe.training == {"learning_rate": 0.001, "weight_decay": 0.0005}
    assert parse_overrides(["--training.learning_rate", "2e-5", "--terms.0.weight=1E1"]) == [
        ("training.learning_rate", 2e-5), ("terms.0.weight", 10.0)]
    assert parse_overrides(["--training.run_name", "1e3x"]) == [("training.run_name", "1e3x")]


def test_duplicate_keys_are_an_error(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("terms:\n  - loss: kd\n    weight: 0.5\n    weight: 0.9\n")
    with pytest.raises(RecipeError, match=r"'weight' twice \(first on line 3\)"):
        Recipe.from_yaml(path)


@pytest.mark.parametrize(
    "data, path",
    [
        ({"terms": [{"loss": "kd", "weight": float("nan")}]}, "terms[0].weight"),
        ({"terms": [{"loss": "kd", "weight": float("inf")}]}, "terms[0].weight"),
        ({"terms": [{"loss": "kd"}], "task_weight": float("nan")}, "task_weight"),
        ({"terms": [{"loss": "kd", "params": {"temperature": float("nan")}}]}, "terms[0].params.temperature"),
        ({"terms": [{"loss": "kd", "params": {"temperature": "abc"}}]}, "terms[0].params.temperature"),
        ({"terms": [{"loss": "kd", "name": "task"}]}, "terms[0].name"),
        ({"terms": [{"loss": "kd", "name": "my.kd"}]}, "terms[0].name"),
        ({"terms": [{"loss": "kd", "name": ""}]}, "terms[0].name"),
    ],
)
def test_non_finite_values_and_bad_term_names(data, path):
    assert error_of(data).path == path


@pytest.mark.parametrize(
    "key, value, fragment",
    [
        ("learning_rate", "1e-3", "write it without quotes"),
        ("learning_rate", True, "must be a number"),
        ("learning_rate", float("nan"), "finite"),
        ("learning_rate", -0.1, ">= 0"),
        ("per_device_train_batch_size", 0, ">= 1"),
        ("gradient_accumulation_steps", 0, ">= 1"),
        ("seed", -1, ">= 0"),
        ("max_steps", 2.5, "integer"),
        ("max_steps", 0, "-1"),
        ("num_train_epochs", 0, "> 0"),
        ("bf16", "yes", "true or false"),
        ("task_weight", float("inf"), "finite"),
    ],
)
def test_training_values_are_checked(key, value, fragment):
    error = error_of({"terms": [{"loss": "kd"}], "training": {key: value}})
    assert error.path == f"training.{key}" and fragment in str(error)
    staged = {"stages": [{"name": "a", "terms": [{"loss": "kd"}], "training": {key: value}}]}
    assert error_of(staged).path == f"stages[0].training.{key}"


def test_a_timestamp_is_not_a_seed(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("terms: [{loss: kd}]\ntraining: {seed: 2024-01-01}\n")
    with pytest.raises(RecipeError, match="training.seed: must be an integer"):
        Recipe.from_yaml(path)


def test_unreadable_recipe_files_are_recipe_errors(tmp_path):
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"terms: [{loss: kd}]\n\xff\xfe\x00\x81")
    with pytest.raises(RecipeError, match="not UTF-8"):
        Recipe.from_yaml(binary)
    deep = tmp_path / "deep.yaml"
    deep.write_text("terms: " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(RecipeError, match="(nested too deeply|not valid YAML)"):
        Recipe.from_yaml(deep)
    folder = tmp_path / "folder.yaml"
    folder.mkdir()
    with pytest.raises(RecipeError, match="is a folder"):
        Recipe.from_yaml(folder)


@pytest.mark.parametrize(
    "data, path",
    [
        ({"name": ""}, "data.name"),
        ({"name": "digits", "max_train_samples": -5}, "data.max_train_samples"),
        ({"name": "digits", "image_size": 0}, "data.image_size"),
        ({"name": "digits", "max_length": 0}, "data.max_length"),
    ],
)
def test_data_values_are_checked(data, path):
    assert error_of({"terms": [{"loss": "kd"}], "data": data}).path == path


@pytest.mark.parametrize(
    "data, path",
    [
        ({"terms": [{"loss": "kd"}], "data": {"name": "sklearn-digits", "options": {"x": 1}}}, "data.options"),
        ({"terms": [{"loss": "kd"}], "data": {"name": "fashion-mnist", "label_column": "y"}}, "data.label_column"),
        ({"terms": [{"loss": "kd"}], "data": {"name": "chatterbot-corpus", "image_column": "img"}}, "data.image_column"),
        ({"terms": [{"loss": "kd"}], "student": {"name": "timm:resnet18", "config": {"depth": 2}}}, "student.config"),
        ({"terms": [{"loss": "kd"}], "teacher": {"name": "runs/t", "train_from": {"name": "timm:resnet18",
                                                                                   "tokenizer": "bert"}}},
         "teacher.train_from.tokenizer"),
        ({"terms": [{"loss": "kd"}], "student": {"name": "timm:resnet18", "dtype": "float64"}}, "student.dtype"),
        ({"terms": [{"loss": "kd"}], "student": {"name": " "}}, "student.name"),
    ],
)
def test_fields_that_do_not_apply_are_errors(data, path):
    assert error_of(data).path == path
