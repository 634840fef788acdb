"""Relation-based losses (hfdistill/losses/relations.py): pkt, rkd, sp, vid, cc, irg, fsp.

Each method is checked against its formula written out independently here (loops, einsum,
torch.distributions, hand-computed numbers), plus properties: zero/minimal at a perfect match,
gradients to the student (and to the method's own parameters), finiteness for large inputs and
batch size 1, and parameter validation.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from hfdistill.errors import DistillationError, LossParamError
from hfdistill.losses import build, get_info
from hfdistill.terms import LossContext


def _grad_reaches(loss_fn, student, teacher, **kw):
    student = student.clone().requires_grad_(True)
    loss = loss_fn(student, teacher, **kw)
    loss.backward()
    assert student.grad is not None and torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0
    return loss


# ------------------------------------------------------------------------------------------ registry


@pytest.mark.parametrize(
    "name, reads, trainable, multi_layer",
    [
        ("pkt", "relations", False, False),
        ("rkd", "relations", False, False),
        ("sp", "relations", False, True),
        ("vid", "features", True, False),
        ("cc", "relations", True, False),
        ("irg", "relations", False, True),
        ("fsp", "relations", False, True),
    ],
)
def test_registered(name, reads, trainable, multi_layer):
    info = get_info(name)
    assert info.reads == reads and info.trainable == trainable and info.multi_layer == multi_layer
    assert info.same_shape is False and info.default_tap is None
    assert info.description and info.paper and info.year >= 2017


# ------------------------------------------------------------------------------------------ pkt


def _pkt_reference(s, t, eps=1e-7):
    def probs(x):
        x = x.reshape(x.shape[0], -1).double()
        b = x.shape[0]
        k = torch.empty(b, b, dtype=torch.float64)
        for i in range(b):
            for j in range(b):
                k[i, j] = (F.cosine_similarity(x[i], x[j], dim=0, eps=1e-30) + 1) / 2
        return k / k.sum(1, keepdim=True)

    p, q = probs(s), probs(t)
    total = 0.0
    for i in range(p.shape[0]):
        for j in range(p.shape[0]):
            total += q[i, j] * math.log((q[i, j] + eps) / (p[i, j] + eps))
    return total / p.numel()


def test_pkt_matches_formula():
    torch.manual_seed(0)
    s, t = torch.randn(5, 3, 2, 2), torch.randn(5, 7)
    loss = build("pkt")(s, t)
    assert loss.item() == pytest.approx(float(_pkt_reference(s, t)), rel=1e-4, abs=1e-7)


def test_pkt_properties():
    torch.manual_seed(0)
    pkt = build("pkt")
    t = torch.randn(4, 6)
    assert pkt(t, t).item() == pytest.approx(0.0, abs=1e-7)
    assert pkt(3.0 * t, t).item() == pytest.approx(0.0, abs=1e-6)  # cosine kernel: scale invariant
    _grad_reaches(pkt, torch.randn(4, 8), t)
    big = pkt(torch.randn(4, 8) * 1e4, t * 1e4)
    assert torch.isfinite(big)
    assert pkt(torch.randn(1, 8), torch.randn(1, 3)).item() == pytest.approx(0.0, abs=1e-7)  # batch size 1
    assert torch.isfinite(pkt(torch.zeros(3, 4), torch.randn(3, 4)))  # zero features: no NaN
    assert pkt(torch.randn(4, 6, dtype=torch.bfloat16), t.bfloat16()).dtype == torch.float32


def test_pkt_validation():
    with pytest.raises(LossParamError, match="'eps'"):
        build("pkt", eps=0.0)
    with pytest.raises(DistillationError, match="batch sizes differ"):
        build("pkt")(torch.randn(3, 2), torch.randn(4, 2))


# ------------------------------------------------------------------------------------------ rkd


def _huber(x, y):
    d = (x - y).abs()
    return torch.where(d <= 1, 0.5 * d * d, d - 0.5)


def _rkd_reference(s, t, wd=25.0, wa=50.0):
    def dist(x):
        x = x.reshape(x.shape[0], -1).double()
        d = torch.cdist(x, x)
        b = x.shape[0]
        return d / (d.sum() / (b * (b - 1)))

    def angle(x):
        x = x.reshape(x.shape[0], -1).double()
        b = x.shape[0]
        a = torch.zeros(b, b, b, dtype=torch.float64)
        for i in range(b):
            for j in range(b):
                for k in range(b):
                    if i != j and k != j:
                        e_ij = (x[i] - x[j]) / (x[i] - x[j]).norm()
                        e_kj = (x[k] - x[j]) / (x[k] - x[j]).norm()
                        a[i, j, k] = e_ij @ e_kj
        return a

    return wd * _huber(dist(s), dist(t)).mean() + wa * _huber(angle(s), angle(t)).mean()


def test_rkd_matches_formula():
    torch.manual_seed(0)
    s, t = torch.randn(4, 2, 3), torch.randn(4, 5)
    loss = build("rkd")(s, t)
    assert loss.item() == pytest.approx(float(_rkd_reference(s, t)), rel=1e-4)
    only_angle = build("rkd", distance_weight=0.0, angle_weight=1.0)(s, t)
    assert only_angle.item() == pytest.approx(float(_rkd_reference(s, t, 0.0, 1.0)), rel=1e-4)


def test_rkd_hand_computed_distance():
    # Collinear points: the angle terms agree (0/180 degrees in both), only distances differ.
    # teacher 0,1,3: distances 1,3,2, mean 2 -> 0.5,1.5,1; student 0,1,2: 1,2,1, mean 4/3 -> 0.75,1.5,0.75.
    # Differences 0.25, 0, -0.25 -> huber 1/32 each, each pair twice in the 3x3 matrix: (4/32) / 9.
    t = torch.tensor([[0.0], [1.0], [3.0]])
    s = torch.tensor([[0.0], [1.0], [2.0]])
    assert build("rkd")(s, t).item() == pytest.approx(25 * (4 / 32) / 9, rel=1e-5)


def test_rkd_properties():
    torch.manual_seed(0)
    rkd = build("rkd")
    t = torch.randn(5, 6)
    assert rkd(t, t).item() == pytest.approx(0.0, abs=1e-6)
    assert rkd(4.0 * t, t).item() == pytest.approx(0.0, abs=1e-5)  # both potentials are scale invariant
    _grad_reaches(rkd, torch.randn(5, 3), t)
    # duplicate examples (zero distances) keep gradients finite
    dup = torch.randn(5, 3)
    dup[1] = dup[0]
    _grad_reaches(rkd, dup, t)
    assert torch.isfinite(rkd(torch.randn(5, 3) * 1e4, t * 1e4))
    with pytest.raises(DistillationError, match="at least 2"):
        rkd(torch.randn(1, 3), torch.randn(1, 3))


def test_rkd_validation():
    with pytest.raises(LossParamError, match="'distance_weight'"):
        build("rkd", distance_weight=-1.0)
    with pytest.raises(LossParamError, match="'angle_weight'"):
        build("rkd", angle_weight=-1.0)


# ------------------------------------------------------------------------------------------ sp


def _sp_reference(s, t):
    def g(x):
        a = x.reshape(x.shape[0], -1).double()
        gram = torch.einsum("id,jd->ij", a, a)
        return gram / gram.pow(2).sum(1, keepdim=True).sqrt()

    b = s.shape[0]
    return ((g(t) - g(s)) ** 2).sum() / b**2


def test_sp_matches_formula_and_hand_value():
    torch.manual_seed(0)
    s, t = torch.randn(4, 3, 2, 2), torch.randn(4, 10)
    sp = build("sp")
    assert sp(s, t).item() == pytest.approx(float(_sp_reference(s, t)), rel=1e-5)
    # student rows orthogonal (G = I), teacher rows equal (G rows = [1,1]/sqrt2): (4 - 2 sqrt2) / 4
    s2 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    t2 = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    assert sp(s2, t2).item() == pytest.approx((4 - 2 * math.sqrt(2)) / 4, rel=1e-6)


def test_sp_multi_layer_sums_pairs():
    torch.manual_seed(0)
    s = [torch.randn(3, 4, 2, 2), torch.randn(3, 5)]
    t = [torch.randn(3, 8, 1, 1), torch.randn(3, 2, 3)]
    sp = build("sp")
    assert sp(s, t).item() == pytest.approx((sp(s[0], t[0]) + sp(s[1], t[1])).item(), rel=1e-6)
    with pytest.raises(DistillationError, match="same number"):
        sp(s, t[:1])


def test_sp_properties():
    torch.manual_seed(0)
    sp = build("sp")
    t = torch.randn(4, 6)
    assert sp(t, t).item() == pytest.approx(0.0, abs=1e-7)
    assert sp(5.0 * t, t).item() == pytest.approx(0.0, abs=1e-6)
    _grad_reaches(sp, torch.randn(4, 3), t)
    assert torch.isfinite(sp(torch.randn(4, 3) * 1e4, t * 1e4))
    assert sp(torch.randn(1, 3), torch.randn(1, 5)).item() == pytest.approx(0.0, abs=1e-7)


# ------------------------------------------------------------------------------------------ vid


def _vid_reference(vid, s, t):
    """-log N(t; mu(s), var) - 0.5 log(2 pi), averaged, with the regressor applied by einsum."""
    w = [m.weight.detach().double() for m in vid.regressor if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    x = s.double()
    for i, wi in enumerate(w):
        wi = wi.reshape(wi.shape[0], wi.shape[1])
        x = torch.einsum("oc,bchw->bohw", wi, x) if x.dim() == 4 else torch.einsum("oc,...c->...o", wi, x)
        if i < len(w) - 1:
            x = x.clamp_min(0)
    var = torch.log1p(torch.exp(vid.alpha.detach().double())) + vid.eps
    if x.dim() == 4:
        var = var.view(1, -1, 1, 1)
    log_prob = torch.distributions.Normal(x, var.sqrt()).log_prob(t.double())
    return (-log_prob - 0.5 * math.log(2 * math.pi)).mean()


def test_vid_matches_formula_conv_and_linear():
    torch.manual_seed(0)
    for s_shape, t_shape in [((2, 3, 4, 4), (2, 5, 4, 4)), ((2, 3), (2, 6)), ((2, 4, 3), (2, 4, 6))]:
        vid = build("vid")
        vid.configure(LossContext(student_shape=torch.Size(s_shape), teacher_shape=torch.Size(t_shape)))
        s, t = torch.randn(s_shape), torch.randn(t_shape)
        assert vid(s, t).item() == pytest.approx(float(_vid_reference(vid, s, t)), rel=1e-5)
    assert isinstance(vid.regressor[0], torch.nn.Linear)


def test_vid_initial_variance_and_perfect_prediction():
    vid = build("vid", init_pred_var=5.0, mid_channels=3)
    vid.configure(LossContext(student_shape=torch.Size([2, 3, 2, 2]), teacher_shape=torch.Size([2, 3, 2, 2])))
    var = F.softplus(vid.alpha) + vid.eps
    assert torch.allclose(var, torch.full((3,), 5.0), atol=1e-5)
    with torch.no_grad():  # identity regressor: mu(s) = s for s >= 0
        for m in vid.regressor:
            if isinstance(m, torch.nn.Conv2d):
                m.weight.copy_(torch.eye(3).view(3, 3, 1, 1))
    x = torch.rand(2, 3, 2, 2)
    assert vid(x, x).item() == pytest.approx(0.5 * math.log(5.0), rel=1e-5)  # only the log-variance term


def test_vid_pools_the_larger_spatial_size():
    torch.manual_seed(0)
    vid = build("vid")
    vid.configure(LossContext(student_shape=torch.Size([2, 3, 8, 8]), teacher_shape=torch.Size([2, 4, 4, 4])))
    s, t = torch.randn(2, 3, 8, 8), torch.randn(2, 4, 4, 4)
    assert vid(s, t).item() == pytest.approx(vid(F.avg_pool2d(s, 2), t).item(), rel=1e-6)
    # student smaller than teacher: the teacher is pooled down to the student's size
    vid2 = build("vid")
    vid2.configure(LossContext(student_shape=torch.Size([2, 3, 2, 2]), teacher_shape=torch.Size([2, 4, 4, 4])))
    s2 = torch.randn(2, 3, 2, 2)
    assert vid2(s2, t).item() == pytest.approx(vid2(s2, F.avg_pool2d(t, 2)).item(), rel=1e-6)


def test_vid_gradients_and_finiteness():
    torch.manual_seed(0)
    vid = build("vid")
    vid.configure(LossContext(student_shape=torch.Size([2, 3, 2, 2]), teacher_shape=torch.Size([2, 5, 2, 2])))
    _grad_reaches(vid, torch.randn(2, 3, 2, 2), torch.randn(2, 5, 2, 2))
    assert vid.alpha.grad is not None and vid.alpha.grad.abs().sum() > 0
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in vid.regressor.parameters())
    assert torch.isfinite(vid(torch.randn(2, 3, 2, 2) * 1e4, torch.randn(2, 5, 2, 2) * 1e4))
    assert torch.isfinite(vid(torch.randn(1, 3, 2, 2), torch.randn(1, 5, 2, 2)))  # batch size 1
    assert sum(1 for _ in vid.parameters()) == 4  # 3 convs (no bias) + alpha


def test_vid_errors():
    with pytest.raises(RuntimeError, match="vid: configure"):
        build("vid")(torch.randn(2, 3, 2, 2), torch.randn(2, 5, 2, 2))
    with pytest.raises(LossParamError, match="'eps'"):
        build("vid", eps=0.0)
    with pytest.raises(LossParamError, match="'init_pred_var'"):
        build("vid", init_pred_var=0.0)
    with pytest.raises(LossParamError, match="'mid_channels'"):
        build("vid", mid_channels=0)
    vid = build("vid")
    with pytest.raises(DistillationError, match="vid: student"):
        vid.configure(LossContext(student_shape=torch.Size([2, 3, 2, 2]), teacher_shape=torch.Size([2, 5])))
    vid.configure(LossContext(student_shape=torch.Size([2, 3, 2, 2]), teacher_shape=torch.Size([2, 5, 2, 2])))
    with pytest.raises(DistillationError, match="channels"):
        vid(torch.randn(2, 4, 2, 2), torch.randn(2, 5, 2, 2))


# ------------------------------------------------------------------------------------------ cc


def test_cc_taylor_kernel_matches_formula():
    torch.manual_seed(0)
    s, t = torch.randn(4, 6), torch.randn(4, 3, 2)
    gamma = 0.4

    def corr_p2(x):  # exp(-2g) * (1 + 2g c + (2g c)^2 / 2)
        z = F.normalize(x.reshape(x.shape[0], -1).double(), dim=1)
        c = z @ z.t()
        return math.exp(-2 * gamma) * (1 + 2 * gamma * c + (2 * gamma * c) ** 2 / 2)

    expected = ((corr_p2(t) - corr_p2(s)) ** 2).sum() / 16
    assert build("cc", embed_dim=None)(s, t).item() == pytest.approx(float(expected), rel=1e-5)

    # a high-order expansion equals the Gaussian RBF itself
    def rbf(x):
        z = F.normalize(x.reshape(x.shape[0], -1).double(), dim=1)
        return torch.exp(-gamma * torch.cdist(z, z) ** 2)

    exact = ((rbf(t) - rbf(s)) ** 2).sum() / 16
    assert build("cc", embed_dim=None, p_order=25)(s, t).item() == pytest.approx(float(exact), rel=1e-4)


def test_cc_with_embedding_heads():
    torch.manual_seed(0)
    cc = build("cc", embed_dim=8)
    s, t = torch.randn(3, 2, 2, 2), torch.randn(3, 5)
    with pytest.raises(RuntimeError, match="cc: configure"):
        cc(s, t)
    cc.configure(LossContext(student_shape=s.shape, teacher_shape=t.shape))
    zs = F.normalize(s.reshape(3, -1) @ cc.student_embed.weight.t() + cc.student_embed.bias, dim=1)
    zt = F.normalize(t @ cc.teacher_embed.weight.t() + cc.teacher_embed.bias, dim=1)
    k = lambda z: math.exp(-0.8) * (1 + 0.8 * (z @ z.t()) + 0.32 * (z @ z.t()) ** 2)  # noqa: E731
    expected = ((k(zt) - k(zs)) ** 2).sum() / 9
    s = s.requires_grad_(True)
    loss = cc(s, t)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    loss.backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert cc.student_embed.weight.grad.abs().sum() > 0 and cc.teacher_embed.weight.grad.abs().sum() > 0


def test_cc_properties_and_validation():
    torch.manual_seed(0)
    cc = build("cc", embed_dim=None)
    t = torch.randn(4, 6)
    assert cc(t, t).item() == pytest.approx(0.0, abs=1e-7)
    _grad_reaches(cc, torch.randn(4, 3), t)
    assert torch.isfinite(cc(torch.randn(4, 3) * 1e4, t * 1e4))
    assert cc(torch.randn(1, 3), torch.randn(1, 6)).item() == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(LossParamError, match="'gamma'"):
        build("cc", gamma=0.0)
    with pytest.raises(LossParamError, match="'p_order'"):
        build("cc", p_order=-1)
    with pytest.raises(LossParamError, match="'embed_dim'"):
        build("cc", embed_dim=0)


# ------------------------------------------------------------------------------------------ irg


def _irg_reference(s_list, t_list, wv=0.1, we=5.0, wt=5.0, pairs=None):
    def vec(x):
        x = x.double()
        return x.mean((2, 3)) if x.dim() == 4 else x.reshape(x.shape[0], -1)

    def edges(v):
        b = v.shape[0]
        a = torch.zeros(b, b, dtype=torch.float64)
        for i in range(b):
            for j in range(b):
                a[i, j] = ((v[i] - v[j]) ** 2).sum()
        return a / a.max()

    sv, tv = [vec(x) for x in s_list], [vec(x) for x in t_list]
    vertex = ((tv[-1] - sv[-1]) ** 2).mean()
    edge = sum(((edges(b) - edges(a)) ** 2).mean() for a, b in zip(sv, tv)) / len(sv)
    pairs = pairs if pairs is not None else [(i, i + 1) for i in range(len(sv) - 1)]
    trans = 0.0
    for a, b in pairs:
        ls = ((sv[a] - sv[b]) ** 2).sum(1)
        lt = ((tv[a] - tv[b]) ** 2).sum(1)
        trans = trans + ((lt / lt.max() - ls / ls.max()) ** 2).mean()
    trans = trans / len(pairs) if pairs else 0.0
    return wv * vertex + we * edge + wt * trans


def test_irg_hand_computed_single_layer():
    # teacher 0,1,3: squared distances 1,9,4 -> /9; student 0,1,2: 1,4,1 -> /4.
    # edge differences -5/36, 0, 7/36 (each twice of 9 entries); vertex: (0 + 0 + 1) / 3.
    t = torch.tensor([[0.0], [1.0], [3.0]])
    s = torch.tensor([[0.0], [1.0], [2.0]])
    expected = 0.1 * (1 / 3) + 5.0 * (2 * (25 + 49) / 1296) / 9
    assert build("irg")(s, t).item() == pytest.approx(expected, rel=1e-6)


def test_irg_multi_layer_matches_formula():
    torch.manual_seed(0)
    s = [torch.randn(4, 3, 2, 2), torch.randn(4, 3, 1, 1), torch.randn(4, 5)]
    t = [torch.randn(4, 6, 3, 3), torch.randn(4, 6), torch.randn(4, 5)]
    irg = build("irg", transform_pairs=[[0, 1]])
    assert irg(s, t).item() == pytest.approx(float(_irg_reference(s, t, pairs=[(0, 1)])), rel=1e-5)
    # default pairs are consecutive taps; here tap 1 -> 2 changes width, which is an error
    with pytest.raises(DistillationError, match="transform_pairs"):
        build("irg")(s, t)
    no_t = build("irg", transform_weight=0.0)
    assert no_t(s, t).item() == pytest.approx(float(_irg_reference(s, t, wt=0.0, pairs=[])), rel=1e-5)


def test_irg_properties():
    torch.manual_seed(0)
    irg = build("irg")
    t = [torch.randn(4, 3, 2, 2), torch.randn(4, 3)]
    assert irg(t, t).item() == pytest.approx(0.0, abs=1e-7)
    s = [x.clone().requires_grad_(True) for x in (torch.randn(4, 3, 2, 2), torch.randn(4, 3))]
    irg(s, t).backward()
    assert all(x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0 for x in s)
    assert torch.isfinite(irg([x * 1e4 for x in s], [x * 1e4 for x in t]))
    one = irg([torch.randn(1, 3, 2, 2), torch.randn(1, 3)], [torch.randn(1, 3, 2, 2), torch.randn(1, 3)])
    assert torch.isfinite(one)


def test_irg_errors():
    with pytest.raises(LossParamError, match="'vertex_weight'"):
        build("irg", vertex_weight=-1.0)
    with pytest.raises(LossParamError, match="'transform_pairs'"):
        build("irg", transform_pairs=[[0, 0]])
    with pytest.raises(LossParamError, match="'transform_pairs'"):
        build("irg", transform_pairs=[[0]])
    with pytest.raises(DistillationError, match="vertex_weight: 0"):
        build("irg")(torch.randn(3, 4), torch.randn(3, 5))
    assert torch.isfinite(build("irg", vertex_weight=0.0)(torch.randn(3, 4), torch.randn(3, 5)))
    with pytest.raises(DistillationError, match="tap index"):
        build("irg", transform_pairs=[[0, 3]])([torch.randn(3, 4)] * 2, [torch.randn(3, 4)] * 2)
    with pytest.raises(DistillationError, match="same number"):
        build("irg")([torch.randn(3, 4)] * 2, [torch.randn(3, 4)])


# ------------------------------------------------------------------------------------------ fsp


def _fsp_reference(pairs_s, pairs_t):
    def g(a, b):
        if a.shape[-1] > b.shape[-1]:
            a = F.avg_pool2d(a, a.shape[-1] // b.shape[-1])
        a, b = a.double(), b.double()
        return torch.einsum("bihw,bjhw->bij", a, b) / (a.shape[2] * a.shape[3])

    total = 0.0
    for (sa, sb), (ta, tb) in zip(pairs_s, pairs_t):
        total = total + ((g(ta, tb) - g(sa, sb)) ** 2).sum((1, 2)).mean()
    return total


def test_fsp_hand_computed():
    # one example, one channel, 1x2 maps: G_s = (1*3 + 2*4) / 2 = 5.5, G_t = 1 -> 4.5^2
    s = [torch.tensor([[[[1.0, 2.0]]]]), torch.tensor([[[[3.0, 4.0]]]])]
    t = [torch.ones(1, 1, 1, 2), torch.ones(1, 1, 1, 2)]
    assert build("fsp")(s, t).item() == pytest.approx(20.25)


def test_fsp_matches_formula_two_pairs_with_pooling():
    torch.manual_seed(0)
    s = [torch.randn(2, 3, 4, 4), torch.randn(2, 5, 2, 2), torch.randn(2, 5, 2, 2), torch.randn(2, 4, 2, 2)]
    t = [torch.randn(2, 3, 8, 8), torch.randn(2, 5, 4, 4), torch.randn(2, 5, 4, 4), torch.randn(2, 4, 4, 4)]
    expected = _fsp_reference([(s[0], s[1]), (s[2], s[3])], [(t[0], t[1]), (t[2], t[3])])
    assert build("fsp")(s, t).item() == pytest.approx(float(expected), rel=1e-5)


def test_fsp_sequences():
    torch.manual_seed(0)
    s, t = [torch.randn(2, 6, 3), torch.randn(2, 6, 4)], [torch.randn(2, 8, 3), torch.randn(2, 8, 4)]
    g = lambda a, b: torch.einsum("btc,btd->bcd", a, b) / a.shape[1]  # noqa: E731
    expected = ((g(*t) - g(*s)) ** 2).sum((1, 2)).mean()
    assert build("fsp")(s, t).item() == pytest.approx(expected.item(), rel=1e-5)


def test_fsp_properties():
    torch.manual_seed(0)
    fsp = build("fsp")
    t = [torch.randn(2, 3, 4, 4), torch.randn(2, 5, 4, 4)]
    assert fsp(t, t).item() == 0.0
    s = [x.clone().requires_grad_(True) for x in (torch.randn(2, 3, 4, 4), torch.randn(2, 5, 2, 2))]
    fsp(s, t).backward()
    assert all(x.grad is not None and x.grad.abs().sum() > 0 for x in s)
    assert torch.isfinite(fsp([x * 1e4 for x in s], [x * 1e4 for x in t]))
    assert torch.isfinite(fsp([torch.randn(1, 3, 2, 2), torch.randn(1, 5, 2, 2)], [x[:1] for x in t]))


def test_fsp_errors():
    fsp = build("fsp")
    t = [torch.randn(2, 3, 4, 4), torch.randn(2, 5, 4, 4)]
    with pytest.raises(DistillationError, match="2k layers"):
        fsp(torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4))
    with pytest.raises(DistillationError, match="2k layers"):
        fsp(t + t[:1], t + t[:1])
    with pytest.raises(DistillationError, match="adapter"):
        fsp([torch.randn(2, 4, 4, 4), torch.randn(2, 5, 4, 4)], t)
    with pytest.raises(DistillationError, match="pair"):
        fsp(t + t, t)
    with pytest.raises(DistillationError, match="both layers"):
        fsp([torch.randn(2, 3, 4, 4), torch.randn(2, 4, 5)], [torch.randn(2, 3, 4, 4), torch.randn(2, 4, 5)])


# ------------------------------------------------------------------------------------------ kdsvd


def _kdsvd_reference(s_list, t_list, k=1, sigma=8.0) -> float:
    """KD-SVD written with numpy's SVD, per example and with explicit loops (alignment, weights, RBF)."""
    import numpy as np

    def matrix(x, b):  # [C, H, W] -> [H*W, C]
        x = x[b].double().numpy()
        return x.reshape(x.shape[0], -1).T

    total = 0.0
    n = len(s_list)
    for l in range(n - 1):
        per_example = []
        for b in range(s_list[0].shape[0]):
            mats_s = [matrix(s_list[j], b) for j in (l, l + 1)]
            mats_t = [matrix(t_list[j], b) for j in (l, l + 1)]
            kk = min([k] + [min(m.shape) for m in mats_s + mats_t])
            dfv_s, dfv_t = [], []
            for x_s, x_t in zip(mats_s, mats_t):
                _, sig_t, vh_t = np.linalg.svd(x_t, full_matrices=False)
                _, _, vh_s = np.linalg.svd(x_s, full_matrices=False)
                v_t = vh_t[:kk].T.copy()
                for m in range(kk):  # the teacher's sign: largest-magnitude entry positive
                    if v_t[np.argmax(np.abs(v_t[:, m])), m] < 0:
                        v_t[:, m] *= -1
                candidates = vh_s[: kk + 1].T
                aligned = np.zeros_like(v_t)
                for m in range(kk):
                    cos = [float(candidates[:, i] @ v_t[:, m]) for i in range(candidates.shape[1])]
                    best = int(np.argmax(np.abs(cos)))
                    aligned[:, m] = candidates[:, best] * (1.0 if cos[best] >= 0 else -1.0)
                w = sig_t[:kk] / np.linalg.norm(sig_t[:kk])
                dfv_s.append(aligned * w)
                dfv_t.append(v_t * w)
            loss = 0.0
            (a_s, b_s), (a_t, b_t) = dfv_s, dfv_t
            for i in range(a_s.shape[0]):
                for j in range(b_s.shape[0]):
                    for m in range(kk):
                        g_s = math.exp(-((a_s[i, m] - b_s[j, m]) ** 2) / sigma)
                        g_t = math.exp(-((a_t[i, m] - b_t[j, m]) ** 2) / sigma)
                        loss += (g_s - g_t) ** 2
            per_example.append(loss)
        total += sum(per_example) / len(per_example)
    return total


