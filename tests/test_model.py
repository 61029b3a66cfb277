"""The model's own behaviour: KV cache, sliding window, DropBP gate semantics, and its errors."""

import pytest
import torch

from lit_model import GPT, Config
from lit_model.model import attention_mask

LLAMA = dict(n_layer=2, n_head=4, n_embd=32, n_query_groups=2, vocab_size=50, block_size=32)
NEOX = dict(n_layer=2, n_head=4, n_embd=32, vocab_size=50, block_size=32, parallel_residual=True, bias=True,
            norm_class_name="LayerNorm", mlp_class_name="GptNeoxMLP", rotary_percentage=0.25, hf_model_type="gpt_neox")


def tiny(**kwargs) -> GPT:
    model = GPT(Config(**kwargs))
    model.init_weights(std=0.2)
    return model


@pytest.mark.parametrize("kwargs", [LLAMA, NEOX, {**LLAMA, "sliding_window": 3}], ids=["llama", "neox", "window"])
def test_kv_cache_prefill_and_decode_match_full_forward(kwargs) -> None:
    model = tiny(**kwargs).eval()
    idx = torch.randint(0, 50, (2, 12))
    with torch.no_grad():
        full = model(idx)
        model.set_kv_cache(batch_size=2, max_seq_length=16)
        prefill = model(idx[:, :5], input_pos=torch.arange(5))
        steps = [model(idx[:, t : t + 1], input_pos=torch.tensor([t])) for t in range(5, 12)]
    torch.testing.assert_close(torch.cat([prefill, *steps], dim=1), full, atol=1e-5, rtol=1e-5)


def test_sliding_window_mask_limits_attention() -> None:
    mask = attention_mask(torch.arange(5), torch.arange(5), sliding_window=2)
    expected = torch.tensor([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 1, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 0, 1, 1]])
    assert torch.equal(mask, expected.bool())
    # A window as long as the sequence is plain causal attention.
    a, b = tiny(**LLAMA).eval(), tiny(**{**LLAMA, "sliding_window": 8}).eval()
    b.load_state_dict(a.state_dict())
    idx = torch.randint(0, 50, (1, 8))
    torch.testing.assert_close(a(idx), b(idx))
    c = tiny(**{**LLAMA, "sliding_window": 2}).eval()
    c.load_state_dict(a.state_dict())
    assert not torch.allclose(a(idx), c(idx))


@pytest.mark.parametrize("kwargs", [LLAMA, NEOX], ids=["sequential", "parallel"])
def test_drop_mask_keeps_forward_and_removes_branch_gradients(kwargs) -> None:
    model = tiny(**kwargs).train()
    idx = torch.randint(0, 50, (2, 10))
    mask = [(True, False), (False, True)]
    plain, dropped = model(idx), model(idx, drop_mask=mask)
    torch.testing.assert_close(dropped, plain, atol=0, rtol=0)
    dropped.sum().backward()
    blocks = model.transformer.h
    assert all(p.grad is None for p in blocks[0].attn.parameters())
    assert all(p.grad is None for p in blocks[1].mlp.parameters())
    assert all(p.grad is not None for p in blocks[0].mlp.parameters())
    assert all(p.grad is not None for p in blocks[1].attn.parameters())
    model.eval()  # eval never drops
    model.zero_grad()
    model(idx, drop_mask=[(True, True)] * 2).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_tied_embeddings_share_storage() -> None:
    model = tiny(**LLAMA, tie_embeddings=True)
    assert model.lm_head.weight is model.transformer.wte.weight


def test_gemma_style_scaling_and_unit_offset_norm() -> None:
    model = tiny(**LLAMA, scale_embeddings=True, norm_unit_offset=True, mlp_class_name="GemmaMLP",
                 gelu_approximate="tanh")
    assert torch.all(model.transformer.ln_f.weight == 0)  # (1 + 0) scale: identity at initialisation
    x = torch.randn(2, 32)
    torch.testing.assert_close(model.transformer.ln_f(x), x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5))
    # Embeddings are scaled by sqrt(n_embd) before the first block.
    idx = torch.randint(0, 50, (1, 4))
    captured = {}
    model.transformer.h[0].register_forward_pre_hook(lambda m, args: captured.update(x=args[0]))
    model(idx)
    torch.testing.assert_close(captured["x"], model.transformer.wte(idx) * 32**0.5)


def test_errors() -> None:
    model = tiny(**LLAMA)
    with pytest.raises(ValueError, match="exceeds the model's block_size 32"):
        model(torch.zeros(1, 33, dtype=torch.long))
    with pytest.raises(RuntimeError, match="call `model.set_kv_cache"):
        model(torch.zeros(1, 1, dtype=torch.long), input_pos=torch.tensor([0]))
    with pytest.raises(ValueError, match="max_seq_length 64 exceeds"):
        model.set_kv_cache(1, 64)
    with pytest.raises(ValueError, match="drop_mask has 1 rows, the model has 2 blocks"):
        model.train()(torch.zeros(1, 2, dtype=torch.long), drop_mask=[(True, True)])


def test_import_needs_torch_only() -> None:
    import subprocess
    import sys

    code = (
        "import sys\n"
        "class Refuse:\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name.split('.')[0] in {'yaml', 'lightning', 'transformers', 'safetensors', 'sentencepiece',\n"
        "                                  'tokenizers', 'jsonargparse', 'bitsandbytes', 'tqdm', 'peft'}:\n"
        "            raise ImportError('refused ' + name)\n"
        "sys.meta_path.insert(0, Refuse())\n"
        "import torch, lit_model\n"
        "model = lit_model.GPT(lit_model.Config(n_layer=1, n_head=2, n_embd=8, vocab_size=10, block_size=8))\n"
        "print(model(torch.zeros(1, 3, dtype=torch.long)).shape)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "torch.Size([1, 3, 10])" in result.stdout
