"""On-policy distillation of language models (GKD's lmbda): batches whose completions the student samples."""

import pytest
import torch
from token_steps import VOCAB, examples, tiny_gpt2

from hfdistill import DistillationConfig, DistillationError, DistillationTrainer
from hfdistill.losses.tokens import TOKEN_LOSSES
from hfdistill.on_policy import SAMPLED_FIELD, draw, prompts, sample_batch


def batch_of(rows):
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


def test_prompts_are_the_tokens_before_the_first_learnt_one():
    ids = torch.tensor([[5, 6, 7, 8, 0], [0, 0, 9, 3, 4], [1, 2, 3, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 0], [0, 0, 1, 1, 1], [1, 1, 1, 0, 0]])  # the second row left-padded
    labels = torch.tensor([[-100, -100, 7, 8, -100], [-100, -100, -100, 3, 4], [1, 2, 3, -100, -100]])
    got = prompts({"input_ids": ids, "attention_mask": mask, "labels": labels})
    assert [p.tolist() for p in got] == [[5, 6], [9], [1]]  # learnt from its first token: that token prompts


def test_sampled_batch_keeps_prompts_and_learns_exactly_the_sampled_tokens():
    student = tiny_gpt2(seed=2, layers=1)
    batch = batch_of(examples()[:6])
    torch.manual_seed(0)
    out = sample_batch(student, batch, temperature=0.7, max_new_tokens=5)
    assert out[SAMPLED_FIELD] is True
    for i, prompt in enumerate(prompts(batch)):
        n = int(out["attention_mask"][i].sum())
        row, labels = out["input_ids"][i, :n], out["labels"][i]
        assert row[:len(prompt)].tolist() == prompt.tolist()
        assert (labels[:len(prompt)] == -100).all() and (labels[n:] == -100).all()
        assert labels[len(prompt):n].tolist() == row[len(prompt):].tolist()
        assert 1 <= n - len(prompt) <= 5
    # The same draws as the model's own sampling from the left-padded prompts.
    rows = prompts(batch)
    longest = max(len(r) for r in rows)
    ids = torch.stack([torch.cat([torch.zeros(longest - len(r), dtype=torch.long), r]) for r in rows])
    mask = torch.stack([torch.cat([torch.zeros(longest - len(r), dtype=torch.long), torch.ones(len(r), dtype=torch.long)])
                        for r in rows])
    torch.manual_seed(0)
    student.eval()
    direct = student.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=0.7, top_k=0,
                              max_new_tokens=5, pad_token_id=0, eos_token_id=0)[:, longest:]
    for i, prompt in enumerate(rows):
        n = int(out["attention_mask"][i].sum()) - len(prompt)
        assert out["input_ids"][i, len(prompt):len(prompt) + n].tolist() == direct[i, :n].tolist()


def test_completions_stop_at_the_end_of_sequence_token_which_is_learnt():
    student = tiny_gpt2(seed=2, layers=1)
    student.generation_config.eos_token_id = list(range(VOCAB))  # every token ends the sequence
    batch = batch_of(examples()[:4])
    out = sample_batch(student, batch, max_new_tokens=8)
    learnt = (out["labels"] != -100).sum(1)
    assert learnt.tolist() == [1, 1, 1, 1]


def test_default_length_is_the_batchs_longest_completion_within_the_models_positions():
    student = tiny_gpt2(seed=2, layers=1)  # 32 positions
    batch = batch_of(examples()[:8])
    longest = int((batch["labels"] != -100).sum(1).max())
    out = sample_batch(student, batch)
    assert int((out["labels"] != -100).sum(1).max()) <= longest
    out = sample_batch(student, batch, max_new_tokens=1000)
    assert out["input_ids"].shape[1] <= 32


