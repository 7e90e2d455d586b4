"""capman-peft: Capacity Manipulation for class-imbalanced diffusion models (diffusers + PEFT).

Importing the package registers the CapMan tuner with PEFT.
"""

from importlib.metadata import version

from .denoiser import CMDenoiser
from .families.class_conditional import ClassConditionalPipeline, save_class_conditional_pipeline
from .objective import build_objective, check_cm_bounded, class_weights, cm_loss, cm_weights
from .tuner import CapManConfig, CapManModel, expert_disabled, expert_gate

__version__ = version("capman-peft")

__all__ = [
    "CapManConfig",
    "CapManModel",
    "CMDenoiser",
    "ClassConditionalPipeline",
    "build_objective",
    "check_cm_bounded",
    "class_weights",
    "cm_loss",
    "cm_weights",
    "expert_disabled",
    "expert_gate",
    "save_class_conditional_pipeline",
]
