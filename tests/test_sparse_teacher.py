"""A teacher cached as per-token top-k logits (``logits_top_k``) and the token losses that read it as it is."""

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from token_steps import VOCAB, examples, tiny_gpt2

from hfdistill import DistillationConfig, DistillationTrainer
from hfdistill.cache import MANIFEST_NAME, TeacherCache, build_cache, cache_usage, topk_logits
from hfdistill.losses import build
from hfdistill.losses.common import SparseLogits
from hfdistill.losses.tokens import TOKEN_LOSSES

PARAMS = {"jsd": {"beta": 0.3}, "skew_kl": {"alpha": 0.2}, "skew_reverse_kl": {"alpha": 0.2}}


def logits_and_labels(seed=0, B=3, T=7, V=40):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(B, T, V, generator=g)
    teacher = 3 * torch.randn(B, T, V, generator=g)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :3] = -100
    labels[2, 5:] = -100
    return student, teacher, labels


def sparse(teacher: torch.Tensor, k: int) -> SparseLogits:
    return SparseLogits(*topk_logits(teacher, k), teacher.shape[-1])


def value_and_grad(loss, student, teacher, labels):
    s = student.clone().requires_grad_(True)
    value = loss(s, teacher, labels=labels)
    value.backward()
    return value.detach(), s.grad


@pytest.mark.parametrize("name", sorted(TOKEN_LOSSES))
def test_one_token_left_out_is_the_full_loss(name):
    """With k = V - 1 the "other" bucket is the one token left out: the loss and its gradient are the full loss's."""
    student, teacher, labels = logits_and_labels()
    loss = build(name, **PARAMS.get(name, {}))
    full, full_grad = value_and_grad(loss, student, teacher, labels)
    cached, cached_grad = value_and_grad(loss, student, sparse(teacher, teacher.shape[-1] - 1), labels)
    torch.testing.assert_close(cached, full, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cached_grad, full_grad, rtol=1e-4, atol=1e-7)


