"""The model card: metadata the Hub accepts, a body that says how the student was made; sizes and their formats
(shared with the summary table); writing a result folder; card and Hub code that do not import each other."""

import ast
import json
from pathlib import Path

import pytest
from hub_server import validate_card_metadata
from huggingface_hub import ModelCard

from hfdistill import Recipe
from hfdistill.card import (
    build_model_card,
    metrics_from_log_history,
    refresh_card,
    split_metrics,
    summary_from_folder,
    write_model_card,
)

RECIPE = {
    "terms": [
        {"loss": "kd", "weight": 0.5, "params": {"temperature": 4}},
        {"loss": "at", "weight": 100.0, "student": ["layer2", "layer3"], "teacher": ["layer2", "layer3"]},
    ],
    "task_weight": 0.5,
}


def full_card(**overrides):
    values = dict(
        model_id="user/resnet18-from-resnet50",
        recipe=Recipe.from_dict(RECIPE),
        student_id="timm:resnet18",
        teacher_id="hf-hub:timm/resnet50.a1_in1k",
        pipeline_tag="image-classification",
        library_name="timm",
        dataset="uoft-cs/cifar10",
        license="apache-2.0",
        label_names=["cat", "dog"],
        student_metrics={"eval_accuracy": 0.91, "eval_loss": 0.3, "eval_runtime": 1.2, "eval_teacher_accuracy": 0.95},
        student_params=11_000_000,
        teacher_params=25_000_000,
        student_size_bytes=44_000_000,
        teacher_size_bytes=100_000_000,
        student_latency_ms=2.0,
        teacher_latency_ms=6.0,
        latency_setup="on 1 CPU core, batch 1",
        command="hfdistill train recipes/cifar10.yaml --training.push_to_hub true",
    )
    values.update(overrides)
    return build_model_card(**values)


def test_metadata_round_trips_and_the_hub_accepts_it():
    card = full_card()
    text = str(card)
    data = ModelCard(text).data  # parses back through ModelCardData
    assert data.library_name == "timm"
    assert data.pipeline_tag == "image-classification"
    assert data.license == "apache-2.0"
    assert data.datasets == ["uoft-cs/cifar10"]
    assert data.base_model == "timm/resnet50.a1_in1k"  # the teacher: the student was not pretrained
    assert {"hfdistill", "knowledge-distillation", "arxiv:1503.02531", "arxiv:1612.03928"} <= set(data.tags)
    (result,) = data.eval_results
    assert (result.task_type, result.metric_type, result.metric_value) == ("image-classification", "accuracy", 0.91)
    assert validate_card_metadata(text) == []


def test_body_names_models_terms_papers_compression_metrics_and_usage():
    text = full_card().text
    assert "[hf-hub:timm/resnet50.a1_in1k](https://huggingface.co/timm/resnet50.a1_in1k)" in text
    assert "`timm:resnet18`" in text
    assert "`0.5 * task loss + 0.5 * kd + 100 * at`" in text
    assert "[arXiv:1503.02531](https://arxiv.org/abs/1503.02531)" in text  # Hinton et al., from the registry
    assert "| `at` | `at` | 100 | `layer2`, `layer3` |" in text
    assert "| Parameters | 25.00M | 11.00M | 2.3x fewer |" in text
    assert "| Latency | 6.00 ms | 2.00 ms | 3.0x faster |" in text and "on 1 CPU core, batch 1" in text
    assert "| accuracy | 0.9500 | 0.9100 |" in text
    assert "runtime" not in text.split("## Results")[1].split("##")[0]
    assert 'pipeline("image-classification", model="user/resnet18-from-resnet50")' in text
    assert 'timm.create_model("hf-hub:user/resnet18-from-resnet50", pretrained=True)' in text
    assert "hfdistill train recipes/cifar10.yaml --training.push_to_hub true" in text


