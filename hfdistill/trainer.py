"""DistillationTrainer: a ``transformers.Trainer`` that trains a student against a frozen teacher.

The loss is ``task_weight * student task loss + sum_i weight_i * term_i`` where each recipe term
reads taps of both models. What the terms are made of lives elsewhere: the student, its adapters
and the loss modules in :class:`~hfdistill.terms.DistillationModel` (one optimiser, one DDP
wrapper, one checkpoint), the frozen teacher behind :class:`~hfdistill.teacher.Teacher`. This
module wires them into the Trainer's loop: inputs, the loss, logging, what trains in a stage,
checkpoints of the distillation state, and the teacher's one evaluation.
"""

from __future__ import annotations

import dataclasses
import glob
import inspect
import logging
import math
import os
from typing import Any, Callable

import datasets
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from accelerate.utils import DistributedType
from transformers import PreTrainedModel, TimmWrapperImageProcessor, Trainer, TrainerCallback
from transformers.trainer_pt_utils import nested_concat, nested_detach, nested_numpify
from transformers.trainer_utils import EvalPrediction, PREFIX_CHECKPOINT_DIR

from . import losses as loss_registry
from . import on_policy
from .config import DistillationConfig
from .errors import DistillationError, TrainingDivergedError
from .data import ArrowBatchReader
from .models import is_timm_model, load_student_weights, shifts_labels, student_tap_root, wrap_timm_model
from .outputs import (CHECKPOINT_COMPLETE_NAME, DISTILL_STATE_NAME, default_file_mode, last_complete_checkpoint,
                      mark_checkpoint_complete, missing_folders, remove_empty_folders, rotate_checkpoints)
from .recipe import Recipe
from .teacher import TEACHER_INPUT_PREFIX, Teacher, logits_of
from .tasks import compact_label_maps
from .terms import (DistillationModel, IndexedCollator, IndexedDataset, LossHooksCallback, build_term_modules,
                    load_distill_state, loss_fields, resolve_terms, save_distill_state)
from .trainer_hub import HubTrainerMixin

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class PendingCheck:
    """A step's verdict (all its loss parts and its gradient norm finite?) on its way to the host: copied into
    pinned memory without waiting, with an event to wait on when read, a step later, when the copy is long
    done. On the CPU it is there at once."""

    step: int
    finite_on_host: torch.Tensor  # bool, 0-d
    copied: Any  # torch.cuda.Event, or None
    parts: list[dict[str, torch.Tensor]]
    grad_norm: Any

    @classmethod
    def start(cls, step: int, finite: torch.Tensor, parts: list[dict[str, torch.Tensor]], grad_norm: Any) -> "PendingCheck":
        if finite.device.type != "cuda":
            return cls(step, finite.cpu(), None, parts, grad_norm)
        host = torch.empty((), dtype=torch.bool, pin_memory=True)
        host.copy_(finite, non_blocking=True)
        copied = torch.cuda.Event()
        copied.record()
        return cls(step, host, copied, parts, grad_norm)

    def finite(self) -> bool:
        if self.copied is not None:
            self.copied.synchronize()
        return bool(self.finite_on_host)


def nonfinite_description(step_parts: list[dict[str, torch.Tensor]], grad_norm: Any) -> str:
    """What was not finite in a step: its weighted terms by name, else its gradient norm."""
    bad = {name: float(value) for parts in step_parts for name, value in parts.items()
           if not bool(torch.isfinite(value))}
    if bad:
        return ", ".join(f"{'the task loss' if name == 'task' else 'term ' + repr(name)} = {value}"
                         for name, value in bad.items()) + " (weighted)"
    return f"the gradient norm ({float(grad_norm)})"


