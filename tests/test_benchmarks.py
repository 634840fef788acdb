"""The speed benchmarks run end to end at their `--tiny` size and write every row they promise.

benchmarks/peers_speed.py: every system has a row for both methods, with numbers or a reason it was
skipped (torchdistill missing, timm unable to express FitNet); none failed; the Trainer-based systems that
do the same work from the same seed reach the same accuracy. benchmarks/step_overhead.py: every pair has
its time and memory rows and both leak-check runs are there.
"""

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NUMBER = re.compile(r"^-?\d+(\.\d+)?$")


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


def table_rows(text: str, heading: str) -> list[list[str]]:
    """The cells of the table under the markdown heading that starts with ``heading``."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("#") and line.lstrip("# ").startswith(heading))
    rows = []
    for line in lines[start + 1:]:
        if line.startswith("#"):
            break
        if line.startswith("|") and not line.startswith("|---"):
            rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return rows[1:]  # without the header row


@pytest.fixture(scope="module")
def peers(tmp_path_factory):
    module = load("peers_speed")
    out = tmp_path_factory.mktemp("peers") / "peers_speed_cpu.md"
    assert module.main(["--tiny", "--out", str(out)]) == 0
    return module, out.read_text(), json.loads(out.with_suffix(".json").read_text())


@pytest.mark.parametrize("heading, method", [("KD", "kd"), ("FitNet", "fitnet")])
def test_peers_speed_rows(peers, heading, method):
    module, text, raw = peers
    assert "Tiny run" in text and "Machine:" in text and "Date:" in text
    assert "Command: `python benchmarks/peers_speed.py --tiny" in text
    rows = {cells[0]: cells for cells in table_rows(text, heading)}
    assert set(rows) == set(module.SYSTEMS.values())
    torchdistill_here = importlib.util.find_spec("torchdistill") is not None
    for system, label in module.SYSTEMS.items():
        cells = rows[label]
        note = cells[-1]
        assert "failed" not in note, f"{label}: {note}"
        skipped = (system == "timm" and method == "fitnet") or (system == "torchdistill" and not torchdistill_here)
        if skipped:
            assert note.startswith("skipped: ") and len(note) > 30, f"{label} must say why it was skipped: {note}"
            assert cells[1] == "-"
        else:
            seconds, ratio, rounds, data_s, setup_s = cells[1:6]
            assert all(NUMBER.match(v) for v in (seconds, ratio, data_s, setup_s)), cells
            assert all(NUMBER.match(v) for v in rounds.split(", ")), cells  # one ratio per round
            assert float(seconds) > 0
            assert 0 <= float(cells[6].split()[0]) <= 1  # accuracy
    reference = "torchdistill" if torchdistill_here else "trainer"
    assert f"vs {reference}" in text
    if not torchdistill_here:
        assert "torchdistill is not installed" in rows[module.SYSTEMS["torchdistill"]][-1]


def test_peers_speed_equal_work_equal_accuracy(peers):
    """(c), (c2), (d), (e), (f), (g) and (h) do the same KD from the same weights and seed: the same accuracy."""
    _, _, raw = peers
    found = {r["system"]: r["accuracy"][0] for r in raw["rows"] if r["method"] == "kd" and r["accuracy"]}
    same = [found[s] for s in ("trainer", "trainer-datasets", "hfdistill-tensors", "hfdistill-datasets",
                               "hfdistill-recipe", "hfdistill-channels-last",
                               "hfdistill-default-optim")]
    assert max(same) - min(same) <= 0.05, found


def test_step_overhead_rows(tmp_path):
    module = load("step_overhead")
    out = tmp_path / "step_overhead_cpu.md"
    assert module.main(["--tiny", "--pairs", "cnn-small", "cnn-224", "r34-224", "bert", "--out", str(out)]) == 0
    text = out.read_text()
    assert "Machine:" in text and "Date:" in text and "Command: `python benchmarks/step_overhead.py --tiny" in text
    times = table_rows(text, "Time per optimisation step")
    memory = table_rows(text, "Peak memory")
    leaks = table_rows(text, "Leak check")
    for pair in ("cnn-small", "cnn-224", "r34-224", "bert"):
        (row,) = [cells for cells in times if cells[0].startswith(pair + ":")]
        numbers = row[1:7] + row[9:]  # row[7]: the per-round ratios, "C/(A+B), D/A; ..."; row[8]: examples / s
        assert all(NUMBER.match(v) for v in numbers), row
        assert all(float(v) > 0 for v in row[1:5])
        assert all(NUMBER.match(v) for v in row[7].replace(";", ",").split(", ")), row
        batch = int(re.search(r"batch (\d+)", row[0]).group(1))
        throughput = [float(v) for v in row[8].split(", ")]  # A, C, D: batch / step time
        assert throughput == pytest.approx([batch / (float(row[i]) / 1000) for i in (1, 3, 4)], rel=0.02, abs=0.1)
        (row,) = [cells for cells in memory if cells[0] == pair]
        assert all(NUMBER.match(v) for v in row[1:]), row
    assert [cells[0] for cells in leaks] == ["cnn-small, live KD", "cnn-small, cached KD"]
    assert all(cells[-1] in ("yes", "NO") for cells in leaks)
    raw = json.loads(out.with_suffix(".json").read_text())
    assert [p["pair"] for p in raw["pairs"]] == ["cnn-small", "cnn-224", "r34-224", "bert"]
    assert "Not measured: no CUDA device here" in text  # E: a second CUDA stream


@pytest.mark.parametrize("pair", ["cnn-small", "bert"])
def test_step_overhead_overlapped_loop_does_the_sequential_work(pair):
    """E's loop that runs the teacher one batch ahead (on a second CUDA stream on a GPU; in sequence here) must
    give each batch its own teacher logits: from the same start both loops train the same student."""
    import torch

    module = load("step_overhead")
    args = module.parse_args(["--tiny"])
    chosen = module.make_pairs(tiny=True)[pair]
    dataset = chosen.dataset(chosen.batch * (args.warmup + 3))
    args.steps = 3
    loops = module.overlap_loops(args, chosen, dataset)
    (sequential_s, sequential), (overlapped_s, overlapped) = loops["sequential"], loops["overlapped"]
    assert sequential_s > 0 and overlapped_s > 0
    start = chosen.student().state_dict()
    trained = sequential.state_dict()
    assert any(not torch.equal(start[k], v) for k, v in trained.items())
    for name, value in overlapped.state_dict().items():
        torch.testing.assert_close(value, trained[name], rtol=0, atol=0, msg=name)


# ------------------------------------------------------------------------------ causal LM token losses
def test_causal_lm_token_losses_tiny_rows(tmp_path):
    """benchmarks/causal_lm_token_losses.py --tiny: a row for the student alone and each requested loss, each with
    a numeric perplexity (per seed and mean) and times, the teacher's perplexity once, machine and date lines."""
    pytest.importorskip("chatterbot_corpus")
    module = load("causal_lm_token_losses")
    out = tmp_path / "causal_lm_token_losses_cpu.md"
    assert module.main(["--tiny", "--out", str(out), "--workdir", str(tmp_path / "work")]) == 0
    text = out.read_text()
    assert "Tiny run" in text and "smoke test" in text
    assert "Machine:" in text and "Date:" in text and "torch" in text and "transformers" in text and "hfdistill" in text
    assert "Command: `python benchmarks/causal_lm_token_losses.py --tiny" in text
    assert "## What the numbers say" in text and "(written when the run ends)" not in text
    rows = {cells[0]: cells for cells in table_rows(text, "Perplexity per row")}
    expected = ["student alone", *module.TINY_LOSSES]
    assert set(expected) <= set(rows) and len(module.TINY_LOSSES) == 2
    for name in expected:
        _, loss, ppl, per_seed, wall_s, train_s, gain, note = rows[name]
        assert "failed" not in note and "failed" not in per_seed, rows[name]
        assert NUMBER.match(ppl) and 1 < float(ppl) < 1e4, rows[name]  # one seed: no "± std"
        assert re.fullmatch(r"s0: \d+\.\d+", per_seed), rows[name]
        assert NUMBER.match(wall_s) and float(wall_s) > 0 and NUMBER.match(train_s), rows[name]
        if name == "student alone":
            assert gain == "-"
        else:
            assert re.fullmatch(r"[+-]\d+\.\d+", gain), rows[name]
    assert NUMBER.match(rows["teacher"][2])
    assert "jsd (beta=0.5)" in rows["jsd"][1] and rows["student alone"][1] == "1 next-token"
    raw = json.loads(out.with_suffix(".json").read_text())
    assert raw["args"]["tiny"] and raw["date"] and raw["machine"]["cpu"] and not raw["running"]
    assert raw["teacher"]["perplexity"] > 1 and raw["teacher"]["train_seconds"] >= 0
    assert [r["row"] for r in raw["rows"]] == expected
    for run in raw["runs"]:
        assert "error" not in run and run["seed"] == 0
        assert run["perplexity"] > 1 and run["wall_seconds"] > 0 and run["train_seconds"] >= 0
    assert not any((tmp_path / "work").glob("*-seed0")), "each run's folder is removed once read"
    # A failed run is a row with its error, not a crash: rendered from records, no training.
    records = raw["runs"][:2] + [{"row": module.TINY_LOSSES[1], "seed": 0, "error": "RuntimeError: boom"}]
    info = {"command": "x", "machine": raw["machine"], "args": raw["args"], "overrides": {}, "date": raw["date"],
            "total_seconds": 1.0}
    failed_out = tmp_path / "failed.md"
    module.write_report(failed_out, records, expected, info, raw["teacher"], running=False)
    failed = {cells[0]: cells for cells in table_rows(failed_out.read_text(), "Perplexity per row")}
    assert failed[module.TINY_LOSSES[1]][2] == "-" and "s0: failed" in failed[module.TINY_LOSSES[1]][3]
    assert "RuntimeError: boom" in failed[module.TINY_LOSSES[1]][-1]
    assert NUMBER.match(failed[module.TINY_LOSSES[0]][2])


