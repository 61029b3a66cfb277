"""Faults injected in-process: Ctrl-C between the optimizer update and the step counter, resumes that are not the
same run, metrics.csv across an interruption, the demo data written while other ranks read it."""

from __future__ import annotations

import csv
import os
import signal
from pathlib import Path

import pytest
import torch

from lit_model.train import checkpoints as ckpt
from lit_model.peft.lora import LoRAConfig
from tests.finetune_utils import final_weights, logged_losses, short_train, tiny_checkpoint  # noqa: F401
from tests.test_resume import run


def test_ctrl_c_inside_the_optimizer_update_still_resumes_exactly(tiny_checkpoint, tmp_path, monkeypatch) -> None:
    """SIGINT arrives after the weights changed but before the step counter, RNG and data position do: the save
    must describe one state (here: after the step), so the resumed run equals the straight one bit for bit."""
    import lit_model.train.setup as training  # where build_session looks make_optimizer up

    run("full", tiny_checkpoint, tmp_path / "straight", train=short_train(max_steps=5))
    original = training.make_optimizer
    calls = {"n": 0}

    def slow_update_interrupted(*args, **kwargs):
        optimizer = original(*args, **kwargs)
        step = optimizer.step

        def interrupted_step(*a, **k):
            out = step(*a, **k)
            calls["n"] += 1
            if calls["n"] == 3:  # the update of step 3 is done; the signal lands before the counters move
                os.kill(os.getpid(), signal.SIGINT)
            return out

        optimizer.step = interrupted_step
        return optimizer

    monkeypatch.setattr(training, "make_optimizer", slow_update_interrupted)
    with pytest.raises(KeyboardInterrupt):
        run("full", tiny_checkpoint, tmp_path / "cut", train=short_train(max_steps=5))
    monkeypatch.setattr(training, "make_optimizer", original)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "cut")] == ["step-000003"]
    run("full", tiny_checkpoint, tmp_path / "cut", resume="auto", train=short_train(max_steps=5))
    a, b = final_weights(tmp_path / "straight"), final_weights(tmp_path / "cut")
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # One metrics file holds every step once, before and after the interruption.
    rows = list(csv.DictReader((tmp_path / "cut" / "logs" / "metrics.csv").open()))
    assert sorted(int(r["step"]) for r in rows if r.get("loss")) == [1, 2, 3, 4, 5]
    assert logged_losses(tmp_path / "cut") == logged_losses(tmp_path / "straight")


def test_resuming_an_earlier_step_drops_the_later_metrics_rows(tiny_checkpoint, tmp_path) -> None:
    """As after kill -9: rows of steps after the checkpoint are trained again, and logged once."""
    out = tmp_path / "out"
    run("lora", tiny_checkpoint, out, train=short_train(max_steps=4, save_interval=2))
    run("lora", tiny_checkpoint, out, resume=str(out / "step-000002"), train=short_train(max_steps=4, save_interval=2))
    rows = list(csv.DictReader((out / "logs" / "metrics.csv").open()))
    assert sorted(int(r["step"]) for r in rows if r.get("loss")) == [1, 2, 3, 4]


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (dict(lora=LoRAConfig(r=4, alpha=32, mlp=True)), r"lora: alpha 8 -> 32"),
        (dict(seed=7), r"seed: 1337 in the checkpoint, 7 now"),
        (dict(train=short_train(max_steps=4, save_interval=2, global_batch_size=2)), r"global batch size: 4 .* 2 now"),
        (dict(train=short_train(max_steps=6, save_interval=2)),
         r"max_steps: 4 in the checkpoint, 6 now \(pass --train.allow_new_schedule true"),
        (dict(train=short_train(max_steps=4, save_interval=2, learning_rate=1e-3)), r"learning_rate: 0.01 .* 0.001"),
    ],
)
def test_resume_refuses_a_different_run(tiny_checkpoint, tmp_path, change, match) -> None:
    out = tmp_path / "out"
    base = dict(lora=LoRAConfig(r=4, alpha=8, mlp=True))
    run("lora", tiny_checkpoint, out, train=short_train(max_steps=4, save_interval=2), **base)
    kwargs = {**base, **change}
    kwargs.setdefault("train", short_train(max_steps=4, save_interval=2))
    with pytest.raises(ValueError, match=r"Cannot resume from .*step-000002: it belongs to a different run") as err:
        run("lora", tiny_checkpoint, out, resume=str(out / "step-000002"), **kwargs)
    assert __import__("re").search(match, str(err.value)), str(err.value)


