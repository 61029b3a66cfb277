"""lit_model.dropbp: FLOPs per branch, the allocators, the samplers, sensitivity measurement and the handler's state.

Gate semantics of the model itself (forward unchanged, dropped parameters get no gradient, eval never drops) are in
test_model.py; checkpointing with masks in test_checkpointing.py.
"""

from __future__ import annotations

import io
import itertools
import math
import random
from fractions import Fraction
from typing import Optional

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from lit_model import GPT, Config
from lit_model.dropbp import (
    MAX_RATE,
    DropBPHandler,
    allocate,
    allocate_flops_aware,
    allocate_greedy,
    branch_flops,
    branch_names,
    flops_weighted_mean,
    top_up,
)

VOCAB = 64
LLAMA = dict(n_layer=2, n_head=4, n_query_groups=2, n_embd=32, intermediate_size=48)  # sequential, GQA, SwiGLU
NEOX = dict(n_layer=2, n_head=4, n_embd=32, intermediate_size=64, parallel_residual=True, bias=True,
            norm_class_name="LayerNorm", mlp_class_name="GptNeoxMLP", rotary_percentage=0.5, hf_model_type="gpt_neox")
GEMMA = dict(n_layer=2, n_head=4, n_query_groups=1, head_size=16, n_embd=32, intermediate_size=48,
             mlp_class_name="GemmaMLP", gelu_approximate="tanh", norm_unit_offset=True, hf_model_type="gemma")


def tiny(arch: dict, **overrides) -> GPT:
    model = GPT(Config(vocab_size=VOCAB, block_size=16, **{**arch, **overrides}))
    model.init_weights(std=0.2)
    return model.train()


def sample(seed: int = 1, length: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (2, length), generator=g), torch.randint(0, VOCAB, (2, length), generator=g)


def loss_fn(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor], mask: Optional[list] = None) -> torch.Tensor:
    idx, targets = batch
    return F.cross_entropy(model(idx, drop_mask=mask).flatten(0, 1), targets.flatten())


