"""The run pipeline (hfdistill.run): stages end to end, resume rules, `hfdistill check`, early validation."""

import json
import os
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import hfdistill
from hfdistill.cli import main
from hfdistill.errors import RecipeError
from hfdistill.outputs import CHECKPOINT_COMPLETE_NAME
from test_cli import tiny_recipe, write

run_module = sys.modules["hfdistill.run"]  # `hfdistill.run` is the function


def two_stage_recipe(tmp_path, name: str = "out", **training) -> dict:
    """Hint stage (FitNets through a conv regressor, no task loss) then KD plus the same hint term."""
    recipe = tiny_recipe(tmp_path)
    recipe["student"] = {"name": "timm:test_resnet"}
    recipe["data"].update(augment="none", image_size=8)
    del recipe["terms"]
    hint = {"loss": "fitnet", "name": "hint", "weight": 1.0, "student": "layer2", "teacher": "layer2",
            "adapter": "conv_reg"}
    recipe["stages"] = [
        {"name": "hint", "terms": [hint], "task_weight": 0, "training": {"max_steps": 3, "learning_rate": 0.01}},
        {"name": "distill", "terms": [dict(hint, weight=0.5), {"loss": "kd", "weight": 0.5}], "task_weight": 0.5},
    ]
    recipe["training"].update(output_dir=str(tmp_path / name / "student"), max_steps=4, save_strategy="steps",
                              save_steps=2, logging_steps=1, seed=3)
    recipe["training"].update(training)
    return recipe


def _weights(folder) -> dict:
    return load_file(str(Path(folder) / "model.safetensors"))


def _same_weights(a, b) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


# ------------------------------------------------------------------------------ stages end to end
def test_two_stage_recipe_from_the_cli(tmp_path, capsys):
    recipe = two_stage_recipe(tmp_path)
    assert main(["train", write(tmp_path, recipe)]) == 0
    out = capsys.readouterr().out
    assert "--> stage 1/2 'hint'" in out and "--> stage 2/2 'distill'" in out
    assert out.index("'hint'") < out.index("'distill'")
    assert "Stages of the student (distilled):" in out and "1. hint: 1 hint, task weight 0; 3 steps" in out
    student = tmp_path / "out" / "student"
    hint = tmp_path / "out" / "student-stages" / "hint"
    marker = json.loads((hint / run_module.STAGE_COMPLETE_NAME).read_text())
    assert marker["stage"] == "hint" and marker["global_step"] == 3
    assert (hint / "model.safetensors").is_file() and (hint / "distill_state.safetensors").is_file()
    assert (hint / "checkpoint-2").is_dir()  # the stage's checkpoints are in its own folder
    assert any(k.startswith("adapters.hint") for k in load_file(str(hint / "distill_state.safetensors")))
    # The student folder holds the last stage only: no stage folder, no distill state outside checkpoints.
    assert (student / "model.safetensors").is_file() and (student / "README.md").is_file()
    assert not (student / "distill_state.safetensors").exists() and not (student / "hint").exists()
    saved = yaml.safe_load((student / "distill_recipe.yaml").read_text())
    assert [s["name"] for s in saved["stages"]] == ["hint", "distill"]
    results = json.loads((student / "distill_results.json").read_text())  # the card's values, stages included
    assert [(s["name"], s["steps"]) for s in results["stages"]] == [("hint", 3), ("distill", 4)]
    assert not (tmp_path / "out" / "student-stages" / "distill").exists()


def test_two_stage_recipe_from_python(tmp_path):
    recipe = hfdistill.Recipe.from_dict(two_stage_recipe(tmp_path, save_strategy="no"))
    result = hfdistill.run(recipe, overrides={"stages.0.training.max_steps": 2}, print_summary=False)
    assert isinstance(result, hfdistill.RunResult)
    assert [s.name for s in result.stages] == ["hint", "distill"]
    assert [s.status for s in result.stages] == ["trained", "trained"]
    assert [s.global_step for s in result.stages] == [2, 4]
    assert result.output_dir == str(tmp_path / "out" / "student") and "eval_accuracy" in result.metrics
    assert "Stages of the student (distilled)" in result.summary
    assert result.trainer is result.stages[-1].trainer
    # Each stage continued the same student object.
    assert result.stages[0].trainer.student.timm_model is result.stages[1].trainer.student.timm_model


