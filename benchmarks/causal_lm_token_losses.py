#!/usr/bin/env python
"""Token-level distillation losses for a small causal LM: held-out perplexity of the student, per loss, over seeds.

The base is the shipped recipe ``recipes/chatterbot_causal_lm.yaml`` (task ``text-generation``, the chatterbot
corpus as two-turn chats, the byte tokenizer, the assistant's tokens learnt): a 4-layer GPT-2 teacher trained
from scratch by the recipe's own ``teacher.train_from``, and a 2-layer student of the same width. Every run goes
through the Python run API (:func:`hfdistill.run`, what ``hfdistill train`` does) with ``print_summary=False``,
in this process; the benchmark only changes, through ``overrides``, where things are written, which seed
trains, and the terms:

- **teacher**: trained once, up front, into ``<workdir>/teacher`` by the recipe's ``teacher.train_from`` (its
  own ``train_args``: 8 epochs); the run that trains it trains the student for one step only (discarded). Its
  training time and its held-out perplexity are recorded once; every later run loads it from that folder
  (``teacher.train_from`` removed, so a missing teacher is an error, never a silent retraining);
- **student alone**: no teacher, no terms, ``task_weight 1`` (the student's next-token loss only);
- **one row per token loss**: ``terms: [{loss: <name>, weight: 0.5}]`` and ``task_weight 0.5``, as in the
  recipe, with the losses' own defaults except those named in :data:`LOSSES` (``jsd`` beta 0.5,
  ``skew_kl`` / ``skew_reverse_kl`` alpha 0.1, the papers' settings).

For each seed (``training.seed``; ``data.seed`` is left as the recipe has it, so every run evaluates on the same
held-out chats) each row is one run of the student only (``student.baseline: false``), with the same student
initialisation and data order in every row of a seed. Recorded per run: the student's held-out perplexity
(``eval_perplexity``), the run's wall time (everything ``hfdistill.run`` does: loading, the dry run, training,
evaluation, saving, the summary's latency measurement) and the Trainer's ``train_runtime``. A run that fails is
recorded with its error and the benchmark goes on.

    python benchmarks/causal_lm_token_losses.py                          # the committed results (~20 min, 2 CPU cores)
    python benchmarks/causal_lm_token_losses.py --seeds 0 --losses forward_kl reverse_kl
    python benchmarks/causal_lm_token_losses.py --tiny --out /tmp/tiny.md   # tiny models, a few steps: a smoke test

Results: ``--out`` (markdown) and a ``.json`` beside it, rewritten after every run (partial results survive an
interruption). The runs' folders go under ``--workdir`` (default: a temporary folder, removed at the end); each
student folder is removed once its numbers are read. With ``--workdir`` given, the teacher stays there and a
later invocation with the same settings reuses it (its recorded time and perplexity with it).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any


ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks._common import load_average, log, machine_info, machine_line, quiet  # noqa: E402  (the offline environment first)

import torch  # noqa: E402

import hfdistill  # noqa: E402
from hfdistill import losses as loss_registry  # noqa: E402

RECIPE = ROOT / "recipes" / "chatterbot_causal_lm.yaml"
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "causal_lm_token_losses_cpu.md"
ALONE = "student alone"
TERM_WEIGHT = 0.5
TASK_WEIGHT = 0.5
# Every token-level loss, with the parameters the benchmark sets (names as `hfdistill losses` registers them).
LOSSES: dict[str, dict[str, float]] = {
    "forward_kl": {},
    "reverse_kl": {},
    "jsd": {"beta": 0.5},
    "tvd": {},
    "skew_kl": {"alpha": 0.1},
    "skew_reverse_kl": {"alpha": 0.1},
    "uld": {},
    "jsd_on_policy": {"beta": 0.5},
}
# Rows that are a registered loss with training options: GKD (jsd, beta 0.5) with half the batches sampled by the
# student (training.lmbda 0.5, hfdistill.on_policy).
ROW_LOSS = {"jsd_on_policy": "jsd"}
ROW_TRAINING = {"jsd_on_policy": {"lmbda": 0.5}}
SEEDS = (0, 1, 2)
TINY_LOSSES = ("forward_kl", "jsd")
TINY_GPT2 = {"n_embd": 32, "n_head": 2, "n_positions": 64, "resid_pdrop": 0, "embd_pdrop": 0, "attn_pdrop": 0}
# --tiny: tiny models, 64 training chats, 32 held out, a few steps (well under a minute on 2 cores).
TINY_OVERRIDES = {
    "student.config": {**TINY_GPT2, "n_layer": 1},
    "data.max_length": 64,
    "data.max_train_samples": 64,
    "data.max_eval_samples": 32,
    "training.max_steps": 3,
    "training.warmup_steps": 0,
    "training.logging_steps": 1,
    "training.save_strategy": "no",
    "training.per_device_eval_batch_size": 32,
}
TINY_TEACHER = {**TINY_GPT2, "n_layer": 2}
TINY_TEACHER_STEPS = 4


# ------------------------------------------------------------------------------------ the machine
def threads() -> int:
    """OMP_NUM_THREADS when it is set, else every core this process may use."""
    try:
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    except (KeyError, ValueError):
        try:
            return len(os.sched_getaffinity(0))
        except AttributeError:  # pragma: no cover - platforms without affinity
            return os.cpu_count() or 1


def machine() -> dict[str, str]:
    return machine_info(hfdistill=getattr(hfdistill, "__version__", "unknown"))


# ------------------------------------------------------------------------------------ the rows
def terms_of(loss: str) -> list[dict]:
    term: dict[str, Any] = {"loss": ROW_LOSS.get(loss, loss), "weight": TERM_WEIGHT}
    if LOSSES[loss]:
        term["params"] = dict(LOSSES[loss])
    return [term]


def describe(row: str) -> str:
    """One line of a row's loss: ``next-token 1`` or ``0.5 next-token + 0.5 jsd (beta=0.5)``."""
    if row == ALONE:
        return "1 next-token"
    params = ", ".join(f"{k}={v:g}" for k, v in LOSSES[row].items())
    text = f"{TASK_WEIGHT:g} next-token + {TERM_WEIGHT:g} {ROW_LOSS.get(row, row)}" + (f" ({params})" if params else "")
    training = ", ".join(f"{k} {v:g}" for k, v in ROW_TRAINING.get(row, {}).items())
    return text + (f"; on-policy batches: {training}" if training else "")


