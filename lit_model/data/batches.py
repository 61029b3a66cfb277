"""The order of training samples: endless, resumable micro-batches of indices, identical for any number of devices."""

from __future__ import annotations

from typing import Iterator, Optional

import torch


class BatchIterator:
    """Endless, resumable micro-batches of sample indices: a fresh seeded permutation per epoch, sharded by rank.

    Every step of `batch_size * world_size` samples takes the next slice of the epoch's permutation, and rank r gets
    the r-th micro-batch of that slice; so the micro-batches of one optimizer step, over all ranks, are the same
    samples whatever the number of devices. `position` counts samples of the global order, identical on every rank.
    step_samples: the samples of one optimizer step (the global batch size). An epoch then ends after a whole number
        of optimizer steps, so the ragged tail that is dropped does not depend on the number of devices (without it,
        the tail is dropped per micro-batch, which is what a single process did before).
    """

    def __init__(
        self, n: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1, step_samples: Optional[int] = None
    ) -> None:
        if n < batch_size * world_size:
            raise ValueError(f"{n} training samples cannot fill one micro-batch of {batch_size} on {world_size} devices")
        if step_samples is not None and (step_samples % (batch_size * world_size) or n < step_samples):
            raise ValueError(
                f"{n} training samples in optimizer steps of {step_samples}: the step must be a multiple of "
                f"micro-batch {batch_size} x {world_size} devices and fit in the data; lower the global batch size"
            )
        self.n, self.batch_size, self.seed, self.rank, self.world_size = n, batch_size, seed, rank, world_size
        # Samples per epoch: whole optimizer steps (or whole micro-batch spans without step_samples).
        self.usable = n - n % step_samples if step_samples else n
        self.epoch, self.position = 0, 0

    def __iter__(self) -> Iterator[list[int]]:
        return self

    def __next__(self) -> list[int]:
        span = self.batch_size * self.world_size
        if self.position + span > self.usable:  # drop the ragged tail: every step sees full micro-batches
            self.epoch, self.position = self.epoch + 1, 0
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        chunk = order[self.position : self.position + span].tolist()
        self.position += span
        return chunk[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
