"""A decoder-only transformer covering Llama 2/3, Mistral, Qwen2.5, Pythia (GPT-NeoX), Gemma and Phi-3.

This file only computes: no I/O, no printing, no loss, no optimizer. It depends on torch and `Config` alone.
Each residual branch of a `Block` (attention, MLP) is one call site, so DropBP can skip a branch's backward by
running it under `torch.no_grad()`: the forward value is unchanged, the branch saves nothing for backward, and the
gradient reaches earlier layers through the residual identity only.
"""

from __future__ import annotations

import itertools
import math
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from lit_model.config import Config

# (n_layer, 2) booleans: [i][0] drops block i's attention branch, [i][1] its MLP branch.
DropMask = Sequence[Sequence[bool]]


class GPT(nn.Module):
    """Token embedding, `n_layer` blocks, final norm and LM head. Module names follow Lit-GPT's checkpoints."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.config = config
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                h=nn.ModuleList(Block(config, i) for i in range(config.n_layer)),
                ln_f=make_norm(config, config.n_embd),
            )
        )
        if config.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight

    @property
    def blocks(self) -> nn.ModuleList:
        return self.transformer.h

    def forward(
        self,
        idx: torch.Tensor,
        input_pos: Optional[torch.Tensor] = None,
        drop_mask: Optional[DropMask] = None,
        return_hidden: bool = False,
        segments: Optional[Sequence[int]] = None,
    ) -> torch.Tensor:
        """Logits (B, T, vocab_size) for token ids `idx` (B, T). See `hidden_states` for the arguments.

        return_hidden: return the LM head's input (B, T, n_embd) instead, for a loss that applies the head in chunks
            (training never materialises full logits). Going through `forward` keeps Fabric's precision wrapper.
        """
        hidden = self.hidden_states(idx, input_pos, drop_mask, segments)
        return hidden if return_hidden else self.lm_head(hidden)

    def hidden_states(
        self, idx: torch.Tensor, input_pos: Optional[torch.Tensor] = None, drop_mask: Optional[DropMask] = None,
        segments: Optional[Sequence[int]] = None,
    ) -> torch.Tensor:
        """Final-norm hidden states (B, T, n_embd), the input of the LM head (the chunked loss consumes these).

        input_pos: positions (T,) of the tokens when decoding with the KV cache (`set_kv_cache` first); None for a
            plain causal forward over positions 0..T-1.
        drop_mask: per block, whether to drop the backward of the attention and the MLP branch (DropBP). Ignored in
            eval mode, which never drops.
        segments: lengths of the sequences packed one after another into the single row of `idx` (1, T): each is
            its own sequence (positions restart at 0, attention stays within it), as if run separately.
        """
        B, T = idx.shape
        cfg = self.config
        if segments is not None:
            if B != 1 or input_pos is not None or sum(segments) != T or min(segments, default=1) < 1:
                raise ValueError(f"segments {list(segments)[:8]} must be positive lengths that sum to the {T} tokens of "
                                 f"a single row (got {B} rows), without a KV cache")
            if max(segments) > cfg.block_size:
                raise ValueError(f"A packed sequence of {max(segments)} tokens exceeds block_size {cfg.block_size}")
            positions = torch.cat([torch.arange(n, device=idx.device) for n in segments])  # restart per sequence
        elif input_pos is None:
            if T > cfg.block_size:
                raise ValueError(f"Sequence of length {T} exceeds the model's block_size {cfg.block_size}")
            positions = torch.arange(T, device=idx.device)
        else:
            if self.transformer.h[0].attn.kv_cache is None:
                raise RuntimeError("input_pos needs a KV cache: call `model.set_kv_cache(batch_size)` first")
            positions = input_pos
        cos, sin = rope_cos_sin(positions, cfg)
        x = self.transformer.wte(idx)  # (B, T, n_embd)
        if cfg.scale_embeddings:
            x = x * torch.tensor(cfg.n_embd**0.5, dtype=x.dtype)
        if not self.training or drop_mask is None:
            drop_mask = [(False, False)] * cfg.n_layer
        elif len(drop_mask) != cfg.n_layer:
            raise ValueError(f"drop_mask has {len(drop_mask)} rows, the model has {cfg.n_layer} blocks")
        for block, (drop_attn, drop_mlp) in zip(self.transformer.h, drop_mask):
            x = block(x, cos, sin, input_pos, bool(drop_attn), bool(drop_mlp), segments)
        return self.transformer.ln_f(x)

    def set_kv_cache(
        self,
        batch_size: int,
        max_seq_length: Optional[int] = None,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        """Allocate a KV cache in every attention layer for sequences up to `max_seq_length` (default block_size)."""
        max_seq_length = max_seq_length or self.config.block_size
        if max_seq_length > self.config.block_size:
            raise ValueError(f"max_seq_length {max_seq_length} exceeds the model's block_size {self.config.block_size}")
        ref = self.lm_head.weight
        device = device or ref.device
        dtype = dtype or (ref.dtype if ref.is_floating_point() else torch.get_default_dtype())
        for block in self.transformer.h:
            block.attn.kv_cache = KVCache(batch_size, max_seq_length, self.config, device, dtype)

    def clear_kv_cache(self) -> None:
        for block in self.transformer.h:
            block.attn.kv_cache = None

    def init_weights(self, std: float = 0.02) -> None:
        """Fresh random weights (for training from scratch): normal(0, std) matrices, zero biases, unit norms."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, (nn.LayerNorm, RMSNorm)):
                module.reset_parameters()


