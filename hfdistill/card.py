"""The model card of a distilled student (``README.md``), from plain values.

:func:`build_model_card` takes ids, metric dicts, parameter counts, sizes, latencies and the recipe,
and returns a ``huggingface_hub.ModelCard`` whose metadata has been validated by ``ModelCardData``:
``library_name``, ``pipeline_tag``, ``tags``, ``datasets``, ``license`` (the teacher's, where known),
``base_model`` and a ``model-index`` with the evaluation results. The body (``templates/modelcard.md``)
names the teacher and student, each recipe term with its weight and paper (from the loss registry),
the compression, teacher vs student metrics, the command to reproduce and how to load it. A student trained
with peers (DML) lists them and their metrics beside its own (``peers``); a peer's own card says whose
peer it is (``peer_of``). When the run also trained the student alone (``student.baseline``), the card shows
that baseline beside the distilled student, clearly labelled, with the seeds' values and one plain sentence
of what distillation was worth (``baseline_metrics``, ``comparison``: a
:class:`hfdistill.summary.SeedComparison`'s data); the model-index (metadata) holds the distilled student's
metrics only. Pictures written next to the student (:mod:`hfdistill.plots`) are embedded with relative links
(``plots``), or one line says why there are none (``plots_note``).

:func:`write_model_card` writes ``README.md`` plus ``distill_results.json``, the same values as data
(the metrics travel with the student, and ``hfdistill push`` can re-render the card for another repo).

This module builds the card; it does not talk to the Hub. Writing a whole result folder and pushing it
is :mod:`hfdistill.publish`; sizes and their formats come from :mod:`hfdistill.summary`, file names from
:mod:`hfdistill.outputs`.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Mapping

from .outputs import ALL_RESULTS_NAME, CARD_NAME, EVAL_RESULTS_NAME, RECIPE_NAME, RESULTS_NAME, hub_repo_id
from .summary import COMPARISON_PREFIX, SeedComparison, folder_stats, format_bytes, format_count
from .summary import model_stats  # noqa: F401 - re-exported

TEMPLATE_PATH = Path(__file__).parent / "templates" / "modelcard.md"
BASE_TAGS = ["hfdistill", "knowledge-distillation", "distillation"]
# Trainer metrics that describe the run, not the model.
RUN_METRICS = ("runtime", "samples_per_second", "steps_per_second", "epoch", "total_flos", "model_preparation_time")
ARXIV = re.compile(r"arXiv:(\d{4}\.\d{4,5})")
TASK_OF_ARCHITECTURE = (
    ("ForImageClassification", "image-classification"),
    ("ForSequenceClassification", "text-classification"),
    ("ForTokenClassification", "token-classification"),
    ("ForQuestionAnswering", "question-answering"),
    ("ForCausalLM", "text-generation"),
    ("ForSemanticSegmentation", "image-segmentation"),
    ("ForObjectDetection", "object-detection"),
    ("ForMaskedLM", "fill-mask"),
    ("ForConditionalGeneration", "text2text-generation"),
    ("ForAudioClassification", "audio-classification"),
)
EXAMPLE_INPUT = {
    "image-classification": '"https://huggingface.co/datasets/huggingface/documentation-images/resolve/main/pipeline-cat-chonk.jpeg"',
    "text-classification": '"This was a great way to spend an evening."',
    "token-classification": '"My name is Clara and I live in Berkeley."',
    "fill-mask": '"Paris is the [MASK] of France."',
    "text-generation": '"Once upon a time"',
    "image-segmentation": '"https://huggingface.co/datasets/huggingface/documentation-images/resolve/main/pipeline-cat-chonk.jpeg"',
    "object-detection": '"https://huggingface.co/datasets/huggingface/documentation-images/resolve/main/pipeline-cat-chonk.jpeg"',
}


# ----------------------------------------------------------------------------- small helpers

def pipeline_variable(pipeline_tag: str | None) -> str:
    """The variable a usage snippet names the pipeline of ``pipeline_tag`` (card and run summary alike)."""
    if pipeline_tag and "classification" in pipeline_tag:
        return "classifier"
    return {"image-segmentation": "segmenter", "object-detection": "detector",
            "text-generation": "generator"}.get(pipeline_tag or "", "pipe")

def read_json(path: str | os.PathLike) -> dict:
    """A JSON object from ``path``; ``{}`` when it is missing, unreadable or not an object."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _pipeline_tag(tag: str | None) -> str | None:
    """A pipeline tag, or a recipe's task name turned into its pipeline tag (semantic-segmentation ->
    image-segmentation, from the tasks table)."""
    from .tasks import TASKS

    return TASKS[tag].pipeline_tag if tag in TASKS else tag


