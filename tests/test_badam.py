"""lit_model.badam: parity with the authors' `badam` package, memory, DropBP, bf16 masters, schedules, resume."""

from __future__ import annotations

import copy
import io
from typing import Any, Callable, Optional

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lit_model import GPT, Config
from lit_model.badam import BlockOptimizer, BlockOptimizerRatio, default_block_prefixes, default_switch_every
from lit_model.memory import model_memory

VOCAB = 64
# The reference warns about fp32 weights and prints at every switch; neither matters here.
pytestmark = pytest.mark.filterwarnings("ignore:BAdam expect model", "ignore:Sparse invariant checks")


def tiny_gpt(n_layer: int = 3, bias: bool = False, dtype: torch.dtype = torch.float32) -> GPT:
    cfg = Config(n_layer=n_layer, n_head=4, n_embd=32, vocab_size=VOCAB, block_size=16, bias=bias)
    return GPT(cfg).to(dtype)


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randint(0, VOCAB, (2, 12), generator=g)
    return x[:, :-1], x[:, 1:]


def loss_of(model: nn.Module, step: int, drop_mask: Any = None) -> torch.Tensor:
    x, y = batch(step)
    logits = model(x, drop_mask=drop_mask)
    return F.cross_entropy(logits.float().reshape(-1, VOCAB), y.reshape(-1))


def train(model: nn.Module, opt: torch.optim.Optimizer, steps: range, sched: Any = None,
          after: Optional[Callable[[int], None]] = None) -> None:
    for step in steps:
        loss_of(model, step).backward()
        opt.step()
        opt.zero_grad()
        if sched is not None:
            sched.step()
        if after is not None:
            after(step)


def params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_same_params(a: nn.Module, b: nn.Module) -> None:
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), name


def block_optimizer(model: nn.Module, lr: float = 1e-2, weight_decay: float = 0.0, **kwargs: Any) -> BlockOptimizer:
    kwargs.setdefault("verbose", 0)
    base = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    return BlockOptimizer(base, list(model.named_parameters()), **kwargs)


PREFIXES = [["transformer.h.0."], ["transformer.h.1."], ["transformer.h.2."], ["lm_head.", "transformer.ln_f."]]


# ---------------------------------------------------------------------------------------------- BlockOptimizer


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", ["ascending", "descending"])
def test_parity_with_the_badam_package(mode: str, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    badam = pytest.importorskip("badam")
    monkeypatch.setattr("badam.block_optim.gc.collect", lambda: 0)  # it collects at every switch: slow, no numbers
    model = tiny_gpt(bias=True, dtype=dtype)
    ref_model = copy.deepcopy(model)
    K = 3
    # no_decay=(): the package decays biases as well (its groups are {"weight_decay": 0.0, **defaults}).
    ours = block_optimizer(model, weight_decay=0.1, block_prefix_list=PREFIXES, switch_block_every=K,
                           switch_mode=mode, no_decay=())
    ref = badam.BlockOptimizer(torch.optim.AdamW(ref_model.parameters(), lr=1e-2, weight_decay=0.1),
                               list(ref_model.named_parameters()), block_prefix_list=PREFIXES,
                               switch_block_every=K, switch_mode=mode, verbose=0)
    assert ref.base_optimizer.param_groups[1]["weight_decay"] == 0.1  # the package's bias group does decay
    # The package switches when (global_step + 1) % K == 0 after incrementing, so its first visit lasts K - 1
    # steps. Starting its counter at -1 gives every visit K steps, as ours does; nothing else reads the counter.
    ref.global_step = -1
    schedule = lambda step: 1.0 / (1.0 + step)  # noqa: E731
    ours_sched = torch.optim.lr_scheduler.LambdaLR(ours, schedule)
    ref_sched = torch.optim.lr_scheduler.LambdaLR(ref, schedule)
    blocks = []
    for step in range(5 * K):  # a full round over the 4 blocks and into the next
        before = params(model)
        blocks.append(ours.current_block)
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        assert trainable == [n for n, p in ref_model.named_parameters() if p.requires_grad]
        for m, opt, sched in ((model, ours, ours_sched), (ref_model, ref, ref_sched)):
            loss_of(m, step).backward()
            opt.step()
            opt.zero_grad()
            sched.step()
        assert_same_params(model, ref_model)
        changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
        assert changed and changed <= set(trainable)  # the comparison is not vacuous, and only the block moves
    order = [0, 1, 2, 3, 0] if mode == "ascending" else [3, 2, 1, 0, 3]
    assert blocks == [b for b in order for _ in range(K)]


def test_the_package_first_visit_is_one_step_short() -> None:
    """Why the parity test aligns the counter: unaligned, the package leaves block 0 after K - 1 steps."""
    badam = pytest.importorskip("badam")
    model = tiny_gpt()
    ref = badam.BlockOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), list(model.named_parameters()),
                               block_prefix_list=PREFIXES, switch_block_every=3, switch_mode="ascending", verbose=0)
    active_ref = []
    for step in range(2):
        loss_of(model, step).backward()
        ref.step()
        ref.zero_grad()
        active_ref.append(ref.active_param_prefixs)
    assert active_ref == [["transformer.h.0."], ["transformer.h.1."]]
    ours_model = tiny_gpt()
    ours = block_optimizer(ours_model, block_prefix_list=PREFIXES, switch_block_every=3, switch_mode="ascending")
    train(ours_model, ours, range(2))
    assert ours.current_block == 0 and ours.steps_in_block == 2


