"""The same model and training step in Hugging Face transformers (with PEFT for LoRA), for `benchmark.py --peer hf`.

transformers is what most fine-tuning runs on, so it is the peer users compare with first. This module builds the
transformers model of one of our configs from the config alone (`lit_model.hf.families.hf_config_dict`:
LlamaForCausalLM, Qwen2ForCausalLM, ...), copies our weights into it through the export map (`lit_to_hf`), and for
LoRA wraps it with PEFT's `get_peft_model` (the same r, alpha and target modules, dropout 0) and copies our A and B
matrices in. The step is the one `transformers.Trainer` runs: `model(input_ids, labels=...)` (transformers' own
forward and loss: the full logits, upcast to float32, cross-entropy), backward, the AdamW that `TrainingArguments`
selects by default, and for activation checkpointing the model's own `activation_checkpointing_enable`.

Labels: transformers shifts the labels inside its loss (position t predicts label t + 1), so a batch of T tokens
trains T - 1 predictions, while our step trains T predictions on T + 1 tokens. Its loss also accepts targets that
are already shifted (`shift_labels`, the path sequence parallelism uses); passing those makes both implementations
run the same T positions on the same tokens, so the losses are equal and the forward lengths too.

Needs transformers >= 5 and peft (the hf extra, `pip install -e ".[hf]"`, or the test extra).
"""

from __future__ import annotations

import warnings
from typing import Any, Optional

import torch
import torch.nn as nn

from lit_model import GPT
from lit_model.peft.lora import LoRAConfig, LoRALinear

# Importing or building through these APIs warns about their own deprecations (transformers 5 renamed gradient to
# activation checkpointing); the peer calls what the installed version offers, so those notes are noise here.
_QUIET = dict(action="ignore", category=FutureWarning)


def require() -> Any:
    """transformers and peft, or a SystemExit that says how to install them."""
    try:
        import peft
        import transformers
    except ImportError as err:
        raise SystemExit(f"--peer hf needs transformers and peft ({err}). Install them with "
                         "`pip install -e \".[hf]\"` (or the test extra: transformers >= 5, peft >= 0.13).") from err
    return transformers, peft


def covers_checkpointing(every: int) -> bool:
    """transformers checkpoints every k-th decoder layer (`every_n_layers`), as our `--checkpointing k` does."""
    return every >= 0


def build(ours: GPT, lora: Optional[LoRAConfig], device: torch.device, dtype: torch.dtype, every: int = 0) -> nn.Module:
    """transformers' model of `ours.config` with its weights; with `lora`, a PEFT LoRA model with our adapters (only
    they trainable). `every` > 0 turns on transformers' activation checkpointing of every `every`-th layer."""
    require()
    from transformers import AutoConfig, AutoModelForCausalLM

    from lit_model.hf.convert import lit_to_hf
    from lit_model.hf.families import hf_config_dict

    config = ours.config
    hf = hf_config_dict(config, dtype)  # raises when the architecture cannot express the config
    model_type = hf.pop("model_type")
    hf.pop("torch_dtype")  # the dtype is the model's, set below
    hf_config = AutoConfig.for_model(model_type, **hf)
    with warnings.catch_warnings(), torch.device(device):
        warnings.simplefilter(**_QUIET)
        model = AutoModelForCausalLM.from_config(hf_config, attn_implementation="sdpa", dtype=dtype)
    # Clones: the peer must own its weights, or its optimizer would step ours too.
    base = {k: v for k, v in ours.state_dict().items() if not k.rpartition(".")[2].startswith("lora_")}
    state = {}
    for key, value in lit_to_hf(base.items(), config):
        module, _, leaf = key.rpartition(".")
        state[f"{_in_memory(module, config)}.{leaf}"] = value.detach().clone()
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if config.tie_embeddings else set()
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"hf peer: weights did not map (missing {sorted(set(missing) - tied)[:4]}, "
                           f"unexpected {unexpected[:4]})")
    model.to(device=device, dtype=dtype)
    if every:
        _enable_checkpointing(model, every)
    if lora is None:
        return model
    return _with_lora(model, ours, lora)