def task_of_architecture(architecture: str | None) -> str | None:
    """The pipeline tag of a transformers architecture name (``BertForSequenceClassification`` -> text-classification)."""
    for suffix, task in TASK_OF_ARCHITECTURE:
        if architecture and architecture.endswith(suffix):
            return task
    return None


def split_metrics(metrics: Mapping[str, Any] | None, prefix: str = "eval") -> tuple[dict[str, float], dict[str, float]]:
    """Trainer metrics -> (student, teacher) dicts of model-quality numbers with bare names.

    ``eval_accuracy`` -> student ``accuracy``, ``eval_teacher_accuracy`` -> teacher ``accuracy``; run
    statistics (runtime, samples per second, epoch) are left out. Bare names are kept as given.
    """
    student: dict[str, float] = {}
    teacher: dict[str, float] = {}
    for key, value in (metrics or {}).items():
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        name, target = key, student
        if name.startswith(f"{prefix}_teacher_"):
            name, target = name[len(f"{prefix}_teacher_"):], teacher
        elif name.startswith("teacher_"):
            name, target = name[len("teacher_"):], teacher
        elif name.startswith(f"{prefix}_"):
            name = name[len(f"{prefix}_"):]
        elif name.startswith(("train_", "test_")) or key in ("loss", "learning_rate", "grad_norm"):
            continue
        if value == -1 and name.startswith(("map", "mar")):
            continue  # torchmetrics' mAP/mAR of an area range without objects: no number (COCO's -1)
        if name.endswith(RUN_METRICS) or name in RUN_METRICS:
            continue
        target[name] = float(value)
    return student, teacher


def format_metric(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.4f}" if abs(value) < 1000 else f"{value:.1f}"


def _ratio(teacher: float | None, student: float | None, word: str) -> str:
    if not teacher or not student:
        return "-"
    return f"{teacher / student:.1f}x {word}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _link(model_id: str | None) -> str | None:
    repo = hub_repo_id(model_id) if model_id else None
    if repo and "/" not in repo:  # a model built from a config is named by its class (GPT2LMHeadModel): no page
        import transformers

        if hasattr(transformers, repo):
            return None
    return f"https://huggingface.co/{repo}" if repo else None


def _recipe_data(recipe: Any) -> dict:
    if recipe is None:
        return {}
    if hasattr(recipe, "to_dict"):
        return recipe.to_dict()
    return dict(recipe)


def _taps(value: Any, default: str | None) -> str:
    if value is None:
        return f"`{default}`" if default else "-"
    if isinstance(value, list):
        return ", ".join(f"`{v}`" for v in value)
    return f"`{value}`"


def _stages(recipe: Mapping[str, Any]) -> list[tuple[str | None, list[dict], Any, Any]]:
    """``(stage name, terms, task weight, train)`` per stage; one unnamed stage for a recipe without stages."""
    if recipe.get("stages"):
        return [(stage.get("name"), stage.get("terms") or [], stage.get("task_weight", recipe.get("task_weight")),
                 stage.get("train")) for stage in recipe["stages"]]
    return [(None, recipe.get("terms") or [], recipe.get("task_weight"), None)]


