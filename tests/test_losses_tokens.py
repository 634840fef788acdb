"""Token-level losses for causal LMs (hfdistill/losses/tokens.py): values against the formulas written out
independently (probabilities with exp / sum, explicit loops over the counted positions), hand-computed values
on a 2- and 3-word vocabulary, the causal shift, the normalisation by ``num_items_in_batch``, temperature,
chunking (values, gradients, what autograd keeps), the fused-linear API against autograd of the naive version,
ULD's alignment across tokenisations, parameter checks, and the memory benchmark at its tiny size."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from hfdistill import losses
from hfdistill.errors import DistillationError, LossParamError
from hfdistill.losses import get_info
from hfdistill.losses.tokens import TOKEN_LOSSES, causal_token_mask, fused_linear_token_loss

ROOT = Path(__file__).resolve().parents[1]
SAME_VOCAB = ["forward_kl", "reverse_kl", "jsd", "tvd", "skew_kl", "skew_reverse_kl"]
ALL = SAME_VOCAB + ["uld"]
B, T, V = 3, 7, 6


def logits(*shape: int, seed: int, scale: float = 2.0) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.randn(*shape) * scale


def make_labels(b: int = B, t: int = T, seed: int = 5) -> torch.Tensor:
    """Prompts (-100 first), completions, right padding (-100 last), of different lengths per example."""
    torch.manual_seed(seed)
    labels = torch.randint(0, V, (b, t))
    for i in range(b):
        prompt, end = 1 + i % 3, t - (i % 2)
        labels[i, :prompt] = -100
        labels[i, end:] = -100
    return labels


# ------------------------------------------------------------------------------ the formulas, written out
def probs(z: torch.Tensor) -> torch.Tensor:
    e = torch.exp(z - z.max(dim=-1, keepdim=True).values)
    return e / e.sum(dim=-1, keepdim=True)


def kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return (p * torch.log(p / q)).sum(-1)


def divergence(name: str, p: torch.Tensor, q: torch.Tensor, beta: float = 0.5, alpha: float = 0.1) -> torch.Tensor:
    """p: the teacher's distribution, q: the student's (one position)."""
    if name == "forward_kl":
        return kl(p, q)
    if name == "reverse_kl":
        return kl(q, p)
    if name == "jsd":
        if beta == 0:
            return kl(p, q)
        if beta == 1:
            return kl(q, p)
        m = beta * p + (1 - beta) * q
        return beta * kl(p, m) + (1 - beta) * kl(q, m)
    if name == "tvd":
        return 0.5 * (p - q).abs().sum(-1)
    if name == "skew_kl":
        return kl(p, alpha * p + (1 - alpha) * q)
    if name == "skew_reverse_kl":
        return kl(q, alpha * q + (1 - alpha) * p)
    if name == "uld":
        qs, ps = q.sort(descending=True).values, p.sort(descending=True).values
        width = max(qs.numel(), ps.numel())
        qs = torch.cat([qs, qs.new_zeros(width - qs.numel())])
        ps = torch.cat([ps, ps.new_zeros(width - ps.numel())])
        return (qs - ps).abs().sum()
    raise KeyError(name)


def direct(name: str, s: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0,
           num_items=None, **params) -> torch.Tensor:
    """Sum over positions (b, i) with labels[b, i + 1] != -100 of the divergence, / num_items or the count."""
    total, count = torch.zeros((), dtype=torch.float64), 0
    for b in range(s.shape[0]):
        for i in range(s.shape[1] - 1):
            if labels[b, i + 1] != -100:
                p = probs(t[b, i].double() / temperature)
                q = probs(s[b, i].double() / temperature)
                total = total + divergence(name, p, q, **params)
                count += 1
    return (total / (num_items if num_items is not None else max(count, 1))).float()


def grad_of(fn, x: torch.Tensor) -> torch.Tensor:
    x = x.clone().requires_grad_(True)
    fn(x).backward()
    return x.grad


# ------------------------------------------------------------------------------ registry
@pytest.mark.parametrize("name", ALL)
def test_registered(name):
    info = get_info(name)
    assert info.reads == "logits" and info.default_tap == "logits"
    # ULD also reads the labels of the teacher's own tokenisation (optional; its own labels otherwise)
    assert info.fields == ("labels", "num_items_in_batch") + (("teacher_labels",) if name == "uld" else ())
    assert info.paper and info.description and not info.trainable
    assert "arXiv:" in info.paper
    assert info.same_shape is (name != "uld")
    assert info.cls.normalised_by_items is True and info.cls.accepts_half_inputs is True
    assert "temperature" in info.params and "chunk_size" in info.params
    assert name in losses.available()


def test_params_and_papers():
    assert get_info("jsd").params == ("beta", "temperature", "chunk_size", "from_hidden")
    assert get_info("skew_kl").params == ("alpha", "temperature", "chunk_size", "from_hidden")
    assert get_info("forward_kl").params == ("temperature", "chunk_size", "from_hidden")
    assert "2306.08543" in get_info("reverse_kl").paper  # MiniLLM
    assert "2306.13649" in get_info("jsd").paper  # GKD
    assert "2402.03898" in get_info("skew_kl").paper and "2402.03898" in get_info("skew_reverse_kl").paper
    assert "2402.12030" in get_info("uld").paper


# ------------------------------------------------------------------------------ values
PARAMS = {"jsd": [{"beta": 0.5}, {"beta": 0.1}, {"beta": 0.9}, {"beta": 0.0}, {"beta": 1.0}],
          "skew_kl": [{"alpha": 0.1}, {"alpha": 0.5}, {"alpha": 0.0}],
          "skew_reverse_kl": [{"alpha": 0.1}, {"alpha": 0.7}, {"alpha": 0.0}]}
VALUE_CASES = [(n, p) for n in ALL for p in PARAMS.get(n, [{}])]


@pytest.mark.parametrize("name, params", VALUE_CASES, ids=[f"{n}-{p}" for n, p in VALUE_CASES])
def test_value_matches_formula(name, params):
    s, t, labels = logits(B, T, V, seed=1), logits(B, T, V, seed=2), make_labels()
    for temperature in (1.0, 2.5):
        expected = direct(name, s, t, labels, temperature, **params)
        got = losses.build(name, temperature=temperature, chunk_size=4, **params)(s, t, labels=labels)
        assert got.dtype == torch.float32 and got.dim() == 0
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_hand_computed_values_two_words():
    # one counted position: q (student) = softmax([0, ln 3]) = [1/4, 3/4], p (teacher) = [1/2, 1/2]
    s = torch.tensor([[[0.0, math.log(3.0)], [5.0, -5.0]]])
    t = torch.tensor([[[0.0, 0.0], [-5.0, 5.0]]])
    labels = torch.tensor([[-100, 1]])  # position 0 predicts token 1; position 1 is the last (never counts)
    q, p = (0.25, 0.75), (0.5, 0.5)
    m_js = (0.375, 0.625)  # 0.5 p + 0.5 q
    m_skl = (0.1 * 0.5 + 0.9 * 0.25, 0.1 * 0.5 + 0.9 * 0.75)  # 0.1 p + 0.9 q = (0.275, 0.725)
    m_srkl = (0.1 * 0.25 + 0.9 * 0.5, 0.1 * 0.75 + 0.9 * 0.5)  # 0.1 q + 0.9 p = (0.475, 0.525)

    def kl2(a, b):
        return sum(x * math.log(x / y) for x, y in zip(a, b))

    expected = {
        "forward_kl": 0.5 * math.log(4 / 3),  # 0.5 ln(0.5/0.25) + 0.5 ln(0.5/0.75)
        "reverse_kl": 0.25 * math.log(0.5) + 0.75 * math.log(1.5),
        "jsd": 0.5 * kl2(p, m_js) + 0.5 * kl2(q, m_js),
        "tvd": 0.25,
        "skew_kl": kl2(p, m_skl),
        "skew_reverse_kl": kl2(q, m_srkl),
        "uld": 0.5,  # sorted [0.75, 0.25] vs [0.5, 0.5]
    }
    for name, value in expected.items():
        assert losses.build(name)(s, t, labels=labels).item() == pytest.approx(value, rel=1e-5), name


def test_uld_hand_computed_value_three_words_against_two():
    s = torch.tensor([[[0.0, math.log(3.0)], [0.0, 0.0]]])  # student: 2 words, q = [1/4, 3/4]
    t = torch.zeros(1, 2, 3)  # teacher: 3 words, p = [1/3, 1/3, 1/3]
    labels = torch.tensor([[-100, 0]])
    # sorted and padded: [3/4, 1/4, 0] vs [1/3, 1/3, 1/3] -> 5/12 + 1/12 + 4/12
    assert losses.build("uld")(s, t, labels=labels).item() == pytest.approx(10 / 12, rel=1e-5)


def test_the_causal_shift_counts_the_models_own_loss_tokens():
    """Position t pairs with labels[t+1]: the positions transformers' causal-LM loss and num_items_in_batch count."""
    labels = make_labels()
    mask = causal_token_mask(labels)
    assert int(mask.sum()) == int(labels[:, 1:].ne(-100).sum())
    assert not mask[:, -1].any()
    s, t = logits(B, T, V, seed=1), logits(B, T, V, seed=2)
    loss = losses.build("forward_kl")
    base = loss(s, t, labels=labels)
    # logits at positions that predict no counted token (prompt before the last prompt token, padding, the
    # last position) do not matter
    s2 = s.clone()
    s2[~mask] = torch.randn(int((~mask).sum()), V) * 5
    torch.testing.assert_close(loss(s2, t, labels=labels), base)
    # the student's own loss counts the same tokens
    ce_sum = torch.nn.functional.cross_entropy(s[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1), reduction="sum")
    ce_masked = torch.nn.functional.cross_entropy(s[mask], labels[:, 1:][mask[:, :-1]], reduction="sum")
    torch.testing.assert_close(ce_sum, ce_masked)


