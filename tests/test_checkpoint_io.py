"""State dict files, checkpoint directories and loading into (meta-device) models."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from lit_model import GPT, Config
from lit_model.checkpoint_io import (
    check_checkpoint_dir,
    load_checkpoint,
    load_model,
    load_state_dict,
    save_checkpoint_dir,
    save_state_dict,
)


def tiny_config(**overrides) -> Config:
    kwargs = dict(name="tiny", n_layer=2, n_head=4, n_embd=16, n_query_groups=2, intermediate_size=24,
                  vocab_size=32, block_size=16)
    return Config(**{**kwargs, **overrides})


def tiny_model(**overrides) -> GPT:
    model = GPT(tiny_config(**overrides))
    model.init_weights(std=0.2)
    return model


# ---- state dict files -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_state_dict_round_trip(suffix: str, tmp_path: Path) -> None:
    state = {"a": torch.randn(3, 4), "b": torch.arange(5)}
    state["tied"] = state["a"]  # shared memory: torch.save stores it once, safetensors gets a copy
    save_state_dict(state, tmp_path / f"w{suffix}")
    loaded = load_state_dict(tmp_path / f"w{suffix}")
    assert loaded.keys() == state.keys()
    for k in state:
        assert torch.equal(loaded[k], state[k])
    assert os.stat(tmp_path / f"w{suffix}").st_mode & 0o777 == 0o666 & ~_umask()
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"w{suffix}"]  # no temporary files left


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_pth_is_memory_mapped_and_training_checkpoints_unwrap(tmp_path: Path) -> None:
    state = {"w": torch.randn(4, 4)}
    torch.save({"model": state, "step": 3, "optimizer": {"state": {}}}, tmp_path / "train.pth")
    loaded = load_state_dict(tmp_path / "train.pth")
    assert loaded.keys() == {"w"} and torch.equal(loaded["w"], state["w"])
    torch.save(state, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)  # cannot be mapped: read whole
    assert torch.equal(load_state_dict(tmp_path / "legacy.pth")["w"], state["w"])


def test_save_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "lit_model.pth"
    save_state_dict({"w": torch.ones(2)}, path)

    def broken_save(obj, f) -> None:
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_state_dict({"w": torch.zeros(2)}, path)
    assert torch.equal(load_state_dict(path)["w"], torch.ones(2))  # the old file is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checksums.json", "lit_model.pth"]


def test_refuses_what_is_not_a_plain_state_dict(tmp_path: Path) -> None:
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pth")
    with pytest.raises(ValueError, match=r"module\.pth is not a plain state dict\. Only plain state dicts .* and "
                                         r"\.safetensors files are accepted; loading it with weights_only=True failed"):
        load_state_dict(tmp_path / "module.pth")
    torch.save({"w": torch.ones(1), "lr": 0.1}, tmp_path / "mixed.pth")
    with pytest.raises(ValueError, match=r"mixed\.pth is not a plain state dict.*not tensors: 'lr' \(float\)"):
        load_state_dict(tmp_path / "mixed.pth")
    torch.save([torch.ones(1)], tmp_path / "list.pth")
    with pytest.raises(ValueError, match=r"list\.pth is not a plain state dict.*it holds a list"):
        load_state_dict(tmp_path / "list.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match=r"junk\.pth is not a plain state dict"):
        load_state_dict(tmp_path / "junk.pth")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(ValueError, match=r"junk\.safetensors is not a valid \.safetensors file"):
        load_state_dict(tmp_path / "junk.safetensors")
    with pytest.raises(FileNotFoundError, match="No checkpoint file at"):
        load_state_dict(tmp_path / "absent.pth")


# ---- checkpoint directories ---------------------------------------------------------------------------------------


def test_check_checkpoint_dir_says_how_to_fix(tmp_path: Path) -> None:
    missing = tmp_path / "checkpoints" / "EleutherAI" / "pythia-14m"
    with pytest.raises(FileNotFoundError, match=r"does not exist\. .*`python scripts/download\.py --repo_id "
                                                r"EleutherAI/pythia-14m`"):
        check_checkpoint_dir(missing)
    with pytest.raises(FileNotFoundError, match=r"does not exist\. .*--repo_id ORG/NAME.*--help"):
        check_checkpoint_dir(tmp_path / "elsewhere")
    missing.mkdir(parents=True)
    (missing / "config.json").write_text("{}")
    (missing / "model.safetensors").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"lacks lit_model\.pth and model_config\.yaml\. It holds Hugging Face "
                                                r"weights: .*convert_hf_checkpoint\.py --checkpoint_dir "):
        check_checkpoint_dir(missing)
    lora = tmp_path / "lora"
    lora.mkdir()
    tiny_config().save(lora / "model_config.yaml")
    (lora / "lit_model.lora.pth").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"lacks lit_model\.pth\. It holds LoRA weights only: .*merge_lora"):
        check_checkpoint_dir(lora)
    assert check_checkpoint_dir(lora, need_weights=False) == lora


def test_save_checkpoint_dir_copies_tokenizer_files(tmp_path: Path) -> None:
    source = tmp_path / "source"
    source.mkdir()
    (source / "tokenizer.json").write_text("{}")
    (source / "generation_config.json").write_text('{"eos_token_id": 2}')
    (source / "notes.txt").write_text("not a tokenizer file")
    model = tiny_model()
    target = save_checkpoint_dir(tmp_path / "out", model.state_dict(), model.config, copy_files_from=source)
    assert sorted(p.name for p in target.iterdir()) == [
        "checksums.json", "generation_config.json", "lit_model.pth", "model_config.yaml", "tokenizer.json"
    ]
    assert check_checkpoint_dir(target) == target


# ---- loading into models --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tied, with_head_key", [(False, True), (True, True), (True, False)])
def test_load_into_meta_model(tied: bool, with_head_key: bool, tmp_path: Path) -> None:
    reference = tiny_model(tie_embeddings=tied).eval()
    state = reference.state_dict()
    if not with_head_key:  # a tied checkpoint may or may not list the head
        del state["lm_head.weight"]
    save_state_dict(state, tmp_path / "lit_model.pth")
    with torch.device("meta"):
        model = GPT(reference.config)
    assert load_checkpoint(model, tmp_path / "lit_model.pth") == []
    assert not any(p.is_meta for p in model.parameters())
    assert (model.lm_head.weight is model.transformer.wte.weight) == tied
    n_params = sum(p.numel() for p in model.parameters())  # a tied head counts once
    assert n_params == sum(p.numel() for p in reference.parameters())
    x = torch.randint(0, 32, (2, 7))
    torch.testing.assert_close(model.eval()(x), reference(x), atol=0, rtol=0)


def test_load_checkpoint_names_the_mismatch(tmp_path: Path) -> None:
    model = tiny_model()
    save_state_dict(model.state_dict(), tmp_path / "w.pth")
    shapes = r"shape differs \(2\): lm_head\.weight: file \(32, 16\), model \(48, 16\), transformer\.wte\.weight"
    with pytest.raises(ValueError, match=rf"(?s)do not match the model.*{shapes}.*Re-convert with the config"):
        load_checkpoint(GPT(tiny_config(vocab_size=48)), tmp_path / "w.pth")
    with pytest.raises(ValueError, match=r"missing from the weights \(\d+\): transformer\.h\.2\."):
        load_checkpoint(GPT(tiny_config(n_layer=3)), tmp_path / "w.pth")
    with pytest.raises(ValueError, match=r"not in the model \(\d+\): transformer\.h\.1\."):
        load_checkpoint(GPT(tiny_config(n_layer=1)), tmp_path / "w.pth")
    # strict=False tolerates missing and unexpected keys, never a wrong shape
    one_layer = GPT(tiny_config(n_layer=1))
    assert load_checkpoint(one_layer, tmp_path / "w.pth", strict=False) == []
    assert torch.equal(one_layer.transformer.h[0].attn.query.weight, model.transformer.h[0].attn.query.weight)
    with pytest.raises(ValueError, match="shape differs"):
        load_checkpoint(GPT(tiny_config(vocab_size=48)), tmp_path / "w.pth", strict=False)


def test_missing_ok_allows_what_the_caller_initialises(tmp_path: Path) -> None:
    model = tiny_model()
    state = model.state_dict()
    del state["transformer.h.0.norm_1.weight"], state["lm_head.weight"]
    save_state_dict(state, tmp_path / "w.pth")
    target = tiny_model()
    with pytest.raises(ValueError, match=r"missing from the weights \(1\): lm_head\.weight"):
        load_checkpoint(target, tmp_path / "w.pth", missing_ok=lambda key: "norm" in key)
    allowed = load_checkpoint(target, tmp_path / "w.pth", missing_ok=lambda key: key != "absent")
    assert sorted(allowed) == ["lm_head.weight", "transformer.h.0.norm_1.weight"]
    assert torch.equal(target.transformer.h[1].mlp.proj.weight, model.transformer.h[1].mlp.proj.weight)


def test_load_model(tmp_path: Path) -> None:
    reference = tiny_model(tie_embeddings=True).eval()
    save_checkpoint_dir(tmp_path, reference.state_dict(), reference.config)
    model = load_model(tmp_path)
    assert not model.training and model.config == reference.config
    x = torch.randint(0, 32, (1, 9))
    torch.testing.assert_close(model(x), reference(x), atol=0, rtol=0)
    bf16 = load_model(tmp_path, dtype=torch.bfloat16, device=torch.device("cpu"))
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    assert bf16.lm_head.weight is bf16.transformer.wte.weight  # still tied after the cast
    torch.testing.assert_close(bf16(x).float(), reference(x), atol=0.15, rtol=0.05)
    (tmp_path / "lit_model.pth").unlink()
    with pytest.raises(FileNotFoundError, match="lacks lit_model.pth"):
        load_model(tmp_path)