def test_one_visit_is_adamw_on_the_block_without_bias_decay() -> None:
    model = tiny_gpt(bias=True)
    oracle_model = copy.deepcopy(model)
    K = 4
    ours = block_optimizer(model, weight_decay=0.5, block_prefix_list=PREFIXES, switch_block_every=K,
                           switch_mode="ascending")
    block = [(n, p) for n, p in oracle_model.named_parameters() if n.startswith("transformer.h.0.")]
    oracle_model.requires_grad_(False)
    for _, p in block:
        p.requires_grad_(True)
    oracle = torch.optim.AdamW([{"params": [p for n, p in block if "bias" not in n], "weight_decay": 0.5},
                                {"params": [p for n, p in block if "bias" in n], "weight_decay": 0.0}], lr=1e-2)
    train(model, ours, range(K))
    train(oracle_model, oracle, range(K))
    assert_same_params(model, oracle_model)
    assert ours.current_block == 1  # exactly K steps on block 0, then the switch


def test_default_blocks_and_frozen_rest() -> None:
    model = tiny_gpt(n_layer=3)
    names = [n for n, _ in model.named_parameters()]
    assert default_block_prefixes(names) == [["transformer.h.0."], ["transformer.h.1."], ["transformer.h.2."]]
    full = default_block_prefixes(names, include_embedding=True, include_lm_head=True)
    assert full[0] == ["transformer.wte."] and full[-1] == ["lm_head.weight", "transformer.ln_f.weight"]
    # Under a wrapper (Fabric's `_forward_module.`, a container), the blocks keep the wrapper's prefix.
    wrapped = nn.ModuleDict({"model": model})
    assert default_block_prefixes([n for n, _ in wrapped.named_parameters()])[1] == ["model.transformer.h.1."]

    opt = block_optimizer(model, switch_block_every=2, switch_mode="ascending")
    assert opt.n_blocks == 3
    assert opt.trainable_names == [n for n in names if n.startswith("transformer.h.0.")]
    train(model, opt, range(2))
    assert opt.trainable_names == [n for n in names if n.startswith("transformer.h.1.")]
    assert not any(p.requires_grad for n, p in model.named_parameters() if not n.startswith("transformer.h."))


