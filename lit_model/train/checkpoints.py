"""Crash-safe training checkpoints and resume: find, write, prune and read `step-NNNNNN/` directories.

A training checkpoint is a self-contained checkpoint directory (weights, config, tokenizer, prompt style,
hyper-parameters: generate and merge work on it as on `final/`) plus `training_state.pth`: optimizer, scheduler,
step, data position, RNG states and history, all plain tensors and containers so it loads with `weights_only=True`.
Directories are written under a temporary name and renamed into place, so a crash or a full disk leaves either the
previous complete checkpoint or the new complete one, never a half-written directory that looks finished; their files
are fsynced and checksummed first (checkpoint_io.write_dir_atomically), and resume checks them (`verify_checkpoint`).
What a killed run leaves behind (temporary directories) is removed by `cleanup_stale`.
"""

from __future__ import annotations

import os
import pickle
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from lit_model.checkpoint_io import LEFTOVER_DIR, LORA_WEIGHTS_NAME, WEIGHTS_NAME, fsync_dir, write_dir_atomically
from lit_model.errors import CorruptFileError, load_failure_cause
from lit_model.integrity import verify_file

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


class ResumeWarning(UserWarning):
    """A checkpoint `--resume auto` skipped (unreadable), or leftovers of a killed run that were cleaned up."""


def resolve_resume(resume: Optional[str | Path], out_dir: Path, verify: Optional[bool] = None) -> Optional[Path]:
    """The checkpoint to resume from: None, "auto" (the newest intact one in out_dir, if any) or a path.

    Each candidate is checked with `verify_checkpoint` (`verify`: whether to compare checksums too; None: yes unless
    LIT_VERIFY_CHECKSUMS=0). "auto" skips a broken newest checkpoint (a half-written or damaged file), with a
    ResumeWarning naming it and why, and takes the newest intact one; a named checkpoint that is broken raises
    CorruptFileError naming the file.
    """
    if resume is None or resume is False:
        return None
    if str(resume) == "auto":
        found = list_checkpoints(out_dir)
        for candidate in reversed(found):
            try:
                verify_checkpoint(candidate, verify)
            except CorruptFileError as err:
                warnings.warn(f"--resume auto skips {candidate}: {err}", ResumeWarning, stacklevel=2)
                continue
            return candidate
        if found:  # starting afresh would silently overwrite them one by one: make the user decide
            raise CorruptFileError(
                f"--resume auto found {len(found)} training checkpoints in {out_dir} and none is intact (the warnings "
                "above say why). Delete them (or pass another --out_dir) to start afresh."
            )
        return None
    path = Path(resume)
    if not (path / STATE_NAME).is_file():
        raise FileNotFoundError(
            f"--resume {str(path)!r} is not a training checkpoint (no {STATE_NAME}). Pass a step-NNNNNN directory "
            f"written by a run, or --resume auto to take the latest in --out_dir."
        )
    verify_checkpoint(path, verify)
    return path


def verify_checkpoint(checkpoint: Path, verify: Optional[bool] = None) -> None:
    """Raise CorruptFileError unless the training checkpoint's files are intact.

    Intact: training_state.pth and the weight file (lit_model.pth or lit_model.lora.pth) exist, match checksums.json
    where it lists them, and open with `torch.load(mmap=True, weights_only=True)`. Memory-mapped, that reads the
    archive's index and the pickled structure (which a truncated or empty file fails), not the tensors' bytes, which
    the checksums cover; so the check costs one pass of hashing (1.8 GB/s measured) and no memory.
    """
    checkpoint = Path(checkpoint)
    weights = [checkpoint / name for name in (WEIGHTS_NAME, LORA_WEIGHTS_NAME) if (checkpoint / name).is_file()]
    if not weights:
        raise CorruptFileError(
            f"{checkpoint} has no weights ({WEIGHTS_NAME} or {LORA_WEIGHTS_NAME}); resume from another checkpoint."
        )
    for path in (checkpoint / STATE_NAME, *weights):
        if not path.is_file():
            raise CorruptFileError(f"{path} is missing; resume from another checkpoint.")
        verify_file(path, verify)
        try:
            if path.stat().st_size == 0:
                raise EOFError("the file is empty")
            _open_mapped(path)
        except (EOFError, OSError, RuntimeError, pickle.UnpicklingError) as err:
            raise CorruptFileError(
                f"{path} cannot be read: {load_failure_cause(err)}. Checkpoints are renamed into place only once "
                "complete, so it was damaged or replaced since: resume from an older step-NNNNNN directory."
            ) from err


