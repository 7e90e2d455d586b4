"""capman-peft: Capacity Manipulation for class-imbalanced diffusion models (diffusers + PEFT).

Importing the package registers the CapMan tuner with PEFT.
"""

from .tuner import CapManConfig, CapManModel, expert_disabled, expert_gate

__all__ = ["CapManConfig", "CapManModel", "expert_disabled", "expert_gate"]
