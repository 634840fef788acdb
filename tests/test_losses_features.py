"""Feature-based losses (hfdistill/losses/features.py): values against the papers' formulas written
out independently here, plus properties (zero at a match, gradients, large inputs, batch size 1,
parameter validation)."""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hfdistill import losses
from hfdistill.errors import DistillationError, LossParamError
from hfdistill.losses.features import _hcl, ofd_margin_from_bn
from hfdistill.terms import LossContext

FEATURE_METHODS = ["mse", "cosine", "at", "nst", "ft", "ofd", "afd", "kr", "srd", "ickd", "cwd"]


def _bn_train(x: torch.Tensor, eps: float, weight=None, bias=None) -> torch.Tensor:
    """BatchNorm in training mode written out: batch mean, biased variance, per feature (dim 1)."""
    dims = [0] + list(range(2, x.dim()))
    mean = x.mean(dims, keepdim=True)
    var = ((x - mean) ** 2).mean(dims, keepdim=True)
    y = (x - mean) / torch.sqrt(var + eps)
    shape = [1, -1] + [1] * (x.dim() - 2)
    if weight is not None:
        y = y * weight.view(shape) + bias.view(shape)
    return y


def _params_have_grad(module: nn.Module) -> list[str]:
    """Names of trainable parameters that received no (or an all-zero) gradient.

    The bias of a convolution or linear layer followed by a batch-norm in training mode is left out: the
    normalisation subtracts it again, so its gradient is zero up to rounding (exactly zero with some
    thread counts)."""
    cancelled = set()
    for prefix, parent in module.named_modules():
        children = list(parent.named_children())
        for (name, child), (_, following) in zip(children, children[1:]):
            if isinstance(child, (nn.Conv2d, nn.Linear)) and isinstance(following, nn.modules.batchnorm._BatchNorm) \
                    and following.training and child.bias is not None:
                cancelled.add(f"{prefix}.{name}.bias" if prefix else f"{name}.bias")
    return [n for n, p in module.named_parameters()
            if n not in cancelled and (p.grad is None or not torch.any(p.grad != 0))]


# ---------------------------------------------------------------------------------------------
# registry
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", FEATURE_METHODS)
def test_registered_with_paper(name):
    info = losses.get_info(name)
    assert info.reads == "features"
    assert "arXiv:" in info.paper and info.description
    assert info.default_tap is None


def test_registry_flags_and_aliases():
    flags = {n: losses.get_info(n) for n in FEATURE_METHODS}
    assert {n for n, i in flags.items() if i.trainable} == {"ft", "ofd", "afd", "kr", "srd", "ickd"}
    assert {n for n, i in flags.items() if i.multi_layer} == {"at", "afd", "kr"}
    assert {n for n, i in flags.items() if i.same_shape} == {"mse", "cosine", "cwd"}
    assert flags["kr"].fields == ("epoch",)
    assert losses.get_info("fitnet").cls is flags["mse"].cls
    assert losses.get_info("reviewkd").cls is flags["kr"].cls
    # torchdistill's ChSimLoss is ICKD, so no `chsim` alias (it once named CWD here)
    assert "chsim" not in losses.available()
    with pytest.raises(LossParamError, match="temperature") as info:
        losses.build("at", temperature=2.0)
    assert info.value.param == "temperature"


# ---------------------------------------------------------------------------------------------
# mse / fitnet
# ---------------------------------------------------------------------------------------------


def test_mse_value_and_properties():
    s = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    t = torch.tensor([[1.0, 0.0], [0.0, 4.0]])
    loss = losses.build("fitnet")(s, t)
    assert loss.item() == pytest.approx((0 + 4 + 9 + 0) / 4)
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    assert losses.build("mse")(x, x.detach()).item() == 0.0
    y = torch.randn(2, 3, 4, 4)
    losses.build("mse")(x, y).backward()
    assert x.grad is not None and torch.any(x.grad != 0)
    assert torch.isfinite(losses.build("mse")(x * 1e4, y)).item()
    assert torch.isfinite(losses.build("mse")(x[:1], y[:1]))
    assert losses.build("mse")(x, y.bfloat16()).dtype == torch.float32
    with pytest.raises(DistillationError, match="same shape"):
        losses.build("mse")(x, torch.randn(2, 5, 4, 4))


# ---------------------------------------------------------------------------------------------
# cosine
# ---------------------------------------------------------------------------------------------


def test_cosine_hand_values():
    cos = losses.build("cosine")
    s = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    t = torch.tensor([[0.0, 1.0], [1.0, 1.0]])
    expected = ((1 - 0) + (1 - 1 / math.sqrt(2))) / 2
    assert cos(s, t).item() == pytest.approx(expected, rel=1e-6)
    # [B, T, D]: one cosine per token, over D
    s3 = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])
    t3 = torch.tensor([[[-3.0, 0.0], [0.0, 5.0]]])
    assert cos(s3, t3).item() == pytest.approx(((1 - -1) + (1 - 1)) / 2)


def test_cosine_conv_maps_use_channel_vectors():
    torch.manual_seed(0)
    s, t = torch.randn(2, 3, 2, 2), torch.randn(2, 3, 2, 2)
    total = 0.0
    for b in range(2):
        for i in range(2):
            for j in range(2):
                u, v = s[b, :, i, j], t[b, :, i, j]
                total += 1 - float(u @ v) / float(u.norm() * v.norm())
    assert losses.build("cosine")(s, t).item() == pytest.approx(total / 8, rel=1e-5)


def test_cosine_properties():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 8, requires_grad=True)
    cos = losses.build("cosine")
    assert cos(x, 3 * x.detach()).item() == pytest.approx(0.0, abs=1e-6)  # scale invariant
    cos(x, torch.randn(2, 5, 8)).backward()
    assert torch.any(x.grad != 0)
    assert torch.isfinite(cos(x * 1e4, torch.randn(2, 5, 8)))
    assert torch.isfinite(cos(torch.zeros(1, 2, 4), torch.randn(1, 2, 4)))
    with pytest.raises(LossParamError, match="'eps'"):
        losses.build("cosine", eps=0)


# ---------------------------------------------------------------------------------------------
# at
# ---------------------------------------------------------------------------------------------


def _at_reference(s_list, t_list, beta=1000.0, p=2.0) -> float:
    """A Python float: pytest.approx compares floats (given a tensor, pytest >= 9.2 fails to iterate it)."""
    total = 0.0
    for s, t in zip(s_list, t_list):
        qs = s.abs().pow(p).sum(1).reshape(s.shape[0], -1)  # paper: sum over channels
        qt = t.abs().pow(p).sum(1).reshape(t.shape[0], -1)
        qs = qs / qs.pow(2).sum(1, keepdim=True).sqrt()
        qt = qt / qt.pow(2).sum(1, keepdim=True).sqrt()
        total += float(((qs - qt) ** 2).sum()) / qs.numel()
    return beta / 2 * total


def test_at_value_multi_layer():
    torch.manual_seed(0)
    s = [torch.randn(2, 3, 4, 4), torch.randn(2, 5, 2, 2)]
    t = [torch.randn(2, 6, 4, 4), torch.randn(2, 7, 2, 2)]
    loss = losses.build("at")(s, t)
    assert loss.item() == pytest.approx(_at_reference(s, t), rel=1e-5)
    loss_p3 = losses.build("at", p=3.0, beta=10.0)(s, t)
    assert loss_p3.item() == pytest.approx(_at_reference(s, t, beta=10.0, p=3.0), rel=1e-5)
    # a single layer can be passed as a tensor
    assert losses.build("at")(s[0], t[0]).item() == pytest.approx(_at_reference(s[:1], t[:1]), rel=1e-5)


