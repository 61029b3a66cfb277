"""lit_model.loss: the chunked, recomputed cross-entropy equals F.cross_entropy on full logits, in value and grads."""

from typing import Optional

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lit_model import GPT, Config
from lit_model import loss as loss_module
from lit_model.loss import chunked_cross_entropy, lm_head_weight
from lit_model.memory import saved_tensor_bytes


def reference(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, bias: Optional[torch.Tensor] = None
) -> torch.Tensor:
    logits = F.linear(hidden, weight, bias)
    return F.cross_entropy(logits.flatten(0, -2), targets.flatten(), ignore_index=-100)


def make_inputs(
    B: int = 3, T: int = 7, C: int = 16, V: int = 50, dtype: torch.dtype = torch.float64, bias: bool = True
) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
    hidden = torch.randn(B, T, C, dtype=dtype, requires_grad=True)
    weight = (torch.randn(V, C, dtype=dtype) * 0.5).requires_grad_()
    b = torch.randn(V, dtype=dtype, requires_grad=True) if bias else None
    targets = torch.randint(0, V, (B, T))
    targets[0, :4] = -100  # a masked prompt
    targets[-1, -1] = -100
    return hidden, weight, b, targets


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("chunk_size", [1, 4, 5, 21, 1024])  # B*T = 21: chunks that divide it and ones that don't
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("grad_in_forward", [True, False])
def test_matches_full_cross_entropy(dtype: torch.dtype, chunk_size: int, with_bias: bool, grad_in_forward: bool) -> None:
    hidden, weight, bias, targets = make_inputs(dtype=dtype, bias=with_bias)
    inputs = [t for t in (hidden, weight, bias) if t is not None]
    loss = chunked_cross_entropy(hidden, weight, targets, bias=bias, chunk_size=chunk_size,
                                 grad_in_forward=grad_in_forward)
    grads = torch.autograd.grad(loss, inputs)
    expected = reference(hidden, weight, targets, bias)
    expected_grads = torch.autograd.grad(expected, inputs)
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss, expected, **tol)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, **tol)


@pytest.mark.parametrize("grad_in_forward", [True, False])
def test_gradcheck_tiny_double(grad_in_forward: bool) -> None:
    hidden, weight, bias, targets = make_inputs(B=2, T=3, C=4, V=6)
    assert torch.autograd.gradcheck(
        lambda h, w, b: chunked_cross_entropy(h, w, targets, bias=b, chunk_size=4, grad_in_forward=grad_in_forward),
        (hidden, weight, bias),
    )


def test_gradients_computed_in_forward_follow_the_incoming_gradient() -> None:
    """The forward's gradients assume d out / d loss = 1; the backward must scale them by what really comes in
    (a loss divided by the accumulation steps, or used twice)."""
    hidden, weight, bias, targets = make_inputs(dtype=torch.float64)
    loss = chunked_cross_entropy(hidden, weight, targets, bias=bias, chunk_size=5)
    (0.25 * loss + 3.0 * loss).backward(retain_graph=True)
    first = [t.grad.clone() for t in (hidden, weight, bias)]
    for t in (hidden, weight, bias):
        t.grad = None
    loss.backward()  # the saved gradients are intact after a backward (not scaled in place)
    for got, once in zip(first, (hidden.grad, weight.grad, bias.grad)):
        torch.testing.assert_close(got, 3.25 * once)
    expected = torch.autograd.grad(reference(hidden, weight, targets, bias), (hidden, weight, bias))
    for got, want in zip((hidden.grad, weight.grad, bias.grad), expected):
        torch.testing.assert_close(got, want)


def test_no_gradient_work_without_autograd(monkeypatch) -> None:
    """Under no_grad (validation) the forward computes the loss only, though its inputs require grad."""
    chunks = []
    add_chunk = loss_module._GradBuffers.add_chunk
    monkeypatch.setattr(loss_module._GradBuffers, "add_chunk",
                        lambda self, *a: (chunks.append(a[0]), add_chunk(self, *a)))
    hidden, weight, bias, targets = make_inputs(dtype=torch.float64)  # 21 rows: chunks start at 0, 5, 10, 15, 20
    with torch.no_grad():
        loss = chunked_cross_entropy(hidden, weight, targets, bias=bias, chunk_size=5)
    assert loss.grad_fn is None and chunks == []
    torch.testing.assert_close(loss, reference(hidden, weight, targets, bias).detach())
    chunked_cross_entropy(hidden, weight, targets, bias=bias, chunk_size=5)
    assert chunks == [0, 5, 10, 15, 20]  # with autograd on, the forward does build the gradients


