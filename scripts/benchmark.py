"""Time and measure one training step per configuration (mode x DropBP rate x activation checkpointing).

Every configuration runs the same step the training loop runs (forward to hidden states, chunked loss, backward,
fused AdamW step) on random weights and tokens. Memory is counted by storage (lit_model.memory), so bytes saved for
backward are the same on CPU and GPU; on CUDA each configuration's peak allocated memory is reported as well.
The configurations of one mode run round-robin, one step each per round, so that their ratios are fair on a noisy
machine: each DropBP rate, `--peer litgpt` (litgpt's own step on the same weights, see litgpt_peer.py) and the
`--ablate` rows (our step with one speed-up undone). `--longest` searches the longest sequence that fits, and MFU
uses the PaLM FLOPs count against the GPU's peak.

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
import textwrap
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from tqdm import tqdm

from lit_model import GPT, Config
from lit_model.checkpointing import apply_activation_checkpointing
from lit_model.dropbp import DropBPHandler
from lit_model.loss import head_loss
from lit_model.memory import model_memory, saved_tensor_bytes
from lit_model.lora import LoRAConfig, count_parameters
from lit_model.precision import autocast, compute_dtype, is_mixed, param_dtype
from lit_model.training import adamw
from litgpt_peer import build_litgpt, import_litgpt, litgpt_loss  # scripts/ is on sys.path when run as a script

# Ablation keys of `run_mode` -> the `impl` their rows report.
ABLATIONS = {"default AdamW": "ours, torch-default AdamW", "recomputed loss": "ours, loss recomputed in backward"}

# A Llama-shaped model small enough for a CPU, large enough that the matrix multiplications dominate.
DEFAULT_MODEL = dict(name="bench-llama", n_layer=4, n_head=16, n_embd=1024, n_query_groups=4, intermediate_size=2816,
                     vocab_size=32000, block_size=4096)


@dataclass
class Result:
    mode: str
    impl: str  # "ours" or the peer's name
    drop_rate: float
    checkpointing: int
    trainable_params: int
    forward_ms: float
    backward_ms: float
    optimizer_ms: float
    step_ms: float
    tokens_per_s: float
    saved_for_backward_bytes: int  # mean over the timed steps (DropBP's masks are random)
    saved_for_backward_max_bytes: int  # the largest of the timed steps
    weight_bytes: int
    gradient_bytes: int
    optimizer_state_bytes: int
    cuda_peak_bytes: Optional[int]  # peak allocated during this configuration's steps (CUDA only)
    realised_drop: float = 0.0  # FLOPs-weighted share of branch backwards dropped in the timed steps
    backward_rest_ms: float = 0.0  # backward with every branch dropped: what DropBP cannot remove
    speedup: Optional[float] = None  # rate-0 step time of this mode and checkpointing / this step time
    ideal_speedup: Optional[float] = None
    vs_peer: Optional[float] = None  # tokens/s of this row / tokens/s of the peer's row of the same mode
    peer_loss_gap: Optional[float] = None  # peer rows: |our loss - its loss| on the same weights and tokens
    model_tflops: float = 0.0  # the model's training FLOPs (PaLM: 6N + 12 L T d per token) / step time
    mfu: Optional[float] = None  # model_tflops / the device's peak


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
    peer: Optional[str] = None,
    ablate: bool = False,
    longest: bool = False,
    memory_budget_gib: Optional[float] = None,
    peak_tflops: Optional[float] = None,
    device: str = "auto",
    seed: int = 0,
    json_out: Optional[Path] = None,
    plot: Optional[Path] = None,
) -> list[dict[str, Any]]:
    """Benchmark the training step of each mode x DropBP rate x checkpointing; print a Markdown table (and JSON).

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
        warmup: untimed rounds first.
        repeats: timed rounds (the median is reported); each round runs every configuration of a mode once.
        lora_r: LoRA rank.
        peer: "litgpt" also times litgpt's step (its GPT or LoRA GPT, our weights) in the same rounds, for full and
            lora without checkpointing, and reports ours / litgpt tokens per second (needs the litgpt extra).
        ablate: also time our rate-0 step of full and lora with each of its speed-ups taken back in turn (torch's
            default AdamW instead of the fused one; the loss recomputing its logits in the backward).
            With --peer or --ablate the extra model or optimizer stays resident, so the CUDA peak column includes
            it: take peaks from a run without them.
        longest: also find, for each mode x rate x checkpointing, the longest sequence (a multiple of 128, at most
            the model's block_size) whose training step fits: on CUDA, in the GPU's memory (or the budget); on CPU,
            counted bytes (weights, gradients, optimizer state, saved for backward) within --memory_budget_gib.
        memory_budget_gib: the memory a step may use for --longest (CUDA default: all the GPU has).
        peak_tflops: the device's peak dense TFLOP/s for the model-FLOPs utilisation column (MFU); known for
            H100, H200 and A100 in bf16; without it MFU is left out and only achieved TFLOP/s is shown.
        device: cpu, cuda or auto.
        seed: random seed for weights and tokens.
        json_out: also write the results here.
        plot: also draw step time and memory per configuration into this image (e.g. bench.png).
    """
    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    precision = precision or ("bf16-true" if device == "cuda" else "32-true")
    config = Config.from_name(model, **(overrides or {})) if model else Config(**{**DEFAULT_MODEL, **(overrides or {})})
    if peer is not None:
        import_litgpt()  # fail before the first measurement, not after
    rates = tuple(sorted({0.0, *rates}))
    runs = [(m, c) for m in modes for c in checkpointing]
    results = []
    for mode, every in tqdm(runs, desc="Benchmarking", unit="mode"):
        results += run_mode(config, mode, every, rates, precision, batch_size, seq_length, warmup, repeats, lora_r,
                            torch.device(device), seed, peer if every == 0 else None, ablate)
        gc.collect()
    add_speedups(results)
    peak = peak_tflops or device_peak_tflops(device, precision)
    flops = model_flops_per_token(config, seq_length) * batch_size * seq_length
    for r in results:
        r.model_tflops = flops / (r.step_ms / 1000) / 1e12
        r.mfu = r.model_tflops / peak if peak else None
    rows = [asdict(r) for r in results]
    print(header(config, precision, batch_size, seq_length, device))
    print(markdown_table(rows))
    longest_rows = []
    if longest:
        budget = int(memory_budget_gib * 2**30) if memory_budget_gib else None
        if budget is None and device != "cuda":
            raise ValueError("--longest on CPU needs --memory_budget_gib (a CPU step does not run out of memory)")
        for mode, every in [(m, c) for m in modes if m != "badam" for c in checkpointing]:
            for p in rates:
                n, used = longest_sequence(config, mode, every, p, precision, batch_size, lora_r,
                                           torch.device(device), seed, budget)
                longest_rows.append(dict(mode=mode, drop_rate=p, checkpointing=every, longest_seq=n, bytes=used))
        print(longest_table(longest_rows, budget, device))
    if json_out is not None:
        Path(json_out).write_text(json.dumps({"config": asdict(config), "precision": precision, "device": device,
                                              "machine": machine(device), "batch_size": batch_size,
                                              "seq_length": seq_length, "peak_tflops": peak, "results": rows,
                                              "longest": longest_rows}, indent=2))
    if plot is not None:
        plot_results(rows, Path(plot), header(config, precision, batch_size, seq_length, device).strip())
        print(f"Wrote {plot}")
    return rows


def build(config: Config, mode: str, precision: str, lora_r: int, device: torch.device) -> GPT:
    """Random weights in the layout of the mode: all trainable, LoRA, or LoRA on 4-bit weights."""
    from lit_model.lora import apply_lora

    model = GPT(config)
    model.init_weights()
    model.to(dtype=param_dtype(precision))
    if mode in ("full", "badam"):
        return model.to(device)
    if mode == "qlora":
        from lit_model.quantize import quantize_model

        model = quantize_model(model.to(device), "bnb.nf4", compute_dtype=compute_dtype(precision))
    elif mode != "lora":
        raise ValueError(f"Unknown mode {mode!r}: use full, lora or qlora")
    lora = LoRAConfig(r=lora_r, alpha=2 * lora_r, dropout=0.0, query=True, value=True, projection=True, mlp=True)
    return apply_lora(model, lora).to(device)


def run_mode(
    config: Config, mode: str, every: int, rates: tuple[float, ...], precision: str, batch_size: int, seq_length: int,
    warmup: int, repeats: int, lora_r: int, device: torch.device, seed: int, peer: Optional[str] = None,
    ablate: bool = False,
) -> list[Result]:
    """Time every DropBP rate of one mode on one model (and the peer's step on the same weights), round-robin step by
    step, so that the machine's drift affects all of them alike and their ratios are fair; plus the backward with
    every branch dropped ("rest": what DropBP can never remove)."""
    torch.manual_seed(seed)
    model = build(config, mode, precision, lora_r, device).train()
    if every:
        apply_activation_checkpointing(model, every=every)
    optimizer = make_optimizer(model, mode)
    tokens = torch.randint(0, config.vocab_size, (batch_size, seq_length + 1), device=device)
    amp = autocast(precision, device)
    handlers = {p: DropBPHandler(model, drop_rate=p, seed=seed) for p in rates if p > 0}
    flops = torch.tensor(DropBPHandler(model, seq_len=seq_length).flops, dtype=torch.float64)
    all_dropped = [(True, True)] * config.n_layer
    peer_run = build_peer(peer, model, mode, lora_r, device, precision, tokens) if peer else None
    # Ablations: our rate-0 step with one of its speed-ups taken back (torch's default AdamW; the loss recomputing
    # its logits in the backward), timed in the same rounds.
    ablations = ABLATIONS if ablate and mode in ("full", "lora") else {}
    default_adamw = make_optimizer(model, mode, fused=False) if "default AdamW" in ablations else None

    def step_parts(key: float | str) -> tuple[torch.nn.Module, torch.optim.Optimizer, Callable[[], torch.Tensor], Any]:
        if key == "peer":
            assert peer_run is not None
            return peer_run.model, peer_run.optimizer, peer_run.loss, None
        mask = all_dropped if key == "rest" else (handlers[key].set_dropped_layers() if key in handlers else None)

        def loss() -> torch.Tensor:
            return step_loss(model, tokens, mask, grad_in_forward=key != "recomputed loss")

        return model, (default_adamw if key == "default AdamW" else optimizer), loss, mask

    keys: tuple[float | str, ...] = (*rates, "rest", *(("peer",) if peer_run else ()), *ablations)
    stats = {key: StepStats() for key in keys}
    for i in tqdm(range(warmup + repeats), desc=f"{mode} ckpt {every}", unit="round", leave=False):
        for key in keys:
            net, opt, loss_fn, mask = step_parts(key)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            t0 = now(device)
            with amp, saved_tensor_bytes(net) as counter:
                loss = loss_fn()
            t1 = now(device)
            if loss.grad_fn is not None:  # LoRA with every branch dropped has nothing to differentiate
                loss.backward()
            t2 = now(device)
            if key != "rest":  # the "rest" pass only measures the backward DropBP can never remove
                opt.step()
            t3 = now(device)
            if i >= warmup:
                s = stats[key]
                s.times["forward"].append(t1 - t0)
                s.times["backward"].append(t2 - t1)
                s.times["optimizer"].append(t3 - t2)
                s.saved.append(counter.bytes)
                if device.type == "cuda":
                    s.cuda_peak = max(s.cuda_peak or 0, torch.cuda.max_memory_allocated(device))
                if key != "rest":
                    dropped = torch.tensor([d for row in (mask or all_dropped) for d in row], dtype=torch.float64)
                    s.dropped_share.append(float((dropped * flops).sum() / flops.sum()) if mask else 0.0)
                    s.memory = model_memory(net, opt)  # gradients of this step, before zeroing
            opt.zero_grad(set_to_none=True)
    rest_ms = 1000 * statistics.median(stats["rest"].times["backward"])
    results = [stats[p].result(mode, p, every, model, batch_size * seq_length, rest_ms) for p in rates]
    if peer_run is not None:
        results.append(stats["peer"].result(mode, 0.0, every, peer_run.model, batch_size * seq_length, None,
                                            impl=peer, loss_gap=peer_run.loss_gap))
    for key, impl in ablations.items():
        results.append(stats[key].result(mode, 0.0, every, model, batch_size * seq_length, rest_ms, impl=impl))
    return results


@dataclass
class StepStats:
    """What the timed steps of one configuration recorded."""

    times: dict[str, list[float]] = field(default_factory=lambda: {"forward": [], "backward": [], "optimizer": []})
    saved: list[int] = field(default_factory=list)
    dropped_share: list[float] = field(default_factory=list)
    memory: dict[str, int] = field(default_factory=dict)
    cuda_peak: Optional[int] = None

    def result(self, mode: str, rate: float, every: int, model: torch.nn.Module, tokens: int,
               rest_ms: Optional[float], impl: str = "ours", loss_gap: Optional[float] = None) -> Result:
        ms = {k: 1000 * statistics.median(v) for k, v in self.times.items()}
        step = sum(ms.values())
        return Result(
            mode=mode, impl=impl, drop_rate=rate, checkpointing=every, trainable_params=count_parameters(model)[0],
            forward_ms=ms["forward"], backward_ms=ms["backward"], optimizer_ms=ms["optimizer"], step_ms=step,
            tokens_per_s=tokens / (step / 1000), saved_for_backward_bytes=int(statistics.mean(self.saved)),
            saved_for_backward_max_bytes=max(self.saved), weight_bytes=self.memory["weights"],
            gradient_bytes=self.memory["gradients"], optimizer_state_bytes=self.memory["optimizer_state"],
            cuda_peak_bytes=self.cuda_peak, realised_drop=statistics.mean(self.dropped_share),
            backward_rest_ms=rest_ms or 0.0, peer_loss_gap=loss_gap,
        )


@dataclass
class PeerRun:
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    loss: Callable[[], torch.Tensor]
    loss_gap: float  # |our loss - the peer's loss| on the same weights and tokens, before any step


def build_peer(peer: str, model: GPT, mode: str, lora_r: int, device: torch.device, precision: str,
               tokens: torch.Tensor) -> Optional[PeerRun]:
    """The peer's model with our model's weights, its optimizer and its training-step loss, as its scripts run them.

    Refuses to time a peer whose loss on the same weights and tokens differs from ours: that would not be the same
    model. None for the modes the peer comparison does not cover (it covers full and LoRA).
    """
    if peer != "litgpt":
        raise ValueError(f"Unknown peer {peer!r}: the only peer is litgpt")
    if mode not in ("full", "lora"):
        return None
    dtype = param_dtype(precision)
    lora = LoRAConfig(r=lora_r, alpha=2 * lora_r, dropout=0.0, query=True, value=True, projection=True, mlp=True) \
        if mode == "lora" else None
    peer_model = build_litgpt(model, lora, device, dtype).train()
    amp = autocast(precision, device)
    with torch.no_grad(), amp:
        ours = step_loss(model, tokens)
        theirs = litgpt_loss(peer_model, tokens)
    gap = abs(float(ours) - float(theirs))
    tolerance = 1e-3 if dtype == torch.float32 and not is_mixed(precision) else 5e-2
    if gap > tolerance * max(1.0, abs(float(ours))):
        raise RuntimeError(f"litgpt's loss {float(theirs):.6f} differs from ours {float(ours):.6f} on the same weights "
                           "and tokens: the peer model is not the same model, so its timing would not compare")
    # litgpt's fine-tuning scripts build `torch.optim.AdamW(params, ...)`: torch's default implementation.
    optimizer = make_optimizer(peer_model, mode, fused=False)
    return PeerRun(peer_model, optimizer, lambda: litgpt_loss(peer_model, tokens), gap)


# Peak dense bf16 tensor-core TFLOP/s (no sparsity), from NVIDIA's data sheets; the first matching name wins.
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("A100", 312.0))


def device_peak_tflops(device: str, precision: str) -> Optional[float]:
    """The peak for MFU on a known GPU in bf16; None elsewhere (pass --peak_tflops)."""
    if device != "cuda" or not precision.startswith("bf16"):
        return None
    name = torch.cuda.get_device_name()
    return next((tflops for key, tflops in PEAK_BF16_TFLOPS if key in name), None)


def model_flops_per_token(config: Config, seq_length: int) -> float:
    """Training FLOPs per token by the PaLM convention (Chowdhery et al. 2022, appendix B): 6 N + 12 L T d_attn, with
    N the matrix parameters (embedding excluded, LM head included). The same for every mode and DropBP rate, so MFU
    compares rows as throughput does: a LoRA or DropBP step that skips work shows as higher utilisation."""
    c = config
    attn = c.n_embd * (c.n_head + 2 * c.n_query_groups) * c.head_size + c.n_head * c.head_size * c.n_embd
    mlp = (3 if c.mlp_class_name != "GptNeoxMLP" else 2) * c.n_embd * c.intermediate_size
    n_matrix = c.n_layer * (attn + mlp) + c.vocab_size * c.n_embd
    return 6.0 * n_matrix + 12.0 * c.n_layer * seq_length * c.n_head * c.head_size


def longest_sequence(
    config: Config, mode: str, every: int, rate: float, precision: str, batch_size: int, lora_r: int,
    device: torch.device, seed: int, budget: Optional[int], probes: int = 3,
) -> tuple[int, Optional[int]]:
    """The longest sequence (a multiple of 128, at most block_size) whose training step fits, and its memory.

    A length fits when `probes` steps run (DropBP's masks are random: a step that keeps more branches needs more;
    every length is probed with the same masks) and the most memory any of them used is within `budget`: CUDA's peak allocated bytes on a GPU (an out-of-memory
    error means it does not fit), the counted weights, gradients, optimizer state and saved activations on CPU.
    Returns (0, None) when not even 128 tokens fit.
    """
    torch.manual_seed(seed)
    model = build(config, mode, precision, lora_r, device).train()
    if every:
        apply_activation_checkpointing(model, every=every)
    optimizer = make_optimizer(model, mode)
    amp = autocast(precision, device)

    def used(T: int) -> Optional[int]:
        most = 0
        # Every length sees the same masks, so that what fits at T fits at any shorter length (the search needs it).
        handler = DropBPHandler(model, drop_rate=rate, seed=seed) if rate > 0 else None
        try:
            for _ in range(probes):
                tokens = torch.randint(0, config.vocab_size, (batch_size, T + 1), device=device)
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                mask = handler.set_dropped_layers() if handler else None
                with amp, saved_tensor_bytes(model) as counter:
                    loss = step_loss(model, tokens, mask)
                if loss.grad_fn is not None:
                    loss.backward()
                optimizer.step()
                if device.type == "cuda":
                    most = max(most, torch.cuda.max_memory_allocated(device))
                else:
                    most = max(most, sum(model_memory(model, optimizer).values()) + counter.bytes)
                optimizer.zero_grad(set_to_none=True)
                del loss, tokens
        except torch.OutOfMemoryError:
            most = None
        optimizer.zero_grad(set_to_none=True)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return most if most is not None and (budget is None or most <= budget) else None

    return longest_fitting(used, limit=config.block_size)


def longest_fitting(used: Callable[[int], Optional[int]], limit: int, step: int = 128) -> tuple[int, Optional[int]]:
    """The largest multiple of `step` up to `limit` for which `used` gives a number (not None), assuming that what
    fits at T fits at every shorter length: double from `step`, then bisect between the last fit and the first miss.
    Returns (length, used(length)), or (0, None) when `step` itself does not fit."""
    best, best_used = 0, None
    T = step
    while T <= limit:
        u = used(T)
        if u is None:
            break
        best, best_used = T, u
        T *= 2
    lo, hi = best, min(T, (limit // step + 1) * step)  # lo fits (or is 0); hi does not, or is past the limit
    while hi - lo > step:
        mid = (lo + hi) // 2 // step * step
        u = used(mid)
        if u is None:
            hi = mid
        else:
            lo, best, best_used = mid, mid, u
    return best, best_used


def longest_table(rows: list[dict[str, Any]], budget: Optional[int], device: str) -> str:
    limit = ("all of the GPU's memory" if budget is None else
             f"{budget / 2**30:.1f} GiB" if budget >= 2**30 else f"{budget / 2**20:.0f} MiB")
    what = "CUDA peak allocated" if device == "cuda" else "counted bytes"
    lines = [f"\nLongest sequence whose step fits in {limit} ({what}):\n",
             "| mode | DropBP p | ckpt | longest sequence | memory at it (MiB) | vs rate 0 |", "|---|---|---|---|---|---|"]
    base = {(r["mode"], r["checkpointing"]): r["longest_seq"] for r in rows if r["drop_rate"] == 0}
    for r in rows:
        ref = base.get((r["mode"], r["checkpointing"]))
        ratio = f"{r['longest_seq'] / ref:.2f}x" if ref else "-"
        mem = f"{r['bytes'] / 2**20:.0f}" if r["bytes"] is not None else "-"
        lines.append(f"| {r['mode']} | {r['drop_rate']:g} | {r['checkpointing']} | {r['longest_seq']} | {mem} | {ratio} |")
    return "\n".join(lines)


def step_loss(model: GPT, tokens: torch.Tensor, mask: Any = None, grad_in_forward: bool = True) -> torch.Tensor:
    """The training loop's loss on (B, T + 1) tokens: hidden states (with a DropBP mask), then the chunked head loss."""
    hidden = model(tokens[:, :-1], drop_mask=mask, return_hidden=True)
    return head_loss(model.lm_head, hidden, tokens[:, 1:], grad_in_forward=grad_in_forward)


def make_optimizer(model: torch.nn.Module, mode: str, fused: bool = True) -> torch.optim.Optimizer:
    """The training loop's optimizer: AdamW over the trainable parameters (fused where it can be; `fused=False`
    gives torch's default, for the ablation); for badam, BAdam's BlockOptimizer around AdamW (block 0 active)."""
    if mode != "badam":
        params = [p for p in model.parameters() if p.requires_grad]
        return adamw(params, lr=1e-5) if fused else torch.optim.AdamW(params, lr=1e-5)
    from lit_model.badam import BlockOptimizer

    named = list(model.named_parameters())
    base = torch.optim.AdamW([p for _, p in named], lr=1e-5)
    return BlockOptimizer(base, named, switch_block_every=10**9, switch_mode="ascending", verbose=0)


def now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def add_speedups(results: list[Result]) -> None:
    """Speed-up of each of our rows against our rate-0 row of the same mode and checkpointing (with DropBP's ideal
    for the DropBP rows), and each of our rows' throughput against the peer's row of the same mode, if one ran."""
    base = {(r.mode, r.checkpointing): r for r in results if r.drop_rate == 0 and r.impl == "ours"}
    peers = {(r.mode, r.checkpointing): r for r in results if not r.impl.startswith("ours")}
    for r in results:
        if not r.impl.startswith("ours"):
            continue
        ref = base[(r.mode, r.checkpointing)]
        r.speedup = ref.step_ms / r.step_ms
        if r.impl == "ours":
            blocks_bwd = max(ref.backward_ms - r.backward_rest_ms, 0.0)
            # The optimizer time is this row's own: AdamW skips parameters without a gradient (dropped branches), a
            # saving the backward-only model below does not count, so it is taken as measured, not modelled.
            ideal_ms = ref.forward_ms + (1 - r.realised_drop) * blocks_bwd + r.backward_rest_ms + r.optimizer_ms
            r.ideal_speedup = ref.step_ms / ideal_ms
        peer = peers.get((r.mode, r.checkpointing))
        if peer is not None:
            r.vs_peer = r.tokens_per_s / peer.tokens_per_s


def machine(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def header(config: Config, precision: str, batch_size: int, seq_length: int, device: str) -> str:
    n = sum(p.numel() for p in GPT(config).parameters()) if config.n_embd <= 2048 else None
    size = f", {n / 1e6:.0f}M parameters" if n else ""
    return (f"\n{config.name}: {config.n_layer} layers, n_embd {config.n_embd}{size}; {precision}; batch {batch_size} x "
            f"{seq_length} tokens; {machine(device)}; torch {torch.__version__}\n")


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """One line per configuration; the peer's rows say so in the `impl` column, ours carry the ratio to it."""
    mib = 2**20
    with_peer = any(r["vs_peer"] is not None for r in rows)
    lines = ["| mode | impl | DropBP p (realised) | ckpt | trainable | fwd ms | bwd ms | opt ms | step ms | tokens/s | "
             + ("vs peer | " if with_peer else "") + "speed-up (ideal) | saved for bwd MiB (max) | weights MiB | "
             "grads MiB | optim state MiB | CUDA peak MiB | model TFLOP/s (MFU) |",
             "|---" * (17 + with_peer) + "|"]
    for r in rows:
        peak = f"{r['cuda_peak_bytes'] / mib:.0f}" if r["cuda_peak_bytes"] is not None else "-"
        ours = r["impl"].startswith("ours")
        rate = f"{r['drop_rate']:g} ({r['realised_drop']:.2f})" if ours else "-"
        ideal = f" ({r['ideal_speedup']:.2f}x)" if r["ideal_speedup"] is not None else ""
        speed = f"{r['speedup']:.2f}x{ideal}" if ours else "-"
        vs = (f"**{r['vs_peer']:.2f}x** | " if r["vs_peer"] is not None else "- | ") if with_peer else ""
        mfu = f" ({100 * r['mfu']:.1f}%)" if r["mfu"] is not None else ""
        lines.append(
            f"| {r['mode']} | {r['impl']} | {rate} | {r['checkpointing']} | {r['trainable_params'] / 1e6:.2f}M | "
            f"{r['forward_ms']:.1f} | {r['backward_ms']:.1f} | {r['optimizer_ms']:.1f} | {r['step_ms']:.1f} | "
            f"{r['tokens_per_s']:.0f} | {vs}{speed} | "
            f"{r['saved_for_backward_bytes'] / mib:.1f} ({r['saved_for_backward_max_bytes'] / mib:.1f}) | "
            f"{r['weight_bytes'] / mib:.1f} | {r['gradient_bytes'] / mib:.1f} | "
            f"{r['optimizer_state_bytes'] / mib:.1f} | {peak} | {r['model_tflops']:.2f}{mfu} |"
        )
    return "\n".join(lines)


def plot_results(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """Two panels per configuration: step time split into forward / backward / optimizer, and memory split into
    weights / gradients / optimizer state / saved activations (CUDA peak marked when measured)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def label(r: dict[str, Any]) -> str:
        impl = "" if r["impl"] == "ours" else "\n" + textwrap.fill(r["impl"].removeprefix("ours, "), 14)
        return f"{r['mode']}{impl}\np={r['drop_rate']:g} ck={r['checkpointing']}"

    labels = [label(r) for r in rows]
    xs = range(len(rows))
    fig, (ax_t, ax_m) = plt.subplots(2, 1, figsize=(max(6.0, 1.1 * len(rows)), 7.5), sharex=True)
    bottom = [0.0] * len(rows)
    for part in ("forward", "backward", "optimizer"):
        values = [r[f"{part}_ms"] for r in rows]
        ax_t.bar(xs, values, bottom=bottom, label=part)
        bottom = [b + v for b, v in zip(bottom, values)]
    ax_t.set_ylabel("step time (ms)")
    ax_t.legend(fontsize=8)
    bottom = [0.0] * len(rows)
    for key, name in (("weight_bytes", "weights"), ("gradient_bytes", "gradients"),
                      ("optimizer_state_bytes", "optimizer state"), ("saved_for_backward_bytes", "saved for backward")):
        values = [r[key] / 2**20 for r in rows]
        ax_m.bar(xs, values, bottom=bottom, label=name)
        bottom = [b + v for b, v in zip(bottom, values)]
    peaks = [(x, r["cuda_peak_bytes"] / 2**20) for x, r in zip(xs, rows) if r["cuda_peak_bytes"] is not None]
    if peaks:
        ax_m.scatter(*zip(*peaks), marker="_", s=400, color="black", label="CUDA peak", zorder=3)
    ax_m.set_ylabel("memory (MiB)")
    ax_m.legend(fontsize=8)
    ax_m.set_xticks(list(xs), labels, fontsize=7)
    fig.suptitle(textwrap.fill(title, 110), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    from jsonargparse import CLI

    CLI(benchmark, as_positional=False)
