"""DistillationTrainer: a ``transformers.Trainer`` that trains a student against a frozen teacher.

The loss is ``task_weight * student task loss + sum_i weight_i * term_i`` where each recipe term
reads taps of both models. Adapters and trainable loss state live next to the student in one
:class:`DistillationModel`, so one optimiser, one DDP wrapper and one checkpoint cover them;
``save_model`` writes the bare student only (DESIGN.md, contracts 4 and 5).
"""

from __future__ import annotations

import inspect
import logging
import os
from dataclasses import dataclass
from typing import Any, Callable

import datasets
import safetensors.torch
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from transformers import PreTrainedModel, TimmWrapperImageProcessor, Trainer
from transformers.trainer_utils import EvalPrediction, PREFIX_CHECKPOINT_DIR
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME

from . import losses as loss_registry
from .adapters import build_adapter, suggest_adapter
from .config import DistillationConfig
from .errors import DistillationError
from .models import is_timm_model, student_tap_root, wrap_timm_model
from .recipe import Recipe, TermSpec, term_name
from .taps import ModelTaps
from .trainer_hub import HubTrainerMixin

logger = logging.getLogger(__name__)

DISTILL_STATE_NAME = "distill_state.safetensors"
TEACHER_INPUT_PREFIX = "teacher_"
# Trainer-supplied values a loss may ask for besides batch fields.
PROGRESS_FIELDS = ("epoch", "step")
# Batch fields a loss handles being absent (image batches have no attention mask): passed as None.
OPTIONAL_FIELDS = ("attention_mask",)


@dataclass
class _Term:
    """A recipe term resolved against the models."""

    name: str
    spec: TermSpec
    student_taps: list[str]
    teacher_taps: list[str]
    is_list: bool  # the term reads lists of taps
    fields: tuple[str, ...]


def _taps_of(spec_value: str | list[str] | None, default: str | None) -> tuple[list[str], bool]:
    if spec_value is None:
        return [default], False
    if isinstance(spec_value, list):
        return list(spec_value), True
    return [spec_value], False


def _shape_of(value: Any) -> torch.Size | list:
    if isinstance(value, torch.Tensor):
        return value.shape
    if isinstance(value, (list, tuple)):
        return [_shape_of(v) for v in value]
    raise DistillationError(f"a tap gave a {type(value).__name__}, not a tensor")


def _to_float(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.float() if value.is_floating_point() and value.dtype != torch.float32 else value
    if isinstance(value, (list, tuple)):
        return [_to_float(v) for v in value]
    return value


class DistillationModel(nn.Module):
    """The student plus everything trained with it: adapters and the loss modules.

    ``forward(**student_inputs)`` runs the bare student (evaluation, prediction). With
    ``teacher_features`` it also records the student's taps and returns
    ``(student_outputs, {term name: weighted term loss})``, so that under DDP every trainable
    parameter is used inside the one wrapped forward.
    """

    def __init__(self, student: PreTrainedModel, tap_root: nn.Module):
        super().__init__()
        self.student = student
        self.adapters = nn.ModuleDict()
        self.losses = nn.ModuleDict()
        self.terms: list[_Term] = []
        self.student_taps = ModelTaps(tap_root, [], "student")

    # Attributes the Trainer reads from its model.
    @property
    def config(self):
        return self.student.config

    @property
    def main_input_name(self) -> str:
        return getattr(self.student, "main_input_name", "input_ids")

    # Checkpointing is the student's business: pass the Trainer's request through unchanged.
    def activation_checkpointing_enable(self, **kwargs) -> None:
        if hasattr(self.student, "activation_checkpointing_enable"):
            self.student.activation_checkpointing_enable(**kwargs)
        else:
            self.student.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs=kwargs.get("activation_checkpointing_kwargs")
            )

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None, **kwargs) -> None:
        self.student.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gradient_checkpointing_kwargs)

    def gradient_checkpointing_disable(self) -> None:
        self.student.gradient_checkpointing_disable()

    def distill_state_dict(self) -> dict[str, torch.Tensor]:
        state = {f"adapters.{k}": v for k, v in self.adapters.state_dict().items()}
        state.update({f"losses.{k}": v for k, v in self.losses.state_dict().items()})
        return state

    def load_distill_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.adapters.load_state_dict({k[len("adapters."):]: v for k, v in state.items() if k.startswith("adapters.")})
        self.losses.load_state_dict({k[len("losses."):]: v for k, v in state.items() if k.startswith("losses.")})

    def forward(self, teacher_features: dict | None = None, loss_fields: dict | None = None, **student_inputs):
        if teacher_features is None:
            return self.student(**student_inputs)
        with self.student_taps.recording():
            outputs = self.student(**student_inputs, **self.student_taps.forward_kwargs)
        student_features = self.student_taps.gather(outputs)
        self.student_taps.clear()
        term_losses = {}
        for term in self.terms:
            student_value, teacher_value = self.select(term, student_features, teacher_features)
            fields = {name: loss_fields[name] for name in term.fields}
            term_losses[term.name] = term.spec.weight * self.losses[term.name](student_value, teacher_value, **fields)
        return outputs, term_losses

    def select(self, term: _Term, student_features: dict, teacher_features: dict) -> tuple[Any, Any]:
        """The (adapted) student value and the teacher value a term's loss receives."""
        student_values = [student_features[t] for t in term.student_taps]
        teacher_values = [teacher_features.get(t) for t in term.teacher_taps]
        if term.name in self.adapters:
            student_values = [adapter(v) for adapter, v in zip(self.adapters[term.name], student_values)]
        if term.is_list:
            return student_values, teacher_values
        return student_values[0], teacher_values[0]


