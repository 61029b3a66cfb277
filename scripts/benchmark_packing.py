"""Useful (non-padding) tokens per second of a training epoch: padding-free packing vs padded batches vs litgpt.

Instruction data is mostly short samples and a few long ones; a padded micro-batch is as long as its longest
sample, so much of its compute is padding. This script draws sample lengths from an Alpaca-like distribution
(`alpaca_like_lengths`), and trains one epoch over the same samples three ways, timed step by step in turn
(round-robin, so the machine's drift affects all alike):

- `padded`: our step on micro-batches of `--micro_batch_size` samples, right-padded to the longest
  (lit_model.data.sft.collate, the loop's default);
- `packed`: our step on first-fit bins of whole samples (lit_model.data.batches.first_fit) of at most
  micro_batch_size x the mean length tokens (the loop's default budget), one row each, block-diagonal attention
  (lit_model.data.sft.collate_packed; `--data.packing true`);
- `litgpt padded` (`--peer litgpt`): litgpt's model and loss on the padded micro-batches, torch's default AdamW, as
  its fine-tuning scripts run them (scripts/litgpt_peer.py).

Each row: the epoch's useful tokens (every sample's tokens, counted once) over the summed step times. Before timing,
the packed and padded losses of the same samples are checked equal (the packed step computes the padded one's
loss), and litgpt's padded loss equal to ours.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from tqdm import tqdm

from lit_model import GPT, Config
from lit_model.data import IGNORE_INDEX
from lit_model.data.batches import first_fit
from lit_model.data.sft import collate, collate_packed, inputs_targets
from lit_model.dropbp import DropBPHandler
from lit_model.loss import head_loss
from lit_model.precision import autocast, canonical

import benchmark as bench  # scripts/benchmark.py: this script's directory is first on sys.path when run

# A Llama-shaped model a single CPU core trains an epoch of in minutes; the matrix products still dominate.
PACKING_MODEL = dict(name="bench-llama-small", n_layer=4, n_head=8, n_embd=512, n_query_groups=4,
                     intermediate_size=1408, vocab_size=16000, block_size=2048)

# Alpaca-like lengths (tokens per rendered sample, prompt and answer): log-normal with median 120 and sigma 0.6,
# so mean 144, 90th percentile 260, 99th 490, clipped to [24, 1024]. Alpaca's 52k records average about 900 bytes
# with the template (its dataset card), about 150 tokens at 6 bytes per token of English BPE; most are short, a
# few are long. This is a reproducible stand-in for that shape, not a measurement of Alpaca itself.
MEDIAN, SIGMA, SHORTEST, LONGEST = 120, 0.6, 24, 1024


def alpaca_like_lengths(n: int, seed: int) -> list[int]:
    """`n` sample lengths from the distribution above, seeded."""
    g = torch.Generator().manual_seed(seed)
    draws = torch.randn(n, generator=g, dtype=torch.float64) * SIGMA + math.log(MEDIAN)
    return [min(LONGEST, max(SHORTEST, round(math.exp(float(x))))) for x in draws]


def make_samples(lengths: list[int], vocab_size: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """SFT samples of those lengths: random tokens, the first 40% (the prompt) masked out of the loss."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(0, vocab_size, (n,), generator=g)
        labels = ids.clone()
        labels[: int(0.4 * n)] = IGNORE_INDEX
        out.append({"input_ids": ids, "labels": labels})
    return out


@dataclass
class Row:
    mode: str
    impl: str
    drop_rate: float
    steps: int
    useful_tokens: int
    computed_tokens: int  # positions the model ran, padding included
    epoch_s: float
    useful_tokens_per_s: float
    vs_padded: Optional[float] = None
    vs_litgpt: Optional[float] = None