def _kdsvd_maps(seed, shapes):
    torch.manual_seed(seed)
    return [torch.randn(*shape) for shape in shapes]


def test_kdsvd_registered():
    info = get_info("kdsvd")
    assert info.reads == "relations" and info.multi_layer and not info.trainable and not info.same_shape
    assert "arXiv:1807.06819" in info.paper and info.params == ("k", "sigma")


@pytest.mark.parametrize("k", [1, 2])
def test_kdsvd_value_against_numpy_reference(k):
    shapes = [(3, 4, 4, 4), (3, 6, 2, 2), (3, 5, 2, 2)]
    s, t = _kdsvd_maps(0, shapes), _kdsvd_maps(1, [(3, 4, 2, 2), (3, 6, 4, 4), (3, 5, 1, 1)])  # sizes may differ
    got = build("kdsvd", k=k)(s, t).item()
    assert got == pytest.approx(_kdsvd_reference(s, t, k=k), rel=1e-4, abs=1e-8)
    assert build("kdsvd", k=k, sigma=2.0)(s, t).item() == pytest.approx(_kdsvd_reference(s, t, k=k, sigma=2.0), rel=1e-4)


def test_kdsvd_top_vectors_backward_matches_torch_svd_and_stays_finite():
    """The custom backward equals torch.linalg.svd's autograd where that is finite (full rank), passes gradcheck
    (also with fewer positions than channels), and stays finite on a rank-deficient map where torch's gives NaN."""
    from hfdistill.losses.relations import kdsvd_top_vectors

    torch.manual_seed(0)
    w = torch.randn(3, 6, 2, dtype=torch.float64)

    def objective(v):  # depends on the vectors only through sign-invariant products
        return (v.pow(2) * w).sum() + (v[:, :, 0] * v[:, :, 1]).sum(1).pow(2).sum()

    x = torch.randn(3, 10, 6, dtype=torch.float64, requires_grad=True)
    (ours,) = torch.autograd.grad(objective(kdsvd_top_vectors(x, 2)[0]), x)
    vh = torch.linalg.svd(x, full_matrices=False)[2]
    (theirs,) = torch.autograd.grad(objective(vh[:, :2].transpose(1, 2)), x)
    torch.testing.assert_close(ours, theirs)
    assert torch.autograd.gradcheck(lambda x: objective(kdsvd_top_vectors(x, 2)[0]), (x,))
    wide = torch.randn(3, 4, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: objective(kdsvd_top_vectors(x, 2)[0]), (wide,))
    # dead channels (post-ReLU maps): repeated zero singular values
    dead = torch.randn(3, 10, 6, dtype=torch.float64).relu()
    dead[:, :, 4:] = 0
    dead.requires_grad_(True)
    (ours,) = torch.autograd.grad(objective(kdsvd_top_vectors(dead, 2)[0]), dead)
    assert torch.isfinite(ours).all() and ours.abs().sum() > 0
    vh = torch.linalg.svd(dead, full_matrices=False)[2]
    (theirs,) = torch.autograd.grad(objective(vh[:, :2].transpose(1, 2)), dead)
    assert not torch.isfinite(theirs).all()  # why the loss has its own backward
    _, sigma = kdsvd_top_vectors(dead, 2)
    torch.testing.assert_close(sigma, torch.linalg.svdvals(dead.detach())[:, :2])


