"""Cached teacher outputs (hfdistill.cache): same losses as the live teacher, top-k logits, every refusal,
resume, several ranks, and `hfdistill cache` end to end."""

import json
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import digits_dataset, tiny_timm
from test_trainer import make_args
from torch import nn

from hfdistill import DistillationError, DistillationTrainer
from hfdistill.cache import (MANIFEST_NAME, TeacherCache, build_cache, reconstruct_logits, topk_logits,
                             weights_hash)
from hfdistill.data import PaddingCollator
from hfdistill.losses import registry
from hfdistill.teacher import Teacher
from hfdistill.terms import IndexedCollator, IndexedDataset

N = 48  # training examples in these tests
KD_FITNET = {"terms": [{"loss": "kd"}, {"loss": "mse", "student": "layer1", "teacher": "layer1"}]}


@pytest.fixture(scope="module")
def data():
    train, _ = digits_dataset(n_train=N, n_eval=16)
    return train


@pytest.fixture(scope="module")
def teacher():
    return tiny_timm(seed=1)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory, data, teacher):
    """A cache of the kd + FitNet(layer1) recipe: 3 shards of 16 examples, built in batches of 8."""
    folder = tmp_path_factory.mktemp("cache") / "teacher_cache"
    build_cache(teacher, data, KD_FITNET, folder, batch_size=8, shard_size=16, device="cpu", progress=False)
    return folder


def batch_of(dataset, indices):
    return IndexedCollator(PaddingCollator())(IndexedDataset(dataset).__getitems__(list(indices)))


def live_teacher(model, taps):
    live = Teacher(model, taps, shared_input_names=["pixel_values"])
    live.attach()
    return live


# ------------------------------------------------------------------------------ what is stored
def test_files_and_manifest(cache_dir, teacher):
    names = sorted(p.name for p in cache_dir.iterdir())
    assert names == ["cache_build.json", MANIFEST_NAME, "shard-00000-of-00003.safetensors",
                     "shard-00001-of-00003.safetensors", "shard-00002-of-00003.safetensors"]
    manifest = json.loads((cache_dir / MANIFEST_NAME).read_text())
    assert [(s["start"], s["stop"]) for s in manifest["shards"]] == [(0, 16), (16, 32), (32, 48)]
    assert manifest["teacher"]["weights_sha256"] == weights_hash(teacher)
    assert manifest["teacher"]["name"] == "timm:test_resnet"
    assert manifest["taps"]["logits"]["dtype"] == "float32" and manifest["taps"]["logits"]["shapes"] == [[10]]
    assert manifest["taps"]["layer1"]["dtype"] == "float16" and manifest["taps"]["layer1"]["shapes"] == [[32, 4, 4]]
    assert manifest["preprocessing"]["teacher_input"] == "pixel_values"
    assert manifest["preprocessing"]["input_shape"] == [3, 16, 16]
    assert manifest["data"]["num_examples"] == N and manifest["data"]["fingerprint"]
    assert manifest["hfdistill_version"].split(".")[0] == "0"


def test_cached_features_equal_live(cache_dir, data, teacher):
    """On the very batch it was built from, full logits are bit-identical and features equal up to fp16 rounding."""
    cache = TeacherCache(cache_dir)
    live = live_teacher(teacher, ["logits", "layer1"])
    for indices in (range(8, 16), [40, 3, 17, 29, 8]):  # one build batch; examples from several shards
        batch = batch_of(data, indices)
        cached, expected = cache.features(batch), live.features(batch)
        assert cached["logits"].dtype == torch.float32 and cached["layer1"].dtype == torch.float32
        if list(indices) == list(range(8, 16)):
            assert torch.equal(cached["logits"], expected["logits"])
        else:  # another batch composition: only the convolutions' float noise differs
            torch.testing.assert_close(cached["logits"], expected["logits"], rtol=0, atol=1e-6)
        layer1 = expected["layer1"]
        assert (cached["layer1"] - layer1).abs().max() <= (2 ** -11 * layer1.abs() + 1e-6).max()
    assert cache.model is None and cache.taps.attached is False
    cache.attach()
    assert cache.taps.attached
    cache.remove()
    torch.testing.assert_close(cache.logits(batch_of(data, [0, 1])), live.features(batch_of(data, [0, 1]))["logits"],
                               rtol=0, atol=1e-6)


def test_features_refuses_tap_and_batch_without_index(cache_dir, data):
    cache = TeacherCache(cache_dir)
    with pytest.raises(DistillationError, match=r"\['layer2'\].*holds logits, layer1"):
        cache.read(batch_of(data, [0]), ["layer2"])
    batch = batch_of(data, [0])
    del batch["index"]
    with pytest.raises(DistillationError, match="no `index`"):
        cache.features(batch)


def _losses(trainer, name):
    return [entry[name] for entry in trainer.state.log_history if name in entry]


def _run(tmp_path, teacher, data, recipe, name):
    trainer = DistillationTrainer(model=tiny_timm(seed=2), teacher=teacher, recipe=recipe,
                                  args=make_args(tmp_path / name, max_steps=3, logging_steps=1,
                                                 per_device_train_batch_size=8),
                                  train_dataset=data)
    trainer.train()
    return trainer


