"""Pictures of a result, written next to it and shown in its model card: matplotlib is optional.

``pip install hfdistill[plots]`` installs matplotlib. Without it nothing is drawn and the card says so in
one line (:data:`MISSING_NOTE`). Figures are drawn on the Agg backend (a ``matplotlib.figure.Figure`` with
its own ``FigureCanvasAgg``, never pyplot: the user's backend is left alone), 8 inches wide at 150 dpi (1200 px, shown at the ~800 px
of a Hub model card), with labelled axes and units.

- :func:`plot_loss_curves`: each term's weighted value over training (``loss_<term>`` in the trainer's
  ``log_history``), the task loss and the total; the stages of a staged recipe one after another.
- :func:`plot_tradeoff`: the task's metric against parameters and against latency, for the teacher, the
  student trained alone and the distilled student (mean +- std over seeds when several ran).
- :func:`plot_method_gains`: a benchmark's methods, each one's gain over the baseline with its spread
  over seeds (``benchmarks/methods_fashion_mnist.py``).
- :func:`write_run_plots`: the first two into ``<student folder>/plots/``, and the card values that show them.

The numbers come from :mod:`hfdistill.summary` (rows and :class:`~hfdistill.summary.SeedComparison`); nothing
is computed twice.
"""

from __future__ import annotations

import logging
import math
import os
import statistics
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

logger = logging.getLogger(__name__)

PLOTS_DIR = "plots"
LOSS_CURVES_NAME = f"{PLOTS_DIR}/loss_curves.png"
TRADEOFF_NAME = f"{PLOTS_DIR}/metric_vs_size_and_latency.png"
MISSING_NOTE = "Plots were not drawn: matplotlib is not installed (`pip install hfdistill[plots]`)."
WIDTH_IN, DPI = 8.0, 150
# Colour-blind-safe (Okabe-Ito) colours: one per model role, then per loss curve.
ROLE_STYLE = {
    "teacher": ("#0072B2", "s", "teacher"),
    "alone": ("#555555", "o", "student alone"),
    "distilled": ("#D55E00", "D", "distilled student"),
}
CURVE_COLOURS = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#8C564B", "#999999")


def matplotlib_available() -> bool:
    """True when matplotlib can be imported (``pip install hfdistill[plots]``)."""
    try:
        import matplotlib  # noqa: F401
        from matplotlib.figure import Figure  # noqa: F401
    except ImportError:
        return False
    return True


def _figure(height_in: float, ncols: int = 1):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(WIDTH_IN, height_in), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)  # the Agg backend, for this figure only: pyplot (and the user's backend) untouched
    axes = figure.subplots(1, ncols, squeeze=False)[0]
    for ax in axes:
        ax.tick_params(labelsize=10)
        ax.grid(True, which="major", alpha=0.3)
    return figure, axes


def _save(figure: Any, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=DPI, facecolor="white")
    return path


# ----------------------------------------------------------------------------- loss curves
def loss_series(histories: Sequence[tuple[str | None, Sequence[Mapping[str, Any]]]]) -> tuple[
        dict[str, tuple[list[float], list[float]]], list[tuple[float, str | None]]]:
    """``({name: (steps, values)}, stage starts)`` from trainers' ``log_history`` lists, one per stage, in order.

    The names are the logged ones: ``loss`` (the total), ``loss_task`` and ``loss_<term>`` (weighted). Later
    stages' steps continue after the earlier ones'; ``stage starts`` gives each stage's first step and name.
    """
    series: dict[str, tuple[list[float], list[float]]] = {}
    starts: list[tuple[float, str | None]] = []
    offset = 0.0
    for name, history in histories:
        last = 0.0
        starts.append((offset, name))
        for entry in history or []:
            if "loss" not in entry or any(k.startswith(("eval_", "train_")) for k in entry):
                continue
            step = float(entry.get("step", 0))
            last = max(last, step)
            for key, value in entry.items():
                if (key == "loss" or key.startswith("loss_")) and isinstance(value, (int, float)) \
                        and math.isfinite(value):
                    steps, values = series.setdefault(key, ([], []))
                    steps.append(offset + step)
                    values.append(float(value))
        offset += last
    return series, starts


def _loss_label(key: str) -> str:
    if key == "loss":
        return "total loss"
    if key == "loss_task":
        return "task loss (weighted)"
    return f"{key[len('loss_'):]} (weighted)"


