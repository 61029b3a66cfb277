"""DropBP in the training loop: every mode, calibration, checkpointing, accumulation, precisions and resume."""

from __future__ import annotations

import pytest
import torch
import yaml

from lit_model.train import checkpoints as ckpt
from lit_model.train.args import DropBPArgs, EvalArgs
from tests.finetune_utils import data_args, load_script, short_train, tiny_checkpoint  # noqa: F401 (fixture)


def run(mode: str, ckpt_dir, out, dropbp: DropBPArgs, **kw):
    script = load_script("finetune/full.py" if mode == "full" else "finetune/lora.py")
    extra = {"quantize": "bnb.nf4"} if mode == "qlora" else {}
    train = kw.pop("train", short_train(max_steps=4))
    return script.setup(checkpoint_dir=ckpt_dir, out_dir=out, data=data_args(ckpt_dir), train=train, dropbp=dropbp,
                        eval=EvalArgs(interval=100, exact_match=0, max_new_tokens=2), **extra, **kw)


@pytest.mark.parametrize("mode", ["full", "lora", "qlora"])
def test_every_mode_calibrates_and_saves_rates(mode, tiny_checkpoint, tmp_path, capsys) -> None:
    metrics = run(mode, tiny_checkpoint, tmp_path, DropBPArgs(rate=0.5, method="paper", sensitivity_at=0.25),
                  train=short_train(max_steps=4, activation_checkpointing=1))
    assert torch.isfinite(torch.tensor(metrics["val_loss"]))
    out = capsys.readouterr().out
    assert "DropBP rates from sensitivity at step 1" in out
    saved = yaml.safe_load((tmp_path / "final" / "dropbp.yaml").read_text())
    assert saved["dropbp/target"] == 0.5
    assert saved["dropbp/mean_rate"] == pytest.approx(0.5, abs=0.051)  # greedy: 0.1 grid, first step reaching 0.5
    assert {"dropbp/sensitivity/attn_0", "dropbp/flops/mlp_1"} <= set(saved)


@pytest.mark.parametrize("precision", ["bf16-true", "bf16-mixed"])
def test_low_precision_with_dropbp(precision, tiny_checkpoint, tmp_path) -> None:
    metrics = run("lora", tiny_checkpoint, tmp_path, DropBPArgs(rate=0.5, method="paper", allocator="flops"), precision=precision)
    assert torch.isfinite(torch.tensor(metrics["val_loss"]))


def test_resume_with_dropbp_reproduces_masks_and_weights(tiny_checkpoint, tmp_path) -> None:
    args = DropBPArgs(rate=0.5, method="paper", sensitivity_at=0.5)
    train = short_train(max_steps=4, save_interval=1, activation_checkpointing=1)
    run("full", tiny_checkpoint, tmp_path / "a", args, train=train)
    for resume_at in ("step-000001", "step-000003"):  # before and after the calibration at step 2
        run("full", tiny_checkpoint, tmp_path / resume_at, args, train=train, resume=str(tmp_path / "a" / resume_at))
        a = torch.load(tmp_path / "a" / "final" / "lit_model.pth", weights_only=True)
        b = torch.load(tmp_path / resume_at / "final" / "lit_model.pth", weights_only=True)
        for key in a:
            torch.testing.assert_close(a[key], b[key], atol=0, rtol=0)
    state = ckpt.load_training_state(tmp_path / "a" / "step-000003")
    assert state["calibrated"] and state["dropbp"] is not None


def test_all_dropped_micro_batch_skips_only_its_backward(tiny_checkpoint, tmp_path) -> None:
    # Rate 0.9 on 4 branches with LoRA only inside the blocks: some micro-batches drop every branch, so their loss
    # has no grad_fn; the run must go on, and the adapters must still learn from the other micro-batches.
    metrics = run("lora", tiny_checkpoint, tmp_path, DropBPArgs(rate=0.9, sensitivity_at=0.0),
                  train=short_train(max_steps=6))
    assert torch.isfinite(torch.tensor(metrics["val_loss"]))
    lora = torch.load(tmp_path / "final" / "lit_model.lora.pth", weights_only=True)
    assert any(v.abs().sum() > 0 for k, v in lora.items() if "lora_B" in k)


def test_dropbp_argument_errors(tiny_checkpoint, tmp_path) -> None:
    with pytest.raises(ValueError, match=r"(?s)--dropbp.rate must be in \[0, 0.9\].*--dropbp.allocator must be"):
        run("lora", tiny_checkpoint, tmp_path, DropBPArgs(rate=0.95, allocator="best"))
    with pytest.raises(ValueError, match=r"belongs to a different run.\n  - dropbp: rate 0.0 -> 0.5"):
        run("lora", tiny_checkpoint, tmp_path / "a", DropBPArgs(rate=0.0), train=short_train(max_steps=2, save_interval=1))
        run("lora", tiny_checkpoint, tmp_path / "b", DropBPArgs(rate=0.5), train=short_train(max_steps=2),
            resume=str(tmp_path / "a" / "step-000001"))


def test_scale_lr_gives_each_branch_lr_over_one_minus_its_rate(tiny_checkpoint, tmp_path, monkeypatch) -> None:
    """--dropbp.scale_lr: one optimizer group per branch, whose learning rate is the schedule's times 1 / (1 - p) for
    the branch's rate in force (prefix rates here, differing per branch), capped at max_lr_scale."""
    import importlib

    run_module = importlib.import_module("lit_model.train.run")  # the module (the package's `run` is the function)
    from lit_model.train.setup import lr_schedule

    seen = {}
    original = run_module.fit

    def capture(session, loop):
        original(session, loop)
        seen["groups"] = [(g["dropbp_branch"], g["lr"]) for g in session.optimizer.param_groups]
        seen["rates"] = list(session.dropbp.drop_rates)
        seen["lr"] = lr_schedule(session.job.train, loop.max_steps)(loop.step) * session.job.train.learning_rate

    monkeypatch.setattr(run_module, "fit", capture)
    run("lora", tiny_checkpoint, tmp_path, DropBPArgs(rate=0.5, sampler="prefix", sensitivity_at=0.0, scale_lr=True,
                                                      max_lr_scale=3.0))
    branches = [b for b, _ in seen["groups"]]
    assert branches == sorted(branches) and branches[0] >= 0  # LoRA: every trainable tensor sits in a branch
    for branch, lr in seen["groups"]:
        assert lr == pytest.approx(seen["lr"] * min(3.0, 1 / (1 - seen["rates"][branch])), rel=1e-9), branch
    assert len({round(lr, 12) for _, lr in seen["groups"]}) > 1
