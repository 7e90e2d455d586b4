"""A training run's settings, typed and frozen: what the flags and recipes produce (``capman_peft.flags``) and what
the library takes. Nothing changes them once built; values that follow from others (the default dataset, CM off at
λ = 0, the class prompt template) are resolved when they are built.

Field names are the flag names, so ``--cm_form`` is ``settings.objective.cm_form`` and :meth:`TrainingSettings.flags`
gives every value by its flag (``training_summary.json``, the trackers, a checkpoint's run identity).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any


@dataclass(frozen=True)
class DataSettings:
    """Which images, how many per class, and how they are read."""

    dataset: str | None
    dataset_name: str | None
    train_data_dir: str | None
    imbalance_ratio: float | None
    class_order: str | None
    split_thresholds: tuple[int, int] | None
    data_seed: int
    resolution: int
    center_crop: bool
    random_flip: bool
    sampler: str
    dataloader_num_workers: int
    cache_dir: str | None = None
    image_column: str | None = None
    class_column: str | None = None
    caption_column: str | None = None

    @property
    def source(self) -> str:
        """The data as the user named it: the named dataset, else its Hub id or folder."""
        return self.dataset or self.dataset_name or str(self.train_data_dir)

    @property
    def class_order_names(self) -> list[str] | None:
        """``--class_order`` as a list of names or ids, largest class first (None: the source's order)."""
        return [name.strip() for name in self.class_order.split(",")] if self.class_order else None


@dataclass(frozen=True)
class ObjectiveSettings:
    """L_base, and CM: Eq. 4's λ, the form and weights of L_CM, how θ and θ^g are computed."""

    objective: str
    cbdm_tau: float
    cbdm_gamma: float
    oc_transfer_label_dropped: bool
    snr_gamma: float | None
    focal_gamma: float | None
    label_dropout: float
    capacity_manipulation: bool
    cm_lambda: float
    cm_forward: str
    cm_form: str
    cm_margin: float
    cm_relative_margin: float
    cm_band_upper: float
    cm_push_warmup_steps: int
    cm_consistency_weight: float
    cm_diversity_weight: float
    no_consistency: bool
    no_diversity: bool
    cm_general_fraction: float
    allow_unbounded_cm: bool

    @property
    def consistency_weight(self) -> float:
        """w_con as the loss uses it (0 under ``--no_consistency``)."""
        return 0.0 if self.no_consistency else self.cm_consistency_weight

    @property
    def diversity_weight(self) -> float:
        """w_div as the loss uses it (0 under ``--no_diversity``)."""
        return 0.0 if self.no_diversity else self.cm_diversity_weight


@dataclass(frozen=True)
class OptimizationSettings:
    """Steps, batch, optimizer, schedule, EMA, precision and the run's seed."""

    seed: int
    train_batch_size: int
    max_train_steps: int | None
    num_train_epochs: int | None
    gradient_accumulation_steps: int
    gradient_checkpointing: bool
    learning_rate: float
    lr_scheduler: str
    lr_warmup_steps: int
    adam_beta1: float
    adam_beta2: float
    adam_weight_decay: float
    adam_epsilon: float
    max_grad_norm: float
    use_ema: bool
    ema_decay: float
    mixed_precision: str | None
    allow_tf32: bool


@dataclass(frozen=True)
class OutputSettings:
    """Where the run writes, checkpoints and resuming, trackers, and the validation grids."""

    output_dir: str
    overwrite_output_dir: bool
    checkpointing_steps: int
    checkpoints_total_limit: int | None
    resume_from_checkpoint: str | None
    report_to: str
    logging_dir: str
    validation_epochs: int
    num_validation_images: int
    num_inference_steps: int
    guidance_scale: float


@dataclass(frozen=True)
class HubSettings:
    """The upload at the end of a run."""

    push_to_hub: bool
    hub_model_id: str | None
    hub_token: str | None


SECTIONS = (DataSettings, ObjectiveSettings, OptimizationSettings, OutputSettings, HubSettings)


@dataclass(frozen=True)
class TrainingSettings:
    """Everything a training run is told: the shared sections, and the script's own model settings (a frozen
    dataclass of its model flags; None until the script adds it)."""

    data: DataSettings
    objective: ObjectiveSettings
    optimization: OptimizationSettings
    output: OutputSettings
    hub: HubSettings
    model: Any = None
    config: str | None = None
    """The ``--config`` recipe the values came from, if any."""

    def flags(self) -> dict[str, Any]:
        """Every value by its flag name, the Hub token left out."""
        parts = [self.data, self.objective, self.optimization, self.output, self.hub]
        values = {f.name: getattr(part, f.name) for part in parts for f in fields(part)}
        if self.model is not None:
            values.update({f.name: getattr(self.model, f.name) for f in fields(self.model)})
        values["config"] = self.config
        values.pop("hub_token")
        return values
