"""The one fine-tuning loop, shared by finetune/full.py, lora.py and qlora.py, and its helpers.

A script builds a `FinetuneJob` (what to train and how) and calls `run`. Fabric owns devices, precision and
launching; this module owns data order, accumulation, the schedule, evaluation, checkpoints and resume.
"""

from __future__ import annotations

import math
import resource
import shutil
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import yaml

from lit_model.args import BAdamArgs, DataArgs, DropBPArgs, EvalArgs, TrainArgs
from lit_model.config import Config
from lit_model.data import BatchIterator
from lit_model.model import GPT
from lit_model import resume as ckpt

DEMO_CHECKPOINT = Path(__file__).resolve().parent.parent / "checkpoints" / "demo"
IGNORE_INDEX = -100
LORA_WEIGHTS = "lit_model.lora.pth"


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


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or inf; the weights were not updated with it."""


def run(job: FinetuneJob) -> dict[str, float]:
    """Validate the job, build model and data, train (or resume), evaluate and save `out_dir/final`.

    Returns the final metrics (validation loss, exact match before/after when enabled, training time).
    """
    from lightning.fabric import Fabric

    from lit_model.data import SFTDataset
    from lit_model.evaluation import exact_match
    from lit_model.tokenizer import Tokenizer

    job.precision = job.precision or default_precision(job.quantize is not None)
    validate_job(job)
    resume_from = ckpt.resolve_resume(job.resume, Path(job.out_dir))
    fabric = Fabric(devices=job.devices, precision=job.precision, loggers=make_loggers(Path(job.out_dir)))
    fabric.launch()
    fabric.seed_everything(job.seed)
    tokenizer = Tokenizer(job.checkpoint_dir)
    config = Config.from_checkpoint(job.checkpoint_dir)
    prompt_style = resolve_prompt_style(job.data.prompt_style, job.checkpoint_dir, config)
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
    steps_per_epoch = max(1, len(train_data) // job.train.global_batch_size)
    loop = LoopState(max_steps=job.train.max_steps or job.train.epochs * steps_per_epoch)
    fabric.print(f"Data: {len(train_data)} train / {len(val_data)} validation samples; {loop.max_steps} steps")

    model = fabric.setup(model)
    optimizer = fabric.setup_optimizers(make_optimizer(model, job, len(train_data)))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule(job.train, loop.max_steps))
    batches = BatchIterator(len(train_data), job.train.micro_batch_size, job.seed, fabric.global_rank, fabric.world_size)
    dropbp = make_dropbp(model.module, job.dropbp, job.seed)
    n_exact = job.eval.exact_match if job.eval.exact_match is not None else (100 if is_demo else 0)
    em_records = val_records[:n_exact]

    def evaluate_em() -> float:
        return exact_match(model.module, tokenizer, prompt_style, em_records, job.eval.max_new_tokens, fabric.device)

    metrics: dict[str, float] = {}
    if resume_from is not None:
        state = ckpt.load_training_state(resume_from)
        restore(state, optimizer, scheduler, batches, loop, dropbp)
        metrics.update(state.get("metrics", {}))
        fabric.print(f"Resumed from {resume_from} at step {loop.step} of {loop.max_steps}")
    elif em_records:
        metrics["exact_match_before"] = evaluate_em()
        fabric.print(f"Held-out exact match before fine-tuning: {metrics['exact_match_before']:.3f}")

    def save(target: Path, state: Optional[dict[str, Any]]) -> Path:
        return save_checkpoint(fabric, model, job, prompt_style, target, state, metrics, dropbp)

    sample_record = val_records[0] if val_records else train_records[0]
    session = Session(fabric, model, optimizer, scheduler, batches, train_data, val_data, job, tokenizer, prompt_style,
                      sample_record, dropbp)
    t0 = time.perf_counter()
    fit(session, loop, save)
    metrics["train_time_s"] = time.perf_counter() - t0
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

    def validate(self) -> float:
        from lit_model.evaluation import validate

        return validate(self.fabric, self.model, self.val_data, self.job.train.micro_batch_size, self.job.eval.max_iters)

    def print_sample(self) -> None:
        from lit_model.evaluation import complete

        record = self.sample_record
        text = complete(self.model.module, self.tokenizer, self.prompt_style, record, self.job.eval.max_new_tokens,
                        self.fabric.device)
        self.fabric.print(f"Sample: {record['instruction']!r} -> {text!r}")

    def snapshot(self) -> dict[str, Any]:
        """RNG states, data position and DropBP generator: what the next step will consume."""
        return {"rng": ckpt.rng_states(), "data": self.batches.state_dict(),
                "dropbp": self.dropbp.state_dict() if self.dropbp is not None else None}

    def state(self, loop: LoopState, snapshot: dict[str, Any]) -> dict[str, Any]:
        """Everything beyond the weights that resume needs (plain containers and tensors)."""
        return {
            "step": loop.step, "tokens": loop.tokens, "max_steps": loop.max_steps, "calibrated": loop.calibrated,
            "train_history": loop.train_history, "val_history": loop.val_history,
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(), **snapshot,
        }

    def calibrate_dropbp(self, loop: LoopState) -> None:
        """Re-allocate DropBP rates from the gradient sensitivity measured on the next micro-batches."""
        from lit_model.data import collate
        from lit_model.loss import chunked_cross_entropy, lm_head_weight

        fabric, raw, handler, args = self.fabric, self.model.module, self.dropbp, self.job.dropbp
        # Peek at upcoming samples without moving the data position: training still sees them in order.
        position = self.batches.state_dict()
        samples = [collate([self.train_data[i] for i in next(self.batches)]) for _ in range(args.sensitivity_samples)]
        self.batches.load_state_dict(position)

        def backprop_for(batch: dict[str, torch.Tensor]) -> Callable[[Any], torch.Tensor]:
            input_ids, target = fabric.to_device(batch["input_ids"][:, :-1]), fabric.to_device(batch["labels"][:, 1:])

            def backprop(mask: Any) -> torch.Tensor:
                with fabric.autocast():  # the unwrapped module: apply the precision's autocast ourselves
                    hidden = raw(input_ids, drop_mask=mask, return_hidden=True)
                    weight, bias = lm_head_weight(raw.lm_head)
                    return chunked_cross_entropy(hidden, weight, target, bias)

            return backprop

        raw.train()
        handler.sensitivity_based_drop_bp([backprop_for(b) for b in samples], target=args.rate, min_rate=args.min_rate,
                                          allocator=args.allocator, seq_len=samples[0]["input_ids"].size(1) - 1)
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
    from lit_model.loss import chunked_cross_entropy, lm_head_weight

    fabric, model, args, out_dir = s.fabric, s.model, s.job.train, Path(s.job.out_dir)
    accum = args.global_batch_size // (args.micro_batch_size * fabric.world_size)
    if args.activation_checkpointing:
        apply_activation_checkpointing(model.module, every=args.activation_checkpointing, offload=args.offload_activations)
    model.train()
    bar = tqdm(total=loop.max_steps, initial=loop.step, desc="Fine-tuning", disable=not fabric.is_global_zero,
               dynamic_ncols=True)
    t_start, tokens_start = time.perf_counter(), loop.tokens
    calibrate_at = int(s.job.dropbp.sensitivity_at * loop.max_steps) if s.job.dropbp.sensitivity_at > 0 else None
    # RNG and data position as of the last completed step: what an interrupted run saves next to its weights.
    snapshot = s.snapshot()
    try:
        while loop.step < loop.max_steps:
            if s.dropbp is not None and calibrate_at is not None and loop.step >= calibrate_at and not loop.calibrated:
                s.calibrate_dropbp(loop)
                snapshot = s.snapshot()
            micro_batches = [collate([s.train_data[i] for i in next(s.batches)]) for _ in range(accum)]
            targets = [b["labels"][:, 1:] for b in micro_batches]
            # Normalise by the tokens of the whole optimizer step, so accumulation equals one large batch.
            n_tokens = sum(int((t != IGNORE_INDEX).sum()) for t in targets)
            step = loop.step + 1
            if n_tokens == 0:
                warnings.warn(f"Step {step}: every label is masked (prompts longer than max_seq_length?); skipped")
                loop.step = step
                snapshot = s.snapshot()
                continue
            step_loss = torch.zeros((), device=fabric.device)
            for i, (batch, target) in enumerate(zip(micro_batches, targets)):
                input_ids, target = fabric.to_device(batch["input_ids"][:, :-1]), fabric.to_device(target)
                mask = s.dropbp.set_dropped_layers() if s.dropbp is not None else None
                with fabric.no_backward_sync(model, enabled=i < accum - 1):
                    hidden = model(input_ids, drop_mask=mask, return_hidden=True)
                    with fabric.autocast():  # the head's matmuls in the mixed-precision dtype, as inside the model
                        weight, bias = lm_head_weight(model.module.lm_head)
                        share = int((target != IGNORE_INDEX).sum()) / n_tokens
                        loss = chunked_cross_entropy(hidden, weight, target, bias) * share
                    if loss.grad_fn is not None:  # nothing trainable reached this micro-batch: skip only its backward
                        fabric.backward(loss)
                step_loss += loss.detach()
                loop.tokens += input_ids.numel()
            if not torch.isfinite(step_loss):  # checked before the update, so the weights stay good
                raise NonFiniteLossError(non_finite_message(float(step_loss), step, loop.last_checkpoint))
            if args.max_norm is not None:
                fabric.clip_gradients(model, s.optimizer, max_norm=args.max_norm)
            s.optimizer.step()
            s.optimizer.zero_grad(set_to_none=True)
            s.scheduler.step()
            loop.step = step
            snapshot = s.snapshot()
            if step % args.log_interval == 0 or step == loop.max_steps:
                log_step(s, loop, float(step_loss), (loop.tokens - tokens_start) / (time.perf_counter() - t_start), bar)
            bar.update(1)
            if step % s.job.eval.interval == 0 and step < loop.max_steps:
                val_loss = s.validate()
                loop.val_history.append((step, val_loss))
                fabric.log_dict({"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50))}, step=step)
                bar.write(f"step {step}: validation loss {val_loss:.4f}, perplexity {math.exp(min(val_loss, 50)):.2f}")
                s.print_sample()
                model.train()
            if args.save_interval and step % args.save_interval == 0:
                state = s.state(loop, snapshot)
                loop.last_checkpoint = save(out_dir / ckpt.step_dir_name(step), state)
                if fabric.is_global_zero:
                    ckpt.prune(out_dir, args.keep_last)
    except KeyboardInterrupt:
        # The weights are those of the last completed step; the snapshot holds its RNG and data position.
        bar.write(f"Interrupted: saving step {loop.step} before exiting")
        save(out_dir / ckpt.step_dir_name(loop.step), s.state(loop, snapshot))
        raise
    finally:
        bar.close()


def log_step(s: Session, loop: LoopState, loss: float, tokens_per_s: float, bar: Any) -> None:
    record = {"loss": loss, "lr": s.scheduler.get_last_lr()[0], "tokens_per_s": tokens_per_s,
              "peak_memory_gb": peak_memory_bytes(s.fabric.device) / 1e9}
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


def lr_schedule(args: TrainArgs, max_steps: int) -> Callable[[int], float]:
    """Linear warm-up to 1, then cosine decay to `min_lr_ratio` at `max_steps` (a LambdaLR multiplier)."""
    warmup = min(args.lr_warmup_steps, max_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
        return args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def make_dropbp(model: GPT, args: DropBPArgs, seed: int) -> Any:
    """The DropBP handler (uniform rates until calibration), or None when --dropbp.rate is 0."""
    if args.rate == 0:
        return None
    from lit_model.dropbp import DropBPHandler

    return DropBPHandler(model, drop_rate=args.rate, seed=seed, sampler=args.sampler)


def make_optimizer(model: torch.nn.Module, job: FinetuneJob, n_samples: int) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters, or BAdam's block-coordinate wrappers around it (full fine-tuning)."""
    args, badam = job.train, job.badam
    hyper = dict(lr=args.learning_rate, weight_decay=args.weight_decay, betas=(args.beta1, args.beta2))
    if job.optimizer == "adamw":
        return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], **hyper)
    from lit_model.badam import BlockOptimizer, BlockOptimizerRatio, default_switch_every

    named = list(model.named_parameters())
    if job.optimizer == "badam_ratio":
        return BlockOptimizerRatio([p for _, p in named], named, update_ratio=badam.update_ratio,
                                   switch_every=badam.switch_block_every or 100, mask_mode=badam.mask_mode,
                                   include_embedding=badam.include_embedding, include_lm_head=badam.include_lm_head,
                                   seed=job.seed, **hyper)
    n_blocks = len(model.module.transformer.h) + badam.include_embedding + badam.include_lm_head
    switch = badam.switch_block_every or default_switch_every(n_samples, args.global_batch_size, n_blocks)
    return BlockOptimizer(torch.optim.AdamW([p for _, p in named], **hyper), named, switch_block_every=switch,
                          start_block=badam.start_block, switch_mode=badam.switch_mode,
                          active_modules=badam.active_modules, include_embedding=badam.include_embedding,
                          include_lm_head=badam.include_lm_head, seed=job.seed)


