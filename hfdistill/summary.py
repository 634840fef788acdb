"""Size, quality and speed of each model: the table printed at the end of ``hfdistill train``.

Model size is computed here, once, for the summary and for the model card (:mod:`hfdistill.card`):
:func:`model_stats` (parameters and weight bytes of a module, tied weights counted once),
:func:`folder_stats` (the same from a saved folder's weight files, without loading them),
:func:`size_on_disk`, and the number formats :func:`format_count` (``101.77k``, ``11.18M``) and
:func:`format_bytes` (``430.41 kB``).

Latency is measured here, on this machine: a few warm-up calls, then the median of timed calls,
reported per example for batch size 1 and for a larger batch.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .outputs import WEIGHT_FILE_PATTERNS
from .teacher import call_model


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
    device = next(model.parameters()).device
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
