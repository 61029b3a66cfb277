"""Kill a real fine-tuning run at random moments and check that nothing is lost or silently wrong.

    python scripts/chaos.py --kills 33           # kill -9 and Ctrl-C a demo run 33 times, resuming after each

A straight run of `finetune/<mode>.py` on the bundled demo model gives the reference. Then the same command runs
with `--resume auto` into a second directory and is killed (SIGKILL, or SIGINT for a share of the kills) at a
random moment, again and again, until it finishes. After every kill: the newest checkpoint must load (weights and
training state, `weights_only=True`); at the end: the final weights must equal the straight run's bit for bit, no
temporary directory may be left, and metrics.csv must hold every step once. The figures are printed as a table.
"""

from __future__ import annotations

import csv
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main(
    kills: int = 33,
    mode: str = "full",
    max_steps: int = 200,
    work_dir: Path = Path("out/chaos"),
    sigint_share: float = 0.25,
    seed: int = 0,
    timeout_s: float = 900.0,
    max_wait_s: float = 12.0,
) -> dict[str, int]:
    """Kill a demo run `kills` times at random moments, resuming after each; check and report.

    Args:
        kills: how many times to interrupt the run before letting it finish.
        mode: full, lora or qlora (finetune/<mode>.py on the bundled demo model).
        max_steps: the run's length (a checkpoint after every step, the newest 3 kept).
        work_dir: where the straight and the interrupted runs go (emptied first).
        sigint_share: share of the interruptions that are Ctrl-C (SIGINT) instead of kill -9.
        seed: seed of the kill moments.
        timeout_s: the most a single run may take before the check fails.
        max_wait_s: each kill lands at a uniform random moment up to this many seconds after the process starts
            (start-up, loading and resuming take a few seconds; a checkpoint is written after every step).

    Returns:
        The figures: kills, SIGINTs, inexact resumes (0 or 1: the final weights differ), leftovers, metrics rows
        missing or duplicated, checkpoints that failed to load.
    """
    import torch

    work_dir = Path(work_dir)
    shutil.rmtree(work_dir, ignore_errors=True)
    work_dir.mkdir(parents=True)
    rng = random.Random(seed)
    t0 = time.perf_counter()
    _run(mode, work_dir / "straight", max_steps, resume=False, timeout=timeout_s)
    straight_s = time.perf_counter() - t0
    chaos = work_dir / "chaos"
    figures = {"kills": 0, "sigint": 0, "unloadable": 0, "finished_early": 0}
    for _ in range(kills):
        proc = _start(mode, chaos, max_steps, resume=True)
        # Start-up, loading, resuming, training and saving all get hit, and every process leaves work for the next.
        time.sleep(rng.uniform(0.3, min(max_wait_s, 0.6 * straight_s)))
        if proc.poll() is not None:  # it ended before the kill: complete, or failed (which the check reports)
            if proc.returncode != 0:
                raise RuntimeError(f"A resumed run failed (exit {proc.returncode}):\n"
                                   f"{proc.stderr.read().decode()[-3000:]}")
            figures["finished_early"] += 1
            break
        sig = signal.SIGINT if rng.random() < sigint_share else signal.SIGKILL
        proc.send_signal(sig)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise RuntimeError(f"The run did not stop within {timeout_s} s after {sig.name}")
        figures["kills"] += 1
        figures["sigint"] += sig == signal.SIGINT
        figures["unloadable"] += not _newest_loads(chaos)
    _run(mode, chaos, max_steps, resume=True, timeout=timeout_s)
    a, b = _final_weights(work_dir / "straight"), _final_weights(chaos)
    figures["inexact_resume"] = int(a.keys() != b.keys() or any(not torch.equal(a[k], b[k]) for k in a))
    figures["leftovers"] = len([p for p in chaos.rglob(".*") if ".tmp" in p.name or ".old" in p.name])
    steps = [int(r["step"]) for r in csv.DictReader((chaos / "logs" / "metrics.csv").open()) if r.get("loss")]
    figures["metrics_rows_wrong"] = len(steps) - len(set(steps)) + len(set(range(1, max_steps + 1)) - set(steps))
    print("| kills | of which Ctrl-C | unloadable newest checkpoint | inexact resume | leftover temp dirs "
          "| metrics rows missing or doubled |")
    print("|---|---|---|---|---|---|")
    print(f"| {figures['kills']} | {figures['sigint']} | {figures['unloadable']} | {figures['inexact_resume']} "
          f"| {figures['leftovers']} | {figures['metrics_rows_wrong']} |")
    return figures


def _command(mode: str, out_dir: Path, max_steps: int, resume: bool) -> list[str]:
    cmd = [sys.executable, str(ROOT / "finetune" / f"{mode}.py"), "--out_dir", str(out_dir),
           "--train.max_steps", str(max_steps), "--train.save_interval", "1", "--train.keep_last", "3",
           "--eval.interval", "1000", "--eval.exact_match", "0", "--eval.max_new_tokens", "2"]
    return cmd + (["--resume", "auto"] if resume else [])


def _env() -> dict[str, str]:
    # One thread: the same arithmetic in every process, so resumed runs can be compared bit for bit.
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _start(mode: str, out_dir: Path, max_steps: int, resume: bool) -> subprocess.Popen:
    return subprocess.Popen(_command(mode, out_dir, max_steps, resume), cwd=ROOT, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _run(mode: str, out_dir: Path, max_steps: int, resume: bool, timeout: float) -> None:
    done = subprocess.run(_command(mode, out_dir, max_steps, resume), cwd=ROOT, env=_env(), timeout=timeout,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(_command(mode, out_dir, max_steps, resume))} failed:\n{done.stderr[-3000:]}")


def _newest_loads(out_dir: Path) -> bool:
    """Whether the newest complete step checkpoint loads: its training state and its weights."""
    import torch

    from lit_model.train import checkpoints as ckpt

    found = ckpt.list_checkpoints(out_dir)
    if not found:
        return True  # killed before the first save: nothing to load yet
    newest = found[-1]
    try:
        ckpt.load_training_state(newest)
        weights = next(p for p in (newest / "lit_model.pth", newest / "lit_model.lora.pth") if p.is_file())
        torch.load(weights, weights_only=True, mmap=True)
        return True
    except Exception as err:  # noqa: BLE001 - any failure to load counts, and is reported
        print(f"newest checkpoint {newest} does not load: {err}", file=sys.stderr)
        return False


def _final_weights(out_dir: Path) -> dict:
    import torch

    final = out_dir / "final"
    path = final / "lit_model.pth" if (final / "lit_model.pth").is_file() else final / "lit_model.lora.pth"
    return torch.load(path, weights_only=True)


if __name__ == "__main__":
    from lit_model.cli import script_main

    script_main(main)