def test_active_modules_train_throughout() -> None:
    model = tiny_gpt()
    opt = block_optimizer(model, switch_block_every=1, switch_mode="ascending", active_modules=["lm_head"])
    for step in range(4):
        before = model.lm_head.weight.detach().clone()
        assert model.lm_head.weight.requires_grad
        train(model, opt, range(step, step + 1))
        assert not torch.equal(model.lm_head.weight, before)
    assert not model.transformer.wte.weight.requires_grad


def test_random_mode_visits_every_block_once_per_round() -> None:
    def visits(seed: int, rounds: int = 4, start_block: Optional[int] = None) -> list[int]:
        model = tiny_gpt()
        opt = block_optimizer(model, block_prefix_list=PREFIXES, switch_block_every=1, switch_mode="random",
                              seed=seed, start_block=start_block)
        seen = []
        for step in range(4 * rounds):
            seen.append(opt.current_block)
            train(model, opt, range(step, step + 1))
        return seen

    seen = visits(seed=0)
    rounds = [seen[i:i + 4] for i in range(0, len(seen), 4)]
    assert all(sorted(r) == [0, 1, 2, 3] for r in rounds)
    assert len({tuple(r) for r in rounds}) > 1  # a fresh permutation each round
    assert visits(seed=0) == seen and visits(seed=1) != seen
    assert visits(seed=0, rounds=1, start_block=2)[0] == 2


def test_memory_state_and_gradients_are_one_block() -> None:
    D = 4
    model = tiny_gpt(n_layer=D)
    block_numel = sum(p.numel() for n, p in model.named_parameters() if n.startswith("transformer.h.0."))
    n_tensors = sum(1 for n, _ in model.named_parameters() if n.startswith("transformer.h.0."))
    # AdamW over the same D blocks (embedding and head frozen): the set BAdam cycles through.
    dense = copy.deepcopy(model)
    for n, p in dense.named_parameters():
        p.requires_grad_(n.startswith("transformer.h."))
    adamw = torch.optim.AdamW([p for p in dense.parameters() if p.requires_grad], lr=1e-3)
    ours = block_optimizer(model, switch_block_every=10, switch_mode="ascending")

    def measure(m: nn.Module, opt: torch.optim.Optimizer) -> tuple[int, int]:
        loss_of(m, 0).backward()
        grads = model_memory(m, opt)["gradients"]  # before the step, which consumes BAdam's gradients
        opt.step()
        return grads, model_memory(m, opt)["optimizer_state"]

    dense_grads, dense_state = measure(dense, adamw)
    grads, state = measure(model, ours)
    assert grads == 4 * block_numel
    assert state == 2 * 4 * block_numel + 4 * n_tensors  # exp_avg, exp_avg_sq and a float32 `step` per tensor
    assert grads * D == dense_grads and state * D == dense_state  # exactly 1/D: the blocks are the same size
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n, _ in model.named_parameters() if n.startswith("transformer.h.0.")}


