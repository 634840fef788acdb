"""``python -m hfdistill ARGS`` (the CLI itself) with an observer, for tests that launch it under
``accelerate launch --multi_gpu --num_processes N`` (tests/test_cli_ddp.py).

After every training of the run (teacher, baseline, each stage), each process writes what it holds of the
trained student, adapters and loss modules to ``$HFDISTILL_PROBE_DIR/<output_dir>.rank<R>.safetensors``
(the trainer's global step in the metadata), so the test can check that the processes trained one run.
"""

import os
import runpy
import sys

import safetensors.torch

from hfdistill.trainer import DistillationTrainer

PROBE_DIR = os.environ["HFDISTILL_PROBE_DIR"]
_train = DistillationTrainer.train


def observed_train(self, *args, **kwargs):
    output = _train(self, *args, **kwargs)
    state = {f"student.{k}": v for k, v in self.student.state_dict().items()}
    state.update(self.model.distill_state_dict())
    state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    name = os.path.abspath(self.args.output_dir).strip(os.sep).replace(os.sep, "__")
    path = os.path.join(PROBE_DIR, f"{name}.rank{self.args.process_index}.safetensors")
    metadata = {"global_step": str(self.state.global_step), "world_size": str(self.args.world_size)}
    safetensors.torch.save_file(state, path, metadata=metadata)
    return output


DistillationTrainer.train = observed_train
sys.argv = ["hfdistill", *sys.argv[1:]]
runpy.run_module("hfdistill", run_name="__main__", alter_sys=True)
