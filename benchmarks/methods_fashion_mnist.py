#!/usr/bin/env python
"""Every distillation method that applies to a CNN pair, on Fashion-MNIST: one row per recipe.

The rows are the recipe files ``recipes/fashion_mnist/<method>.yaml`` (files starting with ``_`` are the
shared base, not methods), run as they are through the Python run API (:func:`hfdistill.run`, what
``hfdistill train`` does); the recipes are the single source of the terms, taps, adapters, weights,
stages and schedule. The benchmark only chooses where things are written and which seed runs, and,
when asked, makes runs shorter (``--epochs``, ``--train-samples``, ``--max-steps``, ``--quick``).

The pair (``_base.yaml``): teacher timm ``resnet18`` (3 input channels, 11.2M parameters) trained from
scratch once and cached; student the same architecture with ``channels=[16, 32, 64, 128]`` (0.71M
parameters, the same module names, narrower, so feature methods need adapters); native 28x28 images; a
fixed seeded subset of the 60k training images; evaluation on the 10k test images. Every row uses the
same teacher, the same student initialisation per seed, the same data and the same schedule.

    python benchmarks/methods_fashion_mnist.py                          # the committed results (~20 min, 2 CPU cores)
    python benchmarks/methods_fashion_mnist.py --only kd fitnet_two_stage --seeds 1
    python benchmarks/methods_fashion_mnist.py --quick                  # every recipe, a few steps (checks they all run)
    python benchmarks/methods_fashion_mnist.py --list                   # the rows and their terms
    python benchmarks/methods_fashion_mnist.py --plot-only              # the chart, from the committed .jsonl

Results go to ``--out`` (markdown) and a ``.jsonl`` of the runs next to it, rewritten after every run,
so partial results survive an interruption, and at the end a chart of each method's gain over the baseline
with its spread over seeds (``.png``, linked from the report; needs matplotlib: ``pip install
hfdistill[plots]``; ``--plot-only`` redraws it from the ``.jsonl`` without training); ``--resume`` skips runs
already in the ``.jsonl`` with the same settings. Teachers are trained into ``--cache-dir`` (the recipes' own
"train it first when the folder does not exist" chain) and reused from there.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks._common import guarded_run, load_average, log, machine_info  # noqa: E402  (the offline environment first)

import torch  # noqa: E402

from hfdistill import Recipe, losses  # noqa: E402

RECIPES = ROOT / "recipes" / "fashion_mnist"
BASE = RECIPES / "_base.yaml"
FIRST_SEED = 42
# Rows in this order (the rest after them, alphabetically): 3 seeds for MAIN_METHODS, 1 for the others.
ORDER = ("baseline", "kd", "dkd", "dist", "dist_plus", "logit_std_kd", "skd", "logits_mse", "tf_kd_self",
         "tf_kd_virtual", "dml", "fitnet", "fitnet_two_stage", "hnd", "ghnd", "at", "nst", "ft", "ft_two_stage", "ofd",
         "ab", "mgd", "afd", "kr", "srd", "ickd", "cwd", "cosine", "rkd", "pkt", "sp", "vid", "pad", "cc", "irg", "fsp",
         "kdsvd", "crd", "sskd", "sobolev", "lwm", "bss")
MAIN_METHODS = ("baseline", "kd", "dkd", "fitnet", "at")

# Methods that read transformer-only outputs (hidden states, attention maps, a distillation token).
TRANSFORMER_ONLY = {
    "forward_kl": "token-level KL for causal LMs: reads [B, T, V] logits and causal-LM labels",
    "reverse_kl": "token-level reverse KL for causal LMs: reads [B, T, V] logits and causal-LM labels",
    "jsd": "GKD's generalised JSD per token for causal LMs: reads [B, T, V] logits and causal-LM labels",
    "tvd": "token-level total variation for causal LMs: reads [B, T, V] logits and causal-LM labels",
    "skew_kl": "DistiLLM's skew KL per token for causal LMs: reads [B, T, V] logits and causal-LM labels",
    "skew_reverse_kl": "DistiLLM's skew reverse KL per token for causal LMs: reads [B, T, V] logits and labels",
    "uld": "cross-tokenizer logit distillation for causal LMs: reads [B, T, V] logits and causal-LM labels",
    "hidden_mse": "TinyBERT hidden-state MSE with a layer map: reads transformer hidden states",
    "attention_kl": "MiniLM attention-distribution KL: reads self-attention maps",
    "attention_mse": "TinyBERT attention MSE: reads self-attention maps",
    "embedding_mse": "TinyBERT embedding-layer MSE: reads the embedding output",
    "minilm_value_relation": "MiniLM value relation: reads self-attention values",
    "deit": "DeiT hard/soft distillation: needs a ViT student with a distillation token",
}
# Methods for dense prediction: they read per-pixel logits or per-query detections, which a classifier has not.
DENSE_ONLY = {
    "pixel_kd": "pixel-wise KD of segmentation logits: reads [B, K, H, W] score maps",
    "pairwise_affinity": "SKD's pair-wise affinity distillation: made for segmentation feature maps",
    "detection_logit_kd": "DETR-family query logit distillation: reads per-query class logits and boxes",
}
NO_ROW = {**TRANSFORMER_ONLY, **DENSE_ONLY}  # every registered method that has no row, and why
NOT_IMPLEMENTED: dict[str, str] = {}  # registered methods without a row here, and why

# The pair and data of every row, read from the shared base recipe (kept as names for older callers).
_BASE_RECIPE = Recipe.from_yaml(BASE)
IMAGE_SIZE = _BASE_RECIPE.data.image_size
STUDENT_KWARGS = dict(_BASE_RECIPE.student.kwargs)
TEACHER_KWARGS = dict(_BASE_RECIPE.teacher.train_from.kwargs)


def _aliases() -> dict[str, str]:
    """Registered names no recipe uses whose method (the same class) a recipe runs under another name."""
    used: dict[type, str] = {}
    for path in RECIPES.glob("*.yaml"):
        if not path.name.startswith("_"):
            for stage in Recipe.from_yaml(path).stage_list():
                for term in stage.terms:
                    used.setdefault(losses.get_info(term.loss).cls, term.loss)
    names = {n for n in used.values()}
    return {name: used[losses.get_info(name).cls] for name in losses.available()
            if name not in names and losses.get_info(name).cls in used}


# Registered names that are another name of a benchmarked method (same class): listed, not run twice.
ALIASES = _aliases()


# ------------------------------------------------------------------------------------ the rows
def recipe_files() -> dict[str, Path]:
    """``{method: recipe path}`` for every method recipe, in the table's order."""
    files = {p.stem: p for p in RECIPES.glob("*.yaml") if not p.name.startswith("_")}
    ordered = [m for m in ORDER if m in files] + sorted(set(files) - set(ORDER))
    return {m: files[m] for m in ordered}


