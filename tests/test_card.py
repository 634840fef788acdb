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
