"""The finetune and generate scripts, run in-process on a tiny model: files written, log lines, accumulation, errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from lit_model.train.args import DataArgs, EvalArgs, TrainArgs
from tests.finetune_utils import ROOT, data_args, load_script, short_train, tiny_checkpoint  # noqa: F401 (fixture)


@pytest.mark.parametrize("quantize", [None, "bnb.nf4"])
def test_lora_script_trains_saves_and_generates(tiny_checkpoint, tmp_path, capsys, quantize) -> None:
    lora = load_script("finetune/lora.py")
    from lit_model.peft.lora import LoRAConfig

    metrics = lora.setup(
        checkpoint_dir=tiny_checkpoint, out_dir=tmp_path / "out", quantize=quantize, data=data_args(tiny_checkpoint),
        train=short_train(), eval=EvalArgs(interval=2, exact_match=2, max_new_tokens=4),
        lora=LoRAConfig(r=4, alpha=8, mlp=True),
    )
    out = capsys.readouterr().out
    assert "trainable of" in out and "Held-out exact match after fine-tuning" in out
    assert {"val_loss", "exact_match_before", "exact_match_after"} <= set(metrics)
    final = tmp_path / "out" / "final"
    for name in ("lit_model.lora.pth", "model_config.yaml", "tokenizer.json", "tokenizer_config.json",
                 "hyperparameters.yaml", "prompt_style.yaml"):
        assert (final / name).is_file(), name
    assert not (final / "lit_model.pth").exists()
    saved = torch.load(final / "lit_model.lora.pth", weights_only=True)
    assert saved and all("lora_" in k for k in saved)
    hparams = yaml.safe_load((final / "hyperparameters.yaml").read_text())
    assert hparams["lora"]["r"] == 4 and hparams["quantize"] == quantize and hparams["mode"] == "lora"
    assert list((tmp_path / "out" / "logs").rglob("metrics.csv"))
    generate = load_script("generate/base.py")
    texts = generate.main(prompt="Reverse the word cat.", checkpoint_dir=final, max_new_tokens=3, temperature=0)
    assert len(texts) == 1


def test_full_script_saves_a_complete_model(tiny_checkpoint, tmp_path) -> None:
    full = load_script("finetune/full.py")
    full.setup(checkpoint_dir=tiny_checkpoint, out_dir=tmp_path / "out", data=data_args(tiny_checkpoint),
               train=short_train(max_steps=2), eval=EvalArgs(exact_match=0))
    state = torch.load(tmp_path / "out" / "final" / "lit_model.pth", weights_only=True)
    base = torch.load(tiny_checkpoint / "lit_model.pth", weights_only=True)
    assert state.keys() == base.keys()
    assert any(not torch.equal(state[k], base[k]) for k in base)


def test_accumulation_equals_one_large_batch(tiny_checkpoint, tmp_path) -> None:
    full = load_script("finetune/full.py")
    weights = []
    for micro in (4, 1):
        out = tmp_path / f"micro{micro}"
        full.setup(checkpoint_dir=tiny_checkpoint, out_dir=out, data=data_args(tiny_checkpoint),
                   train=short_train(micro_batch_size=micro, max_steps=2, max_norm=None),
                   eval=EvalArgs(exact_match=0))
        weights.append(torch.load(out / "final" / "lit_model.pth", weights_only=True))
    for key in weights[0]:
        torch.testing.assert_close(weights[0][key], weights[1][key], atol=2e-5, rtol=1e-4)


def test_every_argument_problem_is_reported_at_once(tiny_checkpoint, tmp_path) -> None:
    lora = load_script("finetune/lora.py")
    with pytest.raises(ValueError, match=r"(?s)global_batch_size \(6\) must be a multiple.*learning_rate must be "
                                         r"positive.*--data.train_file 'nope.json' does not exist"):
        lora.setup(checkpoint_dir=tiny_checkpoint, out_dir=tmp_path, data=DataArgs(train_file=Path("nope.json")),
                   train=TrainArgs(global_batch_size=6, micro_batch_size=4, learning_rate=-1.0))
    with pytest.raises(ValueError, match="Checkpoint directory .* does not exist. Download and convert"):
        lora.setup(checkpoint_dir=tmp_path / "missing", out_dir=tmp_path)


def test_scripts_show_their_flags() -> None:
    for script in ("finetune/lora.py", "finetune/qlora.py", "generate/lora.py"):
        result = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        assert "--checkpoint_dir" in result.stdout
    result = subprocess.run([sys.executable, "finetune/qlora.py", "--print_config"], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert "quantize: bnb.nf4" in result.stdout, result.stdout + result.stderr
