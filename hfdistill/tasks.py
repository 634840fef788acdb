"""Tasks: everything hfdistill knows about a task, in one table of plain data.

Each entry of :data:`TASKS` is a frozen :class:`Task`: the transformers auto class that loads a model
for it, the ``pipeline()`` tag of the saved student, what the inputs are (images or text, and the
column names looked for), the function that turns raw splits into model inputs (its *data builder*,
in :mod:`hfdistill.data`), the student's own task loss and the metric the summary and the card report.

Adding a task (detection) is one entry here plus its data builder;
the recipe's ``task:`` values, the data loading, the run pipeline and the card read this table instead
of testing task names.

This module imports nothing heavy at import time (the data builders and metrics import what they
need when called), so that :mod:`hfdistill.recipe` can read the task names from it.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class Task:
    """One task: how models are loaded, fed, trained on their own labels, evaluated and published."""

    name: str  # the recipe's `task:` value
    auto_class: str  # transformers auto class that loads a model for this task
    pipeline_tag: str  # the saved student's pipeline() task and Hub tag
    inputs: str  # "image" or "text": what the data builder reads, and which preprocessing a model needs
    input_columns: tuple[str, ...]  # dataset column names tried, in order, for the inputs
    label_columns: tuple[str, ...]  # ... and for the labels
    build_data: Callable[..., Any]  # (raw, student, teacher=None, augment="auto", max_length=128) -> TaskData
    task_loss: str  # the student's own loss, in words (the card, `hfdistill check`)
    loss: Callable[..., Any]  # (logits, labels) -> scalar tensor, when the model returns no loss itself
    metric: str  # the headline metric: the summary's column and the card's first result
    compute_metrics: Callable[[Any], dict]  # Trainer's compute_metrics: EvalPrediction -> {metric: value}
    example_input: str  # a Python literal the card's usage snippet passes to pipeline()
    # What the model learns to predict: "labels" (one integer class per example, from a label column),
    # "tokens" (language modelling: the text is its own target; no label column, no class names) or
    # "maps" (dense prediction: one class per pixel, from a segmentation map column; ``IGNORE_INDEX`` ignored) or
    # "boxes" (object detection: COCO-style objects per image; the evaluation reduces each evaluated model's outputs
    # with hfdistill.detection.DetectionPredictions.for_model and keeps the labels a list of dicts per batch).
    targets: str = "labels"
    greater_is_better: bool = True  # whether a higher `metric` is better (perplexity: lower is better)
    # The Trainer's preprocess_logits_for_metrics: (logits, labels) -> what compute_metrics reads, per batch
    # (a language model: the per-token NLL [B, T] instead of [B, T, vocabulary] logits held for the whole eval set).
    preprocess_logits: Callable[[Any, Any], Any] | None = None

    @property
    def processor(self) -> str:
        """What is saved with a student so that ``pipeline()`` preprocesses like training: ``image_processor`` or ``tokenizer``."""
        return "tokenizer" if self.inputs == "text" else "image_processor"


# ------------------------------------------------------------------------------------ metrics and losses
def accuracy(eval_pred: Any) -> dict[str, float]:
    """Top-1 accuracy of an ``EvalPrediction`` (logits, or a tuple whose first item is the logits)."""
    import numpy as np

    logits, labels = eval_pred.predictions, eval_pred.label_ids
    if isinstance(logits, (tuple, list)):
        logits = logits[0]
    return {"accuracy": float((np.argmax(logits, -1) == labels).mean())}


def classification_loss(logits: Any, labels: Any) -> Any:
    """Cross-entropy on the labels (``-100`` ignored), in fp32."""
    import torch.nn.functional as F

    return F.cross_entropy(logits.flatten(0, -2).float(), labels.flatten(), ignore_index=-100)


def causal_lm_loss(logits: Any, labels: Any) -> Any:
    """Mean next-token cross-entropy, in fp32: position t predicts token t+1, ``-100`` labels ignored.

    The same shift and mean as transformers' own causal LM loss (``ForCausalLMLoss``), for a model that
    returns no loss itself; ``labels`` are the input ids with ``-100`` on the tokens not to learn.
    """
    import torch.nn.functional as F

    return F.cross_entropy(logits[..., :-1, :].flatten(0, -2).float(), labels[..., 1:].flatten(), ignore_index=-100)


def token_nll(logits: Any, labels: Any) -> Any:
    """Per-token negative log-likelihood ``[B, T]`` of the next token (position t: -log p(token t | tokens < t)),
    0 where the label is ``-100`` (and at t=0, which nothing predicts).

    Suitable as the Trainer's ``preprocess_logits_for_metrics``: evaluation then keeps ``[N, T]`` numbers
    instead of ``[N, T, vocabulary]`` logits, and :func:`perplexity` reads them.
    """
    import torch
    import torch.nn.functional as F

    if isinstance(logits, (tuple, list)):
        logits = logits[0]
    target = labels[..., 1:]
    keep = target != -100
    nll = F.cross_entropy(logits[..., :-1, :].transpose(1, -1).float(), target.masked_fill(~keep, 0),
                          reduction="none").masked_fill(~keep, 0.0)
    return torch.cat([torch.zeros_like(nll[..., :1]), nll], dim=-1)


def perplexity(eval_pred: Any) -> dict[str, float]:
    """``exp`` of the mean next-token cross-entropy over the eval set's completion tokens (labels not ``-100``).

    Token-weighted over the whole set (not a mean of batch means). ``predictions`` are the logits
    ``[N, T, V]`` (or a tuple whose first item is), or the per-token NLL ``[N, T]`` of :func:`token_nll`;
    ``label_ids`` ``[N, T]`` are the unshifted labels (position t is predicted by position t-1). The Trainer
    pads both across batches with -100, which only ever sits where the labels are -100. Lower is better.
    """
    import math

    import numpy as np
    import torch

    predictions, labels = eval_pred.predictions, eval_pred.label_ids
    if isinstance(predictions, (tuple, list)):
        predictions = predictions[0]
    labels = torch.as_tensor(np.asarray(labels))
    total, count = 0.0, 0
    if np.ndim(predictions) == 2:  # per-token NLL already (token_nll)
        nll = torch.as_tensor(np.asarray(predictions), dtype=torch.float64)
        keep = labels != -100
        keep[..., 0] = False
        total, count = float(nll[keep].sum()), int(keep.sum())
    else:
        predictions = np.asarray(predictions)
        for start in range(0, len(labels), 8):  # a few rows at a time: [rows, T, V] in fp32
            logits = torch.as_tensor(predictions[start:start + 8], dtype=torch.float32)
            rows = labels[start:start + 8]
            keep = rows[..., 1:] != -100
            total += float(token_nll(logits, rows)[..., 1:][keep].double().sum())
            count += int(keep.sum())
    if count == 0:
        return {"perplexity": float("nan")}
    mean = total / count
    return {"perplexity": float(math.exp(mean)) if mean < 700 else float("inf")}


# ------------------------------------------------------------------------------------ semantic segmentation
IGNORE_INDEX = 255  # a segmentation map's "no label" value (transformers' `semantic_loss_ignore_index`)


def segmentation_loss(logits: Any, labels: Any) -> Any:
    """Cross-entropy per pixel, in fp32, for a segmentation model that returns no loss itself: the ``[B, K, h, w]``
    logits upsampled (bilinear, ``align_corners=False``) to the ``[B, H, W]`` labels' size first, pixels labelled
    :data:`IGNORE_INDEX` ignored; as SegFormer computes its own loss."""
    import torch.nn.functional as F

    if tuple(logits.shape[-2:]) != tuple(labels.shape[-2:]):
        logits = F.interpolate(logits.float(), size=tuple(labels.shape[-2:]), mode="bilinear", align_corners=False)
    return F.cross_entropy(logits.float(), labels.long(), ignore_index=IGNORE_INDEX)


def segmentation_maps(logits: Any, labels: Any) -> Any:
    """The predicted class map ``[B, H, W]`` at the labels' resolution: the ``[B, K, h, w]`` logits (or a tuple whose
    first item is) upsampled bilinearly to the labels' ``H x W``, then the argmax over the K classes.

    Suitable as the Trainer's ``preprocess_logits_for_metrics``: evaluation then keeps one small integer per pixel
    (int16; int32 beyond 32767 classes) instead of ``[N, K, h, w]`` logits for the whole eval set.
    """
    import torch
    import torch.nn.functional as F

    if isinstance(logits, (tuple, list)):
        logits = logits[0]
    if tuple(logits.shape[-2:]) != tuple(labels.shape[-2:]):
        logits = F.interpolate(logits.float(), size=tuple(labels.shape[-2:]), mode="bilinear", align_corners=False)
    return logits.argmax(1).to(torch.int16 if logits.shape[1] <= 32767 else torch.int32)


def compact_label_maps(labels: Any, num_labels: int | None) -> Any:
    """Integer label maps ``[B, H, W]`` (or any integer labels of 3 or more dims) as int16 when the model's
    ``num_labels`` classes, the ignore index 255 and the Trainer's padding -100 all fit, so that evaluation keeps
    2 bytes per pixel instead of 8 (a 2000-image eval set at 512x512: 1 GB instead of 4). Anything else (labels
    of fewer dims, floats, dicts, unknown ``num_labels``) is returned as it is. Decided by ``num_labels``, not by
    the batch's values, so that every batch of an evaluation gets the same dtype (the Trainer pads one into
    another's dtype when map sizes differ)."""
    import torch

    if (num_labels is None or not isinstance(labels, torch.Tensor) or labels.dim() < 3
            or labels.is_floating_point() or labels.dtype == torch.bool):
        return labels
    if max(num_labels - 1, IGNORE_INDEX) > torch.iinfo(torch.int16).max:
        return labels
    return labels.to(torch.int16)


