"""Recipes: a distillation described as plain data (DESIGN.md, contracts 2, 3 and 7).

A recipe is YAML read with a ``yaml.SafeLoader`` (:class:`RecipeLoader`: no tags that build objects) into the dataclasses below and validated before
anything is trained or written. Every error is a :class:`RecipeError` that names the field path
(``terms[1].adapter``, ``stages[1].terms[0].params.alpha``) and what is allowed there.

From Python a recipe may hold only ``terms`` (and ``task_weight``): the models and data then
come as arguments to :class:`~hfdistill.DistillationTrainer`. The CLI needs the whole recipe.

**Stages.** A recipe is either one stage (top-level ``terms`` and ``task_weight``, as before) or a
list of ``stages``, trained one after another. Each stage has its terms, its task weight, its
``training`` overrides (merged key by key over the recipe's top-level ``training``) and optionally
``train``, the list of what it trains (default: student, adapters and loss modules). Each stage
continues from the previous stage's weights: the student, and every adapter and loss module of a
term whose name appears again in a later stage (so FT's paraphraser is trained in stage 1 and used,
frozen, in stage 2 by a term of the same name). :meth:`Recipe.stage_list` gives the stages of any
recipe (one ``distill`` stage for a one-stage recipe) and :meth:`Recipe.stage_recipe` a stage as a
one-stage recipe with its training merged.

**base:** A recipe file may start from another: ``base: other.yaml`` (relative to the file that
says it). The file's keys are merged over the base's as a JSON Merge Patch (RFC 7396): mappings
merge key by key, recursively; lists and scalars replace; ``null`` removes the key (the field goes
back to its default). A base may have its own base. :func:`load_recipe_data` returns the merged
plain data; :meth:`Recipe.from_yaml` validates it. The loaded recipe holds the merged content only
(``to_yaml`` never writes ``base``), so a saved recipe stands alone.

**Overrides.** :func:`parse_overrides` and :func:`apply_overrides` turn ``--dotted.key value``
arguments into edits of the (merged) plain data (``--stages.1.training.num_train_epochs 1``);
:func:`load_recipe` does file + overrides + validation, as the CLI does.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence, Union

import yaml

from . import losses
from .adapters import available_adapters, check_adapter_params
from .tasks import TASK_NAMES
from .errors import AdapterError, LossParamError, OverrideError, RecipeError  # noqa: F401 - RecipeError, OverrideError re-exported

TAP_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.(-?[0-9]+|[A-Za-z_][A-Za-z0-9_]*))*(:(input|output))?$")
MODULE_PATH_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.(-?[0-9]+|[A-Za-z_][A-Za-z0-9_]*))*$")
STAGE_NAME_PATTERN = re.compile(r"^[A-Za-z0-9_-]+$")
TERM_NAME_PATTERN = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")
# Names of the total's other parts: a term may not take them.
RESERVED_TERM_NAMES = ("task",)
TASKS = TASK_NAMES  # the tasks table (tasks.py) is the one list
# The name of the one stage of a recipe without `stages`.
DEFAULT_STAGE_NAME = "distill"
# What a stage's `train` list may name (followed by `.<path>` where the docs say so).
TRAIN_ROOTS = ("student", "adapters", "losses")
# Training arguments that belong to the whole run, not to one stage.
RUN_ONLY_TRAINING_KEYS = ("output_dir", "resume_from_checkpoint", "overwrite_output_dir")


def _suggest(word: str, choices: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


# ---- YAML ----
class RecipeLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` (no tags that build objects) with two fixes for recipes.

    - Numbers in exponent form without a dot (``1e-3``, ``5E4``) are floats, as in YAML 1.2 and as a
      user means them; PyYAML's YAML 1.1 reads them as strings (``learning_rate: 1e-3`` then fails
      deep inside the Trainer).
    - A key given twice in one mapping is an error (YAML 1.1 silently keeps the last one).
    """


RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _construct_mapping(loader: RecipeLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[Any, Any] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        try:
            first = seen.get(key)
        except TypeError:  # an unhashable key: the base constructor reports it
            break
        if first is not None:
            raise yaml.constructor.ConstructorError(
                "while reading a mapping", node.start_mark,
                f"found the key {key!r} twice (first {first}); give each key once", key_node.start_mark,
            )
        seen[key] = f"on line {key_node.start_mark.line + 1}"
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


RecipeLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_yaml(text: str) -> Any:
    """Plain data from YAML text, read with :class:`RecipeLoader` (safe: no code runs)."""
    return yaml.load(text, Loader=RecipeLoader)  # noqa: S506 - RecipeLoader is a SafeLoader


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

    # Required, except for a teacher read from a cache (`teacher: {cache: DIR}`): _validate_model says so.
    name: Union[str, None] = field(
        default=None, metadata={"help": "timm:<name>, hf-hub:<org>/<name>, a transformers model id, or a local folder"}
    )
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
        default=None, metadata={"help": "tokenizer id or folder (default: the model's own; required for `config` models); "
                                "`hfdistill:bytes`: a byte-level tokenizer built offline (256 byte tokens plus "
                                "<|endoftext|> and <|pad|>), saved with the model"}
    )
    image_size: Union[int, None] = field(
        default=None, metadata={"help": "input resolution of this model (default: data.image_size, else its own config)"}
    )
    init_layers: Union[str, list[int], None] = field(
        default=None,
        metadata={"help": "a transformers model loaded from a checkpoint (`pretrained: true`) with fewer layers than "
                  "it (`config: {num_hidden_layers: N}`): which of the checkpoint's layers the N layers start from: "
                  "`first` (layers 0..N-1), `uniform` (every k-th, k = L // N: layers 0, k, 2k, ..., as DistilBERT), "
                  "or a list of N layer indices; embeddings, final norm and head are copied too (default: "
                  "transformers' own loading, the first N)"},
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
    cache: Union[str, None] = field(
        default=None,
        metadata={"help": "teacher only: a folder written by `hfdistill cache` (hfdistill.cache): the teacher's stored "
                  "outputs are read instead of running it; with `name` (and its loading fields) the model is loaded "
                  "once to check that the cache is its own"},
    )


@dataclass
class DataSpec:
    """Where the examples come from; `hfdistill.data` turns it into datasets."""

    name: str = field(
        metadata={"help": "sklearn-digits, fashion-mnist, chatterbot-corpus, fashion-mnist-scenes, imagefolder, csv, "
                  "json, disk (a folder written by save_to_disk, as data_dir), or a datasets id"}
    )
    data_dir: Union[str, None] = field(
        default=None, metadata={"help": "folder for imagefolder / disk / local files (fashion-mnist: its idx files)"}
    )
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
    label_column: Union[str, None] = field(
        default=None, metadata={"help": "column holding labels (semantic segmentation: the segmentation maps)"}
    )
    image_size: Union[int, None] = field(default=None, metadata={"help": "input resolution (default: the model's)"})
    max_length: int = field(default=128, metadata={"help": "maximum tokens per text example"})
    max_train_samples: Union[int, None] = field(default=None, metadata={"help": "use at most this many examples"})
    max_eval_samples: Union[int, None] = field(default=None, metadata={"help": "evaluate on at most this many"})
    augment: str = field(
        default="auto",
        metadata={"help": "training augmentation of images: none, crop (pad and random crop), crop_flip (and "
                  "horizontal flips), rrc_flip (random resized crop and flips, ImageNet style), flip (horizontal "
                  "flips only; semantic segmentation flips each image with its map: none or flip); auto: the "
                  "source's default (crop for digits, flip for segmentation, crop_flip otherwise)"},
    )
    options: dict = field(default_factory=dict, metadata={"help": "source-specific options (e.g. topics)"})
    # Semantic segmentation (task: semantic-segmentation) only.
    label_names: Union[list[str], None] = field(
        default=None,
        metadata={"help": "semantic-segmentation: the class names, in class-index order (map value i is class i), "
                  "for data whose maps carry no names (default: the dataset's own, an id2label.json beside a saved "
                  "dataset, else a segmentation model's id2label)"},
    )
    reduce_labels: Union[bool, None] = field(
        default=None,
        metadata={"help": "semantic-segmentation: the maps' 0 means `no label` (ignored: it becomes 255) and class "
                  "k is stored as k + 1 (it becomes k), as in ADE20K (default: the student image processor's "
                  "`do_reduce_labels`)"},
    )
    # Object detection (task: object-detection) only.
    box_format: Union[str, None] = field(
        default=None,
        metadata={"help": "object-detection: how the objects' boxes are written, in pixels: `xywh` ([x, y, width, "
                  "height], COCO's and the Hub's common sets', the default) or `xyxy` ([x1, y1, x2, y2], Pascal VOC's)"},
    )
    # Language modelling (task: text-generation) only.
    prompt_column: Union[str, None] = field(
        default=None, metadata={"help": "text-generation: column holding the prompts of prompt/completion pairs "
                                "(default: `prompt`, when the data has `prompt` and `completion` columns)"}
    )
    completion_column: Union[str, None] = field(
        default=None, metadata={"help": "text-generation: column holding the completions (default: `completion`)"}
    )
    messages_column: Union[str, None] = field(
        default=None, metadata={"help": "text-generation: column holding chats, lists of {role, content} rendered "
                                "with the tokenizer's chat template (default: `messages`, when present)"}
    )
    completion_only_loss: bool = field(
        default=True,
        metadata={"help": "text-generation: learn only the completion tokens (of prompt/completion pairs; the "
                  "assistant turns of chats); false: every token (plain text always learns every token)"},
    )
    packing: bool = field(
        default=False,
        metadata={"help": "text-generation: concatenate the tokenised examples (each ending with the end-of-text "
                  "token) into blocks of `max_length` tokens, train and eval splits both; no attention mask between "
                  "the examples of a block"},
    )


@dataclass
class StageSpec:
    """One stage of a multi-stage recipe: its terms, task weight, training overrides and what it trains.

    A stage continues from the previous stage's weights. A term whose name appears in an earlier stage
    keeps that term's adapter and loss-module state (a paraphraser trained in stage 1 is the one used
    in stage 2); whether it trains again is decided by this stage's ``train``.
    """

    name: str = field(
        metadata={"help": "the stage's name (letters, digits, `_`, `-`): shown as it starts, and the name of "
                  "its checkpoint folder"}
    )
    terms: list[TermSpec] = field(default_factory=list, metadata={"help": "the distillation loss terms of this stage"})
    task_weight: Union[float, None] = field(
        default=None,
        metadata={"help": "weight of the student's own task loss in this stage (default: the recipe's "
                  "`task_weight`, else DistillationConfig's); 0 trains on the terms alone"},
    )
    train: Union[list[str], None] = field(
        default=None,
        metadata={"help": "what trains in this stage (default: student, adapters and loss modules): `student`, "
                  "`student.<module path>`, `adapters`, `adapters.<term>`, `losses.<term>` or "
                  "`losses.<term>.<submodule path>`; everything else is frozen"},
    )
    training: dict = field(
        default_factory=dict,
        metadata={"help": "DistillationConfig fields for this stage, merged over the recipe's `training` "
                  "(not output_dir or resume_from_checkpoint, which belong to the run)"},
    )


@dataclass
class Recipe:
    """A whole distillation: what to learn from (terms or stages), and for the CLI, models, data and training."""

    terms: list[TermSpec] = field(
        default_factory=list, metadata={"help": "the distillation loss terms (a one-stage recipe; else `stages`)"}
    )
    task_weight: Union[float, None] = field(
        default=None,
        metadata={"help": "weight of the student's own task loss (overrides DistillationConfig); with `stages`, "
                  "the default of stages that do not set theirs"},
    )
    task: Union[str, None] = field(default=None, metadata={"help": f"one of {', '.join(TASKS)}"})
    teacher: Union[ModelSpec, None] = field(default=None, metadata={"help": "the teacher model"})
    student: Union[ModelSpec, None] = field(default=None, metadata={"help": "the student model"})
    data: Union[DataSpec, None] = field(default=None, metadata={"help": "the dataset"})
    training: dict = field(
        default_factory=dict,
        metadata={"help": "DistillationConfig / TrainingArguments fields (output_dir, ...); with `stages`, the "
                  "defaults of every stage"},
    )
    stages: list[StageSpec] = field(
        default_factory=list,
        metadata={"help": "stages trained one after another, each from the previous one's weights (instead of "
                  "top-level `terms`)"},
    )

    # ---- loading and saving ----
    @classmethod
    def from_dict(cls, data: Any) -> "Recipe":
        """Validate plain data (what YAML gives) into a Recipe; raises RecipeError naming the field path.

        ``base:`` is resolved relative to a file, so plain data holding it is an error: load the file with
        :meth:`from_yaml` (or merge it with :func:`load_recipe_data` first).
        """
        if isinstance(data, dict) and "base" in data:
            raise RecipeError(
                "base", f"`base: {data['base']!r}` is resolved relative to a recipe file, and this recipe came "
                "without one; load it with Recipe.from_yaml(path) or hfdistill.recipe.load_recipe_data(path)",
            )
        recipe = _parse_dataclass(cls, data, "")
        recipe.validate()
        return recipe

    @classmethod
    def from_yaml(cls, path: str | Path) -> "Recipe":
        """Read a recipe file (resolving ``base:``) and validate it."""
        return cls.from_dict(load_recipe_data(path))

    def to_dict(self) -> dict:
        """Plain data, without fields left at their defaults, ready for YAML (never a ``base``: it stands alone)."""
        return _to_plain(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_yaml(), encoding="utf-8")

    # ---- stages ----
    def stage_list(self) -> list[StageSpec]:
        """The stages to train, in order.

        A recipe without ``stages`` is one stage named ``distill`` (its ``terms`` and ``task_weight``, no
        ``train`` restriction, no training overrides). With ``stages``, each stage is returned with its
        ``task_weight`` resolved: its own, else the recipe's top-level one (None still means
        DistillationConfig's ``task_weight``). ``training`` stays the stage's own overrides; see
        :meth:`stage_training` for the merged arguments.
        """
        if not self.stages:
            return [StageSpec(name=DEFAULT_STAGE_NAME, terms=self.terms, task_weight=self.task_weight, train=None,
                              training={})]
        return [
            stage if stage.task_weight is not None or self.task_weight is None
            else dataclasses.replace(stage, task_weight=self.task_weight)
            for stage in self.stages
        ]

    def stage_training(self, stage: StageSpec | str) -> dict:
        """The training arguments of a stage: the recipe's ``training`` with the stage's keys replacing."""
        stage = self._stage(stage)
        return {**self.training, **stage.training}

    def stage_recipe(self, stage: StageSpec | str) -> "Recipe":
        """A stage as a one-stage recipe (its terms and task weight, the merged training, the same models and data)."""
        stage = self._stage(stage)
        return dataclasses.replace(
            self, terms=list(stage.terms), task_weight=stage.task_weight, training=self.stage_training(stage), stages=[]
        )

    def select_stage(self, stage: str | int | None = None) -> tuple[StageSpec, str]:
        """The stage a trainer trains (by name or index) and its field path (``stages[1]``, or ``recipe``).

        ``None`` is allowed for a one-stage recipe only: several stages are trained one by one
        (``DistillationTrainer(stage=...)``) or all in order by :func:`hfdistill.run`.
        """
        stages = self.stage_list()
        if not self.stages:
            if stage not in (None, 0, stages[0].name):
                raise RecipeError("stages", f"stage {stage!r}: the recipe has no `stages`, only its top-level terms")
            return stages[0], "recipe"
        names = [s.name for s in stages]
        if stage is None:
            if len(stages) == 1:
                return stages[0], "stages[0]"
            raise RecipeError(
                "stages", f"the recipe has {len(stages)} stages ({', '.join(names)}); pass `stage=` to "
                "DistillationTrainer (and `distill_state=` from the previous stage), or run them all with "
                "hfdistill.run(recipe)",
            )
        index = names.index(stage) if stage in names else stage
        if not isinstance(index, int) or isinstance(index, bool) or not -len(stages) <= index < len(stages):
            raise RecipeError("stages", f"stage {stage!r} is not in the recipe{_suggest(str(stage), names)}; "
                              f"its stages: {', '.join(names)}")
        return stages[index], f"stages[{index % len(stages)}]"

    def _stage(self, stage: StageSpec | str) -> StageSpec:
        stages = self.stage_list()
        if isinstance(stage, StageSpec):
            name = stage.name
        else:
            name = stage
        for candidate in stages:
            if candidate.name == name:
                return candidate
        names = [s.name for s in stages]
        raise KeyError(f"no stage named {name!r}{_suggest(str(name), names)}; stages: {', '.join(names)}")

    # ---- checks beyond types ----
    def validate(self) -> None:
        if self.task_weight is not None and self.task_weight < 0:
            raise RecipeError("task_weight", f"must be >= 0, got {self.task_weight}")
        if self.task is not None and self.task not in TASKS:
            raise RecipeError("task", f"unknown task {self.task!r}; allowed: {', '.join(TASKS)}{_suggest(self.task, TASKS)}")
        _validate_training(self.training, "training")
        if self.stages:
            if self.terms:
                raise RecipeError(
                    "stages", "a recipe has either top-level `terms` (one stage) or `stages`, not both; move the "
                    "terms into a stage",
                )
            seen: dict[str, int] = {}
            for i, stage in enumerate(self.stages):
                where = f"stages[{i}]"
                if not STAGE_NAME_PATTERN.fullmatch(stage.name):
                    raise RecipeError(
                        f"{where}.name", f"{stage.name!r} is not a stage name; use letters, digits, `_` and `-` "
                        "(it names the stage's checkpoint folder)",
                    )
                if stage.name in seen:
                    raise RecipeError(
                        f"{where}.name", f"stages[{seen[stage.name]}] is also named {stage.name!r}; give each stage "
                        "a distinct name",
                    )
                seen[stage.name] = i
                if stage.task_weight is not None and stage.task_weight < 0:
                    raise RecipeError(f"{where}.task_weight", f"must be >= 0, got {stage.task_weight}")
                _validate_terms(stage.terms, f"{where}.terms")
                if stage.train is not None:
                    _validate_train(stage.train, stage.terms, f"{where}.train")
                _validate_training(stage.training, f"{where}.training", stage=True)
        else:
            _validate_terms(self.terms, "terms")
        for i, stage in enumerate(self.stage_list()):
            if not stage.terms and self._effective_task_weight(stage) == 0:
                where = f"stages[{i}]" if self.stages else "task_weight"
                raise RecipeError(
                    where, f"{'stage ' + repr(stage.name) if self.stages else 'this recipe'} has no terms and a task "
                    "weight of 0, so it would train nothing; add a term or give the task loss a weight",
                )
        for role in ("teacher", "student"):
            spec = getattr(self, role)
            while spec is not None:
                _validate_model(spec, role)
                spec, role = spec.train_from, f"{role}.train_from"
        if self.student is not None and self.student.baseline_seeds < 1:
            raise RecipeError("student.baseline_seeds", f"must be >= 1, got {self.student.baseline_seeds}")
        if self.data is not None:
            _validate_data(self.data, self.task)

    def _effective_task_weight(self, stage: StageSpec) -> Any:
        if stage.task_weight is not None:
            return stage.task_weight
        training = self.training if not self.stages else {**self.training, **stage.training}
        return training.get("task_weight", 1.0)  # DistillationConfig's default


def _validate_model(spec: ModelSpec, path: str) -> None:
    """Fields that apply only to transformers models are refused for timm ones (not silently ignored)."""
    if spec.cache is not None or spec.name is None:
        _validate_cache_spec(spec, path)
        if spec.name is None:
            return
    if not spec.name.strip():
        raise RecipeError(f"{path}.name", "is empty; name a model (`timm:resnet18`, a transformers id or a folder)")
    if spec.name.startswith(("timm:", "hf-hub:")):
        for key, instead in (("config", "`kwargs:` (timm.create_model arguments such as `depths`)"),
                             ("tokenizer", "nothing: timm models take images")):
            if getattr(spec, key) is not None:
                raise RecipeError(f"{path}.{key}", f"applies to transformers models, not to the timm model "
                                  f"{spec.name!r}; use {instead}")
    if spec.dtype is not None and spec.dtype not in ("float32", "bfloat16", "float16"):
        raise RecipeError(f"{path}.dtype", f"must be float32, bfloat16 or float16, got {spec.dtype!r}")
    if spec.init_layers is not None:
        _validate_init_layers(spec, path)


def _validate_init_layers(spec: ModelSpec, path: str) -> None:
    where = f"{path}.init_layers"
    value = spec.init_layers
    if spec.name.startswith(("timm:", "hf-hub:")):
        raise RecipeError(where, f"applies to transformers models, not to the timm model {spec.name!r}")
    if spec.pretrained is False:
        raise RecipeError(where, "picks the checkpoint's layers to start from, but `pretrained: false` loads none; "
                          "remove one of them")
    if isinstance(value, str):
        if value not in ("first", "uniform"):
            raise RecipeError(where, f"must be `first`, `uniform` or a list of layer indices, got {value!r}"
                              f"{_suggest(value, ('first', 'uniform'))}")
    elif isinstance(value, list):
        if not value or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in value):
            raise RecipeError(where, f"a list of layer indices must hold integers >= 0, got {value!r}")
    else:
        raise RecipeError(where, f"must be `first`, `uniform` or a list of layer indices, got {value!r}")