def source_of(path: Path) -> str:
    """The recipe's ``# Settings:`` comment (where its values come from), joined into one line."""
    lines, taking = [], False
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        text = line[1:].strip()
        if text.startswith("Settings:"):
            taking, text = True, text[len("Settings:"):].strip()
        elif taking and (not text or text.endswith(":") or text.startswith(("hfdistill ", "Models,", "What it"))):
            break
        if taking:
            lines.append(text)
    return " ".join(lines).rstrip(".") or "see the recipe"


def teacher_kind(recipe: Recipe) -> str | None:
    """``teacher`` (the ResNet-18), ``self_teacher`` (a pre-trained student) or None (no teacher)."""
    return Path(recipe.teacher.name).name if recipe.teacher is not None else None


def methods(epochs: float | None = None) -> dict[str, dict]:
    """Every row as plain data read from its recipe: terms (or stages), task weight, teacher kind, source.

    (``epochs`` is ignored: the recipes hold their schedule; kept for older callers.)
    """
    specs = {}
    for method, path in recipe_files().items():
        recipe = Recipe.from_yaml(path)
        data = recipe.to_dict()
        kind = teacher_kind(recipe)
        spec = {"task_weight": recipe.task_weight, "source": source_of(path),
                "teacher": {"teacher": "teacher", "self_teacher": "self"}.get(kind, kind)}
        if recipe.stages:
            spec["stages"] = data["stages"]
            spec["terms"] = [term for stage in data["stages"] for term in stage.get("terms", [])]  # every stage's
        else:
            spec["terms"] = data.get("terms", [])
        specs[method] = spec
    return specs


