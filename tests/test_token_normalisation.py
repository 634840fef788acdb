"""Normalisation by the optimisation step's token count (`num_items_in_batch`): a causal LM's own loss and
the token losses are summed over the completion tokens and divided by the step's count, across gradient
accumulation and processes, so that 4 x 8 accumulation equals one batch of 32 and 2 processes equal one.
Mean terms (here a hidden-state MSE) keep their per-batch mean, divided by the step's micro-batches."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import safetensors.torch
import torch

HERE = os.path.dirname(__file__)
sys.path.insert(0, HERE)
from token_steps import one_step  # noqa: E402

from hfdistill import losses  # noqa: E402

MEAN_TERM = {"loss": "mse", "student": "transformer.h.0", "teacher": "transformer.h.1", "weight": 0.3}
TOKEN_TERMS = [{"loss": name, "weight": 0.2} for name in ("forward_kl", "jsd") if name in losses.available()]
TERMS = [MEAN_TERM, *TOKEN_TERMS]


def _weights(trainer) -> dict:
    return {k: v.detach().clone() for k, v in trainer.student.state_dict().items()}


def test_the_student_causal_lm_loss_is_counted_over_the_step(tmp_path):
    trainer = one_step(str(tmp_path / "a"), 32, 1, TERMS)
    assert trainer._loss_shifts_labels and "task" in trainer._items_parts
    token_terms = {t.name for t in trainer.model.terms if t.spec.loss != "mse"}
    assert len(token_terms) == len(TOKEN_TERMS) == 2
    assert trainer._items_parts == {"task"} | token_terms  # the hidden-state MSE stays a per-batch mean


def test_gradient_accumulation_4_x_8_equals_one_batch_of_32(tmp_path):
    whole = _weights(one_step(str(tmp_path / "whole"), 32, 1, TERMS))
    accumulated = _weights(one_step(str(tmp_path / "acc"), 8, 4, TERMS))
    moved = 0
    for key, value in whole.items():
        torch.testing.assert_close(accumulated[key], value, rtol=1e-5, atol=1e-6, msg=key)
        moved += 1
    assert moved > 5


def test_a_per_micro_batch_mean_of_the_lm_loss_would_differ(tmp_path):
    """The check above has teeth: the same runs with the task loss as a per-micro-batch mean differ."""
    from hfdistill.trainer import DistillationTrainer

    original = DistillationTrainer._setup_distillation

    def without_items(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self._items_parts = set()
        self.model_accepts_loss_kwargs = False

    whole = _weights(one_step(str(tmp_path / "whole"), 32, 1, [MEAN_TERM]))
    DistillationTrainer._setup_distillation = without_items
    try:
        mean_based = _weights(one_step(str(tmp_path / "acc"), 8, 4, [MEAN_TERM]))
    finally:
        DistillationTrainer._setup_distillation = original
    assert any(not torch.allclose(mean_based[k], v, rtol=1e-5, atol=1e-6) for k, v in whole.items())


@pytest.mark.skipif(shutil.which("accelerate") is None, reason="the accelerate launcher is not on PATH")
def test_two_processes_of_16_equal_one_of_32(tmp_path):
    whole = _weights(one_step(str(tmp_path / "whole"), 32, 1, TERMS))
    out = tmp_path / "ddp"
    out.mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([os.path.dirname(HERE), HERE])}
    result = subprocess.run(
        ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
         "no", "--dynamo_backend", "no", os.path.join(HERE, "token_steps.py"), str(out), "16", json.dumps(TERMS)],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for rank in (0, 1):
        ranked = safetensors.torch.load_file(str(out / f"rank{rank}.safetensors"))
        for key, value in whole.items():
            torch.testing.assert_close(ranked[key], value, rtol=1e-5, atol=1e-6, msg=f"rank {rank}: {key}")


def test_token_losses_get_the_logits_in_the_models_dtype(tmp_path, monkeypatch):
    """A bf16 teacher's [B, T, vocabulary] logits reach a token loss as they are (it casts chunk by chunk),
    while a term that needs fp32 gets them cast: no whole fp32 copy for the token loss."""
    from hfdistill.losses.tokens import ForwardKLLoss as ForwardKL
    from hfdistill.trainer import DistillationTrainer

    seen = []
    original = ForwardKL.forward
    monkeypatch.setattr(ForwardKL, "forward",
                        lambda self, s, t, **kw: seen.append((s.dtype, t.dtype)) or original(self, s, t, **kw))
    from token_steps import examples, tiny_gpt2
    from hfdistill import DistillationConfig

    args = DistillationConfig(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=8, report_to=[],
                              save_strategy="no", disable_tqdm=True, use_cpu=True, teacher_dtype="bfloat16")
    trainer = DistillationTrainer(model=tiny_gpt2(seed=2, layers=1), teacher=tiny_gpt2(seed=1), args=args,
                                  recipe={"terms": [{"loss": "forward_kl"}, {"loss": "logits_mse"}]},
                                  train_dataset=examples())
    assert trainer.frozen_teacher.keep_dtype == set()  # `logits` is also read by logits_mse, which needs fp32
    trainer = DistillationTrainer(model=tiny_gpt2(seed=2, layers=1), teacher=tiny_gpt2(seed=1), args=args,
                                  recipe={"terms": [{"loss": "forward_kl"}]}, train_dataset=examples())
    assert trainer.frozen_teacher.keep_dtype == {"logits"}
    seen.clear()
    trainer.train()
    assert seen and all(t == torch.bfloat16 and s == torch.float32 for s, t in seen)
