"""QLoRA: LoRA on a base model stored in 4 bits (NF4). The flags of finetune/lora.py; --quantize defaults to bnb.nf4."""

from __future__ import annotations

from pathlib import Path

from lora import setup  # finetune/lora.py: this script's directory is first on sys.path when run as a script

from lit_model.cli import script_main

if __name__ == "__main__":
    script_main(setup, quantize="bnb.nf4", out_dir=Path("out/finetune/qlora"))