def test_memory_with_bf16_weights_is_16_bytes_per_active_parameter() -> None:
    model = tiny_gpt(n_layer=4, dtype=torch.bfloat16)
    total = sum(p.numel() for p in model.parameters())
    block_numel = sum(p.numel() for n, p in model.named_parameters() if n.startswith("transformer.h.0."))
    n_tensors = sum(1 for n, _ in model.named_parameters() if n.startswith("transformer.h.0."))
    opt = block_optimizer(model, switch_block_every=10, switch_mode="ascending")
    loss_of(model, 0).backward()
    before = model_memory(model, opt)
    opt.step()
    after = model_memory(model, opt)
    assert before["weights"] == 2 * total
    assert before["gradients"] == 4 * block_numel  # fp32 gradients of the masters; no bf16 gradient is kept
    # fp32 master + two fp32 moments (+ the step scalars): with the gradient, the paper's 16 bytes per active weight.
    assert after["optimizer_state"] == 12 * block_numel + 4 * n_tensors


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dropbp_dropped_branch_is_skipped(dtype: torch.dtype) -> None:
    model = tiny_gpt(dtype=dtype)
    ref_model = copy.deepcopy(model)
    opt = block_optimizer(model, weight_decay=0.1, block_prefix_list=[["transformer.h.1."]], switch_block_every=5)
    drop = [(False, False), (True, False), (False, False)]  # block 1's attention branch: no backward, no gradient
    before = params(model)
    loss_of(model, 0, drop_mask=drop).backward()
    opt.step()
    attn = {n for n in before if n.startswith(("transformer.h.1.attn.", "transformer.h.1.norm_1."))}
    mlp = {n for n in before if n.startswith(("transformer.h.1.mlp.", "transformer.h.1.norm_2."))}
    after = params(model)
    assert all(torch.equal(after[n], before[n]) for n in attn)  # not even weight decay touched them
    assert all(not torch.equal(after[n], before[n]) for n in mlp)
    assert len(opt.state) == len(mlp)  # no optimizer state for the skipped parameters
    # The next step, with the branch kept, trains them as usual.
    loss_of(model, 1).backward()
    opt.step()
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters() if n in attn)

    badam = pytest.importorskip("badam")
    ref = badam.BlockOptimizer(torch.optim.AdamW(ref_model.parameters(), lr=1e-2), list(ref_model.named_parameters()),
                               block_prefix_list=[["transformer.h.1."]], switch_block_every=5, verbose=0)
    loss_of(ref_model, 0, drop_mask=drop).backward()
    with pytest.raises(AssertionError, match="gradient is None"):  # the package cannot skip a dropped branch
        ref.step()


def test_bf16_weights_follow_the_fp32_master() -> None:
    model = tiny_gpt(dtype=torch.bfloat16)
    oracle_model = copy.deepcopy(model)
    opt = block_optimizer(model, weight_decay=0.1, block_prefix_list=[["transformer.h.0."]], switch_block_every=10)
    block = [p for n, p in oracle_model.named_parameters() if n.startswith("transformer.h.0.")]
    oracle_model.requires_grad_(False)
    for p in block:
        p.requires_grad_(True)
    masters = [p.detach().float() for p in block]
    oracle = torch.optim.AdamW(masters, lr=1e-2, weight_decay=0.1)
    start = params(model)
    for step in range(3):
        loss_of(model, step).backward()
        opt.step()
        opt.zero_grad()
        loss_of(oracle_model, step).backward()
        for m, p in zip(masters, block):
            m.grad = p.grad.float()
            p.grad = None
        oracle.step()
        for m, p in zip(masters, block):
            p.data.copy_(m)
    ours_masters = list(opt._masters.values())
    assert all(torch.equal(a, b) for a, b in zip(ours_masters, masters))  # the fp32 masters are what Adam steps
    assert_same_params(model, oracle_model)  # the model holds the bf16-rounded masters
    block_0 = [(n, p) for n, p in model.named_parameters() if n.startswith("transformer.h.0.")]
    for m, (n, p) in zip(ours_masters, block_0):
        assert p.dtype == torch.bfloat16 and torch.equal(p, m.to(torch.bfloat16)) and not torch.equal(p, start[n])
    # The masters carry precision the bf16 weights cannot: rebuilding them from the weights would lose it.
    assert any(not torch.equal(m, m.to(torch.bfloat16).float()) for m in ours_masters)