# ------------------------------------------------------------------------------ normalisation
@pytest.mark.parametrize("name", ALL)
def test_num_items_in_batch_divides_the_sum(name):
    s, t, labels = logits(B, T, V, seed=1), logits(B, T, V, seed=2), make_labels()
    loss = losses.build(name)
    count = int(labels[:, 1:].ne(-100).sum())
    mean = loss(s, t, labels=labels)
    for items in (count, torch.tensor(count), torch.tensor([count])):
        torch.testing.assert_close(loss(s, t, labels=labels, num_items_in_batch=items), mean)
    torch.testing.assert_close(loss(s, t, labels=labels, num_items_in_batch=torch.tensor(50)), mean * count / 50)
    assert loss(s, t, labels=labels, num_items_in_batch=torch.tensor(50)).dtype == torch.float32


@pytest.mark.parametrize("name", ["forward_kl", "jsd", "uld"])
def test_micro_batches_with_the_step_count_sum_to_the_whole_batch(name):
    """Gradient accumulation: sum over micro-batches of loss(micro, num_items = step's count) == loss(whole)."""
    s, t, labels = logits(4, T, V, seed=1), logits(4, T, V, seed=2), make_labels(4)
    loss = losses.build(name)
    whole_grad = grad_of(lambda x: loss(x, t, labels=labels), s)
    items = labels[:, 1:].ne(-100).sum()

    def accumulated(x):
        return sum(loss(x[i:i + 1], t[i:i + 1], labels=labels[i:i + 1], num_items_in_batch=items) for i in range(4))

    torch.testing.assert_close(accumulated(s), loss(s, t, labels=labels))
    torch.testing.assert_close(grad_of(accumulated, s), whole_grad)


