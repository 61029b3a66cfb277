"""SFT data: JSON/JSONL loading and its errors, tokenization and prompt masking, truncation, padding, splits."""

from __future__ import annotations

import json
import time
from functools import partial
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from lit_model.data import SFTDataset, collate, load_records, split_records
from lit_model.prompts import PromptStyle
from lit_model.tokenizer import Tokenizer
from tests.tokenizer_utils import make_bpe_tokenizer, make_sentencepiece_tokenizer

RECORDS = [
    {"instruction": "Reverse the word.", "input": "lamp", "output": "pmal"},
    {"instruction": "Name a colour.", "input": "", "output": "Blue"},
    {"instruction": "Add 2 and 3.", "output": "5"},
]


@pytest.fixture(scope="module")
def bpe(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    return Tokenizer(make_bpe_tokenizer(tmp_path_factory.mktemp("bpe")))


@pytest.fixture(scope="module")
def sentencepiece(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    return Tokenizer(make_sentencepiece_tokenizer(tmp_path_factory.mktemp("sp")))


# ---- load_records ------------------------------------------------------------------------------------------------


def test_load_json_list(tmp_path: Path) -> None:
    path = tmp_path / "data.json"
    extra = dict(RECORDS[0], text="a field we do not use")
    null_input = {"instruction": "x", "input": None, "output": "y"}
    path.write_text(json.dumps([extra, RECORDS[1], RECORDS[2], null_input], indent=4))
    records = load_records(path)
    assert records == [
        {"instruction": "Reverse the word.", "input": "lamp", "output": "pmal"},
        {"instruction": "Name a colour.", "input": "", "output": "Blue"},
        {"instruction": "Add 2 and 3.", "input": "", "output": "5"},  # a missing input is ""
        {"instruction": "x", "input": "", "output": "y"},  # so is null
    ]


def test_load_jsonl_and_content_decides_format(tmp_path: Path) -> None:
    path = tmp_path / "data.json"  # JSONL content under a .json name still loads
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in RECORDS) + "\n\n   \n")
    assert load_records(path) == load_records_via_json(tmp_path)
    bom = tmp_path / "bom.jsonl"
    bom.write_text("\ufeff" + json.dumps(RECORDS[1]) + "\n", encoding="utf-8")
    assert load_records(bom) == [RECORDS[1]]


def load_records_via_json(tmp_path: Path) -> list[dict]:
    path = tmp_path / "ref.json"
    path.write_text(json.dumps(RECORDS))
    return load_records(path)


def test_load_unicode(tmp_path: Path) -> None:
    path = tmp_path / "u.jsonl"
    record = {"instruction": "Traduis «chat» 🐱", "input": "日本語", "output": "猫"}
    path.write_text(json.dumps(record, ensure_ascii=False) + "\n", encoding="utf-8")
    assert load_records(path) == [record]


BAD_JSON_LIST = """[
  {"instruction": "a", "output": "b"},
  {
    "instruction": "c",
    "input": "d"
  }
]"""


@pytest.mark.parametrize(
    ("name", "content", "match"),
    [
        ("empty.json", "", r"empty\.json is empty; it needs a JSON list of records or one JSON object per line"),
        ("blank.jsonl", " \n\n \t\n", r"blank\.jsonl is empty"),
        ("bad.json", '[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "c" "output": "d"}\n]',
         r"bad\.json: invalid JSON at line 3, column 23: Expecting ',' delimiter"),
        ("bad.jsonl", '{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": }\n',
         r"bad\.jsonl, line 2: invalid JSON at column 32: Expecting value"),
        ("missing.json", BAD_JSON_LIST,
         r"missing\.json, record 1 \(line 3\): missing required field 'output' "
         r"\(fields present: \['input', 'instruction'\]\)"),
        ("missing.jsonl", '{"instruction": "a", "output": "b"}\n\n{"output": "b"}\n',
         r"missing\.jsonl, line 3: missing required field 'instruction'"),
        ("type.jsonl", '{"instruction": "a", "output": "b"}\n{"instruction": "a", "input": 7, "output": "b"}\n',
         r"type\.jsonl, line 2: field 'input' must be a string, got int: '7'"),
        ("type.json", '[{"instruction": ["a"], "output": "b"}]',
         r"type\.json, record 0 \(line 1\): field 'instruction' must be a string, got list"),
        ("null_output.json", '[{"instruction": "a", "output": null}]',
         r"field 'output' must be a string, got NoneType"),
        ("notobj.json", '[{"instruction": "a", "output": "b"}, "text"]',
         r"notobj\.json, record 1 \(line 1\): expected an object with 'instruction', 'input' and 'output', got str"),
        ("single.json", '{\n  "instruction": "a",\n  "output": "b"\n}\n',
         r"single\.json holds a single JSON object; expected a JSON list of records"),
        ("nothing.json", "[]", r"nothing\.json contains no records"),
    ],
)
def test_load_records_errors(tmp_path: Path, name: str, content: str, match: str) -> None:
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(ValueError, match=match):
        load_records(path)


