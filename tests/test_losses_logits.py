"""Logit-based distillation losses: values against the papers' formulas, written out independently,
plus properties (zero at student == teacher, gradients, large logits, batch size 1, validation)."""

from __future__ import annotations

import math

import pytest
import torch

from hfdistill import losses
from hfdistill.errors import DistillationError, LossParamError
from hfdistill.losses import get_info

B, C = 4, 5


def logits(*shape: int, seed: int = 0, scale: float = 2.0) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.randn(*shape) * scale


def probs(z: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Softmax written out with exp / sum (the implementations use log_softmax)."""
    e = torch.exp((z - z.max(dim=-1, keepdim=True).values) / temperature)
    return e / e.sum(dim=-1, keepdim=True)


def kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row, from probabilities."""
    return (p * torch.log(p / q)).sum(-1)


def student_grad(loss_fn, student: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    s = student.clone().requires_grad_(True)
    loss_fn(s, *args, **kwargs).backward()
    return s.grad


# --------------------------------------------------------------------------------------------- registry


@pytest.mark.parametrize("name", ["kd", "logits_mse", "dkd", "dist", "logit_std_kd", "tf_kd"])
def test_registered_as_logit_methods(name):
    info = get_info(name)
    assert info.reads == "logits"
    assert info.default_tap == "logits"
    assert info.paper and info.description
    assert not info.trainable


def test_declared_fields():
    assert get_info("dkd").fields == ("labels", "epoch")
    assert get_info("tf_kd").fields == ("labels",)
    assert get_info("dist").fields == ()
    assert get_info("dkd").params == ("alpha", "beta", "temperature", "warmup")
    assert get_info("tf_kd").params == ("mode", "temperature", "a")


def test_unknown_parameter_is_rejected():
    with pytest.raises(LossParamError, match="logits_mse") as info:
        losses.build("logits_mse", temperature=2.0)
    assert info.value.param == "temperature"


# --------------------------------------------------------------------------------------------- kd


def test_kd_value_matches_formula_with_t_squared():
    s, t = logits(B, C, seed=1), logits(B, C, seed=2)
    for temperature in (1.0, 4.0):
        expected = kl(probs(t, temperature), probs(s, temperature)).mean() * temperature**2
        got = losses.build("kd", temperature=temperature)(s, t)
        torch.testing.assert_close(got, expected)


def test_kd_hand_computed_value():
    # one row, two classes, T = 2: p_t = softmax([0, 0]) = [.5, .5], p_s = softmax([1, 0]) (at T=1 of z/2)
    s, t = torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 0.0]])
    p1 = math.exp(1) / (math.exp(1) + 1)
    expected = 4 * (0.5 * math.log(0.5 / p1) + 0.5 * math.log(0.5 / (1 - p1)))
    assert losses.build("kd", temperature=2.0)(s, t).item() == pytest.approx(expected, rel=1e-5)


def test_kd_properties():
    kd = losses.build("kd")
    s, t = logits(B, C, seed=1), logits(B, C, seed=2)
    assert kd(t, t).item() == pytest.approx(0.0, abs=1e-6)
    assert kd(s, t).item() > 0
    grad = student_grad(kd, s, t)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    big = kd(s * 1e4, t * 1e4)
    assert torch.isfinite(big)
    assert torch.isfinite(student_grad(kd, s * 1e4, t * 1e4)).all()
    assert torch.isfinite(kd(s[:1], t[:1]))
    # [B, T, C] = rows of [B*T, C]
    s3, t3 = logits(2, 3, C, seed=3), logits(2, 3, C, seed=4)
    torch.testing.assert_close(kd(s3, t3), kd(s3.reshape(6, C), t3.reshape(6, C)))
    # bf16 inputs are computed in float32
    assert kd(s.bfloat16(), t.bfloat16()).dtype == torch.float32


@pytest.mark.parametrize("temperature", [0.0, -1.0])
def test_kd_rejects_non_positive_temperature(temperature):
    with pytest.raises(LossParamError, match="'temperature'"):
        losses.build("kd", temperature=temperature)


# --------------------------------------------------------------------------------------------- logits_mse


def test_logits_mse_hand_computed_value():
    s = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    t = torch.tensor([[0.0, 2.0], [3.0, 6.0]])
    # (1 + 0 + 0 + 4) / 4 elements
    assert losses.build("logits_mse")(s, t).item() == pytest.approx(1.25)


def test_logits_mse_properties():
    mse = losses.build("logits_mse")
    s, t = logits(B, C, seed=1), logits(B, C, seed=2)
    torch.testing.assert_close(mse(s, t), ((s - t) ** 2).sum() / s.numel())
    assert mse(t, t).item() == 0.0
    grad = student_grad(mse, s, t)
    torch.testing.assert_close(grad, 2 * (s - t) / s.numel())
    assert torch.isfinite(mse(s * 1e4, t * 1e4))
    assert torch.isfinite(mse(s[:1], t[:1]))
    s3, t3 = logits(2, 3, C, seed=3), logits(2, 3, C, seed=4)
    torch.testing.assert_close(mse(s3, t3), mse(s3.reshape(6, C), t3.reshape(6, C)))


