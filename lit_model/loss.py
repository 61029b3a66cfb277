"""Chunked cross-entropy: the LM head and the loss without ever holding full (B, T, V) logits.

With a 128k vocabulary, fp32 logits of a batch of 8 x 2048 tokens take 8 GiB, and autograd keeps them (and the
softmax) for the backward. Here the head runs over `chunk_size` tokens at a time inside one autograd Function;
peak extra memory is one chunk of logits, not N x V. As soon as a chunk's logits exist, they are turned into the
gradient of the loss (softmax minus one-hot) and multiplied through, so the forward hands the backward finished
gradients (the "fused linear cross-entropy" of Liger-Kernel, here in plain PyTorch); the alternative, saving only
the inputs and the logsumexp and recomputing each chunk in the backward (Cut Cross-Entropy, Wijmans et al., 2024),
costs one more N x C x V product for the same memory and is kept behind `grad_in_forward=False`.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from lit_model.peft.base import effective_weight


def chunked_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    chunk_size: int = 1024,
    ignore_index: int = -100,
    grad_in_forward: bool = True,
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
    grad_in_forward: compute the gradients of hidden, weight and bias in the forward (when they need one), so the
        backward need not recompute the logits; False recomputes them in the backward. Same memory, same values
        (see `_ChunkedCrossEntropy`); False is there to measure the difference (scripts/benchmark.py --ablate).

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
    # Under no_grad (validation) the Function still sees inputs that require grad: skip the gradient work there.
    grad_in_forward = grad_in_forward and torch.is_grad_enabled()
    return _ChunkedCrossEntropy.apply(flat, weight, bias, targets, valid, chunk_size, mm_dtype, grad_in_forward)


def head_loss(
    head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, chunk_size: int = 1024, grad_in_forward: bool = True
) -> torch.Tensor:
    """`chunked_cross_entropy` of the LM head `head` (plain or LoRA, see `lm_head_weight`) on final hidden states."""
    weight, bias = lm_head_weight(head)
    return chunked_cross_entropy(hidden, weight, targets, bias, chunk_size=chunk_size, grad_in_forward=grad_in_forward)


def lm_head_weight(head: nn.Module) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The effective (weight, bias) of an LM head, to pass to `chunked_cross_entropy`.

    A plain `nn.Linear` gives its own parameters; an unmerged adapter on the head (lit_model.peft.base.Adapter) adds
    its update, differentiable in the adapter's tensors, so they train through the chunked loss. Adapter dropout is
    not applied on this path (the loss sees the head as with dropout 0): dropout acts on the head's input, which a
    merged weight cannot express.
    """
    if not head.weight.is_floating_point():
        raise TypeError(
            f"The LM head weight has dtype {head.weight.dtype}: a quantized head is not supported by the chunked loss. "
            "Keep the LM head dense (unquantized), or pass its dequantized weight."
        )
    return effective_weight(head)


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Per-chunk logits -> logsumexp, the summed loss and, when `grad_in_forward`, the gradients already.

    The loss is a scalar at the end of the graph: its gradient with respect to the logits of a chunk,
    (softmax - onehot) / n_valid, is known the moment the chunk's logits are, so the forward turns it into the
    gradients of hidden, weight and bias right away and the backward only multiplies them by the incoming scalar.
    That saves the recomputation of every chunk's logits (one N x C x V product; 1/3 of the head's FLOPs for full
    fine-tuning, 1/2 for a frozen head) at the same memory: the saved N x C hidden becomes the N x C gradient, and
    the weight gradient (allocated in the backward otherwise) exists from the end of the forward instead.
    Without `grad_in_forward` (or when nothing needs a gradient) the backward recomputes each chunk's logits.
    """

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
        grad_in_forward: bool,
    ) -> torch.Tensor:
        acc_dtype = torch.promote_types(mm_dtype, torch.float32)
        N = hidden.size(0)
        lse = torch.empty(N, dtype=acc_dtype, device=hidden.device)
        total = torch.zeros((), dtype=acc_dtype, device=hidden.device)
        n_valid = valid.sum()
        grads = (_GradBuffers(hidden, weight, *ctx.needs_input_grad[:3], acc_dtype, single=N <= chunk_size)
                 if grad_in_forward else None)
        if grads is not None and not grads.any:
            grads = None
        scale = 1.0 / n_valid.clamp(min=1).to(acc_dtype)
        w = weight.to(mm_dtype)  # a no-op unless autocast or mixed operand dtypes ask for a cast
        # autocast would re-cast inside the loop; the dtypes are already decided.
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, N, chunk_size):
                end = min(start + chunk_size, N)
                h = hidden[start:end].to(mm_dtype)
                logits = _chunk_logits(h, w, bias, acc_dtype)  # (n, V)
                tgt = torch.where(valid[start:end], targets[start:end], 0)
                target_logit = logits.gather(1, tgt[:, None]).squeeze(1)  # (n,)
                # The logits become exp(logits - max) in place: the logsumexp and the softmax both come from it.
                lse[start:end], inv_sum = _exp_shifted_(logits)
                total += ((lse[start:end] - target_logit) * valid[start:end]).sum()
                if grads is not None:  # ... and then, in place, their gradient
                    grads.add_chunk(start, end, _softmax_grad_(logits, inv_sum, tgt, valid[start:end], scale),
                                    h, w, mm_dtype)
        ctx.mm_dtype, ctx.chunk_size = mm_dtype, chunk_size
        ctx.grad_in_forward = grads is not None
        if grads is not None:
            ctx.save_for_backward(*grads.finish(weight, bias))
        else:
            ctx.save_for_backward(hidden, weight, bias, targets, valid, lse, n_valid)
        # All targets ignored: 0 / 1 = 0 instead of 0 / 0 = NaN, and the backward gives zero gradients.
        return total * scale

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad_loss: torch.Tensor
    ) -> tuple[Optional[torch.Tensor], ...]:
        if ctx.grad_in_forward:  # d loss / d input is known: scale it by d out / d loss
            grads = tuple(None if g is None else g * grad_loss.to(g.dtype) for g in ctx.saved_tensors)
            return (*grads, None, None, None, None, None)
        hidden, weight, bias, targets, valid, lse, n_valid = ctx.saved_tensors
        mm_dtype, chunk_size = ctx.mm_dtype, ctx.chunk_size
        acc_dtype = lse.dtype
        grads = _GradBuffers(hidden, weight, *ctx.needs_input_grad[:3], acc_dtype)
        if grads.any:
            scale = grad_loss.to(acc_dtype) / n_valid.clamp(min=1)
            w = weight.to(mm_dtype)
            with torch.autocast(hidden.device.type, enabled=False):
                for start in range(0, hidden.size(0), chunk_size):
                    end = min(start + chunk_size, hidden.size(0))
                    h = hidden[start:end].to(mm_dtype)
                    ok = valid[start:end]
                    tgt = torch.where(ok, targets[start:end], 0)
                    g = _logits_grad_(_chunk_logits(h, w, bias, acc_dtype), lse[start:end], tgt, ok, scale)
                    grads.add_chunk(start, end, g, h, w, mm_dtype)
        return (*grads.finish(weight, bias), None, None, None, None, None)


class _GradBuffers:
    """The gradients of hidden, weight and bias being built chunk by chunk (None for inputs that need none)."""

    def __init__(self, hidden: torch.Tensor, weight: torch.Tensor, need_h: bool, need_w: bool, need_b: bool,
                 acc_dtype: torch.dtype, single: bool = False) -> None:
        self.h = torch.empty_like(hidden) if need_h else None
        # The weight gradient sums over all chunks: accumulated in float32 from the first chunk's product (no zeroed
        # V x C buffer), cast once at the end. With one chunk there is nothing to sum: its product, which the matmul
        # accumulated in float32 already, is the gradient, in the product's dtype as nn.Linear's would be.
        self.need_w, self.single, self.acc_dtype = need_w, single, acc_dtype
        self.w: Optional[torch.Tensor] = None
        self.b = torch.zeros(weight.size(0), dtype=acc_dtype, device=weight.device) if need_b else None
        self.any = need_h or need_w or need_b

    def add_chunk(self, start: int, end: int, g: torch.Tensor, h: torch.Tensor, w: torch.Tensor,
                  mm_dtype: torch.dtype) -> None:
        """Add the contribution of rows start:end, whose loss gradient with respect to their logits is g (n, V)."""
        if self.b is not None:
            self.b += g.sum(0)
        g_mm = g.to(mm_dtype)
        if self.h is not None:
            self.h[start:end] = (g_mm @ w).to(self.h.dtype)  # (n, C)
        if self.need_w:
            product = g_mm.t() @ h  # (V, C)
            if self.w is None:
                self.w = product if self.single else product.to(self.acc_dtype)
            else:
                self.w += product  # into the float32 sum (an in-place add promotes, no copy of the product)

    def finish(self, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> tuple[Optional[torch.Tensor], ...]:
        if self.need_w and self.w is None:  # no chunk at all (an empty batch)
            self.w = torch.zeros(weight.shape, dtype=self.acc_dtype, device=weight.device)
        return (
            self.h,
            self.w.to(weight.dtype) if self.w is not None else None,
            self.b.to(bias.dtype) if self.b is not None and bias is not None else None,
        )


def _exp_shifted_(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn a chunk's logits (n, V), in place, into exp(logits - rowmax); return the rows' logsumexp and
    1 / sum(exp(logits - rowmax)). The same arithmetic as torch.logsumexp, but the exponentials stay for the softmax
    (torch.logsumexp allocates and discards them: on CPU it took 3x as long as this)."""
    top = logits.amax(dim=-1)  # (n,)
    sums = logits.sub_(top[:, None]).exp_().sum(dim=-1)  # (n,), each >= 1
    return top + sums.log(), sums.reciprocal()


