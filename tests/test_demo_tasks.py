"""The demo task set (lit_model.data.demo_tasks) and the bundled demo checkpoint (checkpoints/demo)."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path
from types import ModuleType

import pytest
import torch

from lit_model import GPT, Config
from lit_model.data import demo_tasks as dt

DEMO_DIR = Path(__file__).resolve().parents[1] / "checkpoints" / "demo"


# ---- an independent oracle: recover (task, operands) from the text by template, and solve the task here -------------


def _solve(task: str, ops: dict[str, str]) -> str:
    if task == "reverse":
        return ops["x"][::-1]
    if task == "sort":
        return "".join(sorted(ops["x"]))
    if task == "add":
        return str(int(ops["a"]) + int(ops["b"]))
    if task == "max":
        return max(ops["x"])
    assert task == "successor"
    return str(int(ops["x"]) + 1)


def _key(task: str, ops: dict[str, str]) -> str:
    if task == "sort":
        return "".join(sorted(ops["x"]))
    if task == "add":
        a, b = sorted((int(ops["a"]), int(ops["b"])))
        return f"{a},{b}"
    return ops["x"]


def _pattern(template: str) -> str:
    return re.sub(r"\\\{(\w)\\\}", lambda m: rf"(?P<{m.group(1)}>\d+)", re.escape(template))


def _parse_record(record: dict[str, str]) -> tuple[str, dict[str, str]]:
    matches = []
    for task, templates in dt.INSTRUCTION_TEMPLATES.items():
        for instruction, input_ in templates:
            text = f"{record['instruction']}\n{record['input']}"
            m = re.fullmatch(_pattern(instruction) + r"\n" + _pattern(input_), text)
            if m:
                matches.append((task, m.groupdict()))
    assert len(matches) == 1, (record, matches)
    return matches[0]


def _parse_fact(line: str) -> tuple[str, dict[str, str], str]:
    matches = []
    for task, templates in dt.RAW_TEMPLATES.items():
        for template in templates:
            m = re.fullmatch(_pattern(template), line)
            if m:
                ops = m.groupdict()
                matches.append((task, ops, ops.pop("y")))
    assert len(matches) == 1, (line, matches)
    return matches[0]


# ---- records ---------------------------------------------------------------------------------------------------------


def test_records_are_deterministic_and_seeded() -> None:
    assert dt.make_demo_records(40, seed=3, split="val") == dt.make_demo_records(40, seed=3, split="val")
    assert dt.make_demo_records(40, seed=3) != dt.make_demo_records(40, seed=4)
    assert dt.pretraining_corpus(40, seed=3) == dt.pretraining_corpus(40, seed=3)
    assert dt.pretraining_corpus(40, seed=3) != dt.pretraining_corpus(40, seed=4)


def test_records_are_valid_correct_and_balanced() -> None:
    records = dt.make_demo_records(500, seed=0, split="train")
    assert len(records) == 500
    tasks = []
    for record in records:
        assert set(record) == {"instruction", "input", "output"}
        assert record["instruction"].strip() and record["output"].strip()
        task, ops = _parse_record(record)
        assert record["output"] == _solve(task, ops)
        tasks.append(task)
    assert {t: tasks.count(t) for t in dt.TASKS} == {t: 100 for t in dt.TASKS}
    assert any(r["input"] for r in records) and any(not r["input"] for r in records)  # both Alpaca templates


def test_train_and_val_operands_are_disjoint() -> None:
    def keys(records: list[dict[str, str]]) -> set[tuple[str, str]]:
        return {(task, _key(task, ops)) for task, ops in map(_parse_record, records)}

    train = dt.make_demo_records(2000, seed=0, split="train")
    val = dt.make_demo_records(300, seed=1, split="val")
    train_keys, val_keys = keys(train), keys(val)
    assert len(train_keys) == len(train) and len(val_keys) == len(val)  # no operand repeats within a split
    assert not train_keys & val_keys
    assert all(dt.split_of(task, key) == "val" for task, key in val_keys)


def test_pretraining_corpus_is_correct_and_uses_train_operands_only() -> None:
    lines = dt.pretraining_corpus(1000, seed=0)
    tasks = []
    for line in lines:
        task, ops, answer = _parse_fact(line)
        assert answer == _solve(task, ops)
        assert dt.split_of(task, _key(task, ops)) == "train"
        assert "###" not in line  # no instruction markup in pretraining
        tasks.append(task)
    assert {t: tasks.count(t) for t in dt.TASKS} == {t: 200 for t in dt.TASKS}


def test_raw_facts_split_the_answer_off_held_out_facts() -> None:
    facts = dt.raw_facts(300, seed=2, split="val")
    assert facts == dt.raw_facts(300, seed=2, split="val")
    for before, answer in facts:
        task, ops, parsed_answer = _parse_fact(before + answer)
        assert parsed_answer == answer == _solve(task, ops)
        assert dt.split_of(task, _key(task, ops)) == "val"


def test_bad_arguments_raise() -> None:
    with pytest.raises(ValueError, match="split must be 'train' or 'val'"):
        dt.make_demo_records(3, split="test")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="more unique demo records than the val split holds"):
        dt.make_demo_records(dt.MAX_RECORDS["val"] + 1, split="val")
    with pytest.raises(ValueError, match="n must be non-negative"):
        dt.make_demo_records(-1)
    with pytest.raises(ValueError, match="n must be non-negative"):
        dt.pretraining_corpus(-1)
    with pytest.raises(ValueError, match="split must be 'train' or 'val'"):
        dt.raw_facts(3, split="dev")  # type: ignore[arg-type]


def test_exact_match() -> None:
    assert dt.exact_match("1274", "1274")
    assert dt.exact_match(" 1274\n", "1274")
    assert dt.exact_match("1274", " 1274 ")
    assert not dt.exact_match("12 74", "1274")
    assert not dt.exact_match("1274.", "1274")
    assert not dt.exact_match("", "1274")


def test_write_demo_dataset_writes_loadable_json(tmp_path: Path) -> None:
    from lit_model.data import load_records

    train_path, val_path = dt.write_demo_dataset(tmp_path / "demo", n_train=30, n_val=10, seed=5)
    assert (train_path, val_path) == (tmp_path / "demo" / "train.json", tmp_path / "demo" / "val.json")
    assert json.loads(train_path.read_text()) == dt.make_demo_records(30, 5, "train")
    assert load_records(val_path) == dt.make_demo_records(10, 5, "val")


# ---- the bundled checkpoint ------------------------------------------------------------------------------------------


def _demo_model() -> GPT:
    config = Config.from_file(DEMO_DIR / "model_config.yaml")
    model = GPT(config)
    state_dict = torch.load(DEMO_DIR / "lit_model.pth", weights_only=True)
    model.load_state_dict(state_dict, strict=True)
    return model.eval()


def test_demo_checkpoint_loads_strictly() -> None:
    for name in ("lit_model.pth", "model_config.yaml", "tokenizer.json", "tokenizer_config.json",
                 "generation_config.json", "README.md"):
        assert (DEMO_DIR / name).is_file(), name
    config = Config.from_file(DEMO_DIR / "model_config.yaml")
    assert config.name == "demo" and config.n_query_groups < config.n_head  # grouped-query attention
    model = _demo_model()
    assert sum(p.numel() for p in model.parameters()) < 2_000_000
    tokenizer_json = json.loads((DEMO_DIR / "tokenizer.json").read_text())
    n_tokens = len(tokenizer_json["model"]["vocab"])
    assert config.vocab_size == n_tokens
    assert sum(f.stat().st_size for f in DEMO_DIR.iterdir()) < 4 * 2**20  # committed to git: keep it small


def _answer_exact(model: GPT, prompts: list[torch.Tensor], answers: list[torch.Tensor]) -> float:
    """Share of answers whose every token (EOS included) is the greedy choice given the right prefix.

    With single-digit tokens this equals greedy-decoding exact match, at the cost of one batched forward.
    """
    rows = [torch.cat((p, a)) for p, a in zip(prompts, answers)]
    x = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)
    with torch.no_grad():
        predicted = model(x).argmax(-1)
    hits = [
        bool((predicted[i, len(p) - 1 : len(p) + len(a) - 1] == a).all())
        for i, (p, a) in enumerate(zip(prompts, answers))
    ]
    return sum(hits) / len(hits)


def test_demo_model_has_the_skills_but_not_the_instruction_format() -> None:
    """The premise of the demo: raw facts are solved on held-out operands, Alpaca prompts are not."""
    from lit_model.prompts import PromptStyle
    from lit_model.tokenizer import Tokenizer

    tokenizer = Tokenizer(DEMO_DIR)
    assert tokenizer.bos_id == 0 and tokenizer.eos_id == 1
    model = _demo_model()
    facts = dt.raw_facts(100, seed=7, split="val")
    raw = [tokenizer.encode(before) for before, _ in facts]
    assert all(p[0] == tokenizer.bos_id for p in raw)  # add_bos_token
    assert _answer_exact(model, raw, [tokenizer.encode(a, bos=False, eos=True) for _, a in facts]) >= 0.9

    style = PromptStyle.from_name("alpaca")
    records = dt.make_demo_records(100, seed=7, split="val")
    alpaca = [tokenizer.encode(style.apply(r["instruction"], r["input"])) for r in records]
    answers = [tokenizer.encode(r["output"], bos=False, eos=True) for r in records]
    assert _answer_exact(model, alpaca, answers) < 0.3


# ---- scripts/prepare_demo.py ----------------------------------------------------------------------------------------


def _prepare_demo_script() -> ModuleType:
    path = DEMO_DIR.parents[1] / "scripts" / "prepare_demo.py"
    spec = importlib.util.spec_from_file_location("prepare_demo_script", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_prepare_demo_writes_a_checkpoint_the_library_loads(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from lit_model.tokenizer import Tokenizer

    script = _prepare_demo_script()
    script.prepare_demo(out_dir=tmp_path, n_facts=200, steps=2, batch_size=2)
    assert "held-out exact match: raw facts" in capsys.readouterr().out
    config = Config.from_file(tmp_path / "model_config.yaml")
    GPT(config).load_state_dict(torch.load(tmp_path / "lit_model.pth", weights_only=True), strict=True)
    assert "python scripts/prepare_demo.py" in (tmp_path / "README.md").read_text()
    # The committed tokenizer is exactly what the script makes.
    assert (tmp_path / "tokenizer.json").read_text() == (DEMO_DIR / "tokenizer.json").read_text()

    tokenizer = Tokenizer(tmp_path)
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.use_bos) == (0, 1, True)
    assert tokenizer.vocab_size == config.vocab_size
    # Digits are single tokens wherever they stand, so an operand reads the same in a fact and in a prompt.
    digits = [tokenizer.encode(d, bos=False).tolist() for d in "4721"]
    for text in ("reverse of 4721 is ", "### Input:\n4721\n\n", "4721"):
        ids = tokenizer.encode(text, bos=False).tolist()
        assert any(ids[i : i + 4] == sum(digits, []) for i in range(len(ids))), text


def test_prepare_demo_rejects_bad_arguments(tmp_path: Path) -> None:
    script = _prepare_demo_script()
    with pytest.raises(ValueError, match="steps must be positive, got 0; lr must be positive"):
        script.prepare_demo(out_dir=tmp_path, steps=0, lr=0.0)
    assert not any(tmp_path.iterdir())


def test_pack_documents_keeps_documents_whole() -> None:
    script = _prepare_demo_script()
    docs = [[0, 5, 6, 1], [0, 7, 1], [0, 8, 9, 9, 1]]
    inputs, targets = script.pack_documents(docs, block_size=7, pad_id=2)
    # rows of block_size + 1 = 8 tokens: [doc0 doc1] [doc2], padded; targets are inputs shifted by one
    assert inputs.tolist() == [[0, 5, 6, 1, 0, 7, 1], [0, 8, 9, 9, 1, 2, 2]]
    assert targets.tolist() == [[5, 6, 1, 0, 7, 1, -100], [8, 9, 9, 1, -100, -100, -100]]
    with pytest.raises(ValueError, match="exceeds block_size"):
        script.pack_documents([[0] * 9], block_size=7, pad_id=2)
