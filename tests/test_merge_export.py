"""LoRA checkpoints merged (scripts/merge_lora.py) and exported (scripts/convert_lit_checkpoint.py), checked against
the unmerged LoRA model, transformers (the merged export) and peft (the adapter export on the exported base)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import torch
import yaml

from lit_model import GPT
from lit_model.checkpoint_io import load_model, load_state_dict, save_state_dict
from lit_model.peft.lora import LoRAConfig, apply_lora
from lit_model.peft.base import adapter_state_dict
from tests.hf_models import convert, load_script, make_hf_model, random_tokens
from tests.tokenizer_utils import make_bpe_tokenizer

ATOL = 1e-4
ALL_TARGETS = dict(query=True, key=True, value=True, projection=True, mlp=True)


class LoRARun(NamedTuple):
    hf_model: Any  # the transformers base model
    base_dir: Path  # its directory, converted (HF files, lit_model.pth, model_config.yaml, tokenizer)
    lora_dir: Path  # a LoRA checkpoint directory as a LoRA fine-tune writes it
    model: GPT  # the LoRA model whose adapters lora_dir holds (unmerged, eval mode)


def make_lora_run(tmp_path: Path, variant: str = "llama", quantize: str | None = None, **lora: Any) -> LoRARun:
    """A converted tiny HF base model and a LoRA fine-tune of it, with random non-zero adapters, saved as
    lit_model/training.py `save_final` does: lit_model.lora.pth, model_config.yaml, tokenizer, hyperparameters.yaml,
    prompt_style.yaml."""
    from lit_model.prompts import PromptStyle, save_prompt_style

    hf_model, base_dir = make_hf_model(variant, tmp_path)
    make_bpe_tokenizer(base_dir)
    convert(base_dir)
    config = LoRAConfig(**{"r": 4, "alpha": 8.0, "dropout": 0.1, **lora})
    model = apply_lora(load_model(base_dir), config).eval()
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:  # B is zero after apply_lora: an adapter that changes nothing would prove nothing
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    lora_dir = tmp_path / "out" / "final"
    lora_dir.mkdir(parents=True)
    save_state_dict(adapter_state_dict(model), lora_dir / "lit_model.lora.pth")
    model.config.save(lora_dir / "model_config.yaml")
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if (base_dir / name).is_file():
            shutil.copy2(base_dir / name, lora_dir / name)
    hparams = dict(checkpoint_dir=str(base_dir), out_dir=str(tmp_path / "out"), precision=None, quantize=quantize,
                   lora=dataclasses.asdict(config), mode="lora")
    (lora_dir / "hyperparameters.yaml").write_text(yaml.safe_dump(hparams, sort_keys=False))
    save_prompt_style(PromptStyle.from_name("alpaca"), lora_dir)
    return LoRARun(hf_model, base_dir, lora_dir, model)


def logits(model: Any, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(x)
    return getattr(out, "logits", out)


def inputs(run: LoRARun) -> list[torch.Tensor]:
    vocab = run.model.config.vocab_size
    return [*random_tokens(vocab, (1, 11)), torch.randint(0, vocab, (2, 9))]


def assert_lora_logits(run: LoRARun, other: Any, atol: float = ATOL) -> None:
    """`other` computes the LoRA model's logits, which differ clearly from the base model's."""
    base = load_model(run.base_dir)
    for x in inputs(run):
        expected = logits(run.model, x)
        assert (expected - logits(base, x)).abs().max() > 0.5  # the adapters matter
        torch.testing.assert_close(logits(other, x), expected, atol=atol, rtol=0)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def merge(**kwargs: Any) -> Path:
    return load_script("merge_lora").merge_lora(**kwargs)


def export(**kwargs: Any) -> Path:
    return load_script("convert_lit_checkpoint").convert_lit_checkpoint(**kwargs)


# ---- merge -----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant, lora", [("llama", dict(ALL_TARGETS, head=True)), ("llama3", {})])
def test_merged_checkpoint_gives_the_lora_logits(variant: str, lora: dict, tmp_path: Path) -> None:
    run = make_lora_run(tmp_path, variant, **lora)
    before = digest(run.base_dir / "lit_model.pth")
    merged = merge(checkpoint_dir=run.lora_dir)
    assert merged == run.lora_dir / "merged"
    assert sorted(p.name for p in merged.iterdir()) == [
        "checksums.json", "generation_config.json", "hyperparameters.yaml", "lit_model.pth", "model_config.yaml", "prompt_style.yaml",
        "tokenizer.json", "tokenizer_config.json",
    ]
    assert not [p for p in merged.parent.iterdir() if p.name.startswith(".")]  # no temporary directory left
    assert digest(run.base_dir / "lit_model.pth") == before  # the base checkpoint is untouched
    model = load_model(merged)
    assert not any("lora" in k for k in load_state_dict(merged / "lit_model.pth"))
    assert (model.lm_head.weight is model.transformer.wte.weight) == model.config.tie_embeddings
    assert_lora_logits(run, model)
    hparams = yaml.safe_load((merged / "hyperparameters.yaml").read_text())
    assert hparams["mode"] == "merged" and hparams["merged_from"] == str(run.lora_dir)
    assert hparams["lora"]["r"] == 4 and hparams["base_checkpoint_dir"] == str(run.base_dir)
    from lit_model.prompts import load_prompt_style

    assert load_prompt_style(merged).name == "alpaca"


def test_merge_precision_output_dir_and_cli(tmp_path: Path) -> None:
    from jsonargparse import CLI

    run = make_lora_run(tmp_path)
    out = tmp_path / "merged-bf16"
    args = ["--checkpoint_dir", str(run.lora_dir), "--output_dir", str(out), "--precision", "bf16-true"]
    assert CLI(load_script("merge_lora").merge_lora, as_positional=False, args=args) == out
    state = load_state_dict(out / "lit_model.pth")
    assert {t.dtype for t in state.values()} == {torch.bfloat16}
    # Rounded once from the float32 sum: exactly the float32 merge, rounded.
    fp32 = load_state_dict(merge(checkpoint_dir=run.lora_dir) / "lit_model.pth")
    for name, tensor in state.items():
        assert torch.equal(tensor, fp32[name].to(torch.bfloat16)), name
    assert_lora_logits(run, load_model(out, dtype=torch.float32), atol=0.1)


def test_qlora_adapters_merge_into_the_dense_base(tmp_path: Path) -> None:
    """A QLoRA run's adapters were trained against the 4-bit base; the merge folds them into the dense base."""
    from lit_model.quantize import quantize_model

    run = make_lora_run(tmp_path, quantize="bnb.nf4", mlp=True)
    merged = load_model(merge(checkpoint_dir=run.lora_dir))
    assert_lora_logits(run, merged)  # the dense-base LoRA model
    # ... which differs from the 4-bit QLoRA model by the base's quantization error, as the dense base does.
    qlora = apply_lora(quantize_model(load_model(run.base_dir), "bnb.nf4", compute_dtype=torch.float32),
                       LoRAConfig(r=4, alpha=8.0, mlp=True)).eval()
    qlora.load_state_dict(adapter_state_dict(run.model), strict=False)
    x = inputs(run)[1]
    merge_gap = (logits(merged, x) - logits(qlora, x)).abs().mean()
    base_4bit = quantize_model(load_model(run.base_dir), "bnb.nf4", compute_dtype=torch.float32)
    base_gap = (logits(load_model(run.base_dir), x) - logits(base_4bit, x)).abs().mean()
    assert 0 < merge_gap < 2 * base_gap


