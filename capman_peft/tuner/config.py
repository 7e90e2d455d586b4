"""`CapManConfig`: where the general and the reserved expert parts go, and how big they are."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from peft.config import PeftConfig

PEFT_TYPE = "CAPMAN"


def _check_ratio(name: str, value: float | None) -> None:
    if value is not None and not 0.0 < value <= 1.0:
        raise ValueError(f"`{name}` must be in (0, 1], got {value}")


def _check_rank(name: str, value: int | None) -> None:
    if value is not None and (not isinstance(value, int) or value < 1):
        raise ValueError(f"`{name}` must be a positive integer, got {value!r}")


@dataclass
class CapManConfig(PeftConfig):
    """Configuration of a Capacity Manipulation (CM) adapter.

    Every targeted weight ``W`` (viewed as ``d x k``; a conv as ``out x in*kh*kw``) is split into a general part
    and a reserved low-rank expert part (paper Eq. 1):

    * ``mode="lora"`` (fine-tuning a pretrained model): ``W = W^f + s_g B^g A^g + s_e B^e A^e``, ``W^f`` frozen.
    * ``mode="full"`` (training from scratch): ``W = W^g + s_e B A``, every base parameter trainable.

    Scaling is ``s = alpha / r``. A rank may be given as an integer or as a ratio of ``min(d, k)``; the ratio
    gives ``r = max(1, int(ratio * min(d, k)))`` per layer.
    """

    mode: Literal["lora", "full"] = field(
        default="lora",
        metadata={
            "help": "'lora': frozen base + trainable general LoRA + expert LoRA (fine-tuning). "
            "'full': trainable base weight as the general part + expert LoRA (training from scratch)."
        },
    )
    r: int | None = field(
        default=None,
        metadata={"help": "Rank of the general adapter (lora mode). Default 128 (paper) unless `rank_ratio` is set."},
    )
    rank_ratio: float | None = field(
        default=None,
        metadata={"help": "General rank as a fraction of min(d, k), in (0, 1]; alternative to `r` (lora mode)."},
    )
    lora_alpha: float | None = field(
        default=None,
        metadata={"help": "Alpha of the general adapter; scaling is lora_alpha / r. Default: equal to the rank."},
    )
    expert_r: int | None = field(
        default=None,
        metadata={
            "help": "Rank of the reserved expert. Default 8 in lora mode (paper); in full mode the default is "
            "`expert_rank_ratio=0.1`. Must be smaller than the general rank in lora mode (r_e < r_g)."
        },
    )
    expert_rank_ratio: float | None = field(
        default=None,
        metadata={"help": "Expert rank as a fraction of min(d, k), in (0, 1]; alternative to `expert_r`."},
    )
    expert_alpha: float | None = field(
        default=None,
        metadata={"help": "Alpha of the expert; scaling is expert_alpha / expert rank. Default: equal to the rank."},
    )
    expert_groups: int = field(
        default=1,
        metadata={
            "help": "Split each expert into this many rank blocks, one per class group, each sample using its group's "
            "block (`group_experts`): the Group-Expert LoRA baseline of paper sec. E.4, with the expert rank budget "
            "of CM (max(expert_groups, r_e) in all). 1 (default): one expert, as CM."
        },
    )
    lora_dropout: float = field(
        default=0.0,
        metadata={"help": "Dropout on the adapter input (shared by general and expert branches)."},
    )
    target_modules: list[str] | str | None = field(
        default=None,
        metadata={
            "help": "Modules that get a CapMan layer. A list matches exact names or name suffixes; a string is a "
            "regex matched against the full module name. In lora mode they get the general adapter; in full "
            "mode they are where the expert may go."
        },
    )
    expert_target_modules: list[str] | str | None = field(
        default=None,
        metadata={
            "help": "Modules that get the expert; must be a subset of `target_modules`. Default: all targets. "
            "The paper puts experts only in the UNet's up path (`up_blocks`) when training from scratch."
        },
    )
    exclude_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Modules never adapted (same matching rules as `target_modules`)."}
    )
    init_lora_weights: bool | Literal["gaussian"] = field(
        default=True,
        metadata={
            "help": "True: A Kaiming-uniform, B zero (a fresh adapter changes nothing). 'gaussian': A ~ N(0, 1/r), "
            "B zero. False: A and B both random (for tests only)."
        },
    )
    bias: Literal["none"] = field(default="none", metadata={"help": "Bias handling; only 'none' is supported."})
    modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "Extra modules to train and save with the adapter (PEFT convention)."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PEFT_TYPE
        if self.mode not in ("lora", "full"):
            raise ValueError(f"`mode` must be 'lora' or 'full', got {self.mode!r}")
        for name in ("r", "expert_r"):
            _check_rank(name, getattr(self, name))
        for name in ("rank_ratio", "expert_rank_ratio"):
            _check_ratio(name, getattr(self, name))
        if self.r is not None and self.rank_ratio is not None:
            raise ValueError(
                f"give either `r` or `rank_ratio`, not both (got r={self.r}, rank_ratio={self.rank_ratio})"
            )
        if self.expert_r is not None and self.expert_rank_ratio is not None:
            raise ValueError(
                f"give either `expert_r` or `expert_rank_ratio`, not both "
                f"(got expert_r={self.expert_r}, expert_rank_ratio={self.expert_rank_ratio})"
            )
        if self.mode == "full":
            if self.r is not None or self.rank_ratio is not None:
                raise ValueError(
                    "full mode has no general adapter (the base weight is the general part); "
                    f"do not set `r`/`rank_ratio` (got r={self.r}, rank_ratio={self.rank_ratio})"
                )
            if self.expert_r is None and self.expert_rank_ratio is None:
                self.expert_rank_ratio = 0.1
        else:
            if self.r is None and self.rank_ratio is None:
                self.r = 128
            if self.expert_r is None and self.expert_rank_ratio is None:
                self.expert_r = 8
            if self.r is not None and self.expert_r is not None and self.expert_r >= self.r:
                raise ValueError(
                    f"the expert rank must be smaller than the general rank (paper: r_e < r_g), "
                    f"got expert_r={self.expert_r} >= r={self.r}"
                )
        if not isinstance(self.expert_groups, int) or isinstance(self.expert_groups, bool) or self.expert_groups < 1:
            raise ValueError(f"`expert_groups` must be an integer >= 1, got {self.expert_groups!r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"`lora_dropout` must be in [0, 1), got {self.lora_dropout}")
        if self.init_lora_weights not in (True, False, "gaussian"):
            raise ValueError(f"`init_lora_weights` must be True, False or 'gaussian', got {self.init_lora_weights!r}")
        if self.bias != "none":
            raise ValueError(f"`bias` must be 'none', got {self.bias!r}")
        if self.target_modules is None:
            raise ValueError("`target_modules` is required: name the layers to adapt (list of names or a regex)")
        for name in ("target_modules", "expert_target_modules", "exclude_modules"):
            value = getattr(self, name)
            if isinstance(value, (list, tuple)):
                setattr(self, name, set(value))
