"""Time and measure one training step per configuration (mode x activation checkpointing) and print a table.

Every configuration runs the same step the training loop runs (forward to hidden states, chunked loss, backward,
AdamW step) on random weights and tokens. Memory is counted by storage (lit_model.memory), so bytes saved for
backward are the same on CPU and GPU; on CUDA the peak allocated memory is reported as well.
"""

from __future__ import annotations

import gc
import json
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from lit_model import GPT, Config
from lit_model.checkpointing import apply_activation_checkpointing
from lit_model.loss import chunked_cross_entropy, lm_head_weight
from lit_model.memory import model_memory, saved_tensor_bytes
from lit_model.training import count_parameters, precision_dtype

# A Llama-shaped model small enough for a CPU, large enough that the matrix multiplications dominate.
DEFAULT_MODEL = dict(name="bench-llama", n_layer=4, n_head=16, n_embd=1024, n_query_groups=4, intermediate_size=2816,
                     vocab_size=32000, block_size=4096)


@dataclass
class Result:
    mode: str
    checkpointing: int
    trainable_params: int
    forward_ms: float
    backward_ms: float
    optimizer_ms: float
    step_ms: float
    tokens_per_s: float
    saved_for_backward_bytes: int
    weight_bytes: int
    gradient_bytes: int
    optimizer_state_bytes: int
    cuda_peak_bytes: Optional[int]


def benchmark(
    model: Optional[str] = None,
    overrides: Optional[dict[str, Any]] = None,
    modes: tuple[str, ...] = ("full", "lora", "qlora"),
    checkpointing: tuple[int, ...] = (0, 1),
    precision: Optional[str] = None,
    batch_size: int = 2,
    seq_length: int = 256,
    warmup: int = 2,
    repeats: int = 5,
    lora_r: int = 8,
    device: str = "auto",
    seed: int = 0,
    json_out: Optional[Path] = None,
) -> list[dict[str, Any]]:
    """Benchmark the training step of each mode x checkpointing setting; print a Markdown table (and write JSON).

    Args:
        model: a preset name (see lit_model.config.PRESETS); default: a 4-layer Llama-like model (n_embd 1024).
        overrides: Config fields to change, e.g. '{"n_layer": 2}'.
        modes: any of full, lora (query, value, projection and MLP adapters), qlora (lora on an NF4 base).
        checkpointing: activation checkpointing settings (0: off, k: every k-th block).
        precision: 32-true, bf16-true or bf16-mixed; default bf16-true on CUDA, 32-true on CPU.
        batch_size: sequences per step.
        seq_length: tokens per sequence.
        warmup: untimed steps first.
        repeats: timed steps (the median is reported).
        lora_r: LoRA rank.
        device: cpu, cuda or auto.
        seed: random seed for weights and tokens.
        json_out: also write the results here.
    """
    from tqdm import tqdm

    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    precision = precision or ("bf16-true" if device == "cuda" else "32-true")
    config = Config.from_name(model, **(overrides or {})) if model else Config(**{**DEFAULT_MODEL, **(overrides or {})})
    runs = [(m, c) for m in modes for c in checkpointing]
    results = []
    for mode, every in tqdm(runs, desc="Benchmarking", unit="config"):
        results.append(run_one(config, mode, every, precision, batch_size, seq_length, warmup, repeats, lora_r,
                               torch.device(device), seed))
        gc.collect()
    rows = [asdict(r) for r in results]
    print(header(config, precision, batch_size, seq_length, device))
    print(markdown_table(rows))
    if json_out is not None:
        Path(json_out).write_text(json.dumps({"config": asdict(config), "precision": precision, "device": device,
                                              "batch_size": batch_size, "seq_length": seq_length, "results": rows},
                                             indent=2))
    return rows


def build(config: Config, mode: str, precision: str, lora_r: int, device: torch.device) -> GPT:
    """Random weights in the layout of the mode: all trainable, LoRA, or LoRA on 4-bit weights."""
    from lit_model.lora import LoRAConfig, apply_lora

    dtype = precision_dtype(precision)
    model = GPT(config)
    model.init_weights()
    model.to(dtype=dtype or torch.float32)
    if mode == "full":
        return model.to(device)
    if mode == "qlora":
        from lit_model.quantize import quantize_model

        model = quantize_model(model.to(device), "bnb.nf4", compute_dtype=dtype or torch.float32)
    elif mode != "lora":
        raise ValueError(f"Unknown mode {mode!r}: use full, lora or qlora")
    lora = LoRAConfig(r=lora_r, alpha=2 * lora_r, dropout=0.0, query=True, value=True, projection=True, mlp=True)
    return apply_lora(model, lora).to(device)


