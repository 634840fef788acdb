"""``hfdistill``: the command line (DESIGN.md, contract 6).

    hfdistill train RECIPE.yaml [--dotted.key value ...]
    hfdistill losses [--markdown]

``train`` reads a recipe, applies the overrides, checks everything it can before writing anything
(recipe, models, data columns, label counts), then trains, evaluates, saves the student and prints
a summary. It calls the same functions a Python user would (:func:`run_recipe`), and runs unchanged
under ``accelerate launch -m hfdistill train RECIPE``.

Exit codes: 0 done, 2 bad input (the message names the problem and the fix), 1 anything else,
130 interrupted (Ctrl-C; the message says how to resume).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import sys
import tempfile
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import yaml

from . import hub
from .recipe import Recipe, RecipeError

EXIT_OK, EXIT_ERROR, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130
RECIPE_FILE_NAME = "distill_recipe.yaml"
PIPELINE_TASKS = {"image-classification": "image-classification", "text-classification": "text-classification"}
METHODS_START, METHODS_END = "<!-- methods:start -->", "<!-- methods:end -->"


# Hub failures that mean the recipe named something that cannot be had (exit 2), not a broken push.
HUB_BAD_INPUT_REASONS = ("not_found", "gated", "revision", "invalid", "offline")


class OverrideError(RecipeError):
    """A ``--dotted.key value`` override that does not fit the recipe."""


# ------------------------------------------------------------------------------- overrides
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
            value = yaml.safe_load(text) if text.strip() else text
        except yaml.YAMLError:
            value = text  # not YAML: keep the string as typed
        if isinstance(value, bool) and text.strip().lower() not in ("true", "false"):
            value = text  # YAML 1.1 reads `no`/`yes`/`on`/`off` as booleans; `--training.save_strategy no` means "no"
        pairs.append((key, value))
    return pairs


def _field_type(cls: type, name: str) -> Any:
    import typing

    return typing.get_type_hints(cls).get(name)


def apply_overrides(data: dict, overrides: list[tuple[str, Any]]) -> dict:
    """Set each dotted key in a copy of the recipe's plain data.

    A key must name a recipe field (``training.*`` may be any DistillationConfig field, checked when the
    recipe is validated); list items are addressed by index (``terms.0.weight``).
    """
    data = copy.deepcopy(data)
    for key, value in overrides:
        parts = key.split(".")
        node: Any = data
        cls: Any = Recipe
        for depth, part in enumerate(parts):
            last = depth == len(parts) - 1
            where = ".".join(parts[: depth + 1])
            if isinstance(node, list):
                if not part.lstrip("-").isdigit() or not -len(node) <= int(part) < len(node):
                    raise OverrideError(
                        where, f"override --{key}: {'.'.join(parts[:depth]) or 'list'} has {len(node)} item(s); "
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
                raise OverrideError(where, f"override --{key}: {'.'.join(parts[:depth])} is not a mapping")
            if dataclasses.is_dataclass(cls):
                known = {f.name for f in dataclasses.fields(cls)}
                if part not in known:
                    from .recipe import _suggest

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
                if node.get(part) is None:
                    node[part] = {}
                node = node[part]
                cls = _unwrap_dataclass(child_type)
    return data


def _unwrap_dataclass(tp: Any) -> Any:
    import types
    import typing

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
    """Read a recipe file, apply ``--dotted.key value`` overrides, validate."""
    base = Recipe.from_yaml(path)  # validates the file on its own first, so errors point at the file
    if not overrides:
        return base
    pairs = parse_overrides(overrides) if overrides and isinstance(overrides[0], str) else list(overrides)
    data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    data = apply_overrides(data, pairs)
    try:
        return Recipe.from_dict(data)
    except RecipeError as exc:
        raise OverrideError(exc.path, f"after the command-line overrides: {exc}") from None


# ------------------------------------------------------------------------------- the run
@dataclass
class Stage:
    """One training run of the plan: the teacher (when it must be trained first), the baseline, the student."""

    label: str
    output_dir: str
    training: dict
    loaded: Any  # LoadedModel trained in this stage
    data: Any  # TaskData
    teacher: Any = None  # LoadedModel
    recipe: Recipe | None = None
    metrics: dict = field(default_factory=dict)
    trainer: Any = None
    # For `student.baseline_seeds`: which side of the comparison this run is and with which seed;
    # runs of the extra seeds are summarised as mean and std, not as rows of their own.
    comparison: str | None = None  # "no teacher" or "distilled"
    seed: int | None = None
    extra_seed: bool = False


@dataclass
class Plan:
    """Everything checked and loaded, nothing written yet."""

    recipe: Recipe
    task: str
    output_dir: str
    stages: list[Stage]
    label_names: list[str]
    teacher: Any = None  # LoadedModel of the teacher used for distillation
    teacher_folder: str | None = None


def accuracy(eval_pred) -> dict[str, float]:
    logits, labels = eval_pred.predictions, eval_pred.label_ids
    if isinstance(logits, (tuple, list)):
        logits = logits[0]
    return {"accuracy": float((np.argmax(logits, -1) == labels).mean())}


def _require(recipe: Recipe) -> None:
    if recipe.task is None:
        raise RecipeError("task", "the CLI needs `task:` (image-classification or text-classification)")
    if recipe.student is None:
        raise RecipeError("student", "the CLI needs a `student:` section with at least `name:`")
    if recipe.data is None:
        raise RecipeError("data", "the CLI needs a `data:` section with at least `name:` (e.g. sklearn-digits)")
    if recipe.teacher is None:
        from . import losses

        needy = [t.loss for t in recipe.terms if losses.needs_teacher(t.loss, t.params)]
        if needy:
            raise RecipeError("teacher", f"the recipe's term(s) {needy} need a teacher but there is no `teacher:`; add one, or remove those terms to train the student alone")
    if recipe.teacher is not None and not recipe.terms:
        raise RecipeError("terms", "the recipe names a teacher but no `terms`; add e.g. `terms: [{loss: kd, weight: 0.9}]`, or remove `teacher` to train the student alone")
    if recipe.student.train_from is not None or recipe.student.train_args:
        raise RecipeError("student.train_from", "`train_from`/`train_args` are for the teacher; the student is always trained")
    if recipe.teacher is not None and recipe.teacher.baseline:
        raise RecipeError("teacher.baseline", "`baseline` belongs to the student")
    if recipe.student.baseline_seeds > 1 and not recipe.student.baseline:
        raise RecipeError("student.baseline_seeds", "compares seeds of the no-teacher run: set `student.baseline: true`")
    if recipe.teacher is not None and recipe.teacher.train_args and recipe.teacher.train_from is None:
        raise RecipeError("teacher.train_args", "given without `teacher.train_from`")


def _stage_training(recipe: Recipe, output_dir: str, extra: dict | None = None, final: bool = True) -> dict:
    training = {key: value for key, value in recipe.training.items() if key != "resume_from_checkpoint"}
    if not final:  # only the distilled student goes to the Hub, never the teacher or the comparison run
        training = {k: v for k, v in training.items() if k != "push_to_hub" and not k.startswith("hub_")}
    training.update(extra or {})
    training["output_dir"] = output_dir
    return training


def _make_args(training: dict):
    from .config import DistillationConfig

    import torch

    # No logging integrations unless asked for; pinned memory only helps with an accelerator.
    values = {"report_to": "none", "dataloader_pin_memory": torch.cuda.is_available(), **training}
    # Our transforms read the raw image/text columns, which the Trainer would otherwise drop.
    values["remove_unused_columns"] = False
    try:
        return DistillationConfig(**values)
    except (TypeError, ValueError) as exc:
        raise RecipeError("training", f"invalid training arguments: {exc}") from None


def _default_output_dir(recipe_path: str | None) -> str:
    stem = Path(recipe_path).stem if recipe_path else "recipe"
    return os.path.join("runs", stem)


def plan_run(recipe: Recipe, recipe_path: str | None = None, dataset: Any = None) -> Plan:
    """Check the recipe, load the data and the models, and decide the stages; writes nothing."""
    from transformers import set_seed

    from .data import build_task_data, load_raw_data
    from .models import check_labels, resolve_model_name
    from .models import load_model as _load_model

    def load_model(spec, *args, **kwargs):
        # A model that needs the Hub: one clear message for offline, missing, private, bad revision, unreachable.
        with hub.wrap_hub_errors(spec.name, revision=spec.revision, token=recipe.training.get("hub_token")):
            return _load_model(spec, *args, **kwargs)

    _require(recipe)
    task = recipe.task
    output_dir = recipe.training.get("output_dir") or _default_output_dir(recipe_path)
    _make_args(_stage_training(recipe, output_dir))  # bad training arguments fail here, before any work
    seed = int(recipe.training.get("seed", 42))
    raw = load_raw_data(recipe.data, task, seed=recipe.data.seed, dataset=dataset)
    id2label = dict(enumerate(raw.label_names))
    data_size = recipe.data.image_size

    set_seed(seed)
    student = load_model(recipe.student, "student", task, raw.num_labels, id2label, image_size=data_size)
    stages: list[Stage] = []
    teacher = None
    teacher_folder = None
    if recipe.teacher is not None:
        spec = recipe.teacher
        teacher_folder = resolve_model_name(spec, "teacher")
        if spec.train_from is not None and not os.path.isfile(os.path.join(teacher_folder, "config.json")):
            set_seed(seed)
            teacher = load_model(spec.train_from, "student", task, raw.num_labels, id2label, image_size=spec.image_size or data_size)
            teacher.role = "teacher"
            stages.append(
                Stage(
                    "teacher",
                    teacher_folder,
                    _stage_training(recipe, teacher_folder, spec.train_args, final=False),
                    teacher,
                    build_task_data(raw, task, teacher, None, recipe.data.augment, recipe.data.max_length),
                )
            )
        else:
            pretrained = spec.pretrained if spec.pretrained is not None else True
            own_size = os.path.isdir(teacher_folder) or pretrained
            teacher = load_model(spec, "teacher", task, raw.num_labels, id2label, image_size=None if own_size else data_size)
        check_labels(teacher, student, raw.num_labels, raw.label_names)
    else:
        check_labels(None, student, raw.num_labels, raw.label_names)

    data = build_task_data(raw, task, student, teacher, recipe.data.augment, recipe.data.max_length)
    comparing = recipe.student.baseline and teacher is not None
    if comparing:
        # Extra seeds first (their folders end in -seed<N>), then the first seed's baseline and student.
        for extra in range(seed + 1, seed + recipe.student.baseline_seeds):
            for side, folder, with_teacher in (("no teacher", f"{output_dir.rstrip('/')}-baseline-seed{extra}", False),
                                               ("distilled", f"{output_dir.rstrip('/')}-seed{extra}", True)):
                set_seed(extra)
                model = load_model(recipe.student, "student", task, raw.num_labels, id2label, image_size=data_size)
                training = _stage_training(recipe, folder, {"seed": extra}, final=False)
                stages.append(Stage(f"student ({side}, seed {extra})", folder, training, model, data,
                                    teacher if with_teacher else None, recipe if with_teacher else None,
                                    comparison=side, seed=extra, extra_seed=True))
        set_seed(seed)
        baseline = load_model(recipe.student, "student", task, raw.num_labels, id2label, image_size=data_size)
        folder = f"{output_dir.rstrip('/')}-baseline"
        stages.append(Stage("student (no teacher)", folder, _stage_training(recipe, folder, final=False), baseline, data,
                            comparison="no teacher", seed=seed))
    label = "student (distilled)" if teacher is not None else "student"
    stages.append(Stage(label, output_dir, _stage_training(recipe, output_dir), student, data, teacher, recipe,
                        comparison="distilled" if comparing else None, seed=seed))
    return Plan(recipe, task, output_dir, stages, raw.label_names, teacher, teacher_folder)


def _build_trainer(stage: Stage, plan: Plan):
    from .trainer import DistillationTrainer

    loaded = stage.loaded
    processor = None
    if not loaded.is_timm:
        processor = loaded.tokenizer if plan.task == "text-classification" else loaded.image_processor()
    return DistillationTrainer(
        model=loaded.model,
        teacher=stage.teacher.model if stage.teacher is not None else None,
        recipe=_terms_recipe(stage.recipe),
        args=_make_args(stage.training),
        train_dataset=stage.data.train,
        eval_dataset=stage.data.eval,
        data_collator=stage.data.collator,
        processing_class=processor,
        compute_metrics=accuracy,
        teacher_inputs=stage.data.teacher_inputs if stage.teacher is not None else None,
        id2label=dict(enumerate(plan.label_names)),
        timm_model_args=loaded.timm_model_args,
    )


def _terms_recipe(recipe: Recipe | None) -> Recipe:
    # The trainer uses only terms and task_weight; the models and data are passed as objects.
    if recipe is None:
        return Recipe()
    return Recipe(terms=list(recipe.terms), task_weight=recipe.task_weight)


def _check_terms_early(plan: Plan) -> None:
    """When the teacher is trained first, check the distillation terms against its untrained copy now,
    so that a wrong tap fails in seconds rather than after the teacher's training."""
    final = plan.stages[-1]
    if final.teacher is None or final.recipe is None or not final.recipe.terms or plan.stages[0].label != "teacher":
        return
    from .trainer import DistillationTrainer

    with tempfile.TemporaryDirectory() as scratch:
        training = dict(final.training, output_dir=scratch, save_strategy="no", report_to="none")
        DistillationTrainer(
            model=copy.deepcopy(final.loaded.model),
            teacher=copy.deepcopy(final.teacher.model),
            recipe=_terms_recipe(final.recipe),
            args=_make_args(training),
            train_dataset=final.data.train,
            data_collator=final.data.collator,
            teacher_inputs=final.data.teacher_inputs,
            id2label=dict(enumerate(plan.label_names)),
            timm_model_args=final.loaded.timm_model_args,
        )


