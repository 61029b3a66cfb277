"""Load any checkpoint directory for inference: a base or fully fine-tuned model, or a LoRA fine-tune."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch
import yaml

from lit_model.model import GPT

LORA_WEIGHTS = "lit_model.lora.pth"


def read_hparams(checkpoint_dir: Path) -> dict[str, Any]:
    """The `hyperparameters.yaml` a fine-tuning run saved next to its weights ({} when absent)."""
    path = Path(checkpoint_dir) / "hyperparameters.yaml"
    return (yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}


def load_any(
    checkpoint_dir: Path, device: torch.device | str = "cpu", dtype: Optional[torch.dtype] = None, merge: bool = True
) -> GPT:
    """A ready-to-run model (eval mode) from any checkpoint directory this project writes.

    A LoRA directory (`lit_model.lora.pth`) names its base model in hyperparameters.yaml: the base is loaded, the
    adapters applied with the saved settings (on a 4-bit base when the run used --quantize) and, unless the base
    is quantized or `merge` is False, merged into the weights so generation runs at the base model's speed.
    """
    from lit_model.checkpoint_io import check_checkpoint_dir, load_checkpoint, load_model

    checkpoint_dir = Path(checkpoint_dir)
    if not (checkpoint_dir / LORA_WEIGHTS).is_file():
        check_checkpoint_dir(checkpoint_dir)
        return load_model(checkpoint_dir, device="cpu", dtype=dtype).to(device).eval()

    from lit_model.lora import LoRAConfig, apply_lora, merge_lora

    hparams = read_hparams(checkpoint_dir)
    base_dir = hparams.get("checkpoint_dir")
    if base_dir is None or not Path(base_dir).is_dir():
        raise FileNotFoundError(
            f"{checkpoint_dir} holds LoRA weights but its base model {base_dir!r} (checkpoint_dir in "
            "hyperparameters.yaml) is not there. Put the base model back at that path, or edit hyperparameters.yaml."
        )
    check_checkpoint_dir(Path(base_dir))
    model = load_model(Path(base_dir), device="cpu", dtype=dtype)
    quantize = hparams.get("quantize")
    if quantize:
        from lit_model.quantize import quantize_model

        model = quantize_model(model, quantize, compute_dtype=dtype or torch.float32)
    model = apply_lora(model, LoRAConfig(**hparams.get("lora", {})))
    load_checkpoint(model, checkpoint_dir / LORA_WEIGHTS, strict=True, missing_ok=lambda key: "lora_" not in key)
    if merge and not quantize:
        model = merge_lora(model)
    return model.to(device).eval()