# Teacher fields that make no sense with `cache:` (the cached outputs fix the teacher, its dtype and its weights).
CACHE_REFUSED_FIELDS = {
    "train_from": "a cached teacher is not trained; train it first, then build the cache from it",
    "train_args": "a cached teacher is not trained",
    "dtype": "the cache holds the outputs of the dtype it was built with (`training.teacher_dtype` when building)",
}


def _validate_cache_spec(spec: ModelSpec, path: str) -> None:
    """`cache:` is the teacher's only; `name` is then optional (given, it is checked against the cache)."""
    if spec.cache is None:
        raise RecipeError(f"{path}.name", "missing required field (timm:<name>, hf-hub:<org>/<name>, a transformers "
                          "model id, or a local folder)" + ("; or `cache: DIR` for a cached teacher" if path == "teacher" else ""))
    if path != "teacher":
        raise RecipeError(f"{path}.cache", "only the teacher can be read from a cache (`teacher: {cache: DIR}`)")
    if not str(spec.cache).strip():
        raise RecipeError(f"{path}.cache", "is empty; give the folder `hfdistill cache` wrote")
    for key, why in CACHE_REFUSED_FIELDS.items():
        value = getattr(spec, key)
        if value not in (None, {}):
            raise RecipeError(f"{path}.{key}", f"does not go with `cache:`: {why}; remove it")


