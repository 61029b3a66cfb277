"""Checkpoint directories and Hugging Face weights: load, save, check, and convert one tensor at a time.

A checkpoint directory holds `lit_model.pth` (a plain state dict, loadable with `torch.load(mmap=True,
weights_only=True)`), `model_config.yaml` and the tokenizer files. The Hugging Face weight maps below are tables:
module names only, the leaf (`weight`, `bias`) carries through. Two HF architectures fuse projections that we keep
apart (GPT-NeoX's `query_key_value`, Phi-3's `qkv_proj` and `gate_up_proj`); they are split on import and fused on
export. Needs torch, safetensors and yaml only; safetensors is imported where it is used.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional

import torch

from lit_model.config import PRESETS, Config
from lit_model.model import GPT

WEIGHTS_NAME = "lit_model.pth"
CONFIG_NAME = "model_config.yaml"
# Kept next to the weights: generation reads the stop tokens from it (lit_model.tokenizer lists it too).
GENERATION_CONFIG_NAME = "generation_config.json"


# ---- state dict files -----------------------------------------------------------------------------------------------


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a plain state dict (name -> tensor) from a `.pth`/`.bin` or `.safetensors` file.

    `.pth`/`.bin` files are memory-mapped (`torch.load(mmap=True, weights_only=True)`): tensors are paged in when
    used. A dict `{"model": state_dict, ...}` (a training checkpoint) yields its "model" entry. Pickled objects
    (e.g. a whole `nn.Module`) are refused, since unpickling them could run arbitrary code.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No checkpoint file at {str(path)!r}")
    refusal = (
        f"{path} is not a plain state dict. Only plain state dicts (a dict of name -> tensor, as written by "
        "`torch.save(model.state_dict(), path)`) and .safetensors files are accepted"
    )
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except SafetensorError as err:
            raise ValueError(f"{path} is not a valid .safetensors file ({err})") from err
    try:
        try:
            obj = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except RuntimeError as err:
            if "mmap" not in str(err):
                raise
            # Files in torch's pre-1.6 (non-zip) format cannot be memory-mapped: read them whole.
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"{refusal}; loading it with weights_only=True failed: {first_line}") from err
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    if not isinstance(obj, dict):
        raise ValueError(f"{refusal}; it holds a {type(obj).__name__}.")
    bad = [f"{k!r} ({type(v).__name__})" for k, v in obj.items() if not (isinstance(k, str) and torch.is_tensor(v))]
    if bad:
        raise ValueError(f"{refusal}; these entries are not tensors: {_some(bad)}.")
    return obj


def save_state_dict(state_dict: Mapping[str, torch.Tensor], path: str | Path) -> None:
    """Write a state dict atomically: a temporary file in the same directory, fsync, then `os.replace`.

    Readers see the old file or the complete new one, never a partial write. A `.safetensors` path writes
    safetensors (tensors that share memory, such as tied embeddings, are stored once each); anything else `torch.save`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes the file private; give it a normal file's permissions
        with os.fdopen(fd, "wb") as f:
            if path.suffix == ".safetensors":
                from safetensors.torch import save

                f.write(save(_unshared(state_dict), metadata={"format": "pt"}))
            else:
                torch.save(dict(state_dict), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    return mask


def _unshared(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous tensors, each with memory of its own (safetensors refuses tensors that share memory)."""
    seen: set[int] = set()
    out = {}
    for name, tensor in state_dict.items():
        tensor = tensor.detach().contiguous()
        ptr = tensor.untyped_storage().data_ptr()
        out[name] = tensor.clone() if ptr in seen and tensor.numel() else tensor
        seen.add(ptr)
    return out


def _fsync_dir(directory: Path) -> None:
    """Persist a rename (POSIX); a no-op where directories cannot be opened (Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ---- checkpoint directories -----------------------------------------------------------------------------------------


def check_checkpoint_dir(checkpoint_dir: str | Path, need_weights: bool = True) -> Path:
    """The directory as a Path if it holds model_config.yaml (and lit_model.pth when `need_weights`).

    Otherwise a FileNotFoundError says what is missing and which command makes it.
    """
    directory = Path(checkpoint_dir)
    if not directory.is_dir():
        raise FileNotFoundError(f"Checkpoint directory {str(directory)!r} does not exist. {_download_hint(directory)}")
    wanted = (WEIGHTS_NAME, CONFIG_NAME) if need_weights else (CONFIG_NAME,)
    missing = [name for name in wanted if not (directory / name).is_file()]
    if not missing:
        return directory
    if (directory / "config.json").is_file() and hf_weight_files(directory):
        fix = (
            "It holds Hugging Face weights: convert them with "
            f"`python scripts/convert_hf_checkpoint.py --checkpoint_dir {directory}`."
        )
    elif need_weights and (directory / "lit_model.lora.pth").is_file():
        fix = (
            "It holds LoRA weights only: merge them into their base model with "
            f"`python scripts/merge_lora.py --checkpoint_dir {directory}`, or pass the base model's directory."
        )
    else:
        fix = _download_hint(directory)
    raise FileNotFoundError(f"Checkpoint directory {str(directory)!r} lacks {' and '.join(missing)}. {fix}")


def _download_hint(directory: Path) -> str:
    parts = directory.parts
    if len(parts) >= 3 and parts[-3] == "checkpoints":  # checkpoints/ORG/NAME names its Hugging Face repository
        return f"Download and convert the model with `python scripts/download.py --repo_id {parts[-2]}/{parts[-1]}`."
    return (
        "Download and convert a model with `python scripts/download.py --repo_id ORG/NAME` (it lands in "
        "checkpoints/ORG/NAME; `--help` lists the known models), then pass that directory."
    )


def save_checkpoint_dir(
    checkpoint_dir: str | Path,
    state_dict: Mapping[str, torch.Tensor],
    config: Config,
    copy_files_from: Optional[str | Path] = None,
) -> Path:
    """Write a checkpoint directory: lit_model.pth (atomically), model_config.yaml, and the tokenizer files and
    generation_config.json copied from `copy_files_from` (those of them that exist there)."""
    directory = Path(checkpoint_dir)
    directory.mkdir(parents=True, exist_ok=True)
    save_state_dict(state_dict, directory / WEIGHTS_NAME)
    config.save(directory / CONFIG_NAME)
    if copy_files_from is not None:
        copy_support_files(copy_files_from, directory)
    return directory


def copy_support_files(src: str | Path, dst: str | Path) -> list[str]:
    """Copy the tokenizer files and generation_config.json that exist in `src` to `dst`; the names copied."""
    src, dst = Path(src), Path(dst)
    copied = []
    from lit_model.tokenizer import TOKENIZER_FILES

    for name in dict.fromkeys((*TOKENIZER_FILES, GENERATION_CONFIG_NAME)):
        if (src / name).is_file() and (src / name).resolve() != (dst / name).resolve():
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    return copied


# ---- loading into a model -------------------------------------------------------------------------------------------


def load_checkpoint(
    model: torch.nn.Module,
    path: str | Path,
    strict: bool = True,
    missing_ok: Optional[Callable[[str], bool]] = None,
) -> list[str]:
    """Load a state dict file into `model` (which may live on the meta device) with `assign=True`.

    The model takes the checkpoint's tensors (memory-mapped, in their stored dtype). With tied embeddings the LM
    head is re-tied to the embedding, whether or not the file holds an `lm_head.weight` entry. Shape mismatches always
    raise; missing and unexpected keys raise when `strict`, except missing keys for which `missing_ok(key)` is True
    (parameters the caller initialises itself, e.g. LoRA's). Returns the missing keys that `missing_ok` allowed.
    """
    state = load_state_dict(path)
    expected = model.state_dict(keep_vars=True)
    tied = _is_tied(model)
    if tied:
        expected.pop("lm_head.weight", None)
        head = state.pop("lm_head.weight", None)
        if head is not None and "transformer.wte.weight" not in state:
            state["transformer.wte.weight"] = head
    absent, unexpected, mismatched = _compare(expected, state)
    allowed = [k for k in absent if missing_ok is not None and missing_ok(k)]
    missing = [k for k in absent if k not in allowed]
    if mismatched or (strict and (missing or unexpected)):
        raise ValueError(_mismatch_message(str(path), missing, unexpected, mismatched))
    model.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=False, assign=True)
    if tied:
        model.lm_head.weight = model.transformer.wte.weight
    return allowed


def _compare(
    expected: Mapping[str, torch.Tensor], found: Mapping[str, torch.Tensor]
) -> tuple[list[str], list[str], list[str]]:
    """Keys missing from `found`, keys `expected` lacks, and "key: file (shape), model (shape)" for shape mismatches."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    mismatched = [
        f"{k}: file {tuple(v.shape)}, model {tuple(expected[k].shape)}"
        for k, v in found.items()
        if k in expected and v.shape != expected[k].shape
    ]
    return missing, unexpected, mismatched


def _is_tied(model: torch.nn.Module) -> bool:
    config = getattr(model, "config", None)
    return bool(getattr(config, "tie_embeddings", False))


def _mismatch_message(
    source: str, missing: list[str], unexpected: list[str], mismatched: list[str], advice: Optional[str] = None
) -> str:
    lines = [f"The weights in {source} do not match the model its config describes:"]
    if missing:
        lines.append(f"  missing from the weights ({len(missing)}): {_some(missing)}")
    if unexpected:
        lines.append(f"  not in the model ({len(unexpected)}): {_some(unexpected)}")
    if mismatched:
        lines.append(f"  shape differs ({len(mismatched)}): {_some(mismatched)}")
    lines.append(
        advice
        or "The config (model_config.yaml, config.json or --model_name) and the weights must describe the same model "
        "(same layer count, sizes, architecture). Re-convert with the config that belongs to these weights."
    )
    return "\n".join(lines)


def _some(items: list[str], limit: int = 8) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


def load_model(
    checkpoint_dir: str | Path, device: str | torch.device = "cpu", dtype: Optional[torch.dtype] = None
) -> GPT:
    """The GPT of a checkpoint directory, in eval mode (call `.train()` to train it).

    Built on the meta device, so no memory goes to random initialisation; the weights are memory-mapped and assigned,
    then cast to `dtype` (default: the stored dtype) and moved to `device`. Tied embeddings stay tied.
    """
    directory = check_checkpoint_dir(checkpoint_dir)
    config = Config.from_checkpoint(directory)
    with torch.device("meta"):
        model = GPT(config)
    load_checkpoint(model, directory / WEIGHTS_NAME)
    if dtype is not None:
        model = model.to(dtype=dtype)
    return model.to(device).eval()


# ---- Hugging Face weight maps ---------------------------------------------------------------------------------------


class UnknownTensorError(ValueError):
    """A Hugging Face tensor name that the weight map of its architecture does not know."""


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
_LLAMA = HFLayout(_LLAMA_TOP, "model.layers", _LLAMA_BLOCK, ignored=("rotary_emb.inv_freq",))
_PHI3 = HFLayout(
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
_GPT_NEOX = HFLayout(
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
)
HF_LAYOUTS: dict[str, HFLayout] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "gemma": _LLAMA,
    "phi3": _PHI3,
    "gpt_neox": _GPT_NEOX,
}
HF_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "gemma": "GemmaForCausalLM",
    "phi3": "Phi3ForCausalLM",
    "gpt_neox": "GPTNeoXForCausalLM",
}


def hf_to_lit(name: str, tensor: torch.Tensor, config: Config) -> list[tuple[str, torch.Tensor]]:
    """Our (name, tensor) pairs for one tensor of a Hugging Face checkpoint of `config.hf_model_type`.

    Fused projections split into several; buffers that are not weights, and the LM head of a model with tied
    embeddings, give none. The tensors returned may be views of `tensor`.
    """
    layout = HF_LAYOUTS[config.hf_model_type]
    if name.endswith(layout.ignored):
        return []
    module, _, leaf = name.rpartition(".")
    if module in layout.top:
        ours = layout.top[module]
        if ours == "lm_head" and config.tie_embeddings:
            return []  # the head is the embedding; some tied checkpoints store a copy anyway
        return [(f"{ours}.{leaf}", tensor)]
    match = re.fullmatch(rf"{re.escape(layout.layers)}\.(\d+)\.(.+)", module)
    if match is not None:
        prefix, sub = f"transformer.h.{match.group(1)}", match.group(2)
        if sub in layout.layer:
            return [(f"{prefix}.{layout.layer[sub]}.{leaf}", tensor)]
        if sub in layout.fused:
            parts = layout.fused[sub]
            pieces = _split(tensor, parts, config, layout.per_head_qkv, name)
            return [(f"{prefix}.{part}.{leaf}", piece) for part, piece in zip(parts, pieces)]
    raise UnknownTensorError(
        f"Unexpected tensor {name!r} in a {config.hf_model_type} checkpoint: it has no counterpart in our model. "
        "The checkpoint may be of another architecture than its config (or --model_name) says, or use a feature "
        "we do not support (e.g. biases on the attention output)."
    )


def lit_to_hf(state_dict: Iterable[tuple[str, torch.Tensor]], config: Config) -> Iterator[tuple[str, torch.Tensor]]:
    """Hugging Face (name, tensor) pairs for our (name, tensor) pairs (e.g. `state_dict.items()`).

    Fused projections are emitted once all their parts have been seen. With tied embeddings `lm_head.weight` is
    skipped: Hugging Face ties it to the embedding when loading.
    """
    layout = HF_LAYOUTS[config.hf_model_type]
    top = {ours: hf for hf, ours in layout.top.items()}
    layer = {ours: hf for hf, ours in layout.layer.items()}
    fused = {part: (hf, i) for hf, parts in layout.fused.items() for i, part in enumerate(parts)}
    pending: dict[str, dict[int, torch.Tensor]] = {}
    for name, tensor in state_dict:
        module, _, leaf = name.rpartition(".")
        if name == "lm_head.weight" and config.tie_embeddings:
            continue
        if module in top:
            yield f"{top[module]}.{leaf}", tensor
            continue
        match = re.fullmatch(r"transformer\.h\.(\d+)\.(.+)", module)
        sub = match.group(2) if match else None
        if sub in layer:
            yield f"{layout.layers}.{match.group(1)}.{layer[sub]}.{leaf}", tensor
        elif sub in fused:
            hf_module, index = fused[sub]
            key = f"{layout.layers}.{match.group(1)}.{hf_module}.{leaf}"
            parts = pending.setdefault(key, {})
            parts[index] = tensor
            if len(parts) == len(layout.fused[hf_module]):
                del pending[key]
                yield key, _fuse([parts[i] for i in range(len(parts))], config, layout.per_head_qkv)
        else:
            raise ValueError(
                f"{name!r} has no Hugging Face {config.hf_model_type} counterpart. LoRA or quantization state cannot "
                "be exported: merge LoRA weights into the base model first (`python scripts/merge_lora.py`)."
            )
    if pending:
        raise ValueError(f"Incomplete fused weights (a part is missing): {_some(sorted(pending))}")


def _out_features(module: str, config: Config) -> int:
    """Rows of the weight of one of our linear layers that HF fuses."""
    assert config.head_size is not None and config.n_query_groups is not None
    return {
        "attn.query": config.n_head * config.head_size,
        "attn.key": config.n_query_groups * config.head_size,
        "attn.value": config.n_query_groups * config.head_size,
        "mlp.fc_1": config.intermediate_size,
        "mlp.fc_2": config.intermediate_size,
    }[module]


def _split(
    tensor: torch.Tensor, parts: tuple[str, ...], config: Config, per_head: bool, name: str
) -> list[torch.Tensor]:
    """One HF fused tensor (weight or bias) cut into our parts; raises when its rows do not fit the config."""
    sizes = [_out_features(part, config) for part in parts]
    if tensor.shape[0] != sum(sizes):
        raise ValueError(
            f"{name} has {tensor.shape[0]} rows, the config expects {sum(sizes)} ({' + '.join(map(str, sizes))} for "
            f"{', '.join(parts)}). The config does not describe these weights."
        )
    if per_head:
        nh, hs, rest = config.n_head, config.head_size, tensor.shape[1:]
        if config.n_query_groups != nh:
            raise ValueError(
                f"GPT-NeoX packs one key/value head per query head, but the config has n_head={nh} and "
                f"n_query_groups={config.n_query_groups}"
            )
        packed = tensor.reshape(nh, 3, hs, *rest)  # (nh, 3, hs[, C])
        return [packed[:, j].reshape(nh * hs, *rest) for j in range(3)]  # each (nh * hs[, C])
    return list(tensor.split(sizes, dim=0))


def _fuse(parts: list[torch.Tensor], config: Config, per_head: bool) -> torch.Tensor:
    """The inverse of `_split`."""
    if per_head:
        nh, hs, rest = config.n_head, config.head_size, parts[0].shape[1:]
        stacked = torch.stack([p.reshape(nh, hs, *rest) for p in parts], dim=1)  # (nh, 3, hs[, C])
        return stacked.reshape(3 * nh * hs, *rest)
    return torch.cat(parts, dim=0)


# ---- Hugging Face checkpoint directories -> ours --------------------------------------------------------------------


def hf_weight_files(directory: Path) -> list[Path]:
    """The weight files of a Hugging Face checkpoint: safetensors preferred, then PyTorch .bin; shards in order.

    An `*.index.json` names the shards when present. Mistral's `consolidated.safetensors` (the same weights under
    other names), hidden files (temporary files, macOS `._*` forks) and training state are skipped.
    """

    def wanted(path: Path) -> bool:
        name = path.name
        return not name.startswith((".", "consolidated")) and name not in ("training_args.bin", "optimizer.bin")

    for suffix in (".safetensors", ".bin"):
        index = [p for p in sorted(directory.glob(f"*{suffix}.index.json")) if wanted(p)]
        if index:
            weight_map = json.loads(index[0].read_text())["weight_map"]
            return [directory / name for name in dict.fromkeys(weight_map.values())]
        files = [p for p in sorted(directory.glob(f"*{suffix}")) if wanted(p)]
        if files:
            return files
    return []


def _iter_hf_tensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors of one weight file, read one at a time (safetensors) or memory-mapped (.bin)."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(path, framework="pt", device="cpu") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)
    else:
        yield from load_state_dict(path).items()


def parse_dtype(dtype: Optional[str | torch.dtype]) -> Optional[torch.dtype]:
    """A floating-point torch dtype from its name ("bfloat16", "torch.float16", ...); None stays None."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise ValueError(f"Unknown dtype {dtype!r}: use one of float32, bfloat16, float16 (or leave it unset).")
    return value


def hf_checkpoint_config(checkpoint_dir: str | Path, model_name: Optional[str] = None) -> Config:
    """The Config for a Hugging Face checkpoint directory: the preset `model_name`, else its config.json."""
    directory = Path(checkpoint_dir)
    if model_name is not None:
        return Config.from_name(model_name)
    path = directory / "config.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"No config.json in {directory}: pass --model_name with a preset name instead "
            f"(one of {', '.join(sorted(PRESETS))})."
        )
    hf = json.loads(path.read_text())
    config = Config.from_hf_config(hf, name=hf.get("_name_or_path", "").split("/")[-1] or directory.name)
    if not config.hf_repo and config.name in PRESETS:  # a label for prompt styles, not a source of numbers
        config = Config(**{**asdict(config), "hf_repo": PRESETS[config.name]["hf_repo"]})
    return config