def mean_iou(eval_pred: Any) -> dict[str, float]:
    """``mean_iou`` and ``pixel_accuracy`` of predicted class maps over the whole eval set, with torchmetrics.

    ``predictions``: the class maps ``[N, H, W]`` of :func:`segmentation_maps` (or the logits ``[N, K, h, w]``,
    turned into maps here); ``label_ids``: the label maps ``[N, H, W]``. Pixels labelled :data:`IGNORE_INDEX` or
    negative (the Trainer pads maps of different sizes with -100) do not count. One confusion matrix over every
    counted pixel of the set (``MulticlassJaccardIndex``): IoU_c = TP / (TP + FP + FN) per class, and ``mean_iou`` is
    their mean over the classes *present* (in the labels or the predictions; a class that appears in neither has no
    IoU), as mmsegmentation and ``evaluate``'s ``mean_iou`` compute it (not a mean of per-image scores).
    ``pixel_accuracy``: the fraction of counted pixels predicted right.
    """
    import numpy as np
    import torch
    from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex

    predictions, labels = eval_pred.predictions, eval_pred.label_ids
    if isinstance(predictions, (tuple, list)):
        predictions = predictions[0]
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    if predictions.ndim == labels.ndim + 1:  # logits: one [K, h, w] map of scores per image
        predictions = np.concatenate([
            segmentation_maps(torch.as_tensor(predictions[i:i + 8]).float(), torch.as_tensor(labels[i:i + 8])).numpy()
            for i in range(0, len(labels), 8)
        ]) if len(labels) else predictions.argmax(1)
    keep = (labels >= 0) & (labels != IGNORE_INDEX)
    if not keep.any():
        return {"mean_iou": float("nan"), "pixel_accuracy": float("nan")}
    # Classes that appear in neither labels nor predictions have no IoU and are left out of the mean whatever the
    # number of classes, so the largest class seen fixes the confusion matrix's size.
    num_classes = int(max(labels[keep].max(), predictions[keep].max())) + 1
    iou = MulticlassJaccardIndex(num_classes=num_classes, average="macro", validate_args=False)
    accuracy = MulticlassAccuracy(num_classes=num_classes, average="micro", validate_args=False)
    for start in range(0, len(labels), 16):  # a few maps at a time: the pixels of a large eval set are many
        rows = keep[start:start + 16]
        if rows.any():
            preds = torch.as_tensor(predictions[start:start + 16][rows].astype(np.int64))
            target = torch.as_tensor(labels[start:start + 16][rows].astype(np.int64))
            iou.update(preds, target)
            accuracy.update(preds, target)
    return {"mean_iou": float(iou.compute()), "pixel_accuracy": float(accuracy.compute())}


