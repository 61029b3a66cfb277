"""Hand-written activation checkpointing for `Block`s, aware of DropBP's dropped branches.

A checkpointed block runs its forward without recording a graph and saves only the tensor its backward starts from
(the block input, or the residual stream after a dropped attention branch), optionally in CPU memory. The backward
recomputes the *kept* branches with grad enabled, under the forward's RNG and autocast state, and differentiates
them: a dropped branch is never recomputed, so DropBP's savings survive checkpointing.

Gradients are returned through autograd (the block's trainable parameters are inputs of the Function), not
accumulated into `.grad` behind its back, so `torch.autograd.grad`, gradient hooks and DDP's reducer all see them.
"""

from __future__ import annotations

import functools
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Sequence

import torch
import torch.nn as nn

from lit_model.model import Block


def apply_activation_checkpointing(model: nn.Module, every: int = 1, offload: bool = False) -> None:
    """Checkpoint every `every`-th block of `model` (blocks 0, every, 2 * every, ...); `every=0` turns it off.

    offload: keep each checkpointed block's saved input in CPU memory (pinned, copied asynchronously when on CUDA)
        and bring it back for the backward; trades host-device transfers for accelerator memory.
    Checkpointing applies to training forwards only (grad enabled, no KV cache); generation is unaffected.
    """
    if every < 0:
        raise ValueError(f"every must be >= 0 (0 turns checkpointing off, k checkpoints every k-th block), got {every}")
    blocks = [m for m in model.modules() if isinstance(m, Block)]
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no lit_model Block to checkpoint: pass the GPT model")
    fn = functools.partial(checkpoint_block, offload=offload)
    for i, block in enumerate(blocks):
        block.checkpoint_fn = fn if every and i % every == 0 else None


def remove_activation_checkpointing(model: nn.Module) -> None:
    """Turn activation checkpointing off in every block of `model`."""
    for m in model.modules():
        if isinstance(m, Block):
            m.checkpoint_fn = None


def checkpoint_block(
    block: Block,
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    drop_attn: bool = False,
    drop_mlp: bool = False,
    segments: Optional[Sequence[int]] = None,
    offload: bool = False,
) -> torch.Tensor:
    """`block.compute(x, cos, sin, None, drop_attn, drop_mlp, segments)`, saving only what recomputing the kept branches needs.

    This is the `Block.checkpoint_fn` that `apply_activation_checkpointing` installs.
    """
    params = _kept_trainable_params(block, drop_attn, drop_mlp)
    if drop_attn and drop_mlp or not (params or x.requires_grad):
        # Nothing to recompute: the plain block already saves nothing (both branches run under no_grad), or there is
        # no gradient to compute at all.
        return block.compute(x, cos, sin, None, drop_attn, drop_mlp, segments)
    spec = _Spec(block, drop_attn, drop_mlp, offload, params, segments)
    return _CheckpointedBlock.apply(spec, x, cos, sin, *params)


@dataclass
class _Spec:
    block: Block
    drop_attn: bool
    drop_mlp: bool
    offload: bool
    params: list[nn.Parameter]
    segments: Optional[Sequence[int]] = None  # packed sequences (see lit_model.model.GPT.hidden_states)


def _kept_trainable_params(block: Block, drop_attn: bool, drop_mlp: bool) -> list[nn.Parameter]:
    """Trainable parameters the recomputation differentiates: the kept branches', and any the block has of its own.

    A dropped branch's parameters are left out, so they get no gradient, exactly as without checkpointing.
    Frozen parameters (LoRA's base, 4-bit `Params4bit`) are used in the recomputation as constants.
    """
    branches = {"norm_1": drop_attn, "attn": drop_attn, "norm_2": drop_mlp, "mlp": drop_mlp}
    params: list[nn.Parameter] = []
    for name, p in block.named_parameters():
        if p.requires_grad and not branches.get(name.split(".", 1)[0], False):
            params.append(p)
    return params


