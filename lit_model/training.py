"""The one fine-tuning loop, shared by finetune/full.py, lora.py and qlora.py, and its helpers.

A script builds a `FinetuneJob` (what to train and how) and calls `run`. Fabric owns devices, precision and
launching; this module owns data order, accumulation, the schedule, evaluation and saving.
"""

from __future__ import annotations

import math
import os
import shutil
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
import yaml

from lit_model.args import DataArgs, EvalArgs, TrainArgs
from lit_model.config import Config
from lit_model.model import GPT

DEMO_CHECKPOINT = Path(__file__).resolve().parent.parent / "checkpoints" / "demo"
IGNORE_INDEX = -100


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
    hparams: dict[str, Any] = field(default_factory=dict)  # the script's arguments, saved as hyperparameters.yaml


def run(job: FinetuneJob) -> dict[str, float]:
    """Validate the job, build model and data, train, evaluate and save `out_dir/final`. Returns the final metrics."""
    from lightning.fabric import Fabric
    from lightning.fabric.loggers import CSVLogger

    from lit_model.tokenizer import Tokenizer

    job.precision = job.precision or default_precision(job.quantize is not None)
    validate_job(job)
    fabric = Fabric(devices=job.devices, precision=job.precision, loggers=CSVLogger(job.out_dir, name="logs"))
    fabric.launch()
    fabric.seed_everything(job.seed)
    tokenizer = Tokenizer(job.checkpoint_dir)
    config = Config.from_checkpoint(job.checkpoint_dir)
    prompt_style = resolve_prompt_style(job.data.prompt_style, job.checkpoint_dir, config)
    train_records, val_records, is_demo = load_records_for(job, config)
    max_seq_length = min(job.train.max_seq_length or config.block_size, config.block_size)

    with fabric.rank_zero_first():
        model = build_model(job, fabric)
    trainable, total = count_parameters(model)
    fabric.print(f"Parameters: {trainable:,} trainable of {total:,} ({100 * trainable / total:.3f}%)")

    from lit_model.data import SFTDataset

    train_data = SFTDataset(train_records, tokenizer, prompt_style, max_seq_length, job.data.mask_prompt)
    val_data = SFTDataset(val_records, tokenizer, prompt_style, max_seq_length, job.data.mask_prompt)
    for name, ds in (("train", train_data), ("validation", val_data)):
        if ds.num_truncated:
            fabric.print(f"Note: {ds.num_truncated} of {len(ds)} {name} samples were truncated to {max_seq_length} tokens")
    steps_per_epoch = max(1, len(train_data) // job.train.global_batch_size)
    max_steps = job.train.max_steps or job.train.epochs * steps_per_epoch
    fabric.print(f"Data: {len(train_data)} train / {len(val_data)} validation samples; {max_steps} optimizer steps")

    model = fabric.setup(model)
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=job.train.learning_rate,
        weight_decay=job.train.weight_decay,
        betas=(job.train.beta1, job.train.beta2),
    )
    optimizer = fabric.setup_optimizers(optimizer)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule(job.train, max_steps))
    n_exact = job.eval.exact_match if job.eval.exact_match is not None else (100 if is_demo else 0)
    em_records = val_records[:n_exact]

    metrics: dict[str, float] = {}
    if em_records:
        metrics["exact_match_before"] = exact_match(fabric, model, tokenizer, prompt_style, em_records, job.eval)
        fabric.print(f"Held-out exact match before fine-tuning: {metrics['exact_match_before']:.3f}")
    batches = BatchIterator(len(train_data), job.train.micro_batch_size, job.seed, fabric.global_rank, fabric.world_size)
    t0 = time.perf_counter()
    fit(fabric, model, optimizer, scheduler, train_data, val_data, batches, job, max_steps)
    metrics["train_time_s"] = time.perf_counter() - t0
    metrics["val_loss"] = validate(fabric, model, val_data, job)
    fabric.print(f"Final validation loss {metrics['val_loss']:.4f}, perplexity {math.exp(min(metrics['val_loss'], 50)):.2f}")
    if em_records:
        metrics["exact_match_after"] = exact_match(fabric, model, tokenizer, prompt_style, em_records, job.eval)
        fabric.print(
            f"Held-out exact match after fine-tuning: {metrics['exact_match_after']:.3f} "
            f"(before: {metrics['exact_match_before']:.3f}, {len(em_records)} samples)"
        )
    if val_records:
        print_sample(fabric, model, tokenizer, prompt_style, val_records[0], job.eval)
    save_final(fabric, model, job, prompt_style, metrics)
    fabric.logger.finalize("success")  # flush metrics.csv
    return metrics


