"""Hugging Face model families: one record per `model_type`, holding its mapping in both directions.

A `Family` says how transformers names the model's weights (`HFLayout`), which class builds it (`architecture`, the
`architectures` entry of config.json), and how its config.json maps to our Config (`config_in`) and back
(`config_out`). What every family shares (sizes, heads, RoPE base and Llama 3.1 RoPE scaling, tied embeddings) is
mapped once, in `config_from_hf` and `hf_config_dict`; a family holds only what differs. `hf_config_dict` checks its
result by mapping it back and comparing every field, so an export never writes a config.json that describes another
model.

To add a family: write its `Family` in FAMILIES below (reusing a layout and the RMSNorm helpers where they fit) and
add its model_type to `lit_model.config.SUPPORTED_HF_MODEL_TYPES`, the list `Config` validates `hf_model_type`
against (config.py cannot import this package: the arrows point from here to it). Importing this module checks that
the two lists agree.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Literal, Mapping, Optional

import torch

from lit_model.config import SUPPORTED_HF_MODEL_TYPES, Config

# ---- weight layouts -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HFLayout:
    """How one Hugging Face architecture names its weights, as module names (the leaf carries through)."""

    top: Mapping[str, str]  # HF module -> ours, outside the blocks
    layers: str  # HF prefix of the block list; block i's modules are f"{layers}.{i}.{module}"
    layer: Mapping[str, str]  # HF module inside a block -> ours
    # HF module inside a block -> ours that it packs, in row order
    fused: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    # GPT-NeoX packs q, k, v per head: rows (n_head, 3, head_size). Phi-3 simply stacks [q; k; v] and [gate; up].
    per_head_qkv: bool = False
    ignored: tuple[str, ...] = ()  # suffixes of HF tensors that are buffers, not weights
    # HF module in the files -> in memory, where transformers >= 5 renames it on load; PEFT adapters name modules
    # as they are in memory.
    in_memory: Mapping[str, str] = field(default_factory=dict)


_LLAMA_TOP = {"model.embed_tokens": "transformer.wte", "model.norm": "transformer.ln_f", "lm_head": "lm_head"}
_LLAMA_BLOCK = {
    "input_layernorm": "norm_1",
    "self_attn.q_proj": "attn.query",
    "self_attn.k_proj": "attn.key",
    "self_attn.v_proj": "attn.value",
    "self_attn.o_proj": "attn.proj",
    "post_attention_layernorm": "norm_2",
    "mlp.gate_proj": "mlp.fc_1",
    "mlp.up_proj": "mlp.fc_2",
    "mlp.down_proj": "mlp.proj",
}
# Llama, Mistral, Qwen2 and Gemma name their weights alike.
LLAMA_LAYOUT = HFLayout(_LLAMA_TOP, "model.layers", _LLAMA_BLOCK, ignored=("rotary_emb.inv_freq",))
PHI3_LAYOUT = HFLayout(
    _LLAMA_TOP,
    "model.layers",
    {
        "input_layernorm": "norm_1",
        "self_attn.o_proj": "attn.proj",
        "post_attention_layernorm": "norm_2",
        "mlp.down_proj": "mlp.proj",
    },
    fused={
        "self_attn.qkv_proj": ("attn.query", "attn.key", "attn.value"),
        "mlp.gate_up_proj": ("mlp.fc_1", "mlp.fc_2"),
    },
    ignored=("rotary_emb.inv_freq",),
)
GPT_NEOX_LAYOUT = HFLayout(
    {"gpt_neox.embed_in": "transformer.wte", "gpt_neox.final_layer_norm": "transformer.ln_f", "embed_out": "lm_head"},
    "gpt_neox.layers",
    {
        "input_layernorm": "norm_1",
        "attention.dense": "attn.proj",
        "post_attention_layernorm": "norm_2",
        "mlp.dense_h_to_4h": "mlp.fc",
        "mlp.dense_4h_to_h": "mlp.proj",
    },
    fused={"attention.query_key_value": ("attn.query", "attn.key", "attn.value")},
    per_head_qkv=True,
    # Older checkpoints (e.g. the Pythia .bin files) store the causal mask and RoPE frequencies as buffers.
    ignored=("attention.bias", "attention.masked_bias", "rotary_emb.inv_freq"),
    in_memory={"embed_out": "lm_head"},
)


# ---- the family record ----------------------------------------------------------------------------------------------

ConfigJSON = dict[str, Any]  # a config.json, as a dict


def _plain_window(hf: ConfigJSON) -> Optional[int]:
    return hf.get("sliding_window")


@dataclass(frozen=True)
class Family:
    """One Hugging Face `model_type`: its weight names, its class and its config.json mapping both ways."""

    model_type: str
    architecture: str  # the transformers class, e.g. "LlamaForCausalLM"
    layout: HFLayout
    # (config.json, its rope_parameters) -> the Config fields this family reads its own way
    config_in: Callable[[ConfigJSON, ConfigJSON], dict[str, Any]]
    # Config -> the config.json keys this family writes its own way (after the shared ones)
    config_out: Callable[[Config], ConfigJSON]
    # the window config.json asks for (None or 0: none); Qwen2 windows only some layers
    window_in: Callable[[ConfigJSON], Optional[int]] = _plain_window
    tied_by_default: bool = False  # the LM head is the embedding when config.json omits tie_word_embeddings


# ---- what the families map their own way ----------------------------------------------------------------------------


def _gelu_approximate(act: str) -> Literal["none", "tanh"]:
    if act in ("gelu", "gelu_python"):
        return "none"
    if act in ("gelu_new", "gelu_fast", "gelu_pytorch_tanh"):
        return "tanh"
    raise ValueError(f"Activation {act!r} is not supported for GELU MLPs")


def _gelu_name(config: Config) -> str:
    return "gelu" if config.gelu_approximate == "none" else "gelu_pytorch_tanh"


def _activation(hf: ConfigJSON) -> str:
    return hf.get("hidden_activation") or hf.get("hidden_act", "silu")


def _require_silu(hf: ConfigJSON) -> None:
    act = _activation(hf)
    if act != "silu":
        raise ValueError(f"{hf.get('model_type')} with hidden_act {act!r} is not supported (expected 'silu')")


# RMSNorm families (all but GPT-NeoX) read and write their norm, heads and partial rotation alike.


def _rms_in(hf: ConfigJSON, rope: ConfigJSON) -> dict[str, Any]:
    partial = hf.get("partial_rotary_factor", rope.get("partial_rotary_factor", 1.0))
    return dict(norm_eps=hf.get("rms_norm_eps", 1e-6), mlp_class_name="LLaMAMLP", rotary_percentage=float(partial))


def _rms_out(config: Config, hidden_act: str = "silu") -> ConfigJSON:
    return dict(num_key_value_heads=config.n_query_groups, head_dim=config.head_size, rms_norm_eps=config.norm_eps,
                hidden_act=hidden_act)


def _llama_in(hf: ConfigJSON, rope: ConfigJSON) -> dict[str, Any]:
    _require_silu(hf)
    return {**_rms_in(hf, rope), "attn_bias": bool(hf.get("attention_bias", False))}


def _llama_out(config: Config) -> ConfigJSON:
    return {**_rms_out(config), "attention_bias": config.attn_bias, "mlp_bias": False}


def _mistral_out(config: Config) -> ConfigJSON:
    return {**_llama_out(config), "sliding_window": config.sliding_window}


def _qwen2_in(hf: ConfigJSON, rope: ConfigJSON) -> dict[str, Any]:
    _require_silu(hf)
    return {**_rms_in(hf, rope), "attn_bias": True}


def _qwen2_window(hf: ConfigJSON) -> Optional[int]:
    # Qwen2 windows only the layers from max_window_layers on (or those layer_types names "sliding_attention").
    n_layer = hf["num_hidden_layers"]
    layer_types = hf.get("layer_types") or [
        "sliding_attention" if i >= hf.get("max_window_layers", 28) else "full_attention" for i in range(n_layer)
    ]
    windowed = [t == "sliding_attention" for t in layer_types]
    if not hf.get("use_sliding_window", False) or not any(windowed):
        return None
    if not all(windowed):
        raise ValueError(
            f"Qwen2 with a sliding window on {sum(windowed)} of {n_layer} layers is not supported (Config "
            "applies one window to every layer); set use_sliding_window false or max_window_layers 0"
        )
    return hf.get("sliding_window")


def _qwen2_out(config: Config) -> ConfigJSON:
    # Qwen2 windows the layers from max_window_layers on: 0 windows them all, as our config does.
    windowed = config.sliding_window is not None
    return {**_rms_out(config), "use_sliding_window": windowed, "sliding_window": config.sliding_window,
            "max_window_layers": 0 if windowed else config.n_layer}


def _phi3_in(hf: ConfigJSON, rope: ConfigJSON) -> dict[str, Any]:
    _require_silu(hf)
    return _rms_in(hf, rope)


def _phi3_out(config: Config) -> ConfigJSON:
    hf = _rms_out(config)
    if config.rotary_percentage != 1.0:
        hf["partial_rotary_factor"] = config.rotary_percentage
    hf["sliding_window"] = config.sliding_window
    return hf


def _gemma_in(hf: ConfigJSON, rope: ConfigJSON) -> dict[str, Any]:
    act = _activation(hf)
    if act == "gelu":  # transformers reads the official configs' legacy "gelu" as the tanh approximation
        act = "gelu_pytorch_tanh"
    gelu = _gelu_approximate(act)
    return {**_rms_in(hf, rope), "mlp_class_name": "GemmaMLP", "norm_unit_offset": True, "scale_embeddings": True,
            "gelu_approximate": gelu}


def _gemma_out(config: Config) -> ConfigJSON:
    return _rms_out(config, hidden_act=_gelu_name(config))


def _gpt_neox_in(hf: ConfigJSON, rope: ConfigJSON) -> dict[str, Any]:
    return dict(
        norm_class_name="LayerNorm",
        norm_eps=hf.get("layer_norm_eps", 1e-5),
        mlp_class_name="GptNeoxMLP",
        bias=True,
        parallel_residual=hf.get("use_parallel_residual", True),
        rotary_percentage=rope.get("partial_rotary_factor", hf.get("rotary_pct", 1.0)),
        gelu_approximate=_gelu_approximate(hf.get("hidden_act", "gelu")),
    )


def _gpt_neox_out(config: Config) -> ConfigJSON:
    return dict(
        rotary_pct=config.rotary_percentage,
        rotary_emb_base=config.rope_base,
        layer_norm_eps=config.norm_eps,
        use_parallel_residual=config.parallel_residual,
        hidden_act=_gelu_name(config),
        attention_bias=True,
    )


# ---- the families ---------------------------------------------------------------------------------------------------

FAMILIES: dict[str, Family] = {
    f.model_type: f
    for f in (
        Family("llama", "LlamaForCausalLM", LLAMA_LAYOUT, _llama_in, _llama_out),
        Family("mistral", "MistralForCausalLM", LLAMA_LAYOUT, _llama_in, _mistral_out),
        Family("qwen2", "Qwen2ForCausalLM", LLAMA_LAYOUT, _qwen2_in, _qwen2_out, window_in=_qwen2_window),
        Family("gpt_neox", "GPTNeoXForCausalLM", GPT_NEOX_LAYOUT, _gpt_neox_in, _gpt_neox_out),
        Family("gemma", "GemmaForCausalLM", LLAMA_LAYOUT, _gemma_in, _gemma_out, tied_by_default=True),
        Family("phi3", "Phi3ForCausalLM", PHI3_LAYOUT, _phi3_in, _phi3_out),
    )
}
assert tuple(FAMILIES) == SUPPORTED_HF_MODEL_TYPES, (
    f"lit_model.config.SUPPORTED_HF_MODEL_TYPES {SUPPORTED_HF_MODEL_TYPES} must list the families {tuple(FAMILIES)}, "
    "in the same order"
)


def family_of(model_type: Any) -> Family:
    """The family of a config.json's `model_type`; raises ValueError naming the supported ones."""
    if model_type not in FAMILIES:
        raise ValueError(f"Unsupported model_type {model_type!r} in config.json. Supported: {', '.join(FAMILIES)}.")
    return FAMILIES[model_type]