# ------------------------------------------------------------------------------ dense prediction on the scenes
FMNIST = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.skipif(not (FMNIST / "t10k-images-idx3-ubyte.gz").is_file(),
                    reason="Fashion-MNIST files absent (apt install dataset-fashion-mnist)")
def test_dense_scenes_quick_rows(tmp_path):
    """benchmarks/dense_scenes.py --quick: every recipe of recipes/fashion_mnist_scenes/<task>/ is a row with its
    metric (mean IoU, mAP) and times, each task's teacher once, the data said to be synthetic; and the rows cover
    every dense method of issue 13 (pixel-wise, pair-wise, CWD on logits and features, FitNet, MGD, DETRDistill)."""
    module = load("dense_scenes")
    out = tmp_path / "dense_scenes.md"
    assert module.main(["--quick", "--out", str(out), "--cache-dir", str(tmp_path / "cache")]) == 0
    text = out.read_text()
    assert "synthetic" in text and "not comparable" in text and "Machine" in text
    assert "Command: `python benchmarks/dense_scenes.py --quick" in text
    for task, heading, metric in (("segmentation", "Segmentation", "mean_iou"), ("detection", "Detection", "map")):
        rows = {cells[0]: cells for cells in table_rows(text, heading)}
        methods = list(module.recipe_files(task))
        assert set(rows) == {"teacher", *methods}, (task, rows)
        assert methods[0] == "baseline" and rows["baseline"][4] == "-"
        for name in methods:
            _, terms, seeds, value, gain, *_, train = rows[name]
            assert seeds == "42" and NUMBER.match(value) and 0 <= float(value) <= 1, rows[name]
            assert re.fullmatch(r"\d+ s", train), rows[name]
            if name != "baseline":
                assert re.fullmatch(r"[+-]\d+\.\d+", gain), rows[name]
        assert NUMBER.match(rows["teacher"][3]) and "trained in" in rows["teacher"][-1]
        records = [json.loads(line) for line in out.with_suffix(".jsonl").read_text().splitlines()]
        assert all(metric in r and "error" not in r for r in records if r["task"] == task)
    losses = {term["loss"] for task in module.TASKS for path in module.recipe_files(task).values()
              for term in module.row_spec(path)["terms"]}
    assert {"pixel_kd", "pairwise_affinity", "cwd", "fitnet", "mgd", "detection_logit_kd"} <= losses
    cwd_taps = {term["student"] for path in module.recipe_files("segmentation").values()
                for term in module.row_spec(path)["terms"] if term["loss"] == "cwd"}
    assert "logits" in cwd_taps and len(cwd_taps) == 2  # on the logits and on a feature map, as the paper