def test_load_records_not_a_list_line(tmp_path: Path) -> None:
    path = tmp_path / "list.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n["a", "b"]\n')
    match = r"list\.jsonl, line 2: expected an object with 'instruction', 'input' and 'output', got list"
    with pytest.raises(ValueError, match=match):
        load_records(path)


def test_load_records_missing_and_binary(tmp_path: Path) -> None:
    match = r"No data file at '.*nope\.json'\. Pass an Alpaca-style \.json or \.jsonl"
    with pytest.raises(FileNotFoundError, match=match):
        load_records(tmp_path / "nope.json")
    path = tmp_path / "latin1.json"
    path.write_bytes('[{"instruction": "café", "output": "b"}]'.encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1\.json is not UTF-8 text"):
        load_records(path)


# ---- split_records -----------------------------------------------------------------------------------------------


def test_split_records_is_deterministic_disjoint_and_ordered() -> None:
    records = [{"instruction": str(i), "input": "", "output": str(i)} for i in range(100)]
    train, val = split_records(records, 0.1, seed=3)
    assert len(val) == 10 and len(train) == 90
    assert split_records(records, 0.1, seed=3) == (train, val)
    assert split_records(records, 0.1, seed=4)[1] != val
    ids = [int(r["instruction"]) for r in train + val]
    assert sorted(ids) == list(range(100))
    assert [int(r["instruction"]) for r in train] == sorted(int(r["instruction"]) for r in train)  # order kept
    assert split_records(records, 0.0, seed=3) == (records, [])
    assert len(split_records(records[:3], 0.01, seed=0)[1]) == 1  # a positive fraction holds out at least one
    state = torch.random.get_rng_state()
    split_records(records, 0.5, seed=1)
    assert torch.equal(state, torch.random.get_rng_state())


def test_split_records_errors() -> None:
    with pytest.raises(ValueError, match=r"val_fraction must be in \[0, 1\), got 1\.0"):
        split_records(RECORDS, 1.0, 0)
    with pytest.raises(ValueError, match=r"val_fraction must be in \[0, 1\), got -0\.1"):
        split_records(RECORDS, -0.1, 0)
    with pytest.raises(ValueError, match=r"Cannot hold out 1 of 1 records for validation"):
        split_records(RECORDS[:1], 0.5, 0)


# ---- SFTDataset ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tokenizer_name", ["bpe", "sentencepiece"])
def test_sample_is_prompt_then_response_then_eos(request: pytest.FixtureRequest, tokenizer_name: str) -> None:
    tok: Tokenizer = request.getfixturevalue(tokenizer_name)
    style = PromptStyle.from_name("alpaca")
    records = load_records_list(RECORDS)
    ds = SFTDataset(records, tok, style, max_seq_length=512)
    assert len(ds) == 3 and ds.num_truncated == 0 and ds.num_without_targets == 0
    for record, sample in zip(records, ds):
        prompt_ids = tok.encode(style.apply(record["instruction"], record["input"]))
        response_ids = tok.encode(record["output"], bos=False, eos=True)
        assert sample["input_ids"].dtype == torch.long and sample["labels"].dtype == torch.long
        assert torch.equal(sample["input_ids"], torch.cat([prompt_ids, response_ids]))
        assert sample["input_ids"][0] == tok.bos_id and sample["input_ids"][-1] == tok.eos_id
        n = len(prompt_ids)
        assert (sample["labels"][:n] == -100).all()
        assert torch.equal(sample["labels"][n:], response_ids)
        # The targets the loop scores (labels[1:]) are the response and EOS: the response text, nothing else.
        targets = sample["labels"][1:]
        assert tok.decode(targets[targets != -100][:-1]).strip() == record["output"]


def load_records_list(records: list[dict]) -> list[dict]:
    return [{"instruction": r["instruction"], "input": r.get("input", ""), "output": r["output"]} for r in records]


def test_no_prompt_mask_and_custom_ignore_index(bpe: Tokenizer) -> None:
    style = PromptStyle.from_name("alpaca")
    ds = SFTDataset(load_records_list(RECORDS), bpe, style, max_seq_length=512, mask_prompt=False)
    assert all(torch.equal(s["input_ids"], s["labels"]) for s in ds)
    ds = SFTDataset(load_records_list(RECORDS), bpe, style, max_seq_length=512, ignore_index=-1)
    assert (ds[0]["labels"] == -1).sum() == len(bpe.encode(style.apply("Reverse the word.", "lamp")))
    ds[0]["labels"][:] = 7  # items are fresh tensors: editing one leaves the dataset alone
    assert ds[0]["labels"][0] == -1


def test_prompt_and_response_are_tokenized_apart(bpe: Tokenizer) -> None:
    """Encoding prompt + response as one string merges tokens across the boundary; the dataset does not."""
    style = PromptStyle.from_name("plain")
    record = {"instruction": "The q", "input": "", "output": "uick brown fox"}
    prompt_ids = bpe.encode("The q")
    joint = bpe.encode("The quick brown fox", eos=True)
    # Precondition that makes this test meaningful: the joint encoding does not start with the prompt's ids.
    assert not torch.equal(joint[: len(prompt_ids)], prompt_ids)
    sample = SFTDataset([record], bpe, style, max_seq_length=64)[0]
    assert torch.equal(sample["input_ids"][: len(prompt_ids)], prompt_ids)  # exactly what generation will see
    targets = sample["labels"][sample["labels"] != -100]
    assert bpe.decode(targets[:-1]) == "uick brown fox" and targets[-1] == bpe.eos_id


def test_chat_style_sample(bpe: Tokenizer) -> None:
    style = PromptStyle.from_name("chatml")
    sample = SFTDataset([RECORDS[0]], bpe, style, max_seq_length=1024)[0]
    prompt_ids = bpe.encode(style.apply("Reverse the word.", "lamp"))
    expected_end = "user\nReverse the word.\n\nlamp<|im_end|>\n<|im_start|>assistant\n"
    assert style.apply("Reverse the word.", "lamp").endswith(expected_end)
    assert int((sample["labels"] == -100).sum()) == len(prompt_ids)
    assert torch.equal(sample["input_ids"][: len(prompt_ids)], prompt_ids)


def test_truncation_keeps_the_beginning(bpe: Tokenizer) -> None:
    style = PromptStyle.from_name("alpaca")
    records = load_records_list(RECORDS)
    full = SFTDataset(records, bpe, style, max_seq_length=4096)
    lengths = full.lengths()
    limit = sorted(lengths)[1] - 1  # truncates the two longer samples
    assert sorted(lengths)[0] < limit
    ds = SFTDataset(records, bpe, style, max_seq_length=limit)
    assert ds.num_truncated == 2
    for short, long in zip(ds, full):
        n = min(limit, len(long["input_ids"]))
        assert torch.equal(short["input_ids"], long["input_ids"][:n])
        assert torch.equal(short["labels"], long["labels"][:n])
        assert len(short["input_ids"]) <= limit
    # Prompts longer than the limit leave nothing to learn: counted, kept, fully masked.
    tiny = SFTDataset(records, bpe, style, max_seq_length=5)
    assert tiny.num_truncated == 3 and tiny.num_without_targets == 3
    assert all((s["labels"] == -100).all() for s in tiny)
    # Without masking, any sample of two or more tokens has targets.
    assert SFTDataset(records, bpe, style, max_seq_length=5, mask_prompt=False).num_without_targets == 0


def test_response_only_one_token_after_prompt_counts_as_target(bpe: Tokenizer) -> None:
    style = PromptStyle.from_name("plain")
    prompt_len = len(bpe.encode("Hello"))
    ds = SFTDataset([{"instruction": "Hello", "input": "", "output": "x"}], bpe, style, max_seq_length=prompt_len + 1)
    assert ds.num_truncated == 1 and ds.num_without_targets == 0
    assert (ds[0]["labels"][1:] != -100).sum() == 1


def test_dataset_errors(bpe: Tokenizer) -> None:
    match = r"max_seq_length must be at least 2 \(one input and one target token\), got 1"
    with pytest.raises(ValueError, match=match):
        SFTDataset(RECORDS, bpe, PromptStyle.from_name("alpaca"), max_seq_length=1)


def test_ten_thousand_records_tokenize_quickly(bpe: Tokenizer) -> None:
    records = [{"instruction": f"Reverse the word number {i}.", "input": "lamp" * (i % 5), "output": f"pmal {i}"}
               for i in range(10_000)]
    start = time.perf_counter()
    ds = SFTDataset(records, bpe, PromptStyle.from_name("alpaca"), max_seq_length=256)
    elapsed = time.perf_counter() - start
    assert len(ds) == 10_000
    assert elapsed < 20, f"tokenizing 10k records took {elapsed:.1f}s"


# ---- collate -------------------------------------------------------------------------------------------------------


def test_collate_right_pads() -> None:
    a = {"input_ids": torch.tensor([1, 2, 3]), "labels": torch.tensor([-100, 2, 3])}
    b = {"input_ids": torch.tensor([4]), "labels": torch.tensor([4])}
    batch = collate([a, b], pad_id=9, ignore_index=-1)
    assert torch.equal(batch["input_ids"], torch.tensor([[1, 2, 3], [4, 9, 9]]))
    assert torch.equal(batch["labels"], torch.tensor([[-100, 2, 3], [4, -1, -1]]))
    assert torch.equal(batch["lengths"], torch.tensor([3, 1]))
    default = collate([a, b])
    assert torch.equal(default["input_ids"][1], torch.tensor([4, 0, 0]))
    assert torch.equal(default["labels"][1], torch.tensor([4, -100, -100]))
    with pytest.raises(ValueError, match="collate needs at least one sample"):
        collate([])


def test_dataloader_with_partial_collate(bpe: Tokenizer) -> None:
    records = [
        {"instruction": f"Count to {i}.", "input": "", "output": " ".join(map(str, range(i)))} for i in range(1, 9)
    ]
    ds = SFTDataset(records, bpe, PromptStyle.from_name("alpaca"), max_seq_length=128)
    make = lambda seed: DataLoader(  # noqa: E731
        ds, batch_size=3, shuffle=True, generator=torch.Generator().manual_seed(seed),
        collate_fn=partial(collate, pad_id=bpe.eos_id, ignore_index=-100),
    )
    batches = list(make(0))
    assert [len(b["lengths"]) for b in batches] == [3, 3, 2]
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(batches, make(0)))  # reproducible
    seen = 0
    for batch in batches:
        assert batch["input_ids"].shape == batch["labels"].shape == (len(batch["lengths"]), int(batch["lengths"].max()))
        for row, n in zip(range(len(batch["lengths"])), batch["lengths"].tolist()):
            assert (batch["input_ids"][row, n:] == bpe.eos_id).all() and (batch["labels"][row, n:] == -100).all()
            seen += 1
    assert seen == 8
    # Padding adds no targets: the loop's shifted targets count only response tokens + EOS.
    total_targets = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
    assert total_targets == sum(len(bpe.encode(r["output"], bos=False, eos=True)) for r in records)


