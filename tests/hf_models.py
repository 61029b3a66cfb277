"""Tiny random Hugging Face models of every supported architecture, and their conversion to ours.

Reusable by any test that needs a reference model: `make_hf_model("mistral", tmp_path)` builds and saves one,
`convert(directory)` runs the real converter script on it and loads our GPT.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]

_COMMON: dict[str, Any] = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=64,
)
# One entry per variant: its HF model_type and the config overrides that make it exercise what matters.
VARIANTS: dict[str, dict[str, Any]] = {
    "llama": dict(model_type="llama", num_key_value_heads=2),
    # Llama 3.1-style frequency scaling; head_dim 16 puts a wavelength in the smoothed band (8 < 19.9 < 32).
    "llama3": dict(
        model_type="llama",
        hidden_size=64,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        rope_theta=500000.0,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=32),
    ),
    "mistral": dict(model_type="mistral", num_key_value_heads=2, sliding_window=4),
    "qwen2": dict(model_type="qwen2", num_key_value_heads=2),
    # Qwen2 windows the layers from max_window_layers on: 0 windows them all, the one case our Config can express.
    "qwen2_window": dict(
        model_type="qwen2", num_key_value_heads=2, use_sliding_window=True, sliding_window=4, max_window_layers=0
    ),
    # head_size 16: RoPE turns 4 channels at two frequencies (with head_size 8 the one frequency would be 1, any base)
    "gpt_neox": dict(model_type="gpt_neox", hidden_size=64, rotary_pct=0.25, hidden_act="gelu"),
    # An odd rotated width (25% of head_size 12 = 3): transformers rotates 2 * ceil(3 / 2) = 4 channels, at the
    # frequencies base^(-2i/3).
    "gpt_neox_odd_rotary": dict(model_type="gpt_neox", hidden_size=48, rotary_pct=0.25, hidden_act="gelu"),
    "gemma": dict(model_type="gemma", num_key_value_heads=1, head_dim=16),
    "phi3": dict(model_type="phi3", num_key_value_heads=2, sliding_window=5, pad_token_id=0, eos_token_id=1),
}
ARCHITECTURES = tuple(VARIANTS)


def hf_config(variant: str, **overrides: Any) -> Any:
    """The transformers config of a variant (see VARIANTS), with overrides."""
    from transformers import AutoConfig

    kwargs = {**_COMMON, **VARIANTS[variant], **overrides}
    return AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)


def make_hf_model(model_type: str, tmp_path: Path, seed: int = 0, **overrides: Any) -> tuple[Any, Path]:
    """A tiny random transformers model of a variant (a key of VARIANTS), saved with save_pretrained.

    The weights are re-initialised with std 0.2 (norm weights around their identity value), because HF's std-0.02
    init gives near-zero logits that hide mapping errors. Returns the model (float32, eval mode) and its directory.
    `save_kwargs` in overrides is passed to save_pretrained (e.g. max_shard_size="20KB").
    """
    from transformers import AutoModelForCausalLM

    save_kwargs = overrides.pop("save_kwargs", {})
    config = hf_config(model_type, **overrides)
    model = AutoModelForCausalLM.from_config(config).float().eval()
    generator = torch.Generator().manual_seed(seed)
    unit_offset = config.model_type == "gemma"  # Gemma's RMSNorm scales by (1 + weight)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator) * 0.2
            is_norm_weight = param.ndim == 1 and "norm" in name and name.endswith("weight")
            param.copy_(noise + 1.0 if is_norm_weight and not unit_offset else noise)
    directory = Path(tmp_path) / f"hf-{model_type}"
    model.save_pretrained(directory, **save_kwargs)
    return model, directory


def save_as_bin(directory: Path, n_shards: int = 1) -> None:
    """Rewrite the safetensors weights in `directory` as PyTorch .bin files (sharded with an index when n_shards > 1),
    as older Hub repositories have them. transformers 5 no longer writes .bin files itself. The names stay those on
    disk (transformers 5 renames some in memory, e.g. GPT-NeoX's embed_out)."""
    import json

    from safetensors.torch import load_file

    files = sorted(directory.glob("*.safetensors"))
    state = {k: v for f in files for k, v in load_file(f).items()}
    for path in files + list(directory.glob("*.safetensors.index.json")):
        path.unlink()
    if n_shards == 1:
        torch.save(state, directory / "pytorch_model.bin")
        return
    keys, weight_map = list(state), {}
    for i in range(n_shards):
        name = f"pytorch_model-{i + 1:05d}-of-{n_shards:05d}.bin"
        part = {k: state[k] for k in keys[i::n_shards]}
        torch.save(part, directory / name)
        weight_map.update(dict.fromkeys(part, name))
    (directory / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def load_script(name: str) -> ModuleType:
    """Import scripts/<name>.py by path (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"scripts_{name}", REPO_ROOT / "scripts" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def convert(directory: Path, **kwargs: Any) -> Any:
    """Our GPT (float32 unless dtype= is passed, eval mode) converted from an HF directory by the converter script."""
    from lit_model.checkpoint_io import load_model

    load_script("convert_hf_checkpoint").convert_hf_checkpoint(checkpoint_dir=Path(directory), **kwargs)
    return load_model(directory)


def random_tokens(vocab_size: int, lengths: tuple[int, ...] = (1, 7, 13), seed: int = 1) -> list[torch.Tensor]:
    """Token sequences (1, T) of the given lengths."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab_size, (1, t), generator=generator) for t in lengths]