def _terms(recipe: Mapping[str, Any]) -> tuple[str | None, list[dict], str]:
    """The terms table (a Stage column for staged recipes), the papers of the methods used, and the loss formula."""
    from . import losses
    from .recipe import TermSpec, term_name

    stages = _stages(recipe)
    staged = bool(recipe.get("stages"))
    rows, papers, seen, formulas = [], [], set(), []
    for stage_name, terms, task_weight, train in stages:
        specs = [TermSpec(**t) for t in terms]
        task_weight = 1.0 if task_weight is None else task_weight
        parts = [f"{task_weight:g} * task loss"] if task_weight else []
        for index, spec in enumerate(specs):
            name = term_name(spec, index, specs)
            try:
                info = losses.get_info(spec.loss)
            except KeyError:
                info = None
            default = info.default_tap if info else None
            params = ", ".join(f"{k}={v}" for k, v in spec.params.items()) or "-"
            paper = info.paper if info else "-"
            row = [f"`{name}`", f"`{spec.loss}`", f"{spec.weight:g}", _taps(spec.student, default),
                   _taps(spec.teacher, default), f"`{spec.adapter}`" if spec.adapter else "-", params, _cite(paper)]
            rows.append([f"`{stage_name}`", *row] if staged else row)
            parts.append(f"{spec.weight:g} * {name}")
            if info and spec.loss not in seen:
                seen.add(spec.loss)
                papers.append({"name": spec.loss, "description": info.description, "citation": _cite(info.paper)})
        formula = " + ".join(parts) or "0"
        if staged:
            trains = f" (trains {', '.join(train)})" if train else ""
            formula = f"stage {stage_name}: {formula}{trains}"
        formulas.append(formula)
    table = None
    if rows:
        header = ["Term", "Method", "Weight", "Student tap", "Teacher tap", "Adapter", "Parameters", "Paper"]
        table = _table(["Stage", *header] if staged else header, rows)
    return table, papers, "; then ".join(formulas)


def _cite(paper: str) -> str:
    """A paper string with its arXiv id turned into a link (the Hub then lists the paper on the model page)."""
    return ARXIV.sub(lambda m: f"[arXiv:{m.group(1)}](https://arxiv.org/abs/{m.group(1)})", paper)


def _arxiv_ids(recipe: Mapping[str, Any]) -> list[str]:
    from . import losses

    ids = []
    for term in (t for _, terms, _, _ in _stages(recipe) for t in terms):
        try:
            ids += ARXIV.findall(losses.get_info(term["loss"]).paper)
        except KeyError:
            pass
    return list(dict.fromkeys(ids))


def _versions() -> str:
    import importlib.metadata as md

    out = []
    for package in ("hfdistill", "transformers", "timm", "torch", "huggingface_hub"):
        try:
            out.append(f"- {package} {md.version(package)}")
        except md.PackageNotFoundError:
            pass
    return "\n".join(out)


def _default_command(recipe: Mapping[str, Any]) -> str:
    if recipe.get("student") and recipe.get("data"):
        return f"hfdistill train {RECIPE_NAME}"
    return (f"# trained with the Python API (DistillationTrainer); {RECIPE_NAME} holds its terms.\n"
            f"# Add `teacher`, `student` and `data` to it to rerun with `hfdistill train {RECIPE_NAME}`.")


def model_name(model: Any) -> str | None:
    """What a model object is, for the card: its Hub id, else ``timm:<architecture>`` or its class name.

    Local folders are not named (they mean nothing to the card's readers, and may reveal paths).
    """
    if model is None:
        return None
    config = getattr(model, "config", None)
    name = getattr(model, "name_or_path", None) or getattr(config, "_name_or_path", None)
    if name and hub_repo_id(name):
        return name
    if getattr(config, "model_type", None) == "timm_wrapper":
        return f"timm:{config.architecture}"
    pretrained_cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(pretrained_cfg, dict) and pretrained_cfg.get("architecture"):
        return f"timm:{pretrained_cfg['architecture']}"
    architectures = getattr(config, "architectures", None)
    return architectures[0] if architectures else type(model).__name__


def metrics_from_log_history(log_history: list[dict]) -> tuple[dict, dict, dict]:
    """(final training metrics, last student evaluation, last teacher evaluation) from ``trainer.state.log_history``."""
    train: dict = {}
    student: dict = {}
    teacher: dict = {}
    for entry in log_history:
        if "train_runtime" in entry or "train_loss" in entry:
            train = {k: v for k, v in entry.items() if k.startswith("train_") or k in ("epoch", "total_flos")}
        evals = {k: v for k, v in entry.items() if k.startswith("eval_") and not k.startswith(COMPARISON_PREFIX)}
        own = {k: v for k, v in evals.items() if not k.startswith("eval_teacher_")}
        if own:
            student = {**own, **({"epoch": entry["epoch"]} if "epoch" in entry else {})}
        if len(own) < len(evals):
            teacher = {k: v for k, v in evals.items() if k.startswith("eval_teacher_")}
    return train, student, teacher


