"""Training data on disk (JSON, JSONL, Parquet files, and `datasets` directories or Hub names) as conversations.

A conversation is a list of messages `{"role": "system" | "user" | "assistant", "content": str}`; the formats a
record may come in (Alpaca, OpenAI messages, ShareGPT) and how each becomes a conversation are in
lit_model.data.formats. `load_conversations` reads a file of any of them (the format detected from the first record,
or given), `load_dataset_conversations` a split of a `datasets` dataset, and `load_records` reads Alpaca files as
records (dicts). All name the file, the line (or row) and the field of a malformed record.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from lit_model.data.formats import (
    FORMAT_CHOICES,
    Conversation,
    Message,
    RecordError,
    alpaca_record,
    alpaca_to_messages,
    detect_format,
    text_problem,
    to_conversation,
)

__all__ = ["Conversation", "Message", "alpaca_to_messages", "load_conversations", "load_dataset_conversations",
           "load_records", "split_records", "text_problem"]

# A JSON array is parsed in one piece (json.loads holds the text and every record at once, several times the file's
# size); above this size it is refused and JSONL, which is read line by line, is asked for instead.
MAX_JSON_ARRAY_BYTES = 1 << 30
PARQUET_MAGIC = b"PAR1"  # the first (and last) four bytes of every Parquet file
Located = tuple[Any, Callable[[], str]]  # a raw record and where it is ("line 3"), computed only for an error


class HubUnreachableError(ConnectionError):
    """A Hub dataset asked for while offline: the user's to fix (lit_model.cli prints it as one line)."""


def is_parquet(path: str | Path) -> bool:
    """Whether a file is Parquet (by its first bytes, as the readers decide)."""
    with open(path, "rb") as f:
        return f.read(len(PARQUET_MAGIC)) == PARQUET_MAGIC


def load_conversations(path: str | Path, format: str = "auto", max_json_bytes: int = MAX_JSON_ARRAY_BYTES
                       ) -> list[Conversation]:
    """Every record of a data file as a conversation.

    The file is JSON (a list of records), JSONL (one record per line) or Parquet (one record per row; a messages
    column is a list of structs), told apart by its content, not its name. `format` is one of
    lit_model.data.formats.FORMAT_CHOICES: "auto" takes it from the first record's keys, and every record must then be
    of that format. Errors name the file, the line (JSON: the record index and line; Parquet: the row) and the field.
    Memory and size limits as `load_records`.
    """
    path = Path(path)
    return _conversations(_located(path, max_json_bytes), str(path), format)


def load_dataset_conversations(name: str, split: str = "train", format: str = "auto") -> list[Conversation]:
    """Every row of a split of a `datasets` dataset as a conversation (formats and checks as `load_conversations`).

    name: a local directory written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`, a local directory of data
        files (e.g. a dataset repository downloaded from the Hub), or a Hub dataset name (downloaded when online).
        Datasets' packaged readers only: no dataset's own loading code is ever run (no `trust_remote_code`).
    """
    rows = _dataset_rows(name, split)
    located = ((row, lambda i=i: f"row {i}") for i, row in enumerate(rows))
    return _conversations(located, f"dataset {name!r} (split {split!r})", format)


def _conversations(located: Iterable[Located], source: str, format: str) -> list[Conversation]:
    """The records as conversations, every one of the first record's format (or `format`), errors located."""
    if format not in FORMAT_CHOICES:
        raise ValueError(f"Unknown data format {format!r}: expected one of {', '.join(FORMAT_CHOICES)}")
    fmt = None if format == "auto" else format
    out = []
    for record, where in located:
        if fmt is None:
            try:
                fmt = detect_format(record)
            except RecordError as e:
                raise ValueError(f"{source}, {where()}: cannot tell the data's format from its first record, "
                                 f"which {e}") from None
        try:
            out.append(to_conversation(record, fmt))
        except RecordError as e:
            raise ValueError(f"{source}, {where()}: {e}") from None
    if not out:
        raise ValueError(f"{source} contains no records.")
    return out