def test_card_lists_the_stages_of_a_staged_recipe():
    staged = Recipe.from_dict({"stages": [
        {"name": "hint", "task_weight": 0, "train": ["student.layer1", "adapters"],
         "terms": [{"loss": "fitnet", "weight": 100, "student": "layer1", "teacher": "layer1", "adapter": "conv_reg"}]},
        {"name": "distill", "task_weight": 0.1, "terms": [{"loss": "kd", "weight": 0.9}]},
    ]})
    card = full_card(recipe=staged)
    text = card.text
    assert "`stage hint: 100 * fitnet (trains student.layer1, adapters); then stage distill: 0.1 * task loss + 0.9 * kd`" in text
    assert "| `hint` | `fitnet` | `fitnet` | 100 | `layer1` |" in text and "| `distill` | `kd` | `kd` | 0.9 |" in text
    assert {"arxiv:1412.6550", "arxiv:1503.02531"} <= set(ModelCard(str(card)).data.tags)


def test_minimal_card_without_teacher_or_metrics():
    card = build_model_card(model_id="student", pipeline_tag="text-classification")
    data = ModelCard(str(card)).data
    assert data.get("model-index") is None and data.license is None
    assert "no distillation terms" in card.text
    assert 'pipeline("text-classification", model="student")' in card.text
    assert validate_card_metadata(str(card)) == []


def test_pretrained_student_is_the_base_model_and_non_hub_datasets_stay_out_of_datasets():
    card = full_card(student_id="google/bert_uncased_L-2_H-128_A-2", student_pretrained=True, dataset="sklearn-digits")
    data = ModelCard(str(card)).data
    assert data.base_model == "google/bert_uncased_L-2_H-128_A-2"
    assert data.datasets is None
    assert data.eval_results[0].dataset_name == "sklearn-digits"


def test_split_metrics_and_log_history():
    student, teacher = split_metrics(
        {"eval_accuracy": 0.5, "eval_teacher_accuracy": 0.9, "eval_runtime": 3.0, "epoch": 1.0, "f1": 0.4}
    )
    assert student == {"accuracy": 0.5, "f1": 0.4} and teacher == {"accuracy": 0.9}
    history = [
        {"loss": 2.0, "step": 1},
        {"eval_loss": 1.0, "eval_accuracy": 0.4, "epoch": 1.0, "step": 2},
        {"eval_teacher_loss": 0.5, "eval_teacher_accuracy": 0.8, "epoch": 1.0, "step": 2},
        {"eval_loss": 0.9, "eval_accuracy": 0.6, "epoch": 2.0, "step": 4},
        {"train_runtime": 3.0, "train_loss": 1.5, "epoch": 2.0, "step": 4},
    ]
    train, student, teacher = metrics_from_log_history(history)
    assert train["train_loss"] == 1.5 and student["eval_accuracy"] == 0.6 and teacher["eval_teacher_accuracy"] == 0.8


def test_write_then_refresh_for_another_repo(tmp_path):
    path = write_model_card(tmp_path, model_id="user/a", recipe=RECIPE, pipeline_tag="image-classification")
    assert path == tmp_path / "README.md"
    summary = json.loads((tmp_path / "distill_results.json").read_text())
    assert summary["model_id"] == "user/a" and "recipe" not in summary
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["ResNetForImageClassification"]}))
    refresh_card(tmp_path, "user/a")
    assert 'model="user/a"' in path.read_text()
    refresh_card(tmp_path, "org/b")  # an hfdistill card made for another repo is re-rendered
    assert 'model="org/b"' in path.read_text() and 'model="user/a"' not in path.read_text()
    path.write_text("---\nlicense: mit\n---\n# my own card\n")
    refresh_card(tmp_path, "org/c")  # a hand-written card is the user's
    assert path.read_text().endswith("# my own card\n")