# ----------------------------------------------------------------------------- the card
def build_model_card(
    *,
    model_id: str,
    recipe: Any = None,
    student_id: str | None = None,
    teacher_id: str | None = None,
    student_pretrained: bool = False,
    pipeline_tag: str | None = None,
    library_name: str = "transformers",
    dataset: str | None = None,
    license: str | None = None,
    base_model: str | list[str] | None = None,
    language: str | list[str] | None = None,
    tags: list[str] | None = None,
    label_names: list[str] | None = None,
    student_metrics: Mapping[str, float] | None = None,
    teacher_metrics: Mapping[str, float] | None = None,
    student_params: int | None = None,
    teacher_params: int | None = None,
    student_size_bytes: int | None = None,
    teacher_size_bytes: int | None = None,
    student_latency_ms: float | None = None,
    teacher_latency_ms: float | None = None,
    latency_setup: str | None = None,
    command: str | None = None,
    training_hyperparameters: Mapping[str, Any] | None = None,
    peers: list[Mapping[str, Any]] | None = None,
    peer_of: str | None = None,
    chat: bool = False,
    baseline_metrics: Mapping[str, float] | None = None,
    comparison: Mapping[str, Any] | None = None,
    plots: list[Mapping[str, Any]] | None = None,
    plots_note: str | None = None,
    data_summary: str | None = None,
    data_note: str | None = None,
    **unused: Any,
):
    """The model card of a distilled student, as a validated ``huggingface_hub.ModelCard``.

    Args:
        model_id: the student's repo id (``user/name``) or name; used in the title and the snippets.
        recipe: the :class:`~hfdistill.Recipe` (or its dict) the student was made with.
        student_id / teacher_id: what the student and teacher were (Hub ids, ``timm:`` names, folders).
        student_pretrained: the student started from ``student_id``'s pretrained weights.
        pipeline_tag / library_name: e.g. ``image-classification`` and ``timm`` or ``transformers``.
        dataset: the training data (a Hub dataset id, or a name such as ``sklearn-digits``).
        license: the student's license; pass the teacher's (:func:`hfdistill.hub.model_license`).
        base_model: Hub id(s) the student derives from; default: ``student_id`` when pretrained, else
            the teacher, when they are Hub ids.
        student_metrics / teacher_metrics: evaluation metrics; trainer dicts (``eval_accuracy``,
            ``eval_teacher_accuracy``) are split and cleaned with :func:`split_metrics`.
        student_params / teacher_params, student_size_bytes / teacher_size_bytes: the compression.
        student_latency_ms / teacher_latency_ms, latency_setup: measured latency per batch, and how
            (``"on an H100, batch 64, bf16"``).
        command: the command that reproduces the run (default: ``hfdistill train distill_recipe.yaml``).
        training_hyperparameters: a few TrainingArguments values to show.
        peers: the networks trained together with this student (DML's peers), each ``{"name", "folder",
            "metrics"}`` (``folder`` relative to this folder's parent; ``metrics`` as ``student_metrics``):
            a column of the results table each, and a section saying where they are.
        peer_of: for a peer's own card, the name of the student it was trained with.
        chat: a text-generation student whose tokenizer has a chat template: the usage snippet also shows a
            conversation passed to the pipeline.
        baseline_metrics: the evaluation metrics of the same student trained alone, without the teacher
            (``student.baseline``; the published student's seed), as ``student_metrics``: a column of the
            results table labelled as the baseline. Never in the model-index.
        comparison: :meth:`hfdistill.summary.SeedComparison.to_dict` (distilled vs. alone per seed): the
            per-seed table, mean +- std, and the sentence of what the gain was worth.
        plots: pictures in the student folder, ``{"path" (relative), "alt", "caption", "kind"}``
            (:func:`hfdistill.plots.write_run_plots`); ``kind`` ``losses`` goes with the recipe, the rest with
            the results. plots_note: one line shown instead (e.g. matplotlib is not installed).
        data_note: a sentence about the data shown with the results (synthetic scenes say so).
    """
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    recipe_data = _recipe_data(recipe)
    pipeline_tag = _pipeline_tag(pipeline_tag)
    student_eval, teacher_from_student = split_metrics(student_metrics)
    # Teacher metrics may come bare (`accuracy`), as evaluate() logs them (`eval_teacher_accuracy`) or as `eval_*`.
    teacher_plain, teacher_prefixed = split_metrics(teacher_metrics)
    teacher_eval = {**teacher_from_student, **teacher_plain, **teacher_prefixed}

    dataset_id = hub_repo_id(dataset) if dataset and "/" in dataset else None
    if base_model is None:
        candidates = [student_id if student_pretrained else None, teacher_id]
        base_model = next((hub_repo_id(c) for c in candidates if c and hub_repo_id(c) and "/" in hub_repo_id(c)), None)
    tag_list = list(dict.fromkeys([*BASE_TAGS, *(tags or []), *(["timm", "transformers"] if library_name == "timm" else [])]))
    tag_list += [f"arxiv:{i}" for i in _arxiv_ids(recipe_data) if f"arxiv:{i}" not in tag_list]

    eval_results = None
    metrics_for_index = {k: v for k, v in student_eval.items() if not k.endswith("loss")}
    if metrics_for_index and pipeline_tag:
        name = dataset or "evaluation data"
        eval_results = [
            EvalResult(task_type=pipeline_tag, dataset_type=dataset_id or name, dataset_name=name,
                       dataset_split="validation", metric_type=metric, metric_name=metric, metric_value=round(value, 6))
            for metric, value in metrics_for_index.items()
        ]
    card_data = ModelCardData(
        library_name=library_name,
        pipeline_tag=pipeline_tag,
        license=license,
        base_model=base_model,
        datasets=[dataset_id] if dataset_id else None,
        language=language,
        tags=tag_list,
        metrics=list(metrics_for_index) or None,
        model_name=model_id,
        eval_results=eval_results,
    )

    terms_table, papers, formula = _terms(recipe_data)
    compression_rows = []
    if student_params or teacher_params:
        compression_rows.append(["Parameters", format_count(teacher_params), format_count(student_params),
                                 _ratio(teacher_params, student_params, "fewer")])
    if student_size_bytes or teacher_size_bytes:
        compression_rows.append(["Weights size", format_bytes(teacher_size_bytes), format_bytes(student_size_bytes),
                                 _ratio(teacher_size_bytes, student_size_bytes, "smaller")])
    if student_latency_ms or teacher_latency_ms:
        compression_rows.append(["Latency", f"{teacher_latency_ms:.2f} ms" if teacher_latency_ms else "-",
                                 f"{student_latency_ms:.2f} ms" if student_latency_ms else "-",
                                 _ratio(teacher_latency_ms, student_latency_ms, "faster")])
    peer_list = [dict(peer) for peer in peers or []]
    peer_evals = [split_metrics(peer.get("metrics"))[0] for peer in peer_list]
    baseline_eval = split_metrics(baseline_metrics)[0] if baseline_metrics else {}
    seeds = SeedComparison.from_dict(comparison)
    names = list(dict.fromkeys([*student_eval, *teacher_eval, *baseline_eval,
                                *(m for values in peer_evals for m in values)]))
    names.sort(key=lambda m: m.endswith("loss"))  # quality metrics first, losses after
    baseline_cells = (lambda m: [format_metric(baseline_eval.get(m))]) if baseline_eval else (lambda m: [])
    results_rows = [[m, format_metric(teacher_eval.get(m)), *baseline_cells(m), format_metric(student_eval.get(m)),
                     *(format_metric(values.get(m)) for values in peer_evals)] for m in names]
    results_header = ["Metric", "Teacher", *(["Student alone (baseline, no teacher)"] if baseline_eval else []),
                      "Distilled student" if baseline_eval else "Student",
                      *(f"Peer `{peer['name']}`" for peer in peer_list)]
    plot_list = [dict(plot) for plot in plots or []]
    hyper_rows = [[f"`{k}`", str(v)] for k, v in (training_hyperparameters or {}).items() if v is not None]

    snippet_input = EXAMPLE_INPUT.get(pipeline_tag or "", '"..."')
    variable = pipeline_variable(pipeline_tag)
    snippet = f'{variable} = pipeline("{pipeline_tag}", model="{model_id}")\n{variable}({snippet_input})'
    if chat and pipeline_tag == "text-generation":  # its tokenizer has a chat template: a conversation works too
        snippet += (f'\n{variable}([{{"role": "user", "content": "What is your favorite food?"}}], max_new_tokens=40)'
                    '[0]["generated_text"][-1]  # the assistant\'s reply')
    template_values = {
        "model_id": model_id,
        "teacher_id": teacher_id,
        "teacher_link": _link(teacher_id),
        "student_id": student_id,
        "student_pretrained": student_pretrained,
        "dataset": dataset,
        "data_summary": data_summary,
        "data_note": data_note,
        "loss_formula": formula,
        "terms_table": terms_table,
        "papers": papers,
        "compression_table": _table(["", "Teacher", "Student", "Ratio"], compression_rows) if compression_rows else None,
        "latency_setup": latency_setup,
        "results_table": _table(results_header, results_rows) if results_rows else None,
        "baseline_note": _baseline_note(seeds) if baseline_eval else None,
        "gain_sentence": _gain_sentence(seeds),
        "seeds_text": _seeds_text(seeds),
        "loss_plots": [p for p in plot_list if p.get("kind") == "losses"],
        "result_plots": [p for p in plot_list if p.get("kind") != "losses"],
        "plots_note": plots_note,
        "pipeline_tag": pipeline_tag,
        "pipeline_snippet": snippet,
        "library_name": library_name,
        "label_names": list(label_names) if label_names else None,
        "command": command or _default_command(recipe_data),
        "hyperparameters_table": _table(["Argument", "Value"], hyper_rows) if hyper_rows else None,
        "versions": _versions(),
    }
    card = ModelCard.from_template(card_data, template_path=str(TEMPLATE_PATH), **template_values)
    if peer_of:
        card.text = _insert_before(card.text, "## How it was distilled", _peer_of_text(model_id, peer_of))
    if peer_list:
        card.text = _insert_before(card.text, "## How to use",
                                   _peers_section(peer_list, peer_evals, pipeline_tag, variable))
    card.text = re.sub(r"\n{3,}", "\n\n", card.text).strip() + "\n"  # jinja blocks leave blank runs
    # Parse back what we wrote: the metadata must survive a round trip through ModelCardData.
    ModelCard(str(card))
    return card


