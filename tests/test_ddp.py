"""A 2-process DDP run on CPU (gloo) keeps student, adapters and loss modules identical on both ranks."""

import os
import shutil
import subprocess

import pytest
import safetensors.torch
import torch

HERE = os.path.dirname(__file__)
# BatchNorm running statistics are per-rank by design (each rank's last forward updates its own).
PER_RANK_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


@pytest.mark.skipif(shutil.which("accelerate") is None, reason="the accelerate launcher is not on PATH")
def test_two_process_ddp_keeps_ranks_in_sync(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": os.path.dirname(HERE)}
    result = subprocess.run(
        ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no",
         os.path.join(HERE, "ddp_train.py"), str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rank0 = safetensors.torch.load_file(str(tmp_path / "rank0_of_2.safetensors"))
    rank1 = safetensors.torch.load_file(str(tmp_path / "rank1_of_2.safetensors"))
    assert set(rank0) == set(rank1)
    assert any(k.startswith("adapters.") for k in rank0) and any(k.startswith("losses.vid") for k in rank0)
    compared = 0
    for key, value in rank0.items():
        if key.endswith(PER_RANK_BUFFERS):
            continue
        torch.testing.assert_close(rank1[key], value, rtol=0, atol=1e-6, msg=key)
        compared += 1
    assert compared > 10
