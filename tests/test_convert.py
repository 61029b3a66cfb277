"""Hugging Face <-> ours conversion, proven logit for logit against transformers on tiny random models."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from tests.hf_models import ARCHITECTURES, convert, load_script, make_hf_model, random_tokens, save_as_bin

from lit_model import GPT
from lit_model.checkpoint_io import load_model, load_state_dict

ATOL = 1e-4


def hf_logits(model, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).logits


def our_logits(model: GPT, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def assert_same_logits(hf_model, ours: GPT, vocab_size: int) -> None:
    # Sequences of different lengths run separately (13 > the sliding windows of 4 and 5), plus one batch.
    for x in [*random_tokens(vocab_size, (1, 7, 13)), torch.randint(0, vocab_size, (3, 9))]:
        expected = hf_logits(hf_model, x)
        assert expected.abs().mean() > 0.3  # the re-initialised weights give logits that can reveal errors
        torch.testing.assert_close(our_logits(ours, x), expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("variant", ARCHITECTURES)
def test_hf_to_ours_same_logits(variant: str, tmp_path: Path) -> None:
    hf_model, directory = make_hf_model(variant, tmp_path)
    ours = convert(directory)
    assert ours.config.hf_model_type == hf_model.config.model_type
    assert_same_logits(hf_model, ours, hf_model.config.vocab_size)


# Each feature the parity test relies on must change the logits, or the test above could not catch its loss.
@pytest.mark.parametrize(
    "variant, field, value",
    [
        ("mistral", "sliding_window", None),
        ("mistral", "sliding_window", 5),  # off by one
        ("phi3", "sliding_window", 4),
        ("llama3", "rope_adjustments", None),
        ("gpt_neox", "rotary_percentage", 0.5),
        ("gpt_neox", "rope_base", 100.0),
        ("gemma", "scale_embeddings", False),
    ],
)
def test_parity_test_detects_config_errors(variant: str, field: str, value, tmp_path: Path) -> None:
    hf_model, directory = make_hf_model(variant, tmp_path)
    ours = convert(directory)
    wrong = GPT(dataclasses.replace(ours.config, **{field: value})).eval()
    wrong.load_state_dict(ours.state_dict())
    x = random_tokens(hf_model.config.vocab_size, (13,))[0]
    assert (our_logits(wrong, x) - hf_logits(hf_model, x)).abs().max() > 1e-2


@pytest.mark.parametrize("variant", ARCHITECTURES)
def test_ours_to_hf_round_trip(variant: str, tmp_path: Path) -> None:
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    hf_model, directory = make_hf_model(variant, tmp_path)
    convert(directory)
    out = load_script("convert_lit_checkpoint").convert_lit_checkpoint(directory, tmp_path / "exported")
    # The exported tensors are the original ones, bit for bit, under the original names (fused ones re-fused).
    original, exported = load_file(directory / "model.safetensors"), load_file(out / "model.safetensors")
    assert exported.keys() == original.keys()
    for name, tensor in exported.items():
        assert torch.equal(tensor, original[name]), name
    reloaded, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys
    assert type(reloaded) is type(hf_model)
    for x in random_tokens(hf_model.config.vocab_size, (1, 13)):
        torch.testing.assert_close(hf_logits(reloaded.eval(), x), hf_logits(hf_model, x), atol=ATOL, rtol=0)
    config = json.loads((out / "config.json").read_text())
    assert config["torch_dtype"] == "float32" and config["architectures"] == [type(hf_model).__name__]


def test_export_sharded_and_bfloat16_with_tokenizer(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.tokenizer_utils import make_bpe_tokenizer

    hf_model, directory = make_hf_model("phi3", tmp_path)
    make_bpe_tokenizer(directory)
    load_script("convert_hf_checkpoint").convert_hf_checkpoint(checkpoint_dir=directory, dtype="bfloat16")
    assert all(t.dtype == torch.bfloat16 for t in load_state_dict(directory / "lit_model.pth").values())
    export = load_script("convert_lit_checkpoint").convert_lit_checkpoint
    out = export(directory, tmp_path / "out", max_shard_size="20KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2 and not (out / "model.safetensors").exists()
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert reloaded.dtype == torch.bfloat16
    for name, tensor in reloaded.state_dict().items():  # phi3 names the same in memory and on disk
        assert torch.equal(tensor, hf_model.state_dict()[name].to(torch.bfloat16)), name
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= {p.name for p in out.iterdir()}
    text = "Hello tokenizer"
    assert AutoTokenizer.from_pretrained(out)(text).input_ids == AutoTokenizer.from_pretrained(directory)(text).input_ids
    # --precision widens the bf16 checkpoint on export: float32 tensors, exactly the bf16 values.
    wide = export(directory, tmp_path / "wide", precision="32-true")
    assert json.loads((wide / "config.json").read_text())["torch_dtype"] == "float32"
    reloaded = AutoModelForCausalLM.from_pretrained(wide, dtype=torch.float32).eval()
    for name, tensor in reloaded.state_dict().items():
        assert tensor.dtype == torch.float32 and torch.equal(tensor, hf_model.state_dict()[name].to(torch.bfloat16)
                                                              .float()), name


def test_sharded_safetensors_stream_one_shard_at_a_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What this checks: every tensor is read on its own with safe_open().get_tensor (never a whole-file load), and
    the converted tensors of each shard are written out before the next shard is read; so at most one shard of
    converted tensors is held in memory. It does not measure memory itself."""
    import safetensors
    import safetensors.torch

    import lit_model.hf.convert as hf_convert

    hf_model, directory = make_hf_model("llama", tmp_path, save_kwargs=dict(max_shard_size="20KB"))
    weight_map = json.loads((directory / "model.safetensors.index.json").read_text())["weight_map"]
    shards = list(dict.fromkeys(weight_map.values()))
    assert len(shards) >= 3
    events: list[tuple] = []
    real_open, real_save = safetensors.safe_open, hf_convert.save_state_dict

    class SpyOpen:
        def __init__(self, path, framework, device="cpu"):
            self.file, self.name = real_open(path, framework=framework, device=device), Path(path).name

        def __enter__(self):
            self.file.__enter__()
            return self

        def __exit__(self, *exc):
            return self.file.__exit__(*exc)

        def keys(self):
            return self.file.keys()

        def get_tensor(self, key):
            events.append(("read", self.name, key))
            return self.file.get_tensor(key)

    def spy_save(state_dict, path):
        events.append(("save", Path(path).name, set(state_dict)))
        real_save(state_dict, path)

    def no_whole_file(*args, **kwargs):
        raise AssertionError("a whole safetensors file was loaded at once")

    monkeypatch.setattr(safetensors, "safe_open", SpyOpen)
    monkeypatch.setattr(safetensors.torch, "load_file", no_whole_file)
    monkeypatch.setattr(hf_convert, "save_state_dict", spy_save)
    ours = convert(directory)
    assert_same_logits(hf_model, ours, hf_model.config.vocab_size)

    # Expected: [reads of shard 1, save of part 1, reads of shard 2, save of part 2, ..., save of lit_model.pth].
    saves = [i for i, e in enumerate(events) if e[0] == "save"]
    assert len(saves) == len(shards) + 1 and events[saves[-1]][1] == "lit_model.pth"
    start = 0
    for shard, end in zip(shards, saves):
        reads = events[start:end]
        assert reads and all(e[0] == "read" and e[1] == shard for e in reads)
        hf_keys = [e[2] for e in reads]
        assert len(hf_keys) == len(set(hf_keys))  # each tensor read once
        ours_keys = {n for k in hf_keys for n, _ in hf_convert.hf_to_lit(k, torch.empty(0), ours.config)}
        assert events[end][2] == ours_keys  # the part holds exactly this shard's tensors
        start = end + 1
    assert not list(directory.glob("*.tmp"))  # the parts are gone