def _gain_sentence(seeds: SeedComparison | None) -> str | None:
    if seeds is None:
        return None
    return f"**What distillation was worth:** {seeds.sentence}."


def _baseline_note(seeds: SeedComparison | None) -> str:
    first = f" (seed {seeds.seeds[0]}, as this model)" if seeds is not None else ""
    return ("*Student alone (baseline)* is not this model: it is the same student architecture trained on the same "
            f"data with the same schedule and seed{first}, without the teacher (`student.baseline`). It is there to "
            "show what the teacher added; the metadata (model-index) reports this model, the distilled student, only.")


def _seeds_text(seeds: SeedComparison | None) -> str | None:
    """The per-seed table (published seed first) and the mean +- std, when more than one seed ran."""
    if seeds is None or seeds.n < 2:
        return None
    data = seeds.to_dict()
    rows = [[f"{seed}" + (" (this model)" if i == 0 else ""), format_metric(a), format_metric(d), f"{g:+.2f}"]
            for i, (seed, a, d, g) in enumerate(zip(seeds.seeds, seeds.alone, seeds.distilled, seeds.gains))]
    rows.append(["mean ± std", f"{data['alone_mean']:.4f} ± {data['alone_std']:.4f}",
                 f"{data['distilled_mean']:.4f} ± {data['distilled_std']:.4f}",
                 f"{seeds.gain:+.2f} ± {seeds.gain_std:.2f}"])
    header = ["Seed", f"Student alone: {seeds.metric}", f"Distilled: {seeds.metric}", f"Gain ({seeds.unit})"]
    return (f"Both were trained with {seeds.n} seeds (the same initialisation per seed for both; only the teacher "
            f"differs):\n\n" + _table(header, rows))


