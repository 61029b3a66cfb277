"""lit_model.checkpointing: same gradients as without checkpointing; dropped branches are never recomputed."""

from typing import Optional

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lit_model import GPT, Config
from lit_model.checkpointing import apply_activation_checkpointing, remove_activation_checkpointing
from lit_model.memory import saved_tensor_bytes

VOCAB = 64
LLAMA = dict(n_layer=3, n_head=4, n_query_groups=2, n_embd=32, intermediate_size=48)  # sequential, GQA
NEOX = dict(n_layer=3, n_head=4, n_embd=32, intermediate_size=64, parallel_residual=True, bias=True,
            norm_class_name="LayerNorm", mlp_class_name="GptNeoxMLP", rotary_percentage=0.5, hf_model_type="gpt_neox")
# Block 0 drops its attention, block 1 its MLP, block 2 both.
MASK = [(True, False), (False, True), (True, True)]

Grads = dict[str, Optional[torch.Tensor]]


def make_model(arch: dict, frozen: bool) -> GPT:
    model = GPT(Config(vocab_size=VOCAB, block_size=16, **arch))
    model.init_weights(std=0.2)
    if frozen:  # LoRA-like: a frozen base (embedding included, so block 0's input needs no grad), trainable MLPs
        for name, p in model.named_parameters():
            p.requires_grad_(".mlp." in name)
    return model.train()


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, VOCAB, (2, 12), generator=g), torch.randint(0, VOCAB, (2, 12), generator=g)


def grads(model: GPT, mask: Optional[list] = None, seed: int = 3) -> Grads:
    model.zero_grad(set_to_none=True)
    idx, targets = batch()
    torch.manual_seed(seed)
    logits = model(idx, drop_mask=mask)
    F.cross_entropy(logits.flatten(0, 1), targets.flatten()).backward()
    return {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}


def assert_same_grads(got: Grads, want: Grads) -> None:
    assert got.keys() == want.keys()
    for name in want:
        assert (got[name] is None) == (want[name] is None), name
        if want[name] is not None:
            torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("arch", [LLAMA, NEOX], ids=["llama", "neox"])
@pytest.mark.parametrize("frozen", [False, True], ids=["full", "frozen"])
@pytest.mark.parametrize("every,offload", [(1, False), (1, True), (2, False)])
@pytest.mark.parametrize("mask", [None, MASK], ids=["keep", "dropbp"])
def test_gradients_match_no_checkpointing(arch: dict, frozen: bool, every: int, offload: bool, mask: list) -> None:
    model = make_model(arch, frozen)
    expected = grads(model, mask)
    if mask is not None:  # DropBP: a dropped branch's parameters get no gradient at all
        assert expected["transformer.h.0.attn.query.weight"] is None or frozen
        assert expected["transformer.h.2.mlp.proj.weight"] is None
        assert expected["transformer.h.0.mlp.proj.weight"] is not None
    apply_activation_checkpointing(model, every=every, offload=offload)
    assert_same_grads(grads(model, mask), expected)


def count_calls(module: nn.Module, counter: dict, key: str) -> None:
    original = module.forward

    def counted(*args: torch.Tensor) -> torch.Tensor:
        counter[key] = counter.get(key, 0) + 1
        return original(*args)

    module.forward = counted


@pytest.mark.parametrize("arch", [LLAMA, NEOX], ids=["llama", "neox"])
def test_dropped_branches_are_never_recomputed(arch: dict) -> None:
    model = make_model(arch, frozen=False)
    apply_activation_checkpointing(model)
    calls: dict[str, int] = {}
    for i, block in enumerate(model.transformer.h):
        count_calls(block.attn, calls, f"attn{i}")
        count_calls(block.mlp, calls, f"mlp{i}")
    idx, targets = batch()
    for mask, expected_recomputes in ((None, [1, 1, 1, 1, 1, 1]), (MASK, [0, 1, 1, 0, 0, 0])):
        calls.clear()
        loss = F.cross_entropy(model(idx, drop_mask=mask).flatten(0, 1), targets.flatten())
        assert all(calls[k] == 1 for k in calls) and len(calls) == 6  # the forward runs each branch once
        calls.clear()
        loss.backward()
        recomputes = [calls.get(f"{kind}{i}", 0) for i in range(3) for kind in ("attn", "mlp")]
        assert recomputes == expected_recomputes


@pytest.mark.parametrize("arch", [LLAMA, NEOX], ids=["llama", "neox"])
def test_saves_less_for_backward(arch: dict) -> None:
    model = make_model(arch, frozen=False)
    idx, _ = batch()

    def saved(mask: Optional[list] = None) -> int:
        with saved_tensor_bytes(model) as counter:
            model(idx, drop_mask=mask)
        return counter.bytes

    plain, plain_dropbp = saved(), saved(MASK)
    outside = saved([(True, True)] * 3)  # all branches dropped: only the embedding, final norm and head save
    apply_activation_checkpointing(model)
    every_block, every_block_dropbp = saved(), saved(MASK)
    apply_activation_checkpointing(model, every=2)
    every_other = saved()
    remove_activation_checkpointing(model)
    assert saved() == plain
    assert every_block < every_other < plain
    assert every_block_dropbp < every_block < plain_dropbp < plain
    # Exactly: per checkpointed block one (B, T, n_embd) fp32 tensor (its input, or the residual after a dropped
    # attention), plus RoPE's cos and sin (T, n_elem), shared by all blocks; with the mask, block 2 saves nothing.
    block_io = idx.numel() * model.config.n_embd * 4
    cos_sin = 2 * idx.size(1) * model.config.rope_n_elem * 4
    assert every_block == outside + 3 * block_io + cos_sin
    assert every_block_dropbp == outside + 2 * block_io + cos_sin


