"""Dense-prediction data: images with their segmentation maps -> what a semantic segmentation model reads.

The data builder of ``task: semantic-segmentation`` (:func:`segmentation_data`, in the tasks table of
:mod:`hfdistill.tasks`) and what :func:`hfdistill.data.load_raw_data` calls for that task:

- :func:`segmentation_raw`: the image column (``image``, ...) and the map column (``annotation``, ``label``,
  ``segmentation``, ``semantic_map``, ``mask``; or ``data.image_column`` / ``data.label_column``) of any source
  ``load_raw_data`` reads (a Hub id, local files, a folder written by ``save_to_disk``, a ``DatasetDict`` from
  Python, the built-in ``fashion-mnist-scenes``), and the class names: ``data.label_names``, the dataset's own
  (a ``ClassLabel`` inside the map column's feature), an ``id2label.json`` beside a saved dataset, else (in
  :func:`complete_label_names`, once the recipe's models are known) a segmentation model's ``id2label``, else
  the classes found in the maps.
- :func:`segmentation_data`: batched transforms (``with_transform`` on whole batches) that resize each image and
  its map together with the student's own image processor (the processors take ``segmentation_maps=``: bilinear
  for the image, nearest for the map), optionally flip both (``data.augment: flip``), and give the teacher its
  own ``teacher_pixel_values`` when its processor differs (another size or normalisation); a collator that pads
  to the batch's largest image (labels padded with 255, ignored).

A map holds one class index per pixel (an ``L``, ``P`` or ``I`` image, or an integer array): class ``k`` is
``k``, 255 is "no label" (ignored by the loss and the metric). With ``reduce_labels`` (``data.reduce_labels``,
default: the student processor's ``do_reduce_labels``) the maps are stored ADE20K's way: 0 is "no label" and
class ``k`` is ``k + 1``; they are mapped to the convention above before anything else.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .data import (RawData, TaskData, _limit, _match_channels, _pick_column, _to_uint8_tensor, is_saved_dataset,
                   reproducible_flips)
from .errors import BadInputError, RecipeError
from .models import LoadedModel
from .recipe import DataSpec
from .tasks import IGNORE_INDEX

logger = logging.getLogger(__name__)

SEGMENTATION_AUGMENTATIONS = ("none", "flip")
SCENES_OPTIONS = ("num_train", "num_test", "canvas", "items", "scale", "background", "tint", "min_visible", "seed")
SCENES_NOTE = ("The data are synthetic scenes composed from real Fashion-MNIST items (hfdistill.scenes): a few items "
               "placed on a canvas, their masks derived from the item pixels. It is not a real segmentation benchmark; "
               "these numbers are not comparable with ADE20K, Cityscapes or any published result.")
DETECTION_SCENES_NOTE = ("The data are synthetic scenes composed from real Fashion-MNIST items (hfdistill.scenes): a "
                         "few items placed on a canvas, their boxes those of the visible item pixels. It is not a real "
                         "detection benchmark; these numbers are not comparable with COCO or any published result.")
DETECTION_AUGMENTATIONS = ("none", "flip")
ID2LABEL_FILE = "id2label.json"
CHECK_ROWS = 16  # rows of each split whose maps are checked when the data is built (the transforms check every batch)


# ------------------------------------------------------------------------------------ sources
def scenes_source(spec: DataSpec):
    """The built-in ``fashion-mnist-scenes`` source: a ``DatasetDict`` of :func:`hfdistill.scenes.fashion_mnist_scenes`
    (``train`` from Fashion-MNIST's train items, ``validation`` from its test items), options from ``data.options``:
    ``num_train`` (default 1000), ``num_test`` (200), ``canvas``, ``items``, ``scale``, ``background``, ``tint``,
    ``min_visible``, ``seed``; ``data.data_dir`` the folder of Fashion-MNIST's idx files."""
    from .scenes import fashion_mnist_scenes_dict

    options = dict(spec.options)
    unknown = sorted(set(options) - set(SCENES_OPTIONS))
    if unknown:
        raise RecipeError("data.options", f"fashion-mnist-scenes has no option(s) {unknown}; its options: "
                          f"{', '.join(SCENES_OPTIONS)}")
    for key in ("items", "scale"):
        if isinstance(options.get(key), list):
            options[key] = tuple(options[key])
    try:
        return fashion_mnist_scenes_dict(data_dir=spec.data_dir, **options)
    except RecipeError:
        raise
    except (BadInputError, TypeError) as exc:
        raise RecipeError("data.options", str(exc)) from None


# ------------------------------------------------------------------------------------ raw splits
def _class_names_in(feature: Any) -> list[str] | None:
    """The names of a ``ClassLabel`` inside a (nested) feature, if there is one."""
    import datasets

    while feature is not None:
        if isinstance(feature, datasets.ClassLabel):
            return list(feature.names)
        feature = getattr(feature, "feature", None) if not isinstance(feature, (list, tuple)) else (feature[0] if feature else None)
    return None


def _check_map_feature(feature: Any, column: str) -> None:
    """A map column holds images or nested lists/arrays of integers, not one class per example."""
    import datasets

    if isinstance(feature, (datasets.ClassLabel, datasets.Value)):
        raise RecipeError(
            "data.label_column",
            f"column {column!r} holds one {'class' if isinstance(feature, datasets.ClassLabel) else 'value'} per "
            f"image ({feature}), not a segmentation map; set `data.label_column` to the column holding the maps (an "
            "image, or an integer array, of one class index per pixel), or use task: image-classification",
        )


def _id2label_file(spec: DataSpec, dataset: Any) -> list[str] | None:
    """Class names from an ``id2label.json`` (``{"0": "background", ...}``) in a saved dataset's folder."""
    folders = [spec.data_dir if spec.name == "disk" else spec.name]
    for folder in folders:
        path = os.path.join(folder, ID2LABEL_FILE) if folder and is_saved_dataset(folder) else None
        if path is None or not os.path.isfile(path):
            continue
        try:
            with open(path, encoding="utf-8") as f:
                mapping = json.load(f)
            names = [str(mapping[str(i)] if str(i) in mapping else mapping[i]) for i in range(len(mapping))]
        except (OSError, ValueError, KeyError, TypeError):
            raise RecipeError("data.data_dir", f"{path} is not an id2label map {{\"0\": name, \"1\": name, ...}} of "
                              "consecutive class indices") from None
        return names
    return None


def _image_and_target_columns(spec: DataSpec, train: Any, evaluation: Any, info: Any, what: str) -> tuple[str, str]:
    """The image column and the target column (``what``: the maps, the objects) of both splits, picked as the
    module docstring says, or the RecipeError naming the field to set."""
    columns = train.column_names
    image_column = _pick_column(columns, spec.image_column, info.input_columns, "image_column", "the images")
    candidates = [c for c in info.label_columns if c != image_column]
    target_column = _pick_column(columns, spec.label_column, candidates, "label_column", what)
    if target_column == image_column:
        raise RecipeError("data.label_column", f"is the image column {image_column!r}; name the column of {what}")
    for column in (image_column, target_column):
        if column not in evaluation.column_names:
            raise RecipeError("data.eval_split", f"the eval split has no column {column!r}; its columns: "
                              f"{evaluation.column_names}")
    return image_column, target_column


def segmentation_raw(spec: DataSpec, train: Any, evaluation: Any, info: Any, seed: int, dataset: Any = None) -> RawData:
    """Train and eval splits of images and segmentation maps (columns picked as the module docstring says), with
    the class names when the data or the recipe say them (empty otherwise: :func:`complete_label_names`)."""
    image_column, map_column = _image_and_target_columns(spec, train, evaluation, info, "the segmentation maps")
    _check_map_feature(train.features[map_column], map_column)
    note = None
    if spec.label_names is not None:
        names = [str(n) for n in spec.label_names]
    elif spec.name == "fashion-mnist-scenes" and dataset is not None:
        from .scenes import SEGMENTATION_LABELS

        names = list(SEGMENTATION_LABELS)
    else:
        names = _class_names_in(train.features[map_column]) or _id2label_file(spec, dataset) or []
    if spec.name == "fashion-mnist-scenes":
        note = SCENES_NOTE
    train = train.select_columns([image_column, map_column])
    evaluation = evaluation.select_columns([image_column, map_column])
    train = _limit(train, spec.max_train_samples, seed)
    evaluation = _limit(evaluation, spec.max_eval_samples, seed)
    return RawData(train, evaluation, names, image_column, map_column, default_augment="flip",
                   reduce_labels=spec.reduce_labels, note=note)


def detection_raw(spec: DataSpec, train: Any, evaluation: Any, info: Any, seed: int, dataset: Any = None) -> RawData:
    """Train and eval splits of images and their COCO-style objects (``objects``/``annotations``, or
    ``data.label_column``), with ``image_id`` when present; the class names from ``data.label_names``, else the
    objects' ``category`` ``ClassLabel``, else (the built-in scenes) :data:`hfdistill.scenes.DETECTION_ID2LABEL`."""
    from .detection import objects_class_names

    image_column, objects_column = _image_and_target_columns(spec, train, evaluation, info, "the objects (boxes)")
    if spec.label_names is not None:
        names = [str(n) for n in spec.label_names]
    else:
        names = objects_class_names(train.features[objects_column]) or []
        if not names and spec.name == "fashion-mnist-scenes":
            from .scenes import DETECTION_ID2LABEL

            names = [DETECTION_ID2LABEL[i] for i in range(len(DETECTION_ID2LABEL))]
    if not names:
        raise RecipeError("data.label_names", f"the objects of column {objects_column!r} carry no class names (no "
                          "ClassLabel); give `data.label_names` (every class, in index order)")
    note = DETECTION_SCENES_NOTE if spec.name == "fashion-mnist-scenes" else None
    keep = [image_column, objects_column] + (["image_id"] if "image_id" in train.column_names and "image_id" in
                                             evaluation.column_names else [])
    train = _limit(train.select_columns(keep), spec.max_train_samples, seed)
    evaluation = _limit(evaluation.select_columns(keep), spec.max_eval_samples, seed)
    return RawData(train, evaluation, names, image_column, objects_column, default_augment="flip", note=note,
                   box_format=spec.box_format or "xywh")


def _model_label_names(recipe: Any) -> tuple[list[str], str] | None:
    """The ``id2label`` of the first of the recipe's teacher and student that is a trained segmentation model (a
    folder or Hub id whose config names a ``...ForSemanticSegmentation`` architecture and real labels)."""
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from .models import _real_labels, resolve_model_name

    for role in ("teacher", "student"):
        spec = getattr(recipe, role, None)
        if spec is None or spec.name is None or spec.cache is not None:
            continue
        try:
            name = resolve_model_name(spec, role)
        except RecipeError:
            continue
        if spec.config is not None and name in CONFIG_MAPPING and not os.path.isdir(name):
            continue  # built from a config: no labels of its own
        if role == "teacher" and spec.train_from is not None and not os.path.isdir(name):
            continue  # trained first, on these very data
        try:
            config = AutoConfig.from_pretrained(name, revision=spec.revision)
        except Exception:  # noqa: BLE001 - not loadable (offline, missing): loading the model says why, later
            continue
        architectures = getattr(config, "architectures", None) or []
        labels = _real_labels({int(k): v for k, v in (getattr(config, "id2label", None) or {}).items()})
        if labels and any(str(a).endswith("ForSemanticSegmentation") for a in architectures):
            return [str(labels[i]) for i in range(len(labels))], f"{role} {spec.name!r}"
    return None


def complete_label_names(raw: RawData, recipe: Any) -> None:
    """Class names for segmentation data that named none (``raw.label_names`` empty): a trained segmentation
    model's ``id2label`` (the teacher's, else the student's), else ``"0"..."K-1"`` for the K classes found in the
    first maps of the training split (with a warning: set ``data.label_names``)."""
    if raw.label_names:
        return
    found = _model_label_names(recipe)
    if found is not None:
        raw.label_names, source = found
        logger.info(f"Segmentation classes: the {len(raw.label_names)} labels of the {source} (id2label).")
        return
    largest = -1
    rows = raw.train.select(range(min(len(raw.train), 256)))
    for value in rows[raw.label_column]:
        values = _map_array(value, raw.label_column)
        values = values[values != IGNORE_INDEX]
        if raw.reduce_labels:
            values = values[values != 0] - 1
        if values.size:
            largest = max(largest, int(values.max()))
    if largest < 1:
        raise RecipeError("data.label_names", "the maps carry no class names and the first maps hold fewer than two "
                          "classes; give `data.label_names` (every class, in index order)")
    raw.label_names = [str(i) for i in range(largest + 1)]
    logger.warning(f"The segmentation maps carry no class names: using {largest + 1} classes named 0..{largest}, the "
                   f"largest class index in the first {len(rows)} training maps. Set `data.label_names` to name them "
                   "(and to count a class those maps lack).")


# ------------------------------------------------------------------------------------ one example
def _rgb(image: Any) -> np.ndarray:
    """An image (PIL, array, tensor; gray, RGB or RGBA) as uint8 ``[H, W, 3]``."""
    t = _to_uint8_tensor(image, 3)  # [C, H, W]
    t = _match_channels(t[None], 3)[0] if t.shape[0] != 3 else t
    return np.ascontiguousarray(t.permute(1, 2, 0).numpy())


def _map_array(value: Any, column: str) -> np.ndarray:
    """A segmentation map (PIL ``L``/``P``/``I`` image, integer array or nested list) as int64 ``[H, W]``."""
    from PIL import Image

    if isinstance(value, Image.Image):
        if value.mode in ("RGB", "RGBA", "LA", "CMYK", "YCbCr", "HSV"):
            raise RecipeError(
                "data.label_column",
                f"column {column!r} holds {value.mode} images; a segmentation map is one class index per pixel (an L, "
                "P or I image, or an integer array), not a colour picture; convert the colours to class indices first",
            )
        array = np.asarray(value)
    else:
        array = np.asarray(value.numpy() if isinstance(value, torch.Tensor) else value)
    if array.ndim == 3 and array.shape[-1] == 1:  # [H, W, 1]
        array = array[..., 0]
    elif array.ndim == 3 and array.shape[0] == 1:  # [1, H, W]
        array = array[0]
    if array.ndim != 2:
        raise RecipeError("data.label_column", f"column {column!r} holds arrays of shape {array.shape}; a segmentation "
                          "map is [height, width] of class indices")
    if array.dtype.kind == "f":
        if not np.all(np.isfinite(array)) or not np.all(array == np.round(array)):
            raise RecipeError("data.label_column", f"column {column!r} holds non-integer values; a segmentation map "
                              "holds class indices")
    elif array.dtype.kind not in "iub":
        raise RecipeError("data.label_column", f"column {column!r} holds {array.dtype} values, not class indices")
    return array.astype(np.int64)


def reduce_map(values: np.ndarray) -> np.ndarray:
    """ADE20K's convention -> ours: 0 ("no label") becomes 255, class k + 1 becomes k (255 stays 255)."""
    return np.where((values == 0) | (values == IGNORE_INDEX), IGNORE_INDEX, values - 1)


def check_map(values: np.ndarray, label_names: Sequence[str], where: str) -> None:
    """Every value of a (reduced) map is a class index ``0..K-1`` or 255; a RecipeError naming the fix otherwise."""
    bad = values[(values != IGNORE_INDEX) & ((values < 0) | (values >= len(label_names)))]
    if bad.size:
        k = len(label_names)
        shown = ", ".join(label_names[:4]) + (", ..." if k > 4 else "")
        raise RecipeError(
            "data.label_names",
            f"{where} holds class {int(bad.max() if bad.max() >= k else bad.min())}, but the data has {k} classes "
            f"({shown}): a map holds class indices 0..{k - 1} ({IGNORE_INDEX}: no label). Give `data.label_names` "
            "every class in index order, or set `data.reduce_labels: true` when 0 means no label and the classes "
            "start at 1",
        )


# ------------------------------------------------------------------------------------ processors
_NOT_PREPROCESSING = ("do_reduce_labels", "reduce_labels", "processor_class", "image_processor_type", "_processor_class")


def same_preprocessing(a: Any, b: Any) -> bool:
    """Whether two image processors turn an image into the same ``pixel_values`` (their label options aside)."""
    if a is b:
        return True
    if type(a) is not type(b):
        return False

    def settings(processor: Any) -> dict:
        return {k: v for k, v in processor.to_dict().items() if k not in _NOT_PREPROCESSING}

    return settings(a) == settings(b)


def _takes_maps(processor: Any) -> bool:
    try:
        return "segmentation_maps" in inspect.signature(processor.preprocess).parameters
    except (TypeError, ValueError, AttributeError):
        return False


def process(processor: Any, images: list[np.ndarray], maps: list[np.ndarray] | None = None) -> dict:
    """``pixel_values`` (and ``labels`` of ``maps``) of a batch by an image processor: each image resized (and
    normalised) as the model expects, each map resized with it (nearest neighbour), by the processor itself when it
    takes ``segmentation_maps`` (SegFormer's, BEiT's, DPT's, ...) and the maps fit in uint8; otherwise the maps are
    resized here to the processed image's size (nearest). Tensors ``[B, 3, H, W]`` / ``[B, H, W]``, or lists when
    the processor makes images of different sizes."""
    kwargs: dict[str, Any] = {"return_tensors": "pt", "input_data_format": "channels_last"}
    if hasattr(processor, "do_reduce_labels"):
        kwargs["do_reduce_labels"] = False  # mapped already (reduce_map)
    by_processor = maps is not None and _takes_maps(processor) and all(int(m.max(initial=0)) <= 255 for m in maps)
    if by_processor:
        out = processor(images, segmentation_maps=[m.astype(np.uint8) for m in maps], **kwargs)
        return {"pixel_values": out["pixel_values"], "labels": out["labels"]}
    kwargs.pop("do_reduce_labels", None)
    out = processor(images, **kwargs)
    result = {"pixel_values": out["pixel_values"]}
    if maps is not None:
        labels = []
        for pixels, m in zip(out["pixel_values"], maps):
            size = tuple(pixels.shape[-2:])
            m = torch.as_tensor(m, dtype=torch.float32)[None, None]  # exact for class indices below 2**24
            labels.append(F.interpolate(m, size=size, mode="nearest-exact")[0, 0].long())
        result["labels"] = torch.stack(labels) if len({tuple(l.shape) for l in labels}) == 1 else labels
    return result


# ------------------------------------------------------------------------------------ the batched transform
class SegmentationTransform:
    """A batch of ``{image column: images, map column: maps}`` -> ``pixel_values``, ``labels`` (int64, 255: no
    label) and, for a teacher with other preprocessing, ``teacher_pixel_values``.

    Each map is checked (a 2-d map of the image's size, classes in range) and reduced when ``reduce_labels``.
    With ``augment: flip`` each image is flipped left-right with its map, with probability 1/2, before the
    processors (so the teacher sees the same flip). The flip is drawn per image from a seed made of the image's
    content, the epoch and the training seed once :meth:`set_augmentation_epoch` was called (the trainer does at
    every epoch): the same example gets the same flip in the same epoch whatever the batch order, the worker or an
    interruption, as :class:`hfdistill.data.ImageTransform` does; before that, from torch's global random stream.
    """

    def __init__(self, processor: Any, image_column: str, map_column: str, label_names: Sequence[str],
                 reduce_labels: bool = False, augment: str = "none", teacher_processor: Any = None):
        self.processor, self.teacher_processor = processor, teacher_processor
        self.image_column, self.map_column = image_column, map_column
        self.label_names = list(label_names)
        self.reduce_labels, self.augment = bool(reduce_labels), augment
        self.epoch: int | None = None
        self.seed = 0

    def set_augmentation_epoch(self, epoch: int, seed: int = 0) -> None:
        self.epoch, self.seed = int(epoch), int(seed)

    def _flips(self, images: list[np.ndarray]) -> list[bool]:
        return reproducible_flips(images, self.epoch, self.seed)

    def __call__(self, batch: dict) -> dict:
        images = [_rgb(image) for image in batch[self.image_column]]
        maps = []
        for i, (image, value) in enumerate(zip(images, batch[self.map_column])):
            values = _map_array(value, self.map_column)
            if values.shape != image.shape[:2]:
                raise RecipeError("data.label_column", f"a map of {values.shape[1]}x{values.shape[0]} pixels goes with "
                                  f"an image of {image.shape[1]}x{image.shape[0]}; each map must have its image's size")
            if self.reduce_labels:
                values = reduce_map(values)
            check_map(values, self.label_names, f"a map of column {self.map_column!r}")
            maps.append(values)
        if self.augment == "flip":
            for i, flip in enumerate(self._flips(images)):
                if flip:
                    images[i] = np.ascontiguousarray(images[i][:, ::-1])
                    maps[i] = np.ascontiguousarray(maps[i][:, ::-1])
        out = process(self.processor, images, maps)
        if self.teacher_processor is not None:
            out["teacher_pixel_values"] = process(self.teacher_processor, images)["pixel_values"]
        return out


class SegmentationCollator:
    """Stacks examples into a batch: images (``pixel_values``, ``teacher_pixel_values``) zero-padded at the bottom
    and right to the batch's largest, ``labels`` padded with 255 (ignored); other fields stacked."""

    def __call__(self, examples: list[dict]) -> dict:
        batch = {}
        for key in examples[0]:
            values = [e[key] for e in examples]
            if isinstance(values[0], torch.Tensor) and values[0].dim() >= 2:
                height = max(v.shape[-2] for v in values)
                width = max(v.shape[-1] for v in values)
                fill = IGNORE_INDEX if key == "labels" else 0
                values = [F.pad(v, (0, width - v.shape[-1], 0, height - v.shape[-2]), value=fill)
                          if tuple(v.shape[-2:]) != (height, width) else v for v in values]
                batch[key] = torch.stack(values)
                if key == "labels":
                    batch[key] = batch[key].long()
            elif isinstance(values[0], torch.Tensor):
                batch[key] = torch.stack(values)
            else:
                batch[key] = torch.as_tensor(np.asarray(values))
        return batch


# ------------------------------------------------------------------------------------ the data builder
def _check_splits(raw: RawData, reduce_labels: bool) -> None:
    """The first maps of each split: class indices in range (so bad data fails before training, naming the field)."""
    for name, split in (("train", raw.train), ("eval", raw.eval)):
        rows = split.select(range(min(len(split), CHECK_ROWS)))
        for i, value in enumerate(rows[raw.label_column]):
            values = _map_array(value, raw.label_column)
            if reduce_labels:
                values = reduce_map(values)
            check_map(values, raw.label_names, f"map {i} of the {name} split (column {raw.label_column!r})")


def _teacher_pixels(processor: Any, teacher: LoadedModel | None, mask: bool = False
                    ) -> tuple[Any, Callable[[dict], dict] | None]:
    """``(teacher processor, teacher inputs)`` when the teacher preprocesses its images otherwise than the student
    (its own ``teacher_pixel_values``, and ``teacher_pixel_mask`` with ``mask``), else ``(None, None)``."""
    if teacher is None or getattr(teacher.model, "is_cache", False):
        return None, None
    teacher_processor = teacher.image_processor()
    if teacher_processor is None:
        raise RecipeError("teacher.name", f"{teacher.name!r} has no image processor, so its inputs are unknown")
    if same_preprocessing(processor, teacher_processor):
        return None, None

    def teacher_fn(batch: dict) -> dict:
        inputs = {"pixel_values": batch["teacher_pixel_values"]}
        if mask and "teacher_pixel_mask" in batch:
            inputs["pixel_mask"] = batch["teacher_pixel_mask"]
        return inputs

    return teacher_processor, teacher_fn


def segmentation_data(raw: RawData, student: LoadedModel, teacher: LoadedModel | None = None,
                      augment: str = "auto") -> TaskData:
    """Images and maps -> ``pixel_values`` and ``labels`` by the student's own image processor (the teacher's
    ``teacher_pixel_values`` by its own when it preprocesses otherwise), batched (``with_transform``)."""
    if raw.lm_format is not None or not hasattr(raw.train, "with_transform"):
        raise RecipeError("task", "these splits were not loaded for semantic segmentation (load_raw_data with task "
                          "semantic-segmentation)")
    if len(raw.label_names) < 2:
        raise RecipeError("data.label_names", f"semantic segmentation needs 2 or more classes, got "
                          f"{raw.label_names}; give `data.label_names`")
    processor = student.image_processor()
    if processor is None:
        raise RecipeError("student.name", f"{student.name!r} has no image processor, so its input size and "
                          "normalisation are unknown; use a model folder or id that has one, or build it from a config")
    augment = raw.default_augment if augment == "auto" else augment
    if augment not in SEGMENTATION_AUGMENTATIONS:
        raise RecipeError("data.augment", f"semantic segmentation flips each image with its map: use "
                          f"{' or '.join(SEGMENTATION_AUGMENTATIONS)} (or auto), not {augment!r}")
    reduce_labels = (raw.reduce_labels if raw.reduce_labels is not None
                     else bool(getattr(processor, "do_reduce_labels", False)))
    _check_splits(raw, reduce_labels)
    teacher_processor, teacher_fn = _teacher_pixels(processor, teacher)

    def transform(augmentation: str) -> SegmentationTransform:
        return SegmentationTransform(processor, raw.input_column, raw.label_column, raw.label_names, reduce_labels,
                                     augmentation, teacher_processor)

    train = raw.train.with_transform(transform(augment))
    evaluation = raw.eval.with_transform(transform("none"))
    stats = {"note": raw.note} if raw.note else {}
    return TaskData(train, evaluation, raw.label_names, SegmentationCollator(), teacher_fn,
                    dict(enumerate(raw.label_names)), stats)


# ------------------------------------------------------------------------------------ object detection
def detection_data(raw: RawData, student: LoadedModel, teacher: LoadedModel | None = None,
                   augment: str = "auto") -> TaskData:
    """Images and COCO-style objects -> ``pixel_values`` (``pixel_mask``) and ``labels`` (a list of dicts per batch)
    by the student's own image processor (:func:`hfdistill.detection.detection_transform`, flips for training when
    ``augment`` is ``flip``), batched by :class:`hfdistill.detection.DetectionCollator`; a teacher whose processor
    differs gets ``teacher_pixel_values`` (and ``teacher_pixel_mask``)."""
    from .detection import DetectionCollator, detection_transform, takes_pixel_mask

    if raw.lm_format is not None or not hasattr(raw.train, "with_transform"):
        raise RecipeError("task", "these splits were not loaded for object detection (load_raw_data with task "
                          "object-detection)")
    processor = student.image_processor()
    if processor is None:
        raise RecipeError("student.name", f"{student.name!r} has no image processor, so its input size and "
                          "normalisation are unknown; use a model folder or id that has one, or build it from a config")
    augment = raw.default_augment if augment == "auto" else augment
    if augment not in DETECTION_AUGMENTATIONS:
        raise RecipeError("data.augment", f"object detection flips each image with its boxes: use "
                          f"{' or '.join(DETECTION_AUGMENTATIONS)} (or auto), not {augment!r}")
    mask = teacher is not None and not getattr(teacher.model, "is_cache", False) and takes_pixel_mask(teacher.model)
    teacher_processor, teacher_fn = _teacher_pixels(processor, teacher, mask=mask)

    def transform(train: bool) -> Any:
        return detection_transform(processor, train, flip=train and augment == "flip", image_column=raw.input_column,
                                   objects_column=raw.label_column, box_format=raw.box_format,
                                   teacher_processor=teacher_processor)

    train = raw.train.with_transform(transform(True))
    evaluation = raw.eval.with_transform(transform(False))
    stats = {"note": raw.note} if raw.note else {}
    return TaskData(train, evaluation, raw.label_names, DetectionCollator(), teacher_fn,
                    dict(enumerate(raw.label_names)), stats)
