"""`CapManModel`, the PEFT tuner, and the expert switch (`expert_gate` / `expert_disabled`)."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from types import SimpleNamespace
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, check_target_module_exists
from torch import nn

from .config import CapManConfig
from .layer import EXPERT_OFF, CapManLayer, Conv2d, Gate, GateRows, GroupRows, Linear, PairedDropout, rank_blocks


def _matches(spec: Any, key: str) -> bool:
    """PEFT's own target matching (list: exact name or suffix; str: full regex) for any module spec."""
    return bool(check_target_module_exists(SimpleNamespace(target_modules=spec), key))


class CapManModel(BaseTuner):
    """Injects CapMan layers into a model (``get_peft_model(model, CapManConfig(...))``).

    In full mode the base weights are the general part and train too, so they are kept trainable and saved with
    the adapter: ``save_pretrained`` then holds the whole trained network, and ``PeftModel.from_pretrained`` on a
    freshly initialised base reproduces it.
    """

    prefix: str = "capman_"
    tuner_layer_cls = CapManLayer
    target_module_mapping: dict[str, list[str]] = {}

    def _prepare_model(self, peft_config: CapManConfig, model: nn.Module) -> None:
        """Check that experts only go where the adapter goes (`expert_target_modules` within `target_modules`)."""
        if peft_config.expert_target_modules is None:
            return
        expert_keys = [
            key
            for key, module in model.named_modules()
            if isinstance(module, (nn.Linear, nn.Conv2d)) and _matches(peft_config.expert_target_modules, key)
        ]
        if not expert_keys:
            raise ValueError(
                f"`expert_target_modules` {peft_config.expert_target_modules!r} matches no Linear/Conv2d of the model"
            )
        outside = [k for k in expert_keys if not self._check_target_module_exists(peft_config, k)]
        if outside:
            raise ValueError(
                f"`expert_target_modules` must be a subset of `target_modules`; these modules match the expert "
                f"targets but not the targets: {outside[:5]}{' ...' if len(outside) > 5 else ''}"
            )

    def _create_and_replace(
        self,
        peft_config: CapManConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **optional_kwargs: Any,
    ) -> None:
        expert_spec = peft_config.expert_target_modules or peft_config.target_modules
        with_expert = _matches(expert_spec, current_key)
        if isinstance(target, CapManLayer):
            target.update_layer(adapter_name, peft_config, with_expert)
            return
        new_module = self._create_new_module(peft_config, adapter_name, target, with_expert, current_key)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    @staticmethod
    def _create_new_module(
        config: CapManConfig, adapter_name: str, target: nn.Module, with_expert: bool, key: str
    ) -> nn.Module:
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if isinstance(base, nn.Linear):
            return Linear(target, adapter_name, config, with_expert)
        if isinstance(base, nn.Conv2d):
            return Conv2d(target, adapter_name, config, with_expert)
        raise ValueError(
            f"CapMan supports nn.Linear and nn.Conv2d; target {key!r} is a {type(base).__name__}. "
            "Narrow `target_modules` to linear and conv layers."
        )

    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        super()._mark_only_adapters_as_trainable(model)
        if any(c.mode == "full" and not c.inference_mode for c in self.peft_config.values()):
            # Full mode trains W^g itself (paper Eq. 1): every base parameter stays trainable.
            for param in model.parameters():
                param.requires_grad_(True)

    @classmethod
    def _get_adapter_state_dict(
        cls,
        model: nn.Module,
        config: CapManConfig,
        adapter_name: str,
        state_dict: dict[str, torch.Tensor],
        unwanted_adapter_names: list[str],
    ) -> dict[str, torch.Tensor]:
        if config.mode == "full":
            # The trained base is part of the adapter in full mode; without it the expert means nothing.
            return dict(state_dict)
        return super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)


def base_model(model: nn.Module) -> nn.Module:
    """The model a PEFT wrapper holds (the model itself when it is not wrapped)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def capman_layers(model: nn.Module) -> list[CapManLayer]:
    """All CapMan layers of a model (a PeftModel, the injected base model or a DDP-wrapped one)."""
    return [m for m in model.modules() if isinstance(m, CapManLayer)]


def _gate_state(module: nn.Module) -> tuple[nn.Module, str] | None:
    """Where a module keeps the per-call row state that the gate sets: the expert switch or the shared masks."""
    if isinstance(module, CapManLayer):
        return module, "_expert_gate"
    if isinstance(module, PairedDropout):
        return module, "mask_source"
    return None


def _gated_modules(model: nn.Module) -> list[tuple[nn.Module, str]]:
    return [state for module in model.modules() if (state := _gate_state(module)) is not None]


def _set_states(states: list[tuple[nn.Module, str]], values: list[Any]) -> list[Any]:
    previous = [getattr(module, attr) for module, attr in states]
    for (module, attr), value in zip(states, values, strict=True):
        setattr(module, attr, value)
    return previous


class _GateReplay:
    """Calls a checkpointed block with the gate (and shared dropout masks) it saw in the forward pass.

    Non-reentrant gradient checkpointing recomputes a block during backward, after the gate's context manager has
    exited; without this, the recomputation would run with the expert on for every sample and the gradients of a
    fused theta/theta^g batch would be wrong.
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.states = _gated_modules(module)
        self.values = [getattr(m, attr) for m, attr in self.states]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        previous = _set_states(self.states, self.values)
        try:
            return self.module(*args, **kwargs)
        finally:
            _set_states(self.states, previous)


