"""DistillationConfig: TrainingArguments plus the distillation knobs."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from transformers import TrainingArguments
from transformers.utils import logging

from .processes import on_cpu_only

TEACHER_DTYPES = ("auto", "float32", "bfloat16", "float16")
NONFINITE_ACTIONS = ("stop", "skip")
logger = logging.get_logger(__name__)


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
    teacher_compile: bool = field(
        default=False,
        metadata={"help": "Compile the frozen teacher with torch.compile (backend and mode from "
                  "`torch_compile_backend`/`torch_compile_mode`; `torch_compile` compiles the student). The first "
                  "steps pay for the compilation; a long run on a GPU gains from it."},
    )
    channels_last: bool = field(
        default=False,
        metadata={"help": "Run student, teacher, adapters and loss modules in channels-last memory format "
                  "(NHWC), with each batch's images converted once: faster convolutions on GPUs with tensor cores "
                  "and with oneDNN on many CPUs; models without 4-d weights and inputs are unaffected."},
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
    lr_decay_epochs: list[float] | None = field(
        default=None,
        metadata={"help": "Step decay of the KD literature (e.g. [150, 180, 210] of 240 epochs): multiply the "
                  "learning rate by `lr_decay_rate` at each of these epochs. Replaces `lr_scheduler_type`; "
                  "warm-up still applies."},
    )
    lr_decay_rate: float = field(
        default=0.1, metadata={"help": "Factor applied at each of `lr_decay_epochs`, in (0, 1]."}
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Let `hfdistill train` replace an earlier result in output_dir (its checkpoints are "
                  "removed before training). Without it such a folder is refused. (`hfdistill train --overwrite`.)"},
    )
    nonfinite: str = field(
        default="stop",
        metadata={"help": "What a non-finite (NaN or inf) loss term, total loss or gradient norm does: `stop` "
                  "training with a message naming the term and the step (the last checkpoint stays the newest "
                  "result), or `skip` the optimiser step (counted in the logs as `nonfinite_steps`)."},
    )
    logging_nan_inf_filter: bool | None = field(
        default=None,
        metadata={"help": "transformers' filter that keeps a non-finite step's loss out of the logged mean (it reads "
                  "every micro-batch's loss on the host: a host-device sync each). Default: on with `nonfinite: "
                  "skip`, off with `stop`, where a non-finite step stops training before anything is logged."},
    )
    dry_run_examples: int = field(
        default=2,
        metadata={"help": "Training examples in the dry-run forward that sizes adapters and checks taps."},
    )
    lmbda: float = field(
        default=0.0,
        metadata={"help": "Language models (GKD's lambda, on-policy distillation): the fraction of training batches "
                  "whose completions the student samples itself from the batch's prompts; the teacher scores them "
                  "through the token losses and the student's own loss learns them. 0: off (the data's completions "
                  "only); 1: every batch on-policy. Needs a live teacher (not a cache)."},
    )
    on_policy_temperature: float = field(
        default=1.0,
        metadata={"help": "Sampling temperature of the student's on-policy completions (`lmbda`)."},
    )
    on_policy_max_new_tokens: int | None = field(
        default=None,
        metadata={"help": "Longest on-policy completion in tokens (`lmbda`); default: the longest completion of the "
                  "batch it replaces, so on-policy batches are as long as the data's."},
    )

    def __post_init__(self):
        if on_cpu_only() and not self.use_cpu:
            # Launched as several processes on a machine without an accelerator: Accelerate makes the run
            # data-parallel over gloo only when told it is on the CPU; otherwise every process would train the
            # whole data set on its own, and write the same folders.
            self.use_cpu = True
            sharded = [name for name, env in (("FSDP", "ACCELERATE_USE_FSDP"), ("DeepSpeed", "ACCELERATE_USE_DEEPSPEED"))
                       if os.environ.get(env, "false").lower() == "true"]
            if sharded:  # Accelerate shards only on accelerators; say so rather than let it pass unnoticed
                logger.warning(f"{sharded[0]} was asked for, but this machine has no GPU and Accelerate runs {sharded[0]} "
                               "only on accelerators: the run is plain data-parallel (DDP over gloo) on the CPU.")
        if self.logging_nan_inf_filter is None:
            self.logging_nan_inf_filter = self.nonfinite == "skip"
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
        if self.lr_decay_epochs is not None:
            if not self.lr_decay_epochs or any(e <= 0 for e in self.lr_decay_epochs) or list(self.lr_decay_epochs) != sorted(self.lr_decay_epochs):
                raise ValueError(
                    f"DistillationConfig.lr_decay_epochs must be increasing epochs > 0, got {self.lr_decay_epochs}"
                )
            if self.max_steps > 0:
                raise ValueError("DistillationConfig.lr_decay_epochs counts epochs: use num_train_epochs, not max_steps")
        if not 0 < self.lr_decay_rate <= 1:
            raise ValueError(f"DistillationConfig.lr_decay_rate must be in (0, 1], got {self.lr_decay_rate}")
        if self.nonfinite not in NONFINITE_ACTIONS:
            raise ValueError(f"DistillationConfig.nonfinite must be one of {', '.join(NONFINITE_ACTIONS)}, got {self.nonfinite!r}")
        if self.dry_run_examples < 1:
            raise ValueError(f"DistillationConfig.dry_run_examples must be >= 1, got {self.dry_run_examples}")
        if not 0 <= self.lmbda <= 1:
            raise ValueError(f"DistillationConfig.lmbda is a fraction of batches, in [0, 1]; got {self.lmbda}")
        if self.on_policy_temperature <= 0:
            raise ValueError(f"DistillationConfig.on_policy_temperature must be > 0, got {self.on_policy_temperature}")
        if self.on_policy_max_new_tokens is not None and self.on_policy_max_new_tokens < 1:
            raise ValueError(
                f"DistillationConfig.on_policy_max_new_tokens must be >= 1 or None, got {self.on_policy_max_new_tokens}"
            )
