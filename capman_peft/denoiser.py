"""`CMDenoiser`: theta and theta^g noise predictions (and the objectives' extra passes) from ONE module call.

DDP/FSDP/DeepSpeed break when a wrapped module is called twice before backward, so the training scripts let
Accelerate prepare this module and call it once per step. Three ways to compute the predictions, identical in
value (tests check outputs and gradients):

* ``fused``: one UNet call on the batch stacked twice, the expert gated on for the first copy and off for the second.
* ``sequential``: separate UNet calls inside this one forward (the expert switched off for the theta^g call). It
  does not save memory: autograd keeps both calls' activations until backward (docs/benchmarks.md).
* ``shared_prefix``: when experts live only after the family's split (a UNet's ``up_blocks``; a transformer's later
  half of blocks), everything before it (a UNet's time embedding, down path and mid block) is the same for theta and
  theta^g: run it once and duplicate the activations at the entry of every module after the split.

In every mode the theta and theta^g rows of a sample see the same dropout masks, so that their distance measures
the expert alone: ``fused`` and ``shared_prefix`` share the masks through the gate (``PairedDropout``),
``sequential`` replays the random state before the theta^g call.
"""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

import torch
from torch import nn

from .families import Condition, ModelFamily, concat, family_of_denoiser, take_rows
from .objective.coral import CORAL_HEAD
from .tuner import CapManLayer, base_model, expert_disabled, expert_gate

ForwardMode = Literal["fused", "sequential", "shared_prefix"]
FORWARD_MODES = ("fused", "sequential", "shared_prefix")


class Predictions(NamedTuple):
    """What one `CMDenoiser` call returns; entries that were not asked for are None."""

    full: torch.Tensor
    """theta(x_t, t, cond), every row."""
    general: torch.Tensor | None
    """theta^g(x_t, t, cond) on the rows ``general_rows`` (all rows when None)."""
    extra: torch.Tensor | None
    """theta(x_t, t, extra_cond): CBDM's y' pass."""
    embedding: torch.Tensor | None = None
    """CORAL's embedding of theta(x_t, t, cond)'s bottleneck, every row (with a CORAL head on the UNet)."""