def convert_hf_checkpoint(
    checkpoint_dir: str | Path, dtype: Optional[str | torch.dtype] = None, model_name: Optional[str] = None
) -> Path:
    """Convert the Hugging Face checkpoint in `checkpoint_dir` into lit_model.pth + model_config.yaml beside it.

    Tensors are read one at a time (safetensors `get_tensor`, memory-mapped .bin) and the converted tensors of one
    shard are flushed to a temporary file before the next shard is read, so memory peaks at about one shard; the
    shards are then joined into lit_model.pth from memory-mapped files. Every name and shape is checked against the
    model the config describes. Returns the path of lit_model.pth.
    """
    directory = Path(checkpoint_dir)
    if not directory.is_dir():
        raise FileNotFoundError(f"Checkpoint directory {str(directory)!r} does not exist. {_download_hint(directory)}")
    target_dtype = parse_dtype(dtype)
    config = hf_checkpoint_config(directory, model_name)
    files = hf_weight_files(directory)
    if not files:
        raise FileNotFoundError(
            f"No Hugging Face weights (*.safetensors or *.bin) in {directory}. {_download_hint(directory)}"
        )
    with torch.device("meta"):
        expected = {k: v.shape for k, v in GPT(config).state_dict().items()}
    if config.tie_embeddings:
        del expected["lm_head.weight"]
    seen: set[str] = set()
    parts: list[Path] = []
    try:
        for path in files:
            shard = _convert_file(path, config, expected, target_dtype)
            seen.update(shard)
            if len(files) == 1:
                joined = shard
            else:
                parts.append(directory / f".{WEIGHTS_NAME}.part{len(parts)}.tmp")
                save_state_dict(shard, parts[-1])
            del shard
        missing = [k for k in expected if k not in seen]
        if missing:
            raise ValueError(_mismatch_message(str(directory), missing, [], []))
        if parts:
            joined = {}
            for part in parts:
                joined.update(load_state_dict(part))  # memory-mapped: torch.save streams them from the page cache
        joined = {k: joined[k] for k in expected}  # the model's order
        if config.tie_embeddings:  # stored once, referenced twice, so a plain load_state_dict also works
            joined["lm_head.weight"] = joined["transformer.wte.weight"]
        save_state_dict(joined, directory / WEIGHTS_NAME)
    finally:
        for part in parts:
            part.unlink(missing_ok=True)
    # Written last: a directory with model_config.yaml has complete weights.
    config.save(directory / CONFIG_NAME)
    return directory / WEIGHTS_NAME