def test_cached_kd_run_gives_the_live_losses(tmp_path, cache_dir, data, teacher):
    """A kd run on the cache logs the live teacher's losses (full fp32 logits: equal up to float noise);
    with FitNet on fp16 features the mse term is within fp16 rounding."""
    kd = {"terms": [{"loss": "kd"}]}
    live = _run(tmp_path, teacher, data, kd, "live")
    cached = _run(tmp_path, TeacherCache(cache_dir), data, kd, "cached")
    assert cached.teacher is None and len(_losses(live, "loss_kd")) == 3
    assert _losses(cached, "loss_kd") == pytest.approx(_losses(live, "loss_kd"), rel=1e-5)
    live = _run(tmp_path, teacher, data, KD_FITNET, "live2")
    cached = _run(tmp_path, TeacherCache(cache_dir), data, KD_FITNET, "cached2")
    assert _losses(cached, "loss_mse") == pytest.approx(_losses(live, "loss_mse"), rel=2e-3)
    assert _losses(cached, "loss_kd") == pytest.approx(_losses(live, "loss_kd"), rel=2e-3)


def test_index_in_every_batch_with_a_cache(tmp_path, cache_dir, data):
    """No loss asks for `index`, but a cache teacher needs it: every training batch carries it."""
    trainer = DistillationTrainer(model=tiny_timm(seed=2), teacher=TeacherCache(cache_dir), recipe={"terms": [{"loss": "kd"}]},
                                  args=make_args(tmp_path, per_device_train_batch_size=8), train_dataset=data)
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["index"].shape == (8,) and int(batch["index"].max()) < N
    metrics = trainer.evaluate(eval_dataset=data)  # no teacher evaluation with a cache, and no error
    assert not any(k.startswith("eval_teacher") for k in metrics)


# ------------------------------------------------------------------------------ top-k logits
def test_topk_reconstruction_exact_at_temperature_one():
    torch.manual_seed(0)
    logits = torch.randn(32, 100) * 3
    k = 5
    values, indices, rest = topk_logits(logits, k)
    assert values.shape == (32, k) and indices.dtype == torch.int32 and rest.shape == (32,)
    full = reconstruct_logits(values, indices, rest, 100)
    p, q = logits.softmax(-1), full.softmax(-1)
    kept = indices.long()
    torch.testing.assert_close(q.gather(1, kept), p.gather(1, kept), rtol=1e-5, atol=1e-7)
    # The remaining mass, computed independently, is spread evenly over the 95 other classes.
    others = torch.ones_like(p, dtype=torch.bool).scatter_(1, kept, False)
    mass = torch.stack([p[i][others[i]].sum() for i in range(32)])
    spread = q[others].view(32, 95)
    torch.testing.assert_close(spread, (mass / 95).unsqueeze(1).expand(32, 95), rtol=1e-4, atol=1e-9)
    # The filled value never outranks a kept class.
    assert (spread.max(1).values <= q.gather(1, kept).min(1).values + 1e-9).all()
    # k = all classes: the logits themselves.
    values, indices, rest = topk_logits(logits, 100)
    torch.testing.assert_close(reconstruct_logits(values, indices, rest, 100), logits)


def test_topk_with_no_remaining_mass_stays_finite():
    logits = torch.tensor([[200.0, 0.0, -5.0, -9.0]])
    values, indices, rest = topk_logits(logits, 2)
    full = reconstruct_logits(values, indices, rest, 4)
    assert torch.isfinite(full).all()
    target = (full / 4).softmax(-1)
    assert torch.isfinite((target * (target.log() - torch.log_softmax(logits / 4, -1))).sum())


def kd_loss(student, teacher, temperature):
    """Hinton's KD written out: T^2 * sum_c p_T log(p_T / q_T), averaged over examples."""
    p = torch.softmax(teacher / temperature, -1)
    log_q = torch.log_softmax(student / temperature, -1)
    return float((temperature ** 2 * (p * (p.log() - log_q)).sum(-1)).mean())


@pytest.mark.parametrize("k, prob_bound, loss_t1, loss_t4", [(10, 0.045, 0.33, 2.2), (50, 0.007, 0.016, 0.43)])
def test_topk_error_at_other_temperatures(k, prob_bound, loss_t1, loss_t4):
    """What top-k costs, on a confident teacher (100 classes, logits ~ N(0, 2^2) plus 10 on one class) and a
    student near it (teacher + N(0, 1)); the module docstring quotes these numbers. At T=1 the kept classes'
    probabilities are exact; at T=4 they are off (max abs error ~0.039 with k=10, ~0.006 with k=50). KD's
    loss value also changes at T=1, since the teacher's probabilities of the other classes are replaced by
    their average (relative error ~0.32 with k=10, ~0.015 with k=50; at T=4 ~2.1 and ~0.42)."""
    torch.manual_seed(0)
    teacher = torch.randn(256, 100) * 2
    teacher[torch.arange(256), torch.randint(0, 100, (256,))] += 10
    student = teacher + torch.randn(256, 100)
    approx = reconstruct_logits(*topk_logits(teacher, k), 100)
    kept = teacher.topk(k, -1).indices
    for temperature, bound in ((1.0, 1e-6), (4.0, prob_bound)):
        p = torch.softmax(teacher / temperature, -1).gather(1, kept)
        q = torch.softmax(approx / temperature, -1).gather(1, kept)
        assert float((p - q).abs().max()) < bound
    assert float((torch.softmax(approx / 4, -1).gather(1, kept) - torch.softmax(teacher / 4, -1).gather(1, kept))
                 .abs().max()) > prob_bound / 10  # an approximation indeed
    for temperature, bound in ((1.0, loss_t1), (4.0, loss_t4)):
        exact = kd_loss(student, teacher, temperature)
        assert abs(kd_loss(student, approx, temperature) - exact) / exact < bound