# ------------------------------------------------------------------------------ resume
def _interrupt_at(monkeypatch, call: int) -> None:
    from hfdistill.trainer import DistillationTrainer

    original = DistillationTrainer.training_step
    calls = {"n": 0}

    def step(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == call:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(DistillationTrainer, "training_step", step)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("uninterrupted")
    recipe = two_stage_recipe(tmp_path)
    result = hfdistill.run(write(tmp_path, recipe), print_summary=False)
    return result.output_dir


@pytest.mark.parametrize("interrupt_at, resume", [(6, "checkpoint"), (4, "true")],
                         ids=["in-stage-2-after-a-checkpoint", "at-the-start-of-stage-2"])
def test_interrupted_in_stage_2_resumes_to_the_same_student(tmp_path, capsys, monkeypatch, uninterrupted,
                                                             interrupt_at, resume):
    """Stage 1 trains 3 steps, stage 2 4 (checkpoints every 2): interrupted at stage 2's step 3 or 1."""
    path = write(tmp_path, two_stage_recipe(tmp_path))
    with monkeypatch.context() as patch:
        _interrupt_at(patch, interrupt_at)
        assert main(["train", path]) == 130
    err = capsys.readouterr().err
    student = tmp_path / "out" / "student"
    assert "stage 'distill' of the student (distilled)" in err
    if resume == "checkpoint":
        checkpoint = student / "checkpoint-2"
        assert f"--training.resume_from_checkpoint {checkpoint}" in err
        override = str(checkpoint)
    else:
        assert "Stage(s) hint are complete; `--training.resume_from_checkpoint true`" in " ".join(err.split())
        override = "true"
    assert main(["train", path, "--training.resume_from_checkpoint", override]) == 0
    out = capsys.readouterr().out
    assert "--> stage 1/2 'hint': complete in" in out and "loaded" in out
    assert "(loaded: completed earlier)" in out
    _same_weights(student, uninterrupted)


def test_interrupt_in_stage_1_from_python_then_resume(tmp_path, monkeypatch, uninterrupted):
    path = write(tmp_path, two_stage_recipe(tmp_path))
    with monkeypatch.context() as patch:
        _interrupt_at(patch, 3)
        with pytest.raises(hfdistill.RunInterrupted) as stop:
            hfdistill.run(path, print_summary=False)
    assert stop.value.stage.name == "hint" and "checkpoint-2" in stop.value.hint()
    result = hfdistill.run(path, overrides=["--training.resume_from_checkpoint", "true"], print_summary=False)
    assert [s.status for s in result.stages] == ["resumed", "trained"]
    _same_weights(result.output_dir, uninterrupted)


def _plan_job(tmp_path, recipe_data=None):
    recipe = hfdistill.Recipe.from_dict(recipe_data or two_stage_recipe(tmp_path))
    stages = run_module._stage_runs(recipe, recipe.training["output_dir"])
    return run_module.Job("student (distilled)", recipe.training["output_dir"], None, recipe=recipe, stages=stages)


def _fake_stage(stage, complete=True, checkpoints=(), spec=None):
    os.makedirs(stage.output_dir, exist_ok=True)
    for step in checkpoints:
        os.makedirs(os.path.join(stage.output_dir, f"checkpoint-{step}"), exist_ok=True)
        Path(stage.output_dir, f"checkpoint-{step}", "trainer_state.json").write_text("{}")
        Path(stage.output_dir, f"checkpoint-{step}", CHECKPOINT_COMPLETE_NAME).write_text("{}")
    if complete:
        data = spec if spec is not None else run_module._spec_data(stage.spec)
        Path(stage.output_dir, run_module.STAGE_COMPLETE_NAME).write_text(json.dumps({"stage": stage.name, "spec": data}))


def test_resume_rules(tmp_path):
    job = _plan_job(tmp_path)
    hint, distill = job.stages
    assert hint.output_dir == str(tmp_path / "out" / "student-stages" / "hint")
    assert distill.output_dir == str(tmp_path / "out" / "student")
    run_module.plan_resume(job, None)
    assert [s.status for s in job.stages] == ["pending", "pending"] and distill.resume_from is None
    with pytest.raises(RecipeError, match="nothing to resume"):
        run_module.plan_resume(job, True)
    # Stage 1 interrupted: it resumes from its own last checkpoint.
    _fake_stage(hint, complete=False, checkpoints=(2, 4))
    run_module.plan_resume(job, True)
    assert hint.status == "pending" and hint.resume_from.endswith("checkpoint-4") and distill.resume_from is None
    # A stage-2 checkpoint while stage 1 is not complete: refused.
    _fake_stage(distill, complete=False, checkpoints=(2,))
    with pytest.raises(RecipeError, match="stage 'hint' before it is not complete"):
        run_module.plan_resume(_plan_job(tmp_path), os.path.join(distill.output_dir, "checkpoint-2"))
    # Stage 1 complete: loaded; stage 2 resumes from its last checkpoint (true) or the one given.
    _fake_stage(hint)
    job = _plan_job(tmp_path)
    run_module.plan_resume(job, True)
    assert [s.status for s in job.stages] == ["loaded", "pending"] and job.stages[1].resume_from.endswith("checkpoint-2")
    job = _plan_job(tmp_path)
    run_module.plan_resume(job, "True")
    assert job.stages[1].resume_from.endswith("checkpoint-2")
    # A path outside the stage folders, a missing folder: bad input.
    outside = tmp_path / "elsewhere" / "checkpoint-2"
    outside.mkdir(parents=True)
    (outside / CHECKPOINT_COMPLETE_NAME).write_text("{}")
    with pytest.raises(RecipeError, match="not in a stage folder"):
        run_module.plan_resume(_plan_job(tmp_path), str(outside))
    with pytest.raises(RecipeError, match="is not a folder"):
        run_module.plan_resume(_plan_job(tmp_path), str(tmp_path / "nope"))
    # A completed stage made with another definition of the stage: refused.
    _fake_stage(hint, spec={"name": "hint", "terms": []})
    with pytest.raises(RecipeError, match="another definition"):
        run_module.plan_resume(_plan_job(tmp_path), True)


def test_stage_folders_of_extra_seeds_and_one_stage_recipes(tmp_path):
    one = _plan_job(tmp_path, tiny_recipe(tmp_path))
    assert [(s.name, s.output_dir, s.final) for s in one.stages] == [("distill", str(tmp_path / "out" / "student"), True)]
    recipe = hfdistill.Recipe.from_dict(two_stage_recipe(tmp_path, push_to_hub=True, hub_model_id="me/x"))
    runs = run_module._stage_runs(recipe, str(tmp_path / "s-seed8"), {"seed": 8}, publish=False)
    assert runs[0].output_dir == str(tmp_path / "s-seed8-stages" / "hint")
    assert all(r.training["seed"] == 8 and "push_to_hub" not in r.training for r in runs)
    runs = run_module._stage_runs(recipe, str(tmp_path / "s"))
    assert "push_to_hub" not in runs[0].training and runs[1].training["push_to_hub"] is True  # only the last stage
    assert runs[0].training["max_steps"] == 3 and runs[1].training["max_steps"] == 4  # stage's training merged


# ------------------------------------------------------------------------------ early validation
def test_teacher_trained_first_with_evaluation_each_epoch(tmp_path, capsys):
    """chatterbot_minilm.yaml's shape: a teacher trained first and `eval_strategy: epoch` (failed as shipped:
    the early term check built a trainer without an evaluation set)."""
    recipe = tiny_recipe(
        tmp_path,
        teacher={"name": str(tmp_path / "out" / "teacher"), "train_from": {"name": "timm:test_resnet"},
                 "train_args": {"max_steps": 2}},
    )
    recipe["training"].update(eval_strategy="epoch", max_steps=2, save_strategy="epoch", save_total_limit=1)
    assert main(["train", write(tmp_path, recipe)]) == 0
    assert "student (distilled)" in capsys.readouterr().out


def test_a_stage_that_does_not_fit_fails_before_anything_trains(tmp_path, capsys):
    """A wrong tap in the last stage, with a baseline and a teacher to train first: exit 2, nothing written."""
    recipe = two_stage_recipe(tmp_path)
    recipe["teacher"] = {"name": str(tmp_path / "out" / "teacher"), "train_from": {"name": "timm:test_resnet"}}
    recipe["student"]["baseline"] = True
    recipe["stages"][1]["terms"][0]["student"] = "layer9"
    assert main(["train", write(tmp_path, recipe)]) == 2
    err = capsys.readouterr().err
    assert "layer9" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_bad_loss_parameter_exits_2_before_the_baseline_trains(tmp_path, capsys):
    recipe = tiny_recipe(tmp_path, terms=[{"loss": "dkd", "params": {"alpha": -1.0}}], student__baseline=True)
    assert main(["train", write(tmp_path, recipe)]) == 2
    assert "alpha" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------ check
def test_check_reports_every_stage_and_writes_nothing(tmp_path, capsys):
    recipe = two_stage_recipe(tmp_path)
    recipe["teacher"] = {"name": str(tmp_path / "out" / "teacher"), "train_from": {"name": "timm:test_resnet"}}
    recipe["training"]["eval_strategy"] = "epoch"
    path = write(tmp_path, recipe)
    assert main(["check", path, "--stages.1.task_weight", "0.25"]) == 0
    out = capsys.readouterr().out
    for expected in ("student: timm:test_resnet", "teacher: timm:test_resnet", "trained first into",
                     "sklearn-digits: 128 training and 64 evaluation examples, 10 labels",
                     "stage 'hint'", "stage 'distill'", "task weight 0.25", "hint = 1 x fitnet",
                     "via conv_reg", "kd = 0.5 x kd", "teacher -> ", "nothing was trained or written"):
        assert expected in out, expected
    assert not (tmp_path / "out").exists()


def test_check_from_python_and_bad_input(tmp_path, capsys):
    report = run_module.check(hfdistill.Recipe.from_dict(tiny_recipe(tmp_path)))
    assert [s.name for s in report.stages] == ["distill"] and report.stages[0].terms[0]["loss"] == "kd"
    assert "terms -> " in report.text
    recipe = two_stage_recipe(tmp_path)
    recipe["stages"][0]["terms"][0]["teacher"] = "layer7"
    assert main(["check", write(tmp_path, recipe)]) == 2
    err = capsys.readouterr().err
    assert "layer7" in err and "hfdistill: error:" in err
    assert main(["check", str(tmp_path / "missing.yaml")]) == 2
    assert not (tmp_path / "out").exists()


def test_resume_true_with_nothing_to_resume_is_bad_input(tmp_path, capsys):
    path = write(tmp_path, two_stage_recipe(tmp_path))
    assert main(["check", path, "--training.resume_from_checkpoint", "true"]) == 2
    assert "nothing to resume" in " ".join(capsys.readouterr().err.split())


# ------------------------------------------------------------------------------ extra students (DML's peers)
def dml_recipe(tmp_path, peers: int = 2) -> dict:
    """Mutual learning without a teacher: the student and `peers` networks of its architecture."""
    recipe = tiny_recipe(tmp_path, teacher=None, terms=[{"loss": "dml", "weight": 1.0, "params": {"peers": peers}}])
    recipe["student"] = {"name": "timm:test_resnet"}
    recipe["data"].update(augment="none", image_size=8)
    return recipe


def test_dml_saves_every_peer_as_a_loadable_student(tmp_path):
    import numpy as np
    from PIL import Image
    from transformers import AutoModelForImageClassification, pipeline

    result = hfdistill.run(hfdistill.Recipe.from_dict(dml_recipe(tmp_path)), print_summary=False)
    student = Path(result.output_dir)
    peers_root = tmp_path / "out" / "student-peers"
    assert [(p.name, p.output_dir) for p in result.peers] == [("peer1", str(peers_root / "peer1")),
                                                             ("peer2", str(peers_root / "peer2"))]
    assert not (student / "peers").exists() and not any("peer" in f.name for f in student.iterdir())
    image = Image.fromarray((np.random.default_rng(0).random((8, 8)) * 255).astype("uint8"))
    weights = {"student": _weights(student)}
    for peer in result.peers:
        folder = Path(peer.output_dir)
        for name in ("config.json", "model.safetensors", "README.md", "distill_recipe.yaml", "all_results.json"):
            assert (folder / name).is_file(), (folder, name)
        assert "eval_accuracy" in peer.metrics
        predictions = pipeline("image-classification", model=str(folder))(image)
        assert predictions and {p["label"] for p in predictions} <= {str(i) for i in range(10)}
        model = AutoModelForImageClassification.from_pretrained(str(folder))
        assert model.config.id2label == AutoModelForImageClassification.from_pretrained(str(student)).config.id2label
        card = (folder / "README.md").read_text()
        assert "peer network trained together with the student `student`" in card
        weights[peer.name] = _weights(folder)
    assert weights["peer1"].keys() == weights["student"].keys()
    assert not torch.equal(weights["peer1"]["fc.weight"], weights["student"]["fc.weight"])
    assert not torch.equal(weights["peer1"]["fc.weight"], weights["peer2"]["fc.weight"])
    # The summary and the student's card show every peer beside the student.
    table = result.summary.split("Summary")[1].splitlines()
    for name in ("peer1", "peer2"):
        assert any(line.startswith(f"{name} ") and "student-peers" in line for line in table), name
        assert f"pipeline('image-classification', model='{peers_root / name}')" in result.summary
    card = (student / "README.md").read_text()
    assert "| Metric | Teacher | Student | Peer `peer1` | Peer `peer2` |" in card
    assert "## Peers" in card and "`student-peers/peer2`" in card and str(tmp_path) not in card
    results = json.loads((student / "distill_results.json").read_text())
    assert [p["name"] for p in results["peers"]] == ["peer1", "peer2"]


def test_save_extra_students_writes_each_as_a_student_folder(tmp_path, digits):
    """The saving step alone: a trainer whose loss has peers -> one complete, evaluated student folder each."""
    from conftest import tiny_timm
    from test_trainer import make_args
    from transformers import TimmWrapperForImageClassification

    from hfdistill.trainer import DistillationTrainer

    train, eval_ = digits
    output_dir = str(tmp_path / "out" / "student")
    trainer = DistillationTrainer(
        model=tiny_timm(), recipe={"terms": [{"loss": "dml", "params": {"peers": 2}}]},
        args=make_args(tmp_path, output_dir=output_dir), train_dataset=train.select(range(32)),
        eval_dataset=eval_.select(range(16)), compute_metrics=None, id2label={i: f"d{i}" for i in range(10)},
    )
    stage = run_module.StageRun(None, 0, output_dir, {"output_dir": output_dir, "use_cpu": True, "report_to": "none",
                                                       "push_to_hub": True, "hub_model_id": "me/x"}, True)
    peers = run_module.save_extra_students(stage, trainer)
    assert [p.name for p in peers] == ["peer1", "peer2"]
    for peer, module in zip(peers, trainer.model.losses["dml"].peers):
        assert peer.output_dir == str(tmp_path / "out" / "student-peers" / peer.name)
        assert "eval_loss" in peer.metrics and not peer.trainer.args.push_to_hub
        loaded = TimmWrapperForImageClassification.from_pretrained(peer.output_dir)
        assert loaded.config.id2label[3] == "d3"
        for key, value in module.state_dict().items():
            assert torch.equal(loaded.timm_model.state_dict()[key], value), key
    assert not os.path.exists(output_dir) or not os.listdir(output_dir)  # nothing of theirs in the student's folder
