"""What the benchmark scripts share: an offline, quiet environment and a description of the machine.

Imported before transformers (``from benchmarks._common import ...`` once the repository root is on
``sys.path``): the environment defaults below must be set before the Hugging Face libraries read them.
"""

from __future__ import annotations

import contextlib
import os
import platform
import time
import traceback
import warnings
from typing import Callable, Iterator

# Nothing is downloaded, nothing is reported anywhere, tokenizers do not fork threads of their own.
for _name, _value in (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1"),
                      ("WANDB_DISABLED", "true"), ("TOKENIZERS_PARALLELISM", "false")):
    os.environ.setdefault(_name, _value)


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what the platform says."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def machine_info(**versions: str) -> dict[str, str]:
    """The machine and the library versions a result was measured with (``versions``: more, e.g. timm's)."""
    import torch
    import transformers

    return {
        "cpu": cpu_name(),
        "cores": str(os.cpu_count()),
        "torch_threads": str(torch.get_num_threads()),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        **versions,
        "python": platform.python_version(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (CPU only)",
    }


def machine_line(info: dict[str, str]) -> str:
    """:func:`machine_info` as one line of a report."""
    versions = ", ".join(f"{k} {v}" for k, v in info.items() if k not in ("cpu", "cores", "torch_threads", "gpu"))
    return (f"{info['cpu']}, {info['cores']} logical cores, torch threads {info['torch_threads']}; {versions}; "
            f"GPU: {info['gpu']}")


def load_average() -> float:
    """The 1-minute load average (NaN where the platform has none): above the core count, times are inflated."""
    try:
        return os.getloadavg()[0]
    except OSError:  # pragma: no cover - platforms without a load average
        return float("nan")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """transformers' info and warnings and Python warnings off for the run, restored afterwards."""
    import transformers

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        transformers.logging.set_verbosity(verbosity)


def guarded_run(run: Callable[[], dict], identity: dict, label: str) -> dict:
    """``run()``'s record; or, when its loss became NaN/inf (a result: training stopped), ``identity`` with
    ``diverged``; or, when it failed, ``identity`` with ``error``, the traceback printed: one failing row must not
    stop the others, and the report says why it has no number."""
    from hfdistill.errors import TrainingDivergedError

    try:
        return run()
    except TrainingDivergedError as exc:
        record = {**identity, "diverged": str(exc).replace("\n", " ")[:500]}
        log(f"{label}: DIVERGED {record['diverged']}")
    except Exception as exc:  # noqa: BLE001 - reported in the results, not raised
        traceback.print_exc()
        record = {**identity, "error": f"{type(exc).__name__}: {exc}".replace("\n", " ")[:500]}
        log(f"{label}: FAILED {record['error']}")
    return record