# DataSpec fields that only language modelling reads, with their defaults (refused, not ignored, elsewhere).
LANGUAGE_MODELLING_DATA_FIELDS = {"prompt_column": None, "completion_column": None, "messages_column": None,
                                  "completion_only_loss": True, "packing": False}
# DataSpec fields that only semantic segmentation reads, with their defaults.
SEGMENTATION_DATA_FIELDS = {"label_names": None, "reduce_labels": None}
# DataSpec fields that only object detection reads, with their defaults.
DETECTION_DATA_FIELDS = {"box_format": None}
BOX_FORMATS = ("xywh", "xyxy")  # how object-detection data write boxes (hfdistill.detection reads them)


def _validate_data(data: DataSpec, task: Union[str, None] = None) -> None:
    from .data import BUILTIN_SOURCE_FIELDS, SOURCE_AGNOSTIC_FIELDS
    from .tasks import TASKS as TASK_TABLE

    if task in TASK_TABLE and TASK_TABLE[task].targets != "tokens":
        for key, default in LANGUAGE_MODELLING_DATA_FIELDS.items():
            if getattr(data, key) != default:
                raise RecipeError(f"data.{key}", f"applies to language modelling (task: text-generation), not to "
                                  f"{task}; remove it")
    if task in TASK_TABLE and TASK_TABLE[task].targets != "maps":
        for key, default in SEGMENTATION_DATA_FIELDS.items():
            if key == "label_names" and TASK_TABLE[task].targets == "boxes":
                continue  # object detection: the objects' class names, when their categories are plain integers
            if getattr(data, key) != default:
                raise RecipeError(f"data.{key}", f"applies to semantic segmentation (task: semantic-segmentation), "
                                  f"not to {task}; remove it")
    if task in TASK_TABLE and TASK_TABLE[task].targets != "boxes":
        for key, default in DETECTION_DATA_FIELDS.items():
            if getattr(data, key) != default:
                raise RecipeError(f"data.{key}", f"applies to object detection (task: object-detection), not to "
                                  f"{task}; remove it")
    if data.box_format is not None and data.box_format not in BOX_FORMATS:
        raise RecipeError("data.box_format", f"must be one of {', '.join(BOX_FORMATS)} ([x, y, width, height] as "
                          f"COCO, or [x1, y1, x2, y2] as Pascal VOC), not {data.box_format!r}")
    if data.label_names is not None:
        names = data.label_names
        if (not isinstance(names, list) or len(names) < 2
                or not all(isinstance(n, (str, int)) and not isinstance(n, bool) for n in names)):
            raise RecipeError("data.label_names", f"must be a list of 2 or more class names, got {names!r}")
        if len({str(n) for n in names}) != len(names):
            raise RecipeError("data.label_names", "names a class twice; give each class a distinct name")

    if not data.name.strip():
        raise RecipeError("data.name", "is empty; name a dataset (a Hub id, a built-in set such as `sklearn-digits`, "
                          "or a loader such as `imagefolder` with `data_dir`)")
    if data.name in BUILTIN_SOURCE_FIELDS:
        reads = BUILTIN_SOURCE_FIELDS[data.name]
        for f in dataclasses.fields(DataSpec):
            if f.name in SOURCE_AGNOSTIC_FIELDS or f.name in reads:
                continue
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            if getattr(data, f.name) != default:
                raise RecipeError(
                    f"data.{f.name}", f"does not apply to the built-in source {data.name!r} (it reads "
                    f"{', '.join(reads + ('the sizes and augmentation',))}); remove it",
                )
    if not 0 < data.validation_fraction < 1:
        raise RecipeError("data.validation_fraction", f"must be in (0, 1), got {data.validation_fraction}")
    for key, minimum in (("image_size", 1), ("max_length", 1), ("max_train_samples", 1), ("max_eval_samples", 1),
                         ("seed", 0)):
        value = getattr(data, key)
        if value is not None and value < minimum:
            raise RecipeError(f"data.{key}", f"must be >= {minimum}{' or null' if key != 'max_length' else ''}, "
                              f"got {value}")


