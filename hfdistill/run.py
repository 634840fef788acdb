"""A whole run from a recipe: what ``hfdistill train`` does, as one Python call.

    import hfdistill

    result = hfdistill.run("recipes/quickstart.yaml", overrides={"training.num_train_epochs": 1})
    result.output_dir, result.metrics, print(result.summary)

:func:`run` goes through these steps; :func:`check` (``hfdistill check``) does the first two only.

1. **Plan** (:func:`plan_run`): validate the recipe, load the data and the models, check label counts
   and every job's training arguments, and decide the *jobs* (training runs): the teacher, when
   ``teacher.train_from`` says to train it first; the comparison runs (``student.baseline``, extra
   ``baseline_seeds``); then the distilled student. Writes nothing.
2. **Validate** (:func:`validate_plan`): build the distilled student's trainer once for every recipe
   stage, on a copy of the student, with the real datasets and arguments (the dry-run batch checks the
   taps, sizes the adapters and configures the loss modules). Writes nothing; every bad input fails
   here, before anything trains.
3. **Train** each job in order; each evaluates and saves its model in its own folder, and after its last
   stage every extra student its loss modules trained (DML's peers: ``extra_students()``) in a folder of its
   own, evaluated like the student (:func:`save_extra_students`). The distilled
   student's job trains the recipe's stages (:meth:`hfdistill.Recipe.stage_list`) one after another on
   the same student object, each from the previous stage's weights, with the stage's ``training``
   merged over the recipe's; the adapters' and loss modules' state goes from stage to stage (matched by
   term name). A job without a teacher (the teacher's own training, the baseline) is one plain run.
4. **Summary and card**: size, quality and measured latency of each model (peers included), the seeds
   comparison, the stages; the model card and ``distill_recipe.yaml`` next to the student (and a card in
   each peer's folder); then the push, if asked (the student folder only).

Folders (``output_dir`` is ``training.output_dir``, default ``runs/<recipe file stem>``)::

    <output_dir>/                        the distilled student (its last stage): weights, card, recipe, checkpoints
    <output_dir>-stages/<stage name>/    each earlier stage: its checkpoints while it trains; at its end the
                                         student, distill_state.safetensors and stage_complete.json
    <output_dir>-peers/<name>/           each extra student trained with the student (DML's peer1, ...): a
                                         complete student folder (weights, config, processor, card, recipe)
    <output_dir>-baseline/               the student without the teacher (student.baseline)
    <output_dir>-seed<n>/ (-stages/...)  the distilled student of an extra seed (student.baseline_seeds)
    <output_dir>-baseline-seed<n>/       ... and its no-teacher run
    <teacher.name>/                      a teacher trained first (teacher.train_from)

The earlier stages and the peers live beside ``output_dir``, not in it, so that the student folder (what goes
to the Hub) holds only the student.

Resume (``training.resume_from_checkpoint``; the distilled student's job only, as the Trainer's):

- ``true``: the stages whose folder holds a ``stage_complete.json`` (in order, from the first) are loaded
  (student weights and distill state) and skipped; the first other stage resumes from its last
  checkpoint, or starts from the loaded weights when it has none; the stages after it train as usual.
- a checkpoint path: its folder names the stage (``<output_dir>-stages/<name>/checkpoint-N`` or
  ``<output_dir>/checkpoint-N`` for the last stage); the stages before it must be complete and are
  loaded; that stage resumes from the checkpoint at its step.
- Without it, every stage trains from the start (a stale ``stage_complete.json`` is removed when its
  stage starts again).

Ctrl-C raises :class:`RunInterrupted` (a ``KeyboardInterrupt``) whose :meth:`~RunInterrupted.hint`
says how to resume; the CLI prints it and exits 130.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from . import card, processes
from .errors import BadInputError, OverrideError, RecipeError, ResultFolderError
from .outputs import CHECKPOINT_COMPLETE_NAME, incomplete_checkpoints, last_complete_checkpoint, remove_checkpoints
from .recipe import Recipe, StageSpec, term_name
from .tasks import Task, get_task
from .terms import load_distill_state, save_distill_state

STAGES_SUFFIX = "-stages"
STAGE_COMPLETE_NAME = "stage_complete.json"


# ------------------------------------------------------------------------------------ the plan
@dataclass
class StageRun:
    """One recipe stage of a job: where it writes, its merged training arguments, and what happened."""

    spec: StageSpec | None  # None for a job without a teacher (one plain run)
    index: int
    output_dir: str
    training: dict
    final: bool
    trainer: Any = None
    metrics: dict = field(default_factory=dict)  # evaluation metrics at the end of the stage
    train_metrics: dict = field(default_factory=dict)  # Trainer.train()'s (train_runtime, ...)
    global_step: int | None = None
    status: str = "pending"  # pending, trained, resumed (from a checkpoint), loaded (completed earlier)
    resume_from: str | None = None  # the checkpoint this stage resumes from

    @property
    def name(self) -> str:
        return self.spec.name if self.spec is not None else "train"


@dataclass
class PeerRun:
    """An extra student trained with a job's student (a DML peer): its folder, trainer and evaluation metrics."""

    name: str
    output_dir: str
    trainer: Any  # a DistillationTrainer of the peer alone (no terms): evaluates, saves and writes its card
    metrics: dict = field(default_factory=dict)


@dataclass
class Job:
    """One training run of the plan: the teacher (when it is trained first), a comparison run, the student."""

    label: str
    output_dir: str
    data: Any  # TaskData
    load: Callable[[], Any] | None = None  # makes the LoadedModel (seeded) when the job starts
    loaded: Any = None  # LoadedModel trained by this job
    teacher: Any = None  # LoadedModel of the teacher this job distils from
    recipe: Recipe | None = None  # None: no distillation terms (the teacher's training, a baseline)
    stages: list[StageRun] = field(default_factory=list)
    # For `student.baseline_seeds`: which side of the comparison this run is, with which seed; the extra
    # seeds' runs are summarised as mean and std, not as rows of their own.
    comparison: str | None = None  # "no teacher" or "distilled"
    seed: int | None = None
    extra_seed: bool = False
    peers: list[PeerRun] = field(default_factory=list)  # extra students of the last stage (DML's peers)

    def model(self) -> Any:
        """The job's LoadedModel, loaded (seeded) on first use."""
        if self.loaded is None:
            self.loaded = self.load()
        return self.loaded

    @property
    def trainer(self) -> Any:
        return self.stages[-1].trainer if self.stages else None

    @property
    def metrics(self) -> dict:
        return self.stages[-1].metrics if self.stages else {}

    @property
    def training(self) -> dict:
        return self.stages[-1].training if self.stages else {}


@dataclass
class Plan:
    """Everything checked and loaded, nothing written yet."""

    recipe: Recipe
    task: Task
    output_dir: str
    jobs: list[Job]
    label_names: list[str]
    teacher: Any = None  # LoadedModel of the teacher used for distillation
    teacher_folder: str | None = None
    rows: list = field(default_factory=list)  # the summary's measured rows (the card reads them)

    @property
    def final(self) -> Job:
        return self.jobs[-1]


