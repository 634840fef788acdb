"""`task: object-detection` end to end: a tiny RT-DETR teacher trained first, a student alone and one distilled with
`detection_logit_kd` on the Fashion-MNIST scenes, the summary's mAP, and the saved student in pipeline()."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import hfdistill
from hfdistill.recipe import Recipe

FMNIST = Path("/usr/share/datasets/fashion-mnist")
needs_fmnist = pytest.mark.skipif(not (FMNIST / "t10k-images-idx3-ubyte.gz").is_file(),
                                  reason="Fashion-MNIST files absent (apt install dataset-fashion-mnist)")


def tiny_rt_detr() -> dict:
    from hfdistill.detection import detection_config

    config = detection_config("rt_detr", num_labels=10, size="tiny").to_diff_dict()
    config.update(freeze_backbone_batch_norms=False, num_denoising=0)
    for key in ("id2label", "label2id", "num_labels", "transformers_version", "architectures", "model_type"):
        config.pop(key, None)
    return config


def detection_recipe(tmp_path) -> dict:
    config = tiny_rt_detr()
    return {
        "task": "object-detection",
        "teacher": {"name": str(tmp_path / "teacher"), "train_from": {"name": "rt_detr", "config": config},
                    "train_args": {"max_steps": 3}},
        "student": {"name": "rt_detr", "config": config, "baseline": True},
        "data": {"name": "fashion-mnist-scenes", "image_size": 64, "options": {"num_train": 32, "num_test": 16, "canvas": 64}},
        "terms": [{"loss": "detection_logit_kd", "weight": 1.0,
                   "student": ["logits", "pred_boxes"], "teacher": ["logits", "pred_boxes"]}],
        "training": {"output_dir": str(tmp_path / "student"), "max_steps": 3, "per_device_train_batch_size": 8,
                     "per_device_eval_batch_size": 8, "learning_rate": 0.001, "save_strategy": "no",
                     "logging_steps": 1, "use_cpu": True},
    }


@needs_fmnist
def test_run_distils_an_rt_detr_whose_student_detects_in_a_fresh_process(tmp_path):
    result = hfdistill.run(Recipe.from_dict(detection_recipe(tmp_path)), print_summary=False)
    assert [job.label for job in result.jobs] == ["teacher", "student (no teacher)", "student (distilled)"]
    rows = {row.role: row for row in result.plan.rows}
    for role in ("teacher", "student (no teacher)", "student (distilled)"):
        assert 0 <= rows[role].metrics["map"] <= 1, role
    assert 0 <= result.metrics["eval_teacher_map"] <= 1
    assert "map" in result.summary and "synthetic" in result.summary
    student = Path(result.output_dir)
    config = json.loads((student / "config.json").read_text())
    assert config["architectures"] == ["RTDetrForObjectDetection"] and config["id2label"]["0"] == "T-shirt/top"
    assert json.loads((student / "preprocessor_config.json").read_text())["size"] == {"height": 64, "width": 64}
    card = (student / "README.md").read_text()
    assert "map_large" not in card  # torchmetrics' -1 (no large objects) is no number
    assert "pipeline_tag: object-detection" in card and "map" in card and "synthetic scenes" in card
    assert 'detector = pipeline("object-detection"' in card
    script = textwrap.dedent(f"""
        import json
        import numpy as np
        from PIL import Image
        from transformers import pipeline
        detector = pipeline("object-detection", model={str(student)!r})
        image = Image.fromarray((np.random.default_rng(0).random((40, 50, 3)) * 255).astype("uint8"))
        print(json.dumps(detector(image, threshold=0.0)))
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    assert isinstance(results, list) and results
    assert {r["label"] for r in results} <= set(config["id2label"].values())