class DistillationTrainer(HubTrainerMixin, Trainer):
    """``Trainer`` for knowledge distillation.

    Args:
        model: the student: a transformers ``PreTrainedModel`` or a timm model (wrapped into
            ``TimmWrapperForImageClassification`` so it saves like a transformers model; the same
            module object is trained).
        teacher: the teacher: a transformers model, a timm model, or any ``nn.Module`` whose forward
            takes the main input tensor. It is frozen: no gradients, eval mode, never in DDP.
        recipe: a :class:`Recipe`, a dict, or a YAML path; only ``terms`` and ``task_weight`` are used
            here. Without a recipe a teacher is distilled with a single ``kd`` term.
        teacher_inputs: optional ``batch -> teacher inputs`` function, for a teacher that needs other
            inputs (its own normalisation or tokeniser). By default the teacher receives the batch's
            ``teacher_*`` fields (prefix removed) and otherwise the student's inputs.
        id2label: label names for a timm student (saved into its ``config.json``).
        timm_model_args: keyword arguments a timm student was created with (``in_chans``, ...).
        All other arguments are those of ``transformers.Trainer``.
    """

    def __init__(
        self,
        model: nn.Module | None = None,
        teacher: nn.Module | None = None,
        recipe: Recipe | dict | str | os.PathLike | None = None,
        args: DistillationConfig | None = None,
        teacher_inputs: Callable[[dict], dict] | None = None,
        id2label: dict[int, str] | None = None,
        timm_model_args: dict | None = None,
        **kwargs,
    ):
        if model is None:
            raise DistillationError("DistillationTrainer needs a student `model`")
        if args is None:
            args = DistillationConfig(output_dir="hfdistill_output")
        elif not isinstance(args, DistillationConfig):
            raise DistillationError(
                f"args must be a DistillationConfig (a TrainingArguments subclass), got {type(args).__name__}"
            )
        self.recipe = self._load_recipe(recipe, teacher)
        if teacher is None:
            needy = [t.loss for t in self.recipe.terms if loss_registry.needs_teacher(t.loss, t.params)]
            if needy:
                raise DistillationError(
                    f"the recipe's term(s) {needy} need a teacher but none was given; "
                    "pass `teacher=` or remove those terms to train the model on its own"
                )
        self.task_weight = self.recipe.task_weight if self.recipe.task_weight is not None else args.task_weight

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
        if is_timm_model(model) and kwargs.get("processing_class") is None:
            # The saved folder must run in pipeline(): derive the image processor from the timm pretrained_cfg.
            kwargs["processing_class"] = TimmWrapperImageProcessor(
                pretrained_cfg=student.config.pretrained_cfg, architecture=student.config.architecture
            )
        created = _missing_folders(args.output_dir)
        super().__init__(model=DistillationModel(student, tap_root), args=args, **kwargs)
        try:
            self._setup_distillation(teacher, teacher_inputs, tap_root)
        except Exception:
            # Bad input must leave nothing behind: drop the folders the Trainer just made, while still empty.
            _remove_empty_folders(created)
            raise

    def _setup_distillation(self, teacher: nn.Module | None, teacher_inputs, tap_root: nn.Module) -> None:
        student = self.student
        # Our compute_loss returns per-micro-batch means; the Trainer divides them by the accumulation steps.
        self.model_accepts_loss_kwargs = False
        self.loss_is_scaled_for_ga = False
        if self.args.label_names is None:
            from transformers.utils import find_labels

            self.label_names = find_labels(type(student))
        self._student_input_names = set(inspect.signature(student.forward).parameters)

        self.teacher = self._prepare_teacher(teacher) if teacher is not None else None
        self.teacher_inputs_fn = teacher_inputs
        self._teacher_input_names = (
            set(inspect.signature(self.teacher.forward).parameters) if self.teacher is not None else set()
        )
        self._teacher_eval_metrics: dict[str, dict[str, float]] = {}
        self._term_sums: dict[str, torch.Tensor] = {}
        self._term_count = 0

        distill = self.model
        distill.terms = self._resolve_terms()
        self._loss_field_names = {name for term in distill.terms for name in term.fields}
        distill.student_taps = ModelTaps(tap_root, [t for term in distill.terms for t in term.student_taps], "student")
        self.teacher_taps = ModelTaps(
            self.teacher if self.teacher is not None else nn.Module(),
            [t for term in distill.terms for t in term.teacher_taps],
            "teacher",
        )
        distill.student_taps.check_paths()
        self.teacher_taps.check_paths()
        self._use_eager_attention_if_needed(student, distill.student_taps)
        if self.teacher is not None:
            self._use_eager_attention_if_needed(self.teacher, self.teacher_taps)
        if distill.terms:
            self._build_term_modules()

    # ------------------------------------------------------------------ set-up
    @staticmethod
    def _load_recipe(recipe: Recipe | dict | str | os.PathLike | None, teacher: nn.Module | None) -> Recipe:
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

    def _prepare_teacher(self, teacher: nn.Module) -> nn.Module:
        if not isinstance(teacher, nn.Module):
            raise DistillationError(f"the teacher must be an nn.Module, got {type(teacher).__name__}")
        teacher.requires_grad_(False)
        teacher.eval()
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(
            self.args.teacher_dtype
        )
        if getattr(teacher, "hf_device_map", None) is None:
            teacher.to(device=self.args.device, dtype=dtype) if dtype else teacher.to(self.args.device)
        elif dtype is not None:
            teacher.to(dtype=dtype)
        self._teacher_dtype = next((p.dtype for p in teacher.parameters() if p.is_floating_point()), None)
        return teacher

    def _resolve_terms(self) -> list[_Term]:
        terms = []
        for index, spec in enumerate(self.recipe.terms):
            info = loss_registry.get_info(spec.loss)
            student_taps, student_list = _taps_of(spec.student, info.default_tap)
            teacher_taps, _ = _taps_of(spec.teacher, info.default_tap)
            name = term_name(spec, index, self.recipe.terms)
            terms.append(_Term(name, spec, student_taps, teacher_taps, student_list, tuple(info.fields)))
        return terms

    @staticmethod
    def _use_eager_attention_if_needed(model: nn.Module, taps: ModelTaps) -> None:
        # Attention maps come back only from the eager implementation.
        if taps.forward_kwargs.get("output_attentions") and isinstance(model, PreTrainedModel):
            if getattr(model.config, "_attn_implementation", "eager") != "eager":
                model.set_attn_implementation("eager")

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
            examples = [dataset[i] for i in range(min(self.args.dry_run_examples, len(dataset)))]
        collator = self.data_collator
        batch = collator(examples)
        return self._prepare_inputs(batch)

    def _build_term_modules(self) -> None:
        """One dry-run forward of both models: check every tap, size adapters, configure loss modules."""
        distill: DistillationModel = self.model
        batch = self._dry_run_batch()
        was_training = distill.training
        distill.eval()
        distill.student_taps.attach()
        self.teacher_taps.attach()
        try:
            with torch.no_grad():
                with distill.student_taps.recording():
                    outputs = distill.student(**self._student_inputs(batch), **distill.student_taps.forward_kwargs)
                student_features = distill.student_taps.gather(outputs)
                teacher_features = self._teacher_features(batch)
        finally:
            distill.student_taps.remove()
            self.teacher_taps.remove()
            distill.train(was_training)
        device = self.args.device
        for term in distill.terms:
            info = loss_registry.get_info(term.spec.loss)
            s_shapes = [_shape_of(student_features[t]) for t in term.student_taps]
            # Without a teacher model (teacher-free terms) there is no teacher shape.
            t_shapes = [_shape_of(teacher_features[t]) if t in teacher_features else None for t in term.teacher_taps]
            where = f"term {term.name!r} ({term.spec.loss})"
            if term.spec.adapter is not None:
                if term.is_list and len(s_shapes) != len(t_shapes):
                    raise DistillationError(f"{where}: an adapter pairs taps one to one; got {len(s_shapes)} student and {len(t_shapes)} teacher taps")
                try:
                    adapters = nn.ModuleList(
                        build_adapter(term.spec.adapter, s, t, **term.spec.adapter_params)
                        for s, t in zip(s_shapes, t_shapes)
                    )
                except (ValueError, TypeError) as exc:
                    raise DistillationError(f"{where}: {exc}") from None
                distill.adapters[term.name] = adapters.to(device)
                with torch.no_grad():
                    s_shapes = [a(student_features[t]).shape for a, t in zip(adapters, term.student_taps)]
            if info.same_shape and self.teacher is not None:
                for s_tap, t_tap, s, t in zip(term.student_taps, term.teacher_taps, s_shapes, t_shapes):
                    if s != t:
                        hint = (
                            f"add `adapter: {suggest_adapter(s, t)}` to the term"
                            if term.spec.adapter is None
                            else f"adapter {term.spec.adapter!r} gives {tuple(s)}; pick one that maps to the teacher's shape"
                        )
                        raise DistillationError(
                            f"{where}: student tap {s_tap!r} has shape {tuple(s)} but teacher tap {t_tap!r} has "
                            f"shape {tuple(t)}; {hint}"
                        )
            loss_module = loss_registry.build(term.spec.loss, **term.spec.params)
            if hasattr(loss_module, "configure"):
                if term.is_list:
                    loss_module.configure(s_shapes, t_shapes)
                else:
                    loss_module.configure(s_shapes[0], t_shapes[0])
            distill.losses[term.name] = loss_module.to(device)

    # ---------------------------------------------------------------- forward
    def _student_inputs(self, inputs: dict) -> dict:
        return {k: v for k, v in inputs.items() if k in self._student_input_names}

    def _teacher_call_inputs(self, inputs: dict) -> dict:
        if self.teacher_inputs_fn is not None:
            return self.teacher_inputs_fn(inputs)
        own = {k[len(TEACHER_INPUT_PREFIX):]: v for k, v in inputs.items() if k.startswith(TEACHER_INPUT_PREFIX)}
        shared = {k: v for k, v in inputs.items() if k in self._student_input_names and k not in self.label_names}
        return {**shared, **own}

    def _call_teacher(self, teacher_inputs: dict) -> Any:
        teacher = self.teacher
        dtype = self._teacher_dtype
        if dtype is not None and dtype != torch.float32:  # a half-precision teacher takes half-precision inputs
            teacher_inputs = {
                k: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
                for k, v in teacher_inputs.items()
            }
        if isinstance(teacher, PreTrainedModel):
            accepted = {k: v for k, v in teacher_inputs.items() if k in self._teacher_input_names}
            return teacher(**accepted, **self.teacher_taps.forward_kwargs)
        # timm and plain modules take the main input tensor positionally.
        for key in ("pixel_values", "input_ids", "inputs", "x"):
            if key in teacher_inputs:
                return teacher(teacher_inputs[key])
        raise DistillationError(
            f"cannot tell which input the teacher ({type(teacher).__name__}) takes from {sorted(teacher_inputs)}; "
            "pass `teacher_inputs=` to DistillationTrainer"
        )

    def _teacher_features(self, inputs: dict) -> dict:
        if self.teacher is None:
            return {}
        if self.teacher.training:  # whatever called .train() on it, the teacher runs in eval mode
            self.teacher.eval()
        with torch.no_grad(), self.teacher_taps.recording():
            outputs = self._call_teacher(self._teacher_call_inputs(inputs))
        features = {k: _to_float(v) for k, v in self.teacher_taps.gather(outputs).items()}
        self.teacher_taps.clear()
        return features

    def _loss_fields(self, inputs: dict, fields: set[str]) -> dict:
        values = {}
        for name in fields:
            if name == "epoch":
                values[name] = float(self.state.epoch or 0.0)
            elif name == "step":
                values[name] = int(self.state.global_step)
            elif name in inputs:
                values[name] = inputs[name]
            elif name in OPTIONAL_FIELDS:
                values[name] = None
            else:
                raise DistillationError(
                    f"a loss needs the batch field {name!r}, which the batch does not have "
                    f"(it has {sorted(inputs)}); add it to the dataset"
                )
        return values

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        student_inputs = self._student_inputs(inputs)
        distill: DistillationModel = self.accelerator.unwrap_model(model)
        if not model.training or not distill.terms:
            outputs = model(**student_inputs)
            loss = self._task_loss(outputs, inputs)
            if model.training:
                self._accumulate({"task": self.task_weight * loss.detach()})
                loss = self.task_weight * loss
            return (loss, outputs) if return_outputs else loss

        if self.task_weight == 0:
            student_inputs = {k: v for k, v in student_inputs.items() if k not in self.label_names}
        teacher_features = self._teacher_features(inputs)
        outputs, term_losses = model(
            teacher_features=teacher_features, loss_fields=self._loss_fields(inputs, self._loss_field_names),
            **student_inputs,
        )
        parts = dict(term_losses)
        if self.task_weight > 0:
            parts = {"task": self.task_weight * self._task_loss(outputs, inputs), **parts}
        loss = torch.stack([p.float() for p in parts.values()]).sum()
        self._accumulate({name: value.detach() for name, value in parts.items()})
        return (loss, outputs) if return_outputs else loss

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
        return F.cross_entropy(logits.flatten(0, -2).float(), labels.flatten(), ignore_index=-100)

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

    # ---------------------------------------------------------------- logging
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
        if "loss" in logs and self._term_count:
            names = list(self._term_sums)
            means = torch.stack([self._term_sums[n] for n in names]) / self._term_count
            means = self.accelerator.reduce(means, reduction="mean") if self.accelerator.num_processes > 1 else means
            logs.update({n: round(float(v), 6) for n, v in zip(names, means.tolist())})
            self._term_sums.clear()
            self._term_count = 0
        super().log(logs, start_time)

    # ------------------------------------------------------------- train/eval
    def train(self, *args, **kwargs):
        self.model.student_taps.attach()
        self.teacher_taps.attach()
        try:
            return super().train(*args, **kwargs)
        finally:
            self.model.student_taps.remove()
            self.teacher_taps.remove()
            self._term_sums.clear()
            self._term_count = 0

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        metrics = super().evaluate(eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)
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
        all_logits, all_labels = [], []
        for batch in dataloader:
            batch = self._prepare_inputs(batch)
            if self.teacher.training:
                self.teacher.eval()
            with torch.no_grad():
                outputs = self._call_teacher(self._teacher_call_inputs(batch))
            logits = outputs if isinstance(outputs, torch.Tensor) else outputs["logits"]
            logits, labels = self.accelerator.gather_for_metrics((logits.float(), batch[label_name]))
            all_logits.append(logits.cpu())
            all_labels.append(labels.cpu())
        logits, labels = torch.cat(all_logits), torch.cat(all_labels)
        metrics = {}
        if logits.dim() == 2 and labels.dim() == 1 and not labels.is_floating_point():
            metrics[f"{prefix}_loss"] = float(F.cross_entropy(logits, labels))
        if self.compute_metrics is not None:
            computed = self.compute_metrics(EvalPrediction(predictions=logits.numpy(), label_ids=labels.numpy()))
            metrics.update({f"{prefix}_{k}": v for k, v in computed.items()})
        return metrics

    # ------------------------------------------------------ saving / loading
    def _set_signature_columns_if_needed(self) -> None:
        if self._signature_columns is None:
            columns = set(self._student_input_names) | {"label", "label_ids", *self.label_names}
            columns |= {TEACHER_INPUT_PREFIX + name for name in self._teacher_input_names}
            columns |= {TEACHER_INPUT_PREFIX + name for name in ("pixel_values", "input_ids", "attention_mask")}
            columns |= {name for term in self.model.terms for name in term.fields}
            self._signature_columns = sorted(columns)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Write the bare student (contract 4): no adapter, loss or teacher tensors."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if state_dict is not None:
            state_dict = {k[len("student."):]: v for k, v in state_dict.items() if k.startswith("student.")}
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        self.student.save_pretrained(output_dir, state_dict=state_dict, is_main_process=self.args.should_save)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def _save_checkpoint(self, model, trial) -> None:
        super()._save_checkpoint(model, trial)
        if self.args.should_save:
            folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
            state = {k: v.detach().contiguous().cpu() for k, v in self.model.distill_state_dict().items()}
            safetensors.torch.save_file(state, os.path.join(folder, DISTILL_STATE_NAME), metadata={"format": "pt"})

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        distill: DistillationModel = self.accelerator.unwrap_model(model if model is not None else self.model)
        load_student_weights(distill.student, resume_from_checkpoint)
        state_file = os.path.join(resume_from_checkpoint, DISTILL_STATE_NAME)
        if os.path.isfile(state_file):
            distill.load_distill_state_dict(safetensors.torch.load_file(state_file, device=str(self.args.device)))
        elif distill.distill_state_dict():
            raise DistillationError(
                f"checkpoint {resume_from_checkpoint} has no {DISTILL_STATE_NAME}, but this recipe trains adapters "
                "or loss modules; resume with the recipe the checkpoint was made with"
            )

    def _load_best_model(self) -> None:
        self._load_from_checkpoint(self.state.best_model_checkpoint)