@dataclass
class RunResult:
    """What :func:`run` did: the saved student's folder and metrics, the summary, every job and stage."""

    output_dir: str
    metrics: dict  # the saved student's evaluation metrics (``eval_accuracy``, ``eval_teacher_accuracy``, ...)
    summary: str | None  # the table printed at the end (None on processes other than the main one)
    plan: Plan

    @property
    def recipe(self) -> Recipe:
        return self.plan.recipe

    @property
    def jobs(self) -> list[Job]:
        return self.plan.jobs

    @property
    def stages(self) -> list[StageRun]:
        """The distilled student's stages, in order."""
        return self.plan.final.stages

    @property
    def trainer(self) -> Any:
        """The trainer of the saved student (its last stage)."""
        return self.plan.final.trainer

    @property
    def peers(self) -> list[PeerRun]:
        """The extra students trained with the saved student (DML's peers), each saved in its own folder."""
        return self.plan.final.peers


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C during a job; :meth:`hint` says what was kept and how to resume."""

    def __init__(self, job: Job, stage: StageRun | None, plan: Plan):
        super().__init__(f"interrupted while training the {job.label}")
        self.job, self.stage, self.plan = job, stage, plan

    def hint(self) -> str:
        job, stage = self.job, self.stage
        folder = stage.output_dir if stage is not None else job.output_dir
        checkpoint = last_checkpoint(folder)
        staged = stage is not None and len(job.stages) > 1
        where = f"stage {stage.name!r} of the {job.label}" if staged else f"the {job.label}"
        lines = [f"\ninterrupted while training {where}."]
        done = [s.name for s in job.stages[: stage.index]] if staged else []
        if job.label == "teacher":
            if checkpoint is None:
                lines.append("No checkpoint was saved yet (see `training.save_strategy`); run the same command again to start over.")
            else:
                lines.append(f"Last checkpoint: {checkpoint}. Resume the teacher with the same command plus "
                             f"`--teacher.train_args.resume_from_checkpoint {checkpoint}`.")
        elif job.comparison == "no teacher" or job.extra_seed:
            lines.append(f"Last checkpoint: {checkpoint}. " if checkpoint else "")
            lines[-1] += "The comparison run restarts when you run the same command again."
        elif checkpoint is not None:
            lines.append(f"Last checkpoint (left intact): {checkpoint}. Resume with the same command plus "
                         f"`--training.resume_from_checkpoint {checkpoint}`"
                         + (" (or `true`: it finds the stage and its last checkpoint)." if staged else "."))
        elif done:
            lines.append(f"Stage(s) {', '.join(done)} are complete; `--training.resume_from_checkpoint true` loads "
                         f"them and starts stage {stage.name!r} again (it saved no checkpoint yet).")
        else:
            lines.append("No checkpoint was saved yet (see `training.save_strategy` / `save_steps`); run the same "
                         "command again to start over.")
        return "\n".join(line for line in lines if line)


def _require(recipe: Recipe) -> None:
    if recipe.task is None:
        from .tasks import TASK_NAMES

        raise RecipeError("task", f"a run needs `task:` (one of {', '.join(TASK_NAMES)})")
    get_task(recipe.task)
    if recipe.student is None:
        raise RecipeError("student", "a run needs a `student:` section with at least `name:`")
    if recipe.data is None:
        raise RecipeError("data", "a run needs a `data:` section with at least `name:` (e.g. sklearn-digits)")
    stages = recipe.stage_list()
    if recipe.teacher is None:
        from . import losses

        needy = [t.loss for stage in stages for t in stage.terms if losses.needs_teacher(t.loss, t.params)]
        if needy:
            raise RecipeError("teacher", f"the recipe's term(s) {needy} need a teacher but there is no `teacher:`; add one, or remove those terms to train the student alone")
    if recipe.teacher is not None and not any(stage.terms for stage in stages):
        raise RecipeError("terms", "the recipe names a teacher but no `terms`; add e.g. `terms: [{loss: kd, weight: 0.9}]`, or remove `teacher` to train the student alone")
    if recipe.student.train_from is not None or recipe.student.train_args:
        raise RecipeError("student.train_from", "`train_from`/`train_args` are for the teacher; the student is always trained")
    if recipe.teacher is not None and recipe.teacher.baseline:
        raise RecipeError("teacher.baseline", "`baseline` belongs to the student")
    if recipe.student.baseline_seeds > 1 and not recipe.student.baseline:
        raise RecipeError("student.baseline_seeds", "compares seeds of the no-teacher run: set `student.baseline: true`")
    if recipe.teacher is not None and recipe.teacher.train_args and recipe.teacher.train_from is None:
        raise RecipeError("teacher.train_args", "given without `teacher.train_from`")


def _training(base: Mapping[str, Any], output_dir: str, extra: Mapping[str, Any] | None = None,
              publish: bool = True) -> dict:
    """A job's or stage's training arguments: ``base`` without resume, plus ``extra``, writing to ``output_dir``."""
    training = {key: value for key, value in base.items() if key != "resume_from_checkpoint"}
    if not publish:  # only the distilled student goes to the Hub, never the teacher, a comparison run or a stage
        training = {k: v for k, v in training.items() if k != "push_to_hub" and not k.startswith("hub_")}
    training.update(extra or {})
    training["output_dir"] = output_dir
    return training


def _lower_is_better() -> frozenset[str]:
    from .tasks import TASKS

    return frozenset(task.metric for task in TASKS.values() if not task.greater_is_better)


LOWER_IS_BETTER = _lower_is_better()  # headline metrics of the tasks table where lower is better (perplexity)


def make_args(training: Mapping[str, Any], where: str = "training"):
    """A DistillationConfig from training arguments; a RecipeError at ``where`` when they do not fit."""
    import torch

    from .config import DistillationConfig

    # No logging integrations unless asked for; pinned memory only helps with an accelerator.
    values = {"report_to": "none", "dataloader_pin_memory": torch.cuda.is_available(), **training}
    metric = str(values.get("metric_for_best_model") or "").removeprefix("eval_")
    if metric and "greater_is_better" not in values and metric in LOWER_IS_BETTER:
        values["greater_is_better"] = False  # transformers assumes higher is better for all but `*loss`
    # Our transforms read the raw image/text columns, which the Trainer would otherwise drop.
    values["remove_unused_columns"] = False
    try:
        return DistillationConfig(**values)
    except (TypeError, ValueError) as exc:
        raise RecipeError(where, f"invalid training arguments: {exc}") from None


def stage_folder(output_dir: str, stage_name: str) -> str:
    """Where a non-final stage of the job writing to ``output_dir`` keeps its checkpoints and its result."""
    return os.path.join(f"{output_dir.rstrip('/')}{STAGES_SUFFIX}", stage_name)


def _stage_runs(recipe: Recipe, output_dir: str, extra: Mapping[str, Any] | None = None,
                publish: bool = True) -> list[StageRun]:
    """The stages of a job that distils: one per recipe stage; the last writes to ``output_dir``."""
    specs = recipe.stage_list()
    runs = []
    for index, spec in enumerate(specs):
        final = index == len(specs) - 1
        folder = output_dir if final else stage_folder(output_dir, spec.name)
        base = recipe.stage_training(spec)
        runs.append(StageRun(spec, index, folder, _training(base, folder, extra, publish and final), final))
    return runs


# Training arguments that only a distillation reads: a plain run (the teacher's training, a baseline) drops them.
ON_POLICY_FIELDS = ("lmbda", "on_policy_temperature", "on_policy_max_new_tokens")


def _plain(training: Mapping[str, Any]) -> dict:
    """Training arguments for a run without a teacher: without the ones only a distillation reads."""
    return {k: v for k, v in training.items() if k not in ON_POLICY_FIELDS}


def _plain_job_runs(training: Mapping[str, Any], output_dir: str, extra: Mapping[str, Any] | None = None) -> list[StageRun]:
    """A job without distillation terms (a baseline): one plain run."""
    return [StageRun(None, 0, output_dir, _training(_plain(training), output_dir, extra, publish=False), True)]


def _default_output_dir(recipe_path: str | None) -> str:
    stem = Path(recipe_path).stem if recipe_path else "recipe"
    return os.path.join("runs", stem)


def plan_run(recipe: Recipe, recipe_path: str | None = None, dataset: Any = None) -> Plan:
    """Check the recipe, load the data and the models, and decide the jobs and their stages; writes nothing."""
    from transformers import set_seed

    from . import hub
    from .data import build_task_data, load_raw_data
    from .models import check_labels, resolve_model_name
    from .models import load_model as _load_model

    def load_model(spec, *args, **kwargs):
        # A model that needs the Hub: one clear message for offline, missing, private, bad revision, unreachable.
        with hub.wrap_hub_errors(spec.name, revision=spec.revision, token=recipe.training.get("hub_token")):
            return _load_model(spec, *args, **kwargs)

    _require(recipe)
    task = get_task(recipe.task)
    output_dir = recipe.training.get("output_dir") or _default_output_dir(recipe_path)
    # Bad training arguments (of the run and of each stage) fail here, before any work.
    for stage_run in _stage_runs(recipe, output_dir):
        make_args(stage_run.training, f"stages[{stage_run.index}].training" if recipe.stages else "training")
    seed = int(recipe.training.get("seed", 42))
    raw = load_raw_data(recipe.data, task.name, seed=recipe.data.seed, dataset=dataset)
    if task.targets == "maps":  # maps without class names: a segmentation model's, else those found in the maps
        from .data_dense import complete_label_names

        complete_label_names(raw, recipe)
    id2label = dict(enumerate(raw.label_names))
    data_size = recipe.data.image_size

    def student_loader(job_seed: int) -> Callable[[], Any]:
        def load():
            set_seed(job_seed)  # the same initialisation for the same seed, whatever runs before
            return load_model(recipe.student, "student", task.name, raw.num_labels, id2label, image_size=data_size)

        return load

    student = student_loader(seed)()
    jobs: list[Job] = []
    teacher = None
    teacher_folder = None
    if recipe.teacher is not None and recipe.teacher.cache is not None:  # stored outputs (hfdistill.cache)
        from .cache import load_cached_teacher

        teacher = load_cached_teacher(recipe, raw, student, task.name, load_model)
        check_labels(teacher, student, raw.num_labels, raw.label_names)
    elif recipe.teacher is not None:
        spec = recipe.teacher
        teacher_folder = resolve_model_name(spec, "teacher")
        if spec.train_from is not None and not os.path.isfile(os.path.join(teacher_folder, "config.json")):
            set_seed(seed)
            teacher = load_model(spec.train_from, "student", task.name, raw.num_labels, id2label,
                                 image_size=spec.image_size or data_size)
            teacher.role = "teacher"
            training = _training(_plain(recipe.training), teacher_folder, spec.train_args, publish=False)
            make_args(training, "teacher.train_args")
            data = build_task_data(raw, task.name, teacher, None, recipe.data.augment, recipe.data.max_length)
            jobs.append(Job("teacher", teacher_folder, data, loaded=teacher,
                            stages=[StageRun(None, 0, teacher_folder, training, True)]))
        else:
            pretrained = spec.pretrained if spec.pretrained is not None else True
            own_size = os.path.isdir(teacher_folder) or pretrained
            teacher = load_model(spec, "teacher", task.name, raw.num_labels, id2label,
                                 image_size=None if own_size else data_size)
        check_labels(teacher, student, raw.num_labels, raw.label_names)
    else:
        check_labels(None, student, raw.num_labels, raw.label_names)

    from .outputs import baseline_dir, seed_dir

    data = build_task_data(raw, task.name, student, teacher, recipe.data.augment, recipe.data.max_length)
    if task.targets == "tokens" and teacher is not None and not getattr(teacher.model, "is_cache", False):
        _check_vocabularies(recipe, student, teacher)
    _check_on_policy(recipe, task, teacher)
    comparing = recipe.student.baseline and teacher is not None
    if comparing:
        # Extra seeds first (their folders end in -seed<N>), then the first seed's baseline and student.
        for extra in range(seed + 1, seed + recipe.student.baseline_seeds):
            folder = baseline_dir(output_dir, extra)
            jobs.append(Job(f"student (no teacher, seed {extra})", folder, data, load=student_loader(extra),
                            stages=_plain_job_runs(recipe.training, folder, {"seed": extra}),
                            comparison="no teacher", seed=extra, extra_seed=True))
            folder = seed_dir(output_dir, extra)
            jobs.append(Job(f"student (distilled, seed {extra})", folder, data, load=student_loader(extra),
                            teacher=teacher, recipe=recipe,
                            stages=_stage_runs(recipe, folder, {"seed": extra}, publish=False),
                            comparison="distilled", seed=extra, extra_seed=True))
        folder = baseline_dir(output_dir)
        jobs.append(Job("student (no teacher)", folder, data, load=student_loader(seed),
                        stages=_plain_job_runs(recipe.training, folder), comparison="no teacher", seed=seed))
    label = "student (distilled)" if teacher is not None else "student"
    jobs.append(Job(label, output_dir, data, loaded=student, teacher=teacher, recipe=recipe,
                    stages=_stage_runs(recipe, output_dir), comparison="distilled" if comparing else None, seed=seed))
    return Plan(recipe, task, output_dir, jobs, raw.label_names, teacher, teacher_folder)


def _check_on_policy(recipe: Recipe, task: Any, teacher: Any) -> None:
    """``training.lmbda`` (on-policy batches, :mod:`hfdistill.on_policy`) where the student can sample prompts'
    completions and a live teacher can score them; refused before anything loads further or trains."""
    for k, stage in enumerate(recipe.stage_list()):
        training = recipe.stage_training(stage)
        if not training.get("lmbda"):
            continue
        where = f"stages[{k}].training.lmbda" if recipe.stages and "lmbda" in (stage.training or {}) else "training.lmbda"
        if task.targets != "tokens":
            raise RecipeError(where, f"on-policy batches are sampled by a language model (task: text-generation), "
                              f"not for {task.name}; remove it")
        if teacher is None or getattr(teacher.model, "is_cache", False):
            raise RecipeError(where, "on-policy batches need the live teacher to score the student's samples"
                              + (" (a teacher cache holds its outputs on the data's sequences only)" if teacher else "")
                              + "; give `teacher: {name: ...}` or remove lmbda")
        if recipe.data.packing:
            raise RecipeError(where, "on-policy batches are sampled from each example's prompt, which packed blocks "
                              "(data.packing) do not keep; set data.packing to false or remove lmbda")
        if not stage.terms:
            raise RecipeError(where, "on-policy batches train through the distillation terms (the student's own loss "
                              "is not applied to its samples), and this stage has none; add a token loss such as "
                              "`jsd` or `reverse_kl`")


def _vocabulary(loaded: Any) -> int | None:
    head = loaded.model.get_output_embeddings() if hasattr(loaded.model, "get_output_embeddings") else None
    return int(head.weight.shape[0]) if head is not None else getattr(loaded.model.config, "vocab_size", None)


def _check_vocabularies(recipe: Recipe, student: Any, teacher: Any) -> None:
    """Language models whose tokenizers or vocabularies differ: a term comparing next-token distributions
    over one vocabulary (every logits loss but `uld`) cannot pair them; say so now, naming both."""
    from . import losses
    from .data import same_tokenizer

    sizes = _vocabulary(student), _vocabulary(teacher)
    tokenizers = student.tokenizer, teacher.tokenizer
    if sizes[0] == sizes[1] and (None in tokenizers or same_tokenizer(*tokenizers)):
        return
    for k, stage in enumerate(recipe.stage_list()):
        for i, term in enumerate(stage.terms):
            info = losses.get_info(term.loss)
            if info.reads != "logits" or not info.same_shape:
                continue
            where = f"stages[{k}].terms[{i}].loss" if recipe.stages else f"terms[{i}].loss"
            names = [getattr(t, "name_or_path", None) or type(t).__name__ for t in tokenizers]
            raise RecipeError(where, (
                f"`{term.loss}` compares the teacher's and the student's next-token distributions over one "
                f"vocabulary, but the student's tokenizer ({names[0]}, {len(tokenizers[0]) if tokenizers[0] else '?'} "
                f"tokens; output vocabulary {sizes[0]}) and the teacher's ({names[1]}, "
                f"{len(tokenizers[1]) if tokenizers[1] else '?'} tokens; output vocabulary {sizes[1]}) differ. Use "
                "`uld` (Universal Logit Distillation), which pairs any two vocabularies, or a teacher and student "
                "with the same tokenizer"))


# ------------------------------------------------------------------------------------ trainers
def build_trainer(job: Job, plan: Plan, stage: StageRun, *, model: Any = None, teacher: Any = None,
                  args: Any = None, distill_state: Mapping[str, Any] | None = None):
    """The DistillationTrainer of one stage of a job (``model``/``teacher``/``args`` replace the job's own).

    ``distill_state``: the adapters' and loss modules' state carried from the earlier stages (the trainer
    loads the entries of the terms this stage has, by term name, and ignores the rest).
    """
    from .trainer import DistillationTrainer

    loaded = job.model()
    teacher_model = teacher if teacher is not None else (job.teacher.model if job.teacher is not None else None)
    student_model = model if model is not None else loaded.model
    args = args if args is not None else make_args(stage.training)
    preprocess = getattr(plan.task, "preprocess_logits", None)
    teacher_preprocess = None
    if plan.task.targets == "boxes":  # a detector's scores (sigmoid or softmax) are read per evaluated model
        from .detection import DetectionPredictions

        args.eval_do_concat_batches = False  # the labels are a list of dicts per batch
        preprocess = DetectionPredictions.for_model(student_model)
        if teacher_model is not None and not getattr(teacher_model, "is_cache", False):
            teacher_preprocess = DetectionPredictions.for_model(
                teacher_model if hasattr(teacher_model, "config") else teacher_model.model)
    processor = None
    if not loaded.is_timm:
        processor = loaded.tokenizer if plan.task.processor == "tokenizer" else loaded.image_processor()
    return DistillationTrainer(
        model=student_model,
        teacher=teacher_model,
        recipe=job.recipe if job.recipe is not None else Recipe(),
        stage=stage.spec.name if job.recipe is not None else None,
        distill_state=dict(distill_state) if distill_state else None,
        args=args,
        train_dataset=job.data.train,
        eval_dataset=job.data.eval,
        data_collator=job.data.collator,
        processing_class=processor,
        compute_metrics=plan.task.compute_metrics,
        # a language model's eval: per-token losses, not [B, T, vocabulary] logits kept for the whole set
        preprocess_logits_for_metrics=preprocess,
        teacher_preprocess_logits=teacher_preprocess,
        task_loss=plan.task.loss,  # for a student that returns no loss itself
        teacher_inputs=job.data.teacher_inputs if teacher_model is not None else None,
        id2label=dict(enumerate(plan.label_names)),
        timm_model_args=loaded.timm_model_args,
    )


def distill_state(trainer: Any) -> dict:
    """The adapters' and loss modules' state of a trainer (what the next stage continues from), on the CPU."""
    return {k: v.detach().cpu().contiguous() for k, v in trainer.distill_state().items()}


def load_student_into(loaded: Any, folder: str) -> None:
    """Load the student weights saved in ``folder`` into the job's model object, in place."""
    from .models import is_timm_model, wrap_timm_model
    from .models import load_student_weights

    model = loaded.model
    # A timm student saves through transformers' wrapper; a wrapper around the same module loads into it.
    target = wrap_timm_model(model, model_args=loaded.timm_model_args) if is_timm_model(model) else model
    load_student_weights(target, folder)


# ------------------------------------------------------------------------------------ validation
@dataclass
class StageCheck:
    """What validating one stage found: its terms, what trains, the tapped shapes (when known)."""

    name: str
    output_dir: str
    task_weight: float
    terms: list[dict]
    train: list[str] | None
    trainable_params: int
    extra_params: int  # adapters and loss modules
    training: dict
    stage_training: dict  # the stage's own `training` overrides


def validate_plan(plan: Plan) -> list[StageCheck]:
    """Build the distilled student's trainer for every stage (dry run, adapters, loss set-up); writes nothing.

    Runs on a copy of the student (and of a teacher that is still to be trained), with the stage's real
    datasets and arguments but a scratch output folder and no Hub: anything the recipe gets wrong fails
    here, before any job trains.
    """
    job = plan.final
    checks = []
    teacher_trained_first = any(j.label == "teacher" for j in plan.jobs)
    for stage in job.stages:
        teacher = None
        if job.teacher is not None:
            teacher = copy.deepcopy(job.teacher.model) if teacher_trained_first else job.teacher.model
        with tempfile.TemporaryDirectory(prefix="hfdistill-check-") as scratch:
            training = dict(stage.training, output_dir=scratch, push_to_hub=False, report_to="none")
            training = {k: v for k, v in training.items() if not k.startswith("hub_")}
            where = f"stages[{stage.index}].training" if plan.recipe.stages else "training"
            trainer = build_trainer(job, plan, stage, model=copy.deepcopy(job.model().model), teacher=teacher,
                                    args=make_args(training, where))
            checks.append(_describe_stage(trainer, stage))
            del trainer
    return checks


def _describe_stage(trainer: Any, stage: StageRun) -> StageCheck:
    distill = trainer.model
    shapes = _tapped_shapes(trainer)
    terms = []
    spec_terms = stage.spec.terms if stage.spec is not None else []
    from . import losses

    for index, term in enumerate(spec_terms):
        name = term_name(term, index, spec_terms)
        default = losses.get_info(term.loss).default_tap
        terms.append({
            "name": name, "loss": term.loss, "weight": term.weight, "student": term.student or default,
            "teacher": term.teacher or default,
            "adapter": term.adapter, "params": dict(term.params),
            "student_shape": shapes.get(name, (None, None))[0], "teacher_shape": shapes.get(name, (None, None))[1],
        })
    extra = sum(p.numel() for part in ("adapters", "losses") for p in getattr(distill, part).parameters())
    with distill.trainable(trainer.stage.train, f"{trainer.stage_path}.train"):  # what train() would train
        trainable = sum(p.numel() for p in distill.parameters() if p.requires_grad)
    return StageCheck(stage.name, stage.output_dir, trainer.task_weight, terms,
                      stage.spec.train if stage.spec is not None else None, trainable, extra,
                      {k: v for k, v in stage.training.items() if k != "output_dir"},
                      dict(stage.spec.training) if stage.spec is not None else {})


def _tapped_shapes(trainer: Any) -> dict[str, tuple[Any, Any]]:
    """``{term: (student shape after its adapter, teacher shape)}`` from the trainer's dry run."""
    contexts = getattr(trainer, "loss_contexts", None) or {}
    return {name: (ctx.student_shape, ctx.teacher_shape) for name, ctx in contexts.items()}


# ------------------------------------------------------------------------------------ resume
def check_output_folders(plan: Plan, resume: Any, overwrite: bool) -> None:
    """Refuse, before anything is trained, to write where a run must not (and a push that cannot happen).

    Never into a model folder the recipe reads (the teacher's, the student's source) or a folder holding
    anything but an earlier hfdistill result; an earlier result is replaced only with ``overwrite`` (and the
    final job's is continued with ``resume``). Raises :class:`ResultFolderError` (exit 2) saying what to do.
    """
    from .outputs import folder_kind, peers_dir

    from . import hub

    training = plan.recipe.training
    if training.get("push_to_hub") and hub.is_offline():  # known now, not after hours of training
        raise RecipeError("training.push_to_hub", "is true but HF_HUB_OFFLINE=1 is set, so nothing can be pushed; "
                          "unset HF_HUB_OFFLINE, or drop push_to_hub and push the result later with `hfdistill push`")
    read = {os.path.abspath(p) for p in (plan.teacher_folder, _local(plan.recipe.student), _local(plan.recipe.teacher))
            if p}
    for job in plan.jobs:
        if job.label == "teacher":
            continue  # trained into its own folder only when that holds no model yet (plan_run)
        folders = [stage.output_dir for stage in job.stages] + [peers_dir(job.output_dir)]
        for folder in folders:
            path = os.path.abspath(folder)
            _check_path_length(path)
            clash = next((m for m in read if path == m or path.startswith(m + os.sep) or m.startswith(path + os.sep)),
                         None)
            if clash is not None:
                raise ResultFolderError(
                    f"training.output_dir: {folder} would write into (or around) the model folder {clash} that this "
                    "recipe reads (the teacher's or the student's); choose another output_dir"
                )
            kind = folder_kind(folder)
            if kind == "other":
                raise ResultFolderError(
                    f"training.output_dir: {folder} already holds files that are not an hfdistill result "
                    f"({', '.join(sorted(os.listdir(folder))[:4]) if os.path.isdir(folder) else 'a file'}); hfdistill "
                    "does not write into it. Choose another output_dir (or empty that folder)"
                )
            if kind == "result" and not overwrite and resume in (None, False, ""):
                raise ResultFolderError(
                    f"training.output_dir: {folder} holds an earlier result of hfdistill. Replace it with "
                    "`--overwrite` (training.overwrite_output_dir: true), continue it with "
                    "`--training.resume_from_checkpoint true`, or choose another output_dir"
                )


def _check_path_length(path: str) -> None:
    """A folder path the file system can hold (each name and the whole path within its limits)."""
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    try:
        name_max, path_max = os.pathconf(existing, "PC_NAME_MAX"), os.pathconf(existing, "PC_PATH_MAX")
    except (OSError, ValueError, AttributeError):  # a platform without pathconf: the common limits
        name_max, path_max = 255, 4096
    long_name = next((part for part in path.split(os.sep) if len(part.encode()) > name_max), None)
    if long_name is not None or len(path.encode()) >= path_max - 64:  # room for the files written inside
        what = f"a folder name of {len(long_name.encode())} bytes" if long_name else f"{len(path.encode())} bytes"
        raise RecipeError("training.output_dir", f"is too long for the file system ({what}; the limits are "
                          f"{name_max} per name and {path_max} in all); choose a shorter output_dir")
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
        raise RecipeError("training.output_dir", f"{path} cannot be written: {existing} is "
                          + ("not a folder" if not os.path.isdir(existing) else "not writable by this user")
                          + "; choose another output_dir")


def _local(spec: Any) -> str | None:
    """The local folder a model spec names, if it names one."""
    name = getattr(spec, "name", None)
    return name if name and os.path.isdir(name) else None


def last_checkpoint(folder: str) -> str | None:
    """The newest *complete* checkpoint in ``folder`` (one a killed run was writing is passed over)."""
    return last_complete_checkpoint(folder)


def _stage_marker(stage: StageRun) -> dict | None:
    path = os.path.join(stage.output_dir, STAGE_COMPLETE_NAME)
    if not os.path.isfile(path):
        return None
    try:
        marker = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return marker if marker.get("stage") == stage.name else None


def _spec_data(spec: StageSpec | None) -> Any:
    from .recipe import _to_plain

    return _to_plain(spec) if spec is not None else None


def plan_resume(job: Job, resume: Any) -> None:
    """Decide, for each stage of ``job``, whether it is loaded, resumed from a checkpoint or trained; checks only.

    ``resume`` is ``training.resume_from_checkpoint``: None/False (train every stage), True, or a path.
    Raises RecipeError at ``training.resume_from_checkpoint`` when it cannot be honoured.
    """
    where = "training.resume_from_checkpoint"
    if isinstance(resume, str) and resume.strip().lower() in ("true", "false"):
        resume = resume.strip().lower() == "true"
    if resume in (None, False, ""):
        return
    stages = job.stages
    if resume is True:
        first = 0
        while first < len(stages) - 1 and _stage_marker(stages[first]) is not None:
            first += 1
        checkpoint = last_checkpoint(stages[first].output_dir)
        if first == 0 and checkpoint is None:
            folders = sorted({s.output_dir for s in stages})
            raise RecipeError(where, f"`true`, but there is nothing to resume: no checkpoint in {', '.join(folders)}"
                              + (" and no completed stage" if len(stages) > 1 else "")
                              + "; run without it to start from the beginning")
        target = first
    else:
        checkpoint = os.fspath(resume)
        if not os.path.isdir(checkpoint):
            raise RecipeError(where, f"{checkpoint!r} is not a folder; give a checkpoint folder "
                              "(`<output_dir>/checkpoint-N`) or `true` for the last one")
        if not os.path.isfile(os.path.join(checkpoint, CHECKPOINT_COMPLETE_NAME)):
            newest = last_complete_checkpoint(os.path.dirname(os.path.normpath(checkpoint)))
            raise RecipeError(where, f"{checkpoint} is not a complete checkpoint (it has no {CHECKPOINT_COMPLETE_NAME}: "
                              "the run was stopped while writing it, or it was not written by hfdistill); "
                              + (f"resume from {newest}, the newest complete one, or use `true`" if newest else
                                 "no complete checkpoint is beside it; run without resume_from_checkpoint"))
        parent = os.path.abspath(os.path.dirname(os.path.normpath(checkpoint)))
        matches = [s.index for s in stages if os.path.abspath(s.output_dir) == parent]
        if matches:
            target = matches[0]
        elif len(stages) == 1:
            target = 0
        else:
            raise RecipeError(where, f"{checkpoint} is not in a stage folder of this recipe, so its stage is unknown; "
                              f"the stages write to {', '.join(s.output_dir for s in stages)} (or use `true`)")
        missing = [s for s in stages[:target] if _stage_marker(s) is None]
        if missing:
            raise RecipeError(where, f"{checkpoint} is a checkpoint of stage {stages[target].name!r}, but stage "
                              f"{missing[0].name!r} before it is not complete ({missing[0].output_dir} has no "
                              f"{STAGE_COMPLETE_NAME}); resume with `true` to start from the first incomplete stage")
    for stage in stages[:target]:
        marker = _stage_marker(stage)
        if marker.get("spec") is not None and marker.get("spec") != _spec_data(stage.spec):
            raise RecipeError(where, f"stage {stage.name!r} in {stage.output_dir} was trained with another definition "
                              f"of the stage ({marker.get('spec')}); resume with the recipe it was made with, or "
                              "run without resume_from_checkpoint to train every stage again")
        stage.status = "loaded"
    stages[target].resume_from = checkpoint


def _complete_stage(stage: StageRun, state: Mapping[str, Any]) -> None:
    """Save what the next stage (and a resumed run) continues from, then mark the stage complete."""
    save_distill_state(dict(state), stage.output_dir)
    marker = {
        "stage": stage.name, "index": stage.index, "global_step": stage.global_step, "spec": _spec_data(stage.spec),
        "metrics": stage.metrics, "train_metrics": stage.train_metrics,
    }
    path = os.path.join(stage.output_dir, STAGE_COMPLETE_NAME)
    tmp = path + ".tmp"
    Path(tmp).write_text(json.dumps(marker, indent=2, default=str), encoding="utf-8")
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------ the run
def run_job(job: Job, plan: Plan, talk: Callable[[str], None] | None = None) -> dict:
    """Train, evaluate and save one job, stage by stage; returns the last stage's eval metrics."""
    talk = talk or _print
    loaded = job.model()
    carried: dict = {}
    many = len(job.stages) > 1
    for stage in job.stages:
        if stage.status == "loaded":
            marker = _stage_marker(stage) or {}
            talk(f"--> stage {stage.index + 1}/{len(job.stages)} {stage.name!r}: complete in {stage.output_dir}, loaded")
            load_student_into(loaded, stage.output_dir)
            carried = {**carried, **(load_distill_state(stage.output_dir) or {})}
            stage.metrics = marker.get("metrics") or {}
            stage.train_metrics = marker.get("train_metrics") or {}
            stage.global_step = marker.get("global_step")
            continue
        if many:
            resumed = f", resuming from {stage.resume_from}" if stage.resume_from else ""
            talk(f"--> stage {stage.index + 1}/{len(job.stages)} {stage.name!r} -> {stage.output_dir}{resumed}")
        elif stage.resume_from:
            talk(f"--> resuming from {stage.resume_from}")
        skipped = incomplete_checkpoints(stage.output_dir) if stage.resume_from else []
        if skipped:
            talk(f"    passed over (incomplete: the run stopped while writing): {', '.join(skipped)}")
        if processes.is_main_process():  # one process writes result folders; the others wait for it
            marker_path = os.path.join(stage.output_dir, STAGE_COMPLETE_NAME)
            if os.path.exists(marker_path):
                os.remove(marker_path)  # trained again: not complete until it ends
            if not stage.resume_from:  # an earlier run's checkpoints must not mix with this one's (or be resumed)
                for path in remove_checkpoints(stage.output_dir):
                    talk(f"    removed an earlier run's checkpoint {path}")
        processes.wait_for_everyone()
        # A trainer that cannot be built removes the folders it made itself (bad input writes nothing).
        training = dict(stage.training)
        if not stage.final and job.teacher is not None:
            training.setdefault("evaluate_teacher", False)  # the teacher is evaluated once, in the last stage
        trainer = build_trainer(job, plan, stage, args=make_args(training), distill_state=carried)
        stage.trainer = trainer
        output = trainer.train(resume_from_checkpoint=stage.resume_from)
        stage.train_metrics = dict(output.metrics)
        stage.metrics = trainer.evaluate()
        stage.global_step = trainer.state.global_step
        stage.status = "resumed" if stage.resume_from else "trained"
        # Not pushed here: run() pushes once, after the card holds the measured numbers.
        trainer.save_model(stage.output_dir, _internal_call=True)
        if job.recipe is not None:
            carried = {**carried, **distill_state(trainer)}
            if not stage.final and trainer.is_world_process_zero():
                _complete_stage(stage, carried)
        if stage.final:
            job.peers = save_extra_students(stage, trainer)
            for peer in job.peers:
                talk(f"--> {peer.name} (trained with the {job.label}) -> {peer.output_dir}")
    return job.metrics


def save_extra_students(stage: StageRun, trainer: Any) -> list[PeerRun]:
    """Evaluate and save every extra student of a job's last stage (``trainer.extra_students()``: DML's peers).

    Each goes to ``<output_dir>-peers/<name>/`` (:func:`hfdistill.outputs.peers_dir`) as a complete student
    folder, written by the student's own saving code (:meth:`DistillationTrainer.student_trainer`): weights,
    config, processor, training arguments; its card is written with the student's (:func:`run`). Its
    training arguments are the stage's, without resume or Hub settings (only the student is pushed).
    Every process calls this (evaluation is collective); the main one writes.
    """
    from .outputs import peers_dir

    peers = []
    for name, model in trainer.extra_students().items():
        folder = peers_dir(stage.output_dir, name)
        peer_trainer = trainer.student_trainer(model, make_args(_training(stage.training, folder, publish=False)))
        metrics = peer_trainer.evaluate() if peer_trainer.eval_dataset is not None else {}
        peer_trainer.save_model(folder, _internal_call=True)
        peers.append(PeerRun(name, folder, peer_trainer, dict(metrics)))
    return peers


def _resolve_recipe(recipe: Recipe | str | os.PathLike, overrides: Any) -> tuple[Recipe, str | None]:
    from .recipe import apply_overrides, load_recipe, parse_overrides

    if isinstance(overrides, Mapping):
        pairs = list(overrides.items())
    elif overrides and isinstance(overrides[0], str):
        pairs = parse_overrides(list(overrides))
    else:
        pairs = list(overrides or ())
    if isinstance(recipe, Recipe):
        if not pairs:
            recipe.validate()
            return recipe, None
        try:
            return Recipe.from_dict(apply_overrides(recipe.to_dict(), pairs)), None
        except OverrideError:
            raise
        except RecipeError as exc:
            raise OverrideError(exc.path, f"after the overrides: {exc}") from None
    if isinstance(recipe, (str, os.PathLike)):
        return load_recipe(recipe, pairs), os.fspath(recipe)
    raise BadInputError(f"recipe must be a Recipe or the path of a YAML recipe, got {type(recipe).__name__}")


def run(
    recipe: Recipe | str | os.PathLike,
    *,
    overrides: Mapping[str, Any] | Sequence[str] | Sequence[tuple[str, Any]] = (),
    dataset: Any = None,
    print_summary: bool = True,
    command: str | None = None,
) -> RunResult:
    """Everything ``hfdistill train`` does: plan, validate every stage, train each job, save, summarise, card, push.

    Args:
        recipe: a :class:`~hfdistill.Recipe` or the path of a YAML recipe (``base:`` resolved).
        overrides: recipe edits, as the CLI's tokens (``["--training.max_steps", "10"]``), ``(key, value)``
            pairs or a mapping (``{"training.max_steps": 10, "stages.0.training.num_train_epochs": 1}``).
        dataset: a ``datasets.DatasetDict`` (or ``Dataset``) to use instead of ``data.name``'s source.
        print_summary: print each job as it starts and the final table.
        command: the command line shown in the model card (default: ``hfdistill train distill_recipe.yaml``).

    Returns a :class:`RunResult`. Raises a :class:`~hfdistill.errors.BadInputError` (before anything
    trains) when the recipe, models or data do not fit, a :class:`~hfdistill.errors.HubError` for the
    Hub, and :class:`RunInterrupted` on Ctrl-C.
    """
    recipe, recipe_path = _resolve_recipe(recipe, overrides)
    plan = plan_run(recipe, recipe_path, dataset)
    plan_resume(plan.final, recipe.training.get("resume_from_checkpoint"))
    check_output_folders(plan, recipe.training.get("resume_from_checkpoint"),
                         bool(recipe.training.get("overwrite_output_dir", False)))
    validate_plan(plan)
    processes.wait_for_everyone()  # every process has checked the folders before the main one writes to them
    talk = _print if print_summary else (lambda text: None)
    for job in plan.jobs:
        try:
            talk(f"\n==> training {job.label} ({job.model().name}) -> {job.output_dir}")
            run_job(job, plan, talk)
        except KeyboardInterrupt:
            stage = next((s for s in job.stages if s.status == "pending"), job.stages[-1])
            raise RunInterrupted(job, stage, plan) from None
        if job.label == "teacher":
            job.loaded.model.eval()
            job.loaded.folder = job.output_dir
    final = plan.final
    summary = None
    if final.trainer.is_world_process_zero():
        from .publish import write_recipe

        write_recipe(plan.recipe, plan.output_dir)  # tokens are never written
        summary = summarise(plan)
        if print_summary:
            _print("\n" + summary)
        _write_card(plan, command)
    if final.trainer.args.push_to_hub:
        _print(f"\n==> pushing {plan.output_dir} to the Hub ({final.trainer.args.hub_model_id or 'hub_model_id not set'})")
        final.trainer.push_to_hub()  # the folder and card are complete locally first; a failure says how to retry
    processes.wait_for_everyone()  # no process returns before the result folder is complete
    return RunResult(plan.output_dir, dict(final.metrics), summary, plan)


def run_recipe(recipe: Recipe, recipe_path: str | None = None, dataset: Any = None, print_summary: bool = True,
               command: str | None = None) -> RunResult:
    """:func:`run` with the recipe's file path given apart (for the default ``output_dir``), as before."""
    if recipe_path is not None and not recipe.training.get("output_dir"):
        recipe = dataclasses.replace(recipe, training={**recipe.training, "output_dir": _default_output_dir(recipe_path)})
    return run(recipe, dataset=dataset, print_summary=print_summary, command=command)


# ------------------------------------------------------------------------------------ check
@dataclass
class CheckReport:
    """What :func:`check` verified: models, data, jobs and every stage of the distilled student."""

    plan: Plan
    stages: list[StageCheck]

    @property
    def text(self) -> str:
        return format_check(self)


def check(
    recipe: Recipe | str | os.PathLike,
    *,
    overrides: Mapping[str, Any] | Sequence[str] | Sequence[tuple[str, Any]] = (),
    dataset: Any = None,
) -> CheckReport:
    """``hfdistill check``: validate the recipe, load models and data, build every stage's trainer; train and write nothing."""
    recipe, recipe_path = _resolve_recipe(recipe, overrides)
    plan = plan_run(recipe, recipe_path, dataset)
    plan_resume(plan.final, recipe.training.get("resume_from_checkpoint"))
    check_output_folders(plan, recipe.training.get("resume_from_checkpoint"),
                         bool(recipe.training.get("overwrite_output_dir", False)))
    stages = validate_plan(plan)
    return CheckReport(plan, stages)


def _shape(shape: Any) -> str:
    if shape is None:
        return "?"
    if isinstance(shape, (list, tuple)) and shape and not isinstance(shape[0], int):
        return "[" + ", ".join(_shape(s) for s in shape) + "]"
    return "x".join(["B", *(str(int(d)) for d in list(shape)[1:])])  # B: the batch dimension


def format_check(report: CheckReport) -> str:
    from .summary import format_count, model_stats

    plan = report.plan
    recipe = plan.recipe
    final = plan.final
    lines = [f"task: {plan.task.name} ({plan.task.task_loss}; metric: {plan.task.metric})"]
    student = final.model()
    lines.append(f"student: {student.name} ({format_count(model_stats(student.model)[0])} parameters)")
    if plan.teacher is not None:
        first = any(j.label == "teacher" for j in plan.jobs)
        how = f", trained first into {plan.teacher_folder}" if first else ""
        cached = getattr(plan.teacher.model, "is_cache", False)  # hfdistill.cache: the count from its manifest
        params = plan.teacher.model.num_parameters if cached else model_stats(plan.teacher.model)[0]
        lines.append(f"teacher: {plan.teacher.name} ({format_count(params)} parameters{how})")
    data = final.data
    stats = getattr(data, "stats", None) or {}
    what = (f"{stats['format']} data, {stats.get('train_learnt_tokens')} of {stats.get('train_tokens')} training "
            "tokens learnt per epoch" if "format" in stats else f"{len(plan.label_names)} labels")
    lines.append(f"data: {recipe.data.name}: {len(data.train)} training and {len(data.eval)} evaluation examples, "
                 f"{what}")
    lines.append("jobs:")
    for job in plan.jobs:
        lines.append(f"  {job.label} -> {job.output_dir}")
    for check_ in report.stages:
        head = f"stage {check_.name!r}" if len(report.stages) > 1 or recipe.stages else "terms"
        lines.append(f"{head} -> {check_.output_dir}: task weight {check_.task_weight:g}, "
                     f"trains {', '.join(check_.train) if check_.train else 'student, adapters and loss modules'} "
                     f"({format_count(check_.trainable_params)} trainable parameters, "
                     f"{format_count(check_.extra_params)} in adapters and loss modules)"
                     + (f"; its training: {', '.join(f'{k}={v}' for k, v in check_.stage_training.items())}"
                        if check_.stage_training else ""))
        for term in check_.terms:
            taps = ""
            if term["student"] is not None or term["teacher"] is not None or term["student_shape"] is not None:
                taps = (f": student {term['student']} {_shape(term['student_shape'])}"
                        + (f" via {term['adapter']}" if term["adapter"] else "")
                        + f" -> teacher {term['teacher']} {_shape(term['teacher_shape'])}")
            lines.append(f"  {term['name']} = {term['weight']:g} x {term['loss']}{taps}")
    resumed = [s for s in final.stages if s.status == "loaded" or s.resume_from]
    for stage in resumed:
        lines.append(f"resume: stage {stage.name!r} "
                     + ("is complete and would be loaded" if stage.status == "loaded" else f"resumes from {stage.resume_from}"))
    lines.append("OK: the recipe, models, data and every stage's trainer check out; nothing was trained or written.")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ summary and card
def _write_card(plan: Plan, command: str | None) -> None:
    """The student's model card, with the latencies the summary measured on this machine."""
    final = plan.final
    rows = {row.role: row for row in plan.rows}
    student, teacher = rows.get(final.label), rows.get("teacher")
    batch = max(student.latency_ms) if student is not None and student.latency_ms else None
    info = dict(
        recipe=plan.recipe,
        dataset=plan.recipe.data.name if plan.recipe.data is not None else None,
        command=command,
        student_latency_ms=student.latency_ms.get(batch) if batch else None,
        teacher_latency_ms=teacher.latency_ms.get(batch) if teacher is not None and batch else None,
        latency_setup=f"ms per example at batch {batch}, {_device_name(final.trainer)}" if batch else None,
    )
    if plan.recipe.stages:
        info["stages"] = stage_table(final)
    info["data_summary"] = _tokens_seen(final)
    info["data_note"] = (getattr(final.data, "stats", None) or {}).get("note")  # e.g. synthetic data, said so
    info.update(_result_extras(plan, batch))
    main_id = os.path.basename(os.path.abspath(plan.output_dir))
    if final.peers:  # their metrics beside the student's, and where they are (relative: no local paths)
        parent = os.path.dirname(os.path.abspath(plan.output_dir))
        info["peers"] = [{"name": peer.name, "folder": os.path.relpath(os.path.abspath(peer.output_dir), parent),
                          "metrics": dict(peer.metrics)} for peer in final.peers]
    final.trainer.set_card_info(**info)
    final.trainer.create_model_card()
    for peer in final.peers:  # each peer's own card: the same recipe and run, its own numbers
        row = rows.get(peer.name)
        values = {**info, "peers": None, "stages": None, "peer_of": main_id, "model_id": f"{main_id}-{peer.name}",
                  "student_latency_ms": row.latency_ms.get(batch) if row is not None and batch else None,
                  "baseline_metrics": None, "comparison": None, "plots": None, "plots_note": None}
        peer.trainer.set_card_info(**values)
        peer.trainer.create_model_card()


def _tokens_seen(job: Job) -> str | None:
    """A language model's data in tokens, for the card: per epoch, learnt, and seen over the training."""
    from .summary import format_count

    stats = getattr(job.data, "stats", None) or {}
    if "train_learnt_tokens" not in stats:
        return None
    epochs = sum(float(stage.train_metrics.get("epoch", 0) or 0) for stage in job.stages)
    learnt = "completion tokens" if stats.get("completion_only_loss") else "every token"
    return (f"Its {stats['format']} training data is {format_count(stats['train_examples'])} examples of "
            f"{format_count(stats['train_tokens'])} tokens, {format_count(stats['train_learnt_tokens'])} of them "
            f"learnt ({learnt}); over {epochs:g} epochs it saw about "
            f"{format_count(round(stats['train_learnt_tokens'] * epochs))} learnt tokens.")


def _result_extras(plan: Plan, batch: int | None) -> dict:
    """The card's baseline and seeds comparison, the pictures (drawn into the student folder) and, sent to
    the trackers (``report_to``), the final comparison; from the summary's rows and :func:`compare_seeds`."""
    from .plots import tradeoff_points, write_run_plots
    from .summary import compare_seeds, comparison_logs, log_to_trackers

    final, metric = plan.final, plan.task.metric
    comparison = compare_seeds(plan.jobs, metric, getattr(plan.task, "greater_is_better", True))
    alone = next((job for job in plan.jobs if job.comparison == "no teacher" and not job.extra_seed), None)
    roles = {"teacher": "teacher", "alone": alone.label if alone is not None else None, "distilled": final.label}
    histories = [(stage.name, stage.trainer.state.log_history) for stage in final.stages if stage.trainer is not None]
    extras = write_run_plots(plan.output_dir, histories=histories, metric=metric,
                             latency_setup=f"batch {batch}" if batch else None,
                             points=tradeoff_points(plan.rows, metric, roles, comparison))
    log_to_trackers(final.trainer, comparison_logs(plan.rows, comparison, metric, roles))
    return {**extras, "baseline_metrics": dict(alone.metrics) if alone is not None else None,
            "comparison": comparison.to_dict() if comparison is not None else None}


def stage_table(job: Job) -> list[dict]:
    """The stages of a job as plain data: name, terms, task weight, what trained, steps, metrics, folder."""
    rows = []
    for stage in job.stages:
        spec = stage.spec
        rows.append({
            "name": stage.name,
            "terms": [{"name": term_name(t, i, spec.terms), "loss": t.loss, "weight": t.weight}
                      for i, t in enumerate(spec.terms)] if spec is not None else [],
            "task_weight": spec.task_weight if spec is not None else None,
            "train": spec.train if spec is not None else None,
            "steps": stage.global_step,
            "metrics": {k[len("eval_"):]: v for k, v in stage.metrics.items()
                        if k.startswith("eval_") and isinstance(v, (int, float))},
            "output_dir": stage.output_dir,
            "status": stage.status,
        })
    return rows


def summarise(plan: Plan) -> str:
    """The final table (measured on this machine), the stages, the seeds comparison and how to load the student."""
    from .summary import ModelRow, count_parameters, format_summary, measure_latency, size_on_disk

    final = plan.final
    eval_ds = final.data.eval
    n = min(32, len(eval_ds))
    examples = eval_ds.__getitems__(list(range(n))) if hasattr(eval_ds, "__getitems__") else [eval_ds[i] for i in range(n)]
    batch = final.data.collator(examples)
    student_inputs = {k: v for k, v in batch.items() if not k.startswith("teacher_") and k != "labels"}
    rows = []
    teacher_job = next((j for j in plan.jobs if j.label == "teacher"), None)
    if plan.teacher is not None and getattr(plan.teacher.model, "is_cache", False):  # stored outputs: nothing to time
        cache = plan.teacher.model
        rows.append(ModelRow("teacher", plan.teacher.name, cache.num_parameters,
                             cache.manifest["teacher"].get("weight_bytes"), {}))
    elif plan.teacher is not None:
        teacher_model = plan.teacher.model
        teacher_batch = final.data.teacher_inputs(batch) if final.data.teacher_inputs is not None else student_inputs
        metrics = {k[len("eval_teacher_"):]: v for k, v in final.metrics.items() if k.startswith("eval_teacher_")}
        if teacher_job is not None and not metrics:
            metrics = {k[len("eval_"):]: v for k, v in teacher_job.metrics.items()}
        name = plan.teacher.name if teacher_job is None else f"{plan.teacher.name} -> {teacher_job.output_dir}"
        rows.append(ModelRow("teacher", name, count_parameters(teacher_model), size_on_disk(teacher_model, plan.teacher_folder),
                             metrics, measure_latency(teacher_model, teacher_batch)))
    for job in plan.jobs:
        if job.label == "teacher" or job.extra_seed:
            continue
        model = job.trainer.student
        rows.append(ModelRow(job.label, job.output_dir, count_parameters(model), size_on_disk(model, job.output_dir),
                             {k[len("eval_"):]: v for k, v in job.metrics.items() if k.startswith("eval_")},
                             measure_latency(model, student_inputs), job.output_dir))
        for peer in job.peers:  # extra students trained with this one (DML's peers): rows of their own
            model = peer.trainer.student
            rows.append(ModelRow(peer.name, peer.output_dir, count_parameters(model),
                                 size_on_disk(model, peer.output_dir),
                                 {k[len("eval_"):]: v for k, v in peer.metrics.items() if k.startswith("eval_")},
                                 measure_latency(model, student_inputs), peer.output_dir))
    plan.rows = rows
    metric = plan.task.metric
    lines = [f"Summary ({len(eval_ds)} eval examples; latency measured on this machine, "
             f"{_device_name(final.trainer)})", format_summary(rows, metric=metric)]
    note = (getattr(final.data, "stats", None) or {}).get("note")
    if note:  # e.g. synthetic data: said wherever its results are shown
        lines.append(note)
    if len(final.stages) > 1:
        lines.append("")
        lines.append(f"Stages of the {final.label}:")
        for i, row in enumerate(stage_table(final), 1):
            terms = " + ".join(f"{t['weight']:g} {t['name']}" for t in row["terms"]) or "no terms"
            task_weight = f"task weight {row['task_weight']:g}" if row["task_weight"] is not None else "task weight default"
            value = row["metrics"].get(metric)
            result = f", {metric} {value:.4f}" if isinstance(value, (int, float)) else ""
            loaded = " (loaded: completed earlier)" if row["status"] == "loaded" else ""
            lines.append(f"  {i}. {row['name']}: {terms}, {task_weight}; {row['steps']} steps{result} -> "
                         f"{row['output_dir']}{loaded}")
    lines += _seed_comparison(plan, metric)
    if final.peers:
        lines.append("")
        lines.append(f"Peers trained with the {final.label} (each saved as a student of its own): "
                     + ", ".join(f"{peer.name} -> {peer.output_dir}" for peer in final.peers))
    lines.append("")
    lines.append("Use the student:")
    if plan.task.inputs == "image" and _input_channels(final.trainer.student) == 1:
        # pipeline() converts every image to RGB, which a 1-channel model cannot take.
        lines.append("  (it takes 1-channel images, and pipeline() always feeds RGB: load it directly instead;")
        lines.append("   give both models 3 channels, the grey image repeated, to use pipeline())")
        lines.append(f"  from transformers import {plan.task.auto_class}")
        lines.append(f"  model = {plan.task.auto_class}.from_pretrained({plan.output_dir!r})")
        lines += [f"  {peer.name} = {plan.task.auto_class}.from_pretrained({peer.output_dir!r})" for peer in final.peers]
    else:
        lines.append("  from transformers import pipeline")
        name = card.pipeline_variable(plan.task.pipeline_tag)
        lines.append(f"  {name} = pipeline({plan.task.pipeline_tag!r}, model={plan.output_dir!r})")
        lines += [f"  {peer.name} = pipeline({plan.task.pipeline_tag!r}, model={peer.output_dir!r})"
                  for peer in final.peers]
    return "\n".join(lines)


def _input_channels(model: Any) -> int | None:
    """Image channels a saved student expects (timm pretrained_cfg or a transformers vision config)."""
    config = getattr(model, "config", None)
    pretrained_cfg = getattr(config, "pretrained_cfg", None)
    if isinstance(pretrained_cfg, dict) and pretrained_cfg.get("input_size"):
        return int(pretrained_cfg["input_size"][0])
    return getattr(config, "num_channels", None)


def _seed_comparison(plan: Plan, metric: str = "accuracy") -> list[str]:
    """Distilled vs no-teacher metric, per seed and as mean +- std when several seeds ran (computed once, by
    :func:`hfdistill.summary.compare_seeds`, which the card, the plots and the trackers read too)."""
    from .summary import compare_seeds

    comparison = compare_seeds(plan.jobs, metric, getattr(plan.task, "greater_is_better", True))
    return comparison.lines() if comparison is not None else []


def _device_name(trainer: Any) -> str:
    import torch

    device = trainer.args.device
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type}, {torch.get_num_threads()} threads"


def _print(text: str) -> None:
    # Under `accelerate launch` every process runs this code: only the main one talks.
    if processes.is_main_process():
        print(text, flush=True)
