"""Load any checkpoint directory for inference: a base or fully fine-tuned model, or a LoRA fine-tune."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from lit_model.model import GPT


def load_any(
    checkpoint_dir: Path, device: torch.device | str = "cpu", dtype: Optional[torch.dtype] = None, merge: bool = True
) -> GPT:
    """A ready-to-run model (eval mode) from any checkpoint directory this project writes.

    A LoRA directory (`lit_model.lora.pth`) names its base model in hyperparameters.yaml: the base is loaded, the
    adapters applied with the saved settings (on a 4-bit base when the run used --quantize) and, unless the base
    is quantized or `merge` is False, merged into the weights so generation runs at the base model's speed.
    """
    from lit_model.checkpoint_io import (
        LORA_WEIGHTS_NAME,
        check_checkpoint_dir,
        is_lora_checkpoint,
        load_checkpoint,
        load_model,
        read_lora_checkpoint,
    )

    checkpoint_dir = Path(checkpoint_dir)
    if not is_lora_checkpoint(checkpoint_dir):
        check_checkpoint_dir(checkpoint_dir)
        return load_model(checkpoint_dir, device="cpu", dtype=dtype).to(device).eval()

    from lit_model.lora import apply_lora, merge_lora

    lora = read_lora_checkpoint(checkpoint_dir)  # finds and checks the base model, rebuilds the LoRA settings
    model = load_model(lora.base_dir, device="cpu", dtype=dtype)
    if lora.quantize:
        from lit_model.quantize import quantize_model

        model = quantize_model(model, lora.quantize, compute_dtype=dtype or torch.float32)
    model = apply_lora(model, lora.lora)
    load_checkpoint(model, checkpoint_dir / LORA_WEIGHTS_NAME, strict=True, missing_ok=lambda key: "lora_" not in key)
    if merge and not lora.quantize:
        model = merge_lora(model)
    return model.to(device).eval()
