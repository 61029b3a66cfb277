"""scripts/prepare_alpaca.py in-process: local files, a faked download, the CLI, and its errors. No network."""

from __future__ import annotations

import importlib.util
import json
import urllib.error
from pathlib import Path
from types import ModuleType

import pytest

from lit_model.data import load_records

ROOT = Path(__file__).resolve().parent.parent


def _load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("prepare_alpaca_script", ROOT / "scripts" / "prepare_alpaca.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def script() -> ModuleType:
    return _load_script()


def _records(n: int) -> list[dict[str, str]]:
    return [{"instruction": f"Repeat {i}.", "input": "" if i % 2 else f"x{i}", "output": str(i)} for i in range(n)]


def test_local_json_file(script: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    source = tmp_path / "mine.json"
    source.write_text(json.dumps(_records(40)))
    dest = tmp_path / "out"
    train_path, val_path = script.prepare_alpaca(str(source), dest, val_fraction=0.25, seed=1)
    assert (train_path, val_path) == (dest / "train.json", dest / "val.json")
    train, val = load_records(train_path), load_records(val_path)
    assert len(train) == 30 and len(val) == 10
    assert sorted(r["output"] for r in train + val) == sorted(r["output"] for r in _records(40))
    out = capsys.readouterr().out
    assert "40 records from" in out and "30 train" in out and "10 val" in out
    assert sorted(p.name for p in dest.iterdir()) == ["train.json", "val.json"]  # no temporary files left
    # Deterministic: the same seed writes the same files; another seed another split.
    first = train_path.read_text()
    script.prepare_alpaca(str(source), dest, val_fraction=0.25, seed=1)
    assert train_path.read_text() == first
    script.prepare_alpaca(str(source), dest, val_fraction=0.25, seed=2)
    assert train_path.read_text() != first


def test_local_jsonl_file(script: ModuleType, tmp_path: Path) -> None:
    source = tmp_path / "mine.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in _records(10)))
    train_path, val_path = script.prepare_alpaca(str(source), tmp_path / "out", val_fraction=0.2, seed=0)
    assert len(load_records(train_path)) == 8 and len(load_records(val_path)) == 2


def test_download_is_fetched_once_and_reused(
    script: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    calls: list[str] = []

    def fake_fetch(url: str, timeout: float) -> bytes:
        calls.append(url)
        return json.dumps(_records(100)).encode()

    monkeypatch.setattr(script, "_fetch", fake_fetch)
    dest = tmp_path / "alpaca"
    train_path, val_path = script.prepare_alpaca("alpaca", dest, val_fraction=0.1)
    assert calls == ["https://raw.githubusercontent.com/tatsu-lab/stanford_alpaca/main/alpaca_data.json"]
    assert (dest / "alpaca_data.json").is_file()
    assert len(load_records(train_path)) == 90 and len(load_records(val_path)) == 10
    script.prepare_alpaca("alpaca", dest, val_fraction=0.1)
    assert len(calls) == 1  # the second run reuses the download
    assert "downloaded earlier" in capsys.readouterr().out

    script.prepare_alpaca("alpaca-gpt4", tmp_path / "gpt4", val_fraction=0.1)
    assert calls[-1].endswith("/GPT-4-LLM/main/data/alpaca_gpt4_data.json")
    assert (tmp_path / "gpt4" / "alpaca_gpt4_data.json").is_file()


def test_offline_download_says_what_to_do(script: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_network(url: str, timeout: float) -> None:
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(script.urllib.request, "urlopen", no_network)
    dest = tmp_path / "alpaca"
    match = (
        r"Could not download https://raw\.githubusercontent\.com/.*alpaca_data\.json \(\[Errno -3\] Temporary failure "
        r"in name resolution\)\. If this machine is offline.*--source path/to/file\.json"
    )
    with pytest.raises(ConnectionError, match=match):
        script.prepare_alpaca("alpaca", dest)
    assert not (dest / "alpaca_data.json").exists() and not (dest / "train.json").exists()


def test_bad_inputs(script: ModuleType, tmp_path: Path) -> None:
    match = r"--source 'nope\.json' is neither one of alpaca, alpaca-gpt4 nor an existing file"
    with pytest.raises(ValueError, match=match):
        script.prepare_alpaca("nope.json", tmp_path / "out")
    source = tmp_path / "bad.jsonl"
    source.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl, line 2: missing required field 'output'"):
        script.prepare_alpaca(str(source), tmp_path / "out")
    assert not (tmp_path / "out" / "train.json").exists()
    source.write_text('{"instruction": "a", "output": "b"}\n')
    with pytest.raises(ValueError, match=r"--val_fraction must be in \[0, 1\), got 1\.5; --timeout must be positive"):
        script.prepare_alpaca(str(source), tmp_path / "out", val_fraction=1.5, timeout=0)
    with pytest.raises(ValueError, match=r"Cannot hold out 1 of 1 records"):
        script.prepare_alpaca(str(source), tmp_path / "out", val_fraction=0.5)


def test_cli(script: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from jsonargparse import CLI

    source = tmp_path / "mine.json"
    source.write_text(json.dumps(_records(20)))
    dest = tmp_path / "cli_out"
    args = ["--source", str(source), "--destination_dir", str(dest), "--val_fraction", "0.5", "--seed", "7"]
    CLI(script.prepare_alpaca, args=args)
    assert len(load_records(dest / "val.json")) == 10
    with pytest.raises(SystemExit):
        CLI(script.prepare_alpaca, args=["--help"])
    assert "--val_fraction" in capsys.readouterr().out