def test_topk_cache_keeps_the_softmax(tmp_path, data, teacher):
    folder = build_cache(teacher, data, None, tmp_path / "topk", logits_top_k=3, batch_size=16, device="cpu",
                         progress=False)
    manifest = json.loads((Path(folder) / MANIFEST_NAME).read_text())
    assert manifest["taps"]["logits"]["top_k"] == 3 and list(manifest["taps"]) == ["logits"]
    batch = batch_of(data, range(16))
    cached = TeacherCache(folder).logits(batch)
    expected = live_teacher(teacher, ["logits"]).features(batch)["logits"]
    kept = expected.topk(3, -1).indices
    torch.testing.assert_close(cached.softmax(-1).gather(1, kept), expected.softmax(-1).gather(1, kept),
                               rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------------ refusals
def test_refuses_another_teacher(tmp_path, cache_dir, data, teacher):
    TeacherCache(cache_dir, teacher=teacher)  # its own teacher is accepted
    with pytest.raises(DistillationError, match="another teacher or other weights"):
        TeacherCache(cache_dir, teacher=tiny_timm(seed=5))
    # Building into a folder that holds another teacher's (partial) cache.
    folder = tmp_path / "c"
    build_cache(teacher, data, None, folder, batch_size=16, device="cpu", progress=False)
    with pytest.raises(DistillationError, match="teacher weights sha256.*another teacher"):
        build_cache(tiny_timm(seed=5), data, None, folder, batch_size=16, device="cpu", progress=False)


def test_refuses_other_build_options_in_the_same_folder(tmp_path, data, teacher):
    folder = tmp_path / "c"
    build_cache(teacher, data, None, folder, batch_size=16, device="cpu", progress=False)
    with pytest.raises(DistillationError, match="taps.*logits_top_k|taps"):
        build_cache(teacher, data, KD_FITNET, folder, logits_top_k=2, batch_size=16, device="cpu", progress=False)
    with pytest.raises(DistillationError, match="num_examples: 48 in the cache, 40 now"):
        build_cache(teacher, data.select(range(40)), None, folder, batch_size=16, device="cpu", progress=False)


def test_refuses_taps_the_cache_lacks(tmp_path, cache_dir, data):
    recipe = {"terms": [{"loss": "mse", "student": "layer2", "teacher": "layer2"}]}
    with pytest.raises(DistillationError, match=r"tap\(s\) \['layer2'\].*holds logits, layer1"):
        DistillationTrainer(model=tiny_timm(seed=2), teacher=TeacherCache(cache_dir), recipe=recipe,
                            args=make_args(tmp_path), train_dataset=data)


class LiveTeacherLoss(nn.Module):
    """A test method that would run the teacher on inputs of its own (as BSS, Sobolev, LwM, SSKD do)."""

    needs_live_teacher = True

    def forward(self, student, teacher):
        return (student.float() - teacher.float()).pow(2).mean()


@pytest.fixture
def live_loss():
    registry.register_loss("live_teacher_test", description="test", paper="none", year=2024, reads="logits",
                           default_tap="logits")(LiveTeacherLoss)
    yield "live_teacher_test"
    registry._LOSSES.pop("live_teacher_test")


def test_refuses_methods_that_call_the_teacher(tmp_path, cache_dir, data, teacher, live_loss):
    recipe = {"terms": [{"loss": "kd"}, {"name": "probe", "loss": live_loss}]}
    with pytest.raises(DistillationError, match=r"term 'probe' \(live_teacher_test\) calls the teacher on inputs"):
        DistillationTrainer(model=tiny_timm(seed=2), teacher=TeacherCache(cache_dir), recipe=recipe,
                            args=make_args(tmp_path), train_dataset=data)
    with pytest.raises(DistillationError, match="cannot use cached teacher outputs"):
        build_cache(teacher, data, recipe, tmp_path / "never", device="cpu", progress=False)
    assert not (tmp_path / "never").exists()
    # The same term with the live teacher is fine.
    DistillationTrainer(model=tiny_timm(seed=2), teacher=teacher, recipe=recipe, args=make_args(tmp_path),
                        train_dataset=data)


def test_refuses_data_of_another_size(tmp_path, cache_dir, data):
    with pytest.raises(DistillationError, match="holds 48 examples, but the training data has 40"):
        DistillationTrainer(model=tiny_timm(seed=2), teacher=TeacherCache(cache_dir), recipe={"terms": [{"loss": "kd"}]},
                            args=make_args(tmp_path), train_dataset=data.select(range(40)))


def test_refuses_other_data_of_the_same_size(tmp_path, cache_dir, data):
    other = data.select(list(reversed(range(N))))  # the same examples in another order: other indices
    with pytest.raises(DistillationError, match=r"training example\(s\) \[0, 1\] \(2 of 2 checked\) differ from those the teacher cache"):
        DistillationTrainer(model=tiny_timm(seed=2), teacher=TeacherCache(cache_dir), recipe={"terms": [{"loss": "kd"}]},
                            args=make_args(tmp_path), train_dataset=other)


def _with_pixels(dataset, fn):
    import datasets

    columns = dataset[:]
    pixels = fn(columns["pixel_values"])
    return datasets.Dataset.from_dict({"pixel_values": pixels.numpy(), "labels": columns["labels"].numpy()}
                                      ).with_format("torch")


def test_refuses_other_preprocessing(tmp_path, cache_dir, data):
    renormalised = _with_pixels(data, lambda x: (x - 0.1) / 0.9)  # other mean/std
    cache = TeacherCache(cache_dir)
    with pytest.raises(DistillationError, match="other preprocessing"):
        cache.features(batch_of(renormalised, range(8)))
    smaller = _with_pixels(data, lambda x: F.interpolate(x, size=(12, 12), mode="bilinear"))  # other resolution
    with pytest.raises(DistillationError, match=r"shape \[3, 12, 12\] per example here, but \[3, 16, 16\]"):
        DistillationTrainer(model=tiny_timm(seed=2), teacher=TeacherCache(cache_dir), recipe={"terms": [{"loss": "kd"}]},
                            args=make_args(tmp_path), train_dataset=smaller)


def test_augmented_training_warns_only_when_declared(tmp_path, cache_dir, data):
    flipped = _with_pixels(data, lambda x: x.flip(-1))  # what a flip augmentation gives (sums unchanged)
    with pytest.raises(DistillationError, match=r"augmented=True"):
        TeacherCache(cache_dir).features(batch_of(flipped, range(8)))
    cache = TeacherCache(cache_dir, augmented=True)
    with pytest.warns(UserWarning, match="augmented"):
        values = cache.features(batch_of(flipped, range(8)))
    torch.testing.assert_close(values["logits"], TeacherCache(cache_dir).features(batch_of(data, range(8)))["logits"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cache.features(batch_of(flipped, range(8, 16)))  # warned once


def test_refuses_missing_and_corrupt_shards(tmp_path, data, teacher):
    folder = Path(build_cache(teacher, data, None, tmp_path / "c", batch_size=16, shard_size=16, device="cpu",
                              progress=False))
    shard = folder / "shard-00001-of-00003.safetensors"
    content = bytearray(shard.read_bytes())
    content[-3] ^= 0xFF  # one bit pattern in the tensor data, the header intact
    shard.write_bytes(bytes(content))
    with pytest.raises(DistillationError, match=r"shard-00001-of-00003.*examples 16\.\.31.*is corrupt: its sha256"):
        TeacherCache(folder)
    kept = _mtimes(folder)
    build_cache(teacher, data, None, folder, batch_size=16, shard_size=16, device="cpu", progress=False)
    TeacherCache(folder)  # the corrupt shard was written again, the others kept
    assert _mtimes(folder)["shard-00000-of-00003.safetensors"] == kept["shard-00000-of-00003.safetensors"]
    assert _mtimes(folder)[shard.name] != kept[shard.name]
    shard.unlink()
    with pytest.raises(DistillationError, match=r"shard-00001-of-00003.*is missing.*writes only the missing shards"):
        TeacherCache(folder)
    build_cache(teacher, data, None, folder, batch_size=16, shard_size=16, device="cpu", progress=False)
    TeacherCache(folder)  # built again: complete


def test_refuses_another_major_version_and_incomplete_caches(tmp_path, cache_dir, data, teacher):
    with pytest.raises(DistillationError, match="no teacher cache at"):
        TeacherCache(tmp_path / "nothing")
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in cache_dir.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    manifest = json.loads((copy / MANIFEST_NAME).read_text())
    manifest["hfdistill_version"] = "1.0.0"
    (copy / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(DistillationError, match=r"written by hfdistill 1\.0\.0.*another major version"):
        TeacherCache(copy)
    (copy / MANIFEST_NAME).unlink()
    with pytest.raises(DistillationError, match="incomplete.*run the same build again"):
        TeacherCache(copy)


def test_refuses_views_without_replayable_augmentation_and_bad_options(tmp_path, data, teacher):
    with pytest.raises(DistillationError, match=r"views=4: augmented views are drawn by the data's own augmentation"):
        build_cache(teacher, data, None, tmp_path / "v", views=4)
    with pytest.raises(DistillationError, match="views must be a positive integer"):
        build_cache(teacher, data, None, tmp_path / "v", views=0)
    with pytest.raises(DistillationError, match="feature_dtype"):
        build_cache(teacher, data, None, tmp_path / "v", feature_dtype="int8")
    with pytest.raises(DistillationError, match="logits_top_k"):
        build_cache(teacher, data, None, tmp_path / "v", logits_top_k=0)
    assert not (tmp_path / "v").exists()


def test_refuses_features_beyond_float16(tmp_path, data):
    class Loud(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Linear(768, 10)
            self.body.weight.data.mul_(1e6)  # features up to ~1e6: beyond float16

        def forward(self, x):
            return self.body(x.flatten(1))

    with pytest.raises(DistillationError, match="beyond float16's range.*float32"):
        build_cache(Loud(), data, None, tmp_path / "loud", taps=["body"], device="cpu", progress=False)
    folder = build_cache(Loud(), data, None, tmp_path / "loud32", taps=["body"], feature_dtype="float32",
                         device="cpu", progress=False)
    assert json.loads((Path(folder) / MANIFEST_NAME).read_text())["taps"]["body"]["dtype"] == "float32"


# ------------------------------------------------------------------------------ resume and ranks
def _mtimes(folder):
    return {p.name: p.stat().st_mtime_ns for p in Path(folder).glob("shard-*")}


def test_interrupted_build_resumes_and_keeps_complete_shards(tmp_path, data, teacher, monkeypatch):
    folder = tmp_path / "c"
    calls = {"n": 0}
    original = Teacher.features

    def interrupted(self, batch):
        calls["n"] += 1
        if calls["n"] == 6:  # the probe, then 4 batches (2 shards of 2 batches), then Ctrl-C
            raise KeyboardInterrupt
        return original(self, batch)

    monkeypatch.setattr(Teacher, "features", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build_cache(teacher, data, None, folder, batch_size=8, shard_size=16, device="cpu", progress=False)
    first = _mtimes(folder)
    assert sorted(first) == ["shard-00000-of-00003.safetensors", "shard-00001-of-00003.safetensors"]
    assert not (folder / MANIFEST_NAME).exists() and not list(folder.glob(".shard*"))  # no partial shard
    with pytest.raises(DistillationError, match="incomplete"):
        TeacherCache(folder)
    calls["n"] = -100
    build_cache(teacher, data, None, folder, batch_size=8, shard_size=16, device="cpu", progress=False)
    assert calls["n"] == -100 + 1 + 2  # the probe and the last shard's 2 batches only
    after = _mtimes(folder)
    assert all(after[name] == mtime for name, mtime in first.items())
    single = build_cache(teacher, data, None, tmp_path / "one", batch_size=8, shard_size=16, device="cpu",
                         progress=False)
    batch = batch_of(data, [1, 20, 47])
    assert torch.equal(TeacherCache(folder).logits(batch), TeacherCache(single).logits(batch))


def test_resume_refuses_shards_of_other_data(tmp_path, data, teacher):
    folder = tmp_path / "c"
    build_cache(teacher, data, None, folder, batch_size=8, shard_size=16, device="cpu", progress=False)
    (folder / MANIFEST_NAME).unlink()
    (folder / "shard-00002-of-00003.safetensors").unlink()
    other = data.select(list(range(16, 32)) + list(range(16)) + list(range(32, 48)))  # same size, shards swapped
    with pytest.raises(DistillationError, match="shard-00000.*other data or preprocessing"):
        build_cache(teacher, other, None, folder, batch_size=8, shard_size=16, device="cpu", progress=False)


def test_two_ranks_write_disjoint_shards_and_one_manifest(tmp_path, data, teacher):
    folder = tmp_path / "c"
    build_cache(teacher, data, KD_FITNET, folder, batch_size=8, shard_size=10, rank=1, world_size=2, device="cpu",
                progress=False)
    assert sorted(_mtimes(folder)) == ["shard-00001-of-00005.safetensors", "shard-00003-of-00005.safetensors"]
    assert not (folder / MANIFEST_NAME).exists()
    with pytest.raises(DistillationError, match=r"missing shard\(s\) \[0, 2, 4\], written by rank\(s\) \[0\] of 2"):
        _wait_as_rank0(folder, data, teacher)  # rank 0 finds rank 0's shards missing (as if it had not run)
    rank1 = _mtimes(folder)
    build_cache(teacher, data, KD_FITNET, folder, batch_size=8, shard_size=10, rank=0, world_size=2, device="cpu",
                progress=False)
    assert sorted(_mtimes(folder)) == [f"shard-0000{i}-of-00005.safetensors" for i in range(5)]
    assert all(_mtimes(folder)[name] == mtime for name, mtime in rank1.items())
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    assert [(s["start"], s["stop"]) for s in manifest["shards"]] == [(0, 10), (10, 20), (20, 30), (30, 40), (40, 48)]
    single = build_cache(teacher, data, KD_FITNET, tmp_path / "one", batch_size=8, shard_size=10, device="cpu",
                         progress=False)
    batch = batch_of(data, range(0, N, 3))
    two, one = TeacherCache(folder).features(batch), TeacherCache(single).features(batch)
    assert torch.equal(two["logits"], one["logits"]) and torch.equal(two["layer1"], one["layer1"])


def _wait_as_rank0(folder, data, teacher):
    from hfdistill import cache as cache_module

    builder = cache_module._Builder(Teacher(teacher, ["logits"]), data, folder, ["logits"], top_k=None,
                                    feature_dtype="float16", batch_size=8, shard_size=10, collator=PaddingCollator(),
                                    num_workers=0, progress=False)
    cache_module._wait_for_shards(builder, 2, wait_timeout=0)


# ------------------------------------------------------------------------------ the command line
def test_cli_cache_then_train_with_it(tmp_path, capsys):
    """`hfdistill cache` builds from a recipe; `hfdistill train` with `teacher: {cache: DIR}` uses it; a cache
    of other data, or of another teacher named beside it, exits 2."""
    from test_cli import tiny_recipe, write

    from hfdistill.cli import main

    recipe = tiny_recipe(tmp_path)
    recipe["terms"].append({"loss": "mse", "student": "conv_stem", "teacher": "conv1", "adapter": "conv1x1"})
    path = write(tmp_path, recipe)
    folder = tmp_path / "cache"
    assert main(["cache", path, "--output", str(folder), "--batch_size", "32"]) == 0
    out = capsys.readouterr().out
    assert f"teacher: {{cache: {folder}}}" in out and "128 examples" in out
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    assert sorted(manifest["taps"]) == ["conv1", "logits"] and manifest["preprocessing"]["image"]["size"] == [16, 16]

    with pytest.warns(UserWarning, match="data.augment is 'crop'"):
        assert main(["train", path, "--teacher", f"{{cache: {folder}, name: 'timm:test_resnet', pretrained: false}}"]) == 0
    out = capsys.readouterr().out
    assert "student (distilled)" in out and "timm:test_resnet (cache" in out
    assert (Path(recipe["training"]["output_dir"]) / "model.safetensors").is_file()
    card_text = (Path(recipe["training"]["output_dir"]) / "README.md").read_text()
    assert "distilled from the teacher `timm:test_resnet`" in card_text  # the card names the cached teacher

    with pytest.warns(UserWarning, match="data.augment"):
        assert main(["check", path, "--teacher", f"{{cache: {folder}}}", "--training.overwrite_output_dir", "true"]) == 0
    out = capsys.readouterr().out
    assert "teacher: timm:test_resnet (cache cache) (373.66k parameters)" in out and "OK:" in out

    again = ["--training.overwrite_output_dir", "true"]  # the result above may be replaced; these fail earlier
    assert main(["train", path, "--teacher", f"{{cache: {folder}}}", "--data.max_train_samples", "100", *again]) == 2
    assert "holds 128 examples, but the training data has 100" in " ".join(capsys.readouterr().err.split())
    assert main(["train", path, "--teacher", f"{{cache: {folder}, name: 'timm:test_resnet', pretrained: false}}",
                 "--training.seed", "7", *again]) == 2  # another initialisation: another teacher
    assert "another teacher or other weights" in " ".join(capsys.readouterr().err.split())
    assert main(["cache", path, "--output", str(folder), "--logits_top_k", "0"]) == 2


@pytest.mark.parametrize("teacher, path, message", [
    ({"cache": "runs/c", "train_from": {"name": "timm:resnet18"}}, "teacher.train_from", "does not go with `cache:`"),
    ({"cache": "runs/c", "dtype": "bfloat16"}, "teacher.dtype", "does not go with `cache:`"),
    ({"cache": " "}, "teacher.cache", "is empty"),
    ({"pretrained": True}, "teacher.name", "missing required field.*or `cache: DIR`"),
])
def test_recipe_teacher_cache_field(teacher, path, message):
    from hfdistill import Recipe, RecipeError

    recipe = Recipe.from_dict({"teacher": {"cache": "runs/c"}, "terms": [{"loss": "kd"}]})
    assert recipe.teacher.cache == "runs/c" and recipe.teacher.name is None
    assert recipe.to_dict()["teacher"] == {"cache": "runs/c"}
    assert Recipe.from_dict({"teacher": {"cache": "runs/c", "name": "timm:resnet18"}, "terms": []}).teacher.name
    with pytest.raises(RecipeError, match=rf"at {path}: {message}"):
        Recipe.from_dict({"teacher": teacher, "terms": [{"loss": "kd"}]})
    with pytest.raises(RecipeError, match="at student.cache: only the teacher"):
        Recipe.from_dict({"student": {"name": "timm:resnet18", "cache": "runs/c"}})


# ------------------------------------------------------------------------------ text: sequence taps
class Sentences(torch.utils.data.Dataset):
    """Token lists of different lengths (so batches are padded to different lengths)."""

    def __init__(self, tokenizer, n=20):
        words = ["alpha", "beta", "gamma", "delta", "omega"]
        texts = [" ".join(words[(i + j) % 5] for j in range(1 + i % 7)) for i in range(n)]
        self.rows = [{**tokenizer(t), "labels": i % 2} for i, t in enumerate(texts)]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return dict(self.rows[i])


def test_sequence_taps_come_back_at_the_batch_length(tmp_path):
    """Hidden states and attention maps are stored per example and returned padded to the training batch's
    length; on real tokens they are the live teacher's values (fp32: exact up to the padding's float noise)."""
    from tests_helpers import TINY_BERT, tiny_tokenizer
    from transformers import BertConfig, BertForSequenceClassification

    tokenizer = tiny_tokenizer(tmp_path / "tok", ["alpha", "beta", "gamma", "delta", "omega"])
    torch.manual_seed(0)
    teacher = BertForSequenceClassification(BertConfig(**TINY_BERT, num_labels=2, vocab_size=len(tokenizer)))
    data = Sentences(tokenizer)
    taps = ["hidden_states", "attentions", "hidden_states.1"]
    collator = PaddingCollator({"input_ids": tokenizer.pad_token_id, "attention_mask": 0, "token_type_ids": 0})
    folder = build_cache(teacher, data, None, tmp_path / "c", taps=taps, feature_dtype="float32", batch_size=4,
                         shard_size=8, collator=collator, device="cpu", progress=False)
    manifest = json.loads((Path(folder) / MANIFEST_NAME).read_text())
    assert manifest["taps"]["hidden_states"]["kind"] == "list" and len(manifest["taps"]["hidden_states"]["shapes"]) == 3
    assert manifest["taps"]["hidden_states"]["seq_dims"][0] == [0]
    assert manifest["taps"]["attentions"]["seq_dims"][0] == [1, 2]  # [heads, L, L]
    assert manifest["taps"]["logits"]["seq_dims"] == [[]] and manifest["preprocessing"]["input_shape"] is None

    cache = TeacherCache(folder)
    live = Teacher(teacher, ["logits", *taps], shared_input_names=["input_ids", "attention_mask", "token_type_ids"])
    live.attach()
    for indices in ([0, 6, 13, 19], [1, 2, 8]):  # other batch compositions and lengths than at build time
        batch = IndexedCollator(collator)(IndexedDataset(data).__getitems__(indices))
        length = batch["input_ids"].shape[1]
        cached, expected = cache.features(batch), live.features(batch)
        mask = batch["attention_mask"].bool()
        for c, e in zip(cached["hidden_states"], expected["hidden_states"]):
            assert c.shape == e.shape == (len(indices), length, 32)
            torch.testing.assert_close(c[mask], e[mask], rtol=1e-4, atol=1e-5)
            assert (c[~mask] == 0).all()
        torch.testing.assert_close(cached["hidden_states.1"], cached["hidden_states"][1])
        for c, e in zip(cached["attentions"], expected["attentions"]):
            assert c.shape == e.shape == (len(indices), 2, length, length)
            both = (mask[:, None, :, None] & mask[:, None, None, :]).expand_as(c)
            torch.testing.assert_close(c[both], e[both], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(cached["logits"], expected["logits"], rtol=1e-4, atol=1e-5)


def test_memory_mapped_shards_read_what_safetensors_wrote(tmp_path):
    """map_safetensors gives the file's tensors (every dtype a cache stores, empty ones too) without loading it."""
    import safetensors.torch

    from hfdistill.cache import map_safetensors

    tensors = {"f32": torch.randn(5, 3), "f16": torch.randn(4, 2).half(), "bf16": torch.randn(3, 7).bfloat16(),
               "i64": torch.arange(9).view(3, 3), "i32": torch.arange(4, dtype=torch.int32), "f64": torch.randn(2).double(),
               "empty": torch.zeros(0, 4), "b": torch.tensor([True, False])}
    path = tmp_path / "t.safetensors"
    safetensors.torch.save_file(tensors, str(path), metadata={"format": "pt"})
    mapped = map_safetensors(path)
    assert set(mapped) == set(tensors)
    for name, value in tensors.items():
        assert mapped[name].dtype == value.dtype and torch.equal(mapped[name], value), name
    rows = mapped["f32"][torch.tensor([4, 0])]
    torch.testing.assert_close(rows, tensors["f32"][[4, 0]])


def test_memory_mapped_cache_gives_the_loaded_values(cache_dir, data):
    batch = batch_of(data, [3, 1, 40, 7])
    mapped, loaded = TeacherCache(cache_dir), TeacherCache(cache_dir, memory_map=False)
    for tap, value in loaded.read(batch, loaded.active_taps).items():
        torch.testing.assert_close(mapped.read(batch, [tap])[tap], value)


# ------------------------------------------------------------------------------ augmented views (FKD)
def augmenting_digits(n=N):
    """Digits as uint8 arrays behind hfdistill's batched, reproducible crop-and-flip training transform."""
    from conftest import digits_arrays

    from hfdistill.data import ArrayImageDataset, ImageArrays, ImageTransform
    from hfdistill.models import ImageConfig

    images, labels = digits_arrays(16)
    pixels = ((images[:n] + 1) * 127.5).round().to(torch.uint8)
    config = ImageConfig(size=(16, 16), channels=3, mean=(0.5,) * 3, std=(0.5,) * 3)
    return ArrayImageDataset(ImageArrays(pixels, labels[:n]), ImageTransform(config, train=True, augment="crop_flip"))


def test_augmented_views_store_the_teachers_outputs_on_each_replayable_view(tmp_path, teacher):
    data = augmenting_digits()
    folder = build_cache(teacher, data, {"terms": [{"loss": "kd"}]}, tmp_path / "views", views=3, view_seed=7,
                         batch_size=8, shard_size=20, device="cpu", progress=False)
    manifest = json.loads((Path(folder) / MANIFEST_NAME).read_text())
    assert manifest["data"]["views"] == 3 and manifest["data"]["rows"] == 3 * N and manifest["data"]["view_seed"] == 7
    assert manifest["shards"][-1]["stop"] == 3 * N  # shards of rows, across view boundaries
    cache, live = TeacherCache(folder), live_teacher(teacher, ["logits"])
    views = []
    for view in (0, 1, 2, 1):
        data.set_augmentation_epoch(view, 7)
        cache.set_view(view)
        batch = batch_of(data, [0, 5, 19, 20, 47])
        torch.testing.assert_close(cache.features(batch)["logits"], live.features(batch)["logits"], rtol=1e-5, atol=1e-5)
        views.append(batch["pixel_values"])
    assert not torch.equal(views[0], views[1]) and torch.equal(views[1], views[3])  # each view its own crops
    # Another view's images do not match the stored ones.
    cache.set_view(0)
    data.set_augmentation_epoch(1, 7)
    with pytest.raises(DistillationError, match="differ from those the teacher cache"):
        cache.features(batch_of(data, list(range(8))))


def test_training_replays_view_epoch_mod_n(tmp_path, teacher):
    """Each epoch the data draws the augmentations of view epoch % N and the cache reads that view: the trainer's
    strict input checks pass over 4 epochs (3 views), and the cache read views 0, 1, 2, 0."""
    data = augmenting_digits()
    folder = build_cache(teacher, data, {"terms": [{"loss": "kd"}]}, tmp_path / "views", views=3, view_seed=3,
                         batch_size=8, device="cpu", progress=False)
    cache = TeacherCache(folder, check_batches=10**6)  # every batch compared with the stored checksums
    seen = []
    set_view = cache.set_view
    cache.set_view = lambda epoch: seen.append(set_view(epoch)) or cache.view
    trainer = DistillationTrainer(model=tiny_timm(seed=2), teacher=cache, recipe={"terms": [{"loss": "kd"}]},
                                  args=make_args(tmp_path / "run", max_steps=-1, num_train_epochs=4,
                                                 per_device_train_batch_size=8), train_dataset=data)
    trainer.train()
    assert seen[-4:] == [0, 1, 2, 0] and cache._checked >= 4 * N // 8  # every training batch (and the dry run)


def test_views_need_data_that_replays_its_augmentation(tmp_path, data, teacher):
    folder = build_cache(teacher, augmenting_digits(), None, tmp_path / "v", views=2, batch_size=16, device="cpu",
                         progress=False)
    with pytest.raises(DistillationError, match="no reproducible augmentation"):
        DistillationTrainer(model=tiny_timm(seed=2), teacher=TeacherCache(folder), recipe={"terms": [{"loss": "kd"}]},
                            args=make_args(tmp_path / "run"), train_dataset=data)


def test_cli_cache_of_augmented_views_then_train_replaying_them(tmp_path, capsys):
    """`hfdistill cache --views 2` on a recipe that augments (digits: random crops); `hfdistill train` with the
    cache replays view epoch % 2 without a warning; a recipe without augmentation is refused for views."""
    import warnings as warnings_module

    from test_cli import tiny_recipe, write

    from hfdistill.cli import main

    recipe = tiny_recipe(tmp_path)
    recipe["training"].update(num_train_epochs=3, max_steps=-1)
    path = write(tmp_path, recipe)
    folder = tmp_path / "cache"
    assert main(["cache", path, "--output", str(folder), "--views", "2"]) == 0
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    assert manifest["data"]["views"] == 2 and manifest["data"]["rows"] == 2 * manifest["data"]["num_examples"]
    assert manifest["data"]["view_seed"] == recipe["training"].get("seed", 42)
    with warnings_module.catch_warnings():
        warnings_module.simplefilter("error", UserWarning)  # no "augmented while the cache holds one view" warning
        assert main(["train", path, "--teacher", f"{{cache: {folder}}}"]) == 0
    assert "student (distilled)" in capsys.readouterr().out
    again = ["--training.overwrite_output_dir", "true"]
    assert main(["train", path, "--teacher", f"{{cache: {folder}}}", "--data.augment", "none", *again]) == 2
    assert "holds 2 augmented views" in " ".join(capsys.readouterr().err.split())
    assert main(["cache", path, "--output", str(tmp_path / "c2"), "--views", "2", "--data.augment", "none"]) == 2
    assert main(["cache", path, "--output", str(tmp_path / "c2"), "--views", "0"]) == 2
