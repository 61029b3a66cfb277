"""What a fine-tuning run is asked to do: the argument groups of the CLI (each dataclass one `--group.field` block),
the job that a script builds from them, and the validation that lists every problem at once."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Optional

from lit_model.checkpoint_io import check_checkpoint_dir
from lit_model.data.formats import FORMAT_CHOICES
from lit_model.data.records import is_parquet
from lit_model.errors import CorruptFileError
from lit_model.peft.lora import LoRAConfig
from lit_model.precision import canonical
from lit_model.quantize import validate_quantize_precision
from lit_model.train.checkpoints import resolve_resume


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
        train_file: a JSON, JSONL or Parquet file of Alpaca records (instruction, input, output), OpenAI-style
            conversations ({"messages": [{"role", "content"}, ...]}) or ShareGPT conversations ({"conversations":
            [{"from", "value"}, ...]}). None (and no `dataset`): the bundled demo task set for the demo model, else
            data/alpaca/train.json (made by scripts/prepare_alpaca.py).
        val_file: validation records, in any of those formats; None: `val_split` of `dataset`, else
            `val_split_fraction` held out of the training records.
        val_split_fraction: share of the training records held out when there is no val_file or val_split.
        format: auto (each file's format from its first record's keys), alpaca, messages or sharegpt; every record
            of a file must be of its format. Conversations need an optional system message first, then user and
            assistant in turn, ending with an answer (at least one with text).
        dataset: instead of train_file, a `datasets` dataset (pip install 'lit-dropbp[datasets]'): a directory
            written by save_to_disk, a directory of data files, or a Hub name (downloaded when online). No dataset's
            own code is run (never trust_remote_code).
        split: the split of `dataset` to train on.
        val_split: a split of `dataset` to validate on (e.g. test); None: `val_file`, else `val_split_fraction`.
        prompt_style: prompt template name (alpaca, plain, llama3, chatml, ..., or chat_template for the
            checkpoint's own Jinja template); None: the checkpoint's prompt_style.yaml, else its chat template, else
            the default for the model family (alpaca for base models).
        mask_prompt: train on the assistant's answers only (every answer of a conversation, each with the end of
            turn the template writes after it); false: on every token.
        demo: train and validate on the bundled digit-task set (lit_model/data/demo_tasks.py, 2000 / 150 records) and
            report held-out exact match; default: on for the demo model when no train_file is given.
        packing: padding-free micro-batches: whole samples packed into one row up to `pack_tokens`, attention kept
            within each sample (block-diagonal), positions restarting per sample; the loss per token is the padded
            run's. `--train.micro_batch_size` then only sets the default budget.
        pack_tokens: the token budget of a packed micro-batch; None: micro_batch_size times the mean sample length,
            at least the longest sample.
    """

    train_file: Optional[Path] = None
    val_file: Optional[Path] = None
    val_split_fraction: float = 0.05
    format: str = "auto"
    dataset: Optional[str] = None
    split: str = "train"
    val_split: Optional[str] = None
    prompt_style: Optional[str] = None
    mask_prompt: bool = True
    demo: Optional[bool] = None
    packing: bool = False
    pack_tokens: Optional[int] = None

    def problems(self) -> list[str]:
        out = []
        if self.pack_tokens is not None and self.pack_tokens < 2:
            out.append(f"--data.pack_tokens must be at least 2 tokens, got {self.pack_tokens}")
        if self.pack_tokens is not None and not self.packing:
            out.append("--data.pack_tokens sets the budget of packed micro-batches: add --data.packing true")
        if self.demo and (self.train_file is not None or self.val_file is not None or self.dataset is not None):
            out.append("--data.demo true trains on the bundled task set: leave out --data.train_file/--data.val_file/"
                       "--data.dataset")
        for name in ("train_file", "val_file"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                out.append(f"--data.{name} {str(path)!r} does not exist")
            elif path is not None and is_parquet(path) and importlib.util.find_spec("pyarrow") is None:
                out.append(f"--data.{name} {str(path)!r} is a Parquet file, which needs pyarrow: pip install pyarrow")
        if not 0.0 < self.val_split_fraction < 1.0:
            out.append(f"--data.val_split_fraction must be in (0, 1), got {self.val_split_fraction}")
        if self.format not in FORMAT_CHOICES:
            out.append(f"--data.format must be one of {', '.join(FORMAT_CHOICES)}, got {self.format!r}")
        out += self._dataset_problems()
        return out

    def _dataset_problems(self) -> list[str]:
        """--data.dataset and its splits: one source of training data, splits only of a dataset."""
        if self.dataset is None:
            return [f"--data.{name} picks a split of --data.dataset, which is not given"
                    for name, value, unset in (("split", self.split, "train"), ("val_split", self.val_split, None))
                    if value != unset]
        out = []
        if self.train_file is not None:
            out.append("--data.dataset and --data.train_file are two sources of training data: give one")
        if self.val_split is not None and self.val_file is not None:
            out.append("--data.val_split and --data.val_file are two sources of validation data: give one")
        if self.val_split is not None and self.val_split == self.split:
            out.append(f"--data.val_split {self.val_split!r} is the training split: validate on another split, or "
                       "leave it out to hold out --data.val_split_fraction")
        if importlib.util.find_spec("datasets") is None:
            out.append("--data.dataset needs the datasets package: pip install 'lit-dropbp[datasets]'")
        return out


# The settings each DropBP method implies; any of them can be overridden by its own flag.
DROPBP_METHODS: dict[str, dict[str, object]] = {
    # Ours: drop a random prefix of the network (the kept branches get exact gradients), ramp the rate up over the
    # first 30% of training, and give every branch the learning rate lr / (1 - p) so that its expected update per
    # step is the baseline's. BENCHMARKS.md, "DropBP that pays", has the study behind it.
    "prefix": dict(sampler="prefix", sensitivity_at=0.0, warmup=0.3, scale_lr=True),
    # The paper's: independent Bernoulli masks, rates re-allocated from measured sensitivity at 10% of training.
    "paper": dict(sampler="independent", sensitivity_at=0.1, warmup=0.0, scale_lr=False),
}


@dataclass
class DropBPArgs:
    """DropBP: skip the backward of residual branches (attention, MLP) at random, forward unchanged.

    Args:
        rate: target drop rate, the FLOPs-weighted mean over branches (0: off; the paper studies 0.5, 0.75, 0.875).
        method: prefix (ours, the default: exact gradients for the kept branches, a warm-up and matched learning
            rates) or paper (the published method: independent masks, sensitivity-allocated rates). The four
            settings below default to the method's.
        sampler: independent (Bernoulli per branch, the paper's), topup (the official later scheme; biased upward),
            stratified (each branch kept exactly its share of steps) or prefix (drop everything below a random cut:
            exact gradients for the kept branches; its per-branch rates follow from the cut).
        sensitivity_at: fraction of training after which per-branch rates are re-allocated from measured gradient
            sensitivity (0: keep the sampler's rates).
        warmup: fraction of training over which the rates ramp linearly from 0 to their targets (0: none).
        scale_lr: every branch's parameters step with learning rate lr / (1 - p) for its rate p (at most
            max_lr_scale times lr), so that their expected update per step matches training without DropBP.
        allocator: greedy (the reference: 0.1 steps, cap 0.9) or flops (exact: minimise sum S_l * b_l^2).
        min_rate: the lowest rate any branch may get.
        sensitivity_samples: micro-batches averaged for the sensitivity measurement.
        sensitivity: exact (the paper's: drop each branch alone, 2 * n_layer + 1 passes per sample) or estimate
            (one pass per sample: the gradient each branch sends back, read with hooks).
        max_lr_scale: the cap of the scale_lr factor.
    """

    rate: float = 0.0
    method: str = "prefix"
    sampler: Optional[str] = None
    sensitivity_at: Optional[float] = None
    warmup: Optional[float] = None
    scale_lr: Optional[bool] = None
    allocator: str = "greedy"
    min_rate: float = 0.0
    sensitivity_samples: int = 1
    sensitivity: str = "exact"
    max_lr_scale: float = 4.0

    def resolved(self) -> "DropBPArgs":
        """These settings with every unset one taken from the method (an unknown method leaves them unset)."""
        implied = DROPBP_METHODS.get(self.method, {})
        return replace(self, **{k: v for k, v in implied.items() if getattr(self, k) is None})

    def problems(self) -> list[str]:
        out = []
        if self.method not in DROPBP_METHODS:
            return [f"--dropbp.method must be one of {', '.join(DROPBP_METHODS)}, got {self.method!r}"]
        args = self.resolved()
        if not 0.0 <= args.rate <= 0.9:
            out.append(f"--dropbp.rate must be in [0, 0.9] (each branch keeps >= 10% of its backwards), got {args.rate}")
        if not 0.0 <= args.sensitivity_at < 1.0:
            out.append(f"--dropbp.sensitivity_at must be in [0, 1), got {args.sensitivity_at}")
        if args.allocator not in ("greedy", "flops"):
            out.append(f"--dropbp.allocator must be greedy or flops, got {args.allocator!r}")
        samplers = ("independent", "topup", "stratified", "prefix")
        if args.sampler not in samplers:
            out.append(f"--dropbp.sampler must be one of {', '.join(samplers)}, got {args.sampler!r}")
        elif args.sampler == "prefix" and args.rate > 0 and args.sensitivity_at > 0:
            out.append("--dropbp.sampler prefix takes its per-branch rates from its cut, not from sensitivity: "
                       "set --dropbp.sensitivity_at 0 (or use another sampler)")
        if args.sensitivity not in ("exact", "estimate"):
            out.append(f"--dropbp.sensitivity must be exact or estimate, got {args.sensitivity!r}")
        if args.max_lr_scale < 1.0:
            out.append(f"--dropbp.max_lr_scale must be >= 1, got {args.max_lr_scale}")
        if not 0.0 <= args.warmup < 1.0:
            out.append(f"--dropbp.warmup must be in [0, 1), got {args.warmup}")
        if args.rate > 0 and not 0.0 <= args.min_rate <= args.rate:
            out.append(f"--dropbp.min_rate must be in [0, rate={args.rate}], got {args.min_rate}")
        if args.sensitivity_samples <= 0:
            out.append(f"--dropbp.sensitivity_samples must be positive, got {args.sensitivity_samples}")
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


# ---- the job: everything a fine-tuning script decided ---------------------------------------------------------------

STRATEGIES = ("auto", "ddp", "fsdp")
OPTIMIZERS = ("adamw", "badam", "badam_ratio")


@dataclass
class FinetuneJob:
    """Everything a fine-tuning script decided. `adapter` is the LoRA configuration (QLoRA: with `quantize`), or None
    for full fine-tuning; `mode` names which."""

    checkpoint_dir: Path
    out_dir: Path
    precision: Optional[str]
    devices: int
    seed: int
    data: DataArgs
    train: TrainArgs
    eval: EvalArgs
    adapter: Optional[LoRAConfig] = None
    quantize: Optional[str] = None
    resume: Optional[str] = None  # "auto", a step-NNNNNN directory, or None
    dropbp: DropBPArgs = field(default_factory=DropBPArgs)
    optimizer: str = "adamw"  # one of OPTIMIZERS; BAdam's: full fine-tuning only
    badam: BAdamArgs = field(default_factory=BAdamArgs)
    hparams: dict[str, Any] = field(default_factory=dict)  # the script's arguments, saved as hyperparameters.yaml
    num_nodes: int = 1
    strategy: str = "auto"  # one of STRATEGIES (lit_model.train.dist.make_strategy)
    overwrite: bool = False  # a fresh run may clear an out_dir that holds another run's checkpoints

    @property
    def mode(self) -> str:
        """"lora" (an adapter trains) or "full" (every weight does): the word checkpoints and logs use."""
        return "full" if self.adapter is None else "lora"

    def dropbp_settings(self) -> DropBPArgs:
        """--dropbp.* with the method's defaults filled in; BAdam sets its learning rates itself, so the method's
        scale_lr does not apply to it (asking for scale_lr with BAdam is an error, see validate_job)."""
        args = self.dropbp
        if self.optimizer != "adamw" and args.scale_lr is None:
            args = replace(args, scale_lr=False)
        return args.resolved()

    @property
    def world_size(self) -> int:
        """Processes over all nodes: one per device."""
        return self.devices * self.num_nodes


def validate_job(job: FinetuneJob) -> None:
    """Check every argument at once; raise one error listing all problems."""
    problems = job.train.problems(job.world_size) + job.eval.problems() + job.data.problems() + job.dropbp.problems()
    problems += distributed_problems(job)
    try:
        canonical(job.precision)
    except ValueError as err:
        problems.append(f"--precision: {err}")
    if job.optimizer not in OPTIMIZERS:
        problems.append(f"--optimizer must be adamw, badam or badam_ratio, got {job.optimizer!r}")
    elif job.optimizer != "adamw":
        problems += job.badam.problems()
        if job.dropbp.rate > 0 and job.dropbp.scale_lr:  # asked for; the method's default yields to BAdam
            problems.append(f"--dropbp.scale_lr sets learning rates per branch, which --optimizer {job.optimizer} "
                            "manages itself: use --optimizer adamw, or --dropbp.scale_lr false")
        if job.adapter is not None:
            problems.append(f"--optimizer {job.optimizer} is for full fine-tuning (finetune/full.py)")
    if job.adapter is not None:
        problems += job.adapter.problems()
    if job.quantize is not None:
        try:
            validate_quantize_precision(job.quantize, job.precision)
        except ValueError as err:
            problems.append(str(err))
    if job.resume is not None and str(job.resume) != "auto":
        try:  # the structure of its files; their checksums are compared once, when the run resolves it
            resolve_resume(job.resume, Path(job.out_dir), verify=False)
        except (FileNotFoundError, CorruptFileError) as err:
            problems.append(str(err))
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
