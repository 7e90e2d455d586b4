"""The dual-adapter layer: a base weight, a general low-rank part and a gated low-rank expert part (paper Eq. 1)."""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from .config import CapManConfig

# Gate values a layer understands. ``None``: expert on for every sample (the full model theta). ``EXPERT_OFF``:
# expert off for the whole batch (theta^g). A tensor of shape (batch,): per-sample 0/1 switch, so that theta and
# theta^g can be evaluated in one forward call on a stacked batch.
EXPERT_OFF = "off"
Gate = torch.Tensor | str | None


def rank_for(shape: tuple[int, int], rank: int | None, ratio: float | None) -> int:
    """Rank of one layer's adapter: a fixed rank, or ``max(1, int(ratio * min(d, k)))`` (paper G.1)."""
    if rank is not None:
        return rank
    return max(1, int(ratio * min(shape)))


class CapManLayer(BaseTunerLayer):
    """Per-adapter containers shared by the Linear and Conv2d variants.

    The general part (lora mode only) lives in ``capman_A``/``capman_B``; the expert in
    ``capman_expert_A``/``capman_expert_B``. A is stored as ``(r, k)`` for Linear and ``(r, in/groups, kh, kw)``
    for Conv2d, B as ``(d, r)``, so that ``B @ A.flatten(1)`` is the weight delta in the base weight's layout.
    """

    adapter_layer_names = ("capman_A", "capman_B", "capman_expert_A", "capman_expert_B")
    other_param_names = ("r", "expert_r", "scaling", "expert_scaling", "capman_dropout")

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        self.base_layer = base_layer
        self.r: dict[str, int] = {}
        self.expert_r: dict[str, int] = {}
        self.scaling: dict[str, float] = {}
        self.expert_scaling: dict[str, float] = {}
        self.capman_dropout = nn.ModuleDict({})
        self.capman_A = nn.ParameterDict({})
        self.capman_B = nn.ParameterDict({})
        self.capman_expert_A = nn.ParameterDict({})
        self.capman_expert_B = nn.ParameterDict({})
        self._disable_adapters = False
        self.merged_adapters = []
        self._expert_gate: Gate = None
        self.kwargs = kwargs

    # Layout of the base weight as a matrix: (d, k); subclasses say how A acts on the input.
    def _matrix_shape(self) -> tuple[int, int]:
        weight = self.get_base_layer().weight
        return weight.shape[0], weight[0].numel()

    def _new_a(self, rank: int) -> torch.Tensor:
        weight = self.get_base_layer().weight
        return torch.empty(rank, *weight.shape[1:])

    def update_layer(self, adapter_name: str, config: CapManConfig, with_expert: bool) -> None:
        """Create the adapter's parameters on this layer (general part in lora mode; expert if `with_expert`)."""
        shape = self._matrix_shape()
        if config.mode == "lora":
            r = rank_for(shape, config.r, config.rank_ratio)
            self.r[adapter_name] = r
            self.scaling[adapter_name] = (config.lora_alpha or r) / r
            self.capman_A[adapter_name] = nn.Parameter(self._new_a(r))
            self.capman_B[adapter_name] = nn.Parameter(torch.empty(shape[0], r))
        if with_expert:
            r_e = rank_for(shape, config.expert_r, config.expert_rank_ratio)
            if adapter_name in self.r and r_e >= self.r[adapter_name]:
                raise ValueError(
                    f"expert rank {r_e} must be smaller than the general rank {self.r[adapter_name]} "
                    f"(paper: r_e < r_g) on a layer of shape {shape}"
                )
            self.expert_r[adapter_name] = r_e
            self.expert_scaling[adapter_name] = (config.expert_alpha or r_e) / r_e
            self.capman_expert_A[adapter_name] = nn.Parameter(self._new_a(r_e))
            self.capman_expert_B[adapter_name] = nn.Parameter(torch.empty(shape[0], r_e))
        dropout = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        self.capman_dropout[adapter_name] = dropout
        self.reset_parameters(adapter_name, config.init_lora_weights)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def reset_parameters(self, adapter_name: str, init: bool | str) -> None:
        """LoRA initialisation: B = 0 so a fresh adapter leaves the model's output unchanged."""
        for a_dict, b_dict in ((self.capman_A, self.capman_B), (self.capman_expert_A, self.capman_expert_B)):
            if adapter_name not in a_dict:
                continue
            a, b = a_dict[adapter_name], b_dict[adapter_name]
            with torch.no_grad():
                if init == "gaussian":
                    nn.init.normal_(a, std=1 / a.shape[0])
                else:
                    nn.init.kaiming_uniform_(a, a=math.sqrt(5))
                if init is False:
                    nn.init.kaiming_uniform_(b, a=math.sqrt(5))
                else:
                    nn.init.zeros_(b)

    def get_delta_weight(self, adapter_name: str, include_expert: bool = True) -> torch.Tensor:
        """``s_g B^g A^g + s_e B^e A^e`` in the base weight's layout, in float32; the one home of the merge math."""
        weight = self.get_base_layer().weight
        delta = torch.zeros(weight.shape, device=weight.device, dtype=torch.float32)
        parts = [(self.capman_A, self.capman_B, self.scaling)]
        if include_expert:
            parts.append((self.capman_expert_A, self.capman_expert_B, self.expert_scaling))
        for a_dict, b_dict, scaling in parts:
            if adapter_name in a_dict:
                a, b = a_dict[adapter_name].float(), b_dict[adapter_name].float()
                delta += (scaling[adapter_name] * (b @ a.flatten(1))).view(weight.shape)
        return delta

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Fold the adapters (general and expert) into the base weight: theta = theta^g + theta^e."""
        adapter_names = check_adapters_to_merge(self, adapter_names)
        weight = self.get_base_layer().weight
        for name in adapter_names:
            if name not in self.capman_dropout:
                continue
            merged = (weight.data.float() + self.get_delta_weight(name)).to(weight.dtype)
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(f"NaNs or infs in the merged weights: adapter {name!r} seems to be broken")
            weight.data = merged
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        weight = self.get_base_layer().weight
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            weight.data = (weight.data.float() - self.get_delta_weight(name)).to(weight.dtype)

    def _down(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _up(self, h: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _gate_view(self, gate: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        if gate.ndim != 1 or gate.shape[0] != h.shape[0]:
            raise ValueError(
                f"expert gate must have one entry per batch row: got shape {tuple(gate.shape)} "
                f"for a batch of {h.shape[0]} in {type(self.get_base_layer()).__name__}"
            )
        return gate.to(device=h.device, dtype=h.dtype).view(-1, *([1] * (h.ndim - 1)))

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        gate = self._expert_gate
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            if gate is not None:
                raise ValueError("cannot switch the expert of a merged layer; call `unmerge_adapter()` first")
            return self.base_layer(x, *args, **kwargs)

        result = self.base_layer(x, *args, **kwargs)
        for name in self.active_adapters:
            if name not in self.capman_dropout:
                continue
            use_expert = name in self.capman_expert_A and not isinstance(gate, str)
            has_general = name in self.capman_A
            if not (use_expert or has_general):
                continue
            a_ref = self.capman_A[name] if has_general else self.capman_expert_A[name]
            x_in = self._cast_input_dtype(self.capman_dropout[name](x), a_ref.dtype)
            delta = None
            if has_general:
                delta = self._up(self._down(x_in, self.capman_A[name]), self.capman_B[name]) * self.scaling[name]
            if use_expert:
                # The gate multiplies the rank-r hidden state: cheap, and gated-off rows get exactly zero
                # contribution and zero gradient, as if the expert were absent for them.
                h = self._down(x_in, self.capman_expert_A[name])
                if gate is not None:
                    h = h * self._gate_view(gate, h)
                expert = self._up(h, self.capman_expert_B[name]) * self.expert_scaling[name]
                delta = expert if delta is None else delta + expert
            result = result + delta.to(result.dtype)
        return result


class Linear(nn.Module, CapManLayer):
    """CapMan around an ``nn.Linear``."""

    forward = CapManLayer.forward  # nn.Module comes first in the MRO and would shadow it

    def __init__(self, base_layer: nn.Linear, adapter_name: str, config: CapManConfig, with_expert: bool) -> None:
        super().__init__()
        CapManLayer.__init__(self, base_layer)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, with_expert)

    def _down(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        return F.linear(x, a)

    def _up(self, h: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return F.linear(h, b)


class Conv2d(nn.Module, CapManLayer):
    """CapMan around an ``nn.Conv2d`` with any kernel, stride, padding, dilation and groups.

    With ``g`` groups the weight is ``out x (in/g * kh * kw)``; the delta ``B @ A`` is applied as a grouped conv of
    ``A`` repeated per group (in -> g*r channels, the base layer's geometry) followed by a grouped 1x1 conv of ``B``
    (g*r -> out). For ``g = 1`` this is the usual LoRA conv pair, and it is exactly ``conv(x, reshape(B @ A))``.
    """

    forward = CapManLayer.forward

    def __init__(self, base_layer: nn.Conv2d, adapter_name: str, config: CapManConfig, with_expert: bool) -> None:
        super().__init__()
        if base_layer.padding_mode != "zeros":
            raise ValueError(f"CapMan supports Conv2d with padding_mode='zeros' only, got {base_layer.padding_mode!r}")
        CapManLayer.__init__(self, base_layer)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, with_expert)

    def _down(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        base = self.get_base_layer()
        if base.groups > 1:
            a = a.repeat(base.groups, 1, 1, 1)
        return F.conv2d(x, a, None, base.stride, base.padding, base.dilation, base.groups)

    def _up(self, h: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return F.conv2d(h, b[:, :, None, None], None, 1, 0, 1, self.get_base_layer().groups)
