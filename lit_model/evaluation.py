"""Evaluation during and after fine-tuning: validation loss, held-out exact match, a sample generation."""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from lit_model.model import GPT



@torch.no_grad()
def validate(
    fabric: Any,
    model: Any,
    val_data: Any,
    batch_size: int,
    batch_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    max_iters: Optional[int] = None,
) -> float:
    """Token-weighted mean cross-entropy over the validation set (or its first `max_iters` batches).

    batch_loss(input_ids, targets) gives one batch's mean loss through `model` (lit_model.training.forward_loss).
    Every rank skips the same label-free batches, so forwards that gather shards (FSDP) stay in step.
    """
    from lit_model.data import IGNORE_INDEX, collate

    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    starts = range(0, len(val_data), batch_size)
    for start in starts[:max_iters] if max_iters is not None else starts:
        batch = collate([val_data[i] for i in range(start, min(start + batch_size, len(val_data)))])
        target = fabric.to_device(batch["labels"][:, 1:])
        n = int((target != IGNORE_INDEX).sum())
        if n:
            total += float(batch_loss(fabric.to_device(batch["input_ids"][:, :-1]), target)) * n
            count += n
    model.train(was_training)
    return total / max(count, 1)


def complete(model: GPT, tokenizer: Any, prompt_style: Any, record: dict, max_new_tokens: int, device: Any) -> str:
    """The greedy completion of one record's prompt (instruction and optional input)."""
    from lit_model.sampling import generate

    text = prompt_style.apply(record["instruction"], record.get("input", ""))
    prompt = tokenizer.encode(text, bos=prompt_style.adds_bos, device=device, special=prompt_style.special_in_text)
    budget = min(max_new_tokens, model.config.block_size - prompt.numel())
    if budget <= 0:
        return ""  # the prompt alone fills the context: nothing can be generated
    out = generate(model, prompt, budget, temperature=0.0, stop_tokens=prompt_style.stop_tokens(tokenizer))
    return tokenizer.decode(out)


def exact_match(model: GPT, tokenizer: Any, prompt_style: Any, records: list[dict], max_new_tokens: int, device: Any) -> float:
    """Share of records whose greedy completion equals the reference output (after stripping whitespace).

    Each completion is cut a few tokens past the reference's own length: a longer one can no longer match (the
    slack covers a differently split answer and trailing whitespace), and a model that rambles before it has learned
    to stop would otherwise cost `max_new_tokens` per record.
    """
    from lit_model.demo_tasks import exact_match as is_match

    hits = 0
    for r in records:
        budget = min(max_new_tokens, len(tokenizer.encode(r["output"], bos=False)) + 8)
        hits += is_match(complete(model, tokenizer, prompt_style, r, budget, device), r["output"])
    return hits / max(len(records), 1)