def layout_of(config: Config) -> HFLayout:
    """The weight layout of `config.hf_model_type` (validated by Config)."""
    return FAMILIES[config.hf_model_type].layout


# ---- config.json -> Config ------------------------------------------------------------------------------------------


def config_from_hf(hf: ConfigJSON, name: str = "") -> Config:
    """Map a Hugging Face `config.json` (as a dict) of a supported architecture to a Config."""
    family = family_of(hf.get("model_type"))
    # transformers >= 5 nests rope_theta and the scaling inside `rope_parameters`; older files keep them flat.
    rope = dict(hf.get("rope_parameters") or {})
    rope_base = rope.get("rope_theta", hf.get("rope_theta", hf.get("rotary_emb_base", 10000.0)))
    scaling = hf.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
    n_head = hf["num_attention_heads"]
    kw: dict[str, Any] = dict(
        name=name or hf.get("_name_or_path", "").split("/")[-1],
        hf_model_type=family.model_type,
        vocab_size=hf["vocab_size"],
        n_layer=hf["num_hidden_layers"],
        n_head=n_head,
        n_embd=hf["hidden_size"],
        n_query_groups=hf.get("num_key_value_heads") or n_head,
        intermediate_size=hf["intermediate_size"],
        block_size=hf.get("max_position_embeddings", 4096),
        rope_base=float(rope_base),
        tie_embeddings=bool(hf.get("tie_word_embeddings", family.tied_by_default)),
    )
    if hf.get("head_dim"):
        kw["head_size"] = hf["head_dim"]
    kw.update(family.config_in(hf, rope))
    window = family.window_in(hf)
    if window and window < kw["block_size"]:
        kw["sliding_window"] = int(window)
    if scaling:
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind == "llama3":
            kw["rope_adjustments"] = {
                "factor": float(scaling["factor"]),
                "low_freq_factor": float(scaling["low_freq_factor"]),
                "high_freq_factor": float(scaling["high_freq_factor"]),
                "original_max_seq_len": int(scaling["original_max_position_embeddings"]),
            }
        elif kind not in (None, "default"):
            raise ValueError(f"RoPE scaling {kind!r} is not supported (only 'llama3' frequency scaling is)")
    return Config(**kw)


