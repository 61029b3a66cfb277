"""Errors users see: the types, and low-level failures (torch.load, a full disk) turned into messages that name the
file, say what is wrong with it and what to do. Needs the standard library only.

Every message built here avoids one piece of advice on purpose: torch's "re-run with `weights_only=False`" (and its
`add_safe_globals` variant). Unpickling an untrusted file runs arbitrary code, so we never give, or echo, that advice.
"""

from __future__ import annotations

import errno
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Optional


class CorruptFileError(ValueError):
    """A file that exists but is not what it should be: truncated, empty, garbled, or failing its checksum."""


class DiskFullError(OSError):
    """A write failed because the file system ran out of space (or quota); the message says what is intact."""


# ---- torch.load failures --------------------------------------------------------------------------------------------

# Sentences of torch's weights_only error that tell the reader how to unpickle anyway (see the module docstring).
_UNSAFE_ADVICE = re.compile(
    r"weights_only|safe_globals|allowlist|can still be loaded|trust|two options|recommended steps|"
    r"types accepted by default",
    re.IGNORECASE,
)
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def strip_unsafe_advice(text: str) -> str:
    """`text` without torch's advice to load with weights_only=False or to allow-list globals (module docstring).

    Works sentence by sentence, line by line, so the cause ("Unsupported global: GLOBAL __main__.Foo was not an
    allowed global by default.") survives while the way around the check does not.
    """
    kept_lines = []
    for line in _ANSI.sub("", text).splitlines():
        sentences = re.split(r"(?<=[.!?])\s+", line.strip())
        kept = [s for s in sentences if s and not _UNSAFE_ADVICE.search(s)]
        if kept:
            kept_lines.append(" ".join(kept))
    return "\n".join(kept_lines)


def load_failure_cause(err: BaseException) -> str:
    """One line saying why torch.load (or safetensors) failed, in words a user can act on."""
    text = str(err).strip()
    if isinstance(err, EOFError) or "Ran out of input" in text:
        return "the file is empty or ends early (EOFError)"
    if "central directory" in text or (isinstance(err, OSError) and err.errno == errno.EINVAL):
        # A zip archive keeps its index at the end: torch cannot find it in a file cut short (with mmap the failed
        # map says only "[Errno 22] Invalid argument").
        return "the file is truncated or not a torch checkpoint (its zip index, written last, is missing)"
    if "PytorchStreamReader" in text:
        return f"the file is damaged ({text.splitlines()[0].split('. ')[0]})"
    if "Unsupported global" in text or "Weights only load failed" in text:
        match = re.search(r"Unsupported global: GLOBAL (\S+)", text)
        what = f"an object of type {match.group(1)}" if match else "objects other than tensors and plain containers"
        return f"it holds {what}, which is refused because unpickling it could run arbitrary code"
    cleaned = strip_unsafe_advice(text)
    first = cleaned.splitlines()[0] if cleaned else ""
    return f"{type(err).__name__}: {first}" if first else type(err).__name__


# ---- a full disk ----------------------------------------------------------------------------------------------------

_NO_SPACE_ERRNOS = {errno.ENOSPC, errno.EDQUOT}
_NO_SPACE_TEXT = re.compile(r"No space left on device|Disk quota exceeded|os error (?:28|122)\b", re.IGNORECASE)
# What torch's C++ writer says when a write comes up short; on its own it does not say why.
_SHORT_WRITE_TEXT = re.compile(r"iostream error|file write failed|unexpected pos|PytorchStreamWriter", re.IGNORECASE)
_NEARLY_FULL_BYTES = 64 << 20


def is_disk_full(err: BaseException, path: Optional[str | Path] = None) -> bool:
    """Whether `err` (or an error it was raised from) means the disk or quota is full.

    An OSError with ENOSPC/EDQUOT, or its text, anywhere in the chain of causes; or one of torch's short-write errors
    ("basic_ios::clear: iostream error", "unexpected pos ...", which carry no errno) while the file system of `path`
    has almost nothing left.
    """
    seen: set[int] = set()
    chain: list[BaseException] = []
    current: Optional[BaseException] = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        chain.append(current)
        current = current.__cause__ or current.__context__
    for e in chain:
        if isinstance(e, OSError) and e.errno in _NO_SPACE_ERRNOS:
            return True
        if _NO_SPACE_TEXT.search(str(e)):
            return True
    if path is not None and any(_SHORT_WRITE_TEXT.search(str(e)) for e in chain):
        free = free_bytes(path)
        return free is not None and free < _NEARLY_FULL_BYTES
    return False


def free_bytes(path: str | Path) -> Optional[int]:
    """Bytes an unprivileged user can still write on the file system of `path` (its nearest existing parent)."""
    path = Path(path)
    for candidate in (path, *path.parents):
        if candidate.exists():
            try:
                return shutil.disk_usage(candidate).free
            except OSError:
                return None
    return None


def disk_full_error(
    target: str | Path, written_bytes: Optional[int] = None, needed_bytes: Optional[int] = None,
    intact: Optional[str] = None,
) -> DiskFullError:
    """The error to raise when writing `target` ran out of space: how much was needed (when known), what is intact."""
    target = Path(target)
    free = free_bytes(target)
    facts = []
    if needed_bytes is not None:
        facts.append(f"it needs {_size(needed_bytes)}")
    if written_bytes is not None:
        facts.append(f"{_size(written_bytes)} of it had been written when the disk filled")
    if free is not None:
        facts.append(f"{_size(free)} is free there now")
    detail = f" ({'; '.join(facts)})" if facts else ""
    intact = intact or "files written before it are intact"
    error = DiskFullError(
        f"Out of disk space while writing {target}{detail}. The partial write was removed and {intact}. Free some "
        "space on that disk (or write elsewhere, e.g. another --out_dir), then run again; a training run continues "
        "from its last checkpoint with --resume auto."
    )
    error.errno = errno.ENOSPC  # set after: OSError(errno, text) would print as "[Errno 28] text"
    return error


@contextmanager
def disk_full_as_error(
    target: str | Path, needed_bytes: Optional[int] = None, intact: Optional[str] = None
) -> Iterator[None]:
    """Turn a full-disk failure inside the block into a `DiskFullError` about `target`; other errors pass unchanged.

    Wrap any save with it, e.g. `with disk_full_as_error(path, needed_bytes=n): torch.save(state, path)`; clean up
    partial files in an outer `except` (the error is raised from the original one, which stays in the traceback).
    """
    try:
        yield
    except DiskFullError:
        raise
    except Exception as err:  # OSError, torch's RuntimeError, safetensors' SafetensorError, ...
        if not is_disk_full(err, target):
            raise
        raise disk_full_error(target, needed_bytes=needed_bytes, intact=intact) from err


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"