def base_overrides(args: argparse.Namespace) -> dict:
    """What every run shares: the tiny sizes when asked, the student only, no progress bars, the CPU or GPU."""
    overrides = dict(TINY_OVERRIDES) if args.tiny else {}
    overrides.update({"student.baseline": False, "training.disable_tqdm": True,
                      "training.use_cpu": not torch.cuda.is_available()})
    return overrides


def teacher_overrides(args: argparse.Namespace) -> dict:
    """The teacher's own training, as the recipe's ``teacher.train_from`` does it (tiny: a tiny model, a few steps)."""
    if args.tiny:
        return {"teacher.train_from.config": TINY_TEACHER, "teacher.train_args.max_steps": TINY_TEACHER_STEPS}
    return {"teacher.train_args.max_steps": -1}  # its epochs, whatever the student's max_steps is


# ------------------------------------------------------------------------------------ running
class Bench:
    def __init__(self, args: argparse.Namespace, workdir: Path):
        self.args = args
        self.workdir = workdir
        self.base = base_overrides(args)
        self.teacher_dir = workdir / ("teacher-tiny" if args.tiny else "teacher")
        self.teacher: dict[str, Any] = {}

    def teacher_ready(self) -> bool:
        return (self.teacher_dir / "config.json").is_file() and "perplexity" in self.teacher

    def prepare_teacher(self) -> dict:
        """Train the teacher once by the recipe's ``teacher.train_from`` (or reuse the one in ``--workdir``)."""
        marker = self.teacher_dir / "benchmark_teacher.json"
        settings = {"tiny": self.args.tiny, "overrides": teacher_overrides(self.args)}
        if (self.teacher_dir / "config.json").is_file() and marker.is_file():
            old = json.loads(marker.read_text())
            if old.get("settings") == settings and finite(old.get("perplexity")):
                self.teacher = {**old, "reused": True}
                log(f"teacher: reused from {self.teacher_dir} (perplexity {old['perplexity']:.3f})")
                return self.teacher
        if self.teacher_dir.exists():
            shutil.rmtree(self.teacher_dir)
        output_dir = self.workdir / "teacher-run-student"
        # The recipe trains its teacher first when the folder is missing (with the recipe's own training.seed);
        # the student of this run trains one step (its numbers are not used).
        overrides = {**self.base, **teacher_overrides(self.args), "teacher.name": str(self.teacher_dir),
                     "training.output_dir": str(output_dir), "training.max_steps": 1, "training.save_strategy": "no"}
        log(f"teacher: training into {self.teacher_dir}")
        self.teacher = {"settings": settings, "folder": str(self.teacher_dir)}
        start = time.perf_counter()
        try:
            result = hfdistill.run(str(RECIPE), overrides=overrides, print_summary=False)
            self.teacher["prep_wall_seconds"] = time.perf_counter() - start
            job = next(j for j in result.jobs if j.label == "teacher")
            perplexity = job.metrics.get("eval_perplexity")
            if not finite(perplexity):
                raise RuntimeError(f"the teacher's evaluation gave no finite eval_perplexity ({job.metrics})")
            self.teacher["perplexity"] = float(perplexity)
            self.teacher["train_seconds"] = job.stages[0].train_metrics.get("train_runtime")
            self.teacher["steps"] = job.stages[0].global_step
            self.teacher["parameters"] = sum(p.numel() for p in job.loaded.model.parameters())
        except Exception as exc:  # the rows that need it say so; the student-alone row still runs
            traceback.print_exc()
            self.teacher.setdefault("prep_wall_seconds", time.perf_counter() - start)
            self.teacher.pop("perplexity", None)
            self.teacher["error"] = f"{type(exc).__name__}: {exc}"
            log(f"teacher: FAILED: {self.teacher['error']}")
            return self.teacher
        finally:
            shutil.rmtree(output_dir, ignore_errors=True)
        marker.write_text(json.dumps(self.teacher, indent=1) + "\n")
        log(f"teacher: perplexity {self.teacher['perplexity']:.3f}, trained in "
            f"{fmt(self.teacher['train_seconds'], 1)} s")
        return self.teacher

    def run(self, row: str, seed: int) -> dict:
        """One run of the student only (a row, a seed); its error is recorded instead of raised."""
        record: dict[str, Any] = {"row": row, "seed": seed}
        output_dir = self.workdir / f"{row.replace(' ', '_')}-seed{seed}"
        overrides = {**self.base, "training.output_dir": str(output_dir), "training.seed": seed}
        if row == ALONE:
            overrides.update({"teacher": None, "terms": [], "task_weight": 1.0})
        else:
            if not self.teacher_ready():
                record["error"] = f"no teacher: {self.teacher.get('error', 'its training did not finish')}"
                return record
            overrides.update({"teacher.name": str(self.teacher_dir), "teacher.train_from": None,
                              "teacher.train_args": {}, "terms": terms_of(row), "task_weight": TASK_WEIGHT,
                              "training.evaluate_teacher": False})  # the teacher was evaluated once, up front
            overrides.update({f"training.{k}": v for k, v in ROW_TRAINING.get(row, {}).items()})
        record["overrides"] = {k: v for k, v in overrides.items() if k not in self.base}
        start = time.perf_counter()
        try:
            result = hfdistill.run(str(RECIPE), overrides=overrides, print_summary=False)
            record["wall_seconds"] = time.perf_counter() - start
            perplexity = result.metrics.get("eval_perplexity")
            if perplexity is None:  # the summary's row of the student, as a fallback
                row_metrics = [r.metrics for r in result.plan.rows if r.role.startswith("student")]
                perplexity = row_metrics[-1].get("perplexity") if row_metrics else None
            if perplexity is None:
                raise RuntimeError(f"the run reported no eval_perplexity (metrics: {sorted(result.metrics)})")
            record["perplexity"] = float(perplexity)
            record["eval_loss"] = result.metrics.get("eval_loss")
            final = result.plan.final
            record["train_seconds"] = sum(s.train_metrics.get("train_runtime", 0.0) for s in final.stages)
            record["steps"] = sum(s.global_step or 0 for s in final.stages)
            logs = [h for h in final.trainer.state.log_history if "loss" in h]
            record["last_log"] = {k: v for k, v in (logs[-1] if logs else {}).items() if k.startswith("loss")}
        except Exception as exc:  # one failing run must not lose the others
            record.setdefault("wall_seconds", time.perf_counter() - start)
            record["error"] = f"{type(exc).__name__}: {exc}".strip()
            traceback.print_exc()
        finally:
            shutil.rmtree(output_dir, ignore_errors=True)
            for suffix in ("-stages", "-peers", "-baseline"):
                shutil.rmtree(f"{output_dir}{suffix}", ignore_errors=True)
        return record


