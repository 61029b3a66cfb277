"""Time and measure one training step per configuration (mode x DropBP rate x activation checkpointing).

Every configuration runs the same step the training loop runs (forward to hidden states, chunked loss, backward,
fused AdamW step) on random weights and tokens. Memory is counted by storage (lit_model.memory), so bytes saved for
backward are the same on CPU and GPU; on CUDA each configuration's peak allocated memory is reported as well.
The configurations of one mode run round-robin, one step each per round, so that their ratios are fair on a noisy
machine: each DropBP rate, the `--peer` rows (another library's own step on the same weights: transformers + PEFT,
litgpt, torchtune; see hf_peer.py, litgpt_peer.py, torchtune_peer.py) and the `--ablate` rows (our step with one
speed-up undone). `--precisions` runs it all once per precision, one table each. `--longest` searches the longest
sequence that fits. Each row's model FLOP/s (the PaLM count) is reported as a share of the matrix-multiply ceiling
measured in the same run (the step's own linear-layer products in the step's dtype, run alone), and on a known GPU
as MFU against its peak.

DropBP's ideal speed-up comes from the same run's rate-0 timings of that mode (DESIGN.md section 2):
time(p) = T_fwd + (1 - p) * T_bwd(blocks) + T_bwd(rest) + T_opt(p), where T_bwd(rest) (LM head, loss, embedding)
is the backward time measured with every branch dropped, p is the FLOPs-weighted share of branch backwards the
timed steps actually dropped, and T_opt(p) is the optimizer time measured at p (AdamW skips parameters that got no
gradient, so full fine-tuning also saves optimizer time; the model only credits the backward).
"""

from __future__ import annotations

import gc
import importlib
import json
import platform
import statistics
import textwrap
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
from tqdm import tqdm

from lit_model import GPT, Config
from lit_model.checkpointing import apply_activation_checkpointing
from lit_model.dropbp import DropBPHandler
from lit_model.loss import head_loss
from lit_model.memory import model_memory, saved_tensor_bytes
from lit_model.peft.lora import LoRAConfig
from lit_model.memory import count_parameters
from lit_model.precision import autocast, canonical, compute_dtype, param_dtype
from lit_model.train.setup import adamw

# Peer name -> its module in scripts/ (on sys.path when this runs as a script), imported only when asked for, so that
# a missing optional package matters only to whoever asks for that peer. Each module offers `require`,
# `covers_checkpointing`, `build`, `loss` and `optimizer` (see litgpt_peer.py).
PEERS = {"hf": "hf_peer", "litgpt": "litgpt_peer", "torchtune": "torchtune_peer"}
# The modes a peer is compared in: QLoRA's NF4 path is not the same kernels in any two libraries, and BAdam is ours.
PEER_MODES = ("full", "lora")
MODES = ("full", "badam", "lora", "qlora")
LR = 1e-5

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
    precision: str = "32-true"
    realised_drop: float = 0.0  # FLOPs-weighted share of branch backwards dropped in the timed steps
    backward_rest_ms: float = 0.0  # backward with every branch dropped: what DropBP cannot remove
    speedup: Optional[float] = None  # rate-0 step time of this mode and checkpointing / this step time
    ideal_speedup: Optional[float] = None
    # peer name -> tokens/s of this row / tokens/s of that peer's row of the same mode and checkpointing
    vs_peers: dict[str, float] = field(default_factory=dict)
    peer_loss_gap: Optional[float] = None  # peer rows: |our loss - its loss| on the same weights and tokens
    model_tflops: float = 0.0  # the model's training FLOPs (PaLM: 6N + 12 L T d per token) / step time
    mfu: Optional[float] = None  # model_tflops / the device's peak
    gemm_share: Optional[float] = None  # model_tflops / the GEMM ceiling measured in this run