def _open_mapped(path: Path) -> None:
    """Open a torch file memory-mapped (index and structure only); files in the pre-1.6 format are read whole."""
    try:
        torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except RuntimeError as err:
        if "mmap" not in str(err):
            raise
        torch.load(path, map_location="cpu", weights_only=True)


def write_checkpoint(target: Path, write_contents: Callable[[Path], None]) -> Path:
    """Create or replace the checkpoint directory `target` atomically (`checkpoint_io.write_dir_atomically`):
    `write_contents(tmp_dir)` fills a temporary sibling, whose files are checksummed and fsynced, then renamed.

    If `write_contents` raises (a crash, a full disk), the temporary directory is removed and `target`, or the
    previous checkpoint, is left as it was.
    """
    target = Path(target)
    earlier = [p for p in list_checkpoints(target.parent) if p.name != target.name]
    if target.exists():
        intact = f"the previous {target.name} is intact"
    elif earlier:
        intact = f"the last checkpoint, {earlier[-1]}, is intact (resume from it with --resume auto)"
    else:
        intact = None
    return write_dir_atomically(target, write_contents, replace=True, intact=intact)


def cleanup_stale(out_dir: Path) -> list[Path]:
    """Remove what killed runs left in `out_dir`: ".NAME.tmp-PID" and ".NAME.old-PID" directories (each can be as big
    as a checkpoint) whose process is gone, or is this one (a previous holder of our PID, e.g. in a restarted
    container: we have written nothing yet). Returns what was removed.

    Call it at the start of a run, on rank 0, after taking the output directory's lock (lit_model.run_lock), so no
    other run can be writing there. A leftover whose PID is a live process other than ours is kept: it may be a run
    writing without the lock. One case is repaired instead of removed: a ".NAME.old-PID" whose NAME is missing was
    killed between moving the old version aside and renaming the new one in; the old version is complete, so it is
    put back as NAME (with a ResumeWarning), and the unfinished ".NAME.tmp-PID" is then removed like any other.
    """
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    removed = []
    leftovers = sorted(p for p in out_dir.iterdir() if LEFTOVER_DIR.match(p.name))
    for path in sorted(leftovers, key=lambda p: LEFTOVER_DIR.match(p.name).group("kind") != "old"):  # "old" first
        match = LEFTOVER_DIR.match(path.name)
        pid = int(match.group("pid"))
        if pid != os.getpid() and pid_alive(pid):
            continue
        original = out_dir / match.group("name")
        if match.group("kind") == "old" and path.is_dir() and not original.exists():
            os.replace(path, original)
            fsync_dir(out_dir)
            warnings.warn(f"Restored {original} from {path.name}, left by process {pid} killed while replacing it",
                          ResumeWarning, stacklevel=2)
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def pid_alive(pid: int) -> bool:
    """Whether a process with this PID exists on this machine (os.kill(pid, 0): it signals nothing, only checks)."""
    if pid <= 0:
        return False  # 0 and negative numbers mean process groups to os.kill, never one process
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, owned by another user
    except OSError:
        return True  # cannot tell: keep what might be a live run's
    return True


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


def load_training_state(checkpoint: Path, verify: Optional[bool] = False) -> dict[str, Any]:
    """Read `training_state.pth` (plain containers and tensors only: weights_only=True).

    `verify` (default False: `resolve_resume` has checked it already) compares its checksum first (see
    `verify_checkpoint`); a damaged file raises CorruptFileError naming it.
    """
    path = Path(checkpoint) / STATE_NAME
    verify_file(path, verify)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (EOFError, RuntimeError, pickle.UnpicklingError) as err:
        raise CorruptFileError(
            f"{path} cannot be read: {load_failure_cause(err)}. Resume from an older step-NNNNNN directory."
        ) from err


def _as_tuple(value: Any) -> Any:
    """random.setstate wants tuples; a round trip through some serialisers gives lists."""
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value
