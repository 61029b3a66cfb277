"""The one fine-tuning loop, shared by finetune/full.py, lora.py and qlora.py, and its helpers.

A script builds a `FinetuneJob` (what to train and how) and calls `run`. Fabric owns devices, precision and
launching; this module owns data order, accumulation, the schedule, evaluation, checkpoints and resume.
"""

from __future__ import annotations

import math
import os
import resource
import time
import warnings
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import yaml

from lit_model.args import BAdamArgs, DataArgs, DropBPArgs, EvalArgs, TrainArgs
from lit_model.checkpoint_io import LORA_WEIGHTS_NAME
from lit_model.config import Config
from lit_model.data import IGNORE_INDEX, BatchIterator
from lit_model.fingerprint import fingerprint_problems, run_fingerprint
from lit_model.interrupts import deferred_interrupt
from lit_model.memory import count_parameters
from lit_model.peft.base import adapter_keys
from lit_model.peft.checkpoint import load_adapters
from lit_model.model import GPT
from lit_model.prompts import resolve_prompt_style
from lit_model.precision import canonical, compute_dtype, default_precision, describe, param_dtype
from lit_model import resume as ckpt
from lit_model.cli import script_main  # noqa: F401 (re-exported: the scripts import it from here)

DEMO_CHECKPOINT = Path(__file__).resolve().parent.parent / "checkpoints" / "demo"


@dataclass
class FinetuneJob:
    """Everything a fine-tuning script decided. `mode` is "full" or "lora"; QLoRA is "lora" with `quantize` set."""

    mode: str
    checkpoint_dir: Path
    out_dir: Path
    precision: Optional[str]
    devices: int
    seed: int
    data: DataArgs
    train: TrainArgs
    eval: EvalArgs
    lora: Any = None  # lit_model.lora.LoRAConfig for mode "lora"
    quantize: Optional[str] = None
    resume: Optional[str] = None  # "auto", a step-NNNNNN directory, or None
    dropbp: DropBPArgs = field(default_factory=DropBPArgs)
    optimizer: str = "adamw"  # adamw | badam | badam_ratio (the last two: full fine-tuning only)
    badam: BAdamArgs = field(default_factory=BAdamArgs)
    hparams: dict[str, Any] = field(default_factory=dict)  # the script's arguments, saved as hyperparameters.yaml
    num_nodes: int = 1
    strategy: str = "auto"  # auto | ddp | fsdp (see make_strategy)
    overwrite: bool = False  # a fresh run may clear an out_dir that holds another run's checkpoints

    @property
    def world_size(self) -> int:
        """Processes over all nodes: one per device."""
        return self.devices * self.num_nodes


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


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or inf; the weights were not updated with it."""


class LossInForward(torch.nn.Module):
    """The GPT with its loss computed inside one forward: the root module FSDP wraps.

    FSDP gathers a unit's weights for the unit's forward (and again for its backward) only, so the LM head, which the
    chunked loss applies itself, must run inside the root's forward. Without `target` this is the GPT's forward
    (logits or hidden states), for validation and generation; `config` and the KV-cache methods pass through.
    """

    def __init__(self, gpt: GPT) -> None:
        super().__init__()
        self.gpt = gpt

    @property
    def config(self) -> Config:
        return self.gpt.config

    def set_kv_cache(self, *args: Any, **kwargs: Any) -> None:
        self.gpt.set_kv_cache(*args, **kwargs)

    def clear_kv_cache(self) -> None:
        self.gpt.clear_kv_cache()

    def forward(
        self, idx: torch.Tensor, input_pos: Optional[torch.Tensor] = None, drop_mask: Any = None,
        return_hidden: bool = False, target: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Mean cross-entropy over the labels of `target` (B, T) that are not IGNORE_INDEX; without it, GPT's output."""
        if target is None:
            return self.gpt(idx, input_pos, drop_mask, return_hidden)
        from lit_model.loss import head_loss

        return head_loss(self.gpt.lm_head, self.gpt(idx, drop_mask=drop_mask, return_hidden=True), target)


def unwrap(model: Any) -> GPT:
    """The GPT inside Fabric's wrapper (and inside `LossInForward` under FSDP)."""
    module = model.module
    return module.gpt if isinstance(module, LossInForward) else module


def run(job: FinetuneJob) -> dict[str, float]:
    """Validate the job, build model and data, train (or resume), evaluate and save `out_dir/final`.

    The output directory is locked for the whole run (a second run there fails at once), what killed runs left in it
    is removed, and a fresh run refuses a directory that holds another run's checkpoints (--overwrite true clears
    them). Returns the final metrics (validation loss, exact match before/after when enabled, training time).
    """
    from lit_model.run_lock import OutDirLock, rank_from_env

    job.precision = job.precision or default_precision(job.quantize is not None)
    validate_job(job)
    job.precision = canonical(job.precision)
    out_dir = Path(job.out_dir)
    # Rank 0 is the launching process (Fabric's launcher starts the others with a rank in their environment).
    with OutDirLock(out_dir, rank=rank_from_env()) as lock:
        resume_from = ckpt.resolve_resume(job.resume, out_dir)
        if lock.held:
            ckpt.cleanup_stale(out_dir)
            claim_out_dir(out_dir, resume_from, job.overwrite)
        return _run(job, resume_from)


def check_targets(data: Any, name: str, max_seq_length: int, fabric: Any) -> None:
    """Stop when no sample of a split has an answer token left to learn from (every prompt fills max_seq_length):
    the run would train on nothing and report a validation loss of 0. Warn when only some have none."""
    missing = data.num_without_targets
    if not missing:
        return
    fix = (f"--train.max_seq_length {data.length_for_targets} would keep at least one answer token in each (the "
           f"longest such prompt is {data.length_for_targets - 1} tokens)")
    if missing == len(data):
        raise ValueError(f"None of the {len(data)} {name} samples has an answer token within --train.max_seq_length "
                         f"{max_seq_length}: their prompts fill it. {fix[0].upper() + fix[1:]}; or shorten the prompts.")
    fabric.print(f"Warning: {missing} of {len(data)} {name} samples have no answer token within {max_seq_length} tokens "
                 f"and teach nothing; {fix}")


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
    import shutil

    for path in (*previous, out_dir / "logs"):
        shutil.rmtree(path, ignore_errors=True)


