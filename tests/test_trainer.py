"""DistillationTrainer end to end on scikit-learn digits with tiny models."""

import json
import os

import pytest
import safetensors.torch
import torch
from conftest import accuracy, tiny_hf_resnet, tiny_timm, tiny_vit
from transformers import TimmWrapperForImageClassification, TrainerCallback, ViTForImageClassification

from hfdistill import DistillationConfig, DistillationError, DistillationTrainer
from hfdistill.outputs import DISTILL_STATE_NAME


def make_args(tmp_path, **overrides):
    defaults = dict(
        output_dir=str(tmp_path / "out"),
        max_steps=10,
        per_device_train_batch_size=16,
        per_device_eval_batch_size=64,
        learning_rate=1e-3,
        logging_steps=5,
        report_to=[],
        save_strategy="no",
        eval_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        dataloader_num_workers=0,
    )
    defaults.update(overrides)
    return DistillationConfig(**defaults)


KD_FITNET = {
    "task_weight": 0.5,
    "terms": [
        {"loss": "kd", "weight": 0.5, "params": {"temperature": 4.0}},
        {"loss": "mse", "weight": 1.0, "student": "blocks.2", "teacher": "layer3", "adapter": "conv1x1"},
    ],
}


class TeacherModeRecorder(TrainerCallback):
    """Calls .train() on everything after each step, the way careless user code might."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer.teacher.train()
        self.trainer.model.train()


def test_timm_pair_loss_goes_down_teacher_frozen(tmp_path, digits):
    train, val = digits
    teacher = tiny_timm("test_resnet", seed=1)
    student = tiny_timm("test_efficientnet", seed=2)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    modes = []
    teacher.register_forward_pre_hook(lambda module, args: modes.append(module.training))

    trainer = DistillationTrainer(
        model=student, teacher=teacher, recipe=KD_FITNET,
        args=make_args(tmp_path, max_steps=50, learning_rate=3e-3, logging_steps=10),
        train_dataset=train, eval_dataset=val, compute_metrics=accuracy,
    )
    trainer.add_callback(TeacherModeRecorder(trainer))
    assert trainer.student.timm_model is student  # wrapped, not copied
    trainer.train()

    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 5
    assert logs[-1]["loss"] < 0.8 * logs[0]["loss"]
    for entry in logs:  # every term logged next to the total, and they add up to it
        assert {"loss_task", "loss_kd", "loss_mse"} <= set(entry)
        assert entry["loss_task"] + entry["loss_kd"] + entry["loss_mse"] == pytest.approx(entry["loss"], rel=1e-3)

    # The teacher: bit-identical, always run in eval mode, never given a gradient.
    after = teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert modes and not any(modes)
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    # Hooks are gone and nothing captured is held after training.
    assert not trainer.model.student_taps._handles and not trainer.frozen_teacher.taps._handles
    assert not trainer.model.student_taps._store and not trainer.frozen_teacher.taps._store
    assert all(not m._forward_hooks for m in list(student.modules()) + list(teacher.modules()))

    metrics = trainer.evaluate()
    assert {"eval_accuracy", "eval_loss", "eval_teacher_accuracy", "eval_teacher_loss"} <= set(metrics)


def test_transformers_student_timm_teacher(tmp_path, digits):
    train, val = digits
    teacher = tiny_timm("test_resnet", seed=1)
    student = tiny_hf_resnet(seed=3)
    recipe = {
        "terms": [
            {"loss": "kd", "weight": 1.0},
            # the pooled features (input of its classifier) -> timm pre-logits features, via a linear adapter
            {"loss": "mse", "weight": 1.0, "student": "pooled", "teacher": "features", "adapter": "linear"},
            # a module path inside the transformers student, resized and projected by conv1x1
            {"loss": "mse", "name": "hint", "student": "resnet.encoder.stages.1", "teacher": "layer3",
             "adapter": "conv1x1"},
        ]
    }
    trainer = DistillationTrainer(
        model=student, teacher=teacher, recipe=recipe,
        args=make_args(tmp_path, max_steps=50, learning_rate=3e-3, logging_steps=10),
        train_dataset=train, eval_dataset=val, compute_metrics=accuracy,
    )
    assert trainer.student is student
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert logs[-1]["loss"] < 0.8 * logs[0]["loss"]
    assert {"loss_task", "loss_kd", "loss_mse", "loss_hint"} <= set(logs[-1])
    adapter = trainer.model.adapters["mse"][0]
    assert adapter.proj.in_features == 32 and adapter.proj.out_features == teacher.num_features


def test_saved_student_is_only_the_student(tmp_path, digits):
    from transformers import pipeline
    from PIL import Image
    import numpy as np

    train, val = digits
    teacher = tiny_timm("test_resnet", seed=1)
    student = tiny_timm("test_efficientnet", seed=2)
    labels = {i: f"digit_{i}" for i in range(10)}
    recipe = {"terms": [{"loss": "kd"}, {"loss": "mse", "student": "blocks.1", "teacher": "layer2", "adapter": "conv1x1"}]}
    trainer = DistillationTrainer(
        model=student, teacher=teacher, recipe=recipe, args=make_args(tmp_path, max_steps=3),
        train_dataset=train, id2label=labels,
    )
    trainer.train()
    folder = tmp_path / "student"
    trainer.save_model(str(folder))

    weights = safetensors.torch.load_file(str(folder / "model.safetensors"))
    student_keys = set(student.state_dict())
    assert {k.removeprefix("timm_model.") for k in weights} == student_keys
    assert not any("adapters" in k or "losses" in k for k in weights)
    config = json.loads((folder / "config.json").read_text())
    assert config["architecture"] == "test_efficientnet" and config["label_names"][3] == "digit_3"
    assert config["pretrained_cfg"]["input_size"] == [3, 16, 16]

    reloaded = TimmWrapperForImageClassification.from_pretrained(str(folder))
    for key, value in student.state_dict().items():
        assert torch.equal(reloaded.timm_model.state_dict()[key], value)

    classify = pipeline("image-classification", model=str(folder))
    image = Image.fromarray((np.random.default_rng(0).random((16, 16, 3)) * 255).astype("uint8"))
    predictions = classify(image)
    assert predictions and predictions[0]["label"].startswith("digit_")


def test_transformers_student_saves_and_reloads(tmp_path, digits):
    train, _ = digits
    trainer = DistillationTrainer(
        model=tiny_vit(seed=3), teacher=tiny_timm("test_resnet", seed=1), recipe={"terms": [{"loss": "kd"}]},
        args=make_args(tmp_path, max_steps=2), train_dataset=train,
    )
    trainer.train()
    trainer.save_model(str(tmp_path / "vit"))
    weights = safetensors.torch.load_file(str(tmp_path / "vit" / "model.safetensors"))
    assert not any("adapters" in k or "losses" in k for k in weights)
    reloaded = ViTForImageClassification.from_pretrained(str(tmp_path / "vit"))
    for key, value in trainer.student.state_dict().items():
        assert torch.equal(reloaded.state_dict()[key], value), key


def _flat_params(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_gradient_accumulation_matches_large_batch(tmp_path, digits):
    """4 x 8 with accumulation gives the same SGD update as one batch of 32 (per-example maths only)."""
    train, _ = digits
    recipe = {
        "task_weight": 0.7,
        "terms": [
            {"loss": "kd", "weight": 0.5, "params": {"temperature": 2.0}},
            {"loss": "mse", "weight": 2.0, "student": "pooled", "teacher": "features", "adapter": "linear"},
        ],
    }
    results = []
    for batch, accumulation in ((32, 1), (8, 4)):
        torch.manual_seed(0)
        trainer = DistillationTrainer(
            model=tiny_vit(seed=3), teacher=tiny_timm("test_resnet", seed=1), recipe=recipe,
            args=make_args(tmp_path, max_steps=2, per_device_train_batch_size=batch,
                           gradient_accumulation_steps=accumulation, optim="sgd", learning_rate=0.5,
                           max_grad_norm=0.0, lr_scheduler_type="constant", weight_decay=0.0),
            train_dataset=train,
        )
        # Same adapter initialisation in both runs.
        torch.manual_seed(1)
        for p in trainer.model.adapters.parameters():
            torch.nn.init.normal_(p, std=0.1)
        trainer.train()
        results.append((_flat_params(trainer.student), _flat_params(trainer.model.adapters)))
    for big, small in zip(results[0], results[1]):
        for key in big:
            torch.testing.assert_close(small[key], big[key], rtol=1e-4, atol=1e-5, msg=key)
    # The update itself is not trivial.
    assert not torch.equal(results[0][0]["classifier.weight"], tiny_vit(seed=3).classifier.weight)


def test_adapters_and_loss_state_train_and_resume(tmp_path, digits):
    """Adapters and VID's regressor/variance are trained, checkpointed and restored by resume_from_checkpoint."""
    train, _ = digits
    recipe = {
        "terms": [
            {"loss": "mse", "student": "layer3", "teacher": "layer3", "adapter": "conv1x1"},
            {"loss": "vid", "student": "layer2", "teacher": "layer2"},
        ]
    }

    def run(output, max_steps, resume=None):
        trainer = DistillationTrainer(
            model=tiny_timm("test_resnet", seed=2), teacher=tiny_timm("test_resnet", seed=1), recipe=recipe,
            args=make_args(tmp_path, output_dir=str(output), max_steps=max_steps, save_strategy="steps",
                           save_steps=4, lr_scheduler_type="constant"),
            train_dataset=train,
        )
        initial = _flat_params(trainer.model.losses) | {f"a.{k}": v for k, v in _flat_params(trainer.model.adapters).items()}
        trainer.train(resume_from_checkpoint=resume)
        return trainer, initial

    full, initial = run(tmp_path / "full", 8)
    trained = _flat_params(full.model.losses) | {f"a.{k}": v for k, v in _flat_params(full.model.adapters).items()}
    vid_params = [k for k in trained if k.startswith("vid.") and "num_batches" not in k]
    assert vid_params, "VID must own trainable parameters"
    changed = [k for k in trained if k in initial and not torch.equal(trained[k], initial[k]) and "num_batches" not in k]
    assert any(k.startswith("a.mse") for k in changed) and any(k.startswith("vid.") for k in changed)

    checkpoint = tmp_path / "full" / "checkpoint-4"
    saved = safetensors.torch.load_file(str(checkpoint / DISTILL_STATE_NAME))
    assert any(k.startswith("adapters.mse") for k in saved) and any(k.startswith("losses.vid") for k in saved)
    student_file = safetensors.torch.load_file(str(checkpoint / "model.safetensors"))
    assert not any("adapters" in k or "losses" in k for k in student_file)

    resumed, _ = run(tmp_path / "resumed", 8, resume=str(checkpoint))
    for a, b in ((full.student, resumed.student), (full.model.adapters, resumed.model.adapters),
                 (full.model.losses, resumed.model.losses)):
        for key, value in a.state_dict().items():
            torch.testing.assert_close(b.state_dict()[key], value, rtol=1e-4, atol=1e-5, msg=key)


