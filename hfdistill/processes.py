"""The processes of one run under ``accelerate launch`` (or ``torchrun``): which one this is, and barriers.

Every process runs the same run pipeline (teacher training, baselines, seeds, stages), each job as one
data-parallel training; only the main process writes result folders, and the others wait for it where
they would otherwise read what it writes. The launchers describe the processes in the environment
(``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``), which is known before any process group exists: that is what
these functions read, so they work before a Trainer has set anything up.
"""

from __future__ import annotations

import os

import torch


def world_size() -> int:
    """Processes of this run (1 when not launched as several)."""
    return max(int(os.environ.get("WORLD_SIZE", "1") or 1), 1)


def rank() -> int:
    """This process's index among :func:`world_size` (0 on the main process)."""
    return int(os.environ.get("RANK", "0") or 0)


def is_main_process() -> bool:
    return rank() == 0


def has_accelerator() -> bool:
    """Whether the processes can run on an accelerator (CUDA, XPU, ...): else data parallelism is on the CPU."""
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None and hasattr(accelerator, "is_available"):
        return bool(accelerator.is_available())
    return torch.cuda.is_available()


def on_cpu_only() -> bool:
    """Several processes and no accelerator: the run must tell Accelerate it is on the CPU (gloo), or each
    process would train on its own (Accelerate picks the CPU's process group only when told)."""
    return world_size() > 1 and not has_accelerator()


def wait_for_everyone() -> None:
    """A barrier across the run's processes (nothing when there is one process)."""
    if world_size() <= 1:
        return
    import torch.distributed as dist

    if not dist.is_initialized():  # the process group the Trainer would make (Accelerate's choice of backend)
        from accelerate import PartialState

        PartialState(cpu=not has_accelerator())
    if dist.get_backend() == "nccl":
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()