def _convert_file(
    path: Path, config: Config, expected: Mapping[str, torch.Size], dtype: Optional[torch.dtype]
) -> dict[str, torch.Tensor]:
    """Our tensors from one HF weight file, each with storage of its own; raises on unknown names or shapes."""
    out: dict[str, torch.Tensor] = {}
    unexpected, mismatched = [], []
    for hf_name, hf_tensor in _iter_hf_tensors(path):
        try:
            pairs = hf_to_lit(hf_name, hf_tensor, config)
        except UnknownTensorError:
            unexpected.append(hf_name)
            continue
        except ValueError as err:  # a fused tensor whose rows do not fit the config
            mismatched.append(str(err))
            continue
        for name, tensor in pairs:
            if name not in expected:
                unexpected.append(f"{hf_name} (as {name})")
            elif tensor.shape != expected[name]:
                mismatched.append(f"{hf_name} (as {name}): file {tuple(tensor.shape)}, model {tuple(expected[name])}")
            else:
                tensor = tensor.to(dtype) if dtype is not None else tensor
                # A slice of a fused tensor (or a tensor of a memory-mapped file) would drag its whole storage into
                # torch.save: give every tensor compact storage of its own.
                if tensor.untyped_storage().nbytes() != tensor.nbytes or not tensor.is_contiguous():
                    tensor = tensor.clone(memory_format=torch.contiguous_format)
                out[name] = tensor
    if unexpected or mismatched:
        raise ValueError(_mismatch_message(str(path), [], unexpected, mismatched))
    return out


