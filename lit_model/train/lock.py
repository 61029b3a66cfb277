"""One run per output directory: `OutDirLock(out_dir, rank)`, held for the whole run by rank 0.

Two runs writing to the same out_dir overwrite each other's checkpoints and metrics, and `--resume auto` then takes
a mixture. So a run takes an exclusive lock on `out_dir/.lit-run.lock` and a second run on the same directory stops
at once, naming the owner (pid, host, start time, command) and what to do.

Why `fcntl.flock` rather than creating the file with O_CREAT | O_EXCL: the kernel releases a flock when its process
dies, however it dies (kill -9, out of memory, a node crash on a local disk), so a lock can never outlive its run and
there is nothing to guess. With O_EXCL the file itself is the lock, a killed run leaves it behind, and whether it is
stale must be inferred from its pid, which is wrong across hosts (a shared file system) and when the pid was reused.
The file still records its owner, for the message, and a file whose lock is free is taken over with a note.
On Linux, flock over NFS is emulated with byte-range locks, which the server arbitrates, so it works across hosts.
Where the file system has no locks at all (flock fails with ENOLCK/EOPNOTSUPP), the pid in the file decides
(the O_EXCL rule), with a warning.

Multi-process runs: only global rank 0 takes the lock (the others write nothing to out_dir themselves and must not
contend for it); pass `rank`. Needs the standard library only (fcntl: POSIX).
"""

from __future__ import annotations

import errno
import json
import os
import socket
import sys
import time
import warnings
from pathlib import Path
from types import TracebackType
from typing import Any, Optional

LOCK_NAME = ".lit-run.lock"


class OutDirInUseError(RuntimeError):
    """Another live run holds the output directory's lock."""


class RunLockWarning(UserWarning):
    """A lock left by a run that is gone was taken over, or the file system cannot lock."""


class OutDirLock:
    """Exclusive use of `out_dir` by one run, as a context manager (or `acquire()` / `release()`).

    `rank`: the process's global rank; only rank 0 locks, any other rank makes this a no-op. The lock file holds the
    owner's pid, host, start time and command line; it is removed on release (and on an exception leaving the `with`
    block). A second OutDirLock on the same directory, in this process or another, raises OutDirInUseError at once.
    """

    def __init__(self, out_dir: str | Path, rank: int = 0) -> None:
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / LOCK_NAME
        self.rank = rank
        self._fd: Optional[int] = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> "OutDirLock":
        """Take the lock (rank 0 only); raise OutDirInUseError naming the owner if another run has it."""
        if self.rank != 0 or self._fd is not None:
            return self
        import fcntl

        self.out_dir.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    raise OutDirInUseError(self._in_use_message(_read_owner(fd))) from None
                except OSError as err:
                    if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                        raise
                    self._without_flock(fd)
            except BaseException:
                os.close(fd)
                raise
            # Locked. The owner may have unlinked the file (releasing it) between our open and our lock: then we hold
            # a lock on a file nobody else will ever open; start again on the path's current file.
            if _same_file(fd, self.path):
                break
            os.close(fd)
        previous = _read_owner(fd)
        if previous and previous.get("pid") != os.getpid():
            warnings.warn(
                f"Took over the lock of {self.out_dir} left by {_describe(previous)}, which no longer holds it (its "
                "run ended without releasing it, e.g. killed); its checkpoints are there as it left them.",
                RunLockWarning, stacklevel=2,
            )
        owner = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                 "command": " ".join(sys.argv)}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(owner) + "\n").encode(), 0)
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        """Give the lock up and remove the lock file (unlinked while still locked, so no one locks a dead file)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            if _same_file(fd, self.path):
                self.path.unlink(missing_ok=True)
        finally:
            os.close(fd)  # closing the last descriptor releases the flock

    def __enter__(self) -> "OutDirLock":
        return self.acquire()

    def __exit__(
        self, exc_type: Optional[type[BaseException]], exc: Optional[BaseException], tb: Optional[TracebackType]
    ) -> None:
        self.release()

    def _in_use_message(self, owner: dict[str, Any]) -> str:
        who = _describe(owner) if owner else "another process (its lock file names no owner yet)"
        if owner.get("pid") == os.getpid() and owner.get("host") == socket.gethostname():
            return (f"{self.out_dir} is already in use by this process (pid {os.getpid()}): a run started while "
                    "another in the same process (e.g. a notebook cell run twice) is still going. Let it finish, or "
                    "pass another --out_dir.")
        return (
            f"{self.out_dir} is in use by another run: {who}. Two runs in one output directory overwrite each other's "
            f"checkpoints. Wait for that run to finish or stop it (kill {owner.get('pid', 'PID')}), or pass another "
            f"--out_dir. The lock ({self.path}) is released by the system when that process exits, so this is a "
            "live run, not a leftover."
        )

    def _without_flock(self, fd: int) -> None:
        """No locks on this file system: a file naming a live process on this host means in use (the O_EXCL rule)."""
        owner = _read_owner(fd)
        here = owner.get("host") == socket.gethostname()
        pid = owner.get("pid")
        if isinstance(pid, int) and pid != os.getpid() and (not here or _pid_alive(pid)):
            raise OutDirInUseError(self._in_use_message(owner))
        warnings.warn(f"The file system of {self.out_dir} does not support locks: {self.path} guards it by its pid "
                      "only, which cannot see runs on other hosts.", RunLockWarning, stacklevel=3)


def _read_owner(fd: int) -> dict[str, Any]:
    """The owner recorded in the lock file (empty when none or unreadable)."""
    try:
        text = os.pread(fd, 1 << 16, 0).decode("utf-8", "replace")
        owner = json.loads(text) if text.strip() else {}
    except (OSError, ValueError):
        return {}
    return owner if isinstance(owner, dict) else {}


def _describe(owner: dict[str, Any]) -> str:
    parts = [f"pid {owner.get('pid', '?')}"]
    if owner.get("host"):
        parts.append(f"on host {owner['host']}")
    if owner.get("started"):
        parts.append(f"started {owner['started']}")
    text = " ".join(parts)
    return f"{text} ({owner['command']})" if owner.get("command") else text


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def rank_from_env() -> int:
    """Whether this process is global rank 0, as the launchers' variables tell before any process group exists: 0 for
    rank 0, else a positive rank. For taking the lock before Fabric starts, e.g. `OutDirLock(out_dir,
    rank_from_env())`. Any of RANK (torchrun, `fabric run`), SLURM_PROCID, LOCAL_RANK, NODE_RANK or GROUP_RANK that is
    not 0 means not rank 0 (the processes Fabric spawns inherit SLURM_PROCID=0 but get LOCAL_RANK >= 1); with none
    set this is the only process, rank 0."""
    for name in ("RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK"):
        value = os.environ.get(name, "").strip()
        if value.isdigit() and int(value) > 0:
            return int(value)
    return 0
