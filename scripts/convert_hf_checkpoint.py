"""Convert a Hugging Face checkpoint directory into ours: lit_model.pth and model_config.yaml beside the HF files.

With --gguf, convert a GGUF file (llama.cpp, Ollama) instead; see scripts/convert_gguf_checkpoint.py.
"""

from pathlib import Path
from typing import Optional

from lit_model.hf.convert import convert_hf_checkpoint as _convert


def convert_hf_checkpoint(
    checkpoint_dir: Optional[Path] = None,
    dtype: Optional[str] = None,
    model_name: Optional[str] = None,
    gguf: Optional[Path] = None,
) -> Path:
    """Convert the Hugging Face weights in a directory, one tensor at a time (memory peaks at about one shard).

    Reads config.json (or the preset `model_name`) and the *.safetensors files (else the *.bin files), sharded or
    not, and writes lit_model.pth and model_config.yaml into the same directory.

    Args:
        checkpoint_dir: Directory with config.json and the weights, e.g. checkpoints/meta-llama/Llama-2-7b-hf. With
            --gguf: the directory to write (default checkpoints/<GGUF file name>).
        dtype: Store the weights in this dtype (float32, bfloat16 or float16); default: as in the checkpoint (float32
            for GGUF files).
        model_name: Use this preset (see lit_model.config.PRESETS) instead of config.json.
        gguf: Convert this GGUF file (llama.cpp, Ollama) into a new checkpoint directory instead, as
            scripts/convert_gguf_checkpoint.py does.

    Returns:
        The path of the written lit_model.pth.
    """
    if gguf is not None:
        if model_name is not None:
            raise ValueError(
                "--model_name does not apply to --gguf: a GGUF file describes its own model. Leave it out (or pass "
                "the model's label with scripts/convert_gguf_checkpoint.py --name)."
            )
        from lit_model.checkpoint_io import WEIGHTS_NAME
        from lit_model.hf.gguf import convert_gguf_checkpoint as convert_gguf

        out = convert_gguf(gguf, checkpoint_dir, dtype=dtype)
        print(f"Wrote {out / WEIGHTS_NAME}, {out / 'model_config.yaml'} and the tokenizer files")
        return out / WEIGHTS_NAME
    if checkpoint_dir is None:
        raise ValueError(
            "Pass --checkpoint_dir (a directory with a Hugging Face checkpoint), or --gguf with a GGUF file."
        )
    path = _convert(checkpoint_dir, dtype=dtype, model_name=model_name)
    print(f"Wrote {path} and {path.with_name('model_config.yaml')}")
    return path


if __name__ == "__main__":
    from lit_model.cli import script_main

    script_main(convert_hf_checkpoint)
