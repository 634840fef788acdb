"""Recipes with stages and `base:`: validation with field paths, merge semantics, cycles, overrides, round trips."""

import pytest
import yaml

from hfdistill import Recipe, RecipeError
from hfdistill.errors import OverrideError
from hfdistill.recipe import (
    DEFAULT_STAGE_NAME,
    StageSpec,
    load_recipe,
    load_recipe_data,
    merge_recipe_data,
)

HINT = {"loss": "fitnet", "weight": 1, "student": "layer2", "teacher": "layer2", "adapter": "conv_reg"}
KD = {"loss": "kd", "weight": 0.9}
TWO_STAGES = {
    "training": {"output_dir": "out", "num_train_epochs": 2, "learning_rate": 0.05},
    "stages": [
        {"name": "hint", "terms": [HINT], "task_weight": 0,
         "train": ["student.layer1", "student.layer2", "adapters"], "training": {"num_train_epochs": 1}},
        {"name": "distill", "terms": [KD], "task_weight": 0.1},
    ],
}


def error_of(data) -> RecipeError:
    with pytest.raises(RecipeError) as info:
        Recipe.from_dict(data)
    return info.value


def with_stage(index: int, **changes) -> dict:
    data = yaml.safe_load(yaml.safe_dump(TWO_STAGES))
    data["stages"][index].update(changes)
    return data


def write(folder, name: str, data) -> str:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return str(path)


# ------------------------------------------------------------------------------ stages
def test_two_stage_recipe_loads_and_round_trips(tmp_path):
    recipe = Recipe.from_dict(TWO_STAGES)
    assert [s.name for s in recipe.stage_list()] == ["hint", "distill"]
    hint, distill = recipe.stage_list()
    assert hint.terms[0].adapter == "conv_reg" and hint.task_weight == 0 and hint.train[-1] == "adapters"
    assert distill.train is None and distill.training == {}
    assert recipe.stage_training("hint") == {"output_dir": "out", "num_train_epochs": 1, "learning_rate": 0.05}
    assert recipe.stage_training(distill) == TWO_STAGES["training"]
    one = recipe.stage_recipe("hint")
    assert one.stages == [] and one.terms == hint.terms and one.task_weight == 0 and one.training["num_train_epochs"] == 1
    path = tmp_path / "r.yaml"
    recipe.save(path)
    assert Recipe.from_yaml(path) == recipe
    saved = yaml.safe_load(recipe.to_yaml())
    assert saved["stages"][1] == {"name": "distill", "terms": [KD], "task_weight": 0.1}  # defaults not written
    assert "terms" not in saved
    with pytest.raises(KeyError, match="did you mean 'hint'"):
        recipe.stage_recipe("hnt")


def test_one_stage_recipe_is_one_distill_stage():
    recipe = Recipe.from_dict({"terms": [KD], "task_weight": 0.1, "training": {"num_train_epochs": 3}})
    (stage,) = recipe.stage_list()
    assert stage == StageSpec(name=DEFAULT_STAGE_NAME, terms=recipe.terms, task_weight=0.1, train=None, training={})
    assert DEFAULT_STAGE_NAME == "distill"
    assert recipe.stage_training(stage) == {"num_train_epochs": 3}
    assert recipe.stage_recipe("distill") == recipe


def test_top_level_task_weight_is_the_default_of_stages():
    data = with_stage(1, task_weight=None)
    data["task_weight"] = 0.5
    recipe = Recipe.from_dict(data)
    assert [s.task_weight for s in recipe.stage_list()] == [0, 0.5]
    assert recipe.stages[1].task_weight is None  # the recipe itself is unchanged (saved as written)