# --------------------------------------------------------------------------------------------- dkd


def dkd_reference(s, t, y, alpha, beta, temperature):
    """DKD from the paper's definitions, via full-softmax probabilities (the implementation works
    in log space on the C-1 non-target logits)."""
    p_s, p_t = probs(s, temperature), probs(t, temperature)
    onehot = torch.nn.functional.one_hot(y, s.shape[-1]).bool()
    pc_s, pc_t = p_s[onehot], p_t[onehot]
    b_s = torch.stack([pc_s, 1 - pc_s], -1)
    b_t = torch.stack([pc_t, 1 - pc_t], -1)
    tckd = kl(b_t, b_s)
    n = s.shape[0]
    hat_s = p_s[~onehot].view(n, -1) / (1 - pc_s)[:, None]
    hat_t = p_t[~onehot].view(n, -1) / (1 - pc_t)[:, None]
    nckd = kl(hat_t, hat_s)
    return (alpha * tckd + beta * nckd).mean() * temperature**2, tckd, nckd


def dkd_mdistiller_style(s, t, y, alpha, beta, temperature):
    """The reference code's construction: target logit pushed down by 1000 for NCKD."""
    mask = torch.nn.functional.one_hot(y, s.shape[-1]).float()
    p_s, p_t = probs(s, temperature), probs(t, temperature)
    b_s = torch.stack([(p_s * mask).sum(1), (p_s * (1 - mask)).sum(1)], 1)
    b_t = torch.stack([(p_t * mask).sum(1), (p_t * (1 - mask)).sum(1)], 1)
    tckd = kl(b_t, b_s)
    log_q_s = torch.log_softmax(s / temperature - 1000.0 * mask, dim=1)
    q_t = torch.softmax(t / temperature - 1000.0 * mask, dim=1)
    nckd = torch.nn.functional.kl_div(log_q_s, q_t, reduction="none").sum(1)
    return (alpha * tckd + beta * nckd).mean() * temperature**2


def test_dkd_value_matches_paper_formula_and_reference_construction():
    s, t = logits(B, C, seed=1), logits(B, C, seed=2)
    y = torch.tensor([0, 3, 4, 1])
    dkd = losses.build("dkd", alpha=1.0, beta=8.0, temperature=4.0, warmup=20.0)
    got = dkd(s, t, labels=y, epoch=25.0)
    expected, _, _ = dkd_reference(s, t, y, 1.0, 8.0, 4.0)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(got, dkd_mdistiller_style(s, t, y, 1.0, 8.0, 4.0))


def test_dkd_decomposes_classical_kd():
    # Paper: KD = TCKD + (1 - p_c^T) * NCKD for each sample.
    s, t = logits(1, C, seed=5), logits(1, C, seed=6)
    y = torch.tensor([2])
    temperature = 3.0
    kd = losses.build("kd", temperature=temperature)(s, t)
    tckd = losses.build("dkd", alpha=1.0, beta=0.0, temperature=temperature, warmup=0)(s, t, labels=y, epoch=0)
    nckd = losses.build("dkd", alpha=0.0, beta=1.0, temperature=temperature, warmup=0)(s, t, labels=y, epoch=0)
    pc_t = probs(t, temperature)[0, 2]
    torch.testing.assert_close(kd, tckd + (1 - pc_t) * nckd)


def test_dkd_warmup_ramp():
    s, t = logits(B, C, seed=1), logits(B, C, seed=2)
    y = torch.tensor([0, 1, 2, 3])
    dkd = losses.build("dkd", warmup=20.0)
    full = dkd(s, t, labels=y, epoch=20.0)
    assert dkd(s, t, labels=y, epoch=0.0).item() == 0.0
    torch.testing.assert_close(dkd(s, t, labels=y, epoch=5.0), full * 0.25)
    torch.testing.assert_close(dkd(s, t, labels=y, epoch=40.0), full)
    no_warmup = losses.build("dkd", warmup=0)
    torch.testing.assert_close(no_warmup(s, t, labels=y, epoch=0.0), full)


def test_dkd_properties():
    dkd = losses.build("dkd")
    s, t = logits(B, C, seed=1), logits(B, C, seed=2)
    y = torch.tensor([0, 1, 2, 3])
    assert dkd(t, t, labels=y, epoch=30).item() == pytest.approx(0.0, abs=1e-6)
    grad = student_grad(dkd, s, t, labels=y, epoch=30)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    # large logits: the target probability rounds to 1, the 1000-offset trick would fail; we stay finite
    big = dkd(s * 1e4, t * 1e4, labels=y, epoch=30)
    assert torch.isfinite(big)
    assert torch.isfinite(student_grad(dkd, s * 1e4, t * 1e4, labels=y, epoch=30)).all()
    assert torch.isfinite(dkd(s[:1], t[:1], labels=y[:1], epoch=30))


