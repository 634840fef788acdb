"""Pictures (hfdistill.plots): loss curves from the trainer's logs, metric against size and latency, the methods
benchmark's gains chart; matplotlib is optional (the card then says so)."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from hfdistill import plots

REPO = Path(__file__).resolve().parents[1]
BENCH_RESULTS = REPO / "benchmarks" / "results" / "methods_fashion_mnist.jsonl"

STAGED_HISTORY = [
    ("hint", [{"loss": 0.8, "loss_hint": 0.8, "grad_norm": 1.0, "step": 2},
              {"loss": 0.5, "loss_hint": 0.5, "step": 4},
              {"eval_loss": 2.0, "eval_accuracy": 0.2, "step": 4},
              {"train_runtime": 1.0, "train_loss": 0.6, "step": 4}]),
    ("distill", [{"loss": 3.0, "loss_task": 2.0, "loss_hint": 0.01, "loss_kd": 0.99, "step": 2},
                 {"eval_teacher_accuracy": 0.9, "step": 2},
                 {"loss": 1.5, "loss_task": 1.0, "loss_hint": 0.005, "loss_kd": 0.495, "step": 4}]),
]


def _png_size(path) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as image:
        assert image.format == "PNG"
        return image.size


def test_loss_series_reads_the_logged_terms_and_puts_stages_one_after_another():
    series, starts = plots.loss_series(STAGED_HISTORY)
    assert set(series) == {"loss", "loss_hint", "loss_task", "loss_kd"}  # the logged names, nothing else
    assert series["loss_hint"] == ([2.0, 4.0, 6.0, 8.0], [0.8, 0.5, 0.01, 0.005])  # stage 2 continues at step 4
    assert series["loss_kd"] == ([6.0, 8.0], [0.99, 0.495])
    assert starts == [(0.0, "hint"), (4.0, "distill")]
    assert plots.loss_series([(None, [{"eval_loss": 1.0, "step": 1}])]) == ({}, [(0.0, None)])


def test_pictures_are_written_readable_sizes(tmp_path):
    pytest.importorskip("matplotlib")
    path = plots.plot_loss_curves(STAGED_HISTORY, tmp_path / "plots" / "losses.png")
    width, height = _png_size(path)
    assert (width, height) == (1200, 675)  # 8 x 4.5 inches at 150 dpi: the Hub shows it ~800 px wide
    assert plots.plot_loss_curves([(None, [])], tmp_path / "none.png") is None and not (tmp_path / "none.png").exists()
    points = [{"role": "teacher", "params": 11_180_000, "latency_ms": 0.53, "value": 0.9811},
              {"role": "alone", "params": 101_770, "latency_ms": 0.099, "value": 0.9579, "std": 0.0077, "seeds": 5},
              {"role": "distilled", "params": 101_770, "latency_ms": 0.092, "value": 0.9666, "std": 0.0042, "seeds": 5}]
    width, _ = _png_size(plots.plot_tradeoff(points, "accuracy", tmp_path / "tradeoff.png", latency_setup="batch 32"))
    assert width == 1200
    assert plots.plot_tradeoff(points[:1], "accuracy", tmp_path / "one.png") is None  # nothing to compare
    cached_teacher = [{**points[0], "latency_ms": None, "value": None}, *points[1:]]  # a cache: no latency, no metric
    assert plots.plot_tradeoff(cached_teacher, "accuracy", tmp_path / "students.png") is not None


def test_write_run_plots_returns_the_card_values(tmp_path):
    pytest.importorskip("matplotlib")
    from hfdistill.summary import ModelRow, SeedComparison

    rows = [ModelRow("teacher", "t", 373_660, 1_500_000, {"accuracy": 0.9}, {1: 0.5, 32: 0.2}),
            ModelRow("student (no teacher)", "b", 101_770, 425_000, {"accuracy": 0.8}, {1: 0.8, 32: 0.12}),
            ModelRow("student (distilled)", "s", 101_770, 425_000, {"accuracy": 0.85}, {1: 0.9, 32: 0.11})]
    roles = {"teacher": "teacher", "alone": "student (no teacher)", "distilled": "student (distilled)"}
    comparison = SeedComparison("accuracy", [42, 43], [0.8, 0.82], [0.85, 0.84])
    points = plots.tradeoff_points(rows, "accuracy", roles, comparison)
    assert [(p["role"], p["latency_ms"]) for p in points] == [("teacher", 0.2), ("alone", 0.12), ("distilled", 0.11)]
    assert points[2]["value"] == pytest.approx(0.845) and points[2]["std"] == pytest.approx(0.00707, abs=1e-5)
    values = plots.write_run_plots(tmp_path, histories=STAGED_HISTORY, points=points, latency_setup="batch 32")
    assert values["plots_note"] is None
    assert [(p["kind"], p["path"]) for p in values["plots"]] == [("losses", plots.LOSS_CURVES_NAME),
                                                                  ("tradeoff", plots.TRADEOFF_NAME)]
    assert all((tmp_path / p["path"]).is_file() for p in values["plots"])


def test_without_matplotlib_nothing_is_drawn_and_the_card_line_says_why(tmp_path, monkeypatch):
    stale = tmp_path / plots.LOSS_CURVES_NAME  # an earlier result's picture, in a folder run again (--overwrite)
    stale.parent.mkdir()
    stale.write_bytes(b"old")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` fails, as when it is not installed
    assert not plots.matplotlib_available()
    values = plots.write_run_plots(tmp_path, histories=STAGED_HISTORY)
    assert values == {"plots": None, "plots_note": plots.MISSING_NOTE}
    assert "pip install hfdistill[plots]" in plots.MISSING_NOTE
    assert not stale.exists() and not any(stale.parent.iterdir())


def test_a_failing_picture_does_not_fail_the_run(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")

    def broken(*args, **kwargs):
        raise RuntimeError("no fonts")

    monkeypatch.setattr(plots, "plot_loss_curves", broken)
    values = plots.write_run_plots(tmp_path, histories=STAGED_HISTORY)
    assert values["plots"] is None and values["plots_note"] == "Plots were not drawn: RuntimeError: no fonts."


# ------------------------------------------------------------------------------ the methods benchmark's chart
def _benchmark():
    spec = importlib.util.spec_from_file_location("methods_fashion_mnist",
                                                  REPO / "benchmarks" / "methods_fashion_mnist.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_gains_match_its_table_and_plot_only_draws_them_without_training(tmp_path):
    bench = _benchmark()
    records = [json.loads(line) for line in BENCH_RESULTS.read_text().splitlines() if line.strip()]
    rows, noise, left_out = bench.gain_rows(records)
    by_method = {row["method"]: row for row in rows}
    table = (BENCH_RESULTS.with_suffix(".md")).read_text()
    assert "| kd | " in table and "| +0.0165 |" in table  # the committed table's "vs baseline" for kd
    assert by_method["kd"]["gain"] == pytest.approx(1.65, abs=0.006) and by_method["kd"]["seeds"] == 3
    assert by_method["kd"]["std"] is not None and by_method["mgd"]["std"] is None  # one seed: no spread
    assert noise == pytest.approx(2 * 0.54, abs=0.01)  # the table's threshold: 2 baseline std (0.0107)
    assert "baseline" not in by_method and left_out == ["rkd"]  # rkd diverged: no accuracy
    assert [row["gain"] for row in rows] == sorted((row["gain"] for row in rows), reverse=True)
    if not plots.matplotlib_available():
        pytest.skip("matplotlib is not installed")
    (tmp_path / BENCH_RESULTS.name).write_text(BENCH_RESULTS.read_text())
    out = tmp_path / "methods_fashion_mnist.md"
    assert bench.main(["--plot-only", "--out", str(out)]) == 0
    width, height = _png_size(out.with_suffix(".png"))
    assert width == 1200 and height > width  # a bar per method
    assert not out.exists()  # the report is left as it is
    assert bench.main(["--plot-only", "--out", str(tmp_path / "nothing" / "x.md")]) == 2