# ------------------------------------------------------------------------------------ report
def finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def summarise_rows(records: list[dict], rows: list[str]) -> list[dict]:
    """Per row: perplexities per seed, mean and std, mean times, the gain vs the student alone, the errors."""
    alone = {r["seed"]: r["perplexity"] for r in records if r["row"] == ALONE and finite(r.get("perplexity"))}
    alone_mean, _ = mean_std(list(alone.values()))
    table = []
    for row in rows:
        runs = sorted((r for r in records if r["row"] == row), key=lambda r: r["seed"])
        ok = [r for r in runs if finite(r.get("perplexity"))]
        mean, std = mean_std([r["perplexity"] for r in ok])
        paired = [alone[r["seed"]] - r["perplexity"] for r in ok if r["seed"] in alone]
        entry = {
            "row": row, "loss": describe(row), "seeds": [r["seed"] for r in runs],
            "perplexity": {str(r["seed"]): r.get("perplexity") for r in runs},
            "perplexity_mean": mean, "perplexity_std": std,
            "wall_seconds_mean": mean_std([r["wall_seconds"] for r in ok])[0],
            "train_seconds_mean": mean_std([r["train_seconds"] for r in ok])[0],
            "gain": (alone_mean - mean) if row != ALONE and mean is not None and alone_mean is not None else None,
            "gain_paired_std": statistics.stdev(paired) if row != ALONE and len(paired) > 1 else None,
            "errors": {str(r["seed"]): r["error"] for r in runs if "error" in r},
            "nonfinite": [r["seed"] for r in runs if "perplexity" in r and not finite(r["perplexity"])],
        }
        table.append(entry)
    return table


def fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def cell(text: str) -> str:
    return text.replace("|", "/").replace("\n", " ")


def named(entries: list[dict], gain: bool = False) -> str:
    """`row` (+gain), ... or none."""
    if not entries:
        return "none"
    return ", ".join(f"`{e['row']}`" + (f" ({e['gain']:+.2f})" if gain else "") for e in entries)


def reading(table: list[dict], teacher: dict) -> list[str]:
    """What the numbers say, written from them (nothing here is fixed in advance)."""
    by_row = {e["row"]: e for e in table}
    alone = by_row.get(ALONE)
    losses = [e for e in table if e["row"] != ALONE and e["perplexity_mean"] is not None]
    failed = [e["row"] for e in table if e["errors"]]
    if alone is None or alone["perplexity_mean"] is None or not losses:
        text = "Too few runs finished to compare the losses with the student alone"
        return [text + (f" (failed: {', '.join(failed)})." if failed else ".")]
    base, base_std = alone["perplexity_mean"], alone["perplexity_std"]
    seeds = len(alone["perplexity"])
    noise = 2 * base_std if base_std is not None else None
    ranked = sorted(losses, key=lambda e: e["perplexity_mean"])
    best, worst = ranked[0], ranked[-1]
    sentences = [f"Trained alone, the student reaches a held-out perplexity of {base:.2f}"
                 + (f" (± {base_std:.2f} over {seeds} seeds)" if base_std is not None else f" ({seeds} seed)")]
    if finite(teacher.get("perplexity")):
        sentences[-1] += f"; the teacher, {teacher['perplexity']:.2f}"
        gap = base - teacher["perplexity"]
        if gap > 0 and best["gain"] is not None and best["gain"] > 0:
            sentences[-1] += (f", so the best loss, `{best['row']}` at {best['perplexity_mean']:.2f}, closes "
                              f"{100 * best['gain'] / gap:.0f}% of the gap between them")
    sentences[-1] += "."
    if noise is not None:
        clear = [e for e in ranked if e["gain"] is not None and e["gain"] > noise]
        within = [e for e in ranked if e["gain"] is not None and abs(e["gain"]) <= noise]
        worse = [e for e in ranked if e["gain"] is not None and e["gain"] < -noise]
        sentences.append(
            f"Counting a difference as real only when it exceeds twice the student-alone seed spread "
            f"({noise:.2f} perplexity): "
            + f"better than the student alone: {named(clear, gain=True)}; "
            + f"within the noise: {named(within)}; "
            + f"worse: {named(worse, gain=True)}.")
    else:
        sentences.append("With one seed there is no estimate of the seed noise, so small differences mean little. "
                         f"Lowest perplexity: `{best['row']}` ({best['perplexity_mean']:.2f}); highest: "
                         f"`{worst['row']}` ({worst['perplexity_mean']:.2f}).")
    if len(ranked) > 1 and noise is not None:
        order = ", ".join(f"`{e['row']}` {e['perplexity_mean']:.2f}" for e in ranked)
        sentences.append(f"From best to worst: {order}.")
    if alone["wall_seconds_mean"]:
        ratios = [(e["row"], e["wall_seconds_mean"] / alone["wall_seconds_mean"]) for e in losses
                  if e["wall_seconds_mean"]]
        if ratios:
            low = min(ratios, key=lambda r: r[1])
            high = max(ratios, key=lambda r: r[1])
            sentences.append(f"A distilled run (the teacher's forward pass on every batch plus the term) took "
                             f"{low[1]:.2f}x (`{low[0]}`) to {high[1]:.2f}x (`{high[0]}`) the student-alone run's "
                             f"wall time ({alone['wall_seconds_mean']:.0f} s).")
    if failed:
        sentences.append(f"Rows with failed runs: {', '.join(failed)} (errors in the table).")
    return [" ".join(sentences)]


