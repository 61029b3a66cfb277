"""The tokenizer of a GGUF file as Hugging Face files: tokenizer.json, tokenizer_config.json, generation_config.json.

A GGUF file stores its vocabulary as metadata: `tokenizer.ggml.model` ("gpt2": byte-level BPE; "llama": a
SentencePiece vocabulary), `tokens`, `token_type` (1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte),
`merges` (BPE) or `scores` (SentencePiece), `pre` (which pre-tokenizer regex the merges were learned with), the
special token ids and `add_bos_token`. We rebuild the `tokenizers` pipeline from these, as transformers' GGUF
tokenizer conversion does (`transformers/integrations/gguf/gguf_tokenizer_mapping.py`), so that
`lit_model.tokenizer.Tokenizer` and `transformers.AutoTokenizer` both load the result. Deliberate differences from
transformers 5.x, each to follow llama.cpp (the runtime the file was made for) and the model's original tokenizer:

  - pre-tokenizer "smollm" (and the others llama.cpp groups with it: starcoder, refact, command-r, codeshell, exaone,
    minerva-7b) splits digits one by one before the GPT-2 regex, as llama.cpp and these models' own tokenizer.json do;
    transformers falls back to the plain GPT-2 regex. SmolLM2's vocabulary has no multi-digit tokens and no " 1"-style
    merges, so the ids agree there (tested on the real model).
  - the Llama 3 pre-tokenizers (llama3, llama-bpe, ...) match whole vocabulary words before merging
    (`ignore_merges`), as llama.cpp and Llama 3's tokenizer.json do; transformers merges them.
  - a control or user-defined token that is not spelled in the byte-level alphabet (e.g. DeepSeek's
    "<｜begin▁of▁sentence｜>") keeps its spelling and becomes an added token under its own id; transformers
    re-spells it and then skips it, so its text is split into pieces.
  - SentencePiece vocabularies honour `tokenizer.ggml.add_space_prefix` (transformers always prepends "▁").
  - generation_config.json's `eos_token_id` lists llama.cpp's end-of-turn ids (`eot_token_id`, `eom_token_id`) after
    the EOS, so generation stops where llama.cpp stops (e.g. Llama 3 Instruct's "<|eot_id|>").
"""

from __future__ import annotations

import json
import warnings
from functools import lru_cache
from typing import Any, Optional

GGUF_TOKENIZER_MODELS = ("gpt2", "llama")
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Regexes by `tokenizer.ggml.pre` (the values of llama.cpp's llama-vocab.cpp, as transformers also lists them).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3_PRE = ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2", "jina-v5-nano")
_SPLITS: dict[str, str] = {
    **dict.fromkeys((*_LLAMA3_PRE, "dbrx", "smaug-bpe"), _LLAMA3_SPLIT),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez"), _QWEN2_SPLIT),
    "tekken": _TEKKEN_SPLIT,
    **dict.fromkeys(("gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"), _GPT4O_SPLIT),
}
_DIGITS_THEN_GPT2 = ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b")
_GPT2_PRE = ("default", "gpt-2", "gpt2", "mpt", "olmo", "jais", "phi-2")
# llama.cpp matches whole words against the vocabulary before merging for these (`ignore_merges`)
_IGNORE_MERGES = (*_LLAMA3_PRE, "youtu")


@lru_cache(maxsize=1)
def byte_level_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character map: printable Latin-1 bytes stand for themselves, the other 68 bytes are
    moved to U+0100 and up, in byte order (so " " is "Ġ" and "\\n" is "Ċ")."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in printable}
    moved = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + moved)
            moved += 1
    return mapping


