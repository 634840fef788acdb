"""Size, quality and speed of each model: the table printed at the end of ``hfdistill train``.

Model size is computed here, once, for the summary and for the model card (:mod:`hfdistill.card`):
:func:`model_stats` (parameters and weight bytes of a module, tied weights counted once),
:func:`folder_stats` (the same from a saved folder's weight files, without loading them),
:func:`size_on_disk`, and the number formats :func:`format_count` (``101.77k``, ``11.18M``) and
:func:`format_bytes` (``430.41 kB``).

Latency is measured here, on this machine: a few warm-up calls, then the median of timed calls,
reported per example for batch size 1 and for a larger batch.

What distillation was worth is computed here, once, for the summary, the model card, the plots and the
trackers: :func:`compare_seeds` pairs the distilled student with the same student trained alone (the
``student.baseline`` runs, over ``student.baseline_seeds`` seeds) into a :class:`SeedComparison`;
:func:`comparison_logs` turns it and the summary's rows into scalars, and :func:`log_to_trackers` sends
those to whatever the trainer reports to (``report_to``).
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import nn

from .outputs import WEIGHT_FILE_PATTERNS
from .teacher import call_model, input_device


@dataclass
class ModelRow:
    """One line of the summary."""

    role: str  # "teacher", "student (no teacher)", "student (distilled)"
    name: str
    params: int
    size_bytes: int
    metrics: dict[str, float] = field(default_factory=dict)
    latency_ms: dict[int, float] = field(default_factory=dict)  # batch size -> ms per example
    folder: str | None = None


# Buffers a checkpoint holds that are statistics, not parameters (batch norm's); left out of parameter counts.
STATISTIC_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")


def model_stats(model: nn.Module | None) -> tuple[int | None, int | None]:
    """(parameters, bytes of the weights it saves: its state dict) of a module; tied tensors are counted once."""
    if model is None:
        return None, None
    params = sum(p.numel() for p in model.parameters())  # parameters() yields a tied parameter once
    seen, size = set(), 0
    for tensor in model.state_dict().values():
        key = (tensor.data_ptr(), tensor.dtype, tuple(tensor.shape))
        if key not in seen:  # tied weights are stored once
            seen.add(key)
            size += tensor.numel() * tensor.element_size()
    return params, size


def weight_files(folder: str | os.PathLike | None) -> list[Path]:
    """The student weight files in ``folder`` (``model*.safetensors``, ``pytorch_model*.bin``)."""
    if not folder or not os.path.isdir(folder):
        return []
    return sorted({f for pattern in WEIGHT_FILE_PATTERNS for f in Path(folder).glob(pattern) if f.is_file()})


def folder_stats(folder: str | os.PathLike) -> tuple[int | None, int | None]:
    """(parameters, bytes of the weight files) of a saved model folder, without loading its tensors.

    Parameters are read from safetensors headers (batch-norm statistics left out, so the count is the
    model's :func:`model_stats`); None for ``.bin``-only folders. (None, None) without weight files.
    """
    from safetensors import safe_open

    files = weight_files(folder)
    if not files:
        return None, None
    size = sum(f.stat().st_size for f in files)
    safetensors_files = [f for f in files if f.suffix == ".safetensors"]
    if not safetensors_files:
        return None, size
    count = 0
    for file in safetensors_files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                if key.endswith(STATISTIC_SUFFIXES):
                    continue
                numel = 1
                for dim in f.get_slice(key).get_shape():
                    numel *= dim
                count += numel
    return count, size


def count_parameters(model: nn.Module) -> int:
    return model_stats(model)[0]


def size_on_disk(model: nn.Module | None, folder: str | os.PathLike | None = None) -> int | None:
    """Bytes of the weight files in ``folder``; without any there, the bytes the model's weights would take."""
    _, size = folder_stats(folder) if weight_files(folder) else (None, None)
    return size if size is not None else model_stats(model)[1]


def format_count(n: int | float | None) -> str:
    """``101.77k``, ``11.18M``, ``1.50B`` (parameters); ``-`` for unknown."""
    if n is None:
        return "-"
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))


def format_bytes(n: int | float | None) -> str:
    """``430.41 kB``, ``44.78 MB`` (decimal units); ``-`` for unknown."""
    if n is None:
        return "-"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def _slice(inputs: dict[str, torch.Tensor], n: int) -> dict[str, torch.Tensor]:
    return {k: v[:n] for k, v in inputs.items() if isinstance(v, torch.Tensor)}


@torch.inference_mode()
def measure_latency(
    model: nn.Module,
    inputs: dict[str, torch.Tensor],
    batch_sizes: tuple[int, ...] = (1, 32),
    warmup: int = 3,
    min_seconds: float = 0.3,
    max_repeats: int = 30,
    call: Callable[[nn.Module, dict], Any] = call_model,
) -> dict[int, float]:
    """Median milliseconds per example for each batch size (bounded by the examples in ``inputs``)."""
    was_training = model.training
    model.eval()
    device = input_device(model)
    available = min(len(v) for v in inputs.values() if isinstance(v, torch.Tensor))
    results = {}
    try:
        for requested in batch_sizes:
            batch = min(requested, available)
            sample = {k: v.to(device) for k, v in _slice(inputs, batch).items()}
            for _ in range(warmup):
                call(model, sample)
            times = []
            start = time.perf_counter()
            while len(times) < max_repeats and (len(times) < 3 or time.perf_counter() - start < min_seconds):
                t0 = time.perf_counter()
                call(model, sample)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                times.append(time.perf_counter() - t0)
            results[batch] = 1000.0 * statistics.median(times) / batch
    finally:
        model.train(was_training)
    return results