def test_card_from_a_saved_student_folder(tmp_path):
    torch = pytest.importorskip("torch")
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=32, num_labels=2, id2label={0: "neg", 1: "pos"}, label2id={"neg": 0, "pos": 1},
    ))
    model.save_pretrained(tmp_path)
    (tmp_path / "all_results.json").write_text(json.dumps({"eval_accuracy": 0.75, "train_loss": 0.1}))
    summary = summary_from_folder(tmp_path)
    assert summary["pipeline_tag"] == "text-classification" and summary["library_name"] == "transformers"
    assert summary["label_names"] == ["neg", "pos"]
    assert summary["student_params"] == sum(p.numel() for p in model.parameters())
    refresh_card(tmp_path, "user/tiny-bert")
    data = ModelCard.load(tmp_path / "README.md").data
    assert data.pipeline_tag == "text-classification" and data.eval_results[0].metric_value == 0.75


# ----------------------------------------------------------------------------- sizes, formats, result folders
def test_counts_and_bytes_are_formatted_once_for_card_and_summary():
    from hfdistill.summary import ModelRow, format_bytes, format_count, format_summary

    assert [format_count(n) for n in (None, 999, 101_770, 11_180_000, 1_500_000_000)] == ["-", "999", "101.77k", "11.18M", "1.50B"]
    assert [format_bytes(n) for n in (None, 512, 430_410, 44_780_000, 2_000_000_000)] == ["-", "512 B", "430.41 kB", "44.78 MB", "2.00 GB"]
    table = format_summary([ModelRow("teacher", "t", 25_000_000, 100_000_000), ModelRow("student", "s", 101_770, 430_410)])
    assert "25.00M" in table and "100.00 MB" in table and "101.77k" in table and "430.41 kB" in table
    text = full_card(student_params=101_770, student_size_bytes=430_410).text
    assert "| Parameters | 25.00M | 101.77k | 245.7x fewer |" in text
    assert "| Weights size | 100.00 MB | 430.41 kB | 232.3x smaller |" in text


def test_model_and_folder_sizes_agree(tmp_path):
    import timm
    import torch

    from hfdistill.models import wrap_timm_model
    from hfdistill.summary import count_parameters, folder_stats, model_stats, size_on_disk

    torch.manual_seed(0)
    model = timm.create_model("test_resnet", pretrained=False, num_classes=3)  # batch norm: buffers that are not parameters
    params, size = model_stats(model)
    assert params == sum(p.numel() for p in model.parameters()) == count_parameters(model)
    assert size == sum(t.numel() * t.element_size() for t in model.state_dict().values())
    wrap_timm_model(model).save_pretrained(tmp_path)
    (tmp_path / "training_args.bin").write_bytes(b"x" * 5000)  # not a weight file
    folder_params, folder_bytes = folder_stats(tmp_path)
    assert folder_params == params  # read from the safetensors header, batch-norm statistics left out
    assert folder_bytes == (tmp_path / "model.safetensors").stat().st_size == size_on_disk(model, tmp_path)
    assert size_on_disk(model, tmp_path / "nothing-here") == size and folder_stats(tmp_path / "nothing-here") == (None, None)
    # A tied weight is counted once.
    tied = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 10, bias=False))
    tied[1].weight = tied[0].weight
    assert model_stats(tied) == (40, 160)


def test_write_result_writes_recipe_metrics_and_card(tmp_path):
    from hfdistill.publish import write_result

    recipe = Recipe.from_dict({**RECIPE, "training": {"hub_token": "hf_secret", "learning_rate": 0.1}})
    path = write_result(tmp_path, {"model_id": "user/a", "recipe": recipe, "pipeline_tag": "image-classification"},
                        metrics={"eval_accuracy": 0.5})
    assert path == tmp_path / "README.md" and 'model="user/a"' in path.read_text()
    assert {p.name for p in tmp_path.iterdir()} == {"README.md", "distill_recipe.yaml", "distill_results.json",
                                                    "all_results.json"}
    assert "hf_secret" not in (tmp_path / "distill_recipe.yaml").read_text()
    assert json.loads((tmp_path / "all_results.json").read_text()) == {"eval_accuracy": 0.5}
    write_result(tmp_path, {"model_id": "user/a"}, metrics={"eval_accuracy": 0.9})  # an existing all_results.json stays
    assert json.loads((tmp_path / "all_results.json").read_text()) == {"eval_accuracy": 0.5}