def test_bf16_gradients_accumulate_in_fp32_and_can_be_clipped() -> None:
    model = tiny_gpt(dtype=torch.bfloat16)
    probe = copy.deepcopy(model)
    opt = block_optimizer(model, block_prefix_list=[["transformer.h.2."]], switch_block_every=10)
    probe.requires_grad_(False)
    probe_block = [p for n, p in probe.named_parameters() if n.startswith("transformer.h.2.")]
    for p in probe_block:
        p.requires_grad_(True)
    expected = [torch.zeros(p.shape) for p in probe_block]
    for step in range(2):  # two micro-batches
        loss_of(model, step).backward()
        loss_of(probe, step).backward()
        for e, p in zip(expected, probe_block):
            e.add_(p.grad.float())
            p.grad = None
    assert all(p.grad is None for p in model.parameters())  # the bf16 gradients were moved out at once
    stepped = [p for g in opt.param_groups for p in g["params"]]
    assert all(torch.equal(p.grad, e) for p, e in zip(stepped, expected))
    # Clipping over the optimizer's parameters, as Fabric's clip_gradients does, sees the whole gradient.
    norm = torch.nn.utils.clip_grad_norm_(stepped, max_norm=1e-3)
    assert norm > 1e-3 and torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in stepped])) <= 1.01e-3


def test_lr_scheduler_across_switches() -> None:
    model = tiny_gpt()
    opt = block_optimizer(model, lr=1e-2, block_prefix_list=PREFIXES, switch_block_every=2, switch_mode="ascending")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5**step)
    for step in range(5):
        before = params(model)
        lr = 1e-2 * 0.5**step
        assert all(g["lr"] == pytest.approx(lr) for g in opt.param_groups)
        assert all(g["lr"] == pytest.approx(lr) for g in opt.base_optimizer.param_groups)
        train(model, opt, range(step, step + 1), sched)
        if step in (0, 2, 4):  # the first Adam step of a visit moves every entry by about lr
            moved = max((p - before[n]).abs().max().item() for n, p in model.named_parameters())
            assert moved == pytest.approx(lr, rel=1e-3)
    assert len(opt.param_groups) == 2 and opt.current_block == 2


def test_activation_checkpointing_and_dropbp_with_bf16_blocks() -> None:
    from lit_model.checkpointing import apply_activation_checkpointing

    model = tiny_gpt(dtype=torch.bfloat16)
    checkpointed = copy.deepcopy(model)
    apply_activation_checkpointing(checkpointed)
    opts = [block_optimizer(m, block_prefix_list=PREFIXES, switch_block_every=2, switch_mode="descending")
            for m in (model, checkpointed)]
    drops = [[(False, False), (False, False), (step % 2 == 0, step % 3 == 0)] for step in range(6)]
    for step in range(6):
        for m, opt in zip((model, checkpointed), opts):
            for micro in range(2):  # gradient accumulation
                loss_of(m, 2 * step + micro, drop_mask=drops[step]).backward()
            opt.step()
            opt.zero_grad()
        assert_same_params(model, checkpointed)
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), tiny_gpt(dtype=torch.bfloat16).parameters()))


def test_fabric_bf16_true_clips_the_masters_gradients() -> None:
    from lightning.fabric import Fabric

    fabric = Fabric(accelerator="cpu", devices=1, precision="bf16-true")
    with fabric.init_module():
        model = tiny_gpt()
    model = fabric.setup(model)
    opt = fabric.setup_optimizers(block_optimizer(model, block_prefix_list=PREFIXES, switch_block_every=2,
                                                  switch_mode="ascending"))
    assert model.transformer.h[0].attn.query.weight.dtype == torch.bfloat16
    assert opt.trainable_names[0].endswith("transformer.h.0.norm_1.weight")  # names under Fabric's wrapper work
    for step in range(3):
        fabric.backward(loss_of(model, step))
        norm = fabric.clip_gradients(model, opt, max_norm=1e-3)
        assert norm > 1e-3  # the gradients were there to be measured and clipped
        opt.step()
        opt.zero_grad()
    assert opt.current_block == 1 and opt.state_dict()["badam"]["position"] == 1


