"""A second offline task set whose answers are whole sentences: rewrite a simple sentence in the past tense, as a
negation, or as a yes/no question.

The digit puzzles of `lit_model.demo_tasks` have one-token-per-digit answers; these have answers of 5-10 words that a
pretrained model must produce with the right grammar (irregular past forms, do-support), so they test a fine-tune
on the kind of output instruction data mostly has. Generated procedurally from word lists (no download), in the
Alpaca record format.

Held-out split: five of the verbs appear only in validation records, so the held-out questions need the model's own
knowledge of those verbs' forms, not a memorised answer. Standard library only.
"""

from __future__ import annotations

import random
from pathlib import Path

from lit_model.data.demo_tasks import write_task_dataset

SENTENCE_SEED = 7
SUBJECTS = ("The cat", "My brother", "The teacher", "A small dog", "Our neighbour", "The old man", "Her friend",
            "The pilot", "The baker", "A young girl", "The doctor", "His sister", "The farmer", "The student")
# (base form, third person singular, past tense)
VERBS = (
    ("eat", "eats", "ate"), ("write", "writes", "wrote"), ("see", "sees", "saw"), ("buy", "buys", "bought"),
    ("find", "finds", "found"), ("build", "builds", "built"), ("drive", "drives", "drove"), ("open", "opens", "opened"),
    ("clean", "cleans", "cleaned"), ("paint", "paints", "painted"), ("carry", "carries", "carried"),
    ("catch", "catches", "caught"), ("throw", "throws", "threw"), ("bring", "brings", "brought"),
    ("sell", "sells", "sold"), ("draw", "draws", "drew"), ("hide", "hides", "hid"), ("wash", "washes", "washed"),
    ("fix", "fixes", "fixed"), ("keep", "keeps", "kept"), ("take", "takes", "took"), ("hold", "holds", "held"),
    ("push", "pushes", "pushed"), ("lose", "loses", "lost"), ("send", "sends", "sent"), ("break", "breaks", "broke"),
    ("choose", "chooses", "chose"), ("steal", "steals", "stole"), ("watch", "watches", "watched"),
    ("forget", "forgets", "forgot"),
)
VAL_VERBS = ("bring", "choose", "hold", "paint", "forget")  # never in a training record
OBJECTS = ("a letter", "the red door", "an apple", "the small boat", "a new car", "the old map", "a blue cup",
           "the wooden box", "a long rope", "the heavy bag", "a green hat", "the broken clock")

INSTRUCTIONS = {
    "past": ("Rewrite the sentence in the past tense.", "Put this sentence into the past tense."),
    "negative": ("Make the sentence negative.", "Rewrite the sentence as a negative statement."),
    "question": ("Turn the sentence into a yes/no question.", "Rewrite the sentence as a question."),
}


def _record(rng: random.Random, verbs: list[tuple[str, str, str]]) -> dict[str, str]:
    subject, (base, third, past), obj = rng.choice(SUBJECTS), rng.choice(verbs), rng.choice(OBJECTS)
    task = rng.choice(sorted(INSTRUCTIONS))
    sentence = f"{subject} {third} {obj}."
    answer = {
        "past": f"{subject} {past} {obj}.",
        "negative": f"{subject} does not {base} {obj}.",
        "question": f"Does {subject[0].lower() + subject[1:]} {base} {obj}?",
    }[task]
    return {"instruction": rng.choice(INSTRUCTIONS[task]), "input": sentence, "output": answer}


def make_sentence_records(n: int, seed: int = SENTENCE_SEED, split: str = "train") -> list[dict[str, str]]:
    """`n` distinct records of the split ("train": the verbs not in VAL_VERBS; "val": VAL_VERBS only)."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    verbs = [v for v in VERBS if (v[0] in VAL_VERBS) == (split == "val")]
    capacity = len(SUBJECTS) * len(verbs) * len(OBJECTS) * len(INSTRUCTIONS)
    if n > capacity // 2:
        raise ValueError(f"At most {capacity // 2} distinct {split} records can be drawn quickly, asked for {n}")
    rng = random.Random(f"{seed}-{split}")
    seen: set[tuple[str, str]] = set()
    out = []
    while len(out) < n:
        record = _record(rng, verbs)
        key = (record["input"], record["output"])
        if key not in seen:
            seen.add(key)
            out.append(record)
    return out


def write_sentence_dataset(data_dir: Path, n_train: int = 2000, n_val: int = 150,
                           seed: int = SENTENCE_SEED) -> tuple[Path, Path]:
    """Write `train.json` and `val.json` into `data_dir`; returns their paths."""
    return write_task_dataset(data_dir, make_sentence_records, n_train, n_val, seed)