# ---- ours -> Hugging Face config.json -------------------------------------------------------------------------------


def hf_config_dict(config: Config, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """A Hugging Face `config.json` (as a dict) for `config.hf_model_type` that describes the same model.

    Raises ValueError when the architecture cannot express the config (checked by mapping the result back with
    `Config.from_hf_config` and comparing every field).
    """
    mt = config.hf_model_type
    hf: dict[str, Any] = dict(
        architectures=[HF_ARCHITECTURES[mt]],
        model_type=mt,
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
    act = "gelu" if config.gelu_approximate == "none" else "gelu_pytorch_tanh"
    if mt == "gpt_neox":
        hf.update(
            rotary_pct=config.rotary_percentage,
            rotary_emb_base=config.rope_base,
            layer_norm_eps=config.norm_eps,
            use_parallel_residual=config.parallel_residual,
            hidden_act=act,
            attention_bias=True,
        )
    else:
        hf.update(num_key_value_heads=config.n_query_groups, head_dim=config.head_size, rms_norm_eps=config.norm_eps)
        hf["hidden_act"] = act if mt == "gemma" else "silu"
        if mt in ("llama", "mistral"):
            hf.update(attention_bias=config.attn_bias, mlp_bias=False)
        if mt == "phi3" and config.rotary_percentage != 1.0:
            hf["partial_rotary_factor"] = config.rotary_percentage
    if mt in ("mistral", "phi3"):
        hf["sliding_window"] = config.sliding_window
    elif mt == "qwen2":
        # Qwen2 windows the layers from max_window_layers on: 0 windows them all, as our config does.
        hf.update(use_sliding_window=config.sliding_window is not None, sliding_window=config.sliding_window,
                  max_window_layers=0 if config.sliding_window is not None else config.n_layer)
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


def _check_round_trip(config: Config, hf: dict[str, Any]) -> None:
    try:
        back = Config.from_hf_config(hf, name=config.name)
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


# ---- ours -> Hugging Face checkpoint directories --------------------------------------------------------------------


def export_hf_checkpoint(
    checkpoint_dir: str | Path, output_dir: str | Path, max_shard_size: int | str = "5GB"
) -> Path:
    """Write our checkpoint as a Hugging Face one: config.json, model.safetensors (sharded with an index when larger
    than `max_shard_size`), the tokenizer files and generation_config.json. Returns `output_dir`.

    `transformers.AutoModelForCausalLM.from_pretrained(output_dir)` then gives our logits.
    """
    directory = check_checkpoint_dir(checkpoint_dir)
    out = Path(output_dir)
    if out.is_dir() and (any(out.glob("*.safetensors")) or (out / "config.json").exists()):
        raise FileExistsError(
            f"{out} already holds a Hugging Face checkpoint (config.json or *.safetensors). Pass an empty or new "
            "--output_dir (or delete the old files first)."
        )
    limit = _parse_size(max_shard_size)
    config = Config.from_checkpoint(directory)
    state = load_state_dict(directory / WEIGHTS_NAME)  # memory-mapped
    with torch.device("meta"):
        expected = GPT(config).state_dict()
    if config.tie_embeddings:  # Hugging Face ties the head to the embedding itself
        expected.pop("lm_head.weight")
        state.pop("lm_head.weight", None)
    missing, unexpected, mismatched = _compare(expected, state)
    if missing or unexpected or mismatched:
        advice = None
        if any(".lora_" in k for k in unexpected):
            advice = "LoRA weights cannot be exported: merge them first (`python scripts/merge_lora.py`)."
        raise ValueError(_mismatch_message(str(directory / WEIGHTS_NAME), missing, unexpected, mismatched, advice))
    dtype = next((t.dtype for t in state.values() if t.is_floating_point()), torch.float32)
    hf_config = hf_config_dict(config, dtype)
    generation = directory / GENERATION_CONFIG_NAME
    if generation.is_file():  # transformers reads the special tokens from config.json too
        tokens = json.loads(generation.read_text())
        hf_config.update({k: tokens[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in tokens})

    out.mkdir(parents=True, exist_ok=True)
    shards: list[tuple[Path, list[str]]] = []
    shard: dict[str, torch.Tensor] = {}
    total = size = 0

    def flush() -> None:
        path = out / f".model-part{len(shards)}.tmp.safetensors"  # renamed once the shard count is known
        save_state_dict(shard, path)
        shards.append((path, list(shard)))
        shard.clear()

    try:
        for name, tensor in lit_to_hf(state.items(), config):
            nbytes = tensor.numel() * tensor.element_size()
            if shard and size + nbytes > limit:
                flush()
                size = 0
            shard[name] = tensor
            size += nbytes
            total += nbytes
        flush()
        n = len(shards)
        names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        for (tmp, _), name in zip(shards, names):
            os.replace(tmp, out / name)
    finally:
        for tmp, _ in shards:
            tmp.unlink(missing_ok=True)
    if n > 1:
        weight_map = {key: name for (_, keys), name in zip(shards, names) for key in keys}
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (out / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    copy_support_files(directory, out)
    return out


def _parse_size(size: int | str) -> int:
    """Bytes from an int or a string such as "5GB", "500MB", "20KB" (decimal units, as in transformers) or "1GiB"."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", str(size), flags=re.IGNORECASE)
    if match is None:
        raise ValueError(f"Cannot read the size {size!r}: use e.g. 5GB, 500MB or a number of bytes.")
    units = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}
    return int(float(match.group(1)) * units[(match.group(2) or "b").lower()])
