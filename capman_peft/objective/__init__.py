"""The training objective of paper Eq. 4, ``L_total = L_base + λ·L_CM``, one role per module:

* ``cm.py``: the capacity manipulation loss L_CM (Eq. 2-3): class weights, the bounded default form and the paper's
  literal one, the boundedness check;
* ``base.py``: the base objectives L_base (DDPM, CBDM, OC) by name;
* ``consistency.py``: consistency training (iCT) as a base objective for from-scratch UNets;
* ``coral.py``: CORAL's contrastive loss on the UNet's bottleneck (a baseline; adds to any of the above);
* ``schedule.py``: the noise schedule (noising and the training target), which every loss takes from the model;
* ``total.py``: Eq. 4 for one batch from one call of the CM forward module, and the non-finite-loss guard.
"""

from .base import OBJECTIVES, CBDMObjective, DDPMObjective, OCObjective, build_objective, oc_selection_probs
from .cm import (
    CM_FORMS,
    DEFAULT_BAND_UPPER,
    DEFAULT_MARGIN,
    DEFAULT_RELATIVE_MARGIN,
    LOWER_MARGIN_FORMS,
    RELATIVE_FORMS,
    CMWeights,
    check_cm_bounded,
    class_weights,
    cm_card_settings,
    cm_loss,
    cm_lower_bound,
    cm_weights,
    format_cm_table,
    push_warmup_scale,
)
from .consistency import CONSISTENCY, ConsistencyObjective, consistency_loss
from .coral import CoralSettings, attach_coral_head, coral_loss, drop_coral_head
from .schedule import DiffusionSchedule, FlowMatchingSchedule, FlowWeighting, NoiseSchedule, noise_schedule
from .total import CMSettings, check_finite, diffusion_loss, importance_rows

__all__ = [
    "CONSISTENCY",
    "ConsistencyObjective",
    "consistency_loss",
    "CM_FORMS",
    "DEFAULT_BAND_UPPER",
    "DEFAULT_MARGIN",
    "DEFAULT_RELATIVE_MARGIN",
    "LOWER_MARGIN_FORMS",
    "RELATIVE_FORMS",
    "OBJECTIVES",
    "CBDMObjective",
    "CMSettings",
    "CMWeights",
    "CoralSettings",
    "DDPMObjective",
    "DiffusionSchedule",
    "FlowMatchingSchedule",
    "FlowWeighting",
    "NoiseSchedule",
    "OCObjective",
    "attach_coral_head",
    "build_objective",
    "check_cm_bounded",
    "check_finite",
    "class_weights",
    "cm_card_settings",
    "cm_loss",
    "cm_lower_bound",
    "cm_weights",
    "coral_loss",
    "diffusion_loss",
    "drop_coral_head",
    "format_cm_table",
    "importance_rows",
    "noise_schedule",
    "oc_selection_probs",
    "push_warmup_scale",
]