def _missing_folders(path: str) -> list[str]:
    """``path`` and its parents that do not exist yet, deepest first."""
    missing, current = [], os.path.abspath(path)
    while not os.path.exists(current):
        missing.append(current)
        current = os.path.dirname(current)
    return missing


def _remove_empty_folders(folders: list[str]) -> None:
    for folder in folders:  # deepest first; stop at the first one something else wrote into
        try:
            if os.path.isdir(folder):
                os.rmdir(folder)
        except OSError:
            return


def load_student_weights(student: PreTrainedModel, folder: str) -> None:
    """Load the student weights that ``save_pretrained`` wrote to ``folder`` into ``student`` in place.

    Goes through ``from_pretrained`` because transformers v5 renames weights between the
    in-memory model and the files (``vit.layers.0.attention.q_proj`` vs ``...attention.query``);
    only its loader knows the mapping.
    """
    if not any(os.path.isfile(os.path.join(folder, name)) for name in (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME)):
        raise DistillationError(f"no student weights ({SAFE_WEIGHTS_NAME}) in checkpoint folder {folder}")
    reloaded = type(student).from_pretrained(folder, device_map=None)
    result = student.load_state_dict(reloaded.state_dict(), strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise DistillationError(
            f"checkpoint {folder} does not fit the student: missing {result.missing_keys[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )
