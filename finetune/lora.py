"""Fine-tune with LoRA (and QLoRA with --quantize bnb.nf4). With no arguments: the offline demo."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

from lit_model.train.args import DataArgs, DropBPArgs, EvalArgs, TrainArgs
from lit_model.peft.lora import LoRAConfig
from lit_model.checkpoint_io import DEMO_CHECKPOINT
from lit_model.train import FinetuneJob, run
from lit_model.cli import script_main


def setup(
    checkpoint_dir: Path = DEMO_CHECKPOINT,
    out_dir: Path = Path("out/finetune/lora"),
    precision: Optional[str] = None,
    quantize: Optional[Literal["bnb.nf4", "bnb.nf4-dq", "bnb.fp4", "bnb.fp4-dq"]] = None,
    devices: int = 1,
    num_nodes: int = 1,
    strategy: Literal["auto", "ddp", "fsdp"] = "auto",
    seed: int = 1337,
    resume: Optional[str] = None,
    overwrite: bool = False,
    data: DataArgs = DataArgs(),
    train: TrainArgs = TrainArgs(global_batch_size=8, micro_batch_size=8, learning_rate=3e-3),
    eval: EvalArgs = EvalArgs(),
    dropbp: DropBPArgs = DropBPArgs(),
    lora: LoRAConfig = LoRAConfig(mlp=True),
) -> dict[str, float]:
    """Fine-tune a model with LoRA adapters; only the adapters train and only they are saved (out_dir/final).

    Args:
        checkpoint_dir: base model directory (lit_model.pth, model_config.yaml, tokenizer); default: the bundled demo.
        out_dir: where logs, metrics and checkpoints go.
        precision: Fabric precision: 32-true, bf16-true, bf16-mixed, 16-mixed (CUDA). Default: bf16-true on a GPU
            with bf16, else 32-true.
        quantize: store the frozen base weights in 4 bits with bitsandbytes (QLoRA): bnb.nf4, bnb.nf4-dq (double
            quantization), bnb.fp4, bnb.fp4-dq.
        devices: devices (GPUs) per node; Fabric starts one process per device (docs/distributed.md).
        num_nodes: machines; every node runs the same command (docs/distributed.md has SLURM and torchrun recipes).
        strategy: auto (one device, or DDP on several), ddp (data parallel: a full copy of the model per device) or
            fsdp (each transformer block sharded over the devices). train.global_batch_size stays the samples per
            optimizer step over all devices, so the same run on more devices accumulates fewer micro-batches.
        seed: random seed (data order, initialisation).
        resume: continue a run: "auto" (the latest step-NNNNNN in out_dir, else start fresh) or a checkpoint
            directory. Restores weights, optimizer, schedule, step, data position and RNG states.
        overwrite: a fresh run into an out_dir that holds another run's checkpoints (final/, step-NNNNNN/) deletes
            them; without it such a run is refused.
        data: training data.
        train: optimisation.
        eval: evaluation.
        dropbp: DropBP (--dropbp.rate 0.5 skips about half of the blocks' backward FLOPs; 0: off).
        lora: LoRA rank, alpha, dropout and target layers.
    """
    job = FinetuneJob(
        checkpoint_dir=checkpoint_dir, out_dir=out_dir, precision=precision, devices=devices, num_nodes=num_nodes,
        strategy=strategy, seed=seed, data=data, train=train, eval=eval, adapter=lora, quantize=quantize, resume=resume,
        overwrite=overwrite, dropbp=dropbp, hparams=dict(locals()),
    )
    return run(job)


if __name__ == "__main__":
    script_main(setup)
