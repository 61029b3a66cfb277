"""Evaluation during and after fine-tuning: validation loss, held-out exact match, a sample generation.

The greedy completions work on conversations (lit_model.data.records): the prompt is everything before the last
assistant message, the reference that message.
"""

from __future__ import annotations

import torch

from lit_model.data import IGNORE_INDEX, Conversation, collate
from lit_model.data.demo_tasks import exact_match as is_match
from lit_model.prompts import PromptStyle
from lit_model.sampling import generate
from lit_model.tokenizer import Tokenizer
from lit_model.train.dist import forward_loss
from lit_model.train.session import Session


@torch.no_grad()
def validate(s: Session) -> float:
    """Token-weighted mean cross-entropy over the validation set (or its first --eval.max_iters batches).

    Every rank skips the same label-free batches, so forwards that gather shards (FSDP) stay in step.
    """
    fabric, model, data, batch_size = s.fabric, s.model, s.val_data, s.job.train.micro_batch_size
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    starts = range(0, len(data), batch_size)
    for start in starts[: s.job.eval.max_iters] if s.job.eval.max_iters is not None else starts:
        batch = collate([data[i] for i in range(start, min(start + batch_size, len(data)))])
        target = fabric.to_device(batch["labels"][:, 1:])
        n = int((target != IGNORE_INDEX).sum())
        if n:
            total += float(forward_loss(fabric, model, fabric.to_device(batch["input_ids"][:, :-1]), target)) * n
            count += n
    model.train(was_training)
    return total / max(count, 1)


def complete(model: torch.nn.Module, tokenizer: Tokenizer, style: PromptStyle, conversation: Conversation,
             max_new_tokens: int, device: torch.device) -> str:
    """The greedy completion of a conversation's prompt: everything before its last assistant message."""
    # Encoded as training and chat encode a conversation (a named style's earlier answers end with EOS there too).
    prompt = torch.tensor(style.prompt_ids(_prompt_part(conversation), tokenizer), device=device)
    budget = min(max_new_tokens, model.config.block_size - prompt.numel())
    if budget <= 0:
        return ""  # the prompt alone fills the context: nothing can be generated
    out = generate(model, prompt, budget, temperature=0.0, stop_tokens=style.stop_tokens(tokenizer))
    return tokenizer.decode(out)


def exact_match(model: torch.nn.Module, tokenizer: Tokenizer, style: PromptStyle, conversations: list[Conversation],
                max_new_tokens: int, device: torch.device) -> float:
    """Share of conversations whose greedy completion equals the last answer (after stripping whitespace).

    Each completion is cut a few tokens past the reference's own length: a longer one can no longer match (the
    slack covers a differently split answer and trailing whitespace), and a model that rambles before it has learned
    to stop would otherwise cost `max_new_tokens` per record.
    """
    hits = 0
    for conversation in conversations:
        reference = conversation[-1]["content"]
        budget = min(max_new_tokens, len(tokenizer.encode(reference, bos=False)) + 8)
        hits += is_match(complete(model, tokenizer, style, conversation, budget, device), reference)
    return hits / max(len(conversations), 1)


def evaluate_exact_match(s: Session, conversations: list[Conversation]) -> float:
    """`exact_match` with the run's model, tokenizer, style and budget."""
    return exact_match(s.inference_model, s.tokenizer, s.prompt_style, conversations, s.job.eval.max_new_tokens,
                       s.fabric.device)


def print_sample(s: Session) -> None:
    """Print the completion of the run's sample conversation."""
    text = complete(s.inference_model, s.tokenizer, s.prompt_style, s.sample, s.job.eval.max_new_tokens,
                    s.fabric.device)
    user = _prompt_part(s.sample)[-1]
    shown = user["content"] + (f" [{user['input']}]" if user.get("input") else "")
    s.fabric.print(f"Sample: {shown!r} -> {text!r}")


def _prompt_part(conversation: Conversation) -> Conversation:
    """The conversation up to (without) its last assistant message."""
    last = max((i for i, m in enumerate(conversation) if m["role"] == "assistant"), default=len(conversation))
    return conversation[:last]
