"""DropBP: drop the backward of residual branches, with per-branch rates allocated from sensitivity and FLOPs.

The model side lives in `lit_model.model`: `GPT.forward(idx, drop_mask=...)` runs each dropped branch under
`torch.no_grad()`. This file decides the masks and the rates:

- `branch_flops`: forward FLOPs per token of every branch, from the real shapes and the sequence length.
- `allocate_greedy` (the reference allocator) and `allocate_flops_aware` (an exact convex allocation).
- `DropBPHandler`: owns the rates, a seeded `torch.Generator` that draws one mask per micro-batch (reproducible,
  identical on every rank, saved with the checkpoint), and the sensitivity measurement.

Branch order everywhere (rates, sensitivities, FLOPs): interleaved per block, [attn_0, mlp_0, attn_1, mlp_1, ...],
the order in which the official code's gate modules appear in `model.modules()`. The golden allocation vectors of
DESIGN.md section 2 hold in this order only.
"""

from __future__ import annotations

import heapq
import math
import random
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Literal, Optional, Sequence, Union

import torch
import torch.nn as nn

from lit_model.config import Config
from lit_model.model import Block

Sampler = Literal["independent", "topup", "stratified", "prefix"]
Allocator = Literal["greedy", "flops"]
SAMPLERS = ("independent", "topup", "stratified", "prefix")
SENSITIVITY_METHODS = ("exact", "estimate")
# Samplers whose per-branch rates come from the rates list (and so from sensitivity allocation); `prefix` derives
# its rates from where its cut falls.
RATE_SAMPLERS = ("independent", "topup", "stratified")
ALLOCATORS = ("greedy", "flops")

MAX_RATE = 0.9  # the reference caps every branch's rate here: each branch keeps at least 10% of its backward passes
# Relative slack when comparing a FLOPs-weighted mean with its target: absorbs the binary rounding of e.g. 0.3.
_REL_TOL = 1e-9

Mask = list[tuple[bool, bool]]
# The calibration contract: given a drop mask (one (drop_attn, drop_mlp) row per block), run the model's forward on
# one fixed sample with that mask and return the scalar loss with its graph. A sequence of such callables (one per
# sample) averages the sensitivities over the samples.
Backprop = Callable[[Mask], torch.Tensor]


# ---- FLOPs ---------------------------------------------------------------------------------------------------------


def branch_flops(config: Config, seq_len: int) -> list[float]:
    """Forward FLOPs per token of every residual branch, [attn_0, mlp_0, attn_1, mlp_1, ...] (2 * n_layer entries).

    Matrix multiplications only (norms, RoPE and activations are negligible), 2 FLOPs per multiply-add:
    attention = 2 * (h * (n_head + 2 * n_kv) * hs + n_head * hs * h)   q, k, v and output projections
              + 4 * seq_len * n_head * hs                               scores q.k and the weighted sum of v
    MLP       = 2 * k * h * intermediate_size                           k = 2 (GptNeoxMLP), 3 (LLaMAMLP, GemmaMLP)
    with h = n_embd, hs = head_size, n_kv = n_query_groups. Attention counts every query against all seq_len keys
    (the dense count of the math kernel, of `torch.utils.flop_counter` and of the official code; a causal flash
    kernel skips about half of the score blocks). GQA shrinks only the k and v projections: the scores still run
    per query head. DESIGN.md's `2*(h*(n_head + 2*n_kv)*hs + h*h) + 4*s*h` is this formula when n_head * hs == h;
    Gemma's heads are wider (gemma-7b: 16 * 256 = 4096 vs h = 3072), so the output projection and the scores use
    n_head * hs here. The official code additionally hard-codes seq_len = 512. Only ratios between branches matter.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be a positive number of tokens, got {seq_len}")
    h, nh, n_kv, hs = config.n_embd, config.n_head, config.n_query_groups, config.head_size
    assert n_kv is not None and hs is not None and config.intermediate_size is not None  # filled by __post_init__
    attn = 2 * (h * (nh + 2 * n_kv) * hs + nh * hs * h) + 4 * seq_len * nh * hs
    n_matrices = 2 if config.mlp_class_name == "GptNeoxMLP" else 3
    mlp = 2 * n_matrices * h * config.intermediate_size
    return [float(attn), float(mlp)] * config.n_layer


def branch_names(n_layer: int) -> list[str]:
    """Names of the branches in the order of rates, sensitivities and FLOPs: attn_0, mlp_0, attn_1, ..."""
    return [f"{kind}_{i}" for i in range(n_layer) for kind in ("attn", "mlp")]


def flops_weighted_mean(rates: Sequence[float], flops: Sequence[float]) -> float:
    """The FLOPs-weighted mean drop rate: the expected fraction of the blocks' backward FLOPs that is skipped."""
    if len(rates) != len(flops) or not flops:
        raise ValueError(f"Need one rate per branch: got {len(rates)} rates for {len(flops)} FLOPs entries")
    return sum(r * f for r, f in zip(rates, flops)) / sum(flops)


# ---- allocation ----------------------------------------------------------------------------------------------------