def _resume_case(mode: str, dtype: torch.dtype, make: Callable[[nn.Module, int], torch.optim.Optimizer]) -> None:
    N = 5
    model0 = tiny_gpt(dtype=dtype)
    straight = copy.deepcopy(model0)
    opt = make(straight, 0)
    train(straight, opt, range(2 * N), torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 / (1 + s)))

    first = copy.deepcopy(model0)
    opt1 = make(first, 0)
    sched1 = torch.optim.lr_scheduler.LambdaLR(opt1, lambda s: 1 / (1 + s))
    train(first, opt1, range(N), sched1)
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "optimizer": opt1.state_dict(), "scheduler": sched1.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)

    resumed = tiny_gpt(dtype=dtype)
    resumed.load_state_dict(saved["model"])
    opt2 = make(resumed, 123)  # another seed: the saved RNG state must win
    sched2 = torch.optim.lr_scheduler.LambdaLR(opt2, lambda s: 1 / (1 + s))
    opt2.load_state_dict(saved["optimizer"])
    sched2.load_state_dict(saved["scheduler"])
    train(resumed, opt2, range(N, 2 * N), sched2)
    assert_same_params(resumed, straight)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", ["random", "descending"])
def test_resume_continues_exactly(mode: str, dtype: torch.dtype) -> None:
    # K=2 over 4 blocks: saved mid-visit (step 5), and the resumed run starts a new round (step 8).
    _resume_case(mode, dtype, lambda m, seed: block_optimizer(m, block_prefix_list=PREFIXES, switch_block_every=2,
                                                              switch_mode=mode, seed=seed, weight_decay=0.1))


def test_block_optimizer_errors() -> None:
    model = tiny_gpt()
    named = list(model.named_parameters())
    adamw = torch.optim.AdamW(model.parameters())
    with pytest.raises(ValueError, match="switch_mode must be one of"):
        BlockOptimizer(adamw, named, switch_mode="cyclic")
    with pytest.raises(ValueError, match="block 1 of block_prefix_list is empty"):
        BlockOptimizer(adamw, named, block_prefix_list=[["transformer.h.0."], []])
    with pytest.raises(ValueError, match="'transformer.h.7.' matches no parameter name"):
        BlockOptimizer(adamw, named, block_prefix_list=[["transformer.h.0."], ["transformer.h.7."]])
    with pytest.raises(ValueError, match="must not overlap"):
        BlockOptimizer(adamw, named, block_prefix_list=["transformer.h.1", "transformer.h.1.attn."])
    with pytest.raises(ValueError, match="block_prefix_list is empty"):
        BlockOptimizer(adamw, named, block_prefix_list=[])
    with pytest.raises(ValueError, match="switch_block_every must be a positive integer"):
        BlockOptimizer(adamw, named, switch_block_every=0)
    with pytest.raises(ValueError, match=r"start_block must be in \[0, 3\)"):
        BlockOptimizer(adamw, named, start_block=3)
    with pytest.raises(ValueError, match="active_modules entry 'nope' matches no parameter"):
        BlockOptimizer(adamw, named, active_modules=["nope"])
    with pytest.raises(ValueError, match="apply to the default blocks only"):
        BlockOptimizer(adamw, named, block_prefix_list=PREFIXES, include_lm_head=True)
    with pytest.raises(ValueError, match="found no transformer blocks"):
        lin = nn.Linear(2, 2)
        BlockOptimizer(torch.optim.AdamW(lin.parameters()), list(lin.named_parameters()))
    with pytest.raises(ValueError, match="different hyper-parameters"):
        groups = [{"params": [model.lm_head.weight], "lr": 1.0}, {"params": [model.transformer.wte.weight]}]
        BlockOptimizer(torch.optim.AdamW(groups), named)
    with pytest.raises(TypeError, match="must be a torch.optim.Optimizer"):
        BlockOptimizer(object(), named)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="named_parameters_list is empty"):
        BlockOptimizer(adamw, [])
    saved = block_optimizer(model, block_prefix_list=PREFIXES).state_dict()
    with pytest.raises(ValueError, match="saved with blocks"):
        block_optimizer(model).load_state_dict(saved)
    with pytest.raises(ValueError, match="not saved by BlockOptimizer"):
        block_optimizer(model).load_state_dict(adamw.state_dict())


