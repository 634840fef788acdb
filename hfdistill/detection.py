"""Object detection building blocks: DETR-family detectors from configs, batched COCO-style data, mAP.

Plain functions and classes that ``task: object-detection`` is wired from (the tasks table in
:mod:`hfdistill.tasks`, :func:`hfdistill.data_dense.detection_raw` / :func:`hfdistill.data_dense.detection_data`,
and :func:`hfdistill.run.build_trainer`, which binds :class:`DetectionPredictions` per evaluated model). The wiring,
in words:

- **The tasks table** gets ``Task(name="object-detection", auto_class="AutoModelForObjectDetection",
  pipeline_tag="object-detection", inputs="image", input_columns=IMAGE_COLUMNS, label_columns=OBJECTS_COLUMNS,
  targets="boxes", task_loss="the model's own loss (Hungarian matching, then class + L1 + GIoU box losses)",
  metric="map", compute_metrics=detection_map, ...)``: the student's own loss is the model's (it returns ``loss``
  when given ``labels``), so ``loss`` only has to raise a clear error; ``example_input`` a scene-like image URL.
  ``preprocess_logits`` must know whether the evaluated model's class scores are sigmoids or a softmax with a
  "no object" class, so the trainer binds :meth:`DetectionPredictions.for_model` per evaluated model (student,
  and the teacher when it is evaluated) instead of one function in the table.
- **The data builder** calls :func:`detection_transform` with the student's image processor (``with_transform``
  on each split: flips for training, none for eval) and returns :class:`DetectionCollator` as the collator.
  ``load_raw_data`` keeps the image column and the objects column (:data:`OBJECTS_COLUMNS`; the class names from
  the ``category`` feature's ``ClassLabel``) and, when present, ``image_id``.
- **The Trainer** evaluates with ``eval_do_concat_batches=False`` (the labels are a list of dicts per batch, which
  the Trainer cannot concatenate) and ``preprocess_logits_for_metrics=DetectionPredictions.for_model(model)``
  (so evaluation keeps the top detections of each image, not every output of the detector), and
  ``compute_metrics=detection_map``.

What is here:

- :func:`detection_model` builds a DETR-family detector from a config, offline: RT-DETR
  (``RTDetrForObjectDetection``, the default), Conditional DETR or DETR, in sizes from ``tiny`` (tests, CPU) to
  ``base`` (the papers' settings), with a randomly initialised ResNet backbone (transformers' ResNet for ``tiny``
  and RT-DETR's ``small``/``base``, a timm one otherwise or when ``backbone=`` names one: nothing is downloaded).
  :func:`detection_image_processor` makes the matching image processor, to be saved with the model so that
  ``pipeline("object-detection")`` preprocesses and post-processes like training and evaluation did.
- :func:`detection_transform` / :class:`DetectionTransform`: rows of ``image`` and COCO-style ``objects`` (``bbox``
  ``[x, y, w, h]`` in absolute pixels, ``category``, ``area``) -> ``pixel_values`` (and ``pixel_mask`` where the
  processor makes one) and ``labels`` (``class_labels``, ``boxes`` as normalised ``(cx, cy, w, h)``, plus the sizes
  the metric needs), through the processor's own ``annotations=`` path (it resizes images and boxes together);
  optionally a horizontal flip of image and boxes, drawn per example. :class:`DetectionCollator` pads the images
  of a batch to the largest and keeps ``labels`` a list of dicts, as DETR-family models take them.
- :func:`detection_map` (the Trainer's ``compute_metrics``) and :func:`detection_metrics` (one with options bound):
  COCO mean average precision with torchmetrics' ``MeanAveragePrecision`` (box IoU, pycocotools' protocol),
  ``map`` the headline (greater is better). :class:`DetectionPredictions` is the matching
  ``preprocess_logits_for_metrics`` reduction, :func:`scored_detections` the post-processing maths.

Which detector, and why RT-DETR. All three build offline from configs in transformers 5.24 and train on the CPU.
Measured on the Fashion-MNIST scenes (:mod:`hfdistill.scenes`, 64 training scenes of 128x128 read at 96x96, batch 8,
AdamW with a one-cycle schedule, the ``tiny`` size, one seed, 2 shared CPU cores): after 1500 steps at lr 3e-4,
RT-DETR reached mAP 0.50 (mAP@50 0.91) on its training scenes and 0.073 (0.20) on 64 held-out scenes; Conditional
DETR 0.006 (0.017) and 0.002 (and 0.000 at lr 1e-4), DETR 0.000 and 0.002; after 400 steps at lr 1e-3, RT-DETR
already had 0.15 on the training scenes and the other two 0.001 or less. (64 scenes overfit: a benchmark wants
about a thousand.)
Why: RT-DETR's hybrid encoder reads three feature levels, its queries are picked from the encoder's best-scoring
positions (they start near the objects instead of learning where to look), it denoises noised ground-truth boxes
in training (many more matched targets per image than a scene's few objects), and its varifocal class loss ties
the score to the box quality. Conditional DETR converges several times faster than DETR on COCO (its paper: 6.7x
to 10x fewer epochs) but still starts from learned query positions; DETR needs hundreds of epochs. And for small
data from scratch: DETR and Conditional DETR replace every backbone batch norm with a frozen one and, with
transformers' ResNet backbone, freeze its stem and first stage, which suits a pretrained backbone and not one
trained from scratch (:func:`detection_model` unfreezes the parameters of a model it builds, but the batch norms
stay frozen, and a model reloaded with ``from_pretrained`` freezes those parameters again); RT-DETR keeps
trainable batch norms with ``freeze_backbone_batch_norms=False``, which :func:`detection_model` sets.

RT-DETR's caveat for distillation: in training mode with ``labels`` its ``logits`` and ``pred_boxes`` outputs hold
the denoising queries first (``num_denoising`` of them per group), then the ``num_queries`` real ones; in eval mode
only the real ones. ``detection_logit_kd`` keeps the last ``num_queries`` rows (:func:`real_queries`) by itself.
"""