def param_grads(model: nn.Module, mask: Optional[list] = None) -> dict[str, Optional[torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss_fn(model, sample(), mask).backward()
    return {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}


def dropout_everywhere(model: GPT) -> None:
    """Dropout on both branches' outputs (as LoRA dropout would be): calibration must replay the same masks."""
    for block in model.transformer.h:
        for branch in (block.attn, block.mlp):
            original = branch.forward
            branch.forward = lambda *a, _f=original: F.dropout(_f(*a), p=0.3, training=True)


# ---- FLOPs ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fields,seq_len,attn,mlp",
    [
        # GQA, 3-matrix MLP. h=64, 4 heads of 16, 2 kv groups, I=128, s=10. Projections (MACs): q 64*64, k and v
        # 64*32 each, out 64*64 = 12288; scores and values 2 * 10 * 4 * 16 = 1280; MLP 3 * 64 * 128 = 24576.
        (dict(n_embd=64, n_head=4, n_query_groups=2, intermediate_size=128), 10, 2 * (12288 + 1280), 2 * 24576),
        # MHA, 2-matrix GELU MLP (GPT-NeoX). h=32, 4 heads of 8, I=64, s=8: 4 * 32*32 = 4096; 2 * 8 * 32 = 512;
        # MLP 2 * 32 * 64 = 4096.
        (dict(n_embd=32, n_head=4, intermediate_size=64, mlp_class_name="GptNeoxMLP"), 8, 2 * (4096 + 512), 2 * 4096),
        # Gemma-like: heads wider than n_embd (4 * 16 = 64 vs h = 32), MQA, GeGLU. h=32, s=5: q 32*64, k and v
        # 32*16 each, out 64*32 = 5120; 2 * 5 * 4 * 16 = 640; MLP 3 * 32 * 48 = 4608. DESIGN.md's formula (with h*h
        # and 4*s*h) would say 2 * (32*6*16 + 32*32) + 4*5*32 = 8832 for the attention.
        (dict(n_embd=32, n_head=4, head_size=16, n_query_groups=1, intermediate_size=48, mlp_class_name="GemmaMLP"),
         5, 2 * (5120 + 640), 2 * 4608),
    ],
    ids=["gqa-swiglu", "mha-gelu", "gemma-wide-heads"],
)
def test_branch_flops_hand_count(fields: dict, seq_len: int, attn: int, mlp: int) -> None:
    config = Config(n_layer=3, **fields)
    assert branch_flops(config, seq_len) == [attn, mlp] * 3
    assert branch_names(2) == ["attn_0", "mlp_0", "attn_1", "mlp_1"]


def test_branch_flops_equal_design_formula_when_heads_span_n_embd() -> None:
    config = Config.from_name("Llama-2-7b-hf")
    h, nh, hs, s = 4096, 32, 128, 512
    design_attn = 2 * (h * (nh + 2 * nh) * hs + h * h) + 4 * s * h  # DESIGN.md section 2, as the official code
    assert branch_flops(config, s)[:2] == [design_attn, 2 * 3 * h * 11008]
    assert len(branch_flops(config, s)) == 64


@pytest.mark.parametrize("arch", [LLAMA, NEOX, GEMMA], ids=["llama-gqa", "neox", "gemma-mqa"])
def test_branch_flops_match_torch_flop_counter(arch: dict) -> None:
    """An independent count: torch's FlopCounterMode on a real forward (math SDPA counts the dense scores)."""
    model = tiny(arch)
    B, T = 2, 7
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(torch.randint(0, VOCAB, (B, T)))
    counts = counter.get_flop_counts()
    measured = []
    for i in range(model.config.n_layer):
        for branch in ("attn", "mlp"):
            measured.append(sum(counts[f"GPT.transformer.h.{i}.{branch}"].values()))
    assert measured == [B * T * f for f in branch_flops(model.config, T)]


def test_flops_weighted_mean() -> None:
    assert flops_weighted_mean([0.5, 1.0], [3.0, 1.0]) == pytest.approx(0.625)
    with pytest.raises(ValueError, match="one rate per branch"):
        flops_weighted_mean([0.5], [1.0, 2.0])
    with pytest.raises(ValueError, match="seq_len must be a positive"):
        branch_flops(Config(n_layer=1, n_head=2, n_embd=8), 0)


# ---- the reference greedy allocator --------------------------------------------------------------------------------


@pytest.mark.parametrize("seq_len", [512, 1024, 4096])
@pytest.mark.parametrize("s", [1.0, 3.7])
def test_greedy_golden_vectors(seq_len: int, s: float) -> None:
    """DESIGN.md's golden vectors: uniform sensitivities with LLaMA2-7B FLOPs, branches interleaved per block.

    Computed exactly they hold at any sequence length (ties go to the higher index and the top 16 / 24 blocks are
    exactly half / three quarters of the FLOPs). The official float implementation reproduces them at its
    hard-coded 512 only: at 1024 or more its accumulated `f_sum -= f * 0.1` lands a hair above the target and
    takes one more step.
    """
    flops = branch_flops(Config.from_name("Llama-2-7b-hf"), seq_len)
    uniform = [s] * 64
    assert allocate_greedy(uniform, flops, 0.75) == [0.7] * 32 + [0.8] * 32
    assert allocate_greedy(uniform, flops, 0.875) == [0.8] * 16 + [0.9] * 48
    assert allocate_greedy(uniform, flops, 0.5) == [0.5] * 64
    # The same FLOPs ordered attention-then-MLP would not give the golden vector: the order is per block.
    assert allocate_greedy(uniform, flops[0::2] + flops[1::2], 0.75) != [0.7] * 32 + [0.8] * 32


def test_greedy_steps_ties_and_cap_by_hand() -> None:
    # Costs S * (b + 0.1): branch 0 steps twice (0.1, 0.2), then 1 * 0.3 ties 3 * 0.1 and the higher index wins.
    assert allocate_greedy([1.0, 3.0], [1.0, 1.0], 0.1) == [0.2, 0.0]
    assert allocate_greedy([1.0, 3.0], [1.0, 1.0], 0.15) == [0.2, 0.1]
    assert allocate_greedy([1.0, 1.0], [1.0, 1.0], 0.05) == [0.0, 0.1]  # tie at the start: the higher index
    # A zero-sensitivity branch is free: it goes to the 0.9 cap and no further.
    assert allocate_greedy([0.0, 1.0], [1.0, 1.0], 0.5) == [0.9, 0.1]
    assert allocate_greedy([1.0, 1.0], [1.0, 1.0], 0.9) == [0.9, 0.9]
    # min_rate is the floor, and the 0.1 grid starts there.
    assert allocate_greedy([1.0, 2.0], [1.0, 1.0], 0.25, min_rate=0.2) == [0.3, 0.2]


def reference_greedy(S: list[float], f: list[float], target: float, min_rate: float) -> list[float]:
    """Straight from the description, in exact rational arithmetic: no heap, no floating-point tenths."""
    S_ = [Fraction(s) for s in S]
    f_ = [Fraction(x) for x in f]
    lo, tenth, cap = Fraction(min_rate).limit_denominator(1000), Fraction(1, 10), Fraction(9, 10)
    b = [lo] * len(S)
    goal = Fraction(target).limit_denominator(1000)
    while sum(fi * bi for fi, bi in zip(f_, b)) < goal * sum(f_):
        movable = [i for i in range(len(S)) if b[i] + tenth <= cap]
        i = min(movable, key=lambda j: (S_[j] * (b[j] + tenth), -j))
        b[i] += tenth
    return [float(x) for x in b]


@pytest.mark.parametrize("seed", range(6))
def test_greedy_matches_reference_and_meets_target(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    n = 12
    S = torch.rand(n, generator=g).tolist()
    S[seed % n] = 0.0  # one free branch
    S = [round(s, 3) for s in S]
    f = torch.randint(1, 50, (n,), generator=g).double().tolist()
    for target, min_rate in [(0.1, 0.0), (0.5, 0.0), (0.5, 0.2), (0.75, 0.3), (0.875, 0.0), (0.9, 0.0)]:
        rates = allocate_greedy(S, f, target, min_rate)
        assert rates == pytest.approx(reference_greedy(S, f, target, min_rate), abs=1e-12)
        mean = flops_weighted_mean(rates, f)
        assert mean >= target - 1e-12
        assert mean - 0.1 * max(f) / sum(f) < target  # it stops at the first step that reaches the target
        assert all(min_rate - 1e-12 <= r <= MAX_RATE + 1e-12 for r in rates)
        assert all(abs((r - min_rate) * 10 - round((r - min_rate) * 10)) < 1e-9 for r in rates)  # the 0.1 grid


# ---- the FLOPs-aware allocator -------------------------------------------------------------------------------------


def objective(S: list[float], rates: list[float]) -> float:
    return sum(s * b * b for s, b in zip(S, rates))


def assert_kkt(S: list[float], f: list[float], rates: list[float], min_rate: float) -> None:
    """A multiplier lam >= 0 exists with 2 S b = lam f inside the bounds, <= at min_rate and >= at the cap."""
    interior, upper, lower = [], math.inf, 0.0
    for s, fi, b in zip(S, f, rates):
        if s == 0:
            continue
        if b <= min_rate + 1e-12:
            upper = min(upper, 2 * s * b / fi)
        elif b >= MAX_RATE - 1e-12:
            lower = max(lower, 2 * s * b / fi)
        else:
            interior.append(2 * s * b / fi)
    if interior:
        lam = interior[0]
        assert interior == pytest.approx([lam] * len(interior), rel=1e-9)
        lower, upper = max(lower, lam), min(upper, lam)
    assert lower <= upper * (1 + 1e-9)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("min_rate", [0.0, 0.2])
def test_flops_allocator_exact_and_optimal(seed: int, min_rate: float) -> None:
    g = torch.Generator().manual_seed(seed)
    n = 10
    S = (torch.rand(n, generator=g) ** 3).tolist()
    f = torch.randint(1, 50, (n,), generator=g).double().tolist()
    for target in (0.2, 0.5, 0.75, 0.875, 0.9):
        if target < min_rate:
            continue
        rates = allocate_flops_aware(S, f, target, min_rate)
        assert flops_weighted_mean(rates, f) == pytest.approx(target, abs=1e-12)
        assert all(min_rate - 1e-12 <= r <= MAX_RATE + 1e-12 for r in rates)
        assert_kkt(S, f, rates, min_rate)
        best = objective(S, rates)
        # Any feasible move along the constraint (sum f d = 0), kept inside the bounds, costs at least as much.
        for _ in range(200):
            d = torch.randn(n, generator=g, dtype=torch.float64)
            d -= (d @ torch.tensor(f, dtype=torch.float64)) / sum(x * x for x in f) * torch.tensor(f)
            moved = [r + 1e-3 * x for r, x in zip(rates, d.tolist())]
            if all(min_rate <= b <= MAX_RATE for b in moved):
                assert objective(S, moved) >= best - 1e-12
        # The greedy answer is feasible for "mean >= target", so it cannot beat the optimum either.
        assert objective(S, allocate_greedy(S, f, target, min_rate)) >= best - 1e-12


def test_flops_allocator_against_brute_force() -> None:
    S, f, target = [0.5, 2.0, 1.0], [3.0, 1.0, 2.0], 0.6
    rates = allocate_flops_aware(S, f, target)
    best = math.inf
    grid = [i / 400 for i in range(int(MAX_RATE * 400) + 1)]
    for b0, b1 in itertools.product(grid, grid):
        b2 = (target * sum(f) - f[0] * b0 - f[1] * b1) / f[2]
        if 0 <= b2 <= MAX_RATE:
            best = min(best, objective(S, [b0, b1, b2]))
    assert objective(S, rates) <= best + 1e-12
    assert objective(S, rates) == pytest.approx(best, rel=1e-3)


def test_flops_allocator_zero_sensitivity_branches() -> None:
    f = [1.0, 2.0, 1.0]
    # The free branch (S = 0) goes to the cap; the others share the rest.
    rates = allocate_flops_aware([0.0, 1.0, 1.0], f, 0.5)
    assert rates[0] == MAX_RATE and flops_weighted_mean(rates, f) == pytest.approx(0.5)
    # When the free branch alone overshoots, it takes exactly what is needed and the others stay at min_rate.
    rates = allocate_flops_aware([0.0, 1.0, 1.0], f, 0.15, min_rate=0.1)
    assert rates == pytest.approx([0.3, 0.1, 0.1])
    assert allocate_flops_aware([0.0, 0.0], [1.0, 3.0], 0.4) == pytest.approx([0.4, 0.4])
    assert allocate_flops_aware([1.0, 2.0], [1.0, 1.0], 0.3, min_rate=0.3) == pytest.approx([0.3, 0.3])


@pytest.mark.parametrize("allocator", ["greedy", "flops"])
def test_allocation_errors(allocator: str) -> None:
    S, f = [1.0, 1.0], [1.0, 1.0]
    with pytest.raises(ValueError, match="target drop rate 0.95 is infeasible: rates are capped at 0.9"):
        allocate(S, f, 0.95, allocator=allocator)
    with pytest.raises(ValueError, match=r"min_rate \(0.5\) exceeds the target drop rate \(0.3\)"):
        allocate(S, f, 0.3, min_rate=0.5, allocator=allocator)
    with pytest.raises(ValueError, match="min_rate must be in"):
        allocate(S, f, 0.95, min_rate=0.95, allocator=allocator)
    with pytest.raises(ValueError, match="target drop rate must be >= 0"):
        allocate(S, f, -0.1, allocator=allocator)
    with pytest.raises(ValueError, match="one sensitivity per branch"):
        allocate([1.0], f, 0.5, allocator=allocator)
    with pytest.raises(ValueError, match="finite and non-negative"):
        allocate([1.0, -1.0], f, 0.5, allocator=allocator)
    with pytest.raises(ValueError, match="FLOPs must be finite and positive"):
        allocate(S, [1.0, 0.0], 0.5, allocator=allocator)


def test_greedy_cap_on_an_offset_grid_and_unknown_allocator() -> None:
    # From min_rate 0.05 the 0.1 grid tops out at 0.85 (the official code would step on to 0.95).
    assert allocate_greedy([1.0, 1.0], [1.0, 1.0], 0.85, min_rate=0.05) == [0.85, 0.85]
    with pytest.raises(ValueError, match="capped at 0.85"):
        allocate_greedy([1.0, 1.0], [1.0, 1.0], 0.88, min_rate=0.05)
    with pytest.raises(ValueError, match="Unknown allocator 'best'"):
        allocate([1.0], [1.0], 0.5, allocator="best")  # type: ignore[arg-type]


# ---- samplers ------------------------------------------------------------------------------------------------------


def test_independent_sampler_frequency_matches_rates() -> None:
    handler = DropBPHandler(tiny(LLAMA), seed=5)
    rates = [0.1, 0.5, 0.9, 0.0]
    handler.set_drop_rates(rates)
    n = 4000
    masks = [handler.set_dropped_layers() for _ in range(n)]
    drops = torch.tensor([[a0, m0, a1, m1] for (a0, m0), (a1, m1) in masks], dtype=torch.float64)
    for i, p in enumerate(rates):
        assert abs(drops[:, i].mean().item() - p) <= 4.5 * math.sqrt(p * (1 - p) / n)
    assert drops[:, 3].sum() == 0  # rate 0 never drops
    both = (drops[:, 0] * drops[:, 1]).mean().item()  # independent across branches
    assert abs(both - 0.05) <= 4.5 * math.sqrt(0.05 * 0.95 / n)
    assert handler.drop_counts == drops.sum(0).long().tolist() and handler.steps == n
    assert handler.summary()["dropbp/realised/mlp_0"] == pytest.approx(drops[:, 1].mean().item())


def expected_topup(n: int, p: float) -> tuple[float, float]:
    """Mean and std of max(X, ceil(p n)) / n for X ~ Binomial(n, p): the top-up sampler's realised rate."""
    k = math.ceil(p * n)
    probs = [math.comb(n, x) * p**x * (1 - p) ** (n - x) for x in range(n + 1)]
    mean = sum(pr * max(x, k) for x, pr in enumerate(probs))
    var = sum(pr * (max(x, k) - mean) ** 2 for x, pr in enumerate(probs))
    return mean / n, math.sqrt(var) / n


@pytest.mark.parametrize("p,design", [(0.5, 0.525), (0.75, 0.772), (0.875, 0.892)])
def test_topup_sampler_is_biased_as_design_says(p: float, design: float) -> None:
    model = tiny(dict(n_layer=32, n_head=2, n_embd=8, intermediate_size=8))  # 64 branches, like LLaMA2-7B
    handler = DropBPHandler(model, p, seed=11, sampler="topup")
    mean, std = expected_topup(64, p)
    assert mean == pytest.approx(design, abs=1e-3)  # exactly 0.5248 / 0.7715 / 0.8913
    n = 3000
    counts = [sum(a + m for a, m in handler.set_dropped_layers()) for _ in range(n)]
    assert min(counts) >= p * 64  # never fewer than the target count
    realised = sum(counts) / (64 * n)
    assert abs(realised - mean) <= 4.5 * std / math.sqrt(n)
    assert realised > p + 0.01
    per_branch = [c / n for c in handler.drop_counts]
    early, late = sum(per_branch[:8]) / 8, sum(per_branch[-16:]) / 16
    assert early > late + 0.05  # top-up goes to the earliest layers first
    assert abs(late - p) <= 4.5 * math.sqrt(p * (1 - p) / (16 * n))  # the last layers are barely topped up
    # The independent sampler with the same rates is unbiased.
    fair = DropBPHandler(model, p, seed=11)
    fair_counts = [sum(a + m for a, m in fair.set_dropped_layers()) for _ in range(n)]
    assert abs(sum(fair_counts) / (64 * n) - p) <= 4.5 * math.sqrt(p * (1 - p) / (64 * n))


def test_top_up_order_by_rate_then_index() -> None:
    assert top_up([False] * 4, [0.2, 0.9, 0.2, 0.5], 0.5) == [False, True, False, True]
    assert top_up([False] * 4, [0.5] * 4, 0.5) == [True, True, False, False]
    assert top_up([False, False, True, True], [0.5] * 4, 0.5) == [False, False, True, True]  # already there
    assert top_up([True] * 3 + [False], [0.5] * 4, 0.5) == [True] * 3 + [False]  # never removes a drop


# ---- masks: reproducibility and resume -----------------------------------------------------------------------------


@pytest.mark.parametrize("sampler", ["independent", "topup"])
def test_masks_reproducible_from_seed_and_after_resume(sampler: str) -> None:
    model = tiny(LLAMA)
    first = DropBPHandler(model, 0.5, seed=7, sampler=sampler)
    first.set_drop_rates([0.2, 0.7, 0.5, 0.6], target=0.5)
    first.sensitivities = [1.0, 2.0, 3.0, 4.0]
    masks = [first.set_dropped_layers() for _ in range(20)]
    assert all(len(m) == 2 and all(isinstance(b, bool) for row in m for b in row) for m in masks)
    assert len({str(m) for m in masks}) > 3  # masks vary between micro-batches

    again = DropBPHandler(model, 0.5, seed=7, sampler=sampler)
    again.set_drop_rates([0.2, 0.7, 0.5, 0.6], target=0.5)
    assert [again.set_dropped_layers() for _ in range(8)] == masks[:8]
    buffer = io.BytesIO()
    torch.save(again.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)

    resumed = DropBPHandler(model, 0.1, seed=0)  # the saved state wins over the constructor's arguments
    resumed.load_state_dict(state)
    assert resumed.mask == masks[7] and resumed.steps == 8 and resumed.sampler == sampler
    assert [resumed.set_dropped_layers() for _ in range(12)] == masks[8:]
    assert resumed.drop_rates == first.drop_rates and resumed.target == first.target
    assert resumed.drop_counts == first.drop_counts and resumed.flops == first.flops
    assert resumed.sensitivities is None  # `again` never measured any
    other = DropBPHandler(model, 0.5, seed=8, sampler=sampler)
    other.set_drop_rates([0.2, 0.7, 0.5, 0.6], target=0.5)
    assert [other.set_dropped_layers() for _ in range(20)] != masks

    first_state = first.state_dict()
    resumed.load_state_dict(first_state)
    assert resumed.sensitivities == [1.0, 2.0, 3.0, 4.0]
    assert resumed.summary() == first.summary()
    with pytest.raises(ValueError, match="saved for a different model"):
        DropBPHandler(tiny(LLAMA, n_layer=3)).load_state_dict(first_state)


# ---- sensitivity ---------------------------------------------------------------------------------------------------


def reference_sensitivities(model: GPT, batch: tuple, gradnorm: bool, seed: int) -> list[float]:
    """Brute force with `.backward()`, reseeding before every pass; a dropped branch's parameters count as zero."""
    params = [p for p in model.parameters() if p.requires_grad]

    def grads(mask: Optional[list]) -> list[torch.Tensor]:
        model.zero_grad(set_to_none=True)
        torch.manual_seed(seed)
        loss_fn(model, batch, mask).backward()
        out = [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in params]
        model.zero_grad(set_to_none=True)
        return out

    base = grads(None)
    result = []
    n_layer = model.config.n_layer
    for branch in range(2 * n_layer):
        mask = [(False, False)] * n_layer
        mask[branch // 2] = (branch % 2 == 0, branch % 2 == 1)
        dropped = grads(mask)
        if gradnorm:
            s = sum((g.double().norm() - d.double().norm()) ** 2 for g, d in zip(base, dropped))
        else:
            s = sum(((g.double() - d.double()) ** 2).sum() for g, d in zip(base, dropped))
        result.append(float(s))
    return result


@pytest.mark.parametrize("arch", [LLAMA, NEOX], ids=["sequential", "parallel"])
@pytest.mark.parametrize("gradnorm", [True, False])
def test_sensitivity_matches_brute_force_with_dropout(arch: dict, gradnorm: bool) -> None:
    model = tiny(arch)
    dropout_everywhere(model)
    batch = sample()
    want = reference_sensitivities(model, batch, gradnorm, seed=1234)
    handler = DropBPHandler(model)
    torch.manual_seed(1234)  # the calibration's passes all start from the current global state
    got = handler.compute_sensitivity(lambda mask: loss_fn(model, batch, mask), gradnorm=gradnorm)
    assert got == pytest.approx(want, rel=1e-6)
    assert all(s > 0 for s in got)


@pytest.mark.parametrize("gradnorm", [True, False])
def test_sensitivity_is_zero_for_a_branch_that_changes_no_gradient(gradnorm: bool) -> None:
    """Block 1's attention is frozen and outputs zeros: dropping its backward changes nothing, exactly.

    With dropout in every branch and a loss scaled by Python's RNG, this holds only if every pass replays the same
    torch and Python random draws.
    """
    model = tiny(LLAMA)
    dropout_everywhere(model)
    block = model.transformer.h[1]
    nn.init.zeros_(block.attn.proj.weight)
    for p in itertools.chain(block.norm_1.parameters(), block.attn.parameters()):
        p.requires_grad_(False)
    batch = sample()
    handler = DropBPHandler(model)
    sens = handler.compute_sensitivity(lambda mask: loss_fn(model, batch, mask) * (1 + random.random()), gradnorm)
    assert sens[2] == 0.0
    assert all(s > 0 for i, s in enumerate(sens) if i != 2)


def test_calibration_leaves_grads_rngs_and_masks_untouched() -> None:
    model = tiny(LLAMA)
    dropout_everywhere(model)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    grads_before = [p.grad.clone() for p in model.parameters()]
    handler = DropBPHandler(model, 0.5, seed=3)
    handler.set_dropped_layers()
    mask, generator_state = handler.mask, handler.generator.get_state()
    torch_state, python_state = torch.get_rng_state(), random.getstate()
    calls = []

    def backprop(drop_mask: list) -> torch.Tensor:
        calls.append(drop_mask)
        random.random()  # a closure may use Python's RNG (e.g. data augmentation)
        return loss_fn(model, sample(length=10), drop_mask)

    sens, rates = handler.sensitivity_based_drop_bp(backprop, target=0.5, min_rate=0.1)
    assert len(calls) == 2 * 2 + 1 and calls[0] == [(False, False)] * 2 and calls[1] == [(True, False), (False, False)]
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads_before))
    assert torch.equal(torch.get_rng_state(), torch_state) and random.getstate() == python_state
    assert torch.equal(handler.generator.get_state(), generator_state)
    assert handler.mask == mask and handler.steps == 1
    assert all(s >= 0 for s in sens) and handler.sensitivities == sens
    assert handler.drop_rates == rates and handler.target == 0.5 and min(rates) >= 0.1
    assert handler.mean_drop_rate >= 0.5
    # The FLOPs follow the calibration sample's length (10), not block_size.
    assert handler.seq_len == 10 and handler.flops == branch_flops(model.config, 10)
    summary = handler.summary()
    assert summary["dropbp/sensitivity/mlp_1"] == sens[3] and summary["dropbp/rate/attn_0"] == rates[0]
    assert summary["dropbp/flops/attn_1"] == handler.flops[2] and summary["dropbp/target"] == 0.5


def test_sensitivity_based_allocation_flops_allocator_and_samples() -> None:
    model = tiny(LLAMA)
    batches = [sample(1), sample(2)]
    closures = [lambda mask, b=b: loss_fn(model, b, mask) for b in batches]
    handler = DropBPHandler(model)
    each = [handler.compute_sensitivity(c) for c in closures]
    averaged = handler.compute_sensitivity(closures)
    assert averaged == pytest.approx([(a + b) / 2 for a, b in zip(*each)], rel=1e-9)
    sens, rates = handler.sensitivity_based_drop_bp(closures, target=0.6, allocator="flops", seq_len=64)
    assert sens == pytest.approx(averaged, rel=1e-9)
    assert handler.flops == branch_flops(model.config, 64)  # an explicit seq_len wins over the samples' length
    assert flops_weighted_mean(rates, handler.flops) == pytest.approx(0.6, abs=1e-12)
    assert rates == pytest.approx(allocate_flops_aware(sens, handler.flops, 0.6))


def test_handler_errors() -> None:
    model = tiny(LLAMA)
    with pytest.raises(ValueError, match="Unknown DropBP sampler 'random'"):
        DropBPHandler(model, sampler="random")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="has no lit_model Block"):
        DropBPHandler(nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"must be in \[0, 1\), got 1.0"):
        DropBPHandler(model, drop_rate=1.0)
    handler = DropBPHandler(model, 0.5)
    with pytest.raises(ValueError, match="Got 3 drop rates for 4 branches"):
        handler.set_drop_rates([0.5] * 3)
    with pytest.raises(ValueError, match=r"Every drop rate must be in \[0, 1\)"):
        handler.set_drop_rates([0.5, 0.5, 0.5, 1.5])
    calls = []

    def backprop(mask: list) -> torch.Tensor:
        calls.append(mask)
        return loss_fn(model, sample(), mask)

    with pytest.raises(ValueError, match="infeasible"):  # checked before any pass runs
        handler.sensitivity_based_drop_bp(backprop, target=0.95)
    with pytest.raises(ValueError, match="min_rate"):
        handler.sensitivity_based_drop_bp(backprop, target=0.5, min_rate=0.6)
    with pytest.raises(ValueError, match="Unknown allocator"):
        handler.sensitivity_based_drop_bp(backprop, allocator="fastest")  # type: ignore[arg-type]
    assert calls == []
    with pytest.raises(TypeError, match="backprop must be a callable"):
        handler.compute_sensitivity([])
    with pytest.raises(TypeError, match="scalar loss tensor"):
        handler.compute_sensitivity(lambda mask: 1.0)  # type: ignore[arg-type,return-value]

    def no_graph(mask: list) -> torch.Tensor:
        with torch.no_grad():
            return loss_fn(model, sample(), mask)

    with pytest.raises(ValueError, match="has no grad_fn with every branch kept"):
        handler.compute_sensitivity(no_graph)
    model.eval()
    with pytest.raises(ValueError, match=r"call model.train\(\)"):
        handler.compute_sensitivity(backprop)
    model.train().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        handler.compute_sensitivity(backprop)


