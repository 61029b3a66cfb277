"""LoRA checkpoints -> PEFT adapters (`adapter_config.json` + `adapter_model.safetensors`) for the exported base.

Reads LoRA checkpoints with `lit_model.peft.checkpoint`, names the adapted modules through the families' weight maps
(`lit_model.hf.convert.hf_module`) and writes the base model with `export_hf_checkpoint`. Needs torch and
safetensors only (never transformers or peft).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Optional

import torch

from lit_model.checkpoint_io import copy_support_files, save_state_dict
from lit_model.config import Config
from lit_model.hf.convert import (
    HFModule,
    UnknownTensorError,
    export_hf_checkpoint,
    fuse_parts,
    hf_module,
    out_features,
    refuse_hf_checkpoint_in,
)
from lit_model.hf.families import layout_of
from lit_model.peft.checkpoint import load_lora_weights, lora_support_dir, read_lora_checkpoint

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"


def export_peft_adapter(
    checkpoint_dir: str | Path,
    output_dir: str | Path,
    max_shard_size: int | str = "5GB",
    base_dir: Optional[str | Path] = None,
) -> tuple[Path, Path]:
    """Export a LoRA checkpoint as a PEFT adapter plus the Hugging Face base model it applies to.

    Writes `output_dir/base` (the base model, as `export_hf_checkpoint` writes it) and `output_dir/adapter`
    (adapter_config.json, adapter_model.safetensors and the tokenizer files), whose `base_model_name_or_path` is the
    absolute path of `output_dir/base`. Then
    `peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(output_dir / "base"), output_dir / "adapter")`
    computes the LoRA model's logits. The exported base has the original Hugging Face weights bit for bit (for a
    model converted from the Hub), so the adapter applies to the original repository too: edit
    `base_model_name_or_path` to its name before sharing. Returns (base directory, adapter directory).

    For a QLoRA run the base is exported dense: load it with a 4-bit `BitsAndBytesConfig` to reproduce the model the
    adapters were trained with, or dense, as the merged model is (see `merge_lora_weights`).
    """
    checkpoint = read_lora_checkpoint(checkpoint_dir, base_dir)
    out = Path(output_dir)
    base_out, adapter_out = out / "base", out / "adapter"
    refuse_hf_checkpoint_in(base_out)
    if (adapter_out / ADAPTER_CONFIG_NAME).exists() or (adapter_out / ADAPTER_WEIGHTS_NAME).exists():
        raise FileExistsError(
            f"{adapter_out} already holds a PEFT adapter. Pass an empty or new --output_dir (or delete it first)."
        )
    # Everything that can fail on the adapter is checked before the (large) base model is written.
    tensors, adapter_config = peft_adapter(load_lora_weights(checkpoint), checkpoint.config, checkpoint.lora)
    adapter_config["base_model_name_or_path"] = str(base_out.resolve())
    export_hf_checkpoint(checkpoint.base_dir, base_out, max_shard_size)
    adapter_out.mkdir(parents=True, exist_ok=True)
    save_state_dict(tensors, adapter_out / ADAPTER_WEIGHTS_NAME)
    copy_support_files(lora_support_dir(checkpoint), adapter_out)
    # Last: a directory with adapter_config.json is complete.
    (adapter_out / ADAPTER_CONFIG_NAME).write_text(json.dumps(adapter_config, indent=2) + "\n")
    return base_out, adapter_out


def peft_adapter(
    lora_state: Mapping[str, torch.Tensor], config: Config, lora: Any
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Our LoRA tensors as a PEFT LoRA adapter of the Hugging Face model of `config`: (tensors, adapter_config).

    `lora` is the run's `LoRAConfig`. Tensor names are PEFT's (`base_model.model.<HF module>.lora_A.weight`), module
    names those of a transformers >= 5 model in memory (they differ from the files' only for GPT-NeoX's head,
    `lm_head`, formerly `embed_out`); `base_model_name_or_path` is left empty for the caller.

    Fused HF layers (GPT-NeoX `query_key_value`, Phi-3 `qkv_proj` and `gate_up_proj`): our adapters on the k parts
    of one fused layer (e.g. query and value) become one exact adapter of rank k*r on it. A stacks the parts' A
    matrices (k*r, in); B is block-diagonal (out_total, k*r): the rows of part j hold B_j in the columns of A_j and
    zeros elsewhere, with rows in HF's packing order (GPT-NeoX interleaves q, k, v per head). So B A puts B_j A_j
    in part j's rows and zeros in untargeted parts' rows: the same update as ours. PEFT takes the rank from
    `rank_pattern` and scales by `alpha_pattern` / rank, so the pattern alpha is k * alpha (scaling alpha / r as
    ours). Two differences that do not affect the output: training it further in PEFT may fill the zero blocks, and
    PEFT's dropout draws one mask for the fused layer where we draw one per part.
    """
    layout = layout_of(config)
    r, alpha = lora.r, lora.alpha
    grouped: dict[HFModule, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}
    for key in lora_state:
        module, _, leaf = key.rpartition(".")
        if leaf != "lora_A":
            continue
        try:
            target = hf_module(module, config)
        except UnknownTensorError as err:
            raise ValueError(f"LoRA tensor {key!r} cannot be exported as a PEFT adapter: {err}") from None
        ab = (lora_state[key], lora_state[f"{module}.lora_B"])
        grouped.setdefault(target._replace(index=None), {})[target.index or 0] = ab
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}  # HF module name (the leaf, as in target_modules) -> rank
    for target, pieces in grouped.items():
        if not target.parts:
            a, b = pieces[0]
        else:
            slots = sorted(pieces)  # indices of the targeted parts, in row order
            a = torch.cat([pieces[j][0] for j in slots], dim=0)  # (k * r, in)
            blocks = []
            for j, part in enumerate(target.parts):
                block = a.new_zeros(out_features(part, config), len(slots) * r)  # (out_j, k * r)
                if j in pieces:
                    slot = slots.index(j)
                    block[:, slot * r : (slot + 1) * r] = pieces[j][1]
                blocks.append(block)
            b = fuse_parts(blocks, config, layout.per_head_qkv)  # (out_total, k * r)
        name = layout.in_memory.get(target.name, target.name)
        leaf_name = name.rpartition(".")[2]
        if ranks.setdefault(leaf_name, a.shape[0]) != a.shape[0]:  # PEFT's patterns name modules, not layers
            raise ValueError(f"LoRA targets different parts of {leaf_name} in different layers (PEFT cannot say so)")
        tensors[f"base_model.model.{name}.lora_A.weight"] = a.contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = b.contiguous()
    rank_pattern = {name: rank for name, rank in ranks.items() if rank != r}
    alpha_pattern = {name: alpha * rank / r for name, rank in rank_pattern.items()}
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": None,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": lora.dropout,
        "target_modules": sorted(ranks),
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,  # scaling alpha / r, as ours
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
    }
    return tensors, adapter_config