class DistillationTrainer(HubTrainerMixin, Trainer):
    """``Trainer`` for knowledge distillation.

    Args:
        model: the student: a transformers ``PreTrainedModel`` or a timm model (wrapped into
            ``TimmWrapperForImageClassification`` so it saves like a transformers model; the same
            module object is trained).
        teacher: the teacher: a transformers model, a timm model, any ``nn.Module`` whose forward
            takes the main input tensor, or a :class:`~hfdistill.teacher.Teacher` (e.g. a cache). It
            is frozen: no gradients, eval mode, never in DDP.
        recipe: a :class:`Recipe`, a dict, or a YAML path; its terms, task weight and stages are used
            here (models, data and training come as arguments). Without a recipe a teacher is
            distilled with a single ``kd`` term.
        stage: for a recipe with several ``stages``, which one this trainer trains (name or index);
            :func:`hfdistill.run` runs them all in order.
        distill_state: adapters' and loss modules' state from an earlier stage
            (:meth:`distill_state`); the entries of terms with the same name are loaded.
        teacher_inputs: optional ``batch -> teacher inputs`` function, for a teacher that needs other
            inputs (its own normalisation or tokeniser). By default the teacher receives the batch's
            ``teacher_*`` fields (prefix removed) and otherwise the student's inputs.
        id2label: label names for a timm student (saved into its ``config.json``).
        timm_model_args: creation arguments of a timm student, when they cannot be read off the model.
        task_loss: ``(logits, labels) -> loss``, the task loss of a student that returns none itself (the tasks
            table's, e.g. per-pixel cross-entropy at the labels' size for segmentation); default: cross-entropy
            over the last dimension.
        All other arguments are those of ``transformers.Trainer``.
    """

    def __init__(
        self,
        model: nn.Module | None = None,
        teacher: nn.Module | Teacher | None = None,
        recipe: Recipe | dict | str | os.PathLike | None = None,
        args: DistillationConfig | None = None,
        teacher_inputs: Callable[[dict], dict] | None = None,
        id2label: dict[int, str] | None = None,
        timm_model_args: dict | None = None,
        stage: str | int | None = None,
        distill_state: dict[str, torch.Tensor] | None = None,
        task_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        teacher_preprocess_logits: Callable[[Any, Any], Any] | None = None,
        **kwargs,
    ):
        # The teacher evaluation's reduction of the teacher's outputs, when it differs from the student's
        # preprocess_logits_for_metrics (a detector's: sigmoid or softmax scores, per model); None: the student's.
        self.teacher_preprocess_logits = teacher_preprocess_logits
        if model is None:
            raise DistillationError("DistillationTrainer needs a student `model`")
        if args is None:
            args = DistillationConfig(output_dir="hfdistill_output")
        elif not isinstance(args, DistillationConfig):
            raise DistillationError(
                f"args must be a DistillationConfig (a TrainingArguments subclass), got {type(args).__name__}"
            )
        self.recipe = _load_recipe(recipe, teacher)
        self.stage, self.stage_path = self.recipe.select_stage(stage)
        if teacher is None:
            needy = [t.loss for t in self.stage.terms if loss_registry.needs_teacher(t.loss, t.params)]
            if needy:
                raise DistillationError(
                    f"the recipe's term(s) {needy} need a teacher but none was given; "
                    "pass `teacher=` or remove those terms to train the model on its own"
                )
        task_weight = self.stage.task_weight if self.stage.task_weight is not None else args.task_weight

        tap_root = student_tap_root(model)
        if is_timm_model(model):
            student = wrap_timm_model(model, id2label=id2label, model_args=timm_model_args)
        elif isinstance(model, PreTrainedModel):
            student = model
        else:
            raise DistillationError(
                f"the student must be a transformers PreTrainedModel or a timm model, got {type(model).__name__}"
            )
        self.student = student
        self._task_loss_fn = task_loss
        if args.channels_last:  # before the optimiser exists: the parameters keep their identity
            student.to(memory_format=torch.channels_last)
        if is_timm_model(model) and kwargs.get("processing_class") is None:
            # The saved folder must run in pipeline(): derive the image processor from the timm pretrained_cfg.
            kwargs["processing_class"] = TimmWrapperImageProcessor(
                pretrained_cfg=student.config.pretrained_cfg, architecture=student.config.architecture
            )
        created = missing_folders(args.output_dir)
        try:
            terms = resolve_terms(self.stage.terms)
            distill = DistillationModel(student, tap_root, terms, task_weight)
            super().__init__(model=distill, args=args, **kwargs)
            self._setup_distillation(teacher, teacher_inputs, distill_state)
        except Exception:
            # Bad input must leave nothing behind: drop the folders the Trainer just made, while still empty.
            remove_empty_folders(created)
            raise

    @property
    def task_weight(self) -> float:
        return self.model.task_weight

    def _setup_distillation(self, teacher, teacher_inputs, distill_state) -> None:
        student, distill = self.student, self.model
        # Parts of the total normalised by the optimisation step's token count (`num_items_in_batch`, which
        # the Trainer counts over accumulation and processes): a causal LM student's own loss and the token
        # losses that say so (`normalised_by_items`); every other part is a per-micro-batch mean.
        # compute_loss scales each kind itself (_step_loss), so the Trainer must not divide again.
        self._loss_shifts_labels = shifts_labels(student)  # count labels[..., 1:], as the student's loss shifts
        self._items_parts = {term.name for term in distill.terms
                             if getattr(loss_registry.get_info(term.spec.loss).cls, "normalised_by_items", False)}
        if self._loss_shifts_labels:
            self._items_parts.add("task")
        self.model_accepts_loss_kwargs = bool(self._items_parts)  # what makes the Trainer count the items
        self.loss_is_scaled_for_ga = True
        if self.args.label_names is None:
            from transformers.utils import find_labels

            self.label_names = find_labels(type(student))
        self._student_input_names = set(inspect.signature(student.forward).parameters)
        self._loss_field_names = {name for term in distill.terms for name in term.fields}
        # Fields every term that reads them can do without (None when the batch lacks them).
        self._optional_loss_fields = {name for name in self._loss_field_names
                                      if all(name in term.optional_fields for term in distill.terms if name in term.fields)}
        self._term_sums: dict[str, torch.Tensor] = {}
        self._term_count = 0
        self._nonfinite_steps = 0  # steps skipped for a non-finite loss or gradient (nonfinite: skip)
        self._step_parts: list[dict[str, torch.Tensor]] = []  # this optimiser step's weighted parts, checked once
        self._pending: PendingCheck | None = None  # a step whose check is on its way to the host (CUDA)
        self._defer_checks: bool | None = None  # None: defer on CUDA under `nonfinite: stop`
        self._teacher_eval_metrics: dict[str, dict[str, float]] = {}
        self._on_policy_counts = [0, 0]  # micro-batches sampled by the student, and all, since the last log
        self._unwrapped: tuple[nn.Module, DistillationModel] | None = None  # (wrapped model, it unwrapped)

        teacher_taps = [t for term in distill.terms for t in term.teacher_taps]
        if teacher is None or isinstance(teacher, Teacher):
            self.frozen_teacher = teacher
        else:
            shared = self._student_input_names - set(self.label_names)
            compile_options = None
            if self.args.teacher_compile:
                compile_options = {"backend": self.args.torch_compile_backend or "inductor",
                                   "mode": self.args.torch_compile_mode}
            self.frozen_teacher = Teacher(teacher, teacher_taps, device=self.args.device, dtype=self.args.teacher_dtype,
                                          inputs_fn=teacher_inputs, shared_input_names=shared,
                                          compile_options=compile_options, channels_last=self.args.channels_last)
        self.teacher = getattr(self.frozen_teacher, "model", None)
        if isinstance(self.frozen_teacher, Teacher):
            half_ok = {t for term in distill.terms if term.accepts_half_inputs for t in term.teacher_taps}
            self.frozen_teacher.keep_dtype = half_ok - {t for term in distill.terms if not term.accepts_half_inputs
                                                        for t in term.teacher_taps}
        # A cache of teacher outputs (hfdistill.cache) reads rows by example index: every training batch
        # carries it; the cache refuses terms that need the live teacher, taps it lacks, data of another size.
        self._teacher_is_cache = bool(getattr(self.frozen_teacher, "is_cache", False))
        if self._teacher_is_cache:
            self.frozen_teacher.prepare(distill.terms, self.train_dataset, teacher_inputs,
                                        self._student_input_names - set(self.label_names))
        if self.args.lmbda > 0:
            on_policy.check_student(student, self.is_fsdp_enabled or self.is_deepspeed_enabled, self._teacher_is_cache,
                                    bool(distill.terms))
        setter = augmentation_setter(self.train_dataset)
        views = getattr(self.frozen_teacher, "views", 1) if self._teacher_is_cache else 1
        if views > 1:
            if setter is None:
                raise DistillationError(
                    f"the teacher cache holds {views} augmented views of every example, replayed one per epoch, but "
                    "the training data has no reproducible augmentation to replay them with (hfdistill's image "
                    "transforms with data.augment other than none); train on the data the cache was built from"
                )
            self.frozen_teacher.augmented = False  # replayed exactly: every difference is an error
            setter(self.frozen_teacher.set_view(0), int(self.frozen_teacher.view_seed))  # the dry run reads view 0
        self._needs_index = "index" in self._loss_field_names or self._teacher_is_cache
        if self._needs_index:
            # Losses with per-example state (CRD's memory bank) read each example's dataset index.
            self.data_collator = IndexedCollator(self.data_collator)
        self.loss_contexts = {}
        if distill.terms:
            self.loss_contexts = build_term_modules(
                distill, self.frozen_teacher, self._dry_run_batch(), self._student_inputs,
                context=dict(num_examples=self._num_train_examples(), world_size=self.args.world_size,
                             rank=self.args.process_index, device=self.args.device, stage=self.stage.name,
                             accelerator=self.accelerator),
                term_batches=self._train_batches,
            )
            self.add_callback(LossHooksCallback(distill, self.loss_contexts))
            if self.args.channels_last:  # adapters and loss modules, built just now, in the layout of their inputs
                distill.adapters.to(memory_format=torch.channels_last)
                distill.losses.to(memory_format=torch.channels_last)
        if distill_state:
            distill.load_distill_state_dict(distill_state, strict=False)
        if self.stage.train is not None:  # checked now; they take effect for the duration of train()
            distill.select_trainable(self.stage.train, f"{self.stage_path}.train")
        self._drop_short_last_batch()
        if setter is not None:  # per-example augmentation that a mid-epoch resume reproduces
            self.add_callback(_AugmentationEpoch(setter, self.frozen_teacher if views > 1 else None))

    def _drop_short_last_batch(self) -> None:
        """Drop each epoch's last batch when it would be too small for something that trains on it.

        Relation losses compare examples (``min_batch_size`` on the loss class) and batch-norm in training
        needs two values per channel (in adapters, loss modules or the student itself, whose 1x1 maps make a
        batch of one a single value): a final batch of one example would stop training at its last step.
        """
        examples = self._num_train_examples()
        if self.args.dataloader_drop_last or not examples:
            return
        last = examples % (self.args.per_device_train_batch_size * max(self.args.world_size, 1))
        if last == 0:
            return
        last_per_process = -(-last // max(self.args.world_size, 1))
        needs = {}
        distill: DistillationModel = self.model
        for term in distill.terms:
            modules = [distill.losses[term.name]] + ([distill.adapters[term.name]] if term.name in distill.adapters else [])
            need = max(getattr(distill.losses[term.name], "min_batch_size", 1), *(_batch_norm_need(m) for m in modules))
            if need > 1:
                needs[f"term {term.name!r}"] = need
        if _batch_norm_need(self.student) > 1:
            needs["the student's batch-norm"] = 2
        short = {who: need for who, need in needs.items() if last_per_process < need}
        if short:
            self.args.dataloader_drop_last = True
            who, need = next(iter(short.items()))
            logger.warning(f"Each epoch's last batch ({last} of {examples} training examples) is dropped: {who} needs "
                           f"at least {need} examples per batch.")

    # ------------------------------------------------------------------ data
    def _num_train_examples(self) -> int | None:
        dataset = self.train_dataset
        return len(dataset) if dataset is not None and hasattr(dataset, "__len__") else None

    def _get_dataloader(self, dataset, description, batch_size, sampler_fn=None, is_training=False, dataloader_key=None):
        if isinstance(dataset, datasets.Dataset):
            dataset = self._remove_unused_columns(dataset, description=description)
            # Read in batches straight from Arrow (datasets' torch formatter costs more than a small step);
            # the other samplers (grouped by length, rebalanced) read a datasets.Dataset's columns: leave it to them.
            if ArrowBatchReader.supports(dataset) and not (
                    is_training and self.args.train_sampling_strategy in ("group_by_length", "batch_rebalance")):
                dataset = ArrowBatchReader(dataset)
        if is_training and self._needs_index and not isinstance(dataset, torch.utils.data.IterableDataset):
            dataset = IndexedDataset(dataset)
        return super()._get_dataloader(dataset, description, batch_size, sampler_fn, is_training, dataloader_key)

    def _train_batches(self):
        """One pass over this process's training batches, on the device (for losses' statistics)."""
        for batch in self.get_train_dataloader():
            yield self._prepare_inputs(batch)

    def _dry_run_batch(self) -> dict:
        dataset = self.train_dataset if self.train_dataset is not None else self.eval_dataset
        if dataset is None:
            raise DistillationError(
                "the recipe's terms need one dry-run forward to size adapters and check taps, "
                "but neither train_dataset nor eval_dataset was given"
            )
        if isinstance(dataset, datasets.Dataset):
            dataset = self._remove_unused_columns(dataset, description="training")
        if isinstance(dataset, torch.utils.data.IterableDataset):
            examples = [example for example, _ in zip(dataset, range(self.args.dry_run_examples))]
        else:
            indexed = IndexedDataset(dataset) if self._needs_index else dataset
            examples = [indexed[i] for i in range(min(self.args.dry_run_examples, len(dataset)))]
        return self._prepare_inputs(self.data_collator(examples))

    def _prepare_inputs(self, inputs: dict) -> dict:
        inputs = super()._prepare_inputs(inputs)
        if self.args.channels_last:  # the images once per batch, in the layout of the models' weights
            inputs = {k: v.contiguous(memory_format=torch.channels_last)
                      if isinstance(v, torch.Tensor) and v.dim() == 4 and v.is_floating_point() else v
                      for k, v in inputs.items()}
        return inputs

    def _student_inputs(self, inputs: dict) -> dict:
        return {k: v for k, v in inputs.items() if k in self._student_input_names}

    def _set_signature_columns_if_needed(self) -> None:
        if self._signature_columns is None:
            columns = set(self._student_input_names) | {"label", "label_ids", *self.label_names}
            teacher_names = getattr(self.frozen_teacher, "input_names", set()) if hasattr(self, "frozen_teacher") else set()
            columns |= {TEACHER_INPUT_PREFIX + name for name in teacher_names}
            columns |= {TEACHER_INPUT_PREFIX + name for name in ("pixel_values", "input_ids", "attention_mask")}
            columns |= set(self._loss_field_names)
            if getattr(self, "_needs_index", False):  # a cache teacher reads rows by index (kept by the collator)
                columns.add("index")
            self._signature_columns = sorted(columns)

    # ------------------------------------------------------------------ the loss
    def get_batch_samples(self, epoch_iterator, num_batches: int, device: torch.device):
        """The optimisation step's micro-batches, with a fraction ``lmbda`` of them sampled by the student
        (:mod:`hfdistill.on_policy`); the step's token count is then counted over the batches it trains on."""
        batches, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        if self.args.lmbda <= 0 or not batches:
            return batches, num_items_in_batch
        replaced = False
        for i, batch in enumerate(batches):
            self._on_policy_counts[1] += 1
            if not on_policy.draw(self.args.seed, self.state.global_step, i, self.args.process_index, self.args.lmbda):
                continue
            sampled = on_policy.sample_batch(self.student, batch, temperature=self.args.on_policy_temperature,
                                             max_new_tokens=self.args.on_policy_max_new_tokens)
            if sampled is not None:
                batches[i], replaced = sampled, True
                self._on_policy_counts[0] += 1
        if replaced:
            num_items_in_batch = self._get_num_items_in_batch(batches, device)
        return batches, num_items_in_batch

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        student_inputs = self._student_inputs(inputs)
        if model.training and "task" in self._items_parts and num_items_in_batch is not None:
            student_inputs["num_items_in_batch"] = num_items_in_batch  # the model's loss: sum / the step's tokens
        distill = self._distillation_model(model)
        if not model.training or not distill.terms:
            outputs = model(**student_inputs)
            loss = self._task_loss(outputs, inputs)
            if model.training:
                parts = distill.weigh(loss, {})
                loss = self._step_loss(parts, num_items_in_batch) if parts else loss * 0
            return (loss, outputs) if return_outputs else loss

        # The student's samples (on-policy batches) train on the terms only: no task loss on its own tokens.
        with_task = distill.task_weight > 0 and not inputs.get(on_policy.SAMPLED_FIELD, False)
        if not with_task:
            student_inputs = {k: v for k, v in student_inputs.items() if k not in self.label_names}
        teacher_features = self.frozen_teacher.features(inputs) if self.frozen_teacher is not None else {}
        fields = loss_fields(self._loss_field_names, inputs, self.state, num_items_in_batch, self._optional_loss_fields)
        outputs, term_losses = model(teacher_features=teacher_features, loss_fields=fields, **student_inputs)
        task_loss = self._task_loss(outputs, inputs) if with_task else None
        loss = self._step_loss(distill.weigh(task_loss, term_losses), num_items_in_batch)
        return (loss, outputs) if return_outputs else loss

    def _distillation_model(self, model: nn.Module) -> DistillationModel:
        """The model the Trainer hands over (wrapped for DDP, FSDP or DeepSpeed, or not), unwrapped. Looked up
        once per wrapper: Accelerate's ``unwrap_model`` walks every module and probes installed packages, which
        cost about a millisecond a step."""
        if self._unwrapped is None or self._unwrapped[0] is not model:
            self._unwrapped = (model, self.accelerator.unwrap_model(model))
        return self._unwrapped[1]

    def _step_loss(self, parts: dict[str, torch.Tensor], num_items_in_batch: Any) -> torch.Tensor:
        """A training micro-batch's loss to backpropagate, so that the optimisation step's gradient is that of
        one batch of the step's size: gradient accumulation of 4 x 8 equals a batch of 32, 2 processes equal 1.

        A mean part is divided by the step's micro-batches. A part normalised by the step's token count
        (``_items_parts``, with ``num_items_in_batch`` given) already is; when that count spans the processes
        it is multiplied by their number, which DDP's gradient averaging divides again (as transformers does
        for a model's own loss). The parts are kept for the logs and the non-finite check as step means.
        """
        steps = getattr(self, "current_gradient_accumulation_steps", None) or self.args.gradient_accumulation_steps
        processes = self.accelerator.num_processes if self.args.average_tokens_across_devices else 1
        total, logged = [], {}
        for name, value in parts.items():
            if name in self._items_parts and num_items_in_batch is not None:
                total.append(value * processes)
                logged[name] = (value * (steps * processes)).detach()
            else:
                total.append(value / steps)
                logged[name] = value.detach()
        self._step_parts.append(logged)
        return torch.stack(total).sum()

    # ------------------------------------------------------------------ numerical guards
    def _nonfinite(self, what: str, step: int | None = None) -> None:
        step = self.state.global_step + 1 if step is None else step
        if self.args.nonfinite == "skip":
            self._nonfinite_steps += 1
            if self._nonfinite_steps == 1:
                logger.warning(f"step {step}: {what} is not finite; skipping such steps (nonfinite: skip), counted "
                               "in the logs as `nonfinite_steps`")
            return
        checkpoint = last_complete_checkpoint(self.args.output_dir)
        raise TrainingDivergedError(
            f"training stopped at step {step}: {what} is not finite. "
            + (f"The newest complete checkpoint is {checkpoint}. " if checkpoint else "No checkpoint was written. ")
            + "Lower the learning rate or the term's weight, check its parameters, or set `training.nonfinite: "
            "skip` to skip such steps."
        )

    def _get_grad_norm(self, model, grad_norm=None):
        """The Trainer's gradient norm, checked once per optimiser step together with the loss parts of the
        step's micro-batches, so that a NaN never trains silently. A finite step's parts go to the logged means;
        a non-finite one stops training naming the term (``nonfinite: stop``) or is skipped (``skip``: no
        gradients, nothing logged).

        On CUDA under ``stop`` the verdict travels to the host without waiting (:class:`PendingCheck`) and is
        read at the next step, or before anything is logged, evaluated or saved, and when training ends: no
        host-device sync per step, and a non-finite step stops training one step later, before its result
        reaches a log, a checkpoint or the saved student. Elsewhere it is read at once (on the CPU a read costs
        nothing; ``skip`` must act before the optimiser step)."""
        if grad_norm is None:  # no clipping (max_grad_norm 0): the norm alone
            grad_norm = self._unclipped_grad_norm(model)
        grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        step_parts, self._step_parts = self._step_parts, []
        values = [value.float().reshape(()) for parts in step_parts for value in parts.values()]
        if grad_norm is not None:
            device = values[0].device if values else None
            values.append(torch.as_tensor(grad_norm, dtype=torch.float32, device=device).reshape(()))
        if not values:
            return grad_norm
        finite = torch.isfinite(torch.stack(values)).all()
        if self._defers_check(finite.device):
            self.check_pending_step()  # the previous step's verdict, a step after it left the device
            self._pending = PendingCheck.start(self.state.global_step + 1, finite, step_parts, grad_norm)
            for parts in step_parts:
                self._accumulate(parts)
            return grad_norm
        if bool(finite):
            for parts in step_parts:
                self._accumulate(parts)
            return grad_norm
        self._nonfinite(nonfinite_description(step_parts, grad_norm))
        model.zero_grad(set_to_none=True)  # skip: the optimiser leaves parameters without gradients alone
        return grad_norm

    def _defers_check(self, device: torch.device) -> bool:
        wanted = device.type == "cuda" if self._defer_checks is None else self._defer_checks  # tests: on the CPU
        return self.args.nonfinite == "stop" and wanted

    def check_pending_step(self) -> None:
        """Read the verdict of a step whose check was deferred (CUDA, ``nonfinite: stop``) and stop training if
        it was not finite; nothing to do otherwise. Called before logging, evaluating and saving."""
        pending, self._pending = self._pending, None
        if pending is not None and not pending.finite():
            self._nonfinite(nonfinite_description(pending.parts, pending.grad_norm), step=pending.step)

    def _unclipped_grad_norm(self, model: nn.Module) -> torch.Tensor | None:
        """The gradients' total norm when nothing clips them, for one process or DDP (whose gradients are whole
        on every process); None elsewhere (FSDP, DeepSpeed, tensor-parallel ``DTensor`` gradients: the Trainer
        asks Accelerate, which knows the shards). The Trainer would clip to infinity instead, a pass that
        multiplies every gradient by 1."""
        if self.accelerator.distributed_type not in (DistributedType.NO, DistributedType.MULTI_CPU,
                                                     DistributedType.MULTI_GPU) \
                or not hasattr(torch.nn.utils, "get_total_norm"):  # torch < 2.6
            return None
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        if not grads or any(type(g) is not torch.Tensor for g in grads):  # a subclass: DTensor and the like
            return None
        self.accelerator.unscale_gradients()  # fp16: the norm of the true gradients, as when clipping
        return torch.nn.utils.get_total_norm(grads, 2.0)

    def _task_loss(self, outputs: Any, inputs: dict) -> torch.Tensor:
        loss = outputs.get("loss") if isinstance(outputs, dict) else None
        if loss is not None:
            return loss
        # DeiT with a distillation token: the class-token head alone learns the labels (its `logits` average both heads).
        logits_key = "cls_logits" if isinstance(outputs, dict) and outputs.get("cls_logits") is not None else "logits"
        labels = next((inputs[name] for name in self.label_names if name in inputs), None)
        if labels is None:
            raise DistillationError(
                "the student returned no loss and the batch has no labels; give the dataset a `labels` column "
                "or set task_weight: 0 to train on the distillation terms alone"
            )
        logits = outputs[logits_key] if isinstance(outputs, dict) else outputs
        if self._task_loss_fn is not None:
            return self._task_loss_fn(logits, labels)
        return F.cross_entropy(logits.flatten(0, -2).float(), labels.flatten(), ignore_index=-100)

    # ------------------------------------------------------------------ optimiser and schedule
    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        """The Trainer's optimizer over student + adapters + loss modules; optionally another lr for the latter."""
        optimizer = super().create_optimizer(model)
        distill_lr = self.args.distill_learning_rate
        if distill_lr is None:
            return optimizer
        distill: DistillationModel = self.model
        distill_ids = {id(p) for p in list(distill.adapters.parameters()) + list(distill.losses.parameters())}
        for group in list(optimizer.param_groups):
            own = [p for p in group["params"] if id(p) in distill_ids]
            if own:
                group["params"] = [p for p in group["params"] if id(p) not in distill_ids]
                optimizer.add_param_group({**{k: v for k, v in group.items() if k != "params"}, "params": own, "lr": distill_lr})
        return optimizer

    def create_scheduler(self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None):
        """The Trainer's scheduler, or the literature's step decay when ``lr_decay_epochs`` is set."""
        decay_epochs = self.args.lr_decay_epochs
        if decay_epochs is None or self.lr_scheduler is not None:
            return super().create_scheduler(num_training_steps, optimizer)
        # The Trainer plans num_training_steps = epochs x optimiser steps per epoch.
        steps_per_epoch = num_training_steps / self.args.num_train_epochs
        warmup = self.args.get_warmup_steps(num_training_steps)
        rate = self.args.lr_decay_rate

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / (warmup + 1)
            return rate ** sum(step >= epoch * steps_per_epoch for epoch in decay_epochs)

        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer or self.optimizer, factor)
        self._created_lr_scheduler = True
        return self.lr_scheduler

    # ------------------------------------------------------------------ logging
    def _accumulate(self, parts: dict[str, torch.Tensor]) -> None:
        # Device-side sums, read only when logging: no host-device sync per step.
        for name, value in parts.items():
            key = f"loss_{name}"
            if key in self._term_sums:
                self._term_sums[key] += value.float()
            else:
                self._term_sums[key] = value.float().clone()
        self._term_count += 1

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        self.check_pending_step()  # nothing non-finite is logged
        if "loss" in logs and self._nonfinite_steps:
            logs["nonfinite_steps"] = self._nonfinite_steps
        if "loss" in logs and self._on_policy_counts[1]:
            logs["on_policy_fraction"] = round(self._on_policy_counts[0] / self._on_policy_counts[1], 4)
            self._on_policy_counts = [0, 0]
        if "loss" in logs and self._term_count:
            names = list(self._term_sums)
            means = torch.stack([self._term_sums[n] for n in names]) / self._term_count
            means = self.accelerator.reduce(means, reduction="mean") if self.accelerator.num_processes > 1 else means
            logs.update({n: round(float(v), 6) for n, v in zip(names, means.tolist())})
            self._term_sums.clear()
            self._term_count = 0
        super().log(logs, start_time)

    # ------------------------------------------------------------------ train / eval
    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs):
        if resume_from_checkpoint is True:  # the newest *complete* checkpoint, not merely the newest folder
            checkpoint = last_complete_checkpoint(self.args.output_dir)
            if checkpoint is None:
                raise DistillationError(
                    f"resume_from_checkpoint=True, but {self.args.output_dir} has no complete checkpoint "
                    f"(one with {CHECKPOINT_COMPLETE_NAME}); train without it to start from the beginning"
                )
            logger.info(f"Resuming from {checkpoint}, the newest complete checkpoint.")
            resume_from_checkpoint = checkpoint
        elif isinstance(resume_from_checkpoint, (str, os.PathLike)) and os.path.isdir(resume_from_checkpoint) \
                and not os.path.isfile(os.path.join(resume_from_checkpoint, CHECKPOINT_COMPLETE_NAME)):
            newest = last_complete_checkpoint(os.path.dirname(os.path.normpath(resume_from_checkpoint)))
            raise DistillationError(
                f"{resume_from_checkpoint} is not a complete checkpoint (no {CHECKPOINT_COMPLETE_NAME}: the run stopped "
                "while writing it)" + (f"; resume from {newest}, the newest complete one" if newest else "")
            )
        return self._train_distilled(resume_from_checkpoint, *args, **kwargs)

    def _train_distilled(self, *args, **kwargs):
        distill: DistillationModel = self.model
        distill.student_taps.attach()
        if self.frozen_teacher is not None:
            self.frozen_teacher.attach()
        try:
            with distill.trainable(self.stage.train, f"{self.stage_path}.train"):
                result = super().train(*args, **kwargs)
            self.check_pending_step()  # the last step's
            return result
        finally:
            self._pending = None
            distill.student_taps.remove()
            if self.frozen_teacher is not None:
                self.frozen_teacher.remove()
            self._term_sums.clear()
            self._term_count = 0
            self._step_parts.clear()

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        loss, logits, labels = super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)
        return loss, logits, compact_label_maps(labels, self._num_labels)  # kept for the whole eval set

    @property
    def _num_labels(self) -> int | None:
        return getattr(getattr(self.student, "config", None), "num_labels", None)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        self.check_pending_step()
        metrics = super().evaluate(eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)
        if self._teacher_is_cache and self.args.evaluate_teacher and not getattr(self, "_cache_eval_noted", False):
            self._cache_eval_noted = True  # the cache holds training examples only
            logger.info("The teacher is a cache of its outputs on the training data: no teacher evaluation "
                        "(eval_teacher_*); evaluate the teacher model itself to report it.")
        if self.teacher is not None and self.args.evaluate_teacher and self.label_names:
            dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
            key = f"{metric_key_prefix}:{id(dataset)}"
            if key not in self._teacher_eval_metrics:  # the teacher is frozen: evaluate it once
                self._teacher_eval_metrics[key] = self._evaluate_teacher(eval_dataset, f"{metric_key_prefix}_teacher")
                self.log(dict(self._teacher_eval_metrics[key]))
            metrics.update(self._teacher_eval_metrics[key])
        return metrics

    def _evaluate_teacher(self, eval_dataset, prefix: str) -> dict[str, float]:
        if isinstance(eval_dataset, dict) or (eval_dataset is None and isinstance(self.eval_dataset, dict)):
            return {}
        dataloader: DataLoader = self.get_eval_dataloader(eval_dataset)
        label_name = self.label_names[0]
        if not self.args.eval_do_concat_batches:  # labels the Trainer cannot concatenate (a detector's dicts)
            return self._evaluate_teacher_batches(dataloader, label_name, prefix)
        logits = labels = None
        for batch in dataloader:
            batch = self._prepare_inputs(batch)
            batch_logits = self.frozen_teacher.logits(batch).float()
            batch_labels = compact_label_maps(batch[label_name], self._num_labels)
            if self.preprocess_logits_for_metrics is not None:  # as for the student (a language model: per-token NLL)
                batch_logits = self.preprocess_logits_for_metrics(batch_logits, batch_labels)
            if batch_labels.dim() > 1:  # sequences: lengths differ between processes and batches (as the Trainer pads)
                batch_logits = self.accelerator.pad_across_processes(batch_logits, dim=1, pad_index=-100)
                batch_labels = self.accelerator.pad_across_processes(batch_labels, dim=1, pad_index=-100)
            batch_logits, batch_labels = self.accelerator.gather_for_metrics((batch_logits, batch_labels))
            logits = nested_concat(logits, batch_logits.cpu(), padding_index=-100) if logits is not None else batch_logits.cpu()
            labels = nested_concat(labels, batch_labels.cpu(), padding_index=-100) if labels is not None else batch_labels.cpu()
        metrics = {}
        if logits.dim() == 2 and labels.dim() == 1 and not labels.is_floating_point():
            metrics[f"{prefix}_loss"] = float(F.cross_entropy(logits, labels))
        if self.compute_metrics is not None:
            computed = self.compute_metrics(EvalPrediction(predictions=logits.numpy(), label_ids=labels.numpy()))
            metrics.update({f"{prefix}_{k}": v for k, v in computed.items()})
        return metrics

    def _evaluate_teacher_batches(self, dataloader: DataLoader, label_name: str, prefix: str) -> dict[str, float]:
        """The teacher's metrics with predictions and labels kept per batch (``eval_do_concat_batches=False``): its
        whole outputs reduced by ``teacher_preprocess_logits`` (else the student's reduction), labels as given."""
        reduce = self.teacher_preprocess_logits or self.preprocess_logits_for_metrics
        predictions, labels = [], []
        for batch in dataloader:
            batch = self._prepare_inputs(batch)
            batch_labels = batch[label_name]
            outputs = self.frozen_teacher.outputs(batch)
            reduced = reduce(outputs, batch_labels) if reduce is not None else logits_of(outputs)
            reduced, batch_labels = self.accelerator.gather_for_metrics((reduced, batch_labels))
            predictions.append(nested_numpify(nested_detach(reduced)))
            labels.append(nested_numpify(nested_detach(batch_labels)))
        if self.compute_metrics is None:
            return {}
        computed = self.compute_metrics(EvalPrediction(predictions=predictions, label_ids=labels))
        return {f"{prefix}_{k}": v for k, v in computed.items()}

    # ------------------------------------------------------------------ students beside the student
    def extra_students(self) -> dict[str, nn.Module]:
        """Models the loss modules train beside the student and publish as students of their own (DML's peers).

        A loss module offers them with ``extra_students() -> {name: model}`` (models of the student's class:
        a timm model for a timm student). Names are kept as the module gives them when one term has extra
        students, and prefixed with the term's name (``<term>_<name>``) when several terms do.
        """
        offered = {name: module.extra_students() for name, module in self.model.losses.items()
                   if callable(getattr(module, "extra_students", None))}
        offered = {term: models for term, models in offered.items() if models}
        if len(offered) == 1:
            return dict(next(iter(offered.values())))
        return {f"{term}_{name}": model for term, models in offered.items() for name, model in models.items()}

    def student_trainer(self, model: nn.Module, args: DistillationConfig) -> "DistillationTrainer":
        """A trainer for another model of the student's kind (an extra student): no teacher, no terms.

        It has this trainer's datasets, collator, processor, metrics and label names, so its ``evaluate()``,
        ``save_model()`` and ``create_model_card()`` do for ``model`` exactly what they do for the student
        (a timm model is saved through ``TimmWrapperForImageClassification``, with the student's label names
        and creation arguments, read from its config). ``args`` give its ``output_dir``.
        """
        args.eval_do_concat_batches = self.args.eval_do_concat_batches  # evaluated as the student is
        collator = self.data_collator
        if isinstance(collator, IndexedCollator):  # the index is for loss state; this trainer has no terms
            collator = collator.collator
        config = self.student.config
        return DistillationTrainer(
            model=model,
            recipe=Recipe(),
            args=args,
            train_dataset=self.train_dataset,
            eval_dataset=self.eval_dataset,
            data_collator=collator,
            processing_class=self.processing_class,
            compute_metrics=self.compute_metrics,
            preprocess_logits_for_metrics=self.preprocess_logits_for_metrics,
            task_loss=self._task_loss_fn,
            teacher_preprocess_logits=self.teacher_preprocess_logits,
            id2label=dict(getattr(config, "id2label", None) or {}) or None,
            timm_model_args=getattr(config, "model_args", None),
        )

    # ------------------------------------------------------------------ saving / loading
    def distill_state(self) -> dict[str, torch.Tensor]:
        """Adapters' and loss modules' state (never in the saved student), e.g. to carry into the next stage."""
        return self.model.distill_state_dict()

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Write the bare student (contract 4): no adapter, loss or teacher tensors; never non-finite weights."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        self.check_pending_step()
        tensors = self.student.state_dict().items()  # parameters and buffers (batch-norm statistics)
        bad = next((name for name, v in tensors if v.is_floating_point() and not bool(torch.isfinite(v).all())), None)
        if bad is not None:
            checkpoint = last_complete_checkpoint(self.args.output_dir)
            raise TrainingDivergedError(
                f"the student's weights are not finite (first: {bad!r}), so nothing is saved to {output_dir}; "
                + (f"the newest complete checkpoint is {checkpoint}; " if checkpoint else "")
                + "lower the learning rate or the terms' weights"
            )
        if state_dict is not None:
            state_dict = {k[len("student."):]: v for k, v in state_dict.items() if k.startswith("student.")}
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        self.student.save_pretrained(output_dir, state_dict=state_dict, is_main_process=self.args.should_save)
        default_file_mode(glob.glob(os.path.join(output_dir, "*.safetensors")))
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def _save_checkpoint(self, model, trial) -> None:
        self.check_pending_step()  # on every process (only the main one writes the student)
        # transformers rotates (deletes the oldest checkpoints) before this one is complete: a run killed in
        # between would be left with fewer complete checkpoints than save_total_limit, or none. Rotate after.
        limit, self.args.save_total_limit = self.args.save_total_limit, None
        # Nor is a checkpoint pushed (hub_strategy checkpoint / all_checkpoints) before it is complete: an upload
        # listing its files while the marker is written could fail, or send a checkpoint that resume refuses.
        self._checkpoint_push_deferred, self._checkpoint_to_push = True, None
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.save_total_limit = limit
            self._checkpoint_push_deferred = False
        run_dir = self._get_output_dir(trial=trial)
        folder = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        # Every process has written its part (its RNG state) before the main one marks the checkpoint whole.
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            save_distill_state(self.distill_state(), folder)
            # Written last: a checkpoint is complete only with it (a run killed while writing leaves none).
            mark_checkpoint_complete(folder, self.state.global_step)
            rotate_checkpoints(run_dir, limit, keep=self.state.best_model_checkpoint)
        if self._checkpoint_to_push is not None:
            self._push_from_checkpoint(self._checkpoint_to_push)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        distill: DistillationModel = self.accelerator.unwrap_model(model if model is not None else self.model)
        load_student_weights(distill.student, resume_from_checkpoint)
        state = load_distill_state(resume_from_checkpoint, device=self.args.device)
        if state is not None:
            distill.load_distill_state_dict(state)
        elif distill.distill_state_dict():
            raise DistillationError(
                f"checkpoint {resume_from_checkpoint} has no {DISTILL_STATE_NAME}, but this recipe trains adapters "
                "or loss modules; resume with the recipe the checkpoint was made with"
            )

    def _load_best_model(self) -> None:
        self._load_from_checkpoint(self.state.best_model_checkpoint)