# ---- training with the handler's masks -----------------------------------------------------------------------------


def test_rate_zero_never_drops_and_matches_no_mask() -> None:
    model = tiny(LLAMA)
    handler = DropBPHandler(model, 0.0, sampler="topup")
    masks = [handler.set_dropped_layers() for _ in range(100)]
    assert all(m == [(False, False)] * 2 for m in masks) and not handler.detect_non_grad()
    with_mask, without = param_grads(model, masks[-1]), param_grads(model)
    for name in without:
        torch.testing.assert_close(with_mask[name], without[name], rtol=0, atol=0)


@pytest.mark.parametrize("arch", [LLAMA, NEOX], ids=["sequential", "parallel"])
def test_fixed_mask_equals_branches_treated_as_constants(arch: dict) -> None:
    """DropBP's gradients are those of the same network whose dropped branches return `out.detach()`."""
    model = tiny(arch, n_layer=3)
    handler = DropBPHandler(model, 0.5, seed=2)
    mask = handler.set_dropped_layers()
    while all(a == m for a, m in mask) or handler.detect_non_grad():  # want some attention-only and MLP-only drops
        mask = handler.set_dropped_layers()
    reference = tiny(arch, n_layer=3)
    reference.load_state_dict(model.state_dict())
    for block, (drop_attn, drop_mlp) in zip(reference.transformer.h, mask):
        for name, dropped in (("attn_branch", drop_attn), ("mlp_branch", drop_mlp)):
            if dropped:
                original = getattr(block, name)
                setattr(block, name, lambda *a, _f=original: _f(*a).detach())
    got, want = param_grads(model, mask), param_grads(reference)
    assert got.keys() == want.keys()
    for name in want:
        assert (got[name] is None) == (want[name] is None), name
        if want[name] is not None:
            torch.testing.assert_close(got[name], want[name], rtol=1e-6, atol=1e-7, msg=name)
    assert any(g is None for g in got.values())