def restore(
    state: dict[str, Any], optimizer: Any, scheduler: Any, batches: BatchIterator, loop: LoopState, dropbp: Any
) -> None:
    """Put optimizer, schedule, data position, RNG, DropBP and loop counters back as they were when saved."""
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    batches.load_state_dict(state["data"])
    ckpt.set_rng_states(state["rng"])
    if (dropbp is None) != (state.get("dropbp") is None):
        raise ValueError("--dropbp.rate must be 0 in both or positive in both the saved run and the resumed one")
    if dropbp is not None:
        dropbp.load_state_dict(state["dropbp"])
    loop.calibrated = bool(state.get("calibrated", False))
    loop.step, loop.tokens = int(state["step"]), int(state["tokens"])
    loop.train_history = [tuple(x) for x in state["train_history"]]
    loop.val_history = [tuple(x) for x in state["val_history"]]


# ---- building -------------------------------------------------------------------------------------------------------


def default_precision(quantized: bool = False) -> str:
    """bf16 weights on GPUs that support them (the Lit-GPT default for fine-tuning), float32 on CPU.

    Without bf16, fp16 weights with loss scaling; a 4-bit base needs `*-true` (mixed precision would keep float32
    copies of the weights that quantization exists to avoid).
    """
    if torch.cuda.is_available():
        if torch.cuda.is_bf16_supported():
            return "bf16-true"
        return "16-true" if quantized else "16-mixed"
    return "32-true"


