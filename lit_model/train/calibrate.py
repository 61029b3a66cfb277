"""DropBP's calibration during a run: per-branch rates re-allocated from the gradient sensitivity of the next
samples, identical on every rank."""

from __future__ import annotations

from typing import Any, Callable

import torch

from lit_model.data import BatchIterator
from lit_model.data.batches import PackedBatchIterator
from lit_model.data.sft import inputs_targets
from lit_model.dropbp import Mask, allocate
from lit_model.loss import head_loss
from lit_model.train.dist import check_same_on_all_ranks, unwrap
from lit_model.train.session import Session
from lit_model.train.state import LoopState


def calibrate_dropbp(s: Session, loop: LoopState) -> None:
    """Re-allocate DropBP rates from the gradient sensitivity measured on the next micro-batches.

    The samples are the next `sensitivity_samples` micro-batches of the single-process order, whatever the number of
    ranks. With several ranks each measures its share of them on the unwrapped module (DDP's reducer expects
    `.backward()`, not `torch.autograd.grad`), the sensitivities are summed across ranks, and rank 0's rates are
    broadcast: the rates, and with them the masks, are identical everywhere and equal the 1-process ones.
    """
    fabric, raw, handler, args, train = s.fabric, unwrap(s.model), s.dropbp, s.job.dropbp, s.job.train
    assert handler is not None
    # Peek at upcoming samples without moving the data position: training still sees them in order.
    if isinstance(s.batches, PackedBatchIterator):
        order: BatchIterator | PackedBatchIterator = s.batches.single_process()
    else:
        order = BatchIterator(len(s.train_data), train.micro_batch_size, s.job.seed,
                              step_samples=train.global_batch_size)
        order.load_state_dict(s.batches.state_dict())
    samples = [s.collate([s.train_data[i] for i in next(order)]) for _ in range(args.sensitivity_samples)]
    first_inputs, _, first_segments = inputs_targets(samples[0])
    # The attention FLOPs grow with each sequence's own length: a packed row's sequences, not the row.
    seq_len = round(first_inputs.size(1) / len(first_segments)) if first_segments else first_inputs.size(1)

    def backprop_for(batch: dict[str, Any]) -> Callable[[Mask], torch.Tensor]:
        inputs, targets, segments = inputs_targets(batch)
        input_ids, target = fabric.to_device(inputs), fabric.to_device(targets)

        def backprop(mask: Mask) -> torch.Tensor:
            with fabric.autocast():  # the unwrapped module: apply the precision's autocast ourselves
                hidden = raw(input_ids, drop_mask=mask, return_hidden=True, segments=segments)
                return head_loss(raw.lm_head, hidden, target)

        return backprop

    raw.train()
    if fabric.world_size == 1:
        handler.sensitivity_based_drop_bp([backprop_for(b) for b in samples], target=args.rate, min_rate=args.min_rate,
                                          allocator=args.allocator, seq_len=seq_len, method=args.sensitivity)
    else:
        allocate([1.0] * handler.n_branches, handler.flops, args.rate, args.min_rate, args.allocator)  # fail fast
        mine = samples[fabric.global_rank :: fabric.world_size]
        total = torch.zeros(handler.n_branches, dtype=torch.float64)
        if mine:  # the measurement averages over its samples: undo that to sum over all ranks
            total += torch.tensor(handler.measure([backprop_for(b) for b in mine], args.sensitivity)[0]) * len(mine)
        total = fabric.all_reduce(total.to(fabric.device), reduce_op="sum").cpu() / len(samples)
        handler.set_seq_len(seq_len)
        rates = fabric.broadcast(allocate(total.tolist(), handler.flops, args.rate, args.min_rate, args.allocator))
        handler.sensitivities = total.tolist()
        handler.set_drop_rates(rates, target=args.rate)
    check_same_on_all_ranks(fabric, handler.fingerprint(), "DropBP rates after calibration")
    loop.calibrated = True
    summary = handler.summary()
    fabric.log_dict(summary, step=loop.step)
    rates = ", ".join(f"{r:.2f}" for r in handler.drop_rates)
    fabric.print(f"DropBP rates from sensitivity at step {loop.step} (FLOPs-weighted mean "
                 f"{summary['dropbp/mean_rate']:.3f}): [{rates}]")
