"""LoRA: merge/unmerge, trainability, state dicts, base-checkpoint loading, errors, and parity with peft."""

import math

import pytest
import torch
import torch.nn as nn

from lit_model import GPT, Config
from lit_model.peft.lora import (
    LoRAConfig,
    LoRALinear,
    apply_lora,
    is_lora_key,
    lora_target_names,
)
from lit_model.memory import count_parameters
from lit_model.checkpoint_io import save_state_dict
from lit_model.peft.base import adapter_keys, adapter_state_dict, merge_adapters
from lit_model.peft.checkpoint import load_adapters
from lit_model.hf.families import config_from_hf

LLAMA = dict(n_layer=2, n_head=4, n_embd=32, n_query_groups=2, intermediate_size=48, vocab_size=50, block_size=32)
NEOX = dict(n_layer=2, n_head=4, n_embd=32, vocab_size=50, block_size=32, parallel_residual=True, bias=True,
            norm_class_name="LayerNorm", mlp_class_name="GptNeoxMLP", rotary_percentage=0.25, hf_model_type="gpt_neox")
ALL = dict(query=True, key=True, value=True, projection=True, mlp=True, head=True)


def tiny(**kwargs) -> GPT:
    model = GPT(Config(**kwargs))
    model.init_weights(std=0.2)
    return model