def test_parallel_residual_model_trains_with_dropbp() -> None:
    model = tiny(NEOX)
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    handler = DropBPHandler(model, 0.5, seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    batch = sample(length=16)
    with torch.no_grad():
        before = loss_fn(model.eval(), batch).item()
    model.train()
    for _ in range(30):
        loss = loss_fn(model, batch, handler.set_dropped_layers())
        if loss.grad_fn is not None:
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():
        after = loss_fn(model.eval(), batch).item()
    assert after < 0.5 * before
    # Both branches of every parallel block trained (each was kept in some micro-batch).
    for i in range(2):
        for branch in ("attn", "mlp"):
            name = f"transformer.h.{i}.{branch}.proj.weight"
            assert not torch.equal(dict(model.named_parameters())[name], initial[name]), name
    assert 0.3 < handler.summary()["dropbp/realised_rate"] < 0.7


def test_all_dropped_micro_batch_still_trains_the_head() -> None:
    model = tiny(LLAMA)
    handler = DropBPHandler(model, 0.0, seed=4)
    handler.set_drop_rates([0.9] * 4)
    for _ in range(100):
        mask = handler.set_dropped_layers()
        if handler.detect_non_grad():
            break
    assert handler.detect_non_grad() and handler.detact_non_grad() and mask == [(True, True)] * 2
    loss = loss_fn(model, sample(), mask)
    assert loss.grad_fn is not None  # the head, the final norm and the embedding still deserve their backward
    loss.backward()
    assert model.lm_head.weight.grad is not None and model.transformer.wte.weight.grad is not None
    assert all(p.grad is None for p in model.transformer.h.parameters())
    # LoRA-like: only the blocks train. Now the loss has no graph and the loop must skip the backward.
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("transformer.h."))
    assert loss_fn(model, sample(), mask).grad_fn is None


