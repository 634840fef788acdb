"""`hfdistill suggest`: tap pairs for a teacher and a student from a dry run, and a `terms:` block that trains as printed.

Every model is built offline without pretrained weights: timm architectures by name, transformers models from
small configs saved to folders. Each printed block is pasted under task/teacher/student/data keys, loaded by the
recipe loader and turned into a DistillationTrainer by the run's own plan (`plan_run` + `build_trainer`).
"""

import math

import pytest
import torch
import yaml
from tests_helpers import tiny_tokenizer

from hfdistill import DistillationTrainer
from hfdistill.cli import main
from hfdistill.errors import BadInputError, DistillationError, RecipeError
from hfdistill.recipe import load_recipe, load_yaml
from hfdistill.run import build_trainer, check, plan_run
from hfdistill.suggest import feature_methods, proportional_pairs, suggest

DIGITS = {"name": "sklearn-digits", "image_size": 32, "max_train_samples": 64, "max_eval_samples": 32}
WORDS = ["good", "bad", "great", "awful", "movie", "film", "plot", "actor", "a", "short", "example", "sentence",
         "for", "the", "dry", "run", "of", "both", "models"]


# ------------------------------------------------------------------------------------------ helpers
def printed_block(output: str) -> str:
    """The `terms:` block as the CLI printed it: from its `terms:` line to the end."""
    lines = output.splitlines()
    return "\n".join(lines[lines.index("terms:"):]) + "\n"


def recipe_file(tmp_path, block: str, task: str, teacher, student, data, name: str = "suggested.yaml"):
    """A recipe file: task, models, data and training keys, then the suggested block exactly as given."""
    head = {"task": task, "teacher": teacher, "student": student, "data": data,
            "training": {"output_dir": str(tmp_path / name.replace(".yaml", "")), "max_steps": 2, "logging_steps": 1,
                         "per_device_train_batch_size": 8, "save_strategy": "no", "use_cpu": True,
                         "disable_tqdm": True, "seed": 0}}
    path = tmp_path / name
    path.write_text(yaml.safe_dump(head, sort_keys=False) + block, encoding="utf-8")
    return path