def _hfdistill_imports(module: str) -> set[str]:
    """The hfdistill modules a module imports, at the top or inside functions."""
    source = Path(__file__).resolve().parents[1] / "hfdistill" / f"{module}.py"
    found = set()
    for node in ast.walk(ast.parse(source.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            found |= {node.module} if node.module else {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("hfdistill"):
            found.add(node.module.split(".")[1] if "." in node.module else node.module)
    return {name.split(".")[0] for name in found}


def test_card_and_hub_do_not_import_each_other():
    assert _hfdistill_imports("outputs") == set()  # the leaf every module may use
    assert not {"hub", "publish"} & _hfdistill_imports("card")
    # publish only inside hub's module __getattr__ (old names, re-exported lazily): never at import time.
    assert _hfdistill_imports("hub") <= {"errors", "outputs", "publish"}
    assert not {"card", "hub", "publish"} & _hfdistill_imports("summary")
    assert {"card", "hub"} <= _hfdistill_imports("publish")


# ----------------------------------------------------------------------------- the baseline, the seeds, the pictures
def _comparison(gains_alone_distilled=None, seeds=(42, 43, 44, 45, 46)):
    from hfdistill.summary import SeedComparison

    alone, distilled = gains_alone_distilled or ([0.9599, 0.9555, 0.9677, 0.9566, 0.9499],
                                                 [0.9733, 0.9733, 0.9699, 0.9566, 0.9599])
    return SeedComparison("accuracy", list(seeds), list(alone), list(distilled))


def test_seed_comparison_says_what_the_gain_was_worth_and_keeps_the_summary_line():
    from hfdistill.summary import SeedComparison

    quickstart = _comparison()
    assert [round(g, 2) for g in quickstart.gains] == [1.34, 1.78, 0.22, 0.0, 1.0]
    assert quickstart.lines() == [  # the summary's line, as the README shows it
        "over 5 seeds (42, 43, 44, 45, 46): no teacher 0.9579 +- 0.0065, distilled 0.9666 +- 0.0078; distillation "
        "vs. no teacher +0.87 +- 0.75 accuracy points (per seed: +1.34, +1.78, +0.22, +0.00, +1.00)"]
    assert quickstart.sentence == ("+0.87 ± 0.75 accuracy points over the same student trained alone, 5 seeds "
                                   "(better on 4 of 5); larger than its spread over seeds")
    noisy = _comparison(([0.90, 0.91, 0.92], [0.92, 0.90, 0.925]), seeds=(1, 2, 3))
    assert noisy.sentence.endswith("3 seeds (better on 2 of 3); within noise (not larger than its spread over seeds)")
    worse = _comparison(([0.90, 0.91, 0.92], [0.85, 0.87, 0.86]), seeds=(1, 2, 3))
    assert worse.sentence.startswith("-5.00 ±") and worse.verdict == "a loss larger than its spread over seeds"
    one = _comparison(([0.90], [0.92]), seeds=(7,))
    assert one.lines() == ["distillation vs. no teacher: +2.00 accuracy points"]
    assert one.sentence == ("+2.00 accuracy points over the same student trained alone, 1 seed; one seed: too few "
                            "to tell the gain from seed-to-seed noise")
    assert SeedComparison.from_dict(json.loads(json.dumps(quickstart.to_dict()))) == quickstart


def test_card_shows_the_baseline_labelled_the_seeds_and_the_gain_and_the_index_holds_the_student_only():
    comparison = _comparison(([0.90, 0.91, 0.92], [0.91, 0.90, 0.93]), seeds=(42, 43, 44))
    card = full_card(baseline_metrics={"eval_accuracy": 0.90, "eval_loss": 0.4, "eval_runtime": 2.0},
                     comparison=comparison.to_dict())
    text = card.text
    results = text.split("## Results")[1].split("\n## ")[0]
    assert "| Metric | Teacher | Student alone (baseline, no teacher) | Distilled student |" in results
    assert "| accuracy | 0.9500 | 0.9000 | 0.9100 |" in results and "| loss | - | 0.4000 | 0.3000 |" in results
    assert "*Student alone (baseline)* is not this model" in results and "`student.baseline`" in results
    assert ("**What distillation was worth:** +0.33 ± 1.15 accuracy points over the same student trained alone, "
            "3 seeds (better on 2 of 3); within noise") in results
    assert "| 42 (this model) | 0.9000 | 0.9100 | +1.00 |" in results and "| 44 | 0.9200 | 0.9300 | +1.00 |" in results
    assert "| mean ± std | 0.9100 ± 0.0100 | 0.9133 ± 0.0153 | +0.33 ± 1.15 |" in results
    data = ModelCard(str(card)).data  # the model-index: the distilled student's metrics, nothing else
    assert [(r.metric_type, r.metric_value) for r in data.eval_results] == [("accuracy", 0.91)]
    assert validate_card_metadata(str(card)) == []
    # One seed: no seeds table, and the sentence says one seed cannot tell.
    one = full_card(baseline_metrics={"eval_accuracy": 0.90}, comparison=_comparison(([0.90], [0.91]), (42,)).to_dict())
    assert "| 42 (this model)" not in one.text and "1 seed; one seed: too few" in one.text
    assert "Student alone (baseline" not in full_card().text  # no baseline: the card as before


def test_card_embeds_the_pictures_with_relative_links_or_says_why_there_are_none(tmp_path):
    from hfdistill.plots import LOSS_CURVES_NAME, MISSING_NOTE, TRADEOFF_NAME

    plots = [{"kind": "losses", "path": LOSS_CURVES_NAME, "alt": "Training loss per term", "caption": "Losses."},
             {"kind": "tradeoff", "path": TRADEOFF_NAME, "alt": "accuracy against parameters", "caption": "Size."}]
    text = full_card(plots=plots).text
    distilled, results = text.split("## How it was distilled")[1].split("## Results")
    assert f"![Training loss per term]({LOSS_CURVES_NAME})" in distilled  # with the recipe
    assert f"![accuracy against parameters]({TRADEOFF_NAME})" in results.split("## How to use")[0]
    assert MISSING_NOTE not in text
    assert MISSING_NOTE in full_card(plots_note=MISSING_NOTE).text and "![" not in full_card(plots_note=MISSING_NOTE).text
    # distill_results.json keeps them: a card re-rendered for another repo (hfdistill push) still shows them.
    write_model_card(tmp_path, model_id="user/a", recipe=RECIPE, pipeline_tag="image-classification",
                     student_metrics={"eval_accuracy": 0.91}, baseline_metrics={"eval_accuracy": 0.9},
                     comparison=_comparison().to_dict(), plots=plots)
    refresh_card(tmp_path, "org/b")
    again = (tmp_path / "README.md").read_text()
    assert 'model="org/b"' in again and f"({TRADEOFF_NAME})" in again and "5 seeds (better on 4 of 5)" in again


def test_the_final_comparison_is_never_read_as_the_students_evaluation():
    history = [{"eval_accuracy": 0.6, "eval_loss": 1.0, "step": 4},
               {"eval_comparison_gain_points": 1.5, "eval_comparison_alone_accuracy": 0.5, "step": 4}]
    assert metrics_from_log_history(history)[1] == {"eval_accuracy": 0.6, "eval_loss": 1.0}


# ----------------------------------------------------------------------------- a run with a baseline, end to end
def _png_size(path) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as image:
        assert image.format == "PNG"
        return image.size


def test_run_with_a_baseline_writes_the_pictures_and_a_card_with_both_students(tmp_path):
    pytest.importorskip("matplotlib")
    import hfdistill
    from hfdistill.plots import LOSS_CURVES_NAME, TRADEOFF_NAME
    from test_cli import tiny_recipe

    recipe = tiny_recipe(tmp_path, student__baseline=True, student__baseline_seeds=2)
    result = hfdistill.run(Recipe.from_dict(recipe), print_summary=False)
    folder = Path(result.output_dir)
    for name in (LOSS_CURVES_NAME, TRADEOFF_NAME):
        width, height = _png_size(folder / name)
        assert 1000 <= width <= 1600 and height >= 400, name  # shown at the Hub's ~800 px, sharp on dense screens
    text = (folder / "README.md").read_text()
    assert f"]({LOSS_CURVES_NAME})" in text and f"]({TRADEOFF_NAME})" in text
    assert "| Metric | Teacher | Student alone (baseline, no teacher) | Distilled student |" in text
    assert "| 42 (this model) |" in text and "| 43 |" in text and "2 seeds (better on" in text
    saved = json.loads((folder / "distill_results.json").read_text())
    assert saved["comparison"]["seeds"] == [42, 43] and saved["plots"][0]["path"] == LOSS_CURVES_NAME
    # One computation: the summary's seeds line is the card's comparison.
    from hfdistill.summary import SeedComparison

    assert SeedComparison.from_dict(saved["comparison"]).lines()[0] in result.summary
    baseline = result.jobs[-2]
    assert baseline.comparison == "no teacher" and not baseline.extra_seed
    assert saved["baseline_metrics"]["eval_accuracy"] == baseline.metrics["eval_accuracy"]
    data = ModelCard.load(folder / "README.md").data
    assert [r.metric_value for r in data.eval_results if r.metric_type == "accuracy"] == \
        [round(result.metrics["eval_accuracy"], 6)]


def test_run_without_matplotlib_draws_nothing_and_says_so(tmp_path, monkeypatch):
    import sys

    import hfdistill
    from hfdistill.plots import MISSING_NOTE, PLOTS_DIR
    from test_cli import tiny_recipe

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now fails, as when not installed
    recipe = tiny_recipe(tmp_path, student__baseline=True)
    result = hfdistill.run(Recipe.from_dict(recipe), print_summary=False)
    folder = Path(result.output_dir)
    assert not (folder / PLOTS_DIR).exists()
    text = (folder / "README.md").read_text()
    assert text.count(MISSING_NOTE) == 1 and "![" not in text
    assert "Student alone (baseline, no teacher)" in text and "1 seed; one seed: too few" in text


def test_seed_comparison_of_a_lower_is_better_metric_counts_the_reduction():
    """Perplexity: the gain is the reduction (positive when the teacher helped), in the metric's own unit."""
    from hfdistill.summary import SeedComparison

    seeds = SeedComparison("perplexity", [1, 2, 3], alone=[12.0, 13.0, 12.5], distilled=[10.0, 11.5, 12.6],
                           greater_is_better=False)
    assert seeds.gains == pytest.approx([2.0, 1.5, -0.1])
    assert seeds.unit == "perplexity reduction"
    assert seeds.sentence.startswith("+1.13 ± 1.10 perplexity reduction over the same student trained alone, "
                                     "3 seeds (better on 2 of 3)")
    assert "within noise" not in seeds.sentence and "larger than its spread" in seeds.sentence
    again = SeedComparison.from_dict(seeds.to_dict())
    assert again.greater_is_better is False and again.gains == seeds.gains
    accuracy = SeedComparison("accuracy", [1], alone=[0.9], distilled=[0.91])
    assert accuracy.lines() == ["distillation vs. no teacher: +1.00 accuracy points"]
