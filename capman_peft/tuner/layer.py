"""The dual-adapter layer: a base weight, a general low-rank part and a gated low-rank expert part (paper Eq. 1)."""

from __future__ import annotations

import math
import warnings
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from .config import CapManConfig

# Gate values a layer understands. ``None``: expert on for every sample (the full model theta). ``EXPERT_OFF``:
# expert off for the whole batch (theta^g). ``GateRows``: a per-sample 0/1 switch, so that theta and theta^g can be
# evaluated in one forward call on a stacked batch.
EXPERT_OFF = "off"


class GateRows(NamedTuple):
    """A per-sample gate and its runs of equal values ``(start, stop, on)``, read once when the gate is set."""

    mask: torch.Tensor
    runs: tuple[tuple[int, int, bool], ...]


class GroupRows(NamedTuple):
    """Per-sample expert blocks: row i uses block ``groups[i]`` of every expert split by ``expert_groups``."""

    groups: torch.Tensor


def rank_blocks(rank: int, groups: int) -> torch.Tensor:
    """The block of each of an expert's `rank` hidden units when it is split into `groups` near-equal blocks."""
    return torch.arange(rank) * groups // rank


Gate = GateRows | GroupRows | str | None
# A gate with at most this many runs (e.g. [1]*B + [0]*B) is applied by running contiguous row blocks with the
# merged weights W + dW; more fragmented gates multiply the low-rank expert output per row instead.
MAX_MERGED_RUNS = 2


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
    other_param_names = ("r", "expert_r", "expert_groups", "scaling", "expert_scaling", "capman_dropout")

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        self.base_layer = base_layer
        self.r: dict[str, int] = {}
        self.expert_r: dict[str, int] = {}
        self.scaling: dict[str, float] = {}
        self.expert_scaling: dict[str, float] = {}
        self.expert_groups: dict[str, int] = {}
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
            r_e = max(config.expert_groups, rank_for(shape, config.expert_r, config.expert_rank_ratio))
            if adapter_name in self.r and r_e >= self.r[adapter_name]:
                raise ValueError(
                    f"expert rank {r_e} must be smaller than the general rank {self.r[adapter_name]} "
                    f"(paper: r_e < r_g) on a layer of shape {shape}"
                )
            self.expert_r[adapter_name] = r_e
            self.expert_groups[adapter_name] = config.expert_groups
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

    def _delta(self, adapter_name: str, expert: bool) -> torch.Tensor | None:
        """``s B A`` of the general part (``expert=False``) or the expert, in the base weight's layout (or None)."""
        a_dict, b_dict, scaling = (
            (self.capman_expert_A, self.capman_expert_B, self.expert_scaling)
            if expert
            else (self.capman_A, self.capman_B, self.scaling)
        )
        if adapter_name not in a_dict:
            return None
        a, b = a_dict[adapter_name], b_dict[adapter_name]
        return (scaling[adapter_name] * (b @ a.flatten(1))).view(self.get_base_layer().weight.shape)

    def get_delta_weight(self, adapter_name: str, include_expert: bool = True) -> torch.Tensor:
        """``s_g B^g A^g + s_e B^e A^e`` in the base weight's layout, in float32; the one home of the merge math."""
        delta = torch.zeros(self.get_base_layer().weight.shape, dtype=torch.float32)
        for part in (False, True) if include_expert else (False,):
            value = self._delta(adapter_name, part)
            if value is not None:
                delta = delta.to(value.device) + value.float()
        return delta

    def lora_factors(self, adapter_name: str, include_expert: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """One plain LoRA pair (A, B) of rank r_g + r_e with scale 1 whose ``B @ A`` is ``get_delta_weight``.

        ``A = [A^g; A^e]`` (rows stacked) and ``B = [s_g B^g, s_e B^e]`` (columns stacked), in float32; A keeps the
        base layer's layout (``(r, k)`` or ``(r, in, kh, kw)``) so that diffusers and PEFT load it as their own LoRA.
        """
        if self.get_base_layer().weight.ndim == 4 and self.get_base_layer().groups > 1:
            raise ValueError("a grouped convolution's CapMan delta is not a plain LoRA; it cannot be exported as one")
        parts = [(self.capman_A, self.capman_B, self.scaling)]
        if include_expert:
            parts.append((self.capman_expert_A, self.capman_expert_B, self.expert_scaling))
        a = [a_dict[adapter_name].float() for a_dict, _, _ in parts if adapter_name in a_dict]
        b = [scale[adapter_name] * b_dict[adapter_name].float() for _, b_dict, scale in parts if adapter_name in b_dict]
        if not a:
            raise ValueError(f"adapter {adapter_name!r} has no low-rank part on this layer")
        return torch.cat(a), torch.cat(b, dim=1)

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

    def _functional(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The base layer's op with another weight (same bias and geometry)."""
        raise NotImplementedError

    def _check_batch(self, rows: torch.Tensor, batch: int) -> None:
        if rows.shape[0] != batch:
            raise ValueError(
                f"expert gate must have one entry per batch row: got shape {tuple(rows.shape)} "
                f"for a batch of {batch} in {type(self.get_base_layer()).__name__}"
            )

    # The dimension of the low-rank hidden state that holds the rank (Linear: last; Conv2d: channels).
    rank_dim = -1

    def _group_mask(self, name: str, groups: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """1 where hidden unit j of row i belongs to row i's group block, shaped to multiply `h`."""
        self._check_batch(groups, h.shape[0])
        rank = self.expert_r[name]
        blocks = rank_blocks(rank, self.expert_groups[name]).to(h.device)
        mask = (groups.to(h.device)[:, None] == blocks[None, :]).to(h.dtype)
        shape = [h.shape[0]] + [1] * (h.ndim - 1)
        shape[self.rank_dim] = rank
        return mask.view(shape)

    def _can_merge_weights(self, names: list[str], x: torch.Tensor, gate: Gate) -> bool:
        """Whether this forward can run the base op once per gate run with W + dW instead of adding B(A(x)).

        That is the same math with no extra low-rank convs/matmuls (measured: the low-rank branch cost 19% of a
        paper-UNet step on CPU). It needs no adapter dropout (it acts on the adapter input only), adapter and base
        weights of one dtype, and a gate of few contiguous runs.
        """
        weight = self.get_base_layer().weight
        if isinstance(gate, GroupRows) or (isinstance(gate, GateRows) and len(gate.runs) > MAX_MERGED_RUNS):
            return False
        if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
            return False
        for name in names:
            if self.training and not isinstance(self.capman_dropout[name], nn.Identity):
                return False
            params = [d[name] for d in (self.capman_A, self.capman_expert_A) if name in d]
            if any(p.dtype != weight.dtype for p in params):
                return False
        return True

    def _forward_merged_weights(self, x: torch.Tensor, names: list[str], gate: Gate) -> torch.Tensor:
        general = self.get_base_layer().weight
        experts = []
        for name in names:
            delta = self._delta(name, expert=False)
            general = general if delta is None else general + delta
            expert = self._delta(name, expert=True)
            if expert is not None:
                experts.append(expert)
        if gate == EXPERT_OFF or not experts:
            return self._functional(x, general)
        full = general + sum(experts)
        if gate is None:
            return self._functional(x, full)
        self._check_batch(gate.mask, x.shape[0])
        return torch.cat([self._functional(x[start:stop], full if on else general) for start, stop, on in gate.runs])

    def _can_stack(self, gate: Gate) -> bool:
        """Whether the general part and the expert can run as one low-rank pair (no per-group expert blocks, and
        the hidden state's rank units not interleaved by a grouped convolution)."""
        return not isinstance(gate, GroupRows) and getattr(self.get_base_layer(), "groups", 1) == 1

    def _stacked_low_rank(self, name: str, x: torch.Tensor, gate: Gate) -> torch.Tensor:
        """``s_g B^g A^g x + g · s_e B^e A^e x`` as one down and one up product of the stacked pair
        ``A = [A^g; A^e]``, ``B = [s_g B^g, s_e B^e]`` (:meth:`lora_factors`' stacking), the gate g scaling the
        expert's hidden units per row: two products per layer instead of four, the same math."""
        r_g = self.r[name]
        a = torch.cat([self.capman_A[name], self.capman_expert_A[name]])
        b = torch.cat(
            [self.scaling[name] * self.capman_B[name], self.expert_scaling[name] * self.capman_expert_B[name]], 1
        )
        h = self._down(x, a)
        if isinstance(gate, GateRows):
            self._check_batch(gate.mask, h.shape[0])
            # 1 on the general units, the row's gate on the expert's: gated-off rows get exactly zero from the
            # expert and zero gradient into it, as in the separate computation.
            scale = torch.ones(h.shape[0], a.shape[0], device=h.device, dtype=h.dtype)
            scale[:, r_g:] = gate.mask.to(device=h.device, dtype=h.dtype)[:, None]
            shape = [h.shape[0]] + [1] * (h.ndim - 1)
            shape[self.rank_dim] = a.shape[0]
            h = h * scale.view(shape)
        return self._up(h, b)

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
        names = [name for name in self.active_adapters if name in self.capman_dropout]
        if not args and not kwargs and self._can_merge_weights(names, x, gate):
            return self._forward_merged_weights(x, names, gate)

        result = self.base_layer(x, *args, **kwargs)
        for name in names:
            use_expert = name in self.capman_expert_A and gate != EXPERT_OFF
            has_general = name in self.capman_A
            # Dropout is drawn whatever the gate, so that a theta call and a theta^g call consume the same random
            # numbers (sequential mode pairs their masks by replaying the random state).
            dropped = self.capman_dropout[name](x)
            if not (use_expert or has_general):
                continue
            a_ref = self.capman_A[name] if has_general else self.capman_expert_A[name]
            x_in = self._cast_input_dtype(dropped, a_ref.dtype)
            if has_general and use_expert and self._can_stack(gate):
                result = result + self._stacked_low_rank(name, x_in, gate).to(result.dtype)
                continue
            delta = None
            if has_general:
                delta = self._up(self._down(x_in, self.capman_A[name]), self.capman_B[name]) * self.scaling[name]
            if use_expert:
                # The gate multiplies the rank-r hidden state: cheap, and gated-off rows get exactly zero
                # contribution and zero gradient, as if the expert were absent for them.
                h = self._down(x_in, self.capman_expert_A[name])
                if isinstance(gate, GateRows):
                    self._check_batch(gate.mask, h.shape[0])
                    h = h * gate.mask.to(device=h.device, dtype=h.dtype).view(-1, *([1] * (h.ndim - 1)))
                elif isinstance(gate, GroupRows):
                    h = h * self._group_mask(name, gate.groups, h)
                expert = self._up(h, self.capman_expert_B[name]) * self.expert_scaling[name]
                delta = expert if delta is None else delta + expert
            result = result + delta.to(result.dtype)
        return result


class PairedDropout(nn.Dropout):
    """``nn.Dropout`` whose rows can share a mask: row i is masked like row ``mask_source[i]``.

    theta and theta^g are computed on copies of the same rows in one call; with independent masks their distance
    would measure dropout noise instead of the expert (docs/method.md). ``expert_gate(..., mask_source=...)`` sets the
    sharing for the call; without it (or on a tensor with another number of rows, such as the shared prefix in
    ``shared_prefix`` mode, which is computed once for both) this is exactly ``nn.Dropout``.
    """

    mask_source: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        source = self.mask_source
        if source is None or not self.training or self.p == 0 or x.shape[0] != len(source):
            return super().forward(x)
        keep = torch.empty_like(x).bernoulli_(1 - self.p)
        return x * keep[source.to(x.device)] / (1 - self.p)


class Linear(nn.Module, CapManLayer):
    """CapMan around an ``nn.Linear``."""

    forward = CapManLayer.forward  # nn.Module comes first in the MRO and would shadow it

    def __init__(self, base_layer: nn.Linear, adapter_name: str, config: CapManConfig, with_expert: bool) -> None:
        super().__init__()
        CapManLayer.__init__(self, base_layer)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, with_expert)

    def _functional(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.linear(x, weight, self.get_base_layer().bias)

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
    rank_dim = 1

    def __init__(self, base_layer: nn.Conv2d, adapter_name: str, config: CapManConfig, with_expert: bool) -> None:
        super().__init__()
        if base_layer.padding_mode != "zeros":
            raise ValueError(f"CapMan supports Conv2d with padding_mode='zeros' only, got {base_layer.padding_mode!r}")
        CapManLayer.__init__(self, base_layer)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, with_expert)

    def _functional(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        base = self.get_base_layer()
        return F.conv2d(x, weight, base.bias, base.stride, base.padding, base.dilation, base.groups)

    def _down(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        base = self.get_base_layer()
        if base.groups > 1:
            a = a.repeat(base.groups, 1, 1, 1)
        return F.conv2d(x, a, None, base.stride, base.padding, base.dilation, base.groups)

    def _up(self, h: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return F.conv2d(h, b[:, :, None, None], None, 1, 0, 1, self.get_base_layer().groups)
