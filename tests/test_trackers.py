"""Trackers (``training.report_to``): the per-term losses, the teacher's evaluation and the final comparison reach
them. TensorBoard is the offline one tested; the logs go through the trainer's callback handler, as every
integration's do, so W&B, MLflow, ... get the same keys."""

import json
from pathlib import Path

import pytest

import hfdistill
from hfdistill.summary import COMPARISON_PREFIX
from test_cli import tiny_recipe


def _scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of the TensorBoard event files under ``folder`` (``runs/<date>_<host>/``), by tag."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    found: dict[str, list[tuple[int, float]]] = {}
    runs = sorted({path.parent for path in folder.glob("runs/*/events.out.tfevents.*")})
    assert runs, f"no TensorBoard event files under {folder}/runs"
    for run in runs:
        events = EventAccumulator(str(run), size_guidance={"scalars": 0})
        events.Reload()
        for tag in events.Tags()["scalars"]:
            found.setdefault(tag, []).extend((e.step, e.value) for e in events.Scalars(tag))
    return found


@pytest.fixture(scope="module")
def tensorboard_run(tmp_path_factory):
    pytest.importorskip("tensorboard")
    tmp_path = tmp_path_factory.mktemp("trackers")
    recipe = tiny_recipe(tmp_path, student__baseline=True, student__baseline_seeds=2)
    recipe["terms"].append({"loss": "logits_mse", "weight": 0.1})  # two terms: two per-term curves
    recipe["training"].update(report_to="tensorboard", logging_steps=1)
    return hfdistill.run(hfdistill.Recipe.from_dict(recipe), print_summary=False)


def test_per_term_losses_reach_tensorboard_under_the_logged_names(tensorboard_run):
    result = tensorboard_run
    scalars = _scalars(Path(result.output_dir))
    logged = [entry for entry in result.trainer.state.log_history if "loss" in entry and "train_runtime" not in entry]
    names = {key for entry in logged for key in entry if key.startswith("loss_")}
    assert names == {"loss_task", "loss_kd", "loss_logits_mse"}
    for name in names | {"loss"}:  # the Trainer's writer prefixes training logs with train/
        steps = [(entry["step"], entry[name]) for entry in logged]
        assert [step for step, _ in scalars[f"train/{name}"]] == [step for step, _ in steps], name
        assert [value for _, value in scalars[f"train/{name}"]] == pytest.approx([v for _, v in steps], rel=1e-5)
    # The no-teacher run logs its task loss to its own folder.
    baseline = next(job for job in result.jobs if job.comparison == "no teacher" and not job.extra_seed)
    assert "train/loss_task" in _scalars(Path(baseline.output_dir))


def test_teacher_evaluation_and_final_comparison_reach_tensorboard(tensorboard_run):
    result = tensorboard_run
    scalars = _scalars(Path(result.output_dir))
    # The teacher is evaluated once, after training (the writer was closed at the end of training).
    assert scalars["eval/teacher_accuracy"] == [(4, pytest.approx(result.metrics["eval_teacher_accuracy"]))]
    assert "eval/teacher_loss" in scalars and "eval/accuracy" in scalars
    saved = json.loads((Path(result.output_dir) / "distill_results.json").read_text())
    comparison = saved["comparison"]
    final = {tag[len("eval/"):]: values for tag, values in scalars.items() if tag.startswith("eval/comparison_")}
    assert final["comparison_gain_points"] == [(4, pytest.approx(comparison["gain_points"], abs=1e-4))]
    assert final["comparison_gain_std_points"][0][1] == pytest.approx(comparison["gain_std_points"], abs=1e-4)
    assert final["comparison_seeds"][0][1] == 2
    assert final["comparison_alone_accuracy_mean"][0][1] == pytest.approx(comparison["alone_mean"])
    assert final["comparison_distilled_accuracy"][0][1] == pytest.approx(result.metrics["eval_accuracy"])
    assert final["comparison_teacher_accuracy"][0][1] == pytest.approx(result.metrics["eval_teacher_accuracy"])
    rows = {row.role: row for row in result.plan.rows}
    assert final["comparison_teacher_params"][0][1] == rows["teacher"].params
    assert final["comparison_distilled_latency_ms"][0][1] > 0 and final["comparison_alone_latency_ms"][0][1] > 0
    # Sent to the trackers only: the trainer's own history (which the card reads) is what training logged.
    assert not any(key.startswith(COMPARISON_PREFIX) for entry in result.trainer.state.log_history for key in entry)


def test_log_to_trackers_goes_through_the_trainers_callback_handler():
    from hfdistill.summary import log_to_trackers

    class Handler:
        def __init__(self):
            self.calls = []

        def on_log(self, args, state, control, logs):
            self.calls.append(logs)

    class Trainer:
        args, state, control = object(), object(), object()
        callback_handler = Handler()

    trainer = Trainer()
    log_to_trackers(trainer, {"eval_comparison_gain_points": 1.0})
    log_to_trackers(trainer, {})  # nothing to send: no call
    log_to_trackers(None, {"x": 1.0})
    assert trainer.callback_handler.calls == [{"eval_comparison_gain_points": 1.0}]
