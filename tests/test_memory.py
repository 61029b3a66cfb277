"""lit_model.memory: storages counted once, parameters excluded, model/optimizer bytes."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lit_model.memory import model_memory, saved_tensor_bytes, tensor_bytes


def test_tensor_bytes_counts_each_storage_once() -> None:
    a = torch.zeros(10, 4)  # 160 bytes
    b = torch.zeros(3, dtype=torch.float64)  # 24 bytes
    assert tensor_bytes([a]) == 160
    assert tensor_bytes([a, a.view(40), a.t(), a[0], b]) == 160 + 24
    # A slice keeps its whole storage alive; a clone is new memory.
    assert tensor_bytes([a[:1]]) == 160
    assert tensor_bytes([a, a.clone()]) == 320


def test_saved_tensor_bytes_counts_views_once_and_skips_leaves() -> None:
    leaf = torch.randn(8, 16, requires_grad=True)
    x = leaf * 2  # a non-leaf activation: 8 * 16 * 4 = 512 bytes
    with saved_tensor_bytes() as saved:
        y = x.sin()  # saves x
        z = x.t().cos()  # saves a view of x: the same storage
        w = leaf.exp()  # saves its result (an activation) and nothing of the leaf
    assert saved.n_saved == 3
    assert saved.bytes == 512 + 512  # x and exp's result
    assert saved.by_device() == {"cpu": 1024}
    (y.sum() + z.sum() + w.sum()).backward()  # the hooks pass tensors through unchanged
    torch.testing.assert_close(leaf.grad, 2 * (2 * leaf).cos() - 2 * (2 * leaf).sin() + leaf.exp())


def test_saved_tensor_bytes_excludes_parameter_storages() -> None:
    lin = nn.Linear(16, 4, bias=False)
    x = torch.randn(8, 16, requires_grad=True) * 1.0  # non-leaf, 512 bytes
    w = lin.weight.detach()  # not a Parameter, not requiring grad, but the parameter's memory
    with saved_tensor_bytes() as counted:
        F.linear(x, w).sum()  # a frozen weight: linear saves only the weight (for the input's gradient)
    with saved_tensor_bytes(lin) as excluded:
        F.linear(x, w).sum()
    assert counted.n_saved == excluded.n_saved == 1
    assert counted.bytes == 256
    assert excluded.bytes == 0
    # An nn.Parameter is never counted, even when no module is passed; the input saved for its gradient is.
    with saved_tensor_bytes() as params:
        lin(x).sum()
    assert params.n_saved == 2
    assert params.bytes == 512


def test_model_memory_weights_gradients_and_momentum() -> None:
    model = nn.Sequential(nn.Linear(16, 4), nn.LayerNorm(4))  # (64 + 4 + 4 + 4) * 4 = 304 bytes
    model.register_buffer("scale", torch.ones(5))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    before = model_memory(model, optimizer)
    assert before == {"weights": 304, "buffers": 20, "gradients": 0, "optimizer_state": 0, "total": 324}
    model(torch.randn(2, 16)).sum().backward()
    optimizer.step()
    after = model_memory(model, optimizer)
    assert after["gradients"] == 304
    assert after["optimizer_state"] == 304  # one momentum buffer per parameter
    assert after["total"] == 304 + 20 + 304 + 304


def test_model_memory_counts_tied_weights_once_and_master_copies() -> None:
    emb = nn.Embedding(10, 8)
    head = nn.Linear(8, 10, bias=False)
    head.weight = emb.weight
    model = nn.ModuleDict(dict(emb=emb, head=head)).to(torch.bfloat16)  # 80 * 2 = 160 bytes
    assert model_memory(model)["weights"] == 160
    # A block optimizer steps fp32 master copies: they are optimizer state, and their grads are gradients.
    master = [p.detach().float().requires_grad_() for p in model.parameters()]
    master[0].grad = torch.zeros_like(master[0])
    optimizer = torch.optim.SGD(master, lr=0.1)
    mem = model_memory(model, optimizer)
    assert mem["optimizer_state"] == 320
    assert mem["gradients"] == 320


def test_model_memory_includes_4bit_quant_state() -> None:
    bnb = pytest.importorskip("bitsandbytes")
    layer = bnb.nn.Linear4bit(64, 32, bias=False, quant_type="nf4", compute_dtype=torch.float32).to("cpu")
    weight = layer.weight
    packed = weight.numel() * weight.element_size()
    assert packed == 64 * 32 // 2  # two 4-bit values per byte
    qs = weight.quant_state
    # Default NF4 compresses the statistics: uint8 absmax with an offset, and a nested fp32 state for them.
    assert qs.nested
    stats = tensor_bytes([qs.absmax, qs.code, qs.offset, qs.state2.absmax, qs.state2.code])
    assert stats >= 32 + 16 * 4 + 4
    assert model_memory(layer)["weights"] == packed + stats
    # Saved-for-backward counting never counts the 4-bit weight (a Params4bit is an nn.Parameter).
    x = torch.randn(4, 64, requires_grad=True) * 1.0
    with saved_tensor_bytes(layer) as saved:
        layer(x).sum()
    assert saved.bytes <= x.numel() * 4 + 64 * 32 * 4  # at most the input and a dequantized weight
