"""--precision means what it says whatever dtype the checkpoint stores: parameter dtypes, autocast inside the forward,
and a 32-true run on a bf16 checkpoint equal to the run on the same weights stored in float32."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from lit_model.train.args import EvalArgs
from lit_model.checkpoint_io import load_model
from lit_model.model import GPT
from lit_model.precision import autocast, canonical, compute_dtype, describe, param_dtype
from tests.finetune_utils import data_args, load_script, logged_losses, short_train, tiny_checkpoint  # noqa: F401


def _stored_as(ckpt: Path, dest: Path, dtype: torch.dtype) -> Path:
    """A copy of the checkpoint directory with its weights stored in `dtype`."""
    shutil.copytree(ckpt, dest)
    state = torch.load(ckpt / "lit_model.pth", weights_only=True)
    torch.save({k: v.to(dtype) for k, v in state.items()}, dest / "lit_model.pth")
    return dest


@pytest.fixture(scope="module")
def stored(tiny_checkpoint, tmp_path_factory) -> dict[str, Path]:
    """The tiny model stored in bf16 and fp16, and its bf16 weights widened exactly to float32 (the reference)."""
    root = tmp_path_factory.mktemp("stored")
    bf16 = _stored_as(tiny_checkpoint, root / "bf16", torch.bfloat16)
    fp16 = _stored_as(tiny_checkpoint, root / "fp16", torch.float16)
    return {"bf16": bf16, "fp16": fp16, "fp32-of-bf16": _stored_as(bf16, root / "fp32", torch.float32)}


def test_precision_table() -> None:
    assert [param_dtype(p) for p in ("32-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true")] == [
        torch.float32, torch.float32, torch.float32, torch.bfloat16, torch.float16]
    assert [compute_dtype(p) for p in ("32-true", "bf16-mixed", "16-mixed", "bf16-true")] == [
        torch.float32, torch.bfloat16, torch.float16, torch.bfloat16]
    assert canonical("bf16") == "bf16-mixed" and canonical("32") == "32-true"
    assert describe("bf16-mixed") == "Precision bf16-mixed: parameters float32, compute bfloat16 (autocast)"
    with pytest.raises(ValueError, match=r"Unknown precision 'fp8'.*32-true"):
        canonical("fp8")


@pytest.mark.parametrize("stored_dtype", ["bf16", "fp16"])
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "bf16-true", "16-true"])
def test_load_model_casts_every_tensor_to_the_precision(stored, stored_dtype, precision) -> None:
    model = load_model(stored[stored_dtype], dtype=param_dtype(precision))
    assert {p.dtype for p in model.parameters()} == {param_dtype(precision)}
    # Tied or not, the head and the embedding are one dtype; the values are the stored ones, widened or rounded.
    reference = torch.load(stored[stored_dtype] / "lit_model.pth", weights_only=True)
    w = reference["transformer.h.0.attn.query.weight"]
    assert torch.equal(model.transformer.h[0].attn.query.weight, w.to(param_dtype(precision)))


def _record_forward(records: list[dict]) -> torch.utils.hooks.RemovableHandle:
    """A global hook that notes, for every training forward of a GPT, its parameter dtype and the autocast state."""

    def hook(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
        if isinstance(module, GPT) and module.training:
            records.append({
                "param": module.lm_head.weight.dtype,
                "autocast": torch.is_autocast_enabled("cpu"),
                "autocast_dtype": torch.get_autocast_dtype("cpu"),
            })
        elif isinstance(module, torch.nn.Linear) and module.training and records is not None:
            records.append({"matmul": output.dtype})  # a projection inside the blocks: the compute dtype

    return torch.nn.modules.module.register_module_forward_hook(hook)


@pytest.mark.parametrize("stored_dtype", ["bf16", "fp16"])
@pytest.mark.parametrize(
    ("precision", "params", "autocast_on", "hidden"),
    [
        ("32-true", torch.float32, False, torch.float32),
        ("bf16-mixed", torch.float32, True, torch.bfloat16),
        ("16-mixed", torch.float32, True, torch.bfloat16),  # Fabric runs 16-mixed as bf16-mixed on CPU
        ("bf16-true", torch.bfloat16, False, torch.bfloat16),
        ("16-true", torch.float16, False, torch.float16),
    ],
)
def test_training_runs_in_the_asked_precision(stored, tiny_checkpoint, tmp_path, capsys, stored_dtype, precision, params, autocast_on,
                                             hidden) -> None:
    full = load_script("finetune/full.py")
    records: list[dict] = []
    handle = _record_forward(records)
    try:
        full.setup(checkpoint_dir=stored[stored_dtype], out_dir=tmp_path / "out", precision=precision,
                   data=data_args(tiny_checkpoint), train=short_train(max_steps=1, global_batch_size=2),
                   eval=EvalArgs(interval=100, exact_match=0, max_new_tokens=2))
    finally:
        handle.remove()
    gpt = [r for r in records if "param" in r]
    assert gpt, "no training forward was seen"
    assert {r["param"] for r in gpt} == {params}
    assert {r["autocast"] for r in gpt} == {autocast_on}
    if autocast_on:
        assert {r["autocast_dtype"] for r in gpt} == {torch.bfloat16}
    assert {r["matmul"] for r in records if "matmul" in r} == {hidden}
    out = capsys.readouterr().out
    run_precision = "bf16-mixed" if precision == "16-mixed" else precision
    assert describe(run_precision) in out
    saved = torch.load(tmp_path / "out" / "final" / "lit_model.pth", weights_only=True)
    assert {v.dtype for v in saved.values()} == {params}  # full fine-tuning saves what it trained


def test_three_precisions_three_curves_and_32_true_is_fp32(stored, tiny_checkpoint, tmp_path) -> None:
    """On a bf16 checkpoint, 32-true trains exactly as on the same weights stored in float32; bf16-mixed and
    bf16-true each give a curve of their own."""
    lora = load_script("finetune/lora.py")
    from lit_model.peft.lora import LoRAConfig

    def curve(checkpoint: Path, precision: str, name: str) -> list[float]:
        out = tmp_path / name
        lora.setup(checkpoint_dir=checkpoint, out_dir=out, precision=precision, data=data_args(tiny_checkpoint),
                   train=short_train(max_steps=5, learning_rate=3e-2), lora=LoRAConfig(r=4, alpha=8, mlp=True),
                   eval=EvalArgs(interval=100, exact_match=0, max_new_tokens=2))
        losses = logged_losses(out)
        return [losses[s] for s in sorted(losses)]

    reference = curve(stored["fp32-of-bf16"], "32-true", "ref")
    true32 = curve(stored["bf16"], "32-true", "t32")
    mixed = curve(stored["bf16"], "bf16-mixed", "mixed")
    half = curve(stored["bf16"], "bf16-true", "half")
    assert len(reference) == 5
    assert true32 == reference
    assert mixed != true32 and half != true32 and mixed != half
    # All three learn the same thing: the curves agree to bf16 rounding.
    assert max(abs(a - b) for a, b in zip(mixed, true32)) < 0.05
    assert max(abs(a - b) for a, b in zip(half, true32)) < 0.1


def test_generate_runs_in_the_asked_precision(stored, capsys) -> None:
    generate = load_script("generate/base.py")
    records: list[dict] = []

    def hook(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
        if isinstance(module, GPT):
            records.append({"param": module.lm_head.weight.dtype, "autocast": torch.is_autocast_enabled("cpu")})

    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        for precision, expected in (("32-true", (torch.float32, False)), ("bf16-mixed", (torch.float32, True)),
                                    ("bf16-true", (torch.bfloat16, False))):
            records.clear()
            generate.main(prompt="cat", checkpoint_dir=stored["bf16"], max_new_tokens=2, precision=precision,
                          temperature=0.0, device="cpu")
            assert {(r["param"], r["autocast"]) for r in records} == {expected}, precision
    finally:
        handle.remove()
    assert "Precision bf16-mixed: parameters float32, compute bfloat16 (autocast)" in capsys.readouterr().err


def test_autocast_context_only_for_mixed() -> None:
    with autocast("bf16-mixed", "cpu"):
        assert torch.is_autocast_enabled("cpu")
    with autocast("bf16-true", "cpu"):
        assert not torch.is_autocast_enabled("cpu")
