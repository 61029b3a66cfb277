"""LoRA (and QLoRA) fine-tunes on disk: read their directory, find their base model, load or merge their adapters.

A LoRA fine-tune writes `lit_model.lora.pth` (the adapters only) and `hyperparameters.yaml` (its base model's
directory and the LoRA settings) instead of `lit_model.pth`; `merge_lora_checkpoint` folds such a directory into a
full one, `load_any` loads any checkpoint directory (base, full fine-tune or LoRA) ready for inference.
"""

from __future__ import annotations

import shutil
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Optional

import torch
import yaml

from lit_model.checkpoint_io import (
    CONFIG_NAME,
    HPARAMS_NAME,
    LORA_WEIGHTS_NAME,
    MERGED_DIR_NAME,
    PROMPT_STYLE_NAME,
    WEIGHTS_NAME,
    check_checkpoint_dir,
    compare_keys,
    copy_support_files,
    load_checkpoint,
    load_model,
    load_state_dict,
    mismatch_message,
    parse_dtype,
    preview,
    save_state_dict,
    write_dir_atomically,
)
from lit_model.config import Config
from lit_model.model import GPT
from lit_model.peft.base import adapter_keys, merge_adapters
from lit_model.peft.lora import LORA_KEYS, LoRAConfig, apply_lora, lora_delta, lora_target_names
from lit_model.quantize import quantize_model


def is_lora_checkpoint(checkpoint_dir: str | Path) -> bool:
    """Whether a directory holds a LoRA fine-tune's adapters (lit_model.lora.pth)."""
    return (Path(checkpoint_dir) / LORA_WEIGHTS_NAME).is_file()


@dataclass(frozen=True)
class LoRACheckpoint:
    """A LoRA fine-tune's directory, read and checked: its base model, and how its adapters were built."""

    directory: Path
    base_dir: Path  # the base model's checkpoint directory (lit_model.pth)
    config: Config  # the base model's config
    lora: LoRAConfig
    quantize: Optional[str]  # the bnb mode the base was quantized with during training (QLoRA), else None
    hparams: dict[str, Any]  # the whole hyperparameters.yaml


def read_lora_checkpoint(checkpoint_dir: str | Path, base_dir: Optional[str | Path] = None) -> LoRACheckpoint:
    """Read a LoRA checkpoint directory's hyperparameters.yaml and find its base model.

    The base is `base_dir` when given, else the `checkpoint_dir` the training run recorded (a relative path is taken
    relative to the current directory, as the training run took it). The base must hold a full checkpoint whose
    model_config.yaml equals the LoRA directory's. Every problem raises with what to do about it.
    """
    directory = Path(checkpoint_dir)
    if not directory.is_dir():
        raise FileNotFoundError(f"Checkpoint directory {str(directory)!r} does not exist.")
    if not is_lora_checkpoint(directory):
        what = "a full model (lit_model.pth)" if (directory / WEIGHTS_NAME).is_file() else "no model weights"
        raise ValueError(
            f"{directory} is not a LoRA checkpoint: it has no {LORA_WEIGHTS_NAME} (it holds {what}). LoRA and QLoRA "
            "fine-tunes write one to OUT_DIR/final; pass such a directory."
        )
    hparams_path = directory / HPARAMS_NAME
    if not hparams_path.is_file():
        raise FileNotFoundError(
            f"{directory} holds LoRA weights but no {HPARAMS_NAME}, which records the base model (checkpoint_dir) and "
            "the LoRA settings (lora: r, alpha, targets). Copy it from the training run's output directory."
        )
    hparams = yaml.safe_load(hparams_path.read_text()) or {}
    settings = hparams.get("lora") if isinstance(hparams, dict) else None
    if not isinstance(settings, dict):
        raise ValueError(
            f"{hparams_path} has no `lora:` mapping (r, alpha, dropout and the target switches), so the adapters "
            "cannot be rebuilt. It must be the file the LoRA training run wrote."
        )
    known = {f.name for f in fields(LoRAConfig)}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise ValueError(f"{hparams_path}: unknown LoRA settings {unknown}; valid ones: {sorted(known)}.")
    lora = LoRAConfig(**settings)
    lora.validate()
    base = base_dir if base_dir is not None else hparams.get("checkpoint_dir")
    if base is None:
        raise ValueError(f"{hparams_path} does not name the base model (checkpoint_dir): pass --base_dir.")
    base = Path(base)
    source = "--base_dir" if base_dir is not None else f"checkpoint_dir in {hparams_path}"
    if not base.is_dir():
        raise FileNotFoundError(
            f"The base model of the LoRA checkpoint {directory}, {str(base)!r} ({source}), is not there. Pass "
            "--base_dir with the directory of the model the adapters were trained on, or put it back at that path."
        )
    try:
        check_checkpoint_dir(base)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"The base model of the LoRA checkpoint {directory} ({source}) is not usable: {err}")
    config = Config.from_checkpoint(base)
    if (directory / CONFIG_NAME).is_file():
        trained, ours = asdict(Config.from_checkpoint(directory)), asdict(config)
        diffs = [
            f"{k} ({trained[k]!r} vs {ours[k]!r})"
            for k in ours
            if k not in ("name", "hf_repo") and ours[k] != trained[k]  # labels, not shapes
        ]
        if diffs:
            raise ValueError(
                f"The base model {base} ({source}) is not the one the adapters in {directory} were trained on: their "
                f"model_config.yaml files differ in {preview(diffs)}. Pass --base_dir with the right model."
            )
    return LoRACheckpoint(directory, base, config, lora, hparams.get("quantize"), hparams)


