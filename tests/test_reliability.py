"""Reliability (issue 11): numerical guards, complete checkpoints and resume after kill -9, output folders, short
last batches. Each test names the failure it guards against."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import tiny_timm

import hfdistill
from hfdistill import DistillationConfig, DistillationTrainer
from hfdistill.cli import main
from hfdistill.errors import DistillationError, ResultFolderError, TrainingDivergedError
from hfdistill.outputs import CHECKPOINT_COMPLETE_NAME, last_complete_checkpoint
from test_cli import tiny_recipe, write
from test_run import _same_weights

ROOT = Path(__file__).resolve().parent.parent


def _args(tmp_path, **overrides) -> DistillationConfig:
    values = dict(output_dir=str(tmp_path / "out"), max_steps=6, per_device_train_batch_size=8, learning_rate=1e-3,
                  logging_steps=1, report_to=[], save_strategy="no", eval_strategy="no", use_cpu=True,
                  disable_tqdm=True, seed=0, dataloader_num_workers=0)
    values.update(overrides)
    return DistillationConfig(**values)


def _with_nan(dataset, row: int):
    """The digits dataset with a NaN pixel in one training example (a corrupt image)."""
    import datasets

    pixels = torch.stack([example["pixel_values"] for example in dataset])
    labels = torch.stack([example["labels"] for example in dataset])
    pixels[row, 0, 0, 0] = float("nan")
    return datasets.Dataset.from_dict({"pixel_values": pixels.numpy(), "labels": labels.numpy()}).with_format("torch")


def _trainer(tmp_path, train, **args) -> DistillationTrainer:
    return DistillationTrainer(model=tiny_timm("test_efficientnet", seed=2), teacher=tiny_timm("test_resnet", seed=1),
                               recipe={"terms": [{"loss": "kd", "weight": 0.5}]}, args=_args(tmp_path, **args),
                               train_dataset=train)


# ------------------------------------------------------------------------------ NaN never trains silently
def _overflowing_at(trainer, step: int) -> None:
    """The trainer's KD term returns inf at the given step."""
    kd = trainer.model.losses["kd"]
    original, calls = kd.forward, {"n": 0}

    def overflowing(*args, **kwargs):
        calls["n"] += 1
        value = original(*args, **kwargs)
        return value * float("inf") if calls["n"] == step else value

    kd.forward = overflowing


def test_a_non_finite_loss_stops_training_naming_the_term_and_the_step(tmp_path, digits):
    train = _with_nan(digits[0].select(range(48)), row=5)
    trainer = _trainer(tmp_path, train)
    with pytest.raises(TrainingDivergedError) as info:
        trainer.train()
    message = str(info.value)
    assert "training stopped at step" in message and "term 'kd'" in message and "not finite" in message
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_skip_mode_skips_non_finite_steps_and_counts_them(tmp_path, digits):
    trainer = _trainer(tmp_path, digits[0].select(range(48)), nonfinite="skip")
    _overflowing_at(trainer, step=3)
    before = {k: v.clone() for k, v in trainer.student.state_dict().items()}
    trainer.train()
    assert all(torch.isfinite(v).all() for v in trainer.student.state_dict().values() if v.is_floating_point())
    assert any(not torch.equal(before[k], v) for k, v in trainer.student.state_dict().items())  # the others trained
    counted = [log["nonfinite_steps"] for log in trainer.state.log_history if "nonfinite_steps" in log]
    assert counted and counted[-1] == 1
    assert all(torch.isfinite(torch.tensor(log["loss"])) for log in trainer.state.log_history if "loss" in log)


def test_a_non_finite_gradient_norm_stops_or_is_skipped(tmp_path, digits):
    trainer = _trainer(tmp_path, digits[0].select(range(16)))
    for p in trainer.model.parameters():
        p.grad = torch.full_like(p, float("inf"))
    with pytest.raises(TrainingDivergedError, match="gradient norm"):
        trainer._get_grad_norm(trainer.model)
    trainer.args.nonfinite = "skip"
    trainer._get_grad_norm(trainer.model)
    assert all(p.grad is None for p in trainer.model.parameters())  # the optimiser step does nothing