def test_draws_are_reproducible_and_take_the_fraction():
    draws = [draw(42, step, i, 0, 0.3) for step in range(500) for i in range(4)]
    assert draws == [draw(42, step, i, 0, 0.3) for step in range(500) for i in range(4)]
    assert 0.25 < sum(draws) / len(draws) < 0.35
    assert not any(draw(1, s, 0, 0, 0.0) for s in range(50)) and all(draw(1, s, 0, 0, 1.0) for s in range(50))
    assert [draw(1, s, 0, 0, 0.5) for s in range(50)] != [draw(1, s, 0, 1, 0.5) for s in range(50)]  # per process


def args(output_dir, **kw):
    values = dict(output_dir=str(output_dir), max_steps=3, per_device_train_batch_size=8, learning_rate=0.1,
                  optim="sgd", lr_scheduler_type="constant", report_to=[], save_strategy="no", disable_tqdm=True,
                  logging_steps=1, seed=0, use_cpu=True)
    return DistillationConfig(**{**values, **kw})


def trainer(tmp_path, recipe=None, teacher=None, **kw):
    recipe = recipe or {"terms": [{"loss": "jsd", "weight": 1.0}], "task_weight": 0.5}
    return DistillationTrainer(model=tiny_gpt2(seed=2, layers=1), teacher=teacher or tiny_gpt2(seed=1), recipe=recipe,
                               args=args(tmp_path, **kw), train_dataset=examples())


def test_on_policy_steps_train_the_terms_on_the_students_samples(tmp_path, monkeypatch):
    """lmbda = 1: every batch is sampled; the token loss reads the sampled labels, normalised by the sampled
    tokens of the step (counted again), and no task loss is applied to the student's own tokens."""
    seen = []
    forward = TOKEN_LOSSES["jsd"].forward
    monkeypatch.setattr(TOKEN_LOSSES["jsd"], "forward",
                        lambda self, s, t, labels, num_items_in_batch=None: (
                            seen.append((labels.clone(), num_items_in_batch)),
                            forward(self, s, t, labels, num_items_in_batch))[1])
    run = trainer(tmp_path / "a", lmbda=1.0, gradient_accumulation_steps=2, per_device_train_batch_size=4)
    run.train()
    logs = [e for e in run.state.log_history if "loss" in e]
    assert len(logs) == 3 and all(e["on_policy_fraction"] == 1.0 and "loss_task" not in e for e in logs)
    data = [r["labels"] for r in examples()]
    assert len(seen) == 6
    for step in range(3):
        pair = seen[2 * step: 2 * step + 2]
        counted = sum(int((labels[:, 1:] != -100).sum()) for labels, _ in pair)
        assert all(int(n) == counted for _, n in pair)  # the step's sampled tokens, over both micro-batches
        for labels, _ in pair:
            assert not any(labels.shape == d.shape and torch.equal(labels[0], d) for d in data)


def test_a_fraction_of_batches_is_sampled_reproducibly(tmp_path):
    runs = []
    for name in ("a", "b"):
        run = trainer(tmp_path / name, lmbda=0.5, max_steps=6, per_device_train_batch_size=4)
        run.train()
        runs.append(run)
    fractions = [e["on_policy_fraction"] for e in runs[0].state.log_history if "on_policy_fraction" in e]
    assert set(fractions) == {0.0, 1.0}  # one micro-batch per step: each step sampled or not
    assert fractions == [e["on_policy_fraction"] for e in runs[1].state.log_history if "on_policy_fraction" in e]
    tasks = [("loss_task" in e) for e in runs[0].state.log_history if "on_policy_fraction" in e]
    assert tasks == [f == 0.0 for f in fractions]  # the task loss on the data's batches only
    for a, b in zip(runs[0].student.parameters(), runs[1].student.parameters()):
        torch.testing.assert_close(a, b)


def test_refusals_before_training(tmp_path):
    from hfdistill.cache import TeacherCache, build_cache

    with pytest.raises(DistillationError, match="has none"):
        trainer(tmp_path / "a", recipe={"terms": [], "task_weight": 1.0}, lmbda=0.5)
    folder = build_cache(tiny_gpt2(seed=1), examples(), {"terms": [{"loss": "jsd"}]}, tmp_path / "cache",
                         batch_size=8, device="cpu", progress=False)
    with pytest.raises(DistillationError, match="live teacher"):
        trainer(tmp_path / "b", teacher=TeacherCache(folder), lmbda=0.5)
    with pytest.raises(ValueError, match="lmbda"):
        args(tmp_path / "c", lmbda=1.5)