@pytest.mark.parametrize("name", ALL)
def test_no_counted_token_gives_zero_with_a_gradient_path(name):
    s, t = logits(2, 4, V, seed=1), logits(2, 4, V, seed=2)
    labels = torch.full((2, 4), -100)
    labels[:, 0] = 1  # position -1 does not exist: still nothing counts
    s_req = s.clone().requires_grad_(True)
    value = losses.build(name)(s_req, t, labels=labels)
    assert value.item() == 0.0
    value.backward()
    assert torch.equal(s_req.grad, torch.zeros_like(s))
    assert losses.build(name)(s, t, labels=labels, num_items_in_batch=torch.tensor(0)).item() == 0.0


# ------------------------------------------------------------------------------ gradients, chunking, dtype
@pytest.mark.parametrize("name", ALL)
def test_chunking_gradients_match_autograd_of_the_formula(name):
    s, t, labels = logits(B, T, V, seed=3), logits(B, T, V, seed=4), make_labels()
    expected = grad_of(lambda x: direct(name, x, t, labels, 1.5), s.double()).float()
    for chunk_size in (1, 3, 1024):
        loss = losses.build(name, temperature=1.5, chunk_size=chunk_size)
        torch.testing.assert_close(grad_of(lambda x: loss(x, t, labels=labels), s), expected, rtol=1e-4, atol=1e-6)