def _run(job: FinetuneJob, resume_from: Optional[Path]) -> dict[str, float]:
    """`run` inside the output directory's lock."""
    from lightning.fabric import Fabric

    from lit_model.data import SFTDataset
    from lit_model.evaluation import exact_match
    from lit_model.tokenizer import Tokenizer

    fabric = Fabric(devices=job.devices, num_nodes=job.num_nodes, strategy=make_strategy(job), precision=job.precision,
                    loggers=make_loggers(Path(job.out_dir)))
    if not os.environ.get("LT_CLI_USED"):  # `fabric run` started the processes already and forbids a second launch
        fabric.launch()
    fabric.seed_everything(job.seed)
    # What Fabric actually runs: it turns 16-mixed into bf16-mixed on CPU (fp16 autocast is CUDA-only).
    job.precision = canonical(getattr(fabric.strategy.precision, "precision", job.precision))
    fabric.print(describe(job.precision))
    tokenizer = Tokenizer(job.checkpoint_dir)
    config = Config.from_checkpoint(job.checkpoint_dir)
    prompt_style, style_source = resolve_prompt_style(job.data.prompt_style, job.checkpoint_dir,
                                                      config.hf_repo or config.name)
    fabric.print(f"Prompts: {style_source}")
    with fabric.rank_zero_first():  # the demo data set is written by rank 0 before the others read it
        train_records, val_records, is_demo = load_records_for(job, config)
    max_seq_length = min(job.train.max_seq_length or config.block_size, config.block_size)

    with fabric.rank_zero_first():
        model = build_model(job)
    if resume_from is not None:
        load_trained_weights(model, resume_from, job.mode)
    trainable, total = count_parameters(model)
    fabric.print(f"Parameters: {trainable:,} trainable of {total:,} ({100 * trainable / total:.3f}%)")

    train_data = SFTDataset(train_records, tokenizer, prompt_style, max_seq_length, job.data.mask_prompt)
    val_data = SFTDataset(val_records, tokenizer, prompt_style, max_seq_length, job.data.mask_prompt)
    for name, ds in (("train", train_data), ("validation", val_data)):
        if ds.num_truncated:
            fabric.print(f"Note: {ds.num_truncated} of {len(ds)} {name} samples truncated to {max_seq_length} tokens")
        check_targets(ds, name, max_seq_length, fabric)
    steps_per_epoch = max(1, len(train_data) // job.train.global_batch_size)
    loop = LoopState(max_steps=job.train.max_steps or job.train.epochs * steps_per_epoch)
    fabric.print(f"Data: {len(train_data)} train / {len(val_data)} validation samples; {loop.max_steps} steps")
    if fabric.world_size > 1:
        accum = job.train.global_batch_size // (job.train.micro_batch_size * fabric.world_size)
        nodes = f"{job.num_nodes} node" + ("s" if job.num_nodes > 1 else "")
        fabric.print(f"Distributed: {fabric.world_size} processes ({job.devices} devices x {nodes}), "
                     f"{strategy_name(job)}; one optimizer step = {job.train.global_batch_size} samples = "
                     f"{job.train.micro_batch_size} per micro-batch x {accum} accumulated x {fabric.world_size} ranks")

    model = fabric.setup(LossInForward(model) if is_fsdp(fabric) else model)
    micro_per_step = job.train.global_batch_size // (job.train.micro_batch_size * fabric.world_size)
    dropbp = make_dropbp(unwrap(model), job.dropbp, job.seed,
                         warmup_draws=round(job.dropbp.warmup * loop.max_steps) * micro_per_step)
    optimizer = fabric.setup_optimizers(make_optimizer(model, job, len(train_data), dropbp))
    if job.optimizer != "adamw":  # BAdam froze all but the active block (or share) just now
        active, total = count_parameters(model)
        fabric.print(f"{job.optimizer}: {active:,} of {total:,} parameters train at a time")
    scheduler = make_scheduler(optimizer, job, loop.max_steps, dropbp)
    batches = BatchIterator(len(train_data), job.train.micro_batch_size, job.seed, fabric.global_rank,
                            fabric.world_size, step_samples=job.train.global_batch_size)
    # Under FSDP the unwrapped module holds shards: generation must go through the wrapper, which gathers them.
    inference_model = model if is_fsdp(fabric) else model.module
    if is_fsdp(fabric):
        # FSDP initialises itself at its first forward; under generation's inference_mode its buffers would become
        # inference tensors that the training backward cannot use ("The `grad_fn` is needed ..."): go first here.
        with torch.no_grad():
            model(torch.zeros((1, 1), dtype=torch.long, device=fabric.device))
    n_exact = job.eval.exact_match if job.eval.exact_match is not None else (100 if is_demo else 0)
    em_records = val_records[:n_exact]

    def evaluate_em() -> float:
        return exact_match(inference_model, tokenizer, prompt_style, em_records, job.eval.max_new_tokens, fabric.device)

    fingerprint = run_fingerprint(
        base_weights=Path(job.checkpoint_dir) / "lit_model.pth", model_config=config, mode=job.mode, lora=job.lora,
        quantize=job.quantize, optimizer=job.optimizer, badam=job.badam, train=job.train, seed=job.seed,
        records=train_records, prompt_style=prompt_style, max_seq_length=max_seq_length,
        mask_prompt=job.data.mask_prompt, dropbp=job.dropbp, max_steps=loop.max_steps)
    metrics: dict[str, float] = {}
    if resume_from is not None:
        state = ckpt.load_training_state(resume_from)
        check_resume(state, fingerprint, loop.max_steps, job.train.allow_new_schedule, resume_from)
        restore(state, optimizer, scheduler, batches, loop, dropbp, fabric, model)
        if job.train.allow_new_schedule:  # the saved optimizer and scheduler carry the old constants
            apply_schedule(job.train, optimizer, scheduler)
        metrics.update(state.get("metrics", {}))
        fabric.logger.begin(loop.step)  # continue metrics.csv after the checkpoint's step
        fabric.print(f"Resumed from {resume_from} at step {loop.step} of {loop.max_steps}")
    elif em_records and job.eval.exact_match_before:
        metrics["exact_match_before"] = evaluate_em()
        fabric.print(f"Held-out exact match before fine-tuning: {metrics['exact_match_before']:.3f}")

    def save(target: Path, state: Optional[dict[str, Any]]) -> Path:
        return save_checkpoint(fabric, model, job, prompt_style, target, state, metrics, dropbp)

    sample_record = val_records[0] if val_records else train_records[0]
    from torch.nn.parallel import DistributedDataParallel

    ddp = isinstance(model._forward_module, DistributedDataParallel)  # also with one process (--strategy ddp)
    session = Session(fabric, model, optimizer, scheduler, batches, train_data, val_data, job, tokenizer, prompt_style,
                      sample_record, dropbp, inference_model, fill_unused=ddp and dropbp is not None,
                      manual_sync=fabric.world_size > 1 and job.optimizer != "adamw", fingerprint=fingerprint)
    loop_time_before = loop.train_time  # a resumed run's earlier training time is in its checkpoint
    if resume_from is None and job.eval.initial_validation:  # the baseline of the final validation loss
        metrics["val_loss_before"] = session.validate()
        loop.val_history.append((0, metrics["val_loss_before"]))
        fabric.print(f"Validation loss before fine-tuning: {metrics['val_loss_before']:.4f}")
    t0 = time.perf_counter()
    fit(session, loop, save)
    # Training alone (steps and calibration) and everything the loop did besides (validation, samples, saving).
    metrics["train_time_s"], metrics["calibration_time_s"] = loop.train_time, loop.calibration_time
    metrics["loop_other_time_s"] = time.perf_counter() - t0 - (loop.train_time - loop_time_before)
    if dropbp is not None:
        check_same_on_all_ranks(fabric, dropbp_fingerprint(dropbp), "DropBP masks (generator, draw counts, rates)")
        if fabric.world_size > 1:
            fabric.print(f"DropBP: the same {dropbp.steps} masks and rates on all {fabric.world_size} ranks")
    metrics["val_loss"] = session.validate()
    loop.val_history.append((loop.step, metrics["val_loss"]))
    fabric.print(f"Final validation loss {metrics['val_loss']:.4f}, perplexity {math.exp(min(metrics['val_loss'], 50)):.2f}")
    if em_records:
        metrics["exact_match_after"] = evaluate_em()
        before = metrics.get("exact_match_before")
        fabric.print(
            f"Held-out exact match after fine-tuning: {metrics['exact_match_after']:.3f}"
            + (f" (before: {before:.3f}, {len(em_records)} samples)" if before is not None else "")
        )
    fabric.log_dict({k: v for k, v in metrics.items()}, step=loop.step)
    session.print_sample()
    save(Path(job.out_dir) / "final", None)
    if fabric.is_global_zero:
        write_plot(loop, Path(job.out_dir) / "loss.png", config.name)
    for logger in fabric.loggers:
        logger.finalize("success")  # flush metrics.csv
    return metrics


@dataclass
class Session:
    """The live objects of one training run, passed to the loop as one value."""

    fabric: Any
    model: Any
    optimizer: Any
    scheduler: Any
    batches: BatchIterator
    train_data: Any
    val_data: Any
    job: FinetuneJob
    tokenizer: Any
    prompt_style: Any
    sample_record: dict
    dropbp: Any = None  # lit_model.dropbp.DropBPHandler when --dropbp.rate > 0
    inference_model: Any = None  # what generation runs on: the unwrapped GPT, or the FSDP wrapper that gathers it
    manual_sync: bool = False  # BAdam on several ranks: no DDP wrapper, the loop all-reduces the optimizer's gradients
    fill_unused: bool = False  # DDP with DropBP: give dropped parameters zero gradients for the reducer, then None
    fingerprint: dict[str, Any] = field(default_factory=dict)  # what determines the run (lit_model.fingerprint)

    def validate(self) -> float:
        """Token-weighted mean validation loss (every rank computes the same)."""
        from lit_model.evaluation import validate

        def batch_loss(input_ids: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            return forward_loss(self.fabric, self.model, input_ids, target)

        return validate(self.fabric, self.model, self.val_data, self.job.train.micro_batch_size, batch_loss,
                        self.job.eval.max_iters)

    def print_sample(self) -> None:
        from lit_model.evaluation import complete

        record = self.sample_record
        text = complete(self.inference_model or self.model.module, self.tokenizer, self.prompt_style, record,
                        self.job.eval.max_new_tokens, self.fabric.device)
        shown = record["instruction"] + (f" [{record['input']}]" if record.get("input") else "")
        self.fabric.print(f"Sample: {shown!r} -> {text!r}")

    def snapshot(self) -> dict[str, Any]:
        """RNG states, data position and DropBP generator: what the next step will consume."""
        return {"rng": ckpt.rng_states(), "data": self.batches.state_dict(),
                "dropbp": self.dropbp.state_dict() if self.dropbp is not None else None}

    def state(self, loop: LoopState, snapshot: dict[str, Any]) -> dict[str, Any]:
        """Everything beyond the weights that resume needs (plain containers and tensors).

        Collective under several processes (every rank calls it): the optimizer state is gathered whole under FSDP,
        and every rank's RNG states are kept, since dropout draws differ between ranks that see different shapes.
        """
        if self.dropbp is not None:
            check_same_on_all_ranks(self.fabric, dropbp_fingerprint(self.dropbp), "DropBP masks")
        return {
            "step": loop.step, "tokens": loop.tokens, "max_steps": loop.max_steps, "calibrated": loop.calibrated,
            "train_time": loop.train_time, "calibration_time": loop.calibration_time,
            "train_history": loop.train_history, "val_history": loop.val_history,
            "optimizer": optimizer_state(self.fabric, self.model, self.optimizer),
            "scheduler": self.scheduler.state_dict(), **snapshot,
            "rng_per_rank": gather_objects(self.fabric, snapshot["rng"]), "world_size": self.fabric.world_size,
            "fingerprint": self.fingerprint,
        }

    def calibrate_dropbp(self, loop: LoopState) -> None:
        """Re-allocate DropBP rates from the gradient sensitivity measured on the next micro-batches.

        The samples are the next `sensitivity_samples` micro-batches of the single-process order, whatever the number
        of ranks. With several ranks each measures its share of them on the unwrapped module (DDP's reducer expects
        `.backward()`, not `torch.autograd.grad`), the sensitivities are summed across ranks, and rank 0's rates are
        broadcast: the rates, and with them the masks, are identical everywhere and equal the 1-process ones.
        """
        from lit_model.data import collate
        from lit_model.dropbp import allocate
        from lit_model.loss import head_loss

        fabric, raw, handler, args = self.fabric, unwrap(self.model), self.dropbp, self.job.dropbp
        train = self.job.train
        # Peek at upcoming samples without moving the data position: training still sees them in order.
        order = BatchIterator(len(self.train_data), train.micro_batch_size, self.job.seed,
                              step_samples=train.global_batch_size)
        order.load_state_dict(self.batches.state_dict())
        samples = [collate([self.train_data[i] for i in next(order)]) for _ in range(args.sensitivity_samples)]
        seq_len = samples[0]["input_ids"].size(1) - 1

        def backprop_for(batch: dict[str, torch.Tensor]) -> Callable[[Any], torch.Tensor]:
            input_ids, target = fabric.to_device(batch["input_ids"][:, :-1]), fabric.to_device(batch["labels"][:, 1:])

            def backprop(mask: Any) -> torch.Tensor:
                with fabric.autocast():  # the unwrapped module: apply the precision's autocast ourselves
                    return head_loss(raw.lm_head, raw(input_ids, drop_mask=mask, return_hidden=True), target)

            return backprop

        raw.train()
        if fabric.world_size == 1:
            handler.sensitivity_based_drop_bp([backprop_for(b) for b in samples], target=args.rate,
                                              min_rate=args.min_rate, allocator=args.allocator, seq_len=seq_len,
                                              method=args.sensitivity)
        else:
            allocate([1.0] * handler.n_branches, handler.flops, args.rate, args.min_rate, args.allocator)  # fail fast
            mine = samples[fabric.global_rank :: fabric.world_size]
            total = torch.zeros(handler.n_branches, dtype=torch.float64)
            if mine:  # compute_sensitivity averages over its samples: undo that to sum over all ranks
                total += torch.tensor(handler.measure([backprop_for(b) for b in mine], args.sensitivity)[0]) * len(mine)
            total = fabric.all_reduce(total.to(fabric.device), reduce_op="sum").cpu() / len(samples)
            handler.set_seq_len(seq_len)
            rates = fabric.broadcast(allocate(total.tolist(), handler.flops, args.rate, args.min_rate, args.allocator))
            handler.sensitivities = total.tolist()
            handler.set_drop_rates(rates, target=args.rate)
        check_same_on_all_ranks(fabric, dropbp_fingerprint(handler), "DropBP rates after calibration")
        loop.calibrated = True
        summary = handler.summary()
        fabric.log_dict(summary, step=loop.step)
        rates = ", ".join(f"{r:.2f}" for r in handler.drop_rates)
        fabric.print(f"DropBP rates from sensitivity at step {loop.step} (FLOPs-weighted mean "
                     f"{summary['dropbp/mean_rate']:.3f}): [{rates}]")


def fit(s: Session, loop: LoopState, save: Callable[[Path, Optional[dict[str, Any]]], Path]) -> None:
    """The training loop: accumulate micro-batches into optimizer steps, log, validate, checkpoint, stop safely."""
    from tqdm import tqdm

    from lit_model.checkpointing import apply_activation_checkpointing
    from lit_model.data import collate

    fabric, model, args, out_dir = s.fabric, s.model, s.job.train, Path(s.job.out_dir)
    accum = args.global_batch_size // (args.micro_batch_size * fabric.world_size)
    if args.activation_checkpointing:
        apply_activation_checkpointing(unwrap(model), every=args.activation_checkpointing,
                                       offload=args.offload_activations)
    model.train()
    bar = tqdm(total=loop.max_steps, initial=loop.step, desc="Fine-tuning", disable=not fabric.is_global_zero,
               dynamic_ncols=True)
    time_start, tokens_start = loop.train_time, loop.tokens
    calibrate_at = int(s.job.dropbp.sensitivity_at * loop.max_steps) if s.job.dropbp.sensitivity_at > 0 else None
    # RNG and data position as of the last completed step: what an interrupted run saves next to its weights.
    snapshot = s.snapshot()
    try:
        while loop.step < loop.max_steps:
            t_step = time.perf_counter()
            if s.dropbp is not None and calibrate_at is not None and loop.step >= calibrate_at and not loop.calibrated:
                s.calibrate_dropbp(loop)
                loop.calibration_time += time.perf_counter() - t_step
                snapshot = s.snapshot()
            micro_batches = [collate([s.train_data[i] for i in next(s.batches)]) for _ in range(accum)]
            # Normalise by the tokens of the whole optimizer step on all ranks, so that accumulation and data
            # parallelism both equal one large batch; the input tokens only feed the throughput.
            n_tokens, n_inputs = global_sum(fabric, [
                sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in micro_batches),
                sum(b["input_ids"][:, :-1].numel() for b in micro_batches)])
            step = loop.step + 1
            if n_tokens == 0:  # the same on every rank: all skip together
                warnings.warn(f"Step {step}: every label is masked (prompts longer than max_seq_length?); skipped")
                loop.step = step
                snapshot = s.snapshot()
                continue
            step_loss = backward_step(s, micro_batches, n_tokens)
            loop.tokens += n_inputs
            if not torch.isfinite(step_loss):  # checked before the update, so the weights stay good
                raise NonFiniteLossError(non_finite_message(float(step_loss), step, loop.last_checkpoint))
            with deferred_interrupt():  # Ctrl-C waits until the step is whole: weights, state, counters, snapshot
                if args.max_norm is not None:
                    fabric.clip_gradients(model, s.optimizer, max_norm=args.max_norm)
                s.optimizer.step()
                s.optimizer.zero_grad(set_to_none=True)
                s.scheduler.step()
                loop.step = step
                loop.train_time += time.perf_counter() - t_step
                snapshot = s.snapshot()
                if step % args.log_interval == 0 or step == loop.max_steps:  # the step's row belongs to it too
                    tokens_per_s = (loop.tokens - tokens_start) / max(loop.train_time - time_start, 1e-9)
                    log_step(s, loop, float(step_loss), tokens_per_s, bar)
            bar.update(1)
            if step % s.job.eval.interval == 0 and step < loop.max_steps:
                val_loss = s.validate()
                loop.val_history.append((step, val_loss))
                fabric.log_dict({"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50)),
                                 "train_time_s": loop.train_time}, step=step)
                bar.write(f"step {step}: validation loss {val_loss:.4f}, perplexity {math.exp(min(val_loss, 50)):.2f}")
                s.print_sample()
                model.train()
            if args.save_interval and step % args.save_interval == 0:
                state = s.state(loop, snapshot)
                loop.last_checkpoint = save(out_dir / ckpt.step_dir_name(step), state)
                if fabric.is_global_zero:
                    ckpt.prune(out_dir, args.keep_last)
    except KeyboardInterrupt:
        # The weights are those of the last completed step (an update is never interrupted half-way, see
        # deferred_interrupt); the snapshot holds that step's RNG states, data position and DropBP generator.
        bar.write(f"Interrupted: saving step {loop.step} before exiting")
        save(out_dir / ckpt.step_dir_name(loop.step), s.state(loop, snapshot))
        raise
    finally:
        bar.close()


def backward_step(s: Session, micro_batches: list[dict[str, torch.Tensor]], n_tokens: int) -> torch.Tensor:
    """Forward and backward of this rank's micro-batches of one optimizer step, gradients synchronised over ranks.

    n_tokens: the label tokens of the whole step on all ranks. Returns the step's loss, identical on every rank.
    Gradients: DDP/FSDP average them over ranks during the last micro-batch's backward (the others skip the sync);
    BAdam's optimizers are stepped on gradients this function all-reduces itself (`Session.manual_sync`).
    """
    fabric, model, world = s.fabric, s.model, s.fabric.world_size
    step_loss = torch.zeros((), device=fabric.device)
    never_reached: Optional[dict[int, torch.nn.Parameter]] = None  # parameters DropBP dropped in every micro-batch
    synced = False
    for i, batch in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        input_ids, target = fabric.to_device(batch["input_ids"][:, :-1]), fabric.to_device(batch["labels"][:, 1:])
        mask = s.dropbp.set_dropped_layers() if s.dropbp is not None else None
        skip_sync = fabric.no_backward_sync(model, enabled=not last) if not s.manual_sync else nullcontext()
        with skip_sync:
            # DDP and FSDP average the ranks' gradients; the world-size factor makes that average the sum over all
            # ranks of (micro-batch loss x its share of the step's tokens), which is the 1-process gradient.
            share = int((target != IGNORE_INDEX).sum()) * world / n_tokens
            loss = forward_loss(fabric, model, input_ids, target, mask) * share
            step_loss += loss.detach()
            if s.fill_unused and mask is not None:
                dropped = {id(p): p for p in dropped_parameters(unwrap(model), mask)}
                never_reached = {k: p for k, p in dropped.items() if never_reached is None or k in never_reached}
                if last and dropped:  # DDP's reducer waits for a gradient of every parameter: give the dropped ones 0
                    loss = loss + zero_gradient_term(list(dropped.values()))
            if loss.grad_fn is not None:  # nothing trainable reached this micro-batch: skip only its backward
                fabric.backward(loss)
                synced = synced or last
    if world > 1 and (s.manual_sync or not synced):
        # BAdam; or DDP/FSDP when the last micro-batch had no backward, which the zero-gradient term rules out for
        # DDP with DropBP, and which needs DropBP (refused with FSDP) in the first place.
        assert s.manual_sync or not is_fsdp(fabric), "FSDP skipped the backward of a step's last micro-batch"
        all_reduce_gradients(fabric, [p for group in s.optimizer.param_groups for p in group["params"]])
    for p in (never_reached or {}).values():  # zero-filled for DDP only: no gradient, as on one device
        p.grad = None
    return fabric.all_reduce(step_loss, reduce_op="sum") / world if world > 1 else step_loss


def log_step(s: Session, loop: LoopState, loss: float, tokens_per_s: float, bar: Any) -> None:
    record = {"loss": loss, "lr": s.scheduler.get_last_lr()[0], "tokens_per_s": tokens_per_s,
              "train_time_s": loop.train_time, "peak_memory_gb": peak_memory_bytes(s.fabric.device) / 1e9}
    s.fabric.log_dict(record, step=loop.step)
    loop.train_history.append((loop.step, loss))
    bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_s:.0f}", refresh=False)