def trainer_from(path) -> DistillationTrainer:
    """The run's own path from a recipe file to the distilled student's trainer (models, data, dry run)."""
    plan = plan_run(load_recipe(path), str(path))
    trainer = build_trainer(plan.final, plan, plan.final.stages[0])
    assert isinstance(trainer, DistillationTrainer)
    return trainer


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Transformers models from small configs saved as folders: a 12-layer BERT and a 4-layer narrower one (with a
    tokenizer), a 6-layer ViT and a 3-layer DeiT (with image processors)."""
    from transformers import (BertConfig, BertForSequenceClassification, DeiTConfig, DeiTForImageClassification,
                              ViTConfig, ViTForImageClassification, ViTImageProcessor)

    root = tmp_path_factory.mktemp("suggest_models")
    torch.manual_seed(0)
    for name, layers, hidden in (("bert12", 12, 32), ("bert4", 4, 16)):
        config = BertConfig(vocab_size=40, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                            intermediate_size=2 * hidden, max_position_embeddings=64, num_labels=2)
        BertForSequenceClassification(config).save_pretrained(root / name)
        tiny_tokenizer(root / name, WORDS)
    vision = dict(image_size=32, patch_size=8, num_attention_heads=2, num_labels=10)
    ViTForImageClassification(ViTConfig(hidden_size=64, num_hidden_layers=6, intermediate_size=128, **vision)
                              ).save_pretrained(root / "vit")
    DeiTForImageClassification(DeiTConfig(hidden_size=32, num_hidden_layers=3, intermediate_size=64, **vision)
                               ).save_pretrained(root / "deit")
    for name in ("vit", "deit"):
        ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(root / name)
    return root


@pytest.fixture(scope="module")
def reviews(tmp_path_factory):
    """A csv of two-word reviews labelled neg/pos (the BERT folders' two classes)."""
    path = tmp_path_factory.mktemp("suggest_data") / "reviews.csv"
    rows = [f"{a} {b},{'pos' if a in ('good', 'great') else 'neg'}"
            for a in ("good", "bad", "great", "awful") for b in ("movie", "film", "plot", "actor")]
    path.write_text("text,label\n" + "\n".join(rows * 3) + "\n", encoding="utf-8")
    return {"name": "csv", "data_files": str(path), "max_length": 16}


# ------------------------------------------------------------------------------------------ matching
def test_layer_proportion_and_round_half_up():
    assert proportional_pairs([1, 2, 3, 4], list(range(1, 13))) == [(1, 3), (2, 6), (3, 9), (4, 12)]
    assert proportional_pairs([1, 2, 3, 4], list(range(1, 7))) == [(1, 2), (2, 3), (3, 5), (4, 6)]  # 1.5->2, 4.5->5
    assert proportional_pairs([1, 2, 3], [1, 2, 3]) == [(1, 1), (2, 2), (3, 3)]
    assert proportional_pairs(list(range(1, 13)), [1, 2, 3, 4]) == [(3, 1), (6, 2), (9, 3), (12, 4)]  # a deeper student
    assert proportional_pairs([], [1]) == []


# ------------------------------------------------------------------------------------------ the model pairs
def test_resnet18_to_mobilenetv3_by_stride_cli_block_trains(tmp_path, capsys):
    """The CLI's printed block, pasted as is: a trainer builds from it and two training steps run."""
    assert main(["suggest", "timm:resnet18", "timm:mobilenetv3_small_100", "--input-size", "32"]) == 0
    out = capsys.readouterr().out
    # each pair's shapes and adapter are printed: stride 4 is resnet's layer1 and mobilenet's blocks.0, at 32x32
    assert "stride 4   blocks.0  Bx16x8x8" in out and "layer1   Bx64x8x8" in out and "conv1x1" in out
    block = printed_block(out)
    terms = load_yaml(block)["terms"]
    assert terms[0] == {"loss": "kd", "weight": 0.9, "params": {"temperature": 4.0}}
    assert [(t["student"], t["teacher"], t["adapter"]) for t in terms[1:]] == [
        ("blocks.0", "layer1", "conv1x1"), ("blocks.1", "layer2", "conv1x1"),
        ("blocks.3", "layer3", "conv1x1"), ("blocks.5", "layer4", "conv1x1")]  # strides 4, 8, 16, 32; the stem left out

    path = recipe_file(tmp_path, block, "image-classification", {"name": "timm:resnet18", "pretrained": False},
                       {"name": "timm:mobilenetv3_small_100"}, DIGITS)
    trainer = trainer_from(path)
    assert set(trainer.model.adapters) == {"mse_0", "mse_1", "mse_2", "mse_3"}
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 2 and all(math.isfinite(entry["loss"]) for entry in logged)
    assert {"loss_kd", "loss_mse_0", "loss_mse_3"} <= set(logged[-1])


def test_convnext_to_resnet_with_attention_transfer(tmp_path):
    suggestion = suggest("timm:test_convnext", "timm:test_resnet", input_size=32, method="at")
    assert [(p.match, p.student.tap, p.teacher.tap, p.adapter) for p in suggestion.pairs] == [
        ("stride 4", "layer1", "stages.0", None), ("stride 8", "layer2", "stages.1", None),
        ("stride 16", "layer3", "stages.2", None), ("stride 32", "layer4", "stages.3", None)]
    # AT compares maps of any width, over every pair at once: one term with lists, no adapter
    assert suggestion.terms[1] == {"loss": "at", "weight": 1.0, "student": ["layer1", "layer2", "layer3", "layer4"],
                                   "teacher": ["stages.0", "stages.1", "stages.2", "stages.3"]}
    assert load_yaml(suggestion.yaml()) == {"terms": suggestion.terms}
    assert suggestion.report().endswith(suggestion.yaml().rstrip("\n"))  # what the CLI prints last
    path = recipe_file(tmp_path, suggestion.yaml(), "image-classification",
                       {"name": "timm:test_convnext", "pretrained": False}, {"name": "timm:test_resnet"}, DIGITS)
    trainer = trainer_from(path)
    assert [term.name for term in trainer.model.terms] == ["kd", "at"] and not trainer.model.adapters


def test_bert_12_layers_to_4_by_layer_proportion_trains(tmp_path, folders, reviews):
    suggestion = suggest(str(folders / "bert12"), str(folders / "bert4"))
    assert suggestion.task == "text-classification"
    assert [(p.student.tap, p.teacher.tap, p.adapter) for p in suggestion.pairs] == [
        (f"hidden_states.{i}", f"hidden_states.{3 * i}", "linear") for i in range(1, 5)]
    assert suggestion.pairs[0].student.shape[-1] == 16 and suggestion.pairs[0].teacher.shape[-1] == 32
    assert "layer 1/4 -> 3/12" in suggestion.report()
    path = recipe_file(tmp_path, suggestion.yaml(), "text-classification", {"name": str(folders / "bert12")},
                       {"name": str(folders / "bert4")}, reviews)
    trainer = trainer_from(path)
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 2 and all(math.isfinite(entry["loss"]) for entry in logged)
    assert {"loss_kd", "loss_mse_0", "loss_mse_3"} <= set(logged[-1])


def test_text_without_tokenizer_uses_random_ids(folders):
    """A student built from a `config:` mapping has no tokenizer (a run would need `tokenizer:`): random ids stand in."""
    student = {"name": "bert", "config": {"vocab_size": 40, "hidden_size": 16, "num_hidden_layers": 2,
                                          "num_attention_heads": 2, "intermediate_size": 32}}
    suggestion = suggest(str(folders / "bert12"), student, input_size=8)
    assert suggestion.student.input == "8 random token ids (no tokenizer)"
    assert suggestion.teacher.input == "8-token example sentence"  # padded to --input-size
    assert [(p.student.tap, p.teacher.tap) for p in suggestion.pairs] == [("hidden_states.1", "hidden_states.6"),
                                                                           ("hidden_states.2", "hidden_states.12")]


def test_vit_to_deit_transformers_token_mismatch(tmp_path, folders):
    """DeiT's distillation token makes 18 tokens against ViT's 17: no adapter maps that, so mse gets the pooled
    features instead and says why; at pools tokens and keeps the layer pairs."""
    teacher, student = str(folders / "vit"), str(folders / "deit")
    hints = suggest(teacher, student)
    assert [(p.student.tap, p.teacher.tap, p.usable) for p in hints.pairs] == [
        ("hidden_states.1", "hidden_states.2", False), ("hidden_states.2", "hidden_states.4", False),
        ("hidden_states.3", "hidden_states.6", False), ("pooled", "pooled", True)]
    assert "18 tokens and the teacher 17" in hints.report() and "pooled pre-logits" in hints.report()
    assert hints.terms[1] == {"loss": "mse", "weight": 1.0, "student": "pooled", "teacher": "pooled", "adapter": "linear"}
    trainer_from(recipe_file(tmp_path, hints.yaml(), "image-classification", {"name": teacher}, {"name": student},
                             DIGITS, "hints.yaml"))

    attention = suggest(teacher, student, method="at")
    assert attention.terms[1]["student"] == ["hidden_states.1", "hidden_states.2", "hidden_states.3"]
    assert "pools the longer one" in attention.report()
    trainer_from(recipe_file(tmp_path, attention.yaml(), "image-classification", {"name": teacher}, {"name": student},
                             DIGITS, "attention.yaml"))


def test_vit_to_deit_tiny_timm_specs(tmp_path):
    """Recipe model mappings (timm kwargs) work too: a 6-block ViT-S into a 3-block DeiT-tiny, 17 tokens each."""
    teacher = {"name": "timm:vit_small_patch16_224", "kwargs": {"depth": 6, "img_size": 32, "patch_size": 8}}
    student = {"name": "timm:deit_tiny_patch16_224", "kwargs": {"depth": 3, "img_size": 32, "patch_size": 8}}
    suggestion = suggest(teacher, student)
    assert [(p.match, p.student.tap, p.teacher.tap, p.adapter) for p in suggestion.pairs] == [
        ("layer 1/3 -> 2/6", "blocks.0", "blocks.1", "linear"), ("layer 2/3 -> 4/6", "blocks.1", "blocks.3", "linear"),
        ("layer 3/3 -> 6/6", "blocks.2", "blocks.5", "linear")]
    assert suggestion.pairs[0].student.shape == (2, 17, 192) and suggestion.pairs[0].teacher.shape == (2, 17, 384)
    trainer_from(recipe_file(tmp_path, suggestion.yaml(), "image-classification", {**teacher, "pretrained": False},
                             student, DIGITS))


def test_every_method_suggest_accepts_builds_a_trainer(tmp_path):
    """Each feature method suggest writes terms for gives a block the trainer takes (or only kd, saying why)."""
    for method in feature_methods():
        suggestion = suggest("timm:test_convnext", "timm:test_resnet", input_size=32, method=method)
        path = recipe_file(tmp_path, suggestion.yaml(), "image-classification",
                           {"name": "timm:test_convnext", "pretrained": False}, {"name": "timm:test_resnet"}, DIGITS,
                           f"{method}.yaml")
        report = check(path)
        assert [term["loss"] for term in report.stages[0].terms][:1] == ["kd"], method
        if not suggestion.usable_pairs:  # mgd: the teacher must be at least as wide as the student at each pair
            assert f"no {method} term" in suggestion.report(), method


# ------------------------------------------------------------------------------------------ bad input
def test_bad_input_is_bad_input_error(folders):
    cases = [
        (dict(teacher="timm:resnet1800", student="timm:test_resnet"), "timm has no model 'resnet1800'"),
        (dict(teacher="timm:test_resnet", student=str(folders / "missing") + "/"), "does not exist"),
        (dict(teacher="timm:test_resnet", student="timm:test_resnet", method="fitnets"), "unknown method 'fitnets'"),
        (dict(teacher="timm:test_resnet", student="timm:test_resnet", method="kd"), "reads logits, not features"),
        (dict(teacher="timm:test_resnet", student="timm:test_resnet", method="crd"), "needs more than a pair of taps"),
        (dict(teacher="timm:test_resnet", student="timm:test_resnet", method="ft"), "paraphraser"),
        (dict(teacher="timm:test_resnet", student="timm:test_resnet", input_size=0), "--input-size must be"),
        (dict(teacher=str(folders / "vit"), student=str(folders / "deit"), input_size=64), "cannot run on a 3x64x64"),
        (dict(teacher="timm:test_resnet", student=str(folders / "bert4")), "do different tasks"),
        (dict(teacher="timm:test_resnet", student="timm:test_resnet", task="translation"), "unknown task"),
    ]
    for kwargs, message in cases:
        with pytest.raises(BadInputError, match=message):
            suggest(**kwargs)
    with pytest.raises(RecipeError, match="teacher.kwargs"):  # a recipe model mapping is checked as in a recipe
        suggest({"name": "timm:test_resnet", "kwargs": 3}, "timm:test_resnet")
    assert issubclass(DistillationError, BadInputError)


def test_cli_bad_input_exits_2_with_one_paragraph(capsys):
    for argv, message in (
        (["suggest", "timm:resnet1800", "timm:test_resnet"], "timm has no model 'resnet1800'"),
        (["suggest", "timm:test_resnet", "timm:test_resnet", "--method", "kd"], "reads logits, not features"),
        (["suggest", "timm:test_resnet", "timm:test_resnet", "--input-size", "-1"], "--input-size must be"),
        (["suggest", "timm:test_resnet", "timm:test_resnet", "--frobnicate", "1"], "unexpected arguments"),
    ):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in " ".join(err.split()) and "Traceback" not in err and err.startswith("hfdistill: error:")


def test_dense_tasks_run_on_images_and_get_their_logit_term():
    """A segmenter pair gets pixel_kd on its [B, K, H, W] score maps (and hints on its stage maps), a detector pair
    detection_logit_kd on [logits, pred_boxes]: both run on images, not on token ids."""
    from test_detection_task import tiny_rt_detr
    from test_segmentation import TINY, WIDER

    seg = suggest({"name": "segformer", "config": WIDER}, {"name": "segformer", "config": TINY},
                  task="semantic-segmentation", input_size=32)
    assert "32x32 image" in seg.student.input and seg.student.logits[1] == seg.teacher.logits[1]
    assert seg.terms[0] == {"loss": "pixel_kd", "weight": 1.0, "params": {"temperature": 1.0}}
    assert any(term["loss"] == "mse" and term["student"].startswith("hidden_states") for term in seg.terms[1:])
    det = suggest({"name": "rt_detr", "config": tiny_rt_detr()}, {"name": "rt_detr", "config": tiny_rt_detr()},
                  task="object-detection", input_size=64)
    assert "64x64 image" in det.teacher.input and len(det.student.logits) == 3
    assert det.terms[0] == {"loss": "detection_logit_kd", "weight": 1.0, "student": ["logits", "pred_boxes"],
                            "teacher": ["logits", "pred_boxes"]}
    assert "detection_logit_kd" in det.report()
