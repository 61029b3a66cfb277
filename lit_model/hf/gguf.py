"""GGUF files (llama.cpp, Ollama) -> our checkpoint directories: metadata -> Config, tensors -> our state dict.

A GGUF file holds one model: metadata under llama.cpp's key names (`llama.block_count`, `tokenizer.ggml.tokens`, ...)
and tensors under llama.cpp's names (`blk.0.attn_q.weight`), most of them quantized in blocks. We map the metadata to a
Hugging Face-style config dict and reuse `config_from_hf`, map the tensor names to Hugging Face's and reuse
`hf_to_lit`, so a GGUF import is checked by the same code as a Hugging Face import. The facts undone here, as
llama.cpp's `convert_hf_to_gguf.py` does them and transformers' GGUF loader reverses them:

  - tensor shapes are listed innermost first (ggml's `ne`): a (out, in) weight is listed [in, out]. The reader's
    arrays, and `gguf.quants.dequantize`'s output, are already in row-major (torch) order.
  - `llama` files permute the rows of attn_q / attn_k (weights and biases) within each head from Hugging Face's
    half-split RoPE layout to ggml's interleaved one: see `unpermute_rope_rows`. `qwen2` files are not permuted
    (llama.cpp runs Qwen2 with the half-split "NEOX" RoPE).
  - no `output.weight` means the LM head is the embedding matrix (tied embeddings).
  - Llama 3.1-style frequency scaling is stored as a tensor of per-frequency divisors, `rope_freqs.weight`, not as
    metadata; we recover the scaling parameters from it (and check them) in `_rope_scaling`.

Quantized tensors are dequantized by the `gguf` package itself, one at a time; Q8_0, Q4_0, Q4_1, F16 and BF16
dequantize exactly to float32. `import lit_model` needs torch only: `gguf` (and numpy) are imported where used.
The tokenizer files come from `lit_model.hf.gguf_tokenizer`.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

from lit_model.checkpoint_io import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    mismatch_message,
    parse_dtype,
    preview,
    save_state_dict,
    write_dir_atomically,
)
from lit_model.config import PRESETS, Config
from lit_model.hf.convert import UnknownTensorError, hf_to_lit
from lit_model.hf.families import config_from_hf
from lit_model.hf.gguf_tokenizer import gguf_tokenizer_files
from lit_model.model import GPT, rope_inv_freq

# `general.architecture` values we import. Llama 2/3, Mistral, TinyLlama and SmolLM2 are all stored as "llama".
GGUF_ARCHITECTURES = ("llama", "qwen2")
GGUF_MAGIC = b"GGUF"

# llama.cpp tensor (module) names -> Hugging Face Llama/Qwen2 ones; the leaf (weight, bias) carries through.
_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_BLOCK = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
ROPE_FREQS = "rope_freqs.weight"  # read into the config (RoPE frequency scaling), not a weight of the model


@dataclass(frozen=True)
class GGUFFile:
    """An opened GGUF file: its metadata (key -> Python value) and the reader that memory-maps its tensors."""

    path: Path
    metadata: dict[str, Any]
    reader: Any  # gguf.GGUFReader

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))

    def tensors(self) -> dict[str, Any]:
        """The tensors by name (gguf.ReaderTensor: name, tensor_type, shape innermost first, memory-mapped data)."""
        return {t.name: t for t in self.reader.tensors}


def open_gguf(path: str | Path) -> GGUFFile:
    """Open a GGUF file: read its metadata and memory-map its tensors (nothing is dequantized yet).

    Raises FileNotFoundError for a missing file and ValueError for a file that is not GGUF or cannot be parsed.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"No GGUF file at {str(path)!r}. Pass the path of a .gguf file (from llama.cpp's converter, the Hugging "
            "Face Hub, or an Ollama model blob under ~/.ollama/models/blobs)."
        )
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise ValueError(
            f"{path} is not a GGUF file: it starts with {magic!r}, not {GGUF_MAGIC!r}. Pass a .gguf file (llama.cpp "
            "or Ollama); for a Hugging Face checkpoint directory use `python scripts/convert_hf_checkpoint.py`."
        )
    gguf = import_gguf()
    try:
        reader = gguf.GGUFReader(path)
    except Exception as err:  # the reader raises ValueError, IndexError, ... on truncated or foreign files
        raise ValueError(
            f"{path} starts like a GGUF file but could not be read ({type(err).__name__}: {err}). It may be truncated "
            "(an interrupted download) or use a GGUF feature this version of the `gguf` package does not know "
            f"(installed: {getattr(gguf, '__version__', 'unknown')}; try `pip install -U gguf`)."
        ) from err
    metadata = {key: field.contents() for key, field in reader.fields.items()}
    if int(metadata.get("split.count", 1)) > 1:
        raise ValueError(
            f"{path} is part {int(metadata.get('split.no', 0)) + 1} of a GGUF model split into "
            f"{metadata['split.count']} files. Merge the parts first with llama.cpp's "
            f"`llama-gguf-split --merge {path} merged.gguf`, then convert merged.gguf."
        )
    return GGUFFile(path, metadata, reader)