def test_default_switch_every() -> None:
    assert default_switch_every(10_000, 8, 4) == 313  # ceil(10000 / 32): one round sees every sample
    assert default_switch_every(3_201, 8, 4) == 101
    assert default_switch_every(1_000, 8, 4) == 50  # at least 50
    assert default_switch_every(1_000, 8, 4, minimum=1) == 32
    with pytest.raises(ValueError, match="n_samples must be a positive integer"):
        default_switch_every(0, 8, 4)
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        default_switch_every(10, 0, 4)


# ---------------------------------------------------------------------------------------------- BlockOptimizerRatio


def ratio_optimizer(model: nn.Module, **kwargs: Any) -> BlockOptimizerRatio:
    kwargs.setdefault("verbose", 0)
    kwargs.setdefault("lr", 1e-2)
    return BlockOptimizerRatio(model.parameters(), list(model.named_parameters()), **kwargs)


def test_ratio_parity_with_the_badam_package_adjacent() -> None:
    badam = pytest.importorskip("badam")
    model = tiny_gpt(bias=True)
    ref_model = copy.deepcopy(model)
    # The package finds the embedding by the substring "embed" (ours is "transformer.wte") and crashes on None
    # unless told to include it: freeze embedding and head by hand there, and let ours freeze them by default.
    ref_model.transformer.wte.weight.requires_grad_(False)
    ref_model.lm_head.weight.requires_grad_(False)
    # preserve_threshold=0 on both: the package's small-parameter branch adds 1e-9 to the gradient, then masks
    # it anyway; with it off, both select the same adjacent run of every parameter.
    ours = ratio_optimizer(model, update_ratio=0.25, switch_every=3, preserve_threshold=0)
    ref = badam.BlockOptimizerRatio(ref_model.parameters(), list(ref_model.named_parameters()), update_ratio=0.25,
                                    switch_every=3, preserve_threshold=0, mask_mode="adjacent", lr=1e-2,
                                    include_embedding=True, include_lm_head=True, verbose=0)
    for step in range(8):  # two switches
        before = params(model)
        for m, opt in ((model, ours), (ref_model, ref)):
            loss_of(m, step).backward()
            opt.step()
            opt.zero_grad()
        assert_same_params(model, ref_model)
        assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters())


def selection_mask(opt: BlockOptimizerRatio, name: str) -> torch.Tensor:
    slot = next(s for s in opt._slots() if s.name == name)
    mask = torch.zeros(slot.param.numel(), dtype=torch.bool)
    if slot.index is not None:
        mask[slot.index] = True
    else:
        for a, b in slot.windows():
            mask[a:b] = True
    return mask.view_as(slot.param)


@pytest.mark.parametrize("mask_mode", ["adjacent", "scatter"])
def test_ratio_changes_only_selected_entries(mask_mode: str) -> None:
    model = tiny_gpt()
    opt = ratio_optimizer(model, update_ratio=0.25, switch_every=2, mask_mode=mask_mode, seed=0)
    name = "transformer.h.1.attn.query.weight"  # 32 x 32
    big = [n for n, p in model.named_parameters() if p.requires_grad and p.numel() >= 100]
    masks = []
    for step in range(8):
        selected = {n: selection_mask(opt, n) for n in big}
        if step % 2 == 0:
            masks.append(selected[name])
        before = params(model)
        loss_of(model, step).backward()
        assert all(p.grad is None for p in model.parameters())  # dense gradients were gathered and freed
        opt.step()
        opt.zero_grad()
        after = params(model)
        for n, p in model.named_parameters():
            changed = after[n] != before[n]
            if n.startswith(("transformer.wte.", "lm_head.")):
                assert not changed.any(), n  # frozen by default
            elif p.numel() < 100:
                assert changed.all(), n  # small parameters (the norms here) train whole
            else:
                assert torch.equal(changed, selected[n]), n
                assert changed.sum() == int(0.25 * p.numel()), n
    # Four selections of a quarter each: disjoint, together every entry once.
    assert torch.equal(torch.stack(masks).sum(0), torch.ones(32, 32, dtype=torch.long))
    if mask_mode == "scatter":  # each parameter walks its own random order, even among equal shapes
        assert not torch.equal(selection_mask(opt, name), selection_mask(opt, "transformer.h.0.attn.query.weight"))
        assert not torch.equal(masks[0].reshape(-1)[:256], torch.ones(256, dtype=torch.bool))


