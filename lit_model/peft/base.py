"""What every adapter is, and the model-wide operations written once over it.

An adapter is a module substituted for a frozen linear layer that adds a trainable update to its output:
`lit_model.peft.lora.LoRALinear` is one; DoRA or a scaled variant would be others, implementing `Adapter`. Everything
else is written against the protocol, not against LoRA's attribute names: which state-dict keys are adapter tensors,
freezing all but them, their state dict, merging them into the weights, and the loss's view of an adapted LM head.
Depends on torch only.
"""

from __future__ import annotations

from typing import ClassVar, Optional, Protocol, runtime_checkable

import torch
import torch.nn as nn


@runtime_checkable
class Adapter(Protocol):
    """A module in place of a frozen linear layer: y = base(x) + update(x).

    It owns the base `weight` (and `bias`) under their usual keys, so base checkpoints load unchanged, and adds
    tensors under the leaf names in KEYS (e.g. "lora_A", "lora_B"), which are the only trainable ones.
    """

    KEYS: ClassVar[tuple[str, ...]]
    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    in_features: int
    out_features: int
    merged: bool

    def delta_weight(self) -> torch.Tensor:
        """The (out, in) update its forward adds as a weight, in float32 or wider, differentiable in the adapter
        tensors."""
        ...

    def merge(self) -> None:
        """Fold the update into `weight`; the forward then skips it."""
        ...

    def unmerge(self) -> None:
        """Take the update out of `weight` again."""
        ...


def adapters(model: nn.Module) -> dict[str, Adapter]:
    """The adapter modules of `model` by qualified name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, Adapter)}


def adapter_keys(model: nn.Module) -> list[str]:
    """The state-dict keys of every adapter tensor in `model` (e.g. "transformer.h.0.attn.query.lora_A")."""
    return [f"{name}.{key}" for name, module in adapters(model).items() for key in module.KEYS]


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter tensors of `model`'s state dict (a 4-bit base is left out with the rest of the base)."""
    keys = set(adapter_keys(model))
    return {k: v for k, v in model.state_dict().items() if k in keys}


def mark_only_adapters_trainable(model: nn.Module) -> None:
    """requires_grad on the adapter tensors, off on everything else (4-bit weights are never trainable anyway)."""
    keys = set(adapter_keys(model))
    for name, param in model.named_parameters():
        param.requires_grad_(name in keys)


def merge_adapters(model: nn.Module) -> nn.Module:
    """Merge every adapter into its base weight and put a plain `nn.Linear` back in its place, in place.

    The result has no adapter keys and saves as a plain checkpoint (a 4-bit base is dense after the merge).
    """
    for name, module in list(adapters(model).items()):
        module.merge()
        linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
        linear.weight = module.weight
        linear.bias = module.bias
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, linear)
    return model


def effective_weight(layer: nn.Module) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(weight, bias) of a linear layer as its forward applies them: an unmerged adapter's update included
    (differentiable in the adapter tensors), in the base weight's dtype. For code that uses the weight itself, such
    as the chunked loss's LM head."""
    weight = layer.weight
    if isinstance(layer, Adapter) and not layer.merged:
        weight = weight + layer.delta_weight().to(weight.dtype)
    return weight, getattr(layer, "bias", None)
