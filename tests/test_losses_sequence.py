"""Tests for the transformer (sequence) losses: TinyBERT, MiniLM, DeiT."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from hfdistill import losses
from hfdistill.errors import DistillationError, LossParamError
from hfdistill.losses.sequence import map_layers
from hfdistill.terms import LossContext

# Imported at module level so the integration test itself stays fast (the import is the slow part).
from transformers import BertConfig, BertForSequenceClassification, BertModel


def softmax_maps(b, h, t, lengths=None, scale=1.0):
    """Random attention probabilities [b, h, t, t]; keys past lengths[i] get probability 0."""
    scores = torch.randn(b, h, t, t) * scale
    if lengths is not None:
        for i, n in enumerate(lengths):
            scores[i, :, :, n:] = float("-inf")
    return scores.softmax(-1)


def mask_from(lengths, t):
    return torch.tensor([[1] * n + [0] * (t - n) for n in lengths])


# ---------------------------------------------------------------- registry


@pytest.mark.parametrize(
    "name, reads, trainable, multi_layer, same_shape",
    [
        ("hidden_mse", "hidden_states", True, True, False),
        ("embedding_mse", "hidden_states", True, False, False),
        ("attention_kl", "attention", False, True, False),
        ("attention_mse", "attention", False, True, False),
        ("minilm_value_relation", "relations", False, False, False),
        ("deit", "logits", False, False, True),
    ],
)
def test_registered(name, reads, trainable, multi_layer, same_shape):
    info = losses.get_info(name)
    assert (info.reads, info.trainable, info.multi_layer, info.same_shape) == (reads, trainable, multi_layer, same_shape)
    assert "arXiv:" in info.paper and info.description
    assert info.cls.__doc__
    if name != "deit":
        assert info.fields == ("attention_mask",)
    else:
        assert info.default_tap == "logits" and info.params == ("mode", "tau")


# ---------------------------------------------------------------- layer mapping


def test_map_layers_uniform_hidden_states_includes_embedding():
    # TinyBERT: student hidden_states (embedding + 2 layers) vs teacher (embedding + 4 layers): g(m) = 2m
    assert map_layers(3, 5, "uniform", with_embeddings=True, loss_name="x") == [(0, 0), (1, 2), (2, 4)]
    # TinyBERT-4 vs BERT-base: k = 3
    assert map_layers(5, 13, "uniform", with_embeddings=True, loss_name="x") == [(0, 0), (1, 3), (2, 6), (3, 9), (4, 12)]
    assert map_layers(1, 1, "uniform", with_embeddings=True, loss_name="x") == [(0, 0)]


def test_map_layers_uniform_attentions_matches_tinybert_code():
    # the authors' code: teacher_atts[i * k + k - 1]
    k = 3
    assert map_layers(4, 12, "uniform", with_embeddings=False, loss_name="x") == [(i, i * k + k - 1) for i in range(4)]
    # non-multiple: floor((i+1) * N / M) - 1, last maps to last
    assert map_layers(3, 5, "uniform", with_embeddings=False, loss_name="x") == [(0, 0), (1, 2), (2, 4)]


def test_map_layers_last_and_explicit():
    assert map_layers(3, 7, "last", with_embeddings=True, loss_name="x") == [(2, 6)]
    assert map_layers(2, 5, (1, -1), with_embeddings=False, loss_name="x") == [(0, 1), (1, 4)]
    with pytest.raises(DistillationError, match="one teacher index per student"):
        map_layers(3, 5, (1, 2), with_embeddings=False, loss_name="x")
    with pytest.raises(DistillationError, match="out of range"):
        map_layers(1, 5, (5,), with_embeddings=False, loss_name="x")
    with pytest.raises(DistillationError, match="at least as many teacher layers"):
        map_layers(5, 3, "uniform", with_embeddings=True, loss_name="x")


@pytest.mark.parametrize("name", ["hidden_mse", "attention_kl", "attention_mse"])
@pytest.mark.parametrize("bad", ["every", [], [1.5], [True], 3])
def test_layer_map_validation(name, bad):
    with pytest.raises(LossParamError, match="'layer_map'"):
        losses.build(name, layer_map=bad)


# ---------------------------------------------------------------- hidden_mse


def test_hidden_mse_uniform_same_dim_matches_formula():
    torch.manual_seed(0)
    s = [torch.randn(2, 5, 8) for _ in range(3)]
    t = [torch.randn(2, 5, 8) for _ in range(5)]
    loss = losses.build("hidden_mse")
    loss.configure(LossContext(student_shape=[x.shape for x in s], teacher_shape=[x.shape for x in t]))
    assert loss.proj is None
    expected = sum(F.mse_loss(s[m], t[2 * m]) for m in range(3))
    torch.testing.assert_close(loss(s, t), expected)


def test_hidden_mse_projection_matches_formula_and_gets_gradient():
    torch.manual_seed(0)
    s = [torch.randn(2, 4, 6, requires_grad=True) for _ in range(2)]
    t = [torch.randn(2, 4, 10) for _ in range(3)]
    loss = losses.build("hidden_mse", layer_map=[0, 2])
    loss.configure(LossContext(student_shape=[x.shape for x in s], teacher_shape=[x.shape for x in t]))
    W, bias = loss.proj.weight, loss.proj.bias
    expected = F.mse_loss(torch.einsum("btd,ed->bte", s[0], W) + bias, t[0]) + F.mse_loss(
        torch.einsum("btd,ed->bte", s[1], W) + bias, t[2]
    )
    value = loss(s, t)
    torch.testing.assert_close(value, expected)
    value.backward()
    assert all(x.grad is not None and x.grad.abs().sum() > 0 for x in s)
    assert W.grad is not None and W.grad.abs().sum() > 0


def test_hidden_mse_masks_padding():
    torch.manual_seed(0)
    lengths = [5, 2]
    s, t = torch.randn(2, 5, 4), torch.randn(2, 5, 4)
    loss = losses.build("hidden_mse", layer_map="last")
    value = loss(s, t, attention_mask=mask_from(lengths, 5))
    per_example = [((s[b, :n] - t[b, :n]) ** 2).mean() for b, n in enumerate(lengths)]
    torch.testing.assert_close(value, torch.stack(per_example).mean())
    # padding content does not matter
    s2 = s.clone()
    s2[1, 2:] = 1e3
    torch.testing.assert_close(loss(s2, t, attention_mask=mask_from(lengths, 5)), value)


def test_hidden_mse_properties():
    torch.manual_seed(0)
    x = [torch.randn(1, 3, 4) for _ in range(3)]
    loss = losses.build("hidden_mse")
    assert loss(x, [y.clone() for y in x]).item() == 0.0  # batch of 1, identical
    big = loss([y * 1e4 for y in x], [torch.randn(1, 3, 4) * 1e4 for _ in range(3)])
    assert torch.isfinite(big)
    # single tensors are one pair
    torch.testing.assert_close(loss(x[0], x[1]), F.mse_loss(x[0], x[1]))


def test_hidden_mse_errors():
    loss = losses.build("hidden_mse")
    with pytest.raises(RuntimeError, match="hidden_mse: configure"):
        loss(torch.randn(2, 3, 4), torch.randn(2, 3, 8))
    loss.configure(LossContext(student_shape=torch.Size([2, 3, 4]), teacher_shape=torch.Size([2, 3, 8])))
    with pytest.raises(DistillationError, match="attention_mask"):
        loss(torch.randn(2, 3, 4), torch.randn(2, 3, 8), attention_mask=torch.ones(2, 5))
    with pytest.raises(DistillationError, match="sequence"):
        loss(torch.randn(2, 3, 4), torch.randn(2, 4, 8))
    with pytest.raises(DistillationError, match="different hidden sizes"):
        loss.configure(LossContext(student_shape=[torch.Size([2, 3, 4]), torch.Size([2, 3, 5])], teacher_shape=[torch.Size([2, 3, 8])]))


# ---------------------------------------------------------------- embedding_mse


def test_embedding_mse_matches_formula():
    torch.manual_seed(0)
    e_s = torch.randn(3, 4, 6, requires_grad=True)
    e_t = torch.randn(3, 4, 10)
    loss = losses.build("embedding_mse")
    loss.configure(LossContext(student_shape=e_s.shape, teacher_shape=e_t.shape))
    W_e, b_e = loss.proj.weight, loss.proj.bias
    expected = ((e_s @ W_e.T + b_e - e_t) ** 2).sum() / e_t.numel()
    value = loss(e_s, e_t)
    torch.testing.assert_close(value, expected)
    value.backward()
    assert e_s.grad.abs().sum() > 0 and W_e.grad.abs().sum() > 0
    # whole hidden_states lists: element 0 (the embedding output) is used
    loss2 = losses.build("embedding_mse")
    loss2.configure(LossContext(student_shape=[e_s.shape] * 3, teacher_shape=[e_t.shape] * 5))
    loss2.proj.load_state_dict(loss.proj.state_dict())
    torch.testing.assert_close(loss2([e_s, torch.randn(3, 4, 6)], [e_t, torch.randn(3, 4, 10)]), expected)


def test_embedding_mse_properties():
    torch.manual_seed(0)
    e = torch.randn(1, 4, 6)
    loss = losses.build("embedding_mse")
    assert loss(e, e.clone()).item() == 0.0
    assert torch.isfinite(loss(e * 1e4, torch.randn(1, 4, 6) * 1e4))
    with pytest.raises(RuntimeError, match="embedding_mse: configure"):
        loss(e, torch.randn(1, 4, 3))
    with pytest.raises(LossParamError, match="no parameter 'layer_map'"):
        losses.build("embedding_mse", layer_map="last")


# ---------------------------------------------------------------- attention_kl


def test_attention_kl_matches_formula_last_layer():
    torch.manual_seed(0)
    s = [softmax_maps(2, 3, 5) for _ in range(2)]
    t = [softmax_maps(2, 3, 5) for _ in range(4)]
    value = losses.build("attention_kl")(s, t)  # default: last -> last
    # KL(t || s) summed over keys, averaged over batch, heads and queries
    expected = F.kl_div(s[-1].log(), t[-1], reduction="sum") / (2 * 3 * 5)
    torch.testing.assert_close(value, expected)


def test_attention_kl_uniform_and_mask():
    torch.manual_seed(0)
    lengths = [5, 3]
    s = [softmax_maps(2, 2, 5, lengths) for _ in range(2)]
    t = [softmax_maps(2, 2, 5, lengths) for _ in range(4)]
    value = losses.build("attention_kl", layer_map="uniform")(s, t, attention_mask=mask_from(lengths, 5))
    expected = 0.0
    for i, j in [(0, 1), (1, 3)]:
        per_example = []
        for b, n in enumerate(lengths):
            ps, pt = s[i][b, :, :n, :n], t[j][b, :, :n, :n]
            per_example.append((pt * (pt.log() - ps.log())).sum(-1).mean())
        expected = expected + sum(per_example) / len(per_example)
    torch.testing.assert_close(value, expected)


def test_attention_kl_properties():
    torch.manual_seed(0)
    x = softmax_maps(1, 2, 4)
    loss = losses.build("attention_kl")
    assert abs(loss(x, x.clone()).item()) < 1e-6
    # near one-hot maps (logits x1e4), including student zeros where the teacher has mass
    s_big, t_big = softmax_maps(1, 2, 4, scale=1e4), softmax_maps(1, 2, 4, scale=1e4)
    assert torch.isfinite(loss(s_big, t_big))
    # gradient reaches the student
    scores = torch.randn(2, 2, 4, 4, requires_grad=True)
    loss(scores.softmax(-1), softmax_maps(2, 2, 4)).backward()
    assert scores.grad.abs().sum() > 0
    with pytest.raises(DistillationError, match="attention_kl: .*heads"):
        loss(softmax_maps(2, 2, 4), softmax_maps(2, 3, 4))
    with pytest.raises(DistillationError, match="attention maps"):
        loss(torch.rand(2, 4, 4), torch.rand(2, 4, 4))


# ---------------------------------------------------------------- attention_mse


def test_attention_mse_matches_formula():
    torch.manual_seed(0)
    s = [softmax_maps(2, 3, 4) for _ in range(2)]
    t = [softmax_maps(2, 3, 4) for _ in range(4)]
    value = losses.build("attention_mse")(s, t)  # uniform: student layer 1 -> 2, 2 -> 4
    expected = F.mse_loss(s[0], t[1]) + F.mse_loss(s[1], t[3])
    torch.testing.assert_close(value, expected)


def test_attention_mse_mask():
    torch.manual_seed(0)
    lengths = [4, 2]
    s, t = softmax_maps(2, 2, 4, lengths), softmax_maps(2, 2, 4, lengths)
    value = losses.build("attention_mse")(s, t, attention_mask=mask_from(lengths, 4))
    per_example = [((s[b, :, :n, :n] - t[b, :, :n, :n]) ** 2).mean() for b, n in enumerate(lengths)]
    torch.testing.assert_close(value, sum(per_example) / 2)


def test_attention_mse_properties():
    torch.manual_seed(0)
    x = softmax_maps(1, 2, 3)
    loss = losses.build("attention_mse", layer_map=[0])
    assert loss(x, x.clone()).item() == 0.0
    assert torch.isfinite(loss(softmax_maps(1, 2, 3, scale=1e4), softmax_maps(1, 2, 3, scale=1e4)))
    scores = torch.randn(2, 2, 3, 3, requires_grad=True)
    loss(scores.softmax(-1), softmax_maps(2, 2, 3)).backward()
    assert scores.grad.abs().sum() > 0
    with pytest.raises(DistillationError, match="attention_mse: .*heads"):
        loss(softmax_maps(2, 2, 3), softmax_maps(2, 4, 3))


# ---------------------------------------------------------------- minilm_value_relation


def value_relation(v, heads, n=None):
    """softmax(V_a V_a^T / sqrt(d_a)) per head, written head by head; [T, D] -> [heads, n, n]."""
    n = v.shape[0] if n is None else n
    d = v.shape[-1] // heads
    out = []
    for a in range(heads):
        va = v[:n, a * d : (a + 1) * d]
        out.append(torch.softmax(va @ va.T / math.sqrt(d), dim=-1))
    return torch.stack(out)


def test_minilm_value_relation_same_heads():
    torch.manual_seed(0)
    v_s, v_t = torch.randn(2, 5, 8), torch.randn(2, 5, 12)  # 2 heads each: d = 4 and 6
    value = losses.build("minilm_value_relation", student_heads=2, teacher_heads=2)(v_s, v_t)
    kls = []
    for b in range(2):
        r_s, r_t = value_relation(v_s[b], 2), value_relation(v_t[b], 2)
        kls.append(F.kl_div(r_s.log(), r_t, reduction="sum") / (2 * 5))
    torch.testing.assert_close(value, sum(kls) / 2)


def test_minilm_value_relation_relation_heads_and_mask():
    torch.manual_seed(0)
    lengths = [3, 5]
    v_s, v_t = torch.randn(2, 5, 8), torch.randn(2, 5, 12)
    with pytest.raises(LossParamError, match="num_relation_heads") as info:
        losses.build("minilm_value_relation", student_heads=2, teacher_heads=4)
    assert info.value.param == "teacher_heads"
    loss = losses.build("minilm_value_relation", student_heads=2, teacher_heads=4, num_relation_heads=4)
    value = loss(v_s, v_t, attention_mask=mask_from(lengths, 5))
    kls = []
    for b, n in enumerate(lengths):
        r_s, r_t = value_relation(v_s[b], 4, n), value_relation(v_t[b], 4, n)  # d_r = 2 and 3
        kls.append((r_t * (r_t.log() - r_s.log())).sum(-1).mean())
    torch.testing.assert_close(value, sum(kls) / 2)


def test_minilm_value_relation_properties():
    torch.manual_seed(0)
    loss = losses.build("minilm_value_relation", student_heads=2, teacher_heads=2)
    v = torch.randn(1, 4, 8)
    assert abs(loss(v, v.clone()).item()) < 1e-6
    assert torch.isfinite(loss(torch.randn(1, 4, 8) * 1e4, torch.randn(1, 4, 8) * 1e4))
    v_s = torch.randn(2, 4, 8, requires_grad=True)
    loss(v_s, torch.randn(2, 4, 6), attention_mask=mask_from([4, 2], 4)).backward()
    assert v_s.grad.abs().sum() > 0
    assert v_s.grad[1, 2:].abs().sum() == 0  # padded tokens get no gradient
    with pytest.raises(DistillationError, match="not divisible"):
        loss(torch.randn(2, 4, 7), torch.randn(2, 4, 8))
    with pytest.raises(DistillationError, match="sequence"):
        loss(torch.randn(2, 4, 8), torch.randn(2, 5, 8))


@pytest.mark.parametrize(
    "params",
    [{}, {"student_heads": 2}, {"student_heads": 0, "teacher_heads": 0}, {"num_relation_heads": -1}, {"num_relation_heads": 2.5}],
)
def test_minilm_value_relation_validation(params):
    with pytest.raises(LossParamError) as info:
        losses.build("minilm_value_relation", **params)
    assert info.value.param in {"student_heads", "teacher_heads", "num_relation_heads"}


# ---------------------------------------------------------------- deit


def test_deit_hard_hand_computed():
    loss = losses.build("deit")  # mode="hard"
    s = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    t = torch.tensor([[1.0, 2.0], [5.0, -1.0]])  # teacher argmax: 1, 0
    # row 0: -log(1/2); row 1: -log(3/4)
    torch.testing.assert_close(loss(s, t), torch.tensor((math.log(2) + math.log(4 / 3)) / 2))


def test_deit_soft_matches_formula():
    torch.manual_seed(0)
    s, t = torch.randn(4, 5), torch.randn(4, 5)
    value = losses.build("deit", mode="soft")(s, t)  # tau = 3
    p_t, p_s = torch.softmax(t / 3, 1), torch.softmax(s / 3, 1)
    expected = 9 * (p_t * (p_t / p_s).log()).sum(1).mean()
    torch.testing.assert_close(value, expected)
    assert abs(losses.build("deit", mode="soft")(t, t.clone()).item()) < 1e-6


@pytest.mark.parametrize("mode", ["hard", "soft"])
def test_deit_properties(mode):
    torch.manual_seed(0)
    loss = losses.build("deit", mode=mode, tau=2.0)
    s = torch.randn(1, 10, requires_grad=True)
    loss(s, torch.randn(1, 10)).backward()
    assert s.grad.abs().sum() > 0
    assert torch.isfinite(loss(torch.randn(2, 10) * 1e4, torch.randn(2, 10) * 1e4))
    assert torch.isfinite(loss(torch.randn(2, 3, 10), torch.randn(2, 3, 10)))  # [B, T, C]
    with pytest.raises(DistillationError, match="deit: .*same shape"):
        loss(torch.randn(2, 10), torch.randn(2, 5))


@pytest.mark.parametrize("params, match", [({"mode": "medium"}, "mode"), ({"tau": 0.0}, "tau"), ({"tau": -1}, "tau")])
def test_deit_validation(params, match):
    with pytest.raises(LossParamError, match=f"'{match}'"):
        losses.build("deit", **params)


# ---------------------------------------------------------------- on real (tiny) BERT outputs


def test_bert_hidden_and_attention_losses_backprop():
    torch.manual_seed(0)
    common = dict(intermediate_size=37, vocab_size=100, num_attention_heads=2, attn_implementation="eager")
    teacher = BertModel(BertConfig(hidden_size=32, num_hidden_layers=4, **common)).eval()
    student = BertForSequenceClassification(
        BertConfig(hidden_size=16, num_hidden_layers=2, attention_probs_dropout_prob=0.0, **common)
    )
    ids = torch.randint(0, 100, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 4:] = 0
    with torch.no_grad():
        out_t = teacher(input_ids=ids, attention_mask=mask, output_hidden_states=True, output_attentions=True)
    out_s = student(input_ids=ids, attention_mask=mask, output_hidden_states=True, output_attentions=True)

    hidden = losses.build("hidden_mse")
    hidden.configure(LossContext(student_shape=[h.shape for h in out_s.hidden_states], teacher_shape=[h.shape for h in out_t.hidden_states]))
    attn = losses.build("attention_kl", layer_map="uniform")
    h_loss = hidden(list(out_s.hidden_states), list(out_t.hidden_states), attention_mask=mask)
    a_loss = attn(list(out_s.attentions), list(out_t.attentions), attention_mask=mask)
    for value in (h_loss, a_loss):
        assert torch.isfinite(value) and value.item() > 0
    (h_loss + a_loss).backward()
    assert hidden.proj.weight.grad is not None and hidden.proj.weight.grad.abs().sum() > 0
    grads = [p.grad for p in student.bert.encoder.parameters() if p.grad is not None]
    assert grads and sum(g.abs().sum() for g in grads) > 0
    assert student.bert.embeddings.word_embeddings.weight.grad.abs().sum() > 0