def gguf_tokenizer(metadata: dict[str, Any]) -> Any:
    """A `tokenizers.Tokenizer` equivalent to the tokenizer a GGUF file's metadata describes.

    Raises ValueError for vocabularies of other kinds than "gpt2" (byte-level BPE) and "llama" (SentencePiece), and
    for malformed token lists.
    """
    from tokenizers import AddedToken, Tokenizer

    kind = metadata.get("tokenizer.ggml.model")
    tokens = metadata.get("tokenizer.ggml.tokens")
    if kind not in GGUF_TOKENIZER_MODELS or not isinstance(tokens, list):
        raise ValueError(
            f"Cannot build a tokenizer from this GGUF file: tokenizer.ggml.model is {kind!r}"
            + ("" if isinstance(tokens, list) else " and it has no tokenizer.ggml.tokens")
            + f"; supported: {', '.join(GGUF_TOKENIZER_MODELS)} (byte-level BPE and SentencePiece vocabularies)."
        )
    types = list(metadata.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens))
    if len(types) != len(tokens):
        raise ValueError(f"The GGUF file lists {len(tokens)} tokens but {len(types)} token types.")
    # Control and unknown tokens, and BOS / EOS, are matched whole in the text and count as special (as in llama.cpp);
    # user-defined ones are matched whole but are ordinary text. The padding token is left alone: some files name an
    # ordinary word (e.g. "!") as padding.
    named = {_token_id(metadata, key, len(tokens)) for key in ("bos_token_id", "eos_token_id", "unknown_token_id")}
    special = [i for i, t in enumerate(types) if t in (CONTROL, UNKNOWN) or i in named]
    user = [i for i, t in enumerate(types) if t == USER_DEFINED and i not in named]
    if kind == "gpt2":
        tokenizer: Tokenizer = _byte_level_bpe(metadata, tokens, keep_spelling={*special, *user})
    else:
        tokenizer = _sentencepiece_bpe(metadata, tokens, types)
    # Each added token is in the vocabulary already, under its own text, so it keeps its id.
    tokenizer.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False) for i in special])
    tokenizer.add_tokens([AddedToken(tokens[i], special=False, normalized=False) for i in user])
    moved = [f"{tokens[i]!r} (id {i})" for i in (*special, *user) if tokenizer.token_to_id(tokens[i]) != i]
    if moved:
        raise ValueError(
            f"The GGUF vocabulary lists these special tokens more than once: {', '.join(moved[:5])}, so their ids are "
            "ambiguous and chat templates would be tokenized wrongly. The file's tokenizer is broken."
        )
    tokenizer.post_processor = _post_processor(metadata, tokens)
    return tokenizer


def _byte_level_bpe(metadata: dict[str, Any], tokens: list[str], keep_spelling: set[int]) -> Any:
    """GPT-2-style byte-level BPE, with the pre-tokenizer regex `tokenizer.ggml.pre` names.

    Vocabulary entries are spelled in the byte alphabet ("Ġthe"). An ordinary token that is not (a mislabelled file)
    is re-spelled from its UTF-8 bytes, as transformers does; the tokens in `keep_spelling` (those added as whole
    tokens: control, user-defined, BOS/EOS) keep their text, which is how they are matched in the input.
    """
    from tokenizers import Regex, Tokenizer, decoders, pre_tokenizers

    alphabet = set(byte_level_alphabet().values())
    spell = byte_level_alphabet()

    def key(i: int, token: str) -> str:
        if i in keep_spelling or set(token) <= alphabet:
            return token
        return "".join(spell[b] for b in token.encode("utf-8"))

    vocab = {key(i, token): i for i, token in enumerate(tokens)}
    pre = str(metadata.get("tokenizer.ggml.pre", "default"))
    tokenizer = Tokenizer(
        _bpe(
            vocab=vocab,
            merges=_merges(metadata),
            dropout=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
            byte_fallback=False,
            ignore_merges=pre in _IGNORE_MERGES,
        )
    )
    if pre in _SPLITS:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_SPLITS[pre]), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    elif pre in _DIGITS_THEN_GPT2:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
        )
    else:
        if pre not in _GPT2_PRE:
            known = sorted({*_SPLITS, *_DIGITS_THEN_GPT2, *_GPT2_PRE})
            warnings.warn(
                f"Unknown GGUF pre-tokenizer {pre!r} (tokenizer.ggml.pre): using the GPT-2 regex, as transformers "
                f"does. Words may be split differently from llama.cpp. Known: {', '.join(known)}.",
                stacklevel=3,
            )
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # its default regex is GPT-2's
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _sentencepiece_bpe(metadata: dict[str, Any], tokens: list[str], types: list[int]) -> Any:
    """A SentencePiece vocabulary as `tokenizers` BPE with byte fallback, like transformers' LlamaTokenizer.

    Files from SentencePiece models carry scores but no merges: the merges are recovered from the scores (see
    `_merges_from_scores`). Spaces are "▁"; one is prepended to the text (not after special tokens) when
    `tokenizer.ggml.add_space_prefix` is true (the default).
    """
    from tokenizers import Tokenizer, decoders, pre_tokenizers

    vocab = {token: i for i, token in enumerate(tokens)}
    unk = _token_id(metadata, "unknown_token_id", len(tokens))
    if unk is None:
        unk = next((i for i, t in enumerate(types) if t == UNKNOWN), None)
    merges = _merges(metadata) if "tokenizer.ggml.merges" in metadata else _merges_from_scores(metadata, tokens)
    model = _bpe(
        vocab=vocab,
        merges=merges,
        dropout=None,
        unk_token=tokens[unk] if unk is not None else None,
        fuse_unk=True,
        byte_fallback=True,
    )
    tokenizer = Tokenizer(model)
    prefix = bool(metadata.get("tokenizer.ggml.add_space_prefix", True))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="first" if prefix else "never", split=False
    )
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if prefix:
        steps.append(decoders.Strip(content=" ", left=1))
    tokenizer.decoder = decoders.Sequence(steps)
    return tokenizer