def test_default_chunk_is_sized_by_the_vocabulary():
    from hfdistill.losses.tokens import CHUNK_LOGITS, chunk_rows

    assert losses.build("forward_kl").chunk_size is None
    assert chunk_rows(None, 32000) == CHUNK_LOGITS // 32000 == 524
    assert chunk_rows(None, 10**9) == 1 and chunk_rows(7, 32000) == 7
    s, t, labels = logits(B, T, V, seed=3), logits(B, T, V, seed=4), make_labels()
    torch.testing.assert_close(losses.build("tvd")(s, t, labels=labels),
                               losses.build("tvd", chunk_size=2)(s, t, labels=labels))


def test_teacher_gradient_when_it_requires_one():
    """Not used by the trainer (a frozen teacher), but the chunked function gives the right one if asked."""
    s, t, labels = logits(B, T, V, seed=3), logits(B, T, V, seed=4), make_labels()
    loss = losses.build("jsd", beta=0.3, chunk_size=2)
    expected = grad_of(lambda y: direct("jsd", s.double(), y, labels, beta=0.3), t.double()).float()
    torch.testing.assert_close(grad_of(lambda y: loss(s, y, labels=labels), t), expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ALL)
def test_half_inputs_are_computed_in_fp32_and_get_half_gradients(name):
    s, t, labels = logits(B, T, V, seed=1).bfloat16(), logits(B, T, V, seed=2).bfloat16(), make_labels()
    loss = losses.build(name, chunk_size=5)
    value = loss(s, t, labels=labels)
    assert value.dtype == torch.float32
    torch.testing.assert_close(value, loss(s.float(), t.float(), labels=labels), rtol=1e-6, atol=1e-7)
    s_req = s.clone().requires_grad_(True)
    loss(s_req, t, labels=labels).backward()
    assert s_req.grad.dtype == torch.bfloat16
    torch.testing.assert_close(s_req.grad.float(), grad_of(lambda x: loss(x, t.float(), labels=labels), s.float()),
                               rtol=1e-2, atol=1e-4)


def test_autograd_keeps_no_fp32_vocabulary_sized_tensor():
    """Part 3: what autograd saves between forward and backward is the bf16 logits themselves, no fp32 copy or
    softmax of the sequence (the naive computation saves several [N, V] fp32 tensors)."""
    s = logits(2, 64, 50, seed=1).bfloat16().requires_grad_(True)
    t, labels = logits(2, 64, 50, seed=2).bfloat16(), make_labels(2, 64)
    saved = []

    def pack(x):
        saved.append((x.dtype, x.numel()))
        return x

    for name in ALL:
        saved.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            losses.build(name, chunk_size=16)(s, t, labels=labels)
        big_fp32 = [n for dtype, n in saved if dtype == torch.float32 and n >= 16 * 50]
        assert not big_fp32, (name, saved)
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):  # the check has teeth
        direct_naive = torch.nn.functional.log_softmax(s.float(), -1)
        (direct_naive.exp() * direct_naive).sum().backward()
    assert any(dtype == torch.float32 and n >= 2 * 64 * 50 for dtype, n in saved)


