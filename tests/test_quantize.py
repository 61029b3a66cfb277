"""QLoRA on bitsandbytes (CPU): 4-bit storage, forward against the dequantized model, parity with peft on a 4-bit
Llama, a short training run, LoRA state dicts, merging, and the errors of `quantize_model` and the precision check."""

import gc
import sys
import weakref

import pytest
import torch
import torch.nn as nn

from lit_model import GPT, Config
from lit_model.peft.lora import LoRAConfig, LoRALinear, apply_lora, is_lora_key
from lit_model.peft.checkpoint import load_adapters
from lit_model.checkpoint_io import save_state_dict
from lit_model.memory import count_parameters
from lit_model.peft.base import adapter_state_dict, merge_adapters
from lit_model.quantize import (
    QUANTIZE_MODES,
    dequantize_weight,
    is_4bit,
    quantize_model,
    quantized_bytes,
    validate_quantize_precision,
)

bnb = pytest.importorskip("bitsandbytes")

LLAMA = dict(n_layer=2, n_head=4, n_embd=64, n_query_groups=2, intermediate_size=128, vocab_size=50, block_size=32)
ALL = dict(query=True, key=True, value=True, projection=True, mlp=True)
BLOCK_LINEARS = 2 * 7  # per Llama block: query, key, value, proj, fc_1, fc_2, proj


def tiny(std: float = 0.2, **overrides) -> GPT:
    model = GPT(Config(**{**LLAMA, **overrides}))
    model.init_weights(std=std)
    return model


def randomize_lora(model: nn.Module) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if is_lora_key(name):
                p.normal_(0.0, 0.2)


def dequantized_copy(model: GPT) -> GPT:
    """A dense GPT holding exactly the values the 4-bit weights represent (the reference for the 4-bit matmul)."""
    dense = GPT(model.config)
    state = {}
    for name, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            if not is_lora_key(pname):
                state[f"{name}.{pname}" if name else pname] = dequantize_weight(p).float()
    dense.load_state_dict(state, strict=True)
    return dense


@pytest.mark.parametrize("mode", QUANTIZE_MODES)
def test_quantize_then_lora_storage_dtypes_and_training_step(mode: str) -> None:
    model = tiny().to(torch.bfloat16)  # the training script loads the dense weights in the compute dtype
    wte, head = model.transformer.wte.weight, model.lm_head.weight
    quantize_model(model, mode, compute_dtype=torch.bfloat16)
    apply_lora(model, LoRAConfig(r=4, **ALL))
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    assert len(layers) == BLOCK_LINEARS
    kind, dq = mode.removeprefix("bnb.").partition("-")[::2]
    for layer in layers:
        w = layer.weight
        assert isinstance(w, bnb.nn.Params4bit) and w.dtype == torch.uint8 and is_4bit(w) and not w.requires_grad
        assert w.numel() * 2 == layer.in_features * layer.out_features  # two 4-bit values per byte
        assert w.quant_state.quant_type == kind and w.quant_state.nested == (dq == "dq")
        assert w.quant_state.dtype == torch.bfloat16
        assert layer.lora_A.dtype == layer.lora_B.dtype == torch.bfloat16
        assert layer.lora_A.requires_grad and layer.lora_B.requires_grad
    # Embedding and head stay dense (and untouched); nothing but LoRA trains.
    assert model.transformer.wte.weight is wte and model.lm_head.weight is head and type(model.lm_head) is nn.Linear
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(adapter_state_dict(model))
    # Storage: 4 bits per value plus the block scales, vs 16 bits for bf16.
    bf16_bytes = 2 * sum(m.in_features * m.out_features for m in layers)
    data = sum(m.weight.nbytes for m in layers)
    states = [m.weight.quant_state for m in layers]
    scales = sum(s.absmax.nbytes + (s.state2.absmax.nbytes if s.nested else 0) for s in states)
    assert data == bf16_bytes / 4 and bf16_bytes / 4 < data + scales < bf16_bytes / 3.4
    # quantized_bytes adds each layer's lookup tables (16 values, and 256 for double quantization).
    assert data + scales < quantized_bytes(model)[0] <= data + scales + len(layers) * (64 + 1028 * (dq == "dq"))
    # Logical parameter counts match the dense model's.
    lora_numel = sum(p.numel() for p in adapter_state_dict(model).values())
    assert count_parameters(model) == (lora_numel, sum(p.numel() for p in tiny().parameters()) + lora_numel)
    # Forward and backward run in bf16 and reach every adapter (B != 0, else A's gradient is zero).
    randomize_lora(model)
    logits = model(torch.randint(0, 50, (2, 8)))
    assert logits.dtype == torch.bfloat16
    logits.float().pow(2).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if is_lora_key(n))


