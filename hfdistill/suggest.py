"""Suggest: where to tap a teacher and a student, and a ready ``terms:`` block, from one dry run of each.

``hfdistill suggest TEACHER STUDENT`` (and :func:`suggest`) loads both models by the names recipes use,
without pretrained weights (only the architectures matter, and it stays offline), runs each once on an
example input and lists the *tap points* the dry run found:

- for CNNs, the stage outputs: timm's ``feature_info`` modules (``layer2``, ``blocks.3``, ``stages.1``)
  or the 4-d ``hidden_states.K`` of a transformers CNN. Teacher and student are matched by output
  stride (input side / map side, to the nearest power of two), strides below 4 (the stem) left out;
  when one side has several maps at a stride, by relative depth;
- for transformers, the per-layer hidden states (``hidden_states.K`` of a transformers model, the
  ``blocks.K`` of a timm ViT), matched by layer-index proportion: with an ``N``-layer teacher and an
  ``M``-layer student (``M <= N``), student layer ``i`` pairs with teacher layer ``round(i * N / M)``.

Each pair is checked the way the trainer will use it: the adapter the method needs is built from the two
shapes (``conv1x1`` for maps, ``linear`` for the width of tokens and vectors; none when the shapes agree
or the method compares shapes that differ, as ``at`` does) and the method's loss runs once on the dry
run's tensors. Pairs it cannot compare (a token count that differs: ViT vs DeiT's extra distillation
token) are listed with the reason and left out; when no layer pair is left, the pooled pre-logits
features are paired instead, where the method can compare them. A ``kd`` term is added where both
models have logits.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any

import torch
import yaml
from torch import nn
from transformers import PreTrainedModel

from . import losses
from .adapters import build_adapter
from .errors import BadInputError, DistillationError, RecipeError
from .models import HF_HUB_PREFIX, TIMM_PREFIX, LoadedModel, is_timm_model, load_model, timm_in_chans
from .recipe import ModelSpec, Recipe
from .taps import ModelTaps, head_module, read_output
from .tasks import TASK_NAMES, get_task
from .teacher import call_model

DEFAULT_METHOD = "mse"
# Maps finer than this are the stem's (resnet's act1, mobilenet's bn1): large, low-level, a poor hint.
MIN_MAP_STRIDE = 4
BATCH = 2  # the dry run's batch: some methods compare examples, and 2 keeps it cheap
TEXT_EXAMPLE = "A short example sentence for the dry run of both models."
RANDOM_TEXT_LENGTH = 16  # tokens, for a model without a tokenizer (random ids)
# The logits term: Hinton KD as in recipes/quickstart.yaml (with `task_weight: 0.1` there).
KD_TERM = {"loss": "kd", "weight": 0.9, "params": {"temperature": 4.0}}
# Per task, the logits a model returns ([B, K]; a segmenter's [B, K, H, W] score maps; a detector's [B, Q, K] class
# logits per query), where their classes are, and the term that distils them (kd for the others).
LOGIT_TERMS = {
    "semantic-segmentation": (4, 1, {"loss": "pixel_kd", "weight": 1.0, "params": {"temperature": 1.0}}),
    "object-detection": (3, -1, {"loss": "detection_logit_kd", "weight": 1.0, "student": ["logits", "pred_boxes"],
                                 "teacher": ["logits", "pred_boxes"]}),
}


def logit_term(task: str) -> tuple[int, int, dict]:
    """``(logits' dims, class dim, the term)`` of ``task``'s logit distillation."""
    return LOGIT_TERMS.get(task, (2, -1, KD_TERM))
FEATURE_WEIGHT = 1.0  # each hint term's weight: a starting point, to tune against kd in the first logs
# What to try when a method fits no pair.
METHOD_HINTS = {"at": "compares maps and token sequences of any width", "mse": "maps the student's width with an adapter"}
KIND_WORDS = {"map": "[B, C, H, W] maps", "tokens": "[B, T, D] token sequences", "vector": "[B, D] vectors"}
# Feature methods that need more than a student/teacher tap pair, and what to do instead.
OWN_RECIPE = {
    "ft": "it trains a paraphraser in a first stage before the student learns from it",
    "ab": "it is trained in an AB-only stage before the task loss",
}


# ------------------------------------------------------------------------------------------ results
@dataclass(frozen=True)
class TapPoint:
    """A place one model can be tapped, as the dry run saw it."""

    tap: str  # the recipe's tap text: `layer2`, `blocks.3`, `hidden_states.4`, `pooled`
    shape: tuple[int, ...]  # the dry run's shape, batch dimension first
    stride: int | None  # input side / map side (a power of two) for [B, C, H, W] maps; None otherwise
    depth: int  # 1-based position among the model's tap points
    of: int  # how many tap points the model has

    @property
    def kind(self) -> str:
        """``map`` ([B, C, H, W]), ``tokens`` ([B, T, D]) or ``vector`` ([B, D])."""
        return {4: "map", 3: "tokens", 2: "vector"}.get(len(self.shape), f"{len(self.shape)}-d")


@dataclass(frozen=True)
class TapPair:
    """A student tap point matched with a teacher tap point, checked with the method."""

    student: TapPoint
    teacher: TapPoint
    adapter: str | None = None  # the adapter the method needs here (None: the shapes already fit)
    problem: str | None = None  # why the method cannot compare these two; then the pair is left out

    @property
    def usable(self) -> bool:
        return self.problem is None

    @property
    def match(self) -> str:
        """How the two were matched, in words: ``stride 8`` or ``layer 2/4 -> 6/12``."""
        if self.student.kind == "map" and self.student.stride is not None:
            return f"stride {self.student.stride}"
        if self.student.tap == "pooled":
            return "pooled"
        return f"layer {self.student.depth}/{self.student.of} -> {self.teacher.depth}/{self.teacher.of}"


@dataclass
class ModelProbe:
    """One model after its dry run: what it took as input and where it can be tapped."""

    name: str
    role: str
    parameters: int
    input: str  # the example input, in words (`3x224x224 image`, `16 tokens`)
    points: list[TapPoint]
    pooled: TapPoint | None  # the input of the classification head, when it has one
    logits: tuple[int, ...] | None
    values: dict[str, torch.Tensor] = field(repr=False)  # tap -> the dry run's tensor
    root: nn.Module | None = field(default=None, repr=False)  # the module tap paths are relative to
    notes: list[str] = field(default_factory=list)


@dataclass
class Suggestion:
    """What :func:`suggest` found: the matched pairs and the terms that use them."""

    teacher: ModelProbe
    student: ModelProbe
    task: str
    method: str
    pairs: list[TapPair]
    kd: bool  # whether a kd term on the logits is part of the terms
    notes: list[str] = field(default_factory=list)

    @property
    def usable_pairs(self) -> list[TapPair]:
        return [pair for pair in self.pairs if pair.usable]

    @property
    def terms(self) -> list[dict]:
        """The recipe's ``terms``, as plain data."""
        terms = [copy.deepcopy(logit_term(self.task)[2])] if self.kd else []
        pairs = self.usable_pairs
        if not pairs:
            return terms
        if losses.get_info(self.method).multi_layer:  # one term reading every pair (AT sums over layer pairs)
            adapter = next((pair.adapter for pair in pairs if pair.adapter), None)
            term = {"loss": self.method, "weight": FEATURE_WEIGHT, "student": [p.student.tap for p in pairs],
                    "teacher": [p.teacher.tap for p in pairs]}
            terms.append({**term, "adapter": adapter} if adapter else term)
            return terms
        for pair in pairs:
            term = {"loss": self.method, "weight": FEATURE_WEIGHT, "student": pair.student.tap,
                    "teacher": pair.teacher.tap}
            terms.append({**term, "adapter": pair.adapter} if pair.adapter else term)
        return terms

    def yaml(self) -> str:
        """The ``terms:`` block, one flow mapping per term, ready to paste into a recipe."""
        lines = ["terms:"]
        for term in self.terms:
            lines.append("  - " + yaml.safe_dump(term, default_flow_style=True, sort_keys=False, width=10**6).strip())
        return "\n".join(lines) + "\n"

    def report(self) -> str:
        """The pairs with their shapes and adapters, the notes, then the ``terms:`` block."""
        info = losses.get_info(self.method)
        lines = [f"task: {self.task}"]
        for probe in (self.teacher, self.student):
            logits = f", logits {_shape(probe.logits)}" if probe.logits else ", no logits"
            lines.append(f"{probe.role}: {probe.name} ({_count(probe.parameters)} parameters, architecture only), "
                         f"{probe.input}: {len(probe.points)} tap points{logits}")
        how = ("one term over every pair" if info.multi_layer else "one term per pair")
        lines.append(f"method: {self.method} ({info.description}); {how}")
        lines.append("")
        if self.pairs:
            rows = [("match", "student", "shape", "teacher", "shape", "adapter")]
            for pair in self.pairs:
                adapter = pair.adapter or "none"
                rows.append((pair.match, pair.student.tap, _shape(pair.student.shape), pair.teacher.tap,
                             _shape(pair.teacher.shape), adapter if pair.usable else "left out (see below)"))
            widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
            lines.append("pairs (student -> teacher):")
            for row in rows:
                lines.append("  " + "  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
        else:
            lines.append("pairs: none")
        left_out: dict[str, list[str]] = {}  # one note per reason, naming its pairs
        for pair in self.pairs:
            if not pair.usable:
                left_out.setdefault(pair.problem, []).append(f"{pair.student.tap} -> {pair.teacher.tap}")
        notes = [f"{', '.join(names)} left out: {problem}" for problem, names in left_out.items()]
        notes += self.teacher.notes + self.student.notes + self.notes
        if notes:
            lines.append("")
            lines.append("notes:")
            lines += [f"  - {note}" for note in notes]
        lines.append("")
        lines.append("# paste into a recipe (recipes/quickstart.yaml pairs kd 0.9 with `task_weight: 0.1`); "
                     "`hfdistill check RECIPE` tries it on the data")
        lines.append(self.yaml().rstrip("\n"))
        return "\n".join(lines)


def _shape(shape: tuple[int, ...] | None) -> str:
    return "x".join(["B", *(str(d) for d in shape[1:])]) if shape else "-"


def _count(n: int) -> str:
    from .summary import format_count

    return format_count(n)


# ------------------------------------------------------------------------------------------ the API
def suggest(
    teacher: str | dict | ModelSpec,
    student: str | dict | ModelSpec,
    task: str | None = None,
    input_size: int | None = None,
    method: str | None = None,
) -> Suggestion:
    """Tap pairs and a ``terms:`` block for distilling ``teacher`` into ``student``.

    ``teacher``/``student``: a name as recipes write it (``timm:resnet18``, a transformers id, a local
    folder, ``package:<module>``) or a recipe's model mapping (``{name: ..., kwargs: {...}}``); built
    without pretrained weights. ``task``: ``image-classification`` or ``text-classification`` (default:
    read from the models). ``input_size``: the side of the example image (default: each model's own), or
    for text the number of tokens. ``method``: a registered loss that reads features (default ``mse``,
    FitNets-style hints; ``at`` compares attention maps and needs no adapters).

    Raises a :class:`~hfdistill.errors.BadInputError` (the CLI exits 2) for an unknown model, task or
    method, a method that does not read features, an input size a model cannot take, and models with
    nothing to distil between them.
    """
    method = method or DEFAULT_METHOD
    info = _feature_method(method)
    if input_size is not None and (isinstance(input_size, bool) or not isinstance(input_size, int) or input_size < 1):
        raise DistillationError(f"--input-size must be a whole number >= 1 (pixels per side, or tokens for text), "
                                f"got {input_size!r}")
    teacher_spec = _model_spec(teacher, "teacher")
    student_spec = _model_spec(student, "student")
    task = _task(task, teacher_spec, student_spec)
    teacher_probe = probe_model(teacher_spec, "teacher", task, input_size)
    student_probe = probe_model(student_spec, "student", task, input_size)

    pairs, notes = pair_models(info, student_probe, teacher_probe)
    if get_task(task).inputs == "image" and input_size is None and teacher_probe.input != student_probe.input:
        notes.append(f"each model ran at its own size (teacher {teacher_probe.input}, student {student_probe.input}); "
                     "give --input-size the size your data will have (data.image_size) to see the shapes of a run")
    kd = student_probe.logits is not None and teacher_probe.logits is not None
    _, class_dim, logit_loss = logit_term(task)
    if kd and student_probe.logits[class_dim] != teacher_probe.logits[class_dim]:
        notes.append(f"the teacher has {teacher_probe.logits[class_dim]} classes and the student "
                     f"{student_probe.logits[class_dim]}: {logit_loss['loss']} compares them class by class, so in a "
                     "run both must have the data's classes (a student gets them; a trained teacher must have been "
                     "trained on them)")
    elif not kd:
        notes.append("no kd term: " + " and ".join(f"the {p.role} returns no logits"
                                                   for p in (teacher_probe, student_probe) if p.logits is None))
    suggestion = Suggestion(teacher_probe, student_probe, task, method, pairs, kd, notes)
    if not suggestion.terms:
        raise DistillationError(
            f"nothing to distil from {teacher_probe.name!r} into {student_probe.name!r} with {method}: "
            + "; ".join(notes + [f"{p.student.tap} -> {p.teacher.tap}: {p.problem}" for p in pairs if not p.usable])
        )
    return suggestion


def pair_models(info: losses.LossInfo, student: ModelProbe, teacher: ModelProbe) -> tuple[list[TapPair], list[str]]:
    """The two models' tap points matched and checked with the method (the pooled features when no layer pair
    fits), and notes on what was left out."""
    notes: list[str] = []
    pairs = [_fit_pair(info, s, t, student, teacher) for s, t in match_tap_points(student.points, teacher.points)]
    usable = [pair for pair in pairs if pair.usable]
    if info.multi_layer and len(usable) > 1:  # one term reads them all: they must also work together
        problem = _method_problem(info, usable, student, teacher)
        if problem:
            raise DistillationError(f"{info.name} cannot read these {len(usable)} layer pairs together: {problem}; "
                                    f"pick another --method ({', '.join(METHOD_HINTS)})")
    uneven = [pair for pair in usable if pair.student.kind == "tokens" and pair.student.shape[1] != pair.teacher.shape[1]]
    if uneven:
        notes.append(f"{info.name} takes sequences of {uneven[0].student.shape[1]} student and "
                     f"{uneven[0].teacher.shape[1]} teacher tokens: it pools the longer one to the shorter, so tokens "
                     "line up only roughly (an extra distillation token, another tokenizer)")
    if not usable:
        why = _why_no_pairs(student, teacher) if not pairs else f"no layer pair fits {info.name}"
        pooled = _pooled_pair(info, student, teacher)
        if pooled is not None and pooled.usable:
            notes.append(f"{why}, so the pooled pre-logits features (the classification heads' inputs) are paired instead")
            pairs.append(pooled)
        else:
            notes.append(why + (f"; the pooled features do not fit {info.name} either: {pooled.problem}" if pooled else ""))
            others = [f"--method {name} ({hint})" for name, hint in METHOD_HINTS.items() if name != info.name]
            notes.append(f"no {info.name} term; try {' or '.join(others)}")
    return pairs, notes


def _feature_method(method: str) -> losses.LossInfo:
    """The registry entry of ``method``, when it compares a student tap with a teacher tap."""
    if not isinstance(method, str) or method not in losses.available():
        import difflib

        close = difflib.get_close_matches(str(method), losses.available(), n=1)
        raise DistillationError(
            f"unknown method {method!r}{f' (did you mean {close[0]!r}?)' if close else ''}; feature methods "
            f"suggest can use: {', '.join(feature_methods())} (`hfdistill losses` lists every method)"
        )
    info = losses.get_info(method)
    if info.reads != "features":
        raise DistillationError(
            f"--method {method} reads {info.reads}, not features: suggest pairs feature taps, and adds a kd term on the "
            f"logits by itself; pick a feature method: {', '.join(feature_methods())}"
        )
    reason = _needs_own_recipe(info)
    if reason:
        raise DistillationError(
            f"--method {method} needs more than a pair of taps ({reason}); write its terms by hand, starting from "
            f"recipes/fashion_mnist/{info.alias_of or method}.yaml, or pick one of: {', '.join(feature_methods())}"
        )
    return info


def _needs_own_recipe(info: losses.LossInfo) -> str | None:
    name = info.alias_of or info.name
    if name in OWN_RECIPE:
        return OWN_RECIPE[name]
    if info.default_tap is not None:  # CRD, SSKD: the pooled features and a set-up of their own
        return f"it reads the {info.default_tap!r} tap with modules and data of its own"
    if "batch" in info.fields or "student_input" in info.fields:  # LwM: runs the models on inputs of its own
        return "it runs the models itself"
    return None


def feature_methods() -> list[str]:
    """The registered losses :func:`suggest` can write terms for: feature methods that read a pair of taps."""
    return [name for name in losses.available()
            if losses.get_info(name).reads == "features" and _needs_own_recipe(losses.get_info(name)) is None]


def _model_spec(model: str | dict | ModelSpec, role: str) -> ModelSpec:
    """A recipe's model spec for ``model``, made to build the architecture only (no weights to load)."""
    if isinstance(model, ModelSpec):
        spec = model
    elif isinstance(model, str):
        if not model.strip():
            raise DistillationError(f"the {role} name is empty; name a model (`timm:resnet18`, a transformers id, "
                                    "a folder)")
        spec = ModelSpec(name=model)
    elif isinstance(model, dict):
        spec = getattr(Recipe.from_dict({role: model}), role)  # a recipe's own checks and error paths
    else:
        raise DistillationError(f"the {role} must be a model name or a recipe's model mapping, got "
                                f"{type(model).__name__}")
    if spec.name is None:
        raise DistillationError(f"the {role} needs a `name` (a cached teacher has no architecture to look at)")
    # A teacher folder still to be trained (`train_from`) has the architecture of what it is trained from.
    if spec.train_from is not None and not os.path.isfile(os.path.join(spec.name, "config.json")):
        spec = spec.train_from
    return dataclasses.replace(spec, pretrained=False, checkpoint=None, train_from=None, train_args={}, cache=None)


def _task(task: str | None, *specs: ModelSpec) -> str:
    """The task given, else the one both models' names or configs say."""
    if task is not None:
        if task not in TASK_NAMES:
            try:
                get_task(task, "--task")
            except RecipeError as exc:
                raise DistillationError(exc.message) from None
        return task
    found = {spec.name: _task_of(spec) for spec in specs}
    known = {t for t in found.values() if t is not None}
    if len(known) > 1:
        raise DistillationError(
            "the teacher and the student do different tasks ("
            + ", ".join(f"{name!r}: {t}" for name, t in found.items()) + "); distil between models of one task"
        )
    return known.pop() if known else "image-classification"  # the loader then says what is wrong with the name


def _task_of(spec: ModelSpec) -> str | None:
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import (MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES,
                                                        MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES)

    from .models import resolve_model_name

    if spec.name.startswith((TIMM_PREFIX, HF_HUB_PREFIX)):
        return "image-classification"
    try:
        name = resolve_model_name(spec, "model")
        model_type = AutoConfig.from_pretrained(name, revision=spec.revision).model_type
    except Exception:  # noqa: BLE001 - an unreadable name: the loader reports it with the fix
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING

        model_type = spec.name if spec.config is not None and spec.name in CONFIG_MAPPING else None
    if model_type == "timm_wrapper" or model_type in MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES:
        return "image-classification"
    if model_type in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES:
        return "text-classification"
    return None


# ------------------------------------------------------------------------------------------ dry runs
def probe_model(spec: ModelSpec, role: str, task: str, input_size: int | None = None) -> ModelProbe:
    """Load ``spec`` (architecture only), run it once on an example input and list its tap points."""
    loaded = _load(spec, role, task, input_size)
    model = loaded.model.eval()
    root = model  # our loader returns timm models bare: tap paths are timm's own (contract 3)
    inputs, described = _example_inputs(loaded, task, input_size)
    taps = _module_taps(root)
    probe_taps = ModelTaps(root, taps + (["pooled"] if head_module(root) is not None else []), role)
    # A transformers model returns its per-layer (or per-stage) hidden states when asked.
    wants_hidden = isinstance(model, PreTrainedModel)
    probe_taps.attach()
    try:
        with probe_taps.recording(), torch.no_grad():
            outputs = call_model(model, inputs, **probe_taps.forward_kwargs,
                                 **({"output_hidden_states": True} if wants_hidden else {}))
            values = probe_taps.gather(outputs)
    except BadInputError:
        raise
    except (RuntimeError, ValueError, AssertionError, IndexError, TypeError) as exc:
        raise DistillationError(
            f"the {role} {spec.name!r} cannot run on a {described}: {' '.join(str(exc).split()).rstrip('.')}; "
            + ("give --input-size the size it was built for, or leave --input-size out to use its own"
               if get_task(task).inputs == "image" else "check its config and tokenizer")
        ) from None
    finally:
        probe_taps.remove()
    try:
        logits = read_output(outputs, "logits")
    except KeyError:
        logits = None
    hidden_states = outputs.get("hidden_states") if isinstance(outputs, dict) else None
    if hidden_states is not None:
        taps = taps + ["hidden_states"]
        values = {**values, "hidden_states": list(hidden_states),
                  **{f"hidden_states.{i}": h for i, h in enumerate(hidden_states)}}
    height = inputs["pixel_values"].shape[-2] if "pixel_values" in inputs else None
    points, notes = _tap_points(root, taps, values, height)
    pooled = values.get("pooled")
    return ModelProbe(
        name=spec.name,
        role=role,
        parameters=sum(p.numel() for p in model.parameters()),
        input=described,
        points=points,
        pooled=TapPoint("pooled", tuple(pooled.shape), None, 1, 1) if isinstance(pooled, torch.Tensor) else None,
        logits=(tuple(logits.shape) if isinstance(logits, torch.Tensor) and logits.dim() == logit_term(task)[0]
                else None),
        values=values,
        root=root,
        notes=notes,
    )


def _load(spec: ModelSpec, role: str, task: str, input_size: int | None) -> LoadedModel:
    from . import hub

    image_size = input_size if get_task(task).inputs == "image" else None
    try:
        with hub.wrap_hub_errors(spec.name, revision=spec.revision):
            return load_model(spec, role, task, image_size=image_size)
    except RecipeError as exc:  # its path names a recipe field; here there is no recipe, only the model
        if task == "text-classification" and exc.path == f"{role}.tokenizer":
            return _load_without_tokenizer(spec, role)  # random token ids stand in for text
        raise DistillationError(f"cannot load the {role} {spec.name!r}: {exc.message}") from None


def _load_without_tokenizer(spec: ModelSpec, role: str) -> LoadedModel:
    """A transformers text model from its config alone (a folder or a `config:` model without a tokenizer)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if spec.name in CONFIG_MAPPING and not os.path.isdir(spec.name):  # a model type built fresh from `config:`
        config = AutoConfig.for_model(spec.name, **(spec.config or {}))
    else:
        config = AutoConfig.from_pretrained(spec.name, revision=spec.revision, **(spec.config or {}))
    model = AutoModelForSequenceClassification.from_config(config)
    return LoadedModel(model=model, role=role, name=spec.name, num_labels=config.num_labels)


def _example_inputs(loaded: LoadedModel, task: str, input_size: int | None) -> tuple[dict[str, torch.Tensor], str]:
    """The dry run's inputs (a batch of BATCH) and what they are, in words."""
    generator = torch.Generator().manual_seed(0)
    if get_task(task).inputs == "image":
        model = loaded.model
        if is_timm_model(model):
            channels = timm_in_chans(model)
            fixed = getattr(getattr(model, "patch_embed", None), "img_size", None)  # a ViT's position embedding
            size = (input_size, input_size) if input_size else tuple(fixed) if fixed else loaded.image_config.size
        else:
            channels = loaded.image_config.channels
            size = (input_size, input_size) if input_size else loaded.image_config.size
        pixels = torch.randn(BATCH, channels, *size, generator=generator)
        return {"pixel_values": pixels}, f"{channels}x{size[0]}x{size[1]} image"
    if loaded.tokenizer is not None:
        padding = {"padding": "max_length", "truncation": True, "max_length": input_size} if input_size else {}
        encoded = loaded.tokenizer([TEXT_EXAMPLE] * BATCH, return_tensors="pt", **padding)
        inputs = {k: v for k, v in encoded.items() if isinstance(v, torch.Tensor)}
        return inputs, f"{inputs['input_ids'].shape[1]}-token example sentence"
    length = input_size or RANDOM_TEXT_LENGTH
    vocab = int(getattr(loaded.model.config, "vocab_size", 100))
    ids = torch.randint(0, vocab, (BATCH, length), generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, f"{length} random token ids (no tokenizer)"


def _module_taps(root: nn.Module) -> list[str]:
    """The modules the dry run hooks: a timm model's feature modules (its stage or block outputs)."""
    if not is_timm_model(root):
        return []
    info = getattr(root, "feature_info", None) or []
    return [entry["module"] for entry in info if isinstance(entry, dict) and entry.get("module")]


def _tap_points(root: nn.Module, taps: list[str], values: dict[str, Any],
                height: int | None) -> tuple[list[TapPoint], list[str]]:
    """The model's tap points from the dry run's values, stems and layouts hfdistill cannot adapt left out."""
    found: list[tuple[str, tuple[int, ...]]] = []
    notes: list[str] = []
    channels = {entry["module"]: entry.get("num_chs") for entry in (getattr(root, "feature_info", None) or [])
                if isinstance(entry, dict)} if is_timm_model(root) else {}
    for tap in taps:
        value = values.get(tap)
        if isinstance(value, list):  # transformers' hidden_states: embeddings first, then one per layer (or stage)
            for index, item in enumerate(value):
                if isinstance(item, torch.Tensor) and not (item.dim() == 3 and index == 0):  # not the token embeddings
                    found.append((f"{tap}.{index}", tuple(item.shape)))
        elif isinstance(value, torch.Tensor):
            shape = tuple(value.shape)
            if len(shape) == 4 and channels.get(tap) not in (None, shape[1]) and channels.get(tap) == shape[-1]:
                notes.append(f"{tap} gives channels-last maps {_shape(shape)}, which the adapters do not take; left out")
                continue
            found.append((tap, shape))
    points = []
    for tap, shape in found:
        stride = None
        if len(shape) == 4 and height:
            stride = 2 ** round(math.log2(max(height / shape[2], 1)))  # the nearest power of two: odd sizes round
            if stride < MIN_MAP_STRIDE:
                continue
        points.append((tap, shape, stride))
    return [TapPoint(tap, shape, stride, i + 1, len(points)) for i, (tap, shape, stride) in enumerate(points)], notes


# ------------------------------------------------------------------------------------------ matching
def match_tap_points(student: list[TapPoint], teacher: list[TapPoint]) -> list[tuple[TapPoint, TapPoint]]:
    """Student and teacher tap points paired: maps by stride (then depth), token sequences by layer proportion."""
    pairs = []
    for kind in ("map", "tokens"):
        s_points = [p for p in student if p.kind == kind]
        t_points = [p for p in teacher if p.kind == kind]
        # Maps group by stride; every layer of a transformer is one group (ViT and DeiT differ by a token).
        group = (lambda p: p.stride) if kind == "map" else (lambda p: 0)
        for key in sorted({group(p) for p in s_points} & {group(p) for p in t_points}):
            pairs += proportional_pairs([p for p in s_points if group(p) == key], [p for p in t_points if group(p) == key])
    return pairs


def proportional_pairs(student: list[Any], teacher: list[Any]) -> list[tuple[Any, Any]]:
    """Every item of the shorter list with the item of the longer one at the same relative depth.

    With ``M`` student and ``N >= M`` teacher layers, student layer ``i`` (1-based) pairs with teacher
    layer ``round(i * N / M)`` (12 -> 4: 1-3, 2-6, 3-9, 4-12), so the last layers always pair.
    """
    m, n = len(student), len(teacher)
    if not m or not n:
        return []
    if m <= n:
        return [(student[i - 1], teacher[_round_half_up(i * n / m) - 1]) for i in range(1, m + 1)]
    return [(student[_round_half_up(j * m / n) - 1], teacher[j - 1]) for j in range(1, n + 1)]


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))  # not round(): banker's rounding would send 1.5 and 2.5 to 2


# ------------------------------------------------------------------------------------------ checking
def _adapter_for(student: tuple[int, ...], teacher: tuple[int, ...]) -> tuple[str | None, str | None]:
    """(adapter, problem) that makes a student shape the teacher's, for methods that need equal shapes."""
    if student == teacher:
        return None, None
    if len(student) == len(teacher) == 4:
        return "conv1x1", None  # channels by a 1x1 conv; a spatial size that differs is pooled or interpolated
    if len(student) == len(teacher) and student[:-1] == teacher[:-1]:
        return "linear", None  # the width of tokens or vectors
    if len(student) == len(teacher) == 3:
        return None, (f"the student has {student[1]} tokens and the teacher {teacher[1]} (an extra class or "
                      "distillation token, another patch size or tokenizer); no adapter maps token counts")
    return None, f"no adapter maps {_shape(student)} to {_shape(teacher)}"


def _fit_pair(info: losses.LossInfo, s: TapPoint, t: TapPoint, student: ModelProbe, teacher: ModelProbe) -> TapPair:
    """The pair with the adapter the method needs, or the reason it cannot compare them."""
    adapter, problem = _adapter_for(s.shape, t.shape) if info.same_shape else (None, None)
    pair = TapPair(s, t, adapter, problem)
    if problem is None:
        problem = _method_problem(info, [pair], student, teacher)
    return dataclasses.replace(pair, problem=problem)


def _method_problem(info: losses.LossInfo, pairs: list[TapPair], student: ModelProbe, teacher: ModelProbe) -> str | None:
    """Run the method once on the dry run's tensors as the trainer would (adapter, configure, forward); what fails."""
    from .terms import LossContext

    try:
        s_values = []
        for pair in pairs:
            value = student.values[pair.student.tap]
            if pair.adapter:
                adapter = build_adapter(pair.adapter, value.shape, teacher.values[pair.teacher.tap].shape).eval()
                with torch.no_grad():
                    value = adapter(value)
            s_values.append(value)
        t_values = [teacher.values[pair.teacher.tap] for pair in pairs]
        for s_value, t_value in zip(s_values, t_values):
            if info.same_shape and s_value.shape != t_value.shape:  # the trainer refuses this after its dry run
                return (f"the adapted student is {_shape(tuple(s_value.shape))} but the teacher "
                        f"{_shape(tuple(t_value.shape))}")
        listed = info.multi_layer
        loss = losses.build(info.name)
        ctx = LossContext(
            term=info.name,
            student_shape=[v.shape for v in s_values] if listed else s_values[0].shape,
            teacher_shape=[v.shape for v in t_values] if listed else t_values[0].shape,
            student_taps=[p.student.tap for p in pairs],
            teacher_taps=[p.teacher.tap for p in pairs],
            student=student.root,
            teacher=teacher.root,
        )
        if hasattr(loss, "configure"):
            loss.configure(ctx)
        loss.eval()
        fields = {name: _dry_run_field(name) for name in info.fields}
        with torch.no_grad():
            value = loss(s_values if listed else s_values[0], t_values if listed else t_values[0], **fields)
        if not isinstance(value, torch.Tensor) or value.numel() != 1:
            return f"{info.name} returned {type(value).__name__} instead of a scalar"
    except (BadInputError, ValueError, RuntimeError, TypeError, IndexError) as exc:
        return " ".join(str(exc).split())
    return None


def _dry_run_field(name: str) -> Any:
    """A stand-in for a batch field a method declares, for the one forward of the check."""
    stand_ins = {
        "labels": lambda: torch.zeros(BATCH, dtype=torch.long),
        "index": lambda: torch.arange(BATCH),
        "epoch": lambda: 0.0,
        "step": lambda: 0,
    }
    return stand_ins[name]() if name in stand_ins else None  # attention_mask, num_items_in_batch: optional


def _pooled_pair(info: losses.LossInfo, student: ModelProbe, teacher: ModelProbe) -> TapPair | None:
    """The pooled pre-logits features as a pair (checked with the method), when both models have a head."""
    if student.pooled is None or teacher.pooled is None:
        return None
    return _fit_pair(info, student.pooled, teacher.pooled, student, teacher)


def _why_no_pairs(student: ModelProbe, teacher: ModelProbe) -> str:
    kinds = {probe.role: sorted({KIND_WORDS.get(p.kind, p.kind) for p in probe.points}) for probe in (teacher, student)}
    if not student.points or not teacher.points:
        empty = [probe.role for probe in (teacher, student) if not probe.points]
        return f"no tap points found in the {' and the '.join(empty)} (no timm feature_info or hidden_states)"
    return (f"no layers to pair: the teacher gives {', '.join(kinds['teacher'])} and the student "
            f"{', '.join(kinds['student'])} (maps pair by stride, token sequences by layer, never with each other)")