class _CheckpointedBlock(torch.autograd.Function):
    """Forward without a graph; backward recomputes the kept branches and differentiates them."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, spec: _Spec, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *params: torch.Tensor
    ) -> torch.Tensor:
        block = spec.block
        ctx.spec = spec
        ctx.autocast = _autocast_state(x.device.type)
        # The forward order of `Block.compute`, with the RNG state captured before each branch the backward reruns,
        # so that dropout inside it (e.g. LoRA's) draws the same mask again.
        ctx.rng_attn = None if spec.drop_attn else _rng_state(x.device)
        a = block.attn_branch(x, cos, sin, None, spec.segments)
        if block.parallel_residual:
            ctx.rng_mlp = None if spec.drop_mlp else _rng_state(x.device)
            out = x + a + block.mlp_branch(x)
            start = x
        else:
            h = x + a
            ctx.rng_mlp = None if spec.drop_mlp else _rng_state(x.device)
            out = h + block.mlp_branch(h)
            # With the attention dropped, only the MLP is rerun: it starts from the residual after attention.
            start = h if spec.drop_attn else x
        ctx.device = x.device
        ctx.save_for_backward(_to_host(start) if spec.offload else start, cos, sin)
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Optional[torch.Tensor], ...]:  # type: ignore[override]
        spec: _Spec = ctx.spec
        block = spec.block
        saved, cos, sin = ctx.saved_tensors
        need_x = ctx.needs_input_grad[1]
        start = saved.to(ctx.device, non_blocking=True).detach().requires_grad_(need_x)
        with torch.enable_grad(), _autocast(ctx.autocast):
            if block.parallel_residual:
                out = start
                if not spec.drop_attn:
                    with _rng_restored(ctx.rng_attn, ctx.device):
                        out = out + block.attn_branch(start, cos, sin, None, spec.segments)
                if not spec.drop_mlp:
                    with _rng_restored(ctx.rng_mlp, ctx.device):
                        out = out + block.mlp_branch(start)
            else:
                out = start
                if not spec.drop_attn:
                    with _rng_restored(ctx.rng_attn, ctx.device):
                        out = start + block.attn_branch(start, cos, sin, None, spec.segments)
                if not spec.drop_mlp:  # a dropped MLP adds a constant: its gradient path is the identity
                    with _rng_restored(ctx.rng_mlp, ctx.device):
                        out = out + block.mlp_branch(out)
        inputs = ([start] if need_x else []) + list(spec.params)
        if not out.requires_grad:  # the kept branches use none of the trainable parameters: nothing flows
            return (None, None, None, None, *([None] * len(spec.params)))
        grads = list(torch.autograd.grad(out, inputs, grad_out, allow_unused=True))
        grad_x = grads.pop(0) if need_x else None
        return (None, grad_x, None, None, *grads)


def _to_host(t: torch.Tensor) -> torch.Tensor:
    """A CPU copy of an accelerator tensor (pinned, asynchronous: the stream orders it before any reuse of `t`)."""
    if t.device.type == "cpu":
        return t  # already in host memory
    host = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=t.device.type == "cuda")
    host.copy_(t, non_blocking=True)
    return host


# ---- RNG and autocast state ----------------------------------------------------------------------------------------

_RngState = tuple[torch.Tensor, Optional[torch.Tensor]]


def _rng_state(device: torch.device) -> _RngState:
    """The CPU generator's state and, for an accelerator tensor, its device generator's state."""
    device_state = None
    if device.type != "cpu":
        device_state = torch.get_device_module(device.type).get_rng_state(device)
    return torch.get_rng_state(), device_state


@contextmanager
def _rng_restored(state: Optional[_RngState], device: torch.device) -> Iterator[None]:
    """Run with the generators set to `state`, then put back what they were: the backward leaves RNGs untouched."""
    if state is None:
        yield
        return
    current = _rng_state(device)
    _set_rng_state(state, device)
    try:
        yield
    finally:
        _set_rng_state(current, device)


def _set_rng_state(state: _RngState, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.get_device_module(device.type).set_rng_state(state[1], device)


_AutocastState = list[tuple[str, bool, torch.dtype, bool]]


def _autocast_state(device_type: str) -> _AutocastState:
    """Autocast settings (device type, enabled, dtype, cache) of the tensor's device and of the CPU."""
    cache = torch.is_autocast_cache_enabled()
    return [
        (dt, torch.is_autocast_enabled(dt), torch.get_autocast_dtype(dt), cache)
        for dt in dict.fromkeys((device_type, "cpu"))
    ]


@contextmanager
def _autocast(state: _AutocastState) -> Iterator[None]:
    """Recompute under the forward's autocast state (the backward runs on a thread with its own, usually none)."""
    with ExitStack() as stack:
        for device_type, enabled, dtype, cache in state:
            stack.enter_context(torch.autocast(device_type, dtype=dtype, enabled=enabled, cache_enabled=cache))
        yield

