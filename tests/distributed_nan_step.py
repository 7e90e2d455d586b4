"""train_unet_cm.py with a NaN loss on process 1 at its second step: run by test_train_unet.py under 2 processes.
Each process also writes what it prints on stderr to ``<output_dir>.stderr-<rank>``: the launcher may stop one
process's output once the other has exited."""

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import capman_peft.training.loop as training_loop  # noqa: E402
import train_unet_cm  # noqa: E402
from capman_peft.errors import run_cli  # noqa: E402

real_loss = training_loop.diffusion_loss
calls = []


def poisoned(*args, **kwargs):
    loss, logs = real_loss(*args, **kwargs)
    calls.append(1)
    if os.environ.get("RANK") == "1" and len(calls) == 2:
        nan = torch.tensor(float("nan"))
        return loss * nan, {**logs, "base_loss": nan}
    return loss, logs


class Tee:
    def __init__(self, *streams):
        self.streams = streams

    def write(self, text):
        for stream in self.streams:
            stream.write(text)
            stream.flush()

    def flush(self):
        for stream in self.streams:
            stream.flush()


training_loop.diffusion_loss = poisoned
output_dir = sys.argv[sys.argv.index("--output_dir") + 1]
with open(f"{output_dir}.stderr-{os.environ.get('RANK')}", "w") as copy:
    sys.stderr = Tee(sys.__stderr__, copy)
    run_cli(train_unet_cm.main, sys.argv[1:])