def test_gradient_checkpointing_keeps_taps_clean(tmp_path, digits):
    train, _ = digits
    student = tiny_vit(seed=3)
    recipe = {"terms": [{"loss": "kd"}, {"loss": "mse", "student": "vit.layers.0.mlp",
                                          "teacher": "vit.layers.0.mlp"}]}
    trainer = DistillationTrainer(
        model=student, teacher=tiny_vit(seed=4), recipe=recipe,
        args=make_args(tmp_path, max_steps=3, gradient_checkpointing=True), train_dataset=train,
    )
    trainer.train()
    assert student.is_gradient_checkpointing
    assert not trainer.model.student_taps._store


def test_wrong_tap_path_lists_closest(tmp_path, digits):
    train, _ = digits
    with pytest.raises(Exception, match=r"layer3") as info:
        DistillationTrainer(
            model=tiny_timm(seed=2), teacher=tiny_timm(seed=1),
            recipe={"terms": [{"loss": "mse", "student": "layr3", "teacher": "layer3"}]},
            args=make_args(tmp_path), train_dataset=train,
        )
    assert "student tap 'layr3'" in str(info.value) and "Closest module paths" in str(info.value)


def test_shape_mismatch_without_adapter_suggests_one(tmp_path, digits):
    train, _ = digits
    with pytest.raises(DistillationError) as info:
        DistillationTrainer(
            model=tiny_timm("test_efficientnet", seed=2), teacher=tiny_timm(seed=1),
            recipe={"terms": [{"loss": "mse", "student": "blocks.1", "teacher": "layer2"}]},
            args=make_args(tmp_path, output_dir=str(tmp_path / "runs" / "student")), train_dataset=train,
        )
    message = str(info.value)
    assert "shape" in message and "adapter: conv1x1" in message
    assert not os.path.exists(tmp_path / "runs")  # the output folder and the parent made for it are gone


