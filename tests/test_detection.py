"""Object detection building blocks (hfdistill.detection): detectors from configs, COCO-style data, mAP, KD, pipeline.

The scenes are synthetic: real Fashion-MNIST items composed on a canvas (hfdistill.scenes), not a detection benchmark.
"""

import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from hfdistill.detection import (DETECTION_KINDS, DetectionCollator, DetectionPredictions, _rgb, cxcywh_to_xyxy,
                                 detection_activation, detection_image_processor, detection_map, detection_metrics,
                                 detection_model, detection_targets, detection_transform, detector_outputs,
                                 flip_boxes_xywh, objects_class_names, real_queries, scored_detections)
from hfdistill.errors import BadInputError

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
needs_fashion_mnist = pytest.mark.skipif(not (FASHION_MNIST / "train-images-idx3-ubyte.gz").is_file(),
                                         reason="Fashion-MNIST (Debian package dataset-fashion-mnist) is not installed")


@pytest.fixture(autouse=True)
def _quiet():
    import transformers

    level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
    transformers.logging.set_verbosity(level)


@pytest.fixture(scope="module")
def scenes():
    if not (FASHION_MNIST / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip("Fashion-MNIST (Debian package dataset-fashion-mnist) is not installed")
    from hfdistill.scenes import fashion_mnist_scenes

    return fashion_mnist_scenes("train", 32, seed=0)


def coco_to_xyxy(boxes):
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return np.concatenate([boxes[:, :2], boxes[:, :2] + boxes[:, 2:]], axis=1)


def label_boxes_in_pixels(label):
    """A label's normalised boxes -> absolute xyxy in the original image (through the metric's own mapping)."""
    return detection_targets(label)["boxes"].double().numpy()


# ------------------------------------------------------------------------------------ data
@pytest.mark.parametrize("kind", DETECTION_KINDS)
def test_transform_boxes_map_back_to_the_scene_boxes(scenes, kind):
    rows = scenes.select(range(6))
    data = rows.with_transform(detection_transform(detection_image_processor(kind, 96), train=False))
    batch = DetectionCollator()([data[i] for i in range(len(rows))])
    assert batch["pixel_values"].shape == (6, 3, 96, 96)
    assert isinstance(batch["labels"], list) and len(batch["labels"]) == 6
    for label, objects in zip(batch["labels"], rows["objects"]):
        assert label["class_labels"].dtype == torch.long and label["boxes"].dtype == torch.float32
        assert label["class_labels"].tolist() == objects["category"]
        assert ((label["boxes"] >= 0) & (label["boxes"] <= 1)).all()
        np.testing.assert_allclose(label_boxes_in_pixels(label), coco_to_xyxy(objects["bbox"]), atol=1e-3)


def test_flip_moves_image_and_boxes_together_reproducibly(scenes):
    rows = scenes.select(range(8))
    processor = detection_image_processor("rt_detr", 128)  # no resize: the flip is exact on the pixels
    plain = rows.with_transform(detection_transform(processor, train=False))
    transform = detection_transform(processor, train=True)
    transform.set_augmentation_epoch(3, seed=7)
    flipped = rows.with_transform(transform)
    flips = transform.flips([_rgb(image) for image in rows["image"]])
    assert any(flips) and not all(flips)  # a coin per image (8 images: this seed gives both)
    assert flips == transform.flips([_rgb(image) for image in rows["image"]])  # same epoch, same flips
    again = DetectionCollator()([flipped[i] for i in range(8)])
    batch = DetectionCollator()([flipped[i] for i in range(8)])
    base = DetectionCollator()([plain[i] for i in range(8)])
    for i, (flip, objects) in enumerate(zip(flips, rows["objects"])):
        torch.testing.assert_close(batch["labels"][i]["boxes"], again["labels"][i]["boxes"])
        expected = flip_boxes_xywh(objects["bbox"], 128) if flip else np.asarray(objects["bbox"])
        np.testing.assert_allclose(label_boxes_in_pixels(batch["labels"][i]), coco_to_xyxy(expected), atol=1e-3)
        image = base["pixel_values"][i].flip(-1) if flip else base["pixel_values"][i]
        torch.testing.assert_close(batch["pixel_values"][i], image)
    # Another epoch draws other flips for some image.
    transform.set_augmentation_epoch(4, seed=7)
    assert transform.flips([_rgb(image) for image in rows["image"]]) != flips


def test_images_without_objects_and_padding_of_different_sizes(scenes):
    import datasets

    row = scenes[0]
    wide = np.array(row["image"])[:, :96]  # 128 high, 96 wide: boxes beyond x=96 are clipped or dropped
    data = datasets.Dataset.from_dict({
        "image": [row["image"], wide, row["image"]],
        "objects": [row["objects"], {"bbox": [[4.0, 61.0, 28.0, 15.0]], "category": [5], "area": [235], "id": [9]},
                    {"bbox": [], "category": [], "area": [], "id": []}],
    }, features=scenes.select_columns(["image", "objects"]).features)
    processor = detection_image_processor("detr", shortest_edge=64, longest_edge=80)  # keeps aspect, pads
    data = data.with_transform(detection_transform(processor, train=False))
    # One example at a time (as a loader without __getitems__ would give them): the collator pads across them.
    batch = DetectionCollator()([data[i] for i in range(3)])
    assert batch["pixel_values"].shape == (3, 3, 80, 64)  # 128x128 -> 64x64; 128x96 -> 80x60; padded to 80x64
    mask = batch["pixel_mask"]
    assert mask[1].sum() == 80 * 60 and mask[0].sum() == 64 * 64 and mask[0, 64:].sum() == 0
    empty = batch["labels"][2]
    assert empty["class_labels"].shape == (0,) and empty["boxes"].shape == (0, 4)
    for i, objects in ((0, row["objects"]), (1, {"bbox": [[4.0, 61.0, 28.0, 15.0]]})):
        np.testing.assert_allclose(label_boxes_in_pixels(batch["labels"][i]), coco_to_xyxy(objects["bbox"]), atol=1e-3)
    with pytest.raises(BadInputError, match="fields"):
        detection_transform(processor).coco_annotations(0, {"boxes_of": [[0, 0, 1, 1]]}, 10)


# ------------------------------------------------------------------------------------ models
@pytest.mark.parametrize("kind", DETECTION_KINDS)
def test_tiny_detectors_build_offline_and_return_a_loss(kind):
    torch.manual_seed(0)
    model = detection_model(kind, id2label={0: "a", 1: "b", 2: "c"}, size="tiny")
    assert sum(p.numel() for p in model.parameters()) < 1_500_000
    assert all(p.requires_grad for p in model.parameters())
    labels = [{"class_labels": torch.tensor([1, 2]),
               "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.6, 0.3, 0.2]])},
              {"class_labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)}]
    out = model(pixel_values=torch.randn(2, 3, 64, 64), labels=labels)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    classes = 4 if detection_activation(model) == "softmax" else 3
    assert out.logits.shape[-1] == classes and out.pred_boxes.shape[-1] == 4
    assert detection_activation(model) == ("softmax" if kind == "detr" else "sigmoid")


# ------------------------------------------------------------------------------------ the metric
def _label(boxes_xyxy, classes, size=(100, 100)):
    boxes = torch.as_tensor(boxes_xyxy, dtype=torch.float32).reshape(-1, 4)
    h, w = size
    cxcywh = torch.stack([(boxes[:, 0] + boxes[:, 2]) / 2 / w, (boxes[:, 1] + boxes[:, 3]) / 2 / h,
                          (boxes[:, 2] - boxes[:, 0]) / w, (boxes[:, 3] - boxes[:, 1]) / h], -1)
    return {"class_labels": torch.as_tensor(classes).long(), "boxes": cxcywh, "orig_size": torch.tensor(size),
            "size": torch.tensor(size)}


def _detections(rows, size=(100, 100)):
    """[(score, label, x1, y1, x2, y2) in pixels] -> one image's [k, 6] normalised detections."""
    rows = torch.as_tensor(rows, dtype=torch.float32).reshape(-1, 6).clone()
    rows[:, 2:] /= torch.tensor([size[1], size[0], size[1], size[0]], dtype=torch.float32)
    return rows


def test_map_perfect_shifted_and_empty_predictions():
    labels = [_label([[10, 10, 50, 60], [60, 20, 90, 90]], [0, 1]), _label([[5, 5, 40, 40]], [2])]
    perfect = [_detections([[1, 0, 10, 10, 50, 60], [1, 1, 60, 20, 90, 90]]), _detections([[1, 2, 5, 5, 40, 40]])]
    shifted = [_detections([[1, 0, 14, 14, 54, 64], [1, 1, 64, 24, 94, 94]]), _detections([[1, 2, 9, 9, 44, 44]])]
    empty = [torch.zeros(0, 6), torch.zeros(0, 6)]

    def score(predictions):  # one batch per image, as eval_do_concat_batches=False gives them
        return detection_map(([p[None] for p in predictions], [[label] for label in labels]))

    assert score(perfect)["map"] == pytest.approx(1.0)
    assert score(perfect)["map_50"] == pytest.approx(1.0)
    assert 0 < score(shifted)["map"] < 1
    assert score(empty)["map"] == pytest.approx(0.0)
    assert detection_metrics()(([perfect[0][None]], [[labels[0]]]))["map"] == pytest.approx(1.0)


def test_map_against_a_hand_computation():
    label = [_label([[0, 0, 50, 50]], [0])]
    # IoU of [0, 0, 50, 50] and [0, 0, 50, 31] is 31/50 = 0.62: a match at IoU 0.50, 0.55 and 0.60 only, so
    # AP = 1 at 3 of the 10 thresholds: mAP = 0.3, mAP@50 = 1, mAP@75 = 0.
    one = detection_map(([_detections([[0.9, 0, 0, 0, 50, 31]])[None]], [label]))
    assert one["map"] == pytest.approx(0.3, abs=1e-6)
    assert one["map_50"] == pytest.approx(1.0) and one["map_75"] == pytest.approx(0.0)
    # A false positive scored above the true one: precision 1/2 at recall 1, so AP = 0.5 (101-point interpolation:
    # the precision envelope is 0.5 at every recall level) at every threshold.
    two = detection_map(([_detections([[0.9, 0, 60, 60, 90, 90], [0.8, 0, 0, 0, 50, 50]])[None]], [label]))
    assert two["map"] == pytest.approx(0.5, abs=1e-6)
    # The wrong class never matches; an area of 50 x 50 = 2500 px is "medium" (32^2 <= area < 96^2).
    wrong = detection_map(([_detections([[0.9, 1, 0, 0, 50, 50]])[None]], [label]))
    assert wrong["map"] == pytest.approx(0.0)
    assert one["map_small"] == -1 and one["map_large"] == -1 and one["map_medium"] == pytest.approx(0.3, abs=1e-6)


@pytest.mark.parametrize("kind", DETECTION_KINDS)
def test_scored_detections_match_the_processors_post_processing(kind):
    torch.manual_seed(0)
    model = detection_model(kind, num_labels=3, size="tiny").eval()
    processor = detection_image_processor(kind, 64)
    with torch.no_grad():
        outputs = model(pixel_values=torch.randn(2, 3, 64, 64))
    sizes = torch.tensor([[100, 120], [64, 64]])
    ours = DetectionPredictions.for_model(model)(outputs)
    extra = {"top_k": 60} if kind == "conditional_detr" else {}  # its default (100) exceeds 20 queries x 3 classes
    theirs = processor.post_process_object_detection(outputs, threshold=0.0, target_sizes=sizes, **extra)
    for rows, reference, (h, w) in zip(ours, theirs, sizes.tolist()):
        n = min(len(rows), len(reference["scores"]))  # RT-DETR's keeps num_queries detections, ours top_k
        rows, order = rows[:n], reference["scores"].argsort(descending=True)[:n]
        torch.testing.assert_close(rows[:, 0], reference["scores"][order])
        torch.testing.assert_close(rows[:, 1].long(), reference["labels"][order])
        torch.testing.assert_close(rows[:, 2:] * torch.tensor([w, h, w, h]), reference["boxes"][order], atol=1e-3,
                                   rtol=1e-4)
    # The Trainer's prediction_step tuple (outputs without the loss: loss_dict first) gives the same detections.
    as_tuple = tuple(v for k, v in outputs.items() if k != "loss")
    torch.testing.assert_close(DetectionPredictions.for_model(model)(({"a": torch.tensor(1.0)},) + as_tuple), ours)
    # Raw outputs per batch need the activation; with it, the same mAP as the reduced detections.
    label = [_label([[10, 10, 50, 60]], [1]), _label([[5, 5, 40, 40]], [2])]
    raw = [(outputs.logits.numpy(), outputs.pred_boxes.numpy())]
    with pytest.raises(BadInputError, match="activation"):
        detection_map((raw, [label]))
    assert detection_map((raw, [label]), activation=detection_activation(model)) == detection_map(([ours], [label]))


# ------------------------------------------------------------------------------------ training and evaluation
@needs_fashion_mnist
def test_tiny_detector_learns_the_scenes_with_the_trainer(scenes, tmp_path):
    """A tiny RT-DETR trained 40 steps on 32 scenes with transformers.Trainer: its loss goes down, and
    evaluation (list-of-dict labels, reduced predictions) reports mAP."""
    from transformers import Trainer, TrainingArguments

    from hfdistill.scenes import DETECTION_ID2LABEL

    torch.manual_seed(0)
    processor = detection_image_processor("rt_detr", 96)
    model = detection_model("rt_detr", id2label=DETECTION_ID2LABEL, size="tiny")
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=40, per_device_train_batch_size=8,
                             per_device_eval_batch_size=16, learning_rate=1e-3, lr_scheduler_type="constant",
                             max_grad_norm=1.0, logging_steps=5, save_strategy="no", report_to=[], seed=0,
                             remove_unused_columns=False, eval_do_concat_batches=False, dataloader_num_workers=0,
                             use_cpu=True, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, data_collator=DetectionCollator(),
                      train_dataset=scenes.with_transform(detection_transform(processor, train=True)),
                      eval_dataset=scenes.select(range(16)).with_transform(detection_transform(processor)),
                      compute_metrics=detection_map,
                      preprocess_logits_for_metrics=DetectionPredictions.for_model(model))
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 8 and np.mean(losses[-2:]) < np.mean(losses[:2]), losses
    # The eval-mode loss (no denoising queries, no noise) on 16 of the training scenes, before and after.
    assert after["eval_loss"] < 0.8 * before["eval_loss"], (before, after)
    assert 0.0 <= after["eval_map"] <= 1.0 and after["eval_map_50"] >= after["eval_map"]
    print(f"eval loss {before['eval_loss']:.2f} -> {after['eval_loss']:.2f}, map {before['eval_map']:.4f} -> "
          f"{after['eval_map']:.4f}, map_50 {before['eval_map_50']:.4f} -> {after['eval_map_50']:.4f}")


def test_detection_logit_kd_on_tiny_teacher_and_student_outputs():
    from hfdistill import losses

    torch.manual_seed(0)
    teacher = detection_model("rt_detr", num_labels=3, size="tiny", num_queries=20).eval()
    student = detection_model("conditional_detr", num_labels=3, size="tiny", num_queries=8).train()
    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        t = teacher(pixel_values=pixels)
    s = student(pixel_values=pixels)
    assert s.logits.shape[1] != t.logits.shape[1]
    kd = losses.build("detection_logit_kd")
    loss = kd([s.logits, s.pred_boxes], [t.logits, t.pred_boxes])
    assert loss.dim() == 0 and torch.isfinite(loss) and loss > 0
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    # An RT-DETR student in training mode with labels puts its denoising queries first: real_queries drops them.
    rt_student = detection_model("rt_detr", num_labels=3, size="tiny", num_queries=8, num_denoising=6).train()
    labels = [{"class_labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}] * 2
    out = rt_student(pixel_values=pixels, labels=labels)
    assert out.logits.shape[1] > 8
    student_taps = [real_queries(out.logits, rt_student), real_queries(out.pred_boxes, rt_student)]
    assert student_taps[0].shape[1] == 8
    kd(student_taps, [t.logits, t.pred_boxes]).backward()
    # The term does the same by itself once configured with the models (as the trainer does at set-up).
    from types import SimpleNamespace

    configured = losses.build("detection_logit_kd")
    configured.configure(SimpleNamespace(student=rt_student, teacher=teacher))
    assert configured.num_queries == (8, teacher.config.num_queries)
    by_itself = configured([out.logits, out.pred_boxes], [t.logits, t.pred_boxes])
    assert torch.allclose(by_itself, kd(student_taps, [t.logits, t.pred_boxes]))
    assert configured.match([out.logits, out.pred_boxes], [t.logits, t.pred_boxes])[0][0].max() < 8


@needs_fashion_mnist
def test_saved_detector_loads_with_pipeline_in_a_fresh_process(scenes, tmp_path):
    from hfdistill.scenes import DETECTION_ID2LABEL

    torch.manual_seed(0)
    model = detection_model("rt_detr", id2label=DETECTION_ID2LABEL, size="tiny")
    folder = tmp_path / "student"
    model.save_pretrained(folder)
    detection_image_processor(model, 96).save_pretrained(folder)
    image = tmp_path / "scene.png"
    scenes[0]["image"].save(image)
    script = textwrap.dedent(f"""
        import json
        from PIL import Image
        from transformers import pipeline
        detector = pipeline("object-detection", model={str(folder)!r})
        print(json.dumps(detector(Image.open({str(image)!r}), threshold=0.0)))
    """)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    assert isinstance(results, list) and results
    names = set(DETECTION_ID2LABEL.values())
    for result in results:
        assert set(result) == {"score", "label", "box"} and result["label"] in names
        assert set(result["box"]) == {"xmin", "ymin", "xmax", "ymax"}
        assert 0 <= result["box"]["xmin"] <= result["box"]["xmax"] <= 128


# ------------------------------------------------------------------------------------ small pieces
def test_objects_class_names_from_the_features():
    import datasets

    from hfdistill.scenes import DETECTION_LABELS, scene_features

    assert objects_class_names(scene_features()["objects"]) == list(DETECTION_LABELS)
    coco_style = datasets.List({"bbox": datasets.List(datasets.Value("float32"), length=4),
                                "category_id": datasets.ClassLabel(names=["cat", "dog"])})
    assert objects_class_names(coco_style) == ["cat", "dog"]
    assert objects_class_names({"bbox": datasets.List(datasets.Value("float32")),
                                "category": datasets.List(datasets.Value("int64"))}) is None


def test_detector_outputs_and_errors():
    logits, boxes = torch.randn(2, 5, 3), torch.rand(2, 5, 4)
    assert detector_outputs({"logits": logits, "pred_boxes": boxes})[0] is logits
    assert detector_outputs(({"loss_ce": 1}, logits, boxes, torch.randn(2, 5, 8)))[1] is boxes
    with pytest.raises(BadInputError):
        detector_outputs((torch.randn(2, 5),))
    with pytest.raises(BadInputError, match="eval_do_concat_batches"):
        detection_map(([torch.zeros(1, 1, 6)], [np.zeros(3)]))
    detections = scored_detections(torch.tensor([[[5.0, -5.0], [-5.0, 4.0]]]),
                                   torch.tensor([[[0.5, 0.5, 0.2, 0.4]] * 2]), "softmax")
    torch.testing.assert_close(detections[0, :, 1], torch.tensor([0.0, 0.0]))  # softmax: the no-object class left out
    torch.testing.assert_close(cxcywh_to_xyxy(torch.tensor([0.5, 0.5, 0.2, 0.4])), torch.tensor([0.4, 0.3, 0.6, 0.7]))


@pytest.mark.parametrize("kind", DETECTION_KINDS)
def test_small_detectors_build_with_resnet18_backbones(kind):
    model = detection_model(kind, num_labels=80, size="small").eval()
    with torch.no_grad():
        out = model(pixel_values=torch.randn(1, 3, 128, 128))
    assert out.logits.shape[:2] == (1, 100)
    backbone = model.config.backbone_config
    assert backbone.model_type == ("rt_detr_resnet" if kind == "rt_detr" else "timm_backbone")


@pytest.mark.parametrize("kind", DETECTION_KINDS)
def test_base_detectors_build_offline(kind):
    model = detection_model(kind, num_labels=80, size="base").eval()
    with torch.no_grad():
        out = model(pixel_values=torch.randn(1, 3, 160, 160))
    assert out.pred_boxes.shape[-1] == 4
    timm_rt = detection_model("rt_detr", num_labels=3, size="tiny", backbone="resnet18")  # timm levels 2..4
    assert timm_rt.config.encoder_in_channels == [128, 256, 512]


def test_a_fresh_detector_gets_the_pretrained_timm_backbone_its_config_asks_for(tmp_path, monkeypatch):
    """transformers 5 builds a timm backbone with random weights even when its config says use_pretrained_backbone;
    a model built from a recipe's config gets timm's pretrained weights (here from a local file, as timm would
    have downloaded them), and offline without them the recipe field is named."""
    import safetensors.torch
    import timm

    from hfdistill.detection import detection_config
    from hfdistill.errors import RecipeError
    from hfdistill.models import load_model
    from hfdistill.recipe import ModelSpec

    torch.manual_seed(0)
    source = timm.create_model("resnet10t", pretrained=False)
    weights = tmp_path / "resnet10t.safetensors"
    safetensors.torch.save_file(source.state_dict(), str(weights))
    config = detection_config("rt_detr", num_labels=3, size="tiny", backbone="resnet10t").to_diff_dict()
    config["backbone_config"]["use_pretrained_backbone"] = True
    for key in ("id2label", "label2id", "transformers_version", "model_type"):
        config.pop(key, None)
    spec = ModelSpec(name="rt_detr", config=config)
    with pytest.raises(RecipeError, match=r"student.config.backbone_config.use_pretrained_backbone.*Hub"):
        load_model(spec, "student", num_labels=3, task="object-detection")

    real_create = timm.create_model

    def create_from_file(name, pretrained=False, **kwargs):  # timm's own loading, from a file instead of the Hub
        if pretrained:
            kwargs["pretrained_cfg_overlay"] = {"file": str(weights)}
        return real_create(name, pretrained=pretrained, **kwargs)

    monkeypatch.setattr(timm, "create_model", create_from_file)
    model = load_model(spec, "student", num_labels=3, task="object-detection").model
    backbone = next(m for m in model.modules() if type(m).__name__ == "TimmBackbone")._backbone
    expected = source.state_dict()
    loaded = backbone.state_dict()
    assert loaded and all(torch.equal(value, expected[key]) for key, value in loaded.items()
                          if not key.endswith("num_batches_tracked"))
    config["backbone_config"]["use_pretrained_backbone"] = False  # asked for none: random, as built
    fresh = load_model(ModelSpec(name="rt_detr", config=config), "student", num_labels=3, task="object-detection")
    other = next(m for m in fresh.model.modules() if type(m).__name__ == "TimmBackbone")._backbone.state_dict()
    assert not torch.equal(other["conv1.0.weight"], expected["conv1.0.weight"])