def load_records(path: str | Path, max_json_bytes: int = MAX_JSON_ARRAY_BYTES) -> list[dict[str, str]]:
    """Read Alpaca-style records from a JSON file (a list of objects), a JSONL file (one object per line) or a
    Parquet file (one record per row).

    The format is decided by the content, not the suffix: a Parquet file starts with "PAR1", a file whose first
    character is "[" is JSON, anything else is JSONL (blank lines are skipped). Each record needs string fields
    `instruction` and `output`; `input` is optional (missing or null means ""). Other fields are dropped. Errors
    name the file, the line (and for JSON the record index) and the field, so a bad record in a 50k-line file can
    be found.

    Memory: JSONL is read one line at a time and Parquet a batch of rows at a time, so only the records themselves
    are held. A JSON array larger than `max_json_bytes` is refused (convert it to JSONL), and a file larger than the
    memory available is refused at once rather than after minutes of swapping.
    """
    path = Path(path)
    out = []
    for record, where in _located(path, max_json_bytes):
        try:
            out.append(alpaca_record(record))
        except RecordError as e:
            raise ValueError(f"{path}, {where()}: {e}") from None
    if not out:
        raise ValueError(f"{path} contains no records.")
    return out


def _located(path: Path, max_json_bytes: int) -> Iterator[Located]:
    """The raw records of a JSON, JSONL or Parquet file, each with where it is; size and memory checked first."""
    if not path.is_file():
        raise FileNotFoundError(f"No data file at {str(path)!r}. Pass an Alpaca-style .json or .jsonl file, or "
                                "OpenAI messages or ShareGPT conversations (JSON, JSONL or Parquet).")
    size = path.stat().st_size
    available = _available_memory_bytes()
    if available is not None and size > available:
        raise ValueError(
            f"{path} is {size / 2**30:.1f} GiB, more than the {available / 2**30:.1f} GiB of memory available, and "
            "its records are held in memory for training: use a subset of it (or a machine with more memory)."
        )
    if is_parquet(path):
        return _parquet_records(path)
    first = _first_character(path)
    if first is None:
        raise ValueError(f"{path} is empty; it needs a JSON list of records or one JSON object per line.")
    if first == "[":
        if size > max_json_bytes:
            raise ValueError(
                f"{path} is a {size / 2**20:.0f} MiB JSON array; arrays above {max_json_bytes / 2**20:.0f} MiB are "
                "refused because parsing one needs the whole text and all its records in memory at once. Convert it "
                f"to JSONL (one record per line), which is read line by line: `jq -c '.[]' {path} > "
                f"{path.with_suffix('.jsonl')}`."
            )
        return _json_records(path, _read_text(path))
    return _jsonl_records(path, size <= max_json_bytes)


def _parquet_records(path: Path) -> Iterator[Located]:
    """The rows of a Parquet file as records (a list-of-structs column becomes a list of dicts), a batch at a time."""
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError as e:
        raise ImportError(f"{path} is a Parquet file; reading one needs pyarrow: pip install pyarrow") from e
    try:
        parquet = pyarrow.parquet.ParquetFile(path)
    except pyarrow.ArrowException as e:
        raise ValueError(f"{path} starts like a Parquet file but cannot be read as one: {e}") from e
    row = 0
    for batch in parquet.iter_batches(batch_size=1024):
        for record in batch.to_pylist():
            yield record, lambda r=row: f"row {r}"
            row += 1


def _dataset_rows(name: str, split: str) -> Any:
    """The rows of one split of a `datasets` dataset (see `load_dataset_conversations`): a `datasets.Dataset`."""
    try:
        import datasets
    except ImportError as e:
        raise ImportError("--data.dataset reads data with the datasets package: pip install 'lit-dropbp[datasets]' "
                          "(or pip install datasets)") from e
    # Before datasets 4, load_dataset could run a dataset's own Python loading script; 4 and later never do.
    no_code = {"trust_remote_code": False} if int(datasets.__version__.split(".")[0]) < 4 else {}
    directory = Path(name).expanduser()
    if directory.is_dir():
        if not ((directory / "dataset_dict.json").is_file() or (directory / "state.json").is_file()):
            # Not written by save_to_disk: a folder of data files, read by datasets' packaged readers (no code).
            return datasets.load_dataset(str(directory), split=split, **no_code)
        loaded = datasets.load_from_disk(str(directory))
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise ValueError(f"The dataset at {str(directory)!r} has the splits {', '.join(sorted(loaded))}, not "
                                 f"{split!r}: pass --data.split (and --data.val_split) with one of them.")
            return loaded[split]
        if split != "train" and str(loaded.split) != split:
            raise ValueError(f"The dataset at {str(directory)!r} was saved as one dataset without splits, so there "
                             f"is no split {split!r} in it: leave out --data.split and --data.val_split.")
        return loaded
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or directory.suffix in (".json", ".jsonl", ".parquet"):
        raise FileNotFoundError(f"No dataset directory at {name!r} (and it is no Hub name, which is NAME or "
                                "OWNER/NAME). A data file goes in --data.train_file instead.")
    if datasets.config.HF_HUB_OFFLINE:
        raise HubUnreachableError(f"--data.dataset {name!r} is not a local directory, and the Hub is off "
                                  "(HF_HUB_OFFLINE is set): pass a directory written by save_to_disk, or go online.")
    try:
        return datasets.load_dataset(name, split=split, **no_code)
    except ConnectionError as e:
        raise HubUnreachableError(f"--data.dataset {name!r} is not a local directory and the Hub cannot be reached "
                                  f"({e}): pass a directory written by save_to_disk, or go online.") from e


