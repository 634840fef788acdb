"""The live distillation step: the teacher under inference mode, and optional torch.compile of both models."""

import pytest
import torch
from conftest import digits_dataset, tiny_timm

from hfdistill import DistillationConfig, DistillationTrainer
from hfdistill.teacher import Teacher

RECIPE = {"terms": [{"loss": "kd", "weight": 0.5},
                    {"loss": "mse", "student": "blocks.2", "teacher": "layer3", "adapter": "conv1x1"}]}


def test_teacher_runs_in_inference_mode_and_hands_the_losses_ordinary_tensors():
    teacher = tiny_timm("test_resnet", seed=1)
    modes = []
    teacher.layer3.register_forward_hook(lambda module, args, output: modes.append(torch.is_inference_mode_enabled()))
    frozen = Teacher(teacher, ["layer3", "logits"], shared_input_names={"pixel_values"})
    frozen.attach()
    x = torch.randn(4, 3, 16, 16)
    features = frozen.features({"pixel_values": x})
    frozen.remove()
    assert modes == [True]
    for value in features.values():
        assert not value.is_inference() and value.dtype == torch.float32
    # What autograd must be able to save for the backward of a loss (KD's target, a hint's target):
    student_logits = torch.randn(4, 10, requires_grad=True)
    loss = torch.nn.functional.kl_div(student_logits.log_softmax(-1), features["logits"].softmax(-1),
                                      reduction="batchmean")
    loss.backward()
    assert torch.isfinite(student_logits.grad).all()
    half = Teacher(tiny_timm("test_resnet", seed=1), ["logits"], dtype="bfloat16", shared_input_names={"pixel_values"})
    half.attach()
    value = half.features({"pixel_values": x})["logits"]
    half.remove()
    assert value.dtype == torch.float32 and not value.is_inference()  # the fp32 cast is the only copy


def _losses(tmp_path, compiled: bool, backend: str = "eager") -> tuple[list[float], DistillationTrainer]:
    train, _ = digits_dataset(n_train=48)
    options = dict(torch_compile=True, torch_compile_backend=backend, teacher_compile=True) if compiled else {}
    args = DistillationConfig(output_dir=str(tmp_path / ("c" if compiled else "e")), max_steps=3,
                              per_device_train_batch_size=16, report_to=[], use_cpu=True, save_strategy="no",
                              logging_steps=1, seed=0, learning_rate=0.01, **options)
    trainer = DistillationTrainer(model=tiny_timm("test_efficientnet", seed=0), teacher=tiny_timm("test_resnet", seed=1),
                                  recipe=RECIPE, args=args, train_dataset=train)
    trainer.train()
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry], trainer


def test_compiled_student_and_teacher_train_as_the_eager_ones(tmp_path):
    """`torch_compile` (student, adapters, losses) and `teacher_compile` (the frozen teacher) go through
    torch.compile with the taps' hooks traced in; here with dynamo's eager backend, which captures the same
    graphs as inductor without the C++ build, so the losses must match the uncompiled run."""
    eager, _ = _losses(tmp_path, compiled=False)
    compiled, trainer = _losses(tmp_path, compiled=True)
    assert trainer.teacher._compiled_call_impl is not None  # compiled in place: still the teacher's own object
    assert len(eager) == len(compiled) == 3
    torch.testing.assert_close(torch.tensor(compiled), torch.tensor(eager), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_inductor_compiled_student_and_teacher_train_on_cpu(tmp_path):
    eager, _ = _losses(tmp_path, compiled=False)
    compiled, _ = _losses(tmp_path, compiled=True, backend="inductor")
    torch.testing.assert_close(torch.tensor(compiled), torch.tensor(eager), rtol=1e-3, atol=1e-3)


def test_channels_last_trains_as_contiguous_and_saves_a_loadable_student(tmp_path):
    """`channels_last`: both models' 4-d weights and each batch's images in NHWC; the same losses (up to
    float reordering) and a saved student that loads and predicts as the trained one."""
    from transformers import AutoModelForImageClassification

    train, _ = digits_dataset(n_train=48)
    recipe = {"terms": [RECIPE["terms"][0], {**RECIPE["terms"][1], "adapter": "conv_reg"}]}  # a 3x3 conv adapter

    def run(channels_last: bool):
        args = DistillationConfig(output_dir=str(tmp_path / str(channels_last)), max_steps=3,
                                  per_device_train_batch_size=16, report_to=[], use_cpu=True, save_strategy="no",
                                  logging_steps=1, seed=0, learning_rate=0.01, channels_last=channels_last)
        trainer = DistillationTrainer(model=tiny_timm("test_efficientnet", seed=0),
                                      teacher=tiny_timm("test_resnet", seed=1), recipe=recipe, args=args,
                                      train_dataset=train)
        trainer.train()
        return trainer, [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]

    plain, plain_losses = run(False)
    nhwc, nhwc_losses = run(True)
    conv = next(p for p in nhwc.student.parameters() if p.dim() == 4 and p.shape[-1] > 1)
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    teacher_conv = next(p for p in nhwc.teacher.parameters() if p.dim() == 4 and p.shape[-1] > 1)
    assert teacher_conv.is_contiguous(memory_format=torch.channels_last)
    adapter_conv = next(p for p in nhwc.model.adapters.parameters() if p.dim() == 4 and p.shape[-1] > 1)
    assert adapter_conv.is_contiguous(memory_format=torch.channels_last) and not adapter_conv.is_contiguous()
    torch.testing.assert_close(torch.tensor(nhwc_losses), torch.tensor(plain_losses), rtol=1e-3, atol=1e-4)
    nhwc.save_model(str(tmp_path / "saved"))
    loaded = AutoModelForImageClassification.from_pretrained(str(tmp_path / "saved")).eval()
    x = train[:4]["pixel_values"]
    nhwc.student.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixel_values=x).logits, nhwc.student(pixel_values=x).logits,
                                   rtol=1e-4, atol=1e-5)


