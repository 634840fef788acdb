"""task: semantic-segmentation end to end: the tasks table, the metric, the data (maps resized and flipped with
their images, the teacher's own inputs, the sources), the models (SegFormer from a config or a folder), the
dense terms' taps, a whole run whose student loads in pipeline("image-segmentation"), and bad input.

Tiny SegFormers built from configs, small synthetic maps or a few Fashion-MNIST scenes; offline.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import hfdistill
from hfdistill.data import build_task_data, load_raw_data
from hfdistill.data_dense import SegmentationCollator, complete_label_names
from hfdistill.errors import RecipeError
from hfdistill.models import load_model
from hfdistill.recipe import DataSpec, ModelSpec, Recipe
from hfdistill.tasks import (IGNORE_INDEX, compact_label_maps, get_task, mean_iou, segmentation_loss,
                             segmentation_maps)

TASK = "semantic-segmentation"
FMNIST = Path("/usr/share/datasets/fashion-mnist")
needs_fmnist = pytest.mark.skipif(not (FMNIST / "t10k-images-idx3-ubyte.gz").is_file(),
                                  reason="Fashion-MNIST files absent (apt install dataset-fashion-mnist)")
# A two-stage SegFormer of a few thousand parameters (MiT-b0 has four stages of 32..256 channels).
TINY = {"num_encoder_blocks": 2, "depths": [1, 1], "hidden_sizes": [8, 16], "num_attention_heads": [1, 1],
        "sr_ratios": [2, 1], "patch_sizes": [7, 3], "strides": [4, 2], "mlp_ratios": [2, 2],
        "decoder_hidden_size": 16, "drop_path_rate": 0.0}
WIDER = dict(TINY, hidden_sizes=[16, 32], num_attention_heads=[1, 2], decoder_hidden_size=32)
COLOURS = {0: (0, 0, 0), 1: (200, 40, 10), 2: (20, 180, 240), 3: (250, 250, 90)}


def halves(n: int = 6, size: int = 16, seed: int = 0) -> datasets.Dataset:
    """Images whose left half is one class's colour and right half another's, with their maps (L images)."""
    rng = np.random.default_rng(seed)
    images, maps = [], []
    for _ in range(n):
        left, right = rng.choice(len(COLOURS), 2, replace=False)
        image = np.zeros((size, size, 3), np.uint8)
        label = np.zeros((size, size), np.uint8)
        image[:, : size // 2], label[:, : size // 2] = COLOURS[left], left
        image[:, size // 2:], label[:, size // 2:] = COLOURS[right], right
        images.append(Image.fromarray(image))
        maps.append(Image.fromarray(label, mode="L"))
    features = datasets.Features({"image": datasets.Image(), "annotation": datasets.Image()})
    return datasets.Dataset.from_dict({"image": images, "annotation": maps}, features=features)


def halves_dict(n_train: int = 6, n_eval: int = 4, size: int = 16) -> datasets.DatasetDict:
    return datasets.DatasetDict({"train": halves(n_train, size, 0), "validation": halves(n_eval, size, 1)})


NAMES = ["background", "red", "blue", "yellow"]


def tiny_student(size: int = 32, names=NAMES, config=TINY, role: str = "student"):
    return load_model(ModelSpec(name="segformer", config=dict(config)), role, TASK, len(names),
                      dict(enumerate(names)), image_size=size)


# ------------------------------------------------------------------------------------ table, loss, metric
def test_the_task_is_in_the_table():
    task = get_task(TASK)
    assert (task.auto_class, task.pipeline_tag, task.metric) == ("AutoModelForSemanticSegmentation",
                                                                 "image-segmentation", "mean_iou")
    assert task.greater_is_better and task.targets == "maps" and task.preprocess_logits is segmentation_maps
    assert task.label_columns[:5] == ("annotation", "label", "segmentation", "semantic_map", "mask")


def test_mean_iou_against_a_hand_computation():
    labels = np.array([[[0, 0, 1, 1],
                        [0, 2, 1, IGNORE_INDEX]],
                       [[-100, -100, -100, -100],  # padding, as the Trainer pads maps of other sizes
                        [2, 2, 0, 0]]])
    preds = np.array([[[0, 1, 1, 1],
                       [0, 2, 0, 3]],
                      [[-100, -100, -100, -100],
                       [2, 0, 0, 0]]], dtype=np.int16)
    # Counted pixels (label, pred): (0,0) (0,1) (1,1) (1,1) (0,0) (2,2) (1,0) | (2,2) (2,0) (0,0) (0,0).
    # class 0: TP 4, FP (pred 0, label not 0) 2, FN (label 0, pred not 0) 1 -> 4 / 7
    # class 1: TP 2, FP 1, FN 1 -> 2 / 4;  class 2: TP 2, FP 0, FN 1 -> 2 / 3
    # class 3: predicted at an ignored pixel only -> absent from both -> left out of the mean
    expected = (4 / 7 + 2 / 4 + 2 / 3) / 3
    result = mean_iou(type("EvalPrediction", (), {"predictions": preds, "label_ids": labels})())
    assert result["mean_iou"] == pytest.approx(expected, abs=1e-6)
    assert result["pixel_accuracy"] == pytest.approx(8 / 11, abs=1e-6)
    # Logits instead of maps: turned into maps at the labels' size first (the same numbers).
    logits = torch.nn.functional.one_hot(torch.as_tensor(preds).long().clamp_min(0), 4).permute(0, 3, 1, 2).float()
    again = mean_iou(type("EvalPrediction", (), {"predictions": logits.numpy(), "label_ids": labels})())
    assert again["mean_iou"] == pytest.approx(expected, abs=1e-6)


def test_eval_keeps_argmax_maps_at_the_labels_size_and_the_loss_matches_segformers():
    from transformers import SegformerConfig, SegformerForSemanticSegmentation

    torch.manual_seed(0)
    logits = torch.randn(2, 5, 4, 4)
    labels = torch.randint(0, 5, (2, 16, 16))
    maps = segmentation_maps((logits,), labels)
    assert maps.shape == (2, 16, 16) and maps.dtype == torch.int16
    up = F.interpolate(logits, size=(16, 16), mode="bilinear", align_corners=False)
    assert torch.equal(maps.long(), up.argmax(1))
    model = SegformerForSemanticSegmentation(SegformerConfig(**TINY, num_labels=5)).eval()
    pixels = torch.randn(2, 3, 32, 32)
    labels = torch.randint(0, 5, (2, 32, 32))
    labels[0, :4] = IGNORE_INDEX
    out = model(pixel_values=pixels, labels=labels)
    assert segmentation_loss(out.logits, labels).item() == pytest.approx(out.loss.item(), rel=1e-5)


# ------------------------------------------------------------------------------------ data
def test_maps_are_resized_and_flipped_with_their_images():
    raw = load_raw_data(DataSpec(name="unused", label_names=NAMES), TASK, dataset=halves_dict())
    assert (raw.input_column, raw.label_column, raw.label_names) == ("image", "annotation", NAMES)
    student = tiny_student(size=32)
    data = build_task_data(raw, TASK, student, augment="flip")
    processor = student.image_processor()
    mean, std = np.array(processor.image_mean), np.array(processor.image_std)

    def check(batch):
        pixels, labels = batch["pixel_values"], batch["labels"]
        assert pixels.shape == (len(labels), 3, 32, 32) and labels.shape == (len(labels), 32, 32)
        assert labels.dtype == torch.long
        for image, label in zip(pixels, labels):
            left, right = int(label[0, 0]), int(label[0, -1])
            # Nearest for the map: exactly two halves of 16 columns, no blended class at the border.
            assert (label[:, :16] == left).all() and (label[:, 16:] == right).all() and left != right
            for column, cls in ((0, left), (14, left), (17, right), (31, right)):  # bilinear: away from the border
                expected = (np.array(COLOURS[cls]) / 255 - mean) / std
                assert np.allclose(image[:, 5, column].numpy(), expected, atol=1e-3), (column, cls)

    eval_batch = data.collator(data.eval.__getitems__(list(range(4))))
    check(eval_batch)
    raw_eval = [np.asarray(m)[0, 0] for m in raw.eval["annotation"]]
    assert eval_batch["labels"][:, 0, 0].tolist() == [int(v) for v in raw_eval]  # eval: never flipped
    # Training: each image flipped with its map, the same way for the same example, epoch and seed.
    transform = data.train.format["format_kwargs"]["transform"]
    transform.set_augmentation_epoch(3, seed=7)
    first = data.collator(data.train.__getitems__(list(range(6))))
    check(first)
    raw_left = [int(np.asarray(m)[0, 0]) for m in raw.train["annotation"]]
    flipped = [int(a) != b for a, b in zip(first["labels"][:, 0, 0], raw_left)]
    assert any(flipped) and not all(flipped)
    again = data.collator(data.train.__getitems__([5, 4, 3, 2, 1, 0]))
    assert torch.equal(again["labels"].flip(0), first["labels"])
    assert torch.equal(again["pixel_values"].flip(0), first["pixel_values"])


def test_a_teacher_with_another_resolution_gets_its_own_pixel_values(tmp_path):
    raw = load_raw_data(DataSpec(name="unused", label_names=NAMES), TASK, dataset=halves_dict())
    teacher = tiny_student(size=48, config=WIDER)
    teacher.model.save_pretrained(tmp_path / "teacher")
    teacher.image_processor().save_pretrained(tmp_path / "teacher")
    teacher = load_model(ModelSpec(name=str(tmp_path / "teacher")), "teacher", TASK, len(NAMES), dict(enumerate(NAMES)))
    assert teacher.id2label == dict(enumerate(NAMES)) and teacher.image_config.size == (48, 48)
    student = tiny_student(size=32)
    data = build_task_data(raw, TASK, student, teacher, augment="none")
    batch = data.collator(data.train.__getitems__([0, 1, 2]))
    assert batch["pixel_values"].shape == (3, 3, 32, 32) and batch["teacher_pixel_values"].shape == (3, 3, 48, 48)
    assert data.teacher_inputs(batch)["pixel_values"] is batch["teacher_pixel_values"]
    # The dry run feeds the teacher its 48x48 inputs: its logits are 12x12, the student's 8x8. pixel_kd resizes
    # the teacher's to the student's itself; cwd compares maps of one size, so the student's go through `resize`.
    from hfdistill import DistillationConfig, DistillationTrainer

    terms = [{"loss": "pixel_kd"}, {"loss": "cwd", "weight": 3.0, "params": {"temperature": 4.0}, "student": "logits",
                                    "teacher": "logits", "adapter": "resize", "adapter_params": {"mode": "bilinear"}}]
    args = DistillationConfig(output_dir=str(tmp_path / "out"), report_to="none", use_cpu=True,
                              remove_unused_columns=False)
    trainer = DistillationTrainer(model=student.model, teacher=teacher.model, recipe={"terms": terms}, args=args,
                                  train_dataset=data.train, data_collator=data.collator,
                                  teacher_inputs=data.teacher_inputs)
    shapes = {name: (tuple(c.student_shape)[1:], tuple(c.teacher_shape)[1:]) for name, c in trainer.loss_contexts.items()}
    assert shapes == {"pixel_kd": ((4, 8, 8), (4, 12, 12)), "cwd": ((4, 12, 12), (4, 12, 12))}
    # Same preprocessing: the student's pixels serve both.
    same = build_task_data(raw, TASK, student, tiny_student(size=32, config=WIDER), augment="none")
    assert same.teacher_inputs is None and "teacher_pixel_values" not in same.train.__getitems__([0])[0]


def test_collator_pads_images_with_zeros_and_maps_with_the_ignore_index():
    examples = [{"pixel_values": torch.ones(3, 4, 5), "labels": torch.zeros(4, 5, dtype=torch.long)},
                {"pixel_values": torch.ones(3, 6, 3), "labels": torch.ones(6, 3, dtype=torch.long)}]
    batch = SegmentationCollator()(examples)
    assert batch["pixel_values"].shape == (2, 3, 6, 5) and batch["labels"].shape == (2, 6, 5)
    assert batch["pixel_values"][0, :, 4:].abs().sum() == 0 and (batch["labels"][0, 4:] == IGNORE_INDEX).all()
    assert (batch["labels"][1, :, 3:] == IGNORE_INDEX).all() and (batch["labels"][1, :, :3] == 1).all()


@needs_fmnist
def test_fashion_mnist_scenes_source():
    spec = DataSpec(name="fashion-mnist-scenes", options={"num_train": 6, "num_test": 3, "canvas": 32,
                                                          "items": [1, 2], "scale": [0.8, 1.0]})
    raw = load_raw_data(spec, TASK)
    from hfdistill.scenes import SEGMENTATION_LABELS

    assert raw.label_names == list(SEGMENTATION_LABELS) and raw.label_names[0] == "background"
    assert (len(raw.train), len(raw.eval)) == (6, 3) and "synthetic" in raw.note
    with pytest.raises(RecipeError) as bad:
        load_raw_data(DataSpec(name="fashion-mnist-scenes", options={"canvass": 32}), TASK)
    assert bad.value.path == "data.options"
    with pytest.raises(RecipeError) as bad:
        load_raw_data(DataSpec(name="fashion-mnist-scenes"), "image-classification")
    assert bad.value.path == "data.name"


def test_save_to_disk_source_and_its_class_names(tmp_path, caplog):
    folder = tmp_path / "saved"
    halves_dict().save_to_disk(str(folder))
    raw = load_raw_data(DataSpec(name="disk", data_dir=str(folder)), TASK)
    assert (len(raw.train), len(raw.eval), raw.label_names) == (6, 4, [])
    # No names anywhere: the classes found in the maps (with a warning), until id2label.json names them.
    complete_label_names(raw, Recipe.from_dict({"task": TASK, "student": {"name": "segformer", "config": TINY}}))
    assert raw.label_names == ["0", "1", "2", "3"] and "data.label_names" in caplog.text
    (folder / "id2label.json").write_text(json.dumps({str(i): n for i, n in enumerate(NAMES)}))
    assert load_raw_data(DataSpec(name=str(folder)), TASK).label_names == NAMES  # the folder as `name`
    single = tmp_path / "single"
    halves(3).save_to_disk(str(single))  # a Dataset: its eval split is made
    raw = load_raw_data(DataSpec(name="disk", data_dir=str(single), label_names=NAMES, validation_fraction=0.3), TASK)
    assert (len(raw.train), len(raw.eval)) == (2, 1)
    with pytest.raises(RecipeError) as bad:
        load_raw_data(DataSpec(name="disk", data_dir=str(tmp_path)), TASK)
    assert bad.value.path == "data.data_dir"


def test_class_names_from_a_trained_segmentation_teacher(tmp_path):
    teacher = tiny_student(size=32, role="student")
    teacher.model.save_pretrained(tmp_path / "teacher")
    teacher.image_processor().save_pretrained(tmp_path / "teacher")
    raw = load_raw_data(DataSpec(name="unused"), TASK, dataset=halves_dict())
    recipe = Recipe.from_dict({"task": TASK, "teacher": {"name": str(tmp_path / "teacher")},
                               "student": {"name": "segformer", "config": TINY}})
    complete_label_names(raw, recipe)
    assert raw.label_names == NAMES


def test_bad_segmentation_data_names_the_field():
    images = halves(3)
    no_maps = datasets.Dataset.from_dict({"image": images["image"], "scene": [0, 1, 0]})
    with pytest.raises(RecipeError) as bad:
        load_raw_data(DataSpec(name="unused", label_names=NAMES), TASK, dataset=no_maps)
    assert bad.value.path == "data.label_column" and "segmentation maps" in bad.value.message
    one_class_each = datasets.Dataset.from_dict(
        {"image": images["image"], "label": [0, 1, 0]},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])}))
    with pytest.raises(RecipeError) as bad:
        load_raw_data(DataSpec(name="unused", label_names=NAMES), TASK, dataset=one_class_each)
    assert bad.value.path == "data.label_column" and "not a segmentation map" in bad.value.message
    # Maps with classes beyond the names: refused when the data is built, before any training.
    raw = load_raw_data(DataSpec(name="unused", label_names=["background", "red"]), TASK, dataset=halves_dict())
    with pytest.raises(RecipeError) as bad:
        build_task_data(raw, TASK, tiny_student(names=["background", "red"]))
    assert bad.value.path == "data.label_names" and "0..1" in bad.value.message
    raw = load_raw_data(DataSpec(name="unused", label_names=NAMES), TASK, dataset=halves_dict())
    with pytest.raises(RecipeError) as bad:
        build_task_data(raw, TASK, tiny_student(), augment="crop_flip")
    assert bad.value.path == "data.augment"
    colour_maps = datasets.Dataset.from_dict({"image": images["image"], "annotation": images["image"]})
    raw = load_raw_data(DataSpec(name="unused", label_names=NAMES), TASK, dataset=colour_maps)
    with pytest.raises(RecipeError) as bad:
        build_task_data(raw, TASK, tiny_student())
    assert bad.value.path == "data.label_column" and "RGB" in bad.value.message
    with pytest.raises(RecipeError) as bad:  # segmentation-only fields on another task
        Recipe.from_dict({"task": "image-classification", "data": {"name": "x", "label_names": ["a", "b"]}})
    assert bad.value.path == "data.label_names"


# ------------------------------------------------------------------------------------ models and terms
def test_segformer_from_a_config_gets_the_data_classes_and_a_processor():
    student = tiny_student(size=40)
    config = student.model.config
    assert type(student.model).__name__ == "SegformerForSemanticSegmentation"
    assert config.num_labels == 4 and config.id2label == dict(enumerate(NAMES)) and config.label2id["blue"] == 2
    processor = student.image_processor()
    assert type(processor).__name__ == "SegformerImageProcessor" and not processor.do_reduce_labels
    assert dict(processor.size) == {"height": 40, "width": 40} and student.image_config.size == (40, 40)


def test_dense_terms_read_segformer_taps_and_train():
    """pixel_kd and cwd on logits, SKD's pairwise affinity on a module path (a stage's output map) and on
    hidden_states, a FitNet hint through a conv1x1 adapter: one dry run and two training steps."""
    from hfdistill import DistillationConfig, DistillationTrainer

    raw = load_raw_data(DataSpec(name="unused", label_names=NAMES), TASK, dataset=halves_dict(8, 4))
    teacher, student = tiny_student(size=32, config=WIDER), tiny_student(size=32)
    data = build_task_data(raw, TASK, student, teacher, augment="flip")
    # transformers 5.24 names SegFormer's stages `segformer.stages.N` (each returns its [B, C, H, W] map); earlier
    # releases kept `segformer.encoder.block.N`, lists of token blocks with no output of their own.
    stage = "segformer.stages.1" if hasattr(student.model.segformer, "stages") else "hidden_states.1"
    terms = [
        {"loss": "pixel_kd", "weight": 1.0},
        {"loss": "cwd", "weight": 3.0, "params": {"temperature": 4.0}, "student": "logits", "teacher": "logits"},
        {"loss": "pairwise_affinity", "weight": 1.0, "student": stage, "teacher": stage},
        {"loss": "pairwise_affinity", "weight": 1.0, "student": "hidden_states.0", "teacher": "hidden_states.0",
         "name": "affinity_hidden"},
        {"loss": "mse", "weight": 1.0, "student": "hidden_states.1", "teacher": "hidden_states.1", "adapter": "conv1x1"},
    ]
    label_dtypes = []

    def metrics_seeing_labels(eval_pred):  # the maps kept for the whole eval set are int16, the metrics unchanged
        label_dtypes.append(eval_pred.label_ids.dtype)
        wide = type("EvalPrediction", (), {"predictions": eval_pred.predictions,
                                           "label_ids": eval_pred.label_ids.astype(np.int64)})()
        assert mean_iou(eval_pred) == mean_iou(wide)
        return get_task(TASK).compute_metrics(eval_pred)

    with __import__("tempfile").TemporaryDirectory() as out:
        args = DistillationConfig(output_dir=out, max_steps=2, per_device_train_batch_size=4, report_to="none",
                                  use_cpu=True, remove_unused_columns=False, save_strategy="no", logging_steps=1)
        trainer = DistillationTrainer(model=student.model, teacher=teacher.model, recipe={"terms": terms}, args=args,
                                      train_dataset=data.train, eval_dataset=data.eval, data_collator=data.collator,
                                      processing_class=student.image_processor(), task_loss=get_task(TASK).loss,
                                      compute_metrics=metrics_seeing_labels,
                                      preprocess_logits_for_metrics=segmentation_maps)
        shapes = {name: (tuple(c.student_shape), tuple(c.teacher_shape)) for name, c in trainer.loss_contexts.items()}
        shapes = {name: (s[1:], t[1:]) for name, (s, t) in shapes.items()}  # the batch dimension aside
        assert shapes["pixel_kd"] == shapes["cwd"] == ((4, 8, 8), (4, 8, 8))  # logits at 1/4 of 32x32
        assert shapes["pairwise_affinity"] == ((16, 4, 4), (32, 4, 4))  # the second stage's maps
        assert shapes["affinity_hidden"] == ((8, 8, 8), (16, 8, 8))
        assert shapes["mse"] == ((32, 4, 4), (32, 4, 4))  # after the conv1x1 adapter
        trainer.train()
        logged = {k for entry in trainer.state.log_history for k in entry}
        assert {"loss_pixel_kd", "loss_cwd", "loss_pairwise_affinity", "loss_affinity_hidden", "loss_mse"} <= logged
        metrics = trainer.evaluate()
        assert 0 <= metrics["eval_mean_iou"] <= 1 and 0 <= metrics["eval_teacher_mean_iou"] <= 1
        assert "eval_pixel_accuracy" in metrics
        assert label_dtypes == [np.int16, np.int16]  # the student's evaluation, then the teacher's


def test_label_maps_are_kept_as_int16_when_the_classes_fit():
    maps = torch.tensor([[[0, 3], [IGNORE_INDEX, -100]]])
    assert compact_label_maps(maps, num_labels=4).dtype == torch.int16
    assert torch.equal(compact_label_maps(maps, num_labels=4).long(), maps)
    assert compact_label_maps(maps, num_labels=40000).dtype == torch.int64  # class ids past int16
    assert compact_label_maps(maps, num_labels=None).dtype == torch.int64  # unknown: as it is
    tokens = torch.tensor([[5, -100]])
    assert compact_label_maps(tokens, num_labels=4) is tokens  # sequences and class labels: as they are
    scores = maps.float()
    assert compact_label_maps(scores, num_labels=4) is scores
    boxes = [{"class_labels": torch.tensor([1])}]
    assert compact_label_maps(boxes, num_labels=4) is boxes


# ------------------------------------------------------------------------------------ a whole run
PIPELINE = """
import json, sys
import numpy as np
from PIL import Image
from transformers import pipeline
segmenter = pipeline("image-segmentation", model=sys.argv[1])
image = Image.fromarray((np.random.default_rng(0).random((40, 50, 3)) * 255).astype("uint8"))
out = segmenter(image)
print(json.dumps([{"label": o["label"], "size": list(o["mask"].size), "mode": o["mask"].mode} for o in out]))
"""


def scenes_recipe(tmp_path, terms=None) -> dict:
    return {
        "task": TASK,
        "teacher": {"name": str(tmp_path / "teacher"), "train_from": {"name": "segformer", "config": WIDER},
                    "train_args": {"max_steps": 3}},
        "student": {"name": "segformer", "config": TINY, "baseline": True},
        "data": {"name": "fashion-mnist-scenes", "image_size": 32,
                 "options": {"num_train": 16, "num_test": 6, "canvas": 32, "items": [1, 2], "scale": [0.8, 1.0]}},
        "terms": terms if terms is not None else [{"loss": "pixel_kd", "weight": 1.0}],
        "training": {"output_dir": str(tmp_path / "student"), "max_steps": 3, "per_device_train_batch_size": 8,
                     "per_device_eval_batch_size": 4, "learning_rate": 0.003, "save_strategy": "no",
                     "logging_steps": 1, "use_cpu": True},
    }


@needs_fmnist
def test_run_distils_a_segformer_whose_student_segments_in_a_fresh_process(tmp_path):
    result = hfdistill.run(Recipe.from_dict(scenes_recipe(tmp_path)), print_summary=False)
    assert [job.label for job in result.jobs] == ["teacher", "student (no teacher)", "student (distilled)"]
    rows = {row.role: row for row in result.plan.rows}
    for role in ("teacher", "student (no teacher)", "student (distilled)"):
        assert 0 <= rows[role].metrics["mean_iou"] <= 1, role
    assert 0 <= result.metrics["eval_teacher_mean_iou"] <= 1
    assert "mean_iou" in result.summary and "synthetic" in result.summary
    assert f"segmenter = pipeline('image-segmentation', model={result.output_dir!r})" in result.summary
    student = Path(result.output_dir)
    config = json.loads((student / "config.json").read_text())
    assert config["architectures"] == ["SegformerForSemanticSegmentation"] and config["id2label"]["0"] == "background"
    assert json.loads((student / "preprocessor_config.json").read_text())["size"] == {"height": 32, "width": 32}
    card = (student / "README.md").read_text()
    assert "pipeline_tag: image-segmentation" in card and "mean_iou" in card and "synthetic scenes" in card
    assert 'segmenter = pipeline("image-segmentation"' in card
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", PIPELINE, str(student)], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    masks = json.loads(done.stdout.strip().splitlines()[-1])
    assert masks and all(m["size"] == [50, 40] and m["mode"] == "L" for m in masks)
    assert {m["label"] for m in masks} <= set(config["id2label"].values())


@needs_fmnist
def test_a_teacher_cache_of_score_maps_and_features_trains_a_student(tmp_path, capsys):
    """`hfdistill cache` on a segmentation recipe stores the teacher's [B, K, H, W] logits (its class count read
    from the class dimension, not from the map's width) and a feature map; training from the cache runs; a top-k
    cache of score maps is refused (top-k keeps the classes of the last dimension)."""
    import yaml

    from hfdistill.cache import TeacherCache
    from hfdistill.cli import main

    recipe = scenes_recipe(tmp_path, terms=[
        {"loss": "pixel_kd", "weight": 1.0},
        {"loss": "pairwise_affinity", "student": "decode_head.activation", "teacher": "decode_head.activation"}])
    recipe["student"]["baseline"] = False
    recipe["data"]["augment"] = "none"
    recipe["training"]["max_steps"] = 1
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["train", str(path)]) == 0  # trains the teacher first
    folder = tmp_path / "cache"
    assert main(["cache", str(path), "--output", str(folder)]) == 0
    cache = TeacherCache(folder)
    assert cache.num_labels == 11 and set(cache.layouts) == {"logits", "decode_head.activation"}
    assert cache.layouts["logits"]["shapes"][0][0] == 11  # [K, H, W]
    capsys.readouterr()
    assert main(["train", str(path), "--teacher", f"{{cache: {folder}}}", "--training.output_dir",
                 str(tmp_path / "cached-student")]) == 0
    assert "cache cache" in capsys.readouterr().out
    assert main(["cache", str(path), "--output", str(tmp_path / "top-k"), "--logits_top_k", "3"]) == 2
    assert "no class dimension last" in capsys.readouterr().err
