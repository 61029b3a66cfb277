"""Argument groups shared by the fine-tuning scripts. Each dataclass is one `--group.field` block of the CLI."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional


@dataclass
class TrainArgs:
    """Optimisation settings.

    Args:
        global_batch_size: samples per optimizer step, over all devices and nodes: the same training on any number
            of devices. A multiple of micro_batch_size * devices * num_nodes.
        micro_batch_size: samples per forward/backward on one device; gradients accumulate over
            global / (micro * devices * num_nodes) micro-batches.
        max_steps: optimizer steps to run; when None, `epochs` decides.
        epochs: passes over the training data (used when max_steps is None).
        learning_rate: peak learning rate of AdamW.
        min_lr_ratio: the cosine schedule decays to learning_rate * min_lr_ratio.
        lr_warmup_steps: linear warm-up steps from 0 to learning_rate.
        weight_decay: AdamW weight decay.
        beta1: AdamW beta1.
        beta2: AdamW beta2.
        max_norm: clip the gradient norm to this value (None: no clipping).
        max_seq_length: truncate samples to this many tokens (None: the model's block_size).
        activation_checkpointing: recompute every k-th block in the backward (0: off, 1: every block).
        offload_activations: keep checkpointed block inputs in CPU memory between forward and backward.
        log_interval: steps between progress-bar/metric updates.
        save_interval: steps between training checkpoints (step-NNNNNN/, resumable; None: only the final one).
        keep_last: keep only the newest N training checkpoints (None: keep all).
        allow_new_schedule: on resume, accept a changed schedule (max_steps or epochs, learning rate, warm-up, decay,
            betas, clipping) and put it in force, instead of refusing the checkpoint as another run's.
    """

    global_batch_size: int = 16
    micro_batch_size: int = 4
    max_steps: Optional[int] = None
    epochs: int = 1
    learning_rate: float = 3e-4
    min_lr_ratio: float = 0.1
    lr_warmup_steps: int = 10
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.95
    max_norm: Optional[float] = 1.0
    max_seq_length: Optional[int] = None
    activation_checkpointing: int = 0
    offload_activations: bool = False
    log_interval: int = 1
    save_interval: Optional[int] = None
    keep_last: Optional[int] = None
    allow_new_schedule: bool = False

    def problems(self, devices: int = 1) -> list[str]:
        """Everything wrong with these settings, as messages (empty when valid); `devices` over all nodes."""
        out = []
        for name in ("global_batch_size", "micro_batch_size", "epochs", "log_interval"):
            if getattr(self, name) <= 0:
                out.append(f"--train.{name} must be positive, got {getattr(self, name)}")
        if self.micro_batch_size > 0 and devices > 0 and self.global_batch_size % (self.micro_batch_size * devices):
            out.append(
                f"--train.global_batch_size ({self.global_batch_size}) must be a multiple of --train.micro_batch_size "
                f"({self.micro_batch_size}) x devices ({devices})"
            )
        if self.max_steps is not None and self.max_steps <= 0:
            out.append(f"--train.max_steps must be positive or None, got {self.max_steps}")
        if self.learning_rate <= 0:
            out.append(f"--train.learning_rate must be positive, got {self.learning_rate}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            out.append(f"--train.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.lr_warmup_steps < 0 or self.weight_decay < 0:
            out.append("--train.lr_warmup_steps and --train.weight_decay must be >= 0")
        if not (0.0 <= self.beta1 < 1.0 and 0.0 <= self.beta2 < 1.0):
            out.append(f"--train.beta1/beta2 must be in [0, 1), got {self.beta1}, {self.beta2}")
        if self.max_norm is not None and self.max_norm <= 0:
            out.append(f"--train.max_norm must be positive or None, got {self.max_norm}")
        if self.max_seq_length is not None and self.max_seq_length < 2:
            out.append(f"--train.max_seq_length must be at least 2, got {self.max_seq_length}")
        if self.activation_checkpointing < 0:
            out.append(f"--train.activation_checkpointing must be >= 0, got {self.activation_checkpointing}")
        if self.save_interval is not None and self.save_interval <= 0:
            out.append(f"--train.save_interval must be positive or None, got {self.save_interval}")
        if self.keep_last is not None and self.keep_last <= 0:
            out.append(f"--train.keep_last must be positive or None, got {self.keep_last}")
        return out


@dataclass
class EvalArgs:
    """Evaluation settings.

    Args:
        interval: steps between validation runs (validation also runs at the end).
        max_iters: validation batches per run (None: the whole validation set).
        initial_validation: also validate before the first step (the baseline of the final validation loss).
        exact_match: held-out samples scored by greedy generation before and after training (None: 100 for the
            bundled demo task set, 0 otherwise).
        exact_match_before: also score them before training (the "before" of the demo's before/after line).
        max_new_tokens: tokens generated per sample (exact match and the sample generation).
    """

    interval: int = 50
    max_iters: Optional[int] = None
    initial_validation: bool = True
    exact_match: Optional[int] = None
    exact_match_before: bool = True
    max_new_tokens: int = 50

    def problems(self) -> list[str]:
        out = []
        if self.interval <= 0:
            out.append(f"--eval.interval must be positive, got {self.interval}")
        if self.max_iters is not None and self.max_iters <= 0:
            out.append(f"--eval.max_iters must be positive or None, got {self.max_iters}")
        if self.exact_match is not None and self.exact_match < 0:
            out.append(f"--eval.exact_match must be >= 0, got {self.exact_match}")
        if self.max_new_tokens <= 0:
            out.append(f"--eval.max_new_tokens must be positive, got {self.max_new_tokens}")
        return out


@dataclass
class DataArgs:
    """Training data.

    Args:
        train_file: Alpaca-style JSON or JSONL (instruction, input, output). None: the bundled demo task set for the
            demo model, else data/alpaca/train.json (made by scripts/prepare_alpaca.py).
        val_file: validation records; None: split `val_split_fraction` off the training file.
        val_split_fraction: share of the training records held out when there is no val_file.
        prompt_style: prompt template name (alpaca, plain, llama3, chatml, ..., or chat_template for the
            checkpoint's own Jinja template); None: the checkpoint's prompt_style.yaml, else its chat template, else
            the default for the model family (alpaca for base models).
        mask_prompt: train on response tokens only.
        demo: train and validate on the bundled digit-task set (lit_model/demo_tasks.py, 2000 / 150 records) and
            report held-out exact match; default: on for the demo model when no train_file is given.
    """

    train_file: Optional[Path] = None
    val_file: Optional[Path] = None
    val_split_fraction: float = 0.05
    prompt_style: Optional[str] = None
    mask_prompt: bool = True
    demo: Optional[bool] = None

    def problems(self) -> list[str]:
        out = []
        if self.demo and (self.train_file is not None or self.val_file is not None):
            out.append("--data.demo true trains on the bundled task set: leave out --data.train_file/--data.val_file")
        for name in ("train_file", "val_file"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                out.append(f"--data.{name} {str(path)!r} does not exist")
        if not 0.0 < self.val_split_fraction < 1.0:
            out.append(f"--data.val_split_fraction must be in (0, 1), got {self.val_split_fraction}")
        return out


@dataclass
class DropBPArgs:
    """DropBP: skip the backward of residual branches (attention, MLP) at random, forward unchanged.

    Args:
        rate: target drop rate, the FLOPs-weighted mean over branches (0: off; the paper studies 0.5, 0.75, 0.875).
        sensitivity_at: fraction of training after which per-branch rates are re-allocated from measured gradient
            sensitivity (0: keep uniform rates).
        allocator: greedy (the reference: 0.1 steps, cap 0.9) or flops (exact: minimise sum S_l * b_l^2).
        sampler: independent (Bernoulli per branch, the paper's), topup (the official later scheme; biased upward),
            stratified (each branch kept exactly its share of steps) or prefix (drop everything below a random cut:
            exact gradients for the kept branches; its per-branch rates follow from the cut).
        min_rate: the lowest rate any branch may get.
        sensitivity_samples: micro-batches averaged for the sensitivity measurement.
        sensitivity: exact (the paper's: drop each branch alone, 2 * n_layer + 1 passes per sample) or estimate
            (one pass per sample: the gradient each branch sends back, read with hooks).
        warmup: fraction of training over which the rates ramp linearly from 0 to their targets (0: none).
        scale_lr: every branch's parameters step with learning rate lr / (1 - p) for its rate p (at most
            max_lr_scale times lr), so that their expected update per step matches training without DropBP.
        max_lr_scale: the cap of that factor.
    """

    rate: float = 0.0
    sensitivity_at: float = 0.1
    allocator: str = "greedy"
    sampler: str = "independent"
    min_rate: float = 0.0
    sensitivity_samples: int = 1
    sensitivity: str = "exact"
    warmup: float = 0.0
    scale_lr: bool = False
    max_lr_scale: float = 4.0

    def problems(self) -> list[str]:
        out = []
        if not 0.0 <= self.rate <= 0.9:
            out.append(f"--dropbp.rate must be in [0, 0.9] (each branch keeps >= 10% of its backwards), got {self.rate}")
        if not 0.0 <= self.sensitivity_at < 1.0:
            out.append(f"--dropbp.sensitivity_at must be in [0, 1), got {self.sensitivity_at}")
        if self.allocator not in ("greedy", "flops"):
            out.append(f"--dropbp.allocator must be greedy or flops, got {self.allocator!r}")
        samplers = ("independent", "topup", "stratified", "prefix")
        if self.sampler not in samplers:
            out.append(f"--dropbp.sampler must be one of {', '.join(samplers)}, got {self.sampler!r}")
        elif self.sampler == "prefix" and self.rate > 0 and self.sensitivity_at > 0:
            out.append("--dropbp.sampler prefix takes its per-branch rates from its cut, not from sensitivity: "
                       "set --dropbp.sensitivity_at 0 (or use another sampler)")
        if self.sensitivity not in ("exact", "estimate"):
            out.append(f"--dropbp.sensitivity must be exact or estimate, got {self.sensitivity!r}")
        if self.max_lr_scale < 1.0:
            out.append(f"--dropbp.max_lr_scale must be >= 1, got {self.max_lr_scale}")
        if not 0.0 <= self.warmup < 1.0:
            out.append(f"--dropbp.warmup must be in [0, 1), got {self.warmup}")
        if self.rate > 0 and not 0.0 <= self.min_rate <= self.rate:
            out.append(f"--dropbp.min_rate must be in [0, rate={self.rate}], got {self.min_rate}")
        if self.sensitivity_samples <= 0:
            out.append(f"--dropbp.sensitivity_samples must be positive, got {self.sensitivity_samples}")
        return out


@dataclass
class BAdamArgs:
    """BAdam: full-parameter fine-tuning one block at a time (Adam on the active block only; --optimizer badam).

    Args:
        switch_block_every: optimizer steps per block visit (None: max(n / (B * D), 50), one round sees the data).
        switch_mode: order of the blocks: random (a fresh permutation each round), ascending or descending.
        start_block: the first block to train (None: the mode's first).
        include_embedding: the embedding is an extra block.
        include_lm_head: the LM head (with the final norm) is an extra block.
        active_modules: name substrings of parameters that train all the time (e.g. a freshly initialised head).
        update_ratio: for --optimizer badam_ratio: the share of each matrix's entries trained at a time.
        mask_mode: for --optimizer badam_ratio: adjacent (consecutive entries) or scatter (random entries).
    """

    switch_block_every: Optional[int] = None
    switch_mode: str = "random"
    start_block: Optional[int] = None
    include_embedding: bool = False
    include_lm_head: bool = False
    active_modules: tuple[str, ...] = ()
    update_ratio: float = 0.1
    mask_mode: str = "adjacent"

    def problems(self) -> list[str]:
        out = []
        if self.switch_block_every is not None and self.switch_block_every <= 0:
            out.append(f"--badam.switch_block_every must be positive or None, got {self.switch_block_every}")
        if self.switch_mode not in ("random", "ascending", "descending"):
            out.append(f"--badam.switch_mode must be random, ascending or descending, got {self.switch_mode!r}")
        if not 0.0 < self.update_ratio <= 1.0:
            out.append(f"--badam.update_ratio must be in (0, 1], got {self.update_ratio}")
        if self.mask_mode not in ("adjacent", "scatter"):
            out.append(f"--badam.mask_mode must be adjacent or scatter, got {self.mask_mode!r}")
        return out