def _read_text(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text ({e}); save it as UTF-8 JSON or JSONL.") from e
    return text.removeprefix("\ufeff")  # a UTF-8 byte-order mark, as some Windows editors write


def _first_character(path: Path) -> str | None:
    """The first character that is not whitespace (after a byte-order mark), or None for a blank file."""
    with open(path, "rb") as f:
        head = f.read(3)
        if head != b"\xef\xbb\xbf":  # a UTF-8 byte-order mark
            f.seek(0)
        while chunk := f.read(1 << 16):
            stripped = chunk.lstrip()
            if stripped:
                return chr(stripped[0]) if stripped[0] < 128 else "?"
    return None


def _json_records(path: Path, text: str) -> Iterator[Located]:
    """(record, "record i (line N)") of a JSON array; the lines are found only when an error asks for one."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from e
    lines: list[int] = []

    def where(i: int) -> str:
        if not lines:  # a second parse of the text, only to report an error
            lines.extend(_record_lines(text))
        return f"record {i} (line {lines[i]})"

    return ((record, lambda i=i: where(i)) for i, record in enumerate(data))


def _jsonl_records(path: Path, may_read_whole: bool) -> Iterator[Located]:
    """(record, "line N") of a JSONL file, read one line at a time."""
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if lineno == 1:
                    line = line.removeprefix("\ufeff")
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    # A pretty-printed single object fails on its first line: say what the file is, when it is small
                    # enough to parse whole.
                    if may_read_whole and _single_object(_read_text(path)) is not None:
                        raise ValueError(
                            f"{path} holds a single JSON object; expected a JSON list of records ([{{...}}, ...]) or "
                            "one JSON object per line (JSONL)."
                        ) from e
                    raise ValueError(f"{path}, line {lineno}: invalid JSON at column {e.colno}: {e.msg}") from e
                yield record, lambda n=lineno: f"line {n}"
    except UnicodeDecodeError as e:
        raise ValueError(
            f"{path} is not UTF-8 text (line {_first_undecodable_line(path)}: {e}); save it as UTF-8 JSON or JSONL."
        ) from e


def _first_undecodable_line(path: Path) -> int:
    """The 1-based number of the first line that is not UTF-8 (text mode decodes ahead, so its position is vague)."""
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError:
                return lineno
    return 0


def _available_memory_bytes() -> int | None:
    """MemAvailable of /proc/meminfo (Linux): the memory a new allocation can get without swapping; None elsewhere."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _record_lines(text: str) -> list[int]:
    """1-based line where each element of a top-level JSON array starts (only called to report an error)."""
    decoder = json.JSONDecoder()
    lines, idx = [], text.index("[") + 1
    while True:
        while idx < len(text) and text[idx] in " \t\r\n,":
            idx += 1
        if idx >= len(text) or text[idx] == "]":
            return lines
        lines.append(text.count("\n", 0, idx) + 1)
        _, idx = decoder.raw_decode(text, idx)


def _single_object(text: str) -> dict | None:
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return None
    return data if isinstance(data, dict) else None


# ---- splitting -------------------------------------------------------------------------------------------------------


def split_records(records: Sequence[dict], val_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Split records into (train, val) at random but reproducibly: the same records, fraction and seed always give
    the same split. `round(len * val_fraction)` records go to val (at least one when the fraction is positive),
    and both parts keep the original order.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n = len(records)
    n_val = 0 if val_fraction == 0 else max(1, round(n * val_fraction))
    if n_val >= n:
        raise ValueError(
            f"Cannot hold out {n_val} of {n} records for validation and keep any for training: "
            "lower val_fraction or give more records."
        )
    order = list(range(n))
    random.Random(seed).shuffle(order)  # a private generator: the global RNG state is left alone
    val_idx = set(order[:n_val])
    train = [r for i, r in enumerate(records) if i not in val_idx]
    val = [r for i, r in enumerate(records) if i in val_idx]
    return train, val


