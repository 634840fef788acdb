#!/usr/bin/env python
"""Dense prediction on the Fashion-MNIST scenes: each distillation method for segmentation and detection, one row per recipe.

The rows are the recipe files ``recipes/fashion_mnist_scenes/<task>/<method>.yaml`` (``segmentation``: SegFormer,
mean IoU; ``detection``: RT-DETR, COCO mAP; files starting with ``_`` are the shared base), run as they are through
:func:`hfdistill.run` (what ``hfdistill train`` does): the recipes hold the pair, data, terms and schedule. The
benchmark only chooses where things are written and which seed runs, and, with ``--quick``, makes the runs a few
steps long (the default test suite runs that, to check every recipe still runs).

The data are SYNTHETIC (:mod:`hfdistill.scenes`): 1 to 3 real Fashion-MNIST items placed on a black canvas, the
segmentation map and boxes derived from the items' own pixels. No segmentation or detection set ships in a package
on these machines; the numbers say how these small models outline and find these items and are not comparable
with ADE20K, COCO or any published result.

    python benchmarks/dense_scenes.py --task segmentation   # the committed results, one report per task
    python benchmarks/dense_scenes.py --task detection
    python benchmarks/dense_scenes.py --task segmentation --only baseline pixel_kd --seeds 1
    python benchmarks/dense_scenes.py --quick                # every recipe, 2 steps (checks that they all run)
    python benchmarks/dense_scenes.py --list                 # the rows and their terms

Each task's teacher is trained once into ``--cache-dir`` (the recipes' own "train it first when the folder does
not exist") and evaluated once; its training time is reported. Results go to ``--out`` (markdown; by default ``benchmarks/results/dense_scenes_<task>.md``) and a ``.jsonl``
of the runs next to it, rewritten after every run; ``--resume`` skips runs already there with the same settings.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks._common import guarded_run, load_average, log, machine_info, machine_line  # noqa: E402  (the offline environment first)
from benchmarks.methods_fashion_mnist import describe_terms, mean_std, source_of  # noqa: E402

import torch  # noqa: E402

from hfdistill import Recipe  # noqa: E402

RECIPES = ROOT / "recipes" / "fashion_mnist_scenes"
FIRST_SEED = 42
# Per task: the headline metric (the summary's name), what else is kept, the task loss's name in the rows, and
# the rows first in the table.
TASKS = {
    "segmentation": {"metric": "mean_iou", "extra": ("pixel_accuracy",), "task_loss": "CE",
                     "order": ("baseline", "pixel_kd", "pixel_pairwise", "cwd_logits", "cwd_features", "fitnet")},
    "detection": {"metric": "map", "extra": ("map_50", "map_75"), "task_loss": "det",
                  "order": ("baseline", "detection_logit_kd", "mgd", "fitnet")},
}


def recipe_files(task: str) -> dict[str, Path]:
    """``{method: recipe path}`` of a task's rows, in the table's order."""
    files = {p.stem: p for p in (RECIPES / task).glob("*.yaml") if not p.name.startswith("_")}
    order = TASKS[task]["order"]
    return {m: files[m] for m in [m for m in order if m in files] + sorted(set(files) - set(order))}


def row_spec(path: Path) -> dict:
    """A row as plain data from its recipe: its terms, task weight and where its settings come from."""
    recipe = Recipe.from_yaml(path)
    return {"terms": recipe.to_dict().get("terms", []), "task_weight": recipe.task_weight,
            "source": source_of(path), "teacher": recipe.teacher is not None}


class Bench:
    """Runs one recipe for one seed through hfdistill.run, each task's teacher trained once into ``cache_dir``."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.overrides: dict = {}
        for key, value in (("training.max_steps", args.max_steps), ("data.max_train_samples", args.train_samples),
                           ("data.max_eval_samples", args.eval_samples)):
            if value is not None:
                self.overrides[key] = value
        self.settings = {"overrides": self.overrides, "teacher_max_steps": args.teacher_max_steps}
        self.cache = Path(args.cache_dir)
        self.workdir = tempfile.mkdtemp(prefix="hfdistill-dense-bench-")

    def teacher_info(self, task: str) -> dict | None:
        marker = self.cache / task / "teacher" / "benchmark_teacher.json"
        return json.loads(marker.read_text()) if marker.is_file() else None

    def run(self, task: str, method: str, path: Path, seed: int) -> dict:
        import hfdistill

        metric = TASKS[task]["metric"]
        recipe = Recipe.from_yaml(path)
        output_dir = os.path.join(self.workdir, f"{task}-{method}-{seed}")
        overrides = {**self.overrides, "training.output_dir": output_dir, "training.seed": seed,
                     "training.disable_tqdm": True, "training.use_cpu": not torch.cuda.is_available()}
        teacher_folder = self.cache / task / "teacher"
        first_teacher = recipe.teacher is not None and self.teacher_info(task) is None
        if recipe.teacher is not None:
            overrides["teacher.name"] = str(teacher_folder)
            if self.args.teacher_max_steps is not None:
                overrides["teacher.train_args.max_steps"] = self.args.teacher_max_steps
            overrides["training.evaluate_teacher"] = first_teacher  # frozen: evaluated once per task
        start = time.perf_counter()
        result = hfdistill.run(path, overrides=overrides, print_summary=False)
        record = {"task": task, "method": method, "seed": seed, "settings": self.settings,
                  "wall_seconds": time.perf_counter() - start}
        final = result.plan.final
        if first_teacher:
            teacher_job = next((j for j in result.jobs if j.label == "teacher"), None)
            info = {key: result.metrics.get(f"eval_teacher_{key}") for key in (metric, *TASKS[task]["extra"])}
            info["train_seconds"] = (teacher_job.stages[0].train_metrics.get("train_runtime")
                                     if teacher_job is not None else None)
            (teacher_folder / "benchmark_teacher.json").write_text(json.dumps(info, indent=2))
        record["train_seconds"] = sum(s.train_metrics.get("train_runtime", 0.0) for s in final.stages)
        record["eval_seconds"] = final.metrics.get("eval_runtime")
        for key in (metric, *TASKS[task]["extra"]):
            record[key] = result.metrics.get(f"eval_{key}")
        logs = [h for h in final.trainer.state.log_history if "loss" in h and "eval_loss" not in h]
        record["last_log"] = {k: v for k, v in (logs[-1] if logs else {}).items() if k.startswith("loss")}
        shutil.rmtree(output_dir, ignore_errors=True)
        return record


