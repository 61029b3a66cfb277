"""Everything a run is built from: the model for the job (full, LoRA, QLoRA), its data, optimizer, schedule, DropBP,
loggers, and the session that ties them together (`build_session`)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from lightning.fabric import Fabric

from lit_model.badam import BlockOptimizer, BlockOptimizerRatio, default_switch_every
from lit_model.checkpoint_io import LORA_WEIGHTS_NAME, WEIGHTS_NAME, load_checkpoint, load_model
from lit_model.checkpointing import apply_activation_checkpointing
from lit_model.config import Config
from lit_model.data import (BatchIterator, Conversation, SFTDataset, collate, load_conversations,
                            load_dataset_conversations, split_records)
from lit_model.data.batches import PackedBatchIterator
from lit_model.data.sft import collate_packed
from lit_model.data.demo_tasks import write_demo_dataset
from lit_model.dropbp import DropBPHandler
from lit_model.memory import count_parameters
from lit_model.model import GPT
from lit_model.peft.checkpoint import load_adapters
from lit_model.peft.lora import apply_lora
from lit_model.precision import compute_dtype, param_dtype
from lit_model.prompts import PromptStyle, resolve_prompt_style
from lit_model.quantize import quantize_model
from lit_model.tokenizer import Tokenizer
from lit_model.train.args import DropBPArgs, FinetuneJob, TrainArgs
from lit_model.train.dist import LossInForward, is_fsdp, make_grad_sync, strategy_name, unwrap
from lit_model.train.fingerprint import run_fingerprint
from lit_model.train.metrics import MetricsCSV
from lit_model.train.session import Session
from lit_model.train.state import LoopState

DEMO_EXACT_MATCH = 100  # held-out samples scored on the demo task set when --eval.exact_match is not given


def build_session(fabric: Fabric, job: FinetuneJob, resume_from: Optional[Path]) -> tuple[Session, LoopState,
                                                                                          list[Conversation]]:
    """The run's session and loop counters, and the held-out conversations for exact match (possibly none)."""
    tokenizer, config = Tokenizer(job.checkpoint_dir), Config.from_checkpoint(job.checkpoint_dir)
    style, source = resolve_prompt_style(job.data.prompt_style, job.checkpoint_dir, config.hf_repo or config.name)
    fabric.print(f"Prompts: {source}")
    with fabric.rank_zero_first():  # the demo data set is written by rank 0 before the others read it
        train, val, is_demo = load_conversations_for(job, config)
        model = build_model(job)
    if resume_from is not None:
        load_trained_weights(model, resume_from, job)
    trainable, total = count_parameters(model)
    fabric.print(f"Parameters: {trainable:,} trainable of {total:,} ({100 * trainable / total:.3f}%)")
    max_seq_length = min(job.train.max_seq_length or config.block_size, config.block_size)
    train_data, val_data = (make_dataset(c, name, tokenizer, style, max_seq_length, job, fabric)
                            for c, name in ((train, "train"), (val, "validation")))
    accum = job.train.global_batch_size // (job.train.micro_batch_size * fabric.world_size)
    batches, collate_fn = make_batches(train_data, job, fabric, accum)
    steps_per_epoch = (batches.steps_per_epoch() if isinstance(batches, PackedBatchIterator)
                       else max(1, len(train_data) // job.train.global_batch_size))
    loop = LoopState(max_steps=job.train.max_steps or job.train.epochs * steps_per_epoch)
    fabric.print(f"Data: {len(train_data)} train / {len(val_data)} validation samples; {loop.max_steps} steps")
    print_distribution(fabric, job)
    model = fabric.setup(LossInForward(model) if is_fsdp(fabric) else model)
    dropbp = make_dropbp(unwrap(model), job.dropbp, job.seed, round(job.dropbp.warmup * loop.max_steps) * accum)
    optimizer = fabric.setup_optimizers(make_optimizer(model, job, len(train_data), dropbp))
    if job.optimizer != "adamw":  # BAdam froze all but the active block (or share) just now
        active, total = count_parameters(model)
        fabric.print(f"{job.optimizer}: {active:,} of {total:,} parameters train at a time")
    if job.train.activation_checkpointing:
        apply_activation_checkpointing(unwrap(model), every=job.train.activation_checkpointing,
                                       offload=job.train.offload_activations)
    if is_fsdp(fabric):
        # FSDP initialises itself at its first forward; under generation's inference_mode its buffers would become
        # inference tensors that the training backward cannot use ("The `grad_fn` is needed ..."): go first here.
        with torch.no_grad():
            model(torch.zeros((1, 1), dtype=torch.long, device=fabric.device))
    fingerprint = run_fingerprint(
        base_weights=Path(job.checkpoint_dir) / WEIGHTS_NAME, model_config=config, mode=job.mode, lora=job.adapter,
        quantize=job.quantize, optimizer=job.optimizer, badam=job.badam, train=job.train, seed=job.seed,
        records=train, prompt_style=style, max_seq_length=max_seq_length, mask_prompt=job.data.mask_prompt,
        dropbp=job.dropbp, max_steps=loop.max_steps,
        packing=batches.budget if isinstance(batches, PackedBatchIterator) else None)
    session = Session(
        fabric=fabric, model=model, optimizer=optimizer,
        scheduler=make_scheduler(optimizer, job, loop.max_steps, dropbp),
        batches=batches, collate=collate_fn,
        train_data=train_data, val_data=val_data, job=job, tokenizer=tokenizer, prompt_style=style,
        sample=(val or train)[0], sync=make_grad_sync(fabric, model, optimizer, job, dropbp),
        # Under FSDP the unwrapped module holds shards: generation must go through the wrapper, which gathers them.
        inference_model=model if is_fsdp(fabric) else model.module, model_name=config.name, dropbp=dropbp,
        fingerprint=fingerprint)
    n_exact = job.eval.exact_match if job.eval.exact_match is not None else (DEMO_EXACT_MATCH if is_demo else 0)
    return session, loop, val[:n_exact]


def make_batches(data: SFTDataset, job: FinetuneJob, fabric: Fabric, accum: int
                 ) -> tuple[BatchIterator | PackedBatchIterator, Callable[[list[dict[str, Any]]], dict[str, Any]]]:
    """The order of the training samples and how a micro-batch is made of them: padded rows of
    --train.micro_batch_size samples, or with --data.packing one row of whole samples up to a token budget."""
    if not job.data.packing:
        return BatchIterator(len(data), job.train.micro_batch_size, job.seed, fabric.global_rank, fabric.world_size,
                             step_samples=job.train.global_batch_size), collate
    lengths = [n - 1 for n in data.lengths()]  # what a sample puts in the packed row: its inputs
    # By default as many samples per micro-batch as padding would hold on average, and room for the longest one.
    budget = job.data.pack_tokens or max(round(job.train.micro_batch_size * sum(lengths) / len(lengths)), max(lengths))
    batches = PackedBatchIterator(lengths, budget, job.seed, fabric.global_rank, fabric.world_size, accum)
    fabric.print(f"Packing: micro-batches of up to {budget} tokens, {batches.bins_per_epoch} per epoch "
                 f"({sum(lengths) / (batches.bins_per_epoch * budget):.0%} full)")
    return batches, collate_packed


def make_dataset(conversations: list[Conversation], name: str, tokenizer: Tokenizer, style: PromptStyle,
                 max_seq_length: int, job: FinetuneJob, fabric: Fabric) -> SFTDataset:
    """A split tokenized, with a note on truncation and a stop when nothing is left to learn."""
    data = SFTDataset(conversations, tokenizer, style, max_seq_length, job.data.mask_prompt)
    if data.num_truncated:
        fabric.print(f"Note: {data.num_truncated} of {len(data)} {name} samples truncated to {max_seq_length} tokens")
    check_targets(data, name, max_seq_length, fabric)
    return data


def print_distribution(fabric: Fabric, job: FinetuneJob) -> None:
    """How one optimizer step splits over processes (nothing on one process)."""
    if fabric.world_size == 1:
        return
    accum = job.train.global_batch_size // (job.train.micro_batch_size * fabric.world_size)
    nodes = f"{job.num_nodes} node" + ("s" if job.num_nodes > 1 else "")
    fabric.print(f"Distributed: {fabric.world_size} processes ({job.devices} devices x {nodes}), "
                 f"{strategy_name(job)}; one optimizer step = {job.train.global_batch_size} samples = "
                 f"{job.train.micro_batch_size} per micro-batch x {accum} accumulated x {fabric.world_size} ranks")


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


def build_model(job: FinetuneJob) -> GPT:
    """Load the base weights and make the job's model: every weight trainable, or the adapter's (on 4 bits)."""
    # Every weight cast to the precision's parameter dtype as it is loaded, whatever the file stores: float32 for
    # 32-true and *-mixed (master weights), bf16/fp16 for *-true.
    model = load_model(job.checkpoint_dir, device="cpu", dtype=param_dtype(job.precision))
    if job.adapter is None:
        return model.requires_grad_(True)
    if job.quantize is not None:
        model = quantize_model(model, job.quantize, compute_dtype=compute_dtype(job.precision))
    return apply_lora(model, job.adapter)


def load_trained_weights(model: GPT, checkpoint: Path, job: FinetuneJob) -> None:
    """The weights a training checkpoint holds: the whole model, or the adapter tensors on the base."""
    if job.adapter is not None:
        load_adapters(model, checkpoint / LORA_WEIGHTS_NAME)
    else:
        load_checkpoint(model, checkpoint / WEIGHTS_NAME, strict=True)
        model.requires_grad_(True)


def load_conversations_for(job: FinetuneJob, config: Config
                           ) -> tuple[list[Conversation], list[Conversation], bool]:
    """Training and validation conversations, and whether they are the bundled demo task set."""
    data = job.data
    train_file = data.train_file
    demo = data.demo if data.demo is not None else (train_file is None and data.dataset is None
                                                    and config.name == "demo")
    if demo:
        train_file, val_file = write_demo_dataset(Path(job.out_dir) / "data")
        return load_conversations(train_file), load_conversations(val_file), True
    if data.dataset is not None:
        records = load_dataset_conversations(data.dataset, data.split, data.format)
        if data.val_split is not None:
            return records, load_dataset_conversations(data.dataset, data.val_split, data.format), False
    else:
        if train_file is None:
            train_file = Path("data/alpaca/train.json")
            if not train_file.is_file():
                raise FileNotFoundError(
                    "No --data.train_file given and data/alpaca/train.json does not exist. Run "
                    "`python scripts/prepare_alpaca.py`, pass --data.train_file your.json[l] (or --data.dataset), or "
                    "train on the bundled digit tasks with --data.demo true."
                )
            val_default = train_file.with_name("val.json")
            if data.val_file is None and val_default.is_file():
                data.val_file = val_default
        records = load_conversations(Path(train_file), data.format)
    if data.val_file is not None:
        return records, load_conversations(Path(data.val_file), data.format), False
    train, val = split_records(records, data.val_split_fraction, job.seed)
    return train, val, False


def make_dropbp(model: GPT, args: DropBPArgs, seed: int, warmup_draws: int = 0) -> Optional[DropBPHandler]:
    """The DropBP handler (uniform rates until calibration), or None when --dropbp.rate is 0.

    warmup_draws: masks (micro-batches) over which the rates ramp up from 0 (--dropbp.warmup of the steps)."""
    if args.rate == 0:
        return None
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


def make_optimizer(model: torch.nn.Module, job: FinetuneJob, n_samples: int, dropbp: Optional[DropBPHandler] = None
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


def make_scheduler(optimizer: Any, job: FinetuneJob, max_steps: int, dropbp: Optional[DropBPHandler] = None) -> Any:
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


def lr_schedule(args: TrainArgs, max_steps: int) -> Callable[[int], float]:
    """Linear warm-up to 1, then cosine decay to `min_lr_ratio` at `max_steps` (a LambdaLR multiplier)."""
    warmup = min(args.lr_warmup_steps, max_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
        return args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def make_loggers(out_dir: Path) -> list[Any]:
    """OUT/logs/metrics.csv always (one file for the run, continued on resume); TensorBoard too when installed."""
    loggers: list[Any] = [MetricsCSV(out_dir / "logs")]
    try:
        from lightning.fabric.loggers import TensorBoardLogger

        loggers.append(TensorBoardLogger(out_dir, name="tensorboard"))
    except ImportError:  # tensorboard (or tensorboardX) is not installed: CSV only
        pass
    return loggers