def forward_loss(
    fabric: Any, model: Any, input_ids: torch.Tensor, target: torch.Tensor, drop_mask: Any = None
) -> torch.Tensor:
    """One micro-batch's mean cross-entropy through Fabric's wrapper (inside the forward for `LossInForward`)."""
    from lit_model.loss import head_loss

    if isinstance(model.module, LossInForward):
        return model(input_ids, drop_mask=drop_mask, target=target)
    hidden = model(input_ids, drop_mask=drop_mask, return_hidden=True)
    with fabric.autocast():  # the head's matmuls in the mixed-precision dtype, as inside the model
        return head_loss(model.module.lm_head, hidden, target)


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


def lr_schedule(args: TrainArgs, max_steps: int) -> Callable[[int], float]:
    """Linear warm-up to 1, then cosine decay to `min_lr_ratio` at `max_steps` (a LambdaLR multiplier)."""
    warmup = min(args.lr_warmup_steps, max_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
        return args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def make_dropbp(model: GPT, args: DropBPArgs, seed: int, warmup_draws: int = 0) -> Any:
    """The DropBP handler (uniform rates until calibration), or None when --dropbp.rate is 0.

    warmup_draws: masks (micro-batches) over which the rates ramp up from 0 (--dropbp.warmup of the steps)."""
    if args.rate == 0:
        return None
    from lit_model.dropbp import DropBPHandler

    return DropBPHandler(model, drop_rate=args.rate, seed=seed, sampler=args.sampler, warmup_draws=warmup_draws)


def adamw(params: list[torch.nn.Parameter], **hyper: Any) -> torch.optim.AdamW:
    """torch's AdamW with its fused kernel wherever every parameter allows it (floating point, on CPU or CUDA).

    torch picks the fused kernel on no device by default (foreach on CUDA, a per-tensor loop on CPU); one kernel over
    all tensors is much faster where the optimizer step matters, full fine-tuning (BENCHMARKS.md, "what made the step
    fast"). Its results differ from the loop's by rounding (one float32 ulp); BAdam keeps torch's default, which
    the reference `badam` package uses and our parity tests reproduce bit for bit.
    """
    fused = bool(params) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(params, fused=fused or None, **hyper)


def make_optimizer(model: torch.nn.Module, job: FinetuneJob, n_samples: int, dropbp: Any = None
                   ) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters, or BAdam's block-coordinate wrappers around it (full fine-tuning).

    With --dropbp.scale_lr, one parameter group per DropBP branch (its "dropbp_branch" key names it; -1 for the
    parameters outside the blocks), so that `make_scheduler` can give each its own learning-rate factor.
    """
    args, badam = job.train, job.badam
    hyper = dict(lr=args.learning_rate, weight_decay=args.weight_decay, betas=(args.beta1, args.beta2))
    if job.optimizer == "adamw":
        params = [p for p in model.parameters() if p.requires_grad]
        if dropbp is None or not job.dropbp.scale_lr:
            return adamw(params, **hyper)
        owner = dropbp.branch_of()
        groups: dict[int, list[torch.nn.Parameter]] = {}
        for p in params:
            groups.setdefault(owner.get(id(p), -1), []).append(p)
        optimizer = adamw(params, **hyper)  # the fused-kernel decision over all parameters, then the groups
        return type(optimizer)([{"params": ps, "dropbp_branch": b} for b, ps in sorted(groups.items())],
                               fused=optimizer.defaults.get("fused"), **hyper)
    from lit_model.badam import BlockOptimizer, BlockOptimizerRatio, default_switch_every

    named = list(model.named_parameters())
    if job.optimizer == "badam_ratio":
        return BlockOptimizerRatio([p for _, p in named], named, update_ratio=badam.update_ratio,
                                   switch_every=badam.switch_block_every or 100, mask_mode=badam.mask_mode,
                                   include_embedding=badam.include_embedding, include_lm_head=badam.include_lm_head,
                                   seed=job.seed, **hyper)
    n_blocks = len(unwrap(model).transformer.h) + badam.include_embedding + badam.include_lm_head
    switch = badam.switch_block_every or default_switch_every(n_samples, args.global_batch_size, n_blocks)
    return BlockOptimizer(torch.optim.AdamW([p for _, p in named], **hyper), named, switch_block_every=switch,
                          start_block=badam.start_block, switch_mode=badam.switch_mode,
                          active_modules=badam.active_modules, include_embedding=badam.include_embedding,
                          include_lm_head=badam.include_lm_head, seed=job.seed)


def make_scheduler(optimizer: Any, job: FinetuneJob, max_steps: int, dropbp: Any = None) -> Any:
    """Warm-up and cosine decay for every parameter group; with --dropbp.scale_lr, each branch's group times its
    DropBP factor (`DropBPHandler.lr_scale`, read at every step: it follows warm-up and calibration)."""
    schedule = lr_schedule(job.train, max_steps)
    branches = [g.get("dropbp_branch", -1) for g in optimizer.param_groups]
    if dropbp is None or not job.dropbp.scale_lr or all(b < 0 for b in branches):
        return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    cap = job.dropbp.max_lr_scale

    def factor(branch: int) -> Callable[[int], float]:
        return lambda step: schedule(step) * (dropbp.lr_scale(branch, cap) if branch >= 0 else 1.0)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, [factor(b) for b in branches])


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


def restore(
    state: dict[str, Any], optimizer: Any, scheduler: Any, batches: BatchIterator, loop: LoopState, dropbp: Any,
    fabric: Any = None, model: Any = None,
) -> None:
    """Put optimizer, schedule, data position, RNG, DropBP and loop counters back as they were when saved.

    A checkpoint from any number of processes resumes on any other: the optimizer state is whole (not sharded), the
    data position counts samples of the global order; each rank takes its own saved RNG states when the world size
    is the same, else rank 0's.
    """
    load_optimizer_state(fabric, model, optimizer, state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    batches.load_state_dict(state["data"])
    rank, world = (fabric.global_rank, fabric.world_size) if fabric is not None else (0, 1)
    per_rank = state.get("rng_per_rank")
    ckpt.set_rng_states(per_rank[rank] if per_rank and len(per_rank) == world else state["rng"])
    if (dropbp is None) != (state.get("dropbp") is None):
        raise ValueError("--dropbp.rate must be 0 in both or positive in both the saved run and the resumed one")
    if dropbp is not None:
        dropbp.load_state_dict(state["dropbp"])
    loop.calibrated = bool(state.get("calibrated", False))
    loop.step, loop.tokens = int(state["step"]), int(state["tokens"])
    loop.train_time = float(state.get("train_time", 0.0))  # absent in checkpoints of earlier versions
    loop.calibration_time = float(state.get("calibration_time", 0.0))
    loop.train_history = [tuple(x) for x in state["train_history"]]
    loop.val_history = [tuple(x) for x in state["val_history"]]


# ---- several processes: strategy, collectives, sharded state ---------------------------------------------------------


STRATEGIES = ("auto", "ddp", "fsdp")


def make_strategy(job: FinetuneJob) -> Any:
    """Fabric's strategy for the job: one device, DDP, FSDP (each `Block` one unit), or BAdam's own gradient sync.

    - DDP (`auto` on several devices): `find_unused_parameters=False` even with DropBP; the loop gives the branches
      DropBP dropped zero gradients in the synchronising micro-batch instead (docs/distributed.md has the numbers).
    - FSDP: full sharding, one unit per `Block`, `use_orig_params` (LoRA mixes frozen and trainable tensors in a
      unit); checkpoints gather full state dicts, so their format does not change.
    - BAdam (--optimizer badam/badam_ratio): the DDP processes without the DDP wrapper; the loop all-reduces the
      gradients of the optimizer's tensors (the active block's, or the selected entries), nothing else.
    """
    if job.world_size == 1 and job.strategy == "auto":
        return "auto"
    if job.optimizer != "adamw":
        return _loop_synced_ddp_strategy()
    if job.strategy == "fsdp":
        return _fsdp_strategy()
    from lightning.fabric.strategies import DDPStrategy

    # gradient_as_bucket_view: gradients live in DDP's communication buckets, no second copy.
    return DDPStrategy(find_unused_parameters=False, gradient_as_bucket_view=True)


def strategy_name(job: FinetuneJob) -> str:
    """How the job runs on several processes, in words."""
    if job.optimizer != "adamw":
        return "data parallel with BAdam's gradients all-reduced by the loop"
    return "FSDP (full sharding, one unit per block)" if job.strategy == "fsdp" else "DDP"


def _fsdp_strategy() -> Any:
    from lightning.fabric.strategies import FSDPStrategy

    from lit_model.model import Block

    kwargs: dict[str, Any] = dict(auto_wrap_policy={Block}, sharding_strategy="FULL_SHARD", state_dict_type="full",
                                  use_orig_params=True)
    if torch.cuda.is_available():
        return FSDPStrategy(**kwargs)

    class CPUFSDPStrategy(FSDPStrategy):
        """FSDP on CPU processes (gloo), which torch supports but Lightning refuses: only for tests and debugging.

        Lightning rejects the FSDPStrategy *type* on CPU and passes FSDP no device, which torch then looks for on an
        accelerator; naming the CPU device is all it takes. The training code paths are those of the GPU strategy.
        """

        def setup_module(self, module: torch.nn.Module) -> torch.nn.Module:
            from torch.distributed.fsdp import FullyShardedDataParallel

            return FullyShardedDataParallel(
                module, cpu_offload=self.cpu_offload, mixed_precision=self.mixed_precision_config,
                sharding_strategy=self.sharding_strategy, device_id=torch.device("cpu"), **self._fsdp_kwargs,
            )

    return CPUFSDPStrategy(**kwargs)


def _loop_synced_ddp_strategy() -> Any:
    from lightning.fabric.strategies import DDPStrategy

    class LoopSyncedDDPStrategy(DDPStrategy):
        """DDP's processes and collectives, without the DDP wrapper: BAdam changes which parameters train every K
        steps, which DDP's buckets (built once, over the parameters requiring grad at wrap time) cannot follow, and
        its fp32-master hooks take the gradients before DDP's reducer would. The loop all-reduces instead."""

        def setup_module(self, module: torch.nn.Module) -> torch.nn.Module:
            return module

    return LoopSyncedDDPStrategy()