def test_ratio_memory_is_the_selected_share() -> None:
    model = tiny_gpt(dtype=torch.bfloat16)
    dense = copy.deepcopy(model).float()
    dense.transformer.wte.weight.requires_grad_(False)
    dense.lm_head.weight.requires_grad_(False)
    adamw = torch.optim.AdamW([p for p in dense.parameters() if p.requires_grad], lr=1e-3)
    opt = ratio_optimizer(model, update_ratio=0.1, preserve_threshold=0)
    selected = sum(s.count for s in opt._slots())
    trained = sum(p.numel() for p in dense.parameters() if p.requires_grad)
    assert selected == pytest.approx(0.1 * trained, rel=0.01)
    for m, o in ((dense, adamw), (model, opt)):
        loss_of(m, 0).backward()
    dense_grads = model_memory(dense, adamw)["gradients"]
    grads = model_memory(model, opt)["gradients"]
    adamw.step()
    opt.step()
    dense_state = model_memory(dense, adamw)["optimizer_state"]
    state = model_memory(model, opt)["optimizer_state"]
    assert grads == 4 * selected  # fp32 gradients of the selected entries only
    assert state == 3 * 4 * selected  # fp32 master + two moments ("step" is a Python int)
    assert grads / dense_grads == pytest.approx(0.1, rel=0.01)
    assert state / dense_state == pytest.approx(1.5 * 0.1, rel=0.02)  # the masters add half of Adam's moments


def test_ratio_skips_dropped_branches() -> None:
    model = tiny_gpt()
    opt = ratio_optimizer(model, update_ratio=0.5)
    before = params(model)
    loss_of(model, 0, drop_mask=[(False, False), (True, True), (False, False)]).backward()
    opt.step()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if n.startswith("transformer.h.1."))
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if n.startswith("transformer.h.0."))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ratio_resume_continues_exactly(dtype: torch.dtype) -> None:
    _resume_case("scatter", dtype, lambda m, seed: ratio_optimizer(m, update_ratio=0.25, switch_every=3,
                                                                   mask_mode="scatter", seed=seed, weight_decay=0.1))


def test_ratio_errors() -> None:
    model = tiny_gpt()
    with pytest.raises(ValueError, match=r"update_ratio must be in \(0, 1\]"):
        ratio_optimizer(model, update_ratio=0.0)
    with pytest.raises(ValueError, match=r"update_ratio must be in \(0, 1\]"):
        ratio_optimizer(model, update_ratio=1.5)
    with pytest.raises(ValueError, match="switch_every must be a positive integer"):
        ratio_optimizer(model, switch_every=0)
    with pytest.raises(ValueError, match="mask_mode must be one of"):
        ratio_optimizer(model, mask_mode="rows")
    with pytest.raises(ValueError, match="missing from named_parameters_list"):
        BlockOptimizerRatio(model.parameters(), [])
    with pytest.raises(ValueError, match="found no parameter to train"):
        BlockOptimizerRatio([model.lm_head.weight], list(model.named_parameters()))
    saved = ratio_optimizer(model, update_ratio=0.25).state_dict()
    with pytest.raises(ValueError, match="saved for other parameters or another update_ratio"):
        ratio_optimizer(model, update_ratio=0.5).load_state_dict(saved)
