"""Training life cycle: resume reproduces the uninterrupted run, saves are atomic, Ctrl-C saves, NaN stops, outputs."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from lit_model import resume as ckpt
from lit_model.args import EvalArgs
from lit_model.training import NonFiniteLossError
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
    import lit_model.training as training

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

    with pytest.raises(OSError, match="No space left"):
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
