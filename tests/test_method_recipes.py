"""Every recipe under recipes/ validates, and every CNN method has a Fashion-MNIST recipe (no training)."""

import importlib.util
from pathlib import Path

import pytest

from hfdistill import Recipe, losses

ROOT = Path(__file__).resolve().parent.parent
RECIPES = sorted((ROOT / "recipes").rglob("*.yaml"))
FASHION = ROOT / "recipes" / "fashion_mnist"
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


def test_every_cnn_method_has_a_fashion_mnist_recipe():
    bench = _benchmark()
    used = set()
    for path in FASHION.glob("*.yaml"):
        used |= {losses.get_info(term.loss).cls for term in Recipe.from_yaml(path).terms}
    cnn_methods = [name for name in losses.available() if name not in bench.TRANSFORMER_ONLY]
    missing = [name for name in cnn_methods if losses.get_info(name).cls not in used]
    assert not missing, f"registered CNN methods without a recipe in {FASHION.relative_to(ROOT)}: {missing}"
    # Every registered name is either benchmarked, an alias of a benchmarked method, or transformer-only.
    specs = bench.methods(2)
    benchmarked = {term["loss"] for spec in specs.values() for term in spec["terms"]}
    unaccounted = set(losses.available()) - benchmarked - set(bench.ALIASES) - set(bench.TRANSFORMER_ONLY)
    assert not unaccounted, f"registered losses the benchmark neither runs nor lists: {sorted(unaccounted)}"


def test_fashion_mnist_recipes_match_the_benchmark():
    """recipes/fashion_mnist/<method>.yaml trains what the benchmark's row <method> trains."""
    bench = _benchmark()
    specs = bench.methods(2)  # the recipes' schedule: 2 epochs (warm-ups scale with it)
    assert {p.stem for p in FASHION.glob("*.yaml")} == set(specs)
    for method, spec in specs.items():
        recipe = Recipe.from_yaml(FASHION / f"{method}.yaml")
        expected = Recipe.from_dict({"terms": spec["terms"], "task_weight": spec["task_weight"]})
        assert [t.__dict__ for t in recipe.terms] == [t.__dict__ for t in expected.terms], method
        assert recipe.task_weight == expected.task_weight, method
        assert recipe.data.name == "fashion-mnist" and recipe.data.image_size == bench.IMAGE_SIZE
        assert recipe.student.kwargs == bench.STUDENT_KWARGS
        assert recipe.training["num_train_epochs"] == 2 and recipe.training["seed"] == bench.FIRST_SEED
        defaults = bench.parse_args([])
        assert recipe.data.max_train_samples == defaults.train_samples
        assert recipe.training["learning_rate"] == defaults.lr
        assert recipe.training["max_grad_norm"] == defaults.max_grad_norm
        if spec["terms"]:
            kind = spec.get("teacher", "teacher")
            folder = "runs/fashion_mnist/teacher" if kind == "teacher" else "runs/fashion_mnist/self_teacher"
            assert recipe.teacher.name == folder, method
            assert recipe.teacher.train_from.kwargs == (bench.TEACHER_KWARGS if kind == "teacher" else bench.STUDENT_KWARGS)
            if kind == "teacher":
                assert recipe.teacher.train_args["num_train_epochs"] == defaults.teacher_epochs
                assert recipe.teacher.train_args["max_grad_norm"] == defaults.teacher_max_grad_norm
        else:
            assert recipe.teacher is None


def test_cifar100_method_recipes_share_one_teacher_and_the_reference_schedule():
    for path in sorted((ROOT / "recipes" / "cifar100").glob("*.yaml")):
        recipe = Recipe.from_yaml(path)
        assert recipe.terms, path
        assert recipe.training["num_train_epochs"] == 240 and recipe.training["learning_rate"] == 0.05
        assert recipe.training["per_device_train_batch_size"] == 64 and recipe.training["weight_decay"] == 5e-4
        assert recipe.training["lr_decay_epochs"] == [150, 180, 210] and recipe.training["lr_decay_rate"] == 0.1
        assert recipe.teacher.name in ("runs/cifar100/resnet32x4", "runs/cifar100/resnet8x4"), path
        for term in recipe.terms:  # warm-ups in epochs are the papers' 20 of 240
            for key in ("warmup", "warmup_epochs"):
                if key in term.params:
                    assert term.params[key] == 20.0, path