def plot_loss_curves(histories: Sequence[tuple[str | None, Sequence[Mapping[str, Any]]]],
                     path: str | os.PathLike, title: str | None = None) -> Path | None:
    """The per-term loss curves of a training run as a PNG at ``path``; None when nothing was logged."""
    series, starts = loss_series(histories)
    if not series:
        return None
    figure, (ax,) = _figure(4.5)
    order = ["loss"] + sorted(k for k in series if k != "loss")
    values = [v for k in order for v in series[k][1]]
    positive = all(v > 0 for v in values)
    for i, key in enumerate(order):
        steps, ys = series[key]
        total = key == "loss"
        colour = "black" if total else CURVE_COLOURS[(i - 1) % len(CURVE_COLOURS)]
        ax.plot(steps, ys, color=colour, linewidth=2.4 if total else 1.8, linestyle="--" if total else "-",
                marker="o" if len(steps) <= 12 else None, markersize=4, label=_loss_label(key))
    if positive and max(values) / min(values) > 30:
        ax.set_yscale("log")
    for start, name in starts[1:] if len(starts) > 1 else []:
        ax.axvline(start, color="#444444", linewidth=1, linestyle=":")
    if len(starts) > 1:
        for start, name in starts:
            ax.annotate(f"stage {name}", (start, 1.0), xycoords=("data", "axes fraction"), xytext=(4, -14),
                        textcoords="offset points", fontsize=9, color="#444444")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("training step (optimiser steps)", fontsize=11)
    ax.set_ylabel("loss value (log scale)" if ax.get_yscale() == "log" else "loss value", fontsize=11)
    ax.set_title(title or "Training loss per term (each term times its weight)", fontsize=12)
    ax.legend(fontsize=9, loc="best", ncol=2 if len(order) > 4 else 1, framealpha=0.9)
    return _save(figure, path)


# ----------------------------------------------------------------------------- metric vs size and speed
def plot_tradeoff(points: Sequence[Mapping[str, Any]], metric: str, path: str | os.PathLike,
                  latency_setup: str | None = None) -> Path | None:
    """``metric`` against parameters (left) and latency (right) as a PNG; None with fewer than two models.

    Each point: ``{"role": teacher | alone | distilled, "params", "latency_ms", "value", "std", "seeds"}``
    (``std``: the spread over ``seeds`` seeds, drawn as an error bar); ``latency_setup`` (``batch 32``) goes in
    the latency panel's title. Points at (about) the same x (the student alone and distilled have the same
    size) are drawn side by side; the size panel labels each point with its value.
    """
    usable = [p for p in points if isinstance(p.get("value"), (int, float))]
    if len(usable) < 2:
        return None
    figure, axes = _figure(4.4, ncols=2)
    for ax, key, xlabel in ((axes[0], "params", "parameters (log scale)"),
                            (axes[1], "latency_ms", "latency (ms per example, log scale)")):
        placed = [(p, p.get(key)) for p in usable if p.get(key)]
        xs = [x for _, x in placed]
        for i, (point, x) in enumerate(placed):
            # Within ~12% (the two students: one architecture, latencies that differ by timing noise): side by side
            # about the group's middle, so that none hides another.
            same = sorted((j for j, (_, y) in enumerate(placed) if abs(math.log(y / x)) < 0.12),
                          key=lambda j: (placed[j][1], j))  # their own order first, then role order
            # Its value label: left of the first of points side by side, below a middle one, else right.
            side = "right" if len(same) < 2 or same[-1] == i else "left" if same[0] == i else "below"
            if len(same) > 1:
                middle = math.exp(statistics.fmean(math.log(placed[j][1]) for j in same))
                x = middle * 1.12 ** (same.index(i) - (len(same) - 1) / 2)
            colour, marker, label = ROLE_STYLE.get(point.get("role"), ("#333333", "o", str(point.get("role"))))
            value, std = point["value"], point.get("std")
            if std:
                ax.errorbar([x], [value], yerr=[std], color=colour, marker=marker, markersize=9, capsize=5,
                            linestyle="none", label=label, zorder=3)
            else:
                ax.plot([x], [value], color=colour, marker=marker, markersize=9, linestyle="none", label=label,
                        zorder=3)
            offset, ha, va = {"right": ((8, 4), "left", "bottom"), "left": ((-8, 4), "right", "bottom"),
                              "below": ((0, -10), "center", "top")}[side]
            if key == "params":  # values once, where points of the same x are drawn apart (latencies may crowd)
                ax.annotate(f"{value:.4f}" if abs(value) < 10 else f"{value:.1f}", (x, value), xytext=offset,
                            textcoords="offset points", fontsize=9, color=colour, ha=ha, va=va)
        if xs:
            ax.set_xscale("log")
            low, high = min(xs), max(xs)
            pad = max((high / low) ** 0.2, 1.6)
            ax.set_xlim(low / pad / 1.5, high * pad * 1.5)  # room for the value labels
            _log_ticks(ax, _count if key == "params" else (lambda v: f"{v:g}"), math.log10(high * pad / (low / pad)))
        ax.set_xlabel(xlabel, fontsize=10.5)
        ax.set_ylabel(metric, fontsize=11)
    values = [p["value"] for p in usable]
    spread = [p.get("std") or 0.0 for p in usable]
    low = min(v - s for v, s in zip(values, spread))
    high = max(v + s for v, s in zip(values, spread))
    margin = max((high - low) * 0.2, 0.005)
    for ax in axes:
        ax.set_ylim(low - margin, high + margin)
    axes[0].set_title(f"{metric} vs. size", fontsize=12)
    axes[1].set_title(f"{metric} vs. speed" + (f" ({latency_setup})" if latency_setup else ""), fontsize=12)
    handles, labels = axes[0].get_legend_handles_labels()
    if len(handles) < len(usable):
        handles, labels = axes[1].get_legend_handles_labels()
    seeds = max((p.get("seeds") or 1 for p in usable if p.get("std")), default=1)
    figure.legend(handles, labels, loc="outside lower center", ncol=len(labels), fontsize=10, frameon=False,
                  title=f"students: mean ± std over {seeds} seeds" if seeds > 1 else None, title_fontsize=9.5)
    return _save(figure, path)