@pytest.mark.parametrize("name", ["forward_kl", "reverse_kl", "jsd", "tvd", "skew_kl", "skew_reverse_kl"])
def test_masked_vocabulary_entries_give_the_value_without_them(name):
    s, t, labels = logits(B, T, V, seed=1), logits(B, T, V, seed=2), make_labels()
    masked_s, masked_t = s.clone(), t.clone()
    masked_s[..., -2:] = float("-inf")
    masked_t[..., -2:] = float("-inf")
    loss = losses.build(name, chunk_size=4)
    torch.testing.assert_close(loss(masked_s, masked_t, labels=labels), loss(s[..., :-2], t[..., :-2], labels=labels))
    grad = grad_of(lambda x: loss(x, masked_t, labels=labels), masked_s)
    assert torch.isfinite(grad).all()
    torch.testing.assert_close(grad[..., :-2], grad_of(lambda x: loss(x, t[..., :-2], labels=labels), s[..., :-2]))


@pytest.mark.parametrize("name", ALL)
def test_zero_at_equal_distributions_and_finite_for_large_logits(name):
    s, t, labels = logits(B, T, V, seed=1), logits(B, T, V, seed=2), make_labels()
    loss = losses.build(name)
    assert loss(t, t, labels=labels).item() == pytest.approx(0.0, abs=1e-6)
    assert loss(s, t, labels=labels).item() > 0
    assert torch.isfinite(loss(s * 1e3, t * 1e3, labels=labels))
    assert torch.isfinite(grad_of(lambda x: loss(x, t * 1e3, labels=labels), s * 1e3)).all()


# ------------------------------------------------------------------------------ jsd conventions
def test_jsd_ends_are_forward_and_reverse_kl_and_approach_them_scaled():
    s, t, labels = logits(B, T, V, seed=1), logits(B, T, V, seed=2), make_labels()
    fkl = losses.build("forward_kl")(s, t, labels=labels)
    rkl = losses.build("reverse_kl")(s, t, labels=labels)
    torch.testing.assert_close(losses.build("jsd", beta=0.0)(s, t, labels=labels), fkl)
    torch.testing.assert_close(losses.build("jsd", beta=1.0)(s, t, labels=labels), rkl)
    eps = 1e-4  # GKD: JSD(beta) ~ beta KL(p || q) as beta -> 0, ~ (1 - beta) KL(q || p) as beta -> 1
    assert (losses.build("jsd", beta=eps)(s, t, labels=labels) / eps).item() == pytest.approx(fkl.item(), rel=1e-2)
    assert (losses.build("jsd", beta=1 - eps)(s, t, labels=labels) / eps).item() == pytest.approx(rkl.item(), rel=1e-2)


def test_jsd_matches_trls_generalized_jsd_loss_written_with_kl_div():
    """TRL's formulation (F.kl_div with log targets; the mixture has beta on the teacher), on shifted logits."""
    import torch.nn.functional as F

    s, t, labels = logits(B, T, V, seed=1), logits(B, T, V, seed=2), make_labels()
    beta, temperature = 0.3, 2.0
    log_q = F.log_softmax(s[:, :-1] / temperature, -1)
    log_p = F.log_softmax(t[:, :-1] / temperature, -1)
    log_m = torch.logsumexp(torch.stack([log_q + math.log(1 - beta), log_p + math.log(beta)]), dim=0)
    jsd = beta * F.kl_div(log_m, log_p, reduction="none", log_target=True) + (1 - beta) * F.kl_div(
        log_m, log_q, reduction="none", log_target=True)
    mask = labels[:, 1:] != -100
    expected = jsd[mask].sum() / mask.sum()
    torch.testing.assert_close(losses.build("jsd", beta=beta, temperature=temperature)(s, t, labels=labels), expected)