def test_merge_with_a_moved_base(tmp_path: Path) -> None:
    run = make_lora_run(tmp_path)
    moved = shutil.move(run.base_dir, tmp_path / "elsewhere")
    with pytest.raises(FileNotFoundError, match=r"The base model of the LoRA checkpoint .*, '.*hf-llama' \("
                                                r"checkpoint_dir in .*hyperparameters\.yaml\), is not there\. Pass "
                                                r"--base_dir"):
        merge(checkpoint_dir=run.lora_dir)
    assert_lora_logits(run._replace(base_dir=moved), load_model(merge(checkpoint_dir=run.lora_dir, base_dir=moved)))


def test_merge_errors(tmp_path: Path) -> None:
    run = make_lora_run(tmp_path)
    hparams_path = run.lora_dir / "hyperparameters.yaml"
    hparams = yaml.safe_load(hparams_path.read_text())

    def with_hparams(**changes: Any) -> None:
        hparams_path.write_text(yaml.safe_dump({**hparams, **changes}))

    with pytest.raises(FileNotFoundError, match=r"Checkpoint directory '.*absent' does not exist"):
        merge(checkpoint_dir=tmp_path / "absent")
    with pytest.raises(ValueError, match=r"is not a LoRA checkpoint: it has no lit_model\.lora\.pth \(it holds a "
                                         r"full model \(lit_model\.pth\)\)"):
        merge(checkpoint_dir=run.base_dir)
    with pytest.raises(ValueError, match=r"Unknown dtype 'int4': use one of float32, bfloat16, float16"):
        merge(checkpoint_dir=run.lora_dir, precision="int4")

    with_hparams(lora=None)
    with pytest.raises(ValueError, match=r"has no `lora:` mapping \(r, alpha, dropout and the target switches\)"):
        merge(checkpoint_dir=run.lora_dir)
    with_hparams(lora={**hparams["lora"], "rank": 4})
    with pytest.raises(ValueError, match=r"unknown LoRA settings \['rank'\]; valid ones: \['alpha', "):
        merge(checkpoint_dir=run.lora_dir)
    with_hparams(lora={**hparams["lora"], "r": 0})
    with pytest.raises(ValueError, match=r"Invalid LoRA settings: --lora\.r must be a positive integer"):
        merge(checkpoint_dir=run.lora_dir)
    with_hparams(lora={**hparams["lora"], "r": 8, "key": True})  # not the settings the weights were trained with
    with pytest.raises(ValueError, match=r"(?s)missing from the weights \(4\): transformer\.h\.0\.attn\.key\.lora_A.*"
                                         r"shape differs .*lora_A: file \(4, 32\), model \(8, 32\).*must come from the "
                                         r"same training run"):
        merge(checkpoint_dir=run.lora_dir)
    with_hparams(checkpoint_dir=None)
    with pytest.raises(ValueError, match=r"does not name the base model \(checkpoint_dir\): pass --base_dir"):
        merge(checkpoint_dir=run.lora_dir)
    with_hparams(checkpoint_dir=str(tmp_path))  # a directory, but no model in it
    with pytest.raises(FileNotFoundError, match=r"\(checkpoint_dir in .*\) is not usable: Checkpoint directory .* "
                                                r"lacks lit_model\.pth and model_config\.yaml"):
        merge(checkpoint_dir=run.lora_dir)
    other = make_lora_run(tmp_path / "other", "qwen2")
    with pytest.raises(ValueError, match=r"The base model .*hf-qwen2 \(--base_dir\) is not the one the adapters in .* "
                                         r"were trained on: their model_config\.yaml files differ in hf_model_type "
                                         r"\('llama' vs 'qwen2'\), attn_bias"):
        merge(checkpoint_dir=run.lora_dir, base_dir=other.base_dir)
    hparams_path.unlink()
    with pytest.raises(FileNotFoundError, match=r"holds LoRA weights but no hyperparameters\.yaml, which records"):
        merge(checkpoint_dir=run.lora_dir)


