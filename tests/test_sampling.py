"""Sampling: greedy with and without the KV cache, top-k / top-p, stop sequences and their errors."""

import pytest
import torch

from lit_model import GPT, Config
from lit_model.sampling import generate, generate_tokens, sample_next


def test_top_k_and_top_p_restrict_the_support() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    gen = torch.Generator().manual_seed(0)
    draws = {int(sample_next(logits, 1.0, top_k=2, generator=gen)) for _ in range(200)}
    assert draws == {0, 1}
    draws = {int(sample_next(logits, 1.0, top_p=0.7, generator=gen)) for _ in range(200)}
    assert draws == {0, 1}  # 0.5 < 0.7 so the second token is needed; 0.8 >= 0.7 so the third is not
    draws = {int(sample_next(logits, 1.0, top_p=0.4, generator=gen)) for _ in range(50)}
    assert draws == {0}
    assert int(sample_next(logits, 0.0)) == 0
    with pytest.raises(ValueError, match="0 < top_p <= 1"):
        sample_next(logits, 1.0, top_p=0.0)


def test_stop_sequences_end_generation_and_are_not_yielded(monkeypatch) -> None:
    model = GPT(Config(n_layer=1, n_head=2, n_embd=8, vocab_size=20, block_size=32))
    model.init_weights(0.2)
    free = generate(model, torch.tensor([1, 2, 3]), 12)
    assert len(free) == 12
    stop = free[4:6]
    # The first occurrence of the 2-token stop sequence ends the output right before it.
    first = next(i for i in range(len(free) - 1) if free[i : i + 2] == stop)
    assert generate(model, torch.tensor([1, 2, 3]), 12, stop_tokens=[stop]) == free[:first]
    assert list(generate_tokens(model, torch.tensor([1, 2, 3]), 12, use_kv_cache=False)) == free
    assert model.transformer.h[0].attn.kv_cache is None  # the cache is released afterwards


def test_prompt_errors() -> None:
    model = GPT(Config(n_layer=1, n_head=2, n_embd=8, vocab_size=20, block_size=8))
    with pytest.raises(ValueError, match="exceeds the model's block_size 8"):
        generate(model, torch.tensor([1, 2, 3]), 6)
    with pytest.raises(ValueError, match="non-empty 1-D tensor"):
        generate(model, torch.tensor([[1, 2]]), 2)