def test_at_pools_larger_map():
    torch.manual_seed(0)
    s, t = torch.randn(2, 3, 8, 8), torch.randn(2, 4, 4, 4)
    expected = _at_reference([F.avg_pool2d(s, 2)], [t])
    assert losses.build("at")([s], [t]).item() == pytest.approx(expected, rel=1e-5)
    assert losses.build("at")([t], [s]).item() == pytest.approx(expected, rel=1e-5)


def test_at_properties():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    at = losses.build("at")
    assert at([x], [5 * x.detach()]).item() == pytest.approx(0.0, abs=1e-9)
    at([x], [torch.randn(2, 8, 4, 4)]).backward()
    assert torch.any(x.grad != 0)
    assert torch.isfinite(at([x * 1e4], [torch.randn(2, 8, 4, 4)]))
    assert torch.isfinite(at([x[:1]], [torch.randn(1, 8, 4, 4)]))
    assert torch.isfinite(at([torch.randn(2, 6, 8)], [torch.randn(2, 6, 16)]))  # hidden states [B, T, D]
    with pytest.raises(LossParamError, match="'p'"):
        losses.build("at", p=0)
    with pytest.raises(LossParamError, match="'beta'"):
        losses.build("at", beta=-1)
    with pytest.raises(DistillationError, match="as many"):
        at([x, x], [x])


# ---------------------------------------------------------------------------------------------
# nst
# ---------------------------------------------------------------------------------------------


def _nst_reference(s, t, d=2, c=0.0):
    out = []
    for b in range(s.shape[0]):
        fs = [v / v.norm() for v in s[b].reshape(s.shape[1], -1)]
        ft = [v / v.norm() for v in t[b].reshape(t.shape[1], -1)]
        k = lambda x, y: (float(x @ y) + c) ** d  # noqa: E731
        tt = sum(k(a, b_) for a in ft for b_ in ft) / len(ft) ** 2
        ss = sum(k(a, b_) for a in fs for b_ in fs) / len(fs) ** 2
        st = sum(k(a, b_) for a in fs for b_ in ft) / (len(fs) * len(ft))
        out.append(tt + ss - 2 * st)
    return sum(out) / len(out)


def test_nst_value():
    torch.manual_seed(0)
    s, t = torch.randn(2, 3, 2, 2), torch.randn(2, 4, 2, 2)
    assert losses.build("nst")(s, t).item() == pytest.approx(_nst_reference(s, t), rel=1e-5)
    assert losses.build("nst", d=3, c=0.5)(s, t).item() == pytest.approx(_nst_reference(s, t, 3, 0.5), rel=1e-5)


def test_nst_linear_kernel_is_distance_of_means():
    torch.manual_seed(0)
    s, t = torch.randn(1, 3, 2, 3), torch.randn(1, 5, 2, 3)
    mu_s = F.normalize(s.reshape(3, -1), dim=1).mean(0)
    mu_t = F.normalize(t.reshape(5, -1), dim=1).mean(0)
    assert losses.build("nst", d=1)(s, t).item() == pytest.approx(float((mu_s - mu_t).pow(2).sum()), rel=1e-5)


def test_nst_properties():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    nst = losses.build("nst")
    assert nst(x, 2 * x.detach()).item() == pytest.approx(0.0, abs=1e-6)
    nst(x, torch.randn(2, 6, 8, 8)).backward()  # teacher map pooled to 4x4
    assert torch.any(x.grad != 0)
    assert torch.isfinite(nst(x * 1e4, torch.randn(2, 6, 4, 4)))
    assert torch.isfinite(nst(x[:1], torch.randn(1, 6, 4, 4)))
    for bad in ({"d": 0}, {"d": 1.5}, {"c": -1.0}):
        with pytest.raises(LossParamError, match="'[dc]'"):
            losses.build("nst", **bad)


# ---------------------------------------------------------------------------------------------
# ft
# ---------------------------------------------------------------------------------------------

FT_TRANSFER_ERROR = (
    "FT's transfer phase needs a paraphraser trained in an earlier stage: add a stage with the same term name "
    "and params {phase: paraphraser}"
)


def _ft_built(cs=3, ct=8, hw=4, **params):
    ft = losses.build("ft", **params)
    ft.configure(LossContext(student_shape=torch.Size([2, cs, hw, hw]), teacher_shape=torch.Size([2, ct, hw, hw])))
    return ft