def test_forward_kl_on_a_top_k_is_the_kl_over_kept_tokens_and_one_bucket():
    """KL = sum_kept p_i log(p_i / q_i) + m log(m / (1 - sum_kept q_i)), per counted token, mean over tokens."""
    student, teacher, labels = logits_and_labels(seed=1)
    k = 5
    top = sparse(teacher, k)
    p, q = teacher.softmax(-1), student.softmax(-1)
    idx = top.indices.long()
    p_kept, q_kept = p.gather(-1, idx), q.gather(-1, idx)
    m, q_rest = 1 - p_kept.sum(-1), 1 - q_kept.sum(-1)
    per_token = (p_kept * (p_kept / q_kept).log()).sum(-1) + m * (m / q_rest).log()  # [B, T]
    counted = torch.zeros_like(labels, dtype=torch.bool)
    counted[:, :-1] = labels[:, 1:] != -100
    expected = per_token[counted].mean()
    torch.testing.assert_close(build("forward_kl")(student, top, labels=labels), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", sorted(TOKEN_LOSSES))
@pytest.mark.parametrize("k", [1, 4, 20])
def test_a_top_k_never_exceeds_the_full_divergence(name, k):
    """Merging the other tokens into one outcome can only lower an f-divergence (data processing)."""
    student, teacher, labels = logits_and_labels(seed=k)
    loss = build(name, **PARAMS.get(name, {}))
    assert loss(student, sparse(teacher, k), labels=labels) <= loss(student, teacher, labels=labels) + 1e-6


def test_buckets_at_a_temperature_are_the_spread_out_tail_aggregated():
    """At T != 1 the teacher's other tokens are taken as equal (the cache keeps nothing else about them): the
    bucket distribution is that of the evenly spread reconstruction (``dense``) at T, summed over the tail. The
    student's buckets are its own distribution at T summed over the same tail, exactly."""
    student, teacher, _ = logits_and_labels(seed=3)
    top = sparse(teacher, 6)
    T = 2.5
    kept = top.indices.long()
    tail = torch.ones_like(teacher, dtype=torch.bool).scatter(-1, kept, False)
    for bucket_logits, full in ((top.bucket_logits(T), top.dense() / T),
                                (top.student_bucket_logits(student, T), student / T)):
        probs = full.softmax(-1)
        expected = torch.cat([probs.gather(-1, kept), (probs * tail).sum(-1, keepdim=True)], -1)
        torch.testing.assert_close(bucket_logits.softmax(-1), expected, rtol=1e-5, atol=1e-7)
    # At T = 1 the teacher's buckets are its exact probabilities and remaining mass.
    p = teacher.softmax(-1)
    expected = torch.cat([p.gather(-1, kept), (p * tail).sum(-1, keepdim=True)], -1)
    torch.testing.assert_close(top.bucket_logits().softmax(-1), expected, rtol=1e-5, atol=1e-7)


def test_chunks_give_the_same_value_and_gradient():
    student, teacher, labels = logits_and_labels(seed=4)
    top = sparse(teacher, 8)
    whole = value_and_grad(build("jsd", beta=0.5), student, top, labels)
    chunked = value_and_grad(build("jsd", beta=0.5, chunk_size=2), student, top, labels)
    for a, b in zip(whole, chunked):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_half_precision_student_logits():
    student, teacher, labels = logits_and_labels(seed=5)
    loss = build("forward_kl")
    top = sparse(teacher, 8)
    torch.testing.assert_close(loss(student.bfloat16(), top, labels=labels),
                               loss(student.bfloat16().float(), top, labels=labels), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------ through a cache
def args(output_dir, **kw):
    return DistillationConfig(
        output_dir=str(output_dir), max_steps=2, per_device_train_batch_size=8, learning_rate=0.1, optim="sgd",
        lr_scheduler_type="constant", report_to=[], save_strategy="no", disable_tqdm=True, logging_steps=1,
        train_sampling_strategy="sequential", seed=0, use_cpu=True, **kw)


def term_losses(trainer, name):
    return [entry[f"loss_{name}"] for entry in trainer.state.log_history if f"loss_{name}" in entry]


@pytest.fixture(scope="module")
def lm_teacher():
    return tiny_gpt2(seed=1).eval()


def build_top_k(folder, teacher, k, recipe=None):
    recipe = recipe or {"terms": [{"loss": "forward_kl"}]}
    return build_cache(teacher, examples(), recipe, folder, logits_top_k=k, batch_size=8, shard_size=16,
                       device="cpu", progress=False)


def test_trainer_reads_a_top_k_cache_as_the_live_teacher(tmp_path, lm_teacher, monkeypatch):
    """Token losses get the cache's SparseLogits as they are; with k = V - 1 the run logs the live teacher's losses.
    A loss that does not read a top-k (hidden-state MSE's neighbour here: kd) gets full logits."""
    folder = build_top_k(tmp_path / "cache", lm_teacher, VOCAB - 1)
    seen = []
    forward = TOKEN_LOSSES["forward_kl"].forward
    monkeypatch.setattr(TOKEN_LOSSES["forward_kl"], "forward",
                        lambda self, s, t, **kw: (seen.append(type(t)), forward(self, s, t, **kw))[1])
    recipe = {"terms": [{"loss": "forward_kl", "weight": 1.0}], "task_weight": 0.5}
    runs = {}
    for name, teacher in (("live", tiny_gpt2(seed=1)), ("cached", TeacherCache(folder))):
        trainer = DistillationTrainer(model=tiny_gpt2(seed=2, layers=1), teacher=teacher, recipe=recipe,
                                      args=args(tmp_path / name), train_dataset=examples())
        trainer.train()
        runs[name] = term_losses(trainer, "forward_kl")
    assert SparseLogits in seen and torch.Tensor in seen
    assert len(runs["cached"]) == 2
    for cached, live in zip(runs["cached"], runs["live"]):
        assert cached == pytest.approx(live, rel=1e-4)


def test_a_small_top_k_trains_and_other_losses_get_full_logits(tmp_path, lm_teacher, monkeypatch):
    folder = build_top_k(tmp_path / "cache", lm_teacher, 4, {"terms": [{"loss": "forward_kl"}, {"loss": "kd"}]})
    from hfdistill.losses import registry

    kd = registry.get_info("kd").cls
    seen = []
    forward = kd.forward
    monkeypatch.setattr(kd, "forward", lambda self, s, t, *a, **kw: (seen.append(t), forward(self, s, t, *a, **kw))[1])
    recipe = {"terms": [{"loss": "forward_kl", "weight": 1.0}, {"loss": "kd", "weight": 0.1}], "task_weight": 0.5}
    trainer = DistillationTrainer(model=tiny_gpt2(seed=2, layers=1), teacher=TeacherCache(folder), recipe=recipe,
                                  args=args(tmp_path / "run"), train_dataset=examples())
    trainer.train()
    values = term_losses(trainer, "forward_kl")
    assert len(values) == 2 and all(math.isfinite(v) and v > 0 for v in values)
    assert seen and all(isinstance(t, torch.Tensor) and t.shape[-1] == VOCAB for t in seen)


def test_manifest_and_usage_report_the_size_per_token_and_the_mass_left_out(tmp_path, lm_teacher):
    folder = Path(build_top_k(tmp_path / "cache", lm_teacher, 4))
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    size = manifest["size"]
    tokens = sum(int(row["attention_mask"].sum()) for row in examples())
    assert size["tokens"] == tokens
    assert size["bytes_per_token"] == pytest.approx(size["bytes"] / tokens)
    assert size["bytes"] == sum(shard["bytes"] for shard in manifest["shards"])
    # The teacher's own mass outside its top 4 on the real tokens.
    with torch.no_grad():
        probs = lm_teacher(input_ids=torch.stack([r["input_ids"] for r in examples()]),
                           attention_mask=torch.stack([r["attention_mask"] for r in examples()])).logits.softmax(-1)
    rest = 1 - probs.topk(4, dim=-1).values.sum(-1)
    mask = torch.stack([r["attention_mask"] for r in examples()]).bool()
    assert size["rest_mass"]["mean"] == pytest.approx(float(rest[mask].mean()), rel=1e-4)
    assert size["rest_mass"]["max"] == pytest.approx(float(rest[mask].max()), rel=1e-4)
    text = cache_usage(str(folder), "r.yaml")
    assert f"{tokens} tokens" in text and "bytes per token" in text and "top-4" in text


def test_sequences_as_long_as_the_teacher_allows_can_be_cached(tmp_path):
    """The build probes which dims follow the sequence length with a shorter batch, never a longer one (that
    would pass a model's maximum number of positions)."""
    from token_steps import LENGTH
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    teacher = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=LENGTH, n_embd=16, n_layer=1, n_head=2))
    full = [dict(row, attention_mask=torch.ones(LENGTH, dtype=torch.long)) for row in examples()]
    folder = build_cache(teacher, full, {"terms": [{"loss": "forward_kl"}]}, tmp_path / "c", logits_top_k=8,
                         batch_size=8, device="cpu", progress=False)
    manifest = json.loads((Path(folder) / MANIFEST_NAME).read_text())
    assert manifest["taps"]["logits"]["seq_dims"] == [[0]] and manifest["size"]["tokens"] == LENGTH * len(full)