def term_name(term: TermSpec, index: int, terms: list[TermSpec]) -> str:
    """The log name of a term: its `name`, else its loss, suffixed by position when a loss is used twice."""
    if term.name:
        return term.name
    same_loss = [i for i, t in enumerate(terms) if t.loss == term.loss and not t.name]
    return term.loss if len(same_loss) == 1 else f"{term.loss}_{same_loss.index(index)}"


def _validate_terms(terms: list[TermSpec], path: str) -> None:
    """Each term (``<path>[i]``) and distinct log names within one list of terms."""
    names: set[str] = set()
    for i, term in enumerate(terms):
        _validate_term(term, f"{path}[{i}]")
        name = term_name(term, i, terms)
        if name in names:
            raise RecipeError(f"{path}[{i}].name", f"two terms are named {name!r}; give each a distinct `name`")
        names.add(name)


def _validate_training(training: dict, path: str, stage: bool = False) -> None:
    """Keys of a ``training`` mapping are DistillationConfig fields; a stage's may not set the run's own."""
    if not training:
        return
    from .config import DistillationConfig

    allowed = {f.name for f in dataclasses.fields(DistillationConfig) if f.init}
    for key in training:
        if stage and key in RUN_ONLY_TRAINING_KEYS:
            raise RecipeError(
                f"{path}.{key}",
                f"`{key}` belongs to the whole run, not to one stage; set it in the top-level `training` "
                "(each stage writes its checkpoints in its own folder under the run's output_dir)",
            )
        if key not in allowed:
            raise RecipeError(
                f"{path}.{key}",
                f"unknown training argument{_suggest(str(key), allowed)}; any DistillationConfig / "
                "TrainingArguments field is allowed",
            )
        _check_training_value(key, training[key], f"{path}.{key}")