def validate_job(job: FinetuneJob) -> None:
    """Check every argument at once; raise one error listing all problems."""
    problems = job.train.problems(job.devices) + job.eval.problems() + job.data.problems() + job.dropbp.problems()
    if job.optimizer not in ("adamw", "badam", "badam_ratio"):
        problems.append(f"--optimizer must be adamw, badam or badam_ratio, got {job.optimizer!r}")
    elif job.optimizer != "adamw":
        problems += job.badam.problems()
        if job.mode != "full":
            problems.append(f"--optimizer {job.optimizer} is for full fine-tuning (finetune/full.py)")
        if job.devices > 1:
            problems.append(f"--optimizer {job.optimizer} runs on one device (DDP cannot follow its block switches)")
    if job.lora is not None:
        problems += job.lora.problems()
    if job.quantize is not None:
        from lit_model.quantize import validate_quantize_precision

        try:
            validate_quantize_precision(job.quantize, job.precision)
        except ValueError as err:
            problems.append(str(err))
    if job.resume is not None and str(job.resume) != "auto":
        try:
            ckpt.resolve_resume(job.resume, Path(job.out_dir))
        except FileNotFoundError as err:
            problems.append(str(err))
    from lit_model.checkpoint_io import check_checkpoint_dir

    try:
        check_checkpoint_dir(Path(job.checkpoint_dir))
    except FileNotFoundError as err:
        problems.append(str(err))
    if problems:
        raise ValueError("Invalid arguments:\n  - " + "\n  - ".join(problems))