def run_stage(stage: Stage, plan: Plan, resume_from_checkpoint: str | None = None) -> dict:
    """Train, evaluate and save one stage; returns its eval metrics."""
    # A trainer that cannot be built removes the folders it made itself (bad input writes nothing).
    trainer = _build_trainer(stage, plan)
    stage.trainer = trainer
    trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    metrics = trainer.evaluate()
    # Not pushed here: run_recipe pushes once, after the card holds the measured numbers.
    trainer.save_model(stage.output_dir, _internal_call=True)
    stage.metrics = metrics
    return metrics


def _last_checkpoint(folder: str) -> str | None:
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(folder) if os.path.isdir(folder) else None


def run_recipe(
    recipe: Recipe,
    recipe_path: str | None = None,
    dataset: Any = None,
    print_summary: bool = True,
    command: str | None = None,
) -> Plan:
    """Everything ``hfdistill train`` does, from Python: plan, train each stage, save, summarise."""

    plan = plan_run(recipe, recipe_path, dataset)
    _check_terms_early(plan)
    resume = recipe.training.get("resume_from_checkpoint")
    for stage in plan.stages:
        _print(f"\n==> training {stage.label} ({stage.loaded.name}) -> {stage.output_dir}")
        is_final = stage is plan.stages[-1]
        try:
            run_stage(stage, plan, resume_from_checkpoint=resume if is_final else None)
        except KeyboardInterrupt:
            raise _Interrupted(stage, plan) from None
        if stage.label == "teacher":
            stage.loaded.model.eval()
            stage.loaded.folder = stage.output_dir
    final = plan.stages[-1]
    if final.trainer.is_world_process_zero():
        hub.write_recipe(plan.recipe, plan.output_dir)  # tokens are never written
        summary = summarise(plan)
        if print_summary:
            _print("\n" + summary)
        _write_card(plan, command)
    if final.trainer.args.push_to_hub:
        _print(f"\n==> pushing {plan.output_dir} to the Hub ({final.trainer.args.hub_model_id or 'hub_model_id not set'})")
        final.trainer.push_to_hub()  # the folder and card are complete locally first; a failure says how to retry
    return plan


