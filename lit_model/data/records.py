"""Training records on disk, and the one form every format becomes: a conversation (a list of messages).

A message is `{"role": "system" | "user" | "assistant", "content": str}`; a user message converted from an Alpaca
record also carries that record's `input` (its second field), so Alpaca's own template can still place it in its
"### Input:" section while chat templates join it to the instruction. Alpaca records become
`[user(instruction, input), assistant(output)]`. `load_records` reads Alpaca files as records (dicts),
`load_conversations` reads any supported file as conversations; both name the file, line and field of a malformed
record.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

Message = dict[str, Any]
Conversation = list[Message]
REQUIRED_FIELDS = ("instruction", "output")


def alpaca_to_messages(record: dict[str, str]) -> Conversation:
    """An Alpaca record as a conversation: the instruction (with the record's input) asks, the output answers."""
    user: Message = {"role": "user", "content": record["instruction"]}
    if record.get("input"):
        user["input"] = record["input"]
    return [user, {"role": "assistant", "content": record["output"]}]


def load_conversations(path: str | Path, max_json_bytes: int | None = None) -> list[Conversation]:
    """Every record of a data file as a conversation (see the module docstring)."""
    kwargs = {} if max_json_bytes is None else {"max_json_bytes": max_json_bytes}
    return [alpaca_to_messages(r) for r in load_records(path, **kwargs)]


# A JSON array is parsed in one piece (json.loads holds the text and every record at once, several times the file's
# size); above this size it is refused and JSONL, which is read line by line, is asked for instead.
MAX_JSON_ARRAY_BYTES = 1 << 30


def load_records(path: str | Path, max_json_bytes: int = MAX_JSON_ARRAY_BYTES) -> list[dict[str, str]]:
    """Read Alpaca-style records from a JSON file (a list of objects) or a JSONL file (one object per line).

    The format is decided by the content, not the suffix: a file whose first character is "[" is JSON, anything
    else is JSONL (blank lines are skipped). Each record needs string fields `instruction` and `output`; `input` is
    optional (missing or null means ""). Other fields are dropped. Errors name the file, the line (and for JSON the
    record index) and the field, so a bad record in a 50k-line file can be found.

    Memory: JSONL is read one line at a time, so only the records themselves are held. A JSON array larger than
    `max_json_bytes` is refused (convert it to JSONL), and a file larger than the memory available is refused at
    once rather than after minutes of swapping.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No data file at {str(path)!r}. Pass an Alpaca-style .json or .jsonl file.")
    size = path.stat().st_size
    available = _available_memory_bytes()
    if available is not None and size > available:
        raise ValueError(
            f"{path} is {size / 2**30:.1f} GiB, more than the {available / 2**30:.1f} GiB of memory available, and "
            "its records are held in memory for training: use a subset of it (or a machine with more memory)."
        )
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
        located = _json_records(path, _read_text(path))
    else:
        located = _jsonl_records(path, size <= max_json_bytes)
    if not located:
        raise ValueError(f"{path} contains no records.")
    return [_validate(record, f"{path}, {where}") for record, where in located]


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


def _json_records(path: Path, text: str) -> list[tuple[Any, str]]:
    """(record, "record i (line N)") of a JSON array."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from e
    lines = _record_lines(text) if not _all_valid(data) else [0] * len(data)
    return [(rec, f"record {i} (line {line})") for i, (rec, line) in enumerate(zip(data, lines))]


def _jsonl_records(path: Path, may_read_whole: bool) -> list[tuple[Any, str]]:
    """(record, "line N") of a JSONL file, read one line at a time."""
    located: list[tuple[Any, str]] = []
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if lineno == 1:
                    line = line.removeprefix("\ufeff")
                if not line.strip():
                    continue
                try:
                    located.append((json.loads(line), f"line {lineno}"))
                except json.JSONDecodeError as e:
                    # A pretty-printed single object fails on its first line: say what the file is, when it is small
                    # enough to parse whole.
                    if may_read_whole and _single_object(_read_text(path)) is not None:
                        raise ValueError(
                            f"{path} holds a single JSON object; expected a JSON list of records ([{{...}}, ...]) or "
                            "one JSON object per line (JSONL)."
                        ) from e
                    raise ValueError(f"{path}, line {lineno}: invalid JSON at column {e.colno}: {e.msg}") from e
    except UnicodeDecodeError as e:
        raise ValueError(
            f"{path} is not UTF-8 text (line {_first_undecodable_line(path)}: {e}); save it as UTF-8 JSON or JSONL."
        ) from e
    return located


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


def _all_valid(data: Any) -> bool:
    return isinstance(data, list) and all(_problem(r) is None for r in data)


def _validate(record: Any, where: str) -> dict[str, str]:
    problem = _problem(record)
    if problem is not None:
        raise ValueError(f"{where}: {problem}")
    return {"instruction": record["instruction"], "input": record.get("input") or "", "output": record["output"]}


def _problem(record: Any) -> str | None:
    if not isinstance(record, dict):
        return f"expected an object with 'instruction', 'input' and 'output', got {type(record).__name__}"
    for field in REQUIRED_FIELDS:
        if field not in record:
            return f"missing required field {field!r} (fields present: {sorted(record)})"
    for field in ("instruction", "input", "output"):
        value = record.get(field)
        if field == "input" and value is None:
            continue
        if not isinstance(value, str):
            return f"field {field!r} must be a string, got {type(value).__name__}: {str(value)[:60]!r}"
        problem = text_problem(value)
        if problem is not None:
            return f"field {field!r} {problem}"
    return None


# Half of a UTF-16 surrogate pair: JSON may spell one ("\\ud83d" without its partner), Python keeps it in a str, but
# it is not a character, cannot be encoded as UTF-8, and tokenizers fail on it without saying where it is.
_SURROGATE = re.compile("[\ud800-\udfff]")


def text_problem(text: str) -> str | None:
    """What makes `text` impossible to tokenize (a lone surrogate, with its position), or None when it is fine."""
    match = _SURROGATE.search(text)
    if match is None:
        return None
    i = match.start()
    return (
        f"holds invalid text: a lone UTF-16 surrogate U+{ord(text[i]):04X} at character {i} (after "
        f"{text[max(0, i - 20):i]!r}), which is not a character. JSON escapes \\ud800-\\udfff must come in valid pairs "
        "(e.g. \\ud83d\\ude00): fix or drop this record."
    )


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