from __future__ import annotations

import inspect
from types import SimpleNamespace
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .data_dense import _rgb  # noqa: F401 - images as uint8 [H, W, 3], as the segmentation path reads them
from .errors import BadInputError, DistillationError
from .losses.dense import cxcywh_to_xyxy, detector_queries
from .losses.dense import real_queries as _real_queries
from .recipe import BOX_FORMATS  # COCO's [x, y, w, h] or Pascal VOC's [x1, y1, x2, y2], absolute pixels

# ------------------------------------------------------------------------------------ names
DETECTION_KINDS = ("rt_detr", "conditional_detr", "detr")
DEFAULT_KIND = "rt_detr"
SIZES = ("tiny", "small", "base")
# Where detection sets keep their objects (cppe-5, detection-datasets/coco, the scenes: `objects`).
OBJECTS_COLUMNS = ("objects", "annotations")
BBOX_KEYS = ("bbox", "bboxes", "boxes", "box")
CATEGORY_KEYS = ("category", "category_id", "label", "labels", "class", "class_id")
AREA_KEYS = ("area",)
METRIC_KEYS = ("map", "map_50", "map_75", "map_small", "map_medium", "map_large", "mar_1", "mar_10", "mar_100",
               "mar_small", "mar_medium", "mar_large")
SCENES_IMAGE_SIZE = 128  # hfdistill.scenes' canvas

_CLASSES = {
    "rt_detr": ("RTDetrConfig", "RTDetrForObjectDetection", "RTDetrImageProcessor"),
    "conditional_detr": ("ConditionalDetrConfig", "ConditionalDetrForObjectDetection", "ConditionalDetrImageProcessor"),
    "detr": ("DetrConfig", "DetrForObjectDetection", "DetrImageProcessor"),
}
# The transformer's size (shared by the three kinds; RT-DETR's encoder is its one-layer hybrid encoder, whose
# width is d_model). `tiny`: for tests and CPU runs; `small`: an R18-class model (RT-DETR-R18's decoder: 3 layers);
# `base`: each library default (DETR / Conditional DETR R50, RT-DETR R50-vd).
_TRANSFORMER = {
    "tiny": dict(d_model=64, encoder_layers=1, decoder_layers=2, encoder_ffn_dim=128, decoder_ffn_dim=128,
                 encoder_attention_heads=4, decoder_attention_heads=4, num_queries=20),
    "small": dict(d_model=256, encoder_layers=1, decoder_layers=3, encoder_ffn_dim=1024, decoder_ffn_dim=1024,
                  encoder_attention_heads=8, decoder_attention_heads=8, num_queries=100),
    "base": {},
}
_TINY_RESNET = dict(hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1], layer_type="basic")
_SMALL_BACKBONE = "resnet18"  # timm; RT-DETR's `small` uses its own ResNet-18-vd-like config instead
_BASE_BACKBONE = "resnet50"


def _transformers():
    import transformers

    return transformers


def _check_kind(kind: str) -> str:
    if kind not in DETECTION_KINDS:
        raise BadInputError(f"detection model kind must be one of {DETECTION_KINDS}, not {kind!r}")
    return kind


def model_kind(model_or_config: Any) -> str:
    """``rt_detr``, ``conditional_detr`` or ``detr`` for a model or config of those types (another model type: its
    ``model_type``, e.g. ``deformable_detr``)."""
    config = getattr(model_or_config, "config", model_or_config)
    return str(getattr(config, "model_type", "") or "")


def detection_activation(model_or_config: Any) -> str:
    """How a DETR-family model's class logits become scores: ``softmax`` for DETR (and YOLOS), whose last logit is
    "no object"; ``sigmoid`` (one independent probability per class, focal / varifocal loss) for Conditional and
    Deformable DETR, DINO, RT-DETR and the others. RT-DETR with ``use_focal_loss=False`` is a softmax model."""
    config = getattr(model_or_config, "config", model_or_config)
    kind = model_kind(config)
    if kind in ("detr", "yolos", "table-transformer", "table_transformer"):
        return "softmax"
    if getattr(config, "use_focal_loss", True) is False:
        return "softmax"
    return "sigmoid"


# ------------------------------------------------------------------------------------ models
def _id2label(num_labels: int | None, id2label: Mapping[int, str] | None) -> dict[int, str]:
    if id2label:
        labels = {int(k): str(v) for k, v in id2label.items()}
        if sorted(labels) != list(range(len(labels))):
            raise BadInputError(f"id2label must map 0..K-1 to class names, got keys {sorted(labels)[:6]}")
        if num_labels is not None and num_labels != len(labels):
            raise BadInputError(f"num_labels={num_labels} but id2label names {len(labels)} classes")
        return labels
    if num_labels is None or num_labels < 1:
        raise BadInputError("give num_labels (>= 1) or id2label")
    return {i: f"LABEL_{i}" for i in range(int(num_labels))}


def _timm_channels(name: str, out_indices: Sequence[int]) -> list[int]:
    """The channels of a timm model's feature levels ``out_indices`` (built without weights)."""
    import timm

    try:
        model = timm.create_model(name, pretrained=False, features_only=True, out_indices=tuple(out_indices))
    except Exception as exc:  # noqa: BLE001 - an unknown name, a model without features_only
        raise BadInputError(f"timm cannot build {name!r} as a feature backbone ({exc}); name a timm CNN such as "
                            "resnet18, resnet50 or resnet10t") from None
    return list(model.feature_info.channels())