# ---- huge records ----------------------------------------------------------------------------------------------------


class RecordingTokenizer:
    """A tokenizer that remembers the length of every text it is asked to encode."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer, self.eos_id, self.lengths = tokenizer, tokenizer.eos_id, []

    def encode(self, text: str, **kwargs) -> torch.Tensor:
        self.lengths.append(len(text))
        return self.tokenizer.encode(text, **kwargs)


def uncut(monkeypatch: pytest.MonkeyPatch, *args, **kwargs) -> SFTDataset:
    """The dataset as it was before huge fields were cut: every text tokenized whole."""
    import lit_model.data.sft as data

    with monkeypatch.context() as m:
        m.setattr(data, "CHARS_PER_TOKEN_BUDGET", 10**12)
        return SFTDataset(*args, **kwargs)


def varied_text(n_chars: int, offset: int = 0) -> str:
    from tests.tokenizer_utils import DEFAULT_TEXTS

    text = " ".join(DEFAULT_TEXTS[offset:] + DEFAULT_TEXTS[:offset])
    return (text * (n_chars // len(text) + 1))[:n_chars]


@pytest.mark.parametrize("tokenizer_name", ["bpe", "sentencepiece"])
@pytest.mark.parametrize("field", ["instruction", "input", "output"])
def test_a_huge_field_is_cut_before_tokenizing_with_the_same_tokens(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, tokenizer_name: str, field: str
) -> None:
    tokenizer = request.getfixturevalue(tokenizer_name)
    n = 40
    huge = dict(RECORDS[0], **{field: varied_text(30_000, offset=3)})
    records = [RECORDS[1], huge, RECORDS[2]]
    for style in (PromptStyle.from_name("alpaca"), PromptStyle.from_name("chatml")):
        recording = RecordingTokenizer(tokenizer)
        ds = SFTDataset(records, recording, style, max_seq_length=n)
        reference = uncut(monkeypatch, records, tokenizer, style, max_seq_length=n)
        # Nothing longer than the two cuts (64 and 128 characters per token) plus the template was tokenized.
        assert max(recording.lengths) <= 2 * 64 * n + 500 < len(huge[field])
        assert ds.num_truncated == reference.num_truncated and ds.num_cut == 1
        assert ds.num_without_targets == reference.num_without_targets
        for a, b in zip(ds, reference):
            assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])


def test_a_multi_megabyte_record_costs_what_max_seq_length_allows(sentencepiece: Tokenizer) -> None:
    n = 64
    huge = {"instruction": varied_text(2_000_000), "input": varied_text(1_000_000, 5), "output": varied_text(1_000_000)}
    recording = RecordingTokenizer(sentencepiece)
    style = PromptStyle.from_name("alpaca")
    ds = SFTDataset([huge, RECORDS[0]], recording, style, max_seq_length=n)
    # Two cuts, each a prompt and a response encode, then the normal record: bounded by n, not by the record.
    assert len(recording.lengths) == 6
    assert max(recording.lengths) <= 2 * (2 * 64 * n) + 500  # instruction and input
    assert ds.num_cut == 1 and ds.lengths()[0] == n
    # The kept tokens are those of the untruncated text (the prompt's first n; the response never fits).
    whole = sentencepiece.encode(style.apply(huge["instruction"], huge["input"]), bos=style.adds_bos)
    assert torch.equal(ds[0]["input_ids"], whole[:n])
    assert (ds[0]["labels"] == -100).all()


class SpaceDroppingTokenizer:
    """One id per character, spaces deleted (as a normalizer may delete text): characters are no bound on tokens."""

    eos_id = 1

    def encode(self, text: str, bos: bool | None = None, eos: bool = False, special: bool = False) -> torch.Tensor:
        return torch.tensor([0] * (bos is not False) + [2 + ord(c) % 500 for c in text if c != " "] + [1] * eos)


def test_the_cut_grows_when_the_text_gives_too_few_tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    n = 16
    record = {"instruction": "Spaces" + " " * 20_000 + varied_text(3_000), "input": "", "output": "ok"}
    tokenizer = SpaceDroppingTokenizer()
    style = PromptStyle.from_name("plain")
    ds = SFTDataset([record], tokenizer, style, max_seq_length=n)
    reference = uncut(monkeypatch, [record], tokenizer, style, max_seq_length=n)
    assert torch.equal(ds[0]["input_ids"], reference[0]["input_ids"])
    assert ds[0]["input_ids"].numel() == n and ds.num_truncated == 1


def test_invalid_text_names_the_file_the_line_and_the_field(tmp_path: Path, bpe: Tokenizer) -> None:
    path = tmp_path / "surrogate.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": "smile \\ud83d!"}\n')
    match = (r"surrogate\.jsonl, line 2: field 'output' holds invalid text: a lone UTF-16 surrogate U\+D83D at "
             r"character 6 \(after 'smile '\).*fix or drop this record")
    with pytest.raises(ValueError, match=match):
        load_records(path)
    # Records that did not come through load_records: the dataset names the record and the field.
    records = [RECORDS[0], {"instruction": "a", "input": "x\udc00", "output": "b"}]
    match = r"Record 1: field 'input' holds invalid text: a lone UTF-16 surrogate U\+DC00"
    with pytest.raises(ValueError, match=match):
        SFTDataset(records, bpe, PromptStyle.from_name("alpaca"), max_seq_length=64)


def test_jsonl_is_streamed_and_big_inputs_fail_fast(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import lit_model.data.records as data

    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in RECORDS) + "\n")
    with monkeypatch.context() as m:  # JSONL never reads the whole file into one string
        m.setattr(Path, "read_text", lambda *a, **k: pytest.fail("read the whole file"))
        assert len(load_records(jsonl, max_json_bytes=10)) == 3
    array = tmp_path / "data.json"
    array.write_text(json.dumps(RECORDS))
    match = (r"data\.json is a 0 MiB JSON array; arrays above 0 MiB are refused .* Convert it to JSONL \(one record "
             r"per line\), which is read line by line: `jq -c '\.\[\]' .*data\.json > .*data\.jsonl`")
    with pytest.raises(ValueError, match=match):
        load_records(array, max_json_bytes=100)
    monkeypatch.setattr(data, "_available_memory_bytes", lambda: 100)
    with pytest.raises(ValueError, match=r"data\.jsonl is 0\.0 GiB, more than the 0\.0 GiB of memory available"):
        load_records(jsonl)


def test_a_jsonl_file_that_is_not_utf8_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"instruction": "a", "output": "b"}\n' * 3000 + '{"instruction": "café", "output": "b"}\n'
                     .encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1\.jsonl is not UTF-8 text \(line 3001: 'utf-8' codec can't decode"):
        load_records(path)