def test_merge_output_is_written_whole_or_not_at_all(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import lit_model.peft.checkpoint as checkpoint_io  # where merge_lora_checkpoint looks copy_support_files up

    run = make_lora_run(tmp_path)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match=r"taken exists and is not empty: pass another --output_dir"):
        merge(checkpoint_dir=run.lora_dir, output_dir=tmp_path / "taken")
    real_copy = checkpoint_io.copy_support_files

    def disk_full(*args: Any) -> None:
        real_copy(*args)
        raise OSError("No space left on device")

    monkeypatch.setattr(checkpoint_io, "copy_support_files", disk_full)
    with pytest.raises(OSError, match=r"Out of disk space while writing .*merged .*intact"):
        merge(checkpoint_dir=run.lora_dir)
    assert sorted(p.name for p in run.lora_dir.iterdir()) == sorted(  # no merged/, no temporary directory
        ["checksums.json", "hyperparameters.yaml", "lit_model.lora.pth", "model_config.yaml", "prompt_style.yaml",
         "tokenizer.json",
         "tokenizer_config.json", "generation_config.json"]
    )
    monkeypatch.undo()
    (run.lora_dir / "merged").mkdir()  # an empty directory is fine
    assert_lora_logits(run, load_model(merge(checkpoint_dir=run.lora_dir)))


def test_tied_head_adapter_is_refused(tmp_path: Path) -> None:
    run = make_lora_run(tmp_path, "llama3")
    hparams = yaml.safe_load((run.lora_dir / "hyperparameters.yaml").read_text())
    hparams["lora"]["head"] = True
    (run.lora_dir / "hyperparameters.yaml").write_text(yaml.safe_dump(hparams))
    with pytest.raises(ValueError, match=r"LoRA on the LM head of a model with tied embeddings cannot be merged"):
        merge(checkpoint_dir=run.lora_dir)