def write_report(out: Path, records: list[dict], rows: list[str], info: dict, teacher: dict, running: bool) -> None:
    table = summarise_rows(records, rows)
    args = info["args"]
    seeds = args["seeds"]
    total = f"{info['total_seconds'] / 60:.1f} min" + (" (still running)" if running else "")
    lines = ["# Token-level distillation losses for a small causal LM (chatterbot corpus, CPU)", ""]
    if args["tiny"]:
        lines += ["**Tiny run (`--tiny`): a smoke test with tiny models (1-2 layers, width 32) and a few training "
                  "steps on 64 chats; the numbers mean nothing about the losses.**", ""]
    lines += [
        f"Machine: {machine_line(info['machine'])}. 1-minute load average when written: {load_average():.1f} "
        "(above the core count, other work shared the cores and inflated the times).",
        f"Date: {info['date']}. Total run time: {total}.",
        f"Command: `{info['command']}`",
        "",
        "Produced by `benchmarks/causal_lm_token_losses.py`: every run is `hfdistill.run` of "
        "`recipes/chatterbot_causal_lm.yaml` with overrides (docstring of the script). Teacher: GPT-2 trained from "
        "scratch by the recipe's `teacher.train_from`, once, then loaded from its folder by every run; student: "
        "GPT-2 with half its layers, same width and byte tokenizer, trained alone (`student.baseline: false`), "
        f"one run per row and seed (`training.seed` {', '.join(map(str, seeds))}; `data.seed` fixed, so every run "
        "evaluates on the same held-out chats). Distilled rows: `terms: [{loss: <row>, weight: "
        f"{TERM_WEIGHT:g}}}]`, `task_weight` {TASK_WEIGHT:g}; the student alone: no terms, `task_weight` 1. "
        "Perplexity: of the held-out assistant tokens (lower is better); mean ± std over the seeds. "
        "s / run: the wall time of the whole `hfdistill.run` call (loading, dry run, training, evaluation, saving, "
        "summary), mean over the seeds; train s / run: the Trainer's `train_runtime`. Gain: the student alone's "
        "mean perplexity minus the row's (positive: the loss helped), ± the std over seeds of the per-seed "
        "differences.",
        "",
    ]
    if finite(teacher.get("perplexity")):
        how = "reused from an earlier invocation's --workdir" if teacher.get("reused") else "trained up front"
        lines.append(f"Teacher ({teacher.get('parameters', 0) / 1e6:.2f}M parameters, {teacher.get('steps')} steps, "
                     f"{how}): held-out perplexity **{teacher['perplexity']:.3f}**, trained in "
                     f"{fmt(teacher.get('train_seconds'), 1)} s (Trainer `train_runtime`; the run that trained it took "
                     f"{fmt(teacher.get('prep_wall_seconds'), 1)} s in all, with a one-step student).")
    elif teacher.get("error"):
        lines.append(f"Teacher: its training failed: `{cell(teacher['error'])}`.")
    lines += [
        "",
        "## Perplexity per row",
        "",
        "| row | loss | perplexity | per seed | s / run | train s / run | gain vs student alone | note |",
        "|---|---|---:|---|---:|---:|---:|---|",
    ]
    if finite(teacher.get("perplexity")):
        alone = next((e for e in table if e["row"] == ALONE), None)
        gain = (alone["perplexity_mean"] - teacher["perplexity"]
                if alone is not None and alone["perplexity_mean"] is not None else None)
        lines.append(f"| teacher | 1 next-token | {teacher['perplexity']:.2f} | - | "
                     f"{fmt(teacher.get('prep_wall_seconds'), 1)} | {fmt(teacher.get('train_seconds'), 1)} | "
                     f"{'-' if gain is None else f'{gain:+.2f}'} | trained once, "
                     f"{teacher.get('parameters', 0) / 1e6:.2f}M parameters |")
    for e in table:
        ppl = fmt(e["perplexity_mean"]) + (f" ± {e['perplexity_std']:.2f}" if e["perplexity_std"] is not None else "")
        per_seed = ", ".join(
            f"s{s}: " + (f"{v:.2f}" if finite(v) else ("failed" if s in e["errors"] else str(v)))
            for s, v in e["perplexity"].items()) or "-"
        if e["row"] == ALONE:
            gain = "-"
        elif e["gain"] is None:
            gain = "-"
        else:
            gain = f"{e['gain']:+.2f}" + (f" ± {e['gain_paired_std']:.2f}" if e["gain_paired_std"] is not None else "")
        notes = [f"seed {s} failed: {err}" for s, err in e["errors"].items()]
        if e["nonfinite"]:
            notes.append(f"non-finite perplexity for seed(s) {', '.join(map(str, e['nonfinite']))}")
        if not e["seeds"]:
            notes.append("not run yet" if running else "not run")
        lines.append(f"| {e['row']} | {describe(e['row'])} | {ppl} | {per_seed} | {fmt(e['wall_seconds_mean'], 1)} | "
                     f"{fmt(e['train_seconds_mean'], 1)} | {gain} | {cell('; '.join(notes))} |")
    lines += ["", "## What the numbers say", ""]
    lines += reading(table, teacher) if not running else ["(written when the run ends)"]
    lines.append("")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines), encoding="utf-8")
    raw = {"command": info["command"], "date": info["date"], "machine": info["machine"], "args": args,
           "recipe": str(RECIPE.relative_to(ROOT)), "overrides": info["overrides"], "running": running,
           "total_seconds": info["total_seconds"], "teacher": teacher, "rows": table, "runs": records}
    out.with_suffix(".json").write_text(json.dumps(raw, indent=1, default=str) + "\n", encoding="utf-8")