def _bpe(**kwargs: Any) -> Any:
    """`tokenizers.models.BPE(**kwargs)`; its refusal of merges that name unknown tokens becomes a ValueError."""
    from tokenizers import models

    try:
        return models.BPE(**kwargs)
    except Exception as err:  # tokenizers raises a bare Exception
        raise ValueError(f"The GGUF file's merges and tokens do not fit together ({err}): its tokenizer is broken.")


def _merges(metadata: dict[str, Any]) -> list[tuple[str, str]]:
    """`tokenizer.ggml.merges` ("a b" strings, best first) as pairs."""
    merges = []
    for merge in metadata.get("tokenizer.ggml.merges") or []:
        pair = tuple(merge.split(" "))
        if len(pair) != 2:
            raise ValueError(f"Malformed merge {merge!r} in tokenizer.ggml.merges: expected two tokens and one space.")
        merges.append(pair)
    return merges


def _merges_from_scores(metadata: dict[str, Any], tokens: list[str]) -> list[tuple[str, str]]:
    """The BPE merges a SentencePiece vocabulary implies: every split of a token into two vocabulary tokens is a merge
    producing it, ranked by the token's score (higher first).

    Ties are broken as transformers' `generate_merges` does, so both give the same merges list: longer left part,
    then longer right part, then token order, then the ids of the two parts.
    """
    scores = metadata.get("tokenizer.ggml.scores")
    if not scores or len(scores) != len(tokens):
        raise ValueError(
            "This GGUF file's SentencePiece vocabulary has neither merges nor one score per token "
            "(tokenizer.ggml.scores), so the tokenizer cannot be rebuilt."
        )
    vocab = {token: i for i, token in enumerate(tokens)}
    score_of = dict(zip(tokens, scores))  # a token listed twice counts with its last score, as in a dict of both
    ranked = []
    for order, (token, score) in enumerate(score_of.items()):
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in vocab and right in vocab:
                ranked.append((-score, -len(left), -len(right), order, vocab[left], vocab[right], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _post_processor(metadata: dict[str, Any], tokens: list[str]) -> Any:
    """A TemplateProcessing that adds BOS / EOS as the file's add_bos_token / add_eos_token say."""
    from tokenizers import processors

    bos = _token_id(metadata, "bos_token_id", len(tokens)) if _add_flag(metadata, "add_bos_token") else None
    eos = _token_id(metadata, "eos_token_id", len(tokens)) if _add_flag(metadata, "add_eos_token") else None
    before = [tokens[bos]] if bos is not None else []
    after = [tokens[eos]] if eos is not None else []
    single = [*before, "$A", *after]
    pair = [*single, *(f"{t}:1" for t in before), "$B:1", *(f"{t}:1" for t in after)]
    special = {tokens[i]: i for i in (bos, eos) if i is not None}
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=list(special.items()))


_SPECIAL_IDS = {
    "bos_token": "bos_token_id",
    "eos_token": "eos_token_id",
    "unk_token": "unknown_token_id",
    "pad_token": "padding_token_id",
}


def _token_id(metadata: dict[str, Any], key: str, n_tokens: int) -> Optional[int]:
    """`tokenizer.ggml.<key>` as an id, None when absent; raises when it is outside the vocabulary."""
    value = metadata.get(f"tokenizer.ggml.{key}")
    if value is None:
        return None
    if not 0 <= int(value) < n_tokens:
        raise ValueError(f"tokenizer.ggml.{key} = {value} is outside the vocabulary of {n_tokens} tokens.")
    return int(value)


def _add_flag(metadata: dict[str, Any], flag: str) -> bool:
    """add_bos_token / add_eos_token: as stated, else llama.cpp's default (BOS for SentencePiece and Llama 3
    vocabularies, nothing else)."""
    value = metadata.get(f"tokenizer.ggml.{flag}")
    if value is not None:
        return bool(value)
    if flag == "add_eos_token":
        return False
    return metadata.get("tokenizer.ggml.model") == "llama" or metadata.get("tokenizer.ggml.pre") in _LLAMA3_PRE


def gguf_tokenizer_config(metadata: dict[str, Any]) -> dict[str, Any]:
    """tokenizer_config.json for a GGUF file: the special tokens, add_bos_token, and the chat template verbatim."""
    tokens = metadata.get("tokenizer.ggml.tokens") or []
    config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast"}
    for name, key in _SPECIAL_IDS.items():
        token_id = _token_id(metadata, key, len(tokens))
        config[name] = tokens[token_id] if token_id is not None else None
    config["add_bos_token"] = _add_flag(metadata, "add_bos_token") and config["bos_token"] is not None
    config["add_eos_token"] = _add_flag(metadata, "add_eos_token") and config["eos_token"] is not None
    if metadata.get("tokenizer.chat_template") is not None:
        config["chat_template"] = metadata["tokenizer.chat_template"]
    config["clean_up_tokenization_spaces"] = False
    arch = metadata.get("general.architecture")
    if metadata.get(f"{arch}.context_length"):
        config["model_max_length"] = int(metadata[f"{arch}.context_length"])
    return config


def gguf_generation_config(metadata: dict[str, Any]) -> dict[str, Any]:
    """generation_config.json for a GGUF file: BOS, the ids that end generation (EOS, then end-of-turn), PAD."""
    n_tokens = len(metadata.get("tokenizer.ggml.tokens") or [])
    config: dict[str, Any] = {}
    bos = _token_id(metadata, "bos_token_id", n_tokens)
    if bos is not None:
        config["bos_token_id"] = bos
    stops = [_token_id(metadata, key, n_tokens) for key in ("eos_token_id", "eot_token_id", "eom_token_id")]
    stops = list(dict.fromkeys(i for i in stops if i is not None))
    if stops:
        config["eos_token_id"] = stops[0] if len(stops) == 1 else stops
    pad = _token_id(metadata, "padding_token_id", n_tokens)
    if pad is not None:
        config["pad_token_id"] = pad
    return config


def gguf_tokenizer_files(metadata: dict[str, Any]) -> dict[str, str]:
    """The tokenizer files of a checkpoint directory for a GGUF file's metadata: file name -> text."""
    return {
        "tokenizer.json": gguf_tokenizer(metadata).to_str(pretty=True),
        "tokenizer_config.json": json.dumps(gguf_tokenizer_config(metadata), indent=2, ensure_ascii=False),
        "generation_config.json": json.dumps(gguf_generation_config(metadata), indent=2),
    }