def _log_ticks(ax: Any, text: Any, decades: float) -> None:
    """Readable labels on a log axis: ``100k``, ``0.05``; minor ticks labelled (1, 2, 5) when it spans little."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: text(v)))
    if decades < 1.5:
        shown = (2, 3, 4, 5, 6, 7, 8, 9) if decades < 0.35 else (2, 3, 5)

        def minor(v, _):
            mantissa = v / 10 ** math.floor(math.log10(v) + 1e-9)
            return text(v) if round(mantissa) in shown and abs(mantissa - round(mantissa)) < 1e-6 else ""

        ax.xaxis.set_minor_formatter(FuncFormatter(minor))
    else:
        ax.xaxis.set_minor_formatter(NullFormatter())


def _count(value: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= scale:
            return f"{value / scale:g}{unit}"
    return f"{value:g}"


# ----------------------------------------------------------------------------- a benchmark's methods
def plot_method_gains(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike, *, metric: str = "accuracy",
                      noise: float | None = None, title: str | None = None, note: str | None = None) -> Path | None:
    """Each method's gain over the baseline (points), with its spread over seeds, as a horizontal bar chart.

    ``rows``: ``{"method", "gain", "std" (None for one seed), "seeds" (count)}``, gains in points, drawn in
    the given order from the top. ``noise``: the baseline's seed noise in points (e.g. 2 std), drawn as a
    band around zero; bars inside it are grey, above it blue, below it orange.
    """
    if not rows:
        return None
    height = max(3.0, 0.24 * len(rows) + 1.6)
    figure, (ax,) = _figure(height)
    ys = list(range(len(rows)))[::-1]
    colours = []
    for row in rows:
        gain = row["gain"]
        if noise is not None and abs(gain) <= noise:
            colours.append("#AAAAAA")
        else:
            colours.append("#0072B2" if gain > 0 else "#E69F00")
    errors = [row.get("std") or 0.0 for row in rows]
    ax.barh(ys, [row["gain"] for row in rows], color=colours, height=0.7, zorder=2)
    with_std = [(y, row) for y, row in zip(ys, rows) if row.get("std") is not None]
    if with_std:
        ax.errorbar([r["gain"] for _, r in with_std], [y for y, _ in with_std], xerr=[r["std"] for _, r in with_std],
                    fmt="none", ecolor="black", elinewidth=1.3, capsize=3, zorder=3)
    if noise:
        ax.axvspan(-noise, noise, color="#DDDDDD", alpha=0.6, zorder=1, linewidth=0)
    ax.axvline(0, color="black", linewidth=1, zorder=2)
    low = min(r["gain"] - e for r, e in zip(rows, errors))
    high = max(r["gain"] + e for r, e in zip(rows, errors))
    span = max(high, noise or 0) - min(low, -(noise or 0))
    for y, row, error in zip(ys, rows, errors):  # each bar's value at its end
        gain = row["gain"]
        text = f"{gain:+.2f}" + (f" ± {row['std']:.2f}" if row.get("std") is not None else "")
        end = gain + error if gain >= 0 else gain - error
        ax.annotate(text, (end, y), xytext=(4 if gain >= 0 else -4, 0), textcoords="offset points", fontsize=8.5,
                    ha="left" if gain >= 0 else "right", va="center", color="#222222")
    ax.set_yticks(ys)
    ax.set_yticklabels([f"{row['method']}" + (f" ({row['seeds']} seeds)" if row.get("seeds", 1) > 1 else "")
                        for row in rows], fontsize=10)
    ax.set_ylim(-0.7, len(rows) - 0.3)
    ax.grid(True, axis="x", alpha=0.3)
    ax.grid(False, axis="y")
    ax.set_xlim(min(low, -(noise or 0)) - 0.15 * span, max(high, noise or 0) + 0.2 * span)  # room for the values
    ax.set_xlabel(f"gain over the baseline ({metric} points; error bar: std over seeds)", fontsize=11)
    ax.set_title(title or f"{metric} gain over the student trained alone", fontsize=12)
    if noise is not None:
        from matplotlib.patches import Patch

        handles = [Patch(color="#0072B2", label="above seed noise"), Patch(color="#AAAAAA", label="within seed noise"),
                   Patch(color="#E69F00", label="below seed noise")]
        ax.legend(handles=handles, loc="upper left" if rows[0]["gain"] >= 0 else "upper right", fontsize=9.5,
                  framealpha=0.95)
    if note:
        figure.text(0.01, 0.0, note, fontsize=8.5, color="#333333", ha="left", va="bottom", wrap=True)
        bottom = min(0.3, 0.45 / height)  # two lines of the note, in figure fractions
        figure.get_layout_engine().set(rect=(0, bottom, 1, 1 - bottom))
    return _save(figure, path)


# ----------------------------------------------------------------------------- a run's pictures and the card
def tradeoff_points(rows: Iterable[Any], metric: str, roles: Mapping[str, str],
                    comparison: Any = None) -> list[dict[str, Any]]:
    """The points of :func:`plot_tradeoff` from the summary's rows (:class:`hfdistill.summary.ModelRow`).

    ``roles`` maps ``teacher``/``alone``/``distilled`` to row roles. With a comparison over several seeds the
    student points are its means, with its standard deviations as error bars.
    """
    by_role = {row.role: row for row in rows}
    points = []
    seeds = comparison.to_dict() if comparison is not None and comparison.n > 1 else None
    for role, row_role in roles.items():
        row = by_role.get(row_role)
        if row is None:
            continue
        point = {"role": role, "params": row.params, "value": row.metrics.get(metric),
                 "latency_ms": row.latency_ms[max(row.latency_ms)] if row.latency_ms else None}
        if seeds is not None and role in ("alone", "distilled"):
            point.update(value=seeds[f"{role}_mean"], std=seeds[f"{role}_std"], seeds=comparison.n)
        points.append(point)
    return points


def write_run_plots(folder: str | os.PathLike, *, histories: Sequence[tuple[str | None, Sequence[Mapping]]],
                    points: Sequence[Mapping[str, Any]] = (), metric: str = "accuracy",
                    latency_setup: str | None = None) -> dict[str, Any]:
    """Draw a run's pictures into ``<folder>/plots/``; returns the card values that show them.

    ``{"plots": [{"path", "alt", "caption", "kind"}], "plots_note": None}`` with paths relative to
    ``folder`` (so the card's links work on the Hub), or ``{"plots": None, "plots_note": MISSING_NOTE}``
    without matplotlib.
    """
    folder = Path(folder)
    for name in (LOSS_CURVES_NAME, TRADEOFF_NAME):  # an earlier run's pictures (--overwrite) must not stay behind
        (folder / name).unlink(missing_ok=True)
    if not matplotlib_available():
        return {"plots": None, "plots_note": MISSING_NOTE}
    plots = []
    try:
        if plot_loss_curves(histories, folder / LOSS_CURVES_NAME):
            plots.append({"kind": "losses", "path": LOSS_CURVES_NAME, "alt": "Training loss per term",
                          "caption": "Training losses: each term's weighted value (`loss_<term>` in the logs), the "
                                     "task loss and the total, over the optimiser steps."})
        if plot_tradeoff(points, metric, folder / TRADEOFF_NAME, latency_setup=latency_setup):
            plots.append({"kind": "tradeoff", "path": TRADEOFF_NAME, "alt": f"{metric} against parameters and latency",
                          "caption": f"{metric.capitalize()} against size and latency (measured on the machine that "
                                     "trained it): the teacher, the student trained alone and the distilled student."})
    except Exception as error:  # a picture must never cost the result of a finished run
        logger.warning("Plots were not drawn: %s: %s", type(error).__name__, error)
        return {"plots": plots or None, "plots_note": f"Plots were not drawn: {type(error).__name__}: {error}."}
    return {"plots": plots or None, "plots_note": None}
