"""Terms: the student plus what trains with it, the loss setup context, and the hooks losses may implement.

A loss module may define ``configure(ctx)`` (called once, after the dry run that sizes adapters,
before the optimiser exists) and any of the hooks ``on_train_begin(ctx)``, ``on_epoch_begin(ctx)``,
``on_step_end(ctx)``. ``ctx`` is a :class:`LossContext`: what a method needs beyond two tensors.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Collection, Iterable, Iterator

import safetensors.torch
import torch
from torch import nn
from torch.utils.data import Dataset
from transformers import TrainerCallback

from . import losses as loss_registry
from .adapters import build_adapter, suggest_adapter
from .errors import DistillationError
from .losses.common import SparseLogits, sparse_as_dense
from .recipe import TermSpec, term_name
from .taps import ModelTaps, resolve_module, use_eager_attention_if_needed
from .outputs import DISTILL_STATE_NAME, default_file_mode
from .teacher import to_float

Shape = Any  # torch.Size, or a list of them for a term that reads several taps; None without a teacher model


@dataclass
class LossContext:
    """What a loss module sees at set-up and in its hooks.

    Attributes:
        term: the term's name (its log name, ``loss_<term>``).
        student_shape / teacher_shape: the tapped shapes seen in the dry run (after the term's
            adapter for the student); lists for a term that reads several taps; the teacher's is
            None when the term runs without a teacher model.
        student_taps / teacher_taps: the term's tap texts (``layer3``, ``logits``).
        num_examples: training examples in the dataset (None for an iterable dataset).
        world_size / rank: processes of the run and this one's index.
        student: the student as the user passed it (the module the taps are relative to).
        teacher: the frozen teacher model (None without one, or when the teacher is a cache).
        device: where the term's modules live.
        stage: the name of the recipe stage being trained.
        epoch / step: the training progress (in hooks; 0 at set-up).
        accelerator: the run's ``accelerate.Accelerator`` (gather/broadcast across processes), or None.
        frozen_teacher: the :class:`~hfdistill.teacher.Teacher` (its ``call_inputs(batch)``, ``model``,
            ``dtype``), for methods that run the teacher on inputs of their own (BSS's adversarial
            samples, SSKD's rotations, gradients with respect to the input); None without a teacher.
        student_inputs: ``batch -> the student's forward inputs`` (what the trainer passes it), for
            methods that run the student on inputs of their own; with the ``batch`` field.

    A loss module that keeps ``student``/``teacher`` for its forward must not register them as its
    submodules (their weights would be saved in its state): keep them in a tuple or a plain object.
    """

    term: str = "term"
    student_shape: Shape = None
    teacher_shape: Shape = None
    student_taps: list[str] = field(default_factory=list)
    teacher_taps: list[str] = field(default_factory=list)
    num_examples: int | None = None
    world_size: int = 1
    rank: int = 0
    student: nn.Module | None = None
    teacher: nn.Module | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    stage: str | None = None
    epoch: float = 0.0
    step: int = 0
    accelerator: Any = None
    frozen_teacher: Any = None
    student_inputs: Callable[[dict], dict] | None = None
    # Set by the trainer: one pass over training batches yielding this term's (student, teacher) values
    # (after the adapter, in fp32, without gradients), e.g. MGD's channel statistics.
    _term_values: Callable[[int | None], Iterator[tuple[Any, Any, dict]]] | None = field(default=None, repr=False)

    def term_values(self, max_batches: int | None = None) -> Iterator[tuple[Any, Any, dict]]:
        """Iterate over training batches (this process's shard), yielding ``(student, teacher, batch)``.

        ``student``/``teacher`` are the term's tapped values for that batch, as its ``forward`` would
        receive them; ``batch`` holds the batch fields (``labels``, ``index``, ...).
        """
        if self._term_values is None:
            raise RuntimeError("this LossContext has no training data attached (it was made outside a trainer)")
        return self._term_values(max_batches)


# ---------------------------------------------------------------------------------------- fields
# Where each field a loss may declare (LossInfo.fields) comes from, in one table:
# (batch, trainer state, num_items_in_batch) -> value. `index` is put in the batch by the trainer.
def _batch_field(name: str, optional: bool = False) -> Callable[[dict, Any, Any], Any]:
    def read(batch: dict, state: Any, num_items: Any) -> Any:
        if name in batch:
            return batch[name]
        if optional:
            return None
        raise DistillationError(
            f"a loss needs the batch field {name!r}, which the batch does not have (it has {sorted(batch)}); "
            "add it to the dataset"
        )

    return read


STUDENT_INPUT_FIELD = "student_input"

LOSS_FIELDS: dict[str, Callable[[dict, Any, Any], Any]] = {
    "labels": _batch_field("labels"),
    "attention_mask": _batch_field("attention_mask", optional=True),  # image batches have none
    # The labels of the teacher's own tokenisation (a teacher with another tokenizer: cross-tokenizer losses)
    "teacher_labels": _batch_field("teacher_labels", optional=True),
    "index": _batch_field("index"),  # each example's dataset index, added by the trainer
    "epoch": lambda batch, state, num_items: float(state.epoch or 0.0),
    "step": lambda batch, state, num_items: int(state.global_step),
    "num_items_in_batch": lambda batch, state, num_items: num_items,
    # The whole training batch (inputs, labels, `teacher_*` fields, index), for methods that run the
    # models on inputs of their own (with LossContext.student_inputs / frozen_teacher).
    "batch": lambda batch, state, num_items: batch,
    # The student's main input tensor (`pixel_values`) as the training forward saw it, made to require
    # grad before that forward, for methods that differentiate the student's outputs with respect to its
    # input (Sobolev / Jacobian matching) without a second student forward. Filled in by
    # DistillationModel.forward (None here); a term declaring it turns the behaviour on.
    STUDENT_INPUT_FIELD: lambda batch, state, num_items: None,
}


def loss_fields(names: Iterable[str], batch: dict, state: Any, num_items_in_batch: Any = None,
                optional: Collection[str] = ()) -> dict:
    """The values of the fields ``names`` for one training step; a batch field named in ``optional`` (every loss
    that reads it does without) is None when the batch lacks it, instead of an error."""
    return {name: None if name in optional and name not in batch else LOSS_FIELDS[name](batch, state, num_items_in_batch)
            for name in names}


class IndexedDataset(Dataset):
    """A map-style dataset whose examples also carry their ``index`` (what CRD's memory bank reads)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        return {**self.dataset[index], "index": index}

    def __getitems__(self, indices: list[int]) -> list[dict]:
        if hasattr(self.dataset, "__getitems__"):  # batched fetching stays batched
            rows = self.dataset.__getitems__(indices)
        else:
            rows = [self.dataset[i] for i in indices]
        return [{**row, "index": i} for row, i in zip(rows, indices)]


class IndexedCollator:
    """Collates with the user's collator, then adds the examples' ``index`` as a tensor."""

    def __init__(self, collator: Callable[[list[dict]], dict]):
        self.collator = collator

    def __call__(self, examples: list[dict]) -> dict:
        if not examples or "index" not in examples[0]:
            return self.collator(examples)
        indices = torch.tensor([example["index"] for example in examples], dtype=torch.long)
        batch = self.collator([{k: v for k, v in example.items() if k != "index"} for example in examples])
        batch["index"] = indices
        return batch


# ---------------------------------------------------------------------------------------- terms
@dataclass
class Term:
    """A recipe term resolved against the registry: its taps, weight and the fields its loss reads."""

    name: str
    spec: TermSpec
    student_taps: list[str]
    teacher_taps: list[str]
    is_list: bool  # the term reads lists of taps
    fields: tuple[str, ...]
    # The loss casts to fp32 itself, piece by piece (token losses over [B, T, vocabulary] logits): its taps reach
    # it in the models' dtype, never as whole fp32 copies.
    accepts_half_inputs: bool = False
    # The loss reads a cached teacher's top-k logits (SparseLogits) as they are; other losses get full logits.
    accepts_sparse_logits: bool = False
    # Batch fields the loss reads when the batch has them and does without otherwise (pixel_kd's labels).
    optional_fields: tuple[str, ...] = ()

    @property
    def weight(self) -> float:
        return self.spec.weight


def _taps_of(value: str | list[str] | None, default: str | None) -> tuple[list[str], bool]:
    if value is None:
        return [default], False
    if isinstance(value, list):
        return list(value), True
    return [value], False


def resolve_terms(specs: list[TermSpec]) -> list[Term]:
    """Recipe terms -> :class:`Term` (names as in the logs, default taps, the fields each loss reads)."""
    terms = []
    for index, spec in enumerate(specs):
        info = loss_registry.get_info(spec.loss)
        unknown = [f for f in info.fields if f not in LOSS_FIELDS]
        if unknown:  # a registered loss asking for something no one supplies is a programming error
            raise RuntimeError(f"loss {spec.loss!r} declares unknown fields {unknown}; known: {sorted(LOSS_FIELDS)}")
        student_taps, is_list = _taps_of(spec.student, info.default_tap)
        teacher_taps, _ = _taps_of(spec.teacher, info.default_tap)
        terms.append(Term(term_name(spec, index, specs), spec, student_taps, teacher_taps, is_list, tuple(info.fields),
                          accepts_half_inputs=bool(getattr(info.cls, "accepts_half_inputs", False)),
                          accepts_sparse_logits=bool(getattr(info.cls, "accepts_sparse_logits", False)),
                          optional_fields=tuple(getattr(info.cls, "optional_fields", ()))))
    return terms


def shape_of(value: Any) -> torch.Size | list:
    if isinstance(value, (torch.Tensor, SparseLogits)):
        return value.shape
    if isinstance(value, (list, tuple)):
        return [shape_of(v) for v in value]
    raise DistillationError(f"a tap gave a {type(value).__name__}, not a tensor")


# ---------------------------------------------------------------------------------------- the model
class DistillationModel(nn.Module):
    """The student plus everything trained with it: adapters and the loss modules.

    ``forward(**student_inputs)`` runs the bare student (evaluation, prediction). With
    ``teacher_features`` it also records the student's taps and returns
    ``(student_outputs, {term name: unweighted term loss})``, so that under DDP every trainable
    parameter is used inside the one wrapped forward. The terms run in fp32 outside autocast,
    whatever precision the models' forwards use. :meth:`weigh` applies the weights (one place).
    """

    def __init__(self, student: nn.Module, tap_root: nn.Module, terms: list[Term] | None = None,
                 task_weight: float = 1.0):
        super().__init__()
        self.student = student
        self.tap_root = [tap_root]  # in a list: the same modules as `student`, not registered twice
        self.adapters = nn.ModuleDict()
        self.losses = nn.ModuleDict()
        self.terms: list[Term] = list(terms or [])
        self.task_weight = task_weight
        self.student_taps = ModelTaps(tap_root, [t for term in self.terms for t in term.student_taps], "student")
        self.student_taps.check_paths()
        use_eager_attention_if_needed(student, self.student_taps)
        self._frozen: list[nn.Module] = []

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

    # ---- the forward ----
    def student_features(self, **student_inputs) -> tuple[Any, dict]:
        """One student forward with its taps recorded: ``(outputs, {tap: value})``."""
        with self.student_taps.recording():
            kwargs = self.student_taps.call_kwargs(has_labels="labels" in student_inputs)
            outputs = self.student(**student_inputs, **kwargs)
        try:
            return outputs, self.student_taps.gather(outputs)
        finally:
            self.student_taps.clear()

    def forward(self, teacher_features: dict | None = None, loss_fields: dict | None = None, **student_inputs):
        if teacher_features is None:
            return self.student(**student_inputs)
        loss_fields = dict(loss_fields or {})
        if any(STUDENT_INPUT_FIELD in term.fields for term in self.terms):
            student_inputs, loss_fields[STUDENT_INPUT_FIELD] = self.input_requiring_grad(student_inputs)
        outputs, student_features = self.student_features(**student_inputs)
        device_type = next(self.student.parameters()).device.type
        term_losses = {}
        with torch.autocast(device_type, enabled=False):  # losses in fp32 (fp16 Gram matrices overflow)
            for term in self.terms:
                student_value, teacher_value = self.select(term, student_features, teacher_features)
                fields = {name: loss_fields[name] for name in term.fields}
                term_losses[term.name] = self.losses[term.name](student_value, teacher_value, **fields).float()
        return outputs, term_losses

    def input_requiring_grad(self, student_inputs: dict) -> tuple[dict, torch.Tensor]:
        """The student's inputs with its main input replaced by a copy that requires grad, and that copy.

        For terms that declare the ``student_input`` field: the one training forward then builds the graph
        from the input, so a loss can take ``d outputs / d input`` (with ``create_graph=True``) without a
        second student forward (which would also update batch-norm statistics twice per step).
        """
        name = self.main_input_name
        value = student_inputs.get(name)
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            kind = "missing" if value is None else (
                f"a {value.dtype} tensor" if isinstance(value, torch.Tensor) else type(value).__name__)
            raise DistillationError(
                f"a term differentiates the student's outputs with respect to its input (field "
                f"{STUDENT_INPUT_FIELD!r}), but the student's main input {name!r} is {kind}; such methods need a "
                "continuous input (pixel_values, input_values), not token ids"
            )
        value = value.detach().requires_grad_(True)
        return {**student_inputs, name: value}, value

    def select(self, term: Term, student_features: dict, teacher_features: dict) -> tuple[Any, Any]:
        """The (adapted) student value and the teacher value a term's loss receives, in fp32 (in the models'
        dtype for a loss that casts piece by piece itself, :attr:`Term.accepts_half_inputs`)."""
        as_given = term.accepts_half_inputs and term.name not in self.adapters
        cast = (lambda value: value) if as_given else to_float
        student_values = [cast(student_features[t]) for t in term.student_taps]
        teacher_values = [cast(teacher_features.get(t)) for t in term.teacher_taps]
        if not term.accepts_sparse_logits:
            teacher_values = [sparse_as_dense(v) for v in teacher_values]
        if term.name in self.adapters:
            student_values = [adapter(v) for adapter, v in zip(self.adapters[term.name], student_values)]
        if term.is_list:
            return student_values, teacher_values
        return student_values[0], teacher_values[0]

    def weigh(self, task_loss: torch.Tensor | None, term_losses: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The weighted parts of the total loss: ``task_weight * task`` and ``weight_i * term_i``."""
        parts = {} if task_loss is None or self.task_weight == 0 else {"task": self.task_weight * task_loss.float()}
        weights = {term.name: term.weight for term in self.terms}
        parts.update({name: weights[name] * value for name, value in term_losses.items()})
        return parts

    # ---- what trains ----
    def resolve_trainable(self, entry: str) -> nn.Module | None:
        """The module a stage's ``train:`` entry names (``student.layer1``, ``adapters``, ``losses.ft``)."""
        head, _, rest = entry.partition(".")
        if head == "student":
            return self.student if not rest else resolve_module(self.tap_root[0], rest)
        if head in ("adapters", "losses"):
            return getattr(self, head) if not rest else resolve_module(getattr(self, head), rest)
        return None

    def select_trainable(self, entries: list[str], where: str = "train") -> list[nn.Module]:
        """The modules a stage's ``train:`` entries name; a DistillationError for an entry that names none."""
        selected = []
        for i, entry in enumerate(entries):
            module = self.resolve_trainable(entry)
            if module is None:
                raise DistillationError(
                    f"{where}[{i}]: {entry!r} names no module; write `student`, `student.<module path>` (relative to "
                    f"the model you passed), `adapters`, `adapters.<term>` or `losses.<term>[.<submodule>]` (terms here: "
                    f"{', '.join(t.name for t in self.terms) or 'none'})"
                )
            selected.append(module)
        return selected

    @contextlib.contextmanager
    def trainable(self, entries: list[str] | None, where: str = "train") -> Iterator[None]:
        """Train only the modules ``entries`` name (everything when None) for the duration.

        Frozen parameters get ``requires_grad=False`` (so the optimiser leaves them out) and frozen
        modules stay in eval mode (their batch-norm statistics do not move); both are restored after.
        """
        if entries is None:
            yield
            return
        selected = self.select_trainable(entries, where)
        chosen = {id(p) for module in selected for p in module.parameters()}
        flags = {p: p.requires_grad for p in self.parameters()}
        for p in flags:
            if id(p) not in chosen:
                p.requires_grad_(False)
        self._frozen = _frozen_modules(self, {id(m) for m in selected})
        try:
            self.train(self.training)
            yield
        finally:
            for p, flag in flags.items():
                p.requires_grad_(flag)
            self._frozen = []
            self.train(self.training)

    def train(self, mode: bool = True):
        super().train(mode)
        for module in self._frozen:
            module.eval()
        return self

    # ---- state that is not the student's ----
    def distill_state_dict(self) -> dict[str, torch.Tensor]:
        state = {f"adapters.{k}": v for k, v in self.adapters.state_dict().items()}
        state.update({f"losses.{k}": v for k, v in self.losses.state_dict().items()})
        return state

    def load_distill_state_dict(self, state: dict[str, torch.Tensor], strict: bool = True) -> list[str]:
        """Load adapter and loss state. ``strict=False`` (state carried from another stage) loads the
        entries of terms this model has and ignores the rest; returns the keys loaded."""
        own = self.distill_state_dict()
        if strict:
            missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
            if missing or unexpected:
                raise DistillationError(
                    f"the distillation state does not fit this recipe's terms: missing {missing[:5]}, "
                    f"unexpected {unexpected[:5]}; use the recipe it was saved with"
                )
        loaded = []
        for key, value in state.items():
            if key in own:
                if own[key].shape != value.shape:
                    raise DistillationError(
                        f"distillation state {key!r} has shape {tuple(value.shape)} but this recipe's term makes "
                        f"{tuple(own[key].shape)}; a term keeps its state across stages only with the same taps"
                    )
                own[key].copy_(value)
                loaded.append(key)
        return loaded


def _frozen_modules(root: nn.Module, selected: set[int]) -> list[nn.Module]:
    """The largest submodules of ``root`` that contain no selected module (they are frozen whole)."""
    def contains_selected(module: nn.Module) -> bool:
        return any(id(m) in selected for m in module.modules())

    frozen, stack = [], [root]
    while stack:
        module = stack.pop()
        for child in module.children():
            if id(child) in selected:
                continue
            if contains_selected(child):
                stack.append(child)
            else:
                frozen.append(child)
    return frozen


@contextlib.contextmanager
def _taps_attached(*taps: ModelTaps) -> Iterator[None]:
    attached = [t for t in taps if not t.attached]
    for t in attached:
        t.attach()
    try:
        yield
    finally:
        for t in attached:
            t.remove()


# ---------------------------------------------------------------------------------------- building
def build_term_modules(
    distill: DistillationModel,
    teacher: Any,
    batch: dict,
    student_inputs: Callable[[dict], dict],
    context: dict[str, Any],
    term_batches: Callable[[], Iterable[dict]] | None = None,
) -> dict[str, LossContext]:
    """One dry-run forward of both models: check every tap, size adapters, build and configure the losses.

    ``context`` holds the :class:`LossContext` fields shared by every term (``num_examples``,
    ``world_size``, ``device``, ...). ``term_batches`` gives a pass over prepared training batches,
    for losses that gather statistics in ``configure`` or hooks. Returns each term's context.
    """
    was_training = distill.training
    distill.eval()
    try:
        with _taps_attached(distill.student_taps, *([teacher.taps] if teacher is not None else [])), torch.no_grad():
            _, student_features = distill.student_features(**student_inputs(batch))
            teacher_features = teacher.features(batch) if teacher is not None else {}
    finally:
        distill.train(was_training)
    device = context.get("device", torch.device("cpu"))
    contexts = {}
    for term in distill.terms:
        info = loss_registry.get_info(term.spec.loss)
        s_shapes = [shape_of(student_features[t]) for t in term.student_taps]
        # Without a teacher model (teacher-free terms) there is no teacher shape.
        t_shapes = [shape_of(teacher_features[t]) if t in teacher_features else None for t in term.teacher_taps]
        where = f"term {term.name!r} ({term.spec.loss})"
        if term.spec.adapter is not None:
            if term.is_list and len(s_shapes) != len(t_shapes):
                raise DistillationError(f"{where}: an adapter pairs taps one to one; got {len(s_shapes)} student and {len(t_shapes)} teacher taps")
            try:
                adapters = nn.ModuleList(
                    build_adapter(term.spec.adapter, s, t, **term.spec.adapter_params) for s, t in zip(s_shapes, t_shapes)
                )
            except (ValueError, TypeError) as exc:
                raise DistillationError(f"{where}: {exc}") from None
            distill.adapters[term.name] = adapters.to(device)
            with torch.no_grad():
                s_shapes = [a(to_float(student_features[t])).shape for a, t in zip(adapters, term.student_taps)]
        loss_module = loss_registry.build(term.spec.loss, **term.spec.params)
        # A loss instance may relax its registered shape rule (a token loss reading hidden states of two widths).
        if getattr(loss_module, "same_shape", info.same_shape) and teacher is not None:
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
        ctx = LossContext(
            term=term.name,
            student_shape=s_shapes if term.is_list else s_shapes[0],
            teacher_shape=t_shapes if term.is_list else t_shapes[0],
            student_taps=list(term.student_taps),
            teacher_taps=list(term.teacher_taps),
            student=distill.tap_root[0],
            teacher=getattr(teacher, "model", None),
            frozen_teacher=teacher,
            student_inputs=student_inputs,
            **context,
        )
        if term_batches is not None:
            ctx._term_values = _term_values_fn(distill, teacher, term, term_batches, student_inputs)
        if hasattr(loss_module, "configure"):
            loss_module.configure(ctx)
        distill.losses[term.name] = loss_module.to(device)
        contexts[term.name] = ctx
    return contexts


def _term_values_fn(distill: DistillationModel, teacher: Any, term: Term, batches: Callable[[], Iterable[dict]],
                    student_inputs: Callable[[dict], dict]):
    def term_values(max_batches: int | None = None) -> Iterator[tuple[Any, Any, dict]]:
        # Statistics passes run without gradients and in eval mode (batch-norm statistics must not move).
        was_training = distill.training
        distill.eval()
        try:
            with _taps_attached(distill.student_taps, *([teacher.taps] if teacher is not None else [])):
                for i, batch in enumerate(batches()):
                    if max_batches is not None and i >= max_batches:
                        break
                    with torch.no_grad():
                        _, student_features = distill.student_features(**student_inputs(batch))
                        teacher_features = teacher.features(batch) if teacher is not None else {}
                        student_value, teacher_value = distill.select(term, student_features, teacher_features)
                    yield student_value, teacher_value, batch
        finally:
            distill.train(was_training)

    return term_values


# ---------------------------------------------------------------------------------------- hooks
class LossHooksCallback(TrainerCallback):
    """Calls the hooks loss modules implement (``on_train_begin(ctx)``, ...) with their term's context."""

    def __init__(self, distill: DistillationModel, contexts: dict[str, LossContext]):
        self.distill = distill
        self.contexts = contexts

    def _call(self, hook: str, state: Any) -> None:
        for name, module in self.distill.losses.items():
            method = getattr(module, hook, None)
            if method is not None:
                ctx = self.contexts[name]
                ctx.epoch, ctx.step = float(state.epoch or 0.0), int(state.global_step)
                method(ctx)

    def on_train_begin(self, args, state, control, **kwargs):
        self._call("on_train_begin", state)

    def on_epoch_begin(self, args, state, control, **kwargs):
        self._call("on_epoch_begin", state)

    def on_step_end(self, args, state, control, **kwargs):
        self._call("on_step_end", state)


# ---------------------------------------------------------------------------------------- files
def save_distill_state(state: dict[str, torch.Tensor], folder: str | os.PathLike) -> str:
    """Write adapter and loss state (never part of the saved student) as safetensors in ``folder``."""
    path = os.path.join(folder, DISTILL_STATE_NAME)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    safetensors.torch.save_file(tensors, path, metadata={"format": "pt"})
    default_file_mode([path])
    return path


def load_distill_state(folder: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, torch.Tensor] | None:
    """The state :func:`save_distill_state` wrote in ``folder``, or None when there is none."""
    path = os.path.join(folder, DISTILL_STATE_NAME)
    if not os.path.isfile(path):
        return None
    device = torch.device(device)
    # safetensors names devices its own way: "cpu" (never "cpu:0", what a data-parallel CPU run's device is)
    return safetensors.torch.load_file(path, device="cpu" if device.type == "cpu" else str(device))
