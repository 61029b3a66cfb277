"""Config: presets, validation, YAML round trip and the HF config.json mapping's errors."""

from dataclasses import asdict

import pytest
import torch

from lit_model.config import PRESETS, SUPPORTED_HF_MODEL_TYPES, Config
from lit_model.hf.families import config_from_hf

REQUIRED_FAMILIES = [
    "Llama-2-7b-hf", "Llama-2-13b-hf", "Llama-2-70b-hf", "Llama-2-7b-chat-hf", "Meta-Llama-3-8B", "Meta-Llama-3-70B",
    "Llama-3.1-8B", "Llama-3.1-70B", "Llama-3.2-1B", "Llama-3.2-3B", "TinyLlama-1.1B-intermediate-step-1431k-3T",
    "Mistral-7B-v0.1", "Mistral-7B-v0.3", "Mistral-7B-Instruct-v0.3", "Qwen2.5-0.5B", "Qwen2.5-1.5B", "Qwen2.5-3B",
    "Qwen2.5-7B", "Qwen2.5-7B-Instruct", "pythia-14m", "pythia-12b", "gemma-2b", "gemma-7b", "Phi-3-mini-4k-instruct",
]


@pytest.mark.parametrize("name", REQUIRED_FAMILIES)
def test_required_presets_exist(name: str) -> None:
    config = Config.from_name(name)
    assert config.name == name
    assert config.hf_repo.endswith("/" + name)
    assert config.hf_model_type in SUPPORTED_HF_MODEL_TYPES


def parameter_count(c: Config) -> int:
    hs = c.head_size
    attn = c.n_embd * hs * (c.n_head + 2 * c.n_query_groups) + c.n_head * hs * c.n_embd
    mlp = (2 if c.mlp_class_name == "GptNeoxMLP" else 3) * c.n_embd * c.intermediate_size
    head = 0 if c.tie_embeddings else c.vocab_size * c.n_embd
    return c.n_layer * (attn + mlp) + c.vocab_size * c.n_embd + head


@pytest.mark.parametrize(
    "name, billions",
    [("Llama-2-7b-hf", 6.74), ("Llama-2-70b-hf", 68.98), ("Meta-Llama-3-8B", 8.03), ("Llama-3.2-1B", 1.24),
     ("Mistral-7B-v0.1", 7.24), ("Qwen2.5-0.5B", 0.494), ("Qwen2.5-7B", 7.62), ("pythia-1b", 1.01),
     ("gemma-2b", 2.51), ("gemma-7b", 8.54), ("Phi-3-mini-4k-instruct", 3.82), ("TinyLlama-1.1B-Chat-v1.0", 1.10)],
)
def test_presets_have_the_published_sizes(name: str, billions: float) -> None:
    # Biases and norms are ignored: the matrices alone must land within 1.5% of the published size.
    assert parameter_count(Config.from_name(name)) / 1e9 == pytest.approx(billions, rel=0.015)


def test_unknown_preset_lists_close_names() -> None:
    with pytest.raises(ValueError, match=r"Unknown model preset 'llama-2-7b'.*Did you mean: Llama-2-7b-hf"):
        Config.from_name("llama-2-7b")


def test_overrides_and_derived_fields() -> None:
    config = Config.from_name("Llama-2-7b-hf", n_layer=2)
    assert config.n_layer == 2 and config.head_size == 128 and config.n_query_groups == 32
    assert Config.from_name("pythia-14m").rope_n_elem == 8  # 25% of head_size 32


def test_validation_lists_every_problem() -> None:
    with pytest.raises(ValueError, match=r"n_head \(6\) must be a multiple of n_query_groups \(4\).*rotary_percentage"):
        Config(n_embd=60, n_head=6, n_query_groups=4, rotary_percentage=1.5)
    with pytest.raises(ValueError, match="hf_model_type must be one of"):
        Config(hf_model_type="bert")


def test_yaml_round_trip(tmp_path) -> None:
    config = Config.from_name("Llama-3.1-8B")
    config.save(tmp_path / "model_config.yaml")
    assert asdict(Config.from_checkpoint(tmp_path)) == asdict(config)
    (tmp_path / "bad.yaml").write_text("n_layer: 2\nnum_layers: 3\n")
    with pytest.raises(ValueError, match=r"unknown Config fields \['num_layers'\]"):
        Config.from_file(tmp_path / "bad.yaml")
    with pytest.raises(FileNotFoundError, match="needs model_config.yaml"):
        Config.from_checkpoint(tmp_path / "missing")


def test_from_hf_config_rejects_unsupported_architectures() -> None:
    with pytest.raises(ValueError, match="Unsupported model_type 'bert'.*Supported: llama, mistral, qwen2"):
        config_from_hf({"model_type": "bert"})
    base = dict(model_type="llama", vocab_size=10, num_hidden_layers=1, num_attention_heads=2, hidden_size=8,
                intermediate_size=16)
    with pytest.raises(ValueError, match="RoPE scaling 'yarn' is not supported"):
        config_from_hf({**base, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})


def test_every_preset_is_valid() -> None:
    assert len(PRESETS) >= 45
    for name in PRESETS:
        Config.from_name(name)


def test_odd_rotary_width_is_accepted_as_transformers_runs_it() -> None:
    # GPT-NeoX with rotary_pct 0.25 of head size 4: RoPE's dimension is 1, and 2 channels are rotated.
    config = Config(n_embd=16, n_head=4, rotary_percentage=0.25, norm_class_name="LayerNorm", hf_model_type="gpt_neox")
    assert config.rope_n_elem == 1
    from lit_model.model import rope_cos_sin

    cos, _ = rope_cos_sin(torch.arange(3), config)
    assert cos.shape == (3, 2)
