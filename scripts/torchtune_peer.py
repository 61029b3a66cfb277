"""The same model and training step in torchtune, for `scripts/benchmark.py --peer torchtune`.

torchtune (PyTorch's own fine-tuning library) builds its Llama from component builders; this module uses
`torchtune.models.llama3.llama3` (or `lora_llama3`, the same r, alpha and targets, dropout 0) with our config's
shapes and RoPE base, and brings our weights in the way torchtune loads a Hugging Face checkpoint: our export map
(`lit_model.hf.convert.lit_to_hf`) then torchtune's own `convert_weights.hf_to_tune`, which permutes the query and
key rows from the half-split RoPE layout into torchtune's interleaved one (so our LoRA B rows of query and key are
permuted alike). The step is its `lora_finetune_single_device.py` / `full_finetune_*.py` recipes' `_loss_step`:
logits in 8 chunks (`set_num_output_chunks`), `CEWithChunkedOutputLoss`, backward, and the optimizer of its Llama
3.2 configs, `torch.optim.AdamW(fused=True)`. The recipe makes its labels by shifting the batch's labels left and
padding with the ignore index (T - 1 predictions from T tokens); here the shift is done on our T + 1 tokens instead,
so that both implementations train the same T predictions. Activation checkpointing is the recipes'
`enable_activation_checkpointing`: every `TransformerSelfAttentionLayer` wrapped.

Installability (checked 2026-12 with torch 2.13.0 CPU, peft 0.21.2): torchtune 0.6.1 (the latest) declares no
torch requirement and installs next to our pins without changing torch, but it imports torchao at its top level,
and the torchao versions disagree with it and with peft:
- torchao 0.18 moved `torchao.dtypes.nf4tensor`, which `torchtune.modules` imports: `import torchtune` fails.
- torchao 0.16 and 0.17 dropped `int4_weight_only`, which `torchtune.training` imports: that subpackage fails,
  the models, LoRA modules and loss import and run.
- torchao <= 0.15 has everything torchtune imports, but peft 0.21 refuses torchao below 0.16 as soon as a LoRA
  model is built ("Found an incompatible version of torchao"), which would break `--peer hf` and the tests.
So this peer runs on torchao 0.16 and does not import `torchtune.training`: the two helpers its recipes call from
there are reproduced here exactly (a default-dtype context and torch's `apply_activation_checkpointing` with a
`ModuleWrapPolicy` of `TransformerSelfAttentionLayer`). torchtune's other declared dependencies (datasets,
torchdata 0.11, omegaconf, tiktoken, blobfile, kagglehub, ...) are needed too: its package imports them at its top
level. Install with `pip install -e ".[torchtune]"`. torchao prints a note that it skips its C++ extensions
(built for another torch); the peer uses none of them.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Optional

import torch
import torch.nn as nn

from lit_model import GPT, Config
from lit_model.peft.lora import LoRAConfig, LoRALinear

# torchtune's recipes default: CEWithChunkedOutputLoss(num_output_chunks=8).
OUTPUT_CHUNKS = 8


def require() -> Any:
    """torchtune, or a SystemExit that says how to install it."""
    try:
        import torchtune
    except ImportError as err:
        raise SystemExit(
            f"--peer torchtune needs torchtune and torchao ({err}). Install them with `pip install -e "
            "\".[torchtune]\"` (torchtune 0.6.1 with torchao >= 0.16, < 0.18; see scripts/torchtune_peer.py)."
        ) from err
    return torchtune


def covers_checkpointing(every: int) -> bool:
    """torchtune's recipes checkpoint every layer or none."""
    return every in (0, 1)


def check_config(config: Config) -> None:
    """Refuse what `torchtune.models.llama3.llama3` would compute differently (it is the Llama 3 architecture with
    plain RoPE: no biases, no tied head, no frequency scaling, head size n_embd / n_head)."""
    problems = [name for name, bad in (
        ("a non-Llama architecture", config.hf_model_type not in ("llama", "mistral") or config.parallel_residual
         or config.mlp_class_name != "LLaMAMLP" or config.norm_class_name != "RMSNorm"),
        ("biases", config.bias or config.attn_bias),
        ("tied embeddings", config.tie_embeddings),
        ("rope_adjustments", bool(config.rope_adjustments)),
        ("partial rotary", config.rotary_percentage != 1.0),
        ("sliding_window", config.sliding_window is not None),
        ("norm_unit_offset", config.norm_unit_offset),
        ("scale_embeddings", config.scale_embeddings),
        ("head_size != n_embd / n_head", config.head_size * config.n_head != config.n_embd),
    ) if bad]
    if problems:
        raise ValueError(f"The torchtune peer builds torchtune's Llama 3 (plain RoPE); {config.name!r} has "
                         f"{', '.join(problems)}. Benchmark a Llama-like config instead (the default model).")