# ---------------------------------------------------------------------- helpers
def augmentation_setter(dataset: Any) -> Callable[[int, int], None] | None:
    """``set_augmentation_epoch(epoch, seed)`` of a training dataset or of its ``datasets`` transform (hfdistill's
    image transforms draw each example's augmentation from its content, the epoch and the seed), or None.
    (Not ``set_epoch``: Accelerate calls that on datasets with the epoch alone, and not after a resume's skip.)"""
    setter = getattr(dataset, "set_augmentation_epoch", None)
    if setter is None and isinstance(dataset, datasets.Dataset):
        transform = (dataset.format.get("format_kwargs") or {}).get("transform")
        setter = getattr(transform, "set_augmentation_epoch", None)
    return setter if callable(setter) else None


class _AugmentationEpoch(TrainerCallback):
    """Tells the training data which epoch starts (before its loader's workers start), with the run's seed.

    With a teacher cache of N augmented views (FKD), epoch e replays view e % N instead: the data draws the
    augmentations of that view (as at epoch e % N of a run seeded with the cache's view seed), and the cache
    reads the teacher's outputs on exactly those images.
    """

    def __init__(self, setter: Callable[[int, int], None], views_cache: Any = None):
        self.setter, self.views_cache = setter, views_cache

    def on_epoch_begin(self, args, state, control, **kwargs):
        # A resumed run starts mid-epoch (state.epoch = 1.5 -> epoch 1); a finished epoch k ends at k.0.
        epoch = int(math.floor((state.epoch or 0.0) + 1e-6))
        if self.views_cache is not None:
            self.setter(self.views_cache.set_view(epoch), int(self.views_cache.view_seed))
        else:
            self.setter(epoch, args.seed)


def _batch_norm_need(module: nn.Module) -> int:
    """2 when ``module`` holds a batch-norm that normalises with batch statistics in training, else 1."""
    return 2 if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules()) else 1


def _load_recipe(recipe: Recipe | dict | str | os.PathLike | None, teacher: Any) -> Recipe:
    if isinstance(recipe, Recipe):
        recipe.validate()
        return recipe
    if isinstance(recipe, dict):
        return Recipe.from_dict(recipe)
    if isinstance(recipe, (str, os.PathLike)):
        return Recipe.from_yaml(recipe)
    if recipe is None:
        if teacher is None:
            return Recipe()
        logger.info("No recipe given: distilling the teacher's logits with a single `kd` term (T=4).")
        return Recipe.from_dict({"terms": [{"loss": "kd"}]})
    raise DistillationError(f"recipe must be a Recipe, a dict or a YAML path, got {type(recipe).__name__}")