def _insert_before(text: str, heading: str, block: str) -> str:
    """``block`` as its own paragraph before the line ``heading`` (at the end when the text has no such line)."""
    marker = f"\n{heading}\n"
    if marker in text:
        return text.replace(marker, f"\n{block}\n\n{heading}\n", 1)
    return f"{text.rstrip()}\n\n{block}\n"


def _peer_of_text(model_id: str, peer_of: str) -> str:
    return (f"{model_id} is a peer network trained together with the student `{peer_of}` by mutual learning (the "
            f"recipe's terms, below): it learned the task and from the other networks' predictions at the same time, "
            "and is a complete student of its own.")


def _peers_section(peers: list[dict], evals: list[dict[str, float]], pipeline_tag: str | None, variable: str) -> str:
    """The section of a student's card that lists the peers trained with it, their metrics and their folders."""
    metrics = list(dict.fromkeys(m for values in evals for m in values if not m.endswith("loss")))
    rows = [[f"`{peer['name']}`", f"`{peer.get('folder') or peer['name']}`",
             *(format_metric(values.get(m)) for m in metrics)] for peer, values in zip(peers, evals)]
    lines = [
        "## Peers",
        "",
        f"This student was trained together with {len(peers)} peer network{'s' if len(peers) > 1 else ''} of its "
        "architecture, each learning the task and from the others' predictions. Each peer was saved beside this "
        "folder as a complete student of its own (weights, config, processor, card), not in this repository.",
        "",
        _table(["Peer", "Folder", *metrics], rows),
    ]
    if pipeline_tag:
        folder = peers[0].get("folder") or peers[0]["name"]
        lines += ["", "A peer loads as this student does:", "", "```python",
                  f'{variable} = pipeline("{pipeline_tag}", model="{folder}")', "```"]
    return "\n".join(lines)