def test_kdsvd_invariances_and_zero():
    """The knowledge is the singular vectors: independent of the SVD's signs (negating either network's maps changes
    nothing), of the order of positions, and of the maps' scale; a student equal to the teacher has loss 0."""
    kdsvd = build("kdsvd", k=2)
    shapes = [(2, 4, 3, 3), (2, 5, 2, 2), (2, 3, 2, 2)]
    s, t = _kdsvd_maps(0, shapes), _kdsvd_maps(1, shapes)
    value = kdsvd(s, t).item()
    assert value > 0
    assert kdsvd([-x for x in s], t).item() == pytest.approx(value, rel=1e-5)
    assert kdsvd(s, [-x for x in t]).item() == pytest.approx(value, rel=1e-5)
    assert kdsvd([3.0 * x for x in s], t).item() == pytest.approx(value, rel=1e-5)
    shuffled = [x.flatten(2)[:, :, torch.randperm(x.shape[2] * x.shape[3])].view_as(x) for x in s]
    assert kdsvd(shuffled, t).item() == pytest.approx(value, rel=1e-5)
    assert kdsvd(t, t).item() == pytest.approx(0.0, abs=1e-10)


def test_kdsvd_gradients_and_properties():
    kdsvd = build("kdsvd")
    shapes = [(2, 4, 3, 3), (2, 5, 2, 2)]
    t = _kdsvd_maps(1, shapes)
    s = [x.requires_grad_(True) for x in _kdsvd_maps(0, shapes)]
    kdsvd(s, t).backward()
    assert all(torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0 for x in s)
    dead = [x.detach().relu() for x in _kdsvd_maps(2, shapes)]
    dead[0][:, :2] = 0  # dead channels: rank-deficient maps
    dead = [x.requires_grad_(True) for x in dead]
    kdsvd(dead, t).backward()
    assert all(torch.isfinite(x.grad).all() for x in dead)
    assert kdsvd([x.detach().bfloat16() for x in s], [x.bfloat16() for x in t]).dtype == torch.float32
    assert torch.isfinite(kdsvd([x.detach() * 1e4 for x in s], [x * 1e4 for x in t]))
    assert torch.isfinite(kdsvd([x.detach()[:1] for x in s], [x[:1] for x in t]))  # batch of one
    one_by_one = [torch.randn(2, 4, 1, 1), torch.randn(2, 5, 1, 1)]  # rank 1 maps
    assert torch.isfinite(build("kdsvd", k=3)(one_by_one, one_by_one))
    seq = [torch.randn(2, 6, 4), torch.randn(2, 6, 5)]  # [B, T, D]: tokens as positions
    assert torch.isfinite(kdsvd(seq, [torch.randn(2, 6, 4), torch.randn(2, 6, 5)]))