def test_skew_losses_mix_the_documented_distribution():
    """DistiLLM: skew KL mixes the teacher into the student, skew reverse KL the student into the teacher; alpha = 0
    gives the plain KLs."""
    s, t, labels = logits(B, T, V, seed=1), logits(B, T, V, seed=2), make_labels()
    torch.testing.assert_close(losses.build("skew_kl", alpha=0.0)(s, t, labels=labels),
                               losses.build("forward_kl")(s, t, labels=labels))
    torch.testing.assert_close(losses.build("skew_reverse_kl", alpha=0.0)(s, t, labels=labels),
                               losses.build("reverse_kl")(s, t, labels=labels))
    # bounded by log(1 / alpha) whatever the student, where the KL is not
    s_far = -t * 50
    assert losses.build("skew_kl", alpha=0.1)(s_far, t, labels=labels).item() <= math.log(10) + 1e-5
    assert losses.build("forward_kl")(s_far, t, labels=labels).item() > 10


# ------------------------------------------------------------------------------ uld
def test_uld_aligns_the_kth_completion_tokens_of_each_tokenisation():
    """Teacher with its own tokenisation (longer sequences, another vocabulary) and its own labels."""
    s, labels = logits(2, 6, 5, seed=1), torch.tensor([[-100, -100, 1, 2, 3, -100], [-100, 4, 4, 4, 4, 4]])
    t = logits(2, 9, 8, seed=2)
    teacher_labels = torch.tensor([[-100, -100, -100, -100, 1, 2, 3, 4, 5],
                                   [-100, -100, -100, -100, -100, -100, 1, 2, -100]])
    # student counted positions: ex 0 -> 1, 2, 3 (3 tokens); ex 1 -> 0..4 (5 tokens)
    # teacher counted positions: ex 0 -> 3..7 (5 tokens);    ex 1 -> 5, 6 (2 tokens)
    pairs = [(0, 1, 3), (0, 2, 4), (0, 3, 5), (1, 0, 5), (1, 1, 6)]
    total = sum(divergence("uld", probs(t[b, j].double()), probs(s[b, i].double())) for b, i, j in pairs)
    expected = (total / 8).float()  # 8 counted student tokens
    loss = losses.build("uld", chunk_size=2)
    torch.testing.assert_close(loss(s, t, labels=labels, teacher_labels=teacher_labels), expected)
    torch.testing.assert_close(loss(s, t, labels=labels, teacher_labels=teacher_labels, num_items_in_batch=10),
                               (total / 10).float())
    # gradients against autograd of the written-out formula
    expected_grad = grad_of(lambda x: sum(divergence("uld", probs(t[b, j].double()), probs(x[b, i]))
                                          for b, i, j in pairs) / 8, s.double()).float()
    torch.testing.assert_close(grad_of(lambda x: loss(x, t, labels=labels, teacher_labels=teacher_labels), s),
                               expected_grad, rtol=1e-4, atol=1e-6)


def test_uld_falls_back_to_labels_and_checks_shapes():
    s, t, labels = logits(B, T, V, seed=1), logits(B, T, V + 4, seed=2), make_labels()
    loss = losses.build("uld")
    torch.testing.assert_close(loss(s, t, labels=labels), direct("uld", s, t, labels))
    with pytest.raises(DistillationError, match="teacher_labels"):
        loss(s, logits(B, T + 2, V, seed=2), labels=labels)
    with pytest.raises(DistillationError, match="teacher_labels of shape"):
        loss(s, t, labels=labels, teacher_labels=labels[:, :-1])
    with pytest.raises(DistillationError, match="batch sizes"):
        loss(s, t[:-1], labels=labels, teacher_labels=labels[:-1])


# ------------------------------------------------------------------------------ fused linear
H, HT = 5, 4


