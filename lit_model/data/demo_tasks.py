"""The offline demo's task set: procedurally generated digit puzzles, as raw text and as Alpaca instructions.

The bundled base model (`checkpoints/demo`, made by `scripts/prepare_demo.py`) was pretrained on the raw forms
("reverse of 4721 is 1274", "23 + 45 = 68"). It has the skills, but has never seen an instruction prompt, so it
scores near zero on `make_demo_records`; a short fine-tune teaches it the instruction format.

Tasks: reverse the digits of a 3-5 digit string, sort them, add two 2-digit numbers, find the largest digit, add
one to a number below 10,000. Every task works on digits because the demo tokenizer splits digits into single
tokens: an operand tokenizes the same way in a sentence, in an instruction and in an answer, so the skills are
digit-level algorithms, not spelling. Instructions come in four paraphrases per task, half with an `input` field;
they reuse the words of the raw forms ("in reverse order", "largest digit") as real instructions reuse the words
of web text, which is what lets a few hundred fine-tuning steps connect the instruction to the skill.

Held-out split: each operand has a canonical key (the pair of an addition in sorted order, the multiset of digits
for sorting) and a stable hash of the key puts it in "train" or "val" forever, whatever `n` and `seed` are. The
base model's pretraining corpus uses train-split operands only, so validation questions are new to every model.

This module imports nothing beyond the standard library: generating the data set takes well under a second.
"""

from __future__ import annotations

import json
import os
import random
import zlib
from pathlib import Path
from typing import Callable, Literal

Split = Literal["train", "val"]

DEMO_SEED = 42
DEMO_N_TRAIN = 2000
DEMO_N_VAL = 150
DEMO_N_PRETRAIN = 200_000
VAL_FRACTION_PERCENT = 20  # share of each task's operand space held out for validation

# Unique records a split can hold, at about half the smallest task's operand space (sort: 2,345 train and 592 val
# digit multisets), so that drawing unseen operands by rejection stays quick.
MAX_RECORDS = {"train": 5000, "val": 1000}

TASKS = ("reverse", "sort", "add", "max", "successor")


def _digits(rng: random.Random, low: int, high: int) -> str:
    return "".join(rng.choice("0123456789") for _ in range(rng.randint(low, high)))


# Each task: draw operands -> (operands, canonical key, answer). Operands are strings of digits.
def _reverse(rng: random.Random) -> tuple[dict[str, str], str, str]:
    x = _digits(rng, 3, 5)
    return {"x": x}, x, x[::-1]


def _sort(rng: random.Random) -> tuple[dict[str, str], str, str]:
    x = _digits(rng, 3, 5)
    # Permutations of one multiset share an answer, so they share a key (and a split).
    return {"x": x}, "".join(sorted(x)), "".join(sorted(x))


def _add(rng: random.Random) -> tuple[dict[str, str], str, str]:
    # Two-digit operands only: the digits to add line up the same way in every question.
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    return {"a": str(a), "b": str(b)}, f"{min(a, b)},{max(a, b)}", str(a + b)


def _max(rng: random.Random) -> tuple[dict[str, str], str, str]:
    x = _digits(rng, 3, 6)
    return {"x": x}, x, max(x)


def _successor(rng: random.Random) -> tuple[dict[str, str], str, str]:
    n = rng.randint(0, 9999)
    return {"x": str(n)}, str(n), str(n + 1)


_DRAW: dict[str, Callable[[random.Random], tuple[dict[str, str], str, str]]] = {
    "reverse": _reverse,
    "sort": _sort,
    "add": _add,
    "max": _max,
    "successor": _successor,
}

