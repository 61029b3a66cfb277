"""LoRA by module substitution: `LoRALinear` takes the place of a targeted `nn.Linear` in an existing `GPT`.

`LoRALinear` owns the base weight under the usual keys (`weight`, `bias`), so a plain base checkpoint loads into a
LoRA model unchanged and LoRA tensors are the only new keys (`lora_A`, `lora_B`). The base weight may be a dense
tensor or a bitsandbytes 4-bit `Params4bit` (QLoRA, see `lit_model.quantize`); the LoRA path always runs in a dense
floating dtype (the compute dtype). Conventions follow peft: `scaling = alpha / r`, `lora_A` kaiming-uniform,
`lora_B` zero, so a fresh adapter leaves the model's output unchanged.

Typical use: build the GPT, load its base weights (optionally `quantize_model`), then `apply_lora(model, config)`.
`LoRALinear` implements `lit_model.peft.base.Adapter`; freezing, adapter state dicts and merging are written there,
once for every adapter. W + (B @ A) * alpha / r is written once, in `lora_delta`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from lit_model.model import GPT
from lit_model.peft.base import adapters, mark_only_adapters_trainable
from lit_model.quantize import dequantize_weight, is_4bit

LORA_KEYS = ("lora_A", "lora_B")


def lora_delta(lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """The (out, in) update (B @ A) * scaling of A (r, in) and B (out, r), in float32 or wider (differentiable): the
    one place the update is written, for the LM head's loss, merging, and folding saved adapters into a state dict."""
    dtype = torch.promote_types(lora_a.dtype, torch.float32)
    return (lora_b.to(dtype) @ lora_a.to(dtype)) * scaling


