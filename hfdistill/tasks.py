"""Tasks: everything hfdistill knows about a task, in one table of plain data.

Each entry of :data:`TASKS` is a frozen :class:`Task`: the transformers auto class that loads a model
for it, the ``pipeline()`` tag of the saved student, what the inputs are (images or text, and the
column names looked for), the function that turns raw splits into model inputs (its *data builder*,
in :mod:`hfdistill.data`), the student's own task loss and the metric the summary and the card report.

Adding a task (language modelling, detection, segmentation) is one entry here plus its data builder;
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


IMAGE_COLUMNS = ("image", "img", "pixel_values", "picture")
TEXT_COLUMNS = ("text", "sentence", "content", "review", "question")
LABEL_COLUMNS = ("label", "labels", "fine_label", "target", "class")

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
