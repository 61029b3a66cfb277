"""Training life cycle: resume reproduces the uninterrupted run, saves are atomic, Ctrl-C saves, NaN stops, outputs."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from lit_model.train import checkpoints as ckpt
from lit_model.train.args import EvalArgs
from lit_model.train.loop import NonFiniteLossError
from tests.finetune_utils import (  # noqa: F401 (tiny_checkpoint is a fixture)
    data_args, final_weights, load_script, logged_losses, short_train, tiny_checkpoint,
)

MODES = {"full": {}, "lora": {}, "qlora": {"quantize": "bnb.nf4"}}


def run(mode: str, ckpt_dir: Path, out: Path, **kw):
    script = load_script("finetune/full.py" if mode == "full" else "finetune/lora.py")
    extra = {} if mode == "full" else MODES[mode]
    train = kw.pop("train", short_train(max_steps=4, save_interval=2))
    return script.setup(checkpoint_dir=ckpt_dir, out_dir=out, data=data_args(ckpt_dir), train=train,
                        eval=EvalArgs(interval=100, exact_match=0, max_new_tokens=2), **extra, **kw)


@pytest.mark.parametrize("mode", list(MODES))
def test_resume_continues_as_if_never_interrupted(mode, tiny_checkpoint, tmp_path) -> None:
    run(mode, tiny_checkpoint, tmp_path / "straight")
    middle = tmp_path / "straight" / "step-000002"
    assert (middle / ckpt.STATE_NAME).is_file()
    run(mode, tiny_checkpoint, tmp_path / "resumed", resume=str(middle))
    a, b = final_weights(tmp_path / "straight"), final_weights(tmp_path / "resumed")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=0, rtol=0)
    la, lb = logged_losses(tmp_path / "straight"), logged_losses(tmp_path / "resumed")
    assert set(lb) == {3, 4}
    assert [la[s] for s in (3, 4)] == [lb[s] for s in (3, 4)]


def test_ctrl_c_saves_then_auto_resume_finishes_the_same(tiny_checkpoint, tmp_path, monkeypatch) -> None:
    run("lora", tiny_checkpoint, tmp_path / "straight", train=short_train(max_steps=4))
    import lit_model.train.loop as training  # where fit looks log_step up

    original = training.log_step

    def interrupt_at_step_3(s, loop, *args):
        original(s, loop, *args)
        if loop.step == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(training, "log_step", interrupt_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        run("lora", tiny_checkpoint, tmp_path / "cut", train=short_train(max_steps=4))
    monkeypatch.setattr(training, "log_step", original)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "cut")] == ["step-000003"]
    run("lora", tiny_checkpoint, tmp_path / "cut", resume="auto", train=short_train(max_steps=4))
    a, b = final_weights(tmp_path / "straight"), final_weights(tmp_path / "cut")
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=0, rtol=0)


def test_interrupted_save_leaves_the_previous_checkpoint(tmp_path) -> None:
    target = tmp_path / "step-000002"
    ckpt.write_checkpoint(target, lambda d: (d / "a.txt").write_text("old") and (d / ckpt.STATE_NAME).write_text("x"))

    def crash_midway(d: Path) -> None:
        (d / "a.txt").write_text("new")
        raise OSError("No space left on device")

    with pytest.raises(OSError, match=r"Out of disk space while writing .*step-000002 .*previous step-000002 is "
                                      r"intact"):
        ckpt.write_checkpoint(target, crash_midway)
    assert (target / "a.txt").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["step-000002"]  # no temporary directory left behind
    with pytest.raises(OSError):
        ckpt.write_checkpoint(tmp_path / "step-000004", crash_midway)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-000002"]


def test_keep_last_prunes_old_checkpoints(tiny_checkpoint, tmp_path) -> None:
    run("lora", tiny_checkpoint, tmp_path, train=short_train(max_steps=4, save_interval=1, keep_last=2))
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-000003", "step-000004"]


def test_non_finite_loss_stops_with_a_pointer_to_the_last_good_checkpoint(tiny_checkpoint, tmp_path, monkeypatch):
    import lit_model.loss as loss_module

    original = loss_module.chunked_cross_entropy
    calls = {"n": 0}

    def nan_from_third_step(*args, **kwargs):
        calls["n"] += torch.is_grad_enabled()  # training micro-batches only, not validation
        out = original(*args, **kwargs)
        return out * float("nan") if calls["n"] > 4 else out  # 2 micro-batches per step

    monkeypatch.setattr(loss_module, "chunked_cross_entropy", nan_from_third_step)
    with pytest.raises(NonFiniteLossError, match=r"loss became nan at step 3.*resume with --resume .*step-000002"):
        run("full", tiny_checkpoint, tmp_path, train=short_train(max_steps=4, save_interval=2))


def test_metrics_csv_plot_and_sample_generation(tiny_checkpoint, tmp_path, capsys) -> None:
    run("lora", tiny_checkpoint, tmp_path, train=short_train(max_steps=4))
    rows = [row for path in (tmp_path / "logs").rglob("metrics.csv") for row in csv.DictReader(path.open())]
    assert {"loss", "lr", "tokens_per_s", "peak_memory_gb", "val_loss"} <= set(rows[0])
    assert (tmp_path / "loss.png").stat().st_size > 1000
    out = capsys.readouterr().out
    assert "Sample: 'Reverse the word" in out and "Final validation loss" in out


def test_resume_errors(tiny_checkpoint, tmp_path) -> None:
    with pytest.raises(ValueError, match="is not a training checkpoint"):
        run("lora", tiny_checkpoint, tmp_path, resume=str(tmp_path / "nope"))


# ---- crash leftovers, durability, broken checkpoints -----------------------------------------------------------------


def fake_checkpoint(out: Path, step: int) -> Path:
    """A training checkpoint as the loop writes one: weights with save_state_dict, state and YAML files plainly."""
    from lit_model.checkpoint_io import save_state_dict

    def fill(tmp: Path) -> None:
        save_state_dict({"w": torch.full((64,), float(step))}, tmp / "lit_model.pth")
        (tmp / "model_config.yaml").write_text("n_layer: 1\n")
        (tmp / "hyperparameters.yaml").write_text("mode: full\n")
        torch.save({"step": step, "optimizer": {"state": {}}}, tmp / ckpt.STATE_NAME)

    return ckpt.write_checkpoint(out / ckpt.step_dir_name(step), fill)


def dead_pid() -> int:
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", ""])
    child.wait()
    return child.pid


def test_cleanup_stale_removes_what_killed_runs_left_and_nothing_live(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    dead = dead_pid()
    fake_checkpoint(tmp_path, 2)
    (tmp_path / "final").mkdir()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        for name in (f".step-000004.tmp-{dead}", f".final.tmp-{dead}", f".final.old-{dead}",
                     f".step-000006.tmp-{os.getpid()}", f".step-000008.tmp-{live.pid}"):
            (tmp_path / name).mkdir()
            (tmp_path / name / "lit_model.pth").write_bytes(b"x" * 1000)
        (tmp_path / f".gone.old-{dead}").mkdir()  # killed between moving "gone" aside and renaming its successor in
        (tmp_path / f".gone.old-{dead}" / "a.txt").write_text("complete")
        with pytest.warns(ckpt.ResumeWarning, match=rf"Restored .*gone from \.gone\.old-{dead}"):
            removed = ckpt.cleanup_stale(tmp_path)
        assert sorted(p.name for p in removed) == sorted(
            [f".step-000004.tmp-{dead}", f".final.tmp-{dead}", f".final.old-{dead}", f".step-000006.tmp-{os.getpid()}"]
        )
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
            [f".step-000008.tmp-{live.pid}", "final", "gone", "step-000002"]  # a live process's directory stays
        )
        assert (tmp_path / "gone" / "a.txt").read_text() == "complete"
    finally:
        live.kill()
        live.wait()
    assert ckpt.pid_alive(os.getpid()) and not ckpt.pid_alive(dead) and not ckpt.pid_alive(0)


def test_every_file_of_a_checkpoint_is_fsynced_before_the_rename(tmp_path: Path, monkeypatch) -> None:
    import os

    synced: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    target = fake_checkpoint(tmp_path, 2)
    tmp_name = f".{target.name}.tmp-{os.getpid()}"
    synced_files = {Path(p).name for p in synced if Path(p).parent.name == tmp_name}
    assert synced_files >= {p.name for p in target.iterdir()}  # training_state.pth and the YAML files too
    assert str(tmp_path) in synced  # and the rename itself


def test_resume_auto_skips_a_broken_newest_checkpoint(tmp_path: Path) -> None:
    for step in (2, 4, 6):
        fake_checkpoint(tmp_path, step)
    (tmp_path / "step-000006" / ckpt.STATE_NAME).write_bytes(b"")  # emptied after it was written
    weights = tmp_path / "step-000004" / "lit_model.pth"
    weights.write_bytes(weights.read_bytes()[:200])  # cut short
    with pytest.warns(ckpt.ResumeWarning) as warned:
        assert ckpt.resolve_resume("auto", tmp_path) == tmp_path / "step-000002"
    messages = [str(w.message) for w in warned]
    assert len(messages) == 2
    assert "skips" in messages[0] and "step-000006" in messages[0] and "training_state.pth is corrupt" in messages[0]
    assert "step-000004" in messages[1] and "lit_model.pth is corrupt: it has 200 bytes" in messages[1]
    # Without checksums (checking off, or an older checkpoint) the structural check still finds them.
    with pytest.warns(ckpt.ResumeWarning) as warned:
        assert ckpt.resolve_resume("auto", tmp_path, verify=False) == tmp_path / "step-000002"
    messages = [str(w.message) for w in warned]
    assert "step-000006/training_state.pth cannot be read: the file is empty" in messages[0]
    assert "step-000004/lit_model.pth cannot be read: the file is truncated or not a torch checkpoint" in messages[1]


def test_resume_names_the_broken_file_of_a_chosen_checkpoint(tmp_path: Path) -> None:
    from lit_model.errors import CorruptFileError

    fake_checkpoint(tmp_path, 2)
    state = tmp_path / "step-000002" / ckpt.STATE_NAME
    state.write_bytes(state.read_bytes()[:-100])
    with pytest.raises(CorruptFileError, match=r"step-000002/training_state\.pth is corrupt: it has .* bytes but .* "
                                               r"were written \(truncated since\)\..*resume from an older step"):
        ckpt.resolve_resume(str(tmp_path / "step-000002"), tmp_path)
    with pytest.raises(CorruptFileError, match=r"training_state\.pth cannot be read: the file is truncated"):
        ckpt.resolve_resume(str(tmp_path / "step-000002"), tmp_path, verify=False)
    with pytest.warns(ckpt.ResumeWarning), pytest.raises(
        CorruptFileError, match=r"found 1 training checkpoints in .* and none is intact.*Delete them"
    ):
        ckpt.resolve_resume("auto", tmp_path)


def test_one_atomic_directory_writer(tmp_path: Path) -> None:
    from lit_model import checkpoint_io

    target = fake_checkpoint(tmp_path, 2)
    assert torch.equal(checkpoint_io.load_state_dict(target / "lit_model.pth")["w"], torch.full((64,), 2.0))
    ckpt.write_checkpoint(target, lambda d: (d / ckpt.STATE_NAME).write_text("x"))  # replaces
    assert sorted(p.name for p in target.iterdir()) == ["checksums.json", ckpt.STATE_NAME]
    with pytest.raises(FileExistsError, match=r"step-000002 exists and is not empty: write to another directory"):
        checkpoint_io.write_dir_atomically(target, lambda d: None)
    assert not hasattr(ckpt, "replace_dir")


def test_a_full_disk_names_the_last_intact_checkpoint(tmp_path: Path) -> None:
    import errno

    from lit_model.errors import DiskFullError

    fake_checkpoint(tmp_path, 2)

    def full(tmp: Path) -> None:
        (tmp / "lit_model.pth").write_bytes(b"x" * 4096)
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(DiskFullError, match=r"Out of disk space while writing .*step-000004 \(4\.1 KB of it had been "
                                            r"written when the disk filled; .* free there now\)\. The partial write was "
                                            r"removed and the last checkpoint, .*step-000002, is intact"):
        ckpt.write_checkpoint(tmp_path / "step-000004", full)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-000002"]


def test_a_checkpoint_without_weights_is_skipped(tmp_path: Path) -> None:
    fake_checkpoint(tmp_path, 2)
    (tmp_path / "step-000004").mkdir()
    torch.save({"step": 4}, tmp_path / "step-000004" / ckpt.STATE_NAME)
    with pytest.warns(ckpt.ResumeWarning, match=r"skips .*step-000004: .*step-000004 has no weights \(lit_model\.pth "
                                                r"or lit_model\.lora\.pth\); resume from another checkpoint"):
        assert ckpt.resolve_resume("auto", tmp_path) == tmp_path / "step-000002"