# ---- Config -> config.json ------------------------------------------------------------------------------------------


def hf_config_dict(config: Config, dtype: torch.dtype = torch.float32) -> ConfigJSON:
    """A Hugging Face `config.json` (as a dict) for `config.hf_model_type` that describes the same model.

    Raises ValueError when the architecture cannot express the config (checked by mapping the result back with
    `config_from_hf` and comparing every field).
    """
    family = FAMILIES[config.hf_model_type]
    hf: ConfigJSON = dict(
        architectures=[family.architecture],
        model_type=family.model_type,
        vocab_size=config.vocab_size,
        hidden_size=config.n_embd,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.n_layer,
        num_attention_heads=config.n_head,
        max_position_embeddings=config.block_size,
        rope_theta=config.rope_base,
        tie_word_embeddings=config.tie_embeddings,
        torch_dtype=str(dtype).removeprefix("torch."),
        initializer_range=0.02,
        use_cache=True,
    )
    hf.update(family.config_out(config))
    if config.rope_adjustments:
        adj = config.rope_adjustments
        hf["rope_scaling"] = {
            "rope_type": "llama3",
            "factor": adj["factor"],
            "low_freq_factor": adj["low_freq_factor"],
            "high_freq_factor": adj["high_freq_factor"],
            "original_max_position_embeddings": int(adj["original_max_seq_len"]),
        }
    _check_round_trip(config, hf)
    return hf


def _check_round_trip(config: Config, hf: ConfigJSON) -> None:
    try:
        back = config_from_hf(hf, name=config.name)
    except ValueError as err:
        raise ValueError(f"Config {config.name!r} cannot be exported as {config.hf_model_type}: {err}") from err

    def fields_of(c: Config) -> dict[str, Any]:
        d = asdict(c)
        d.pop("name"), d.pop("hf_repo")
        if d["sliding_window"] is not None and d["sliding_window"] >= d["block_size"]:
            d["sliding_window"] = None  # a window as long as the context is no window
        return d

    ours, theirs = fields_of(config), fields_of(back)
    diffs = [f"{k} (ours {ours[k]!r}, expressible: {theirs[k]!r})" for k in ours if ours[k] != theirs[k]]
    if diffs:
        raise ValueError(
            f"Config {config.name!r} cannot be expressed as a Hugging Face {config.hf_model_type} model; these fields "
            f"differ: {'; '.join(diffs)}. Set hf_model_type to an architecture that has them."
        )