def _check_allocation(
    sensitivities: Sequence[float], flops: Sequence[float], target: float, min_rate: float, top: float = MAX_RATE
) -> None:
    if len(sensitivities) != len(flops) or not flops:
        raise ValueError(f"Need one sensitivity per branch: got {len(sensitivities)} for {len(flops)} FLOPs entries")
    if any(not math.isfinite(s) or s < 0 for s in sensitivities):
        raise ValueError(f"Sensitivities must be finite and non-negative, got {list(sensitivities)}")
    if any(not math.isfinite(f) or f <= 0 for f in flops):
        raise ValueError(f"FLOPs must be finite and positive, got {list(flops)}")
    if not 0.0 <= min_rate <= MAX_RATE:
        raise ValueError(f"min_rate must be in [0, {MAX_RATE}], got {min_rate}")
    if target < 0.0:
        raise ValueError(f"The target drop rate must be >= 0, got {target}")
    if min_rate > target + _REL_TOL:
        raise ValueError(
            f"min_rate ({min_rate}) exceeds the target drop rate ({target}): every branch drops at least min_rate, so "
            "the mean would overshoot the target. Lower min_rate or raise the target."
        )
    if target > top + _REL_TOL:
        raise ValueError(
            f"The target drop rate {target} is infeasible: rates are capped at {top:g} (MAX_RATE {MAX_RATE} on the "
            f"0.1 grid from min_rate {min_rate}), so the FLOPs-weighted mean cannot exceed {top:g}. Lower the target."
        )


def allocate_greedy(
    sensitivities: Sequence[float], flops: Sequence[float], target: float, min_rate: float = 0.0
) -> list[float]:
    """The reference allocator: raise rates by 0.1 where it costs least until the FLOPs-weighted mean >= target.

    Every rate starts at min_rate; the next step goes to the branch with the least cost S_l * (b_l + 0.1) (ties to
    the higher index, as the official priority queue breaks them), never past MAX_RATE; it stops at the first step
    at which the FLOPs-weighted mean reaches the target (so it may overshoot by up to one step of one branch).
    Rates are kept as integer tenths above min_rate: summing 0.1 in floating point lets a rate creep to
    0.8999999 < 0.9 and take a step past the cap, and the stopping test wobble.
    """
    n_steps_max = math.floor((MAX_RATE - min_rate) * 10 + 1e-9) if 0 <= min_rate <= MAX_RATE else 0
    _check_allocation(sensitivities, flops, target, min_rate, top=min_rate + n_steps_max / 10)
    S, f = [float(s) for s in sensitivities], [float(x) for x in flops]
    total = sum(f)
    # Stop when sum_l f_l * b_l >= target * total, with b_l = min_rate + k_l / 10: sum_l f_l * k_l >= need.
    need = 10 * (target - min_rate) * total
    steps = [0] * len(f)
    # Costs in tenths, S_l * (10 * b_l + 1), so that equal costs compare equal (3 * 0.1 != 1 * 0.3 in floats).
    base = 10 * min_rate
    heap = [(S[i] * (base + 1), -i) for i in range(len(f))]  # (cost of the next step, -index): ties to higher index
    heapq.heapify(heap)
    done = 0.0
    while done < need - _REL_TOL * total and heap:
        _, neg_i = heapq.heappop(heap)
        i = -neg_i
        steps[i] += 1
        done += f[i]
        if steps[i] < n_steps_max:
            heapq.heappush(heap, (S[i] * (base + steps[i] + 1), neg_i))
    return [round(min_rate + k / 10, 12) for k in steps]


def allocate_flops_aware(
    sensitivities: Sequence[float], flops: Sequence[float], target: float, min_rate: float = 0.0
) -> list[float]:
    """Rates minimising sum_l S_l * b_l**2 with FLOPs-weighted mean exactly `target`, min_rate <= b_l <= MAX_RATE.

    The problem is convex; its KKT conditions give b_l = clip(lam * f_l / (2 * S_l), min_rate, MAX_RATE) for one
    multiplier lam >= 0. The constrained sum g(lam) = sum_l f_l * b_l(lam) is piecewise linear and non-decreasing in
    lam, with kinks where a branch reaches a bound, so lam is found exactly: evaluate g at the kinks, then solve the
    linear piece that contains the target. A branch with S_l = 0 costs nothing at any rate: it goes to MAX_RATE first
    (or, when such branches alone overshoot, they share the remainder at a common rate).
    """
    _check_allocation(sensitivities, flops, target, min_rate)
    lo, hi = min_rate, MAX_RATE
    S, f = [float(s) for s in sensitivities], [float(x) for x in flops]
    total = sum(f)
    want = target * total
    free = [i for i in range(len(S)) if S[i] == 0]
    costly = [i for i in range(len(S)) if S[i] > 0]
    f_free, f_costly = sum(f[i] for i in free), sum(f[i] for i in costly)
    if lo * f_costly + hi * f_free >= want:
        # The zero-sensitivity branches reach the target with every other branch at min_rate: no cost at all.
        if not free:  # target == min_rate
            return [lo] * len(S)
        c = (want - lo * f_costly) / f_free
        return [min(hi, max(lo, c)) if S[i] == 0 else lo for i in range(len(S))]

    def rates_at(lam: float) -> list[float]:
        return [hi if S[i] == 0 else min(hi, max(lo, lam * f[i] / (2 * S[i]))) for i in range(len(S))]

    def g(lam: float) -> float:
        return sum(fi * bi for fi, bi in zip(f, rates_at(lam)))

    kinks = sorted({2 * S[i] * b / f[i] for i in costly for b in (lo, hi)} | {0.0})
    left, g_left = 0.0, g(0.0)
    for right in kinks[1:]:
        g_right = g(right)
        if g_right >= want:
            lam = left if g_right == g_left else left + (want - g_left) * (right - left) / (g_right - g_left)
            return rates_at(lam)
        left, g_left = right, g_right
    return rates_at(kinks[-1])  # all at MAX_RATE: only reachable when target == MAX_RATE up to rounding