def _write_card(plan: Plan, command: str | None) -> None:
    """The student's model card, with the latencies the summary measured on this machine."""
    final = plan.stages[-1]
    rows = {row.role: row for row in getattr(plan, "rows", [])}
    student, teacher = rows.get(final.label), rows.get("teacher")
    batch = max(student.latency_ms) if student is not None and student.latency_ms else None
    final.trainer.set_card_info(
        recipe=plan.recipe,
        dataset=plan.recipe.data.name if plan.recipe.data is not None else None,
        command=command,
        student_latency_ms=student.latency_ms.get(batch) if batch else None,
        teacher_latency_ms=teacher.latency_ms.get(batch) if teacher is not None and batch else None,
        latency_setup=f"ms per example at batch {batch}, {_device_name(final.trainer)}" if batch else None,
    )
    final.trainer.create_model_card()


class _Interrupted(Exception):
    def __init__(self, stage: Stage, plan: Plan):
        self.stage, self.plan = stage, plan


def summarise(plan: Plan) -> str:
    """The final table (measured on this machine) and the line that loads the student."""
    from .summary import ModelRow, count_parameters, format_summary, measure_latency, size_on_disk

    final = plan.stages[-1]
    eval_ds = final.data.eval
    n = min(32, len(eval_ds))
    examples = eval_ds.__getitems__(list(range(n))) if hasattr(eval_ds, "__getitems__") else [eval_ds[i] for i in range(n)]
    batch = final.data.collator(examples)
    student_inputs = {k: v for k, v in batch.items() if not k.startswith("teacher_") and k != "labels"}
    rows = []
    teacher_stage = next((s for s in plan.stages if s.label == "teacher"), None)
    if plan.teacher is not None:
        teacher_model = plan.teacher.model
        if final.data.teacher_inputs is not None:
            teacher_batch = final.data.teacher_inputs(batch)
        else:
            teacher_batch = student_inputs
        metrics = {k[len("eval_teacher_"):]: v for k, v in final.metrics.items() if k.startswith("eval_teacher_")}
        if teacher_stage is not None and not metrics:
            metrics = {k[len("eval_"):]: v for k, v in teacher_stage.metrics.items()}
        rows.append(
            ModelRow(
                "teacher", plan.teacher.name if teacher_stage is None else f"{plan.teacher.name} -> {teacher_stage.output_dir}",
                count_parameters(teacher_model), size_on_disk(teacher_model, plan.teacher_folder), metrics,
                measure_latency(teacher_model, teacher_batch),
            )
        )
    for stage in plan.stages:
        if stage.label == "teacher" or stage.extra_seed:
            continue
        model = stage.trainer.student
        inputs = student_inputs
        rows.append(
            ModelRow(
                stage.label, stage.output_dir, count_parameters(model), size_on_disk(model, stage.output_dir),
                {k[len("eval_"):]: v for k, v in stage.metrics.items() if k.startswith("eval_")},
                measure_latency(model, inputs), stage.output_dir,
            )
        )
    plan.rows = rows  # the card reads the measured numbers
    lines = [f"Summary ({len(eval_ds)} eval examples; latency measured on this machine, "
             f"{_device_name(final.trainer)})", format_summary(rows)]
    lines += _seed_comparison(plan)
    lines.append("")
    lines.append("Use the student:")
    if _input_channels(final.trainer.student) == 1:
        # pipeline() converts every image to RGB, which a 1-channel model cannot take.
        lines.append("  (it takes 1-channel images, and pipeline() always feeds RGB: load it directly instead;")
        lines.append("   give both models 3 channels, the grey image repeated, to use pipeline())")
        lines.append("  from transformers import AutoModelForImageClassification")
        lines.append(f"  model = AutoModelForImageClassification.from_pretrained({plan.output_dir!r})")
    else:
        lines.append("  from transformers import pipeline")
        lines.append(f"  classifier = pipeline({PIPELINE_TASKS[plan.task]!r}, model={plan.output_dir!r})")
    return "\n".join(lines)


