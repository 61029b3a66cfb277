"""Supervised fine-tuning samples: conversations tokenized with their trained tokens marked, padding.

A sample is `input_ids` = the conversation's text as the prompt style renders it (BOS as the style says) and
`labels` = the same ids with everything but the assistant's answers set to `ignore_index` (when masking the prompt).
Labels are aligned with `input_ids`, NOT shifted: the training loop feeds `input_ids[:, :-1]` to the model and
scores its output against `labels[:, 1:]`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional, Protocol

import torch
from torch.utils.data import Dataset

from lit_model.data.records import Conversation, alpaca_to_messages, text_problem
from lit_model.prompts import PromptStyle

IGNORE_INDEX = -100  # label of tokens that are not scored (prompt, padding), as in torch's cross-entropy


class _Tokenizer(Protocol):
    """What the dataset needs from `lit_model.tokenizer.Tokenizer`."""

    eos_id: int | None

    def encode(
        self, text: str, bos: bool | None = None, eos: bool = False, max_length: int = -1, special: bool = False
    ) -> torch.Tensor: ...


# ---- the dataset -----------------------------------------------------------------------------------------------------


# Characters of a message kept per token of max_seq_length before tokenizing (see `SFTDataset`, "Huge records").
CHARS_PER_TOKEN_BUDGET = 64


class SFTDataset(Dataset):
    """Conversations (or Alpaca records) tokenized once, at construction, into `{"input_ids", "labels"}` samples.

    Each conversation becomes the prompt style's pieces (`PromptStyle.segments`: the assistant's answers trained,
    everything else not), each piece encoded on its own and the ids concatenated: a tokenizer may merge characters
    across a boundary (e.g. "\\n" + "Hi" -> "\\nHi"), which would blur where an answer starts, and encoding the prompt
    alone gives exactly the ids generation sees. The first piece gets BOS as the style says (`adds_bos`); with a
    named style every answer is followed by EOS (`appends_eos`); a chat template writes its own end of turn.

    Samples longer than `max_seq_length` keep whole turns where they can: the conversation ends after the last
    answer that fits (`num_turns_cut` counts the answers dropped); when not even the first answer fits, the sample
    keeps its first `max_seq_length` tokens (a truncated answer loses its end). `num_truncated` counts both. `num_without_targets` counts samples with no label to learn from after the training loop's
    one-token shift, e.g. a prompt that fills `max_seq_length` with `mask_prompt=True`; they are kept so indices
    match the records, and the loop must not divide by their zero token count.

    Huge records. Tokenizing a text costs time and memory in proportion to its length (about 160 bytes per character
    for a `tokenizers` BPE, measured), although only the first `max_seq_length` = N tokens of a sample are kept: one
    50 MB record took 16 GB. So when a message is longer than B = 64 * N characters, every message is cut to B
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
        records: Sequence[Conversation | dict[str, str]],
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
        self.num_turns_cut = 0  # answers dropped by keeping whole turns
        # The shortest max_seq_length that would give every sample without targets one answer token.
        self.length_for_targets = 0
        self._samples: list[tuple[torch.Tensor, torch.Tensor]] = []  # (input_ids, which of them are trained)
        for index, record in enumerate(records):
            conversation = alpaca_to_messages(record) if isinstance(record, dict) else record
            ids, trained, cut = self._sample(conversation, index, tokenizer, prompt_style)
            first = int(trained.nonzero()[0]) if trained.any() else ids.numel()
            if cut or ids.numel() > max_seq_length:
                ends = _answer_ends(trained)
                fitting = [e for e in ends if e <= max_seq_length]
                keep = fitting[-1] if fitting and len(ends) > 1 else max_seq_length  # whole turns, when any fit
                self.num_turns_cut += len(ends) - len(fitting) if fitting and len(ends) > 1 else 0
                ids, trained = ids[:keep].clone(), trained[:keep].clone()  # clone: no view of the longer tensor
                self.num_truncated += 1
                self.num_cut += cut
            # After the shift, targets are labels[1:]: a sample needs a trained token after its first position.
            if not (trained[1:].any() if mask_prompt else ids.numel() > 1):
                self.num_without_targets += 1
                self.length_for_targets = max(self.length_for_targets, first + 1)
            self._samples.append((ids, trained))

    def _sample(
        self, conversation: Conversation, index: int, tokenizer: _Tokenizer, style: PromptStyle
    ) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """(input_ids, trained, whether the text was cut) of a conversation, huge messages cut (class docstring)."""
        longest = max((len(m.get("content") or "") + len(m.get("input") or "") for m in conversation), default=0)
        budget = CHARS_PER_TOKEN_BUDGET * self.max_seq_length
        if longest <= budget:
            return (*_encode(conversation, index, tokenizer, style), False)
        n = self.max_seq_length
        ids, trained = _encode(_cut(conversation, budget), index, tokenizer, style)
        while longest > budget:
            budget *= 2
            ids2, trained2 = _encode(_cut(conversation, budget), index, tokenizer, style)
            if ids.numel() >= n and torch.equal(ids[:n], ids2[:n]) and torch.equal(trained[:n], trained2[:n]):
                return ids, trained, True
            ids, trained = ids2, trained2
        return ids, trained, False  # the whole conversation after all: exact, as without any cut

    def __len__(self) -> int:
        return len(self._samples)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ids, trained = self._samples[index]
        labels = ids.clone()
        if self.mask_prompt:
            labels[~trained] = self.ignore_index
        return {"input_ids": ids, "labels": labels}

    def lengths(self) -> list[int]:
        """Token count of every sample, e.g. for sorting or length-grouped batching."""
        return [ids.numel() for ids, _ in self._samples]