# ---- the samplers beyond the paper's: stratified, prefix; rate warm-up ----------------------------------------------


def test_stratified_sampler_keeps_every_branch_exactly_its_share() -> None:
    model = tiny(LLAMA, n_layer=4)
    handler = DropBPHandler(model, 0.5, seed=3, sampler="stratified")
    handler.set_drop_rates([0.5, 0.25, 0.75, 0.5, 0.1, 0.9, 0.5, 0.3], target=0.5)
    masks = [[d for row in handler.set_dropped_layers() for d in row] for _ in range(40)]
    for window in (masks[:20], masks[20:]):  # any window, not just on average
        for branch, rate in enumerate(handler.drop_rates):
            assert abs(sum(m[branch] for m in window) - rate * len(window)) <= 1, (branch, rate)
    assert len({str(m) for m in masks}) > 4  # the phases spread the kept branches over the draws
    # Independent draws at the same rates stray further over a short window (the variance stratification removes).
    independent = DropBPHandler(model, 0.5, seed=3)
    independent.set_drop_rates(handler.drop_rates, target=0.5)
    draws = [[d for row in independent.set_dropped_layers() for d in row] for _ in range(20)]
    assert max(abs(sum(m[b] for m in draws) - r * 20) for b, r in enumerate(independent.drop_rates)) > 1


