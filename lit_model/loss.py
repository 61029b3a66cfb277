"""Chunked, recomputed cross-entropy: the LM head and the loss without ever holding full (B, T, V) logits.

With a 128k vocabulary, fp32 logits of a batch of 8 x 2048 tokens take 8 GiB, and autograd keeps them (and the
softmax) for the backward. Here the head runs over `chunk_size` tokens at a time inside one autograd Function that
saves only its inputs and the per-token logsumexp (N floats); the backward recomputes each chunk's logits, turns
them into the gradient of the loss (softmax minus one-hot) and multiplies through. This is the idea of Cut
Cross-Entropy (Wijmans et al., 2024) in plain PyTorch: peak extra memory is one chunk of logits, not N x V.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn


def chunked_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    chunk_size: int = 1024,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Mean cross-entropy of `hidden @ weight.T + bias` against `targets` over the non-ignored targets.

    Equal to `F.cross_entropy((hidden @ weight.T + bias).flatten(0, -2), targets.flatten(), ignore_index=...)`, with
    gradients for `hidden`, `weight` and `bias` (each only when it requires grad: a frozen LoRA head gets none).

    hidden: (B, T, C) (any leading dimensions) the LM head's input, e.g. `model(idx, return_hidden=True)`.
    weight: (V, C) the dense head matrix, possibly the tied embedding. For a LoRA head pass the effective weight
        from `lm_head_weight(model.lm_head)`; a quantized head is not supported (keep the head dense under QLoRA).
    targets: (B, T) class indices; positions equal to `ignore_index` do not count.
    chunk_size: tokens per chunk; the transient memory is one chunk_size x V fp32 block of logits (in the backward
        also its copy in the product dtype when that is bf16/fp16).

    Returns a float32 scalar (float64 for float64 inputs). Logits, logsumexp and softmax are computed in float32.
    The matrix products run in the operands' dtype (or autocast's, when autocast is on) with float32 accumulation,
    as `nn.Linear` would: an fp32 copy of a bf16 head would cost as much memory as the logits this function avoids.
    The weight gradient is accumulated over chunks in float32 and cast to the weight's dtype once.
    A batch whose targets are all `ignore_index` gives a loss of exactly 0 that is still connected to the graph
    (zero gradients), never NaN.
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive number of tokens, got {chunk_size}")
    if hidden.dim() < 2 or weight.dim() != 2 or hidden.size(-1) != weight.size(1):
        raise ValueError(
            f"hidden {tuple(hidden.shape)} must be (..., C) and weight {tuple(weight.shape)} (V, C) with the same C"
        )
    if targets.shape != hidden.shape[:-1]:
        raise ValueError(
            f"targets {tuple(targets.shape)} must have the shape of hidden without its last dimension, "
            f"{tuple(hidden.shape[:-1])}"
        )
    if not weight.is_floating_point():
        raise TypeError(
            f"The LM head weight has dtype {weight.dtype}: a quantized head is not supported by the chunked loss. "
            "Keep the LM head dense (unquantized), or pass its dequantized weight."
        )
    if bias is not None and bias.shape != (weight.size(0),):
        raise ValueError(f"bias {tuple(bias.shape)} must be (V,) = ({weight.size(0)},)")
    if targets.dtype not in (torch.long, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise TypeError(f"targets must hold integer class indices, got dtype {targets.dtype}")
    targets = targets.reshape(-1).long()
    valid = targets != ignore_index
    # An out-of-range target would be a silent wrong gather on some devices: check once (one host sync).
    bad = valid & ((targets < 0) | (targets >= weight.size(0)))
    if bool(bad.any()):
        raise ValueError(
            f"targets hold class indices outside [0, {weight.size(0)}) (e.g. {targets[bad][0].item()}): is the "
            f"tokenizer's vocabulary larger than the model's vocab_size, or should they be ignore_index={ignore_index}?"
        )
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type) and hidden.is_floating_point():
        mm_dtype = torch.get_autocast_dtype(device_type)
    else:
        mm_dtype = torch.promote_types(hidden.dtype, weight.dtype)
    flat = hidden.reshape(-1, hidden.size(-1))  # (N, C)
    return _ChunkedCrossEntropy.apply(flat, weight, bias, targets, valid, chunk_size, mm_dtype)


def head_loss(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, chunk_size: int = 1024) -> torch.Tensor:
    """`chunked_cross_entropy` of the LM head `head` (plain or LoRA, see `lm_head_weight`) on final hidden states."""
    weight, bias = lm_head_weight(head)
    return chunked_cross_entropy(hidden, weight, targets, bias, chunk_size=chunk_size)


def lm_head_weight(head: nn.Module) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The effective (weight, bias) of an LM head, to pass to `chunked_cross_entropy`.

    A plain `nn.Linear` gives its own parameters. A LoRA head (duck-typed: `lora_A` (r, in), `lora_B` (out, r),
    `scaling`, `merged`) that is not merged gives `weight + (lora_B @ lora_A) * scaling`, differentiable in the LoRA
    factors, so its adapters train through the chunked loss. LoRA dropout is not applied on this path (the loss sees
    the head as with dropout 0): dropout acts on the head's input, which the merged weight cannot express.
    """
    weight = head.weight
    if not weight.is_floating_point():
        raise TypeError(
            f"The LM head weight has dtype {weight.dtype}: a quantized head is not supported by the chunked loss. "
            "Keep the LM head dense (unquantized), or pass its dequantized weight."
        )
    bias = getattr(head, "bias", None)
    lora_a, lora_b = getattr(head, "lora_A", None), getattr(head, "lora_B", None)
    if lora_a is not None and lora_b is not None and not getattr(head, "merged", False):
        delta = (lora_b @ lora_a) * head.scaling  # (out, in)
        weight = weight + delta.to(weight.dtype)
    return weight, bias


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Forward: per-chunk logits -> logsumexp and the summed loss. Backward: recompute logits, softmax - onehot."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        hidden: torch.Tensor,  # (N, C)
        weight: torch.Tensor,  # (V, C)
        bias: Optional[torch.Tensor],  # (V,)
        targets: torch.Tensor,  # (N,) long
        valid: torch.Tensor,  # (N,) bool
        chunk_size: int,
        mm_dtype: torch.dtype,
    ) -> torch.Tensor:
        acc_dtype = torch.promote_types(mm_dtype, torch.float32)
        N = hidden.size(0)
        lse = torch.empty(N, dtype=acc_dtype, device=hidden.device)
        total = torch.zeros((), dtype=acc_dtype, device=hidden.device)
        w = weight.to(mm_dtype)  # a no-op unless autocast or mixed operand dtypes ask for a cast
        # autocast would re-cast inside the loop; the dtypes are already decided.
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, N, chunk_size):
                end = min(start + chunk_size, N)
                logits = _chunk_logits(hidden[start:end], w, bias, acc_dtype)  # (n, V)
                lse[start:end] = torch.logsumexp(logits, dim=-1)
                tgt = torch.where(valid[start:end], targets[start:end], 0)
                target_logit = logits.gather(1, tgt[:, None]).squeeze(1)  # (n,)
                total += ((lse[start:end] - target_logit) * valid[start:end]).sum()
        n_valid = valid.sum()
        ctx.save_for_backward(hidden, weight, bias, targets, valid, lse, n_valid)
        ctx.chunk_size, ctx.mm_dtype = chunk_size, mm_dtype
        # All targets ignored: 0 / 1 = 0 instead of 0 / 0 = NaN, and the backward gives zero gradients.
        return total / n_valid.clamp(min=1)

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad_loss: torch.Tensor
    ) -> tuple[Optional[torch.Tensor], ...]:
        hidden, weight, bias, targets, valid, lse, n_valid = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        mm_dtype, chunk_size = ctx.mm_dtype, ctx.chunk_size
        acc_dtype = lse.dtype
        grad_h = torch.empty_like(hidden) if need_h else None
        # The weight gradient sums over all chunks: accumulate in float32, cast once at the end.
        grad_w = torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device) if need_w else None
        grad_b = torch.zeros(weight.size(0), dtype=acc_dtype, device=weight.device) if need_b else None
        if need_h or need_w or need_b:
            scale = grad_loss.to(acc_dtype) / n_valid.clamp(min=1)
            w = weight.to(mm_dtype)
            with torch.autocast(hidden.device.type, enabled=False):
                for start in range(0, hidden.size(0), chunk_size):
                    end = min(start + chunk_size, hidden.size(0))
                    h = hidden[start:end].to(mm_dtype)
                    ok = valid[start:end]
                    # d loss / d logits = (softmax - onehot(target)) * scale on counted rows, 0 elsewhere.
                    g = _chunk_logits(h, w, bias, acc_dtype)  # (n, V)
                    g.sub_(lse[start:end, None]).exp_()
                    rows = torch.arange(end - start, device=g.device)
                    g[rows, torch.where(ok, targets[start:end], 0)] -= ok.to(acc_dtype)
                    g.mul_((ok.to(acc_dtype) * scale)[:, None])
                    if grad_b is not None:
                        grad_b += g.sum(0)
                    g_mm = g.to(mm_dtype)
                    if grad_h is not None:
                        grad_h[start:end] = (g_mm @ w).to(grad_h.dtype)  # (n, C)
                    if grad_w is not None:
                        grad_w += (g_mm.t() @ h).to(acc_dtype)  # (V, C)
        return (
            grad_h,
            grad_w.to(weight.dtype) if grad_w is not None else None,
            grad_b.to(bias.dtype) if grad_b is not None else None,
            None,
            None,
            None,
            None,
        )


def _chunk_logits(
    hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], acc_dtype: torch.dtype
) -> torch.Tensor:
    """Logits (n, V) of one chunk in `acc_dtype`; the product runs in the weight's dtype (fp32 accumulation)."""
    logits = (hidden.to(weight.dtype) @ weight.t()).to(acc_dtype)
    if bias is not None:
        logits += bias.to(acc_dtype)
    return logits