# ------------------------------------------------------------------------------------ data builders
# Thin wrappers: hfdistill.data imports the models and the recipe types, which import this module.
def _image_classification_data(raw: Any, student: Any, teacher: Any = None, augment: str = "auto",
                               max_length: int = 128) -> Any:
    from .data import image_classification_data

    return image_classification_data(raw, student, teacher, augment=augment)


def _text_classification_data(raw: Any, student: Any, teacher: Any = None, augment: str = "auto",
                              max_length: int = 128) -> Any:
    from .data import text_classification_data

    return text_classification_data(raw, student, teacher, max_length=max_length)


def _causal_lm_data(raw: Any, student: Any, teacher: Any = None, augment: str = "auto",
                    max_length: int = 128) -> Any:
    from .data import causal_lm_data

    return causal_lm_data(raw, student, teacher, max_length=max_length)


def _segmentation_data(raw: Any, student: Any, teacher: Any = None, augment: str = "auto",
                       max_length: int = 128) -> Any:
    from .data_dense import segmentation_data

    return segmentation_data(raw, student, teacher, augment=augment)


# ------------------------------------------------------------------------------------ object detection
def detection_loss(logits: Any, labels: Any) -> Any:
    """A detector (DETR family) computes its own loss (Hungarian matching, then class and box losses) when given
    ``labels``; there is no loss to compute from its logits alone."""
    from .errors import DistillationError

    raise DistillationError("an object-detection student must return its own loss (a DETR-family model given "
                            "`labels`); hfdistill cannot compute a detection loss from the logits alone")


def detection_map(eval_pred: Any) -> dict[str, float]:
    """COCO mAP of a detector's reduced predictions (:func:`hfdistill.detection.detection_map`)."""
    from .detection import detection_map as compute

    return compute(eval_pred)