def test_bf16_inputs_close_to_fp32_reference() -> None:
    hidden, weight, _, targets = make_inputs(B=4, T=32, C=64, V=300, dtype=torch.bfloat16, bias=False)
    loss = chunked_cross_entropy(hidden, weight, targets, chunk_size=48)
    assert loss.dtype == torch.float32  # the loss itself is kept in fp32
    loss.backward()
    assert hidden.grad.dtype == weight.grad.dtype == torch.bfloat16
    # fp32 reference on the same (bf16-representable) values
    h32 = hidden.detach().float().requires_grad_()
    w32 = weight.detach().float().requires_grad_()
    expected = reference(h32, w32, targets)
    expected.backward()
    # what training in bf16 usually does: a bf16 head, logits upcast for the loss
    hb = hidden.detach().clone().requires_grad_()
    wb = weight.detach().clone().requires_grad_()
    usual = F.cross_entropy(F.linear(hb, wb).float().flatten(0, 1), targets.flatten())
    usual.backward()
    torch.testing.assert_close(loss, expected, rtol=2e-3, atol=2e-3)
    for got, usual_grad, want in ((hidden.grad, hb.grad, h32.grad), (weight.grad, wb.grad, w32.grad)):
        err = (got.float() - want).abs().max()
        assert err <= 0.01 * want.abs().max()
        assert err <= 1.5 * (usual_grad.float() - want).abs().max()  # no worse than the usual bf16 path


def test_autocast_runs_the_products_in_bf16_and_stays_close() -> None:
    hidden, weight, bias, targets = make_inputs(B=2, T=16, C=32, V=100, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = chunked_cross_entropy(hidden, weight, targets, bias=bias, chunk_size=10)
        auto_ref = reference(hidden, weight, targets, bias)  # nn.Linear's autocast: a bf16 product
    assert loss.dtype == torch.float32
    grads = torch.autograd.grad(loss, (hidden, weight, bias))
    assert [g.dtype for g in grads] == [torch.float32] * 3
    expected = reference(hidden, weight, targets, bias)
    expected_grads = torch.autograd.grad(expected, (hidden, weight, bias))
    torch.testing.assert_close(loss, auto_ref.float(), rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(loss, expected, rtol=1e-2, atol=1e-2)
    assert (loss - expected).abs() > 0  # the products really ran in bf16
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=3e-2, atol=1e-3)


def test_all_targets_ignored_gives_connected_zero() -> None:
    hidden, weight, bias, targets = make_inputs(dtype=torch.float32)
    targets.fill_(-100)
    assert reference(hidden, weight, targets, bias).isnan()  # what the naive loss does
    loss = chunked_cross_entropy(hidden, weight, targets, bias=bias, chunk_size=4)
    assert loss.item() == 0.0
    assert loss.grad_fn is not None
    loss.backward()
    for t in (hidden, weight, bias):
        assert t.grad is not None and not t.grad.isnan().any()
        assert torch.count_nonzero(t.grad) == 0


def test_frozen_head_gets_no_gradient() -> None:
    hidden, weight, _, targets = make_inputs(dtype=torch.float64, bias=False)
    weight.requires_grad_(False)
    loss = chunked_cross_entropy(hidden, weight, targets, chunk_size=6)
    loss.backward()
    assert weight.grad is None
    h = hidden.detach().requires_grad_()
    reference(h, weight, targets).backward()
    torch.testing.assert_close(hidden.grad, h.grad)


def test_saved_for_backward_does_not_grow_with_vocab() -> None:
    def saved(V: int, fn: str, train_head: bool = True) -> int:
        h0, weight, _, targets = make_inputs(B=2, T=32, C=16, V=V, dtype=torch.float32, bias=False)
        hidden = h0 * 1.0  # an activation, as the model's final norm output is
        weight.requires_grad_(train_head)
        with saved_tensor_bytes() as counter:
            if fn == "reference":
                reference(hidden, weight, targets)
            else:
                chunked_cross_entropy(hidden, weight, targets, chunk_size=16, grad_in_forward=fn == "in_forward")
        return counter.bytes

    # Recomputing: hidden (64 x 16 fp32) + targets and mask (64 long + 64 bool) + logsumexp (64 fp32) + the count.
    small, large = saved(64, "recompute"), saved(8192, "recompute")
    assert small == large <= 64 * 16 * 4 + 64 * 8 + 64 + 64 * 4 + 8
    # Gradients in the forward: the hidden's gradient (64 x 16) instead of the hidden, plus, for a trained head, its
    # weight gradient (V x 16 fp32, the size of the weight: it becomes .grad in the backward either way).
    assert saved(64, "in_forward", train_head=False) == saved(8192, "in_forward", train_head=False) == 64 * 16 * 4
    assert saved(8192, "in_forward") == 64 * 16 * 4 + 8192 * 16 * 4
    # The full-logits loss keeps at least the (64, V) fp32 logits or their log-softmax.
    assert saved(8192, "reference") >= 64 * 8192 * 4


def test_tied_embedding_weight_matches() -> None:
    config = Config(n_layer=1, n_head=2, n_embd=16, vocab_size=40, block_size=16, intermediate_size=32,
                    tie_embeddings=True)
    model = GPT(config)
    model.init_weights(std=0.2)
    idx = torch.randint(0, 40, (2, 9))
    targets = torch.randint(0, 40, (2, 9))
    w, b = lm_head_weight(model.lm_head)
    assert w is model.transformer.wte.weight and b is None
    loss = chunked_cross_entropy(model(idx, return_hidden=True), w, targets, chunk_size=5)
    loss.backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    expected = F.cross_entropy(model(idx).flatten(0, 1), targets.flatten())
    expected.backward()
    torch.testing.assert_close(loss, expected)
    for n, p in model.named_parameters():
        torch.testing.assert_close(got[n], p.grad, msg=n)


def our_lora_head(peft_layer: nn.Module) -> nn.Module:
    """Our LoRALinear over peft's base layer, with peft's adapter values."""
    from lit_model.peft.lora import LoRALinear

    base = peft_layer.base_layer
    r = peft_layer.lora_A["default"].weight.shape[0]
    head = LoRALinear(base.weight, base.bias, r=r, alpha=peft_layer.scaling["default"] * r).double()
    with torch.no_grad():
        head.lora_A.copy_(peft_layer.lora_A["default"].weight)  # (r, in)
        head.lora_B.copy_(peft_layer.lora_B["default"].weight)  # (out, r)
    return head


def test_lora_head_matches_peft() -> None:
    peft = pytest.importorskip("peft")
    wrapper = nn.ModuleDict(dict(head=nn.Linear(16, 40, bias=True))).double()
    base = wrapper.head
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["head"], init_lora_weights=False)
    layer = peft.get_peft_model(wrapper, config).base_model.model.head
    assert not base.weight.requires_grad  # peft freezes the base
    head = our_lora_head(layer)
    hidden = torch.randn(2, 9, 16, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 40, (2, 9))
    w, b = lm_head_weight(head)
    loss = chunked_cross_entropy(hidden, w, targets, bias=b, chunk_size=4)
    grads = torch.autograd.grad(loss, [hidden, head.lora_A, head.lora_B])
    expected = F.cross_entropy(layer(hidden).flatten(0, 1), targets.flatten())
    expected_grads = torch.autograd.grad(
        expected, [hidden, layer.lora_A["default"].weight, layer.lora_B["default"].weight])
    torch.testing.assert_close(loss, expected)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want)
    # A merged head already holds the delta: its weight is used as is.
    head.merge()
    assert lm_head_weight(head)[0] is head.weight