def describe_terms(spec: dict, task_loss: str = "CE") -> str:
    """One line of a row's terms: ``CE 0.1 + 0.9 kd (temperature=4.0)``; stages joined by ``; then``
    (``task_loss``: the name of the student's own loss, cross-entropy here)."""
    if "stages" in spec:
        parts = []
        for stage in spec["stages"]:
            weight = stage.get("task_weight", spec.get("task_weight"))
            text = describe_terms({"terms": stage.get("terms", []), "task_weight": 1.0 if weight is None else weight},
                                  task_loss)
            trains = f", trains {'+'.join(stage['train'])}" if stage.get("train") else ""
            parts.append(f"stage {stage['name']}: {text}{trains}")
        return "; then ".join(parts).replace("|", "/")
    terms = spec.get("terms") or []
    task_weight = 1.0 if spec.get("task_weight") is None else spec["task_weight"]
    if not terms:
        return f"{task_loss} {task_weight:g}"
    parts = [f"{task_loss} {task_weight:g}"] if task_weight else []
    for term in terms:
        taps = ""
        if term.get("student") is not None:
            s, t = term["student"], term.get("teacher", term["student"])
            s = "+".join(s) if isinstance(s, list) else s
            t = "+".join(t) if isinstance(t, list) else t
            taps = f" {s}" if s == t else f" {s}->{t}"
        adapter = f" via {term['adapter']}" if term.get("adapter") else ""
        params = ", ".join(f"{k}={v}" for k, v in term.get("params", {}).items())
        params = f" ({params})" if params else ""
        parts.append(f"{term.get('weight', 1.0):g} {term['loss']}{taps}{adapter}{params}")
    return " + ".join(parts).replace("|", "/")


# ------------------------------------------------------------------------------------ running
def machine() -> dict[str, str]:
    import timm

    return machine_info(timm=timm.__version__)


def length_overrides(args: argparse.Namespace) -> dict:
    """The overrides that make every run shorter (empty: the recipes as they are)."""
    overrides = {}
    if args.epochs is not None:
        overrides["training.num_train_epochs"] = args.epochs
    if args.max_steps is not None:
        overrides["training.max_steps"] = args.max_steps
    if args.train_samples is not None:
        overrides["data.max_train_samples"] = args.train_samples
    if args.eval_samples is not None:
        overrides["data.max_eval_samples"] = args.eval_samples
    return overrides


def negatives_overrides(recipe: Recipe, train_samples: int | None) -> dict:
    """On a shortened training set, CRD's negatives per example (``nce_k``) capped below the examples it has."""
    if train_samples is None:
        return {}
    overrides = {}
    stages = recipe.stages or [recipe]
    for i, stage in enumerate(stages):
        for j, term in enumerate(stage.terms):
            if term.loss == "crd" and term.params.get("nce_k", 16384) >= train_samples:
                where = f"stages.{i}.terms.{j}" if recipe.stages else f"terms.{j}"
                overrides[f"{where}.params.nce_k"] = train_samples - 1
    return overrides