def load_lora_weights(checkpoint: LoRACheckpoint) -> dict[str, torch.Tensor]:
    """The adapters of a LoRA checkpoint, checked against those its settings put on its base model.

    Keys are ours (`transformer.h.0.attn.query.lora_A`); A is (r, in) and B (out, r), in their stored dtype.
    """
    path = checkpoint.directory / LORA_WEIGHTS_NAME
    found = load_state_dict(path)
    with torch.device("meta"):
        model = GPT(checkpoint.config)
    if checkpoint.lora.head and checkpoint.config.tie_embeddings:
        raise ValueError(
            f"{checkpoint.directory}: LoRA on the LM head of a model with tied embeddings cannot be merged (the head "
            "is the embedding matrix). Such adapters cannot have been trained here: check hyperparameters.yaml."
        )
    r = checkpoint.lora.r
    expected = {}
    for name in lora_target_names(model, checkpoint.lora):
        out_features, in_features = model.get_submodule(name).weight.shape
        expected[f"{name}.{LORA_KEYS[0]}"] = torch.empty(r, in_features, device="meta")
        expected[f"{name}.{LORA_KEYS[1]}"] = torch.empty(out_features, r, device="meta")
    missing, unexpected, mismatched = compare_keys(expected, found)
    if missing or unexpected or mismatched:
        advice = (
            f"The LoRA settings in {checkpoint.directory / HPARAMS_NAME} (lora: r={r}, targets "
            f"{[k for k, on in checkpoint.lora.targets.items() if on]}) and {LORA_WEIGHTS_NAME} must come from the "
            "same training run, on this base model."
        )
        raise ValueError(mismatch_message(str(path), missing, unexpected, mismatched, advice))
    return found


def merge_lora_weights(checkpoint: LoRACheckpoint, dtype: Optional[torch.dtype] = None) -> dict[str, torch.Tensor]:
    """The base model's state dict with every adapter folded in: W + B @ A * alpha / r.

    Each merged weight is computed in float32 and rounded once, to `dtype` (default: the base weight's stored dtype);
    the other tensors stay memory-mapped unless cast to `dtype`. The base checkpoint file is never modified.

    A QLoRA run trained its adapters against the 4-bit rounding of the base weights; they are merged into the dense
    base weights, as Lit-GPT and peft do. The merged model therefore differs from the QLoRA model by the base's
    quantization error (the same amount by which the 4-bit base differs from the dense base), not by the adapters.
    """
    base_path = checkpoint.base_dir / WEIGHTS_NAME
    base = load_state_dict(base_path)
    lora = load_lora_weights(checkpoint)
    with torch.device("meta"):
        expected = GPT(checkpoint.config).state_dict()
    tied = checkpoint.config.tie_embeddings
    if tied:  # one tensor under two names; a tied checkpoint may or may not store the head
        expected.pop("lm_head.weight")
        head = base.pop("lm_head.weight", None)
        if head is not None and "transformer.wte.weight" not in base:
            base["transformer.wte.weight"] = head
    missing, unexpected, mismatched = compare_keys(expected, base)
    if missing or unexpected or mismatched:
        raise ValueError(mismatch_message(str(base_path), missing, unexpected, mismatched))
    scaling = checkpoint.lora.alpha / checkpoint.lora.r
    merged: dict[str, torch.Tensor] = {}
    for name in expected:
        tensor = base[name]
        module = name.removesuffix(".weight")
        if f"{module}.lora_A" in lora:
            delta = lora_delta(lora[f"{module}.lora_A"], lora[f"{module}.lora_B"], scaling)  # (out, in), float32
            tensor = (tensor.float() + delta).to(dtype or tensor.dtype)
        elif dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        merged[name] = tensor
    if tied:
        merged["lm_head.weight"] = merged["transformer.wte.weight"]
    return merged


