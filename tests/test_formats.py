"""Data formats: Alpaca, OpenAI messages and ShareGPT conversations in JSON, JSONL and Parquet files and in `datasets`
directories all load to the same conversations; bad records name the file, the line (or row) and the field; the
DataArgs combinations; a run trains on a saved dataset of multi-turn conversations."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

from lit_model.data import SHAREGPT_ROLES, load_conversations, load_dataset_conversations, load_records
from lit_model.train.args import DataArgs
from tests.finetune_utils import load_script, logged_losses, short_train, tiny_checkpoint  # noqa: F401 (fixture)

# The conversations every file below holds, written out by hand: the oracle.
CONVERSATIONS = [
    [{"role": "system", "content": "Answer in one word."},
     {"role": "user", "content": "Capital of France?"},
     {"role": "assistant", "content": "Paris"},
     {"role": "user", "content": "And of Italy?"},
     {"role": "assistant", "content": "Rome"}],
    [{"role": "user", "content": "Say hi 🙂"}, {"role": "assistant", "content": "hi 🙂"}],
]
SINGLE_TURN = CONVERSATIONS[1]


def as_messages(conversation: list[dict]) -> dict:
    return {"messages": [dict(m) for m in conversation], "id": 7}  # other fields are ignored


def as_sharegpt(conversation: list[dict]) -> dict:
    names = {"system": "system", "user": "human", "assistant": "gpt"}
    return {"conversations": [{"from": names[m["role"]], "value": m["content"]} for m in conversation]}


def write(path: Path, records: list, container: str) -> Path:
    """`records` as a JSON array, JSONL, or Parquet file (columns of lists of structs, as `datasets` writes them)."""
    if container == "json":
        path.write_text(json.dumps(records, indent=2, ensure_ascii=False), encoding="utf-8")
    elif container == "jsonl":
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    else:
        pyarrow = pytest.importorskip("pyarrow")
        import pyarrow.parquet

        pyarrow.parquet.write_table(pyarrow.Table.from_pylist(records), path)
    return path


@pytest.mark.parametrize("container", ["json", "jsonl", "parquet"])
@pytest.mark.parametrize("fmt", ["messages", "sharegpt"])
def test_every_format_loads_to_the_same_conversations(tmp_path, fmt, container) -> None:
    convert = as_messages if fmt == "messages" else as_sharegpt
    path = write(tmp_path / f"data.{container}", [convert(c) for c in CONVERSATIONS], container)
    assert load_conversations(path) == CONVERSATIONS
    assert load_conversations(path, format=fmt) == CONVERSATIONS
    # The content decides, not the name.
    renamed = path.rename(tmp_path / "data.txt")
    assert load_conversations(renamed) == CONVERSATIONS


@pytest.mark.parametrize("container", ["json", "jsonl", "parquet"])
def test_alpaca_records_are_single_turn_conversations(tmp_path, container) -> None:
    records = [{"instruction": "Say hi 🙂", "input": "", "output": "hi 🙂"},
               {"instruction": "Reverse", "input": "lamp", "output": "pmal"},
               {"instruction": "Add 2 and 3.", "input": None, "output": "5"}]
    path = write(tmp_path / f"alpaca.{container}", records, container)
    assert load_conversations(path) == [
        SINGLE_TURN,
        [{"role": "user", "content": "Reverse", "input": "lamp"}, {"role": "assistant", "content": "pmal"}],
        [{"role": "user", "content": "Add 2 and 3."}, {"role": "assistant", "content": "5"}]]
    assert load_records(path)[2] == {"instruction": "Add 2 and 3.", "input": "", "output": "5"}  # null input is ""


@pytest.mark.parametrize(("name", "role"), sorted(SHAREGPT_ROLES.items()) + [("Human", "user"), ("GPT", "assistant")])
def test_sharegpt_speaker_names(tmp_path, name, role) -> None:
    first = {"from": name, "value": "x"}
    if role == "user":
        conversation = [first, {"from": "gpt", "value": "y"}]
    elif role == "assistant":
        conversation = [{"from": "human", "value": "q"}, first]
    else:
        conversation = [first, {"from": "human", "value": "q"}, {"from": "gpt", "value": "y"}]
    path = write(tmp_path / "s.jsonl", [{"conversations": conversation}], "jsonl")
    roles = [m["role"] for m in load_conversations(path)[0]]
    assert roles[0 if role != "assistant" else 1] == role


def test_ambiguous_records_need_a_format(tmp_path) -> None:
    both = {"instruction": "Say hi 🙂", "output": "hi 🙂", "messages": as_messages(SINGLE_TURN)["messages"]}
    path = write(tmp_path / "both.jsonl", [both], "jsonl")
    with pytest.raises(ValueError, match=r"both\.jsonl, line 1: cannot tell the data's format from its first record, "
                                         r"which holds the fields of several formats \(alpaca, messages;.*pass "
                                         r"--data\.format alpaca or messages"):
        load_conversations(path)
    assert load_conversations(path, format="messages") == [SINGLE_TURN]
    assert load_conversations(path, format="alpaca") == [SINGLE_TURN]  # the same text, from the other fields
    neither = write(tmp_path / "neither.json", [{"prompt": "a", "completion": "b"}], "json")
    with pytest.raises(ValueError, match=r"neither\.json, record 0 \(line 2\): cannot tell .* which is of no format "
                                         r"we know \(fields present: \['completion', 'prompt'\]\)"):
        load_conversations(neither)
    with pytest.raises(ValueError, match=r"Unknown data format 'openai': expected one of auto, alpaca, messages"):
        load_conversations(neither, format="openai")


def test_a_record_of_another_format_names_its_line(tmp_path) -> None:
    path = write(tmp_path / "mixed.jsonl", [as_messages(SINGLE_TURN), as_sharegpt(SINGLE_TURN)], "jsonl")
    with pytest.raises(ValueError, match=r"mixed\.jsonl, line 2: missing field 'messages' \(fields present: "
                                         r"\['conversations'\]\): every record of a file must be of its format, "
                                         r"messages \(this record looks like sharegpt"):
        load_conversations(path)
    # An explicit format that the file is not in: the first record already fails, naming the field.
    with pytest.raises(ValueError, match=r"mixed\.jsonl, line 1: missing field 'conversations'"):
        load_conversations(path, format="sharegpt")
    with pytest.raises(ValueError, match=r"mixed\.jsonl, line 1: missing required field 'instruction'"):
        load_conversations(path, format="alpaca")


def _messages(*pairs: tuple[str, object]) -> dict:
    return {"messages": [{"role": r, "content": c} for r, c in pairs]}


U, A, S = "user", "assistant", "system"


@pytest.mark.parametrize(("record", "match"), [
    ({"messages": []}, r"field 'messages' must be a non-empty list of messages, got list: '\[\]'"),
    ({"messages": "hi"}, r"field 'messages' must be a non-empty list of messages, got str"),
    ({"messages": ["hi"]}, r"field 'messages\[0\]' must be an object with 'role' and 'content', got str"),
    ({"messages": [{"role": U}]}, r"field 'messages\[0\]' has no 'content' \(fields present: \['role'\]\)"),
    ({"messages": [{"from": "human", "value": "q"}]},
     r"field 'messages\[0\]' has no 'role' .*its from/value are the sharegpt format's names: rename them to "
     r"role/content"),
    (_messages((U, "q"), (A, None)), r"field 'messages\[1\]\.content' must be a string, got NoneType"),
    (_messages((U, "q"), (A, [{"type": "text", "text": "a"}])), r"field 'messages\[1\]\.content' must be a string, "
                                                                 r"got list"),
    (_messages((U, "q"), ("tool", "a")), r"field 'messages\[1\]\.role' is 'tool': expected one of system, user, "
                                         r"assistant \(tool messages and tool calls are not supported\)"),
    (_messages((A, "a"), (U, "q")), r"field 'messages\[0\]\.role': the conversation must start with the user \(after "
                                    r"an optional system message\), got assistant"),
    (_messages((S, "s"), (A, "a")), r"field 'messages\[1\]\.role': the conversation must start with the user"),
    (_messages((U, "q"), (A, "a"), (A, "b")), r"field 'messages\[2\]\.role': two assistant messages in a row: roles "
                                              r"must alternate \(merge them into one\)"),
    (_messages((U, "q"), (U, "r"), (A, "b")), r"field 'messages\[1\]\.role': two user messages in a row"),
    (_messages((U, "q"), (A, "a"), (S, "s"), (U, "r"), (A, "b")),
     r"field 'messages\[2\]\.role': a system message may only come first"),
    (_messages((U, "q"), (A, "a"), (U, "r")), r"field 'messages\[2\]\.role': the conversation ends with a user message "
                                              r"that has no answer: drop it"),
    (_messages((S, "s")), r"field 'messages': the conversation has only a system message"),
    (_messages((U, "q"), (A, " \n")), r"field 'messages': the conversation has no assistant message with text: "
                                      r"nothing to train on"),
    (_messages((U, "q"), (A, "smile \ud83d")), r"field 'messages\[1\]\.content' holds invalid text: a lone UTF-16 "
                                               r"surrogate U\+D83D at character 6"),
    (["not", "an", "object"], r"expected an object with 'messages', got list"),
])
def test_bad_conversations_name_the_line_and_the_field(tmp_path, record, match) -> None:
    good = as_messages(SINGLE_TURN)
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(good) + "\n\n" + json.dumps(record) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.jsonl, line 3: " + match):
        load_conversations(path)


def test_an_empty_answer_is_fine_when_another_has_text(tmp_path) -> None:
    record = _messages((U, "q"), (A, ""), (U, "r"), (A, "b"))
    path = write(tmp_path / "ok.jsonl", [record], "jsonl")
    assert [m["content"] for m in load_conversations(path)[0]] == ["q", "", "r", "b"]


def test_sharegpt_errors_use_sharegpt_names(tmp_path) -> None:
    path = write(tmp_path / "s.json", [as_sharegpt(SINGLE_TURN), {"conversations": [
        {"from": "human", "value": "q"}, {"from": "robot", "value": "a"}]}], "json")
    second = path.read_text().splitlines().index("  {", 2) + 1  # the line where record 1 opens (14)
    with pytest.raises(ValueError, match=rf"s\.json, record 1 \(line {second}\): field 'conversations\[1\]\.from' is "
                                         r"'robot', which is not a speaker we know: expected one of human, user, gpt"):
        load_conversations(path)
    path = write(tmp_path / "t.jsonl", [{"conversations": [{"from": "gpt", "value": "a"}]}], "jsonl")
    with pytest.raises(ValueError, match=r"t\.jsonl, line 1: field 'conversations\[0\]\.from': the conversation must "
                                         r"start with the user"):
        load_conversations(path)
    path = write(tmp_path / "u.jsonl", [{"conversations": [{"from": "human", "value": 3}]}], "jsonl")
    with pytest.raises(ValueError, match=r"field 'conversations\[0\]\.value' must be a string, got int"):
        load_conversations(path)


# ---- Parquet ---------------------------------------------------------------------------------------------------------


def test_parquet_rows_and_their_errors(tmp_path) -> None:
    pyarrow = pytest.importorskip("pyarrow")
    import pyarrow.parquet

    records = [as_messages(c) for c in CONVERSATIONS] * 800  # several of pyarrow's batches of 1024 rows
    path = write(tmp_path / "many.parquet", records, "parquet")
    assert pyarrow.parquet.ParquetFile(path).schema_arrow.field("messages").type == pyarrow.list_(
        pyarrow.struct([("role", pyarrow.string()), ("content", pyarrow.string())]))
    assert load_conversations(path) == CONVERSATIONS * 800
    bad = records[:1500] + [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": None}],
                             "id": 1}]
    with pytest.raises(ValueError, match=r"bad\.parquet, row 1500: field 'messages\[1\]\.content' must be a string, "
                                         r"got NoneType"):
        load_conversations(write(tmp_path / "bad.parquet", bad, "parquet"))
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"PAR1 this is not really parquet")
    with pytest.raises(ValueError, match=r"broken\.parquet starts like a Parquet file but cannot be read as one"):
        load_conversations(broken)
    empty = tmp_path / "empty.parquet"
    pyarrow.parquet.write_table(pyarrow.table({"messages": pyarrow.array([], type=pyarrow.list_(pyarrow.struct(
        [("role", pyarrow.string()), ("content", pyarrow.string())])))}), empty)
    with pytest.raises(ValueError, match=r"empty\.parquet contains no records"):
        load_conversations(empty)


def test_parquet_without_pyarrow_says_what_to_install(tmp_path, monkeypatch) -> None:
    path = write(tmp_path / "data.parquet", [as_messages(SINGLE_TURN)], "parquet")
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # `import pyarrow` now raises ImportError
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ImportError, match=r"data\.parquet is a Parquet file; reading one needs pyarrow: pip install "
                                          r"pyarrow"):
        load_conversations(path)


# ---- datasets --------------------------------------------------------------------------------------------------------


@pytest.fixture()
def datasets_cache(tmp_path, monkeypatch):
    """`datasets` with its cache under tmp_path (hermetic) and the Hub off."""
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    return datasets


def test_a_saved_dataset_loads_by_split(tmp_path, datasets_cache) -> None:
    datasets = datasets_cache
    train = datasets.Dataset.from_list([as_sharegpt(c) for c in CONVERSATIONS])
    test = datasets.Dataset.from_list([as_sharegpt(SINGLE_TURN)])
    datasets.DatasetDict({"train": train, "test": test}).save_to_disk(str(tmp_path / "dict"))
    assert load_dataset_conversations(str(tmp_path / "dict")) == CONVERSATIONS
    assert load_dataset_conversations(str(tmp_path / "dict"), split="test", format="sharegpt") == [SINGLE_TURN]
    with pytest.raises(ValueError, match=r"has the splits test, train, not 'validation': pass --data\.split"):
        load_dataset_conversations(str(tmp_path / "dict"), split="validation")
    # One dataset saved without splits: it is the data, whatever its split; another split is an error.
    datasets.Dataset.from_list([as_messages(c) for c in CONVERSATIONS]).save_to_disk(str(tmp_path / "one"))
    assert load_dataset_conversations(str(tmp_path / "one")) == CONVERSATIONS
    with pytest.raises(ValueError, match=r"saved as one dataset without splits, so there is no split 'test' in it"):
        load_dataset_conversations(str(tmp_path / "one"), split="test")
    # Errors name the dataset, the split and the row.
    bad = datasets.Dataset.from_list([as_messages(SINGLE_TURN), _messages((U, "q"), (U, "r"))])
    bad.save_to_disk(str(tmp_path / "bad"))
    with pytest.raises(ValueError, match=r"dataset '.*bad' \(split 'train'\), row 1: field 'messages\[1\]\.role': two "
                                         r"user messages in a row"):
        load_dataset_conversations(str(tmp_path / "bad"))


def test_a_directory_of_data_files_loads_without_running_code(tmp_path, datasets_cache) -> None:
    files = tmp_path / "repo"
    (files / "data").mkdir(parents=True)
    write(files / "data" / "train.jsonl", [as_messages(c) for c in CONVERSATIONS], "jsonl")
    assert load_dataset_conversations(str(files)) == CONVERSATIONS
    # A dataset that is a loading script: it is refused, and its code never runs.
    script = tmp_path / "scripted"
    script.mkdir()
    marker = tmp_path / "ran"
    (script / "scripted.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    with pytest.raises(RuntimeError, match=r"scripts are no longer supported"):  # datasets >= 4 (our extra's pin)
        load_dataset_conversations(str(script))
    assert not marker.exists()


def test_hub_names_offline_and_unreachable(tmp_path, datasets_cache, monkeypatch) -> None:
    from lit_model.cli import is_user_error
    from lit_model.data.records import HubUnreachableError

    with pytest.raises(HubUnreachableError, match=r"--data\.dataset 'someone/chats' is not a local directory, and the "
                                                  r"Hub is off \(HF_HUB_OFFLINE is set\)"):
        load_dataset_conversations("someone/chats")
    monkeypatch.setattr(datasets_cache.config, "HF_HUB_OFFLINE", False)

    def unreachable(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'someone/chats' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets_cache, "load_dataset", unreachable)
    with pytest.raises(ConnectionError, match=r"'someone/chats' is not a local directory and the Hub cannot be reached "
                                              r"\(Couldn't reach") as caught:
        load_dataset_conversations("someone/chats")
    assert is_user_error(caught.value)  # the CLI prints it as one line, no traceback
    for path in ("./missing", str(tmp_path / "missing"), "a/b/c", "chats.jsonl"):
        with pytest.raises(FileNotFoundError, match=r"No dataset directory at .*it is no Hub name"):
            load_dataset_conversations(path)


def test_without_datasets_installed(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ImportError, match=r"pip install 'lit-dropbp\[datasets\]'"):
        load_dataset_conversations("someone/chats")


# ---- DataArgs --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("kwargs", "match"), [
    (dict(format="openai"), r"--data\.format must be one of auto, alpaca, messages, sharegpt, got 'openai'"),
    (dict(dataset="d", train_file="{file}"), r"--data\.dataset and --data\.train_file are two sources of training"),
    (dict(dataset="d", val_split="test", val_file="{file}"), r"--data\.val_split and --data\.val_file are two sources"),
    (dict(dataset="d", val_split="train"), r"--data\.val_split 'train' is the training split"),
    (dict(split="test"), r"--data\.split picks a split of --data\.dataset, which is not given"),
    (dict(val_split="test"), r"--data\.val_split picks a split of --data\.dataset"),
    (dict(dataset="d", demo=True), r"--data\.demo true trains on the bundled task set: leave out .*--data\.dataset"),
])
def test_data_args_problems(tmp_path, kwargs, match) -> None:
    file = write(tmp_path / "f.jsonl", [as_messages(SINGLE_TURN)], "jsonl")
    args = DataArgs(**{k: (file if v == "{file}" else v) for k, v in kwargs.items()})
    problems = args.problems()
    assert len(problems) == 1 and re.search(match, problems[0]), problems
    assert DataArgs(dataset="d", split="test", val_split="validation").problems() == []
    assert DataArgs(train_file=file, format="sharegpt").problems() == []


def test_data_args_without_datasets_or_pyarrow_installed(tmp_path, monkeypatch) -> None:
    import importlib.util

    parquet = write(tmp_path / "data.parquet", [as_messages(SINGLE_TURN)], "parquet")
    real = importlib.util.find_spec
    missing = {"datasets", "pyarrow"}
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in missing else real(name, *a))
    assert DataArgs(dataset="d").problems() == [
        "--data.dataset needs the datasets package: pip install 'lit-dropbp[datasets]'"]
    assert DataArgs(train_file=parquet).problems() == [
        f"--data.train_file {str(parquet)!r} is a Parquet file, which needs pyarrow: pip install pyarrow"]


def test_a_run_trains_on_a_saved_dataset_of_conversations(tiny_checkpoint, tmp_path, datasets_cache, capsys) -> None:
    """--data.dataset with --data.val_split through finetune/lora.py: the splits are the dataset's."""
    datasets = datasets_cache
    train = [as_sharegpt(c) for c in CONVERSATIONS] * 4
    datasets.DatasetDict({"train": datasets.Dataset.from_list(train),
                          "test": datasets.Dataset.from_list([as_sharegpt(SINGLE_TURN)] * 2)}
                         ).save_to_disk(str(tmp_path / "chats"))
    lora = load_script("finetune/lora.py")
    from lit_model.peft.lora import LoRAConfig
    from lit_model.train.args import EvalArgs

    lora.setup(checkpoint_dir=tiny_checkpoint, out_dir=tmp_path / "out", lora=LoRAConfig(r=2, alpha=4),
               data=DataArgs(dataset=str(tmp_path / "chats"), val_split="test", prompt_style="chatml"),
               train=short_train(max_steps=2), eval=EvalArgs(interval=100, exact_match=0, max_new_tokens=2))
    out = capsys.readouterr().out
    assert "Data: 8 train / 2 validation samples" in out, out
    losses = logged_losses(tmp_path / "out")
    assert len(losses) == 2 and all(v == v for v in losses.values())  # two steps, no NaN