def import_gguf() -> Any:
    """The `gguf` package (llama.cpp's gguf-py), or an ImportError that says how to install it."""
    try:
        import gguf
    except ImportError as err:
        raise ImportError(
            "Reading GGUF files needs the `gguf` package: `pip install 'gguf>=0.10'` (or `pip install -e '.[gguf]'`)."
        ) from err
    return gguf


# ---- quantization ---------------------------------------------------------------------------------------------------


def supported_quant_types() -> list[str]:
    """The ggml tensor types that `gguf.quants.dequantize` turns into floats, by name (F32, F16, Q8_0, ...)."""
    gguf = import_gguf()

    # F32 and F16 are handled inline by `dequantize`; every block type it knows registers itself in _type_traits.
    traits = getattr(gguf.quants, "_type_traits", {})
    types = {gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, *traits}
    return [t.name for t in sorted(types)]


def dequantize(tensor: Any) -> torch.Tensor:
    """One GGUF tensor (a gguf.ReaderTensor) as a float32 torch tensor in torch's (row-major) shape."""
    import numpy as np
    from gguf.quants import dequantize as gguf_dequantize

    shape = tuple(int(n) for n in reversed(tensor.shape))  # ggml lists the innermost dimension first
    array = gguf_dequantize(tensor.data, tensor.tensor_type)
    # F32 data come back as a read-only view of the memory map: copy them, since the file may be closed or replaced
    array = np.array(array) if not array.flags.writeable else np.asarray(array, dtype=np.float32)
    array = array.reshape(shape)
    return torch.from_numpy(array)


# ---- metadata -> Config ---------------------------------------------------------------------------------------------