def fit(
    fabric: Any,
    model: Any,
    optimizer: Any,
    scheduler: Any,
    train_data: Any,
    val_data: Any,
    batches: "BatchIterator",
    job: FinetuneJob,
    max_steps: int,
) -> None:
    """The training loop: accumulate micro-batches into optimizer steps, log, validate at intervals."""
    from tqdm import tqdm

    from lit_model.checkpointing import apply_activation_checkpointing
    from lit_model.data import collate
    from lit_model.loss import chunked_cross_entropy, lm_head_weight

    args = job.train
    accum = args.global_batch_size // (args.micro_batch_size * fabric.world_size)
    raw: GPT = model.module
    if args.activation_checkpointing:
        apply_activation_checkpointing(raw, every=args.activation_checkpointing, offload=args.offload_activations)
    model.train()
    bar = tqdm(total=max_steps, desc="Fine-tuning", disable=not fabric.is_global_zero, dynamic_ncols=True)
    tokens_seen, t_start = 0, time.perf_counter()
    for step in range(1, max_steps + 1):
        micro_batches = [collate([train_data[i] for i in next(batches)]) for _ in range(accum)]
        targets = [b["labels"][:, 1:] for b in micro_batches]
        # Normalise by the tokens of the whole optimizer step, so accumulation equals one large batch.
        n_tokens = sum(int((t != IGNORE_INDEX).sum()) for t in targets)
        if n_tokens == 0:
            warnings.warn(f"Step {step}: every label in the batch is masked (prompt longer than max_seq_length?); skipped")
            continue
        step_loss = 0.0
        for i, (batch, target) in enumerate(zip(micro_batches, targets)):
            input_ids = fabric.to_device(batch["input_ids"][:, :-1])
            target = fabric.to_device(target)
            with fabric.no_backward_sync(model, enabled=i < accum - 1):
                hidden = model(input_ids, return_hidden=True)
                n = int((target != IGNORE_INDEX).sum())
                with fabric.autocast():  # the head's matmuls in the mixed-precision dtype, as inside the model
                    weight, bias = lm_head_weight(raw.lm_head)
                    loss = chunked_cross_entropy(hidden, weight, target, bias) * (n / n_tokens)
                if loss.grad_fn is not None:  # nothing trainable reached this micro-batch: skip only its backward
                    fabric.backward(loss)
            step_loss += float(loss.detach())
            tokens_seen += input_ids.numel()
        if args.max_norm is not None:
            fabric.clip_gradients(model, optimizer, max_norm=args.max_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        if step % args.log_interval == 0 or step == max_steps:
            elapsed = time.perf_counter() - t_start
            record = {"step": step, "loss": step_loss, "lr": scheduler.get_last_lr()[0], "tokens_per_s": tokens_seen / elapsed}
            fabric.log_dict(record, step=step)
            bar.set_postfix(loss=f"{step_loss:.4f}", tok_s=f"{record['tokens_per_s']:.0f}", refresh=False)
        bar.update(1)
        if step % job.eval.interval == 0 and step < max_steps:
            val_loss = validate(fabric, model, val_data, job)
            fabric.log_dict({"step": step, "val_loss": val_loss}, step=step)
            bar.write(f"step {step}: validation loss {val_loss:.4f}")
            model.train()
    bar.close()


@torch.no_grad()
def validate(fabric: Any, model: Any, val_data: Any, job: FinetuneJob) -> float:
    """Token-weighted mean cross-entropy over the validation set (or its first `eval.max_iters` batches)."""
    from lit_model.data import collate
    from lit_model.loss import chunked_cross_entropy, lm_head_weight

    model.eval()
    total, count = 0.0, 0
    size = job.train.micro_batch_size
    starts = range(0, len(val_data), size)
    if job.eval.max_iters is not None:
        starts = starts[: job.eval.max_iters]
    for start in starts:
        batch = collate([val_data[i] for i in range(start, min(start + size, len(val_data)))])
        target = fabric.to_device(batch["labels"][:, 1:])
        n = int((target != IGNORE_INDEX).sum())
        if n == 0:
            continue
        hidden = model(fabric.to_device(batch["input_ids"][:, :-1]), return_hidden=True)
        with fabric.autocast():
            weight, bias = lm_head_weight(model.module.lm_head)
            total += float(chunked_cross_entropy(hidden, weight, target, bias)) * n
        count += n
    model.train()
    return total / max(count, 1)


def exact_match(fabric: Any, model: Any, tokenizer: Any, prompt_style: Any, records: list[dict], eval_args: EvalArgs) -> float:
    """Share of records whose greedy completion equals the reference output (after stripping whitespace)."""
    from lit_model.demo_tasks import exact_match as is_match
    from lit_model.sampling import generate

    raw: GPT = model.module
    stops = prompt_style.stop_tokens(tokenizer)
    hits = 0
    for record in records:
        prompt = tokenizer.encode(prompt_style.apply(record["instruction"], record.get("input", "")), device=fabric.device)
        out = generate(raw, prompt, eval_args.max_new_tokens, temperature=0.0, stop_tokens=stops)
        hits += is_match(tokenizer.decode(out), record["output"])
    return hits / len(records)


def print_sample(fabric: Any, model: Any, tokenizer: Any, prompt_style: Any, record: dict, eval_args: EvalArgs) -> None:
    from lit_model.sampling import generate

    prompt = prompt_style.apply(record["instruction"], record.get("input", ""))
    ids = tokenizer.encode(prompt, device=fabric.device)
    out = generate(model.module, ids, eval_args.max_new_tokens, stop_tokens=prompt_style.stop_tokens(tokenizer))
    fabric.print(f"Sample ({record['instruction']!r}) -> {tokenizer.decode(out)!r}")


class BatchIterator:
    """Endless, resumable micro-batches of sample indices: a fresh seeded permutation per epoch, sharded by rank."""

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        if n < batch_size * world_size:
            raise ValueError(f"{n} training samples cannot fill one micro-batch of {batch_size} on {world_size} devices")
        self.n, self.batch_size, self.seed, self.rank, self.world_size = n, batch_size, seed, rank, world_size
        self.epoch, self.position = 0, 0

    def __iter__(self) -> Iterator[list[int]]:
        return self

    def __next__(self) -> list[int]:
        span = self.batch_size * self.world_size
        if self.position + span > self.n:  # drop the ragged tail: every step sees full micro-batches
            self.epoch, self.position = self.epoch + 1, 0
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        chunk = order[self.position : self.position + span].tolist()
        self.position += span
        return chunk[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


def lr_schedule(args: TrainArgs, max_steps: int) -> Callable[[int], float]:
    """Linear warm-up to 1, then cosine decay to `min_lr_ratio` at `max_steps` (a LambdaLR multiplier)."""
    warmup = min(args.lr_warmup_steps, max_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
        return args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


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
    problems = job.train.problems(job.devices) + job.eval.problems() + job.data.problems()
    if job.lora is not None:
        problems += job.lora.problems()
    if job.quantize is not None:
        from lit_model.quantize import validate_quantize_precision

        try:
            validate_quantize_precision(job.quantize, job.precision)
        except ValueError as err:
            problems.append(str(err))
    checkpoint = Path(job.checkpoint_dir)
    if not (checkpoint / "model_config.yaml").is_file() or not (checkpoint / "lit_model.pth").is_file():
        from lit_model.checkpoint_io import check_checkpoint_dir

        try:
            check_checkpoint_dir(checkpoint)
        except FileNotFoundError as err:
            problems.append(str(err))
    if problems:
        raise ValueError("Invalid arguments:\n  - " + "\n  - ".join(problems))


def build_model(job: FinetuneJob, fabric: Any) -> GPT:
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


def precision_dtype(precision: str) -> Optional[torch.dtype]:
    """The weight dtype a Fabric precision setting stores (None: keep float32 weights for mixed precision)."""
    return {"bf16-true": torch.bfloat16, "16-true": torch.float16}.get(precision)


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; a 4-bit tensor counts its logical elements."""
    trainable = total = 0
    seen = set()
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        shape = getattr(getattr(p, "quant_state", None), "shape", None)
        n = math.prod(shape) if shape is not None else p.numel()
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total


def resolve_prompt_style(name: Optional[str], checkpoint_dir: Path, config: Config) -> Any:
    """--data.prompt_style, else the checkpoint's prompt_style.yaml, else the model family's default."""
    from lit_model.prompts import PromptStyle, load_prompt_style

    if name is not None:
        return PromptStyle.from_name(name)
    return load_prompt_style(checkpoint_dir) or PromptStyle.for_model(config.hf_repo or config.name)


def load_records_for(job: FinetuneJob, config: Config) -> tuple[list[dict], list[dict], bool]:
    """Training and validation records, and whether they are the bundled demo task set."""
    from lit_model.data import load_records, split_records

    train_file, is_demo = job.data.train_file, False
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
        return records, load_records(Path(job.data.val_file)), is_demo
    train, val = split_records(records, job.data.val_split_fraction, job.seed)
    return train, val, is_demo


# ---- saving ---------------------------------------------------------------------------------------------------------


def save_final(fabric: Any, model: Any, job: FinetuneJob, prompt_style: Any, metrics: dict[str, float]) -> Path:
    """Write out_dir/final: weights (LoRA only for LoRA), config, tokenizer, hyper-parameters, prompt style."""
    from lit_model.checkpoint_io import save_state_dict
    from lit_model.prompts import save_prompt_style
    from lit_model.tokenizer import TOKENIZER_FILES

    target = Path(job.out_dir) / "final"
    raw: GPT = model.module
    if job.mode == "lora":
        from lit_model.lora import lora_state_dict

        state, weights_name = lora_state_dict(raw), "lit_model.lora.pth"
    else:
        state, weights_name = raw.state_dict(), "lit_model.pth"
    if fabric.is_global_zero:
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_state_dict({k: v.detach().cpu() for k, v in state.items()}, tmp / weights_name)
        raw.config.save(tmp / "model_config.yaml")
        for name in TOKENIZER_FILES:
            if (Path(job.checkpoint_dir) / name).is_file():
                shutil.copy2(Path(job.checkpoint_dir) / name, tmp / name)
        hparams = {**_plain(job.hparams), "mode": job.mode, "metrics": metrics}
        (tmp / "hyperparameters.yaml").write_text(yaml.safe_dump(hparams, sort_keys=False))
        save_prompt_style(prompt_style, tmp)
        replace_dir(tmp, target)
        fabric.print(f"Saved {target}")
    fabric.barrier()
    return target


def replace_dir(src: Path, dst: Path) -> None:
    """Move a finished directory into place so `dst` is always either the old or the new complete version."""
    old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
    if dst.exists():
        os.replace(dst, old)
    os.replace(src, dst)
    shutil.rmtree(old, ignore_errors=True)


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