@pytest.mark.parametrize("mode", ["bnb.nf4", "bnb.fp4-dq"])
def test_forward_equals_dequantized_model_and_is_close_to_dense(mode: str) -> None:
    model = tiny(std=0.05, bias=True)  # biases too
    idx = torch.randint(0, 50, (2, 12))
    dense_logits = model(idx)
    quantize_model(model, mode, compute_dtype=torch.float32)
    quantized_logits = model(idx)
    # Exactly the model whose weights are the dequantized values: the 4-bit matmul itself adds no error.
    torch.testing.assert_close(quantized_logits, dequantized_copy(model)(idx), atol=1e-5, rtol=1e-5)
    # And close to the original dense model, up to 4-bit rounding (about 10% per weight).
    rel = (quantized_logits - dense_logits).norm() / dense_logits.norm()
    assert 0.01 < rel < 0.3
    # LoRA on top, with B = 0, gives bitsandbytes' own Linear4bit output; with B != 0 it adds the update.
    apply_lora(model, LoRAConfig(**ALL))
    torch.testing.assert_close(model(idx), quantized_logits, atol=1e-6, rtol=1e-6)


def test_parity_with_peft_on_a_4bit_llama() -> None:
    """peft on a HF Llama quantized by the same function (the 4-bit values are deterministic) is the reference."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from tests.test_lora import PEFT_NAMES, hf_llama_to_gpt, peft_key_to_lit

    hf_config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=False,
    )
    hf = transformers.LlamaForCausalLM(hf_config)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.normal_(0.0, 0.2) if "norm" not in name else p.uniform_(0.5, 1.5)
    ours = hf_llama_to_gpt(hf)
    quantize_model(ours, "bnb.nf4-dq", compute_dtype=torch.float32)
    quantize_model(hf, "bnb.nf4-dq", compute_dtype=torch.float32)
    lora = LoRAConfig(r=4, alpha=8.0, dropout=0.0, query=True, value=True, mlp=True)
    apply_lora(ours, lora)
    target_modules = [n for t, on in lora.targets.items() if on for n in PEFT_NAMES[t]]
    theirs = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=8.0, lora_dropout=0.0,
                                                     target_modules=target_modules))
    ours_params = dict(ours.named_parameters())
    peft_lora = {k: p for k, p in theirs.named_parameters() if "lora_" in k}
    assert len(peft_lora) == len(adapter_state_dict(ours)) == 2 * 5 * 2
    with torch.no_grad():
        for key, p in peft_lora.items():
            p.normal_(0.0, 0.2)
            ours_params[peft_key_to_lit(key)].copy_(p)

    idx, targets = torch.randint(0, 64, (2, 10)), torch.randint(0, 64, (2, 10))
    logits_ours, logits_peft = ours(idx), theirs(input_ids=idx).logits
    assert logits_ours.abs().max() > 1.0
    torch.testing.assert_close(logits_ours, logits_peft, atol=1e-4, rtol=1e-4)
    nn.functional.cross_entropy(logits_ours.flatten(0, 1), targets.flatten()).backward()
    nn.functional.cross_entropy(logits_peft.flatten(0, 1), targets.flatten()).backward()
    for key, p in peft_lora.items():
        torch.testing.assert_close(ours_params[peft_key_to_lit(key)].grad, p.grad, atol=1e-5, rtol=1e-4, msg=key)


def test_short_training_run_lowers_the_loss() -> None:
    model = tiny(std=0.05)
    quantize_model(model, "bnb.nf4", compute_dtype=torch.bfloat16)
    apply_lora(model, LoRAConfig(r=8, alpha=16.0, dropout=0.0, **ALL))
    model = model.to(torch.bfloat16)  # what Fabric's bf16-true does: the 4-bit weights must survive it
    assert all(is_4bit(m.weight) for m in model.modules() if isinstance(m, LoRALinear))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    idx = torch.randint(0, 50, (4, 16))
    losses = []
    for _ in range(20):
        logits = model(idx[:, :-1])
        loss = nn.functional.cross_entropy(logits.float().flatten(0, 1), idx[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_lora_state_dict_on_a_quantized_model(tmp_path) -> None:
    model = apply_lora(quantize_model(tiny(), "bnb.fp4", torch.float32), LoRAConfig())
    randomize_lora(model)
    sd = adapter_state_dict(model)
    assert sorted(sd) == sorted(f"transformer.h.{i}.attn.{n}.lora_{ab}" for i in (0, 1) for n in ("query", "value")
                                for ab in "AB")
    assert all(v.dtype == torch.float32 for v in sd.values())
    other = apply_lora(quantize_model(tiny(), "bnb.fp4", torch.float32), LoRAConfig())
    save_state_dict(sd, tmp_path / "lit_model.lora.pth")
    load_adapters(other, tmp_path / "lit_model.lora.pth")
    assert all(torch.equal(v, sd[k]) for k, v in adapter_state_dict(other).items())


def test_merge_dequantizes() -> None:
    model = quantize_model(tiny().eval(), "bnb.nf4", torch.float32)
    assert not model.transformer.h[0].attn.query.training  # the swapped modules keep the model's mode
    model = apply_lora(model, LoRAConfig(**ALL))
    randomize_lora(model)
    idx = torch.randint(0, 50, (2, 8))
    expected = model(idx)
    merged = merge_adapters(model)
    assert all(type(m) is nn.Linear for n, m in merged.named_modules() if n.endswith(("query", "fc_1")))
    assert not any(is_4bit(p) for p in merged.parameters())
    plain = GPT(merged.config)
    plain.load_state_dict(merged.state_dict(), strict=True)  # a plain dense checkpoint
    torch.testing.assert_close(plain(idx), expected, atol=1e-4, rtol=1e-4)


def test_dense_weights_are_released_layer_by_layer() -> None:
    model = tiny()
    refs = [weakref.ref(m.weight) for m in model.transformer.h.modules() if isinstance(m, nn.Linear)]
    quantize_model(model, "bnb.nf4", torch.bfloat16)
    gc.collect()
    assert len(refs) == BLOCK_LINEARS and all(r() is None for r in refs)


def test_quantize_errors() -> None:
    with pytest.raises(ValueError, match=r"Unknown quantization mode 'nf4'; choose one of bnb.nf4, bnb.nf4-dq"):
        quantize_model(tiny(), "nf4", torch.bfloat16)
    with pytest.raises(ValueError, match="compute_dtype must be float32, bfloat16 or float16"):
        quantize_model(tiny(), "bnb.nf4", torch.float64)
    with pytest.raises(ValueError, match="already has a LoRA adapter: call quantize_model before apply_lora"):
        quantize_model(apply_lora(tiny(), LoRAConfig()), "bnb.nf4", torch.bfloat16)
    twice = quantize_model(tiny(), "bnb.nf4", torch.bfloat16)
    with pytest.raises(ValueError, match="already quantized"):
        quantize_model(twice, "bnb.nf4", torch.bfloat16)
    with pytest.raises(ValueError, match="lm_head shares its weight with an embedding.*add 'lm_head' to skip"):
        quantize_model(tiny(tie_embeddings=True), "bnb.nf4", torch.bfloat16, skip=())
    with torch.device("meta"):
        empty = GPT(Config(**LLAMA))
    with pytest.raises(ValueError, match="meta device.*load the checkpoint before quantize_model"):
        quantize_model(empty, "bnb.nf4", torch.bfloat16)


def test_quantizing_the_head_when_asked() -> None:
    model = quantize_model(tiny(), "bnb.nf4", torch.float32, skip=())
    assert is_4bit(model.lm_head.weight) and not is_4bit(model.transformer.wte.weight)


def test_too_old_bitsandbytes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bnb, "__version__", "0.48.2")
    with pytest.raises(ImportError, match=r"bitsandbytes 0.48.2 is too old.*>= 0.49"):
        quantize_model(tiny(), "bnb.nf4", torch.bfloat16)


def test_missing_bitsandbytes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # makes `import bitsandbytes` raise ImportError
    with pytest.raises(ImportError, match=r"4-bit quantization needs bitsandbytes: pip install 'bitsandbytes>=0.49'"):
        quantize_model(tiny(), "bnb.nf4", torch.bfloat16)


def test_validate_quantize_precision() -> None:
    assert validate_quantize_precision(None, "bf16-mixed") is None
    assert validate_quantize_precision("bnb.nf4", "bf16-true") == torch.bfloat16
    assert validate_quantize_precision("bnb.fp4-dq", "16-true") == torch.float16
    assert validate_quantize_precision("bnb.nf4-dq", "32-true") == torch.float32
    assert validate_quantize_precision("bnb.nf4", 32) == torch.float32
    with pytest.raises(ValueError, match=r"cannot train with precision 'bf16-mixed'.*\(use bf16-true\)"):
        validate_quantize_precision("bnb.nf4", "bf16-mixed")
    with pytest.raises(ValueError, match=r"cannot train with precision '16'.*\(use 16-true\)"):
        validate_quantize_precision("bnb.nf4", "16")
    with pytest.raises(ValueError, match="cannot train with precision '64-true'"):
        validate_quantize_precision("bnb.nf4", "64-true")
    with pytest.raises(ValueError, match="Unknown quantization mode 'bnb.int8'"):
        validate_quantize_precision("bnb.int8", "bf16-true")


@pytest.mark.cuda
def test_cpu_quantized_model_runs_on_cuda() -> None:
    """The training script quantizes on CPU, then moves the model: the 4-bit layout must be the same on CUDA."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    model = apply_lora(quantize_model(tiny(), "bnb.nf4-dq", torch.bfloat16), LoRAConfig(**ALL))
    randomize_lora(model)
    idx = torch.randint(0, 50, (2, 8))
    expected = model(idx).float()
    model = model.to("cuda")
    assert all(is_4bit(m.weight) and m.weight.device.type == "cuda" for m in model.modules()
               if isinstance(m, LoRALinear))
    logits = model(idx.cuda())
    torch.testing.assert_close(logits.float().cpu(), expected, atol=5e-2, rtol=5e-2)
    logits.float().pow(2).mean().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if is_lora_key(n))