def _stack_by_hand(x, layers, transposed=False):
    """(transposed) conv 3x3 stride 1 padding 1 -> BatchNorm -> LeakyReLU(0.1), written with the functional API."""
    convs = [m for m in layers if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    bns = [m for m in layers if isinstance(m, nn.BatchNorm2d)]
    assert len(convs) == len(bns) == 3
    for conv, bn in zip(convs, bns):
        assert conv.kernel_size == (3, 3) and conv.stride == (1, 1) and conv.padding == (1, 1)
        if transposed:
            x = F.conv_transpose2d(x, conv.weight, conv.bias, padding=1)
        else:
            x = F.conv2d(x, conv.weight, conv.bias, padding=1)
        if bn.training:
            x = _bn_train(x, bn.eps, bn.weight, bn.bias)
        else:
            x = F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
        x = torch.where(x >= 0, x, 0.1 * x)
    return x


def _ft_formula(factor_s, factor_t, p=1.0):
    u_s = factor_s.reshape(factor_s.shape[0], -1)
    u_t = factor_t.reshape(factor_t.shape[0], -1)
    u_s = u_s / u_s.pow(2).sum(1, keepdim=True).sqrt()
    u_t = u_t / u_t.pow(2).sum(1, keepdim=True).sqrt()
    return float((u_s - u_t).abs().pow(p).sum() / u_s.numel())  # the authors' nn.L1Loss(): mean over elements


def test_ft_modules_follow_the_paper():
    ft = _ft_built(cs=3, ct=8)
    assert ft.phase == "transfer" and ft.rate == 0.5 and ft.p == 1.0
    # paraphraser: 8 -> 8 -> k -> k -> k -> 8 -> 8 with k = 0.5 * 8; translator: 3 -> 3 -> k -> k
    enc = [m.out_channels for m in ft.paraphraser.encoder if isinstance(m, nn.Conv2d)]
    dec = [m.out_channels for m in ft.paraphraser.decoder if isinstance(m, nn.ConvTranspose2d)]
    tra = [m.out_channels for m in ft.translator if isinstance(m, nn.Conv2d)]
    assert (enc, dec, tra) == ([8, 4, 4], [4, 8, 8], [3, 4, 4])
    assert _ft_built(cs=3, ct=8, rate=0.25).paraphraser.encoder[3].out_channels == 2
    assert _ft_built(cs=3, ct=5, rate=0.5).translator[-3].out_channels == 2  # round(2.5) -> 2 (round half to even)
    assert _ft_built(cs=3, ct=3, rate=0.1).translator[-3].out_channels == 1  # at least one factor channel


def test_ft_transfer_value_against_formula():
    torch.manual_seed(0)
    ft = _ft_built(cs=3, ct=8)
    ft.train()
    assert not ft.paraphraser.training and ft.translator.training  # frozen paraphraser stays in eval mode
    s, t = torch.randn(2, 3, 4, 4), torch.randn(2, 8, 4, 4)
    with torch.no_grad():
        factor_t = _stack_by_hand(t, ft.paraphraser.encoder)  # [2, 4, 4, 4]
        factor_s = _stack_by_hand(s, ft.translator)  # [2, 4, 4, 4]
    assert factor_t.shape == factor_s.shape == (2, 4, 4, 4)
    assert ft(s, t).item() == pytest.approx(_ft_formula(factor_s, factor_t), rel=1e-5)
    ft2 = _ft_built(cs=3, ct=8, p=2.0)
    ft2.load_state_dict(ft.state_dict())
    assert ft2(s, t).item() == pytest.approx(_ft_formula(factor_s, factor_t, p=2.0), rel=1e-5)


def test_ft_paraphraser_phase_value_and_flag():
    torch.manual_seed(0)
    ft = _ft_built(cs=3, ct=8, phase="paraphraser")
    t = torch.randn(2, 8, 4, 4)
    assert not bool(ft.paraphraser_trained)
    ft.eval()
    with torch.no_grad():
        ft(None, t)  # an evaluation forward is not a training step
    assert not bool(ft.paraphraser_trained)
    ft.train()
    with torch.no_grad():
        reconstruction = _stack_by_hand(_stack_by_hand(t, ft.paraphraser.encoder), ft.paraphraser.decoder, transposed=True)
    expected = float(((reconstruction - t) ** 2).mean())  # L_rec = ||x - P(x)||^2, mean over elements
    assert ft(None, t).item() == pytest.approx(expected, rel=1e-5)  # the student value is not used
    assert bool(ft.paraphraser_trained)


def test_ft_phases_choose_what_trains():
    torch.manual_seed(0)
    s, t = torch.randn(2, 3, 4, 4, requires_grad=True), torch.randn(2, 8, 4, 4)
    para = _ft_built(phase="paraphraser")
    assert all(p.requires_grad for p in para.paraphraser.parameters())
    assert not any(p.requires_grad for p in para.translator.parameters())
    para.train()
    assert para.paraphraser.training
    para(s, t).backward()
    assert _params_have_grad(para.paraphraser) == [] and s.grad is None
    assert all(p.grad is None for p in para.translator.parameters())

    ft = _ft_built()
    assert not any(p.requires_grad for p in ft.paraphraser.parameters())
    assert all(p.requires_grad for p in ft.translator.parameters())
    for p in ft.paraphraser.parameters():  # even if something switched them back on, no gradient reaches them
        p.requires_grad_(True)
    ft.paraphraser_trained.fill_(True)
    ft.on_train_begin(LossContext())
    assert not any(p.requires_grad for p in ft.paraphraser.parameters())  # on_train_begin re-applies the phase
    ft.train()
    ft(s, t).backward()
    assert s.grad is not None and torch.any(s.grad != 0)
    assert _params_have_grad(ft.translator) == []
    assert all(p.grad is None for p in ft.paraphraser.parameters())
    running = ft.paraphraser.encoder[1].running_mean.clone()
    ft(s, t)
    torch.testing.assert_close(ft.paraphraser.encoder[1].running_mean, running)  # eval-mode BN: statistics kept


def test_ft_state_dict_is_the_same_in_both_phases_and_carries_the_paraphraser():
    torch.manual_seed(0)
    para, transfer = _ft_built(phase="paraphraser"), _ft_built(phase="transfer")
    assert {k: v.shape for k, v in para.state_dict().items()} == {k: v.shape for k, v in transfer.state_dict().items()}
    assert "paraphraser_trained" in para.state_dict()
    # stage 1: train the paraphraser alone on the teacher's map
    t = torch.randn(4, 8, 4, 4)
    opt = torch.optim.Adam([p for p in para.parameters() if p.requires_grad], lr=1e-2)
    para.train()
    first = para(None, t).item()
    for _ in range(30):
        opt.zero_grad()
        loss = para(None, t)
        loss.backward()
        opt.step()
    assert loss.item() < first
    # stage 2: a new module for the same term, configured the same way, gets stage 1's state
    with pytest.raises(DistillationError, match=re.escape(FT_TRANSFER_ERROR)):
        transfer.on_train_begin(LossContext(term="ft"))
    transfer.load_state_dict(para.state_dict())
    transfer.on_train_begin(LossContext(term="ft"))  # the paraphraser was trained: no error
    frozen = {k: v.clone() for k, v in transfer.paraphraser.state_dict().items()}
    opt = torch.optim.SGD([p for p in transfer.parameters() if p.requires_grad], lr=0.1)
    transfer.train()
    s = torch.randn(4, 3, 4, 4)
    for _ in range(3):
        opt.zero_grad()
        transfer(s, t).backward()
        opt.step()
    for k, v in transfer.paraphraser.state_dict().items():
        torch.testing.assert_close(v, frozen[k])
    # the teacher factor is the trained encoder's output
    with torch.no_grad():
        para.eval()
        torch.testing.assert_close(transfer.teacher_factor_of(t), para.paraphraser.encoder(t))


def test_ft_raw_teacher_factor_variant():
    torch.manual_seed(0)
    ft = _ft_built(cs=3, ct=4, teacher_factor="raw")
    assert ft.paraphraser is None and not any(k.startswith("paraphraser.") for k in ft.state_dict())
    ft.on_train_begin(LossContext())  # nothing to have trained first
    s, t = torch.randn(2, 3, 4, 4, requires_grad=True), torch.randn(2, 4, 4, 4)
    with torch.no_grad():
        factor_s = ft.translator(s)
    assert factor_s.shape == (2, 4, 4, 4)
    assert ft(s, t).item() == pytest.approx(_ft_formula(factor_s, t), rel=1e-5)
    assert ft(s, 7 * factor_s).item() == pytest.approx(0.0, abs=1e-6)  # matched factor (scale-free)
    ft(s, torch.randn(2, 4, 4, 4)).backward()
    assert torch.any(s.grad != 0) and _params_have_grad(ft.translator) == []
    with pytest.raises(LossParamError, match="'phase'"):
        losses.build("ft", phase="paraphraser", teacher_factor="raw")


def test_ft_properties():
    torch.manual_seed(0)
    ft = _ft_built(cs=3, ct=8)
    s = torch.randn(2, 3, 4, 4)
    assert torch.isfinite(ft(s * 1e4, torch.randn(2, 8, 4, 4)))
    assert torch.isfinite(ft(torch.randn(2, 3, 8, 8), torch.randn(2, 8, 4, 4)))  # student factor pooled
    assert torch.isfinite(ft(s, torch.randn(2, 8, 8, 8)))  # teacher factor pooled
    assert ft(s.bfloat16(), torch.randn(2, 8, 4, 4).bfloat16()).dtype == torch.float32
    assert torch.isfinite(ft(s[:1], torch.randn(1, 8, 4, 4)))  # batch 1 with positions: BatchNorm has values


def test_ft_errors():
    with pytest.raises(RuntimeError, match="configure"):
        losses.build("ft")(torch.randn(2, 3, 4, 4), torch.randn(2, 4, 4, 4))
    for bad in ({"p": 0}, {"rate": 0}, {"rate": "half"}, {"phase": "stage1"}, {"teacher_factor": "feature"}):
        with pytest.raises(LossParamError, match=f"'{next(iter(bad))}'"):
            losses.build("ft", **bad)
    with pytest.raises(DistillationError, match="teacher"):
        losses.build("ft").configure(LossContext(student_shape=torch.Size([2, 3, 4, 4]), teacher_shape=None))
    with pytest.raises(DistillationError, match=r"\[B, C, H, W\]"):
        losses.build("ft").configure(LossContext(student_shape=torch.Size([2, 3]), teacher_shape=torch.Size([2, 4, 4, 4])))
    with pytest.raises(DistillationError, match="other shapes"):
        _ft_built(ct=8)(torch.randn(2, 3, 4, 4), torch.randn(2, 5, 4, 4))
    ft = _ft_built(cs=3, ct=8, hw=1)
    ft.train()
    with pytest.raises(DistillationError, match="at least 2 examples"):
        ft(torch.randn(1, 3, 1, 1), torch.randn(1, 8, 1, 1))
    ft.eval()
    assert torch.isfinite(ft(torch.randn(1, 3, 1, 1), torch.randn(1, 8, 1, 1)))


# ---------------------------------------------------------------------------------------------
# ofd
# ---------------------------------------------------------------------------------------------


def _identity_connector(ofd, c):
    with torch.no_grad():
        ofd.connector[0].weight.copy_(torch.eye(c).view(c, c, 1, 1))
    ofd.eval()  # connector BN uses running stats (mean 0, var 1): identity up to 1/sqrt(1 + eps)


def test_ofd_partial_l2_by_hand():
    ofd = losses.build("ofd", margin=-1.0)
    ofd.configure(LossContext(student_shape=torch.Size([1, 2, 1, 1]), teacher_shape=torch.Size([1, 2, 1, 1])))
    _identity_connector(ofd, 2)
    k = 1 / math.sqrt(1 + 1e-5)
    t = torch.tensor([-2.0, 3.0]).view(1, 2, 1, 1)  # targets: max(-2, -1) = -1, 3
    # student below a non-positive target: skipped; matched positive: 0
    s = torch.tensor([-5.0, 3.0 / k]).view(1, 2, 1, 1)
    assert ofd(s, t).item() == pytest.approx(0.0, abs=1e-9)
    # student above the negative target: (target - student)^2 counts
    s = torch.tensor([0.5 / k, 1.0 / k]).view(1, 2, 1, 1)
    assert ofd(s, t).item() == pytest.approx((-1 - 0.5) ** 2 + (3 - 1) ** 2, rel=1e-5)


def test_ofd_value_against_formula():
    torch.manual_seed(0)
    ofd = losses.build("ofd", margin=[-0.5, -1.0, -0.2])
    ofd.configure(LossContext(student_shape=torch.Size([2, 2, 3, 3]), teacher_shape=torch.Size([2, 3, 3, 3])))
    s, t = torch.randn(2, 2, 3, 3), torch.randn(2, 3, 3, 3)
    src = ofd.connector(s).detach()
    m = torch.tensor([-0.5, -1.0, -0.2]).view(1, 3, 1, 1).expand_as(t)
    total = 0.0
    for idx in range(t.numel()):
        tv, mv, sv = t.flatten()[idx].item(), m.flatten()[idx].item(), src.flatten()[idx].item()
        target = max(tv, mv)
        if not (sv <= target and target <= 0):
            total += (target - sv) ** 2
    assert ofd(s, t).item() == pytest.approx(total / 2, rel=1e-5)


def test_ofd_margin_estimated_from_teacher_batches():
    ofd = losses.build("ofd")
    ofd.configure(LossContext(student_shape=torch.Size([2, 1, 2, 1]), teacher_shape=torch.Size([2, 2, 2, 1])))
    t1 = torch.tensor([[[[-1.0], [2.0]], [[3.0], [4.0]]], [[[-3.0], [5.0]], [[1.0], [1.0]]]])
    t2 = torch.tensor([[[[-5.0], [0.0]], [[-2.0], [1.0]]], [[[1.0], [1.0]], [[1.0], [1.0]]]])
    s = torch.zeros(2, 1, 2, 1)
    ofd(s, t1)
    assert ofd.neg_mean.tolist() == pytest.approx([-2.0, 0.0])  # channel 1 has no negatives yet
    ofd(s, t2)
    assert ofd.neg_mean.tolist() == pytest.approx([-3.0, -2.0])  # mean of {-1, -3, -5} and {-2}
    assert ofd.neg_count.tolist() == [3.0, 1.0]
    ofd.eval()  # eval: no update
    ofd(s, -10 * torch.ones(2, 2, 2, 1))
    assert ofd.neg_mean.tolist() == pytest.approx([-3.0, -2.0])
    assert "neg_mean" in ofd.state_dict() and "connector.0.weight" in ofd.state_dict()


def test_ofd_margin_from_teacher_bn_matches_gaussian_formula():
    from scipy.stats import norm

    weight = torch.tensor([1.0, 2.0, -0.5, 0.1])
    bias = torch.tensor([0.0, 1.0, -0.3, 1.0])  # last channel: Phi(-10) tiny -> -3 s
    expected = []
    for s, m in zip(weight.abs().tolist(), bias.tolist()):
        cdf = norm.cdf(-m / s)
        expected.append(m - s * norm.pdf(m / s) / cdf if cdf > 0.001 else -3 * s)
    assert ofd_margin_from_bn(weight, bias).tolist() == pytest.approx(expected, rel=1e-5)
    assert ofd_margin_from_bn(weight, bias)[0].item() == pytest.approx(-math.sqrt(2 / math.pi), rel=1e-6)
    # set before configure: applied when configure builds the buffers
    ofd = losses.build("ofd")
    ofd.set_teacher_bn(weight, bias)
    ofd.configure(LossContext(student_shape=torch.Size([2, 3, 2, 2]), teacher_shape=torch.Size([2, 4, 2, 2])))
    assert bool(ofd.has_bn_margin) and ofd.bn_margin.tolist() == pytest.approx(expected, rel=1e-5)
    t = torch.randn(2, 4, 2, 2)
    ofd(torch.randn(2, 3, 2, 2), t)
    assert ofd.neg_count.sum().item() == 0  # the BN margin is used, no estimate kept


def test_ofd_gradients_and_edges():
    torch.manual_seed(0)
    ofd = losses.build("ofd")
    ofd.configure(LossContext(student_shape=torch.Size([2, 3, 4, 4]), teacher_shape=torch.Size([2, 5, 4, 4])))
    s = torch.randn(2, 3, 4, 4, requires_grad=True)
    ofd(s, torch.randn(2, 5, 4, 4)).backward()
    assert torch.any(s.grad != 0)
    assert _params_have_grad(ofd.connector) == []
    assert torch.isfinite(ofd(s.detach() * 1e4, torch.randn(2, 5, 4, 4) * 1e4))
    assert torch.isfinite(ofd(s.detach()[:1], torch.randn(1, 5, 4, 4)))
    assert torch.isfinite(ofd(torch.randn(2, 3, 8, 8), torch.randn(2, 5, 4, 4)))
    with pytest.raises(RuntimeError, match="configure"):
        losses.build("ofd")(s, torch.randn(2, 5, 4, 4))
    with pytest.raises(LossParamError, match="'margin'"):
        losses.build("ofd", margin=0.5)
    with pytest.raises(LossParamError, match="'margin': has 2 values but the teacher feature has 5 channels"):
        losses.build("ofd", margin=[-1.0, -1.0]).configure(LossContext(student_shape=torch.Size([2, 3, 4, 4]), teacher_shape=torch.Size([2, 5, 4, 4])))


# ---------------------------------------------------------------------------------------------
# afd
# ---------------------------------------------------------------------------------------------


def _afd_reference(afd, s_list, t_list):
    """AFD written out from the paper/authors' definitions, reusing only the module's parameters."""
    d = afd.qk_dim

    def lin_bn(block, x, relu):
        y = _bn_train(x @ block.linear.weight.t() + block.linear.bias, block.bn.eps, block.bn.weight, block.bn.bias)
        return torch.relu(y) if relu else y

    b, n_s, n_t = s_list[0].shape[0], len(s_list), len(t_list)
    q = torch.stack([lin_bn(blk, t.mean((2, 3)), False) for blk, t in zip(afd.query, t_list)], 1)
    k = torch.stack([lin_bn(blk, s.mean((2, 3)), True) for blk, s in zip(afd.key, s_list)], 1)
    kb = lin_bn(afd.bilinear, k.reshape(b * n_s, d), False).reshape(b, n_s, n_t, d)
    total = 0.0
    for ti, t in enumerate(t_list):
        logits = torch.stack(
            [(kb[:, si, ti] * q[:, ti]).sum(-1) + afd.pos_t[ti] @ afd.pos_s[si] for si in range(n_s)], 1
        ) / math.sqrt(d)
        alpha = logits.softmax(1)  # over student layers
        vt = t.pow(2).mean(1).reshape(b, -1)
        vt = vt / vt.norm(dim=1, keepdim=True)
        for si, s in enumerate(s_list):
            vs = F.adaptive_avg_pool2d(s.pow(2).mean(1, keepdim=True), t.shape[2:]).reshape(b, -1)
            vs = vs / vs.norm(dim=1, keepdim=True)
            total += (alpha[:, si] * ((vs - vt) ** 2).mean(1)).mean()
    return total.detach()


def _afd_built(qk_dim=8):
    s_shapes = [torch.Size([3, 2, 4, 4]), torch.Size([3, 4, 2, 2])]
    t_shapes = [torch.Size([3, 3, 4, 4]), torch.Size([3, 5, 2, 2]), torch.Size([3, 6, 2, 2])]
    afd = losses.build("afd", qk_dim=qk_dim)
    afd.configure(LossContext(student_shape=s_shapes, teacher_shape=t_shapes))
    return afd, [torch.randn(s) for s in s_shapes], [torch.randn(t) for t in t_shapes]


def test_afd_value_against_formula():
    torch.manual_seed(0)
    afd, s, t = _afd_built()
    assert afd(s, t).item() == pytest.approx(_afd_reference(afd, s, t).item(), rel=1e-5)
    alpha = afd.attention(s, t)
    assert alpha.shape == (3, 3, 2)
    assert torch.allclose(alpha.sum(2), torch.ones(3, 3))


def test_afd_properties_and_gradients():
    torch.manual_seed(0)
    afd = losses.build("afd", qk_dim=4)
    afd.configure(LossContext(student_shape=[torch.Size([2, 3, 4, 4])], teacher_shape=[torch.Size([2, 3, 4, 4])]))
    x = torch.randn(2, 3, 4, 4)
    assert afd([x], [x]).item() == pytest.approx(0.0, abs=1e-9)
    torch.manual_seed(1)
    afd, s, t = _afd_built()
    s = [x.requires_grad_() for x in s]
    afd(s, t).backward()
    assert all(torch.any(x.grad != 0) for x in s)
    assert _params_have_grad(afd) == []
    assert torch.isfinite(afd([x.detach() * 1e4 for x in s], t))
    with pytest.raises(DistillationError, match="at least 2"):
        afd([x.detach()[:1] for x in s], [x[:1] for x in t])
    afd.eval()
    assert torch.isfinite(afd([x.detach()[:1] for x in s], [x[:1] for x in t]))


def test_afd_errors():
    with pytest.raises(RuntimeError, match="configure"):
        losses.build("afd")([torch.randn(2, 3, 4, 4)], [torch.randn(2, 3, 4, 4)])
    with pytest.raises(LossParamError, match="'qk_dim'"):
        losses.build("afd", qk_dim=0)
    afd, s, t = _afd_built()
    with pytest.raises(DistillationError, match="configured for"):
        afd(s[:1], t)


# ---------------------------------------------------------------------------------------------
# kr / reviewkd
# ---------------------------------------------------------------------------------------------


def test_hcl_by_hand():
    torch.manual_seed(0)
    fs, ft = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    mse = lambda a, b: ((a - b) ** 2).mean()  # noqa: E731
    # 4x4 map: the 4x4 level is skipped; 2x2 and 1x1 get weights 1/2 and 1/4
    expected = (mse(fs, ft) + 0.5 * mse(F.avg_pool2d(fs, 2), F.avg_pool2d(ft, 2))
                + 0.25 * mse(fs.mean((2, 3)), ft.mean((2, 3)))) / 1.75
    assert _hcl(fs, ft).item() == pytest.approx(float(expected), rel=1e-6)
    one = torch.randn(2, 3, 1, 1)
    assert _hcl(one, torch.zeros_like(one)).item() == pytest.approx(float((one**2).mean()), rel=1e-6)


def _kr_built(**params):
    s_shapes = [torch.Size([2, 3, 4, 4]), torch.Size([2, 5, 2, 2]), torch.Size([2, 5])]
    t_shapes = [torch.Size([2, 4, 4, 4]), torch.Size([2, 6, 2, 2]), torch.Size([2, 6])]
    kr = losses.build("kr", **params)
    kr.configure(LossContext(student_shape=s_shapes, teacher_shape=t_shapes))
    return kr, [torch.randn(s) for s in s_shapes], [torch.randn(t) for t in t_shapes]


def test_kr_value_against_review_mechanism():
    torch.manual_seed(0)
    kr, s, t = _kr_built(mid_channel=4)
    a0, a1, a2 = kr.abfs
    assert a2.att_conv is None and a0.att_conv is not None
    # deepest stage (pooled [B, C] -> [B, C, 1, 1]) alone
    x2 = a2.conv1(s[2][:, :, None, None])
    out2 = a2.conv2(x2)
    # middle stage: fuse with the upsampled deeper residual
    x1 = a1.conv1(s[1])
    y1 = x2.expand(-1, -1, 2, 2)  # nearest upsampling of a 1x1 map
    z1 = a1.att_conv(torch.cat([x1, y1], 1))
    x1 = x1 * z1[:, :1] + y1 * z1[:, 1:]
    out1 = a1.conv2(x1)
    x0 = a0.conv1(s[0])
    y0 = x1.repeat_interleave(2, 2).repeat_interleave(2, 3)  # nearest 2x2 -> 4x4
    z0 = a0.att_conv(torch.cat([x0, y0], 1))
    out0 = a0.conv2(x0 * z0[:, :1] + y0 * z0[:, 1:])
    expected = _hcl(out0, t[0]) + _hcl(out1, t[1]) + _hcl(out2, t[2][:, :, None, None])
    assert kr(s, t).item() == pytest.approx(float(expected.detach()), rel=1e-5)


def test_kr_properties_and_gradients():
    torch.manual_seed(0)
    kr, s, t = _kr_built()
    assert kr.abfs[0].conv1[0].out_channels == 5  # min(512, deepest student channels)
    s = [x.requires_grad_() for x in s]
    kr(s, t).backward()
    assert all(torch.any(x.grad != 0) for x in s)
    assert _params_have_grad(kr) == []
    full = kr(s, t).item()
    warm, _, _ = _kr_built(warmup_epochs=20)
    warm.load_state_dict(kr.state_dict())
    assert warm(s, t, epoch=5.0).item() == pytest.approx(full * 0.25, rel=1e-5)
    assert warm(s, t, epoch=40.0).item() == pytest.approx(full, rel=1e-5)
    assert torch.isfinite(kr([x.detach() * 1e4 for x in s], t))
    # teacher stage larger than the student's: the ABF output is upsampled to it
    kr2 = losses.build("kr")
    kr2.configure(LossContext(student_shape=[torch.Size([2, 3, 2, 2])], teacher_shape=[torch.Size([2, 4, 4, 4])]))
    assert torch.isfinite(kr2([torch.randn(2, 3, 2, 2)], [torch.randn(2, 4, 4, 4)]))
    assert torch.isfinite(kr2([torch.randn(1, 3, 2, 2)], [torch.randn(1, 4, 4, 4)]))  # batch of 1


def test_kr_batch_of_one_on_a_pooled_stage():
    torch.manual_seed(0)
    kr, s, t = _kr_built()  # the deepest stage is pooled [B, C]: 1x1 for the ABF's BatchNorms
    kr.train()
    with pytest.raises(DistillationError, match=r"kr: needs a batch of at least 2 examples in training.*stage 2.*1x1") as info:
        kr([x[:1] for x in s], [x[:1] for x in t])
    assert "per_device_train_batch_size" in str(info.value) and "pooled" in str(info.value)
    kr.eval()  # evaluation uses the running statistics: a batch of one is fine
    assert torch.isfinite(kr([x[:1] for x in s], [x[:1] for x in t]))
    kr.train()
    assert torch.isfinite(kr([x[:2] for x in s], [x[:2] for x in t]))


def test_kr_errors():
    with pytest.raises(RuntimeError, match="configure"):
        losses.build("reviewkd")([torch.randn(2, 3, 4, 4)], [torch.randn(2, 3, 4, 4)])
    with pytest.raises(LossParamError, match="'mid_channel'"):
        losses.build("kr", mid_channel=0)
    with pytest.raises(LossParamError, match="'warmup_epochs'"):
        losses.build("kr", warmup_epochs=-1)
    with pytest.raises(DistillationError, match="as many"):
        losses.build("kr").configure(LossContext(student_shape=[torch.Size([2, 3, 4, 4])], teacher_shape=[torch.Size([2, 3, 4, 4])] * 2))


# ---------------------------------------------------------------------------------------------
# srd
# ---------------------------------------------------------------------------------------------


def test_srd_value_against_formula():
    torch.manual_seed(0)
    srd = losses.build("srd")
    srd.configure(LossContext(student_shape=torch.Size([4, 3]), teacher_shape=torch.Size([4, 5])))
    zs, zt = torch.randn(4, 3), torch.randn(4, 5)
    w, b = srd.projector.weight.detach(), srd.projector.bias.detach()
    fs = _bn_train(zs @ w.t() + b, 1e-4)
    ft = _bn_train(zt, 1e-4)
    reference_sum = torch.log((fs - ft).abs().pow(4).sum())  # the authors' log-sum
    expected = reference_sum - math.log(4 * 5)  # ours: log-mean, same gradient
    assert srd(zs, zt).item() == pytest.approx(float(expected.detach()), rel=1e-5)
    # conv maps are globally average-pooled first
    srd4 = losses.build("srd", exponent=2.0)
    srd4.configure(LossContext(student_shape=torch.Size([4, 3, 2, 2]), teacher_shape=torch.Size([4, 5, 3, 3])))
    srd4.load_state_dict(srd.state_dict())
    xs, xt = torch.randn(4, 3, 2, 2), torch.randn(4, 5, 3, 3)
    fs = _bn_train(xs.mean((2, 3)) @ w.t() + b, 1e-4)
    ft = _bn_train(xt.mean((2, 3)), 1e-4)
    assert srd4(xs, xt).item() == pytest.approx(float(torch.log(((fs - ft) ** 2).mean())), rel=1e-5)


def test_srd_properties_and_gradients():
    torch.manual_seed(0)
    srd = losses.build("srd")
    srd.configure(LossContext(student_shape=torch.Size([4, 3]), teacher_shape=torch.Size([4, 3])))
    with torch.no_grad():
        srd.projector.weight.copy_(torch.eye(3))
        srd.projector.bias.zero_()
    z = torch.randn(4, 3, requires_grad=True)
    at_match = srd(z, z.detach())
    assert torch.isfinite(at_match) and at_match.item() < -80  # log of ~0: its minimum
    zt = torch.randn(4, 3)
    srd(z, zt).backward()
    assert torch.any(z.grad != 0)
    assert _params_have_grad(srd) == []
    assert torch.isfinite(srd(z.detach() * 1e4, zt))
    with pytest.raises(DistillationError, match="at least 2"):
        srd(z[:1], zt[:1])
    srd.eval()
    assert torch.isfinite(srd(z[:1], zt[:1]))
    with pytest.raises(LossParamError, match="'exponent'"):
        losses.build("srd", exponent=0)
    with pytest.raises(RuntimeError, match="configure"):
        losses.build("srd")(z, zt)


# ---------------------------------------------------------------------------------------------
# ickd
# ---------------------------------------------------------------------------------------------


def test_ickd_value_against_formula():
    torch.manual_seed(0)
    ickd = losses.build("ickd")
    ickd.configure(LossContext(student_shape=torch.Size([2, 3, 2, 2]), teacher_shape=torch.Size([2, 4, 3, 3])))
    s, t = torch.randn(2, 3, 2, 2), torch.randn(2, 4, 3, 3)  # spatial sizes may differ
    emb = ickd.embed(s).detach()
    total = 0.0
    for b in range(2):
        fs, ft = emb[b].reshape(4, -1), t[b].reshape(4, -1)
        gs, gt = fs @ fs.t(), ft @ ft.t()
        gs = gs / gs.norm(dim=1, keepdim=True)
        gt = gt / gt.norm(dim=1, keepdim=True)
        total += float(((gs - gt) ** 2).sum()) / 4
    assert ickd(s, t).item() == pytest.approx(total / 2, rel=1e-5)


def test_ickd_properties_and_gradients():
    torch.manual_seed(0)
    ickd = losses.build("ickd")
    ickd.configure(LossContext(student_shape=torch.Size([2, 3, 4, 4]), teacher_shape=torch.Size([2, 3, 4, 4])))
    with torch.no_grad():
        ickd.embed[0].weight.copy_(torch.eye(3).view(3, 3, 1, 1))
    ickd.eval()
    x = torch.randn(2, 3, 4, 4)
    assert ickd(x, x).item() == pytest.approx(0.0, abs=1e-6)
    ickd.train()
    s = torch.randn(2, 3, 4, 4, requires_grad=True)
    ickd(s, torch.randn(2, 3, 4, 4)).backward()
    assert torch.any(s.grad != 0)
    assert _params_have_grad(ickd) == []
    assert torch.isfinite(ickd(s.detach() * 1e4, torch.randn(2, 3, 4, 4) * 1e4))
    assert torch.isfinite(ickd(s.detach()[:1], torch.randn(1, 3, 4, 4)))
    hid = losses.build("ickd")
    hid.configure(LossContext(student_shape=torch.Size([2, 5, 8]), teacher_shape=torch.Size([2, 7, 6])))  # [B, T, D] hidden states
    assert torch.isfinite(hid(torch.randn(2, 5, 8), torch.randn(2, 7, 6)))
    with pytest.raises(RuntimeError, match="configure"):
        losses.build("ickd")(s, s)


# ---------------------------------------------------------------------------------------------
# cwd
# ---------------------------------------------------------------------------------------------


def test_cwd_hand_value():
    T = 4.0
    # one image, two channels, two positions
    s = torch.tensor([[[[0.0, 0.0]], [[1.0, 3.0]]]])
    t = torch.tensor([[[[8.0, 0.0]], [[1.0, 3.0]]]])
    p = math.exp(2.0) / (math.exp(2.0) + 1.0)  # softmax([8/T, 0])
    kl_channel0 = p * math.log(p / 0.5) + (1 - p) * math.log((1 - p) / 0.5)
    expected = T**2 * (kl_channel0 + 0.0) / 2
    assert losses.build("cwd")(s, t).item() == pytest.approx(expected, rel=1e-6)


def test_cwd_against_kl_div_and_properties():
    torch.manual_seed(0)
    s = torch.randn(2, 3, 4, 4, requires_grad=True)
    t = torch.randn(2, 3, 4, 4)
    T = 2.0
    kl = F.kl_div(F.log_softmax(s.reshape(6, -1) / T, 1), F.log_softmax(t.reshape(6, -1) / T, 1),
                  log_target=True, reduction="sum")
    cwd = losses.build("cwd", temperature=T)
    loss = cwd(s, t)
    assert loss.item() == pytest.approx(float(kl.detach()) * T**2 / 6, rel=1e-5)
    loss.backward()
    assert torch.any(s.grad != 0)
    assert cwd(t, t).item() == pytest.approx(0.0, abs=1e-7)
    assert torch.isfinite(cwd(s.detach() * 1e4, t * 1e4))
    assert torch.isfinite(cwd(s.detach()[:1], t[:1]))
    assert torch.isfinite(cwd(torch.randn(2, 5, 8), torch.randn(2, 5, 8)))  # [B, T, D]
    with pytest.raises(LossParamError, match="'temperature'"):
        losses.build("cwd", temperature=0)
    with pytest.raises(DistillationError, match="same shape"):
        cwd(s, torch.randn(2, 4, 4, 4))


# ---------------------------------------------------------------------------------------------
# Trainer runs (AB and PAD have stages; PAD has state)
# ---------------------------------------------------------------------------------------------


def _trainer(tmp_path, recipe, train, stage=None, distill_state=None, steps=3, student=None, teacher=None):
    from conftest import tiny_timm
    from test_trainer import make_args

    from hfdistill import DistillationTrainer

    return DistillationTrainer(
        model=student if student is not None else tiny_timm(seed=2),
        teacher=teacher if teacher is not None else tiny_timm(seed=1),
        recipe=recipe, stage=stage, distill_state=distill_state,
        args=make_args(tmp_path, max_steps=steps, per_device_train_batch_size=8, logging_steps=1),
        train_dataset=train,
    )


def _teacher_state(teacher: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in teacher.state_dict().items()}


def _assert_bit_identical(before: dict[str, torch.Tensor], teacher: nn.Module) -> None:
    after = teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


# ---------------------------------------------------------------------------------------------
# ab
# ---------------------------------------------------------------------------------------------


def _ab_reference(s_list, t_list, m=1.0) -> float:
    """Knowledge-Distillation-Zoo / RepDistiller's ABLoss without its 3/1000: the masked squares summed per layer,
    divided by the batch size, layer i of n weighted 2^(i - n + 1)."""
    n = len(s_list)
    total = 0.0
    for i, (s, t) in enumerate(zip(s_list, t_list)):
        loss = ((s + m) ** 2 * ((s > -m) & (t <= 0)).float() + (s - m) ** 2 * ((s <= m) & (t > 0)).float())
        total += 2 ** (i - n + 1) * float(loss.abs().sum()) / s.shape[0]
    return total


def test_ab_registered():
    info = losses.get_info("ab")
    assert info.reads == "features" and info.multi_layer and info.same_shape and not info.trainable
    assert "arXiv:1811.03233" in info.paper and info.params == ("margin",)


def test_ab_hand_computed_values():
    ab = losses.build("ab")  # margin 1
    # one example, four neurons: teacher active / active / inactive / inactive
    t = torch.tensor([[2.0, 0.5, -1.0, 0.0]])
    s = torch.tensor([[3.0, 0.25, -0.5, -2.0]])
    # active: (s - 1)^2 where s <= 1: neuron 1 -> 0.5625; inactive: (s + 1)^2 where s > -1: neuron 2 -> 0.25
    assert ab(s, t).item() == pytest.approx(0.5625 + 0.25)
    assert losses.build("ab", margin=0.5)(s, t).item() == pytest.approx(0.0625 + 0.0)
    # boundaries: s exactly at +m for an active neuron, -m for an inactive one: no loss
    assert ab(torch.tensor([[1.0, -1.0]]), torch.tensor([[1.0, -1.0]])).item() == 0.0
    # two layers: the shallower one is weighted 1/2; batch mean
    s2 = [torch.tensor([[0.0], [0.0]]), torch.tensor([[0.0], [2.0]])]
    t2 = [torch.tensor([[1.0], [1.0]]), torch.tensor([[1.0], [-1.0]])]
    # layer 0: (0-1)^2 twice -> 2 / 2 = 1, times 1/2; layer 1: 1 + (2+1)^2 = 10 -> 5
    assert ab(s2, t2).item() == pytest.approx(0.5 * 1 + 5.0)


def test_ab_value_against_reference_formula():
    torch.manual_seed(0)
    s_list = [torch.randn(3, 4, 4, 4) * 2, torch.randn(3, 6, 2, 2) * 2, torch.randn(3, 8, 1, 1) * 2]
    t_list = [torch.randn(3, 4, 4, 4), torch.randn(3, 6, 2, 2), torch.randn(3, 8, 1, 1)]
    for m in (1.0, 0.3):
        assert losses.build("ab", margin=m)(s_list, t_list).item() == pytest.approx(_ab_reference(s_list, t_list, m), rel=1e-5)
    # a single tensor is one layer of weight 1
    assert losses.build("ab")(s_list[0], t_list[0]).item() == pytest.approx(_ab_reference(s_list[:1], t_list[:1]), rel=1e-5)


def test_ab_gradients_push_across_the_boundary():
    s = torch.tensor([[0.5, 0.5, -3.0]], requires_grad=True)
    t = torch.tensor([[1.0, -1.0, -1.0]])
    losses.build("ab")(s, t).backward()
    # active teacher: push s up towards +1; inactive: push s down to -1; already beyond -1: no gradient
    assert s.grad[0, 0] < 0 and s.grad[0, 1] > 0 and s.grad[0, 2] == 0
    assert s.grad[0].tolist() == pytest.approx([2 * (0.5 - 1), 2 * (0.5 + 1), 0.0])


def test_ab_properties_and_errors():
    torch.manual_seed(0)
    t = torch.randn(2, 3, 4, 4)
    ab = losses.build("ab")
    assert ab(2 * torch.sign(t) + t, t).item() == 0.0  # beyond the margin on the teacher's side everywhere
    assert ab(t.bfloat16(), t.bfloat16()).dtype == torch.float32
    assert torch.isfinite(ab(t * 1e4, t))
    assert torch.isfinite(ab(t[:1], t[:1]))
    with pytest.raises(DistillationError, match="as many student as teacher layers"):
        ab([t, t], [t])
    with pytest.raises(DistillationError, match="same shape"):
        ab(torch.randn(2, 4, 4, 4), t)
    for bad in (-1.0, float("nan"), "1"):
        with pytest.raises(LossParamError, match="'margin'"):
            losses.build("ab", margin=bad)


AB_TAPS = ["layer1.-1.act2:input", "layer2.-1.act2:input", "layer4.-1.act2:input"]


def test_ab_two_stage_run_trains_student_layers_and_connectors(tmp_path, digits):
    """The initialisation stage: AB alone (no labels) trains the listed student layers and the conv1x1 connectors
    (adapters) on pre-ReLU taps; the classifier and the teacher do not change; the second stage is CE alone."""
    from conftest import tiny_timm

    recipe = {"stages": [
        {"name": "init", "task_weight": 0,
         "train": ["student.conv1", "student.bn1", "student.layer1", "student.layer2", "student.layer3",
                   "student.layer4", "adapters"],
         "terms": [{"name": "ab", "loss": "ab", "weight": 0.003, "student": AB_TAPS, "teacher": AB_TAPS,
                    "adapter": "conv1x1"}]},
        {"name": "classify", "task_weight": 1},
    ]}
    student, teacher = tiny_timm(seed=2), tiny_timm(seed=1)
    teacher_before = _teacher_state(teacher)
    fc_before = student.fc.weight.detach().clone()
    layer1_before = student.layer1[0].conv1.weight.detach().clone()
    train = digits[0].select(range(32))
    first = _trainer(tmp_path, recipe, stage="init", student=student, teacher=teacher, steps=2, train=train)
    adapters_before = {k: v.clone() for k, v in first.model.adapters.state_dict().items()}
    assert len(first.model.adapters["ab"]) == 3  # one connector per layer pair
    first.train()
    logged = [h["loss_ab"] for h in first.state.log_history if "loss_ab" in h]
    assert logged and all(math.isfinite(v) for v in logged)
    assert torch.equal(student.fc.weight, fc_before)  # the classifier is not part of the init stage
    assert not torch.equal(student.layer1[0].conv1.weight, layer1_before)
    assert any(not torch.equal(v, first.model.adapters.state_dict()[k]) for k, v in adapters_before.items())
    _assert_bit_identical(teacher_before, teacher)
    second = _trainer(tmp_path, recipe, stage="classify", distill_state=first.distill_state(), student=student,
                      teacher=teacher, steps=1, train=train)
    assert second.model.terms == []
    second.train()
    assert not torch.equal(student.fc.weight, fc_before)
    _assert_bit_identical(teacher_before, teacher)


# ---------------------------------------------------------------------------------------------
# pad
# ---------------------------------------------------------------------------------------------


def _pad_built(d=5, **params):
    pad = losses.build("pad", **params)
    pad.configure(LossContext(student_shape=torch.Size([4, d]), teacher_shape=torch.Size([4, d])))
    return pad


def test_pad_registered_and_branch():
    info = losses.get_info("pad")
    assert info.trainable and info.same_shape and not info.multi_layer and info.params == ("eps",)
    assert "arXiv:2008.01458" in info.paper
    pad = _pad_built(d=6)
    linear, bn = pad.variance_branch
    assert isinstance(linear, nn.Linear) and (linear.in_features, linear.out_features) == (6, 6)
    assert isinstance(bn, nn.BatchNorm1d) and bn.num_features == 6
    assert set(pad.state_dict()) >= {"variance_branch.0.weight", "variance_branch.1.running_mean"}


def test_pad_value_against_formula():
    torch.manual_seed(0)
    pad = _pad_built(d=5).train()
    s, t = torch.randn(4, 5), torch.randn(4, 5)
    linear, bn = pad.variance_branch
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
        v = _bn_train(s @ linear.weight.t() + linear.bias, bn.eps, bn.weight, bn.bias)  # log sigma^2, [4, 5]
    expected = 0.0
    for b in range(4):  # mean over examples of the mean over dimensions
        expected += sum(((t[b, d] - s[b, d]) ** 2 / (1e-6 + math.exp(v[b, d])) + v[b, d]).item() for d in range(5)) / 5
    assert pad(s, t).item() == pytest.approx(expected / 4, rel=1e-5)
    # eval mode: the branch's BatchNorm uses its running statistics
    pad.eval()
    with torch.no_grad():
        v = F.batch_norm(s @ linear.weight.t() + linear.bias, bn.running_mean, bn.running_var, bn.weight, bn.bias,
                         False, 0.0, bn.eps)
    expected = ((t - s) ** 2 / (1e-6 + v.exp()) + v).mean()
    assert pad(s, t).item() == pytest.approx(expected.item(), rel=1e-5)


def test_pad_with_zero_log_variance_is_the_l2_warmup_loss():
    torch.manual_seed(0)
    pad = _pad_built(d=5, eps=1e-3).train()
    with torch.no_grad():
        for p in pad.variance_branch.parameters():
            p.zero_()  # branch output 0 -> sigma^2 = 1
    s, t = torch.randn(4, 5), torch.randn(4, 5)
    assert pad(s, t).item() == pytest.approx(F.mse_loss(s, t).item() / (1 + 1e-3), rel=1e-6)


def test_pad_learns_larger_variance_for_examples_it_cannot_fit():
    """The mechanism: trained on its own, the branch predicts a larger sigma^2 for the examples with large errors,
    so their L2 is down-weighted; the per-element optimum of e^2 / sigma^2 + log sigma^2 is sigma^2 = e^2."""
    torch.manual_seed(0)
    pad = _pad_built(d=4).train()
    s = torch.cat([torch.randn(16, 4) + 3.0, torch.randn(16, 4) - 3.0])  # two groups the branch can tell apart
    noise = torch.cat([0.1 * torch.randn(16, 4), 3.0 * torch.randn(16, 4)])  # the second group is hard to fit
    t = s + noise
    opt = torch.optim.Adam(pad.parameters(), lr=0.05)
    for _ in range(300):
        opt.zero_grad()
        pad(s, t).backward()
        opt.step()
    pad.eval()
    with torch.no_grad():
        log_var = pad.log_variance(s)
    easy, hard = log_var[:16].mean().item(), log_var[16:].mean().item()
    assert hard - easy > 3.0  # about log(9 / 0.01) = 6.8 at the optimum
    assert math.exp(hard) == pytest.approx(noise[16:].pow(2).mean().item(), rel=0.5)


def test_pad_gradients_properties_and_errors():
    torch.manual_seed(0)
    pad = _pad_built(d=5).train()
    s = torch.randn(4, 5, requires_grad=True)
    pad(s, torch.randn(4, 5)).backward()
    assert torch.any(s.grad != 0) and _params_have_grad(pad.variance_branch) == []
    assert pad(s.detach().bfloat16(), torch.randn(4, 5).bfloat16()).dtype == torch.float32
    assert torch.isfinite(pad(s.detach() * 1e4, torch.randn(4, 5) * 1e4))
    # [B, C, 1, 1] embeddings are flattened
    pad4 = losses.build("pad")
    pad4.configure(LossContext(student_shape=torch.Size([4, 5, 1, 1]), teacher_shape=torch.Size([4, 5, 1, 1])))
    assert torch.isfinite(pad4(torch.randn(4, 5, 1, 1), torch.randn(4, 5, 1, 1)))
    with pytest.raises(DistillationError, match="batch of at least 2"):
        pad(torch.randn(1, 5), torch.randn(1, 5))
    pad.eval()
    assert torch.isfinite(pad(torch.randn(1, 5), torch.randn(1, 5)))  # running statistics: one example is fine
    with pytest.raises(RuntimeError, match="configure"):
        losses.build("pad")(torch.randn(4, 5), torch.randn(4, 5))
    with pytest.raises(DistillationError, match="adapter: linear"):
        losses.build("pad").configure(LossContext(student_shape=torch.Size([4, 3]), teacher_shape=torch.Size([4, 5])))
    with pytest.raises(DistillationError, match="configured for 5"):
        pad(torch.randn(4, 6), torch.randn(4, 6))
    for bad in (0, -1e-6, float("inf"), True):
        with pytest.raises(LossParamError, match="'eps'"):
            losses.build("pad", eps=bad)


def test_pad_two_stage_run_l2_warmup_then_pad(tmp_path, digits):
    """Warm-up with `mse` on the pooled features (a linear adapter), then `pad` under the same term name: the adapter
    carries over, the variance branch is created in the second stage and trains there; the teacher never changes."""
    from conftest import tiny_timm

    def stage(name, loss):
        return {"name": name, "task_weight": 1, "terms": [
            {"name": "embed", "loss": loss, "student": "features", "teacher": "features", "adapter": "linear"}]}

    recipe = {"stages": [stage("l2_warmup", "mse"), stage("pad", "pad")]}
    student = tiny_timm("test_resnet", seed=2)
    teacher = tiny_timm("test_efficientnet", seed=1)  # other embedding width: the adapter maps it
    teacher_before = _teacher_state(teacher)
    train = digits[0].select(range(32))
    first = _trainer(tmp_path, recipe, stage="l2_warmup", student=student, teacher=teacher, steps=2, train=train)
    first.train()
    warm = first.distill_state()
    assert set(warm) and all(k.startswith("adapters.embed.") for k in warm)
    second = _trainer(tmp_path, recipe, stage="pad", distill_state=warm, student=student, teacher=teacher, steps=2,
                      train=train)
    pad = second.model.losses["embed"]
    assert isinstance(pad, losses.get_info("pad").cls)
    for k, v in warm.items():
        torch.testing.assert_close(second.distill_state()[k], v)  # the warmed-up adapter is the one PAD starts from
    branch_before = {k: v.clone() for k, v in pad.variance_branch.state_dict().items()}
    second.train()
    logged = [h["loss_embed"] for h in second.state.log_history if "loss_embed" in h]
    assert logged and all(math.isfinite(v) for v in logged)
    assert any(not torch.equal(v, pad.variance_branch.state_dict()[k]) for k, v in branch_before.items())
    assert any(k.startswith("losses.embed.variance_branch") for k in second.distill_state())
    _assert_bit_identical(teacher_before, teacher)
