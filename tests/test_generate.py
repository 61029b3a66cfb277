"""Greedy generation with our KV cache equals generation without it and equals transformers' greedy tokens."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lit_model.sampling import generate, generate_tokens
from tests.hf_models import ARCHITECTURES, convert, make_hf_model


@pytest.mark.parametrize("variant", ARCHITECTURES)
def test_greedy_generation_matches_transformers(variant: str, tmp_path: Path) -> None:
    hf_model, directory = make_hf_model(variant, tmp_path)
    ours = convert(directory)
    # 12 new tokens from a 6-token prompt crosses the small sliding windows of the mistral/phi3 variants.
    prompt = torch.randint(0, hf_model.config.vocab_size, (6,), generator=torch.Generator().manual_seed(3))
    cached = generate(ours, prompt, max_new_tokens=12)
    uncached = list(generate_tokens(ours, prompt, 12, use_kv_cache=False))
    with torch.no_grad():
        reference = hf_model.generate(
            prompt[None], max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0,
            attention_mask=torch.ones(1, 6, dtype=torch.long),
        )[0, 6:].tolist()
    assert cached == uncached
    assert cached == reference
