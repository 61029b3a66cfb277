"""The same model and training step in litgpt, for `scripts/benchmark.py --peer litgpt`.

litgpt (Lightning AI's reference implementation) is the peer this project measures itself against. This module
builds litgpt's `GPT` (or its LoRA `GPT`) for one of our configs, copies our weights into it (our separate
query/key/value matrices become litgpt's fused `qkv`, in its [q; k; v] order), and runs the step litgpt's own
fine-tuning scripts run: logits with `lm_head_chunk_size=128`, `litgpt.utils.chunked_cross_entropy`, backward,
`torch.optim.AdamW` with torch's defaults (its finetune/full.py and finetune/lora.py build it so).

Every peer module (hf_peer.py, torchtune_peer.py) offers the same five functions to benchmark.py: `require`,
`covers_checkpointing`, `build`, `loss` and `optimizer`.

litgpt is an optional extra (`pip install -e ".[litgpt]"`). It pins `huggingface_hub<1.4`, which conflicts with the
test extra's transformers 5; in an environment that has both, install it with `pip install --no-deps litgpt psutil`
(the model code imports torch and lightning only).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn as nn

from lit_model import GPT, Config
from lit_model.peft.lora import LoRAConfig

# litgpt's finetune/full.py and finetune/lora.py apply the LM head in chunks of this many positions.
LITGPT_LM_HEAD_CHUNK = 128


def import_litgpt() -> Any:
    try:
        import litgpt
    except ImportError as err:
        raise SystemExit(
            f"--peer litgpt needs the litgpt package ({err}). Install it with `pip install -e \".[litgpt]\"`, or, next "
            "to transformers 5 (the test extra), `pip install --no-deps litgpt psutil`."
        ) from err
    return litgpt


def require() -> Any:
    """litgpt, or a SystemExit that says how to install it."""
    return import_litgpt()


def covers_checkpointing(every: int) -> bool:
    """litgpt's fine-tuning scripts have no activation checkpointing: only rows without it compare."""
    return every == 0


def build(ours: GPT, lora: Optional[LoRAConfig], device: torch.device, dtype: torch.dtype, every: int = 0
          ) -> nn.Module:
    """litgpt's model with our weights (see `build_litgpt`)."""
    if every:
        raise ValueError("litgpt's fine-tuning has no activation checkpointing to compare with")
    return build_litgpt(ours, lora, device, dtype)


def loss(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """litgpt's training loss on (B, T + 1) tokens (see `litgpt_loss`)."""
    return litgpt_loss(model, tokens)


def optimizer(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    """What litgpt's finetune scripts build: `torch.optim.AdamW` over the trainable parameters, torch's default
    implementation (neither fused nor foreach given: a per-tensor loop on CPU, foreach on CUDA)."""
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)


def litgpt_config(config: Config, lora: Optional[LoRAConfig] = None) -> Any:
    """litgpt's Config for our architecture (a LoRA config when `lora` is given). Refuses what litgpt names otherwise."""
    import_litgpt()
    from litgpt.config import Config as LitConfig
    from litgpt.lora import Config as LitLoRAConfig

    # Tied embeddings are fine: litgpt's converter copies the embedding into lm_head and fine-tunes the two apart,
    # which is what its model then does here too (the same values, so the same loss).
    unsupported = [name for name, bad in (("norm_unit_offset (Gemma)", config.norm_unit_offset),
                                          ("sliding_window", config.sliding_window is not None)) if bad]
    if unsupported:
        raise ValueError(f"The litgpt peer covers Llama-, Qwen2- and GPT-NeoX-shaped configs; {config.name!r} uses "
                         f"{', '.join(unsupported)}. Benchmark a Llama-like config instead (the default model).")
    kwargs: dict[str, Any] = dict(
        name=config.name or "bench", block_size=config.block_size, vocab_size=config.vocab_size,
        padded_vocab_size=config.vocab_size, n_layer=config.n_layer, n_head=config.n_head, n_embd=config.n_embd,
        head_size=config.head_size, n_query_groups=config.n_query_groups, intermediate_size=config.intermediate_size,
        rotary_percentage=config.rotary_percentage, rope_base=config.rope_base,
        rope_adjustments=config.rope_adjustments, parallel_residual=config.parallel_residual, bias=config.bias,
        attn_bias=config.attn_bias, norm_class_name=config.norm_class_name, norm_eps=config.norm_eps,
        mlp_class_name=config.mlp_class_name, gelu_approximate=config.gelu_approximate,
        scale_embeddings=config.scale_embeddings,
    )
    if lora is None:
        return LitConfig(**kwargs)
    return LitLoRAConfig(**kwargs, lora_r=lora.r, lora_alpha=int(lora.alpha), lora_dropout=lora.dropout,
                         lora_query=lora.query, lora_key=lora.key, lora_value=lora.value,
                         lora_projection=lora.projection, lora_mlp=lora.mlp, lora_head=lora.head)


def litgpt_state_dict(ours: GPT) -> dict[str, torch.Tensor]:
    """Our base weights under litgpt's names (LoRA adapters excluded): fused qkv, everything else one to one."""
    out: dict[str, torch.Tensor] = {}
    state = {k: v for k, v in ours.state_dict().items() if "lora_" not in k}
    for key, value in state.items():
        if ".attn.key." in key or ".attn.value." in key:
            continue
        if ".attn.query." in key:
            prefix, suffix = key.split(".attn.query.")
            parts = [state[f"{prefix}.attn.{name}.{suffix}"] for name in ("query", "key", "value")]
            out[f"{prefix}.attn.qkv.{suffix}"] = torch.cat(parts, dim=0)
        else:
            out[key] = value
    return out


def build_litgpt(ours: GPT, lora: Optional[LoRAConfig], device: torch.device, dtype: torch.dtype) -> nn.Module:
    """litgpt's GPT with our model's weights; with `lora`, litgpt's LoRA GPT with only the adapters trainable."""
    import_litgpt()
    from litgpt.lora import GPT as LitLoRAGPT, mark_only_lora_as_trainable
    from litgpt.model import GPT as LitGPT

    cfg = litgpt_config(ours.config, lora)
    with torch.device(device):
        model = (LitLoRAGPT if lora is not None else LitGPT)(cfg)
    state = litgpt_state_dict(ours)
    if lora is not None:  # LoRA layers wrap the base Linear as `.linear`
        adapted = {name.removesuffix(".lora_A") for name, _ in model.named_parameters() if name.endswith("lora_A")}
        state = {_lora_key(k, adapted): v for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if "lora_" not in k]
    if missing or unexpected:
        raise RuntimeError(f"litgpt peer: weights did not map (missing {missing[:4]}, unexpected {unexpected[:4]})")
    model.to(device=device, dtype=dtype)
    if lora is not None:
        mark_only_lora_as_trainable(model)
    return model


def _lora_key(key: str, adapted: set[str]) -> str:
    module, _, leaf = key.rpartition(".")
    return f"{module}.linear.{leaf}" if module in adapted else key


def litgpt_loss(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """The loss of litgpt's fine-tuning step on (B, T + 1) tokens: chunked LM head, chunked cross-entropy."""
    from litgpt.utils import chunked_cross_entropy

    logits = model(tokens[:, :-1], lm_head_chunk_size=LITGPT_LM_HEAD_CHUNK)
    return chunked_cross_entropy(logits, tokens[:, 1:])