class Block(nn.Module):
    """One transformer layer: two residual branches (attention, MLP), each behind its own DropBP gate."""

    def __init__(self, config: Config, index: int) -> None:
        super().__init__()
        self.index = index
        self.parallel_residual = config.parallel_residual
        self.norm_1 = make_norm(config, config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.norm_2 = make_norm(config, config.n_embd)
        self.mlp = make_mlp(config)
        # Activation checkpointing (lit_model.checkpointing) installs a function here; it receives
        # (block, x, cos, sin, drop_attn, drop_mlp, segments) and must return what `compute` returns.
        self.checkpoint_fn: Optional[Callable[..., torch.Tensor]] = None

    def attn_branch(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, input_pos: Optional[torch.Tensor] = None,
        segments: Optional[Sequence[int]] = None,
    ) -> torch.Tensor:
        return self.attn(self.norm_1(x), cos, sin, input_pos, segments)

    def mlp_branch(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.norm_2(x))

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        input_pos: Optional[torch.Tensor] = None,
        drop_attn: bool = False,
        drop_mlp: bool = False,
        segments: Optional[Sequence[int]] = None,
    ) -> torch.Tensor:
        if self.checkpoint_fn is not None and input_pos is None and torch.is_grad_enabled():
            return self.checkpoint_fn(self, x, cos, sin, drop_attn, drop_mlp, segments)
        return self.compute(x, cos, sin, input_pos, drop_attn, drop_mlp, segments)

    def compute(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        input_pos: Optional[torch.Tensor] = None,
        drop_attn: bool = False,
        drop_mlp: bool = False,
        segments: Optional[Sequence[int]] = None,
    ) -> torch.Tensor:
        """The block's output; each branch runs through its DropBP gate (`run_branch`)."""
        a = run_branch(self.attn_branch, drop_attn, x, cos, sin, input_pos, segments)
        if self.parallel_residual:  # GPT-NeoX: both branches read the block input
            return x + a + run_branch(self.mlp_branch, drop_mlp, x)
        x = x + a
        return x + run_branch(self.mlp_branch, drop_mlp, x)


def run_branch(fn: Callable[..., torch.Tensor], dropped: bool, *args: Any) -> torch.Tensor:
    """The DropBP gate: a dropped branch computes the same value but records no graph and saves no activations."""
    if dropped:
        with torch.no_grad():
            return fn(*args)
    return fn(*args)