@needs_fmnist
def test_detection_data_gives_a_teacher_with_other_preprocessing_its_own_pixels():
    from types import SimpleNamespace

    from hfdistill.data import load_raw_data
    from hfdistill.data_dense import detection_data
    from hfdistill.detection import detection_image_processor, detection_model
    from hfdistill.errors import DistillationError
    from hfdistill.recipe import DataSpec
    from hfdistill.tasks import get_task

    spec = DataSpec(name="fashion-mnist-scenes", options={"num_train": 4, "num_test": 4, "canvas": 64})
    raw = load_raw_data(spec, "object-detection")
    assert raw.label_names[0] == "T-shirt/top" and len(raw.label_names) == 10 and "synthetic" in raw.note
    detr = detection_model("detr", num_labels=10, size="tiny")
    student = SimpleNamespace(name="s", model=None, image_processor=lambda: detection_image_processor("rt_detr", 64))
    teacher = SimpleNamespace(name="t", model=detr, image_processor=lambda: detection_image_processor(detr, 96))
    data = detection_data(raw, student, teacher)
    batch = data.collator([data.eval[i] for i in range(2)])
    assert tuple(batch["pixel_values"].shape[-2:]) == (64, 64)
    assert batch["teacher_pixel_values"].shape[-1] == 96 and isinstance(batch["labels"], list)
    inputs = data.teacher_inputs(batch)
    assert inputs["pixel_values"] is batch["teacher_pixel_values"]
    assert ("pixel_mask" in inputs) == ("teacher_pixel_mask" in batch)
    assert data.teacher_inputs is not None
    with pytest.raises(DistillationError, match="own loss"):
        get_task("object-detection").loss(None, None)


def test_box_format_is_a_detection_data_field_checked_by_the_recipe():
    from hfdistill.errors import RecipeError

    base = {"task": "object-detection", "student": {"name": "rt_detr", "config": {}}}
    assert Recipe.from_dict({**base, "data": {"name": "user/voc", "box_format": "xyxy"}}).data.box_format == "xyxy"
    with pytest.raises(RecipeError, match="data.box_format.*xywh, xyxy"):
        Recipe.from_dict({**base, "data": {"name": "user/voc", "box_format": "cxcywh"}})
    with pytest.raises(RecipeError, match="data.box_format.*object detection"):
        Recipe.from_dict({"task": "image-classification", "student": {"name": "timm:resnet18"},
                          "data": {"name": "user/set", "box_format": "xyxy"}})


@needs_fmnist
def test_xyxy_boxes_from_a_saved_dataset_give_the_same_labels_as_coco_boxes(tmp_path):
    """The same scenes saved once with COCO [x, y, w, h] boxes and once with Pascal VOC [x1, y1, x2, y2] boxes
    (`data.box_format: xyxy`) give the detector the same normalised labels."""
    from types import SimpleNamespace

    from hfdistill.data import load_raw_data
    from hfdistill.data_dense import detection_data
    from hfdistill.detection import detection_image_processor
    from hfdistill.recipe import DataSpec
    from hfdistill.scenes import fashion_mnist_scenes_dict

    scenes = fashion_mnist_scenes_dict(num_train=6, num_test=4, canvas=64)

    def to_xyxy(row):
        objects = dict(row["objects"])
        objects["bbox"] = [[x, y, x + w, y + h] for x, y, w, h in objects["bbox"]]
        return {"objects": objects}

    scenes.save_to_disk(str(tmp_path / "coco"))
    scenes.map(to_xyxy).save_to_disk(str(tmp_path / "voc"))
    student = SimpleNamespace(name="s", model=None, image_processor=lambda: detection_image_processor("rt_detr", 64))
    labels = {}
    for folder, box_format in (("coco", None), ("voc", "xyxy")):
        raw = load_raw_data(DataSpec(name="disk", data_dir=str(tmp_path / folder), box_format=box_format),
                            "object-detection")
        assert raw.box_format == (box_format or "xywh")
        data = detection_data(raw, student, None, augment="none")
        labels[folder] = data.collator([data.eval[i] for i in range(4)])["labels"]
    for coco, voc in zip(labels["coco"], labels["voc"]):
        assert coco["boxes"].shape[0] >= 1
        assert torch.allclose(coco["boxes"], voc["boxes"], atol=1e-5)
        assert torch.equal(coco["class_labels"], voc["class_labels"])
