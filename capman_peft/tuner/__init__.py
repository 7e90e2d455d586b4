"""The CapMan PEFT tuner: config, dual-adapter layers, model, and its registration with PEFT."""

from .config import PEFT_TYPE, CapManConfig
from .layer import CapManLayer, PairedDropout
from .model import (
    CapManModel,
    base_model,
    capman_layers,
    expert_disabled,
    expert_gate,
    group_experts,
    merge_general_and_unload,
    merge_group_and_unload,
    pair_dropout,
)


def register_with_peft() -> None:
    """Make ``get_peft_model`` / ``PeftModel.from_pretrained`` know ``peft_type="CAPMAN"`` (idempotent).

    ``peft.register_peft_method`` only accepts members of PEFT's own ``PeftType`` enum, so the string type is added
    to PEFT's mapping dicts directly; the enum is a ``str`` enum, so plain string keys look up the same way.
    """
    from peft import mapping

    mapping.PEFT_TYPE_TO_CONFIG_MAPPING[PEFT_TYPE] = CapManConfig
    mapping.PEFT_TYPE_TO_TUNER_MAPPING[PEFT_TYPE] = CapManModel
    mapping.PEFT_TYPE_TO_PREFIX_MAPPING[PEFT_TYPE] = CapManModel.prefix


register_with_peft()

__all__ = [
    "PEFT_TYPE",
    "CapManConfig",
    "CapManLayer",
    "CapManModel",
    "base_model",
    "capman_layers",
    "expert_disabled",
    "expert_gate",
    "group_experts",
    "merge_general_and_unload",
    "merge_group_and_unload",
    "pair_dropout",
    "PairedDropout",
    "register_with_peft",
]