# ---- export ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["llama", "gpt_neox"])
def test_exported_merged_lora_loads_in_transformers(variant: str, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    run = make_lora_run(tmp_path, variant, **ALL_TARGETS)
    out = export(checkpoint_dir=run.lora_dir, output_dir=tmp_path / "hf")
    reloaded, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    assert_lora_logits(run, reloaded.eval())


@pytest.mark.parametrize(
    "variant, lora, ranks",
    [
        ("llama", dict(ALL_TARGETS, head=True), {}),
        ("phi3", dict(query=True, value=True, mlp=True), {"qkv_proj": 8, "gate_up_proj": 8}),  # q and v of q, k, v
        ("gpt_neox", dict(ALL_TARGETS, head=True), {"query_key_value": 12}),  # q, k, v interleaved per head
        ("gpt_neox", dict(query=False, value=True), {}),  # one part of the fused layer: rank r
        ("llama3", dict(query=True, key=True), {}),  # tied embeddings
    ],
)
def test_peft_adapter_loads_onto_the_exported_base(variant: str, lora: dict, ranks: dict, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run = make_lora_run(tmp_path, variant, **lora)
    export(checkpoint_dir=run.lora_dir, output_dir=tmp_path / "hf", peft_adapter=True)
    base_dir, adapter_dir = tmp_path / "hf" / "base", tmp_path / "hf" / "adapter"
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert config["base_model_name_or_path"] == str(base_dir.resolve())
    assert config["r"] == 4 and config["lora_alpha"] == 8.0 and config["lora_dropout"] == 0.1
    assert config["rank_pattern"] == ranks and config["alpha_pattern"] == {k: 2.0 * v for k, v in ranks.items()}
    assert {"tokenizer.json", "adapter_model.safetensors"} <= {p.name for p in adapter_dir.iterdir()}

    base = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    for x in inputs(run):  # the base is the base
        torch.testing.assert_close(logits(base, x), logits(run.hf_model, x), atol=ATOL, rtol=0)
    peft_model = PeftModel.from_pretrained(base, adapter_dir).eval()
    n_adapted = sum(1 for name, _ in peft_model.named_modules() if name.endswith("lora_A.default"))
    per_layer = [t for t in config["target_modules"] if t != "lm_head"]
    assert n_adapted == 2 * len(per_layer) + lora.get("head", False)
    assert_lora_logits(run, peft_model)


def test_peft_export_errors(tmp_path: Path) -> None:
    from lit_model.hf.peft_export import peft_adapter

    run = make_lora_run(tmp_path, "phi3")
    with pytest.raises(ValueError, match=r"hf-phi3 is not a LoRA checkpoint: it has no lit_model\.lora\.pth"):
        export(checkpoint_dir=run.base_dir, output_dir=tmp_path / "a", peft_adapter=True)
    with pytest.raises(ValueError, match=r"--base_dir is for LoRA checkpoints; .* is not one"):
        export(checkpoint_dir=run.base_dir, output_dir=tmp_path / "b", base_dir=run.base_dir)
    with pytest.raises(FileNotFoundError, match=r"Checkpoint directory '.*absent' does not exist"):
        export(checkpoint_dir=tmp_path / "absent", output_dir=tmp_path / "c", peft_adapter=True)
    export(checkpoint_dir=run.lora_dir, output_dir=tmp_path / "d", peft_adapter=True)
    shutil.rmtree(tmp_path / "d" / "base")
    with pytest.raises(FileExistsError, match=r"adapter already holds a PEFT adapter"):
        export(checkpoint_dir=run.lora_dir, output_dir=tmp_path / "d", peft_adapter=True)
    with pytest.raises(FileExistsError, match=r"already holds a Hugging Face checkpoint"):
        export(checkpoint_dir=run.lora_dir, output_dir=run.base_dir)

    state = adapter_state_dict(run.model)
    config, lora = run.model.config, LoRAConfig(r=4, alpha=8.0)
    uneven = {k: v for k, v in state.items() if not k.startswith("transformer.h.1.attn.value")}
    with pytest.raises(ValueError, match=r"LoRA targets different parts of qkv_proj in different layers"):
        peft_adapter(uneven, config, lora)
    state["transformer.h.0.attn.gate.lora_A"] = state["transformer.h.0.attn.gate.lora_B"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"LoRA tensor 'transformer\.h\.0\.attn\.gate\.lora_A' cannot be exported as "
                                         r"a PEFT adapter: 'transformer\.h\.0\.attn\.gate' has no Hugging Face phi3"):
        peft_adapter(state, config, lora)
