"""Convert a GGUF file (llama.cpp, Ollama) into our checkpoint directory: weights, config and tokenizer files."""

from pathlib import Path
from typing import Optional

from lit_model.hf.gguf import convert_gguf_checkpoint as _convert


def convert_gguf_checkpoint(
    gguf_file: Path,
    output_dir: Optional[Path] = None,
    dtype: Optional[str] = None,
    name: Optional[str] = None,
    hf_repo: Optional[str] = None,
) -> Path:
    """Dequantize a GGUF file (Q4_0, Q4_1, Q8_0, K-quants, F16, BF16, ...) into a checkpoint directory.

    Architectures: llama (Llama 2/3, Mistral, TinyLlama, SmolLM2) and qwen2. Writes lit_model.pth, model_config.yaml,
    tokenizer.json, tokenizer_config.json (special tokens, chat template) and generation_config.json, one tensor at a
    time, into a directory that appears only once complete.

    Args:
        gguf_file: The .gguf file, e.g. a llama.cpp conversion or an Ollama blob (~/.ollama/models/blobs/sha256-...).
        output_dir: Where to write the checkpoint (must not exist or be empty); default checkpoints/<file name>.
        dtype: Store the weights in this dtype (float32, bfloat16 or float16); default float32, which holds every
            dequantized value exactly.
        name: The model's name in model_config.yaml; default the file name without the quantization tag.
        hf_repo: The Hugging Face repository the model comes from (picks the default prompt style); default the one
            the file's metadata links to, if any.

    Returns:
        The checkpoint directory.
    """
    out = _convert(gguf_file, output_dir, dtype=dtype, name=name, hf_repo=hf_repo)
    files = ", ".join(sorted(p.name for p in out.iterdir()))
    size = sum(p.stat().st_size for p in out.iterdir()) / 2**20
    print(f"Wrote {out} ({size:.1f} MiB): {files}")
    return out


if __name__ == "__main__":
    from lit_model.cli import script_main

    script_main(convert_gguf_checkpoint)