def format_summary(rows: list[ModelRow], metric: str = "accuracy") -> str:
    """A plain-text table, one row per model."""
    batch_sizes = sorted({b for row in rows for b in row.latency_ms})
    header = ["model", "name", "params", "size on disk", metric]
    header += [f"latency b={b} (ms/ex)" for b in batch_sizes]
    table = [header]
    for row in rows:
        value = row.metrics.get(metric)
        line = [row.role, _short(row.name), format_count(row.params), format_bytes(row.size_bytes)]
        line.append(f"{value:.4f}" if value is not None else "-")
        line += [f"{row.latency_ms[b]:.3f}" if b in row.latency_ms else "-" for b in batch_sizes]
        table.append(line)
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _short(name: str, width: int = 40) -> str:
    return name if len(name) <= width else "..." + name[-(width - 3):]


# ----------------------------------------------------------------------------- distilled vs. trained alone
NO_TEACHER, DISTILLED = "no teacher", "distilled"  # the values of a run job's ``comparison``
COMPARISON_PREFIX = "eval_comparison_"  # tracker keys of the final comparison (TensorBoard: eval/comparison_*)


@dataclass
class SeedComparison:
    """The distilled student against the same student trained alone (no teacher), seed by seed.

    ``alone[i]`` and ``distilled[i]`` are the ``metric`` of the two runs of ``seeds[i]`` (the same
    initialisation, data and schedule; only the teacher differs). A gain is an improvement (positive: the
    teacher helped): for a metric where higher is better (accuracy) in points (x100: 0.9733 vs 0.9599 is
    +1.34 points); for one where lower is better (perplexity) the reduction, in the metric's own unit (12.4
    vs 10.1 is +2.3). The first seed is the run whose student is saved and published.
    """

    metric: str
    seeds: list[int]
    alone: list[float]
    distilled: list[float]
    greater_is_better: bool = True

    @property
    def gains(self) -> list[float]:
        if self.greater_is_better:
            return [100.0 * (d - a) for a, d in zip(self.alone, self.distilled)]
        return [a - d for a, d in zip(self.alone, self.distilled)]

    @property
    def unit(self) -> str:
        """What a gain counts: ``accuracy points``, or ``perplexity reduction`` for a lower-is-better metric."""
        return f"{self.metric} points" if self.greater_is_better else f"{self.metric} reduction"

    @property
    def n(self) -> int:
        return len(self.seeds)

    @property
    def gain(self) -> float:
        """Mean gain over the seeds, in points."""
        return statistics.fmean(self.gains)

    @property
    def gain_std(self) -> float | None:
        """Sample standard deviation of the gains over the seeds (None for one seed)."""
        return statistics.stdev(self.gains) if self.n > 1 else None

    @staticmethod
    def _mean_std(values: list[float]) -> tuple[float, float | None]:
        return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)

    @property
    def verdict(self) -> str:
        """How the gain compares with its spread over seeds, in words (honest about noise)."""
        if self.n == 1:
            return "one seed: too few to tell the gain from seed-to-seed noise"
        spread = self.gain_std or 0.0
        if abs(self.gain) <= spread:
            return "within noise (not larger than its spread over seeds)" if self.gain or spread else "no difference"
        if self.gain > 0:
            return "larger than its spread over seeds"
        return "a loss larger than its spread over seeds"

    @property
    def sentence(self) -> str:
        """``+0.87 ± 0.75 accuracy points over the same student trained alone, 5 seeds (better on 4); ...``."""
        seeds = f"{self.n} seed{'s' if self.n > 1 else ''}"
        if self.n == 1:
            return f"{self.gain:+.2f} {self.unit} over the same student trained alone, {seeds}; {self.verdict}"
        better = sum(g > 0 for g in self.gains)
        return (f"{self.gain:+.2f} ± {self.gain_std:.2f} {self.unit} over the same student trained alone, "
                f"{seeds} (better on {better} of {self.n}); {self.verdict}")

    def lines(self) -> list[str]:
        """The summary's line (the format the README's quickstart shows)."""
        if self.n == 1:
            return [f"distillation vs. no teacher: {self.gains[0]:+.2f} {self.unit}"]
        (alone, alone_std), (distilled, distilled_std) = self._mean_std(self.alone), self._mean_std(self.distilled)
        return [
            f"over {self.n} seeds ({', '.join(str(s) for s in self.seeds)}): "
            f"no teacher {alone:.4f} +- {alone_std:.4f}, distilled {distilled:.4f} +- {distilled_std:.4f}; "
            f"distillation vs. no teacher {self.gain:+.2f} +- {self.gain_std:.2f} {self.unit} "
            f"(per seed: {', '.join(f'{g:+.2f}' for g in self.gains)})"
        ]

    def to_dict(self) -> dict[str, Any]:
        """Plain data for ``distill_results.json`` and the card (derived values included, for readers)."""
        (alone, alone_std), (distilled, distilled_std) = self._mean_std(self.alone), self._mean_std(self.distilled)
        return {"metric": self.metric, "seeds": list(self.seeds), "alone": list(self.alone),
                "distilled": list(self.distilled), "gains_points": [round(g, 6) for g in self.gains],
                "alone_mean": alone, "alone_std": alone_std, "distilled_mean": distilled,
                "distilled_std": distilled_std, "gain_points": self.gain, "gain_std_points": self.gain_std,
                "greater_is_better": self.greater_is_better, "unit": self.unit, "sentence": self.sentence}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> "SeedComparison | None":
        if not data or not data.get("seeds"):
            return None
        return cls(str(data["metric"]), [int(s) for s in data["seeds"]], [float(v) for v in data["alone"]],
                   [float(v) for v in data["distilled"]], bool(data.get("greater_is_better", True)))