def benchmark(
    model: Optional[str] = None,
    overrides: Optional[dict[str, Any]] = None,
    modes: tuple[str, ...] = ("full", "lora", "qlora"),
    rates: tuple[float, ...] = (0.0,),
    checkpointing: tuple[int, ...] = (0, 1),
    precision: Optional[str] = None,
    precisions: Optional[tuple[str, ...]] = None,
    batch_size: int = 2,
    seq_length: int = 256,
    warmup: int = 2,
    repeats: int = 5,
    lora_r: int = 8,
    peer: Union[str, list[str], None] = None,
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
        precisions: several precisions in one run, e.g. '[32-true,bf16-true]': everything (ours and the peers, weights
            in that dtype) is measured once per precision, one table each (instead of --precision).
        batch_size: sequences per step.
        seq_length: tokens per sequence.
        warmup: untimed rounds first.
        repeats: timed rounds (the median is reported); each round runs every configuration of a mode once.
        lora_r: LoRA rank.
        peer: other libraries' training step on the same weights and tokens, timed in the same rounds: one name or a
            list, e.g. '[hf,litgpt]'. hf: transformers' model (PEFT's LoRA) with its own loss, the AdamW its
            Trainer uses by default and its own activation checkpointing (hf_peer.py; the hf or test extra); litgpt: its
            GPT or LoRA GPT and loss, torch's default AdamW, no checkpointing (litgpt_peer.py; the litgpt extra);
            torchtune: its Llama 3 or LoRA Llama 3, chunked loss, fused AdamW, checkpointing of every layer
            (torchtune_peer.py; the torchtune extra). Full and LoRA only; each peer row is its step without DropBP
            (it has none), and each of our rows reports ours / peer tokens per second. Before timing, the peer's
            loss must equal ours (a tolerance for the precision), or the run stops.
        ablate: also time our rate-0 step of full and lora with each of its speed-ups taken back in turn (torch's
            default AdamW instead of the fused one; the loss recomputing its logits in the backward).
            With --peer or --ablate the extra model or optimizer stays resident, so the CUDA peak column includes
            it: take peaks from a run without them.
        longest: also find, for each mode x rate x checkpointing, the longest sequence (a multiple of 128, at most
            the model's block_size) whose training step fits: on CUDA, in the GPU's memory (or the budget); on CPU,
            counted bytes (weights, gradients, optimizer state, saved for backward) within --memory_budget_gib.
        memory_budget_gib: the memory a step may use for --longest (CUDA default: all the GPU has).
        peak_tflops: the device's peak dense TFLOP/s for the model-FLOPs utilisation column (MFU); known for
            H100, H200 and A100 in bf16; without it MFU is left out. The share of the GEMM ceiling (the step's
            linear-layer products timed alone in this run) is reported on every device.
        device: cpu, cuda or auto.
        seed: random seed for weights and tokens.
        json_out: also write the results here.
        plot: also draw step time and memory per configuration into this image (e.g. bench.png; with several
            precisions, one image each, the precision added to the name).
    """
    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    peers = peer_names(peer)
    chosen = check_arguments(modes, precision, precisions, peers, longest, memory_budget_gib, device)
    config = Config.from_name(model, **(overrides or {})) if model else Config(**{**DEFAULT_MODEL, **(overrides or {})})
    for name in peers:
        peer_module(name).require()  # fail before the first measurement, not after
    rates = tuple(sorted({0.0, *rates}))
    runs = [(m, c) for m in modes for c in checkpointing]
    flops = model_flops_per_token(config, seq_length) * batch_size * seq_length
    rows: list[dict[str, Any]] = []
    longest_rows: list[dict[str, Any]] = []
    ceilings: dict[str, dict[str, Any]] = {}
    peaks: dict[str, Optional[float]] = {}
    for prec in chosen:
        # First, while nothing else is resident: the GEMM ceiling of this precision's step.
        ceiling = gemm_ceiling(config, batch_size * seq_length, compute_dtype(prec), torch.device(device), warmup,
                               repeats)
        ceilings[prec] = asdict(ceiling)
        results = []
        for mode, every in tqdm(runs, desc=f"Benchmarking {prec}", unit="mode"):
            results += run_mode(config, mode, every, rates, prec, batch_size, seq_length, warmup, repeats, lora_r,
                                torch.device(device), seed, peers if mode in PEER_MODES else (), ablate)
            gc.collect()
        add_speedups(results)
        peak = peaks[prec] = peak_tflops or device_peak_tflops(device, prec)
        for r in results:
            r.precision = prec
            r.model_tflops = flops / (r.step_ms / 1000) / 1e12
            r.mfu = r.model_tflops / peak if peak else None
            r.gemm_share = r.model_tflops / ceiling.tflops
        table = [asdict(r) for r in results]
        rows += table
        print(header(config, prec, batch_size, seq_length, device))
        print(ceiling_line(ceiling, prec))
        print(markdown_table(table))
        if longest:
            budget = int(memory_budget_gib * 2**30) if memory_budget_gib else None
            found = []
            for mode, every in [(m, c) for m in modes if m != "badam" for c in checkpointing]:
                for p in rates:
                    n, used = longest_sequence(config, mode, every, p, prec, batch_size, lora_r,
                                               torch.device(device), seed, budget)
                    found.append(dict(mode=mode, drop_rate=p, checkpointing=every, longest_seq=n, bytes=used,
                                      precision=prec))
            print(longest_table(found, budget, device))
            longest_rows += found
        if plot is not None:
            path = Path(plot) if len(chosen) == 1 else Path(plot).with_stem(f"{Path(plot).stem}-{prec}")
            plot_results(table, path, header(config, prec, batch_size, seq_length, device).strip())
            print(f"Wrote {path}")
    if json_out is not None:
        Path(json_out).write_text(json.dumps({"config": asdict(config), "precisions": list(chosen), "device": device,
                                              "machine": machine(device), "batch_size": batch_size,
                                              "seq_length": seq_length, "peak_tflops": peaks,
                                              "gemm_ceiling": ceilings, "results": rows, "longest": longest_rows},
                                             indent=2))
    return rows


def check_arguments(modes: tuple[str, ...], precision: Optional[str], precisions: Optional[tuple[str, ...]],
                    peers: tuple[str, ...], longest: bool, memory_budget_gib: Optional[float], device: str
                    ) -> tuple[str, ...]:
    """Every problem with the arguments in one error, before anything is measured; returns the precisions to run
    (canonical names; default bf16-true on CUDA, 32-true on CPU)."""
    problems = []
    if precision is not None and precisions:
        problems.append("give --precision or --precisions, not both")
    chosen = []
    for name in (precisions or (precision or ("bf16-true" if device == "cuda" else "32-true"),)):
        try:
            chosen.append(canonical(name))
        except ValueError as err:
            problems.append(str(err).rstrip("."))
    unknown_modes = [m for m in modes if m not in MODES]
    if unknown_modes:
        problems.append(f"unknown mode(s) {', '.join(map(repr, unknown_modes))}: use {', '.join(MODES)}")
    unknown = [p for p in peers if p not in PEERS]
    if unknown:
        problems.append(unknown_peer_message(unknown))
    if peers and not any(m in PEER_MODES for m in modes):
        problems.append(f"--peer compares the modes {' and '.join(PEER_MODES)}; --modes has neither")
    if longest and memory_budget_gib is None and device != "cuda":
        problems.append("--longest on CPU needs --memory_budget_gib (a CPU step does not run out of memory)")
    if problems:
        raise ValueError("Invalid benchmark arguments: " + "; ".join(problems))
    return tuple(dict.fromkeys(chosen))


def peer_names(peer: Union[str, list[str], tuple[str, ...], None]) -> tuple[str, ...]:
    """The peers asked for: one name, a list, or a comma-separated string ("hf,litgpt"); in order, once each."""
    if peer is None:
        return ()
    names = peer.split(",") if isinstance(peer, str) else list(peer)
    return tuple(dict.fromkeys(n.strip() for n in names if n.strip()))


def unknown_peer_message(names: list[str]) -> str:
    return f"unknown peer(s) {', '.join(map(repr, names))}: the peers are {', '.join(PEERS)}"


def peer_module(name: str) -> Any:
    """The module (scripts/<name>_peer.py) that builds and runs peer `name`."""
    if name not in PEERS:
        message = unknown_peer_message([name])
        raise ValueError(message[0].upper() + message[1:])
    return importlib.import_module(PEERS[name])


def lora_config(lora_r: int) -> LoRAConfig:
    """The benchmark's adapters: query, value, projection and MLP, alpha 2 r, no dropout (so peers match)."""
    return LoRAConfig(r=lora_r, alpha=2 * lora_r, dropout=0.0, query=True, value=True, projection=True, mlp=True)


def build(config: Config, mode: str, precision: str, lora_r: int, device: torch.device) -> GPT:
    """Random weights in the layout of the mode: all trainable, LoRA, or LoRA on 4-bit weights."""
    from lit_model.peft.lora import apply_lora

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
    return apply_lora(model, lora_config(lora_r)).to(device)


def run_mode(
    config: Config, mode: str, every: int, rates: tuple[float, ...], precision: str, batch_size: int, seq_length: int,
    warmup: int, repeats: int, lora_r: int, device: torch.device, seed: int, peers: tuple[str, ...] = (),
    ablate: bool = False,
) -> list[Result]:
    """Time every DropBP rate of one mode on one model (and each peer's step on the same weights), round-robin step
    by step, so that the machine's drift affects all of them alike and their ratios are fair; plus the backward with
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
    # Each peer covers some of the (mode, checkpointing) pairs; None for the others.
    built = {name: build_peer(name, model, mode, every, lora_r, device, precision, tokens) for name in peers}
    peer_runs = {name: run for name, run in built.items() if run is not None}
    # Ablations: our rate-0 step with one of its speed-ups taken back (torch's default AdamW; the loss recomputing
    # its logits in the backward), timed in the same rounds.
    ablations = ABLATIONS if ablate and mode in ("full", "lora") else {}
    default_adamw = make_optimizer(model, mode, fused=False) if "default AdamW" in ablations else None

    def step_parts(key: float | str) -> tuple[torch.nn.Module, torch.optim.Optimizer, Callable[[], torch.Tensor], Any]:
        if key in peer_runs:
            run = peer_runs[key]
            return run.model, run.optimizer, run.loss, None
        mask = all_dropped if key == "rest" else (handlers[key].set_dropped_layers() if key in handlers else None)

        def loss() -> torch.Tensor:
            return step_loss(model, tokens, mask, grad_in_forward=key != "recomputed loss")

        return model, (default_adamw if key == "default AdamW" else optimizer), loss, mask

    keys: tuple[float | str, ...] = (*rates, "rest", *peer_runs, *ablations)
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
            del loss
    rest_ms = 1000 * statistics.median(stats["rest"].times["backward"])
    results = [stats[p].result(mode, p, every, model, batch_size * seq_length, rest_ms) for p in rates]
    for name, run in peer_runs.items():
        results.append(stats[name].result(mode, 0.0, every, run.model, batch_size * seq_length, None,
                                          impl=name, loss_gap=run.loss_gap))
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


# How far a peer's loss may be from ours, relative to the loss (at least 1), by the dtype the arithmetic runs in.
# Measured on a 2-layer, n_embd 512, vocab 32000 model at the benchmark's init, batch 2 x 256: the hf, litgpt and
# torchtune float32 losses are within 2e-7 of ours (relative). The same model with a wrong RoPE base moves the
# float32 loss by 1.4e-4, with one layer's query input permuted by 2.7e-4, with the labels off by one by 1.5e-3: at
# init (std 0.02) the logits are small and the loss is close to log(vocab) whatever the model, so float32's
# tolerance is tight, 50x above the noise and 14x below the smallest of those errors. In bf16 the hf and torchtune
# losses are within 2e-5 of ours, but litgpt's is 1.6e-3 away: it takes the cross-entropy of bf16 logits in bf16, and
# a bf16 number near 10 is only known to 2^-8 relative. So bf16's tolerance (2.5 such steps) refuses only gross
# errors (a model computing something else); the float32 table of the same run (--precisions) is the fine check,
# and the tests (weights at std 0.2, logits and gradients compared) the finest.
LOSS_TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def build_peer(peer: str, model: GPT, mode: str, every: int, lora_r: int, device: torch.device, precision: str,
               tokens: torch.Tensor) -> Optional[PeerRun]:
    """The peer's model with our model's weights, its optimizer and its training-step loss, as its scripts run them.

    Refuses to time a peer whose loss on the same weights and tokens differs from ours: that would not be the same
    model. None for what the peer comparison does not cover: modes other than full and LoRA, and activation
    checkpointing the peer does not have (litgpt has none; torchtune checkpoints every layer or none).
    """
    module = peer_module(peer)
    if mode not in PEER_MODES or not module.covers_checkpointing(every):
        return None
    lora = lora_config(lora_r) if mode == "lora" else None
    peer_model = module.build(model, lora, device, param_dtype(precision), every).train()
    with torch.no_grad(), autocast(precision, device):
        ours = float(step_loss(model, tokens))
        theirs = float(module.loss(peer_model, tokens))
    gap = abs(ours - theirs)
    tolerance = LOSS_TOLERANCE[compute_dtype(precision)]
    if not gap <= tolerance * max(1.0, abs(ours)):  # `not <=`: a NaN loss is refused too
        raise RuntimeError(f"{peer}'s loss {theirs:.6f} differs from ours {ours:.6f} on the same weights and tokens "
                           f"({mode}, {precision}; tolerance {tolerance:g} relative): the peer model is not the same "
                           "model, so its timing would not compare")
    return PeerRun(peer_model, module.optimizer(peer_model, LR), lambda: module.loss(peer_model, tokens), gap)


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
    N the matrix parameters (embedding excluded, LM head included: `linear_shapes`). The same for every mode and
    DropBP rate, so MFU compares rows as throughput does: a LoRA or DropBP step that skips work shows as higher
    utilisation."""
    c = config
    n_matrix = sum(count * k * n for _, k, n, count in linear_shapes(c))
    return 6.0 * n_matrix + 12.0 * c.n_layer * seq_length * c.n_head * c.head_size


def linear_shapes(config: Config) -> list[tuple[str, int, int, int]]:
    """The model's matrix multiplications by weight: (names, in_features, out_features, how many per forward)."""
    c = config
    q, kv = c.n_head * c.head_size, c.n_query_groups * c.head_size
    mlp = [("mlp.fc", c.n_embd, c.intermediate_size, c.n_layer)] if c.mlp_class_name == "GptNeoxMLP" else \
        [("mlp.fc_1, mlp.fc_2", c.n_embd, c.intermediate_size, 2 * c.n_layer)]
    return [("attn.query", c.n_embd, q, c.n_layer), ("attn.key, attn.value", c.n_embd, kv, 2 * c.n_layer),
            ("attn.proj", q, c.n_embd, c.n_layer), *mlp, ("mlp.proj", c.intermediate_size, c.n_embd, c.n_layer),
            ("lm_head", c.n_embd, c.vocab_size, 1)]


@dataclass
class GemmCeiling:
    """The step's matrix products timed alone: what this machine's GEMMs reach on the step's shapes and dtype."""

    dtype: str
    tokens: int  # rows of every product: batch_size x seq_length
    tflops: float  # all the products of one training step back to back: their FLOPs / their time
    best_tflops: float  # the fastest single shape
    shapes: list[dict[str, Any]] = field(default_factory=list)  # per distinct (in, out): names, count, TFLOP/s


def gemm_ceiling(config: Config, tokens: int, dtype: torch.dtype, device: torch.device, warmup: int, repeats: int,
                 ) -> GemmCeiling:
    """Time each of the model's linear-layer shapes as one training step multiplies it (N = tokens rows): the forward
    X (N, in) @ W.T, the input gradient dY (N, out) @ W and the weight gradient dY.T @ X, in the operand layouts
    `nn.Linear` uses, in the step's compute dtype, after at least one untimed warm-up (the median of `repeats` timed
    runs, as the step rows are). The ceiling weighs each shape by how often one step runs it: the rate the step's
    matrix products reach with nothing else in the step (attention's own products, SDPA, are not included; the
    model FLOPs count them, which a share above 100% for rows that skip work shows anyway)."""
    groups: dict[tuple[int, int], list[Any]] = {}
    for names, k, n, count in linear_shapes(config):
        group = groups.setdefault((k, n), [[], 0])
        group[0].append(names)
        group[1] += count
    shapes, total_flops, total_s = [], 0.0, 0.0
    gen = torch.Generator(device=device).manual_seed(0)
    for (k, n), (names, count) in groups.items():
        x = torch.randn(tokens, k, generator=gen, device=device, dtype=dtype)  # (N, in)
        w = torch.randn(n, k, generator=gen, device=device, dtype=dtype)  # (out, in), as nn.Linear stores it
        dy = torch.randn(tokens, n, generator=gen, device=device, dtype=dtype)  # (N, out)
        times = []
        for i in range(max(warmup, 1) + max(repeats, 1)):
            t0 = now(device)
            _ = (x @ w.t(), dy @ w, dy.t() @ x)
            t1 = now(device)
            if i >= max(warmup, 1):
                times.append(t1 - t0)
        seconds, flops = statistics.median(times), 3 * 2.0 * tokens * k * n
        shapes.append(dict(names=", ".join(names), in_features=k, out_features=n, per_step=count,
                           tflops=flops / seconds / 1e12))
        total_flops += count * flops
        total_s += count * seconds
        del x, w, dy
    return GemmCeiling(dtype=str(dtype).removeprefix("torch."), tokens=tokens, tflops=total_flops / total_s / 1e12,
                       best_tflops=max(s["tflops"] for s in shapes), shapes=shapes)


def ceiling_line(ceiling: GemmCeiling, precision: str) -> str:
    """The ceiling and its shapes, printed above the table."""
    each = "; ".join(f"{s['names']} {s['in_features']}x{s['out_features']} (x{s['per_step']}): {s['tflops']:.3g}"
                     for s in ceiling.shapes)
    return (f"GEMM ceiling ({precision}, {ceiling.dtype}; the step's linear-layer products alone, {ceiling.tokens} "
            f"rows, forward + both gradients): {ceiling.tflops:.3g} TFLOP/s (the best shape {ceiling.best_tflops:.3g});"
            f" per shape, TFLOP/s: {each}\n")


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
        return adamw(params, lr=LR) if fused else torch.optim.AdamW(params, lr=LR)
    from lit_model.badam import BlockOptimizer

    named = list(model.named_parameters())
    base = torch.optim.AdamW([p for _, p in named], lr=LR)
    return BlockOptimizer(base, named, switch_block_every=10**9, switch_mode="ascending", verbose=0)


def now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def add_speedups(results: list[Result]) -> None:
    """Speed-up of each of our rows against our rate-0 row of the same mode and checkpointing (with DropBP's ideal
    for the DropBP rows), and each of our rows' throughput against every peer's row of the same mode and
    checkpointing that ran (a peer has no DropBP: its row is its plain step, the reference of all our rates)."""
    base = {(r.mode, r.checkpointing): r for r in results if r.drop_rate == 0 and r.impl == "ours"}
    peers: dict[tuple[str, int], list[Result]] = {}
    for r in results:
        if not r.impl.startswith("ours"):
            peers.setdefault((r.mode, r.checkpointing), []).append(r)
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
        r.vs_peers = {p.impl: r.tokens_per_s / p.tokens_per_s for p in peers.get((r.mode, r.checkpointing), [])}


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
    """One line per configuration; the peers' rows say so in the `impl` column, ours carry the ratio to each peer
    (one column per peer that ran)."""
    mib = 2**20
    peers = list(dict.fromkeys(name for r in rows for name in r["vs_peers"]))
    lines = ["| mode | impl | DropBP p (realised) | ckpt | trainable | fwd ms | bwd ms | opt ms | step ms | tokens/s | "
             + "".join(f"ours / {p} | " for p in peers) + "speed-up (ideal) | saved for bwd MiB (max) | weights MiB | "
             "grads MiB | optim state MiB | CUDA peak MiB | model TFLOP/s (MFU) | % of GEMM ceiling |",
             "|---" * (18 + len(peers)) + "|"]
    for r in rows:
        peak = f"{r['cuda_peak_bytes'] / mib:.0f}" if r["cuda_peak_bytes"] is not None else "-"
        ours = r["impl"].startswith("ours")
        rate = f"{r['drop_rate']:g} ({r['realised_drop']:.2f})" if ours else "-"
        ideal = f" ({r['ideal_speedup']:.2f}x)" if r["ideal_speedup"] is not None else ""
        speed = f"{r['speedup']:.2f}x{ideal}" if ours else "-"
        vs = "".join(f"**{r['vs_peers'][p]:.2f}x** | " if p in r["vs_peers"] else "- | " for p in peers)
        mfu = f" ({100 * r['mfu']:.1f}%)" if r["mfu"] is not None else ""
        share = f"{100 * r['gemm_share']:.0f}%" if r["gemm_share"] is not None else "-"
        lines.append(
            f"| {r['mode']} | {r['impl']} | {rate} | {r['checkpointing']} | {r['trainable_params'] / 1e6:.2f}M | "
            f"{r['forward_ms']:.1f} | {r['backward_ms']:.1f} | {r['optimizer_ms']:.1f} | {r['step_ms']:.1f} | "
            f"{r['tokens_per_s']:.0f} | {vs}{speed} | "
            f"{r['saved_for_backward_bytes'] / mib:.1f} ({r['saved_for_backward_max_bytes'] / mib:.1f}) | "
            f"{r['weight_bytes'] / mib:.1f} | {r['gradient_bytes'] / mib:.1f} | "
            f"{r['optimizer_state_bytes'] / mib:.1f} | {peak} | {r['model_tflops']:.2f}{mfu} | {share} |"
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
    from lit_model.cli import script_main

    script_main(benchmark)