def _gate_aware(checkpoint_func: Callable) -> Callable:
    def checkpoint_with_gate(module: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(module, nn.Module):
            module = _GateReplay(module)
        return checkpoint_func(module, *args, **kwargs)

    checkpoint_with_gate.capman_gate_aware = True
    return checkpoint_with_gate


def _make_checkpointing_gate_aware(model: nn.Module) -> None:
    """Wrap diffusers' per-block `_gradient_checkpointing_func`; idempotent, and redone after re-enabling."""
    for module in model.modules():
        func = getattr(module, "_gradient_checkpointing_func", None)
        if func is not None and not getattr(func, "capman_gate_aware", False):
            module._gradient_checkpointing_func = _gate_aware(func)


def pair_dropout(model: nn.Module) -> int:
    """Replace every ``nn.Dropout`` of `model` by a :class:`PairedDropout` (same p; idempotent); returns how many.

    A PairedDropout is an ``nn.Dropout`` until a gate shares its masks, so this changes nothing else. The model is
    marked, so that the gate, which calls this every step, walks the model only once.
    """
    if getattr(model, "_capman_dropout_paired", False):
        return 0
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Dropout:
                parent._modules[name] = PairedDropout(child.p, child.inplace).train(child.training)
                replaced += 1
    model._capman_dropout_paired = True
    return replaced


@contextmanager
def _gated(model: nn.Module, gate: Gate, mask_source: torch.Tensor | None = None) -> Iterator[None]:
    if mask_source is not None:
        pair_dropout(model)
    states = _gated_modules(model)
    if not any(isinstance(module, CapManLayer) for module, _ in states):
        raise ValueError("the model has no CapMan layers: wrap it with get_peft_model(model, CapManConfig(...)) first")
    _make_checkpointing_gate_aware(model)
    values = [gate if isinstance(m, CapManLayer) else mask_source for m, _ in states]
    previous = _set_states(states, values)
    try:
        yield
    finally:
        _set_states(states, previous)


def expert_gate(
    model: nn.Module, gate: torch.Tensor, mask_source: torch.Tensor | None = None
) -> AbstractContextManager[None]:
    """Switch the expert on or off per sample: ``gate[i] = 1`` gives theta, ``0`` gives theta^g for batch row i.

    One call on ``cat([x, x])`` with gate ``[1]*B + [0]*B`` computes theta and theta^g together, so distributed
    wrappers see a single forward. The gate's values are read once here (one host sync per call, not per layer).
    The switch never touches ``requires_grad``.

    ``mask_source[i]`` (optional, one entry per row) is the row whose dropout masks row i shares: pass
    ``[0..B-1, 0..B-1]`` for the stacked batch above and the two predictions differ by the expert alone. The
    model's ``nn.Dropout`` layers become :class:`PairedDropout` on first use.
    """
    if not isinstance(gate, torch.Tensor) or gate.ndim != 1:
        shape = tuple(gate.shape) if isinstance(gate, torch.Tensor) else type(gate).__name__
        raise ValueError(f"gate must be a 1-D tensor with one 0/1 entry per batch row, got {shape}")
    if mask_source is not None and mask_source.shape != gate.shape:
        raise ValueError(
            f"mask_source must have one entry per gate row: {tuple(mask_source.shape)} vs {tuple(gate.shape)}"
        )
    values = gate.tolist()
    if any(v not in (0, 1) for v in values):
        raise ValueError(f"gate entries must be 0 or 1, got {sorted(set(values) - {0, 1})[:5]}")
    runs, start = [], 0
    for i in range(1, len(values) + 1):
        if i == len(values) or values[i] != values[start]:
            runs.append((start, i, bool(values[start])))
            start = i
    return _gated(model, GateRows(gate, tuple(runs)), mask_source)


def group_experts(model: nn.Module, groups: torch.Tensor) -> AbstractContextManager[None]:
    """Route each sample to its group's block of every expert (``CapManConfig(expert_groups=G)``): row i uses block
    ``groups[i]`` in [0, G), so the blocks act as G separate low-rank experts, one per class group, computed in one
    call (the Group-Expert LoRA baseline, paper sec. E.4)."""
    if not isinstance(groups, torch.Tensor) or groups.ndim != 1 or groups.dtype.is_floating_point:
        raise ValueError(f"groups must be a 1-D integer tensor with one group per batch row, got {groups!r}")
    return _gated(model, GroupRows(groups))


def merge_group_and_unload(model: nn.Module, group: int) -> nn.Module:
    """The plain model of one class group: a copy with every expert cut to block `group`, merged (W^g + that
    block's low-rank part). `model` is left as it was."""
    model = copy.deepcopy(model)
    for layer in capman_layers(model):
        for name, b in layer.capman_expert_B.items():
            blocks = rank_blocks(b.shape[1], layer.expert_groups[name]).to(b.device)
            with torch.no_grad():
                b[:, blocks != group] = 0
    return model.merge_and_unload()


def expert_disabled(model: nn.Module) -> AbstractContextManager[None]:
    """Run theta^g: the same network with every expert branch switched off for the whole batch."""
    return _gated(model, EXPERT_OFF)


def merge_general_and_unload(model: nn.Module) -> nn.Module:
    """theta^g as a plain model: drop every expert, then merge the rest (lora mode) or just unwrap (full mode).

    This is the "CM (theta^g)" row of the paper's Tab. 7; the model passed in loses its experts.
    """
    for layer in capman_layers(model):
        experts = (layer.capman_expert_A, layer.capman_expert_B, layer.expert_r, layer.expert_scaling)
        for container in (*experts, layer.expert_groups):
            container.clear()
    return model.merge_and_unload()