def test_resume_with_a_new_schedule_when_allowed(tiny_checkpoint, tmp_path) -> None:
    out = tmp_path / "out"
    run("lora", tiny_checkpoint, out, train=short_train(max_steps=4, save_interval=2))
    run("lora", tiny_checkpoint, out, resume=str(out / "step-000002"),
        train=short_train(max_steps=6, save_interval=2, learning_rate=1e-3, allow_new_schedule=True))
    lrs = {int(r["step"]): float(r["lr"]) for r in csv.DictReader((out / "logs" / "metrics.csv").open()) if r.get("lr")}
    assert sorted(lrs) == [1, 2, 3, 4, 5, 6]
    assert lrs[3] < 1e-3 + 1e-12 and lrs[2] > 1e-3  # the new peak rate is in force after the resume


def test_resume_refuses_a_checkpoint_past_the_end_and_another_base(tiny_checkpoint, tmp_path) -> None:
    import shutil

    out = tmp_path / "out"
    run("lora", tiny_checkpoint, out, train=short_train(max_steps=4, save_interval=2))
    with pytest.raises(ValueError, match=r"max_steps: 4 in the checkpoint, 2 now"):
        run("lora", tiny_checkpoint, out, resume=str(out / "step-000004"), train=short_train(max_steps=2))
    with pytest.raises(ValueError, match=r"it is at step 4, past the end of this run \(step 2\)"):
        run("lora", tiny_checkpoint, out, resume=str(out / "step-000004"),
            train=short_train(max_steps=2, save_interval=2, allow_new_schedule=True))
    # At the end already (killed before final/ was written): resuming only evaluates and saves final/ again.
    metrics = run("lora", tiny_checkpoint, out, resume=str(out / "step-000004"),
                  train=short_train(max_steps=4, save_interval=2))
    assert "val_loss" in metrics and (out / "final").is_dir()
    other = tmp_path / "other-base"  # the same shape, other weights
    shutil.copytree(tiny_checkpoint, other)
    for name in ("train.json", "val.json"):  # the data files live next to the checkpoint directory
        shutil.copy(tiny_checkpoint.parent / name, tmp_path / name)
    state = torch.load(other / "lit_model.pth", weights_only=True)
    torch.save({k: v + 0.01 for k, v in state.items()}, other / "lit_model.pth")
    with pytest.raises(ValueError, match=r"base weights differ from the checkpoint's"):
        run("lora", other, out, resume=str(out / "step-000002"), train=short_train(max_steps=4, save_interval=2))


def test_demo_data_is_written_whole_and_only_when_it_changed(tmp_path) -> None:
    from lit_model.data.demo_tasks import write_demo_dataset

    train, val = write_demo_dataset(tmp_path)
    stamp = train.stat().st_mtime_ns
    write_demo_dataset(tmp_path)  # another rank, a moment later: the same content, no rewrite
    assert train.stat().st_mtime_ns == stamp
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_every_label_masked_stops_with_the_length_that_would_keep_answers(tiny_checkpoint, tmp_path) -> None:
    import re

    with pytest.raises(ValueError, match=r"None of the 32 train samples has an answer token within "
                                         r"--train.max_seq_length 8: .*--train.max_seq_length \d+ would keep") as err:
        run("lora", tiny_checkpoint, tmp_path / "out", train=short_train(max_steps=2, max_seq_length=8))
    assert not (tmp_path / "out" / "final").exists()
    suggested = int(re.search(r"max_seq_length (\d+) would keep", str(err.value)).group(1))
    metrics = run("lora", tiny_checkpoint, tmp_path / "out", train=short_train(max_steps=2, max_seq_length=suggested))
    assert metrics["val_loss"] > 0  # the suggested length leaves answers to learn and to validate on
