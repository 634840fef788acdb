"""MGD (hfdistill/losses/matching.py): the channel distances, the assignment (a valid, optimal matching, checked
by brute force), the reducers by hand, the loss against the authors' formula written out independently, the
margin from the teacher BatchNorm, the schedule inside DistillationTrainer, restore from a saved state and a
resumed checkpoint, and an identical matching on every rank (threads with a fake accelerator; two real gloo
processes)."""

from __future__ import annotations

import itertools
import math
import os
import socket
import threading

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_timm
from test_trainer import make_args
from torch import nn

from hfdistill import DistillationTrainer, losses
from hfdistill.errors import DistillationError, LossParamError
from hfdistill.losses import matching as mgd
from hfdistill.losses.features import ofd_margin_from_bn
from hfdistill.terms import LossContext


def _maps(*shape: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g)


def _configured(student_shape, teacher_shape, **params) -> mgd.MGDLoss:
    loss = losses.build("mgd", **{"margin": "data", **params})
    loss.configure(LossContext(student_shape=torch.Size(student_shape), teacher_shape=torch.Size(teacher_shape)))
    return loss


def _ctx_with_data(batches, **kwargs) -> LossContext:
    """A LossContext whose statistics pass yields ``batches`` ((student, teacher) pairs)."""
    ctx = LossContext(student_shape=batches[0][0].shape, teacher_shape=batches[0][1].shape, **kwargs)

    def term_values(max_batches=None):
        for i, (s, t) in enumerate(batches):
            if max_batches is not None and i >= max_batches:
                return
            yield s, t, {}

    ctx._term_values = term_values
    return ctx


def _assert_valid_matching(matching: torch.Tensor, c_s: int, c_t: int, groups: int, ignore=()) -> None:
    assert matching.shape == (c_s, groups) and matching.dtype == torch.long
    flat = matching.flatten().tolist()
    assert len(set(flat)) == len(flat), "a teacher channel is assigned twice"
    assert all(0 <= k < c_t and k not in ignore for k in flat)


# ---------------------------------------------------------------------------------------------
# registry and parameters
# ---------------------------------------------------------------------------------------------


def test_registered_parameter_free_with_paper():
    info = losses.get_info("mgd")
    assert info.reads == "features" and not info.same_shape and not info.trainable and not info.multi_layer
    assert info.fields == () and info.default_tap is None
    assert "arXiv:2008.09958" in info.paper and info.year == 2020
    loss = _configured((2, 3, 4, 4), (2, 6, 4, 4))
    assert list(loss.parameters()) == []  # MGD has no trainable parameters
    assert set(loss.state_dict()) == {"matching", "margin", "margin_ready", "matched_epoch"}
    defaults = losses.build("mgd")
    assert (defaults.reducer, defaults.update_freq, defaults.max_batches, defaults.ignore_inds,
            defaults.margin_source) == ("amp", 2, None, (), "bn")


@pytest.mark.parametrize("param, value", [
    ("reducer", "sum"), ("reducer", "max"), ("update_freq", 0), ("update_freq", 1.5), ("max_batches", 0),
    ("max_batches", 2.5), ("ignore_inds", [-1]), ("ignore_inds", [1, 1]), ("ignore_inds", [0.5]),
    ("ignore_inds", 3), ("ignore_inds", "abc"), ("margin", "abc"), ("margin", "bn:"), ("margin", "bn:layer 3"),
    ("margin", -1.0), ("margin", None),
])
def test_parameters_are_checked(param, value):
    with pytest.raises(LossParamError) as info:
        losses.build("mgd", **{param: value})
    assert info.value.param == param and "must" in info.value.message and "got" in info.value.message


def test_configure_checks_widths_and_ignored_channels():
    with pytest.raises(DistillationError, match="student feature has 6 channels but the teacher only 4"):
        _configured((2, 6, 4, 4), (2, 4, 4, 4))
    with pytest.raises(DistillationError, match="only 3 usable ones"):
        _configured((2, 4, 4, 4), (2, 5, 4, 4), ignore_inds=[0, 1])
    with pytest.raises(LossParamError, match="below 5"):
        _configured((2, 2, 4, 4), (2, 5, 4, 4), ignore_inds=[5])
    with pytest.raises(DistillationError, match=r"\[B, C, H, W\]"):
        _configured((2, 3), (2, 6))
    assert _configured((2, 2, 4, 4), (2, 7, 4, 4)).groups == 3  # 7 // 2: one channel left out
    assert _configured((2, 2, 4, 4), (2, 7, 4, 4), reducer="sm").groups == 1