def allocate(
    sensitivities: Sequence[float],
    flops: Sequence[float],
    target: float,
    min_rate: float = 0.0,
    allocator: Allocator = "greedy",
) -> list[float]:
    """Drop rates per branch from sensitivities and FLOPs by the named allocator ("greedy" or "flops")."""
    if allocator == "greedy":
        return allocate_greedy(sensitivities, flops, target, min_rate)
    if allocator == "flops":
        return allocate_flops_aware(sensitivities, flops, target, min_rate)
    raise ValueError(f"Unknown allocator {allocator!r}; choose one of {ALLOCATORS}")


# ---- sampling ------------------------------------------------------------------------------------------------------


def sample_independent(rates: Sequence[float], generator: torch.Generator) -> list[bool]:
    """Drop each branch independently with its own rate (unbiased: branch l drops with probability rates[l])."""
    u = torch.rand(len(rates), generator=generator, dtype=torch.float64)
    return [bool(x < r) for x, r in zip(u.tolist(), rates)]


def top_up(dropped: Sequence[bool], rates: Sequence[float], target: float) -> list[bool]:
    """The official later scheme: after independent draws, drop more branches until the count reaches target * n.

    Branches are added in descending order of rate, ties in index order (a stable sort), so with uniform rates the
    earliest layers are topped up first. The count never falls below ceil(target * n) but may exceed it, so the
    realised rate is biased above the target (E[max(X, ceil(p n))] / n for X ~ Binomial(n, p) at uniform rates:
    0.525 / 0.772 / 0.892 for p = 0.5 / 0.75 / 0.875 and n = 64) and the early layers drop more than the late ones.
    Like the official code, the target counts branches, not FLOPs.
    """
    out = list(dropped)
    need = math.ceil(target * len(out) - 1e-9)
    missing = need - sum(out)
    for i in sorted(range(len(out)), key=lambda j: rates[j], reverse=True):
        if missing <= 0:
            break
        if not out[i]:
            out[i] = True
            missing -= 1
    return out


def sample_stratified(rates: Sequence[float], phases: Sequence[float], step: int) -> list[bool]:
    """Low-variance masks: branch l is kept at draw `step` iff floor((step + 1) k + phase) > floor(step k + phase),
    with k = 1 - rates[l] its keep rate and `phase` its own fixed offset in [0, 1).

    Every branch is then kept exactly k of the time over any window (to within one draw), instead of by chance: no
    run of unlucky draws leaves a branch without updates. The phases (random, fixed per branch) spread the kept
    branches of one draw over the model.
    """
    out = []
    for rate, phase in zip(rates, phases):
        keep = 1.0 - rate
        out.append(math.floor((step + 1) * keep + phase) <= math.floor(step * keep + phase))
    return out


FULL_EVERY = round(1 / (1 - MAX_RATE))  # the prefix sampler's draws with nothing dropped: one in ten


def prefix_bounds(flops: Sequence[float], target: float) -> tuple[list[float], float, float]:
    """The cut of the prefix sampler: branch midpoints along the cumulative FLOPs (from the first branch up), and the
    interval [lo, hi] of the uniform cut of the draws that drop (all but one in FULL_EVERY), whose mean makes the
    overall FLOPs-weighted rate `target`."""
    total = float(sum(flops))
    mids, below = [], 0.0
    for f in flops:
        mids.append(below + f / 2)
        below += f
    share = min(1.0, target / MAX_RATE)  # the mean cut of a dropping draw, as a share of the total
    if share <= 0.5:
        return mids, 0.0, 2 * share * total
    return mids, (2 * share - 1) * total, total


def prefix_rates(flops: Sequence[float], target: float) -> list[float]:
    """Each branch's drop rate under the prefix sampler: MAX_RATE times the chance that the cut of a dropping draw
    lies above its midpoint. Their FLOPs-weighted mean is the target (up to the half branch a cut may split)."""
    mids, lo, hi = prefix_bounds(flops, target)
    if hi <= lo:
        return [0.0] * len(flops)
    return [MAX_RATE * min(1.0, max(0.0, (hi - m) / (hi - lo))) for m in mids]


def sample_prefix(flops: Sequence[float], target: float, step: int, generator: torch.Generator) -> list[bool]:
    """Drop a prefix of the network: every branch below a random cut (uniform in FLOPs from the first branch up).

    The kept branches are then all those above the cut, and their gradients are exact: no dropped branch sits
    between them and the loss, so no gradient has to cross a branch through the identity alone (the bias of
    independent masks, which grows with every dropped branch above a kept one). The price: the first blocks drop
    most and train least. Every FULL_EVERY-th draw drops nothing, so even the first branch keeps 10% of its
    backwards (the cap every sampler keeps, MAX_RATE) and those steps are exact, full fine-tuning steps.
    One float is drawn from `generator` per call, full draws included, so the sequence is a function of the seed.
    """
    mids, lo, hi = prefix_bounds(flops, target)
    u = float(torch.rand((), generator=generator, dtype=torch.float64))
    if step % FULL_EVERY == FULL_EVERY - 1 or target <= 0:
        return [False] * len(mids)
    cut = lo + u * (hi - lo)
    return [m < cut for m in mids]


