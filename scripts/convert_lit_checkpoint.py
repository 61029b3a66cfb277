"""Export any of our checkpoint directories to Hugging Face format; a LoRA one merged, or as a PEFT adapter.

    # a full checkpoint (a base model, a full fine-tune, a merged LoRA): OUT gets config.json, model.safetensors,
    # the tokenizer files
    python scripts/convert_lit_checkpoint.py --checkpoint_dir out/finetune/full/final --output_dir OUT
    # a LoRA checkpoint, merged into its base model: OUT as above
    python scripts/convert_lit_checkpoint.py --checkpoint_dir out/finetune/lora/final --output_dir OUT
    # a LoRA checkpoint as a PEFT adapter: OUT/base (the base model) and OUT/adapter (adapter_config.json,
    # adapter_model.safetensors, tokenizer files)
    python scripts/convert_lit_checkpoint.py --checkpoint_dir out/finetune/lora/final --output_dir OUT \
        --peft_adapter true

Then `AutoModelForCausalLM.from_pretrained(OUT)`, or `PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(
OUT / "base"), OUT / "adapter")`, computes the logits of our model.
"""

from pathlib import Path
from typing import Optional

from lit_model.hf.convert import export_hf_checkpoint
from lit_model.hf.peft_export import export_peft_adapter


def convert_lit_checkpoint(
    checkpoint_dir: Path,
    output_dir: Path,
    max_shard_size: str = "5GB",
    peft_adapter: bool = False,
    base_dir: Optional[Path] = None,
    precision: Optional[str] = None,
) -> Path:
    """Write a Hugging Face checkpoint (config.json, model.safetensors, tokenizer files) to `output_dir`.

    The architecture is the config's `hf_model_type`. A LoRA checkpoint (lit_model.lora.pth) is merged into its base
    model (named in its hyperparameters.yaml) on the way, unless `peft_adapter` is set: then `output_dir/base` gets
    the base model and `output_dir/adapter` a PEFT LoRA adapter for it (adapters on parts of a fused HF layer, such
    as GPT-NeoX's query_key_value or Phi-3's qkv_proj, become one exact block-diagonal adapter of higher rank).

    Args:
        checkpoint_dir: Our checkpoint directory: lit_model.pth (or lit_model.lora.pth + hyperparameters.yaml),
            model_config.yaml, tokenizer files.
        output_dir: Where to write the Hugging Face checkpoint; must not hold one already.
        max_shard_size: Largest safetensors file, e.g. 5GB or 500MB.
        peft_adapter: For a LoRA checkpoint: write the base model and a PEFT adapter instead of the merged model.
        base_dir: For a LoRA checkpoint: its base model's directory, if not where hyperparameters.yaml says.
        precision: dtype of the exported weights: float32, bfloat16, float16 or a precision (32-true, bf16-true, ...);
            default: as stored (a LoRA checkpoint: its base model's dtype).

    Returns:
        The output directory.
    """
    if peft_adapter:
        base, adapter = export_peft_adapter(checkpoint_dir, output_dir, max_shard_size=max_shard_size,
                                            base_dir=base_dir)
        print(f"Wrote the base model to {base} and the PEFT adapter to {adapter}")
        return Path(output_dir)
    out = export_hf_checkpoint(checkpoint_dir, output_dir, max_shard_size=max_shard_size, base_dir=base_dir,
                               dtype=precision)
    print(f"Wrote a Hugging Face checkpoint to {out}")
    return out


if __name__ == "__main__":
    from lit_model.cli import script_main

    script_main(convert_lit_checkpoint)
