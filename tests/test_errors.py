"""Failures that used to surface as bare library errors now name the file, the cause and what to do."""

from __future__ import annotations

import errno
import pickle
from pathlib import Path

import pytest
import torch

from lit_model import errors
from lit_model.checkpoint_io import load_state_dict, save_state_dict, write_dir_atomically
from lit_model.config import Config
from lit_model.errors import CorruptFileError, DiskFullError, disk_full_as_error, strip_unsafe_advice
from lit_model.tokenizer import Tokenizer
from tests.tokenizer_utils import make_bpe_tokenizer


class Pickled:
    """Not a tensor: torch.load(weights_only=True) refuses it."""


# ---- weight files ---------------------------------------------------------------------------------------------------


def test_empty_and_truncated_weight_files(tmp_path: Path) -> None:
    (tmp_path / "lit_model.pth").write_bytes(b"")
    with pytest.raises(CorruptFileError, match=r"lit_model\.pth is empty \(0 bytes\), so it holds no weights\. It is "
                                               r"probably truncated .*re-download or re-convert it"):
        load_state_dict(tmp_path / "lit_model.pth")
    torch.save({"w": torch.randn(64, 64)}, tmp_path / "cut.pth")
    data = (tmp_path / "cut.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptFileError, match=r"cut\.pth cannot be read as a checkpoint: the file is truncated or not "
                                               r"a torch checkpoint .*re-download or re-convert it; for a training "
                                               r"checkpoint, resume from an older step"):
        load_state_dict(tmp_path / "cut.pth")


def test_truncated_safetensors(tmp_path: Path) -> None:
    save_state_dict({"w": torch.randn(64, 64)}, tmp_path / "model.safetensors")
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptFileError, match=r"model\.safetensors is not a valid \.safetensors file \(.*\)\. It is "
                                               r"probably truncated or damaged .*re-download or re-convert it"):
        load_state_dict(tmp_path / "model.safetensors")


def test_a_refused_pickle_never_suggests_weights_only_false(tmp_path: Path) -> None:
    torch.save({"w": torch.ones(1), "obj": Pickled()}, tmp_path / "pickled.pth")
    with pytest.raises(ValueError) as caught:
        load_state_dict(tmp_path / "pickled.pth")
    message = str(caught.value)
    assert "pickled.pth is not a plain state dict" in message
    assert "it holds an object of type tests.test_errors.Pickled, which is refused because unpickling it could run " \
           "arbitrary code" in message
    for advice in ("weights_only=False", "weights_only` set to `False", "add_safe_globals", "trust"):
        assert advice not in message


def test_strip_unsafe_advice_keeps_the_cause_only(tmp_path: Path) -> None:
    torch.save(Pickled(), tmp_path / "obj.pth")
    with pytest.raises(pickle.UnpicklingError) as caught:
        torch.load(tmp_path / "obj.pth", weights_only=True)
    assert "weights_only" in str(caught.value)  # torch's own text gives the advice ...
    stripped = strip_unsafe_advice(str(caught.value))
    assert "Unsupported global: GLOBAL tests.test_errors.Pickled was not an allowed global by default." in stripped
    for advice in ("weights_only", "safe_globals", "trust"):  # ... ours does not
        assert advice not in stripped


# ---- tokenizer files ------------------------------------------------------------------------------------------------


def test_garbage_tokenizer_files_are_named(tmp_path: Path) -> None:
    (tmp_path / "json").mkdir()
    (tmp_path / "json" / "tokenizer.json").write_text("<html>404 Not Found</html>")
    with pytest.raises(ValueError, match=r"json/tokenizer\.json is not a valid tokenizer\.json \(.*\)\. The file is "
                                         r"damaged or not what its name says .*download the model again"):
        Tokenizer(tmp_path / "json")
    (tmp_path / "sp").mkdir()
    (tmp_path / "sp" / "tokenizer.model").write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match=r"sp/tokenizer\.model is not a valid SentencePiece model"):
        Tokenizer(tmp_path / "sp")
    directory = make_bpe_tokenizer(tmp_path / "config")
    (directory / "tokenizer_config.json").write_text("{bad")
    with pytest.raises(ValueError, match=r"tokenizer_config\.json is not valid JSON \(Expecting property name.*line 1 "
                                         r"column 2.*\)\. The file is damaged"):
        Tokenizer(directory)


