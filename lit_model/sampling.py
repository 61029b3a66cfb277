"""Autoregressive sampling with the KV cache: temperature, top-k, top-p, stop sequences, streaming; a cache kept
across the turns of a chat (`KVSession`)."""

from __future__ import annotations

from typing import Callable, Iterator, Optional, Sequence

import torch

from lit_model.model import GPT, KVCache


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
    was_training = model.training
    model.eval()
    device = prompt.device
    if use_kv_cache:
        model.set_kv_cache(batch_size=1, max_seq_length=total, device=device)
    tokens: list[int] = []  # the sequence fed so far

    def step(new: list[int]) -> torch.Tensor:
        start = len(tokens)
        tokens.extend(new)
        if not use_kv_cache:  # the reference: the whole sequence again
            return model(torch.tensor(tokens, device=device)[None])[0, -1]
        input_pos = torch.arange(start, len(tokens), device=device)
        return model(torch.tensor(new, device=device)[None], input_pos=input_pos)[0, -1]

    try:
        yield from _sample_loop(step, prompt.tolist(), max_new_tokens, temperature, top_k, top_p, stop_tokens,
                                generator)
    finally:
        if use_kv_cache:
            model.clear_kv_cache()
        model.train(was_training)


def _sample_loop(
    step: Callable[[list[int]], torch.Tensor],
    prompt: list[int],
    max_new_tokens: int,
    temperature: float,
    top_k: Optional[int],
    top_p: float,
    stop_tokens: Sequence[Sequence[int]],
    generator: Optional[torch.Generator],
) -> Iterator[int]:
    """The sampling loop of `generate_tokens` and `KVSession.generate`. `step(ids)` feeds ids at the next positions
    and returns the last one's logits (V,): the prompt first, then each sampled token but the last (a token is fed
    only when another is wanted after it, so a stop token never enters the cache)."""
    stops = [list(s) for s in stop_tokens if len(s) > 0]
    longest_stop = max((len(s) for s in stops), default=0)
    pending: list[int] = []  # generated but not yet yielded: might be the start of a stop sequence
    feed = prompt
    for _ in range(max_new_tokens):
        logits = step(feed)
        token = int(sample_next(logits[None], temperature, top_k, top_p, generator)[0])
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
        feed = [token]
    yield from pending


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


class KVSession:
    """A KV cache kept across generations, as a chat needs: it knows the ids whose keys and values it holds
    (`tokens`), so each prompt feeds the model only what follows the longest prefix it shares with them.

    A prompt that extends the cached ids (the next turn of a conversation) costs only its new tokens. One that
    differs from them at some position (a template that re-renders an earlier turn, a tokenizer that merges across
    the old end, an answer whose text re-encodes to other ids than the model sampled) is fed from the first differing
    position: the cache is rolled back by forgetting its later entries, which the next tokens overwrite and which no
    query attends to before then (attention is causal in the positions). So a generation always sees exactly the
    keys and values of its own prompt, as `generate_tokens` on the same prompt would.

    The session owns its cache: it is put into the model's attention layers while one of its generations runs and
    taken out afterwards (whatever cache the model had is put back), so other uses of the model in between
    (`generate_tokens`, training) neither see nor destroy it. It grows with the sequence (doubling, up to
    `max_seq_length`, default the model's block_size), so memory and each step's attention follow the
    conversation's length, not the limit. The model is in eval mode while a generation runs; `close` frees the cache.
    """

    def __init__(self, model: GPT, max_seq_length: Optional[int] = None, device: Optional[torch.device] = None) -> None:
        block_size = model.config.block_size
        self.max_seq_length = max_seq_length or block_size
        if not 0 < self.max_seq_length <= block_size:
            raise ValueError(f"max_seq_length must be between 1 and the model's block_size {block_size}, "
                             f"got {self.max_seq_length}")
        self.model = model
        self.device = device if device is not None else model.lm_head.weight.device
        self.tokens: list[int] = []  # the ids at positions 0..len-1 of the cache, each fed in full
        self.reused = 0  # how many ids of the last prompt came from the cache
        self.capacity = 0  # the positions allocated (0: no cache yet)
        self._caches: list[Optional[KVCache]] = []  # one per attention layer, while allocated

    def reset(self) -> None:
        """Forget the cached ids (the memory stays allocated for the next prompt)."""
        self.tokens = []

    def close(self) -> None:
        """Free the cache."""
        self.tokens, self.capacity, self._caches = [], 0, []

    def _swap(self, caches: Sequence[Optional[KVCache]]) -> list[Optional[KVCache]]:
        """Put `caches` into the model's attention layers; return what they held."""
        attentions = [block.attn for block in self.model.blocks]
        previous = [attn.kv_cache for attn in attentions]
        for attn, cache in zip(attentions, caches):
            attn.kv_cache = cache
        return previous

    def _reserve(self, n: int) -> None:
        """Room for n positions in the installed cache, keeping what it holds."""
        if n <= self.capacity:
            return
        size = min(max(n, 2 * self.capacity), self.max_seq_length)
        if not self._caches:
            self.model.set_kv_cache(batch_size=1, max_seq_length=size, device=self.device)
            self._caches = [block.attn.kv_cache for block in self.model.blocks]
        else:
            for cache in self._caches:
                assert cache is not None
                cache.resize(size)
        self.capacity = size

    @torch.inference_mode()
    def generate(
        self,
        prompt: Sequence[int],
        max_new_tokens: int,
        temperature: float = 0.0,
        top_k: Optional[int] = None,
        top_p: float = 1.0,
        stop_tokens: Sequence[Sequence[int]] = (),
        generator: Optional[torch.Generator] = None,
    ) -> Iterator[int]:
        """Yield new token ids for `prompt` (token ids) as `generate_tokens` does, reusing the cached prefix.

        Afterwards `tokens` holds the prompt and the generated ids that were fed (all but the last sampled one, and
        never a stop token). An interrupted generation (an exception, or the generator closed early) leaves `tokens`
        true to what the cache holds, so the next prompt may build on it.
        """
        prompt = [int(t) for t in prompt]
        if not prompt:
            raise ValueError("prompt must hold at least one token id")
        if len(prompt) + max_new_tokens > self.max_seq_length:
            raise ValueError(
                f"Prompt ({len(prompt)} tokens) + max_new_tokens ({max_new_tokens}) exceeds the session's "
                f"max_seq_length {self.max_seq_length}: shorten the prompt or lower --max_new_tokens"
            )
        keep = 0
        for cached, new in zip(self.tokens, prompt):
            if cached != new:
                break
            keep += 1
        keep = min(keep, len(prompt) - 1)  # the prompt's last id is fed again: its logits are not cached
        del self.tokens[keep:]
        self.reused = keep
        model, device = self.model, self.device

        def step(new: list[int]) -> torch.Tensor:
            start = len(self.tokens)
            input_pos = torch.arange(start, start + len(new), device=device)
            logits = model(torch.tensor(new, device=device)[None], input_pos=input_pos)[0, -1]
            self.tokens.extend(new)  # only once the forward has written them: an interrupt leaves tokens truthful
            return logits

        was_training = model.training
        model.eval()
        previous = self._swap(self._caches or [None] * len(model.blocks))
        try:
            self._reserve(len(prompt) + max_new_tokens)
            yield from _sample_loop(step, prompt[keep:], max_new_tokens, temperature, top_k, top_p, stop_tokens,
                                    generator)
        finally:
            self._swap(previous)
            model.train(was_training)
