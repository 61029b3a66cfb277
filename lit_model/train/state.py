"""What a training run is beyond its weights, on disk and back: the loop's counters, the snapshot of RNG states and
data position a step consumes, the training state a step checkpoint holds, checkpoint directories written from the
live model, and the checks that a resume continues the same run into an output directory that is its own."""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
import yaml

from lit_model.checkpoint_io import LORA_WEIGHTS_NAME, WEIGHTS_NAME, copy_support_files, save_state_dict
from lit_model.peft.base import adapter_keys
from lit_model.prompts import save_prompt_style
from lit_model.train import checkpoints as ckpt
from lit_model.train.args import TrainArgs
from lit_model.train.dist import (
    check_same_on_all_ranks,
    clean_name,
    gather_objects,
    load_optimizer_state,
    model_state_dict,
    optimizer_state,
    unwrap,
)
from lit_model.train.fingerprint import fingerprint_problems, plain
from lit_model.train.session import Session


@dataclass
class LoopState:
    """What the loop advances; saved in every training checkpoint so that resume continues the same run."""

    step: int = 0
    max_steps: int = 0
    tokens: int = 0
    train_history: list[tuple[int, float]] = field(default_factory=list)
    val_history: list[tuple[int, float]] = field(default_factory=list)
    last_checkpoint: Optional[Path] = None
    calibrated: bool = False  # DropBP rates re-allocated from sensitivity already
    train_time: float = 0.0  # seconds spent in training steps (and DropBP calibration), without evaluation or saving
    calibration_time: float = 0.0  # of which in DropBP's sensitivity measurement


def snapshot(s: Session) -> dict[str, Any]:
    """RNG states, data position and DropBP generator: what the next step will consume."""
    return {"rng": ckpt.rng_states(), "data": s.batches.state_dict(),
            "dropbp": s.dropbp.state_dict() if s.dropbp is not None else None}


def training_state(s: Session, loop: LoopState, snap: dict[str, Any]) -> dict[str, Any]:
    """Everything beyond the weights that resume needs (plain containers and tensors).

    Collective under several processes (every rank calls it): the optimizer state is gathered whole under FSDP, and
    every rank's RNG states are kept, since dropout draws differ between ranks that see different shapes.
    """
    if s.dropbp is not None:
        check_same_on_all_ranks(s.fabric, s.dropbp.fingerprint(), "DropBP masks")
    return {
        "step": loop.step, "tokens": loop.tokens, "max_steps": loop.max_steps, "calibrated": loop.calibrated,
        "train_time": loop.train_time, "calibration_time": loop.calibration_time,
        "train_history": loop.train_history, "val_history": loop.val_history,
        "optimizer": optimizer_state(s.fabric, s.model, s.optimizer),
        "scheduler": s.scheduler.state_dict(), **snap,
        "rng_per_rank": gather_objects(s.fabric, snap["rng"]), "world_size": s.fabric.world_size,
        "fingerprint": s.fingerprint,
    }


def restore(s: Session, state: dict[str, Any], loop: LoopState) -> None:
    """Put optimizer, schedule, data position, RNG, DropBP and loop counters back as they were when saved.

    A checkpoint from any number of processes resumes on any other: the optimizer state is whole (not sharded), the
    data position counts samples of the global order; each rank takes its own saved RNG states when the world size
    is the same, else rank 0's.
    """
    fabric = s.fabric
    load_optimizer_state(fabric, s.model, s.optimizer, state["optimizer"])
    s.scheduler.load_state_dict(state["scheduler"])
    s.batches.load_state_dict(state["data"])
    per_rank = state.get("rng_per_rank")
    ckpt.set_rng_states(per_rank[fabric.global_rank] if per_rank and len(per_rank) == fabric.world_size
                        else state["rng"])
    if (s.dropbp is None) != (state.get("dropbp") is None):
        raise ValueError("--dropbp.rate must be 0 in both or positive in both the saved run and the resumed one")
    if s.dropbp is not None:
        s.dropbp.load_state_dict(state["dropbp"])
    loop.calibrated = bool(state.get("calibrated", False))
    loop.step, loop.tokens = int(state["step"]), int(state["tokens"])
    loop.train_time = float(state.get("train_time", 0.0))  # absent in checkpoints of earlier versions
    loop.calibration_time = float(state.get("calibration_time", 0.0))
    loop.train_history = [tuple(x) for x in state["train_history"]]
    loop.val_history = [tuple(x) for x in state["val_history"]]
    s.metrics.update(state.get("metrics", {}))
    if s.job.train.allow_new_schedule:  # the saved optimizer and scheduler carry the old constants
        apply_schedule(s.job.train, s.optimizer, s.scheduler)


