"""DML (deep mutual learning): the value against the paper's per-network objectives, the detach rules on the
gradients, fresh peers of the student's architecture, and a short training run with peers in the trainer."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_timm, tiny_vit
from safetensors.torch import load_file
from test_trainer import make_args
from torch import nn

from hfdistill import DistillationError, DistillationTrainer
from hfdistill.errors import LossParamError
from hfdistill.losses import build, get_info, needs_teacher
from hfdistill.losses.mutual import DMLLoss, fresh_like, seeded_peers
from hfdistill.terms import LossContext


def _logits(n: int = 6, classes: int = 5, seed: int = 0, scale: float = 2.0) -> torch.Tensor:
    return torch.randn(n, classes, generator=torch.Generator().manual_seed(seed)) * scale


def _reference(student: torch.Tensor, peers: list[torch.Tensor], labels: torch.Tensor, t: float) -> torch.Tensor:
    """The paper's objectives, network by network: L_k = [CE_k] + T^2/(K-1) sum_{l != k} KL(p_l || p_k).

    Written with F.kl_div (batchmean) and loops, the student (network 0) without its CE (the task loss)."""
    networks = [student, *peers]
    total = torch.zeros(())
    for k, z_k in enumerate(networks):
        own = F.cross_entropy(z_k, labels) if k > 0 else torch.zeros(())
        mimicry = torch.zeros(())
        for l, z_l in enumerate(networks):
            if l != k:
                mimicry = mimicry + F.kl_div(F.log_softmax(z_k / t, dim=1), F.softmax(z_l / t, dim=1),
                                             reduction="batchmean")
        total = total + own + mimicry * t**2 / (len(networks) - 1)
    return total


# --------------------------------------------------------------------------------------------- the value
@pytest.mark.parametrize("num_peers, temperature", [(1, 1.0), (2, 1.0), (3, 2.5)])
def test_value_is_the_sum_of_the_networks_objectives(num_peers, temperature):
    loss = DMLLoss(peers=num_peers, temperature=temperature)
    student = _logits(seed=0)
    peers = [_logits(seed=k) for k in range(1, num_peers + 1)]
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    value = loss.objective(student, peers, labels)
    assert value.dtype == torch.float32 and value.dim() == 0
    torch.testing.assert_close(value, _reference(student, peers, labels, temperature))


def test_two_networks_by_hand():
    """Two networks, two classes, one example: KL and CE written out as sums of p log p."""
    zs, zp = torch.tensor([[0.0, 1.0]]), torch.tensor([[2.0, 0.0]])
    ps, pp = torch.softmax(zs, 1)[0].tolist(), torch.softmax(zp, 1)[0].tolist()
    import math

    kl_p_s = sum(a * math.log(a / b) for a, b in zip(pp, ps))  # KL(p_peer || p_student)
    kl_s_p = sum(a * math.log(a / b) for a, b in zip(ps, pp))  # KL(p_student || p_peer)
    ce_peer = -math.log(pp[1])  # label 1
    value = DMLLoss().objective(zs, [zp], torch.tensor([1]))
    assert value.item() == pytest.approx(kl_p_s + ce_peer + kl_s_p, rel=1e-6)


def test_rows_labelled_minus_100_are_left_out_and_sequences_are_rows():
    student, peer = _logits(n=8, seed=3), _logits(n=8, seed=4)
    labels = torch.tensor([1, -100, 2, 3, -100, 0, 4, 1])
    keep = labels != -100
    loss = DMLLoss()
    torch.testing.assert_close(loss.objective(student, [peer], labels),
                               _reference(student[keep], [peer[keep]], labels[keep], 1.0))
    # [B, T, C] logits with [B, T] labels: one row per position.
    torch.testing.assert_close(loss.objective(student.view(2, 4, 5), [peer.view(2, 4, 5)], labels.view(2, 4)),
                               loss.objective(student, [peer], labels))
    # A batch with nothing labelled: zero, still on the networks' graph (backward works, gradients are zero).
    student.requires_grad_()
    nothing = loss.objective(student, [peer], torch.full((8,), -100))
    nothing.backward()
    assert nothing.item() == 0.0 and torch.count_nonzero(student.grad) == 0


# --------------------------------------------------------------------------------------------- gradients
def test_gradients_follow_the_detach_rules():
    """Each network's logits get the gradient of its own objective only (the others' predictions are constants):

    student:  T (p_s - mean_l q_l) / N               (its CE is the task loss, not here)
    peer k:   (softmax(z_k) - onehot) / N + T (p_k - mean_{l != k} q_l) / N
    with p = softmax(z / T), q_l the other networks' softened predictions."""
    t, n = 2.0, 6
    networks = [_logits(n=n, seed=s).requires_grad_() for s in (10, 11, 12)]
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    DMLLoss(peers=2, temperature=t).objective(networks[0], networks[1:], labels).backward()
    with torch.no_grad():
        soft = [torch.softmax(z / t, dim=1) for z in networks]
        onehot = F.one_hot(labels, 5).float()
        for k, z in enumerate(networks):
            others = torch.stack([soft[l] for l in range(3) if l != k]).mean(0)
            expected = t * (soft[k] - others) / n
            if k > 0:
                expected = expected + (torch.softmax(z, dim=1) - onehot) / n
            torch.testing.assert_close(z.grad, expected, rtol=1e-5, atol=1e-7)