def _input_channels(model) -> int | None:
    """Image channels a saved student expects (timm pretrained_cfg or a transformers vision config)."""
    config = getattr(model, "config", None)
    pretrained_cfg = getattr(config, "pretrained_cfg", None)
    if isinstance(pretrained_cfg, dict) and pretrained_cfg.get("input_size"):
        return int(pretrained_cfg["input_size"][0])
    return getattr(config, "num_channels", None)


def _seed_comparison(plan: Plan) -> list[str]:
    """Distilled vs no-teacher accuracy, per seed and as mean +- std when several seeds ran."""
    by_seed: dict[int, dict[str, float]] = {}
    for stage in plan.stages:
        accuracy_value = stage.metrics.get("eval_accuracy")
        if stage.comparison is not None and accuracy_value is not None:
            by_seed.setdefault(stage.seed, {})[stage.comparison] = accuracy_value
    pairs = [(v["no teacher"], v["distilled"]) for _, v in sorted(by_seed.items()) if len(v) == 2]
    if not pairs:
        return []
    if len(pairs) == 1:
        return [f"distillation vs. no teacher: {100 * (pairs[0][1] - pairs[0][0]):+.2f} accuracy points"]
    base, distilled = np.array(pairs).T
    gains = 100 * (distilled - base)
    return [
        f"over {len(pairs)} seeds ({', '.join(str(s) for s in sorted(by_seed))}): "
        f"no teacher {base.mean():.4f} +- {base.std(ddof=1):.4f}, distilled {distilled.mean():.4f} +- "
        f"{distilled.std(ddof=1):.4f}; distillation vs. no teacher {gains.mean():+.2f} +- {gains.std(ddof=1):.2f} "
        f"accuracy points (per seed: {', '.join(f'{g:+.2f}' for g in gains)})"
    ]