def build(ours: GPT, lora: Optional[LoRAConfig], device: torch.device, dtype: torch.dtype, every: int = 0) -> nn.Module:
    """torchtune's Llama 3 with our weights; with `lora`, its LoRA Llama 3 with our adapters (only they trainable)."""
    require()
    from torchtune.models.convert_weights import hf_to_tune
    from torchtune.models.llama3 import llama3, lora_llama3
    from torchtune.modules.peft import get_adapter_params, set_trainable_params

    from lit_model.hf.convert import lit_to_hf

    config = ours.config
    check_config(config)
    if not covers_checkpointing(every):
        raise ValueError(f"torchtune checkpoints every layer or none, not every {every}-th")
    shapes = dict(vocab_size=config.vocab_size, num_layers=config.n_layer, num_heads=config.n_head,
                  num_kv_heads=config.n_query_groups, embed_dim=config.n_embd, max_seq_len=config.block_size,
                  intermediate_dim=config.intermediate_size, norm_eps=config.norm_eps, rope_base=config.rope_base)
    # Built as its recipes build it: in the training dtype, on the device.
    with _default_dtype(dtype), torch.device(device):
        if lora is None:
            model = llama3(**shapes)
        else:
            if lora.head or lora.key:
                raise ValueError("The torchtune peer compares LoRA on query, value, projection and MLP only")
            attn = [name for name, on in (("q_proj", lora.query), ("v_proj", lora.value),
                                          ("output_proj", lora.projection)) if on]
            model = lora_llama3(attn, apply_lora_to_mlp=lora.mlp, lora_rank=lora.r, lora_alpha=lora.alpha,
                                lora_dropout=lora.dropout, **shapes)
    base = {k: v for k, v in ours.state_dict().items() if not k.rpartition(".")[2].startswith("lora_")}
    hf = {k: v.detach().clone() for k, v in lit_to_hf(base.items(), config)}
    state = hf_to_tune(hf, num_heads=config.n_head, num_kv_heads=config.n_query_groups, dim=config.n_embd,
                       head_dim=config.head_size)
    if lora is not None:
        state.update(_adapters(ours, config))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"torchtune peer: weights did not map (missing {missing[:4]}, unexpected {unexpected[:4]})")
    model.to(device=device, dtype=dtype)
    if lora is not None:
        set_trainable_params(model, get_adapter_params(model))
    if every:
        _checkpoint_every_layer(model)
    model.set_num_output_chunks(OUTPUT_CHUNKS)
    return model


@contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """`torchtune.training.set_default_dtype`: the recipes build the model with this default dtype."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def _checkpoint_every_layer(model: nn.Module) -> None:
    """`torchtune.training.set_activation_checkpointing(model, auto_wrap_policy={TransformerSelfAttentionLayer})`,
    what the recipes run for `enable_activation_checkpointing: True`: torch's checkpoint wrapper (non-reentrant)
    around every decoder layer."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy
    from torchtune.modules import TransformerSelfAttentionLayer

    apply_activation_checkpointing(model, auto_wrap_policy=ModuleWrapPolicy({TransformerSelfAttentionLayer}))


# Our module names inside a block -> torchtune's.
_TUNE_NAMES = {"attn.query": "attn.q_proj", "attn.key": "attn.k_proj", "attn.value": "attn.v_proj",
               "attn.proj": "attn.output_proj", "mlp.fc_1": "mlp.w1", "mlp.fc_2": "mlp.w3", "mlp.proj": "mlp.w2"}


def _adapters(ours: GPT, config: Config) -> dict[str, torch.Tensor]:
    """Our LoRA A and B under torchtune's names; B's rows of query and key permuted as `hf_to_tune` permutes the
    weights' rows (A acts on the input, which is not permuted)."""
    out = {}
    for name, module in ours.named_modules():
        if not isinstance(module, LoRALinear):
            continue
        block, sub = name.removeprefix("transformer.h.").split(".", 1)
        prefix = f"layers.{block}.{_TUNE_NAMES[sub]}"
        b = module.lora_B.detach().clone()
        heads = {"attn.query": config.n_head, "attn.key": config.n_query_groups}.get(sub)
        if heads is not None:
            hs = config.head_size
            b = b.view(heads, 2, hs // 2, -1).transpose(1, 2).reshape(heads * hs, -1)  # (nh * hs, r), interleaved
        out[f"{prefix}.lora_a.weight"] = module.lora_A.detach().clone()
        out[f"{prefix}.lora_b.weight"] = b
    return out


def loss(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """The recipes' training loss on (B, T + 1) tokens: chunked logits of the first T, CEWithChunkedOutputLoss
    against the T next tokens."""
    from torchtune.modules.loss import CEWithChunkedOutputLoss

    return CEWithChunkedOutputLoss(num_output_chunks=OUTPUT_CHUNKS)(model(tokens[:, :-1]), tokens[:, 1:])


def optimizer(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    """torchtune's Llama 3.2 LoRA and full (distributed) configs: `torch.optim.AdamW` with `fused: True`. (Its
    single-device full config uses bitsandbytes' PagedAdamW8bit, which needs CUDA.)"""
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, fused=True)
