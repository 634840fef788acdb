"""Token losses from the models' final hidden states (``from_hidden``): no vocabulary-size teacher logits."""

import pytest
import torch
from token_steps import VOCAB, examples, tiny_gpt2
from transformers import GPT2Config, GPT2LMHeadModel

from hfdistill import DistillationConfig, DistillationError, DistillationTrainer

HIDDEN = {"student": "hidden_states.-1", "teacher": "hidden_states.-1"}


def args(output_dir, **kw):
    values = dict(output_dir=str(output_dir), max_steps=2, per_device_train_batch_size=8, learning_rate=0.5,
                  optim="sgd", lr_scheduler_type="constant", report_to=[], save_strategy="no", disable_tqdm=True,
                  logging_steps=1, seed=0, use_cpu=True, train_sampling_strategy="sequential")
    return DistillationConfig(**{**values, **kw})


def train(tmp_path, name, term, task_weight=0.5, student=None, teacher=None):
    trainer = DistillationTrainer(model=student or tiny_gpt2(seed=2, layers=1), teacher=teacher or tiny_gpt2(seed=1),
                                  recipe={"terms": [term], "task_weight": task_weight}, args=args(tmp_path / name),
                                  train_dataset=examples())
    trainer.train()
    return trainer


def head_positions(model):
    """Record how many positions the model's output layer computes per call."""
    seen = []
    model.get_output_embeddings().register_forward_hook(lambda m, i, o: seen.append(o.shape[1]))
    return seen


@pytest.mark.parametrize("loss, params", [("forward_kl", {}), ("jsd", {"beta": 0.3}), ("skew_reverse_kl", {"alpha": 0.2})])
def test_from_hidden_trains_as_the_loss_on_logits(tmp_path, loss, params):
    """Same losses logged and the same student after two steps as the term on the logits."""
    on_logits = train(tmp_path, "logits", {"loss": loss, "params": params})
    on_hidden = train(tmp_path, "hidden", {"loss": loss, "params": {**params, "from_hidden": True}, **HIDDEN})
    logged = [[e[f"loss_{loss}"] for e in t.state.log_history if f"loss_{loss}" in e] for t in (on_logits, on_hidden)]
    assert logged[0] == pytest.approx(logged[1], rel=1e-4)
    for a, b in zip(on_logits.student.parameters(), on_hidden.student.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_the_teacher_never_makes_full_logits_nor_the_student_without_a_task_loss(tmp_path):
    teacher, student = tiny_gpt2(seed=1), tiny_gpt2(seed=2, layers=1)
    teacher_positions, student_positions = head_positions(teacher), head_positions(student)
    train(tmp_path, "a", {"loss": "jsd", "params": {"from_hidden": True}, **HIDDEN}, task_weight=0.0,
          student=student, teacher=teacher)
    assert teacher_positions and set(teacher_positions) == {1}  # the teacher's head on the last position only
    assert len(student_positions) == 3 and set(student_positions[1:]) == {1}  # the dry run (with labels) aside
    # With its own loss the student computes every position; the teacher still does not.
    teacher, student = tiny_gpt2(seed=1), tiny_gpt2(seed=2, layers=1)
    teacher_positions, student_positions = head_positions(teacher), head_positions(student)
    train(tmp_path, "b", {"loss": "jsd", "params": {"from_hidden": True}, **HIDDEN}, task_weight=0.5,
          student=student, teacher=teacher)
    assert set(teacher_positions) == {1} and max(student_positions) > 1


def test_students_of_another_width(tmp_path):
    torch.manual_seed(3)
    narrow = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=8, n_layer=1, n_head=2,
                                        bos_token_id=0, eos_token_id=0))
    trainer = train(tmp_path, "narrow", {"loss": "reverse_kl", "params": {"from_hidden": True}, **HIDDEN}, student=narrow)
    assert all(torch.isfinite(torch.tensor(e["loss"])) for e in trainer.state.log_history if "loss" in e)


def test_taps_that_are_not_the_final_hidden_states_are_refused(tmp_path):
    with pytest.raises(DistillationError, match="must be the final hidden states"):
        train(tmp_path, "bad", {"loss": "jsd", "params": {"from_hidden": True}, "student": "transformer.h.0.mlp.c_fc",
                                "teacher": "hidden_states.-1"})
    with pytest.raises(DistillationError, match="shapes|shape"):  # on logits the shapes must still agree
        narrow = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=8, n_layer=1, n_head=2))
        train(tmp_path, "plain", {"loss": "jsd", **HIDDEN}, student=narrow)