def _device_name(trainer) -> str:
    import torch

    device = trainer.args.device
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type}, {torch.get_num_threads()} threads"


def _print(text: str) -> None:
    # Under `accelerate launch` every process runs this code: only the main one talks.
    if int(os.environ.get("RANK", "0")) == 0:
        print(text, flush=True)


# ------------------------------------------------------------------------------- losses table
def losses_table(markdown: bool = False) -> str:
    """Every registered loss: name, description, paper and year, what it reads, trainable modules."""
    from . import losses

    rows = []
    for name in losses.available():
        info = losses.get_info(name)
        paper = info.paper if str(info.year) in info.paper else f"{info.paper} ({info.year})"
        rows.append([name, info.description, paper, info.reads, "yes" if info.trainable else "no"])
    header = ["name", "description", "paper", "reads", "trains extra modules"]
    if markdown:
        def cell(text: str) -> str:
            return str(text).replace("|", "\\|").replace("\n", " ")

        lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
        lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
        return "\n".join(lines)
    widths = [len(h) for h in header]
    for row in rows:
        for i in (0, 3, 4):
            widths[i] = max(widths[i], len(row[i]))
    out = []
    for row in rows:
        out.append(f"{row[0]}  [{row[3]}; trains extra modules: {row[4]}]")
        out.append(textwrap.fill(row[1], 100, initial_indent="    ", subsequent_indent="    "))
        out.append(textwrap.fill(row[2], 100, initial_indent="    paper: ", subsequent_indent="           "))
    return f"{len(rows)} registered losses (`--markdown` for a table)\n\n" + "\n".join(out)