def _answer_ends(trained: torch.Tensor) -> list[int]:
    """The token position right after each answer (each run of trained tokens)."""
    t = trained.int()
    edges = (t[1:] - t[:-1]).nonzero().flatten() + 1
    ends = [int(e) for e in edges if not trained[int(e)]]
    return ends + ([trained.numel()] if trained.numel() and bool(trained[-1]) else [])


def _cut(conversation: Conversation, budget: int) -> Conversation:
    """Every message's text (and Alpaca input) cut to `budget` characters."""
    out = []
    for m in conversation:
        m = dict(m)
        for key in ("content", "input"):
            if isinstance(m.get(key), str):
                m[key] = m[key][:budget]
        out.append(m)
    return out


def _encode(
    conversation: Conversation, index: int, tokenizer: _Tokenizer, style: PromptStyle
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, trained) of a conversation: its pieces (`PromptStyle.segments`) encoded one by one."""
    special = style.special_in_text
    try:
        ids, trained = [], []
        for i, (text, is_answer) in enumerate(style.segments(conversation)):
            piece = tokenizer.encode(text, bos=style.adds_bos if i == 0 else False,
                                     eos=is_answer and style.appends_eos, special=special).long()
            ids.append(piece)
            trained.append(torch.full((piece.numel(),), is_answer, dtype=torch.bool))
    except (TypeError, RuntimeError, ValueError) as err:
        # Backends fail on invalid text without saying where it is ("TextInputSequence must be str").
        for m, message in enumerate(conversation):
            for key in ("content", "input"):
                problem = text_problem(message[key]) if isinstance(message.get(key), str) else None
                if problem is not None:
                    where = _field_name(conversation, m, key)
                    raise ValueError(f"Record {index}: field {where!r} {problem}") from err
        raise
    return torch.cat(ids), torch.cat(trained)


def _field_name(conversation: Conversation, m: int, key: str) -> str:
    """How a user would call a message's field: Alpaca's names for a converted record, else messages[i].content."""
    roles = [msg["role"] for msg in conversation]
    if roles == ["user", "assistant"]:
        return {("user", "content"): "instruction", ("user", "input"): "input"}.get(
            (roles[m], key), "output")
    return f"messages[{m}].{key}"


def collate_packed(samples: Sequence[dict[str, torch.Tensor]]) -> dict[str, Any]:
    """Padding-free packing: the samples one after another in a single row, already shifted.

    Each sample contributes its inputs `input_ids[:-1]` and targets `labels[1:]` (shifting the row as a whole would
    make one sample's last token predict the next sample's first); `segments` are their lengths, so the model keeps
    attention within each and restarts positions (lit_model.model.GPT.hidden_states). Returns `inputs` and
    `targets` (1, T) and `segments`; `inputs_targets` reads either kind of batch.
    """
    if not samples:
        raise ValueError("collate_packed needs at least one sample")
    inputs = torch.cat([s["input_ids"][:-1] for s in samples])[None]  # (1, T)
    targets = torch.cat([s["labels"][1:] for s in samples])[None]  # (1, T)
    return {"inputs": inputs, "targets": targets, "segments": [s["input_ids"].numel() - 1 for s in samples]}


def inputs_targets(batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, Optional[list[int]]]:
    """(model inputs, targets, packed segments or None) of a batch from `collate` (shifted here) or
    `collate_packed` (shifted per sample already)."""
    if "segments" in batch:
        return batch["inputs"], batch["targets"], batch["segments"]
    return batch["input_ids"][:, :-1], batch["labels"][:, 1:], None


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