def _timm_backbone(name: str, out_indices: Sequence[int]) -> dict[str, Any]:
    return {"model_type": "timm_backbone", "backbone": name, "num_channels": 3, "features_only": True,
            "use_pretrained_backbone": False, "out_indices": list(out_indices)}


def detection_config(kind: str = DEFAULT_KIND, num_labels: int | None = None,
                     id2label: Mapping[int, str] | None = None, size: str = "tiny", *, backbone: Any = None,
                     **overrides: Any):
    """The config of :func:`detection_model` (same arguments), without building the model."""
    transformers = _transformers()
    kind = _check_kind(kind)
    if size not in SIZES:
        raise BadInputError(f"detection model size must be one of {SIZES}, not {size!r}")
    labels = _id2label(num_labels, id2label)
    config_class = getattr(transformers, _CLASSES[kind][0])
    kwargs: dict[str, Any] = dict(_TRANSFORMER[size])
    if backbone is None:
        backbone = {"tiny": "tiny", "small": "small" if kind == "rt_detr" else _SMALL_BACKBONE,
                    "base": None if kind == "rt_detr" else _BASE_BACKBONE}[size]
    if kind == "rt_detr":
        # A randomly initialised backbone keeps trainable batch norms; three levels (strides 8, 16, 32) feed the
        # hybrid encoder, whose width is d_model.
        kwargs.update(freeze_backbone_batch_norms=False)
        if size == "tiny":
            kwargs.update(num_denoising=20, encoder_hidden_dim=64, decoder_in_channels=[64, 64, 64])
        elif size == "small":
            kwargs.update(encoder_hidden_dim=256, decoder_in_channels=[256, 256, 256])
        if backbone in ("tiny", "small"):
            resnet = (dict(_TINY_RESNET, embedding_size=16) if backbone == "tiny" else
                      dict(hidden_sizes=[64, 128, 256, 512], depths=[2, 2, 2, 2], layer_type="basic",
                           embedding_size=64))
            kwargs["backbone_config"] = transformers.RTDetrResNetConfig(
                **resnet, out_features=["stage2", "stage3", "stage4"])
            kwargs["encoder_in_channels"] = resnet["hidden_sizes"][1:]
        elif isinstance(backbone, str):
            kwargs["backbone_config"] = _timm_backbone(backbone, [2, 3, 4])
            kwargs["encoder_in_channels"] = _timm_channels(backbone, [2, 3, 4])
        elif backbone is not None:
            kwargs["backbone_config"] = backbone
    else:
        if backbone == "tiny":
            kwargs["backbone_config"] = transformers.ResNetConfig(**_TINY_RESNET, embedding_size=16,
                                                                  out_features=["stage4"])
        elif isinstance(backbone, str):
            kwargs["backbone_config"] = _timm_backbone(backbone, [4])
        elif backbone is not None:
            kwargs["backbone_config"] = backbone
    kwargs.update(overrides)
    if kind == "rt_detr" and "d_model" in overrides and "encoder_hidden_dim" not in overrides:
        kwargs["encoder_hidden_dim"] = kwargs["d_model"]
        kwargs["decoder_in_channels"] = [kwargs["d_model"]] * 3
    return config_class(id2label=labels, label2id={v: k for k, v in labels.items()}, **kwargs)


def detection_model(kind: str = DEFAULT_KIND, num_labels: int | None = None,
                    id2label: Mapping[int, str] | None = None, size: str = "tiny", *, backbone: Any = None,
                    **overrides: Any):
    """A DETR-family detector built from a config, randomly initialised, without any download.

    - ``kind``: ``rt_detr`` (default: it learns fastest from small data; see the module docstring),
      ``conditional_detr`` or ``detr``.
    - ``num_labels`` / ``id2label``: the classes (``id2label`` names them; without it they are ``LABEL_<k>``).
    - ``size``: ``tiny`` (d_model 64, one encoder and two decoder layers, 20 queries, a four-stage ResNet of 16..128
      channels: about 0.5M (DETR) to 1.2M (RT-DETR) parameters, for tests and CPU runs), ``small`` (d_model 256, three
      decoder layers, 100 queries, a ResNet-18: the RT-DETR-R18 class) or ``base`` (each library's defaults: DETR /
      Conditional DETR with a ResNet-50, RT-DETR R50-vd).
    - ``backbone``: a timm model name (``resnet18``, ``resnet10t``, ``resnet50``; built by timm with random weights,
      never downloaded), ``"tiny"``/``"small"``, or a backbone config; default: the size's.
    - ``overrides``: any config field (``num_queries``, ``decoder_layers``, ``num_denoising``, ...).

    DETR and Conditional DETR freeze the first stage of a transformers ResNet backbone (they expect pretrained
    weights); here every parameter of the new model is left trainable (the batch norms stay frozen, as they
    build them).
    """
    transformers = _transformers()
    config = detection_config(kind, num_labels, id2label, size, backbone=backbone, **overrides)
    model = getattr(transformers, _CLASSES[kind][1])(config)
    if kind != "rt_detr":
        for parameter in model.parameters():  # a backbone trained from scratch: nothing stays at its random init
            parameter.requires_grad_(True)
    return model