def dropped_parameters(model: nn.Module, mask: Mask) -> list[torch.nn.Parameter]:
    """Trainable parameters of the branches `mask` drops (norm and attention, norm and MLP): they get no gradient."""
    branches = ({"norm_1", "attn"}, {"norm_2", "mlp"})
    out = []
    for block, drops in zip(model.transformer.h, mask):
        for name, p in block.named_parameters():
            if p.requires_grad and any(d and name.split(".", 1)[0] in b for d, b in zip(drops, branches)):
                out.append(p)
    return out



# ---- the handler ---------------------------------------------------------------------------------------------------


class DropBPHandler:
    """Drop rates, masks and sensitivity-based allocation for a model built of `lit_model.model.Block`s.

    Usage per micro-batch: `mask = handler.set_dropped_layers()`, then `loss = loss_fn(model(x, drop_mask=mask))`;
    skip the backward only when the loss has no grad_fn (`handler.detect_non_grad()` tells whether every branch was
    dropped, but a trainable head or embedding still deserves its backward).

    drop_rate: the target mean rate; every branch starts at it (`set_initial_drop_rate`).
    seed: seeds the handler's own CPU `torch.Generator`; the same seed draws the same masks on every rank and device.
    sampler: "independent" (Bernoulli per branch, the paper's), "topup" (the official later scheme, `top_up`),
        "stratified" (each branch kept exactly its share of draws, `sample_stratified`) or "prefix" (everything
        below a random cut, `sample_prefix`: exact gradients for what is kept).
    seq_len: sequence length for the FLOPs (default block_size); sensitivity allocation resets it to the calibration
        sample's length unless told otherwise.
    warmup_draws: the rates ramp linearly from 0 to their values over this many draws (0: from the first draw).
    """

    def __init__(
        self,
        model: nn.Module,
        drop_rate: float = 0.0,
        seed: int = 0,
        sampler: Sampler = "independent",
        seq_len: Optional[int] = None,
        warmup_draws: int = 0,
    ) -> None:
        if sampler not in SAMPLERS:
            raise ValueError(f"Unknown DropBP sampler {sampler!r}; choose one of {SAMPLERS}")
        blocks = [m for m in model.modules() if isinstance(m, Block)]
        if not blocks:
            raise ValueError(f"{type(model).__name__} has no lit_model Block: DropBP needs the GPT model")
        self.model = model
        self.config: Config = blocks[0].attn.config
        self.n_layer = len(blocks)
        self.n_branches = 2 * self.n_layer
        self._first_block = blocks[0]
        self.seed = seed
        self.sampler: Sampler = sampler
        self.generator = torch.Generator(device="cpu").manual_seed(seed)
        self.seq_len = self.config.block_size if seq_len is None else seq_len
        self.flops = branch_flops(self.config, self.seq_len)
        if warmup_draws < 0:
            raise ValueError(f"warmup_draws must be >= 0, got {warmup_draws}")
        self.warmup_draws = int(warmup_draws)
        self.phases = _phases(seed, self.n_branches)
        self.sensitivities: Optional[list[float]] = None
        self.target = 0.0
        self.drop_rates: list[float] = []
        self.set_initial_drop_rate(drop_rate)
        self.steps = 0  # masks drawn so far
        self.drop_counts = [0] * self.n_branches  # per branch, how many of those masks dropped it
        self.mask: Optional[Mask] = None  # the mask of the current micro-batch

    # ---- rates -----------------------------------------------------------------------------------------------------

    def set_initial_drop_rate(self, p: Optional[float] = None) -> None:
        """Every branch drops with rate p (default: the current target), which also becomes the target."""
        p = self.target if p is None else float(p)
        if not 0.0 <= p < 1.0:
            raise ValueError(
                f"The DropBP rate must be in [0, 1), got {p}: 0 turns DropBP off; 1 would never train the blocks "
                "(freeze them instead)"
            )
        self.target = p
        self.drop_rates = prefix_rates(self.flops, p) if self.sampler == "prefix" else [p] * self.n_branches

    def set_drop_rates(self, rates: Sequence[float], target: Optional[float] = None) -> None:
        """Set one rate per branch ([attn_0, mlp_0, ...]); the target defaults to their FLOPs-weighted mean."""
        if self.sampler not in RATE_SAMPLERS:
            raise ValueError(
                f"The {self.sampler} sampler derives every branch's rate from where its cut falls: per-branch rates "
                f"(and sensitivity allocation) need one of the samplers {RATE_SAMPLERS}"
            )
        rates = [float(r) for r in rates]
        if len(rates) != self.n_branches:
            raise ValueError(f"Got {len(rates)} drop rates for {self.n_branches} branches (2 per block, attn then mlp)")
        if any(not 0.0 <= r < 1.0 for r in rates):
            raise ValueError(f"Every drop rate must be in [0, 1), got {rates}")
        self.drop_rates = rates
        self.target = flops_weighted_mean(rates, self.flops) if target is None else float(target)

    set_diverse_drop_rate = set_drop_rates  # the official name

    def set_seq_len(self, seq_len: int) -> None:
        """Recompute the branch FLOPs for sequences of `seq_len` tokens (attention grows with the length)."""
        self.flops = branch_flops(self.config, seq_len)
        self.seq_len = seq_len
        if self.sampler == "prefix":
            self.drop_rates = prefix_rates(self.flops, self.target)

    @property
    def mean_drop_rate(self) -> float:
        """The FLOPs-weighted mean of the current rates: the expected share of the blocks' backward that is skipped."""
        return flops_weighted_mean(self.drop_rates, self.flops)

    # ---- masks -----------------------------------------------------------------------------------------------------

    def set_dropped_layers(self) -> Mask:
        """Draw the mask of the next micro-batch: one (drop_attn, drop_mlp) row per block, passed as `drop_mask`.

        The draw comes from the handler's generator only (one float per branch, whatever the rates), so the sequence
        of masks is a function of the seed and the number of draws: identical on every rank, and after a resume.
        """
        ramp = self.ramp()
        rates = [r * ramp for r in self.drop_rates]
        if self.sampler == "prefix":
            dropped = sample_prefix(self.flops, self.target * ramp, self.steps, self.generator)
        elif self.sampler == "stratified":
            dropped = sample_stratified(rates, self.phases, self.steps)
        else:
            dropped = sample_independent(rates, self.generator)
            if self.sampler == "topup":
                dropped = top_up(dropped, rates, self.target * ramp)
        self.steps += 1
        for i, d in enumerate(dropped):
            self.drop_counts[i] += d
        self.mask = [(dropped[2 * i], dropped[2 * i + 1]) for i in range(self.n_layer)]
        return self.mask

    def ramp(self) -> float:
        """The share of the rates in force at the next draw: 0 -> 1 linearly over `warmup_draws` draws."""
        return 1.0 if self.steps >= self.warmup_draws else self.steps / self.warmup_draws

    def detect_non_grad(self) -> bool:
        """Whether the current mask drops every branch (no block records a graph this micro-batch)."""
        return self.mask is not None and all(a and m for a, m in self.mask)

    detact_non_grad = detect_non_grad  # the official (misspelled) name

    def keep_all_mask(self) -> Mask:
        """The mask that drops nothing."""
        return [(False, False)] * self.n_layer

    def single_drop_mask(self, branch: int) -> Mask:
        """The mask that drops only `branch` (index into [attn_0, mlp_0, attn_1, ...])."""
        mask = self.keep_all_mask()
        mask[branch // 2] = (branch % 2 == 0, branch % 2 == 1)
        return mask

    # ---- sensitivity -----------------------------------------------------------------------------------------------

    def compute_sensitivity(self, backprop: Union[Backprop, Sequence[Backprop]], gradnorm: bool = True) -> list[float]:
        """Sensitivity of every branch: how much the gradients change when only that branch's backward is dropped.

        backprop: `backprop(drop_mask) -> loss`, running the forward on one fixed sample with `drop_mask` and
            returning the scalar loss with its graph (no `.backward()`); or a sequence of them, one per sample, whose
            sensitivities are averaged. Each sample costs 2 * n_layer + 1 forward and backward passes.
        gradnorm: S_l = sum over parameters of (||g|| - ||g_l||)**2; else sum of ||g - g_l||**2, where g are the
            gradients of the trainable parameters with every branch kept and g_l those with branch l dropped (its own
            parameters count as zero gradient).
        Gradients come from `torch.autograd.grad`, so accumulated `.grad` stays as it was; every pass of a sample
        starts from the same torch (CPU and accelerator) and Python RNG state, so dropout draws the same masks, and
        all those states are restored on return. The optimizer and the handler's own generator are not touched.
        """
        return self._measure(backprop, gradnorm)[0]

    def measure(
        self, backprop: Union[Backprop, Sequence[Backprop]], method: str = "exact", gradnorm: bool = True
    ) -> tuple[list[float], list[int]]:
        """Sensitivities by `method` ("exact" or "estimate", see those methods) and the calibration samples'
        sequence lengths (seen by the first block)."""
        if method == "exact":
            return self._measure(backprop, gradnorm)
        if method != "estimate":
            raise ValueError(f"Unknown sensitivity method {method!r}; choose one of {SENSITIVITY_METHODS}")
        lengths: list[int] = []
        hook = self._first_block.register_forward_pre_hook(lambda _m, args: lengths.append(int(args[0].shape[1])))
        try:
            return self.estimate_sensitivity(backprop), lengths
        finally:
            hook.remove()

    def estimate_sensitivity(self, backprop: Union[Backprop, Sequence[Backprop]]) -> list[float]:
        """A one-pass estimate of `compute_sensitivity` (gradnorm form): one forward and backward per sample, with
        every branch kept, instead of 2 * n_layer + 1.

        Dropping branch l changes the gradients in two ways: its own parameters lose theirs (sum of their squared
        gradient norms, read off exactly), and the gradient entering the residual stream below it loses delta_l, the
        part that came back through the branch (captured exactly by a hook on the branch's input). How much
        delta_l then changes the gradients of the trainable parameters further down is taken to be proportional to
        what the whole gradient at that point produced: G_l * ||delta_l||^2 / ||dL/dx_l||^2, with G_l the squared
        gradient norm of every trainable parameter below branch l. The one approximation is this proportionality
        (a first-order, isotropic stand-in for the 2 * n_layer extra backward passes); tests compare the ranking
        with the exact measurement. RNG states are restored as in `compute_sensitivity`.
        """
        closures = [backprop] if callable(backprop) else list(backprop)
        if not closures or not all(callable(c) for c in closures):
            raise TypeError("backprop must be a callable backprop(drop_mask) -> loss, or a non-empty list of them")
        if not self.model.training:
            raise ValueError("The model is in eval mode, which ignores drop masks: call model.train() first")
        blocks = [m for m in self.model.modules() if isinstance(m, Block)]
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("The model has no trainable parameters: there is no gradient to measure sensitivity on")
        # Which branch owns each trainable parameter (None: embedding, head, final norm).
        owner: dict[int, int] = {}
        for i, block in enumerate(blocks):
            for name, p in block.named_parameters():
                if p.requires_grad:
                    part = name.split(".", 1)[0]
                    owner[id(p)] = 2 * i + (0 if part in ("norm_1", "attn") else 1)
        totals = torch.zeros(self.n_branches, dtype=torch.float64)
        with _rng_preserved(params) as restart:
            for closure in closures:
                restart(restart(None))
                delta = [0.0] * self.n_branches  # ||gradient back through the branch into its input||^2
                total = [0.0] * self.n_branches  # ||dL/dx||^2 at the branch's input (identity path included)
                handles = []
                for i, block in enumerate(blocks):
                    for j, norm in enumerate((block.norm_1, block.norm_2)):
                        handles.append(norm.register_forward_pre_hook(_alias_hook(2 * i + j, delta, total)))
                try:
                    with torch.enable_grad():
                        loss = closure(self.keep_all_mask())
                        grads = torch.autograd.grad(loss, params, allow_unused=True)
                finally:
                    for h in handles:
                        h.remove()
                own = [0.0] * self.n_branches
                other = 0.0  # parameters outside the blocks below everything (the embedding) count as upstream
                for p, g in zip(params, grads):
                    sq = 0.0 if g is None else float(torch.linalg.vector_norm(g, dtype=torch.float64)) ** 2
                    if id(p) in owner:
                        own[owner[id(p)]] += sq
                    elif _is_embedding(self.model, p):  # (tied: the head's share of its gradient counts too)
                        other += sq
                below = other
                for b in range(self.n_branches):
                    gain = below / total[b] if total[b] > 0 else 0.0
                    totals[b] += own[b] + gain * delta[b]
                    below += own[b]
        return (totals / len(closures)).tolist()

    def _measure(
        self, backprop: Union[Backprop, Sequence[Backprop]], gradnorm: bool
    ) -> tuple[list[float], list[int]]:
        """Sensitivities and the sequence length of each calibration sample (seen by the first block)."""
        closures = [backprop] if callable(backprop) else list(backprop)
        if not closures or not all(callable(c) for c in closures):
            raise TypeError("backprop must be a callable backprop(drop_mask) -> loss, or a non-empty list of them")
        if not self.model.training:
            raise ValueError(
                "The model is in eval mode, which ignores drop masks, so every sensitivity would be 0: call "
                "model.train() before measuring sensitivities"
            )
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("The model has no trainable parameters: there is no gradient to measure sensitivity on")
        totals = torch.zeros(self.n_branches, dtype=torch.float64)
        lengths: list[int] = []
        hook = self._first_block.register_forward_pre_hook(lambda _m, args: lengths.append(int(args[0].shape[1])))
        try:
            with _rng_preserved(params) as restart:
                for closure in closures:
                    start = restart(None)  # this sample's passes all start from here (dropout masks repeat)
                    base = self._gradients(closure, self.keep_all_mask(), params, gradnorm, start, restart, True)
                    for branch in range(self.n_branches):
                        dropped = self._gradients(
                            closure, self.single_drop_mask(branch), params, gradnorm, start, restart, False
                        )
                        totals[branch] += _sensitivity(base, dropped, gradnorm)
        finally:
            hook.remove()
        return (totals / len(closures)).tolist(), lengths

    @staticmethod
    def _gradients(
        closure: Backprop,
        mask: Mask,
        params: list[nn.Parameter],
        gradnorm: bool,
        start: Any,
        restart: Callable[[Any], Any],
        baseline: bool,
    ) -> list[Optional[torch.Tensor]]:
        """Per-parameter gradient norms (float64 scalars) or gradients for one pass; None where the gradient is 0."""
        restart(start)
        with torch.enable_grad():
            loss = closure(mask)
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                raise TypeError(f"backprop must return the scalar loss tensor, got {type(loss).__name__}")
            if loss.grad_fn is None:
                if baseline:
                    raise ValueError(
                        "The loss returned by backprop has no grad_fn with every branch kept: run the forward inside "
                        "backprop with grad enabled, pass drop_mask to the model, and return the loss before backward"
                    )
                return [None] * len(params)  # dropping this branch cut every trainable parameter off the loss
            grads = torch.autograd.grad(loss, params, allow_unused=True)
        if gradnorm:
            return [None if g is None else torch.linalg.vector_norm(g, dtype=torch.float64) for g in grads]
        return [None if g is None else g.detach() for g in grads]

    # ---- allocation ------------------------------------------------------------------------------------------------

    def sensitivity_based_drop_bp(
        self,
        backprop: Union[Backprop, Sequence[Backprop]],
        target: Optional[float] = None,
        min_rate: float = 0.0,
        gradnorm: bool = True,
        allocator: Allocator = "greedy",
        seq_len: Optional[int] = None,
        method: str = "exact",
    ) -> tuple[list[float], list[float]]:
        """Measure sensitivities (`compute_sensitivity`), allocate rates with FLOPs-weighted mean `target`, set them.

        target: the mean drop rate (default: the handler's current target).
        allocator: "greedy" (the reference: 0.1 grid, cap 0.9, may overshoot by one step) or "flops" (exact
            minimiser of sum S_l * b_l**2 at exactly the target).
        seq_len: sequence length for the FLOPs; default the mean length of the calibration samples.
        method: "exact" (`compute_sensitivity`: 2 * n_layer + 1 passes per sample) or "estimate"
            (`estimate_sensitivity`: one pass per sample).
        Returns (sensitivities, drop_rates), both in branch order [attn_0, mlp_0, attn_1, ...].
        Under data parallelism every rank must calibrate on the same sample (or take rank 0's result), or the rates,
        and with them the masks, differ between ranks; run the forward on the unwrapped module (DDP's reducer expects
        `.backward()`, not `torch.autograd.grad`).
        """
        if self.sampler not in RATE_SAMPLERS:
            raise ValueError(
                f"Sensitivity allocation sets per-branch rates, which the {self.sampler} sampler does not use (its "
                f"rates follow from its cut): pick one of {RATE_SAMPLERS} or turn the allocation off"
            )
        target = self.target if target is None else float(target)
        # Fail before the 2 * n_layer + 1 passes: a dry run with uniform sensitivities checks target and min_rate.
        allocate([1.0] * self.n_branches, self.flops, target, min_rate, allocator)
        sensitivities, lengths = self.measure(backprop, method, gradnorm)
        if seq_len is None and lengths:
            seq_len = round(sum(lengths) / len(lengths))
        if seq_len is not None:
            self.set_seq_len(seq_len)
        rates = allocate(sensitivities, self.flops, target, min_rate, allocator)
        self.sensitivities = sensitivities
        self.set_drop_rates(rates, target=target)
        return sensitivities, rates

    # ---- matched updates -------------------------------------------------------------------------------------------

    def branch_of(self) -> dict[int, int]:
        """The branch index ([attn_0, mlp_0, ...]) owning each block parameter, by id: a branch's norm and module."""
        blocks = [m for m in self.model.modules() if isinstance(m, Block)]
        owner = {}
        for i, block in enumerate(blocks):
            for name, p in block.named_parameters():
                owner[id(p)] = 2 * i + (0 if name.split(".", 1)[0] in ("norm_1", "attn") else 1)
        return owner

    def lr_scale(self, branch: int, max_scale: float) -> float:
        """1 / (1 - p) for the branch's rate now in force (warm-up included), at most `max_scale`: the learning-rate
        factor that makes its parameters' expected update per step what it is without DropBP (they step only when
        kept, a share 1 - p of the steps; Adam's step does not grow with a rarer gradient)."""
        rate = self.drop_rates[branch] * self.ramp()
        return min(max_scale, 1.0 / (1.0 - rate))

    # ---- logging and checkpoints -----------------------------------------------------------------------------------

    def summary(self) -> dict[str, float]:
        """A flat dict for loggers: target, FLOPs-weighted and realised mean rates, and per branch its rate,
        realised rate, sensitivity (when measured) and FLOPs per token."""
        out: dict[str, float] = {
            "dropbp/target": self.target,
            "dropbp/mean_rate": self.mean_drop_rate,
            "dropbp/seq_len": float(self.seq_len),
            "dropbp/steps": float(self.steps),
        }
        if self.steps:
            out["dropbp/realised_rate"] = sum(self.drop_counts) / (self.steps * self.n_branches)
        for i, name in enumerate(branch_names(self.n_layer)):
            out[f"dropbp/rate/{name}"] = self.drop_rates[i]
            if self.steps:
                out[f"dropbp/realised/{name}"] = self.drop_counts[i] / self.steps
            if self.sensitivities is not None:
                out[f"dropbp/sensitivity/{name}"] = self.sensitivities[i]
            out[f"dropbp/flops/{name}"] = self.flops[i]
        return out

    def fingerprint(self) -> dict[str, Any]:
        """What decides the masks, as plain values: generator state, draws so far, realised counts, rates. Ranks that
        must draw the same masks compare it (lit_model.train.dist.check_same_on_all_ranks)."""
        return {"generator": self.generator.get_state().tolist(), "steps": self.steps,
                "drop_counts": list(self.drop_counts), "drop_rates": list(self.drop_rates)}

    def state_dict(self) -> dict[str, Any]:
        """Everything resume needs to draw the same masks: generator state, rates, sensitivities, FLOPs, counts.

        Plain Python values and one uint8 tensor, so it loads with `torch.load(..., weights_only=True)`.
        """
        return {
            "seed": self.seed,
            "sampler": self.sampler,
            "target": self.target,
            "drop_rates": list(self.drop_rates),
            "sensitivities": None if self.sensitivities is None else list(self.sensitivities),
            "flops": list(self.flops),
            "seq_len": self.seq_len,
            "steps": self.steps,
            "warmup_draws": self.warmup_draws,
            "drop_counts": list(self.drop_counts),
            "generator": self.generator.get_state(),
            "mask": None if self.mask is None else [list(row) for row in self.mask],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()`; the saved state wins over the constructor's rate, seed and sampler."""
        if len(state["drop_rates"]) != self.n_branches:
            raise ValueError(
                f"The DropBP state has {len(state['drop_rates'])} branches, this model has {self.n_branches} "
                f"({self.n_layer} blocks): it was saved for a different model"
            )
        if state["sampler"] not in SAMPLERS:
            raise ValueError(f"Unknown DropBP sampler {state['sampler']!r} in the state; expected one of {SAMPLERS}")
        self.seed = int(state["seed"])
        self.phases = _phases(self.seed, self.n_branches)
        self.sampler = state["sampler"]
        self.target = float(state["target"])
        self.drop_rates = [float(r) for r in state["drop_rates"]]
        sens = state["sensitivities"]
        self.sensitivities = None if sens is None else [float(s) for s in sens]
        self.flops = [float(f) for f in state["flops"]]
        self.seq_len = int(state["seq_len"])
        self.steps = int(state["steps"])
        self.warmup_draws = int(state.get("warmup_draws", 0))  # absent in checkpoints of earlier versions
        self.drop_counts = [int(c) for c in state["drop_counts"]]
        self.generator.set_state(state["generator"])
        mask = state["mask"]
        self.mask = None if mask is None else [(bool(a), bool(m)) for a, m in mask]


def _alias_hook(branch: int, delta: list[float], total: list[float]) -> Callable[..., Any]:
    """A forward pre-hook for a branch's input norm: the norm reads an alias of the residual stream, so a hook on the
    alias sees exactly the gradient that comes back through the branch, and a hook on the stream its whole gradient."""

    def hook(module: nn.Module, args: tuple) -> Optional[tuple]:
        x = args[0]
        if not x.requires_grad:
            return None
        alias = x.view_as(x)

        def on_delta(g: torch.Tensor) -> None:
            delta[branch] += float(torch.linalg.vector_norm(g, dtype=torch.float64)) ** 2

        def on_total(g: torch.Tensor) -> None:
            total[branch] += float(torch.linalg.vector_norm(g, dtype=torch.float64)) ** 2

        alias.register_hook(on_delta)
        x.register_hook(on_total)
        return (alias, *args[1:])

    return hook


def _is_embedding(model: nn.Module, p: nn.Parameter) -> bool:
    wte = getattr(getattr(model, "transformer", None), "wte", None)
    return wte is not None and p is wte.weight


def _phases(seed: int, n: int) -> list[float]:
    """The stratified sampler's fixed per-branch phases in [0, 1): a function of the seed alone, so a resumed run has
    them without saving them, and the handler's generator (the other samplers' draws) is left alone."""
    generator = torch.Generator(device="cpu").manual_seed(seed + 0x5EED)
    return torch.rand(n, generator=generator, dtype=torch.float64).tolist()


def _sensitivity(base: list[Optional[torch.Tensor]], dropped: list[Optional[torch.Tensor]], gradnorm: bool) -> float:
    """sum over parameters of (||g|| - ||g_l||)**2 (norms given) or ||g - g_l||**2 (gradients given), in float64."""
    total = torch.zeros((), dtype=torch.float64)
    for g, g_l in zip(base, dropped):
        if g is None and g_l is None:
            continue
        if gradnorm:
            a = torch.zeros((), dtype=torch.float64) if g is None else g.cpu()
            b = torch.zeros((), dtype=torch.float64) if g_l is None else g_l.cpu()
            total += (a - b) ** 2
        elif g is None or g_l is None:
            total += torch.linalg.vector_norm(g if g_l is None else g_l, dtype=torch.float64).cpu() ** 2
        else:
            total += torch.linalg.vector_norm(g.double() - g_l.double(), dtype=torch.float64).cpu() ** 2
    return float(total)


@contextmanager
def _rng_preserved(params: list[nn.Parameter]) -> Iterator[Callable[[Any], Any]]:
    """Fork the global RNGs (torch CPU, the parameters' accelerators, Python's `random`) and restore them on exit.

    Yields `restart(state)`: with None it returns the current states; with a state it resets the RNGs to it.
    """
    device_type = next((p.device.type for p in params if p.device.type not in ("cpu", "meta")), "cuda")
    devices = sorted({p.device.index or 0 for p in params if p.device.type == device_type})
    py_state = random.getstate()

    def restart(state: Any) -> Any:
        if state is None:
            dev_module = torch.get_device_module(device_type) if devices else None
            return (
                torch.get_rng_state(),
                [dev_module.get_rng_state(d) for d in devices] if dev_module else [],
                random.getstate(),
            )
        cpu, dev_states, py = state
        torch.set_rng_state(cpu)
        if devices:
            dev_module = torch.get_device_module(device_type)
            for d, s in zip(devices, dev_states):
                dev_module.set_rng_state(s, d)
        random.setstate(py)
        return state

    try:
        with torch.random.fork_rng(devices=devices, device_type=device_type):
            yield restart
    finally:
        random.setstate(py_state)