def test_batches_with_the_teachers_own_tokenisation_are_refused(tmp_path):
    student = tiny_gpt2(seed=2, layers=1)
    batch = batch_of(examples()[:2])
    batch["teacher_input_ids"] = batch["input_ids"]
    with pytest.raises(DistillationError, match="teacher with the student's tokenizer"):
        sample_batch(student, batch)


# ------------------------------------------------------------------------------ recipes
def lm_recipe(tmp_path, **training):
    from test_causal_lm import tiny_lm_recipe

    spec = tiny_lm_recipe(tmp_path, [{"loss": "jsd", "weight": 0.5, "params": {"beta": 0.5}}])
    spec["training"].update(training)
    return spec


def test_recipe_trains_on_policy_and_its_baseline_does_not(tmp_path):
    import hfdistill
    from hfdistill.recipe import Recipe

    result = hfdistill.run(Recipe.from_dict(lm_recipe(tmp_path, lmbda=0.5, on_policy_temperature=0.8)),
                           print_summary=False)
    jobs = {job.label: job for job in result.jobs}
    assert "lmbda" not in jobs["student (no teacher)"].stages[0].training
    assert "lmbda" not in jobs["teacher"].stages[0].training
    assert jobs["student (distilled)"].stages[0].training["lmbda"] == 0.5
    assert result.metrics["eval_perplexity"] > 1


@pytest.mark.parametrize("change, message", [
    ({"data": {"packing": True}}, "packing"),
])
def test_recipes_that_cannot_go_on_policy_are_refused(tmp_path, change, message):
    from hfdistill.recipe import Recipe, RecipeError
    from hfdistill.run import plan_run

    spec = lm_recipe(tmp_path, lmbda=0.5)
    for key, value in change.items():
        if isinstance(value, dict):
            spec[key].update(value)
        elif value is None:
            del spec[key]
        else:
            spec[key] = value
    with pytest.raises(RecipeError) as info:
        plan_run(Recipe.from_dict(spec))
    assert info.value.path == "training.lmbda" and message in info.value.message


def test_lmbda_is_for_language_models_only():
    from hfdistill.recipe import Recipe, RecipeError
    from hfdistill.run import _check_on_policy
    from hfdistill.tasks import get_task

    recipe = Recipe.from_dict({"task": "image-classification", "teacher": {"name": "timm:resnet18"},
                               "student": {"name": "timm:resnet10t"}, "data": {"name": "sklearn-digits"},
                               "stages": [{"name": "a", "terms": [{"loss": "kd"}]},
                                                                     {"name": "b", "terms": [{"loss": "kd"}],
                                                                      "training": {"lmbda": 0.5}}]})
    with pytest.raises(RecipeError) as info:
        _check_on_policy(recipe, get_task("image-classification"), teacher=object())
    assert info.value.path == "stages[1].training.lmbda" and "image-classification" in info.value.message


def test_a_cached_teacher_cannot_score_samples(tmp_path):
    from types import SimpleNamespace

    from hfdistill.recipe import Recipe, RecipeError
    from hfdistill.run import _check_on_policy
    from hfdistill.tasks import get_task

    recipe = Recipe.from_dict(lm_recipe(tmp_path, lmbda=1.0))
    cached = SimpleNamespace(model=SimpleNamespace(is_cache=True))
    with pytest.raises(RecipeError) as info:
        _check_on_policy(recipe, get_task("text-generation"), cached)
    assert info.value.path == "training.lmbda" and "teacher cache" in info.value.message
    _check_on_policy(recipe, get_task("text-generation"), SimpleNamespace(model=object()))  # a live one: fine