# ---------------------------------------------------------------------------------------------
# the matching
# ---------------------------------------------------------------------------------------------


def test_channel_costs_against_loops():
    s, t = _maps(3, 2, 2, 3, seed=0), _maps(3, 4, 2, 3, seed=1)
    s[1, 0] = 0.0  # an all-zero channel map: cosine 0, cost 2 (the authors' 2 - 2 cos)
    costs = mgd.channel_costs(s, t)
    assert costs.shape == (2, 4) and costs.dtype == torch.float64
    for i in range(2):
        for j in range(4):
            expected = 0.0
            for b in range(3):
                u, v = s[b, i].flatten().double(), t[b, j].flatten().double()
                if u.norm() == 0:
                    expected += 2.0
                else:  # squared distance of the unit vectors
                    expected += float(((u / u.norm() - v / v.norm()) ** 2).sum())
            assert math.isclose(costs[i, j].item(), expected, rel_tol=1e-9, abs_tol=1e-9)
    # spatial sizes that differ: the larger map is average-pooled first
    big = F.interpolate(t, scale_factor=2, mode="nearest")
    torch.testing.assert_close(mgd.channel_costs(s, big), costs)


def _brute_force(cost: torch.Tensor, groups: int, ignore=()) -> float:
    """Minimum of sum_i sum_{k in S_i} cost[i, k] over disjoint sets S_i of `groups` teacher channels each."""
    c_s, c_t = cost.shape
    usable = [k for k in range(c_t) if k not in ignore]
    best = math.inf
    for perm in itertools.permutations(usable, groups * c_s):
        total = sum(cost[i, perm[slot * c_s + i]].item() for i in range(c_s) for slot in range(groups))
        best = min(best, total)
    return best


@pytest.mark.parametrize("c_s, c_t, groups, ignore", [
    (2, 4, 2, ()), (2, 5, 2, ()), (3, 3, 1, ()), (2, 5, 2, (1,)), (2, 6, 1, (0, 4)), (3, 7, 2, (6,)),
])
def test_match_channels_is_a_valid_optimal_assignment(c_s, c_t, groups, ignore):
    cost = torch.rand(c_s, c_t, generator=torch.Generator().manual_seed(c_s * 10 + c_t))
    matching = mgd.match_channels(cost, groups, ignore)
    _assert_valid_matching(matching, c_s, c_t, groups, ignore)
    total = sum(cost[i, k].item() for i in range(c_s) for k in matching[i].tolist())
    assert math.isclose(total, _brute_force(cost, groups, ignore), rel_tol=1e-9)


def test_equal_widths_give_the_permutation_of_least_distance():
    perm = torch.tensor([3, 0, 4, 1, 2])
    cost = torch.ones(5, 5)
    cost[torch.arange(5), perm] = 0.0  # student channel i is closest to teacher channel perm[i]
    matching = mgd.match_channels(cost, 1)
    assert matching.flatten().tolist() == perm.tolist()
    assert sorted(matching.flatten().tolist()) == list(range(5))  # a permutation


def test_match_channels_rejects_non_finite_costs_and_too_few_channels():
    with pytest.raises(DistillationError, match="not finite"):
        mgd.match_channels(torch.tensor([[float("nan"), 1.0]]), 1)
    with pytest.raises(DistillationError, match="cannot give each of 2 student channels 2"):
        mgd.match_channels(torch.rand(2, 4), 2, ignore=[0])
    with pytest.raises(DistillationError, match="read no training batches"):
        _configured((2, 2, 2, 2), (2, 4, 2, 2)).update_matching([])


