"""The training loop, in nanoGPT's order: calibrate if due -> batches -> train_step -> finite check -> clip -> step ->
log / validate / save if due. Ctrl-C never splits a step, and saves the step before exiting."""

from __future__ import annotations

import math
import resource
import time
import warnings
from pathlib import Path
from typing import Any, Optional

import torch
from tqdm import tqdm

from lit_model.data import IGNORE_INDEX
from lit_model.data.sft import inputs_targets
from lit_model.train import checkpoints as ckpt
from lit_model.train.calibrate import calibrate_dropbp
from lit_model.train.dist import forward_loss, global_sum
from lit_model.train.evaluate import print_sample, validate
from lit_model.train.interrupts import deferred_interrupt
from lit_model.train.session import Session
from lit_model.train.state import LoopState, save_checkpoint, snapshot, training_state


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or inf; the weights were not updated with it."""


def fit(s: Session, loop: LoopState) -> None:
    """Accumulate micro-batches into optimizer steps until `loop.max_steps`; log, validate and checkpoint as due."""
    fabric, args, out_dir = s.fabric, s.job.train, Path(s.job.out_dir)
    accum = args.global_batch_size // (args.micro_batch_size * fabric.world_size)
    calibrate_at = int(s.job.dropbp.sensitivity_at * loop.max_steps) if s.job.dropbp.sensitivity_at else None
    bar = tqdm(total=loop.max_steps, initial=loop.step, desc="Fine-tuning", disable=not fabric.is_global_zero,
               dynamic_ncols=True)
    time_start, tokens_start = loop.train_time, loop.tokens
    snap = snapshot(s)  # RNG and data position of the last whole step: what an interruption saves with its weights
    s.model.train()
    try:
        while loop.step < loop.max_steps:
            t_step = time.perf_counter()
            if s.dropbp is not None and calibrate_at is not None and loop.step >= calibrate_at and not loop.calibrated:
                calibrate_dropbp(s, loop)
                loop.calibration_time += time.perf_counter() - t_step
                snap = snapshot(s)
            micro_batches = [s.collate([s.train_data[i] for i in next(s.batches)]) for _ in range(accum)]
            # The label tokens of the whole step on all ranks normalise the loss (accumulation and data parallelism
            # then equal one large batch); the input tokens (padding included) feed the throughput.
            n_tokens, n_inputs = global_sum(fabric, [
                sum(int((inputs_targets(b)[1] != IGNORE_INDEX).sum()) for b in micro_batches),
                sum(inputs_targets(b)[0].numel() for b in micro_batches)])
            step = loop.step + 1
            if n_tokens == 0:  # the same on every rank: all skip together
                warnings.warn(f"Step {step}: every label is masked (prompts longer than max_seq_length?); skipped")
                loop.step, snap = step, snapshot(s)
                continue
            loss = train_step(s, micro_batches, n_tokens)
            loop.tokens += n_inputs
            if not torch.isfinite(loss):  # checked before the update, so the weights stay good
                raise NonFiniteLossError(non_finite_message(float(loss), step, loop.last_checkpoint))
            with deferred_interrupt():  # Ctrl-C waits until the step is whole: weights, state, counters, its row
                if args.max_norm is not None:
                    fabric.clip_gradients(s.model, s.optimizer, max_norm=args.max_norm)
                s.optimizer.step()
                s.optimizer.zero_grad(set_to_none=True)
                s.scheduler.step()
                loop.step, loop.train_time = step, loop.train_time + time.perf_counter() - t_step
                snap = snapshot(s)
                if step % args.log_interval == 0 or step == loop.max_steps:
                    rate = (loop.tokens - tokens_start) / max(loop.train_time - time_start, 1e-9)
                    log_step(s, loop, float(loss), rate, bar)
            bar.update(1)
            if step % s.job.eval.interval == 0 and step < loop.max_steps:
                validate_during(s, loop, bar)
            if args.save_interval and step % args.save_interval == 0:
                loop.last_checkpoint = save_checkpoint(s, out_dir / ckpt.step_dir_name(step),
                                                       training_state(s, loop, snap))
                if fabric.is_global_zero:
                    ckpt.prune(out_dir, args.keep_last)
    except KeyboardInterrupt:
        # The weights are those of the last whole step; `snap` holds its RNG states, data position, DropBP generator.
        bar.write(f"Interrupted: saving step {loop.step} before exiting")
        save_checkpoint(s, out_dir / ckpt.step_dir_name(loop.step), training_state(s, loop, snap))
        raise
    finally:
        bar.close()


def train_step(s: Session, micro_batches: list[dict[str, torch.Tensor]], n_tokens: int) -> torch.Tensor:
    """Forward and backward of this rank's micro-batches of one optimizer step; the gradients end up the same on
    every rank (`s.sync`). n_tokens: the step's label tokens on all ranks. Returns the step's loss (every rank's)."""
    fabric, world = s.fabric, s.fabric.world_size
    step_loss = torch.zeros((), device=fabric.device)
    synced = False
    for i, batch in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        inputs, target, segments = inputs_targets(batch)
        input_ids, target = fabric.to_device(inputs), fabric.to_device(target)
        mask = s.dropbp.set_dropped_layers() if s.dropbp is not None else None
        with s.sync.micro_batch(last):
            # DDP and FSDP average the ranks' gradients; the world-size factor makes that average the sum over all
            # ranks of (micro-batch loss x its share of the step's tokens), which is the 1-process gradient.
            share = int((target != IGNORE_INDEX).sum()) * world / n_tokens
            loss = forward_loss(fabric, s.model, input_ids, target, mask, segments) * share
            step_loss += loss.detach()
            loss = s.sync.before_backward(loss, mask, last)
            if loss.grad_fn is not None:  # nothing trainable reached this micro-batch: skip only its backward
                fabric.backward(loss)
                synced = synced or last
    s.sync.end_step(synced)
    return fabric.all_reduce(step_loss, reduce_op="sum") / world if world > 1 else step_loss


def validate_during(s: Session, loop: LoopState, bar: Any) -> None:
    """A validation pass and a sample between steps; back to training mode after."""
    val_loss = validate(s)
    loop.val_history.append((loop.step, val_loss))
    s.fabric.log_dict({"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50)), "train_time_s": loop.train_time},
                      step=loop.step)
    bar.write(f"step {loop.step}: validation loss {val_loss:.4f}, perplexity {math.exp(min(val_loss, 50)):.2f}")
    print_sample(s)
    s.model.train()


def log_step(s: Session, loop: LoopState, loss: float, tokens_per_s: float, bar: Any) -> None:
    record = {"loss": loss, "lr": s.scheduler.get_last_lr()[0], "tokens_per_s": tokens_per_s,
              "train_time_s": loop.train_time, "peak_memory_gb": peak_memory_bytes(s.fabric.device) / 1e9}
    s.fabric.log_dict(record, step=loop.step)
    loop.train_history.append((loop.step, loss))
    bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_s:.0f}", refresh=False)


def non_finite_message(value: float, step: int, last_checkpoint: Optional[Path]) -> str:
    where = (f"The last good checkpoint is {last_checkpoint}: resume with --resume {last_checkpoint}"
             if last_checkpoint else "No checkpoint was saved yet (set --train.save_interval to keep some)")
    return (f"The loss became {value} at step {step}; training stopped before applying it. {where}, after lowering "
            "--train.learning_rate, setting --train.max_norm, or using bf16 instead of fp16.")


def peak_memory_bytes(device: torch.device) -> int:
    """Peak allocated CUDA memory on a GPU; the process's peak resident memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