def _hidden_case(seed: int = 0, bias: bool = False):
    torch.manual_seed(seed)
    hs, ht = torch.randn(B, T, H), torch.randn(B, T, HT)
    ws, wt = torch.randn(V, H), torch.randn(V, HT)
    bs, bt = (torch.randn(V), torch.randn(V)) if bias else (None, None)
    return hs, ws, bs, ht, wt, bt


def _naive(kind, hs, ws, bs, ht, wt, bt, labels, **params):
    zs = torch.nn.functional.linear(hs, ws, bs)
    zt = torch.nn.functional.linear(ht, wt, bt)
    return losses.build(kind, **params)(zs, zt, labels=labels)


@pytest.mark.parametrize("kind", SAME_VOCAB)
def test_fused_linear_matches_the_logits_path_with_gradients(kind):
    hs, ws, bs, ht, wt, bt = _hidden_case(bias=True)
    labels = make_labels()
    params = {"jsd": {"beta": 0.3}, "skew_kl": {"alpha": 0.2}, "skew_reverse_kl": {"alpha": 0.2}}.get(kind, {})
    leaves = [x.clone().requires_grad_(True) for x in (hs, ws, bs)]
    fused = fused_linear_token_loss(leaves[0], leaves[1], ht, wt, kind, labels=labels, student_bias=leaves[2],
                                    teacher_bias=bt, temperature=1.7, chunk_size=4, **params)
    fused.backward()
    naive_leaves = [x.clone().requires_grad_(True) for x in (hs, ws, bs)]
    naive = _naive(kind, *naive_leaves[:2], naive_leaves[2], ht, wt, bt, labels, temperature=1.7, **params)
    naive.backward()
    torch.testing.assert_close(fused, naive)
    for mine, theirs, what in zip(leaves, naive_leaves, ("hidden", "weight", "bias")):
        torch.testing.assert_close(mine.grad, theirs.grad, rtol=1e-4, atol=1e-6, msg=what)


def test_fused_linear_rows_num_items_no_bias_and_no_grad():
    hs, ws, _, ht, wt, _ = _hidden_case(seed=1)
    rows_s, rows_t = hs.reshape(-1, H), ht.reshape(-1, HT)
    row_labels = torch.arange(B * T) % V
    row_labels[::4] = -100  # every 4th row does not count
    # [N, H] rows with row-aligned labels == the logits of those rows as [1, N+1, V] with labels shifted by one
    zs, zt = rows_s @ ws.t(), rows_t @ wt.t()
    shifted = torch.cat([torch.tensor([-100]), row_labels])[None]
    pad = torch.zeros(1, 1, V)
    expected = losses.build("forward_kl")(torch.cat([zs[None], pad], 1), torch.cat([zt[None], pad], 1), labels=shifted,
                                          num_items_in_batch=40)
    got = fused_linear_token_loss(rows_s, ws, rows_t, wt, labels=row_labels, num_items_in_batch=torch.tensor(40))
    torch.testing.assert_close(got, expected)
    everything = fused_linear_token_loss(rows_s, ws, rows_t, wt, "tvd", chunk_size=7)
    torch.testing.assert_close(everything, losses.build("tvd")(torch.cat([zs[None], pad], 1),
                                                               torch.cat([zt[None], pad], 1),
                                                               labels=torch.zeros(1, B * T + 1, dtype=torch.long)))
    with torch.no_grad():
        ws_req = ws.clone().requires_grad_(True)
        value = fused_linear_token_loss(rows_s, ws_req, rows_t, wt)
    assert not value.requires_grad


def test_fused_linear_checks_its_arguments():
    hs, ws, _, ht, wt, _ = _hidden_case()
    with pytest.raises(LossParamError, match="'kind'"):
        fused_linear_token_loss(hs, ws, ht, wt, "kd", labels=make_labels())
    with pytest.raises(LossParamError, match="'beta'"):
        fused_linear_token_loss(hs, ws, ht, wt, "jsd", labels=make_labels(), beta=2.0)
    with pytest.raises(DistillationError, match="labels"):
        fused_linear_token_loss(hs, ws, ht, wt)
    with pytest.raises(DistillationError, match="vocabularies differ"):
        fused_linear_token_loss(hs, ws, ht, wt[:-1], labels=make_labels())