class Bench:
    """Runs one recipe for one seed through hfdistill.run, with the teachers cached in ``cache_dir``."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.overrides = length_overrides(args)
        self.settings = {"overrides": self.overrides, "teacher_epochs": args.teacher_epochs,
                         "teacher_max_steps": args.teacher_max_steps}
        self.cache = Path(args.cache_dir)
        self.workdir = tempfile.mkdtemp(prefix="hfdistill-bench-")
        self.teachers: dict[str, dict] = {}  # teacher folder -> {"accuracy", "train_seconds"}

    def teacher_info(self, folder: Path) -> dict | None:
        if str(folder) not in self.teachers:
            marker = folder / "benchmark_teacher.json"
            if marker.is_file():
                self.teachers[str(folder)] = json.loads(marker.read_text())
        return self.teachers.get(str(folder))

    def run(self, method: str, path: Path, seed: int) -> dict:
        import hfdistill

        recipe = Recipe.from_yaml(path)
        output_dir = os.path.join(self.workdir, f"{method}-{seed}")
        overrides = {**self.overrides, **negatives_overrides(recipe, self.args.train_samples),
                     "training.output_dir": output_dir, "training.seed": seed,
                     "training.disable_tqdm": True, "training.use_cpu": not torch.cuda.is_available()}
        teacher_folder = None
        if recipe.teacher is not None:
            kind = teacher_kind(recipe)
            teacher_folder = self.cache / kind
            overrides["teacher.name"] = str(teacher_folder)
            if recipe.teacher.train_from is not None:
                if self.args.teacher_epochs is not None and kind == "teacher":
                    overrides["teacher.train_args.num_train_epochs"] = self.args.teacher_epochs
                if self.args.teacher_max_steps is not None:
                    overrides["teacher.train_args.max_steps"] = self.args.teacher_max_steps
            # The teacher is frozen: evaluate it once per folder, not in every row.
            overrides["training.evaluate_teacher"] = self.teacher_info(teacher_folder) is None
        record = {"method": method, "seed": seed, "settings": self.settings}
        start = time.perf_counter()
        result = hfdistill.run(path, overrides=overrides, print_summary=False)
        record["wall_seconds"] = time.perf_counter() - start
        final = result.plan.final
        teacher_job = next((j for j in result.jobs if j.label == "teacher"), None)
        if teacher_folder is not None and self.teacher_info(teacher_folder) is None:
            info = {"accuracy": result.metrics.get("eval_teacher_accuracy"),
                    "train_seconds": teacher_job.stages[0].train_metrics.get("train_runtime") if teacher_job else None}
            if teacher_job is not None and info["accuracy"] is None:
                info["accuracy"] = teacher_job.metrics.get("eval_accuracy")
            self.teachers[str(teacher_folder)] = info
            (teacher_folder / "benchmark_teacher.json").write_text(json.dumps(info, indent=2))
        record["train_seconds"] = sum(s.train_metrics.get("train_runtime", 0.0) for s in final.stages)
        record["eval_seconds"] = final.metrics.get("eval_runtime")
        record["accuracy"] = result.metrics["eval_accuracy"]
        record["eval_loss"] = result.metrics.get("eval_loss")
        record["steps"] = sum(s.global_step or 0 for s in final.stages)
        record["stages"] = [{"name": s.name, "steps": s.global_step, "accuracy": s.metrics.get("eval_accuracy")}
                            for s in final.stages]
        logs = [h for h in final.trainer.state.log_history if "loss" in h and "eval_loss" not in h]
        record["last_log"] = {k: v for k, v in (logs[-1] if logs else {}).items() if k.startswith("loss")}
        first = [h for h in final.stages[0].trainer.state.log_history if "loss" in h and "eval_loss" not in h]
        record["first_log"] = {k: v for k, v in (first[0] if first else {}).items() if k.startswith("loss")}
        shutil.rmtree(output_dir, ignore_errors=True)
        shutil.rmtree(f"{output_dir}-stages", ignore_errors=True)
        return record


# ------------------------------------------------------------------------------------ report
def mean_std(values: list[float]) -> tuple[float, float | None]:
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else None)


def schedule(recipe: Recipe, overrides: dict) -> str:
    training = {**recipe.training, **{k.split(".", 1)[1]: v for k, v in overrides.items() if k.startswith("training.")}}
    epochs = f"{training.get('num_train_epochs'):g} epochs"
    if training.get("max_steps"):
        epochs += f" (max_steps {training['max_steps']})"
    clip = training.get("max_grad_norm", 1.0)
    return (f"{epochs}, batch {training.get('per_device_train_batch_size')}, {training.get('optim', 'adamw')} "
            f"({training.get('optim_args', '')}), lr {training.get('learning_rate'):g} with "
            f"{training.get('lr_scheduler_type', 'linear')} decay, weight decay {training.get('weight_decay', 0):g}, "
            + ("no gradient clipping" if not clip else f"gradient clipping at norm {clip:g}"))


def write_report(path: Path, records: list[dict], specs: dict, info: dict, chart: Path | None = None) -> None:
    ok = [r for r in records if "accuracy" in r]
    failed = [r for r in records if "error" in r]
    diverged_runs = [r for r in records if "diverged" in r]
    by_method: dict[str, list[dict]] = {}
    for r in ok:
        by_method.setdefault(r["method"], []).append(r)
    base = by_method.get("baseline")
    base_mean, base_std = mean_std([r["accuracy"] for r in base]) if base else (None, None)
    recipe = _BASE_RECIPE
    overrides = info["overrides"]
    train_samples = overrides.get("data.max_train_samples", recipe.data.max_train_samples) or 60000
    eval_samples = overrides.get("data.max_eval_samples", recipe.data.max_eval_samples) or 10000
    teacher = info.get("teacher") or {}
    teacher_acc = teacher.get("accuracy")
    teacher_epochs = info.get("teacher_epochs") or recipe.teacher.train_args.get("num_train_epochs")

    lines = [
        "# Distillation methods on Fashion-MNIST (CNN pair)",
        "",
        "Produced by `benchmarks/methods_fashion_mnist.py`, which runs each recipe of `recipes/fashion_mnist/` "
        "through `hfdistill.run` (rerun it to reproduce; see the command below).",
        "",
        "- **Teacher**: timm `resnet18` (3 input channels: the grey image repeated, 10 classes, 11.2M parameters), "
        f"trained from scratch on the same subset for {teacher_epochs:g} epochs (`_base.yaml`'s `teacher.train_args`)"
        + (f", at most {info['teacher_max_steps']} steps" if info.get("teacher_max_steps") else "")
        + (f": **test accuracy {teacher_acc:.4f}**" if teacher_acc is not None else "")
        + (f" (trained in {teacher['train_seconds']:.0f} s)." if teacher.get("train_seconds") else " (cached)."),
        "- **Student**: timm `resnet18` with `channels=[16, 32, 64, 128]` (0.71M parameters; same module names, "
        "narrower, so feature terms use adapters or width-free losses).",
        f"- **Data**: Fashion-MNIST, {train_samples} training images (a fixed seeded subset), native 28x28, "
        f"pad-and-crop + horizontal flip; evaluation on {eval_samples} test images.",
        f"- **Schedule (every row, from `_base.yaml`)**: {schedule(recipe, overrides)}; two-stage rows add their "
        f"first stage's epochs. Seeds {info['main_seeds']} for {', '.join(MAIN_METHODS)}; seed {FIRST_SEED} for "
        "the rest. Same student initialisation per seed in every row.",
        f"- **Machine**: {info['machine']['cpu']}, {info['machine']['cores']} cores (1-minute load average "
        f"{load_average():.1f} when this was written; a load above the core count would mean other work shared the cores "
        f"and inflated the times), torch {info['machine']['torch']}, transformers {info['machine']['transformers']}, timm "
        f"{info['machine']['timm']}, GPU: {info['machine']['gpu']}.",
        f"- **Total run time**: {info['total_seconds'] / 60:.1f} min" + (" (still running)" if info.get("running") else "")
        + f". Command: `{info['command']}`",
        "",
        "| method | terms (weight, loss, taps, adapter, params) | seeds | test accuracy | vs baseline | train time / run |",
        "|---|---|---|---|---|---|",
    ]
    if base and teacher_acc is not None:
        lines.append(f"| teacher (resnet18, 11.2M) | CE 1 | {FIRST_SEED} | {teacher_acc:.4f} | "
                     f"{teacher_acc - base_mean:+.4f} | - |")
    order = [m for m in specs if m in by_method]
    for method in order:
        runs = by_method[method]
        mean, std = mean_std([r["accuracy"] for r in runs])
        acc = f"{mean:.4f}" + (f" ± {std:.4f}" if std is not None else "")
        delta = "-" if method == "baseline" or base_mean is None else f"{mean - base_mean:+.4f}"
        seconds = statistics.fmean(r["train_seconds"] for r in runs)
        seeds = ",".join(str(r["seed"]) for r in runs)
        # A run whose loss became NaN diverged: say so rather than show its chance-level accuracy bare.
        diverged = [str(r["seed"]) for r in runs if any(
            isinstance(v, float) and math.isnan(v) for v in (r.get("last_log") or {}).values())]
        if diverged:
            acc += f" (diverged: NaN loss, seed {', '.join(diverged)})"
        lines.append(f"| {method} | {describe_terms(specs[method])} | {seeds} | {acc} | {delta} | {seconds:.0f} s |")
    for r in diverged_runs:  # stopped by the trainer's guard on a non-finite loss (nothing was saved)
        step = re.search(r"at step (\d+)", r["diverged"])
        where = f" at step {step.group(1)}" if step else ""
        lines.append(f"| {r['method']} | {describe_terms(specs[r['method']])} | {r['seed']} | diverged: training "
                     f"stopped{where} on a non-finite loss, no student saved | - | - |")
    ran = {r["method"] for r in failed + diverged_runs}
    pending = [m for m in specs if m not in by_method and m not in ran]
    if pending and info.get("running"):
        lines += ["", f"Not run yet: {', '.join(pending)}."]

    lines += ["", "## Reading the table", ""]
    if chart is not None:
        lines += [f"![Each method's test accuracy gain over the baseline, with its spread over seeds]({chart.name})", ""]
    if base:
        base_text = f"{base_mean:.4f}" + (f" ± {base_std:.4f}" if base_std is not None else "")
        lines.append(f"The baseline (student alone) reaches {base_text}. "
                     "Differences smaller than about two baseline standard deviations are within seed noise; "
                     "single-seed rows carry that noise too.")
        worse = [m for m in order if m != "baseline" and mean_std([r["accuracy"] for r in by_method[m]])[0] <= base_mean]
        noise = 2 * base_std if base_std else 0.0
        unclear = [m for m in order if m != "baseline" and m not in worse
                   and mean_std([r["accuracy"] for r in by_method[m]])[0] - base_mean <= noise]
        better = [m for m in order if m not in ("baseline", *worse, *unclear)]
        lines.append("")
        lines.append(f"- **Did not beat the baseline** (mean accuracy at or below it): {', '.join(worse) or 'none'}.")
        if diverged_runs:
            lines.append(f"- **Diverged** (the loss became NaN or inf; the trainer stopped it and saved nothing): "
                         f"{', '.join(sorted({r['method'] for r in diverged_runs}))}.")
        lines.append(f"- **Above the baseline but within seed noise** (<= 2 baseline std, {noise:.4f}): "
                     f"{', '.join(unclear) or 'none'}.")
        lines.append(f"- **Above the baseline by more than that**: {', '.join(better) or 'none'}.")
    lines += [
        "",
        "This is a short schedule on a small subset, chosen so that every method runs on two CPU cores in well under "
        "an hour: it checks that each method trains inside the real trainer and shows its effect at this budget; "
        "it is not a reproduction of the papers' CIFAR-100/ImageNet numbers. The term weights are the literature's "
        "CIFAR settings, not tuned here; several were tuned for 240-epoch schedules and much larger maps (at 28x28 "
        "the ImageNet-style stem leaves 7x7, 4x4, 2x2 and 1x1 maps in layer1..layer4). The two-stage rows train one "
        "epoch more than the others (their first stage).",
        "",
        "## Where each row's settings come from",
        "",
    ]
    for method in specs:
        lines.append(f"- `{method}` (`recipes/fashion_mnist/{method}.yaml`): {specs[method]['source']}.")
    lines += ["", "## Methods without a row", ""]
    for name, why in TRANSFORMER_ONLY.items():
        lines.append(f"- `{name}`: not applicable to a CNN pair ({why}).")
    for name, why in DENSE_ONLY.items():
        lines.append(f"- `{name}`: for dense prediction, not a classifier pair ({why}).")
    for name, why in NOT_IMPLEMENTED.items():
        lines.append(f"- `{name}`: {why}.")
    for alias, main_name in ALIASES.items():
        lines.append(f"- `{alias}`: another registered name of `{main_name}` (same class), benchmarked as `{main_name}`.")
    if failed:
        lines += ["", "## Runs that failed", ""]
        for r in failed:
            lines.append(f"- `{r['method']}` seed {r['seed']}: `{r['error']}`")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


# ------------------------------------------------------------------------------------ chart
def gain_rows(records: list[dict], specs: dict | None = None) -> tuple[list[dict], float | None, list[str]]:
    """``(rows, noise, left out)`` for :func:`hfdistill.plots.plot_method_gains`, from the runs' records.

    Each method's gain is its mean accuracy minus the baseline's (as the table's "vs baseline"), in points;
    its spread is the standard deviation over seeds of the per-seed gains (the same seed's baseline run),
    for methods run with several seeds. ``noise`` is the table's seed-noise threshold (2 baseline std) in
    points. Rows are sorted by gain, largest first; ``left out`` names the methods without an accuracy.
    """
    by_method: dict[str, dict[int, float]] = {}
    for r in records:
        if "accuracy" in r:
            by_method.setdefault(r["method"], {})[r["seed"]] = r["accuracy"]
    base = by_method.get("baseline")
    if not base:
        return [], None, []
    base_mean, base_std = mean_std(list(base.values()))
    rows = []
    for method, runs in by_method.items():
        if method == "baseline" or (specs is not None and method not in specs):
            continue
        paired = [100 * (acc - base[seed]) for seed, acc in runs.items() if seed in base]
        rows.append({"method": method, "gain": 100 * (statistics.fmean(runs.values()) - base_mean),
                     "std": statistics.stdev(paired) if len(paired) > 1 else None, "seeds": len(runs)})
    rows.sort(key=lambda row: row["gain"], reverse=True)
    left_out = sorted({r["method"] for r in records if "accuracy" not in r} - set(by_method))
    return rows, (200 * base_std if base_std else None), left_out


def write_chart(path: Path, records: list[dict], specs: dict | None = None) -> Path | None:
    """The gains chart (``.png``); None when matplotlib is not installed or nothing ran with a baseline."""
    from hfdistill.plots import matplotlib_available, plot_method_gains

    rows, noise, left_out = gain_rows(records, specs)
    if not rows or not matplotlib_available():
        return None
    base = [r["accuracy"] for r in records if r["method"] == "baseline" and "accuracy" in r]
    note = (f"Baseline (student alone): {statistics.fmean(base):.4f} over {len(base)} seed(s). Grey band: "
            f"within seed noise (2 baseline std{f', {noise:.2f} points' if noise else ''}); grey bars fall in it."
            + (f" Not shown (no accuracy: diverged or failed): {', '.join(left_out)}." if left_out else ""))
    return plot_method_gains(rows, path, metric="accuracy", noise=noise, note=note,
                             title="Fashion-MNIST: test accuracy gain over the student trained alone")


# ------------------------------------------------------------------------------------ main
def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", "--methods", dest="methods", nargs="+", default=["all"],
                        help="rows to run: recipe names in recipes/fashion_mnist (default: all)")
    parser.add_argument("--seeds", type=int, default=3, help=f"seeds for {', '.join(MAIN_METHODS)} (others: 1)")
    parser.add_argument("--epochs", type=float, default=None, help="override training.num_train_epochs (default: the recipes')")
    parser.add_argument("--train-samples", type=int, default=None, help="override data.max_train_samples")
    parser.add_argument("--eval-samples", type=int, default=None, help="override data.max_eval_samples")
    parser.add_argument("--max-steps", type=int, default=None, help="override training.max_steps (each stage)")
    parser.add_argument("--teacher-epochs", type=float, default=None, help="override the teacher's num_train_epochs")
    parser.add_argument("--teacher-max-steps", type=int, default=None, help="override the teachers' max_steps")
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/methods_fashion_mnist.md"))
    parser.add_argument("--cache-dir", default=None,
                        help="where the teachers are trained and reused (default: runs/benchmarks/fashion_mnist, "
                        "with a suffix when the length options change)")
    parser.add_argument("--resume", action="store_true", help="skip runs already in the .jsonl with these settings")
    parser.add_argument("--quick", "--dry-run", dest="quick", action="store_true",
                        help="every row for a few steps on 512 images, 1 seed, results under /tmp (checks that all run)")
    parser.add_argument("--list", action="store_true", help="print the rows and their terms, then exit")
    parser.add_argument("--plot-only", action="store_true",
                        help="draw the chart (.png next to --out) from the runs in the .jsonl next to --out, "
                        "without training; needs matplotlib (pip install hfdistill[plots])")
    args = parser.parse_args(argv)
    if args.quick:
        args.train_samples = args.train_samples or 512
        args.eval_samples = args.eval_samples or 512
        args.max_steps = args.max_steps or 3
        args.teacher_max_steps = args.teacher_max_steps or 3
        args.seeds = 1
        if args.out == parser.get_default("out"):
            args.out = "/tmp/hfdistill-quick/methods_fashion_mnist.md"
        args.cache_dir = args.cache_dir or "/tmp/hfdistill-quick/cache"
    if args.cache_dir is None:
        tag = "".join(f"-{k}{v:g}" for k, v in (("n", args.train_samples), ("e", args.teacher_epochs),
                                                 ("s", args.teacher_max_steps)) if v is not None)
        args.cache_dir = str(ROOT / f"runs/benchmarks/fashion_mnist{tag}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    specs = methods()
    files = recipe_files()
    if args.list:
        for name, spec in specs.items():
            print(f"{name:18s} {describe_terms(spec)}")
        return 0
    if args.plot_only:
        out = Path(args.out)
        jsonl = out.with_suffix(".jsonl")
        if not jsonl.is_file():
            print(f"--plot-only: no results at {jsonl}; run the benchmark first", file=sys.stderr)
            return 2
        records = [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]
        chart = write_chart(out.with_suffix(".png"), records)
        if chart is None:
            print("--plot-only: nothing drawn (matplotlib is not installed, or the results have no baseline)",
                  file=sys.stderr)
            return 1
        log(f"chart of {jsonl.name} written to {chart}")
        return 0
    chosen = list(specs) if args.methods == ["all"] else args.methods
    unknown = [m for m in chosen if m not in specs]
    if unknown:
        print(f"unknown method(s) {unknown}; choose from {', '.join(specs)}", file=sys.stderr)
        return 2
    command = "python " + " ".join([os.path.relpath(__file__, ROOT)] + (sys.argv[1:] if argv is None else list(argv)))
    out = Path(args.out)
    jsonl = out.with_suffix(".jsonl")
    started = time.perf_counter()

    bench = Bench(args)
    main_seeds = [FIRST_SEED + i for i in range(args.seeds)]
    plan = [(m, s) for m in chosen for s in (main_seeds if m in MAIN_METHODS else [FIRST_SEED])]

    records: list[dict] = []
    if args.resume and jsonl.is_file():
        old = [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]
        records = [r for r in old if r.get("settings") == bench.settings and "accuracy" in r
                   and (r["method"], r["seed"]) in plan]
        log(f"resuming: {len(records)} run(s) kept from {jsonl}")
    done = {(r["method"], r["seed"]) for r in records}
    info = {"machine": machine(), "command": command, "main_seeds": ",".join(map(str, main_seeds)),
            "overrides": bench.overrides, "teacher_epochs": args.teacher_epochs,
            "teacher_max_steps": args.teacher_max_steps}

    def save(running: bool) -> None:
        jsonl.parent.mkdir(parents=True, exist_ok=True)
        jsonl.write_text("".join(json.dumps(r) + "\n" for r in records))
        chart = None if running else write_chart(out.with_suffix(".png"), records, {m: specs[m] for m in chosen})
        write_report(out, records, {m: specs[m] for m in chosen},
                     {**info, "teacher": bench.teacher_info(bench.cache / "teacher"),
                      "total_seconds": time.perf_counter() - started, "running": running}, chart=chart)

    todo = [p for p in plan if p not in done]
    log(f"{len(todo)} run(s) to do: {', '.join(f'{m}/{s}' for m, s in todo)}")
    for i, (method, seed) in enumerate(todo, 1):
        label = f"[{i}/{len(todo)}] {method} seed {seed}"
        log(f"{label}: {describe_terms(specs[method])}")
        record = guarded_run(lambda: bench.run(method, files[method], seed),
                             {"method": method, "seed": seed, "settings": bench.settings}, label)
        if "accuracy" in record:
            log(f"{label}: test accuracy {record['accuracy']:.4f}, train {record['train_seconds']:.0f} s, "
                f"run {record['wall_seconds']:.0f} s, last losses {record['last_log']}")
        records.append(record)
        save(running=i < len(todo))
    save(running=False)
    shutil.rmtree(bench.workdir, ignore_errors=True)
    log(f"done in {(time.perf_counter() - started) / 60:.1f} min; results in {out}")
    return 1 if any("error" in r for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