@pytest.mark.parametrize("variant, n_shards", [("gpt_neox", 1), ("llama3", 3)])
def test_bin_checkpoints_convert(variant: str, n_shards: int, tmp_path: Path) -> None:
    hf_model, directory = make_hf_model(variant, tmp_path)
    save_as_bin(directory, n_shards)
    assert not list(directory.glob("*.safetensors"))
    # Files that must not be taken for weights: training state, a macOS fork, Mistral's duplicate in Meta's names
    (directory / "training_args.bin").write_bytes(b"pickled arguments")
    (directory / "._pytorch_model.bin").write_bytes(b"resource fork")
    (directory / "consolidated.safetensors").write_bytes(b"the same weights under Meta's names")
    assert_same_logits(hf_model, convert(directory), hf_model.config.vocab_size)


def test_converted_weights_are_shared_when_tied_and_plainly_loadable(tmp_path: Path) -> None:
    hf_model, directory = make_hf_model("gemma", tmp_path)
    ours = convert(directory)
    assert ours.lm_head.weight is ours.transformer.wte.weight
    state = torch.load(directory / "lit_model.pth", weights_only=True)
    assert state.keys() == GPT(ours.config).state_dict().keys()  # a plain strict load_state_dict works too
    head, embedding = state["lm_head.weight"], state["transformer.wte.weight"]
    assert head.untyped_storage().data_ptr() == embedding.untyped_storage().data_ptr()