def test_kdsvd_errors():
    kdsvd = build("kdsvd")
    t = [torch.randn(2, 4, 3, 3), torch.randn(2, 5, 2, 2)]
    with pytest.raises(DistillationError, match="at least 2 taps"):
        kdsvd(t[0], t[0])
    with pytest.raises(DistillationError, match="adapter: conv1x1"):
        kdsvd([torch.randn(2, 3, 3, 3), t[1]], t)
    with pytest.raises(DistillationError, match="same number"):
        kdsvd(t, t[:1])
    with pytest.raises(DistillationError, match=r"\[B, C, H, W\]"):
        kdsvd([torch.randn(2, 4), torch.randn(2, 5)], [torch.randn(2, 4), torch.randn(2, 5)])
    for name, value in [("k", 0), ("k", 1.5), ("sigma", 0.0), ("sigma", -8.0)]:
        with pytest.raises(LossParamError, match=f"'{name}'"):
            build("kdsvd", **{name: value})


def test_kdsvd_trainer_run(tmp_path, digits):
    """Stage ends through conv1x1 adapters (the student's widths differ from the teacher's): finite term, gradients
    reach the student and the adapters; the teacher does not change."""
    from conftest import tiny_timm
    from test_trainer import make_args

    from hfdistill import DistillationTrainer

    student, teacher = tiny_timm(seed=2), tiny_timm(seed=1)
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    taps = ["layer1", "layer2", "layer4"]
    recipe = {"terms": [{"name": "kdsvd", "loss": "kdsvd", "student": taps, "teacher": taps, "adapter": "conv1x1"}]}
    trainer = DistillationTrainer(model=student, teacher=teacher, recipe=recipe, train_dataset=digits[0].select(range(32)),
                                  args=make_args(tmp_path, max_steps=2, per_device_train_batch_size=8, logging_steps=1))
    adapters_before = {k: v.clone() for k, v in trainer.model.adapters.state_dict().items()}
    trainer.train()
    logged = [h["loss_kdsvd"] for h in trainer.state.log_history if "loss_kdsvd" in h]
    assert logged and all(math.isfinite(v) for v in logged)
    assert any(not torch.equal(v, trainer.model.adapters.state_dict()[k]) for k, v in adapters_before.items())
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in teacher_before.items())
