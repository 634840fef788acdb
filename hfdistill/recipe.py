"""Recipes: a distillation described as plain data (DESIGN.md, contracts 2 and 3).

A recipe is YAML read with ``yaml.safe_load`` into the dataclasses below and validated before
anything is trained or written. Every error is a :class:`RecipeError` that names the field path
(``terms[1].adapter``) and what is allowed there.

From Python a recipe may hold only ``terms`` (and ``task_weight``): the models and data then
come as arguments to :class:`~hfdistill.DistillationTrainer`. The CLI needs the whole recipe.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

from . import losses
from .adapters import available_adapters, get_adapter_params

TAP_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.(-?[0-9]+|[A-Za-z_][A-Za-z0-9_]*))*(:(input|output))?$")
# Loss parameters that are temperatures must be > 0 whatever the method.
TEMPERATURE_PARAMS = ("temperature", "tau", "T")
TASKS = ("image-classification", "text-classification")


class RecipeError(ValueError):
    """A recipe that cannot be used; ``path`` is the offending field (``terms[1].adapter``)."""

    def __init__(self, path: str, message: str):
        self.path = path
        super().__init__(f"recipe error at {path}: {message}" if path else f"recipe error: {message}")


def _suggest(word: str, choices: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


@dataclass
class TermSpec:
    """One loss term: ``weight * loss(adapter(student tap), teacher tap)``."""

    loss: str = field(metadata={"help": "registered loss name (`hfdistill losses` lists them)"})
    weight: float = field(default=1.0, metadata={"help": "weight of this term in the total loss (>= 0)"})
    student: Union[str, list[str], None] = field(
        default=None,
        metadata={"help": "student tap: module path (`layer3`, `encoder.layer.1.output`, `layer3:input`) or "
                  "named output (`logits`, `hidden_states.2`, `attentions`, `pooled`); a list reads several"},
    )
    teacher: Union[str, list[str], None] = field(default=None, metadata={"help": "teacher tap(s), as `student`"})
    adapter: Union[str, None] = field(
        default=None, metadata={"help": "adapter mapping the student tap to the teacher's shape (`conv1x1`, ...)"}
    )
    adapter_params: dict = field(default_factory=dict, metadata={"help": "keyword arguments of the adapter"})
    params: dict = field(default_factory=dict, metadata={"help": "keyword arguments of the loss (temperature, ...)"})
    name: Union[str, None] = field(
        default=None, metadata={"help": "name used in logs (`loss_<name>`); defaults to the loss name"}
    )


@dataclass
class ModelSpec:
    """A teacher or student: timm name (`timm:resnet18`), `hf-hub:` timm id, transformers id or local folder."""

    name: str = field(metadata={"help": "timm:<name>, hf-hub:<org>/<name>, a transformers model id, or a local folder"})
    pretrained: Union[bool, None] = field(
        default=None, metadata={"help": "load pretrained weights (default: yes for a teacher, no for a student)"}
    )
    num_classes: Union[int, None] = field(default=None, metadata={"help": "number of output classes"})
    checkpoint: Union[str, None] = field(default=None, metadata={"help": "local weights file (safetensors) to load"})
    revision: Union[str, None] = field(default=None, metadata={"help": "Hub revision (branch, tag or commit)"})
    dtype: Union[str, None] = field(default=None, metadata={"help": "float32, bfloat16 or float16"})
    kwargs: dict = field(default_factory=dict, metadata={"help": "extra keyword arguments for the model constructor"})
    config: Union[dict, None] = field(
        default=None,
        metadata={"help": "transformers config fields: with a model type as `name` (`bert`) builds a fresh model "
                  "from this config; with a model id or folder, overrides fields of its config (`num_hidden_layers`)"},
    )
    tokenizer: Union[str, None] = field(
        default=None, metadata={"help": "tokenizer id or folder (default: the model's own; required for `config` models)"}
    )
    image_size: Union[int, None] = field(
        default=None, metadata={"help": "input resolution of this model (default: data.image_size, else its own config)"}
    )
    train_from: Union["ModelSpec", None] = field(
        default=None,
        metadata={"help": "teacher only: when the `name` folder does not exist yet, train this model on the data "
                  "first (no teacher, no terms) and save it there"},
    )
    train_args: dict = field(
        default_factory=dict,
        metadata={"help": "teacher only: training arguments for `train_from`, on top of the recipe's `training`"},
    )
    baseline: bool = field(
        default=False,
        metadata={"help": "student only: also train the same student without the teacher, with the same data and "
                  "arguments, and compare both in the summary"},
    )
    baseline_seeds: int = field(
        default=1,
        metadata={"help": "student only, with `baseline`: compare no teacher vs distilled over this many seeds "
                  "(training.seed, +1, ...) and report mean and std; the saved student is the first seed's"},
    )


@dataclass
class DataSpec:
    """Where the examples come from; `hfdistill.data` turns it into datasets."""

    name: str = field(
        metadata={"help": "sklearn-digits, fashion-mnist, chatterbot-corpus, imagefolder, csv, json, or a datasets id"}
    )
    data_dir: Union[str, None] = field(default=None, metadata={"help": "folder for imagefolder / local files"})
    data_files: Union[str, list[str], dict, None] = field(default=None, metadata={"help": "csv/json file(s)"})
    train_split: str = field(default="train", metadata={"help": "split used for training"})
    eval_split: Union[str, None] = field(
        default=None, metadata={"help": "split used for evaluation; made from the training split when absent"}
    )
    validation_fraction: float = field(
        default=0.1, metadata={"help": "fraction of the training split held out when there is no eval split"}
    )
    seed: int = field(
        default=42,
        metadata={"help": "seed of the made validation split and of the sample limits; kept apart from "
                  "training.seed so that runs with other training seeds evaluate on the same held-out examples "
                  "(a saved teacher never saw them)"},
    )
    image_column: Union[str, None] = field(default=None, metadata={"help": "column holding images"})
    text_column: Union[str, None] = field(default=None, metadata={"help": "column holding text"})
    label_column: Union[str, None] = field(default=None, metadata={"help": "column holding labels"})
    image_size: Union[int, None] = field(default=None, metadata={"help": "input resolution (default: the model's)"})
    max_length: int = field(default=128, metadata={"help": "maximum tokens per text example"})
    max_train_samples: Union[int, None] = field(default=None, metadata={"help": "use at most this many examples"})
    max_eval_samples: Union[int, None] = field(default=None, metadata={"help": "evaluate on at most this many"})
    augment: str = field(
        default="auto",
        metadata={"help": "training augmentation of images: none, crop (pad and random crop), crop_flip (and "
                  "horizontal flips), rrc_flip (random resized crop and flips, ImageNet style); auto: the source's "
                  "default (crop for digits, crop_flip otherwise)"},
    )
    options: dict = field(default_factory=dict, metadata={"help": "source-specific options (e.g. topics)"})


@dataclass
class Recipe:
    """A whole distillation: what to learn from (terms), and for the CLI, models, data and training."""

    terms: list[TermSpec] = field(default_factory=list, metadata={"help": "the distillation loss terms"})
    task_weight: Union[float, None] = field(
        default=None, metadata={"help": "weight of the student's own task loss (overrides DistillationConfig)"}
    )
    task: Union[str, None] = field(default=None, metadata={"help": f"one of {', '.join(TASKS)}"})
    teacher: Union[ModelSpec, None] = field(default=None, metadata={"help": "the teacher model"})
    student: Union[ModelSpec, None] = field(default=None, metadata={"help": "the student model"})
    data: Union[DataSpec, None] = field(default=None, metadata={"help": "the dataset"})
    training: dict = field(
        default_factory=dict, metadata={"help": "DistillationConfig / TrainingArguments fields (output_dir, ...)"}
    )

    # ---- loading and saving ----
    @classmethod
    def from_dict(cls, data: Any) -> "Recipe":
        """Validate plain data (what YAML gives) into a Recipe; raises RecipeError naming the field path."""
        recipe = _parse_dataclass(cls, data, "")
        recipe.validate()
        return recipe

    @classmethod
    def from_yaml(cls, path: str | Path) -> "Recipe":
        path = Path(path)
        if not path.is_file():
            raise RecipeError("", f"recipe file {str(path)!r} does not exist; give the path of a YAML recipe")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise RecipeError("", f"{path} is not valid YAML: {exc}") from None
        if data is None:
            raise RecipeError("", f"{path} is empty; a recipe needs at least `terms:` or `student:`")
        return cls.from_dict(data)

    def to_dict(self) -> dict:
        """Plain data, without fields left at their defaults, ready for YAML."""
        return _to_plain(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_yaml(), encoding="utf-8")

    # ---- checks beyond types ----
    def validate(self) -> None:
        if self.task_weight is not None and self.task_weight < 0:
            raise RecipeError("task_weight", f"must be >= 0, got {self.task_weight}")
        if self.task is not None and self.task not in TASKS:
            raise RecipeError("task", f"unknown task {self.task!r}; allowed: {', '.join(TASKS)}{_suggest(self.task, TASKS)}")
        names = set()
        for i, term in enumerate(self.terms):
            _validate_term(term, f"terms[{i}]")
            name = term_name(term, i, self.terms)
            if name in names:
                raise RecipeError(f"terms[{i}].name", f"two terms are named {name!r}; give each a distinct `name`")
            names.add(name)
        if self.training:
            from .config import DistillationConfig

            allowed = {f.name for f in dataclasses.fields(DistillationConfig) if f.init}
            for key in self.training:
                if key not in allowed:
                    raise RecipeError(
                        f"training.{key}",
                        f"unknown training argument{_suggest(key, allowed)}; any DistillationConfig / "
                        "TrainingArguments field is allowed",
                    )
        if self.student is not None and self.student.baseline_seeds < 1:
            raise RecipeError("student.baseline_seeds", f"must be >= 1, got {self.student.baseline_seeds}")
        if self.data is not None and not 0 < self.data.validation_fraction < 1:
            raise RecipeError("data.validation_fraction", f"must be in (0, 1), got {self.data.validation_fraction}")


def term_name(term: TermSpec, index: int, terms: list[TermSpec]) -> str:
    """The log name of a term: its `name`, else its loss, suffixed by position when a loss is used twice."""
    if term.name:
        return term.name
    same_loss = [i for i, t in enumerate(terms) if t.loss == term.loss and not t.name]
    return term.loss if len(same_loss) == 1 else f"{term.loss}_{same_loss.index(index)}"


def _validate_term(term: TermSpec, path: str) -> None:
    if term.loss not in losses.available():
        raise RecipeError(
            f"{path}.loss",
            f"unknown loss {term.loss!r}{_suggest(term.loss, losses.available())}; "
            f"registered losses: {', '.join(losses.available())}",
        )
    info = losses.get_info(term.loss)
    if term.weight < 0:
        raise RecipeError(f"{path}.weight", f"must be >= 0, got {term.weight}")
    for key, value in term.params.items():
        if key not in info.params:
            raise RecipeError(
                f"{path}.params.{key}",
                f"loss {term.loss!r} has no parameter {key!r}{_suggest(key, info.params)}; "
                f"its parameters: {', '.join(info.params) or 'none'}",
            )
        if key in TEMPERATURE_PARAMS and (not isinstance(value, (int, float)) or value <= 0):
            raise RecipeError(f"{path}.params.{key}", f"a temperature must be a number > 0, got {value!r}")
    for side in ("student", "teacher"):
        taps = getattr(term, side)
        if taps is None:
            if info.default_tap is None:
                raise RecipeError(
                    f"{path}.{side}",
                    f"loss {term.loss!r} reads {info.reads}, so the term must name the {side} tap(s): "
                    "a module path such as `layer3` or a named output such as `hidden_states.2`",
                )
            continue
        for j, tap in enumerate(taps if isinstance(taps, list) else [taps]):
            where = f"{path}.{side}[{j}]" if isinstance(taps, list) else f"{path}.{side}"
            if not isinstance(tap, str) or not TAP_PATTERN.match(tap):
                raise RecipeError(
                    where,
                    f"{tap!r} is not a tap; write a dotted module path (`layer3`, `blocks.2.mlp`), optionally "
                    "with `:input`, or a named output (`logits`, `hidden_states.4`)",
                )
    if isinstance(term.student, list) != isinstance(term.teacher, list) and None not in (term.student, term.teacher):
        raise RecipeError(path, "student and teacher must both be single taps or both be lists")
    if isinstance(term.student, list) and isinstance(term.teacher, list):
        if len(term.student) != len(term.teacher) and not info.multi_layer:
            raise RecipeError(
                f"{path}.teacher",
                f"{len(term.student)} student taps but {len(term.teacher)} teacher taps; pair them one to one",
            )
    if term.adapter is not None:
        if term.adapter not in available_adapters():
            raise RecipeError(
                f"{path}.adapter",
                f"unknown adapter {term.adapter!r}{_suggest(term.adapter, available_adapters())}; "
                f"allowed: {', '.join(available_adapters())}",
            )
        allowed = get_adapter_params(term.adapter)
        for key in term.adapter_params:
            if key not in allowed:
                raise RecipeError(
                    f"{path}.adapter_params.{key}",
                    f"adapter {term.adapter!r} has no parameter {key!r}; its parameters: {', '.join(allowed) or 'none'}",
                )
    elif term.adapter_params:
        raise RecipeError(f"{path}.adapter_params", "given without an `adapter`")


# ---- generic typed parsing of plain data into dataclasses ----
def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return {str: "string", int: "integer", float: "number", bool: "true/false", dict: "mapping"}.get(tp, str(tp))


def _parse_value(tp: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        errors = []
        for option in typing.get_args(tp):
            try:
                return _parse_value(option, value, path)
            except RecipeError as exc:
                errors.append(exc)
        # A nested dataclass error is more useful than "wrong type".
        for exc in errors:
            if exc.path != path:
                raise exc
        raise RecipeError(path, f"expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
    if tp is type(None):
        if value is None:
            return None
    elif origin is list:
        if isinstance(value, list):
            (item_type,) = typing.get_args(tp)
            return [_parse_value(item_type, v, f"{path}[{i}]") for i, v in enumerate(value)]
    elif dataclasses.is_dataclass(tp):
        return _parse_dataclass(tp, value, path)
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp in (str, bool, dict):
        if isinstance(value, tp):
            return value
    else:  # pragma: no cover - a field type this parser does not know is a programming error
        raise TypeError(f"unsupported recipe field type {tp!r} at {path}")
    raise RecipeError(path, f"expected {_type_name(tp)}, got {type(value).__name__} {value!r}")


def _parse_dataclass(cls: type, data: Any, path: str) -> Any:
    if not isinstance(data, dict):
        raise RecipeError(path, f"expected a mapping with keys {[f.name for f in dataclasses.fields(cls)]}, got {data!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    values = {}
    for key, value in data.items():
        key_path = f"{path}.{key}" if path else str(key)
        if key not in known:
            raise RecipeError(key_path, f"unknown key{_suggest(str(key), known)}; allowed keys: {', '.join(known)}")
        values[key] = _parse_value(hints[key], value, key_path)
    for name, f in known.items():
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if required and name not in values:
            raise RecipeError(f"{path}.{name}" if path else name, f"missing required field ({f.metadata.get('help', '')})")
    return cls(**values)


def _to_plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        out = {}
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING or value != default:
                out[f.name] = _to_plain(value)
        return out
    if isinstance(obj, list):
        return [_to_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {k: _to_plain(v) for k, v in obj.items()}
    return obj