def update_readme_methods(readme: str | os.PathLike) -> bool:
    """Replace the methods table between the README's markers; returns whether it changed."""
    path = Path(readme)
    text = path.read_text(encoding="utf-8")
    if METHODS_START not in text or METHODS_END not in text:
        raise RecipeError("", f"{path} has no {METHODS_START} ... {METHODS_END} markers")
    head, rest = text.split(METHODS_START, 1)
    _, tail = rest.split(METHODS_END, 1)
    new = f"{head}{METHODS_START}\n{losses_table(markdown=True)}\n{METHODS_END}{tail}"
    if new != text:
        path.write_text(new, encoding="utf-8")
    return new != text


# ------------------------------------------------------------------------------- entry point
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hfdistill",
        description="Knowledge distillation for Hugging Face models: recipes in, compact students out.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    train = commands.add_parser(
        "train",
        help="train a student from a recipe",
        description="Train a student as a YAML recipe describes. Any recipe key can be overridden with "
        "`--dotted.key value`, e.g. `--training.learning_rate 0.01 --terms.0.weight 0.5`.",
    )
    train.add_argument("recipe", help="the recipe YAML file")
    commands.add_parser(
        "push", add_help=False, help="push a finished result folder to the Hub (`hfdistill push --help`)"
    )
    losses = commands.add_parser("losses", help="list the registered distillation methods")
    losses.add_argument("--markdown", action="store_true", help="print a Markdown table (the README's)")
    losses.add_argument("--update-readme", metavar="README", help="rewrite the table between the README's markers")
    return parser