# Raw surface forms for pretraining: lower case, no instruction markup. `{y}` is the answer.
RAW_TEMPLATES: dict[str, tuple[str, ...]] = {
    "reverse": (
        "reverse of {x} is {y}",
        "{x} reversed is {y}",
        "{x} written backwards is {y}",
        "The digits of {x} in reverse order are {y}",
        "Reversing the digits of {x} gives {y}",
        "what is {x} backwards? it is {y}",
        "if you read {x} from right to left you get {y}",
        "reversed:\n{x}\n{y}",
    ),
    "sort": (
        "{x} sorted is {y}",
        "sorting the digits of {x} gives {y}",
        "The digits of {x} in ascending order are {y}",
        "digits of {x} from smallest to largest: {y}",
        "what are the digits of {x} in increasing order? they are {y}",
        "if you put the digits of {x} in order you get {y}",
        "sorted:\n{x}\n{y}",
    ),
    "add": (
        "{a} + {b} = {y}",
        "{a} plus {b} is {y}",
        "The sum of {a} and {b} is {y}",
        "adding {a} and {b} gives {y}",
        "what is {a} + {b}? it is {y}",
        "if you add {a} and {b} together you get {y}",
        "sum:\n{a} + {b}\n{y}",
    ),
    "max": (
        "largest digit of {x} is {y}",
        "The biggest digit in {x} is {y}",
        "max digit in {x}: {y}",
        "the maximum digit of {x} is {y}",
        "which digit of {x} is the largest? it is {y}",
        "of all the digits in {x} the largest one is {y}",
        "largest digit:\n{x}\n{y}",
    ),
    "successor": (
        "after {x} comes {y}",
        "{x} plus one is {y}",
        "The number after {x} is {y}",
        "counting up by one from {x} gives {y}",
        "what number comes after {x}? it is {y}",
        "if you add one to {x} you get {y}",
        "next number:\n{x}\n{y}",
    ),
}

# Instruction paraphrases: (instruction, input). An empty input gives the Alpaca prompt without "### Input:".
INSTRUCTION_TEMPLATES: dict[str, tuple[tuple[str, str], ...]] = {
    "reverse": (
        ("Reverse the digits of the number.", "{x}"),
        ("Write the digits in reverse order.", "{x}"),
        ("What is {x} written backwards?", ""),
        ("Write the digits of {x} in reverse order.", ""),
    ),
    "sort": (
        ("Sort the digits in ascending order.", "{x}"),
        ("Arrange the digits from smallest to largest.", "{x}"),
        ("Sort the digits of {x} in ascending order.", ""),
        ("What are the digits of {x} in increasing order?", ""),
    ),
    "add": (
        ("Add the two numbers.", "{a} and {b}"),
        ("Compute the sum.", "{a} + {b}"),
        ("What is {a} plus {b}?", ""),
        ("Calculate {a} + {b}.", ""),
    ),
    "max": (
        ("Find the largest digit.", "{x}"),
        ("Which digit is the biggest?", "{x}"),
        ("What is the largest digit of {x}?", ""),
        ("Give the maximum digit in {x}.", ""),
    ),
    "successor": (
        ("Add one to the number.", "{x}"),
        ("Which number comes next?", "{x}"),
        ("What number comes after {x}?", ""),
        ("Count up by one from {x}.", ""),
    ),
}


def split_of(task: str, key: str) -> Split:
    """The split ("train" or "val") that an operand key belongs to, fixed by a stable hash (not Python's `hash`)."""
    return "val" if zlib.crc32(f"{task}|{key}".encode()) % 100 < VAL_FRACTION_PERCENT else "train"


def _draw(task: str, rng: random.Random, split: Split) -> tuple[dict[str, str], str, str]:
    # Rejection sampling: about 1 in 5 draws is a validation operand, so this ends quickly.
    while True:
        operands, key, answer = _DRAW[task](rng)
        if split_of(task, key) == split:
            return operands, key, answer


def make_demo_records(n: int, seed: int = DEMO_SEED, split: Split = "train") -> list[dict[str, str]]:
    """`n` Alpaca records {"instruction", "input", "output"}, tasks balanced, deterministic in (n, seed, split).

    Within a split no operand key repeats; across splits keys are disjoint (see `split_of`).
    """
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    if n < 0:
        raise ValueError(f"n must be non-negative, got {n}")
    limit = MAX_RECORDS[split]
    if n > limit:
        raise ValueError(f"n={n} asks for more unique demo records than the {split} split holds; use n <= {limit}")
    rng = random.Random(f"{seed}|{split}")
    seen: set[tuple[str, str]] = set()
    records = []
    for i in range(n):
        task = TASKS[i % len(TASKS)]
        while True:
            operands, key, answer = _draw(task, rng, split)
            if (task, key) not in seen:
                seen.add((task, key))
                break
        instruction, input_ = rng.choice(INSTRUCTION_TEMPLATES[task])
        records.append(
            {"instruction": instruction.format(**operands), "input": input_.format(**operands), "output": answer}
        )
    rng.shuffle(records)
    return records