def test_matching_follows_channel_responses_and_ignores_channels():
    """A teacher that holds scaled copies of the student's channels (and noise): each student channel gets
    its own copies, and an ignored copy is replaced by another channel."""
    s = _maps(8, 3, 4, 4, seed=3)
    copies = {0: [4, 1], 1: [0, 5], 2: [2, 3]}  # student channel -> teacher channels holding its map
    t = torch.empty(8, 6, 4, 4)
    for i, ks in copies.items():
        for scale, k in zip((2.0, 0.5), ks):
            t[:, k] = scale * s[:, i]
    loss = _configured(s.shape, t.shape)
    loss.update_matching([(s, t)])
    assert {i: sorted(loss.matching[i].tolist()) for i in range(3)} == {i: sorted(ks) for i, ks in copies.items()}
    ignoring = _configured(s.shape, (8, 7, 4, 4), ignore_inds=[5])
    t7 = torch.cat([t, _maps(8, 1, 4, 4, seed=4)], dim=1)
    ignoring.update_matching([(s, t7)])
    _assert_valid_matching(ignoring.matching, 3, 7, 2, ignore=(5,))
    assert 0 in ignoring.matching[1].tolist() and 6 in ignoring.matching.flatten().tolist()


# ---------------------------------------------------------------------------------------------
# reducers and the loss
# ---------------------------------------------------------------------------------------------

# One example, 4 teacher channels over 2 positions; student channel 0 <- teacher {0, 2}, 1 <- {1, 3}.
T_HAND = torch.tensor([[1.0, -5.0], [2.0, 3.0], [-4.0, 0.5], [0.0, -1.0]]).view(1, 4, 1, 2)
MATCH_HAND = torch.tensor([[0, 2], [1, 3]])
MARGIN_HAND = torch.tensor([-1.0, -2.0, -3.0, -4.0])


def test_amp_by_hand():
    t, m = mgd.reduce_channels(T_HAND, MATCH_HAND, MARGIN_HAND, "amp")
    # channel 0: |1| < |-4| -> -4; |-5| > |0.5| -> -5; channel 1: 2 vs 0 -> 2; 3 vs -1 -> 3
    assert t.flatten().tolist() == [-4.0, -5.0, 2.0, 3.0]
    assert m.tolist() == [-2.0, -3.0]  # mean of the matched margins: (-1 - 3) / 2, (-2 - 4) / 2


def test_sp_by_hand():
    t, m = mgd.reduce_channels(T_HAND, MATCH_HAND, MARGIN_HAND, "sp")
    assert t.flatten().tolist() == [1.0, 0.5, 2.0, 3.0]
    assert m.tolist() == [-1.0, -2.0]


def test_sm_by_hand():
    t, m = mgd.reduce_channels(T_HAND, torch.tensor([[2], [3]]), MARGIN_HAND, "sm")
    assert t.flatten().tolist() == [-4.0, 0.5, 0.0, -1.0]
    assert m.tolist() == [-3.0, -4.0]


def test_rd_draws_one_matched_channel_per_position_with_its_margin():
    torch.manual_seed(0)
    t = _maps(64, 4, 3, 3, seed=5)
    reduced, margin = mgd.reduce_channels(t, MATCH_HAND, MARGIN_HAND, "rd")
    assert reduced.shape == margin.shape == (64, 2, 3, 3)
    picks = torch.zeros(2, 2)
    for i, ks in enumerate(MATCH_HAND.tolist()):
        from_first = reduced[:, i] == t[:, ks[0]]
        from_second = reduced[:, i] == t[:, ks[1]]
        assert torch.all(from_first | from_second)
        assert torch.all(margin[:, i][from_first] == MARGIN_HAND[ks[0]])
        assert torch.all(margin[:, i][from_second & ~from_first] == MARGIN_HAND[ks[1]])
        picks[i] = torch.tensor([from_first.float().mean(), from_second.float().mean()])
    assert torch.all((picks > 0.4) & (picks < 0.6)), picks  # uniform over the two channels


def _authors_amp_loss(s, t, guided, margin_t):
    """The authors' MGDistiller.amp + distillation_loss, with their flat index layout (row r = slot * Cs + i),
    written with their stacking loop and the partial L2 as element loops."""
    b, sc, h, w = s.shape
    tc = t.shape[1]
    chunks = [t[:, guided[c:c + sc]] for c in range(0, len(guided), sc)]
    margins = [margin_t.view(1, tc, 1, 1)[:, guided[c:c + sc]] for c in range(0, len(guided), sc)]
    stacked = torch.stack(chunks, dim=2).reshape(b, sc, len(chunks), -1)
    m = torch.stack(margins, dim=2).reshape(1, sc, len(chunks), -1).mean(dim=2).reshape(sc)
    inds = torch.argmax(stacked.abs(), dim=2)
    target = stacked.gather(2, inds.unsqueeze(2)).reshape(b, sc, h, w)
    total = 0.0
    for n in range(b):
        for c in range(sc):
            for y in range(h):
                for x in range(w):
                    tv = max(target[n, c, y, x].item(), m[c].item())
                    sv = s[n, c, y, x].item()
                    if sv > tv or tv > 0:
                        total += (sv - tv) ** 2
    return total / b  # their main script: loss.sum() / batch_size