def benchmark_packing(
    modes: tuple[str, ...] = ("full", "lora"),
    rates: tuple[float, ...] = (0.0, 0.5),
    micro_batch_size: int = 8,
    samples: int = 96,
    epochs: int = 1,
    warmup_steps: int = 2,
    peer: Optional[str] = "litgpt",
    precision: str = "32-true",
    overrides: Optional[dict[str, Any]] = None,
    lora_r: int = 8,
    device: str = "cpu",
    seed: int = 0,
    json_out: Optional[Path] = None,
) -> list[dict[str, Any]]:
    """Time an epoch over the same Alpaca-like samples packed, padded and (with --peer litgpt) in litgpt.

    Args:
        modes: full and/or lora (query, value, projection and MLP adapters, as scripts/benchmark.py).
        rates: DropBP rates of our padded and packed rows (uniform per branch).
        micro_batch_size: samples per padded micro-batch; the packed budget is this times the mean length (at least
            the longest sample), as `--data.packing` sets it by default.
        samples: samples in the epoch.
        epochs: timed epochs (each the same samples, the same order).
        warmup_steps: untimed steps of every row first.
        peer: litgpt (its padded step, the reference) or None.
        precision: 32-true or bf16-true.
        overrides: model Config fields to change, e.g. '{"n_layer": 2}'.
        lora_r: LoRA rank.
        device: cpu or cuda.
        seed: random seed for weights, lengths, tokens and DropBP masks.
        json_out: also write the rows here.
    """
    precision = canonical(precision)
    config = Config(**{**PACKING_MODEL, **(overrides or {})})
    dev = torch.device(device)
    lengths = alpaca_like_lengths(samples, seed)
    data = make_samples(lengths, config.vocab_size, seed)
    order = torch.randperm(samples, generator=torch.Generator().manual_seed(seed)).tolist()
    padded = [collate([data[i] for i in order[k:k + micro_batch_size]])
              for k in range(0, samples - samples % micro_batch_size, micro_batch_size)]
    inputs_lengths = [n - 1 for n in lengths]
    budget = max(round(micro_batch_size * sum(inputs_lengths) / samples), max(inputs_lengths))
    used = order[: len(padded) * micro_batch_size]  # the samples the padded epoch covers; packing takes the same
    packed = [collate_packed([data[i] for i in b]) for b in first_fit(used, inputs_lengths, budget)]
    useful = sum(inputs_lengths[i] for i in used)
    print(f"{len(used)} samples (lengths: median {statistics.median(lengths):.0f}, mean {statistics.mean(lengths):.0f}, "
          f"max {max(lengths)}), {useful} useful tokens; padded: {len(padded)} micro-batches of {micro_batch_size}, "
          f"{useful / sum(b['input_ids'][:, :-1].numel() for b in padded):.0%} useful; packed: {len(packed)} rows of "
          f"at most {budget} tokens, {useful / (len(packed) * budget):.0%} of the budget used")
    rows: list[Row] = []
    for mode in modes:
        rows += time_mode(config, mode, rates, padded, packed, useful, precision, lora_r, dev, seed, epochs,
                          warmup_steps, peer)
    for r in rows:
        ref = next(x for x in rows if x.mode == r.mode and x.impl == "ours padded" and x.drop_rate == 0)
        r.vs_padded = r.useful_tokens_per_s / ref.useful_tokens_per_s
        lit = next((x for x in rows if x.mode == r.mode and x.impl == "litgpt padded"), None)
        r.vs_litgpt = r.useful_tokens_per_s / lit.useful_tokens_per_s if lit else None
    table = [asdict(r) for r in rows]
    print(f"\n{config.name}: {config.n_layer} layers, n_embd {config.n_embd}, vocab {config.vocab_size}; {precision}; "
          f"{bench.machine(device)}; torch {torch.__version__}\n")
    print(markdown_table(table))
    if json_out is not None:
        Path(json_out).write_text(json.dumps({"config": asdict(config), "precision": precision,
                                              "machine": bench.machine(device), "lengths": lengths,
                                              "budget": budget, "rows": table}, indent=2))
    return table


