"""Fetch the Stanford Alpaca (or Alpaca-GPT4) data set, or take a local JSON/JSONL file, validate every record and
split it into `train.json` and `val.json` for fine-tuning.

    python scripts/prepare_alpaca.py                                   # Stanford Alpaca -> data/alpaca
    python scripts/prepare_alpaca.py --source alpaca-gpt4 --destination_dir data/alpaca_gpt4
    python scripts/prepare_alpaca.py --source my_data.jsonl --destination_dir data/mine --val_fraction 0.1
"""

from __future__ import annotations

import json
import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from lit_model.data import load_records, split_records

# The public raw files (each a JSON list of {"instruction", "input", "output"}).
SOURCES: dict[str, str] = {
    # https://github.com/tatsu-lab/stanford_alpaca (52,002 records)
    "alpaca": "https://raw.githubusercontent.com/tatsu-lab/stanford_alpaca/main/alpaca_data.json",
    # https://github.com/Instruction-Tuning-with-GPT-4/GPT-4-LLM (the same instructions, answered by GPT-4)
    "alpaca-gpt4": (
        "https://raw.githubusercontent.com/Instruction-Tuning-with-GPT-4/GPT-4-LLM/main/data/alpaca_gpt4_data.json"
    ),
}


def prepare_alpaca(
    source: str = "alpaca",
    destination_dir: Path = Path("data/alpaca"),
    val_fraction: float = 0.03865,
    seed: int = 42,
    timeout: float = 60.0,
) -> tuple[Path, Path]:
    """Write `destination_dir/train.json` and `destination_dir/val.json` from an Alpaca-style data set.

    Args:
        source: "alpaca" (Stanford Alpaca), "alpaca-gpt4" (Alpaca-GPT4), or the path of a local JSON list or JSONL
            file with `instruction`, optional `input`, and `output` fields. A download is kept in destination_dir
            and reused by later runs.
        destination_dir: where train.json and val.json (and a downloaded raw file) go.
        val_fraction: share of the records held out for validation (the default holds out about 2,000 of
            Alpaca's 52k, as Lit-GPT does).
        seed: seed of the random, reproducible split.
        timeout: seconds to wait for the download server.

    Returns:
        The paths of train.json and val.json.
    """
    problems = []
    if not 0.0 <= val_fraction < 1.0:
        problems.append(f"--val_fraction must be in [0, 1), got {val_fraction}")
    if timeout <= 0:
        problems.append(f"--timeout must be positive, got {timeout}")
    if source not in SOURCES and not Path(source).is_file():
        problems.append(
            f"--source {source!r} is neither one of {', '.join(SOURCES)} nor an existing file; "
            "pass a known name or the path of a JSON/JSONL file"
        )
    if problems:
        raise ValueError("; ".join(problems))

    destination_dir = Path(destination_dir)
    destination_dir.mkdir(parents=True, exist_ok=True)
    if source in SOURCES:
        url = SOURCES[source]
        data_file = destination_dir / url.rsplit("/", 1)[-1]
        if data_file.is_file():
            print(f"Using {data_file} (downloaded earlier; delete it to download again)")
        else:
            print(f"Downloading {url}")
            _write_atomic(data_file, _fetch(url, timeout))
    else:
        data_file = Path(source)

    records = load_records(data_file)
    train, val = split_records(records, val_fraction, seed)
    train_path, val_path = destination_dir / "train.json", destination_dir / "val.json"
    for path, part in ((train_path, train), (val_path, val)):
        _write_atomic(path, json.dumps(part, ensure_ascii=False, indent=1).encode("utf-8"))
    print(
        f"{len(records):,} records from {data_file}: {len(train):,} train -> {train_path}, "
        f"{len(val):,} val -> {val_path}"
    )
    return train_path, val_path


def _fetch(url: str, timeout: float) -> bytes:
    """The bytes at `url`, or a ConnectionError that says how to go on without the network."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.read()
    except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
        reason = getattr(e, "reason", e)
        raise ConnectionError(
            f"Could not download {url} ({reason}). If this machine is offline, download the file elsewhere and pass "
            "it with --source path/to/file.json (a JSON list or JSONL file with instruction/input/output fields)."
        ) from e


def _write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old file or the complete new one, never a partial file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


if __name__ == "__main__":
    from lit_model.cli import script_main

    script_main(prepare_alpaca)