def detection_image_processor(kind_or_model: Any = DEFAULT_KIND, image_size: int | Sequence[int] | None =
                              SCENES_IMAGE_SIZE, *, shortest_edge: int | None = None, longest_edge: int | None = None,
                              **overrides: Any):
    """The image processor of a detector kind (or of a model / config's type), resizing images and boxes to
    ``image_size`` (an int: a square, or ``(height, width)``), or, with ``shortest_edge``/``longest_edge``, keeping
    the aspect ratio (DETR's COCO setting: 800 / 1333) and padding each batch to its largest image (``pixel_mask``
    marks the real pixels). ``image_size=None`` and no edges: the processor's default size. Each processor keeps its
    own normalisation (DETR and Conditional DETR: ImageNet mean and std; RT-DETR: pixels scaled to [0, 1] only).
    Save it with the model (``processor.save_pretrained(folder)``) so that ``pipeline("object-detection")`` reads it.
    """
    transformers = _transformers()
    kind = kind_or_model if isinstance(kind_or_model, str) else model_kind(kind_or_model)
    kind = _check_kind(kind)
    cls = getattr(transformers, _CLASSES[kind][2])
    kwargs: dict[str, Any] = {}
    if shortest_edge is not None or longest_edge is not None:
        kwargs["size"] = {k: int(v) for k, v in (("shortest_edge", shortest_edge), ("longest_edge", longest_edge))
                          if v is not None}
        kwargs["do_pad"] = True
    elif image_size is not None:
        height, width = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        kwargs["size"] = {"height": int(height), "width": int(width)}
        kwargs["do_pad"] = False  # every image already has the same size
    kwargs.update(overrides)
    return cls(**kwargs)


def takes_pixel_mask(model: Any) -> bool:
    """Whether a model's ``forward`` takes ``pixel_mask`` (DETR, Conditional DETR and RT-DETR all do; only DETR and
    Conditional DETR use it: RT-DETR reads padded pixels as pixels)."""
    try:
        return "pixel_mask" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError, AttributeError):
        return False


def real_queries(tensor: torch.Tensor, model_or_config: Any) -> torch.Tensor:
    """The ``num_queries`` real queries of a ``[B, Q', ...]`` output: RT-DETR in training mode puts its denoising
    queries first (``Q' = denoising + num_queries``); otherwise unchanged. (``detection_logit_kd`` does this itself.)"""
    model = model_or_config if hasattr(model_or_config, "config") else SimpleNamespace(config=model_or_config)
    return _real_queries(tensor, detector_queries(model))


# ------------------------------------------------------------------------------------ data
def _pick(keys: Sequence[str], wanted: str | None, candidates: Sequence[str], what: str) -> str | None:
    if wanted is not None:
        if wanted not in keys:
            raise BadInputError(f"the objects have no field {wanted!r} for {what}; their fields: {list(keys)}")
        return wanted
    return next((k for k in candidates if k in keys), None)