@dataclass
class LoRAConfig:
    """Low-rank adapters: which linear layers get one, and its rank, scale and dropout.

    Args:
        r: rank of the update B @ A; the number of trainable values per layer is r * (in_features + out_features).
        alpha: the update is scaled by alpha / r (as in peft), so changing r need not change the learning rate.
        dropout: dropout probability on the adapter's input (training only; the base path never drops).
        query: adapt the attention query projection.
        key: adapt the attention key projection.
        value: adapt the attention value projection.
        projection: adapt the attention output projection.
        mlp: adapt every linear layer of the MLP (fc_1, fc_2 and proj, or fc and proj).
        head: adapt the LM head (refused for models with tied embeddings; see `apply_lora`).
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    query: bool = True
    key: bool = False
    value: bool = True
    projection: bool = False
    mlp: bool = False
    head: bool = False

    def problems(self) -> list[str]:
        """Everything wrong with these settings, as messages (empty when valid)."""
        out = []
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            out.append(f"--lora.r must be a positive integer, got {self.r!r}")
        if not self.alpha > 0:
            out.append(f"--lora.alpha must be positive, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            out.append(f"--lora.dropout must be in [0, 1), got {self.dropout!r}")
        if not any(self.targets.values()):
            out.append("LoRA targets no layer: set at least one of --lora.query/key/value/projection/mlp/head")
        return out

    def validate(self) -> None:
        """Raise one ValueError listing every problem (the training loop instead merges `problems()` with the
        other argument groups' into a single error)."""
        problems = self.problems()
        if problems:
            raise ValueError("Invalid LoRA settings: " + "; ".join(problems))

    @property
    def targets(self) -> dict[str, bool]:
        """The target switches by name."""
        return {name: getattr(self, name) for name in ("query", "key", "value", "projection", "mlp", "head")}


class LoRALinear(nn.Module):
    """y = x W^T + b + dropout(x) A^T B^T * alpha / r, with W frozen (dense or 4-bit) and A (r, in), B (out, r).

    An `Adapter` (lit_model.peft.base): its tensors are `KEYS`, its update `delta_weight()`.

    The module reuses the Parameter objects it is given for `weight` and `bias`, so wrapping a layer after its
    weights were loaded keeps them (and no copy is made). `merge()` folds B A into W and makes the forward skip the
    LoRA path; `unmerge()` takes it out again.
    """

    def __init__(
        self,
        weight: nn.Parameter,
        bias: nn.Parameter | None = None,
        r: int = 8,
        alpha: float = 16.0,
        dropout: float = 0.0,
        lora_dtype: torch.dtype | None = None,
    ) -> None:
        """weight: the base (out, in) weight, dense or a bitsandbytes Params4bit; bias: its (out,) bias or None;
        lora_dtype: dtype of A and B, default the weight's dtype (for a 4-bit weight: the dtype it dequantizes to).
        """
        super().__init__()
        if r <= 0:
            raise ValueError(f"LoRA rank r must be positive, got {r}")
        self.out_features, self.in_features = weight.quant_state.shape if is_4bit(weight) else weight.shape
        self.weight = weight
        self.bias = bias
        self.r, self.alpha = r, alpha
        self.scaling = alpha / r
        if lora_dtype is None:
            lora_dtype = weight.quant_state.dtype if is_4bit(weight) else weight.dtype
        factory = dict(device=weight.device, dtype=lora_dtype)
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, **factory))  # (r, in)
        self.lora_B = nn.Parameter(torch.empty(self.out_features, r, **factory))  # (out, r)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self.reset_lora_parameters()

    @classmethod
    def from_linear(cls, linear: nn.Linear, r: int, alpha: float, dropout: float = 0.0) -> "LoRALinear":
        """Wrap an `nn.Linear` or a bitsandbytes `Linear4bit`, reusing its weight and bias Parameters."""
        lora_dtype = getattr(linear, "compute_dtype", None) if is_4bit(linear.weight) else None
        return cls(linear.weight, linear.bias, r=r, alpha=alpha, dropout=dropout, lora_dtype=lora_dtype)

    def reset_lora_parameters(self) -> None:
        """peft's init: A kaiming-uniform (as nn.Linear), B zero, so the update starts at exactly zero."""
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    @property
    def base_is_4bit(self) -> bool:
        """Whether the base weight is a bitsandbytes 4-bit parameter."""
        return is_4bit(self.weight)

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        """x W^T + b, through bitsandbytes' 4-bit matmul when the weight is 4-bit."""
        if not self.base_is_4bit:
            return F.linear(x, self.weight, self.bias)
        import bitsandbytes as bnb

        bias = None if self.bias is None else self.bias.to(x.dtype)
        # `.t()` is the calling convention of bnb's own Linear4bit in every version we support; the kernel
        # dequantizes to x's dtype, so the base matmul runs in the compute dtype the input arrives in.
        return bnb.matmul_4bit(x, self.weight.t(), quant_state=self.weight.quant_state, bias=bias)

    KEYS = LORA_KEYS

    def delta_weight(self) -> torch.Tensor:
        """The (out, in) update B @ A * scaling, in float32 (or float64 for float64 adapters)."""
        return lora_delta(self.lora_A, self.lora_B, self.scaling)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The base output plus, unless merged, the low-rank update (computed in the LoRA dtype)."""
        out = self.base_forward(x)
        if self.merged:  # the update is inside the weight already
            return out
        h = self.lora_dropout(x.to(self.lora_A.dtype))
        update = F.linear(F.linear(h, self.lora_A), self.lora_B) * self.scaling  # (..., r) -> (..., out)
        return out + update.to(out.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into the base weight (no-op when merged already).

        A 4-bit weight is dequantized first: the merged layer keeps a dense weight in the compute dtype (4-bit
        storage cannot hold W + BA without a lossy re-quantization), and `unmerge` does not re-quantize.
        """
        if self.merged:
            return
        if self.base_is_4bit:
            dense = dequantize_weight(self.weight)
            self.weight = nn.Parameter(dense.to(self.lora_A.dtype), requires_grad=False)
        # Add in float32 and round once: adding a bf16-rounded delta to a bf16 weight would round twice.
        self.weight.copy_((self.weight.float() + self.delta_weight().float()).to(self.weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the update out of the base weight again (no-op when not merged)."""
        if not self.merged:
            return
        self.weight.sub_(self.delta_weight().to(self.weight.dtype))
        self.merged = False

    def extra_repr(self) -> str:
        kind = "4-bit" if self.base_is_4bit else str(self.weight.dtype)
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"base={kind}, r={self.r}, alpha={self.alpha}, merged={self.merged}"
        )


# ---- the substitution ----------------------------------------------------------------------------------------------


def lora_target_names(model: GPT, config: LoRAConfig) -> list[str]:
    """Qualified names of the linear layers `config` targets in `model`, e.g. "transformer.h.0.attn.query"."""
    names = []
    attn_targets = {"query": config.query, "key": config.key, "value": config.value, "proj": config.projection}
    for i, block in enumerate(model.transformer.h):
        names += [f"transformer.h.{i}.attn.{n}" for n, on in attn_targets.items() if on]
        if config.mlp:
            names += [f"transformer.h.{i}.mlp.{n}" for n, m in block.mlp.named_children() if isinstance(m, nn.Linear)]
    if config.head:
        names.append("lm_head")
    return names


def apply_lora(model: GPT, config: LoRAConfig) -> GPT:
    """Replace the targeted linear layers of `model` by `LoRALinear` in place, then freeze all but the LoRA tensors.

    `config` is validated first. The existing weight Parameters are reused (apply after loading the base weights,
    and after `quantize_model` for QLoRA). With tied embeddings the LM head's weight *is* the embedding matrix: an
    adapter on it could not be merged without changing the embedding too, so `head=True` is refused for such models.
    """
    config.validate()
    if config.head and model.lm_head.weight is model.transformer.wte.weight:
        raise ValueError(
            "LoRA on the LM head is not supported for models with tied embeddings (the head shares its weight with "
            "the token embedding, so merging would alter the embedding too). Set head=False."
        )
    if adapters(model):
        raise ValueError("apply_lora was already applied to this model; build a fresh model to change the adapters")
    for name in lora_target_names(model, config):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        linear = getattr(parent, child)
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"{name} is a {type(linear).__name__}, expected nn.Linear (or a bitsandbytes Linear4bit)")
        lora = LoRALinear.from_linear(linear, r=config.r, alpha=config.alpha, dropout=config.dropout)
        setattr(parent, child, lora.train(linear.training))  # a model put in eval mode keeps its dropout off
    mark_only_adapters_trainable(model)
    return model


def is_lora_key(key: str) -> bool:
    """Whether a state-dict key names a LoRA tensor (for files, where there is no model to ask)."""
    return key.rpartition(".")[2] in LORA_KEYS