def _softmax_grad_(
    exp_shifted: torch.Tensor, inv_sum: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor, scale: torch.Tensor
) -> torch.Tensor:
    """`_logits_grad_` from what `_exp_shifted_` left: softmax = exp_shifted * inv_sum, in place, in one pass."""
    ok = valid.to(exp_shifted.dtype) * scale
    g = exp_shifted.mul_((inv_sum * ok)[:, None])
    g[torch.arange(g.size(0), device=g.device), targets] -= ok
    return g


def _logits_grad_(
    logits: torch.Tensor, lse: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor, scale: torch.Tensor
) -> torch.Tensor:
    """Turn a chunk's logits (n, V), in place, into d loss / d logits = (softmax - onehot(target)) * scale on the
    counted rows and 0 on the ignored ones. `targets` must already point ignored rows at a valid class."""
    g = logits.sub_(lse[:, None]).exp_()
    ok = valid.to(g.dtype)
    g[torch.arange(g.size(0), device=g.device), targets] -= ok
    return g.mul_((ok * scale)[:, None])


def _chunk_logits(
    hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], acc_dtype: torch.dtype
) -> torch.Tensor:
    """Logits (n, V) of one chunk in `acc_dtype`; the product runs in the weight's dtype (fp32 accumulation)."""
    logits = (hidden.to(weight.dtype) @ weight.t()).to(acc_dtype)
    if bias is not None:
        logits += bias.to(acc_dtype)
    return logits