class _RandomState:
    """The global random state (CPU and the sample's accelerator) at one point, to replay dropout masks."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, self.device)


class _RowBlocks:
    """The rows of one fused or shared-prefix call: theta(cond) | theta^g(cond) on the general rows | theta(extra_cond).

    ``gate`` is 1 where the expert is on; ``mask_source`` names, per row, the row whose dropout masks it shares (a
    theta^g row shares its sample's theta row).
    """

    def __init__(self, sample: torch.Tensor, general_rows: torch.Tensor | None, has_extra: bool) -> None:
        self.batch = batch = sample.shape[0]
        device = sample.device
        self.rows = torch.arange(batch, device=device) if general_rows is None else general_rows.to(device)
        self.extra = int(has_extra)
        self.sizes = [batch, len(self.rows)] + [batch] * self.extra
        self.gate = torch.cat(
            [sample.new_ones(batch), sample.new_zeros(len(self.rows))] + [sample.new_ones(batch)] * self.extra
        )
        own = torch.arange(batch, device=device)
        self.mask_source = torch.cat([own, self.rows] + [own + batch + len(self.rows)] * self.extra)


class CMDenoiser(nn.Module):
    """Wraps a (PEFT-wrapped) diffusers UNet and returns the :class:`Predictions` of a step in one call.

    Args:
        unet: a diffusers UNet carrying CapMan layers; without CM any diffusers UNet works.
        forward_mode: "fused", "sequential" or "shared_prefix" (see module docstring).
        capacity_manipulation: False computes only theta: no second prediction at all, one UNet call per step.
        family: how the UNet is called with a condition (:mod:`capman_peft.families`); default: the first
            registered family whose denoiser `unet` is (:func:`capman_peft.families.family_of_denoiser`).

    With a CORAL head on the UNet (:func:`capman_peft.objective.attach_coral_head`), the family's bottleneck output of
    the call's first rows (theta under `cond`, in every mode) goes through the head into ``Predictions.embedding``.
    """

    def __init__(
        self,
        unet: nn.Module,
        forward_mode: ForwardMode = "fused",
        capacity_manipulation: bool = True,
        family: ModelFamily | None = None,
    ) -> None:
        super().__init__()
        if forward_mode not in FORWARD_MODES:
            raise ValueError(f"forward_mode must be one of {FORWARD_MODES}, got {forward_mode!r}")
        self.unet = unet
        self.forward_mode = forward_mode
        self.capacity_manipulation = capacity_manipulation
        base = base_model(unet)
        self.family = family or family_of_denoiser(unet)
        self._bottleneck: torch.Tensor | None = None
        if hasattr(base, CORAL_HEAD):
            base.get_submodule(self.family.bottleneck_module).register_forward_hook(self._keep_bottleneck)
        if not capacity_manipulation:
            return
        expert_layers = [name for name, m in base.named_modules() if isinstance(m, CapManLayer) and m.expert_r]
        if not expert_layers:
            raise ValueError("capacity manipulation needs a model with CapMan experts; got none")
        if forward_mode == "shared_prefix":
            split = self.family.after_split(base)
            outside = [name for name in expert_layers if not name.startswith(split)]
            if outside:
                raise ValueError(
                    f"forward_mode='shared_prefix' needs experts only after the split ({', '.join(split[:3])}, ...: "
                    f"the layers before it must be the same for theta and theta^g), but these layers have experts: "
                    f"{outside[:3]}; use 'fused'"
                )
            self._expand_index: torch.Tensor | None = None
            self._prefix_batch = 0
            for module in self.family.split_modules(base):
                module.register_forward_pre_hook(self._duplicate_after_split, with_kwargs=True)

    def _call(self, sample: torch.Tensor, timestep: torch.Tensor, cond: Condition) -> torch.Tensor:
        return self.family.predict(self.unet, sample, timestep, cond)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        cond: Condition,
        extra_cond: Condition | None = None,
        general_rows: torch.Tensor | None = None,
    ) -> Predictions:
        """theta for every row, theta^g for `general_rows` (default: all), and theta under `extra_cond`.

        Args:
            extra_cond: a second condition per row for theta (CBDM's y').
            general_rows: row indices for theta^g; fewer rows make the step cheaper (``--cm_general_fraction``).
                Not with ``sequential`` (its mask replay needs the same rows in both calls).
        """
        batch = sample.shape[0]
        timestep = timestep.expand(batch) if timestep.ndim == 0 else timestep
        self._bottleneck = None
        if not self.capacity_manipulation:
            full, extra = self._theta(sample, timestep, cond, extra_cond)
            predictions = Predictions(full, None, extra)
        elif self.forward_mode == "sequential":
            predictions = self._sequential(sample, timestep, cond, extra_cond, general_rows)
        else:
            blocks = _RowBlocks(sample, general_rows, extra_cond is not None)
            if self.forward_mode == "fused":
                outputs = self._fused(sample, timestep, cond, extra_cond, general_rows, blocks)
            else:
                outputs = self._shared_prefix(sample, timestep, cond, extra_cond, blocks)
            predictions = Predictions(outputs[0], outputs[1], outputs[2] if extra_cond is not None else None)
        if self._bottleneck is None:
            return predictions
        head = base_model(self.unet).get_submodule(CORAL_HEAD)
        embedding, self._bottleneck = head(self._bottleneck[:batch]), None
        return predictions._replace(embedding=embedding)

    def _keep_bottleneck(self, module: nn.Module, args: Any, output: torch.Tensor) -> None:
        """Forward hook on the bottleneck: keep the output of a forward's first UNet call (theta under cond)."""
        if self._bottleneck is None:
            self._bottleneck = output[0] if isinstance(output, tuple) else output

    def _sequential(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        cond: Condition,
        extra_cond: Condition | None,
        general_rows: torch.Tensor | None,
    ) -> Predictions:
        """Separate UNet calls; theta^g replays the random state theta started from, so it sees the same masks."""
        if general_rows is not None:
            raise ValueError("forward_mode='sequential' computes theta^g on every row; use 'fused' or 'shared_prefix'")
        state = _RandomState(sample.device)
        full = self._call(sample, timestep, cond)
        after_theta = _RandomState(sample.device)
        state.restore()  # theta^g draws the dropout masks theta drew
        with expert_disabled(self.unet):
            general = self._call(sample, timestep, cond)
        after_theta.restore()
        extra = None if extra_cond is None else self._call(sample, timestep, extra_cond)
        return Predictions(full, general, extra)

    def _fused(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        cond: Condition,
        extra_cond: Condition | None,
        general_rows: torch.Tensor | None,
        blocks: _RowBlocks,
    ) -> tuple[torch.Tensor, ...]:
        """One UNet call on the row blocks stacked, the expert gated off for the theta^g block."""
        rows = blocks.rows
        general_part = (
            (sample, timestep, cond) if general_rows is None else (sample[rows], timestep[rows], take_rows(cond, rows))
        )
        parts = [(sample, timestep, cond), general_part] + [(sample, timestep, extra_cond)] * blocks.extra
        samples, timesteps, conds = zip(*parts, strict=True)
        with expert_gate(self.unet, blocks.gate, blocks.mask_source):
            return self._call(torch.cat(samples), torch.cat(timesteps), concat(conds)).split(blocks.sizes)

    def _shared_prefix(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        cond: Condition,
        extra_cond: Condition | None,
        blocks: _RowBlocks,
    ) -> tuple[torch.Tensor, ...]:
        """The prefix (a UNet's time embedding, down path and mid block) runs on cond (and extra_cond) once; the hook
        on each module after the split expands its inputs into the row blocks."""
        conds = [cond] if extra_cond is None else [cond, extra_cond]
        n = len(conds)
        own = torch.arange(blocks.batch, device=sample.device)
        self._expand_index = torch.cat([own, blocks.rows] + [own + blocks.batch] * (n - 1))
        self._prefix_batch = n * blocks.batch
        try:
            with expert_gate(self.unet, blocks.gate, blocks.mask_source):
                return self._call(sample.repeat(n, *[1] * (sample.ndim - 1)), timestep.repeat(n), concat(conds)).split(
                    blocks.sizes
                )
        finally:
            self._expand_index = None

    def theta(self, sample: torch.Tensor, timestep: torch.Tensor, cond: Condition) -> torch.Tensor:
        """theta's prediction alone, one UNet call (consistency training's gradient-free target pass)."""
        return self._call(sample, timestep.expand(sample.shape[0]) if timestep.ndim == 0 else timestep, cond)

    def _theta(
        self, sample: torch.Tensor, timestep: torch.Tensor, cond: Condition, extra_cond: Condition | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """theta under `cond` (and `extra_cond`) in one call on the stacked batch."""
        if extra_cond is None:
            return self._call(sample, timestep, cond), None
        both = self._call(torch.cat([sample, sample]), timestep.repeat(2), concat([cond, extra_cond]))
        full, extra = both.chunk(2)
        return full, extra

    def _duplicate_after_split(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        """Forward pre-hook on each module after the split: index prefix-sized batch tensors into the expanded batch
        (a transformer's rotary embedding is per token, not per sample, and stays as it is)."""
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

        kwargs = {key: value if key == "image_rotary_emb" else expand(value) for key, value in kwargs.items()}
        return expand(args), kwargs
