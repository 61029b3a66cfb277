"""Supervised fine-tuning data: Alpaca-style records from JSON/JSONL, the tokenized dataset, padding, splits.

A record is `{"instruction": str, "input": str (optional, default ""), "output": str}`. A sample is
`input_ids = [BOS] + prompt + response + [EOS]` and `labels` = the same ids with the prompt set to `ignore_index`
(when masking the prompt). Labels are aligned with `input_ids`, NOT shifted: the training loop feeds
`input_ids[:, :-1]` to the model and scores its output against `labels[:, 1:]`.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Iterator, Optional, Protocol

import torch
from torch.utils.data import Dataset

from lit_model.prompts import PromptStyle

REQUIRED_FIELDS = ("instruction", "output")
IGNORE_INDEX = -100  # label of tokens that are not scored (prompt, padding), as in torch's cross-entropy


class _Tokenizer(Protocol):
    """What the dataset needs from `lit_model.tokenizer.Tokenizer`."""

    eos_id: int | None

    def encode(
        self, text: str, bos: bool | None = None, eos: bool = False, max_length: int = -1, special: bool = False
    ) -> torch.Tensor: ...


# ---- loading ---------------------------------------------------------------------------------------------------------


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


# ---- the dataset -----------------------------------------------------------------------------------------------------


# Characters of a text field kept per token of max_seq_length before tokenizing (see `SFTDataset`, "Huge records").
CHARS_PER_TOKEN_BUDGET = 64
TEXT_FIELDS = ("instruction", "input", "output")


class SFTDataset(Dataset):
    """Records tokenized once, at construction, into `{"input_ids", "labels"}` samples.

    `input_ids` = encode(prompt_style.apply(instruction, input)) + encode(prompt_style.response(..., output)): for a
    named style the answer and EOS, for a chat template everything it renders after the generation prompt (the answer
    and the template's end of turn); BOS as the style says (`adds_bos`).
    The prompt and the response are encoded separately and concatenated, rather than encoding prompt + response
    as one string: a tokenizer may merge characters across the boundary (e.g. "\\n" + "Hi" -> "\\nHi"), and then
    the prompt's token count no longer marks where the response starts. Encoding them apart also makes the
    prompt tokens exactly those that generation will see at inference, when the prompt is encoded alone.

    Samples longer than `max_seq_length` keep their beginning (`num_truncated` counts them; a truncated response
    loses its EOS). `num_without_targets` counts samples with no label to learn from after the training loop's
    one-token shift, e.g. a prompt that fills `max_seq_length` with `mask_prompt=True`; they are kept so indices
    match the records, and the loop must not divide by their zero token count.

    Huge records. Tokenizing a text costs time and memory in proportion to its length (about 160 bytes per character
    for a `tokenizers` BPE, measured), although only the first `max_seq_length` = N tokens of a sample are kept: one
    50 MB record took 16 GB. So when a text field is longer than B = 64 * N characters, every field is cut to B
    characters before tokenizing (sample X) and to 2B (sample Y), and X is kept only if it has at least N tokens and
    its first N tokens and prompt length equal Y's; otherwise B doubles and the check repeats, ending with the whole
    record in the worst case. So memory and time are bounded by N (the cuts at B and 2B: 3B characters per cut
    field), not by the record, and the kept tokens are those of the whole record:
      Assume (1) the tokenizer has a bounded context C <= B: changing the text after character p changes no token
      that ends at or before p - C (pre-tokenized BPE such as GPT-2's and Llama 3's: C is the longest pre-token;
      SentencePiece, which splits at whitespace: the longest word; so this holds unless one word is longer than
      64 N characters), and (2) the template writes each field verbatim and in order (all of ours do). The whole
      record and Y have the same first 2B characters of the cut field, so Y's tokens that end within them, up to
      2B - C >= B, are the whole record's. X's first N tokens equal Y's first N, so they cover the same text, which
      lies within X's first B characters of the field (beyond them X holds the template's text, which Y, holding
      the field's text there, would have to repeat character for character), so they are among Y's tokens that are
      the whole record's. Tokens after the first N do not matter: the sample keeps a prefix.
    The check is what makes the budget safe; the bound alone is not: a token can cover more than 64 characters
    (SmolLM2's longest covers 81) and a normalizer can delete characters (SentencePiece collapses runs of spaces), so
    B characters can give fewer than N tokens. A cut record has more than N tokens: it counts in `num_truncated`
    (and in `num_cut`).
    """

    def __init__(
        self,
        records: Sequence[dict[str, str]],
        tokenizer: _Tokenizer,
        prompt_style: PromptStyle,
        max_seq_length: int,
        mask_prompt: bool = True,
        ignore_index: int = IGNORE_INDEX,
    ) -> None:
        if max_seq_length < 2:
            raise ValueError(
                f"max_seq_length must be at least 2 (one input and one target token), got {max_seq_length}"
            )
        self.max_seq_length = max_seq_length
        self.mask_prompt = mask_prompt
        self.ignore_index = ignore_index
        self.num_truncated = 0
        self.num_cut = 0  # records whose text was cut before tokenizing (see "Huge records"); all are truncated too
        self.num_without_targets = 0
        # The shortest max_seq_length that would give every sample without targets one answer token.
        self.length_for_targets = 0
        self._samples: list[tuple[torch.Tensor, int]] = []  # (input_ids, number of prompt tokens within them)
        for index, record in enumerate(records):
            ids, n_prompt, cut = self._sample(record, index, tokenizer, prompt_style)
            full_prompt = n_prompt
            if cut or ids.numel() > max_seq_length:
                ids = ids[:max_seq_length].clone()  # clone: do not keep the longer tensor alive through a view
                self.num_truncated += 1
                self.num_cut += cut
            n_prompt = min(n_prompt, ids.numel())
            # After the shift, targets are labels[1:]; with the prompt masked, the first target is at n_prompt.
            first_target = max(n_prompt, 1) if mask_prompt else 1
            if first_target >= ids.numel():
                self.num_without_targets += 1
                self.length_for_targets = max(self.length_for_targets, full_prompt + 1)
            self._samples.append((ids, n_prompt))

    def _sample(
        self, record: dict[str, str], index: int, tokenizer: _Tokenizer, style: PromptStyle
    ) -> tuple[torch.Tensor, int, bool]:
        """(input_ids, prompt tokens, whether the text was cut) of a record, with huge fields cut (class docstring)."""
        texts = {"instruction": record["instruction"], "input": record.get("input") or "", "output": record["output"]}
        longest = max(len(t) for t in texts.values())
        budget = CHARS_PER_TOKEN_BUDGET * self.max_seq_length
        if longest <= budget:
            return (*_encode(texts, index, tokenizer, style), False)
        n = self.max_seq_length
        ids, n_prompt = _encode({k: t[:budget] for k, t in texts.items()}, index, tokenizer, style)
        while longest > budget:
            budget *= 2
            ids2, n_prompt2 = _encode({k: t[:budget] for k, t in texts.items()}, index, tokenizer, style)
            if ids.numel() >= n and torch.equal(ids[:n], ids2[:n]) and min(n_prompt, n) == min(n_prompt2, n):
                return ids, n_prompt, True
            ids, n_prompt = ids2, n_prompt2
        return ids, n_prompt, False  # the whole record after all: exact, as without any cut

    def __len__(self) -> int:
        return len(self._samples)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ids, n_prompt = self._samples[index]
        labels = ids.clone()
        if self.mask_prompt:
            labels[:n_prompt] = self.ignore_index
        return {"input_ids": ids, "labels": labels}

    def lengths(self) -> list[int]:
        """Token count of every sample, e.g. for sorting or length-grouped batching."""
        return [ids.numel() for ids, _ in self._samples]


def _encode(texts: dict[str, str], index: int, tokenizer: _Tokenizer, style: PromptStyle) -> tuple[torch.Tensor, int]:
    """(prompt + response ids, prompt length) of one record's text fields."""
    special = style.special_in_text
    instruction, input, output = texts["instruction"], texts["input"], texts["output"]
    try:
        prompt_ids = tokenizer.encode(style.apply(instruction, input), bos=style.adds_bos, special=special).long()
        response = style.response(instruction, input, output)
        response_ids = tokenizer.encode(response, bos=False, eos=style.appends_eos, special=special).long()
    except (TypeError, RuntimeError, ValueError) as err:
        # Backends fail on invalid text without saying where it is ("TextInputSequence must be str").
        for field in TEXT_FIELDS:
            problem = text_problem(texts[field])
            if problem is not None:
                raise ValueError(f"Record {index}: field {field!r} {problem}") from err
        raise
    return torch.cat([prompt_ids, response_ids]), prompt_ids.numel()


def collate(
    samples: Sequence[dict[str, torch.Tensor]], pad_id: int = 0, ignore_index: int = IGNORE_INDEX
) -> dict[str, torch.Tensor]:
    """Right-pad a list of samples to the longest one: `input_ids` with `pad_id`, `labels` with `ignore_index`.

    Returns `input_ids` and `labels` of shape (B, T) and `lengths` (B,), the unpadded lengths. Padding sits at the
    end, so with causal attention it never influences the real tokens, and its labels are ignored by the loss.
    Use with a DataLoader as `collate_fn=functools.partial(collate, pad_id=..., ignore_index=...)`.
    """
    if not samples:
        raise ValueError("collate needs at least one sample")
    lengths = torch.tensor([s["input_ids"].numel() for s in samples], dtype=torch.long)
    longest = int(lengths.max())
    input_ids = torch.full((len(samples), longest), pad_id, dtype=torch.long)  # (B, T)
    labels = torch.full((len(samples), longest), ignore_index, dtype=torch.long)  # (B, T)
    for i, sample in enumerate(samples):
        n = sample["input_ids"].numel()
        input_ids[i, :n] = sample["input_ids"]
        labels[i, :n] = sample["labels"]
    return {"input_ids": input_ids, "labels": labels, "lengths": lengths}


class BatchIterator:
    """Endless, resumable micro-batches of sample indices: a fresh seeded permutation per epoch, sharded by rank.

    Every step of `batch_size * world_size` samples takes the next slice of the epoch's permutation, and rank r gets
    the r-th micro-batch of that slice; so the micro-batches of one optimizer step, over all ranks, are the same
    samples whatever the number of devices. `position` counts samples of the global order, identical on every rank.
    step_samples: the samples of one optimizer step (the global batch size). An epoch then ends after a whole number
        of optimizer steps, so the ragged tail that is dropped does not depend on the number of devices (without it,
        the tail is dropped per micro-batch, which is what a single process did before).
    """

    def __init__(
        self, n: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1, step_samples: Optional[int] = None
    ) -> None:
        if n < batch_size * world_size:
            raise ValueError(f"{n} training samples cannot fill one micro-batch of {batch_size} on {world_size} devices")
        if step_samples is not None and (step_samples % (batch_size * world_size) or n < step_samples):
            raise ValueError(
                f"{n} training samples in optimizer steps of {step_samples}: the step must be a multiple of "
                f"micro-batch {batch_size} x {world_size} devices and fit in the data; lower the global batch size"
            )
        self.n, self.batch_size, self.seed, self.rank, self.world_size = n, batch_size, seed, rank, world_size
        # Samples per epoch: whole optimizer steps (or whole micro-batch spans without step_samples).
        self.usable = n - n % step_samples if step_samples else n
        self.epoch, self.position = 0, 0

    def __iter__(self) -> Iterator[list[int]]:
        return self

    def __next__(self) -> list[int]:
        span = self.batch_size * self.world_size
        if self.position + span > self.usable:  # drop the ragged tail: every step sees full micro-batches
            self.epoch, self.position = self.epoch + 1, 0
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        chunk = order[self.position : self.position + span].tolist()
        self.position += span
        return chunk[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
