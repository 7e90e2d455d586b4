"""A training run's settings, typed and frozen: what the flags and recipes produce (``capman_peft.flags``) and what
the library takes. Nothing changes them once built; values that follow from others (the default dataset, CM off at
λ = 0, the class prompt template) are resolved when they are built.

Field names are the flag names, so ``--cm_form`` is ``settings.objective.cm_form`` and :meth:`TrainingSettings.flags`
gives every value by its flag (``training_summary.json``, the trackers, a checkpoint's run identity).
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields, replace
from typing import Any


def identity(default: Any = MISSING) -> Any:
    """A field that defines what a run trains (its data, model, objective): a checkpoint written with another value
    is refused on resume. Every other field (learning rate, step counts, logging, speed) may change when a run is
    continued; each section says why its other fields are not part of the identity."""
    return field(default=default, metadata={"identity": True})


def identity_values(settings: Any) -> dict[str, Any]:
    """The identity fields of one settings dataclass, by name."""
    return {f.name: getattr(settings, f.name) for f in fields(settings) if f.metadata.get("identity")}


@dataclass(frozen=True)
class DataSettings:
    """Which images, how many per class, and how they are read.

    Not identity: the Many/Medium/Few thresholds only group what is reported; crop, flip, sampler, workers and cache
    change how the same images are fed, not which.
    """

    dataset: str | None = identity()
    dataset_name: str | None = identity()
    train_data_dir: str | None = identity()
    imbalance_ratio: float | None = identity()
    class_order: str | None = identity()
    split_thresholds: tuple[int, int] | None
    data_seed: int = identity()
    resolution: int = identity()
    center_crop: bool
    random_flip: bool
    sampler: str
    dataloader_num_workers: int
    cache_dir: str | None = None
    image_column: str | None = identity(None)
    class_column: str | None = identity(None)
    caption_column: str | None = identity(None)

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
    """L_base, and CM: Eq. 4's λ, the form and weights of L_CM, how θ and θ^g are computed.

    Not identity: CBDM's τ and γ, CORAL's weights, the min-SNR γ and the label dropout weigh or drop terms of the
    same objective and may be tuned when a run is continued; the forward mode and the general fraction change how
    θ^g is computed, not what it is; ``allow_unbounded_cm`` only permits a form.
    """

    objective: str = identity()
    cbdm_tau: float
    cbdm_gamma: float
    oc_transfer_label_dropped: bool = identity()
    snr_gamma: float | None
    focal_gamma: float | None = identity()
    coral: bool = identity()
    coral_weight: float
    coral_time_temperature: float
    coral_temperature: float
    label_dropout: float
    capacity_manipulation: bool = identity()
    cm_lambda: float = identity()
    cm_forward: str
    cm_form: str = identity()
    cm_margin: float = identity()
    cm_relative_margin: float = identity()
    cm_band_upper: float = identity()
    cm_push_warmup_steps: int = identity()
    cm_consistency_weight: float = identity()
    cm_diversity_weight: float = identity()
    no_consistency: bool = identity()
    no_diversity: bool = identity()
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
    """Steps, batch, optimizer, schedule, EMA, precision and the run's seed.

    Identity: whether there is an EMA model (its state is in the checkpoint). The rest may change on resume.
    """

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
    use_ema: bool = identity()
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

    def _sections(self) -> list[Any]:
        return [self.data, self.objective, self.optimization, self.output, self.hub]

    def identity(self) -> dict[str, Any]:
        """The run's identity (the fields marked with :func:`identity`), by flag name: what a resumed run must match."""
        values = {k: v for part in self._sections() for k, v in identity_values(part).items()}
        return {**values, **(identity_values(self.model) if self.model is not None else {})}

    def with_flags(self, values: dict[str, Any]) -> TrainingSettings:
        """A copy with the fields of these flag names set (in whichever shared section has them)."""
        sections = {}
        for name in ("data", "objective", "optimization", "output", "hub"):
            part = getattr(self, name)
            mine = {k: v for k, v in values.items() if k in {f.name for f in fields(part)}}
            sections[name] = replace(part, **mine) if mine else part
        return replace(self, **sections)

    def flags(self) -> dict[str, Any]:
        """Every value by its flag name, the Hub token left out."""
        values = {f.name: getattr(part, f.name) for part in self._sections() for f in fields(part)}
        if self.model is not None:
            values.update({f.name: getattr(self.model, f.name) for f in fields(self.model)})
        values["config"] = self.config
        values.pop("hub_token")
        return values
