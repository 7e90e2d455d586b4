"""train_unet_cm.py with a fault on process 1 only, run by test_train_unet.py under 2 processes: ``nan`` gives a NaN
loss at its second micro-batch, ``sigterm`` sends the process a SIGTERM after its third optimizer step (the first
argument names the fault). Each process also writes what it prints on stderr to ``<output_dir>.stderr-<rank>``: the
launcher may stop one process's output once the other has exited."""

import functools
import os
import signal
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import capman_peft.training.loop as training_loop  # noqa: E402
import train_unet_cm  # noqa: E402
from capman_peft.errors import run_cli  # noqa: E402
from capman_peft.training.loop import TrainingCallbacks  # noqa: E402

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


def terminate_after_step_3(step: int, values: dict) -> None:
    if os.environ.get("RANK") == "1" and step == 3:
        os.kill(os.getpid(), signal.SIGTERM)


fault, argv = sys.argv[1], sys.argv[2:]
main = train_unet_cm.main
if fault == "nan":
    training_loop.diffusion_loss = poisoned
else:
    main = functools.partial(main, callbacks=TrainingCallbacks(on_step_end=terminate_after_step_3))
output_dir = argv[argv.index("--output_dir") + 1]
with open(f"{output_dir}.stderr-{os.environ.get('RANK')}", "w") as copy:
    sys.stderr = Tee(sys.__stderr__, copy)
    run_cli(main, argv)
