"""Export one of our checkpoint directories as a Hugging Face checkpoint that transformers loads."""

from pathlib import Path

from lit_model.checkpoint_io import export_hf_checkpoint


def convert_lit_checkpoint(checkpoint_dir: Path, output_dir: Path, max_shard_size: str = "5GB") -> Path:
    """Write config.json, model.safetensors (sharded above `max_shard_size`) and the tokenizer files to `output_dir`.

    The architecture is the config's `hf_model_type`; `AutoModelForCausalLM.from_pretrained(output_dir)` then
    computes the same logits. LoRA checkpoints must be merged first (scripts/merge_lora.py).

    Args:
        checkpoint_dir: Our checkpoint directory (lit_model.pth, model_config.yaml, tokenizer files).
        output_dir: Where to write the Hugging Face checkpoint; must not hold one already.
        max_shard_size: Largest safetensors file, e.g. 5GB or 500MB.

    Returns:
        The output directory.
    """
    out = export_hf_checkpoint(checkpoint_dir, output_dir, max_shard_size=max_shard_size)
    print(f"Wrote a Hugging Face checkpoint to {out}")
    return out


if __name__ == "__main__":
    from jsonargparse import CLI

    CLI(convert_lit_checkpoint, as_positional=False)
