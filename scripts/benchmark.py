"""Time and measure one training step per configuration (mode x DropBP rate x activation checkpointing).

Every configuration runs the same step the training loop runs (forward to hidden states, chunked loss, backward,
AdamW step) on random weights and tokens. Memory is counted by storage (lit_model.memory), so bytes saved for
backward are the same on CPU and GPU; on CUDA the peak allocated memory is reported as well.

DropBP's ideal speed-up comes from the same run's rate-0 timings of that mode (DESIGN.md section 2):
time(p) = T_fwd + (1 - p) * T_bwd(blocks) + T_bwd(rest) + T_opt(p), where T_bwd(rest) (LM head, loss, embedding)
is the backward time measured with every branch dropped, p is the FLOPs-weighted share of branch backwards the
timed steps actually dropped, and T_opt(p) is the optimizer time measured at p (AdamW skips parameters that got no
gradient, so full fine-tuning also saves optimizer time; the model only credits the backward).
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
from lit_model.dropbp import DropBPHandler
from lit_model.loss import head_loss
from lit_model.memory import model_memory, saved_tensor_bytes
from lit_model.lora import count_parameters
from lit_model.training import precision_dtype

# A Llama-shaped model small enough for a CPU, large enough that the matrix multiplications dominate.
DEFAULT_MODEL = dict(name="bench-llama", n_layer=4, n_head=16, n_embd=1024, n_query_groups=4, intermediate_size=2816,
                     vocab_size=32000, block_size=4096)


@dataclass
class Result:
    mode: str
    drop_rate: float
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
    realised_drop: float = 0.0  # FLOPs-weighted share of branch backwards dropped in the timed steps
    backward_rest_ms: float = 0.0  # backward with every branch dropped: what DropBP cannot remove
    speedup: Optional[float] = None  # rate-0 step time of this mode and checkpointing / this step time
    ideal_speedup: Optional[float] = None


def benchmark(
    model: Optional[str] = None,
    overrides: Optional[dict[str, Any]] = None,
    modes: tuple[str, ...] = ("full", "lora", "qlora"),
    rates: tuple[float, ...] = (0.0,),
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
        modes: any of full, badam (full fine-tuning, Adam on one block at a time), lora (query, value, projection and
            MLP adapters), qlora (lora on an NF4 base).
        rates: DropBP rates (uniform per branch; 0 is always measured too, as the reference of the speed-ups).
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
    rates = tuple(sorted({0.0, *rates}))
    runs = [(m, c) for m in modes for c in checkpointing]
    results = []
    for mode, every in tqdm(runs, desc="Benchmarking", unit="mode"):
        results += run_mode(config, mode, every, rates, precision, batch_size, seq_length, warmup, repeats, lora_r,
                            torch.device(device), seed)
        gc.collect()
    add_speedups(results)
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
    if mode in ("full", "badam"):
        return model.to(device)
    if mode == "qlora":
        from lit_model.quantize import quantize_model

        model = quantize_model(model.to(device), "bnb.nf4", compute_dtype=dtype or torch.float32)
    elif mode != "lora":
        raise ValueError(f"Unknown mode {mode!r}: use full, lora or qlora")
    lora = LoRAConfig(r=lora_r, alpha=2 * lora_r, dropout=0.0, query=True, value=True, projection=True, mlp=True)
    return apply_lora(model, lora).to(device)


def run_mode(
    config: Config, mode: str, every: int, rates: tuple[float, ...], precision: str, batch_size: int, seq_length: int,
    warmup: int, repeats: int, lora_r: int, device: torch.device, seed: int,
) -> list[Result]:
    """Time every DropBP rate of one mode on one model, round-robin step by step, so that the machine's drift
    affects all rates alike and their ratios are fair; plus the backward with every branch dropped."""
    torch.manual_seed(seed)
    model = build(config, mode, precision, lora_r, device).train()
    if every:
        apply_activation_checkpointing(model, every=every)
    optimizer = make_optimizer(model, mode)
    tokens = torch.randint(0, config.vocab_size, (batch_size, seq_length + 1), device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16-mixed")
    handlers = {p: DropBPHandler(model, drop_rate=p, seed=seed) for p in rates if p > 0}
    flops = torch.tensor(DropBPHandler(model, seq_len=seq_length).flops, dtype=torch.float64)
    all_dropped = [(True, True)] * config.n_layer
    times = {key: {"forward": [], "backward": [], "optimizer": []} for key in (*rates, "rest")}
    dropped_share: dict[float, list[float]] = {p: [] for p in rates}
    saved: dict[float, int] = {p: 0 for p in rates}
    memory: dict[float, dict[str, int]] = {}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for i in range(warmup + repeats):
        for key in (*rates, "rest"):
            mask = all_dropped if key == "rest" else (handlers[key].set_dropped_layers() if key in handlers else None)
            t0 = now(device)
            with autocast, saved_tensor_bytes(model) as counter:
                hidden = model(tokens[:, :-1], drop_mask=mask, return_hidden=True)
                loss = head_loss(model.lm_head, hidden, tokens[:, 1:])
            t1 = now(device)
            if loss.grad_fn is not None:  # LoRA with every branch dropped has nothing to differentiate
                loss.backward()
            t2 = now(device)
            if key != "rest":  # the "rest" pass only measures the backward DropBP can never remove
                optimizer.step()
            t3 = now(device)
            if i < warmup:
                optimizer.zero_grad(set_to_none=True)
                continue
            for part, seconds in (("forward", t1 - t0), ("backward", t2 - t1), ("optimizer", t3 - t2)):
                times[key][part].append(seconds)
            if key != "rest":
                saved[key] = max(saved[key], counter.bytes)
                dropped = torch.tensor([d for row in (mask or all_dropped) for d in row], dtype=torch.float64)
                dropped_share[key].append(float((dropped * flops).sum() / flops.sum()) if mask else 0.0)
                memory[key] = model_memory(model, optimizer)  # gradients of this rate's step, before zeroing
            optimizer.zero_grad(set_to_none=True)
    rest_ms = 1000 * statistics.median(times["rest"]["backward"])
    results = []
    for p in rates:
        ms = {k: 1000 * statistics.median(v) for k, v in times[p].items()}
        step = sum(ms.values())
        results.append(Result(
            mode=mode, drop_rate=p, checkpointing=every, trainable_params=count_parameters(model)[0],
            forward_ms=ms["forward"], backward_ms=ms["backward"], optimizer_ms=ms["optimizer"], step_ms=step,
            tokens_per_s=batch_size * seq_length / (step / 1000), saved_for_backward_bytes=saved[p],
            weight_bytes=memory[p]["weights"], gradient_bytes=memory[p]["gradients"],
            optimizer_state_bytes=memory[p]["optimizer_state"],
            cuda_peak_bytes=torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
            realised_drop=statistics.mean(dropped_share[p]), backward_rest_ms=rest_ms,
        ))
    return results


def make_optimizer(model: GPT, mode: str) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; for badam, BAdam's BlockOptimizer around it (block 0 active)."""
    if mode != "badam":
        return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, foreach=True)
    from lit_model.badam import BlockOptimizer

    named = list(model.named_parameters())
    base = torch.optim.AdamW([p for _, p in named], lr=1e-5, foreach=True)
    return BlockOptimizer(base, named, switch_block_every=10**9, switch_mode="ascending", verbose=0)