# ------------------------------------------------------------------------------------ main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help=f"training seeds (default: {' '.join(map(str, SEEDS))}; --tiny: {SEEDS[0]})")
    parser.add_argument("--losses", nargs="+", default=None, choices=list(LOSSES),
                        help=f"token losses, one row each (default: all; --tiny: {' '.join(TINY_LOSSES)})")
    parser.add_argument("--out", default=None,
                        help=f"markdown results, a .json beside it (default: {DEFAULT_OUT.relative_to(ROOT)}; "
                        "--tiny: a file in the work folder)")
    parser.add_argument("--workdir", default=None,
                        help="where the runs' folders and the teacher go (default: a temporary folder, removed at "
                        "the end); a teacher already there with the same settings is reused")
    parser.add_argument("--tiny", action="store_true",
                        help="tiny models, a few steps, 1 seed, 2 losses: a smoke test (< 1 min on 2 cores)")
    args = parser.parse_args(argv)
    if args.seeds is None:
        args.seeds = [SEEDS[0]] if args.tiny else list(SEEDS)
    if args.losses is None:
        args.losses = list(TINY_LOSSES) if args.tiny else list(LOSSES)
    args.seeds = list(dict.fromkeys(args.seeds))
    args.losses = list(dict.fromkeys(args.losses))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = "python " + " ".join([os.path.relpath(__file__, ROOT)] + (sys.argv[1:] if argv is None else list(argv)))
    for loss in args.losses:  # the parameters' names are the registered ones: refuse a typo before any training
        loss_registry.build(ROW_LOSS.get(loss, loss), **LOSSES[loss])
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads())
    own_workdir = args.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="hfdistill-causal-lm-")) if own_workdir else Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    out = Path(args.out) if args.out else (workdir / "causal_lm_token_losses_tiny.md" if args.tiny else DEFAULT_OUT)
    try:
        with quiet():
            return benchmark(args, command, workdir, out)
    finally:
        torch.set_num_threads(previous_threads)
        if own_workdir:
            if args.tiny and args.out is None:
                log(f"tiny results kept in {out} (the rest of {workdir} removed)")
                for child in workdir.iterdir():
                    if child != out and child != out.with_suffix(".json"):
                        shutil.rmtree(child, ignore_errors=True) if child.is_dir() else child.unlink()
            else:
                shutil.rmtree(workdir, ignore_errors=True)