def test_each_network_gets_the_gradient_of_its_own_objective_as_the_reference_code():
    """The Zoo's two losses (train_dml.py): CE1 + KL(out2.detach() || out1) for net 1, CE2 + KL(out1.detach() || out2)
    for net 2; here net 1 is the student (its CE is the task loss) and one value gives both gradients."""
    student = _logits(seed=20).requires_grad_()
    peer = _logits(seed=21).requires_grad_()
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    loss = DMLLoss()
    g_student, = torch.autograd.grad(loss.objective(student, [peer], labels), [student])
    ref, = torch.autograd.grad(F.kl_div(F.log_softmax(student, 1), F.softmax(peer.detach(), 1), reduction="batchmean"),
                               [student])
    torch.testing.assert_close(g_student, ref)
    g_peer, = torch.autograd.grad(loss.objective(student, [peer], labels), [peer])
    ref, = torch.autograd.grad(F.cross_entropy(peer, labels) + F.kl_div(F.log_softmax(peer, 1),
                               F.softmax(student.detach(), 1), reduction="batchmean"), [peer])
    torch.testing.assert_close(g_peer, ref)


# --------------------------------------------------------------------------------------------- peers
def _context(student: nn.Module, **kwargs) -> LossContext:
    return LossContext(term="dml", student=student, student_shape=torch.Size([2, 10]), **kwargs)


def test_configure_makes_trainable_peers_and_forward_runs_them_on_the_batch():
    student = tiny_timm(size=8)
    loss = build("dml", peers=2)
    loss.configure(_context(student, student_inputs=lambda batch: {"pixel_values": batch["pixel_values"]}))
    assert list(loss.extra_students()) == ["peer1", "peer2"]
    assert all(p.requires_grad for p in loss.parameters())
    assert sum(p.numel() for p in loss.parameters()) == 2 * sum(p.numel() for p in student.parameters())
    assert {k.split(".")[1] for k in loss.state_dict()} == {"0", "1"}  # peers.0.*, peers.1.*: checkpointed state
    x = torch.randn(4, 3, 8, 8)
    labels = torch.tensor([0, 1, 2, 3])
    batch = {"pixel_values": x, "labels": labels, "teacher_pixel_values": torch.zeros(4, 3, 2, 2), "index": labels}
    student_logits = student(x)
    value = loss(student_logits, None, labels=labels, batch=batch)
    peers = list(loss.extra_students().values())
    torch.testing.assert_close(value, _reference(student_logits, [p(x) for p in peers], labels, 1.0))


def test_peers_of_a_timm_student_are_new_networks_with_timms_initialisation():
    torch.manual_seed(0)
    student = tiny_timm(size=8)  # seeds 0 itself, as a run seeds before making the student
    peer1, peer2 = seeded_peers(student, 2)
    for peer in (peer1, peer2):
        assert type(peer) is type(student)
        assert {k: v.shape for k, v in peer.state_dict().items()} == {k: v.shape for k, v in student.state_dict().items()}
        assert peer.pretrained_cfg == student.pretrained_cfg and peer.pretrained_cfg is not student.pretrained_cfg
        assert not torch.equal(peer.conv1[0].weight, student.conv1[0].weight)  # not the student's initial values
        assert all(p.data_ptr() != q.data_ptr() for p, q in zip(peer.parameters(), student.parameters()))
        # timm's own init (zero-initialised last BN of each block), not reset_parameters' (ones).
        assert torch.count_nonzero(peer.layer1[0].bn2.weight) == 0
    assert not torch.equal(peer1.fc.weight, peer2.fc.weight)
    # Deterministic for a seeded run, whatever the global stream did since.
    torch.manual_seed(0)
    again = seeded_peers(student, 1)[0]
    assert torch.equal(again.fc.weight, peer1.fc.weight)


def test_peers_of_a_transformers_student_and_of_a_plain_module():
    student = tiny_vit(size=8).to(torch.float64).eval()
    peer = seeded_peers(student, 1)[0]
    def settings(config):  # the config's dtype follows the weights (the student's was cast after creation)
        return {k: v for k, v in config.to_dict().items() if k != "dtype"}

    assert type(peer) is type(student) and settings(peer.config) == settings(student.config)
    assert peer.config is not student.config and not peer.training and peer.dtype == torch.float64
    assert not torch.equal(peer.classifier.weight, student.classifier.weight)
    # The model's own _init_weights: std initializer_range, LayerNorm at 1.
    assert peer.classifier.weight.std().item() == pytest.approx(student.config.initializer_range, rel=0.3)
    assert torch.all(peer.vit.layernorm.weight == 1)

    plain = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    plain[0].weight.requires_grad_(False)
    copy = fresh_like(plain)
    assert not torch.equal(copy[2].weight, plain[2].weight) and copy[0].weight.requires_grad is False
    with pytest.raises(DistillationError, match="reset_parameters"):
        fresh_like(nn.Sequential(nn.ReLU()))