def test_cli_parses_and_converts(tmp_path: Path) -> None:
    from jsonargparse import CLI

    hf_model, directory = make_hf_model("qwen2", tmp_path)
    script = load_script("convert_hf_checkpoint")
    args = ["--checkpoint_dir", str(directory), "--dtype", "float32"]
    CLI(script.convert_hf_checkpoint, as_positional=False, args=args)
    assert_same_logits(hf_model, load_model(directory), hf_model.config.vocab_size)


# ---- legacy and partial config keys of real checkpoints ------------------------------------------------------------


def test_gemma_legacy_gelu_means_the_tanh_approximation(tmp_path: Path) -> None:
    hf_model, directory = make_hf_model("gemma", tmp_path)
    edit_config(directory, hidden_act="gelu")  # as in the official Gemma configs; transformers reads it as tanh
    assert_same_logits(hf_model, convert(directory), hf_model.config.vocab_size)


def test_gpt_neox_legacy_rotary_emb_base(tmp_path: Path) -> None:
    hf_model, directory = make_hf_model("gpt_neox", tmp_path, rotary_emb_base=100.0)
    config = json.loads((directory / "config.json").read_text())
    del config["rope_parameters"]  # the keys of the Pythia config.json files instead
    (directory / "config.json").write_text(json.dumps({**config, "rotary_emb_base": 100.0, "rotary_pct": 0.25}))
    assert_same_logits(hf_model, convert(directory), hf_model.config.vocab_size)


def test_qwen2_partly_windowed_is_refused(tmp_path: Path) -> None:
    _, directory = make_hf_model("qwen2", tmp_path, use_sliding_window=True, sliding_window=4, max_window_layers=1)
    with pytest.raises(ValueError, match="sliding"):
        convert_hf(checkpoint_dir=directory)


# ---- bad input ---------------------------------------------------------------------------------------------------


def convert_hf(**kwargs):
    return load_script("convert_hf_checkpoint").convert_hf_checkpoint(**kwargs)


def edit_config(directory: Path, **changes) -> None:
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, **changes}))


def test_missing_directory(tmp_path: Path) -> None:
    hint = r"does not exist\. Download .* `python scripts/download.py --repo_id Org/Name`"
    with pytest.raises(FileNotFoundError, match=hint):
        convert_hf(checkpoint_dir=tmp_path / "checkpoints" / "Org" / "Name")


def test_no_weights_and_no_config(tmp_path: Path) -> None:
    _, directory = make_hf_model("llama", tmp_path)
    (directory / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"No Hugging Face weights \(\*\.safetensors or \*\.bin\)"):
        convert_hf(checkpoint_dir=directory)
    (directory / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"No config\.json .* pass --model_name with a preset name"):
        convert_hf(checkpoint_dir=directory)