def _fmt(values: list[float]) -> str:
    mean, std = mean_std(values)
    return f"{mean:.4f}" + (f" ± {std:.4f}" if std is not None else "")


def write_report(path: Path, records: list[dict], specs: dict, teachers: dict, info: dict) -> None:
    """The markdown report: per task, the teacher's row, then one row per method (mean ± std over seeds)."""
    lines = ["# Dense prediction on the Fashion-MNIST scenes (synthetic)", "",
             "Produced by `benchmarks/dense_scenes.py`, which runs each recipe of `recipes/fashion_mnist_scenes/"
             "<task>/` through `hfdistill.run` (rerun it to reproduce; see the command below).", "",
             "**The data are synthetic**: each scene places 1 to 3 real Fashion-MNIST items on a black canvas, and "
             "its segmentation map and boxes are derived from the items' own pixels (`hfdistill.scenes`; training "
             "scenes from training items, held-out scenes from test items). It is not a real segmentation or "
             "detection benchmark: these numbers compare methods with each other on these small models and are not "
             "comparable with ADE20K, COCO or any published result.", "",
             f"- **Machine**: {machine_line(info['machine'])} (1-minute load average {load_average():.1f} when this was "
             "written; a load above the core count means other work shared the cores and inflated the times).",
             f"- **Total run time**: {info['total_seconds'] / 60:.1f} min. Command: `{info['command']}`"
             + (" **(still running: partial results)**" if info.get("running") else ""), ""]
    for task, rows in specs.items():
        metric = TASKS[task]["metric"]
        extra = TASKS[task]["extra"]
        first = Recipe.from_yaml(next(iter(recipe_files(task).values())))
        lines += [f"## {task.capitalize()}: {metric} on {first.data.options.get('num_test')} held-out scenes", "",
                  f"Each row: recipe `recipes/fashion_mnist_scenes/{task}/<method>.yaml`, same student "
                  "initialisation per seed, same data and schedule (the shared `_base.yaml`). "
                  f"`{TASKS[task]['task_loss']}` is the student's own loss"
                  + (" (per-pixel cross-entropy)." if task == "segmentation" else
                     " (RT-DETR's: Hungarian matching, varifocal class loss, L1 and GIoU box losses)."), "",
                  f"| method | terms (weight, loss, taps, adapter, params) | seeds | {metric} | vs baseline | "
                  + " | ".join(extra) + " | train time / run |",
                  "|---|---|---|---|---|" + "---|" * len(extra) + "---|"]
        teacher = teachers.get(task)
        by_method = {m: [r for r in records if r["task"] == task and r["method"] == m and metric in r
                         and r[metric] is not None] for m in rows}
        base = [r[metric] for r in by_method.get("baseline", [])]
        base_mean = mean_std(base)[0] if base else None
        if teacher and teacher.get(metric) is not None:
            gain = f"{teacher[metric] - base_mean:+.4f}" if base_mean is not None else "-"
            trained = f"trained in {teacher['train_seconds']:.0f} s" if teacher.get("train_seconds") else "-"
            lines.append(f"| teacher | {TASKS[task]['task_loss']} 1 | {FIRST_SEED} | {teacher[metric]:.4f} | {gain} | "
                         + " | ".join(f"{teacher.get(k):.4f}" if teacher.get(k) is not None else "-" for k in extra)
                         + f" | {trained} |")
        for method, spec in rows.items():
            runs = by_method[method]
            failed = [r for r in records if r["task"] == task and r["method"] == method and metric not in r]
            if not runs:
                why = failed[-1].get("error") or failed[-1].get("diverged") if failed else "not run"
                lines.append(f"| {method} | {_terms(task, spec)} | - | {why} | | " + " | " * len(extra) + " |")
                continue
            values = [r[metric] for r in runs]
            gain = f"{mean_std(values)[0] - base_mean:+.4f}" if base_mean is not None and method != "baseline" else "-"
            seeds = ",".join(str(r["seed"]) for r in runs)
            train = mean_std([r["train_seconds"] for r in runs])[0]
            lines.append(f"| {method} | {_terms(task, spec)} | {seeds} | {_fmt(values)} | {gain} | "
                         + " | ".join(_fmt([r[k] for r in runs if r.get(k) is not None]) if any(
                             r.get(k) is not None for r in runs) else "-" for k in extra) + f" | {train:.0f} s |")
        lines += ["", "Where each row's settings come from (the recipes' `Settings:` lines):", ""]
        lines += [f"- **{method}**: {spec['source']}" for method, spec in rows.items()]
        lines.append("")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _terms(task: str, spec: dict) -> str:
    return describe_terms(spec, task_loss=TASKS[task]["task_loss"])


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=("segmentation", "detection", "both"), default="both")
    parser.add_argument("--only", dest="methods", nargs="+", default=["all"],
                        help="rows to run: recipe names in recipes/fashion_mnist_scenes/<task> (default: all)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per row (42, 43, ...)")
    parser.add_argument("--max-steps", type=int, default=None, help="override training.max_steps")
    parser.add_argument("--train-samples", type=int, default=None, help="override data.max_train_samples")
    parser.add_argument("--eval-samples", type=int, default=None, help="override data.max_eval_samples")
    parser.add_argument("--teacher-max-steps", type=int, default=None, help="override the teachers' max_steps")
    parser.add_argument("--out", default=None, help="the report (default: benchmarks/results/dense_scenes_<task>.md, "
                        "or dense_scenes.md for both tasks)")
    parser.add_argument("--cache-dir", default=None,
                        help="where the teachers are trained and reused (default: runs/benchmarks/dense_scenes)")
    parser.add_argument("--resume", action="store_true", help="skip runs already in the .jsonl with these settings")
    parser.add_argument("--quick", action="store_true",
                        help="every row for 2 steps on 64 scenes (32 held out), 1 seed, results under the temporary "
                        "folder (checks that all run)")
    parser.add_argument("--list", action="store_true", help="print the rows and their terms, then exit")
    args = parser.parse_args(argv)
    if args.quick:
        args.max_steps = args.max_steps or 2
        args.teacher_max_steps = args.teacher_max_steps or 2
        args.train_samples = args.train_samples or 64
        args.eval_samples = args.eval_samples or 32
        args.seeds = 1
        args.out = args.out or os.path.join(tempfile.gettempdir(), "hfdistill-quick", "dense_scenes.md")
        args.cache_dir = args.cache_dir or os.path.join(tempfile.gettempdir(), "hfdistill-quick", "dense-cache")
    args.cache_dir = args.cache_dir or str(ROOT / "runs/benchmarks/dense_scenes")
    suffix = "" if args.task == "both" else f"_{args.task}"
    args.out = args.out or str(ROOT / f"benchmarks/results/dense_scenes{suffix}.md")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    tasks = list(TASKS) if args.task == "both" else [args.task]
    specs = {task: {m: row_spec(p) for m, p in recipe_files(task).items()} for task in tasks}
    if args.list:
        for task in tasks:
            for name, spec in specs[task].items():
                print(f"{task:13s} {name:20s} {_terms(task, spec)}")
        return 0
    if args.methods != ["all"]:
        unknown = [m for m in args.methods if not any(m in specs[t] for t in tasks)]
        if unknown:
            print(f"unknown row(s) {unknown}; choose from {sorted({m for t in tasks for m in specs[t]})}",
                  file=sys.stderr)
            return 2
        specs = {t: {m: s for m, s in specs[t].items() if m in args.methods} for t in tasks}
    command = "python " + " ".join([os.path.relpath(__file__, ROOT)] + (sys.argv[1:] if argv is None else list(argv)))
    out = Path(args.out)
    jsonl = out.with_suffix(".jsonl")
    started = time.perf_counter()
    bench = Bench(args)
    seeds = [FIRST_SEED + i for i in range(args.seeds)]
    # Seeds outermost: a stopped run still leaves every row with its first seeds.
    plan = [(t, m, s) for s in seeds for t in tasks for m in specs[t]]
    records: list[dict] = []
    if args.resume and jsonl.is_file():
        old = [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]
        records = [r for r in old if r.get("settings") == bench.settings and TASKS[r["task"]]["metric"] in r
                   and (r["task"], r["method"], r["seed"]) in plan]
        log(f"resuming: {len(records)} run(s) kept from {jsonl}")
    done = {(r["task"], r["method"], r["seed"]) for r in records}
    info = {"machine": machine_info(), "command": command}

    def save(running: bool) -> None:
        jsonl.parent.mkdir(parents=True, exist_ok=True)
        jsonl.write_text("".join(json.dumps(r) + "\n" for r in records))
        write_report(out, records, specs, {t: bench.teacher_info(t) for t in tasks},
                     {**info, "total_seconds": time.perf_counter() - started, "running": running})

    todo = [p for p in plan if p not in done]
    log(f"{len(todo)} run(s) to do: {', '.join(f'{t}/{m}/{s}' for t, m, s in todo)}")
    for i, (task, method, seed) in enumerate(todo, 1):
        metric = TASKS[task]["metric"]
        label = f"[{i}/{len(todo)}] {task} {method} seed {seed}"
        log(f"{label}: {_terms(task, specs[task][method])}")
        record = guarded_run(lambda: bench.run(task, method, recipe_files(task)[method], seed),
                             {"task": task, "method": method, "seed": seed, "settings": bench.settings}, label)
        if metric in record:
            log(f"{label}: {metric} {record[metric]:.4f}, train {record['train_seconds']:.0f} s, "
                f"run {record['wall_seconds']:.0f} s")
        records.append(record)
        save(running=i < len(todo))
    save(running=False)
    shutil.rmtree(bench.workdir, ignore_errors=True)
    log(f"report written to {out}")
    return 1 if any("error" in r for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
