"""Tokenizer: ids and text against transformers.AutoTokenizer (and SentencePiece itself) on tiny tokenizers trained
in the test; BOS/EOS resolution from the config files; streaming decode; errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lit_model.tokenizer import TOKENIZER_FILES, Tokenizer
from tests.tokenizer_utils import BPE_BOS, BPE_EOS, make_bpe_tokenizer, make_sentencepiece_tokenizer

transformers = pytest.importorskip("transformers")

# Unicode (2-, 3- and 4-byte UTF-8), whitespace runs, tabs, newlines, the empty string, digits, code.
STRINGS = [
    "Hello world",
    "",
    "x",
    "\n",
    "line1\nline2\n\n",
    "\tTab\tseparated",
    "two  spaces and trailing   ",
    "Naïve café — 日本語 🙂🚀",
    "ÿ€𝔘 ×",
    "def f(x):\n    return x * 2  # doubled\n",
    "3.14159 and 2024-11-05",
]
# SentencePiece's dummy prefix makes these differ from transformers 5.x's converted LlamaTokenizer (see the module doc).
LEADING_SPACE_STRINGS = [" ", " leading", "   three", " \n"]


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data), encoding="utf-8")


def hf_tokenizer(path: Path):
    return transformers.AutoTokenizer.from_pretrained(path)


@pytest.fixture
def bpe_dir(tmp_path: Path) -> Path:
    return make_bpe_tokenizer(tmp_path / "bpe")


@pytest.fixture
def sp_dir(tmp_path: Path) -> Path:
    return make_sentencepiece_tokenizer(tmp_path / "sp")


@pytest.mark.parametrize("kind", ["bpe", "sp"])
@pytest.mark.parametrize("add_bos_token", [True, False])
def test_ids_and_text_match_transformers(tmp_path: Path, kind: str, add_bos_token: bool) -> None:
    make = make_bpe_tokenizer if kind == "bpe" else make_sentencepiece_tokenizer
    path = make(tmp_path, add_bos_token=add_bos_token)
    ours, hf = Tokenizer(path), hf_tokenizer(path)
    assert ours.backend == ("huggingface" if kind == "bpe" else "sentencepiece")
    assert (ours.bos_id, ours.eos_id, ours.vocab_size) == (hf.bos_token_id, hf.eos_token_id, len(hf))
    assert ours.use_bos is add_bos_token
    assert ours.bos_id is not None and ours.eos_id is not None and ours.bos_id != ours.eos_id

    for text in STRINGS:
        plain = hf(text, add_special_tokens=False)["input_ids"]
        default = ours.encode(text)
        assert default.dtype == torch.long and default.ndim == 1
        # bos=None follows the tokenizer's own default, as transformers' add_special_tokens=True does.
        assert default.tolist() == hf(text)["input_ids"], text
        assert ours.encode(text, bos=False).tolist() == plain, text
        assert ours.encode(text, bos=True, eos=True).tolist() == [hf.bos_token_id, *plain, hf.eos_token_id], text

        ids = ours.encode(text, bos=True, eos=True)
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids.tolist(), skip_special_tokens=skip)
        assert ours.decode(ids, skip_special_tokens=True) == text
        assert ours.decode(ours.encode(text, bos=False)) == text


def test_sentencepiece_eos_matches_transformers_add_eos_token(tmp_path: Path) -> None:
    path = make_sentencepiece_tokenizer(tmp_path, add_eos_token=True)
    ours, hf = Tokenizer(path), hf_tokenizer(path)
    for text in STRINGS:
        assert ours.encode(text, eos=True).tolist() == hf(text)["input_ids"], text


def test_sentencepiece_leading_space_matches_sentencepiece(sp_dir: Path) -> None:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(sp_dir / "tokenizer.model"))
    ours, hf = Tokenizer(sp_dir), hf_tokenizer(sp_dir)
    for text in LEADING_SPACE_STRINGS + STRINGS:
        ids = ours.encode(text)
        # SentencePiece is the reference for what the model was trained on: BOS then its own encoding.
        assert ids.tolist() == [1, *sp.encode(text)], text
        assert ours.decode(ids, skip_special_tokens=True) == text
        # Decoding agrees with transformers on any ids, including these.
        assert ours.decode(ids) == hf.decode(ids.tolist()), text


def test_unigram_sentencepiece_is_encoded_by_sentencepiece(tmp_path: Path) -> None:
    import sentencepiece as spm

    path = make_sentencepiece_tokenizer(tmp_path, model_type="unigram")
    sp = spm.SentencePieceProcessor(model_file=str(path / "tokenizer.model"))
    ours = Tokenizer(path)
    for text in STRINGS:
        assert ours.encode(text, bos=False).tolist() == sp.encode(text)
        assert ours.decode(ours.encode(text), skip_special_tokens=True) == text


def test_sentencepiece_keeps_special_token_text_literal(sp_dir: Path) -> None:
    ours = Tokenizer(sp_dir)
    ids = ours.encode("<s> literal", bos=False).tolist()
    assert ours.bos_id not in ids
    assert ours.decode(ids) == "<s> literal"


def test_huggingface_parses_special_tokens_in_text(bpe_dir: Path) -> None:
    ours, hf = Tokenizer(bpe_dir), hf_tokenizer(bpe_dir)
    text = f"a{BPE_EOS}b"
    assert ours.encode(text, bos=False).tolist() == hf(text, add_special_tokens=False)["input_ids"]
    assert ours.eos_id in ours.encode(text).tolist()


def test_no_double_bos(bpe_dir: Path) -> None:
    ours, hf = Tokenizer(bpe_dir), hf_tokenizer(bpe_dir)
    text = f"{BPE_BOS}hi"
    ids = ours.encode(text).tolist()
    # transformers prepends a second BOS here ([bos, bos, ...]); we keep the one the text has.
    assert hf(text)["input_ids"][:2] == [ours.bos_id, ours.bos_id]
    assert ids == hf(text, add_special_tokens=False)["input_ids"]
    assert ids[0] == ours.bos_id and ids.count(ours.bos_id) == 1


def test_use_bos_follows_post_processor_without_add_bos_token(tmp_path: Path) -> None:
    for add_bos in (True, False):
        path = make_bpe_tokenizer(tmp_path / str(add_bos), add_bos_token=add_bos)
        config = json.loads((path / "tokenizer_config.json").read_text())
        del config["add_bos_token"]  # as in Llama 3's tokenizer_config.json
        write_json(path / "tokenizer_config.json", config)
        ours, hf = Tokenizer(path), hf_tokenizer(path)
        assert ours.use_bos is add_bos
        assert ours.encode("Hello").tolist() == hf("Hello")["input_ids"]


def test_add_bos_token_overrides_post_processor(tmp_path: Path) -> None:
    path = make_bpe_tokenizer(tmp_path, add_bos_token=True)
    config = json.loads((path / "tokenizer_config.json").read_text())
    write_json(path / "tokenizer_config.json", {**config, "add_bos_token": False})
    ours = Tokenizer(path)
    assert ours.use_bos is False
    assert ours.encode("Hello").tolist() == ours.encode("Hello", bos=False).tolist()
    assert ours.bos_id not in ours.encode("Hello").tolist()


def test_tokenizer_json_is_preferred_like_transformers(tmp_path: Path) -> None:
    both = make_bpe_tokenizer(tmp_path / "both")
    sp_path = make_sentencepiece_tokenizer(tmp_path / "sp")
    (both / "tokenizer.model").write_bytes((sp_path / "tokenizer.model").read_bytes())
    ours, hf = Tokenizer(both), hf_tokenizer(both)
    assert ours.backend == "huggingface"
    assert ours.vocab_size == len(hf) == Tokenizer(tmp_path / "both").vocab_size != Tokenizer(sp_path).vocab_size
    for text in STRINGS:
        assert ours.encode(text).tolist() == hf(text)["input_ids"]


def test_tokenizer_json_padding_and_truncation_are_ignored(bpe_dir: Path) -> None:
    data = json.loads((bpe_dir / "tokenizer.json").read_text())
    data["truncation"] = {"direction": "Right", "max_length": 2, "strategy": "LongestFirst", "stride": 0}
    data["padding"] = {
        "strategy": {"Fixed": 64}, "direction": "Right", "pad_to_multiple_of": None,
        "pad_id": 0, "pad_type_id": 0, "pad_token": "!",
    }  # fmt: skip
    (bpe_dir / "tokenizer.json").write_text(json.dumps(data))
    ours = Tokenizer(bpe_dir)
    ids = ours.encode("Hello world, a longer text", bos=False)
    assert 2 < len(ids) < 64
    assert ours.decode(ids) == "Hello world, a longer text"


def test_special_ids_from_dict_tokens_and_special_tokens_map(tmp_path: Path) -> None:
    path = make_bpe_tokenizer(tmp_path)
    # Special tokens as transformers 4.x wrote them: AddedToken dicts.
    config = {"bos_token": {"__type": "AddedToken", "content": BPE_EOS}, "eos_token": None, "add_bos_token": False}
    write_json(path / "tokenizer_config.json", config)
    write_json(path / "special_tokens_map.json", {"bos_token": {"content": BPE_BOS}, "pad_token": "!"})
    # An older config (no "added_tokens_decoder"): special_tokens_map.json overrides it, as in transformers.
    ours, hf = Tokenizer(path), hf_tokenizer(path)
    assert (ours.bos_id, ours.eos_id) == (hf.bos_token_id, hf.eos_token_id) == (300, None)
    assert ours.stop_ids == ()
    # A newer config: special_tokens_map.json is not read; a dict token names its "content".
    write_json(path / "tokenizer_config.json", {**config, "added_tokens_decoder": {}})
    ours, hf = Tokenizer(path), hf_tokenizer(path)
    assert (ours.bos_id, ours.eos_id) == (hf.bos_token_id, hf.eos_token_id) == (301, None)


def test_special_ids_from_generation_config(tmp_path: Path) -> None:
    path = make_bpe_tokenizer(tmp_path)
    (path / "tokenizer_config.json").unlink()
    write_json(path / "generation_config.json", {"bos_token_id": 300, "eos_token_id": [5, 301]})
    ours = Tokenizer(path)
    # A list of EOS ids (Llama 3 Instruct): the first is eos_id, all of them stop generation.
    assert (ours.bos_id, ours.eos_id, ours.stop_ids) == (300, 5, (5, 301))
    assert ours.use_bos is True  # the tokenizer.json post-processor prepends BOS
    ids = ours.encode("hi", eos=True).tolist()
    assert (ids[0], ids[-1]) == (300, 5)

    # tokenizer_config.json names EOS: it comes first and the generation_config.json ids are still stop ids.
    write_json(path / "tokenizer_config.json", {"eos_token": BPE_EOS})
    assert Tokenizer(path).stop_ids == (301, 5)


def test_special_ids_fall_back_to_sentencepiece_model(sp_dir: Path) -> None:
    (sp_dir / "tokenizer_config.json").unlink()
    ours = Tokenizer(sp_dir)
    assert (ours.bos_id, ours.eos_id, ours.use_bos) == (1, 2, True)
    assert ours.encode("hi")[0].item() == 1


def test_no_special_tokens(bpe_dir: Path) -> None:
    (bpe_dir / "tokenizer_config.json").unlink()
    data = json.loads((bpe_dir / "tokenizer.json").read_text())
    data["post_processor"] = None
    (bpe_dir / "tokenizer.json").write_text(json.dumps(data))
    ours = Tokenizer(bpe_dir)
    assert (ours.bos_id, ours.eos_id, ours.use_bos, ours.stop_ids) == (None, None, False, ())
    assert ours.decode(ours.encode("plain text")) == "plain text"
    with pytest.raises(ValueError, match="has no BOS token"):
        ours.encode("hi", bos=True)
    with pytest.raises(ValueError, match="has no EOS token"):
        ours.encode("hi", eos=True)


def test_token_to_id_matches_transformers(bpe_dir: Path, sp_dir: Path) -> None:
    for path, tokens in ((bpe_dir, [BPE_BOS, BPE_EOS, "a", "Ġ"]), (sp_dir, ["<s>", "</s>", "<unk>", "▁", "<0x0A>"])):
        ours, hf = Tokenizer(path), hf_tokenizer(path)
        for token in tokens:
            assert ours.token_to_id(token) == hf.convert_tokens_to_ids(token), token


def test_encode_max_length_and_device(sp_dir: Path) -> None:
    ours = Tokenizer(sp_dir)
    full = ours.encode("Hello world, how are you?", eos=True)
    assert len(full) > 4
    cut = ours.encode("Hello world, how are you?", eos=True, max_length=4, device=torch.device("cpu"))
    assert cut.tolist() == full[:4].tolist() and cut.device.type == "cpu"
    assert ours.encode("Hello", max_length=-1).tolist() == ours.encode("Hello").tolist()


@pytest.mark.parametrize("kind", ["bpe", "sp"])
def test_decode_stream(tmp_path: Path, kind: str) -> None:
    path = (make_bpe_tokenizer if kind == "bpe" else make_sentencepiece_tokenizer)(tmp_path)
    ours = Tokenizer(path)
    held = 0
    for text in STRINGS + LEADING_SPACE_STRINGS + ["🙂🚀 日本語", "a 🙂 b"]:
        ids = ours.encode(text, bos=True, eos=True)
        for skip in (False, True):
            pieces = list(ours.decode_stream(iter(ids), skip_special_tokens=skip))
            assert "".join(pieces) == ours.decode(ids, skip_special_tokens=skip), (text, pieces)
            assert len(pieces) == len(ids)  # one piece per id; nothing left for the end here
            assert all("\ufffd" not in piece for piece in pieces), pieces
            held += pieces.count("")
    # Characters split over byte tokens were held back rather than emitted as U+FFFD.
    assert held > 0
    pieces = list(ours.decode_stream([ours.token_to_id("<0xF0>" if kind == "sp" else "ð")]))
    assert "".join(pieces) == "\ufffd"  # an incomplete character at the very end still comes out, once


def test_decode_accepts_tensors_and_lists(sp_dir: Path) -> None:
    ours = Tokenizer(sp_dir)
    ids = ours.encode("Hello world")
    assert ours.decode(ids) == ours.decode(ids.tolist()) == "<s> Hello world"
    assert ours.decode(ids, skip_special_tokens=True) == "Hello world"
    last = ids[-1]  # a 0-D tensor
    assert ours.decode(last) == ours.decode([last.item()]) != ""


def test_tokenizer_files_lists_the_tokenizer(bpe_dir: Path, sp_dir: Path) -> None:
    for name in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert name in TOKENIZER_FILES
    written = {p.name for p in bpe_dir.iterdir()} | {p.name for p in sp_dir.iterdir()}
    assert written <= set(TOKENIZER_FILES)


def test_import_needs_neither_backend() -> None:
    code = (
        "import sys, lit_model.tokenizer; "
        "assert not {'tokenizers', 'sentencepiece', 'transformers'} & set(sys.modules), 'backend imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ----------------------------------------------------------------------------------------------------- errors


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="checkpoint directory .* does not exist"):
        Tokenizer(tmp_path / "nope")


def test_directory_without_tokenizer_files(tmp_path: Path) -> None:
    write_json(tmp_path / "tokenizer_config.json", {"bos_token": "<s>"})
    with pytest.raises(FileNotFoundError, match="expected tokenizer.json or tokenizer.model"):
        Tokenizer(tmp_path)


def test_unknown_token(bpe_dir: Path, sp_dir: Path) -> None:
    for path in (bpe_dir, sp_dir):
        with pytest.raises(ValueError, match="'<nope>' is not in the vocabulary"):
            Tokenizer(path).token_to_id("<nope>")


def test_config_names_an_unknown_special_token(sp_dir: Path) -> None:
    write_json(sp_dir / "tokenizer_config.json", {"bos_token": "<|begin_of_text|>"})
    with pytest.raises(ValueError, match=r"'<\|begin_of_text\|>' is not in the vocabulary"):
        Tokenizer(sp_dir)


def test_add_bos_token_without_bos(bpe_dir: Path) -> None:
    write_json(bpe_dir / "tokenizer_config.json", {"add_bos_token": True, "eos_token": BPE_EOS})
    with pytest.raises(ValueError, match="sets add_bos_token=true but names no bos_token"):
        Tokenizer(bpe_dir)


def test_decode_rejects_bad_ids(sp_dir: Path) -> None:
    ours = Tokenizer(sp_dir)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        ours.decode([5, ours.vocab_size])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        ours.decode([-1])
    with pytest.raises(ValueError, match="takes one sequence"):
        ours.decode(torch.zeros(2, 3, dtype=torch.long))