def gguf_hf_config(file: GGUFFile) -> dict[str, Any]:
    """A Hugging Face `config.json` (as a dict) describing the model in a GGUF file, for `config_from_hf`."""
    arch = file.architecture
    if arch not in GGUF_ARCHITECTURES:
        raise ValueError(
            f"{file.path} holds a {arch or 'unnamed'!r} model (general.architecture); GGUF import supports "
            f"{', '.join(GGUF_ARCHITECTURES)} (Llama 2/3, Mistral, TinyLlama, SmolLM2 and Qwen2/2.5 files). For "
            "another architecture, convert its Hugging Face checkpoint instead (scripts/convert_hf_checkpoint.py)."
        )
    meta, tensors = file.metadata, file.tensors()

    def get(key: str, default: Any = None) -> Any:
        value = meta.get(f"{arch}.{key}", default)
        if value is None:
            raise ValueError(f"{file.path} lacks the metadata key {arch}.{key}, which every {arch} GGUF file has.")
        return value

    if meta.get(f"{arch}.expert_count", 0):
        raise ValueError(
            f"{file.path} is a mixture-of-experts model ({arch}.expert_count = {meta[f'{arch}.expert_count']}, e.g. "
            "Mixtral); only dense models can be imported."
        )
    if "token_embd.weight" not in tensors:
        raise ValueError(f"{file.path} has no token_embd.weight tensor: it is not a complete {arch} model.")
    n_head = _single_int(get("attention.head_count"), f"{arch}.attention.head_count", file.path)
    n_kv = _single_int(get("attention.head_count_kv", n_head), f"{arch}.attention.head_count_kv", file.path)
    n_embd = int(get("embedding_length"))
    head_dim = int(meta.get(f"{arch}.attention.key_length", n_embd // n_head))
    value_dim = int(meta.get(f"{arch}.attention.value_length", head_dim))
    rope_dim = int(meta.get(f"{arch}.rope.dimension_count", head_dim))
    if value_dim != head_dim or rope_dim != head_dim:
        raise ValueError(
            f"{file.path}: key length {head_dim}, value length {value_dim} and RoPE dimension count {rope_dim} "
            "differ; only models that rotate whole heads of one size are supported."
        )
    hf: dict[str, Any] = dict(
        model_type=arch,
        # the embedding's rows, which may exceed the tokenizer's vocabulary (ggml lists [n_embd, n_vocab])
        vocab_size=int(tensors["token_embd.weight"].shape[1]),
        hidden_size=n_embd,
        intermediate_size=int(get("feed_forward_length")),
        num_hidden_layers=int(get("block_count")),
        num_attention_heads=n_head,
        num_key_value_heads=n_kv,
        head_dim=head_dim,
        max_position_embeddings=int(get("context_length")),
        rope_theta=_float32(meta.get(f"{arch}.rope.freq_base", 10000.0)),
        rms_norm_eps=_float32(get("attention.layer_norm_rms_epsilon")),
        hidden_act="silu",
        # llama.cpp's converter writes the output projection only when it is not the embedding matrix
        tie_word_embeddings="output.weight" not in tensors,
    )
    if arch == "llama":
        hf["attention_bias"] = "blk.0.attn_q.bias" in tensors
    if arch == "qwen2":
        hf["use_sliding_window"] = False  # llama.cpp runs Qwen2 without a window, as transformers does by default
    scaling = _rope_scaling(file, hf)
    if scaling is not None:
        hf["rope_scaling"] = scaling
    return hf


def gguf_config(file: GGUFFile, name: Optional[str] = None, hf_repo: Optional[str] = None) -> Config:
    """Our Config for a GGUF file. `name` defaults to `default_model_name`, `hf_repo` to `gguf_hf_repo`."""
    config = config_from_hf(gguf_hf_config(file), name=name or default_model_name(file))
    repo = hf_repo if hf_repo is not None else gguf_hf_repo(file)
    if not repo and config.name in PRESETS:  # a label for prompt styles, as in lit_model.hf.convert.hf_checkpoint_config
        repo = PRESETS[config.name]["hf_repo"]
    return dataclasses.replace(config, hf_repo=repo)


_QUANT_SUFFIX = re.compile(r"[.\-_](?:I?Q\d[\w]*|F16|F32|BF16|FP16|FP32)$", re.IGNORECASE)
_HF_URL = re.compile(r"https?://huggingface\.co/([\w.\-]+/[\w.\-]+)/?")


def default_model_name(file: GGUFFile) -> str:
    """The model's name: the file name without `.gguf` and the quantization tag ("SmolLM2-135M-Instruct" for
    SmolLM2-135M-Instruct.Q4_1.gguf). An Ollama blob (`sha256-<hex>`) has no name of its own: general.name is used.

    The file name comes first because it is how users (and the Hub) name GGUF files, while general.name is often a
    training-run label ("Smollm2 135M 8k Lc100K Mix1 Ep2") or spelled with spaces ("Meta Llama 3.1 8B Instruct"),
    which the prompt-style lookup (`PromptStyle.for_model`) does not recognise.
    """
    stem = file.path.name.removesuffix(".gguf")
    if not re.fullmatch(r"sha256[-:][0-9a-f]+", stem):
        return _QUANT_SUFFIX.sub("", stem) or stem
    meta = file.metadata
    return str(meta.get("general.name") or meta.get("general.basename") or "model")


def gguf_hf_repo(file: GGUFFile) -> str:
    """The Hugging Face repository the model came from, when the file's metadata names one by URL; else "".

    llama.cpp records the converted model's origin in general.source.* and its own links in general.(repo_)url. Names
    are never pieced together from general.organization and general.name: those are often not the repository's.
    """
    for key in ("general.source.repo_url", "general.source.url", "general.repo_url", "general.url"):
        match = _HF_URL.fullmatch(str(file.metadata.get(key, "")))
        if match:
            return match.group(1)
    return ""


def default_output_dir(gguf_file: str | Path) -> Path:
    """Where a GGUF file is converted to by default: checkpoints/<file name without .gguf>."""
    return Path("checkpoints") / Path(gguf_file).name.removesuffix(".gguf")


def _single_int(value: Any, key: str, path: Path) -> int:
    """A count that some architectures store per layer (a list); ours must be the same for every layer."""
    if isinstance(value, list):
        if len(set(value)) != 1:
            raise ValueError(f"{path}: {key} differs between layers ({value}); only uniform models are supported.")
        value = value[0]
    return int(value)


def _float32(value: Any) -> float:
    """A float32 metadata value as the shortest decimal that reads back as the same float32 (9.99999974e-06 -> 1e-05),
    so model_config.yaml shows the number the model was configured with."""
    import numpy as np

    return float(str(np.float32(value)))


def _rope_scaling(file: GGUFFile, hf: dict[str, Any]) -> Optional[dict[str, Any]]:
    """The Hugging Face `rope_scaling` of a GGUF file, or None when its RoPE is unscaled.

    llama.cpp stores Llama 3.1-style scaling as `rope_freqs.weight`: one divisor per frequency (1 for high
    frequencies, `factor` for low ones, a smooth blend between). The parameters that produced it are not stored, so
    candidate parameters (those of our presets, and factor = the largest divisor with Llama 3's low/high frequency
    factors 1 and 4 at any power-of-two original context) are tried until one reproduces every divisor through our own
    `rope_inv_freq`. Linear, YaRN and other scalings are refused.
    """
    arch = file.architecture
    kind = str(file.metadata.get(f"{arch}.rope.scaling.type", "none"))
    if kind != "none":
        raise ValueError(
            f"{file.path} uses {kind!r} RoPE scaling ({arch}.rope.scaling.type), which our model does not implement "
            "(it supports Llama 3.1-style frequency scaling only)."
        )
    tensor = file.tensors().get(ROPE_FREQS)
    if tensor is None:
        return None
    divisors = dequantize(tensor).double()
    plain = config_from_hf(hf)
    if torch.allclose(divisors, torch.ones_like(divisors)):
        return None
    base = rope_inv_freq(plain).double()
    factor = float(divisors.max())
    candidates = [dict(p["rope_adjustments"]) for p in PRESETS.values() if p.get("rope_adjustments")]
    candidates += [
        dict(factor=factor, low_freq_factor=1.0, high_freq_factor=4.0, original_max_seq_len=2**k) for k in range(4, 21)
    ]
    for adj in candidates:
        scaled = rope_inv_freq(dataclasses.replace(plain, rope_adjustments=adj)).double()
        if base.shape == divisors.shape and torch.allclose(base / scaled, divisors, rtol=1e-4, atol=0):
            return dict(
                rope_type="llama3",
                factor=float(adj["factor"]),
                low_freq_factor=float(adj["low_freq_factor"]),
                high_freq_factor=float(adj["high_freq_factor"]),
                original_max_position_embeddings=int(adj["original_max_seq_len"]),
            )
    raise ValueError(
        f"{file.path} scales its RoPE frequencies ({ROPE_FREQS}: divisors from {float(divisors.min()):g} to "
        f"{factor:g}) in a way that no Llama 3.1-style setting reproduces; this model cannot be imported."
    )


# ---- tensors -> our state dict --------------------------------------------------------------------------------------


def gguf_to_hf_name(name: str) -> Optional[str]:
    """The Hugging Face name of a llama.cpp tensor name ("blk.3.attn_q.weight" -> "model.layers.3.self_attn.q_proj
    .weight"), or None for a name outside the Llama/Qwen2 map."""
    module, _, leaf = name.rpartition(".")
    if module in _TOP:
        return f"{_TOP[module]}.{leaf}"
    match = re.fullmatch(r"blk\.(\d+)\.(\w+)", module)
    if match is not None and match.group(2) in _BLOCK:
        return f"model.layers.{match.group(1)}.{_BLOCK[match.group(2)]}.{leaf}"
    return None


def unpermute_rope_rows(tensor: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's row permutation of a `llama` file's attn_q / attn_k weight (out, in) or bias (out,).

    Hugging Face Llama checkpoints rotate each head in halves (channel i pairs with i + hs/2); ggml's RoPE rotates
    adjacent channels (2i with 2i + 1). llama.cpp's converter therefore reorders each head's rows as
    (n_heads, 2, hs/2) -> (n_heads, hs/2, 2); this is the inverse. `n_heads` is the query heads for attn_q, the
    key/value heads for attn_k.
    """
    rest = tensor.shape[1:]
    head_half = tensor.shape[0] // n_heads // 2
    interleaved = tensor.reshape(n_heads, head_half, 2, *rest)  # (nh, hs/2, 2[, C]): ggml's order
    return interleaved.transpose(1, 2).reshape(tensor.shape).contiguous()  # (nh, 2, hs/2[, C]) -> (nh * hs[, C])


def check_gguf_tensors(file: GGUFFile, config: Config) -> None:
    """Check every tensor of the file against the model `config` describes, before anything is dequantized.

    One ValueError lists all problems: unsupported tensor types (with the supported ones), names with no counterpart
    in our model, shapes that differ, and weights the model needs that the file lacks.
    """
    with torch.device("meta"):
        expected = {k: v.shape for k, v in GPT(config).state_dict().items()}
    if config.tie_embeddings:
        del expected["lm_head.weight"]
    supported = set(supported_quant_types())
    unsupported, unexpected, mismatched, seen = [], [], [], set()
    for name, tensor in file.tensors().items():
        if name == ROPE_FREQS:
            continue
        if tensor.tensor_type.name not in supported:
            unsupported.append(f"{name} ({tensor.tensor_type.name})")
        shape = torch.Size(int(n) for n in reversed(tensor.shape))
        for ours, piece in _lit_names(name, torch.empty(shape, device="meta"), config):
            if ours is None or ours not in expected:
                unexpected.append(name if ours is None else f"{name} (as {ours})")
            elif piece.shape != expected[ours]:
                mismatched.append(f"{name} (as {ours}): file {tuple(piece.shape)}, model {tuple(expected[ours])}")
            else:
                seen.add(ours)
    if unsupported:
        raise ValueError(
            f"{file.path} holds tensors of types the installed `gguf` package cannot dequantize: "
            f"{preview(unsupported)}. Supported types: {', '.join(supported_quant_types())}. Upgrade gguf (`pip "
            "install -U gguf`), or use a file with another quantization (e.g. Q8_0, Q4_K_M, F16)."
        )
    missing = [k for k in expected if k not in seen]
    if missing or unexpected or mismatched:
        advice = (
            f"The metadata ({file.architecture}.*) and the tensors of {file.path.name} must describe the same "
            f"{file.architecture} model; tensors such as attention-output biases are not supported."
        )
        raise ValueError(mismatch_message(str(file.path), missing, unexpected, mismatched, advice))


def _lit_names(name: str, tensor: torch.Tensor, config: Config) -> list[tuple[Optional[str], torch.Tensor]]:
    """Our (name, tensor) pairs for a GGUF tensor; (None, tensor) when it has no counterpart."""
    hf_name = gguf_to_hf_name(name)
    if hf_name is None:
        return [(None, tensor)]
    try:
        return list(hf_to_lit(hf_name, tensor, config))
    except UnknownTensorError:
        return [(None, tensor)]


def iter_gguf_weights(
    file: GGUFFile, config: Config, dtype: torch.dtype = torch.float32
) -> Iterator[tuple[str, torch.Tensor]]:
    """Our (name, tensor) pairs, dequantized one tensor at a time, the Q/K permutation undone, cast to `dtype`.

    Call `check_gguf_tensors` first: names without a counterpart are skipped here.
    """
    assert config.n_query_groups is not None
    permuted = file.architecture == "llama"
    for name, tensor in file.tensors().items():
        if name == ROPE_FREQS:
            continue
        weight = dequantize(tensor)
        if permuted and ".attn_q." in name:
            weight = unpermute_rope_rows(weight, config.n_head)
        elif permuted and ".attn_k." in name:
            weight = unpermute_rope_rows(weight, config.n_query_groups)
        for ours, piece in _lit_names(name, weight, config):
            if ours is not None:
                yield ours, piece.to(dtype)
        del weight


def gguf_state_dict(file: GGUFFile, config: Config, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Our state dict for a GGUF file, in the model's key order; with tied embeddings `lm_head.weight` is the
    embedding tensor itself (stored once by torch.save), as `convert_hf_checkpoint` writes it."""
    check_gguf_tensors(file, config)
    state = dict(iter_gguf_weights(file, config, dtype))
    with torch.device("meta"):
        order = list(GPT(config).state_dict())
    if config.tie_embeddings:
        state["lm_head.weight"] = state["transformer.wte.weight"]
    return {k: state[k] for k in order}


# ---- the whole directory --------------------------------------------------------------------------------------------


def convert_gguf_checkpoint(
    gguf_file: str | Path,
    output_dir: Optional[str | Path] = None,
    dtype: Optional[str | torch.dtype] = None,
    name: Optional[str] = None,
    hf_repo: Optional[str] = None,
) -> Path:
    """Convert a GGUF file into one of our checkpoint directories; returns the directory.

    Writes lit_model.pth (dequantized, in `dtype`, default float32), model_config.yaml and the tokenizer files
    (tokenizer.json, tokenizer_config.json with the chat template, generation_config.json). The directory (default
    checkpoints/<file name>) is written under a temporary name and renamed when complete; an existing non-empty one is
    refused. Memory peaks at about the output's size plus one float32 tensor. `name` and `hf_repo` label the config
    (defaults: `default_model_name`, `gguf_hf_repo`).
    """
    target_dtype = parse_dtype(dtype) or torch.float32
    out = Path(output_dir) if output_dir is not None else default_output_dir(gguf_file)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not empty: pass another --output_dir, or delete it first.")
    file = open_gguf(gguf_file)
    config = gguf_config(file, name=name, hf_repo=hf_repo)
    check_gguf_tensors(file, config)
    tokenizer_files = gguf_tokenizer_files(file.metadata)  # built before the weights: its errors come first

    def fill(tmp: Path) -> None:
        save_state_dict(gguf_state_dict(file, config, target_dtype), tmp / WEIGHTS_NAME)
        config.save(tmp / CONFIG_NAME)
        for file_name, text in tokenizer_files.items():
            (tmp / file_name).write_text(text, encoding="utf-8")

    return write_dir_atomically(out, fill)