def test_errors() -> None:
    hidden, weight, bias, targets = make_inputs(dtype=torch.float32)
    with pytest.raises(ValueError, match="chunk_size must be a positive"):
        chunked_cross_entropy(hidden, weight, targets, chunk_size=0)
    with pytest.raises(ValueError, match="same C"):
        chunked_cross_entropy(hidden, weight[:, :8], targets)
    with pytest.raises(ValueError, match="targets .* must have the shape"):
        chunked_cross_entropy(hidden, weight, targets[:, :3])
    with pytest.raises(ValueError, match=r"bias \(7,\) must be"):
        chunked_cross_entropy(hidden, weight, targets, bias=bias[:7])
    with pytest.raises(TypeError, match="quantized head is not supported"):
        chunked_cross_entropy(hidden, weight.to(torch.uint8), targets)
    with pytest.raises(TypeError, match="integer class indices"):
        chunked_cross_entropy(hidden, weight, targets.float())
    quantized = nn.Linear(16, 50, bias=False)
    quantized.weight = nn.Parameter(torch.zeros(400, 1, dtype=torch.uint8), requires_grad=False)  # packed 4-bit
    with pytest.raises(TypeError, match="quantized head is not supported"):
        lm_head_weight(quantized)
    bad = targets.clone()
    bad[1, 2] = 50
    with pytest.raises(ValueError, match=r"outside \[0, 50\) \(e.g. 50\).*vocab_size"):
        chunked_cross_entropy(hidden, weight, bad)