def build_model(job: FinetuneJob) -> GPT:
    """Load the base weights and make the model of the job's mode: all weights trainable, or LoRA (on 4 bits)."""
    from lit_model.checkpoint_io import load_model

    dtype = precision_dtype(job.precision)
    model = load_model(job.checkpoint_dir, device="cpu", dtype=dtype)
    if job.mode == "full":
        model.requires_grad_(True)
        return model
    from lit_model.lora import apply_lora

    if job.quantize is not None:
        from lit_model.quantize import quantize_model

        model = quantize_model(model, job.quantize, compute_dtype=dtype or torch.float32)
    return apply_lora(model, job.lora)


def load_trained_weights(model: GPT, checkpoint: Path, mode: str) -> None:
    """The weights a training checkpoint holds: the whole model (full) or the LoRA tensors on the base (lora)."""
    from lit_model.checkpoint_io import load_checkpoint

    if mode == "lora":
        load_checkpoint(model, checkpoint / LORA_WEIGHTS, strict=True, missing_ok=lambda key: "lora_" not in key)
    else:
        load_checkpoint(model, checkpoint / "lit_model.pth", strict=True)
        model.requires_grad_(True)


def precision_dtype(precision: str) -> Optional[torch.dtype]:
    """The weight dtype a Fabric precision setting stores (None: keep float32 weights for mixed precision)."""
    return {"bf16-true": torch.bfloat16, "16-true": torch.float16}.get(precision)


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; a 4-bit weight counts its logical elements."""
    from lit_model.lora import count_parameters as count

    return count(model)


def resolve_prompt_style(name: Optional[str], checkpoint_dir: Path, config: Config) -> Any:
    """--data.prompt_style, else the checkpoint's prompt_style.yaml, else the model family's default."""
    from lit_model.prompts import PromptStyle, load_prompt_style

    if name is not None:
        return PromptStyle.from_name(name)
    return load_prompt_style(checkpoint_dir) or PromptStyle.for_model(config.hf_repo or config.name)


def load_records_for(job: FinetuneJob, config: Config) -> tuple[list[dict], list[dict], bool]:
    """Training and validation records, and whether they are the bundled demo task set."""
    from lit_model.data import load_records, split_records

    train_file = job.data.train_file
    if train_file is None:
        if config.name == "demo":
            from lit_model.demo_tasks import write_demo_dataset

            train_file, val_file = write_demo_dataset(Path(job.out_dir) / "data")
            return load_records(train_file), load_records(val_file), True
        train_file = Path("data/alpaca/train.json")
        if not train_file.is_file():
            raise FileNotFoundError(
                "No --data.train_file given and data/alpaca/train.json does not exist. Run "
                "`python scripts/prepare_alpaca.py` (or pass --data.train_file your.json[l])."
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
    from lit_model.checkpoint_io import save_state_dict
    from lit_model.prompts import save_prompt_style
    from lit_model.tokenizer import TOKENIZER_FILES

    raw: GPT = model.module
    if job.mode == "lora":
        from lit_model.lora import lora_state_dict

        weights, weights_name = lora_state_dict(raw), LORA_WEIGHTS
    else:
        weights, weights_name = raw.state_dict(), "lit_model.pth"

    def write(tmp: Path) -> None:
        save_state_dict({k: v.detach().cpu() for k, v in weights.items()}, tmp / weights_name)
        raw.config.save(tmp / "model_config.yaml")
        for name in TOKENIZER_FILES:
            if (Path(job.checkpoint_dir) / name).is_file():
                shutil.copy2(Path(job.checkpoint_dir) / name, tmp / name)
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
    """CSV metrics always; TensorBoard too when it is installed."""
    from lightning.fabric.loggers import CSVLogger

    loggers: list[Any] = [CSVLogger(out_dir, name="logs")]
    try:
        from lightning.fabric.loggers import TensorBoardLogger

        loggers.append(TensorBoardLogger(out_dir, name="tensorboard"))
    except ImportError:  # tensorboard (or tensorboardX) is not installed: CSV only
        pass
    return loggers


def write_plot(loop: LoopState, path: Path, title: str) -> None:
    try:
        from lit_model.plotting import plot_loss_curve
    except ImportError:  # pragma: no cover - matplotlib is a dependency; stay usable if it was removed
        return
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


def script_main(fn: Callable[..., Any], **defaults: Any) -> None:
    """Run a finetune/generate script function as a CLI (jsonargparse), optionally overriding its defaults."""
    from jsonargparse import CLI

    torch.set_float32_matmul_precision("high")
    CLI(fn, as_positional=False, set_defaults=defaults or None)
    sys.stdout.flush()