def test_terms_without_teacher_and_plain_finetuning(tmp_path, digits):
    train, _ = digits
    with pytest.raises(DistillationError, match=r"term\(s\) \['kd'\] need a teacher but none was given"):
        DistillationTrainer(model=tiny_timm(), recipe={"terms": [{"loss": "kd"}]}, args=make_args(tmp_path))
    # Tf-KD's virtual teacher is made from the labels: no teacher model at all.
    teacher_free = DistillationTrainer(
        model=tiny_timm(), recipe={"terms": [{"loss": "tf_kd", "params": {"mode": "virtual"}}]},
        args=make_args(tmp_path, max_steps=3, logging_steps=3), train_dataset=train,
    )
    teacher_free.train()
    assert teacher_free.state.log_history[0]["loss_tf_kd"] > 0
    trainer = DistillationTrainer(model=tiny_timm(), args=make_args(tmp_path, max_steps=10), train_dataset=train)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert logs and logs[0]["loss_task"] == pytest.approx(logs[0]["loss"], rel=1e-3)


def test_plain_module_teacher(tmp_path, digits):
    train, _ = digits

    class LinearTeacher(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 10))

        def forward(self, x):
            return self.body(x)

    trainer = DistillationTrainer(
        model=tiny_timm(), teacher=LinearTeacher(), recipe={"terms": [{"loss": "kd"}]},
        args=make_args(tmp_path, max_steps=2), train_dataset=train,
    )
    trainer.train()
    assert "loss_kd" in trainer.state.log_history[0] or trainer.state.global_step == 2