def compare_seeds(jobs: Iterable[Any], metric: str = "accuracy", greater_is_better: bool = True) -> SeedComparison | None:
    """The distilled-vs-alone comparison of a run's jobs (objects with ``comparison``, ``seed`` and eval
    ``metrics``: :class:`hfdistill.run.Job`); None without a seed that has both runs.

    The seeds are in run order of the plan's first seed (the published student's) first, then the rest ascending.
    """
    by_seed: dict[int, dict[str, float]] = {}
    first = None
    for job in jobs:
        value = (job.metrics or {}).get(f"eval_{metric}")
        if job.comparison in (NO_TEACHER, DISTILLED) and value is not None:
            by_seed.setdefault(job.seed, {})[job.comparison] = float(value)
            if not getattr(job, "extra_seed", False):
                first = job.seed
    seeds = [s for s in sorted(by_seed) if len(by_seed[s]) == 2]
    if not seeds:
        return None
    if first in seeds:  # the published student's seed first (it is the smallest in plans made by hfdistill.run)
        seeds = [first] + [s for s in seeds if s != first]
    return SeedComparison(metric, seeds, [by_seed[s][NO_TEACHER] for s in seeds], [by_seed[s][DISTILLED] for s in seeds],
                          greater_is_better)


def comparison_logs(rows: list[ModelRow], comparison: SeedComparison | None, metric: str,
                    roles: Mapping[str, str]) -> dict[str, float]:
    """The final comparison as tracker scalars, ``eval_comparison_*`` (TensorBoard and W&B show ``eval/comparison_*``).

    ``roles`` maps ``teacher``/``alone``/``distilled`` (the student trained alone, the distilled student) to the
    summary rows' roles; the keys name the scalars (``eval_comparison_alone_accuracy``). Per model: the metric,
    parameters and latency (ms per example at the largest batch measured); with a comparison: the gain in
    points (mean over seeds), its standard deviation, the number of seeds, and both sides' means.
    """
    logs: dict[str, float] = {}
    by_role = {row.role: row for row in rows}
    for name, role in roles.items():
        row = by_role.get(role)
        if row is None:
            continue
        value = row.metrics.get(metric)
        if isinstance(value, (int, float)):
            logs[f"{COMPARISON_PREFIX}{name}_{metric}"] = float(value)
        if row.params:
            logs[f"{COMPARISON_PREFIX}{name}_params"] = float(row.params)
        if row.latency_ms:
            logs[f"{COMPARISON_PREFIX}{name}_latency_ms"] = float(row.latency_ms[max(row.latency_ms)])
    if comparison is not None:
        data = comparison.to_dict()
        logs[f"{COMPARISON_PREFIX}gain_points"] = comparison.gain
        if comparison.gain_std is not None:
            logs[f"{COMPARISON_PREFIX}gain_std_points"] = comparison.gain_std
        logs[f"{COMPARISON_PREFIX}seeds"] = float(comparison.n)
        logs[f"{COMPARISON_PREFIX}alone_{metric}_mean"] = data["alone_mean"]
        logs[f"{COMPARISON_PREFIX}distilled_{metric}_mean"] = data["distilled_mean"]
    return logs


def log_to_trackers(trainer: Any, logs: Mapping[str, float]) -> None:
    """Send ``logs`` to every tracker ``trainer`` reports to (``report_to``: TensorBoard, W&B, MLflow, ...).

    Through the trainer's own callback handler, as its logs go (``on_log``, at its last step), but without
    adding them to ``trainer.state.log_history`` (which holds what training logged, and which the model card
    reads for the student's metrics). Trackers log on the main process only.
    """
    if trainer is None or not logs or getattr(trainer, "callback_handler", None) is None:
        return
    trainer.callback_handler.on_log(trainer.args, trainer.state, trainer.control, dict(logs))
