"""Supervised fine-tuning data: Alpaca-style records from JSON/JSONL, the tokenized dataset, padding, splits.

A record is `{"instruction": str, "input": str (optional, default ""), "output": str}`. A sample is
`input_ids = [BOS] + prompt + response + [EOS]` and `labels` = the same ids with the prompt set to `ignore_index`
(when masking the prompt). Labels are aligned with `input_ids`, NOT shifted: the training loop feeds
`input_ids[:, :-1]` to the model and scores its output against `labels[:, 1:]`.
"""

from __future__ import annotations

import json
import random
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


def load_records(path: str | Path) -> list[dict[str, str]]:
    """Read Alpaca-style records from a JSON file (a list of objects) or a JSONL file (one object per line).

    The format is decided by the content, not the suffix: a file whose first character is "[" is JSON, anything
    else is JSONL (blank lines are skipped). Each record needs string fields `instruction` and `output`; `input` is
    optional (missing or null means ""). Other fields are dropped. Errors name the file, the line (and for JSON the
    record index) and the field, so a bad record in a 50k-line file can be found.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No data file at {str(path)!r}. Pass an Alpaca-style .json or .jsonl file.")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text ({e}); save it as UTF-8 JSON or JSONL.") from e
    text = text.removeprefix("\ufeff")  # a UTF-8 byte-order mark, as some Windows editors write
    if not text.strip():
        raise ValueError(f"{path} is empty; it needs a JSON list of records or one JSON object per line.")

    located: list[tuple[Any, str]]  # (record, "line N" / "record i (line N)")
    if text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from e
        lines = _record_lines(text) if not _all_valid(data) else [0] * len(data)
        located = [(rec, f"record {i} (line {line})") for i, (rec, line) in enumerate(zip(data, lines))]
    else:
        located = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                located.append((json.loads(line), f"line {lineno}"))
            except json.JSONDecodeError as e:
                whole = _single_object(text)
                if whole is not None:
                    raise ValueError(
                        f"{path} holds a single JSON object; expected a JSON list of records ([{{...}}, ...]) or "
                        "one JSON object per line (JSONL)."
                    ) from e
                raise ValueError(f"{path}, line {lineno}: invalid JSON at column {e.colno}: {e.msg}") from e
    if not located:
        raise ValueError(f"{path} contains no records.")
    return [_validate(record, f"{path}, {where}") for record, where in located]


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


# ---- the dataset -----------------------------------------------------------------------------------------------------


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
        self.num_without_targets = 0
        self._samples: list[tuple[torch.Tensor, int]] = []  # (input_ids, number of prompt tokens within them)
        for record in records:
            instruction, input = record["instruction"], record.get("input") or ""
            special = prompt_style.special_in_text
            prompt_ids = tokenizer.encode(prompt_style.apply(instruction, input), bos=prompt_style.adds_bos,
                                          special=special).long()
            response = prompt_style.response(instruction, input, record["output"])
            response_ids = tokenizer.encode(response, bos=False, eos=prompt_style.appends_eos, special=special).long()
            ids = torch.cat([prompt_ids, response_ids])
            if ids.numel() > max_seq_length:
                ids = ids[:max_seq_length].clone()  # clone: do not keep the longer tensor alive through a view
                self.num_truncated += 1
            n_prompt = min(prompt_ids.numel(), ids.numel())
            # After the shift, targets are labels[1:]; with the prompt masked, the first target is at n_prompt.
            first_target = max(n_prompt, 1) if mask_prompt else 1
            if first_target >= ids.numel():
                self.num_without_targets += 1
            self._samples.append((ids, n_prompt))

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