def is_fsdp(fabric: Any) -> bool:
    """Whether the model is sharded with FSDP."""
    from lightning.fabric.strategies import FSDPStrategy

    return isinstance(fabric.strategy, FSDPStrategy)


def global_sum(fabric: Any, values: list[int]) -> list[int]:
    """Integers summed over all ranks (one all-reduce); unchanged on one process."""
    if fabric.world_size == 1:
        return values
    total = fabric.all_reduce(torch.tensor(values, dtype=torch.int64, device=fabric.device), reduce_op="sum")
    return [int(v) for v in total.tolist()]


def dropped_parameters(model: GPT, mask: Any) -> list[torch.nn.Parameter]:
    """Trainable parameters of the branches `mask` drops (norm and attention, norm and MLP): they get no gradient."""
    branches = ({"norm_1", "attn"}, {"norm_2", "mlp"})
    out = []
    for block, drops in zip(model.transformer.h, mask):
        for name, p in block.named_parameters():
            if p.requires_grad and any(d and name.split(".", 1)[0] in b for d, b in zip(drops, branches)):
                out.append(p)
    return out


def zero_gradient_term(params: list[torch.Tensor]) -> torch.Tensor:
    """0 in value, with a zero gradient for every tensor in `params` (one element read from each)."""
    return torch.stack([p.reshape(-1)[0].float() for p in params]).sum() * 0.0


