"""What a Fabric precision setting means for the weights and the arithmetic, in one place.

A checkpoint's storage dtype says nothing about how to train it: most Hugging Face checkpoints are bf16 or fp16 on
disk, and a user who asks for `32-true` or `bf16-mixed` must get float32 parameters (mixed: float32 master weights and
optimizer state, the matmuls under autocast), not the file's dtype. Loading casts every tensor to `param_dtype`
(lit_model.checkpoint_io.load_model); training, generation, merge and export all read the dtype from here.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Optional

import torch

# Fabric's precision names -> (parameter dtype, compute dtype). `*-true`: parameters and arithmetic in one dtype;
# `*-mixed`: float32 parameters (the master weights the optimizer steps), matmuls autocast to the half dtype.
PRECISIONS: dict[str, tuple[torch.dtype, torch.dtype]] = {
    "64-true": (torch.float64, torch.float64),
    "32-true": (torch.float32, torch.float32),
    "bf16-true": (torch.bfloat16, torch.bfloat16),
    "16-true": (torch.float16, torch.float16),
    "bf16-mixed": (torch.float32, torch.bfloat16),
    "16-mixed": (torch.float32, torch.float16),
}
# Fabric's aliases for the same settings.
_ALIASES = {"32": "32-true", "64": "64-true", "bf16": "bf16-mixed", "16": "16-mixed"}


def canonical(precision: str) -> str:
    """The Fabric precision name for `precision` (aliases such as "bf16" resolved); raise on unknown names."""
    name = _ALIASES.get(str(precision), str(precision))
    if name not in PRECISIONS:
        raise ValueError(f"Unknown precision {precision!r}: use one of {', '.join(PRECISIONS)}.")
    return name


def param_dtype(precision: str) -> torch.dtype:
    """The dtype the model's floating-point parameters are cast to when loaded for this precision."""
    return PRECISIONS[canonical(precision)][0]


def compute_dtype(precision: str) -> torch.dtype:
    """The dtype the matmuls run in (the autocast dtype for `*-mixed`)."""
    return PRECISIONS[canonical(precision)][1]


def is_mixed(precision: str) -> bool:
    """Whether the precision keeps float32 parameters and autocasts the arithmetic."""
    return canonical(precision).endswith("-mixed")


def describe(precision: str) -> str:
    """One line for the start of a run: what the parameters are stored in and what the arithmetic runs in."""
    name = canonical(precision)
    params, compute = (str(d).removeprefix("torch.") for d in PRECISIONS[name])
    how = f"compute {compute} (autocast)" if is_mixed(name) else f"compute {compute}"
    return f"Precision {name}: parameters {params}, {how}"


def autocast(precision: str, device: torch.device | str) -> AbstractContextManager:
    """The autocast context of a `*-mixed` precision on `device` (a no-op for `*-true`), for code outside Fabric."""
    if not is_mixed(precision):
        return nullcontext()
    device_type = torch.device(device).type
    return torch.autocast(device_type, dtype=compute_dtype(precision))


def default_precision(quantized: bool = False, device: Optional[str] = None) -> str:
    """bf16 weights on GPUs that support them (the Lit-GPT default for fine-tuning), float32 on CPU.

    Without bf16, fp16 weights with loss scaling; a 4-bit base needs `*-true` (mixed precision would keep float32
    copies of the weights that quantization exists to avoid). `device` ("cpu", "cuda", ...) forces the choice.
    """
    on_gpu = torch.cuda.is_available() if device is None else str(device).startswith("cuda")
    if on_gpu:
        if torch.cuda.is_bf16_supported():
            return "bf16-true"
        return "16-true" if quantized else "16-mixed"
    return "32-true"