@pytest.mark.parametrize("target", [0.25, 0.5, 0.75])
def test_prefix_sampler_drops_a_prefix_at_the_target_rate(target: float) -> None:
    from lit_model.dropbp import FULL_EVERY, prefix_rates

    model = tiny(LLAMA, n_layer=6)
    handler = DropBPHandler(model, target, seed=5, sampler="prefix", seq_len=16)
    flops = handler.flops
    assert flops_weighted_mean(prefix_rates(flops, target), flops) == pytest.approx(target, abs=0.02)
    assert handler.drop_rates == prefix_rates(flops, target) and max(handler.drop_rates) <= MAX_RATE + 1e-12
    n, dropped_flops, counts = 3000, 0.0, [0] * handler.n_branches
    for i in range(n):
        mask = [d for row in handler.set_dropped_layers() for d in row]
        first_kept = mask.index(False) if False in mask else len(mask)
        assert not any(mask[first_kept:]), mask  # everything above the first kept branch is kept: a prefix
        if i % FULL_EVERY == FULL_EVERY - 1:
            assert not any(mask)  # every tenth draw is a full backward
        dropped_flops += sum(f for f, d in zip(flops, mask) if d)
        counts = [c + d for c, d in zip(counts, mask)]
    assert dropped_flops / (n * sum(flops)) == pytest.approx(target, abs=0.02)
    for count, rate in zip(counts, handler.drop_rates):
        assert count / n == pytest.approx(rate, abs=0.03)
    with pytest.raises(ValueError, match="derives every branch's rate from where its cut falls"):
        handler.set_drop_rates([0.5] * handler.n_branches)
    with pytest.raises(ValueError, match="the prefix sampler does not use"):
        handler.sensitivity_based_drop_bp(lambda mask: torch.zeros(()), target=target)