@pytest.mark.parametrize(
    "changes, match",
    [
        (dict(num_hidden_layers=3), r"missing from the weights \(\d+\): transformer\.h\.2\."),
        (dict(num_hidden_layers=1), r"not in the model \(\d+\): model\.layers\.1\."),
        (dict(intermediate_size=40), r"shape differs .*mlp\.fc_1\.weight\): file \(48, 32\), model \(40, 32\)"),
        (dict(num_key_value_heads=4), r"shape differs .*attn\.key\.weight"),
    ],
)
def test_config_does_not_match_weights(changes: dict, match: str, tmp_path: Path) -> None:
    _, directory = make_hf_model("llama", tmp_path)
    edit_config(directory, **changes)
    with pytest.raises(ValueError, match=match) as err:
        convert_hf(checkpoint_dir=directory)
    assert "Re-convert with the config that belongs to these weights" in str(err.value)
    assert not (directory / "lit_model.pth").exists() and not (directory / "model_config.yaml").exists()


def test_fused_rows_do_not_match_config(tmp_path: Path) -> None:
    _, directory = make_hf_model("phi3", tmp_path)
    edit_config(directory, num_key_value_heads=4)
    with pytest.raises(ValueError, match=r"qkv_proj\.weight has 64 rows, the config expects 96"):
        convert_hf(checkpoint_dir=directory)


def test_unknown_and_wrong_presets(tmp_path: Path) -> None:
    _, directory = make_hf_model("llama", tmp_path)
    with pytest.raises(ValueError, match=r"Unknown model preset 'pythia-14M'\. Did you mean: pythia-14m"):
        convert_hf(checkpoint_dir=directory, model_name="pythia-14M")
    with pytest.raises(ValueError, match=r"(?s)do not match .* not in the model .*model\.embed_tokens\.weight"):
        convert_hf(checkpoint_dir=directory, model_name="pythia-14m")


def test_unsupported_architecture_and_dtype(tmp_path: Path) -> None:
    _, directory = make_hf_model("llama", tmp_path)
    with pytest.raises(ValueError, match=r"Unknown dtype 'int8': use one of float32, bfloat16, float16"):
        convert_hf(checkpoint_dir=directory, dtype="int8")
    edit_config(directory, model_type="gpt2")
    with pytest.raises(ValueError, match=r"Unsupported model_type 'gpt2'"):
        convert_hf(checkpoint_dir=directory)


def test_pickled_module_is_refused(tmp_path: Path) -> None:
    hf_model, directory = make_hf_model("llama", tmp_path)
    (directory / "model.safetensors").unlink()
    torch.save(torch.nn.Linear(2, 2), directory / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"pytorch_model\.bin is not a plain state dict\. Only plain state dicts"):
        convert_hf(checkpoint_dir=directory)


def test_export_refuses_what_it_cannot_express(tmp_path: Path) -> None:
    from lit_model.checkpoint_io import save_state_dict
    from lit_model.hf.families import hf_config_dict

    _, directory = make_hf_model("llama", tmp_path)
    ours = convert(directory)
    export = load_script("convert_lit_checkpoint").convert_lit_checkpoint
    with pytest.raises(FileExistsError, match="already holds a Hugging Face checkpoint"):
        export(directory, directory)
    with pytest.raises(ValueError, match=r"Cannot read the size 'lots': use e\.g\. 5GB"):
        export(directory, tmp_path / "out", max_shard_size="lots")
    with pytest.raises(ValueError, match=r"cannot be expressed as a Hugging Face llama model; .*parallel_residual"):
        hf_config_dict(dataclasses.replace(ours.config, parallel_residual=True))
    with pytest.raises(ValueError, match=r"cannot be expressed as a Hugging Face qwen2 model; .*attn_bias"):
        hf_config_dict(dataclasses.replace(ours.config, hf_model_type="qwen2"))
    state = ours.state_dict()
    state["transformer.h.0.attn.query.lora_A"] = torch.zeros(2, 32)
    save_state_dict(state, directory / "lit_model.pth")
    with pytest.raises(ValueError, match=r"(?s)not in the model .*lora_A\nLoRA weights cannot be exported: merge"):
        export(directory, tmp_path / "out")