def all_reduce_gradients(fabric: Any, tensors: list[torch.Tensor]) -> None:
    """Average the gradients of `tensors` over all ranks, in place: one flat all-reduce per dtype and device.

    Every rank must hold gradients for the same tensors (DropBP's masks are the same on all ranks).
    """
    groups: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for t in tensors:
        if t.grad is not None:
            groups.setdefault((t.grad.dtype, t.grad.device), []).append(t.grad)
    for grads in groups.values():
        flat = fabric.all_reduce(torch.cat([g.reshape(-1) for g in grads]), reduce_op="mean")
        for g, part in zip(grads, flat.split([g.numel() for g in grads])):
            g.copy_(part.view_as(g))


def gather_objects(fabric: Any, obj: Any) -> list[Any]:
    """`obj` of every rank, in rank order (on every rank)."""
    if fabric.world_size == 1:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * fabric.world_size
    dist.all_gather_object(out, obj)
    return out


def dropbp_fingerprint(handler: Any) -> dict[str, Any]:
    """What decides the DropBP masks: generator state, draws so far, realised counts, rates (plain values)."""
    state = handler.state_dict()
    return {"generator": state["generator"].tolist(), "steps": state["steps"], "drop_counts": state["drop_counts"],
            "drop_rates": state["drop_rates"]}