def check_resume(state: dict[str, Any], fingerprint: dict[str, Any], max_steps: int, allow_new_schedule: bool,
                 checkpoint: Path) -> None:
    """Refuse to resume a checkpoint into a run that is not its continuation: every difference in one message."""
    problems = []
    saved = state.get("fingerprint")
    if saved:  # checkpoints of earlier versions have none: nothing to compare with
        problems = fingerprint_problems(saved, fingerprint, allow_new_schedule)
    if int(state["step"]) > max_steps and not problems:  # (at max_steps: the run only evaluates and saves final/)
        raise ValueError(f"Cannot resume from {checkpoint}: it is at step {int(state['step'])}, past the end of this "
                         f"run (step {max_steps}). Raise --train.max_steps (with --train.allow_new_schedule true), or "
                         "use the checkpoint as it is: it is a complete checkpoint directory.")
    if problems:
        raise ValueError(f"Cannot resume from {checkpoint}: it belongs to a different run.\n  - "
                         + "\n  - ".join(problems)
                         + "\nResume with the arguments of the run that wrote it (its hyperparameters.yaml), or "
                         "start a new run in another --out_dir.")


def apply_schedule(args: TrainArgs, optimizer: Any, scheduler: Any) -> None:
    """After restoring an optimizer and a scheduler, put the (changed) schedule of `args` in force."""
    scheduler.base_lrs = [args.learning_rate for _ in optimizer.param_groups]
    for group, base, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group.update(lr=base * factor(scheduler.last_epoch), weight_decay=args.weight_decay,
                     betas=(args.beta1, args.beta2))
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


def claim_out_dir(out_dir: Path, resume_from: Optional[Path], overwrite: bool) -> None:
    """A run that starts fresh must not mix its checkpoints with another run's, or replace a finished final/ unseen:
    refuse such a directory, or clear it with `overwrite`."""
    if resume_from is not None:
        return
    previous = [p for p in (out_dir / "final", *ckpt.list_checkpoints(out_dir)) if p.exists()]
    if not previous:
        return
    if not overwrite:
        names = ", ".join(p.name for p in previous[:4]) + (" ..." if len(previous) > 4 else "")
        raise FileExistsError(
            f"{out_dir} holds another run ({names}). Continue it with --resume auto, start over with --overwrite true "
            "(deletes its checkpoints and metrics), or pass another --out_dir.")
    for path in (*previous, out_dir / "logs"):
        shutil.rmtree(path, ignore_errors=True)


def save_checkpoint(s: Session, target: Path, state: Optional[dict[str, Any]] = None) -> Path:
    """Write a self-contained checkpoint directory atomically; with `state`, also what resume needs.

    Collective under FSDP (every rank gathers the weights); rank 0 writes.
    """
    job, fabric = s.job, s.fabric
    raw = unwrap(s.model)
    weights = model_state_dict(fabric, s.model)
    if job.adapter is not None:
        keys = {clean_name(k) for k in adapter_keys(raw)}  # FSDP's units rename the modules they wrap
        weights, weights_name = {k: v for k, v in weights.items() if k in keys}, LORA_WEIGHTS_NAME
    else:
        weights_name = WEIGHTS_NAME

    def write(tmp: Path) -> None:
        save_state_dict({k: v.detach().cpu() for k, v in weights.items()}, tmp / weights_name)
        raw.config.save(tmp / "model_config.yaml")
        copy_support_files(job.checkpoint_dir, tmp)
        # Absolute base path and the resolved precision, so merge/generate work from any directory.
        hparams = {**plain(job.hparams), "checkpoint_dir": str(Path(job.checkpoint_dir).resolve()),
                   "precision": job.precision, "mode": job.mode, "metrics": dict(s.metrics)}
        (tmp / "hyperparameters.yaml").write_text(yaml.safe_dump(hparams, sort_keys=False))
        save_prompt_style(s.prompt_style, tmp)
        if s.dropbp is not None:  # the rates, sensitivities and FLOPs this run trained with
            (tmp / "dropbp.yaml").write_text(yaml.safe_dump(s.dropbp.summary(), sort_keys=False))
        if state is not None:
            torch.save({**state, "metrics": dict(s.metrics)}, tmp / ckpt.STATE_NAME)

    if fabric.is_global_zero:
        ckpt.write_checkpoint(Path(target), write)
        fabric.print(f"Saved {target}")
    fabric.barrier()
    return Path(target)
