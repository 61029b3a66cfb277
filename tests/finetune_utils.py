"""Shared pieces of the tests that run the finetune and generate scripts in-process on a tiny model."""

from __future__ import annotations

import csv
import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from lit_model import GPT, Config
from lit_model.train.args import DataArgs, TrainArgs
from tests.tokenizer_utils import make_bpe_tokenizer

ROOT = Path(__file__).resolve().parent.parent


def load_script(relative: str) -> ModuleType:
    """Import a script by path, with its directory on sys.path as when run as `python finetune/x.py`."""
    path = ROOT / relative
    sys.path.insert(0, str(path.parent))
    try:
        spec = importlib.util.spec_from_file_location(f"script_{path.parent.name}_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses defined in the script look their module up there
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(path.parent))
    return module


WORDS = ["cat", "dog", "sun", "map", "pen", "cup", "hat", "box", "toy", "bag", "fox", "owl"]


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A 2-layer Llama-like model with a BPE tokenizer and a small JSON data set."""
    root = tmp_path_factory.mktemp("tiny")
    ckpt = make_bpe_tokenizer(root / "ckpt", texts=[f"Reverse the word {w}. {w[::-1]}" for w in WORDS] * 20)
    from lit_model.tokenizer import Tokenizer

    vocab = Tokenizer(ckpt).vocab_size
    config = Config(name="tiny", n_layer=2, n_head=4, n_embd=32, n_query_groups=2, intermediate_size=64,
                    vocab_size=vocab, block_size=512)
    torch.manual_seed(0)
    model = GPT(config)
    model.init_weights()
    torch.save(model.state_dict(), ckpt / "lit_model.pth")
    config.save(ckpt / "model_config.yaml")
    records = [{"instruction": f"Reverse the word {w}.", "input": "", "output": w[::-1]} for w in WORDS]
    (root / "train.json").write_text(json.dumps(records[:8] * 4))
    (root / "val.json").write_text(json.dumps(records[8:]))
    return ckpt


def data_args(ckpt: Path) -> DataArgs:
    return DataArgs(train_file=ckpt.parent / "train.json", val_file=ckpt.parent / "val.json", prompt_style="alpaca")


def short_train(**kw) -> TrainArgs:
    return TrainArgs(**{"global_batch_size": 4, "micro_batch_size": 2, "max_steps": 4, "learning_rate": 1e-2,
                        "lr_warmup_steps": 1, **kw})


def final_weights(out: Path, name: str = "final") -> dict[str, torch.Tensor]:
    """The weights a run saved in out/name: the full model, or the LoRA tensors."""
    d = out / name
    return torch.load(d / ("lit_model.pth" if (d / "lit_model.pth").is_file() else "lit_model.lora.pth"),
                      weights_only=True)


def logged_losses(out: Path) -> dict[int, float]:
    """Training loss per step from every metrics.csv a run (and its resumptions) wrote under out/logs."""
    found = {}
    for path in sorted((out / "logs").rglob("metrics.csv")):
        for row in csv.DictReader(path.open()):
            if row.get("loss"):
                found[int(row["step"])] = float(row["loss"])
    return found