def check_same_on_all_ranks(fabric: Any, value: Any, what: str) -> None:
    """Raise on every rank if `value` differs between ranks (a cheap guard against silently diverging ranks)."""
    if fabric.world_size == 1:
        return
    values = gather_objects(fabric, value)
    different = [r for r, v in enumerate(values) if v != values[0]]
    if different:
        raise RuntimeError(f"{what} differ between rank 0 and rank(s) {different}: the ranks no longer train the same "
                           "model. Every rank must run the same code, seed and arguments.")


def model_state_dict(fabric: Any, model: Any) -> dict[str, torch.Tensor]:
    """The unwrapped model's plain state dict; under FSDP gathered whole (collective; complete on rank 0)."""
    if not is_fsdp(fabric):
        return model.module.state_dict()
    from torch.distributed.fsdp import FullyShardedDataParallel, StateDictType

    with FullyShardedDataParallel.state_dict_type(model._forward_module, StateDictType.FULL_STATE_DICT,
                                                  _full_state_config(fabric)):
        state = model._forward_module.state_dict()
    return {k.removeprefix("gpt."): v for k, v in state.items()}  # LossInForward's attribute: the GPT's own keys


def _full_state_config(fabric: Any, optim: bool = False, loading: bool = False) -> Any:
    from torch.distributed.fsdp import FullOptimStateDictConfig, FullStateDictConfig

    # On a GPU: gathered into CPU memory of rank 0 only. On CPU processes (tests) torch's CPU offload of a CPU tensor
    # crashes (segfault, torch 2.13), and there is nothing to offload: every rank gathers. When loading, every rank
    # has read the whole file itself.
    on_gpu = fabric.device.type != "cpu"
    cls = FullOptimStateDictConfig if optim else FullStateDictConfig
    return cls(offload_to_cpu=on_gpu, rank0_only=on_gpu and not loading)