def test_amp_loss_against_the_authors_formula():
    s, t = _maps(3, 2, 2, 2, seed=6), _maps(3, 4, 2, 2, seed=7) * 2
    loss = _configured(s.shape, t.shape).eval()
    loss.update_matching([(s, t)])
    loss.set_teacher_bn(torch.tensor([1.0, 0.5, 2.0, 0.1]), torch.tensor([0.0, 1.0, -1.0, 0.3]))
    guided = loss.matching.t().flatten()  # our [Cs, g] matching in the authors' flat layout
    expected = _authors_amp_loss(s, t, guided, loss.margin)
    assert math.isclose(loss(s, t).item(), expected, rel_tol=1e-5)


@pytest.mark.parametrize("reducer", ["sp", "sm", "rd"])
def test_loss_is_partial_l2_of_the_reduced_teacher(reducer):
    s, t = _maps(2, 2, 3, 3, seed=8), _maps(2, 4, 3, 3, seed=9)
    loss = _configured(s.shape, t.shape, reducer=reducer)
    loss.update_matching([(s, t)])
    torch.manual_seed(1)
    value = loss(s, t)
    torch.manual_seed(1)  # the same random draw for rd
    reduced, margin = mgd.reduce_channels(t, loss.matching, loss.margin, reducer)
    margin = margin.view(1, -1, 1, 1).expand_as(reduced) if margin.dim() == 1 else margin
    total = 0.0
    for idx in itertools.product(*(range(n) for n in s.shape)):
        tv, sv = max(reduced[idx].item(), margin[idx].item()), s[idx].item()
        total += (sv - tv) ** 2 if (sv > tv or tv > 0) else 0.0
    assert math.isclose(value.item(), total / s.shape[0], rel_tol=1e-5)


def test_gradients_reach_the_student_only_and_values_are_fp32():
    s = _maps(2, 2, 3, 3, seed=10).requires_grad_(True)
    t = _maps(2, 6, 3, 3, seed=11).requires_grad_(True)
    loss = _configured(s.shape, t.shape)
    value = loss(s.half(), t.bfloat16())
    assert value.dtype == torch.float32 and value.dim() == 0
    value.backward()
    assert s.grad is not None and torch.any(s.grad != 0) and t.grad is None
    # matching a perfect student gives zero
    exact = _configured((2, 2, 3, 3), (2, 2, 3, 3))
    assert exact(t[:, :2].detach(), t[:, :2].detach()).item() == 0.0


def test_data_margin_is_the_mean_negative_response_over_the_pass():
    pairs = [(_maps(3, 2, 2, 2, seed=12), _maps(3, 4, 2, 2, seed=13)),
             (_maps(2, 2, 2, 2, seed=14), _maps(2, 4, 2, 2, seed=15) + 1.0)]
    loss = _configured((3, 2, 2, 2), (3, 4, 2, 2))
    loss.update_matching(pairs)
    for c in range(4):
        negatives = [v for _, t in pairs for v in t[:, c].flatten().tolist() if v < 0]
        expected = sum(negatives) / len(negatives) if negatives else 0.0
        assert math.isclose(loss.margin[c].item(), expected, rel_tol=1e-6, abs_tol=1e-7)
    positive = _configured((3, 2, 2, 2), (3, 4, 2, 2))
    positive.update_matching([(pairs[0][0], pairs[0][1].abs())])
    assert positive.margin.tolist() == [0.0] * 4  # no negative response: margin 0