def test_fused_linear_bf16_is_close_to_the_logits_path():
    hs, ws, _, ht, wt, _ = _hidden_case(seed=2)
    hs, ws, ht, wt = (x.bfloat16() for x in (hs, ws, ht, wt))
    labels = make_labels()
    hs_req = hs.clone().requires_grad_(True)
    fused = fused_linear_token_loss(hs_req, ws, ht, wt, "jsd", labels=labels, chunk_size=3)
    fused.backward()
    assert fused.dtype == torch.float32 and hs_req.grad.dtype == torch.bfloat16
    naive = _naive("jsd", hs, ws, None, ht, wt, None, labels)  # the logits as the bf16 lm_head gives them
    torch.testing.assert_close(fused, naive, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------ parameters and inputs
@pytest.mark.parametrize("name, param, value", [
    ("forward_kl", "temperature", 0), ("forward_kl", "temperature", -1.0), ("forward_kl", "chunk_size", 0),
    ("forward_kl", "chunk_size", 2.5), ("jsd", "beta", -0.1), ("jsd", "beta", 1.5), ("skew_kl", "alpha", 1.0),
    ("skew_kl", "alpha", -0.2), ("skew_reverse_kl", "alpha", 1.0), ("tvd", "chunk_size", True),
    ("uld", "temperature", float("nan")), ("reverse_kl", "temperature", "2"),
])
def test_out_of_domain_parameters(name, param, value):
    with pytest.raises(LossParamError) as info:
        losses.build(name, **{param: value})
    assert info.value.param == param and "must" in info.value.message and "got" in info.value.message


def test_wrong_inputs_are_distillation_errors():
    s, t, labels = logits(B, T, V, seed=1), logits(B, T, V, seed=2), make_labels()
    loss = losses.build("forward_kl")
    with pytest.raises(DistillationError, match="teacher"):
        loss(s, None, labels=labels)
    with pytest.raises(DistillationError, match=r"\[B, T, V\]"):
        loss(s[:, 0], t[:, 0], labels=labels)
    with pytest.raises(DistillationError, match="labels of shape"):
        loss(s, t, labels=labels[:, :-1])
    with pytest.raises(DistillationError, match="uld"):
        loss(s, logits(B, T, V + 1, seed=2), labels=labels)
    with pytest.raises(DistillationError, match="num_items_in_batch"):
        loss(s, t, labels=labels, num_items_in_batch=torch.ones(2))


def test_token_losses_table_is_complete():
    assert set(TOKEN_LOSSES) == set(SAME_VOCAB)


# ------------------------------------------------------------------------------ the memory benchmark
def test_memory_benchmark_tiny_run(tmp_path):
    spec = importlib.util.spec_from_file_location("token_loss_memory", ROOT / "benchmarks" / "token_loss_memory.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    out = tmp_path / "token_loss_memory.md"
    assert module.main(["--tiny", "--out", str(out), "--json", str(tmp_path / "rows.json")]) == 0
    text = out.read_text()
    assert "Machine:" in text and "Date:" in text and "python benchmarks/token_loss_memory.py --tiny`" in text
    assert "| naive |" in text and "| fused |" in text
    raw = json.loads((tmp_path / "rows.json").read_text())
    rows = {r["variant"]: r for r in raw["rows"]}
    assert set(rows) == {"naive", "chunked", "fused"}
    for row in rows.values():
        assert row["peak_bytes"] >= 0 and row["seconds"] > 0
    # the three compute the same loss and the same gradient of the student's hidden states
    for variant in ("chunked", "fused"):
        assert rows[variant]["loss"] == pytest.approx(rows["naive"]["loss"], rel=1e-4)
        assert rows[variant]["grad_norm"] == pytest.approx(rows["naive"]["grad_norm"], rel=1e-3)