@pytest.mark.parametrize(
    "data, path, fragment",
    [
        ({**TWO_STAGES, "terms": [KD]}, "stages", "either top-level `terms`"),
        (with_stage(1, name="hint"), "stages[1].name", "stages[0] is also named 'hint'"),
        (with_stage(0, name="hint stage"), "stages[0].name", "letters, digits"),
        (with_stage(0, name="../x"), "stages[0].name", "not a stage name"),
        (with_stage(0, name="hint\n"), "stages[0].name", "not a stage name"),
        ({"stages": [{"terms": [KD]}]}, "stages[0].name", "missing required field"),
        ({"stages": [{"name": "a", "term": [KD]}]}, "stages[0].term", "did you mean 'terms'"),
        ({"stages": {"name": "a"}}, "stages", "expected list of mapping"),
        (with_stage(1, terms=[{"loss": "kdd"}]), "stages[1].terms[0].loss", "did you mean 'kd'"),
        (with_stage(1, terms=[KD, {**KD, "name": "kd"}]), "stages[1].terms[1].name", "two terms are named 'kd'"),
        (with_stage(1, task_weight=-1), "stages[1].task_weight", "must be >= 0"),
        (with_stage(1, terms=[], task_weight=0), "stages[1]", "would train nothing"),
        (with_stage(0, train=[]), "stages[0].train", "is empty"),
        (with_stage(0, train=["student", "adapter"]), "stages[0].train[1]", "did you mean 'adapters'"),
        (with_stage(0, train=["studnet.layer1"]), "stages[0].train[0]", "did you mean 'student'"),
        (with_stage(0, train=["student.layer 1"]), "stages[0].train[0]", "not a module path"),
        (with_stage(0, train=["student", "losses.fitnit"]), "stages[0].train[1]", "did you mean 'fitnet'"),
        (with_stage(0, train=["losses.kd"]), "stages[0].train[0]", "no term named 'kd'"),
        (with_stage(0, train=["losses"]), "stages[0].train[0]", "name the term"),
        (with_stage(0, train=["losses.fitnet.a b"]), "stages[0].train[0]", "not a submodule path"),
        (with_stage(0, train=["adapters.fitnet.conv"]), "stages[0].train[0]", "an adapter trains whole"),
        (with_stage(1, train=["adapters.kd"]), "stages[1].train[0]", "term 'kd' has no adapter"),
        (with_stage(1, train=["student", "adapters"]), "stages[1].train[1]", "no term of this stage has an adapter"),
        (with_stage(0, train=["student", 3]), "stages[0].train[1]", "expected string"),
        (with_stage(0, training={"num_train_epoch": 1}), "stages[0].training.num_train_epoch",
         "did you mean 'num_train_epochs'"),
        (with_stage(1, training={"output_dir": "x"}), "stages[1].training.output_dir", "belongs to the whole run"),
        (with_stage(1, training={"resume_from_checkpoint": True}), "stages[1].training.resume_from_checkpoint",
         "belongs to the whole run"),
        ({"task_weight": 0}, "task_weight", "would train nothing"),
    ],
)
def test_stage_errors_name_the_field(data, path, fragment):
    error = error_of(data)
    assert error.path == path, str(error)
    assert fragment in str(error)


def test_train_entries_that_are_allowed():
    train = ["student", "student.layer1.0.conv1", "student.blocks.-1", "adapters", "adapters.fitnet",
             "losses.fitnet", "losses.fitnet.proj.0"]
    assert Recipe.from_dict(with_stage(0, train=train)).stages[0].train == train
    named = with_stage(1, terms=[{**KD, "name": "soft"}], train=["losses.soft"])
    assert Recipe.from_dict(named).stages[1].train == ["losses.soft"]


def test_same_term_name_in_two_stages_is_allowed():
    para = {"name": "ft", "loss": "mse", "student": "layer4", "teacher": "layer4"}
    recipe = Recipe.from_dict({"stages": [
        {"name": "paraphraser", "terms": [para], "task_weight": 0, "train": ["losses.ft"]},
        {"name": "transfer", "terms": [{**para, "weight": 2}]},
    ]})
    assert [s.terms[0].name for s in recipe.stage_list()] == ["ft", "ft"]


# ------------------------------------------------------------------------------ base:
def test_base_deep_merges(tmp_path):
    write(tmp_path, "shared/_root.yaml", {"task": "image-classification", "training": {"seed": 1, "logging_steps": 5}})
    write(tmp_path, "shared/_base.yaml", {
        "base": "_root.yaml",
        "student": {"name": "timm:resnet18", "kwargs": {"channels": [8, 16], "drop_rate": 0.1}},
        "terms": [KD, {"loss": "kd", "name": "second"}],
        "training": {"output_dir": "base", "learning_rate": 0.1, "lr_decay_epochs": [1, 2]},
    })
    path = write(tmp_path, "methods/m.yaml", {
        "base": "../shared/_base.yaml",
        "student": {"kwargs": {"channels": [4, 8], "drop_rate": None}},
        "terms": [{"loss": "kd", "weight": 0.5}],
        "training": {"output_dir": "m", "lr_decay_epochs": [3]},
    })
    data = load_recipe_data(path)
    assert "base" not in data
    assert data["student"] == {"name": "timm:resnet18", "kwargs": {"channels": [4, 8]}}  # null removes the key
    assert data["terms"] == [{"loss": "kd", "weight": 0.5}]  # lists replace
    assert data["training"] == {"seed": 1, "logging_steps": 5, "output_dir": "m", "learning_rate": 0.1,
                                "lr_decay_epochs": [3]}
    assert data["task"] == "image-classification"  # two levels down
    recipe = Recipe.from_yaml(path)
    assert recipe.to_dict() == Recipe.from_dict(data).to_dict()
    assert "base" not in recipe.to_yaml()  # the saved recipe stands alone
    saved = tmp_path / "elsewhere" / "saved.yaml"
    saved.parent.mkdir()
    recipe.save(saved)
    assert Recipe.from_yaml(saved) == recipe


def test_merge_recipe_data_leaves_its_inputs_alone():
    base = {"a": {"b": [1, 2], "c": 1}, "d": 1}
    over = {"a": {"b": [3], "e": {"f": 1}}, "d": None}
    assert merge_recipe_data(base, over) == {"a": {"b": [3], "c": 1, "e": {"f": 1}}}
    assert base == {"a": {"b": [1, 2], "c": 1}, "d": 1} and over == {"a": {"b": [3], "e": {"f": 1}}, "d": None}
    assert merge_recipe_data({"a": {"b": 1}}, {"a": 3}) == {"a": 3}  # a scalar replaces a mapping
    assert merge_recipe_data({"a": 3}, {"a": {"b": 1}}) == {"a": {"b": 1}}  # and the other way