def randomize_lora(model: nn.Module, std: float = 0.2) -> None:
    """Non-zero B (it starts at zero), so the adapters change the output."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if is_lora_key(name):
                p.normal_(0.0, std)


def test_config_problems_listed_together() -> None:
    assert LoRAConfig().problems() == []
    bad = LoRAConfig(r=0, alpha=-1.0, dropout=1.0, query=False, value=False)
    assert len(bad.problems()) == 4
    with pytest.raises(ValueError, match=r"r must be a positive integer.*alpha must be positive.*dropout.*targets no"):
        bad.validate()
    with pytest.raises(ValueError, match="Invalid LoRA settings: --lora.r"):
        apply_lora(tiny(**LLAMA), LoRAConfig(r=0))


def test_fresh_adapters_keep_output_and_reuse_weights() -> None:
    model = tiny(**LLAMA)
    idx = torch.randint(0, 50, (2, 8))
    base = model(idx)
    query_weight = model.transformer.h[0].attn.query.weight
    apply_lora(model, LoRAConfig(dropout=0.5, **ALL))
    layer = model.transformer.h[0].attn.query
    assert isinstance(layer, LoRALinear) and layer.weight is query_weight  # the same Parameter, no copy
    assert layer.scaling == 16 / 8
    assert torch.all(layer.lora_B == 0) and layer.lora_A.abs().sum() > 0
    # B = 0: the output is the base model's, in train mode too (dropout acts on the LoRA path only).
    torch.testing.assert_close(model.train()(idx), base, atol=0, rtol=0)


def test_targets() -> None:
    llama, neox = tiny(**LLAMA), tiny(**NEOX)
    assert lora_target_names(llama, LoRAConfig()) == [f"transformer.h.{i}.attn.{n}" for i in (0, 1)
                                                       for n in ("query", "value")]
    names = lora_target_names(neox, LoRAConfig(query=False, value=False, mlp=True, head=True))
    assert names == ["transformer.h.0.mlp.fc", "transformer.h.0.mlp.proj", "transformer.h.1.mlp.fc",
                     "transformer.h.1.mlp.proj", "lm_head"]
    apply_lora(llama, LoRAConfig(**ALL))
    replaced = sorted(n for n, m in llama.named_modules() if isinstance(m, LoRALinear))
    assert len(replaced) == 2 * 7 + 1  # 4 attention + 3 MLP matrices per block, and the head
    assert not any(type(m) is nn.Linear for m in llama.modules())


@pytest.mark.parametrize("kwargs", [LLAMA, NEOX], ids=["llama", "neox-bias"])
def test_merge_equals_unmerged_and_unmerge_restores(kwargs) -> None:
    model = tiny(**kwargs).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    apply_lora(model, LoRAConfig(**ALL))
    randomize_lora(model)
    idx = torch.randint(0, 50, (2, 8))
    unmerged = model(idx)
    assert not model.transformer.h[0].attn.query.lora_dropout.training  # new modules follow the model's mode
    for m in model.modules():
        if isinstance(m, LoRALinear):
            m.merge()
            m.merge()  # a second merge is a no-op (the update is not added twice)
    # Equal logits also prove the merged forward skips the LoRA path: otherwise the update would count twice.
    torch.testing.assert_close(model(idx), unmerged, atol=1e-5, rtol=1e-5)
    for m in model.modules():
        if isinstance(m, LoRALinear):
            m.unmerge()
    torch.testing.assert_close(model(idx), unmerged, atol=1e-5, rtol=1e-5)
    state = model.state_dict()
    for k, v in before.items():
        torch.testing.assert_close(state[k], v, atol=1e-6, rtol=1e-6)


def test_only_lora_trainable_and_parameter_counts() -> None:
    model = tiny(**LLAMA)
    base_total = sum(p.numel() for p in model.parameters())
    apply_lora(model, LoRAConfig(r=4, key=True))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith((".lora_A", ".lora_B")) for n in trainable)
    assert len(trainable) == 2 * 3 * 2  # 2 blocks x (query, key, value) x (A, B)
    # query: 32 -> 32; key and value: 32 -> 2 groups x 8 = 16
    per_block = 4 * (32 + 32) + 2 * 4 * (32 + 16)
    assert count_parameters(model) == (2 * per_block, base_total + 2 * per_block)
    model(torch.randint(0, 50, (1, 6))).sum().backward()
    assert all((p.grad is not None) == p.requires_grad for p in model.parameters())


def test_lora_state_dict_round_trip_and_errors(tmp_path) -> None:
    model = tiny(**LLAMA)
    apply_lora(model, LoRAConfig())
    randomize_lora(model)
    sd = adapter_state_dict(model)
    assert len(sd) == 8 and all(k.endswith((".lora_A", ".lora_B")) for k in sd)
    assert set(adapter_keys(model)) == set(sd) == {k for k in model.state_dict() if is_lora_key(k)}
    assert sd["transformer.h.0.attn.query.lora_A"].shape == (8, 32)
    assert sd["transformer.h.0.attn.value.lora_B"].shape == (16, 8)
    path = tmp_path / "lit_model.lora.pth"
    save_state_dict(sd, path)

    other = apply_lora(tiny(**LLAMA), LoRAConfig())
    load_adapters(other, path)
    for k, v in adapter_state_dict(other).items():
        assert torch.equal(v, sd[k])

    with pytest.raises(ValueError, match=r"missing from the weights \(4\): .*h\.0\.attn\.key\.lora_A"):
        load_adapters(apply_lora(tiny(**LLAMA), LoRAConfig(key=True)), path)
    with pytest.raises(ValueError, match=r"not in the model \(4\): transformer\.h\.0\.attn\.value"):
        load_adapters(apply_lora(tiny(**LLAMA), LoRAConfig(value=False)), path)
    with pytest.raises(ValueError, match=r"shape differs \(8\): .*file \(8, 32\), model \(4, 32\)"):
        load_adapters(apply_lora(tiny(**LLAMA), LoRAConfig(r=4)), path)


def test_base_checkpoint_loads_into_lora_model() -> None:
    plain = tiny(**NEOX)
    idx = torch.randint(0, 50, (2, 8))
    expected = plain.eval()(idx)
    model = GPT(plain.config)  # different random weights
    apply_lora(model, LoRAConfig(**ALL))
    result = model.load_state_dict(plain.state_dict(), strict=False)
    assert result.unexpected_keys == []
    assert sorted(result.missing_keys) == sorted(adapter_state_dict(model))
    torch.testing.assert_close(model.eval()(idx), expected, atol=0, rtol=0)


def test_merge_lora_gives_a_plain_checkpoint() -> None:
    model = tiny(**LLAMA).eval()
    apply_lora(model, LoRAConfig(**ALL))
    randomize_lora(model)
    idx = torch.randint(0, 50, (2, 8))
    expected = model(idx)
    merged = merge_adapters(model)
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    plain = GPT(merged.config).eval()
    plain.load_state_dict(merged.state_dict(), strict=True)
    torch.testing.assert_close(plain(idx), expected, atol=1e-5, rtol=1e-5)


def test_apply_errors() -> None:
    tied = tiny(**LLAMA, tie_embeddings=True)
    with pytest.raises(ValueError, match="LM head is not supported for models with tied embeddings.*head=False"):
        apply_lora(tied, LoRAConfig(head=True))
    apply_lora(tied, LoRAConfig())  # the default (no head) is fine; the head stays shared with the embedding
    assert tied.lm_head.weight is tied.transformer.wte.weight
    with pytest.raises(ValueError, match="already applied"):
        apply_lora(tied, LoRAConfig())
    odd = tiny(**LLAMA)
    odd.transformer.h[1].attn.value = nn.Identity()
    with pytest.raises(TypeError, match=r"transformer\.h\.1\.attn\.value is a Identity, expected nn\.Linear"):
        apply_lora(odd, LoRAConfig())
    with pytest.raises(ValueError, match="LoRA rank r must be positive, got 0"):
        LoRALinear(nn.Parameter(torch.zeros(4, 3)), r=0)


# ---- parity with peft on a Hugging Face Llama --------------------------------------------------------------------


def hf_llama_to_gpt(hf_model: nn.Module) -> GPT:
    """A GPT with the HF Llama's weights (the name map is written out here; the real converter lives elsewhere)."""
    config = config_from_hf(hf_model.config.to_dict())
    model = GPT(config)
    per_layer = {
        "self_attn.q_proj": "attn.query", "self_attn.k_proj": "attn.key", "self_attn.v_proj": "attn.value",
        "self_attn.o_proj": "attn.proj", "mlp.gate_proj": "mlp.fc_1", "mlp.up_proj": "mlp.fc_2",
        "mlp.down_proj": "mlp.proj", "input_layernorm": "norm_1", "post_attention_layernorm": "norm_2",
    }
    sd = {}
    for key, value in hf_model.state_dict().items():
        if key == "model.embed_tokens.weight":
            sd["transformer.wte.weight"] = value
        elif key == "model.norm.weight":
            sd["transformer.ln_f.weight"] = value
        elif key == "lm_head.weight":
            sd["lm_head.weight"] = value
        else:
            _, _, i, rest = key.split(".", 3)  # model.layers.{i}.{module}.weight
            module, _, param = rest.rpartition(".")
            sd[f"transformer.h.{i}.{per_layer[module]}.{param}"] = value
    model.load_state_dict(sd, strict=True)
    return model


