"""What determines a training run, recorded in every training checkpoint and checked when a run resumes.

Resuming with another base model of the same shape puts the adapters on the wrong weights; a changed LoRA alpha,
batch size, seed or data set silently makes a different run that looks like a continuation. `run_fingerprint` records
plain values for all of that (the base weights by a cheap content identity, the data by a hash of its records), and
`fingerprint_problems` lists every difference in words. The schedule (length, learning rate, warm-up, decay,
optimizer constants) is kept apart: a user may change it on purpose (`--train.allow_new_schedule true`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

IDENTITY_BYTES = 1 << 20  # of the weight file, from its start and from its end


def weights_identity(path: Path) -> str:
    """A content identity of a (possibly huge) weight file: its size and the SHA-256 of its first and last MiB.

    Reading two MiB costs nothing even for a 140 GB checkpoint, and another model of the same shape differs there:
    the first tensors' values sit right after the zip header, the last ones before the central directory.
    """
    path = Path(path)
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with path.open("rb") as f:
        digest.update(f.read(IDENTITY_BYTES))
        if size > 2 * IDENTITY_BYTES:
            f.seek(-IDENTITY_BYTES, 2)
            digest.update(f.read(IDENTITY_BYTES))
    return f"{size}:{digest.hexdigest()[:32]}"


def records_hash(records: Sequence[Mapping[str, Any]]) -> str:
    """SHA-256 of the training records in their order (the data a run's steps are drawn from)."""
    digest = hashlib.sha256()
    for record in records:
        digest.update(json.dumps(record, sort_keys=True, ensure_ascii=False).encode("utf-8", "surrogatepass"))
    return digest.hexdigest()[:32]


def plain(value: Any) -> Any:
    """Arguments as plain data (YAML- and JSON-safe): dataclasses to dicts, paths to strings."""
    if is_dataclass(value) and not isinstance(value, type):
        return plain(asdict(value))
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def run_fingerprint(
    *, base_weights: Path, model_config: Any, mode: str, lora: Any, quantize: Optional[str], optimizer: str,
    badam: Any, train: Any, seed: int, records: Sequence[Mapping[str, Any]], prompt_style: Any,
    max_seq_length: int, mask_prompt: bool, dropbp: Any, max_steps: int, packing: Optional[int] = None,
) -> dict[str, dict[str, Any]]:
    """{"identity": what must not change on resume, "schedule": what may, when the user allows it}."""
    config = {k: v for k, v in plain(model_config).items() if k not in ("name", "hf_repo")}  # labels, not shape
    identity = {
        "base weights": weights_identity(base_weights),
        "model config": config,
        "mode": mode,
        "lora": plain(lora),
        "quantize": quantize,
        "optimizer": optimizer,
        "badam": plain(badam) if optimizer != "adamw" else None,
        # Not the micro-batch size: how a step is split over micro-batches and devices changes no result (tested),
        # and a run may resume on another number of devices.
        "global batch size": train.global_batch_size,
        "seed": seed,
        "training data": records_hash(records),
        "prompt style": plain(prompt_style),
        "max_seq_length": max_seq_length,
        "mask_prompt": mask_prompt,
        "dropbp": plain(dropbp),
        "packing": packing,  # the token budget of a packed micro-batch, or None (padded rows)
    }
    schedule = {
        "max_steps": max_steps,
        "learning_rate": train.learning_rate,
        "lr_warmup_steps": train.lr_warmup_steps,
        "min_lr_ratio": train.min_lr_ratio,
        "weight_decay": train.weight_decay,
        "beta1": train.beta1,
        "beta2": train.beta2,
        "max_norm": train.max_norm,
    }
    return {"identity": identity, "schedule": schedule}


def fingerprint_problems(
    saved: Mapping[str, Mapping[str, Any]], current: Mapping[str, Mapping[str, Any]], allow_new_schedule: bool
) -> list[str]:
    """Differences between a checkpoint's fingerprint and the resuming run's, in words; empty when it may resume."""
    problems = [_difference(key, saved["identity"].get(key), value)
                for key, value in current["identity"].items() if saved["identity"].get(key) != value]
    changed = [_difference(key, saved["schedule"].get(key), value)
               for key, value in current["schedule"].items() if saved["schedule"].get(key) != value]
    if changed and not allow_new_schedule:
        problems += [f"{c} (pass --train.allow_new_schedule true to resume with the new schedule)" for c in changed]
    return problems


def _difference(key: str, saved: Any, now: Any) -> str:
    if isinstance(saved, dict) and isinstance(now, dict):
        keys = [k for k in dict.fromkeys([*saved, *now]) if saved.get(k) != now.get(k)]
        return f"{key}: " + ", ".join(f"{k} {saved.get(k)!r} -> {now.get(k)!r}" for k in keys)
    if key in ("base weights", "training data"):
        return f"{key} differ from the checkpoint's (another file or other contents)"
    return f"{key}: {saved!r} in the checkpoint, {now!r} now"
