"""Generate text from any checkpoint directory (base, fully fine-tuned or LoRA) with the KV cache, streaming."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Iterator, Optional

import torch

from lit_model.peft.checkpoint import load_any
from lit_model.precision import autocast, canonical, default_precision, describe, param_dtype
from lit_model.model import GPT
from lit_model.prompts import PromptStyle, resolve_prompt_style
from lit_model.sampling import generate_tokens
from lit_model.tokenizer import Tokenizer
from lit_model.checkpoint_io import DEMO_CHECKPOINT
from lit_model.cli import script_main


def main(
    prompt: str = "Write the digits of 5821 in reverse order.",
    checkpoint_dir: Path = DEMO_CHECKPOINT,
    input: str = "",
    max_new_tokens: int = 100,
    temperature: float = 0.8,
    top_k: Optional[int] = 50,
    top_p: float = 1.0,
    num_samples: int = 1,
    prompt_style: Optional[str] = None,
    precision: Optional[str] = None,
    device: str = "auto",
    seed: int = 1234,
) -> list[str]:
    """Sample a completion of `prompt`, streamed to stdout; timing and tokens/s go to stderr.

    Args:
        prompt: the instruction or text to complete.
        checkpoint_dir: a model directory: base (lit_model.pth), fully fine-tuned, or LoRA (lit_model.lora.pth).
        input: optional input for the instruction (Alpaca's "### Input").
        max_new_tokens: the most tokens to generate per sample.
        temperature: 0 for greedy decoding; higher is more random.
        top_k: sample among the k most likely tokens (None: all).
        top_p: nucleus sampling: the smallest set of tokens whose probability reaches top_p.
        num_samples: completions to generate.
        prompt_style: template applied to the prompt (alpaca, plain, llama3, chatml, ..., chat_template); default:
            the checkpoint's prompt_style.yaml, else its own chat template, else the family's chat style for an
            instruct model and plain text for a base model.
        precision: 32-true, bf16-true, 16-true (weights and arithmetic in that dtype) or bf16-mixed / 16-mixed
            (float32 weights, autocast); default bf16-true on a GPU with bf16, else 32-true. The weights are cast to
            it whatever dtype the checkpoint stores.
        device: cpu, cuda, cuda:N or auto.
        seed: random seed for sampling.
    """
    model, tokenizer, style, device, precision = load_for_generation(checkpoint_dir, prompt_style, precision, device)
    ids = tokenizer.encode(style.apply(prompt, input), bos=style.adds_bos, device=torch.device(device),
                           special=style.special_in_text)
    generator = torch.Generator(device=device).manual_seed(seed)
    outputs = []
    stops = style.stop_tokens(tokenizer)
    for _ in range(num_samples):
        t0, tokens = time.perf_counter(), []

        def recorded(stream: Iterator[int]) -> Iterator[int]:
            for token in stream:
                tokens.append(token)
                yield token

        with autocast(precision, device):  # a no-op for *-true; the tokens are produced inside the loop
            stream = generate_tokens(model, ids, max_new_tokens, temperature, top_k, top_p, stops, generator)
            # decode_stream decodes a few ids per token (not the whole answer again) and holds back a multi-byte
            # character until it is complete.
            for piece in tokenizer.decode_stream(recorded(stream)):
                print(piece, end="", flush=True)
        print(flush=True)
        text = tokenizer.decode(tokens)
        elapsed = time.perf_counter() - t0
        print(f"{len(tokens)} tokens in {elapsed:.2f} s: {len(tokens) / elapsed:.1f} tokens/s", file=sys.stderr)
        outputs.append(text)
    return outputs


def load_for_generation(checkpoint_dir: Path, prompt_style: Optional[str], precision: Optional[str], device: str
                        ) -> tuple[GPT, Tokenizer, PromptStyle, str, str]:
    """What every generate script starts from: the device ("auto" resolved), the precision (its default for the
    device), the model cast to it, the tokenizer and the prompt style; the precision and the style's source go to
    stderr."""
    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    precision = canonical(precision or default_precision(device=device))
    print(describe(precision), file=sys.stderr)
    model = load_any(checkpoint_dir, device=device, dtype=param_dtype(precision))
    tokenizer = Tokenizer(checkpoint_dir)
    style, source = resolve_prompt_style(prompt_style, checkpoint_dir, model.config.hf_repo or model.config.name,
                                         for_generation=True)
    print(f"Prompts: {source}", file=sys.stderr)
    return model, tokenizer, style, device, precision


if __name__ == "__main__":
    script_main(main)