@pytest.mark.parametrize("sampler", ["independent", "stratified", "prefix"])
def test_warmup_ramps_the_rates_from_zero(sampler: str) -> None:
    model = tiny(LLAMA, n_layer=4)
    handler = DropBPHandler(model, 0.5, seed=1, sampler=sampler, warmup_draws=100)
    assert handler.ramp() == 0.0
    first = [handler.set_dropped_layers() for _ in range(20)]
    assert not any(d for row in first[0] for d in row)  # the first draw drops nothing
    for _ in range(80):
        handler.set_dropped_layers()
    assert handler.ramp() == 1.0
    early = sum(d for m in first for row in m for d in row)
    late = sum(d for _ in range(20) for row in handler.set_dropped_layers() for d in row)
    assert early < late  # 0-20% of the rate early, all of it after the warm-up
    # Resume: the warm-up is part of the state, and the stratified phases come back with the seed.
    state = handler.state_dict()
    resumed = DropBPHandler(model, 0.5, seed=99, sampler=sampler)
    resumed.load_state_dict(state)
    assert resumed.warmup_draws == 100 and resumed.phases == handler.phases
    assert [resumed.set_dropped_layers() for _ in range(5)] == [handler.set_dropped_layers() for _ in range(5)]


def test_dropbp_args_reject_prefix_with_sensitivity() -> None:
    from lit_model.train.args import DropBPArgs

    problems = DropBPArgs(rate=0.5, sampler="prefix", sensitivity_at=0.1, warmup=1.5).problems()
    assert any("takes its per-branch rates from its cut" in p for p in problems)
    assert any("--dropbp.warmup must be in [0, 1)" in p for p in problems)
    assert DropBPArgs(rate=0.5, sampler="prefix", sensitivity_at=0.0).problems() == []