def test_lone_surrogate_in_text_says_where(tmp_path: Path) -> None:
    tokenizer = Tokenizer(make_bpe_tokenizer(tmp_path))
    with pytest.raises(ValueError, match=r"lone UTF-16 surrogate U\+D800 at character 6 \(after 'hello '\)"):
        tokenizer.encode("hello \ud800 world")


# ---- model_config.yaml ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("n_layer: four\n", r"model_config\.yaml: n_layer must be an integer, got 'four' \(str\)\. Fix the values"),
        ("bias: 1\nnorm_class_name: Foo\n", r"bias must be true or false, got 1 \(int\); norm_class_name must be one "
                                            r"of 'LayerNorm', 'RMSNorm', got 'Foo'"),
        ("n_layer: [1\n", r"model_config\.yaml is not valid YAML \(.*line 1, column 10"),
        ("- 1\n", r"model_config\.yaml must be a YAML mapping of Config fields \(name: value\), got a list"),
    ],
)
def test_model_config_errors_name_the_field_and_the_type(tmp_path: Path, content: str, match: str) -> None:
    (tmp_path / "model_config.yaml").write_text(content)
    with pytest.raises(ValueError, match=match):
        Config.from_file(tmp_path / "model_config.yaml")


def test_model_config_reads_numbers_yaml_reads_as_strings(tmp_path: Path) -> None:
    (tmp_path / "model_config.yaml").write_text("n_layer: 2\nn_head: 2\nn_embd: 8\nnorm_eps: 1e-5\nrope_base: 10000\n")
    config = Config.from_file(tmp_path / "model_config.yaml")
    assert config.norm_eps == 1e-5 and isinstance(config.rope_base, float)


# ---- a full disk ----------------------------------------------------------------------------------------------------


def test_a_full_disk_while_saving_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def full_write(*args, **kwargs) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(DiskFullError, match=r"Out of disk space while writing .*state\.pth \(it needs 2\.0 GB; .* is "
                                            r"free there now\)\. The partial write was removed and the previous "
                                            r"checkpoint is intact\. Free some space"):
        with disk_full_as_error(tmp_path / "state.pth", needed_bytes=2 * 10**9,
                                intact="the previous checkpoint is intact"):
            full_write()
    # torch's C++ writer reports a short write without an errno; with the disk (nearly) full it means the same.
    monkeypatch.setattr(errors, "free_bytes", lambda path: 4096)
    with pytest.raises(DiskFullError, match="Out of disk space while writing"):
        with disk_full_as_error(tmp_path / "state.pth"):
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
    monkeypatch.setattr(errors, "free_bytes", lambda path: 10**12)  # plenty of space: not a full disk
    with pytest.raises(RuntimeError, match="unexpected pos"):
        with disk_full_as_error(tmp_path / "state.pth"):
            raise RuntimeError("unexpected pos 576 vs 534")
    with pytest.raises(KeyError):  # anything else passes unchanged
        with disk_full_as_error(tmp_path / "state.pth"):
            raise KeyError("x")


def test_a_full_disk_in_a_checkpoint_save_keeps_the_previous_one(tmp_path: Path, monkeypatch) -> None:
    target = tmp_path / "step-000002"
    write_dir_atomically(target, lambda d: (d / "a.txt").write_text("old"))

    def fill(d: Path) -> None:
        (d / "a.txt").write_text("new")
        save_state_dict({"w": torch.zeros(4)}, d / "lit_model.pth")

    def full_save(obj, f) -> None:
        f.write(b"x" * 100)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_save)
    with pytest.raises(DiskFullError, match=r"Out of disk space while writing .*step-000002 \(.*\)\. The partial "
                                            r"write was removed and the previous step-000002 is intact"):
        write_dir_atomically(target, fill, replace=True)
    assert (target / "a.txt").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["step-000002"]
