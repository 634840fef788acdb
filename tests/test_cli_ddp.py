"""`accelerate launch --multi_gpu --num_processes 2 -m hfdistill train` on the CPU is one data-parallel run.

The CLI itself is launched (through tests/cli_launch_probe.py, which runs ``python -m hfdistill`` and, after
each training, writes what each process holds), as a user would, without `use_cpu` or a backend in the
recipe: the step count is the global batch's, the processes end with identical weights, only complete
checkpoints are kept (every epoch, `save_total_limit`), and a resume of the run continues it exactly.
"""

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import safetensors
import safetensors.torch
import torch
import yaml

from hfdistill.outputs import CHECKPOINT_COMPLETE_NAME, DISTILL_STATE_NAME

HERE = Path(__file__).parent
CONFIGS = HERE.parent / "examples" / "accelerate_configs"
PER_RANK_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")  # batch-norm statistics: per process
pytestmark = pytest.mark.skipif(shutil.which("accelerate") is None, reason="the accelerate launcher is not on PATH")

TRAIN_EXAMPLES, BATCH, PROCESSES = 128, 16, 2
STEPS_PER_EPOCH = TRAIN_EXAMPLES // (BATCH * PROCESSES)  # 4; one process alone would take 8


def recipe(tmp_path, **changes) -> dict:
    base = {
        "task": "image-classification",
        "teacher": {"name": "timm:test_resnet", "pretrained": False},
        "student": {"name": "timm:test_efficientnet"},
        "data": {"name": "sklearn-digits", "image_size": 16, "max_train_samples": TRAIN_EXAMPLES,
                 "max_eval_samples": 96},
        "terms": [{"loss": "kd", "weight": 0.5, "params": {"temperature": 4}},
                  {"loss": "mse", "student": "blocks.2", "teacher": "layer3", "adapter": "conv1x1"}],
        "training": {
            "output_dir": str(tmp_path / "out" / "student"), "num_train_epochs": 3,
            "per_device_train_batch_size": BATCH, "per_device_eval_batch_size": 32, "learning_rate": 0.003,
            "lr_scheduler_type": "constant", "logging_steps": 2, "save_strategy": "epoch", "save_total_limit": 2,
            "seed": 3,
        },
    }
    base.update(changes)
    return base