def time_mode(config: Config, mode: str, rates: tuple[float, ...], padded: list[dict[str, Any]],
              packed: list[dict[str, Any]], useful: int, precision: str, lora_r: int, device: torch.device,
              seed: int, epochs: int, warmup_steps: int, peer: Optional[str]) -> list[Row]:
    """Every row of one mode on one model, one step of each row per round."""
    torch.manual_seed(seed)
    model = bench.build(config, mode, precision, lora_r, device).train()
    optimizer = bench.make_optimizer(model, mode)
    amp = autocast(precision, device)
    handlers = {p: DropBPHandler(model, drop_rate=p, seed=seed) for p in rates if p > 0}
    check_packed_loss(model, padded[0], amp)
    steps: dict[tuple[str, float], Callable[[dict[str, Any]], None]] = {}
    batches: dict[tuple[str, float], list[dict[str, Any]]] = {}

    def ours(p: float) -> Callable[[dict[str, Any]], None]:
        def step(batch: dict[str, Any]) -> None:
            inputs, targets, segments = inputs_targets(batch)
            mask = handlers[p].set_dropped_layers() if p in handlers else None
            with amp:
                hidden = model(inputs.to(device), drop_mask=mask, return_hidden=True, segments=segments)
                loss = head_loss(model.lm_head, hidden, targets.to(device))
            if loss.grad_fn is not None:
                loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return step

    for p in rates:
        for kind, data in (("padded", padded), ("packed", packed)):
            steps[(f"ours {kind}", p)], batches[(f"ours {kind}", p)] = ours(p), data
    if peer == "litgpt" and mode in bench.PEER_MODES:
        lit = bench.peer_module("litgpt")
        lit_model = lit.build(model, bench.lora_config(lora_r) if mode == "lora" else None, device,
                              model.lm_head.weight.dtype).train()
        lit_opt = lit.optimizer(lit_model, bench.LR)
        check_litgpt_loss(model, lit_model, padded[0], amp)

        def litgpt_step(batch: dict[str, Any]) -> None:
            from litgpt.utils import chunked_cross_entropy

            inputs, targets, _ = inputs_targets(batch)
            with amp:
                logits = lit_model(inputs.to(device), lm_head_chunk_size=lit.LITGPT_LM_HEAD_CHUNK)
                loss = chunked_cross_entropy(logits, targets.to(device))
            loss.backward()
            lit_opt.step()
            lit_opt.zero_grad(set_to_none=True)

        steps[("litgpt padded", 0.0)], batches[("litgpt padded", 0.0)] = litgpt_step, padded
    elif peer not in (None, "litgpt"):
        raise SystemExit(f"--peer {peer!r}: the packing benchmark compares with litgpt's padded step only")
    for key, step in steps.items():  # warm-up: allocator, kernels, optimizer state
        for batch in batches[key][:warmup_steps]:
            step(batch)
    elapsed = {key: 0.0 for key in steps}
    longest = max(len(b) for b in batches.values())
    for _ in range(epochs):
        for i in tqdm(range(longest), desc=f"{mode} epoch", unit="round", leave=False):
            for key, step in steps.items():
                if i < len(batches[key]):
                    t0 = bench.now(device)
                    step(batches[key][i])
                    elapsed[key] += bench.now(device) - t0
    return [Row(mode=mode, impl=impl, drop_rate=p, steps=len(batches[(impl, p)]), useful_tokens=useful * epochs,
                computed_tokens=sum(inputs_targets(b)[0].numel() for b in batches[(impl, p)]) * epochs,
                epoch_s=elapsed[(impl, p)] / epochs, useful_tokens_per_s=useful * epochs / elapsed[(impl, p)])
            for impl, p in steps]


def check_packed_loss(model: GPT, batch: dict[str, Any], amp: Any) -> None:
    """The packed row of a padded batch's samples must have the padded batch's loss (the same tokens, the same
    normalisation), or timing it would compare different computations."""
    samples = [{"input_ids": batch["input_ids"][i, :n], "labels": batch["labels"][i, :n]}
               for i, n in enumerate(batch["lengths"].tolist())]
    with torch.no_grad(), amp:
        losses = []
        for b in (batch, collate_packed(samples)):
            inputs, targets, segments = inputs_targets(b)
            hidden = model(inputs.to(model.lm_head.weight.device), return_hidden=True, segments=segments)
            losses.append(float(head_loss(model.lm_head, hidden, targets.to(hidden.device))))
    if not abs(losses[0] - losses[1]) <= 1e-4 * max(1.0, abs(losses[0])):
        raise RuntimeError(f"packed loss {losses[1]:.6f} != padded loss {losses[0]:.6f} on the same samples")


def check_litgpt_loss(model: GPT, lit_model: torch.nn.Module, batch: dict[str, Any], amp: Any) -> None:
    """litgpt's padded loss must be ours on the same weights and batch (bench.LOSS_TOLERANCE)."""
    from litgpt.utils import chunked_cross_entropy

    inputs, targets, _ = inputs_targets(batch)
    device = model.lm_head.weight.device
    with torch.no_grad(), amp:
        ours = float(head_loss(model.lm_head, model(inputs.to(device), return_hidden=True), targets.to(device)))
        theirs = float(chunked_cross_entropy(lit_model(inputs.to(device)), targets.to(device)))
    tolerance = bench.LOSS_TOLERANCE[model.lm_head.weight.dtype]
    if not abs(ours - theirs) <= tolerance * max(1.0, abs(ours)):
        raise RuntimeError(f"litgpt's loss {theirs:.6f} differs from ours {ours:.6f} on the same padded batch")


def markdown_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| mode | impl | DropBP p | steps | computed / useful tokens | epoch s | useful tokens/s | vs ours padded "
             "p=0 | vs litgpt padded |", "|---" * 9 + "|"]
    for r in rows:
        lit = f"**{r['vs_litgpt']:.2f}x**" if r["vs_litgpt"] is not None else "-"
        lines.append(f"| {r['mode']} | {r['impl']} | {r['drop_rate']:g} | {r['steps']} | "
                     f"{r['computed_tokens'] / r['useful_tokens']:.2f} | {r['epoch_s']:.1f} | "
                     f"{r['useful_tokens_per_s']:.0f} | **{r['vs_padded']:.2f}x** | {lit} |")
    return "\n".join(lines)


if __name__ == "__main__":
    from lit_model.cli import script_main

    script_main(benchmark_packing)
