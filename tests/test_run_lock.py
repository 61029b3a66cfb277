"""One run per output directory: a second lock fails at once naming the owner, stale locks are taken over, the lock
goes away on exit, on an exception and when its process is killed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from lit_model.train.lock import LOCK_NAME, OutDirInUseError, OutDirLock, RunLockWarning, rank_from_env

REPO = Path(__file__).resolve().parents[1]
# Loads lit_model/train/lock.py by its path: it needs the standard library only, and importing the package would import torch.
HOLDER = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location("run_lock", sys.argv[2])
run_lock = importlib.util.module_from_spec(spec)
spec.loader.exec_module(run_lock)
with run_lock.OutDirLock(sys.argv[1]):
    print("locked", flush=True)
    sys.stdin.readline()  # hold it until the parent closes our stdin (or kills us)
"""


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", ""])
    child.wait()
    return child.pid


def test_a_second_lock_on_the_same_directory_fails_naming_the_owner(tmp_path: Path) -> None:
    with OutDirLock(tmp_path) as first:
        assert first.held
        owner = json.loads((tmp_path / LOCK_NAME).read_text())
        assert owner["pid"] == os.getpid() and owner["host"] and owner["started"]
        with pytest.raises(OutDirInUseError, match=rf"already in use by this process \(pid {os.getpid()}\).*another "
                                                   r"--out_dir"):
            OutDirLock(tmp_path).acquire()
    assert not (tmp_path / LOCK_NAME).exists()  # released: the file is gone
    with OutDirLock(tmp_path):  # and the directory can be locked again
        pass


def test_the_lock_is_released_on_an_exception(tmp_path: Path) -> None:
    with pytest.raises(KeyError):
        with OutDirLock(tmp_path):
            raise KeyError("crash")
    assert not (tmp_path / LOCK_NAME).exists()
    OutDirLock(tmp_path).acquire().release()


def test_a_stale_lock_file_of_a_dead_process_is_taken_over(tmp_path: Path) -> None:
    pid = dead_pid()
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": pid, "host": "node7", "started": "yesterday"}))
    with pytest.warns(RunLockWarning, match=rf"Took over the lock of .* left by pid {pid} on host node7 started "
                                            r"yesterday, which no longer holds it"):
        lock = OutDirLock(tmp_path).acquire()
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    lock.release()


def test_only_rank_zero_locks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with OutDirLock(tmp_path, rank=0):
        other = OutDirLock(tmp_path, rank=1).acquire()  # no contention, no file of its own
        assert not other.held
        other.release()
        assert (tmp_path / LOCK_NAME).exists()
    for name in ("RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert rank_from_env() == 0
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("LOCAL_RANK", "1")  # a process Fabric spawned inside a one-task SLURM job
    assert rank_from_env() == 1


def test_another_process_holding_the_lock_blocks_until_it_exits_or_dies(tmp_path: Path) -> None:
    for end in ("exit", "kill"):
        holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path), str(REPO / "lit_model/train/lock.py")],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            assert holder.stdout.readline().strip() == "locked"
            with pytest.raises(OutDirInUseError, match=rf"is in use by another run: pid {holder.pid} on host .*"
                                                       rf"kill {holder.pid}\).*another --out_dir"):
                OutDirLock(tmp_path).acquire()
            if end == "exit":
                holder.stdin.close()
            else:
                holder.send_signal(signal.SIGKILL)  # no clean-up runs: the kernel drops the flock
            holder.wait(timeout=30)
        finally:
            holder.kill()
        if end == "exit":
            with OutDirLock(tmp_path):
                pass
        else:
            with pytest.warns(RunLockWarning, match=rf"left by pid {holder.pid}"):
                OutDirLock(tmp_path).acquire().release()


def test_without_file_system_locks_the_pid_decides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno
    import fcntl
    import socket

    def no_locks(fd: int, operation: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": live.pid, "host": socket.gethostname()}))
        with pytest.raises(OutDirInUseError, match=rf"is in use by another run: pid {live.pid}"):
            OutDirLock(tmp_path).acquire()
    finally:
        live.kill()
        live.wait()
    with pytest.warns(RunLockWarning) as warned:  # the process is gone now
        lock = OutDirLock(tmp_path).acquire()
    lock.release()
    messages = [str(w.message) for w in warned]
    assert "does not support locks" in messages[0] and "guards it by its pid only" in messages[0]
    assert f"Took over the lock of {tmp_path} left by pid {live.pid}" in messages[1]