def launch(tmp_path, recipe_dict: dict, *overrides: str, config_file: Path | None = None) -> subprocess.CompletedProcess:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe_dict), encoding="utf-8")
    probe = tmp_path / "probe"
    probe.mkdir(exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "HFDISTILL_PROBE_DIR": str(probe),
           "PYTHONPATH": os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")])}
    extra = ["--training.use_cpu", "true"] if torch.cuda.is_available() else []  # one GPU cannot host 2 ranks
    how = ["--config_file", str(config_file)] if config_file else ["--multi_gpu", "--num_machines", "1",
                                                                     "--dynamo_backend", "no"]
    result = subprocess.run(
        ["accelerate", "launch", *how, "--num_processes", str(PROCESSES), "--mixed_precision", "no",
         str(HERE / "cli_launch_probe.py"), "train", str(path), *overrides, *extra],
        env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-4000:]
    return result


def probed(tmp_path, output_dir: str) -> list[tuple[dict, dict]]:
    """(tensors, metadata) each process wrote after training into ``output_dir``."""
    name = os.path.abspath(output_dir).strip(os.sep).replace(os.sep, "__")
    found = []
    for rank in range(PROCESSES):
        path = tmp_path / "probe" / f"{name}.rank{rank}.safetensors"
        assert path.is_file(), f"rank {rank} did not train {output_dir}"
        with safetensors.safe_open(str(path), "pt") as f:
            metadata = f.metadata()
        found.append((safetensors.torch.load_file(str(path)), metadata))
    return found


def assert_ranks_identical(states: list[tuple[dict, dict]]) -> int:
    (rank0, meta0), (rank1, meta1) = states
    assert meta0 == meta1 and meta0["world_size"] == str(PROCESSES)
    assert set(rank0) == set(rank1)
    compared = 0
    for key, value in rank0.items():
        if not key.endswith(PER_RANK_BUFFERS):
            torch.testing.assert_close(rank1[key], value, rtol=0, atol=0, msg=key)
            compared += 1
    assert compared > 10
    return int(meta0["global_step"])


def test_cli_under_accelerate_launch_is_one_data_parallel_run_and_resumes(tmp_path):
    spec = recipe(tmp_path, student={"name": "timm:test_efficientnet", "baseline": True})
    result = launch(tmp_path, spec)
    out = Path(spec["training"]["output_dir"])
    text = result.stdout + result.stderr
    assert "parallel_mode != ParallelMode.DISTRIBUTED" not in text
    assert text.count("==> training student (distilled)") == 1  # only the main process talks

    # Data-parallel: the global batch's step count, for the baseline and the distilled student alike.
    for folder in (str(out), f"{out}-baseline"):
        assert assert_ranks_identical(probed(tmp_path, folder)) == 3 * STEPS_PER_EPOCH
    first = probed(tmp_path, str(out))[0][0]
    assert any(k.startswith("adapters.") for k in first)

    # Checkpoints every epoch, save_total_limit 2: the two newest, complete, each with both ranks' RNG state.
    kept = sorted((p.name for p in out.glob("checkpoint-*")), key=lambda name: int(name.split("-")[1]))
    assert kept == [f"checkpoint-{2 * STEPS_PER_EPOCH}", f"checkpoint-{3 * STEPS_PER_EPOCH}"]
    for name in kept:
        files = {p.name for p in (out / name).iterdir()}
        assert {CHECKPOINT_COMPLETE_NAME, DISTILL_STATE_NAME, "rng_state_0.pth", "rng_state_1.pth"} <= files
    state = json.loads((out / kept[-1] / "trainer_state.json").read_text())
    assert state["global_step"] == 3 * STEPS_PER_EPOCH
    assert "Summary (96 eval examples" in result.stdout  # evaluated once over the whole set, gathered
    assert (out / "README.md").is_file() and (out / "model.safetensors").is_file()

    # Resume the run from its epoch-2 checkpoint: both processes continue it to the same weights as before.
    shutil.rmtree(out / kept[-1])
    launch(tmp_path, recipe(tmp_path), "--training.resume_from_checkpoint", "true")
    resumed = probed(tmp_path, str(out))
    assert assert_ranks_identical(resumed) == 3 * STEPS_PER_EPOCH
    for key, value in first.items():
        if not key.endswith(PER_RANK_BUFFERS):
            torch.testing.assert_close(resumed[0][0][key], value, rtol=1e-5, atol=1e-6, msg=key)


def test_stages_and_a_trainable_loss_module_under_accelerate_launch(tmp_path):
    """Two stages (FitNet hint, then CRD with its embeddings and memory banks, plus KD) as one DDP run."""
    spec = recipe(tmp_path, terms=None)
    del spec["terms"]
    spec["stages"] = [
        {"name": "hint", "terms": [{"loss": "fitnet", "student": "blocks.2", "teacher": "layer3",
                                    "adapter": "conv1x1"}], "task_weight": 0.0,
         "training": {"num_train_epochs": 1}},
        {"name": "crd", "terms": [{"loss": "crd", "weight": 0.8, "params": {"nce_k": 32}},
                                  {"loss": "kd", "weight": 0.9}], "training": {"num_train_epochs": 2}},
    ]
    launch(tmp_path, spec, config_file=CONFIGS / "ddp.yaml")  # the README's DDP config file, as shipped
    out = Path(spec["training"]["output_dir"])
    hint = assert_ranks_identical(probed(tmp_path, str(out.parent / "student-stages" / "hint")))
    assert hint == STEPS_PER_EPOCH
    final = probed(tmp_path, str(out))
    assert assert_ranks_identical(final) == 2 * STEPS_PER_EPOCH
    assert any(k.startswith("losses.crd") and "memory" in k for k in final[0][0])
    assert (out.parent / "student-stages" / "hint" / "stage_complete.json").is_file()
    assert (out / "model.safetensors").is_file()


@pytest.mark.parametrize("name", ["ddp.yaml", "fsdp.yaml", "deepspeed_zero3.yaml"])
def test_accelerate_config_files_are_valid(name):
    """The configs the README documents are what `accelerate launch --config_file` reads."""
    from accelerate.commands.config.config_args import ClusterConfig

    config = ClusterConfig.from_yaml_file(str(CONFIGS / name))
    assert config.num_processes >= 2 and config.num_machines == 1
    expected = {"ddp.yaml": "MULTI_GPU", "fsdp.yaml": "FSDP", "deepspeed_zero3.yaml": "DEEPSPEED"}[name]
    assert str(config.distributed_type).split(".")[-1] == expected
    if name == "fsdp.yaml":
        assert config.fsdp_config["fsdp_version"] == 2 and config.fsdp_config["fsdp_state_dict_type"] == "FULL_STATE_DICT"
    if name == "deepspeed_zero3.yaml":
        assert config.deepspeed_config["zero_stage"] == 3 and config.deepspeed_config["zero3_save_16bit_model"]