def test_a_peer_that_cannot_start_apart_is_an_error():
    class Constant(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(3))

        def reset_parameters(self):
            nn.init.ones_(self.weight)

    with pytest.raises(DistillationError, match="starts with exactly the student's weights"):
        seeded_peers(Constant(), 1)


def test_peers_run_in_the_students_precision():
    """The loss terms run outside autocast; the peers re-enter the run's (accelerator's) autocast."""
    entered = []

    class Accelerator:
        @contextlib.contextmanager
        def autocast(self):
            entered.append(torch.is_autocast_enabled("cpu"))
            with torch.autocast("cpu", dtype=torch.bfloat16):
                yield

    loss = build("dml")
    loss.configure(_context(tiny_timm(size=8), accelerator=Accelerator()))
    with torch.autocast("cpu", enabled=False):
        logits = loss.peer_logits({"pixel_values": torch.randn(2, 3, 8, 8)})
    assert entered == [False] and logits[0].dtype == torch.bfloat16


# --------------------------------------------------------------------------------------------- parameters, errors
def test_registration_and_parameters():
    info = get_info("dml")
    assert info.reads == "logits" and info.default_tap == "logits" and info.trainable
    assert set(info.fields) == {"labels", "batch"} and "arXiv:1706.00384" in info.paper
    assert needs_teacher("dml") is False
    assert build("dml").num_peers == 1 and build("dml").temperature == 1.0
    for param, value in [("peers", 0), ("peers", 1.5), ("peers", True), ("temperature", 0), ("temperature", -1.0)]:
        with pytest.raises(LossParamError) as error:
            build("dml", **{param: value})
        assert error.value.param == param


def test_errors_say_what_is_wrong():
    loss = build("dml")
    labels = torch.tensor([0, 1])
    with pytest.raises(DistillationError, match="configure"):
        loss(_logits(n=2), None, labels=labels, batch={})
    with pytest.raises(DistillationError, match="no student model"):
        loss.configure(LossContext())
    loss.configure(_context(tiny_timm(size=8)))
    batch = {"pixel_values": torch.randn(2, 3, 8, 8), "labels": labels}
    with pytest.raises(DistillationError, match="needs the batch"):
        loss(_logits(n=2, classes=10), None, labels=labels, batch=None)
    with pytest.raises(DistillationError, match="reads the student's `logits`"):
        loss(torch.randn(2, 16), None, labels=labels, batch=batch)
    with pytest.raises(DistillationError, match="integer class labels"):
        loss(_logits(n=2, classes=10), None, labels=labels.float(), batch=batch)


# --------------------------------------------------------------------------------------------- in the trainer
def test_training_with_peers_in_the_trainer(tmp_path, digits):
    """No teacher: the student and its peer both train; the peer is in the checkpoint's loss state, never
    in the saved student; the trainer offers it as an extra student."""
    train, _ = digits
    student = tiny_timm()
    trainer = DistillationTrainer(
        model=student, recipe={"terms": [{"loss": "dml", "weight": 1.0}]},
        args=make_args(tmp_path, max_steps=3, save_strategy="steps", save_steps=3, logging_steps=1,
                       learning_rate=0.05),
        train_dataset=train.select(range(48)),
    )
    assert trainer.teacher is None
    peer = trainer.extra_students()["peer1"]
    assert peer is trainer.model.losses["dml"].peers[0]
    before_student = {k: v.clone() for k, v in student.state_dict().items()}
    before_peer = {k: v.clone() for k, v in peer.state_dict().items()}
    trainer.train()
    assert not torch.equal(before_student["fc.weight"], student.fc.weight)
    assert not torch.equal(before_peer["fc.weight"], peer.fc.weight)
    assert any("loss_dml" in entry for entry in trainer.state.log_history)
    checkpoint = Path(tmp_path / "out" / "checkpoint-3")
    state = load_file(str(checkpoint / "distill_state.safetensors"))
    assert torch.equal(state["losses.dml.peers.0.fc.weight"].to(peer.fc.weight.dtype), peer.fc.weight.detach().cpu())
    trainer.save_model(str(tmp_path / "student"))
    saved = load_file(str(tmp_path / "student" / "model.safetensors"))
    assert not any("peers" in key for key in saved) and set(saved) == set(student.state_dict())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_logits_give_an_fp32_value(dtype):
    student, peers = _logits(seed=30).to(dtype), [_logits(seed=31).to(dtype), _logits(seed=32).to(dtype)]
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    loss = DMLLoss(peers=2)
    value = loss.objective(student, peers, labels)
    assert value.dtype == torch.float32 and value.dim() == 0
    torch.testing.assert_close(value, loss.objective(student.float(), [p.float() for p in peers], labels))
