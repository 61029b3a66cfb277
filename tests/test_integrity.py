"""Checksums of weight files: written with every checkpoint directory, checked on load, optional where absent."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from lit_model.train import checkpoints as ckpt
from lit_model.checkpoint_io import load_checkpoint, load_model, load_state_dict, save_checkpoint_dir, save_state_dict
from lit_model.config import Config
from lit_model.errors import CorruptFileError
from lit_model.integrity import CHECKSUMS_NAME, VERIFY_ENV, read_checksums, verify_file
from lit_model.model import GPT


def tiny_model() -> GPT:
    return GPT(Config(name="tiny", block_size=16, vocab_size=32, n_layer=1, n_head=2, n_embd=8))


def flip_a_byte_in_the_middle(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside a tensor: torch would load it without complaint
    path.write_bytes(bytes(data))


def test_a_checkpoint_directory_records_the_checksum_of_its_weights(tmp_path: Path) -> None:
    model = tiny_model()
    directory = save_checkpoint_dir(tmp_path / "ckpt", model.state_dict(), model.config)
    entry = read_checksums(directory)["lit_model.pth"]
    data = (directory / "lit_model.pth").read_bytes()
    assert entry == {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    assert json.loads((directory / CHECKSUMS_NAME).read_text())["algorithm"] == "sha256"
    assert verify_file(directory / "lit_model.pth") is True


def test_flipped_bytes_are_refused_naming_the_file_and_what_to_do(tmp_path: Path, monkeypatch) -> None:
    model = tiny_model()
    directory = save_checkpoint_dir(tmp_path / "ckpt", model.state_dict(), model.config)
    flip_a_byte_in_the_middle(directory / "lit_model.pth")
    match = (r"ckpt/lit_model\.pth is corrupt: its sha256 checksum \w+\.\.\. differs from the \w+\.\.\. recorded in "
             r"checksums\.json when it was written, so some of its bytes changed\. Re-download or re-convert the "
             r"model; for a training checkpoint, resume from an older step-NNNNNN directory")
    with pytest.raises(CorruptFileError, match=match):
        load_state_dict(directory / "lit_model.pth")
    with pytest.raises(CorruptFileError, match=match):
        load_model(directory)
    # Checking can be skipped: the damaged tensor loads as torch would load it.
    assert load_state_dict(directory / "lit_model.pth", verify=False).keys() == model.state_dict().keys()
    monkeypatch.setenv(VERIFY_ENV, "0")
    load_checkpoint(tiny_model(), directory / "lit_model.pth")


def test_a_truncated_file_fails_on_its_size_before_any_hashing(tmp_path: Path) -> None:
    save_state_dict({"w": torch.randn(100)}, tmp_path / "lit_model.lora.pth")
    path = tmp_path / "lit_model.lora.pth"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(CorruptFileError, match=r"lit_model\.lora\.pth is corrupt: it has [\d,]+ bytes but [\d,]+ were "
                                               r"written \(truncated since\)"):
        load_state_dict(path)


def test_without_checksums_files_load_unchecked(tmp_path: Path) -> None:
    model = tiny_model()
    directory = save_checkpoint_dir(tmp_path / "ckpt", model.state_dict(), model.config)
    (directory / CHECKSUMS_NAME).unlink()  # as in a directory another tool (or an older version) wrote
    flip_a_byte_in_the_middle(directory / "lit_model.pth")
    assert verify_file(directory / "lit_model.pth") is False
    load_model(directory)
    torch.save({"w": torch.ones(2)}, tmp_path / "other.pth")  # a file checksums.json does not list
    assert verify_file(tmp_path / "other.pth") is False


def test_rewriting_a_weight_file_updates_its_checksum(tmp_path: Path) -> None:
    path = tmp_path / "lit_model.pth"
    save_state_dict({"w": torch.zeros(8)}, path)
    save_state_dict({"w": torch.ones(8)}, path)
    assert torch.equal(load_state_dict(path)["w"], torch.ones(8))  # no false alarm from the old entry


def test_an_unreadable_checksums_file_says_how_to_go_on(tmp_path: Path) -> None:
    save_state_dict({"w": torch.zeros(8)}, tmp_path / "lit_model.pth")
    (tmp_path / CHECKSUMS_NAME).write_text("{not json")
    with pytest.raises(CorruptFileError, match=r"checksums\.json is unreadable .*delete checksums\.json to load the "
                                               r"weights without checking them"):
        load_state_dict(tmp_path / "lit_model.pth")


def test_training_checkpoints_checksum_their_state_and_resume_checks_it(tmp_path: Path) -> None:
    def fill(tmp: Path) -> None:
        save_state_dict({"w": torch.ones(8)}, tmp / "lit_model.lora.pth")
        torch.save({"step": 2}, tmp / ckpt.STATE_NAME)  # written plainly, as the loop does

    for step in (2, 4):
        ckpt.write_checkpoint(tmp_path / ckpt.step_dir_name(step), fill)
    assert set(read_checksums(tmp_path / "step-000004")) == {"lit_model.lora.pth", ckpt.STATE_NAME}
    flip_a_byte_in_the_middle(tmp_path / "step-000004" / ckpt.STATE_NAME)
    with pytest.raises(CorruptFileError, match=r"step-000004/training_state\.pth is corrupt: its sha256 checksum"):
        ckpt.resolve_resume(tmp_path / "step-000004", tmp_path)
    with pytest.warns(ckpt.ResumeWarning, match=r"skips .*step-000004: .*training_state\.pth is corrupt"):
        assert ckpt.resolve_resume("auto", tmp_path) == tmp_path / "step-000002"
    with pytest.raises(CorruptFileError, match=r"training_state\.pth is corrupt"):
        ckpt.load_training_state(tmp_path / "step-000004", verify=True)