def test_base_of_a_staged_recipe(tmp_path):
    write(tmp_path, "_base.yaml", {"task_weight": 1, "training": {"output_dir": "x", "num_train_epochs": 2}})
    path = write(tmp_path, "two.yaml", {"base": "_base.yaml", "stages": TWO_STAGES["stages"]})
    recipe = Recipe.from_yaml(path)
    assert [s.task_weight for s in recipe.stage_list()] == [0, 0.1]
    assert recipe.stage_training("hint")["num_train_epochs"] == 1
    assert recipe.stage_training("distill")["num_train_epochs"] == 2


@pytest.mark.parametrize(
    "files, fragment",
    [
        ({"r.yaml": {"base": "missing.yaml", "terms": [KD]}}, "{d}/r.yaml says `base: missing.yaml`, but {d}/missing.yaml does not exist"),
        ({"r.yaml": {"base": 3, "terms": [KD]}}, "expected the path of another recipe file"),
        ({"r.yaml": {"base": ["a.yaml"], "terms": [KD]}}, "got list"),
        ({"r.yaml": {"base": "", "terms": [KD]}}, "expected the path of another recipe file"),
        ({"r.yaml": {"base": "r.yaml", "terms": [KD]}}, "cycle: {d}/r.yaml -> {d}/r.yaml"),
        ({"r.yaml": {"base": "a.yaml"}, "a.yaml": {"base": "sub/b.yaml"}, "sub/b.yaml": {"base": "../a.yaml"}},
         "cycle: {d}/r.yaml -> {d}/a.yaml -> {d}/sub/b.yaml -> {d}/a.yaml"),
        ({"r.yaml": {"base": "a.yaml"}, "a.yaml": "terms: [\n"}, "a.yaml (the base of {d}/r.yaml) is not valid YAML"),
        ({"r.yaml": {"base": "a.yaml"}, "a.yaml": ""}, "a.yaml (the base of {d}/r.yaml) is empty"),
        ({"r.yaml": {"base": "a.yaml"}, "a.yaml": "- 1\n"}, "holds a list, not a mapping"),
        ({"r.yaml": {"base": "a.yaml"}, "a.yaml": "x: !!python/object/apply:os.system ['echo hi']\n"},
         "not valid YAML"),  # still safe_load only
    ],
)
def test_base_errors(tmp_path, files, fragment):
    for name, data in files.items():
        write(tmp_path, name, data)
    with pytest.raises(RecipeError) as info:
        Recipe.from_yaml(tmp_path / "r.yaml")
    assert info.value.path == "base"
    assert fragment.format(d=tmp_path) in str(info.value)


def test_base_in_plain_data_is_an_error():
    error = error_of({"base": "other.yaml", "terms": [KD]})
    assert error.path == "base" and "relative to a recipe file" in str(error)


def test_errors_after_merging_name_the_field(tmp_path):
    write(tmp_path, "_base.yaml", {"terms": [{"loss": "kd", "weight": 1}]})
    path = write(tmp_path, "r.yaml", {"base": "_base.yaml", "terms": [{"loss": "kd", "wieght": 1}]})
    with pytest.raises(RecipeError) as info:
        Recipe.from_yaml(path)
    assert info.value.path == "terms[0].wieght"


# ------------------------------------------------------------------------------ overrides with base and stages
def test_overrides_apply_to_the_merged_data(tmp_path):
    write(tmp_path, "_base.yaml", {"training": {"output_dir": "x", "num_train_epochs": 2, "learning_rate": 0.1}})
    path = write(tmp_path, "r.yaml", {"base": "_base.yaml", "stages": TWO_STAGES["stages"]})
    recipe = load_recipe(path, ["--stages.1.training.num_train_epochs", "1", "--stages.0.terms.0.weight", "2",
                                "--training.learning_rate", "0.2", "--stages.1.task_weight", "0.3"])
    assert recipe.stage_training("distill") == {"output_dir": "x", "num_train_epochs": 1, "learning_rate": 0.2}
    assert recipe.stages[0].terms[0].weight == 2 and recipe.stages[1].task_weight == 0.3
    assert recipe.stage_training("hint")["num_train_epochs"] == 1
    with pytest.raises(OverrideError) as info:
        load_recipe(path, ["--stages.2.task_weight", "1"])
    assert info.value.path == "stages.2" and "2 item(s)" in str(info.value)
    with pytest.raises(OverrideError) as info:
        load_recipe(path, ["--stages.0.training.output_dir", "y"])
    assert info.value.path == "stages[0].training.output_dir"
    with pytest.raises(OverrideError) as info:
        load_recipe(path, ["--stages.0.train.1", "studnet"])
    assert info.value.path == "stages[0].train[1]"
