"""``python -m capman_peft.analysis``: the same as ``capman-analyze``."""

from .cli import main

main()
