"""Shared fixtures: every test starts from the same RNG state and runs offline; the real model, where present."""

import os
import random
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _reset_rngs() -> None:
    random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _one_thread():
    # The test models are tiny: with several threads their matmuls spend more time synchronising than computing
    # (measured: ~1 s vs 2 ms per step on a busy 2-core machine).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---- the real model (pytest -m real_model) ---------------------------------------------------------------------------

REPO_ROOT = Path(__file__).resolve().parents[1]
SMOLLM2_DIR = REPO_ROOT / "checkpoints" / "SmolLM2-135M-Instruct"
SMOLLM2_GGUF = REPO_ROOT / "checkpoints" / ".cache" / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def smollm2() -> tuple[Path, Path]:
    """(checkpoint directory, GGUF file) of the real SmolLM2-135M-Instruct that scripts/fetch_smollm2.py writes.

    Skips the test when they are missing, unless LIT_REQUIRE_REAL_MODEL=1 (e.g. in CI), which makes it fail instead.
    """
    missing = [str(p.relative_to(REPO_ROOT)) for p in (SMOLLM2_DIR / "lit_model.pth", SMOLLM2_GGUF) if not p.is_file()]
    if missing:
        message = f"the real model is missing ({', '.join(missing)}): run `python scripts/fetch_smollm2.py`"
        if os.environ.get("LIT_REQUIRE_REAL_MODEL") == "1":
            pytest.fail(f"LIT_REQUIRE_REAL_MODEL=1 but {message}")
        pytest.skip(message)
    return SMOLLM2_DIR, SMOLLM2_GGUF
