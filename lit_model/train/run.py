"""One fine-tuning run from a job: validate it, lock the output directory, build the session, train (or resume),
evaluate and save `out_dir/final`."""

from __future__ import annotations

import math
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Optional

from lightning.fabric import Fabric

from lit_model.precision import canonical, default_precision, describe
from lit_model.train import checkpoints as ckpt
from lit_model.train.args import FinetuneJob, validate_job
from lit_model.train.dist import check_same_on_all_ranks, make_strategy
from lit_model.train.evaluate import evaluate_exact_match, print_sample, validate
from lit_model.train.lock import OutDirLock, rank_from_env
from lit_model.train.loop import fit
from lit_model.train.plotting import plot_loss_curve
from lit_model.train.setup import build_session, make_loggers
from lit_model.train.state import check_resume, claim_out_dir, restore, save_checkpoint


def run(job: FinetuneJob) -> dict[str, float]:
    """Train as the job says and return the final metrics (validation loss, exact match before/after when enabled,
    training time apart from evaluation).

    The output directory is locked for the whole run (a second run there fails at once), what killed runs left in it
    is removed, and a fresh run refuses a directory that holds another run's checkpoints (--overwrite true clears
    them); a resume must continue the same run (lit_model.train.state.check_resume).
    """
    job.precision = job.precision or default_precision(job.quantize is not None)
    validate_job(job)
    job = replace(job, precision=canonical(job.precision), dropbp=job.dropbp_settings())
    out_dir = Path(job.out_dir)
    # Rank 0 is the launching process (Fabric's launcher starts the others with a rank in their environment).
    with OutDirLock(out_dir, rank=rank_from_env()) as lock:
        resume_from = ckpt.resolve_resume(job.resume, out_dir)
        if lock.held:
            ckpt.cleanup_stale(out_dir)
            claim_out_dir(out_dir, resume_from, job.overwrite)
        return _train(job, resume_from)


def _train(job: FinetuneJob, resume_from: Optional[Path]) -> dict[str, float]:
    fabric = Fabric(devices=job.devices, num_nodes=job.num_nodes, strategy=make_strategy(job), precision=job.precision,
                    loggers=make_loggers(Path(job.out_dir)))
    if not os.environ.get("LT_CLI_USED"):  # `fabric run` started the processes already and forbids a second launch
        fabric.launch()
    fabric.seed_everything(job.seed)
    # What Fabric actually runs: it turns 16-mixed into bf16-mixed on CPU (fp16 autocast is CUDA-only).
    job.precision = canonical(getattr(fabric.strategy.precision, "precision", job.precision))
    fabric.print(describe(job.precision))
    s, loop, held_out = build_session(fabric, job, resume_from)
    metrics = s.metrics
    if resume_from is not None:
        state = ckpt.load_training_state(resume_from)
        check_resume(state, s.fingerprint, loop.max_steps, job.train.allow_new_schedule, resume_from)
        restore(s, state, loop)
        fabric.logger.begin(loop.step)  # continue metrics.csv after the checkpoint's step
        fabric.print(f"Resumed from {resume_from} at step {loop.step} of {loop.max_steps}")
    else:
        if held_out and job.eval.exact_match_before:
            metrics["exact_match_before"] = evaluate_exact_match(s, held_out)
            fabric.print(f"Held-out exact match before fine-tuning: {metrics['exact_match_before']:.3f}")
        if job.eval.initial_validation:  # the baseline of the final validation loss
            metrics["val_loss_before"] = validate(s)
            loop.val_history.append((0, metrics["val_loss_before"]))
            fabric.print(f"Validation loss before fine-tuning: {metrics['val_loss_before']:.4f}")
    time_before, t0 = loop.train_time, time.perf_counter()  # a resumed run's earlier training time is in its state
    fit(s, loop)
    # Training alone (steps and calibration) and everything the loop did besides (validation, samples, saving).
    metrics.update(train_time_s=loop.train_time, calibration_time_s=loop.calibration_time,
                   loop_other_time_s=time.perf_counter() - t0 - (loop.train_time - time_before))
    if s.dropbp is not None:
        check_same_on_all_ranks(fabric, s.dropbp.fingerprint(), "DropBP masks (generator, draw counts, rates)")
        if fabric.world_size > 1:
            fabric.print(f"DropBP: the same {s.dropbp.steps} masks and rates on all {fabric.world_size} ranks")
    metrics["val_loss"] = validate(s)
    loop.val_history.append((loop.step, metrics["val_loss"]))
    val = metrics["val_loss"]
    fabric.print(f"Final validation loss {val:.4f}, perplexity {math.exp(min(val, 50)):.2f}")
    if held_out:
        metrics["exact_match_after"] = evaluate_exact_match(s, held_out)
        before = metrics.get("exact_match_before")
        fabric.print(f"Held-out exact match after fine-tuning: {metrics['exact_match_after']:.3f}"
                     + (f" (before: {before:.3f}, {len(held_out)} samples)" if before is not None else ""))
    fabric.log_dict(dict(metrics), step=loop.step)
    print_sample(s)
    save_checkpoint(s, Path(job.out_dir) / "final")
    if fabric.is_global_zero:
        plot_loss_curve(loop.train_history, loop.val_history, Path(job.out_dir) / "loss.png",
                        title=f"{s.model_name} fine-tuning")
    for logger in fabric.loggers:
        logger.finalize("success")  # TensorBoard's buffer (metrics.csv is on disk row by row)
    return metrics
