"""The scripts' command line: exact option names, short usage errors, user errors without tracebacks, negative
numbers, a run's hyperparameters.yaml as --config; a real script still runs through it."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pytest
import torch
import yaml

from lit_model.cli import script_main
from tests.finetune_utils import load_script

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Rates:
    """DropBP-like settings.

    Args:
        rate: drop rate.
        sensitivity_at: when to measure.
    """

    rate: float = 0.0
    sensitivity_at: float = 0.1


def fit(learning_rate: float = 1e-3, steps: int = 3, name: str = "x", dropbp: Rates = Rates(),
        out_dir: Optional[Path] = None) -> dict:
    """A stand-in script.

    Args:
        learning_rate: the learning rate.
        steps: how many steps.
        name: what goes wrong: "missing", "exists", "ours", "bug", "unsafe".
        dropbp: drop settings.
        out_dir: where.
    """
    if name == "missing":
        raise FileNotFoundError("No data file at 'x.json'. Pass an Alpaca-style .json or .jsonl file.")
    if name == "exists":
        raise FileExistsError("out exists and is not empty: pass another --output_dir")
    if name == "ours":
        from lit_model.train.loop import NonFiniteLossError

        raise NonFiniteLossError("The loss became nan at step 3")
    if name == "unsafe":
        raise ValueError("x.pth is not a plain state dict. Weights only load failed. Re-running `torch.load` with "
                         "`weights_only` set to `False` will likely succeed.")
    if name == "bug":
        raise KeyError("a bug")
    return {"learning_rate": learning_rate, "steps": steps, "dropbp": dropbp, "out_dir": out_dir}


def cli(monkeypatch: pytest.MonkeyPatch, fn, *args: str, **defaults):
    monkeypatch.setattr(sys, "argv", ["fit.py", *args])
    return script_main(fn, **defaults)


def usage_error(monkeypatch, capsys, *args: str) -> str:
    with pytest.raises(SystemExit) as caught:
        cli(monkeypatch, fit, *args)
    assert caught.value.code == 2
    return capsys.readouterr().err


def test_prefixes_are_not_options_and_typos_get_a_short_hint(monkeypatch, capsys) -> None:
    err = usage_error(monkeypatch, capsys, "--dropbp.rat", "0.5")
    assert err.splitlines() == ["error: unknown option --dropbp.rat; did you mean --dropbp.rate?",
                                "Run `fit.py --help` for the options."]
    assert "unknown option --learning_rat; did you mean --learning_rate?" in usage_error(
        monkeypatch, capsys, "--learning_rat=0.1")
    assert "error: --steps: expected an integer, got '1.5'" in usage_error(monkeypatch, capsys, "--steps", "1.5")
    assert "unexpected argument(s) 3: every argument is given as --name value" in usage_error(monkeypatch, capsys, "3")


def test_negative_numbers_are_values(monkeypatch) -> None:
    assert cli(monkeypatch, fit, "--learning_rate", "-1e-3")["learning_rate"] == -1e-3
    assert cli(monkeypatch, fit, "--dropbp.rate", "-2.5E-1")["dropbp"].rate == -0.25
    assert cli(monkeypatch, fit, "--learning_rate", "-.5", "--steps", "-2")["steps"] == -2


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("missing", "error: No data file at 'x.json'. Pass an Alpaca-style .json or .jsonl file."),
        ("exists", "error: out exists and is not empty: pass another --output_dir"),
        ("ours", "error: The loss became nan at step 3"),
        ("unsafe", "error: x.pth is not a plain state dict. Weights only load failed."),
    ],
)
def test_user_errors_are_one_message_and_status_1(monkeypatch, capsys, name: str, message: str) -> None:
    with pytest.raises(SystemExit) as caught:
        cli(monkeypatch, fit, "--name", name)
    assert caught.value.code == 1
    err = capsys.readouterr().err
    assert err.splitlines() == [message, "(run with --debug or LIT_DEBUG=1 for the traceback)"]
    assert "Traceback" not in err and "weights_only" not in err


def test_debug_shows_the_traceback_and_bugs_always_do(monkeypatch) -> None:
    with pytest.raises(FileNotFoundError):
        cli(monkeypatch, fit, "--name", "missing", "--debug")
    monkeypatch.setenv("LIT_DEBUG", "1")
    with pytest.raises(FileExistsError):
        cli(monkeypatch, fit, "--name", "exists")
    monkeypatch.delenv("LIT_DEBUG")
    with pytest.raises(KeyError):
        cli(monkeypatch, fit, "--name", "bug")


def test_defaults_precision_and_flush_are_kept(monkeypatch) -> None:
    torch.set_float32_matmul_precision("highest")
    try:
        assert cli(monkeypatch, fit, steps=7)["steps"] == 7
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision("highest")


def test_a_runs_hyperparameters_yaml_is_accepted_as_config(tmp_path: Path, monkeypatch, capsys) -> None:
    from lit_model.train.fingerprint import plain

    script = load_script("finetune/lora.py")
    jobs = []
    monkeypatch.setattr(script, "run", lambda job: jobs.append(job) or {})
    cli(monkeypatch, script.setup, "--train.learning_rate", "-1e-3", "--lora.r", "4", "--out_dir", str(tmp_path))
    first = jobs[-1]
    # What the training loop writes next to a checkpoint (training.save_checkpoint), from the job it ran.
    hparams = {**plain(first.hparams), "checkpoint_dir": str(Path(first.checkpoint_dir).resolve()),
               "precision": "32-true", "mode": first.mode, "metrics": {"val_loss": 1.5}}
    hparams["train"]["an_old_setting"] = 1  # a key a later version no longer has
    (tmp_path / "hyperparameters.yaml").write_text(yaml.safe_dump(hparams, sort_keys=False))
    capsys.readouterr()
    cli(monkeypatch, script.setup, "--config", str(tmp_path / "hyperparameters.yaml"))
    assert capsys.readouterr().err.splitlines() == [
        f"note: ignoring keys of {tmp_path / 'hyperparameters.yaml'} that are not arguments of setup: "
        "train.an_old_setting, mode, metrics"
    ]
    again = jobs[-1]
    assert again.train == first.train and again.adapter == first.adapter and again.out_dir == first.out_dir
    assert again.precision == "32-true" and Path(again.checkpoint_dir) == Path(first.checkpoint_dir).resolve()


def test_a_real_script_runs_through_it(monkeypatch, capsys) -> None:
    generate = load_script("generate/base.py")
    with pytest.raises(SystemExit) as caught:
        cli(monkeypatch, generate.main, "--help")
    assert caught.value.code == 0 and "--max_new_tokens" in capsys.readouterr().out
    outputs = cli(monkeypatch, generate.main, "--prompt", "Reverse the word cat.", "--max_new_tokens", "2",
                  "--temperature", "0", "--device", "cpu")
    assert len(outputs) == 1
    with pytest.raises(SystemExit) as caught:
        cli(monkeypatch, generate.main, "--max_new_token", "2")
    assert caught.value.code == 2
    assert "did you mean --max_new_tokens?" in capsys.readouterr().err