def benchmark(args: argparse.Namespace, command: str, workdir: Path, out: Path) -> int:
    started = time.perf_counter()
    rows = [ALONE] + args.losses
    bench = Bench(args, workdir)
    info = {"command": command, "machine": machine(), "args": vars(args).copy(), "overrides": bench.base,
            "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"), "total_seconds": 0.0}
    info["args"]["workdir"] = str(workdir)
    records: list[dict] = []

    def save(running: bool) -> None:
        info["total_seconds"] = time.perf_counter() - started
        write_report(out, records, rows, info, bench.teacher, running)

    log(f"{len(rows)} rows x {len(args.seeds)} seed(s) in {workdir}; results -> {out}")
    if any(row != ALONE for row in rows):
        bench.prepare_teacher()
    save(running=True)
    total = len(rows) * len(args.seeds)
    for seed in args.seeds:  # seed by seed: an interrupted run still has every row of the first seeds
        for row in rows:
            record = bench.run(row, seed)
            records.append(record)
            done = f"perplexity {record['perplexity']:.3f}" if "perplexity" in record else f"FAILED: {record['error']}"
            log(f"[{len(records)}/{total}] {row} seed {seed}: {done}, {record.get('wall_seconds', 0):.1f} s")
            save(running=True)
    save(running=False)
    print(out.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
