"""4-bit (NF4 / FP4) base weights for QLoRA, by module swap on bitsandbytes.

Lightning's `BitsandbytesPrecision` refuses CPU, while bitsandbytes >= 0.49 runs the 4-bit matmul forward and
backward on CPU too, so we swap the modules ourselves and QLoRA is tested on CPU. The order is:
load dense base weights -> `quantize_model` -> `apply_lora` -> move to the device. `quantize_model` turns each
targeted `nn.Linear` into a bitsandbytes `Linear4bit` (so a quantized model also runs without LoRA), one layer at a
time; `LoRALinear` then takes the layer's 4-bit `Params4bit` weight over and calls bitsandbytes' 4-bit matmul itself.

Modes: "bnb.nf4" (NormalFloat4, the QLoRA paper's type), "bnb.fp4"; the "-dq" variants also quantize the
per-block scales ("double quantization", ~0.4 bit per weight less). 4-bit state dicts are not serialised: QLoRA
checkpoints hold the LoRA tensors only, and the base is re-quantized from the dense checkpoint on load.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, TypeVar

import torch
import torch.nn as nn

QUANTIZE_MODES = ("bnb.nf4", "bnb.nf4-dq", "bnb.fp4", "bnb.fp4-dq")
BLOCKSIZE = 64  # values per absmax scale; bitsandbytes' Linear4bit default
MIN_BNB_VERSION = (0, 49)  # the first release that runs 4-bit forward and backward on CPU

# Precisions a 4-bit model can train in, and the compute dtype each gives (the dtype the weights dequantize to).
QUANTIZE_PRECISIONS = {"bf16-true": torch.bfloat16, "16-true": torch.float16, "32-true": torch.float32}
_PRECISION_ALIASES = {"32": "32-true", "16": "16-mixed", "bf16": "bf16-mixed", "64": "64-true"}

ModuleT = TypeVar("ModuleT", bound=nn.Module)


def is_4bit(tensor: Any) -> bool:
    """Whether `tensor` is a quantized bitsandbytes 4-bit parameter (checked without importing bitsandbytes)."""
    return getattr(tensor, "bnb_quantized", False) and getattr(tensor, "quant_state", None) is not None


def dequantize_weight(weight: torch.Tensor) -> torch.Tensor:
    """The dense (out, in) weight, in the dtype it was quantized from, of a 4-bit parameter (or `weight` itself)."""
    if not is_4bit(weight):
        return weight
    bnb = import_bitsandbytes()
    return bnb.functional.dequantize_4bit(weight.data, weight.quant_state)


def import_bitsandbytes() -> Any:
    """bitsandbytes, or a clear error when it is missing or too old for CPU 4-bit."""
    try:
        import bitsandbytes as bnb
    except ImportError as e:
        raise ImportError(f"4-bit quantization needs bitsandbytes: pip install 'bitsandbytes>=0.49' ({e})") from e
    version = tuple(int(p) for p in bnb.__version__.split(".")[:2] if p.isdigit())
    if version < MIN_BNB_VERSION:
        raise ImportError(
            f"bitsandbytes {bnb.__version__} is too old: 4-bit quantization here needs >= 0.49 (the first release "
            "with CPU 4-bit kernels). pip install -U 'bitsandbytes>=0.49'"
        )
    return bnb


def parse_mode(mode: str) -> tuple[str, bool]:
    """("nf4" | "fp4", double_quant) for a mode string; unknown modes raise with the valid ones listed."""
    if mode not in QUANTIZE_MODES:
        raise ValueError(f"Unknown quantization mode {mode!r}; choose one of {', '.join(QUANTIZE_MODES)}")
    kind, _, dq = mode.removeprefix("bnb.").partition("-")
    return kind, dq == "dq"


def validate_quantize_precision(quantize: str | None, precision: str | int) -> torch.dtype | None:
    """Check that a quantization mode and a Fabric precision can train together; return the compute dtype.

    4-bit weights need a `*-true` precision: every dense tensor (LoRA, norms, embeddings, head) then lives in that
    dtype, and the 4-bit weights dequantize into it. `*-mixed` is refused: it keeps fp32 copies of the dense weights
    (the memory QLoRA exists to save) and would run the 4-bit matmul in whatever dtype autocast leaves the input in.
    "64-true" is refused because bitsandbytes' 4-bit kernels support only 16- and 32-bit floats.
    Returns None (and checks nothing about the precision) when `quantize` is None.
    """
    if quantize is None:
        return None
    parse_mode(quantize)
    name = _PRECISION_ALIASES.get(str(precision), str(precision))
    if name not in QUANTIZE_PRECISIONS:
        hint = f"use {name.replace('-mixed', '-true')}" if name.endswith("-mixed") else "use bf16-true"
        raise ValueError(
            f"--quantize {quantize} cannot train with precision {precision!r}: 4-bit weights need one of "
            f"{', '.join(QUANTIZE_PRECISIONS)}, whose dtype becomes the compute dtype ({hint})."
        )
    return QUANTIZE_PRECISIONS[name]


def quantize_model(
    model: ModuleT, mode: str, compute_dtype: torch.dtype, skip: Iterable[str] = ("lm_head",)
) -> ModuleT:
    """Replace every `nn.Linear` of `model` (except those under the module names in `skip`) by a bitsandbytes
    `Linear4bit` holding a 4-bit copy of its weight, in place; returns `model`.

    Layers are quantized one at a time on the device their weight lives on (CPU is fine): the dense weight is cast
    to `compute_dtype`, quantized, and dropped, so the model is never held twice in high precision. Biases are kept
    dense in `compute_dtype`. Embeddings are never quantized; keep the LM head dense (the default `skip`) unless
    memory is tight. Call this before `apply_lora`.
    """
    kind, double_quant = parse_mode(mode)
    if compute_dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"compute_dtype must be float32, bfloat16 or float16 for 4-bit weights, got {compute_dtype}")
    bnb = import_bitsandbytes()
    skip = tuple(skip)
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    for name, module in list(model.named_modules()):
        if hasattr(module, "lora_A"):
            raise ValueError(f"{name} already has a LoRA adapter: call quantize_model before apply_lora")
        if isinstance(module, bnb.nn.Linear4bit) or is_4bit(getattr(module, "weight", None)):
            raise ValueError(f"{name} is already quantized: quantize_model must run once, on a dense model")
    targets = [
        (name, module)
        for name, module in model.named_modules()
        if type(module) is nn.Linear and not any(name == s or name.startswith(s + ".") for s in skip)
    ]
    for name, linear in targets:
        if linear.weight.is_meta:
            raise ValueError(f"{name} has no weights yet (meta device): load the checkpoint before quantize_model")
        if id(linear.weight) in embeddings:
            raise ValueError(
                f"{name} shares its weight with an embedding (tied embeddings); it cannot be quantized without "
                f"quantizing the embedding: add {name!r} to skip"
            )
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, _to_4bit(bnb, linear, kind, double_quant, compute_dtype))
        del linear  # the dense weight goes as soon as its module is replaced (unless referenced elsewhere)
    return model


def _to_4bit(bnb: Any, linear: nn.Linear, kind: str, double_quant: bool, compute_dtype: torch.dtype) -> nn.Module:
    with torch.no_grad():
        dense = linear.weight.detach().to(compute_dtype).contiguous()
        data, state = bnb.functional.quantize_4bit(
            dense, blocksize=BLOCKSIZE, compress_statistics=double_quant, quant_type=kind
        )
        del dense
    # Built on meta so the constructor allocates no dense weight of its own; the real tensors are assigned below.
    module = bnb.nn.Linear4bit(
        linear.in_features,
        linear.out_features,
        bias=linear.bias is not None,
        compute_dtype=compute_dtype,
        compress_statistics=double_quant,
        quant_type=kind,
        device="meta",
    )
    module.weight = bnb.nn.Params4bit(
        data,
        requires_grad=False,
        quant_state=state,
        blocksize=BLOCKSIZE,
        compress_statistics=double_quant,
        quant_type=kind,
        module=module,
        bnb_quantized=True,
    )
    module.quant_state = state
    if linear.bias is not None:
        module.bias = nn.Parameter(linear.bias.detach().to(compute_dtype), requires_grad=False)
    # On CPUs with AVX512-BF16, Linear4bit's eval forward re-packs its weight in place into a CPU-only layout that
    # dequantize_4bit, LoRA merging and moving to CUDA do not understand; keep the canonical layout.
    module.support_avx512bf16_for_cpu = False
    return module.train(linear.training)


def quantized_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes of 4-bit weights and their quantization state, bytes of all other parameters) of `model`.

    Tensors shared between layers (bitsandbytes caches the lookup table of double quantization) count once.
    """
    seen: set[int] = set()

    def size(t: torch.Tensor) -> int:
        key = t.untyped_storage().data_ptr()
        if key in seen:
            return 0
        seen.add(key)
        return t.untyped_storage().nbytes()

    four_bit = other = 0
    for p in model.parameters():
        if not is_4bit(p):
            other += size(p)
            continue
        state = p.quant_state
        four_bit += size(p) + size(state.absmax) + size(state.code)
        if state.nested:
            four_bit += size(state.state2.absmax) + size(state.state2.code)
    return four_bit, other


def logical_numel(param: torch.Tensor) -> int:
    """Number of values a parameter represents (out * in for a 4-bit weight)."""
    return math.prod(param.quant_state.shape) if is_4bit(param) else param.numel()