def _as_objects(value: Any) -> dict[str, list]:
    """One row's objects as a dict of lists: a ``datasets.Sequence`` of a dict gives that already; a list of
    per-object dicts (COCO's ``annotations``) is turned into it."""
    if isinstance(value, Mapping):
        return {k: list(v) if not isinstance(v, (str, bytes)) else v for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        if not value:
            return {}
        if all(isinstance(v, Mapping) for v in value):
            keys = list(value[0])
            return {k: [v.get(k) for v in value] for k in keys}
    raise BadInputError(f"an objects value must be a dict of lists (bbox, category, ...) or a list of per-object "
                        f"dicts, not {type(value).__name__}")


def objects_class_names(feature: Any, category_key: str | None = None) -> list[str] | None:
    """The class names of an objects column's ``datasets`` feature, when its categories are a ``ClassLabel``: a dict
    of lists (``Sequence({"bbox": ..., "category": ClassLabel})``, the scenes, cppe-5) or a list of per-object dicts
    (``List({"bbox": ..., "category_id": ClassLabel})``); the category field is ``category_key`` or the first of
    :data:`CATEGORY_KEYS` present. None when the categories are plain integers (the names must come from elsewhere:
    the recipe, the teacher's ``id2label``)."""
    import datasets

    inner = getattr(feature, "feature", None)
    fields = feature if isinstance(feature, Mapping) else inner if isinstance(inner, Mapping) else None
    if fields is None:
        return None
    key = category_key if category_key in fields else next((k for k in CATEGORY_KEYS if k in fields), None)
    value = fields.get(key) if key else None
    while value is not None and not isinstance(value, datasets.ClassLabel):
        value = getattr(value, "feature", None)
    return list(value.names) if value is not None else None


def flip_boxes_xywh(boxes: np.ndarray, width: int) -> np.ndarray:
    """COCO ``[x, y, w, h]`` boxes (absolute pixels, ``[N, 4]``) of an image ``width`` pixels wide, flipped
    left-right with it: the box covering ``[x, x + w)`` covers ``[width - x - w, width - x)``."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4).copy()
    boxes[:, 0] = width - boxes[:, 0] - boxes[:, 2]
    return boxes


class DetectionTransform:
    """A batch of rows ``{image column: images, objects column: objects}`` -> ``pixel_values`` (``[B, 3, H, W]``),
    ``pixel_mask`` (when the processor makes one and ``pixel_mask`` is not False) and ``labels``: one dict per image
    with ``class_labels`` (long ``[n]``), ``boxes`` (float ``[n, 4]``: ``(cx, cy, w, h)`` in [0, 1] of the image the
    model reads), and what the processor adds (``size``: the resized image's ``(h, w)``, ``orig_size``: the
    original's, ``area``, ``iscrowd``, ``image_id``), which the metric reads to map boxes back to the original pixels.

    The processor is called with ``images=`` and ``annotations=`` in the ``coco_detection`` format (``[{"image_id",
    "annotations": [{"bbox", "category_id", "area", "iscrowd"}, ...]}]``), so it resizes images and boxes together,
    clips boxes to the image, drops empty ones and normalises them; an image without objects gets empty labels.
    Boxes are read as COCO ``[x, y, w, h]`` (``box_format="xywh"``) or ``[x1, y1, x2, y2]`` (``"xyxy"``, e.g.
    ``detection-datasets/coco``) in absolute pixels; the field names inside the objects are found among
    :data:`BBOX_KEYS`, :data:`CATEGORY_KEYS` and :data:`AREA_KEYS` unless given (no area: ``w * h``).

    ``flip`` (default: ``train``): each image is flipped left-right with its boxes, with probability 1/2, before the
    processor (so a teacher with its own processor sees the same flip). The flip is drawn per image from a seed made
    of the image's content, the epoch and the training seed once :meth:`set_augmentation_epoch` was called (the
    trainer does at every epoch): the same example gets the same flip in the same epoch whatever the batch order or
    the worker; before that, from torch's global random stream. ``teacher_processor``: a teacher whose preprocessing
    differs gets ``teacher_pixel_values`` (and ``teacher_pixel_mask``).
    """

    def __init__(self, processor: Any, train: bool = False, *, flip: bool | None = None, image_column: str = "image",
                 objects_column: str = "objects", bbox_key: str | None = None, category_key: str | None = None,
                 area_key: str | None = None, box_format: str = "xywh", pixel_mask: bool | None = None,
                 teacher_processor: Any = None):
        if box_format not in BOX_FORMATS:
            raise BadInputError(f"box_format must be one of {BOX_FORMATS}, not {box_format!r}")
        self.processor, self.teacher_processor = processor, teacher_processor
        self.train = bool(train)
        self.flip = self.train if flip is None else bool(flip)
        self.image_column, self.objects_column = image_column, objects_column
        self.bbox_key, self.category_key, self.area_key = bbox_key, category_key, area_key
        self.box_format = box_format
        self.pixel_mask = pixel_mask
        self.epoch: int | None = None
        self.seed = 0

    def set_augmentation_epoch(self, epoch: int, seed: int = 0) -> None:
        self.epoch, self.seed = int(epoch), int(seed)

    def flips(self, images: Sequence[np.ndarray]) -> list[bool]:
        """Whether each image is flipped (all False without ``flip``)."""
        if not self.flip:
            return [False] * len(images)
        from .data import reproducible_flips

        return reproducible_flips(images, self.epoch, self.seed)

    def coco_annotations(self, image_id: Any, objects: Any, width: int, flip: bool = False) -> dict[str, Any]:
        """One image's objects in the processor's ``coco_detection`` format (boxes ``[x, y, w, h]``, flipped when
        ``flip`` for an image ``width`` pixels wide)."""
        objects = _as_objects(objects)
        keys = list(objects)
        bbox_key = _pick(keys, self.bbox_key, BBOX_KEYS, "the boxes")
        category_key = _pick(keys, self.category_key, CATEGORY_KEYS, "the categories")
        area_key = _pick(keys, self.area_key, AREA_KEYS, "the areas")
        if objects and (bbox_key is None or category_key is None):
            raise BadInputError(
                f"column {self.objects_column!r} holds objects with the fields {keys}; expected boxes (one of "
                f"{BBOX_KEYS}) and categories (one of {CATEGORY_KEYS}); name them (bbox_key, category_key)")
        raw = objects.get(bbox_key, []) if bbox_key else []
        boxes = np.asarray(raw, dtype=np.float64).reshape(-1, 4) if len(raw) else np.zeros((0, 4))
        if self.box_format == "xyxy":
            boxes = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)
        categories = [int(c) for c in (objects.get(category_key, []) if category_key else [])]
        if len(categories) != len(boxes):
            raise BadInputError(f"an image has {len(boxes)} boxes but {len(categories)} categories")
        areas = objects.get(area_key) if area_key else None
        areas = [float(a) for a in areas] if areas is not None else [float(w * h) for w, h in boxes[:, 2:]]
        crowd = objects.get("iscrowd") or [0] * len(boxes)
        if flip:
            boxes = flip_boxes_xywh(boxes, width)
        return {"image_id": image_id, "annotations": [
            {"bbox": [float(v) for v in box], "category_id": c, "area": a, "iscrowd": int(z)}
            for box, c, a, z in zip(boxes, categories, areas, crowd)]}

    def _process(self, processor: Any, images: list[np.ndarray], annotations: list[dict] | None) -> dict:
        kwargs: dict[str, Any] = {"return_tensors": "pt", "input_data_format": "channels_last"}
        if annotations is not None:
            kwargs["annotations"] = annotations
        out = processor(images=images, **kwargs)
        return dict(out)

    def __call__(self, batch: dict) -> dict:
        images = [_rgb(image) for image in batch[self.image_column]]
        objects = batch[self.objects_column]
        ids = batch.get("image_id") or list(range(len(images)))
        flips = self.flips(images)
        annotations = []
        for i, (image, value, flip) in enumerate(zip(images, objects, flips)):
            annotations.append(self.coco_annotations(int(ids[i]) if _is_int(ids[i]) else i, value, image.shape[1],
                                                     flip))
            if flip:
                images[i] = np.ascontiguousarray(image[:, ::-1])
        out = self._process(self.processor, images, annotations)
        result: dict[str, Any] = {"pixel_values": out["pixel_values"], "labels": list(out["labels"])}
        if "pixel_mask" in out and self.pixel_mask is not False:
            result["pixel_mask"] = out["pixel_mask"]
        if self.teacher_processor is not None:
            teacher = self._process(self.teacher_processor, images, None)
            result["teacher_pixel_values"] = teacher["pixel_values"]
            if "pixel_mask" in teacher and self.pixel_mask is not False:
                result["teacher_pixel_mask"] = teacher["pixel_mask"]
        return result


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def detection_transform(processor: Any, train: bool = False, **kwargs: Any) -> DetectionTransform:
    """The batched ``set_transform``/``with_transform`` function of a detection split (see
    :class:`DetectionTransform`; ``kwargs``: ``flip``, ``image_column``, ``objects_column``, ``bbox_key``,
    ``category_key``, ``area_key``, ``box_format``, ``pixel_mask``, ``teacher_processor``)."""
    return DetectionTransform(processor, train, **kwargs)


class DetectionCollator:
    """Examples of :class:`DetectionTransform` -> a batch: ``pixel_values`` zero-padded at the bottom and right to
    the batch's largest image, ``pixel_mask`` (1 on real pixels) padded with 0, and ``labels`` kept a list of dicts
    of tensors (``class_labels`` long ``[n]``, ``boxes`` float ``[n, 4]``, ...), as DETR-family models take them.

    Boxes are normalised to the image the model reads; when an image is padded here, its boxes are rescaled to stay
    on the same pixels, and each label gets ``canvas_size``: the ``(height, width)`` of the padded batch its boxes
    (and the model's predictions) are relative to, which the metric reads. ``pixel_mask``: None (default) keeps it
    when the examples have one; True always gives one (ones where the examples have none); False drops it.
    The same for ``teacher_pixel_values``/``teacher_pixel_mask``.
    """

    def __init__(self, pixel_mask: bool | None = None):
        self.pixel_mask = pixel_mask

    @staticmethod
    def _pad(values: list[torch.Tensor], height: int, width: int, fill: float = 0.0) -> torch.Tensor:
        return torch.stack([F.pad(v, (0, width - v.shape[-1], 0, height - v.shape[-2]), value=fill)
                            if tuple(v.shape[-2:]) != (height, width) else v for v in values])

    def _images(self, examples: list[dict], key: str, mask_key: str, batch: dict) -> list[tuple[int, int]]:
        values = [torch.as_tensor(e[key]) for e in examples]
        sizes = [tuple(v.shape[-2:]) for v in values]
        height, width = max(s[0] for s in sizes), max(s[1] for s in sizes)
        batch[key] = self._pad(values, height, width)
        has_mask = mask_key in examples[0]
        if self.pixel_mask if self.pixel_mask is not None else has_mask:
            masks = [torch.as_tensor(e[mask_key]) if has_mask else torch.ones(s, dtype=torch.long)
                     for e, s in zip(examples, sizes)]
            batch[mask_key] = self._pad(masks, height, width).long()
        return sizes

    def __call__(self, examples: list[dict]) -> dict:
        batch: dict[str, Any] = {}
        sizes = self._images(examples, "pixel_values", "pixel_mask", batch)
        height, width = batch["pixel_values"].shape[-2:]
        if "teacher_pixel_values" in examples[0]:
            self._images(examples, "teacher_pixel_values", "teacher_pixel_mask", batch)
        labels = []
        for example, (h, w) in zip(examples, sizes):
            label = {k: torch.as_tensor(v) for k, v in example["labels"].items()}
            label["class_labels"] = label["class_labels"].long().reshape(-1)
            boxes = label["boxes"].float().reshape(-1, 4)
            if (h, w) != (height, width):
                boxes = boxes * boxes.new_tensor([w / width, h / height, w / width, h / height])
            label["boxes"] = boxes
            label["canvas_size"] = torch.tensor([int(height), int(width)])
            labels.append(label)
        batch["labels"] = labels
        for key in examples[0]:
            if key not in batch and key not in ("pixel_mask", "teacher_pixel_mask"):
                values = [e[key] for e in examples]
                batch[key] = torch.stack([torch.as_tensor(v) for v in values]) if isinstance(values[0], torch.Tensor) \
                    else torch.as_tensor(np.asarray(values))
        return batch


# ------------------------------------------------------------------------------------ predictions
def detector_outputs(outputs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits [B, Q, K], pred_boxes [B, Q, 4])`` of a DETR-family model's outputs: a model output or dict with
    ``logits`` and ``pred_boxes``, a ``(logits, pred_boxes)`` pair, or the tuple the Trainer's ``prediction_step``
    makes (the outputs without the loss: ``loss_dict``, ``logits``, ``pred_boxes``, ...; the first consecutive
    ``[B, Q, K]``, ``[B, Q, 4]`` pair of tensors)."""
    if isinstance(outputs, Mapping) or hasattr(outputs, "pred_boxes"):
        get = outputs.get if isinstance(outputs, Mapping) else (lambda k: getattr(outputs, k, None))
        logits, boxes = get("logits"), get("pred_boxes")
        if isinstance(logits, torch.Tensor) and isinstance(boxes, torch.Tensor):
            return logits, boxes
    if isinstance(outputs, (list, tuple)):
        items = list(outputs)
        for a, b in zip(items, items[1:]):
            if (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dim() == 3 and b.dim() == 3
                    and b.shape[-1] == 4 and a.shape[:2] == b.shape[:2]):
                return a, b
    raise DistillationError("expected a DETR-family detector's outputs (logits [B, Q, K] and pred_boxes [B, Q, 4]), "
                            f"got {type(outputs).__name__}; is the model an object detection model?")


def scored_detections(logits: torch.Tensor, pred_boxes: torch.Tensor, activation: str = "sigmoid",
                      top_k: int = 100) -> torch.Tensor:
    """The scored detections of each image, ``[B, k, 6]``: ``(score, label, x1, y1, x2, y2)``, boxes normalised to
    the model's input, best first; the maths of the processors' ``post_process_object_detection``:

    - ``softmax`` (DETR): per query, the best class of ``softmax(logits)`` without the last ("no object") class;
      one detection per query, ``k = min(top_k, Q)``;
    - ``sigmoid`` (Conditional DETR, RT-DETR, ...): the ``k = min(top_k, Q * K)`` best (query, class) pairs of
      ``sigmoid(logits)`` (a query may give several classes), as Conditional DETR's ``top_k`` and RT-DETR's
      ``use_focal_loss`` post-processing do.

    COCO's evaluation keeps the best 100 detections per image, so ``top_k=100`` loses nothing it would count.
    """
    if activation not in ("sigmoid", "softmax"):
        raise BadInputError(f"activation must be sigmoid or softmax, not {activation!r}")
    logits, pred_boxes = logits.float(), pred_boxes.float()
    batch, queries, classes = logits.shape
    boxes = cxcywh_to_xyxy(pred_boxes)  # [B, Q, 4]
    if activation == "softmax":
        scores, labels = F.softmax(logits, -1)[..., :-1].max(-1)  # [B, Q]
        k = min(int(top_k), queries)
        scores, index = scores.topk(k, dim=1)
        labels = labels.gather(1, index)
    else:
        k = min(int(top_k), queries * classes)
        scores, flat = torch.sigmoid(logits).flatten(1).topk(k, dim=1)  # [B, k]
        index, labels = flat // classes, flat % classes
    boxes = boxes.gather(1, index[..., None].expand(-1, -1, 4))
    return torch.cat([scores[..., None], labels[..., None].float(), boxes], dim=-1)


class DetectionPredictions:
    """The Trainer's ``preprocess_logits_for_metrics`` for a detector: its outputs (whatever ``prediction_step``
    passes) -> :func:`scored_detections` ``[B, k, 6]``, so evaluation holds ``k`` rows of 6 numbers per image instead
    of every output (the decoder's hidden states, the encoder's feature map, auxiliary outputs). ``activation`` must
    be the evaluated model's (:func:`detection_activation`); :meth:`for_model` reads it."""

    def __init__(self, activation: str = "sigmoid", top_k: int = 100):
        if activation not in ("sigmoid", "softmax"):
            raise BadInputError(f"activation must be sigmoid or softmax, not {activation!r}")
        self.activation, self.top_k = activation, int(top_k)

    @classmethod
    def for_model(cls, model: Any, top_k: int = 100) -> "DetectionPredictions":
        return cls(detection_activation(model), top_k)

    def __call__(self, outputs: Any, labels: Any = None) -> torch.Tensor:
        logits, boxes = detector_outputs(outputs)
        return scored_detections(logits, boxes, self.activation, self.top_k)


# ------------------------------------------------------------------------------------ the metric
def _numpy(value: Any) -> np.ndarray:
    return value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)


def _flat_labels(label_ids: Any) -> list[Mapping[str, Any]]:
    """Label dicts, one per image, from a flat list or from per-batch lists (``eval_do_concat_batches=False``)."""
    if isinstance(label_ids, Mapping):
        return [label_ids]
    flat: list[Mapping[str, Any]] = []
    for item in label_ids:
        if isinstance(item, Mapping):
            flat.append(item)
        elif isinstance(item, (list, tuple)):
            flat.extend(_flat_labels(item))
        else:
            raise BadInputError("detection labels must be dicts (class_labels, boxes, ...) per image, or lists of "
                                f"them per batch, not {type(item).__name__}; evaluate with "
                                "eval_do_concat_batches=False")
    return flat


def _prediction_batches(predictions: Any) -> list[Any]:
    """Per-batch predictions: ``[B, k, 6]`` detections arrays, or ``(logits, pred_boxes, ...)`` tuples."""
    if isinstance(predictions, (np.ndarray, torch.Tensor)):
        return [predictions]
    items = list(predictions)
    if items and all(isinstance(p, (np.ndarray, torch.Tensor)) for p in items) and _is_raw_pair(items):
        return [tuple(items)]  # one batch of raw outputs, concatenated
    return items


def _is_raw_pair(items: list) -> bool:
    return (len(items) >= 2 and np.ndim(items[0]) == 3 and np.ndim(items[1]) == 3 and np.shape(items[1])[-1] == 4
            and np.shape(items[0])[:2] == np.shape(items[1])[:2])


def _scale(label: Mapping[str, Any]) -> tuple[np.ndarray, float]:
    """``[sx, sy, sx, sy]`` taking boxes normalised to the model's input to the original image's pixels, and the
    factor taking the processor's (resized) areas to original pixels."""
    orig = _numpy(label["orig_size"]).astype(np.float64).reshape(-1) if "orig_size" in label else None
    size = _numpy(label["size"]).astype(np.float64).reshape(-1) if "size" in label else None
    canvas = _numpy(label["canvas_size"]).astype(np.float64).reshape(-1) if "canvas_size" in label else size
    if orig is None:
        raise BadInputError("detection labels need `orig_size` (the original image's height and width), which the "
                            "image processor adds when it is given annotations")
    if size is None:
        size = canvas = orig
    # normalised -> the model input's pixels (canvas) -> the resized image's pixels are the same -> original pixels
    sy, sx = canvas[0] * orig[0] / size[0], canvas[1] * orig[1] / size[1]
    area = orig[0] * orig[1] / (size[0] * size[1])
    return np.array([sx, sy, sx, sy]), area


def detection_targets(label: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """One image's label dict -> torchmetrics' target: ``boxes`` absolute ``xyxy`` in the original image's pixels,
    ``labels``, and ``area`` (original pixels) and ``iscrowd`` when the label has them."""
    scale, area_scale = _scale(label)
    boxes = torch.as_tensor(_numpy(label["boxes"]), dtype=torch.float64).reshape(-1, 4)
    target = {"boxes": (cxcywh_to_xyxy(boxes) * torch.as_tensor(scale)).float(),
              "labels": torch.as_tensor(_numpy(label["class_labels"])).long().reshape(-1)}
    if "area" in label and len(_numpy(label["area"]).reshape(-1)) == len(boxes):
        target["area"] = torch.as_tensor(_numpy(label["area"]) * area_scale, dtype=torch.float32).reshape(-1)
    if "iscrowd" in label and len(_numpy(label["iscrowd"]).reshape(-1)) == len(boxes):
        target["iscrowd"] = torch.as_tensor(_numpy(label["iscrowd"])).long().reshape(-1)
    return target


def detection_preds(detections: Any, label: Mapping[str, Any], threshold: float = 0.0) -> dict[str, torch.Tensor]:
    """One image's ``[k, 6]`` scored detections (normalised ``xyxy``) -> torchmetrics' prediction: ``boxes`` absolute
    ``xyxy`` in the original image's pixels, ``scores``, ``labels``; scores below ``threshold`` left out."""
    scale, _ = _scale(label)
    rows = torch.as_tensor(_numpy(detections), dtype=torch.float64).reshape(-1, 6)
    rows = rows[rows[:, 0] >= threshold] if threshold > 0 else rows
    return {"boxes": (rows[:, 2:] * torch.as_tensor(scale)).float(), "scores": rows[:, 0].float(),
            "labels": rows[:, 1].round().long()}


def detection_map(eval_pred: Any, *, activation: str | None = None, top_k: int = 100, threshold: float = 0.0,
                  class_metrics: bool = False, id2label: Mapping[int, str] | None = None) -> dict[str, float]:
    """COCO mean average precision of a detector over the eval set, with torchmetrics' ``MeanAveragePrecision``
    (box IoU; pycocotools' protocol: IoU thresholds 0.50:0.05:0.95, 101 recall points, at most 100 detections per
    image, areas small < 32^2 <= medium < 96^2 <= large in the original image's pixels).

    ``eval_pred``: an ``EvalPrediction`` (or ``(predictions, label_ids)``) whose

    - ``predictions`` are :class:`DetectionPredictions`' ``[B, k, 6]`` arrays, one per batch (Trainer
      ``eval_do_concat_batches=False``) or concatenated; or the raw outputs per batch (a tuple holding ``logits`` and
      ``pred_boxes``: then ``activation``, the model's :func:`detection_activation`, is required);
    - ``label_ids`` are the label dicts of :class:`DetectionTransform` / :class:`DetectionCollator`, per batch or flat,
      in the same order.

    Predicted boxes and targets are mapped to the original image's pixels (``orig_size``, ``size`` and
    ``canvas_size`` of each label), targets keep their COCO ``area`` (rescaled) for the area ranges.

    Returns ``map`` (the headline: mAP@[.50:.95], greater is better), ``map_50``, ``map_75``, ``map_small``,
    ``map_medium``, ``map_large``, ``mar_1``, ``mar_10``, ``mar_100``, ``mar_small``, ``mar_medium``, ``mar_large``
    (``-1`` where the eval set has no object of that area, COCO's convention); with ``class_metrics`` also
    ``map_<class name>`` per class present.
    """
    from torchmetrics.detection import MeanAveragePrecision

    predictions = eval_pred.predictions if hasattr(eval_pred, "predictions") else eval_pred[0]
    label_ids = eval_pred.label_ids if hasattr(eval_pred, "label_ids") else eval_pred[1]
    labels = _flat_labels(label_ids)
    detections: list[np.ndarray] = []
    for batch in _prediction_batches(predictions):
        if isinstance(batch, (tuple, list)) or (isinstance(batch, Mapping)):
            if activation is None:
                raise BadInputError("detection_map got the detector's raw outputs (logits, pred_boxes): give the "
                                    "model's activation (detection_activation(model)), or reduce them with "
                                    "DetectionPredictions.for_model(model) as preprocess_logits_for_metrics")
            logits, boxes = detector_outputs(tuple(torch.as_tensor(_numpy(v)) if not isinstance(v, Mapping) else v
                                                   for v in (batch.values() if isinstance(batch, Mapping) else batch)))
            batch = scored_detections(logits, boxes, activation, top_k).numpy()
        batch = _numpy(batch)
        if batch.ndim != 3 or batch.shape[-1] != 6:
            raise BadInputError(f"detection predictions must be [B, k, 6] scored detections per batch, got shape "
                                f"{batch.shape}")
        detections.extend(batch)
    if len(detections) != len(labels):
        raise BadInputError(f"{len(detections)} images' predictions for {len(labels)} images' labels")
    metric = MeanAveragePrecision(box_format="xyxy", iou_type="bbox", class_metrics=class_metrics)
    metric.update([detection_preds(d, l, threshold) for d, l in zip(detections, labels)],
                  [detection_targets(l) for l in labels])
    computed = metric.compute()
    result = {key: float(computed[key]) for key in METRIC_KEYS if key in computed}
    if class_metrics and "map_per_class" in computed:
        classes = computed["classes"].reshape(-1).tolist()
        values = computed["map_per_class"].reshape(-1).tolist()
        for c, value in zip(classes, values):
            name = id2label.get(int(c), str(c)) if id2label else str(c)
            result[f"map_{name}"] = float(value)
    return result


def detection_metrics(activation: str | None = None, *, top_k: int = 100, threshold: float = 0.0,
                      class_metrics: bool = False, id2label: Mapping[int, str] | None = None
                      ) -> Callable[[Any], dict[str, float]]:
    """A ``compute_metrics`` function: :func:`detection_map` with these options bound (``activation`` only matters
    when the predictions are the raw outputs; with :class:`DetectionPredictions` they are scored already)."""

    def compute_metrics(eval_pred: Any) -> dict[str, float]:
        return detection_map(eval_pred, activation=activation, top_k=top_k, threshold=threshold,
                             class_metrics=class_metrics, id2label=id2label)

    return compute_metrics