def test_a_teacher_spread_by_device_map_distils_as_the_whole_teacher(tmp_path):
    """Accelerate's big-model inference (``device_map``, here every layer offloaded to disk: the CPU has room for
    none) runs the teacher layer by layer; the taps and losses are those of the teacher loaded whole. A recipe
    asks for it with the teacher's ``kwargs``."""
    from tests_helpers import TINY_BERT, tiny_tokenizer
    from transformers import AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification

    from hfdistill.models import load_model
    from hfdistill.recipe import ModelSpec

    tiny_tokenizer(tmp_path / "teacher", ["hello", "world", "again"])
    torch.manual_seed(0)
    BertForSequenceClassification(BertConfig(**dict(TINY_BERT, vocab_size=16), num_labels=2)).save_pretrained(
        tmp_path / "teacher")
    offload = {"device_map": "auto", "max_memory": {"cpu": "20KB"}, "offload_folder": str(tmp_path / "offload")}
    rows = [{"input_ids": torch.tensor([2, 5 + i % 3, 6, 7, 3]), "attention_mask": torch.ones(5, dtype=torch.long),
             "labels": torch.tensor(i % 2)} for i in range(16)]
    recipe = {"terms": [{"loss": "kd", "weight": 1.0},
                        {"loss": "mse", "student": "hidden_states.1", "teacher": "bert.encoder.layer.1"}]}

    def losses(teacher) -> list[dict]:
        torch.manual_seed(1)
        student = BertForSequenceClassification(BertConfig(**dict(TINY_BERT, vocab_size=16, num_hidden_layers=1),
                                                           num_labels=2))
        args = DistillationConfig(output_dir=str(tmp_path / "out"), max_steps=3, per_device_train_batch_size=4,
                                  report_to=[], use_cpu=True, save_strategy="no", logging_steps=1, seed=0)
        trainer = DistillationTrainer(model=student, teacher=teacher, recipe=recipe, args=args, train_dataset=rows)
        trainer.train()
        return [{k: v for k, v in e.items() if k.startswith("loss")} for e in trainer.state.log_history if "loss" in e]

    spread = load_model(ModelSpec(name=str(tmp_path / "teacher"), kwargs=offload), "teacher", "text-classification")
    assert set(spread.model.hf_device_map.values()) == {"disk"}
    whole = AutoModelForSequenceClassification.from_pretrained(tmp_path / "teacher")
    spread_losses, whole_losses = losses(spread.model), losses(whole)
    assert len(spread_losses) == 3 and spread_losses[0]["loss_mse"] > 0
    for a, b in zip(spread_losses, whole_losses):
        assert a.keys() == b.keys() and all(a[k] == pytest.approx(b[k], rel=1e-5) for k in a)
    # The way to distil from such a teacher on several processes: its outputs cached once, in one process.
    from hfdistill.cache import TeacherCache, build_cache

    build_cache(spread.model, rows, recipe, tmp_path / "cache", batch_size=8)
    build_cache(whole, rows, recipe, tmp_path / "cache_whole", batch_size=8)
    batch = {"input_ids": torch.stack([r["input_ids"] for r in rows[:4]]), "index": torch.arange(4)}
    cached, cached_whole = (TeacherCache(tmp_path / name, shared_input_names={"input_ids"}).read(batch, ["logits"])
                            for name in ("cache", "cache_whole"))
    torch.testing.assert_close(cached["logits"], cached_whole["logits"])
    # Accelerate cannot cast a model with offloaded weights: teacher_dtype says how to load it in that dtype.
    from hfdistill.errors import DistillationError

    with pytest.raises(DistillationError, match=r"offloaded.*kwargs: \{dtype: bfloat16\}.*teacher_dtype at auto"):
        Teacher(spread.model, ["logits"], dtype="bfloat16")
    half = load_model(ModelSpec(name=str(tmp_path / "teacher"), kwargs={**offload, "dtype": "bfloat16"}), "teacher",
                      "text-classification")
    frozen = Teacher(half.model, ["logits"], dtype="bfloat16", shared_input_names={"input_ids"})  # already bf16
    frozen.attach()
    logits = frozen.features({"input_ids": batch["input_ids"]})["logits"]
    frozen.remove()
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, cached_whole["logits"], atol=0.05, rtol=0.05)
