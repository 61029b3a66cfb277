"""Hugging Face checkpoints both ways: weight names in and out, conversion in, export out.

The weight maps are the families' layouts (`lit_model.hf.families`): tables of module names only; the leaf (`weight`,
`bias`) carries through. Two HF architectures fuse projections that we keep apart (GPT-NeoX's `query_key_value`,
Phi-3's `qkv_proj` and `gate_up_proj`): they are split on import and fused on export. A LoRA checkpoint exports merged
here (a full HF model); as a PEFT adapter see `lit_model.hf.peft_export`. Needs torch, safetensors and yaml only
(never transformers or peft); safetensors is imported where used.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict
from pathlib import Path
from typing import Iterable, Iterator, Mapping, NamedTuple, Optional

import torch

from lit_model.checkpoint_io import (
    CONFIG_NAME,
    GENERATION_CONFIG_NAME,
    WEIGHTS_NAME,
    check_checkpoint_dir,
    compare_keys,
    copy_support_files,
    download_hint,
    hf_weight_files,
    load_state_dict,
    mismatch_message,
    parse_dtype,
    preview,
    save_state_dict,
)
from lit_model.config import PRESETS, Config
from lit_model.hf.families import config_from_hf, hf_config_dict, layout_of
from lit_model.model import GPT
from lit_model.peft.checkpoint import is_lora_checkpoint, lora_support_dir, merge_lora_weights, read_lora_checkpoint

# ---- weight names ---------------------------------------------------------------------------------------------------


class UnknownTensorError(ValueError):
    """A Hugging Face tensor name that the weight map of its architecture does not know."""


def hf_to_lit(name: str, tensor: torch.Tensor, config: Config) -> list[tuple[str, torch.Tensor]]:
    """Our (name, tensor) pairs for one tensor of a Hugging Face checkpoint of `config.hf_model_type`.

    Fused projections split into several; buffers that are not weights, and the LM head of a model with tied
    embeddings, give none. The tensors returned may be views of `tensor`.
    """
    layout = layout_of(config)
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
            pieces = split_fused(tensor, parts, config, layout.per_head_qkv, name)
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
    layout = layout_of(config)
    pending: dict[str, dict[int, torch.Tensor]] = {}
    for name, tensor in state_dict:
        module, _, leaf = name.rpartition(".")
        if name == "lm_head.weight" and config.tie_embeddings:
            continue
        try:
            target = hf_module(module, config)
        except UnknownTensorError:
            raise ValueError(
                f"{name!r} has no Hugging Face {config.hf_model_type} counterpart. LoRA or quantization state cannot "
                "be exported: merge LoRA weights into the base model first (`python scripts/merge_lora.py`)."
            ) from None
        key = f"{target.name}.{leaf}"
        if target.index is None:
            yield key, tensor
            continue
        parts = pending.setdefault(key, {})
        parts[target.index] = tensor
        if len(parts) == len(target.parts):
            del pending[key]
            yield key, fuse_parts([parts[i] for i in range(len(parts))], config, layout.per_head_qkv)
    if pending:
        raise ValueError(f"Incomplete fused weights (a part is missing): {preview(sorted(pending))}")


class HFModule(NamedTuple):
    """Where one of our modules lives in a Hugging Face model."""

    name: str  # e.g. "model.layers.0.self_attn.qkv_proj", as in the checkpoint files
    parts: tuple[str, ...] = ()  # for a fused HF module: ours that it packs, in row order (e.g. attn.query, ...)
    index: Optional[int] = None  # our module's position in `parts`


def hf_module(module: str, config: Config) -> HFModule:
    """The Hugging Face module that holds one of our modules (e.g. "transformer.h.0.attn.key").

    Raises UnknownTensorError for modules with no counterpart (e.g. quantization state).
    """
    layout = layout_of(config)
    top = {ours: hf for hf, ours in layout.top.items()}
    if module in top:
        return HFModule(top[module])
    match = re.fullmatch(r"transformer\.h\.(\d+)\.(.+)", module)
    if match is not None:
        prefix, sub = f"{layout.layers}.{match.group(1)}", match.group(2)
        layer = {ours: hf for hf, ours in layout.layer.items()}
        if sub in layer:
            return HFModule(f"{prefix}.{layer[sub]}")
        for hf, parts in layout.fused.items():
            if sub in parts:
                return HFModule(f"{prefix}.{hf}", parts, parts.index(sub))
    raise UnknownTensorError(f"{module!r} has no Hugging Face {config.hf_model_type} counterpart")


def out_features(module: str, config: Config) -> int:
    """Rows of the weight of one of our linear layers that HF fuses."""
    assert config.head_size is not None and config.n_query_groups is not None
    return {
        "attn.query": config.n_head * config.head_size,
        "attn.key": config.n_query_groups * config.head_size,
        "attn.value": config.n_query_groups * config.head_size,
        "mlp.fc_1": config.intermediate_size,
        "mlp.fc_2": config.intermediate_size,
    }[module]


def split_fused(
    tensor: torch.Tensor, parts: tuple[str, ...], config: Config, per_head: bool, name: str
) -> list[torch.Tensor]:
    """One HF fused tensor (weight or bias) cut into our parts; raises when its rows do not fit the config."""
    sizes = [out_features(part, config) for part in parts]
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


def fuse_parts(parts: list[torch.Tensor], config: Config, per_head: bool) -> torch.Tensor:
    """The inverse of `split_fused`."""
    if per_head:
        nh, hs, rest = config.n_head, config.head_size, parts[0].shape[1:]
        stacked = torch.stack([p.reshape(nh, hs, *rest) for p in parts], dim=1)  # (nh, 3, hs[, C])
        return stacked.reshape(3 * nh * hs, *rest)
    return torch.cat(parts, dim=0)


# ---- Hugging Face checkpoint directories -> ours --------------------------------------------------------------------


def _iter_hf_tensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors of one weight file, read one at a time (safetensors) or memory-mapped (.bin)."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(path, framework="pt", device="cpu") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)
    else:
        yield from load_state_dict(path).items()


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
    config = config_from_hf(hf, name=hf.get("_name_or_path", "").split("/")[-1] or directory.name)
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
        raise FileNotFoundError(f"Checkpoint directory {str(directory)!r} does not exist. {download_hint(directory)}")
    target_dtype = parse_dtype(dtype)
    config = hf_checkpoint_config(directory, model_name)
    files = hf_weight_files(directory)
    if not files:
        raise FileNotFoundError(
            f"No Hugging Face weights (*.safetensors or *.bin) in {directory}. {download_hint(directory)}"
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
            raise ValueError(mismatch_message(str(directory), missing, [], []))
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
        raise ValueError(mismatch_message(str(path), [], unexpected, mismatched))
    return out


# ---- ours -> Hugging Face checkpoint directories --------------------------------------------------------------------


def export_hf_checkpoint(
    checkpoint_dir: str | Path,
    output_dir: str | Path,
    max_shard_size: int | str = "5GB",
    base_dir: Optional[str | Path] = None,
    dtype: Optional[str | torch.dtype] = None,
) -> Path:
    """Write any of our checkpoint directories as a Hugging Face one: config.json, model.safetensors (sharded with an
    index when larger than `max_shard_size`), the tokenizer files and generation_config.json. Returns `output_dir`.

    A LoRA checkpoint is merged into its base model first (in memory; see `merge_lora_weights`), its base found as
    `read_lora_checkpoint` says (`base_dir` overrides it). `transformers.AutoModelForCausalLM.from_pretrained(
    output_dir)` then gives our logits (the LoRA model's, for a LoRA checkpoint). `dtype` (a dtype or a precision
    name) casts the weights, one tensor at a time as they are written; default: as stored.
    """
    out = Path(output_dir)
    refuse_hf_checkpoint_in(out)
    limit = _parse_size(max_shard_size)
    target = parse_dtype(dtype)
    directory = Path(checkpoint_dir)
    if is_lora_checkpoint(directory):
        lora = read_lora_checkpoint(directory, base_dir)
        config, support = lora.config, lora_support_dir(lora)
        state = merge_lora_weights(lora, target)
        source = f"{lora.base_dir / WEIGHTS_NAME} merged with {directory}"
    else:
        if base_dir is not None:
            raise ValueError(
                f"--base_dir is for LoRA checkpoints; {directory} is not one (it has no lit_model.lora.pth)."
            )
        support = check_checkpoint_dir(directory)
        config = Config.from_checkpoint(directory)
        state = load_state_dict(directory / WEIGHTS_NAME)  # memory-mapped
        source = str(directory / WEIGHTS_NAME)
    _write_hf_checkpoint(state, config, out, limit, support, source, target)
    return out


def refuse_hf_checkpoint_in(out: Path) -> None:
    """Raise FileExistsError when `out` already holds a Hugging Face checkpoint (never overwrite one)."""
    if out.is_dir() and (any(out.glob("*.safetensors")) or (out / "config.json").exists()):
        raise FileExistsError(
            f"{out} already holds a Hugging Face checkpoint (config.json or *.safetensors). Pass an empty or new "
            "--output_dir (or delete the old files first)."
        )


def _write_hf_checkpoint(
    state: dict[str, torch.Tensor], config: Config, out: Path, limit: int, support: Path, source: str,
    dtype: Optional[torch.dtype] = None,
) -> None:
    """Check `state` against the model `config` describes, then write it to `out` in Hugging Face format; config.json
    is written last, so a directory that has one is complete. `support` holds the tokenizer files to copy."""
    with torch.device("meta"):
        expected = GPT(config).state_dict()
    if config.tie_embeddings:  # Hugging Face ties the head to the embedding itself
        expected.pop("lm_head.weight")
        state.pop("lm_head.weight", None)
    missing, unexpected, mismatched = compare_keys(expected, state)
    if missing or unexpected or mismatched:
        advice = None
        if any(".lora_" in k for k in unexpected):
            advice = "LoRA weights cannot be exported: merge them first (`python scripts/merge_lora.py`)."
        raise ValueError(mismatch_message(source, missing, unexpected, mismatched, advice))
    stored = next((t.dtype for t in state.values() if t.is_floating_point()), torch.float32)
    hf_config = hf_config_dict(config, dtype or stored)
    generation = support / GENERATION_CONFIG_NAME
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
            if dtype is not None and tensor.is_floating_point():
                tensor = tensor.to(dtype)
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
    copy_support_files(support, out)
    (out / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")


def _parse_size(size: int | str) -> int:
    """Bytes from an int or a string such as "5GB", "500MB", "20KB" (decimal units, as in transformers) or "1GiB"."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", str(size), flags=re.IGNORECASE)
    if match is None:
        raise ValueError(f"Cannot read the size {size!r}: use e.g. 5GB, 500MB or a number of bytes.")
    units = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}
    return int(float(match.group(1)) * units[(match.group(2) or "b").lower()])
