"""Hugging Face and GGUF interop: model families, checkpoint conversion both ways, PEFT adapters, GGUF import."""

from lit_model.hf.convert import (
    HFModule,
    UnknownTensorError,
    convert_hf_checkpoint,
    export_hf_checkpoint,
    hf_checkpoint_config,
    hf_module,
    hf_to_lit,
    lit_to_hf,
)
from lit_model.hf.families import FAMILIES, Family, HFLayout, config_from_hf, family_of, hf_config_dict
from lit_model.hf.gguf import convert_gguf_checkpoint, open_gguf
from lit_model.hf.peft_export import export_peft_adapter, peft_adapter

__all__ = [
    "FAMILIES",
    "Family",
    "HFLayout",
    "HFModule",
    "UnknownTensorError",
    "config_from_hf",
    "convert_gguf_checkpoint",
    "convert_hf_checkpoint",
    "export_hf_checkpoint",
    "export_peft_adapter",
    "family_of",
    "hf_checkpoint_config",
    "hf_config_dict",
    "hf_module",
    "hf_to_lit",
    "lit_to_hf",
    "open_gguf",
    "peft_adapter",
]