# Ranges of the training arguments whose nonsense values TrainingArguments accepts (or fails on late):
# key -> (minimum, exclusive, maximum). Types come from DistillationConfig's own annotations.
TRAINING_RANGES: dict[str, tuple[float | None, bool, float | None]] = {
    "learning_rate": (0, False, None),
    "distill_learning_rate": (0, True, None),
    "num_train_epochs": (0, True, None),
    "per_device_train_batch_size": (1, False, None),
    "per_device_eval_batch_size": (1, False, None),
    "gradient_accumulation_steps": (1, False, None),
    "eval_accumulation_steps": (1, False, None),
    "seed": (0, False, 2**32 - 1),
    "data_seed": (0, False, 2**32 - 1),
    "weight_decay": (0, False, None),
    "max_grad_norm": (0, False, None),
    "warmup_ratio": (0, False, 1),
    "warmup_steps": (0, False, None),
    "logging_steps": (0, True, None),
    "save_steps": (0, True, None),
    "eval_steps": (0, True, None),
    "save_total_limit": (1, False, None),
    "dataloader_num_workers": (0, False, None),
    "adam_beta1": (0, False, 1),
    "adam_beta2": (0, False, 1),
    "adam_epsilon": (0, True, None),
    "label_smoothing_factor": (0, False, 1),
    "task_weight": (0, False, None),
    "lr_decay_rate": (0, True, 1),
    "dry_run_examples": (1, False, None),
}


@functools.lru_cache(maxsize=None)
def _training_types() -> dict[str, Any]:
    """DistillationConfig's field types (resolved once: validation asks for every training key)."""
    from .config import DistillationConfig

    return typing.get_type_hints(DistillationConfig)


def _check_training_value(key: str, value: Any, path: str) -> None:
    """A ``training.<key>`` value has its DistillationConfig field's type (numbers strictly: no booleans,
    no strings, finite) and is in the range where it means something."""
    tp = _training_types().get(key)
    options = typing.get_args(tp) if typing.get_origin(tp) in (Union, types.UnionType) else (tp,)
    optional = type(None) in options
    if value is None:
        if optional or tp is None:
            return
        raise RecipeError(path, f"must not be null; remove the key to use the default")
    scalar = [t for t in options if t in (int, float, bool)]
    if not scalar or len(options) - optional > 1:
        return  # strings, enums, lists, unions of those: TrainingArguments checks them
    (kind,) = scalar
    if kind is bool:
        if not isinstance(value, bool):
            raise RecipeError(path, f"must be true or false, got {type(value).__name__} {value!r}")
        return
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise RecipeError(path, f"must be an integer, got {type(value).__name__} {value!r}")
    if kind is float and (isinstance(value, bool) or not isinstance(value, (int, float))):
        hint = " (write it without quotes)" if isinstance(value, str) and _is_number_text(value) else ""
        raise RecipeError(path, f"must be a number, got {type(value).__name__} {value!r}{hint}")
    if not math.isfinite(value):
        raise RecipeError(path, f"must be a finite number, got {value!r}")
    if key == "max_steps" and value != -1 and value < 1:
        raise RecipeError(path, f"must be a positive number of steps, or -1 to train for num_train_epochs; got {value}")
    if key in TRAINING_RANGES:
        minimum, exclusive, maximum = TRAINING_RANGES[key]
        low = minimum is not None and (value <= minimum if exclusive else value < minimum)
        high = maximum is not None and value > maximum
        if low or high:
            bounds = []
            if minimum is not None:
                bounds.append(f"{'>' if exclusive else '>='} {minimum}")
            if maximum is not None:
                bounds.append(f"<= {maximum}")
            raise RecipeError(path, f"must be {' and '.join(bounds)}, got {value!r}")