def test_distill_learning_rate_and_teacher_dtype(tmp_path, digits):
    train, _ = digits
    recipe = {"terms": [{"loss": "mse", "student": "blocks.2", "teacher": "layer3", "adapter": "conv1x1",
                         "adapter_params": {"bn": False}}]}
    trainer = DistillationTrainer(
        model=tiny_timm("test_efficientnet", seed=2), teacher=tiny_timm(seed=1), recipe=recipe,
        args=make_args(tmp_path, max_steps=3, optim="sgd", learning_rate=0.1, distill_learning_rate=1e-9,
                       lr_scheduler_type="constant", teacher_dtype="bfloat16"),
        train_dataset=train,
    )
    assert all(p.dtype == torch.bfloat16 for p in trainer.teacher.parameters())
    adapter_before = _flat_params(trainer.model.adapters)
    student_before = _flat_params(trainer.student)
    trainer.train()
    lrs = sorted(group["lr"] for group in trainer.optimizer.param_groups if group["params"])
    assert lrs[0] == pytest.approx(1e-9) and lrs[-1] == pytest.approx(0.1)
    adapter_after = _flat_params(trainer.model.adapters)
    assert all(torch.allclose(adapter_before[k], adapter_after[k], atol=1e-6) for k in adapter_before)
    assert any(not torch.equal(student_before[k], v) for k, v in _flat_params(trainer.student).items())


