"""Convert a Hugging Face checkpoint directory into ours: lit_model.pth and model_config.yaml beside the HF files."""

from pathlib import Path
from typing import Optional

from lit_model.hf_convert import convert_hf_checkpoint as _convert


def convert_hf_checkpoint(checkpoint_dir: Path, dtype: Optional[str] = None, model_name: Optional[str] = None) -> Path:
    """Convert the Hugging Face weights in a directory, one tensor at a time (memory peaks at about one shard).

    Reads config.json (or the preset `model_name`) and the *.safetensors files (else the *.bin files), sharded or
    not, and writes lit_model.pth and model_config.yaml into the same directory.

    Args:
        checkpoint_dir: Directory with config.json and the weights, e.g. checkpoints/meta-llama/Llama-2-7b-hf.
        dtype: Store the weights in this dtype (float32, bfloat16 or float16); default: as in the checkpoint.
        model_name: Use this preset (see lit_model.config.PRESETS) instead of config.json.

    Returns:
        The path of the written lit_model.pth.
    """
    path = _convert(checkpoint_dir, dtype=dtype, model_name=model_name)
    print(f"Wrote {path} and {path.with_name('model_config.yaml')}")
    return path


if __name__ == "__main__":
    from jsonargparse import CLI

    CLI(convert_hf_checkpoint, as_positional=False)