def optimizer_state(fabric: Any, model: Any, optimizer: Any) -> dict[str, Any]:
    """The optimizer's state dict in torch's single-process format; under FSDP gathered whole (collective).

    FSDP's full optimizer state is keyed by parameter names; re-keyed by position in the optimizer's parameter list,
    it is exactly what the same optimizer on one device saves, so checkpoints resume on any number of devices.
    """
    if not is_fsdp(fabric):
        return optimizer.state_dict()
    from torch.distributed.fsdp import FullyShardedDataParallel, StateDictType

    fsdp = model._forward_module
    with FullyShardedDataParallel.state_dict_type(fsdp, StateDictType.FULL_STATE_DICT, _full_state_config(fabric),
                                                  _full_state_config(fabric, optim=True)):
        named = FullyShardedDataParallel.optim_state_dict(fsdp, optimizer.optimizer)
    if "param_groups" not in named:  # gathered on rank 0 only: the other ranks do not save
        return {}
    order = [name for group in named["param_groups"] for name in group["params"]]
    index = {name: i for i, name in enumerate(order)}
    return {"state": {index[name]: v for name, v in named["state"].items()},
            "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in named["param_groups"]]}


def load_optimizer_state(fabric: Any, model: Any, optimizer: Any, state: dict[str, Any]) -> None:
    """Load `optimizer_state`'s format; under FSDP every rank takes its shard of the whole state."""
    if fabric is None or not is_fsdp(fabric):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.fsdp import FullyShardedDataParallel, StateDictType

    fsdp = model._forward_module
    # The names of the optimizer's parameters, in its order, as FSDP's full state dicts spell them.
    names = {id(p): clean_name(n) for n, p in fsdp.named_parameters()}
    groups = [[names[id(p)] for p in g["params"]] for g in optimizer.optimizer.param_groups]
    order = [n for g in groups for n in g]
    named = {"state": {order[int(i)]: v for i, v in state["state"].items()},
             "param_groups": [{**g, "params": names_g} for g, names_g in zip(state["param_groups"], groups)]}
    with FullyShardedDataParallel.state_dict_type(fsdp, StateDictType.FULL_STATE_DICT,
                                                  _full_state_config(fabric, loading=True),
                                                  _full_state_config(fabric, optim=True, loading=True)):
        sharded = FullyShardedDataParallel.optim_state_dict_to_load(fsdp, optimizer.optimizer, named)
    optimizer.optimizer.load_state_dict(sharded)


def clean_name(name: str) -> str:
    """A parameter name without the wrappers' path components (FSDP units, checkpoint wrappers)."""
    for part in ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod."):
        name = name.replace(part, "")
    return name


# ---- building -------------------------------------------------------------------------------------------------------


def validate_job(job: FinetuneJob) -> None:
    """Check every argument at once; raise one error listing all problems."""
    problems = job.train.problems(job.world_size) + job.eval.problems() + job.data.problems() + job.dropbp.problems()
    problems += distributed_problems(job)
    try:
        canonical(job.precision)
    except ValueError as err:
        problems.append(f"--precision: {err}")
    if job.optimizer not in ("adamw", "badam", "badam_ratio"):
        problems.append(f"--optimizer must be adamw, badam or badam_ratio, got {job.optimizer!r}")
    elif job.optimizer != "adamw":
        problems += job.badam.problems()
        if job.dropbp.rate > 0 and job.dropbp.scale_lr:
            problems.append(f"--dropbp.scale_lr sets learning rates per branch, which --optimizer {job.optimizer} "
                            "manages itself: use --optimizer adamw, or leave scale_lr off")
        if job.mode != "full":
            problems.append(f"--optimizer {job.optimizer} is for full fine-tuning (finetune/full.py)")
    if job.lora is not None:
        problems += job.lora.problems()
    if job.quantize is not None:
        from lit_model.quantize import validate_quantize_precision

        try:
            validate_quantize_precision(job.quantize, job.precision)
        except ValueError as err:
            problems.append(str(err))
    if job.resume is not None and str(job.resume) != "auto":
        from lit_model.errors import CorruptFileError

        try:  # the structure of its files; their checksums are compared once, when the run resolves it
            ckpt.resolve_resume(job.resume, Path(job.out_dir), verify=False)
        except (FileNotFoundError, CorruptFileError) as err:
            problems.append(str(err))
    from lit_model.checkpoint_io import check_checkpoint_dir

    try:
        check_checkpoint_dir(Path(job.checkpoint_dir))
    except FileNotFoundError as err:
        problems.append(str(err))
    if problems:
        raise ValueError("Invalid arguments:\n  - " + "\n  - ".join(problems))


def distributed_problems(job: FinetuneJob) -> list[str]:
    """What cannot run with the job's --devices, --num_nodes and --strategy (messages; empty when fine)."""
    out = []
    if job.devices < 1 or job.num_nodes < 1:
        out.append(f"--devices and --num_nodes must be positive, got {job.devices} and {job.num_nodes}")
    if job.strategy not in STRATEGIES:
        out.append(f"--strategy must be one of {', '.join(STRATEGIES)}, got {job.strategy!r}")
    if job.strategy != "fsdp":
        return out
    if job.quantize is not None:
        out.append("--strategy fsdp cannot shard 4-bit weights (--quantize): FSDP flattens parameters, which loses "
                   "bitsandbytes' quantization state. Use --strategy ddp for QLoRA on several devices")
    if job.optimizer != "adamw":
        out.append(f"--optimizer {job.optimizer} runs with --strategy ddp (or auto), not fsdp: BAdam keeps optimizer "
                   "state for one block only, which is what FSDP would otherwise shard")
    if job.dropbp.rate > 0:
        out.append("--dropbp.rate > 0 runs with --strategy ddp (or auto), not fsdp: torch's FSDP fails when a block "
                   "got gradients in one micro-batch of a step and none in the last (it asserts in its post-backward), "
                   "and fills the dropped tensors of a partly dropped block with zero gradients, which AdamW steps")
    return out


def build_model(job: FinetuneJob) -> GPT:
    """Load the base weights and make the model of the job's mode: all weights trainable, or LoRA (on 4 bits)."""
    from lit_model.checkpoint_io import load_model

    # Every weight cast to the precision's parameter dtype as it is loaded, whatever the file stores: float32 for
    # 32-true and *-mixed (master weights), bf16/fp16 for *-true.
    model = load_model(job.checkpoint_dir, device="cpu", dtype=param_dtype(job.precision))
    if job.mode == "full":
        model.requires_grad_(True)
        return model
    from lit_model.peft.lora import apply_lora

    if job.quantize is not None:
        from lit_model.quantize import quantize_model

        model = quantize_model(model, job.quantize, compute_dtype=compute_dtype(job.precision))
    return apply_lora(model, job.lora)


def load_trained_weights(model: GPT, checkpoint: Path, mode: str) -> None:
    """The weights a training checkpoint holds: the whole model (full) or the LoRA tensors on the base (lora)."""
    from lit_model.checkpoint_io import load_checkpoint

    if mode == "lora":
        load_adapters(model, checkpoint / LORA_WEIGHTS_NAME)
    else:
        load_checkpoint(model, checkpoint / "lit_model.pth", strict=True)
        model.requires_grad_(True)


def load_records_for(job: FinetuneJob, config: Config) -> tuple[list[dict], list[dict], bool]:
    """Training and validation records, and whether they are the bundled demo task set."""
    from lit_model.data import load_records, split_records

    train_file = job.data.train_file
    demo = job.data.demo if job.data.demo is not None else (train_file is None and config.name == "demo")
    if demo:
        from lit_model.demo_tasks import write_demo_dataset

        train_file, val_file = write_demo_dataset(Path(job.out_dir) / "data")
        return load_records(train_file), load_records(val_file), True
    if train_file is None:
        train_file = Path("data/alpaca/train.json")
        if not train_file.is_file():
            raise FileNotFoundError(
                "No --data.train_file given and data/alpaca/train.json does not exist. Run "
                "`python scripts/prepare_alpaca.py`, pass --data.train_file your.json[l], or train on the bundled "
                "digit tasks with --data.demo true."
            )
        val_default = train_file.with_name("val.json")
        if job.data.val_file is None and val_default.is_file():
            job.data.val_file = val_default
    records = load_records(Path(train_file))
    if job.data.val_file is not None:
        return records, load_records(Path(job.data.val_file)), False
    train, val = split_records(records, job.data.val_split_fraction, job.seed)
    return train, val, False


# ---- saving and outputs ---------------------------------------------------------------------------------------------


def save_checkpoint(
    fabric: Any, model: Any, job: FinetuneJob, prompt_style: Any, target: Path, state: Optional[dict[str, Any]],
    metrics: dict[str, float], dropbp: Any = None,
) -> Path:
    """Write a self-contained checkpoint directory atomically; with `state`, also what resume needs."""
    from lit_model.checkpoint_io import copy_support_files, save_state_dict
    from lit_model.prompts import save_prompt_style

    raw = unwrap(model)
    weights = model_state_dict(fabric, model)  # collective under FSDP: every rank takes part
    if job.mode == "lora":
        keys = set(adapter_keys(raw))
        weights, weights_name = {k: v for k, v in weights.items() if k in keys}, LORA_WEIGHTS_NAME
    else:
        weights_name = "lit_model.pth"

    def write(tmp: Path) -> None:
        save_state_dict({k: v.detach().cpu() for k, v in weights.items()}, tmp / weights_name)
        raw.config.save(tmp / "model_config.yaml")
        copy_support_files(job.checkpoint_dir, tmp)
        # Absolute base path and the resolved precision, so merge/generate work from any directory.
        hparams = {**_plain(job.hparams), "checkpoint_dir": str(Path(job.checkpoint_dir).resolve()),
                   "precision": job.precision, "mode": job.mode, "metrics": dict(metrics)}
        (tmp / "hyperparameters.yaml").write_text(yaml.safe_dump(hparams, sort_keys=False))
        save_prompt_style(prompt_style, tmp)
        if dropbp is not None:  # the rates, sensitivities and FLOPs this run trained with
            (tmp / "dropbp.yaml").write_text(yaml.safe_dump(dropbp.summary(), sort_keys=False))
        if state is not None:
            torch.save({**state, "metrics": dict(metrics)}, tmp / ckpt.STATE_NAME)

    if fabric.is_global_zero:
        ckpt.write_checkpoint(Path(target), write)
        fabric.print(f"Saved {target}")
    fabric.barrier()
    return Path(target)


def make_loggers(out_dir: Path) -> list[Any]:
    """OUT/logs/metrics.csv always (one file for the run, continued on resume); TensorBoard too when installed."""
    from lit_model.metrics_log import MetricsCSV

    loggers: list[Any] = [MetricsCSV(out_dir / "logs")]
    try:
        from lightning.fabric.loggers import TensorBoardLogger

        loggers.append(TensorBoardLogger(out_dir, name="tensorboard"))
    except ImportError:  # tensorboard (or tensorboardX) is not installed: CSV only
        pass
    return loggers


def write_plot(loop: LoopState, path: Path, title: str) -> None:
    from lit_model.plotting import plot_loss_curve

    plot_loss_curve(loop.train_history, loop.val_history, path, title=f"{title} fine-tuning")


def _plain(value: Any) -> Any:
    """Make arguments YAML-safe: dataclasses to dicts, paths to strings."""
    if is_dataclass(value) and not isinstance(value, type):
        return _plain(asdict(value))
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value
