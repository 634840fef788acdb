"""Every recipe under recipes/ validates, and every CNN method has a Fashion-MNIST recipe (no training).

Files whose name starts with `_` (`_base.yaml`) are shared bases that method recipes name with `base:`; they
are not methods, so the method checks skip them.
"""

import importlib.util
from pathlib import Path

import pytest
import yaml

from hfdistill import Recipe, losses

ROOT = Path(__file__).resolve().parent.parent
ALL_FILES = sorted((ROOT / "recipes").rglob("*.yaml"))
RECIPES = [p for p in ALL_FILES if not p.name.startswith("_")]
BASES = [p for p in ALL_FILES if p.name.startswith("_")]
FASHION = ROOT / "recipes" / "fashion_mnist"


def method_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("*.yaml") if not p.name.startswith("_"))


def all_terms(recipe: Recipe) -> list:
    return [term for stage in recipe.stage_list() for term in stage.terms]
BENCHMARK = ROOT / "benchmarks" / "methods_fashion_mnist.py"


def _benchmark():
    spec = importlib.util.spec_from_file_location("methods_fashion_mnist", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("path", RECIPES, ids=[str(p.relative_to(ROOT)) for p in RECIPES])
def test_recipe_validates(path):
    recipe = Recipe.from_yaml(path)
    # Plain data both ways (contract 2): what it saves reloads to the same recipe.
    assert Recipe.from_dict(recipe.to_dict()) == recipe
    assert "base" not in recipe.to_dict()  # a saved recipe stands alone


def test_every_base_file_is_used():
    """A `_base.yaml` is named by at least one recipe of its folder (or it is dead weight)."""
    for base in BASES:
        users = [p for p in RECIPES if (yaml.safe_load(p.read_text()) or {}).get("base")
                 and (p.parent / yaml.safe_load(p.read_text())["base"]).resolve() == base.resolve()]
        assert users, f"{base.relative_to(ROOT)} is no recipe's base"


def test_every_cnn_method_has_a_fashion_mnist_recipe():
    bench = _benchmark()
    used = set()
    for path in method_files(FASHION):
        used |= {losses.get_info(term.loss).cls for term in all_terms(Recipe.from_yaml(path))}
    cnn_methods = [name for name in losses.available() if name not in bench.NO_ROW]
    missing = [name for name in cnn_methods if losses.get_info(name).cls not in used]
    assert not missing, f"registered CNN methods without a recipe in {FASHION.relative_to(ROOT)}: {missing}"
    # Every registered name is either benchmarked, an alias of a benchmarked method, or has no row (and why).
    specs = bench.methods(2)
    benchmarked = {term["loss"] for spec in specs.values() for term in spec["terms"]}
    unaccounted = set(losses.available()) - benchmarked - set(bench.ALIASES) - set(bench.NO_ROW)
    assert not unaccounted, f"registered losses the benchmark neither runs nor lists: {sorted(unaccounted)}"


def test_fashion_mnist_recipes_are_the_benchmark_rows():
    """The methods benchmark runs recipes/fashion_mnist/<method>.yaml through the run API: one row per recipe,
    each with the shared pair, data and schedule of _base.yaml and its own output folder and teacher."""
    bench = _benchmark()
    recipes = {p.stem: Recipe.from_yaml(p) for p in method_files(FASHION)}
    assert list(bench.recipe_files()) == [m for m in bench.ORDER if m in recipes] + sorted(set(recipes) - set(bench.ORDER))
    specs = bench.methods()
    for method, recipe in recipes.items():
        spec = specs[method]
        assert spec["terms"] == [t for stage in recipe.to_dict().get("stages", [recipe.to_dict()]) for t in stage.get("terms", [])]
        assert recipe.data.name == "fashion-mnist" and recipe.data.image_size == bench.IMAGE_SIZE
        assert recipe.student.kwargs == bench.STUDENT_KWARGS
        assert recipe.training["num_train_epochs"] == 2 and recipe.training["seed"] == bench.FIRST_SEED
        assert recipe.training["output_dir"] == f"runs/fashion_mnist/{method}"
        if all_terms(recipe) and all(losses.needs_teacher(t.loss, t.params) for t in all_terms(recipe)):
            kind = bench.teacher_kind(recipe)
            assert kind in ("teacher", "self_teacher"), method
            assert recipe.teacher.train_from.kwargs == (bench.TEACHER_KWARGS if kind == "teacher" else bench.STUDENT_KWARGS)
        elif not all_terms(recipe):
            assert recipe.teacher is None


def test_cifar100_method_recipes_share_one_teacher_and_the_reference_schedule():
    for path in method_files(ROOT / "recipes" / "cifar100"):
        recipe = Recipe.from_yaml(path)
        assert all_terms(recipe), path
        assert recipe.training["num_train_epochs"] == 240 and recipe.training["learning_rate"] == 0.05
        assert recipe.training["per_device_train_batch_size"] == 64 and recipe.training["weight_decay"] == 5e-4
        assert recipe.training["lr_decay_epochs"] == [150, 180, 210] and recipe.training["lr_decay_rate"] == 0.1
        if all(losses.needs_teacher(t.loss, t.params) for t in all_terms(recipe)):
            assert recipe.teacher.name in ("runs/cifar100/resnet32x4", "runs/cifar100/resnet8x4"), path
        else:  # teacher-free methods (DML's peers, Tf-KD's virtual teacher) need none
            assert recipe.teacher is None or recipe.teacher.name.startswith("runs/cifar100/"), path
        for term in all_terms(recipe):  # warm-ups in epochs are the papers' 20 of 240
            for key in ("warmup", "warmup_epochs"):
                if key in term.params:
                    assert term.params[key] == 20.0, path
