"""`CMDenoiser`: theta and theta^g noise predictions (and CBDM's extra-label pass) from ONE module call.

DDP/FSDP/DeepSpeed break when a wrapped module is called twice before backward, so the training scripts let
Accelerate prepare this module and call it once per step. Three ways to compute the predictions, identical in
value (tests check outputs and gradients):

* ``fused``: one UNet call on the batch stacked twice, the expert gated on for the first copy and off for the second.
* ``sequential``: two UNet calls inside this one forward (the expert switched off for the second); least memory.
* ``shared_prefix``: when experts live only in ``up_blocks``, the time embedding, down path and mid block are the
  same for theta and theta^g: run them once and duplicate the activations at the entry of every up block.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from diffusers import UNet2DConditionModel
from torch import nn

from .tuner import CapManLayer, expert_disabled, expert_gate

ForwardMode = Literal["fused", "sequential", "shared_prefix"]
FORWARD_MODES = ("fused", "sequential", "shared_prefix")
# Modules that run after the up path has been duplicated, so shared_prefix may put experts there.
_AFTER_SPLIT = ("up_blocks.", "conv_norm_out", "conv_out")


def _base_model(model: nn.Module) -> nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


class CMDenoiser(nn.Module):
    """Wraps a (PEFT-wrapped) diffusers UNet and returns ``(eps_full, eps_general[, eps_extra])`` in one call.

    Args:
        unet: a UNet2DModel (conditioned on ``class_labels``) or UNet2DConditionModel (``encoder_hidden_states``)
            carrying CapMan layers; without CM any diffusers UNet works.
        forward_mode: "fused", "sequential" or "shared_prefix" (see module docstring).
        capacity_manipulation: False computes only theta: no second prediction at all, one UNet call per step.
    """

    def __init__(
        self, unet: nn.Module, forward_mode: ForwardMode = "fused", capacity_manipulation: bool = True
    ) -> None:
        super().__init__()
        if forward_mode not in FORWARD_MODES:
            raise ValueError(f"forward_mode must be one of {FORWARD_MODES}, got {forward_mode!r}")
        self.unet = unet
        self.forward_mode = forward_mode
        self.capacity_manipulation = capacity_manipulation
        base = _base_model(unet)
        self.cond_kwarg = "encoder_hidden_states" if isinstance(base, UNet2DConditionModel) else "class_labels"
        if not capacity_manipulation:
            return
        expert_layers = [name for name, m in base.named_modules() if isinstance(m, CapManLayer) and m.expert_r]
        if not expert_layers:
            raise ValueError("capacity manipulation needs a model with CapMan experts; got none")
        if forward_mode == "shared_prefix":
            outside = [name for name in expert_layers if not name.startswith(_AFTER_SPLIT)]
            if outside:
                raise ValueError(
                    "forward_mode='shared_prefix' needs experts only in up_blocks (the down path must be the same "
                    f"for theta and theta^g), but these layers have experts: {outside[:3]}; use 'fused'"
                )
            self._expand_index: torch.Tensor | None = None
            self._prefix_batch = 0
            for block in base.up_blocks:
                block.register_forward_pre_hook(self._duplicate_into_up_path, with_kwargs=True)

    def _call(self, sample: torch.Tensor, timestep: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self.unet(sample, timestep, **{self.cond_kwarg: cond}, return_dict=False)[0]

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        cond: torch.Tensor,
        extra_cond: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, ...]:
        """Return ``(eps_full, eps_general)``, or ``(eps_full, eps_general, eps_extra)`` when `extra_cond` is given.

        ``eps_extra`` is theta's prediction for the same ``(x_t, t)`` under `extra_cond` (CBDM's y'). Without
        capacity manipulation ``eps_general`` is None.
        """
        batch = sample.shape[0]
        timestep = timestep.expand(batch) if timestep.ndim == 0 else timestep
        conds = [cond] if extra_cond is None else [cond, extra_cond]

        def call(conditions: list[torch.Tensor]) -> torch.Tensor:
            n = len(conditions)
            return self._call(sample.repeat(n, *[1] * (sample.ndim - 1)), timestep.repeat(n), torch.cat(conditions))

        if not self.capacity_manipulation:
            full, *extra = call(conds).split(batch)
            return (full, None, *extra)
        if self.forward_mode == "sequential":
            full, *extra = call(conds).split(batch)
            with expert_disabled(self.unet):
                general = self._call(sample, timestep, cond)
            return (full, general, *extra)

        # Row blocks: theta(cond) | theta^g(cond) | theta(extra_cond)
        ones, zeros = sample.new_ones(batch), sample.new_zeros(batch)
        gate = torch.cat([ones, zeros] + [ones] * (len(conds) - 1))
        if self.forward_mode == "fused":
            with expert_gate(self.unet, gate):
                return tuple(call([cond, *conds]).split(batch))

        # shared_prefix: the prefix runs on the conds once; each up block gets the cond rows twice.
        arange = torch.arange(batch, device=sample.device)
        self._expand_index = torch.cat([arange, arange] + [arange + batch] * (len(conds) - 1))
        self._prefix_batch = len(conds) * batch
        try:
            with expert_gate(self.unet, gate):
                return tuple(call(conds).split(batch))
        finally:
            self._expand_index = None

    def _duplicate_into_up_path(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        """Forward pre-hook on each up block: index prefix-sized batch tensors into the expanded up-path batch."""
        index = self._expand_index
        if index is None:
            return None
        prefix_batch = self._prefix_batch

        def expand(value: Any) -> Any:
            if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == prefix_batch:
                return value.index_select(0, index.to(value.device))
            if isinstance(value, tuple):
                return tuple(expand(v) for v in value)
            return value

        return expand(args), {key: expand(value) for key, value in kwargs.items()}