def dropout_everywhere(model: GPT) -> None:
    """Dropout inside both branches (as LoRA dropout would be): the recompute must draw the same masks."""
    for block in model.transformer.h:
        for branch in (block.attn, block.mlp):
            original = branch.forward
            branch.forward = lambda *a, _f=original: F.dropout(_f(*a), p=0.3, training=True)


@pytest.mark.parametrize("arch", [LLAMA, NEOX], ids=["llama", "neox"])
@pytest.mark.parametrize("mask", [None, MASK], ids=["keep", "dropbp"])
def test_dropout_rng_is_replayed(arch: dict, mask: Optional[list]) -> None:
    model = make_model(arch, frozen=False)
    dropout_everywhere(model)
    expected = grads(model, mask)
    assert_same_grads(grads(model, mask, seed=3), expected)  # the reference itself is reproducible...
    other_seed = grads(model, mask, seed=4)
    assert (other_seed["lm_head.weight"] - expected["lm_head.weight"]).abs().max() > 1e-3  # ...and seeded
    apply_activation_checkpointing(model)
    assert_same_grads(grads(model, mask), expected)
    # The backward puts the generator back where the forward left it.
    idx, targets = batch()
    loss = F.cross_entropy(model(idx, drop_mask=mask).flatten(0, 1), targets.flatten())
    state = torch.get_rng_state()
    loss.backward()
    assert torch.equal(torch.get_rng_state(), state)


def test_recompute_uses_the_forward_autocast_state() -> None:
    model = make_model(LLAMA, frozen=False)
    idx, targets = batch()

    def autocast_grads() -> Grads:
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(idx)
        F.cross_entropy(logits.float().flatten(0, 1), targets.flatten()).backward()  # backward outside autocast
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    expected = autocast_grads()
    fp32 = grads(model)
    name = "transformer.h.0.attn.query.weight"
    assert (fp32[name] - expected[name]).abs().max() > 1e-4  # autocast really changes the gradients
    apply_activation_checkpointing(model)
    got = autocast_grads()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-7, msg=name)


def test_frozen_4bit_params() -> None:
    bnb = pytest.importorskip("bitsandbytes")
    model = make_model(LLAMA, frozen=False)
    for block in model.transformer.h:  # QLoRA-like: 4-bit frozen MLP matrices, trainable everything else
        for name in ("fc_1", "fc_2", "proj"):
            dense = getattr(block.mlp, name)
            q = bnb.nn.Linear4bit(dense.in_features, dense.out_features, bias=False, compute_dtype=torch.float32)
            q.weight = bnb.nn.Params4bit(dense.weight.data, requires_grad=False, quant_type="nf4")
            setattr(block.mlp, name, q.to("cpu"))
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".mlp." in n)
    expected = grads(model, MASK)
    apply_activation_checkpointing(model)
    assert_same_grads(grads(model, MASK), expected)


def test_autograd_grad_sees_the_gradients() -> None:
    model = make_model(NEOX, frozen=False)
    idx, targets = batch()
    params = [p for p in model.parameters()]
    loss = F.cross_entropy(model(idx).flatten(0, 1), targets.flatten())
    expected = torch.autograd.grad(loss, params)
    apply_activation_checkpointing(model)
    loss = F.cross_entropy(model(idx).flatten(0, 1), targets.flatten())
    got = torch.autograd.grad(loss, params)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-7)
    assert all(p.grad is None for p in params)  # nothing was accumulated behind autograd's back


def test_install_every_k_and_remove() -> None:
    model = make_model(LLAMA, frozen=False)
    apply_activation_checkpointing(model, every=2)
    assert [b.checkpoint_fn is not None for b in model.transformer.h] == [True, False, True]
    apply_activation_checkpointing(model, every=0)
    assert all(b.checkpoint_fn is None for b in model.transformer.h)
    apply_activation_checkpointing(model, every=1)
    remove_activation_checkpointing(model)
    assert all(b.checkpoint_fn is None for b in model.transformer.h)


def test_nothing_to_differentiate_runs_the_plain_block() -> None:
    model = make_model(LLAMA, frozen=False).requires_grad_(False)
    apply_activation_checkpointing(model)
    with saved_tensor_bytes(model) as counter:
        out = model(batch()[0])
    assert out.grad_fn is None and counter.n_saved == 0


def test_errors() -> None:
    model = make_model(LLAMA, frozen=False)
    with pytest.raises(ValueError, match="every must be >= 0"):
        apply_activation_checkpointing(model, every=-1)
    with pytest.raises(ValueError, match="has no lit_model Block.*pass the GPT model"):
        apply_activation_checkpointing(nn.Linear(2, 2))