def _error(message: str) -> None:
    print(textwrap.fill(f"hfdistill: error: {message}", 100, break_long_words=False, break_on_hyphens=False), file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code (0 done, 2 bad input, 1 other errors, 130 interrupted)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["push"]:
        return hub.push_main(argv[1:])
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2)
        return int(exc.code or 0)
    if args.command is None:
        parser.print_help()
        return EXIT_BAD_INPUT
    if args.command == "losses":
        if extra:
            _error(f"unexpected arguments {extra}; `hfdistill losses` takes only --markdown / --update-readme")
            return EXIT_BAD_INPUT
        if args.update_readme:
            changed = update_readme_methods(args.update_readme)
            _print(f"{args.update_readme}: methods table {'updated' if changed else 'already up to date'}")
        else:
            _print(losses_table(markdown=args.markdown))
        return EXIT_OK
    return _train_command(args.recipe, extra)


def reproduce_command(recipe_path: str, overrides: Sequence[str]) -> str:
    """The command line for the model card, without any token: `--x.hub_token VALUE` loses both parts."""
    kept, skip_value = [], False
    for part in overrides:
        if skip_value:
            skip_value = False
            continue
        if part.startswith("--") and "token" in part:
            skip_value = "=" not in part
            continue
        kept.append(part)
    return " ".join(["hfdistill", "train", recipe_path, *kept])


def _train_command(recipe_path: str, overrides: list[str]) -> int:
    from .taps import TapError
    from .trainer import DistillationError

    try:
        recipe = load_recipe(recipe_path, overrides)
        run_recipe(recipe, recipe_path, command=reproduce_command(recipe_path, overrides))
    except (RecipeError, DistillationError, TapError) as exc:
        _error(str(exc))
        return EXIT_BAD_INPUT
    except hub.HubError as exc:
        # A model id that cannot be had is bad input; a push that failed left the local result complete.
        _error(str(exc))
        return EXIT_BAD_INPUT if exc.reason in HUB_BAD_INPUT_REASONS else EXIT_ERROR
    except _Interrupted as stop:
        stage = stop.stage
        checkpoint = _last_checkpoint(stage.output_dir)
        lines = [f"\ninterrupted while training the {stage.label}."]
        if checkpoint is None:
            lines.append("No checkpoint was saved yet (see `training.save_strategy` / `save_steps`); run the same command again to start over.")
        elif stage.label == "teacher":
            lines.append(f"Last checkpoint: {checkpoint}. Resume the teacher with the same command plus "
                         f"`--teacher.train_args.resume_from_checkpoint {checkpoint}`.")
        elif stage.label == "student (no teacher)" or stage.extra_seed:
            lines.append(f"Last checkpoint: {checkpoint}. The comparison run restarts when you run the same command again.")
        else:
            lines.append(f"Last checkpoint (left intact): {checkpoint}. Resume with the same command plus "
                         f"`--training.resume_from_checkpoint {checkpoint}`.")
        print("\n".join(lines), file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        print("\ninterrupted before training started; nothing to resume.", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - exit code 1 with the error, the traceback for bug reports
        import traceback

        traceback.print_exc()
        _error(f"{type(exc).__name__}: {exc}")
        return EXIT_ERROR
    return EXIT_OK