def test_dkd_sequence_logits_skip_ignored_rows():
    dkd = losses.build("dkd", warmup=0)
    s3, t3 = logits(2, 3, C, seed=3), logits(2, 3, C, seed=4)
    y3 = torch.tensor([[1, -100, 4], [0, 2, -100]])
    keep = (y3 != -100).reshape(-1)
    expected = dkd(s3.reshape(6, C)[keep], t3.reshape(6, C)[keep], labels=y3.reshape(-1)[keep], epoch=0)
    torch.testing.assert_close(dkd(s3, t3, labels=y3, epoch=0), expected)
    # every row ignored: zero, and backward still works
    s = s3.clone().requires_grad_(True)
    out = dkd(s, t3, labels=torch.full((2, 3), -100), epoch=0)
    out.backward()
    assert out.item() == 0.0 and torch.equal(s.grad, torch.zeros_like(s))


def test_dkd_validation():
    with pytest.raises(LossParamError, match="'temperature'"):
        losses.build("dkd", temperature=0)
    with pytest.raises(LossParamError, match="'beta'"):
        losses.build("dkd", beta=-1)
    with pytest.raises(LossParamError, match="'warmup'"):
        losses.build("dkd", warmup=-5)
    dkd = losses.build("dkd")
    s, t = logits(B, C), logits(B, C, seed=1)
    with pytest.raises(DistillationError, match="labels of shape"):
        dkd(s, t, labels=torch.zeros(B + 1, dtype=torch.long), epoch=1)
    with pytest.raises(DistillationError, match="labels must lie"):
        dkd(s, t, labels=torch.tensor([0, 1, 2, C]), epoch=1)
    with pytest.raises(DistillationError, match="at least 2 classes"):
        dkd(s[:, :1], t[:, :1], labels=torch.zeros(B, dtype=torch.long), epoch=1)


# --------------------------------------------------------------------------------------------- dist