def _is_number_text(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _validate_train(train: list[str], terms: list[TermSpec], path: str) -> None:
    """A stage's ``train`` entries: ``student[.<path>]``, ``adapters[.<term>]``, ``losses.<term>[.<path>]``."""
    if not train:
        raise RecipeError(path, "is empty, so the stage would train nothing; omit `train` to train the student, "
                          "adapters and loss modules, or list what trains")
    names = [term_name(term, i, terms) for i, term in enumerate(terms)]
    by_name = dict(zip(names, terms))
    for k, entry in enumerate(train):
        where = f"{path}[{k}]"
        root, _, rest = entry.partition(".")
        if root not in TRAIN_ROOTS:
            raise RecipeError(
                where, f"{entry!r} names nothing that trains{_suggest(root, TRAIN_ROOTS)}; write `student`, "
                "`student.<module path>`, `adapters`, `adapters.<term>`, `losses.<term>` or "
                "`losses.<term>.<submodule path>`",
            )
        if root == "student":
            if rest and not MODULE_PATH_PATTERN.fullmatch(rest):
                raise RecipeError(where, f"{rest!r} is not a module path; write a dotted path such as `layer1` "
                                  "or `encoder.layer.0`")
            continue
        if not rest:
            if root == "losses":
                raise RecipeError(where, f"name the term whose loss module trains: `losses.<term>`; this stage's "
                                  f"terms: {', '.join(names) or 'none'}")
            if not any(term.adapter for term in terms):
                raise RecipeError(where, "no term of this stage has an adapter; remove this entry")
            continue
        term, _, sub = rest.partition(".")
        if term not in by_name:
            raise RecipeError(
                where, f"this stage has no term named {term!r}{_suggest(term, names)}; its terms: "
                f"{', '.join(names) or 'none'} (a term's name is its `name`, else its loss)",
            )
        if root == "adapters":
            if sub:
                raise RecipeError(where, f"write `adapters.{term}`: an adapter trains whole")
            if by_name[term].adapter is None:
                raise RecipeError(where, f"term {term!r} has no adapter; give it one or remove this entry")
        elif sub and not MODULE_PATH_PATTERN.fullmatch(sub):
            raise RecipeError(where, f"{sub!r} is not a submodule path; write a dotted path such as `paraphraser`")


def _validate_term(term: TermSpec, path: str) -> None:
    if term.loss not in losses.available():
        raise RecipeError(
            f"{path}.loss",
            f"unknown loss {term.loss!r}{_suggest(term.loss, losses.available())}; "
            f"registered losses: {', '.join(losses.available())}",
        )
    info = losses.get_info(term.loss)
    if term.name is not None:
        if not TERM_NAME_PATTERN.fullmatch(term.name):
            raise RecipeError(
                f"{path}.name", f"{term.name!r} is not a term name; use letters, digits, `_` and `-`, starting with a "
                "letter (it names the term's log `loss_<name>` and its state)",
            )
        if term.name in RESERVED_TERM_NAMES:
            raise RecipeError(
                f"{path}.name", f"{term.name!r} is reserved (the logs call the student's own loss `loss_task`); "
                "choose another name",
            )
    if term.weight < 0:
        raise RecipeError(f"{path}.weight", f"must be >= 0, got {term.weight}")
    for key in term.params:
        if key not in info.params:
            raise RecipeError(
                f"{path}.params.{key}",
                f"loss {term.loss!r} has no parameter {key!r}{_suggest(key, info.params)}; "
                f"its parameters: {', '.join(info.params) or 'none'}",
            )
    _build_loss(term, path)
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
        try:  # names and values, without the shapes (those are checked when the trainer is built)
            check_adapter_params(term.adapter, term.adapter_params)
        except AdapterError as exc:
            param = getattr(exc, "param", None)
            raise RecipeError(f"{path}.adapter_params" + (f".{param}" if param else ""), str(exc)) from None
    elif term.adapter_params:
        raise RecipeError(f"{path}.adapter_params", "given without an `adapter`")


def _build_loss(term: TermSpec, path: str) -> None:
    """Build the term's loss once (no ``configure``: cheap) so that its own parameter checks run now."""
    try:
        losses.build(term.loss, **term.params)
    except LossParamError as exc:
        raise RecipeError(f"{path}.params.{exc.param}", exc.message) from None
    except RecipeError:
        raise
    except (TypeError, ValueError) as exc:
        raise RecipeError(f"{path}.params", f"loss {term.loss!r} rejected its parameters: {exc}") from None


# ---- files, `base:` and merging ----
def load_recipe_data(path: str | os.PathLike) -> dict:
    """The plain data of a recipe file with its ``base:`` chain merged in (not validated).

    ``base: other.yaml`` is relative to the file that says it. The file's keys are merged over the
    base's (:func:`merge_recipe_data`); a base may have a base. Missing or unreadable files, a
    ``base`` that is not a path and cycles are :class:`RecipeError` at ``base`` naming the files.
    """
    return _load_chain(Path(path), [])


def merge_recipe_data(base: Any, override: Any) -> Any:
    """``override`` merged over ``base`` as a JSON Merge Patch (RFC 7396), without changing either.

    Mappings merge key by key, recursively; lists and scalars replace; a key set to ``null`` in
    ``override`` is removed (the field goes back to its default).
    """
    if not isinstance(override, dict) or not isinstance(base, dict):
        return copy.deepcopy(override)
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if value is None:
            merged.pop(key, None)
        else:
            merged[key] = merge_recipe_data(merged.get(key), value)
    return merged


def _display(path: Path) -> str:
    return os.path.normpath(str(path))


def _read_recipe_file(path: Path, child: Path | None) -> dict:
    where = "base" if child is not None else ""
    whose = f" (the base of {_display(child)})" if child is not None else ""
    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise RecipeError(where, f"recipe file {str(path)!r}{whose} {what}; give the path of a YAML recipe")
    try:
        data = load_yaml(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise RecipeError(where, f"{_display(path)}{whose} is not valid YAML: {exc}") from None
    except UnicodeDecodeError as exc:
        raise RecipeError(where, f"{_display(path)}{whose} is not UTF-8 text ({exc.reason} at byte {exc.start}); "
                          "a recipe is a YAML text file") from None
    except OSError as exc:
        raise RecipeError(where, f"{_display(path)}{whose} cannot be read: {exc.strerror or exc}") from None
    except RecursionError:
        raise RecipeError(where, f"{_display(path)}{whose} is nested too deeply to be a recipe") from None
    if data is None:
        raise RecipeError(where, f"{_display(path)}{whose} is empty; a recipe needs at least `terms:` or `student:`")
    if not isinstance(data, dict):
        raise RecipeError(where, f"{_display(path)}{whose} holds a {type(data).__name__}, not a mapping of recipe "
                          "keys (`terms:`, `student:`, `training:`, ...)")
    return data


def _load_chain(path: Path, chain: list[Path]) -> dict:
    data = _read_recipe_file(path, chain[-1] if chain else None)
    if "base" not in data:
        return data
    base = data.pop("base")
    if not isinstance(base, str) or not base.strip():
        raise RecipeError("base", f"in {_display(path)}: expected the path of another recipe file (a string, "
                          f"relative to this file), got {type(base).__name__} {base!r}")
    base_path = path.parent / base
    if not base_path.is_file():
        raise RecipeError("base", f"{_display(path)} says `base: {base}`, but {_display(base_path)} does not exist "
                          "(a base path is relative to the file that names it)")
    seen = [p.resolve() for p in chain] + [path.resolve()]
    if base_path.resolve() in seen:
        cycle = " -> ".join(_display(p) for p in [*chain, path, base_path])
        raise RecipeError("base", f"the bases form a cycle: {cycle}; a recipe cannot start from itself")
    return merge_recipe_data(_load_chain(base_path, [*chain, path]), data)


# ---- command-line overrides (`--dotted.key value`) ----
def parse_overrides(tokens: Sequence[str]) -> list[tuple[str, Any]]:
    """``["--a.b", "1", "--c=x"]`` -> ``[("a.b", 1), ("c", "x")]``; values are parsed as YAML scalars."""
    pairs = []
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if not token.startswith("--") or len(token) == 2:
            raise OverrideError("", f"unexpected argument {token!r}; overrides look like `--training.learning_rate 0.01`")
        key = token[2:]
        if "=" in key:
            key, text = key.split("=", 1)
            i += 1
        else:
            if i + 1 >= len(tokens):
                raise OverrideError(key, f"override --{key} has no value; write `--{key} VALUE`")
            text = tokens[i + 1]
            i += 2
        try:
            value = load_yaml(text) if text.strip() else text
        except (yaml.YAMLError, RecursionError):
            value = text  # not YAML: keep the string as typed
        if isinstance(value, bool) and text.strip().lower() not in ("true", "false"):
            value = text  # YAML 1.1 reads `no`/`yes`/`on`/`off` as booleans; `--training.save_strategy no` means "no"
        pairs.append((key, value))
    return pairs


def _field_type(cls: type, name: str) -> Any:
    return typing.get_type_hints(cls).get(name)


def apply_overrides(data: dict, overrides: list[tuple[str, Any]]) -> dict:
    """Set each dotted key in a copy of the recipe's plain data (merged: no ``base`` left in it).

    A key must name a recipe field (``training.*`` and ``stages.<i>.training.*`` may be any
    DistillationConfig field, checked when the recipe is validated); list items are addressed by
    index (``terms.0.weight``, ``stages.1.training.num_train_epochs``).
    """
    data = copy.deepcopy(data)
    for key, value in overrides:
        parts = key.split(".")
        node: Any = data
        cls: Any = Recipe
        for depth, part in enumerate(parts):
            last = depth == len(parts) - 1
            where = ".".join(parts[: depth + 1])
            parent = ".".join(parts[:depth])
            if isinstance(node, list):
                if not part.lstrip("-").isdigit() or not -len(node) <= int(part) < len(node):
                    raise OverrideError(
                        where, f"override --{key}: {parent or 'list'} has {len(node)} item(s); "
                        f"use an index 0..{len(node) - 1}"
                    )
                index = int(part)
                if last:
                    node[index] = value
                else:
                    node = node[index]
                    cls = _list_item_class(cls)
                continue
            if not isinstance(node, dict):
                raise OverrideError(where, f"override --{key}: {parent} is not a mapping")
            if dataclasses.is_dataclass(cls):
                known = {f.name for f in dataclasses.fields(cls)}
                if part not in known:
                    raise OverrideError(
                        where,
                        f"override --{key}: there is no recipe key {where!r}{_suggest(part, known)}; "
                        f"keys allowed here: {', '.join(sorted(known))}",
                    )
                child_type = _field_type(cls, part)
            else:
                child_type = None
            if last:
                node[part] = value
            else:
                child_cls = _unwrap_dataclass(child_type)
                if node.get(part) is None:
                    if isinstance(child_cls, tuple):  # a list field the recipe does not have: no item to address
                        raise OverrideError(
                            where, f"override --{key}: the recipe has no `{where}`, so there is no item to set; "
                            f"give the whole list (`--{where} '[...]'`) or add it to the recipe",
                        )
                    node[part] = {}
                node = node[part]
                cls = child_cls
    return data


def _unwrap_dataclass(tp: Any) -> Any:
    if tp is None:
        return None
    if dataclasses.is_dataclass(tp):
        return tp
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            found = _unwrap_dataclass(arg)
            if found is not None:
                return found
    if origin is list:
        return ("list", _unwrap_dataclass(typing.get_args(tp)[0]))
    return None


def _list_item_class(cls: Any) -> Any:
    return cls[1] if isinstance(cls, tuple) and cls[0] == "list" else None


def load_recipe(path: str | os.PathLike, overrides: Sequence[str] | list[tuple[str, Any]] = ()) -> Recipe:
    """Read a recipe file (with its ``base:``), apply ``--dotted.key value`` overrides, validate.

    The file is validated on its own first, so its own errors point at the file; then the overrides
    are applied to its merged plain data and the result is validated again (errors are OverrideError).
    """
    recipe = Recipe.from_yaml(path)
    if not overrides:
        return recipe
    pairs = parse_overrides(overrides) if isinstance(overrides[0], str) else list(overrides)
    data = apply_overrides(load_recipe_data(path), pairs)
    try:
        return Recipe.from_dict(data)
    except RecipeError as exc:
        raise OverrideError(exc.path, f"after the command-line overrides: {exc}") from None


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
            if not math.isfinite(value):
                raise RecipeError(path, f"must be a finite number, got {value!r}")
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
