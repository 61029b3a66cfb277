"""Adapters (parameter-efficient fine-tuning): the protocol, LoRA, and adapter checkpoints on disk."""

from lit_model.peft.base import Adapter, adapter_keys, adapter_state_dict, mark_only_adapters_trainable, merge_adapters
from lit_model.peft.lora import LoRAConfig, LoRALinear, apply_lora

__all__ = ["Adapter", "LoRAConfig", "LoRALinear", "adapter_keys", "adapter_state_dict", "apply_lora",
           "mark_only_adapters_trainable", "merge_adapters"]
