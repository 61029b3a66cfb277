"""Model configuration: one plain dataclass and named presets (each with its source).

The Hugging Face `config.json` mapping, both ways, lives in `lit_model.hf.families`; this module only lists the
model types it covers, so that `Config` can validate `hf_model_type` without importing it (the arrows point down).
"""

from __future__ import annotations

import difflib
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal, Optional


NormName = Literal["LayerNorm", "RMSNorm"]
MLPName = Literal["GptNeoxMLP", "LLaMAMLP", "GemmaMLP"]

# The Hugging Face model types lit_model.hf.families maps (it checks on import that this lists exactly its families).
SUPPORTED_HF_MODEL_TYPES = ("llama", "mistral", "qwen2", "gpt_neox", "gemma", "phi3")


@dataclass
class Config:
    """Architecture of a decoder-only transformer. Field names mirror Lit-GPT's; derived fields fill in when None.

    `hf_repo` names the Hugging Face repository the preset was read from (empty for custom configs).
    """

    name: str = ""
    hf_repo: str = ""
    # The Hugging Face architecture this config converts to and from (one of SUPPORTED_HF_MODEL_TYPES).
    hf_model_type: str = "llama"
    block_size: int = 4096  # the longest sequence the model supports (RoPE cache, KV cache bound)
    vocab_size: int = 50304  # rows of the embedding matrix (may exceed the tokenizer's vocabulary)
    n_layer: int = 16
    n_head: int = 32
    n_embd: int = 4096
    head_size: Optional[int] = None  # default n_embd // n_head; Gemma's differs
    n_query_groups: Optional[int] = None  # key/value heads; n_head = MHA, 1 = MQA, else GQA
    intermediate_size: Optional[int] = None  # default 4 * n_embd
    rotary_percentage: float = 1.0  # fraction of head_size that RoPE rotates (Pythia: 0.25)
    rope_base: float = 10000.0
    # Llama 3.1 frequency scaling: {"factor", "low_freq_factor", "high_freq_factor", "original_max_seq_len"}
    rope_adjustments: Optional[dict[str, float]] = None
    parallel_residual: bool = False  # x + attn(norm_1(x)) + mlp(norm_2(x)) (GPT-NeoX)
    bias: bool = False  # bias on every linear layer (GPT-NeoX)
    attn_bias: bool = False  # bias on the query/key/value projections only (Qwen2)
    norm_class_name: NormName = "RMSNorm"
    norm_eps: float = 1e-5
    norm_unit_offset: bool = False  # Gemma's RMSNorm scales by (1 + weight)
    mlp_class_name: MLPName = "LLaMAMLP"
    gelu_approximate: Literal["none", "tanh"] = "none"
    scale_embeddings: bool = False  # Gemma multiplies embeddings by sqrt(n_embd)
    tie_embeddings: bool = False  # the LM head shares the embedding matrix
    sliding_window: Optional[int] = None  # each query attends to at most this many most recent keys (Mistral v0.1)

    def __post_init__(self) -> None:
        if self.head_size is None:
            if self.n_head <= 0 or self.n_embd % self.n_head:
                raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}), or set head_size")
            self.head_size = self.n_embd // self.n_head
        if self.n_query_groups is None:
            self.n_query_groups = self.n_head
        if self.intermediate_size is None:
            self.intermediate_size = 4 * self.n_embd
        problems = []
        if self.hf_model_type not in SUPPORTED_HF_MODEL_TYPES:
            problems.append(f"hf_model_type must be one of {SUPPORTED_HF_MODEL_TYPES}, got {self.hf_model_type!r}")
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd", "head_size", "intermediate_size"):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be positive, got {getattr(self, name)}")
        if self.n_query_groups <= 0 or self.n_head % self.n_query_groups:
            problems.append(f"n_head ({self.n_head}) must be a multiple of n_query_groups ({self.n_query_groups})")
        if not 0.0 < self.rotary_percentage <= 1.0:
            problems.append(f"rotary_percentage must be in (0, 1], got {self.rotary_percentage}")
        elif 2 * math.ceil(self.rope_n_elem / 2) > self.head_size:
            problems.append(f"the rotated channels ({2 * math.ceil(self.rope_n_elem / 2)}) exceed head_size "
                            f"{self.head_size}")
        if self.norm_class_name not in ("LayerNorm", "RMSNorm"):
            problems.append(f"norm_class_name must be 'LayerNorm' or 'RMSNorm', got {self.norm_class_name!r}")
        if self.mlp_class_name not in ("GptNeoxMLP", "LLaMAMLP", "GemmaMLP"):
            problems.append(f"mlp_class_name must be GptNeoxMLP, LLaMAMLP or GemmaMLP, got {self.mlp_class_name!r}")
        if self.sliding_window is not None and self.sliding_window <= 0:
            problems.append(f"sliding_window must be positive or None, got {self.sliding_window}")
        if self.rope_adjustments is not None:
            missing = {"factor", "low_freq_factor", "high_freq_factor", "original_max_seq_len"} - set(self.rope_adjustments)
            if missing:
                problems.append(f"rope_adjustments lacks {sorted(missing)}")
        if problems:
            raise ValueError(f"Invalid Config {self.name!r}: " + "; ".join(problems))

    @property
    def rope_n_elem(self) -> int:
        """RoPE's dimension: int(rotary_percentage * head_size), the denominator of its frequencies base^(-2i/n).

        It rotates 2 * ceil(n / 2) channels (n itself when even), as transformers does for an odd n (GPT-NeoX with
        rotary_pct 0.25 of head size 4 rotates 2 channels)."""
        return int(self.rotary_percentage * self.head_size)

    @property
    def q_per_kv(self) -> int:
        return self.n_head // self.n_query_groups

    # ---- construction --------------------------------------------------------------------------------------------

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> "Config":
        """A preset by its exact name (the Hugging Face repository name, e.g. "Llama-2-7b-hf"), with overrides."""
        if name not in PRESETS:
            close = difflib.get_close_matches(name, list(PRESETS), n=5, cutoff=0.4)
            hint = f" Did you mean: {', '.join(close)}?" if close else ""
            raise ValueError(
                f"Unknown model preset {name!r}.{hint} Valid presets: {', '.join(sorted(PRESETS))}. "
                "For a checkpoint with no preset, convert it from its config.json (lit_model.hf.config_from_hf)."
            )
        kwargs = dict(PRESETS[name])
        kwargs.update(overrides)
        return cls(**kwargs)

    @classmethod
    def from_file(cls, path: str | Path) -> "Config":
        """Read a `model_config.yaml` written by `save`."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"No model config at {str(path)!r}. A checkpoint directory needs model_config.yaml.")
        import yaml  # a script-side dependency: `import lit_model` needs torch only

        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as err:
            raise ValueError(
                f"{path} is not valid YAML ({' '.join(str(err).split())}). Fix it, or re-convert the checkpoint to "
                "write it again."
            ) from err
        if not isinstance(data, dict):
            raise ValueError(
                f"{path} must be a YAML mapping of Config fields (name: value), got a {type(data).__name__}."
            )
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known, key=str)
        if unknown:
            raise ValueError(f"{path} has unknown Config fields {unknown}; valid fields: {sorted(known)}")
        problems = [p for name, value in data.items() if (p := _field_type_problem(name, value)) is not None]
        if problems:
            raise ValueError(f"{path}: " + "; ".join(problems) + ". Fix the values (or re-convert the checkpoint).")
        return cls(**{name: _coerce(name, value) for name, value in data.items()})

    @classmethod
    def from_checkpoint(cls, checkpoint_dir: str | Path, **overrides: Any) -> "Config":
        """The config stored in a checkpoint directory, with overrides."""
        config = cls.from_file(Path(checkpoint_dir) / "model_config.yaml")
        if overrides:
            config = cls(**{**asdict(config), **overrides})
        return config

    def save(self, path: str | Path) -> None:
        """Write the config as YAML (the `model_config.yaml` of a checkpoint directory)."""
        import yaml

        Path(path).write_text(yaml.safe_dump(asdict(self), sort_keys=False))


# ---- presets: name -> Config fields. The link is where each number was read from. -------------------------------

PRESETS: dict[str, dict[str, Any]] = {}


def _add(hf_repo: str, **kwargs: Any) -> None:
    name = hf_repo.split("/")[-1]
    PRESETS[name] = dict(name=name, hf_repo=hf_repo, **kwargs)


# Llama 2: https://huggingface.co/meta-llama/Llama-2-7b-hf/blob/main/config.json (and 13b, 70b)
_llama2 = dict(hf_model_type="llama", vocab_size=32000, block_size=4096, rope_base=10000.0, norm_eps=1e-5)
for _suffix in ("hf", "chat-hf"):
    _add(f"meta-llama/Llama-2-7b-{_suffix}", n_layer=32, n_head=32, n_embd=4096, intermediate_size=11008, **_llama2)
    _add(f"meta-llama/Llama-2-13b-{_suffix}", n_layer=40, n_head=40, n_embd=5120, intermediate_size=13824, **_llama2)
    _add(f"meta-llama/Llama-2-70b-{_suffix}", n_layer=80, n_head=64, n_embd=8192, n_query_groups=8,
         intermediate_size=28672, **_llama2)

# Llama 3 / 3.1: https://huggingface.co/meta-llama/Meta-Llama-3-8B/blob/main/config.json,
# https://huggingface.co/meta-llama/Llama-3.1-8B/blob/main/config.json (rope_scaling "llama3")
_llama3 = dict(hf_model_type="llama", vocab_size=128256, rope_base=500000.0, norm_eps=1e-5, n_query_groups=8)
_llama31_rope = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_seq_len=8192)
_llama32_rope = dict(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_seq_len=8192)
for _suffix in ("", "-Instruct"):
    _add(f"meta-llama/Meta-Llama-3-8B{_suffix}", n_layer=32, n_head=32, n_embd=4096, intermediate_size=14336,
         block_size=8192, **_llama3)
    _add(f"meta-llama/Meta-Llama-3-70B{_suffix}", n_layer=80, n_head=64, n_embd=8192, intermediate_size=28672,
         block_size=8192, **_llama3)
    _add(f"meta-llama/Llama-3.1-8B{_suffix}", n_layer=32, n_head=32, n_embd=4096, intermediate_size=14336,
         block_size=131072, rope_adjustments=_llama31_rope, **_llama3)
    _add(f"meta-llama/Llama-3.1-70B{_suffix}", n_layer=80, n_head=64, n_embd=8192, intermediate_size=28672,
         block_size=131072, rope_adjustments=_llama31_rope, **_llama3)
    # Llama 3.2: https://huggingface.co/meta-llama/Llama-3.2-1B/blob/main/config.json (tied embeddings)
    _add(f"meta-llama/Llama-3.2-1B{_suffix}", n_layer=16, n_head=32, n_embd=2048, head_size=64,
         intermediate_size=8192, block_size=131072, tie_embeddings=True, rope_adjustments=_llama32_rope, **_llama3)
    _add(f"meta-llama/Llama-3.2-3B{_suffix}", n_layer=28, n_head=24, n_embd=3072, head_size=128,
         intermediate_size=8192, block_size=131072, tie_embeddings=True, rope_adjustments=_llama32_rope, **_llama3)

# TinyLlama: https://huggingface.co/TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T/blob/main/config.json
for _repo in ("TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T", "TinyLlama/TinyLlama-1.1B-Chat-v1.0"):
    _add(_repo, hf_model_type="llama", n_layer=22, n_head=32, n_embd=2048, n_query_groups=4, intermediate_size=5632, vocab_size=32000,
         block_size=2048, norm_eps=1e-5)

# Mistral: https://huggingface.co/mistralai/Mistral-7B-v0.1/blob/main/config.json (sliding window 4096),
# https://huggingface.co/mistralai/Mistral-7B-v0.3/blob/main/config.json (vocab 32768, rope 1e6, no window)
_mistral = dict(hf_model_type="mistral", n_layer=32, n_head=32, n_embd=4096, n_query_groups=8, intermediate_size=14336, block_size=32768,
                norm_eps=1e-5)
for _repo in ("mistralai/Mistral-7B-v0.1", "mistralai/Mistral-7B-Instruct-v0.1"):
    _add(_repo, vocab_size=32000, rope_base=10000.0, sliding_window=4096, **_mistral)
_add("mistralai/Mistral-7B-Instruct-v0.2", vocab_size=32000, rope_base=1000000.0, **_mistral)
for _repo in ("mistralai/Mistral-7B-v0.3", "mistralai/Mistral-7B-Instruct-v0.3"):
    _add(_repo, vocab_size=32768, rope_base=1000000.0, **_mistral)

# Qwen2.5: https://huggingface.co/Qwen/Qwen2.5-0.5B/blob/main/config.json (and 1.5B, 3B, 7B; QKV bias)
_qwen = dict(hf_model_type="qwen2", attn_bias=True, rope_base=1000000.0, norm_eps=1e-6, block_size=32768)
for _suffix in ("", "-Instruct"):
    _add(f"Qwen/Qwen2.5-0.5B{_suffix}", n_layer=24, n_head=14, n_embd=896, n_query_groups=2, intermediate_size=4864,
         vocab_size=151936, tie_embeddings=True, **_qwen)
    _add(f"Qwen/Qwen2.5-1.5B{_suffix}", n_layer=28, n_head=12, n_embd=1536, n_query_groups=2,
         intermediate_size=8960, vocab_size=151936, tie_embeddings=True, **_qwen)
    _add(f"Qwen/Qwen2.5-3B{_suffix}", n_layer=36, n_head=16, n_embd=2048, n_query_groups=2, intermediate_size=11008,
         vocab_size=151936, tie_embeddings=True, **_qwen)
    _add(f"Qwen/Qwen2.5-7B{_suffix}", n_layer=28, n_head=28, n_embd=3584, n_query_groups=4, intermediate_size=18944,
         vocab_size=152064, **_qwen)

# Pythia: https://huggingface.co/EleutherAI/pythia-14m/blob/main/config.json (and the others of the suite)
_pythia = dict(hf_model_type="gpt_neox", block_size=2048, rotary_percentage=0.25, parallel_residual=True, bias=True, norm_class_name="LayerNorm",
               norm_eps=1e-5, mlp_class_name="GptNeoxMLP")
for _size, (_layers, _embd, _heads, _vocab) in {
    "14m": (6, 128, 4, 50304), "31m": (6, 256, 8, 50304), "70m": (6, 512, 8, 50304), "160m": (12, 768, 12, 50304),
    "410m": (24, 1024, 16, 50304), "1b": (16, 2048, 8, 50304), "1.4b": (24, 2048, 16, 50304),
    "2.8b": (32, 2560, 32, 50304), "6.9b": (32, 4096, 32, 50432), "12b": (36, 5120, 40, 50688),
}.items():
    _add(f"EleutherAI/pythia-{_size}", n_layer=_layers, n_embd=_embd, n_head=_heads, vocab_size=_vocab, **_pythia)

# Gemma: https://huggingface.co/google/gemma-2b/blob/main/config.json (MQA, head_dim 256, GeGLU tanh, tied)
_gemma = dict(hf_model_type="gemma", vocab_size=256000, block_size=8192, head_size=256, norm_eps=1e-6, norm_unit_offset=True,
              scale_embeddings=True, tie_embeddings=True, mlp_class_name="GemmaMLP", gelu_approximate="tanh")
for _suffix in ("", "-it"):
    _add(f"google/gemma-2b{_suffix}", n_layer=18, n_head=8, n_embd=2048, n_query_groups=1, intermediate_size=16384,
         **_gemma)
    _add(f"google/gemma-7b{_suffix}", n_layer=28, n_head=16, n_embd=3072, n_query_groups=16,
         intermediate_size=24576, **_gemma)

# Phi-3: https://huggingface.co/microsoft/Phi-3-mini-4k-instruct/blob/main/config.json (fused qkv/gate_up in HF)
_add("microsoft/Phi-3-mini-4k-instruct", hf_model_type="phi3", n_layer=32, n_head=32, n_embd=3072, intermediate_size=8192, vocab_size=32064,
     block_size=4096, norm_eps=1e-5, sliding_window=2047)

del _suffix, _repo, _size, _layers, _embd, _heads, _vocab



# ---- checking values read from a file -------------------------------------------------------------------------------

_NUMBER = (int, float)


def _expected_kind(name: str) -> tuple[str, Any]:
    """(what to call it, check) for a Config field, from its annotation; check(value) says whether it fits."""
    import typing

    hint = typing.get_type_hints(Config)[name]
    optional = type(None) in typing.get_args(hint)
    base = next((a for a in typing.get_args(hint) if a is not type(None)), hint) if optional else hint
    if typing.get_origin(base) is Literal:
        options = typing.get_args(base)
        kind, check = f"one of {', '.join(map(repr, options))}", lambda v: v in options
    elif base is bool:
        kind, check = "true or false", lambda v: isinstance(v, bool)
    elif base is int:
        kind, check = "an integer", lambda v: isinstance(v, int) and not isinstance(v, bool)
    elif base is float:
        kind, check = "a number", lambda v: _is_number(v)
    elif base is str:
        kind, check = "a string", lambda v: isinstance(v, str)
    elif typing.get_origin(base) is dict:
        kind, check = "a mapping", lambda v: isinstance(v, dict)
    else:
        kind, check = str(base), lambda v: True
    if optional:
        return f"{kind} or null", lambda v: v is None or check(v)
    return kind, check


def _is_number(value: Any) -> bool:
    """An int or float, or a string that spells one: PyYAML reads `1e-5` (no dot) as the string "1e-5"."""
    if isinstance(value, bool):
        return False
    if isinstance(value, _NUMBER):
        return True
    if isinstance(value, str):
        try:
            float(value)
        except ValueError:
            return False
        return True
    return False


def _field_type_problem(name: str, value: Any) -> Optional[str]:
    kind, check = _expected_kind(name)
    if check(value):
        return None
    return f"{name} must be {kind}, got {value!r} ({type(value).__name__})"


def _coerce(name: str, value: Any) -> Any:
    """A checked value as its field's type: numbers for float fields (ints and YAML's "1e-5" strings)."""
    kind, _ = _expected_kind(name)
    if kind.startswith("a number") and value is not None:
        return float(value)
    return value