def test_config_validation():
    with pytest.raises(ValueError, match="task_weight must be >= 0"):
        DistillationConfig(output_dir="x", task_weight=-1, use_cpu=True)
    with pytest.raises(ValueError, match="teacher_dtype must be one of"):
        DistillationConfig(output_dir="x", teacher_dtype="int8", use_cpu=True)
    with pytest.raises(ValueError, match="distill_learning_rate must be > 0"):
        DistillationConfig(output_dir="x", distill_learning_rate=0.0, use_cpu=True)
    with pytest.raises(DistillationError, match="DistillationConfig"):
        from transformers import TrainingArguments

        DistillationTrainer(model=tiny_timm(), args=TrainingArguments(output_dir="x", use_cpu=True))


def test_text_pair_hidden_states_and_attentions(tmp_path):
    """A 4-layer BERT teacher into a 2-layer, narrower student: logits + uniform hidden-state map + attentions."""
    import datasets
    from transformers import BertConfig, BertForSequenceClassification

    def bert(layers, hidden, seed):
        torch.manual_seed(seed)
        return BertForSequenceClassification(BertConfig(
            vocab_size=60, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
            intermediate_size=2 * hidden, num_labels=3, max_position_embeddings=16,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))

    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 60, (64, 8), generator=generator)
    mask = torch.ones_like(ids)
    mask[::3, 5:] = 0  # some padding
    labels = ids[:, 0] % 3
    train = datasets.Dataset.from_dict({"input_ids": ids.numpy(), "attention_mask": mask.numpy(),
                                        "labels": labels.numpy()}).with_format("torch")
    recipe = {"terms": [
        {"loss": "kd"},
        {"loss": "hidden_mse", "student": "hidden_states", "teacher": "hidden_states"},
        {"loss": "attention_kl", "student": "attentions", "teacher": "attentions"},
    ]}
    trainer = DistillationTrainer(
        model=bert(2, 16, 3), teacher=bert(4, 32, 1), recipe=recipe,
        args=make_args(tmp_path, max_steps=20, learning_rate=3e-3, logging_steps=10), train_dataset=train,
    )
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert {"loss_kd", "loss_hidden_mse", "loss_attention_kl"} <= set(logs[-1])
    assert logs[-1]["loss_hidden_mse"] < logs[0]["loss_hidden_mse"]
    assert "hidden_mse" in trainer.model.losses and any(True for _ in trainer.model.losses["hidden_mse"].parameters())


def test_step_decay_of_the_literature(tmp_path, digits):
    train, _ = digits
    trainer = DistillationTrainer(
        model=tiny_timm(), args=make_args(tmp_path, max_steps=-1, num_train_epochs=4, learning_rate=0.1,
                                          lr_decay_epochs=[2, 3], lr_decay_rate=0.1, optim="sgd"),
        train_dataset=train,
    )
    trainer.create_optimizer()
    scheduler = trainer.create_scheduler(num_training_steps=40)  # 10 steps per epoch
    lrs = []
    for _ in range(40):
        lrs.append(scheduler.get_last_lr()[0])
        trainer.optimizer.step()
        scheduler.step()
    assert lrs[0] == pytest.approx(0.1) and lrs[19] == pytest.approx(0.1)
    assert lrs[20] == pytest.approx(0.01) and lrs[29] == pytest.approx(0.01) and lrs[30] == pytest.approx(0.001)
    with pytest.raises(ValueError, match="increasing epochs"):
        DistillationConfig(output_dir="x", use_cpu=True, lr_decay_epochs=[180, 150])
    with pytest.raises(ValueError, match="not max_steps"):
        DistillationConfig(output_dir="x", use_cpu=True, lr_decay_epochs=[1], max_steps=10)
    with pytest.raises(ValueError, match="lr_decay_rate"):
        DistillationConfig(output_dir="x", use_cpu=True, lr_decay_rate=0)