def test_outside_a_trainer_the_first_forward_matches_on_its_batch():
    s, t = _maps(4, 2, 3, 3, seed=16), _maps(4, 4, 3, 3, seed=17)
    loss = _configured(s.shape, t.shape)
    reference = _configured(s.shape, t.shape)
    reference.update_matching([(s, t)])
    value = loss(s, t)
    assert torch.equal(loss.matching, reference.matching) and int(loss.matched_epoch) == 0
    torch.testing.assert_close(value, reference(s, t))
    without_margin = losses.build("mgd")  # margin 'bn' but no teacher model at set-up
    without_margin.configure(LossContext(student_shape=s.shape, teacher_shape=t.shape))
    with pytest.raises(DistillationError, match="no margin yet"):
        without_margin(s, t)


# ---------------------------------------------------------------------------------------------
# the margin from the teacher BatchNorm
# ---------------------------------------------------------------------------------------------


class _TorchvisionBlock(nn.Module):
    """torchvision's BasicBlock layout: one `relu` module used twice, registered between bn1 and bn2."""

    def __init__(self, c):
        super().__init__()
        self.conv1, self.bn1, self.relu = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU()
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)

    def forward(self, x):
        return self.relu(self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x))))) + x)


def test_find_teacher_bn_rule():
    teacher = tiny_timm(seed=1)  # timm test_resnet: layer2 of BasicBlocks, layer3 of Bottlenecks
    path, bn = mgd.find_teacher_bn(teacher, "layer2.-1.act2:input")
    assert path == "layer2.-1.bn2" and bn is teacher.layer2[-1].bn2
    assert mgd.find_teacher_bn(teacher, "layer3.-1.act3:input")[0] == "layer3.-1.bn3"
    assert mgd.find_teacher_bn(teacher, "layer3.0.act2:input")[0] == "layer3.0.bn2"
    assert mgd.find_teacher_bn(teacher, "layer2.-1.bn2")[1] is teacher.layer2[-1].bn2  # a BN's output
    assert mgd.find_teacher_bn(teacher, "layer2") is None  # a stage's (post-ReLU) output
    assert mgd.find_teacher_bn(teacher, "layer2.-1.bn2:input") is None  # a BN's input is a conv's output
    assert mgd.find_teacher_bn(teacher, "logits") is None
    assert mgd.find_teacher_bn(nn.Sequential(_TorchvisionBlock(4)), "0.relu:input") is None  # ambiguous