def pearson(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Textbook Pearson correlation of two vectors: cov / (std_a * std_b)."""
    a_c, b_c = a - a.mean(), b - b.mean()
    return (a_c * b_c).mean() / (a_c.pow(2).mean().sqrt() * b_c.pow(2).mean().sqrt())


def dist_reference(s, t, beta, gamma, temperature):
    y_s, y_t = probs(s, temperature), probs(t, temperature)
    inter = 1 - torch.stack([pearson(y_s[i], y_t[i]) for i in range(s.shape[0])]).mean()
    intra = 1 - torch.stack([pearson(y_s[:, j], y_t[:, j]) for j in range(s.shape[1])]).mean()
    return temperature**2 * (beta * inter + gamma * intra)


def test_dist_value_matches_formula():
    s, t = logits(B, C, seed=1), logits(B, C, seed=2)
    for beta, gamma, temperature in [(1.0, 1.0, 1.0), (2.0, 0.5, 4.0)]:
        got = losses.build("dist", beta=beta, gamma=gamma, temperature=temperature)(s, t)
        torch.testing.assert_close(got, dist_reference(s, t, beta, gamma, temperature), rtol=1e-5, atol=1e-5)


def test_dist_properties():
    dist = losses.build("dist")
    s, t = logits(B, C, seed=1, scale=4.0), logits(B, C, seed=2, scale=4.0)
    assert dist(t, t).item() == pytest.approx(0.0, abs=1e-5)
    assert dist(s, t).item() > 0
    # 1 - correlation is at most 2 per term
    assert dist(s, t).item() <= 4.0
    grad = student_grad(dist, s, t)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert torch.isfinite(dist(s * 1e4, t * 1e4))
    assert torch.isfinite(student_grad(dist, s * 1e4, t * 1e4)).all()
    s3, t3 = logits(2, 3, C, seed=3), logits(2, 3, C, seed=4)
    torch.testing.assert_close(dist(s3, t3), dist(s3.reshape(6, C), t3.reshape(6, C)))


def test_dist_batch_of_one():
    # intra-class correlation over one sample is undefined; as in the reference code it counts as 0
    s, t = logits(1, C, seed=1), logits(1, C, seed=2)
    dist = losses.build("dist", beta=1.0, gamma=1.0)
    y_s, y_t = probs(s), probs(t)
    expected = (1 - pearson(y_s[0], y_t[0])) + 1.0
    torch.testing.assert_close(dist(s, t), expected, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(student_grad(dist, s, t)).all()


def test_dist_validation():
    with pytest.raises(LossParamError, match="'temperature'"):
        losses.build("dist", temperature=-1)
    with pytest.raises(LossParamError, match="'gamma'"):
        losses.build("dist", gamma=-0.1)


# --------------------------------------------------------------------------------------------- logit_std_kd


def zscore_reference(z: torch.Tensor) -> torch.Tensor:
    mean = z.mean(-1, keepdim=True)
    std = ((z - mean) ** 2).mean(-1, keepdim=True).sqrt()  # 1/K, the paper's Algorithm 1
    return (z - mean) / std


def test_logit_std_kd_value_matches_formula():
    s, t = logits(B, C, seed=1), logits(B, C, seed=2)
    for temperature in (1.0, 2.0):
        expected = kl(probs(zscore_reference(t), temperature), probs(zscore_reference(s), temperature)).mean()
        expected = expected * temperature**2
        got = losses.build("logit_std_kd", temperature=temperature)(s, t)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_logit_std_kd_ignores_logit_scale_and_shift():
    loss = losses.build("logit_std_kd")
    s, t = logits(B, C, seed=1), logits(B, C, seed=2)
    # a student whose logits are a positive affine map of the teacher's is already perfect
    assert loss(3.0 * t + 5.0, t).item() == pytest.approx(0.0, abs=1e-5)
    torch.testing.assert_close(loss(0.1 * s - 2.0, t), loss(s, t), rtol=1e-4, atol=1e-5)
    # ... which also makes huge logits harmless
    torch.testing.assert_close(loss(s * 1e4, t * 1e4), loss(s, t), rtol=1e-4, atol=1e-5)


def test_logit_std_kd_properties():
    loss = losses.build("logit_std_kd")
    s, t = logits(B, C, seed=1), logits(B, C, seed=2)
    assert loss(s, t).item() > 0
    grad = student_grad(loss, s, t)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert torch.isfinite(student_grad(loss, s * 1e4, t * 1e4)).all()
    assert torch.isfinite(loss(s[:1], t[:1]))
    assert torch.isfinite(loss(torch.ones(2, C), t[:2]))  # constant logits: std 0
    s3, t3 = logits(2, 3, C, seed=3), logits(2, 3, C, seed=4)
    torch.testing.assert_close(loss(s3, t3), loss(s3.reshape(6, C), t3.reshape(6, C)))
    with pytest.raises(LossParamError, match="'temperature'"):
        losses.build("logit_std_kd", temperature=0)


# --------------------------------------------------------------------------------------------- tf_kd


def virtual_teacher_reference(y: torch.Tensor, num_classes: int, a: float, temperature: float) -> torch.Tensor:
    """Eq. 8 of the paper, softened as (p^d)^(1/T) renormalised."""
    p_d = torch.full((y.shape[0], num_classes), (1 - a) / (num_classes - 1))
    p_d[torch.arange(y.shape[0]), y] = a
    soft = p_d ** (1.0 / temperature)
    return soft / soft.sum(-1, keepdim=True)


def test_tf_kd_self_is_kd_with_temperature():
    s, t = logits(B, C, seed=1), logits(B, C, seed=2)
    y = torch.tensor([0, 1, 2, 3])
    tf = losses.build("tf_kd", mode="self", temperature=6.0)
    expected = kl(probs(t, 6.0), probs(s, 6.0)).mean() * 36.0
    torch.testing.assert_close(tf(s, t, labels=y), expected)
    torch.testing.assert_close(tf(s, t, labels=y), losses.build("kd", temperature=6.0)(s, t))
    assert tf(t, t, labels=y).item() == pytest.approx(0.0, abs=1e-6)
    assert torch.isfinite(tf(s * 1e4, t * 1e4, labels=y))


def test_tf_kd_virtual_value_matches_formula():
    s = logits(B, C, seed=1)
    y = torch.tensor([0, 3, 4, 1])
    for a, temperature in [(0.99, 20.0), (0.9, 1.0)]:
        p_t = virtual_teacher_reference(y, C, a, temperature)
        expected = kl(p_t, probs(s, temperature)).mean() * temperature**2
        got = losses.build("tf_kd", mode="virtual", a=a, temperature=temperature)(s, None, labels=y)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_tf_kd_virtual_teacher_hand_computed():
    # 2 classes, a = 0.8, T = 1: the virtual teacher is [0.8, 0.2]; a student with equal logits is [0.5, 0.5]
    got = losses.build("tf_kd", mode="virtual", a=0.8, temperature=1.0)(
        torch.zeros(1, 2), None, labels=torch.tensor([0])
    )
    expected = 0.8 * math.log(0.8 / 0.5) + 0.2 * math.log(0.2 / 0.5)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_tf_kd_virtual_properties():
    tf = losses.build("tf_kd", mode="virtual")
    s, t = logits(B, C, seed=1), logits(B, C, seed=2)
    y = torch.tensor([0, 1, 2, 3])
    # the teacher tensor is ignored
    torch.testing.assert_close(tf(s, t, labels=y), tf(s, None, labels=y))
    # minimal (zero) when the student's logits are log p^d (up to a per-row constant)
    p_d = virtual_teacher_reference(y, C, 0.99, 1.0)
    assert tf(torch.log(p_d) + 3.0, None, labels=y).item() == pytest.approx(0.0, abs=1e-4)
    grad = student_grad(tf, s, None, labels=y)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert torch.isfinite(tf(s * 1e4, None, labels=y))
    assert torch.isfinite(student_grad(tf, s * 1e4, None, labels=y)).all()
    assert torch.isfinite(tf(s[:1], None, labels=y[:1]))
    s3 = logits(2, 3, C, seed=3)
    y3 = torch.tensor([[1, -100, 4], [0, 2, -100]])
    keep = (y3 != -100).reshape(-1)
    torch.testing.assert_close(
        tf(s3, None, labels=y3), tf(s3.reshape(6, C)[keep], None, labels=y3.reshape(-1)[keep])
    )


def test_tf_kd_validation():
    with pytest.raises(LossParamError, match="'mode'"):
        losses.build("tf_kd", mode="reg")
    with pytest.raises(LossParamError, match="'a'"):
        losses.build("tf_kd", a=1.0)
    with pytest.raises(LossParamError, match="'temperature'"):
        losses.build("tf_kd", temperature=0.0)
    with pytest.raises(DistillationError, match="needs labels"):
        losses.build("tf_kd", mode="virtual")(logits(B, C), None)
    with pytest.raises(DistillationError, match="teacher"):
        losses.build("tf_kd", mode="self")(logits(B, C), None)


# --------------------------------------------------------------------------------------------- masked classes (-inf)

MASKED = 2  # the class masked out with -inf logits


def _mask(z: torch.Tensor, column: int = MASKED) -> torch.Tensor:
    z = z.clone()
    z[..., column] = float("-inf")
    return z


def _drop(z: torch.Tensor, column: int = MASKED) -> torch.Tensor:
    return torch.cat([z[..., :column], z[..., column + 1 :]], dim=-1)


def _value_and_grad(loss_fn, s: torch.Tensor, t: torch.Tensor | None, **fields):
    s = s.clone().requires_grad_(True)
    value = loss_fn(s, t, **fields)
    value.backward()
    return value.detach(), s.grad


MASK_CASES = [
    ("kd", {}, {}),
    ("kd", {"temperature": 1.0}, {}),
    ("dkd", {"warmup": 0}, {"labels": True, "epoch": 1.0}),
    ("tf_kd", {}, {"labels": True}),
    ("tf_kd", {"mode": "virtual"}, {"labels": True}),
    ("logit_std_kd", {}, {}),
    ("logits_mse", {}, {}),
    ("deit", {"mode": "soft"}, {}),
    ("deit", {"mode": "hard"}, {}),
]


@pytest.mark.parametrize("name, params, fields", MASK_CASES, ids=[f"{n}-{p}" for n, p, _ in MASK_CASES])
def test_masked_class_counts_as_absent(name, params, fields):
    """-inf in student and teacher at the same class: finite value equal to the loss without that class, finite
    gradients (zero at the masked class, equal to the reduced problem's elsewhere)."""
    s, t = logits(B, C, seed=1), logits(B, C, seed=2)
    y = torch.tensor([0, 1, 3, 4])  # no label on the masked class
    loss = losses.build(name, **params)
    masked_fields = {k: (y if k == "labels" else v) for k, v in fields.items()}
    reduced_fields = {k: (y - (y > MASKED).long() if k == "labels" else v) for k, v in fields.items()}
    value, grad = _value_and_grad(loss, _mask(s), _mask(t), **masked_fields)
    expected, expected_grad = _value_and_grad(loss, _drop(s), _drop(t), **reduced_fields)
    assert torch.isfinite(value) and torch.isfinite(grad).all()
    torch.testing.assert_close(value, expected)
    assert torch.all(grad[:, MASKED] == 0)
    torch.testing.assert_close(_drop(grad), expected_grad)


@pytest.mark.parametrize("name", ["kd", "logit_std_kd", "logits_mse"])
def test_masked_classes_per_row(name):
    """A different class masked in each row ([B, T, C] logits, as a vocabulary mask would): the batch mean of the
    rows' losses without their masked class."""
    s, t = logits(2, 2, C, seed=3), logits(2, 2, C, seed=4)
    loss = losses.build(name)
    s_m, t_m = s.clone(), t.clone()
    rows = []
    for row, column in zip(range(4), (0, 2, 4, 1)):
        b, i = divmod(row, 2)
        s_m[b, i, column] = t_m[b, i, column] = float("-inf")
        rows.append(loss(_drop(s[b, i : i + 1], column), _drop(t[b, i : i + 1], column)))
    value, grad = _value_and_grad(loss, s_m, t_m)
    assert torch.isfinite(grad).all()
    torch.testing.assert_close(value, torch.stack(rows).mean())


def test_dist_and_dkd_stay_finite_with_masked_classes():
    s, t = _mask(logits(B, C, seed=1)), _mask(logits(B, C, seed=2))
    for loss, fields in ((losses.build("dist"), {}), (losses.build("dkd"), {"labels": torch.tensor([0, 1, 2, 3]), "epoch": 30})):
        value, grad = _value_and_grad(loss, s, t, **fields)  # dkd: row 2's target is the masked class itself
        assert torch.isfinite(value) and torch.isfinite(grad).all()


def test_logit_std_kd_constant_row_has_finite_gradient():
    value, grad = _value_and_grad(losses.build("logit_std_kd"), torch.zeros(2, C), logits(2, C))
    assert torch.isfinite(value) and torch.isfinite(grad).all()


# --------------------------------------------------------------------------------------------- skd


def layer_norm_rows(z: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """The authors' projection: F.layer_norm over the classes (population variance, eps inside the square root)."""
    return torch.nn.functional.layer_norm(z, (z.shape[-1],), None, None, eps)


def skd_reference(s, t, temperature, multiplier, alpha=1.0, y=None):
    """PaddleClas/authors-style SKD, written with softmax probabilities and textbook sums."""
    z_s, z_t = layer_norm_rows(s) * multiplier, layer_norm_rows(t) * multiplier
    p_t, p_s = probs(z_t, temperature), probs(z_s, temperature)
    kd = kl(p_t, p_s).mean() * temperature**2
    if alpha == 1.0:
        return kd
    ce = -torch.log(probs(z_s)[torch.arange(len(y)), y]).mean()
    return alpha * kd + (1 - alpha) * ce


def test_skd_registered():
    info = get_info("skd")
    assert info.reads == "logits" and info.default_tap == "logits" and not info.trainable
    assert info.fields == ("labels",) and info.params == ("temperature", "multiplier", "alpha")
    assert "arXiv:2010.07485" in info.paper


def test_skd_value_matches_the_authors_layer_norm_formula():
    s, t = logits(B, C, seed=1, scale=3.0), logits(B, C, seed=2, scale=5.0)
    y = torch.tensor([0, 3, 1, 4])
    for temperature, multiplier in [(4.0, 2.0), (1.0, 3.0)]:
        got = losses.build("skd", temperature=temperature, multiplier=multiplier)(s, t, labels=y)
        torch.testing.assert_close(got, skd_reference(s, t, temperature, multiplier), rtol=1e-5, atol=1e-6)
    got = losses.build("skd", alpha=0.9)(s, t, labels=y)
    torch.testing.assert_close(got, skd_reference(s, t, 4.0, 2.0, alpha=0.9, y=y), rtol=1e-5, atol=1e-6)


def test_skd_hand_computed_projection():
    # [1, 2, 3]: mean 2, population std sqrt(2/3) -> zscore [-sqrt(3/2), 0, sqrt(3/2)]
    z = torch.tensor([[1.0, 2.0, 3.0]])
    projected = losses.build("skd", multiplier=2.0).project(z)
    r = math.sqrt(1.5)
    assert projected[0].tolist() == pytest.approx([-2 * r, 0.0, 2 * r], rel=1e-6)
    assert projected.pow(2).sum().item() == pytest.approx(4.0 * 3, rel=1e-6)  # on the sphere of radius m * sqrt(C)


def test_skd_ignores_confidence_but_not_relations():
    """The projection removes each logit vector's scale and shift: a student that only differs from the teacher in
    confidence (a positive scale) or by a shift has zero loss; plain KD does not."""
    t = logits(B, C, seed=2)
    skd, kd = losses.build("skd"), losses.build("kd")
    for s in (3.0 * t, 0.2 * t + 5.0):
        assert skd(s, t).item() == pytest.approx(0.0, abs=1e-6)
        assert kd(s, t).item() > 1e-3
    s = logits(B, C, seed=1)
    torch.testing.assert_close(skd(7.0 * s - 1.0, 0.5 * t), skd(s, t), rtol=1e-5, atol=1e-6)
    assert skd(s, t).item() > 1e-3  # other class relations still cost


def test_skd_properties():
    s, t = logits(B, C, seed=1), logits(B, C, seed=2)
    y = torch.tensor([0, 1, 2, 3])
    for alpha in (1.0, 0.9):
        skd = losses.build("skd", alpha=alpha)
        grad = student_grad(skd, s, t, labels=y)
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0
        assert torch.isfinite(skd(s * 1e4, t * 1e4, labels=y))
        assert torch.isfinite(student_grad(skd, torch.zeros(B, C), t, labels=y)).all()  # constant row
        assert skd(s.bfloat16(), t.bfloat16(), labels=y).dtype == torch.float32
    # [B, T, C] logits: rows; the CE part skips rows labelled -100
    s3, t3 = logits(2, 3, C, seed=3), logits(2, 3, C, seed=4)
    y3 = torch.tensor([[0, -100, 2], [1, 4, -100]])
    skd = losses.build("skd", alpha=0.5)
    keep = y3.reshape(-1) != -100
    kd_part = losses.build("skd")(s3, t3)
    ce_part = torch.nn.functional.cross_entropy(2.0 * layer_norm_rows(s3.reshape(6, C))[keep], y3.reshape(-1)[keep])
    torch.testing.assert_close(skd(s3, t3, labels=y3), 0.5 * kd_part + 0.5 * ce_part, rtol=1e-5, atol=1e-6)


def test_skd_masked_class_counts_as_absent():
    s, t = logits(B, C, seed=1), logits(B, C, seed=2)
    y = torch.tensor([0, 1, 3, 4])
    for alpha in (1.0, 0.9):
        loss = losses.build("skd", alpha=alpha)
        value, grad = _value_and_grad(loss, _mask(s), _mask(t), labels=y)
        expected, expected_grad = _value_and_grad(loss, _drop(s), _drop(t), labels=y - (y > MASKED).long())
        assert torch.isfinite(value) and torch.isfinite(grad).all()
        torch.testing.assert_close(value, expected)
        assert torch.all(grad[:, MASKED] == 0)
        torch.testing.assert_close(_drop(grad), expected_grad)


def test_skd_validation():
    for name, value in [("temperature", 0.0), ("multiplier", 0.0), ("multiplier", -2.0), ("alpha", 1.5),
                        ("alpha", -0.1)]:
        with pytest.raises(LossParamError, match=f"'{name}'"):
            losses.build("skd", **{name: value})
    with pytest.raises(DistillationError, match="needs labels"):
        losses.build("skd", alpha=0.9)(logits(B, C), logits(B, C), labels=None)
    with pytest.raises(DistillationError, match="teacher"):
        losses.build("skd")(logits(B, C), None)


# --------------------------------------------------------------------------------------------- dist_plus


def corr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Pearson correlation with torch.corrcoef (an implementation independent of the loss's)."""
    return float(torch.corrcoef(torch.stack([a, b]))[0, 1])


def dist_plus_reference(z_s, f_s, z_t, f_t, beta, gamma, temperature, channel_weight, spatial_weight):
    """DIST on the logits + 1 - mean channel correlation per (b, h, w) + 1 - mean batch correlation per position
    of the channel sums, with explicit loops."""
    b, c, h, w = f_t.shape
    channel = [corr(f_s[i, :, y, x], f_t[i, :, y, x]) for i in range(b) for y in range(h) for x in range(w)]
    g_s, g_t = f_s.sum(1), f_t.sum(1)
    spatial = [corr(g_s[:, y, x], g_t[:, y, x]) for y in range(h) for x in range(w)]
    return (float(dist_reference(z_s, z_t, beta, gamma, temperature))
            + channel_weight * (1 - sum(channel) / len(channel)) + spatial_weight * (1 - sum(spatial) / len(spatial)))


def dist_plus_built(s_shapes, t_shapes, **params):
    from hfdistill.terms import LossContext

    loss = losses.build("dist_plus", **params)
    loss.configure(LossContext(student_shape=[torch.Size(s) for s in s_shapes],
                               teacher_shape=[torch.Size(t) for t in t_shapes]))
    return loss


def test_dist_plus_registered():
    info = get_info("dist_plus")
    assert info.reads == "logits" and info.multi_layer and info.trainable and info.default_tap is None
    assert info.params == ("beta", "gamma", "temperature", "channel_weight", "spatial_weight")
    assert "TPAMI" in info.paper


def test_dist_plus_value_matches_formula():
    z_s, z_t = logits(B, C, seed=1), logits(B, C, seed=2)
    f_s, f_t = logits(B, 3, 2, 2, seed=3), logits(B, 3, 2, 2, seed=4)
    loss = dist_plus_built([(B, C), (B, 3, 2, 2)], [(B, C), (B, 3, 2, 2)])
    assert loss.connector is None  # equal channels: no connector
    params = (1.0, 1.0, 1.0, 1.0, 1.0)
    assert loss([z_s, f_s], [z_t, f_t]).item() == pytest.approx(dist_plus_reference(z_s, f_s, z_t, f_t, *params), rel=1e-5)
    loss = dist_plus_built([(B, C), (B, 3, 2, 2)], [(B, C), (B, 3, 2, 2)], beta=2.0, gamma=0.5, temperature=4.0,
                           channel_weight=0.3, spatial_weight=2.0)
    expected = dist_plus_reference(z_s, f_s, z_t, f_t, 2.0, 0.5, 4.0, 0.3, 2.0)
    assert loss([z_s, f_s], [z_t, f_t]).item() == pytest.approx(expected, rel=1e-5)
    # the logit part is the `dist` loss itself
    only_dist = dist_plus_built([(B, C), (B, 3, 2, 2)], [(B, C), (B, 3, 2, 2)], channel_weight=0.0, spatial_weight=0.0)
    torch.testing.assert_close(only_dist([z_s, f_s], [z_t, f_t]), losses.build("dist")(z_s, z_t))


def test_dist_plus_connector_and_pooling():
    """Fewer student channels: a 1x1 conv + BN connector maps them for the channel relation; the spatial relation uses
    the raw student map; the larger map is average-pooled to the smaller size first."""
    z_s, z_t = logits(B, C, seed=1), logits(B, C, seed=2)
    f_s, f_t = logits(B, 2, 4, 4, seed=3), logits(B, 5, 2, 2, seed=4)
    loss = dist_plus_built([(B, C), (B, 2, 4, 4)], [(B, C), (B, 5, 2, 2)]).eval()
    conv, bn = loss.connector
    assert (conv.in_channels, conv.out_channels, conv.kernel_size) == (2, 5, (1, 1)) and bn.num_features == 5
    pooled = torch.nn.functional.avg_pool2d(f_s, 2)
    with torch.no_grad():
        connected = bn(conv(pooled))
    channel = 1 - sum(corr(connected[i, :, y, x], f_t[i, :, y, x]) for i in range(B) for y in range(2) for x in range(2)) / (B * 4)
    g_s, g_t = pooled.sum(1), f_t.sum(1)
    spatial = 1 - sum(corr(g_s[:, y, x], g_t[:, y, x]) for y in range(2) for x in range(2)) / 4
    expected = float(dist_reference(z_s, z_t, 1.0, 1.0, 1.0)) + channel + spatial
    assert loss([z_s, f_s], [z_t, f_t]).item() == pytest.approx(expected, rel=1e-5)


def test_dist_plus_rewards_correlated_features():
    """Every feature term is 1 - correlation: zero for a student map that is an affine copy of the teacher's, larger
    for an anti-correlated one (torchdistill's channel term returns the correlation itself; see the docstring)."""
    z = logits(B, C, seed=1)
    f_t = logits(B, 3, 2, 2, seed=4)
    loss = dist_plus_built([(B, C), (B, 3, 2, 2)], [(B, C), (B, 3, 2, 2)], beta=0.0, gamma=0.0)
    assert loss([z, 2.0 * f_t + 1.0], [z, f_t]).item() == pytest.approx(0.0, abs=1e-5)
    assert loss([z, -f_t], [z, f_t]).item() == pytest.approx(4.0, abs=1e-5)  # correlation -1 in both terms
    z_s, f_s = logits(B, C, seed=5), logits(B, 3, 2, 2, seed=6, scale=1.0).requires_grad_(True)
    loss([z_s, f_s], [z, f_t]).backward()
    assert torch.isfinite(f_s.grad).all() and f_s.grad.abs().sum() > 0


def test_dist_plus_properties_and_errors():
    from hfdistill.terms import LossContext

    z_s, z_t = logits(B, C, seed=1), logits(B, C, seed=2)
    f_s, f_t = logits(B, 2, 2, 2, seed=3), logits(B, 3, 2, 2, seed=4)
    loss = dist_plus_built([(B, C), (B, 2, 2, 2)], [(B, C), (B, 3, 2, 2)]).train()
    value = loss([z_s.requires_grad_(True), f_s.requires_grad_(True)], [z_t, f_t])
    value.backward()
    assert torch.isfinite(z_s.grad).all() and z_s.grad.abs().sum() > 0 and f_s.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in loss.connector.parameters())
    half = loss([z_s.detach().bfloat16(), f_s.detach().bfloat16()], [z_t.bfloat16(), f_t.bfloat16()])
    assert half.dtype == torch.float32 and torch.isfinite(half)
    assert torch.isfinite(loss([z_s.detach() * 1e4, f_s.detach() * 1e4], [z_t * 1e4, f_t * 1e4]))
    with pytest.raises(DistillationError, match=r"\[logits, feature map\]"):
        loss(z_s, z_t)
    with pytest.raises(DistillationError, match="configured for 2 student and 3 teacher channels"):
        loss([z_s, logits(B, 4, 2, 2)], [z_t, f_t])
    with pytest.raises(RuntimeError, match="configure"):
        losses.build("dist_plus")([z_s, f_s], [z_t, f_t])
    with pytest.raises(DistillationError, match=r"\[B, C, H, W\]"):
        losses.build("dist_plus").configure(LossContext(student_shape=[torch.Size([B, C]), torch.Size([B, 3])],
                                                        teacher_shape=[torch.Size([B, C]), torch.Size([B, 3])]))
    with pytest.raises(DistillationError, match="two student taps"):
        losses.build("dist_plus").configure(LossContext(student_shape=torch.Size([B, C]), teacher_shape=torch.Size([B, C])))
    for name, value in [("channel_weight", -1.0), ("spatial_weight", float("nan")), ("temperature", 0.0), ("beta", -2.0)]:
        with pytest.raises(LossParamError, match=f"'{name}'"):
            losses.build("dist_plus", **{name: value})


def test_dist_plus_trainer_run(tmp_path, digits):
    """[logits, layer4] taps on both sides, a student with fewer channels: the connector is built from the dry run,
    trains with the student, is saved in the distillation state; the teacher does not change."""
    from conftest import tiny_timm
    from test_trainer import make_args

    from hfdistill import DistillationTrainer

    student, teacher = tiny_timm("test_efficientnet", seed=2), tiny_timm("test_resnet", seed=1)
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    s_map = "conv_head"  # test_efficientnet's last map
    recipe = {"terms": [{"name": "dist_plus", "loss": "dist_plus", "student": ["logits", s_map],
                         "teacher": ["logits", "layer4"], "params": {"beta": 2.0, "gamma": 2.0}}]}
    trainer = DistillationTrainer(model=student, teacher=teacher, recipe=recipe, train_dataset=digits[0].select(range(32)),
                                  args=make_args(tmp_path, max_steps=2, per_device_train_batch_size=8, logging_steps=1))
    loss = trainer.model.losses["dist_plus"]
    assert loss.connector is not None
    connector_before = {k: v.clone() for k, v in loss.connector.state_dict().items()}
    trainer.train()
    logged = [h["loss_dist_plus"] for h in trainer.state.log_history if "loss_dist_plus" in h]
    assert logged and all(math.isfinite(v) for v in logged)
    assert any(not torch.equal(v, loss.connector.state_dict()[k]) for k, v in connector_before.items())
    assert any(k.startswith("losses.dist_plus.connector") for k in trainer.distill_state())
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in teacher_before.items())