def _in_memory(module: str, config: Any) -> str:
    """The name transformers >= 5 gives a module in memory (GPT-NeoX's `embed_out` became `lm_head`)."""
    from lit_model.hf.families import layout_of

    return layout_of(config).in_memory.get(module, module)


def _enable_checkpointing(model: nn.Module, every: int) -> None:
    """transformers' own activation checkpointing (torch's non-reentrant checkpoint around each chosen layer)."""
    with warnings.catch_warnings():
        warnings.simplefilter(**_QUIET)
        if hasattr(model, "activation_checkpointing_enable"):  # recent transformers: every k-th layer
            model.activation_checkpointing_enable(every_n_layers=every)
        elif every == 1:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            raise ValueError(f"This transformers version checkpoints every layer only; --checkpointing {every} "
                             "needs transformers with `activation_checkpointing_enable(every_n_layers=...)`")
    model.config.use_cache = False  # a KV cache is for generation; with checkpointing transformers refuses it


def _with_lora(model: nn.Module, ours: GPT, lora: LoRAConfig) -> nn.Module:
    """PEFT's LoRA on the modules ours adapts, with our A and B values (so the same loss and gradients)."""
    from peft import LoraConfig, get_peft_model

    from lit_model.hf.convert import hf_module

    config = ours.config
    adapted = {name: m for name, m in ours.named_modules() if isinstance(m, LoRALinear)}
    where = {name: hf_module(name, config) for name in adapted}
    targets = {name: _in_memory(hf.name, config) for name, hf in where.items()}
    fused = sorted({hf.name.rpartition(".")[2] for hf in where.values() if hf.parts})
    if fused:
        # PEFT would need one adapter of rank k * r on the fused layer: a different trainable count, another step.
        raise ValueError(f"The hf peer's LoRA needs separate projections; {config.hf_model_type} fuses "
                         f"{', '.join(fused)}. Compare full fine-tuning, or LoRA on a Llama-like config.")
    peft_config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, bias="none",
                             target_modules=sorted({t.rpartition(".")[2] for t in targets.values()}),
                             task_type="CAUSAL_LM")
    with warnings.catch_warnings():
        warnings.simplefilter(**_QUIET)
        # PEFT's default `autocast_adapter_dtype=True` keeps the adapters in float32 on a bf16 base, as PEFT users
        # get; the product runs in float32 and is cast back.
        peft_model = get_peft_model(model, peft_config)
    with torch.no_grad():
        for name, module in adapted.items():
            theirs = peft_model.base_model.model.get_submodule(targets[name])
            theirs.lora_A["default"].weight.copy_(module.lora_A)
            theirs.lora_B["default"].weight.copy_(module.lora_B)
    peft_adapted = sum(1 for n, _ in peft_model.named_modules() if n.endswith(".lora_A.default"))
    if peft_adapted != len(adapted):  # PEFT matches target names by suffix: it must hit exactly our layers
        raise RuntimeError(f"hf peer: PEFT adapted {peft_adapted} layers, ours {len(adapted)}")
    return peft_model


def loss(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """transformers' training loss on (B, T + 1) tokens: the forward on the first T, its own cross-entropy against
    the T next tokens (given already shifted, see the module docstring)."""
    targets = tokens[:, 1:].contiguous()  # its loss flattens the labels with .view
    return model(input_ids=tokens[:, :-1], labels=targets, shift_labels=targets, use_cache=False).loss


def optimizer(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    """The AdamW a default `TrainingArguments` gives: its `optim` default is "adamw_torch_fused" with torch >= 2.8
    (`torch.optim.AdamW(fused=True)`), "adamw_torch" (torch's default implementation) before; weight decay 0.0.
    Read from the installed transformers, so the peer follows it. (Trainer splits the parameters into a decay and
    a no-decay group; with weight decay 0 both do the same arithmetic, so one group is the same step.)"""
    from transformers import TrainingArguments

    default = TrainingArguments.__dataclass_fields__["optim"].default
    name = str(getattr(default, "value", default))  # a plain string or an OptimizerNames member
    if name not in ("adamw_torch", "adamw_torch_fused"):
        raise RuntimeError(f"transformers' default optimizer is {name!r}; the hf peer knows adamw_torch(_fused)")
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.0, fused=True if name == "adamw_torch_fused" else None)
