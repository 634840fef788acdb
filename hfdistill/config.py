"""DistillationConfig: TrainingArguments plus the distillation knobs."""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments

TEACHER_DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class DistillationConfig(TrainingArguments):
    """Arguments of :class:`~hfdistill.DistillationTrainer`: every ``TrainingArguments`` field, and these."""

    task_weight: float = field(
        default=1.0,
        metadata={"help": "Weight of the student's own task loss (cross-entropy on the labels) in the total; "
                  "0 trains on the distillation terms alone. A recipe's `task_weight` overrides it."},
    )
    teacher_dtype: str = field(
        default="auto",
        metadata={"help": "dtype the teacher runs in: auto (as loaded), float32, bfloat16 or float16. "
                  "Half precision halves the teacher's cost; its outputs are cast to float32 for the losses."},
    )
    evaluate_teacher: bool = field(
        default=True,
        metadata={"help": "At the first evaluation, also evaluate the teacher once (`eval_teacher_*` metrics), "
                  "so the student's gap to it is visible."},
    )
    distill_learning_rate: float | None = field(
        default=None,
        metadata={"help": "Learning rate of adapters and trainable loss modules; default: `learning_rate`."},
    )
    dry_run_examples: int = field(
        default=2,
        metadata={"help": "Training examples in the dry-run forward that sizes adapters and checks taps."},
    )

    def __post_init__(self):
        super().__post_init__()
        if self.task_weight < 0:
            raise ValueError(f"DistillationConfig.task_weight must be >= 0, got {self.task_weight}")
        if self.teacher_dtype not in TEACHER_DTYPES:
            raise ValueError(
                f"DistillationConfig.teacher_dtype must be one of {', '.join(TEACHER_DTYPES)}, got {self.teacher_dtype!r}"
            )
        if self.distill_learning_rate is not None and self.distill_learning_rate <= 0:
            raise ValueError(
                f"DistillationConfig.distill_learning_rate must be > 0, got {self.distill_learning_rate}"
            )
        if self.dry_run_examples < 1:
            raise ValueError(f"DistillationConfig.dry_run_examples must be >= 1, got {self.dry_run_examples}")
