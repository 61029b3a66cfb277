"""Tiny tokenizers for tests, trained offline in milliseconds (`from tests.tokenizer_utils import make_bpe_tokenizer`).

`make_bpe_tokenizer(tmp_path)` writes a byte-level BPE `tokenizer.json` directory (Llama 3 / GPT-2 style),
`make_sentencepiece_tokenizer(tmp_path)` a `tokenizer.model` directory (Llama 2 style). Both write
`tokenizer_config.json` with BOS/EOS and load in `lit_model.tokenizer.Tokenizer` and `transformers.AutoTokenizer`.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

# A few KB of varied text: ASCII prose, code, digits, punctuation, accents, CJK and emoji (multi-byte UTF-8).
DEFAULT_TEXTS: list[str] = [
    "The quick brown fox jumps over the lazy dog.",
    "Fine-tuning large language models on a single GPU is possible with LoRA, QLoRA and DropBP.",
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
    "### Instruction:\nSummarise the paragraph.\n\n### Response:\n",
    "def add(a, b):\n    return a + b\n\nprint(add(1, 2))  # 3\n",
    "Numbers: 0 1 2 3 4 5 6 7 8 9, 3.14159, 2024-11-05, 100% and $42.",
    "Naïve café, déjà vu, façade, Zürich, São Paulo, smörgåsbord.",
    "日本語のテキストと中文文本。 Ελληνικά και русский текст.",
    "Emoji 🙂🚀🎉 and symbols — “quotes” ‘single’ … ©®™ €£¥.",
    "\tTabs\tand  double  spaces   and trailing spaces   \n",
] * 8
BPE_BOS, BPE_EOS = "<|begin_of_text|>", "<|end_of_text|>"
SP_BOS, SP_EOS, SP_UNK = "<s>", "</s>", "<unk>"


def make_bpe_tokenizer(
    dir: Path,
    texts: list[str] | None = None,
    vocab_size: int = 300,
    add_bos_token: bool = True,
) -> Path:
    """Train a byte-level BPE `tokenizer.json` into `dir` and write its tokenizer_config.json; return `dir`.

    BOS "<|begin_of_text|>" and EOS "<|end_of_text|>" are added after training, so their ids come after the learned
    vocabulary (as in Llama 3), not 0 and 1. With `add_bos_token`, tokenizer.json gets a TemplateProcessing that
    prepends BOS (as Llama 3's does) and tokenizer_config.json says add_bos_token=true; without, neither adds BOS
    (GPT-2, Qwen2). The two always agree: transformers 5.x ignores add_bos_token when tokenizer.json exists.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tokenizer.train_from_iterator(texts if texts is not None else DEFAULT_TEXTS, trainer=trainer)
    tokenizer.add_special_tokens([BPE_BOS, BPE_EOS])
    if add_bos_token:
        bos_id = tokenizer.token_to_id(BPE_BOS)
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{BPE_BOS} $A", pair=f"{BPE_BOS} $A {BPE_BOS} $B:1", special_tokens=[(BPE_BOS, bos_id)]
        )
    else:
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    tokenizer.save(str(dir / "tokenizer.json"))
    config: dict[str, object] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BPE_BOS,
        "eos_token": BPE_EOS,
        "add_bos_token": add_bos_token,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 4096,
    }
    (dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return dir


def make_sentencepiece_tokenizer(
    dir: Path,
    texts: list[str] | None = None,
    vocab_size: int = 400,
    add_bos_token: bool = True,
    add_eos_token: bool = False,
    model_type: str = "bpe",
) -> Path:
    """Train a Llama-2-style SentencePiece `tokenizer.model` into `dir` and write tokenizer_config.json; return `dir`.

    Like Llama's: unk/bos/eos = 0/1/2 ("<unk>", "<s>", "</s>"), byte fallback (so any text encodes without <unk>),
    identity normalisation and no whitespace collapsing, digits split. `vocab_size` is a soft limit (the 256 byte
    pieces come on top of what a tiny corpus supports); `model_type` "bpe" (Llama's) or "unigram". tokenizer_config.json
    names `LlamaTokenizer`, which `transformers.AutoTokenizer` needs to convert the model the way SentencePiece encodes
    (without it, transformers 5.x builds a generic tokenizer whose ids differ), and writes add_bos_token/add_eos_token
    (transformers honours both when there is no tokenizer.json).
    """
    import sentencepiece as spm

    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts if texts is not None else DEFAULT_TEXTS),
        model_writer=model,
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        model_type=model_type,
        byte_fallback=True,
        character_coverage=1.0,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        allow_whitespace_only_pieces=True,
        split_digits=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        minloglevel=2,  # quiet
    )
    (dir / "tokenizer.model").write_bytes(model.getvalue())
    config: dict[str, object] = {
        "tokenizer_class": "LlamaTokenizer",
        "bos_token": SP_BOS,
        "eos_token": SP_EOS,
        "unk_token": SP_UNK,
        "add_bos_token": add_bos_token,
        "add_eos_token": add_eos_token,
        "legacy": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 4096,
    }
    (dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return dir
