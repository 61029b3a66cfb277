"""Autoregressive sampling with the KV cache: temperature, top-k, top-p, stop sequences, streaming."""

from __future__ import annotations

from typing import Iterator, Optional, Sequence

import torch

from lit_model.model import GPT


def sample_next(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    top_p: float = 1.0,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Next token ids (B,) from last-position logits (B, V). temperature 0 means greedy (argmax)."""
    if temperature < 0 or not 0.0 < top_p <= 1.0 or (top_k is not None and top_k <= 0):
        raise ValueError(f"Need temperature >= 0, 0 < top_p <= 1, top_k > 0; got {temperature}, {top_p}, {top_k}")
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # Drop a token once the mass before it already reaches top_p; the most likely token always stays.
        remove = (cumulative - sorted_logits.softmax(dim=-1)) >= top_p
        sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


@torch.inference_mode()
def generate_tokens(
    model: GPT,
    prompt: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: Optional[int] = None,
    top_p: float = 1.0,
    stop_tokens: Sequence[Sequence[int]] = (),
    generator: Optional[torch.Generator] = None,
    use_kv_cache: bool = True,
) -> Iterator[int]:
    """Yield new token ids one at a time for a 1-D `prompt`, stopping at a stop sequence (not yielded) or after
    `max_new_tokens`. Tokens that may begin a stop sequence are held back until it is clear they do not.

    The model is put in eval mode and given a KV cache sized prompt + max_new_tokens for the duration; both are
    restored afterwards. `use_kv_cache=False` recomputes the whole sequence each step (a reference for tests).
    """
    if prompt.ndim != 1 or prompt.numel() == 0:
        raise ValueError(f"prompt must be a non-empty 1-D tensor of token ids, got shape {tuple(prompt.shape)}")
    total = prompt.numel() + max_new_tokens
    block_size = model.config.block_size
    if total > block_size:
        raise ValueError(
            f"Prompt ({prompt.numel()} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's block_size "
            f"{block_size}: shorten the prompt or lower --max_new_tokens"
        )
    stops = [list(s) for s in stop_tokens if len(s) > 0]
    longest_stop = max((len(s) for s in stops), default=0)
    was_training = model.training
    model.eval()
    device = prompt.device
    if use_kv_cache:
        model.set_kv_cache(batch_size=1, max_seq_length=total, device=device)
    try:
        tokens = prompt.tolist()
        pending: list[int] = []  # generated but not yet yielded: might be the start of a stop sequence
        input_ids, input_pos = prompt, torch.arange(prompt.numel(), device=device)
        for _ in range(max_new_tokens):
            if use_kv_cache:
                logits = model(input_ids[None], input_pos=input_pos)[0, -1]
            else:
                logits = model(torch.tensor(tokens, device=device)[None])[0, -1]
            token = int(sample_next(logits[None], temperature, top_k, top_p, generator)[0])
            tokens.append(token)
            pending.append(token)
            if any(pending[-len(s):] == s for s in stops if len(pending) >= len(s)):
                return  # the stop sequence itself is not yielded
            # Yield everything that can no longer be the beginning of a stop sequence.
            keep = 0
            for n in range(min(len(pending), longest_stop - 1), 0, -1):
                if any(s[:n] == pending[-n:] for s in stops if len(s) > n):
                    keep = n
                    break
            for t in pending[: len(pending) - keep]:
                yield t
            pending = pending[len(pending) - keep :]
            input_ids = torch.tensor([token], device=device)
            input_pos = torch.tensor([len(tokens) - 1], device=device)
        yield from pending
    finally:
        if use_kv_cache:
            model.clear_kv_cache()
        model.train(was_training)


def generate(
    model: GPT,
    prompt: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: Optional[int] = None,
    top_p: float = 1.0,
    stop_tokens: Sequence[Sequence[int]] = (),
    generator: Optional[torch.Generator] = None,
) -> list[int]:
    """All new token ids (see `generate_tokens`)."""
    return list(generate_tokens(model, prompt, max_new_tokens, temperature, top_k, top_p, stop_tokens, generator))
