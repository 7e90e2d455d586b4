"""The project's own errors: bad user input (a flag, a recipe value, an input file, an unreachable source), a
non-finite loss, a training step out of memory, and a run stopped by a signal.

Entry points print the errors as one line, ``error: <flag or file>: <what is wrong>; <what is allowed>``, and a stop as
``stopped: <signal> after step <n>: ...``, and exit non-zero; any other exception is a bug and keeps its traceback.
"""

import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path


class ConfigError(ValueError):
    """A bad flag, recipe value or input file; scripts print it as one ``error:`` line and exit non-zero."""


class NonFiniteLossError(RuntimeError):
    """A loss term became NaN or inf: training stops instead of silently corrupting the weights."""


class TrainingStepOutOfMemory(RuntimeError):
    """A training step ran out of accelerator memory: training stops with what to try, the checkpoints untouched."""


class TrainingStopped(Exception):
    """Training was stopped by a signal (SIGTERM, SIGINT) after saving a checkpoint; entry points print one line and
    exit with the shell's status for that signal (128 + its number)."""

    def __init__(self, signum: int, step: int, checkpoint: Path) -> None:
        name = signal.Signals(signum).name
        super().__init__(f"{name} after step {step}: saved {checkpoint}; continue with --resume_from_checkpoint latest")
        self.signum = signum


# Called when an entry point returns or fails (e.g. releasing the output folder's lock), so that a refused run leaves
# no trace even when the process goes on (tests run the entry points in-process).
_on_exit: list[Callable[[], None]] = []


def call_on_exit(cleanup: Callable[[], None]) -> None:
    """Run `cleanup` once when the current entry point (``run_cli``) returns or fails."""
    _on_exit.append(cleanup)


def _own_message(err: Exception) -> str:
    """The error's own message; an error re-raised from a DataLoader worker carries the worker's traceback in its
    text ("Caught ConfigError in DataLoader worker process 1 ... Original Traceback ..."), of which the last line is
    the message."""
    text = str(err)
    if "Original Traceback" in text:
        prefix, _, message = text.rstrip().splitlines()[-1].partition(": ")
        return message if prefix.rsplit(".", 1)[-1] == type(err).__name__ else text
    return text


def run_cli(main: Callable[[Sequence[str] | None], object], argv: Sequence[str] | None = None) -> None:
    """Run an entry point's `main`; the project's own errors (bad input, a non-finite loss, a step out of memory)
    become one ``error:`` line on stderr and exit status 1. Anything else is a bug and keeps its traceback."""
    try:
        main(argv)
    except (ConfigError, NonFiniteLossError, TrainingStepOutOfMemory) as err:
        print(f"error: {_own_message(err)}", file=sys.stderr)
        raise SystemExit(1) from None
    except TrainingStopped as stopped:
        print(f"stopped: {stopped}", file=sys.stderr)
        raise SystemExit(128 + stopped.signum) from None
    finally:
        while _on_exit:
            _on_exit.pop()()