def _detach_formulation(model: GPT, mask_holder: list) -> None:
    """The official DropBP layer's formulation: a dropped branch runs with its graph and returns `out.detach()`
    (mask_holder[0] says which, per step); the model itself then runs without a drop mask."""
    for i, block in enumerate(model.transformer.h):
        for j, name in enumerate(("attn_branch", "mlp_branch")):
            original = getattr(block, name)

            def branch(*args, _f=original, _i=i, _j=j):
                out = _f(*args)
                return out.detach() if mask_holder[0][_i][_j] else out

            setattr(block, name, branch)


def test_training_steps_equal_the_official_formulation_with_fused_adamw() -> None:
    """Step for step, with LoRA dropout, fused AdamW and weight decay: the same weights as the detach formulation;
    a dropped branch's parameters are not touched (no decay, no Adam step) and the others' step counts advance."""
    import copy

    from lit_model.peft.lora import LoRAConfig, apply_lora
    from lit_model.dropbp import dropped_parameters

    ours = apply_lora(tiny(LLAMA, n_layer=3), LoRAConfig(r=2, alpha=4, dropout=0.2, query=True, value=True, mlp=True))
    reference = copy.deepcopy(ours)
    holder: list = [None]
    _detach_formulation(reference, holder)
    opts = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1, fused=True)
            for m in (ours, reference)]
    handler = DropBPHandler(ours, 0.5, seed=4)
    for step in range(4):
        mask = handler.set_dropped_layers()
        holder[0] = mask
        before = {n: p.detach().clone() for n, p in ours.named_parameters()}
        for model, opt, m in ((ours, opts[0], mask), (reference, opts[1], None)):
            torch.manual_seed(100 + step)  # the same LoRA dropout masks in both
            opt.zero_grad(set_to_none=True)
            loss_fn(model, sample(seed=step), m).backward()
            opt.step()
        for (name, p), q in zip(ours.named_parameters(), reference.parameters()):
            assert torch.equal(p, q), (step, name)
        dropped = {id(p) for p in dropped_parameters(ours, mask)}
        for name, p in ours.named_parameters():
            if id(p) in dropped:
                assert torch.equal(p, before[name]), (step, name)  # not even weight decay
        assert any(not torch.equal(p, before[n]) for n, p in ours.named_parameters() if p.requires_grad)
    counts = {int(opts[0].state[p]["step"]) for p in ours.parameters() if p.requires_grad and p in opts[0].state}
    assert max(counts) <= 4 and min(counts) < 4  # Adam steps only when a parameter had a gradient


def test_one_pass_sensitivity_estimate_ranks_like_the_exact_measurement() -> None:
    """The one-pass estimate (one backward instead of 2 * n_layer + 1) against the exact measurement on a trained-ish
    tiny model: its own-parameter part is exact, and the ranking of the branches agrees."""
    from lit_model.peft.lora import LoRAConfig, apply_lora

    model = apply_lora(tiny(LLAMA, n_layer=4), LoRAConfig(r=2, alpha=4, query=True, value=True, mlp=True))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)  # non-zero adapters, so every LoRA matrix has a gradient
    handler = DropBPHandler(model, 0.5, seed=0)
    batches = [sample(seed=s) for s in range(3)]
    closures = [lambda mask, b=b: loss_fn(model, b, mask) for b in batches]
    exact = handler.compute_sensitivity(closures)
    estimate = handler.estimate_sensitivity(closures)
    assert len(estimate) == handler.n_branches and all(e >= 0 for e in estimate)

    def ranks(values: list[float]) -> list[int]:
        order = sorted(range(len(values)), key=values.__getitem__)
        return [order.index(i) for i in range(len(values))]

    re, rx = ranks(estimate), ranks(exact)
    n = len(re)
    spearman = 1 - 6 * sum((a - b) ** 2 for a, b in zip(re, rx)) / (n * (n * n - 1))
    assert spearman > 0.6, (spearman, exact, estimate)
    assert [p.grad for p in model.parameters()] == [None] * len(list(model.parameters()))  # .grad untouched