def write_model_card(output_dir: str | os.PathLike, **values: Any) -> Path:
    """Write ``README.md`` (see :func:`build_model_card` for the values) and ``distill_results.json``.

    ``distill_results.json`` holds the same values (minus the recipe, which is ``distill_recipe.yaml``),
    so the card can be rebuilt, e.g. for another repo id by ``hfdistill push``.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    card = build_model_card(**values)
    summary = {k: v for k, v in values.items() if k != "recipe" and v is not None}
    (output_dir / RESULTS_NAME).write_text(json.dumps(summary, indent=2, default=str) + "\n", encoding="utf-8")
    path = output_dir / CARD_NAME
    card.save(path)
    return path


# ----------------------------------------------------------------------------- from a folder
def summary_from_folder(folder: str | os.PathLike) -> dict[str, Any]:
    """Card values recoverable from a saved student folder: ``distill_results.json`` when present, else
    what ``config.json``, the weights and ``all_results.json``/``eval_results.json`` say."""
    folder = Path(folder)
    summary = read_json(folder / RESULTS_NAME)
    config = read_json(folder / "config.json")
    architecture = (config.get("architectures") or [None])[0]
    if "library_name" not in summary:
        summary["library_name"] = "timm" if config.get("model_type") == "timm_wrapper" else "transformers"
    if "pipeline_tag" not in summary:
        summary["pipeline_tag"] = task_of_architecture(architecture)
    if "label_names" not in summary:
        id2label = config.get("id2label") or {}
        if id2label:
            summary["label_names"] = [id2label[k] for k in sorted(id2label, key=lambda k: int(k))]
    if "student_id" not in summary:
        summary["student_id"] = config.get("architecture") or architecture
    if "student_metrics" not in summary:
        metrics = {**read_json(folder / EVAL_RESULTS_NAME), **read_json(folder / ALL_RESULTS_NAME)}
        if metrics:
            summary["student_metrics"] = metrics
    if "student_params" not in summary or "student_size_bytes" not in summary:
        params, size = folder_stats(folder)
        summary.setdefault("student_params", params)
        summary.setdefault("student_size_bytes", size)
    return {k: v for k, v in summary.items() if v is not None}


def refresh_card(folder: str | os.PathLike, model_id: str) -> Path | None:
    """Make sure ``folder`` has a card for ``model_id`` before a push.

    Writes one from :func:`summary_from_folder` and ``distill_recipe.yaml`` when there is none, and
    re-renders an hfdistill card that was made for another repo id; a hand-written card is kept.
    """
    from huggingface_hub import ModelCard

    folder = Path(folder)
    path = folder / CARD_NAME
    summary = summary_from_folder(folder)
    if path.is_file():
        try:
            data = ModelCard.load(path).data
        except Exception:
            return path  # not ours to fix
        if "hfdistill" not in (data.get("tags") or []) or summary.get("model_id") == model_id:
            return path
    recipe = None
    if (folder / RECIPE_NAME).is_file():
        import yaml

        recipe = yaml.safe_load((folder / RECIPE_NAME).read_text(encoding="utf-8"))
    summary["model_id"] = model_id
    return write_model_card(folder, recipe=recipe, **summary)