def now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def add_speedups(results: list[Result]) -> None:
    """Measured and ideal speed-up of every row against the rate-0 row of the same mode and checkpointing."""
    base = {(r.mode, r.checkpointing): r for r in results if r.drop_rate == 0}
    for r in results:
        ref = base[(r.mode, r.checkpointing)]
        blocks_bwd = max(ref.backward_ms - r.backward_rest_ms, 0.0)
        # The optimizer time is this row's own: AdamW skips parameters without a gradient (dropped branches), a
        # saving the backward-only model below does not count, so it is taken as measured rather than modelled.
        ideal_ms = ref.forward_ms + (1 - r.realised_drop) * blocks_bwd + r.backward_rest_ms + r.optimizer_ms
        r.speedup = ref.step_ms / r.step_ms
        r.ideal_speedup = ref.step_ms / ideal_ms


def header(config: Config, precision: str, batch_size: int, seq_length: int, device: str) -> str:
    where = torch.cuda.get_device_name() if device == "cuda" else f"CPU ({platform.processor() or platform.machine()}, "\
        f"{torch.get_num_threads()} threads)"
    n = sum(p.numel() for p in GPT(config).parameters()) if config.n_embd <= 2048 else None
    size = f", {n / 1e6:.0f}M parameters" if n else ""
    return (f"\n{config.name}: {config.n_layer} layers, n_embd {config.n_embd}{size}; {precision}; batch {batch_size} x "
            f"{seq_length} tokens; {where}; torch {torch.__version__}\n")


def markdown_table(rows: list[dict[str, Any]]) -> str:
    mib = 2**20
    lines = ["| mode | DropBP p (realised) | ckpt | trainable | fwd ms | bwd ms | opt ms | step ms | tokens/s | "
             "speed-up (ideal) | saved for bwd MiB | weights MiB | grads MiB | optim state MiB | CUDA peak MiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        peak = f"{r['cuda_peak_bytes'] / mib:.0f}" if r["cuda_peak_bytes"] is not None else "-"
        lines.append(
            f"| {r['mode']} | {r['drop_rate']:g} ({r['realised_drop']:.2f}) | {r['checkpointing']} | "
            f"{r['trainable_params'] / 1e6:.2f}M | {r['forward_ms']:.1f} | "
            f"{r['backward_ms']:.1f} | {r['optimizer_ms']:.1f} | {r['step_ms']:.1f} | {r['tokens_per_s']:.0f} | "
            f"{r['speedup']:.2f}x ({r['ideal_speedup']:.2f}x) | "
            f"{r['saved_for_backward_bytes'] / mib:.1f} | {r['weight_bytes'] / mib:.1f} | "
            f"{r['gradient_bytes'] / mib:.1f} | {r['optimizer_state_bytes'] / mib:.1f} | {peak} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    from jsonargparse import CLI

    CLI(benchmark, as_positional=False)
