"""Crash-safe training checkpoints and resume: find, write, prune and read `step-NNNNNN/` directories.

A training checkpoint is a self-contained checkpoint directory (weights, config, tokenizer, prompt style,
hyper-parameters: generate and merge work on it as on `final/`) plus `training_state.pth`: optimizer, scheduler,
step, data position, RNG states and history, all plain tensors and containers so it loads with `weights_only=True`.
Directories are written under a temporary name and renamed into place, so a crash or a full disk leaves either the
previous complete checkpoint or the new complete one, never a half-written directory that looks finished.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from lit_model.checkpoint_io import fsync_dir

STATE_NAME = "training_state.pth"
STEP_DIR = re.compile(r"^step-(\d{6,})$")


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


def list_checkpoints(out_dir: Path) -> list[Path]:
    """Complete training checkpoints in `out_dir`, oldest first (temporary directories never match)."""
    if not Path(out_dir).is_dir():
        return []
    found = [p for p in Path(out_dir).iterdir() if STEP_DIR.match(p.name) and (p / STATE_NAME).is_file()]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def resolve_resume(resume: Optional[str | Path], out_dir: Path) -> Optional[Path]:
    """The checkpoint to resume from: None, "auto" (the latest in out_dir, if any) or a path."""
    if resume is None or resume is False:
        return None
    if str(resume) == "auto":
        found = list_checkpoints(out_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / STATE_NAME).is_file():
        raise FileNotFoundError(
            f"--resume {str(path)!r} is not a training checkpoint (no {STATE_NAME}). Pass a step-NNNNNN directory "
            f"written by a run, or --resume auto to take the latest in --out_dir."
        )
    return path


def write_checkpoint(target: Path, write_contents: Callable[[Path], None]) -> Path:
    """Create `target` atomically: `write_contents(tmp_dir)` fills a temporary sibling, which is then renamed.

    If `write_contents` raises (a crash, a full disk), the temporary directory is removed and `target`, or the
    previous checkpoint, is left as it was.
    """
    target = Path(target)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        write_contents(tmp)
        fsync_dir(tmp)
        replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def replace_dir(src: Path, dst: Path) -> None:
    """Move a finished directory into place so `dst` is always either the old or the new complete version."""
    old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
    if dst.exists():
        os.replace(dst, old)
    os.replace(src, dst)
    fsync_dir(dst.parent)
    shutil.rmtree(old, ignore_errors=True)


def prune(out_dir: Path, keep_last: Optional[int]) -> list[Path]:
    """Delete all but the newest `keep_last` training checkpoints; returns the removed ones."""
    if keep_last is None:
        return []
    found = list_checkpoints(out_dir)
    removed = found[: max(0, len(found) - keep_last)]
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed


def rng_states() -> dict[str, Any]:
    """The global RNG states a training step consumes (Python, torch CPU, every CUDA device)."""
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_states(state: dict[str, Any]) -> None:
    random.setstate(_as_tuple(state["python"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_training_state(checkpoint: Path) -> dict[str, Any]:
    """Read `training_state.pth` (plain containers and tensors only: weights_only=True)."""
    return torch.load(Path(checkpoint) / STATE_NAME, map_location="cpu", weights_only=True)


def _as_tuple(value: Any) -> Any:
    """random.setstate wants tuples; a round trip through some serialisers gives lists."""
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value