def lora_support_dir(checkpoint: LoRACheckpoint) -> Path:
    """Where a LoRA checkpoint's tokenizer is: its own directory when it has tokenizer files, else its base's."""
    has_tokenizer = any((checkpoint.directory / n).is_file() for n in ("tokenizer.json", "tokenizer.model"))
    return checkpoint.directory if has_tokenizer else checkpoint.base_dir


def merge_lora_checkpoint(
    checkpoint_dir: str | Path,
    output_dir: Optional[str | Path] = None,
    dtype: Optional[str | torch.dtype] = None,
    base_dir: Optional[str | Path] = None,
) -> Path:
    """Merge a LoRA checkpoint into its base model and write a full, self-contained checkpoint directory.

    The output (default `checkpoint_dir/merged`) gets lit_model.pth, model_config.yaml, the tokenizer files,
    prompt_style.yaml and hyperparameters.yaml (the training run's, with `mode: merged` and where it came from). It
    is written under a temporary name and renamed when complete, so it never exists half-written; an existing
    non-empty output directory is refused. See `merge_lora_weights` for the arithmetic and QLoRA. Returns the output.
    """
    checkpoint = read_lora_checkpoint(checkpoint_dir, base_dir)
    out = Path(output_dir) if output_dir is not None else checkpoint.directory / MERGED_DIR_NAME
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not empty: pass another --output_dir, or delete it first.")
    target_dtype = parse_dtype(dtype)
    state = merge_lora_weights(checkpoint, target_dtype)
    stored = next(t.dtype for t in state.values() if t.is_floating_point())
    hparams = {
        **checkpoint.hparams,
        "mode": "merged",
        "merged_from": str(checkpoint.directory),
        "base_checkpoint_dir": str(checkpoint.base_dir),
        "merged_dtype": str(stored).removeprefix("torch."),
    }
    support = lora_support_dir(checkpoint)

    def fill(tmp: Path) -> None:
        save_state_dict(state, tmp / WEIGHTS_NAME)
        checkpoint.config.save(tmp / CONFIG_NAME)
        copy_support_files(support, tmp)
        for source in (checkpoint.directory, checkpoint.base_dir):  # the style the adapters were trained with
            if (source / PROMPT_STYLE_NAME).is_file():
                shutil.copy2(source / PROMPT_STYLE_NAME, tmp / PROMPT_STYLE_NAME)
                break
        (tmp / HPARAMS_NAME).write_text(yaml.safe_dump(hparams, sort_keys=False))

    write_dir_atomically(out, fill)
    return out


def load_adapters(model: torch.nn.Module, path: Path) -> None:
    """Load an adapters-only file (lit_model.lora.pth) into a model that has those adapters on its loaded base: every
    adapter tensor must be in the file, and nothing else may be."""
    keys = set(adapter_keys(model))
    load_checkpoint(model, path, strict=True, missing_ok=lambda key: key not in keys)


def load_any(
    checkpoint_dir: Path, device: torch.device | str = "cpu", dtype: Optional[torch.dtype] = None, merge: bool = True
) -> GPT:
    """A ready-to-run model (eval mode) from any checkpoint directory this project writes.

    A LoRA directory (`lit_model.lora.pth`) names its base model in hyperparameters.yaml: the base is loaded, the
    adapters applied with the saved settings (on a 4-bit base when the run used --quantize) and, unless the base
    is quantized or `merge` is False, merged into the weights so generation runs at the base model's speed.
    """
    checkpoint_dir = Path(checkpoint_dir)
    if not is_lora_checkpoint(checkpoint_dir):
        check_checkpoint_dir(checkpoint_dir)
        return load_model(checkpoint_dir, device="cpu", dtype=dtype).to(device).eval()

    lora = read_lora_checkpoint(checkpoint_dir)  # finds and checks the base model, rebuilds the LoRA settings
    model = load_model(lora.base_dir, device="cpu", dtype=dtype)
    if lora.quantize:
        model = quantize_model(model, lora.quantize, compute_dtype=dtype or torch.float32)
    model = apply_lora(model, lora.lora)
    load_adapters(model, checkpoint_dir / LORA_WEIGHTS_NAME)
    if merge and not lora.quantize:
        model = merge_adapters(model)
    return model.to(device).eval()