def _detection_data(raw: Any, student: Any, teacher: Any = None, augment: str = "auto",
                    max_length: int = 128) -> Any:
    from .data_dense import detection_data

    return detection_data(raw, student, teacher, augment=augment)


IMAGE_COLUMNS = ("image", "img", "pixel_values", "picture")
TEXT_COLUMNS = ("text", "sentence", "content", "review", "question")
LABEL_COLUMNS = ("label", "labels", "fine_label", "target", "class")
# Where segmentation sets keep their maps (scene_parse_150: `annotation`; sidewalk-semantic: `label`).
OBJECTS_COLUMNS = ("objects", "annotations")  # hfdistill.detection.OBJECTS_COLUMNS
MAP_COLUMNS = ("annotation", "label", "segmentation", "semantic_map", "mask", "labels", "seg_map")

TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        Task(
            name="image-classification",
            auto_class="AutoModelForImageClassification",
            pipeline_tag="image-classification",
            inputs="image",
            input_columns=IMAGE_COLUMNS,
            label_columns=LABEL_COLUMNS,
            build_data=_image_classification_data,
            task_loss="cross-entropy on the labels",
            loss=classification_loss,
            metric="accuracy",
            compute_metrics=accuracy,
            example_input='"https://huggingface.co/datasets/huggingface/documentation-images/resolve/main/pipeline-cat-chonk.jpeg"',
        ),
        Task(
            name="text-classification",
            auto_class="AutoModelForSequenceClassification",
            pipeline_tag="text-classification",
            inputs="text",
            input_columns=TEXT_COLUMNS,
            label_columns=LABEL_COLUMNS,
            build_data=_text_classification_data,
            task_loss="cross-entropy on the labels",
            loss=classification_loss,
            metric="accuracy",
            compute_metrics=accuracy,
            example_input='"This was a great way to spend an evening."',
        ),
        Task(
            name="text-generation",
            auto_class="AutoModelForCausalLM",
            pipeline_tag="text-generation",
            inputs="text",
            # Plain text; prompt/completion pairs (`prompt`, `completion`) and chats (`messages`) are found
            # by hfdistill.data.load_raw_data, which reads these columns for the plain-text format.
            input_columns=TEXT_COLUMNS,
            label_columns=(),
            build_data=_causal_lm_data,
            task_loss="the model's own causal LM loss (next-token cross-entropy on the completion tokens)",
            loss=causal_lm_loss,
            metric="perplexity",
            compute_metrics=perplexity,
            example_input='"Hello, how are you?"',
            targets="tokens",
            greater_is_better=False,
            preprocess_logits=token_nll,
        ),
        Task(
            name="semantic-segmentation",
            auto_class="AutoModelForSemanticSegmentation",
            pipeline_tag="image-segmentation",
            inputs="image",
            input_columns=IMAGE_COLUMNS,
            label_columns=MAP_COLUMNS,
            build_data=_segmentation_data,
            task_loss="the model's own loss (per-pixel cross-entropy, the logits upsampled to the labels' size; "
                      f"label {IGNORE_INDEX} ignored)",
            loss=segmentation_loss,
            metric="mean_iou",
            compute_metrics=mean_iou,
            example_input='"https://huggingface.co/datasets/huggingface/documentation-images/resolve/main/pipeline-cat-chonk.jpeg"',
            targets="maps",
            preprocess_logits=segmentation_maps,
        ),
        Task(
            name="object-detection",
            auto_class="AutoModelForObjectDetection",
            pipeline_tag="object-detection",
            inputs="image",
            input_columns=IMAGE_COLUMNS,
            label_columns=OBJECTS_COLUMNS,
            build_data=_detection_data,
            task_loss="the model's own loss (Hungarian matching; class + L1 + GIoU)",
            loss=detection_loss,
            metric="map",
            compute_metrics=detection_map,
            example_input='"https://huggingface.co/datasets/huggingface/documentation-images/resolve/main/pipeline-cat-chonk.jpeg"',
            targets="boxes",
            # per evaluated model (sigmoid or softmax scores): DetectionPredictions.for_model, bound by the run
            preprocess_logits=None,
        ),
    )
}
TASK_NAMES: tuple[str, ...] = tuple(TASKS)


def get_task(name: str | None, path: str = "task") -> Task:
    """The table entry of ``name``; a :class:`~hfdistill.errors.RecipeError` at ``path`` for an unknown task."""
    from .errors import RecipeError

    if name in TASKS:
        return TASKS[name]
    close = difflib.get_close_matches(str(name), TASK_NAMES, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise RecipeError(path, f"unknown task {name!r}{hint}; allowed: {', '.join(TASK_NAMES)}")
