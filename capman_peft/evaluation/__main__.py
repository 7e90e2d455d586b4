"""``python -m capman_peft.evaluation``: the same as ``capman-eval``."""

from .cli import main

main()
