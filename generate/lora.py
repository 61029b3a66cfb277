"""Generate from a LoRA fine-tune (default: the demo's out/finetune/lora/final). The flags of generate/base.py."""

from __future__ import annotations

from pathlib import Path

from base import main  # generate/base.py: this script's directory is first on sys.path when run as a script

from lit_model.cli import script_main

if __name__ == "__main__":
    script_main(main, checkpoint_dir=Path("out/finetune/lora/final"))