def run_one(
    config: Config, mode: str, every: int, precision: str, batch_size: int, seq_length: int, warmup: int, repeats: int,
    lora_r: int, device: torch.device, seed: int,
) -> Result:
    torch.manual_seed(seed)
    model = build(config, mode, precision, lora_r, device).train()
    if every:
        apply_activation_checkpointing(model, every=every)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, foreach=True)
    tokens = torch.randint(0, config.vocab_size, (batch_size, seq_length + 1), device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16-mixed")
    times: dict[str, list[float]] = {"forward": [], "backward": [], "optimizer": []}
    saved = 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for i in range(warmup + repeats):
        t0 = now(device)
        with autocast, saved_tensor_bytes(model) as counter:
            hidden = model(tokens[:, :-1], return_hidden=True)
            weight, bias = lm_head_weight(model.lm_head)
            loss = chunked_cross_entropy(hidden, weight, tokens[:, 1:], bias)
        t1 = now(device)
        loss.backward()
        t2 = now(device)
        optimizer.step()
        optimizer.zero_grad(set_to_none=i < warmup + repeats - 1)  # keep the last gradients for the memory count
        t3 = now(device)
        if i >= warmup:
            times["forward"].append(t1 - t0)
            times["backward"].append(t2 - t1)
            times["optimizer"].append(t3 - t2)
            saved = counter.bytes
    memory = model_memory(model, optimizer)
    ms = {k: 1000 * statistics.median(v) for k, v in times.items()}
    step = sum(ms.values())
    return Result(
        mode=mode, checkpointing=every, trainable_params=count_parameters(model)[0], forward_ms=ms["forward"],
        backward_ms=ms["backward"], optimizer_ms=ms["optimizer"], step_ms=step,
        tokens_per_s=batch_size * seq_length / (step / 1000), saved_for_backward_bytes=saved,
        weight_bytes=memory["weights"], gradient_bytes=memory["gradients"],
        optimizer_state_bytes=memory["optimizer_state"],
        cuda_peak_bytes=torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
    )


def now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def header(config: Config, precision: str, batch_size: int, seq_length: int, device: str) -> str:
    where = torch.cuda.get_device_name() if device == "cuda" else f"CPU ({platform.processor() or platform.machine()}, "\
        f"{torch.get_num_threads()} threads)"
    n = sum(p.numel() for p in GPT(config).parameters()) if config.n_embd <= 2048 else None
    size = f", {n / 1e6:.0f}M parameters" if n else ""
    return (f"\n{config.name}: {config.n_layer} layers, n_embd {config.n_embd}{size}; {precision}; batch {batch_size} x "
            f"{seq_length} tokens; {where}; torch {torch.__version__}\n")


def markdown_table(rows: list[dict[str, Any]]) -> str:
    mib = 2**20
    lines = ["| mode | ckpt | trainable | fwd ms | bwd ms | opt ms | step ms | tokens/s | saved for bwd MiB | "
             "weights MiB | grads MiB | optim state MiB | CUDA peak MiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        peak = f"{r['cuda_peak_bytes'] / mib:.0f}" if r["cuda_peak_bytes"] is not None else "-"
        lines.append(
            f"| {r['mode']} | {r['checkpointing']} | {r['trainable_params'] / 1e6:.2f}M | {r['forward_ms']:.1f} | "
            f"{r['backward_ms']:.1f} | {r['optimizer_ms']:.1f} | {r['step_ms']:.1f} | {r['tokens_per_s']:.0f} | "
            f"{r['saved_for_backward_bytes'] / mib:.1f} | {r['weight_bytes'] / mib:.1f} | "
            f"{r['gradient_bytes'] / mib:.1f} | {r['optimizer_state_bytes'] / mib:.1f} | {peak} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    from jsonargparse import CLI

    CLI(benchmark, as_positional=False)
