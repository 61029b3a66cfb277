"""Shared fixtures: every test starts from the same RNG state and runs offline."""

import os
import random

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _reset_rngs() -> None:
    random.seed(0)
    torch.manual_seed(0)