@pytest.mark.parametrize("logging_steps", [1, 100])
def test_a_deferred_check_stops_before_the_step_is_logged_or_saved(tmp_path, digits, logging_steps):
    """CUDA under `nonfinite: stop` reads each step's verdict a step later (no host-device sync per step); forced
    here on the CPU. Step 3 overflows: training stops naming step 3 and the term, before anything non-finite is
    logged (logging every step: at step 3's log; rarely: at step 4's check), and the student is not saved."""
    trainer = _trainer(tmp_path, digits[0].select(range(64)), logging_steps=logging_steps)
    trainer._defer_checks = True
    _overflowing_at(trainer, step=3)
    with pytest.raises(TrainingDivergedError) as info:
        trainer.train()
    message = str(info.value)
    assert "training stopped at step 3:" in message and "term 'kd'" in message, message
    assert trainer.state.global_step == 3  # stopped at step 3's log or at step 4's check, not later
    logged = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert len(logged) == (2 if logging_steps == 1 else 0)
    assert all(torch.isfinite(torch.tensor(value)) for value in logged)
    assert trainer._pending is None
    with pytest.raises(TrainingDivergedError, match="not finite"):  # and the NaN weights never ship
        trainer.save_model(str(tmp_path / "result"))
    assert not (tmp_path / "result" / "model.safetensors").exists()


def test_a_deferred_check_comes_before_a_checkpoint_of_the_step(tmp_path, digits):
    trainer = _trainer(tmp_path, digits[0].select(range(64)), logging_steps=100, save_strategy="steps", save_steps=3)
    trainer._defer_checks = True
    _overflowing_at(trainer, step=3)
    with pytest.raises(TrainingDivergedError, match="training stopped at step 3:"):
        trainer.train()
    assert trainer.state.global_step == 3
    assert not (tmp_path / "out" / "checkpoint-3").exists()


def test_a_deferred_check_of_the_last_step_is_read_when_training_ends(tmp_path, digits):
    trainer = _trainer(tmp_path, digits[0].select(range(64)), max_steps=3, logging_steps=100)
    trainer._defer_checks = True
    _overflowing_at(trainer, step=3)
    with pytest.raises(TrainingDivergedError, match="training stopped at step 3:"):
        trainer.train()


def test_deferred_checks_of_finite_steps_train_as_immediate_ones(tmp_path, digits):
    """The same run with the check read at once and a step later: same weights, same logged losses and terms."""
    results = []
    for defer in (False, True):
        trainer = _trainer(tmp_path / str(defer), digits[0].select(range(64)), logging_steps=2)
        trainer._defer_checks = defer
        trainer.train()
        assert trainer._pending is None
        logs = [{k: v for k, v in log.items() if k.startswith("loss")} for log in trainer.state.log_history
                if "loss" in log]
        results.append((trainer.student.state_dict(), logs))
    (weights, logs), (deferred_weights, deferred_logs) = results
    assert logs == deferred_logs and len(logs) == 3
    for name, value in weights.items():
        torch.testing.assert_close(deferred_weights[name], value, rtol=0, atol=0)


def test_the_loss_filter_follows_the_non_finite_action():
    """transformers' logging filter reads every micro-batch's loss on the host; `stop` needs no filter."""
    assert DistillationConfig(output_dir="x").logging_nan_inf_filter is False
    assert DistillationConfig(output_dir="x", nonfinite="skip").logging_nan_inf_filter is True
    assert DistillationConfig(output_dir="x", logging_nan_inf_filter=True).logging_nan_inf_filter is True


def test_without_clipping_the_gradient_norm_is_read_not_applied(tmp_path, digits):
    """max_grad_norm 0: the guard's norm is the gradients' total norm, and the gradients are left as they are."""
    trainer = _trainer(tmp_path, digits[0].select(range(16)), max_grad_norm=0.0)
    generator = torch.Generator().manual_seed(0)
    for p in trainer.model.parameters():
        p.grad = torch.randn(p.shape, generator=generator)
    grads = [p.grad.clone() for p in trainer.model.parameters()]
    expected = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    norm = trainer._get_grad_norm(trainer.model)
    assert torch.allclose(torch.as_tensor(norm), expected)
    assert all(p.grad is g or torch.equal(p.grad, g) for p, g in zip(trainer.model.parameters(), grads))


def test_a_student_with_non_finite_weights_is_never_saved(tmp_path, digits):
    trainer = _trainer(tmp_path, digits[0].select(range(16)))
    with torch.no_grad():
        next(trainer.student.parameters()).view(-1)[0] = float("nan")
    with pytest.raises(TrainingDivergedError, match="not finite"):
        trainer.save_model(str(tmp_path / "result"))
    assert not (tmp_path / "result" / "model.safetensors").exists()