class CausalSelfAttention(nn.Module):
    """Multi-head, grouped-query or multi-query attention with RoPE, SDPA and an optional KV cache."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.config = config
        hs, qkv_bias = config.head_size, config.bias or config.attn_bias
        self.query = nn.Linear(config.n_embd, config.n_head * hs, bias=qkv_bias)
        self.key = nn.Linear(config.n_embd, config.n_query_groups * hs, bias=qkv_bias)
        self.value = nn.Linear(config.n_embd, config.n_query_groups * hs, bias=qkv_bias)
        self.proj = nn.Linear(config.n_head * hs, config.n_embd, bias=config.bias)
        self.kv_cache: Optional[KVCache] = None

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, input_pos: Optional[torch.Tensor] = None,
        segments: Optional[Sequence[int]] = None,
    ) -> torch.Tensor:
        cfg = self.config
        B, T, _ = x.shape
        nh, ng, hs = cfg.n_head, cfg.n_query_groups, cfg.head_size
        q = self.query(x).view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = self.key(x).view(B, T, ng, hs).transpose(1, 2)  # (B, ng, T, hs)
        v = self.value(x).view(B, T, ng, hs).transpose(1, 2)  # (B, ng, T, hs)
        q = apply_rope(q, cos, sin)
        k = apply_rope(k, cos, sin)
        mask = None
        if segments is not None:  # packed sequences: attention within each, never across
            y = packed_attention(q, k, v, segments, cfg.sliding_window, 1.0 / math.sqrt(hs), ng != nh)
            return self.proj(y.transpose(1, 2).reshape(B, T, nh * hs))
        if input_pos is not None:
            assert self.kv_cache is not None
            k, v = self.kv_cache(input_pos, k, v)  # (B, ng, S, hs), S = cache length
            mask = attention_mask(input_pos, torch.arange(k.size(2), device=x.device), cfg.sliding_window)
        elif cfg.sliding_window is not None and T > cfg.sliding_window:
            pos = torch.arange(T, device=x.device)
            mask = attention_mask(pos, pos, cfg.sliding_window)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None and T > 1, scale=1.0 / math.sqrt(hs), enable_gqa=ng != nh
        )  # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(B, T, nh * hs)  # (B, T, nh * hs)
        return self.proj(y)


def packed_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segments: Sequence[int], sliding_window: Optional[int],
    scale: float, gqa: bool,
) -> torch.Tensor:
    """Causal attention of each packed sequence with itself only: q (1, nh, T, hs), k and v (1, ng, T, hs).

    On CUDA in half precision, one variable-length flash kernel over all sequences (torch's varlen_attn); elsewhere
    one SDPA call per sequence, which computes no score across sequences (a block-diagonal mask over the whole row
    would compute them all and throw most away). Returns (1, nh, T, hs).
    """
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and _varlen_attention() is not None:
        varlen = _varlen_attention()
        cu = torch.tensor([0, *itertools.accumulate(segments)], device=q.device, dtype=torch.int32)
        window = (sliding_window - 1, 0) if sliding_window is not None else (-1, 0)
        out = varlen(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1), cu, cu, max(segments),
                     max(segments), scale=scale, window_size=window, enable_gqa=gqa)  # (T, nh, hs)
        return out.transpose(0, 1)[None]
    outs, start = [], 0
    for n in segments:
        qs, ks, vs = (t[:, :, start:start + n] for t in (q, k, v))  # (1, heads, n, hs)
        mask = None
        if sliding_window is not None and n > sliding_window:
            pos = torch.arange(n, device=q.device)
            mask = attention_mask(pos, pos, sliding_window)
        outs.append(F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, is_causal=mask is None and n > 1,
                                                   scale=scale, enable_gqa=gqa))
        start += n
    return torch.cat(outs, dim=2)


def _varlen_attention() -> Optional[Callable[..., torch.Tensor]]:
    """torch's variable-length flash attention, where this torch has it (2.9 and later), else None."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def attention_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, sliding_window: Optional[int]) -> torch.Tensor:
    """Boolean (Tq, Tk) mask, True where query at q_pos may attend to the key at k_pos (causal, optional window)."""
    allowed = k_pos[None, :] <= q_pos[:, None]
    if sliding_window is not None:
        allowed = allowed & (q_pos[:, None] - k_pos[None, :] < sliding_window)
    return allowed


class KVCache(nn.Module):
    """Preallocated keys and values (B, n_query_groups, max_seq_length, head_size) written at `input_pos`."""

    def __init__(
        self, batch_size: int, max_seq_length: int, config: Config, device: torch.device, dtype: torch.dtype
    ) -> None:
        super().__init__()
        shape = (batch_size, config.n_query_groups, max_seq_length, config.head_size)
        self.register_buffer("k", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(shape, device=device, dtype=dtype), persistent=False)

    def forward(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if k.size(0) != self.k.size(0):
            raise ValueError(f"Batch of {k.size(0)} does not match the KV cache's batch size {self.k.size(0)}")
        self.k.index_copy_(2, input_pos, k.to(self.k.dtype))
        self.v.index_copy_(2, input_pos, v.to(self.v.dtype))
        return self.k, self.v

    def resize(self, max_seq_length: int) -> None:
        """Reallocate for `max_seq_length` positions, keeping the first min(old, new) positions' keys and values."""
        B, G, S, hs = self.k.shape
        keep = min(S, max_seq_length)
        for name in ("k", "v"):
            old = getattr(self, name)
            new = old.new_zeros((B, G, max_seq_length, hs))  # (B, ng, max_seq_length, hs)
            new[:, :, :keep] = old[:, :, :keep]
            setattr(self, name, new)  # replaces the registered (non-persistent) buffer


# ---- RoPE ----------------------------------------------------------------------------------------------------------


def rope_inv_freq(config: Config, device: Optional[torch.device] = None) -> torch.Tensor:
    """Inverse frequencies (n_elem / 2,), with Llama 3.1's frequency scaling when the config asks for it."""
    n_elem = config.rope_n_elem
    inv_freq = 1.0 / (config.rope_base ** (torch.arange(0, n_elem, 2, device=device, dtype=torch.float32) / n_elem))
    adj = config.rope_adjustments
    if adj:
        factor, low, high = adj["factor"], adj["low_freq_factor"], adj["high_freq_factor"]
        old_len = adj["original_max_seq_len"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)  # long wavelengths: slow down
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        inv_freq = torch.where(medium, smoothed, scaled)
    return inv_freq


def rope_cos_sin(positions: torch.Tensor, config: Config) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (T, n_elem) for the given positions, in float32.

    Computed per forward instead of cached in a buffer: it costs a handful of tiny kernels, and needs no cache
    that meta-device loading, dtype casts or a longer sequence would invalidate.
    """
    inv_freq = rope_inv_freq(config, positions.device)
    freqs = positions.to(torch.float32)[:, None] * inv_freq[None, :]  # (T, n_elem / 2), elementwise: no autocast
    emb = torch.cat((freqs, freqs), dim=-1)  # (T, n_elem)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first n_elem channels of each head (half-split layout, as in the HF checkpoints)."""
    n_elem = cos.size(-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    rot, rest = x[..., :n_elem], x[..., n_elem:]
    x1, x2 = rot[..., : n_elem // 2], rot[..., n_elem // 2 :]
    rotated = torch.cat((-x2, x1), dim=-1)
    out = rot * cos + rotated * sin
    return out if rest.size(-1) == 0 else torch.cat((out, rest), dim=-1)


# ---- norms and MLPs ------------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in float32; `unit_offset` scales by (1 + weight) as Gemma does."""

    def __init__(self, size: int, eps: float = 1e-6, unit_offset: bool = False) -> None:
        super().__init__()
        self.eps, self.unit_offset = eps, unit_offset
        self.weight = nn.Parameter(torch.empty(size))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.weight) if self.unit_offset else nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.unit_offset:
            return (x32 * (1.0 + self.weight.float())).to(dtype)
        return self.weight * x32.to(dtype)


def make_norm(config: Config, size: int) -> nn.Module:
    if config.norm_class_name == "LayerNorm":
        return nn.LayerNorm(size, eps=config.norm_eps)
    return RMSNorm(size, eps=config.norm_eps, unit_offset=config.norm_unit_offset)


class GptNeoxMLP(nn.Module):
    """fc -> GELU -> proj (two matrices)."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.fc = nn.Linear(config.n_embd, config.intermediate_size, bias=config.bias)
        self.proj = nn.Linear(config.intermediate_size, config.n_embd, bias=config.bias)
        self.approximate = config.gelu_approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x), approximate=self.approximate))


class GatedMLP(nn.Module):
    """proj(act(fc_1 x) * fc_2 x) (three matrices): SwiGLU (Llama: SiLU) or GeGLU (Gemma: GELU).

    fc_1 is HF's gate_proj, fc_2 its up_proj, proj its down_proj.
    """

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.fc_1 = nn.Linear(config.n_embd, config.intermediate_size, bias=config.bias)
        self.fc_2 = nn.Linear(config.n_embd, config.intermediate_size, bias=config.bias)
        self.proj = nn.Linear(config.intermediate_size, config.n_embd, bias=config.bias)
        self.gelu = config.mlp_class_name == "GemmaMLP"
        self.approximate = config.gelu_approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.fc_1(x)
        gate = F.gelu(gate, approximate=self.approximate) if self.gelu else F.silu(gate)
        return self.proj(gate * self.fc_2(x))


def make_mlp(config: Config) -> nn.Module:
    return GptNeoxMLP(config) if config.mlp_class_name == "GptNeoxMLP" else GatedMLP(config)
