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


OPEN_BINS = 64  # bins first_fit still adds to; older ones are closed (keeps packing linear in the data)


def first_fit(order: list[int], lengths: list[int], budget: int, open_bins: int = OPEN_BINS) -> list[list[int]]:
    """Bins of sample indices, each at most `budget` tokens: every sample, in `order`, goes into the first of the
    newest `open_bins` bins it fits (a new bin when none), so bins fill tightly while the order stays random.
    Deterministic in its inputs."""
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = lengths[i]
        if n > budget:
            raise ValueError(f"Sample {i} has {n} tokens, more than the packing budget of {budget} tokens per "
                             "micro-batch: raise --data.pack_tokens (or lower --train.max_seq_length)")
        for b in range(max(0, len(bins) - open_bins), len(bins)):
            if n <= room[b]:
                bins[b].append(i)
                room[b] -= n
                break
        else:
            bins.append([i])
            room.append(budget - n)
    return bins


class PackedBatchIterator:
    """Endless, resumable micro-batches for padding-free packing: each is a list of whole samples of at most
    `budget` tokens, packed into one row by the collate step (lit_model.data.sft.collate_packed).

    Each epoch packs a fresh seeded permutation with `first_fit`; the bins are then taken in order, `world_size` per
    group, rank r getting the r-th of each group, and an epoch ends after a whole number of optimizer steps
    (`micro_per_step` bins per rank), so the dropped tail does not depend on the number of devices. `position`
    counts bins of the global order: state_dict / load_state_dict resume exactly.
    """

    def __init__(self, lengths: list[int], budget: int, seed: int, rank: int = 0, world_size: int = 1,
                 micro_per_step: int = 1) -> None:
        self.lengths, self.budget, self.seed = list(lengths), budget, seed
        self.rank, self.world_size, self.micro_per_step = rank, world_size, micro_per_step
        self.epoch, self.position = 0, 0
        self._bins = self._pack(0)
        self._first_epoch_bins = len(self._bins)
        if len(self._bins) < self.span:
            raise ValueError(f"{len(self.lengths)} samples pack into {len(self._bins)} micro-batches of {budget} "
                             f"tokens, fewer than one optimizer step takes ({self.span}): lower --data.pack_tokens "
                             "or the global batch size")

    @property
    def span(self) -> int:
        """Bins one optimizer step takes over all ranks."""
        return self.micro_per_step * self.world_size

    @property
    def bins_per_epoch(self) -> int:
        """Micro-batches the current epoch's packing made (all ranks)."""
        return len(self._bins)

    def steps_per_epoch(self) -> int:
        """Optimizer steps in an epoch (the first epoch's packing; later ones differ by a bin or so)."""
        return self._first_epoch_bins // self.span

    def _pack(self, epoch: int) -> list[list[int]]:
        order = torch.randperm(len(self.lengths), generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
        return first_fit(order, self.lengths, self.budget)

    def __iter__(self) -> Iterator[list[int]]:
        return self

    def __next__(self) -> list[int]:
        usable = len(self._bins) - len(self._bins) % self.span
        if self.position + self.world_size > usable:  # the ragged tail of whole steps is dropped
            self.epoch, self.position = self.epoch + 1, 0
            self._bins = self._pack(self.epoch)
        group = self._bins[self.position : self.position + self.world_size]
        self.position += self.world_size
        return group[self.rank]

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        epoch = int(state["epoch"])
        if epoch != self.epoch:
            self._bins = self._pack(epoch)
        self.epoch, self.position = epoch, int(state["position"])

    def single_process(self) -> "PackedBatchIterator":
        """The same order on one process (from the same position): what every rank's calibration peeks at."""
        other = PackedBatchIterator(self.lengths, self.budget, self.seed, micro_per_step=self.micro_per_step)
        other.load_state_dict(self.state_dict())
        return other