def test_diverging_cli_run_exits_1_with_the_message_and_no_result(tmp_path, capsys):
    """A learning rate of 1e3 used to give exit 0 and a saved NaN student with a summary."""
    recipe = tiny_recipe(tmp_path, training__learning_rate=1e3, training__max_steps=8)
    code = main(["train", write(tmp_path, recipe)])
    err = capsys.readouterr().err
    if code == 0:  # the run did not diverge on this machine: then nothing non-finite may have been written
        from safetensors.torch import load_file

        weights = load_file(str(tmp_path / "out" / "student" / "model.safetensors"))
        assert all(torch.isfinite(v).all() for v in weights.values())
        return
    assert code == 1 and "not finite" in err and "Traceback" not in err
    assert not (tmp_path / "out" / "student" / "model.safetensors").exists()


# ------------------------------------------------------------------------------ checkpoints and resume
def _checkpointed(tmp_path, name: str = "out", **training) -> dict:
    recipe = tiny_recipe(tmp_path, data__augment="none")
    recipe["training"].update({"output_dir": str(tmp_path / name / "student"), "max_steps": 6,
                               "save_strategy": "steps", "save_steps": 2, "seed": 3, **training})
    return recipe


def test_checkpoints_are_marked_complete_and_resume_passes_over_an_incomplete_one(tmp_path, capsys):
    full = _checkpointed(tmp_path, "full")
    assert main(["train", write(tmp_path, full, "full.yaml")]) == 0
    recipe = _checkpointed(tmp_path, "cut", max_steps=6)
    path = write(tmp_path, recipe, "cut.yaml")
    assert main(["train", path]) == 0
    student = tmp_path / "cut" / "student"
    for step in (2, 4, 6):
        assert (student / f"checkpoint-{step}" / CHECKPOINT_COMPLETE_NAME).is_file()
    # As if killed while writing checkpoint-6: no marker, a torn file.
    (student / "checkpoint-6" / CHECKPOINT_COMPLETE_NAME).unlink()
    (student / "checkpoint-6" / "trainer_state.json").write_text("{ torn")
    assert last_complete_checkpoint(str(student)) == str(student / "checkpoint-4")
    capsys.readouterr()
    assert main(["train", path, "--training.resume_from_checkpoint", str(student / "checkpoint-6")]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "not a complete checkpoint" in err and "checkpoint-4" in err
    assert main(["train", path, "--training.resume_from_checkpoint", "true"]) == 0
    out = capsys.readouterr().out
    assert f"resuming from {student / 'checkpoint-4'}" in out and "passed over" in out
    _same_weights(tmp_path / "full" / "student", student)


def test_python_resume_true_takes_the_newest_complete_checkpoint(tmp_path, digits):
    trainer = _trainer(tmp_path, digits[0].select(range(48)), save_strategy="steps", save_steps=2)
    trainer.train()
    (tmp_path / "out" / "checkpoint-6" / CHECKPOINT_COMPLETE_NAME).unlink()
    again = _trainer(tmp_path, digits[0].select(range(48)), save_strategy="steps", save_steps=2, max_steps=8)
    with pytest.raises(DistillationError, match="checkpoint-4"):
        again.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-6"))
    again.train(resume_from_checkpoint=True)
    assert again.state.global_step == 8


KILLER = textwrap.dedent('''
    import os, signal, sys
    import hfdistill.trainer as trainer_module
    from hfdistill.cli import main

    where, at = sys.argv[2], int(sys.argv[3])
    if where == "checkpoint":  # kill -9 in the middle of writing checkpoint-<at>
        original = trainer_module.save_distill_state

        def save_then_die(state, folder):
            if folder.endswith(f"checkpoint-{at}"):
                os.kill(os.getpid(), signal.SIGKILL)
            return original(state, folder)

        trainer_module.save_distill_state = save_then_die
    else:  # kill -9 in the middle of training step <at> (its forward done, no backward yet)
        original = trainer_module.DistillationTrainer.compute_loss
        calls = {"n": 0}

        def loss_then_die(self, *args, **kwargs):
            value = original(self, *args, **kwargs)
            calls["n"] += 1
            if calls["n"] == at:
                os.kill(os.getpid(), signal.SIGKILL)
            return value

        trainer_module.DistillationTrainer.compute_loss = loss_then_die
    sys.exit(main(["train", sys.argv[1]]))
''')


@pytest.mark.parametrize("where, at, resumes_from", [("checkpoint", 4, 2), ("step", 5, 4)])
def test_kill_9_then_resume_gives_the_uninterrupted_student(tmp_path, where, at, resumes_from):
    """A run killed (SIGKILL) while writing checkpoint-4, or during step 5, resumes from the newest complete
    checkpoint and ends where an uninterrupted run ends, bit for bit (CPU, no augmentation)."""
    full = write(tmp_path, _checkpointed(tmp_path, "full"), "full.yaml")
    assert main(["train", full]) == 0
    cut = write(tmp_path, _checkpointed(tmp_path, "cut"), "cut.yaml")
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, str(script), cut, where, str(at)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == -9, done.stderr[-2000:]
    student = tmp_path / "cut" / "student"
    assert last_complete_checkpoint(str(student)) == str(student / f"checkpoint-{resumes_from}")
    assert not (student / "model.safetensors").exists()
    assert main(["train", cut, "--training.resume_from_checkpoint", "true"]) == 0
    _same_weights(tmp_path / "full" / "student", student)


# ------------------------------------------------------------------------------ output folders
def test_output_dir_must_not_be_the_teachers_folder(tmp_path, capsys):
    teacher_recipe = tiny_recipe(tmp_path, terms=[], teacher=None)
    teacher_recipe["training"]["output_dir"] = str(tmp_path / "teacher")
    assert main(["train", write(tmp_path, teacher_recipe, "teacher.yaml")]) == 0
    before = (tmp_path / "teacher" / "model.safetensors").read_bytes()
    recipe = tiny_recipe(tmp_path, teacher={"name": str(tmp_path / "teacher")})
    recipe["training"]["output_dir"] = str(tmp_path / "teacher")
    capsys.readouterr()
    assert main(["train", write(tmp_path, recipe)]) == 2
    assert "model folder" in " ".join(capsys.readouterr().err.split())
    assert (tmp_path / "teacher" / "model.safetensors").read_bytes() == before


def test_output_dir_holding_other_files_is_refused_and_left_alone(tmp_path, capsys):
    folder = tmp_path / "out" / "student"
    folder.mkdir(parents=True)
    (folder / "notes.txt").write_text("mine")
    assert main(["train", write(tmp_path, tiny_recipe(tmp_path))]) == 2
    assert "not an hfdistill result" in " ".join(capsys.readouterr().err.split())
    assert sorted(os.listdir(folder)) == ["notes.txt"]


def test_an_earlier_result_is_replaced_only_with_overwrite_and_its_checkpoints_go(tmp_path, capsys):
    recipe = tiny_recipe(tmp_path, training__save_strategy="steps", training__save_steps=2)
    path = write(tmp_path, recipe)
    assert main(["train", path]) == 0
    student = tmp_path / "out" / "student"
    stale = student / "checkpoint-4"
    assert stale.is_dir()
    capsys.readouterr()
    assert main(["train", path]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "earlier result" in err and "--overwrite" in err and stale.is_dir()
    assert main(["train", path, "--overwrite", "--training.max_steps", "2"]) == 0
    assert not stale.exists() and (student / "checkpoint-2").is_dir()  # the new run's only


# ------------------------------------------------------------------------------ short last batches
def test_a_last_batch_too_small_for_a_relation_term_is_dropped(tmp_path, digits, caplog):
    """17 examples in batches of 8 leave a last batch of one, which RKD (distances between examples) and
    batch-norm cannot use: it is dropped, and the run says so once."""
    train = digits[0].select(range(17))
    trainer = DistillationTrainer(
        model=tiny_timm("test_resnet", seed=2), teacher=tiny_timm("test_resnet", seed=1),
        recipe={"terms": [{"loss": "rkd", "student": "logits", "teacher": "logits"}]},
        args=_args(tmp_path, max_steps=-1, num_train_epochs=2), train_dataset=train)
    assert trainer.args.dataloader_drop_last
    trainer.train()
    assert trainer.state.global_step == 4  # 2 full batches per epoch, 2 epochs


# ------------------------------------------------------------------------------ augmentation that resume reproduces
def test_augmentation_is_drawn_per_example_epoch_and_seed():
    from hfdistill.data import ImageTransform
    from hfdistill.models import ImageConfig

    transform = ImageTransform(ImageConfig(size=(16, 16), mean=(0.5,) * 3, std=(0.5,) * 3, channels=3), train=True,
                               augment="crop_flip")
    images = torch.randint(0, 255, (6, 3, 16, 16), dtype=torch.uint8)
    transform.set_augmentation_epoch(1, seed=42)
    batch = transform(images)
    assert torch.equal(transform(images[[3, 1]]), batch[[3, 1]])  # batch composition and order do not matter
    transform.set_augmentation_epoch(2, seed=42)
    assert not torch.equal(transform(images), batch)  # another epoch, other crops
    transform.set_augmentation_epoch(1, seed=43)
    assert not torch.equal(transform(images), batch)  # another training seed, other crops
    transform.set_augmentation_epoch(1, seed=42)
    assert torch.equal(transform(images), batch)


def test_mid_epoch_resume_with_random_crop_and_flip_gives_the_uninterrupted_student(tmp_path, capsys):
    """The issue's case: resuming from a mid-epoch checkpoint with the default augmentation used to give another
    student (max abs diff 0.46); now it is the same, bit for bit on the CPU."""
    def recipe(name, **training):
        r = tiny_recipe(tmp_path, data__augment="crop_flip")
        r["training"].update(output_dir=str(tmp_path / name / "student"), max_steps=12, save_strategy="steps",
                             save_steps=4, seed=5, **training)
        return r

    assert main(["train", write(tmp_path, recipe("full"), "full.yaml")]) == 0
    cut = write(tmp_path, recipe("cut"), "cut.yaml")
    assert main(["train", cut]) == 0
    student = tmp_path / "cut" / "student"
    for step in (8, 12):  # as if the run had stopped at step 4 (mid-epoch: 8 steps per epoch)
        import shutil

        shutil.rmtree(student / f"checkpoint-{step}")
    (student / "model.safetensors").unlink()
    assert main(["train", cut, "--training.resume_from_checkpoint", "true"]) == 0
    assert f"resuming from {student / 'checkpoint-4'}" in capsys.readouterr().out
    _same_weights(tmp_path / "full" / "student", student)


def test_an_output_dir_too_long_for_the_file_system_is_bad_input(tmp_path, capsys):
    recipe = tiny_recipe(tmp_path)
    recipe["training"]["output_dir"] = str(tmp_path / ("x" * 5000))
    assert main(["train", write(tmp_path, recipe)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "training.output_dir" in err and "too long" in err and "Traceback" not in err


def test_push_to_hub_while_offline_is_refused_before_training(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    recipe = tiny_recipe(tmp_path, training__push_to_hub=True, training__hub_model_id="me/student")
    assert main(["train", write(tmp_path, recipe)]) == 2
    assert "HF_HUB_OFFLINE" in " ".join(capsys.readouterr().err.split())
    assert not (tmp_path / "out").exists()


def test_weight_files_get_the_folders_usual_permissions(tmp_path, digits):
    """safetensors wrote the weights 0600 while every other file of the result was 0644 (umask 022)."""
    trainer = _trainer(tmp_path, digits[0].select(range(16)), max_steps=1)
    trainer.train()
    trainer.save_model(str(tmp_path / "result"))
    from hfdistill.terms import save_distill_state

    save_distill_state(trainer.distill_state(), str(tmp_path / "result"))
    mask = os.umask(0)
    os.umask(mask)
    for name in ("model.safetensors", "config.json", "distill_state.safetensors"):
        assert (os.stat(tmp_path / "result" / name).st_mode & 0o777) == 0o666 & ~mask, name


def test_a_half_precision_teacher_runs_end_to_end_with_summary_and_card(tmp_path, capsys):
    """`training.teacher_dtype: bfloat16` used to finish training and then crash in the summary (no card)."""
    recipe = tiny_recipe(tmp_path, training__teacher_dtype="bfloat16")
    assert main(["train", write(tmp_path, recipe)]) == 0
    out = capsys.readouterr().out
    assert "Summary" in out and "teacher" in out
    assert (tmp_path / "out" / "student" / "README.md").is_file()


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes anywhere")
def test_an_output_dir_that_cannot_be_written_is_bad_input(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    recipe = tiny_recipe(tmp_path)
    recipe["training"]["output_dir"] = str(locked / "student")
    try:
        assert main(["train", write(tmp_path, recipe)]) == 2
    finally:
        locked.chmod(0o700)
    assert "cannot be written" in " ".join(capsys.readouterr().err.split())


def test_an_output_dir_under_a_file_is_bad_input(tmp_path, capsys):
    (tmp_path / "a_file").write_text("x")
    recipe = tiny_recipe(tmp_path)
    recipe["training"]["output_dir"] = str(tmp_path / "a_file" / "student")
    assert main(["train", write(tmp_path, recipe)]) == 2
    assert "not a folder" in " ".join(capsys.readouterr().err.split())
