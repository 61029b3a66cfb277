"""scripts/download.py offline: snapshot_download is replaced by a fake Hub serving a tiny saved model, or failing."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Callable, Optional

import pytest
import torch

from lit_model.checkpoint_io import load_model
from tests.hf_models import load_script, make_hf_model, random_tokens, save_as_bin

try:  # the HTTP library of huggingface_hub >= 2; older versions used httpx
    import httpx2 as httpx
except ImportError:
    import httpx


@pytest.fixture(scope="module")
def download() -> Callable[..., Path]:
    return load_script("download").download


def install_fake_hub(
    monkeypatch: pytest.MonkeyPatch, source: Optional[Path], error: Optional[Exception] = None
) -> list[dict[str, Any]]:
    """Make huggingface_hub.snapshot_download copy the files of `source` that the patterns select (or raise)."""
    import huggingface_hub
    from huggingface_hub.utils import filter_repo_objects

    calls: list[dict[str, Any]] = []

    def snapshot_download(repo_id: str, *, local_dir, allow_patterns=None, ignore_patterns=None, token=None, **kw):
        calls.append(dict(repo_id=repo_id, allow=list(allow_patterns), ignore=list(ignore_patterns), token=token))
        if error is not None:
            raise error
        assert source is not None
        files = [p.relative_to(source).as_posix() for p in source.rglob("*") if p.is_file()]
        for name in filter_repo_objects(files, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns):
            (Path(local_dir) / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source / name, Path(local_dir) / name)
        return str(local_dir)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return calls


def http_error(cls: type, status: int) -> Exception:
    response = httpx.Response(status, request=httpx.Request("GET", "https://huggingface.co/api/models/org/tiny"))
    return cls(f"{status} error", response=response)


def test_downloads_safetensors_and_converts(download, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hf_model, source = make_hf_model("mistral", tmp_path)
    (source / "tokenizer.json").write_text("{}")
    (source / "consolidated.safetensors").write_bytes(b"the same weights in Meta's format")
    (source / "README.md").write_text("a model card")
    torch.save({}, source / "pytorch_model.bin")  # a repo with both formats: only safetensors come
    monkeypatch.setenv("HF_TOKEN", "hf_from_env")
    calls = install_fake_hub(monkeypatch, source)

    target = download(repo_id="org/tiny", checkpoint_dir=tmp_path / "checkpoints")

    assert target == tmp_path / "checkpoints" / "org" / "tiny"
    assert sorted(p.name for p in target.iterdir()) == [
        "checksums.json", "config.json", "generation_config.json", "lit_model.pth", "model.safetensors", "model_config.yaml",
        "tokenizer.json",
    ]
    assert len(calls) == 2 and all(c["token"] == "hf_from_env" and c["repo_id"] == "org/tiny" for c in calls)
    assert "config.json" in calls[0]["allow"] and "*.safetensors" not in calls[0]["allow"]  # config first, small
    assert calls[1]["allow"] == ["*.safetensors", "*.safetensors.index.json"]
    model = load_model(target)
    for x in random_tokens(hf_model.config.vocab_size, (1, 9)):
        with torch.no_grad():
            torch.testing.assert_close(model(x), hf_model(x).logits, atol=1e-4, rtol=0)


def test_falls_back_to_bin_and_passes_the_token(download, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hf_model, source = make_hf_model("gpt_neox", tmp_path)
    save_as_bin(source, n_shards=2)
    calls = install_fake_hub(monkeypatch, source)

    target = download(repo_id="org/tiny", access_token="hf_given", checkpoint_dir=tmp_path, dtype="bfloat16")

    assert [c["allow"][0] for c in calls] == ["config.json", "*.safetensors", "*.bin"]
    assert all(c["token"] == "hf_given" for c in calls)
    assert {p.dtype for p in load_model(target).parameters()} == {torch.bfloat16}


def test_convert_false_only_downloads(download, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _, source = make_hf_model("llama", tmp_path)
    install_fake_hub(monkeypatch, source)
    target = download(repo_id="org/tiny", checkpoint_dir=tmp_path / "c", convert=False)
    assert (target / "model.safetensors").is_file() and not (target / "lit_model.pth").exists()


@pytest.mark.parametrize(
    "make_error, expected, match",
    [
        (lambda e: http_error(e.GatedRepoError, 403), PermissionError,
         r"org/tiny is a gated model\. Accept its license at https://huggingface\.co/org/tiny .*--access_token"),
        (lambda e: http_error(e.RepositoryNotFoundError, 404), FileNotFoundError,
         r"Repository 'org/tiny' was not found .*Known models: .*EleutherAI/pythia-14m"),
        (lambda e: http_error(e.HfHubHTTPError, 401), PermissionError, r"refused the token .*--access_token"),
        (lambda e: e.LocalEntryNotFoundError("no cache"), ConnectionError,
         r"Hub is unreachable and the files are not in the local cache\. Check your internet connection"),
        (lambda e: httpx.ConnectError("Name or service not known"), ConnectionError, r"Hub is unreachable"),
    ],
)
def test_hub_failures_say_what_to_do(
    make_error, expected: type, match: str, download, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import errors

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    install_fake_hub(monkeypatch, None, error=make_error(errors))
    with pytest.raises(expected, match=match):
        download(repo_id="org/tiny", checkpoint_dir=tmp_path)


def test_offline_mode_is_named(download, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub.errors import LocalEntryNotFoundError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    install_fake_hub(monkeypatch, None, error=LocalEntryNotFoundError("outgoing traffic has been disabled"))
    with pytest.raises(ConnectionError, match=r"HF_HUB_OFFLINE is set: unset it"):
        download(repo_id="org/tiny", checkpoint_dir=tmp_path)


def test_bad_arguments_fail_before_any_weights(download, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _, source = make_hf_model("llama", tmp_path)
    calls = install_fake_hub(monkeypatch, source)
    with pytest.raises(ValueError, match=r"--repo_id must look like ORG/NAME .*got 'tiny'"):
        download(repo_id="tiny", checkpoint_dir=tmp_path)
    with pytest.raises(ValueError, match=r"Unknown dtype 'fp8'"):
        download(repo_id="org/tiny", checkpoint_dir=tmp_path, dtype="fp8")
    assert calls == []
    config = (source / "config.json").read_text().replace('"model_type": "llama"', '"model_type": "gpt2"')
    (source / "config.json").write_text(config)
    with pytest.raises(ValueError, match=r"Unsupported model_type 'gpt2'"):
        download(repo_id="org/tiny", checkpoint_dir=tmp_path / "c")
    assert len(calls) == 1  # only the config was fetched
    (source / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"has no config\.json: it is not a transformers model"):
        download(repo_id="org/other", checkpoint_dir=tmp_path / "c")


def test_no_weights_in_repo(download, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _, source = make_hf_model("llama", tmp_path)
    (source / "model.safetensors").unlink()
    install_fake_hub(monkeypatch, source)
    with pytest.raises(FileNotFoundError, match=r"org/tiny has no \*\.safetensors or \*\.bin weights"):
        download(repo_id="org/tiny", checkpoint_dir=tmp_path / "c")


def test_help_lists_the_presets(download, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    from jsonargparse import CLI

    from lit_model.config import PRESETS

    monkeypatch.setenv("COLUMNS", "10000")  # no line wrapping inside the names
    with pytest.raises(SystemExit):
        CLI(download, as_positional=False, args=["--help"])
    help_text = capsys.readouterr().out
    assert "--repo_id" in help_text
    for preset in PRESETS.values():
        assert preset["hf_repo"] in help_text
