"""One `Tokenizer` over SentencePiece (`tokenizer.model`) or Hugging Face `tokenizers` (`tokenizer.json`).

The backend is chosen by the files present in a checkpoint directory. When both exist, `tokenizer.json` wins, as in
`transformers.AutoTokenizer` (which loads the fast tokenizer from `tokenizer.json` and only converts `tokenizer.model`
when there is no `tokenizer.json`) and in Lit-GPT.

Special tokens, first source that names them wins (a name given as null means "none"):
  1. `tokenizer_config.json` `bos_token` / `eos_token` (a string, or a dict with "content"),
  2. `special_tokens_map.json` (the same keys; older checkpoints keep them only there). As in transformers, it is read
     only when tokenizer_config.json has no "added_tokens_decoder" (older configs), and then it comes first,
  3. `generation_config.json` `bos_token_id` / `eos_token_id` (an int, or a list: the first is taken; all of them
     are kept in `stop_ids`, e.g. Llama 3 Instruct stops on `<|end_of_text|>` and `<|eot_id|>`),
  4. the SentencePiece model's own bos/eos ids.

Known, deliberate differences from `transformers` 5.x (`AutoTokenizer`), each for faithfulness to the tokenizer the
model was trained with:
  - SentencePiece backend: text starting with a space. SentencePiece adds its dummy prefix "▁" to every text, while
    transformers' converted `LlamaTokenizer` (a `tokenizers` Metaspace with prepend_scheme="first") does not prepend it
    when the text already starts with a space, so " x" differs. All other text gives the same ids.
  - SentencePiece backend: special-token strings inside the text ("<s>") stay literal text, as in SentencePiece and
    Meta's reference code; transformers parses them as the special token. The HF backend parses them, like transformers
    (chat templates such as Llama 3's rely on it).
  - `encode(bos=True)` never adds a second BOS when the text already begins with one (transformers would).
  - `add_bos_token` in tokenizer_config.json decides `use_bos` for both backends. transformers 5.x ignores it when
    tokenizer.json exists (the tokenizer.json post-processor decides; 4.x rebuilt the post-processor from it), so the
    two differ only where the two files disagree; without `add_bos_token` we follow the post-processor, as 5.x does.
  - No `add_bos_token` and no tokenizer.json, on a SentencePiece model with a BOS: we add BOS (Lit-GPT, Meta's
    reference code); transformers 5.x's `LlamaTokenizer` then adds none.
  - SentencePiece unigram models: transformers 5.x's `LlamaTokenizer` converts them to BPE, and its ids differ from
    SentencePiece's; we use SentencePiece itself, so ours are the ones the model was trained with.
  - `add_eos_token` is not read: EOS is added only when `encode(eos=True)` asks for it.
  - `decode` applies no `clean_up_tokenization_spaces` (it is lossy and breaks decode(encode(x)) == x).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

# Files that belong to a tokenizer: copied along whenever a checkpoint directory is written.
TOKENIZER_FILES: tuple[str, ...] = (
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "added_tokens.json",
    "chat_template.jinja",
)

# What to do about a tokenizer file that cannot be read.
_DAMAGED = (
    "The file is damaged or not what its name says (e.g. an interrupted download, or an HTML error page saved in its "
    "place): download the model again, or copy the tokenizer files from the original checkpoint."
)

# U+FFFD: what a decoder produces for an incomplete UTF-8 sequence (a character split across byte tokens).
_REPLACEMENT_CHAR = "\ufffd"


def _read_json(path: Path) -> dict[str, Any]:
    """Read a JSON object from `path`, or an empty dict when the file does not exist."""
    if not path.is_file():
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}). {_DAMAGED}") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, found {type(data).__name__}")
    return data


def _token_content(token: Any) -> str | None:
    """A special token as written in tokenizer_config.json: a string, or a dict such as {"content": "<s>", ...}."""
    if isinstance(token, dict):
        token = token.get("content")
    return token if isinstance(token, str) else None


def _id_list(value: Any) -> list[int]:
    """A generation_config.json token id entry (an int, a list of ints, or null) as a list."""
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


class Tokenizer:
    """Text <-> token ids for a checkpoint directory, over SentencePiece or Hugging Face `tokenizers`.

    Attributes:
        backend: "huggingface" (tokenizer.json) or "sentencepiece" (tokenizer.model).
        bos_id, eos_id: the BOS/EOS token ids, or None when the tokenizer has none.
        stop_ids: every id that ends generation: `eos_id` plus all `eos_token_id`s of generation_config.json.
        vocab_size: the number of ids the tokenizer can produce (added tokens included).
        use_bos: whether `encode` adds BOS by default: tokenizer_config.json `add_bos_token` when given, else whether
            the HF post-processor adds it, else True for a SentencePiece model that has a BOS.
    """

    backend: str
    bos_id: int | None
    eos_id: int | None
    stop_ids: tuple[int, ...]
    vocab_size: int
    use_bos: bool

    def __init__(self, checkpoint_dir: str | Path) -> None:
        """Load the tokenizer files of `checkpoint_dir`; raise if the directory or the tokenizer files are missing."""
        checkpoint_dir = Path(checkpoint_dir)
        if not checkpoint_dir.is_dir():
            raise FileNotFoundError(
                f"The checkpoint directory {str(checkpoint_dir)!r} does not exist. Pass the directory that holds "
                "tokenizer.json or tokenizer.model (download or convert the checkpoint first)."
            )
        self.checkpoint_dir = checkpoint_dir
        config = _read_json(checkpoint_dir / "tokenizer_config.json")
        special_tokens_map = _read_json(checkpoint_dir / "special_tokens_map.json")
        generation_config = _read_json(checkpoint_dir / "generation_config.json")

        self._hf: Any = None
        self._sp: Any = None
        if (checkpoint_dir / "tokenizer.json").is_file():
            from tokenizers import Tokenizer as HFTokenizer

            self.backend = "huggingface"
            path = checkpoint_dir / "tokenizer.json"
            try:
                self._hf = HFTokenizer.from_file(str(path))
            except Exception as err:  # tokenizers raises a bare Exception ("expected value at line 1 column 1")
                raise ValueError(f"{path} is not a valid tokenizer.json ({err}). {_DAMAGED}") from err
            # tokenizer.json may carry padding/truncation settings; `encode` must return the whole text, unpadded.
            self._hf.no_padding()
            self._hf.no_truncation()
            self.vocab_size = self._hf.get_vocab_size(with_added_tokens=True)
        elif (checkpoint_dir / "tokenizer.model").is_file():
            import sentencepiece as spm

            self.backend = "sentencepiece"
            path = checkpoint_dir / "tokenizer.model"
            try:
                self._sp = spm.SentencePieceProcessor(model_file=str(path))
            except (RuntimeError, OSError) as err:  # "INTERNAL: could not parse ModelProto from ..."
                raise ValueError(f"{path} is not a valid SentencePiece model ({err}). {_DAMAGED}") from err
            self.vocab_size = self._sp.vocab_size()
        else:
            raise FileNotFoundError(
                f"No tokenizer in {str(checkpoint_dir)!r}: expected tokenizer.json or tokenizer.model. Copy the "
                f"tokenizer files ({', '.join(TOKENIZER_FILES)}) from the original checkpoint into this directory."
            )

        self.bos_id = self._special_id("bos", config, special_tokens_map, generation_config)
        self.eos_id = self._special_id("eos", config, special_tokens_map, generation_config)
        stop_ids = ([self.eos_id] if self.eos_id is not None else []) + _id_list(generation_config.get("eos_token_id"))
        self.stop_ids = tuple(dict.fromkeys(stop_ids))  # unique, in order

        add_bos_token = config.get("add_bos_token")
        if add_bos_token is not None:
            self.use_bos = bool(add_bos_token)
        elif self._hf is not None:
            self.use_bos = self._post_processor_adds_bos()
        else:
            self.use_bos = self.bos_id is not None
        if self.use_bos and self.bos_id is None:
            raise ValueError(
                f"{checkpoint_dir / 'tokenizer_config.json'} sets add_bos_token=true but names no bos_token, and "
                "no BOS id was found elsewhere: set bos_token there (or add_bos_token to false)."
            )

    def _special_id(
        self, kind: str, config: dict[str, Any], special_tokens_map: dict[str, Any], generation_config: dict[str, Any]
    ) -> int | None:
        """The id of the `kind` ("bos" or "eos") token, from the first source that names it (see the module doc)."""
        # transformers reads special_tokens_map.json only for configs without "added_tokens_decoder" (written by
        # transformers >= 4.34), and lets it override tokenizer_config.json.
        sources = (config,) if "added_tokens_decoder" in config else (special_tokens_map, config)
        for source in sources:
            if f"{kind}_token" in source:
                token = _token_content(source[f"{kind}_token"])
                return None if token is None else self.token_to_id(token)
        ids = _id_list(generation_config.get(f"{kind}_token_id"))
        if ids:
            return ids[0]
        if self._sp is not None:
            sp_id = self._sp.bos_id() if kind == "bos" else self._sp.eos_id()
            return sp_id if sp_id >= 0 else None  # SentencePiece reports -1 for a disabled token
        return None

    def _post_processor_adds_bos(self) -> bool:
        """Whether the tokenizer.json post-processor puts BOS in front of the text (e.g. a TemplateProcessing)."""
        if self.bos_id is None:
            return False
        with_special = self._hf.encode("a", add_special_tokens=True).ids
        without = self._hf.encode("a", add_special_tokens=False).ids
        return with_special[:1] == [self.bos_id] and without[:1] != [self.bos_id]

    def token_to_id(self, token: str) -> int:
        """The id of `token` (a vocabulary entry such as "<s>" or "▁the"); raise ValueError if it is not one."""
        if self._hf is not None:
            idx = self._hf.token_to_id(token)
        else:
            # piece_to_id answers the <unk> id for unknown pieces: check that the id maps back to the token.
            idx = self._sp.piece_to_id(token)
            if self._sp.id_to_piece(idx) != token:
                idx = None
        if idx is None:
            raise ValueError(
                f"Token {token!r} is not in the vocabulary of the tokenizer in {str(self.checkpoint_dir)!r}. "
                "Check the special tokens named in tokenizer_config.json / special_tokens_map.json."
            )
        return idx

    def encode(
        self,
        text: str,
        bos: bool | None = None,
        eos: bool = False,
        max_length: int = -1,
        device: torch.device | None = None,
        special: bool = False,
    ) -> torch.Tensor:
        """Token ids of `text` as a 1-D int64 tensor.

        Args:
            text: the text; for the HF backend, special-token strings in it become their ids.
            bos: prepend BOS; None means `use_bos`. No second BOS is added when the text already begins with one.
            eos: append EOS.
            max_length: keep only the first `max_length` ids when positive.
            device: where to put the tensor.
            special: for the SentencePiece backend, turn control-token strings ("<s>", "</s>") in the text into their
                ids, as a rendered chat template needs; each stretch of text between them is encoded on its own
                (with SentencePiece's dummy prefix, as Meta's reference chat code encodes every turn apart). The HF
                backend always parses special tokens.
        """
        if bos is None:
            bos = self.use_bos
        try:
            if self._hf is not None:
                # The post-processor is bypassed (add_special_tokens=False) and BOS/EOS added here, so they are never
                # added twice and the caller decides, whatever the tokenizer.json template says.
                ids: list[int] = self._hf.encode(text, add_special_tokens=False).ids
            elif special:
                ids = self._sp_encode_special(text)
            else:
                ids = self._sp.encode(text)
        except (TypeError, RuntimeError) as err:
            # Both backends fail on text that is not valid Unicode ("TextInputSequence must be str", "Unable to
            # cast Python instance"), without saying where: find the culprit.
            if not isinstance(text, str):
                raise TypeError(f"encode takes a str, got {type(text).__name__}") from err
            bad = next((i for i, c in enumerate(text) if "\ud800" <= c <= "\udfff"), None)
            if bad is None:
                raise
            raise ValueError(
                f"The text holds a lone UTF-16 surrogate U+{ord(text[bad]):04X} at character {bad} (after "
                f"{text[max(0, bad - 20):bad]!r}), which is not a character and cannot be tokenized: fix the text."
            ) from err
        if bos:
            if self.bos_id is None:
                raise ValueError(
                    f"The tokenizer in {str(self.checkpoint_dir)!r} has no BOS token; call encode(..., bos=False)."
                )
            if ids[:1] != [self.bos_id]:
                ids = [self.bos_id] + ids
        if eos:
            if self.eos_id is None:
                raise ValueError(
                    f"The tokenizer in {str(self.checkpoint_dir)!r} has no EOS token; call encode(..., eos=False)."
                )
            ids = ids + [self.eos_id]
        if max_length > 0:
            ids = ids[:max_length]
        return torch.tensor(ids, dtype=torch.long, device=device)

    def _sp_encode_special(self, text: str) -> list[int]:
        """SentencePiece ids with control-token strings in `text` mapped to their ids (see `encode(special=True)`)."""
        import re

        sp = self._sp
        controls = {sp.id_to_piece(i): i for i in range(sp.vocab_size()) if sp.is_control(i)}
        if not controls:
            return sp.encode(text)
        pattern = re.compile("|".join(re.escape(p) for p in sorted(controls, key=len, reverse=True)))
        ids: list[int] = []
        start = 0
        for match in pattern.finditer(text):
            if match.start() > start:
                ids += sp.encode(text[start:match.start()])
            ids.append(controls[match.group()])
            start = match.end()
        if start < len(text):
            ids += sp.encode(text[start:])
        return ids

    def decode(self, ids: torch.Tensor | list[int], skip_special_tokens: bool = False) -> str:
        """The text of token ids (a 1-D tensor, a 0-D tensor or a list); special tokens are dropped if asked."""
        if isinstance(ids, torch.Tensor):
            if ids.ndim > 1:
                raise ValueError(f"decode takes one sequence (a 1-D tensor), got a tensor of shape {tuple(ids.shape)}")
            ids = ids.reshape(-1).tolist()
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"Token ids {bad[:5]} are outside the vocabulary [0, {self.vocab_size})")
        if self._hf is not None:
            return self._hf.decode(ids, skip_special_tokens=skip_special_tokens)
        return self._sp_decode(ids, skip_special_tokens)

    def _sp_decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        """SentencePiece decoding that, unlike `sp.decode`, can render control tokens such as "<s>" as text."""
        sp = self._sp

        def special(i: int) -> bool:
            return sp.is_control(i) or sp.is_unknown(i)

        if skip_special_tokens:
            return sp.decode([i for i in ids if not special(i)])
        # Decode each run of ordinary ids on its own and put the special pieces between the runs. SentencePiece drops
        # the leading space ("▁" dummy prefix) of the text's first piece only; a run after a special token keeps it,
        # which gives "<s> Hello" like transformers.
        parts: list[str] = []
        run: list[int] = []
        for i in [*ids, None]:
            if i is not None and not special(i):
                run.append(i)
                continue
            if run:
                text = sp.decode(run)
                if parts and sp.id_to_piece(run[0]).startswith("▁"):
                    text = " " + text
                parts.append(text)
                run = []
            if i is not None:
                parts.append(sp.id_to_piece(i))
        return "".join(parts)

    def decode_stream(self, ids: Iterable[int | torch.Tensor], skip_special_tokens: bool = False) -> Iterator[str]:
        """Decode token ids as they arrive: one text piece per id (possibly "", while a character is incomplete).

        The pieces concatenate to `decode(all ids)`. A piece is released only when the text decoded so far does not
        end in U+FFFD (a UTF-8 character split across byte tokens) and then holds what decoding the newest ids added
        after a one-token overlap, so a leading "▁" becomes a space and each step decodes a few ids, not the whole
        sequence. Whatever is still held when `ids` ends comes out as one last piece.
        """
        seen: list[int] = []
        prefix_offset = read_offset = 0  # seen[prefix_offset:read_offset] is context already emitted
        for token in ids:
            seen.append(int(token))
            prefix_text = self.decode(seen[prefix_offset:read_offset], skip_special_tokens)
            new_text = self.decode(seen[prefix_offset:], skip_special_tokens)
            if len(new_text) > len(prefix_text) and not new_text.endswith(_REPLACEMENT_CHAR):
                yield new_text[len(prefix_text) :]
                prefix_offset, read_offset = read_offset, len(seen)
            else:
                yield ""
        if read_offset < len(seen):
            prefix_text = self.decode(seen[prefix_offset:read_offset], skip_special_tokens)
            rest = self.decode(seen[prefix_offset:], skip_special_tokens)[len(prefix_text) :]
            if rest:
                yield rest

    def __repr__(self) -> str:
        return (
            f"Tokenizer(backend={self.backend!r}, vocab_size={self.vocab_size}, bos_id={self.bos_id}, "
            f"eos_id={self.eos_id}, use_bos={self.use_bos}, checkpoint_dir={str(self.checkpoint_dir)!r})"
        )