def test_margin_from_the_teacher_bn_before_the_tap():
    teacher = tiny_timm(seed=1)
    bn = teacher.layer2[-1].bn2
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1.0, 1.0)
    c_t = bn.num_features
    for margin in ("bn", "bn:layer2.-1.bn2"):
        loss = losses.build("mgd", margin=margin)
        loss.configure(LossContext(student_shape=torch.Size([2, c_t // 4, 2, 2]),
                                   teacher_shape=torch.Size([2, c_t, 2, 2]),
                                   teacher=teacher, teacher_taps=["layer2.-1.act2:input"]))
        assert loss.teacher_bn_path == "layer2.-1.bn2" and bool(loss.margin_ready)
        torch.testing.assert_close(loss.margin, ofd_margin_from_bn(bn.weight, bn.bias))
    # the Gaussian formula, written out for one channel: E[x | x < 0] for x ~ N(beta, gamma^2)
    g, b = abs(bn.weight[0].item()), bn.bias[0].item()
    cdf = 0.5 * (1 + math.erf(-b / g / math.sqrt(2)))
    expected = b - g * math.exp(-((b / g) ** 2) / 2) / math.sqrt(2 * math.pi) / cdf if cdf > 0.001 else -3 * g
    assert math.isclose(loss.margin[0].item(), expected, rel_tol=1e-5)


def test_margin_errors_say_what_to_write():
    teacher = tiny_timm(seed=1)
    shapes = dict(student_shape=torch.Size([2, 12, 2, 2]), teacher_shape=torch.Size([2, 48, 2, 2]))
    no_bn = r"found no BatchNorm producing the teacher tap 'layer2'.*bn:<path>.*margin: data"
    with pytest.raises(DistillationError, match=no_bn):
        losses.build("mgd").configure(LossContext(teacher=teacher, teacher_taps=["layer2"], **shapes))
    with pytest.raises(DistillationError, match=r"has a Conv2d at 'layer2.-1.conv2'"):
        losses.build("mgd", margin="bn:layer2.-1.conv2").configure(
            LossContext(teacher=teacher, teacher_taps=["layer2.-1.act2:input"], **shapes))
    with pytest.raises(DistillationError, match="has no module at 'layer2.-1.bn3'"):
        losses.build("mgd", margin="bn:layer2.-1.bn3").configure(
            LossContext(teacher=teacher, teacher_taps=["layer2.-1.act2:input"], **shapes))
    with pytest.raises(DistillationError, match="has 32 channels but the teacher feature 48"):
        losses.build("mgd", margin="bn:layer1.-1.bn2").configure(
            LossContext(teacher=teacher, teacher_taps=["layer2.-1.act2:input"], **shapes))
    with pytest.raises(DistillationError, match="cache of its outputs.*margin: data"):
        losses.build("mgd").configure(LossContext(frozen_teacher=object(), teacher_taps=["layer2"], **shapes))


# ---------------------------------------------------------------------------------------------
# the schedule
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("freq, expected", [(1, [0, 1, 2, 3]), (2, [0, 2]), (3, [0, 3]), (5, [0])])
def test_on_epoch_begin_recomputes_at_multiples_of_update_freq(freq, expected):
    batches = [(_maps(2, 2, 2, 2, seed=20), _maps(2, 4, 2, 2, seed=21))]
    loss = _configured((2, 2, 2, 2), (2, 4, 2, 2), update_freq=freq)
    ctx = _ctx_with_data(batches)
    ctx.step = 0
    loss.on_train_begin(ctx)
    for epoch in range(4):
        ctx.epoch = float(epoch)
        loss.on_epoch_begin(ctx)
    assert loss.update_epochs == expected


def test_resume_mid_epoch_keeps_the_restored_matching_until_the_next_due_epoch():
    batches = [(_maps(2, 2, 2, 2, seed=22), _maps(2, 4, 2, 2, seed=23))]
    loss = _configured((2, 2, 2, 2), (2, 4, 2, 2), update_freq=2)
    loss.matching.copy_(torch.tensor([[3, 1], [0, 2]]))
    loss.matched_epoch.fill_(2)  # as restored from a checkpoint written during epoch 2
    ctx = _ctx_with_data(batches)
    ctx.step, ctx.epoch = 7, 2.5
    loss.on_train_begin(ctx)
    loss.on_epoch_begin(ctx)  # the resumed epoch 2: its matching is the restored one
    assert loss.update_epochs == [] and loss.matching.tolist() == [[3, 1], [0, 2]]
    for epoch in (3.0, 4.0):
        ctx.epoch = epoch
        loss.on_epoch_begin(ctx)
    assert loss.update_epochs == [4]
    # a fresh start (step 0) with state carried from an earlier stage recomputes at its epoch 0
    ctx.step, ctx.epoch = 0, 0.0
    loss.matched_epoch.fill_(0)
    loss.on_train_begin(ctx)
    loss.on_epoch_begin(ctx)
    assert loss.update_epochs == [4, 0]


def test_max_batches_limits_the_statistics_pass():
    batches = [(_maps(2, 2, 2, 2, seed=s), _maps(2, 4, 2, 2, seed=s + 1)) for s in (30, 32, 34)]
    for max_batches, expected in ((None, 3), (2, 2)):
        loss = _configured((2, 2, 2, 2), (2, 4, 2, 2), max_batches=max_batches)
        seen, original = [], loss.update_matching

        def counting(pairs, **kwargs):
            pairs = list(pairs)
            seen.append(len(pairs))
            original(pairs, **kwargs)

        loss.update_matching = counting
        loss.on_epoch_begin(_ctx_with_data(batches))
        assert seen == [expected]


# ---------------------------------------------------------------------------------------------
# several processes: statistics summed, solved once, rank 0's answer everywhere
# ---------------------------------------------------------------------------------------------


def _rank_batches(rank: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Different local data on each rank: 2 batches of 3 examples, 3 student and 9 teacher channels."""
    return [(_maps(3, 3, 3, 3, seed=100 + 10 * rank + k), _maps(3, 9, 3, 3, seed=200 + 10 * rank + k))
            for k in range(2)]


def _single_process_reference(**params) -> mgd.MGDLoss:
    loss = _configured((3, 3, 3, 3), (3, 9, 3, 3), **params)
    loss.update_matching(_rank_batches(0) + _rank_batches(1))
    return loss


class _FakeAccelerator:
    """What MGD uses of accelerate.Accelerator: num_processes, process_index and reduce(sum), here across threads."""

    def __init__(self, rank: int, shared: dict):
        self.num_processes, self.process_index, self.shared = 2, rank, shared

    def reduce(self, tensor, reduction="sum"):
        assert reduction == "sum"
        self.shared["calls"][self.process_index] += 1
        slot = self.shared["calls"][self.process_index]
        self.shared.setdefault(slot, [None, None])[self.process_index] = tensor.clone()
        self.shared["barrier"].wait()
        return self.shared[slot][0] + self.shared[slot][1]


def _two_threaded_ranks(batches_of) -> tuple[dict, list, dict]:
    """Both ranks' on_epoch_begin at once, in two threads joined by a fake accelerator."""
    shared = {"calls": [0, 0], "barrier": threading.Barrier(2, timeout=30)}
    results, errors = {}, []

    def run(rank):
        try:
            loss = _configured((3, 3, 3, 3), (3, 9, 3, 3))
            ctx = _ctx_with_data(batches_of(rank), accelerator=_FakeAccelerator(rank, shared), world_size=2, rank=rank)
            loss.on_epoch_begin(ctx)
            results[rank] = loss
        except DistillationError as exc:
            errors.append((rank, str(exc)))
        except threading.BrokenBarrierError as exc:  # the other rank never arrived: a hang in a real run
            errors.append((rank, f"broken barrier {exc!r}"))

    threads = [threading.Thread(target=run, args=(r,)) for r in (0, 1)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    return results, sorted(errors), shared


def test_fake_accelerator_sums_statistics_solves_once_and_broadcasts(monkeypatch):
    solved = []
    real_match = mgd.match_channels

    def counting_match(*args, **kwargs):
        solved.append(threading.get_ident())
        return real_match(*args, **kwargs)

    monkeypatch.setattr(mgd, "match_channels", counting_match)
    results, errors, shared = _two_threaded_ranks(_rank_batches)
    assert not errors, errors
    assert len(solved) == 1  # solved once, on rank 0
    assert shared["calls"] == [2, 2]  # one reduction of the statistics, one of rank 0's answer
    monkeypatch.setattr(mgd, "match_channels", real_match)
    reference = _single_process_reference()
    for rank in (0, 1):
        assert torch.equal(results[rank].matching, reference.matching)
        torch.testing.assert_close(results[rank].margin, reference.margin)
        assert int(results[rank].matched_epoch) == 0 and results[rank].update_epochs == [0]
    # without the sum each rank would have matched differently: the test would see a broken gather
    local = [_configured((3, 3, 3, 3), (3, 9, 3, 3)) for _ in range(2)]
    for rank, loss in enumerate(local):
        loss.update_matching(_rank_batches(rank), sync=False)
    assert not torch.equal(local[0].matching, local[1].matching)


def test_a_failed_solve_on_rank_0_raises_on_every_rank_instead_of_hanging():
    def batches_of(rank):
        batches = _rank_batches(rank)
        if rank == 1:
            batches[0][1][0, 0, 0, 0] = float("nan")  # one NaN in rank 1's teacher features
        return batches

    results, errors, _ = _two_threaded_ranks(batches_of)
    assert not results
    assert [rank for rank, _ in errors] == [0, 1]
    assert "not finite" in errors[0][1] and "rank 0 could not solve" in errors[1][1]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _gloo_worker(rank: int, world: int, port: int, folder: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        loss = _configured((3, 3, 3, 3), (3, 9, 3, 3))
        ctx = _ctx_with_data(_rank_batches(rank), world_size=world, rank=rank)  # no accelerator: torch.distributed
        loss.on_epoch_begin(ctx)
        torch.save({"matching": loss.matching, "margin": loss.margin}, os.path.join(folder, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # 20-50 s on 2 shared cores: each spawned process imports hfdistill (transformers); the threaded
# test above covers the same path fast
def test_two_gloo_processes_end_with_the_identical_matching(tmp_path):
    """Two real processes (torch.multiprocessing + gloo), each with its own data: the same matching on both,
    the one a single process finds on all the data."""
    import torch.multiprocessing as mp

    mp.spawn(_gloo_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    reference = _single_process_reference()
    assert torch.equal(rank0["matching"], rank1["matching"])
    assert torch.equal(rank0["matching"], reference.matching)
    _assert_valid_matching(rank0["matching"], 3, 9, 3)
    assert torch.equal(rank0["margin"], rank1["margin"])
    torch.testing.assert_close(rank0["margin"], reference.margin)


# ---------------------------------------------------------------------------------------------
# inside DistillationTrainer
# ---------------------------------------------------------------------------------------------

TAP = "layer2.-1.act2:input"  # the pre-ReLU end of layer2 of timm's test_resnet (a BasicBlock), 2x2 at 16x16


def _trainer(tmp_path, digits, student=None, **args):
    train, _ = digits
    recipe = {"terms": [
        {"loss": "mgd", "weight": 1e-3, "student": TAP, "teacher": TAP, "params": {"reducer": "amp", "update_freq": 2}},
        {"loss": "kd", "weight": 1.0, "params": {"temperature": 1.5}},
    ]}
    student = student if student is not None else tiny_timm(seed=2, channels=(8, 12, 12, 24))
    defaults = dict(max_steps=-1, num_train_epochs=3, per_device_train_batch_size=16)
    return DistillationTrainer(model=student, teacher=tiny_timm(seed=1), recipe=recipe,
                               args=make_args(tmp_path, **{**defaults, **args}), train_dataset=train.select(range(32)))


def test_trainer_schedule_checkpoint_and_resume(tmp_path, digits):
    """3 epochs of 2 steps, update_freq 2: matched at epochs 0 and 2, each time over the whole training set; the
    matching is in the checkpoints; a run resumed in the middle of epoch 1 keeps the saved matching (epoch 0's)
    and recomputes at epoch 2 only."""
    trainer = _trainer(tmp_path, digits, save_strategy="steps", save_steps=3)
    loss = trainer.model.losses["mgd"]
    assert list(loss.parameters()) == [] and loss.teacher_bn_path == "layer2.-1.bn2"
    bn = trainer.teacher.layer2[-1].bn2
    torch.testing.assert_close(loss.margin, ofd_margin_from_bn(bn.weight, bn.bias))
    passes, matchings = [], []
    original = loss.update_matching

    def recording(pairs, **kwargs):
        pairs = list(pairs)
        passes.append(sum(s.shape[0] for s, _ in pairs))
        original(pairs, **kwargs)
        matchings.append(loss.matching.clone())

    loss.update_matching = recording
    trainer.train()
    assert loss.update_epochs == [0, 2] and passes == [32, 32]  # the whole training set each time
    for m in matchings:
        _assert_valid_matching(m, 12, 48, 4)
    assert int(loss.matched_epoch) == 2
    assert {"losses.mgd.matching", "losses.mgd.margin", "losses.mgd.matched_epoch"} <= set(trainer.distill_state())

    # resume from step 3 (the middle of epoch 1): the checkpoint holds epoch 0's matching
    resumed = _trainer(tmp_path, digits, save_strategy="no")
    resumed_loss = resumed.model.losses["mgd"]
    seen = []
    resumed_hook = resumed_loss.on_epoch_begin

    def at_epoch_begin(ctx):
        resumed_hook(ctx)
        seen.append((ctx.epoch, resumed_loss.matching.clone()))

    resumed_loss.on_epoch_begin = at_epoch_begin
    resumed.train(resume_from_checkpoint=os.path.join(trainer.args.output_dir, "checkpoint-3"))
    assert [epoch for epoch, _ in seen] == [1.5, 2.0]
    assert torch.equal(seen[0][1], matchings[0])  # restored, not recomputed
    assert resumed_loss.update_epochs == [2] and int(resumed_loss.matched_epoch) == 2
    _assert_valid_matching(seen[1][1], 12, 48, 4)


def test_matching_restored_from_a_saved_distill_state_needs_no_recompute():
    s, t = _maps(4, 2, 3, 3, seed=40), _maps(4, 4, 3, 3, seed=41)
    trained = _configured(s.shape, t.shape)
    trained.update_matching([(s, t)])
    trained.matched_epoch.fill_(4)
    restored = _configured(s.shape, t.shape)
    restored.load_state_dict(trained.state_dict())
    assert torch.equal(restored.matching, trained.matching) and int(restored.matched_epoch) == 4
    torch.testing.assert_close(restored(s, t), trained(s, t))
    assert restored.update_epochs == []  # the forward used the restored matching
