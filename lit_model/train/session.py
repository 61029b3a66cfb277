"""The live objects of one training run, passed around as one typed value."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from lightning.fabric import Fabric
from lightning.fabric.wrappers import _FabricModule, _FabricOptimizer

from lit_model.data import BatchIterator, Conversation, SFTDataset
from lit_model.data.batches import PackedBatchIterator
from lit_model.dropbp import DropBPHandler
from lit_model.prompts import PromptStyle
from lit_model.tokenizer import Tokenizer
from lit_model.train.args import FinetuneJob
from lit_model.train.dist import GradSync


@dataclass
class Session:
    """What the loop, evaluation, calibration and checkpoints work on; built by lit_model.train.setup."""

    fabric: Fabric
    model: _FabricModule
    optimizer: _FabricOptimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    batches: BatchIterator | PackedBatchIterator
    train_data: SFTDataset
    val_data: SFTDataset
    job: FinetuneJob
    tokenizer: Tokenizer
    prompt_style: PromptStyle
    sample: Conversation  # the conversation whose completion is printed at each validation
    sync: GradSync  # how the step's gradients become the same on every rank
    inference_model: torch.nn.Module  # generation's model: the unwrapped GPT, or the FSDP wrapper that gathers it
    model_name: str
    # Samples -> a micro-batch: padded rows (lit_model.data.sft.collate) or one packed row (collate_packed).
    collate: Callable[[list[dict[str, torch.Tensor]]], dict[str, Any]]
    dropbp: Optional[DropBPHandler] = None
    fingerprint: dict[str, Any] = field(default_factory=dict)  # what determines the run (lit_model.train.fingerprint)
    metrics: dict[str, float] = field(default_factory=dict)  # what the run measured so far (saved with checkpoints)