PEFT_NAMES = {"query": ["q_proj"], "key": ["k_proj"], "value": ["v_proj"], "projection": ["o_proj"],
              "mlp": ["gate_proj", "up_proj", "down_proj"], "head": ["lm_head"]}
HF_TO_LIT = {"q_proj": "attn.query", "k_proj": "attn.key", "v_proj": "attn.value", "o_proj": "attn.proj",
             "gate_proj": "mlp.fc_1", "up_proj": "mlp.fc_2", "down_proj": "mlp.proj"}


def peft_key_to_lit(key: str) -> str:
    """base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight -> transformer.h.0.attn.query.lora_A"""
    module, lora = key.split(".lora_")
    lora = "lora_" + lora.split(".")[0]
    if module.endswith("lm_head"):
        return f"lm_head.{lora}"
    i = module.split("layers.")[1].split(".")[0]
    return f"transformer.h.{i}.{HF_TO_LIT[module.rsplit('.', 1)[1]]}.{lora}"


@pytest.mark.parametrize(
    "targets", [dict(query=True, value=True), ALL], ids=["query-value", "all-layers"]
)
def test_parity_with_peft(targets: dict) -> None:
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    hf_config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=False,
    )
    hf = transformers.LlamaForCausalLM(hf_config)
    with torch.no_grad():  # HF's std 0.02 gives near-zero logits that hide errors
        for name, p in hf.named_parameters():
            p.normal_(0.0, 0.2) if "norm" not in name else p.uniform_(0.5, 1.5)
    ours = hf_llama_to_gpt(hf)
    lora = LoRAConfig(r=4, alpha=12.0, dropout=0.0, **{**dict.fromkeys(ALL, False), **targets})
    apply_lora(ours, lora)
    target_modules = [n for t, on in lora.targets.items() if on for n in PEFT_NAMES[t]]
    peft_config = peft.LoraConfig(r=4, lora_alpha=12.0, lora_dropout=0.0, target_modules=target_modules)
    theirs = peft.get_peft_model(hf, peft_config)

    # The same non-zero A and B in both.
    ours_params = dict(ours.named_parameters())
    peft_lora = {k: p for k, p in theirs.named_parameters() if "lora_" in k}
    assert len(peft_lora) == len(adapter_state_dict(ours))
    with torch.no_grad():
        for key, p in peft_lora.items():
            p.normal_(0.0, 0.2)
            ours_params[peft_key_to_lit(key)].copy_(p)
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == {peft_key_to_lit(k) for k in peft_lora}

    idx = torch.randint(0, 64, (2, 10))
    targets_idx = torch.randint(0, 64, (2, 10))
    logits_ours = ours(idx)
    logits_peft = theirs(input_ids=idx).logits
    assert logits_ours.abs().max() > 1.0  # not a degenerate comparison
    torch.testing.assert_close(logits_ours, logits_peft, atol=1e-4, rtol=1e-4)

    loss = nn.functional.cross_entropy(logits_ours.flatten(0, 1), targets_idx.flatten())
    loss_peft = nn.functional.cross_entropy(logits_peft.flatten(0, 1), targets_idx.flatten())
    loss.backward()
    loss_peft.backward()
    for key, p in peft_lora.items():
        ours_grad = ours_params[peft_key_to_lit(key)].grad
        assert ours_grad is not None and ours_grad.abs().sum() > 0
        torch.testing.assert_close(ours_grad, p.grad, atol=1e-5, rtol=1e-4, msg=f"gradient of {key}")
    assert math.isclose(loss.item(), loss_peft.item(), rel_tol=1e-5)
