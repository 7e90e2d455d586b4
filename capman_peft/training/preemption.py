"""What a run does when a cluster signals it: SIGTERM (preemption, the end of a time limit) or SIGINT (Ctrl-C)
finish the current optimizer step, save a checkpoint the crash-safe way and stop; SIGUSR1 (what
``#SBATCH --signal=USR1@120`` sends before the limit) saves a checkpoint and keeps training. A second Ctrl-C stops at
once. In a multi-process run the processes agree after every step, so all of them save and stop at the same step."""

from __future__ import annotations

import signal
import threading
from typing import Any

import torch
from accelerate import Accelerator

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
SAVE_SIGNAL = signal.SIGUSR1


class SignalRequests:
    """A context that turns the signals into requests the training loop reads after each optimizer step."""

    def __init__(self) -> None:
        self.stop: int | None = None
        self.save = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> SignalRequests:
        if threading.current_thread() is threading.main_thread():  # only the main thread may handle signals
            for signum in (*STOP_SIGNALS, SAVE_SIGNAL):
                self._previous[signum] = signal.signal(signum, self._on_signal)
        return self

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _on_signal(self, signum: int, frame: Any) -> None:
        if signum == SAVE_SIGNAL:
            self.save = True
            return
        if self.stop == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: stop now, without the checkpoint
        self.stop = signum

    def poll(self, accelerator: Accelerator) -> tuple[int | None, bool]:
        """(the stop signal or None, whether to save now), the same on every process; a save request is consumed."""
        stop, save = self.stop, self.save
        if accelerator.num_processes > 1:
            flags = torch.tensor([[stop or 0, int(save)]], device=accelerator.device)
            agreed = accelerator.gather(flags).max(dim=0).values.tolist()
            stop, save = agreed[0] or None, bool(agreed[1])
        self.save = False
        return stop, save
