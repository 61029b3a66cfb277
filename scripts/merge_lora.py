"""Merge a LoRA (or QLoRA) fine-tune into its base model: a full checkpoint directory that needs nothing else.

    python scripts/merge_lora.py --checkpoint_dir out/finetune/lora/final     # writes out/finetune/lora/final/merged
    python generate/base.py --checkpoint_dir out/finetune/lora/final/merged --prompt "..."

The LoRA settings and the base model's directory come from the run's hyperparameters.yaml.
"""

from pathlib import Path
from typing import Optional

from lit_model.peft.checkpoint import merge_lora_checkpoint


def merge_lora(
    checkpoint_dir: Path,
    output_dir: Optional[Path] = None,
    precision: Optional[str] = None,
    base_dir: Optional[Path] = None,
) -> Path:
    """Fold the adapters into the base weights (W + B A * alpha / r, in float32, rounded once) and save the result.

    The output gets lit_model.pth, model_config.yaml, the tokenizer files, prompt_style.yaml and hyperparameters.yaml,
    and appears only when complete (written under a temporary name, then renamed). It is a separate directory, not
    the LoRA directory itself (as Lit-GPT does), so the LoRA checkpoint stays what it was and can still be resumed
    or exported as a PEFT adapter. A QLoRA run's adapters are merged into the dense base weights (the Lit-GPT and
    peft convention); they were trained against the 4-bit rounding of those weights, so the merged model differs
    from the QLoRA model by the base model's quantization error.

    Args:
        checkpoint_dir: The LoRA checkpoint: lit_model.lora.pth, hyperparameters.yaml, model_config.yaml, tokenizer.
        output_dir: Where to write the merged checkpoint (must not exist, or be empty); default checkpoint_dir/merged.
        precision: dtype of the merged weights: float32, bfloat16 or float16 (or 32-true, bf16-true, 16-true);
            default: that of the base model's weights.
        base_dir: The base model's directory, if not where hyperparameters.yaml says (e.g. the run was moved).

    Returns:
        The merged checkpoint directory.
    """
    out = merge_lora_checkpoint(checkpoint_dir, output_dir, dtype=precision, base_dir=base_dir)
    print(f"Wrote the merged model to {out}")
    return out


if __name__ == "__main__":
    from lit_model.cli import script_main

    script_main(merge_lora)