def raw_facts(n: int, seed: int = DEMO_SEED, split: Split = "train") -> list[tuple[str, str]]:
    """`n` raw-text facts as (text before the answer, answer), e.g. ("reverse of 4721 is ", "1274").

    Tasks are balanced and operands come from `split`; deterministic in (n, seed, split). The "val" facts measure
    whether a model has a skill on operands that neither pretraining nor fine-tuning showed it.
    """
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    if n < 0:
        raise ValueError(f"n must be non-negative, got {n}")
    rng = random.Random(f"{seed}|raw|{split}")
    facts = []
    for i in range(n):
        task = TASKS[i % len(TASKS)]
        operands, _, answer = _draw(task, rng, split)
        before = rng.choice(RAW_TEMPLATES[task]).split("{y}")[0]  # every template ends with its answer
        facts.append((before.format(**operands), answer))
    rng.shuffle(facts)
    return facts


def pretraining_corpus(n: int, seed: int = DEMO_SEED) -> list[str]:
    """`n` raw-text facts ("reverse of 4721 is 1274") over train-split operands only, tasks balanced, deterministic."""
    return [before + answer for before, answer in raw_facts(n, seed, "train")]


def tokenizer_training_text() -> list[str]:
    """Text to train the demo tokenizer on: every template (raw and instruction) and the Alpaca prompt words.

    Operands are left out on purpose: digits are split into single tokens by the pre-tokenizer anyway, and merges
    should go to the words of the prompts so that prompts stay short.
    """
    header = (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.",
        "### Instruction:",
        "### Input:",
        "### Response:",
    )
    blank = {"x": "", "a": "", "b": "", "y": ""}
    raw = [t.format(**blank) for templates in RAW_TEMPLATES.values() for t in templates]
    instructions = [i.format(**blank) for ts in INSTRUCTION_TEMPLATES.values() for i, inp in ts] + [
        inp.format(**blank) for ts in INSTRUCTION_TEMPLATES.values() for _, inp in ts
    ]
    return list(header) + raw + instructions


def exact_match(prediction: str, reference: str) -> bool:
    """Whether the prediction equals the reference once leading and trailing whitespace is stripped."""
    return prediction.strip() == reference.strip()


def write_demo_dataset(
    data_dir: Path, n_train: int = DEMO_N_TRAIN, n_val: int = DEMO_N_VAL, seed: int = DEMO_SEED
) -> tuple[Path, Path]:
    """Write `train.json` and `val.json` (lists of Alpaca records) into `data_dir`; returns their paths."""
    return write_task_dataset(data_dir, make_demo_records, n_train, n_val, seed)


def write_task_dataset(data_dir: Path, make_records: Callable[[int, int, str], list[dict[str, str]]], n_train: int,
                       n_val: int, seed: int) -> tuple[Path, Path]:
    """Write a generated task set's `train.json` and `val.json` (`make_records(n, seed, split)`) into `data_dir`,
    each atomically and only when it changed; returns their paths."""
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for split, n in (("train", n_train), ("val", n_val)):
        path = data_dir / f"{split}.json"
        _write_if_changed(path, json.dumps(make_records(n, seed, split), indent=1))
        paths.append(path)
    return paths[0], paths[1]


def _write_if_changed(path: Path, text: str) -> None:
    """Write `text` atomically (a temporary file renamed into place), unless the file holds it already: several
    processes of one run may write the same data set while others read it, and none may see a partial file."""
    if path.is_file() and path.read_text() == text:
        return
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
